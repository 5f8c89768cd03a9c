//! The network-RAM client's failover, session-loss and rebuild paths: writes, reads, killed
//! and restarted servers and budget changes; every read returns what was last written.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mosaic_netram::fuzzing::failover(data));
