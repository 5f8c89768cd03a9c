//! The memory servers one region uses: connections, liveness, free space, where each slab goes
//! (power of two choices over free memory), fetching a page from whichever holder answers, and
//! storing batches of pages on every copy's server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use mosaic_transport::{connect, CallError, ClusterKey, ConnectOptions, Connection, Page, PagesInFlight, Status};

use crate::proto::{self, ClientId, Secret, ServerState, MAX_BATCH};
use crate::{ConfigError, NetRamError, ServerError, PAGE_SIZE};

/// Pages per slab: placement is decided per slab.
pub(crate) const SLAB_PAGES: u64 = 256;
/// At most this many servers per region (holder masks are 32 bits; the top bit is the local
/// backing file).
pub(crate) const MAX_SERVERS: usize = 31;
/// The holder bit of the local backing file.
pub(crate) const FILE_HOLDER: u32 = 1 << 31;

/// One memory server.
pub(crate) struct Member {
    pub(crate) uri: String,
    /// Faults' page reads: never queued behind a bulk write-back.
    conn: Connection,
    /// Write-backs, frees and session checks.
    bulk: Connection,
    free: AtomicU64,
    alive: AtomicBool,
    /// The server asks for its pages to go elsewhere (`proto`'s "Leaving").
    leaving: AtomicBool,
}

impl Member {
    pub(crate) fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Takes note of what the server said of itself.
    fn heard(&self, st: &ServerState) {
        self.free.store(st.free_pages, Ordering::Relaxed);
        if self.leaving.swap(st.leaving, Ordering::AcqRel) != st.leaving {
            if st.leaving {
                log::info!("memory server {} asks for its pages to go elsewhere", self.uri);
            } else {
                log::info!("memory server {} takes pages again", self.uri);
            }
        }
    }

    /// Whether pages may be placed here: alive and with room.
    fn has_room(&self) -> bool {
        self.alive() && self.free.load(Ordering::Relaxed) > 0
    }

    /// Whether new pages should be placed here: alive, with room, and not leaving.
    fn takes_pages(&self) -> bool {
        self.has_room() && !self.leaving.load(Ordering::Acquire)
    }
}

/// The servers of one region.
pub(crate) struct ServerSet {
    pub(crate) members: Vec<Member>,
    client: ClientId,
    /// Proves to a server that a connection belongs to `client` (see `proto`'s "Sessions").
    secret: Secret,
    grace_ms: u32,
    region: u64,
    copies: usize,
    placement: Mutex<HashMap<u64, Vec<usize>>>,
    rng: AtomicU64,
    /// Servers whose OPEN at connect time started a fresh session rather than resuming one.
    fresh: u32,
}

impl ServerSet {
    /// Connects to every server and opens a session on each, bound to both of its connections.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn connect(
        uris: &[String],
        key: &ClusterKey,
        client: ClientId,
        secret: Secret,
        region: u64,
        copies: usize,
        grace: Duration,
        timeout: Duration,
    ) -> Result<ServerSet, NetRamError> {
        if uris.is_empty() {
            return Err(ConfigError::NoServers.into());
        }
        if uris.len() > MAX_SERVERS {
            return Err(ConfigError::TooManyServers { max: MAX_SERVERS, got: uris.len() }.into());
        }
        if copies == 0 || copies > uris.len() {
            return Err(ConfigError::Copies { copies, servers: uris.len() }.into());
        }
        let grace_ms = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX);
        let opts = ConnectOptions::new(key.clone()).timeout(timeout);
        let mut members = Vec::new();
        let open = proto::encode_open(&client, grace_ms, &secret);
        let mut fresh = 0u32;
        for (k, uri) in uris.iter().enumerate() {
            let unreachable = |e: ServerError| NetRamError::Unreachable { uri: uri.clone(), source: e };
            let session = |conn: &Connection| {
                let st = conn.call(proto::OPEN, &open).map_err(|e| unreachable(e.into()))?;
                ServerState::decode(&st).map_err(|e| unreachable(e.into()))
            };
            let conn = connect(uri, &opts).map_err(|e| unreachable(e.into()))?;
            let st = session(&conn)?;
            if !st.resumed {
                fresh |= 1 << k;
            }
            let bulk = connect(uri, &opts).map_err(|e| unreachable(e.into()))?;
            session(&bulk)?;
            members.push(Member {
                uri: uri.clone(),
                conn,
                bulk,
                free: AtomicU64::new(st.free_pages),
                alive: AtomicBool::new(true),
                leaving: AtomicBool::new(st.leaving),
            });
        }
        let seed = u64::from_le_bytes(client[..8].try_into().unwrap_or_default()) | 1;
        Ok(ServerSet {
            members,
            client,
            secret,
            grace_ms,
            region,
            copies,
            placement: Mutex::new(HashMap::new()),
            rng: AtomicU64::new(seed),
            fresh,
        })
    }

    fn random(&self) -> u64 {
        // xorshift64*, shared: races only mix the sequence further.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn mark_dead(&self, i: usize, why: &str) {
        if self.members[i].alive.swap(false, Ordering::AcqRel) {
            log::error!("memory server {} is unreachable, using the remaining copies: {why}", self.members[i].uri);
        }
    }

    /// Picks one live server with room not in `exclude` by power of two choices over free
    /// memory; a leaving one only when no other has room (nothing is refused for leaving).
    fn choose(&self, exclude: &[usize]) -> Option<usize> {
        let pick = |ok: &dyn Fn(&Member) -> bool| -> Vec<usize> {
            (0..self.members.len()).filter(|i| !exclude.contains(i) && ok(&self.members[*i])).collect()
        };
        let mut live = pick(&Member::takes_pages);
        if live.is_empty() {
            live = pick(&Member::has_room);
        }
        match live.len() {
            0 => None,
            1 => Some(live[0]),
            n => {
                let pick = || usize::try_from(self.random() % n as u64).unwrap_or(0);
                let a = live[pick()];
                let mut b = live[pick()];
                if a == b {
                    b = live[(live.iter().position(|x| *x == a).unwrap_or(0) + 1) % n];
                }
                let free = |i: usize| self.members[i].free.load(Ordering::Relaxed);
                Some(if free(a) >= free(b) { a } else { b })
            }
        }
    }

    /// Every slab's placement (server indexes), for a region handed over to another process.
    pub(crate) fn placements(&self) -> Vec<(u64, Vec<usize>)> {
        let mut v: Vec<(u64, Vec<usize>)> = crate::lock(&self.placement).iter().map(|(k, v)| (*k, v.clone())).collect();
        v.sort_unstable();
        v
    }

    /// Takes over the placements of a region handed over (indexes into the same server list).
    pub(crate) fn set_placements(&self, placements: impl IntoIterator<Item = (u64, Vec<usize>)>) {
        crate::lock(&self.placement).extend(placements);
    }

    /// The servers that should hold slab `slab`'s copies: its placement, with dead, full or
    /// leaving members replaced.
    pub(crate) fn servers_for(&self, slab: u64) -> Vec<usize> {
        let mut p = crate::lock(&self.placement);
        let entry = p.entry(slab).or_default();
        // A leaving server stays in a placement only while there is no other with room.
        let others = self.members.iter().any(Member::takes_pages);
        entry.retain(|i| if others { self.members[*i].takes_pages() } else { self.members[*i].has_room() });
        while entry.len() < self.copies {
            match self.choose(entry) {
                Some(i) => entry.push(i),
                None => break,
            }
        }
        entry.clone()
    }

    /// Fetches page `page` into `dst` from one of the servers in `holders`. On failure, the
    /// servers that failed are cleared from the returned mask (`Err` carries what was tried).
    /// Reads `page` from the first live server of `holders` that returns it. On failure: the
    /// servers that failed, and the last one's error (none if every holder was down).
    pub(crate) fn fetch(
        &self,
        page: u64,
        holders: u32,
        dst: &mut Page,
    ) -> Result<(), (u32, Option<(String, CallError)>)> {
        let req = proto::encode_get(&self.client, self.region, page);
        let mut failed = 0u32;
        let mut last = None;
        for i in 0..self.members.len() {
            if holders & (1 << i) == 0 || !self.members[i].alive() {
                continue;
            }
            match self.members[i].conn.call_page(proto::GET, &req, dst) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    failed |= 1 << i;
                    self.note_failure(i, &e);
                    last = Some((self.members[i].uri.clone(), e));
                }
            }
        }
        Err((failed, last))
    }

    /// Fetches several pages with one batch of requests per server: `reqs[k]` is (page, holder
    /// mask), landing in `dsts[k]`. Returns which arrived. A batch that fails fails all of its
    /// pages (the caller retries what it needs one by one, with failover).
    pub(crate) fn fetch_many(&self, reqs: &[(u64, u32)], dsts: &mut [&mut Page]) -> Vec<bool> {
        let mut ok = vec![false; reqs.len()];
        let mut by_server: HashMap<usize, Vec<usize>> = HashMap::new();
        for (k, (_, holders)) in reqs.iter().enumerate() {
            if let Some(i) = self.live_holder(*holders) {
                by_server.entry(i).or_default().push(k);
            }
        }
        // Each destination is lent to exactly one server's batch.
        let mut slots: Vec<Option<&mut Page>> = dsts.iter_mut().map(|d| Some(&mut **d)).collect();
        for (server, ks) in by_server {
            let bodies: Vec<[u8; 32]> =
                ks.iter().map(|k| proto::encode_get(&self.client, self.region, reqs[*k].0)).collect();
            let mut calls: Vec<(&[u8], &mut Page)> =
                bodies.iter().zip(&ks).filter_map(|(b, k)| slots[*k].take().map(|d| (&b[..], d))).collect();
            match self.members[server].conn.call_pages(proto::GET, &mut calls) {
                Ok(()) => ks.iter().for_each(|k| ok[*k] = true),
                Err(e) => {
                    log::debug!("batched fetch from {}: {e}", self.members[server].uri);
                    self.note_failure(server, &e);
                }
            }
        }
        ok
    }

    /// The first live server in `holders`.
    pub(crate) fn live_holder(&self, holders: u32) -> Option<usize> {
        (0..self.members.len()).find(|i| holders & (1 << i) != 0 && self.members[*i].alive())
    }

    /// Sends GETs for `pages` to server `server` without waiting for the answers (see
    /// [`Connection::start_call_pages`]).
    pub(crate) fn start_fetch(&self, server: usize, pages: &[u64]) -> Result<PagesInFlight, CallError> {
        let bodies: Vec<[u8; 32]> = pages.iter().map(|p| proto::encode_get(&self.client, self.region, *p)).collect();
        let reqs: Vec<&[u8]> = bodies.iter().map(|b| &b[..]).collect();
        let m = &self.members[server];
        m.conn
            .start_call_pages(proto::GET, &reqs, Page::vec(pages.len()).into_boxed_slice())
            .inspect_err(|e| self.note_failure(server, e))
    }

    /// After a failed read from server `i`: it is dead unless the error is an answer (a refusal,
    /// or a response of the wrong size).
    fn note_failure(&self, i: usize, e: &CallError) {
        if !matches!(e, CallError::Remote { .. } | CallError::WrongSize { .. }) {
            self.mark_dead(i, &e.to_string());
        }
    }

    /// Stores each page on its slab's servers; returns, per page, the mask of servers that now
    /// hold it (0: none could).
    pub(crate) fn put(&self, pages: &[(u64, &[u8; PAGE_SIZE])]) -> Vec<u32> {
        let mut stored = vec![0u32; pages.len()];
        // Up to three placement rounds: a full or dead server is replaced and its pages retried.
        for _round in 0..3 {
            let mut by_server: HashMap<usize, Vec<usize>> = HashMap::new();
            for (k, (page, _)) in pages.iter().enumerate() {
                let have = stored[k].count_ones() as usize;
                if have >= self.copies {
                    continue;
                }
                let mut targets = self.servers_for(page / SLAB_PAGES);
                targets.retain(|t| stored[k] & (1 << t) == 0);
                for t in targets.into_iter().take(self.copies - have) {
                    by_server.entry(t).or_default().push(k);
                }
            }
            if by_server.is_empty() {
                break;
            }
            for (server, ks) in by_server {
                // A batch a full server refuses is split in halves and retried, so the room it
                // has left is used to the last page (a batch is refused whole).
                let mut todo: Vec<&[usize]> = ks.chunks(MAX_BATCH).rev().collect();
                while let Some(chunk) = todo.pop() {
                    let batch: Vec<(u64, &[u8; PAGE_SIZE])> = chunk.iter().map(|k| pages[*k]).collect();
                    let req = proto::encode_put(&self.client, self.region, &batch);
                    let m = &self.members[server];
                    match m.bulk.call(proto::PUT, &req) {
                        Ok(resp) => {
                            if let Ok(st) = ServerState::decode(&resp) {
                                m.heard(&st);
                            }
                            for k in chunk {
                                stored[*k] |= 1 << server;
                            }
                        }
                        Err(e) if e.status() == Some(Status::Full) && chunk.len() > 1 => {
                            let (a, b) = chunk.split_at(chunk.len() / 2);
                            todo.push(b);
                            todo.push(a);
                        }
                        Err(e) if e.status() == Some(Status::Full) => {
                            log::warn!("memory server {} is full: {e}", m.uri);
                            m.free.store(0, Ordering::Relaxed);
                            // Nothing more fits there this round.
                            todo.clear();
                        }
                        Err(e) => {
                            self.mark_dead(server, &e.to_string());
                            todo.clear();
                        }
                    }
                }
            }
        }
        stored
    }

    /// Frees each group of pages on the servers of its holder mask.
    pub(crate) fn free_stale(&self, stale: HashMap<u32, Vec<u64>>) {
        for (mask, pages) in stale {
            self.free(mask, &pages);
        }
    }

    /// Frees `pages` on the servers in `mask` (best effort: a copy nobody frees is reclaimed
    /// with the session).
    pub(crate) fn free(&self, mask: u32, pages: &[u64]) {
        for (i, m) in self.members.iter().enumerate() {
            if mask & (1 << i) == 0 || !m.alive() {
                continue;
            }
            for chunk in pages.chunks(MAX_BATCH) {
                if let Err(e) = m.bulk.call(proto::FREE, &proto::encode_free(&self.client, self.region, Some(chunk))) {
                    log::debug!("freeing pages on {}: {e}", m.uri);
                }
            }
        }
    }

    /// Checks the session on every live server and refreshes its free space. Returns the servers
    /// that answered but no longer know this client (its session was ended there, so every copy
    /// it held is gone); servers that do not answer are marked dead.
    pub(crate) fn check_sessions(&self) -> Vec<usize> {
        let mut lost = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if !m.alive() {
                continue;
            }
            match m.bulk.call(proto::RENEW, &self.client) {
                Ok(resp) => {
                    if let Ok(st) = ServerState::decode(&resp) {
                        m.heard(&st);
                    }
                }
                Err(e) if matches!(e.status(), Some(Status::NotFound | Status::Forbidden | Status::Expired)) => {
                    log::error!("memory server {} lost this region's session: {e}", m.uri);
                    lost.push(i);
                }
                Err(e) if e.status().is_some() => log::warn!("memory server {}: session check: {e}", m.uri),
                Err(e) => self.mark_dead(i, &e.to_string()),
            }
        }
        lost
    }

    /// Opens the session on server `i` again, on both connections (after it lost it); on
    /// failure the server is marked dead.
    pub(crate) fn reopen(&self, i: usize) {
        let m = &self.members[i];
        let open = proto::encode_open(&self.client, self.grace_ms, &self.secret);
        for conn in [&m.conn, &m.bulk] {
            match conn
                .call(proto::OPEN, &open)
                .map_err(|e| e.to_string())
                .and_then(|r| ServerState::decode(&r).map_err(|e| e.to_string()))
            {
                Ok(st) => m.heard(&st),
                Err(e) => return self.mark_dead(i, &format!("re-opening the session: {e}")),
            }
        }
    }

    /// The region's number on the servers.
    pub(crate) fn region_id(&self) -> u64 {
        self.region
    }

    /// Servers whose session was new when this set connected (none of a session resumed, say a
    /// forked child's clone, is there).
    pub(crate) fn fresh_mask(&self) -> u32 {
        self.fresh
    }

    /// Clones this session on every live server into a new detached session `child` (see
    /// `proto`'s "Clones") that waits `grace` (this session's own grace time if `None`) for the
    /// child to attach; returns the mask of servers that did. A server that refuses is logged
    /// and left out: the child has no copy there.
    pub(crate) fn clone_session(&self, child: &ClientId, secret: &Secret, grace: Option<Duration>) -> u32 {
        let grace_ms = grace.map_or(self.grace_ms, |g| u32::try_from(g.as_millis()).unwrap_or(u32::MAX));
        let req = proto::encode_clone(&self.client, child, grace_ms, secret);
        let mut done = 0;
        for (i, m) in self.members.iter().enumerate() {
            if !m.alive() {
                continue;
            }
            match m.bulk.call(proto::CLONE, &req) {
                Ok(_) => done |= 1 << i,
                Err(e) => log::error!("memory server {} could not clone this region's pages for a child: {e}", m.uri),
            }
        }
        done
    }

    /// Moves this session, on every live server, to the new detached session `to` with
    /// `secret`, which waits `grace` for its taker (see `proto`'s "Transfers"); returns the
    /// mask of servers that did. This set's connections lose the session there.
    pub(crate) fn transfer_session(&self, to: &ClientId, secret: &Secret, grace: Duration) -> u32 {
        let grace_ms = u32::try_from(grace.as_millis()).unwrap_or(u32::MAX);
        let req = proto::encode_clone(&self.client, to, grace_ms, secret);
        let mut done = 0;
        for (i, m) in self.members.iter().enumerate().filter(|(_, m)| m.alive()) {
            match m.bulk.call(proto::TRANSFER, &req) {
                Ok(_) => done |= 1 << i,
                Err(e) => log::error!("memory server {} could not hand this region's pages over: {e}", m.uri),
            }
        }
        done
    }

    /// Takes back, on the servers of `mask`, the session [`transfer_session`] moved to `from`:
    /// attaches to it with its secret, moves it back under this set's name, and binds this
    /// set's connections to it again. Connections of a taker that attached lose it.
    ///
    /// [`transfer_session`]: ServerSet::transfer_session
    pub(crate) fn take_back(&self, mask: u32, from: &ClientId, secret: &Secret) {
        let open_from = proto::encode_open(from, self.grace_ms, secret);
        let back = proto::encode_clone(from, &self.client, self.grace_ms, &self.secret);
        let open_own = proto::encode_open(&self.client, self.grace_ms, &self.secret);
        for (i, m) in self.members.iter().enumerate().filter(|(i, m)| mask & (1 << i) != 0 && m.alive()) {
            let r = m
                .bulk
                .call(proto::OPEN, &open_from)
                .and_then(|_| m.bulk.call(proto::TRANSFER, &back))
                .and_then(|_| m.bulk.call(proto::OPEN, &open_own))
                .and_then(|_| m.conn.call(proto::OPEN, &open_own));
            if let Err(e) = r {
                log::error!("memory server {}: cannot take this region's pages back: {e}", m.uri);
                self.mark_dead(i, "its pages could not be taken back after a hand-over");
            }
        }
    }

    /// Ends the session on every live server, freeing what it holds there.
    pub(crate) fn close(&self) {
        for m in &self.members {
            if m.alive() {
                let _ = m.conn.call(proto::CLOSE, &self.client);
            }
        }
    }

    /// The copies wanted per page.
    pub(crate) fn copies(&self) -> usize {
        self.copies
    }

    /// Marks dead the servers whose connections have hung up (the process died), without
    /// sending anything; returns the live mask after.
    pub(crate) fn notice_hang_ups(&self) -> u32 {
        for (i, m) in self.members.iter().enumerate() {
            if m.alive() && (m.conn.peer_hung_up() || m.bulk.peer_hung_up()) {
                self.mark_dead(i, "the server hung up");
            }
        }
        self.live_mask()
    }

    /// Live servers that had free room when last heard from, and are not leaving.
    pub(crate) fn with_room(&self) -> usize {
        self.members.iter().filter(|m| m.takes_pages()).count()
    }

    /// Mask of the live servers that ask for their pages to go elsewhere.
    pub(crate) fn leaving_mask(&self) -> u32 {
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.alive() && m.leaving.load(Ordering::Acquire))
            .fold(0, |acc, (i, _)| acc | 1 << i)
    }

    /// Mask of the live servers.
    pub(crate) fn live_mask(&self) -> u32 {
        self.members.iter().enumerate().filter(|(_, m)| m.alive()).fold(0, |acc, (i, _)| acc | 1 << i)
    }
}
