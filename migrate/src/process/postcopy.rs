//! Post-copy of a migrated process's anonymous memory, at the destination: faults pull their
//! pages from the source, a stream pulls the rest, and the process's own `mremap`, `madvise`
//! and `munmap` calls are followed so that no page lands where it no longer belongs.
//!
//! One thread, the *installer*, owns the userfaultfd: it reads the events, serves faults
//! (fetching their pages itself: the faulting thread waits either way) and installs what the
//! *streamer* thread fetched. Since only the installer reads events and installs, an install can
//! never follow a discard it has not seen: the kernel refuses installs (`EAGAIN`) while an event
//! waits unread, and the installer reads it, updates its table, then installs what still belongs.
//!
//! Each page with data at the source is fetched once (a fault on a page the stream has taken
//! waits for the stream's copy, which wakes it). If the source is lost, every page not yet
//! here is poisoned: touching one raises SIGBUS (the pages are named in the log), never zeros.

// Counts, lengths and page numbers: x86-64 only (see the module), where usize is u64, and
// every count is bounded by the image frame (64 MiB).
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mosaic_pager::{Event, ForeignUffd, Installed};

use super::image::ProcessImage;
use super::pages::Got;
use crate::source::lock;
use crate::MigrateError;

const PAGE: u64 = 4096;
/// Pages a fault fetches: its own and the following ones of its run not taken yet.
const FAULT_AROUND: usize = 16;
/// Pages the stream fetches at a time.
const STREAM_BATCH: usize = 512;

/// Where the pages come from (the source, which learns which pages hold data as it is asked:
/// see [`super::SourcePages`]).
pub trait FetchPages: Send + Sync + 'static {
    /// What each page at the source addresses `pages` is; the bytes of those with data,
    /// concatenated in order.
    fn fetch(&self, pages: &[u64]) -> Result<(Vec<Got>, Vec<u8>), String>;
    /// Up to `most` pages with data not sent yet, from `hint` on: their source addresses, their
    /// bytes, and whether every page with data has now been sent.
    fn next(&self, hint: u64, most: usize) -> Result<(Vec<u64>, Vec<u8>, bool), String>;
}

/// What post-copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostCopyStats {
    /// Pages of the mappings that follow post-copy (with data at the source or not).
    pub pages: u64,
    /// Pages installed, as data or zeros (or found discarded or unmapped by the process
    /// meanwhile).
    pub settled: u64,
    /// Faults served.
    pub faults: u64,
    /// Pages fetched for faults.
    pub fetched_for_faults: u64,
    /// Pages fetched by the stream.
    pub streamed: u64,
    /// Bytes of page data received.
    pub bytes: u64,
    /// Pages poisoned because the source was lost.
    pub poisoned: u64,
}

/// A run of pages with data at the source, contiguous there and (while not moved apart by
/// `mremap`) at the destination.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// Source address of its first page.
    src: u64,
    pages: u64,
    /// Global index of its first page.
    first: usize,
    /// Where its first page is in the process now (`None` once unmapped).
    dst: Option<u64>,
}

#[derive(Debug)]
struct Table {
    runs: Vec<Run>,
    claimed: Vec<u64>,
    settled: Vec<u64>,
    settled_n: usize,
    total: usize,
    /// Where the stream takes its next pages (just after the latest fault).
    cursor: usize,
    failed: Option<String>,
    /// The source has sent every page with data, and all are installed.
    finished: bool,
}

/// `r` less the (sorted) ranges `holes`.
fn without(r: std::ops::Range<u64>, holes: &[std::ops::Range<u64>]) -> Vec<std::ops::Range<u64>> {
    let mut out = Vec::new();
    let mut at = r.start;
    for h in holes.iter().filter(|h| h.end > r.start && h.start < r.end) {
        if h.start > at {
            out.push(at..h.start);
        }
        at = at.max(h.end);
    }
    if at < r.end {
        out.push(at..r.end);
    }
    out
}

fn bit(v: &[u64], i: usize) -> bool {
    v[i / 64] & (1 << (i % 64)) != 0
}
fn set(v: &mut [u64], i: usize) {
    v[i / 64] |= 1 << (i % 64);
}

impl Table {
    fn new(image: &ProcessImage) -> Table {
        let mut runs = Vec::new();
        let mut n = 0;
        for m in image.mappings.iter().filter(|m| m.follows_post_copy()) {
            // What came early (the threads' contexts) is there already.
            for piece in without(m.start..m.end, &m.early) {
                let pages = (piece.end - piece.start) / PAGE;
                runs.push(Run { src: piece.start, pages, first: n, dst: Some(piece.start) });
                n += pages as usize;
            }
        }
        Table::with_runs(runs, n)
    }

    fn with_runs(runs: Vec<Run>, n: usize) -> Table {
        let words = n.div_ceil(64);
        let mut claimed = vec![0; words];
        // The bits past the last page count as taken, so whole words can be skipped.
        if n % 64 != 0 {
            claimed[words - 1] = !0u64 << (n % 64);
        }
        Table {
            runs,
            claimed,
            settled: vec![0; words],
            settled_n: 0,
            total: n,
            cursor: 0,
            failed: None,
            finished: false,
        }
    }

    fn run_of(&self, i: usize) -> usize {
        self.runs.partition_point(|r| r.first <= i) - 1
    }

    /// The page at destination address `a`: its index.
    fn at_dst(&self, a: u64) -> Option<usize> {
        self.runs.iter().find_map(|r| {
            let d = r.dst?;
            (a >= d && a < d + r.pages * PAGE).then(|| r.first + ((a - d) / PAGE) as usize)
        })
    }

    /// Splits runs so that none straddles destination address `a`.
    fn split_at_dst(&mut self, a: u64) {
        let Some(k) = self.runs.iter().position(|r| r.dst.is_some_and(|d| a > d && a < d + r.pages * PAGE)) else {
            return;
        };
        let r = self.runs[k];
        let head = (a - r.dst.expect("found by dst")) / PAGE;
        self.runs[k].pages = head;
        let tail =
            Run { src: r.src + head * PAGE, pages: r.pages - head, first: r.first + head as usize, dst: Some(a) };
        self.runs.insert(k + 1, tail);
    }

    /// The runs lying in `[start, end)` at the destination (after splitting at both ends).
    fn runs_in(&mut self, start: u64, end: u64) -> Vec<usize> {
        self.split_at_dst(start);
        self.split_at_dst(end);
        (0..self.runs.len()).filter(|&k| self.runs[k].dst.is_some_and(|d| d >= start && d < end)).collect()
    }

    fn settle(&mut self, i: usize) {
        if !bit(&self.settled, i) {
            set(&mut self.settled, i);
            set(&mut self.claimed, i);
            self.settled_n += 1;
        }
    }

    fn follow(&mut self, e: Event) {
        match e {
            Event::Fault(_) | Event::Fork(_) => {}
            Event::Remap { from, to, len } => {
                for k in self.runs_in(from, from + len) {
                    let d = self.runs[k].dst.expect("in range");
                    self.runs[k].dst = Some(d - from + to);
                }
            }
            Event::Remove { start, end } | Event::Unmap { start, end } => {
                for k in self.runs_in(start, end) {
                    let r = self.runs[k];
                    (r.first..r.first + r.pages as usize).for_each(|i| self.settle(i));
                    if matches!(e, Event::Unmap { .. }) {
                        self.runs[k].dst = None;
                    }
                }
            }
        }
    }

    /// Claims up to `most` pages not taken yet from `i` on within its run.
    fn claim_from(&mut self, i: usize, most: usize) -> Option<(usize, u32)> {
        let r = self.runs[self.run_of(i)];
        let end = r.first + r.pages as usize;
        let mut n = 0;
        while i + n < end && n < most && !bit(&self.claimed, i + n) {
            set(&mut self.claimed, i + n);
            n += 1;
        }
        (n > 0).then_some((i, n as u32))
    }

    /// The page at source address `a`: its index (runs keep the source's order).
    fn at_src(&self, a: u64) -> Option<usize> {
        let k = self.runs.partition_point(|r| r.src <= a).checked_sub(1)?;
        let r = self.runs[k];
        (a < r.src + r.pages * PAGE).then(|| r.first + ((a - r.src) / PAGE) as usize)
    }

    fn src_of(&self, i: usize) -> u64 {
        let r = self.runs[self.run_of(i)];
        r.src + (i - r.first) as u64 * PAGE
    }
}

struct Shared {
    table: Mutex<Table>,
    changed: Condvar,
    stop: AtomicBool,
    faults: AtomicU64,
    fetched_for_faults: AtomicU64,
    streamed: AtomicU64,
    bytes: AtomicU64,
    poisoned: AtomicU64,
}

/// Pages fetched: runs (first index, pages) and their bytes.
type Fetched = (Vec<(usize, u32)>, Vec<u8>);

enum FromStream {
    Pages(Vec<(usize, u32)>, Vec<u8>),
    /// Every page with data has been sent.
    Done,
    Failed(String),
}

/// Post-copy of one migrated process's memory, under way.
pub struct PostCopy {
    shared: Arc<Shared>,
    wake: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PostCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostCopy").field("stats", &self.stats()).finish()
    }
}

impl PostCopy {
    /// Starts serving the process that `uffd` belongs to (rebuilt from `image`), its pages
    /// fetched with `fetch`.
    pub fn start(
        uffd: ForeignUffd,
        image: &ProcessImage,
        fetch: Arc<dyn FetchPages>,
    ) -> Result<PostCopy, MigrateError> {
        let (wake_r, wake_w) = super::fdpass::pipe(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .map_err(|e| MigrateError::Os(format!("pipe: {e}")))?;
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::new(image)),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            fetched_for_faults: AtomicU64::new(0),
            streamed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            poisoned: AtomicU64::new(0),
        });
        let wake = Arc::new(wake_w);
        let (tx, rx) = sync_channel(4);
        let s = shared.clone();
        let f = fetch.clone();
        let w = wake.clone();
        let streamer = std::thread::Builder::new()
            .name("mosaic-stream".into())
            .spawn(move || stream(&s, &*f, &tx, &w))
            .map_err(|e| MigrateError::Os(format!("thread: {e}")))?;
        let s = shared.clone();
        let installer = std::thread::Builder::new()
            .name("mosaic-install".into())
            .spawn(move || install_loop(&s, &uffd, &*fetch, &rx, &wake_r))
            .map_err(|e| MigrateError::Os(format!("thread: {e}")))?;
        Ok(PostCopy { shared, wake, threads: vec![streamer, installer] })
    }

    /// What it did so far.
    pub fn stats(&self) -> PostCopyStats {
        let s = &self.shared;
        let t = lock(&s.table);
        PostCopyStats {
            pages: t.total as u64,
            settled: t.settled_n as u64,
            faults: s.faults.load(Ordering::Relaxed),
            fetched_for_faults: s.fetched_for_faults.load(Ordering::Relaxed),
            streamed: s.streamed.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            poisoned: s.poisoned.load(Ordering::Relaxed),
        }
    }

    /// Waits until every page with data at the source is here (then the userfaultfd is closed:
    /// the process owns all its memory, and its other pages read as zeros, as they did), or the
    /// source was lost (`Err`, the missing pages poisoned), at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<PostCopyStats, MigrateError> {
        let deadline = Instant::now() + timeout;
        {
            let mut t = lock(&self.shared.table);
            while !t.finished && t.failed.is_none() && !self.shared.stop.load(Ordering::Relaxed) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(MigrateError::TimedOut(timeout));
                }
                t = self
                    .shared
                    .changed
                    .wait_timeout(t, left.min(Duration::from_millis(100)))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if let Some(f) = &t.failed {
                return Err(MigrateError::SourceLost(f.clone()));
            }
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        Ok(self.stats())
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        poke(&self.wake);
        self.shared.changed.notify_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for PostCopy {
    fn drop(&mut self) {
        self.halt();
    }
}

fn poke(w: &OwnedFd) {
    // SAFETY: a one-byte write to our pipe (a full pipe means a wake-up is pending anyway).
    unsafe { libc::write(w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
}

fn stream(s: &Shared, fetch: &dyn FetchPages, tx: &SyncSender<FromStream>, wake: &OwnedFd) {
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let hint = {
            let t = lock(&s.table);
            if t.failed.is_some() || t.total == 0 {
                None
            } else {
                Some(t.src_of(t.cursor.min(t.total - 1)))
            }
        };
        let msg = match hint.map(|h| fetch.next(h, STREAM_BATCH)) {
            None => FromStream::Done,
            Some(Err(e)) => FromStream::Failed(e),
            Some(Ok((addrs, bytes, done))) => {
                // Runs of consecutive indexes; each page the source sends, it sends once.
                let mut batch: Vec<(usize, u32)> = Vec::new();
                {
                    let mut t = lock(&s.table);
                    for a in addrs {
                        let Some(i) = t.at_src(a) else {
                            // Not a page of ours (cannot happen with a sane source): kept in
                            // line with the bytes, installed nowhere.
                            batch.push((usize::MAX, 1));
                            continue;
                        };
                        set(&mut t.claimed, i);
                        t.cursor = (i + 1) % t.total.max(1);
                        match batch.last_mut() {
                            Some((f, n)) if *f != usize::MAX && *f + *n as usize == i => *n += 1,
                            _ => batch.push((i, 1)),
                        }
                    }
                }
                if !batch.is_empty() && tx.send(FromStream::Pages(batch, bytes)).is_err() {
                    return;
                }
                if done {
                    FromStream::Done
                } else {
                    poke(wake);
                    continue;
                }
            }
        };
        let last = !matches!(msg, FromStream::Pages(..));
        if tx.send(msg).is_err() {
            return;
        }
        poke(wake);
        if last {
            return;
        }
    }
}

fn install_loop(s: &Shared, uffd: &ForeignUffd, fetch: &dyn FetchPages, rx: &Receiver<FromStream>, wake: &OwnedFd) {
    let mut events = Vec::new();
    // Pages fetched and not installed yet (an event came first), and faults to serve.
    let mut pending: Vec<Fetched> = Vec::new();
    let mut faults: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    let mut stream_done = false;
    // Faults whose zero page met an unread event: served again after the next read.
    let mut retry: Vec<u64> = Vec::new();
    loop {
        {
            let mut t = lock(&s.table);
            if stream_done && pending.is_empty() && faults.is_empty() && retry.is_empty() {
                t.finished = true;
            }
            if t.finished || t.failed.is_some() || s.stop.load(Ordering::Relaxed) {
                s.changed.notify_all();
                return;
            }
        }
        // Wait for an event or the stream (bounded, so a stop is seen).
        let mut p = [
            libc::pollfd { fd: uffd.raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let timeout = if pending.is_empty() && retry.is_empty() { 100 } else { 0 };
        // SAFETY: poll on two valid pollfds.
        unsafe { libc::poll(p.as_mut_ptr(), 2, timeout) };
        if p[1].revents != 0 {
            let mut b = [0u8; 64];
            // SAFETY: draining our non-blocking pipe.
            while unsafe { libc::read(wake.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) } > 0 {}
        }
        events.clear();
        if let Err(e) = uffd.read_events(Duration::ZERO, &mut events) {
            fail(s, uffd, format!("reading the process's faults: {e}"));
            return;
        }
        {
            let mut t = lock(&s.table);
            for &e in &events {
                match e {
                    Event::Fault(a) => faults.push_back(a),
                    other => follow_event(&mut t, uffd, other),
                }
            }
        }
        faults.extend(retry.drain(..));
        while let Some(a) = faults.pop_front() {
            s.faults.fetch_add(1, Ordering::Relaxed);
            serve_fault(s, uffd, fetch, a, &mut faults, &mut pending, &mut retry);
        }
        loop {
            match rx.try_recv() {
                Ok(FromStream::Pages(batch, bytes)) => pending.push((batch, bytes)),
                Ok(FromStream::Done) => stream_done = true,
                Ok(FromStream::Failed(e)) => {
                    fail(s, uffd, e);
                    return;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        // Install what the stream brought; what meets an unread event waits for the next round.
        let mut keep = Vec::new();
        for (batch, bytes) in pending.drain(..) {
            let n: u64 = batch.iter().map(|&(_, n)| u64::from(n)).sum();
            if let Some(rest) = install(s, uffd, &batch, &bytes) {
                keep.push(rest);
            } else {
                s.streamed.fetch_add(n, Ordering::Relaxed);
            }
        }
        pending = keep;
        s.changed.notify_all();
    }
}

/// Serves a fault at `a`: fetches its page (and the next ones of its run not taken yet) and
/// installs them; what an unread event holds back goes to `pending`, faults read meanwhile to
/// `faults`.
fn serve_fault(
    s: &Shared,
    uffd: &ForeignUffd,
    fetch: &dyn FetchPages,
    a: u64,
    faults: &mut std::collections::VecDeque<u64>,
    pending: &mut Vec<Fetched>,
    retry: &mut Vec<u64>,
) {
    let claim = {
        let mut t = lock(&s.table);
        match t.at_dst(a) {
            // No data at the source there, or discarded since: zeros.
            None => None,
            Some(i) if bit(&t.settled, i) => None,
            // On its way (the stream's, or held back): its install wakes the thread.
            Some(i) if bit(&t.claimed, i) => return,
            Some(i) => {
                let c = t.claim_from(i, FAULT_AROUND);
                t.cursor = (i + FAULT_AROUND) % t.total.max(1);
                c.map(|(i, n)| (i, n, t.src_of(i)))
            }
        }
    };
    let Some((i, n, _)) = claim else {
        match uffd.zero(a, PAGE) {
            // An event waits unread: served again once it is followed.
            Ok(Installed::Again { .. }) => retry.push(a),
            Ok(_) => {}
            Err(e) => {
                log::error!("migrated process: zero page at {a:#x}: {e}; it is poisoned");
                let _ = uffd.poison(a, PAGE);
            }
        }
        return;
    };
    let srcs: Vec<u64> = {
        let t = lock(&s.table);
        (i..i + n as usize).map(|x| t.src_of(x)).collect()
    };
    let (kinds, bytes) = match fetch.fetch(&srcs) {
        Ok(k) if k.0.len() == srcs.len() => k,
        Ok(_) => return fail(s, uffd, "the source answered for other pages than asked".into()),
        Err(e) => return fail(s, uffd, e),
    };
    // Pages with data install from the bytes, in runs; those never there are zeros; those the
    // stream took come with it (still claimed, so a fault on them waits for that).
    let mut batch: Vec<(usize, u32)> = Vec::new();
    let mut zeros = Vec::new();
    for (k, g) in kinds.iter().enumerate() {
        let x = i + k;
        match g {
            Got::Data => match batch.last_mut() {
                Some((f, m)) if *f + *m as usize == x => *m += 1,
                _ => batch.push((x, 1)),
            },
            Got::Zero => zeros.push(x),
            Got::Sent => {}
        }
    }
    let data: u64 = batch.iter().map(|&(_, m)| u64::from(m)).sum();
    if bytes.len() as u64 != data * PAGE {
        return fail(s, uffd, format!("the source sent {} bytes for {data} pages", bytes.len()));
    }
    s.fetched_for_faults.fetch_add(data, Ordering::Relaxed);
    let mut held = Vec::new();
    if !batch.is_empty() {
        held.extend(install(s, uffd, &batch, &bytes));
    }
    for x in zeros {
        if let Some(rest) = install_zero(s, uffd, x) {
            held.push(rest);
        }
    }
    if !held.is_empty() {
        // The process is changing its mappings: follow what it did, then the main loop installs
        // the rest.
        let mut ev = Vec::new();
        let _ = uffd.read_events(Duration::ZERO, &mut ev);
        let mut t = lock(&s.table);
        for e in ev {
            match e {
                Event::Fault(f) => faults.push_back(f),
                other => follow_event(&mut t, uffd, other),
            }
        }
        pending.extend(held);
    }
}

/// Maps a zero page where page `x` is now (it never held data at the source). What an unread
/// event holds back comes back as a batch of one page with no bytes.
fn install_zero(s: &Shared, uffd: &ForeignUffd, x: usize) -> Option<Fetched> {
    let mut t = lock(&s.table);
    if bit(&t.settled, x) {
        return None;
    }
    let r = t.runs[t.run_of(x)];
    let Some(d) = r.dst else {
        t.settle(x);
        return None;
    };
    let dst = d + (x - r.first) as u64 * PAGE;
    match uffd.zero(dst, PAGE) {
        Ok(Installed::Again { done: 0 }) => Some((vec![(x, 1)], Vec::new())),
        Ok(_) => {
            t.settle(x);
            None
        }
        Err(e) => {
            log::error!("migrated process: zero page at {dst:#x}: {e}; it is poisoned");
            let _ = uffd.poison(dst, PAGE);
            t.settle(x);
            None
        }
    }
}

/// Installs fetched pages where they belong now (skipping those discarded or unmapped
/// meanwhile). Returns what is left if an unread event stopped it.
fn install(s: &Shared, uffd: &ForeignUffd, batch: &[(usize, u32)], bytes: &[u8]) -> Option<Fetched> {
    if bytes.is_empty() {
        // Zero pages held back by an event.
        let held: Vec<Fetched> =
            batch.iter().flat_map(|&(x, n)| x..x + n as usize).filter_map(|x| install_zero(s, uffd, x)).collect();
        return (!held.is_empty()).then(|| (held.iter().flat_map(|(b, _)| b.clone()).collect(), Vec::new()));
    }
    let mut t = lock(&s.table);
    let mut off = 0usize;
    for (k, &(first, n)) in batch.iter().enumerate() {
        if first == usize::MAX {
            off += n as usize * PAGE as usize;
            continue;
        }
        let mut i = first;
        let end = first + n as usize;
        while i < end {
            if bit(&t.settled, i) {
                i += 1;
                continue;
            }
            // The longest stretch from i that is unsettled and contiguous at the destination.
            let r = t.runs[t.run_of(i)];
            let stop = end.min(r.first + r.pages as usize);
            let mut j = i;
            while j < stop && !bit(&t.settled, j) {
                j += 1;
            }
            let Some(d) = r.dst else {
                (i..j).for_each(|x| t.settle(x));
                i = j;
                continue;
            };
            let dst = d + (i - r.first) as u64 * PAGE;
            let from = off + (i - first) * PAGE as usize;
            let data = &bytes[from..from + (j - i) * PAGE as usize];
            match uffd.copy(dst, data) {
                Ok(Installed::Done | Installed::Gone) => {
                    s.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    (i..j).for_each(|x| t.settle(x));
                    i = j;
                }
                Ok(Installed::Again { done }) => {
                    let done_pages = (done / PAGE) as usize;
                    (i..i + done_pages).for_each(|x| t.settle(x));
                    // Give back the rest, from the first page not in.
                    let resume = i + done_pages;
                    let mut rest_batch = vec![(resume, (end - resume) as u32)];
                    rest_batch.extend_from_slice(&batch[k + 1..]);
                    let cut = off + (resume - first) * PAGE as usize;
                    return Some((rest_batch, bytes[cut..].to_vec()));
                }
                Err(e) => {
                    // Never leave them to read as zeros: poisoned, a touch raises SIGBUS.
                    let len = data.len() as u64;
                    log::error!("migrated process: installing pages {dst:#x}-{:#x}: {e}; they are poisoned", dst + len);
                    if let Err(p) = uffd.poison(dst, len) {
                        log::error!("migrated process: cannot poison {dst:#x}-{:#x} either: {p}", dst + len);
                    }
                    s.poisoned.fetch_add(len / PAGE, Ordering::Relaxed);
                    (i..j).for_each(|x| t.settle(x));
                    i = j;
                }
            }
        }
        off += n as usize * PAGE as usize;
    }
    None
}

/// Follows an event the process caused (under the table's lock), waking the threads that wait
/// on the pages it moved or dropped: they fault again and are served under the new table
/// (a page settled by a discard would otherwise never wake its waiter).
fn follow_event(t: &mut Table, uffd: &ForeignUffd, e: Event) {
    match e {
        Event::Fault(_) => {}
        Event::Fork(child) => forked(t, child),
        Event::Remap { from, len, .. } => {
            t.follow(e);
            let _ = uffd.wake(from, len);
        }
        Event::Remove { start, end } | Event::Unmap { start, end } => {
            t.follow(e);
            let _ = uffd.wake(start, end - start);
        }
    }
}

/// Poisons, through `uffd`, every page of the table not settled yet (a touch raises SIGBUS);
/// returns the ranges, for the log.
fn poison_unsettled(t: &mut Table, uffd: &ForeignUffd) -> (u64, Vec<String>) {
    let (mut pages, mut lost) = (0, Vec::new());
    let mut k = 0;
    while k < t.runs.len() {
        let r = t.runs[k];
        k += 1;
        let Some(d) = r.dst else { continue };
        let mut i = r.first;
        let end = r.first + r.pages as usize;
        while i < end {
            if bit(&t.settled, i) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < end && !bit(&t.settled, j) {
                j += 1;
            }
            let at = d + (i - r.first) as u64 * PAGE;
            let len = (j - i) as u64 * PAGE;
            let mut done = 0;
            // An unread event holds installs back: follow it (the table may change under us:
            // what is poisoned stays poisoned, what moved is poisoned where it went, later).
            for _ in 0..10_000 {
                match uffd.poison(at + done, len - done) {
                    Ok(Installed::Again { done: d2 }) => {
                        done += d2;
                        let mut ev = Vec::new();
                        let _ = uffd.read_events(Duration::ZERO, &mut ev);
                        for e in ev {
                            if !matches!(e, Event::Fault(_)) {
                                follow_event(t, uffd, e);
                            }
                        }
                        std::thread::yield_now();
                    }
                    Ok(_) => break,
                    Err(e) => {
                        log::error!("migrated process: cannot poison {at:#x}+{len:#x}: {e}");
                        break;
                    }
                }
            }
            pages += (j - i) as u64;
            lost.push(format!("{at:#x}-{:#x}", at + len));
            i = j;
        }
    }
    (pages, lost)
}

/// The source is lost: every page not here yet is poisoned (a touch raises SIGBUS), and named.
fn fail(s: &Shared, uffd: &ForeignUffd, why: String) {
    let mut t = lock(&s.table);
    let (pages, lost) = poison_unsettled(&mut t, uffd);
    s.poisoned.fetch_add(pages, Ordering::Relaxed);
    log::error!(
        "migrated process: the source is lost ({why}); pages that had not arrived raise SIGBUS: {}",
        lost.join(", ")
    );
    t.failed = Some(why);
    s.changed.notify_all();
}

/// The process forked before all its pages came: the child's missing pages are poisoned (it
/// would read zeros there otherwise). A child that execs, as most do, never notices.
fn forked(t: &mut Table, child: i32) {
    if child < 0 {
        return;
    }
    // SAFETY: the kernel handed this new descriptor over with the event; it is ours to close.
    let child = ForeignUffd::from_fd(unsafe { std::os::fd::OwnedFd::from_raw_fd(child) });
    let (pages, _) = poison_unsettled(t, &child);
    if pages > 0 {
        log::warn!("migrated process forked before {pages} of its pages came: in the child they raise SIGBUS");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(runs: &[(u64, u64)]) -> Table {
        let mut v = Vec::new();
        let mut n = 0;
        for &(start, pages) in runs {
            v.push(Run { src: start, pages, first: n, dst: Some(start) });
            n += pages as usize;
        }
        Table::with_runs(v, n)
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn early_pages_are_cut_out_of_the_runs() {
        assert_eq!(without(0..100, &[10..20, 30..40]), vec![0..10, 20..30, 40..100]);
        assert_eq!(without(0..100, &[0..100]), vec![]);
        assert_eq!(without(50..60, &[0..55]), vec![55..60]);
    }

    #[test]
    fn remap_moves_pages_and_keeps_their_source() {
        let mut t = table(&[(0x10000, 8)]);
        t.follow(Event::Remap { from: 0x12000, to: 0x50000, len: 0x2000 });
        assert_eq!(t.at_dst(0x12000), None);
        assert_eq!(t.at_dst(0x50000), Some(2));
        assert_eq!(t.at_dst(0x51000), Some(3));
        assert_eq!(t.at_dst(0x14000), Some(4));
        assert_eq!(t.src_of(3), 0x13000);
    }

    #[test]
    fn discarded_and_unmapped_pages_settle_without_coming() {
        let mut t = table(&[(0x10000, 4), (0x20000, 4)]);
        t.follow(Event::Remove { start: 0x11000, end: 0x13000 });
        assert_eq!(t.settled_n, 2);
        t.follow(Event::Unmap { start: 0x20000, end: 0x30000 });
        assert_eq!(t.settled_n, 6);
        assert_eq!(t.at_dst(0x20000), None);
        // A fault takes only what is left of its run.
        assert_eq!(t.claim_from(0, 16), Some((0, 1)));
        assert_eq!(t.claim_from(3, 16), Some((3, 1)));
    }

    #[test]
    fn pages_are_found_by_their_source_address_after_a_remap() {
        let mut t = table(&[(0x10000, 100), (0x90000, 10)]);
        assert_eq!(t.claim_from(10, 16), Some((10, 16)));
        assert_eq!(t.claim_from(20, 16), None, "taken already");
        t.follow(Event::Remap { from: 0x10000, to: 0x700000, len: 0x8000 });
        assert_eq!(t.at_src(0x10000 + 5 * PAGE), Some(5));
        assert_eq!(t.at_src(0x90000 + 9 * PAGE), Some(109));
        assert_eq!(t.at_src(0x90000 + 10 * PAGE), None);
        assert_eq!(t.at_dst(0x700000 + 5 * PAGE), Some(5));
    }
}
