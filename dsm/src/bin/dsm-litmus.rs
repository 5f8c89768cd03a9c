//! Litmus tests of a DSM job, one process per node: `dsm-litmus TEST [ROUNDS]`, with the job
//! from the environment (`MOSAIC_DSM_RANK`, `MOSAIC_DSM_SIZE`, `MOSAIC_DSM_RENDEZVOUS`,
//! `MOSAIC_CLUSTER_KEY`). Each node prints `rank R: TEST ok ...` and exits 0, or says what it saw
//! and exits 1. Tests:
//!
//! - `counter`: every node adds 1 to two shared counters (on pages of different homes) ROUNDS
//!   times with atomic fetch-add; after a barrier each reads size * ROUNDS from both (a lost
//!   update would show: page-grain single writer makes a CPU's atomic instruction atomic across
//!   nodes).
//! - `mp` (message passing): node 0 writes a datum, then a flag; every other node waits for the
//!   flag, must then read that datum, and acknowledges; node 0 waits for every acknowledgement
//!   before the next round.
//! - `sb` (store buffering): nodes 0 and 1 each write their own variable, then read the other's;
//!   under sequential consistency at least one of them sees the other's write, every round.
//! - `fill`: every node writes its own pages of the region with a pattern; after a barrier each
//!   checks every node's pages, and that each page's home is the node that wrote it first
//!   (`MOSAIC_DSM_PLACEMENT=first-touch`) or page number modulo the nodes (by turns).
//! - `iriw` (independent reads of independent writes, 4 nodes or more): nodes 0 and 1 write x and
//!   y; node 2 reads x then y, node 3 reads y then x; under sequential consistency the two
//!   readers never see the writes in opposite orders.
//! - `abandon` (2 nodes; run node 1 with a short `MOSAIC_DSM_FAULT_TIMEOUT_MS`): node 0 holds
//!   lock 7 for 1.5 s; node 1's lock(7) gives up meanwhile, and once node 0 lets go node 1 takes
//!   the lock again (the grant its abandoned request got was handed back, not kept).
//! - `alloc`: collective allocations give every node the same address (each publishes what it
//!   got, node 0 compares), a freed block is reused, a block of a node's arena written there is
//!   read right by every other node, a node cannot free another's block, and nodes that
//!   allocate different sizes get an error (not diverging heaps), node 0 arriving last or first.
//! - `atomics`: every node adds to a counter with [`Job::fetch_add`] and increments another
//!   with a [`Job::compare_exchange`] loop ROUNDS times each; after a barrier both hold
//!   size * ROUNDS; a misaligned or outside address is refused.
//! - `lock`: every node adds 1 to a counter ROUNDS times with a plain load and a plain store
//!   (not atomic) inside DSM lock 5; after a barrier each reads size * ROUNDS (an increment lost
//!   would mean two nodes inside the lock at once).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mosaic_dsm::{Job, JobConfig};

const PAGE: usize = 4096;
/// Pages of the region: enough for `fill` with 8 nodes.
const PAGES: usize = 256;

fn main() -> ExitCode {
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let test = args.first().map(String::as_str).unwrap_or("");
    let rounds: u64 = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(100);
    let cfg = match JobConfig::from_env((PAGES * PAGE) as u64) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsm-litmus: {e}");
            return ExitCode::from(2);
        }
    };
    let mut job = match Job::join(cfg) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("dsm-litmus: cannot join: {}", chain(&e));
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let r = match test {
        "counter" => counter(&mut job, rounds),
        "mp" => message_passing(&mut job, rounds),
        "sb" => store_buffering(&mut job, rounds),
        "fill" => fill(&mut job),
        "lock" => locked_counter(&job, rounds),
        "iriw" => iriw(&job, rounds),
        "abandon" => abandon(&job),
        "alloc" => alloc(&job),
        "atomics" => atomics(&job, rounds),
        _ => Err(format!("unknown test {test:?}: counter, mp, sb, fill, lock, iriw, abandon, alloc or atomics")),
    };
    let rank = job.rank();
    let stats = job.stats();
    let left = job.leave();
    match (r, left) {
        (Ok(what), Ok(())) => {
            println!("rank {rank}: {test} ok: {what} in {:.1} ms; {stats:?}", start.elapsed().as_secs_f64() * 1e3);
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            println!("rank {rank}: {test} FAILED: {e}");
            ExitCode::FAILURE
        }
        (_, Err(e)) => {
            println!("rank {rank}: {test} FAILED leaving: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    mosaic_transport::error_chain(e)
}

/// The word at byte `offset` of the region, as an atomic (every access through it is one
/// instruction, so coherence makes it atomic across nodes).
fn word(job: &Job, offset: usize) -> &AtomicU64 {
    assert!(offset % 8 == 0 && offset + 8 <= job.len());
    // SAFETY: inside the mapped region, aligned; the region lives as long as `job`, and every
    // node accesses these words only atomically.
    unsafe { &*job.as_ptr().add(offset).cast::<AtomicU64>() }
}

fn barrier(job: &Job) -> Result<(), String> {
    job.barrier().map_err(|e| chain(&e))
}

fn counter(job: &mut Job, rounds: u64) -> Result<String, String> {
    let (a, b) = (word(job, 0), word(job, PAGE + 8));
    for _ in 0..rounds {
        a.fetch_add(1, Ordering::SeqCst);
        b.fetch_add(1, Ordering::SeqCst);
    }
    barrier(job)?;
    let want = rounds * u64::from(job.size());
    let (ga, gb) = (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst));
    if (ga, gb) != (want, want) {
        return Err(format!("counters {ga} and {gb}, expected {want}"));
    }
    Ok(format!("both counters {want}"))
}

fn wait_for(w: &AtomicU64, value: u64, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.load(Ordering::SeqCst) < value {
        if Instant::now() > deadline {
            return Err(format!("{what} never reached {value} (it is {})", w.load(Ordering::SeqCst)));
        }
        std::hint::spin_loop();
    }
    Ok(())
}

fn message_passing(job: &mut Job, rounds: u64) -> Result<String, String> {
    // The datum and the flag on pages of different homes; the readers' acknowledgements on a
    // third, so that every round the writer waits for every reader and the pages move each time.
    let (data, flag, acks) = (word(job, 2 * PAGE), word(job, 3 * PAGE), word(job, 7 * PAGE));
    let readers = u64::from(job.size()) - 1;
    for r in 1..=rounds {
        if job.rank() == 0 {
            data.store(r * 7, Ordering::SeqCst);
            flag.store(r, Ordering::SeqCst);
            wait_for(acks, r * readers, "the readers' acknowledgements")?;
        } else {
            wait_for(flag, r, "the flag")?;
            let d = data.load(Ordering::SeqCst);
            if d != r * 7 {
                return Err(format!("round {r}: saw the flag, then datum {d}, not {}", r * 7));
            }
            acks.fetch_add(1, Ordering::SeqCst);
        }
    }
    barrier(job)?;
    Ok(format!("{rounds} rounds"))
}

fn store_buffering(job: &mut Job, rounds: u64) -> Result<String, String> {
    let me = job.rank();
    let mut both_saw = 0;
    for r in 0..rounds {
        // Round r's two variables, on pages of different homes (x on page 4, y on page 5).
        let off = 8 * usize::try_from(r % 512).expect("small");
        let (x, y) = (word(job, 4 * PAGE + off), word(job, 5 * PAGE + off));
        barrier(job)?;
        let seen = match me {
            0 => {
                x.store(r + 1, Ordering::SeqCst);
                y.load(Ordering::SeqCst)
            }
            1 => {
                y.store(r + 1, Ordering::SeqCst);
                x.load(Ordering::SeqCst)
            }
            _ => r + 1,
        };
        // Publish what this node saw; node 0 checks after the round.
        let saw = word(job, 6 * PAGE + 8 * usize::from(me.min(1)));
        saw.store(u64::from(seen == r + 1), Ordering::SeqCst);
        barrier(job)?;
        if me == 0 {
            let (s0, s1) = (word(job, 6 * PAGE).load(Ordering::SeqCst), word(job, 6 * PAGE + 8).load(Ordering::SeqCst));
            if job.size() > 1 && s0 == 0 && s1 == 0 {
                return Err(format!("round {r}: each node read the other's old value (not sequentially consistent)"));
            }
            both_saw += u64::from(s0 == 1 && s1 == 1);
        }
        barrier(job)?;
    }
    Ok(format!("{rounds} rounds, both saw the other's write in {both_saw}"))
}

fn fill(job: &mut Job) -> Result<String, String> {
    let size = usize::from(job.size());
    let me = usize::from(job.rank());
    let per = (PAGES - 8) / size;
    let words = per * PAGE / 8;
    for i in 0..words {
        word(job, 8 * PAGE + (me * per * PAGE) + 8 * i).store(pattern(me, i), Ordering::Relaxed);
    }
    barrier(job)?;
    let first_touch = std::env::var("MOSAIC_DSM_PLACEMENT").is_ok_and(|p| p == "first-touch");
    for node in 0..size {
        for i in 0..words {
            let got = word(job, 8 * PAGE + (node * per * PAGE) + 8 * i).load(Ordering::Relaxed);
            if got != pattern(node, i) {
                return Err(format!("node {node}'s word {i}: {got:#x}, expected {:#x}", pattern(node, i)));
            }
        }
        for p in 0..per {
            let page = 8 + node * per + p;
            let home = job.home_of(job.as_ptr().wrapping_add(page * PAGE)).map_err(|e| chain(&e))?;
            let want = if first_touch { node } else { page % size };
            if home.map(usize::from) != Some(want) {
                return Err(format!("page {page}, written first by node {node}: home {home:?}, expected {want}"));
            }
        }
    }
    let placed = if first_touch { "placed by first touch" } else { "homed by turns" };
    Ok(format!("{size} x {per} pages checked, {placed}"))
}

fn locked_counter(job: &Job, rounds: u64) -> Result<String, String> {
    let c = job.as_ptr().wrapping_add(9 * PAGE).cast::<u64>();
    for _ in 0..rounds {
        job.lock(5).map_err(|e| chain(&e))?;
        // SAFETY: a word of the mapped region (page 9 of 256), aligned; every node touches it
        // only while holding lock 5, so these plain accesses never race.
        unsafe { c.write_volatile(c.read_volatile() + 1) };
        job.unlock(5).map_err(|e| chain(&e))?;
    }
    barrier(job)?;
    let want = rounds * u64::from(job.size());
    // SAFETY: as above; after the barrier nobody writes it.
    let got = unsafe { c.read_volatile() };
    if got != want {
        return Err(format!("counter {got}, expected {want}: two nodes were inside the lock at once"));
    }
    Ok(format!("locked counter {want}"))
}

fn iriw(job: &Job, rounds: u64) -> Result<String, String> {
    if job.size() < 4 {
        return Err("iriw needs 4 nodes".into());
    }
    let me = job.rank();
    for r in 0..rounds {
        // Round r's x and y on pages of different homes; what the readers saw on a third.
        let off = 8 * usize::try_from(r % 512).expect("small");
        let (x, y) = (word(job, 10 * PAGE + off), word(job, 11 * PAGE + off));
        let seen = |k: usize| word(job, 12 * PAGE + 8 * k);
        barrier(job)?;
        match me {
            0 => x.store(r + 1, Ordering::SeqCst),
            1 => y.store(r + 1, Ordering::SeqCst),
            2 => {
                let a = x.load(Ordering::SeqCst) == r + 1;
                let b = y.load(Ordering::SeqCst) == r + 1;
                seen(0).store(u64::from(a) | u64::from(b) << 1, Ordering::SeqCst);
            }
            3 => {
                let b = y.load(Ordering::SeqCst) == r + 1;
                let a = x.load(Ordering::SeqCst) == r + 1;
                seen(1).store(u64::from(a) | u64::from(b) << 1, Ordering::SeqCst);
            }
            _ => {}
        }
        barrier(job)?;
        if me == 0 {
            let (s2, s3) = (seen(0).load(Ordering::SeqCst), seen(1).load(Ordering::SeqCst));
            // Node 2 saw x new and y old, node 3 saw y new and x old: opposite orders.
            if s2 == 0b01 && s3 == 0b10 {
                return Err(format!("round {r}: the readers saw the two writes in opposite orders"));
            }
        }
        barrier(job)?;
    }
    Ok(format!("{rounds} rounds"))
}

fn abandon(job: &Job) -> Result<String, String> {
    match job.rank() {
        0 => {
            job.lock(7).map_err(|e| chain(&e))?;
            std::thread::sleep(Duration::from_millis(1500));
            job.unlock(7).map_err(|e| chain(&e))?;
            // And again, after node 1 had it: its abandoned grant did not keep the lock.
            std::thread::sleep(Duration::from_millis(1000));
            job.lock(7).map_err(|e| chain(&e))?;
            job.unlock(7).map_err(|e| chain(&e))?;
        }
        1 => {
            std::thread::sleep(Duration::from_millis(200));
            match job.lock(7) {
                Err(mosaic_dsm::JoinError::LockTimeout { .. }) => {}
                Ok(()) => return Err("the lock was granted while node 0 held it".into()),
                Err(e) => return Err(format!("expected a time-out, got: {}", chain(&e))),
            }
            std::thread::sleep(Duration::from_millis(1800));
            job.lock(7).map_err(|e| chain(&e))?;
            job.unlock(7).map_err(|e| chain(&e))?;
        }
        _ => {}
    }
    barrier(job)?;
    Ok("a lock given up on is handed back when granted".into())
}

fn alloc(job: &Job) -> Result<String, String> {
    let me = usize::from(job.rank());
    let size = usize::from(job.size());
    let e = |e: mosaic_dsm::JoinError| chain(&e);
    // Where each node publishes the addresses it got: one collective block, one line per node.
    let board = job.alloc(64 * size as u64).map_err(e)?.cast::<u64>();
    let slot = |node: usize, i: usize| -> Result<&AtomicU64, String> { atomic(job, board.wrapping_add(8 * node + i)) };
    let small = job.alloc(24).map_err(e)?;
    let big = job.alloc(3 * PAGE as u64 + 1).map_err(e)?;
    if small as usize % 64 != 0 || big as usize % PAGE != 0 {
        return Err(format!("misaligned blocks: {small:p}, {big:p}"));
    }
    job.free(small).map_err(e)?;
    let again = job.alloc(16).map_err(e)?;
    if again != small {
        return Err(format!("the freed block at {small:p} was not reused ({again:p})"));
    }
    // A block of this node's arena, filled with a pattern, its address published.
    let words = 2 * PAGE / 8;
    let mine = job.alloc_local((words * 8) as u64).map_err(e)?.cast::<u64>();
    let asked = job.stats().requests;
    for i in 0..words {
        atomic(job, mine.wrapping_add(i))?.store(pattern(me, i), Ordering::Relaxed);
    }
    // This node is the block's home: it wrote its pages without asking anyone.
    if job.stats().requests != asked {
        return Err(format!(
            "writing a fresh block of this node's arena sent {} requests",
            job.stats().requests - asked
        ));
    }
    for (i, p) in [board as usize, big as usize, again as usize, mine as usize].into_iter().enumerate() {
        slot(me, i)?.store(p as u64, Ordering::SeqCst);
    }
    barrier(job)?;
    for node in 0..size {
        for i in 0..3 {
            let (theirs, ours) = (slot(node, i)?.load(Ordering::SeqCst), slot(me, i)?.load(Ordering::SeqCst));
            if theirs != ours {
                return Err(format!("collective block {i}: node {node} got {theirs:#x}, this node {ours:#x}"));
            }
        }
        let block = slot(node, 3)?.load(Ordering::SeqCst) as *mut u64;
        for i in 0..words {
            let got = atomic(job, block.wrapping_add(i))?.load(Ordering::Relaxed);
            if got != pattern(node, i) {
                return Err(format!("node {node}'s local block, word {i}: {got:#x}, expected {:#x}", pattern(node, i)));
            }
        }
        if node != me && job.free_local(block.cast()).is_ok() {
            return Err(format!("freed node {node}'s local block here"));
        }
    }
    barrier(job)?;
    job.free_local(mine.cast()).map_err(e)?;
    // Nodes asking different sizes get an error, and the heap stays as it was: whether the
    // coordinator (node 0) arrives last, or first (then the last to arrive is released in the
    // answer to its arrival, the others by the coordinator's calls).
    for coordinator_first in [false, true] {
        if (me == 0) != coordinator_first {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        match job.alloc(if me == 0 { 100 } else { 200 }) {
            Err(mosaic_dsm::JoinError::Diverged { .. }) if size > 1 => {}
            Ok(_) if size == 1 => {}
            other => {
                return Err(format!("allocations of different sizes (node 0 first: {coordinator_first}): {other:?}"))
            }
        }
    }
    let after = job.alloc(PAGE as u64).map_err(e)?;
    job.free(after).map_err(e)?;
    job.free(big).map_err(e)?;
    Ok(format!("same addresses on {size} nodes, reuse, {size} local blocks read everywhere"))
}

fn pattern(node: usize, i: usize) -> u64 {
    ((node as u64 + 1) << 48) ^ (i as u64).wrapping_mul(0x9e37_79b9)
}

/// The word at `p` (anywhere in the region) as an atomic.
fn atomic(job: &Job, p: *mut u64) -> Result<&AtomicU64, String> {
    let a = p as usize;
    if !job.contains(a) || !job.contains(a + 7) || a % 8 != 0 {
        return Err(format!("{p:p} is not an aligned word of the region"));
    }
    // SAFETY: an aligned word inside the mapped region (checked above), which lives as long as
    // `job`; every node accesses these words only atomically.
    Ok(unsafe { &*p.cast::<AtomicU64>() })
}

fn atomics(job: &Job, rounds: u64) -> Result<String, String> {
    let e = |e: mosaic_dsm::JoinError| chain(&e);
    let words = job.alloc(2 * PAGE as u64).map_err(e)?.cast::<u64>();
    // On two pages: of different homes.
    let (added, swapped) = (words, words.wrapping_add(PAGE / 8));
    let mut retries = 0u64;
    for _ in 0..rounds {
        job.fetch_add(added, 1).map_err(e)?;
        let mut seen = job.load(swapped).map_err(e)?;
        loop {
            match job.compare_exchange(swapped, seen, seen + 1).map_err(e)? {
                Ok(_) => break,
                Err(now) => {
                    retries += 1;
                    seen = now;
                }
            }
        }
    }
    for bad in [
        words.cast::<u8>().wrapping_add(4).cast::<u64>(),
        std::ptr::null_mut(),
        (job.as_ptr() as usize - 8) as *mut u64,
    ] {
        if !matches!(job.fetch_add(bad, 1), Err(mosaic_dsm::JoinError::Address { .. })) {
            return Err(format!("fetch_add at {bad:p} was not refused"));
        }
    }
    barrier(job)?;
    let want = rounds * u64::from(job.size());
    let (a, b) = (job.load(added).map_err(e)?, job.load(swapped).map_err(e)?);
    if (a, b) != (want, want) {
        return Err(format!("fetch_add gave {a}, compare_exchange {b}, expected {want}"));
    }
    Ok(format!("both counters {want}, {retries} compare-exchange retries"))
}
