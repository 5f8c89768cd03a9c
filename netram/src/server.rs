//! The memory server: donates RAM in slabs and stores clients' pages by (client, region, page).
//!
//! [`MemStore`] is the storage and the protocol's service (sans transport); [`MemServer`] puts it
//! behind a transport listener and reclaims the pages of clients whose lease expired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_transport::{listen, ClusterKey, Page, Server, ServerConfig, Service, ServiceError, Status, WaitPolicy};

use crate::proto::{self, ClientId, ServerState};
use crate::{NetRamError, PAGE_SIZE};

/// Pages per slab: the unit in which the server takes memory from the system.
const SLAB_PAGES: usize = 512;
/// Shortest and longest lease granted.
const MIN_LEASE: Duration = Duration::from_millis(100);
const MAX_LEASE: Duration = Duration::from_secs(3600);
/// How long an expired client is remembered, so its requests get `Expired` and not `NotFound`.
const REMEMBER_EXPIRED: Duration = Duration::from_secs(600);

/// How a memory server behaves.
#[derive(Clone, Debug)]
pub struct MemServerConfig {
    /// RAM to donate, in bytes (rounded down to whole pages).
    pub capacity_bytes: u64,
    /// The cluster key clients must prove.
    pub key: ClusterKey,
    /// How connection threads wait for requests.
    pub policy: WaitPolicy,
}

impl MemServerConfig {
    /// A server donating `capacity_bytes`.
    pub fn new(capacity_bytes: u64, key: ClusterKey) -> MemServerConfig {
        MemServerConfig { capacity_bytes, key, policy: WaitPolicy::DEFAULT }
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
    last_seen: Instant,
    lease: Duration,
}

/// The donated memory: slabs of pages, and the free slots among them.
#[derive(Default)]
struct Slabs {
    slabs: Vec<Box<[Page]>>,
    free: Vec<Slot>,
}

impl Slabs {
    /// A free slot, taking a new slab from the system if none is left.
    fn alloc(&mut self) -> Slot {
        if let Some(s) = self.free.pop() {
            return s;
        }
        let base = self.slabs.len() * SLAB_PAGES;
        self.slabs.push(Page::vec(SLAB_PAGES).into_boxed_slice());
        self.free.extend((base + 1..base + SLAB_PAGES).rev().map(slot));
        slot(base)
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
    expired: HashMap<ClientId, Instant>,
}

/// What a server holds, for monitoring and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreStats {
    /// Pages it can hold.
    pub capacity_pages: u64,
    /// Pages holding data.
    pub used_pages: u64,
    /// Clients with a live lease.
    pub clients: usize,
}

/// The page store and protocol handler of a memory server.
pub struct MemStore {
    capacity_pages: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore").field("stats", &self.stats()).finish()
    }
}

fn bad(e: proto::ProtoError) -> ServiceError {
    ServiceError::new(Status::BadRequest, e.to_string())
}

impl MemStore {
    /// A store of `capacity_pages` pages (at most [`MAX_CAPACITY_PAGES`]).
    pub fn new(capacity_pages: u64) -> MemStore {
        MemStore {
            capacity_pages: capacity_pages.min(MAX_CAPACITY_PAGES - SLAB_PAGES as u64),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Current figures.
    pub fn stats(&self) -> StoreStats {
        let g = self.lock();
        StoreStats { capacity_pages: self.capacity_pages, used_pages: g.used, clients: g.clients.len() }
    }

    fn state(&self, g: &Inner, lease: Duration) -> ServerState {
        ServerState {
            capacity_pages: self.capacity_pages,
            free_pages: self.capacity_pages - g.used,
            lease_ms: u32::try_from(lease.as_millis()).unwrap_or(u32::MAX),
        }
    }

    /// The live session of `client`, renewed; or why there is none.
    fn session<'a>(g: &'a mut Inner, client: &ClientId) -> Result<&'a mut ClientState, ServiceError> {
        if g.expired.contains_key(client) {
            return Err(ServiceError::new(
                Status::Expired,
                "this client's lease expired and its pages were reclaimed; open a new session",
            ));
        }
        let c = g
            .clients
            .get_mut(client)
            .ok_or_else(|| ServiceError::new(Status::NotFound, "unknown client: open a session (OPEN) first"))?;
        c.last_seen = Instant::now();
        Ok(c)
    }

    fn release(g: &mut Inner, slots: impl IntoIterator<Item = Slot>) -> u64 {
        let mut n = 0;
        for s in slots {
            g.slabs.free.push(s);
            n += 1;
        }
        g.used -= n;
        n
    }

    fn open(&self, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let (client, lease_ms) = proto::decode_open(req).map_err(bad)?;
        let lease = Duration::from_millis(u64::from(lease_ms)).clamp(MIN_LEASE, MAX_LEASE);
        let mut g = self.lock();
        g.expired.remove(&client);
        let c = g.clients.entry(client).or_insert_with(|| ClientState {
            pages: HashMap::new(),
            last_seen: Instant::now(),
            lease,
        });
        c.lease = lease;
        c.last_seen = Instant::now();
        self.state(&g, lease).encode(out);
        Ok(())
    }

    fn put(&self, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let b = proto::decode_batch("PUT", req, true).map_err(bad)?;
        let pages = b.pages.unwrap_or_default();
        let mut g = self.lock();
        let lease = {
            let c = Self::session(&mut g, &b.client)?;
            c.lease
        };
        let Inner { slabs, used, clients, .. } = &mut *g;
        let c = clients.get_mut(&b.client).ok_or_else(|| ServiceError::new(Status::NotFound, "unknown client"))?;
        let new = {
            let mut seen = std::collections::HashSet::new();
            pages.iter().filter(|p| !c.pages.contains_key(&(b.region, **p)) && seen.insert(**p)).count() as u64
        };
        if *used + new > self.capacity_pages {
            return Err(ServiceError::new(
                Status::Full,
                format!("server full: {used} of {} pages used, {new} more needed", self.capacity_pages),
            ));
        }
        for (p, src) in pages.iter().zip(b.data.chunks_exact(PAGE_SIZE)) {
            // Capacity was checked above, so every new slot is within it.
            let slot = *c.pages.entry((b.region, *p)).or_insert_with(|| {
                *used += 1;
                slabs.alloc()
            });
            slabs.page_mut(slot).0.copy_from_slice(src);
        }
        self.state(&g, lease).encode(out);
        Ok(())
    }

    fn get(&self, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let (client, region, page) = proto::decode_get(req).map_err(bad)?;
        let mut g = self.lock();
        let slot = Self::session(&mut g, &client)?.pages.get(&(region, page)).copied();
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

    fn free(&self, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let b = proto::decode_batch("FREE", req, false).map_err(bad)?;
        let mut g = self.lock();
        let c = Self::session(&mut g, &b.client)?;
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

    fn close(&self, req: &[u8], out: &mut Vec<u8>) -> Result<(), ServiceError> {
        let client = proto::decode_client("CLOSE", req).map_err(bad)?;
        let mut g = self.lock();
        Self::session(&mut g, &client)?;
        let n = match g.clients.remove(&client) {
            Some(c) => Self::release(&mut g, c.pages.into_values()),
            None => 0,
        };
        out.extend_from_slice(&n.to_le_bytes());
        Ok(())
    }

    /// Reclaims the pages of every client whose lease ran out; returns (clients, pages).
    pub fn reap(&self, now: Instant) -> (usize, u64) {
        let mut g = self.lock();
        let dead: Vec<ClientId> =
            g.clients.iter().filter(|(_, c)| now.duration_since(c.last_seen) > c.lease).map(|(id, _)| *id).collect();
        let mut pages = 0;
        for id in &dead {
            if let Some(c) = g.clients.remove(id) {
                pages += Self::release(&mut g, c.pages.into_values());
            }
            g.expired.insert(*id, now);
        }
        g.expired.retain(|_, at| now.duration_since(*at) < REMEMBER_EXPIRED);
        (dead.len(), pages)
    }

    /// The shortest lease of any live client (how often to reap), if any.
    fn shortest_lease(&self) -> Option<Duration> {
        self.lock().clients.values().map(|c| c.lease).min()
    }
}

impl Service for MemStore {
    fn call(&self, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        match method {
            proto::OPEN => self.open(request, response),
            proto::PUT => self.put(request, response),
            proto::GET => self.get(request, response),
            proto::FREE => self.free(request, response),
            proto::STAT => {
                let g = self.lock();
                self.state(&g, Duration::ZERO).encode(response);
                Ok(())
            }
            proto::RENEW => {
                let client = proto::decode_client("RENEW", request).map_err(bad)?;
                let mut g = self.lock();
                let lease = Self::session(&mut g, &client)?.lease;
                self.state(&g, lease).encode(response);
                Ok(())
            }
            proto::CLOSE => self.close(request, response),
            m => Err(ServiceError::new(Status::UnknownMethod, format!("no method {m}"))),
        }
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
            return Err(NetRamError::Config(format!(
                "a memory server needs at least one page ({PAGE_SIZE} bytes) of capacity, got {} bytes",
                cfg.capacity_bytes
            )));
        }
        let store = Arc::new(MemStore::new(capacity_pages));
        let scfg = ServerConfig::new(cfg.key).service(store.clone()).policy(cfg.policy);
        let server = listen(uri, scfg)
            .map_err(|e| NetRamError::Listen { uri: uri.to_string(), reason: mosaic_transport::error_chain(&e) })?;
        let stop = Arc::new(AtomicBool::new(false));
        let reaper = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::Builder::new()
                .name("mosaic-reaper".into())
                .spawn(move || reap_loop(&store, &stop))
                .map_err(|e| NetRamError::Config(format!("cannot start the lease reaper: {e}")))?
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
            store.shortest_lease().map_or(Duration::from_millis(200), |l| (l / 4).max(Duration::from_millis(10)));
        let mut slept = Duration::ZERO;
        while slept < every && !stop.load(Ordering::Acquire) {
            let step = Duration::from_millis(10).min(every - slept);
            std::thread::sleep(step);
            slept += step;
        }
        let (clients, pages) = store.reap(Instant::now());
        if clients > 0 {
            log::info!("reclaimed {pages} pages of {clients} client(s) whose lease expired");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ClientId = [1; 16];
    const B: ClientId = [2; 16];

    fn call(s: &Arc<MemStore>, m: u64, req: &[u8]) -> Result<Vec<u8>, ServiceError> {
        let mut out = Vec::new();
        s.call(m, req, &mut out).map(|()| out)
    }

    #[test]
    fn pages_are_stored_per_client_and_region() {
        let s = Arc::new(MemStore::new(1000));
        call(&s, proto::OPEN, &proto::encode_open(&A, 1000)).unwrap();
        call(&s, proto::OPEN, &proto::encode_open(&B, 1000)).unwrap();
        let p = [9u8; PAGE_SIZE];
        let st = ServerState::decode(&call(&s, proto::PUT, &proto::encode_put(&A, 1, &[(5, &p)])).unwrap()).unwrap();
        assert_eq!(st.free_pages, 999);
        assert_eq!(call(&s, proto::GET, &proto::encode_get(&A, 1, 5)).unwrap(), p.to_vec());
        // Another client, another region, another page: not found.
        for (c, r, pg) in [(B, 1, 5), (A, 2, 5), (A, 1, 6)] {
            let e = call(&s, proto::GET, &proto::encode_get(&c, r, pg)).unwrap_err();
            assert_eq!(e.status, Status::NotFound);
        }
        // Overwriting uses no new page.
        let q = [8u8; PAGE_SIZE];
        call(&s, proto::PUT, &proto::encode_put(&A, 1, &[(5, &q)])).unwrap();
        assert_eq!(s.stats().used_pages, 1);
        assert_eq!(call(&s, proto::GET, &proto::encode_get(&A, 1, 5)).unwrap(), q.to_vec());
        let freed = call(&s, proto::FREE, &proto::encode_free(&A, 1, None)).unwrap();
        assert_eq!(u64::from_le_bytes(freed.try_into().unwrap()), 1);
        assert_eq!(s.stats().used_pages, 0);
    }

    #[test]
    fn a_full_server_refuses_the_whole_batch() {
        let s = Arc::new(MemStore::new(3));
        call(&s, proto::OPEN, &proto::encode_open(&A, 1000)).unwrap();
        let p = [1u8; PAGE_SIZE];
        call(&s, proto::PUT, &proto::encode_put(&A, 1, &[(0, &p), (1, &p)])).unwrap();
        let e = call(&s, proto::PUT, &proto::encode_put(&A, 1, &[(2, &p), (3, &p)])).unwrap_err();
        assert_eq!(e.status, Status::Full, "{}", e.message);
        assert_eq!(s.stats().used_pages, 2, "nothing of the refused batch was stored");
        // Overwrites and the last free page still fit.
        call(&s, proto::PUT, &proto::encode_put(&A, 1, &[(0, &p), (2, &p)])).unwrap();
        assert_eq!(s.stats().used_pages, 3);
    }

    #[test]
    fn an_expired_lease_reclaims_pages_and_says_so() {
        let s = Arc::new(MemStore::new(100));
        call(&s, proto::OPEN, &proto::encode_open(&A, 100)).unwrap();
        let p = [1u8; PAGE_SIZE];
        call(&s, proto::PUT, &proto::encode_put(&A, 1, &[(0, &p), (1, &p)])).unwrap();
        assert_eq!(s.reap(Instant::now()), (0, 0));
        assert_eq!(s.reap(Instant::now() + Duration::from_secs(1)), (1, 2));
        assert_eq!(s.stats().used_pages, 0);
        let e = call(&s, proto::GET, &proto::encode_get(&A, 1, 0)).unwrap_err();
        assert_eq!(e.status, Status::Expired);
        // Reopening starts afresh.
        call(&s, proto::OPEN, &proto::encode_open(&A, 100)).unwrap();
        assert_eq!(call(&s, proto::GET, &proto::encode_get(&A, 1, 0)).unwrap_err().status, Status::NotFound);
    }

    #[test]
    fn unknown_clients_and_bad_requests_are_typed() {
        let s = Arc::new(MemStore::new(10));
        assert_eq!(call(&s, proto::GET, &proto::encode_get(&A, 1, 0)).unwrap_err().status, Status::NotFound);
        assert_eq!(call(&s, proto::PUT, b"short").unwrap_err().status, Status::BadRequest);
        assert_eq!(call(&s, 99, b"").unwrap_err().status, Status::UnknownMethod);
    }
}
