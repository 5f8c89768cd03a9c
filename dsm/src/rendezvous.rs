//! Where the nodes of a job find each other's addresses before they connect.
//!
//! Three ways, chosen by what `MOSAIC_DSM_RENDEZVOUS` holds:
//!
//! - a directory every node can read and write (`mosrun -n` on one host, `mpirun` or `srun` on
//!   one host or over a shared file system): each node writes its address to `node-RANK.uri` and
//!   reads the others';
//! - `tcp://HOST:PORT`, a [`RendezvousServer`] (which `mosrun --hosts` runs for the job it
//!   starts on several hosts): each node publishes its rank and address, then asks for the list
//!   until every node is in it. The server speaks the transport's authenticated protocol, so only
//!   holders of the cluster key take part;
//! - `agent+tcp://HOST:PORT/JOB`, a node agent (`mosaicd`), which keeps a book for every job
//!   meeting there ([`JobBooks`]), the same way, under the job's name. Under `mpirun` or `srun`
//!   the name may be left out (`agent+tcp://HOST:PORT`): the launcher's job name is taken.
//!
//! Either way a node waits at most its join time-out, then fails naming the nodes that never came.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mosaic_transport::{
    connect, listen, Caller, ClusterKey, ConnectOptions, ListenError, Server, ServerConfig, Service, ServiceError,
    Status,
};

use crate::job::JoinError;
use crate::protocol::{NodeId, MAX_NODES};

/// Where the nodes of a job meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// A directory every node can read and write.
    Dir(PathBuf),
    /// A [`RendezvousServer`]'s address (`tcp://HOST:PORT`).
    Server(String),
    /// A node agent (`mosaicd`) that keeps a book for every job meeting there
    /// (`agent+tcp://HOST:PORT/JOB`), served by [`JobBooks`].
    Agent {
        /// The agent's address (`tcp://HOST:PORT`).
        agent: String,
        /// The job's name: the nodes of one job give the same, other jobs another (empty when
        /// not given yet: the launcher's job name fills it in, see [`crate::launch`]).
        job: String,
    },
}

/// What `MOSAIC_DSM_RENDEZVOUS` starts with when it names a node agent.
pub const AGENT_SCHEME: &str = "agent+";

impl Rendezvous {
    /// A node agent's book if `text` is `agent+URI[/JOB]`, a server's address if it is a
    /// `tcp://` URI, else a directory.
    pub fn parse(text: &str) -> Rendezvous {
        if let Some(rest) = text.strip_prefix(AGENT_SCHEME) {
            let after_scheme = rest.find("://").map_or(0, |i| i + 3);
            let (agent, job) = match rest[after_scheme..].find('/') {
                Some(i) => (&rest[..after_scheme + i], &rest[after_scheme + i + 1..]),
                None => (rest, ""),
            };
            Rendezvous::Agent { agent: agent.to_string(), job: job.to_string() }
        } else if text.starts_with("tcp://") {
            Rendezvous::Server(text.to_string())
        } else {
            Rendezvous::Dir(PathBuf::from(text))
        }
    }

    /// Meeting at the agent at `agent` (`tcp://HOST:PORT`) as the job `job`.
    pub fn agent(agent: &str, job: &str) -> Rendezvous {
        Rendezvous::Agent { agent: agent.to_string(), job: job.to_string() }
    }
}

impl std::fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rendezvous::Dir(d) => write!(f, "{}", d.display()),
            Rendezvous::Server(uri) => f.write_str(uri),
            Rendezvous::Agent { agent, job } => write!(f, "{AGENT_SCHEME}{agent}/{job}"),
        }
    }
}

impl From<PathBuf> for Rendezvous {
    fn from(dir: PathBuf) -> Rendezvous {
        Rendezvous::Dir(dir)
    }
}

impl From<&Path> for Rendezvous {
    fn from(dir: &Path) -> Rendezvous {
        Rendezvous::Dir(dir.to_path_buf())
    }
}

/// The transport method a node publishes its address by, at a [`RendezvousServer`].
const METHOD_PUBLISH: u64 = 0x4453_5201;
/// The transport method a node asks for every address by, at a [`RendezvousServer`].
const METHOD_LIST: u64 = 0x4453_5202;
/// [`METHOD_PUBLISH`] at an agent: the job's name first.
const METHOD_JOB_PUBLISH: u64 = 0x4453_5203;
/// [`METHOD_LIST`] at an agent: the job's name and the asking node's rank first.
const METHOD_JOB_LIST: u64 = 0x4453_5204;
/// How long a node waits between two looks (at first: at a server, the wait doubles up to
/// [`POLL_MAX`]).
const POLL: Duration = Duration::from_millis(10);
/// The longest wait between two looks at a server.
const POLL_MAX: Duration = Duration::from_millis(160);

/// Publishes node `rank`'s address `uri` at `at` and waits (at most `timeout`) for the address of
/// every one of the job's `size` nodes; returns them by rank.
pub fn meet(
    at: &Rendezvous,
    key: &ClusterKey,
    rank: NodeId,
    size: u16,
    uri: &str,
    timeout: Duration,
) -> Result<Vec<String>, JoinError> {
    match at {
        Rendezvous::Dir(dir) => meet_in_dir(dir, rank, size, uri, timeout),
        Rendezvous::Server(server) => meet_at_server(server, None, key, rank, size, uri, timeout),
        Rendezvous::Agent { agent, job } => {
            check_job_name(job).map_err(|why| JoinError::RendezvousServer { uri: at.to_string(), why })?;
            meet_at_server(agent, Some(job), key, rank, size, uri, timeout)
        }
    }
}

/// The file node `rank` publishes its address in, in a rendezvous directory.
pub(crate) fn published_file(dir: &Path, rank: NodeId) -> PathBuf {
    dir.join(format!("node-{rank}.uri"))
}

fn meet_in_dir(dir: &Path, rank: NodeId, size: u16, uri: &str, timeout: Duration) -> Result<Vec<String>, JoinError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JoinError::Rendezvous { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    let tmp = dir.join(format!(".node-{rank}.uri.{}", std::process::id()));
    std::fs::write(&tmp, uri).map_err(err(&tmp))?;
    let mine = published_file(dir, rank);
    std::fs::rename(&tmp, &mine).map_err(err(&mine))?;
    let start = Instant::now();
    loop {
        let mut uris = Vec::new();
        let mut missing = Vec::new();
        for r in 0..size {
            match std::fs::read_to_string(published_file(dir, r)) {
                Ok(u) => uris.push(u.trim().to_string()),
                Err(_) => missing.push(r),
            }
        }
        if missing.is_empty() {
            return Ok(uris);
        }
        if start.elapsed() >= timeout {
            return Err(JoinError::PeersMissing { missing, waited: start.elapsed(), at: dir.display().to_string() });
        }
        std::thread::sleep(POLL);
    }
}

/// The wait after `pause` between two looks at a server: twice as long, at most [`POLL_MAX`].
fn longer(pause: Duration) -> Duration {
    (pause * 2).min(POLL_MAX)
}

/// The job's name as it prefixes an agent's requests.
fn job_prefix(job: &str, out: &mut Vec<u8>) {
    out.push(u8::try_from(job.len()).expect("job names are checked to be short"));
    out.extend_from_slice(job.as_bytes());
}

/// Meets at the single-job server at `server`, or in the book of `job` at the agent there.
fn meet_at_server(
    server: &str,
    job: Option<&str>,
    key: &ClusterKey,
    rank: NodeId,
    size: u16,
    uri: &str,
    timeout: Duration,
) -> Result<Vec<String>, JoinError> {
    let start = Instant::now();
    let at = match job {
        Some(j) => format!("{AGENT_SCHEME}{server}/{j}"),
        None => server.to_string(),
    };
    let unreachable = |why: String| JoinError::RendezvousServer { uri: at.clone(), why };
    let opts = ConnectOptions::new(key.clone()).timeout(timeout.clamp(Duration::from_secs(1), Duration::from_secs(10)));
    // The server may be starting still: try until the time is up.
    let conn = loop {
        match connect(server, &opts) {
            Ok(c) => break c,
            Err(e) if start.elapsed() >= timeout => return Err(unreachable(mosaic_transport::error_chain(&e))),
            Err(_) => std::thread::sleep(POLL),
        }
    };
    let (mut publish, mut list) = (Vec::with_capacity(4 + uri.len()), Vec::new());
    if let Some(j) = job {
        job_prefix(j, &mut publish);
        job_prefix(j, &mut list);
        list.extend_from_slice(&rank.to_le_bytes());
    }
    publish.extend_from_slice(&rank.to_le_bytes());
    publish.extend_from_slice(&size.to_le_bytes());
    publish.extend_from_slice(uri.as_bytes());
    let (publish_method, list_method) =
        if job.is_some() { (METHOD_JOB_PUBLISH, METHOD_JOB_LIST) } else { (METHOD_PUBLISH, METHOD_LIST) };
    // An agent with no room for another book may have some soon: try until the time is up.
    let mut pause = POLL;
    loop {
        match conn.call(publish_method, &publish) {
            Ok(_) => break,
            Err(e) if e.status() == Some(Status::Full) && start.elapsed() < timeout => {
                std::thread::sleep(pause);
                pause = longer(pause);
            }
            Err(e) => return Err(unreachable(mosaic_transport::error_chain(&e))),
        }
    }
    let mut pause = POLL;
    loop {
        let answer = conn.call(list_method, &list).map_err(|e| unreachable(mosaic_transport::error_chain(&e)))?;
        match decode_list(&answer) {
            Some(List::Complete(uris)) if uris.len() == usize::from(size) => return Ok(uris),
            Some(List::Missing(missing)) if start.elapsed() >= timeout => {
                return Err(JoinError::PeersMissing { missing, waited: start.elapsed(), at })
            }
            Some(List::Missing(_)) => {
                std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
                pause = longer(pause);
            }
            _ => return Err(unreachable("a malformed list of addresses".into())),
        }
    }
}

/// What a server answers to [`METHOD_LIST`].
#[derive(Debug, PartialEq, Eq)]
enum List {
    /// Every node's address, by rank.
    Complete(Vec<String>),
    /// The ranks not published yet.
    Missing(Vec<NodeId>),
}

fn encode_list(list: &List, out: &mut Vec<u8>) {
    match list {
        List::Complete(uris) => {
            out.push(1);
            for u in uris {
                let len = u16::try_from(u.len()).expect("addresses are checked to be short");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(u.as_bytes());
            }
        }
        List::Missing(ranks) => {
            out.push(0);
            for r in ranks {
                out.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
}

fn decode_list(bytes: &[u8]) -> Option<List> {
    let (&kind, mut rest) = bytes.split_first()?;
    match kind {
        1 => {
            let mut uris = Vec::new();
            while !rest.is_empty() {
                let len = usize::from(u16::from_le_bytes([*rest.first()?, *rest.get(1)?]));
                let text = rest.get(2..2 + len)?;
                uris.push(String::from_utf8(text.to_vec()).ok()?);
                rest = &rest[2 + len..];
            }
            Some(List::Complete(uris))
        }
        0 if rest.len() % 2 == 0 => {
            Some(List::Missing(rest.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()))
        }
        _ => None,
    }
}

/// The longest address a node may publish.
const MAX_URI: usize = 1024;
/// The longest job name at an agent.
pub const MAX_JOB_NAME: usize = 128;

/// Why `job` cannot name a job at an agent, if it cannot.
fn check_job_name(job: &str) -> Result<(), String> {
    if job.is_empty() {
        return Err("no job name (agent+URI/JOB; under mpirun or srun the job's own name is taken)".into());
    }
    if job.len() > MAX_JOB_NAME || job.chars().any(|c| c == '/' || c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "job name {job:?}: at most {MAX_JOB_NAME} bytes, without '/', spaces or control characters"
        ));
    }
    Ok(())
}

fn bad(why: String) -> ServiceError {
    ServiceError::new(Status::BadRequest, why)
}

/// The addresses one job's nodes published so far.
struct Book {
    size: u16,
    /// Each rank's address, and the connection that published it.
    uris: BTreeMap<NodeId, (String, u64)>,
    /// The ranks that were given the complete list (an agent's books only).
    told: BTreeSet<NodeId>,
    /// Two processes claimed one rank: two jobs meet under one name (an agent's books).
    collided: Option<String>,
}

impl Book {
    fn new(size: u16) -> Book {
        Book { size, uris: BTreeMap::new(), told: BTreeSet::new(), collided: None }
    }

    /// `request`: rank, size (both `u16`), address; from the connection `caller`.
    fn publish(&mut self, request: &[u8], caller: u64) -> Result<(), ServiceError> {
        let (head, uri) = request.split_at_checked(4).ok_or_else(|| bad("a malformed publication".into()))?;
        let rank = u16::from_le_bytes([head[0], head[1]]);
        let size = u16::from_le_bytes([head[2], head[3]]);
        if size == 0 || size > MAX_NODES {
            return Err(bad(format!("a job has 1 to {MAX_NODES} nodes, not {size}")));
        }
        if size != self.size {
            return Err(bad(format!("this job has {} nodes, not {size}", self.size)));
        }
        if rank >= size {
            return Err(bad(format!("rank {rank} of a job of {size} nodes")));
        }
        let uri = std::str::from_utf8(uri)
            .ok()
            .filter(|u| !u.is_empty() && u.len() <= MAX_URI)
            .ok_or_else(|| bad(format!("node {rank}: no address, or not one of at most {MAX_URI} UTF-8 bytes")))?;
        match self.uris.get(&rank) {
            Some((had, _)) if had != uri => {
                let why = format!("node {rank} joined already, at {had}: two processes have rank {rank}");
                self.collided.get_or_insert_with(|| why.clone());
                Err(bad(why))
            }
            _ => {
                self.uris.insert(rank, (uri.to_string(), caller));
                Ok(())
            }
        }
    }

    /// The list as it stands; `asking` (a rank, and the connection asking) is counted as told
    /// when it is complete.
    fn list(&mut self, asking: Option<(NodeId, u64)>) -> List {
        let missing: Vec<NodeId> = (0..self.size).filter(|r| !self.uris.contains_key(r)).collect();
        if !missing.is_empty() {
            return List::Missing(missing);
        }
        if let Some((r, _)) = asking {
            self.told.insert(r);
        }
        List::Complete(self.uris.values().map(|(u, _)| u.clone()).collect())
    }

    /// Every node has the complete list: the book has served its job.
    fn done(&self) -> bool {
        self.told.len() == usize::from(self.size)
    }

    /// The connection `caller` closed: while the job has not met yet, the ranks it published
    /// are free again (their process died or gave up; a process started again takes its rank
    /// back), never a dead address in the list.
    fn forget(&mut self, caller: u64) {
        if self.told.is_empty() {
            self.uris.retain(|_, (_, c)| *c != caller);
        }
    }
}

/// A [`RendezvousServer`]'s one book.
struct OneBook(Mutex<Book>);

impl Service for OneBook {
    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let mut book = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match method {
            METHOD_PUBLISH => book.publish(request, caller.id),
            METHOD_LIST => {
                encode_list(&book.list(None), response);
                Ok(())
            }
            _ => Err(ServiceError::new(Status::UnknownMethod, format!("no method {method:#x}"))),
        }
    }
}

/// A rendezvous for one job of nodes on any hosts that reach it: nodes publish their address
/// and learn every other's ([`Rendezvous::Server`]). Runs until dropped.
pub struct RendezvousServer {
    server: Server,
}

impl RendezvousServer {
    /// Listens on `uri` (`tcp://ADDRESS:PORT`, port 0 for any) for the `size` nodes of a job
    /// that holds `key`.
    pub fn start(uri: &str, key: ClusterKey, size: u16) -> Result<RendezvousServer, ListenError> {
        let book = OneBook(Mutex::new(Book::new(size)));
        let server = listen(uri, ServerConfig::new(key).service(book))?;
        Ok(RendezvousServer { server })
    }

    /// Where the nodes find it (what `MOSAIC_DSM_RENDEZVOUS` is set to).
    pub fn uri(&self) -> &str {
        self.server.uri()
    }
}

impl std::fmt::Debug for RendezvousServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RendezvousServer").field("uri", &self.uri()).finish()
    }
}

/// Most jobs an agent keeps a book for at once.
pub const MAX_JOBS: usize = 1024;
/// A book no node has looked at for this long is dropped (its nodes gave up or died: a
/// waiting node looks at least every 160 ms).
pub const JOB_IDLE: Duration = Duration::from_secs(120);

/// The books of every job meeting at a node agent ([`Rendezvous::Agent`]): the agent's service
/// hands the methods [`JobBooks::serves`] to [`JobBooks::call`], and its closed connections to
/// [`JobBooks::disconnected`]. A book is opened by its job's first publication and closed once
/// every node has the complete list, or after [`JOB_IDLE`] unlooked at; at most [`MAX_JOBS`]
/// are open. A rank belongs to the connection that published it: only that one is told the
/// list for it, and while the job has not met, the rank is freed when that connection closes
/// (a node that died leaves no dead address behind). Two processes claiming one rank mark the
/// book: every node of it is told that two jobs meet under one name, instead of some of them
/// meeting the wrong peers. (Two jobs of one name whose nodes arrive so that neither claims a
/// rank another holds cannot be told apart: names must be unique among the jobs meeting at
/// once, as those mosrun and the launchers give are.)
#[derive(Default)]
pub struct JobBooks {
    books: Mutex<HashMap<String, (Book, Instant)>>,
}

impl JobBooks {
    /// No books.
    pub fn new() -> JobBooks {
        JobBooks::default()
    }

    /// Whether `method` is one of the books' methods.
    pub fn serves(method: u64) -> bool {
        matches!(method, METHOD_JOB_PUBLISH | METHOD_JOB_LIST)
    }

    /// Jobs with an open book (looked at within [`JOB_IDLE`]).
    pub fn open(&self) -> usize {
        let books = self.books.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        books.values().filter(|(_, touched)| touched.elapsed() < JOB_IDLE).count()
    }

    /// The connection `caller` closed.
    pub fn disconnected(&self, caller: &Caller) {
        let mut books = self.books.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        books.retain(|_, (book, _)| {
            book.forget(caller.id);
            !book.uris.is_empty() || !book.told.is_empty()
        });
    }

    /// Answers one of the books' methods, called on the connection `caller`.
    pub fn call(
        &self,
        caller: &Caller,
        method: u64,
        request: &[u8],
        response: &mut Vec<u8>,
    ) -> Result<(), ServiceError> {
        let (&len, rest) = request.split_first().ok_or_else(|| bad("no job name".into()))?;
        let (job, rest) = rest.split_at_checked(usize::from(len)).ok_or_else(|| bad("a malformed job name".into()))?;
        let job = std::str::from_utf8(job).map_err(|_| bad("a job name not in UTF-8".into()))?;
        check_job_name(job).map_err(bad)?;
        let now = Instant::now();
        let mut books = self.books.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        books.retain(|_, (_, touched)| now.duration_since(*touched) < JOB_IDLE);
        let collided = |why: &str| {
            ServiceError::new(
                Status::Forbidden,
                format!("two jobs named {job:?} meet here at once ({why}): give each its own name"),
            )
        };
        match method {
            METHOD_JOB_PUBLISH => {
                if !books.contains_key(job) && books.len() >= MAX_JOBS {
                    return Err(ServiceError::new(
                        Status::Full,
                        format!("{MAX_JOBS} jobs are meeting at this agent already; try again"),
                    ));
                }
                let size = rest.get(2..4).map(|s| u16::from_le_bytes([s[0], s[1]])).unwrap_or(0);
                let (book, touched) = books.entry(job.to_string()).or_insert_with(|| (Book::new(size), now));
                *touched = now;
                if let Some(why) = &book.collided {
                    return Err(collided(why));
                }
                let published = book.publish(rest, caller.id);
                // A publication that marked the book as collided is told so (as every later one is).
                let published = match (published, &book.collided) {
                    (Err(_), Some(why)) => Err(collided(why)),
                    (p, _) => p,
                };
                if book.uris.is_empty() {
                    // Opened by a refused publication: nothing to keep.
                    books.remove(job);
                }
                published
            }
            METHOD_JOB_LIST => {
                let rank = rest
                    .get(..2)
                    .map(|r| u16::from_le_bytes([r[0], r[1]]))
                    .ok_or_else(|| bad("no rank in the request".into()))?;
                let Some((book, touched)) = books.get_mut(job) else {
                    return Err(ServiceError::new(Status::NotFound, format!("no job {job:?} meets here")));
                };
                if let Some(why) = &book.collided {
                    return Err(collided(why));
                }
                if book.uris.get(&rank).is_none_or(|(_, c)| *c != caller.id) {
                    return Err(bad(format!("node {rank} of job {job:?} asks before publishing (on this connection)")));
                }
                *touched = now;
                encode_list(&book.list(Some((rank, caller.id))), response);
                if book.done() {
                    books.remove(job);
                }
                Ok(())
            }
            _ => Err(ServiceError::new(Status::UnknownMethod, format!("no method {method:#x}"))),
        }
    }
}

impl std::fmt::Debug for JobBooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobBooks").field("open", &self.open()).finish()
    }
}

impl Service for JobBooks {
    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        JobBooks::call(self, caller, method, request, response)
    }

    fn disconnected(&self, caller: &Caller) {
        JobBooks::disconnected(self, caller);
    }
}

/// Whether the agent at `agent` keeps books for jobs (an agent older than them does not) and
/// takes `key`: asks it about a job that does not meet there.
pub fn agent_keeps_books(agent: &str, key: &ClusterKey) -> Result<(), String> {
    let opts = ConnectOptions::new(key.clone()).timeout(Duration::from_secs(5));
    let conn = connect(agent, &opts).map_err(|e| mosaic_transport::error_chain(&e))?;
    let mut probe = Vec::new();
    job_prefix(".probe", &mut probe);
    probe.extend_from_slice(&0u16.to_le_bytes());
    match conn.call(METHOD_JOB_LIST, &probe) {
        Err(e) if e.status() == Some(Status::NotFound) => Ok(()),
        Err(e) if e.status() == Some(Status::UnknownMethod) => {
            Err("it keeps no books for DSM jobs (a mosaicd older than them)".into())
        }
        Err(e) => Err(mosaic_transport::error_chain(&e)),
        Ok(_) => Err("it answered a question about no job".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClusterKey {
        ClusterKey::from_bytes(b"rendezvous-test-key-0123456789abcdef").unwrap()
    }

    #[test]
    fn lists_round_trip_and_garbage_is_refused() {
        for list in [List::Complete(vec!["tcp://10.0.0.1:5".into(), "shm://x".into()]), List::Missing(vec![0, 3])] {
            let mut b = Vec::new();
            encode_list(&list, &mut b);
            assert_eq!(decode_list(&b), Some(list));
        }
        for garbage in [&[][..], &[2], &[0, 1], &[1, 9, 0, b'x']] {
            assert_eq!(decode_list(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn nodes_meet_at_a_server() {
        let server = RendezvousServer::start("tcp://127.0.0.1:0", key(), 3).unwrap();
        let at = Rendezvous::parse(server.uri());
        let nodes: Vec<_> = (0..3u16)
            .map(|rank| {
                let at = at.clone();
                std::thread::spawn(move || {
                    meet(&at, &key(), rank, 3, &format!("tcp://node{rank}:1"), Duration::from_secs(10))
                })
            })
            .collect();
        for n in nodes {
            assert_eq!(n.join().unwrap().unwrap(), ["tcp://node0:1", "tcp://node1:1", "tcp://node2:1"]);
        }
    }

    #[test]
    fn a_server_names_the_missing_and_refuses_the_wrong() {
        let server = RendezvousServer::start("tcp://127.0.0.1:0", key(), 3).unwrap();
        let at = Rendezvous::parse(server.uri());
        let e = meet(&at, &key(), 1, 3, "tcp://a:1", Duration::from_millis(100)).unwrap_err();
        assert!(matches!(&e, JoinError::PeersMissing { missing, .. } if missing == &[0, 2]), "{e}");
        // Rank 1 again at another address: two processes claim one rank.
        let e = meet(&at, &key(), 1, 3, "tcp://b:1", Duration::from_millis(100)).unwrap_err();
        assert!(mosaic_transport::error_chain(&e).contains("two processes have rank 1"), "{e}");
        let e = meet(&at, &key(), 0, 4, "tcp://a:1", Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().contains("this job has 3 nodes, not 4"), "{e}");
        let e = meet(&at, &key(), 5, 3, "tcp://a:1", Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().contains("rank 5 of a job of 3 nodes"), "{e}");
        // Without the key: refused at the handshake.
        let other = ClusterKey::from_bytes(b"some-other-key-0123456789abcdefghij").unwrap();
        let e = meet(&at, &other, 0, 3, "tcp://a:1", Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, JoinError::RendezvousServer { .. }), "{e}");
        // Nobody there.
        drop(server);
        let e = meet(&at, &key(), 0, 3, "tcp://a:1", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, JoinError::RendezvousServer { .. }), "{e}");
    }

    #[test]
    fn agent_rendezvous_parses_and_prints() {
        let r = Rendezvous::parse("agent+tcp://10.0.0.1:7070/job-7@1");
        assert_eq!(r, Rendezvous::agent("tcp://10.0.0.1:7070", "job-7@1"));
        assert_eq!(r.to_string(), "agent+tcp://10.0.0.1:7070/job-7@1");
        assert_eq!(Rendezvous::parse("agent+tcp://[::1]:7070"), Rendezvous::agent("tcp://[::1]:7070", ""));
        for bad in ["", "a/b", "a b", &"x".repeat(MAX_JOB_NAME + 1)] {
            assert!(check_job_name(bad).is_err(), "{bad:?}");
        }
        check_job_name("ompi-prterun-h-12@1").unwrap();
    }

    /// A connection to the books, numbered `id`.
    fn conn(id: u64) -> Caller {
        Caller { id, peer: format!("test#{id}") }
    }

    /// One request to `books` as a node of `job` would send it on connection `id`.
    fn ask(books: &JobBooks, id: u64, method: u64, job: &str, body: &[u8]) -> Result<Vec<u8>, ServiceError> {
        let mut request = Vec::new();
        job_prefix(job, &mut request);
        request.extend_from_slice(body);
        let mut response = Vec::new();
        books.call(&conn(id), method, &request, &mut response).map(|()| response)
    }

    fn publication(rank: u16, size: u16, uri: &str) -> Vec<u8> {
        [&rank.to_le_bytes()[..], &size.to_le_bytes(), uri.as_bytes()].concat()
    }

    #[test]
    fn an_agent_keeps_one_book_per_job_and_closes_it_when_all_know() {
        let books = JobBooks::new();
        // Two jobs with the same ranks at once: each sees its own (connections 1-2 are job a's
        // nodes, 3-4 job b's).
        ask(&books, 1, METHOD_JOB_PUBLISH, "a", &publication(0, 2, "tcp://x0:1")).unwrap();
        ask(&books, 3, METHOD_JOB_PUBLISH, "b", &publication(0, 2, "tcp://y0:1")).unwrap();
        assert_eq!(books.open(), 2);
        let list = ask(&books, 1, METHOD_JOB_LIST, "a", &0u16.to_le_bytes()).unwrap();
        assert_eq!(decode_list(&list), Some(List::Missing(vec![1])));
        ask(&books, 2, METHOD_JOB_PUBLISH, "a", &publication(1, 2, "tcp://x1:1")).unwrap();
        // Wrong size, too many nodes, a rank asking before publishing or from another
        // connection, an unknown job, a bad name: refused, the books untouched.
        let e = ask(&books, 5, METHOD_JOB_PUBLISH, "a", &publication(0, 3, "tcp://z:1")).unwrap_err();
        assert!(e.message.contains("this job has 2 nodes, not 3"), "{e:?}");
        let e = ask(&books, 5, METHOD_JOB_PUBLISH, "c", &publication(0, 65_535, "tcp://z:1")).unwrap_err();
        assert!(e.message.contains("a job has 1 to 64 nodes, not 65535"), "{e:?}");
        let e = ask(&books, 4, METHOD_JOB_LIST, "b", &1u16.to_le_bytes()).unwrap_err();
        assert!(e.message.contains("asks before publishing"), "{e:?}");
        let e = ask(&books, 4, METHOD_JOB_LIST, "b", &0u16.to_le_bytes()).unwrap_err();
        assert!(e.message.contains("asks before publishing (on this connection)"), "{e:?}");
        let e = ask(&books, 1, METHOD_JOB_LIST, "c", &0u16.to_le_bytes()).unwrap_err();
        assert_eq!(e.status, Status::NotFound, "{e:?}");
        assert!(ask(&books, 1, METHOD_JOB_PUBLISH, "d/e", &publication(0, 1, "tcp://z:1")).is_err());
        assert!(books.call(&conn(1), METHOD_JOB_LIST, &[200, b'a'], &mut Vec::new()).is_err());
        assert!(ask(&books, 1, METHOD_JOB_PUBLISH, "c", &publication(5, 2, "tcp://z:1")).is_err());
        assert_eq!(books.open(), 2, "a refused first publication opens no book");
        // Job a complete: each node gets the list; the book closes once both have it.
        for (id, rank) in [(1, 0u16), (2, 1)] {
            let list = ask(&books, id, METHOD_JOB_LIST, "a", &rank.to_le_bytes()).unwrap();
            assert_eq!(decode_list(&list), Some(List::Complete(vec!["tcp://x0:1".into(), "tcp://x1:1".into()])));
        }
        assert_eq!(books.open(), 1);
        // The name is free again: a new job of that name starts afresh.
        ask(&books, 6, METHOD_JOB_PUBLISH, "a", &publication(0, 1, "tcp://w:1")).unwrap();
        let list = ask(&books, 6, METHOD_JOB_LIST, "a", &0u16.to_le_bytes()).unwrap();
        assert_eq!(decode_list(&list), Some(List::Complete(vec!["tcp://w:1".into()])));
        assert_eq!(books.open(), 1);
    }

    #[test]
    fn a_node_that_goes_frees_its_rank_and_two_jobs_of_one_name_are_told() {
        let books = JobBooks::new();
        ask(&books, 1, METHOD_JOB_PUBLISH, "j", &publication(0, 2, "tcp://dead:1")).unwrap();
        // Its process died before the job met: the rank is free for the one started again,
        // and no dead address is handed out.
        books.disconnected(&conn(1));
        assert_eq!(books.open(), 0, "an empty book goes");
        ask(&books, 2, METHOD_JOB_PUBLISH, "j", &publication(0, 2, "tcp://again:1")).unwrap();
        ask(&books, 3, METHOD_JOB_PUBLISH, "j", &publication(1, 2, "tcp://one:1")).unwrap();
        books.disconnected(&conn(9)); // someone else's connection: nothing changes
        let list = ask(&books, 3, METHOD_JOB_LIST, "j", &1u16.to_le_bytes()).unwrap();
        assert_eq!(decode_list(&list), Some(List::Complete(vec!["tcp://again:1".into(), "tcp://one:1".into()])));
        // Once the job met, a node leaving frees nothing (the others have its address).
        books.disconnected(&conn(3));
        let list = ask(&books, 2, METHOD_JOB_LIST, "j", &0u16.to_le_bytes()).unwrap();
        assert!(matches!(decode_list(&list), Some(List::Complete(_))));
        // Another job of the same name claims a rank a live process holds: every node of the
        // name is told, and keeps being told.
        ask(&books, 4, METHOD_JOB_PUBLISH, "k", &publication(0, 2, "tcp://first:1")).unwrap();
        let e = ask(&books, 5, METHOD_JOB_PUBLISH, "k", &publication(0, 2, "tcp://second:1")).unwrap_err();
        assert!(e.message.contains("two jobs named \"k\" meet here at once"), "{e:?}");
        let e = ask(&books, 4, METHOD_JOB_LIST, "k", &0u16.to_le_bytes()).unwrap_err();
        assert!(e.message.contains("give each its own name"), "{e:?}");
        let e = ask(&books, 6, METHOD_JOB_PUBLISH, "k", &publication(1, 2, "tcp://third:1")).unwrap_err();
        assert_eq!(e.status, Status::Forbidden, "{e:?}");
    }

    #[test]
    fn an_agent_holds_a_bounded_number_of_books() {
        let books = JobBooks::new();
        for j in 0..MAX_JOBS {
            ask(&books, 1, METHOD_JOB_PUBLISH, &format!("j{j}"), &publication(0, 2, "tcp://a:1")).unwrap();
        }
        let e = ask(&books, 2, METHOD_JOB_PUBLISH, "one-more", &publication(0, 2, "tcp://a:1")).unwrap_err();
        assert_eq!(e.status, Status::Full, "{e:?}");
        // Jobs already open still meet.
        ask(&books, 3, METHOD_JOB_PUBLISH, "j0", &publication(1, 2, "tcp://b:1")).unwrap();
        // Books nobody looked at for JOB_IDLE are not counted, and are dropped to make room.
        for (_, touched) in books.books.lock().unwrap().values_mut() {
            *touched -= JOB_IDLE;
        }
        assert_eq!(books.open(), 0);
        ask(&books, 2, METHOD_JOB_PUBLISH, "one-more", &publication(0, 2, "tcp://a:1")).unwrap();
        assert_eq!(books.open(), 1);
    }

    #[test]
    fn nodes_meet_at_an_agents_books() {
        let books = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(JobBooks::new())).unwrap();
        let nodes: Vec<_> = (0..4u16)
            .map(|i| {
                let at = Rendezvous::agent(books.uri(), if i % 2 == 0 { "even" } else { "odd" });
                std::thread::spawn(move || {
                    meet(&at, &key(), i / 2, 2, &format!("tcp://n{i}:1"), Duration::from_secs(10))
                })
            })
            .collect();
        let lists: Vec<_> = nodes.into_iter().map(|n| n.join().unwrap().unwrap()).collect();
        assert_eq!(lists[0], ["tcp://n0:1", "tcp://n2:1"]);
        assert_eq!(lists[1], ["tcp://n1:1", "tcp://n3:1"]);
        let e = meet(&Rendezvous::agent(books.uri(), "late"), &key(), 1, 2, "tcp://a:1", Duration::from_millis(100))
            .unwrap_err();
        assert!(
            matches!(&e, JoinError::PeersMissing { missing, at, .. } if missing == &[0] && at.ends_with("/late")),
            "{e}"
        );
        let e = meet(&Rendezvous::agent(books.uri(), ""), &key(), 0, 1, "tcp://a:1", Duration::from_millis(100))
            .unwrap_err();
        assert!(e.to_string().contains("no job name"), "{e}");
        // The probe mosrun asks an agent with: books here, none at a one-job server.
        agent_keeps_books(books.uri(), &key()).unwrap();
        let one = RendezvousServer::start("tcp://127.0.0.1:0", key(), 2).unwrap();
        let e = agent_keeps_books(one.uri(), &key()).unwrap_err();
        assert!(e.contains("keeps no books"), "{e}");
    }
}
