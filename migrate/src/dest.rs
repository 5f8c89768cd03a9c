//! The destination of a region post-copy: maps the region at its address at once, fetches what
//! faults need, and pulls the rest in the background.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_pager::{Fault, FaultMode, FillError, Filled, Outcome, Page, PageSource, Region, RegionConfig, Token};
use mosaic_transport::{connect, ClusterKey, ConnectOptions, Connection};

use crate::source::lock;
use crate::wire::{
    decode_batch, Descriptor, Record, CHUNK, CHUNK_BITS, COMMIT, DATA, DESCRIBE, DONE, FETCH, MOST, NEXT, SENT, ZERO,
};
use crate::MigrateError;

/// What the destination counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IncomingStats {
    /// Pages a fault fetched.
    pub faulted: u64,
    /// Pages the background stream brought.
    pub pushed: u64,
    /// Pages that were zeros at the source (never sent).
    pub zero: u64,
    /// Bytes received (pages and their headers).
    pub bytes_received: u64,
}

struct Shared {
    desc: Descriptor,
    /// Pages present at the source, one bit each, for the chunks whose bits came (`known`).
    present: Mutex<(Vec<u64>, Vec<bool>)>,
    conn: Connection,
    /// Pages that arrived here (installed, or on their way into the region), one bit each.
    here: Mutex<Vec<u64>>,
    arrived: Condvar,
    /// The latest page a fault asked for: where the background stream goes on from.
    hint: AtomicU64,
    stop: AtomicBool,
    /// Why the background stream stopped early, if it did.
    failed: Mutex<Option<String>>,
    faulted: AtomicU64,
    pushed: AtomicU64,
    zero: AtomicU64,
    bytes: AtomicU64,
}

fn bit(bits: &[u64], p: u64) -> bool {
    bits.get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0)
}

fn set(bits: &mut [u64], p: u64) {
    if let Some(w) = bits.get_mut((p / 64) as usize) {
        *w |= 1 << (p % 64);
    }
}

/// How long a fault waits for a page the background stream is bringing.
const WAIT: Duration = Duration::from_secs(30);

struct Source(Arc<Shared>);

impl PageSource for Source {
    fn fill(&self, fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError> {
        let s = &self.0;
        let p = fault.index;
        let c = (p / CHUNK) as usize;
        {
            let present = lock(&s.present);
            if present.1.get(c).copied().unwrap_or(false) && !bit(&present.0, p) {
                s.zero.fetch_add(1, Ordering::Relaxed);
                return Ok(Filled::Zero(Token(0)));
            }
        }
        s.hint.store(p + 1, Ordering::Relaxed);
        if bit(&lock(&s.here), p) {
            // It arrived, and was discarded since (MADV_DONTNEED): zeros, as Linux has it (over
            // a page still present, a zero install keeps the page).
            return Ok(Filled::Zero(Token(0)));
        }
        let answer = s.conn.call(FETCH, &p.to_le_bytes()).map_err(FillError::new)?;
        s.bytes.fetch_add(answer.len() as u64, Ordering::Relaxed);
        let malformed = || FillError::new(format!("page {p}: an answer of {} bytes", answer.len()));
        let (&kind, rest) = answer.split_first().ok_or_else(malformed)?;
        let (bits, data) = rest.split_at_checked(CHUNK_BITS).ok_or_else(malformed)?;
        let words: Vec<u64> =
            bits.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default())).collect();
        learn(s, c, &words);
        match kind {
            ZERO if data.is_empty() => {
                s.zero.fetch_add(1, Ordering::Relaxed);
                return Ok(Filled::Zero(Token(0)));
            }
            DATA if data.len() == page.0.len() => {
                page.0.copy_from_slice(data);
                s.faulted.fetch_add(1, Ordering::Relaxed);
                return Ok(Filled::Data(Token(0)));
            }
            SENT if data.is_empty() => {}
            _ => return Err(malformed()),
        }
        // Sent already, by the background stream: it is being installed.
        let deadline = Instant::now() + WAIT;
        let mut here = lock(&s.here);
        while !bit(&here, p) {
            if let Some(why) = lock(&s.failed).clone() {
                return Err(FillError::new(format!("page {p}: the stream bringing it stopped: {why}")));
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(FillError::new(format!("page {p}: sent by the source, never installed")));
            };
            here = s.arrived.wait_timeout(here, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        // In place (or discarded since: zeros, as above).
        Ok(Filled::Zero(Token(0)))
    }

    fn installed(&self, index: u64, _token: Token, outcome: Outcome) {
        if outcome != Outcome::Lost {
            set(&mut lock(&self.0.here), index);
            self.0.arrived.notify_all();
        }
    }
}

/// A region arriving here: mapped at its address, usable at once, its pages on their way.
pub struct Incoming {
    shared: Arc<Shared>,
    region: Option<Region>,
    pusher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").field("descriptor", &self.shared.desc).field("stats", &self.stats()).finish()
    }
}

impl Incoming {
    /// Connects to a frozen region's source at `uri` with `key`, maps the region at its address,
    /// takes it over (after which the source cannot thaw it) and starts pulling its pages. When
    /// this returns, the region is usable. If the source dies before every page arrived, a touch
    /// of a page still missing raises SIGBUS (the page is named in the log), never zeros.
    pub fn connect(uri: &str, key: ClusterKey) -> Result<Incoming, MigrateError> {
        Incoming::over(connect(uri, &ConnectOptions::new(key))?)
    }

    /// As [`connect`](Self::connect), over a connection made by the caller (a simulated link,
    /// other options).
    pub fn over(conn: Connection) -> Result<Incoming, MigrateError> {
        let desc = Descriptor::decode(&conn.call(DESCRIBE, &[])?)?;
        let words = usize::try_from(desc.pages.div_ceil(64)).map_err(|_| MigrateError::Range("too large".into()))?;
        let chunks =
            usize::try_from(desc.pages.div_ceil(CHUNK)).map_err(|_| MigrateError::Range("too large".into()))?;
        // Whole chunks of bits, so that a chunk's bits always fit.
        let present = Mutex::new((vec![0u64; chunks * CHUNK_BITS / 8], vec![false; chunks]));
        let addr = usize::try_from(desc.addr).map_err(|_| MigrateError::Range("address".into()))?;
        let shared = Arc::new(Shared {
            present,
            conn,
            here: Mutex::new(vec![0u64; words]),
            arrived: Condvar::new(),
            hint: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
            faulted: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            desc,
        });
        let cfg = RegionConfig::new(shared.desc.pages)
            .fixed_addr(addr)
            .mode(FaultMode::Workers(1))
            .report_discards(false)
            .name("migrated region");
        let region = Region::new(cfg, Source(shared.clone()))?;
        // Mapped here: the region is this process's from now on.
        shared.conn.call(COMMIT, &[])?;
        let (s, core) = (shared.clone(), region.core());
        let pusher = std::thread::Builder::new()
            .name("mosaic-migrate-pull".into())
            .spawn(move || {
                if let Err(e) = pull(&s, &core) {
                    log::error!("migrated region: the background stream stopped: {e}");
                    *lock(&s.failed) = Some(e.to_string());
                    // Faults waiting for pages it was bringing fail now, not at their time-out.
                    let _here = lock(&s.here);
                    s.arrived.notify_all();
                }
            })
            .map_err(|e| MigrateError::Range(format!("cannot start the background stream: {e}")))?;
        Ok(Incoming { shared, region: Some(region), pusher: Some(pusher) })
    }

    /// The region's first byte (the source's address).
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.as_ref().map_or(std::ptr::null_mut(), |r| r.as_ptr())
    }

    /// The region's size in bytes.
    pub fn len(&self) -> usize {
        self.region.as_ref().map_or(0, |r| r.len())
    }

    /// Whether the region is empty (never: a region has a page at least).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The descriptor the source sent.
    pub fn descriptor(&self) -> &Descriptor {
        &self.shared.desc
    }

    /// What arrived so far.
    pub fn stats(&self) -> IncomingStats {
        let s = &self.shared;
        IncomingStats {
            faulted: s.faulted.load(Ordering::Relaxed),
            pushed: s.pushed.load(Ordering::Relaxed),
            zero: s.zero.load(Ordering::Relaxed),
            bytes_received: s.bytes.load(Ordering::Relaxed),
        }
    }

    /// Waits until every page the source had is here (at most `timeout`): the region no longer
    /// needs the source. Returns what arrived.
    pub fn wait_resident(&mut self, timeout: Duration) -> Result<IncomingStats, MigrateError> {
        let deadline = Instant::now() + timeout;
        while self.pusher.as_ref().is_some_and(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                return Err(MigrateError::TimedOut(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(t) = self.pusher.take() {
            let _ = t.join();
        }
        if let Some(why) = lock(&self.shared.failed).clone() {
            return Err(MigrateError::Protocol(why));
        }
        Ok(self.stats())
    }

    /// Waits for every page, then keeps the region mapped for good as ordinary memory of this
    /// process (no userfaultfd, no connection left): its address and size.
    pub fn into_raw(mut self, timeout: Duration) -> Result<(*mut u8, usize), MigrateError> {
        self.wait_resident(timeout)?;
        let len = self.len();
        let region = self.region.take().ok_or(MigrateError::Range("the region is gone".into()))?;
        Ok((region.release()? as *mut u8, len))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.pusher.take() {
            let _ = t.join();
        }
    }
}

/// Records chunk `c`'s present pages (as the source learned them).
fn learn(s: &Shared, c: usize, bits: &[u64]) {
    let mut present = lock(&s.present);
    let first = c * CHUNK_BITS / 8;
    for (k, w) in bits.iter().enumerate() {
        if let Some(slot) = present.0.get_mut(first + k) {
            *slot = *w;
        }
    }
    if let Some(known) = present.1.get_mut(c) {
        *known = true;
    }
}

/// The background stream: asks for the next batch from the latest fault on, installs it, until
/// the source has nothing left; then lets the source go.
fn pull(s: &Shared, core: &mosaic_pager::RegionCore) -> Result<(), MigrateError> {
    let mut page = Page::boxed();
    while !s.stop.load(Ordering::Acquire) {
        let hint = s.hint.load(Ordering::Relaxed);
        let mut req = hint.to_le_bytes().to_vec();
        req.extend_from_slice(&MOST.to_le_bytes());
        let answer = s.conn.call(NEXT, &req)?;
        if answer.is_empty() {
            s.conn.call(DONE, &[])?;
            return Ok(());
        }
        s.bytes.fetch_add(answer.len() as u64, Ordering::Relaxed);
        let mut last = hint;
        let mut failed = None;
        for record in decode_batch(&answer, s.desc.pages)? {
            match record {
                Record::Chunk(c, bits) => learn(s, usize::try_from(c).unwrap_or(usize::MAX), &bits),
                Record::Page(p, bytes) => {
                    page.0.copy_from_slice(bytes);
                    // Each page is sent once, so none the pager filled can come here; an install
                    // that found one present would keep what is there. One that fails leaves the
                    // page missing (its faults fail); the rest of the batch still goes in.
                    match core.install(p, std::slice::from_ref(&*page)) {
                        Ok(_) => {
                            set(&mut lock(&s.here), p);
                            s.pushed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                    last = p + 1;
                }
            }
        }
        s.arrived.notify_all();
        if let Some(e) = failed {
            return Err(e.into());
        }
        // Go on after this batch unless a fault points elsewhere meanwhile.
        let _ = s.hint.compare_exchange(hint, last, Ordering::Relaxed, Ordering::Relaxed);
    }
    Ok(())
}
