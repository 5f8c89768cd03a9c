//! The victim cache: copies of recently evicted pages, kept in local RAM so a page touched
//! again soon comes back without a request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::PAGE_SIZE;

/// A copy of a page's contents. Not page-aligned on purpose: an aligned 4 KiB allocation costs
/// glibc up to twice its size, and thousands of these are live at once.
pub(super) type Copy = Box<[u8; PAGE_SIZE]>;

/// Copies of recently evicted pages, oldest first out.
pub(super) struct VictimCache {
    map: Mutex<VictimMap>,
    /// Pages held, readable without the lock: the fault path asks it on every fault.
    len: AtomicU64,
    pub(super) capacity: u64,
}

impl VictimCache {
    pub(super) fn new(capacity: u64) -> VictimCache {
        VictimCache { map: Mutex::new(VictimMap::new(capacity)), len: AtomicU64::new(0), capacity }
    }

    pub(super) fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    pub(super) fn insert_all(&self, copies: impl IntoIterator<Item = (u64, Copy)>) {
        if self.capacity == 0 {
            return;
        }
        let mut m = crate::lock(&self.map);
        for (page, copy) in copies {
            m.insert(page, copy);
        }
        self.len.store(m.pages.len() as u64, Ordering::Relaxed);
    }

    /// Drops the copies of `pages` (stale once the pages are back), under one lock.
    pub(super) fn discard(&self, pages: &[u64]) {
        if self.len() == 0 || pages.is_empty() {
            return;
        }
        let mut m = crate::lock(&self.map);
        for p in pages {
            m.pages.remove(p);
        }
        self.len.store(m.pages.len() as u64, Ordering::Relaxed);
    }

    /// Memory the cache holds in pages, with the allocator's headers and slack: each copy is a
    /// separate allocation, about 9% more than its page (measured: 4468 KiB for 1024 copies).
    pub(super) fn footprint_pages(&self) -> u64 {
        let c = self.len();
        c + c / 8
    }

    /// The copy of `page`, taken out of the cache. Takes no lock while the cache is empty.
    pub(super) fn take(&self, page: u64) -> Option<Copy> {
        if self.len() == 0 {
            return None;
        }
        let mut m = crate::lock(&self.map);
        let copy = m.pages.remove(&page).map(|(_, copy)| copy);
        self.len.store(m.pages.len() as u64, Ordering::Relaxed);
        copy
    }
}

/// The cache's bookkeeping, under its lock.
pub(super) struct VictimMap {
    /// Page -> (insertion number, copy).
    pages: std::collections::HashMap<u64, (u64, Copy)>,
    /// (page, insertion number), oldest first; entries whose number no longer matches are stale.
    order: VecDeque<(u64, u64)>,
    inserted: u64,
    capacity: usize,
}

impl VictimMap {
    pub(super) fn new(capacity: u64) -> VictimMap {
        VictimMap {
            pages: std::collections::HashMap::new(),
            order: VecDeque::new(),
            inserted: 0,
            capacity: usize::try_from(capacity).unwrap_or(0),
        }
    }

    fn insert(&mut self, page: u64, copy: Copy) {
        self.inserted += 1;
        self.pages.insert(page, (self.inserted, copy));
        self.order.push_back((page, self.inserted));
        while self.pages.len() > self.capacity {
            let Some((old, n)) = self.order.pop_front() else { break };
            if self.pages.get(&old).is_some_and(|(m, _)| *m == n) {
                self.pages.remove(&old);
            }
        }
        // Stale names of pages taken back pile up only until the next sweep.
        if self.order.len() > 4 * self.capacity.max(16) {
            let pages = &self.pages;
            self.order.retain(|(p, n)| pages.get(p).is_some_and(|(m, _)| m == n));
        }
    }
}
