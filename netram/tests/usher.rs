//! Memory ushering, the client's side: when a memory server asks for its pages to go elsewhere
//! (its node is short of memory), a region moves the pages it holds there to its other servers
//! while the program keeps using them, and places nothing new there; with nowhere else to go,
//! the pages stay.

mod common;

use std::time::{Duration, Instant};

use common::{key, servers, uris, value, words, MIB};
use mosaic_netram::{NetRam, NetRamConfig};

const REGION: u64 = 32 * MIB;
const BUDGET: u64 = 4 * MIB;

fn region(uris: Vec<String>) -> NetRam {
    let mut cfg = NetRamConfig::new(uris, key(), REGION, BUDGET);
    cfg.copies = 1;
    NetRam::new(cfg).unwrap()
}

/// The first word that differs from what round `round` wrote to words `rewritten` and round 1
/// to the others.
fn first_wrong(ram: &NetRam, rewritten: std::ops::Range<usize>, round: u64) -> Option<usize> {
    words(ram).iter().enumerate().position(|(i, w)| *w != value(i, if rewritten.contains(&i) { round } else { 1 }))
}

#[test]
fn pages_move_off_a_leaving_server_while_the_program_keeps_using_them() {
    let s = servers(3, 256 * MIB);
    let ram = region(uris(&s));
    let all = words(&ram).len();
    for (i, w) in words(&ram).iter_mut().enumerate() {
        *w = value(i, 1);
    }
    let held = s[2].stats().used_pages;
    assert!(held > 0, "the third server holds some of the region");
    s[2].set_leaving(true);
    // The program goes on reading and writing its first quarter (the rest stays remote: only
    // the ushering moves it) until the leaving server holds nothing of it.
    let hot = 0..all / 4;
    let mut round = 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    while s[2].stats().used_pages > 0 || round < 3 {
        assert!(Instant::now() < deadline, "the leaving server still holds {} pages", s[2].stats().used_pages);
        for i in hot.clone() {
            let w = &mut words(&ram)[i];
            assert_eq!(*w, value(i, round), "word {i} in round {round}");
            *w = value(i, round + 1);
        }
        round += 1;
    }
    let st = ram.stats();
    assert!(st.ushered > 0, "remote pages were moved, not only written back elsewhere: {st:?}");
    assert_eq!(st.lost, 0, "{st:?}");
    assert_eq!(first_wrong(&ram, hot.clone(), round), None, "every page reads what was written");
    // Nothing new goes there while it is leaving, from this region or a new one.
    let other = region(uris(&s));
    for ram in [&ram, &other] {
        for (i, w) in words(ram).iter_mut().enumerate() {
            *w = value(i, 1);
        }
        assert_eq!(first_wrong(ram, 0..0, 1), None);
    }
    assert_eq!(s[2].stats().used_pages, 0, "no page was placed on the leaving server");
    // Once it takes pages again, new regions place slabs there again.
    s[2].set_leaving(false);
    drop(other);
    let again = region(uris(&s));
    for (i, w) in words(&again).iter_mut().enumerate() {
        *w = value(i, 1);
    }
    assert!(s[2].stats().used_pages > 0, "pages go to the server again");
    assert_eq!(first_wrong(&again, 0..0, 1), None);
}

#[test]
fn with_nowhere_else_to_go_the_pages_stay_and_writes_still_land_there() {
    // Two servers, two copies: the leaving server is the only place for every page's second
    // copy.
    let s = servers(2, 256 * MIB);
    let mut cfg = NetRamConfig::new(uris(&s), key(), REGION, BUDGET);
    cfg.copies = 2;
    let ram = NetRam::new(cfg).unwrap();
    for (i, w) in words(&ram).iter_mut().enumerate() {
        *w = value(i, 1);
    }
    let held = s[1].stats().used_pages;
    s[1].set_leaving(true);
    // Two session checks (every 2 s): the region hears it and has nowhere to move the pages.
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(first_wrong(&ram, 0..0, 1), None, "every page reads what was written");
    // Written again, every page still gets both copies, and the resident set its budget: the
    // write-backs are not refused for the leaving server.
    let all = words(&ram).len();
    for (i, w) in words(&ram).iter_mut().enumerate() {
        *w = value(i, 2);
    }
    let st = ram.stats();
    assert_eq!(first_wrong(&ram, 0..all, 2), None);
    assert_eq!((st.ushered, st.under_replicated, st.lost), (0, 0, 0), "{st:?}");
    assert!(st.resident <= 2 * BUDGET / 4096, "the resident set kept to its budget: {st:?}");
    assert!(s[1].stats().used_pages >= held, "the second copies stayed: {} of {held}", s[1].stats().used_pages);
}
