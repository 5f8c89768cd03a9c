//! The cluster as one machine: the node agent ([`Agent`], run as `mosaicd`), the home of a
//! migratable job ([`Home`], run inside `mosrun --migratable`), and what `mosctl` calls
//! ([`migrate_job`], [`job_where`]).
//!
//! A job started by `mosrun --migratable` runs at its home node under `mosrun`, with the
//! checkpoint handler of process migration installed. `mosctl migrate PID --to NODE` asks the
//! job's home to move it; the home asks the agent of the node where the job runs to stop it
//! and send it to NODE's agent, which rebuilds it and pulls its memory post-copy; standard
//! input, output and error stay with the home, which also learns the exit status. See
//! `mosaic_migrate::process` for how a process is stopped, captured and rebuilt.

use std::path::Path;
use std::time::Duration;

use mosaic_transport::{connect, ClusterKey, ConnectOptions, Connection};

pub mod agent;
mod balancer;
pub mod config;
pub mod gossip;
pub mod home;
pub mod info;
pub mod metrics;
pub mod policy;
pub mod tune;
mod usherer;
pub mod wire;

pub use agent::{Agent, AgentConfig, MIGRATE_SIGNAL};
pub use home::{job_file, run_dir, Home};
pub use wire::Moved;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A server could not start.
    #[error("{0}")]
    Start(String),
    /// No job with that pid has its home here.
    #[error("no migratable job with pid {pid} at this node (no {path}): was it started with `mosrun --migratable`?")]
    NoJob {
        /// The pid asked for.
        pid: u32,
        /// The job file looked for.
        path: String,
    },
    /// A node name that is neither an address nor in `MOSAIC_NODES`.
    #[error("unknown node {0:?}: give an address (tcp://HOST:PORT or HOST:PORT) or a name from MOSAIC_NODES (name=tcp://HOST:PORT,...)")]
    UnknownNode(String),
    /// The request failed.
    #[error("{0}")]
    Failed(String),
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The agent address of `node`: an address as it is (`tcp://HOST:PORT`, or `HOST:PORT` for
/// TCP), or a name looked up in `MOSAIC_NODES` (`name=tcp://HOST:PORT,...`).
pub fn resolve_node(node: &str) -> Result<String, ClusterError> {
    if node.contains("://") {
        return Ok(node.to_string());
    }
    if let Ok(map) = std::env::var("MOSAIC_NODES") {
        for entry in map.split(',') {
            if let Some((name, uri)) = entry.trim().split_once('=') {
                if name == node {
                    return resolve_node(uri);
                }
            }
        }
    }
    if node.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
        return Ok(format!("tcp://{node}"));
    }
    Err(ClusterError::UnknownNode(node.to_string()))
}

fn home_of(dir: &Path, pid: u32) -> Result<String, ClusterError> {
    let path = job_file(dir, pid);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|_| ClusterError::NoJob { pid, path: path.display().to_string() })
}

fn call_home(
    dir: &Path,
    pid: u32,
    key: &ClusterKey,
    method: u64,
    req: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClusterError> {
    let home = home_of(dir, pid)?;
    let mut o = ConnectOptions::new(key.clone());
    o.timeout = timeout;
    let c = connect(&home, &o)
        .map_err(|e| ClusterError::Failed(format!("the job's home {home}: {}", mosaic_transport::error_chain(&e))))?;
    c.call(method, req).map_err(|e| ClusterError::Failed(mosaic_transport::error_chain(&e)))
}

/// Moves the job whose pid at home is `pid` (its job file in `dir`) to `to` (see
/// [`resolve_node`]).
pub fn migrate_job(dir: &Path, pid: u32, to: &str, key: &ClusterKey) -> Result<Moved, ClusterError> {
    let mut e = wire::Enc::default();
    e.str(to);
    let a = call_home(dir, pid, key, wire::MIGRATE, &e.0, Duration::from_secs(180))?;
    Moved::decode(&a).map_err(ClusterError::Failed)
}

/// Locks the job whose pid at home is `pid` to the node it runs on (the balancer leaves it
/// there; `mosctl migrate` still moves it), or unlocks it.
pub fn lock_job(dir: &Path, pid: u32, locked: bool, key: &ClusterKey) -> Result<(), ClusterError> {
    call_home(dir, pid, key, wire::LOCK, &[u8::from(locked)], Duration::from_secs(5)).map(drop)
}

/// Asks the agent at `node` to move every migratable process running there to other nodes
/// (each to the least loaded with room); returns (moved, failed).
pub fn drain_node(node: &str, key: &ClusterKey) -> Result<(u32, u32), ClusterError> {
    let uri = resolve_node(node)?;
    let mut o = ConnectOptions::new(key.clone());
    o.timeout = Duration::from_secs(600);
    let c =
        connect(&uri, &o).map_err(|e| ClusterError::Failed(format!("{uri}: {}", mosaic_transport::error_chain(&e))))?;
    let a = c.call(wire::DRAIN, &[]).map_err(|e| ClusterError::Failed(mosaic_transport::error_chain(&e)))?;
    let mut d = wire::Dec(&a);
    (|| Ok::<_, String>((d.u32()?, d.u32()?)))().map_err(ClusterError::Failed)
}

/// This node's agent as the tools address it: `MOSAIC_AGENT`, or `tcp://127.0.0.1:7070`.
pub fn local_agent() -> String {
    std::env::var("MOSAIC_AGENT").unwrap_or_else(|_| "tcp://127.0.0.1:7070".into())
}

/// Connects to the agent (or home) at `uri` with `key`, calls waiting at most `timeout`; the
/// error names the address.
pub fn connect_agent(uri: &str, key: &ClusterKey, timeout: Duration) -> Result<Connection, String> {
    let mut o = ConnectOptions::new(key.clone());
    o.timeout = timeout;
    connect(uri, &o).map_err(|e| format!("{uri}: {}", mosaic_transport::error_chain(&e)))
}

/// What an agent says of itself (`wire::STATUS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// Its address.
    pub agent: String,
    /// Its memory server's address, if it has one.
    pub memory_server: Option<String>,
    /// Processes that moved in and run there.
    pub hosted: u32,
    /// Its memory server's capacity, in pages.
    pub capacity_pages: u64,
    /// Of it, pages holding data.
    pub used_pages: u64,
    /// Whether its memory server asks clients to move their pages elsewhere.
    pub ushering: bool,
    /// DSM jobs whose nodes are meeting there now (agent rendezvous); `None` from an agent
    /// that does not say.
    pub dsm_jobs_meeting: Option<u32>,
}

/// Asks the agent at `uri` what it is.
pub fn agent_status(uri: &str, key: &ClusterKey) -> Result<AgentStatus, String> {
    let c = connect_agent(uri, key, Duration::from_secs(5))?;
    let a = c.call(wire::STATUS, &[]).map_err(|e| format!("{uri}: {}", mosaic_transport::error_chain(&e)))?;
    let mut d = wire::Dec(&a);
    let (agent, memory, hosted) = (d.str()?, d.str()?, d.u32()?);
    Ok(AgentStatus {
        agent,
        memory_server: (!memory.is_empty()).then_some(memory),
        hosted,
        capacity_pages: d.u64()?,
        used_pages: d.u64()?,
        ushering: d.u8()? != 0,
        // An agent older than this count sends none.
        dsm_jobs_meeting: d.u32().ok(),
    })
}

/// The memory servers the cluster offers, as the local agent knows them ([`local_agent`]): its
/// own and those its gossip heard of, the ones with the most free memory first. Empty if no
/// agent answers (quickly: a node without one pays a refused connect).
pub fn memory_servers_nearby(key: &ClusterKey) -> Vec<String> {
    let Ok(uri) = resolve_node(&local_agent()) else { return Vec::new() };
    let mut o = ConnectOptions::new(key.clone());
    o.timeout = Duration::from_secs(2);
    o.connect_timeout = Duration::from_millis(500);
    let Ok(c) = connect(&uri, &o) else { return Vec::new() };
    let Ok(view) = gossip::ask_view(&c) else { return Vec::new() };
    let mut all: Vec<&info::LoadVector> =
        std::iter::once(&view.own).chain(&view.window).filter(|v| !v.memory_server.is_empty()).collect();
    all.sort_by_key(|v| std::cmp::Reverse(v.free_memory));
    all.into_iter().map(|v| v.memory_server.clone()).take(31).collect()
}

/// Where a job runs: (node, pid there, moves so far, command).
pub fn job_where(dir: &Path, pid: u32, key: &ClusterKey) -> Result<(String, u32, u32, String), ClusterError> {
    let a = call_home(dir, pid, key, wire::WHERE, &[], Duration::from_secs(5))?;
    let mut d = wire::Dec(&a);
    (|| Ok::<_, String>((d.str()?, d.u32()?, d.u32()?, d.str()?)))().map_err(ClusterError::Failed)
}
