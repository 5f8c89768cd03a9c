//! A region backed by network RAM migrates by handing over its table: its pages stay on the
//! memory servers, and none of them crosses the migration link.
//!
//! ```text
//!  source       NetRamOutgoing::hand_over: the region writes back its dirty pages and has the
//!               servers move its session to a new name and secret for the taker
//!               (NetRam::hand_over), then serves the description on a transport server
//!  destination  take_over_netram: DESCRIBE_NETRAM -> attach to the session, map the region at
//!               the same address -> COMMIT_NETRAM: it runs here from now on
//!  source       finish: once committed, the region ends here (the pages are the
//!               destination's); thaw instead if nobody committed (the session comes back)
//! ```
//! Failure: a destination that dies before its commit leaves the region to the source
//! ([`NetRamOutgoing::thaw`] takes the session back, so a destination that attached anyway
//! finds its pages gone rather than diverging); a source that dies after the hand-over loses
//! nothing, since every page is on the servers under the session the destination holds. A commit
//! whose answer is lost (the source died just then, or the link broke) keeps the region at the
//! destination: the source either committed, or, alive, can thaw and so end the destination's
//! copy; the region is never dropped on both sides. See `mosaic_netram`'s "Losing a server" for
//! the servers' own failures.
//!
//! Messages, over one authenticated transport connection:
//!
//! ```text
//! DESCRIBE_NETRAM  offset u64 (or nothing: 0) -> total length u64 | the encoded HandOver's
//!                     bytes from offset, at most 256 KiB (address, size, servers, the
//!                     session's new name and secret, every page's state as runs, the slabs' placement)
//! COMMIT_NETRAM    (the destination attached and mapped the region: it runs there from now on)
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mosaic_netram::{HandOver, NetRam};
use mosaic_transport::{
    connect, listen, Caller, ClusterKey, ConnectOptions, Connection, Server, ServerConfig, Service, ServiceError,
    Status,
};

use crate::source::lock;
use crate::MigrateError;

/// The transport method of the hand-over's description.
pub const DESCRIBE_NETRAM: u64 = 0x4d49_4711;
/// The transport method by which the destination takes the region over.
pub const COMMIT_NETRAM: u64 = 0x4d49_4712;
/// Most bytes of the description one `DESCRIBE_NETRAM` answer carries (a large region's comes in
/// parts, each within the transport's frame).
const DESCRIPTION_PART: usize = 256 << 10;
/// The largest description a destination accepts (a region of scattered pages as large as the
/// address space stays well below it).
const DESCRIPTION_MAX: u64 = 1 << 30;

/// What a network-RAM region's migration cost at the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRamOutgoingStats {
    /// Time from the start of the hand-over to the description being ready (writing back the
    /// dirty pages, cloning the session).
    pub hand_over_us: u64,
    /// Dirty pages written back to the memory servers by the hand-over.
    pub written_back_pages: u64,
    /// Pages with data on the servers (what the destination can read; none crossed the link).
    pub remote_pages: u64,
    /// Bytes sent to the destination over the migration link (the description).
    pub bytes_sent: u64,
}

#[derive(Default)]
struct State {
    /// The connection that asked for the description: the only one that may commit (another
    /// is refused, so two processes never attach to the same pages).
    describer: Option<u64>,
    committed: bool,
    thawing: bool,
}

struct Out {
    description: Vec<u8>,
    state: Mutex<State>,
    committed: Condvar,
    bytes_sent: AtomicU64,
}

struct Serve(Arc<Out>);

impl Service for Serve {
    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let s = &self.0;
        let mut state = lock(&s.state);
        match method {
            DESCRIBE_NETRAM => {
                if state.thawing {
                    return Err(ServiceError::new(Status::Forbidden, "the source took the region back"));
                }
                if state.describer.is_some_and(|d| d != caller.id) {
                    return Err(ServiceError::new(Status::Forbidden, "another destination is taking the region over"));
                }
                let from = match request.len() {
                    0 => 0,
                    8 => u64::from_le_bytes(request.try_into().unwrap_or_default()),
                    n => return Err(ServiceError::new(Status::BadRequest, format!("a request of {n} bytes"))),
                };
                let d = &s.description;
                let from = usize::try_from(from).unwrap_or(usize::MAX).min(d.len());
                let part = &d[from..d.len().min(from + DESCRIPTION_PART)];
                response.extend_from_slice(&(d.len() as u64).to_le_bytes());
                response.extend_from_slice(part);
                s.bytes_sent.fetch_add(8 + part.len() as u64, Ordering::Relaxed);
                state.describer = Some(caller.id);
            }
            COMMIT_NETRAM => {
                if state.describer != Some(caller.id) {
                    return Err(ServiceError::new(Status::Forbidden, "a commit without the description"));
                }
                if state.thawing {
                    return Err(ServiceError::new(Status::Forbidden, "the source took the region back"));
                }
                state.committed = true;
                s.committed.notify_all();
            }
            m => {
                return Err(ServiceError::new(
                    Status::BadRequest,
                    format!("method {m:#x} is not a network-RAM hand-over's"),
                ))
            }
        }
        Ok(())
    }
}

/// A network-RAM region handed over here and offered to one destination.
pub struct NetRamOutgoing {
    out: Arc<Out>,
    server: Option<Server>,
    ram: Option<NetRam>,
    /// What was handed over (to take the session back if the region comes back).
    handed: HandOver,
    stats: NetRamOutgoingStats,
}

impl std::fmt::Debug for NetRamOutgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetRamOutgoing").field("uri", &self.uri()).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl NetRamOutgoing {
    /// Hands `ram` over ([`NetRam::hand_over`]: stop the threads using it first) and offers it
    /// on `listen_uri` (a transport URI, e.g. `tcp://127.0.0.1:0`) to whoever holds `key`. On
    /// error the region is given back, working here, with the reason.
    pub fn hand_over(
        ram: NetRam,
        listen_uri: &str,
        key: ClusterKey,
    ) -> Result<NetRamOutgoing, Box<(NetRam, MigrateError)>> {
        match NetRamOutgoing::start(&ram, listen_uri, key) {
            Ok(mut out) => {
                out.give(ram);
                Ok(out)
            }
            Err(e) => Err(Box::new((ram, e))),
        }
    }

    /// The part of [`hand_over`](Self::hand_over) that can fail, for a caller that gives the
    /// region up only once it succeeded: hands `ram` over and offers it, then
    /// [`give`](Self::give) it (before a destination can commit, nothing depends on it; until
    /// it is given, [`thaw`](Self::thaw) has nothing to give back). On error the region works
    /// on here.
    pub fn start(ram: &NetRam, listen_uri: &str, key: ClusterKey) -> Result<NetRamOutgoing, MigrateError> {
        let start = Instant::now();
        let h = ram.hand_over()?;
        let out = Arc::new(Out {
            description: h.encode(),
            state: Mutex::new(State::default()),
            committed: Condvar::new(),
            bytes_sent: AtomicU64::new(0),
        });
        let stats = NetRamOutgoingStats {
            hand_over_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
            written_back_pages: h.written_back(),
            remote_pages: h.remote_pages(),
            bytes_sent: 0,
        };
        match listen(listen_uri, ServerConfig::new(key).service(Serve(out.clone()))) {
            Ok(server) => Ok(NetRamOutgoing { out, server: Some(server), ram: None, handed: h, stats }),
            Err(e) => {
                ram.resume_after_hand_over(&h);
                Err(e.into())
            }
        }
    }

    /// Gives the region [`start`](Self::start) handed over: it ends here once a destination
    /// took it over ([`finish`](Self::finish)).
    pub fn give(&mut self, ram: NetRam) {
        self.ram = Some(ram);
    }

    /// Where the destination connects.
    pub fn uri(&self) -> &str {
        self.server.as_ref().map_or("", Server::uri)
    }

    /// What the migration cost so far.
    pub fn stats(&self) -> NetRamOutgoingStats {
        NetRamOutgoingStats { bytes_sent: self.out.bytes_sent.load(Ordering::Relaxed), ..self.stats }
    }

    /// Whether a destination took the region over.
    pub fn committed(&self) -> bool {
        lock(&self.out.state).committed
    }

    /// Waits (at most `timeout`) until a destination took the region over, then ends it here:
    /// its pages are the destination's (the session it holds on the servers). On
    /// time-out nothing changes: [`thaw`](Self::thaw) gives the region back.
    pub fn finish(&mut self, timeout: Duration) -> Result<NetRamOutgoingStats, MigrateError> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.out.state);
        while !state.committed {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                return Err(MigrateError::TimedOut(timeout));
            };
            state = self.out.committed.wait_timeout(state, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        drop(state);
        let stats = self.stats();
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        self.ram.take();
        Ok(stats)
    }

    /// Gives the region back to this process if no destination took it over: it works on here
    /// (its pages come back on touch). An error, and nothing changed, if a destination
    /// committed: the region runs there now.
    pub fn thaw(mut self) -> Result<NetRam, MigrateError> {
        self.try_thaw()
    }

    /// As [`thaw`](Self::thaw), without giving up `self` when it fails (a destination
    /// committed): the caller can still [`finish`](Self::finish). Once it succeeded, `self` holds
    /// nothing more.
    pub fn try_thaw(&mut self) -> Result<NetRam, MigrateError> {
        {
            let mut state = lock(&self.out.state);
            if state.committed {
                return Err(MigrateError::Range("the destination took the region over: it cannot thaw here".into()));
            }
            state.thawing = true; // from now on a commit is refused
        }
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        let ram = self.ram.take().ok_or_else(|| MigrateError::Range("the region is gone".into()))?;
        // A destination that attached but never committed (or never heard its commit refused)
        // finds the pages gone, never a copy that diverges from this one.
        ram.resume_after_hand_over(&self.handed);
        Ok(ram)
    }
}

impl Drop for NetRamOutgoing {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
    }
}

/// What a destination learned when taking a network-RAM region over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRamIncomingStats {
    /// Time from connecting to the source to the region being usable here.
    pub take_over_us: u64,
    /// Bytes received over the migration link (the description).
    pub bytes_received: u64,
    /// Pages with data on the servers.
    pub remote_pages: u64,
    /// Whether the source answered the commit. False: the link broke (or the source died)
    /// after the commit was sent; the region was kept here, since the source cannot know
    /// whether it arrived and dropping it could lose the only copy. If the source is alive
    /// and takes the region back, this copy's pages go (SIGBUS on touch), never diverge.
    pub commit_confirmed: bool,
}

/// Takes over the network-RAM region offered at `uri` (a [`NetRamOutgoing`]) with `key`: maps it
/// at its address here, attached to the servers' copy of its pages, with at most
/// `resident_budget` bytes in local RAM (other settings: [`take_over_netram_over`]), and
/// commits (after which the source cannot thaw it). When this returns the region is usable; its
/// pages come from the memory servers on touch.
pub fn take_over_netram(
    uri: &str,
    key: ClusterKey,
    resident_budget: u64,
) -> Result<(NetRam, NetRamIncomingStats), MigrateError> {
    let conn = connect(uri, &ConnectOptions::new(key.clone()))?;
    take_over_netram_over(&conn, |h| h.config(key, resident_budget))
}

/// As [`take_over_netram`], over a connection made by the caller (a simulated link, other
/// options), with the region's settings here from `config` (given the hand-over; start from
/// [`HandOver::config`]).
pub fn take_over_netram_over(
    conn: &Connection,
    config: impl FnOnce(&HandOver) -> mosaic_netram::NetRamConfig,
) -> Result<(NetRam, NetRamIncomingStats), MigrateError> {
    let start = Instant::now();
    let description = describe(conn)?;
    let h = HandOver::decode(&description).map_err(|e| MigrateError::Protocol(e.to_string()))?;
    let ram = NetRam::take_over(&h, config(&h))?;
    // Attached and mapped: commit. A refusal (the source took the region back) lets go of it
    // here, leaving the session to the source. Any other failure leaves it unknown whether the
    // commit arrived: the region stays (see `commit_confirmed`).
    let commit_confirmed = match conn.call(COMMIT_NETRAM, &[]) {
        Ok(_) => true,
        Err(e) if e.status().is_some() => {
            // Refused: the source takes the session back; ending it here would lose the pages.
            ram.give_back();
            return Err(e.into());
        }
        Err(e) => {
            log::warn!(
                "network-RAM region at {:#x}: the commit's answer was lost ({}); keeping the region here",
                h.addr(),
                mosaic_transport::error_chain(&e)
            );
            false
        }
    };
    let stats = NetRamIncomingStats {
        take_over_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        bytes_received: description.len() as u64,
        remote_pages: h.remote_pages(),
        commit_confirmed,
    };
    Ok((ram, stats))
}

/// Reads the whole description, part after part.
fn describe(conn: &Connection) -> Result<Vec<u8>, MigrateError> {
    let mut d = Vec::new();
    loop {
        let r = conn.call(DESCRIBE_NETRAM, &(d.len() as u64).to_le_bytes())?;
        let (total, part) =
            r.split_at_checked(8).ok_or_else(|| MigrateError::Protocol("a description part of no length".into()))?;
        let total = u64::from_le_bytes(total.try_into().unwrap_or_default());
        if total > DESCRIPTION_MAX || total < (d.len() + part.len()) as u64 {
            return Err(MigrateError::Protocol(format!(
                "a description of {total} bytes, {} received",
                d.len() + part.len()
            )));
        }
        d.extend_from_slice(part);
        if d.len() as u64 == total {
            return Ok(d);
        }
        if part.is_empty() {
            return Err(MigrateError::Protocol(format!("the description stopped at {} of {total} bytes", d.len())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_larger_than_a_part_arrives_whole_and_only_its_reader_commits() {
        let key = ClusterKey::from_bytes(b"netram-migrate-unit-test-key").unwrap();
        let description: Vec<u8> =
            (0..DESCRIPTION_PART * 2 + 1234).map(|i| u8::try_from(i * 7 % 251).unwrap_or(0)).collect();
        let out = Arc::new(Out {
            description: description.clone(),
            state: Mutex::new(State::default()),
            committed: Condvar::new(),
            bytes_sent: AtomicU64::new(0),
        });
        let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key.clone()).service(Serve(out.clone()))).unwrap();
        let conn = connect(server.uri(), &ConnectOptions::new(key.clone())).unwrap();
        assert!(conn.call(COMMIT_NETRAM, &[]).is_err(), "a commit before the description");
        assert!(conn.call(DESCRIBE_NETRAM, &[1, 2, 3]).is_err(), "a malformed offset");
        assert_eq!(describe(&conn).unwrap(), description);
        assert_eq!(out.bytes_sent.load(Ordering::Relaxed), description.len() as u64 + 3 * 8);
        // A second destination neither gets the description nor commits.
        let other = connect(server.uri(), &ConnectOptions::new(key)).unwrap();
        assert!(other.call(DESCRIBE_NETRAM, &[]).is_err());
        assert!(other.call(COMMIT_NETRAM, &[]).is_err());
        conn.call(COMMIT_NETRAM, &[]).unwrap();
        assert!(lock(&out.state).committed);
        server.shutdown();
    }
}
