//! The cluster level between hosts: four `mosaicd` in network namespaces joined by a bridge
//! (each its own host with its own address) join through one member, learn each other and
//! their load (and `mosmon`, driven in tmux, shows every node's figures), refuse a fifth holding
//! another cluster key, and find a host whose link went down; and a host squeezed of memory
//! (its agent in a memory cgroup) has the network-RAM pages it holds moved to the others while
//! the program using them runs on. Needs root, iproute2, tmux and a C compiler (CI runs it as
//! root).

mod common;

use common::Hosts;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const KEY: &str = "gossip-tests-cluster-key-0123456789";

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

/// A memory cgroup (v1) under this process's own, with a memory limit: a host's memory, for the
/// processes started in it. Removed when dropped (after them: declare it first).
struct MemCgroup {
    dir: PathBuf,
}

impl MemCgroup {
    /// `None` where the cgroup v1 memory controller is not mounted.
    fn new(limit: u64) -> Option<MemCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
        })?;
        let dir = PathBuf::from(format!("/sys/fs/cgroup/memory{path}/mosaic-usher-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let cg = MemCgroup { dir };
        std::fs::write(cg.dir.join("memory.limit_in_bytes"), limit.to_string()).ok()?;
        Some(cg)
    }

    /// Memory its processes use now, page cache included.
    fn usage(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.usage_in_bytes")).unwrap().trim().parse().unwrap()
    }

    /// `cmd` (its program and arguments) run inside it.
    fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""]).arg(&self.dir);
        c.arg(cmd.get_program()).args(cmd.get_args());
        c
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The lines a child prints, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || out.lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
    rx
}

/// What host `i`'s agent says of its memory server: bytes holding pages, and whether it asks
/// its clients to move them elsewhere.
fn memory_server(hosts: &Hosts, i: usize) -> Option<(u64, bool)> {
    let out = hosts
        .exec(0, env!("CARGO_BIN_EXE_mosctl"))
        .args(["status", &Hosts::agent(i), "--json"])
        .env("MOSAIC_CLUSTER_KEY", KEY)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let m = &v["memory_server"];
    Some((m["used_bytes"].as_u64()?, m["ushering"].as_bool()?))
}

#[test]
fn a_host_short_of_memory_has_its_pages_moved_away_while_the_program_keeps_using_them() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: it needs root and iproute2");
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    const LIMIT: u64 = 384 << 20;
    let Some(cgroup) = MemCgroup::new(LIMIT) else {
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: it needs the cgroup v1 memory controller");
        eprintln!("skipped: no cgroup v1 memory controller");
        return;
    };
    let (rmw, hog) = (common::c_program("rmw", "tests/c/rmw.c"), common::c_program("hog", "tests/c/hog.c"));
    let mosrun = common::bin_dir().join("mosrun");
    let hosts = Hosts::new(4);
    let memory = |i: usize| format!("tcp://{}:7071", Hosts::addr(i));
    // Host 0 runs the program; hosts 1 to 3 donate memory; host 2's memory is its cgroup's.
    let agents: Vec<Running> = (0..4)
        .map(|i| {
            // `enter` (nsenter) keeps /sys, where the agent reads its cgroup's memory limit.
            let mut c = hosts.enter(i, env!("CARGO_BIN_EXE_mosaicd"));
            c.args(["--listen", &Hosts::agent(i)]);
            if i > 0 {
                c.args(["--join", &Hosts::agent(0), "--memory", "256M", "--memory-listen", &memory(i)]);
            }
            if i == 2 {
                c = cgroup.wrap(&c);
            }
            Running(c.env("MOSAIC_CLUSTER_KEY", KEY).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
        })
        .collect();
    wait("every host knows the three others", Duration::from_secs(30), || {
        (0..4).all(|i| nodes(&hosts, i).is_some_and(|(m, l)| m.len() == 3 && l.len() == 3))
    });
    let servers = (1..4).map(memory).collect::<Vec<_>>().join(",");
    let mut program = hosts.exec(0, mosrun.to_str().unwrap());
    program
        .args(["--servers", &servers, "--local-budget", "16M", "--"])
        .arg(&rmw)
        .arg("96")
        .env("MOSAIC_CLUSTER_KEY", KEY)
        .env("MOSAIC_COPIES", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut program = Running(program.spawn().unwrap());
    let said = lines(&mut program.0);
    assert_eq!(said.recv_timeout(Duration::from_secs(60)).ok().as_deref(), Some("filled"));
    let (held, _) = memory_server(&hosts, 2).expect("host 2's agent answers");
    assert!(held > 0, "host 2 holds some of the program's pages");
    // Squeeze host 2: a program there takes all but 5% of its memory.
    let room = LIMIT.saturating_sub(cgroup.usage()).saturating_sub(LIMIT / 20);
    let mut squeeze =
        Running(cgroup.wrap(Command::new(&hog).arg((room >> 20).to_string())).stdout(Stdio::piped()).spawn().unwrap());
    assert_eq!(lines(&mut squeeze.0).recv_timeout(Duration::from_secs(30)).ok().as_deref(), Some("held"));
    let squeezed = cgroup.usage();
    let noticed = wait("host 2 asks for its pages to go elsewhere", Duration::from_secs(20), || {
        memory_server(&hosts, 2).is_some_and(|(_, ushering)| ushering)
    });
    let emptied = wait("host 2 holds no page of the program", Duration::from_secs(90), || {
        memory_server(&hosts, 2).is_some_and(|(used, _)| used == 0)
    });
    // The memory they took is the host's again.
    wait("host 2's memory server gives the memory back", Duration::from_secs(10), || {
        cgroup.usage() + held / 2 <= squeezed
    });
    eprintln!(
        "host 2 squeezed: noticed in {noticed:?}, its {} MiB of pages moved to hosts 1 and 3 in {emptied:?} more",
        held >> 20
    );
    // The program ran on throughout: every word it wrote reads back.
    program.0.stdin.take().unwrap().write_all(b"check\n").unwrap();
    let verdict = said.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    assert!(verdict.starts_with("ok "), "the program says {verdict:?}");
    assert!(program.0.wait().unwrap().success());
    // Its memory back, host 2 takes pages again.
    drop(squeeze);
    wait("host 2 takes pages again", Duration::from_secs(20), || {
        memory_server(&hosts, 2).is_some_and(|(_, ushering)| !ushering)
    });
    drop(agents);
}
