//! An explicit-state model checker for the coherence protocol, over the same [`Node`] code the
//! nodes run.
//!
//! A state is every node's protocol state, what each node has mapped (which value of the page,
//! writable or not: the memory the MMU enforces), the bytes that arrived and wait to be
//! installed, the messages in flight on each ordered channel between two nodes (a node's
//! messages to itself are handled at once, within the step that sent them, as the I/O layer
//! does), the latest value written to each page, and each node's one
//! application thread: the operations it may still start and the one it is blocked on. A step is
//! one of: deliver the first message of a channel; a node's thread starts a read, a write or an
//! eviction of any page (a read or write the mapping allows happens at once, as on real memory;
//! one it does not allow faults to the protocol and blocks); or a blocked thread retries.
//!
//! With [`Config::losses`], the network may also lose the first message of a channel (it is
//! sent again later, after the messages behind it: a step of its own) or deliver it twice, up to
//! that many times in a run. Messages are numbered per channel and the receiver puts them back
//! in order with the nodes' own [`Inorder`] (holding early ones, dropping repeats), which the
//! checker therefore checks too; numbers are kept relative to what each receiver expects next,
//! so that states do not differ by how many messages came before.
//!
//! [`check`] explores every state reachable from the start, breadth first, and checks in each:
//! - at most one node maps a page writable, and then no other node maps it at all;
//! - every mapped copy holds the latest value written to the page (so a read returns the latest
//!   write, and no invalidation was lost);
//! - in a state with no step left, no thread is blocked, no message is in flight and every home
//!   is idle (every request answered, no deadlock);
//! - the protocol accepts every message it is sent and the actions it returns make sense (it
//!   only sends a page it maps, only installs bytes that arrived).
//!
//! Together with each thread's operations running one at a time in program order, the first two
//! give sequential consistency: every read returns the value of the last write to that page in
//! the one order all writes to it take.
//!
//! [`simulate`] walks random schedules of larger jobs with the same checks. [`Mutation`] breaks
//! the I/O layer on purpose, to show that the checker finds what it is meant to find.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};

use crate::order::Inorder;
use crate::protocol::{Action, Homes, Msg, Node, NodeId, PageNo, ProtocolError, Want};

/// What to explore.
#[derive(Clone, Debug)]
pub struct Config {
    /// Nodes in the job.
    pub nodes: u16,
    /// Pages of the shared region (their homes spread over the nodes).
    pub pages: u64,
    /// Operations each node's thread starts, in every order and on every page.
    pub ops_per_node: u32,
    /// Whether evictions of read-only copies are among them.
    pub evictions: bool,
    /// Locks (0 to `locks - 1`) the threads may take: a lock operation acquires, and once
    /// granted releases at once (the model checks that no two nodes hold a lock together and
    /// that every acquire is granted).
    pub locks: u64,
    /// Whether a thread holding lock `l` writes page `l % pages` before it releases the lock
    /// (faulting as any write does): locks and pages in one run.
    pub write_in_lock: bool,
    /// Give up (and fail) past this many distinct states.
    pub max_states: usize,
    /// The pages' homes (by turns if `None`).
    pub homes: Option<Homes>,
    /// Messages the network may lose (each sent again later, after the ones behind it) or
    /// deliver twice, in one run: the nodes put them back in order ([`Inorder`]).
    pub losses: u32,
}

/// A fault injected into the I/O layer (not the protocol), so that a test can show the checker
/// catching it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// A correct I/O layer.
    None,
    /// [`Action::Downgrade`] is ignored: an owner keeps writing after sharing its page.
    SkipDowngrade,
    /// [`Action::Drop`] is ignored: invalidated copies stay mapped.
    SkipDrop,
    /// [`Msg::Invalidate`] messages are lost.
    LoseInvalidate,
    /// Messages go to the protocol as they arrive, not put back in order (with
    /// [`Config::losses`], a lost message overtaken by the next).
    NoReorder,
}

/// An operation a node's thread starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read the page.
    Read,
    /// Write a new value to it.
    Write,
    /// Drop a read-only copy of it.
    Evict,
    /// Take the lock numbered as the step's page, then give it up.
    Lock,
}

/// One step between two states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The first message on the channel from `from` to `to` arrives.
    Deliver {
        /// The sender.
        from: NodeId,
        /// The receiver.
        to: NodeId,
        /// The message.
        msg: Msg,
    },
    /// Node `node`'s thread starts `op` on `page`.
    Start {
        /// The node.
        node: NodeId,
        /// The page.
        page: PageNo,
        /// The operation.
        op: Op,
    },
    /// Node `node`'s blocked thread tries its access again.
    Retry {
        /// The node.
        node: NodeId,
    },
    /// The first message on the channel from `from` to `to` is lost (and will be sent again).
    Lose {
        /// The sender.
        from: NodeId,
        /// The receiver.
        to: NodeId,
        /// The message.
        msg: Msg,
    },
    /// A lost message is sent again and arrives.
    Resend {
        /// The sender.
        from: NodeId,
        /// The receiver.
        to: NodeId,
        /// The message.
        msg: Msg,
    },
    /// A copy of the first message on the channel arrives; the message stays in flight (a
    /// retry whose first copy was not lost after all).
    Repeat {
        /// The sender.
        from: NodeId,
        /// The receiver.
        to: NodeId,
        /// The message.
        msg: Msg,
    },
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two nodes hold `lock` at once.
    TwoHolders {
        /// The lock.
        lock: u64,
    },
    /// Two nodes map `page` writable, or one writable and another at all.
    TwoWriters {
        /// The page.
        page: PageNo,
    },
    /// `node` maps `page` holding `holds` where the latest write was `latest`.
    Stale {
        /// The node.
        node: NodeId,
        /// The page.
        page: PageNo,
        /// The value its copy holds.
        holds: u32,
        /// The latest value written.
        latest: u32,
    },
    /// The protocol refused a message.
    Protocol {
        /// The node that refused it.
        node: NodeId,
        /// Why.
        error: ProtocolError,
    },
    /// The protocol asked for something that cannot be done.
    BadAction {
        /// The node.
        node: NodeId,
        /// What.
        what: &'static str,
    },
    /// Nothing can move, yet work is left.
    Deadlock {
        /// Threads still blocked: (node, page).
        blocked: Vec<(NodeId, PageNo)>,
        /// Messages in flight.
        in_flight: usize,
        /// Homes with a transaction running or queued.
        busy_homes: Vec<NodeId>,
    },
    /// The exploration passed [`Config::max_states`].
    TooManyStates {
        /// The limit.
        limit: usize,
    },
}

/// A violation and the steps from the start that lead to it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// What went wrong.
    pub violation: Violation,
    /// How to get there.
    pub trace: Vec<Step>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:?}, after {} steps:", self.violation, self.trace.len())?;
        for (i, s) in self.trace.iter().enumerate() {
            writeln!(f, "  {i:>3}: {s:?}")?;
        }
        Ok(())
    }
}

/// What an exploration covered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Distinct states reached.
    pub states: usize,
    /// Steps taken (edges of the state graph).
    pub steps: u64,
    /// States with no step left (all checked to be at rest).
    pub final_states: usize,
    /// Longest path from the start, in steps.
    pub depth: usize,
}

/// A page as one node maps it: the value it holds and whether it may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Mapping {
    value: u32,
    writable: bool,
}

/// The whole system at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    nodes: Vec<Node>,
    /// By node * pages + page.
    mem: Vec<Option<Mapping>>,
    /// Bytes that arrived with a `Data` message, by node * pages + page.
    staged: Vec<Option<u32>>,
    /// Messages in flight, numbered, with the value a `Data` message carries, by
    /// from * nodes + to.
    net: Vec<VecDeque<(u64, Msg, u32)>>,
    /// The number of the next message on each channel, by from * nodes + to.
    sent: Vec<u64>,
    /// Lost messages, to be sent again: (from, to, number, message, value), sorted.
    lost: Vec<(usize, usize, u64, Msg, u32)>,
    /// Each node's reordering of its peers' messages.
    inorder: Vec<Inorder<(Msg, u32)>>,
    /// Losses and repeats left in this run.
    losses_left: u32,
    latest: Vec<u32>,
    ops_left: Vec<u32>,
    blocked: Vec<Option<(PageNo, Want)>>,
    /// The lock each thread waits for or holds.
    waiting_lock: Vec<Option<u64>>,
    /// Whether each thread holding its lock has started its write in the critical section.
    in_section: Vec<bool>,
}

struct World<'a> {
    cfg: &'a Config,
    mutation: Mutation,
}

impl World<'_> {
    fn n(&self) -> usize {
        usize::from(self.cfg.nodes)
    }

    fn at(&self, node: usize, page: PageNo) -> usize {
        // Pages of a model are few: the index fits.
        node * ix(self.cfg.pages) + ix(page)
    }

    fn start(&self) -> Result<State, Violation> {
        let nodes = (0..self.cfg.nodes)
            .map(|i| {
                let homes = self.cfg.homes.unwrap_or(Homes::interleaved(self.cfg.nodes));
                Node::with_homes(i, homes).map_err(|error| Violation::Protocol { node: i, error })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut mem = vec![None; self.n() * ix(self.cfg.pages)];
        // Every page starts at its home, owned and writable: zeros (value 0).
        // (Pages placed by first touch start nowhere: at their home once placed.)
        for p in 0..self.cfg.pages {
            if let Some(home) = nodes[0].home_of(p) {
                mem[self.at(usize::from(home), p)] = Some(Mapping { value: 0, writable: true });
            }
        }
        Ok(State {
            nodes,
            staged: vec![None; mem.len()],
            mem,
            net: vec![VecDeque::new(); self.n() * self.n()],
            sent: vec![0; self.n() * self.n()],
            lost: Vec::new(),
            inorder: vec![Inorder::new(self.n()); self.n()],
            losses_left: self.cfg.losses,
            latest: vec![0; ix(self.cfg.pages)],
            ops_left: vec![self.cfg.ops_per_node; self.n()],
            blocked: vec![None; self.n()],
            waiting_lock: vec![None; self.n()],
            in_section: vec![false; self.n()],
        })
    }

    /// Every step possible from `s`, with the state it leads to (or what it violates).
    fn successors(&self, s: &State) -> Vec<(Step, Result<State, Violation>)> {
        let mut out = Vec::new();
        for from in 0..self.n() {
            for to in 0..self.n() {
                if let Some((seq, msg, value)) = s.net[from * self.n() + to].front().cloned() {
                    let step = Step::Deliver { from: id(from), to: id(to), msg: msg.clone() };
                    let mut next = s.clone();
                    out.push((step, self.deliver(&mut next, from, to).map(|()| next)));
                    if s.losses_left > 0 && from != to {
                        let mut next = s.clone();
                        next.losses_left -= 1;
                        next.net[from * self.n() + to].pop_front();
                        next.lost.push((from, to, seq, msg.clone(), value));
                        next.lost.sort_by_key(|l| (l.0, l.1, l.2));
                        out.push((Step::Lose { from: id(from), to: id(to), msg: msg.clone() }, Ok(next)));
                        let mut next = s.clone();
                        next.losses_left -= 1;
                        let r = self.arrive(&mut next, from, to, seq, msg.clone(), value).map(|()| next);
                        out.push((Step::Repeat { from: id(from), to: id(to), msg }, r));
                    }
                }
            }
        }
        for (i, (from, to, seq, msg, value)) in s.lost.iter().cloned().enumerate() {
            let mut next = s.clone();
            next.lost.remove(i);
            let r = self.arrive(&mut next, from, to, seq, msg.clone(), value).map(|()| next);
            out.push((Step::Resend { from: id(from), to: id(to), msg }, r));
        }
        for (_, r) in &mut out {
            if let Ok(next) = r {
                self.renumber(next);
            }
        }
        for node in 0..self.n() {
            if let Some(l) = s.waiting_lock[node] {
                if !s.nodes[node].holds(l) {
                    continue;
                }
                let write = self.cfg.write_in_lock.then(|| l % self.cfg.pages.max(1));
                match (write, s.in_section[node]) {
                    (Some(page), false) => {
                        // Granted: the critical section's write (which may fault and block).
                        let mut next = s.clone();
                        next.in_section[node] = true;
                        let r = self.access(&mut next, node, page, Want::Write).map(|()| next);
                        out.push((Step::Start { node: id(node), page, op: Op::Write }, r));
                        continue;
                    }
                    // The write is blocked: retried below, with the lock held.
                    (Some(_), true) if s.blocked[node].is_some() => {}
                    _ => {
                        // The critical section is over (checked by `check_state`): release.
                        let mut next = s.clone();
                        next.waiting_lock[node] = None;
                        next.in_section[node] = false;
                        let r = match next.nodes[node].release(l) {
                            Ok(actions) => self.apply(&mut next, node, actions),
                            Err(_) => {
                                Err(Violation::BadAction { node: id(node), what: "a granted lock cannot be released" })
                            }
                        };
                        out.push((Step::Retry { node: id(node) }, r.map(|()| next)));
                        continue;
                    }
                }
            }
            match s.blocked[node] {
                Some((page, want)) => {
                    let mapped = s.mem[self.at(node, page)];
                    let can = allows(mapped, want);
                    if can || !s.nodes[node].is_pending(page) {
                        let mut next = s.clone();
                        let r = self.access(&mut next, node, page, want).map(|()| next);
                        out.push((Step::Retry { node: id(node) }, r));
                    }
                }
                None if s.ops_left[node] > 0 => {
                    for page in 0..self.cfg.pages {
                        for op in [Op::Read, Op::Write, Op::Evict] {
                            let mut next = s.clone();
                            next.ops_left[node] -= 1;
                            let r = match op {
                                Op::Read => self.access(&mut next, node, page, Want::Read),
                                Op::Write => self.access(&mut next, node, page, Want::Write),
                                Op::Evict if !self.cfg.evictions => continue,
                                Op::Evict => match next.nodes[node].evict(page) {
                                    Ok(actions) => self.apply(&mut next, node, actions),
                                    Err(_) => continue,
                                },
                                Op::Lock => continue,
                            };
                            out.push((Step::Start { node: id(node), page, op }, r.map(|()| next)));
                        }
                    }
                    for l in 0..self.cfg.locks {
                        let mut next = s.clone();
                        next.ops_left[node] -= 1;
                        next.waiting_lock[node] = Some(l);
                        let r = match next.nodes[node].acquire(l) {
                            Ok(actions) => self.apply(&mut next, node, actions),
                            Err(_) => {
                                Err(Violation::BadAction { node: id(node), what: "an idle node cannot ask for a lock" })
                            }
                        };
                        out.push((Step::Start { node: id(node), page: l, op: Op::Lock }, r.map(|()| next)));
                    }
                }
                None => {}
            }
        }
        out
    }

    /// Renumbers every channel's messages from the next one its receiver expects, so that states
    /// do not differ by how many messages were sent before.
    fn renumber(&self, s: &mut State) {
        // A copy of a message handed on already is dropped on arrival whatever its number: all
        // such copies are numbered -1, or their numbers would keep falling as more are sent.
        let renumber = |seq: u64, base: u64| {
            let seq = seq.wrapping_sub(base);
            if (seq as i64) < 0 {
                u64::MAX
            } else {
                seq
            }
        };
        for to in 0..self.n() {
            for from in 0..self.n() {
                let base = s.inorder[to].rebase(from);
                let ch = from * self.n() + to;
                s.sent[ch] = s.sent[ch].wrapping_sub(base);
                for m in &mut s.net[ch] {
                    m.0 = renumber(m.0, base);
                }
                for l in s.lost.iter_mut().filter(|l| (l.0, l.1) == (from, to)) {
                    l.2 = renumber(l.2, base);
                }
            }
        }
        s.lost.sort_by_key(|l| (l.0, l.1, l.2));
    }

    /// Node `node`'s thread accesses `page`: at once if its mapping allows, else it faults and
    /// blocks.
    fn access(&self, s: &mut State, node: usize, page: PageNo, want: Want) -> Result<(), Violation> {
        let i = self.at(node, page);
        if allows(s.mem[i], want) {
            s.blocked[node] = None;
            if want == Want::Write {
                s.latest[ix(page)] += 1;
                s.mem[i] = Some(Mapping { value: s.latest[ix(page)], writable: true });
            }
            // A read's value is checked with every other mapping, in `check_state`.
            return Ok(());
        }
        s.blocked[node] = Some((page, want));
        let actions = s.nodes[node].fault(page, want);
        if actions.is_empty() && !s.nodes[node].is_pending(page) {
            return Err(Violation::BadAction { node: id(node), what: "a fault on an unmapped page asked for nothing" });
        }
        self.apply(s, node, actions)
    }

    fn deliver(&self, s: &mut State, from: usize, to: usize) -> Result<(), Violation> {
        let Some((seq, msg, value)) = s.net[from * self.n() + to].pop_front() else { return Ok(()) };
        self.arrive(s, from, to, seq, msg, value)
    }

    /// Message `seq` from `from` arrives at `to`, which hands on, in order, every message from
    /// `from` whose turn it is (none if this one is early, or a repeat).
    fn arrive(&self, s: &mut State, from: usize, to: usize, seq: u64, msg: Msg, value: u32) -> Result<(), Violation> {
        if self.mutation == Mutation::NoReorder {
            return self.handle(s, from, to, msg, value);
        }
        s.inorder[to].accept(from, seq, (msg, value));
        while let Some((msg, value)) = s.inorder[to].next(from) {
            self.handle(s, from, to, msg, value)?;
        }
        Ok(())
    }

    /// Node `to`'s protocol handles `msg` from `from`.
    fn handle(&self, s: &mut State, from: usize, to: usize, msg: Msg, value: u32) -> Result<(), Violation> {
        if let Msg::Data { page } = msg {
            let slot = &mut s.staged[self.at(to, page)];
            if slot.is_some() {
                return Err(Violation::BadAction {
                    node: id(to),
                    what: "a page arrived before the last one was installed",
                });
            }
            *slot = Some(value);
        }
        let actions = s.nodes[to].handle(id(from), msg).map_err(|error| Violation::Protocol { node: id(to), error })?;
        self.apply(s, to, actions)
    }

    /// Carries out `node`'s actions, as an I/O layer would (or a broken one, per the mutation).
    fn apply(&self, s: &mut State, node: usize, actions: Vec<Action>) -> Result<(), Violation> {
        let bad = |what| Violation::BadAction { node: id(node), what };
        for a in actions {
            match a {
                Action::Send { to, msg } => {
                    if self.mutation == Mutation::LoseInvalidate && matches!(msg, Msg::Invalidate { .. }) {
                        continue;
                    }
                    let value = match msg {
                        Msg::Data { page } => {
                            s.mem[self.at(node, page)].ok_or(bad("sent a page it does not map"))?.value
                        }
                        _ => 0,
                    };
                    let ch = node * self.n() + usize::from(to);
                    s.net[ch].push_back((s.sent[ch], msg, value));
                    s.sent[ch] += 1;
                }
                Action::Install { page, writable } => {
                    let i = self.at(node, page);
                    let value = s.staged[i].take().ok_or(bad("installed a page that did not arrive"))?;
                    s.mem[i] = Some(Mapping { value, writable });
                }
                Action::Upgrade { page } => {
                    let m = s.mem[self.at(node, page)].as_mut().ok_or(bad("made writable a page it does not map"))?;
                    m.writable = true;
                }
                Action::Downgrade { page } => {
                    if self.mutation != Mutation::SkipDowngrade {
                        if let Some(m) = s.mem[self.at(node, page)].as_mut() {
                            m.writable = false;
                        }
                    }
                }
                Action::Drop { page } => {
                    if self.mutation != Mutation::SkipDrop {
                        s.mem[self.at(node, page)] = None;
                    }
                }
                Action::Placed { page } => {
                    let m = &mut s.mem[self.at(node, page)];
                    if m.is_some() {
                        return Err(bad("placed here a page it maps already"));
                    }
                    *m = Some(Mapping { value: 0, writable: true });
                }
                // The model reads who holds a lock from the nodes themselves.
                Action::Granted { .. } => {}
            }
        }
        // A node's messages to itself are handled at once, in order, within the same step (as
        // the I/O layer does): they never wait among other nodes' messages.
        while !s.net[node * self.n() + node].is_empty() {
            self.deliver(s, node, node)?;
        }
        Ok(())
    }

    /// The invariants of every state.
    fn check_state(&self, s: &State) -> Result<(), Violation> {
        for lock in 0..self.cfg.locks {
            if s.nodes.iter().filter(|n| n.holds(lock)).count() > 1 {
                return Err(Violation::TwoHolders { lock });
            }
        }
        for page in 0..self.cfg.pages {
            let latest = s.latest[ix(page)];
            let (mut writers, mut mapped) = (0, 0);
            for node in 0..self.n() {
                if let Some(m) = s.mem[self.at(node, page)] {
                    mapped += 1;
                    writers += usize::from(m.writable);
                    if m.value != latest {
                        return Err(Violation::Stale { node: id(node), page, holds: m.value, latest });
                    }
                }
            }
            if writers > 1 || (writers == 1 && mapped > 1) {
                return Err(Violation::TwoWriters { page });
            }
        }
        Ok(())
    }

    /// The conditions of a state with no step left.
    fn check_at_rest(&self, s: &State) -> Result<(), Violation> {
        let blocked: Vec<(NodeId, PageNo)> = s
            .blocked
            .iter()
            .zip(&s.waiting_lock)
            .enumerate()
            .filter_map(|(n, (b, l))| b.map(|(p, _)| p).or(*l).map(|p| (id(n), p)))
            .collect();
        let in_flight = s.net.iter().map(VecDeque::len).sum::<usize>()
            + s.lost.len()
            + s.inorder.iter().map(Inorder::held).sum::<usize>();
        let busy_homes: Vec<NodeId> = s.nodes.iter().filter(|n| !n.home_idle()).map(Node::id).collect();
        if blocked.is_empty() && in_flight == 0 && busy_homes.is_empty() {
            Ok(())
        } else {
            Err(Violation::Deadlock { blocked, in_flight, busy_homes })
        }
    }
}

/// Node `n` of a model (its nodes are at most [`crate::protocol::MAX_NODES`]).
fn id(n: usize) -> NodeId {
    NodeId::try_from(n).expect("a model has at most MAX_NODES nodes")
}

/// Index of page `p` of a model (its pages are few).
fn ix(p: PageNo) -> usize {
    usize::try_from(p).expect("a model's pages fit in memory")
}

fn allows(m: Option<Mapping>, want: Want) -> bool {
    match (m, want) {
        (None, _) => false,
        (Some(_), Want::Read) => true,
        (Some(m), Want::Write) => m.writable,
    }
}

fn fingerprint(s: &State) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Explores every state reachable under `cfg`, breadth first (so a violation's trace is a
/// shortest one), with the I/O layer broken as `mutation` says.
///
/// States are told apart by a 64-bit hash of their contents, as explicit-state checkers such as
/// SPIN's bitstate mode and stateright do: two distinct states colliding would hide one of them,
/// with odds of about states² / 2⁶⁵.
pub fn check(cfg: &Config, mutation: Mutation) -> Result<Report, Box<Failure>> {
    let world = World { cfg, mutation };
    let fail = |violation, trace| Box::new(Failure { violation, trace });
    let start = world.start().map_err(|v| fail(v, Vec::new()))?;
    // Each state's parent and the step from it, to rebuild traces.
    let mut seen: HashMap<u64, Option<(u64, Step)>> = HashMap::new();
    let root = fingerprint(&start);
    seen.insert(root, None);
    let mut frontier = VecDeque::from([(start, root, 0usize)]);
    let mut report = Report::default();
    let trace_to = |seen: &HashMap<u64, Option<(u64, Step)>>, mut fp: u64| {
        let mut steps = Vec::new();
        while let Some(Some((parent, step))) = seen.get(&fp) {
            steps.push(step.clone());
            fp = *parent;
        }
        steps.reverse();
        steps
    };
    while let Some((state, fp, depth)) = frontier.pop_front() {
        report.states += 1;
        report.depth = report.depth.max(depth);
        let next = world.successors(&state);
        if next.is_empty() {
            report.final_states += 1;
            world.check_at_rest(&state).map_err(|v| fail(v, trace_to(&seen, fp)))?;
        }
        for (step, r) in next {
            report.steps += 1;
            let checked = r.and_then(|s| world.check_state(&s).map(|()| s));
            let s = match checked {
                Ok(s) => s,
                Err(v) => {
                    let mut trace = trace_to(&seen, fp);
                    trace.push(step);
                    return Err(fail(v, trace));
                }
            };
            let f = fingerprint(&s);
            if seen.contains_key(&f) {
                continue;
            }
            if seen.len() >= cfg.max_states {
                return Err(fail(Violation::TooManyStates { limit: cfg.max_states }, Vec::new()));
            }
            seen.insert(f, Some((fp, step)));
            frontier.push_back((s, f, depth + 1));
        }
    }
    Ok(report)
}

/// The longest random walk [`simulate`] takes.
const MAX_WALK: usize = 100_000;

/// Walks `walks` random schedules of `cfg` from the start to rest (each step chosen uniformly
/// among the possible ones by a generator seeded with `seed`), with the checks of [`check`] at
/// every step. For jobs too large to explore whole. Returns the steps taken in all.
pub fn simulate(cfg: &Config, mutation: Mutation, seed: u64, walks: u32) -> Result<u64, Box<Failure>> {
    let world = World { cfg, mutation };
    let mut rng = seed | 1;
    let mut total = 0u64;
    for _ in 0..walks {
        let mut s = world.start().map_err(|violation| Box::new(Failure { violation, trace: Vec::new() }))?;
        let mut trace = Vec::new();
        // Bounded: the protocol has no fairness, so two threads can take a page from each other
        // forever on an unlucky schedule (the exhaustive check sees such cycles as states it
        // has seen); a walk that long ends there.
        while trace.len() < MAX_WALK {
            let mut next = world.successors(&s);
            if next.is_empty() {
                world.check_at_rest(&s).map_err(|violation| Box::new(Failure { violation, trace: trace.clone() }))?;
                break;
            }
            // xorshift64: deterministic for a seed, so a failing walk can be replayed.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let (step, r) = next.swap_remove(ix(rng % next.len() as u64));
            trace.push(step);
            total += 1;
            s = r
                .and_then(|s| world.check_state(&s).map(|()| s))
                .map_err(|violation| Box::new(Failure { violation, trace: trace.clone() }))?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nodes: u16, pages: u64, ops: u32, evictions: bool) -> Config {
        Config {
            nodes,
            pages,
            ops_per_node: ops,
            evictions,
            locks: 0,
            write_in_lock: false,
            max_states: 20_000_000,
            homes: None,
            losses: 0,
        }
    }

    #[test]
    fn lost_and_repeated_messages_are_put_back_in_order() {
        for (c, min_states) in [
            // 3 nodes, 2 pages, a read, write or eviction each, two messages lost or repeated:
            // 1.0 million states, ~15 s.
            (Config { losses: 2, ..cfg(3, 2, 1, true) }, 900_000),
            (Config { losses: 1, ..cfg(2, 2, 2, true) }, 40_000),
            (Config { losses: 2, locks: 1, ..cfg(3, 1, 1, false) }, 10_000),
        ] {
            let t = std::time::Instant::now();
            let r = check(&c, Mutation::None).unwrap_or_else(|f| panic!("{c:?}: {f}"));
            eprintln!("{c:?}: explored {r:?} in {:?}", t.elapsed());
            assert!(r.states > min_states, "{r:?}");
        }
    }

    #[test]
    fn the_checker_finds_messages_handed_on_out_of_order() {
        let f = check(&Config { losses: 1, ..cfg(2, 1, 2, false) }, Mutation::NoReorder).expect_err("must be found");
        eprintln!("{f}");
    }

    #[test]
    fn pages_of_one_nodes_arena_stay_consistent() {
        // Both pages in node 0's arena (as its local allocation makes them): one home serialising
        // every request, the other two nodes always remote.
        let c = Config { homes: Some(Homes::with_arenas(3, 0, 2)), ..cfg(3, 2, 2, true) };
        let r = check(&c, Mutation::None).unwrap_or_else(|f| panic!("{f}"));
        eprintln!("explored: {r:?}");
        assert!(r.states > 10_000, "{r:?}");
    }

    #[test]
    fn pages_placed_by_first_touch_stay_consistent() {
        // Pages placed at whichever node touches them first (asking the placer, which may answer
        // a second node, whose request then reaches the home before the placer's word that it is
        // the home): one page touched twice by each node, two pages once, with evictions, and
        // with a lost message. (Two pages touched twice each pass 20 million states.)
        let first_touch = Some(Homes::interleaved(3).first_touch());
        for (c, min_states) in [
            (Config { homes: first_touch, ..cfg(3, 1, 2, true) }, 10_000),
            (Config { homes: first_touch, ..cfg(3, 2, 1, true) }, 10_000),
            (Config { homes: first_touch, losses: 1, ..cfg(3, 2, 1, true) }, 10_000),
        ] {
            let t = std::time::Instant::now();
            let r = check(&c, Mutation::None).unwrap_or_else(|f| panic!("{c:?}: {f}"));
            eprintln!("{c:?}: explored {r:?} in {:?}", t.elapsed());
            assert!(r.states > min_states, "{r:?}");
        }
    }

    #[test]
    fn every_interleaving_of_three_nodes_on_two_pages_is_sequentially_consistent() {
        let r = check(&cfg(3, 2, 2, true), Mutation::None).unwrap_or_else(|f| panic!("{f}"));
        eprintln!("explored: {r:?}");
        assert!(r.states > 10_000, "too small an exploration to mean much: {r:?}");
    }

    #[test]
    fn two_nodes_with_more_operations_each() {
        let r = check(&cfg(2, 2, 4, true), Mutation::None).unwrap_or_else(|f| panic!("{f}"));
        eprintln!("explored: {r:?}");
    }

    #[test]
    fn locks_are_held_by_one_node_at_a_time_and_every_acquire_is_granted() {
        // Three nodes, two operations each among: take one of two locks (homed at nodes 0 and
        // 1), read or write a page.
        let c = Config { locks: 2, ..cfg(3, 1, 2, false) };
        let r = check(&c, Mutation::None).unwrap_or_else(|f| panic!("{f}"));
        eprintln!("explored: {r:?}");
        assert!(r.states > 1_000, "{r:?}");
    }

    #[test]
    fn a_page_written_while_a_lock_is_held_stays_consistent() {
        // Three nodes: take one of two locks (homed at nodes 0 and 1) and write its page inside
        // (pages 0 and 1, homed likewise), or read or write a page; with a lost message too.
        for losses in [0, 1] {
            let c = Config { locks: 2, write_in_lock: true, losses, ..cfg(3, 2, 1, false) };
            let t = std::time::Instant::now();
            let r = check(&c, Mutation::None).unwrap_or_else(|f| panic!("{f}"));
            eprintln!("{losses} losses: explored {r:?} in {:?}", t.elapsed());
            assert!(r.states > 1_000, "{r:?}");
        }
    }

    #[test]
    fn the_checker_finds_an_owner_that_keeps_writing_after_sharing() {
        let f = check(&cfg(2, 1, 3, false), Mutation::SkipDowngrade).expect_err("a stale read must be found");
        assert!(matches!(f.violation, Violation::TwoWriters { .. } | Violation::Stale { .. }), "{f}");
    }

    #[test]
    fn the_checker_finds_copies_that_stay_mapped_after_invalidation() {
        let f = check(&cfg(3, 1, 2, false), Mutation::SkipDrop).expect_err("a stale copy must be found");
        assert!(matches!(f.violation, Violation::TwoWriters { .. } | Violation::Stale { .. }), "{f}");
    }

    #[test]
    fn the_checker_finds_the_deadlock_of_a_lost_invalidation() {
        let f = check(&cfg(3, 1, 2, false), Mutation::LoseInvalidate).expect_err("the lost message must be found");
        assert!(matches!(f.violation, Violation::Deadlock { .. }), "{f}");
    }

    #[test]
    fn random_schedules_of_larger_jobs_stay_consistent() {
        for (nodes, pages, losses) in [(4, 4, 0), (6, 3, 0), (8, 16, 0), (4, 2, 6), (6, 4, 12)] {
            let c = Config { losses, ..cfg(nodes, pages, 12, true) };
            let steps = simulate(&c, Mutation::None, 0x5eed ^ u64::from(nodes), 300)
                .unwrap_or_else(|f| panic!("{nodes} nodes, {pages} pages, {losses} losses: {f}"));
            assert!(steps > 300 * u64::from(nodes) * 12, "walks ended early: {steps} steps");
        }
    }

    #[test]
    fn random_schedules_find_a_broken_io_layer_too() {
        let f = simulate(&cfg(4, 2, 12, true), Mutation::SkipDowngrade, 7, 200).expect_err("must be found");
        assert!(matches!(f.violation, Violation::TwoWriters { .. } | Violation::Stale { .. }), "{f}");
    }
}
