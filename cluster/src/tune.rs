//! `mosctl tune`: measures what moving work and memory costs on this cluster, and writes the
//! figures the policies use (the seed's `prep_tune` / `tune_kernel`).
//!
//! From this node to another it measures the agents' round trip (small calls), the bandwidth
//! (64 MiB in 1 MiB calls), a remote page fault (a network-RAM region on the other node's memory
//! server, its pages fetched one fault at a time), and, where it can start a job, a real
//! migration: a probe holding [`PROBE_MIB`] MiB moved there with its freeze time measured. The
//! balancer's cost of moving a process is the freeze plus the probe's memory crossing at the
//! measured bandwidth ([`Tuning::migration_cost`]); without a probe migration, the freeze is
//! estimated from the round trip. `mosaicd --tune FILE` reads the file.

use std::time::{Duration, Instant};

use mosaic_transport::ClusterKey;
use serde::{Deserialize, Serialize};

use crate::wire;

/// Memory of the probe process moved to measure a migration, in MiB.
pub const PROBE_MIB: u64 = 64;
/// Bytes sent to measure the bandwidth.
const BANDWIDTH_BYTES: usize = 64 << 20;
/// Bytes per call when measuring the bandwidth.
const CHUNK: usize = 1 << 20;

/// What `mosctl tune` measured, as written to the tune file (TOML).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    /// When, as UTC seconds since 1970.
    pub measured_at: u64,
    /// The agent measured from.
    pub from: String,
    /// The agent measured to.
    pub to: String,
    /// Median round trip of a small call between the agents, microseconds.
    pub round_trip_us: f64,
    /// Bytes per second one connection carries, in MiB/s.
    pub bandwidth_mib_s: f64,
    /// Median time of a fault served from the other node's memory server, microseconds (0:
    /// not measured, the node has no memory server).
    pub remote_fault_us: f64,
    /// Freeze time of the probe migration, milliseconds (0: no probe migration was made).
    pub probe_freeze_ms: f64,
    /// What moving a process costs it, milliseconds: what the balancer weighs a move's gain
    /// against.
    pub migration_cost_ms: f64,
}

impl Tuning {
    /// The cost of moving a process: the probe's freeze (or, without one, 20 round trips)
    /// plus its memory crossing at the measured bandwidth.
    pub fn cost_ms(round_trip_us: f64, bandwidth_mib_s: f64, probe_freeze_ms: f64) -> f64 {
        let freeze = if probe_freeze_ms > 0.0 { probe_freeze_ms } else { 20.0 * round_trip_us / 1000.0 };
        let memory = if bandwidth_mib_s > 0.0 { PROBE_MIB as f64 / bandwidth_mib_s * 1000.0 } else { 0.0 };
        freeze + memory
    }

    /// The migration cost, for the balancer.
    pub fn migration_cost(&self) -> Duration {
        Duration::from_secs_f64((self.migration_cost_ms / 1000.0).clamp(0.0, 3600.0))
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let head =
            format!("# Measured by `mosctl tune` from {} to {}. Read by `mosaicd --tune`.\n", self.from, self.to);
        head + &toml::to_string(self).unwrap_or_default()
    }

    /// Reads a tune file; the error names the file and what is wrong.
    pub fn read(path: &std::path::Path) -> Result<Tuning, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let t: Tuning = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if !(t.migration_cost_ms.is_finite() && t.migration_cost_ms >= 0.0) {
            return Err(format!("{}: migration_cost_ms must be a number of milliseconds", path.display()));
        }
        Ok(t)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median round trip of `n` small calls to the agent at `to`, and its bandwidth, in MiB/s.
pub fn link(to: &str, key: &ClusterKey, n: usize) -> Result<(f64, f64), String> {
    let c = crate::connect_agent(to, key, Duration::from_secs(30))?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = Instant::now();
        c.call(wire::SINK, &[]).map_err(|e| format!("{to}: {}", mosaic_transport::error_chain(&e)))?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let chunk = vec![0x5au8; CHUNK];
    let t = Instant::now();
    for _ in 0..BANDWIDTH_BYTES / CHUNK {
        c.call(wire::SINK, &chunk).map_err(|e| format!("{to}: {}", mosaic_transport::error_chain(&e)))?;
    }
    let mib_s = (BANDWIDTH_BYTES >> 20) as f64 / t.elapsed().as_secs_f64();
    Ok((median(times), mib_s))
}

/// The median time of a fault served from the memory server at `server`: a 16 MiB region
/// there with a 1 MiB budget and no prefetching is written, then read a page at a time.
pub fn remote_fault(server: &str, key: &ClusterKey) -> Result<f64, String> {
    let size = 16u64 << 20;
    let mut cfg = mosaic_netram::NetRamConfig::new(vec![server.to_string()], key.clone(), size, 1 << 20);
    cfg.prefetch = false;
    cfg.victim_cache = false;
    cfg.name = "mosctl-tune".into();
    let ram =
        mosaic_netram::NetRam::new(cfg).map_err(|e| format!("{server}: {}", mosaic_transport::error_chain(&e)))?;
    let pages = (size / 4096) as usize;
    let base = ram.as_ptr();
    // SAFETY: every offset is inside the region, mapped for `size` bytes while `ram` lives.
    let at = |i: usize| unsafe { base.add(i * 4096) };
    for i in 0..pages {
        // SAFETY: inside the region (see `at`).
        unsafe { at(i).write_volatile(1) };
    }
    // The evictor catches up with the writes (it may lag on a busy machine).
    let budget_pages = (1u64 << 20) / 4096;
    let deadline = Instant::now() + Duration::from_secs(10);
    while ram.stats().resident > budget_pages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Only reads that fetched their page count (a page still resident is not a fault).
    let mut times = Vec::with_capacity(pages);
    for i in 0..pages / 2 {
        let before = ram.stats().fetched;
        let t = Instant::now();
        // SAFETY: inside the region (see `at`); the first half was evicted first.
        let v = unsafe { at(i).read_volatile() };
        let took = t.elapsed().as_secs_f64() * 1e6;
        if v != 1 {
            return Err(format!("{server}: page {i} read back {v}, not what was written"));
        }
        if ram.stats().fetched > before {
            times.push(took);
        }
    }
    if times.is_empty() {
        return Err(format!("{server}: no read faulted (nothing was evicted within 10 s)"));
    }
    Ok(median(times))
}
