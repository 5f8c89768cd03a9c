//! Moves a region between two processes and checks it arrived whole (the migration tests'
//! helper; the key comes from `MOSAIC_CLUSTER_KEY`):
//!
//! ```text
//! migrate-probe source SIZE PCT [URI]  fills PCT% of a MIB MiB region, freezes it, prints
//!                                      `URI <uri>`, waits until every page left, prints `SENT PAGES n BYTES n FETCHED n PRESENT n`
//! migrate-probe dest URI SIZE PCT      maps it here, checks every page (a pattern where filled,
//!                                      zeros elsewhere), waits for the rest, prints `OK FAULTED n PUSHED n ZERO n ...`
//! ```
//!
//! A network-RAM region (its pages on memory servers, only its table migrates):
//!
//! ```text
//! migrate-probe memserver MIB          a memory server of MIB MiB on loopback; prints `URI <uri>`,
//!                                      serves until killed (an hour at most)
//! migrate-probe netram-source SIZE PCT BUDGET SERVER...
//!                                      fills PCT% of a SIZE MiB region (BUDGET MiB resident) while
//!                                      a writer rewrites it round after round; stops the writer,
//!                                      hands the region over, prints `URI <uri> ROUND r ...`,
//!                                      waits for a destination
//! migrate-probe netram-dest URI SIZE PCT BUDGET ROUND
//!                                      takes it over, checks every page (round ROUND where filled,
//!                                      zeros elsewhere), writes another round and checks it
//! migrate-probe netram-describe-only URI
//!                                      asks for the description and exits without committing (a
//!                                      destination that dies mid-migration)
//! ```
//!
//! `migrate-probe restore` is the restorer of process migration (`keeper_main`), for the tests.
//!
//! With `MIGRATE_PROBE_WAIT_MS`, the source waits that long for a destination; if none took the
//! region over, it thaws it, checks it and writes it, and prints `THAWED OK`. With
//! `MIGRATE_PROBE_QUIT_AT_COMMIT=1` it exits as soon as a destination took the region over (a
//! source that dies after the hand-over).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mosaic_migrate::{Incoming, Outgoing};

mod netram;
use mosaic_transport::ClusterKey;

/// Where the region lives in both processes.
const ADDR: usize = 0x6100_0000_0000;
const PAGE: usize = 4096;

/// Whether page `p` is among the PCT% filled.
fn filled(p: usize, pct: usize) -> bool {
    (p * 7919) % 100 < pct
}

/// The word `i` of page `p`.
fn pattern(p: usize, i: usize) -> u64 {
    (p as u64) << 20 | i as u64 | 1
}

fn main() -> ExitCode {
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["restore"] => return ExitCode::from(mosaic_migrate::process::keeper_main()),
        ["source", mib, pct] => source(mib, pct, "tcp://127.0.0.1:0"),
        ["source", mib, pct, uri] => source(mib, pct, uri),
        ["dest", uri, mib, pct] => dest(uri, mib, pct),
        ["memserver", mib] => netram::memserver(mib),
        ["netram-source", mib, pct, budget, ref servers @ ..] if !servers.is_empty() => {
            netram::source(mib, pct, budget, servers)
        }
        ["netram-dest", uri, mib, pct, budget, round] => netram::dest(uri, mib, pct, budget, round),
        ["netram-describe-only", uri] => netram::describe_only(uri),
        _ => Err(USAGE.into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: migrate-probe source SIZE PCT [URI] | dest URI SIZE PCT | memserver MIB
       | netram-source SIZE PCT BUDGET_MIB SERVER... | netram-dest URI SIZE PCT BUDGET_MIB ROUND
       | netram-describe-only URI";

fn numbers(mib: &str, pct: &str) -> Result<(usize, usize), String> {
    // MiB, or KiB with a K (a region that is no whole number of chunks, or of 64 pages).
    let bytes = match mib.strip_suffix('K') {
        Some(kib) => kib.parse::<usize>().ok().filter(|k| k % 4 == 0).map(|k| k << 10),
        None => mib.parse::<usize>().ok().map(|m| m << 20),
    };
    let bytes = bytes.filter(|b| *b > 0).ok_or(format!("{mib}: not a size (MiB, or KiB with K, whole pages)"))?;
    let pct: usize = pct.parse().ok().filter(|p| *p <= 100).ok_or(format!("{pct}: not a percentage"))?;
    Ok((bytes, pct))
}

fn key() -> Result<ClusterKey, String> {
    ClusterKey::from_env().map_err(|e| e.to_string())
}

fn source(mib: &str, pct: &str, uri: &str) -> Result<(), String> {
    let (len, pct) = numbers(mib, pct)?;
    mosaic_migrate::map_anonymous_at(ADDR, len).map_err(|e| format!("cannot map {len} bytes at {ADDR:#x}: {e}"))?;
    for page in (0..len / PAGE).filter(|p| filled(*p, pct)) {
        for i in 0..PAGE / 8 {
            // SAFETY: inside the mapping just made, aligned, used by this thread only.
            unsafe { (ADDR as *mut u64).add(page * PAGE / 8 + i).write(pattern(page, i)) };
        }
    }
    let t = Instant::now();
    // SAFETY: the mapping made above, not used by this process after this point.
    let mut out = unsafe { Outgoing::freeze(ADDR, len, uri, key()?) }.map_err(|e| mosaic_transport::error_chain(&e))?;
    let freeze_us = t.elapsed().as_micros();
    println!("URI {} FREEZE_US {freeze_us}", out.uri());
    let _ = std::io::stdout().flush();
    if std::env::var_os("MIGRATE_PROBE_QUIT_AT_COMMIT").is_some() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !out.committed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        std::process::exit(3); // dies with pages still here
    }
    let wait = std::env::var("MIGRATE_PROBE_WAIT_MS").ok().and_then(|w| w.parse().ok()).unwrap_or(300_000);
    match out.finish(Duration::from_millis(wait)) {
        Ok(s) => {
            println!(
                "SENT PAGES {} BYTES {} FETCHED {} PRESENT {}",
                s.pages_sent, s.bytes_sent, s.pages_fetched, s.present_pages
            );
            Ok(())
        }
        Err(e) if !out.committed() => {
            eprintln!("migrate-probe: {}; thawing", mosaic_transport::error_chain(&e));
            let addr = out.thaw().map_err(|e| mosaic_transport::error_chain(&e))?;
            for page in 0..len / PAGE {
                // SAFETY: the thawed mapping, ours again, aligned.
                let got = unsafe { (addr as *const u64).add(page * PAGE / 8).read_volatile() };
                let want = if filled(page, pct) { pattern(page, 0) } else { 0 };
                if got != want {
                    return Err(format!("after thawing, page {page}: {got:#x}, expected {want:#x}"));
                }
                // SAFETY: as above; writable again.
                unsafe { (addr as *mut u64).add(page * PAGE / 8).write_volatile(want + 1) };
            }
            println!("THAWED OK");
            Ok(())
        }
        Err(e) => Err(mosaic_transport::error_chain(&e)),
    }
}

fn dest(uri: &str, mib: &str, pct: &str) -> Result<(), String> {
    let (len, pct) = numbers(mib, pct)?;
    let t = Instant::now();
    let mut inc = Incoming::connect(uri, key()?).map_err(|e| mosaic_transport::error_chain(&e))?;
    let running_us = t.elapsed().as_micros();
    if inc.as_ptr() as usize != ADDR || inc.len() != len {
        return Err(format!("a region of {} bytes at {:p}", inc.len(), inc.as_ptr()));
    }
    // From the end backwards: against the stream's direction, so faults and the stream meet.
    for page in (0..len / PAGE).rev() {
        for i in [0, PAGE / 8 - 1] {
            // SAFETY: inside the migrated region, mapped while `inc` lives; aligned.
            let got = unsafe { (ADDR as *const u64).add(page * PAGE / 8 + i).read_volatile() };
            let want = if filled(page, pct) { pattern(page, i) } else { 0 };
            if got != want {
                return Err(format!("page {page} word {i}: {got:#x}, expected {want:#x}"));
            }
        }
    }
    let s = inc.wait_resident(Duration::from_secs(300)).map_err(|e| mosaic_transport::error_chain(&e))?;
    let residence_ms = t.elapsed().as_millis();
    // A page discarded after it arrived reads zeros (Linux's MADV_DONTNEED), and nothing hangs.
    // SAFETY: the first page of the migrated region, mapped while `inc` lives.
    unsafe {
        libc::madvise(ADDR as *mut libc::c_void, PAGE, libc::MADV_DONTNEED);
        let got = (ADDR as *const u64).read_volatile();
        if got != 0 {
            return Err(format!("a discarded page reads {got:#x}, not zeros"));
        }
    }
    println!(
        "OK FAULTED {} PUSHED {} ZERO {} BYTES {} RUNNING_US {running_us} RESIDENCE_MS {residence_ms}",
        s.faulted, s.pushed, s.zero, s.bytes_received
    );
    Ok(())
}
