//! TCP back-end: a non-blocking socket with `TCP_NODELAY`, sized buffers and vectored writes.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use smallvec::SmallVec;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::server::{Accepted, Incoming};
use crate::stream::ByteStream;
use crate::sys;

/// Socket send and receive buffer size: room for 256 pages in flight each way.
const SOCKET_BUFFER: usize = 1 << 20;

/// One TCP connection as a [`ByteStream`].
pub(crate) struct TcpByteStream {
    sock: TcpStream,
    peer: String,
}

impl TcpByteStream {
    /// Configures an accepted or connected socket for Mosaic's traffic.
    pub(crate) fn new(sock: TcpStream) -> io::Result<TcpByteStream> {
        let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        configure(&SockRef::from(&sock))?;
        sock.set_nonblocking(true)?;
        Ok(TcpByteStream { sock, peer: format!("tcp://{peer}") })
    }

    /// Connects to `addr` (host:port), trying each resolved address, within `timeout` each.
    pub(crate) fn connect(addr: &str, timeout: Duration) -> io::Result<TcpByteStream> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
        for sa in addr.to_socket_addrs()? {
            let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
            configure(&SockRef::from(&socket))?;
            match socket.connect_timeout(&sa.into(), timeout) {
                Ok(()) => return TcpByteStream::new(socket.into()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl TcpByteStream {
    /// The socket itself (for polling alongside other descriptors).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.sock
    }
}

/// TCP keepalive: probe a connection idle this long...
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// ...every this often...
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and give it up after this many unanswered probes: a peer whose host vanished (no FIN, no
/// RST) is noticed within about two minutes, so a memory server starts the grace time of its
/// client instead of holding its pages forever. A peer that is merely stopped still answers
/// (its kernel does), so it keeps its connection.
pub(crate) const KEEPALIVE_PROBES: u32 = 6;

fn configure(sock: &SockRef<'_>) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    sock.set_send_buffer_size(SOCKET_BUFFER)?;
    sock.set_recv_buffer_size(SOCKET_BUFFER)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    sock.set_tcp_keepalive(&keepalive)?;
    Ok(())
}

/// Binds a listening socket with `SO_REUSEADDR`.
pub(crate) fn listen(addr: &str) -> io::Result<TcpListener> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
    for sa in addr.to_socket_addrs()? {
        match bind(sa) {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn bind(sa: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&sa.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl ByteStream for TcpByteStream {
    fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut slices: SmallVec<[IoSlice<'_>; 8]> =
            bufs.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(b)).collect();
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            match (&self.sock).write_vectored(rest) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading")),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    sys::poll_one(&self.sock, sys::Interest::Write, Some(Duration::from_millis(50)))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.sock).read(buf)
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        sys::poll_one(&self.sock, sys::Interest::Read, Some(timeout)).map(|_| ())
    }

    fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    fn peer_hung_up(&self) -> bool {
        sys::hung_up(&self.sock)
    }

    fn is_same_host(&self) -> bool {
        self.sock.peer_addr().is_ok_and(|a| a.ip().is_loopback())
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}

/// Accepts TCP connections for a [`Server`](crate::Server).
pub(crate) struct TcpAcceptor {
    listener: TcpListener,
    uri: String,
}

impl TcpAcceptor {
    /// Binds `addr` (`host:port`; port 0 picks a free port).
    pub(crate) fn bind(addr: &str) -> io::Result<TcpAcceptor> {
        let listener = listen(addr)?;
        listener.set_nonblocking(true)?;
        let uri = format!("tcp://{}", listener.local_addr()?);
        Ok(TcpAcceptor { listener, uri })
    }
}

impl TcpAcceptor {
    /// Waits up to `timeout` for a connection.
    pub(crate) fn accept_tcp(&mut self, timeout: Duration) -> io::Result<Option<TcpByteStream>> {
        if !sys::poll_one(&self.listener, sys::Interest::Read, Some(timeout))? {
            return Ok(None);
        }
        match self.listener.accept() {
            Ok((sock, _)) => Ok(Some(TcpByteStream::new(sock)?)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The source of a TCP connection for per-source limits: its address without the port.
pub(crate) fn source_of(stream: &TcpByteStream) -> String {
    stream.sock.peer_addr().map_or_else(|_| "?".into(), |a| a.ip().to_string())
}

impl crate::server::Acceptor for TcpAcceptor {
    fn accept(&mut self, timeout: Duration) -> io::Result<Option<Accepted>> {
        Ok(self.accept_tcp(timeout)?.map(|s| Accepted {
            source: source_of(&s),
            peer: s.peer(),
            incoming: Incoming::Ready(Box::new(s)),
        }))
    }

    fn local_uri(&self) -> String {
        self.uri.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a connection probe an idle peer, so a vanished host is noticed.
    #[test]
    fn connections_probe_a_silent_peer() {
        let mut acc = TcpAcceptor::bind("127.0.0.1:0").unwrap();
        let addr = acc.uri.trim_start_matches("tcp://").to_string();
        let client = TcpByteStream::connect(&addr, Duration::from_secs(5)).unwrap();
        let server = loop {
            if let Some(s) = acc.accept_tcp(Duration::from_millis(50)).unwrap() {
                break s;
            }
        };
        for s in [&client, &server] {
            let r = SockRef::from(&s.sock);
            assert!(r.keepalive().unwrap());
            assert_eq!(r.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(r.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(r.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        }
    }
}
