//! A registered region: the mapping, its userfaultfd, how its faults are served, and the page
//! operations the layers above use.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::install::{install, Fill, InstallError, Installed};
use crate::pagemap::{Pagemap, Query, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::uffd::{self, feature, RawMsg, UffdOps, Userfaultfd};
use crate::{
    signal, worker, Fault, FillError, Filled, Outcome, PageBuf, PageSource, PagerError, Retry, WriteDecision, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// Who serves a region's faults (see the crate documentation for the trade-off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// This many handler threads read fault messages and install pages.
    Workers(usize),
    /// The faulting thread serves its own fault, in a SIGBUS handler.
    FaultingThread,
    /// One worker per CPU, each pinned to its CPU and sleeping (never spinning) until a fault
    /// arrives: a faulting thread's own CPU goes idle when it blocks, so the worker there runs at
    /// once, with no cross-CPU wake-up and no signal. Serves system calls' faults too.
    PerCpu,
}

/// How a region learns which pages were written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Not at all.
    Off,
    /// The kernel resolves write-protect faults itself (`UFFD_FEATURE_WP_ASYNC`) and
    /// [`RegionCore::take_written`] finds the written pages with `PAGEMAP_SCAN`: writes cost
    /// nothing, but the answer is only as fresh as the last scan.
    Scan,
    /// Exact: pages are installed write-protected unless the fault was a write, and the first
    /// write to a protected page is a fault that calls [`PageSource::written`] before the write
    /// proceeds. Costs one fault per write epoch of a page that was first read; lets the layer
    /// above hold writers off while it saves a page.
    Faults,
}

/// How to create a [`Region`].
#[derive(Clone, Debug)]
pub struct RegionConfig {
    /// Size in pages.
    pub pages: u64,
    /// Map at exactly this address (page-aligned; fails if anything is mapped there).
    pub fixed_addr: Option<usize>,
    /// Take over the private anonymous mapping already at this address instead of mapping one
    /// (a forked child adopting the region it inherited, see [`RegionCore::inherit_on_fork`]):
    /// its present pages stay as they are, its missing pages fault to the new source.
    pub adopt_addr: Option<usize>,
    /// Who serves faults.
    pub mode: FaultMode,
    /// How written pages are tracked.
    pub dirty: DirtyTracking,
    /// Report the application's `MADV_DONTNEED` of region pages to [`PageSource::discarded`].
    /// Costs a message to a fault worker per `madvise` call (the region's own
    /// [`drop_pages`](RegionCore::drop_pages) included).
    pub report_discards: bool,
    /// How long an idle fault worker busy-polls before it sleeps.
    pub worker_spin: Duration,
    /// A name for logs and errors.
    pub name: String,
}

impl RegionConfig {
    /// A region of `pages` pages, served by one worker thread, without dirty tracking.
    pub fn new(pages: u64) -> RegionConfig {
        RegionConfig {
            pages,
            fixed_addr: None,
            adopt_addr: None,
            mode: FaultMode::Workers(1),
            dirty: DirtyTracking::Off,
            report_discards: true,
            worker_spin: Duration::from_micros(50),
            name: "region".into(),
        }
    }

    /// Sets who serves faults.
    pub fn mode(mut self, mode: FaultMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets how written pages are tracked.
    pub fn dirty(mut self, dirty: DirtyTracking) -> Self {
        self.dirty = dirty;
        self
    }

    /// Turns reporting of the application's `MADV_DONTNEED` on or off.
    pub fn report_discards(mut self, on: bool) -> Self {
        self.report_discards = on;
        self
    }

    /// Maps the region at `addr`.
    pub fn fixed_addr(mut self, addr: usize) -> Self {
        self.fixed_addr = Some(addr);
        self
    }

    /// Adopts the mapping at `addr` (see [`RegionConfig::adopt_addr`]).
    pub fn adopt(mut self, addr: usize) -> Self {
        self.adopt_addr = Some(addr);
        self
    }

    /// Names the region in logs.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets how long idle workers busy-poll.
    pub fn worker_spin(mut self, spin: Duration) -> Self {
        self.worker_spin = spin;
        self
    }

    fn validate(&self) -> Result<u64, PagerError> {
        if self.pages == 0 {
            return Err(PagerError::Config("a region needs at least one page".into()));
        }
        let len = self
            .pages
            .checked_mul(PAGE)
            .filter(|l| *l <= 1 << 47)
            .ok_or_else(|| PagerError::Config(format!("{} pages exceed the address space", self.pages)))?;
        for a in self.fixed_addr.iter().chain(&self.adopt_addr) {
            if a % PAGE_SIZE != 0 || *a == 0 {
                return Err(PagerError::Config(format!("address {a:#x} is not a non-zero page boundary")));
            }
        }
        if self.fixed_addr.is_some() && self.adopt_addr.is_some() {
            return Err(PagerError::Config("a region is either mapped at a fixed address or adopted".into()));
        }
        if let FaultMode::Workers(0) = self.mode {
            return Err(PagerError::Config("FaultMode::Workers needs at least one thread".into()));
        }
        Ok(len)
    }
}

/// Counters, all since the region was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Missing-page faults served.
    pub faults: u64,
    /// Pages installed from data (faults and explicit installs).
    pub installed: u64,
    /// Zero pages installed.
    pub zero: u64,
    /// Installs that found the page already present.
    pub already_present: u64,
    /// Pages poisoned because the source failed.
    pub lost: u64,
    /// Pages dropped.
    pub dropped: u64,
    /// Times a fault was kept for later because the source was busy with its page.
    pub deferred: u64,
}

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
struct Counters {
    faults: AtomicU64,
    installed: AtomicU64,
    zero: AtomicU64,
    already_present: AtomicU64,
    lost: AtomicU64,
    dropped: AtomicU64,
    deferred: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The shared part of a region: what fault handlers and sources use. Reach it through
/// [`Region`] (which dereferences to it) or [`Fault::region`].
pub struct RegionCore {
    name: String,
    /// Current start address (changes if the application mremaps the whole region).
    base: AtomicU64,
    /// Address the region was created at (the signal handler's lookup key moves with `base`).
    pages: u64,
    uffd: Userfaultfd,
    source: Box<dyn PageSource>,
    mode: FaultMode,
    dirty: DirtyTracking,
    pagemap: Option<Pagemap>,
    /// Set when the application remapped part of the region: why it is no longer whole.
    broken: OnceLock<String>,
    /// Address ranges the application unmapped or moved away: never ours to unmap again.
    foreign: Mutex<Vec<Range<u64>>>,
    /// Ranges this region is dropping itself, so their REMOVE events are not the application's.
    self_drops: Mutex<Vec<Range<u64>>>,
    stats: Counters,
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

/// A range of address space whose pages are filled on demand by a [`PageSource`].
///
/// Dropping it stops its fault handling, unregisters and unmaps it; touching its memory after
/// that is a use after free, as with any unmapped memory.
#[derive(Debug)]
pub struct Region {
    core: Arc<RegionCore>,
    workers: Option<worker::Workers>,
    signal_slot: Option<signal::Slot>,
}

impl Region {
    /// A shared handle on the region's core, for threads that work on the region in the
    /// background. It must not be used after the [`Region`] is dropped: operations then fail,
    /// and the memory is unmapped.
    pub fn core(&self) -> Arc<RegionCore> {
        self.core.clone()
    }
}

impl Region {
    /// In a forked child: lets go of a region inherited from the parent without touching it.
    /// The parent's fault threads do not exist here and its userfaultfd serves the parent's
    /// memory, so nothing is stopped, unregistered or unmapped; the descriptor is closed and
    /// the bookkeeping leaked. Use it on nothing but a region the calling process inherited.
    pub fn forget_after_fork(mut self) {
        if let Some(slot) = self.signal_slot.take() {
            slot.forget();
        }
        let fd = self.core.uffd.raw_fd();
        std::mem::forget(self);
        // SAFETY: the descriptor is the inherited copy of the parent's userfaultfd; the region
        // owning it was just forgotten, so nothing in this process uses it again.
        unsafe { libc::close(fd) };
    }
}

impl std::ops::Deref for Region {
    type Target = RegionCore;
    fn deref(&self) -> &RegionCore {
        &self.core
    }
}

/// Features to leave unused even where the kernel has them, from `MOSAIC_PAGER_DISABLE_FEATURES`
/// (comma-separated names, e.g. `POISON,MOVE`): runs an older kernel's code paths on a newer one,
/// for tests and for working around a kernel bug.
fn disabled_features() -> u64 {
    let Ok(list) = std::env::var("MOSAIC_PAGER_DISABLE_FEATURES") else { return 0 };
    list.split(',')
        .map(str::trim)
        .filter_map(|name| feature::NAMES.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)).map(|(b, _)| *b))
        .fold(0, |acc, b| acc | b)
}

/// The features a configuration needs, and what for.
fn needed_features(cfg: &RegionConfig) -> Vec<(u64, &'static str)> {
    // Failing closed: UFFDIO_POISON where the kernel has it (6.6+); otherwise a signal to the
    // faulting thread, whose id the fault message carries (THREAD_ID).
    let mut need = vec![(feature::EVENT_REMAP | feature::EVENT_UNMAP, "following mremap and munmap")];
    if cfg.report_discards {
        need.push((feature::EVENT_REMOVE, "reporting MADV_DONTNEED"));
    }
    match cfg.dirty {
        DirtyTracking::Off => {}
        DirtyTracking::Scan => need.push((feature::PAGEFAULT_FLAG_WP | feature::WP_ASYNC, "dirty tracking by scan")),
        DirtyTracking::Faults => need.push((feature::PAGEFAULT_FLAG_WP, "dirty tracking by write faults")),
    }
    if cfg.mode == FaultMode::FaultingThread {
        need.push((feature::SIGBUS, "serving faults on the faulting thread"));
    }
    need
}

impl Region {
    /// Maps and registers a region whose missing pages come from `source`, and starts serving
    /// its faults.
    pub fn new(cfg: RegionConfig, source: impl PageSource) -> Result<Region, PagerError> {
        let len = cfg.validate()?;
        let available = Userfaultfd::available_features().map_err(PagerError::NoUserfaultfd)? & !disabled_features();
        let mut want = 0;
        for (bits, needed_for) in needed_features(&cfg) {
            let missing = bits & !available;
            if missing != 0 {
                return Err(PagerError::Unsupported { missing: feature::names(missing), needed_for });
            }
            want |= bits;
        }
        // Optional: batched installs move pages instead of copying where the kernel can; lost
        // pages are poisoned where it can, and their faulting threads signalled otherwise.
        want |= available & (feature::MOVE | feature::POISON | feature::THREAD_ID);
        if want & (feature::POISON | feature::THREAD_ID) == 0 && cfg.mode != FaultMode::FaultingThread {
            return Err(PagerError::Unsupported {
                missing: vec!["POISON", "THREAD_ID"],
                needed_for: "failing closed when a page cannot be fetched",
            });
        }
        let uffd = Userfaultfd::open(want).map_err(PagerError::NoUserfaultfd)?;
        let pagemap = if cfg.dirty == DirtyTracking::Scan { Some(open_pagemap()?) } else { None };
        let base = match cfg.adopt_addr {
            Some(a) => {
                set_dontfork(a as u64, len, true)?;
                a as u64
            }
            None => map(cfg.fixed_addr, len)?,
        };
        let core = Arc::new(RegionCore {
            name: cfg.name.clone(),
            base: AtomicU64::new(base),
            pages: cfg.pages,
            uffd,
            source: Box::new(source),
            mode: cfg.mode,
            dirty: cfg.dirty,
            pagemap,
            broken: OnceLock::new(),
            foreign: Mutex::new(Vec::new()),
            self_drops: Mutex::new(Vec::new()),
            stats: Counters::default(),
        });
        // From here on, dropping `region` unmaps.
        let mut region = Region { core, workers: None, signal_slot: None };
        region.register(len)?;
        if cfg.dirty == DirtyTracking::Scan {
            // Probe PAGEMAP_SCAN now, so a kernel without it fails here and not at first use.
            region.scan(0, 1, Query { require: PAGE_IS_WRITTEN, exclude: 0, reprotect: false }).map_err(
                |e| match e {
                    PagerError::Os { err, .. } if err.raw_os_error() == Some(libc::ENOTTY) => {
                        PagerError::Unsupported { missing: vec!["PAGEMAP_SCAN"], needed_for: "dirty tracking" }
                    }
                    e => e,
                },
            )?;
        }
        let (threads, spin, pin) = match cfg.mode {
            FaultMode::Workers(n) => (n, cfg.worker_spin, Vec::new()),
            FaultMode::FaultingThread => {
                region.signal_slot = Some(signal::Slot::register(&region.core)?);
                // One worker reads the non-fault events (mremap, munmap, MADV_DONTNEED).
                (1, cfg.worker_spin, Vec::new())
            }
            FaultMode::PerCpu => {
                let cpus = worker::allowed_cpus();
                (cpus.len().max(1), Duration::ZERO, cpus)
            }
        };
        region.workers = Some(
            worker::Workers::start(&region.core, threads, spin, &pin)
                .map_err(|err| PagerError::Os { op: "spawn fault worker", err })?,
        );
        Ok(region)
    }

    fn register(&self, len: u64) -> Result<(), PagerError> {
        let base = self.base();
        let mut mode = uffd::REGISTER_MODE_MISSING;
        if self.dirty != DirtyTracking::Off {
            mode |= uffd::REGISTER_MODE_WP;
        }
        let ioctls =
            self.uffd.register(base, len, mode).map_err(|err| PagerError::Os { op: "UFFDIO_REGISTER", err })?;
        let mut need = uffd::NEED_RANGE_IOCTLS;
        if self.dirty == DirtyTracking::Off {
            need &= !(1 << 0x06);
        }
        if ioctls & need != need {
            return Err(PagerError::Unsupported {
                missing: vec!["UFFDIO_COPY/ZEROPAGE/WAKE/WRITEPROTECT on anonymous memory"],
                needed_for: "installing pages",
            });
        }
        Ok(())
    }

    /// Stops fault handling, unregisters and unmaps. Errors are logged; nothing is leaked
    /// except address space the application took over.
    fn teardown(&mut self) {
        if let Some(slot) = self.signal_slot.take() {
            slot.unregister();
        }
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        let (base, len) = (self.base(), self.len() as u64);
        if let Err(e) = self.uffd.unregister(base, len) {
            // ENOMEM/EINVAL when part was unmapped: the rest is unregistered by munmap anyway.
            log::debug!("region {}: unregister: {e}", self.name);
        }
        let foreign = crate::region::lock(&self.foreign).clone();
        for r in subtract(base..base + len, &foreign) {
            unmap(r.start, r.end - r.start);
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.teardown();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `range` minus every range in `holes`.
fn subtract(range: Range<u64>, holes: &[Range<u64>]) -> Vec<Range<u64>> {
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

fn map(fixed: Option<usize>, len: u64) -> Result<u64, PagerError> {
    let len_usize = usize::try_from(len).map_err(|_| PagerError::Config("region too large".into()))?;
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
            return Err(PagerError::Config(format!("address {:#x} is already in use", fixed.unwrap_or(0))));
        }
        return Err(PagerError::Os { op: "mmap", err });
    }
    if let Some(a) = fixed {
        if p as usize != a {
            // An old kernel that ignores MAP_FIXED_NOREPLACE treats it as a hint.
            unmap(p as u64, len);
            return Err(PagerError::Config(format!("could not map at {a:#x}")));
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
fn set_dontfork(start: u64, len: u64, on: bool) -> Result<(), PagerError> {
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
    let q = Query { require: PAGE_IS_PRESENT, exclude: 0, reprotect: false };
    scan_pages(&open_pagemap()?, start, start, start + pages * PAGE, q)
}

fn open_pagemap() -> Result<Pagemap, PagerError> {
    Pagemap::open().map_err(|err| PagerError::Os { op: "open /proc/self/pagemap", err })
}

/// The page ranges of `[start, end)` that `q` selects, as page numbers counted from `base`.
fn scan_pages(pm: &Pagemap, base: u64, start: u64, end: u64, q: Query) -> Result<Vec<Range<u64>>, PagerError> {
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
mod raw {
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
    pub(super) unsafe fn madvise(addr: *mut libc::c_void, len: usize, advice: i32) -> i32 {
        // SAFETY: forwarded to the caller.
        let r = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) };
        i32::try_from(r).unwrap_or(-1)
    }
}

fn unmap(start: u64, len: u64) {
    // SAFETY: only ranges this region mapped and still owns (see `foreign`) are unmapped.
    let rc = unsafe { raw::munmap(start as *mut libc::c_void, usize::try_from(len).unwrap_or(0)) };
    if rc != 0 {
        log::warn!("munmap({start:#x}, {len}) failed: {}", std::io::Error::last_os_error());
    }
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
            Err(InstallError::Gone) => Err(PagerError::Gone(format!("region {} is no longer registered", self.name))),
            Err(InstallError::Busy(d)) => Err(PagerError::Os {
                op: "install",
                err: std::io::Error::new(std::io::ErrorKind::WouldBlock, format!("address space busy for {d:?}")),
            }),
            Err(InstallError::Os { op, err }) => Err(PagerError::Os { op, err }),
        }
    }

    /// Installs `pages` at `first`, `first + 1`, ... where they are missing (prefetch, push).
    /// Returns how many were installed; pages already present are left as they are.
    pub fn install(&self, first: u64, pages: &[PageBuf]) -> Result<u64, PagerError> {
        // SAFETY: a slice of `PageBuf`s is page-aligned bytes, PAGE_SIZE per page, no padding.
        let bytes = unsafe { std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), pages.len() * PAGE_SIZE) };
        self.install_bytes(first, bytes)
    }

    /// [`install`](Self::install) from any page-aligned buffer of whole pages (pages another
    /// crate's type holds, say); refused with [`PagerError::Config`] if `data` is misaligned or
    /// not whole pages. Returns how many pages were installed.
    pub fn install_bytes(&self, first: u64, data: &[u8]) -> Result<u64, PagerError> {
        if data.len() % PAGE_SIZE != 0 || data.as_ptr().align_offset(PAGE_SIZE) != 0 {
            return Err(PagerError::Config(format!(
                "an install needs page-aligned whole pages, got {} bytes at {:p}",
                data.len(),
                data.as_ptr()
            )));
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
    pub fn install_moving(&self, first: u64, pages: &mut [PageBuf]) -> Result<u64, PagerError> {
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

    /// Write-protects (or unprotects) `count` pages from `first`. With dirty tracking, a
    /// protected page that is written shows up in [`take_written`](Self::take_written).
    pub fn write_protect(&self, first: u64, count: u64, protect: bool) -> Result<(), PagerError> {
        if self.dirty == DirtyTracking::Off {
            return Err(PagerError::Config("write protection needs a region with dirty tracking".into()));
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
            return Err(PagerError::Config("take_written needs a region with DirtyTracking::Scan".into()));
        }
        let q = Query { require: PAGE_IS_WRITTEN | PAGE_IS_PRESENT, exclude: PAGE_IS_PFNZERO, reprotect: true };
        self.scan(first, count, q)
    }

    /// Page ranges among `count` pages from `first` that are present in memory.
    pub fn present(&self, first: u64, count: u64) -> Result<Vec<Range<u64>>, PagerError> {
        self.scan(first, count, Query { require: PAGE_IS_PRESENT, exclude: 0, reprotect: false })
    }

    fn scan(&self, first: u64, count: u64, q: Query) -> Result<Vec<Range<u64>>, PagerError> {
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
        let mut buf = PageBuf::zeroed();
        // The source sees the region through a plain reference, valid for this call.
        let fault = Fault::new(index, write, self, retry, wake);
        // A panicking source must not kill a worker (its waiters would hang) or unwind out of a
        // signal handler (which aborts): it counts as a failed fetch.
        let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.source.fill(&fault, &mut buf)))
            .unwrap_or_else(|_| Err(FillError("the page source panicked".into())));
        if let Ok(Filled::Busy) = filled {
            bump(&self.stats.deferred, 1);
            return Served::Busy;
        }
        bump(&self.stats.faults, 1);
        // Exact tracking installs a page written at once (or that the source counts as written)
        // unprotected; scan tracking protects everything and lets the kernel unprotect on write.
        let wp = match self.dirty {
            DirtyTracking::Off => false,
            DirtyTracking::Scan => true,
            DirtyTracking::Faults => !fault.writable(),
        };
        let result = match filled {
            Ok(Filled::Data) => {
                let fill = Fill::Copy { src: std::ptr::addr_of!(buf) as u64, wp };
                install(&self.uffd, page_addr, PAGE, fill, !wake, on_again).map(|r| (r, false))
            }
            Ok(Filled::Zero) if self.dirty == DirtyTracking::Faults => {
                // The shared zero page cannot be write-protected: a write to it would go
                // unnoticed. Install a protected copy of zeros instead.
                buf.0.fill(0);
                let fill = Fill::Copy { src: std::ptr::addr_of!(buf) as u64, wp };
                install(&self.uffd, page_addr, PAGE, fill, !wake, on_again).map(|r| (r, true))
            }
            Ok(Filled::Zero) => install(&self.uffd, page_addr, PAGE, Fill::Zero, !wake, on_again).map(|r| (r, true)),
            Ok(Filled::Busy) => unreachable!("returned above"),
            Err(FillError(why)) => {
                self.report_loss(page_addr, &why);
                bump(&self.stats.lost, 1);
                self.fail_closed(page_addr, wake, tid, on_again);
                self.tell_source(index, Outcome::Lost);
                return Served::Lost;
            }
        };
        match result {
            Ok((r, zero)) => {
                bump(if zero { &self.stats.zero } else { &self.stats.installed }, r.new);
                bump(&self.stats.already_present, r.present);
                self.tell_source(index, if r.new > 0 { Outcome::Installed } else { Outcome::AlreadyPresent });
                if r.present > 0 && !wake && self.dirty == DirtyTracking::Faults && cfg!(not(target_arch = "x86_64")) {
                    // Signal mode where the hardware does not say: a "missing" page that was
                    // present is a write to a protected page.
                    return self.serve_write_fault(addr, false, retry);
                }
                Served::Done
            }
            Err(InstallError::Gone) => {
                // Unmapped under us: nobody is waiting any more.
                self.tell_source(index, Outcome::Lost);
                Served::Done
            }
            Err(e) => {
                // The faulting thread cannot be left waiting: poison the page so it gets SIGBUS.
                self.report_loss(page_addr, &format!("installing it failed: {e}"));
                bump(&self.stats.lost, 1);
                self.fail_closed(page_addr, wake, tid, on_again);
                self.tell_source(index, Outcome::Lost);
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

    fn tell_source(&self, index: u64, outcome: Outcome) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.source.installed(index, outcome))).is_err() {
            signal::report(format_args!(
                "mosaic pager: region {}: the page source panicked in installed()\n",
                self.name
            ));
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
                Err(_) => signal::report(format_args!(
                    "mosaic pager: region {}: the page source panicked in written()\n",
                    self.name
                )),
            }
        }
        // Unprotecting wakes the writer unless told not to (the ioctl's DONTWAKE).
        if let Err(e) = self.unprotect_page(page_addr, !wake) {
            signal::report(format_args!(
                "mosaic pager: region {}: unprotecting {page_addr:#x} failed: {e}\n",
                self.name
            ));
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
        signal::report(format_args!(
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Zeros;
    impl PageSource for Zeros {
        fn fill(&self, _: &crate::Fault<'_>, _: &mut crate::PageBuf) -> Result<crate::Filled, crate::FillError> {
            Ok(crate::Filled::Zero)
        }
    }

    /// Each drop used to leave an entry behind when REMOVE events were off (nothing removed
    /// it): a region evicting for hours grew without bound (1.2 MB per 100,000 evictions).
    #[test]
    fn dropping_pages_keeps_no_bookkeeping_without_remove_events() {
        for report in [false, true] {
            let r = Region::new(RegionConfig::new(64).report_discards(report), Zeros).unwrap();
            for round in 0..1000 {
                // SAFETY: inside the region, mapped while `r` lives.
                unsafe { r.as_ptr().add((round % 64) * PAGE_SIZE).write_volatile(1) };
                r.drop_pages((round % 64) as u64, 1).unwrap();
            }
            let left = wait_until(|| lock(&r.self_drops).is_empty(), Duration::from_secs(5));
            assert!(left, "with report_discards({report}): {} entries left", lock(&r.self_drops).len());
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn subtract_cuts_holes() {
        assert_eq!(subtract(0..100, &[]), vec![0..100]);
        assert_eq!(subtract(0..100, &[10..20, 50..60]), vec![0..10, 20..50, 60..100]);
        assert_eq!(subtract(0..100, &[0..100]), Vec::<std::ops::Range<u64>>::new());
        assert_eq!(subtract(0..100, &[90..200]), vec![0..90]);
    }
}
