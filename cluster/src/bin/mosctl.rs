//! `mosctl`: controls a Mosaic cluster.
//!
//! ```text
//! mosctl migrate PID --to NODE   move the job started by `mosrun --migratable` with pid PID here
//! mosctl ps                      the migratable jobs whose home is this node, and where they run
//! mosctl status NODE             what a node's agent is
//! ```
//! NODE is an agent's address (`tcp://HOST:PORT` or `HOST:PORT`) or a name from `MOSAIC_NODES`
//! (`name=tcp://HOST:PORT,...`). The cluster key comes from `MOSAIC_CLUSTER_KEY` or
//! `MOSAIC_CLUSTER_KEY_FILE`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mosaic_cluster::{job_where, migrate_job, resolve_node, run_dir, wire};
use mosaic_transport::{connect, ClusterKey, ConnectOptions};

#[derive(Parser)]
#[command(name = "mosctl", version, about = "Controls a Mosaic cluster: moves jobs, lists them, asks nodes")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Moves a running job (started by `mosrun --migratable`; PID is its pid at home) to NODE.
    Migrate {
        /// The job's pid at its home node.
        pid: u32,
        /// Where to: an agent's address or a name from MOSAIC_NODES.
        #[arg(long)]
        to: String,
    },
    /// Lists the migratable jobs whose home is this node.
    Ps,
    /// Asks a node's agent what it is.
    Status {
        /// An agent's address or a name from MOSAIC_NODES.
        node: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let key = ClusterKey::from_env().map_err(|e| format!("the cluster key: {e}"))?;
    let dir = run_dir();
    match args.cmd {
        Cmd::Migrate { pid, to } => {
            let m = migrate_job(&dir, pid, &to, &key).map_err(|e| e.to_string())?;
            println!(
                "job {pid} moved to {to}: pid {} there, {} thread(s), stopped {:.3} ms, image {} bytes, its pages with data among {} bytes of anonymous mappings follow",
                m.pid,
                m.threads,
                m.freeze_us as f64 / 1000.0,
                m.image_bytes,
                m.post_copy_bytes
            );
        }
        Cmd::Ps => {
            println!("{:>8}  {:<28} {:>8} {:>5}  COMMAND", "PID", "NODE", "PID THERE", "MOVES");
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(_) => return Ok(()),
            };
            let mut pids: Vec<u32> =
                rd.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("job-")?.parse().ok()).collect();
            pids.sort();
            for pid in pids {
                match job_where(&dir, pid, &key) {
                    Ok((node, there, moves, cmd)) => println!("{pid:>8}  {node:<28} {there:>8} {moves:>5}  {cmd}"),
                    Err(e) => println!("{pid:>8}  ({e})"),
                }
            }
        }
        Cmd::Status { node } => {
            let uri = resolve_node(&node).map_err(|e| e.to_string())?;
            let mut o = ConnectOptions::new(key);
            o.timeout = Duration::from_secs(5);
            let c = connect(&uri, &o).map_err(|e| format!("{uri}: {}", mosaic_transport::error_chain(&e)))?;
            let a = c.call(wire::STATUS, &[]).map_err(|e| mosaic_transport::error_chain(&e))?;
            let mut d = wire::Dec(&a);
            let (u, mem, hosted) = (d.str()?, d.str()?, d.u32()?);
            println!("agent {u}");
            println!("memory server {}", if mem.is_empty() { "none" } else { &mem });
            println!("processes moved in and running: {hosted}");
        }
    }
    Ok(())
}
