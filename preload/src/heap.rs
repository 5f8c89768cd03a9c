//! A page-granular first-fit allocator over one address range: which pages of the network-RAM
//! region hold which allocation. Pure bookkeeping, no memory is touched.

use std::collections::{BTreeMap, HashMap};

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
    /// Live allocations by the byte offset handed out.
    used: HashMap<u64, Block>,
    page: u64,
}

impl Heap {
    /// A heap of `pages` pages of `page` bytes, all free.
    pub fn new(pages: u64, page: u64) -> Heap {
        let mut free = BTreeMap::new();
        if pages > 0 {
            free.insert(0, pages);
        }
        Heap { free, used: HashMap::new(), page }
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
        let (mut start, mut len) = (b.start, b.pages);
        // Merge with the free neighbours.
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(b.start + b.pages)) {
            self.free.remove(&(b.start + b.pages));
            len += nl;
        }
        self.free.insert(start, len);
        Some(b)
    }

    /// Live allocations.
    pub fn live(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
