//! Mosaic's network RAM: process memory paged on demand from idle RAM on other nodes.
//!
//! - [`MemServer`] donates RAM: it stores clients' pages by (client, region, page), serves
//!   GET/PUT/FREE over any Mosaic transport, refuses with `Status::Full` when full, and reclaims
//!   a client's pages when its lease runs out. `mosaic-memserver` runs one.
//! - [`NetRam`] is a region of any size backed by one or more servers: pages come in on first
//!   touch (served on the faulting thread), at most a resident budget of them stay local, dirty
//!   ones are written back to every copy's server before they are dropped, and each slab of
//!   pages is placed on servers by power of two choices over their free memory.
//! - [`PageStore`] keeps pages on the servers for a layer that maps them itself (DSM nodes spill
//!   the pages they own there when over their budget).
//!
//! # Losing a server
//! With two or more copies (the default where two servers exist), reads fail over to another
//! copy and the lost copies are rebuilt in the background. With one copy, the pages on a dead
//! server are lost: touching one raises SIGBUS and the log names the page. Never zeros.
//!
//! # Example
//! ```no_run
//! use mosaic_netram::{MemServer, MemServerConfig, NetRam, NetRamConfig};
//! use mosaic_transport::ClusterKey;
//!
//! let key = ClusterKey::from_bytes(b"an example cluster key").unwrap();
//! let a = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(256 << 20, key.clone())).unwrap();
//! let b = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(256 << 20, key.clone())).unwrap();
//! let servers = vec![a.uri().to_string(), b.uri().to_string()];
//! // 64 MiB of memory, at most 8 MiB of it in local RAM, two copies of every page.
//! let ram = NetRam::new(NetRamConfig::new(servers, key, 64 << 20, 8 << 20)).unwrap();
//! let words = ram.len() / 8;
//! // SAFETY: the region is mapped for `ram.len()` bytes while `ram` lives.
//! let data = unsafe { std::slice::from_raw_parts_mut(ram.as_ptr().cast::<u64>(), words) };
//! for (i, w) in data.iter_mut().enumerate() {
//!     *w = i as u64;
//! }
//! assert!(data.iter().enumerate().all(|(i, w)| *w == i as u64));
//! ```

mod budget;
mod client;
mod error;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod pages;
mod prefetch;
pub mod proto;
mod server;
mod servers;
mod size;
mod store;

pub use budget::SharedBudget;
pub use client::{
    ForkTicket, HandOver, HandOverError, NetRam, NetRamConfig, NetRamStats, HAND_OVER_GRACE, MIN_BUDGET_PAGES,
};
pub use error::{ConfigError, NetRamError, PageError, ServerError};
pub use server::{MemServer, MemServerConfig, MemStore, StoreStats, MAX_CAPACITY_PAGES};
pub use size::parse_size;
pub use store::{PageStore, StoreError};

/// Size of a page.
pub const PAGE_SIZE: usize = mosaic_transport::PAGE_SIZE;

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
