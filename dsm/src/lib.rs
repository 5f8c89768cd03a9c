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
//! Not built yet (issue 12 of the tracker): the I/O layer over the pager and the transport, the
//! job start (`mosrun -n`, MPI and Slurm environments), the global allocator, locks, barriers and
//! atomics, the C ABI and the benchmarks.

pub mod job;
pub mod model;
pub mod protocol;
pub mod wire;

pub use job::{Job, JobConfig, JobStats, JoinError};
pub use protocol::{Access, Action, Msg, Node, NodeId, PageNo, Want};
