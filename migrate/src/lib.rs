//! Mosaic's migration: memory moves to another process (on this host or another) post-copy.
//!
//! What exists so far is region post-copy ([`Outgoing`], [`Incoming`]), the first part of issue
//! 13: a range of private anonymous memory is frozen in one process and mapped at the same
//! address in another, which runs on at once; its pages follow on demand. In the order things
//! happen:
//!
//! 1. **Freeze** ([`Outgoing::freeze`]): the range is taken over by a userfaultfd region of the
//!    source's (the mapping stays as it is), and nothing more: the cost does not grow with the
//!    size. Which pages exist is learned a chunk of [`CHUNK`] pages at a time, when first needed:
//!    the chunk is write-protected, then scanned with `PAGEMAP_SCAN`, so none of its pages can
//!    change or appear afterwards. A touch of a page that was never there fails (SIGBUS). Stop
//!    the threads writing the range before freezing.
//! 2. **Descriptor** (`DESCRIBE`): the destination learns the address and the size, maps the
//!    range at the same address and commits ([`Incoming::connect`]); from then on it runs.
//! 3. **Post-copy**: a fault at the destination fetches its page (`FETCH`), learning its chunk's
//!    present pages on the way (the other pages of the chunk that were never there are zeros,
//!    installed without asking and never sent); meanwhile a background thread pulls the rest
//!    (`NEXT`) in batches, from the page after the latest fault on (what the program touched last
//!    suggests what it touches next), with every chunk's present pages. Each page is sent once: a
//!    fault on a page already on its way waits for it. The source frees each page as it hands it
//!    to the transport (a connection lost after the commit loses the region: there is no
//!    reconnecting yet), and goes once the destination says it has everything (`DONE`).
//!
//! Pages in swap at the source count as present (they hold data); a page the destination
//! discards after it arrived reads zeros again, as Linux has it.
//!
//! The destination *commits* (`COMMIT`) as soon as the region is mapped there: before that the
//! source can take the region back ([`Outgoing::thaw`]), so a destination that dies early costs
//! nothing; after it the region lives at the destination only, and if the source dies there, a
//! touch of a page that had not arrived yet raises SIGBUS (the page named in the log), never
//! zeros.
//!
//! Every exchange goes over one authenticated transport connection (any of Mosaic's transports).
//!
//! A region backed by network RAM migrates differently ([`NetRamOutgoing`], [`take_over_netram`]):
//! its dirty pages are written back to the memory servers, which keep a copy-on-write clone of its
//! pages for the destination, and only its table crosses; a source that dies afterwards loses
//! nothing. Whole processes move with [`process`].

mod dest;
mod netram;
pub mod process;
mod source;
mod wire;

pub use dest::{Incoming, IncomingStats};
pub use netram::{
    take_over_netram, take_over_netram_over, NetRamIncomingStats, NetRamOutgoing, NetRamOutgoingStats, COMMIT_NETRAM,
    DESCRIBE_NETRAM,
};
pub use source::{Outgoing, OutgoingStats};
pub use wire::{Descriptor, CHUNK};

/// Maps `len` bytes of private anonymous memory at exactly `addr` (page-aligned), failing rather
/// than replacing anything mapped there: a region to fill, then migrate with
/// [`Outgoing::freeze`] (the destination maps it at the same address).
pub fn map_anonymous_at(addr: usize, len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh private anonymous mapping; MAP_FIXED_NOREPLACE fails instead of touching
    // whatever may be mapped at `addr`.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    if p as usize != addr {
        // An old kernel that ignores MAP_FIXED_NOREPLACE placed it elsewhere: give it back.
        // SAFETY: the mapping just made, used by nothing.
        unsafe { libc::munmap(p, len) };
        return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(p.cast())
}

/// Why a migration step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The range given cannot be migrated.
    #[error("{0}")]
    Range(String),
    /// The pager refused (userfaultfd, the mapping).
    #[error("pager")]
    Pager(#[from] mosaic_pager::PagerError),
    /// The source cannot listen.
    #[error("cannot listen")]
    Listen(#[from] mosaic_transport::ListenError),
    /// The other side cannot be reached.
    #[error("cannot connect")]
    Connect(#[from] mosaic_transport::ConnectError),
    /// A request failed.
    #[error("the other side")]
    Call(#[from] mosaic_transport::CallError),
    /// The other side sent what the protocol does not allow.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Waiting for the migration to finish took too long.
    #[error("not finished within {0:?}")]
    TimedOut(std::time::Duration),
    /// The process cannot migrate (nothing was stopped, or it runs on where it was).
    #[error("cannot migrate: {0}")]
    Refused(String),
    /// A system call or `/proc` read failed.
    #[error("{0}")]
    Os(String),
    /// Rebuilding the process at the destination failed.
    #[error("restore: {0}")]
    Restore(String),
    /// Network RAM refused (handing the region over, or taking it over).
    #[error("network RAM")]
    NetRam(#[from] mosaic_netram::NetRamError),
    /// The source went away before every page had come.
    #[error("the source is lost: {0}")]
    SourceLost(String),
}
