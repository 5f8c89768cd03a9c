//! A node of a DSM job: the I/O layer around [`Node`].
//!
//! [`Job::join`] maps the shared region at the same address as every other node, listens for its
//! peers, publishes its address in the job's rendezvous directory, waits for every peer's, and
//! connects to each. From then on:
//!
//! - a fault on the region (served by the pager's fault workers) asks [`Node::fault`]; the
//!   request goes out and the fault is deferred until the page is in (a fault waiting longer
//!   than [`JobConfig::fault_timeout`], or one on a job whose peer is gone, raises SIGBUS, with
//!   the page and the reason logged: never a hang);
//! - a peer's messages are handled on the transport's server thread of that peer's connection
//!   (one per peer, so each peer's messages are handled in the order sent): [`Node::handle`] and
//!   the actions it returns run under the node's lock, so the mapping never disagrees with the
//!   protocol's state outside it;
//! - messages to a peer wait in that peer's outbox, and one sender thread per peer sends them in
//!   order, in batches (the protocol needs the order kept per pair of nodes).
//!
//! Message handling never touches a page that is not mapped (the node tracks what it mapped),
//! so it never faults; the fault path never waits for anything but the node's lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_page::{Page, PAGE_SIZE};
use mosaic_pager::{
    DirtyTracking, Fault, FaultMode, FillError, Filled, PageSource, Region, RegionConfig, RegionCore, WriteDecision,
};
use mosaic_transport::{
    connect, listen, Caller, ClusterKey, ConnectOptions, Connection, Server, ServerConfig, Service, ServiceError,
    Status,
};

use crate::protocol::{Access, Action, Msg, Node, NodeId, PageNo, ProtocolError, Want, MAX_NODES};
use crate::wire::{self, Envelope};

/// The transport method protocol messages travel by.
const METHOD_PROTOCOL: u64 = 0x4453_4d01;
/// The transport method of barrier arrivals (outside the coherence protocol).
const METHOD_BARRIER: u64 = 0x4453_4d02;
/// Most messages one call carries.
const BATCH: usize = 32;

/// Where this node is in its job, and the job's settings.
#[derive(Clone, Debug)]
pub struct JobConfig {
    /// This node's rank: 0 to `size - 1`.
    pub rank: NodeId,
    /// Nodes in the job.
    pub size: u16,
    /// A directory every node can read and write: each publishes its address there.
    pub rendezvous: PathBuf,
    /// The job's cluster key (the same on every node).
    pub key: ClusterKey,
    /// Where this node listens for its peers.
    pub listen: String,
    /// The shared region's address, the same on every node.
    pub addr: usize,
    /// The shared region's size in bytes (a whole number of pages).
    pub bytes: u64,
    /// Longest wait for every peer to publish its address and accept a connection.
    pub join_timeout: Duration,
    /// Longest wait for one page; past it the access raises SIGBUS.
    pub fault_timeout: Duration,
}

/// The environment variables [`JobConfig::from_env`] reads.
pub const RANK_ENV: &str = "MOSAIC_DSM_RANK";
/// See [`RANK_ENV`].
pub const SIZE_ENV: &str = "MOSAIC_DSM_SIZE";
/// See [`RANK_ENV`].
pub const RENDEZVOUS_ENV: &str = "MOSAIC_DSM_RENDEZVOUS";

/// See [`RANK_ENV`] (optional: milliseconds; 30 s by default).
pub const JOIN_TIMEOUT_ENV: &str = "MOSAIC_DSM_JOIN_TIMEOUT_MS";

/// The default address of the shared region (the same on every node of the job).
pub const DEFAULT_ADDR: usize = 0x5000_0000_0000;

impl JobConfig {
    /// A job's settings for node `rank` of `size`, sharing `bytes` at [`DEFAULT_ADDR`], meeting
    /// in `rendezvous`, listening on a free loopback port.
    pub fn new(rank: NodeId, size: u16, rendezvous: impl Into<PathBuf>, key: ClusterKey, bytes: u64) -> JobConfig {
        JobConfig {
            rank,
            size,
            rendezvous: rendezvous.into(),
            key,
            listen: "tcp://127.0.0.1:0".into(),
            addr: DEFAULT_ADDR,
            bytes,
            join_timeout: Duration::from_secs(30),
            fault_timeout: Duration::from_secs(60),
        }
    }

    /// The settings from the environment: rank, size and rendezvous directory from
    /// `MOSAIC_DSM_RANK`, `MOSAIC_DSM_SIZE` and `MOSAIC_DSM_RENDEZVOUS`, the key from
    /// `MOSAIC_CLUSTER_KEY` or `MOSAIC_CLUSTER_KEY_FILE`, and the join time-out from
    /// `MOSAIC_DSM_JOIN_TIMEOUT_MS` if set.
    pub fn from_env(bytes: u64) -> Result<JobConfig, JoinError> {
        let var = |name: &'static str| std::env::var(name).map_err(|_| JoinError::Environment { name, why: "not set" });
        let number = |name: &'static str| -> Result<u16, JoinError> {
            var(name)?.trim().parse().map_err(|_| JoinError::Environment { name, why: "not a number from 0 to 65535" })
        };
        let key = ClusterKey::from_env().map_err(|e| JoinError::Key(e.to_string()))?;
        let mut cfg = JobConfig::new(number(RANK_ENV)?, number(SIZE_ENV)?, var(RENDEZVOUS_ENV)?, key, bytes);
        if let Ok(ms) = std::env::var(JOIN_TIMEOUT_ENV) {
            let ms: u64 = ms
                .trim()
                .parse()
                .map_err(|_| JoinError::Environment { name: JOIN_TIMEOUT_ENV, why: "not a number of milliseconds" })?;
            cfg.join_timeout = Duration::from_millis(ms);
        }
        Ok(cfg)
    }
}

/// Why a node could not join its job, or a job operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// A setting from the environment is missing or malformed.
    #[error("{name}: {why}")]
    Environment {
        /// The variable.
        name: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The settings do not make a job.
    #[error("bad job settings: {0}")]
    Config(String),
    /// The cluster key.
    #[error("cluster key: {0}")]
    Key(String),
    /// This node cannot listen.
    #[error("cannot listen on {uri}")]
    Listen {
        /// Where.
        uri: String,
        /// Why.
        #[source]
        source: mosaic_transport::ListenError,
    },
    /// The rendezvous directory cannot be used.
    #[error("rendezvous {path}")]
    Rendezvous {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Peers did not publish their address in time.
    #[error("nodes {missing:?} did not join within {waited:?} (rendezvous {dir})")]
    PeersMissing {
        /// Their ranks.
        missing: Vec<NodeId>,
        /// How long this node waited.
        waited: Duration,
        /// The rendezvous directory.
        dir: PathBuf,
    },
    /// A peer could not be reached.
    #[error("cannot connect to node {rank} at {uri}")]
    Connect {
        /// Its rank.
        rank: NodeId,
        /// Its address.
        uri: String,
        /// Why.
        #[source]
        source: mosaic_transport::ConnectError,
    },
    /// The shared region could not be made.
    #[error("cannot map the shared region")]
    Region(#[source] mosaic_pager::PagerError),
    /// A barrier did not complete in time.
    #[error("barrier {generation}: nodes {missing:?} did not arrive within {waited:?}")]
    Barrier {
        /// The barrier's number (0 for the first).
        generation: u64,
        /// Nodes that did not arrive.
        missing: Vec<NodeId>,
        /// How long this node waited.
        waited: Duration,
    },
    /// The job broke: a peer vanished or broke the protocol.
    #[error("the job is broken: {0}")]
    Broken(String),
}

/// Why a page could not be had (the faulting access raises SIGBUS; this is logged).
#[derive(Debug, thiserror::Error)]
enum PageError {
    #[error("page {page}: no answer within {waited:?}")]
    TimedOut { page: PageNo, waited: Duration },
    #[error("page {page}: {why}")]
    Broken { page: PageNo, why: String },
}

/// What a node counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobStats {
    /// Faults that sent a request.
    pub requests: u64,
    /// Protocol messages sent to peers (a node's messages to itself are not counted).
    pub messages_sent: u64,
    /// Protocol messages received from peers.
    pub messages_received: u64,
    /// Pages sent.
    pub pages_sent: u64,
    /// Protocol bytes sent (headers and pages).
    pub bytes_sent: u64,
}

/// The node's protocol state and what it has mapped, under one lock.
struct Local {
    node: Node,
    /// Pages mapped here now.
    mapped: HashSet<PageNo>,
    /// Bytes that arrived with `Data`, until installed.
    staged: HashMap<PageNo, Box<Page>>,
}

/// One peer's outbox, drained in order by its sender thread.
struct Outbox {
    queue: Mutex<VecDeque<Envelope>>,
    ready: Condvar,
}

struct Shared {
    rank: NodeId,
    size: u16,
    fault_timeout: Duration,
    local: Mutex<Local>,
    core: OnceLock<Arc<RegionCore>>,
    outboxes: Vec<Outbox>,
    /// Barrier arrivals: generation -> ranks that arrived.
    arrivals: Mutex<HashMap<u64, HashSet<NodeId>>>,
    arrived: Condvar,
    broken: Mutex<Option<String>>,
    stop: AtomicBool,
    requests: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    pages_sent: AtomicU64,
    bytes_sent: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn break_job(&self, why: String) {
        log::error!("dsm node {}: {why}", self.rank);
        lock(&self.broken).get_or_insert(why);
        self.arrived.notify_all();
    }

    fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }

    fn core(&self) -> &RegionCore {
        self.core.get().expect("the region is made before any message or fault")
    }

    /// The bytes of `page` as mapped here (zeros if this node never mapped it: a page its home
    /// owns and nobody touched yet).
    fn read_page(&self, local: &Local, page: PageNo) -> Box<Page> {
        let mut p = Page::boxed();
        if local.mapped.contains(&page) {
            let core = self.core();
            let off = usize::try_from(page).expect("a region page") * PAGE_SIZE;
            // SAFETY: the page is mapped (we installed it and have not dropped it) inside the
            // live region, and write-protected or ours alone while the node's lock is held: the
            // protocol downgrades a page before sending it. 4096 bytes, no overlap with `p`.
            unsafe { std::ptr::copy_nonoverlapping(core.as_ptr().add(off), p.0.as_mut_ptr(), PAGE_SIZE) };
        }
        p
    }

    /// Carries out `actions` of this node, then every message it sent itself meanwhile.
    fn execute(&self, local: &mut Local, actions: Vec<Action>) {
        let mut own: VecDeque<Envelope> = VecDeque::new();
        self.execute_into(local, actions, &mut own);
        while let Some(e) = own.pop_front() {
            if let Some(bytes) = e.bytes {
                local.staged.insert(e.msg.page(), bytes);
            }
            match local.node.handle(self.rank, e.msg) {
                Ok(actions) => self.execute_into(local, actions, &mut own),
                Err(err) => self.break_job(format!("own message refused: {err}")),
            }
        }
    }

    fn execute_into(&self, local: &mut Local, actions: Vec<Action>, own: &mut VecDeque<Envelope>) {
        for a in actions {
            if let Err(e) = self.act(local, a, own) {
                self.break_job(e);
            }
        }
    }

    fn act(&self, local: &mut Local, a: Action, own: &mut VecDeque<Envelope>) -> Result<(), String> {
        let core = self.core();
        log::trace!("node {}: {a:?} (mapped: {})", self.rank, local.mapped.contains(&action_page(&a)));
        match a {
            Action::Send { to, msg } => {
                let bytes = matches!(msg, Msg::Data { .. }).then(|| self.read_page(local, msg.page()));
                let e = Envelope { from: self.rank, msg, bytes };
                if to == self.rank {
                    own.push_back(e);
                } else {
                    let out = self.outboxes.get(usize::from(to)).ok_or(format!("no node {to}"))?;
                    lock(&out.queue).push_back(e);
                    out.ready.notify_one();
                }
            }
            Action::Install { page, writable } => {
                let bytes = local.staged.remove(&page).ok_or(format!("page {page} installed before it arrived"))?;
                if local.mapped.remove(&page) {
                    core.drop_pages(page, 1).map_err(|e| format!("page {page}: {e}"))?;
                }
                core.install(page, std::slice::from_ref(&*bytes)).map_err(|e| format!("page {page}: {e}"))?;
                local.mapped.insert(page);
                if writable {
                    core.write_protect(page, 1, false).map_err(|e| format!("page {page}: {e}"))?;
                }
            }
            Action::Upgrade { page } => {
                core.write_protect(page, 1, false).map_err(|e| format!("page {page}: {e}"))?;
            }
            Action::Downgrade { page } => {
                if local.mapped.contains(&page) {
                    core.write_protect(page, 1, true).map_err(|e| format!("page {page}: {e}"))?;
                }
            }
            Action::Drop { page } => {
                if local.mapped.remove(&page) {
                    core.drop_pages(page, 1).map_err(|e| format!("page {page}: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// Hands a message from a peer to the protocol and carries out what it says.
    fn receive(&self, e: Envelope) {
        let mut local = lock(&self.local);
        log::trace!("node {}: got {e:?}", self.rank);
        if let Some(bytes) = e.bytes {
            local.staged.insert(e.msg.page(), bytes);
        }
        match local.node.handle(e.from, e.msg) {
            Ok(actions) => self.execute(&mut local, actions),
            Err(err) => self.break_job(format!("node {} broke the protocol: {err}", e.from)),
        }
    }

    /// A sender: sends peer `to`'s outbox in order, in batches.
    fn run_sender(&self, to: NodeId, conn: Connection) {
        let out = &self.outboxes[usize::from(to)];
        let mut buf = Vec::new();
        loop {
            let batch: Vec<Envelope> = {
                let mut q = lock(&out.queue);
                while q.is_empty() && !self.stop.load(Ordering::Acquire) {
                    q = out
                        .ready
                        .wait_timeout(q, Duration::from_millis(50))
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
                if q.is_empty() {
                    return;
                }
                let n = q.len().min(BATCH);
                q.drain(..n).collect()
            };
            buf.clear();
            let mut pages = 0;
            for e in &batch {
                pages += u64::from(e.bytes.is_some());
                if let Err(err) = wire::encode(e, &mut buf) {
                    self.break_job(format!("cannot encode {e:?}: {err}"));
                    return;
                }
            }
            if let Err(err) = conn.call(METHOD_PROTOCOL, &buf) {
                self.break_job(format!("node {to} is unreachable: {err}"));
                return;
            }
            self.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.pages_sent.fetch_add(pages, Ordering::Relaxed);
            self.bytes_sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
    }
}

fn action_page(a: &Action) -> PageNo {
    match a {
        Action::Send { msg, .. } => msg.page(),
        Action::Install { page, .. }
        | Action::Upgrade { page }
        | Action::Downgrade { page }
        | Action::Drop { page } => *page,
    }
}

/// The region's page source: faults go to the protocol.
struct Source(Arc<Shared>);

impl Source {
    fn give_up(&self, fault: &Fault<'_>) -> Option<FillError> {
        let page = fault.index;
        if let Some(why) = self.0.broken() {
            return Some(FillError::new(PageError::Broken { page, why }));
        }
        (fault.waited > self.0.fault_timeout)
            .then(|| FillError::new(PageError::TimedOut { page, waited: fault.waited }))
    }
}

impl PageSource for Source {
    fn fill(&self, fault: &Fault<'_>, _page: &mut Page) -> Result<Filled, FillError> {
        let s = &self.0;
        let page = fault.index;
        let want = if fault.write { Want::Write } else { Want::Read };
        let mut local = lock(&s.local);
        let access = local.node.access(page);
        log::trace!("node {}: fault on page {page} ({want:?}), access {access:?}, waited {:?}", s.rank, fault.waited);
        if want.allowed_by(access) {
            // Allowed: the node installed the page (on a message) since this fault was first asked about
            // (it woke the thread then), or it is a page this node is home of that nobody touched
            // yet: all zeros, installed here under the lock. The pager must install nothing
            // itself: the page may be dropped again as soon as the lock is released.
            if local.mapped.insert(page) {
                let core = fault.region;
                core.install(page, std::slice::from_ref(&Page::ZERO)).map_err(FillError::new)?;
                if access == Access::Write {
                    core.write_protect(page, 1, false).map_err(FillError::new)?;
                }
            }
            return Ok(Filled::Present);
        }
        if let Some(e) = self.give_up(fault) {
            return Err(e);
        }
        let actions = local.node.fault(page, want);
        if !actions.is_empty() {
            s.requests.fetch_add(1, Ordering::Relaxed);
            s.execute(&mut local, actions);
        }
        // The page is installed when it arrives (which wakes this fault's thread); the pager asks
        // again meanwhile.
        Ok(Filled::Busy)
    }

    fn written(&self, fault: &Fault<'_>) -> WriteDecision {
        let s = &self.0;
        let page = fault.index;
        let mut local = lock(&s.local);
        log::trace!("node {}: write to read-only page {page}, access {:?}", s.rank, local.node.access(page));
        match local.node.access(page) {
            Access::Write => {
                // Made writable here, under the lock: the pager's own unprotect would come after
                // the lock is released and could undo a downgrade made meanwhile.
                if let Err(e) = fault.unprotect() {
                    s.break_job(format!("page {page}: {e}"));
                }
                WriteDecision::Proceed
            }
            Access::None => WriteDecision::Retry,
            Access::Read => {
                if self.give_up(fault).is_some() {
                    // Let the write fault again as a missing page, whose fill raises SIGBUS.
                    if local.mapped.remove(&page) {
                        let _ = s.core().drop_pages(page, 1);
                    }
                    return WriteDecision::Retry;
                }
                let actions = local.node.fault(page, Want::Write);
                if !actions.is_empty() {
                    s.requests.fetch_add(1, Ordering::Relaxed);
                    s.execute(&mut local, actions);
                }
                WriteDecision::Busy
            }
        }
    }
}

/// A barrier arrival's payload: the arriving node and the barrier's generation.
fn encode_arrival(from: NodeId, generation: u64) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..2].copy_from_slice(&from.to_le_bytes());
    b[2..].copy_from_slice(&generation.to_le_bytes());
    b
}

fn decode_arrival(b: &[u8]) -> Option<(NodeId, u64)> {
    let b: &[u8; 10] = b.try_into().ok()?;
    Some((u16::from_le_bytes([b[0], b[1]]), u64::from_le_bytes(b[2..].try_into().ok()?)))
}

/// Receives peers' messages, on the connection's server thread.
struct Inbox(Arc<Shared>);

impl Service for Inbox {
    fn call(&self, _caller: &Caller, method: u64, request: &[u8], _response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let s = &self.0;
        if method == METHOD_BARRIER {
            let (from, generation) = decode_arrival(request)
                .filter(|(from, _)| *from < s.size && *from != s.rank)
                .ok_or_else(|| ServiceError::new(Status::BadRequest, "a malformed barrier arrival"))?;
            lock(&s.arrivals).entry(generation).or_default().insert(from);
            s.arrived.notify_all();
            return Ok(());
        }
        if method != METHOD_PROTOCOL {
            return Err(ServiceError::new(Status::UnknownMethod, format!("no method {method:#x}")));
        }
        let envelopes = wire::decode(request).map_err(|e| ServiceError::new(Status::BadRequest, e.to_string()))?;
        if envelopes.iter().any(|e| e.from >= s.size || e.from == s.rank) {
            return Err(ServiceError::new(Status::BadRequest, "a message from no other node of this job"));
        }
        s.received.fetch_add(envelopes.len() as u64, Ordering::Relaxed);
        for e in envelopes {
            s.receive(e);
        }
        Ok(())
    }
}

/// This process's node of a DSM job: the shared region and the threads that keep it coherent.
pub struct Job {
    shared: Arc<Shared>,
    region: Option<Region>,
    server: Option<Server>,
    threads: Vec<JoinHandle<()>>,
    peers: Vec<Option<Connection>>,
    /// Barriers this node entered.
    barriers: AtomicU64,
    join_timeout: Duration,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("rank", &self.shared.rank).field("size", &self.shared.size).finish_non_exhaustive()
    }
}

impl Job {
    /// Joins the job: maps the shared region at `cfg.addr`, meets every other node through the
    /// rendezvous directory (within `cfg.join_timeout`) and connects to each.
    pub fn join(cfg: JobConfig) -> Result<Job, JoinError> {
        if cfg.size == 0 || cfg.size > MAX_NODES || cfg.rank >= cfg.size {
            return Err(JoinError::Config(format!(
                "rank {} of {} nodes (a job has 1 to {MAX_NODES} nodes)",
                cfg.rank, cfg.size
            )));
        }
        let page = PAGE_SIZE as u64;
        if cfg.bytes == 0 || cfg.bytes % page != 0 || cfg.addr % PAGE_SIZE != 0 {
            return Err(JoinError::Config(format!(
                "a region of {} bytes at {:#x}: both must be whole, non-zero pages",
                cfg.bytes, cfg.addr
            )));
        }
        let node = Node::new(cfg.rank, cfg.size).map_err(|e: ProtocolError| JoinError::Config(e.to_string()))?;
        let shared = Arc::new(Shared {
            rank: cfg.rank,
            size: cfg.size,
            fault_timeout: cfg.fault_timeout,
            local: Mutex::new(Local { node, mapped: HashSet::new(), staged: HashMap::new() }),
            core: OnceLock::new(),
            outboxes: (0..cfg.size)
                .map(|_| Outbox { queue: Mutex::new(VecDeque::new()), ready: Condvar::new() })
                .collect(),
            arrivals: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
            broken: Mutex::new(None),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            pages_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
        });
        let rcfg = RegionConfig::new(cfg.bytes / page)
            .fixed_addr(cfg.addr)
            .mode(FaultMode::Workers(2))
            .dirty(DirtyTracking::Faults)
            .report_discards(false)
            .name(format!("dsm node {}", cfg.rank));
        let region = Region::new(rcfg, Source(shared.clone())).map_err(JoinError::Region)?;
        let _ = shared.core.set(region.core());
        let mut job = Job {
            shared: shared.clone(),
            region: Some(region),
            server: None,
            threads: Vec::new(),
            peers: Vec::new(),
            barriers: AtomicU64::new(0),
            join_timeout: cfg.join_timeout,
        };
        let server = listen(&cfg.listen, ServerConfig::new(cfg.key.clone()).service(Inbox(shared.clone())))
            .map_err(|source| JoinError::Listen { uri: cfg.listen.clone(), source })?;
        let uris = rendezvous(&cfg, server.uri())?;
        job.server = Some(server);
        let deadline = Instant::now() + cfg.join_timeout;
        let opts = ConnectOptions::new(cfg.key.clone());
        for (rank, uri) in uris.iter().enumerate() {
            let rank = NodeId::try_from(rank).expect("at most MAX_NODES");
            if rank == cfg.rank {
                job.peers.push(None);
                continue;
            }
            let conn = loop {
                match connect(uri, &opts) {
                    Ok(c) => break c,
                    Err(source) if Instant::now() >= deadline => {
                        return Err(JoinError::Connect { rank, uri: uri.clone(), source })
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let sender = shared.clone();
            let c = conn.clone();
            job.threads.push(spawn("mosaic-dsm-send", move || sender.run_sender(rank, c)));
            job.peers.push(Some(conn));
        }
        Ok(job)
    }

    /// The first byte of the shared region (the same address on every node).
    pub fn as_ptr(&self) -> *mut u8 {
        self.shared.core().as_ptr()
    }

    /// The shared region's size in bytes.
    pub fn len(&self) -> usize {
        self.shared.core().len()
    }

    /// Whether the region is empty (never: a job's region has at least a page).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This node's rank.
    pub fn rank(&self) -> NodeId {
        self.shared.rank
    }

    /// Nodes in the job.
    pub fn size(&self) -> u16 {
        self.shared.size
    }

    /// What this node counted so far.
    pub fn stats(&self) -> JobStats {
        let s = &self.shared;
        JobStats {
            requests: s.requests.load(Ordering::Relaxed),
            messages_sent: s.sent.load(Ordering::Relaxed),
            messages_received: s.received.load(Ordering::Relaxed),
            pages_sent: s.pages_sent.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
        }
    }

    /// Waits until every node of the job has called `barrier` as often as this one. Every access
    /// a node made to the region before its call is seen by every node after theirs (the region
    /// is sequentially consistent; the barrier only orders the nodes' program points). One
    /// thread of each node calls it: it counts calls per node, not per thread.
    pub fn barrier(&self) -> Result<(), JoinError> {
        self.barrier_within(self.shared.fault_timeout)
    }

    fn barrier_within(&self, timeout: Duration) -> Result<(), JoinError> {
        let s = &self.shared;
        let generation = self.barriers.fetch_add(1, Ordering::AcqRel);
        let arrival = encode_arrival(s.rank, generation);
        for conn in self.peers.iter().flatten() {
            conn.call(METHOD_BARRIER, &arrival).map_err(|e| JoinError::Broken(format!("{}: {e}", conn.peer())))?;
        }
        let start = Instant::now();
        let others = usize::from(s.size) - 1;
        let mut arrivals = lock(&s.arrivals);
        loop {
            if arrivals.get(&generation).map_or(0, HashSet::len) >= others {
                arrivals.remove(&generation);
                return Ok(());
            }
            if let Some(why) = s.broken() {
                return Err(JoinError::Broken(why));
            }
            let waited = start.elapsed();
            if waited >= timeout {
                let here = arrivals.get(&generation).cloned().unwrap_or_default();
                let missing = (0..s.size).filter(|r| *r != s.rank && !here.contains(r)).collect();
                return Err(JoinError::Barrier { generation, missing, waited });
            }
            arrivals = s
                .arrived
                .wait_timeout(arrivals, Duration::from_millis(50).min(timeout - waited))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Leaves the job: waits (a barrier, within the join time-out) until every node is done with
    /// the region, so none still needs a page this node holds, then stops this node's threads and
    /// unmaps the region. Dropping a `Job` does the same, logging what goes wrong.
    pub fn leave(mut self) -> Result<(), JoinError> {
        let r = self.barrier_within(self.join_timeout);
        self.stop();
        r
    }

    fn stop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::Release);
        for o in &s.outboxes {
            o.ready.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        self.region.take();
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.region.is_none() {
            return;
        }
        if let Err(e) = self.barrier_within(self.join_timeout) {
            log::warn!("dsm node {} leaving: {e}", self.shared.rank);
        }
        self.stop();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new().name(name.into()).spawn(f).expect("cannot start a DSM thread")
}

/// Publishes this node's address in the rendezvous directory and waits for every node's;
/// returns them by rank.
fn rendezvous(cfg: &JobConfig, uri: &str) -> Result<Vec<String>, JoinError> {
    let dir = &cfg.rendezvous;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JoinError::Rendezvous { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    let file = |rank: NodeId| dir.join(format!("node-{rank}.uri"));
    let tmp = dir.join(format!(".node-{}.uri.{}", cfg.rank, std::process::id()));
    std::fs::write(&tmp, uri).map_err(err(&tmp))?;
    std::fs::rename(&tmp, file(cfg.rank)).map_err(err(&file(cfg.rank)))?;
    let start = Instant::now();
    loop {
        let mut uris = Vec::new();
        let mut missing = Vec::new();
        for rank in 0..cfg.size {
            match std::fs::read_to_string(file(rank)) {
                Ok(u) => uris.push(u.trim().to_string()),
                Err(_) => missing.push(rank),
            }
        }
        if missing.is_empty() {
            return Ok(uris);
        }
        if start.elapsed() >= cfg.join_timeout {
            return Err(JoinError::PeersMissing { missing, waited: start.elapsed(), dir: dir.clone() });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
