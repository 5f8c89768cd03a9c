//! [`NetRam`]: a region of any size whose pages live on memory servers, with a bounded number
//! resident in local RAM.
//!
//! Faults fetch pages from a server holding them ([`Source`], running on the faulting thread by
//! default), with a prefetch window along strided streams and the window after it on its way
//! ([`window`]); an evictor thread keeps the resident set within the budget, writing dirty pages
//! back to every copy's server before dropping them, and a fault that would overshoot the budget
//! waits for it; a background thread checks the sessions and rebuilds copies lost with a server.
//! A resident page is never dropped while no readable copy of it exists elsewhere: the evictor
//! writes such a page back as if it were dirty, and the rebuild re-stores resident pages too.
//! Page states and their invariants are in [`crate::pages`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_pager::{
    DirtyTracking, Fault, FaultMode, FillError, Filled, Outcome, PageBuf, PageSource, Region, RegionConfig, RegionCore,
    WriteDecision,
};
use mosaic_transport::{ClusterKey, Page};

use crate::budget::Share;
use crate::pages::{PageTable, ABSENT, CLEAN, CLEAN_ABSENT, DIRTY, EVICTING, FETCHING, LOST, REMOTE};
use crate::servers::{ServerSet, FILE_HOLDER};
use crate::SharedBudget;
use crate::{NetRamError, PAGE_SIZE};
use footprint::Footprint;

mod footprint;
mod fork;
mod window;

use fork::ForkGate;
pub use fork::ForkTicket;

/// How long a fault waits for a page another thread is fetching or evicting.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// Pages the evictor takes from its queue per round.
const EVICT_BATCH: usize = 64;
/// Dirty pages written back per step of a round (write-protect, copy, store, drop). Clean
/// pages of the round are dropped in one step. Smaller steps let faults through between them:
/// random read-modify-write at 25% resident ran 1.3-2x faster with 16 than with 64 (BENCHMARKS.md,
/// 2026-12-02), while scans, which evict clean pages, need the large round.
const WRITE_BACK_STEP: usize = 16;
/// Which pages a round of eviction may take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Round {
    /// Any resident page (the evictor thread).
    All,
    /// Only pages it can drop without reading them: clean pages, no copies kept in the victim
    /// cache. For a fault that helps ([`Shared::help_evict`]): reading a page the application
    /// has just discarded faults, and a fault while one is being served cannot be served (the
    /// signal is blocked in its own handler; a lone fault worker is busy with this one).
    CleanOnly,
}
/// Pages of buffers that may be in flight beside the resident set (a prefetch window on its way
/// and the next one, and a round of eviction's copies): taken out of the budget.
const IN_FLIGHT_PAGES: u64 = 2 * crate::prefetch::MAX_WINDOW + EVICT_BATCH as u64;
/// The smallest resident budget, in pages.
pub const MIN_BUDGET_PAGES: u64 = 64;
/// Pages re-stored per batch by the rebuild after a server loss (one GET and one PUT request
/// per server per batch).
const REBUILD_BATCH: usize = 64;
/// How often the servers are asked whether they still hold this region's session.
const SESSION_CHECK: Duration = Duration::from_secs(2);

/// How to create a [`NetRam`] region.
#[derive(Clone, Debug)]
pub struct NetRamConfig {
    /// Memory server URIs (`tcp://HOST:PORT`, `shm://NAME`, `rdma://HOST:PORT`).
    pub servers: Vec<String>,
    /// The cluster key.
    pub key: ClusterKey,
    /// Region size in bytes (rounded up to pages).
    pub size: u64,
    /// Local RAM the region may use, in bytes (at least [`MIN_BUDGET_PAGES`] pages).
    pub resident_budget: u64,
    /// Copies of each page on distinct servers (default: 2 where two servers exist, else 1).
    /// With one copy, losing its server loses the pages: touching one raises SIGBUS.
    pub copies: usize,
    /// Who serves faults (default: the faulting thread; see `mosaic_pager`).
    pub fault_mode: FaultMode,
    /// How long the servers keep this region's pages after losing every connection to it (the
    /// process died, or the network broke), before reclaiming them; servers cap it (an hour by
    /// default). While connected, nothing is ever reclaimed, however long the program is stopped.
    pub grace: Duration,
    /// Time-out of one request to a server.
    pub timeout: Duration,
    /// Name for logs.
    pub name: String,
    /// Prefetch along strided fault streams (sequential scans, strided loops). Default on.
    pub prefetch: bool,
    /// Also keep every written-back page in this local file (created if missing, sparse, the
    /// region's size): a second copy that needs no second server. With it, losing every server
    /// loses nothing; reads fall back to the file when no server can answer.
    pub backing_file: Option<std::path::PathBuf>,
    /// Keep a quarter of the budget as a local cache of recently evicted pages: a page touched
    /// again soon after its eviction comes back from here, not from a server, and returns to the
    /// resident set. Together with first-in-first-out eviction of the resident set this
    /// approximates LRU (hot pages keep coming back; cold ones age out). Off: plain FIFO.
    pub victim_cache: bool,
    /// A budget shared with other processes (a `mosrun` job's): the region then keeps within
    /// its share of it as well as within `resident_budget` (see [`SharedBudget`]).
    pub shared_budget: Option<SharedBudget>,
    /// Make the budget bound the process's whole anonymous memory, not just the region's:
    /// the region keeps to the budget minus what the rest of the process holds (its heap,
    /// stacks, the victim cache, buffers), measured by the evictor at least every 20 ms, and
    /// never less than a quarter of the budget. For one region per process (the LD_PRELOAD
    /// shim sets it); off by default.
    pub count_process_memory: bool,
}

impl NetRamConfig {
    /// A region of `size` bytes on `servers`, keeping at most `resident_budget` bytes local.
    pub fn new(servers: Vec<String>, key: ClusterKey, size: u64, resident_budget: u64) -> NetRamConfig {
        let copies = if servers.len() >= 2 { 2 } else { 1 };
        NetRamConfig {
            servers,
            key,
            size,
            resident_budget,
            copies,
            fault_mode: FaultMode::FaultingThread,
            grace: Duration::from_secs(600),
            timeout: Duration::from_secs(5),
            name: "netram".into(),
            prefetch: true,
            victim_cache: true,
            backing_file: None,
            shared_budget: None,
            count_process_memory: false,
        }
    }
}

/// Counters of one region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRamStats {
    /// Faults served from a server.
    pub fetched: u64,
    /// Faults on never-stored pages, served as zeros.
    pub zero_filled: u64,
    /// Pages brought in ahead of a strided fault stream.
    pub prefetched: u64,
    /// Faults served from the local cache of recently evicted pages.
    pub cache_hits: u64,
    /// Pages dropped from local RAM.
    pub evicted: u64,
    /// Dirty pages written to the servers.
    pub written_back: u64,
    /// Reads that had to use another copy because a server failed.
    pub failovers: u64,
    /// Copies re-created after a server was lost.
    pub rebuilt: u64,
    /// Pages lost (no copy left; touching them raises SIGBUS).
    pub lost: u64,
    /// Pages resident now.
    pub resident: u64,
    /// Copies of recently evicted pages held in the local victim cache now.
    pub cached: u64,
    /// Anonymous pages the process held outside the region at the last measurement, with
    /// [`NetRamConfig::count_process_memory`] (else 0).
    pub outside: u64,
    /// Faults that waited for the evictor because the resident set had reached its hard limit
    /// (the budget plus a slack): many mean the evictor cannot keep up with the faults.
    pub throttled: u64,
    /// Of `evicted`, pages evicted by faults that made room for their prefetch window while it
    /// was on its way, instead of by the evictor thread.
    pub evicted_by_faults: u64,
    /// Clean resident pages written back because no readable copy of them was left elsewhere
    /// (their servers died or lost the session): kept, never dropped.
    pub saved_clean: u64,
    /// Pages stored with fewer copies than asked for now (servers full or gone); the background
    /// rebuild adds the missing copies when it can.
    pub under_replicated: u64,
    /// Sessions a live server lost (and that were opened again, their copies rebuilt).
    pub sessions_lost: u64,
}

#[derive(Default)]
struct Counters {
    cache_hits: AtomicU64,
    fetched: AtomicU64,
    prefetched: AtomicU64,
    zero_filled: AtomicU64,
    evicted: AtomicU64,
    written_back: AtomicU64,
    failovers: AtomicU64,
    rebuilt: AtomicU64,
    lost: AtomicU64,
    throttled: AtomicU64,
    evicted_by_faults: AtomicU64,
    saved_clean: AtomicU64,
    sessions_lost: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Shared {
    name: String,
    prefetch: crate::prefetch::Prefetcher,
    prefetch_on: AtomicBool,
    /// Pages installed write-protected, and how many of them were written since: the
    /// read-modify-write predictor.
    protected_installs: AtomicU64,
    upgrades: AtomicU64,
    table: PageTable,
    servers: ServerSet,
    resident: AtomicU64,
    /// The pages the region may hold now: `own_budget`, or less, its share of a budget shared
    /// with other processes.
    budget: AtomicU64,
    /// The budget it was given.
    own_budget: AtomicU64,
    /// Its place in a budget shared with other processes.
    share: Option<Share>,
    /// The local backing file, if any.
    file: Option<std::fs::File>,
    /// Recently evicted pages (copies of what the servers hold), newest last.
    victims: VictimCache,
    /// Resident pages in the order they came in: the evictor's candidates.
    queue: Mutex<VecDeque<u64>>,
    /// The page the evictor is copying right now (u64::MAX: none). If the application discarded
    /// it (MADV_DONTNEED), the copy faults; that fault is served with zeros (the content of a
    /// discarded page) instead of waiting for the evictor, which is waiting for the fault.
    copying: AtomicU64,
    /// Set when that happened to the page being copied.
    copy_discarded: AtomicBool,
    evict_wanted: (Mutex<bool>, Condvar),
    /// Held for each round of eviction, by the evictor or a fault helping it
    /// ([`Shared::help_evict`]): rounds never overlap (`copying` names one page).
    evicting: Mutex<()>,
    /// Closed while the process forks: what changes the servers' copies or the holder masks
    /// (eviction and rebuild rounds, discards, session checks) waits (see [`fork`]).
    fork_gate: ForkGate,
    /// The window requested ahead of a strided fault stream, if one is on its way.
    ahead: Mutex<Option<window::Ahead>>,
    /// Set while the evictor cannot bring the resident set down (every server full, nothing
    /// evictable): faults over the hard limit then go ahead instead of waiting for it.
    evict_stalled: AtomicBool,
    /// The process's memory outside the region, when the budget covers it.
    footprint: Footprint,
    /// Set when pages were stored with fewer copies than wanted: the keeper rebuilds.
    rebuild_wanted: AtomicBool,
    stats: Counters,
}

thread_local! {
    /// What the last `fill` on this thread decided: (page, state once installed, whether the
    /// page was already counted as resident). Read by `installed`, which the pager calls next
    /// on the same thread. Const-initialised: safe in a signal handler.
    static DECIDED: std::cell::Cell<(u64, u8, bool)> = const { std::cell::Cell::new((u64::MAX, 0, false)) };
}

/// What a wait for a busy page ended with (see [`Shared::settle_or_take_ahead`]).
enum Settled {
    /// The page left FETCHING/EVICTING for this state.
    State(u8),
    /// It belongs to the window requested ahead, which the caller now owns.
    Ahead(window::Ahead),
    /// It stayed busy for [`SETTLE_LIMIT`].
    Hung,
}

/// The region's page source: what the pager calls on faults.
struct Source(Arc<Shared>);

impl PageSource for Source {
    fn fill(&self, fault: &Fault<'_>, page: &mut PageBuf) -> Result<Filled, FillError> {
        let s = &self.0;
        let i = fault.index;
        if s.copying.load(Ordering::Acquire) == i && s.table.get(i) == EVICTING {
            s.copy_discarded.store(true, Ordering::Release);
            return Ok(Filled::Zero);
        }
        if s.throttle(fault) {
            return Ok(Filled::Busy);
        }
        // A page of the window requested ahead (such pages are FETCHING, so other faults take
        // no lock here): this fault collects the window.
        if let Some(a) = (s.table.get(i) == FETCHING).then(|| s.take_ahead_holding(i)).flatten() {
            return s.fill_from_ahead(fault, a, i, page);
        }
        let hung = || FillError(format!("page {i} stayed busy for {SETTLE_LIMIT:?} (a fetch or eviction hung)"));
        loop {
            let st = if fault.can_defer {
                // A fault worker must not wait here: the evictor owning the page may itself
                // fault (on a page the application discarded) and need this worker.
                match s.table.get(i) {
                    FETCHING | EVICTING if fault.waited > SETTLE_LIMIT => return Err(hung()),
                    FETCHING | EVICTING => return Ok(Filled::Busy),
                    st => st,
                }
            } else {
                match s.settle_or_take_ahead(i) {
                    Settled::State(st) => st,
                    Settled::Ahead(a) => return s.fill_from_ahead(fault, a, i, page),
                    Settled::Hung => return Err(hung()),
                }
            };
            if !s.table.cas(i, st, FETCHING) {
                continue;
            }
            let write = s.decide_write(fault);
            let dirty_or = |clean| if write { DIRTY } else { clean };
            return match st {
                ABSENT => {
                    DECIDED.set((i, dirty_or(CLEAN_ABSENT), false));
                    bump(&s.stats.zero_filled, 1);
                    Ok(Filled::Zero)
                }
                REMOTE => {
                    let dst = page_of(page)?;
                    if let Some(copy) = s.victims.take(i) {
                        dst.0.copy_from_slice(&copy[..]);
                        DECIDED.set((i, dirty_or(CLEAN), false));
                        bump(&s.stats.cache_hits, 1);
                        s.table.mark_hot(i);
                        return Ok(Filled::Data);
                    }
                    let prefetched = match s.trend(i) {
                        Some((stride, window)) => {
                            let got = s.fetch_with_prefetch(fault, i, stride, window, dst);
                            // And the window after, without waiting: the next fault collects it.
                            if let Some(end) = i.checked_add_signed(stride.saturating_mul(window as i64)) {
                                s.request_ahead(end, stride, window);
                            }
                            got
                        }
                        None => false,
                    };
                    s.finish_fetch(i, write, prefetched, dst)
                }
                LOST => {
                    s.table.set(i, LOST);
                    Err(FillError(format!("page {i} was lost earlier: no copy is left")))
                }
                // Resident in our books, yet it faulted: either a stale fault another thread
                // already served (the install will find the page present), or the application
                // discarded it (MADV_DONTNEED), which by Linux semantics reads as zeros. Either
                // way zeros are right; mark it dirty so its remote copy is replaced.
                _ => {
                    DECIDED.set((i, DIRTY, true));
                    Ok(Filled::Zero)
                }
            };
        }
    }

    fn installed(&self, index: u64, outcome: Outcome) {
        let s = &self.0;
        let (i, state, counted) = DECIDED.get();
        if i != index || s.table.get(index) != FETCHING {
            return; // not a decision of ours (cannot happen: fill and installed pair up)
        }
        match outcome {
            Outcome::Installed | Outcome::AlreadyPresent => {
                s.table.set(index, state);
                if state != DIRTY {
                    s.note_protected_install(1);
                }
                if !counted && outcome == Outcome::Installed {
                    s.admit(&[index]);
                }
            }
            Outcome::Lost => s.table.set(index, LOST),
        }
    }

    fn written(&self, fault: &Fault<'_>) -> WriteDecision {
        let (s, index) = (&self.0, fault.index);
        loop {
            match s.table.get(index) {
                // Made writable here, while the page is FETCHING (busy), and only then DIRTY: the
                // evictor saves a dirty page by write-protecting it and copying it, so an
                // unprotect landing after it had taken the page (the pager's own, after we
                // return) would let a write slip past the saved copy, and be lost.
                st @ (CLEAN | CLEAN_ABSENT | DIRTY) => {
                    if s.table.cas(index, st, FETCHING) {
                        if let Err(e) = fault.unprotect() {
                            log::error!("region {}: page {index}: {e}", s.name);
                        }
                        s.table.set(index, DIRTY);
                        if st != DIRTY {
                            s.upgrades.fetch_add(1, Ordering::Relaxed);
                        }
                        return WriteDecision::Proceed;
                    }
                }
                // Being saved and dropped: wait (a worker asks again later, see `fill`); the
                // write then faults the page back in.
                EVICTING | FETCHING if fault.can_defer && fault.waited <= SETTLE_LIMIT => return WriteDecision::Busy,
                EVICTING | FETCHING if fault.can_defer => return WriteDecision::Retry,
                EVICTING | FETCHING => {
                    if s.table.settle(index, SETTLE_LIMIT).is_none() {
                        return WriteDecision::Retry;
                    }
                }
                // No longer resident (evicted, or lost): the retried write faults it back in.
                _ => return WriteDecision::Retry,
            }
        }
    }
}

impl Shared {
    fn new(
        cfg: &NetRamConfig,
        servers: ServerSet,
        table: PageTable,
        budget: u64,
        file: Option<std::fs::File>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            name: cfg.name.clone(),
            prefetch: crate::prefetch::Prefetcher::default(),
            prefetch_on: AtomicBool::new(cfg.prefetch),
            protected_installs: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            table,
            servers,
            resident: AtomicU64::new(0),
            budget: AtomicU64::new(budget),
            own_budget: AtomicU64::new(budget),
            share: cfg.shared_budget.as_ref().and_then(|b| {
                let share = b.join();
                if share.is_none() {
                    log::warn!("region {}: the shared budget has no free slot; keeping to its own budget", cfg.name);
                }
                share
            }),
            file,
            victims: VictimCache::new(if cfg.victim_cache { budget / 4 } else { 0 }),
            queue: Mutex::new(VecDeque::new()),
            copying: AtomicU64::new(u64::MAX),
            copy_discarded: AtomicBool::new(false),
            evict_wanted: (Mutex::new(false), Condvar::new()),
            evicting: Mutex::new(()),
            fork_gate: ForkGate::default(),
            evict_stalled: AtomicBool::new(false),
            footprint: Footprint::new(cfg.count_process_memory),
            rebuild_wanted: AtomicBool::new(false),
            ahead: Mutex::new(None),
            stats: Counters::default(),
        })
    }

    /// Copies page `i`, which the evictor owns (EVICTING), announcing it in `copying`.
    ///
    /// # Safety
    /// As [`copy_of`].
    /// Returns the copy, and whether the application had discarded the page (the copy is zeros).
    unsafe fn copy_page(&self, core: &RegionCore, i: u64) -> (Copy, bool) {
        self.copy_discarded.store(false, Ordering::Release);
        self.copying.store(i, Ordering::Release);
        // SAFETY: forwarded from the caller.
        let c = unsafe { copy_of(core, i) };
        self.copying.store(u64::MAX, Ordering::Release);
        (c, self.copy_discarded.swap(false, Ordering::AcqRel))
    }

    /// Publishes what the region holds in the shared budget, if any, and takes its share as
    /// the budget; every second, clears the slots of processes that died.
    fn follow_shared_budget(&self, next_sweep: &mut Instant) {
        let Some(share) = &self.share else { return };
        let held = self.resident.load(Ordering::Acquire) + self.victims.len();
        let allowed = share.update(held).min(self.own_budget.load(Ordering::Relaxed));
        self.budget.store(allowed, Ordering::Relaxed);
        if Instant::now() >= *next_sweep {
            share.sweep();
            *next_sweep = Instant::now() + Duration::from_secs(1);
        }
    }

    /// Pages the region may have resident at most: the budget minus what the victim cache
    /// takes now (its copies are local RAM too), or minus everything the process holds
    /// outside the region where that is counted and more. Faults wait for the evictor there.
    fn ceiling(&self) -> u64 {
        let budget = self.budget.load(Ordering::Relaxed);
        // Each copy is a separate allocation: with the allocator's headers and slack the cache
        // takes about 9% more than its pages (measured: 4468 KiB for 1024 copies). The
        // measured footprint outside the region includes the cache as it really is, but is up
        // to a round old: the larger of the two counts. Buffers in flight count too: a
        // prefetch window on its way and the next one, and a round of eviction's copies, made
        // while its pages are still resident.
        let cached = self.victims.len();
        let outside = (cached + cached / 8).max(self.footprint.outside());
        // The region keeps at least a quarter of the budget (half, when only the cache is
        // counted) to work in.
        let most = if self.footprint.counting() { budget - budget / 4 } else { budget / 2 };
        budget - (outside + IN_FLIGHT_PAGES).min(most)
    }

    /// Pages the evictor keeps the region at: the ceiling minus the slack it works in
    /// (asynchronously, a round at a time), so that faults seldom reach the ceiling. A working
    /// set that fits is never evicted (the cache stays empty); one that does not settles at
    /// about three quarters resident, a quarter cached.
    fn active_budget(&self) -> u64 {
        let ceiling = self.ceiling();
        ceiling - (ceiling / 32).max(2 * EVICT_BATCH as u64).min(ceiling / 4)
    }

    /// Whether the resident set is at its ceiling while the evictor can still make room.
    fn over_hard_limit(&self) -> bool {
        self.resident.load(Ordering::Acquire) >= self.ceiling() && !self.evict_stalled.load(Ordering::Acquire)
    }

    /// Back-pressure: a fault that would take the resident set past its ceiling waits for the
    /// evictor, however long that takes, so a fast faulting thread cannot outrun eviction and
    /// overshoot the budget. The one way past is the evictor saying it cannot make room at
    /// all (`evict_stalled`: every server full or gone, nothing evictable), where waiting would
    /// hang the program. Returns true if the fault should be deferred instead (a worker asks
    /// again later); a fault on the faulting thread waits here.
    fn throttle(&self, fault: &Fault<'_>) -> bool {
        if !self.over_hard_limit() {
            return false;
        }
        if fault.waited.is_zero() {
            bump(&self.stats.throttled, 1);
        }
        if fault.can_defer {
            return true;
        }
        self.wait_for_room();
        false
    }

    /// The stride and window of the fault stream page `i` continues, if prefetch is on and it
    /// continues one.
    fn trend(&self, i: u64) -> Option<(i64, u64)> {
        if self.prefetch_on.load(Ordering::Relaxed) {
            self.prefetch.on_fault(i)
        } else {
            None
        }
    }

    /// Waits until the resident set is below its ceiling or the evictor stalls. Polls with
    /// short sleeps and takes no lock but the evictor's wake-up (renewed every millisecond).
    fn wait_for_room(&self) {
        let mut polls = 0u32;
        while self.over_hard_limit() {
            if polls % 20 == 0 {
                self.wake_evictor();
            }
            polls = polls.wrapping_add(1);
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Whether a read fault installs its page writable (and dirty) at once: in a
    /// read-modify-write stream a read fault is followed by a write-protect fault on the same
    /// page, and when most are, installing writable spares the second fault.
    fn decide_write(&self, fault: &Fault<'_>) -> bool {
        let write = fault.write || self.writes_likely();
        if write && !fault.write {
            fault.install_writable();
        }
        write
    }

    /// The end of a fault on a remote page `i` (FETCHING, ours): `dst` holds it if `arrived`,
    /// else it is fetched alone, with failover; a page no server can return is lost.
    fn finish_fetch(&self, i: u64, write: bool, arrived: bool, dst: &mut Page) -> Result<Filled, FillError> {
        match if arrived { Ok(()) } else { self.fetch(i, dst) } {
            Ok(()) => {
                DECIDED.set((i, if write { DIRTY } else { CLEAN }, false));
                bump(&self.stats.fetched, 1);
                Ok(Filled::Data)
            }
            Err(why) => {
                self.table.set(i, LOST);
                bump(&self.stats.lost, 1);
                Err(FillError(why))
            }
        }
    }

    /// [`PageTable::settle`] for a fault or a discard that can wait, except that a page of the
    /// window requested ahead is not waited for (nobody else might collect it): the window is
    /// taken and handed to the caller instead.
    fn settle_or_take_ahead(&self, i: u64) -> Settled {
        // The clock is read only once the page turns out busy.
        let mut hung_at = None;
        loop {
            if let Some(st) = self.table.settle(i, Duration::from_millis(1)) {
                return Settled::State(st);
            }
            let deadline = *hung_at.get_or_insert_with(|| Instant::now() + SETTLE_LIMIT);
            if let Some(a) = self.take_ahead_holding(i) {
                return Settled::Ahead(a);
            }
            if Instant::now() >= deadline {
                return Settled::Hung;
            }
        }
    }

    /// Whether most pages installed write-protected were written soon after (a read-modify-write
    /// stream), over a window of the last few thousand installs.
    fn writes_likely(&self) -> bool {
        let reads = self.protected_installs.load(Ordering::Relaxed);
        let writes = self.upgrades.load(Ordering::Relaxed);
        reads >= 64 && writes * 4 > reads * 3
    }

    /// Counts pages installed write-protected; ages both counters so the prediction follows
    /// the workload.
    fn note_protected_install(&self, n: u64) {
        if self.protected_installs.fetch_add(n, Ordering::Relaxed) + n > 4096 {
            self.protected_installs.store(2048, Ordering::Relaxed);
            let w = self.upgrades.load(Ordering::Relaxed);
            self.upgrades.store(w / 2, Ordering::Relaxed);
        }
    }

    /// Counts newly installed pages as resident and hands them to the evictor (counted first,
    /// so the evictor never takes away more than was counted).
    fn admit(&self, pages: &[u64]) {
        let n = pages.len() as u64;
        let resident = self.resident.fetch_add(n, Ordering::AcqRel) + n;
        crate::lock(&self.queue).extend(pages.iter().copied());
        if resident > self.active_budget() {
            self.wake_evictor();
        }
    }

    fn fetch(&self, i: u64, dst: &mut Page) -> Result<(), String> {
        let holders = self.table.holders(i);
        if holders == 0 {
            return Err(format!("page {i} has no copy on any server"));
        }
        let on_servers = holders & !FILE_HOLDER;
        let why = if on_servers == 0 {
            String::from("no server holds it")
        } else {
            match self.servers.fetch(i, on_servers, dst) {
                Ok(()) => {
                    if on_servers & !self.servers.live_mask() != 0 {
                        bump(&self.stats.failovers, 1);
                    }
                    return Ok(());
                }
                Err((failed, why)) => {
                    self.table.drop_holders(i, failed);
                    why
                }
            }
        };
        if holders & FILE_HOLDER != 0 {
            if let Some(f) = &self.file {
                use std::os::unix::fs::FileExt;
                match f.read_exact_at(&mut dst.0, i * PAGE_SIZE as u64) {
                    Ok(()) => {
                        bump(&self.stats.failovers, u64::from(on_servers != 0));
                        return Ok(());
                    }
                    Err(e) => {
                        return Err(format!(
                            "no server could return page {i} ({why}), and the backing file failed: {e}"
                        ))
                    }
                }
            }
        }
        Err(format!("no server could return page {i}: {why}"))
    }

    /// Writes the pages to the backing file, if there is one; returns which were written.
    fn write_file(&self, pages: &[(u64, &[u8; PAGE_SIZE])]) -> Vec<bool> {
        use std::os::unix::fs::FileExt;
        match &self.file {
            None => vec![false; pages.len()],
            Some(f) => pages
                .iter()
                .map(|(i, data)| match f.write_all_at(&data[..], i * PAGE_SIZE as u64) {
                    Ok(()) => true,
                    Err(e) => {
                        log::error!("region {}: writing page {i} to the backing file failed: {e}", self.name);
                        false
                    }
                })
                .collect(),
        }
    }

    fn wake_evictor(&self) {
        let (m, c) = &self.evict_wanted;
        *crate::lock(m) = true;
        c.notify_one();
    }

    /// Evicts until the resident set is within the budget (or nothing more can go).
    fn evict(&self, core: &RegionCore, stop: &AtomicBool) {
        // Read every round: a budget raised meanwhile stops the eviction at once (it used to run
        // on to the old mark, taking pages just brought back).
        let low = || {
            let budget = self.active_budget();
            budget - budget / 32
        };
        let mut stuck_rounds = 0;
        let stuck_limit = || 3 + crate::lock(&self.queue).len() / EVICT_BATCH;
        while self.resident.load(Ordering::Acquire) > low()
            && !stop.load(Ordering::Acquire)
            && stuck_rounds < stuck_limit()
        {
            self.footprint.measure(self.resident.load(Ordering::Acquire));
            let gone = {
                let _gate = self.fork_gate.enter();
                let _round = crate::lock(&self.evicting);
                self.evict_round(core, Round::All)
            };
            match gone {
                None => {
                    self.evict_stalled.store(true, Ordering::Release);
                    return;
                }
                // Rounds that only gave hot pages their second pass are not stuck: after one
                // pass over the queue every mark is spent.
                Some(0) => stuck_rounds += 1,
                Some(_) => {
                    stuck_rounds = 0;
                    self.evict_stalled.store(false, Ordering::Release);
                }
            }
        }
        if stuck_rounds >= stuck_limit() {
            self.evict_stalled.store(true, Ordering::Release);
        }
    }

    /// Makes room for `incoming` pages on a thread that would otherwise only wait (a fault
    /// collecting a prefetch window still on its way): up to two rounds of eviction of clean
    /// pages ([`Round::CleanOnly`]), if the resident set would go over its budget and no other
    /// round is running. On a machine whose
    /// cores are all busy (the program's threads, or here the servers) this turns the wait into
    /// the evictor's work instead of taking a core from someone else for it.
    fn help_evict(&self, core: &RegionCore, incoming: u64) {
        for _ in 0..2 {
            if self.resident.load(Ordering::Acquire) + incoming <= self.active_budget() {
                return;
            }
            let _gate = self.fork_gate.enter();
            let Ok(_round) = self.evicting.try_lock() else { return };
            match self.evict_round(core, Round::CleanOnly) {
                Some(gone) if gone > 0 => bump(&self.stats.evicted_by_faults, gone),
                _ => return,
            }
        }
    }

    /// One round of eviction: up to [`EVICT_BATCH`] pages from the queue (those `kind` may not
    /// take go back to it); returns how many left local RAM (`None`: the queue was empty). The
    /// caller holds `evicting`.
    fn evict_round(&self, core: &RegionCore, kind: Round) -> Option<u64> {
        let batch: Vec<u64> = {
            let mut q = crate::lock(&self.queue);
            let n = q.len().min(EVICT_BATCH);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            return None;
        }
        // Steps of the round; `evict_batch` rechecks every page's state, so a page that
        // changed between this look and its step is still handled right.
        let (dirty, clean): (Vec<u64>, Vec<u64>) = batch.iter().partition(|&&i| self.table.get(i) == DIRTY);
        let dirty: &[u64] = if kind == Round::All {
            &dirty
        } else {
            crate::lock(&self.queue).extend(dirty.iter().copied());
            &[]
        };
        let mut gone = 0;
        for step in std::iter::once(&clean[..]).filter(|c| !c.is_empty()).chain(dirty.chunks(WRITE_BACK_STEP)) {
            gone += self.evict_batch(core, step, kind);
        }
        Some(gone)
    }

    /// Evicts what it can of `batch` (what `kind` allows); returns how many pages left local RAM.
    fn evict_batch(&self, core: &RegionCore, batch: &[u64], kind: Round) -> u64 {
        let mut victims: Vec<(u64, u8)> = Vec::with_capacity(batch.len());
        let mut second_chance = Vec::new();
        // Where a copy can be read back from. A clean page is dropped only if it has a copy
        // there; a server whose process died is noticed here (two polls per server, no request),
        // before its copies are relied on.
        let any_clean = batch.iter().any(|&i| self.table.get(i) == CLEAN);
        let readable = if any_clean { self.servers.notice_hang_ups() } else { self.servers.live_mask() } | FILE_HOLDER;
        for &i in batch {
            if self.table.take_hot(i) {
                second_chance.push(i);
                continue;
            }
            let st = self.table.get(i);
            let orphan = st == CLEAN && self.table.holders(i) & readable == 0;
            if (st == DIRTY || orphan) && kind == Round::CleanOnly {
                second_chance.push(i); // needs saving (written since the round looked, or no copy left): the evictor's
            } else if matches!(st, CLEAN | CLEAN_ABSENT | DIRTY) && self.table.cas(i, st, EVICTING) {
                // A clean page whose copies are all gone (dead servers, a lost session) is saved
                // like a dirty one (freezing it again is harmless: it is write-protected).
                if orphan {
                    bump(&self.stats.saved_clean, 1);
                }
                victims.push((i, if orphan { DIRTY } else { st }));
            } else if !matches!(st, REMOTE | ABSENT | LOST) {
                // Busy (a write upgrading it, a rebuild storing it) or changed under us: still
                // resident, so it stays a candidate. A duplicate entry is harmless.
                second_chance.push(i);
            }
        }
        crate::lock(&self.queue).extend(second_chance);
        victims.sort_unstable();
        // Freeze the dirty pages (one ioctl per contiguous run): from here their writers wait
        // in `written`, so the copies taken below are final. A run that cannot be frozen is not
        // evicted: its pages stay resident and dirty (a copy taken unfrozen could miss a write).
        let mut dirty: Vec<u64> = victims.iter().filter(|v| v.1 == DIRTY).map(|v| v.0).collect();
        let mut unfrozen = Vec::new();
        for r in runs(&dirty) {
            if let Err(e) = core.write_protect(r.start, r.end - r.start, true) {
                log::warn!("region {}: cannot write-protect pages {r:?}, keeping them: {e}", self.name);
                unfrozen.extend(r);
            }
        }
        if !unfrozen.is_empty() {
            victims.retain(|v| !unfrozen.contains(&v.0));
            dirty.retain(|i| !unfrozen.contains(i));
            for &i in &unfrozen {
                self.table.set(i, DIRTY);
            }
            crate::lock(&self.queue).extend(unfrozen.iter().copied());
        }
        // SAFETY: each page is inside the live region (the evictor stops before the region is
        // unmapped), resident and write-protected, so nobody writes it while we copy.
        // (A discarded dirty page is saved as the zeros it now holds.)
        let saved: Vec<Copy> = dirty.iter().map(|&i| unsafe { self.copy_page(core, i) }.0).collect();
        let refs: Vec<(u64, &[u8; PAGE_SIZE])> = dirty.iter().zip(&saved).map(|(i, p)| (*i, &**p)).collect();
        let masks = self.servers.put(&refs);
        let in_file = self.write_file(&refs);
        let stored: std::collections::HashMap<u64, u32> = dirty
            .iter()
            .copied()
            .zip(masks.into_iter().zip(in_file).map(|(m, f)| if f { m | FILE_HOLDER } else { m }))
            .collect();
        let mut copies: std::collections::HashMap<u64, Copy> = dirty.iter().copied().zip(saved).collect();
        // Decide where each victim goes; pages with nowhere to go stay resident and dirty.
        let mut leaving: Vec<(u64, u8)> = Vec::with_capacity(victims.len());
        // Copies left on servers a page no longer uses (its placement changed), freed in one
        // request per server set below.
        let mut stale: std::collections::HashMap<u32, Vec<u64>> = std::collections::HashMap::new();
        let mut kept = Vec::new();
        for &(i, st) in &victims {
            let next = match st {
                DIRTY => match stored.get(&i).copied().unwrap_or(0) {
                    0 => {
                        kept.push(i);
                        continue;
                    }
                    mask => {
                        let old = self.table.holders(i) & !mask & !FILE_HOLDER;
                        if old != 0 {
                            stale.entry(old).or_default().push(i);
                        }
                        self.table.set_holders(i, mask);
                        bump(&self.stats.written_back, 1);
                        if ((mask & !FILE_HOLDER).count_ones() as usize) < self.servers.copies()
                            && mask & FILE_HOLDER == 0
                        {
                            self.rebuild_wanted.store(true, Ordering::Release);
                        }
                        REMOTE
                    }
                },
                CLEAN => REMOTE,
                _ => ABSENT,
            };
            leaving.push((i, next));
        }
        self.servers.free_stale(stale);
        for r in runs(&kept) {
            let _ = core.write_protect(r.start, r.end - r.start, false);
        }
        for &i in &kept {
            self.table.set(i, DIRTY);
        }
        crate::lock(&self.queue).extend(kept.iter().copied());
        // Keep copies of what leaves for the servers in the victim cache (clean pages are
        // write-protected, so their copy is stable), then drop, one madvise per contiguous run.
        let caching = self.victims.capacity > 0 && kind == Round::All;
        let mut cached = Vec::new();
        let mut discarded = Vec::new();
        if caching {
            for &(i, next) in &leaving {
                if next != REMOTE {
                    continue;
                }
                let copy = match copies.remove(&i) {
                    Some(c) => c,
                    // SAFETY: as above: inside the live region, resident, write-protected (clean).
                    None => match unsafe { self.copy_page(core, i) } {
                        (c, false) => c,
                        // The application discarded this clean page: its content is zeros now,
                        // not the servers' copy. Keep it resident and dirty: saved next time.
                        (_, true) => {
                            discarded.push(i);
                            continue;
                        }
                    },
                };
                cached.push((i, copy));
            }
        }
        if !discarded.is_empty() {
            leaving.retain(|(i, _)| !discarded.contains(i));
            for &i in &discarded {
                self.table.set(i, DIRTY);
            }
            crate::lock(&self.queue).extend(discarded.iter().copied());
        }
        let pages: Vec<u64> = leaving.iter().map(|l| l.0).collect();
        let mut failed = std::collections::HashSet::new();
        for r in runs(&pages) {
            if let Err(e) = core.drop_pages(r.start, r.end - r.start) {
                log::warn!("region {}: cannot drop pages {r:?}: {e}", self.name);
                failed.extend(r);
            }
        }
        self.victims.insert_all(cached.into_iter().filter(|(i, _)| !failed.contains(i)));
        let mut gone = 0;
        for (i, next) in leaving {
            if failed.contains(&i) {
                self.table.set(i, if next == REMOTE { CLEAN } else { CLEAN_ABSENT });
                crate::lock(&self.queue).push_back(i);
            } else {
                self.table.set(i, next);
                gone += 1;
            }
        }
        self.resident.fetch_sub(gone, Ordering::AcqRel);
        bump(&self.stats.evicted, gone);
        gone
    }

    /// Re-creates missing copies: of pages on dead servers or on a server that lost the session,
    /// and of pages stored short (servers were full). Remote pages are fetched from a surviving
    /// copy; resident clean pages are copied from local memory (so a page whose every remote copy
    /// is gone, but which is still here, is saved); resident dirty pages get their copies when
    /// they are evicted.
    fn rebuild(&self, core: &RegionCore, stop: &AtomicBool) {
        // Pages requested ahead are remote again, so they are rebuilt too.
        self.give_up_ahead();
        let live = self.servers.live_mask();
        let want = self.servers.copies();
        let mut short = false;
        let (mut remote, mut resident) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < self.table.len() {
            if stop.load(Ordering::Acquire) {
                return;
            }
            remote.clear();
            resident.clear();
            while i < self.table.len() && remote.len() + resident.len() < REBUILD_BATCH {
                let all = self.table.holders(i);
                let (file, holders) = (all & FILE_HOLDER, all & !FILE_HOLDER);
                // Enough: as many live copies as wanted, or as the live servers allow, or one
                // plus the backing file. Dead holders are cleared in any case.
                let have = (holders & live).count_ones() as usize;
                let enough = have >= want.min(live.count_ones() as usize).max(1) || file != 0 && have > 0;
                if all != 0 && (holders & !live != 0 || !enough) {
                    if self.table.cas(i, REMOTE, FETCHING) {
                        // Read again now that the page is ours: it may have been written and
                        // evicted elsewhere between the look above and the claim.
                        let all = self.table.holders(i);
                        self.table.set_holders(i, all & (live | FILE_HOLDER));
                        remote.push(i);
                    } else if self.table.get(i) == CLEAN {
                        resident.push(i);
                    }
                }
                i += 1;
            }
            short |= self.rebuild_batch(core, &remote, &resident, want);
        }
        // Try again later only where enough servers have room (full ones may free some).
        if short && self.servers.with_room() >= want {
            self.rebuild_wanted.store(true, Ordering::Release);
        }
    }

    /// Re-stores a batch: `remote` pages (FETCHING, ours) are read in one request per server
    /// (with failover one by one for what fails), `resident` clean pages are copied from local
    /// memory and held EVICTING (their writers wait) until their copies are stored; then all go
    /// out in one PUT per server. Returns whether some page is still short of copies.
    fn rebuild_batch(&self, core: &RegionCore, remote: &[u64], resident: &[u64], want: usize) -> bool {
        let _gate = self.fork_gate.enter();
        let live = self.servers.live_mask();
        let mut fetched = Page::vec(remote.len());
        let reqs: Vec<(u64, u32)> = remote.iter().map(|&i| (i, self.table.holders(i) & !FILE_HOLDER)).collect();
        let arrived = {
            let mut dsts: Vec<&mut Page> = fetched.iter_mut().collect();
            self.servers.fetch_many(&reqs, &mut dsts)
        };
        let mut data: Vec<(u64, &[u8; PAGE_SIZE])> = Vec::with_capacity(remote.len() + resident.len());
        // Pages no server could return, but of which the victim cache still has a copy.
        let mut cached: Vec<(u64, Copy)> = Vec::new();
        for ((&i, page), ok) in remote.iter().zip(fetched.iter_mut()).zip(arrived) {
            if ok || self.fetch(i, page).is_ok() {
                data.push((i, &page.0));
            } else if let Some(copy) = self.victims.take(i) {
                cached.push((i, copy));
            }
            // Else no copy is left: a fault decides LOST later, with the page named.
        }
        let mut copies: Vec<(u64, Copy)> = Vec::with_capacity(resident.len());
        for &i in resident {
            // Copied under the eviction lock (rounds name one page in `copying`), held
            // EVICTING until stored so no write slips in between the copy and its new holders.
            let _round = crate::lock(&self.evicting);
            if !self.table.cas(i, CLEAN, EVICTING) {
                continue; // it changed meanwhile: dirty pages are saved at eviction
            }
            let all = self.table.holders(i);
            self.table.set_holders(i, all & (live | FILE_HOLDER));
            // SAFETY: inside the live region (the keeper stops before it is unmapped), resident
            // and clean, so write-protected: nobody writes it while we copy.
            match unsafe { self.copy_page(core, i) } {
                (_, true) => self.table.set(i, DIRTY), // zeros now: saved at its eviction
                (copy, false) => copies.push((i, copy)),
            }
        }
        data.extend(copies.iter().map(|(i, c)| (*i, &**c)));
        data.extend(cached.iter().map(|(i, c)| (*i, &**c)));
        let masks = self.servers.put(&data);
        let mut short = false;
        for ((i, _), mask) in data.iter().zip(masks) {
            if mask != 0 {
                bump(&self.stats.rebuilt, 1);
            }
            let now = mask | self.table.holders(*i);
            self.table.set_holders(*i, now);
            short |= ((now & self.servers.live_mask()).count_ones() as usize) < want;
        }
        for &i in remote {
            self.table.set(i, REMOTE);
        }
        for (i, _) in &copies {
            self.table.set(*i, CLEAN);
        }
        self.victims.insert_all(cached);
        short
    }

    /// Pages with a copy somewhere but fewer live server copies than wanted (and no backing file).
    fn under_replicated(&self) -> u64 {
        let live = self.servers.live_mask();
        let want = self.servers.copies();
        (0..self.table.len())
            .filter(|&i| {
                let h = self.table.holders(i);
                h != 0 && h & FILE_HOLDER == 0 && ((h & live).count_ones() as usize) < want
            })
            .count() as u64
    }
}

/// A copy of a page's contents. Not page-aligned on purpose: an aligned 4 KiB allocation costs
/// glibc up to twice its size, and thousands of these are live at once.
type Copy = Box<[u8; PAGE_SIZE]>;

/// Copies page `i` of the region.
///
/// # Safety
/// Page `i` must be inside the live region and must not be written during the copy (resident
/// and write-protected).
unsafe fn copy_of(core: &RegionCore, i: u64) -> Copy {
    let mut c: Copy =
        vec![0u8; PAGE_SIZE].into_boxed_slice().try_into().unwrap_or_else(|_| unreachable!("PAGE_SIZE bytes"));
    // SAFETY: the caller guarantees the page is mapped, inside the region and stable.
    let src = unsafe { std::slice::from_raw_parts(core.as_ptr().add(offset(i)), PAGE_SIZE) };
    c.copy_from_slice(src);
    c
}

/// The pager's page buffer as a transport page (the same 4 KiB, page-aligned).
fn page_of(page: &mut PageBuf) -> Result<&mut Page, FillError> {
    Page::slice_from_bytes_mut(&mut page.0)
        .and_then(|p| p.first_mut())
        .ok_or_else(|| FillError("misaligned page".into()))
}

/// Copies of recently evicted pages, oldest first out.
struct VictimCache {
    map: Mutex<VictimMap>,
    /// Pages held, readable without the lock: the fault path asks it on every fault.
    len: AtomicU64,
    capacity: u64,
}

impl VictimCache {
    fn new(capacity: u64) -> VictimCache {
        VictimCache { map: Mutex::new(VictimMap::new(capacity)), len: AtomicU64::new(0), capacity }
    }

    fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    fn insert_all(&self, copies: impl IntoIterator<Item = (u64, Copy)>) {
        if self.capacity == 0 {
            return;
        }
        let mut m = crate::lock(&self.map);
        for (page, copy) in copies {
            m.insert(page, copy);
        }
        self.len.store(m.pages.len() as u64, Ordering::Relaxed);
    }

    /// Drops the copies of `pages` (stale once the pages are back), under one lock.
    fn discard(&self, pages: &[u64]) {
        if self.len() == 0 || pages.is_empty() {
            return;
        }
        let mut m = crate::lock(&self.map);
        for p in pages {
            m.pages.remove(p);
        }
        self.len.store(m.pages.len() as u64, Ordering::Relaxed);
    }

    /// The copy of `page`, taken out of the cache. Takes no lock while the cache is empty.
    fn take(&self, page: u64) -> Option<Copy> {
        if self.len() == 0 {
            return None;
        }
        let mut m = crate::lock(&self.map);
        let copy = m.pages.remove(&page).map(|(_, copy)| copy);
        self.len.store(m.pages.len() as u64, Ordering::Relaxed);
        copy
    }
}

/// The cache's bookkeeping, under its lock.
struct VictimMap {
    /// Page -> (insertion number, copy).
    pages: std::collections::HashMap<u64, (u64, Copy)>,
    /// (page, insertion number), oldest first; entries whose number no longer matches are stale.
    order: VecDeque<(u64, u64)>,
    inserted: u64,
    capacity: usize,
}

impl VictimMap {
    fn new(capacity: u64) -> VictimMap {
        VictimMap {
            pages: std::collections::HashMap::new(),
            order: VecDeque::new(),
            inserted: 0,
            capacity: usize::try_from(capacity).unwrap_or(0),
        }
    }

    fn insert(&mut self, page: u64, copy: Copy) {
        self.inserted += 1;
        self.pages.insert(page, (self.inserted, copy));
        self.order.push_back((page, self.inserted));
        while self.pages.len() > self.capacity {
            let Some((old, n)) = self.order.pop_front() else { break };
            if self.pages.get(&old).is_some_and(|(m, _)| *m == n) {
                self.pages.remove(&old);
            }
        }
        // Stale names of pages taken back pile up only until the next sweep.
        if self.order.len() > 4 * self.capacity.max(16) {
            let pages = &self.pages;
            self.order.retain(|(p, n)| pages.get(p).is_some_and(|(m, _)| m == n));
        }
    }
}

/// The sorted `pages` as contiguous ranges.
fn runs(pages: &[u64]) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(r) if r.end == p => r.end += 1,
            _ => out.push(p..p + 1),
        }
    }
    out
}

/// Byte offset of page `i` (below the region's length, which is a `usize`).
#[allow(clippy::cast_possible_truncation)]
fn offset(i: u64) -> usize {
    i as usize * PAGE_SIZE
}

/// A region of network RAM. Dereferences to the underlying [`RegionCore`] (address, size,
/// pager statistics).
pub struct NetRam {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    region: Option<Region>,
    /// What it was created with (a forked child's region is made with the same).
    cfg: NetRamConfig,
}

impl std::fmt::Debug for NetRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetRam").field("name", &self.shared.name).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl NetRam {
    /// Connects to the servers and maps the region.
    pub fn new(cfg: NetRamConfig) -> Result<NetRam, NetRamError> {
        let pages = cfg.size.div_ceil(PAGE_SIZE as u64);
        if pages == 0 {
            return Err(NetRamError::Config("a region needs a size of at least one byte".into()));
        }
        let budget = cfg.resident_budget / PAGE_SIZE as u64;
        if budget < MIN_BUDGET_PAGES {
            return Err(NetRamError::Config(format!(
                "a resident budget of {} bytes is below the minimum of {} pages ({} KiB)",
                cfg.resident_budget,
                MIN_BUDGET_PAGES,
                MIN_BUDGET_PAGES * PAGE_SIZE as u64 / 1024
            )));
        }
        let mut id = [0u8; 24 + crate::proto::SECRET_LEN];
        getrandom::fill(&mut id)
            .map_err(|e| NetRamError::Config(format!("no random source for the client id: {e}")))?;
        let client: [u8; 16] = id[..16].try_into().unwrap_or_default();
        let region_id = u64::from_le_bytes(id[16..24].try_into().unwrap_or_default());
        let secret = id[24..].try_into().unwrap_or_default();
        let servers =
            ServerSet::connect(&cfg.servers, &cfg.key, client, secret, region_id, cfg.copies, cfg.grace, cfg.timeout)?;
        let file = match &cfg.backing_file {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .and_then(|f| f.set_len(pages * PAGE_SIZE as u64).map(|()| f))
                    .map_err(|e| NetRamError::Config(format!("backing file {}: {e}", path.display())))?;
                Some(f)
            }
            None => None,
        };
        let shared = Shared::new(&cfg, servers, PageTable::new(pages), budget, file);
        NetRam::start(cfg, shared, None)
    }

    /// Maps the region (or adopts the mapping at `adopt`, in a forked child) with `shared` as
    /// its page source and starts the background threads.
    fn start(cfg: NetRamConfig, shared: Arc<Shared>, adopt: Option<usize>) -> Result<NetRam, NetRamError> {
        let mut rcfg = RegionConfig::new(shared.table.len())
            .mode(cfg.fault_mode)
            .dirty(DirtyTracking::Faults)
            .report_discards(false)
            .name(cfg.name.clone());
        if let Some(addr) = adopt {
            rcfg = rcfg.adopt(addr);
        }
        let region = Region::new(rcfg, Source(shared.clone())).map_err(NetRamError::Pager)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut ram = NetRam { shared, threads: Vec::new(), stop, region: Some(region), cfg };
        ram.spawn_background()?;
        Ok(ram)
    }

    fn spawn_background(&mut self) -> Result<(), NetRamError> {
        let core = self.region.as_ref().map(|r| r.core()).ok_or_else(|| NetRamError::Config("no region".into()))?;
        let keeper_core = core.clone();
        let (shared, stop) = (self.shared.clone(), self.stop.clone());
        let evictor = std::thread::Builder::new().name("mosaic-evict".into()).spawn(move || {
            let mut next_sweep = Instant::now();
            while !stop.load(Ordering::Acquire) {
                shared.follow_shared_budget(&mut next_sweep);
                shared.footprint.measure(shared.resident.load(Ordering::Acquire));
                {
                    let (m, c) = &shared.evict_wanted;
                    let mut wanted = crate::lock(m);
                    if !*wanted {
                        wanted = c
                            .wait_timeout(wanted, Duration::from_millis(20))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                    *wanted = false;
                }
                if shared.resident.load(Ordering::Acquire) > shared.active_budget() {
                    shared.evict(&core, &stop);
                }
            }
        });
        self.threads.push(evictor.map_err(|e| NetRamError::Config(format!("cannot start the evictor: {e}")))?);
        let (shared, stop) = (self.shared.clone(), self.stop.clone());
        let keeper = std::thread::Builder::new().name("mosaic-keeper".into()).spawn(move || {
            let mut last_live = shared.servers.live_mask();
            let mut next_check = Instant::now() + SESSION_CHECK;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
                let mut rebuild = false;
                if Instant::now() >= next_check {
                    let _gate = shared.fork_gate.enter();
                    // Copies stored short are added at most this often.
                    rebuild = shared.rebuild_wanted.swap(false, Ordering::AcqRel);
                    for i in shared.servers.check_sessions() {
                        bump(&shared.stats.sessions_lost, 1);
                        // The copies it held are gone: forget them, re-register, rebuild. Forget
                        // first: once re-opened, the evictor may store new copies there, which a
                        // later forget would wrongly erase.
                        shared.table.forget_holder(1 << i);
                        shared.servers.reopen(i);
                        rebuild = true;
                    }
                    next_check = Instant::now() + SESSION_CHECK;
                }
                let live = shared.servers.live_mask();
                if live != last_live {
                    log::warn!("region {}: a memory server was lost; rebuilding the missing copies", shared.name);
                    rebuild = true;
                    last_live = live;
                }
                if rebuild {
                    shared.rebuild(&keeper_core, &stop);
                }
            }
        });
        self.threads.push(keeper.map_err(|e| NetRamError::Config(format!("cannot start the session keeper: {e}")))?);
        Ok(())
    }

    /// The first byte of the region.
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.as_ref().map_or(std::ptr::null_mut(), |r| r.as_ptr())
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.region.as_ref().map_or(0, |r| r.len())
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The counters.
    pub fn stats(&self) -> NetRamStats {
        let c = &self.shared.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetRamStats {
            fetched: l(&c.fetched),
            zero_filled: l(&c.zero_filled),
            prefetched: l(&c.prefetched),
            cache_hits: l(&c.cache_hits),
            evicted: l(&c.evicted),
            written_back: l(&c.written_back),
            failovers: l(&c.failovers),
            rebuilt: l(&c.rebuilt),
            lost: l(&c.lost),
            resident: self.shared.resident.load(Ordering::Relaxed),
            cached: self.shared.victims.len(),
            outside: self.shared.footprint.outside(),
            throttled: l(&c.throttled),
            evicted_by_faults: l(&c.evicted_by_faults),
            saved_clean: l(&c.saved_clean),
            under_replicated: self.shared.under_replicated(),
            sessions_lost: l(&c.sessions_lost),
        }
    }

    /// Where the pages are: for each server, its URI, whether it is alive, and how many of this
    /// region's pages it holds a copy of.
    pub fn placement(&self) -> Vec<(String, bool, u64)> {
        let t = &self.shared.table;
        let mut counts = vec![0u64; self.shared.servers.members.len()];
        for i in 0..t.len() {
            let h = t.holders(i);
            for (k, c) in counts.iter_mut().enumerate() {
                if h & (1 << k) != 0 {
                    *c += 1;
                }
            }
        }
        self.shared.servers.members.iter().zip(counts).map(|(m, c)| (m.uri.clone(), m.alive(), c)).collect()
    }

    /// Changes the resident budget (at least [`MIN_BUDGET_PAGES`] pages); a smaller budget is
    /// reached by evicting in the background.
    pub fn set_resident_budget(&self, bytes: u64) -> Result<(), NetRamError> {
        let pages = bytes / PAGE_SIZE as u64;
        if pages < MIN_BUDGET_PAGES {
            return Err(NetRamError::Config(format!("a resident budget must be at least {MIN_BUDGET_PAGES} pages")));
        }
        self.shared.own_budget.store(pages, Ordering::Relaxed);
        self.shared.budget.store(pages, Ordering::Relaxed);
        self.shared.wake_evictor();
        Ok(())
    }

    /// Forgets `count` pages from `first` (an allocator's free): afterwards they read as zeros;
    /// their local memory and their copies on the servers are released.
    pub fn discard(&self, first: u64, count: u64) -> Result<(), NetRamError> {
        let s = &self.shared;
        let end = first.checked_add(count).filter(|e| *e <= s.table.len()).ok_or_else(|| {
            NetRamError::Config(format!("pages {first}..+{count} are outside the region of {} pages", s.table.len()))
        })?;
        let region = self.region();
        let _gate = s.fork_gate.enter();
        let mut dropped = Vec::new();
        let mut remote: std::collections::HashMap<u32, Vec<u64>> = std::collections::HashMap::new();
        for i in first..end {
            loop {
                let st = match s.settle_or_take_ahead(i) {
                    Settled::State(st) => st,
                    Settled::Ahead(a) => {
                        s.give_up(a);
                        continue;
                    }
                    Settled::Hung => LOST,
                };
                if st == ABSENT {
                    break;
                }
                if !s.table.cas(i, st, EVICTING) {
                    continue;
                }
                let holders = s.table.holders(i);
                if holders & !FILE_HOLDER != 0 {
                    remote.entry(holders & !FILE_HOLDER).or_default().push(i);
                }
                s.table.set_holders(i, 0);
                if matches!(st, CLEAN | CLEAN_ABSENT | DIRTY | LOST) {
                    dropped.push((i, st != LOST));
                } else {
                    s.table.set(i, ABSENT);
                }
                s.victims.take(i);
                break;
            }
        }
        let pages: Vec<u64> = dropped.iter().map(|d| d.0).collect();
        for r in runs(&pages) {
            if let Err(e) = region.drop_pages(r.start, r.end - r.start) {
                log::warn!("region {}: discarding pages {r:?}: {e}", s.name);
            }
        }
        let resident = dropped.iter().filter(|d| d.1).count() as u64;
        for (i, _) in dropped {
            s.table.set(i, ABSENT);
        }
        s.resident.fetch_sub(resident, Ordering::AcqRel);
        s.servers.free_stale(remote);
        Ok(())
    }

    /// Turns prefetching on or off.
    pub fn set_prefetch(&self, on: bool) {
        self.shared.prefetch_on.store(on, Ordering::Relaxed);
    }

    /// The pager region underneath.
    pub fn region(&self) -> &RegionCore {
        self.region.as_deref().unwrap_or_else(|| unreachable!("the region lives as long as NetRam"))
    }
}

impl Drop for NetRam {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.shared.wake_evictor();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Unmap first (no fault can need the servers any more), then end the sessions.
        drop(self.region.take());
        self.shared.give_up_ahead();
        self.shared.servers.close();
    }
}
