#![allow(missing_docs)]
//! An attacker on the path between client and server (a TCP relay that can change, inject and
//! read bytes), and one that connects without the key. With integrity or encryption on, a changed
//! or injected byte closes the connection and no altered data reaches the caller; with encryption,
//! page contents never appear on the wire; a keyless peer learns nothing but a key-exchange message
//! and a refusal.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mosaic_transport::{connect, listen, ClusterKey, ConnectOptions, Echo, Protection, ServerConfig};

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"onpath-test-cluster-key").unwrap()
}

/// What the relay does to the server's bytes once `armed`.
#[derive(Clone, Copy)]
enum Attack {
    /// Flip one bit of the next chunk.
    Flip,
    /// Put a forged response in front of the next chunk.
    Inject,
}

/// A relay between a client and `server`: returns its address, the bytes it saw from the client,
/// and the switch that arms the attack on the server's next bytes.
fn relay(server: &str, attack: Attack) -> (String, Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = server.trim_start_matches("tcp://").to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let armed = Arc::new(AtomicBool::new(false));
    let (seen2, armed2) = (seen.clone(), armed.clone());
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let upstream = TcpStream::connect(&server).unwrap();
        let (mut c_rd, mut u_wr) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = c_rd.read(&mut buf) {
                if n == 0 || u_wr.write_all(&buf[..n]).is_err() {
                    break;
                }
                seen2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            let _ = u_wr.shutdown(std::net::Shutdown::Both);
        });
        let (mut u_rd, mut c_wr) = (upstream, client);
        let mut buf = [0u8; 65536];
        while let Ok(n) = u_rd.read(&mut buf) {
            if n == 0 {
                break;
            }
            if armed2.swap(false, Ordering::AcqRel) {
                match attack {
                    Attack::Flip => buf[n - 1] ^= 0x40,
                    Attack::Inject => {
                        // A well-formed plain response to request 2 (the next call's id).
                        let mut forged = Vec::new();
                        forged.extend_from_slice(b"MOSA");
                        forged.extend_from_slice(&[mosaic_transport::wire::VERSION, 16, 1, 0]);
                        forged.extend_from_slice(&2u64.to_le_bytes());
                        forged.extend_from_slice(&1u64.to_le_bytes());
                        forged.extend_from_slice(&6u32.to_le_bytes());
                        forged.extend_from_slice(&0u32.to_le_bytes());
                        forged.extend_from_slice(b"forged");
                        if c_wr.write_all(&forged).is_err() {
                            break;
                        }
                    }
                }
            }
            if c_wr.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = c_wr.shutdown(std::net::Shutdown::Both);
    });
    (format!("tcp://{addr}"), seen, armed)
}

fn run(protection: Protection, attack: Attack) -> Result<Vec<u8>, String> {
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo)).unwrap();
    let (uri, _, armed) = relay(server.uri(), attack);
    let opts = ConnectOptions::new(key()).protection(protection).timeout(Duration::from_secs(2));
    let conn = connect(&uri, &opts).unwrap();
    assert_eq!(conn.call(1, b"first call").unwrap(), b"first call");
    armed.store(true, Ordering::Release);
    conn.call(1, b"second").map_err(|e| e.to_string())
}

#[test]
fn a_changed_byte_closes_a_protected_connection_and_corrupts_a_plain_one() {
    for p in [Protection::Integrity, Protection::Encrypt] {
        let r = run(p, Attack::Flip);
        assert!(r.is_err(), "{p:?}: a flipped byte must not be delivered: {r:?}");
    }
    // The same attack on an unprotected connection goes unnoticed: the reply is altered.
    let r = run(Protection::None, Attack::Flip).unwrap();
    assert_ne!(r, b"second", "the plain connection delivered the change");
}

#[test]
fn an_injected_reply_closes_a_protected_connection_and_fools_a_plain_one() {
    for p in [Protection::Integrity, Protection::Encrypt] {
        let r = run(p, Attack::Inject);
        assert!(r.is_err(), "{p:?}: an injected reply must not be delivered: {r:?}");
    }
    let r = run(Protection::None, Attack::Inject).unwrap();
    assert_eq!(r, b"forged", "the plain connection believed the forged reply");
}

#[test]
fn encrypted_page_contents_never_appear_on_the_wire() {
    let window = Arc::new(mosaic_transport::PageWindow::new(4).unwrap());
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo).window(window)).unwrap();
    for (p, visible) in [(Protection::Encrypt, false), (Protection::Integrity, true)] {
        let (uri, seen, _) = relay(server.uri(), Attack::Flip);
        let conn = connect(&uri, &ConnectOptions::new(key()).protection(p)).unwrap();
        let mut page = mosaic_transport::Page::boxed();
        page.0[..24].copy_from_slice(b"a MAP_LOCKED secret page");
        conn.write_page(1, &page).unwrap();
        let on_wire = seen.lock().unwrap().windows(24).any(|w| w == b"a MAP_LOCKED secret page");
        assert_eq!(on_wire, visible, "{p:?}");
    }
}

/// The probe that recovered a weak key offline: one unauthenticated exchange used to yield an
/// HMAC of the key over nonces the attacker chose. Now a keyless peer gets one SPAKE2 message
/// (a curve point that, without the key, is indistinguishable from random) and then a refusal.
#[test]
fn a_keyless_peer_gets_a_key_exchange_message_and_a_refusal_only() {
    use mosaic_transport::wire::{Header, Opcode, HEADER_LEN};
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo)).unwrap();
    let mut s = TcpStream::connect(server.uri().trim_start_matches("tcp://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = Header::request(Opcode::Hello, 0, 0, 33).encode().to_vec();
    hello.extend_from_slice(&[0x42; 33]);
    s.write_all(&hello).unwrap();
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let ch = Header::decode(&h, 256).unwrap();
    assert_eq!((ch.opcode, ch.len), (Opcode::Challenge, 33));
    let mut y = [0u8; 33];
    s.read_exact(&mut y).unwrap();
    // A guess at message 1: without the key it cannot open, and the answer is a refusal.
    let mut auth = Header::request(Opcode::Auth, 0, 0, 48).encode().to_vec();
    auth.extend_from_slice(&[7u8; 48]);
    s.write_all(&auth).unwrap();
    s.read_exact(&mut h).unwrap();
    let refused = Header::decode(&h, 256).unwrap();
    assert!(refused.is_error(), "{refused:?}");
    assert_eq!(refused.status, mosaic_transport::Status::AuthFailed as u32);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(rest, b"cluster key mismatch", "nothing else follows the refusal");
    // Two exchanges give two unrelated points: nothing stable to test guesses against.
    let mut s2 = TcpStream::connect(server.uri().trim_start_matches("tcp://")).unwrap();
    s2.write_all(&hello).unwrap();
    let mut h2 = [0u8; HEADER_LEN + 33];
    s2.read_exact(&mut h2).unwrap();
    assert_ne!(&h2[HEADER_LEN..], &y[..]);
}
