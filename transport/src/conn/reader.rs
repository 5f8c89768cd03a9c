//! The receive-side state the leader owns.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// The receive side and the flag that says someone leads it: a lock whose release is a
/// sequentially consistent swap, so that a leaving leader's look at the parked followers (one
/// more sequentially consistent load) needs no fence of its own, nor does a follower's look at
/// the lock after announcing itself (module docs of `conn`, "leader/follower").
pub(super) struct ReaderLock {
    busy: AtomicBool,
    reader: UnsafeCell<Reader>,
}

// SAFETY: the Reader inside is reached only through a `ReaderGuard`, and `busy` admits one
// guard at a time (acquire on taking it, release on giving it back), like a mutex.
unsafe impl Sync for ReaderLock {}

/// The right to lead: access to the receive state until dropped.
pub(super) struct ReaderGuard<'a> {
    lock: &'a ReaderLock,
}

impl ReaderLock {
    pub(super) fn new() -> ReaderLock {
        ReaderLock { busy: AtomicBool::new(false), reader: UnsafeCell::new(Reader::new()) }
    }

    /// Takes the receive side if nobody leads.
    pub(super) fn try_lock(&self) -> Option<ReaderGuard<'_>> {
        self.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).ok()?;
        Some(ReaderGuard { lock: self })
    }

    /// Whether nobody leads right now (a sequentially consistent load).
    pub(super) fn is_free(&self) -> bool {
        !self.busy.load(Ordering::SeqCst)
    }
}

impl std::ops::Deref for ReaderGuard<'_> {
    type Target = Reader;
    fn deref(&self) -> &Reader {
        // SAFETY: this guard is the only one (see `ReaderLock`), so nobody else touches it.
        unsafe { &*self.lock.reader.get() }
    }
}

impl std::ops::DerefMut for ReaderGuard<'_> {
    fn deref_mut(&mut self) -> &mut Reader {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.lock.reader.get() }
    }
}

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        // SeqCst, not just Release: a leaving leader's next load of the follower count must be
        // ordered after this store (see `ReaderLock`).
        self.lock.busy.swap(false, Ordering::SeqCst);
    }
}
