//! The LD_PRELOAD shim's page heap under any sequence of allocations, frees, `munmap`s of any
//! part of a block and in-place `mremap` growth, against a page-by-page model.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mosaic_preload::heap::model;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = model::check(&model::ops_from_bytes(data)) {
        panic!("{why}");
    }
});
