//! `rdma`: RC queue pairs through rdma-core's libibverbs (cargo feature `rdma`).
//!
//! # Connection set-up
//! The client connects over TCP to `host:port`, and both sides prove the cluster key there
//! first (the same handshake as every transport), so no queue pair number or remote key is
//! revealed to an unauthenticated peer. Then each side opens its device (`MOSAIC_RDMA_DEVICE`,
//! default: the first device; `MOSAIC_RDMA_GID_INDEX`, default 0), creates an RC queue pair,
//! registers its buffers, posts its receives and sends its [`verbs::QpInfo`]; the server adds the
//! address, remote key and size of its page window. Both move their queue pairs to RTS and
//! exchange a ready byte. The TCP socket then carries nothing more; it stays open so each side
//! learns at once when the other process dies.
//!
//! # Messages: SEND/RECV as a byte stream
//! Calls, responses and the (second, in-band) handshake run over SEND/RECV: the writer copies
//! frames into one of [`SEND_BUFS`] registered 64 KiB buffers and posts a SEND; the reader hands
//! out bytes of completed receives in order and re-posts each buffer once consumed. The queue
//! pair retries forever while the peer has no receive posted (RNR retry 7), which is the flow
//! control.
//!
//! # Pages: one-sided RDMA READ and WRITE
//! `read_page`/`write_page` go straight to the server's registered window with RDMA READ/WRITE,
//! without the server's CPU. They move through a pool of registered staging pages and are copied
//! to or from the caller's page: caching registrations of arbitrary caller memory is unsafe
//! without hooks on munmap (a freed and re-used address would still point at the old physical
//! pages), so the pager will read into registered staging pages directly.
//!
//! Completions of SEND, READ and WRITE share one completion queue; whoever waits polls it and
//! dispatches: a SEND completion frees its buffer, a READ/WRITE completion counts down its batch.

mod verbs;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use verbs::{MemoryRegion, Op, Queue, QueuePair, Wc};

use crate::auth::{client_handshake, server_handshake, ClusterKey, ServerInfo};
use crate::page::{Page, PageWindow};
use crate::rdma_wire::{self, RemoteWindow};
use crate::server::{Accepted, FinishSetup, Incoming};
use crate::stream::{read_exact, ByteStream, WaitPolicy};
use crate::sync::lock;
use crate::sys::{self, Mapping};
use crate::tcp::TcpByteStream;
use crate::wire::PAGE_SIZE;

/// Bytes per SEND/RECV buffer.
const CHUNK: usize = CHUNK_U32 as usize;
const CHUNK_U32: u32 = 64 << 10;
const PAGE_U32: u32 = crate::wire::PAGE_SIZE_U32;
/// Registered send buffers per connection.
const SEND_BUFS: usize = 32;
/// Receives kept posted per connection.
const RECV_BUFS: usize = 32;
/// Registered staging pages for one-sided reads and writes per connection.
const STAGING_PAGES: usize = 64;
/// Work requests per queue.
const DEPTH: u32 = 256;
/// Marks a SEND's work request id (one-sided ids are batch pointers, below 2^63).
const SEND_TAG: u64 = 1 << 63;

/// Environment variable naming the RDMA device (e.g. `rxe0`, `mlx5_0`).
pub const DEVICE_ENV: &str = "MOSAIC_RDMA_DEVICE";
/// Environment variable with the GID index (RoCE); default 0.
pub const GID_INDEX_ENV: &str = "MOSAIC_RDMA_GID_INDEX";

fn device_from_env() -> (String, i32) {
    let dev = std::env::var(DEVICE_ENV).unwrap_or_default();
    let gid = std::env::var(GID_INDEX_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    (dev, gid)
}

/// A registered array of equal buffers.
struct Buffers {
    mr: MemoryRegion,
    map: Mapping,
    size: usize,
}

impl Buffers {
    fn new(qp: &Arc<QueuePair>, count: usize, size: usize, remote: bool) -> io::Result<Buffers> {
        let map = Mapping::anonymous(count * size)?;
        // SAFETY: the mapping is owned by the returned Buffers, which drops `mr` (field order)
        // before `map`, so the registered memory outlives its registration.
        let mr = unsafe { qp.register(map.as_ptr(), map.len(), remote)? };
        Ok(Buffers { mr, map, size })
    }

    fn ptr(&self, i: usize) -> *mut u8 {
        debug_assert!((i + 1) * self.size <= self.map.len());
        // SAFETY: callers pass i < count, so the offset stays inside the mapping.
        unsafe { self.map.as_ptr().add(i * self.size) }
    }
}

/// Countdown of one batch of one-sided operations.
struct Batch {
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
}

#[cfg(not(target_pointer_width = "64"))]
compile_error!("the rdma back-end stores pointers in 64-bit work request ids");

/// Turns one reference to `batch` into a work request id (a pointer, below 2^63).
fn batch_to_wr(batch: Arc<Batch>) -> u64 {
    Arc::into_raw(batch) as usize as u64
}

/// Takes back the reference a work request id holds.
///
/// # Safety
/// `wr_id` came from [`batch_to_wr`] and is taken back exactly once.
#[allow(clippy::cast_possible_truncation)] // 64-bit targets only (compile_error above)
unsafe fn batch_from_wr(wr_id: u64) -> Arc<Batch> {
    // SAFETY: the caller guarantees the id is an `Arc::into_raw` pointer not yet taken back.
    unsafe { Arc::from_raw(wr_id as usize as *const Batch) }
}

/// Everything one connection's stream and one-sided operations share.
struct Conn {
    send: Buffers,
    recv: Buffers,
    staging: Buffers,
    /// The server's window registration (server side only).
    _window_mr: Option<MemoryRegion>,
    qp: Arc<QueuePair>,
    free_send: Mutex<Vec<usize>>,
    free_staging: Mutex<Vec<usize>>,
    send_poll: Mutex<()>,
    rx: Mutex<Rx>,
    failed: OnceLock<String>,
    closed: AtomicBool,
    peer_gone: AtomicBool,
    sock: TcpByteStream,
    peer: String,
}

#[derive(Default)]
struct Rx {
    /// Completed receives not yet read: (buffer, length).
    ready: VecDeque<(usize, usize)>,
    /// The receive being read: (buffer, length, offset).
    current: Option<(usize, usize, usize)>,
}

impl Conn {
    fn setup(sock: TcpByteStream, window: Option<&PageWindow>) -> io::Result<Conn> {
        let (dev, gid) = device_from_env();
        let qp = Arc::new(QueuePair::open(&dev, gid, DEPTH)?);
        let send = Buffers::new(&qp, SEND_BUFS, CHUNK, false)?;
        let recv = Buffers::new(&qp, RECV_BUFS, CHUNK, false)?;
        let staging = Buffers::new(&qp, STAGING_PAGES, PAGE_SIZE, false)?;
        let window_mr = match window {
            // SAFETY: the window outlives the server and so every connection it serves (the
            // server holds an Arc of it and joins connection threads before dropping it).
            Some(w) => Some(unsafe { qp.register(w.base_ptr(), w.byte_len(), true)? }),
            None => None,
        };
        let peer = sock.peer().replacen("tcp://", "rdma://", 1);
        let conn = Conn {
            send,
            recv,
            staging,
            _window_mr: window_mr,
            qp,
            free_send: Mutex::new((0..SEND_BUFS).collect()),
            free_staging: Mutex::new((0..STAGING_PAGES).collect()),
            send_poll: Mutex::new(()),
            rx: Mutex::new(Rx::default()),
            failed: OnceLock::new(),
            closed: AtomicBool::new(false),
            peer_gone: AtomicBool::new(false),
            sock,
            peer,
        };
        for i in 0..RECV_BUFS {
            conn.repost(i)?;
        }
        Ok(conn)
    }

    fn repost(&self, i: usize) -> io::Result<()> {
        // SAFETY: buffer i lies in `recv`'s registration; it is handed to the device here and
        // not read again until its completion is polled (it leaves `Rx` before being reposted).
        unsafe { self.qp.post_recv(i as u64, self.recv.ptr(i), CHUNK_U32, self.recv.mr.lkey) }
    }

    fn fail(&self, why: String) {
        if self.failed.set(why.clone()).is_ok() {
            log::warn!("{}: {why}", self.peer);
        }
    }

    fn broken(&self) -> Option<io::Error> {
        if let Some(why) = self.failed.get() {
            return Some(io::Error::new(io::ErrorKind::BrokenPipe, why.clone()));
        }
        if self.closed.load(Ordering::Acquire) || self.peer_gone.load(Ordering::Acquire) {
            return Some(io::Error::new(io::ErrorKind::BrokenPipe, format!("{} closed the connection", self.peer)));
        }
        None
    }

    /// Polls the send queue and dispatches its completions.
    fn poll_send(&self) {
        let Ok(_g) = self.send_poll.try_lock() else { return };
        let mut wcs = [Wc::default(); 32];
        let n = match self.qp.poll(Queue::Send, &mut wcs) {
            Ok(n) => n,
            Err(e) => return self.fail(format!("polling the send queue failed: {e}")),
        };
        for wc in &wcs[..n] {
            let error = (wc.status != 0).then(|| format!("work request failed: {}", verbs::status_str(wc.status)));
            if let Some(e) = &error {
                self.fail(e.clone());
            }
            if wc.wr_id & SEND_TAG != 0 {
                let i = usize::try_from(wc.wr_id & !SEND_TAG).unwrap_or(usize::MAX);
                if i < SEND_BUFS {
                    lock(&self.free_send).push(i);
                }
            } else {
                // SAFETY: every one-sided work request's id is `Arc::into_raw` of its Batch (see
                // `one_sided`), and each completion is polled exactly once, so this takes back
                // exactly the reference that request held.
                let batch = unsafe { batch_from_wr(wc.wr_id) };
                if let Some(e) = error {
                    lock(&batch.error).get_or_insert(e);
                }
                batch.remaining.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Checks whether the TCP side channel closed (the peer process died or shut down).
    fn check_socket(&self) {
        let mut fds = [sys::pollfd(self.sock_fd(), libc::POLLIN)];
        if sys::poll(&mut fds, Some(Duration::ZERO)).unwrap_or(0) > 0 {
            self.note_socket_readable();
        }
    }

    fn note_socket_readable(&self) {
        if sys::side_channel_closed(self.sock.socket()) {
            self.peer_gone.store(true, Ordering::Release);
        }
    }

    fn sock_fd(&self) -> BorrowedFd<'_> {
        self.sock.socket().as_fd()
    }

    /// Waits for a free buffer from `free`, polling completions; fails if the connection broke.
    fn take(&self, free: &Mutex<Vec<usize>>) -> io::Result<usize> {
        self.wait_for(|| lock(free).pop())
    }

    /// Takes `n` buffers at once (all or none, so threads holding part of what they need cannot
    /// deadlock each other).
    fn take_n(&self, free: &Mutex<Vec<usize>>, n: usize) -> io::Result<Vec<usize>> {
        self.wait_for(|| {
            let mut f = lock(free);
            let at = f.len().checked_sub(n)?;
            Some(f.split_off(at))
        })
    }

    /// Retries `ready` until it yields, polling completions (which free buffers) in between, and
    /// sleeping briefly after 100 us; fails as soon as the connection breaks.
    fn wait_for<T>(&self, mut ready: impl FnMut() -> Option<T>) -> io::Result<T> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(v) = ready() {
                return Ok(v);
            }
            if let Some(e) = self.broken() {
                return Err(e);
            }
            self.poll_send();
            spins += 1;
            if spins % 64 == 0 {
                self.check_socket();
                if start.elapsed() > Duration::from_micros(100) {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
    }

    fn post_send(&self, i: usize, len: usize) -> io::Result<()> {
        let len = u32::try_from(len).unwrap_or(CHUNK_U32).min(CHUNK_U32);
        // SAFETY: send buffer i (registered in `send`) was taken from the free list and is not
        // touched again until its completion returns it there (poll_send).
        let r = unsafe { self.qp.post(Op::Send, SEND_TAG | i as u64, self.send.ptr(i), len, self.send.mr.lkey, 0, 0) };
        r.inspect_err(|e| self.fail(format!("posting a send failed: {e}")))
    }
}

/// The byte-stream side of an RDMA connection.
pub(crate) struct RdmaByteStream {
    conn: Arc<Conn>,
}

impl ByteStream for RdmaByteStream {
    fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let c = &self.conn;
        let mut cur: Option<(usize, usize)> = None;
        for buf in bufs {
            let mut off = 0;
            while off < buf.len() {
                let (i, filled) = match cur {
                    Some(x) => x,
                    None => (c.take(&c.free_send)?, 0),
                };
                let n = (CHUNK - filled).min(buf.len() - off);
                // SAFETY: buffer i is ours until posted (taken from the free list); the copy stays
                // within its CHUNK bytes because filled + n <= CHUNK.
                unsafe { std::ptr::copy_nonoverlapping(buf[off..].as_ptr(), c.send.ptr(i).add(filled), n) };
                off += n;
                if filled + n == CHUNK {
                    c.post_send(i, CHUNK)?;
                    cur = None;
                } else {
                    cur = Some((i, filled + n));
                }
            }
        }
        if let Some((i, filled)) = cur {
            c.post_send(i, filled)?;
        }
        Ok(())
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let c = &self.conn;
        let mut rx = lock(&c.rx);
        loop {
            if let Some((i, len, off)) = rx.current {
                let n = (len - off).min(buf.len());
                // SAFETY: receive buffer i completed (polled) and is not reposted until fully
                // read, so the device does not write it; [off, off + n) is within its len bytes.
                unsafe { std::ptr::copy_nonoverlapping(c.recv.ptr(i).add(off), buf.as_mut_ptr(), n) };
                if off + n == len {
                    rx.current = None;
                    c.repost(i).inspect_err(|e| c.fail(format!("re-posting a receive failed: {e}")))?;
                } else {
                    rx.current = Some((i, len, off + n));
                }
                return Ok(n);
            }
            if let Some((i, len)) = rx.ready.pop_front() {
                rx.current = Some((i, len, 0));
                continue;
            }
            let mut wcs = [Wc::default(); 32];
            let n = c.qp.poll(Queue::Recv, &mut wcs)?;
            for wc in &wcs[..n] {
                if wc.status != 0 {
                    c.fail(format!("receive failed: {}", verbs::status_str(wc.status)));
                    continue;
                }
                let i = usize::try_from(wc.wr_id).unwrap_or(usize::MAX);
                if i < RECV_BUFS {
                    rx.ready.push_back((i, wc.byte_len as usize));
                }
            }
            if n > 0 {
                continue;
            }
            return match c.broken() {
                Some(_) if c.failed.get().is_none() => Ok(0), // orderly close or peer gone
                Some(e) => Err(e),
                None => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
    }

    /// A read is a copy out of the received buffers (and a completion-queue poll, no system
    /// call): reading ahead would only add a second copy.
    fn batch_reads(&self) -> bool {
        false
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        let c = &self.conn;
        {
            let rx = lock(&c.rx);
            if rx.current.is_some() || !rx.ready.is_empty() || c.broken().is_some() {
                return Ok(());
            }
        }
        c.qp.arm_recv()?;
        // A completion that arrived before arming raises no event: let the caller poll again.
        let recv_fd = c.qp.recv_fd();
        // SAFETY: the completion channel fd lives as long as the queue pair, which `c` holds.
        let recv_fd = unsafe { BorrowedFd::borrow_raw(recv_fd) };
        let mut fds = [sys::pollfd(recv_fd, libc::POLLIN), sys::pollfd(c.sock_fd(), libc::POLLIN)];
        // Bound the sleep: a completion that raced with arming is found by the next poll.
        sys::poll(&mut fds, Some(timeout.min(Duration::from_millis(5))))?;
        if fds[0].revents != 0 {
            c.qp.ack_recv();
        }
        if fds[1].revents != 0 {
            c.note_socket_readable();
        }
        Ok(())
    }

    fn shutdown(&self) {
        self.conn.closed.store(true, Ordering::Release);
        self.conn.sock.shutdown();
    }

    fn peer_hung_up(&self) -> bool {
        self.conn.sock.peer_hung_up()
    }

    fn is_same_host(&self) -> bool {
        self.conn.sock.is_same_host()
    }

    fn peer(&self) -> String {
        self.conn.peer.clone()
    }
}

/// One-sided page reads and writes of an RDMA connection.
pub(crate) struct RdmaPages {
    conn: Arc<Conn>,
    window: RemoteWindow,
}

impl RdmaPages {
    /// Runs `pages` one-sided operations of kind `op` through staging pages, in chunks.
    fn one_sided(&self, op: Op, pages: &mut [(u64, *mut u8)]) -> Result<(), String> {
        let c = &self.conn;
        for &(index, _) in pages.iter() {
            if index >= self.window.pages {
                return Err(format!("page {index} is outside the window of {} pages", self.window.pages));
            }
        }
        for chunk in pages.chunks_mut(STAGING_PAGES / 4) {
            let slots = c.take_n(&c.free_staging, chunk.len()).map_err(|e| e.to_string())?;
            let result = self.run_chunk(op, chunk, &slots);
            lock(&c.free_staging).extend(slots);
            result?;
        }
        Ok(())
    }

    fn run_chunk(&self, op: Op, chunk: &[(u64, *mut u8)], slots: &[usize]) -> Result<(), String> {
        let c = &self.conn;
        if let Op::Write = op {
            for (&(_, page), &s) in chunk.iter().zip(slots) {
                // SAFETY: `page` points at a caller page of PAGE_SIZE bytes (see read/write);
                // staging slot s is ours (taken from the free list) and PAGE_SIZE long.
                unsafe { std::ptr::copy_nonoverlapping(page, c.staging.ptr(s), PAGE_SIZE) };
            }
        }
        let batch = Arc::new(Batch { remaining: AtomicUsize::new(chunk.len()), error: Mutex::new(None) });
        for (&(index, _), &s) in chunk.iter().zip(slots) {
            let wr_id = batch_to_wr(batch.clone());
            let raddr = self.window.addr + index * PAGE_SIZE as u64;
            // SAFETY: staging slot s lies in `staging`'s registration and is ours until the batch
            // completes (we wait for it below before freeing the slot); raddr/rkey name the
            // server's registered window, and index < pages was checked.
            let posted =
                unsafe { c.qp.post(op, wr_id, c.staging.ptr(s), PAGE_U32, c.staging.mr.lkey, raddr, self.window.rkey) };
            if let Err(e) = posted {
                // SAFETY: this request was not posted, so no completion will take back its
                // reference: take it back here.
                drop(unsafe { batch_from_wr(wr_id) });
                batch.remaining.fetch_sub(1, Ordering::AcqRel);
                lock(&batch.error).get_or_insert(format!("posting an RDMA request failed: {e}"));
                c.fail(format!("posting an RDMA request failed: {e}"));
            }
        }
        // Every posted request completes, successfully or flushed with an error, within the
        // queue pair's retry budget (7 tries of 67 ms): the device owns the staging pages until then.
        let mut spins = 0u32;
        while batch.remaining.load(Ordering::Acquire) > 0 {
            c.poll_send();
            spins += 1;
            if spins % 1024 == 0 {
                std::thread::yield_now();
            }
        }
        if let Some(e) = lock(&batch.error).take() {
            return Err(e);
        }
        if let Op::Read = op {
            for (&(_, page), &s) in chunk.iter().zip(slots) {
                // SAFETY: the READ completed, so the device no longer writes slot s; `page` is
                // the caller's exclusive page of PAGE_SIZE bytes.
                unsafe { std::ptr::copy_nonoverlapping(c.staging.ptr(s), page, PAGE_SIZE) };
            }
        }
        Ok(())
    }
}

impl crate::conn::OneSided for RdmaPages {
    fn read_pages(&self, reads: &mut [(u64, &mut Page)]) -> Result<(), String> {
        let mut v: Vec<(u64, *mut u8)> = reads.iter_mut().map(|(i, p)| (*i, p.0.as_mut_ptr())).collect();
        self.one_sided(Op::Read, &mut v)
    }

    fn write_pages(&self, writes: &[(u64, &Page)]) -> Result<(), String> {
        // The pointer is only read from (copied into staging) for a WRITE.
        let mut v: Vec<(u64, *mut u8)> = writes.iter().map(|(i, p)| (*i, p.0.as_ptr().cast_mut())).collect();
        self.one_sided(Op::Write, &mut v)
    }

    fn window_pages(&self) -> u64 {
        self.window.pages
    }
}

fn psn() -> u32 {
    let mut b = [0u8; 4];
    let _ = sys::random_bytes(&mut b);
    u32::from_le_bytes(b) & 0xff_ffff
}

fn setup_io(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("RDMA set-up ({what}): {e}"))
}

/// Exchanges queue pair information over the (authenticated) TCP side channel and connects.
/// What the peer sends is checked by [`rdma_wire`] before it reaches the verbs.
fn exchange(conn: &Conn, extra_out: &[u8], extra_in: &mut [u8], deadline: Instant) -> io::Result<()> {
    let my_psn = psn();
    let mine = conn.qp.local_info(my_psn)?;
    conn.sock.write_all(&[&rdma_wire::encode_setup(&mine), extra_out])?;
    let mut theirs = [0u8; rdma_wire::SETUP_LEN];
    let policy = WaitPolicy::blocking();
    read_exact(&conn.sock, &mut theirs, policy, Some(deadline))
        .map_err(|e| setup_io("peer info", io::Error::from(e)))?;
    let remote = rdma_wire::parse_setup(&theirs).map_err(|e| setup_io("peer info", e))?;
    read_exact(&conn.sock, extra_in, policy, Some(deadline)).map_err(|e| setup_io("window", io::Error::from(e)))?;
    conn.qp.connect(my_psn, &remote)?;
    // Both queue pairs are ready to receive once each side has seen the other's ready byte.
    conn.sock.write_all(&[b"R"])?;
    let mut ready = [0u8; 1];
    read_exact(&conn.sock, &mut ready, policy, Some(deadline)).map_err(|e| setup_io("ready", io::Error::from(e)))?;
    Ok(())
}

/// Connects to the RDMA server whose TCP side channel listens at `addr`.
pub(crate) fn connect(
    addr: &str,
    key: &ClusterKey,
    timeout: Duration,
) -> Result<(RdmaByteStream, RdmaPages), crate::ConnectError> {
    let uri = format!("rdma://{addr}");
    let io_err = |source| crate::ConnectError::Io { uri: uri.clone(), source };
    let deadline = Instant::now() + timeout;
    let sock = TcpByteStream::connect(addr, timeout).map_err(io_err)?;
    // The side channel only proves the key; the queue pair's stream has its own handshake.
    let session = client_handshake(&sock, key, crate::Protection::None, deadline)
        .map_err(|source| crate::ConnectError::Handshake { uri: uri.clone(), source })?;
    let conn = Conn::setup(sock, None)
        .map_err(|e| crate::ConnectError::Unsupported { uri: uri.clone(), reason: e.to_string() })?;
    let mut win = [0u8; rdma_wire::WINDOW_LEN];
    exchange(&conn, &[], &mut win, deadline).map_err(io_err)?;
    let window = rdma_wire::parse_window(&win, session.info.window_pages).map_err(|e| io_err(setup_io("window", e)))?;
    let conn = Arc::new(conn);
    Ok((RdmaByteStream { conn: conn.clone() }, RdmaPages { conn, window }))
}

/// Accepts RDMA connections: TCP side channel, key check, queue pair exchange.
pub(crate) struct RdmaAcceptor {
    tcp: crate::tcp::TcpAcceptor,
    key: ClusterKey,
    window: Option<Arc<PageWindow>>,
    max_frame: u32,
}

impl RdmaAcceptor {
    /// Listens on `addr` for the TCP side channel, after checking that a device opens.
    pub(crate) fn bind(addr: &str, cfg: &crate::ServerConfig) -> io::Result<RdmaAcceptor> {
        let (dev, gid) = device_from_env();
        drop(QueuePair::open(&dev, gid, 4)?);
        Ok(RdmaAcceptor {
            tcp: crate::tcp::TcpAcceptor::bind(addr)?,
            key: cfg.key.clone(),
            window: cfg.window.clone(),
            max_frame: cfg.max_frame,
        })
    }
}

/// The server's half of the set-up on an accepted side channel: the key, then the queue pairs.
fn server_setup(
    sock: TcpByteStream,
    key: &ClusterKey,
    window: Option<&PageWindow>,
    max_frame: u32,
    deadline: Instant,
) -> io::Result<RdmaByteStream> {
    let pages = window.map_or(0, |w| w.pages());
    let info = ServerInfo { window_pages: pages, max_frame };
    server_handshake(&sock, key, info, crate::Protection::None, deadline).map_err(|e| setup_io("cluster key", e))?;
    let conn = Conn::setup(sock, window)?;
    let (addr, rkey) = conn._window_mr.as_ref().map_or((0, 0), |m| (m.addr, m.rkey));
    let extra = rdma_wire::encode_window(&RemoteWindow { addr, rkey, pages });
    exchange(&conn, &extra, &mut [], deadline)?;
    Ok(RdmaByteStream { conn: Arc::new(conn) })
}

impl crate::server::Acceptor for RdmaAcceptor {
    /// Accepts the side channel only: the key check and the queue pair exchange wait on the peer,
    /// so they run on the connection's thread, under the server's handshake limits.
    fn accept(&mut self, timeout: Duration) -> io::Result<Option<Accepted>> {
        let Some(sock) = self.tcp.accept_tcp(timeout)? else { return Ok(None) };
        let (key, window, max_frame) = (self.key.clone(), self.window.clone(), self.max_frame);
        let source = crate::tcp::source_of(&sock);
        let peer = sock.peer().replacen("tcp://", "rdma://", 1);
        let finish: FinishSetup = Box::new(move |deadline| {
            let stream = server_setup(sock, &key, window.as_deref(), max_frame, deadline)?;
            Ok(Box::new(stream) as Box<dyn ByteStream>)
        });
        Ok(Some(Accepted { incoming: Incoming::Setup(finish), source, peer }))
    }

    fn local_uri(&self) -> String {
        self.tcp.local_uri().replacen("tcp://", "rdma://", 1)
    }
}
