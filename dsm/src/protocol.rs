//! The coherence protocol of sequentially consistent pages, sans-IO.
//!
//! Page-grain single writer / many readers with write-invalidate and a home-based directory,
//! after Ivy's fixed distributed manager (Li and Hudak, "Memory coherence in shared virtual
//! memory systems", 1989). Every page has a *home* node (fixed by the job's [`Homes`]: page
//! number modulo the number of nodes, the node whose arena the page is in, or, placed by first
//! touch, the first node to touch it) that keeps the page's directory entry (its owner and the
//! nodes that may hold a copy) and
//! serialises the requests for the page: it runs one transaction per page at a time and queues
//! the rest, so two nodes never race for one page.
//!
//! # The transactions
//! A node holds each page with [`Access::None`], [`Access::Read`] (a read-only copy) or
//! [`Access::Write`] (the only copy, writable). Exactly one node *owns* a page: it holds the
//! latest contents and answers for them; at the start every page is owned by its home, writable,
//! all zeros.
//!
//! - **Read miss** at R: R sends `Request(Read)` to the home. The home sends `Recall(keep)` to
//!   the owner O, which write-protects its copy if it was writable ([`Action::Downgrade`]) and
//!   sends `Data` straight to R (three hops when the home is neither). R installs the page
//!   read-only and tells the home `Done`; the home adds R to the sharers. When the home owns the
//!   page it sends `Data` itself and the transaction ends there, with no `Done` (two messages):
//!   whatever the home sends R next about the page travels behind the page, in order.
//! - **Write miss or upgrade** at W: W sends `Request(Write)`. The home sends `Invalidate` to
//!   every sharer but W and O, and `Recall(give up)` to O unless O is W; it tells W in `Grant` how
//!   many answers to wait for and whether the page's bytes come with one of them (not if W already
//!   holds a current copy). Sharers drop their copy and send `InvalidateAck` to W; O sends `Data`
//!   (or an ack, if W has the page) and drops its copy. With every answer in, W installs the page
//!   writable (or makes its copy writable) and tells the home `Done`; W is the owner now.
//! - **First touch** of a page placed by first touch ([`Homes::first_touch`]) at T, which does
//!   not know its home: T sends `Locate` to the page's placer, which makes the first node to ask
//!   the home for ever and answers `Located` with it; T remembers it and carries on with the
//!   fault (a home that learns it is one says [`Action::Placed`]: the page is zeros, owned and
//!   writable there). Another node's request can reach the new home before the placer's answer
//!   does; only a node waiting for that answer can be the home, so it takes the request as the
//!   word that it is.
//! - **Dropping a read-only copy** (eviction): the node drops it and tells the home `Dropped`.
//!   The owner never drops its copy on its own (it is the page's only source).
//!
//! # Invariants (checked in every reachable state by [`crate::model`])
//! - At most one node has [`Access::Write`] to a page, and then no other node has any access.
//! - Every copy a node can read holds the latest write to the page.
//! - Every request is answered: with no operation left to start, the system comes to rest with
//!   every fault served, no message in flight and every home idle.
//!
//! Messages between two nodes arrive in the order they were sent (the transports keep order per
//! connection). A node's messages to itself are handed straight back to it, in order, before it
//! takes any other message (the home's own faults, and the home recalling its own copy, cost no
//! network).
//!
//! # What the I/O layer does
//! [`Node::fault`], [`Node::evict`] and [`Node::handle`] return [`Action`]s, to be carried out
//! in order. Sending [`Msg::Data`] attaches the page's bytes as they are at that moment (after
//! any [`Action::Downgrade`] before it, so no local write can tear them); the bytes that arrive
//! with a `Data` message are kept until an [`Action::Install`] puts them in place.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// A node of the job: 0 to the number of nodes - 1.
pub type NodeId = u16;

/// A page of the shared region, counted from its start.
pub type PageNo = u64;

/// Most nodes a job may have: the directory keeps a page's sharers as a 64-bit set.
pub const MAX_NODES: u16 = 64;

/// Which node is home of each page: fixed for the life of a job, the same on every node.
///
/// The region starts with `interleaved` pages whose homes take turns (page number modulo the
/// number of nodes: a collective heap spread evenly), followed by one arena of `arena` pages per
/// node, in rank order, homed at that node (what a node allocates there is served from its own
/// memory). Pages past the last arena take turns again.
///
/// With [`first_touch`](Homes::first_touch), the interleaved pages are not homed by turns but
/// *placed*: the first node to touch a page becomes its home (its accesses never leave the node
/// until another node shares the page). Each such page's placement is decided once by its
/// *placer* (the node it would be homed at by turns), which the other nodes ask
/// ([`Msg::Locate`]) the first time they touch the page, and remember.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Homes {
    nodes: u16,
    interleaved: PageNo,
    arena: PageNo,
    first_touch: bool,
}

impl Homes {
    /// Every page's home by turns: page number modulo `nodes`.
    pub fn interleaved(nodes: u16) -> Homes {
        Homes { nodes, interleaved: PageNo::MAX, arena: 0, first_touch: false }
    }

    /// `interleaved` pages by turns, then an arena of `arena` pages for each of the `nodes` nodes.
    pub fn with_arenas(nodes: u16, interleaved: PageNo, arena: PageNo) -> Homes {
        Homes { nodes, interleaved, arena, first_touch: false }
    }

    /// The same layout with the interleaved pages placed by first touch instead of homed by
    /// turns (the arenas stay homed at their nodes).
    pub fn first_touch(self) -> Homes {
        Homes { first_touch: true, ..self }
    }

    /// Whether `page` is placed by first touch (its home is decided when it is first touched).
    pub fn is_placed(&self, page: PageNo) -> bool {
        self.first_touch && page < self.interleaved
    }

    /// The node that decides where `page` is placed (its home by turns).
    pub fn placer_of(&self, page: PageNo) -> NodeId {
        NodeId::try_from(page % u64::from(self.nodes.max(1))).unwrap_or_else(|_| unreachable!("below a u16"))
    }

    /// The home of `page` if fixed by the layout; `None` for a page placed by first touch.
    pub fn fixed_home(&self, page: PageNo) -> Option<NodeId> {
        if self.is_placed(page) {
            None
        } else {
            Some(self.home_of(page))
        }
    }

    /// Nodes of the job.
    pub fn nodes(&self) -> u16 {
        self.nodes
    }

    /// The home of `page` by the layout, ignoring first touch (pages placed by first touch
    /// give their placer: see [`fixed_home`](Self::fixed_home)).
    fn home_of(&self, page: PageNo) -> NodeId {
        if page < self.interleaved || self.arena == 0 {
            return self.placer_of(page);
        }
        match NodeId::try_from((page - self.interleaved) / self.arena) {
            Ok(owner) if owner < self.nodes => owner,
            _ => self.placer_of(page),
        }
    }

    /// The pages of node `node`'s arena: first page and count (none past the job's nodes).
    pub fn arena_of(&self, node: NodeId) -> (PageNo, PageNo) {
        if node >= self.nodes || self.interleaved == PageNo::MAX {
            return (0, 0);
        }
        (self.interleaved + u64::from(node) * self.arena, self.arena)
    }
}

/// What a node may do with its copy of a page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// No copy: any access faults.
    #[default]
    None,
    /// A read-only copy: a write faults.
    Read,
    /// The only copy, writable.
    Write,
}

/// What a fault needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Want {
    /// To read the page.
    Read,
    /// To write it.
    Write,
}

impl Want {
    /// Whether `access` allows this.
    pub fn allowed_by(self, access: Access) -> bool {
        match self {
            Want::Read => access >= Access::Read,
            Want::Write => access == Access::Write,
        }
    }
}

/// A protocol message about one page.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Msg {
    /// To the page's home: the sender wants `want` access.
    Request {
        /// The page.
        page: PageNo,
        /// What the sender needs.
        want: Want,
    },
    /// From the home to the page's owner: send the page to `to` if `send`, and keep a
    /// read-only copy (`keep`) or give the page up (then, without `send`, acknowledge to `to`).
    Recall {
        /// The page.
        page: PageNo,
        /// The requester.
        to: NodeId,
        /// Keep a read-only copy and stay the owner (a read); otherwise drop it.
        keep: bool,
        /// Send the page's bytes to `to`.
        send: bool,
    },
    /// From the home to a node that may hold a read-only copy: drop it and acknowledge to
    /// `ack_to`.
    Invalidate {
        /// The page.
        page: PageNo,
        /// The node that waits for the acknowledgement (the writer-to-be).
        ack_to: NodeId,
    },
    /// To a writer-to-be: the sender holds no copy of the page any more.
    InvalidateAck {
        /// The page.
        page: PageNo,
    },
    /// The page's bytes, from its owner to a requester (the I/O layer carries the bytes). To a
    /// writer-to-be it also says the owner gave the page up.
    Data {
        /// The page.
        page: PageNo,
    },
    /// From the home to a writer-to-be: wait for `acks` answers (acknowledgements, and the
    /// page's bytes among them if `data`), then write.
    Grant {
        /// The page.
        page: PageNo,
        /// Answers to wait for.
        acks: u32,
        /// Whether one of them is [`Msg::Data`] (the requester holds no current copy).
        data: bool,
    },
    /// From a requester to the home: the page is installed; the transaction is over.
    Done {
        /// The page.
        page: PageNo,
    },
    /// From a node to the home: it dropped its read-only copy.
    Dropped {
        /// The page.
        page: PageNo,
    },
    /// To the placer of a page placed by first touch: where is its home? (The sender touched it
    /// and does not know.) The first to ask becomes the home.
    Locate {
        /// The page.
        page: PageNo,
    },
    /// From a page's placer to a node that asked: the page's home.
    Located {
        /// The page.
        page: PageNo,
        /// Its home (for ever).
        home: NodeId,
    },
    /// To a lock's home (the lock's number modulo the nodes): the sender wants the lock.
    Acquire {
        /// The lock's number.
        lock: u64,
    },
    /// From a lock's home: the lock is the receiver's now.
    Granted {
        /// The lock's number.
        lock: u64,
    },
    /// To a lock's home: the sender gives the lock up (the next in the home's queue gets it).
    Release {
        /// The lock's number.
        lock: u64,
    },
}

impl Msg {
    /// The page the message is about.
    pub fn page(&self) -> PageNo {
        match *self {
            Msg::Request { page, .. }
            | Msg::Recall { page, .. }
            | Msg::Invalidate { page, .. }
            | Msg::InvalidateAck { page }
            | Msg::Data { page }
            | Msg::Grant { page, .. }
            | Msg::Done { page }
            | Msg::Dropped { page }
            | Msg::Locate { page }
            | Msg::Located { page, .. } => page,
            Msg::Acquire { lock } | Msg::Granted { lock } | Msg::Release { lock } => lock,
        }
    }

    /// Whether the message is about a lock (then [`Msg::page`] is the lock's number).
    pub fn is_lock(&self) -> bool {
        matches!(self, Msg::Acquire { .. } | Msg::Granted { .. } | Msg::Release { .. })
    }

    fn name(&self) -> &'static str {
        match self {
            Msg::Request { .. } => "Request",
            Msg::Recall { .. } => "Recall",
            Msg::Invalidate { .. } => "Invalidate",
            Msg::InvalidateAck { .. } => "InvalidateAck",
            Msg::Data { .. } => "Data",
            Msg::Grant { .. } => "Grant",
            Msg::Done { .. } => "Done",
            Msg::Dropped { .. } => "Dropped",
            Msg::Locate { .. } => "Locate",
            Msg::Located { .. } => "Located",
            Msg::Acquire { .. } => "Acquire",
            Msg::Granted { .. } => "Granted",
            Msg::Release { .. } => "Release",
        }
    }
}

/// What the I/O layer is to do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send `msg` to node `to` (possibly this node). A [`Msg::Data`] carries the page's bytes
    /// as they are now.
    Send {
        /// The destination.
        to: NodeId,
        /// The message.
        msg: Msg,
    },
    /// Put the bytes that came with the page's last [`Msg::Data`] in place, read-only or
    /// writable, and wake the threads that wait for the page.
    Install {
        /// The page.
        page: PageNo,
        /// Writable, or read-only.
        writable: bool,
    },
    /// Make the read-only copy in place writable and wake the threads that wait for it.
    Upgrade {
        /// The page.
        page: PageNo,
    },
    /// Write-protect the copy in place: local writes now fault.
    Downgrade {
        /// The page.
        page: PageNo,
    },
    /// Drop the copy in place: any local access now faults.
    Drop {
        /// The page.
        page: PageNo,
    },
    /// This node is the home of a page placed by first touch, which nobody touched yet: its
    /// contents are zeros, owned and writable here (map them when touched), and the threads that
    /// wait for the page may retry.
    Placed {
        /// The page.
        page: PageNo,
    },
    /// The lock is this node's: wake the thread that waits for it.
    Granted {
        /// The lock's number.
        lock: u64,
    },
}

/// A message that breaks the protocol: the peer (or this node's I/O layer) is broken, and the
/// message was not acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// A node number outside the job.
    UnknownNode {
        /// The number.
        node: NodeId,
        /// Nodes in the job.
        nodes: u16,
    },
    /// A message for the home of a page this node is not the home of.
    NotHome {
        /// The page.
        page: PageNo,
        /// Its home.
        home: NodeId,
    },
    /// A message this node's state for the page does not allow.
    Unexpected {
        /// The page.
        page: PageNo,
        /// The sender.
        from: NodeId,
        /// The message's kind.
        msg: &'static str,
        /// What this node's state says.
        why: &'static str,
    },
    /// A job of more than [`MAX_NODES`] nodes, or of none.
    TooManyNodes {
        /// Nodes asked for.
        nodes: u16,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::UnknownNode { node, nodes } => write!(f, "node {node} is not in this job of {nodes} nodes"),
            ProtocolError::NotHome { page, home } => write!(f, "page {page}'s home is node {home}, not this one"),
            ProtocolError::Unexpected { page, from, msg, why } => {
                write!(f, "unexpected {msg} for page {page} from node {from}: {why}")
            }
            ProtocolError::TooManyNodes { nodes } => write!(f, "a job has 1 to {MAX_NODES} nodes, not {nodes}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Why a copy cannot be dropped now ([`Node::evict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotEvictable {
    /// The node has no copy.
    NotCached,
    /// The node owns the page (its copy is the page's only source) or may write it.
    Owner,
    /// A request for the page is in progress.
    Busy,
}

/// This node's copy of one page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Copy {
    access: Access,
    owner: bool,
    pending: Option<Pending>,
}

/// A request of this node in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Pending {
    want: Want,
    /// The home's grant (answers to wait for, and whether the bytes come), once it arrived.
    grant: Option<(u32, bool)>,
    /// Answers arrived (acknowledgements and data).
    answers: u32,
    /// The bytes arrived.
    data: bool,
}

/// The home's record of one page.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Directory {
    owner: NodeId,
    /// Nodes that may hold a copy (the owner always among them).
    sharers: u64,
    /// The transaction in progress: requester and what it asked.
    busy: Option<(NodeId, Want)>,
    /// Requests waiting for it.
    queue: VecDeque<(NodeId, Want)>,
}

impl Directory {
    fn new(home: NodeId) -> Directory {
        Directory { owner: home, sharers: bit(home), busy: None, queue: VecDeque::new() }
    }
}

fn bit(n: NodeId) -> u64 {
    1u64 << n
}

/// One node's side of the protocol: its copies of pages, and the directory of the pages it is
/// home of. Deterministic: the same calls give the same actions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    id: NodeId,
    homes: Homes,
    /// Copies that differ from the start (home: owner, writable; elsewhere: none).
    copies: BTreeMap<PageNo, Copy>,
    /// Directory entries that differ from the start (owned by the home, only it a sharer).
    directory: BTreeMap<PageNo, Directory>,
    /// Locks this node is home of that are held: holder, and the nodes waiting in order.
    locks: BTreeMap<u64, (NodeId, VecDeque<NodeId>)>,
    /// Locks this node asked for and was not granted yet.
    acquiring: BTreeSet<u64>,
    /// Locks this node holds.
    held: BTreeSet<u64>,
    /// Homes of pages placed by first touch that this node learned (for ever).
    located: BTreeMap<PageNo, NodeId>,
    /// As their placer: where pages placed by first touch were placed (for ever).
    placements: BTreeMap<PageNo, NodeId>,
    /// Pages placed by first touch whose home this node asked for, and the access it wants.
    locating: BTreeMap<PageNo, Want>,
}

/// Why a lock operation cannot be done now ([`Node::acquire`], [`Node::release`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockRefusal {
    /// This node holds the lock or is asking for it already (one thread of a node at a time).
    AlreadyMine,
    /// This node does not hold the lock.
    NotHeld,
}

impl Node {
    /// Node `id` of a job of `nodes` nodes, every page's home by turns ([`Homes::interleaved`]).
    pub fn new(id: NodeId, nodes: u16) -> Result<Node, ProtocolError> {
        Node::with_homes(id, Homes::interleaved(nodes))
    }

    /// Node `id` of a job whose pages' homes are `homes` (the same on every node).
    pub fn with_homes(id: NodeId, homes: Homes) -> Result<Node, ProtocolError> {
        let nodes = homes.nodes;
        if nodes == 0 || nodes > MAX_NODES {
            return Err(ProtocolError::TooManyNodes { nodes });
        }
        if id >= nodes {
            return Err(ProtocolError::UnknownNode { node: id, nodes });
        }
        Ok(Node {
            id,
            homes,
            copies: BTreeMap::new(),
            directory: BTreeMap::new(),
            locks: BTreeMap::new(),
            acquiring: BTreeSet::new(),
            held: BTreeSet::new(),
            located: BTreeMap::new(),
            placements: BTreeMap::new(),
            locating: BTreeMap::new(),
        })
    }

    /// This node's number.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The home of `page`, if known here: fixed by the job's [`Homes`], or placed by first touch
    /// and learned (`None` until then).
    pub fn home_of(&self, page: PageNo) -> Option<NodeId> {
        self.homes.fixed_home(page).or_else(|| self.located.get(&page).copied())
    }

    /// The home of `page`, which this node must know (it holds a copy, or waits for one).
    fn known_home(&self, page: PageNo) -> Result<NodeId, ProtocolError> {
        self.home_of(page).ok_or(ProtocolError::Unexpected {
            page,
            from: self.id,
            msg: "home",
            why: "this node does not know the page's home",
        })
    }

    /// The home of lock `lock`: lock number modulo the number of nodes.
    pub fn lock_home(&self, lock: u64) -> NodeId {
        Homes::interleaved(self.homes.nodes).home_of(lock)
    }

    fn copy(&self, page: PageNo) -> Copy {
        self.copies.get(&page).copied().unwrap_or_else(|| {
            if self.home_of(page) == Some(self.id) {
                Copy { access: Access::Write, owner: true, pending: None }
            } else {
                Copy::default()
            }
        })
    }

    fn set_copy(&mut self, page: PageNo, c: Copy) {
        self.copies.insert(page, c);
    }

    /// What this node may do with `page` now.
    pub fn access(&self, page: PageNo) -> Access {
        self.copy(page).access
    }

    /// Whether this node owns `page` (holds its latest contents and answers for them).
    pub fn owns(&self, page: PageNo) -> bool {
        self.copy(page).owner
    }

    /// Whether a request of this node for `page` is in progress (or it is asking for the
    /// page's home).
    pub fn is_pending(&self, page: PageNo) -> bool {
        self.copy(page).pending.is_some() || self.locating.contains_key(&page)
    }

    /// Whether this node, as home, has no transaction running or waiting for any page, and
    /// no lock of its is held.
    pub fn home_idle(&self) -> bool {
        self.directory.values().all(|d| d.busy.is_none() && d.queue.is_empty()) && self.locks.is_empty()
    }

    /// Whether this node holds `lock`.
    pub fn holds(&self, lock: u64) -> bool {
        self.held.contains(&lock)
    }

    /// Asks for `lock`: its home grants locks in the order asked. [`Action::Granted`] says when
    /// this node has it.
    pub fn acquire(&mut self, lock: u64) -> Result<Vec<Action>, LockRefusal> {
        if self.held.contains(&lock) || !self.acquiring.insert(lock) {
            return Err(LockRefusal::AlreadyMine);
        }
        Ok(vec![Action::Send { to: self.lock_home(lock), msg: Msg::Acquire { lock } }])
    }

    /// Gives `lock` up.
    pub fn release(&mut self, lock: u64) -> Result<Vec<Action>, LockRefusal> {
        if !self.held.remove(&lock) {
            return Err(LockRefusal::NotHeld);
        }
        Ok(vec![Action::Send { to: self.lock_home(lock), msg: Msg::Release { lock } }])
    }

    /// A local thread faulted on `page`, needing `want`. Returns nothing to do if the access is
    /// allowed already (a stale fault: retry the access) or a request for the page is in
    /// progress (wait for it, then retry); otherwise the request to send.
    ///
    /// The first touch of a page placed by first touch asks its placer where its home is
    /// ([`Msg::Locate`]) instead; the request follows once the answer is in.
    pub fn fault(&mut self, page: PageNo, want: Want) -> Vec<Action> {
        let mut c = self.copy(page);
        if want.allowed_by(c.access) || c.pending.is_some() || self.locating.contains_key(&page) {
            return Vec::new();
        }
        let Some(home) = self.home_of(page) else {
            self.locating.insert(page, want);
            return vec![Action::Send { to: self.homes.placer_of(page), msg: Msg::Locate { page } }];
        };
        c.pending = Some(Pending { want, grant: None, answers: 0, data: false });
        self.set_copy(page, c);
        vec![Action::Send { to: home, msg: Msg::Request { page, want } }]
    }

    /// Drops this node's read-only copy of `page` (to make room), telling the home.
    pub fn evict(&mut self, page: PageNo) -> Result<Vec<Action>, NotEvictable> {
        let mut c = self.copy(page);
        if c.pending.is_some() {
            return Err(NotEvictable::Busy);
        }
        match c.access {
            Access::None => return Err(NotEvictable::NotCached),
            Access::Write => return Err(NotEvictable::Owner),
            Access::Read if c.owner => return Err(NotEvictable::Owner),
            Access::Read => {}
        }
        let home = self.home_of(page).ok_or(NotEvictable::NotCached)?;
        c.access = Access::None;
        self.set_copy(page, c);
        Ok(vec![Action::Drop { page }, Action::Send { to: home, msg: Msg::Dropped { page } }])
    }

    /// Handles a message from node `from`.
    pub fn handle(&mut self, from: NodeId, msg: Msg) -> Result<Vec<Action>, ProtocolError> {
        if from >= self.homes.nodes {
            return Err(ProtocolError::UnknownNode { node: from, nodes: self.homes.nodes });
        }
        let page = msg.page();
        let unexpected = |why| ProtocolError::Unexpected { page, from, msg: msg.name(), why };
        let mut out = Vec::new();
        match msg {
            Msg::Acquire { lock } => {
                self.home_check(lock)?;
                match self.locks.get_mut(&lock) {
                    Some((holder, queue)) => {
                        if *holder == from || queue.contains(&from) {
                            return Err(unexpected("the node holds or awaits this lock already"));
                        }
                        queue.push_back(from);
                    }
                    None => {
                        self.locks.insert(lock, (from, VecDeque::new()));
                        out.push(Action::Send { to: from, msg: Msg::Granted { lock } });
                    }
                }
            }
            Msg::Release { lock } => {
                self.home_check(lock)?;
                let Some((holder, queue)) = self.locks.get_mut(&lock) else {
                    return Err(unexpected("the lock is not held"));
                };
                if *holder != from {
                    return Err(unexpected("the lock is held by another node"));
                }
                match queue.pop_front() {
                    Some(next) => {
                        *holder = next;
                        out.push(Action::Send { to: next, msg: Msg::Granted { lock } });
                    }
                    None => {
                        self.locks.remove(&lock);
                    }
                }
            }
            Msg::Granted { lock } => {
                if from != self.lock_home(lock) {
                    return Err(unexpected("only the lock's home grants it"));
                }
                if !self.acquiring.remove(&lock) {
                    return Err(unexpected("this node did not ask for the lock"));
                }
                self.held.insert(lock);
                out.push(Action::Granted { lock });
            }
            Msg::Locate { .. } => {
                if !self.homes.is_placed(page) || self.homes.placer_of(page) != self.id {
                    return Err(unexpected("this node does not place the page"));
                }
                let home = *self.placements.entry(page).or_insert(from);
                out.push(Action::Send { to: from, msg: Msg::Located { page, home } });
            }
            Msg::Located { home, .. } => {
                if !self.homes.is_placed(page) || self.homes.placer_of(page) != from {
                    return Err(unexpected("only the page's placer says where it is"));
                }
                if home >= self.homes.nodes {
                    return Err(ProtocolError::UnknownNode { node: home, nodes: self.homes.nodes });
                }
                let Some(want) = self.locating.remove(&page) else {
                    return Err(unexpected("this node did not ask where the page is"));
                };
                match self.located.insert(page, home) {
                    // Learned already: a request for the page came first (see `Request`).
                    Some(known) if known == home => {}
                    Some(_) => return Err(unexpected("the page was placed elsewhere")),
                    None if home == self.id => out.push(Action::Placed { page }),
                    None => {}
                }
                out.extend(self.fault(page, want));
            }
            Msg::Request { want, .. } => {
                // A request for a page placed here can come before the placer's word that it is
                // (from a node the placer told first): only a node asking where the page is can
                // have been made its home.
                if self.homes.is_placed(page) && self.home_of(page).is_none() && self.locating.contains_key(&page) {
                    self.located.insert(page, self.id);
                    out.push(Action::Placed { page });
                }
                let dir = self.directory_mut(page)?;
                if dir.busy.is_some() {
                    dir.queue.push_back((from, want));
                } else {
                    self.start(page, from, want, &mut out)?;
                }
            }
            Msg::Done { .. } => {
                let dir = self.directory_mut(page)?;
                let Some((requester, want)) = dir.busy.filter(|(r, _)| *r == from) else {
                    return Err(unexpected("no transaction of this node is running"));
                };
                match want {
                    Want::Read => dir.sharers |= bit(requester),
                    Want::Write => {
                        dir.owner = requester;
                        dir.sharers = bit(requester);
                    }
                }
                dir.busy = None;
                self.start_queued(page, &mut out)?;
            }
            Msg::Dropped { .. } => {
                let dir = self.directory_mut(page)?;
                if dir.owner == from {
                    return Err(unexpected("the owner cannot drop its copy"));
                }
                dir.sharers &= !bit(from);
            }
            Msg::Recall { to, keep, send, .. } => self.recall(page, from, to, keep, send, &mut out)?,
            Msg::Invalidate { ack_to, .. } => {
                let mut c = self.copy(page);
                if c.owner || c.access == Access::Write {
                    return Err(unexpected("the owner is recalled, not invalidated"));
                }
                if ack_to >= self.homes.nodes {
                    return Err(ProtocolError::UnknownNode { node: ack_to, nodes: self.homes.nodes });
                }
                if c.access == Access::Read {
                    out.push(Action::Drop { page });
                    c.access = Access::None;
                    self.set_copy(page, c);
                }
                out.push(Action::Send { to: ack_to, msg: Msg::InvalidateAck { page } });
            }
            Msg::InvalidateAck { .. } => {
                let mut c = self.copy(page);
                match &mut c.pending {
                    Some(p) if p.want == Want::Write => p.answers += 1,
                    _ => return Err(unexpected("no write of this node waits for acknowledgements")),
                }
                self.set_copy(page, c);
                self.try_complete_write(page, from, &mut out)?;
            }
            Msg::Data { .. } => {
                let mut c = self.copy(page);
                let Some(p) = &mut c.pending else {
                    return Err(unexpected("no request of this node waits for the page"));
                };
                if p.data {
                    return Err(unexpected("the page came twice"));
                }
                p.data = true;
                match p.want {
                    Want::Read => {
                        c.pending = None;
                        c.access = Access::Read;
                        self.set_copy(page, c);
                        out.push(Action::Install { page, writable: false });
                        // From the home itself, the transaction ended as the page left (see
                        // `start`); from a third node, the home waits to hear it is in.
                        let home = self.known_home(page)?;
                        if from != home {
                            out.push(Action::Send { to: home, msg: Msg::Done { page } });
                        }
                    }
                    Want::Write => {
                        p.answers += 1;
                        self.set_copy(page, c);
                        self.try_complete_write(page, from, &mut out)?;
                    }
                }
            }
            Msg::Grant { acks, data, .. } => {
                if self.home_of(page) != Some(from) {
                    return Err(unexpected("only the page's home grants"));
                }
                let mut c = self.copy(page);
                match &mut c.pending {
                    Some(p) if p.want == Want::Write && p.grant.is_none() => p.grant = Some((acks, data)),
                    _ => return Err(unexpected("no write of this node waits for a grant")),
                }
                self.set_copy(page, c);
                self.try_complete_write(page, from, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Refuses a lock message for a lock this node is not home of.
    fn home_check(&self, lock: u64) -> Result<(), ProtocolError> {
        let home = self.lock_home(lock);
        if home == self.id {
            Ok(())
        } else {
            Err(ProtocolError::NotHome { page: lock, home })
        }
    }

    /// The directory entry of `page`, of which this node must be the home.
    fn directory_mut(&mut self, page: PageNo) -> Result<&mut Directory, ProtocolError> {
        match self.home_of(page) {
            Some(home) if home == self.id => Ok(self.directory.entry(page).or_insert_with(|| Directory::new(home))),
            Some(home) => Err(ProtocolError::NotHome { page, home }),
            None => Err(ProtocolError::Unexpected {
                page,
                from: self.id,
                msg: "directory",
                why: "the page is not placed here",
            }),
        }
    }

    /// Starts `requester`'s transaction for `page` (this node is its home and idle for it).
    fn start(
        &mut self,
        page: PageNo,
        requester: NodeId,
        want: Want,
        out: &mut Vec<Action>,
    ) -> Result<(), ProtocolError> {
        let me = self.id;
        let dir = self.directory_mut(page)?;
        let owner = dir.owner;
        // Between transactions the owner holds the page, so it never needs to ask to read it.
        // (During one, the directory still names the old owner, which may already have given the
        // page up and asked again: that request waits in the queue.)
        if want == Want::Read && owner == requester {
            return Err(ProtocolError::Unexpected {
                page,
                from: requester,
                msg: "Request",
                why: "the owner asked to read the page it holds",
            });
        }
        if want == Want::Read && owner == me {
            // The home owns the page: it sends it at once and the transaction is over (no `Done`
            // comes back): whatever the home sends the requester next about the page follows
            // the page on the same channel, so it finds the page installed.
            dir.sharers |= bit(requester);
            return self.recall(page, me, requester, true, true, out);
        }
        dir.busy = Some((requester, want));
        match want {
            Want::Read => {
                out.push(Action::Send { to: owner, msg: Msg::Recall { page, to: requester, keep: true, send: true } })
            }
            Want::Write => {
                let has_copy = dir.sharers & bit(requester) != 0;
                let others = dir.sharers & !bit(requester) & !bit(owner);
                let mut acks = 0;
                for n in 0..self.homes.nodes {
                    if others & bit(n) != 0 {
                        out.push(Action::Send { to: n, msg: Msg::Invalidate { page, ack_to: requester } });
                        acks += 1;
                    }
                }
                if owner != requester {
                    out.push(Action::Send {
                        to: owner,
                        msg: Msg::Recall { page, to: requester, keep: false, send: !has_copy },
                    });
                    acks += 1;
                }
                out.push(Action::Send { to: requester, msg: Msg::Grant { page, acks, data: !has_copy } });
            }
        }
        Ok(())
    }

    /// Starts the transactions queued for `page` (this node is its home and idle for it) until
    /// one stays running.
    fn start_queued(&mut self, page: PageNo, out: &mut Vec<Action>) -> Result<(), ProtocolError> {
        loop {
            let dir = self.directory_mut(page)?;
            if dir.busy.is_some() {
                return Ok(());
            }
            let Some((next, want)) = dir.queue.pop_front() else { return Ok(()) };
            self.start(page, next, want, out)?;
        }
    }

    /// As the owner of `page`, recalled by `from` (the home, possibly this node): sends the
    /// page to `to` if `send`, keeps a read-only copy if `keep`, else gives it up.
    fn recall(
        &mut self,
        page: PageNo,
        from: NodeId,
        to: NodeId,
        keep: bool,
        send: bool,
        out: &mut Vec<Action>,
    ) -> Result<(), ProtocolError> {
        let unexpected = |why| ProtocolError::Unexpected { page, from, msg: "Recall", why };
        let mut c = self.copy(page);
        if !c.owner || c.access == Access::None {
            return Err(unexpected("this node does not own the page"));
        }
        if to >= self.homes.nodes {
            return Err(ProtocolError::UnknownNode { node: to, nodes: self.homes.nodes });
        }
        if send {
            // No local write may change the bytes while they are sent.
            if c.access == Access::Write {
                out.push(Action::Downgrade { page });
                c.access = Access::Read;
            }
            out.push(Action::Send { to, msg: Msg::Data { page } });
        }
        if !keep {
            out.push(Action::Drop { page });
            c.access = Access::None;
            c.owner = false;
            if !send {
                out.push(Action::Send { to, msg: Msg::InvalidateAck { page } });
            }
        } else if !send {
            return Err(unexpected("a recall that keeps the page must send it"));
        }
        self.set_copy(page, c);
        Ok(())
    }

    /// Completes this node's write request for `page` if every answer is in.
    fn try_complete_write(&mut self, page: PageNo, from: NodeId, out: &mut Vec<Action>) -> Result<(), ProtocolError> {
        let mut c = self.copy(page);
        let Some(p) = c.pending else { return Ok(()) };
        let Some((acks, data)) = p.grant else { return Ok(()) };
        let unexpected = |why| ProtocolError::Unexpected { page, from, msg: "answer", why };
        if p.answers > acks || (p.data && !data) {
            return Err(unexpected("more answers than the grant said"));
        }
        if p.answers < acks || p.data != data {
            return Ok(());
        }
        if data {
            out.push(Action::Install { page, writable: true });
        } else if c.access == Access::Read {
            out.push(Action::Upgrade { page });
        } else {
            return Err(unexpected("granted a write without the page, holding no copy"));
        }
        c.access = Access::Write;
        c.owner = true;
        c.pending = None;
        self.set_copy(page, c);
        out.push(Action::Send { to: self.known_home(page)?, msg: Msg::Done { page } });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivers every message until none is left, in a fixed order; returns the actions other
    /// than sends, per node.
    fn settle(nodes: &mut [Node], mut inbox: Vec<(NodeId, NodeId, Msg)>) -> Vec<(NodeId, Action)> {
        let mut done = Vec::new();
        let mut steps = 0;
        while let Some((from, to, msg)) = (!inbox.is_empty()).then(|| inbox.remove(0)) {
            steps += 1;
            assert!(steps < 1000, "the messages never settle");
            for a in nodes[usize::from(to)].handle(from, msg).expect("a valid message") {
                match a {
                    Action::Send { to: dest, msg } => inbox.push((to, dest, msg)),
                    other => done.push((to, other)),
                }
            }
        }
        done
    }

    fn sends(from: NodeId, actions: Vec<Action>) -> Vec<(NodeId, NodeId, Msg)> {
        actions
            .into_iter()
            .map(|a| match a {
                Action::Send { to, msg } => (from, to, msg),
                other => panic!("a fault only sends, not {other:?}"),
            })
            .collect()
    }

    fn job(n: u16) -> Vec<Node> {
        (0..n).map(|i| Node::new(i, n).unwrap()).collect()
    }

    #[test]
    fn homes_take_turns_then_follow_the_arenas() {
        let h = Homes::with_arenas(3, 4, 2);
        let homes: Vec<NodeId> = (0..12).map(|p| h.home_of(p)).collect();
        // Pages 0-3 by turns, 4-5 node 0's arena, 6-7 node 1's, 8-9 node 2's, then turns again.
        assert_eq!(homes, [0, 1, 2, 0, 0, 0, 1, 1, 2, 2, 1, 2]);
        assert_eq!(h.arena_of(1), (6, 2));
        assert_eq!(h.arena_of(3), (0, 0));
        assert_eq!(Homes::interleaved(3).arena_of(0), (0, 0));
        // Locks stay by turns whatever the pages do.
        let n = Node::with_homes(0, h).unwrap();
        assert_eq!(n.lock_home(5), 2);
        assert!(matches!(Node::with_homes(0, Homes::with_arenas(0, 1, 1)), Err(ProtocolError::TooManyNodes { .. })));
    }

    #[test]
    fn a_read_miss_takes_three_hops_and_downgrades_the_writer() {
        let mut nodes = job(3);
        // Page 1's home is node 1; node 2 writes it, then node 0 reads it.
        let w = sends(2, nodes[2].fault(1, Want::Write));
        let done = settle(&mut nodes, w);
        // The home owned it: it stops its own writes, sends the bytes, and drops its copy.
        assert_eq!(
            done,
            vec![
                (1, Action::Downgrade { page: 1 }),
                (1, Action::Drop { page: 1 }),
                (2, Action::Install { page: 1, writable: true })
            ]
        );
        assert!(nodes[2].owns(1) && nodes[2].access(1) == Access::Write);
        let r = sends(0, nodes[0].fault(1, Want::Read));
        assert_eq!(r, vec![(0, 1, Msg::Request { page: 1, want: Want::Read })]);
        let done = settle(&mut nodes, r);
        assert_eq!(done, vec![(2, Action::Downgrade { page: 1 }), (0, Action::Install { page: 1, writable: false })]);
        assert_eq!((nodes[0].access(1), nodes[2].access(1)), (Access::Read, Access::Read));
        assert!(nodes.iter().all(Node::home_idle));
    }

    #[test]
    fn an_upgrade_invalidates_the_other_readers_and_needs_no_bytes() {
        let mut nodes = job(3);
        for r in [0, 2] {
            let m = sends(r, nodes[usize::from(r)].fault(1, Want::Read));
            settle(&mut nodes, m);
        }
        let m = sends(0, nodes[0].fault(1, Want::Write));
        let done = settle(&mut nodes, m);
        // Node 2 is invalidated, the owner (the home, node 1) gives the page up without sending
        // it, and node 0 makes its own copy writable.
        assert!(done.contains(&(2, Action::Drop { page: 1 })));
        assert!(done.contains(&(1, Action::Drop { page: 1 })));
        assert_eq!(done.last(), Some(&(0, Action::Upgrade { page: 1 })));
        assert_eq!(
            nodes.iter().map(|n| n.access(1)).collect::<Vec<_>>(),
            vec![Access::Write, Access::None, Access::None]
        );
    }

    #[test]
    fn requests_for_a_busy_page_wait_their_turn_at_the_home() {
        let mut nodes = job(3);
        // Page 0's home (node 0) owns it; node 1 asks to write it, node 2 to read it, at once.
        let mut inbox = sends(1, nodes[1].fault(0, Want::Write));
        inbox.extend(sends(2, nodes[2].fault(0, Want::Read)));
        let first = nodes[0].handle(1, inbox.remove(0).2).unwrap();
        assert!(matches!(first.last(), Some(Action::Send { to: 1, msg: Msg::Grant { acks: 1, data: true, .. } })));
        // The read waits in the home's queue: nothing goes out for it until the write is done.
        assert!(nodes[0].handle(2, inbox.remove(0).2).unwrap().is_empty());
        let done = settle(&mut nodes, sends_only(0, first));
        assert_eq!(
            done,
            vec![
                (0, Action::Downgrade { page: 0 }),
                (0, Action::Drop { page: 0 }),
                (1, Action::Install { page: 0, writable: true }),
                (1, Action::Downgrade { page: 0 }),
                (2, Action::Install { page: 0, writable: false }),
            ]
        );
        assert!(nodes.iter().all(Node::home_idle));
    }

    #[test]
    fn broken_messages_are_refused_with_a_reason() {
        let mut nodes = job(2);
        assert!(matches!(
            nodes[0].handle(1, Msg::Request { page: 1, want: Want::Read }),
            Err(ProtocolError::NotHome { page: 1, home: 1 })
        ));
        assert!(matches!(nodes[0].handle(7, Msg::Done { page: 0 }), Err(ProtocolError::UnknownNode { node: 7, .. })));
        assert!(matches!(nodes[0].handle(1, Msg::Done { page: 0 }), Err(ProtocolError::Unexpected { .. })));
        assert!(matches!(nodes[1].handle(0, Msg::Data { page: 0 }), Err(ProtocolError::Unexpected { .. })));
        assert!(matches!(
            nodes[1].handle(0, Msg::Recall { page: 0, to: 0, keep: true, send: true }),
            Err(ProtocolError::Unexpected { .. })
        ));
        assert!(matches!(Node::new(0, 65), Err(ProtocolError::TooManyNodes { nodes: 65 })));
        assert!(matches!(Node::new(3, 2), Err(ProtocolError::UnknownNode { node: 3, nodes: 2 })));
        let e = nodes[0].handle(1, Msg::Done { page: 0 }).unwrap_err().to_string();
        assert!(e.contains("Done") && e.contains("page 0"), "{e}");
    }

    #[test]
    fn only_a_plain_read_only_copy_can_be_evicted() {
        let mut nodes = job(2);
        assert_eq!(nodes[1].evict(1), Err(NotEvictable::Owner));
        assert_eq!(nodes[0].evict(1), Err(NotEvictable::NotCached));
        let m = sends(0, nodes[0].fault(1, Want::Read));
        settle(&mut nodes, m);
        assert_eq!(nodes[1].evict(1), Err(NotEvictable::Owner), "the owner keeps its copy after a read");
        let acts = nodes[0].evict(1).unwrap();
        assert_eq!(acts[0], Action::Drop { page: 1 });
        settle(&mut nodes, sends_only(0, acts));
        assert_eq!(nodes[0].access(1), Access::None);
    }

    fn sends_only(from: NodeId, actions: Vec<Action>) -> Vec<(NodeId, NodeId, Msg)> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Send { to, msg } => Some((from, to, msg)),
                _ => None,
            })
            .collect()
    }
}
