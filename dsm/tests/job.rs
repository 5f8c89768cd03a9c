//! DSM jobs of several processes on loopback: the litmus tests of `dsm-litmus`, a job of one,
//! and a node that never comes.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "dsm-tests-cluster-key-0123456789";

fn rendezvous(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mosaic-dsm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn node(rank: u16, size: u16, dir: &PathBuf, args: &[&str], join_ms: Option<u64>) -> Child {
    node_with(rank, size, dir, args, join_ms, &[])
}

fn node_with(rank: u16, size: u16, dir: &PathBuf, args: &[&str], join_ms: Option<u64>, env: &[(&str, &str)]) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dsm-litmus"));
    c.args(args)
        .env("MOSAIC_DSM_RANK", rank.to_string())
        .env("MOSAIC_DSM_SIZE", size.to_string())
        .env("MOSAIC_DSM_RENDEZVOUS", dir)
        .env("MOSAIC_CLUSTER_KEY", KEY)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ms) = join_ms {
        c.env("MOSAIC_DSM_JOIN_TIMEOUT_MS", ms.to_string());
    }
    c.spawn().expect("start dsm-litmus")
}

/// Waits for `child`, killing it after `limit`.
fn finish(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

/// Waits for every node (a minute at most) and asserts that each succeeded.
fn all_ok(children: Vec<Child>) {
    for (rank, c) in children.into_iter().enumerate() {
        let o = finish(c, Duration::from_secs(60));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains(" ok: "),
            "node {rank}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Runs `args` on `size` nodes; returns each node's stdout, asserting that all succeeded.
fn job(name: &str, size: u16, args: &[&str]) -> Vec<String> {
    job_with(name, size, args, &[])
}

/// [`job`], with more environment for every node.
fn job_with(name: &str, size: u16, args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let dir = rendezvous(name);
    let children: Vec<Child> = (0..size).map(|r| node_with(r, size, &dir, args, None, env)).collect();
    let outs: Vec<Output> = children.into_iter().map(|c| finish(c, Duration::from_secs(120))).collect();
    let _ = std::fs::remove_dir_all(&dir);
    let mut lines = Vec::new();
    for (rank, o) in outs.iter().enumerate() {
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success() && out.contains(" ok: "),
            "node {rank} of {size} ({args:?}): {}\n{out}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        lines.push(out);
    }
    lines
}

#[test]
fn atomic_counters_lose_no_update_across_nodes() {
    for size in [2, 3] {
        let outs = job("counter", size, &["counter", "300"]);
        let want = format!("both counters {}", 300 * u64::from(size));
        assert!(outs.iter().all(|o| o.contains(&want)), "{outs:?}");
    }
}

#[test]
fn message_passing_sees_the_datum_behind_the_flag() {
    for size in [2, 3, 4] {
        job("mp", size, &["mp", "150"]);
    }
}

#[test]
fn store_buffering_never_reads_both_old_values() {
    for size in [2, 3] {
        job("sb", size, &["sb", "150"]);
    }
}

#[test]
fn a_lock_keeps_plain_increments_apart() {
    for size in [2, 3] {
        let outs = job("lock", size, &["lock", "200"]);
        let want = format!("locked counter {}", 200 * u64::from(size));
        assert!(outs.iter().all(|o| o.contains(&want)), "{outs:?}");
    }
}

#[test]
fn collective_and_local_allocations_agree_across_nodes() {
    for size in [1, 2, 3] {
        job("alloc", size, &["alloc"]);
    }
}

#[test]
fn global_atomics_lose_no_update_across_nodes() {
    for size in [2, 3] {
        let outs = job("atomics", size, &["atomics", "300"]);
        let want = format!("both counters {}", 300 * u64::from(size));
        assert!(outs.iter().all(|o| o.contains(&want)), "{outs:?}");
    }
}

#[test]
fn independent_reads_of_independent_writes_agree_on_their_order() {
    job("iriw", 4, &["iriw", "100"]);
}

/// The litmus tests again with every link between nodes delaying frames at random (as if lost
/// and sent again 400 us later, three in ten), several seeds each.
#[test]
fn the_litmus_tests_hold_with_random_delays_on_every_link() {
    for seed in 1..=3 {
        let link = format!("lat=20us,loss=0.3,rto=400us,seed={seed}");
        for (size, args) in [
            (3, &["mp", "40"][..]),
            (2, &["sb", "40"]),
            (3, &["lock", "40"]),
            (3, &["counter", "100"]),
            (4, &["iriw", "30"]),
        ] {
            job_with("delays", size, args, &[("MOSAIC_DSM_SIM_LINK", &link)]);
        }
    }
}

#[test]
fn a_lock_given_up_on_is_handed_back_when_it_is_granted() {
    let dir = rendezvous("abandon");
    let children: Vec<Child> = (0..2u16)
        .map(|r| {
            let timeout = if r == 1 { "500" } else { "60000" };
            node_with(r, 2, &dir, &["abandon"], None, &[("MOSAIC_DSM_FAULT_TIMEOUT_MS", timeout)])
        })
        .collect();
    all_ok(children);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_node_reads_every_other_nodes_pages() {
    for size in [2, 4] {
        job("fill", size, &["fill"]);
    }
}

/// Pages placed by first touch: each node's pages are homed where it wrote them first (`fill`
/// checks), and the litmus tests hold.
#[test]
fn pages_placed_by_first_touch_are_homed_where_first_written() {
    let first_touch = [("MOSAIC_DSM_PLACEMENT", "first-touch")];
    for size in [1, 3] {
        let outs = job_with("first-touch", size, &["fill"], &first_touch);
        assert!(outs.iter().all(|o| o.contains("placed by first touch")), "{outs:?}");
    }
    job_with("first-touch", 3, &["mp", "50"], &first_touch);
    job_with("first-touch", 2, &["sb", "50"], &first_touch);
    let outs = job_with("first-touch", 3, &["counter", "100"], &first_touch);
    assert!(outs.iter().all(|o| o.contains("both counters 300")), "{outs:?}");
}

/// The figure `name` of a node's printed stats (`name: N`).
fn stat(out: &str, name: &str) -> u64 {
    let at = out.find(&format!("{name}: ")).unwrap_or_else(|| panic!("no {name} in {out}")) + name.len() + 2;
    out[at..].split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()).expect("a number")
}

/// Each node keeps at most 64 pages mapped (a quarter of the region) and the pages it owns beyond
/// that go to two memory servers (two copies each): every node's pages come back right, to it
/// and to the others, and the litmus tests hold.
#[test]
fn pages_beyond_the_budget_go_to_memory_servers_and_come_back() {
    let key = mosaic_transport::ClusterKey::from_bytes(KEY.as_bytes()).unwrap();
    let cfg = || mosaic_netram::MemServerConfig::new(64 << 20, key.clone());
    let a = mosaic_netram::MemServer::start("tcp://127.0.0.1:0", cfg()).unwrap();
    let b = mosaic_netram::MemServer::start("tcp://127.0.0.1:0", cfg()).unwrap();
    let servers = format!("{},{}", a.uri(), b.uri());
    let env = [("MOSAIC_DSM_SERVERS", servers.as_str()), ("MOSAIC_DSM_BUDGET", "256K")];
    for size in [1, 2, 3] {
        let outs = job_with("spill", size, &["fill"], &env);
        for (rank, o) in outs.iter().enumerate() {
            assert!(stat(o, "pages_stored") > 0 && stat(o, "resident_pages") <= 64 + 32, "node {rank}: {o}");
        }
    }
    for (size, args) in [(3, &["mp", "50"][..]), (2, &["sb", "50"]), (3, &["counter", "100"]), (3, &["lock", "50"])] {
        job_with("spill", size, args, &env);
    }
    // First touch and spilling together.
    let first_touch = [env[0], env[1], ("MOSAIC_DSM_PLACEMENT", "first-touch")];
    job_with("spill", 3, &["fill"], &first_touch);
}

#[test]
fn a_budget_without_servers_or_too_small_is_refused() {
    for (env, want) in [
        (&[("MOSAIC_DSM_BUDGET", "1M")][..], "no memory servers"),
        (&[("MOSAIC_DSM_SERVERS", "tcp://127.0.0.1:1")], "no budget"),
        (&[("MOSAIC_DSM_SERVERS", "tcp://127.0.0.1:1"), ("MOSAIC_DSM_BUDGET", "4K")], "at least 64 pages"),
        (
            &[("MOSAIC_DSM_SERVERS", "tcp://127.0.0.1:1"), ("MOSAIC_DSM_BUDGET", "1M")],
            "memory servers behind the region",
        ),
        (&[("MOSAIC_DSM_BUDGET", "lots")], "MOSAIC_DSM_BUDGET: not a size"),
    ] {
        let o = finish(node_with(0, 1, &rendezvous("budget"), &["fill"], None, env), Duration::from_secs(30));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(2) && err.contains(want), "{env:?}: {err}");
    }
}

#[test]
fn a_job_of_one_node_works() {
    for test in ["counter", "mp", "sb", "fill"] {
        job("one", 1, &[test, "50"]);
    }
}

#[test]
fn a_node_that_never_comes_is_named_within_the_join_timeout() {
    let dir = rendezvous("missing");
    let start = Instant::now();
    // Nodes 0 and 1 of 3; node 2 never starts.
    let children: Vec<Child> = (0..2).map(|r| node(r, 3, &dir, &["counter", "10"], Some(1500))).collect();
    for (rank, c) in children.into_iter().enumerate() {
        let o = finish(c, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "node {rank}: {err}");
        assert!(err.contains("nodes [2] did not join within"), "node {rank}: {err}");
    }
    assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Nodes that meet at a rendezvous server and listen on addresses of their own (127.0.0.2 to
/// 127.0.0.4, as if each were a host), the way `mosrun --hosts` starts them.
#[test]
fn nodes_meet_at_a_rendezvous_server_and_listen_where_told() {
    let key = mosaic_transport::ClusterKey::from_bytes(KEY.as_bytes()).unwrap();
    let server = mosaic_dsm::RendezvousServer::start("tcp://127.0.0.1:0", key, 3).unwrap();
    let at = PathBuf::from(server.uri());
    let children: Vec<Child> = (0..3u16)
        .map(|r| {
            let listen = format!("tcp://127.0.0.{}:0", r + 2);
            node_with(r, 3, &at, &["mp", "50"], None, &[("MOSAIC_DSM_LISTEN", &listen)])
        })
        .collect();
    all_ok(children);
    // One node short: the others name it within their join time-out.
    let server = mosaic_dsm::RendezvousServer::start(
        "tcp://127.0.0.1:0",
        mosaic_transport::ClusterKey::from_bytes(KEY.as_bytes()).unwrap(),
        2,
    )
    .unwrap();
    let o = finish(node(0, 2, &PathBuf::from(server.uri()), &["mp", "5"], Some(500)), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nodes [1] did not join within") && err.contains(server.uri()), "{err}");
    // A listening address the others could not reach by is refused before anything waits.
    let o = finish(
        node_with(0, 1, &rendezvous("wildcard"), &["mp", "5"], None, &[("MOSAIC_DSM_LISTEN", "tcp://0.0.0.0:0")]),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("give a definite one"), "{err}");
}

#[test]
fn a_job_without_its_settings_says_what_is_missing() {
    let o = Command::new(env!("CARGO_BIN_EXE_dsm-litmus"))
        .arg("counter")
        .env_remove("MOSAIC_DSM_RANK")
        .env("MOSAIC_CLUSTER_KEY", KEY)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("MOSAIC_DSM_RANK: not set"));
}

#[test]
fn nodes_that_map_the_region_differently_refuse_to_start() {
    for differ in [("MOSAIC_DSM_ARENA_BYTES", "8192"), ("MOSAIC_DSM_PLACEMENT", "first-touch")] {
        let dir = rendezvous("layout");
        let a = node(0, 2, &dir, &["counter"], Some(20_000));
        let b = node_with(1, 2, &dir, &["counter"], Some(20_000), &[differ]);
        for (rank, o) in
            [finish(a, Duration::from_secs(60)), finish(b, Duration::from_secs(60))].into_iter().enumerate()
        {
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            assert_eq!(o.status.code(), Some(2), "node {rank} ({differ:?}): {err}");
            assert!(err.contains("map the shared region otherwise"), "node {rank}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn fault_workers_serve_a_job_as_well_as_faulting_threads() {
    let workers = [("MOSAIC_DSM_FAULTS", "workers")];
    job_with("mp-workers", 3, &["mp", "100"], &workers);
    let outs = job_with("atomics-workers", 3, &["atomics", "100"], &workers);
    assert!(outs.iter().all(|o| o.contains("both counters 300")), "{outs:?}");
}

#[test]
fn a_job_over_shared_memory_rings_is_coherent_too() {
    let shm = [("MOSAIC_DSM_TRANSPORT", "shm")];
    job_with("mp-shm", 3, &["mp", "100"], &shm);
    let outs = job_with("counter-shm", 2, &["counter", "200"], &shm);
    assert!(outs.iter().all(|o| o.contains("both counters 400")), "{outs:?}");
    // A transport DSM does not run over is named.
    let dir = rendezvous("bad-transport");
    let o =
        finish(node_with(0, 1, &dir, &["counter"], None, &[("MOSAIC_DSM_TRANSPORT", "udp")]), Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("MOSAIC_DSM_TRANSPORT: not tcp or shm"));
}

#[test]
fn a_job_started_the_way_open_mpi_and_slurm_start_it_meets_by_its_job_name() {
    for (rank_var, size_var, job_vars) in [
        (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            vec![("PMIX_NAMESPACE", format!("mosaic-test-{}", std::process::id()))],
        ),
        (
            "SLURM_PROCID",
            "SLURM_NTASKS",
            vec![("SLURM_JOB_ID", format!("{}", std::process::id())), ("SLURM_STEP_ID", "3".to_string())],
        ),
    ] {
        let children: Vec<Child> = (0..2u16)
            .map(|r| {
                let mut c = Command::new(env!("CARGO_BIN_EXE_dsm-litmus"));
                c.args(["counter", "100"])
                    .env_remove("MOSAIC_DSM_RANK")
                    .env_remove("MOSAIC_DSM_SIZE")
                    .env_remove("MOSAIC_DSM_RENDEZVOUS")
                    .env(rank_var, r.to_string())
                    .env(size_var, "2")
                    .env("MOSAIC_CLUSTER_KEY", KEY)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                for (k, v) in &job_vars {
                    c.env(k, v);
                }
                c.spawn().expect("start dsm-litmus")
            })
            .collect();
        for (rank, c) in children.into_iter().enumerate() {
            let o = finish(c, Duration::from_secs(60));
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && out.contains("both counters 200"),
                "{rank_var} node {rank}: {out}{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // The directory named after the job is gone with the job.
        let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(&format!("{}", std::process::id())))
            .filter(|e| {
                e.file_name().to_string_lossy().starts_with("mosaic-dsm-ompi")
                    || e.file_name().to_string_lossy().starts_with("mosaic-dsm-slurm")
            })
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
