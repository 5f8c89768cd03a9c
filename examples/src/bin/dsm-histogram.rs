//! A parallel histogram with global atomics on a DSM job: `mosrun -n 3 dsm-histogram [SAMPLES]
//! [BINS] [THREADS]` (or under mpirun or srun).
//!
//! Every node draws SAMPLES pseudo-random numbers into a block of its own arena (homed at that
//! node) and publishes the block's address in a collective directory. After a barrier, THREADS
//! threads per node add each of the node's samples to the shared bins with
//! [`Job::fetch_add`](mosaic_dsm::Job::fetch_add). After another, every node reads every node's
//! samples through the directory, computes the histogram alone, and checks the shared bins
//! against it.

use std::process::ExitCode;
use std::time::Instant;

use mosaic_dsm::{Job, JobConfig};
use mosaic_examples::chain;

fn main() -> ExitCode {
    env_logger::init();
    let usage = "dsm-histogram [SAMPLES per node (4096)] [BINS (64)] [THREADS per node (2)], as the nodes of a DSM job (mosrun -n, mpirun, srun)";
    let Some(args) = mosaic_examples::args(usage, &[4096, 64, 2]) else { return ExitCode::SUCCESS };
    let (samples, bins, threads) = (args[0].max(1), args[1].max(1), args[2].max(1));
    mosaic_examples::report("dsm-histogram", run(samples, bins, threads))
}

/// Sample `i` of node `node`.
fn sample(node: u64, i: u64) -> u64 {
    let x = (node << 40 | i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

// Counts and indexes here are u64 (what the region's words hold) used as indexes of this
// 64-bit host's memory: they fit.
#[allow(clippy::cast_possible_truncation)]
fn run(samples: u64, bins: u64, threads: u64) -> Result<String, String> {
    let job = Job::join(JobConfig::from_env(1 << 20).map_err(chain)?).map_err(chain)?;
    let (rank, size) = (u64::from(job.rank()), u64::from(job.size()));
    // Collective blocks: the bins, and the directory of the nodes' sample blocks.
    let hist = job.alloc(8 * bins).map_err(chain)?.cast::<u64>();
    let directory = job.alloc(8 * size).map_err(chain)?.cast::<u64>();
    // This node's samples, in its own arena: written here without asking any other node.
    let mine = job.alloc_local(8 * samples).map_err(chain)?.cast::<u64>();
    for i in 0..samples {
        // SAFETY: word i of the block of 8 * samples bytes just allocated here; nobody else
        // knows of it until its address is published below.
        unsafe { mine.add(i as usize).write(sample(rank, i)) };
    }
    job.fetch_add(directory.wrapping_add(rank as usize), mine as u64).map_err(chain)?;
    job.barrier().map_err(chain)?;

    let start = Instant::now();
    // Addresses cross to the threads as numbers (raw pointers are not `Send`).
    let (mine_at, hist_at) = (mine as usize, hist as usize);
    mosaic_examples::on_threads(threads, |t| {
        let (mine, hist) = (mine_at as *const u64, hist_at as *mut u64);
        for i in (t..samples).step_by(threads as usize) {
            // SAFETY: a word of this node's sample block, read-only from now on.
            let v = unsafe { mine.add(i as usize).read() };
            job.fetch_add(hist.wrapping_add((v % bins) as usize), 1).map_err(chain)?;
        }
        Ok(())
    })?;
    let took = start.elapsed();
    job.barrier().map_err(chain)?;

    // Every node checks everything: every node's samples, read through the directory.
    let mut want = vec![0u64; bins as usize];
    for node in 0..size {
        let block = job.load(directory.wrapping_add(node as usize)).map_err(chain)? as *mut u64;
        for i in 0..samples {
            let v = job.load(block.wrapping_add(i as usize)).map_err(chain)?;
            if v != sample(node, i) {
                return Err(format!("node {node}'s sample {i} reads {v:#x}, not {:#x}", sample(node, i)));
            }
            want[(v % bins) as usize] += 1;
        }
    }
    for (b, w) in want.iter().enumerate() {
        let got = job.load(hist.wrapping_add(b)).map_err(chain)?;
        if got != *w {
            return Err(format!("node {rank}: bin {b} holds {got}, expected {w}"));
        }
    }
    let stats = job.stats();
    job.leave().map_err(chain)?;
    let per = took.as_secs_f64() * 1e6 / samples as f64;
    Ok(format!(
        "dsm-histogram: node {rank} of {size}: {} samples in {bins} bins, all bins right; {per:.1} us per sample \
         binned here ({threads} threads); {} requests, {} pages sent",
        samples * size,
        stats.requests,
        stats.pages_sent
    ))
}
