//! How a region is configured ([`NetRamConfig`]) and what it counts ([`NetRamStats`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mosaic_pager::FaultMode;
use mosaic_transport::ClusterKey;

use crate::SharedBudget;

/// How to create a [`NetRam`](super::NetRam) region.
#[derive(Clone, Debug)]
pub struct NetRamConfig {
    /// Memory server URIs (`tcp://HOST:PORT`, `shm://NAME`, `rdma://HOST:PORT`).
    pub servers: Vec<String>,
    /// The cluster key.
    pub key: ClusterKey,
    /// Region size in bytes (rounded up to pages).
    pub size: u64,
    /// Local RAM the region may use, in bytes (at least [`MIN_BUDGET_PAGES`](super::MIN_BUDGET_PAGES) pages).
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
    /// Map the region at exactly this address (page-aligned; creating it fails if anything is
    /// mapped there). Default: wherever the kernel puts it.
    pub fixed_addr: Option<usize>,
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
            fixed_addr: None,
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
    /// Pages moved off servers that asked for their pages to go elsewhere (their node was short
    /// of memory: the cluster's memory ushering).
    pub ushered: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) cache_hits: AtomicU64,
    pub(super) fetched: AtomicU64,
    pub(super) prefetched: AtomicU64,
    pub(super) zero_filled: AtomicU64,
    pub(super) evicted: AtomicU64,
    pub(super) written_back: AtomicU64,
    pub(super) failovers: AtomicU64,
    pub(super) rebuilt: AtomicU64,
    pub(super) lost: AtomicU64,
    pub(super) throttled: AtomicU64,
    pub(super) evicted_by_faults: AtomicU64,
    pub(super) saved_clean: AtomicU64,
    pub(super) sessions_lost: AtomicU64,
    pub(super) ushered: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
