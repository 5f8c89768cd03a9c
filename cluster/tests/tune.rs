//! `mosctl tune` between two agents on loopback: it measures the link, a remote fault and (as
//! root) a probe process moved there, and writes a file `mosaicd --tune` takes; a broken file
//! stops mosaicd with a clear message.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{root, tmp, Node};
use mosaic_cluster::tune::Tuning;

fn mosctl() -> Command {
    let mut c = Command::new(common::bin_dir().join("mosctl"));
    c.env("MOSAIC_CLUSTER_KEY", common::key());
    c
}

#[test]
fn tune_measures_the_costs_and_mosaicd_balances_with_them() {
    let a = Node::start_with(&["--memory", "64M"]);
    let b = Node::start_with(&["--memory", "64M", "--join", &a.uri]);
    let dir = tmp("tune");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tune.toml");
    let mut cmd = mosctl();
    cmd.args(["tune", "--node", &a.uri, "--to", &b.uri, "--out"]).arg(&file).env("MOSAIC_RUN_DIR", &dir);
    if !root() {
        cmd.arg("--no-probe"); // moving a process needs root
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "mosctl tune: {}", String::from_utf8_lossy(&out.stderr));
    let t = Tuning::read(&file).unwrap();
    assert_eq!((t.from.as_str(), t.to.as_str()), (a.uri.as_str(), b.uri.as_str()));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(t.round_trip_us > 0.0 && t.bandwidth_mib_s > 0.0 && t.remote_fault_us > 0.0, "{t:?}\n{said}");
    assert_eq!(t.probe_freeze_ms > 0.0, root(), "a probe was moved exactly when it could be: {t:?}");
    assert!(t.migration_cost_ms >= t.probe_freeze_ms, "{t:?}");
    eprintln!("{}", t.to_toml());
    // The probe ended once measured: no job of it is left.
    let left =
        std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("job-"));
    assert_eq!(left.count(), 0, "the probe's job is gone");
    // mosaicd takes the figures...
    let node = Node::start_with(&["--join", &a.uri, "--balance", "--tune", file.to_str().unwrap()]);
    drop(node);
    // ...and refuses a file that is not one, saying which and why.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "migration_cost_ms = \"soon\"\n").unwrap();
    let mut refused = Command::new(env!("CARGO_BIN_EXE_mosaicd"))
        .args(["--listen", "tcp://127.0.0.1:0", "--balance", "--tune"])
        .arg(&bad)
        .env("MOSAIC_CLUSTER_KEY", common::key())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = refused.kill();
            let _ = refused.wait();
            panic!("mosaicd took the broken tune file and ran");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = refused.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.toml"), "{err}");
}
