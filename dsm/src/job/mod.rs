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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_page::sched::Poll;
use mosaic_page::{Page, PAGE_SIZE};
use mosaic_pager::{
    DirtyTracking, Fault, FaultMode, FillError, Filled, PageSource, Region, RegionConfig, RegionCore, WriteDecision,
};
use mosaic_transport::{
    connect, connect_sim, listen, Caller, ClusterKey, ConnectOptions, Connection, LinkSpec, Server, ServerConfig,
    Service, ServiceError, Status, WaitPolicy,
};

use crate::alloc::{AllocError, Arena};
use crate::order::Inorder;
use crate::protocol::{Access, Action, Homes, Msg, Node, NodeId, PageNo, ProtocolError, Want, MAX_NODES};
use crate::rendezvous::Rendezvous;
use crate::wire::{self, Envelope};

mod spill;
use spill::{Spill, SpillState};

/// The transport method protocol messages travel by.
const METHOD_PROTOCOL: u64 = 0x4453_4d01;
/// The transport method of barrier arrivals (outside the coherence protocol).
const METHOD_BARRIER: u64 = 0x4453_4d02;
/// The barrier generation of leaving (apart from the numbered barriers, so a node that leaves
/// early does not count as arriving at its peers' next barrier).
const LEAVING: u64 = u64::MAX;
/// The barrier generation of joining, where the nodes check that they agree on the region.
const JOINING: u64 = u64::MAX - 1;
/// How long a barrier watches for the others' arrivals before it sleeps.
const BARRIER_SPIN: Duration = Duration::from_micros(100);
/// Most messages one call carries.
const BATCH: usize = 32;

/// Where this node is in its job, and the job's settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct JobConfig {
    /// This node's rank: 0 to `size - 1`.
    pub rank: NodeId,
    /// Nodes in the job.
    pub size: u16,
    /// Where the nodes find each other: a directory every node can read and write, or a
    /// rendezvous server (see [`crate::rendezvous`]).
    pub rendezvous: Rendezvous,
    /// The job's cluster key (the same on every node).
    pub key: ClusterKey,
    /// Where this node listens for its peers: a transport URI (`tcp://127.0.0.1:0`, the default;
    /// `tcp://ADDRESS:0` with an address the other hosts reach, for a job across hosts; or
    /// `shm://NAME` for peers on this host); what it binds is published for the others, so it
    /// must be a definite address, not `0.0.0.0` or `::`.
    pub listen: String,
    /// The shared region's address, the same on every node.
    pub addr: usize,
    /// The collective heap's size in bytes (a whole number of pages): the start of the shared
    /// region, pages homed at the nodes by turns, what [`Job::as_ptr`] points to and
    /// [`Job::alloc`] allocates from.
    pub bytes: u64,
    /// Each node's arena, in bytes (a whole number of pages; `None`: the heap's size divided by
    /// the nodes, rounded up to a page): it follows the heap, one per node in rank order, its
    /// pages homed at that node; [`Job::alloc_local`] allocates from it.
    pub arena_bytes: Option<u64>,
    /// Place the collective heap's pages by first touch: the first node to touch a page becomes
    /// its home (asking the node that would be its home by turns, once), so a node's accesses to
    /// pages it touched first never leave it until another node shares them. Off by default:
    /// pages homed by turns.
    pub first_touch: bool,
    /// Memory servers (transport URIs) behind this node's pages: with a [`budget`](Self::budget),
    /// the pages it owns beyond the budget go there (network RAM), so the region may be far
    /// larger than the nodes' RAM. Empty: no servers, every page stays mapped.
    pub servers: Vec<String>,
    /// The most bytes of the region this node keeps mapped, with [`servers`](Self::servers)
    /// (at least 64 pages); read-only copies of other nodes' pages are dropped first-in
    /// first-out, pages it owns go to the servers.
    pub budget: Option<u64>,
    /// Copies of each page on distinct servers (1 to the number of servers; by default 2 with
    /// two or more servers, so that one server's death loses nothing).
    pub copies: Option<usize>,
    /// Longest wait for every peer to publish its address and accept a connection.
    pub join_timeout: Duration,
    /// Longest wait for one page; past it the access raises SIGBUS.
    pub fault_timeout: Duration,
    /// Who serves a fault on the region: the faulting thread itself, in a SIGBUS handler
    /// ([`FaultMode::FaultingThread`], the default: no hand-off between threads; a system call
    /// given region memory that is not here fails with EFAULT), or fault workers
    /// ([`FaultMode::Workers`]: system calls on region memory work).
    pub fault_mode: FaultMode,
    /// How a thread waiting for a peer polls before it sleeps: spinning on its CPU (best where
    /// every polling thread has a CPU of its own), or yielding it between polls (best where they
    /// outnumber the CPUs). [`JobConfig::new`] picks by the CPUs this process may use.
    pub wait: WaitPolicy,
    /// Remove the rendezvous directory once the last node leaves (it was made for this job).
    pub remove_rendezvous: bool,
    /// Reach the peers through this simulated link (latency, bandwidth, frames delayed at
    /// random as if lost and sent again) instead of directly: for testing under delays.
    pub link: Option<LinkSpec>,
}

/// The environment variables [`JobConfig::from_env`] reads.
pub const RANK_ENV: &str = "MOSAIC_DSM_RANK";
/// See [`RANK_ENV`].
pub const SIZE_ENV: &str = "MOSAIC_DSM_SIZE";
/// See [`RANK_ENV`].
pub const RENDEZVOUS_ENV: &str = "MOSAIC_DSM_RENDEZVOUS";

/// See [`RANK_ENV`] (optional: milliseconds; 30 s by default).
pub const JOIN_TIMEOUT_ENV: &str = "MOSAIC_DSM_JOIN_TIMEOUT_MS";

/// How long a page, a lock or a barrier is waited for, in milliseconds (optional; 60 s by
/// default).
pub const FAULT_TIMEOUT_ENV: &str = "MOSAIC_DSM_FAULT_TIMEOUT_MS";

/// How the nodes reach each other (optional): `tcp` (the default) or `shm` (shared-memory rings
/// between the processes, on one host).
pub const TRANSPORT_ENV: &str = "MOSAIC_DSM_TRANSPORT";

/// How waiting threads poll (optional): `spin` or `yield` (by default `yield` when the job's
/// nodes outnumber half the CPUs, else `spin`).
pub const WAIT_ENV: &str = "MOSAIC_DSM_WAIT";

/// Who serves faults (optional): `thread` (the faulting thread, the default) or `workers` (fault
/// worker threads, for programs that hand region memory to system calls).
pub const FAULTS_ENV: &str = "MOSAIC_DSM_FAULTS";

/// Where the collective heap's pages are homed (optional): `turns` (page number modulo the
/// nodes, the default) or `first-touch` (at the node that touches each first).
pub const PLACEMENT_ENV: &str = "MOSAIC_DSM_PLACEMENT";

/// Memory servers behind each node's pages (optional; comma-separated URIs), with
/// [`BUDGET_ENV`].
pub const SERVERS_ENV: &str = "MOSAIC_DSM_SERVERS";

/// The most of the region each node keeps mapped (like `512M`; with [`SERVERS_ENV`]).
pub const BUDGET_ENV: &str = "MOSAIC_DSM_BUDGET";

/// Copies of each spilled page on distinct servers (optional; with [`SERVERS_ENV`]).
pub const COPIES_ENV: &str = "MOSAIC_DSM_COPIES";

/// Each node's arena in bytes (optional; by default the heap's size divided by the nodes).
pub const ARENA_BYTES_ENV: &str = "MOSAIC_DSM_ARENA_BYTES";

/// Where this node listens for its peers (optional; `tcp://127.0.0.1:0` by default): for a job
/// across hosts, `tcp://ADDRESS:0` with an address of this host that the others reach
/// (`mosrun --hosts` sets it).
pub const LISTEN_ENV: &str = "MOSAIC_DSM_LISTEN";

/// Reach the peers through a simulated link (optional; `mosaic-bench`'s link syntax, e.g.
/// `lat=20us,loss=0.2,rto=300us`): delays for testing.
pub const SIM_LINK_ENV: &str = "MOSAIC_DSM_SIM_LINK";

/// The default address of the shared region (the same on every node of the job).
pub const DEFAULT_ADDR: usize = 0x5000_0000_0000;

impl JobConfig {
    /// A job's settings for node `rank` of `size`, sharing `bytes` at [`DEFAULT_ADDR`], meeting
    /// in `rendezvous`, listening on a free loopback port.
    pub fn new(rank: NodeId, size: u16, rendezvous: impl Into<Rendezvous>, key: ClusterKey, bytes: u64) -> JobConfig {
        JobConfig {
            rank,
            size,
            rendezvous: rendezvous.into(),
            key,
            listen: "tcp://127.0.0.1:0".into(),
            addr: DEFAULT_ADDR,
            bytes,
            arena_bytes: None,
            first_touch: false,
            servers: Vec::new(),
            budget: None,
            copies: None,
            join_timeout: Duration::from_secs(30),
            fault_timeout: Duration::from_secs(60),
            fault_mode: FaultMode::FaultingThread,
            wait: default_wait(size),
            remove_rendezvous: false,
            link: None,
        }
    }

    /// The settings from the environment: rank, size and rendezvous directory from whatever
    /// started the process (`mosrun -n`, Open MPI, Slurm or PMI: see [`crate::launch`]), the
    /// key from `MOSAIC_CLUSTER_KEY` or `MOSAIC_CLUSTER_KEY_FILE`, and the join time-out from
    /// `MOSAIC_DSM_JOIN_TIMEOUT_MS` if set.
    pub fn from_env(bytes: u64) -> Result<JobConfig, JoinError> {
        let key = ClusterKey::from_env().map_err(|e| JoinError::Key(e.to_string()))?;
        JobConfig::from_env_with_key(bytes, key)
    }

    /// As [`from_env`](Self::from_env), with the cluster key given (the C ABI's, from
    /// `mosaic_init`).
    pub fn from_env_with_key(bytes: u64, key: ClusterKey) -> Result<JobConfig, JoinError> {
        let place = crate::launch::from_env()?;
        let mut cfg = JobConfig::new(place.rank, place.size, place.rendezvous, key, bytes);
        cfg.remove_rendezvous = place.derived;
        if let Ok(text) = std::env::var(SIM_LINK_ENV) {
            let spec = LinkSpec::parse(&text).map_err(|_| JoinError::Environment {
                name: SIM_LINK_ENV,
                why: "not a link (e.g. lat=20us,loss=0.2,rto=300us)",
            })?;
            cfg.link = Some(spec);
        }
        if let Some(t) = env_millis(FAULT_TIMEOUT_ENV)? {
            cfg.fault_timeout = t;
        }
        if let Some(t) = env_millis(JOIN_TIMEOUT_ENV)? {
            cfg.join_timeout = t;
        }
        let listen = std::env::var(LISTEN_ENV).ok().filter(|l| !l.is_empty());
        let shm = env_choice(TRANSPORT_ENV, &[("tcp", false), ("shm", true)], "not tcp or shm")? == Some(true);
        match (shm, listen) {
            (true, Some(_)) => {
                return Err(JoinError::Environment {
                    name: LISTEN_ENV,
                    why: "set with MOSAIC_DSM_TRANSPORT=shm, which joins nodes on one host only: choose one",
                })
            }
            (true, None) => cfg.listen = format!("shm://mosaic-dsm-{}-{}", std::process::id(), cfg.rank),
            (false, Some(uri)) if uri.starts_with("tcp://") => cfg.listen = uri,
            (false, Some(_)) => {
                return Err(JoinError::Environment { name: LISTEN_ENV, why: "not a tcp://ADDRESS:PORT address" })
            }
            (false, None) => {}
        }
        let waits = [("spin", WaitPolicy::spin_then_sleep(POLL)), ("yield", WaitPolicy::yield_then_sleep(POLL))];
        if let Some(wait) = env_choice(WAIT_ENV, &waits, "not spin or yield")? {
            cfg.wait = wait;
        }
        let modes = [("thread", FaultMode::FaultingThread), ("workers", FaultMode::Workers(2))];
        if let Some(mode) = env_choice(FAULTS_ENV, &modes, "not thread or workers")? {
            cfg.fault_mode = mode;
        }
        let placements = [("turns", false), ("first-touch", true)];
        if let Some(first_touch) = env_choice(PLACEMENT_ENV, &placements, "not turns or first-touch")? {
            cfg.first_touch = first_touch;
        }
        if let Ok(text) = std::env::var(SERVERS_ENV) {
            cfg.servers = text.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
        }
        if let Ok(text) = std::env::var(BUDGET_ENV) {
            let bytes = mosaic_netram::parse_size(&text)
                .map_err(|_| JoinError::Environment { name: BUDGET_ENV, why: "not a size (like 512M or 2G)" })?;
            cfg.budget = Some(bytes);
        }
        if let Ok(text) = std::env::var(COPIES_ENV) {
            let copies =
                text.trim().parse().map_err(|_| JoinError::Environment { name: COPIES_ENV, why: "not a number" })?;
            cfg.copies = Some(copies);
        }
        if let Ok(text) = std::env::var(ARENA_BYTES_ENV) {
            let bytes = text
                .trim()
                .parse()
                .map_err(|_| JoinError::Environment { name: ARENA_BYTES_ENV, why: "not a number of bytes" })?;
            cfg.arena_bytes = Some(bytes);
        }
        Ok(cfg)
    }
}

/// The smallest budget of mapped pages a node may be given.
const MIN_BUDGET_PAGES: u64 = 64;

/// How long a waiting thread polls before it sleeps.
const POLL: Duration = Duration::from_micros(100);

/// The wait policy for a job of `size` nodes on this host: yielding when the job's polling
/// threads (an application thread and at least one receiving thread per node) outnumber the
/// CPUs this process may use, spinning otherwise.
fn default_wait(size: u16) -> WaitPolicy {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if 2 * usize::from(size) > cpus {
        WaitPolicy::yield_then_sleep(POLL)
    } else {
        WaitPolicy::spin_then_sleep(POLL)
    }
}

/// What environment variable `name` chooses among `choices`, if set (`why` says what else it
/// must be).
fn env_choice<T: Copy>(name: &'static str, choices: &[(&str, T)], why: &'static str) -> Result<Option<T>, JoinError> {
    let Ok(text) = std::env::var(name) else { return Ok(None) };
    let found = choices.iter().find(|(word, _)| *word == text.trim()).map(|(_, value)| *value);
    found.map(Some).ok_or(JoinError::Environment { name, why })
}

/// A duration in milliseconds from environment variable `name`, if set.
fn env_millis(name: &'static str) -> Result<Option<Duration>, JoinError> {
    std::env::var(name)
        .ok()
        .map(|ms| {
            ms.trim()
                .parse()
                .map(Duration::from_millis)
                .map_err(|_| JoinError::Environment { name, why: "not a number of milliseconds" })
        })
        .transpose()
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
    #[error("nodes {missing:?} did not join within {waited:?} (rendezvous {at})")]
    PeersMissing {
        /// Their ranks.
        missing: Vec<NodeId>,
        /// How long this node waited.
        waited: Duration,
        /// The rendezvous directory or server.
        at: String,
    },
    /// The rendezvous server could not be reached, or refused this node.
    #[error("rendezvous server {uri}: {why}")]
    RendezvousServer {
        /// Its address.
        uri: String,
        /// Why.
        why: String,
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
    /// The memory servers behind the region cannot be used.
    #[error("memory servers behind the region")]
    MemoryServers(#[source] mosaic_netram::NetRamError),
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
    /// A lock used wrongly: unlocked by a node that does not hold it.
    #[error("lock {id}: {why}")]
    Lock {
        /// The lock.
        id: u64,
        /// What was wrong.
        why: &'static str,
    },
    /// A lock was not granted in time (the request is abandoned: the grant, when it comes, is
    /// handed straight back).
    #[error("lock {id}: not granted within {waited:?}")]
    LockTimeout {
        /// The lock.
        id: u64,
        /// How long this node waited.
        waited: Duration,
    },
    /// The job broke: a peer vanished or broke the protocol.
    #[error("the job is broken: {0}")]
    Broken(String),
    /// An allocation or a free in the shared region failed.
    #[error("{what}")]
    Alloc {
        /// What was asked: `alloc`, `alloc_local`, `free`, `free_local`.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: AllocError,
    },
    /// An address given is not one the operation can use.
    #[error("address {addr:#x}: {why}")]
    Address {
        /// The address.
        addr: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The nodes did not make the same collective call (a barrier, an allocation or a free) at
    /// the same point: the job's calls diverged.
    #[error("collective call {generation}: this node made {here}, nodes {differ:?} another call or another size")]
    Diverged {
        /// The collective call's number (0 for the first).
        generation: u64,
        /// What this node called.
        here: String,
        /// The nodes whose call differed.
        differ: Vec<NodeId>,
    },
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
    /// Pages of the region mapped here now.
    pub resident_pages: u64,
    /// Pages this node owns that are on the memory servers now, not mapped.
    pub spilled_pages: u64,
    /// Pages stored on the memory servers (each time one left).
    pub pages_stored: u64,
    /// Pages read back from the memory servers (mapped again, or sent to a peer).
    pub pages_fetched: u64,
    /// Read-only copies of other nodes' pages dropped to keep within the budget.
    pub copies_dropped: u64,
}

/// The node's protocol state and what it has mapped, under one lock.
struct Local {
    node: Node,
    /// Pages mapped here now.
    mapped: HashSet<PageNo>,
    /// Pages ever mapped here: a page this node is home of and never mapped is all zeros.
    touched: HashSet<PageNo>,
    /// Bytes that arrived with `Data`, until installed.
    staged: HashMap<PageNo, Box<Page>>,
    /// Each peer's messages, put back in the order sent.
    inorder: Inorder<Envelope>,
    /// Locks whose waiting thread gave up: released as soon as they are granted.
    abandoned: HashSet<u64>,
    /// Pages installed, made writable, write-protected or dropped so far (what faulting
    /// threads waiting on [`Shared::changed`] watch).
    changes: u64,
    /// Pages this node owns on the memory servers, and the evictor's bookkeeping.
    spill: SpillState,
}

/// One peer's outbox. Any thread may take its messages and send them (the thread that made
/// them, after releasing the node's lock; the connection thread answering that peer, in its
/// answer; else the peer's sender thread): the receiver puts them back in order by number.
struct Outbox {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    next_seq: u64,
    messages: VecDeque<Envelope>,
}

struct Shared {
    rank: NodeId,
    size: u16,
    fault_timeout: Duration,
    local: Mutex<Local>,
    /// Signalled (with `local`) when a page is installed, made writable, write-protected or
    /// dropped, or the job breaks: faulting threads that serve their own fault wait on it.
    changed: Condvar,
    /// Threads waiting on `changed` (no wake-up system call when there are none).
    waiting: AtomicU64,
    /// The region (weak: the region's source holds this, so a strong reference would be a
    /// cycle that keeps both alive after the job ends).
    core: OnceLock<std::sync::Weak<RegionCore>>,
    /// Pages of the region.
    pages: u64,
    /// Batches taken from an outbox and not yet answered.
    sending: AtomicU64,
    /// The rank each connection of a peer speaks for (set by its first message).
    callers: Mutex<HashMap<u64, NodeId>>,
    /// Connections to the peers, by rank (none to this node), once all are made.
    conns: OnceLock<Vec<Option<Connection>>>,
    outboxes: Vec<Outbox>,
    /// Barrier arrivals: generation -> ranks that arrived, each with its call's tag.
    arrivals: Mutex<HashMap<u64, HashMap<NodeId, u64>>>,
    /// The barriers node 0 (their coordinator) has arrived at: generation -> its own tag, and
    /// the node released in the answer to its arrival (the last to arrive), if any. Locked
    /// only while `arrivals` is. (If that answer is lost, that node's call fails and it alone
    /// fails the barrier; the others pass.)
    coordinating: Mutex<HashMap<u64, (u64, Option<NodeId>)>>,
    arrived: Condvar,
    /// Barrier arrivals counted (what a barrier spinning for them watches).
    arrival_count: AtomicU64,
    broken: Mutex<Option<String>>,
    /// Locks granted to this node that the waiting thread has not taken yet.
    granted: Mutex<HashSet<u64>>,
    granted_cv: Condvar,
    /// Locks a thread of this node holds or is acquiring (one thread per lock at a time).
    in_use: Mutex<HashSet<u64>>,
    in_use_cv: Condvar,
    stop: AtomicBool,
    requests: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    pages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    /// Network RAM behind this node's pages, if it has a budget.
    spill: Option<Spill>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a wait on the node ended without its answer ([`Shared::wait_until`]).
enum Unwaited {
    /// The job broke, for this reason.
    Broken(String),
    /// The deadline passed.
    TimedOut,
}

/// The longest a waiting thread sleeps before it looks again (for a broken job, a deadline).
const WAKE: Duration = Duration::from_millis(50);

impl Shared {
    /// Waits on `cv` under `m` until `done` (asked under the lock) has the answer, the job
    /// breaks, or `deadline` passes.
    fn wait_until<T, R>(
        &self,
        m: &Mutex<T>,
        cv: &Condvar,
        deadline: Instant,
        mut done: impl FnMut(&mut T) -> Option<R>,
    ) -> Result<R, Unwaited> {
        let mut guard = lock(m);
        loop {
            if let Some(r) = done(&mut guard) {
                return Ok(r);
            }
            if let Some(why) = self.broken() {
                return Err(Unwaited::Broken(why));
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|l| !l.is_zero()) else {
                return Err(Unwaited::TimedOut);
            };
            guard = cv.wait_timeout(guard, left.min(WAKE)).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    fn break_job(&self, why: String) {
        log::error!("dsm node {}: {why}", self.rank);
        lock(&self.broken).get_or_insert(why);
        self.arrived.notify_all();
        self.changed.notify_all();
    }

    /// Wakes the faulting threads waiting for a page to change, if any.
    fn page_changed(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.changed.notify_all();
        }
    }

    fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }

    /// The region, while it is mapped.
    fn core(&self) -> Result<Arc<RegionCore>, String> {
        self.core.get().and_then(std::sync::Weak::upgrade).ok_or_else(|| "the region is gone".to_string())
    }

    /// The bytes of `page` as mapped here (zeros if this node never mapped it: a page its home
    /// owns and nobody touched yet).
    fn read_page(&self, local: &Local, page: PageNo) -> Result<Box<Page>, String> {
        let mut p = Page::boxed();
        if local.mapped.contains(&page) {
            let core = self.core()?;
            let off = usize::try_from(page).expect("a region page") * PAGE_SIZE;
            // SAFETY: the page is mapped (we installed it and have not dropped it) inside the
            // live region, and write-protected or ours alone while the node's lock is held: the
            // protocol downgrades a page before sending it. 4096 bytes, no overlap with `p`.
            unsafe { std::ptr::copy_nonoverlapping(core.as_ptr().add(off), p.0.as_mut_ptr(), PAGE_SIZE) };
        } else if local.spill.spilled.contains(&page) {
            return self.fetch_spilled(page);
        } else if local.touched.contains(&page) || local.node.home_of(page) != Some(self.rank) {
            return Err(format!("page {page} is to be sent but is not mapped here"));
        }
        Ok(p)
    }

    /// Carries out `actions` of this node, then every message it sent itself meanwhile.
    fn execute(&self, local: &mut Local, actions: Vec<Action>) {
        let mut own: VecDeque<Envelope> = VecDeque::new();
        self.execute_into(local, actions, &mut own);
        while let Some(e) = own.pop_front() {
            let page = e.msg.page();
            match local.node.handle(self.rank, e.msg) {
                Ok(actions) => {
                    if let Some(bytes) = e.bytes {
                        local.staged.insert(page, bytes);
                    }
                    self.execute_into(local, actions, &mut own);
                }
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
        let core = self.core()?;
        if !matches!(a, Action::Send { .. } | Action::Granted { .. }) {
            local.changes += 1;
            self.page_changed(); // the waiters check under the node's lock, held here
        }
        log::trace!("node {}: {a:?} (mapped: {})", self.rank, local.mapped.contains(&action_page(&a)));
        match a {
            Action::Send { to, msg } => {
                let bytes = match msg {
                    Msg::Data { page } => Some(self.read_page(local, page)?),
                    _ => None,
                };
                let mut e = Envelope { from: self.rank, seq: 0, msg, bytes };
                if to == self.rank {
                    own.push_back(e);
                } else {
                    let out = self.outboxes.get(usize::from(to)).ok_or(format!("no node {to}"))?;
                    let mut q = lock(&out.queue);
                    e.seq = q.next_seq;
                    q.next_seq += 1;
                    // Its sender thread is not woken here: the thread that made the message sends
                    // it (`flush`) or answers with it, and wakes the senders for what is left
                    // (`kick`) once it has released the node's lock.
                    q.messages.push_back(e);
                }
            }
            Action::Install { page, writable } => {
                let bytes = local.staged.remove(&page).ok_or(format!("page {page} installed before it arrived"))?;
                self.forget_stored(local, page);
                if local.mapped.remove(&page) {
                    core.drop_pages(page, 1).map_err(|e| format!("page {page}: {e}"))?;
                }
                let n = core.install(page, std::slice::from_ref(&*bytes)).map_err(|e| format!("page {page}: {e}"))?;
                if n != 1 {
                    return Err(format!("page {page} was present where none was mapped"));
                }
                local.mapped.insert(page);
                local.touched.insert(page);
                self.note_mapped(local, page);
                if writable {
                    core.write_protect(page, 1, false).map_err(|e| format!("page {page}: {e}"))?;
                }
            }
            Action::Upgrade { page } => {
                local.spill.changing(page);
                if local.spill.spilled.contains(&page) {
                    // On the servers: mapped (writable) when next touched.
                } else if local.mapped.contains(&page) {
                    core.write_protect(page, 1, false).map_err(|e| format!("page {page}: {e}"))?;
                } else if local.touched.contains(&page) || local.node.home_of(page) != Some(self.rank) {
                    return Err(format!("page {page} is to be made writable but is not mapped here"));
                }
                // Else a page this node is home of that nobody touched: the fault installs it.
            }
            Action::Downgrade { page } => {
                if local.mapped.contains(&page) {
                    core.write_protect(page, 1, true).map_err(|e| format!("page {page}: {e}"))?;
                }
            }
            Action::Drop { page } => {
                self.forget_stored(local, page);
                if local.mapped.remove(&page) {
                    core.drop_pages(page, 1).map_err(|e| format!("page {page}: {e}"))?;
                }
            }
            // A page placed here by first touch: zeros until touched (mapped by the fault that
            // touches it); its waiting threads were woken above.
            Action::Placed { .. } => {}
            Action::Granted { lock: id } => {
                if local.abandoned.remove(&id) {
                    // Its waiter gave up: give the lock straight back.
                    let actions = local.node.release(id).map_err(|r| format!("lock {id}: {r:?}"))?;
                    self.execute_into(local, actions, own);
                } else {
                    lock(&self.granted).insert(id);
                    self.granted_cv.notify_all();
                }
            }
        }
        Ok(())
    }

    /// Hands a message from a peer to the protocol, in the order the peer numbered its messages
    /// (one that comes early waits for those before it), and carries out what it says.
    fn receive(&self, e: Envelope) {
        if self.broken().is_some() {
            return; // a broken node acts on nothing more: its peers' faults fail in time
        }
        let mut local = lock(&self.local);
        log::trace!("node {}: got {e:?}", self.rank);
        let from = usize::from(e.from);
        let (seq, sender) = (e.seq, e.from);
        if !local.inorder.accept(from, seq, e) {
            // The transports deliver each message once: a repeat is a peer's bug, and what else
            // it got wrong is anyone's guess. (The model checker's lossy network repeats
            // messages on purpose; there `Inorder` drops them.)
            drop(local);
            self.break_job(format!("message {seq} from node {sender} came twice"));
            return;
        }
        while let Some(e) = local.inorder.next(from) {
            let page = e.msg.page();
            match local.node.handle(e.from, e.msg) {
                Ok(actions) => {
                    // The bytes are kept only once the protocol accepted the message.
                    if let Some(bytes) = e.bytes {
                        local.staged.insert(page, bytes);
                    }
                    self.execute(&mut local, actions);
                }
                Err(err) => {
                    self.break_job(format!("node {} broke the protocol: {err}", e.from));
                    return;
                }
            }
        }
    }

    /// Takes up to [`BATCH`] of peer `to`'s waiting messages.
    /// A non-empty batch counts in `sending` until [`Shared::send`] is done with it.
    fn take(&self, to: NodeId) -> Vec<Envelope> {
        let mut q = lock(&self.outboxes[usize::from(to)].queue);
        let n = q.messages.len().min(BATCH);
        if n > 0 {
            self.sending.fetch_add(1, Ordering::AcqRel);
        }
        q.messages.drain(..n).collect()
    }

    /// Sends `batch` to peer `to` on `conn` and handles what comes back in the answer.
    fn send(&self, to: NodeId, conn: &Connection, batch: &[Envelope], buf: &mut Vec<u8>) -> Result<(), ()> {
        let r = self.send_taken(to, conn, batch, buf);
        self.sending.fetch_sub(1, Ordering::AcqRel);
        r
    }

    fn send_taken(&self, to: NodeId, conn: &Connection, batch: &[Envelope], buf: &mut Vec<u8>) -> Result<(), ()> {
        buf.clear();
        let mut pages = 0;
        for e in batch {
            pages += u64::from(e.bytes.is_some());
            if let Err(err) = wire::encode(e, buf) {
                self.break_job(format!("cannot encode {e:?}: {err}"));
                return Err(());
            }
        }
        let answer = match conn.call(METHOD_PROTOCOL, buf) {
            Ok(a) => a,
            Err(err) => {
                self.break_job(format!("node {to} is unreachable: {err}"));
                return Err(());
            }
        };
        self.count_sent(batch.len(), pages, buf.len());
        self.receive_all(to, &answer);
        Ok(())
    }

    /// Counts `messages` sent (`pages` of them pages) in `bytes` bytes.
    fn count_sent(&self, messages: usize, pages: u64, bytes: usize) {
        self.sent.fetch_add(messages as u64, Ordering::Relaxed);
        self.pages_sent.fetch_add(pages, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Handles messages from peer `from` that came in an answer.
    fn receive_all(&self, from: NodeId, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match wire::decode(bytes) {
            Ok(envelopes) if envelopes.iter().all(|e| e.from == from) => {
                self.received.fetch_add(envelopes.len() as u64, Ordering::Relaxed);
                for e in envelopes {
                    self.receive(e);
                }
            }
            Ok(_) => self.break_job(format!("node {from} answered with another node's messages")),
            Err(e) => self.break_job(format!("node {from} answered with a malformed message: {e}")),
        }
    }

    /// Sends every waiting message on the calling thread (which must hold no lock of the
    /// node's), a few rounds at most; what remains is left to the sender threads.
    fn flush(&self) {
        self.flush_until(|| false);
    }

    /// As [`flush`](Self::flush), stopping as soon as `done` says so after a round; then wakes
    /// the sender threads for whatever is left. Returns whether `done` said so.
    fn flush_until(&self, mut done: impl FnMut() -> bool) -> bool {
        let mut finished = false;
        for _ in 0..4 {
            if !self.flush_round() {
                break;
            }
            if done() {
                finished = true;
                break;
            }
        }
        self.kick();
        finished
    }

    /// Sends each peer's waiting messages once, on the calling thread (which must hold no lock
    /// of the node's), handling what the answers bring. Returns whether it sent anything (and
    /// no send failed).
    fn flush_round(&self) -> bool {
        let Some(conns) = self.conns.get() else { return false };
        let mut buf = Vec::new();
        let mut sent = false;
        for (to, conn) in conns.iter().enumerate() {
            let Some(conn) = conn else { continue };
            let to = NodeId::try_from(to).expect("at most MAX_NODES");
            let batch = self.take(to);
            if !batch.is_empty() {
                sent = true;
                if self.send(to, conn, &batch, &mut buf).is_err() {
                    return false;
                }
            }
        }
        sent
    }

    /// Wakes the sender thread of every peer with messages waiting (made by a thread that does
    /// not send them itself). Call with no lock of the node's held.
    fn kick(&self) {
        for out in &self.outboxes {
            if !lock(&out.queue).messages.is_empty() {
                out.ready.notify_one();
            }
        }
    }

    /// A sender: sends what waits in peer `to`'s outbox that no other thread took.
    fn run_sender(&self, to: NodeId, conn: Connection) {
        let out = &self.outboxes[usize::from(to)];
        let mut buf = Vec::new();
        loop {
            {
                let mut q = lock(&out.queue);
                while q.messages.is_empty() && !self.stop.load(Ordering::Acquire) {
                    q = out.ready.wait_timeout(q, WAKE).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                }
                if q.messages.is_empty() {
                    return;
                }
            }
            let batch = self.take(to);
            if !batch.is_empty() {
                if self.send(to, &conn, &batch, &mut buf).is_err() {
                    return;
                }
                // The answer's messages may have made some for other peers.
                self.kick();
            }
        }
    }
}

fn action_page(a: &Action) -> PageNo {
    match a {
        Action::Send { msg, .. } => msg.page(),
        Action::Install { page, .. }
        | Action::Upgrade { page }
        | Action::Downgrade { page }
        | Action::Drop { page }
        | Action::Placed { page } => *page,
        Action::Granted { lock } => *lock,
    }
}

/// The region's page source: faults go to the protocol.
struct Source(Arc<Shared>);

/// How asking for a page's access ended ([`Source::obtain`]).
enum Obtained<T> {
    /// Done: the answer for the pager.
    Ready(T),
    /// Not yet, and the pager will ask again (a fault worker's deferrable fault).
    Pending,
    /// Never: the time ran out or the job broke.
    Failed(FillError),
}

impl PageSource for Source {
    fn fill(&self, fault: &Fault<'_>, _page: &mut Page) -> Result<Filled, FillError> {
        let want = if fault.write { Want::Write } else { Want::Read };
        // A page is about to be mapped: within the budget, if the evictor can make room (a fault
        // worker does not wait: the budget is exceeded for a moment instead of the workers
        // blocked).
        if !fault.can_defer {
            self.0.wait_for_room(Instant::now() + self.0.fault_timeout.saturating_sub(fault.waited) / 2);
        }
        log::trace!("node {}: fault on page {} ({want:?}), waited {:?}", self.0.rank, fault.index, fault.waited);
        match self.obtain(fault, want, |local| self.present(local, fault, want)) {
            Obtained::Ready(done) => done,
            // The page is installed when it arrives (which wakes this fault's thread); the pager
            // asks again meanwhile.
            Obtained::Pending => Ok(Filled::Busy),
            // A broken node serves no fault: SIGBUS, never a page it cannot vouch for.
            Obtained::Failed(e) => Err(e),
        }
    }

    fn written(&self, fault: &Fault<'_>) -> WriteDecision {
        log::trace!("node {}: write to read-only page {}", self.0.rank, fault.index);
        match self.obtain(fault, Want::Write, |local| self.writable(local, fault)) {
            Obtained::Ready(d) => d,
            Obtained::Pending => WriteDecision::Busy,
            Obtained::Failed(_) => self.fail_write(&mut lock(&self.0.local), fault.index),
        }
    }
}

impl Source {
    /// Gets `want` access to the fault's page: asks the protocol (which sends a request unless
    /// one is out already), sends it from this thread, and returns as soon as `ready` (asked
    /// under the node's lock) has an answer. A deferrable fault that is not ready is left
    /// pending; on the faulting thread, which may block, this waits for the pages to change and
    /// asks again (the page may have come and gone meanwhile), until the fault time-out.
    fn obtain<T>(&self, fault: &Fault<'_>, want: Want, ready: impl Fn(&mut Local) -> Option<T>) -> Obtained<T> {
        let s = &self.0;
        let page = fault.index;
        let start = Instant::now();
        loop {
            if let Some(why) = s.broken() {
                return Obtained::Failed(FillError::new(PageError::Broken { page, why }));
            }
            if s.stop.load(Ordering::Acquire) {
                let why = "the node is leaving the job".to_string();
                return Obtained::Failed(FillError::new(PageError::Broken { page, why }));
            }
            let waited = fault.waited + start.elapsed();
            let Some(left) = s.fault_timeout.checked_sub(waited) else {
                return Obtained::Failed(FillError::new(PageError::TimedOut { page, waited }));
            };
            let mut local = lock(&s.local);
            if let Some(t) = ready(&mut local) {
                return Obtained::Ready(t);
            }
            let actions = local.node.fault(page, want);
            if !actions.is_empty() {
                s.requests.fetch_add(1, Ordering::Relaxed);
                s.execute(&mut local, actions);
                // A request to this node itself may be done already.
                if let Some(t) = ready(&mut local) {
                    drop(local);
                    s.kick();
                    return Obtained::Ready(t);
                }
                drop(local);
                // Sent from here, not by a sender thread woken for it: the answer (often the
                // page itself) comes back on this call and is installed here too. As soon as
                // the access is allowed the fault returns; what follows (the `Done` to the
                // home) is left to the sender threads.
                let mut got = None;
                s.flush_until(|| {
                    got = ready(&mut lock(&s.local));
                    got.is_some()
                });
                if let Some(t) = got {
                    return Obtained::Ready(t);
                }
                local = lock(&s.local);
                if let Some(t) = ready(&mut local) {
                    return Obtained::Ready(t);
                }
            }
            if fault.can_defer {
                return Obtained::Pending;
            }
            // Wait for any page to change (checked under the lock held since `ready`, so no
            // change is missed), then ask again.
            let seen = local.changes;
            s.waiting.fetch_add(1, Ordering::AcqRel);
            let (local, _) = s
                .changed
                .wait_timeout_while(local, left.min(WAKE), |l| l.changes == seen)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.waiting.fetch_sub(1, Ordering::AcqRel);
            drop(local);
        }
    }

    /// A write that cannot go ahead. The node breaks (it acts on no message any more and every
    /// fault on it fails), the page goes, and the retried write faults as a missing page, whose
    /// fill raises SIGBUS: failed, never fed zeros.
    fn fail_write(&self, local: &mut Local, page: PageNo) -> WriteDecision {
        let s = &self.0;
        s.break_job(format!("page {page}: no write access within {:?}", s.fault_timeout));
        if local.mapped.remove(&page) {
            if let Ok(core) = s.core() {
                let _ = core.drop_pages(page, 1);
            }
        }
        WriteDecision::Retry
    }

    /// The answer to a missing-page fault whose access the protocol allows now: the page is
    /// mapped (installed when it arrived), or this node is its home and nobody touched it yet
    /// (zeros, installed here under the lock: the pager must install nothing itself, since the
    /// page may be dropped again as soon as the lock is released). `None` if not allowed.
    fn present(&self, local: &mut Local, fault: &Fault<'_>, want: Want) -> Option<Result<Filled, FillError>> {
        let s = &self.0;
        let page = fault.index;
        let access = local.node.access(page);
        if !want.allowed_by(access) {
            return None;
        }
        if local.mapped.contains(&page) {
            return Some(Ok(Filled::Present));
        }
        if local.spill.spilled.contains(&page) {
            return Some(match s.unspill(local, page, fault.write) {
                Ok(()) => Ok(Filled::Present),
                Err(why) => {
                    // Owned here and lost with its memory servers: the job cannot go on.
                    s.break_job(why.clone());
                    Err(FillError::new(PageError::Broken { page, why }))
                }
            });
        }
        if local.touched.contains(&page) || local.node.home_of(page) != Some(s.rank) {
            let why = format!("page {page}: allowed here but not mapped");
            s.break_job(why.clone());
            return Some(Err(FillError::new(PageError::Broken { page, why })));
        }
        let core = fault.region;
        let installed = core.install(page, std::slice::from_ref(&Page::ZERO)).and_then(|_| {
            if access == Access::Write {
                core.write_protect(page, 1, false)
            } else {
                Ok(())
            }
        });
        Some(match installed {
            Ok(()) => {
                local.mapped.insert(page);
                local.touched.insert(page);
                s.note_mapped(local, page);
                Ok(Filled::Present)
            }
            Err(e) => Err(FillError::new(e)),
        })
    }

    /// The answer to a write to a read-only page that may proceed now, made writable here under
    /// the lock (the pager's own unprotect would come after the lock is released and could undo
    /// a downgrade made meanwhile); `None` if it may not yet.
    fn writable(&self, local: &mut Local, fault: &Fault<'_>) -> Option<WriteDecision> {
        let s = &self.0;
        if !local.mapped.contains(&fault.index) {
            // Dropped, or gone to the memory servers, meanwhile: the write retries and faults
            // as a missing page.
            return Some(WriteDecision::Retry);
        }
        match local.node.access(fault.index) {
            Access::Write => {
                // Written from now on: a copy on its way to the servers is stale.
                local.spill.changing(fault.index);
                if let Err(e) = fault.unprotect() {
                    s.break_job(format!("page {}: {e}", fault.index));
                }
                Some(WriteDecision::Proceed)
            }
            // Dropped meanwhile: the write retries and faults as a missing page.
            Access::None => Some(WriteDecision::Retry),
            Access::Read => None,
        }
    }
}

/// A barrier arrival's payload: the arriving node, the barrier's generation, and the tag of the
/// collective call it belongs to (every node's must be the same).
fn encode_arrival(from: NodeId, generation: u64, tag: u64) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..2].copy_from_slice(&from.to_le_bytes());
    b[2..10].copy_from_slice(&generation.to_le_bytes());
    b[10..].copy_from_slice(&tag.to_le_bytes());
    b
}

fn decode_arrival(b: &[u8]) -> Option<(NodeId, u64, u64)> {
    let b: &[u8; 18] = b.try_into().ok()?;
    let u64_at = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
    Some((u16::from_le_bytes([b[0], b[1]]), u64_at(2)?, u64_at(10)?))
}

/// The nodes among `here` (arrivals, each with its call's tag) whose tag is not `own`, as a set.
fn differing(here: &HashMap<NodeId, u64>, own: u64) -> u64 {
    here.iter().filter(|(_, t)| **t != own).fold(0u64, |set, (n, _)| set | 1 << n)
}

/// A barrier's outcome from the set of nodes whose call differed from the coordinator's.
fn diverged(generation: u64, differ: u64) -> Result<(), JoinError> {
    if differ == 0 {
        return Ok(());
    }
    let differ = (0..64).filter(|n| differ & (1 << n) != 0).collect();
    Err(JoinError::Diverged { generation, here: String::new(), differ })
}

/// The tag of a plain barrier (leaving is one too).
const TAG_BARRIER: u64 = 0;

/// The tag of a collective call other than a barrier: its kind and arguments, hashed (never
/// [`TAG_BARRIER`]).
fn call_tag(kind: &str, args: &[u64]) -> u64 {
    // FNV-1a: the same on every node whatever the toolchain that built it.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in kind.bytes().chain(args.iter().flat_map(|a| a.to_le_bytes())) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h | 1
}

/// Receives peers' messages, on the connection's server thread.
struct Inbox(Arc<Shared>);

impl Service for Inbox {
    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let s = &self.0;
        if method == METHOD_BARRIER {
            let (from, generation, tag) = decode_arrival(request)
                .filter(|(from, _, _)| *from < s.size && *from != s.rank)
                .ok_or_else(|| ServiceError::new(Status::BadRequest, "a malformed barrier arrival"))?;
            let mut arrivals = lock(&s.arrivals);
            let here = arrivals.entry(generation).or_default();
            here.insert(from, tag);
            // The coordinator is in this barrier already and this is the last arrival: the
            // release goes back in the answer (one call instead of two, and the caller waits for
            // no second one). The coordinator then calls only the nodes released otherwise.
            if s.rank == 0 && here.len() + 1 == usize::from(s.size) {
                if let Some((own, released)) = lock(&s.coordinating).get_mut(&generation) {
                    response.extend_from_slice(&differing(here, *own).to_le_bytes());
                    *released = Some(from);
                }
            }
            drop(arrivals);
            s.arrival_count.fetch_add(1, Ordering::AcqRel);
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
        let Some(from) = envelopes.first().map(|e| e.from) else { return Ok(()) };
        if envelopes.iter().any(|e| e.from != from) {
            return Err(ServiceError::new(Status::BadRequest, "messages of several nodes in one call"));
        }
        // A connection speaks for one node: the one its first message named.
        if *lock(&s.callers).entry(caller.id).or_insert(from) != from {
            return Err(ServiceError::new(Status::BadRequest, "messages of another node on this connection"));
        }
        if let Some(e) = envelopes.iter().find(|e| !e.msg.is_lock() && e.msg.page() >= s.pages) {
            return Err(ServiceError::new(Status::BadRequest, format!("page {} is beyond the region", e.msg.page())));
        }
        s.received.fetch_add(envelopes.len() as u64, Ordering::Relaxed);
        for e in envelopes {
            s.receive(e);
        }
        // What this node has for the caller goes back in the answer (the page it asked for,
        // above all): no sender thread to wake, no second connection. Sending from here on this
        // thread could deadlock (two nodes' connection threads each waiting for the other's).
        let answer = s.take(from);
        let answered_from = response.len();
        let mut pages = 0;
        let mut encoded = Ok(());
        for e in &answer {
            pages += u64::from(e.bytes.is_some());
            if let Err(err) = wire::encode(e, response) {
                s.break_job(format!("cannot encode {e:?}: {err}"));
                encoded = Err(ServiceError::new(Status::Handler, err.to_string()));
                break;
            }
        }
        if !answer.is_empty() {
            s.sending.fetch_sub(1, Ordering::AcqRel); // counted by `take`; on its way now
        }
        // What this node has for other peers (a recall, invalidations) goes by their senders.
        s.kick();
        encoded?;
        s.count_sent(answer.len(), pages, response.len() - answered_from);
        Ok(())
    }
}

/// This process's node of a DSM job: the shared region and the threads that keep it coherent.
pub struct Job {
    shared: Arc<Shared>,
    /// The region's first byte and size (the heap, then the arenas).
    base: usize,
    region_bytes: usize,
    /// The collective heap's size in bytes.
    heap_bytes: usize,
    /// The collective heap's allocator (the same on every node: collective calls keep it so).
    heap: Mutex<Arena>,
    /// This node's arena's allocator.
    arena: Mutex<Arena>,
    /// Whether `join` completed (only then does leaving wait for the others).
    joined: bool,
    /// This node's address in the rendezvous directory, removed when it leaves.
    published: Option<PathBuf>,
    /// Whether the rendezvous directory goes too once empty.
    remove_rendezvous: bool,

    region: Option<Region>,
    server: Option<Server>,
    threads: Vec<JoinHandle<()>>,
    peers: Vec<Option<Connection>>,
    /// Barriers this node entered.
    barriers: AtomicU64,
    /// How its threads poll while waiting.
    wait: WaitPolicy,
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
        let heap_pages = cfg.bytes / page;
        let arena_pages = match cfg.arena_bytes {
            Some(b) if b % page != 0 => {
                return Err(JoinError::Config(format!("an arena of {b} bytes: not a whole number of pages")))
            }
            Some(b) => b / page,
            None => heap_pages.div_ceil(u64::from(cfg.size)),
        };
        let total_pages = u64::from(cfg.size)
            .checked_mul(arena_pages)
            .and_then(|a| a.checked_add(heap_pages))
            .filter(|p| {
                let bytes = p.checked_mul(page).and_then(|b| usize::try_from(b).ok());
                bytes.and_then(|b| cfg.addr.checked_add(b)).is_some()
            })
            .ok_or_else(|| JoinError::Config("the heap and the arenas do not fit in the address space".into()))?;
        let mut homes = Homes::with_arenas(cfg.size, heap_pages, arena_pages);
        if cfg.first_touch {
            homes = homes.first_touch();
        }
        let node = Node::with_homes(cfg.rank, homes).map_err(|e: ProtocolError| JoinError::Config(e.to_string()))?;
        let spill = match (&cfg.budget, cfg.servers.is_empty()) {
            (None, true) => None,
            (Some(_), true) => {
                return Err(JoinError::Config(format!(
                    "a budget but no memory servers to hold what exceeds it (set {SERVERS_ENV})"
                )))
            }
            (None, false) => return Err(JoinError::Config(format!("memory servers but no budget (set {BUDGET_ENV})"))),
            (Some(bytes), false) => {
                let pages = bytes / page;
                if pages < MIN_BUDGET_PAGES {
                    return Err(JoinError::Config(format!(
                        "a budget of {bytes} bytes: at least {MIN_BUDGET_PAGES} pages ({} KiB)",
                        MIN_BUDGET_PAGES * page / 1024
                    )));
                }
                let copies = cfg.copies.unwrap_or(if cfg.servers.len() >= 2 { 2 } else { 1 });
                let store = mosaic_netram::PageStore::connect(&cfg.servers, &cfg.key, copies)
                    .map_err(JoinError::MemoryServers)?;
                Some(Spill::new(store, pages))
            }
        };
        let shared = Arc::new(Shared {
            rank: cfg.rank,
            size: cfg.size,
            fault_timeout: cfg.fault_timeout,
            changed: Condvar::new(),
            waiting: AtomicU64::new(0),
            local: Mutex::new(Local {
                node,
                mapped: HashSet::new(),
                touched: HashSet::new(),
                staged: HashMap::new(),
                inorder: Inorder::new(usize::from(cfg.size)),
                abandoned: HashSet::new(),
                changes: 0,
                spill: SpillState::default(),
            }),
            core: OnceLock::new(),
            pages: total_pages,
            sending: AtomicU64::new(0),
            callers: Mutex::new(HashMap::new()),
            conns: OnceLock::new(),
            outboxes: (0..cfg.size)
                .map(|_| Outbox { queue: Mutex::new(Queue::default()), ready: Condvar::new() })
                .collect(),
            arrivals: Mutex::new(HashMap::new()),
            coordinating: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
            arrival_count: AtomicU64::new(0),
            broken: Mutex::new(None),
            granted: Mutex::new(HashSet::new()),
            granted_cv: Condvar::new(),
            in_use: Mutex::new(HashSet::new()),
            in_use_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            pages_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            spill,
        });
        let rcfg = RegionConfig::new(total_pages)
            .fixed_addr(cfg.addr)
            .mode(cfg.fault_mode)
            .dirty(DirtyTracking::Faults)
            .report_discards(false)
            .name(format!("dsm node {}", cfg.rank));
        let region = Region::new(rcfg, Source(shared.clone())).map_err(JoinError::Region)?;
        let _ = shared.core.set(Arc::downgrade(&region.core()));
        let core = region.core();
        let (arena_start, arena_len) = homes.arena_of(cfg.rank);
        let mut job = Job {
            base: core.as_ptr() as usize,
            region_bytes: core.len(),
            heap_bytes: core.len().min(usize::try_from(cfg.bytes).unwrap_or(usize::MAX)),
            heap: Mutex::new(Arena::new(0, cfg.bytes)),
            arena: Mutex::new(Arena::new(arena_start * page, arena_len * page)),
            joined: false,
            published: None,
            remove_rendezvous: cfg.remove_rendezvous,

            shared: shared.clone(),
            region: Some(region),
            server: None,
            threads: Vec::new(),
            peers: Vec::new(),
            barriers: AtomicU64::new(0),
            wait: cfg.wait,
            join_timeout: cfg.join_timeout,
        };
        let scfg = ServerConfig::new(cfg.key.clone()).service(Inbox(shared.clone())).policy(cfg.wait).prompt(true);
        let server =
            listen(&cfg.listen, scfg).map_err(|source| JoinError::Listen { uri: cfg.listen.clone(), source })?;
        if server.uri().contains("://0.0.0.0:") || server.uri().contains("://[::]:") {
            return Err(JoinError::Config(format!(
                "listening on {}: the other nodes reach this one by the address it publishes, so give a definite one",
                server.uri()
            )));
        }
        let uris =
            crate::rendezvous::meet(&cfg.rendezvous, &cfg.key, cfg.rank, cfg.size, server.uri(), cfg.join_timeout)?;
        job.server = Some(server);
        let deadline = Instant::now() + cfg.join_timeout;
        let opts = ConnectOptions::new(cfg.key.clone()).policy(cfg.wait);
        for (rank, uri) in uris.iter().enumerate() {
            let rank = NodeId::try_from(rank).expect("at most MAX_NODES");
            if rank == cfg.rank {
                job.peers.push(None);
                continue;
            }
            let conn = loop {
                let attempt = match &cfg.link {
                    // Each pair of nodes draws its own delays. (The link runs on its own: its
                    // control handle is not needed.)
                    Some(spec) => {
                        let mut spec = spec.clone();
                        spec.seed ^= (u64::from(cfg.rank) << 16 | u64::from(rank)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        connect_sim(uri, spec, &opts).map(|(c, _link)| c)
                    }
                    None => connect(uri, &opts),
                };
                match attempt {
                    Ok(c) => break c,
                    Err(source) if Instant::now() >= deadline => {
                        return Err(JoinError::Connect { rank, uri: uri.clone(), source })
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            job.peers.push(Some(conn));
        }
        let _ = shared.conns.set(job.peers.clone());
        for (rank, conn) in job.peers.iter().enumerate() {
            let Some(conn) = conn.clone() else { continue };
            let rank = NodeId::try_from(rank).expect("at most MAX_NODES");
            let sender = shared.clone();
            job.threads.push(spawn("mosaic-dsm-send", move || {
                mosaic_page::sched::serves();
                sender.run_sender(rank, conn)
            }));
        }
        if shared.spill.is_some() {
            let evictor = shared.clone();
            job.threads.push(spawn("mosaic-dsm-evict", move || evictor.run_evictor()));
        }
        job.joined = true;
        // Removed when this node leaves (a failed join leaves it: the others' errors then name
        // the node that really did not come).
        if let Rendezvous::Dir(dir) = &cfg.rendezvous {
            job.published = Some(crate::rendezvous::published_file(dir, cfg.rank));
        }
        // Every node must see the same region: the same address, heap and arenas (each reads its
        // own environment), or they would disagree about pages' homes.
        let layout = [cfg.addr as u64, cfg.bytes, arena_pages, u64::from(cfg.first_touch)];
        match job.arrive_and_wait(JOINING, call_tag("layout", &layout), cfg.join_timeout) {
            Ok(()) => Ok(job),
            Err(JoinError::Diverged { differ, .. }) => Err(JoinError::Config(format!(
                "nodes {differ:?} map the shared region otherwise than this node (at {:#x}, a heap of {} bytes, \
                 arenas of {} bytes, placed {}): every node must be given the same size, \
                 MOSAIC_DSM_ARENA_BYTES and MOSAIC_DSM_PLACEMENT",
                cfg.addr,
                cfg.bytes,
                arena_pages * page,
                if cfg.first_touch { "by first touch" } else { "by turns" }
            ))),
            Err(e) => Err(e),
        }
    }

    /// The first byte of the shared region and of its collective heap (the same address on
    /// every node). A program may lay the heap's [`len`](Self::len) bytes out itself, or
    /// allocate from it with [`alloc`](Self::alloc): one or the other.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// The collective heap's size in bytes (the job's `bytes`; the nodes' arenas follow it).
    pub fn len(&self) -> usize {
        self.heap_bytes
    }

    /// Whether the heap is empty (never: a job's heap has at least a page).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole shared region's size in bytes: the heap and every node's arena.
    pub fn region_len(&self) -> usize {
        self.region_bytes
    }

    /// Whether `addr` is inside the shared region (the heap or any node's arena).
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.base && addr - self.base < self.region_bytes
    }

    /// Allocates `bytes` from the collective heap: a collective call (every node calls it, in
    /// the same order with the same size, like `MPI_Win_allocate`; one thread of each node) that
    /// returns the same address on every node. Blocks of a page or more are page-aligned, smaller
    /// ones 64-byte aligned; their pages' homes take turns among the nodes. The bytes are zero
    /// the first time, and what the last user left when a freed block is reused. Nodes that
    /// call differently get [`JoinError::Diverged`].
    pub fn alloc(&self, bytes: u64) -> Result<*mut u8, JoinError> {
        let mut heap = lock(&self.heap);
        let got = heap.alloc(bytes);
        let tag = match &got {
            Ok(at) => call_tag("alloc", &[bytes, *at]),
            Err(_) => call_tag("alloc failed", &[bytes]),
        };
        let agreed = self.collective(tag, || format!("alloc({bytes})"), self.shared.fault_timeout);
        match (got, agreed) {
            (Ok(at), Ok(())) => Ok(self.at(at)),
            (Ok(at), Err(e)) => {
                // Every node learns of a divergence and takes its block back; any other failure
                // may have left other nodes with the block: the heaps can no longer be trusted.
                let _ = heap.free(at);
                self.untrusted_heap("alloc", &e);
                Err(e)
            }
            (Err(source), _) => Err(JoinError::Alloc { what: "alloc", source }),
        }
    }

    /// Frees a block of the collective heap (from [`alloc`](Self::alloc)): a collective call,
    /// with the same address on every node.
    pub fn free(&self, ptr: *mut u8) -> Result<(), JoinError> {
        let addr = ptr as usize;
        let offset = addr.checked_sub(self.base).filter(|o| *o < self.heap_bytes).map(|o| o as u64);
        let mut heap = lock(&self.heap);
        let len = offset.and_then(|o| heap.block(o));
        let tag = match (offset, len) {
            (Some(o), Some(_)) => call_tag("free", &[o]),
            _ => call_tag("free failed", &[addr as u64]),
        };
        self.collective(tag, || format!("free({addr:#x})"), self.shared.fault_timeout)
            .inspect_err(|e| self.untrusted_heap("free", e))?;
        match offset {
            Some(o) => heap.free(o).map(drop).map_err(|source| JoinError::Alloc { what: "free", source }),
            None => Err(JoinError::Address { addr, why: "not in the collective heap" }),
        }
    }

    /// After collective call `what` failed with `e`: unless every node saw the same divergence
    /// (and undid its part), the nodes' heaps may differ from now on, so the job breaks.
    fn untrusted_heap(&self, what: &str, e: &JoinError) {
        if !matches!(e, JoinError::Diverged { .. }) {
            self.shared.break_job(format!("{what} failed on this node, perhaps not on the others: {e}"));
        }
    }

    /// Allocates `bytes` from this node's arena (any thread, no other node involved): this node
    /// is home of the block's pages, so it reads and writes them without asking anyone until
    /// another node touches them. The address is valid on every node: pass it on through shared
    /// memory. Alignment and contents as with [`alloc`](Self::alloc).
    pub fn alloc_local(&self, bytes: u64) -> Result<*mut u8, JoinError> {
        let at = lock(&self.arena).alloc(bytes).map_err(|source| JoinError::Alloc { what: "alloc_local", source })?;
        Ok(self.at(at))
    }

    /// Frees a block of this node's arena (from [`alloc_local`](Self::alloc_local) on this node).
    pub fn free_local(&self, ptr: *mut u8) -> Result<(), JoinError> {
        let addr = ptr as usize;
        if !self.contains(addr) {
            return Err(JoinError::Address { addr, why: "not in the shared region" });
        }
        lock(&self.arena)
            .free((addr - self.base) as u64)
            .map(drop)
            .map_err(|source| JoinError::Alloc { what: "free_local", source })
    }

    /// The address of `offset` (from the allocators: inside the region).
    fn at(&self, offset: u64) -> *mut u8 {
        self.base.wrapping_add(usize::try_from(offset).unwrap_or(usize::MAX)) as *mut u8
    }

    /// The 8-byte word at `addr` as an atomic, if it is in the region and aligned.
    fn word(&self, addr: *mut u64) -> Result<&AtomicU64, JoinError> {
        let a = addr as usize;
        if !self.contains(a) {
            return Err(JoinError::Address { addr: a, why: "not in the shared region" });
        }
        if a % 8 != 0 {
            return Err(JoinError::Address { addr: a, why: "not 8-byte aligned" });
        }
        if let Some(why) = self.shared.broken() {
            return Err(JoinError::Broken(why));
        }
        // SAFETY: `a` is an aligned word inside the region, which stays mapped (its missing pages
        // are filled by the fault handler) for as long as `self` lives, and the borrow does not
        // outlive `self`. The region is memory shared with code outside Rust's view (other
        // threads, the C ABI), which is why its words are only ever reached through atomics here.
        Ok(unsafe { AtomicU64::from_ptr(addr) })
    }

    /// Adds `value` to the 64-bit word at `addr` (in the region, 8-byte aligned), atomically
    /// across every thread of every node, and returns what it held before (wrapping on
    /// overflow). The word's page comes to this node with write access, as for any write, and
    /// the add is one atomic instruction on it: a page has one writer at a time.
    pub fn fetch_add(&self, addr: *mut u64, value: u64) -> Result<u64, JoinError> {
        Ok(self.word(addr)?.fetch_add(value, Ordering::SeqCst))
    }

    /// Stores `new` in the 64-bit word at `addr` if it holds `current`, atomically across every
    /// thread of every node: `Ok` with the value before if it was stored, `Err` with the value
    /// found if not (the outer result is the call's failure: a bad address, a broken job).
    pub fn compare_exchange(&self, addr: *mut u64, current: u64, new: u64) -> Result<Result<u64, u64>, JoinError> {
        Ok(self.word(addr)?.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst))
    }

    /// Reads the 64-bit word at `addr` atomically (sequentially consistent with every other
    /// access to it).
    pub fn load(&self, addr: *mut u64) -> Result<u64, JoinError> {
        Ok(self.word(addr)?.load(Ordering::SeqCst))
    }

    /// The home of the page holding `addr` as this node knows it: the node that serialises the
    /// requests for it and keeps it when nobody else uses it. `None` for a page placed by first
    /// touch ([`JobConfig::first_touch`]) that this node never touched.
    pub fn home_of(&self, addr: *const u8) -> Result<Option<NodeId>, JoinError> {
        let a = addr as usize;
        if !self.contains(a) {
            return Err(JoinError::Address { addr: a, why: "outside the shared region" });
        }
        let page = ((a - self.base) / PAGE_SIZE) as PageNo;
        Ok(lock(&self.shared.local).node.home_of(page))
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
        let (resident_pages, spilled_pages) = {
            let local = lock(&s.local);
            (local.mapped.len() as u64, local.spill.spilled.len() as u64)
        };
        let spilled = |f: fn(&Spill) -> &AtomicU64| s.spill.as_ref().map_or(0, |sp| f(sp).load(Ordering::Relaxed));
        JobStats {
            requests: s.requests.load(Ordering::Relaxed),
            messages_sent: s.sent.load(Ordering::Relaxed),
            messages_received: s.received.load(Ordering::Relaxed),
            pages_sent: s.pages_sent.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
            resident_pages,
            spilled_pages,
            pages_stored: spilled(|sp| &sp.stored),
            pages_fetched: spilled(|sp| &sp.fetched),
            copies_dropped: spilled(|sp| &sp.dropped_copies),
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
        self.collective(TAG_BARRIER, || "a barrier".into(), timeout)
    }

    /// A collective call: the next barrier, which every node must enter with the same `tag` (a
    /// hash of its call and arguments; `here` describes this node's, for the error).
    fn collective(&self, tag: u64, here: impl FnOnce() -> String, timeout: Duration) -> Result<(), JoinError> {
        let generation = self.barriers.fetch_add(1, Ordering::AcqRel);
        self.arrive_and_wait(generation, tag, timeout).map_err(|e| match e {
            JoinError::Diverged { generation, differ, .. } => JoinError::Diverged { generation, here: here(), differ },
            e => e,
        })
    }

    /// Arrives at barrier `generation` with `tag` and waits for every other node's arrival.
    fn arrive_and_wait(&self, generation: u64, tag: u64, timeout: Duration) -> Result<(), JoinError> {
        let s = &self.shared;
        // The protocol's messages first (acknowledgements, `Done`s), so that the peers have them
        // when they leave the barrier.
        s.flush();
        if generation == LEAVING {
            // Leaving: nothing may still be on its way, or a node could go while another still
            // sends it what the protocol needs. (A plain barrier need not wait: the region is
            // sequentially consistent whatever is in flight.)
            let start = Instant::now();
            while s.sending.load(Ordering::Acquire) > 0
                || s.outboxes.iter().any(|o| !lock(&o.queue).messages.is_empty())
            {
                if start.elapsed() >= timeout {
                    break;
                }
                s.flush();
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // A coordinated barrier: every node tells node 0 it arrived (one call each); node 0,
        // once all have, tells each that the barrier is over, and whether their calls agreed:
        // the last to arrive in the answer to its call when node 0 was there already, the others
        // by a call of node 0's. (Calls cross in one direction at a time: when every node called
        // every other at once, the calls and the threads answering them fought for the CPUs.
        // Every node of a job runs the same build: one that expects a call would wait for it.)
        if s.size == 1 {
            return Ok(()); // nobody to wait for, nobody to disagree
        }
        let coordinator: NodeId = 0;
        let call = |to: NodeId, tag: u64| -> Result<Vec<u8>, JoinError> {
            let conn =
                self.peers[usize::from(to)].as_ref().ok_or_else(|| JoinError::Broken(format!("no node {to}")))?;
            let message = encode_arrival(s.rank, generation, tag);
            conn.call(METHOD_BARRIER, &message).map_err(|e| JoinError::Broken(format!("{}: {e}", conn.peer())))
        };
        if s.rank != coordinator {
            // The last to arrive is released in the answer.
            if let Ok(differ) = <[u8; 8]>::try_from(call(coordinator, tag)?.as_slice()) {
                return diverged(generation, u64::from_le_bytes(differ));
            }
            // The coordinator's word: the nodes whose calls differed from its own, as a set.
            let differ = self
                .wait_arrivals(generation, timeout, |here| here.get(&coordinator).copied())
                .map_err(|waited| self.barrier_failed(generation, vec![coordinator], waited))?;
            return diverged(generation, differ);
        }
        let others = usize::from(s.size) - 1;
        {
            let _arrivals = lock(&s.arrivals);
            lock(&s.coordinating).insert(generation, (tag, None));
        }
        let waited = self.wait_arrivals(generation, timeout, |here| (here.len() >= others).then(|| here.clone()));
        // Decided under one lock: the last arrival may have come (and been released in its
        // answer) just after the wait gave up; then the barrier passed for every node.
        let (released, outcome) = {
            let mut arrivals = lock(&s.arrivals);
            let released = lock(&s.coordinating).remove(&generation).and_then(|(_, r)| r);
            let outcome = match waited {
                Ok(here) => Ok(here),
                Err(_) if released.is_some() => Ok(arrivals.remove(&generation).unwrap_or_default()),
                Err(waited) => Err((waited, arrivals.remove(&generation).unwrap_or_default())),
            };
            (released, outcome)
        };
        let here = outcome.map_err(|(waited, here)| {
            let missing = (0..s.size).filter(|r| *r != s.rank && !here.contains_key(r)).collect();
            self.barrier_failed(generation, missing, waited)
        })?;
        let differ = differing(&here, tag);
        for to in (0..s.size).filter(|r| *r != s.rank && released != Some(*r)) {
            call(to, differ)?;
        }
        diverged(generation, differ)
    }

    /// Why a barrier failed: the job broke, or nodes `missing` did not come within `waited`.
    fn barrier_failed(&self, generation: u64, missing: Vec<NodeId>, waited: Duration) -> JoinError {
        match self.shared.broken() {
            Some(why) => JoinError::Broken(why),
            None => JoinError::Barrier { generation, missing, waited },
        }
    }

    /// Waits until `done` finds what it needs among barrier `generation`'s messages (which it
    /// then takes), the job breaks, or `timeout` passes (`Err` with the time waited).
    fn wait_arrivals<T>(
        &self,
        generation: u64,
        timeout: Duration,
        done: impl Fn(&HashMap<NodeId, u64>) -> Option<T>,
    ) -> Result<T, Duration> {
        let s = &self.shared;
        let start = Instant::now();
        let take = |arrivals: &mut HashMap<u64, HashMap<NodeId, u64>>| {
            let t = arrivals.get(&generation).and_then(&done)?;
            arrivals.remove(&generation);
            Some(t)
        };
        // The others are usually close behind: watch for their messages on this CPU for a while
        // rather than sleep (a wake-up costs more than the whole barrier), as the job's wait
        // policy says (yielding gives the CPU to the threads receiving them), but without
        // yielding once a CPU-bound thread took the CPU for a slice (see `mosaic_page::sched`).
        let until = start + BARRIER_SPIN.min(timeout);
        if let Some(mut poll) = Poll::start() {
            'polling: while s.broken().is_none() {
                let seen = s.arrival_count.load(Ordering::Acquire);
                if let Some(t) = take(&mut lock(&s.arrivals)) {
                    return Ok(t);
                }
                while s.arrival_count.load(Ordering::Acquire) == seen {
                    if !poll.on(Instant::now(), until) {
                        break 'polling;
                    }
                    self.wait.pause(&poll);
                }
            }
        }
        s.wait_until(&s.arrivals, &s.arrived, start + timeout, take).map_err(|_| start.elapsed())
    }

    /// Takes DSM lock `id` (any number; its home is `id` modulo the nodes, which grants it to
    /// nodes in the order they asked). One thread of a node holds a lock at a time: another
    /// thread of the same node waits here until it is unlocked. What the holder before wrote to
    /// the region is seen by this node afterwards (the region is sequentially consistent).
    pub fn lock(&self, id: u64) -> Result<(), JoinError> {
        let s = &self.shared;
        let deadline = Instant::now() + s.fault_timeout;
        let failure = |u| match u {
            Unwaited::Broken(why) => JoinError::Broken(why),
            Unwaited::TimedOut => JoinError::LockTimeout { id, waited: s.fault_timeout },
        };
        // This node's turn first: one thread of a node per lock.
        s.wait_until(&s.in_use, &s.in_use_cv, deadline, |in_use| in_use.insert(id).then_some(())).map_err(failure)?;
        let result = (|| {
            {
                let mut local = lock(&s.local);
                let actions = local
                    .node
                    .acquire(id)
                    .map_err(|_| JoinError::Lock { id, why: "this node holds or awaits it already" })?;
                s.execute(&mut local, actions);
            }
            s.flush();
            let gave_up = match s.wait_until(&s.granted, &s.granted_cv, deadline, |g| g.remove(&id).then_some(())) {
                Ok(()) => return Ok(()),
                Err(u) => failure(u),
            };
            // Giving up: settled under the node's lock, which grants are handled under. A grant
            // that came meanwhile is kept (the lock is ours after all); otherwise the request is
            // abandoned, and the grant, when it comes, is handed straight back.
            let mut local = lock(&s.local);
            if local.node.holds(id) {
                lock(&s.granted).remove(&id);
                return Ok(());
            }
            local.abandoned.insert(id);
            Err(gave_up)
        })();
        if result.is_err() {
            lock(&s.in_use).remove(&id);
            s.in_use_cv.notify_all();
        }
        result
    }

    /// Gives DSM lock `id` up (taken by [`lock`](Self::lock) on this node).
    pub fn unlock(&self, id: u64) -> Result<(), JoinError> {
        let s = &self.shared;
        {
            let mut local = lock(&s.local);
            let actions =
                local.node.release(id).map_err(|_| JoinError::Lock { id, why: "this node does not hold it" })?;
            s.execute(&mut local, actions);
        }
        s.flush();
        lock(&s.in_use).remove(&id);
        s.in_use_cv.notify_all();
        Ok(())
    }

    /// Leaves the job: waits (a barrier, within the join time-out) until every node is done with
    /// the region, so none still needs a page this node holds, then stops this node's threads and
    /// unmaps the region. Dropping a `Job` does the same, logging what goes wrong.
    pub fn leave(mut self) -> Result<(), JoinError> {
        self.shared.stop_evictor();
        let r = self.arrive_and_wait(LEAVING, TAG_BARRIER, self.join_timeout);
        self.stop();
        r
    }

    fn stop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::Release);
        for o in &s.outboxes {
            o.ready.notify_all();
        }
        if let Some(spill) = &s.spill {
            spill.work.notify_all();
        }
        // A thread still waiting for a page gives up now (SIGBUS), not at its time-out.
        {
            let _local = lock(&s.local);
            s.changed.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        if let Some(f) = self.published.take() {
            let _ = std::fs::remove_file(&f);
            if self.remove_rendezvous {
                // Only once empty: the last node to leave removes it.
                if let Some(dir) = f.parent() {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
        self.region.take();
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.region.is_none() {
            return;
        }
        if !self.joined {
            self.stop(); // a failed join: nobody to wait for
            return;
        }
        self.shared.stop_evictor();
        if let Err(e) = self.arrive_and_wait(LEAVING, TAG_BARRIER, self.join_timeout) {
            log::warn!("dsm node {} leaving: {e}", self.shared.rank);
        }
        self.stop();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new().name(name.into()).spawn(f).expect("cannot start a DSM thread")
}
