//! `mosrun` without `--servers` finds network RAM through the local node agent.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn mosrun_without_servers_uses_the_memory_servers_the_local_agent_knows() {
    let key = common::key();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_mosaicd"))
        .args(["--listen", "tcp://127.0.0.1:0", "--memory", "64M"])
        .env("MOSAIC_CLUSTER_KEY", &key)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(agent.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "mosaicd: listening at URI (memory server at MEM)"
    let words: Vec<&str> = line.split_whitespace().collect();
    let (uri, memory) = (words[3].to_string(), words[7].trim_end_matches(')').to_string());
    // Its own vector (with its memory server) is measured within a second.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = Command::new(common::bin_dir().join("mosrun"))
        .args(["--verbose", "--", "sh", "-c", "echo ran"])
        .env("MOSAIC_CLUSTER_KEY", &key)
        .env("MOSAIC_AGENT", &uri)
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout) == "ran\n", "{err}");
    assert!(err.contains(&format!("memory servers from the local agent: {memory}")), "{line}\n{err}");
}
