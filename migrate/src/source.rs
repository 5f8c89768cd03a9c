//! The source of a region post-copy: freezes the range and serves its pages, each once.
//!
//! Freezing takes the range over (a userfaultfd region adopting the mapping) and nothing else:
//! which pages exist is learned a chunk at a time, when the destination first asks about the
//! chunk (a fault) or the background stream reaches it. Learning a chunk write-protects it and
//! scans it (`PAGEMAP_SCAN`), so no page of a scanned chunk can change or appear afterwards.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use mosaic_pager::{
    populated_pages, DirtyTracking, Fault, FaultMode, FillError, Filled, Page, PageSource, Region, RegionConfig,
    RegionCore, WriteDecision, PAGE_SIZE,
};
use mosaic_transport::{listen, Caller, ClusterKey, Server, ServerConfig, Service, ServiceError, Status};

use crate::wire::{
    encode_chunk, Descriptor, CHUNK, CHUNK_BITS, COMMIT, DATA, DESCRIBE, DONE, FETCH, MOST, NEXT, RECORD_PAGE, SENT,
    ZERO,
};
use crate::MigrateError;

/// What the source counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutgoingStats {
    /// Pages found present so far (all of them once every chunk was scanned).
    pub present_pages: u64,
    /// Pages sent so far (each once).
    pub pages_sent: u64,
    /// Pages sent because the destination faulted on them.
    pub pages_fetched: u64,
    /// Bytes sent: the descriptor, and every page with its header.
    pub bytes_sent: u64,
}

/// Which pages are still to be sent, learned a chunk at a time.
struct ToSend {
    /// Pages of the region.
    pages: u64,
    /// Present and not sent yet, one bit a page (only for scanned chunks).
    bits: Vec<u64>,
    /// Each chunk's present pages, once scanned.
    present: Vec<Option<[u64; CHUNK_BITS / 8]>>,
    unscanned: usize,
    /// Present, scanned and not sent yet.
    left: u64,
    found: u64,
    /// The destination has the descriptor.
    described: bool,
    /// The destination took the region over: from now on it runs there, and only there.
    committed: bool,
    /// The destination has everything (it said so): the source may go.
    released: bool,
    /// The source is taking the region back: no destination may commit any more.
    thawing: bool,
}

impl ToSend {
    fn new(pages: u64) -> ToSend {
        let chunks = usize::try_from(pages.div_ceil(CHUNK)).unwrap_or(0);
        ToSend {
            pages,
            bits: vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)],
            present: vec![None; chunks],
            unscanned: chunks,
            left: 0,
            found: 0,
            described: false,
            committed: false,
            released: false,
            thawing: false,
        }
    }

    /// Learns chunk `c`'s present pages through `scan` (given the chunk's page range, returning
    /// the present runs within it, as page numbers of the region), unless known already.
    /// Returns them, and whether they were learned just now.
    fn learn(
        &mut self,
        c: usize,
        scan: impl FnOnce(Range<u64>) -> Result<Vec<Range<u64>>, String>,
    ) -> Result<([u64; CHUNK_BITS / 8], bool), String> {
        if let Some(bits) = self.present[c] {
            return Ok((bits, false));
        }
        let first = c as u64 * CHUNK;
        let mut chunk = [0u64; CHUNK_BITS / 8];
        for r in scan(first..(first + CHUNK).min(self.pages))? {
            for p in r {
                let k = p - first;
                chunk[(k / 64) as usize] |= 1 << (k % 64);
                self.bits[(p / 64) as usize] |= 1 << (p % 64);
                self.left += 1;
                self.found += 1;
            }
        }
        self.present[c] = Some(chunk);
        self.unscanned -= 1;
        Ok((chunk, true))
    }

    /// Takes page `p` if it is still to be sent (its chunk must be scanned).
    fn take(&mut self, p: u64) -> bool {
        let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
        match self.bits.get_mut(w) {
            Some(word) if *word & b != 0 => {
                *word &= !b;
                self.left -= 1;
                true
            }
            _ => false,
        }
    }

    /// Takes up to `most` pages of chunk `c` still to be sent, from page `from` on.
    fn take_in(&mut self, c: usize, from: u64, most: usize, out: &mut Vec<u64>) {
        let first = (c as u64 * CHUNK).max(from);
        let end = ((c as u64 + 1) * CHUNK).min(self.pages);
        let mut p = first;
        while p < end && out.len() < most {
            let w = (p / 64) as usize;
            let avail = self.bits[w] & (!0u64 << (p % 64));
            if avail == 0 {
                p = (w as u64 + 1) * 64;
                continue;
            }
            let q = w as u64 * 64 + u64::from(avail.trailing_zeros());
            if q >= end {
                break;
            }
            self.bits[w] &= !(1 << (q % 64));
            self.left -= 1;
            out.push(q);
            p = q + 1;
        }
    }

    fn done(&self) -> bool {
        self.released && self.committed && self.unscanned == 0 && self.left == 0
    }
}

struct Shared {
    desc: Descriptor,
    to_send: Mutex<ToSend>,
    /// Signalled when the last page left.
    done: Condvar,
    core: OnceLock<Weak<RegionCore>>,
    pages_sent: AtomicU64,
    pages_fetched: AtomicU64,
    bytes_sent: AtomicU64,
}

impl Shared {
    /// Write-protects and scans chunk `c` if not known yet; returns its pages that hold data
    /// (present, or swapped out).
    fn learn(
        &self,
        core: &RegionCore,
        to_send: &mut ToSend,
        c: usize,
    ) -> Result<([u64; CHUNK_BITS / 8], bool), String> {
        to_send.learn(c, |pages| {
            core.write_protect(pages.start, pages.end - pages.start, true).map_err(|e| e.to_string())?;
            let at = core.as_ptr() as usize + usize::try_from(pages.start).map_err(|e| e.to_string())? * PAGE_SIZE;
            let runs = populated_pages(at, pages.end - pages.start).map_err(|e| e.to_string())?;
            Ok(runs.into_iter().map(|r| r.start + pages.start..r.end + pages.start).collect())
        })
    }

    /// Appends page `p`'s bytes to `out` (then the caller frees it here with [`Shared::free`]:
    /// it is the destination's now). A page in swap comes back in as it is read.
    fn copy_page(&self, core: &RegionCore, p: u64, out: &mut Vec<u8>) -> Result<(), String> {
        let at = usize::try_from(p).map_err(|_| "page number".to_string())? * PAGE_SIZE;
        // SAFETY: page `p` is inside the frozen region (checked against its size by `ToSend`),
        // present and write-protected since its chunk was scanned, so nothing changes it while
        // it is read; it is dropped only after the copy, by `free`.
        let bytes = unsafe { std::slice::from_raw_parts(core.as_ptr().add(at), PAGE_SIZE) };
        out.extend_from_slice(bytes);
        self.pages_sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(PAGE_SIZE as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Frees pages handed to the transport, in runs (one system call for the lot where the
    /// kernel allows). A page that cannot be freed only costs memory here: logged.
    fn free(core: &RegionCore, pages: &[u64]) {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for &p in pages {
            match runs.last_mut() {
                Some(r) if r.end == p => r.end += 1,
                _ => runs.push(p..p + 1),
            }
        }
        for (r, e) in core.drop_runs(&runs) {
            log::warn!("migrating region: pages {r:?} sent but not freed here: {e}");
        }
    }

    fn core(&self) -> Result<Arc<RegionCore>, ServiceError> {
        self.core.get().and_then(Weak::upgrade).ok_or_else(|| ServiceError::new(Status::Handler, "the region is gone"))
    }

    fn finished(&self, to_send: &ToSend) {
        if to_send.done() {
            self.done.notify_all();
        }
    }
}

/// The frozen region's page source: nothing may fault here any more. A touch of a page that
/// was never there waits: if the region thaws, it reads zeros as in any anonymous mapping; if it
/// migrates, the mapping is gone and the access faults.
struct Frozen;

impl PageSource for Frozen {
    fn fill(&self, _fault: &Fault<'_>, _page: &mut Page) -> Result<Filled, FillError> {
        Ok(Filled::Busy)
    }

    fn written(&self, _fault: &Fault<'_>) -> WriteDecision {
        // Frozen: the write waits (and faults once the region is gone).
        WriteDecision::Busy
    }
}

/// Serves the destination.
struct Serve(Arc<Shared>);

impl Service for Serve {
    fn call(&self, _caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let s = &self.0;
        let bad = |why: String| ServiceError::new(Status::BadRequest, why);
        let failed = |why: String| ServiceError::new(Status::Handler, why);
        let word = |at: usize| -> Result<u64, ServiceError> {
            request
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| bad(format!("a request of {} bytes", request.len())))
        };
        match method {
            DESCRIBE => {
                let d = s.desc.encode();
                s.bytes_sent.fetch_add(d.len() as u64, Ordering::Relaxed);
                response.extend_from_slice(&d);
                lock(&s.to_send).described = true;
            }
            COMMIT => {
                let mut to_send = lock(&s.to_send);
                if !to_send.described {
                    return Err(bad("a commit before the descriptor".into()));
                }
                if to_send.thawing {
                    return Err(ServiceError::new(Status::Forbidden, "the source took the region back"));
                }
                to_send.committed = true;
                s.finished(&to_send);
            }
            FETCH => {
                let p = word(0)?;
                if p >= s.desc.pages {
                    return Err(bad(format!("page {p} is outside the region")));
                }
                let core = s.core()?;
                let mut to_send = lock(&s.to_send);
                if !to_send.committed {
                    return Err(bad("a page asked for before the commit".into()));
                }
                let c = (p / CHUNK) as usize;
                let (chunk, _) = s.learn(&core, &mut to_send, c).map_err(failed)?;
                let k = p % CHUNK;
                let kind = if chunk[(k / 64) as usize] & (1 << (k % 64)) == 0 {
                    ZERO
                } else if to_send.take(p) {
                    DATA
                } else {
                    SENT
                };
                response.push(kind);
                chunk.iter().for_each(|w| response.extend_from_slice(&w.to_le_bytes()));
                s.bytes_sent.fetch_add(1 + CHUNK_BITS as u64, Ordering::Relaxed);
                if kind == DATA {
                    s.copy_page(&core, p, response).map_err(failed)?;
                    Shared::free(&core, &[p]);
                    s.pages_fetched.fetch_add(1, Ordering::Relaxed);
                }
                s.finished(&to_send);
            }
            NEXT => {
                let hint = word(0)?.min(s.desc.pages.saturating_sub(1));
                let most = request.get(8..12).and_then(|b| b.try_into().ok()).map_or(MOST, u32::from_le_bytes);
                let most = most.min(MOST) as usize;
                let core = s.core()?;
                let mut to_send = lock(&s.to_send);
                if !to_send.committed {
                    return Err(bad("pages asked for before the commit".into()));
                }
                // From the hint's chunk on, round the region, learning chunks on the way.
                let chunks = to_send.present.len();
                let start = (hint / CHUNK) as usize;
                let mut batch = Vec::new();
                let before = response.len();
                let mut learned = 0;
                for k in 0..=chunks {
                    let c = (start + k) % chunks;
                    let (bits, new) = match s.learn(&core, &mut to_send, c) {
                        Ok(l) => l,
                        // Pages taken already go out now; the chunk is tried again next time.
                        Err(e) if !batch.is_empty() || learned > 0 => {
                            log::warn!("migrating region: chunk {c}: {e}");
                            break;
                        }
                        Err(e) => return Err(failed(e)),
                    };
                    if new {
                        // The destination learns every chunk's pages by the end.
                        encode_chunk(c as u64, &bits, response);
                        learned += 1;
                    }
                    if learned >= MOST_CHUNKS {
                        break; // an answer stays well below the largest frame
                    }
                    let from = if k == 0 { hint } else { 0 };
                    to_send.take_in(c, from, most, &mut batch);
                    if batch.len() >= most || (to_send.unscanned == 0 && to_send.left == 0) {
                        break;
                    }
                }
                s.bytes_sent.fetch_add((response.len() - before) as u64, Ordering::Relaxed);
                for &p in &batch {
                    response.push(RECORD_PAGE);
                    response.extend_from_slice(&p.to_le_bytes());
                    s.bytes_sent.fetch_add(9, Ordering::Relaxed);
                    s.copy_page(&core, p, response).map_err(failed)?;
                }
                Shared::free(&core, &batch);
                s.finished(&to_send);
            }
            DONE => {
                let mut to_send = lock(&s.to_send);
                if !(to_send.committed && to_send.unscanned == 0 && to_send.left == 0) {
                    return Err(bad("done before every page was sent".into()));
                }
                to_send.released = true;
                s.finished(&to_send);
            }
            _ => return Err(ServiceError::new(Status::UnknownMethod, format!("no method {method:#x}"))),
        }
        Ok(())
    }
}

/// Most chunks one `NEXT` answer learns (73 bytes each: 150 KiB, with its pages well below the
/// transport's largest frame).
const MOST_CHUNKS: usize = 2048;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A region frozen here and served to one destination until every present page has left.
pub struct Outgoing {
    shared: Arc<Shared>,
    server: Option<Server>,
    region: Option<Region>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing").field("descriptor", &self.shared.desc).field("stats", &self.stats()).finish()
    }
}

impl Outgoing {
    /// Freezes the `len` bytes at `addr` and serves them on `listen` (a transport URI, e.g.
    /// `tcp://127.0.0.1:0`) to whoever holds `key`. Costs the same whatever the size: which
    /// pages exist is learned later, a chunk at a time.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be a private anonymous mapping of this process (page-aligned,
    /// not registered with another userfaultfd), and the caller must not use it any more: from
    /// here on it is the destination's. Threads that still write it block once the page's chunk
    /// was scanned (a write before that travels with the page); a touch of a page that was
    /// never there, and any access once the migration is over, faults.
    pub unsafe fn freeze(addr: usize, len: usize, listen_uri: &str, key: ClusterKey) -> Result<Outgoing, MigrateError> {
        if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(MigrateError::Range(format!("{len} bytes at {addr:#x}: not whole pages")));
        }
        let pages = (len / PAGE_SIZE) as u64;
        let cfg = RegionConfig::new(pages)
            .adopt(addr)
            .mode(FaultMode::Workers(1))
            .dirty(DirtyTracking::Faults)
            .report_discards(false)
            .name("migrating region");
        let region = Region::new(cfg, Frozen)?;
        let shared = Arc::new(Shared {
            to_send: Mutex::new(ToSend::new(pages)),
            desc: Descriptor { addr: addr as u64, pages },
            done: Condvar::new(),
            core: OnceLock::new(),
            pages_sent: AtomicU64::new(0),
            pages_fetched: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
        });
        let _ = shared.core.set(Arc::downgrade(&region.core()));
        let server = listen(listen_uri, ServerConfig::new(key).service(Serve(shared.clone())))?;
        Ok(Outgoing { shared, server: Some(server), region: Some(region) })
    }

    /// Where the destination connects.
    pub fn uri(&self) -> &str {
        self.server.as_ref().map_or("", Server::uri)
    }

    /// The descriptor the destination gets.
    pub fn descriptor(&self) -> &Descriptor {
        &self.shared.desc
    }

    /// What was sent so far.
    pub fn stats(&self) -> OutgoingStats {
        let s = &self.shared;
        OutgoingStats {
            present_pages: lock(&s.to_send).found,
            pages_sent: s.pages_sent.load(Ordering::Relaxed),
            pages_fetched: s.pages_fetched.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
        }
    }

    /// Whether the destination took the region over (after which the region can only go on
    /// there; before, [`thaw`](Self::thaw) gives it back here).
    pub fn committed(&self) -> bool {
        lock(&self.shared.to_send).committed
    }

    /// Gives the region back to this process if no destination took it over: write protection
    /// lifted, every page where it was. Returns its address; an error (and nothing changed) if
    /// a destination committed, since it runs there now.
    pub fn thaw(mut self) -> Result<usize, MigrateError> {
        {
            let mut to_send = lock(&self.shared.to_send);
            if to_send.committed {
                return Err(MigrateError::Range("the destination took the region over: it cannot thaw here".into()));
            }
            to_send.thawing = true; // from now on a commit is refused
        }
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        // Stopped serving: nothing can commit or take a page any more.
        let region = self.region.take().ok_or(MigrateError::Range("the region is gone".into()))?;
        Ok(region.release()?)
    }

    /// Waits until a destination committed and every present page has left (at most `timeout`),
    /// then stops serving and unmaps the range here. On time-out nothing changes: if no
    /// destination committed, [`thaw`](Self::thaw) gives the region back.
    pub fn finish(&mut self, timeout: Duration) -> Result<OutgoingStats, MigrateError> {
        let deadline = Instant::now() + timeout;
        let mut to_send = lock(&self.shared.to_send);
        while !to_send.done() {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                return Err(MigrateError::TimedOut(timeout));
            };
            to_send = self.shared.done.wait_timeout(to_send, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        drop(to_send);
        let stats = self.stats();
        self.stop();
        Ok(stats)
    }

    fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        self.region.take();
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_to_send_are_learned_by_chunk_and_taken_once() {
        // 1,200 pages: chunks 0 and 1 whole, chunk 2 of 176 pages.
        let mut t = ToSend::new(1200);
        let mut probe = ToSend::new(1200);
        probe.learn(2, |r| if r == (1024..1200) { Ok(vec![]) } else { Err(format!("{r:?}")) }).unwrap();
        assert_eq!((t.present.len(), t.unscanned), (3, 3));
        let present = [0..2, 70..73, 600..601, 1199..1200];
        let scan = |r: Range<u64>| -> Result<Vec<Range<u64>>, String> {
            Ok(present.iter().filter(|p| p.start >= r.start && p.end <= r.end).cloned().collect())
        };
        let (chunk0, new) = t.learn(0, scan).unwrap();
        assert!(new);
        assert_eq!((chunk0[0], chunk0[1], t.left), (0b11, 0b111 << 6, 5));
        assert_eq!(t.learn(0, |_| Err("scanned twice".into())).map(|(_, new)| new), Ok(false));
        assert!(t.take(71) && !t.take(71) && !t.take(5));
        let mut out = Vec::new();
        t.take_in(0, 72, 10, &mut out);
        assert_eq!(out, [72]);
        t.take_in(0, 0, 3, &mut out);
        assert_eq!(out, [72, 0, 1]);
        for c in [1, 2] {
            t.learn(c, scan).unwrap();
        }
        let mut out = Vec::new();
        t.take_in(0, 0, 10, &mut out);
        t.take_in(1, 0, 10, &mut out);
        t.take_in(2, 0, 10, &mut out);
        assert_eq!(out, [70, 600, 1199]);
        assert_eq!((t.left, t.found, t.unscanned), (0, 7, 0));
        t.committed = true;
        assert!(!t.done(), "not before the destination says it has everything");
        t.released = true;
        assert!(t.done());
    }
}
