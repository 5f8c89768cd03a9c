//! The agent's memory ushering: once a second it asks [`policy::ushering`] about what the
//! information layer knows (this node's free memory and pressure, the others' room), and while
//! the answer is yes, its memory server asks its clients to move their pages elsewhere (the
//! memory-server protocol's "leaving" flag): each network-RAM region holding pages here moves
//! them to its other servers while its program runs, and the freed memory goes back to the
//! system.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mosaic_netram::MemServer;

use crate::gossip::Gossiper;
use crate::policy::{self, UsherParams};

/// How often the decision is taken.
const EVERY: Duration = Duration::from_secs(1);

/// Runs until `stop`, then lets clients place pages on `memory` again.
pub(crate) fn run(g: &Gossiper, memory: &MemServer, p: &UsherParams, stop: &AtomicBool) {
    let mut on = false;
    while !stop.load(Ordering::Acquire) {
        let view = g.view();
        let next = policy::ushering(on, &view.own, &view.window, p);
        match (&next, on) {
            (Some(u), false) => log::warn!(
                "short of memory ({} MiB free of {} MiB): asking the memory server's clients to move \
                 their pages elsewhere ({} MiB wanted; {} has the most room)",
                view.own.free_memory >> 20,
                view.own.total_memory >> 20,
                u.bytes >> 20,
                u.to
            ),
            (None, true) => {
                log::warn!(
                    "memory back ({} MiB free): the memory server takes pages again",
                    view.own.free_memory >> 20
                );
            }
            _ => {}
        }
        on = next.is_some();
        memory.set_leaving(on);
        // The server offers no more than the node can spare above its keep-free mark, so that
        // its own pages never squeeze the node (and set ushering off, back and forth).
        memory.set_room(Some(view.own.free_memory.saturating_sub(policy::keep_free_bytes(&view.own, p))));
        let mut slept = Duration::ZERO;
        while slept < EVERY && !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            slept += Duration::from_millis(50);
        }
    }
    memory.set_leaving(false);
    memory.set_room(None);
}
