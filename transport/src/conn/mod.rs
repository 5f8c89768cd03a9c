//! The client side of a connection: many outstanding requests from many threads, multiplexed by
//! request id over one byte stream.
//!
//! # Receive path: leader/follower, no reader thread
//! There is no dedicated receive thread: handing a response from a reader thread to the waiting
//! thread would cost a cross-core wake-up (30-35 us here), several times a loopback round trip.
//! Instead a waiting caller that finds the receive side free becomes the *leader*: it reads
//! frames, completes whichever requests they answer (its own or other threads'), and leaves when
//! its own requests are done, waking one remaining waiter to take over. A caller that finds a
//! leader present spins briefly, then parks until the leader completes its request or leaves.
//!
//! # Zero-copy page reads
//! A page read registers the caller's page buffer in its slot; the leader reads the payload of
//! the matching response straight into it. The buffer stays valid because the caller does not
//! return until its slot is completed or it has removed the slot from the pending table itself.
//!
//! # Invariants
//! 1. A slot is in `pending` iff its request was issued and nobody has started completing it.
//! 2. Only the leader (holder of `reader`) removes a slot to complete it, and it finishes the
//!    frame (writing the payload into the slot's destination) before storing a final state.
//! 3. A caller returns only after each of its slots is final, or after it removed the slot from
//!    `pending` itself (time-out), so no one writes into its buffer afterwards. For calls started
//!    without waiting ([`Connection::start_call_pages`]) the [`PagesInFlight`] handle owns the
//!    buffers instead, and hands them out (or frees them) only under the same condition.
//! 4. Once `closed` is set, no slot is added to `pending`, and all slots in it fail.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use thiserror::Error;

#[cfg(test)]
mod measure;
mod reader;
mod slot;

use crate::auth::ServerInfo;
use crate::page::Page;
use crate::stream::{read_some, ByteStream, Deadline, ReadStop, WaitPolicy};
use crate::sync::lock;
use crate::wire::{FrameError, Header, Opcode, Status, HEADER_LEN, PAGE_SIZE};
use reader::{Reader, ReaderLock};
use slot::{thread_token, Dest, PendingMap, Request, Slot};

/// Why a request failed.
#[derive(Clone, Debug, Error)]
#[non_exhaustive]
pub enum CallError {
    /// The connection is closed (peer died, stream failed, protocol error, or closed locally).
    #[error("connection to {peer} is closed: {reason}")]
    Disconnected {
        /// The peer.
        peer: String,
        /// Why it closed.
        reason: String,
    },
    /// No response arrived within the connection's request time-out.
    #[error("request to {peer} timed out after {after:?}")]
    TimedOut {
        /// The peer.
        peer: String,
        /// How long the caller waited.
        after: Duration,
    },
    /// The peer answered with an error.
    #[error("{peer} refused the request: {message} (status {code})")]
    Remote {
        /// The peer.
        peer: String,
        /// The raw status code.
        code: u32,
        /// The status, if this build knows the code.
        status: Option<Status>,
        /// The peer's message.
        message: String,
    },
    /// A response that should have been one page had another size (the connection stays usable).
    #[error("{peer} answered with {got} bytes where one page ({expected} bytes) was expected")]
    WrongSize {
        /// The peer.
        peer: String,
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The request payload is larger than the peer accepts in one frame.
    #[error("request of {len} bytes exceeds the peer's maximum frame of {max} bytes")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// The peer's maximum.
        max: u32,
    },
}

impl CallError {
    /// The peer's status code, if the peer refused the request.
    pub fn status(&self) -> Option<Status> {
        match self {
            CallError::Remote { status, .. } => *status,
            _ => None,
        }
    }
}

/// One-sided page access that bypasses the frame protocol (RDMA READ/WRITE).
pub(crate) trait OneSided: Send + Sync {
    /// Reads each page into its buffer. An error leaves the connection unusable.
    fn read_pages(&self, reads: &mut [(u64, &mut Page)]) -> Result<(), String>;
    /// Writes each page. An error leaves the connection unusable.
    fn write_pages(&self, writes: &[(u64, &Page)]) -> Result<(), String>;
    /// Pages in the peer's window.
    fn window_pages(&self) -> u64;
}

/// The slots of one batch, with their ids.
type Slots = SmallVec<[(u64, Arc<Slot>); 4]>;
/// The responses of one batch.
type Responses = SmallVec<[Vec<u8>; 1]>;

struct Shared {
    stream: Box<dyn ByteStream>,
    peer: String,
    info: ServerInfo,
    policy: WaitPolicy,
    timeout: Duration,
    send: Mutex<()>,
    reader: ReaderLock,
    pending: Mutex<PendingMap>,
    /// Page reads in `pending`: while non-zero, the leader reads no further than a header.
    page_reads: Arc<AtomicUsize>,
    /// Number of threads parked in `wait`, which a leaving leader must wake.
    followers: AtomicUsize,
    /// The parked threads themselves.
    parked: Mutex<Vec<Thread>>,
    /// Followers spinning right now (at most [`max_spinning_followers`]; the rest park at once).
    spinning: AtomicUsize,
    closed: OnceLock<String>,
    one_sided: Option<Box<dyn OneSided>>,
    protection: crate::Protection,
}

/// A client connection to one peer. Cheap to clone; all clones share the connection and may be
/// used from any number of threads at once.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("peer", &self.shared.peer).field("info", &self.shared.info).finish()
    }
}

/// Page calls sent by [`Connection::start_call_pages`] and not yet collected. Owns the pages
/// their responses land in.
pub struct PagesInFlight {
    conn: Connection,
    slots: Slots,
    /// `None` once handed back by `wait`.
    pages: Option<Box<[Page]>>,
}

impl std::fmt::Debug for PagesInFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagesInFlight").field("peer", &self.conn.shared.peer).field("calls", &self.slots.len()).finish()
    }
}

/// How long a thread waiting on calls another thread started parks at a time.
const FOREIGN_PARK: Duration = Duration::from_micros(50);

impl PagesInFlight {
    /// Waits for every response (within the connection's time-out, counted from now) and hands
    /// the pages back with, per call, whether its response arrived (its page holds it).
    pub fn wait(mut self) -> (Box<[Page]>, Vec<bool>) {
        let mine = self.slots.first().is_some_and(|(_, s)| s.owned_by(thread_token()));
        self.conn.wait_final(&self.slots, if mine { MAX_PARK } else { FOREIGN_PARK });
        let ok = self.slots.iter().map(|(_, s)| s.succeeded()).collect();
        // Every slot is final or withdrawn by now: nobody writes the pages any more.
        for (_, s) in self.slots.drain(..) {
            Slot::recycle(s);
        }
        (self.pages.take().unwrap_or_default(), ok)
    }
}

impl Drop for PagesInFlight {
    /// Gives the calls up: withdraws those not yet answered and waits out one being received, so
    /// the pages are nobody's when they are freed.
    fn drop(&mut self) {
        if !self.slots.is_empty() {
            self.conn.cancel(&self.slots);
        }
    }
}

/// How long a follower spins before parking.
const FOLLOWER_SPIN: Duration = Duration::from_micros(20);
/// Followers that may spin at once: the cores left once the leader and one more busy thread
/// (a server's, or the application's) have theirs; none on 2 cores. A spinning follower sees its
/// completion without a wake-up, but spinners beyond the spare cores take the CPU from the
/// leader and the server: with 16 threads faulting on 2 vCPUs, one spinning follower took a
/// fifth of all CPU time, and with none, 16 threads made 53,000 faults/s instead of 40,000 (shm).
fn max_spinning_followers() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(2))
}
/// Longest park, so deadlines are noticed.
const MAX_PARK: Duration = Duration::from_millis(20);

impl Connection {
    pub(crate) fn new(
        stream: Box<dyn ByteStream>,
        info: ServerInfo,
        policy: WaitPolicy,
        timeout: Duration,
        one_sided: Option<Box<dyn OneSided>>,
    ) -> Connection {
        let peer = stream.peer();
        let page_reads = Arc::new(AtomicUsize::new(0));
        Connection {
            shared: Arc::new(Shared {
                stream,
                peer,
                info,
                policy,
                timeout,
                send: Mutex::new(()),
                reader: ReaderLock::new(),
                pending: Mutex::new(PendingMap::new(page_reads.clone())),
                page_reads,
                followers: AtomicUsize::new(0),
                parked: Mutex::new(Vec::new()),
                spinning: AtomicUsize::new(0),
                closed: OnceLock::new(),
                one_sided,
                protection: crate::Protection::None,
            }),
        }
    }

    /// Records what protects the connection's frames (set once, before it is shared).
    pub(crate) fn with_protection(mut self, p: crate::Protection) -> Connection {
        if let Some(s) = Arc::get_mut(&mut self.shared) {
            s.protection = p;
        }
        self
    }

    /// What protects this connection's frames (agreed in the handshake).
    pub fn protection(&self) -> crate::Protection {
        self.shared.protection
    }

    /// The peer's address, as a URI.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Pages in the peer's one-sided window (0: the peer exposes none).
    pub fn window_pages(&self) -> u64 {
        self.shared.info.window_pages
    }

    /// The largest payload the peer accepts in one frame.
    pub fn max_frame(&self) -> u32 {
        self.shared.info.max_frame
    }

    /// True once the connection has closed; every request then fails with `Disconnected`.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.get().is_some()
    }

    /// True if the connection is closed or its peer has hung up: asked of the kernel without
    /// reading (about a microsecond), so a peer process that died is noticed before any request
    /// fails; a peer whose host vanished is noticed only when a request times out.
    pub fn peer_hung_up(&self) -> bool {
        self.is_closed() || self.shared.stream.peer_hung_up()
    }

    /// Closes the connection; outstanding and later requests fail with `Disconnected`.
    pub fn close(&self) {
        self.shared.fail("closed locally".into());
    }

    /// Sends `request` to the peer's service method `method` and waits for its response.
    pub fn call(&self, method: u64, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let mut out =
            self.submit([Request { opcode: Opcode::Call, arg: method, dest: Dest::Bytes, payload: request }])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Sends several calls to `method` at once (one write, one wait) and returns their responses
    /// in order. If any fails, the first failure is returned.
    pub fn call_batch(&self, method: u64, requests: &[&[u8]]) -> Result<Vec<Vec<u8>>, CallError> {
        self.submit(requests.iter().map(|r| Request {
            opcode: Opcode::Call,
            arg: method,
            dest: Dest::Bytes,
            payload: r,
        }))
        .map(SmallVec::into_vec)
    }

    /// Calls `method` with `request`; the response, which must be exactly one page, lands
    /// directly in `dst` (no intermediate copy).
    pub fn call_page(&self, method: u64, request: &[u8], dst: &mut Page) -> Result<(), CallError> {
        self.call_pages(method, &mut [(request, dst)])
    }

    /// Several [`call_page`](Self::call_page)s at once (one write, one wait); each response lands
    /// in its page. If any fails, the first failure is returned.
    pub fn call_pages(&self, method: u64, calls: &mut [(&[u8], &mut Page)]) -> Result<(), CallError> {
        let reqs = calls.iter_mut().map(|(request, dst)| Request {
            opcode: Opcode::Call,
            arg: method,
            dest: Dest::Page(dst.0.as_mut_ptr()),
            payload: request,
        });
        self.submit(reqs).map(|_| ())
    }

    /// Sends page calls (as [`call_pages`](Self::call_pages): `requests[k]`'s response lands in
    /// `pages[k]`) and returns at once, without waiting for the responses: collect them later
    /// with [`PagesInFlight::wait`], from any thread. Meanwhile any caller on this connection
    /// may receive them. The pages belong to the calls until then; dropping the handle gives
    /// the calls up. Refused with [`CallError::WrongSize`] unless there is one page per request.
    pub fn start_call_pages(
        &self,
        method: u64,
        requests: &[&[u8]],
        mut pages: Box<[Page]>,
    ) -> Result<PagesInFlight, CallError> {
        if requests.len() != pages.len() {
            return Err(CallError::WrongSize {
                peer: self.shared.peer.clone(),
                expected: requests.len(),
                got: pages.len(),
            });
        }
        // The pointers stay valid when the box moves into the handle: the pages are on the heap,
        // and the handle keeps them until the slots are final or withdrawn.
        let reqs = requests.iter().zip(pages.iter_mut()).map(|(request, page)| Request {
            opcode: Opcode::Call,
            arg: method,
            dest: Dest::Page(page.0.as_mut_ptr()),
            payload: request,
        });
        let slots = self.issue(reqs)?;
        Ok(PagesInFlight { conn: self.clone(), slots, pages: Some(pages) })
    }

    /// Reads page `index` of the peer's window into `dst`.
    pub fn read_page(&self, index: u64, dst: &mut Page) -> Result<(), CallError> {
        self.read_pages(&mut [(index, dst)])
    }

    /// Reads several pages with all requests outstanding at once (one write, one wait). Each
    /// page lands directly in its buffer.
    pub fn read_pages(&self, reads: &mut [(u64, &mut Page)]) -> Result<(), CallError> {
        if let Some(os) = &self.shared.one_sided {
            self.check_window(reads.iter().map(|(i, _)| *i), os.window_pages())?;
            return os.read_pages(reads).map_err(|e| self.one_sided_failed(e));
        }
        let reqs = reads.iter_mut().map(|(index, dst)| Request {
            opcode: Opcode::ReadPage,
            arg: *index,
            dest: Dest::Page(dst.0.as_mut_ptr()),
            payload: &[],
        });
        self.submit(reqs).map(|_| ())
    }

    /// Writes `src` to page `index` of the peer's window.
    pub fn write_page(&self, index: u64, src: &Page) -> Result<(), CallError> {
        self.write_pages(&[(index, src)])
    }

    /// Writes several pages with all requests outstanding at once.
    pub fn write_pages(&self, writes: &[(u64, &Page)]) -> Result<(), CallError> {
        if let Some(os) = &self.shared.one_sided {
            self.check_window(writes.iter().map(|(i, _)| *i), os.window_pages())?;
            return os.write_pages(writes).map_err(|e| self.one_sided_failed(e));
        }
        let reqs = writes.iter().map(|(index, src)| Request {
            opcode: Opcode::WritePage,
            arg: *index,
            dest: Dest::Bytes,
            payload: &src.0[..],
        });
        self.submit(reqs).map(|_| ())
    }

    /// Registers, sends (with one vectored write) and waits for a batch of requests.
    fn submit<'p>(&self, reqs: impl IntoIterator<Item = Request<'p>>) -> Result<Responses, CallError> {
        let slots = self.issue(reqs)?;
        let out = self.wait(&slots);
        for (_, s) in slots {
            Slot::recycle(s);
        }
        out
    }

    /// Registers a batch of requests and sends them with one vectored write; returns their
    /// slots (nothing stays registered if it fails).
    fn issue<'p>(&self, reqs: impl IntoIterator<Item = Request<'p>>) -> Result<Slots, CallError> {
        let mut slots: Slots = SmallVec::new();
        let mut frames: SmallVec<[([u8; HEADER_LEN], &[u8]); 4]> = SmallVec::new();
        {
            // The whole batch under one lock (invariants 1 and 4: checked under the lock that
            // `fail` drains, so no slot is added after the drain).
            let mut pending = lock(&self.shared.pending);
            if self.is_closed() {
                return Err(self.disconnected());
            }
            for r in reqs {
                let len = match self.check_len(r.payload.len()) {
                    Ok(len) => len,
                    Err(e) => {
                        for (id, _) in &slots {
                            pending.remove(id);
                        }
                        return Err(e);
                    }
                };
                let slot = Slot::new(r.dest, r.opcode);
                let id = pending.insert_next(slot.clone());
                frames.push((Header::request(r.opcode, id, r.arg, len).encode(), r.payload));
                slots.push((id, slot));
            }
        }
        let mut bufs: SmallVec<[&[u8]; 8]> = SmallVec::with_capacity(2 * frames.len());
        for (h, p) in &frames {
            bufs.push(h);
            bufs.push(p);
        }
        if let Err(e) = self.send(&bufs) {
            self.abandon(&slots);
            return Err(e);
        }
        Ok(slots)
    }

    /// One-sided access checks bounds locally: an access outside the registered window would
    /// break the queue pair for everyone.
    fn check_window(&self, mut indices: impl Iterator<Item = u64>, pages: u64) -> Result<(), CallError> {
        if self.is_closed() {
            return Err(self.disconnected());
        }
        if pages == 0 {
            return Err(self.remote(Status::NoWindow, "this server exposes no page window".into()));
        }
        match indices.find(|i| *i >= pages) {
            Some(i) => {
                Err(self.remote(Status::PageOutOfRange, format!("page {i} is outside the window of {pages} pages")))
            }
            None => Ok(()),
        }
    }

    fn remote(&self, status: Status, message: String) -> CallError {
        CallError::Remote { peer: self.shared.peer.clone(), code: status as u32, status: Some(status), message }
    }

    fn one_sided_failed(&self, why: String) -> CallError {
        self.shared.fail(why);
        self.disconnected()
    }

    fn check_len(&self, len: usize) -> Result<u32, CallError> {
        let max = self.shared.info.max_frame;
        u32::try_from(len).ok().filter(|l| *l <= max).ok_or(CallError::TooLarge { len, max })
    }

    fn disconnected(&self) -> CallError {
        let reason = self.shared.closed.get().cloned().unwrap_or_default();
        CallError::Disconnected { peer: self.shared.peer.clone(), reason }
    }

    /// Removes slots whose requests were never (completely) sent.
    fn abandon(&self, slots: &[(u64, Arc<Slot>)]) {
        let mut pending = lock(&self.shared.pending);
        for (id, _) in slots {
            pending.remove(id);
        }
    }

    fn send(&self, bufs: &[&[u8]]) -> Result<(), CallError> {
        let _g = lock(&self.shared.send);
        if self.is_closed() {
            return Err(self.disconnected());
        }
        if let Err(e) = self.shared.stream.write_all(bufs) {
            // A partial write leaves the stream out of frame sync: the connection is unusable.
            self.shared.fail(format!("send failed: {e}"));
            return Err(self.disconnected());
        }
        Ok(())
    }

    /// Waits until every slot is final, leading the receive side when nobody else does.
    fn wait(&self, slots: &[(u64, Arc<Slot>)]) -> Result<Responses, CallError> {
        self.wait_final(slots, MAX_PARK);
        self.collect(slots)
    }

    /// Waits until every slot is final or given up on (timed out, or the connection lost):
    /// leads the receive side when nobody else does, else parks for at most `park` at a time (a
    /// slot's completion unparks the thread that created it, so a thread waiting on another
    /// thread's slots parks briefly).
    fn wait_final(&self, slots: &[(u64, Arc<Slot>)], park: Duration) {
        let timeout = self.shared.timeout;
        // Resolved against the clock only once this call has to wait as a follower.
        let mut deadline = Deadline::In(timeout);
        'outer: while !slots.iter().all(|(_, s)| s.is_final()) {
            if let Some(mut reader) = self.shared.reader.try_lock() {
                let r = self.shared.lead(&mut reader, slots, deadline);
                let lost = r.is_ok() && self.is_closed() && !slots.iter().all(|(_, s)| s.is_final());
                drop(reader);
                if lost {
                    // Closed, and we held the reader so no frame is in progress: an unfinished
                    // slot can never finish. That is a bug, but it must not spin forever.
                    log::error!("connection to {}: request lost on close", self.shared.peer);
                    self.abandon(slots);
                    self.shared.wake_next_leader();
                    break 'outer;
                }
                if r.is_err() {
                    // Withdraw our slots before handing over, so the next leader is a waiter.
                    self.cancel(slots);
                    self.shared.wake_next_leader();
                    break 'outer;
                }
                self.shared.wake_next_leader();
                continue;
            }
            // A leader is reading: spin a little (if few others do), then park until it
            // completes us or leaves.
            if self.shared.take_spin_turn() {
                let done = spin_until(FOLLOWER_SPIN, || slots.iter().all(|(_, s)| s.is_final()));
                self.shared.spinning.fetch_sub(1, Ordering::AcqRel);
                if done {
                    break 'outer;
                }
            }
            let now = Instant::now();
            let until = deadline.resolve(now).unwrap_or(now + timeout);
            deadline = Deadline::At(until);
            if now >= until {
                self.cancel(slots);
                break;
            }
            // Announce ourselves, then check again that a leader is still there: a leader leaves
            // by unlocking and then looking for parked followers, so one of us sees the other.
            self.shared.park_announce();
            let leaderless = self.shared.reader.is_free();
            if !leaderless && !slots.iter().all(|(_, s)| s.is_final()) {
                thread::park_timeout(park.min(until - now));
            }
            self.shared.park_withdraw();
        }
    }

    /// The outcomes of final slots, in order; the first failure if any failed or never finished.
    fn collect(&self, slots: &[(u64, Arc<Slot>)]) -> Result<Responses, CallError> {
        let timeout = self.shared.timeout;
        let mut out = Responses::with_capacity(slots.len());
        let mut first_err = None;
        for (_, s) in slots {
            let Some(outcome) = s.take() else {
                // Removed by `cancel` or `abandon`: nobody can complete it any more.
                first_err.get_or_insert(if self.is_closed() {
                    self.disconnected()
                } else {
                    CallError::TimedOut { peer: self.shared.peer.clone(), after: timeout }
                });
                continue;
            };
            match outcome {
                Ok(v) => out.push(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Gives up on slots after a time-out: removes those still pending, and waits for the ones a
    /// leader is completing right now (it finishes the frame within the connection time-out or
    /// fails the connection, so this wait is bounded).
    fn cancel(&self, slots: &[(u64, Arc<Slot>)]) {
        let mut in_flight = Vec::new();
        {
            let mut pending = lock(&self.shared.pending);
            for (id, s) in slots {
                if pending.remove(id).is_none() && !s.is_final() {
                    in_flight.push(s.clone());
                }
            }
        }
        for s in in_flight {
            while !s.is_final() {
                thread::park_timeout(MAX_PARK);
            }
        }
    }
}

impl Shared {
    /// Marks the connection closed and fails every pending request (invariant 4).
    fn fail(&self, reason: String) {
        if self.closed.set(reason.clone()).is_ok() {
            log::warn!("connection to {} closed: {reason}", self.peer);
        }
        self.stream.shutdown();
        let drained = lock(&self.pending).drain();
        let me = thread_token();
        let reason = self.closed.get().cloned().unwrap_or(reason);
        for s in drained {
            s.finish(Err(CallError::Disconnected { peer: self.peer.clone(), reason: reason.clone() }), me);
        }
    }

    /// Wakes one parked follower, so it can take over the receive side.
    fn wake_next_leader(&self) {
        // No fence: the reader lock's release was a SeqCst swap, and this load is SeqCst too,
        // as are a follower's increment and its look at the lock (`park_announce`, `is_free`):
        // in their single total order, either we see the follower or it sees the lock free.
        if self.followers.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(t) = lock(&self.parked).first() {
            t.unpark();
        }
    }

    /// Whether a follower may spin now (fewer spin than [`max_spinning_followers`]); if so it
    /// is counted in `spinning` and gives its turn back when done.
    fn take_spin_turn(&self) -> bool {
        let max = max_spinning_followers();
        if max == 0 {
            return false;
        }
        if self.spinning.fetch_add(1, Ordering::AcqRel) < max {
            return true;
        }
        self.spinning.fetch_sub(1, Ordering::AcqRel);
        false
    }

    fn park_announce(&self) {
        lock(&self.parked).push(thread::current());
        self.followers.fetch_add(1, Ordering::SeqCst);
    }

    fn park_withdraw(&self) {
        self.followers.fetch_sub(1, Ordering::SeqCst);
        let me = thread::current().id();
        let mut parked = lock(&self.parked);
        if let Some(i) = parked.iter().position(|t| t.id() == me) {
            parked.swap_remove(i);
        }
    }

    /// How the leader waits for the next frame: as configured, but without spinning when more
    /// followers are parked behind it than there are spare cores. A leader spinning there takes
    /// the CPU that the peer (on the same machine) and the followers it wakes need: 16 threads
    /// faulting over shm on 2 vCPUs made 50,000-53,000 faults/s with the leader spinning up to
    /// 100 us, 68,000-81,000 sleeping at once (2, 5 and 10 us of spin: within the same noise).
    fn leader_policy(&self) -> WaitPolicy {
        if self.followers.load(Ordering::Relaxed) > max_spinning_followers() {
            WaitPolicy::blocking()
        } else {
            self.policy
        }
    }

    /// Reads frames until all of `mine` are final. Returns `Err(())` on the caller's time-out.
    fn lead(&self, r: &mut Reader, mine: &[(u64, Arc<Slot>)], mut deadline: Deadline) -> Result<(), ()> {
        while !mine.iter().all(|(_, s)| s.is_final()) {
            if self.closed.get().is_some() {
                return Ok(()); // `fail` has finished every slot
            }
            // Between frames the caller's deadline applies; within a frame, the connection's.
            while r.have < HEADER_LEN {
                if r.ahead_start < r.ahead_end {
                    let mut h = [0u8; HEADER_LEN];
                    let n = r.take_ahead(&mut h[..HEADER_LEN - r.have]);
                    r.header[r.have..r.have + n].copy_from_slice(&h[..n]);
                    r.have += n;
                    continue;
                }
                // A lone page read gets its payload straight into its page (header read exactly);
                // with none, or, where reads are system calls, several (a batch, or many
                // threads), one large read takes many frames at once and payloads are copied out
                // of it: a 4 KiB copy costs a fraction of the read call it saves (tcp, 16 reads
                // outstanding: 600,000 -> 713,000-740,000 pages/s).
                let pages = self.page_reads.load(Ordering::Relaxed);
                let policy = self.leader_policy();
                let read = if pages == 0 || pages > 1 && self.stream.batch_reads() {
                    read_some(&*self.stream, &mut r.ahead[..], policy, deadline).map(|n| {
                        r.ahead_start = 0;
                        r.ahead_end = n;
                    })
                } else {
                    read_some(&*self.stream, &mut r.header[r.have..], policy, deadline).map(|n| r.have += n)
                };
                match read {
                    Ok(()) => {}
                    Err(ReadStop::TimedOut) => return Err(()),
                    Err(stop) => {
                        self.fail(describe(stop));
                        return Ok(());
                    }
                }
            }
            r.have = 0;
            if let Err(reason) = self.complete_frame(r) {
                self.fail(reason);
            }
            // Fix the deadline once more than one frame is needed, so answers to other
            // requests cannot keep extending this caller's wait.
            if let Deadline::In(d) = deadline {
                if !mine.iter().all(|(_, s)| s.is_final()) {
                    deadline = Deadline::At(Instant::now() + d);
                }
            }
        }
        Ok(())
    }

    /// Decodes the header in `r` and reads its payload to wherever it belongs.
    fn complete_frame(&self, r: &mut Reader) -> Result<(), String> {
        let h = Header::decode(&r.header, self.info.max_frame).map_err(|e| bad_frame(&e))?;
        if !h.is_response() || h.opcode.is_handshake() {
            return Err(format!("protocol error: unexpected {:?} frame from the server", h.opcode));
        }
        let frame_deadline = Deadline::In(self.timeout);
        let (slot, issued) = {
            let mut pending = lock(&self.pending);
            (pending.remove(&h.request_id), pending.issued(h.request_id))
        };
        let Some(slot) = slot else {
            if !issued {
                return Err(format!("protocol error: response to request {} never sent", h.request_id));
            }
            // The answer to a request that timed out: drop its payload.
            let mut scratch = std::mem::take(&mut r.scratch);
            scratch.resize(h.len as usize, 0);
            let read = r.payload(&*self.stream, &mut scratch, self.policy, frame_deadline).map_err(describe);
            r.scratch = scratch;
            return read;
        };
        // From here on the slot is ours alone: every path must finish it (invariant 2).
        let me = thread_token();
        match self.read_response(r, &h, &slot, frame_deadline) {
            Ok(outcome) => {
                slot.finish(outcome, me);
                Ok(())
            }
            Err(reason) => {
                slot.finish(Err(CallError::Disconnected { peer: self.peer.clone(), reason: reason.clone() }), me);
                Err(reason)
            }
        }
    }

    /// Reads the payload of response `h` for `slot`: the caller's outcome, or why the
    /// connection must close.
    fn read_response(
        &self,
        r: &mut Reader,
        h: &Header,
        slot: &Slot,
        deadline: Deadline,
    ) -> Result<Result<Vec<u8>, CallError>, String> {
        if h.opcode != slot.expect {
            return Err(format!("protocol error: {:?} response to a {:?} request", h.opcode, slot.expect));
        }
        let stream = &*self.stream;
        if h.is_error() {
            let mut msg = vec![0u8; h.len as usize];
            r.payload(stream, &mut msg, self.policy, deadline).map_err(describe)?;
            return Ok(Err(CallError::Remote {
                peer: self.peer.clone(),
                code: h.status,
                status: Status::from_u32(h.status),
                message: String::from_utf8_lossy(&msg).into_owned(),
            }));
        }
        match slot.dest {
            Dest::Page(_) if h.len as usize != PAGE_SIZE => {
                // A call answered with something other than one page (`decode` guarantees the
                // size for page reads): drain it to stay in frame sync, fail only this request.
                let mut scratch = std::mem::take(&mut r.scratch);
                scratch.resize(h.len as usize, 0);
                let read = r.payload(stream, &mut scratch, self.policy, deadline).map_err(describe);
                r.scratch = scratch;
                read?;
                Ok(Err(CallError::WrongSize { peer: self.peer.clone(), expected: PAGE_SIZE, got: h.len as usize }))
            }
            Dest::Page(ptr) => {
                // SAFETY: `ptr` is the caller's `&mut Page` (PAGE_SIZE bytes), which stays
                // valid and unaliased while the slot is out of `pending` and not final
                // (module invariants 2 and 3). The size was checked just above.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr, PAGE_SIZE) };
                r.payload(stream, dst, self.policy, deadline).map_err(describe)?;
                Ok(Ok(Vec::new()))
            }
            Dest::Bytes => {
                let mut v = vec![0u8; h.len as usize];
                r.payload(stream, &mut v, self.policy, deadline).map_err(describe)?;
                Ok(Ok(v))
            }
        }
    }
}

/// Spins until `done` or for `limit`; reads the clock only every few rounds. Returns `done()`.
fn spin_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        for _ in 0..32 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if Instant::now() >= end {
            return done();
        }
    }
}

fn describe(stop: ReadStop) -> String {
    match stop {
        ReadStop::Eof => "peer closed the connection".into(),
        ReadStop::TimedOut => "peer stalled in the middle of a frame".into(),
        ReadStop::Io(e) => format!("receive failed: {e}"),
    }
}

fn bad_frame(e: &FrameError) -> String {
    format!("malformed frame from the server: {e}")
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stream.shutdown();
    }
}
