//! Entry points for the fuzz targets in `fuzz/` (built only with `--cfg fuzzing`, which
//! `cargo fuzz` sets). Each feeds arbitrary bytes, as if from a hostile peer, into the real
//! code: the server's frame loop, the client's receive path, both handshakes (before the key
//! check, and past it, by a peer that holds the key), the record layer, and the shm ring with a
//! peer that writes its counters and bytes at will.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{client_handshake, server_handshake, ClusterKey, ServerInfo};
use crate::server::{serve_frames, Caller, Echo, ServerConfig};
use crate::stream::ByteStream;
use crate::wire::DEFAULT_MAX_FRAME;
use crate::{Connection, Page, PageWindow, WaitPolicy};

/// A stream whose peer sends `input` and then closes; what we send is dropped.
struct Scripted {
    input: Mutex<(Vec<u8>, usize)>,
}

impl Scripted {
    fn new(data: &[u8]) -> Scripted {
        Scripted { input: Mutex::new((data.to_vec(), 0)) }
    }
}

impl ByteStream for Scripted {
    fn write_all(&self, _bufs: &[&[u8]]) -> io::Result<()> {
        Ok(())
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut g = crate::sync::lock(&self.input);
        let (data, pos) = &mut *g;
        // Hand out at most 7 bytes at a time, so frames arrive split at every boundary.
        let n = buf.len().min(data.len() - *pos).min(7);
        buf[..n].copy_from_slice(&data[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }
    fn wait_readable(&self, _timeout: Duration) -> io::Result<()> {
        Ok(())
    }
    fn shutdown(&self) {}
    fn peer(&self) -> String {
        "fuzz".into()
    }
}

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"fuzzing-cluster-key").expect("long enough")
}

/// Runs the server's frame loop (after authentication) on `data`.
pub fn server_frames(data: &[u8]) {
    let window = Arc::new(PageWindow::new(8).expect("small window"));
    let mut cfg = ServerConfig::new(key()).service(Echo).window(window);
    cfg.max_frame = 64 << 10;
    serve_frames(&cfg, &AtomicBool::new(false), &Scripted::new(data), &Caller { id: 0, peer: "fuzz".into() });
}

/// Runs the server's frame loop with `service` behind it on a stream of Call frames made from
/// `prelude` (method, body) and then from `data`, read as records of a tag byte, a 16-bit
/// length and that many bytes: tag 255 puts the bytes on the stream raw (garbage between
/// frames), any other tag sends them as the body of a call to method `tag % 16`.
pub fn service_frames(service: impl crate::Service, prelude: &[(u64, Vec<u8>)], data: &[u8]) {
    let mut stream = Vec::new();
    let mut id = 1u64;
    let mut call = |stream: &mut Vec<u8>, method: u64, body: &[u8]| {
        let h = crate::wire::Header::request(crate::wire::Opcode::Call, id, method, crate::wire::len32(body));
        stream.extend_from_slice(&h.encode());
        stream.extend_from_slice(body);
        id += 1;
    };
    for (m, body) in prelude {
        call(&mut stream, *m, body);
    }
    let mut rest = data;
    while rest.len() >= 3 {
        let tag = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        if tag == 255 {
            stream.extend_from_slice(body);
        } else {
            call(&mut stream, u64::from(tag % 16), body);
        }
    }
    let mut cfg = ServerConfig::new(key()).service(service);
    cfg.max_frame = 1 << 20;
    let caller = Caller { id: 0, peer: "fuzz".into() };
    // As a connection thread does: the service hears of the end however serving ends.
    let _ended = crate::server::Disconnected(&cfg, &caller);
    serve_frames(&cfg, &AtomicBool::new(false), &Scripted::new(&stream), &caller);
}

/// Issues a call, a page read and a batch on a connection whose server answers with `data`.
pub fn client_responses(data: &[u8]) {
    let info = ServerInfo { window_pages: 8, max_frame: DEFAULT_MAX_FRAME };
    let policy = WaitPolicy::blocking();
    let conn = Connection::new(Box::new(Scripted::new(data)), info, policy, Duration::from_secs(5), None);
    let _ = conn.call(1, b"request");
    let mut page = Page::boxed();
    let _ = conn.read_page(0, &mut page);
    let _ = conn.call_batch(1, &[b"a", b"b"]);
}

/// Runs both sides of the handshake against `data`.
pub fn handshakes(data: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(1);
    let _ = client_handshake(&Scripted::new(data), &key(), crate::Protection::Encrypt, deadline);
    let info = ServerInfo { window_pages: 0, max_frame: DEFAULT_MAX_FRAME };
    let _ = server_handshake(&Scripted::new(data), &key(), info, crate::Protection::None, deadline);
}

/// One end of an in-memory pipe pair (blocking reads spin on the other end's writes; a read
/// returns at most 1000 bytes, so records and frames arrive split).
pub(crate) struct Pipe {
    /// What this end reads (tests may tamper with it).
    pub(crate) rx: Arc<Mutex<std::collections::VecDeque<u8>>>,
    tx: Arc<Mutex<std::collections::VecDeque<u8>>>,
    /// Everything either end sent.
    pub(crate) seen: Arc<Mutex<Vec<u8>>>,
}

/// Two connected pipe ends.
pub(crate) fn pipes() -> (Pipe, Pipe) {
    let (a, b) = (Arc::new(Mutex::new(Default::default())), Arc::new(Mutex::new(Default::default())));
    let seen = Arc::new(Mutex::new(Vec::new()));
    (Pipe { rx: a.clone(), tx: b.clone(), seen: seen.clone() }, Pipe { rx: b, tx: a, seen })
}

impl ByteStream for Pipe {
    fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut q = crate::sync::lock(&self.tx);
        for b in bufs {
            q.extend(b.iter());
            crate::sync::lock(&self.seen).extend_from_slice(b);
        }
        Ok(())
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut q = crate::sync::lock(&self.rx);
        if q.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(q.len()).min(1000);
        for (b, v) in buf.iter_mut().zip(q.drain(..n)) {
            *b = v;
        }
        Ok(n)
    }
    fn wait_readable(&self, _: Duration) -> io::Result<()> {
        std::thread::yield_now();
        Ok(())
    }
    fn shutdown(&self) {}
    fn peer(&self) -> String {
        "pipe".into()
    }
}

/// Reads one handshake frame of opcode `op` from `s` (or nothing, on any failure).
fn frame(s: &dyn ByteStream, deadline: Instant) -> Option<(crate::wire::Header, Vec<u8>)> {
    use crate::wire::{Header, HEADER_LEN};
    let mut h = [0u8; HEADER_LEN];
    crate::stream::read_exact(s, &mut h, WaitPolicy::blocking(), Some(deadline)).ok()?;
    let h = Header::decode(&h, 256).ok()?;
    let mut p = vec![0u8; h.len as usize];
    crate::stream::read_exact(s, &mut p, WaitPolicy::blocking(), Some(deadline)).ok()?;
    Some((h, p))
}

/// Both handshakes against a peer that holds the key and follows the protocol up to the AEAD
/// payloads, which come from `data`: the server's parameter checks get the client's payload
/// (`data` up to its first byte's length), the client's get the server's (the rest).
pub fn handshakes_past_the_key(data: &[u8]) {
    use crate::auth::{noise, spake};
    use crate::wire::{len32, Header, Opcode, FLAG_RESPONSE};
    let split = usize::from(data.first().copied().unwrap_or(0)).min(data.len().saturating_sub(1));
    let (to_server, to_client) = (data.get(1..=split).unwrap_or(&[]), data.get(split + 1..).unwrap_or(&[]));
    let deadline = Instant::now() + Duration::from_secs(2);
    let k = key();
    // The real server, and a client that sends `to_server` as its parameters.
    let (c, s) = pipes();
    let sk = k.clone();
    let server = std::thread::spawn(move || {
        let info = ServerInfo { window_pages: 1, max_frame: DEFAULT_MAX_FRAME };
        server_handshake(&s, &sk, info, crate::Protection::None, deadline)
    });
    let (state, x) = spake(&k);
    let _ = c.write_all(&[&Header::request(Opcode::Hello, 0, 0, len32(&x)).encode(), &x]);
    if let Some((_, y)) = frame(&c, deadline) {
        if let Ok(mut hs) = noise(state, &y, (&x, &y), true) {
            let mut msg = vec![0u8; to_server.len() + 64];
            if let Ok(n) = hs.write_message(to_server, &mut msg) {
                let _ = c.write_all(&[&Header::request(Opcode::Auth, 0, 0, len32(&msg[..n])).encode(), &msg[..n]]);
            }
        }
    }
    if let Ok(Ok(session)) = server.join() {
        // Accepted only a well-formed payload, and granted at least what it asked for.
        assert!(to_server.len() == 2 && to_server[0] == 2 && to_server[1] <= 2, "{to_server:?}");
        assert!(session.protection as u8 >= to_server[1]);
    }
    // The real client, and a server that sends `to_client` as its parameters.
    let (c, s) = pipes();
    let ck = k.clone();
    let client = std::thread::spawn(move || client_handshake(&c, &ck, crate::Protection::Integrity, deadline));
    if let Some((_, x)) = frame(&s, deadline) {
        let (state, y) = spake(&k);
        let ch = Header { flags: FLAG_RESPONSE, ..Header::request(Opcode::Challenge, 0, 0, len32(&y)) };
        let _ = s.write_all(&[&ch.encode(), &y]);
        if let (Ok(mut hs), Some((_, m1))) = (noise(state, &x, (&x, &y), false), frame(&s, deadline)) {
            let mut p = [0u8; 128];
            let mut msg = vec![0u8; to_client.len() + 64];
            if hs.read_message(&m1, &mut p).is_ok() {
                if let Ok(n) = hs.write_message(to_client, &mut msg) {
                    let h = Header::response(&Header::request(Opcode::AuthResult, 0, 0, 0), len32(&msg[..n]));
                    let _ = s.write_all(&[&h.encode(), &msg[..n]]);
                }
            }
        }
    }
    if let Ok(Ok(session)) = client.join() {
        assert_eq!(to_client.len(), 13, "{to_client:?}");
        assert!(session.protection >= crate::Protection::Integrity);
        assert!((crate::wire::PAGE_SIZE_U32..=crate::wire::MAX_FRAME_LIMIT).contains(&session.info.max_frame));
    }
}

/// The record layer opening what a hostile peer sends: records sealed with the right key from
/// the first half of `data`, then the rest of `data` as raw bytes. Only bytes of the sealed
/// records are ever handed on, in order.
pub fn records(data: &[u8]) {
    use crate::secure::{RecordKeys, SecureStream};
    let half = data.len() / 2;
    let keys = RecordKeys { send: [1; 32], recv: [2; 32] };
    let (a, b) = pipes();
    let sender =
        SecureStream::new(Arc::new(a), crate::Protection::Encrypt, &RecordKeys { send: [2; 32], recv: [1; 32] });
    let _ = sender.write_all(&[&data[..half]]);
    // The raw rest follows the sealed records.
    b.inject(&data[half..]);
    let receiver = SecureStream::new(Arc::new(b), crate::Protection::Encrypt, &keys);
    let mut got = Vec::new();
    let mut buf = [0u8; 977];
    loop {
        match receiver.try_read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(data[..half].starts_with(&got), "only sealed bytes come out, in order");
    assert_eq!(got.len(), half, "every sealed byte comes out before the garbage is refused");
}

impl Pipe {
    /// Puts `bytes` after what this end will read.
    fn inject(&self, bytes: &[u8]) {
        crate::sync::lock(&self.rx).extend(bytes.iter());
    }
}

/// The shm ring driven by a script: our pushes and pops interleaved with a hostile peer's
/// writes to the shared counters and bytes. No access goes outside the ring, pushes and pops
/// never return more than asked, and a counter out of bounds is always refused.
pub fn shm_ring(data: &[u8]) {
    use crate::shm::ring::{RawBytes, Ring, RingEnd, RingHeader};
    use std::sync::atomic::Ordering;
    let hdr = RingHeader::new();
    let mut store = vec![0u8; 64];
    let (prod, cons) = (RingEnd::new(), RingEnd::new());
    let bytes = |store: &mut Vec<u8>| RawBytes { ptr: store.as_mut_ptr(), cap: 64 };
    let mut buf = [0u8; 200];
    for op in data.chunks(9) {
        let arg = u64::from_le_bytes({
            let mut b = [0u8; 8];
            b[..op.len() - 1].copy_from_slice(&op[1..]);
            b
        });
        let n = usize::try_from(arg % 200).unwrap_or(0);
        match op[0] % 5 {
            0 => {
                let r = Ring::new(&hdr, bytes(&mut store), &prod).push(&buf[..n]);
                assert!(r.is_err() || r.is_ok_and(|k| k <= n));
            }
            1 => {
                let r = Ring::new(&hdr, bytes(&mut store), &cons).pop(&mut buf[..n]);
                assert!(r.is_err() || r.is_ok_and(|k| k <= n));
            }
            2 => hdr.tail.0.store(arg, Ordering::Release),
            3 => hdr.head.0.store(arg, Ordering::Release),
            _ => store[n % 64] = u8::try_from(op.len()).unwrap_or(0),
        }
    }
}

/// The RDMA set-up exchange as a hostile peer writes it: whatever parses is within the limits
/// the verbs and the one-sided address arithmetic rely on, and encodes back to the same bytes.
pub fn rdma_setup(data: &[u8]) {
    use crate::rdma_wire::{self, SETUP_LEN, WINDOW_LEN};
    let (setup, rest) = data.split_at(data.len().min(SETUP_LEN));
    if let Ok(qp) = rdma_wire::parse_setup(setup) {
        assert!(qp.qpn < 1 << 24 && qp.psn < 1 << 24 && (1..=5).contains(&qp.mtu));
        assert_eq!(&rdma_wire::encode_setup(&qp)[..], setup);
    }
    let (announced, win) = match rest.split_first() {
        Some((a, w)) => (u64::from(*a % 4), &w[..w.len().min(WINDOW_LEN)]),
        None => (0, rest),
    };
    if let Ok(w) = rdma_wire::parse_window(win, announced) {
        assert_eq!(w.pages, announced);
        let last = w.pages.saturating_sub(1) * crate::PAGE_SIZE as u64;
        assert!(w.pages == 0 || w.addr.checked_add(last + crate::PAGE_SIZE as u64).is_some());
        assert_eq!(&rdma_wire::encode_window(&w)[..], win);
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz entry points run on a few inputs in the normal test suite too, so they cannot
    /// rot between fuzzing runs.
    #[test]
    fn fuzz_entry_points_survive_samples() {
        let mut valid = crate::wire::Header::request(crate::wire::Opcode::Call, 1, 1, 3).encode().to_vec();
        valid.extend_from_slice(b"abc");
        // A fuzzer find: an error response cut short used to hang the client.
        let mut cut = crate::wire::Header::error_response(
            &crate::wire::Header::request(crate::wire::Opcode::Call, 1, 0, 0),
            0xff00,
            34,
        )
        .encode()
        .to_vec();
        cut.push(b'\'');
        for data in [&b""[..], b"garbage", &valid, &[0xFF; 100], &cut] {
            super::server_frames(data);
            super::client_responses(data);
            super::handshakes(data);
            super::handshakes_past_the_key(data);
            super::records(data);
            super::shm_ring(data);
        }
        // Well-formed payloads past the key are accepted.
        super::handshakes_past_the_key(&[2, 2, 1]);
    }
}
