//! The messages of region post-copy, little-endian:
//!
//! ```text
//! DESCRIBE  -> addr u64 | pages u64 | runs u64 | (first u64, end u64) * runs   (present pages)
//! COMMIT    (the region is mapped at the destination, which runs from now on)
//! FETCH     page u64 -> the page's 4096 bytes, or nothing if it was sent already
//! NEXT      hint u64 | most u32 -> (page u64 | 4096 bytes) * n; nothing once all are sent
//! ```

use std::ops::Range;

use mosaic_page::PAGE_SIZE;

use crate::MigrateError;

/// The transport method of the descriptor.
pub(crate) const DESCRIBE: u64 = 0x4d49_4701;
/// The transport method by which the destination takes the region over.
pub(crate) const COMMIT: u64 = 0x4d49_4704;
/// The transport method of a page a fault needs.
pub(crate) const FETCH: u64 = 0x4d49_4702;
/// The transport method of the background stream's next batch.
pub(crate) const NEXT: u64 = 0x4d49_4703;
/// Most pages one `NEXT` answer carries.
pub(crate) const MOST: u32 = 64;

/// What the destination learns of a frozen region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Its address (the same in both processes).
    pub addr: u64,
    /// Its size in pages.
    pub pages: u64,
    /// The pages present at the source when it froze (the others are zeros), as runs.
    pub present: Vec<Range<u64>>,
}

impl Descriptor {
    /// Its encoding.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + 16 * self.present.len());
        for v in [self.addr, self.pages, self.present.len() as u64] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for r in &self.present {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.end.to_le_bytes());
        }
        b
    }

    /// Decodes and checks one (runs in order, inside the region, the region inside the address
    /// space and page-aligned).
    pub(crate) fn decode(b: &[u8]) -> Result<Descriptor, MigrateError> {
        let bad = |why: &str| MigrateError::Protocol(format!("descriptor: {why}"));
        let words: Vec<u64> = b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        if b.len() % 8 != 0 || words.len() < 3 {
            return Err(bad("malformed"));
        }
        let (addr, pages, runs) = (words[0], words[1], words[2]);
        if words.len() as u64 != 3 + 2 * runs {
            return Err(bad("the runs do not match their count"));
        }
        if addr % PAGE_SIZE as u64 != 0
            || pages == 0
            || pages.checked_mul(PAGE_SIZE as u64).and_then(|l| l.checked_add(addr)).is_none()
        {
            return Err(bad("not a page-aligned region in the address space"));
        }
        let present: Vec<Range<u64>> = words[3..].chunks_exact(2).map(|c| c[0]..c[1]).collect();
        let mut last = 0;
        for r in &present {
            if r.start < last || r.start >= r.end || r.end > pages {
                return Err(bad("present runs out of order or outside the region"));
            }
            last = r.end;
        }
        Ok(Descriptor { addr, pages, present })
    }

    /// Pages present at the source.
    pub fn present_pages(&self) -> u64 {
        self.present.iter().map(|r| r.end - r.start).sum()
    }
}

/// Decodes a `NEXT` answer: (page, bytes) pairs, each page inside `pages`.
pub(crate) fn decode_batch(b: &[u8], pages: u64) -> Result<Vec<(u64, &[u8])>, MigrateError> {
    const ITEM: usize = 8 + PAGE_SIZE;
    if b.len() % ITEM != 0 {
        return Err(MigrateError::Protocol(format!("a batch of {} bytes", b.len())));
    }
    b.chunks_exact(ITEM)
        .map(|c| {
            let page = u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
            if page >= pages {
                return Err(MigrateError::Protocol(format!("page {page} is outside the region")));
            }
            Ok((page, &c[8..]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_and_bad_ones_are_refused() {
        let d = Descriptor { addr: 0x7000_0000_0000, pages: 100, present: vec![0..3, 10..100] };
        assert_eq!(Descriptor::decode(&d.encode()).unwrap(), d);
        assert_eq!(d.present_pages(), 93);
        for bad in [
            Descriptor { present: [(10, 3)].map(|(a, b)| a..b).to_vec(), ..d.clone() },
            Descriptor { present: [(0, 101)].map(|(a, b)| a..b).to_vec(), ..d.clone() },
            Descriptor { present: vec![5..9, 0..3], ..d.clone() },
            Descriptor { addr: 12, ..d.clone() },
            Descriptor { pages: 0, present: vec![], ..d.clone() },
        ] {
            assert!(Descriptor::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        assert!(Descriptor::decode(&d.encode()[..20]).is_err());
        let mut cut = d.encode();
        cut.truncate(cut.len() - 8);
        assert!(Descriptor::decode(&cut).is_err());
        assert!(decode_batch(&[0; 9], 10).is_err());
        let mut batch = 11u64.to_le_bytes().to_vec();
        batch.extend_from_slice(&[0; PAGE_SIZE]);
        assert!(decode_batch(&batch, 10).is_err());
        assert_eq!(decode_batch(&batch, 12).unwrap()[0].0, 11);
    }
}
