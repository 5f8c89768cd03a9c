//! The shm transport against a hostile local peer: a process that connects without the key and
//! tries to break the server through the shared memory itself, a peer that lies in the ring
//! counters, a fake server that hands out memory it can truncate, and another user.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::{connect, listen, ClusterKey, ConnectOptions, Echo, ServerConfig};

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"hostile-shm-test-cluster-key").unwrap()
}

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("hostile-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Connects to the rendezvous socket like a client, without any key, and takes the memfd.
fn raw_client(name: &str) -> (UnixStream, OwnedFd, usize) {
    let sock = UnixStream::connect_addr(&socket_addr(name).unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut msg = [0u8; 24];
    let (n, fds) = sys::recv_fds(&sock, &mut msg).unwrap();
    assert_eq!(n, 24);
    let cap = usize::try_from(u64::from_le_bytes(msg[16..24].try_into().unwrap())).unwrap();
    let mem = fds.into_iter().next().unwrap();
    (sock, mem, cap)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_peer_cannot_truncate_the_shared_memory_and_the_server_lives_on() {
    let name = unique("truncate");
    let server = listen(&format!("shm://{name}"), ServerConfig::new(key()).service(Echo)).unwrap();
    let (_sock, mem, cap) = raw_client(&name);
    // The probe that killed the server with SIGBUS: shrink the memory under its mapping.
    // SAFETY: ftruncate on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::ftruncate(mem.as_raw_fd(), 0) };
    let err = std::io::Error::last_os_error();
    assert_eq!(rc, -1, "the memfd must be sealed against shrinking");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    // Growing and removing the seals are refused too.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::ftruncate(mem.as_raw_fd(), 1 << 30) }, -1);
    // SAFETY: fcntl with an integer argument on a descriptor we own.
    assert_eq!(unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_ADD_SEALS, 0) }, -1, "F_SEAL_SEAL is set");
    let (seals, size) = sys::seals_and_size(mem.as_fd()).unwrap();
    assert_eq!(seals & sys::SIZE_SEALS, sys::SIZE_SEALS);
    assert_eq!(size, layout_len(cap) as u64);
    // The server still serves a real client.
    let conn = connect(server.uri(), &ConnectOptions::new(key())).unwrap();
    assert_eq!(conn.call(1, b"still here").unwrap(), b"still here");
}

#[test]
fn a_peer_lying_in_the_ring_counters_is_disconnected_and_the_server_lives_on() {
    let name = unique("counters");
    let server = listen(&format!("shm://{name}"), ServerConfig::new(key()).service(Echo)).unwrap();
    let (sock, mem, cap) = raw_client(&name);
    let map = Mapping::shared(mem.as_fd(), layout_len(cap)).unwrap();
    wait_until("the server counts the connection", || server.connections() == 1);
    // SAFETY: RING_HDR_A lies inside the mapping (layout_len), 64-aligned, and holds a
    // RingHeader of atomics, valid for any bit pattern.
    let c2s = unsafe { &*map.as_ptr().add(RING_HDR_A).cast::<RingHeader>() };
    // Claim that more bytes wait than the ring holds: an unchecked pop would copy past it.
    c2s.tail.0.store(cap as u64 + 4096, Ordering::Release);
    sys::eventfd_signal(sys::eventfd().unwrap().as_fd());
    wait_until("the server drops the lying peer", || server.connections() == 0);
    drop(sock);
    let conn = connect(server.uri(), &ConnectOptions::new(key())).unwrap();
    assert_eq!(conn.call(1, b"still here").unwrap(), b"still here");
}

/// A fake server on `name` that hands out `mem` as its ring memory.
fn fake_server(name: &str, mem: OwnedFd, cap: usize) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind_addr(&socket_addr(name).unwrap()).unwrap();
    std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let efds = [sys::eventfd().unwrap(), sys::eventfd().unwrap(), sys::eventfd().unwrap(), sys::eventfd().unwrap()];
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&CONTROL_MAGIC.to_le_bytes());
        msg[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        msg[16..24].copy_from_slice(&(cap as u64).to_le_bytes());
        let fds = [mem.as_fd(), efds[0].as_fd(), efds[1].as_fd(), efds[2].as_fd(), efds[3].as_fd()];
        sys::send_fds(&sock, &msg, &fds).unwrap();
        // Keep the socket open until the client has decided.
        let _ = sys::poll_one(&sock, sys::Interest::Read, Some(Duration::from_secs(5)));
    })
}

#[test]
fn a_client_refuses_memory_the_server_could_truncate_under_it() {
    let cap = 4096;
    let name = unique("unsealed");
    let unsealed = sys::memfd("unsealed", layout_len(cap)).unwrap();
    let t = fake_server(&name, unsealed, cap);
    let e = super::connect(&name, Duration::from_secs(5), &LocalPeers::SameUser).err().expect("refused");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("not sealed"), "{e}");
    t.join().unwrap();

    // Sealed, but smaller than the layout the server announced.
    let name = unique("small");
    let small = sys::memfd("small", layout_len(cap) - 4096).unwrap();
    sys::seal_size(small.as_fd()).unwrap();
    let t = fake_server(&name, small, cap);
    let e = super::connect(&name, Duration::from_secs(5), &LocalPeers::SameUser).err().expect("refused");
    assert!(e.to_string().contains("layout needs"), "{e}");
    t.join().unwrap();
}

#[test]
fn the_default_policy_admits_the_same_user_and_root_only() {
    let me = sys::euid();
    assert!(LocalPeers::SameUser.allows(me));
    assert!(LocalPeers::SameUser.allows(0));
    let other = if me == 65534 { 65533 } else { 65534 };
    assert!(!LocalPeers::SameUser.allows(other));
    assert!(LocalPeers::Users(vec![other]).allows(other));
    assert!(!LocalPeers::Users(vec![other + 7]).allows(other));
    assert!(LocalPeers::AnyUser.allows(other));
}

/// The helper half of the next test: run in a child process as another user.
#[test]
#[ignore = "helper: run by a_process_of_another_user_is_refused, as another user"]
fn shm_connect_as_another_user_helper() {
    let Ok(name) = std::env::var("MOSAIC_SHM_PROBE_NAME") else { return };
    match super::connect(&name, Duration::from_secs(5), &LocalPeers::AnyUser) {
        Ok(_) => println!("PROBE-CONNECTED"),
        Err(e) => println!("PROBE-REFUSED {e}"),
    }
}

#[test]
fn a_process_of_another_user_is_refused() {
    use std::os::unix::process::CommandExt;
    if sys::euid() != 0 {
        eprintln!("skipped: switching to another user to connect needs root");
        return;
    }
    let name = unique("user");
    let server = listen(&format!("shm://{name}"), ServerConfig::new(key()).service(Echo)).unwrap();
    let run = |uid: u32| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "shm::hostile_tests::shm_connect_as_another_user_helper", "--ignored", "--nocapture"])
            .env("MOSAIC_SHM_PROBE_NAME", &name)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let out = run(65534);
    if !out.contains("PROBE-") {
        eprintln!("skipped: the test binary cannot run as user 65534 here: {out}");
        return;
    }
    // Refused by the server: the socket closes before any memory is handed out.
    assert!(out.contains("PROBE-REFUSED"), "{out}");
    assert_eq!(server.connections(), 0);
    // Root (the default policy's other member) is let in.
    let out = run(0);
    assert!(out.contains("PROBE-CONNECTED"), "{out}");
}
