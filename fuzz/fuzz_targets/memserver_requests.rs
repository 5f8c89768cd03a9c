//! The memory server's request decoding and handling: any sequence of requests (method id, then
//! body), from two connections, with connections closing between them, against one store never
//! panics, never stores more than its capacity, every GET that succeeds returns exactly one page,
//! and a connection never reads a page of a client it did not open.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mosaic_netram::{proto, MemStore, PAGE_SIZE};
use mosaic_transport::{Caller, Service};

fuzz_target!(|data: &[u8]| {
    let store = MemStore::new(8);
    let callers = [Caller { id: 1, peer: "a".into() }, Caller { id: 2, peer: "b".into() }];
    // Connection 1 opens the session most requests name, so the fuzzer reaches past the check;
    // connection 2 opens another client with another secret.
    let mut out = Vec::new();
    let _ = store.call(&callers[0], proto::OPEN, &proto::encode_open(&[0; 16], 1000, &[1; 32]), &mut out);
    let _ = store.call(&callers[1], proto::OPEN, &proto::encode_open(&[9; 16], 1000, &[2; 32]), &mut out);
    let mut rest = data;
    while rest.len() >= 4 {
        let who = &callers[usize::from(rest[3] & 1)];
        let method = u64::from(rest[0] % 10);
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 4);
        let body = &rest[4..4 + len];
        rest = &rest[4 + len..];
        if method == 9 {
            store.disconnected(who);
            continue;
        }
        out.clear();
        let r = store.call(who, method, body, &mut out);
        if method == proto::GET && r.is_ok() {
            assert_eq!(out.len(), PAGE_SIZE);
            // Client 0 was opened (with its secret) by connection 1 only; connection 2 can only
            // reach it with client 0's secret, [1; 32].
            if who.id == 2 && body.len() >= 16 && body[..16] == [0; 16] {
                assert!(
                    data.windows(32).any(|w| w == [1u8; 32]),
                    "connection 2 read client 0's page without its secret"
                );
            }
        }
        assert!(store.stats().used_pages <= 8);
    }
});
