//! The shm ring with a peer that writes its counters and bytes at will.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mosaic_transport::fuzzing::shm_ring(data));
