//! Outstanding requests: one [`Slot`] per request, in a [`PendingMap`] keyed by request id.
//!
//! A slot's outcome is written once, by whoever took the slot out of the pending table (the
//! leader that read its response, or `fail`), before the slot's state turns final with a release
//! store; the owner reads it only after seeing that state with an acquire load. So the outcome
//! needs no lock of its own. Slots are reused per thread (a fault or a ping-pong issues one per
//! call): a finished slot nobody else holds goes back to its thread's spares.

use std::cell::{RefCell, UnsafeCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, Thread};

use super::CallError;
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

type Outcome = Result<Vec<u8>, CallError>;

/// One outstanding request.
pub(super) struct Slot {
    state: AtomicU8,
    pub(super) dest: Dest,
    pub(super) expect: Opcode,
    /// Written once before `state` turns final, read only after (see the module docs).
    outcome: UnsafeCell<Option<Outcome>>,
    /// The thread that issued the request, unparked when it completes.
    pub(super) waiter: Thread,
    /// [`thread_token`] of `waiter`: lets a finishing thread see, without touching the
    /// `Thread`'s reference count, that the waiter is itself and needs no unpark.
    owner: usize,
}

// SAFETY: `Dest::Page`'s pointer is dereferenced only by the leader while the slot is out of
// `pending` and not yet final; during that time the caller that owns the buffer is blocked in
// `wait` (or the buffer is held by a `PagesInFlight` handle) and nobody holds a reference to it
// (the connection module's invariants 2 and 3). `outcome` is written by one thread before the
// release store that makes the slot final and read only after an acquire load sees it final.
unsafe impl Send for Slot {}
// SAFETY: as above; all other fields are Sync.
unsafe impl Sync for Slot {}

/// Most finished slots a thread keeps for reuse (a batch of page reads takes one per page).
const SPARE_SLOTS: usize = 64;

thread_local! {
    static SPARES: RefCell<Vec<Arc<Slot>>> = const { RefCell::new(Vec::new()) };
    static TOKEN: u8 = const { 0 };
}

/// A number that identifies the calling thread among live threads (the address of one of its
/// thread-locals), cheaper than `thread::current()`, which counts a reference.
pub(super) fn thread_token() -> usize {
    TOKEN.with(|t| std::ptr::from_ref(t) as usize)
}

impl Slot {
    /// A pending slot owned by the calling thread: one of its spares if it has one.
    pub(super) fn new(dest: Dest, expect: Opcode) -> Arc<Slot> {
        // A spare is held by nobody else (`recycle` keeps only unshared slots), so `get_mut`
        // succeeds; if it ever did not, a fresh slot is made instead.
        let spare = SPARES.try_with(|s| s.try_borrow_mut().ok()?.pop()).ok().flatten();
        if let Some(mut slot) = spare {
            if let Some(s) = Arc::get_mut(&mut slot) {
                s.state = AtomicU8::new(PENDING);
                s.dest = dest;
                s.expect = expect;
                *s.outcome.get_mut() = None;
                return slot;
            }
        }
        Arc::new(Slot {
            state: AtomicU8::new(PENDING),
            dest,
            expect,
            outcome: UnsafeCell::new(None),
            waiter: thread::current(),
            owner: thread_token(),
        })
    }

    /// Keeps `slot` for the calling thread's next request if it is that thread's own and
    /// nobody else holds it any more.
    pub(super) fn recycle(slot: Arc<Slot>) {
        if slot.owner != thread_token() || Arc::strong_count(&slot) != 1 || !slot.is_final() {
            return;
        }
        let _ = SPARES.try_with(|spares| {
            if let Ok(mut spares) = spares.try_borrow_mut() {
                if spares.len() < SPARE_SLOTS {
                    spares.push(slot);
                }
            }
        });
    }

    /// Whether the thread with [`thread_token`] `token` issued this request.
    pub(super) fn owned_by(&self, token: usize) -> bool {
        self.owner == token
    }

    pub(super) fn is_final(&self) -> bool {
        self.state.load(Ordering::Acquire) != PENDING
    }

    /// Whether the slot is final with a successful outcome.
    pub(super) fn succeeded(&self) -> bool {
        // SAFETY: read only once final (the acquire load in is_final orders it after the write
        // in `finish`), and nobody writes it after that.
        self.is_final() && unsafe { matches!(*self.outcome.get(), Some(Ok(_))) }
    }

    /// Records the outcome and makes the slot final. Called once, by whoever removed the slot
    /// from the pending table; `finisher` is that thread's [`thread_token`].
    pub(super) fn finish(&self, outcome: Outcome, finisher: usize) {
        // SAFETY: only the thread that removed the slot from `pending` calls this, once, and
        // nobody reads the outcome before the release store below.
        unsafe { *self.outcome.get() = Some(outcome) };
        self.state.store(DONE, Ordering::Release);
        if finisher != self.owner {
            self.waiter.unpark();
        }
    }

    /// Takes the outcome of a final slot (`None` if it is not final: it was withdrawn).
    pub(super) fn take(&self) -> Option<Outcome> {
        if !self.is_final() {
            return None;
        }
        // SAFETY: final, so `finish` wrote the outcome and never touches it again; only the
        // owner takes it, once, from the one thread that collects the batch.
        Some(unsafe { (*self.outcome.get()).take() }.unwrap_or_else(|| Ok(Vec::new())))
    }
}

/// Outstanding requests by id, counting the page reads among them; hands out the ids.
pub(super) struct PendingMap {
    map: HashMap<u64, Arc<Slot>, BuildHasherDefault<IdHasher>>,
    page_reads: Arc<AtomicUsize>,
    /// The id the next request gets (ids start at 1 and are never reused).
    next_id: u64,
}

impl PendingMap {
    pub(super) fn new(page_reads: Arc<AtomicUsize>) -> PendingMap {
        PendingMap { map: HashMap::default(), page_reads, next_id: 1 }
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

    /// Adds `slot` under a fresh id, which it returns.
    pub(super) fn insert_next(&mut self, slot: Arc<Slot>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.count(&slot, 1);
        self.map.insert(id, slot);
        id
    }

    /// Whether a request with this id was ever issued.
    pub(super) fn issued(&self, id: u64) -> bool {
        id != 0 && id < self.next_id
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
