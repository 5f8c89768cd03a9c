//! Helpers of the cluster's integration tests: node agents, jobs under `mosrun --migratable`,
//! C programs built once.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The directory of this test's binaries, with mosrun, libmosaic_preload.so and dsm-litmus built
/// there too.
pub fn bin_dir() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_mosaicd")).parent().unwrap().to_path_buf();
    BUILD.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", "mosrun", "-p", "mosaic-preload", "-p", "mosaic-dsm"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        assert!(cargo.status().unwrap().success(), "building mosrun, mosaic-preload and dsm-litmus failed");
    });
    dir
}

pub fn key() -> String {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| mosaic_transport::ClusterKey::random_text().unwrap()).clone()
}

/// Builds a C program once (tests run at once: one writing the binary while another runs it
/// would fail with "text file busy").
pub fn c_program(name: &str, src: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    if built.iter().any(|b| b == name) {
        return out;
    }
    built.push(name.to_string());
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(src);
    let st = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "cc failed");
    out
}

/// A node agent on loopback, stopped when dropped.
pub struct Node {
    pub child: Child,
    pub uri: String,
}

impl Node {
    pub fn start() -> Node {
        Node::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Node {
        Node::launch(None, extra, None)
    }

    /// An agent on CPU `cpu` only (standing for a host of its own), with `extra` arguments and
    /// the run directory `run_dir` (where it finds the jobs whose home is its node).
    pub fn launch(cpu: Option<usize>, extra: &[&str], run_dir: Option<&Path>) -> Node {
        Node::spawn(command(None, cpu, Path::new(env!("CARGO_BIN_EXE_mosaicd"))), "tcp://127.0.0.1:0", extra, run_dir)
    }

    /// The agent of host `i` of `hosts` (in its network namespace, at its address), on CPU
    /// `cpu` only if given.
    pub fn launch_at(hosts: &Hosts, i: usize, cpu: Option<usize>, extra: &[&str], run_dir: Option<&Path>) -> Node {
        let cmd = command(Some((hosts, i)), cpu, Path::new(env!("CARGO_BIN_EXE_mosaicd")));
        Node::spawn(cmd, &Hosts::agent(i), extra, run_dir)
    }

    fn spawn(mut cmd: Command, listen: &str, extra: &[&str], run_dir: Option<&Path>) -> Node {
        if let Some(d) = run_dir {
            cmd.env("MOSAIC_RUN_DIR", d);
        }
        let mut child = cmd
            .args(["--listen", listen])
            .args(extra)
            .env("MOSAIC_CLUSTER_KEY", key())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // Whatever it prints later is read and dropped (a closed pipe would kill it).
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let uri = line
            .trim()
            .strip_prefix("mosaicd: listening at ")
            .and_then(|rest| rest.split(" (").next())
            .unwrap_or_else(|| panic!("mosaicd said {line:?}"))
            .to_string();
        Node { child, uri }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A job under `mosrun --migratable`, its output collected as it comes.
pub struct Job {
    pub child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    run_dir: PathBuf,
}

impl Job {
    pub fn start(node: &Node, run_dir: &Path, program: &[&str]) -> Job {
        Job::start_with_input(node, run_dir, program, Stdio::inherit())
    }

    pub fn start_with_input(node: &Node, run_dir: &Path, program: &[&str], input: Stdio) -> Job {
        Job::launch(node, run_dir, program, input, None)
    }

    /// A job whose program runs on CPU `cpu` only, if given.
    pub fn launch(node: &Node, run_dir: &Path, program: &[&str], input: Stdio, cpu: Option<usize>) -> Job {
        Job::spawn(command(None, cpu, &bin_dir().join("mosrun")), node, run_dir, program, input)
    }

    /// A job started at host `i` of `hosts` (its home there), on CPU `cpu` only if given.
    pub fn launch_at(
        hosts: &Hosts,
        i: usize,
        node: &Node,
        run_dir: &Path,
        program: &[&str],
        cpu: Option<usize>,
    ) -> Job {
        let mut cmd = command(Some((hosts, i)), cpu, &bin_dir().join("mosrun"));
        cmd.args(["--home-address", &Hosts::addr(i)]);
        Job::spawn(cmd, node, run_dir, program, Stdio::null())
    }

    fn spawn(mut cmd: Command, node: &Node, run_dir: &Path, program: &[&str], input: Stdio) -> Job {
        std::fs::create_dir_all(run_dir).unwrap();
        let mut child = cmd
            .stdin(input)
            .args(["--migratable", "--node", &node.uri, "--"])
            .args(program)
            .env("MOSAIC_CLUSTER_KEY", key())
            .env("MOSAIC_RUN_DIR", run_dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let o = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Job { child, out, reader: Some(reader), run_dir: run_dir.to_path_buf() }
    }

    /// The job's pid at home (its job file's name), once mosrun published it.
    pub fn pid(&self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = std::fs::read_dir(&self.run_dir)
                .ok()
                .and_then(|rd| rd.flatten().find_map(|e| e.file_name().to_str()?.strip_prefix("job-")?.parse().ok()))
            {
                return p;
            }
            assert!(Instant::now() < deadline, "no job file in {}", self.run_dir.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_for_bytes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.out.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "only {} bytes came", self.out.lock().unwrap().len());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !String::from_utf8_lossy(&self.out.lock().unwrap()).contains(text) {
            assert!(
                Instant::now() < deadline,
                "never printed {text:?}: {}",
                String::from_utf8_lossy(&self.out.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn migrate(&self, to: &Node) -> String {
        let (ok, said) = self.try_migrate(to);
        assert!(ok, "mosctl migrate failed: {said}");
        said
    }

    pub fn try_migrate(&self, to: &Node) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_mosctl"))
            .args(["migrate", &self.pid().to_string(), "--to", &to.uri])
            .env("MOSAIC_CLUSTER_KEY", key())
            .env("MOSAIC_RUN_DIR", &self.run_dir)
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), said)
    }

    pub fn finish(mut self) -> (std::process::ExitStatus, Vec<u8>) {
        let st = self.child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
        let out = std::mem::take(&mut *self.out.lock().unwrap());
        (st, out)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program`, in host `at`'s network namespace if given, on CPU `cpu` only if given.
fn command(at: Option<(&Hosts, usize)>, cpu: Option<usize>, program: &Path) -> Command {
    let Some(c) = cpu else {
        return match at {
            Some((hosts, i)) => hosts.enter(i, program),
            None => Command::new(program),
        };
    };
    let mut cmd = match at {
        Some((hosts, i)) => hosts.enter(i, "taskset"),
        None => Command::new("taskset"),
    };
    cmd.arg("-c").arg(c.to_string()).arg(program);
    cmd
}

/// A fresh directory for this run's `name`.
pub fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Network namespaces joined by a bridge in a hub namespace; removed when dropped.
pub struct Hosts {
    pub hub: String,
    pub names: Vec<String>,
}

impl Hosts {
    /// `n` host namespaces at 10.232.0.2.. on a bridge in a hub namespace.
    pub fn new(n: usize) -> Hosts {
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

    pub fn addr(i: usize) -> String {
        format!("10.232.0.{}", i + 2)
    }

    pub fn agent(i: usize) -> String {
        format!("tcp://{}:7070", Hosts::addr(i))
    }

    /// Takes host `i`'s link down (the host is lost to the others; its processes live on).
    pub fn cut(&self, i: usize) {
        let out = Command::new("ip").args(["-n", &self.hub, "link", "set", &format!("p{i}"), "down"]).output().unwrap();
        assert!(out.status.success());
    }

    /// A command run in host `i`'s namespace.
    pub fn exec(&self, i: usize, program: &str) -> Command {
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

impl Hosts {
    /// `program` run in host `i`'s network namespace by nsenter, which (unlike `ip netns exec`)
    /// keeps this system's /sys, with the cgroup file systems.
    pub fn enter(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.names[i])).arg(program);
        c
    }
}
