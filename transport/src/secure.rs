//! What protects the frames after the handshake, and the record layer that applies it.
//!
//! With [`Protection::Integrity`] or [`Protection::Encrypt`], the byte stream of each direction
//! is cut into records of at most [`RECORD_MAX`] bytes:
//!
//! ```text
//! | len: u32 LE | len bytes (plaintext, or ciphertext) | 16-byte AES-GCM tag |
//! ```
//!
//! Each direction has its own AES-256-GCM key (ring's implementation) from the handshake ([`RecordKeys`]) and a 64-bit
//! record counter, starting at zero, as the nonce (Noise's layout: four zero bytes, then the
//! counter little-endian). The receiver expects the next counter, so a record replayed, reordered,
//! dropped or injected fails to open; so does any change to a length or a byte, and a record cut
//! short. A stream cut at a record boundary looks like the peer closing the connection: the
//! requests waiting on it fail as disconnected, and nothing unauthenticated is delivered. With `Encrypt` the
//! record's bytes are encrypted and the length header is authenticated data; with `Integrity` they
//! travel in clear and the tag covers the header and the bytes (GCM with no plaintext, i.e. GMAC).
//! A record that fails to open closes the connection with an error; nothing of it is handed on.
//!
//! The layer is a [`ByteStream`] around another one, so framing, requests and the server loop
//! work unchanged above it.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

use crate::stream::ByteStream;
use crate::sync::lock;

/// What protects the frames of a connection after its handshake. The handshake itself always
/// proves the cluster key, whatever the protection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Protection {
    /// Frames travel as they are: for trusted fabrics, and the same host (loopback tcp, shm),
    /// where only the kernel sits between the two processes.
    None = 0,
    /// Every record carries an AES-GCM tag over its bytes: tampering, injection, replay and
    /// truncation are detected; the contents travel in clear.
    Integrity = 1,
    /// Every record is encrypted and authenticated with AES-256-GCM.
    #[default]
    Encrypt = 2,
}

/// The environment variable that sets the protection a client asks for: `auto` (the default:
/// `encrypt` between hosts, `none` on the same host), `none`, `integrity` or `encrypt`.
pub const PROTECTION_ENV: &str = "MOSAIC_PROTECTION";

impl Protection {
    /// From its wire value.
    pub(crate) fn from_u8(v: u8) -> Option<Protection> {
        Some(match v {
            0 => Protection::None,
            1 => Protection::Integrity,
            2 => Protection::Encrypt,
            _ => return None,
        })
    }

    /// Parses `auto` (as `Ok(None)`), `none`, `integrity` or `encrypt`.
    pub fn parse(s: &str) -> Result<Option<Protection>, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(None),
            "none" => Ok(Some(Protection::None)),
            "integrity" => Ok(Some(Protection::Integrity)),
            "encrypt" => Ok(Some(Protection::Encrypt)),
            other => Err(format!("unknown protection {other:?}: use auto, none, integrity or encrypt")),
        }
    }

    /// The protection [`PROTECTION_ENV`] asks for (`None`: automatic). A value that does not
    /// parse is reported on the log and taken as `encrypt`, never as less.
    pub fn from_env() -> Option<Protection> {
        let v = std::env::var(PROTECTION_ENV).ok()?;
        Protection::parse(&v).unwrap_or_else(|e| {
            log::error!("{PROTECTION_ENV}: {e}; using encrypt");
            Some(Protection::Encrypt)
        })
    }

    /// The automatic choice for a connection: encrypted between hosts, plain on the same host.
    pub(crate) fn auto(same_host: bool) -> Protection {
        if same_host {
            Protection::None
        } else {
            Protection::Encrypt
        }
    }
}

/// One AES-256-GCM key per direction, from the handshake.
#[derive(Clone)]
pub(crate) struct RecordKeys {
    /// Seals what this side sends.
    pub(crate) send: [u8; 32],
    /// Opens what this side receives.
    pub(crate) recv: [u8; 32],
}

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKeys(<redacted>)")
    }
}

/// The most bytes one record carries.
pub(crate) const RECORD_MAX: usize = 1 << 16;
const HEADER: usize = 4;
/// Bytes of a record's tag.
pub(crate) const TAG: usize = 16;
/// Sealed records are handed to the stream below once this many bytes are waiting.
const FLUSH_AT: usize = 1 << 20;

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    // Unique: each key seals or opens each counter value once, in order.
    Nonce::assume_unique_for_key(n)
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key always fits AES-256-GCM.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).unwrap_or_else(|_| unreachable!("a 32-byte AES-256 key")))
}

struct Sender {
    key: LessSafeKey,
    counter: u64,
    out: Vec<u8>,
}

struct Receiver {
    key: LessSafeKey,
    counter: u64,
    /// Bytes read from below: `[start, end)` not yet consumed; opened records are opened in place.
    raw: Vec<u8>,
    start: usize,
    end: usize,
    /// The opened bytes of the current record not yet handed on: `raw[plain.0..plain.1]`.
    plain: (usize, usize),
    /// Set once a record failed to open: the stream is dead.
    failed: Option<String>,
}

/// A [`ByteStream`] whose records are sealed with [`Protection::Integrity`] or
/// [`Protection::Encrypt`] (see the module documentation).
pub(crate) struct SecureStream {
    inner: Arc<dyn ByteStream>,
    encrypt: bool,
    send: Mutex<Sender>,
    recv: Mutex<Receiver>,
}

impl SecureStream {
    /// Wraps `inner`, which has just finished its handshake with `keys`.
    pub(crate) fn new(inner: Arc<dyn ByteStream>, protection: Protection, keys: &RecordKeys) -> SecureStream {
        debug_assert_ne!(protection, Protection::None);
        SecureStream {
            inner,
            encrypt: protection == Protection::Encrypt,
            send: Mutex::new(Sender { key: key(&keys.send), counter: 0, out: Vec::new() }),
            recv: Mutex::new(Receiver {
                key: key(&keys.recv),
                counter: 0,
                raw: vec![0u8; 4 * (HEADER + RECORD_MAX + TAG)],
                start: 0,
                end: 0,
                plain: (0, 0),
                failed: None,
            }),
        }
    }

    fn broken(&self, why: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", self.inner.peer()))
    }
}

impl Sender {
    /// Seals the record that starts at `at` in `out` (a header placeholder, then its bytes) and
    /// appends its tag.
    fn seal_at(&mut self, at: usize, encrypt: bool) -> io::Result<()> {
        let counter = self.counter;
        self.counter = counter
            .checked_add(1)
            .filter(|c| *c < u64::MAX)
            .ok_or_else(|| io::Error::other("record counter exhausted"))?;
        let len = u32::try_from(self.out.len() - at - HEADER).map_err(|_| io::Error::other("record too large"))?;
        self.out[at..at + HEADER].copy_from_slice(&len.to_le_bytes());
        let tag = if encrypt {
            let (head, body) = self.out[at..].split_at_mut(HEADER);
            self.key.seal_in_place_separate_tag(nonce(counter), Aad::from(&*head), body)
        } else {
            // GMAC: the header and the bytes are authenticated data, nothing is encrypted.
            self.key.seal_in_place_separate_tag(nonce(counter), Aad::from(&self.out[at..]), &mut [])
        };
        let tag = tag.map_err(|_| io::Error::other("sealing a record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

impl Receiver {
    /// Opens the record at `start` if it is complete; returns whether one was opened.
    fn open_next(&mut self, encrypt: bool) -> Result<bool, String> {
        let avail = self.end - self.start;
        if avail < HEADER {
            return Ok(false);
        }
        let head: [u8; HEADER] = self.raw[self.start..self.start + HEADER].try_into().unwrap_or_default();
        let len = u32::from_le_bytes(head) as usize;
        if len > RECORD_MAX {
            return Err(format!("record of {len} bytes (at most {RECORD_MAX}): not a Mosaic peer, or tampered with"));
        }
        if avail < HEADER + len + TAG {
            return Ok(false);
        }
        let (at, body_at, tag_at) = (self.start, self.start + HEADER, self.start + HEADER + len);
        let mut t = [0u8; TAG];
        t.copy_from_slice(&self.raw[tag_at..tag_at + TAG]);
        let tag = Tag::from(t);
        let n = nonce(self.counter);
        let opened = if encrypt {
            let (head, rest) = self.raw[at..tag_at].split_at_mut(HEADER);
            self.key.open_in_place_separate_tag(n, Aad::from(&*head), tag, rest, 0..).map(|_| ())
        } else {
            self.key.open_in_place_separate_tag(n, Aad::from(&self.raw[at..tag_at]), tag, &mut [], 0..).map(|_| ())
        };
        opened.map_err(|_| {
            format!("record {} failed authentication (tampered with, injected or replayed)", self.counter)
        })?;
        self.counter += 1;
        self.plain = (body_at, tag_at);
        self.start = tag_at + TAG;
        Ok(true)
    }

    /// Makes room at the end of `raw` for at least one whole record.
    fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.raw.len() - self.end < HEADER + RECORD_MAX + TAG {
            self.raw.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

impl ByteStream for SecureStream {
    fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut guard = lock(&self.send);
        let s = &mut *guard;
        s.out.clear();
        // Where the record being filled starts in `out` (its header is a placeholder until sealed).
        let mut open: Option<usize> = None;
        for buf in bufs {
            let mut rest: &[u8] = buf;
            while !rest.is_empty() {
                let at = *open.get_or_insert_with(|| {
                    s.out.extend_from_slice(&[0u8; HEADER]);
                    s.out.len() - HEADER
                });
                let filled = s.out.len() - at - HEADER;
                let take = rest.len().min(RECORD_MAX - filled);
                s.out.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if filled + take == RECORD_MAX {
                    s.seal_at(at, self.encrypt)?;
                    open = None;
                    if s.out.len() >= FLUSH_AT {
                        self.inner.write_all(&[&s.out])?;
                        s.out.clear();
                    }
                }
            }
        }
        if let Some(at) = open {
            s.seal_at(at, self.encrypt)?;
        }
        if !s.out.is_empty() {
            self.inner.write_all(&[&s.out])?;
        }
        if s.out.capacity() > 4 * FLUSH_AT {
            s.out = Vec::new();
        }
        Ok(())
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut r = lock(&self.recv);
        if let Some(why) = &r.failed {
            return Err(self.broken(why));
        }
        loop {
            let (a, b) = r.plain;
            if a < b {
                let n = buf.len().min(b - a);
                buf[..n].copy_from_slice(&r.raw[a..a + n]);
                r.plain.0 += n;
                return Ok(n);
            }
            match r.open_next(self.encrypt) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(why) => {
                    log::warn!("closing {}: {why}", self.inner.peer());
                    r.failed = Some(why.clone());
                    self.inner.shutdown();
                    return Err(self.broken(&why));
                }
            }
            r.compact();
            let end = r.end;
            match self.inner.try_read(&mut r.raw[end..]) {
                Ok(0) if r.start < r.end => {
                    let why = "the peer closed the connection in the middle of a record".to_string();
                    r.failed = Some(why.clone());
                    return Err(self.broken(&why));
                }
                Ok(0) => return Ok(0),
                Ok(n) => r.end += n,
                Err(e) => return Err(e),
            }
        }
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        self.inner.wait_readable(timeout)
    }

    fn shutdown(&self) {
        self.inner.shutdown();
    }

    fn peer(&self) -> String {
        self.inner.peer()
    }

    fn peer_hung_up(&self) -> bool {
        self.inner.peer_hung_up()
    }

    fn is_same_host(&self) -> bool {
        self.inner.is_same_host()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::pipes;
    use std::collections::VecDeque;

    type Wire = Arc<Mutex<VecDeque<u8>>>;

    /// Two ends sealing with matching keys, and the bytes in flight from the first to the second.
    fn pair(p: Protection) -> (SecureStream, SecureStream, Wire) {
        let (x, y) = pipes();
        let wire = y.rx.clone();
        let k = RecordKeys { send: [1; 32], recv: [2; 32] };
        let k2 = RecordKeys { send: [2; 32], recv: [1; 32] };
        (SecureStream::new(Arc::new(x), p, &k), SecureStream::new(Arc::new(y), p, &k2), wire)
    }

    fn read_all(s: &SecureStream, n: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match s.try_read(&mut out[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        out.truncate(got);
        Ok(out)
    }

    #[test]
    fn bytes_arrive_whole_in_both_modes_and_encrypt_hides_them() {
        for p in [Protection::Integrity, Protection::Encrypt] {
            let (a, b, wire) = pair(p);
            let big: Vec<u8> = (0..3 * RECORD_MAX + 17).map(|i| (i % 251) as u8).collect();
            a.write_all(&[b"hello ", b"world", &big]).unwrap();
            let on_wire: Vec<u8> = lock(&wire).iter().copied().collect();
            let clear = on_wire.windows(11).any(|w| w == b"hello world");
            assert_eq!(clear, p == Protection::Integrity, "{p:?}: plaintext visible on the wire: {clear}");
            let got = read_all(&b, 11 + big.len()).unwrap();
            assert_eq!(&got[..11], b"hello world");
            assert_eq!(&got[11..], &big[..]);
        }
    }

    #[test]
    fn tampering_injection_replay_and_truncation_are_refused() {
        for p in [Protection::Integrity, Protection::Encrypt] {
            // A flipped byte.
            let (a, b, wire) = pair(p);
            a.write_all(&[b"page contents"]).unwrap();
            lock(&wire)[6] ^= 1;
            assert_eq!(read_all(&b, 13).unwrap_err().kind(), io::ErrorKind::InvalidData, "{p:?}");
            assert!(b.try_read(&mut [0u8; 4]).is_err(), "{p:?}: a failed stream stays failed");
            // A replayed record.
            let (a, b, wire) = pair(p);
            a.write_all(&[b"once"]).unwrap();
            let rec: Vec<u8> = lock(&wire).iter().copied().collect();
            assert_eq!(read_all(&b, 4).unwrap(), b"once");
            lock(&wire).extend(rec);
            assert!(read_all(&b, 4).is_err(), "{p:?}: replay");
            // An injected record sealed with another key.
            let (_, b, wire) = pair(p);
            let (f, sink) = pipes();
            let xwire = sink.rx.clone();
            let other = RecordKeys { send: [9; 32], recv: [9; 32] };
            let forger = SecureStream::new(Arc::new(f), p, &other);
            forger.write_all(&[b"forged reply"]).unwrap();
            let forged: Vec<u8> = lock(&xwire).iter().copied().collect();
            lock(&wire).extend(forged);
            assert!(read_all(&b, 12).is_err(), "{p:?}: injection");
            // A length beyond the record limit.
            let (_, b, wire) = pair(p);
            lock(&wire).extend([0xff, 0xff, 0xff, 0xff, 0, 0]);
            assert!(read_all(&b, 1).is_err(), "{p:?}: absurd length");
        }
    }
}

#[cfg(test)]
mod measure {
    use super::*;

    /// AES-256-GCM costs of the record layer on this machine: sealing a 64 B and a 4 KiB record,
    /// encrypted and integrity-only (GMAC).
    /// `cargo test --release -p mosaic-transport --lib seal_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check: run by hand"]
    fn seal_cost() {
        let mut s = Sender { key: key(&[3u8; 32]), counter: 0, out: Vec::new() };
        for size in [64usize, 4096] {
            for (what, encrypt) in [("encrypt", true), ("integrity", false)] {
                let n = 20_000;
                let data = vec![7u8; size];
                let t = std::time::Instant::now();
                for _ in 0..n {
                    s.out.clear();
                    s.out.extend_from_slice(&[0u8; HEADER]);
                    s.out.extend_from_slice(&data);
                    s.seal_at(0, encrypt).unwrap();
                }
                let secs = t.elapsed().as_secs_f64();
                println!(
                    "{what} {size} B: {:.3} us per record, {:.0} MB/s",
                    secs / f64::from(n) * 1e6,
                    f64::from(n) * size as f64 / secs / 1e6
                );
            }
        }
    }
}
