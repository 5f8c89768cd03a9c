//! The memory server behind the transport's real frame loop: Call frames (and garbage between
//! them) from a peer past the handshake, after an OPEN of client 0, reach the store through the
//! same decoding a connection uses. Nothing panics, the store never holds more than its
//! capacity, and once the connection is gone every client it opened is detached.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mosaic_netram::{proto, MemStore};
use mosaic_transport::{Caller, Service, ServiceError};

/// The store, shared so the target can look at it after the connection ends.
struct Shared(Arc<MemStore>);

impl Service for Shared {
    fn call(&self, caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let r = self.0.call(caller, method, request, response);
        assert!(self.0.stats().used_pages <= 16, "over capacity");
        r
    }
    fn disconnected(&self, caller: &Caller) {
        self.0.disconnected(caller);
    }
}

fuzz_target!(|data: &[u8]| {
    let store = Arc::new(MemStore::new(16));
    let open = (proto::OPEN, proto::encode_open(&[0; 16], 1000, &[1; 32]));
    mosaic_transport::fuzzing::service_frames(Shared(store.clone()), &[open], data);
    let st = store.stats();
    assert_eq!(st.clients, st.detached_clients, "a closed connection leaves no client attached: {st:?}");
});
