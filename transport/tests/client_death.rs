//! A client *process* that dies (SIGKILL) while connected: the server notices and reclaims the
//! connection (thread, socket, shm mapping), on tcp and shm.
//!
//! The client is this very test binary, re-run with `client_helper` as its only test and the
//! server's URI in `MOSAIC_TEST_CLIENT_URI`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mosaic_transport::{connect, listen, ClusterKey, ConnectOptions, Echo, ServerConfig};

const URI_ENV: &str = "MOSAIC_TEST_CLIENT_URI";

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"client-death-test-cluster-key").unwrap()
}

/// The child's part: connects, calls once, says so, and waits to die. Ignored, so it never
/// counts as a test of its own; the parent runs it with `--ignored --exact client_helper`.
#[test]
#[ignore = "the child process of the client-death tests, not a test by itself"]
fn client_helper() {
    let uri = std::env::var(URI_ENV).expect("run by the client-death tests, which set MOSAIC_TEST_CLIENT_URI");
    let conn = connect(&uri, &ConnectOptions::new(key())).unwrap();
    assert_eq!(conn.call(1, b"hello").unwrap(), b"hello");
    println!("CONNECTED");
    std::thread::sleep(Duration::from_secs(60));
}

fn killed_client_is_reclaimed(bind: &str) {
    let server = listen(bind, ServerConfig::new(key()).service(Echo)).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "client_helper", "--nocapture", "--test-threads=1"])
        .env(URI_ENV, server.uri())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("CONNECTED") {
                let _ = tx.send(());
            }
        }
    });
    let connected = rx.recv_timeout(Duration::from_secs(10)).is_ok();
    if !connected {
        let _ = child.kill();
    }
    assert!(connected, "{bind}: the child never completed its call");
    assert_eq!(server.connections(), 1, "{bind}: the child's connection is not open");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.connections(), 0, "{bind}: the dead client's connection was not reclaimed");
}

#[test]
fn a_killed_tcp_client_is_reclaimed() {
    killed_client_is_reclaimed("tcp://127.0.0.1:0");
}

#[test]
fn a_killed_shm_client_is_reclaimed() {
    killed_client_is_reclaimed(&format!("shm://client-death-{}", std::process::id()));
}
