//! The memory server's request decoding and handling: any sequence of requests (method id, then
//! body) against one store never panics, never stores more than its capacity, and every GET that
//! succeeds returns exactly one page.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mosaic_netram::{proto, MemStore};
use mosaic_transport::Service;

fuzz_target!(|data: &[u8]| {
    let store = MemStore::new(8);
    // Open the session most requests name, so the fuzzer reaches past the session check.
    let mut out = Vec::new();
    let _ = store.call(proto::OPEN, &proto::encode_open(&[0; 16], 1000), &mut out);
    let mut rest = data;
    while rest.len() >= 3 {
        let method = u64::from(rest[0] % 9);
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        out.clear();
        let r = store.call(method, body, &mut out);
        if method == proto::GET && r.is_ok() {
            assert_eq!(out.len(), mosaic_netram::PAGE_SIZE);
        }
        assert!(store.stats().used_pages <= 8);
    }
});
