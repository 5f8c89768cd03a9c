//! The shared part of a region ([`RegionCore`]): what fault handlers (the fault workers, the
//! SIGBUS handler) and page sources use: serving a fault, installing, dropping, protecting and
//! scanning pages. [`crate::Region`] owns one and sets up who serves its faults.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

#[cfg(doc)]
use crate::config::RegionConfig;
use crate::config::{DirtyTracking, FaultMode, PagerStats};
use crate::install::{install, Fill, InstallError, Installed};
use crate::mapping::{open_pagemap, raw, scan_pages, set_dontfork};
use crate::pagemap::{Pagemap, Query, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::report::report;
use crate::uffd::{self, feature, RawMsg, UffdOps, Userfaultfd};
#[cfg(doc)]
use crate::Region;
use crate::{Fault, FillError, Filled, Outcome, Page, PageSource, PagerError, Retry, Token, WriteDecision, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// What became of a fault handed to [`RegionCore::serve_fault`] or `serve_write_fault`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// Installed (or unprotected), or nobody waits for it any more.
    Done,
    /// The page is lost: poisoned, or its thread signalled.
    Lost,
    /// The source is busy with the page: ask again later; the faulting thread still waits.
    Busy,
}

#[derive(Default)]
pub(crate) struct Counters {
    faults: AtomicU64,
    installed: AtomicU64,
    zero: AtomicU64,
    already_present: AtomicU64,
    lost: AtomicU64,
    dropped: AtomicU64,
    deferred: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Batched drops ([`RegionCore::drop_runs`]): not tried yet, possible through a pidfd of this
/// process, or refused by the kernel (one `madvise` per run from then on).
#[derive(Debug, Default)]
pub(crate) enum BatchDrops {
    #[default]
    Untried,
    /// The pidfd and the pid it was opened for: a forked child must open its own (the
    /// parent's would drop the parent's pages).
    Ready {
        pid: u32,
        fd: std::os::fd::OwnedFd,
    },
    Refused,
}

/// The shared part of a region: what fault handlers and sources use. Reach it through
/// [`Region`] (which dereferences to it) or [`Fault::region`].
pub struct RegionCore {
    pub(crate) name: String,
    /// Current start address (changes if the application mremaps the whole region).
    pub(crate) base: AtomicU64,
    /// Address the region was created at (the signal handler's lookup key moves with `base`).
    pub(crate) pages: u64,
    pub(crate) uffd: Userfaultfd,
    pub(crate) source: Box<dyn PageSource>,
    pub(crate) mode: FaultMode,
    pub(crate) dirty: DirtyTracking,
    pub(crate) pagemap: Option<Pagemap>,
    /// Set when the application remapped part of the region: why it is no longer whole.
    pub(crate) broken: OnceLock<String>,
    /// Address ranges the application unmapped or moved away: never ours to unmap again.
    pub(crate) foreign: Mutex<Vec<Range<u64>>>,
    /// Ranges this region is dropping itself, so their REMOVE events are not the application's.
    pub(crate) self_drops: Mutex<Vec<Range<u64>>>,
    /// Whether drops can be batched, and the pidfd they go through.
    pub(crate) batch_drops: Mutex<BatchDrops>,
    pub(crate) stats: Counters,
}

impl std::fmt::Debug for RegionCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionCore")
            .field("name", &self.name)
            .field("base", &format_args!("{:#x}", self.base()))
            .field("pages", &self.pages)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RegionCore {
    /// The region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first byte of the region.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base() as *mut u8
    }

    /// Makes the page at `page_addr` writable (`UFFDIO_WRITEPROTECT` clear), waking its writers
    /// unless `dont_wake`. A page that is not present (the application discarded it) has
    /// nothing to unprotect: that is not an error.
    pub(crate) fn unprotect_page(&self, page_addr: u64, dont_wake: bool) -> std::io::Result<()> {
        match self.uffd.unprotect(page_addr, PAGE, dont_wake) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    pub(crate) fn base(&self) -> u64 {
        self.base.load(Ordering::Acquire)
    }

    /// Whether a child process created by `fork` inherits the region's memory (`MADV_DOFORK`)
    /// or not (`MADV_DONTFORK`, the default). Turned on only around a fork whose child adopts
    /// the region ([`RegionConfig::adopt`]): an inherited region nobody adopts reads its missing
    /// pages as zeros.
    pub fn inherit_on_fork(&self, on: bool) -> Result<(), PagerError> {
        set_dontfork(self.base(), self.len() as u64, !on)
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        usize::try_from(self.pages * PAGE).unwrap_or(usize::MAX)
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Who serves faults.
    pub fn mode(&self) -> FaultMode {
        self.mode
    }

    /// Why the region is no longer whole, if the application remapped part of it.
    pub fn broken(&self) -> Option<&str> {
        self.broken.get().map(String::as_str)
    }

    /// The counters.
    pub fn stats(&self) -> PagerStats {
        let s = &self.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PagerStats {
            faults: l(&s.faults),
            installed: l(&s.installed),
            zero: l(&s.zero),
            already_present: l(&s.already_present),
            lost: l(&s.lost),
            dropped: l(&s.dropped),
            deferred: l(&s.deferred),
        }
    }

    fn check(&self, first: u64, count: u64) -> Result<u64, PagerError> {
        let end = first.checked_add(count).filter(|e| *e <= self.pages);
        match end {
            Some(_) if count > 0 => Ok(self.base() + first * PAGE),
            _ => Err(PagerError::OutOfRange { first, end: first.saturating_add(count), pages: self.pages }),
        }
    }

    fn installed(&self, r: Result<Installed, InstallError>) -> Result<Installed, PagerError> {
        match r {
            Ok(i) => {
                bump(&self.stats.already_present, i.present);
                Ok(i)
            }
            Err(InstallError::Gone) => Err(PagerError::Gone { region: self.name.clone() }),
            Err(InstallError::Busy(d)) => Err(PagerError::Os {
                op: "install",
                err: std::io::Error::new(std::io::ErrorKind::WouldBlock, format!("address space busy for {d:?}")),
            }),
            Err(InstallError::Os { op, err }) => Err(PagerError::Os { op, err }),
        }
    }

    /// Installs `pages` at `first`, `first + 1`, ... where they are missing (prefetch, push).
    /// Returns how many were installed; pages already present are left as they are.
    pub fn install(&self, first: u64, pages: &[Page]) -> Result<u64, PagerError> {
        // SAFETY: a slice of `Page`s is page-aligned bytes, PAGE_SIZE per page, no padding.
        let bytes = unsafe { std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), pages.len() * PAGE_SIZE) };
        self.install_bytes(first, bytes)
    }

    /// [`install`](Self::install) from any page-aligned buffer of whole pages (pages another
    /// crate's type holds, say); refused with [`PagerError::Misaligned`] if `data` is misaligned or
    /// not whole pages. Returns how many pages were installed.
    pub fn install_bytes(&self, first: u64, data: &[u8]) -> Result<u64, PagerError> {
        if data.len() % PAGE_SIZE != 0 || data.as_ptr().align_offset(PAGE_SIZE) != 0 {
            return Err(PagerError::Misaligned { len: data.len(), addr: data.as_ptr() as usize });
        }
        let count = (data.len() / PAGE_SIZE) as u64;
        let dst = self.check(first, count)?;
        let fill = Fill::Copy { src: data.as_ptr() as u64, wp: self.dirty != DirtyTracking::Off };
        let r = self.installed(install(&self.uffd, dst, count * PAGE, fill, false, &mut || {}))?;
        bump(&self.stats.installed, r.new);
        Ok(r.new)
    }

    /// Installs `pages` at `first`, `first + 1`, ... where they are missing by *moving* them out
    /// of the buffer (`UFFDIO_MOVE`: page-table entries change hands, no data is copied; about
    /// 10x cheaper than [`install`](Self::install) for large batches). Afterwards the buffer's
    /// moved pages read as zeros. Falls back to copying on kernels without `UFFDIO_MOVE`, and for
    /// pages `UFFDIO_MOVE` cannot take (`EBUSY`: shared or never-written buffer pages).
    ///
    /// With dirty tracking, moved pages count as written until the next
    /// [`take_written`](Self::take_written) (they arrive unprotected; protecting them afterwards
    /// could hide a write made in between).
    pub fn install_moving(&self, first: u64, pages: &mut [Page]) -> Result<u64, PagerError> {
        let dst = self.check(first, pages.len() as u64)?;
        if self.uffd.features() & feature::MOVE == 0 {
            return self.install(first, pages);
        }
        let len = pages.len() as u64 * PAGE;
        let src = pages.as_mut_ptr() as u64;
        match install(&self.uffd, dst, len, Fill::Move { src }, false, &mut || {}) {
            Ok(r) => {
                bump(&self.stats.installed, r.new);
                bump(&self.stats.already_present, r.present);
                Ok(r.new)
            }
            Err(InstallError::Os { err, .. }) if err.raw_os_error() == Some(libc::EBUSY) => {
                // Some page could not be moved: copy whatever is still missing.
                self.install(first, pages)
            }
            Err(e) => self.installed(Err(e)).map(|i| i.new),
        }
    }

    /// Installs the zero page at `count` pages from `first` where they are missing.
    pub fn install_zero(&self, first: u64, count: u64) -> Result<u64, PagerError> {
        let dst = self.check(first, count)?;
        let r = self.installed(install(&self.uffd, dst, count * PAGE, Fill::Zero, false, &mut || {}))?;
        bump(&self.stats.zero, r.new);
        Ok(r.new)
    }

    /// Poisons `count` pages from `first` where they are missing: touching them raises SIGBUS.
    /// Needs `UFFDIO_POISON` (Linux 6.6).
    pub fn poison(&self, first: u64, count: u64) -> Result<u64, PagerError> {
        let dst = self.check(first, count)?;
        if self.uffd.features() & feature::POISON == 0 {
            return Err(PagerError::Unsupported { missing: vec!["POISON"], needed_for: "poisoning pages" });
        }
        let r = self.installed(install(&self.uffd, dst, count * PAGE, Fill::Poison, false, &mut || {}))?;
        Ok(r.new)
    }

    /// Drops `count` pages from `first` (present or not): their memory is freed and their next
    /// touch faults again. Dirty pages must have been saved by the caller first.
    pub fn drop_pages(&self, first: u64, count: u64) -> Result<(), PagerError> {
        let start = self.check(first, count)?;
        let range = start..start + count * PAGE;
        // The REMOVE event this madvise raises is recognised by this entry, which the event
        // handler removes when it sees the event (madvise returns as soon as the event is read,
        // possibly before it is handled). Without REMOVE events there is nothing to recognise
        // (and nothing would ever remove the entry).
        let reported = self.uffd.features() & feature::EVENT_REMOVE != 0;
        if reported {
            lock(&self.self_drops).push(range.clone());
        }
        // SAFETY: the range is inside this region's mapping (checked above).
        let rc = unsafe {
            raw::madvise(start as *mut libc::c_void, usize::try_from(count * PAGE).unwrap_or(0), libc::MADV_DONTNEED)
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            let mut drops = lock(&self.self_drops);
            if let Some(i) = drops.iter().position(|r| *r == range).filter(|_| reported) {
                drops.swap_remove(i);
            }
            return Err(PagerError::Os { op: "madvise(MADV_DONTNEED)", err });
        }
        bump(&self.stats.dropped, count);
        Ok(())
    }

    /// Drops several runs of pages, as [`drop_pages`](Self::drop_pages) does each, in one
    /// `process_madvise(MADV_DONTNEED)` call on this process where the kernel allows that
    /// (Linux 6.13 and later): the kernel then flushes the TLB once for the batch instead of once
    /// per run, and while the process runs on other CPUs every flush is an interrupt to each of
    /// them (measured here: 64 scattered pages in 42 us batched against 673 us one `madvise`
    /// each). Elsewhere, or with REMOVE events reported, one `madvise` per run. Returns the runs
    /// that were not dropped, each with why.
    pub fn drop_runs(&self, runs: &[Range<u64>]) -> Vec<(Range<u64>, PagerError)> {
        let mut failed = Vec::new();
        let mut batch: Vec<libc::iovec> = Vec::with_capacity(runs.len());
        let mut batched: Vec<&Range<u64>> = Vec::with_capacity(runs.len());
        let reported = self.uffd.features() & feature::EVENT_REMOVE != 0;
        for r in runs {
            match self.check(r.start, r.end - r.start) {
                Ok(start) if !reported => {
                    batch.push(libc::iovec {
                        iov_base: start as *mut libc::c_void,
                        iov_len: usize::try_from((r.end - r.start) * PAGE).unwrap_or(0),
                    });
                    batched.push(r);
                }
                Ok(_) => {
                    if let Err(e) = self.drop_pages(r.start, r.end - r.start) {
                        failed.push((r.clone(), e));
                    }
                }
                Err(e) => failed.push((r.clone(), e)),
            }
        }
        // The kernel takes at most IOV_MAX (1024) ranges a call.
        let mut done = 0;
        for chunk in batch.chunks(1024) {
            let n = self.madvise_batch(chunk);
            bump(&self.stats.dropped, batched[done..done + n].iter().map(|r| r.end - r.start).sum());
            // What the batch did not cover (the kernel refused it, or stopped part-way) goes
            // one run at a time (dropping a page twice does no harm).
            for r in &batched[done + n..done + chunk.len()] {
                if let Err(e) = self.drop_pages(r.start, r.end - r.start) {
                    failed.push(((*r).clone(), e));
                }
            }
            done += chunk.len();
        }
        failed
    }

    /// `process_madvise(MADV_DONTNEED)` of `ranges` in this process; returns how many of the
    /// ranges, from the first, were dropped whole (0 where the kernel does not allow it).
    fn madvise_batch(&self, ranges: &[libc::iovec]) -> usize {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut state = lock(&self.batch_drops);
        let me = std::process::id();
        if matches!(&*state, BatchDrops::Untried) || matches!(&*state, BatchDrops::Ready { pid, .. } if *pid != me) {
            // SAFETY: pidfd_open of our own pid; the result is a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, me, 0) };
            *state = match i32::try_from(fd).ok().filter(|fd| *fd >= 0) {
                // SAFETY: a descriptor just returned to us, owned by nothing else.
                Some(fd) => BatchDrops::Ready { pid: me, fd: unsafe { OwnedFd::from_raw_fd(fd) } },
                None => BatchDrops::Refused,
            };
        }
        let BatchDrops::Ready { fd, .. } = &*state else { return 0 };
        // SAFETY: every iovec is a range inside this region's mapping (checked by the caller);
        // MADV_DONTNEED frees them, which the caller asked for.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                fd.as_raw_fd(),
                ranges.as_ptr(),
                ranges.len(),
                libc::MADV_DONTNEED,
                0,
            )
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EPERM)) {
                *state = BatchDrops::Refused; // this kernel does not take it
            }
            return 0;
        }
        // The bytes advised, from the first range on.
        let mut left = usize::try_from(rc).unwrap_or(0);
        ranges
            .iter()
            .take_while(|r| {
                let whole = left >= r.iov_len;
                left = left.saturating_sub(r.iov_len);
                whole
            })
            .count()
    }

    /// Write-protects (or unprotects) `count` pages from `first`. With dirty tracking, a
    /// protected page that is written shows up in [`take_written`](Self::take_written).
    pub fn write_protect(&self, first: u64, count: u64, protect: bool) -> Result<(), PagerError> {
        if self.dirty == DirtyTracking::Off {
            return Err(PagerError::NoDirtyTracking { op: "write protection", needs: "dirty tracking" });
        }
        let start = self.check(first, count)?;
        self.uffd
            .write_protect(start, count * PAGE, protect)
            .map_err(|err| PagerError::Os { op: "UFFDIO_WRITEPROTECT", err })
    }

    /// Page ranges among `count` pages from `first` that were written since they were installed
    /// or last returned here, and write-protects them again in the same atomic walk, so a write
    /// that races with the scan is either returned now or next time, never lost.
    pub fn take_written(&self, first: u64, count: u64) -> Result<Vec<Range<u64>>, PagerError> {
        if self.dirty != DirtyTracking::Scan {
            return Err(PagerError::NoDirtyTracking { op: "take_written", needs: "DirtyTracking::Scan" });
        }
        let q = Query { require: PAGE_IS_WRITTEN | PAGE_IS_PRESENT, exclude: PAGE_IS_PFNZERO, any: 0, reprotect: true };
        self.scan(first, count, q)
    }

    /// Page ranges among `count` pages from `first` that are present in memory.
    pub fn present(&self, first: u64, count: u64) -> Result<Vec<Range<u64>>, PagerError> {
        self.scan(first, count, Query { require: PAGE_IS_PRESENT, exclude: 0, any: 0, reprotect: false })
    }

    pub(crate) fn scan(&self, first: u64, count: u64, q: Query) -> Result<Vec<Range<u64>>, PagerError> {
        let start = self.check(first, count)?;
        let owned;
        let pm = match &self.pagemap {
            Some(p) => p,
            None => {
                owned = open_pagemap()?;
                &owned
            }
        };
        scan_pages(pm, self.base(), start, start + count * PAGE, q)
    }

    /// Touches `count` pages from `first` for reading, so each is present before the region's
    /// memory is handed to a system call (needed with [`FaultMode::FaultingThread`], where a
    /// system call that meets a missing page fails with `EFAULT`).
    pub fn prefault(&self, first: u64, count: u64) -> Result<(), PagerError> {
        let start = self.check(first, count)?;
        for i in 0..count {
            // SAFETY: the address is inside the mapping (checked above); a volatile read of one
            // byte only makes the kernel (or our SIGBUS handler) bring the page in.
            unsafe { std::ptr::read_volatile((start + i * PAGE) as *const u8) };
        }
        Ok(())
    }

    /// Serves a missing-page fault at `addr`: asks the source, installs the page (or poisons it
    /// if the source failed). `wake` wakes the threads waiting on it (worker mode).
    /// `on_again` lets pending events be read when the address space is changing. `retry` says
    /// whether the fault can be kept for later if the source is busy with the page.
    pub(crate) fn serve_fault(
        &self,
        addr: u64,
        write: bool,
        wake: bool,
        tid: Option<i32>,
        retry: Retry,
        on_again: &mut dyn FnMut(),
    ) -> Served {
        let page_addr = addr & !(PAGE - 1);
        let base = self.base();
        if page_addr < base || page_addr >= base + self.pages * PAGE {
            // A part the application moved elsewhere: fail closed.
            self.report_loss(page_addr, "the page was moved away from the region by mremap");
            self.fail_closed(page_addr, wake, tid, on_again);
            return Served::Lost;
        }
        let index = (page_addr - base) / PAGE;
        let mut buf = Page::ZERO;
        // The source sees the region through a plain reference, valid for this call.
        let fault = Fault::new(index, write, self, retry, wake);
        // A panicking source must not kill a worker (its waiters would hang) or unwind out of a
        // signal handler (which aborts): it counts as a failed fetch.
        let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.source.fill(&fault, &mut buf)))
            .unwrap_or_else(|_| Err(FillError::new(PagerError::SourcePanicked)));
        if let Ok(Filled::Busy) = filled {
            bump(&self.stats.deferred, 1);
            return Served::Busy;
        }
        bump(&self.stats.faults, 1);
        if let Ok(Filled::Present) = filled {
            if wake {
                if let Err(e) = self.uffd.wake(page_addr, PAGE) {
                    log::warn!("region {}: cannot wake the threads faulting on {page_addr:#x}: {e}", self.name);
                }
            }
            return Served::Done;
        }
        // Exact tracking installs a page written at once (or that the source counts as written)
        // unprotected; scan tracking protects everything and lets the kernel unprotect on write.
        let wp = match self.dirty {
            DirtyTracking::Off => false,
            DirtyTracking::Scan => true,
            DirtyTracking::Faults => !fault.writable(),
        };
        let (token, result) = match filled {
            Ok(Filled::Data(token)) => {
                let fill = Fill::Copy { src: std::ptr::addr_of!(buf) as u64, wp };
                (token, install(&self.uffd, page_addr, PAGE, fill, !wake, on_again).map(|r| (r, false)))
            }
            Ok(Filled::Zero(token)) if self.dirty == DirtyTracking::Faults => {
                // The shared zero page cannot be write-protected: a write to it would go
                // unnoticed. Install a protected copy of zeros instead.
                buf.0.fill(0);
                let fill = Fill::Copy { src: std::ptr::addr_of!(buf) as u64, wp };
                (token, install(&self.uffd, page_addr, PAGE, fill, !wake, on_again).map(|r| (r, true)))
            }
            Ok(Filled::Zero(token)) => {
                (token, install(&self.uffd, page_addr, PAGE, Fill::Zero, !wake, on_again).map(|r| (r, true)))
            }
            Ok(Filled::Busy | Filled::Present) => unreachable!("returned above"),
            Err(e) => {
                self.report_loss(page_addr, &crate::report::chain(&e));
                bump(&self.stats.lost, 1);
                self.fail_closed(page_addr, wake, tid, on_again);
                return Served::Lost;
            }
        };
        match result {
            Ok((r, zero)) => {
                bump(if zero { &self.stats.zero } else { &self.stats.installed }, r.new);
                bump(&self.stats.already_present, r.present);
                self.tell_source(index, token, if r.new > 0 { Outcome::Installed } else { Outcome::AlreadyPresent });
                if r.present > 0 && !wake && self.dirty == DirtyTracking::Faults && cfg!(not(target_arch = "x86_64")) {
                    // Signal mode where the hardware does not say: a "missing" page that was
                    // present is a write to a protected page.
                    return self.serve_write_fault(addr, false, retry);
                }
                Served::Done
            }
            Err(InstallError::Gone) => {
                // Unmapped under us: nobody is waiting any more.
                self.tell_source(index, token, Outcome::Lost);
                Served::Done
            }
            Err(e) => {
                // The faulting thread cannot be left waiting: poison the page so it gets SIGBUS.
                self.report_loss(page_addr, &format!("installing it failed: {e}"));
                bump(&self.stats.lost, 1);
                self.fail_closed(page_addr, wake, tid, on_again);
                self.tell_source(index, token, Outcome::Lost);
                Served::Lost
            }
        }
    }

    /// Makes the access to a lost page end in SIGBUS, never in data: poisons the page where the
    /// kernel can (every later access raises SIGBUS); otherwise signals the faulting thread and
    /// wakes it (worker modes; a later access faults again and is refused again), or, on the
    /// faulting thread itself, leaves the page missing so the retried access raises SIGBUS.
    fn fail_closed(&self, page_addr: u64, wake: bool, tid: Option<i32>, on_again: &mut dyn FnMut()) {
        if self.uffd.features() & feature::POISON != 0 {
            if let Err(e) = install(&self.uffd, page_addr, PAGE, Fill::Poison, !wake, on_again) {
                self.report_loss(page_addr, &format!("and poisoning it failed too: {e}"));
            }
            return;
        }
        if !wake {
            return; // the SIGBUS handler passes the retried fault on (see signal.rs)
        }
        match tid {
            Some(tid) => {
                // SAFETY: tgkill sends SIGBUS to one thread of this process; the wake lets it
                // leave the fault and take the signal, whose default action ends the process.
                unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGBUS) };
                let _ = self.uffd.wake(page_addr, PAGE);
            }
            None => self.report_loss(page_addr, "and the faulting thread is unknown: it stays blocked"),
        }
    }

    fn tell_source(&self, index: u64, token: Token, outcome: Outcome) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.source.installed(index, token, outcome)))
            .is_err()
        {
            report(format_args!("mosaic pager: region {}: the page source panicked in installed()\n", self.name));
        }
    }

    /// Serves a write-protect fault (exact dirty tracking): tells the source, then unprotects the
    /// page and, if `wake`, wakes the writer. If the source is busy with the page, does neither
    /// and returns [`Served::Busy`].
    pub(crate) fn serve_write_fault(&self, addr: u64, wake: bool, retry: Retry) -> Served {
        let page_addr = addr & !(PAGE - 1);
        let base = self.base();
        if self.dirty == DirtyTracking::Faults && page_addr >= base && page_addr < base + self.pages * PAGE {
            let index = (page_addr - base) / PAGE;
            let fault = Fault::new(index, true, self, retry, wake);
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.source.written(&fault))) {
                Ok(WriteDecision::Proceed) if fault.unprotected() => return Served::Done,
                Ok(WriteDecision::Proceed) => {}
                Ok(WriteDecision::Busy) => {
                    bump(&self.stats.deferred, 1);
                    return Served::Busy;
                }
                Ok(WriteDecision::Retry) => {
                    if wake {
                        let _ = self.uffd.wake(page_addr, PAGE);
                    }
                    return Served::Done;
                }
                Err(_) => {
                    report(format_args!("mosaic pager: region {}: the page source panicked in written()\n", self.name))
                }
            }
        }
        // Unprotecting wakes the writer unless told not to (the ioctl's DONTWAKE).
        if let Err(e) = self.unprotect_page(page_addr, !wake) {
            report(format_args!("mosaic pager: region {}: unprotecting {page_addr:#x} failed: {e}\n", self.name));
        }
        Served::Done
    }

    /// Wakes the threads waiting on faults in `count` pages from `first` (after a source
    /// deferred them).
    pub fn wake(&self, first: u64, count: u64) -> Result<(), PagerError> {
        let start = self.check(first, count)?;
        self.uffd.wake(start, count * PAGE).map_err(|err| PagerError::Os { op: "UFFDIO_WAKE", err })
    }

    /// How written pages are tracked.
    pub fn dirty_tracking(&self) -> DirtyTracking {
        self.dirty
    }

    fn report_loss(&self, page_addr: u64, why: &str) {
        let base = self.base();
        let index = page_addr.wrapping_sub(base) / PAGE;
        report(format_args!(
            "mosaic pager: region {} page {index} (address {page_addr:#x}) is lost, an access raises SIGBUS: {why}\n",
            self.name
        ));
    }

    /// Handles a non-fault event: mremap, munmap, MADV_DONTNEED.
    pub(crate) fn handle_event(&self, msg: &RawMsg) {
        let arg = msg.arg;
        let base = self.base();
        let len = self.pages * PAGE;
        match msg.event {
            uffd::EVENT_REMAP => {
                let (from, to, moved) = (arg[0], arg[1], arg[2]);
                if from == base && moved == len {
                    self.base.store(to, Ordering::Release);
                    log::info!("region {}: moved by mremap from {from:#x} to {to:#x}", self.name);
                } else {
                    let why = format!(
                        "the application moved {moved} bytes at {from:#x} to {to:#x} with mremap, splitting the \
                         region; faults in the moved part are refused"
                    );
                    log::error!("region {}: {why}", self.name);
                    let _ = self.broken.set(why);
                    lock(&self.foreign).push(from..from + moved);
                }
            }
            uffd::EVENT_UNMAP => {
                let (start, end) = (arg[0], arg[1]);
                log::warn!("region {}: the application unmapped {start:#x}..{end:#x}", self.name);
                if start <= base && end >= base + len {
                    let _ = self.broken.set("the application unmapped the region".into());
                }
                lock(&self.foreign).push(start..end);
            }
            uffd::EVENT_REMOVE => {
                let (start, end) = (arg[0], arg[1]);
                let ours = {
                    let mut drops = lock(&self.self_drops);
                    match drops.iter().position(|r| r.start <= start && end <= r.end) {
                        Some(i) => {
                            // The last event of a drop (one per VMA it spans) retires its entry.
                            if drops[i].end == end {
                                drops.swap_remove(i);
                            }
                            true
                        }
                        None => false,
                    }
                };
                if !ours && end > base && start < base + len {
                    let first = (start.max(base) - base) / PAGE;
                    let last = (end.min(base + len) - base).div_ceil(PAGE);
                    self.source.discarded(first..last);
                }
            }
            uffd::EVENT_FORK => {
                // Not requested (the region is MADV_DONTFORK); a kernel sending it anyway gets
                // the descriptor closed by the kernel when the child's side is dropped.
                log::warn!("region {}: unexpected fork event", self.name);
            }
            e => log::warn!("region {}: unknown userfaultfd event {e:#x}", self.name),
        }
    }

    pub(crate) fn uffd(&self) -> &Userfaultfd {
        &self.uffd
    }

    /// True if `addr` is one this region serves faults for (its current range, or a part the
    /// application moved away, which it refuses).
    pub(crate) fn owns_fault(&self, addr: u64) -> bool {
        let base = self.base();
        (base..base + self.pages * PAGE).contains(&addr) || lock_free_moved(self, addr)
    }
}

/// Whether `addr` lies in a part of the region the application moved away. Runs in the signal
/// handler, so it only tries the lock: a contended lock (an event being handled right now) means
/// "not ours", and the access is retried.
fn lock_free_moved(core: &RegionCore, addr: u64) -> bool {
    core.broken.get().is_some() && core.foreign.try_lock().map(|f| f.iter().any(|r| r.contains(&addr))).unwrap_or(false)
}

/// Time-bounded wait helper for teardown paths.
pub(crate) fn wait_until(mut done: impl FnMut() -> bool, limit: Duration) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}
