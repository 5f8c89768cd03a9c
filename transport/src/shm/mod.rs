//! `shm`: two processes on one host talk through rings in shared memory (the Myrinet/GM model:
//! user-level, OS bypass, no system call on the fast path while the peer is active).
//!
//! # Rendezvous
//! The server listens on a Unix socket in the abstract namespace (`@mosaic-shm/NAME`, nothing to
//! clean up on disk). For each client it creates a memfd holding a control page and two
//! [`ring`]s (client to server, server to client), and passes the memfd plus four eventfds to
//! the client with `SCM_RIGHTS`. The socket then carries no data; it stays open only so that
//! each side learns at once when the other process dies (the kernel closes it).
//!
//! # Waiting
//! A reader busy-polls the ring for the connection's spin time, then sets its `reader_sleeping`
//! flag and sleeps in `poll` on its eventfd and the socket; a writer signals the eventfd only when
//! that flag is set, so while both sides are active no system call is made at all. A full ring
//! makes the writer wait the same way on the "space" eventfd.
//!
//! # Memory layout of the memfd
//! ```text
//! 0       control page: magic, version, ring capacity, closed flag of each side
//! 4096    ring header client->server (4 cache lines)
//! 4608    ring header server->client
//! 8192    client->server bytes [cap]
//! 8192+cap server->client bytes [cap]
//! ```

#[cfg(test)]
mod hostile_tests;
pub(crate) mod ring;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ring::{RawBytes, Ring, RingCorrupt, RingEnd, RingHeader};

use crate::logs::RateLimited;
use crate::server::{Accepted, Incoming};
use crate::stream::ByteStream;
use crate::sys::{self, Mapping};

/// Bytes in each direction's ring.
pub(crate) const RING_CAPACITY: usize = 1 << 20;
const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"MOSAISHM");
const LAYOUT_VERSION: u32 = 1;
const RING_HDR_A: usize = 4096;
const RING_HDR_B: usize = 4096 + 512;
const DATA_OFF: usize = 8192;
/// How long a writer spins for room before sleeping.
const WRITE_SPIN: Duration = Duration::from_micros(50);
/// Longest single sleep, so closure by the peer is noticed even without a wake-up.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// The control page at offset 0.
#[repr(C)]
struct Control {
    magic: AtomicU64,
    version: AtomicU32,
    capacity: AtomicU64,
    client_closed: AtomicU32,
    server_closed: AtomicU32,
}

/// Which local users may be at the other end of an `shm://` connection. Checked with
/// `SO_PEERCRED` on the rendezvous socket, by the server before it hands out any shared memory
/// and by the client before it maps any. The cluster key must still be proven on top.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalPeers {
    /// Processes of the same user as this one, and root's (the default).
    #[default]
    SameUser,
    /// The same user, root, and these user ids.
    Users(Vec<u32>),
    /// Any local user.
    AnyUser,
}

impl LocalPeers {
    /// True if a process of user `uid` may be our peer.
    pub fn allows(&self, uid: u32) -> bool {
        if uid == 0 || uid == sys::euid() {
            return true;
        }
        match self {
            LocalPeers::SameUser => false,
            LocalPeers::Users(uids) => uids.contains(&uid),
            LocalPeers::AnyUser => true,
        }
    }
}

/// Refusals by user are logged a few at a time.
static REFUSED_USERS: RateLimited = RateLimited::new("shm connections refused by user");

fn socket_addr(name: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("mosaic-shm/{name}").as_bytes())
}

fn layout_len(cap: usize) -> usize {
    DATA_OFF + 2 * cap
}

/// Which end of the connection a stream is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// One end of a shm connection.
pub(crate) struct ShmByteStream {
    map: Mapping,
    side: Side,
    cap: usize,
    /// [tx data (we signal), tx space (we wait), rx data (we wait), rx space (we signal)]
    efd: [OwnedFd; 4],
    sock: UnixStream,
    peer_gone: AtomicBool,
    closed: AtomicBool,
    peer: String,
    /// Our private counters of the ring we write and of the ring we read: never read back from
    /// the shared memory, which the peer can overwrite.
    tx_end: RingEnd,
    rx_end: RingEnd,
}

// SAFETY: the raw memory is owned by `map`, which lives as long as the stream; concurrent use
// follows the ring's SPSC protocol (the connection serialises writers and readers), and the
// shared flags are atomics.
unsafe impl Send for ShmByteStream {}
// SAFETY: as above.
unsafe impl Sync for ShmByteStream {}

impl ShmByteStream {
    fn new(
        map: Mapping,
        side: Side,
        cap: usize,
        fds: [OwnedFd; 4],
        sock: UnixStream,
        peer: String,
    ) -> io::Result<Self> {
        if map.len() < layout_len(cap) || !cap.is_power_of_two() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "shm mapping smaller than its layout"));
        }
        sock.set_nonblocking(true)?;
        // Client efds are in wire order [c2s data, c2s space, s2c data, s2c space]; as seen
        // from each side: [tx data, tx space, rx data, rx space].
        let [a, b, c, d] = fds;
        let efd = match side {
            Side::Client => [a, b, c, d],
            Side::Server => [c, d, a, b],
        };
        Ok(ShmByteStream {
            map,
            side,
            cap,
            efd,
            sock,
            peer_gone: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            peer,
            tx_end: RingEnd::new(),
            rx_end: RingEnd::new(),
        })
    }

    fn control(&self) -> &Control {
        // SAFETY: offset 0 of the mapping holds the control page, initialised by the server
        // before the memfd was shared, page-aligned, and valid for the mapping's lifetime.
        unsafe { &*self.map.as_ptr().cast::<Control>() }
    }

    fn ring<'a>(&'a self, hdr_off: usize, data_off: usize, end: &'a RingEnd) -> Ring<'a, RawBytes> {
        // SAFETY: hdr_off is one of RING_HDR_A/B, inside the mapping (checked against
        // layout_len in new), 64-aligned, and holds a RingHeader made of atomics, which any
        // bit pattern (zeroed memfd) initialises validly.
        let hdr = unsafe { &*self.map.as_ptr().add(hdr_off).cast::<RingHeader>() };
        // SAFETY: [data_off, data_off + cap) lies inside the mapping (layout_len).
        let ptr = unsafe { self.map.as_ptr().add(data_off) };
        Ring::new(hdr, RawBytes { ptr, cap: self.cap }, end)
    }

    /// The ring we write.
    fn tx(&self) -> Ring<'_, RawBytes> {
        match self.side {
            Side::Client => self.ring(RING_HDR_A, DATA_OFF, &self.tx_end),
            Side::Server => self.ring(RING_HDR_B, DATA_OFF + self.cap, &self.tx_end),
        }
    }

    /// The ring we read.
    fn rx(&self) -> Ring<'_, RawBytes> {
        match self.side {
            Side::Client => self.ring(RING_HDR_B, DATA_OFF + self.cap, &self.rx_end),
            Side::Server => self.ring(RING_HDR_A, DATA_OFF, &self.rx_end),
        }
    }

    fn my_closed(&self) -> &AtomicU32 {
        match self.side {
            Side::Client => &self.control().client_closed,
            Side::Server => &self.control().server_closed,
        }
    }

    fn peer_closed(&self) -> bool {
        let c = self.control();
        let flag = match self.side {
            Side::Client => &c.server_closed,
            Side::Server => &c.client_closed,
        };
        flag.load(Ordering::Acquire) != 0 || self.peer_gone.load(Ordering::Acquire)
    }

    /// Sleeps on eventfd `which` and the socket; notes the peer's death if the socket closed.
    fn sleep_on(&self, which: usize, timeout: Duration) -> io::Result<()> {
        let mut fds =
            [sys::pollfd(self.efd[which].as_fd(), libc::POLLIN), sys::pollfd(self.sock.as_fd(), libc::POLLIN)];
        sys::poll(&mut fds, Some(timeout))?;
        if fds[0].revents != 0 {
            sys::eventfd_drain(self.efd[which].as_fd());
        }
        if fds[1].revents != 0 && sys::side_channel_closed(&self.sock) {
            self.peer_gone.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn broken(&self) -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, format!("{} closed the connection", self.peer))
    }

    /// The peer broke the ring protocol: close the connection for good and say why.
    fn corrupt(&self, e: RingCorrupt) -> io::Error {
        log::warn!("closing {}: {e}", self.peer);
        self.shutdown();
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", self.peer))
    }
}

impl ByteStream for ShmByteStream {
    fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let tx = self.tx();
        for buf in bufs {
            let mut done = 0;
            let mut wait_start: Option<Instant> = None;
            while done < buf.len() {
                if self.closed.load(Ordering::Acquire) || self.peer_closed() {
                    return Err(self.broken());
                }
                let n = tx.push(&buf[done..]).map_err(|e| self.corrupt(e))?;
                done += n;
                if n > 0 {
                    wait_start = None;
                    continue;
                }
                // Full: wake the reader (it must drain), spin a while, then sleep for room.
                self.signal_reader(&tx);
                let started = *wait_start.get_or_insert_with(Instant::now);
                if started.elapsed() < WRITE_SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                tx.header().writer_sleeping.0.store(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if tx.is_full().map_err(|e| self.corrupt(e))? {
                    self.sleep_on(1, MAX_SLEEP)?;
                }
                tx.header().writer_sleeping.0.store(0, Ordering::SeqCst);
            }
        }
        self.signal_reader(&tx);
        Ok(())
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let rx = self.rx();
        let n = rx.pop(buf).map_err(|e| self.corrupt(e))?;
        if n > 0 {
            fence(Ordering::SeqCst);
            if rx.header().writer_sleeping.0.load(Ordering::SeqCst) != 0 {
                sys::eventfd_signal(self.efd[3].as_fd());
            }
            return Ok(n);
        }
        // Empty: end of stream only once everything the peer wrote has been read.
        if self.closed.load(Ordering::Acquire) || self.peer_closed() {
            if rx.available().map_err(|e| self.corrupt(e))? == 0 {
                return Ok(0);
            }
            return self.try_read(buf);
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// A read is a copy out of the receive ring: reading ahead would only add a second copy.
    fn batch_reads(&self) -> bool {
        false
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        let rx = self.rx();
        rx.header().reader_sleeping.0.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let empty = rx.available().map_err(|e| self.corrupt(e))? == 0;
        if empty && !self.closed.load(Ordering::Acquire) && !self.peer_closed() {
            self.sleep_on(2, timeout.min(MAX_SLEEP))?;
        }
        rx.header().reader_sleeping.0.store(0, Ordering::SeqCst);
        Ok(())
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.my_closed().store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        // Wake everyone who might sleep on this connection, on both sides.
        for e in &self.efd {
            sys::eventfd_signal(e.as_fd());
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }

    fn peer_hung_up(&self) -> bool {
        self.peer_closed() || sys::hung_up(&self.sock)
    }

    fn is_same_host(&self) -> bool {
        true
    }
}

impl ShmByteStream {
    fn signal_reader(&self, tx: &Ring<'_, RawBytes>) {
        fence(Ordering::SeqCst);
        if tx.header().reader_sleeping.0.load(Ordering::SeqCst) != 0 {
            sys::eventfd_signal(self.efd[0].as_fd());
        }
    }
}

impl Drop for ShmByteStream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Connects to the shm server named `name`, if its user is one `peers` allows.
pub(crate) fn connect(name: &str, timeout: Duration, peers: &LocalPeers) -> io::Result<ShmByteStream> {
    let sock = UnixStream::connect_addr(&socket_addr(name)?).map_err(|e| {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            io::Error::new(e.kind(), format!("no shm server named {name:?} on this host"))
        } else {
            e
        }
    })?;
    let cred = sys::peer_cred(&sock)?;
    if !peers.allows(cred.uid) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "shm server {name:?} runs as user {} (pid {}), which this client does not trust \
                 (allowed: {peers:?})",
                cred.uid, cred.pid
            ),
        ));
    }
    sock.set_read_timeout(Some(timeout))?;
    let mut msg = [0u8; 24];
    let (n, fds) = sys::recv_fds(&sock, &mut msg)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("shm server {name:?}: {what}"));
    if n != msg.len() || msg[..8] != CONTROL_MAGIC.to_le_bytes() {
        return Err(bad("not a Mosaic shm server"));
    }
    let version = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]);
    if version != LAYOUT_VERSION {
        return Err(bad(&format!("layout version {version}, expected {LAYOUT_VERSION}")));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&msg[16..24]);
    let cap = usize::try_from(u64::from_le_bytes(c)).map_err(|_| bad("capacity"))?;
    if !cap.is_power_of_two() || !(4096..=(1 << 30)).contains(&cap) {
        return Err(bad(&format!("ring capacity {cap}")));
    }
    let fds: [OwnedFd; 5] =
        fds.try_into().map_err(|v: Vec<OwnedFd>| bad(&format!("{} descriptors instead of 5", v.len())))?;
    let [mem, a, b, cc, d] = fds;
    let (seals, size) = sys::seals_and_size(mem.as_fd())?;
    if seals & sys::SIZE_SEALS != sys::SIZE_SEALS {
        return Err(bad("its shared memory is not sealed against resizing (it could be truncated under us)"));
    }
    if size < layout_len(cap) as u64 {
        return Err(bad(&format!("shared memory of {size} bytes, its layout needs {}", layout_len(cap))));
    }
    let map = Mapping::shared(mem.as_fd(), layout_len(cap))?;
    let stream = ShmByteStream::new(map, Side::Client, cap, [a, b, cc, d], sock, format!("shm://{name}"))?;
    if stream.control().magic.load(Ordering::Acquire) != CONTROL_MAGIC {
        return Err(bad("control page not initialised"));
    }
    Ok(stream)
}

/// Accepts shm connections for a server.
pub(crate) struct ShmAcceptor {
    listener: UnixListener,
    name: String,
    accepted: u64,
    peers: LocalPeers,
}

impl ShmAcceptor {
    /// Listens as `name` on this host, for the users `peers` allows.
    pub(crate) fn bind(name: &str, peers: LocalPeers) -> io::Result<ShmAcceptor> {
        let listener = UnixListener::bind_addr(&socket_addr(name)?).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                io::Error::new(e.kind(), format!("an shm server named {name:?} already runs on this host"))
            } else {
                e
            }
        })?;
        listener.set_nonblocking(true)?;
        Ok(ShmAcceptor { listener, name: name.into(), accepted: 0, peers })
    }

    fn setup(&mut self, sock: UnixStream) -> io::Result<ShmByteStream> {
        sock.set_nonblocking(false)?;
        let cap = RING_CAPACITY;
        let mem = sys::memfd(&format!("mosaic-shm-{}", self.name), layout_len(cap))?;
        let map = Mapping::shared(mem.as_fd(), layout_len(cap))?;
        {
            // SAFETY: offset 0 of a fresh, zeroed, page-aligned mapping of at least one page;
            // nobody else has the memfd yet. Control is all atomics.
            let ctl = unsafe { &*map.as_ptr().cast::<Control>() };
            ctl.version.store(LAYOUT_VERSION, Ordering::Relaxed);
            ctl.capacity.store(cap as u64, Ordering::Relaxed);
            ctl.magic.store(CONTROL_MAGIC, Ordering::Release);
        }
        sys::seal_size(mem.as_fd())?;
        let efds = [sys::eventfd()?, sys::eventfd()?, sys::eventfd()?, sys::eventfd()?];
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&CONTROL_MAGIC.to_le_bytes());
        msg[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        msg[16..24].copy_from_slice(&(cap as u64).to_le_bytes());
        let borrowed = [mem.as_fd(), efds[0].as_fd(), efds[1].as_fd(), efds[2].as_fd(), efds[3].as_fd()];
        sys::send_fds(&sock, &msg, &borrowed)?;
        self.accepted += 1;
        let peer = format!("shm://{}#{}", self.name, self.accepted);
        ShmByteStream::new(map, Side::Server, cap, efds, sock, peer)
    }
}

impl crate::server::Acceptor for ShmAcceptor {
    fn accept(&mut self, timeout: Duration) -> io::Result<Option<Accepted>> {
        if !sys::poll_one(&self.listener, sys::Interest::Read, Some(timeout))? {
            return Ok(None);
        }
        match self.listener.accept() {
            Ok((sock, _)) => {
                let cred = sys::peer_cred(&sock)?;
                if !self.peers.allows(cred.uid) {
                    REFUSED_USERS.warn(format_args!(
                        "shm://{}: refused a connection from user {} (pid {}): not allowed by {:?}",
                        self.name, cred.uid, cred.pid, self.peers
                    ));
                    return Ok(None);
                }
                // A peer that leaves before its set-up fails only its own connection.
                let stream = match self.setup(sock) {
                    Ok(s) => s,
                    Err(e) => {
                        REFUSED_USERS.warn(format_args!("shm://{}: set-up of a connection failed: {e}", self.name));
                        return Ok(None);
                    }
                };
                Ok(Some(Accepted {
                    source: format!("uid {}", cred.uid),
                    peer: stream.peer(),
                    incoming: Incoming::Ready(Box::new(stream)),
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn local_uri(&self) -> String {
        format!("shm://{}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::Acceptor;
    use crate::stream::{read_exact, WaitPolicy};

    /// Raw stream round trip without the connection layer: the floor the conn layer adds to.
    /// `cargo test --release -p mosaic-transport --lib raw_ring_round_trip -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check: run by hand"]
    fn raw_ring_round_trip() {
        let name = format!("raw-{}", std::process::id());
        let mut acc = ShmAcceptor::bind(&name, LocalPeers::SameUser).unwrap();
        let client = std::thread::spawn(move || connect(&name, Duration::from_secs(1), &LocalPeers::SameUser).unwrap());
        let server = loop {
            if let Some(s) = acc.accept(Duration::from_millis(10)).unwrap().map(Accepted::into_ready) {
                break s;
            }
        };
        let client = client.join().unwrap();
        let n = 200_000;
        let echo = std::thread::spawn(move || {
            let mut b = [0u8; 96];
            for _ in 0..n {
                read_exact(&*server, &mut b, WaitPolicy::DEFAULT, None).unwrap();
                server.write_all(&[&b]).unwrap();
            }
        });
        let mut b = [0u8; 96];
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            client.write_all(&[&b]).unwrap();
            read_exact(&client, &mut b, WaitPolicy::DEFAULT, None).unwrap();
            lat.push(t.elapsed());
        }
        echo.join().unwrap();
        lat.sort();
        println!("raw shm 96 B round trip: min {:?} median {:?}", lat[0], lat[n / 2]);
    }
}

#[cfg(test)]
mod conn_measure {
    use std::time::{Duration, Instant};

    /// The same round trip through the request layer (client `Connection` and server loop), to
    /// compare with `raw_ring_round_trip`.
    /// `cargo test --release -p mosaic-transport --lib conn_round_trip -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check: run by hand"]
    fn conn_round_trip() {
        let key = crate::ClusterKey::from_bytes(b"measurement-cluster-key").unwrap();
        let name = format!("shm://conn-measure-{}", std::process::id());
        let server = crate::listen(&name, crate::ServerConfig::new(key.clone()).service(crate::Echo)).unwrap();
        let conn = crate::connect(server.uri(), &crate::ConnectOptions::new(key)).unwrap();
        let msg = [7u8; 64];
        let n = 200_000;
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            conn.call(1, &msg).unwrap();
            lat.push(t.elapsed());
        }
        lat.sort();
        let med: Duration = lat[n / 2];
        println!("conn shm 64 B call round trip: min {:?} median {:?}", lat[0], med);
    }
}
