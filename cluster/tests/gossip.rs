//! The information layer between hosts: four `mosaicd` in network namespaces joined by a bridge
//! (each its own host with its own address) join through one member, learn each other and
//! their load (and `mosmon`, driven in tmux, shows every node's figures), refuse a fifth holding
//! another cluster key, and find a host whose link went down. Needs root, iproute2 and tmux (CI
//! runs it as root).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "gossip-tests-cluster-key-0123456789";

/// Network namespaces joined by a bridge in a hub namespace; removed when dropped.
struct Hosts {
    hub: String,
    names: Vec<String>,
}

impl Hosts {
    /// `n` host namespaces at 10.232.0.2.. on a bridge in a hub namespace.
    fn new(n: usize) -> Hosts {
        // The pid and the clock: namespaces a killed earlier run left behind do not collide.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tag = (std::process::id() ^ nanos) % 1_000_000;
        let hosts = Hosts { hub: format!("mg{tag}"), names: (0..n).map(|i| format!("mg{tag}h{i}")).collect() };
        let ip = |args: &str| {
            let out = Command::new("ip").args(args.split_whitespace()).output().expect("run ip");
            assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
        };
        for name in std::iter::once(&hosts.hub).chain(&hosts.names) {
            ip(&format!("netns add {name}"));
            ip(&format!("-n {name} link set lo up"));
        }
        let hub = &hosts.hub;
        ip(&format!("-n {hub} link add br0 type bridge"));
        ip(&format!("-n {hub} link set br0 up"));
        for (i, host) in hosts.names.iter().enumerate() {
            ip(&format!("-n {host} link add eth0 type veth peer name p{i} netns {hub}"));
            ip(&format!("-n {hub} link set p{i} master br0 up"));
            ip(&format!("-n {host} addr add {}/24 dev eth0", Hosts::addr(i)));
            ip(&format!("-n {host} link set eth0 up"));
        }
        hosts
    }

    fn addr(i: usize) -> String {
        format!("10.232.0.{}", i + 2)
    }

    fn agent(i: usize) -> String {
        format!("tcp://{}:7070", Hosts::addr(i))
    }

    /// Takes host `i`'s link down (the host is lost to the others; its processes live on).
    fn cut(&self, i: usize) {
        let out = Command::new("ip").args(["-n", &self.hub, "link", "set", &format!("p{i}"), "down"]).output().unwrap();
        assert!(out.status.success());
    }

    /// A command run in host `i`'s namespace.
    fn exec(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[i], program]);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in std::iter::once(&self.hub).chain(&self.names) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A process killed (and waited for) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the agent of host `i` knows: its members and the nodes it holds load of.
fn nodes(hosts: &Hosts, i: usize) -> Option<(Vec<String>, Vec<String>)> {
    let out = hosts
        .exec(i, env!("CARGO_BIN_EXE_mosctl"))
        .args(["nodes", "--json", "--node", &Hosts::agent(i)])
        .env("MOSAIC_CLUSTER_KEY", KEY)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let strings = |a: &serde_json::Value| -> Vec<String> {
        a.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let members = strings(&v["members"]);
    let load: Vec<String> = v["load"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["node"].as_str().map(String::from)).collect())
        .unwrap_or_default();
    Some((members, load))
}

/// Polls every 200 ms until `cond` holds; returns how long it took, or fails after `limit`.
fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

/// `mosmon` run in tmux at the first host: its screen shows every node with its figures.
fn mosmon_shows_every_node(hosts: &Hosts) {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must run the mosmon check: it needs tmux");
        eprintln!("mosmon check skipped: no tmux");
        return;
    }
    let session = format!("mosmon{}", std::process::id());
    let cmd = format!(
        "MOSAIC_CLUSTER_KEY={KEY} ip netns exec {} {} --node {}",
        hosts.names[0],
        env!("CARGO_BIN_EXE_mosmon"),
        Hosts::agent(0)
    );
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().expect("run tmux");
    let started = tmux(&["new-session", "-d", "-s", &session, "-x", "140", "-y", "20", &cmd]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let mut screen = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        screen = String::from_utf8_lossy(&tmux(&["capture-pane", "-t", &session, "-p"]).stdout).to_string();
        let rows = (0..4).filter(|&i| {
            screen.lines().any(|l| l.contains(&Hosts::agent(i)) && (l.contains("self") || l.contains('G')))
        });
        if rows.count() == 4 && screen.contains("4 node(s)") {
            break;
        }
    }
    let _ = tmux(&["send-keys", "-t", &session, "q"]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = tmux(&["kill-session", "-t", &session]);
    for i in 0..4 {
        assert!(
            screen.lines().any(|l| l.contains(&Hosts::agent(i)) && l.contains('G')),
            "mosmon does not show {} with its figures:\n{screen}",
            Hosts::agent(i)
        );
    }
}

#[test]
fn four_hosts_join_through_one_learn_each_others_load_refuse_a_wrong_key_and_find_a_lost_host() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: it needs root and iproute2");
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let hosts = Hosts::new(5);
    let start = |i: usize, key: &str| {
        let mut c = hosts.exec(i, env!("CARGO_BIN_EXE_mosaicd"));
        c.args(["--listen", &Hosts::agent(i)]);
        if i > 0 {
            c.args(["--join", &Hosts::agent(0)]);
        }
        Running(c.env("MOSAIC_CLUSTER_KEY", key).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
    };
    let mut agents: Vec<Running> = (0..4).map(|i| start(i, KEY)).collect();
    let all: Vec<String> = (0..4).map(Hosts::agent).collect();
    let others = |i: usize| -> Vec<String> { all.iter().filter(|a| **a != Hosts::agent(i)).cloned().collect() };
    let joined = wait("every host knows the three others and their load", Duration::from_secs(30), || {
        (0..4).all(|i| {
            nodes(&hosts, i).is_some_and(|(mut m, mut l)| {
                m.sort();
                l.sort();
                m == others(i) && l == others(i)
            })
        })
    });
    eprintln!("four hosts joined through one and heard each other's load in {joined:?}");
    mosmon_shows_every_node(&hosts);
    // A fifth host with another key joins through the first: nobody lists it.
    let stranger = start(4, "another-cluster-key-altogether-0123");
    std::thread::sleep(Duration::from_secs(5));
    for i in 0..4 {
        let (m, l) = nodes(&hosts, i).expect("the agent answers");
        assert!(!m.contains(&Hosts::agent(4)) && !l.contains(&Hosts::agent(4)), "host {i} took the stranger: {m:?}");
    }
    drop(stranger);
    // The fourth host's link goes down: the others find it lost and forget its load.
    hosts.cut(3);
    let lost = wait("the others find the fourth host lost", Duration::from_secs(30), || {
        (0..3).all(|i| {
            nodes(&hosts, i).is_some_and(|(m, l)| !m.contains(&Hosts::agent(3)) && !l.contains(&Hosts::agent(3)))
        })
    });
    eprintln!("a host's loss was detected by every other host in {lost:?}");
    agents.clear();
}
