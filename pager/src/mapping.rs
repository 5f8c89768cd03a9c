//! The region's own mapping: reserving it, unmapping it, `MADV_DONTFORK`, and which of its
//! pages are present (`/proc/self/pagemap`). Every call is a raw system call ([`raw`]): the
//! program may interpose the libc functions.

use std::ops::Range;

use crate::pagemap::{Pagemap, Query, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
use crate::{ConfigError, PagerError, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// `range` minus every range in `holes`.
pub(crate) fn subtract(range: Range<u64>, holes: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = vec![range];
    for h in holes {
        out = out
            .into_iter()
            .flat_map(|r| {
                if h.end <= r.start || h.start >= r.end {
                    return vec![r];
                }
                let mut v = Vec::new();
                if r.start < h.start {
                    v.push(r.start..h.start);
                }
                if h.end < r.end {
                    v.push(h.end..r.end);
                }
                v
            })
            .collect();
    }
    out
}

pub(crate) fn map(fixed: Option<usize>, len: u64) -> Result<u64, PagerError> {
    let len_usize =
        usize::try_from(len).map_err(|_| PagerError::Config(ConfigError::TooLarge { pages: len / PAGE }))?;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if fixed.is_some() {
        flags |= libc::MAP_FIXED_NOREPLACE;
    }
    let hint = fixed.unwrap_or(0) as *mut libc::c_void;
    // SAFETY: an anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe { raw::mmap(hint, len_usize, libc::PROT_READ | libc::PROT_WRITE, flags) };
    if p == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Err(PagerError::Config(ConfigError::AddressInUse { addr: fixed.unwrap_or(0) }));
        }
        return Err(PagerError::Os { op: "mmap", err });
    }
    if let Some(a) = fixed {
        if p as usize != a {
            // An old kernel that ignores MAP_FIXED_NOREPLACE treats it as a hint.
            unmap(p as u64, len);
            return Err(PagerError::Config(ConfigError::NotMappedAt { addr: a }));
        }
    }
    // A child must not inherit pages it cannot be served.
    if let Err(e) = set_dontfork(p as u64, len, true) {
        unmap(p as u64, len);
        return Err(e);
    }
    Ok(p as u64)
}

/// `MADV_DONTFORK` (`on`) or `MADV_DOFORK` over a range of the region.
pub(crate) fn set_dontfork(start: u64, len: u64, on: bool) -> Result<(), PagerError> {
    let (advice, op) =
        if on { (libc::MADV_DONTFORK, "madvise(MADV_DONTFORK)") } else { (libc::MADV_DOFORK, "madvise(MADV_DOFORK)") };
    // SAFETY: advising a range of the region's own mapping; neither advice changes its contents.
    let rc = unsafe { raw::madvise(start as *mut libc::c_void, usize::try_from(len).unwrap_or(0), advice) };
    if rc != 0 {
        return Err(PagerError::Os { op, err: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// The page ranges among `pages` pages from `addr` that are present in this process's memory
/// (a fresh `/proc/self/pagemap`: a descriptor opened before a fork would describe the parent).
pub fn present_pages(addr: usize, pages: u64) -> Result<Vec<Range<u64>>, PagerError> {
    let start = addr as u64;
    let q = Query { require: PAGE_IS_PRESENT, exclude: 0, any: 0, reprotect: false };
    scan_pages(&open_pagemap()?, start, start, start + pages * PAGE, q)
}

/// The page ranges among `pages` pages from `addr` that hold data in this process: present in
/// memory or swapped out (what a page migrating away must take with it). In a userfaultfd range
/// with write protection of unpopulated pages off (the pager's regions), a swapped entry is a
/// real page in swap, never a marker.
pub fn populated_pages(addr: usize, pages: u64) -> Result<Vec<Range<u64>>, PagerError> {
    let start = addr as u64;
    let q = Query { require: 0, exclude: 0, any: PAGE_IS_PRESENT | PAGE_IS_SWAPPED, reprotect: false };
    scan_pages(&open_pagemap()?, start, start, start + pages * PAGE, q)
}

/// The byte ranges of `[start, end)` in process `pid` that hold data of that process's own:
/// present or swapped out, and neither the shared zero page nor a file's page (so in a private
/// file mapping, only the pages the process wrote, its private copies). What a whole process
/// migrating away must send. Needs the right to read `/proc/PID/pagemap` (ptrace access).
///
/// `anonymous` says the range is anonymous memory, which holds no file pages: the scan then
/// skips that test (it costs a look at each page's descriptor).
pub fn private_pages_of(pid: u32, start: u64, end: u64, anonymous: bool) -> Result<Vec<Range<u64>>, PagerError> {
    let pm = Pagemap::open_path(&format!("/proc/{pid}/pagemap"))
        .map_err(|err| PagerError::Os { op: "open /proc/PID/pagemap", err })?;
    let q = Query {
        require: 0,
        exclude: if anonymous { PAGE_IS_PFNZERO } else { PAGE_IS_FILE | PAGE_IS_PFNZERO },
        any: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        reprotect: false,
    };
    pm.scan(start, end, q).map_err(|err| PagerError::Os { op: "PAGEMAP_SCAN", err })
}

pub(crate) fn open_pagemap() -> Result<Pagemap, PagerError> {
    Pagemap::open().map_err(|err| PagerError::Os { op: "open /proc/self/pagemap", err })
}

/// The page ranges of `[start, end)` that `q` selects, as page numbers counted from `base`.
pub(crate) fn scan_pages(
    pm: &Pagemap,
    base: u64,
    start: u64,
    end: u64,
    q: Query,
) -> Result<Vec<Range<u64>>, PagerError> {
    let ranges = pm.scan(start, end, q).map_err(|err| PagerError::Os { op: "PAGEMAP_SCAN", err })?;
    Ok(ranges.into_iter().map(|r| (r.start - base) / PAGE..(r.end - base) / PAGE).collect())
}

/// Unmaps `pages` pages from `addr` in this process: what a forked child does to an inherited
/// region it cannot serve, so that touching it is a segmentation fault rather than zeros.
pub fn unmap_inherited(addr: usize, pages: u64) {
    unmap(addr as u64, pages * PAGE);
}

/// The region's own `mmap`, `munmap` and `madvise`, as raw system calls: a program may interpose
/// the libc functions (Mosaic's own LD_PRELOAD shim does, to give its allocations kernel
/// semantics), and the region's management of its own mapping must never go through them.
pub(crate) mod raw {
    /// `mmap(2)` of anonymous memory.
    ///
    /// # Safety
    /// As `mmap(2)`: the caller owns whatever range it asks for.
    pub(super) unsafe fn mmap(hint: *mut libc::c_void, len: usize, prot: i32, flags: i32) -> *mut libc::c_void {
        // SAFETY: forwarded to the caller.
        let r = unsafe { libc::syscall(libc::SYS_mmap, hint, len, prot, flags, -1, 0) };
        r as *mut libc::c_void
    }

    /// `munmap(2)`.
    ///
    /// # Safety
    /// The range is the caller's own, and nothing refers into it afterwards.
    pub(super) unsafe fn munmap(addr: *mut libc::c_void, len: usize) -> i32 {
        // SAFETY: forwarded to the caller.
        let r = unsafe { libc::syscall(libc::SYS_munmap, addr, len) };
        i32::try_from(r).unwrap_or(-1)
    }

    /// `madvise(2)`.
    ///
    /// # Safety
    /// The range is the caller's own mapping.
    pub(crate) unsafe fn madvise(addr: *mut libc::c_void, len: usize, advice: i32) -> i32 {
        // SAFETY: forwarded to the caller.
        let r = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) };
        i32::try_from(r).unwrap_or(-1)
    }
}

pub(crate) fn unmap(start: u64, len: u64) {
    // SAFETY: only ranges this region mapped and still owns (see `foreign`) are unmapped.
    let rc = unsafe { raw::munmap(start as *mut libc::c_void, usize::try_from(len).unwrap_or(0)) };
    if rc != 0 {
        log::warn!("munmap({start:#x}, {len}) failed: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn subtract_cuts_holes() {
        assert_eq!(subtract(0..100, &[]), vec![0..100]);
        assert_eq!(subtract(0..100, &[10..20, 50..60]), vec![0..10, 20..50, 60..100]);
        assert_eq!(subtract(0..100, &[0..100]), Vec::<std::ops::Range<u64>>::new());
        assert_eq!(subtract(0..100, &[90..200]), vec![0..90]);
    }
}
