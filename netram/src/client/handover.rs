//! A region handed over to another process, on this host or another: only its table moves.
//!
//! ```text
//!  source   hand_over: write back every dirty page and drop every resident one (batches of
//!           eviction, to the end), close the gate (no eviction, rebuild or session check
//!           runs), TRANSFER the session on every live server to a new name and secret (the
//!           server renames it: nothing is copied, whatever the size), describe the table:
//!           each page Absent, Remote (with its holders) or Lost, the slabs' placement, the
//!           session's new name and secret
//!  taker    take_over: attach to the session with its secret, map the region at the same
//!           address, every page Remote/Absent/Lost as described: pages come in on touch
//!  source   dropped once the taker has the region, or resume_after_hand_over if nobody took
//!           it (the session is transferred back; a taker that attached anyway loses it)
//! ```
//! Why nothing is lost: after the write-back every page's current contents are on the servers
//! (Remote) or zeros (Absent); the transferred session holds exactly those copies, and the
//! source's connections no longer reach it, so a source that dies (or goes on) changes nothing
//! of it. What crosses besides the table: no page. The threads using the region must be stopped before [`NetRam::hand_over`] (a write
//! after it would stay at the source); a page touched meanwhile makes the hand-over fail.

use std::sync::atomic::Ordering;
use std::time::Duration;

use mosaic_transport::ClusterKey;

use super::fork::{inherited, CLOSE_WAIT};
use super::lifecycle::Round;
use super::{MapAt, NetRam, NetRamConfig, Shared};
use crate::pages::PageState::{self, Absent, Lost, Remote};
use crate::pages::PageTable;
use crate::proto::{err, ClientId, ProtoError, Reader, Secret, SECRET_LEN};
use crate::servers::{ServerSet, MAX_SERVERS, SLAB_PAGES};
use crate::{ConfigError, NetRamError, PAGE_SIZE};

/// How long the servers keep the handed-over pages for a taker that has not attached yet.
pub const HAND_OVER_GRACE: Duration = Duration::from_secs(120);
/// Pages written back and dropped per step of a hand-over.
const HAND_OVER_BATCH: usize = 1024;
/// The encoding's first bytes, and its version.
const MAGIC: &[u8; 4] = b"MNH1";
/// The user address space of x86-64 (47 bits): nothing is described beyond it.
const USER_END: u64 = 1 << 47;
/// The largest region a hand-over describes: 2^30 pages (4 TiB), whose table takes about
/// 6 GiB at the taker (a description claiming more is refused before anything is allocated).
const MAX_PAGES: u64 = 1 << 30;

/// Why a region could not be handed over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandOverError {
    /// A region with a local backing file (the file stays on this host).
    #[error("a region with a backing file cannot be handed over (the file stays on this host)")]
    BackingFile,
    /// Pages stayed resident: they could not be written back (the servers are full or down).
    #[error("{pages} resident page(s) could not be written back to the memory servers")]
    NotWrittenBack {
        /// How many.
        pages: u64,
    },
    /// A thread touched the region during the hand-over (the caller must stop them first).
    #[error("page {page} was touched during the hand-over (stop the threads using the region first)")]
    Touched {
        /// The first such page.
        page: u64,
    },
    /// The servers could not hand every page with data over (a server holding them failed).
    #[error("{pages} page(s) with data are on no memory server that could hand them over")]
    NotTransferred {
        /// How many (0: no server could at all).
        pages: u64,
    },
    /// The taker cannot read pages with data: the servers holding them no longer have the
    /// session (the taker came later than the hand-over's grace time, the source took the
    /// region back, or a server restarted).
    #[error("{pages} page(s) with data are on no server that still holds the handed-over session (taken back, or taken over too late?)")]
    SessionLost {
        /// How many.
        pages: u64,
    },
    /// The background work did not pause in time.
    #[error("the region's background work did not pause within {waited:?}")]
    Pause {
        /// How long it was given.
        waited: Duration,
    },
    /// A description that does not parse or describes no possible region.
    #[error(transparent)]
    Malformed(#[from] ProtoError),
}

/// What a region's taker needs: its place, its servers, the session holding its pages and
/// the state of every page. [`encode`](HandOver::encode) it to send it, [`NetRam::take_over`]
/// in the other process.
///
/// It holds the secret of the session that holds the pages: whoever has it can read them. Send it only over an authenticated link.
#[derive(Clone, PartialEq, Eq)]
pub struct HandOver {
    addr: u64,
    pages: u64,
    region: u64,
    client: ClientId,
    secret: Secret,
    copies: u8,
    /// Servers that transferred the session.
    transferred: u32,
    /// Pages written back to the servers by the hand-over.
    written_back: u64,
    servers: Vec<String>,
    /// Runs of pages: (count, state, holders).
    runs: Vec<(u64, PageState, u32)>,
    /// Each slab's servers.
    placements: Vec<(u64, Vec<usize>)>,
}

impl std::fmt::Debug for HandOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandOver")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("pages", &self.pages)
            .field("servers", &self.servers)
            .field("runs", &self.runs.len())
            .field("written_back", &self.written_back)
            .finish_non_exhaustive()
    }
}

impl HandOver {
    /// The region's address (the same in both processes).
    pub fn addr(&self) -> usize {
        usize::try_from(self.addr).unwrap_or(usize::MAX)
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        usize::try_from(self.pages).unwrap_or(usize::MAX / PAGE_SIZE) * PAGE_SIZE
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memory servers holding its pages.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// Pages with data on the servers (the rest read as zeros, or are lost).
    pub fn remote_pages(&self) -> u64 {
        self.runs.iter().filter(|r| r.1 == Remote).map(|r| r.0).sum()
    }

    /// Pages the hand-over wrote back to the servers (the dirty resident ones).
    pub fn written_back(&self) -> u64 {
        self.written_back
    }

    /// The encoding (little-endian; see the module's source for the layout).
    // Server counts and indexes are below MAX_SERVERS (31), URIs are cut to u16::MAX bytes.
    #[allow(clippy::cast_possible_truncation)]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + self.runs.len() * 3 + self.placements.len() * 4);
        b.extend_from_slice(MAGIC);
        for w in [self.addr, self.pages, self.region, self.written_back] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&self.client);
        b.extend_from_slice(&self.secret);
        b.push(self.copies);
        b.extend_from_slice(&self.transferred.to_le_bytes());
        b.push(self.servers.len() as u8); // at most MAX_SERVERS
        for s in &self.servers {
            let bytes = &s.as_bytes()[..s.len().min(u16::MAX.into())];
            b.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            b.extend_from_slice(bytes);
        }
        // Runs as (length, class) varints, a class being one of the distinct (state, holders)
        // pairs listed first: about two bytes a run.
        let mut classes: Vec<(PageState, u32)> = Vec::new();
        let mut coded = Vec::with_capacity(self.runs.len() * 2);
        for &(count, state, holders) in &self.runs {
            let class = classes.iter().position(|c| *c == (state, holders)).unwrap_or_else(|| {
                classes.push((state, holders));
                classes.len() - 1
            });
            put_varint(&mut coded, count);
            put_varint(&mut coded, class as u64);
        }
        put_varint(&mut b, classes.len() as u64);
        for (state, holders) in classes {
            b.push(state as u8);
            b.extend_from_slice(&holders.to_le_bytes());
        }
        put_varint(&mut b, self.runs.len() as u64);
        b.extend_from_slice(&coded);
        // Placements by slab, in order: the gap from the previous slab, then the servers.
        put_varint(&mut b, self.placements.len() as u64);
        let mut last = 0;
        for (slab, servers) in &self.placements {
            put_varint(&mut b, slab - last);
            last = *slab;
            b.push(servers.len() as u8);
            b.extend(servers.iter().map(|&i| i as u8));
        }
        b
    }

    /// Decodes one, checking that it describes a possible region: page-aligned and inside the
    /// address space, runs covering it exactly, holders and placements among its servers.
    pub fn decode(buf: &[u8]) -> Result<HandOver, HandOverError> {
        const WHAT: &str = "hand-over";
        let bad = |why: String| HandOverError::Malformed(err(WHAT, why));
        let mut r = Reader { what: WHAT, buf };
        if r.take(4)? != MAGIC {
            return Err(bad("not a hand-over of this version".into()));
        }
        let (addr, pages, region, written_back) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        if addr % PAGE_SIZE as u64 != 0
            || pages == 0
            || pages > MAX_PAGES
            || pages.checked_mul(PAGE_SIZE as u64).and_then(|l| l.checked_add(addr)).is_none_or(|e| e > USER_END)
        {
            return Err(bad(format!("{pages} pages at {addr:#x} is not a region of the address space")));
        }
        let client = r.client()?;
        let secret: Secret = r.take(SECRET_LEN)?.try_into().unwrap_or([0; SECRET_LEN]);
        let (copies, transferred) = (r.u8()?, r.u32()?);
        let n = usize::from(r.u8()?);
        if n == 0 || n > MAX_SERVERS || usize::from(copies) == 0 || usize::from(copies) > n {
            return Err(bad(format!("{n} servers and {copies} copies")));
        }
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            let len = usize::from(r.u16()?);
            let uri = std::str::from_utf8(r.take(len)?).map_err(|_| bad("a server URI that is not UTF-8".into()))?;
            servers.push(uri.to_string());
        }
        let members = (1u32 << n) - 1;
        let nclasses = varint(&mut r)?;
        // Each class takes 5 bytes, each run at least 2, each placement at least 2: a count the
        // buffer cannot hold is refused before anything is allocated for it.
        if nclasses > (r.buf.len() / 5) as u64 {
            return Err(bad(format!("{nclasses} classes of runs in {} bytes", r.buf.len())));
        }
        let mut classes = Vec::new();
        for _ in 0..nclasses {
            let (state, holders) = (r.u8()?, r.u32()?);
            let state = match state {
                0 => Absent,
                1 => Remote,
                7 => Lost,
                s => return Err(bad(format!("page state {s} (only absent, remote or lost can be handed over)"))),
            };
            if holders & !members != 0 || (state == Remote) != (holders != 0) {
                return Err(bad(format!("{state:?} pages held by {holders:#x}")));
            }
            classes.push((state, holders));
        }
        let count = varint(&mut r)?;
        if count > (r.buf.len() / 2) as u64 {
            return Err(bad(format!("{count} runs in {} bytes", r.buf.len())));
        }
        let mut runs = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        let mut covered = 0u64;
        for _ in 0..count {
            let (len, class) = (varint(&mut r)?, varint(&mut r)?);
            let &(state, holders) = usize::try_from(class)
                .ok()
                .and_then(|c| classes.get(c))
                .ok_or_else(|| bad(format!("run class {class} of {nclasses}")))?;
            if len == 0 {
                return Err(bad("a run of no pages".into()));
            }
            covered =
                covered.checked_add(len).filter(|c| *c <= pages).ok_or_else(|| bad("runs beyond the region".into()))?;
            runs.push((len, state, holders));
        }
        if covered != pages {
            return Err(bad(format!("runs cover {covered} of {pages} pages")));
        }
        let count = varint(&mut r)?;
        if count > (r.buf.len() / 2) as u64 {
            return Err(bad(format!("{count} placements in {} bytes", r.buf.len())));
        }
        let mut placements = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        let mut slab = 0u64;
        for k in 0..count {
            let gap = varint(&mut r)?;
            if k > 0 && gap == 0 {
                return Err(bad(format!("slab {slab} placed twice")));
            }
            slab = slab
                .checked_add(gap)
                .filter(|s| *s <= (pages - 1) / SLAB_PAGES)
                .ok_or_else(|| bad("a slab beyond the region".into()))?;
            let m = usize::from(r.u8()?);
            let idx: Vec<usize> = r.take(m)?.iter().map(|&i| usize::from(i)).collect();
            let distinct = idx.iter().enumerate().all(|(k, i)| !idx[..k].contains(i));
            if m > n || !distinct || idx.iter().any(|&i| i >= n) {
                return Err(bad(format!("slab {slab} placed on servers {idx:?}")));
            }
            placements.push((slab, idx));
        }
        r.end()?;
        Ok(HandOver {
            addr,
            pages,
            region,
            client,
            secret,
            copies,
            transferred,
            written_back,
            servers,
            runs,
            placements,
        })
    }
}

/// Appends `v` as a LEB128 varint.
#[allow(clippy::cast_possible_truncation)] // seven bits at a time, masked
fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

/// Reads a LEB128 varint of at most ten bytes.
fn varint(r: &mut Reader<'_>) -> Result<u64, ProtoError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = r.u8()?;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(err(r.what, "a varint beyond 64 bits"));
        }
        v |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(err(r.what, "a varint beyond 64 bits"))
}

impl NetRam {
    /// Hands the region over to another process (see the module's documentation): writes back
    /// its dirty pages, drops its resident ones, pauses its background work and has the servers
    /// move its session, pages and all, to a new name and secret for the taker
    /// ([`NetRam::take_over`]), which must attach within [`HAND_OVER_GRACE`]. Stop every thread using the region first. The
    /// taker maps the region at the same address: create it at an address the taker can map
    /// ([`NetRamConfig::fixed_addr`]).
    ///
    /// Afterwards, drop this region once the taker has it (its connections go; the pages are
    /// the taker's), or call [`resume_after_hand_over`](NetRam::resume_after_hand_over) to go on
    /// here. On error nothing was handed over and the region works on here.
    pub fn hand_over(&self) -> Result<HandOver, NetRamError> {
        let s = &self.shared;
        if s.file.is_some() {
            return Err(HandOverError::BackingFile.into());
        }
        let written_before = s.stats.written_back.load(Ordering::Relaxed);
        let t = std::time::Instant::now();
        // A window requested ahead of a strided stream holds its pages (Fetching): they are
        // remote again once it is given up.
        s.give_up_ahead();
        s.write_back_all(self.region());
        let wrote = t.elapsed();
        let resident = s.resident.load(Ordering::Acquire);
        if resident > 0 {
            return Err(HandOverError::NotWrittenBack { pages: resident }.into());
        }
        if !s.fork_gate.close(CLOSE_WAIT) {
            return Err(HandOverError::Pause { waited: CLOSE_WAIT }.into());
        }
        let handed = s.store_orphans().and_then(|()| s.describe()).and_then(|runs| {
            let (mut client, mut secret) = ([0u8; 16], [0u8; SECRET_LEN]);
            getrandom::fill(&mut client).and_then(|()| getrandom::fill(&mut secret)).map_err(NetRamError::Random)?;
            let described = t.elapsed();
            let transferred = s.servers.transfer_session(&client, &secret, HAND_OVER_GRACE);
            log::debug!(
                "region {}: handed over: written back in {wrote:?}, described by {described:?}, transferred by {:?}",
                s.name,
                t.elapsed()
            );
            // Every page with data must have a copy on a server that transferred.
            let stranded: u64 = runs.iter().filter(|r| r.1 == Remote && r.2 & transferred == 0).map(|r| r.0).sum();
            if transferred == 0 || stranded > 0 {
                s.servers.take_back(transferred, &client, &secret);
                return Err(HandOverError::NotTransferred { pages: stranded }.into());
            }
            Ok(HandOver {
                addr: self.as_ptr() as u64,
                pages: s.table.len(),
                region: s.servers.region_id(),
                client,
                secret,
                copies: u8::try_from(s.servers.copies()).unwrap_or(u8::MAX),
                transferred,
                written_back: s.stats.written_back.load(Ordering::Relaxed) - written_before,
                servers: s.servers.members.iter().map(|m| m.uri.clone()).collect(),
                runs,
                placements: s.servers.placements(),
            }
            .only_transferred())
        });
        if handed.is_err() {
            s.fork_gate.open();
        }
        handed
    }

    /// Goes on using a region whose hand-over `h` nobody took: the session is taken back from
    /// the name it was handed over under (a taker that attached anyway loses it: its pages
    /// fault as SIGBUS, never two diverging copies), then the background work resumes; pages
    /// come back on touch.
    pub fn resume_after_hand_over(&self, h: &HandOver) {
        self.shared.servers.take_back(h.transferred, &h.client, &h.secret);
        self.shared.fork_gate.open();
    }

    /// Takes over a region another process handed over: maps it at the same address, attached
    /// to the session holding its pages. `cfg` says how the region runs here (key, resident
    /// budget, fault mode, time-outs, prefetch, victim cache); its servers, size, copies and
    /// address are the hand-over's ([`HandOver::config`] makes one). Pages come in on touch.
    ///
    /// Fails, ending nothing, if a page with data has no copy this process can read (a server
    /// lost the session: the taker came later than [`HAND_OVER_GRACE`], the source took it
    /// back, or the server restarted): what is left stays for the source to take back.
    pub fn take_over(h: &HandOver, mut cfg: NetRamConfig) -> Result<NetRam, NetRamError> {
        cfg.servers.clone_from(&h.servers);
        cfg.size = h.pages * PAGE_SIZE as u64;
        cfg.copies = usize::from(h.copies);
        cfg.fixed_addr = Some(h.addr());
        if cfg.backing_file.is_some() {
            return Err(HandOverError::BackingFile.into());
        }
        let budget = cfg.resident_budget / PAGE_SIZE as u64;
        if budget < super::MIN_BUDGET_PAGES {
            return Err(
                ConfigError::BudgetTooSmall { bytes: cfg.resident_budget, min_pages: super::MIN_BUDGET_PAGES }.into()
            );
        }
        let servers = ServerSet::connect(
            &cfg.servers,
            &cfg.key,
            h.client,
            h.secret,
            h.region,
            cfg.copies,
            cfg.grace,
            cfg.timeout,
        )?;
        let usable = h.transferred & !servers.fresh_mask();
        let lost: u64 = h.runs.iter().filter(|r| r.1 == Remote && r.2 & usable == 0).map(|r| r.0).sum();
        if lost > 0 {
            // Dropping the set closes its connections and ends no session: the source can
            // still take back what the servers hold.
            return Err(HandOverError::SessionLost { pages: lost }.into());
        }
        servers.set_placements(h.placements.iter().cloned());
        let table = PageTable::new(h.pages);
        let mut at = 0u64;
        for &(count, state, holders) in &h.runs {
            let (now, kept) = inherited(state, holders, usable);
            if now != Absent {
                for i in at..at + count {
                    table.set(i, now);
                    table.set_holders(i, kept);
                }
            }
            at += count;
        }
        let shared = Shared::new(&cfg, servers, table, budget, None);
        // Copies short of `copies` (a server that did not transfer) are made again.
        shared.rebuild_wanted.store(true, Ordering::Release);
        NetRam::start(cfg, shared, MapAt::Fixed(h.addr()))
    }
}

impl NetRam {
    /// Lets go of a region taken over whose commit the source refused (it took the region
    /// back): unmaps it here without ending its session on the servers, which the source takes
    /// back.
    pub fn give_back(self) {
        self.shared.keep_session.store(true, Ordering::Release);
    }
}

impl HandOver {
    /// The same hand-over naming only the servers that transferred the session (a server that
    /// failed is left out, so the taker does not need it): holders, placements and the copies
    /// wanted renumbered to match.
    fn only_transferred(mut self) -> HandOver {
        let n = self.servers.len();
        let kept: Vec<usize> = (0..n).filter(|i| self.transferred & (1 << i) != 0).collect();
        if kept.len() == n {
            return self;
        }
        let remap = |mask: u32| {
            kept.iter().enumerate().filter(|(_, &old)| mask & (1 << old) != 0).fold(0u32, |m, (new, _)| m | 1 << new)
        };
        for r in &mut self.runs {
            r.2 = remap(r.2);
        }
        for (_, servers) in &mut self.placements {
            *servers = servers.iter().filter_map(|old| kept.iter().position(|k| k == old)).collect();
        }
        self.servers = kept.iter().map(|&i| self.servers[i].clone()).collect();
        self.transferred = (1u32 << kept.len()) - 1;
        self.copies = self.copies.min(u8::try_from(kept.len()).unwrap_or(u8::MAX));
        self
    }

    /// A configuration to take this region over with ([`NetRam::take_over`]): the defaults of
    /// [`NetRamConfig::new`] with `key` and `resident_budget`; change what should differ.
    pub fn config(&self, key: ClusterKey, resident_budget: u64) -> NetRamConfig {
        let mut cfg = NetRamConfig::new(self.servers.clone(), key, self.pages * PAGE_SIZE as u64, resident_budget);
        cfg.copies = usize::from(self.copies);
        cfg.name = "taken over".into();
        cfg
    }
}

impl Shared {
    /// Writes back every dirty page and drops every resident page: batches of eviction until
    /// the queue is empty or no batch makes progress. The region's threads are stopped, so the
    /// batches are large (a server call carries up to `MAX_BATCH` pages), not the evictor's
    /// small steps that let faults through between them.
    fn write_back_all(&self, core: &mosaic_pager::RegionCore) {
        // Pages taken since the last batch that made progress: a page marked hot goes back to
        // the queue once (its second chance), so only two whole passes without progress mean
        // that nothing more can go (every server full, say).
        let mut idle = 0usize;
        while self.resident.load(Ordering::Acquire) > 0 {
            // The gate, then the round: the order the evictor takes them in.
            let _gate = self.fork_gate.enter();
            let _round = crate::lock(&self.evicting);
            let (batch, queued): (Vec<u64>, usize) = {
                let mut q = crate::lock(&self.queue);
                let n = q.len().min(HAND_OVER_BATCH);
                (q.drain(..n).collect(), q.len())
            };
            if batch.is_empty() || idle > 2 * (queued + batch.len()) {
                break;
            }
            idle = if self.evict_batch(core, &batch, Round::All) == 0 { idle + batch.len() } else { 0 };
        }
    }

    /// Pages remote in the books with no holder left (their server lost the session, or a
    /// rebuild could not store them): stored again from the victim cache where it has them,
    /// marked lost where nothing has them (as a fault here would find). The gate is closed.
    fn store_orphans(&self) -> Result<(), NetRamError> {
        let orphans: Vec<u64> = (0..self.table.len())
            .filter(|&i| self.table.get(i) == Remote && self.table.holders(i) & !crate::servers::FILE_HOLDER == 0)
            .collect();
        let mut lost = 0u64;
        for i in orphans {
            let Some(copy) = self.victims.take(i) else {
                self.table.set(i, Lost);
                lost += 1;
                continue;
            };
            let mask = self.servers.put(&[(i, &*copy)]).first().copied().unwrap_or(0);
            if mask == 0 {
                self.victims.insert_all([(i, copy)]);
                return Err(HandOverError::NotWrittenBack { pages: 1 }.into());
            }
            self.table.set_holders(i, mask);
        }
        if lost > 0 {
            log::error!("region {}: {lost} page(s) had no copy left anywhere: they are handed over lost", self.name);
        }
        Ok(())
    }

    /// The table as runs of (count, state, holders), if every page is absent, remote or lost.
    fn describe(&self) -> Result<Vec<(u64, PageState, u32)>, NetRamError> {
        let mut runs: Vec<(u64, PageState, u32)> = Vec::new();
        for i in 0..self.table.len() {
            let state = self.table.get(i);
            if !matches!(state, Absent | Remote | Lost) {
                return Err(HandOverError::Touched { page: i }.into());
            }
            let holders = if state == Remote { self.table.holders(i) & !crate::servers::FILE_HOLDER } else { 0 };
            match runs.last_mut() {
                Some(r) if r.1 == state && r.2 == holders => r.0 += 1,
                _ => runs.push((1, state, holders)),
            }
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HandOver {
        HandOver {
            addr: 0x6000_0000_0000,
            pages: 1000,
            region: 7,
            client: [3; 16],
            secret: [9; SECRET_LEN],
            copies: 2,
            transferred: 0b11,
            written_back: 12,
            servers: vec!["tcp://127.0.0.1:1".into(), "shm:///x".into()],
            runs: vec![(10, Absent, 0), (500, Remote, 0b11), (1, Lost, 0), (489, Remote, 0b01)],
            placements: vec![(0, vec![0, 1]), (3, vec![1])],
        }
    }

    #[test]
    fn a_hand_over_round_trips_and_every_cut_or_bent_encoding_is_refused() {
        let h = sample();
        let b = h.encode();
        assert_eq!(HandOver::decode(&b).unwrap(), h);
        assert_eq!((h.remote_pages(), h.len()), (989, 1000 * PAGE_SIZE));
        for cut in 0..b.len() {
            assert!(HandOver::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(HandOver::decode(&longer).is_err());
        let bent = |f: &dyn Fn(&mut HandOver)| {
            let mut h = sample();
            f(&mut h);
            HandOver::decode(&h.encode()).map(|_| ()).map_err(|e| e.to_string())
        };
        for (what, f) in [
            ("unaligned", &(|h: &mut HandOver| h.addr += 1) as &dyn Fn(&mut HandOver)),
            ("beyond the address space", &|h| h.addr = USER_END - 4096),
            ("runs short", &|h| h.runs[0].0 = 9),
            ("runs long", &|h| h.runs[0].0 = 11),
            ("remote without holders", &|h| h.runs[1].2 = 0),
            ("absent with holders", &|h| h.runs[0].2 = 1),
            ("a holder that is no server", &|h| h.runs[1].2 = 0b100),
            ("more copies than servers", &|h| h.copies = 3),
            ("no copies", &|h| h.copies = 0),
            ("a placement on no server", &|h| h.placements[0].1 = vec![2]),
            ("a slab beyond the region", &|h| h.placements[1].0 = 4),
            ("a slab placed twice", &|h| h.placements[1].0 = 0),
            ("a slab on one server twice", &|h| h.placements[0].1 = vec![1, 1]),
            ("more pages than a hand-over takes", &|h| {
                h.pages = MAX_PAGES + 1;
                h.runs[3].0 += MAX_PAGES + 1 - 1000;
            }),
            ("a resident page", &|h| h.runs[2].1 = PageState::Dirty),
        ] {
            assert!(bent(f).is_err(), "{what} was accepted");
        }
        let mut b = h.encode();
        b[0] = b'X';
        assert!(HandOver::decode(&b).unwrap_err().to_string().contains("version"));
    }

    #[test]
    fn a_server_that_did_not_transfer_is_left_out_and_the_rest_renumbered() {
        let mut h = sample();
        h.servers.push("tcp://127.0.0.1:3".into());
        h.runs = vec![(10, Absent, 0), (500, Remote, 0b101), (1, Lost, 0), (489, Remote, 0b100)];
        h.placements = vec![(0, vec![0, 2]), (3, vec![1, 2])];
        h.transferred = 0b101;
        let h = h.only_transferred();
        assert_eq!(h.servers, ["tcp://127.0.0.1:1", "tcp://127.0.0.1:3"]);
        assert_eq!(h.runs, [(10, Absent, 0), (500, Remote, 0b11), (1, Lost, 0), (489, Remote, 0b10)]);
        assert_eq!(h.placements, [(0, vec![0, 1]), (3, vec![1])]);
        assert_eq!((h.transferred, h.copies), (0b11, 2));
        assert_eq!(HandOver::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn a_run_count_larger_than_the_buffer_is_refused_before_allocating() {
        let mut h = sample();
        h.placements.clear();
        let b = h.encode();
        // The tail: the runs' count (one byte here), the runs, no placements (one byte).
        let mut runs = Vec::new();
        for (k, r) in h.runs.iter().enumerate() {
            put_varint(&mut runs, r.0);
            put_varint(&mut runs, k as u64);
        }
        let tail = 1 + runs.len() + 1;
        let mut bent = b[..b.len() - tail].to_vec();
        put_varint(&mut bent, u64::MAX);
        bent.extend_from_slice(&b[b.len() - tail + 1..]);
        assert!(HandOver::decode(&bent).unwrap_err().to_string().contains("runs in"), "{:?}", HandOver::decode(&bent));
        let mut r = Reader { what: "varint", buf: &[0xff; 11] };
        assert!(varint(&mut r).is_err());
        for v in [0, 1, 127, 128, 300, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(varint(&mut Reader { what: "varint", buf: &b }).unwrap(), v);
        }
    }
}
