//! DSM: read misses, write upgrades and barriers of a job of N processes on this host, and,
//! from the same run, the bare transport's 4 KiB page read and the pager's install that a read
//! miss is made of.
//!
//! The parent starts N copies of this binary (`mosaic-bench dsm-node`) as the nodes of a job;
//! node 0 times, the others set pages up and serve. Page `p`'s home is node `p % N`; every
//! sample uses a page of its own, so no sample finds a copy an earlier one left:
//! - `read_miss`: node 0 reads a page its home (node 1) owns: request to the home, the page back.
//! - `read_miss_3hop` (N >= 3): node 0 reads a page node 2 owns (written there first): request to
//!   the home, recall to the owner, the page from the owner.
//! - `write_upgrade`: node 0 writes a page it holds read-only, with `sharers` other nodes holding
//!   copies (the home, and with 3, nodes 2 and 3 too): request, invalidations, acknowledgements.
//! - `lock`: acquire + release of a lock homed at node 1, nobody else asking.
//! - `lock_handoff`: nodes 0 and 1 both taking one lock over and over; node 0's acquire time.
//! - `barrier`: one barrier of all N nodes.
//!
//! The nodes poll as `MOSAIC_DSM_WAIT` says (`spin` or `yield`; by default `yield` where the job
//! outnumbers half the CPUs): each row says which (`wait`).
//!
//! Beside them, from the same run, the MPI peer (`benches/mpi/dsm_mpi.c`, built with `mpicc` and
//! started with `mpirun` when both are installed): `MPI_Get` of 4 KiB, `MPI_Win_lock`, the lock
//! handed between two ranks, `MPI_Barrier`, each twice: as `mpirun` runs it by default (one-sided
//! operations through shared memory on one host, `mpi_path` "default") and with messages over
//! TCP (`--mca osc pt2pt --mca btl tcp,self`, `mpi_path` "pt2pt-tcp", the path across hosts).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use mosaic_dsm::{Job, JobConfig};
use serde_json::json;

use crate::stats::round3;

use crate::stats::Samples;

/// What to measure.
pub struct Plan {
    /// Job sizes.
    pub nodes: Vec<u16>,
    /// Transports between the nodes: `tcp`, `shm`.
    pub transports: Vec<String>,
    /// Samples per figure.
    pub samples: usize,
    /// Seconds of the baseline figures.
    pub time: Duration,
    /// One JSON object per line instead of a table.
    pub json: bool,
}

const PAGE: usize = 4096;

/// Runs the plan: the baselines, then one job per size.
pub fn run(plan: &Plan) -> Result<(), String> {
    for t in &plan.transports {
        if t != "tcp" && t != "shm" {
            return Err(format!("--transports {t}: DSM runs over tcp or shm"));
        }
    }
    crate::netram::baselines(&plan.transports, plan.time, plan.json)?;
    for (&n, t) in plan.nodes.iter().flat_map(|n| plan.transports.iter().map(move |t| (n, t))) {
        if n < 2 {
            return Err(format!("--nodes {n}: a DSM figure needs at least 2 nodes"));
        }
        eprintln!("[dsm] {n} nodes over {t}, {} samples per figure", plan.samples);
        let mut lines = job(n, t, plan.samples)?;
        if t == plan.transports.last().map_or("", String::as_str) {
            lines.extend(mpi_rows(n, plan.samples)?);
        }
        for line in lines {
            if plan.json {
                println!("{line}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
                let sharers = v
                    .get("sharers")
                    .and_then(serde_json::Value::as_u64)
                    .map(|s| format!(" {s} sharers"))
                    .unwrap_or_default();
                let via = match v.get("mpi_path").and_then(serde_json::Value::as_str) {
                    Some(path) => format!("mpi ({path})"),
                    None => format!("{t} ({})", v["wait"].as_str().unwrap_or("")),
                };
                println!(
                    "{via:<17} {:<16}{:<11} {} nodes  min {:.2} / median {:.2} / p99 {:.2} us",
                    v["op"].as_str().unwrap_or(""),
                    sharers,
                    n,
                    v["min_us"].as_f64().unwrap_or(0.0),
                    v["median_us"].as_f64().unwrap_or(0.0),
                    v["p99_us"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    Ok(())
}

/// The MPI program's source, built by [`mpi_rows`].
const DSM_MPI_C: &str = include_str!("../mpi/dsm_mpi.c");

/// The MPI peer's figure lines for `n` ranks (none, with a note, without `mpicc` and `mpirun`).
fn mpi_rows(n: u16, samples: usize) -> Result<Vec<String>, String> {
    let have = |tool: &str| Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !matches!(have("mpicc"), Ok(s) if s.success()) || !matches!(have("mpirun"), Ok(s) if s.success()) {
        eprintln!("[dsm] MPI figures skipped: no mpicc or mpirun (apt-get install libopenmpi-dev openmpi-bin)");
        return Ok(Vec::new());
    }
    let dir = std::env::temp_dir().join(format!("mosaic-bench-dsm-mpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (src, exe) = (dir.join("dsm_mpi.c"), dir.join("dsm_mpi"));
    let built = std::fs::write(&src, DSM_MPI_C).map_err(|e| format!("{}: {e}", src.display())).and_then(|()| {
        let out = Command::new("mpicc").arg("-O2").arg("-o").arg(&exe).arg(&src).output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!("mpicc failed: {}", String::from_utf8_lossy(&o.stderr))),
            Err(e) => Err(format!("mpicc: {e}")),
        }
    });
    let mut rows = Vec::new();
    let ran = built.and_then(|()| {
        for (path, mca) in
            [("default", &[][..]), ("pt2pt-tcp", &["--mca", "osc", "pt2pt", "--mca", "btl", "tcp,self"][..])]
        {
            eprintln!("[dsm] {n} MPI ranks ({path})");
            // Bounded: coreutils' timeout stops a job that hangs.
            let mut child = Command::new("timeout")
                .args(["300", "mpirun", "--allow-run-as-root", "--oversubscribe"])
                .args(mca)
                .args(["-n", &n.to_string()])
                .arg(&exe)
                .arg(samples.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("mpirun: {e}"))?;
            let out = child.stdout.take().ok_or("no output from mpirun")?;
            let lines: Vec<String> = BufReader::new(out).lines().map_while(Result::ok).collect();
            let status = child.wait().map_err(|e| format!("mpirun: {e}"))?;
            if !status.success() {
                return Err(format!("mpirun -n {n} dsm_mpi ({path}): {status}"));
            }
            for line in lines.iter().filter(|l| l.starts_with('{')) {
                let mut v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| format!("dsm_mpi: {e}: {line}"))?;
                v["mpi_path"] = json!(path);
                rows.push(v.to_string());
            }
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    ran.map(|()| rows)
}

/// Starts a job of `n` nodes over `transport`; returns node 0's figure lines.
fn job(n: u16, transport: &str, samples: usize) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let key = mosaic_transport::ClusterKey::random_text().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("mosaic-bench-dsm-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut children = Vec::new();
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(["dsm-node", "--samples", &samples.to_string()])
            .env("MOSAIC_DSM_RANK", rank.to_string())
            .env("MOSAIC_DSM_SIZE", n.to_string())
            .env("MOSAIC_DSM_RENDEZVOUS", &dir)
            .env(mosaic_dsm::job::TRANSPORT_ENV, transport)
            .env(mosaic_transport::KEY_ENV, &key)
            .stdout(if rank == 0 { Stdio::piped() } else { Stdio::null() })
            .spawn()
            .map_err(|e| format!("cannot start node {rank}: {e}"))?;
        children.push(child);
    }
    let out = children[0].stdout.take().ok_or("no output from node 0")?;
    let lines: Vec<String> = BufReader::new(out).lines().map_while(Result::ok).collect();
    let mut failed = Vec::new();
    for (rank, mut c) in children.into_iter().enumerate() {
        match c.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => failed.push(format!("node {rank}: {s}")),
            Err(e) => failed.push(format!("node {rank}: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !failed.is_empty() {
        return Err(format!("the DSM job failed: {}", failed.join("; ")));
    }
    Ok(lines)
}

/// One node of a measuring job (`mosaic-bench dsm-node`).
pub fn node(samples: usize) -> Result<(), String> {
    let n_pages = 4 * samples * 4 + 64;
    let cfg = JobConfig::from_env((n_pages * PAGE) as u64).map_err(|e| e.to_string())?;
    let wait = if cfg.wait.yielding { "yield" } else { "spin" };
    let job = Job::join(cfg).map_err(|e| mosaic_transport::error_chain(&e))?;
    let (me, n) = (usize::from(job.rank()), usize::from(job.size()));
    let transport = std::env::var(mosaic_dsm::job::TRANSPORT_ENV).unwrap_or_else(|_| "tcp".into());
    // The byte at the start of page `p`, touched with single accesses.
    let byte = |p: usize| -> &AtomicU8 {
        assert!((p + 1) * PAGE <= job.len());
        // SAFETY: inside the job's mapped region, which lives as long as `job`; accessed only
        // atomically, byte-sized (always aligned).
        unsafe { &*job.as_ptr().add(p * PAGE).cast::<AtomicU8>() }
    };
    // Page i of phase k, homed at node 1.
    let page = |k: usize, i: usize| (k * samples + i) * n + 1;
    let barrier = || job.barrier().map_err(|e| mosaic_transport::error_chain(&e));
    let emit = |op: &str, sharers: Option<usize>, s: &mut Samples| {
        if let Some(sum) = s.summary() {
            let mut v = json!({"bench": "dsm", "op": op, "nodes": n, "transport": transport, "wait": wait,
                "min_us": round3(sum.min_us), "median_us": round3(sum.median_us), "p99_us": round3(sum.p99_us),
                "samples": sum.count});
            if let Some(sh) = sharers {
                v["sharers"] = json!(sh);
            }
            println!("{v}");
        }
    };
    let time_reads = |k: usize| {
        let mut s = Samples::with_capacity(samples);
        for i in 0..samples {
            let t = Instant::now();
            std::hint::black_box(byte(page(k, i)).load(Ordering::Relaxed));
            s.push(t.elapsed());
        }
        s
    };
    // Phase 0: read misses served by the home, which owns the page.
    barrier()?;
    if me == 0 {
        emit("read_miss", None, &mut time_reads(0));
    }
    // Phase 1: read misses the home forwards to the owner, node 2.
    if n >= 3 {
        if me == 2 {
            for i in 0..samples {
                byte(page(1, i)).store(1, Ordering::Relaxed);
            }
        }
        barrier()?;
        if me == 0 {
            emit("read_miss_3hop", None, &mut time_reads(1));
        }
    }
    // Phases 2 and 3: write upgrades with 1 sharer (the home) and, with 4 nodes, 3.
    for (k, sharers) in [(2usize, 1usize), (3, 3)] {
        if sharers + 1 > n {
            continue;
        }
        barrier()?;
        if (2..=sharers).contains(&me) {
            for i in 0..samples {
                std::hint::black_box(byte(page(k, i)).load(Ordering::Relaxed));
            }
        }
        barrier()?;
        if me == 0 {
            let mut s = Samples::with_capacity(samples);
            for i in 0..samples {
                let b = byte(page(k, i));
                std::hint::black_box(b.load(Ordering::Relaxed));
                let t = Instant::now();
                b.store(2, Ordering::Relaxed);
                s.push(t.elapsed());
            }
            emit("write_upgrade", Some(sharers), &mut s);
        }
    }
    // Locks: acquire + release of a lock homed at node 1, alone; then handed back and forth
    // (nodes 0 and 1 both taking lock 3 over and over: node 0 times its acquires).
    barrier()?;
    if me == 0 {
        let mut s = Samples::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            job.lock(1).map_err(|e| mosaic_transport::error_chain(&e))?;
            job.unlock(1).map_err(|e| mosaic_transport::error_chain(&e))?;
            s.push(t.elapsed());
        }
        emit("lock", None, &mut s);
    }
    barrier()?;
    if me <= 1 {
        let mut s = Samples::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            job.lock(3).map_err(|e| mosaic_transport::error_chain(&e))?;
            s.push(t.elapsed());
            job.unlock(3).map_err(|e| mosaic_transport::error_chain(&e))?;
        }
        if me == 0 {
            emit("lock_handoff", None, &mut s);
        }
    }
    // Barriers.
    barrier()?;
    let mut s = Samples::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        barrier()?;
        s.push(t.elapsed());
    }
    if me == 0 {
        emit("barrier", None, &mut s);
    }
    job.leave().map_err(|e| mosaic_transport::error_chain(&e))
}
