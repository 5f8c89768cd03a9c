//! A region across `fork`: the child sees the parent's memory as of the fork, resident and
//! remote pages alike, and each side's later writes stay its own. Its own test binary: a child
//! forked from a test harness running other tests on other threads could inherit their locks.

mod common;

use std::time::Duration;

use common::{key, servers, uris, value, words, MIB};
use mosaic_netram::{NetRam, NetRamConfig};
use mosaic_pager::FaultMode;

/// Region and written part, in words.
const REGION: u64 = 12 * MIB;
const WRITTEN: usize = (8 * MIB / 8) as usize;

/// What the child checks and does; its exit code says what went wrong (0: nothing).
fn child(ram: NetRam, ticket: mosaic_netram::ForkTicket) -> i32 {
    let ram = match ram.fork_child(ticket) {
        Ok(r) => r,
        Err(_) => return 10,
    };
    let w = words(&ram);
    if (0..WRITTEN).any(|i| w[i] != value(i, 1)) {
        return 11; // not the parent's contents as of the fork
    }
    if w[WRITTEN..].iter().any(|x| *x != 0) {
        return 12; // pages never written are zeros
    }
    for (i, x) in w.iter_mut().enumerate() {
        *x = value(i, 3);
    }
    if w.iter().enumerate().any(|(i, x)| *x != value(i, 3)) {
        return 13;
    }
    if ram.stats().written_back == 0 {
        return 14; // the child's writes went through its own servers
    }
    // And its budget: what is in memory here, inherited pages included, comes down to it.
    let budget_pages = MIB / 4096;
    let present = || {
        let p = mosaic_pager::present_pages(ram.as_ptr() as usize, REGION / 4096).unwrap_or_default();
        p.iter().map(|r| r.end - r.start).sum::<u64>()
    };
    let mut tries = 0;
    while present() > budget_pages + budget_pages / 8 {
        tries += 1;
        if tries > 500 {
            return 15;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    0
}

fn fork_and_check(mode: FaultMode) {
    let s = servers(2, 256 * MIB);
    let mut cfg = NetRamConfig::new(uris(&s), key(), REGION, MIB);
    cfg.fault_mode = mode;
    let ram = NetRam::new(cfg).unwrap();
    let w = words(&ram);
    for (i, x) in w.iter_mut().take(WRITTEN).enumerate() {
        *x = value(i, 1);
    }
    let before = ram.stats();
    assert!(before.resident > 0 && before.written_back > 0, "some pages resident, most remote: {before:?}");
    let ticket = ram.prepare_fork().unwrap();
    // SAFETY: the child runs only `child` and exits without returning into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child(ram, ticket))).unwrap_or(20);
        // SAFETY: ends the child without running the harness's exit handlers.
        unsafe { libc::_exit(code) };
    }
    ram.fork_parent(ticket);
    // The parent writes meanwhile: none of it may reach the child.
    for (i, x) in w.iter_mut().enumerate() {
        *x = value(i, 2);
    }
    let mut status = 0;
    let mut waited = 0;
    // Bounded: the child has 60 s.
    while waited < 6000 {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
    }
    if waited == 6000 {
        // SAFETY: our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("the child did not finish within 60 s");
    }
    assert!(libc::WIFEXITED(status), "child died of signal {}", libc::WTERMSIG(status));
    assert_eq!(libc::WEXITSTATUS(status), 0, "child's check failed (see `child` for the code)");
    assert!(w.iter().enumerate().all(|(i, x)| *x == value(i, 2)), "the child's writes reached the parent");
    drop(ram);
    // The child's session ended with it; the parent's too: nothing is left on the servers.
    for m in &s {
        common::wait_until("the servers are empty", Duration::from_secs(5), || m.stats().used_pages == 0);
    }
}

#[test]
fn a_forked_child_sees_the_parent_as_of_the_fork_and_writes_apart() {
    fork_and_check(FaultMode::FaultingThread);
    fork_and_check(FaultMode::PerCpu);
}
