//! Every class of malformed frame, sent to a real server and to a real client, on every
//! byte-stream back-end: each must close that connection with a typed, logged error, never panic,
//! never hang, and leave the other connections alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{client_handshake, server_handshake, ClusterKey, ServerInfo};
use crate::server::{Acceptor, Echo, ServerConfig};
use crate::stream::{read_some, ByteStream, ReadStop, WaitPolicy};
use crate::wire::{Header, Opcode, DEFAULT_MAX_FRAME, FLAG_RESPONSE, HEADER_LEN, PAGE_SIZE_U32};
use crate::{listen, CallError, Connection, Page, PageWindow};

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"malformed-frame-test-key").unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Tcp,
    Shm,
}

const KINDS: [Kind; 2] = [Kind::Tcp, Kind::Shm];

fn unique_shm() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("malformed-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn raw_connect(kind: Kind, uri: &str) -> Box<dyn ByteStream> {
    let t = Duration::from_secs(5);
    match kind {
        Kind::Tcp => Box::new(crate::tcp::TcpByteStream::connect(uri.trim_start_matches("tcp://"), t).unwrap()),
        Kind::Shm => {
            Box::new(crate::shm::connect(uri.trim_start_matches("shm://"), t, &crate::LocalPeers::SameUser).unwrap())
        }
    }
}

fn raw_acceptor(kind: Kind) -> Box<dyn Acceptor> {
    match kind {
        Kind::Tcp => Box::new(crate::tcp::TcpAcceptor::bind("127.0.0.1:0").unwrap()),
        Kind::Shm => Box::new(crate::shm::ShmAcceptor::bind(&unique_shm(), crate::LocalPeers::SameUser).unwrap()),
    }
}

fn bind_uri(kind: Kind) -> String {
    match kind {
        Kind::Tcp => "tcp://127.0.0.1:0".into(),
        Kind::Shm => format!("shm://{}", unique_shm()),
    }
}

/// Reads until the peer closes (true) or 5 s pass (false), discarding bytes.
fn closed_by_peer(s: &dyn ByteStream) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    loop {
        match read_some(s, &mut buf, WaitPolicy::blocking(), Some(deadline)) {
            Ok(_) => continue,
            Err(ReadStop::Eof) | Err(ReadStop::Io(_)) => return true,
            Err(ReadStop::TimedOut) => return false,
        }
    }
}

fn header_bytes(op: Opcode, flags: u16, len: u32) -> [u8; HEADER_LEN] {
    Header { opcode: op, flags, request_id: 1, arg: 0, len, status: 0 }.encode()
}

/// Malformed frames a client might send, after authenticating.
fn bad_requests() -> Vec<(&'static str, Vec<u8>)> {
    let good = header_bytes(Opcode::Call, 0, 0);
    let mut magic = good;
    magic[0] = b'X';
    let mut version = good;
    version[4] = 99;
    let mut opcode = good;
    opcode[5] = 0xEE;
    let mut flags = good;
    flags[7] = 0x40;
    vec![
        ("bad magic", magic.to_vec()),
        ("bad version", version.to_vec()),
        ("unknown opcode", opcode.to_vec()),
        ("unknown flags", flags.to_vec()),
        ("oversized", header_bytes(Opcode::Call, 0, u32::MAX).to_vec()),
        ("read page with a body", header_bytes(Opcode::ReadPage, 0, 1).to_vec()),
        ("short page write", header_bytes(Opcode::WritePage, 0, 100).to_vec()),
        ("response from a client", header_bytes(Opcode::Call, FLAG_RESPONSE, 0).to_vec()),
        ("handshake after auth", header_bytes(Opcode::Hello, 0, 32).to_vec()),
    ]
}

#[test]
fn server_closes_connections_that_send_malformed_frames() {
    for kind in KINDS {
        let window = Arc::new(PageWindow::new(4).unwrap());
        let server = listen(&bind_uri(kind), ServerConfig::new(key()).service(Echo).window(window)).unwrap();
        for (what, bytes) in bad_requests() {
            let s = raw_connect(kind, server.uri());
            client_handshake(&*s, &key(), crate::Protection::None, Instant::now() + Duration::from_secs(5)).unwrap();
            s.write_all(&[&bytes, &[0u8; 64]]).unwrap();
            assert!(closed_by_peer(&*s), "{kind:?}: server kept a connection that sent {what}");
        }
        // A frame cut short by a disconnect, and garbage or a request before the handshake.
        let s = raw_connect(kind, server.uri());
        client_handshake(&*s, &key(), crate::Protection::None, Instant::now() + Duration::from_secs(5)).unwrap();
        s.write_all(&[&header_bytes(Opcode::Call, 0, 100)[..20]]).unwrap();
        drop(s);
        let s = raw_connect(kind, server.uri());
        s.write_all(&[b"GET / HTTP/1.1\r\n\r\n and then some more bytes"]).unwrap();
        assert!(closed_by_peer(&*s), "{kind:?}: garbage before the handshake");
        let s = raw_connect(kind, server.uri());
        s.write_all(&[&header_bytes(Opcode::Call, 0, 0)]).unwrap();
        assert!(closed_by_peer(&*s), "{kind:?}: a call before the handshake");
        // The server still serves a well-behaved client.
        let c = crate::connect(server.uri(), &crate::ConnectOptions::new(key())).unwrap();
        assert_eq!(c.call(1, b"fine").unwrap(), b"fine");
    }
}

/// Starts a fake server that authenticates one client, reads one request and answers `reply`.
fn fake_server(kind: Kind, reply: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let mut acc = raw_acceptor(kind);
    let uri = acc.local_uri();
    let h = std::thread::spawn(move || {
        let s = loop {
            if let Some(s) = acc.accept(Duration::from_millis(50)).unwrap().map(crate::server::Accepted::into_ready) {
                break s;
            }
        };
        let info = ServerInfo { window_pages: 4, max_frame: DEFAULT_MAX_FRAME };
        server_handshake(&*s, &key(), info, crate::Protection::None, Instant::now() + Duration::from_secs(5)).unwrap();
        let mut req = [0u8; HEADER_LEN];
        crate::stream::read_exact(&*s, &mut req, WaitPolicy::blocking(), Some(Instant::now() + Duration::from_secs(5)))
            .unwrap();
        let _ = s.write_all(&[&reply]);
        // Hold the connection open: the client must close it by itself.
        std::thread::sleep(Duration::from_millis(300));
    });
    (uri, h)
}

fn response(op: Opcode, id: u64, len: u32) -> Vec<u8> {
    Header { opcode: op, flags: FLAG_RESPONSE, request_id: id, arg: 0, len, status: 0 }.encode().to_vec()
}

#[test]
fn client_fails_requests_on_malformed_responses() {
    // Request ids start at 1 on a fresh connection.
    let mut bad_magic = response(Opcode::Call, 1, 0);
    bad_magic[0] = 0;
    // An error response whose message is cut short by the server's disconnect (found by the
    // client_responses fuzz target: it used to leave the request unfinished, spinning forever).
    let mut cut_error = Header::error_response(&Header::request(Opcode::Call, 1, 0, 0), 4, 34).encode().to_vec();
    cut_error.push(b'!');
    let cases: Vec<(&str, bool, Vec<u8>)> = vec![
        ("error response cut short", false, cut_error),
        ("bad magic", false, bad_magic),
        ("response to a request never sent", false, response(Opcode::Call, 777, 0)),
        ("a request instead of a response", false, header_bytes(Opcode::Call, 0, 0).to_vec()),
        ("wrong opcode for the request", true, response(Opcode::Call, 1, 0)),
        ("page of the wrong length", true, response(Opcode::ReadPage, 1, 17)),
        ("oversized", false, response(Opcode::Call, 1, u32::MAX)),
    ];
    for kind in KINDS {
        for (what, page_read, reply) in &cases {
            let (uri, h) = fake_server(kind, reply.clone());
            let c = crate::connect(&uri, &crate::ConnectOptions::new(key()).timeout(Duration::from_secs(5))).unwrap();
            let start = Instant::now();
            let r = if *page_read {
                let mut p = Page::boxed();
                c.read_page(0, &mut p).map(|_| Vec::new())
            } else {
                c.call(1, b"x")
            };
            assert!(matches!(r, Err(CallError::Disconnected { .. })), "{kind:?} {what}: {r:?}");
            assert!(start.elapsed() < Duration::from_secs(4), "{kind:?} {what}: took {:?}", start.elapsed());
            assert!(c.is_closed());
            assert!(matches!(c.call(1, b"y"), Err(CallError::Disconnected { .. })));
            h.join().unwrap();
        }
    }
}

#[test]
fn a_valid_but_unexpected_page_response_does_not_corrupt_a_call() {
    // A correct ReadPage response carrying a page, sent to a client that asked for a call:
    // the client must refuse it (opcode mismatch) rather than misread the payload.
    for kind in KINDS {
        let mut reply = response(Opcode::ReadPage, 1, PAGE_SIZE_U32);
        reply.extend_from_slice(&[0xAB; 4096]);
        let (uri, h) = fake_server(kind, reply);
        let c: Connection = crate::connect(&uri, &crate::ConnectOptions::new(key())).unwrap();
        let r = c.call(1, b"x");
        assert!(
            matches!(&r, Err(CallError::Disconnected { reason, .. }) if reason.contains("protocol error")),
            "{r:?}"
        );
        h.join().unwrap();
    }
}

#[test]
fn a_server_announcing_an_absurd_frame_limit_is_not_believed() {
    for (announced, believed) in [(u32::MAX, crate::wire::MAX_FRAME_LIMIT), (0, crate::wire::PAGE_SIZE_U32)] {
        let mut acc = raw_acceptor(Kind::Tcp);
        let uri = acc.local_uri();
        let h = std::thread::spawn(move || {
            let s = loop {
                if let Some(s) = acc.accept(Duration::from_millis(50)).unwrap().map(crate::server::Accepted::into_ready)
                {
                    break s;
                }
            };
            let info = ServerInfo { window_pages: 0, max_frame: announced };
            server_handshake(&*s, &key(), info, crate::Protection::None, Instant::now() + Duration::from_secs(5))
                .unwrap();
        });
        let c = crate::connect(&uri, &crate::ConnectOptions::new(key())).unwrap();
        assert_eq!(c.max_frame(), believed, "announced {announced}");
        h.join().unwrap();
    }
}
