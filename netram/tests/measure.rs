#![allow(missing_docs, clippy::cast_possible_truncation, clippy::cast_precision_loss)]
//! Measurements, not checks (`#[ignore]`d): the remote fault path beside its parts.
//! `cargo test --release -p mosaic-netram --test measure -- --ignored --nocapture`

use std::time::Instant;

use mosaic_netram::{MemServer, MemServerConfig, NetRam, NetRamConfig, PAGE_SIZE};
use mosaic_transport::ClusterKey;

fn pct(mut v: Vec<u64>) -> String {
    v.sort_unstable();
    let n = v.len();
    format!(
        "min {:.2} median {:.2} p90 {:.2} us ({n})",
        v[0] as f64 / 1e3,
        v[n / 2] as f64 / 1e3,
        v[n * 9 / 10] as f64 / 1e3
    )
}

#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn remote_fault_latency() {
    let key = ClusterKey::from_bytes(b"measure-cluster-key").unwrap();
    for uri in ["tcp://127.0.0.1:0", "shm://measure-fault"] {
        let server = MemServer::start(uri, MemServerConfig::new(256 << 20, key.clone())).unwrap();
        let mut cfg = NetRamConfig::new(vec![server.uri().to_string()], key.clone(), 64 << 20, 1 << 20);
        cfg.prefetch = false;
        let ram = NetRam::new(cfg).unwrap();
        let pages = ram.len() / PAGE_SIZE;
        for p in 0..pages {
            // SAFETY: inside the region.
            unsafe { *ram.as_ptr().add(p * PAGE_SIZE) = 1 };
        }
        ram.set_resident_budget(64 * 4096).unwrap();
        while ram.stats().resident > 64 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        ram.set_resident_budget(128 << 20).unwrap();
        let mut lat = Vec::new();
        for p in (0..pages).step_by(3) {
            let t = Instant::now();
            // SAFETY: inside the region.
            let b = unsafe { std::ptr::read_volatile(ram.as_ptr().add(p * PAGE_SIZE)) };
            lat.push(t.elapsed().as_nanos() as u64);
            assert_eq!(b, 1);
        }
        println!("{uri}: remote fault {}", pct(lat));
    }
}
