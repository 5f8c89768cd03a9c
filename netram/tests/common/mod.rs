//! Helpers shared by the network-RAM integration tests.
#![allow(dead_code, clippy::cast_possible_truncation)]

use std::time::{Duration, Instant};

use mosaic_netram::{MemServer, MemServerConfig, NetRam};
use mosaic_transport::ClusterKey;

/// A mebibyte.
pub const MIB: u64 = 1 << 20;

/// The tests' cluster key.
pub fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"netram-test-cluster-key").unwrap()
}

/// `n` memory servers of `capacity` bytes each, on loopback.
pub fn servers(n: usize, capacity: u64) -> Vec<MemServer> {
    (0..n).map(|_| MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(capacity, key())).unwrap()).collect()
}

/// Their URIs.
pub fn uris(s: &[MemServer]) -> Vec<String> {
    s.iter().map(|m| m.uri().to_string()).collect()
}

/// The region as words.
#[allow(clippy::mut_from_ref)] // the region is raw memory shared like any mmap
pub fn words(ram: &NetRam) -> &mut [u64] {
    // SAFETY: the region is mapped for ram.len() bytes while `ram` lives; tests use it like any
    // other memory.
    unsafe { std::slice::from_raw_parts_mut(ram.as_ptr().cast::<u64>(), ram.len() / 8) }
}

/// The value word `i` holds after write round `round`.
pub fn value(i: usize, round: u64) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round
}

/// Polls `cond` every 5 ms; fails the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
