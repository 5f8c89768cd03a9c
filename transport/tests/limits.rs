#![allow(missing_docs)]
//! Connection limits against a flood: idle connections that never finish their handshake hold
//! at most the per-source and total handshake caps (threads included); the rest are refused at
//! once; a real client from elsewhere is served throughout.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mosaic_transport::{connect, listen, ClusterKey, ConnectOptions, Echo, Limits, ServerConfig};
use socket2::{Domain, Socket, Type};

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"limits-test-cluster-key").unwrap()
}

/// A TCP connection to `to` from the loopback address `from` (port picked by the kernel).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// The tests of this file count the process's threads: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The probe: 200 idle TCP connections made 204 threads and slowed a real client's requests.
#[test]
fn a_flood_of_idle_connections_is_capped_and_a_real_client_is_served() {
    let _one_at_a_time = serial();
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo)).unwrap();
    let addr: SocketAddr = server.uri().trim_start_matches("tcp://").parse().unwrap();
    let before = threads();
    let per_source = Limits::default().handshakes_per_source;
    let flood: Vec<TcpStream> = (0..200).map(|_| connect_from("127.0.0.2", addr)).collect();
    wait_until("the flood is refused", || server.refused() >= (200 - per_source) as u64);
    assert_eq!(server.handshaking(), per_source, "one source holds at most its share");
    let grown = threads().saturating_sub(before);
    assert!(grown <= per_source + 2, "{grown} threads for 200 idle connections");
    // A client from another address is admitted and served while the flood waits.
    let conn = connect(server.uri(), &ConnectOptions::new(key())).unwrap();
    assert_eq!(conn.call(1, b"served").unwrap(), b"served");
    drop(flood);
    wait_until("the flood's connections close", || server.connections() == 1);
    assert_eq!(server.handshaking(), 0);
}

#[test]
fn the_total_handshake_and_connection_caps_hold() {
    let _one_at_a_time = serial();
    let limits = Limits { connections: 3, handshakes: 2, handshakes_per_source: 8 };
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo).limits(limits)).unwrap();
    let addr: SocketAddr = server.uri().trim_start_matches("tcp://").parse().unwrap();
    // Two idle connections from two sources fill the handshake cap; a third source is refused.
    let a = connect_from("127.0.0.2", addr);
    let b = connect_from("127.0.0.3", addr);
    wait_until("both are in their handshake", || server.handshaking() == 2);
    let _c = connect_from("127.0.0.4", addr);
    wait_until("the third is refused", || server.refused() == 1);
    drop((a, b));
    wait_until("the idle ones close", || server.connections() == 0 && server.handshaking() == 0);
    // Three authenticated connections fill the connection cap; a fourth is refused.
    let opts = ConnectOptions::new(key());
    let held: Vec<_> = (0..3).map(|_| connect(server.uri(), &opts).unwrap()).collect();
    for c in &held {
        assert_eq!(c.call(1, b"x").unwrap(), b"x");
    }
    assert!(connect(server.uri(), &opts).is_err(), "a fourth connection is refused");
    wait_until("the refusal is counted", || server.refused() == 2);
    drop(held);
    wait_until("the held ones close", || server.connections() == 0);
    let again = connect(server.uri(), &opts).unwrap();
    assert_eq!(again.call(1, b"y").unwrap(), b"y");
}
