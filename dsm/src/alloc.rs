//! Allocation inside the shared region: a first-fit allocator over a range of offsets.
//!
//! It hands out offsets, never touches the memory (so allocating faults in no page), and is
//! deterministic: the same calls give the same offsets. That makes collective allocation simple:
//! every node keeps its own copy of the collective heap's allocator and, calling it in the same
//! order with the same sizes, gets the same offsets (the job checks that they agree).
//!
//! Blocks of a page or more are page-aligned (a page is the unit of coherence: a block of its
//! own pages shares none with another block), smaller ones 64-byte aligned (a cache line).
//! Freed blocks merge with free neighbours and are reused.

use std::collections::BTreeMap;

use mosaic_page::PAGE_SIZE;

/// The smallest alignment and size granule of a block.
pub const MIN_ALIGN: u64 = 64;

/// Why an allocation or a free failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// Zero bytes were asked for.
    #[error("an allocation of zero bytes")]
    Zero,
    /// No free block is large enough.
    #[error("no room for {bytes} bytes: {free} bytes free, the largest free block {largest} bytes")]
    Full {
        /// Bytes asked for.
        bytes: u64,
        /// Bytes free in all.
        free: u64,
        /// The largest free block.
        largest: u64,
    },
    /// The offset is not the start of an allocated block.
    #[error("offset {offset:#x} is not the start of a block allocated here")]
    NotAllocated {
        /// The offset given.
        offset: u64,
    },
}

/// A first-fit allocator of the offsets `start..start + len`.
#[derive(Clone, Debug)]
pub struct Arena {
    /// Free blocks: start -> length, never adjacent (merged).
    free: BTreeMap<u64, u64>,
    /// Allocated blocks: start -> length.
    used: BTreeMap<u64, u64>,
}

fn round_up(n: u64, to: u64) -> Option<u64> {
    n.checked_add(to - 1).map(|n| n / to * to)
}

impl Arena {
    /// An allocator of `start..start + len`, all free (cut short at the end of the offsets).
    pub fn new(start: u64, len: u64) -> Arena {
        let len = len.min(u64::MAX - start);
        let mut free = BTreeMap::new();
        if len > 0 {
            free.insert(start, len);
        }
        Arena { free, used: BTreeMap::new() }
    }

    /// Allocates a block of at least `bytes` bytes; returns its first offset.
    pub fn alloc(&mut self, bytes: u64) -> Result<u64, AllocError> {
        if bytes == 0 {
            return Err(AllocError::Zero);
        }
        let page = PAGE_SIZE as u64;
        let align = if bytes >= page { page } else { MIN_ALIGN };
        let full = || AllocError::Full {
            bytes,
            free: self.free.values().sum(),
            largest: self.free.values().copied().max().unwrap_or(0),
        };
        let size = round_up(bytes, align).ok_or_else(full)?;
        let found = self.free.iter().find_map(|(&start, &len)| {
            let at = round_up(start, align)?;
            (at.checked_add(size)? <= start + len).then_some((start, len, at))
        });
        let Some((start, len, at)) = found else { return Err(full()) };
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let end = at + size;
        if end < start + len {
            self.free.insert(end, start + len - end);
        }
        self.used.insert(at, size);
        Ok(at)
    }

    /// Frees the block that starts at `offset`; returns its length.
    pub fn free(&mut self, offset: u64) -> Result<u64, AllocError> {
        let len = self.used.remove(&offset).ok_or(AllocError::NotAllocated { offset })?;
        let (mut start, mut end) = (offset, offset + len);
        if let Some((&prev, &plen)) = self.free.range(..start).next_back() {
            if prev + plen == start {
                self.free.remove(&prev);
                start = prev;
            }
        }
        if let Some(next_len) = self.free.remove(&end) {
            end += next_len;
        }
        self.free.insert(start, end - start);
        Ok(len)
    }

    /// The length of the allocated block that starts at `offset`, if there is one.
    pub fn block(&self, offset: u64) -> Option<u64> {
        self.used.get(&offset).copied()
    }

    /// Bytes free.
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: u64 = PAGE_SIZE as u64;

    #[test]
    fn small_blocks_are_cache_line_aligned_and_large_ones_page_aligned() {
        let mut a = Arena::new(0, 16 * PAGE);
        assert_eq!(a.alloc(8), Ok(0));
        assert_eq!(a.alloc(65), Ok(64)); // two lines
        assert_eq!(a.alloc(PAGE + 1), Ok(PAGE)); // two pages, on a page boundary
        assert_eq!(a.alloc(1), Ok(192)); // the gap before it is reused
        assert_eq!(a.alloc(0), Err(AllocError::Zero));
        assert!(matches!(a.alloc(20 * PAGE), Err(AllocError::Full { bytes, .. }) if bytes == 20 * PAGE));
    }

    #[test]
    fn freed_blocks_merge_and_are_reused() {
        let mut a = Arena::new(PAGE, 4 * PAGE);
        let x = a.alloc(PAGE).unwrap();
        let y = a.alloc(PAGE).unwrap();
        let z = a.alloc(2 * PAGE).unwrap();
        assert!(a.alloc(1).is_err(), "full");
        assert_eq!(a.free(y), Ok(PAGE));
        assert_eq!(a.free(y), Err(AllocError::NotAllocated { offset: y }), "freed twice");
        a.free(x).unwrap();
        // x and y merged: a block of two pages fits where they were.
        assert_eq!(a.alloc(2 * PAGE), Ok(x));
        a.free(z).unwrap();
        a.free(x).unwrap();
        assert_eq!(a.free_bytes(), 4 * PAGE);
        assert_eq!(a.alloc(4 * PAGE), Ok(PAGE), "everything merged back into one block");
        assert_eq!(a.free(PAGE + 8), Err(AllocError::NotAllocated { offset: PAGE + 8 }));
    }

    proptest! {
        /// Blocks never overlap, stay inside the arena, and freeing everything gives the whole
        /// arena back as one block.
        #[test]
        fn blocks_never_overlap(ops in proptest::collection::vec((0u64..3 * PAGE, any::<bool>()), 1..200)) {
            let (start, len) = (3 * PAGE, 64 * PAGE);
            let mut a = Arena::new(start, len);
            let mut live: BTreeMap<u64, u64> = BTreeMap::new();
            for (bytes, free) in ops {
                if free && !live.is_empty() {
                    let k = *live.keys().nth(usize::try_from(bytes).unwrap() % live.len()).unwrap();
                    prop_assert_eq!(a.free(k), Ok(live.remove(&k).unwrap()));
                    continue;
                }
                if let Ok(at) = a.alloc(bytes) {
                    let size = a.block(at).unwrap();
                    prop_assert!(size >= bytes && at >= start && at + size <= start + len);
                    prop_assert_eq!(at % if bytes >= PAGE { PAGE } else { MIN_ALIGN }, 0);
                    if let Some((&p, &plen)) = live.range(..at).next_back() {
                        prop_assert!(p + plen <= at, "overlaps the block before");
                    }
                    if let Some((&n, _)) = live.range(at..).next() {
                        prop_assert!(at + size <= n, "overlaps the block after");
                    }
                    live.insert(at, size);
                }
            }
            for k in live.keys().copied().collect::<Vec<_>>() {
                a.free(k).unwrap();
            }
            prop_assert_eq!(a.alloc(len), Ok(start));
        }
    }
}
