#![allow(missing_docs, clippy::cast_possible_truncation)]
//! The conformance suite every back-end passes: the same tests, instantiated per transport.
//!
//! Each back-end names how a server binds and how a client reaches it; `sim` runs the suite
//! through a shaped link (10 GbE with 1% loss) around tcp.

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mosaic_transport::{
    connect, listen, CallError, Caller, ClusterKey, ConnectOptions, Echo, Page, PageWindow, Protection, Server,
    ServerConfig, Service, ServiceError, Status,
};

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"conformance-suite-cluster-key").unwrap()
}

/// Echo, plus method 99 that sleeps for the number of milliseconds in its request.
struct TestService;

impl Service for TestService {
    fn call(&self, _caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        match method {
            99 => {
                let ms = request.first().copied().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(u64::from(ms)));
                Ok(())
            }
            7 => {
                // Appended bytes must be discarded with the error.
                response.extend_from_slice(b"partial answer");
                Err(ServiceError::new(Status::Full, "no room"))
            }
            _ => Echo.call(_caller, method, request, response),
        }
    }
}

/// A back-end under test: where the server listens, how the client's URI is formed from it.
trait Backend {
    fn bind_uri() -> String;
    fn client_uri(server_uri: &str) -> String;
    /// What the server demands of every connection's frames (it grants at least this).
    fn min_protection() -> Protection {
        Protection::None
    }
}

struct Tcp;
impl Backend for Tcp {
    fn bind_uri() -> String {
        "tcp://127.0.0.1:0".into()
    }
    fn client_uri(s: &str) -> String {
        s.into()
    }
}

struct Shm;
impl Backend for Shm {
    fn bind_uri() -> String {
        // Abstract socket names are per host: make each test's name unique.
        static N: AtomicUsize = AtomicUsize::new(0);
        format!("shm://conformance-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
    }
    fn client_uri(s: &str) -> String {
        s.into()
    }
}

#[cfg(feature = "rdma")]
struct Rdma;
#[cfg(feature = "rdma")]
impl Backend for Rdma {
    fn bind_uri() -> String {
        "rdma://127.0.0.1:0".into()
    }
    fn client_uri(s: &str) -> String {
        s.into()
    }
}

/// tcp with every record authenticated (the server demands it).
struct TcpIntegrity;
impl Backend for TcpIntegrity {
    fn bind_uri() -> String {
        Tcp::bind_uri()
    }
    fn client_uri(s: &str) -> String {
        s.into()
    }
    fn min_protection() -> Protection {
        Protection::Integrity
    }
}

/// tcp with every record encrypted.
struct TcpEncrypt;
impl Backend for TcpEncrypt {
    fn bind_uri() -> String {
        Tcp::bind_uri()
    }
    fn client_uri(s: &str) -> String {
        s.into()
    }
    fn min_protection() -> Protection {
        Protection::Encrypt
    }
}

/// shm with every record encrypted.
struct ShmEncrypt;
impl Backend for ShmEncrypt {
    fn bind_uri() -> String {
        Shm::bind_uri()
    }
    fn client_uri(s: &str) -> String {
        s.into()
    }
    fn min_protection() -> Protection {
        Protection::Encrypt
    }
}

/// A shaped link stands for a network between hosts: its frames are encrypted by default.
struct Sim;
impl Backend for Sim {
    fn bind_uri() -> String {
        "tcp://127.0.0.1:0".into()
    }
    fn client_uri(s: &str) -> String {
        format!("sim://10gbe,loss=0.01,seed=3@{s}")
    }
}

fn server<B: Backend>(window_pages: u64) -> Server {
    let mut cfg = ServerConfig::new(key()).service(TestService);
    cfg.min_protection = B::min_protection();
    if window_pages > 0 {
        cfg = cfg.window(Arc::new(PageWindow::new(window_pages).unwrap()));
    }
    listen(&B::bind_uri(), cfg).expect("listen")
}

fn client<B: Backend>(s: &Server) -> mosaic_transport::Connection {
    connect(&B::client_uri(s.uri()), &ConnectOptions::new(key()).timeout(Duration::from_secs(10))).expect("connect")
}

fn page_of(seed: u64) -> Box<Page> {
    let mut p = Page::boxed();
    for (i, chunk) in p.0.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_mul(0x9E37_79B9) ^ i as u64).to_le_bytes());
    }
    p
}

fn calls_echo_every_size<B: Backend>() {
    let s = server::<B>(0);
    let c = client::<B>(&s);
    for size in [0usize, 1, 8, 64, 4096, 65536, 1 << 20] {
        let msg: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        assert_eq!(c.call(1, &msg).unwrap(), msg, "size {size}");
    }
    let too_big = vec![0u8; (1 << 20) + 1];
    assert!(matches!(c.call(1, &too_big), Err(CallError::TooLarge { .. })));
    // The connection survives a refused oversize request.
    assert_eq!(c.call(1, b"still here").unwrap(), b"still here");
    // A batch of calls comes back in order.
    let batch: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; usize::from(i) * 100]).collect();
    let refs: Vec<&[u8]> = batch.iter().map(|v| &v[..]).collect();
    assert_eq!(c.call_batch(1, &refs).unwrap(), batch);
    assert!(matches!(c.call_batch(1, &[b"ok", &too_big]), Err(CallError::TooLarge { .. })));
}

/// The probe: over rdma a peer that opened the side channel and said nothing blocked every
/// accept for 5 s. Now the set-up runs on the connection's thread: while two silent peers hold
/// their sockets open, a real client connects (within 3 s, less than the 5 s it used to wait) and
/// is served. For transports reached over TCP (tcp, rdma's side channel).
fn a_silent_peer_does_not_hold_up_others<B: Backend>() {
    let s = server::<B>(4);
    let Some(addr) = s.uri().split_once("://").map(|(_, a)| a.to_string()) else { return };
    if !(s.uri().starts_with("tcp://") || s.uri().starts_with("rdma://")) {
        return;
    }
    let silent: Vec<std::net::TcpStream> = (0..2).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    let c = connect(&B::client_uri(s.uri()), &ConnectOptions::new(key()).timeout(Duration::from_secs(3)))
        .expect("a real client connects while silent peers wait");
    assert_eq!(c.call(1, b"served").unwrap(), b"served");
    let mut page = Page::boxed();
    c.read_page(0, &mut page).unwrap();
    drop(silent);
}

fn page_calls_land_in_the_callers_page<B: Backend>() {
    let s = server::<B>(0);
    let c = client::<B>(&s);
    let src = page_of(3);
    let mut dst = Page::boxed();
    c.call_page(1, &src.0, &mut dst).unwrap();
    assert_eq!(dst.0, src.0);
    let srcs: Vec<Box<Page>> = (0..8).map(page_of).collect();
    let mut dsts: Vec<Box<Page>> = (0..8).map(|_| Page::boxed()).collect();
    let mut calls: Vec<(&[u8], &mut Page)> =
        srcs.iter().map(|p| &p.0[..]).zip(dsts.iter_mut().map(|d| &mut **d)).collect();
    c.call_pages(1, &mut calls).unwrap();
    for (s, d) in srcs.iter().zip(&dsts) {
        assert_eq!(s.0, d.0);
    }
    // A response of the wrong size fails that call only; the connection stays in sync.
    let e = c.call_page(1, b"ten bytes!", &mut dst).unwrap_err();
    assert!(matches!(e, CallError::WrongSize { expected: 4096, got: 10, .. }), "{e}");
    assert_eq!(dst.0, src.0, "a wrong-size answer does not touch the page");
    assert_eq!(c.call_page(7, b"", &mut dst).unwrap_err().status(), Some(Status::Full));
    c.call_page(1, &srcs[5].0, &mut dst).unwrap();
    assert_eq!(dst.0, srcs[5].0);

    // Started without waiting: other calls meanwhile (which may receive the responses), then
    // collected on another thread; a wrong-size answer fails that call only.
    let reqs: Vec<&[u8]> =
        srcs.iter().enumerate().map(|(i, p)| if i == 3 { &b"short"[..] } else { &p.0[..] }).collect();
    let pages: Box<[Page]> = Page::vec(8).into_boxed_slice();
    let inflight = c.start_call_pages(1, &reqs, pages).unwrap();
    assert_eq!(c.call(1, b"meanwhile").unwrap(), b"meanwhile");
    let (pages, ok) = std::thread::spawn(move || inflight.wait()).join().unwrap();
    assert_eq!(ok, (0..8).map(|i| i != 3).collect::<Vec<_>>());
    for (i, (s, d)) in srcs.iter().zip(pages.iter()).enumerate() {
        if i != 3 {
            assert_eq!(s.0, d.0, "in-flight call {i}");
        }
    }
    // Given up unanswered (dropped) and refused with the wrong number of pages: the connection
    // carries on.
    drop(c.start_call_pages(1, &reqs, pages).unwrap());
    let two: Box<[Page]> = Page::vec(2).into_boxed_slice();
    assert!(matches!(c.start_call_pages(1, &reqs, two), Err(CallError::WrongSize { expected: 8, got: 2, .. })));
    c.call_page(1, &srcs[6].0, &mut dst).unwrap();
    assert_eq!(dst.0, srcs[6].0);
}

fn service_errors_reach_the_caller<B: Backend>() {
    let s = server::<B>(0);
    let c = client::<B>(&s);
    let e = c.call(7, b"").unwrap_err();
    assert_eq!(e.status(), Some(Status::Full), "{e}");
    assert!(e.to_string().contains("no room"), "{e}");
}

fn pages_round_trip_singly_and_in_batches<B: Backend>() {
    let s = server::<B>(64);
    let c = client::<B>(&s);
    assert_eq!(c.window_pages(), 64);
    for i in 0..64 {
        c.write_page(i, &page_of(i)).unwrap();
    }
    let mut p = Page::boxed();
    c.read_page(5, &mut p).unwrap();
    assert_eq!(p.0, page_of(5).0);
    // A batch of 16 reads, out of order: each page lands in its own buffer.
    let mut bufs = Page::vec(16);
    let idx: Vec<u64> = (0..16).map(|i| (i * 37 + 11) % 64).collect();
    let mut reads: Vec<(u64, &mut Page)> = idx.iter().copied().zip(bufs.iter_mut()).collect();
    c.read_pages(&mut reads).unwrap();
    for (i, b) in idx.iter().zip(&bufs) {
        assert_eq!(b.0, page_of(*i).0, "page {i}");
    }
    // A batch of writes, then read back.
    let newp: Vec<Box<Page>> = (0..8).map(|i| page_of(1000 + i)).collect();
    let writes: Vec<(u64, &Page)> = newp.iter().enumerate().map(|(i, p)| (i as u64 * 8, &**p)).collect();
    c.write_pages(&writes).unwrap();
    for i in 0..8u64 {
        c.read_page(i * 8, &mut p).unwrap();
        assert_eq!(p.0, page_of(1000 + i).0);
    }
}

fn page_errors_are_typed<B: Backend>() {
    let s = server::<B>(4);
    let c = client::<B>(&s);
    let mut p = Page::boxed();
    assert_eq!(c.read_page(4, &mut p).unwrap_err().status(), Some(Status::PageOutOfRange));
    assert_eq!(c.write_page(u64::MAX, &p).unwrap_err().status(), Some(Status::PageOutOfRange));
    // One bad read in a batch fails the batch but leaves the connection usable.
    let mut a = Page::boxed();
    let mut b = Page::boxed();
    assert!(c.read_pages(&mut [(0, &mut a), (9, &mut b)]).is_err());
    c.read_page(1, &mut p).unwrap();

    let no_window = server::<B>(0);
    let c2 = client::<B>(&no_window);
    assert_eq!(c2.read_page(0, &mut p).unwrap_err().status(), Some(Status::NoWindow));
}

fn many_threads_share_one_connection<B: Backend>() {
    let s = server::<B>(256);
    let c = client::<B>(&s);
    let threads = 16;
    let per_thread = 150;
    let ok = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|scope| {
        for t in 0..threads {
            let c = c.clone();
            let ok = ok.clone();
            scope.spawn(move || {
                let mut p = Page::boxed();
                for i in 0..per_thread {
                    let msg = format!("thread {t} message {i}");
                    assert_eq!(c.call(3, msg.as_bytes()).unwrap(), msg.as_bytes());
                    let page = (t * 16 + i % 16) as u64;
                    let want = page_of(page);
                    c.write_page(page, &want).unwrap();
                    c.read_page(page, &mut p).unwrap();
                    assert_eq!(p.0, want.0, "thread {t} page {page}");
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(ok.load(Ordering::Relaxed), threads * per_thread);
}

fn responses_match_requests_whatever_the_order<B: Backend>() {
    // A slow call and fast calls outstanding together on one connection: each caller gets its own.
    let s = server::<B>(0);
    let c = client::<B>(&s);
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| c.call(99, &[50]).map(|v| v.len()));
        let fast: Vec<_> = (0..4u8)
            .map(|i| {
                let c = c.clone();
                scope.spawn(move || c.call(1, &[i; 3]))
            })
            .collect();
        for (i, f) in fast.into_iter().enumerate() {
            assert_eq!(f.join().unwrap().unwrap(), vec![i as u8; 3]);
        }
        assert_eq!(slow.join().unwrap().unwrap(), 0);
    });
}

fn a_dead_peer_fails_requests_without_hanging<B: Backend>() {
    let s = server::<B>(0);
    let c = client::<B>(&s);
    let c2 = c.clone();
    let start = Instant::now();
    let waiter = std::thread::spawn(move || c2.call(99, &[200]));
    std::thread::sleep(Duration::from_millis(50));
    drop(s); // closes every connection while the request is outstanding
    let r = waiter.join().unwrap();
    assert!(matches!(r, Err(CallError::Disconnected { .. })), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Later requests fail at once, with the same typed error.
    assert!(matches!(c.call(1, b"x"), Err(CallError::Disconnected { .. })));
}

fn requests_time_out_with_an_error<B: Backend>() {
    let s = server::<B>(0);
    let opts = ConnectOptions::new(key()).timeout(Duration::from_millis(100));
    let c = connect(&B::client_uri(s.uri()), &opts).unwrap();
    let r = c.call(99, &[250]);
    assert!(matches!(r, Err(CallError::TimedOut { .. })), "{r:?}");
    // The late answer is discarded and the connection still works.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.call(1, b"after").unwrap(), b"after");
}

fn a_wrong_key_is_refused_on_both_sides<B: Backend>() {
    let s = server::<B>(0);
    let wrong = ClusterKey::from_bytes(b"some-other-cluster-key").unwrap();
    let e = connect(&B::client_uri(s.uri()), &ConnectOptions::new(wrong)).unwrap_err();
    assert!(e.is_wrong_key(), "{e}");
    // The server dropped that connection and still serves the right key.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.connections(), 0);
    assert_eq!(client::<B>(&s).call(1, b"ok").unwrap(), b"ok");
}

/// True if the back-end can run here. An RDMA suite without a device prints why and skips,
/// unless MOSAIC_RDMA_DEVICE names a device, in which case a failure to open it fails the test.
fn available<B: Backend>() -> bool {
    let uri = B::bind_uri();
    if !uri.starts_with("rdma://") {
        return true;
    }
    match listen(&uri, ServerConfig::new(key())) {
        Ok(_) => true,
        Err(e) if std::env::var_os("MOSAIC_RDMA_DEVICE").is_none() => {
            eprintln!("skipped: no usable RDMA device ({e}: {:?}); set MOSAIC_RDMA_DEVICE to require one", e.source());
            false
        }
        Err(e) => panic!("MOSAIC_RDMA_DEVICE is set but RDMA is unusable: {e}: {:?}", e.source()),
    }
}

macro_rules! suite {
    ($modname:ident, $backend:ty $(, ignore = $ignore:literal)?) => {
        mod $modname {
            #[test]
            $(#[ignore = $ignore])?
            fn a_silent_peer_does_not_hold_up_others() {
                if !super::available::<$backend>() {
                    return;
                }
                super::a_silent_peer_does_not_hold_up_others::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn calls_echo_every_size() {
                if !super::available::<$backend>() {
                    return;
                }
                super::calls_echo_every_size::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn page_calls_land_in_the_callers_page() {
                if !super::available::<$backend>() {
                    return;
                }
                super::page_calls_land_in_the_callers_page::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn service_errors_reach_the_caller() {
                if !super::available::<$backend>() {
                    return;
                }
                super::service_errors_reach_the_caller::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn pages_round_trip_singly_and_in_batches() {
                if !super::available::<$backend>() {
                    return;
                }
                super::pages_round_trip_singly_and_in_batches::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn page_errors_are_typed() {
                if !super::available::<$backend>() {
                    return;
                }
                super::page_errors_are_typed::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn many_threads_share_one_connection() {
                if !super::available::<$backend>() {
                    return;
                }
                super::many_threads_share_one_connection::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn responses_match_requests_whatever_the_order() {
                if !super::available::<$backend>() {
                    return;
                }
                super::responses_match_requests_whatever_the_order::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn a_dead_peer_fails_requests_without_hanging() {
                if !super::available::<$backend>() {
                    return;
                }
                super::a_dead_peer_fails_requests_without_hanging::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn requests_time_out_with_an_error() {
                if !super::available::<$backend>() {
                    return;
                }
                super::requests_time_out_with_an_error::<$backend>();
            }
            #[test]
            $(#[ignore = $ignore])?
            fn a_wrong_key_is_refused_on_both_sides() {
                if !super::available::<$backend>() {
                    return;
                }
                super::a_wrong_key_is_refused_on_both_sides::<$backend>();
            }
        }
    };
}

suite!(tcp, super::Tcp);
suite!(shm, super::Shm);
suite!(sim, super::Sim);
suite!(tcp_integrity, super::TcpIntegrity);
suite!(tcp_encrypt, super::TcpEncrypt);
suite!(shm_encrypt, super::ShmEncrypt);
// RDMA needs a device: these run only with `--features rdma -- --ignored`, with
// MOSAIC_RDMA_DEVICE naming it (e.g. rxe0 under soft-RoCE; see .ci/rdma-vm-tests).
#[cfg(feature = "rdma")]
suite!(rdma, super::Rdma, ignore = "needs an RDMA device: run with --ignored and MOSAIC_RDMA_DEVICE");
