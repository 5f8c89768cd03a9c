//! `mosaic-bench`: Mosaic's benchmarks, printed as a table or as JSON lines.
//!
//! ```text
//! mosaic-bench transport [--transports tcp,shm,sim] [--peer] [--json] [--time SECS] [--wait spin|blocking]
//! mosaic-bench netram [--transports tcp,shm] [--threads 1,4,16] [--resident 100,50,25] [--json]
//! mosaic-bench dsm [--nodes 2,4] [--samples 500] [--json]
//! mosaic-bench rmw [--size 64M] [--time 5]
//! mosaic-bench serve --uri URI [--window-pages N]
//! mosaic-bench serve-ram --uri URI --capacity SIZE
//! ```

mod cluster_sim;
mod dsm;
mod migrate;
mod migrate_netram;
mod migrate_process;
mod netram;
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
        /// Protections of the frames to measure, comma-separated: auto (encrypt between hosts,
        /// none on this host; sim counts as between hosts), none, integrity, encrypt. Each is
        /// measured on its own connection to the same server, in this order.
        #[arg(long, value_delimiter = ',', default_value = "auto")]
        protection: Vec<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Network RAM: remote fault latency and faults/s, scans with and without prefetch, random
    /// read-modify-write at several resident fractions; beside, in the same run, the memory
    /// server's 4 KiB page read over the bare transport and the pager's local install cost.
    ///
    /// Starts one memory server per transport in a child process on this host unless given
    /// `--servers`.
    Netram {
        /// Transports to measure, comma-separated: tcp, shm, sim (tcp through the shaped link
        /// of --sim-link: faults that wait on a network rather than on the CPU).
        #[arg(long, value_delimiter = ',', default_value = "tcp,shm")]
        transports: Vec<String>,
        /// Use these memory servers (URIs) instead of starting one; the cluster key is then
        /// read from MOSAIC_CLUSTER_KEY or MOSAIC_CLUSTER_KEY_FILE.
        #[arg(long, value_delimiter = ',')]
        servers: Vec<String>,
        /// Link preset or parameters for `sim` (e.g. fast-ethernet, 10gbe, "lat=50us,bw=10Gbit").
        #[arg(long, default_value = "10gbe")]
        sim_link: String,
        /// Thread counts for the faults/s figures.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        threads: Vec<usize>,
        /// Resident fractions, in percent, for the read-modify-write figures.
        #[arg(long, value_delimiter = ',', default_value = "100,50,25")]
        resident: Vec<u64>,
        /// Region size for the fault and scan figures.
        #[arg(long, default_value = "64M", value_parser = mosaic_netram::parse_size)]
        size: u64,
        /// Working set of the read-modify-write figures.
        #[arg(long, default_value = "64M", value_parser = mosaic_netram::parse_size)]
        rmw_size: u64,
        /// Timed seconds per figure.
        #[arg(long, default_value_t = 1.0)]
        time: f64,
        /// Serve faults with a worker thread instead of on the faulting thread.
        #[arg(long)]
        workers: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The read-modify-write workload of `netram` on ordinary memory, alone: run it under a
    /// memory cgroup limit with swap to compare with kernel swapping (prints one JSON line).
    Rmw {
        /// Working set.
        #[arg(long, default_value = "64M", value_parser = mosaic_netram::parse_size)]
        size: u64,
        /// Timed seconds.
        #[arg(long, default_value_t = 5.0)]
        time: f64,
    },
    /// DSM: read misses (home owner, and three hops), write upgrades with 1 and 3 sharers, and
    /// barriers, for jobs of N processes on this host over tcp; beside, in the same run, the
    /// pager's install and the transport's 4 KiB page read a read miss is made of.
    Dsm {
        /// Job sizes, comma-separated (at least 2; 3 hops need 3, 3 sharers need 4).
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        nodes: Vec<u16>,
        /// Transports between the nodes, comma-separated: tcp, shm.
        #[arg(long, value_delimiter = ',', default_value = "tcp,shm")]
        transports: Vec<String>,
        /// Samples per figure.
        #[arg(long, default_value_t = 500)]
        samples: usize,
        /// Timed seconds of each baseline figure.
        #[arg(long, default_value_t = 1.0)]
        time: f64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Migration: a region moved post-copy between two processes of this host, for each
    /// transport, size and share of pages touched: freeze time (the source's freeze to the
    /// destination running), time to full residence, bytes sent beside the touched bytes.
    Migrate {
        /// Region sizes, comma-separated (like 64M, 1G, 8G: the source and the destination each
        /// hold it once).
        #[arg(long, value_delimiter = ',', default_value = "64M,1G", value_parser = mosaic_netram::parse_size)]
        sizes: Vec<u64>,
        /// Shares of the pages touched at the source, in percent, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
        touched: Vec<u64>,
        /// Transports, comma-separated: tcp, shm, sim:fast-ethernet, sim:10gbe (sim: a shaped
        /// link around tcp).
        #[arg(long, value_delimiter = ',', default_value = "tcp,shm,sim:fast-ethernet,sim:10gbe")]
        transports: Vec<String>,
        /// The largest region measured over a simulated link.
        #[arg(long, default_value = "64M", value_parser = mosaic_netram::parse_size)]
        sim_max: u64,
        /// What moves, comma-separated: `region` (a region between two processes) and
        /// `process` (a whole process between two node agents, as `mosctl migrate` moves it:
        /// needs root and libmosaic_preload.so beside this program) and `netram` (a
        /// network-RAM region handed over: only its table moves; tcp and shm only).
        #[arg(long, value_delimiter = ',', default_value = "region,process")]
        ops: Vec<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The cluster's information layer simulated at many nodes in one process (simulated
    /// time): frames and bytes each node sends per second, the age of the information nodes
    /// hold, and how long the others take to find a dead node.
    ClusterSim {
        /// Cluster sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "16,256,2048")]
        nodes: Vec<usize>,
        /// Simulated seconds counted (after the warm-up).
        #[arg(long, default_value = "60")]
        seconds: u64,
        /// Simulated seconds before counting starts (everyone joins in the first second; the
        /// membership updates of the join are spread meanwhile).
        #[arg(long, default_value = "20")]
        warm_up: u64,
        /// Nodes join at random times over this many seconds, each through a random node that
        /// joined before it [default: all through node 0 within the first second].
        #[arg(long)]
        join_over: Option<u64>,
        /// The links, a `sim` preset (fast-ethernet, 10gbe, 100gbe, ideal; ",loss=P" drops
        /// frames).
        #[arg(long, default_value = "10gbe")]
        link: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The process a `migrate --ops process` figure moves (started by `migrate`).
    #[command(hide = true)]
    MigrateHold {
        /// Bytes to map.
        size: u64,
        /// Share written, in percent.
        pct: u64,
    },
    /// The source of a `migrate` figure (started by `migrate`).
    #[command(hide = true)]
    MigrateSource {
        /// Region size in bytes.
        size: u64,
        /// Share touched, in percent.
        pct: u64,
        /// Where to listen.
        listen: String,
    },
    /// The destination of a `migrate` figure (started by `migrate`).
    #[command(hide = true)]
    MigrateDest {
        /// A simulated link's preset, if any.
        link: Option<String>,
    },
    /// The source of a `migrate --ops netram` figure (started by `migrate`).
    #[command(hide = true)]
    MigrateNetramSource {
        /// Region size in bytes.
        size: u64,
        /// Share written, in percent.
        pct: u64,
        /// Where to listen.
        listen: String,
        /// The memory server.
        server: String,
    },
    /// The destination of a `migrate --ops netram` figure (started by `migrate`).
    #[command(hide = true)]
    MigrateNetramDest {
        /// Region size in bytes.
        size: u64,
        /// Share written, in percent.
        pct: u64,
    },
    /// One node of a `dsm` job (started by `dsm`).
    #[command(hide = true)]
    DsmNode {
        /// Samples per figure.
        #[arg(long)]
        samples: usize,
    },
    /// Runs a memory server until standard input closes (used by `netram`).
    ServeRam {
        /// Where to listen: tcp://HOST:PORT or shm://NAME.
        #[arg(long)]
        uri: String,
        /// RAM to donate, in bytes.
        #[arg(long, value_parser = mosaic_netram::parse_size)]
        capacity: u64,
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
    // The restorer of `migrate --ops process` (this program run again by the agents): first,
    // before any thread starts (it forks).
    if std::env::args().nth(1).as_deref() == Some("restore") {
        return ExitCode::from(mosaic_migrate::process::keeper_main());
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let result = match Cli::parse().cmd {
        Cmd::Transport { transports, sizes, outstanding, time, wait, peer, sim_link, protection, json } => {
            let protections: Result<Vec<_>, String> =
                protection.iter().map(|p| mosaic_transport::Protection::parse(p)).collect();
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
            } else if let Err(e) = &protections {
                Err(format!("--protection: {e}"))
            } else {
                transport::run(&transport::Plan {
                    protections: protections.unwrap_or_default(),
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
        Cmd::Netram { transports, servers, sim_link, threads, resident, size, rmw_size, time, workers, json } => {
            if !(0.01..=600.0).contains(&time) {
                Err("--time must be between 0.01 and 600 seconds".to_string())
            } else if let Some(t) = transports.iter().find(|t| !["tcp", "shm", "sim"].contains(&t.as_str())) {
                Err(format!("unknown transport {t:?}: expected tcp, shm or sim"))
            } else if let Err(e) = mosaic_transport::LinkSpec::parse(&sim_link) {
                Err(format!("--sim-link: {e}"))
            } else if threads.iter().any(|&n| n == 0 || n > 256) {
                Err("--threads values must be between 1 and 256".to_string())
            } else if resident.iter().any(|&p| p == 0 || p > 100) {
                Err("--resident values must be percentages between 1 and 100".to_string())
            } else if size < 4 << 20 || rmw_size < 1 << 20 {
                Err("--size must be at least 4M and --rmw-size at least 1M".to_string())
            } else {
                netram::run(&netram::Plan {
                    transports,
                    servers,
                    sim_link,
                    threads,
                    resident,
                    size,
                    rmw_size,
                    time: Duration::from_secs_f64(time),
                    workers,
                    json,
                })
            }
        }
        Cmd::Rmw { size, time } => {
            let mut w: Vec<u64> = vec![0; usize::try_from(size / 8).unwrap_or(0)];
            netram::fill_random(&mut w);
            let rate = netram::rmw_ops_per_s(&mut w, Duration::from_secs_f64(time.clamp(0.01, 3600.0)));
            println!("{}", serde_json::json!({"bench": "rmw", "size": size, "ops_per_s": rate.round()}));
            Ok(())
        }
        Cmd::Dsm { nodes, transports, samples, time, json } => {
            dsm::run(&dsm::Plan { nodes, transports, samples, time: Duration::from_secs_f64(time), json })
        }
        Cmd::DsmNode { samples } => dsm::node(samples),
        Cmd::Migrate { sizes, touched, transports, sim_max, ops, json } => {
            if let Some(o) = ops.iter().find(|o| !["region", "process", "netram"].contains(&o.as_str())) {
                Err(format!("unknown op {o:?}: expected region, process or netram"))
            } else {
                migrate::run(&migrate::Plan { sizes, touched, transports, sim_max, ops, json })
            }
        }
        Cmd::ClusterSim { nodes, seconds, warm_up, join_over, link, json } => {
            let join_over = join_over.map(Duration::from_secs);
            cluster_sim::run(&nodes, seconds, Duration::from_secs(warm_up), join_over, &link, json)
        }
        Cmd::MigrateHold { size, pct } => migrate_process::hold(size, pct),
        Cmd::MigrateSource { size, pct, listen } => migrate::source(size, pct, &listen),
        Cmd::MigrateDest { link } => migrate::dest(link.as_deref()),
        Cmd::MigrateNetramSource { size, pct, listen, server } => migrate_netram::source(size, pct, &listen, &server),
        Cmd::MigrateNetramDest { size, pct } => migrate_netram::dest(size, pct),
        Cmd::ServeRam { uri, capacity } => serve::serve_ram(&uri, capacity),
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
