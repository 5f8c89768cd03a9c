//! How a region is configured ([`RegionConfig`]: who serves its faults, how it tracks
//! writes) and what it counts ([`PagerStats`]).

use std::time::Duration;

use crate::{ConfigError, PagerError, PAGE_SIZE};
#[cfg(doc)]
use crate::{PageSource, Region, RegionCore};

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

    pub(crate) fn validate(&self) -> Result<u64, PagerError> {
        if self.pages == 0 {
            return Err(PagerError::Config(ConfigError::NoPages));
        }
        let len = self
            .pages
            .checked_mul(PAGE)
            .filter(|l| *l <= 1 << 47)
            .ok_or(PagerError::Config(ConfigError::TooLarge { pages: self.pages }))?;
        for a in self.fixed_addr.iter().chain(&self.adopt_addr) {
            if a % PAGE_SIZE != 0 || *a == 0 {
                return Err(PagerError::Config(ConfigError::BadAddress { addr: *a }));
            }
        }
        if self.fixed_addr.is_some() && self.adopt_addr.is_some() {
            return Err(PagerError::Config(ConfigError::FixedAndAdopted));
        }
        if let FaultMode::Workers(0) = self.mode {
            return Err(PagerError::Config(ConfigError::NoWorkers));
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
