//! `mosaicd` as the DSM rendezvous: jobs meet at one agent at once, each in its own book; a node
//! whose peers never come is told which; a node without the cluster key is refused; `mosrun -n
//! --hosts` meets at the local agent.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin_dir, key, Node};

fn litmus() -> PathBuf {
    bin_dir().join("dsm-litmus")
}

/// Node `rank` of a job of `size` running the litmus test `test`, meeting at `at`.
fn node(rank: u16, size: u16, at: &str, test: &str) -> Command {
    let mut c = Command::new(litmus());
    c.args([test, "50"])
        .env("MOSAIC_DSM_RANK", rank.to_string())
        .env("MOSAIC_DSM_SIZE", size.to_string())
        .env("MOSAIC_DSM_RENDEZVOUS", at)
        .env("MOSAIC_DSM_JOIN_TIMEOUT_MS", "20000")
        .env("MOSAIC_CLUSTER_KEY", key())
        .env_remove("MOSAIC_CLUSTER_KEY_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits at most a minute for `child`, killing it after that.
fn finish(mut child: std::process::Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn jobs_meet_at_an_agent_each_in_its_own_book() {
    let agent = Node::start();
    // Two jobs of two nodes at once, with the same ranks: each finds its own peers.
    let mut nodes = Vec::new();
    for job in ["first", "second"] {
        for rank in 0..2 {
            let at = format!("agent+{}/{job}", agent.uri);
            nodes.push((job, rank, node(rank, 2, &at, "counter").spawn().unwrap()));
        }
    }
    for (job, rank, child) in nodes {
        let out = finish(child);
        assert!(out.status.success(), "{job} node {rank}: {}", text(&out));
        assert!(text(&out).contains(&format!("rank {rank}: counter ok: both counters 100")), "{}", text(&out));
    }
    // Under mpirun (its variables set as Open MPI sets them), the address alone serves: the job
    // is named after the launcher's.
    let ompi: Vec<_> = (0..2u16)
        .map(|rank| {
            let mut c = node(0, 0, &format!("agent+{}", agent.uri), "counter");
            c.env_remove("MOSAIC_DSM_RANK")
                .env_remove("MOSAIC_DSM_SIZE")
                .env("OMPI_COMM_WORLD_RANK", rank.to_string())
                .env("OMPI_COMM_WORLD_SIZE", "2")
                .env("PMIX_NAMESPACE", format!("prterun-test-{}@1", std::process::id()));
            c.spawn().unwrap()
        })
        .collect();
    for (rank, child) in ompi.into_iter().enumerate() {
        let out = finish(child);
        assert!(out.status.success(), "Open MPI node {rank}: {}", text(&out));
        assert!(text(&out).contains(&format!("rank {rank}: counter ok")), "{}", text(&out));
    }
    // A node whose peer never comes is told which, within its join time-out.
    let start = Instant::now();
    let lonely = node(0, 2, &format!("agent+{}/lonely", agent.uri), "counter")
        .env("MOSAIC_DSM_JOIN_TIMEOUT_MS", "8000")
        .spawn()
        .unwrap();
    // Meanwhile `mosctl status` counts its job among those meeting there.
    let mut status = String::new();
    while !status.contains("DSM jobs meeting here now: 1\n") && start.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(100));
        let o = Command::new(env!("CARGO_BIN_EXE_mosctl"))
            .args(["status", &agent.uri])
            .env("MOSAIC_CLUSTER_KEY", key())
            .env_remove("MOSAIC_CLUSTER_KEY_FILE")
            .output()
            .unwrap();
        status = text(&o);
    }
    assert!(status.contains("DSM jobs meeting here now: 1\n"), "{status}");
    let out = finish(lonely);
    assert!(!out.status.success());
    assert!(text(&out).contains("nodes [1] did not join"), "{}", text(&out));
    assert!(text(&out).contains(&format!("agent+{}/lonely", agent.uri)), "{}", text(&out));
    assert!(start.elapsed() < Duration::from_secs(15));
    // Its address went with it: the job started again under that name meets.
    let again: Vec<_> =
        (0..2).map(|rank| node(rank, 2, &format!("agent+{}/lonely", agent.uri), "counter").spawn().unwrap()).collect();
    for (rank, child) in again.into_iter().enumerate() {
        let out = finish(child);
        assert!(out.status.success(), "lonely again, node {rank}: {}", text(&out));
    }
    // Without the cluster key: refused.
    let other = mosaic_transport::ClusterKey::random_text().unwrap();
    let out = node(0, 1, &format!("agent+{}/keyless", agent.uri), "counter")
        .env("MOSAIC_CLUSTER_KEY", other)
        .env("MOSAIC_DSM_JOIN_TIMEOUT_MS", "1000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("rendezvous server agent+"), "{}", text(&out));
    assert!(text(&out).contains("cluster key mismatch"), "{}", text(&out));
    // An address without a job name, under mosrun's variables: refused, saying so.
    let out = node(0, 1, &format!("agent+{}", agent.uri), "counter").output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("gives no job name"), "{}", text(&out));
}

/// `mosrun -n 3 --hosts` (two "hosts" on loopback, started through `env`) meets at the local
/// agent, by default and when asked; asked with no agent running, it refuses and says why.
#[test]
fn mosrun_hosts_meets_at_the_local_agent() {
    let agent = Node::start();
    let mosrun = |extra: &[&str], agent_uri: &str| {
        Command::new(bin_dir().join("mosrun"))
            .args(["-n", "3", "--hosts", "a=127.0.0.2,b=127.0.0.3", "--launcher", "env", "--verbose"])
            .args(extra)
            .arg(litmus())
            .args(["counter", "50"])
            .env("MOSAIC_AGENT", agent_uri)
            .env("MOSAIC_CLUSTER_KEY", key())
            .env_remove("MOSAIC_CLUSTER_KEY_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for extra in [&[][..], &["--rendezvous", "agent"]] {
        let out = finish(mosrun(extra, &agent.uri));
        assert!(out.status.success(), "{extra:?}: {}", text(&out));
        assert!(text(&out).contains(&format!("meeting at agent+{}/mosrun-", agent.uri)), "{}", text(&out));
        for rank in 0..3 {
            assert!(text(&out).contains(&format!("rank {rank}: counter ok: both counters 150")), "{}", text(&out));
        }
    }
    // On this host, the agent when asked for (a directory by default).
    let out = Command::new(bin_dir().join("mosrun"))
        .args(["-n", "2", "--verbose", "--rendezvous", "agent"])
        .arg(litmus())
        .args(["counter", "50"])
        .env("MOSAIC_AGENT", &agent.uri)
        .env("MOSAIC_CLUSTER_KEY", key())
        .env_remove("MOSAIC_CLUSTER_KEY_FILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("meeting at agent+{}/mosrun-", agent.uri)), "{}", text(&out));
    // mosrun's own server when asked for it.
    let out = finish(mosrun(&["--rendezvous", "mosrun"], &agent.uri));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("meeting at tcp://127.0.0.1:"), "{}", text(&out));
    // No agent there: the default falls back to mosrun's own, `agent` refuses.
    let out = finish(mosrun(&[], "tcp://127.0.0.1:1"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not meeting at the node agent") && text(&out).contains("meeting at tcp://"),
        "{}",
        text(&out)
    );
    let out = finish(mosrun(&["--rendezvous", "agent"], "tcp://127.0.0.1:1"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--rendezvous agent: cannot meet at the node agent"), "{}", text(&out));
}
