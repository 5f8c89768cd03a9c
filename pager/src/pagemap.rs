//! `PAGEMAP_SCAN` on `/proc/self/pagemap`: which pages of a range are present, written since
//! they were last write-protected, or the shared zero page; optionally write-protecting the
//! written ones again in the same atomic walk (the cheap dirty-tracking loop with
//! `UFFD_FEATURE_WP_ASYNC`: writes cost no fault delivered to user space).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Page categories reported by the scan.
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub(crate) const PAGE_IS_FILE: u64 = 1 << 2;
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;
pub(crate) const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub(crate) const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const _: () = assert!(size_of::<PmScanArg>() == 96);

/// What to look for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Query {
    /// Categories a page must all have.
    pub(crate) require: u64,
    /// Categories a page must not have.
    pub(crate) exclude: u64,
    /// Categories of which a page must have one at least (none: no such condition).
    pub(crate) any: u64,
    /// Write-protect the matching pages again (requires WP_ASYNC on the range).
    pub(crate) reprotect: bool,
}

/// An open `/proc/self/pagemap`.
#[derive(Debug)]
pub(crate) struct Pagemap {
    file: File,
}

impl Pagemap {
    pub(crate) fn open() -> io::Result<Pagemap> {
        Pagemap::open_path("/proc/self/pagemap")
    }

    /// Another process's (`/proc/PID/pagemap`).
    pub(crate) fn open_path(path: &str) -> io::Result<Pagemap> {
        Ok(Pagemap { file: File::open(path)? })
    }

    /// Byte ranges within `[start, end)` that match `q`, merged where adjacent.
    pub(crate) fn scan(&self, start: u64, end: u64, q: Query) -> io::Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut vec = [PageRegion::default(); 64];
        let mut at = start;
        // Every call advances `walk_end`; bound the loop anyway.
        for _ in 0..=((end - start) / crate::PAGE_SIZE as u64) {
            if at >= end {
                break;
            }
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                flags: if q.reprotect { PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC } else { 0 },
                start: at,
                end,
                vec: vec.as_mut_ptr() as u64,
                vec_len: vec.len() as u64,
                category_mask: q.require | q.exclude,
                category_inverted: q.exclude,
                category_anyof_mask: q.any,
                return_mask: q.require | q.exclude | q.any,
                ..PmScanArg::default()
            };
            // SAFETY: `arg` and the `vec` array it points to live across the call; the kernel
            // writes at most `vec_len` entries.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN as _, &raw mut arg) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = usize::try_from(rc).unwrap_or(0).min(vec.len());
            for r in &vec[..n] {
                match out.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => out.push(r.start..r.end),
                }
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(out)
    }
}
