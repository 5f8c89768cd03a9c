//! Both handshakes against a peer that holds the key, with hostile AEAD payloads.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mosaic_transport::fuzzing::handshakes_past_the_key(data));
