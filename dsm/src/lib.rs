//! Mosaic's distributed shared memory: threads on several nodes share one address space, and a
//! pointer means the same bytes everywhere.
//!
//! What exists so far is the heart of it, written sans-IO (after quinn-proto: no networking, no
//! clock, no memory mapping), so that it can be checked exhaustively:
//!
//! - [`protocol`]: the coherence protocol for sequentially consistent pages. Page-grain single
//!   writer / many readers, write-invalidate, with a home-based directory after Ivy's fixed
//!   distributed manager: every page has a home node that serialises the requests for it. A
//!   [`Node`] takes local faults and peers' messages and returns [`Action`]s (send this message,
//!   install the page that arrived, write-protect, drop) for an I/O layer to carry out.
//! - [`model`]: an explicit-state model checker that runs the same [`Node`] code for a few nodes
//!   and pages through every interleaving of their operations and messages, checking at every
//!   state that at most one node may write a page, that every readable copy holds the latest
//!   write, and that every request is answered (no deadlock, nothing left in flight).
//!
//! - [`job`]: a node of a job of processes: [`Job::join`] maps the shared region at the same
//!   address on every node, meets the other nodes, and keeps the region coherent (faults through
//!   the pager, messages over the transport); barriers, locks, global atomics
//!   ([`Job::fetch_add`], [`Job::compare_exchange`]), collective allocation ([`Job::alloc`]) and
//!   allocation from a node's own arena ([`Job::alloc_local`]). `mosrun -n N` starts a job on
//!   this host; so do `mpirun` and `srun` ([`launch`]).
//! - [`rendezvous`]: where the nodes find each other: a directory, a node agent (`mosaicd`), or
//!   a server (for jobs across hosts, which `mosrun --hosts` starts).
//! - [`alloc`]: the allocator behind both kinds of allocation.
//! - [`order`]: each peer's messages back in the order sent, once each (in the nodes and in the
//!   model checker, which loses, delays and repeats messages).
//! - [`wire`]: the messages' encoding.
//!
//! ```no_run
//! use std::sync::atomic::{AtomicU64, Ordering};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Rank, size, rendezvous and key from the environment `mosrun -n` sets.
//! let job = mosaic_dsm::Job::join(mosaic_dsm::JobConfig::from_env(1 << 20)?)?;
//! // SAFETY: the region's first 8 bytes, aligned, used only atomically by every node.
//! let counter = unsafe { &*job.as_ptr().cast::<AtomicU64>() };
//! counter.fetch_add(1, Ordering::SeqCst); // atomic across nodes
//! job.barrier()?;
//! assert_eq!(counter.load(Ordering::SeqCst), u64::from(job.size()));
//! job.leave()?;
//! # Ok(())
//! # }
//! ```
//!
//! With memory servers and a budget ([`JobConfig::budget`]), the pages a node owns beyond its
//! budget live on network RAM (see `job`'s `spill` module).
//!
//! Not built yet (issue 12 of the tracker): speed.

pub mod alloc;
pub mod job;
pub mod launch;
pub mod model;
pub mod order;
pub mod protocol;
pub mod rendezvous;
pub mod wire;

pub use alloc::AllocError;
pub use job::{Job, JobConfig, JobStats, JoinError};
pub use protocol::{Access, Action, Homes, Msg, Node, NodeId, PageNo, Want};
pub use rendezvous::{JobBooks, Rendezvous, RendezvousServer};
