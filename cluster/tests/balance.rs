//! Load balancing between two hosts, each in a network namespace of its own with its own
//! address, and its agent and jobs pinned to a CPU of its own (this machine has two): two
//! CPU-bound jobs started at the first. Without balancing they share its CPU to the end; with it,
//! one moves to the idle host and both finish sooner. Both times are printed; jobs locked to
//! their node (`mosctl lock`) stay. Needs root (process migration, namespaces) and iproute2; its
//! own test binary, so that no other test competes for the CPUs it times.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{c_program, root, tmp, Hosts, Job, Node};

/// Rounds of the hash: about 5 s of one CPU here (a move's delay, the residence and the time
/// for fresh load, is then a small part of it).
const WORK: &str = "3000000000";

/// `mosctl`, run at the first host (where the jobs' homes are).
fn mosctl(hosts: &Hosts) -> Command {
    let mut c = hosts.enter(0, env!("CARGO_BIN_EXE_mosctl"));
    c.env("MOSAIC_CLUSTER_KEY", common::key());
    c
}

/// Runs two jobs at host A (CPU 0) beside host B (CPU 1), both locked to A with `mosctl lock`
/// if `lock`; returns the time until both ended, whether a job moved, and the outputs.
fn run(balance: bool, lock: bool) -> (Duration, bool, Vec<Vec<u8>>) {
    let hosts = Hosts::new(2);
    let prog = c_program("spin", "tests/c/spin.c");
    let dir = tmp(match (balance, lock) {
        (false, _) => "balance-off",
        (true, false) => "balance-on",
        (true, true) => "balance-locked",
    });
    std::fs::create_dir_all(&dir).unwrap();
    let flags: &[&str] = if balance { &["--balance", "--min-residence", "1.5"] } else { &[] };
    let a = Node::launch_at(&hosts, 0, Some(0), flags, Some(&dir));
    let mut b_flags = vec!["--join", a.uri.as_str()];
    b_flags.extend(flags);
    let b = Node::launch_at(&hosts, 1, Some(1), &b_flags, Some(&dir));
    // Both agents know each other before the jobs start.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mosctl(&hosts)
        .args(["nodes", "--json", "--node", &a.uri])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("\"node\":\"{}\"", b.uri)))
    {
        assert!(Instant::now() < deadline, "the agents never heard each other");
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    // One run directory for the jobs and the agents: agent A finds the jobs there.
    let mut jobs: Vec<Job> =
        (0..2).map(|_| Job::launch_at(&hosts, 0, &a, &dir, &[prog.to_str().unwrap(), WORK], Some(0))).collect();
    if lock {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut locked = 0;
        while locked < 2 {
            assert!(Instant::now() < deadline, "the jobs' homes did not take the lock");
            let pids: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("job-").map(String::from))
                .collect();
            locked = pids
                .iter()
                .filter(|p| {
                    mosctl(&hosts).args(["lock", p]).env("MOSAIC_RUN_DIR", &dir).status().is_ok_and(|s| s.success())
                })
                .count();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut moved = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while jobs.iter_mut().any(|j| j.child.try_wait().ok().flatten().is_none()) {
        assert!(Instant::now() < deadline, "the jobs did not end");
        let ps = mosctl(&hosts).arg("ps").env("MOSAIC_RUN_DIR", &dir).output().unwrap();
        moved |= String::from_utf8_lossy(&ps.stdout).contains(&b.uri);
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    let outs = jobs
        .into_iter()
        .map(|j| {
            let (st, out) = j.finish();
            assert!(st.success(), "{st:?}");
            out
        })
        .collect();
    (took, moved, outs)
}

#[test]
fn a_cpu_bound_job_moves_from_a_busy_node_to_an_idle_one_and_finishes_sooner_unless_locked() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if !root()
        || Command::new("taskset").arg("-V").output().is_err()
        || Command::new("ip").arg("-V").output().is_err()
        || cpus < 2
    {
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: it needs root, taskset, iproute2, two CPUs");
        eprintln!("skipped: needs root, taskset, iproute2 and two CPUs");
        return;
    }
    let expected = Command::new(c_program("spin", "tests/c/spin.c")).arg(WORK).output().unwrap().stdout;
    // mosrun and the shim are built before anything is timed.
    common::bin_dir();
    let (off, moved_off, outs_off) = run(false, false);
    assert!(!moved_off, "a job moved without balancing");
    let (on, moved, outs_on) = run(true, false);
    // Locked to their node, neither moves.
    let (_, moved_locked, outs_locked) = run(true, true);
    assert!(!moved_locked, "a job locked to its node moved");
    eprintln!("two CPU-bound jobs at one host: both done after {off:?} without balancing, {on:?} with it");
    for out in outs_off.iter().chain(&outs_on).chain(&outs_locked) {
        assert_eq!(*out, expected, "a job's output differs from an unmigrated run's");
    }
    assert!(moved, "no job moved to the idle node");
    assert!(on < off, "balancing did not finish sooner: {on:?} against {off:?}");
}
