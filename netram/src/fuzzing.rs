//! Entry point for the client fuzz target (built only with `--cfg fuzzing`): a region on three
//! loopback servers, two copies of every page, driven by a script of writes, reads, server
//! kills, server restarts (a fresh server on the same address: the session is gone) and budget
//! changes. Every read must return what was last written; a lost page (SIGBUS) or a hang is a
//! finding.

use std::time::{Duration, Instant};

use mosaic_transport::ClusterKey;

use crate::{MemServer, MemServerConfig, NetRam, NetRamConfig, PAGE_SIZE};

/// Pages of the region.
const PAGES: usize = 256;

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"fuzzing-netram-cluster-key").expect("long enough")
}

fn start(uri: &str) -> Option<MemServer> {
    MemServer::start(uri, MemServerConfig::new(8 << 20, key())).ok()
}

/// Waits (bounded) until every page has its copies again, so a next kill cannot take the last.
fn settle(ram: &NetRam) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ram.stats().under_replicated > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the script in `data` (two bytes an operation).
pub fn failover(data: &[u8]) {
    let mut servers: Vec<Option<MemServer>> = (0..3).map(|_| start("tcp://127.0.0.1:0")).collect();
    if servers.iter().any(Option::is_none) {
        return; // the machine is out of ports or threads: nothing to learn
    }
    let uris: Vec<String> = servers.iter().flatten().map(|s| s.uri().to_string()).collect();
    let mut cfg = NetRamConfig::new(uris.clone(), key(), (PAGES * PAGE_SIZE) as u64, 64 * PAGE_SIZE as u64);
    cfg.grace = Duration::from_secs(5);
    let Ok(ram) = NetRam::new(cfg) else { return };
    let base = ram.as_ptr().cast::<u64>();
    let mut model = vec![0u64; PAGES];
    let mut dead = None;
    for (n, op) in data.chunks_exact(2).take(64).enumerate() {
        let page = usize::from(op[1]) % PAGES;
        // SAFETY: `page` is inside the region, mapped while `ram` lives; word 0 of each page.
        let word = unsafe { base.add(page * PAGE_SIZE / 8) };
        match op[0] % 6 {
            0 | 1 => {
                let v = (n as u64 + 1) << 8 | u64::from(op[1]);
                // SAFETY: as above.
                unsafe { word.write_volatile(v) };
                model[page] = v;
            }
            2 => {
                // SAFETY: as above.
                let got = unsafe { word.read_volatile() };
                assert_eq!(got, model[page], "page {page} read back wrong");
            }
            3 if dead.is_none() => {
                settle(&ram);
                let i = usize::from(op[1]) % 3;
                if let Some(s) = servers[i].take() {
                    s.shutdown();
                }
                dead = Some(i);
            }
            4 => {
                // A fresh server where the dead one was: it knows nothing of the session.
                if let Some(i) = dead.take() {
                    servers[i] = start(&uris[i]);
                    if servers[i].is_none() {
                        dead = Some(i); // the port was taken meanwhile: stays dead
                    }
                }
            }
            _ => {
                let pages = 64 + u64::from(op[1]);
                let _ = ram.set_resident_budget(pages * PAGE_SIZE as u64);
            }
        }
    }
    // Everything reads back, after the last failover settles.
    settle(&ram);
    for (page, want) in model.iter().enumerate() {
        // SAFETY: as above.
        let got = unsafe { base.add(page * PAGE_SIZE / 8).read_volatile() };
        assert_eq!(got, *want, "page {page} read back wrong at the end");
    }
}
