//! The node agent (`mosaicd`): a memory server, the migration endpoint of its node and a
//! rendezvous for DSM jobs (nodes of a job meet at `agent+tcp://HOST:PORT/JOB`, see
//! [`mosaic_dsm::rendezvous`]).
//!
//! As a **source** it stops a process of its node on its home's request (`MIGRATE_OUT`), sends
//! the image to the destination's agent and, once the process runs there, keeps the stopped copy
//! only to answer for its pages (`PAGES`) until the destination has them all (`DONE`), then
//! kills it. If the destination fails or cannot be reached, the process runs on where it was.
//!
//! As a **destination** it rebuilds the process (`MIGRATE_IN`, through the restorer: this
//! program run again as `mosaicd restore`), serves its faults and streams the rest of its pages
//! from the source, relays its standard input, output and error to and from the job's home
//! (`mosrun`), and tells the home its exit status.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mosaic_dsm::JobBooks;
use mosaic_migrate::process::{
    check_movable, stop, FetchPages, Got, PostCopy, PostCopyStats, ProcessImage, Remains, Restorer, SourcePages,
};
use mosaic_netram::{MemServer, MemServerConfig};
use mosaic_pager::ForeignUffd;
use mosaic_transport::{
    connect, listen, Caller, ClusterKey, ConnectOptions, Connection, Server, ServerConfig, Service, ServiceError,
    Status,
};

use crate::wire::{self, bad, failed, Dec, Enc, Moved};
use crate::ClusterError;

/// The checkpoint signal `mosrun --migratable` gives its programs' handler.
pub const MIGRATE_SIGNAL: i32 = mosaic_migrate::process::shim::DEFAULT_SIGNAL;

/// Largest message the agent takes (a process image with its written file pages).
const MAX_FRAME: u32 = 64 << 20;

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where it listens (`tcp://HOST:PORT`): other agents and homes reach it there, so not a
    /// wildcard address.
    pub listen: String,
    /// The cluster key.
    pub key: ClusterKey,
    /// RAM donated to network RAM, bytes (0: no memory server).
    pub memory: u64,
    /// Where the memory server listens (default: the agent's host, any port).
    pub memory_listen: Option<String>,
    /// The restorer: a program and arguments that run [`mosaic_migrate::process::keeper_main`]
    /// (default: this program with `restore`).
    pub restorer: (PathBuf, Vec<String>),
    /// How long the threads of a process have to stop.
    pub stop_timeout: Duration,
    /// The address other agents are told to reach this one by, if not the one it listens at
    /// (a `sim://LINK@...` address puts a simulated link on the pages a destination pulls).
    pub advertise: Option<String>,
    /// The information layer: membership and load (`None`: off, the agent knows no other).
    pub gossip: Option<crate::gossip::GossipSettings>,
    /// Where to serve Prometheus metrics over HTTP (`HOST:PORT`; `None`: nowhere).
    pub metrics: Option<String>,
    /// Balance the load: move processes running here to lighter nodes as the policy decides
    /// (`None`: off; needs `gossip`).
    pub balance: Option<crate::policy::BalanceParams>,
    /// Usher memory: while this node is short of it, ask the memory server's clients to move
    /// their pages elsewhere (`None`: never; acts only with a memory server and `gossip`).
    pub usher: Option<crate::policy::UsherParams>,
}

impl AgentConfig {
    /// Defaults: no memory server, this program as its own restorer.
    pub fn new(listen: &str, key: ClusterKey) -> AgentConfig {
        AgentConfig {
            listen: listen.to_string(),
            key,
            memory: 0,
            memory_listen: None,
            restorer: (std::env::current_exe().unwrap_or_else(|_| PathBuf::from("mosaicd")), vec!["restore".into()]),
            stop_timeout: Duration::from_secs(5),
            advertise: None,
            gossip: None,
            metrics: None,
            balance: None,
            usher: Some(crate::policy::UsherParams::default()),
        }
    }
}

/// A process that moved away, while its pages are still wanted.
struct Away {
    pages: Arc<SourcePages>,
    remains: Option<Remains>,
}

/// A process that moved here.
struct Hosted {
    comm: String,
    /// Its home (`mosrun --migratable`), which moves it on when asked.
    home: String,
    /// Its pages are still coming: it cannot move on yet.
    arriving: bool,
    /// When the last of its pages came, and what post-copy did.
    arrived: Option<(Instant, PostCopyStats)>,
    /// It moved on: its end here is not its end.
    gone: bool,
    /// Its output on its way to its home.
    relay: Arc<Relay>,
}

/// The output relays of a hosted process: their pipes, and output read but not yet delivered.
#[derive(Default)]
struct Relay {
    pipes: Mutex<Vec<std::os::fd::RawFd>>,
    in_flight: std::sync::atomic::AtomicUsize,
    /// The process's standard input (written by the input relay).
    stdin: Mutex<Option<std::process::ChildStdin>>,
    /// The input relay asks its home for nothing more (the process is moving on).
    input_paused: std::sync::atomic::AtomicBool,
    /// The input relay is waiting for its home's answer.
    input_busy: std::sync::atomic::AtomicBool,
}

impl Relay {
    /// Waits (at most `timeout`) until everything the process wrote reached its home: for a
    /// process that is stopped and about to move, so its output keeps its order.
    fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let unread: i32 = crate::lock(&self.pipes)
                .iter()
                .map(|&fd| {
                    let mut n: libc::c_int = 0;
                    // SAFETY: FIONREAD on a pipe of ours (a closed one answers an error, counted 0).
                    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
                    n.max(0)
                })
                .sum();
            if unread == 0 && self.in_flight.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the input relay asking its home, once its call in flight (if any) has delivered.
    fn pause_input(&self, timeout: Duration) {
        use std::sync::atomic::Ordering;
        self.input_paused.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        while self.input_busy.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Gives back input taken from the process, and lets the relay ask its home again.
    fn resume_input(&self, unread: &[u8]) {
        use std::io::Write;
        if !unread.is_empty() {
            if let Some(w) = crate::lock(&self.stdin).as_mut() {
                if let Err(e) = w.write_all(unread) {
                    log::error!("{} bytes of standard input could not be given back: {e}", unread.len());
                }
            }
        }
        self.input_paused.store(false, std::sync::atomic::Ordering::Release);
    }
}

struct State {
    cfg: AgentConfig,
    uri: OnceLock<String>,
    memory_uri: String,
    /// The memory server, if it has one.
    memory: Option<MemServer>,
    away: Mutex<HashMap<u64, Away>>,
    hosted: Mutex<HashMap<u32, Hosted>>,
    arrived: std::sync::Condvar,
    gossip: OnceLock<crate::gossip::Gossiper>,
    /// The books of the DSM jobs meeting here (`agent+tcp://...` rendezvous).
    books: JobBooks,
}

impl State {
    /// Processes that moved in and run here.
    fn hosted_count(&self) -> usize {
        crate::lock(&self.hosted).values().filter(|h| !h.gone).count()
    }
}

/// A running agent. Stops when dropped (processes it hosts keep running; their pages keep
/// coming only while it runs).
pub struct Agent {
    server: Option<Server>,
    state: Arc<State>,
    /// The balancing thread and its stop flag.
    balancer: Option<(Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>)>,
    /// The memory-ushering thread and its stop flag.
    usherer: Option<(Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>)>,
    /// The metrics endpoint: its address, thread and stop flag.
    metrics: Option<(String, Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("uri", &self.uri()).field("memory", &self.state.memory_uri).finish()
    }
}

impl Agent {
    /// Starts serving.
    pub fn start(cfg: AgentConfig) -> Result<Agent, ClusterError> {
        let memory = if cfg.memory > 0 {
            let host = cfg.listen.rsplit_once(':').map_or("tcp://127.0.0.1", |(h, _)| h);
            let uri = cfg.memory_listen.clone().unwrap_or_else(|| format!("{host}:0"));
            let m = MemServer::start(&uri, MemServerConfig::new(cfg.memory, cfg.key.clone())).map_err(|e| {
                ClusterError::Start(format!("memory server at {uri}: {}", mosaic_transport::error_chain(&e)))
            })?;
            Some(m)
        } else {
            None
        };
        let state = Arc::new(State {
            memory_uri: memory.as_ref().map_or(String::new(), |m| m.uri().to_string()),
            memory,
            cfg: cfg.clone(),
            uri: OnceLock::new(),
            away: Mutex::new(HashMap::new()),
            hosted: Mutex::new(HashMap::new()),
            arrived: std::sync::Condvar::new(),
            gossip: OnceLock::new(),
            books: JobBooks::new(),
        });
        // Bound before any thread starts: a port in use fails the start with nothing running.
        let metrics_listener = match &cfg.metrics {
            Some(at) => Some(
                std::net::TcpListener::bind(at.trim_start_matches("http://"))
                    .map_err(|e| ClusterError::Start(format!("metrics at {at}: {e}")))?,
            ),
            None => None,
        };
        let mut scfg = ServerConfig::new(cfg.key.clone()).service(AgentService(state.clone()));
        scfg.max_frame = MAX_FRAME;
        let server = listen(&cfg.listen, scfg).map_err(|e| {
            ClusterError::Start(format!("listening at {}: {}", cfg.listen, mosaic_transport::error_chain(&e)))
        })?;
        let uri = cfg.advertise.clone().unwrap_or_else(|| server.uri().to_string());
        let _ = state.uri.set(uri.clone());
        if let Some(mut g) = cfg.gossip.clone() {
            if !state.memory_uri.is_empty() {
                g.memory_server = Some(state.memory_uri.clone());
            }
            let weak = Arc::downgrade(&state);
            let hosted = move || weak.upgrade().map_or(0, |s| u16::try_from(s.hosted_count()).unwrap_or(u16::MAX));
            let gossiper = crate::gossip::Gossiper::start(&uri, cfg.key.clone(), g, hosted)
                .map_err(|e| ClusterError::Start(format!("the gossip threads: {e}")))?;
            let _ = state.gossip.set(gossiper);
        }
        let metrics = match (&cfg.metrics, metrics_listener) {
            (Some(at), Some(listener)) => {
                let addr = listener.local_addr().map_err(|e| ClusterError::Start(format!("metrics at {at}: {e}")))?;
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let weak = Arc::downgrade(&state);
                let t = crate::metrics::serve(listener, stop.clone(), move || {
                    let Some(s) = weak.upgrade() else { return crate::metrics::Snapshot::default() };
                    let hosted = s.hosted_count() as u64;
                    crate::metrics::Snapshot {
                        view: s.gossip.get().map(crate::gossip::Gossiper::view),
                        gossip: s.gossip.get().map(crate::gossip::Gossiper::stats),
                        hosted,
                        memory_pages: s.memory.as_ref().map(|m| {
                            let st = m.stats();
                            (st.capacity_pages, st.used_pages)
                        }),
                        ushering: s.memory.as_ref().is_some_and(MemServer::leaving),
                        dsm_jobs_meeting: s.books.open() as u64,
                    }
                })
                .map_err(|e| ClusterError::Start(format!("the metrics thread: {e}")))?;
                Some((format!("http://{addr}/metrics"), stop, t))
            }
            _ => None,
        };
        let balancer = match (&cfg.balance, state.gossip.get().is_some()) {
            (Some(params), true) => {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (st, params, flag) = (state.clone(), params.clone(), stop.clone());
                let t = std::thread::Builder::new()
                    .name("mosaic-balance".into())
                    .spawn(move || {
                        let here = || processes_here(&st);
                        if let Some(g) = st.gossip.get() {
                            crate::balancer::run(g, &params, &st.cfg.key, &here, &flag);
                        }
                    })
                    .map_err(|e| {
                        // Nothing keeps running on this error: the metrics thread stops too.
                        if let Some((_, stop, _)) = &metrics {
                            stop.store(true, std::sync::atomic::Ordering::Release);
                        }
                        ClusterError::Start(format!("the balancing thread: {e}"))
                    })?;
                Some((stop, t))
            }
            (Some(_), false) => {
                if let Some((_, stop, _)) = &metrics {
                    stop.store(true, std::sync::atomic::Ordering::Release);
                }
                return Err(ClusterError::Start("balancing needs gossip (the load of other nodes)".into()));
            }
            (None, _) => None,
        };
        let usherer = match (&cfg.usher, state.gossip.get().is_some() && state.memory.is_some()) {
            (Some(params), true) => {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (st, params, flag) = (state.clone(), params.clone(), stop.clone());
                let t = std::thread::Builder::new().name("mosaic-usher".into()).spawn(move || {
                    if let (Some(g), Some(m)) = (st.gossip.get(), st.memory.as_ref()) {
                        crate::usherer::run(g, m, &params, &flag);
                    }
                });
                match t {
                    Ok(t) => Some((stop, t)),
                    Err(e) => {
                        let agent = Agent { server: Some(server), state, balancer, usherer: None, metrics };
                        drop(agent);
                        return Err(ClusterError::Start(format!("the memory-ushering thread: {e}")));
                    }
                }
            }
            _ => None,
        };
        Ok(Agent { server: Some(server), state, balancer, usherer, metrics })
    }

    /// Where it listens.
    pub fn uri(&self) -> &str {
        self.server.as_ref().map_or("", Server::uri)
    }

    /// Where its metrics are served, if anywhere (`http://HOST:PORT/metrics`).
    pub fn metrics_url(&self) -> Option<&str> {
        self.metrics.as_ref().map(|m| m.0.as_str())
    }

    /// Where its memory server listens, if it has one.
    pub fn memory_uri(&self) -> Option<&str> {
        self.state.memory.as_ref().map(MemServer::uri)
    }

    /// The processes running here that moved in: pid (here) and command.
    pub fn hosted(&self) -> Vec<(u32, String)> {
        crate::lock(&self.state.hosted).iter().filter(|(_, h)| !h.gone).map(|(p, h)| (*p, h.comm.clone())).collect()
    }

    /// Waits (at most `timeout`) until every page of process `pid`, which moved here, has
    /// come: when the last came, and what post-copy did. `None` if it is not here or its pages
    /// did not all come.
    pub fn wait_arrived(&self, pid: u32, timeout: Duration) -> Option<(Instant, PostCopyStats)> {
        let deadline = Instant::now() + timeout;
        let mut h = crate::lock(&self.state.hosted);
        loop {
            match h.get(&pid) {
                Some(x) if x.arrived.is_some() => return x.arrived,
                Some(x) if x.arriving => {}
                _ => return None,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            h = self.state.arrived.wait_timeout(h, left).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// What it knows of the cluster (`None`: it does not gossip).
    pub fn cluster_view(&self) -> Option<crate::gossip::ClusterView> {
        self.state.gossip.get().map(crate::gossip::Gossiper::view)
    }

    /// Stops serving.
    pub fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// Moves every migratable process running here to the least loaded other node with room (as
/// this node knows them); returns (moved, failed).
fn drain(s: &State) -> (u32, u32) {
    let (mut moved, mut failed) = (0, 0);
    let Some(g) = s.gossip.get() else {
        log::warn!("drain: this agent does not gossip: it knows no other node");
        return (0, u32::try_from(processes_here(s).len()).unwrap_or(u32::MAX));
    };
    let view = g.view();
    let mut here = view.own.clone();
    here.free_slots = 0; // not here
                         // A copy of what this node knows, counting each process sent (gossip tells it late).
    let mut window = view.window;
    for (pid, how) in processes_here(s) {
        let Some(to) = crate::policy::place(&here, &window, 0, Duration::from_secs(30)) else {
            log::warn!("drain: no other node has room for process {pid}");
            failed += 1;
            continue;
        };
        match crate::balancer::ask_home(&how, &to, &s.cfg.key, false) {
            Ok(()) => {
                log::info!("drain: process {pid} moved to {to}");
                moved += 1;
                if let Some(w) = window.iter_mut().find(|w| w.node == to) {
                    w.load = w.load.saturating_add(100);
                    w.free_slots = w.free_slots.saturating_sub(1);
                }
            }
            Err(e) => {
                log::warn!("drain: process {pid} could not move to {to}: {e}");
                failed += 1;
            }
        }
    }
    (moved, failed)
}

/// The migratable processes running at this node: those that moved in (and whose pages are all
/// here), and the jobs whose home is here and that run here.
fn processes_here(s: &State) -> Vec<(u32, crate::balancer::Here)> {
    use crate::balancer::Here;
    let mut v: Vec<(u32, Here)> = crate::lock(&s.hosted)
        .iter()
        .filter(|(_, h)| !h.gone && !h.arriving)
        .map(|(pid, h)| (*pid, Here::Guest(h.home.clone())))
        .collect();
    let me = s.uri.get().cloned().unwrap_or_default();
    let dir = crate::run_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else { return v };
    for e in rd.flatten() {
        let Some(home_pid) = e.file_name().to_str().and_then(|n| n.strip_prefix("job-")?.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok((node, pid, _, _)) = crate::job_where(&dir, home_pid, &s.cfg.key) {
            if node == me && !v.iter().any(|(p, _)| *p == pid) {
                v.push((pid, Here::Home(home_pid)));
            }
        }
    }
    v
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some((stop, t)) = self.usherer.take() {
            stop.store(true, std::sync::atomic::Ordering::Release);
            let _ = t.join();
        }
        if let Some((stop, t)) = self.balancer.take() {
            stop.store(true, std::sync::atomic::Ordering::Release);
            // A move under way may take a while: wait a little, then let it finish on its own.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        if let Some((_, stop, t)) = self.metrics.take() {
            stop.store(true, std::sync::atomic::Ordering::Release);
            let _ = t.join();
        }
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn options(key: &ClusterKey, timeout: Duration) -> ConnectOptions {
    let mut o = ConnectOptions::new(key.clone());
    o.timeout = timeout;
    o
}

struct AgentService(Arc<State>);

impl Service for AgentService {
    fn disconnected(&self, caller: &Caller) {
        self.0.books.disconnected(caller);
    }

    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let s = &self.0;
        let mut d = Dec(request);
        match method {
            wire::MIGRATE_OUT => {
                let (pid, to, home, job) =
                    (d.u32().map_err(bad)?, d.str().map_err(bad)?, d.str().map_err(bad)?, d.u64().map_err(bad)?);
                let moved = migrate_out(s, pid, &to, &home, job)?;
                response.extend_from_slice(&moved.encode());
            }
            wire::MIGRATE_IN => {
                let (id, source, home, job) =
                    (d.u64().map_err(bad)?, d.str().map_err(bad)?, d.str().map_err(bad)?, d.u64().map_err(bad)?);
                let pid = migrate_in(s, id, &source, &home, job, d.rest())?;
                response.extend_from_slice(&pid.to_le_bytes());
            }
            wire::FETCH | wire::NEXT => {
                let id = d.u64().map_err(bad)?;
                let pages = crate::lock(&s.away)
                    .get(&id)
                    .map(|a| a.pages.clone())
                    .ok_or_else(|| ServiceError::new(Status::NotFound, format!("no migration {id:#x} here")))?;
                let at = response.len();
                if method == wire::FETCH {
                    let n = d.u32().map_err(bad)?.min(4096) as usize;
                    let addrs = (0..n).map(|_| d.u64()).collect::<Result<Vec<u64>, _>>().map_err(bad)?;
                    let mut bytes = Vec::new();
                    let kinds = pages.fetch(&addrs, &mut bytes).map_err(failed)?;
                    response.extend(kinds.iter().map(|&k| k as u8));
                    response.extend_from_slice(&bytes);
                } else {
                    let (hint, most) = (d.u64().map_err(bad)?, d.u32().map_err(bad)?.min(2048) as usize);
                    let mut bytes = Vec::new();
                    let (addrs, done) = pages.next(hint, most, &mut bytes).map_err(failed)?;
                    let mut e = Enc::default();
                    e.u8(u8::from(done)).u32(u32::try_from(addrs.len()).unwrap_or(0));
                    addrs.iter().for_each(|&a| {
                        e.u64(a);
                    });
                    response.extend_from_slice(&e.0);
                    response.extend_from_slice(&bytes);
                }
                // Read from the stopped copy itself, not from a process that took its pid after it died.
                if crate::lock(&s.away).get(&id).is_some_and(|a| a.remains.as_ref().is_some_and(|r| !r.alive())) {
                    response.truncate(at);
                    return Err(failed("the stopped copy of the process is gone"));
                }
            }
            wire::DONE => {
                let id = d.u64().map_err(bad)?;
                if let Some(a) = crate::lock(&s.away).remove(&id) {
                    if let Some(r) = a.remains {
                        log::info!("process {} moved away for good: the stopped copy goes", r.pid());
                        r.kill();
                    }
                }
            }
            wire::STATUS => {
                let hosted = u32::try_from(s.hosted_count()).unwrap_or(u32::MAX);
                let mut e = Enc::default();
                e.str(s.uri.get().map_or("", String::as_str)).str(&s.memory_uri).u32(hosted);
                // The memory server's capacity and use in pages, and whether it is ushering.
                let (capacity, used) = s.memory.as_ref().map_or((0, 0), |m| {
                    let st = m.stats();
                    (st.capacity_pages, st.used_pages)
                });
                e.u64(capacity).u64(used).u8(u8::from(s.memory.as_ref().is_some_and(MemServer::leaving)));
                // DSM jobs meeting here now (appended: older tools read what they know).
                e.u32(u32::try_from(s.books.open()).unwrap_or(u32::MAX));
                response.extend_from_slice(&e.0);
            }
            wire::SINK => response.extend_from_slice(&(request.len() as u64).to_le_bytes()),
            wire::GOSSIP => {
                if let Some(g) = s.gossip.get() {
                    g.receive(request);
                }
            }
            wire::DRAIN => {
                let (moved, failed) = drain(s);
                let mut e = Enc::default();
                e.u32(moved).u32(failed);
                response.extend_from_slice(&e.0);
            }
            wire::NODES => {
                let g = s.gossip.get().ok_or_else(|| {
                    ServiceError::new(Status::NotFound, "this agent does not gossip (started with --no-gossip)")
                })?;
                response.extend_from_slice(&g.view().encode());
            }
            m if JobBooks::serves(m) => return s.books.call(caller, m, request, response),
            m => return Err(ServiceError::new(Status::UnknownMethod, format!("no method {m:#x}"))),
        }
        Ok(())
    }
}

fn migrate_out(s: &Arc<State>, pid: u32, to: &str, home: &str, job: u64) -> Result<Moved, ServiceError> {
    // A process that moved here moves on once all its pages are here.
    let relay = {
        let mut h = crate::lock(&s.hosted);
        let deadline = Instant::now() + Duration::from_secs(60);
        while h.get(&pid).is_some_and(|x| x.arriving) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ServiceError::new(
                    Status::Forbidden,
                    format!("process {pid} is still receiving its memory; try again"),
                ));
            }
            h = s.arrived.wait_timeout(h, left).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
        h.get(&pid).map(|x| x.relay.clone())
    };
    check_movable(pid, MIGRATE_SIGNAL).map_err(failed)?;
    // A process that moved here: its input relay stops first, so that what it handed over and
    // the process has not read yet travels with the image.
    if let Some(r) = &relay {
        r.pause_input(Duration::from_secs(3));
    }
    let resume_input = |unread: &[u8]| {
        if let Some(r) = &relay {
            r.resume_input(unread);
        }
    };
    // Connected before the process stops: the handshake is not part of its pause.
    let dest = connect(to, &options(&s.cfg.key, Duration::from_secs(60)))
        .map_err(|e| failed(format!("the destination {to}: {}", mosaic_transport::error_chain(&e))))?;
    let t0 = Instant::now();
    let stopped = match stop(pid, MIGRATE_SIGNAL, s.cfg.stop_timeout) {
        Ok(st) => st,
        Err(e) => {
            resume_input(&[]);
            return Err(failed(e));
        }
    };
    // Its output so far reaches its home before the new copy's.
    if let Some(r) = &relay {
        r.drain(Duration::from_secs(2));
    }
    let t_stopped = t0.elapsed();
    let image = match stopped.capture().and_then(|mut i| {
        if relay.is_some() {
            i.stdin_unread = stopped.take_unread_input()?;
        }
        Ok(i)
    }) {
        Ok(i) => i,
        Err(e) => {
            stopped.resume();
            resume_input(&[]);
            return Err(failed(e));
        }
    };
    let bytes = image.encode();
    let captured = t0.elapsed();
    let id = {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(failed)?;
        u64::from_le_bytes(b)
    };
    crate::lock(&s.away).insert(id, Away { pages: Arc::new(SourcePages::new(pid, &image)), remains: None });
    let mut req = Enc::default();
    req.u64(id).str(s.uri.get().map_or("", String::as_str)).str(home).u64(job).rest(&bytes);
    let answer = dest.call(wire::MIGRATE_IN, &req.0).map_err(|e| mosaic_transport::error_chain(&e));
    match answer {
        Ok(a) => {
            let freeze_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
            let remote = Dec(&a).u32().unwrap_or(0);
            let remains = stopped.stay();
            if let Some(away) = crate::lock(&s.away).get_mut(&id) {
                away.remains = Some(remains);
            }
            if let Some(h) = crate::lock(&s.hosted).get_mut(&pid) {
                h.gone = true;
            }
            log::info!(
                "process {pid} moved to {to} (pid {remote} there), stopped for {freeze_us} us ({} us to stop, {} to capture, {} bytes of image)",
                t_stopped.as_micros(),
                captured.as_micros(),
                bytes.len()
            );
            Ok(Moved {
                pid: remote,
                freeze_us,
                image_bytes: bytes.len() as u64,
                post_copy_bytes: image.post_copy_bytes(),
                threads: u32::try_from(image.threads.len()).unwrap_or(u32::MAX),
            })
        }
        Err(e) => {
            crate::lock(&s.away).remove(&id);
            stopped.resume();
            resume_input(&image.stdin_unread);
            Err(failed(format!("the destination {to} did not take process {pid} (it runs on here): {e}")))
        }
    }
}

/// Pages of a process that moved here, asked of its source's agent.
struct RemotePages {
    conn: Connection,
    id: u64,
}

impl FetchPages for RemotePages {
    fn fetch(&self, pages: &[u64]) -> Result<(Vec<Got>, Vec<u8>), String> {
        let mut e = Enc::default();
        e.u64(self.id).u32(u32::try_from(pages.len()).unwrap_or(0));
        pages.iter().for_each(|&a| {
            e.u64(a);
        });
        let b = self.conn.call(wire::FETCH, &e.0).map_err(|e| mosaic_transport::error_chain(&e))?;
        let n = pages.len();
        let kinds: Vec<Got> = b
            .get(..n)
            .ok_or("a short answer")?
            .iter()
            .map(|&k| Got::from_u8(k).ok_or("an unknown page kind"))
            .collect::<Result<_, _>>()?;
        let data = kinds.iter().filter(|&&k| k == Got::Data).count() * mosaic_transport::PAGE_SIZE;
        if b.len() != n + data {
            return Err(format!("{} bytes of pages where {data} were due", b.len() - n));
        }
        Ok((kinds, b[n..].to_vec()))
    }

    fn next(&self, hint: u64, most: usize) -> Result<(Vec<u64>, Vec<u8>, bool), String> {
        let mut e = Enc::default();
        e.u64(self.id).u64(hint).u32(u32::try_from(most).unwrap_or(u32::MAX));
        let b = self.conn.call(wire::NEXT, &e.0).map_err(|e| mosaic_transport::error_chain(&e))?;
        let mut d = Dec(&b);
        let done = d.u8()? != 0;
        let n = d.u32()? as usize;
        if n > most {
            return Err(format!("{n} pages where at most {most} were asked for"));
        }
        let addrs = (0..n).map(|_| d.u64()).collect::<Result<Vec<u64>, _>>()?;
        let bytes = d.rest();
        if bytes.len() != n * mosaic_transport::PAGE_SIZE {
            return Err(format!("{} bytes for {n} pages", bytes.len()));
        }
        Ok((addrs, bytes.to_vec(), done))
    }
}

fn migrate_in(s: &Arc<State>, id: u64, source: &str, home: &str, job: u64, bytes: &[u8]) -> Result<u32, ServiceError> {
    let image = ProcessImage::decode(bytes).map_err(|e| bad(e.to_string()))?;
    let (program, args) = &s.cfg.restorer;
    let mut cmd = Command::new(program);
    cmd.args(args);
    if home.is_empty() {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let t0 = Instant::now();
    let mut restorer = Restorer::spawn(cmd, bytes).map_err(failed)?;
    let spawned = t0.elapsed();
    let pages = connect(source, &options(&s.cfg.key, Duration::from_secs(30)))
        .map_err(|e| failed(format!("the source {source}: {}", mosaic_transport::error_chain(&e))));
    let (restored, pages) =
        match pages.and_then(|p| restorer.running(Duration::from_secs(30)).map(|r| (r, p)).map_err(failed)) {
            Ok(r) => r,
            Err(e) => {
                restorer.kill();
                return Err(e);
            }
        };
    let pid = restored.pid;
    log::info!(
        "process {pid} rebuilt here: restorer started in {} us, running after {} us",
        spawned.as_micros(),
        t0.elapsed().as_micros()
    );
    let post = PostCopy::start(ForeignUffd::from_fd(restored.uffd), &image, Arc::new(RemotePages { conn: pages, id }));
    let post = match post {
        Ok(p) => p,
        Err(e) => {
            restorer.kill();
            return Err(failed(e));
        }
    };
    crate::lock(&s.hosted).insert(
        pid,
        Hosted {
            comm: image.comm.clone(),
            home: home.to_string(),
            arriving: true,
            arrived: None,
            gone: false,
            relay: Arc::default(),
        },
    );
    let (st, home, key, source) = (s.clone(), home.to_string(), s.cfg.key.clone(), source.to_string());
    let unread = image.stdin_unread.clone();
    std::thread::Builder::new()
        .name(format!("mosaic-host-{pid}"))
        .spawn(move || host(&st, restorer, post, pid, &home, job, &key, &source, id, &unread))
        .map_err(failed)?;
    Ok(pid)
}

/// An output stream of a hosted process: its number (1, 2), the pipe, its descriptor.
type Output = (u8, Option<Box<dyn Read + Send>>, i32);

/// Follows a process that moved here to its end: its pages, its standard streams, its status.
#[allow(clippy::too_many_arguments)]
fn host(
    s: &State,
    mut restorer: Restorer,
    mut post: PostCopy,
    pid: u32,
    home: &str,
    job: u64,
    key: &ClusterKey,
    source: &str,
    id: u64,
    unread: &[u8],
) {
    use std::os::fd::AsRawFd;
    let home_conn = if home.is_empty() {
        None
    } else {
        // A job cannot run without its home (its output would block, its end go unheard).
        let mut conn = None;
        for attempt in 0..3 {
            match connect(home, &options(key, Duration::from_secs(30))) {
                Ok(c) => {
                    conn = Some(Arc::new(c));
                    break;
                }
                Err(e) if attempt == 2 => {
                    log::error!("process {pid}: its home {home} cannot be reached ({e}): it is killed")
                }
                Err(_) => std::thread::sleep(Duration::from_secs(1)),
            }
        }
        if conn.is_none() {
            restorer.kill();
            crate::lock(&s.hosted).remove(&pid);
            return;
        }
        conn
    };
    let relay = crate::lock(&s.hosted).get(&pid).map(|h| h.relay.clone()).unwrap_or_default();
    // The input relay asks the home until the process ends here (or moves on).
    let input_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut relays = Vec::new();
    if let Some(h) = &home_conn {
        let outs: [Output; 2] = {
            let o = restorer.take_stdout();
            let e = restorer.take_stderr();
            let (ofd, efd) = (o.as_ref().map_or(-1, AsRawFd::as_raw_fd), e.as_ref().map_or(-1, AsRawFd::as_raw_fd));
            [
                (1u8, o.map(|o| Box::new(o) as Box<dyn Read + Send>), ofd),
                (2, e.map(|e| Box::new(e) as Box<dyn Read + Send>), efd),
            ]
        };
        for (stream, out, fd) in outs {
            let (Some(mut out), h, relay) = (out, h.clone(), relay.clone()) else { continue };
            crate::lock(&relay.pipes).push(fd);
            relays.push(std::thread::spawn(move || {
                use std::sync::atomic::Ordering;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    // Counted as on its way from the moment it can be read, so a drain never
                    // sees it in neither place.
                    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                    // SAFETY: poll on our pipe.
                    unsafe { libc::poll(&mut p, 1, -1) };
                    relay.in_flight.fetch_add(1, Ordering::AcqRel);
                    let n = match out.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            relay.in_flight.fetch_sub(1, Ordering::AcqRel);
                            crate::lock(&relay.pipes).retain(|&f| f != fd);
                            return;
                        }
                        Ok(n) => n,
                    };
                    let mut e = Enc::default();
                    e.u64(job).u8(stream).rest(&buf[..n]);
                    // A slow reader at home (a paused pager) is waited for, not dropped.
                    let sent = loop {
                        match h.call(wire::OUTPUT, &e.0) {
                            Err(mosaic_transport::CallError::TimedOut { .. }) => continue,
                            other => break other,
                        }
                    };
                    relay.in_flight.fetch_sub(1, Ordering::AcqRel);
                    if let Err(err) = sent {
                        log::warn!("process {pid}: its home is gone ({err}): output dropped");
                        crate::lock(&relay.pipes).retain(|&f| f != fd);
                        return;
                    }
                }
            }));
        }
        if let Some(mut input) = restorer.take_stdin() {
            // What it had not read where it came from comes first.
            if !unread.is_empty() {
                if let Err(e) = input.write_all(unread) {
                    log::error!("process {pid}: {} bytes of its standard input lost: {e}", unread.len());
                }
            }
            *crate::lock(&relay.stdin) = Some(input);
            let (h, done, relay) = (h.clone(), input_done.clone(), relay.clone());
            std::thread::spawn(move || {
                use std::sync::atomic::Ordering;
                loop {
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                    if relay.input_paused.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    relay.input_busy.store(true, Ordering::Release);
                    let mut e = Enc::default();
                    e.u64(job).u32(64 << 10).u32(pid);
                    let answer = h.call(wire::INPUT, &e.0);
                    let go_on = match answer {
                        Ok(b) if b.first() == Some(&0) => {
                            crate::lock(&relay.stdin).as_mut().is_some_and(|w| w.write_all(&b[1..]).is_ok())
                        }
                        Ok(b) if b.first() == Some(&2) => true,
                        Err(mosaic_transport::CallError::TimedOut { .. }) => true,
                        // The end of its input, or the home is gone: the process sees the end.
                        _ => {
                            crate::lock(&relay.stdin).take();
                            false
                        }
                    };
                    relay.input_busy.store(false, Ordering::Release);
                    if !go_on {
                        return;
                    }
                }
            });
        }
    }
    match post.wait(Duration::from_secs(365 * 24 * 3600)) {
        Ok(stats) => {
            if let Some(h) = crate::lock(&s.hosted).get_mut(&pid) {
                h.arrived = Some((Instant::now(), stats));
            }
            restorer.all_here();
            log::info!(
                "process {pid}: all {} pages here ({} fetched by faults, {} streamed)",
                stats.pages,
                stats.fetched_for_faults,
                stats.streamed
            );
            let mut e = Enc::default();
            e.u64(id);
            if let Err(err) = connect(source, &options(key, Duration::from_secs(10)))
                .map_err(|e| e.to_string())
                .and_then(|c| c.call(wire::DONE, &e.0).map_err(|e| e.to_string()))
            {
                log::warn!("process {pid}: telling the source it may let go: {err}");
            }
        }
        Err(e) => log::error!("process {pid}: {e}"),
    }
    drop(post);
    if let Some(h) = crate::lock(&s.hosted).get_mut(&pid) {
        h.arriving = false;
    }
    s.arrived.notify_all();
    let status = restorer.exited().unwrap_or_else(|e| {
        log::error!("process {pid}: {e}");
        libc::SIGKILL
    });
    for r in relays {
        let _ = r.join();
    }
    input_done.store(true, std::sync::atomic::Ordering::Release);
    let gone = crate::lock(&s.hosted).remove(&pid).is_some_and(|h| h.gone);
    if gone {
        log::info!("process {pid} ended here after it moved on (status {status:#x})");
        return;
    }
    if let Some(h) = home_conn {
        let mut e = Enc::default();
        e.u64(job).u32(u32::from_le_bytes(status.to_le_bytes())).u32(pid);
        if let Err(err) = h.call(wire::EXITED, &e.0) {
            log::warn!("process {pid} ended (status {status:#x}) but its home is gone: {err}");
        }
    }
}
