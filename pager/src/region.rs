//! A registered region: the mapping, its userfaultfd, how its faults are served, and the page
//! operations the layers above use.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::config::{DirtyTracking, FaultMode, RegionConfig};
use crate::mapping::{map, open_pagemap, set_dontfork, subtract, unmap};
use crate::pagemap::{Query, PAGE_IS_WRITTEN};
use crate::region_core::{lock, Counters, RegionCore};
use crate::uffd::{self, feature, Userfaultfd};
use crate::{signal, worker, PageSource, PagerError};

/// A range of address space whose pages are filled on demand by a [`PageSource`].
///
/// Dropping it stops its fault handling, unregisters and unmaps it; touching its memory after
/// that is a use after free, as with any unmapped memory.
#[derive(Debug)]
pub struct Region {
    core: Arc<RegionCore>,
    workers: Option<worker::Workers>,
    signal_slot: Option<signal::Slot>,
    /// Leave the memory mapped when the region goes ([`Region::release`]).
    keep_mapping: bool,
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

impl Region {
    /// Stops serving the region and leaves its memory to the process as ordinary memory: write
    /// protection lifted, the userfaultfd unregistered, the mapping and every page present in it
    /// kept where they are (missing pages read as zeros from now on, as in any anonymous
    /// mapping). Returns its address. For a region taken over with [`RegionConfig::adopt`] that
    /// is given back (a migration that did not happen).
    pub fn release(mut self) -> Result<usize, PagerError> {
        // Kept mapped whatever happens below: a failed release must not destroy the memory.
        self.keep_mapping = true;
        if self.dirty != DirtyTracking::Off {
            self.core.write_protect(0, self.core.pages, false)?;
        }
        set_dontfork(self.base(), self.len() as u64, false)?;
        Ok(self.as_ptr() as usize)
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
            batch_drops: Mutex::new(Default::default()),
            stats: Counters::default(),
        });
        // From here on, dropping `region` unmaps.
        let mut region = Region { core, workers: None, signal_slot: None, keep_mapping: false };
        region.register(len)?;
        if cfg.dirty == DirtyTracking::Scan {
            // Probe PAGEMAP_SCAN now, so a kernel without it fails here and not at first use.
            region.scan(0, 1, Query { require: PAGE_IS_WRITTEN, exclude: 0, any: 0, reprotect: false }).map_err(
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
        if self.keep_mapping {
            return;
        }
        let foreign = lock(&self.foreign).clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region_core::wait_until;
    use crate::PAGE_SIZE;

    struct Zeros;
    impl PageSource for Zeros {
        fn fill(&self, _: &crate::Fault<'_>, _: &mut crate::Page) -> Result<crate::Filled, crate::FillError> {
            Ok(crate::Filled::Zero(crate::Token::default()))
        }
    }

    /// A released region stays mapped as plain memory: what was written is there, it can be
    /// written again (no write protection left), missing pages read zeros, and it is the
    /// caller's to unmap.
    #[test]
    fn a_released_region_is_ordinary_memory() {
        let r = Region::new(RegionConfig::new(4).dirty(DirtyTracking::Faults), Zeros).unwrap();
        // SAFETY: inside the region, mapped while `r` lives.
        unsafe { r.as_ptr().write_volatile(7) };
        r.write_protect(0, 4, true).unwrap();
        let addr = r.release().unwrap();
        let p = addr as *mut u8;
        // SAFETY: the released mapping stays mapped (4 pages) until unmapped below.
        unsafe {
            assert_eq!(p.read_volatile(), 7);
            p.write_volatile(8);
            assert_eq!(p.read_volatile(), 8);
            assert_eq!(p.add(3 * PAGE_SIZE).read_volatile(), 0);
            libc::munmap(p.cast(), 4 * PAGE_SIZE);
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
}
