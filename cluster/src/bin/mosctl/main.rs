//! `mosctl`: controls a Mosaic cluster.
//!
//! ```text
//! mosctl migrate PID --to NODE   move the job started by `mosrun --migratable` with pid PID here
//! mosctl ps [--json]             the migratable jobs whose home is this node, and where they run
//! mosctl status NODE [--json]    what a node's agent is: its memory server, what it holds, the
//!                                DSM jobs meeting there
//! mosctl nodes [--node NODE] [--json]
//!                                the cluster as a node's agent knows it: members, their load
//! mosctl lock PID | unlock PID   keep a job where it runs (the balancer leaves it), or not
//! mosctl drain NODE              move every migratable process of NODE to other nodes
//! mosctl tune [--to NODE] [--out FILE]
//!                                measure what moving costs here; the file is `mosaicd --tune`'s
//! ```
//! NODE is an agent's address (`tcp://HOST:PORT` or `HOST:PORT`) or a name from `MOSAIC_NODES`
//! (`name=tcp://HOST:PORT,...`). The cluster key comes from `MOSAIC_CLUSTER_KEY` or
//! `MOSAIC_CLUSTER_KEY_FILE`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mosaic_cluster::gossip::ClusterView;
use mosaic_cluster::info::LoadVector;
use mosaic_cluster::{
    agent_status, connect_agent, drain_node, job_where, local_agent, lock_job, migrate_job, resolve_node, run_dir,
};
use mosaic_transport::ClusterKey;

mod tune;

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
    /// Lists the migratable jobs whose home is this node, and where each runs.
    Ps {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Asks a node's agent what it is: its memory server (capacity, pages held, whether it
    /// asks for them to go elsewhere), the processes that moved in and the DSM jobs meeting
    /// there.
    Status {
        /// An agent's address or a name from MOSAIC_NODES.
        node: String,
        /// One JSON object instead of lines of text.
        #[arg(long)]
        json: bool,
    },
    /// Locks a job (started by `mosrun --migratable`; PID is its pid at home) to the node it runs
    /// on: load balancing leaves it there (`mosctl migrate` still moves it).
    Lock {
        /// The job's pid at its home node.
        pid: u32,
    },
    /// Unlocks a job locked with `mosctl lock`.
    Unlock {
        /// The job's pid at its home node.
        pid: u32,
    },
    /// Moves every migratable process running at NODE to other nodes (each to the least loaded
    /// with room, as NODE's agent knows them), e.g. before maintenance.
    Drain {
        /// An agent's address or a name from MOSAIC_NODES.
        node: String,
    },
    /// The cluster as a node's agent knows it: its members and the freshest load it holds of
    /// each (CPU load per core, free memory, memory pressure, free slots, age of the figure).
    Nodes {
        /// The agent to ask: an address or a name from MOSAIC_NODES [default: MOSAIC_AGENT, or
        /// tcp://127.0.0.1:7070].
        #[arg(long)]
        node: Option<String>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measures what moving work and memory costs between this node and another (round trip,
    /// bandwidth, a remote page fault, and the freeze of a probe process moved there), and
    /// writes the figures the balancer uses (`mosaicd --tune FILE`).
    Tune {
        /// The node to measure to: an address or a name from MOSAIC_NODES [default: the first
        /// other node this node's agent knows].
        #[arg(long)]
        to: Option<String>,
        /// This node's agent [default: MOSAIC_AGENT, or tcp://127.0.0.1:7070].
        #[arg(long)]
        node: Option<String>,
        /// Write the figures (TOML) to FILE [default: print them].
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Do not move a probe process (moving one needs root and mosrun); the freeze time is
        /// then estimated from the round trip.
        #[arg(long)]
        no_probe: bool,
        /// JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// The probe `mosctl tune` moves (run under mosrun).
    #[command(hide = true)]
    TuneProbe {
        /// MiB it holds.
        mib: u64,
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
    if let Cmd::TuneProbe { mib } = args.cmd {
        return tune::probe_main(mib);
    }
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
        Cmd::Ps { json } => {
            if !json {
                println!("{:>8}  {:<28} {:>8} {:>5}  COMMAND", "PID", "NODE", "PID THERE", "MOVES");
            }
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(_) => return Ok(()),
            };
            let mut pids: Vec<u32> =
                rd.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("job-")?.parse().ok()).collect();
            pids.sort();
            for pid in pids {
                match (job_where(&dir, pid, &key), json) {
                    (Ok((node, there, moves, cmd)), false) => {
                        println!("{pid:>8}  {node:<28} {there:>8} {moves:>5}  {cmd}");
                    }
                    (Err(e), false) => println!("{pid:>8}  ({e})"),
                    (Ok((node, there, moves, cmd)), true) => println!(
                        "{}",
                        serde_json::json!({"pid": pid, "node": node, "pid_there": there, "moves": moves, "command": cmd})
                    ),
                    (Err(e), true) => println!("{}", serde_json::json!({"pid": pid, "error": e.to_string()})),
                }
            }
        }
        Cmd::Status { node, json } => {
            let uri = resolve_node(&node).map_err(|e| e.to_string())?;
            let s = agent_status(&uri, &key)?;
            let (capacity, used) = (s.capacity_pages, s.used_pages);
            if json {
                let memory = s.memory_server.as_ref().map(|mem| {
                    serde_json::json!({"uri": mem, "capacity_bytes": capacity * 4096, "used_bytes": used * 4096,
                        "ushering": s.ushering})
                });
                println!(
                    "{}",
                    serde_json::json!({"agent": s.agent, "memory_server": memory, "hosted": s.hosted,
                        "dsm_jobs_meeting": s.dsm_jobs_meeting})
                );
                return Ok(());
            }
            println!("agent {}", s.agent);
            match &s.memory_server {
                None => println!("memory server: none"),
                Some(mem) => {
                    println!("memory server {mem}: {} of {} MiB holding pages", used >> 8, capacity >> 8);
                    if s.ushering {
                        println!("  short of memory: asking its clients to move their pages elsewhere");
                    }
                }
            }
            println!("processes moved in and running: {}", s.hosted);
            match s.dsm_jobs_meeting {
                Some(n) => println!("DSM jobs meeting here now: {n}"),
                None => println!("DSM jobs meeting here now: unknown (an agent older than this count)"),
            }
        }
        Cmd::Lock { pid } => {
            lock_job(&dir, pid, true, &key).map_err(|e| e.to_string())?;
            println!("job {pid} locked to its node");
        }
        Cmd::Unlock { pid } => {
            lock_job(&dir, pid, false, &key).map_err(|e| e.to_string())?;
            println!("job {pid} unlocked");
        }
        Cmd::Drain { node } => {
            eprintln!("draining {node}: moving its migratable processes away...");
            let (moved, failed) = drain_node(&node, &key).map_err(|e| e.to_string())?;
            println!("{node} drained: {moved} process(es) moved, {failed} could not move");
            if failed > 0 {
                return Err(format!("{failed} process(es) stayed at {node} (see its agent's log)"));
            }
        }
        Cmd::Nodes { node, json } => {
            let uri = resolve_node(&node.unwrap_or_else(local_agent)).map_err(|e| e.to_string())?;
            let c = connect_agent(&uri, &key, Duration::from_secs(5))?;
            let view = mosaic_cluster::gossip::ask_view(&c)?;
            if json {
                println!("{}", view_json(&view));
            } else {
                print_view(&view);
            }
        }
        Cmd::Tune { to, node, out, no_probe, json } => {
            tune::run(tune::TuneArgs { node, to, out, no_probe, json }, &key)?;
        }
        Cmd::TuneProbe { .. } => {}
    }
    Ok(())
}

fn vector_json(v: &LoadVector) -> serde_json::Value {
    serde_json::json!({
        "node": v.node,
        "load": f64::from(v.load) / 100.0,
        "cpus": v.cpus,
        "speed": v.speed,
        "busy_pct": f64::from(v.busy) / 100.0,
        "free_memory": v.free_memory,
        "total_memory": v.total_memory,
        "pressure_pct": f64::from(v.pressure) / 100.0,
        "free_slots": v.free_slots,
        "age_ms": u64::try_from(v.age.as_millis()).unwrap_or(u64::MAX),
        "memory_server": v.memory_server,
    })
}

fn view_json(v: &ClusterView) -> String {
    serde_json::json!({
        "self": vector_json(&v.own),
        "members": v.members,
        "load": v.window.iter().map(vector_json).collect::<Vec<_>>(),
    })
    .to_string()
}

fn print_view(v: &ClusterView) {
    println!(
        "{:<28} {:>6} {:>5} {:>6} {:>10} {:>10} {:>8} {:>5} {:>8}",
        "NODE", "LOAD", "CPUS", "BUSY%", "FREE MEM", "TOTAL", "PRESS%", "SLOTS", "AGE"
    );
    let row = |v: &LoadVector, age: &str| {
        println!(
            "{:<28} {:>6.2} {:>5} {:>6.1} {:>9.1}G {:>9.1}G {:>8.2} {:>5} {:>8}",
            v.node,
            f64::from(v.load) / 100.0,
            v.cpus,
            f64::from(v.busy) / 100.0,
            v.free_memory as f64 / f64::from(1u32 << 30),
            v.total_memory as f64 / f64::from(1u32 << 30),
            f64::from(v.pressure) / 100.0,
            v.free_slots,
            age
        );
    };
    row(&v.own, "(self)");
    for m in &v.members {
        match v.window.iter().find(|w| &w.node == m) {
            Some(w) => row(w, &format!("{:.1}s", w.age.as_secs_f64())),
            None => println!("{m:<28} (no load heard yet)"),
        }
    }
}
