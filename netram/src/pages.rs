//! Per-page state of a network-RAM region, and which servers hold each page.
//!
//! ```text
//!            fault                      installed
//!  Absent ----------> Fetching(zero) ------------> CleanAbsent / Dirty (if the fault wrote)
//!  Remote ----------> Fetching(data) ------------> Clean / Dirty
//!                           | every holder failed
//!                           v
//!                          Lost (poisoned: SIGBUS)
//!  Clean, CleanAbsent --first write (WP fault)--> Dirty
//!  Clean, CleanAbsent, Dirty --evictor--> Evicting --saved, dropped--> Remote / Absent
//!                                                   --could not save--> Dirty (stays resident)
//! ```
//! The decisions that move pages between states are in `client::lifecycle`, without I/O, with
//! a model-based test of these invariants.
//!
//! Invariants:
//! 1. Only the thread that moved a page into Fetching or Evicting moves it out again (or the
//!    one that took the prefetch window owning it).
//! 2. A page is in the region's memory iff its state is Clean, CleanAbsent or Dirty (or it is
//!    Fetching/Evicting and its owner is between the two).
//! 3. Remote implies at least one holder bit; a page whose last holder is gone is Lost on the
//!    next fetch, never silently zero. A page leaves local RAM as Remote only while a live
//!    holder has its current contents.
//! 4. A resident page whose state is not Dirty has the same contents as its remote copy (or is
//!    zero with no remote copy, CleanAbsent), because it is installed write-protected and its
//!    first write goes through `written`, which marks it Dirty before the write lands.

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU8};
use std::sync::atomic::Ordering;
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8};
use std::time::{Duration, Instant};

/// Where a page is and who may move it (see the module's diagram and invariants).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
#[repr(u8)]
pub(crate) enum PageState {
    /// Never stored anywhere and not resident: reads as zeros. Zero: a new table is all Absent.
    Absent = 0,
    /// Stored on the servers in its holder mask, not resident.
    Remote = 1,
    /// A thread is bringing it in (or upgrading it for a write): that thread owns it.
    Fetching = 2,
    /// Resident, same as the remote copy.
    Clean = 3,
    /// Resident, zeros, no remote copy.
    CleanAbsent = 4,
    /// Resident, differs from any remote copy.
    Dirty = 5,
    /// The evictor (or a discard, or the rebuild) is saving and dropping it: it owns it.
    Evicting = 6,
    /// No copy is left: touching it raises SIGBUS.
    Lost = 7,
}

impl PageState {
    const ALL: [PageState; 8] = [
        PageState::Absent,
        PageState::Remote,
        PageState::Fetching,
        PageState::Clean,
        PageState::CleanAbsent,
        PageState::Dirty,
        PageState::Evicting,
        PageState::Lost,
    ];

    /// The state stored as `v` (only ever stored from a `PageState`; any other byte reads as
    /// Lost).
    pub(crate) fn from_bits(v: u8) -> PageState {
        PageState::ALL.get(usize::from(v)).copied().unwrap_or(PageState::Lost)
    }

    /// Whether the page is in the region's memory (and nobody owns it).
    pub(crate) fn is_resident(self) -> bool {
        matches!(self, PageState::Clean | PageState::CleanAbsent | PageState::Dirty)
    }

    /// Whether a thread owns it for a transition (others wait or come back later).
    pub(crate) fn is_busy(self) -> bool {
        matches!(self, PageState::Fetching | PageState::Evicting)
    }
}

/// A page's state in one atomic byte.
#[derive(Default)]
#[repr(transparent)]
pub(crate) struct AtomicPageState(AtomicU8);

impl AtomicPageState {
    pub(crate) fn load(&self) -> PageState {
        PageState::from_bits(self.0.load(Ordering::Acquire))
    }

    pub(crate) fn store(&self, s: PageState) {
        self.0.store(s as u8, Ordering::Release);
    }

    /// Moves from `from` to `to`; false if it was not in `from`.
    pub(crate) fn transition(&self, from: PageState, to: PageState) -> bool {
        self.0.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// A vector of `n` zeroed atomics, allocated as zeroed memory.
#[cfg(not(loom))]
fn zeroed<A: Zeroable>(n: usize) -> Vec<A> {
    let mut v = std::mem::ManuallyDrop::new(vec![A::Plain::default(); n]);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: `A` has the same size, alignment and bit validity as `A::Plain` (the `Zeroable`
    // contract, an unsafe trait implemented only for the standard atomics), so the allocation made
    // for `cap` plain values is a valid allocation of `cap` atomics holding the same (zero)
    // values; ownership moves from the forgotten vector to the new one.
    unsafe { Vec::from_raw_parts(ptr.cast::<A>(), len, cap) }
}

/// An atomic with a plain twin of identical layout whose zero is the atomic's zero.
///
/// # Safety
/// `Self` and `Self::Plain` must have the same size, alignment and bit validity, and
/// `Plain::default()` must be the bits of a valid `Self`: [`zeroed`] reinterprets an allocation of
/// plain values as one of atomics.
#[cfg(not(loom))]
unsafe trait Zeroable {
    type Plain: Default + Clone;
}
// SAFETY: AtomicPageState is a transparent AtomicU8, which has the same size, alignment and bit
// validity as u8 (std documents it); a zero byte is `PageState::Absent`.
#[cfg(not(loom))]
unsafe impl Zeroable for AtomicPageState {
    type Plain = u8;
}
// SAFETY: AtomicU32 has the same size and bit validity as u32 (std documents it), and the same
// alignment where u32 is 4-aligned, which the assertion below checks at compile time.
#[cfg(not(loom))]
unsafe impl Zeroable for AtomicU32 {
    type Plain = u32;
}
#[cfg(not(loom))]
const _: () = assert!(align_of::<AtomicU32>() == align_of::<u32>());
// SAFETY: AtomicBool has the same size, alignment and bit validity as bool (std documents it).
#[cfg(not(loom))]
unsafe impl Zeroable for AtomicBool {
    type Plain = bool;
}

/// Under loom, whose atomics have no plain twin: built one by one.
#[cfg(loom)]
fn zeroed<A: Default>(n: usize) -> Vec<A> {
    (0..n).map(|_| A::default()).collect()
}

/// A page number as an index: the table was built from a `usize` length, so every valid page
/// number fits (an out-of-range one panics on the index, as any bug would).
#[allow(clippy::cast_possible_truncation)]
fn idx(i: u64) -> usize {
    i as usize
}

/// States and holder masks of every page of a region.
pub(crate) struct PageTable {
    state: Vec<AtomicPageState>,
    holders: Vec<AtomicU32>,
    /// Set when a page came back soon after its eviction: it gets a second pass through the
    /// resident queue before it is evicted again.
    hot: Vec<AtomicBool>,
}

impl PageTable {
    pub(crate) fn new(pages: u64) -> PageTable {
        let n = usize::try_from(pages).unwrap_or(usize::MAX);
        // Zeroed allocations (Absent, no holders, not hot): for a large region the allocator
        // hands out untouched zero pages, so a table costs memory only where pages are used.
        PageTable { state: zeroed(n), holders: zeroed(n), hot: zeroed(n) }
    }

    pub(crate) fn get(&self, i: u64) -> PageState {
        self.state[idx(i)].load()
    }

    pub(crate) fn set(&self, i: u64, s: PageState) {
        self.state[idx(i)].store(s);
    }

    /// Moves page `i` from `from` to `to`; false if it was not in `from`.
    pub(crate) fn cas(&self, i: u64, from: PageState, to: PageState) -> bool {
        self.state[idx(i)].transition(from, to)
    }

    pub(crate) fn mark_hot(&self, i: u64) {
        self.hot[idx(i)].store(true, Ordering::Relaxed);
    }

    /// Clears page `i`'s hot mark; returns whether it was set.
    pub(crate) fn take_hot(&self, i: u64) -> bool {
        self.hot[idx(i)].swap(false, Ordering::Relaxed)
    }

    pub(crate) fn holders(&self, i: u64) -> u32 {
        self.holders[idx(i)].load(Ordering::Acquire)
    }

    pub(crate) fn set_holders(&self, i: u64, mask: u32) {
        self.holders[idx(i)].store(mask, Ordering::Release);
    }

    /// Clears `mask` from page `i`'s holders; returns what is left.
    pub(crate) fn drop_holders(&self, i: u64, mask: u32) -> u32 {
        self.holders[idx(i)].fetch_and(!mask, Ordering::AcqRel) & !mask
    }

    /// Clears `mask` from every page's holders (a server lost every copy it held).
    pub(crate) fn forget_holder(&self, mask: u32) {
        for h in &self.holders {
            h.fetch_and(!mask, Ordering::AcqRel);
        }
    }

    /// Waits while page `i` is in a transient state (Fetching or Evicting) owned by another
    /// thread; returns the state it settled in, or `None` after `limit`.
    pub(crate) fn settle(&self, i: u64, limit: Duration) -> Option<PageState> {
        // Nearly always settled at once: then no clock read (one costs 30-50 ns here).
        let mut start = None;
        let mut spins = 0u32;
        loop {
            let s = self.get(i);
            if !s.is_busy() {
                return Some(s);
            }
            if start.get_or_insert_with(Instant::now).elapsed() > limit {
                return None;
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.state.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::PageState::{Absent, Clean, Evicting, Fetching};
    use super::*;

    #[test]
    fn transitions_are_compare_and_swap() {
        let t = PageTable::new(4);
        assert_eq!(t.get(2), Absent);
        assert!(t.cas(2, Absent, Fetching));
        assert!(!t.cas(2, Absent, Fetching), "only one thread fetches");
        t.set(2, Clean);
        assert_eq!(t.settle(2, Duration::ZERO), Some(Clean));
        t.set(3, Evicting);
        assert_eq!(t.settle(3, Duration::from_millis(1)), None);
        t.set_holders(1, 0b101);
        assert_eq!(t.drop_holders(1, 0b100), 0b001);
        assert_eq!(t.holders(1), 0b001);
        t.set_holders(2, 0b110);
        t.forget_holder(0b010);
        assert_eq!((t.holders(1), t.holders(2)), (0b001, 0b100));
    }

    #[test]
    fn every_state_round_trips_through_its_byte() {
        let t = PageTable::new(1);
        for s in PageState::ALL {
            t.set(0, s);
            assert_eq!(t.get(0), s);
            assert_eq!(s.is_resident(), matches!(s, Clean | PageState::CleanAbsent | PageState::Dirty));
        }
        assert_eq!(PageState::from_bits(200), PageState::Lost, "a byte no state has reads as lost");
    }
}
