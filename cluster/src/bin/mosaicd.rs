//! `mosaicd`: Mosaic's node agent, one per node: a memory server (network RAM) and the node's
//! migration endpoint (processes move in and out through it).
//!
//! ```text
//! mosaicd [--listen tcp://HOST:PORT] [--memory SIZE] [--memory-listen URI]
//! ```
//! The cluster key comes from `MOSAIC_CLUSTER_KEY` or `MOSAIC_CLUSTER_KEY_FILE`. It runs until
//! SIGINT or SIGTERM. Moving processes in needs root (pid namespaces, `clone3` with chosen ids).

use std::process::ExitCode;

use clap::Parser;
use mosaic_cluster::{Agent, AgentConfig};
use mosaic_netram::parse_size;
use mosaic_transport::ClusterKey;

#[derive(Parser)]
#[command(
    name = "mosaicd",
    version,
    about = "Mosaic's node agent: memory server and migration endpoint",
    long_about = "Mosaic's node agent, one per node. It serves network RAM (with --memory) and is the \
                  node's migration endpoint: `mosctl migrate` moves a job started by `mosrun \
                  --migratable` from the agent of the node it runs on to another's. The cluster key \
                  comes from MOSAIC_CLUSTER_KEY or MOSAIC_CLUSTER_KEY_FILE. Runs until SIGINT or \
                  SIGTERM. Set RUST_LOG=info to see each migration."
)]
struct Args {
    /// Where other agents and jobs' homes reach this one (not a wildcard address).
    #[arg(long, default_value = "tcp://127.0.0.1:7070")]
    listen: String,
    /// RAM to donate to network RAM (e.g. 4G; 0: no memory server).
    #[arg(long, default_value = "0")]
    memory: String,
    /// Where the memory server listens (default: this agent's host, any port).
    #[arg(long)]
    memory_listen: Option<String>,
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
    let memory = parse_size(&args.memory).map_err(|e| format!("--memory {}: {e}", args.memory))?;
    if let Some((host, _)) = args.listen.rsplit_once(':') {
        if host.ends_with("0.0.0.0") || host.ends_with("[::]") {
            return Err(format!(
                "--listen {}: a wildcard address cannot be reached; give the address other nodes use",
                args.listen
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
    let mut cfg = AgentConfig::new(&args.listen, key);
    cfg.memory = memory;
    cfg.memory_listen = args.memory_listen.clone();
    if let Some(r) = &args.restorer {
        cfg.restorer = (r.clone(), vec!["restore".into()]);
    }
    let agent = Agent::start(cfg).map_err(|e| e.to_string())?;
    match agent.memory_uri() {
        Some(m) => println!("mosaicd: listening at {} (memory server at {m})", agent.uri()),
        None => println!("mosaicd: listening at {}", agent.uri()),
    }
    let mut sig = 0;
    // SAFETY: waiting for one of the blocked signals.
    unsafe { libc::sigwait(&set, &mut sig) };
    eprintln!("mosaicd: stopping (signal {sig})");
    agent.shutdown();
    Ok(())
}
