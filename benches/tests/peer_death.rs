//! A server *process* that dies in the middle of a request: the client must get a typed error
//! promptly (never hang, never read zeros), on every transport.
//!
//! The server is `mosaic-bench serve` in a child process. It is stopped (SIGSTOP) so it cannot
//! answer, a request is issued, and the process is then killed (SIGKILL): the kernel closes its
//! socket, and the client notices through it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mosaic_transport::{connect, CallError, ClusterKey, ConnectOptions, Page};

const KEY: &str = "peer-death-test-cluster-key";

struct Server {
    child: Child,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(uri: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mosaic-bench"))
        .args(["serve", "--uri", uri, "--window-pages", "16"])
        .env("MOSAIC_CLUSTER_KEY", KEY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start mosaic-bench serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let uri = line.trim().strip_prefix("READY ").expect("server did not report READY").to_string();
    Server { child, uri }
}

/// Waits until every thread of `pid` is stopped: `kill -STOP` returns before a thread running on
/// the other core has actually stopped, and such a thread could still answer a request.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let all_stopped = tasks.map_while(Result::ok).all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            stat.rsplit(')').next().map(str::trim_start).is_some_and(|rest| rest.starts_with('T'))
        });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} failed");
}

/// `one_sided`: the request in flight is a page read. Over RDMA a page read needs no server CPU
/// (it succeeds against a stopped server), so there the request in flight is a call instead.
fn dies_mid_request(bind: &str, one_sided_reads_bypass_server: bool) {
    let mut server = start(bind);
    let opts = ConnectOptions::new(ClusterKey::from_bytes(KEY.as_bytes()).unwrap()).timeout(Duration::from_secs(20));
    let conn = connect(&server.uri, &opts).unwrap();
    let mut page = Page::boxed();
    conn.read_page(1, &mut page).unwrap();

    signal(&server.child, "-STOP");
    wait_stopped(server.child.id());
    let c = conn.clone();
    let start = Instant::now();
    let waiter = std::thread::spawn(move || {
        let mut p = Page::boxed();
        p.0[0] = 0xEE;
        let r = if one_sided_reads_bypass_server { c.call(1, b"x").map(|_| ()) } else { c.read_page(2, &mut p) };
        (r, p.0[0])
    });
    std::thread::sleep(Duration::from_millis(100));
    signal(&server.child, "-KILL");
    let _ = server.child.wait();
    let (r, first_byte) = waiter.join().unwrap();
    assert!(matches!(r, Err(CallError::Disconnected { .. })), "{bind}: {r:?}");
    assert_eq!(first_byte, 0xEE, "{bind}: no byte arrived, so the failed read must leave the buffer as it was");
    assert!(start.elapsed() < Duration::from_secs(5), "{bind}: took {:?}", start.elapsed());
    assert!(matches!(conn.call(1, b"x"), Err(CallError::Disconnected { .. })));
}

#[test]
fn tcp_server_process_dies_mid_request() {
    dies_mid_request("tcp://127.0.0.1:0", false);
}

#[test]
fn shm_server_process_dies_mid_request() {
    dies_mid_request(&format!("shm://peer-death-{}", std::process::id()), false);
}

#[cfg(feature = "rdma")]
#[test]
#[ignore = "needs an RDMA device: run with --ignored and MOSAIC_RDMA_DEVICE (see .ci/rdma-vm-tests)"]
fn rdma_server_process_dies_mid_request() {
    dies_mid_request("rdma://127.0.0.1:0", true);
}
