//! `mosaic-bench`: Mosaic's benchmarks, printed as a table or as JSON lines.
//!
//! ```text
//! mosaic-bench transport [--transports tcp,shm,sim] [--peer] [--json] [--time SECS] [--wait spin|blocking]
//! mosaic-bench serve --uri URI [--window-pages N]
//! ```

mod peer;
mod serve;
mod stats;
mod transport;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "mosaic-bench", version, about = "Benchmarks for Mosaic's transports, measured beside the peer tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Wait {
    /// Busy-poll for a bounded time (100 us), then sleep: Mosaic's default.
    Spin,
    /// Sleep in the kernel at once: lowest CPU use.
    Blocking,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ping-pong latency, streaming bandwidth and page-read latency/throughput per transport.
    ///
    /// Starts its own server for each transport in a child process (tcp on 127.0.0.1, shm on
    /// this host, sim as a shaped link around tcp) and stops it afterwards.
    Transport {
        /// Transports to measure, comma-separated: tcp, shm, sim, rdma.
        #[arg(long, value_delimiter = ',', default_value = "tcp,shm,sim")]
        transports: Vec<String>,
        /// Ping-pong message sizes in bytes.
        #[arg(long, value_delimiter = ',', default_value = "8,64,4096,65536")]
        sizes: Vec<usize>,
        /// Outstanding 4 KiB page reads to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        outstanding: Vec<usize>,
        /// Timed seconds per figure (after a warm-up of a fifth of that).
        #[arg(long, default_value_t = 1.0)]
        time: f64,
        /// How waiting threads wait, on both ends.
        #[arg(long, value_enum, default_value_t = Wait::Spin)]
        wait: Wait,
        /// Also run the peer tool in the same invocation and print ours/peer beside each figure:
        /// sockperf ping-pong for tcp, ucx_perftest tag_lat/tag_bw (UCX_TLS=posix,self) for shm,
        /// plus single-thread memcpy reference lines beside the shm stream.
        #[arg(long)]
        peer: bool,
        /// Link preset or parameters for `sim` (e.g. fast-ethernet, 10gbe, "lat=50us,bw=1Gbit").
        #[arg(long, default_value = "10gbe")]
        sim_link: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Runs a benchmark server until standard input closes (used by `transport`).
    Serve {
        /// Where to listen: tcp://HOST:PORT or shm://NAME.
        #[arg(long)]
        uri: String,
        /// Pages in the served window.
        #[arg(long, default_value_t = 4096)]
        window_pages: u64,
        /// How the server waits for requests.
        #[arg(long, value_enum, default_value_t = Wait::Spin)]
        wait: Wait,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let result = match Cli::parse().cmd {
        Cmd::Transport { transports, sizes, outstanding, time, wait, peer, sim_link, json } => {
            if !(0.01..=600.0).contains(&time) {
                Err("--time must be between 0.01 and 600 seconds".to_string())
            } else if let Some(t) = transports.iter().find(|t| !["tcp", "shm", "sim", "rdma"].contains(&t.as_str())) {
                Err(format!("unknown transport {t:?}: expected tcp, shm, sim or rdma"))
            } else if let Err(e) = mosaic_transport::LinkSpec::parse(&sim_link) {
                Err(format!("--sim-link: {e}"))
            } else if outstanding.iter().any(|&n| n == 0 || n > 256) {
                Err("--outstanding values must be between 1 and 256".to_string())
            } else if sizes.iter().any(|&s| s > 1 << 20) {
                Err("--sizes must be at most 1 MiB (the maximum frame)".to_string())
            } else {
                transport::run(&transport::Plan {
                    transports,
                    sizes,
                    outstanding,
                    time: Duration::from_secs_f64(time),
                    blocking: wait == Wait::Blocking,
                    peer,
                    sim_link,
                    json,
                })
            }
        }
        Cmd::Serve { uri, window_pages, wait } => {
            let policy = match wait {
                Wait::Spin => mosaic_transport::WaitPolicy::DEFAULT,
                Wait::Blocking => mosaic_transport::WaitPolicy::blocking(),
            };
            serve::serve(&uri, window_pages, policy)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosaic-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
