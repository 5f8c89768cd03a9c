#![allow(missing_docs, clippy::cast_possible_truncation)]
//! Network RAM as an attacker and an unlucky user find it: another authenticated connection
//! naming a client's id, a client stopped for longer than its grace time, a server dying while
//! pages are written back, and pages whose only remote copies vanish while they are resident.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use mosaic_netram::{proto, MemServer, MemServerConfig, NetRam, NetRamConfig};
use mosaic_transport::{connect, ConnectOptions, Page, Status};

mod common;
use common::{key, servers, uris, value, wait_until, words, MIB};

/// The probe: a second authenticated connection sent GET/PUT with another client's id and
/// re-opened that id with a tiny lease, reading and overwriting the owner's pages.
#[test]
fn another_connection_can_neither_use_nor_take_over_a_clients_session() {
    let server = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(16 * MIB, key())).unwrap();
    let opts = ConnectOptions::new(key());
    let owner = connect(server.uri(), &opts).unwrap();
    let intruder = connect(server.uri(), &opts).unwrap();
    let id = [0x5a; 16];
    owner.call(proto::OPEN, &proto::encode_open(&id, 60_000, &[7; proto::SECRET_LEN])).unwrap();
    let page = [0xabu8; mosaic_netram::PAGE_SIZE];
    owner.call(proto::PUT, &proto::encode_put(&id, 1, &[(3, &page)])).unwrap();

    let mut got = Page::boxed();
    let e = intruder.call_page(proto::GET, &proto::encode_get(&id, 1, 3), &mut got).unwrap_err();
    assert_eq!(e.status(), Some(Status::Forbidden), "{e}");
    let zeros = [0u8; mosaic_netram::PAGE_SIZE];
    let e = intruder.call(proto::PUT, &proto::encode_put(&id, 1, &[(3, &zeros)])).unwrap_err();
    assert_eq!(e.status(), Some(Status::Forbidden), "{e}");
    let e = intruder.call(proto::OPEN, &proto::encode_open(&id, 1, &[8; proto::SECRET_LEN])).unwrap_err();
    assert_eq!(e.status(), Some(Status::Forbidden), "{e}");
    assert!(e.to_string().contains("wrong secret"), "{e}");
    let e = intruder.call(proto::CLOSE, &id).unwrap_err();
    assert_eq!(e.status(), Some(Status::Forbidden), "{e}");

    // The owner's page and session are untouched.
    owner.call_page(proto::GET, &proto::encode_get(&id, 1, 3), &mut got).unwrap();
    assert_eq!(got.0, page);
    assert_eq!(server.stats().clients, 1);
}

/// A memory server killed while the evictor is writing dirty pages back to it, with two copies:
/// every page reads back as last written.
#[test]
fn a_server_killed_during_write_back_loses_nothing_with_two_copies() {
    let mut s = servers(3, 64 * MIB);
    let ram = NetRam::new(NetRamConfig::new(uris(&s), key(), 16 * MIB, MIB)).unwrap();
    let w = words(&ram);
    for (i, x) in w.iter_mut().enumerate() {
        *x = value(i, 1);
    }
    // Rewrite everything a few times over; kill a server once write-back is well under way,
    // while the writes (and so the write-back) go on.
    let total = w.len();
    let mut killed = false;
    for round in 2..5u64 {
        for (i, x) in w.iter_mut().enumerate() {
            *x = value(i, round);
            if !killed && round == 3 && i == total / 3 {
                assert!(ram.stats().written_back > 4096, "write-back is under way: {:?}", ram.stats());
                s.remove(1).shutdown();
                killed = true;
            }
        }
    }
    assert!(killed);
    for (i, x) in w.iter().enumerate() {
        assert_eq!(*x, value(i, 4), "word {i}");
    }
    let st = ram.stats();
    assert_eq!(st.lost, 0, "{st:?}");
    assert!(!ram.placement()[1].1, "the dead server is marked dead");
}

/// A resident, clean page whose only remote copy goes away with its server is saved elsewhere
/// (by the evictor, or by the rebuild) before it leaves local memory: it is never dropped.
#[test]
fn a_resident_page_whose_only_copy_is_gone_is_saved_not_dropped() {
    let mut s = servers(2, 64 * MIB);
    let mut cfg = NetRamConfig::new(uris(&s), key(), 4 * MIB, 4 * MIB);
    cfg.copies = 1;
    let ram = NetRam::new(cfg).unwrap();
    let w = words(&ram);
    for (i, x) in w.iter_mut().enumerate() {
        *x = value(i, 3);
    }
    // Send everything to the servers (one copy each, spread over both), then bring the first
    // half back: resident and clean, each with one remote copy.
    ram.set_resident_budget(256 * 4096).unwrap();
    wait_until("the resident set shrinks", Duration::from_secs(20), || ram.stats().resident <= 256);
    // (A budget of twice the region: the first half fits beside the victim cache and the
    // buffers in flight that the budget also covers.)
    ram.set_resident_budget(8 * MIB).unwrap();
    let half = w.len() / 2;
    let mut sum = 0u64;
    for x in &w[..half] {
        sum = sum.wrapping_add(*x);
    }
    assert_ne!(sum, 0);
    let placed = ram.placement();
    assert!(placed[0].2 > 0 && placed[1].2 > 0, "copies on both servers: {placed:?}");
    // Server 0 dies. Its copies of pages in the first half are gone; the pages are still here.
    s.remove(0).shutdown();
    // Squeeze the resident set: the first half must leave local memory, and may only do so by
    // way of server 1.
    ram.set_resident_budget(64 * 4096).unwrap();
    wait_until("the resident set shrinks again", Duration::from_secs(20), || ram.stats().resident <= 64);
    for (i, x) in w[..half].iter().enumerate() {
        assert_eq!(*x, value(i, 3), "word {i}");
    }
    let st = ram.stats();
    assert_eq!(st.lost, 0, "{st:?}");
    assert!(st.saved_clean + st.rebuilt > 0, "the orphaned pages were stored again: {st:?}");
}

const CHILD_ENV: &str = "MOSAIC_TRUST_CHILD";

/// The child of the process-level test below. Ignored, so it never counts as a test by itself.
#[test]
#[ignore = "the child process of a process-level test, not a test by itself"]
fn trust_child() {
    let Ok(uri) = std::env::var(CHILD_ENV) else { return };
    let mut cfg = NetRamConfig::new(vec![uri], key(), 4 * MIB, MIB / 2);
    cfg.grace = Duration::from_millis(300);
    let ram = NetRam::new(cfg).unwrap();
    let w = words(&ram);
    for (i, x) in w.iter_mut().enumerate() {
        *x = value(i, 9);
    }
    println!("STORED {}", ram.stats().written_back);
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let bad = w.iter().enumerate().filter(|(i, x)| **x != value(*i, 9)).count();
    println!("VERIFIED {} bad {bad}", w.len());
    std::io::stdout().flush().unwrap();
}

/// The probe: a program stopped (Ctrl-Z, a debugger, a paused VM) for longer than its lease lost
/// its data. Now a connected client is never reclaimed: stopped for more than twice its grace
/// time, it finds everything on SIGCONT.
#[test]
fn a_client_stopped_for_twice_its_grace_time_keeps_its_data() {
    let server = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(64 * MIB, key())).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "trust_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, server.uri())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut next_line = |want: &str| -> String {
        for _ in 0..20 {
            let mut l = String::new();
            if out.read_line(&mut l).unwrap() == 0 {
                break;
            }
            if l.contains(want) {
                return l;
            }
        }
        panic!("the child never printed {want}");
    };
    let stored = next_line("STORED");
    // The harness may print "test trust_child ... " on the same line.
    let after = stored.split("STORED").nth(1).unwrap();
    let written: u64 = after.split_whitespace().next().unwrap().parse().unwrap();
    assert!(written > 500, "most pages went to the server: {stored}");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // What the server holds for it once it is stopped (`written` counts a page written back
    // twice twice, so it may be more than the pages held).
    let before = server.stats().used_pages;
    assert!(before > 500, "most pages are on the server: {before}");
    std::thread::sleep(Duration::from_millis(900)); // three grace times
    let held = server.stats();
    assert_eq!((held.clients, held.detached_clients), (1, 0), "{held:?}");
    assert!(held.used_pages >= before, "nothing reclaimed while it was stopped: {before} then {held:?}");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    writeln!(child.stdin.as_mut().unwrap(), "CHECK").unwrap();
    let verified = next_line("VERIFIED");
    assert!(verified.trim().ends_with("bad 0"), "{verified}");
    assert!(child.wait().unwrap().success());
    // Gone now: its pages are reclaimed once the grace time has passed.
    wait_until("the pages are reclaimed", Duration::from_secs(10), || server.stats().used_pages == 0);
}
