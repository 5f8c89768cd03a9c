//! The record layer opening sealed records followed by hostile bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mosaic_transport::fuzzing::records(data));
