//! A lock-protected counter on a DSM job: `mosrun -n 3 dsm-counter [ROUNDS] [THREADS]` (or under
//! mpirun or srun). Every thread of every node adds 1 to one shared counter ROUNDS times with a
//! plain load and store inside DSM lock 1; after a barrier every node checks that the counter is
//! nodes x threads x ROUNDS (an increment lost would mean two threads inside the lock at once).

use std::process::ExitCode;
use std::time::Instant;

use mosaic_dsm::{Job, JobConfig};
use mosaic_examples::chain;

/// The lock that guards the counter.
const LOCK: u64 = 1;

fn main() -> ExitCode {
    env_logger::init();
    let usage =
        "dsm-counter [ROUNDS (200)] [THREADS per node (2)], as the nodes of a DSM job (mosrun -n, mpirun, srun)";
    let Some(args) = mosaic_examples::args(usage, &[200, 2]) else { return ExitCode::SUCCESS };
    mosaic_examples::report("dsm-counter", run(args[0], args[1].max(1)))
}

fn run(rounds: u64, threads: u64) -> Result<String, String> {
    let job = Job::join(JobConfig::from_env(1 << 20).map_err(chain)?).map_err(chain)?;
    // One word of the collective heap: the same address on every node.
    let counter = job.alloc(8).map_err(chain)?.cast::<u64>();
    let start = Instant::now();
    let counter_at = counter as usize; // to the threads as a number (raw pointers are not `Send`)
    mosaic_examples::on_threads(threads, |_| {
        let counter = counter_at as *mut u64;
        for _ in 0..rounds {
            job.lock(LOCK).map_err(chain)?;
            // SAFETY: an aligned word of the collective heap (from `alloc`), which stays mapped
            // while `job` lives; every thread of every node touches it only while holding lock
            // 1, so these plain accesses never race.
            unsafe { counter.write_volatile(counter.read_volatile() + 1) };
            job.unlock(LOCK).map_err(chain)?;
        }
        Ok(())
    })?;
    let took = start.elapsed();
    job.barrier().map_err(chain)?;
    let want = rounds * threads * u64::from(job.size());
    let got = job.load(counter).map_err(chain)?;
    let (rank, size) = (job.rank(), job.size());
    job.leave().map_err(chain)?;
    if got != want {
        return Err(format!("node {rank}: the counter is {got}, expected {want}: an increment was lost"));
    }
    let per = took.as_secs_f64() * 1e6 / (rounds * threads) as f64;
    Ok(format!(
        "dsm-counter: node {rank} of {size}: counter {got} (expected {want}); {per:.1} us per locked increment here"
    ))
}
