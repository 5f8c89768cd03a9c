//! The messages of region post-copy, little-endian:
//!
//! ```text
//! DESCRIBE  -> addr u64 | pages u64
//! COMMIT    (the region is mapped at the destination, which runs from now on)
//! FETCH     page u64 -> kind u8 | the page's chunk: present bits [u64; 8] | 4096 bytes if kind 1
//!           (kind 0: zeros, never there; 1: the page; 2: sent already, by the stream)
//! NEXT      hint u64 | most u32 -> records: 0 | chunk u64 | present bits [u64; 8] (a chunk just
//!           learned), 1 | page u64 | 4096 bytes; nothing once all are sent
//! DONE      (the stream found nothing left: the destination has every page the source had, and
//!           the present bits of every chunk the stream learned; the source may go)
//! ```
//!
//! The source learns which pages exist a chunk of [`CHUNK`] pages at a time (write-protecting
//! and scanning it when first asked about it), so freezing costs the same whatever the size.

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
/// The transport method by which the destination lets the source go.
pub(crate) const DONE: u64 = 0x4d49_4705;
/// Most pages one `NEXT` answer carries.
pub(crate) const MOST: u32 = 64;
/// Pages whose presence is learned together (2 MiB).
pub const CHUNK: u64 = 512;
/// Bytes of a chunk's present bits (a bit for each of the [`CHUNK`] pages).
pub(crate) const CHUNK_BITS: usize = 512 / 8;
/// `FETCH` answers: the page was never there (zeros), here it is, or it was sent already.
pub(crate) const ZERO: u8 = 0;
/// See [`ZERO`].
pub(crate) const DATA: u8 = 1;
/// See [`ZERO`].
pub(crate) const SENT: u8 = 2;

/// What the destination learns of a frozen region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Its address (the same in both processes).
    pub addr: u64,
    /// Its size in pages.
    pub pages: u64,
}

impl Descriptor {
    /// Its encoding.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&self.addr.to_le_bytes());
        b.extend_from_slice(&self.pages.to_le_bytes());
        b
    }

    /// Decodes and checks one (page-aligned, inside the address space).
    pub(crate) fn decode(b: &[u8]) -> Result<Descriptor, MigrateError> {
        let bad = |why: &str| MigrateError::Protocol(format!("descriptor: {why}"));
        let b: &[u8; 16] = b.try_into().map_err(|_| bad("malformed"))?;
        let addr = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let pages = u64::from_le_bytes(b[8..].try_into().unwrap_or_default());
        // x86-64's user address space: 47 bits (a larger claim is refused before anything is
        // allocated for it).
        const USER_END: u64 = 1 << 47;
        if addr % PAGE_SIZE as u64 != 0
            || pages == 0
            || pages.checked_mul(PAGE_SIZE as u64).and_then(|l| l.checked_add(addr)).is_none_or(|end| end > USER_END)
        {
            return Err(bad("not a page-aligned region in the address space"));
        }
        Ok(Descriptor { addr, pages })
    }
}

/// A record of a `NEXT` answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// A chunk's present pages, as the source learned them.
    Chunk(u64, [u64; CHUNK_BITS / 8]),
    /// A page and its bytes.
    Page(u64, &'a [u8]),
}

/// Record kinds of a `NEXT` answer.
pub(crate) const RECORD_CHUNK: u8 = 0;
/// See [`RECORD_CHUNK`].
pub(crate) const RECORD_PAGE: u8 = 1;

/// Appends a chunk record.
pub(crate) fn encode_chunk(c: u64, bits: &[u64; CHUNK_BITS / 8], out: &mut Vec<u8>) {
    out.push(RECORD_CHUNK);
    out.extend_from_slice(&c.to_le_bytes());
    bits.iter().for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
}

/// Decodes a `NEXT` answer, every chunk and page inside a region of `pages` pages.
pub(crate) fn decode_batch(mut b: &[u8], pages: u64) -> Result<Vec<Record<'_>>, MigrateError> {
    let bad = |why: String| MigrateError::Protocol(format!("a batch: {why}"));
    let mut out = Vec::new();
    while let Some((&kind, rest)) = b.split_first() {
        let (n, rest) = rest.split_at_checked(8).ok_or_else(|| bad("cut short".into()))?;
        let n = u64::from_le_bytes(n.try_into().unwrap_or_default());
        match kind {
            RECORD_CHUNK => {
                if n >= pages.div_ceil(CHUNK) {
                    return Err(bad(format!("chunk {n} is outside the region")));
                }
                let (bits, rest) = rest.split_at_checked(CHUNK_BITS).ok_or_else(|| bad("cut short".into()))?;
                let mut words = [0u64; CHUNK_BITS / 8];
                for (w, c) in words.iter_mut().zip(bits.chunks_exact(8)) {
                    *w = u64::from_le_bytes(c.try_into().unwrap_or_default());
                }
                out.push(Record::Chunk(n, words));
                b = rest;
            }
            RECORD_PAGE => {
                if n >= pages {
                    return Err(bad(format!("page {n} is outside the region")));
                }
                let (bytes, rest) = rest.split_at_checked(PAGE_SIZE).ok_or_else(|| bad("cut short".into()))?;
                out.push(Record::Page(n, bytes));
                b = rest;
            }
            k => return Err(bad(format!("a record of kind {k}"))),
        }
    }
    Ok(out)
}

const _: () = assert!(CHUNK_BITS as u64 * 8 == CHUNK);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_and_bad_ones_are_refused() {
        let d = Descriptor { addr: 0x7000_0000_0000, pages: 100 };
        assert_eq!(Descriptor::decode(&d.encode()).unwrap(), d);
        for bad in [Descriptor { addr: 12, ..d }, Descriptor { pages: 0, ..d }, Descriptor { pages: u64::MAX / 2, ..d }]
        {
            assert!(Descriptor::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        assert!(Descriptor::decode(&d.encode()[..12]).is_err());
        assert!(decode_batch(&[1; 9], 10).is_err());
        let mut batch = vec![RECORD_PAGE];
        batch.extend_from_slice(&11u64.to_le_bytes());
        batch.extend_from_slice(&[0; PAGE_SIZE]);
        encode_chunk(1, &[5; CHUNK_BITS / 8], &mut batch);
        assert!(decode_batch(&batch, 10).is_err());
        let got = decode_batch(&batch, 1100).unwrap();
        assert_eq!(got, [Record::Page(11, &[0; PAGE_SIZE][..]), Record::Chunk(1, [5; CHUNK_BITS / 8])]);
        assert!(decode_batch(&batch[..batch.len() - 1], 1100).is_err());
        assert!(decode_batch(&[7, 0, 0, 0, 0, 0, 0, 0, 0], 1100).is_err());
    }
}
