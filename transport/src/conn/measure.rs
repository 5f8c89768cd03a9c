//! The request layer's own CPU cost per call, without a peer: the stream answers every request at
//! once, from memory. What the client adds to a round trip beyond the transport itself.
//! `cargo test --release -p mosaic-transport --lib client_cost_per_call -- --ignored --nocapture`

use std::io;
use std::time::{Duration, Instant};

use crate::auth::ServerInfo;
use crate::stream::{ByteStream, WaitPolicy};
use crate::wire::{Header, DEFAULT_MAX_FRAME};
use crate::Connection;

/// A stream whose "peer" answers each request frame the moment it is written (an echo).
/// Single-threaded use only.
struct Mirror {
    out: std::cell::UnsafeCell<(Vec<u8>, usize)>,
}
// SAFETY: the measurement below uses one thread, so the cell is never shared for real; `Sync`
// only satisfies the `ByteStream` bound.
unsafe impl Sync for Mirror {}
impl ByteStream for Mirror {
    fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        // SAFETY: one thread (see `Mirror`), and no reference to the cell outlives this call.
        let o = unsafe { &mut *self.out.get() };
        let h = Header::decode_slice(bufs[0], DEFAULT_MAX_FRAME).unwrap();
        o.0.extend_from_slice(&Header::response(&h, h.len).encode());
        o.0.extend_from_slice(bufs[1]);
        Ok(())
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: as in `write_all`.
        let o = unsafe { &mut *self.out.get() };
        let n = buf.len().min(o.0.len() - o.1);
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        buf[..n].copy_from_slice(&o.0[o.1..o.1 + n]);
        o.1 += n;
        if o.1 == o.0.len() {
            o.0.clear();
            o.1 = 0;
        }
        Ok(n)
    }
    fn wait_readable(&self, _timeout: Duration) -> io::Result<()> {
        Ok(())
    }
    fn shutdown(&self) {}
    fn peer(&self) -> String {
        "mirror".into()
    }
}

#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn client_cost_per_call() {
    let info = ServerInfo { window_pages: 8, max_frame: DEFAULT_MAX_FRAME };
    let mirror = Mirror { out: std::cell::UnsafeCell::new((Vec::with_capacity(4096), 0)) };
    let conn = Connection::new(Box::new(mirror), info, WaitPolicy::DEFAULT, Duration::from_secs(5), None);
    let msg = [7u8; 64];
    for _ in 0..10_000 {
        conn.call(1, &msg).unwrap();
    }
    let n = 1_000_000;
    let t = Instant::now();
    for _ in 0..n {
        conn.call(1, &msg).unwrap();
    }
    println!("client cost of a 64 B call, answered at once: {:?}", t.elapsed() / n);
}
