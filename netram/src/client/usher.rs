//! Memory ushering, the client's side: the pages a server holds when it asks for them to go
//! elsewhere (its node is short of memory: `proto`'s "Leaving") move to the region's other
//! servers while the program runs, and are then freed there.
//!
//! Each page moves while claimed, as the rebuild claims pages: a remote page is held Fetching
//! (a fault on it waits), read from any holder and stored on its slab's servers (which leave the
//! leaving server out); a resident clean page is copied from local memory, held Evicting (its
//! writers wait). The holder mask then names the new servers, and only after that is the old copy
//! freed, so a fault never reads from a copy about to go. Dirty pages move at their eviction (the
//! write-back goes elsewhere and frees the old copy as stale). A page no other server can take
//! stays where it is: ushering never loses one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use mosaic_pager::RegionCore;

use super::config::bump;
use super::Shared;
use crate::pages::PageState::{Clean, Fetching, Remote};
use crate::PAGE_SIZE;

/// Pages moved per batch (one GET batch and one PUT per server).
const USHER_BATCH: usize = 256;

impl Shared {
    /// Moves the pages held by servers asking for them to go elsewhere to servers that take
    /// pages; returns how many moved. Pages busy meanwhile (being fetched, evicted or written)
    /// are left for the next pass.
    pub(super) fn usher(&self, core: &RegionCore, stop: &AtomicBool) -> u64 {
        let leaving_servers = self.servers.leaving_mask();
        if leaving_servers == 0 || self.servers.with_room() == 0 {
            return 0;
        }
        let (mut moved, mut i) = (0, 0);
        let (mut remote, mut resident) = (Vec::new(), Vec::new());
        while i < self.table.len() {
            // Nowhere else to go (the others full, or gone): the pass ends, nothing fetched.
            if stop.load(Ordering::Acquire) || self.servers.with_room() == 0 {
                break;
            }
            // Claims and holder changes inside the gate: a fork or a hand-over never sees a
            // batch half done.
            let _gate = self.fork_gate.enter();
            remote.clear();
            resident.clear();
            while i < self.table.len() && remote.len() + resident.len() < USHER_BATCH {
                if self.table.holders(i) & leaving_servers != 0 {
                    if self.table.cas(i, Remote, Fetching) {
                        remote.push(i);
                    } else if self.table.get(i) == Clean {
                        resident.push(i);
                    }
                }
                i += 1;
            }
            if !remote.is_empty() || !resident.is_empty() {
                let n = self.usher_batch(core, &remote, &resident, leaving_servers);
                if n == 0 {
                    break; // the others took none of them: try again at the next pass
                }
                moved += n;
            }
        }
        if moved > 0 {
            log::info!("region {}: moved {moved} pages off memory servers short of memory", self.name);
        }
        moved
    }

    /// Moves one batch: `remote` pages (claimed Fetching) and `resident` clean ones.
    fn usher_batch(&self, core: &RegionCore, remote: &[u64], resident: &[u64], leaving_servers: u32) -> u64 {
        let (fetched, arrived) = self.fetch_claimed(remote);
        let mut data: Vec<(u64, &[u8; PAGE_SIZE])> = Vec::with_capacity(remote.len() + resident.len());
        // A page no holder returns stays as it is: a fault on it reports what failed.
        data.extend(remote.iter().zip(&fetched).zip(arrived).filter(|(_, ok)| *ok).map(|((&i, p), _)| (i, &p.0)));
        // (Discarded pages, zeros now, are set Dirty: they move at their eviction.)
        let copies = self.copy_clean(core, resident, u32::MAX);
        data.extend(copies.iter().map(|(i, c)| (*i, &**c)));
        let masks = self.servers.put(&data);
        let mut stale: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut moved = 0;
        for ((i, _), mask) in data.iter().zip(masks) {
            if mask == 0 {
                continue; // nowhere else to go: it stays
            }
            // The copies now: the new ones, and the old ones on servers that stay. A move that
            // leaves as many copies on leaving servers as before (a leaving server as the last
            // resort, the same or another) is no move: the copies are kept, none freed, so a
            // page never bounces between two leaving servers.
            let old = self.table.holders(*i);
            let new = (old & !leaving_servers) | mask;
            if (new & leaving_servers).count_ones() >= (old & leaving_servers).count_ones() {
                self.table.set_holders(*i, old | mask);
                continue;
            }
            self.table.set_holders(*i, new);
            let gone = old & leaving_servers & !mask;
            if gone != 0 {
                stale.entry(gone).or_default().push(*i);
            }
            moved += 1;
        }
        for &i in remote {
            self.table.set(i, Remote);
        }
        for (i, _) in &copies {
            self.table.set(*i, Clean);
        }
        // Freed once the table names the new copies: a fault from now on reads those.
        self.servers.free_stale(stale);
        bump(&self.stats.ushered, moved);
        moved
    }
}
