//! Mosaic's pager: bytes into an address space, on demand, with `userfaultfd`.
//!
//! A [`Region`] reserves a range of address space (optionally at a fixed address) and registers
//! it with a userfaultfd for missing-page faults (and write-protect tracking). The first touch of
//! each page asks the region's [`PageSource`] for its contents, which the pager installs
//! atomically (`UFFDIO_COPY`, or the zero page) before the faulting thread continues. The layer
//! above (network RAM, DSM, migration) decides where pages come from; the pager only moves them
//! into and out of the address space:
//!
//! - install ([`RegionCore::install`], batches, the zero page), for prefetch or push;
//! - drop ([`RegionCore::drop_pages`]): the next touch faults again;
//! - write-protect, poison ([`RegionCore::poison`]: a touch raises SIGBUS), and
//! - dirty tracking ([`RegionCore::take_written`]): which pages were written since the last call,
//!   found by `PAGEMAP_SCAN` with the kernel resolving write-protect faults itself
//!   (`UFFD_FEATURE_WP_ASYNC`), so a write never waits for user space.
//!
//! # Who serves a fault
//! [`FaultMode::Workers`]: handler threads read fault messages and install pages; the faulting
//! thread sleeps in the kernel. Works for every access, including a system call (`read(2)` into a
//! region buffer) that touches a missing page. Costs a thread hop per fault.
//!
//! [`FaultMode::FaultingThread`]: `UFFD_FEATURE_SIGBUS` makes the fault a SIGBUS in the faulting
//! thread, whose handler fetches and installs the page itself and returns, so the access is
//! retried: no thread hop, no cross-core wake-up (30-70 us on the 2-vCPU VMs this was built on).
//! Two costs: the [`PageSource`] runs inside a signal handler (it must not take a lock the
//! interrupted code may hold, see [`PageSource`]), and a *system call* that touches a missing page
//! fails with `EFAULT` instead of faulting, so buffers handed to the kernel must be touched (or
//! [`RegionCore::prefault`]ed) first.
//!
//! # Failing closed
//! When the source cannot produce a page (its server died, no replica is left), the page is
//! poisoned (`UFFDIO_POISON`) and the access raises SIGBUS, with the page and the reason logged.
//! The pager never turns a failed fetch into a zero page.
//!
//! # fork, mremap, munmap
//! - fork: the region is `MADV_DONTFORK`: a child process does not inherit it (touching its
//!   addresses in the child is a segmentation fault), because a child's copy could not be served.
//!   A layer that can serve the child (network RAM clones its pages on the servers) turns
//!   inheritance on around the fork ([`RegionCore::inherit_on_fork`]); the child adopts the
//!   mapping with a region of its own ([`RegionConfig::adopt`], [`present_pages`]) and lets go of
//!   the parent's ([`Region::forget_after_fork`]).
//! - mremap of the whole region: followed (faults are served at the new address). mremap of part
//!   of it: the region is marked broken and faults in the moved part are refused (poisoned).
//! - munmap by the application: the unmapped pages are forgotten and never unmapped again by the
//!   region (the addresses may have been reused).
//! - `MADV_DONTNEED` by the application: reported to the source ([`PageSource::discarded`]).
//!
//! # What a source can do with a page
//! The interface speaks of pages, not of where they come from. Network RAM uses it as a cache
//! of remote pages; DSM, the second client, keeps coherent copies with it:
//!
//! | DSM needs | the pager gives |
//! |---|---|
//! | a read fault gets a read-only copy | [`PageSource::fill`] without [`Fault::install_writable`], under [`DirtyTracking::Faults`]: installed write-protected |
//! | a write fault gets the writable page | [`Fault::write`] set, or [`Fault::install_writable`]: installed writable |
//! | a write to a read-only copy asks for ownership first | [`PageSource::written`]: the write waits until it returns [`WriteDecision::Proceed`] (or retries as a missing-page fault after [`WriteDecision::Retry`]) |
//! | invalidate a copy (another node writes) | [`RegionCore::drop_pages`]: the next touch faults again |
//! | downgrade (another node reads the page we own) | [`RegionCore::write_protect`], then read the page where it is mapped |
//! | hand over a page (the owner moves) | read it, then [`RegionCore::drop_pages`]; install a pushed page with [`RegionCore::install`] |
//! | know what the fault decided when the page is in | the [`Token`] returned in [`Filled`], back in [`PageSource::installed`] |
//!
//! # Kernel requirements
//! Userfaultfd (`/dev/userfaultfd` or the system call) with `EVENT_REMAP` and `EVENT_UNMAP`;
//! `EVENT_REMOVE` to report discards; write-protect faults for [`DirtyTracking::Faults`]
//! (Linux 5.7), `WP_ASYNC` and `PAGEMAP_SCAN` for [`DirtyTracking::Scan`] (6.7); `SIGBUS` for
//! [`FaultMode::FaultingThread`]. Used where present: `POISON` (6.6; without it a lost page's
//! faulting thread is sent SIGBUS directly), `MOVE` (6.8; without it moves become copies).
//! [`Region::new`] checks them and names what is missing ([`PagerError::Unsupported`]).
//! `MOSAIC_PAGER_DISABLE_FEATURES=POISON,MOVE` leaves features unused, to run an older kernel's
//! paths on a newer one.

use std::ops::Range;

mod config;
mod foreign;
mod install;
mod mapping;
mod pagemap;
mod region;
mod region_core;
mod report;
mod signal;
mod uffd;
mod worker;

pub use config::{DirtyTracking, FaultMode, PagerStats, RegionConfig};
pub use foreign::{Event, ForeignUffd, Installed};
pub use mapping::{populated_pages, present_pages, private_pages_of, unmap_inherited};
pub use region::Region;
pub use region_core::RegionCore;

pub use signal::{interposed_sigaction, interposed_signal, program_sigaction, sigbus_claimed};
pub use uffd::feature;

pub use mosaic_page::{Page, PAGE_SIZE};

/// What a [`PageSource`] decided about a page in [`fill`](PageSource::fill), handed back to
/// it in [`installed`](PageSource::installed) once the pager knows what became of the page:
/// opaque to the pager. Network RAM carries the state the page takes once in; DSM would carry
/// the access it was granted (a read-only copy, or the owner's writable one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Token(pub u64);

/// What a [`PageSource`] put in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filled {
    /// The buffer holds the page.
    Data(Token),
    /// The page is all zeros (installs the shared zero page; the buffer is ignored).
    Zero(Token),
    /// The page is owned by work of the source's own (it is being fetched or saved elsewhere)
    /// and the fault should be served later. Meant for faults with [`Fault::can_defer`]: a fault
    /// worker then keeps the fault aside, serves the others, and asks again, instead of blocking
    /// while that work may itself need the worker (an evictor copying a page the application
    /// just discarded faults, and only a worker can serve that fault). Returned for a fault that
    /// cannot be deferred, the pager pauses briefly and asks again.
    Busy,
    /// The page is already in place: the source installed it itself (with
    /// [`RegionCore::install`], under whatever lock keeps its own state and the mapping in step)
    /// or found it there. The pager installs nothing and wakes the faulting thread;
    /// [`PageSource::installed`] is not called. A source whose pages can be dropped by another
    /// thread at any time (DSM invalidating a copy) needs this: an install by the pager after
    /// `fill` returned could land after such a drop and map a page the source no longer holds.
    Present,
}

/// What a [`PageSource`] says of a first write to a write-protected page (see
/// [`PageSource::written`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteDecision {
    /// Let the write proceed now: the pager makes the page writable, unless the source already
    /// did with [`Fault::unprotect`].
    Proceed,
    /// Not yet: the source is saving the page; ask again later (as [`Filled::Busy`]).
    Busy,
    /// The page is no longer the one that faulted (the source dropped it meanwhile): change
    /// nothing and let the access retry, which faults again as a missing page.
    Retry,
}

/// What became of a page a [`PageSource`] filled (see [`PageSource::installed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It is in the region now.
    Installed,
    /// The page was already present (another thread's fault or install got there first); the
    /// filled data was not used.
    AlreadyPresent,
    /// The source failed or installing failed: the page is poisoned (touching it raises SIGBUS).
    Lost,
}

/// How a fault is being asked about: whether it can be deferred, and for how long it has been.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Retry {
    pub(crate) can_defer: bool,
    pub(crate) waited: std::time::Duration,
}

/// Why a [`PageSource`] could not produce a page: the source's own error, kept whole (a caller
/// can downcast [`FillError::cause`]). The pager poisons the page and logs this with its causes.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct FillError(Box<dyn std::error::Error + Send + Sync>);

impl FillError {
    /// Wraps the source's error.
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> FillError {
        FillError(cause.into())
    }

    /// The source's error.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

/// One missing-page fault, as a [`PageSource`] sees it.
#[derive(Debug)]
pub struct Fault<'a> {
    /// The page's index in the region.
    pub index: u64,
    /// The access was a write (where the hardware tells; false when unknown).
    pub write: bool,
    /// The region, to install further pages (prefetch) while serving this one.
    pub region: &'a RegionCore,
    /// Whether the pager can serve this fault later if the source answers [`Filled::Busy`]
    /// (or [`WriteDecision::Busy`]): true for faults read by fault workers, where a source that
    /// blocks also blocks every fault queued behind this one on the same worker; false on the
    /// faulting thread, where blocking in the source stops only the thread that faulted.
    pub can_defer: bool,
    /// How long this fault has been deferred so far (zero on the first ask): a source that
    /// gives up on a page owned too long by its own work says so with an error.
    pub waited: std::time::Duration,
    /// Set by the source ([`Fault::install_writable`]).
    writable: std::cell::Cell<bool>,
    /// Whether resolving the fault wakes the faulting thread (fault workers) or not (the
    /// faulting thread serves its own fault).
    wake: bool,
    /// Set by [`Fault::unprotect`].
    unprotected: std::cell::Cell<bool>,
}

impl<'a> Fault<'a> {
    pub(crate) fn new(index: u64, write: bool, region: &'a RegionCore, retry: Retry, wake: bool) -> Fault<'a> {
        Fault {
            index,
            write,
            region,
            can_defer: retry.can_defer,
            waited: retry.waited,
            writable: std::cell::Cell::new(write),
            wake,
            unprotected: std::cell::Cell::new(false),
        }
    }

    /// In [`PageSource::written`]: makes the page writable now, while the source still holds
    /// it in whatever state keeps its own saving of the page out (and wakes the writer, in
    /// fault-worker modes); the pager then leaves the protection alone. A source that saves
    /// pages by write-protecting them and copying them out must do this before it lets the
    /// page be saved again: the pager's own unprotect comes after `written` returns, and could
    /// land after the source had protected the page anew to save it, letting a write slip past
    /// the copy it saves.
    pub fn unprotect(&self) -> Result<(), PagerError> {
        let addr = self.region.base() + self.index * PAGE_SIZE as u64;
        self.unprotected.set(true);
        self.region.unprotect_page(addr, !self.wake).map_err(|err| PagerError::Os { op: "UFFDIO_WRITEPROTECT", err })
    }

    pub(crate) fn unprotected(&self) -> bool {
        self.unprotected.get()
    }

    /// With [`DirtyTracking::Faults`]: install this page writable even though the access was a
    /// read, because the source already counts it as written (for example when it predicts a
    /// read-modify-write and wants to spare the second, write-protect fault). Without this, a read
    /// fault installs the page write-protected.
    pub fn install_writable(&self) {
        self.writable.set(true);
    }

    pub(crate) fn writable(&self) -> bool {
        self.writable.get()
    }
}

/// Where a region's pages come from.
///
/// # In a signal handler
/// With [`FaultMode::FaultingThread`], [`fill`](PageSource::fill) runs inside the SIGBUS handler
/// of the thread that touched the page. It may block, allocate and use the transport, with one
/// rule: it must not take a lock that the faulting code could be holding at the time of the
/// touch. Touches of region memory from inside the source itself, or from a signal handler that
/// interrupted `malloc`, would deadlock.
pub trait PageSource: Send + Sync + 'static {
    /// Produces page `fault.index` into `page`.
    fn fill(&self, fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError>;

    /// After a [`fill`](PageSource::fill) that produced the page ([`Filled::Data`] or
    /// [`Filled::Zero`]): what became of page `index`, with the token that fill returned, on
    /// the same thread, once the install is done (on the faulting thread, before its access
    /// resumes; on a fault worker, just after the faulting thread was woken). A source that
    /// tracks residency updates it here, once the page really is in the region. Not called
    /// after a fill that returned an error, [`Filled::Busy`] or [`Filled::Present`].
    fn installed(&self, index: u64, token: Token, outcome: Outcome) {
        let _ = (index, token, outcome);
    }

    /// With [`DirtyTracking::Faults`]: page `fault.index`, installed write-protected, is about
    /// to be written for the first time since. The write proceeds when this returns
    /// [`WriteDecision::Proceed`], so a source that is saving the page elsewhere can make the
    /// writer wait: by blocking here where the fault cannot be deferred, or by answering
    /// [`WriteDecision::Busy`] where it can ([`Fault::can_defer`]). A source that saves pages by
    /// write-protecting them again makes the page writable itself ([`Fault::unprotect`]) before
    /// it marks the page as written. (A fault whose first access is a write does not come here:
    /// [`Fault::write`] tells the source, and the page is installed writable.)
    fn written(&self, fault: &Fault<'_>) -> WriteDecision {
        let _ = fault;
        WriteDecision::Proceed
    }

    /// The application discarded these pages (`MADV_DONTNEED`): by Linux semantics their next
    /// touch must read zeros. The default does nothing (the next touch fetches the source's copy).
    fn discarded(&self, pages: Range<u64>) {
        let _ = pages;
    }
}

/// A shared source: the region holds one reference, the caller keeps another.
impl<T: PageSource + ?Sized> PageSource for std::sync::Arc<T> {
    fn fill(&self, fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError> {
        (**self).fill(fault, page)
    }
    fn installed(&self, index: u64, token: Token, outcome: Outcome) {
        (**self).installed(index, token, outcome);
    }
    fn written(&self, fault: &Fault<'_>) -> WriteDecision {
        (**self).written(fault)
    }
    fn discarded(&self, pages: Range<u64>) {
        (**self).discarded(pages);
    }
}

/// Why a pager operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PagerError {
    /// No userfaultfd could be opened.
    #[error(
        "cannot open a userfaultfd: {0} (needs read/write access to /dev/userfaultfd, or \
         CAP_SYS_PTRACE, or sysctl vm.unprivileged_userfaultfd=1)"
    )]
    NoUserfaultfd(#[source] std::io::Error),
    /// The kernel lacks features this configuration needs.
    #[error("this kernel's userfaultfd lacks {missing:?} (needed for {needed_for}); Linux 6.7 or later has them all")]
    Unsupported {
        /// The missing feature names.
        missing: Vec<&'static str>,
        /// What needed them.
        needed_for: &'static str,
    },
    /// A configuration that cannot work.
    #[error("invalid region configuration: {0}")]
    Config(#[from] ConfigError),
    /// A system call failed.
    #[error("{op} failed: {err}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The kernel's error.
        #[source]
        err: std::io::Error,
    },
    /// A page index outside the region.
    #[error("pages {first}..{end} are outside the region of {pages} pages")]
    OutOfRange {
        /// First page asked for.
        first: u64,
        /// One past the last page asked for.
        end: u64,
        /// Pages in the region.
        pages: u64,
    },
    /// An install of bytes that are not whole, page-aligned pages.
    #[error("an install needs page-aligned whole pages, got {len} bytes at {addr:#x}")]
    Misaligned {
        /// Bytes given.
        len: usize,
        /// Where they were.
        addr: usize,
    },
    /// An operation that needs a kind of dirty tracking the region was not made with.
    #[error("{op} needs a region with {needs}")]
    NoDirtyTracking {
        /// The operation.
        op: &'static str,
        /// The tracking it needs.
        needs: &'static str,
    },
    /// The region was unmapped or remapped under the pager, or the process is exiting.
    #[error("region {region} is no longer registered")]
    Gone {
        /// The region's name.
        region: String,
    },
    /// The SIGBUS handler could not be installed.
    #[error("cannot install the SIGBUS handler")]
    Signal(#[source] std::io::Error),
    /// The page source panicked while producing a page.
    #[error("the page source panicked")]
    SourcePanicked,
}

/// A region configuration that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A region of no pages.
    #[error("a region needs at least one page")]
    NoPages,
    /// More pages than the address space holds.
    #[error("{pages} pages exceed the address space")]
    TooLarge {
        /// Pages asked for.
        pages: u64,
    },
    /// A fixed or adopted address that is not a non-zero page boundary.
    #[error("address {addr:#x} is not a non-zero page boundary")]
    BadAddress {
        /// The address.
        addr: usize,
    },
    /// Both a fixed address and an adopted mapping.
    #[error("a region is either mapped at a fixed address or adopted")]
    FixedAndAdopted,
    /// `FaultMode::Workers(0)`.
    #[error("FaultMode::Workers needs at least one thread")]
    NoWorkers,
    /// The fixed address is taken.
    #[error("address {addr:#x} is already in use")]
    AddressInUse {
        /// The address.
        addr: usize,
    },
    /// The kernel would not map at the fixed address.
    #[error("could not map at {addr:#x}")]
    NotMappedAt {
        /// The address.
        addr: usize,
    },
    /// Too many regions serving faults on the faulting thread.
    #[error("at most {max} regions can serve faults on the faulting thread at once; use FaultMode::Workers")]
    TooManyFaultingThreadRegions {
        /// The most.
        max: usize,
    },
}
