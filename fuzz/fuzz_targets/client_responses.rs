//! The client's receive path fed by a hostile server.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mosaic_transport::fuzzing::client_responses(data));
