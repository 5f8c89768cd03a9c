//! The page: one size and one page-aligned buffer type, shared by every Mosaic crate (the
//! transport moves pages, the pager installs them, network RAM and DSM keep them), so a page
//! read from the network lands in the buffer the pager installs from, with no conversion. And
//! [`sched`]: how Mosaic's threads share the CPUs with the application's, which every layer that
//! waits for a peer or serves one needs.

pub mod sched;

/// Size of a page, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// One 4 KiB page, aligned to 4 KiB: the unit of the transport's `read_page` / `write_page`, and of the
/// pager's installs.
///
/// Page reads land straight in a `Page` the caller owns; a slice of pages from a larger
/// page-aligned buffer can be viewed as `&mut [Page]` with [`Page::slice_from_bytes_mut`].
#[derive(Clone)]
#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_SIZE]);

impl Page {
    /// A page of zeros.
    pub const ZERO: Page = Page([0u8; PAGE_SIZE]);

    /// A heap-allocated page of zeros.
    pub fn boxed() -> Box<Page> {
        Box::new(Page::ZERO)
    }

    /// `n` zeroed pages in one allocation.
    pub fn vec(n: usize) -> Vec<Page> {
        vec![Page::ZERO; n]
    }

    /// Views a page-aligned byte buffer whose length is a multiple of [`PAGE_SIZE`] as pages.
    /// Returns `None` if `bytes` is misaligned or of another length.
    pub fn slice_from_bytes_mut(bytes: &mut [u8]) -> Option<&mut [Page]> {
        if bytes.as_ptr().align_offset(PAGE_SIZE) != 0 || bytes.len() % PAGE_SIZE != 0 {
            return None;
        }
        let n = bytes.len() / PAGE_SIZE;
        // SAFETY: the pointer is 4096-aligned and covers n * 4096 initialised bytes that we
        // borrow mutably for the returned lifetime; Page is repr(C) over [u8; 4096], for which
        // every bit pattern is valid.
        Some(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<Page>(), n) })
    }

    /// Gives the memory of `pages` back to the system (`MADV_DONTNEED`): private anonymous
    /// memory, such as the heap, is released and reads as zeros afterwards; a shared mapping
    /// keeps or reloads its contents. Either way the contents are unspecified after the call.
    /// Returns whether the system took it (if not, nothing changed: as on a system whose
    /// pages are larger than [`PAGE_SIZE`], where the call would reach past `pages`).
    pub fn release(pages: &mut [Page]) -> bool {
        if pages.is_empty() {
            return true;
        }
        // SAFETY: sysconf has no preconditions.
        if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != PAGE_SIZE as libc::c_long {
            return false;
        }
        // SAFETY: the range is exactly the pages we borrow mutably (page-aligned, whole pages);
        // MADV_DONTNEED only replaces their contents (every byte pattern is a valid Page), and
        // the call takes a pointer derived from the `&mut`, so the compiler assumes it writes.
        unsafe { libc::madvise(pages.as_mut_ptr().cast(), pages.len() * PAGE_SIZE, libc::MADV_DONTNEED) == 0 }
    }

    /// The bytes of consecutive pages, as one page-aligned slice.
    pub fn as_bytes(pages: &[Page]) -> &[u8] {
        // SAFETY: `[Page]` is `n` contiguous repr(C) `[u8; PAGE_SIZE]` arrays with no padding,
        // all initialised, borrowed for the returned lifetime.
        unsafe { std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), pages.len() * PAGE_SIZE) }
    }
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Page({:02x?}..)", &self.0[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_aligned_and_view_as_bytes() {
        let mut pages = Page::vec(3);
        assert_eq!(pages.as_ptr().align_offset(PAGE_SIZE), 0);
        pages[1].0[7] = 9;
        let bytes = Page::as_bytes(&pages);
        assert_eq!((bytes.len(), bytes[PAGE_SIZE + 7]), (3 * PAGE_SIZE, 9));
        assert_eq!(Page::slice_from_bytes_mut(&mut pages[0].0[..]).map(|p| p.len()), Some(1));
        assert!(Page::slice_from_bytes_mut(&mut pages[0].0[1..]).is_none(), "misaligned");
        assert!(Page::slice_from_bytes_mut(&mut pages[0].0[..100]).is_none(), "not whole pages");
    }

    #[test]
    fn released_heap_pages_read_as_zeros_and_can_be_written_again() {
        let mut pages = Page::vec(4);
        pages.iter_mut().for_each(|p| p.0.fill(7));
        assert!(Page::release(&mut pages[1..3]));
        assert!(pages[1].0.iter().chain(&pages[2].0).all(|b| *b == 0), "released");
        assert!(pages[0].0.iter().chain(&pages[3].0).all(|b| *b == 7), "its neighbours kept");
        pages[2].0[5] = 1;
        assert_eq!(pages[2].0[5], 1);
        assert!(Page::release(&mut []));
    }
}
