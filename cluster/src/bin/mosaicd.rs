//! `mosaicd`: Mosaic's node agent, one per node: a memory server (network RAM), the node's
//! migration endpoint (processes move in and out through it) and its part of the information
//! layer (membership and load, by gossip).
//!
//! ```text
//! mosaicd [--config FILE] [--listen tcp://HOST:PORT] [--memory SIZE] [--memory-listen URI]
//!         [--join URI]... [--slots N] [--speed N] [--no-gossip] [--balance [--min-residence S]]
//!         [--tune FILE] [--no-usher] [--metrics HOST:PORT]
//! ```
//! The cluster key comes from `MOSAIC_CLUSTER_KEY` or `MOSAIC_CLUSTER_KEY_FILE`. It runs until
//! SIGINT or SIGTERM. Moving processes in needs root (pid namespaces, `clone3` with chosen ids).
//! `cluster/mosaicd.service` runs it under systemd.

use std::process::ExitCode;

use clap::Parser;
use mosaic_cluster::config::FileConfig;
use mosaic_cluster::gossip::GossipSettings;
use mosaic_cluster::{Agent, AgentConfig};
use mosaic_netram::parse_size;
use mosaic_transport::ClusterKey;

#[derive(Parser)]
#[command(
    name = "mosaicd",
    version,
    about = "Mosaic's node agent: memory server, migration endpoint, DSM rendezvous, membership and load",
    long_about = "Mosaic's node agent, one per node. It serves network RAM (with --memory), is the \
                  node's migration endpoint (`mosctl migrate` moves a job started by `mosrun \
                  --migratable` from the agent of the node it runs on to another's), and gossips \
                  with the other agents: it joins through any member (--join), learns the others \
                  and their load, and finds dead ones (`mosctl nodes` shows what it knows). DSM \
                  jobs meet at it (MOSAIC_DSM_RENDEZVOUS=agent+tcp://HOST:PORT/JOB; `mosrun -n N \
                  --hosts` does so when this agent listens where the hosts reach it). The \
                  cluster key comes from MOSAIC_CLUSTER_KEY or MOSAIC_CLUSTER_KEY_FILE; an agent \
                  holding another key is never heard. Settings come from flags, or from a TOML file \
                  (--config; a flag given wins). Runs until SIGINT or SIGTERM. Set RUST_LOG=info \
                  to see migrations and nodes coming and going."
)]
struct Args {
    /// A TOML configuration file (keys: listen, memory, memory_listen, join, slots, speed,
    /// gossip, balance, tune, usher, metrics, and a `[nodes]` table of names and addresses).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Where other agents and jobs' homes reach this one (not a wildcard address) [default:
    /// tcp://127.0.0.1:7070].
    #[arg(long)]
    listen: Option<String>,
    /// RAM to donate to network RAM (e.g. 4G; 0: no memory server) [default: 0].
    #[arg(long)]
    memory: Option<String>,
    /// Where the memory server listens (default: this agent's host, any port).
    #[arg(long)]
    memory_listen: Option<String>,
    /// An agent to join the cluster through (repeat, or separate with commas; any member
    /// will do). None: this node starts a cluster, and others join it.
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
    /// Processes this node takes [default: its CPUs].
    #[arg(long)]
    slots: Option<u16>,
    /// This node's speed per CPU, 1,000 being a reference core [default: 1000].
    #[arg(long)]
    speed: Option<u32>,
    /// Do not take part in the information layer (no membership, no load).
    #[arg(long)]
    no_gossip: bool,
    /// Serve Prometheus metrics over HTTP at HOST:PORT (GET /metrics; port 0 picks one).
    #[arg(long)]
    metrics: Option<String>,
    /// Balance the load: move migratable processes running here (jobs of `mosrun --migratable`)
    /// to a node where they would run faster, when the gain beats the cost of moving.
    #[arg(long)]
    balance: bool,
    /// Do not usher memory. By default, while this node is short of memory (under 10% free,
    /// or memory pressure over 10%; a memory cgroup's limit counts as the node's memory) and
    /// another node has room, the memory server asks its clients to move their pages elsewhere,
    /// until 25% is free again.
    #[arg(long)]
    no_usher: bool,
    /// The figures `mosctl tune --out FILE` measured on this cluster: balancing weighs a move's
    /// gain against the migration cost there [default: 200 ms].
    #[arg(long)]
    tune: Option<std::path::PathBuf>,
    /// Least time a process stays on a node before balancing moves it again, in seconds.
    #[arg(long, default_value = "5")]
    min_residence: f64,
    /// The restorer program, run with the argument `restore` (default: this program). For
    /// installations that keep it elsewhere, and for tests of a restorer that fails.
    #[arg(long, hide = true)]
    restorer: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    // The restorer mode runs first, before anything starts a thread (it forks).
    if std::env::args().nth(1).as_deref() == Some("restore") {
        return ExitCode::from(mosaic_migrate::process::keeper_main());
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosaicd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let key = ClusterKey::from_env().map_err(|e| format!("the cluster key: {e}"))?;
    let file = match &args.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let listen = args.listen.clone().or(file.listen.clone()).unwrap_or_else(|| "tcp://127.0.0.1:7070".into());
    let memory_text = args.memory.clone().or(file.memory.clone()).unwrap_or_else(|| "0".into());
    let memory = parse_size(&memory_text).map_err(|e| format!("memory {memory_text}: {e}"))?;
    if let Some((host, _)) = listen.rsplit_once(':') {
        if host.ends_with("0.0.0.0") || host.ends_with("[::]") {
            return Err(format!(
                "listen {listen}: a wildcard address cannot be reached; give the address other nodes use"
            ));
        }
    }
    // Block the stop signals before any thread starts, so that only sigwait sees them.
    // SAFETY: sigprocmask/sigwait with sets built here.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mut cfg = AgentConfig::new(&listen, key);
    cfg.memory = memory;
    cfg.memory_listen = args.memory_listen.clone().or(file.memory_listen.clone());
    if let Some(r) = &args.restorer {
        cfg.restorer = (r.clone(), vec!["restore".into()]);
    }
    if !args.no_gossip && file.gossip != Some(false) {
        let join = if args.join.is_empty() { file.join_list() } else { args.join.clone() };
        // Names from MOSAIC_NODES and HOST:PORT become the addresses agents advertise.
        let join = join
            .iter()
            .map(|j| mosaic_cluster::resolve_node(j).map_err(|e| format!("--join {j}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut g = GossipSettings::new(join);
        if let Some(n) = args.slots.or(file.slots) {
            g.slots = n;
        }
        if let Some(n) = args.speed.or(file.speed) {
            g.speed = n.max(1);
        }
        cfg.gossip = Some(g);
        if args.balance || file.balance == Some(true) {
            if !args.min_residence.is_finite() || args.min_residence < 0.0 {
                return Err(format!("--min-residence {}: a number of seconds", args.min_residence));
            }
            let mut params = mosaic_cluster::policy::BalanceParams {
                min_residence: std::time::Duration::from_secs_f64(args.min_residence.clamp(0.0, 86_400.0)),
                ..Default::default()
            };
            if let Some(path) = args.tune.clone().or(file.tune.clone()) {
                let t = mosaic_cluster::tune::Tuning::read(&path)?;
                params.migration_cost = t.migration_cost();
                eprintln!(
                    "mosaicd: migration cost {:.1} ms (measured to {}, {})",
                    t.migration_cost_ms,
                    t.to,
                    path.display()
                );
            }
            cfg.balance = Some(params);
        }
        if args.no_usher || file.usher == Some(false) {
            cfg.usher = None;
        }
    } else if args.balance {
        return Err("--balance needs gossip (the load of the other nodes): drop --no-gossip".into());
    }
    if cfg.balance.is_none() && (args.tune.is_some() || file.tune.is_some()) {
        eprintln!("mosaicd: the tune file only matters with balancing (--balance): ignored");
    }
    cfg.metrics = args.metrics.clone().or(file.metrics.clone());
    let agent = Agent::start(cfg).map_err(|e| e.to_string())?;
    match agent.memory_uri() {
        Some(m) => println!("mosaicd: listening at {} (memory server at {m})", agent.uri()),
        None => println!("mosaicd: listening at {}", agent.uri()),
    }
    if let Some(m) = agent.metrics_url() {
        println!("mosaicd: metrics at {m}");
    }
    // The lines above are read by scripts and tests as they come.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let mut sig = 0;
    // SAFETY: waiting for one of the blocked signals.
    unsafe { libc::sigwait(&set, &mut sig) };
    eprintln!("mosaicd: stopping (signal {sig})");
    agent.shutdown();
    Ok(())
}
