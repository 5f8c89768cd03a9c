//! Entry points for the fuzz targets in `fuzz/` (built only with `--cfg fuzzing`, which
//! `cargo fuzz` sets). Each feeds arbitrary bytes, as if from a hostile peer, into the real
//! code: the server's frame loop, the client's receive path, and both handshakes.

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
        }
    }
}
