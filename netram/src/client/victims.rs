//! The victim cache: copies of recently evicted pages, kept in local RAM so a page touched
//! again soon comes back without a request.
//!
//! Copies are kept compressed (LZ4) where that takes at most an eighth of the page, and pages
//! of zeros take no data at all, so the cache's share of the budget holds as many pages as the
//! data allows: sparse tables and text several times as many as they would take whole. Its
//! capacity is in bytes of memory, its bookkeeping counted; incompressible pages are kept whole.
//! Every page in the cache also has its copies on the servers (the cache is only ever a faster
//! way back), so dropping an entry loses nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::PAGE_SIZE;

/// A copy of a page's contents. Not page-aligned on purpose: an aligned 4 KiB allocation costs
/// glibc up to twice its size, and thousands of these are live at once.
pub(super) type Copy = Box<[u8; PAGE_SIZE]>;

/// Memory one entry takes beside its data: the map's and the queue's slots and the allocator's
/// header of the data (an estimate; the footprint measured from the process is the check).
pub(super) const ENTRY_OVERHEAD: u64 = 96;

/// A compressed copy is kept only if it takes at most an eighth of the page: compressed copies
/// of many sizes fragment the allocator's heap, and a page that compresses only twofold (text)
/// then costs more memory in holes than it saves (GNU sort under an 8 MiB budget, copies up to
/// three quarters of a page: 55% more of the process's memory outside the region, 1.5x the
/// faults, 1.9x the time; up to a quarter: still 20% slower than whole copies; measured).
const PACKED_MAX: usize = PAGE_SIZE / 8;

/// Compressed copies are allocated in multiples of this many bytes (two sizes in all), so
/// the allocator's holes fit the next ones.
const PACKED_UNIT: usize = 256;

/// A page as the cache keeps it.
pub(super) enum Kept {
    /// All zeros.
    Zeros,
    /// LZ4 block of the page: its first `len` bytes of `data` (rounded up to [`PACKED_UNIT`]).
    Packed { len: u16, data: Box<[u8]> },
    /// Incompressible: the page as it is.
    Whole(Copy),
}

impl Kept {
    /// Packs `copy` (zeros, compressed, or as it is when compression does not pay); tries to
    /// compress only if `try_compress`.
    pub(super) fn pack(copy: Copy, try_compress: bool) -> Kept {
        if is_zeros(&copy) {
            return Kept::Zeros;
        }
        if !try_compress {
            return Kept::Whole(copy);
        }
        // The encoder wants room for its worst case up front.
        let mut out = [0u8; PAGE_SIZE * 2];
        match lz4_flex::block::compress_into(&copy[..], &mut out) {
            Ok(n) if n <= PACKED_MAX => {
                let mut data = vec![0u8; n.div_ceil(PACKED_UNIT) * PACKED_UNIT].into_boxed_slice();
                data[..n].copy_from_slice(&out[..n]);
                Kept::Packed { len: u16::try_from(n).unwrap_or(u16::MAX), data }
            }
            _ => Kept::Whole(copy),
        }
    }

    /// Bytes of data it holds.
    pub(super) fn bytes(&self) -> u64 {
        match self {
            Kept::Zeros => 0,
            Kept::Packed { data, .. } => data.len() as u64,
            Kept::Whole(_) => PAGE_SIZE as u64,
        }
    }

    /// Writes the page into `dst`. False if a packed copy does not decode to a whole page
    /// (which would mean the cache's memory was corrupted): the caller fetches it instead.
    pub(super) fn unpack_into(&self, dst: &mut [u8; PAGE_SIZE]) -> bool {
        match self {
            Kept::Zeros => {
                dst.fill(0);
                true
            }
            Kept::Packed { len, data } => data
                .get(..usize::from(*len))
                .is_some_and(|b| matches!(lz4_flex::block::decompress_into(b, &mut dst[..]), Ok(PAGE_SIZE))),
            Kept::Whole(c) => {
                dst.copy_from_slice(&c[..]);
                true
            }
        }
    }
}

fn is_zeros(page: &[u8; PAGE_SIZE]) -> bool {
    page.chunks_exact(8).all(|w| w.iter().fold(0u8, |a, b| a | b) == 0)
}

/// Whether compressing pays, judged from the recent pages: where most did not compress into an
/// eighth of a page (text, already compressed data), one in sixteen is tried, since compressing
/// costs the evictor 2-8 us a page. Pages of zeros count for nothing.
#[derive(Clone, Copy, Default)]
struct Tries {
    tried: u32,
    paid: u32,
    skipped: u32,
}

impl Tries {
    fn pack(&mut self, copy: Copy) -> Kept {
        if is_zeros(&copy) {
            return Kept::Zeros;
        }
        let try_it = self.tried < 64 || self.paid * 8 >= self.tried || self.skipped >= 15;
        if !try_it {
            self.skipped += 1;
            return Kept::Whole(copy);
        }
        self.skipped = 0;
        let kept = Kept::pack(copy, true);
        self.tried += 1;
        self.paid += u32::from(matches!(kept, Kept::Packed { .. }));
        if self.tried >= 4096 {
            (self.tried, self.paid) = (self.tried / 2, self.paid / 2);
        }
        kept
    }
}

/// Copies of recently evicted pages, oldest first out, within a capacity in bytes.
pub(super) struct VictimCache {
    map: Mutex<VictimMap>,
    /// Pages held, readable without the lock: the fault path asks it on every fault.
    len: AtomicU64,
    /// Memory held (data and bookkeeping), readable without the lock.
    bytes: AtomicU64,
    /// At most this much memory (data and bookkeeping); 0: no cache.
    pub(super) capacity: u64,
    /// Recent compressions: how many were tried, how many paid, and how many pages were kept
    /// whole untried since (see [`VictimCache::insert_all`]).
    tries: Mutex<Tries>,
}

impl VictimCache {
    /// A cache of at most `capacity` bytes of memory.
    pub(super) fn new(capacity: u64) -> VictimCache {
        VictimCache {
            map: Mutex::new(VictimMap::new(capacity)),
            len: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            capacity,
            tries: Mutex::new(Tries::default()),
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// Memory the cache holds (data and bookkeeping), in bytes.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Memory the cache holds in pages, rounded up, with the allocator's slack on top (about an
    /// eighth: measured 9% on whole-page copies).
    pub(super) fn footprint_pages(&self) -> u64 {
        let b = self.bytes();
        (b + b / 8).div_ceil(PAGE_SIZE as u64)
    }

    /// Keeps copies of these pages (compressing them first, outside the lock), dropping the
    /// oldest entries to stay within capacity.
    pub(super) fn insert_all(&self, copies: impl IntoIterator<Item = (u64, Copy)>) {
        if self.capacity == 0 {
            return;
        }
        let mut tries = *crate::lock(&self.tries);
        let packed: Vec<(u64, Kept)> = copies.into_iter().map(|(i, c)| (i, tries.pack(c))).collect();
        *crate::lock(&self.tries) = tries;
        if packed.is_empty() {
            return;
        }
        let mut m = crate::lock(&self.map);
        for (page, kept) in packed {
            m.insert(page, kept);
        }
        self.publish(&m);
    }

    /// Drops the copies of `pages` (stale once the pages are back), under one lock.
    pub(super) fn discard(&self, pages: &[u64]) {
        if self.len() == 0 || pages.is_empty() {
            return;
        }
        let mut m = crate::lock(&self.map);
        for p in pages {
            m.remove(*p);
        }
        self.publish(&m);
    }

    /// Takes the copy of `page` out of the cache into `dst`; false if there is none (or it
    /// would not decode). Takes no lock while the cache is empty; decompresses outside it.
    pub(super) fn take_into(&self, page: u64, dst: &mut [u8; PAGE_SIZE]) -> bool {
        if self.len() == 0 {
            return false;
        }
        let kept = {
            let mut m = crate::lock(&self.map);
            let kept = m.remove(page);
            self.publish(&m);
            kept
        };
        kept.is_some_and(|k| k.unpack_into(dst))
    }

    /// The copy of `page`, taken out of the cache.
    pub(super) fn take(&self, page: u64) -> Option<Copy> {
        let mut c: Copy =
            vec![0u8; PAGE_SIZE].into_boxed_slice().try_into().unwrap_or_else(|_| unreachable!("PAGE_SIZE bytes"));
        self.take_into(page, &mut c).then_some(c)
    }

    fn publish(&self, m: &VictimMap) {
        self.len.store(m.pages.len() as u64, Ordering::Relaxed);
        self.bytes.store(m.bytes, Ordering::Relaxed);
    }
}

/// The cache's bookkeeping, under its lock.
pub(super) struct VictimMap {
    /// Page -> (insertion number, copy).
    pages: std::collections::HashMap<u64, (u64, Kept)>,
    /// (page, insertion number), oldest first; entries whose number no longer matches are stale.
    order: VecDeque<(u64, u64)>,
    inserted: u64,
    /// Memory held: the entries' data and [`ENTRY_OVERHEAD`] each.
    bytes: u64,
    capacity: u64,
}

impl VictimMap {
    pub(super) fn new(capacity: u64) -> VictimMap {
        VictimMap { pages: std::collections::HashMap::new(), order: VecDeque::new(), inserted: 0, bytes: 0, capacity }
    }

    fn insert(&mut self, page: u64, kept: Kept) {
        self.inserted += 1;
        self.bytes += kept.bytes() + ENTRY_OVERHEAD;
        if let Some((_, old)) = self.pages.insert(page, (self.inserted, kept)) {
            self.bytes -= old.bytes() + ENTRY_OVERHEAD;
        }
        self.order.push_back((page, self.inserted));
        while self.bytes > self.capacity {
            let Some((old, n)) = self.order.pop_front() else { break };
            if self.pages.get(&old).is_some_and(|(m, _)| *m == n) {
                self.remove(old);
            }
        }
        // Stale names of pages taken back pile up only until the next sweep.
        if self.order.len() > 4 * self.pages.len().max(16) {
            let pages = &self.pages;
            self.order.retain(|(p, n)| pages.get(p).is_some_and(|(m, _)| m == n));
        }
    }

    fn remove(&mut self, page: u64) -> Option<Kept> {
        let (_, kept) = self.pages.remove(&page)?;
        self.bytes -= kept.bytes() + ENTRY_OVERHEAD;
        Some(kept)
    }
}

#[cfg(test)]
// Test data: bytes cut from counters on purpose.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    fn page(mut f: impl FnMut(usize) -> u8) -> Copy {
        let mut c: Copy = vec![0u8; PAGE_SIZE].into_boxed_slice().try_into().unwrap();
        for (i, b) in c.iter_mut().enumerate() {
            *b = f(i);
        }
        c
    }

    fn noise(seed: u64) -> Copy {
        let mut x = seed | 1;
        page(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
    }

    #[test]
    fn every_kind_of_page_comes_back_as_it_was() {
        let sparse = page(|i| if i % 512 == 0 { (i / 512) as u8 + 1 } else { 0 });
        let text = page(|i| b"the quick brown fox jumps over the lazy dog "[i % 44]);
        let cases = [page(|_| 0), sparse, text, noise(7)];
        let c = VictimCache::new(1 << 20);
        c.insert_all(cases.iter().cloned().enumerate().map(|(i, p)| (i as u64, p)));
        assert_eq!(c.len(), 4);
        for (i, want) in cases.iter().enumerate() {
            let mut got = [0xAAu8; PAGE_SIZE];
            assert!(c.take_into(i as u64, &mut got), "page {i} is in the cache");
            assert_eq!(&got[..], &want[..], "page {i} comes back unchanged");
        }
        assert_eq!((c.len(), c.bytes()), (0, 0), "taking every page empties the cache");
        assert!(!c.take_into(0, &mut [0; PAGE_SIZE]), "a page taken is gone");
    }

    #[test]
    fn compression_is_sampled_where_it_does_not_pay_and_resumes_where_it_does() {
        let mut t = Tries::default();
        for i in 0..200 {
            assert!(matches!(t.pack(page(|_| 0)), Kept::Zeros));
            assert!(matches!(t.pack(noise(i + 1)), Kept::Whole(_)));
        }
        assert!(t.tried < 64 + 20, "noise is tried one in sixteen after the first 64: {}", t.tried);
        // Compressible pages come back: every sampled one pays, and soon every one is tried.
        let packed: Vec<bool> = (0..400)
            .map(|i| matches!(t.pack(page(|b| if b == 0 { (i as u8) | 1 } else { 0 })), Kept::Packed { .. }))
            .collect();
        assert!(packed[..100].iter().any(|p| !p), "at first only samples are compressed");
        assert!(packed[300..].iter().all(|p| *p), "then every page again");
    }

    #[test]
    fn the_encoder_has_room_for_its_worst_case() {
        assert!(lz4_flex::block::get_maximum_output_size(PAGE_SIZE) <= 2 * PAGE_SIZE);
    }

    #[test]
    fn compressible_pages_take_less_and_the_incompressible_whole_pages() {
        assert!(matches!(Kept::pack(page(|_| 0), true), Kept::Zeros));
        let text = Kept::pack(page(|i| b"abcdefgh"[i % 8]), true);
        assert!(
            matches!(text, Kept::Packed { .. }) && text.bytes() == PACKED_UNIT as u64,
            "repetitive text packs small"
        );
        assert!(matches!(Kept::pack(noise(3), true), Kept::Whole(_)), "noise is kept whole");
    }

    #[test]
    fn capacity_is_memory_so_compressible_pages_fit_many_times_more() {
        let cap = 64 * (PAGE_SIZE as u64 + ENTRY_OVERHEAD);
        let whole = VictimCache::new(cap);
        whole.insert_all((0..1000).map(|i| (i, noise(i + 1))));
        assert_eq!(whole.len(), 64, "64 incompressible pages fit");
        assert!(whole.bytes() <= cap);
        let sparse = VictimCache::new(cap);
        sparse.insert_all((0..5000).map(|i| (i, page(|b| if b == 0 { i as u8 | 1 } else { 0 }))));
        assert!((640..5000).contains(&sparse.len()), "sparse pages fit at least ten times as many: {}", sparse.len());
        assert!(sparse.bytes() <= cap);
        // The oldest went first: the last page inserted is still there, the first is not.
        assert!(sparse.take(4999).is_some() && sparse.take(0).is_none());
    }

    #[test]
    fn replacing_and_discarding_keep_the_count_of_memory_exact() {
        let c = VictimCache::new(1 << 20);
        c.insert_all([(5, noise(1)), (6, page(|_| 0))]);
        c.insert_all([(5, page(|_| 0))]);
        assert_eq!((c.len(), c.bytes()), (2, 2 * ENTRY_OVERHEAD), "a page inserted again replaces its copy");
        c.discard(&[5, 6, 7]);
        assert_eq!((c.len(), c.bytes()), (0, 0));
        let none = VictimCache::new(0);
        none.insert_all([(1, noise(2))]);
        assert_eq!(none.len(), 0, "a cache of no capacity keeps nothing");
    }
}
