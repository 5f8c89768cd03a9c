//! The RDMA set-up exchange (queue pair address and page window) from a hostile peer.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mosaic_transport::fuzzing::rdma_setup(data));
