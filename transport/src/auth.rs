//! The cluster key and the mutual challenge-response handshake every connection starts with.
//!
//! ```text
//! client                                              server
//!   Hello      { nonce_c }                      ->
//!             <-  Challenge { nonce_s, mac_s, window_pages, max_frame }
//!                 mac_s = HMAC(key, "mosaic-server" | nonce_c | nonce_s)
//!   Auth       { mac_c }                        ->    mac_c = HMAC(key, "mosaic-client" | nonce_s | nonce_c)
//!             <-  AuthResult (ok, or error AuthFailed, then close)
//! ```
//! The server reads nothing but this exchange until the client has proven the key, and the client
//! checks `mac_s` before it trusts anything the server says, so both sides learn of a wrong key.
//! Nonces are 32 random bytes from the kernel; MACs are HMAC-SHA-256 compared in constant time.

use std::fmt;
use std::path::Path;
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::stream::{read_exact, ByteStream, ReadStop, WaitPolicy};
use crate::sys;
use crate::wire::{len32, FrameError, Header, Opcode, Status, HEADER_LEN, MAX_FRAME_LIMIT, PAGE_SIZE_U32};

type HmacSha256 = Hmac<Sha256>;

/// Environment variable holding the cluster key itself.
pub const KEY_ENV: &str = "MOSAIC_CLUSTER_KEY";
/// Environment variable naming a file that holds the cluster key.
pub const KEY_FILE_ENV: &str = "MOSAIC_CLUSTER_KEY_FILE";
/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const CHALLENGE_LEN: usize = NONCE_LEN + MAC_LEN + 8 + 4;
/// Handshake frames are tiny; anything larger is hostile.
const HANDSHAKE_MAX_FRAME: u32 = 256;

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

    fn mac(&self, label: &[u8], a: &[u8], b: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so new_from_slice cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }
}

/// What the server announced in its challenge.
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

fn nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut n = [0u8; NONCE_LEN];
    sys::random_bytes(&mut n)?;
    Ok(n)
}

/// Runs the client side of the handshake.
pub(crate) fn client_handshake(
    s: &dyn ByteStream,
    key: &ClusterKey,
    deadline: Instant,
) -> Result<ServerInfo, HandshakeError> {
    let policy = WaitPolicy::DEFAULT;
    let nonce_c = nonce()?;
    s.write_all(&[&Header::request(Opcode::Hello, 0, 0, len32(&nonce_c)).encode(), &nonce_c])?;
    let (_, p) = read_frame(s, Opcode::Challenge, policy, deadline)?;
    if p.len() != CHALLENGE_LEN {
        return Err(HandshakeError::Unexpected(format!("challenge of {} bytes", p.len())));
    }
    let (nonce_s, rest) = p.split_at(NONCE_LEN);
    let (mac_s, rest) = rest.split_at(MAC_LEN);
    let server_ok = key.mac(b"mosaic-server", &nonce_c, nonce_s).verify_slice(mac_s).is_ok();
    // Answer even when the server failed its proof (with a MAC that cannot verify), so the
    // server also logs a key mismatch instead of a bare disconnect.
    let mac_c: [u8; MAC_LEN] = if server_ok {
        key.mac(b"mosaic-client", nonce_s, &nonce_c).finalize().into_bytes().into()
    } else {
        [0u8; MAC_LEN]
    };
    s.write_all(&[&Header::request(Opcode::Auth, 0, 0, len32(&mac_c)).encode(), &mac_c])?;
    if !server_ok {
        return Err(HandshakeError::WrongKey);
    }
    let (h, msg) = read_frame(s, Opcode::AuthResult, policy, deadline)?;
    if h.is_error() {
        if h.status == Status::AuthFailed as u32 {
            return Err(HandshakeError::WrongKey);
        }
        return Err(HandshakeError::Unexpected(String::from_utf8_lossy(&msg).into_owned()));
    }
    let mut wp = [0u8; 8];
    wp.copy_from_slice(&rest[..8]);
    let mut mf = [0u8; 4];
    mf.copy_from_slice(&rest[8..12]);
    // A server's own limit is within these bounds; a value outside them is not believed (it
    // would let responses of any size be read, or no request be sent).
    let max_frame = u32::from_le_bytes(mf).clamp(PAGE_SIZE_U32, MAX_FRAME_LIMIT);
    Ok(ServerInfo { window_pages: u64::from_le_bytes(wp), max_frame })
}

/// Runs the server side of the handshake.
pub(crate) fn server_handshake(
    s: &dyn ByteStream,
    key: &ClusterKey,
    info: ServerInfo,
    deadline: Instant,
) -> Result<(), HandshakeError> {
    let policy = WaitPolicy::DEFAULT;
    let (_, nonce_c) = read_frame(s, Opcode::Hello, policy, deadline)?;
    if nonce_c.len() != NONCE_LEN {
        return Err(HandshakeError::Unexpected(format!("hello nonce of {} bytes", nonce_c.len())));
    }
    let nonce_s = nonce()?;
    let mac_s: [u8; MAC_LEN] = key.mac(b"mosaic-server", &nonce_c, &nonce_s).finalize().into_bytes().into();
    let mut challenge = Vec::with_capacity(CHALLENGE_LEN);
    challenge.extend_from_slice(&nonce_s);
    challenge.extend_from_slice(&mac_s);
    challenge.extend_from_slice(&info.window_pages.to_le_bytes());
    challenge.extend_from_slice(&info.max_frame.to_le_bytes());
    let ch =
        Header { flags: crate::wire::FLAG_RESPONSE, ..Header::request(Opcode::Challenge, 0, 0, len32(&challenge)) };
    s.write_all(&[&ch.encode(), &challenge])?;
    let (auth, mac_c) = read_frame(s, Opcode::Auth, policy, deadline)?;
    if key.mac(b"mosaic-client", &nonce_s, &nonce_c).verify_slice(&mac_c).is_err() {
        let msg = b"cluster key mismatch";
        let h = Header::error_response(&auth, Status::AuthFailed as u32, len32(msg));
        let _ = s.write_all(&[&h.encode(), msg]);
        return Err(HandshakeError::WrongKey);
    }
    s.write_all(&[&Header::response(&Header::request(Opcode::AuthResult, 0, 0, 0), 0).encode()])?;
    Ok(())
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

    #[test]
    fn macs_differ_by_direction_and_key() {
        let k1 = ClusterKey::from_bytes(&[1u8; 32]).unwrap();
        let k2 = ClusterKey::from_bytes(&[2u8; 32]).unwrap();
        let a = k1.mac(b"mosaic-server", b"x", b"y").finalize().into_bytes();
        let b = k1.mac(b"mosaic-client", b"x", b"y").finalize().into_bytes();
        let c = k2.mac(b"mosaic-server", b"x", b"y").finalize().into_bytes();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
