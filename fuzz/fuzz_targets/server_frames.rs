//! The server's frame loop fed by a hostile, authenticated client.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mosaic_transport::fuzzing::server_frames(data));
