//! Why network-RAM operations fail: one typed error per kind of failure, with the transport's
//! or the system's error kept as the source (so a caller can still ask "wrong key?").

use std::path::PathBuf;
use std::time::Duration;

use mosaic_pager::PagerError;
use mosaic_transport::{CallError, ConnectError, ListenError};

use crate::proto::ProtoError;
use crate::PAGE_SIZE;

/// Why a network-RAM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetRamError {
    /// A configuration that cannot work.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A memory server could not be reached, or refused the session.
    #[error("memory server {uri} is unreachable")]
    Unreachable {
        /// The server.
        uri: String,
        /// What failed.
        #[source]
        source: ServerError,
    },
    /// A memory server could not listen.
    #[error("cannot listen on {uri}")]
    Listen {
        /// Where.
        uri: String,
        /// What failed.
        #[source]
        source: ListenError,
    },
    /// A background thread could not be started.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// No random numbers (for the client's identity and secrets).
    #[error("no random source")]
    Random(#[source] getrandom::Error),
    /// The backing file could not be opened or sized.
    #[error("backing file {}", path.display())]
    BackingFile {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The budget shared with other processes could not be made or mapped.
    #[error("shared budget: {op} failed")]
    SharedBudget {
        /// What was being done.
        op: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A descriptor said to hold a shared budget does not.
    #[error("shared budget: descriptor {fd} is not a budget page")]
    NotABudget {
        /// The descriptor.
        fd: i32,
    },
    /// The region's background work did not pause for a fork in time.
    #[error("the region's background work did not pause within {waited:?} for the fork")]
    ForkPause {
        /// How long it was given.
        waited: Duration,
    },
    /// The region could not be handed over to another process.
    #[error("hand-over: {0}")]
    HandOver(#[from] crate::client::HandOverError),
    /// The pager refused the region.
    #[error(transparent)]
    Pager(#[from] PagerError),
}

impl NetRamError {
    /// True if a server refused the connection because it holds another cluster key.
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, NetRamError::Unreachable { source: ServerError::Connect(e), .. } if e.is_wrong_key())
    }
}

/// What went wrong with one memory server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// It could not be connected to (unreachable, or the handshake failed: a wrong key...).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A request to it failed (the connection broke, or it timed out).
    #[error(transparent)]
    Call(#[from] CallError),
    /// Its answer did not parse.
    #[error(transparent)]
    Answer(#[from] ProtoError),
}

/// A configuration that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No memory servers.
    #[error("no memory servers given")]
    NoServers,
    /// More servers than a region can use.
    #[error("at most {max} servers per region, got {got}")]
    TooManyServers {
        /// The most a region can use.
        max: usize,
        /// How many were given.
        got: usize,
    },
    /// More copies than servers (or none).
    #[error("{copies} copies of each page need at least {copies} servers (and at least one copy), got {servers}")]
    Copies {
        /// Copies asked for.
        copies: usize,
        /// Servers given.
        servers: usize,
    },
    /// A region of no bytes.
    #[error("a region needs a size of at least one byte")]
    EmptyRegion,
    /// A budget below the least a region can work in.
    #[error("a resident budget of {bytes} bytes is below the minimum of {min_pages} pages")]
    BudgetTooSmall {
        /// The budget given.
        bytes: u64,
        /// The least.
        min_pages: u64,
    },
    /// A memory server with no room.
    #[error("a memory server needs at least one page ({PAGE_SIZE} bytes) of capacity, got {bytes} bytes")]
    CapacityTooSmall {
        /// The capacity given.
        bytes: u64,
    },
    /// A fork of a region with a backing file.
    #[error("a region with a backing file cannot follow a fork (the child would share the file)")]
    BackingFileWithFork,
    /// Pages outside the region.
    #[error("pages {first}..+{count} are outside the region of {pages} pages")]
    OutsideRegion {
        /// The first page asked for.
        first: u64,
        /// How many.
        count: u64,
        /// Pages in the region.
        pages: u64,
    },
}

/// Why a page could not be read back. The fault that needed it fails closed: the page is
/// poisoned and the access raises SIGBUS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PageError {
    /// No copy of it was ever kept anywhere that is left.
    #[error("page {page} has no copy on any server")]
    NoCopy {
        /// The page.
        page: u64,
    },
    /// Every server that held a copy is down (and there is no backing file).
    #[error("page {page}: every server that held it is down")]
    HoldersDown {
        /// The page.
        page: u64,
    },
    /// The servers holding it failed to return it.
    #[error("no server could return page {page} (the last asked: {uri})")]
    Unanswered {
        /// The page.
        page: u64,
        /// The last server asked.
        uri: String,
        /// Its failure.
        #[source]
        source: CallError,
    },
    /// No server could return it, and reading the backing file failed too.
    #[error("no server could return page {page}, and the backing file failed")]
    File {
        /// The page.
        page: u64,
        /// The file's error.
        #[source]
        source: std::io::Error,
    },
    /// Another thread owned the page (fetching or evicting it) for too long.
    #[error("page {page} stayed busy for {waited:?} (a fetch or eviction hung)")]
    Hung {
        /// The page.
        page: u64,
        /// How long it was waited for.
        waited: Duration,
    },
    /// It was lost before (its copies went with their servers): it stays lost.
    #[error("page {page} was lost earlier: no copy is left")]
    LostEarlier {
        /// The page.
        page: u64,
    },
}
