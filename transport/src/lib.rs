//! Mosaic's transport layer: bytes between nodes.
//!
//! One interface over every back-end: [`connect`] and [`listen`] by URI, request/response
//! messages with request ids ([`Connection::call`]; many outstanding at once, from many threads,
//! on one connection), and one-sided page access ([`Connection::read_page`],
//! [`Connection::write_page`] and their batched forms) into caller-provided, page-aligned
//! [`Page`] buffers. Every connection proves the cluster key ([`ClusterKey`]) in both directions
//! before any other frame is read.
//!
//! | URI                    | back-end                                                         |
//! |------------------------|------------------------------------------------------------------|
//! | `tcp://host:port`      | TCP with `TCP_NODELAY`, 1 MiB socket buffers, vectored writes      |
//! | `shm://name`           | shared-memory rings between two processes on one host (OS bypass) |
//! | `sim://LINK@URI`       | a shaped link (latency, bandwidth, loss, partition) around tcp/shm |
//! | `rdma://host:port`     | RDMA RC queue pairs (cargo feature `rdma`)                         |
//!
//! # Quick start
//! ```
//! use mosaic_transport::{connect, listen, ClusterKey, ConnectOptions, Echo, Page, PageWindow, ServerConfig};
//! use std::sync::Arc;
//!
//! let key = ClusterKey::from_bytes(b"an example cluster key").unwrap();
//! let window = Arc::new(PageWindow::new(16).unwrap());
//! let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key.clone()).service(Echo).window(window)).unwrap();
//!
//! let conn = connect(server.uri(), &ConnectOptions::new(key)).unwrap();
//! assert_eq!(conn.call(1, b"ping").unwrap(), b"ping");
//!
//! let mut page = Page::boxed();
//! page.0[0] = 42;
//! conn.write_page(3, &page).unwrap();
//! let mut back = Page::boxed();
//! conn.read_page(3, &mut back).unwrap();
//! assert_eq!(back.0[0], 42);
//! ```
//!
//! # Cargo features
//! - `rdma`: the `rdma://` back-end, through a small C layer over rdma-core's libibverbs. Without
//!   it, `rdma://` URIs fail with [`ConnectError::Unsupported`] / [`ListenError::Unsupported`].
//!
//! # System dependencies
//! None by default (Linux only: memfd, eventfd, abstract Unix sockets). With `rdma`: a C compiler
//! and `libibverbs-dev` to build; an RDMA device (or soft-RoCE, `rdma link add rxe0 type rxe
//! netdev eth0`) to run, chosen by `MOSAIC_RDMA_DEVICE`.
//!
//! # Waiting
//! Waiting threads busy-poll for a bounded time, then sleep ([`WaitPolicy`]): on the 2-vCPU
//! machines this was built on a cross-core wake-up costs 30-35 us, against ~8 us for a polled
//! loopback round trip. There is no receive thread: a caller waiting for a response reads the
//! stream itself (see the `conn` module), so a response never needs a thread hop.
//!
//! # Thread safety and cleanup
//! [`Connection`] is `Clone + Send + Sync`; clones share one connection. Dropping the last clone
//! closes it. [`Server`] joins all of its threads when dropped or [`Server::shutdown`].
//!
//! # Errors
//! A malformed, oversized, truncated or unknown frame closes its connection with a logged
//! [`FrameError`]; callers waiting on that connection get [`CallError::Disconnected`], never a
//! hang (every wait is bounded by [`ConnectOptions::timeout`]).

// Tests build data with narrowing casts on purpose; the library itself must not.
#![cfg_attr(test, allow(clippy::cast_possible_truncation, clippy::cast_sign_loss))]

mod auth;
mod conn;
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
mod logs;
#[cfg(test)]
mod malformed_tests;
mod page;
#[cfg(feature = "rdma")]
mod rdma;
#[cfg(any(feature = "rdma", fuzzing, test))]
mod rdma_wire;
mod secure;
mod server;
mod shm;
pub mod sim;
mod stream;
mod sync;
mod sys;
mod tcp;
mod uri;
pub mod wire;

use std::time::{Duration, Instant};

use thiserror::Error;

pub use auth::{ClusterKey, HandshakeError, KeyError, ServerInfo, KEY_ENV, KEY_FILE_ENV, MIN_KEY_LEN};
pub use conn::{CallError, Connection, PagesInFlight};
pub use page::{Page, PageWindow};
pub use secure::{Protection, PROTECTION_ENV};
pub use server::{Caller, Echo, Limits, NoService, Server, ServerConfig, Service, ServiceError};
pub use shm::LocalPeers;
pub use sim::{LinkSpec, SimLink};
pub use stream::WaitPolicy;
pub use uri::{Endpoint, UriError};
pub use wire::{FrameError, Status, PAGE_SIZE};

use stream::ByteStream;

/// How a client connects.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The cluster key to prove.
    pub key: ClusterKey,
    /// How callers wait for responses.
    pub policy: WaitPolicy,
    /// The longest any request waits for its response.
    pub timeout: Duration,
    /// The longest the connection and handshake may take.
    pub connect_timeout: Duration,
    /// Which local users an `shm://` server may run as.
    pub local_peers: LocalPeers,
    /// What protects the frames after the handshake (`None`: automatic, [`Protection::Encrypt`]
    /// between hosts and [`Protection::None`] on the same host). The server may grant more.
    /// [`ConnectOptions::new`] takes it from `MOSAIC_PROTECTION` when set.
    pub protection: Option<Protection>,
}

impl ConnectOptions {
    /// Default options with `key`: spin-then-sleep, 30 s request time-out, 5 s to connect.
    pub fn new(key: ClusterKey) -> ConnectOptions {
        ConnectOptions {
            key,
            policy: WaitPolicy::DEFAULT,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            local_peers: LocalPeers::default(),
            protection: Protection::from_env(),
        }
    }

    /// Sets the wait policy.
    pub fn policy(mut self, policy: WaitPolicy) -> ConnectOptions {
        self.policy = policy;
        self
    }

    /// Sets the request time-out.
    pub fn timeout(mut self, timeout: Duration) -> ConnectOptions {
        self.timeout = timeout;
        self
    }

    /// Asks for `protection` of the frames (instead of the automatic choice).
    pub fn protection(mut self, protection: Protection) -> ConnectOptions {
        self.protection = Some(protection);
        self
    }
}

/// Why [`connect`] failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URI is malformed.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The back-end is not available in this build or on this machine.
    #[error("{uri}: {reason}")]
    Unsupported {
        /// The URI.
        uri: String,
        /// Why.
        reason: String,
    },
    /// The peer could not be reached.
    #[error("cannot reach {uri}")]
    Io {
        /// The URI.
        uri: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The peer was reached but the handshake failed (wrong cluster key, not a Mosaic peer...).
    #[error("handshake with {uri} failed")]
    Handshake {
        /// The URI.
        uri: String,
        /// The failure.
        #[source]
        source: HandshakeError,
    },
}

impl ConnectError {
    /// True if the peers hold different cluster keys.
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, ConnectError::Handshake { source: HandshakeError::WrongKey, .. })
    }
}

/// Why [`listen`] failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The URI is malformed.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The back-end cannot listen here.
    #[error("{uri}: {reason}")]
    Unsupported {
        /// The URI.
        uri: String,
        /// Why.
        reason: String,
    },
    /// Binding failed.
    #[error("cannot listen on {uri}")]
    Io {
        /// The URI.
        uri: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

/// An error and its chain of sources on one line (`error: cause: cause of the cause`), for
/// messages to people.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Connects to the server at `uri` and authenticates.
pub fn connect(uri: &str, opts: &ConnectOptions) -> Result<Connection, ConnectError> {
    connect_endpoint(uri, Endpoint::parse(uri)?, opts).map(|(c, _)| c)
}

/// Connects through a simulated link and returns its handle, to partition and heal it.
pub fn connect_sim(
    inner_uri: &str,
    spec: LinkSpec,
    opts: &ConnectOptions,
) -> Result<(Connection, SimLink), ConnectError> {
    let inner = Endpoint::parse(inner_uri)?;
    let (c, link) = connect_endpoint(inner_uri, Endpoint::Sim(spec, Box::new(inner)), opts)?;
    Ok((c, link.expect("a sim endpoint yields a link")))
}

fn connect_endpoint(
    uri: &str,
    ep: Endpoint,
    opts: &ConnectOptions,
) -> Result<(Connection, Option<SimLink>), ConnectError> {
    let deadline = Instant::now() + opts.connect_timeout;
    let io = |source| ConnectError::Io { uri: uri.into(), source };
    let (stream, one_sided, link): (Box<dyn ByteStream>, _, _) = match ep {
        Endpoint::Sim(_, inner) if matches!(*inner, Endpoint::Rdma(_)) => {
            return Err(ConnectError::Unsupported {
                uri: uri.into(),
                reason: "a sim link cannot shape RDMA (one-sided operations bypass it)".into(),
            })
        }
        Endpoint::Sim(spec, inner) => {
            let (raw, _) = raw_stream(uri, *inner, opts)?;
            let (s, link) = sim::SimStream::wrap(raw, spec).map_err(io)?;
            (Box::new(s), None, Some(link))
        }
        other => {
            let (s, one_sided) = raw_stream(uri, other, opts)?;
            (s, one_sided, None)
        }
    };
    let wish = opts.protection.unwrap_or_else(|| Protection::auto(stream.is_same_host()));
    let session = auth::client_handshake(&*stream, &opts.key, wish, deadline)
        .map_err(|source| ConnectError::Handshake { uri: uri.into(), source })?;
    let stream: Box<dyn ByteStream> = match session.protection {
        Protection::None => stream,
        p => Box::new(secure::SecureStream::new(std::sync::Arc::from(stream), p, &session.keys)),
    };
    let conn = Connection::new(stream, session.info, opts.policy, opts.timeout, one_sided);
    Ok((conn.with_protection(session.protection), link))
}

type RawConnection = (Box<dyn ByteStream>, Option<Box<dyn conn::OneSided>>);

fn raw_stream(uri: &str, ep: Endpoint, opts: &ConnectOptions) -> Result<RawConnection, ConnectError> {
    let io = |source| ConnectError::Io { uri: uri.into(), source };
    let timeout = opts.connect_timeout;
    match ep {
        Endpoint::Tcp(addr) => Ok((Box::new(tcp::TcpByteStream::connect(&addr, timeout).map_err(io)?), None)),
        Endpoint::Shm(name) => Ok((Box::new(shm::connect(&name, timeout, &opts.local_peers).map_err(io)?), None)),
        #[cfg(feature = "rdma")]
        Endpoint::Rdma(addr) => {
            let (stream, pages) = rdma::connect(&addr, &opts.key, timeout)?;
            Ok((Box::new(stream), Some(Box::new(pages))))
        }
        #[cfg(not(feature = "rdma"))]
        Endpoint::Rdma(_) => Err(ConnectError::Unsupported { uri: uri.into(), reason: rdma_unsupported() }),
        Endpoint::Sim(..) => {
            Err(ConnectError::Unsupported { uri: uri.into(), reason: "a sim link cannot wrap another".into() })
        }
    }
}

#[cfg(not(feature = "rdma"))]
fn rdma_unsupported() -> String {
    "RDMA is not available in this build (enable the cargo feature `rdma`)".into()
}

/// Starts a server listening at `uri` (`tcp://host:0` picks a free port; see [`Server::uri`]).
pub fn listen(uri: &str, cfg: ServerConfig) -> Result<Server, ListenError> {
    let io = |source| ListenError::Io { uri: uri.into(), source };
    let acceptor: Box<dyn server::Acceptor> = match Endpoint::parse(uri)? {
        Endpoint::Tcp(addr) => Box::new(tcp::TcpAcceptor::bind(&addr).map_err(io)?),
        Endpoint::Shm(name) => Box::new(shm::ShmAcceptor::bind(&name, cfg.local_peers.clone()).map_err(io)?),
        #[cfg(feature = "rdma")]
        Endpoint::Rdma(addr) => Box::new(rdma::RdmaAcceptor::bind(&addr, &cfg).map_err(io)?),
        #[cfg(not(feature = "rdma"))]
        Endpoint::Rdma(_) => return Err(ListenError::Unsupported { uri: uri.into(), reason: rdma_unsupported() }),
        Endpoint::Sim(..) => {
            return Err(ListenError::Unsupported {
                uri: uri.into(),
                reason: "a sim link shapes traffic from the connecting side: listen on the inner URI".into(),
            })
        }
    };
    Server::start(acceptor, cfg).map_err(io)
}
