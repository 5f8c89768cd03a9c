//! The memory server: donates RAM in slabs and stores clients' pages by (client, region, page).
//!
//! [`MemStore`] is the storage and the protocol's service (sans transport); [`MemServer`] puts it
//! behind a transport listener and reclaims the pages of clients that went away.
//!
//! # Who may touch what
//! A client's session is bound to the connections it was opened on (see [`proto`]'s "Sessions"):
//! requests naming a client on any other connection are refused with `Status::Forbidden`, and
//! attaching another connection (or reconnecting) needs the secret the session was created with,
//! which the server keeps only as a SHA-256 hash and compares in constant time. The client table
//! is bounded ([`MemServerConfig::max_clients`]), so is each client's share
//! ([`MemServerConfig::quota_bytes`]), and so is the number of clients one connection may open.
//!
//! # Leases
//! A client with an open connection is never reclaimed. When its last connection closes it is
//! *detached*; after its grace time (asked for in OPEN, at most [`MemServerConfig::max_grace`])
//! its pages are reclaimed, unless it reattached first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_transport::{
    listen, Caller, ClusterKey, Limits, Page, Server, ServerConfig, Service, ServiceError, Status, WaitPolicy,
};
use sha2::{Digest, Sha256};

use crate::proto::{self, ClientId, Secret, ServerState};
use crate::{ConfigError, NetRamError, PAGE_SIZE};

/// Pages per slab: the unit in which the server takes memory from the system.
const SLAB_PAGES: usize = 512;
/// Shortest grace time granted.
const MIN_GRACE: Duration = Duration::from_millis(100);
/// Most clients one connection may open.
pub const MAX_CLIENTS_PER_CONNECTION: usize = 16;
/// Most connections one client may be bound to at once.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 64;

/// How a memory server behaves.
#[derive(Clone, Debug)]
pub struct MemServerConfig {
    /// RAM to donate, in bytes (rounded down to whole pages).
    pub capacity_bytes: u64,
    /// The cluster key clients must prove.
    pub key: ClusterKey,
    /// How connection threads wait for requests.
    pub policy: WaitPolicy,
    /// Most bytes one client may store (default: the whole capacity).
    pub quota_bytes: u64,
    /// Most client sessions held at once, connected or in their grace time (default 4096).
    pub max_clients: usize,
    /// The longest grace time granted: how long a client's pages outlive its last connection
    /// (default one hour; clients ask for less).
    pub max_grace: Duration,
    /// The transport's connection limits.
    pub limits: Limits,
}

impl MemServerConfig {
    /// A server donating `capacity_bytes`.
    pub fn new(capacity_bytes: u64, key: ClusterKey) -> MemServerConfig {
        MemServerConfig {
            capacity_bytes,
            key,
            policy: WaitPolicy::DEFAULT,
            quota_bytes: capacity_bytes,
            max_clients: 4096,
            max_grace: Duration::from_secs(3600),
            limits: Limits::default(),
        }
    }
}

/// Slot number of a stored page: slab * SLAB_PAGES + index in slab.
type Slot = u32;

/// Most pages one server holds (slot numbers are 32 bits): 16 TiB.
pub const MAX_CAPACITY_PAGES: u64 = 1 << 32;

/// A slot number; below `MAX_CAPACITY_PAGES` because capacity is capped there.
#[allow(clippy::cast_possible_truncation)]
fn slot(n: usize) -> Slot {
    n as Slot
}

struct ClientState {
    pages: HashMap<(u64, u64), Slot>,
    /// SHA-256 of the client's secret.
    secret_hash: [u8; 32],
    /// The open connections the client was opened on.
    conns: Vec<u64>,
    /// When its last connection closed (`None` while one is open).
    detached_since: Option<Instant>,
    grace: Duration,
}

/// The donated memory: slabs of pages, the free slots among them, and how many sessions share
/// each slot (a CLONE shares its parent's slots until one side writes).
#[derive(Default)]
struct Slabs {
    slabs: Vec<Box<[Page]>>,
    free: Vec<Slot>,
    /// Sessions holding each slot (0: free).
    refs: Vec<u32>,
    /// Whether freed slots give their memory back to the system (while the node is short of
    /// memory); else they are kept for the next PUT.
    give_back: bool,
}

impl Slabs {
    /// A free slot, held once, taking a new slab from the system if none is left.
    fn alloc(&mut self) -> Slot {
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                let base = self.slabs.len() * SLAB_PAGES;
                self.slabs.push(Page::vec(SLAB_PAGES).into_boxed_slice());
                self.refs.resize(base + SLAB_PAGES, 0);
                self.free.extend((base + 1..base + SLAB_PAGES).rev().map(slot));
                slot(base)
            }
        };
        self.refs[s as usize] = 1;
        s
    }

    /// One more session holds `s`.
    fn share(&mut self, s: Slot) {
        self.refs[s as usize] += 1;
    }

    /// Whether another session holds `s` too (a write must not land in it).
    fn shared(&self, s: Slot) -> bool {
        self.refs[s as usize] > 1
    }

    /// One session lets go of `s`; true if that freed it.
    fn unref(&mut self, s: Slot) -> bool {
        let r = &mut self.refs[s as usize];
        *r -= 1;
        if *r == 0 {
            self.free.push(s);
            return true;
        }
        false
    }

    /// Gives the memory of freed slots back to the system (in runs of neighbouring slots, one
    /// call each), so a server whose pages went elsewhere shrinks: a node short of memory gets
    /// it back. A slot given back reads as zeros and is taken again by the next PUT. Done only
    /// while the server is leaving: otherwise freed slots are kept for the next PUT (a system
    /// call and a TLB flush per run, under the store's lock, for nothing).
    fn give_back(&mut self, mut freed: Vec<Slot>) {
        freed.sort_unstable();
        let mut k = 0;
        while k < freed.len() {
            let first = freed[k] as usize;
            let (slab, at) = (first / SLAB_PAGES, first % SLAB_PAGES);
            let mut n = 1;
            while k + n < freed.len() && freed[k + n] as usize == first + n && at + n < SLAB_PAGES {
                n += 1;
            }
            if !Page::release(&mut self.slabs[slab][at..at + n]) {
                log::debug!("the system did not take back {n} freed pages");
            }
            k += n;
        }
    }

    fn page(&self, s: Slot) -> &Page {
        &self.slabs[s as usize / SLAB_PAGES][s as usize % SLAB_PAGES]
    }

    fn page_mut(&mut self, s: Slot) -> &mut Page {
        &mut self.slabs[s as usize / SLAB_PAGES][s as usize % SLAB_PAGES]
    }
}

#[derive(Default)]
struct Inner {
    slabs: Slabs,
    used: u64,
    clients: HashMap<ClientId, ClientState>,
    /// The clients opened on each open connection.
    by_conn: HashMap<u64, Vec<ClientId>>,
}

/// What a server holds, for monitoring and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreStats {
    /// Pages it can hold.
    pub capacity_pages: u64,
    /// Pages holding data (a page shared by a session and its clones counts once).
    pub used_pages: u64,
    /// Client sessions held (connected or detached).
    pub clients: usize,
    /// Of those, sessions with no open connection, kept for their grace time.
    pub detached_clients: usize,
}

/// Limits of a [`MemStore`].
#[derive(Clone, Copy, Debug)]
struct StoreLimits {
    quota_pages: u64,
    max_clients: usize,
    max_grace: Duration,
}

/// The page store and protocol handler of a memory server.
pub struct MemStore {
    capacity_pages: u64,
    limits: StoreLimits,
    inner: Mutex<Inner>,
    /// Set while the node wants its pages gone (see `proto`'s "Leaving").
    leaving: AtomicBool,
    /// The most free pages it offers (the node's memory to spare; see [`MemStore::set_room`]).
    room: AtomicU64,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore").field("stats", &self.stats()).finish()
    }
}

fn bad(e: proto::ProtoError) -> ServiceError {
    ServiceError::new(Status::BadRequest, e.to_string())
}

fn hex(id: &ClientId) -> String {
    id.iter().take(4).map(|b| format!("{b:02x}")).collect::<String>() + ".."
}

fn hash(secret: &Secret) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Compares two hashes in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl MemStore {
    /// A store of `capacity_pages` pages (at most [`MAX_CAPACITY_PAGES`]), with no per-client
    /// quota, 4096 clients at most and grace times of up to an hour.
    pub fn new(capacity_pages: u64) -> MemStore {
        let capacity_pages = capacity_pages.min(MAX_CAPACITY_PAGES - SLAB_PAGES as u64);
        MemStore {
            capacity_pages,
            limits: StoreLimits {
                quota_pages: capacity_pages,
                max_clients: 4096,
                max_grace: Duration::from_secs(3600),
            },
            inner: Mutex::new(Inner::default()),
            leaving: AtomicBool::new(false),
            room: AtomicU64::new(u64::MAX),
        }
    }

    /// A store with the capacity and limits of `cfg`.
    pub fn with_config(cfg: &MemServerConfig) -> MemStore {
        let mut s = MemStore::new(cfg.capacity_bytes / PAGE_SIZE as u64);
        s.limits = StoreLimits {
            quota_pages: (cfg.quota_bytes / PAGE_SIZE as u64).min(s.capacity_pages),
            max_clients: cfg.max_clients.max(1),
            max_grace: cfg.max_grace.max(MIN_GRACE),
        };
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Current figures.
    pub fn stats(&self) -> StoreStats {
        let g = self.lock();
        StoreStats {
            capacity_pages: self.capacity_pages,
            used_pages: g.used,
            clients: g.clients.len(),
            detached_clients: g.clients.values().filter(|c| c.conns.is_empty()).count(),
        }
    }

    fn state(&self, g: &Inner, grace: Duration, resumed: bool) -> ServerState {
        ServerState {
            capacity_pages: self.capacity_pages,
            free_pages: self.free_pages(g),
            grace_ms: u32::try_from(grace.as_millis()).unwrap_or(u32::MAX),
            resumed,
            leaving: self.leaving(),
            quota_pages: self.limits.quota_pages,
        }
    }

    /// The free pages it reports: its free capacity, capped at the room its node can spare but
    /// never below one page while it has capacity (clients then prefer any server with more
    /// room, yet still use this one when none has: the cap never makes network RAM refuse).
    fn free_pages(&self, g: &Inner) -> u64 {
        match self.capacity_pages - g.used {
            0 => 0,
            free => free.min(self.room.load(Ordering::Relaxed).max(1)),
        }
    }

    /// Asks clients to move their pages elsewhere (`true`), or lets them place pages here again
    /// (`false`): see `proto`'s "Leaving". Nothing is refused meanwhile: a client with nowhere
    /// else to go keeps its pages here.
    pub fn set_leaving(&self, leaving: bool) {
        if self.leaving.swap(leaving, Ordering::AcqRel) != leaving {
            let mut g = self.lock();
            g.slabs.give_back = leaving;
            if leaving {
                // What was freed before goes back to the system now.
                let free = g.slabs.free.clone();
                g.slabs.give_back(free);
            }
            let used = g.used;
            drop(g);
            if leaving {
                log::info!("memory server: asking clients to move the {used} pages held here elsewhere");
            } else {
                log::info!("memory server: taking pages again ({used} held)");
            }
        }
    }

    /// Whether clients are asked to move their pages elsewhere.
    pub fn leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Offers clients at most `bytes` more (what the node can spare), or all of the free
    /// capacity (`None`). Only what clients are told: they place new slabs by it, so a server
    /// never fills its node past what the node can spare while others have room; it reports at
    /// least one free page while it has capacity, and a PUT beyond the room is still taken.
    pub fn set_room(&self, bytes: Option<u64>) {
        self.room.store(bytes.map_or(u64::MAX, |b| b / PAGE_SIZE as u64), Ordering::Relaxed);
    }

    /// The session of `client`, if `caller` opened it.
    fn session<'a>(g: &'a mut Inner, caller: &Caller, client: &ClientId) -> Result<&'a mut ClientState, ServiceError> {
        let c = g.clients.get_mut(client).ok_or_else(|| {
            ServiceError::new(Status::NotFound, format!("unknown client {}: open a session (OPEN) first", hex(client)))
        })?;
        if !c.conns.contains(&caller.id) {
            return Err(ServiceError::new(
                Status::Forbidden,
                format!("client {} was not opened on this connection (OPEN it with its secret first)", hex(client)),
            ));
        }
        Ok(c)
    }

    /// A session lets go of `slots`; returns how many they were (slots still shared with a
    /// clone stay in use).
    fn release(g: &mut Inner, slots: impl IntoIterator<Item = Slot>) -> u64 {
        let mut n = 0;
        let mut freed = Vec::new();
        for s in slots {
            if g.slabs.unref(s) {
                g.used -= 1;
                freed.push(s);
            }
            n += 1;
        }
        if g.slabs.give_back {
            g.slabs.give_back(freed);
        }
        n
    }

    fn open(&self, caller: &Caller, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let (client, grace_ms, secret) = proto::decode_open(req).map_err(bad)?;
        let grace = Duration::from_millis(u64::from(grace_ms)).clamp(MIN_GRACE, self.limits.max_grace);
        let secret_hash = hash(&secret);
        let mut g = self.lock();
        let opened_here = g.by_conn.get(&caller.id).map_or(0, Vec::len);
        let resumed = match g.clients.get_mut(&client) {
            Some(c) => {
                if !same(&c.secret_hash, &secret_hash) {
                    return Err(ServiceError::new(
                        Status::Forbidden,
                        format!("client {} belongs to another session (wrong secret)", hex(&client)),
                    ));
                }
                if !c.conns.contains(&caller.id) {
                    if c.conns.len() >= MAX_CONNECTIONS_PER_CLIENT || opened_here >= MAX_CLIENTS_PER_CONNECTION {
                        return Err(ServiceError::new(
                            Status::Full,
                            format!(
                                "at most {MAX_CONNECTIONS_PER_CLIENT} connections per client and \
                                 {MAX_CLIENTS_PER_CONNECTION} clients per connection"
                            ),
                        ));
                    }
                    c.conns.push(caller.id);
                }
                c.detached_since = None;
                c.grace = grace;
                true
            }
            None => {
                if g.clients.len() >= self.limits.max_clients {
                    return Err(ServiceError::new(
                        Status::Full,
                        format!("client table full: {} sessions held (the limit)", g.clients.len()),
                    ));
                }
                if opened_here >= MAX_CLIENTS_PER_CONNECTION {
                    return Err(ServiceError::new(
                        Status::Full,
                        format!("at most {MAX_CLIENTS_PER_CONNECTION} clients per connection"),
                    ));
                }
                let state = ClientState {
                    pages: HashMap::new(),
                    secret_hash,
                    conns: vec![caller.id],
                    detached_since: None,
                    grace,
                };
                g.clients.insert(client, state);
                false
            }
        };
        let mine = g.by_conn.entry(caller.id).or_default();
        if !mine.contains(&client) {
            mine.push(client);
        }
        self.state(&g, grace, resumed).encode(out);
        Ok(())
    }

    fn put(&self, caller: &Caller, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let b = proto::decode_batch("PUT", req, true).map_err(bad)?;
        let pages = b.pages.unwrap_or_default();
        let mut g = self.lock();
        Self::session(&mut g, caller, &b.client)?;
        let Inner { slabs, used, clients, .. } = &mut *g;
        let c = clients.get_mut(&b.client).ok_or_else(|| ServiceError::new(Status::NotFound, "unknown client"))?;
        let grace = c.grace;
        // Slots this PUT takes: one per page not stored yet, and one per page whose slot a
        // clone shares (the write goes to a fresh slot, the clone keeps the old contents).
        let (new, fresh_slots) = {
            let mut seen = std::collections::HashSet::new();
            let (mut new, mut fresh) = (0u64, 0u64);
            for p in pages.iter().filter(|p| seen.insert(**p)) {
                match c.pages.get(&(b.region, *p)) {
                    None => (new, fresh) = (new + 1, fresh + 1),
                    Some(&s) if slabs.shared(s) => fresh += 1,
                    Some(_) => {}
                }
            }
            (new, fresh)
        };
        if c.pages.len() as u64 + new > self.limits.quota_pages {
            return Err(ServiceError::new(
                Status::Full,
                format!(
                    "quota reached: this client stores {} pages here, {new} more would pass its quota of {}",
                    c.pages.len(),
                    self.limits.quota_pages
                ),
            ));
        }
        if *used + fresh_slots > self.capacity_pages {
            return Err(ServiceError::new(
                Status::Full,
                format!("server full: {used} of {} pages used, {fresh_slots} more needed", self.capacity_pages),
            ));
        }
        for (p, src) in pages.iter().zip(b.data.chunks_exact(PAGE_SIZE)) {
            // Capacity was checked above, so every new slot is within it.
            let slot = match c.pages.get(&(b.region, *p)).copied() {
                Some(s) if !slabs.shared(s) => s,
                old => {
                    if let Some(s) = old {
                        slabs.unref(s); // still held by the clone
                    }
                    *used += 1;
                    let s = slabs.alloc();
                    c.pages.insert((b.region, *p), s);
                    s
                }
            };
            slabs.page_mut(slot).0.copy_from_slice(src);
        }
        self.state(&g, grace, true).encode(out);
        Ok(())
    }

    fn get(&self, caller: &Caller, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let (client, region, page) = proto::decode_get(req).map_err(bad)?;
        let mut g = self.lock();
        let slot = Self::session(&mut g, caller, &client)?.pages.get(&(region, page)).copied();
        match slot {
            Some(s) => {
                out.extend_from_slice(&g.slabs.page(s).0);
                Ok(())
            }
            None => {
                Err(ServiceError::new(Status::NotFound, format!("page {page} of region {region} is not stored here")))
            }
        }
    }

    fn free(&self, caller: &Caller, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let b = proto::decode_batch("FREE", req, false).map_err(bad)?;
        let mut g = self.lock();
        let c = Self::session(&mut g, caller, &b.client)?;
        let slots: Vec<Slot> = match b.pages {
            None => {
                let keys: Vec<_> = c.pages.keys().filter(|(r, _)| *r == b.region).copied().collect();
                keys.iter().filter_map(|k| c.pages.remove(k)).collect()
            }
            Some(ps) => ps.iter().filter_map(|p| c.pages.remove(&(b.region, *p))).collect(),
        };
        let n = Self::release(&mut g, slots);
        out.extend_from_slice(&n.to_le_bytes());
        Ok(())
    }

    fn close(&self, caller: &Caller, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let client = proto::decode_client("CLOSE", req).map_err(bad)?;
        let mut g = self.lock();
        Self::session(&mut g, caller, &client)?;
        let n = Self::remove_client(&mut g, &client);
        out.extend_from_slice(&n.to_le_bytes());
        Ok(())
    }

    /// CLONE: a new detached session holding `parent`'s pages as they are now, shared
    /// copy-on-write.
    fn clone_session(&self, caller: &Caller, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let (parent, child, grace_ms, secret) = proto::decode_clone(req).map_err(bad)?;
        let grace = Duration::from_millis(u64::from(grace_ms)).clamp(MIN_GRACE, self.limits.max_grace);
        let mut g = self.lock();
        let pages = Self::session(&mut g, caller, &parent)?.pages.clone();
        if g.clients.contains_key(&child) {
            return Err(ServiceError::new(Status::BadRequest, format!("client {} exists already", hex(&child))));
        }
        if g.clients.len() >= self.limits.max_clients {
            return Err(ServiceError::new(
                Status::Full,
                format!("client table full: {} sessions held (the limit)", g.clients.len()),
            ));
        }
        for s in pages.values() {
            g.slabs.share(*s);
        }
        let state = ClientState {
            pages,
            secret_hash: hash(&secret),
            conns: Vec::new(),
            detached_since: Some(Instant::now()),
            grace,
        };
        g.clients.insert(child, state);
        self.state(&g, grace, false).encode(out);
        Ok(())
    }

    /// TRANSFER: `from`'s session, pages and all, becomes the new detached session `to` (with
    /// `to`'s secret and grace time); every connection bound to `from` loses it. Nothing is
    /// copied: a region handed over to another process.
    fn transfer_session(&self, caller: &Caller, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let (from, to, grace_ms, secret) = proto::decode_clone(req).map_err(bad)?;
        let grace = Duration::from_millis(u64::from(grace_ms)).clamp(MIN_GRACE, self.limits.max_grace);
        let mut g = self.lock();
        Self::session(&mut g, caller, &from)?;
        if g.clients.contains_key(&to) {
            return Err(ServiceError::new(Status::BadRequest, format!("client {} exists already", hex(&to))));
        }
        let Some(mut state) = g.clients.remove(&from) else {
            return Err(ServiceError::new(Status::NotFound, format!("unknown client {}", hex(&from))));
        };
        for conn in std::mem::take(&mut state.conns) {
            if let Some(list) = g.by_conn.get_mut(&conn) {
                list.retain(|x| *x != from);
                if list.is_empty() {
                    g.by_conn.remove(&conn);
                }
            }
        }
        state.secret_hash = hash(&secret);
        state.detached_since = Some(Instant::now());
        state.grace = grace;
        g.clients.insert(to, state);
        self.state(&g, grace, true).encode(out);
        Ok(())
    }

    /// Ends `client`'s session: frees its pages and unbinds its connections. Returns pages freed.
    fn remove_client(g: &mut Inner, client: &ClientId) -> u64 {
        let Some(c) = g.clients.remove(client) else { return 0 };
        for conn in &c.conns {
            if let Some(list) = g.by_conn.get_mut(conn) {
                list.retain(|x| x != client);
                if list.is_empty() {
                    g.by_conn.remove(conn);
                }
            }
        }
        Self::release(g, c.pages.into_values())
    }

    /// Connection `caller` closed: its clients lose it, and those left with no connection start
    /// their grace time at `now`.
    pub fn detach(&self, caller: &Caller, now: Instant) {
        let mut g = self.lock();
        for client in g.by_conn.remove(&caller.id).unwrap_or_default() {
            if let Some(c) = g.clients.get_mut(&client) {
                c.conns.retain(|x| *x != caller.id);
                if c.conns.is_empty() {
                    c.detached_since = Some(now);
                }
            }
        }
    }

    /// Reclaims the pages of every detached client whose grace time has passed; returns
    /// (clients, pages). Clients with an open connection are never reclaimed.
    pub fn reap(&self, now: Instant) -> (usize, u64) {
        let mut g = self.lock();
        let gone: Vec<ClientId> = g
            .clients
            .iter()
            .filter(|(_, c)| c.detached_since.is_some_and(|t| now.saturating_duration_since(t) > c.grace))
            .map(|(id, _)| *id)
            .collect();
        let pages = gone.iter().map(|id| Self::remove_client(&mut g, id)).sum();
        (gone.len(), pages)
    }

    /// The shortest grace time of any detached client (how often to reap), if any.
    fn shortest_grace(&self) -> Option<Duration> {
        self.lock().clients.values().filter(|c| c.conns.is_empty()).map(|c| c.grace).min()
    }
}

impl Service for MemStore {
    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        match method {
            proto::OPEN => self.open(caller, request, response),
            proto::PUT => self.put(caller, request, response),
            proto::GET => self.get(caller, request, response),
            proto::FREE => self.free(caller, request, response),
            proto::STAT => {
                let g = self.lock();
                self.state(&g, Duration::ZERO, false).encode(response);
                Ok(())
            }
            proto::RENEW => {
                let client = proto::decode_client("RENEW", request).map_err(bad)?;
                let mut g = self.lock();
                let grace = Self::session(&mut g, caller, &client)?.grace;
                self.state(&g, grace, true).encode(response);
                Ok(())
            }
            proto::CLOSE => self.close(caller, request, response),
            proto::CLONE => self.clone_session(caller, request, response),
            proto::TRANSFER => self.transfer_session(caller, request, response),
            m => Err(ServiceError::new(Status::UnknownMethod, format!("no method {m}"))),
        }
    }

    fn disconnected(&self, caller: &Caller) {
        self.detach(caller, Instant::now());
    }
}

/// A running memory server: a [`MemStore`] behind a transport listener, plus the thread that
/// reclaims expired leases. Stops when dropped.
pub struct MemServer {
    server: Option<Server>,
    store: Arc<MemStore>,
    stop: Arc<AtomicBool>,
    reaper: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MemServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemServer").field("uri", &self.uri()).field("store", &self.store).finish()
    }
}

impl MemServer {
    /// Listens at `uri` (`tcp://HOST:PORT`, `shm://NAME`, `rdma://...`) and serves.
    pub fn start(uri: &str, cfg: MemServerConfig) -> Result<MemServer, NetRamError> {
        let capacity_pages = cfg.capacity_bytes / PAGE_SIZE as u64;
        if capacity_pages == 0 {
            return Err(ConfigError::CapacityTooSmall { bytes: cfg.capacity_bytes }.into());
        }
        let store = Arc::new(MemStore::with_config(&cfg));
        let scfg = ServerConfig::new(cfg.key).service(store.clone()).policy(cfg.policy).limits(cfg.limits);
        let server = listen(uri, scfg).map_err(|e| NetRamError::Listen { uri: uri.to_string(), source: e })?;
        let stop = Arc::new(AtomicBool::new(false));
        let reaper = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::Builder::new()
                .name("mosaic-reaper".into())
                .spawn(move || reap_loop(&store, &stop))
                .map_err(|e| NetRamError::Thread { what: "reaper", source: e })?
        };
        Ok(MemServer { server: Some(server), store, stop, reaper: Some(reaper) })
    }

    /// The URI clients connect to.
    pub fn uri(&self) -> &str {
        self.server.as_ref().map_or("", |s| s.uri())
    }

    /// What the server holds.
    pub fn stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// Asks clients to move their pages elsewhere, or lets them come back (see
    /// [`MemStore::set_leaving`]).
    pub fn set_leaving(&self, leaving: bool) {
        self.store.set_leaving(leaving);
    }

    /// Whether clients are asked to move their pages elsewhere.
    pub fn leaving(&self) -> bool {
        self.store.leaving()
    }

    /// Offers clients at most `bytes` more (see [`MemStore::set_room`]).
    pub fn set_room(&self, bytes: Option<u64>) {
        self.store.set_room(bytes);
    }

    /// Stops serving (clients' requests fail with `Disconnected`) and frees everything.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        if let Some(r) = self.reaper.take() {
            let _ = r.join();
        }
    }
}

impl Drop for MemServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn reap_loop(store: &MemStore, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let every =
            store.shortest_grace().map_or(Duration::from_millis(200), |l| (l / 4).max(Duration::from_millis(10)));
        let mut slept = Duration::ZERO;
        while slept < every && !stop.load(Ordering::Acquire) {
            let step = Duration::from_millis(10).min(every - slept);
            std::thread::sleep(step);
            slept += step;
        }
        let (clients, pages) = store.reap(Instant::now());
        if clients > 0 {
            log::info!("reclaimed {pages} pages of {clients} client(s) gone for longer than their grace time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ClientId = [1; 16];
    const B: ClientId = [2; 16];
    const SA: Secret = [11; 32];
    const SB: Secret = [22; 32];

    fn conn(id: u64) -> Caller {
        Caller { id, peer: format!("test#{id}") }
    }

    fn call(s: &MemStore, who: &Caller, m: u64, req: &[u8]) -> Result<Vec<u8>, ServiceError> {
        let mut out = Vec::new();
        s.call(who, m, req, &mut out).map(|()| out)
    }

    fn open(
        s: &MemStore,
        who: &Caller,
        c: &ClientId,
        secret: &Secret,
        grace_ms: u32,
    ) -> Result<ServerState, ServiceError> {
        call(s, who, proto::OPEN, &proto::encode_open(c, grace_ms, secret)).map(|r| ServerState::decode(&r).unwrap())
    }

    #[test]
    fn pages_are_stored_per_client_and_region() {
        let s = MemStore::new(1000);
        let (ca, cb) = (conn(1), conn(2));
        assert!(!open(&s, &ca, &A, &SA, 1000).unwrap().resumed);
        open(&s, &cb, &B, &SB, 1000).unwrap();
        let p = [9u8; PAGE_SIZE];
        let st =
            ServerState::decode(&call(&s, &ca, proto::PUT, &proto::encode_put(&A, 1, &[(5, &p)])).unwrap()).unwrap();
        assert_eq!(st.free_pages, 999);
        assert_eq!(call(&s, &ca, proto::GET, &proto::encode_get(&A, 1, 5)).unwrap(), p.to_vec());
        // Another region, another page: not found; B's own session does not have A's page.
        for (who, c, r, pg) in [(&cb, B, 1, 5), (&ca, A, 2, 5), (&ca, A, 1, 6)] {
            let e = call(&s, who, proto::GET, &proto::encode_get(&c, r, pg)).unwrap_err();
            assert_eq!(e.status, Status::NotFound);
        }
        // Overwriting uses no new page.
        let q = [8u8; PAGE_SIZE];
        call(&s, &ca, proto::PUT, &proto::encode_put(&A, 1, &[(5, &q)])).unwrap();
        assert_eq!(s.stats().used_pages, 1);
        assert_eq!(call(&s, &ca, proto::GET, &proto::encode_get(&A, 1, 5)).unwrap(), q.to_vec());
        let freed = call(&s, &ca, proto::FREE, &proto::encode_free(&A, 1, None)).unwrap();
        assert_eq!(u64::from_le_bytes(freed.try_into().unwrap()), 1);
        assert_eq!(s.stats().used_pages, 0);
    }

    #[test]
    fn leaving_and_room_are_reported_and_giving_back_spares_the_pages_held() {
        let s = MemStore::new(4);
        let c = conn(1);
        open(&s, &c, &A, &SA, 1000).unwrap();
        let state = || ServerState::decode(&call(&s, &c, proto::RENEW, &A).unwrap()).unwrap();
        assert_eq!((state().free_pages, state().leaving), (4, false));
        // The room its node can spare caps what it reports, but never below one page...
        s.set_room(Some(0));
        assert_eq!(state().free_pages, 1);
        s.set_room(Some(2 * PAGE_SIZE as u64));
        assert_eq!(state().free_pages, 2);
        // ...and PUTs beyond the room are still taken; full is full.
        let p = [3u8; PAGE_SIZE];
        let pages: Vec<(u64, &[u8; PAGE_SIZE])> = (0..4).map(|i| (i, &p)).collect();
        call(&s, &c, proto::PUT, &proto::encode_put(&A, 1, &pages)).unwrap();
        assert_eq!(state().free_pages, 0);
        s.set_room(None);
        // Leaving: said in every state; freed slots go back to the system, and the pages still
        // held read as they were (only free slots are given back).
        s.set_leaving(true);
        assert!(state().leaving && s.leaving());
        call(&s, &c, proto::FREE, &proto::encode_free(&A, 1, Some(&[0, 2]))).unwrap();
        for i in [1, 3] {
            assert_eq!(call(&s, &c, proto::GET, &proto::encode_get(&A, 1, i)).unwrap(), p.to_vec());
        }
        // A slot given back is taken again by a PUT, with the new data.
        let q = [4u8; PAGE_SIZE];
        call(&s, &c, proto::PUT, &proto::encode_put(&A, 1, &[(7, &q)])).unwrap();
        assert_eq!(call(&s, &c, proto::GET, &proto::encode_get(&A, 1, 7)).unwrap(), q.to_vec());
        s.set_leaving(false);
        assert!(!state().leaving);
    }

    /// The probe: a second authenticated connection named another client's id.
    #[test]
    fn another_connection_cannot_use_or_take_over_a_session() {
        let s = MemStore::new(100);
        let (owner, intruder) = (conn(1), conn(2));
        open(&s, &owner, &A, &SA, 60_000).unwrap();
        let p = [7u8; PAGE_SIZE];
        call(&s, &owner, proto::PUT, &proto::encode_put(&A, 1, &[(0, &p)])).unwrap();
        let forbidden = |m: u64, req: Vec<u8>| {
            let e = call(&s, &intruder, m, &req).unwrap_err();
            assert_eq!(e.status, Status::Forbidden, "method {m}: {}", e.message);
        };
        forbidden(proto::GET, proto::encode_get(&A, 1, 0).to_vec());
        forbidden(proto::PUT, proto::encode_put(&A, 1, &[(0, &[0u8; PAGE_SIZE])]));
        forbidden(proto::FREE, proto::encode_free(&A, 1, None));
        forbidden(proto::RENEW, A.to_vec());
        forbidden(proto::CLOSE, A.to_vec());
        // Re-opening the id (with a tiny grace, as the probe did) needs the secret.
        let e = open(&s, &intruder, &A, &SB, 1).unwrap_err();
        assert_eq!(e.status, Status::Forbidden, "{}", e.message);
        // The owner's data and session are untouched.
        assert_eq!(call(&s, &owner, proto::GET, &proto::encode_get(&A, 1, 0)).unwrap(), p.to_vec());
        // The owner's second connection, with the secret, attaches to the same session.
        let second = conn(3);
        assert!(open(&s, &second, &A, &SA, 60_000).unwrap().resumed);
        assert_eq!(call(&s, &second, proto::GET, &proto::encode_get(&A, 1, 0)).unwrap(), p.to_vec());
    }

    #[test]
    fn a_connected_client_is_never_reclaimed_and_a_detached_one_after_its_grace() {
        let s = MemStore::new(100);
        let c = conn(1);
        open(&s, &c, &A, &SA, 200).unwrap();
        let p = [1u8; PAGE_SIZE];
        call(&s, &c, proto::PUT, &proto::encode_put(&A, 1, &[(0, &p), (1, &p)])).unwrap();
        let t0 = Instant::now();
        // Silent for a day, but connected: nothing is reclaimed.
        assert_eq!(s.reap(t0 + Duration::from_secs(86_400)), (0, 0));
        // The connection closes: the grace time starts.
        s.detach(&c, t0);
        assert_eq!(s.stats().detached_clients, 1);
        assert_eq!(s.reap(t0 + Duration::from_millis(100)), (0, 0));
        // A reconnect within the grace time resumes the session with its pages.
        let c2 = conn(2);
        assert!(open(&s, &c2, &A, &SA, 200).unwrap().resumed);
        assert_eq!(s.reap(t0 + Duration::from_secs(10)), (0, 0));
        assert_eq!(call(&s, &c2, proto::GET, &proto::encode_get(&A, 1, 1)).unwrap(), p.to_vec());
        // Gone for longer than the grace time: reclaimed.
        s.detach(&c2, t0);
        assert_eq!(s.reap(t0 + Duration::from_secs(1)), (1, 2));
        assert_eq!(s.stats(), StoreStats { capacity_pages: 100, used_pages: 0, clients: 0, detached_clients: 0 });
        // The client comes back: a fresh session, and it is told so.
        assert!(!open(&s, &conn(3), &A, &SA, 200).unwrap().resumed);
    }

    #[test]
    fn a_clone_sees_the_parent_as_it_was_and_writes_apart() {
        let s = MemStore::new(6);
        let (p, q) = (conn(1), conn(2));
        open(&s, &p, &A, &SA, 200).unwrap();
        let (one, two, three) = ([1u8; PAGE_SIZE], [2u8; PAGE_SIZE], [3u8; PAGE_SIZE]);
        call(&s, &p, proto::PUT, &proto::encode_put(&A, 1, &[(0, &one), (1, &one)])).unwrap();
        // Only the parent's own connection may clone it.
        let req = proto::encode_clone(&A, &B, 200, &SB);
        assert_eq!(call(&s, &q, proto::CLONE, &req).unwrap_err().status, Status::Forbidden);
        call(&s, &p, proto::CLONE, &req).unwrap();
        assert_eq!(call(&s, &p, proto::CLONE, &req).unwrap_err().status, Status::BadRequest, "exists");
        // Shared: the clone costs no page.
        assert_eq!((s.stats().used_pages, s.stats().clients, s.stats().detached_clients), (2, 2, 1));
        // The child attaches with its secret only, and is not bound to the parent's connection.
        assert_eq!(open(&s, &q, &B, &SA, 200).unwrap_err().status, Status::Forbidden);
        assert!(open(&s, &q, &B, &SB, 200).unwrap().resumed);
        assert_eq!(call(&s, &p, proto::GET, &proto::encode_get(&B, 1, 0)).unwrap_err().status, Status::Forbidden);
        // Writes after the clone stay on their side.
        call(&s, &p, proto::PUT, &proto::encode_put(&A, 1, &[(0, &two)])).unwrap();
        call(&s, &q, proto::PUT, &proto::encode_put(&B, 1, &[(1, &three), (2, &three)])).unwrap();
        let get = |who: &Caller, c: &ClientId, page| call(&s, who, proto::GET, &proto::encode_get(c, 1, page)).unwrap();
        assert_eq!((get(&p, &A, 0), get(&p, &A, 1)), (two.to_vec(), one.to_vec()));
        assert_eq!((get(&q, &B, 0), get(&q, &B, 1), get(&q, &B, 2)), (one.to_vec(), three.to_vec(), three.to_vec()));
        assert_eq!(s.stats().used_pages, 5, "two shared, then two split off and one new");
        // A write that must split a shared page counts against capacity.
        call(&s, &q, proto::PUT, &proto::encode_put(&B, 1, &[(3, &three)])).unwrap();
        let full = call(&s, &p, proto::PUT, &proto::encode_put(&A, 1, &[(4, &two)]));
        assert_eq!(full.unwrap_err().status, Status::Full);
        // Ending either session frees only what no one else holds.
        let freed = call(&s, &p, proto::CLOSE, &A).unwrap();
        assert_eq!(u64::from_le_bytes(freed.try_into().unwrap()), 2);
        assert_eq!(s.stats().used_pages, 4);
        assert_eq!(get(&q, &B, 0), one.to_vec());
        call(&s, &q, proto::CLOSE, &B).unwrap();
        assert_eq!(s.stats().used_pages, 0);
    }

    #[test]
    fn a_transferred_session_keeps_its_pages_under_its_new_name_only() {
        let s = MemStore::new(6);
        let (p, q) = (conn(1), conn(2));
        open(&s, &p, &A, &SA, 200).unwrap();
        let one = [1u8; PAGE_SIZE];
        call(&s, &p, proto::PUT, &proto::encode_put(&A, 1, &[(0, &one), (1, &one)])).unwrap();
        let req = proto::encode_clone(&A, &B, 200, &SB);
        assert_eq!(call(&s, &q, proto::TRANSFER, &req).unwrap_err().status, Status::Forbidden, "not its session");
        call(&s, &p, proto::TRANSFER, &req).unwrap();
        // Nothing copied; the old name is gone and its connection lost it.
        assert_eq!((s.stats().used_pages, s.stats().clients, s.stats().detached_clients), (2, 1, 1));
        assert_eq!(call(&s, &p, proto::GET, &proto::encode_get(&A, 1, 0)).unwrap_err().status, Status::NotFound);
        assert_eq!(open(&s, &q, &B, &SA, 200).unwrap_err().status, Status::Forbidden, "the new secret only");
        assert!(open(&s, &q, &B, &SB, 200).unwrap().resumed);
        assert_eq!(call(&s, &q, proto::GET, &proto::encode_get(&B, 1, 1)).unwrap(), one.to_vec());
        // And back (a hand-over taken back): the taker's connection loses it in turn.
        call(&s, &q, proto::TRANSFER, &proto::encode_clone(&B, &A, 200, &SA)).unwrap();
        assert_eq!(call(&s, &q, proto::GET, &proto::encode_get(&B, 1, 1)).unwrap_err().status, Status::NotFound);
        assert!(open(&s, &p, &A, &SA, 200).unwrap().resumed);
        assert_eq!(call(&s, &p, proto::GET, &proto::encode_get(&A, 1, 0)).unwrap(), one.to_vec());
        assert_eq!(s.stats().used_pages, 2);
    }

    #[test]
    fn an_unclaimed_clone_is_reclaimed_after_its_grace() {
        let s = MemStore::new(10);
        let p = conn(1);
        open(&s, &p, &A, &SA, 200).unwrap();
        call(&s, &p, proto::PUT, &proto::encode_put(&A, 1, &[(0, &[1u8; PAGE_SIZE])])).unwrap();
        call(&s, &p, proto::CLONE, &proto::encode_clone(&A, &B, 100, &SB)).unwrap();
        assert_eq!(s.reap(Instant::now() + Duration::from_secs(1)), (1, 1));
        assert_eq!((s.stats().used_pages, s.stats().clients), (1, 1), "the parent keeps its page");
    }

    #[test]
    fn a_full_server_refuses_the_whole_batch() {
        let s = MemStore::new(3);
        let c = conn(1);
        open(&s, &c, &A, &SA, 1000).unwrap();
        let p = [1u8; PAGE_SIZE];
        call(&s, &c, proto::PUT, &proto::encode_put(&A, 1, &[(0, &p), (1, &p)])).unwrap();
        let e = call(&s, &c, proto::PUT, &proto::encode_put(&A, 1, &[(2, &p), (3, &p)])).unwrap_err();
        assert_eq!(e.status, Status::Full, "{}", e.message);
        assert_eq!(s.stats().used_pages, 2, "nothing of the refused batch was stored");
        // Overwrites and the last free page still fit.
        call(&s, &c, proto::PUT, &proto::encode_put(&A, 1, &[(0, &p), (2, &p)])).unwrap();
        assert_eq!(s.stats().used_pages, 3);
    }

    #[test]
    fn quotas_and_the_client_table_are_bounded() {
        let key = ClusterKey::from_bytes(b"quota-test-cluster-key").unwrap();
        let mut cfg = MemServerConfig::new(100 * PAGE_SIZE as u64, key);
        cfg.quota_bytes = 2 * PAGE_SIZE as u64;
        cfg.max_clients = 2;
        let s = MemStore::with_config(&cfg);
        let (ca, cb) = (conn(1), conn(2));
        assert_eq!(open(&s, &ca, &A, &SA, 1000).unwrap().quota_pages, 2);
        let p = [1u8; PAGE_SIZE];
        call(&s, &ca, proto::PUT, &proto::encode_put(&A, 1, &[(0, &p), (1, &p)])).unwrap();
        let e = call(&s, &ca, proto::PUT, &proto::encode_put(&A, 1, &[(2, &p)])).unwrap_err();
        assert_eq!(e.status, Status::Full);
        assert!(e.message.contains("quota"), "{}", e.message);
        open(&s, &cb, &B, &SB, 1000).unwrap();
        let e = open(&s, &conn(3), &[3; 16], &SB, 1000).unwrap_err();
        assert_eq!(e.status, Status::Full);
        assert!(e.message.contains("client table full"), "{}", e.message);
        // One connection cannot open clients without bound either.
        let s = MemStore::new(100);
        for i in 0..MAX_CLIENTS_PER_CONNECTION {
            open(&s, &ca, &[u8::try_from(i).unwrap(); 16], &SA, 1000).unwrap();
        }
        let e = open(&s, &ca, &[0xee; 16], &SA, 1000).unwrap_err();
        assert_eq!(e.status, Status::Full);
    }

    #[test]
    fn unknown_clients_and_bad_requests_are_typed() {
        let s = MemStore::new(10);
        let c = conn(1);
        assert_eq!(call(&s, &c, proto::GET, &proto::encode_get(&A, 1, 0)).unwrap_err().status, Status::NotFound);
        assert_eq!(call(&s, &c, proto::PUT, b"short").unwrap_err().status, Status::BadRequest);
        assert_eq!(call(&s, &c, 99, b"").unwrap_err().status, Status::UnknownMethod);
    }
}
