//! A page-granular first-fit allocator over one address range: which pages of the network-RAM
//! region hold which allocation. Pure bookkeeping, no memory is touched.
//!
//! Besides whole blocks, page ranges can be released and blocks grown in place, as `munmap` and
//! `mremap` do to anonymous mappings: releasing part of a block trims it, or splits it in two,
//! and the pieces outside the range stay allocated (an allocator that maps too much and trims
//! the ends keeps exactly its middle).

use std::collections::BTreeMap;

/// One allocation: pages `start..start + pages` of the range, of which the caller got the
/// address `user` (aligned inside the block) and asked for `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// First page of the block.
    pub start: u64,
    /// Pages in the block.
    pub pages: u64,
    /// Bytes the caller asked for.
    pub size: usize,
}

/// Free and used page ranges of one region.
#[derive(Debug)]
pub struct Heap {
    /// Free ranges: first page -> length in pages; never two adjacent.
    free: BTreeMap<u64, u64>,
    /// Live allocations by the byte offset handed out (always their first page's offset), in
    /// address order.
    used: BTreeMap<u64, Block>,
    page: u64,
}

impl Heap {
    /// A heap of `pages` pages of `page` bytes, all free.
    pub fn new(pages: u64, page: u64) -> Heap {
        let mut free = BTreeMap::new();
        if pages > 0 {
            free.insert(0, pages);
        }
        Heap { free, used: BTreeMap::new(), page }
    }

    /// Allocates `size` bytes aligned to `align` (a power of two); returns the byte offset.
    pub fn alloc(&mut self, size: usize, align: u64) -> Option<u64> {
        let align = align.max(self.page);
        let align_pages = align / self.page;
        let pages = (size as u64).div_ceil(self.page).max(1);
        // First fit: the first free range that holds `pages` after aligning its start.
        let (start, len, at) = self.free.iter().find_map(|(&start, &len)| {
            let at = start.div_ceil(align_pages) * align_pages;
            (at + pages <= start + len).then_some((start, len, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if at + pages < start + len {
            self.free.insert(at + pages, start + len - at - pages);
        }
        let offset = at * self.page;
        self.used.insert(offset, Block { start: at, pages, size });
        Some(offset)
    }

    /// The allocation at byte offset `offset`, if live.
    pub fn get(&self, offset: u64) -> Option<Block> {
        self.used.get(&offset).copied()
    }

    /// Frees the allocation at `offset`; returns it, or `None` if nothing was allocated there.
    pub fn free(&mut self, offset: u64) -> Option<Block> {
        let b = self.used.remove(&offset)?;
        self.insert_free(b.start, b.pages);
        Some(b)
    }

    /// Adds pages `start..start + len` to the free ranges, merged with their neighbours.
    fn insert_free(&mut self, start: u64, len: u64) {
        let (mut start, mut len) = (start, len);
        let end = start + len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&end) {
            self.free.remove(&end);
            len += nl;
        }
        self.free.insert(start, len);
    }

    /// The allocated parts of pages `start..start + pages`, as (first page, pages) runs in
    /// address order.
    pub fn allocated_within(&self, start: u64, pages: u64) -> Vec<(u64, u64)> {
        let end = start.saturating_add(pages);
        let mut runs: Vec<(u64, u64)> = self
            .used
            .range(..end.saturating_mul(self.page))
            .rev()
            .map(|(_, b)| *b)
            .take_while(|b| b.start + b.pages > start)
            .map(|b| {
                let (a, z) = (b.start.max(start), (b.start + b.pages).min(end));
                (a, z - a)
            })
            .collect();
        runs.reverse();
        runs
    }

    /// Releases pages `start..start + pages`, whatever blocks they belong to, as `munmap` does:
    /// a block that overlaps the range loses the overlap; what it has before and after the range
    /// stays allocated (as blocks of their own). Pages not allocated are left alone. Returns the
    /// runs that were allocated and are free now.
    pub fn release(&mut self, start: u64, pages: u64) -> Vec<(u64, u64)> {
        let end = start.saturating_add(pages);
        let runs = self.allocated_within(start, pages);
        let hit: Vec<Block> = self
            .used
            .range(..end.saturating_mul(self.page))
            .rev()
            .map(|(_, b)| *b)
            .take_while(|b| b.start + b.pages > start)
            .collect();
        for b in hit {
            self.used.remove(&(b.start * self.page));
            let b_end = b.start + b.pages;
            if b.start < start {
                let head = start - b.start;
                let size = b.size.min(usize::try_from(head * self.page).unwrap_or(usize::MAX));
                self.used.insert(b.start * self.page, Block { start: b.start, pages: head, size });
            }
            if b_end > end {
                let tail = b_end - end;
                let size = usize::try_from(tail * self.page).unwrap_or(usize::MAX);
                self.used.insert(end * self.page, Block { start: end, pages: tail, size });
            }
        }
        for &(s, n) in &runs {
            self.insert_free(s, n);
        }
        runs
    }

    /// Grows the block that ends at page `end` by `extra` pages, if the pages after it are free
    /// (as `mremap` grows a mapping in place); returns whether it did.
    pub fn grow_in_place(&mut self, end: u64, extra: u64) -> bool {
        let Some((&off, &b)) = self.used.range(..end * self.page).next_back() else { return false };
        if b.start + b.pages != end {
            return false;
        }
        let Some(&len) = self.free.get(&end) else { return false };
        if len < extra {
            return false;
        }
        self.free.remove(&end);
        if len > extra {
            self.free.insert(end + extra, len - extra);
        }
        let grown = b.pages + extra;
        let size = usize::try_from(grown * self.page).unwrap_or(usize::MAX);
        self.used.insert(off, Block { start: b.start, pages: grown, size });
        true
    }

    /// Live allocations.
    pub fn live(&self) -> usize {
        self.used.len()
    }
}

/// The heap against a page-by-page model, for the property test and the fuzz target: any
/// sequence of allocations, frees, partial releases (`munmap`) and in-place growth (`mremap`)
/// never hands a page out twice, releases exactly the allocated pages of a range, keeps the
/// pieces outside a release allocated, and accounts for every page.
#[cfg(any(test, fuzzing))]
pub mod model {
    use super::Heap;

    /// One operation on a heap of [`PAGES`] pages.
    #[derive(Clone, Debug)]
    pub enum Op {
        /// Allocate this many pages.
        Alloc(u64),
        /// Free the k-th live block (modulo their number).
        Free(usize),
        /// Release pages `start..start + n` (`munmap`).
        Release(u64, u64),
        /// Grow the k-th live block in place by n pages (`mremap`).
        Grow(usize, u64),
    }

    /// Pages of the modelled heap.
    pub const PAGES: u64 = 64;

    /// Operations read from arbitrary bytes, three per operation.
    pub fn ops_from_bytes(data: &[u8]) -> Vec<Op> {
        data.chunks_exact(3)
            .map(|c| {
                let (a, b) = (u64::from(c[1]), u64::from(c[2]));
                match c[0] % 4 {
                    0 => Op::Alloc(1 + a % 11),
                    1 => Op::Free(usize::from(c[1])),
                    2 => Op::Release(a % PAGES, 1 + b % 19),
                    _ => Op::Grow(usize::from(c[1]), 1 + b % 7),
                }
            })
            .collect()
    }

    /// Runs `ops`; the first disagreement with the model, if any.
    #[allow(clippy::cast_possible_truncation)]
    pub fn check(ops: &[Op]) -> Result<(), String> {
        let mut h = Heap::new(PAGES, 4096);
        let mut model: Vec<Option<u64>> = vec![None; PAGES as usize]; // owner block start
        let mut blocks: Vec<u64> = Vec::new(); // live block offsets, for Free/Grow picks
        let fail = |why: String| Err(why);
        for o in ops {
            match *o {
                Op::Alloc(n) => {
                    if let Some(off) = h.alloc((n * 4096) as usize, 4096) {
                        let s = off / 4096;
                        for p in s..s + n {
                            if model[p as usize].is_some() {
                                return fail(format!("page {p} handed out twice"));
                            }
                            model[p as usize] = Some(s);
                        }
                        blocks.push(off);
                    }
                }
                Op::Free(k) if !blocks.is_empty() => {
                    let off = blocks.remove(k % blocks.len());
                    if let Some(b) = h.free(off) {
                        for p in b.start..b.start + b.pages {
                            model[p as usize] = None;
                        }
                    }
                }
                Op::Release(s, n) => {
                    let want: Vec<u64> = (s..(s + n).min(PAGES)).filter(|p| model[*p as usize].is_some()).collect();
                    let runs = h.release(s, n);
                    let got: Vec<u64> = runs.iter().flat_map(|(a, m)| *a..*a + *m).collect();
                    if got != want {
                        return fail(format!("release({s}, {n}) freed {got:?}, the model says {want:?}"));
                    }
                    for p in got {
                        model[p as usize] = None;
                    }
                    // Pieces after the range became blocks of their own.
                    let end = (s + n).min(PAGES);
                    if end < PAGES && model[end as usize].is_some() && (end == 0 || model[end as usize - 1].is_none()) {
                        let owner = model[end as usize];
                        let mut p = end;
                        while p < PAGES && model[p as usize] == owner {
                            model[p as usize] = Some(end);
                            p += 1;
                        }
                        blocks.push(end * 4096);
                    }
                }
                Op::Grow(k, n) if !blocks.is_empty() => {
                    let off = blocks[k % blocks.len()];
                    if let Some(b) = h.get(off) {
                        let end = b.start + b.pages;
                        let free_after = (end..(end + n)).all(|p| p < PAGES && model[p as usize].is_none());
                        if h.grow_in_place(end, n) != free_after {
                            return fail(format!("grow_in_place({end}, {n}) disagrees with the model ({free_after})"));
                        }
                        if free_after {
                            for p in end..end + n {
                                model[p as usize] = Some(b.start);
                            }
                        }
                    }
                }
                _ => {}
            }
            // Every block the heap knows matches the model.
            for (off, b) in &h.used {
                if *off != b.start * 4096 {
                    return fail(format!("block at {off} starts at page {}", b.start));
                }
                if let Some(p) = (b.start..b.start + b.pages).find(|p| model[*p as usize].is_none()) {
                    return fail(format!("page {p} allocated in the heap, free in the model"));
                }
            }
            let allocated: u64 = h.used.values().map(|b| b.pages).sum();
            if allocated != model.iter().filter(|m| m.is_some()).count() as u64 {
                return fail(format!("{allocated} pages allocated, the model has another count"));
            }
            let free: u64 = h.free.values().sum();
            if free + allocated != PAGES {
                return fail(format!("{free} free + {allocated} allocated != {PAGES}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use super::model::{check, Op};

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..12).prop_map(Op::Alloc),
            (0usize..16).prop_map(Op::Free),
            ((0u64..64), (1u64..20)).prop_map(|(s, n)| Op::Release(s, n)),
            ((0usize..16), (1u64..8)).prop_map(|(k, n)| Op::Grow(k, n)),
        ]
    }

    proptest! {
        /// Any sequence of allocations, frees, partial releases and in-place growth against a
        /// page-by-page model (see [`super::model`]).
        #[test]
        fn map_unmap_remap_sequences_match_a_page_model(ops in proptest::collection::vec(op(), 1..60)) {
            prop_assert_eq!(check(&ops), Ok(()));
        }
    }

    #[test]
    fn trimming_both_ends_keeps_the_middle() {
        // An allocator maps 16 pages to get an aligned 8 and unmaps what it does not need.
        let mut h = Heap::new(64, 4096);
        let off = h.alloc(16 * 4096, 4096).unwrap();
        assert_eq!(h.release(0, 3), vec![(0, 3)]);
        assert_eq!(h.release(11, 5), vec![(11, 5)]);
        assert_eq!(h.get(off), None, "the head is gone");
        let mid = h.get(3 * 4096).unwrap();
        assert_eq!((mid.start, mid.pages), (3, 8));
        // The freed ends are reused, never the kept middle.
        let a = h.alloc(3 * 4096, 4096).unwrap();
        assert_eq!(a, 0);
        assert!(h.alloc(60 * 4096, 4096).is_none());
        // A hole punched in the middle splits it.
        assert_eq!(h.release(5, 2), vec![(5, 2)]);
        assert_eq!(h.get(3 * 4096).unwrap().pages, 2);
        assert_eq!(h.get(7 * 4096).unwrap().pages, 4);
        // Releasing unallocated pages is a no-op, as munmap of an unmapped range is.
        assert!(h.release(40, 10).is_empty());
        // Grow in place when the pages after are free; not over another block.
        assert!(h.grow_in_place(11, 4));
        assert_eq!(h.get(7 * 4096).unwrap().pages, 8);
        assert!(!h.grow_in_place(6, 1), "no block ends at page 6");
        assert!(!h.grow_in_place(5, 3), "only two free pages follow the block at 3");
        assert!(h.grow_in_place(5, 2), "the hole refills");
    }

    #[test]
    fn first_fit_with_alignment_and_merging() {
        let mut h = Heap::new(100, 4096);
        let a = h.alloc(4096 * 10, 4096).unwrap();
        let b = h.alloc(1, 4096).unwrap();
        let c = h.alloc(4096 * 5, 4096 * 8).unwrap();
        assert_eq!((a, b), (0, 10 * 4096));
        assert_eq!(c % (8 * 4096), 0, "aligned");
        assert_eq!(h.get(b).unwrap().pages, 1);
        assert_eq!(h.free(a).unwrap().size, 4096 * 10);
        assert!(h.free(a).is_none(), "no double free");
        assert!(h.free(12345).is_none());
        // The freed range is reused first.
        assert_eq!(h.alloc(4096 * 3, 4096), Some(0));
        h.free(0);
        h.free(b);
        h.free(c);
        assert_eq!(h.live(), 0);
        // Everything merged back into one range.
        assert_eq!(h.alloc(4096 * 100, 4096), Some(0));
        assert_eq!(h.alloc(1, 4096), None, "full");
    }
}
