//! A region handed over (only its table moves): the taker sees every page as it was, dirty
//! resident pages included, after the source is gone; a hand-over nobody takes leaves the region
//! working at the source. Both ends run in this process, one after the other, at the same address
//! (the cross-process version is in the migrate crate's tests).

mod common;

use common::{key, servers, uris, value, words, MIB};
use mosaic_netram::{HandOver, NetRam, NetRamConfig};

const REGION: u64 = 24 * MIB;
const BUDGET: u64 = 4 * MIB;

/// A region at `addr`: an address of its own for each test (they run side by side in this
/// process), far below where the kernel places mappings, so that nothing else takes it between
/// the source's end and the taker's start.
fn region(uris: Vec<String>, addr: usize) -> NetRam {
    let mut cfg = NetRamConfig::new(uris, key(), REGION, BUDGET);
    cfg.fixed_addr = Some(addr);
    NetRam::new(cfg).unwrap()
}

/// Writes round `round` into the first `n` words.
fn write(ram: &NetRam, n: usize, round: u64) {
    for (i, w) in words(ram)[..n].iter_mut().enumerate() {
        *w = value(i, round);
    }
}

/// The first word that differs from round `round` in the first `n` words, and zeros beyond.
fn first_wrong(ram: &NetRam, n: usize, round: u64) -> Option<usize> {
    words(ram).iter().enumerate().position(|(i, w)| *w != if i < n { value(i, round) } else { 0 })
}

#[test]
fn the_taker_sees_every_page_after_the_source_is_gone() {
    let s = servers(2, 256 * MIB);
    // 16 MiB written in a 24 MiB region with 4 MiB resident: most pages remote, the last
    // written ones resident and dirty at the hand-over, the rest never touched.
    let n = (16 * MIB / 8) as usize;
    let src = region(uris(&s), 0x5a00_0000_0000);
    write(&src, n, 1);
    // A page written again, and one discarded: the hand-over carries what they hold now.
    words(&src)[5] = 55;
    src.discard(100, 1).unwrap();
    let h = src.hand_over().unwrap();
    assert!(h.written_back() > 0, "the dirty resident pages were written back: {h:?}");
    assert_eq!(h.remote_pages(), 16 * MIB / 4096 - 1, "{h:?}");
    let wire = h.encode();
    let addr = src.as_ptr() as usize;
    // The source ends (its session closes: the clone keeps the pages).
    drop(src);
    let h = HandOver::decode(&wire).unwrap();
    let taker = NetRam::take_over(&h, h.config(key(), BUDGET)).unwrap();
    assert_eq!(taker.as_ptr() as usize, addr);
    assert_eq!(taker.len() as u64, REGION);
    assert_eq!(words(&taker)[5], 55);
    assert!(words(&taker)[100 * 512..101 * 512].iter().all(|w| *w == 0), "the discarded page reads zeros");
    words(&taker)[5] = value(5, 1);
    for i in 100 * 512..101 * 512 {
        words(&taker)[i] = value(i, 1);
    }
    assert_eq!(first_wrong(&taker, n, 1), None);
    assert_eq!(taker.stats().lost, 0);
    // It writes on like any region: a second round over more than its budget comes back right.
    write(&taker, n, 2);
    assert_eq!(first_wrong(&taker, n, 2), None);
}

#[test]
fn a_hand_over_nobody_takes_leaves_the_region_working_here() {
    let s = servers(1, 256 * MIB);
    let n = (8 * MIB / 8) as usize;
    let src = region(uris(&s), 0x5a10_0000_0000);
    write(&src, n, 1);
    let h = src.hand_over().unwrap();
    assert_eq!(src.stats().resident, 0, "everything was written back and dropped");
    src.resume_after_hand_over(&h);
    assert_eq!(first_wrong(&src, n, 1), None);
    write(&src, n, 3);
    assert_eq!(first_wrong(&src, n, 3), None);
    // The clone made for the taker was ended when the source took the region back: a taker
    // that comes anyway is refused (its pages are gone), rather than running on a copy that
    // diverges from this one.
    drop(src);
    let e = NetRam::take_over(&h, h.config(key(), BUDGET)).unwrap_err();
    assert!(e.to_string().contains("no server that still holds the handed-over session"), "{e}");
}

#[test]
fn a_taker_with_the_wrong_key_or_a_dead_server_gets_a_clear_error() {
    let s = servers(1, 64 * MIB);
    let src = region(uris(&s), 0x5a20_0000_0000);
    write(&src, 1024, 1);
    let h = src.hand_over().unwrap();
    drop(src);
    let other = mosaic_transport::ClusterKey::from_bytes(b"some-other-cluster-key-entirely").unwrap();
    let e = NetRam::take_over(&h, h.config(other, BUDGET)).unwrap_err();
    assert!(e.is_wrong_key(), "{e}");
    drop(s);
    let e = NetRam::take_over(&h, h.config(key(), BUDGET)).unwrap_err();
    assert!(e.to_string().contains("unreachable"), "{e}");
}

#[test]
fn a_prefetch_window_on_its_way_does_not_stop_a_hand_over() {
    let s = servers(1, 256 * MIB);
    let n = (16 * MIB / 8) as usize;
    let src = region(uris(&s), 0x5a30_0000_0000);
    write(&src, n, 1);
    // A sequential read of pages long evicted: the prefetcher follows the stream and asks for
    // the window after the last one, still on its way when the reader stops.
    let w = words(&src);
    let sum: u64 = (0..(4 * MIB / 8) as usize).step_by(512).map(|i| w[i]).fold(0, u64::wrapping_add);
    assert_ne!(sum, 0);
    assert!(src.stats().prefetched > 0, "the read was followed: {:?}", src.stats());
    let h = src.hand_over().expect("a window on its way is given up, not taken for a touch");
    drop(src);
    let taker = NetRam::take_over(&h, h.config(key(), BUDGET)).unwrap();
    assert_eq!(first_wrong(&taker, n, 1), None);
}

#[test]
fn a_server_dead_at_the_hand_over_with_the_only_copies_leaves_the_region_working_at_the_source() {
    let mut s = servers(2, 256 * MIB);
    let n = (8 * MIB / 8) as usize;
    let mut cfg = NetRamConfig::new(uris(&s), key(), REGION, BUDGET);
    cfg.fixed_addr = Some(0x5a40_0000_0000);
    cfg.copies = 1;
    let src = NetRam::new(cfg).unwrap();
    write(&src, n, 1);
    let before = src.placement();
    assert!(before.iter().all(|(_, _, pages)| *pages > 0), "both servers hold pages: {before:?}");
    drop(s.pop()); // the second server dies with the only copies of its pages
                   // Either the hand-over fails (its pages are on no server that could hand them over), or
                   // the region noticed the loss first and hands them over as lost (SIGBUS at the taker, as
                   // here); taken back in both cases, the first server's part stays the region's.
    match src.hand_over() {
        Err(e) => assert!(e.to_string().contains("no memory server that could hand them over"), "{e}"),
        Ok(h) => {
            assert_eq!(h.servers().len(), 1, "{h:?}");
            assert!(h.remote_pages() < (n / 512) as u64, "the dead server's pages are not remote: {h:?}");
            src.resume_after_hand_over(&h);
        }
    }
    // The region stores on the first server again.
    src.discard(0, REGION / 4096).unwrap();
    write(&src, n, 2);
    assert_eq!(first_wrong(&src, n, 2), None);
    let (uri, alive, pages) = src.placement()[0].clone();
    assert!(alive && pages > 0, "{uri}: alive {alive}, {pages} pages");
}

#[test]
fn with_two_copies_a_server_dead_at_the_hand_over_costs_nothing() {
    let mut s = servers(2, 256 * MIB);
    let n = (16 * MIB / 8) as usize;
    let src = region(uris(&s), 0x5a50_0000_0000);
    write(&src, n, 1);
    drop(s.pop()); // the second server dies
    let h = src.hand_over().unwrap();
    assert_eq!(h.servers().len(), 1, "the dead server is left out: {h:?}");
    drop(src);
    let taker = NetRam::take_over(&h, h.config(key(), BUDGET)).unwrap();
    assert_eq!(first_wrong(&taker, n, 1), None);
    assert_eq!(taker.stats().lost, 0);
}
