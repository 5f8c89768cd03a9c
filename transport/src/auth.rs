//! The cluster key, and the handshake every connection starts with: a PAKE over the key, then a
//! Noise handshake keyed by its result.
//!
//! ```text
//! client                                              server
//!   Hello      { X }                             ->          X, Y: SPAKE2 messages (symmetric,
//!             <-  Challenge { Y }                            Ed25519 group) over the cluster key
//!   both: K = SPAKE2(key; X, Y), 32 bytes, equal only if both hold the key
//!   Auth       { Noise 1: e, AEAD(wish) }         ->         Noise_NNpsk0_25519_AESGCM_SHA256,
//!             <-  AuthResult { Noise 2: e, ee, AEAD(granted, window_pages, max_frame) }
//!                 (or, if Noise 1 does not open: an AuthFailed error, then close)
//! ```
//! The Noise handshake uses K as its pre-shared key and `"mosaic-v2" | X | Y` as its prologue, so it
//! also confirms the whole exchange. What this gives:
//! - **No offline guessing.** A passive observer, or an active one posing as either side, learns
//!   nothing with which to test guesses of the key offline (that is SPAKE2's property); each
//!   connection attempt tests one guess, online, under the server's handshake limits. (The HMAC
//!   challenge this replaces let anyone who connected test guesses of a weak key offline.)
//! - **Both sides prove the key.** The server opens Noise message 1 before it sends anything that
//!   depends on K; the client opens message 2 before it believes anything the server says.
//! - **Authenticated parameters.** The client's wished [`Protection`], and the server's granted
//!   protection, page window and maximum frame travel inside the AEAD payloads.
//! - **Session keys** for the frames that follow ([`RecordKeys`]: Noise's split, one AES-256-GCM key
//!   per direction, fresh for every connection through the ephemeral Diffie-Hellman).
//!
//! SPAKE2 is the RustCrypto `spake2` crate, Noise the `snow` crate.

use std::fmt;
use std::path::Path;
use std::time::Instant;

use spake2::{Ed25519Group, Identity, Password, Spake2};
use thiserror::Error;

use crate::secure::{Protection, RecordKeys};
use crate::stream::{read_exact, ByteStream, ReadStop, WaitPolicy};
use crate::sys;
use crate::wire::{len32, FrameError, Header, Opcode, Status, HEADER_LEN, MAX_FRAME_LIMIT, PAGE_SIZE_U32};

/// Environment variable holding the cluster key itself.
pub const KEY_ENV: &str = "MOSAIC_CLUSTER_KEY";
/// Environment variable naming a file that holds the cluster key.
pub const KEY_FILE_ENV: &str = "MOSAIC_CLUSTER_KEY_FILE";
/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// Handshake frames are tiny; anything larger is hostile.
const HANDSHAKE_MAX_FRAME: u32 = 256;
/// The Noise protocol of the second half.
const NOISE: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// SPAKE2's identity string, and the start of Noise's prologue: the protocol and its version.
const LABEL: &[u8] = b"mosaic-v2";
/// A SPAKE2 message (Ed25519 group): a one-byte side marker and a compressed point.
const SPAKE2_MSG_LEN: usize = 33;
/// The client's payload in Noise message 1: the protocol version and the protection wished.
const CLIENT_PARAMS_LEN: usize = 2;
/// The server's payload in Noise message 2: protection granted, page window, maximum frame.
const SERVER_PARAMS_LEN: usize = 1 + 8 + 4;
/// Version of the handshake payloads.
const PARAMS_VERSION: u8 = 2;

/// The secret every member of a cluster shares. Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(<{} bytes redacted>)", self.0.len())
    }
}

/// Why a cluster key could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is shorter than [`MIN_KEY_LEN`] bytes.
    #[error("cluster key is {0} bytes; at least {MIN_KEY_LEN} are required")]
    TooShort(usize),
    /// The key file could not be read.
    #[error("cannot read cluster key file {path}")]
    File {
        /// The file named.
        path: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's random source failed.
    #[error("cannot read random bytes for a cluster key")]
    Random(#[source] std::io::Error),
    /// Neither environment variable is set.
    #[error("no cluster key: set {KEY_ENV} or {KEY_FILE_ENV}")]
    Missing,
}

impl ClusterKey {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<ClusterKey, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(ClusterKey(bytes.to_vec()))
    }

    /// A key read from a file; one trailing newline is ignored.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClusterKey, KeyError> {
        let path = path.as_ref();
        let mut bytes =
            std::fs::read(path).map_err(|source| KeyError::File { path: path.display().to_string(), source })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        ClusterKey::from_bytes(&bytes)
    }

    /// The key from `MOSAIC_CLUSTER_KEY`, else from the file named by `MOSAIC_CLUSTER_KEY_FILE`.
    pub fn from_env() -> Result<ClusterKey, KeyError> {
        if let Some(v) = std::env::var_os(KEY_ENV) {
            return ClusterKey::from_bytes(v.as_encoded_bytes());
        }
        if let Some(p) = std::env::var_os(KEY_FILE_ENV) {
            return ClusterKey::from_file(p);
        }
        Err(KeyError::Missing)
    }

    /// A fresh key as 64 hex characters (32 bytes from the kernel's random source), fit for
    /// `MOSAIC_CLUSTER_KEY`: for a run that starts its own servers and hands them the key.
    pub fn random_text() -> Result<String, KeyError> {
        let mut k = [0u8; 32];
        sys::random_bytes(&mut k).map_err(KeyError::Random)?;
        Ok(k.iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// What the server told the client in the handshake (authenticated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// Pages in the server's one-sided window (0: none).
    pub window_pages: u64,
    /// The largest payload the server accepts in one frame.
    pub max_frame: u32,
}

/// Why the handshake failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer proved a different cluster key (or none).
    #[error("cluster key mismatch: the peer does not hold this cluster's key")]
    WrongKey,
    /// The peers hold the key but disagree on the protection of the frames (a server that
    /// grants less than the client asked for).
    #[error("protection refused: asked for {wished:?}, the server granted {granted:?}")]
    Protection {
        /// What the client asked for.
        wished: Protection,
        /// What the server granted.
        granted: Protection,
    },
    /// The peer sent a frame that is not the expected handshake step.
    #[error("unexpected handshake frame: {0}")]
    Unexpected(String),
    /// The peer sent a malformed frame.
    #[error("malformed handshake frame")]
    Frame(#[from] FrameError),
    /// The peer closed the connection during the handshake.
    #[error("peer closed the connection during the handshake")]
    Closed,
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    TimedOut,
    /// The stream failed.
    #[error("I/O error during the handshake")]
    Io(#[from] std::io::Error),
}

impl From<ReadStop> for HandshakeError {
    fn from(s: ReadStop) -> Self {
        match s {
            ReadStop::Eof => HandshakeError::Closed,
            ReadStop::TimedOut => HandshakeError::TimedOut,
            ReadStop::Io(e) => HandshakeError::Io(e),
        }
    }
}

fn read_frame(
    s: &dyn ByteStream,
    expect: Opcode,
    policy: WaitPolicy,
    deadline: Instant,
) -> Result<(Header, Vec<u8>), HandshakeError> {
    let mut hb = [0u8; HEADER_LEN];
    read_exact(s, &mut hb, policy, Some(deadline))?;
    let h = Header::decode(&hb, HANDSHAKE_MAX_FRAME)?;
    if h.opcode != expect {
        return Err(HandshakeError::Unexpected(format!("expected {expect:?}, got {:?}", h.opcode)));
    }
    let mut payload = vec![0u8; h.len as usize];
    read_exact(s, &mut payload, policy, Some(deadline))?;
    Ok((h, payload))
}

/// What a finished handshake yields: the server's parameters, the protection both sides apply to
/// the frames that follow, and the keys for it.
#[derive(Debug)]
pub(crate) struct Session {
    /// The server's page window and maximum frame.
    pub(crate) info: ServerInfo,
    /// What protects the frames from here on.
    pub(crate) protection: Protection,
    /// The session's keys (unused with [`Protection::None`]).
    pub(crate) keys: RecordKeys,
}

/// Starts SPAKE2 over `key`: our state and the message to send.
pub(crate) fn spake(key: &ClusterKey) -> (Spake2<Ed25519Group>, Vec<u8>) {
    Spake2::<Ed25519Group>::start_symmetric(&Password::new(&key.0), &Identity::new(LABEL))
}

/// Finishes SPAKE2 with the peer's message and starts Noise keyed by the result.
pub(crate) fn noise(
    state: Spake2<Ed25519Group>,
    theirs: &[u8],
    (x, y): (&[u8], &[u8]),
    initiator: bool,
) -> Result<snow::HandshakeState, HandshakeError> {
    if theirs.len() != SPAKE2_MSG_LEN {
        return Err(HandshakeError::Unexpected(format!("key exchange message of {} bytes", theirs.len())));
    }
    // A malformed point is as good as a wrong key: the peer cannot have followed the protocol.
    let k = state.finish(theirs).map_err(|_| HandshakeError::WrongKey)?;
    let k: [u8; 32] = k.try_into().map_err(|_| HandshakeError::Unexpected("SPAKE2 key of the wrong size".into()))?;
    let mut prologue = LABEL.to_vec();
    prologue.extend_from_slice(x);
    prologue.extend_from_slice(y);
    let params = NOISE.parse().map_err(|e| HandshakeError::Unexpected(format!("noise parameters: {e}")))?;
    let b = snow::Builder::new(params).prologue(&prologue).and_then(|b| b.psk(0, &k));
    let b = b.map_err(|e| HandshakeError::Unexpected(format!("noise set-up: {e}")))?;
    let hs = if initiator { b.build_initiator() } else { b.build_responder() };
    hs.map_err(|e| HandshakeError::Unexpected(format!("noise set-up: {e}")))
}

/// The session keys of a finished Noise handshake, as this side uses them.
pub(crate) fn keys(mut hs: snow::HandshakeState, initiator: bool) -> RecordKeys {
    let (i2r, r2i) = hs.dangerously_get_raw_split();
    if initiator {
        RecordKeys { send: i2r, recv: r2i }
    } else {
        RecordKeys { send: r2i, recv: i2r }
    }
}

/// Runs the client side of the handshake, asking for `wish` (the server may grant more).
pub(crate) fn client_handshake(
    s: &dyn ByteStream,
    key: &ClusterKey,
    wish: Protection,
    deadline: Instant,
) -> Result<Session, HandshakeError> {
    let policy = WaitPolicy::DEFAULT;
    let (state, x) = spake(key);
    s.write_all(&[&Header::request(Opcode::Hello, 0, 0, len32(&x)).encode(), &x])?;
    let (_, y) = read_frame(s, Opcode::Challenge, policy, deadline)?;
    let mut hs = noise(state, &y, (&x, &y), true)?;
    let mut msg = [0u8; 128];
    let n = hs
        .write_message(&[PARAMS_VERSION, wish as u8], &mut msg)
        .map_err(|e| HandshakeError::Unexpected(format!("noise: {e}")))?;
    s.write_all(&[&Header::request(Opcode::Auth, 0, 0, len32(&msg[..n])).encode(), &msg[..n]])?;
    let (h, reply) = read_frame(s, Opcode::AuthResult, policy, deadline)?;
    if h.is_error() {
        if h.status == Status::AuthFailed as u32 {
            return Err(HandshakeError::WrongKey);
        }
        return Err(HandshakeError::Unexpected(String::from_utf8_lossy(&reply).into_owned()));
    }
    let mut params = [0u8; 128];
    // A message 2 that does not open comes from a server without the key (or was tampered with).
    let n = hs.read_message(&reply, &mut params).map_err(|_| HandshakeError::WrongKey)?;
    if n != SERVER_PARAMS_LEN {
        return Err(HandshakeError::Unexpected(format!("server parameters of {n} bytes")));
    }
    let granted = Protection::from_u8(params[0])
        .ok_or_else(|| HandshakeError::Unexpected(format!("protection {}", params[0])))?;
    if granted < wish {
        return Err(HandshakeError::Protection { wished: wish, granted });
    }
    let window_pages = u64::from_le_bytes(params[1..9].try_into().unwrap_or_default());
    // A server's own limit is within these bounds; a value outside them is not believed (it
    // would let responses of any size be read, or no request be sent).
    let max_frame =
        u32::from_le_bytes(params[9..13].try_into().unwrap_or_default()).clamp(PAGE_SIZE_U32, MAX_FRAME_LIMIT);
    Ok(Session { info: ServerInfo { window_pages, max_frame }, protection: granted, keys: keys(hs, true) })
}

/// Runs the server side of the handshake: grants the client's wish, or `min` if that is more.
pub(crate) fn server_handshake(
    s: &dyn ByteStream,
    key: &ClusterKey,
    info: ServerInfo,
    min: Protection,
    deadline: Instant,
) -> Result<Session, HandshakeError> {
    let policy = WaitPolicy::DEFAULT;
    let (_, x) = read_frame(s, Opcode::Hello, policy, deadline)?;
    if x.len() != SPAKE2_MSG_LEN {
        return Err(HandshakeError::Unexpected(format!("key exchange message of {} bytes", x.len())));
    }
    let (state, y) = spake(key);
    let ch = Header { flags: crate::wire::FLAG_RESPONSE, ..Header::request(Opcode::Challenge, 0, 0, len32(&y)) };
    s.write_all(&[&ch.encode(), &y])?;
    let (_, msg1) = read_frame(s, Opcode::Auth, policy, deadline)?;
    let refuse = |why: HandshakeError| {
        let msg = b"cluster key mismatch";
        let result = Header::request(Opcode::AuthResult, 0, 0, 0);
        let h = Header::error_response(&result, Status::AuthFailed as u32, len32(msg));
        let _ = s.write_all(&[&h.encode(), msg]);
        why
    };
    let mut hs = match noise(state, &x, (&x, &y), false) {
        Ok(hs) => hs,
        Err(HandshakeError::WrongKey) => return Err(refuse(HandshakeError::WrongKey)),
        Err(e) => return Err(e),
    };
    let mut params = [0u8; 128];
    let n = match hs.read_message(&msg1, &mut params) {
        Ok(n) => n,
        Err(_) => return Err(refuse(HandshakeError::WrongKey)),
    };
    if n != CLIENT_PARAMS_LEN || params[0] != PARAMS_VERSION {
        return Err(HandshakeError::Unexpected(format!("client parameters of {n} bytes, version {}", params[0])));
    }
    let wish = Protection::from_u8(params[1])
        .ok_or_else(|| HandshakeError::Unexpected(format!("protection {}", params[1])))?;
    let granted = wish.max(min);
    let mut out = [0u8; SERVER_PARAMS_LEN];
    out[0] = granted as u8;
    out[1..9].copy_from_slice(&info.window_pages.to_le_bytes());
    out[9..13].copy_from_slice(&info.max_frame.to_le_bytes());
    let mut msg2 = [0u8; 128];
    let n = hs.write_message(&out, &mut msg2).map_err(|e| HandshakeError::Unexpected(format!("noise: {e}")))?;
    let h = Header::response(&Header::request(Opcode::AuthResult, 0, 0, 0), len32(&msg2[..n]));
    s.write_all(&[&h.encode(), &msg2[..n]])?;
    Ok(Session { info, protection: granted, keys: keys(hs, false) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused() {
        assert!(matches!(ClusterKey::from_bytes(b"short"), Err(KeyError::TooShort(5))));
        assert!(ClusterKey::from_bytes(&[7u8; MIN_KEY_LEN]).is_ok());
    }

    #[test]
    fn random_keys_are_hex_and_differ() {
        let (a, b) = (ClusterKey::random_text().unwrap(), ClusterKey::random_text().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(ClusterKey::from_bytes(a.as_bytes()).is_ok());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = ClusterKey::from_bytes(b"super-secret-cluster-key").unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn key_file_drops_one_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("mosaic-key-{}", std::process::id()));
        std::fs::write(&dir, b"0123456789abcdef\n").unwrap();
        let k = ClusterKey::from_file(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(k.0, b"0123456789abcdef");
        assert!(matches!(ClusterKey::from_file("/nonexistent/key"), Err(KeyError::File { .. })));
    }

    use crate::fuzzing::pipes;

    fn shake(
        ck: &ClusterKey,
        sk: &ClusterKey,
        wish: Protection,
        min: Protection,
    ) -> (Result<Session, HandshakeError>, Result<Session, HandshakeError>, Vec<u8>) {
        let (c, srv) = pipes();
        let seen = c.seen.clone();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let info = ServerInfo { window_pages: 7, max_frame: 1 << 20 };
        let sk = sk.clone();
        let t = std::thread::spawn(move || server_handshake(&srv, &sk, info, min, deadline));
        let client = client_handshake(&c, ck, wish, deadline);
        let server = t.join().unwrap();
        let seen = seen.lock().unwrap().clone();
        (client, server, seen)
    }

    #[test]
    fn the_same_key_agrees_on_keys_parameters_and_protection() {
        let k = ClusterKey::from_bytes(b"handshake-test-cluster-key").unwrap();
        let (c, s, seen) = shake(&k, &k, Protection::Integrity, Protection::None);
        let (c, s) = (c.unwrap(), s.unwrap());
        assert_eq!(c.info, ServerInfo { window_pages: 7, max_frame: 1 << 20 });
        assert_eq!((c.protection, s.protection), (Protection::Integrity, Protection::Integrity));
        assert_eq!(c.keys.send, s.keys.recv);
        assert_eq!(c.keys.recv, s.keys.send);
        assert_ne!(c.keys.send, c.keys.recv);
        // The key never travels, nor anything that contains it in the clear.
        assert!(!seen.windows(8).any(|w| w == &b"handshake-test-cluster-key"[..8]));
        // A server that demands more gets it.
        let (c, _, _) = shake(&k, &k, Protection::None, Protection::Encrypt);
        assert_eq!(c.unwrap().protection, Protection::Encrypt);
        // Every connection has fresh keys.
        let (c2, _, _) = shake(&k, &k, Protection::Integrity, Protection::None);
        let (c3, _, _) = shake(&k, &k, Protection::Integrity, Protection::None);
        assert_ne!(c2.unwrap().keys.send, c3.unwrap().keys.send);
    }

    #[test]
    fn different_keys_fail_on_both_sides() {
        let a = ClusterKey::from_bytes(b"handshake-test-cluster-key").unwrap();
        let b = ClusterKey::from_bytes(b"handshake-test-cluster-kez").unwrap();
        let (c, s, _) = shake(&a, &b, Protection::Encrypt, Protection::None);
        assert!(matches!(c, Err(HandshakeError::WrongKey)), "{c:?}");
        assert!(matches!(s, Err(HandshakeError::WrongKey)), "{s:?}");
    }
}
