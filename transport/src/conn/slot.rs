//! Outstanding requests: one [`Slot`] per request, in a [`PendingMap`] keyed by request id.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};

use super::CallError;
use crate::sync::lock;
use crate::wire::Opcode;

const PENDING: u8 = 0;
const DONE: u8 = 1;

/// Where a response payload goes.
pub(super) enum Dest {
    /// Into the caller's page (a page read).
    Page(*mut u8),
    /// Into a fresh vector (a call), or nowhere (a page write, whose response is empty).
    Bytes,
}

/// One request of a batch, before it is sent.
pub(super) struct Request<'p> {
    pub(super) opcode: Opcode,
    pub(super) arg: u64,
    pub(super) dest: Dest,
    pub(super) payload: &'p [u8],
}

/// One outstanding request.
pub(super) struct Slot {
    state: AtomicU8,
    pub(super) dest: Dest,
    pub(super) expect: Opcode,
    outcome: Mutex<Option<Result<Vec<u8>, CallError>>>,
    pub(super) waiter: Thread,
}

// SAFETY: the only non-Send/Sync field is `Dest::Page`'s pointer. It is dereferenced only by the
// leader while the slot is out of `pending` and not yet final; during that time the caller that
// owns the buffer is blocked in `wait` (or the buffer is held by a `PagesInFlight` handle) and
// nobody holds a reference to it (module invariants 2 and 3).
unsafe impl Send for Slot {}
// SAFETY: as above; all other fields are Sync.
unsafe impl Sync for Slot {}

impl Slot {
    pub(super) fn new(dest: Dest, expect: Opcode) -> Arc<Slot> {
        Arc::new(Slot {
            state: AtomicU8::new(PENDING),
            dest,
            expect,
            outcome: Mutex::new(None),
            waiter: thread::current(),
        })
    }

    pub(super) fn is_final(&self) -> bool {
        self.state.load(Ordering::Acquire) != PENDING
    }

    /// Whether the slot is final with a successful outcome.
    pub(super) fn succeeded(&self) -> bool {
        self.is_final() && matches!(*lock(&self.outcome), Some(Ok(_)))
    }

    pub(super) fn finish(&self, outcome: Result<Vec<u8>, CallError>) {
        *lock(&self.outcome) = Some(outcome);
        self.state.store(DONE, Ordering::Release);
        self.waiter.unpark();
    }

    pub(super) fn take(&self) -> Result<Vec<u8>, CallError> {
        lock(&self.outcome).take().unwrap_or_else(|| Ok(Vec::new()))
    }
}

/// Outstanding requests by id, counting the page reads among them.
pub(super) struct PendingMap {
    map: HashMap<u64, Arc<Slot>, BuildHasherDefault<IdHasher>>,
    page_reads: Arc<AtomicUsize>,
}

impl PendingMap {
    pub(super) fn new(page_reads: Arc<AtomicUsize>) -> PendingMap {
        PendingMap { map: HashMap::default(), page_reads }
    }

    fn count(&self, slot: &Slot, delta: isize) {
        if matches!(slot.dest, Dest::Page(_)) {
            if delta > 0 {
                self.page_reads.fetch_add(1, Ordering::Relaxed);
            } else {
                self.page_reads.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn insert(&mut self, id: u64, slot: Arc<Slot>) {
        self.count(&slot, 1);
        self.map.insert(id, slot);
    }

    pub(super) fn remove(&mut self, id: &u64) -> Option<Arc<Slot>> {
        let slot = self.map.remove(id)?;
        self.count(&slot, -1);
        Some(slot)
    }

    pub(super) fn drain(&mut self) -> Vec<Arc<Slot>> {
        self.page_reads.store(0, Ordering::Relaxed);
        self.map.drain().map(|(_, s)| s).collect()
    }
}

/// Request ids are sequential: a multiplicative hash spreads them well at a fraction of
/// SipHash's cost on the fault path.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
