//! The probe's network-RAM modes (see the binary's documentation).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mosaic_migrate::{take_over_netram, NetRamOutgoing};
use mosaic_netram::{MemServer, MemServerConfig, NetRam, NetRamConfig};

use super::{key, numbers, ADDR, PAGE};

/// Word `i` of page `p` after write round `round`.
fn value(p: usize, i: usize, round: u64) -> u64 {
    super::pattern(p, i).wrapping_add(round << 48)
}

/// The region's first word (it is mapped at `ADDR` in both processes).
fn words() -> *mut u64 {
    ADDR as *mut u64
}

fn write_round(len: usize, pct: usize, round: u64) {
    for page in (0..len / PAGE).filter(|p| super::filled(*p, pct)) {
        for i in 0..PAGE / 8 {
            // SAFETY: inside the region mapped at ADDR for `len` bytes; aligned; this thread is
            // its only writer.
            unsafe { words().add(page * PAGE / 8 + i).write_volatile(value(page, i, round)) };
        }
    }
}

/// The first word that is not round `round` where filled, zeros elsewhere.
fn check_round(len: usize, pct: usize, round: u64) -> Result<(), String> {
    for page in 0..len / PAGE {
        for i in 0..PAGE / 8 {
            // SAFETY: as in `write_round`.
            let got = unsafe { words().add(page * PAGE / 8 + i).read_volatile() };
            let want = if super::filled(page, pct) { value(page, i, round) } else { 0 };
            if got != want {
                return Err(format!("page {page} word {i}: {got:#x}, expected {want:#x} (round {round})"));
            }
        }
    }
    Ok(())
}

fn mib_bytes(what: &str, mib: &str) -> Result<u64, String> {
    mib.parse::<u64>().ok().filter(|m| *m > 0).map(|m| m << 20).ok_or(format!("{what} {mib}: not a number of MiB"))
}

pub(super) fn memserver(mib: &str) -> Result<(), String> {
    let capacity = mib_bytes("capacity", mib)?;
    let server = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(capacity, key()?))
        .map_err(|e| mosaic_transport::error_chain(&e))?;
    println!("URI {}", server.uri());
    let _ = std::io::stdout().flush();
    // Serves until killed (the tests kill it when they end), for an hour at most.
    std::thread::sleep(Duration::from_secs(3600));
    Ok(())
}

pub(super) fn source(mib: &str, pct: &str, budget: &str, servers: &[&str]) -> Result<(), String> {
    let (len, pct) = numbers(mib, pct)?;
    let mut cfg = NetRamConfig::new(
        servers.iter().map(|s| s.to_string()).collect(),
        key()?,
        len as u64,
        mib_bytes("budget", budget)?,
    );
    cfg.fixed_addr = Some(ADDR);
    let ram = NetRam::new(cfg).map_err(|e| mosaic_transport::error_chain(&e))?;
    // A writer rewrites the region round after round while this thread waits; it is stopped
    // (between rounds) before the hand-over, as the threads of a migrating program are.
    let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        std::thread::spawn(move || {
            for round in 1..1000 {
                write_round(len, pct, round);
                rounds.store(round, Ordering::Release);
                if stop.load(Ordering::Acquire) {
                    break;
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while rounds.load(Ordering::Acquire) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Release);
    writer.join().map_err(|_| "the writer panicked".to_string())?;
    let round = rounds.load(Ordering::Acquire);
    let mut out =
        NetRamOutgoing::hand_over(ram, "tcp://127.0.0.1:0", key()?).map_err(|b| mosaic_transport::error_chain(&b.1))?;
    let s = out.stats();
    println!(
        "URI {} ROUND {round} HAND_OVER_US {} WRITTEN_BACK {} REMOTE {}",
        out.uri(),
        s.hand_over_us,
        s.written_back_pages,
        s.remote_pages
    );
    let _ = std::io::stdout().flush();
    if std::env::var_os("MIGRATE_PROBE_QUIT_AT_COMMIT").is_some() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !out.committed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        // Dies at once, without ending anything: the kernel closes its connections.
        // SAFETY: raising a signal at this process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    let wait = std::env::var("MIGRATE_PROBE_WAIT_MS").ok().and_then(|w| w.parse().ok()).unwrap_or(300_000);
    match out.finish(Duration::from_millis(wait)) {
        Ok(s) => {
            println!("SENT BYTES {}", s.bytes_sent);
            Ok(())
        }
        Err(e) if !out.committed() => {
            eprintln!("migrate-probe: {}; thawing", mosaic_transport::error_chain(&e));
            let ram = out.thaw().map_err(|e| mosaic_transport::error_chain(&e))?;
            check_round(ram.len(), pct, round).map_err(|e| format!("after thawing, {e}"))?;
            write_round(ram.len(), pct, round + 1);
            check_round(ram.len(), pct, round + 1).map_err(|e| format!("writing after thawing, {e}"))?;
            println!("THAWED OK");
            Ok(())
        }
        Err(e) => Err(mosaic_transport::error_chain(&e)),
    }
}

pub(super) fn dest(uri: &str, mib: &str, pct: &str, budget: &str, round: &str) -> Result<(), String> {
    let (len, pct) = numbers(mib, pct)?;
    let round: u64 = round.parse().map_err(|_| format!("{round}: not a round"))?;
    let (ram, s) =
        take_over_netram(uri, key()?, mib_bytes("budget", budget)?).map_err(|e| mosaic_transport::error_chain(&e))?;
    if ram.as_ptr() as usize != ADDR || ram.len() != len {
        return Err(format!("a region of {} bytes at {:p}", ram.len(), ram.as_ptr()));
    }
    check_round(len, pct, round)?;
    // Written on here, beyond the budget: eviction at the destination stores the new round.
    write_round(len, pct, round + 1);
    check_round(len, pct, round + 1)?;
    let st = ram.stats();
    println!(
        "OK TAKE_OVER_US {} BYTES {} REMOTE {} FETCHED {} LOST {}",
        s.take_over_us, s.bytes_received, s.remote_pages, st.fetched, st.lost
    );
    Ok(())
}

pub(super) fn describe_only(uri: &str) -> Result<(), String> {
    let conn = mosaic_transport::connect(uri, &mosaic_transport::ConnectOptions::new(key()?))
        .map_err(|e| mosaic_transport::error_chain(&e))?;
    let d = conn.call(mosaic_migrate::DESCRIBE_NETRAM, &[]).map_err(|e| mosaic_transport::error_chain(&e))?;
    println!("DESCRIBED {} BYTES", d.len());
    // SAFETY: ends this process at once, as a destination that dies would.
    unsafe { libc::_exit(0) }
}
