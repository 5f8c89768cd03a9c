//! `mosrun`: runs an unmodified program with its memory on Mosaic network RAM.
//!
//! ```text
//! mosrun [--servers URI,...] [--local-budget SIZE] [--threshold SIZE] [--large-only] -- PROGRAM [ARGS...]
//! ```
//! It checks that every server answers with the cluster key, then runs PROGRAM with
//! `libmosaic_preload.so` preloaded and configured through the environment. Without `--servers`
//! it starts a memory server on loopback inside its own process for the duration of the run.
//! It exits with the program's status (128 + N if the program died of signal N).
//!
//! ```text
//! mosrun -n N PROGRAM [ARGS...]
//! ```
//! runs N copies of PROGRAM as the nodes of a DSM job on this host instead (see `mosaic-dsm`);
//! with `--hosts A,B,...` on those hosts, started by `--launcher` (`ssh` by default).
//!
//! ```text
//! mosrun --migratable [--node URI] [--place] PROGRAM [ARGS...]
//! ```
//! runs PROGRAM so that `mosctl migrate PID --to NODE` can move it to another node while it runs
//! (see `mosaic-cluster`); mosrun stays its home. With `--place` it starts where the agent's
//! view finds room (here if this node is the least loaded; else one of the nodes about as
//! idle, at random by spare capacity: started here, then moved there at once).

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::Parser;

mod dsm_job;
mod migratable;
use mosaic_netram::{parse_size, proto, MemServer, MemServerConfig, MIN_BUDGET_PAGES, PAGE_SIZE};
use mosaic_transport::{connect, ClusterKey, ConnectOptions};

#[derive(Parser)]
#[command(
    name = "mosrun",
    version,
    about = "Runs a program with its memory on Mosaic network RAM",
    long_about = "Runs PROGRAM unmodified, with its heap placed on network RAM (memory servers), \
                  within --local-budget of local RAM for the program's anonymous memory. \
                  Allocations of at least --threshold bytes (and anonymous mmaps that large) take \
                  whole pages of the network-RAM region; smaller ones come from an allocator \
                  (mimalloc) whose only memory is the region too. What stays outside (thread \
                  stacks, memory allocated before the program's main, small mmaps, Mosaic's own \
                  buffers) counts against the budget, and the region gets the rest (never less \
                  than a quarter of the budget). Sizes are written like 512M, 2G or 1GiB. The cluster key comes from \
                  MOSAIC_CLUSTER_KEY or MOSAIC_CLUSTER_KEY_FILE; without servers and without a \
                  key, mosrun starts a memory server on loopback with a fresh random key.\n\n\
                  The budget is one for the whole job: the program and every process it forks or \
                  runs share it. A forked child sees the parent's memory as of the fork, with its \
                  own writes private (the servers keep a copy-on-write clone). Programs that hand \
                  large buffers to system calls work (faults are served by worker threads).\n\n\
                  With -n N, mosrun instead runs N copies of PROGRAM on this host as the nodes of \
                  a DSM job (programs built on mosaic-dsm or the mosaic_dsm_* C calls): each gets \
                  MOSAIC_DSM_RANK (0 to N-1), MOSAIC_DSM_SIZE and MOSAIC_DSM_RENDEZVOUS (a fresh \
                  directory where the nodes find each other), and the cluster key (a fresh one \
                  unless MOSAIC_CLUSTER_KEY or MOSAIC_CLUSTER_KEY_FILE is set). If a node fails, \
                  the others are stopped and mosrun exits with the failed node's status.\n\n\
                  With -n N --hosts A,B,... the nodes run on those hosts by turns, started through \
                  --launcher (ssh by default), and meet at the local node agent (mosaicd) if it \
                  runs with the cluster key of the environment, else at a rendezvous mosrun \
                  serves (--rendezvous chooses); each listens \
                  on its host's address (MOSAIC_DSM_LISTEN). The key goes to them as a file's path \
                  (MOSAIC_CLUSTER_KEY_FILE, or a fresh key written to a file readable by you \
                  alone under the temporary directory: the hosts must see it at the same path, \
                  as on a shared file system, or set MOSAIC_CLUSTER_KEY_FILE to a key file every \
                  host has).\n\n\
                  With --migratable, PROGRAM runs here under this node's agent (mosaicd, --node) \
                  with the checkpoint handler of process migration and no network RAM; `mosctl \
                  migrate PID --to NODE` moves it, while it runs, to another node, and back; its \
                  standard streams stay with mosrun, which exits with its status."
)]
struct Cli {
    /// Memory servers, comma-separated (tcp://HOST:PORT, shm://NAME). Default: those the local
    /// node agent (mosaicd at MOSAIC_AGENT, or tcp://127.0.0.1:7070) knows, if one runs; else start one on
    /// loopback for this run. With -n: where the nodes' pages beyond --local-budget go.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// Local RAM for the program's anonymous memory (its large allocations get what the rest
    /// leaves, at least a quarter): one budget for the program and all the processes it starts
    /// [default: 1G]. With -n: the most of the shared region each node keeps mapped, the rest
    /// going to the memory servers (--servers, or one mosrun starts).
    #[arg(long, value_parser = parse_size)]
    local_budget: Option<u64>,
    /// Smallest allocation given whole pages of the region; smaller ones share pages.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    threshold: u64,
    /// Keep allocations below --threshold in glibc's heap, outside network RAM (as before
    /// Mosaic placed small allocations; the region is then made at the first large one).
    #[arg(long)]
    large_only: bool,
    /// Address space reserved for the region (a quarter of it holds the small allocations).
    #[arg(long, default_value = "16G", value_parser = parse_size)]
    size: u64,
    /// Copies of each page on distinct servers (default: 2 with two or more servers, else 1).
    #[arg(long)]
    copies: Option<usize>,
    /// RAM the embedded loopback server may hold (when no --servers are given).
    #[arg(long, default_value = "32G", value_parser = parse_size)]
    server_capacity: u64,
    /// Where libmosaic_preload.so is (default: $MOSAIC_PRELOAD_LIB, else beside mosrun, else
    /// ../lib from it).
    #[arg(long)]
    preload: Option<PathBuf>,
    /// Say what is being set up.
    #[arg(long, short)]
    verbose: bool,
    /// When each process of the job exits, print its network-RAM counters on standard error:
    /// faults, pages fetched, zero-filled, served from the local cache, prefetched, evicted,
    /// written back, faults that waited for room (sets MOSAIC_STATS=1).
    #[arg(long)]
    stats: bool,
    /// Run N copies of PROGRAM as the nodes of a DSM job, on this host or on --hosts (of the
    /// options above, only --servers, --local-budget, --copies and --server-capacity apply:
    /// network RAM behind the shared region when --servers or --local-budget is given).
    #[arg(long = "nodes", short = 'n', value_name = "N")]
    nodes: Option<u16>,
    /// With -n: run the nodes on these hosts instead of this one, node i on host i mod H. Each is
    /// NAME (resolved) or NAME=ADDRESS: the launcher gets NAME, the nodes there listen on
    /// ADDRESS. PROGRAM must be at the same path on every host.
    #[arg(long, value_delimiter = ',', requires = "nodes", value_name = "HOST[=ADDRESS]")]
    hosts: Vec<String>,
    /// With --hosts: how to run a command on a host, {host} standing for its name; the node's
    /// settings follow as `env NAME=VALUE... PROGRAM ARGS` [default: "ssh -o BatchMode=yes {host}"]
    #[arg(long, requires = "hosts", value_name = "COMMAND")]
    launcher: Option<String>,
    /// With --hosts: the address of this machine the hosts reach mosrun's rendezvous by
    /// (default: the one packets to the first host leave from).
    #[arg(long, requires = "hosts", value_name = "ADDRESS")]
    rendezvous_address: Option<String>,
    /// With -n: where the nodes meet. auto: with --hosts, the local node agent (mosaicd at
    /// MOSAIC_AGENT, or tcp://127.0.0.1:7070) when one runs, holds the cluster key of the
    /// environment and listens where the hosts reach it, else a rendezvous mosrun serves; on this
    /// host, a fresh directory. agent: the local node agent, or fail saying why. mosrun: mosrun's
    /// own (a server with --hosts, a directory on this host).
    #[arg(long, requires = "nodes", value_enum, default_value_t = dsm_job::Meet::Auto, value_name = "WHERE")]
    rendezvous: dsm_job::Meet,
    /// Run PROGRAM so that it can move to other nodes while it runs (`mosctl migrate PID --to
    /// NODE`), without network RAM: mosrun stays its home (output, input, exit status). Needs a
    /// node agent (mosaicd) here and the cluster key in the environment.
    #[arg(long, conflicts_with_all = ["nodes", "servers", "local_budget", "stats"])]
    migratable: bool,
    /// With --migratable: this node's agent [default: $MOSAIC_NODE, else tcp://127.0.0.1:7070].
    #[arg(long, requires = "migratable", value_name = "URI")]
    node: Option<String>,
    /// With --migratable: the address the job's home listens on, which the nodes it moves to
    /// reach.
    #[arg(long, requires = "migratable", default_value = "127.0.0.1", value_name = "ADDRESS")]
    home_address: String,
    /// With --migratable: start the job where this node's agent sees room: here when this node
    /// is the least loaded with a free slot, else one of the nodes where it would run about as
    /// fast as at the best, at random by spare capacity (it starts here, its home, and moves
    /// there at once; it stays here when the move fails).
    #[arg(long, requires = "migratable")]
    place: bool,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    program: Vec<String>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mosrun: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--local-budget` when not given (network RAM).
const DEFAULT_BUDGET: u64 = 1 << 30;

fn find_preload(cli: &Cli) -> Result<PathBuf, String> {
    if let Some(p) = cli.preload.clone().or_else(|| std::env::var_os("MOSAIC_PRELOAD_LIB").map(PathBuf::from)) {
        return if p.is_file() { Ok(p) } else { Err(format!("{}: no such file", p.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let dir = exe.parent().ok_or("mosrun has no directory")?;
    let candidates = [dir.join("libmosaic_preload.so"), dir.join("../lib/libmosaic_preload.so")];
    candidates.iter().find(|c| c.is_file()).cloned().ok_or_else(|| {
        format!(
            "cannot find libmosaic_preload.so beside {} or in ../lib (build it with `cargo build --release -p mosaic-preload`, or pass --preload)",
            exe.display()
        )
    })
}

/// The memory servers of the run: `--servers`, or one started here on `host` (kept running as
/// long as the returned server lives) with `key`.
fn servers_or_one_of_ours(cli: &Cli, key: &ClusterKey, host: &str) -> Result<(Vec<String>, Option<MemServer>), String> {
    if !cli.servers.is_empty() {
        return Ok((cli.servers.clone(), None));
    }
    // A node agent (mosaicd) here knows the cluster's memory servers.
    if std::env::var_os("MOSAIC_CLUSTER_KEY").is_some() || std::env::var_os("MOSAIC_CLUSTER_KEY_FILE").is_some() {
        let found = mosaic_cluster::memory_servers_nearby(key);
        if !found.is_empty() {
            if cli.verbose {
                eprintln!("mosrun: memory servers from the local agent: {}", found.join(", "));
            }
            return Ok((found, None));
        }
    }
    let s = MemServer::start(&format!("tcp://{host}:0"), MemServerConfig::new(cli.server_capacity, key.clone()))
        .map_err(|e| format!("cannot start a memory server on {host}: {}", mosaic_transport::error_chain(&e)))?;
    if cli.verbose {
        eprintln!("mosrun: started a memory server at {} (up to {} MiB)", s.uri(), cli.server_capacity >> 20);
    }
    Ok((vec![s.uri().to_string()], Some(s)))
}

/// Connects to `uri`, opens and closes a session: the server answers and shares our key.
fn check_server(uri: &str, key: &ClusterKey) -> Result<(), String> {
    let conn = connect(uri, &ConnectOptions::new(key.clone()).timeout(std::time::Duration::from_secs(5)))
        .map_err(|e| format!("memory server {uri} cannot be reached: {}", mosaic_transport::error_chain(&e)))?;
    let mut id = [0u8; 16 + proto::SECRET_LEN];
    getrandom::fill(&mut id).map_err(|e| e.to_string())?;
    let (id, secret) = id.split_at(16);
    let id: proto::ClientId = id.try_into().map_err(|_| "client id".to_string())?;
    conn.call(proto::OPEN, &proto::encode_open(&id, 1000, secret.try_into().map_err(|_| "secret".to_string())?))
        .map_err(|e| format!("memory server {uri} refused a session: {}", mosaic_transport::error_chain(&e)))?;
    let _ = conn.call(proto::CLOSE, &id);
    Ok(())
}

fn run(cli: &Cli) -> Result<ExitCode, String> {
    if let Some(n) = cli.nodes {
        return dsm_job::run(cli, n);
    }
    if cli.migratable {
        return migratable::run(cli);
    }
    let local_budget = cli.local_budget.unwrap_or(DEFAULT_BUDGET);
    let min_budget = MIN_BUDGET_PAGES * PAGE_SIZE as u64;
    if local_budget < min_budget {
        return Err(format!("--local-budget {} is impossible: the least is {} KiB", local_budget, min_budget / 1024));
    }
    if cli.threshold < PAGE_SIZE as u64 {
        return Err(format!("--threshold must be at least one page ({PAGE_SIZE} bytes)"));
    }
    if cli.size < local_budget {
        return Err("--size must be at least --local-budget".into());
    }
    let preload = find_preload(cli)?;
    // The key: the environment's, or a fresh one handed to the program and the embedded server.
    let (key, key_text) = match ClusterKey::from_env() {
        Ok(k) => (k, None),
        Err(_) if cli.servers.is_empty() => {
            let text = ClusterKey::random_text().map_err(|e| e.to_string())?;
            (ClusterKey::from_bytes(text.as_bytes()).map_err(|e| e.to_string())?, Some(text))
        }
        Err(e) => return Err(format!("{e} (needed to talk to --servers)")),
    };
    let (servers, embedded) = servers_or_one_of_ours(cli, &key, "127.0.0.1")?;
    for s in &servers {
        check_server(s, &key)?;
    }
    if let Some(c) = cli.copies {
        if c == 0 || c > servers.len() {
            return Err(format!("--copies {c} needs at least {c} servers, got {}", servers.len()));
        }
    }
    let mut preloads = preload.display().to_string();
    if let Ok(old) = std::env::var("LD_PRELOAD") {
        if !old.is_empty() {
            preloads = format!("{preloads}:{old}");
        }
    }
    if cli.verbose {
        eprintln!(
            "mosrun: {} with allocations of {} bytes or more on {} (local budget {} MiB)",
            cli.program[0],
            cli.threshold,
            servers.join(","),
            local_budget >> 20
        );
    }
    // One budget for the job: a page of shared memory every process of it publishes in.
    let (_budget, budget_fd) = mosaic_netram::SharedBudget::create(local_budget)
        .map_err(|e| format!("cannot set up the job's shared budget: {}", mosaic_transport::error_chain(&e)))?;
    // SAFETY: clearing close-on-exec on our own descriptor, so the program inherits it.
    if unsafe { libc::fcntl(budget_fd.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(format!("cannot hand the shared budget to the program: {}", std::io::Error::last_os_error()));
    }
    let mut cmd = Command::new(&cli.program[0]);
    cmd.args(&cli.program[1..])
        .env("LD_PRELOAD", preloads)
        .env("MOSAIC_SERVERS", servers.join(","))
        .env("MOSAIC_LOCAL_BUDGET", local_budget.to_string())
        .env("MOSAIC_THRESHOLD", cli.threshold.to_string())
        .env("MOSAIC_NETRAM_SIZE", cli.size.to_string())
        .env("MOSAIC_BUDGET_FD", budget_fd.as_raw_fd().to_string());
    if cli.stats {
        cmd.env("MOSAIC_STATS", "1");
    }
    if cli.large_only {
        cmd.env("MOSAIC_SMALL", "0");
    }
    if let Some(c) = cli.copies {
        cmd.env("MOSAIC_COPIES", c.to_string());
    }
    if let Some(text) = key_text {
        cmd.env(mosaic_transport::KEY_ENV, text).env_remove(mosaic_transport::KEY_FILE_ENV);
    }
    let status = cmd.status().map_err(|e| format!("cannot run {}: {e}", cli.program[0]))?;
    drop(embedded);
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(sig)) => {
            eprintln!("mosrun: {} died of signal {sig}", cli.program[0]);
            ExitCode::from(u8::try_from(128 + sig).unwrap_or(255))
        }
        _ => ExitCode::FAILURE,
    })
}
