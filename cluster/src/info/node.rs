//! One node of the information layer, without I/O: membership by SWIM (the `foca` crate) and
//! the seed's load dissemination (each node sends its load vector and a few of the freshest it
//! holds to a random member at a fixed rate). The caller feeds it time and received bytes and
//! carries out what it asks: bytes to send to a node, events to act on.
//!
//! ```text
//!   receive(bytes, now) --+                       +--> drain(): Outgoing { to, bytes }
//!   tick(now) ------------+--> GossipNode --------+--> drain(): Event::Up / Event::Down
//!   set_load(vector) -----+     (foca, window)    +--> next_wakeup(): when to tick again
//! ```
//! Frames: a kind byte, then `SWIM` (foca's packet) or `LOAD` (a count byte, then that many
//! [`LoadVector`]s).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use bytes::{Buf, BufMut};
use foca::{Config, Foca, Header, Identity, Member, Message, NoCustomBroadcast, OwnedNotification, State, Timer};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::load::LoadVector;
use super::window::InfoWindow;

/// A frame of foca's SWIM protocol.
const SWIM: u8 = 0;
/// A frame of load vectors.
const LOAD: u8 = 1;
/// Largest frame the node sends.
pub const MAX_FRAME: usize = 1400;

/// A node's identity: its agent address, and a generation that grows when it rejoins after
/// being declared down. Cheap to clone and compare (foca does both a lot): the address is shared.
#[derive(Clone, Debug, PartialOrd, Ord)]
pub struct NodeId {
    /// Where its agent is reached.
    pub addr: std::sync::Arc<str>,
    /// Bumped on each rejoin.
    pub generation: u32,
}

impl NodeId {
    /// The identity of the node at `addr`, first generation.
    pub fn new(addr: &str) -> NodeId {
        NodeId { addr: addr.into(), generation: 0 }
    }
}

impl PartialEq for NodeId {
    fn eq(&self, other: &Self) -> bool {
        self.generation == other.generation
            && (std::sync::Arc::ptr_eq(&self.addr, &other.addr) || self.addr == other.addr)
    }
}

impl Eq for NodeId {}

impl std::hash::Hash for NodeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.addr.hash(state);
        self.generation.hash(state);
    }
}

impl Identity for NodeId {
    type Addr = std::sync::Arc<str>;

    fn renew(&self) -> Option<Self> {
        Some(NodeId { addr: self.addr.clone(), generation: self.generation.wrapping_add(1) })
    }

    fn addr(&self) -> std::sync::Arc<str> {
        self.addr.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// How a node gossips.
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// How often it sends its load vector.
    pub load_period: Duration,
    /// To how many random members each time.
    pub fanout: usize,
    /// How many entries its window keeps.
    pub window: usize,
    /// How many window entries ride along with its own vector.
    pub carry: usize,
    /// Entries older than this are dropped from the window (a node that stopped talking fades
    /// out even before it is found dead).
    pub max_age: Duration,
    /// For this long after it first hears of a member, a node asks a member for more members
    /// every [`boot_announce`](Self::boot_announce) (then as `swim` says, foca's every 30 s on
    /// a LAN): a node that joined while others did learns them all in seconds, not minutes
    /// (updates it missed reach it only through these member lists).
    pub boot: Duration,
    /// See [`boot`](Self::boot).
    pub boot_announce: Duration,
    /// Membership (SWIM): probe period, time-outs, suspicion.
    pub swim: Config,
}

impl GossipConfig {
    /// Defaults for a local network of about `nodes` members: a load vector every second to
    /// one member with 4 window entries riding along, a window of 16 entries of at most 20 s,
    /// foca's LAN settings.
    pub fn lan(nodes: u32) -> GossipConfig {
        let mut swim = Config::new_lan(std::num::NonZeroU32::new(nodes.max(1)).unwrap_or(std::num::NonZeroU32::MIN));
        swim.max_packet_size = std::num::NonZeroUsize::new(MAX_FRAME - 1).unwrap_or(swim.max_packet_size);
        // Down members (and their timers) are forgotten after two minutes, not foca's day: a
        // peer cannot make the member list grow for long with made-up dead members.
        swim.remove_down_after = Duration::from_secs(120);
        GossipConfig {
            load_period: Duration::from_secs(1),
            fanout: 1,
            window: 16,
            carry: 4,
            max_age: Duration::from_secs(20),
            boot: Duration::from_secs(30),
            boot_announce: Duration::from_secs(1),
            swim,
        }
    }
}

/// Bytes to carry to a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The node's address.
    pub to: String,
    /// The frame.
    pub bytes: Vec<u8>,
}

/// A membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A node joined (or came back).
    Up(String),
    /// A node was found dead (or left).
    Down(String),
}

/// What a node counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GossipStats {
    /// Frames sent.
    pub frames_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Frames received that did not parse, or that foca refused.
    pub rejected: u64,
}

/// Where a node is in its boot ([`GossipConfig::boot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Boot {
    /// It knows no member yet.
    Waiting,
    /// It asks for members often until then.
    Until(Duration),
    /// It asks as foca's steady settings say.
    Done,
}

/// One node of the information layer (see the module's documentation). Times are durations
/// since an arbitrary start, from the caller's clock (real, or a simulation's).
pub struct GossipNode {
    me: NodeId,
    foca: Foca<NodeId, WireCodec, SmallRng, NoCustomBroadcast>,
    runtime: foca::AccumulatingRuntime<NodeId>,
    /// Foca's timers: (due, sequence) in a heap, the events by sequence.
    timers: BinaryHeap<Reverse<(Duration, u64)>>,
    timer_events: std::collections::HashMap<u64, Timer<NodeId>>,
    next_seq: u64,
    window: InfoWindow,
    /// The addresses of the members alive as foca last said (foca keeps one identity per
    /// address; a renamed member keeps its place), with their place in `alive_list` (for
    /// picking one at random). Only the load of these addresses is taken.
    alive: std::collections::HashMap<String, usize>,
    alive_list: Vec<String>,
    own: LoadVector,
    cfg: GossipConfig,
    next_load: Duration,
    rng: SmallRng,
    out: Vec<Outgoing>,
    events: Vec<Event>,
    stats: GossipStats,
    /// Its boot: `Waiting` until it first hears of a member, then the time it ends (foca's
    /// steady settings taken then); `Done` after.
    boot: Boot,
    now: Duration,
}

impl GossipNode {
    /// A node at `addr` (alone until it joins), its randomness from `seed`, at time `now`.
    pub fn new(addr: &str, cfg: GossipConfig, seed: u64, now: Duration) -> GossipNode {
        let me = NodeId::new(addr);
        let mut booting = cfg.swim.clone();
        if let Some(p) = booting.periodic_announce.as_mut() {
            p.frequency = p.frequency.min(cfg.boot_announce);
        }
        let foca = Foca::new(me.clone(), booting, SmallRng::seed_from_u64(seed), WireCodec);
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        // Spread the nodes' load rounds over the period.
        let period_ns = u64::try_from(cfg.load_period.as_nanos()).unwrap_or(u64::MAX).max(1);
        let phase = Duration::from_nanos(rng.random_range(0..period_ns));
        GossipNode {
            window: InfoWindow::new(cfg.window),
            alive: std::collections::HashMap::new(),
            alive_list: Vec::new(),
            own: LoadVector::empty(addr),
            next_load: now + phase,
            me,
            foca,
            runtime: foca::AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            timer_events: std::collections::HashMap::new(),
            next_seq: 0,
            cfg,
            rng,
            out: Vec::new(),
            events: Vec::new(),
            stats: GossipStats::default(),
            boot: Boot::Waiting,
            now,
        }
    }

    /// Its address.
    pub fn addr(&self) -> &str {
        &self.me.addr
    }

    /// Asks the node at `peer` to let this one join (it learns the rest from there).
    pub fn join(&mut self, peer: &str, now: Duration) {
        self.now = now;
        let dst = NodeId::new(peer);
        if let Err(e) = self.foca.announce(dst, &mut self.runtime) {
            log::warn!("gossip: cannot announce to {peer}: {e}");
        }
        self.flush_runtime();
    }

    /// Replaces its own load vector (what it tells the others from now on).
    pub fn set_load(&mut self, mut v: LoadVector) {
        v.node = self.me.addr.to_string();
        v.age = Duration::ZERO;
        self.own = v;
    }

    /// Its own load vector.
    pub fn own_load(&self) -> &LoadVector {
        &self.own
    }

    /// Takes a frame received at `now`.
    pub fn receive(&mut self, bytes: &[u8], now: Duration) {
        self.now = now;
        match bytes.split_first() {
            Some((&SWIM, swim)) => {
                if self.foca.handle_data(swim, &mut self.runtime).is_err() {
                    self.stats.rejected += 1;
                }
                self.flush_runtime();
            }
            Some((&LOAD, load)) => {
                if !self.take_load(load, now) {
                    self.stats.rejected += 1;
                }
            }
            _ => self.stats.rejected += 1,
        }
    }

    /// Takes a frame of load vectors; false if it did not parse.
    fn take_load(&mut self, b: &[u8], now: Duration) -> bool {
        let Some((&n, mut rest)) = b.split_first() else { return false };
        for _ in 0..n {
            let Some((v, more)) = LoadVector::decode(rest) else { return false };
            rest = more;
            // Only members known alive: a dead node's last vector, still carried by nodes that
            // have not found it dead yet, does not come back; nor does a stale one.
            if *v.node != *self.me.addr && self.alive.contains_key(&v.node) && v.age <= self.cfg.max_age {
                self.window.offer(v, now);
            }
        }
        rest.is_empty()
    }

    /// Runs what is due at `now`: foca's timers, and a round of load gossip.
    pub fn tick(&mut self, now: Duration) {
        self.now = now;
        if matches!(self.boot, Boot::Until(end) if now >= end) {
            self.boot = Boot::Done;
            if let Err(e) = self.foca.set_config(self.cfg.swim.clone()) {
                log::warn!("gossip: cannot take the steady settings after booting: {e}");
            }
        }
        while let Some(Reverse((due, seq))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            if let Some(t) = self.timer_events.remove(&seq) {
                if let Err(e) = self.foca.handle_timer(t, &mut self.runtime) {
                    log::debug!("gossip: timer: {e}");
                }
                self.flush_runtime();
            }
        }
        if self.next_load <= now {
            // One round however late (after a stall, not a burst of them).
            self.next_load = if now - self.next_load >= self.cfg.load_period {
                now + self.cfg.load_period
            } else {
                self.next_load + self.cfg.load_period
            };
            self.window.drop_older_than(self.cfg.max_age, now);
            self.send_load(now);
        }
    }

    /// Sends its vector and the freshest entries of its window to `fanout` random members.
    fn send_load(&mut self, now: Duration) {
        if self.alive_list.is_empty() {
            return;
        }
        let mut frame = vec![LOAD, 0];
        let mut n = 0u8;
        let fresh = self.window.entries(now);
        for v in std::iter::once(&self.own).chain(fresh.iter().take(self.cfg.carry)) {
            let before = frame.len();
            v.encode(&mut frame);
            if frame.len() > MAX_FRAME {
                frame.truncate(before);
                break;
            }
            n += 1;
        }
        frame[1] = n;
        for _ in 0..self.cfg.fanout.min(self.alive_list.len()) {
            let to = self.alive_list[self.rng.random_range(0..self.alive_list.len())].clone();
            self.push(to, frame.clone());
        }
    }

    fn push(&mut self, to: String, bytes: Vec<u8>) {
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        self.out.push(Outgoing { to, bytes });
    }

    /// Moves what foca asked for into the node's outputs.
    fn flush_runtime(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            let mut frame = Vec::with_capacity(1 + data.len());
            frame.push(SWIM);
            frame.extend_from_slice(&data);
            self.push(to.addr.to_string(), frame);
        }
        while let Some((after, t)) = self.runtime.to_schedule() {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.timers.push(Reverse((self.now + after, seq)));
            self.timer_events.insert(seq, t);
        }
        while let Some(n) = self.runtime.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => {
                    if self.boot == Boot::Waiting {
                        // Its boot counts from when it joined (a node alone for a while, its
                        // join retried, asks for members often once it is in).
                        self.boot = Boot::Until(self.now + self.cfg.boot);
                    }
                    let addr = id.addr.to_string();
                    if !self.alive.contains_key(&addr) {
                        self.alive.insert(addr.clone(), self.alive_list.len());
                        self.alive_list.push(addr.clone());
                        self.events.push(Event::Up(addr));
                    }
                }
                OwnedNotification::MemberDown(id) => {
                    let addr = id.addr.to_string();
                    if let Some(k) = self.alive.remove(&addr) {
                        self.alive_list.swap_remove(k);
                        if let Some(moved) = self.alive_list.get(k) {
                            self.alive.insert(moved.clone(), k);
                        }
                        self.window.forget(&addr);
                        self.events.push(Event::Down(addr));
                    }
                }
                _ => {}
            }
        }
    }

    /// What it asks for since the last call: frames to send, and membership events.
    pub fn drain(&mut self) -> (Vec<Outgoing>, Vec<Event>) {
        (std::mem::take(&mut self.out), std::mem::take(&mut self.events))
    }

    /// When it next needs a [`tick`](Self::tick).
    pub fn next_wakeup(&self) -> Duration {
        let timer = self.timers.peek().map(|Reverse((due, _))| *due);
        timer.map_or(self.next_load, |t| t.min(self.next_load))
    }

    /// The members it knows alive (itself excluded).
    pub fn members(&self) -> Vec<String> {
        let mut m: Vec<String> = self.foca.iter_members().map(|m| m.id().addr.to_string()).collect();
        m.sort();
        m
    }

    /// Its window: the freshest load vectors of others it holds, with their ages at `now`.
    pub fn window(&self, now: Duration) -> Vec<LoadVector> {
        self.window.entries(now)
    }

    /// The age of the oldest entry of its window at `now`.
    pub fn oldest_info(&self, now: Duration) -> Duration {
        self.window.oldest(now)
    }

    /// What it counted.
    pub fn stats(&self) -> GossipStats {
        self.stats
    }
}

/// Foca's messages on the wire, little-endian, every field checked (foca's own `Codec` trait).
struct WireCodec;

/// Why a SWIM packet did not encode or decode.
#[derive(Debug)]
struct CodecError(&'static str);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CodecError {}

fn room(buf: &impl BufMut, n: usize) -> Result<(), CodecError> {
    if buf.remaining_mut() < n {
        Err(CodecError("packet full"))
    } else {
        Ok(())
    }
}

fn put_id(buf: &mut impl BufMut, id: &NodeId) -> Result<(), CodecError> {
    let addr = id.addr.as_bytes();
    let len = u8::try_from(addr.len()).map_err(|_| CodecError("an address over 255 bytes"))?;
    room(buf, 5 + addr.len())?;
    buf.put_u32_le(id.generation);
    buf.put_u8(len);
    buf.put_slice(addr);
    Ok(())
}

fn need(buf: &impl Buf, n: usize) -> Result<(), CodecError> {
    if buf.remaining() < n {
        Err(CodecError("truncated"))
    } else {
        Ok(())
    }
}

fn get_id(buf: &mut impl Buf) -> Result<NodeId, CodecError> {
    need(buf, 5)?;
    let generation = buf.get_u32_le();
    let len = usize::from(buf.get_u8());
    need(buf, len)?;
    let mut addr = vec![0; len];
    buf.copy_to_slice(&mut addr);
    let addr = std::str::from_utf8(&addr).map_err(|_| CodecError("an address not UTF-8"))?;
    Ok(NodeId { addr: addr.into(), generation })
}

impl foca::Codec<NodeId> for WireCodec {
    type Error = CodecError;

    fn encode_header(&mut self, h: &Header<NodeId>, mut buf: impl BufMut) -> Result<(), CodecError> {
        put_id(&mut buf, &h.src)?;
        room(&buf, 2)?;
        buf.put_u16_le(h.src_incarnation);
        put_id(&mut buf, &h.dst)?;
        let (tag, id, probe) = match &h.message {
            Message::Ping(p) => (0, None, *p),
            Message::Ack(p) => (1, None, *p),
            Message::PingReq { target, probe_number } => (2, Some(target), *probe_number),
            Message::IndirectPing { origin, probe_number } => (3, Some(origin), *probe_number),
            Message::IndirectAck { target, probe_number } => (4, Some(target), *probe_number),
            Message::ForwardedAck { origin, probe_number } => (5, Some(origin), *probe_number),
            Message::Announce => (6, None, 0),
            Message::Feed => (7, None, 0),
            Message::Gossip => (8, None, 0),
            Message::Broadcast => (9, None, 0),
            Message::TurnUndead => (10, None, 0),
        };
        room(&buf, 2)?;
        buf.put_u8(tag);
        buf.put_u8(probe);
        if let Some(id) = id {
            put_id(&mut buf, id)?;
        }
        Ok(())
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<NodeId>, CodecError> {
        let src = get_id(&mut buf)?;
        need(&buf, 2)?;
        let src_incarnation = buf.get_u16_le();
        let dst = get_id(&mut buf)?;
        need(&buf, 2)?;
        let (tag, probe_number) = (buf.get_u8(), buf.get_u8());
        let message = match tag {
            0 => Message::Ping(probe_number),
            1 => Message::Ack(probe_number),
            2 => Message::PingReq { target: get_id(&mut buf)?, probe_number },
            3 => Message::IndirectPing { origin: get_id(&mut buf)?, probe_number },
            4 => Message::IndirectAck { target: get_id(&mut buf)?, probe_number },
            5 => Message::ForwardedAck { origin: get_id(&mut buf)?, probe_number },
            6 => Message::Announce,
            7 => Message::Feed,
            8 => Message::Gossip,
            9 => Message::Broadcast,
            10 => Message::TurnUndead,
            _ => return Err(CodecError("an unknown message")),
        };
        Ok(Header { src, src_incarnation, dst, message })
    }

    fn encode_member(&mut self, m: &Member<NodeId>, mut buf: impl BufMut) -> Result<(), CodecError> {
        put_id(&mut buf, m.id())?;
        room(&buf, 3)?;
        buf.put_u16_le(m.incarnation());
        buf.put_u8(match m.state() {
            State::Alive => 0,
            State::Suspect => 1,
            State::Down => 2,
        });
        Ok(())
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<Member<NodeId>, CodecError> {
        let id = get_id(&mut buf)?;
        need(&buf, 3)?;
        let incarnation = buf.get_u16_le();
        let state = match buf.get_u8() {
            0 => State::Alive,
            1 => State::Suspect,
            2 => State::Down,
            _ => return Err(CodecError("an unknown member state")),
        };
        Ok(Member::new(id, incarnation, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivers every frame at once (no delay) among `nodes`, ticking them until `until`.
    fn run(nodes: &mut [GossipNode], from: Duration, until: Duration, dead: &[usize]) {
        let mut now = from;
        while now < until {
            now += Duration::from_millis(10);
            for n in nodes.iter_mut() {
                n.tick(now);
            }
            loop {
                let mut frames = Vec::new();
                for (k, n) in nodes.iter_mut().enumerate() {
                    let (out, _) = n.drain();
                    if !dead.contains(&k) {
                        frames.extend(out);
                    }
                }
                if frames.is_empty() {
                    break;
                }
                for f in frames {
                    if let Some(k) = nodes.iter().position(|n| n.addr() == f.to) {
                        if !dead.contains(&k) {
                            nodes[k].receive(&f.bytes, now);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nodes_join_through_one_member_learn_each_others_load_and_find_a_dead_one() {
        let cfg = GossipConfig::lan(5);
        let mut nodes: Vec<GossipNode> =
            (0..5).map(|i| GossipNode::new(&format!("sim://{i}"), cfg.clone(), i, Duration::ZERO)).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            let mut v = LoadVector::empty("");
            v.load = 100 * u32::try_from(i).unwrap_or(0);
            n.set_load(v);
        }
        for n in nodes.iter_mut().skip(1) {
            n.join("sim://0", Duration::ZERO);
        }
        run(&mut nodes, Duration::ZERO, Duration::from_secs(10), &[]);
        for n in &nodes {
            assert_eq!(n.members().len(), 4, "{} knows {:?}", n.addr(), n.members());
            let w = n.window(Duration::from_secs(10));
            assert_eq!(w.len(), 4, "{} holds {w:?}", n.addr());
            for v in &w {
                let i: u32 = v.node.trim_start_matches("sim://").parse().unwrap();
                assert_eq!(v.load, 100 * i, "what {} says of {}", n.addr(), v.node);
                assert!(v.age < Duration::from_secs(5), "{v:?}");
            }
        }
        // Node 3 goes silent: the others find it dead and forget its load.
        for n in nodes.iter_mut() {
            n.drain();
        }
        run(&mut nodes, Duration::from_secs(10), Duration::from_secs(30), &[3]);
        for (k, n) in nodes.iter().enumerate().filter(|(k, _)| *k != 3) {
            assert!(!n.members().contains(&"sim://3".to_string()), "node {k} still has 3: {:?}", n.members());
            assert!(n.window(Duration::from_secs(30)).iter().all(|v| v.node != "sim://3"));
        }
    }

    #[test]
    fn malformed_frames_are_counted_not_fatal() {
        let mut n = GossipNode::new("sim://0", GossipConfig::lan(2), 1, Duration::ZERO);
        for bad in [&[][..], &[7, 1, 2], &[LOAD, 3, 1], &[SWIM, 1, 2, 3]] {
            n.receive(bad, Duration::ZERO);
        }
        assert_eq!(n.stats().rejected, 4);
        assert!(n.members().is_empty());
    }
}
