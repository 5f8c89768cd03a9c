#![allow(missing_docs)]
//! Jobs started by `mosrun --migratable` move between two node agents (`mosaicd`) on loopback
//! while they run, there and back, and print exactly what an unmigrated run prints. Needs root
//! (the restorer uses pid namespaces); skipped otherwise.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The directory of this test's binaries, with mosrun and libmosaic_preload.so built there too.
fn bin_dir() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_mosaicd")).parent().unwrap().to_path_buf();
    BUILD.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", "mosrun", "-p", "mosaic-preload"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        assert!(cargo.status().unwrap().success(), "building mosrun and mosaic-preload failed");
    });
    dir
}

fn key() -> String {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| mosaic_transport::ClusterKey::random_text().unwrap()).clone()
}

/// Builds a C program once (tests run at once: one writing the binary while another runs it
/// would fail with "text file busy").
fn c_program(name: &str, src: &str) -> PathBuf {
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
struct Node {
    child: Child,
    uri: String,
}

impl Node {
    fn start() -> Node {
        Node::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mosaicd"))
            .args(["--listen", "tcp://127.0.0.1:0"])
            .args(extra)
            .env("MOSAIC_CLUSTER_KEY", key())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let uri = line
            .trim()
            .strip_prefix("mosaicd: listening at ")
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
struct Job {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    run_dir: PathBuf,
}

impl Job {
    fn start(node: &Node, run_dir: &Path, program: &[&str]) -> Job {
        Job::start_with_input(node, run_dir, program, Stdio::inherit())
    }

    fn start_with_input(node: &Node, run_dir: &Path, program: &[&str], input: Stdio) -> Job {
        std::fs::create_dir_all(run_dir).unwrap();
        let mut child = Command::new(bin_dir().join("mosrun"))
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
    fn pid(&self) -> u32 {
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

    fn wait_for(&self, text: &str) {
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

    fn migrate(&self, to: &Node) -> String {
        let (ok, said) = self.try_migrate(to);
        assert!(ok, "mosctl migrate failed: {said}");
        said
    }

    fn try_migrate(&self, to: &Node) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_mosctl"))
            .args(["migrate", &self.pid().to_string(), "--to", &to.uri])
            .env("MOSAIC_CLUSTER_KEY", key())
            .env("MOSAIC_RUN_DIR", &self.run_dir)
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), said)
    }

    fn finish(mut self) -> (std::process::ExitStatus, Vec<u8>) {
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

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn a_c_loop_moves_there_and_back_and_prints_what_it_would_have() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prog = c_program("counter", "../migrate/tests/c/counter.c");
    let args = ["60", "16", "20"];
    let expected = Command::new(&prog).args(args).output().unwrap().stdout;
    let (a, b) = (Node::start(), Node::start());
    let mut cmd = vec![prog.to_str().unwrap()];
    cmd.extend(args);
    let job = Job::start(&a, &tmp("counter"), &cmd);
    job.wait_for("step 10 ");
    let said = job.migrate(&b);
    assert!(said.contains("moved to"), "{said}");
    job.wait_for("step 30 ");
    job.migrate(&a);
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
}

/// Runs `cmd` unmigrated, then under `mosrun --migratable`, moving it to the other node once
/// `first` is printed and back once `second` is: both outputs must be equal.
fn there_and_back(name: &str, cmd: &[&str], first: &str, second: &str) {
    let expected = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(expected.status.success(), "{name} failed unmigrated");
    let (a, b) = (Node::start(), Node::start());
    let job = Job::start(&a, &tmp(name), cmd);
    job.wait_for(first);
    job.migrate(&b);
    job.wait_for(second);
    job.migrate(&a);
    let (st, out) = job.finish();
    assert!(st.success(), "{name}: {st:?}");
    assert!(
        out == expected.stdout,
        "{name}: the output differs from an unmigrated run's:\n{}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_threaded_program_with_a_mutex_and_condition_variables_moves_there_and_back() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prog = c_program("workers", "tests/c/workers.c");
    there_and_back("workers", &[prog.to_str().unwrap(), "150", "20"], "item 20 ", "item 70 ");
}

#[test]
fn python_moves_there_and_back() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let script = "import time\n\
                  primes = []\n\
                  for n in range(2, 40001):\n\
                  \x20   if all(n % p for p in primes if p * p <= n):\n\
                  \x20       primes.append(n)\n\
                  \x20   if n % 500 == 0:\n\
                  \x20       print(n, len(primes), sum(primes) % 1000003, flush=True)\n\
                  \x20       time.sleep(0.02)\n";
    there_and_back("python", &["/usr/bin/python3", "-c", script], "\n5000 ", "\n20000 ");
}

impl Job {
    fn wait_for_bytes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.out.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "only {} bytes came", self.out.lock().unwrap().len());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn xz_compressing_a_file_to_stdout_moves_there_and_back() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // 8 MiB of text xz takes a few seconds over.
    let input = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xz-input.txt");
    let mut text = String::with_capacity(9 << 20);
    let mut x: u64 = 88172645463325252;
    while text.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!(
            "line {} value {} {}\n",
            x % 100_000,
            x >> 40,
            ["alpha", "beta", "gamma", "delta"][(x % 4) as usize]
        ));
    }
    std::fs::write(&input, text).unwrap();
    let cmd = ["/usr/bin/xz", "-T1", "-6", "-c", input.to_str().unwrap()];
    let expected = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(expected.status.success());
    let (a, b) = (Node::start(), Node::start());
    let job = Job::start(&a, &tmp("xz"), &cmd);
    job.wait_for_bytes(expected.stdout.len() / 5);
    job.migrate(&b);
    job.wait_for_bytes(expected.stdout.len() / 2);
    job.migrate(&a);
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert!(
        out == expected.stdout,
        "xz's output differs from an unmigrated run's ({} bytes against {})",
        out.len(),
        expected.stdout.len()
    );
}

#[test]
fn a_process_that_cannot_move_is_told_why_and_runs_on() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prog = c_program("socket_holder", "tests/c/socket_holder.c");
    let cmd = [prog.to_str().unwrap(), "60"];
    let expected = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap().stdout;
    let (a, b) = (Node::start(), Node::start());
    let job = Job::start(&a, &tmp("socket"), &cmd);
    job.wait_for("step 5 ");
    let (ok, said) = job.try_migrate(&b);
    assert!(!ok && said.contains("descriptor 3 is a socket"), "{said}");
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(out, expected);
}

#[test]
fn a_destination_that_dies_during_the_move_leaves_the_process_running_at_its_source() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // The destination's restorer kills its agent: the agent dies in the middle of the move.
    let killer = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kill-my-agent.sh");
    std::fs::write(&killer, "#!/bin/sh\nkill -9 $PPID\n").unwrap();
    Command::new("chmod").arg("755").arg(&killer).status().unwrap();
    let prog = c_program("counter", "../migrate/tests/c/counter.c");
    let cmd = [prog.to_str().unwrap(), "50", "16", "20"];
    let expected = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap().stdout;
    let a = Node::start();
    let mut b = Node::start_with(&["--restorer", killer.to_str().unwrap()]);
    let job = Job::start(&a, &tmp("deaddest"), &cmd);
    job.wait_for("step 5 ");
    let (ok, said) = job.try_migrate(&b);
    assert!(!ok && said.contains("runs on here"), "{said}");
    assert!(b.child.wait().unwrap().signal() == Some(9), "the destination's agent was to die");
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
}

#[test]
fn a_source_that_dies_after_the_hand_over_fails_loudly_never_with_zeros() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // 1 GiB touched: its pages are still on their way when the source goes.
    let prog = c_program("counter", "../migrate/tests/c/counter.c");
    let cmd = [prog.to_str().unwrap(), "40", "1024", "20"];
    let expected = String::from_utf8(Command::new(cmd[0]).args(&cmd[1..]).output().unwrap().stdout).unwrap();
    let (mut a, b) = (Node::start(), Node::start());
    let job = Job::start(&a, &tmp("deadsource"), &cmd);
    job.wait_for("step 2 ");
    job.migrate(&b);
    let _ = a.child.kill();
    let _ = a.child.wait();
    let (st, out) = job.finish();
    let out = String::from_utf8(out).unwrap();
    // The job dies of SIGBUS (a page that can no longer come), and everything it printed is what
    // an unmigrated run prints: no page read as zeros.
    assert_eq!(st.code(), Some(128 + libc::SIGBUS), "{st:?}\n{out}");
    assert!(expected.starts_with(&out), "printed what an unmigrated run does not:\n{out}");
}

#[test]
fn standard_input_follows_the_job_there_and_back() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    use std::io::Write;
    let prog = c_program("echo", "tests/c/echo.c");
    let (a, b) = (Node::start(), Node::start());
    let mut job = Job::start_with_input(&a, &tmp("echo"), &[prog.to_str().unwrap()], Stdio::piped());
    let mut input = job.child.stdin.take().unwrap();
    input.write_all(b"one\ntwo\n").unwrap();
    job.wait_for("got 2: two");
    job.migrate(&b);
    input.write_all(b"three\n").unwrap();
    job.wait_for("got 3: three");
    job.migrate(&a);
    input.write_all(b"four\n").unwrap();
    job.wait_for("got 4: four");
    drop(input);
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&out), "got 1: one\ngot 2: two\ngot 3: three\ngot 4: four\nend after 4 lines\n");
}
