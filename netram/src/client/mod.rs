//! [`NetRam`]: a region of any size whose pages live on memory servers, with a bounded number
//! resident in local RAM.
//!
//! Faults fetch pages from a server holding them ([`Source`], running on the faulting thread by
//! default), with a prefetch window along strided streams and the window after it on its way
//! ([`window`]); an evictor thread keeps the resident set within the budget, writing dirty pages
//! back to every copy's server before dropping them, and a fault that would overshoot the budget
//! waits for it; a background thread checks the sessions, rebuilds copies lost with a server and moves pages off
//! servers that ask for them to go elsewhere ([`usher`]).
//! A resident page is never dropped while no readable copy of it exists elsewhere: the evictor
//! writes such a page back as if it were dirty, and the rebuild re-stores resident pages too.
//! Page states and their invariants are in [`crate::pages`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_pager::{DirtyTracking, Region, RegionConfig, RegionCore};

use crate::budget::Share;
use crate::pages::PageState::{Absent, Evicting, Lost};
use crate::pages::PageTable;
use crate::servers::{ServerSet, FILE_HOLDER};
use crate::{ConfigError, NetRamError, PAGE_SIZE};

mod config;
mod eviction;
mod footprint;
mod fork;
mod handover;
mod lifecycle;
mod source;
mod store;
mod usher;
mod victims;
mod window;

use config::{bump, Counters};
pub use config::{NetRamConfig, NetRamStats};
use footprint::Footprint;
use fork::ForkGate;
pub use fork::ForkTicket;
pub use handover::{HandOver, HandOverError, HAND_OVER_GRACE};
use source::{Settled, Source};
use victims::VictimCache;

/// How long a fault waits for a page another thread is fetching or evicting.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// The smallest resident budget, in pages.
pub const MIN_BUDGET_PAGES: u64 = 64;
/// How often the servers are asked whether they still hold this region's session.
const SESSION_CHECK: Duration = Duration::from_secs(2);

/// What the region's threads share: the page table, the servers, the budget and the queues.
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
    ahead: lifecycle::AheadSlot<window::Ahead>,
    /// Set while the evictor cannot bring the resident set down (every server full, nothing
    /// evictable): faults over the hard limit then go ahead instead of waiting for it.
    evict_stalled: AtomicBool,
    /// The process's memory outside the region, when the budget covers it.
    footprint: Footprint,
    /// Set when pages were stored with fewer copies than wanted: the keeper rebuilds.
    rebuild_wanted: AtomicBool,
    /// Set when the region must end without ending its session on the servers (a region taken
    /// over and given back: the session is the source's again).
    keep_session: AtomicBool,
    stats: Counters,
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
            keep_session: AtomicBool::new(false),
            ahead: lifecycle::AheadSlot::new(),
            stats: Counters::default(),
        })
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

/// Where a region's mapping comes from.
enum MapAt {
    /// A new mapping wherever the kernel puts it.
    Anywhere,
    /// The mapping at this address, inherited across a fork.
    Adopt(usize),
    /// A new mapping at exactly this address (a region handed over from another process).
    Fixed(usize),
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
            return Err(ConfigError::EmptyRegion.into());
        }
        let budget = cfg.resident_budget / PAGE_SIZE as u64;
        if budget < MIN_BUDGET_PAGES {
            return Err(ConfigError::BudgetTooSmall { bytes: cfg.resident_budget, min_pages: MIN_BUDGET_PAGES }.into());
        }
        let mut id = [0u8; 24 + crate::proto::SECRET_LEN];
        getrandom::fill(&mut id).map_err(NetRamError::Random)?;
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
                    .map_err(|e| NetRamError::BackingFile { path: path.clone(), source: e })?;
                Some(f)
            }
            None => None,
        };
        let shared = Shared::new(&cfg, servers, PageTable::new(pages), budget, file);
        let at = cfg.fixed_addr.map_or(MapAt::Anywhere, MapAt::Fixed);
        NetRam::start(cfg, shared, at)
    }

    /// Maps the region where `at` says with `shared` as its page source and starts the
    /// background threads.
    fn start(cfg: NetRamConfig, shared: Arc<Shared>, at: MapAt) -> Result<NetRam, NetRamError> {
        let mut rcfg = RegionConfig::new(shared.table.len())
            .mode(cfg.fault_mode)
            .dirty(DirtyTracking::Faults)
            .report_discards(false)
            .name(cfg.name.clone());
        match at {
            MapAt::Anywhere => {}
            MapAt::Adopt(addr) => rcfg = rcfg.adopt(addr),
            MapAt::Fixed(addr) => rcfg = rcfg.fixed_addr(addr),
        }
        let region = Region::new(rcfg, Source(shared.clone())).map_err(NetRamError::Pager)?;
        let core = region.core();
        let stop = Arc::new(AtomicBool::new(false));
        let mut ram = NetRam { shared, threads: Vec::new(), stop, region: Some(region), cfg };
        ram.spawn_background(core)?;
        Ok(ram)
    }

    /// Starts the evictor and the session keeper on `core`, the region's.
    fn spawn_background(&mut self, core: Arc<RegionCore>) -> Result<(), NetRamError> {
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
        self.threads.push(evictor.map_err(|e| NetRamError::Thread { what: "evictor", source: e })?);
        let (shared, stop) = (self.shared.clone(), self.stop.clone());
        let keeper = std::thread::Builder::new().name("mosaic-keeper".into()).spawn(move || {
            let mut last_live = shared.servers.live_mask();
            let mut next_check = Instant::now() + SESSION_CHECK;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
                let (mut rebuild, mut usher) = (false, false);
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
                    // Servers short of memory ask for their pages to go elsewhere.
                    usher = shared.servers.leaving_mask() != 0;
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
                if usher {
                    shared.usher(&keeper_core, &stop);
                }
            }
        });
        self.threads.push(keeper.map_err(|e| NetRamError::Thread { what: "session keeper", source: e })?);
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
            ushered: l(&c.ushered),
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
            return Err(ConfigError::BudgetTooSmall { bytes, min_pages: MIN_BUDGET_PAGES }.into());
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
        let end = first
            .checked_add(count)
            .filter(|e| *e <= s.table.len())
            .ok_or_else(|| NetRamError::from(ConfigError::OutsideRegion { first, count, pages: s.table.len() }))?;
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
                    Settled::Hung => Lost,
                };
                if st == Absent {
                    break;
                }
                if !s.table.cas(i, st, Evicting) {
                    continue;
                }
                let holders = s.table.holders(i);
                if holders & !FILE_HOLDER != 0 {
                    remote.entry(holders & !FILE_HOLDER).or_default().push(i);
                }
                s.table.set_holders(i, 0);
                if st.is_resident() || st == Lost {
                    dropped.push((i, st != Lost));
                } else {
                    s.table.set(i, Absent);
                }
                s.victims.discard(&[i]);
                break;
            }
        }
        let pages: Vec<u64> = dropped.iter().map(|d| d.0).collect();
        for (r, e) in region.drop_runs(&runs(&pages)) {
            log::warn!("region {}: discarding pages {r:?}: {e}", s.name);
        }
        let resident = dropped.iter().filter(|d| d.1).count() as u64;
        for (i, _) in dropped {
            s.table.set(i, Absent);
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
        // A region handed over keeps its gate closed: let its threads out to see the stop.
        self.shared.fork_gate.open();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Unmap first (no fault can need the servers any more), then end the sessions.
        drop(self.region.take());
        self.shared.give_up_ahead();
        if !self.shared.keep_session.load(Ordering::Acquire) {
            self.shared.servers.close();
        }
    }
}
