//! Header decoding: never panics; whatever decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mosaic_transport::wire::{Header, DEFAULT_MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode_slice(data, DEFAULT_MAX_FRAME) {
        assert_eq!(&h.encode()[..], &data[..32]);
    }
});
