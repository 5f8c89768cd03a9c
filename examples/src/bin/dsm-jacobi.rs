//! The Jacobi example on a DSM job: `mosrun -n 4 dsm-jacobi [N] [ITERATIONS]` (or under mpirun
//! or srun). Every node prints the checksum of the final grid, which is the same on any number
//! of nodes, and node 0 the time per iteration.

use std::process::ExitCode;

use mosaic_dsm::{Job, JobConfig};
use mosaic_examples::{chain, jacobi};

fn main() -> ExitCode {
    env_logger::init();
    let usage = "dsm-jacobi [N (512)] [ITERATIONS (100)], as the nodes of a DSM job (mosrun -n, mpirun, srun)";
    let Some(args) = mosaic_examples::args(usage, &[512usize, 100]) else { return ExitCode::SUCCESS };
    let (n, iterations) = (args[0], args[1]);
    let run = || -> Result<(u16, u16, jacobi::Outcome, mosaic_dsm::JobStats), String> {
        let job = Job::join(JobConfig::from_env(jacobi::region_bytes(n)).map_err(chain)?).map_err(chain)?;
        let out = jacobi::run(&job, n, iterations)?;
        let (rank, size, stats) = (job.rank(), job.size(), job.stats());
        job.leave().map_err(chain)?;
        Ok((rank, size, out, stats))
    };
    match run() {
        Ok((rank, size, o, stats)) => {
            println!(
                "dsm-jacobi: node {rank} of {size}: {n}x{n}, {iterations} iterations: checksum {:.12e} {:016x}",
                o.sum, o.bits
            );
            if rank == 0 {
                let warm = o.us_per_iteration_warm.map(|w| format!(", {w:.1} after the first two")).unwrap_or_default();
                println!("dsm-jacobi: {:.1} us per iteration on {size} nodes{warm}", o.us_per_iteration);
                let per = |x: u64| x as f64 / iterations.max(1) as f64;
                println!(
                    "dsm-jacobi: node 0 sent {:.1} messages and {:.1} KiB per iteration ({} pages in all)",
                    per(stats.messages_sent),
                    per(stats.bytes_sent) / 1024.0,
                    stats.pages_sent
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dsm-jacobi: {e}");
            ExitCode::FAILURE
        }
    }
}
