//! The receive-side state the leader owns.

use crate::stream::{read_exact, ByteStream, Deadline, ReadStop, WaitPolicy};
use crate::wire::HEADER_LEN;

/// Receive-side state, owned by whoever leads.
///
/// Responses are read many at a time: the leader reads up to [`READ_AHEAD`] bytes at once and
/// takes headers and payloads from there, except while exactly one page read is pending (a
/// single fault), or any is on a stream whose reads are copies anyway (shm): then it reads the
/// header exactly, so the page's payload goes straight to its buffer with no copy. (A page whose
/// request raced with a read-ahead has its first bytes copied from it.)
pub(super) struct Reader {
    pub(super) header: [u8; HEADER_LEN],
    pub(super) have: usize,
    pub(super) ahead: Box<[u8; READ_AHEAD]>,
    pub(super) ahead_start: usize,
    pub(super) ahead_end: usize,
    pub(super) scratch: Vec<u8>,
}

/// Read-ahead size: sixteen page responses with their headers.
pub(super) const READ_AHEAD: usize = 16 * (4096 + HEADER_LEN);

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
