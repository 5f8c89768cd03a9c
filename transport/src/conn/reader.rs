//! The receive-side state the leader owns.

use crate::stream::{read_exact, ByteStream, Deadline, ReadStop, WaitPolicy};
use crate::wire::HEADER_LEN;

/// Receive-side state, owned by whoever leads.
///
/// Small responses are read with one read call: when no page read is pending, the leader reads
/// up to [`READ_AHEAD`] bytes at once and takes the header and small payloads from there. While a
/// page read is pending it reads headers exactly, so page payloads go straight to their buffers
/// (only a page whose request raced with a read-ahead can have its first bytes copied from it).
pub(super) struct Reader {
    pub(super) header: [u8; HEADER_LEN],
    pub(super) have: usize,
    pub(super) ahead: Box<[u8; READ_AHEAD]>,
    pub(super) ahead_start: usize,
    pub(super) ahead_end: usize,
    pub(super) scratch: Vec<u8>,
}

/// Read-ahead size: a header and a small payload.
pub(super) const READ_AHEAD: usize = 256;

impl Reader {
    pub(super) fn new() -> Reader {
        Reader {
            header: [0; HEADER_LEN],
            have: 0,
            ahead: Box::new([0; READ_AHEAD]),
            ahead_start: 0,
            ahead_end: 0,
            scratch: Vec::new(),
        }
    }

    /// Moves read-ahead bytes into `dst`; returns how many.
    pub(super) fn take_ahead(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.ahead_end - self.ahead_start);
        dst[..n].copy_from_slice(&self.ahead[self.ahead_start..self.ahead_start + n]);
        self.ahead_start += n;
        n
    }

    /// Fills `dst` from the read-ahead, then straight from the stream.
    pub(super) fn payload(
        &mut self,
        stream: &dyn ByteStream,
        dst: &mut [u8],
        policy: WaitPolicy,
        deadline: Deadline,
    ) -> Result<(), ReadStop> {
        let n = self.take_ahead(dst);
        read_exact(stream, &mut dst[n..], policy, deadline)
    }
}
