//! Per-page state of a network-RAM region, and which servers hold each page.
//!
//! ```text
//!            fault                      installed
//!  ABSENT ----------> FETCHING(zero) ------------> CLEAN_ABSENT / DIRTY (if the fault wrote)
//!  REMOTE ----------> FETCHING(data) ------------> CLEAN / DIRTY
//!                           | every holder failed
//!                           v
//!                          LOST (poisoned: SIGBUS)
//!  CLEAN, CLEAN_ABSENT --first write (WP fault)--> DIRTY
//!  CLEAN, CLEAN_ABSENT, DIRTY --evictor--> EVICTING --saved, dropped--> REMOTE / ABSENT
//!                                                   --could not save--> DIRTY (stays resident)
//! ```
//! Invariants:
//! 1. Only the thread that moved a page into FETCHING or EVICTING moves it out again.
//! 2. A page is in the region's memory iff its state is CLEAN, CLEAN_ABSENT or DIRTY (or it is
//!    FETCHING/EVICTING and its owner is between the two).
//! 3. REMOTE implies at least one holder bit; a page whose last holder is gone is LOST on the
//!    next fetch, never silently zero.
//! 4. A resident page whose state is not DIRTY has the same contents as its remote copy (or is
//!    zero with no remote copy, CLEAN_ABSENT), because it is installed write-protected and its
//!    first write goes through `written`, which marks it DIRTY before the write lands.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Never stored anywhere and not resident: reads as zeros.
pub(crate) const ABSENT: u8 = 0;
/// Stored on the servers in its holder mask, not resident.
pub(crate) const REMOTE: u8 = 1;
/// A thread is bringing it in.
pub(crate) const FETCHING: u8 = 2;
/// Resident, same as the remote copy.
pub(crate) const CLEAN: u8 = 3;
/// Resident, zeros, no remote copy.
pub(crate) const CLEAN_ABSENT: u8 = 4;
/// Resident, differs from any remote copy.
pub(crate) const DIRTY: u8 = 5;
/// The evictor is saving and dropping it.
pub(crate) const EVICTING: u8 = 6;
/// No copy is left: touching it raises SIGBUS.
pub(crate) const LOST: u8 = 7;

/// A vector of `n` zeroed atomics, allocated as zeroed memory.
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
unsafe trait Zeroable {
    type Plain: Default + Clone;
}
// SAFETY: AtomicU8 has the same size, alignment and bit validity as u8 (std documents it).
unsafe impl Zeroable for AtomicU8 {
    type Plain = u8;
}
// SAFETY: AtomicU32 has the same size and bit validity as u32 (std documents it), and the same
// alignment where u32 is 4-aligned, which the assertion below checks at compile time.
unsafe impl Zeroable for AtomicU32 {
    type Plain = u32;
}
const _: () = assert!(align_of::<AtomicU32>() == align_of::<u32>());
// SAFETY: AtomicBool has the same size, alignment and bit validity as bool (std documents it).
unsafe impl Zeroable for AtomicBool {
    type Plain = bool;
}

/// A page number as an index: the table was built from a `usize` length, so every valid page
/// number fits (an out-of-range one panics on the index, as any bug would).
#[allow(clippy::cast_possible_truncation)]
fn idx(i: u64) -> usize {
    i as usize
}

/// States and holder masks of every page of a region.
pub(crate) struct PageTable {
    state: Vec<AtomicU8>,
    holders: Vec<AtomicU32>,
    /// Set when a page came back soon after its eviction: it gets a second pass through the
    /// resident queue before it is evicted again.
    hot: Vec<AtomicBool>,
}

impl PageTable {
    pub(crate) fn new(pages: u64) -> PageTable {
        let n = usize::try_from(pages).unwrap_or(usize::MAX);
        // Zeroed allocations (ABSENT, no holders, not hot): for a large region the allocator
        // hands out untouched zero pages, so a table costs memory only where pages are used.
        PageTable { state: zeroed(n), holders: zeroed(n), hot: zeroed(n) }
    }

    pub(crate) fn get(&self, i: u64) -> u8 {
        self.state[idx(i)].load(Ordering::Acquire)
    }

    pub(crate) fn set(&self, i: u64, s: u8) {
        self.state[idx(i)].store(s, Ordering::Release);
    }

    /// Moves page `i` from `from` to `to`; false if it was not in `from`.
    pub(crate) fn cas(&self, i: u64, from: u8, to: u8) -> bool {
        self.state[idx(i)].compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok()
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

    /// Waits while page `i` is in a transient state (FETCHING or EVICTING) owned by another
    /// thread; returns the state it settled in, or `None` after `limit`.
    pub(crate) fn settle(&self, i: u64, limit: Duration) -> Option<u8> {
        // Nearly always settled at once: then no clock read (one costs 30-50 ns here).
        let mut start = None;
        let mut spins = 0u32;
        loop {
            let s = self.get(i);
            if s != FETCHING && s != EVICTING {
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
    use super::*;

    #[test]
    fn transitions_are_compare_and_swap() {
        let t = PageTable::new(4);
        assert_eq!(t.get(2), ABSENT);
        assert!(t.cas(2, ABSENT, FETCHING));
        assert!(!t.cas(2, ABSENT, FETCHING), "only one thread fetches");
        t.set(2, CLEAN);
        assert_eq!(t.settle(2, Duration::ZERO), Some(CLEAN));
        t.set(3, EVICTING);
        assert_eq!(t.settle(3, Duration::from_millis(1)), None);
        t.set_holders(1, 0b101);
        assert_eq!(t.drop_holders(1, 0b100), 0b001);
        assert_eq!(t.holders(1), 0b001);
        t.set_holders(2, 0b110);
        t.forget_holder(0b010);
        assert_eq!((t.holders(1), t.holders(2)), (0b001, 0b100));
    }
}
