//! A 2D Jacobi stencil on DSM: an N x N grid of f64 (top edge held at 1.0, the other edges at
//! 0.0), each node updating its own band of rows from the previous iteration's grid, a barrier
//! between iterations. Every cell is computed by the same arithmetic from the same neighbours
//! whatever the number of nodes, so the result is bit-identical on 1, 2 or 4 nodes: the checksum
//! says so.

use std::time::Instant;

use mosaic_dsm::Job;

/// What a run computed and how long it took.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    /// Sum of every cell of the final grid, in row-major order.
    pub sum: f64,
    /// FNV-1a of the bits of every cell of the final grid, in row-major order.
    pub bits: u64,
    /// Wall time per iteration, in microseconds (node 0's).
    pub us_per_iteration: f64,
    /// The same over the iterations after the first two (which touch every page of both grids
    /// for the first time), when there are more than two.
    pub us_per_iteration_warm: Option<f64>,
}

/// Bytes of the shared region a grid of `n` x `n` needs (two grids).
pub fn region_bytes(n: usize) -> u64 {
    2 * grid_bytes(n) as u64
}

/// Bytes of one grid, rounded up to whole pages.
fn grid_bytes(n: usize) -> usize {
    (n * n * 8).div_ceil(4096) * 4096
}

/// Runs `iterations` Jacobi sweeps of an `n` x `n` grid on `job`; every node returns the same
/// outcome (read after the last barrier).
pub fn run(job: &Job, n: usize, iterations: usize) -> Result<Outcome, String> {
    if n < 3 || region_bytes(n) > job.len() as u64 {
        return Err(format!("a {n} x {n} grid needs 3 <= n and a region of {} bytes", region_bytes(n)));
    }
    let grid_bytes = grid_bytes(n);
    // The two grids, as raw pointers: other nodes write parts of them (their bands) meanwhile,
    // so no Rust reference may claim a whole grid.
    let grids = [job.as_ptr().cast::<f64>(), job.as_ptr().wrapping_add(grid_bytes).cast::<f64>()];
    // Indexes below n*n: inside one grid inside the job's mapped region (checked above), which
    // lives as long as `job`; aligned (the region is page-aligned).
    // SAFETY: as said above.
    let get = |g: usize, i: usize| unsafe { grids[g].add(i).read() };
    // SAFETY: as said above; this node writes only cells of its own band.
    let set = |g: usize, i: usize, v: f64| unsafe { grids[g].add(i).write(v) };
    let (nodes, me) = (usize::from(job.size()), usize::from(job.rank()));
    // Interior rows 1..n-1, split in bands.
    let rows = n - 2;
    let band = |r: usize| 1 + r * rows / nodes..1 + (r + 1) * rows / nodes;
    if me == 0 {
        for j in 0..n {
            set(0, j, 1.0);
            set(1, j, 1.0);
        }
    }
    job.barrier().map_err(|e| mosaic_transport::error_chain(&e))?;
    let start = Instant::now();
    let mut warm = None;
    for it in 0..iterations {
        if it == 2 {
            warm = Some(Instant::now());
        }
        let (old, new) = (grids[it % 2], grids[1 - it % 2]);
        for i in band(me) {
            // SAFETY: rows of one grid inside the mapped region (as above). During this phase
            // nobody writes the old grid, and only this node touches its own rows of the new
            // one, so these references alias nothing that changes while they live.
            let (up, row, down, out) = unsafe {
                (
                    std::slice::from_raw_parts(old.add((i - 1) * n), n),
                    std::slice::from_raw_parts(old.add(i * n), n),
                    std::slice::from_raw_parts(old.add((i + 1) * n), n),
                    std::slice::from_raw_parts_mut(new.add(i * n), n),
                )
            };
            for j in 1..n - 1 {
                out[j] = 0.25 * (up[j] + down[j] + row[j - 1] + row[j + 1]);
            }
        }
        job.barrier().map_err(|e| mosaic_transport::error_chain(&e))?;
    }
    let elapsed = start.elapsed();
    let warm_elapsed = warm.map(|w| w.elapsed());
    let last = iterations % 2;
    let (mut sum, mut bits) = (0.0f64, 0xcbf2_9ce4_8422_2325u64);
    for i in 0..n * n {
        let v = get(last, i);
        sum += v;
        bits = (bits ^ v.to_bits()).wrapping_mul(0x100_0000_01b3);
    }
    job.barrier().map_err(|e| mosaic_transport::error_chain(&e))?;
    let us_per_iteration_warm = warm_elapsed.map(|w| w.as_secs_f64() * 1e6 / (iterations - 2) as f64);
    Ok(Outcome {
        sum,
        bits,
        us_per_iteration: elapsed.as_secs_f64() * 1e6 / iterations.max(1) as f64,
        us_per_iteration_warm,
    })
}
