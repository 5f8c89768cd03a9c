//! Where the nodes of a job find each other's addresses before they connect.
//!
//! Two ways, chosen by what `MOSAIC_DSM_RENDEZVOUS` holds:
//!
//! - a directory every node can read and write (`mosrun -n` on one host, `mpirun` or `srun` on
//!   one host or over a shared file system): each node writes its address to `node-RANK.uri` and
//!   reads the others';
//! - `tcp://HOST:PORT`, a [`RendezvousServer`] (which `mosrun --hosts` runs for the job it
//!   starts on several hosts): each node publishes its rank and address, then asks for the list
//!   until every node is in it. The server speaks the transport's authenticated protocol, so only
//!   holders of the cluster key take part.
//!
//! Either way a node waits at most its join time-out, then fails naming the nodes that never came.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mosaic_transport::{
    connect, listen, Caller, ClusterKey, ConnectOptions, ListenError, Server, ServerConfig, Service, ServiceError,
    Status,
};

use crate::job::JoinError;
use crate::protocol::NodeId;

/// Where the nodes of a job meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// A directory every node can read and write.
    Dir(PathBuf),
    /// A [`RendezvousServer`]'s address (`tcp://HOST:PORT`).
    Server(String),
}

impl Rendezvous {
    /// A server's address if `text` is a `tcp://` URI, else a directory.
    pub fn parse(text: &str) -> Rendezvous {
        if text.starts_with("tcp://") {
            Rendezvous::Server(text.to_string())
        } else {
            Rendezvous::Dir(PathBuf::from(text))
        }
    }
}

impl std::fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rendezvous::Dir(d) => write!(f, "{}", d.display()),
            Rendezvous::Server(uri) => f.write_str(uri),
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

/// The transport method a node publishes its address by.
const METHOD_PUBLISH: u64 = 0x4453_5201;
/// The transport method a node asks for every address by.
const METHOD_LIST: u64 = 0x4453_5202;
/// How long a node waits between two looks.
const POLL: Duration = Duration::from_millis(10);

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
        Rendezvous::Server(server) => meet_at_server(server, key, rank, size, uri, timeout),
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

fn meet_at_server(
    server: &str,
    key: &ClusterKey,
    rank: NodeId,
    size: u16,
    uri: &str,
    timeout: Duration,
) -> Result<Vec<String>, JoinError> {
    let start = Instant::now();
    let unreachable = |why: String| JoinError::RendezvousServer { uri: server.to_string(), why };
    let opts = ConnectOptions::new(key.clone()).timeout(timeout.clamp(Duration::from_secs(1), Duration::from_secs(10)));
    // The server may be starting still: try until the time is up.
    let conn = loop {
        match connect(server, &opts) {
            Ok(c) => break c,
            Err(e) if start.elapsed() >= timeout => return Err(unreachable(mosaic_transport::error_chain(&e))),
            Err(_) => std::thread::sleep(POLL),
        }
    };
    let mut publish = Vec::with_capacity(4 + uri.len());
    publish.extend_from_slice(&rank.to_le_bytes());
    publish.extend_from_slice(&size.to_le_bytes());
    publish.extend_from_slice(uri.as_bytes());
    conn.call(METHOD_PUBLISH, &publish).map_err(|e| unreachable(mosaic_transport::error_chain(&e)))?;
    loop {
        let answer = conn.call(METHOD_LIST, &[]).map_err(|e| unreachable(mosaic_transport::error_chain(&e)))?;
        match decode_list(&answer) {
            Some(List::Complete(uris)) if uris.len() == usize::from(size) => return Ok(uris),
            Some(List::Missing(missing)) if start.elapsed() >= timeout => {
                return Err(JoinError::PeersMissing { missing, waited: start.elapsed(), at: server.to_string() })
            }
            Some(List::Missing(_)) => std::thread::sleep(POLL),
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

/// The addresses published so far.
struct Book {
    size: u16,
    uris: Mutex<BTreeMap<NodeId, String>>,
}

impl Service for Book {
    fn call(&self, _caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let bad = |why: String| ServiceError::new(Status::BadRequest, why);
        match method {
            METHOD_PUBLISH => {
                let (head, uri) = request.split_at_checked(4).ok_or_else(|| bad("a malformed publication".into()))?;
                let rank = u16::from_le_bytes([head[0], head[1]]);
                let size = u16::from_le_bytes([head[2], head[3]]);
                if size != self.size {
                    return Err(bad(format!("this job has {} nodes, not {size}", self.size)));
                }
                if rank >= size {
                    return Err(bad(format!("rank {rank} of a job of {size} nodes")));
                }
                let uri =
                    std::str::from_utf8(uri).ok().filter(|u| !u.is_empty() && u.len() <= MAX_URI).ok_or_else(|| {
                        bad(format!("node {rank}: no address, or not one of at most {MAX_URI} UTF-8 bytes"))
                    })?;
                let mut uris = self.uris.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match uris.get(&rank) {
                    Some(had) if had != uri => {
                        return Err(bad(format!(
                            "node {rank} joined already, at {had}: two processes have rank {rank}"
                        )))
                    }
                    _ => {
                        uris.insert(rank, uri.to_string());
                    }
                }
                Ok(())
            }
            METHOD_LIST => {
                let uris = self.uris.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let missing: Vec<NodeId> = (0..self.size).filter(|r| !uris.contains_key(r)).collect();
                let list = if missing.is_empty() {
                    List::Complete(uris.values().cloned().collect())
                } else {
                    List::Missing(missing)
                };
                encode_list(&list, response);
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
        let book = Book { size, uris: Mutex::new(BTreeMap::new()) };
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
}
