//! The information layer inside the agent: a [`GossipNode`] fed by the agent's transport
//! (`GOSSIP` calls from other agents) and a clock, its frames carried to other agents over the
//! same authenticated transport (so a node without the cluster key is never heard), its own
//! load vector measured from `/proc` every second.
//!
//! Threads: the ticker (timers, load rounds, re-announcing to the join list while it knows no
//! member), the load measure (once a second, apart so that a slow scan of /proc delays nothing),
//! and a sender per peer (one cached connection each, so a peer that cannot be reached delays
//! only its own frames; such a peer is left alone for a second, and frames older than half a
//! second are dropped, as a datagram network would: SWIM tolerates loss, not a stalled sender).
//! Answers to frames that came in leave at once, not at the ticker's next turn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_transport::{connect, ClusterKey, ConnectOptions, Connection};

use crate::info::load::{self, CpuTimes};
use crate::info::{Event, GossipConfig, GossipNode, LoadVector};
use crate::wire;

/// How the agent gossips.
#[derive(Clone, Debug)]
pub struct GossipSettings {
    /// Agents to join through (any member will do).
    pub join: Vec<String>,
    /// The protocol's settings.
    pub protocol: GossipConfig,
    /// Processes this node takes (its free slots are this minus the processes it hosts).
    pub slots: u16,
    /// This node's speed per CPU (1,000: a reference core).
    pub speed: u32,
    /// This node's memory server, told to the others (for `mosrun` to find network RAM).
    pub memory_server: Option<String>,
}

impl GossipSettings {
    /// Joining through `join`, for a cluster of about 16 nodes, a slot per CPU, reference speed.
    pub fn new(join: Vec<String>) -> GossipSettings {
        let cpus = std::thread::available_parallelism().map_or(1, |n| u16::try_from(n.get()).unwrap_or(u16::MAX));
        GossipSettings { join, protocol: GossipConfig::lan(16), slots: cpus, speed: 1000, memory_server: None }
    }
}

/// What a node knows of the cluster (`mosctl nodes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// Its own vector.
    pub own: LoadVector,
    /// The members it knows alive.
    pub members: Vec<String>,
    /// The freshest vectors it holds of others.
    pub window: Vec<LoadVector>,
}

impl ClusterView {
    /// `mosmon`'s table: a header, then a row for the node itself and for every member (load per
    /// CPU, CPUs, busy %, free and total memory, pressure %, free slots, the figure's age).
    pub fn table(&self) -> Vec<Vec<String>> {
        let v = self;
        let mut out = vec![["NODE", "LOAD/CPU", "CPUS", "BUSY%", "FREE MEM", "TOTAL", "PRESSURE%", "SLOTS", "AGE"]
            .iter()
            .map(|s| (*s).to_string())
            .collect()];
        let row = |w: &LoadVector, age: String| {
            vec![
                w.node.clone(),
                format!("{:.2}", f64::from(w.load) / 100.0 / f64::from(w.cpus.max(1))),
                w.cpus.to_string(),
                format!("{:.1}", f64::from(w.busy) / 100.0),
                format!("{:.1}G", w.free_memory as f64 / f64::from(1u32 << 30)),
                format!("{:.1}G", w.total_memory as f64 / f64::from(1u32 << 30)),
                format!("{:.2}", f64::from(w.pressure) / 100.0),
                w.free_slots.to_string(),
                age,
            ]
        };
        out.push(row(&v.own, "self".into()));
        for m in &v.members {
            match v.window.iter().find(|w| &w.node == m) {
                Some(w) => out.push(row(w, format!("{:.1}s", w.age.as_secs_f64()))),
                None => out.push(vec![
                    m.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "no load yet".into(),
                ]),
            }
        }
        out
    }

    /// [`ClusterView::table`] as text, in aligned columns (`mosmon --once`).
    pub fn text_table(&self) -> String {
        let rows = self.table();
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r.get(c).map_or(0, String::len)).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for r in &rows {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    /// Its encoding: the own vector, the member count and addresses, the window count and
    /// vectors.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = wire::Enc::default();
        let mut own = Vec::new();
        self.own.encode(&mut own);
        e.rest(&own).u32(u32::try_from(self.members.len()).unwrap_or(0));
        for m in &self.members {
            e.str(m);
        }
        e.u32(u32::try_from(self.window.len()).unwrap_or(0));
        for v in &self.window {
            let mut b = Vec::new();
            v.encode(&mut b);
            e.rest(&b);
        }
        e.0
    }

    /// Decodes one.
    pub fn decode(b: &[u8]) -> Result<ClusterView, String> {
        let bad = || "a malformed cluster view".to_string();
        let (own, rest) = LoadVector::decode(b).ok_or_else(bad)?;
        let mut d = wire::Dec(rest);
        let n = d.u32()?;
        let members = (0..n.min(100_000)).map(|_| d.str()).collect::<Result<Vec<_>, _>>()?;
        let n = d.u32()?;
        let mut rest = d.rest();
        let mut window = Vec::new();
        for _ in 0..n.min(100_000) {
            let (v, more) = LoadVector::decode(rest).ok_or_else(bad)?;
            window.push(v);
            rest = more;
        }
        if !rest.is_empty() {
            return Err(bad());
        }
        Ok(ClusterView { own, members, window })
    }
}

/// Asks the agent on `conn` what it knows of the cluster (`NODES`).
pub fn ask_view(conn: &mosaic_transport::Connection) -> Result<ClusterView, String> {
    let a = conn.call(wire::NODES, &[]).map_err(|e| mosaic_transport::error_chain(&e))?;
    ClusterView::decode(&a)
}

/// The agent's gossip (see the module's documentation). Stops when dropped.
pub struct Gossiper {
    node: Arc<Mutex<GossipNode>>,
    start: Instant,
    stop: Arc<AtomicBool>,
    /// Frames on their way to the sender (answers to what came in leave at once from here).
    tx: Mutex<Sender<Frame>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Gossiper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossiper").finish_non_exhaustive()
    }
}

/// A frame to send: when it was queued, to whom, the bytes.
type Frame = (Instant, String, Vec<u8>);

/// Frames waiting longer than this to leave are dropped.
const STALE: Duration = Duration::from_millis(500);
/// A peer that could not be reached is not tried again for this long.
const BACKOFF: Duration = Duration::from_secs(1);
/// Most peers with a sender thread at once (frames to others wait for one to end: a peer
/// cannot make the agent start threads without bound by naming addresses).
const MAX_PEERS: usize = 64;
/// A peer's sender ends after this long without frames.
const PEER_IDLE: Duration = Duration::from_secs(10);

impl Gossiper {
    /// Starts gossiping as the agent at `addr`; `hosted` tells how many processes it hosts.
    pub fn start(
        addr: &str,
        key: ClusterKey,
        settings: GossipSettings,
        hosted: impl Fn() -> u16 + Send + 'static,
    ) -> std::io::Result<Gossiper> {
        let start = Instant::now();
        let seed =
            getrandom::u64().unwrap_or_else(|_| u64::from(std::process::id()) ^ u64::from_le_bytes(*b"mosaicgs"));
        let node = Arc::new(Mutex::new(GossipNode::new(addr, settings.protocol.clone(), seed, Duration::ZERO)));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Frame>();
        let mut threads = Vec::new();
        {
            let (stop, key) = (stop.clone(), key.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("mosaic-gossip-send".into())
                    .spawn(move || send_loop(&rx, &key, &stop))?,
            );
        }
        {
            // The load is measured on a thread of its own: a scan of /proc on a host with many
            // threads must not delay the protocol's timers and answers.
            let (node, stop, addr, settings) = (node.clone(), stop.clone(), addr.to_string(), settings.clone());
            threads.push(std::thread::Builder::new().name("mosaic-gossip-load".into()).spawn(move || {
                let mut cpu = CpuTimes::default();
                while !stop.load(Ordering::Acquire) {
                    let free = settings.slots.saturating_sub(hosted());
                    let mut v = load::measure(&addr, settings.speed, free, &mut cpu);
                    v.memory_server = settings.memory_server.clone().unwrap_or_default();
                    crate::lock(&node).set_load(v);
                    for _ in 0..10 {
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })?);
        }
        {
            let (node, stop, addr, tx) = (node.clone(), stop.clone(), addr.to_string(), tx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("mosaic-gossip".into())
                    .spawn(move || tick_loop(&node, &stop, &tx, &addr, &settings.join, start))?,
            );
        }
        Ok(Gossiper { node, start, stop, tx: Mutex::new(tx), threads })
    }

    /// Takes a frame another agent sent; what it calls for (an answer) leaves at once.
    pub fn receive(&self, bytes: &[u8]) {
        let now = self.start.elapsed();
        let (out, events) = {
            let mut n = crate::lock(&self.node);
            n.receive(bytes, now);
            n.drain()
        };
        forward(&crate::lock(&self.tx), out, events);
    }

    /// What its gossip sent and refused.
    pub fn stats(&self) -> crate::info::GossipStats {
        crate::lock(&self.node).stats()
    }

    /// What this node knows of the cluster now.
    pub fn view(&self) -> ClusterView {
        let now = self.start.elapsed();
        let n = crate::lock(&self.node);
        ClusterView { own: n.own_load().clone(), members: n.members(), window: n.window(now) }
    }
}

impl Drop for Gossiper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // (Never this thread itself: the last reference may go on one of them.)
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

/// Logs the membership events and hands the frames to the sender.
fn forward(tx: &Sender<Frame>, out: Vec<crate::info::Outgoing>, events: Vec<Event>) {
    for e in events {
        match e {
            Event::Up(a) => log::info!("gossip: node {a} is up"),
            Event::Down(a) => log::warn!("gossip: node {a} is down"),
        }
    }
    let at = Instant::now();
    for o in out {
        let _ = tx.send((at, o.to, o.bytes));
    }
}

fn tick_loop(
    node: &Mutex<GossipNode>,
    stop: &AtomicBool,
    tx: &Sender<Frame>,
    addr: &str,
    join: &[String],
    start: Instant,
) {
    let mut next_join = Duration::ZERO;
    let mut alone_since = Some(Duration::ZERO);
    while !stop.load(Ordering::Acquire) {
        let now = start.elapsed();
        let (out, events, wake) = {
            let mut n = crate::lock(node);
            // Alone: (re)announce to the join list every two seconds, so the order agents start
            // in does not matter.
            let alone = n.members().is_empty();
            if now >= next_join && alone {
                for peer in join.iter().filter(|p| *p != addr) {
                    n.join(peer, now);
                }
                next_join = now + Duration::from_secs(2);
            }
            match (alone, alone_since) {
                (false, _) => alone_since = None,
                (true, None) => alone_since = Some(now),
                (true, Some(t)) if !join.is_empty() && now - t > Duration::from_secs(10) => {
                    log::warn!(
                        "gossip: still alone after 10 s: is {} the address the agent there advertises (its `mosaicd: listening at` line)?",
                        join.join(", ")
                    );
                    alone_since = Some(now);
                }
                _ => {}
            }
            n.tick(now);
            let (out, events) = n.drain();
            (out, events, n.next_wakeup())
        };
        forward(tx, out, events);
        let sleep = wake.saturating_sub(start.elapsed()).clamp(Duration::from_millis(1), Duration::from_millis(50));
        std::thread::sleep(sleep);
    }
}

/// A peer's sender thread and its queue of frames (with when they were queued).
type PeerSender = (Sender<(Instant, Vec<u8>)>, JoinHandle<()>);

/// Hands each frame to its peer's own sender thread (started on first use, ending after
/// [`PEER_IDLE`] without frames; at most [`MAX_PEERS`] at once), so that a peer that cannot be
/// reached delays only its own frames.
fn send_loop(rx: &Receiver<Frame>, key: &ClusterKey, stop: &Arc<AtomicBool>) {
    let mut peers: HashMap<String, PeerSender> = HashMap::new();
    while !stop.load(Ordering::Acquire) {
        let (queued, to, bytes) = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(x) => x,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Some((tx, t)) = peers.get(&to) {
            if !t.is_finished() && tx.send((queued, bytes.clone())).is_ok() {
                continue;
            }
        }
        peers.retain(|_, (_, t)| !t.is_finished());
        if peers.len() >= MAX_PEERS {
            log::debug!("gossip: {MAX_PEERS} peers have senders already; a frame to {to} is dropped");
            continue;
        }
        let (tx, prx) = mpsc::channel();
        let _ = tx.send((queued, bytes));
        let (key, stop2, peer) = (key.clone(), stop.clone(), to.clone());
        match std::thread::Builder::new()
            .name("mosaic-gossip-peer".into())
            .spawn(move || peer_loop(&peer, &prx, &key, &stop2))
        {
            Ok(t) => {
                peers.insert(to, (tx, t));
            }
            Err(e) => log::warn!("gossip: cannot start a sender for {to}: {e}"),
        }
    }
    for (_, (tx, t)) in peers.drain() {
        drop(tx);
        let _ = t.join();
    }
}

/// Sends the frames for `peer` over one cached connection: frames older than [`STALE`] are
/// dropped, and after a failure the peer is left alone for [`BACKOFF`].
fn peer_loop(peer: &str, rx: &Receiver<(Instant, Vec<u8>)>, key: &ClusterKey, stop: &AtomicBool) {
    let mut opts = ConnectOptions::new(key.clone());
    opts.timeout = Duration::from_secs(1);
    opts.connect_timeout = Duration::from_secs(1);
    let mut conn: Option<Connection> = None;
    let mut failed_at: Option<Instant> = None;
    let mut idle = Instant::now();
    while !stop.load(Ordering::Acquire) && idle.elapsed() < PEER_IDLE {
        let (queued, bytes) = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(x) => x,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        idle = Instant::now();
        if queued.elapsed() > STALE || failed_at.is_some_and(|t| t.elapsed() < BACKOFF) {
            continue;
        }
        if conn.is_none() {
            match connect(peer, &opts) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if e.is_wrong_key() {
                        log::warn!("gossip: {peer} holds another cluster key: not talking to it");
                    } else {
                        log::debug!("gossip: cannot reach {peer}: {}", mosaic_transport::error_chain(&e));
                    }
                    failed_at = Some(Instant::now());
                    continue;
                }
            }
        }
        if conn.as_ref().is_some_and(|c| c.call(wire::GOSSIP, &bytes).is_err()) {
            conn = None;
            failed_at = Some(Instant::now());
        } else {
            failed_at = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_view_round_trips() {
        let mut own = LoadVector::empty("tcp://10.0.0.1:7070");
        own.load = 150;
        let v = ClusterView {
            own,
            members: vec!["tcp://10.0.0.2:7070".into(), "tcp://10.0.0.3:7070".into()],
            window: vec![LoadVector::empty("tcp://10.0.0.2:7070")],
        };
        let b = v.encode();
        assert_eq!(ClusterView::decode(&b).unwrap(), v);
        assert!(ClusterView::decode(&b[..b.len() - 1]).is_err());
        // mosmon's table: a header, the node itself, each member (one without load yet).
        let text = v.text_table();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("NODE") && lines[1].contains("self") && lines[3].contains("no load yet"),
            "{text}"
        );
        let load_at = lines[0].find("LOAD/CPU").unwrap();
        assert_eq!(&lines[1][load_at..load_at + 4], "1.50", "aligned columns:\n{text}");
    }
}
