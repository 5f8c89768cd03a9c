//! `mosrun --migratable --place`: a job started at a node busier than another moves to the
//! lighter one as it starts; at a node as light as any, it stays. Two agents on loopback pinned
//! to a CPU each (standing for two hosts). Needs root (process migration).

mod common;

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{c_program, root, tmp, Node};

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cluster as agent `a` knows it (`mosctl nodes --json`).
fn view(a: &Node) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mosctl"))
        .args(["nodes", "--json", "--node", &a.uri])
        .env("MOSAIC_CLUSTER_KEY", common::key())
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mosrun --migratable --place --verbose` of the spin program at `a`.
fn placed_run(a: &Node, dir: &std::path::Path, spin: &std::path::Path, rounds: &str) -> Output {
    Command::new(common::bin_dir().join("mosrun"))
        .args(["--migratable", "--place", "--verbose", "--node", &a.uri, "--"])
        .arg(spin)
        .arg(rounds)
        .env("MOSAIC_CLUSTER_KEY", common::key())
        .env("MOSAIC_RUN_DIR", dir)
        .output()
        .unwrap()
}

#[test]
fn a_new_job_starts_on_the_least_loaded_node() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if !root() || Command::new("taskset").arg("-V").output().is_err() || cpus < 2 {
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: it needs root, taskset and two CPUs");
        eprintln!("skipped: needs root, taskset and two CPUs");
        return;
    }
    let spin = c_program("spin", "tests/c/spin.c");
    let dir = tmp("place");
    let a = Node::launch(Some(0), &[], Some(&dir));
    let b = Node::launch(Some(1), &["--join", &a.uri], Some(&dir));
    wait("A knows B's load", Duration::from_secs(20), || {
        view(&a)["load"].as_array().is_some_and(|l| l.iter().any(|v| v["node"] == b.uri.as_str()))
    });
    let expected = Command::new(&spin).arg("100000").output().unwrap().stdout;
    // Both idle: the job stays at A.
    let out = placed_run(&a, &dir, &spin, "100000");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && out.stdout == expected, "{said}");
    assert!(said.contains("stays at"), "{said}");
    // A busy with a program on its CPU: the job goes to B as it starts.
    let busy = Killed(Command::new("taskset").args(["-c", "0"]).arg(&spin).arg("100000000000").spawn().unwrap());
    wait("A's load shows its busy CPU, B's does not", Duration::from_secs(20), || {
        let v = view(&a);
        let b_load =
            v["load"].as_array().and_then(|l| l.iter().find(|x| x["node"] == b.uri.as_str())?["load"].as_f64());
        v["self"]["load"].as_f64().is_some_and(|l| l >= 0.9) && b_load.is_some_and(|l| l < 0.5)
    });
    let expected = Command::new(&spin).arg("300000000").output().unwrap().stdout;
    let out = placed_run(&a, &dir, &spin, "300000000");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && out.stdout == expected, "{said}");
    assert!(said.contains(&format!("placed at {}", b.uri)), "{said}");
    drop(busy);
}
