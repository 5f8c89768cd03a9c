//! The source of a region post-copy: freezes the range and serves its pages, each once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use mosaic_pager::{
    present_pages, DirtyTracking, Fault, FaultMode, FillError, Filled, Page, PageSource, Region, RegionConfig,
    RegionCore, WriteDecision, PAGE_SIZE,
};
use mosaic_transport::{listen, Caller, ClusterKey, Server, ServerConfig, Service, ServiceError, Status};

use crate::wire::{Descriptor, COMMIT, DESCRIBE, FETCH, MOST, NEXT};
use crate::MigrateError;

/// What the source counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutgoingStats {
    /// Pages present when the region froze (what is to be sent).
    pub present_pages: u64,
    /// Pages sent so far (each once).
    pub pages_sent: u64,
    /// Pages sent because the destination faulted on them.
    pub pages_fetched: u64,
    /// Bytes sent: the descriptor, and every page with its header.
    pub bytes_sent: u64,
}

/// Which present pages are still to be sent: a bitmap, and how many.
struct ToSend {
    bits: Vec<u64>,
    left: u64,
    /// The destination has the descriptor (it knows which pages to wait for).
    described: bool,
    /// The destination took the region over: from now on it runs there, and only there.
    committed: bool,
}

impl ToSend {
    fn new(d: &Descriptor) -> ToSend {
        let mut bits = vec![0u64; usize::try_from(d.pages.div_ceil(64)).unwrap_or(0)];
        for r in &d.present {
            for p in r.clone() {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        ToSend { bits, left: d.present_pages(), described: false, committed: false }
    }

    /// Takes page `p` if it is still to be sent.
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

    /// Takes up to `most` pages still to be sent, from `from` on (then from the start).
    fn take_from(&mut self, from: u64, most: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let words = self.bits.len();
        if words == 0 {
            return out;
        }
        let first = (from / 64) as usize % words;
        for k in 0..=words {
            let w = (first + k) % words;
            // In the hint's own word, from the hint on (what is before it comes as the scan
            // wraps round to this word again).
            let mask = if k == 0 { !0u64 << (from % 64) } else { !0u64 };
            while out.len() < most {
                let avail = self.bits[w] & mask;
                if avail == 0 {
                    break;
                }
                let b = u64::from(avail.trailing_zeros());
                self.bits[w] &= !(1 << b);
                self.left -= 1;
                out.push(w as u64 * 64 + b);
            }
            if out.len() >= most || self.left == 0 {
                break;
            }
        }
        out
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
    /// Appends page `p`'s bytes to `out` (then the caller frees it here with [`free`]: it is
    /// the destination's now).
    fn copy_page(&self, core: &RegionCore, p: u64, out: &mut Vec<u8>) -> Result<(), String> {
        let at = usize::try_from(p).map_err(|_| "page number".to_string())? * PAGE_SIZE;
        // SAFETY: page `p` is inside the frozen region (checked against its size by `ToSend`),
        // present and write-protected since the freeze, so nothing changes it while it is read;
        // it is dropped only after the copy, by `free`.
        let bytes = unsafe { std::slice::from_raw_parts(core.as_ptr().add(at), PAGE_SIZE) };
        out.extend_from_slice(bytes);
        self.pages_sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(PAGE_SIZE as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Frees pages that left, in runs (one system call for the lot where the kernel allows).
    fn free(core: &RegionCore, pages: &[u64]) -> Result<(), String> {
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for &p in pages {
            match runs.last_mut() {
                Some(r) if r.end == p => r.end += 1,
                _ => runs.push(p..p + 1),
            }
        }
        match core.drop_runs(&runs).first() {
            None => Ok(()),
            Some((r, e)) => Err(format!("pages {r:?}: {e}")),
        }
    }

    fn core(&self) -> Result<Arc<RegionCore>, ServiceError> {
        self.core.get().and_then(Weak::upgrade).ok_or_else(|| ServiceError::new(Status::Handler, "the region is gone"))
    }

    fn finished(&self, to_send: &ToSend) {
        if to_send.left == 0 && to_send.committed {
            self.done.notify_all();
        }
    }
}

/// The frozen region's page source: nothing may fault here any more.
struct Frozen;

impl PageSource for Frozen {
    fn fill(&self, fault: &Fault<'_>, _page: &mut Page) -> Result<Filled, FillError> {
        Err(FillError::new(format!("page {} belongs to a region that migrated away", fault.index)))
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
                // Not present at the freeze (zeros) or sent already: nothing to send.
                if to_send.take(p) {
                    s.copy_page(&core, p, response).map_err(|e| ServiceError::new(Status::Handler, e))?;
                    Shared::free(&core, &[p]).map_err(|e| ServiceError::new(Status::Handler, e))?;
                    s.pages_fetched.fetch_add(1, Ordering::Relaxed);
                }
                s.finished(&to_send);
            }
            NEXT => {
                let hint = word(0)?;
                let most = request.get(8..12).and_then(|b| b.try_into().ok()).map_or(MOST, u32::from_le_bytes);
                let core = s.core()?;
                let mut to_send = lock(&s.to_send);
                if !to_send.committed {
                    return Err(bad("pages asked for before the commit".into()));
                }
                let batch = to_send.take_from(hint, most.min(MOST) as usize);
                for &p in &batch {
                    response.extend_from_slice(&p.to_le_bytes());
                    s.bytes_sent.fetch_add(8, Ordering::Relaxed);
                    s.copy_page(&core, p, response).map_err(|e| ServiceError::new(Status::Handler, e))?;
                }
                Shared::free(&core, &batch).map_err(|e| ServiceError::new(Status::Handler, e))?;
                s.finished(&to_send);
            }
            _ => return Err(ServiceError::new(Status::UnknownMethod, format!("no method {method:#x}"))),
        }
        Ok(())
    }
}

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
    /// `tcp://127.0.0.1:0`) to whoever holds `key`.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be a private anonymous mapping of this process (page-aligned,
    /// not registered with another userfaultfd), and the caller must not use it any more: from
    /// here on it is the destination's. Threads that still write it block; a touch of a page
    /// that was never there, and any access once the migration is over, faults.
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
        // Write-protected first, then scanned: no page can appear or change after the scan.
        region.write_protect(0, pages, true)?;
        let present = present_pages(addr, pages)?;
        let desc = Descriptor { addr: addr as u64, pages, present };
        let shared = Arc::new(Shared {
            to_send: Mutex::new(ToSend::new(&desc)),
            desc,
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
            present_pages: s.desc.present_pages(),
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
            let to_send = lock(&self.shared.to_send);
            if to_send.committed {
                return Err(MigrateError::Range("the destination took the region over: it cannot thaw here".into()));
            }
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
        while to_send.left > 0 || !to_send.committed {
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
    fn pages_to_send_are_taken_once_from_the_hint_on() {
        let d = Descriptor { addr: 0, pages: 200, present: vec![0..2, 70..73, 150..151] };
        let mut t = ToSend::new(&d);
        assert_eq!(t.left, 6);
        assert!(t.take(71) && !t.take(71) && !t.take(5));
        assert_eq!(t.take_from(72, 2), [72, 150]);
        assert_eq!(t.take_from(72, 10), [0, 1, 70]);
        assert_eq!((t.left, t.take_from(0, 10)), (0, vec![]));
    }
}
