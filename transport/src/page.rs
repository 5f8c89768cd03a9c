//! Page-aligned page buffers, and the server's one-sided page window.

use std::sync::Mutex;

use crate::sys::Mapping;
pub use mosaic_page::Page;

use crate::wire::{Status, PAGE_SIZE};

/// Number of lock stripes guarding window pages.
const STRIPES: usize = 256;

/// Memory a server exposes for one-sided page reads and writes, indexed by page.
///
/// This is what RDMA serves without the server's CPU; over tcp and shm the server's connection
/// thread copies pages in and out. Pages are guarded by striped locks, so a page read never
/// observes half of a concurrent write. The memory is reserved with `MAP_NORESERVE` and costs
/// nothing until a page is first written.
pub struct PageWindow {
    map: Mapping,
    pages: u64,
    stripes: Vec<Mutex<()>>,
}

impl PageWindow {
    /// Reserves a window of `pages` zero pages.
    pub fn new(pages: u64) -> std::io::Result<PageWindow> {
        let bytes = usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "window too large"))?;
        Ok(PageWindow {
            map: Mapping::anonymous(bytes)?,
            pages,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// The number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The first byte of the window, for registering it with an RDMA device.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// The window's size in bytes.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn byte_len(&self) -> usize {
        self.map.len()
    }

    fn locate(&self, index: u64) -> Result<(*mut u8, &Mutex<()>), Status> {
        if index >= self.pages {
            return Err(Status::PageOutOfRange);
        }
        // index < pages, and pages * PAGE_SIZE fits in usize (checked in new).
        let i = usize::try_from(index).map_err(|_| Status::PageOutOfRange)?;
        // SAFETY: i * PAGE_SIZE < map.len(), so the offset stays inside the mapping.
        let ptr = unsafe { self.map.as_ptr().add(i * PAGE_SIZE) };
        Ok((ptr, &self.stripes[i % STRIPES]))
    }

    /// Copies page `index` into `dst`.
    pub fn read(&self, index: u64, dst: &mut [u8; PAGE_SIZE]) -> Result<(), Status> {
        let (src, lock) = self.locate(index)?;
        let _g = crate::sync::lock(lock);
        // SAFETY: `src` points at PAGE_SIZE bytes inside the mapping (locate); the stripe lock
        // excludes concurrent writers of this page; `dst` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE) };
        Ok(())
    }

    /// Appends page `index` to `out` (one copy, straight from the window into the send buffer).
    pub fn append_page(&self, index: u64, out: &mut Vec<u8>) -> Result<(), Status> {
        let (src, lock) = self.locate(index)?;
        out.reserve(PAGE_SIZE);
        let len = out.len();
        let _g = crate::sync::lock(lock);
        // SAFETY: `src` points at PAGE_SIZE bytes inside the mapping (locate); the stripe lock
        // excludes concurrent writers of this page; `reserve` made room for PAGE_SIZE bytes after
        // `len`, which the copy initialises before `set_len` exposes them.
        unsafe {
            std::ptr::copy_nonoverlapping(src, out.as_mut_ptr().add(len), PAGE_SIZE);
            out.set_len(len + PAGE_SIZE);
        }
        Ok(())
    }

    /// Copies `src` into page `index`.
    pub fn write(&self, index: u64, src: &[u8; PAGE_SIZE]) -> Result<(), Status> {
        let (dst, lock) = self.locate(index)?;
        let _g = crate::sync::lock(lock);
        // SAFETY: `dst` points at PAGE_SIZE bytes inside the mapping (locate); the stripe lock
        // excludes every other reader and writer of this page; `src` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, PAGE_SIZE) };
        Ok(())
    }
}

impl std::fmt::Debug for PageWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageWindow").field("pages", &self.pages).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_reads_back_writes_and_bounds_checks() {
        let w = PageWindow::new(4).unwrap();
        let mut p = Page::ZERO;
        p.0[0] = 7;
        p.0[4095] = 9;
        w.write(3, &p.0).unwrap();
        let mut q = Page::ZERO;
        w.read(3, &mut q.0).unwrap();
        assert_eq!(q.0, p.0);
        assert_eq!(w.read(4, &mut q.0), Err(Status::PageOutOfRange));
        let mut out = vec![1u8, 2];
        w.append_page(3, &mut out).unwrap();
        assert_eq!((&out[..2], &out[2..]), (&[1u8, 2][..], &p.0[..]));
        assert_eq!(w.append_page(4, &mut out), Err(Status::PageOutOfRange));
        assert_eq!(out.len(), 2 + PAGE_SIZE);
        assert_eq!(w.write(u64::MAX, &p.0), Err(Status::PageOutOfRange));
    }

    #[test]
    fn page_views_check_alignment_and_length() {
        let mut pages = Page::vec(2);
        // SAFETY: test-only view of two owned pages as bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(pages.as_mut_ptr().cast::<u8>(), 2 * PAGE_SIZE) };
        assert_eq!(Page::slice_from_bytes_mut(bytes).map(|p| p.len()), Some(2));
        assert!(Page::slice_from_bytes_mut(&mut bytes[1..4097]).is_none());
        assert!(Page::slice_from_bytes_mut(&mut bytes[..100]).is_none());
    }
}
