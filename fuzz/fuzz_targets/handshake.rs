//! Both sides of the handshake fed by a hostile peer.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mosaic_transport::fuzzing::handshakes(data));
