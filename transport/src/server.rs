//! The serving side: accepts connections, authenticates them, and answers calls and page ops.
//!
//! Each connection has one thread that reads every complete frame available, answers them all,
//! and sends the answers with one vectored write, so a batch of requests costs one read and one
//! write however many it holds. The thread busy-polls for the [`WaitPolicy`]'s spin time before
//! it sleeps, like the client; a connection that stayed idle for a whole poll interval waits
//! without spinning until its next request, so idle connections cost no CPU.
//!
//! # Limits
//! The accepting thread only accepts: anything that needs the peer's cooperation (rdma's queue
//! pair exchange, the handshake) runs on the connection's own thread, so a silent peer delays
//! nobody else. Before that thread starts, the connection must fit [`Limits`]: connections still
//! in their handshake (in all, and per source address or local user), and connections in all.
//! One that does not fit is closed at once and counted ([`Server::refused`]); refusals are logged a
//! few lines at a time.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::auth::{server_handshake, ClusterKey, ServerInfo};
use crate::logs::RateLimited;
use crate::page::PageWindow;
use crate::stream::{read_some, ByteStream, Deadline, ReadStop, WaitPolicy};
use crate::sync::lock;
use crate::wire::len32;
use crate::wire::{Header, Opcode, Status, DEFAULT_MAX_FRAME, HEADER_LEN, MAX_FRAME_LIMIT, PAGE_SIZE, PAGE_SIZE_U32};

/// A failure a [`Service`] reports to its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceError {
    /// The status code sent to the caller.
    pub status: Status,
    /// A message for the caller.
    pub message: String,
}

impl ServiceError {
    /// A failure with `status` and `message`.
    pub fn new(status: Status, message: impl Into<String>) -> ServiceError {
        ServiceError { status, message: message.into() }
    }
}

/// The authenticated connection a call arrived on: what a [`Service`] may bind state to (a
/// session, a client's identity), and what [`Service::disconnected`] later names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Unique among this server's connections for the server's lifetime (never reused).
    pub id: u64,
    /// Who is at the other end (`tcp://203.0.113.9:41234`, `shm://name#3`), for logs.
    pub peer: String,
}

/// The application behind a server: answers [`Connection::call`](crate::Connection::call)s.
pub trait Service: Send + Sync + 'static {
    /// Answers a call to `method` with `request`, which arrived on the connection `caller`, by
    /// appending the response payload to `response`; runs on the connection's thread.
    ///
    /// `response` is the connection's send buffer: it may already hold earlier answers, so a
    /// service only appends (a response written in place costs no allocation or extra copy).
    /// Whatever was appended is discarded when the call returns an error.
    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError>;

    /// The connection `caller` closed (after its last call, whatever the reason). Runs on the
    /// connection's thread. The default does nothing.
    fn disconnected(&self, caller: &Caller) {
        let _ = caller;
    }
}

/// A shared service: the server holds one reference, the caller keeps another.
impl<T: Service> Service for Arc<T> {
    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        (**self).call(caller, method, request, response)
    }

    fn disconnected(&self, caller: &Caller) {
        (**self).disconnected(caller);
    }
}

/// A service that answers every call with its request: for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl Service for Echo {
    fn call(&self, _caller: &Caller, _method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        response.extend_from_slice(request);
        Ok(())
    }
}

/// A service with no methods: every call is refused with [`Status::UnknownMethod`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NoService;

impl Service for NoService {
    fn call(
        &self,
        _caller: &Caller,
        method: u64,
        _request: &[u8],
        _response: &mut Vec<u8>,
    ) -> Result<(), ServiceError> {
        Err(ServiceError::new(Status::UnknownMethod, format!("no method {method}")))
    }
}

/// How many connections a server admits. A connection that would exceed one of these is closed
/// as soon as it is accepted, before any thread is started for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, authenticated or not (default 1024).
    pub connections: usize,
    /// Connections still in their handshake (default 64): what an unauthenticated flood can
    /// hold, threads included.
    pub handshakes: usize,
    /// Connections in their handshake from one source address (tcp, rdma) or one local user
    /// (shm) (default 8).
    pub handshakes_per_source: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { connections: 1024, handshakes: 64, handshakes_per_source: 8 }
    }
}

/// How a server behaves.
#[derive(Clone)]
pub struct ServerConfig {
    /// The cluster key clients must prove.
    pub key: ClusterKey,
    /// Answers calls.
    pub service: Arc<dyn Service>,
    /// Pages served to one-sided reads and writes, if any.
    pub window: Option<Arc<PageWindow>>,
    /// How connection threads wait for requests.
    pub policy: WaitPolicy,
    /// The largest request payload accepted (at most 64 MiB).
    pub max_frame: u32,
    /// How long a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Which local users may connect over `shm://`.
    pub local_peers: crate::LocalPeers,
    /// The least protection of frames this server accepts: it grants a client's wish, or this if
    /// that is more (default [`Protection::None`](crate::Protection::None): what the client asks).
    pub min_protection: crate::Protection,
    /// How many connections are admitted.
    pub limits: Limits,
    /// Connection threads are service threads in the sense of [`mosaic_page::sched`]: on a CPU
    /// a CPU-bound thread keeps busy they take a short time slice and sleep between requests
    /// instead of polling (default false: they poll as the policy says). Right where the
    /// CPU-bound threads are the application's (a DSM job: a read miss under load 21-37 us
    /// instead of 4 ms); wrong where they are Mosaic's own (a memory server beside a faulting
    /// program on two CPUs: random read-modify-write at half the speed).
    pub prompt: bool,
}

impl ServerConfig {
    /// A server with `key`, no methods, no window and default limits.
    pub fn new(key: ClusterKey) -> ServerConfig {
        ServerConfig {
            key,
            service: Arc::new(NoService),
            window: None,
            policy: WaitPolicy::DEFAULT,
            max_frame: DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(5),
            local_peers: crate::LocalPeers::default(),
            min_protection: crate::Protection::None,
            limits: Limits::default(),
            prompt: false,
        }
    }

    /// Sets whether connection threads are service threads (see [`field@ServerConfig::prompt`]).
    pub fn prompt(mut self, prompt: bool) -> ServerConfig {
        self.prompt = prompt;
        self
    }

    /// Sets the connection limits.
    pub fn limits(mut self, limits: Limits) -> ServerConfig {
        self.limits = limits;
        self
    }

    /// Sets the service.
    pub fn service(mut self, service: impl Service) -> ServerConfig {
        self.service = Arc::new(service);
        self
    }

    /// Sets the page window.
    pub fn window(mut self, window: Arc<PageWindow>) -> ServerConfig {
        self.window = Some(window);
        self
    }

    /// Sets the wait policy.
    pub fn policy(mut self, policy: WaitPolicy) -> ServerConfig {
        self.policy = policy;
        self
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("window", &self.window)
            .field("policy", &self.policy)
            .field("max_frame", &self.max_frame)
            .field("limits", &self.limits)
            .field("prompt", &self.prompt)
            .finish_non_exhaustive()
    }
}

/// A back-end's set-up that needs the peer (rdma's queue pair exchange), finished on the
/// connection's own thread by the given deadline.
pub(crate) type FinishSetup = Box<dyn FnOnce(Instant) -> io::Result<Box<dyn ByteStream>> + Send>;

/// A connection just accepted.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) enum Incoming {
    /// Ready for the handshake.
    Ready(Box<dyn ByteStream>),
    /// Needs more set-up with the peer first.
    Setup(FinishSetup),
}

/// A new connection and where it came from.
pub(crate) struct Accepted {
    /// The connection.
    pub(crate) incoming: Incoming,
    /// Its source, for per-source limits: the peer's address without the port (tcp, rdma), or
    /// its local user (shm).
    pub(crate) source: String,
    /// The peer, for logs.
    pub(crate) peer: String,
}

#[cfg(test)]
impl Accepted {
    /// The stream of a connection that needs no further set-up (tests of tcp and shm).
    pub(crate) fn into_ready(self) -> Box<dyn ByteStream> {
        match self.incoming {
            Incoming::Ready(s) => s,
            Incoming::Setup(_) => panic!("this connection needs set-up with its peer"),
        }
    }
}

/// Something that yields new connections: a TCP listener or a shm rendezvous socket.
pub(crate) trait Acceptor: Send {
    /// Waits up to `timeout` for a new connection. Never waits on the peer.
    fn accept(&mut self, timeout: Duration) -> io::Result<Option<Accepted>>;
    /// The URI clients connect to.
    fn local_uri(&self) -> String;
}

/// Refused connections are logged a few lines at a time.
static REFUSED: RateLimited = RateLimited::new("connections refused by the connection limits");
/// Failed handshakes likewise.
static FAILED_HANDSHAKES: RateLimited = RateLimited::new("failed handshakes");

/// Connections counted against [`Limits`].
#[derive(Default)]
struct Admission {
    open: usize,
    handshaking: usize,
    per_source: HashMap<String, usize>,
}

struct Ctx {
    cfg: ServerConfig,
    stop: AtomicBool,
    live: Mutex<Vec<(u64, Arc<dyn ByteStream>)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
    admission: Mutex<Admission>,
    refused: AtomicU64,
}

impl Ctx {
    /// Counts a new connection from `source` in, if it fits the limits.
    fn admit(&self, source: &str) -> Result<(), String> {
        let limits = &self.cfg.limits;
        let mut a = lock(&self.admission);
        let from_source = a.per_source.get(source).copied().unwrap_or(0);
        if a.open >= limits.connections {
            return Err(format!("{} connections open (the limit)", a.open));
        }
        if a.handshaking >= limits.handshakes {
            return Err(format!("{} connections in their handshake (the limit)", a.handshaking));
        }
        if from_source >= limits.handshakes_per_source {
            return Err(format!("{from_source} connections from {source} in their handshake (the limit)"));
        }
        a.open += 1;
        a.handshaking += 1;
        *a.per_source.entry(source.to_string()).or_default() += 1;
        Ok(())
    }

    /// The connection from `source` finished its handshake (or failed it).
    fn handshake_over(&self, source: &str) {
        let mut a = lock(&self.admission);
        a.handshaking -= 1;
        if let Some(n) = a.per_source.get_mut(source) {
            *n -= 1;
            if *n == 0 {
                a.per_source.remove(source);
            }
        }
    }

    /// A connection closed.
    fn closed(&self) {
        lock(&self.admission).open -= 1;
    }
}

/// A running server. Dropping it (or [`Server::shutdown`]) stops accepting, closes every
/// connection and joins every thread it started.
pub struct Server {
    uri: String,
    ctx: Arc<Ctx>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("uri", &self.uri).finish_non_exhaustive()
    }
}

/// How often blocked server threads look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

impl Server {
    pub(crate) fn start(mut acceptor: Box<dyn Acceptor>, mut cfg: ServerConfig) -> io::Result<Server> {
        cfg.max_frame = cfg.max_frame.clamp(PAGE_SIZE_U32, MAX_FRAME_LIMIT);
        let uri = acceptor.local_uri();
        let ctx = Arc::new(Ctx {
            cfg,
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(0),
            admission: Mutex::new(Admission::default()),
            refused: AtomicU64::new(0),
        });
        let actx = ctx.clone();
        let acceptor = std::thread::Builder::new().name("mosaic-accept".into()).spawn(move || {
            while !actx.stop.load(Ordering::Acquire) {
                match acceptor.accept(STOP_POLL) {
                    Ok(Some(accepted)) => spawn_conn(&actx, accepted),
                    Ok(None) => {}
                    Err(e) => {
                        log::warn!("accept failed: {e}");
                        std::thread::sleep(STOP_POLL);
                    }
                }
            }
        })?;
        Ok(Server { uri, ctx, acceptor: Some(acceptor) })
    }

    /// The URI clients connect to (with the real port when bound to port 0).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Number of connections currently open (authenticated or still in their handshake).
    pub fn connections(&self) -> usize {
        lock(&self.ctx.live).len()
    }

    /// Number of connections still in their handshake.
    pub fn handshaking(&self) -> usize {
        lock(&self.ctx.admission).handshaking
    }

    /// Connections refused by the [`Limits`] since the server started.
    pub fn refused(&self) -> u64 {
        self.ctx.refused.load(Ordering::Relaxed)
    }

    /// Stops the server: closes every connection and joins every thread.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.ctx.stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for (_, s) in lock(&self.ctx.live).iter() {
            s.shutdown();
        }
        let threads: Vec<_> = lock(&self.ctx.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Takes a connection's thread out of the books when it ends: its stream is shut and dropped
/// from the live list, and it no longer counts against the limits.
struct Leaving<'a>(&'a Ctx, u64);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        let Leaving(ctx, id) = self;
        let mut live = lock(&ctx.live);
        if let Some(at) = live.iter().position(|(i, _)| i == id) {
            live.swap_remove(at).1.shutdown();
        }
        drop(live);
        ctx.closed();
    }
}

/// Tells the service a connection ended, however its serving ends.
pub(crate) struct Disconnected<'a>(pub(crate) &'a ServerConfig, pub(crate) &'a Caller);

impl Drop for Disconnected<'_> {
    fn drop(&mut self) {
        self.0.service.disconnected(self.1);
    }
}

fn spawn_conn(ctx: &Arc<Ctx>, accepted: Accepted) {
    let Accepted { incoming, source, peer } = accepted;
    if let Err(why) = ctx.admit(&source) {
        ctx.refused.fetch_add(1, Ordering::Relaxed);
        REFUSED.warn(format_args!("refused {peer}: {why}"));
        if let Incoming::Ready(stream) = incoming {
            stream.shutdown();
        }
        return;
    }
    let id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let cctx = ctx.clone();
    let source_if_unspawned = source.clone();
    let spawned = std::thread::Builder::new().name(format!("mosaic-conn-{id}")).spawn(move || {
        if cctx.cfg.prompt {
            mosaic_page::sched::serves();
        }
        // Counts the connection out however this thread ends (a panic in a service included).
        let _open = Leaving(&cctx, id);
        let deadline = Instant::now() + cctx.cfg.handshake_timeout;
        let stream: io::Result<Box<dyn ByteStream>> = match incoming {
            Incoming::Ready(stream) => Ok(stream),
            Incoming::Setup(finish) => finish(deadline),
        };
        match stream {
            Ok(stream) => {
                let stream: Arc<dyn ByteStream> = Arc::from(stream);
                lock(&cctx.live).push((id, stream.clone()));
                // A shutdown that ran before the push missed this stream: look again.
                if cctx.stop.load(Ordering::Acquire) {
                    stream.shutdown();
                }
                serve(&cctx, &stream, id, &source, deadline);
            }
            Err(e) => {
                cctx.handshake_over(&source);
                FAILED_HANDSHAKES.warn(format_args!("refused {peer}: {e}"));
            }
        }
    });
    match spawned {
        Ok(h) => {
            let mut threads = lock(&ctx.threads);
            threads.retain(|t| !t.is_finished());
            threads.push(h);
        }
        Err(e) => {
            log::warn!("cannot start a connection thread: {e}");
            ctx.handshake_over(&source_if_unspawned);
            ctx.closed();
        }
    }
}

fn serve(ctx: &Ctx, stream: &Arc<dyn ByteStream>, id: u64, source: &str, deadline: Instant) {
    let cfg = &ctx.cfg;
    let peer = stream.peer();
    let info = ServerInfo { window_pages: cfg.window.as_ref().map_or(0, |w| w.pages()), max_frame: cfg.max_frame };
    let shaken = server_handshake(&**stream, &cfg.key, info, cfg.min_protection, deadline);
    ctx.handshake_over(source);
    let session = match shaken {
        Ok(s) => s,
        Err(e) => {
            FAILED_HANDSHAKES.warn(format_args!("refused {peer}: {e}"));
            return;
        }
    };
    log::debug!("{peer} authenticated, frames protected: {:?}", session.protection);
    let framed: Arc<dyn ByteStream> = match session.protection {
        crate::Protection::None => stream.clone(),
        p => Arc::new(crate::secure::SecureStream::new(stream.clone(), p, &session.keys)),
    };
    let caller = Caller { id, peer };
    let _bye = Disconnected(cfg, &caller);
    serve_frames(cfg, &ctx.stop, &*framed, &caller);
}

/// Answers requests on an authenticated stream until it closes, fails, sends a malformed frame,
/// or `stop` is set.
pub(crate) fn serve_frames(cfg: &ServerConfig, stop: &AtomicBool, stream: &dyn ByteStream, caller: &Caller) {
    let peer = &caller.peer;
    let cap = HEADER_LEN + cfg.max_frame as usize + (64 << 10);
    let mut buf = vec![0u8; cap];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::with_capacity(256 << 10);
    let mut idle = false;
    loop {
        // Answer every complete frame in the buffer.
        while end - start >= HEADER_LEN {
            let h = match Header::decode_slice(&buf[start..end], cfg.max_frame) {
                Ok(h) => h,
                Err(e) => {
                    log::warn!("closing {peer}: malformed frame: {e}");
                    return;
                }
            };
            if h.is_response() || h.opcode.is_handshake() {
                log::warn!("closing {peer}: protocol error: unexpected {:?} frame (flags {:#x})", h.opcode, h.flags);
                return;
            }
            let need = HEADER_LEN + h.len as usize;
            if end - start < need {
                break;
            }
            answer(cfg, caller, &h, &buf[start + HEADER_LEN..start + need], &mut out);
            start += need;
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&[&out]) {
                log::debug!("{peer}: send failed: {e}");
                return;
            }
            out.clear();
        }
        if start == end {
            start = 0;
            end = 0;
        } else if cap - end < HEADER_LEN + cfg.max_frame as usize {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        // Spin only while requests keep coming: after a whole idle poll interval, wait without
        // spinning (so a thousand idle connections cost no CPU) until the next one arrives.
        let policy = if idle { WaitPolicy::blocking() } else { cfg.policy };
        match read_some(stream, &mut buf[end..], policy, Deadline::In(STOP_POLL)) {
            Ok(n) => {
                end += n;
                idle = false;
            }
            Err(ReadStop::TimedOut) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                idle = true;
            }
            Err(ReadStop::Eof) => {
                log::debug!("{peer} disconnected");
                return;
            }
            Err(ReadStop::Io(e)) => {
                if !stop.load(Ordering::Acquire) {
                    log::debug!("{peer}: receive failed: {e}");
                }
                return;
            }
        }
    }
}

/// Appends the answer to one request to `out`.
fn answer(cfg: &ServerConfig, caller: &Caller, h: &Header, payload: &[u8], out: &mut Vec<u8>) {
    let result: Result<(), ServiceError> = match h.opcode {
        Opcode::Call => {
            // Reserve the header, let the service append its payload, then fill the header in.
            let at = out.len();
            out.extend_from_slice(&[0u8; HEADER_LEN]);
            let called = cfg.service.call(caller, h.arg, payload, out).and_then(|()| {
                let len = out.len() - at - HEADER_LEN;
                u32::try_from(len)
                    .ok()
                    .filter(|l| *l <= cfg.max_frame)
                    .ok_or_else(|| ServiceError::new(Status::Handler, format!("response of {len} bytes is too large")))
            });
            match called {
                Ok(len) => {
                    out[at..at + HEADER_LEN].copy_from_slice(&Header::response(h, len).encode());
                    Ok(())
                }
                Err(e) => {
                    out.truncate(at);
                    Err(e)
                }
            }
        }
        Opcode::ReadPage => with_window(cfg, |w| {
            let at = out.len();
            out.extend_from_slice(&Header::response(h, PAGE_SIZE_U32).encode());
            w.append_page(h.arg, out).map_err(|s| {
                out.truncate(at);
                page_error(s, h.arg, w)
            })
        }),
        Opcode::WritePage => with_window(cfg, |w| {
            let page: &[u8; PAGE_SIZE] =
                payload.try_into().map_err(|_| ServiceError::new(Status::BadRequest, "not a page"))?;
            w.write(h.arg, page).map_err(|s| page_error(s, h.arg, w))?;
            out.extend_from_slice(&Header::response(h, 0).encode());
            Ok(())
        }),
        // Handshake opcodes are rejected by the caller before we get here.
        Opcode::Hello | Opcode::Challenge | Opcode::Auth | Opcode::AuthResult => {
            Err(ServiceError::new(Status::BadRequest, "handshake frame after the handshake"))
        }
    };
    if let Err(e) = result {
        let msg = e.message.as_bytes();
        out.extend_from_slice(&Header::error_response(h, e.status as u32, len32(msg)).encode());
        out.extend_from_slice(msg);
    }
}

fn with_window(
    cfg: &ServerConfig,
    f: impl FnOnce(&PageWindow) -> Result<(), ServiceError>,
) -> Result<(), ServiceError> {
    match &cfg.window {
        Some(w) => f(w),
        None => Err(ServiceError::new(Status::NoWindow, "this server exposes no page window")),
    }
}

fn page_error(s: Status, index: u64, w: &PageWindow) -> ServiceError {
    ServiceError::new(s, format!("page {index} is outside the window of {} pages", w.pages()))
}
