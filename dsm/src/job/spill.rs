//! Network RAM behind a node's part of the region: when more pages are mapped here than the
//! node's budget, the evictor makes room. A read-only copy of another node's page is dropped
//! through the protocol ([`Node::evict`]: its owner still has it). A page this node owns goes to
//! the memory servers ([`PageStore`]) and is unmapped, the protocol none the wiser: the node still
//! owns it, and answers for it from the servers (a peer's request reads it back), and a local
//! access maps it again from there. So the coherence protocol and its model check are unchanged;
//! where an owner keeps its bytes is the I/O layer's business.
//!
//! An owned page leaves in three steps, the node's lock held for the first and the last:
//!
//! ```text
//!  pick       write-protect it (a write now faults), copy it, mark it `evicting`
//!  [store the copies on the servers, lock released]
//!  drop       still `evicting`: unmapped, `spilled`; else it changed meanwhile and stays
//! ```
//!
//! Anything that may change a page's bytes or mapping (a write fault, an install, an upgrade, a
//! drop) clears its `evicting` mark, so a write made while the copy travels is never lost. A page
//! mapped back from the servers stays write-protected and counts as `clean` (its stored copy is
//! current) until written: evicting it again stores nothing, as long as a server holding that
//! copy is alive. Copies that went stale (written, dropped, or stored while the page changed) are
//! freed on the servers by the evictor, never under the node's lock. The evictor stops before
//! the node leaves (nothing may be sent after the last barrier).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Condvar;
use std::time::{Duration, Instant};

use mosaic_netram::PageStore;
use mosaic_page::Page;

use super::{lock, Local, Shared, WAKE};
use crate::protocol::{Access, PageNo};

/// Pages over the budget a fault may map before it waits for the evictor.
const SLACK: u64 = 32;
/// Most pages one eviction round takes.
const ROUND: usize = 64;

/// Where the pages a node owns go when over its budget.
pub(super) struct Spill {
    pub(super) store: PageStore,
    /// Pages the node may keep mapped.
    pub(super) budget: u64,
    /// Signalled (with the node's lock) when the evictor has work, or made room.
    pub(super) work: Condvar,
    /// Held by the evictor through each round; [`Shared::stop_evictor`] takes it to wait for
    /// the round under way.
    round: std::sync::Mutex<()>,
    /// The node is leaving: no round starts any more.
    stopped: std::sync::atomic::AtomicBool,
    /// The evictor could not store pages lately: faults do not wait for room it cannot make.
    pub(super) stuck_until: std::sync::Mutex<Option<Instant>>,
    pub(super) stored: AtomicU64,
    pub(super) fetched: AtomicU64,
    pub(super) dropped_copies: AtomicU64,
}

/// What the node's lock guards of the spilling (part of [`Local`]).
#[derive(Default)]
pub(super) struct SpillState {
    /// Pages this node owns whose bytes are on the servers, not mapped.
    pub(super) spilled: HashSet<PageNo>,
    /// Mapped pages whose stored copy is current (mapped back and not written since).
    pub(super) clean: HashSet<PageNo>,
    /// Pages whose copy is on its way to the servers.
    pub(super) evicting: HashSet<PageNo>,
    /// Mapped pages, oldest first (may hold pages unmapped since, or twice: skipped).
    pub(super) order: VecDeque<PageNo>,
    /// Pages whose stored copy went stale: to be freed on the servers.
    pub(super) stale: Vec<PageNo>,
}

impl SpillState {
    /// `page` may change (written, installed, dropped): its stored copy, if any, is stale and an
    /// eviction under way must not drop it.
    pub(super) fn changing(&mut self, page: PageNo) {
        if self.clean.remove(&page) {
            self.stale.push(page);
        }
        self.evicting.remove(&page);
    }
}

impl Spill {
    pub(super) fn new(store: PageStore, budget: u64) -> Spill {
        Spill {
            store,
            budget,
            work: Condvar::new(),
            round: std::sync::Mutex::new(()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            stuck_until: std::sync::Mutex::new(None),
            stored: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            dropped_copies: AtomicU64::new(0),
        }
    }
}

impl Shared {
    /// Records that `page` is mapped now (the evictor's order), waking the evictor if over the
    /// budget.
    pub(super) fn note_mapped(&self, local: &mut Local, page: PageNo) {
        let Some(spill) = &self.spill else { return };
        let order = &mut local.spill.order;
        order.push_back(page);
        if order.len() > 2 * local.mapped.len() + 64 {
            // Mostly pages unmapped since, or queued twice: keep each mapped page once.
            let mut seen = HashSet::new();
            let mapped = &local.mapped;
            order.retain(|p| mapped.contains(p) && seen.insert(*p));
        }
        if local.mapped.len() as u64 > spill.budget {
            spill.work.notify_all();
        }
    }

    /// Stops the evictor before the node leaves: no round starts after this, and the one under
    /// way (if any) is over when it returns.
    pub(super) fn stop_evictor(&self) {
        if let Some(spill) = &self.spill {
            spill.stopped.store(true, Ordering::Release);
            spill.work.notify_all();
            drop(lock(&spill.round));
        }
    }

    /// The bytes of a page this node owns that are on the servers.
    pub(super) fn fetch_spilled(&self, page: PageNo) -> Result<Box<Page>, String> {
        let spill = self.spill.as_ref().ok_or(format!("page {page} is spilled, but no servers are used"))?;
        let mut p = Page::boxed();
        spill.store.fetch(page, &mut p).map_err(|e| format!("page {page} is lost: {e}"))?;
        spill.fetched.fetch_add(1, Ordering::Relaxed);
        Ok(p)
    }

    /// Maps `page` back from the servers (this node owns it, and its access allows `want_write`
    /// if set): writable if the access that faulted is a write, else write-protected and clean.
    pub(super) fn unspill(&self, local: &mut Local, page: PageNo, write: bool) -> Result<(), String> {
        let bytes = self.fetch_spilled(page)?;
        let core = self.core()?;
        core.install(page, std::slice::from_ref(&*bytes)).map_err(|e| format!("page {page}: {e}"))?;
        local.spill.spilled.remove(&page);
        local.mapped.insert(page);
        if write && local.node.access(page) == Access::Write {
            core.write_protect(page, 1, false).map_err(|e| format!("page {page}: {e}"))?;
        } else {
            local.spill.clean.insert(page);
        }
        local.changes += 1;
        self.note_mapped(local, page);
        Ok(())
    }

    /// A page that leaves this node, or comes anew (dropped or installed by the protocol): its
    /// stored copy, if any, is not this node's to answer for any more (freed by the evictor).
    pub(super) fn forget_stored(&self, local: &mut Local, page: PageNo) {
        if self.spill.is_none() {
            return;
        }
        local.spill.changing(page);
        local.spill.spilled.remove(&page);
        local.spill.stale.push(page);
    }

    /// Waits (a little at a time, at most until `deadline`) while the node maps more than its
    /// budget allows and the evictor can make room. Called with no lock held.
    pub(super) fn wait_for_room(&self, deadline: Instant) {
        let Some(spill) = &self.spill else { return };
        let mut local = lock(&self.local);
        while local.mapped.len() as u64 >= spill.budget + SLACK
            && Instant::now() < deadline
            && !self.stop.load(Ordering::Acquire)
            && !spill.stopped.load(Ordering::Acquire)
            && self.broken().is_none()
        {
            if lock(&spill.stuck_until).is_some_and(|t| Instant::now() < t) {
                return; // the servers are full or down: over the budget rather than stuck
            }
            spill.work.notify_all();
            local = spill.work.wait_timeout(local, WAKE).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    /// The evictor: keeps the mapped pages within the budget until the node stops.
    pub(super) fn run_evictor(&self) {
        let Some(spill) = &self.spill else { return };
        let low = spill.budget - spill.budget / 16;
        let stopped = || self.stop.load(Ordering::Acquire) || spill.stopped.load(Ordering::Acquire);
        let mut pause = false;
        loop {
            {
                let mut local = lock(&self.local);
                while (pause || local.mapped.len() as u64 <= spill.budget) && local.spill.stale.is_empty() && !stopped()
                {
                    local = spill.work.wait_timeout(local, WAKE).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                    pause = false;
                }
            }
            let _round = lock(&spill.round);
            if stopped() {
                return;
            }
            self.free_stale(spill);
            pause = false;
            while !stopped() {
                let over = lock(&self.local).mapped.len() as u64;
                if over <= low {
                    break;
                }
                let want = usize::try_from(over - low).unwrap_or(ROUND).min(ROUND);
                match self.evict_round(spill, want) {
                    Ok(0) => {
                        // Nothing can go now (every page busy): faults need not wait for it.
                        *lock(&spill.stuck_until) = Some(Instant::now() + WAKE);
                        pause = true;
                        break;
                    }
                    Ok(_) => *lock(&spill.stuck_until) = None,
                    Err(e) => {
                        log::warn!("dsm node {}: cannot make room: {e}; over the budget until it can", self.rank);
                        *lock(&spill.stuck_until) = Some(Instant::now() + Duration::from_secs(1));
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
                spill.work.notify_all();
            }
        }
    }

    /// Frees the stale copies on the servers (the lock released meanwhile).
    fn free_stale(&self, spill: &Spill) {
        let stale = std::mem::take(&mut lock(&self.local).spill.stale);
        if !stale.is_empty() {
            spill.store.forget(&stale);
        }
    }

    /// One round: up to `want` pages leave. Returns how many did.
    fn evict_round(&self, spill: &Spill, want: usize) -> Result<usize, String> {
        let core = self.core()?;
        let mut copies: Vec<(PageNo, Box<Page>)> = Vec::new();
        let mut gone = 0;
        // The homes are told of the copies dropped (`Dropped`) when the lock is released.
        let _tell = Flush(self);
        {
            let mut local = lock(&self.local);
            let mut looked = 0;
            let len = local.spill.order.len();
            while copies.len() + gone < want && looked < len {
                looked += 1;
                let Some(page) = local.spill.order.pop_front() else { break };
                if !local.mapped.contains(&page) {
                    continue; // unmapped since (a stale entry)
                }
                if local.node.is_pending(page) || local.spill.evicting.contains(&page) {
                    local.spill.order.push_back(page);
                    continue;
                }
                if !local.node.owns(page) {
                    // A copy of another node's page: drop it, telling the home.
                    match local.node.evict(page) {
                        Ok(actions) => {
                            self.execute(&mut local, actions);
                            spill.dropped_copies.fetch_add(1, Ordering::Relaxed);
                            gone += 1;
                        }
                        Err(_) => local.spill.order.push_back(page),
                    }
                    continue;
                }
                if local.spill.clean.contains(&page) && spill.store.readable(page) {
                    // Its stored copy is current, on a live server: nothing to store.
                    core.drop_pages(page, 1).map_err(|e| format!("page {page}: {e}"))?;
                    local.mapped.remove(&page);
                    local.spill.clean.remove(&page);
                    local.spill.spilled.insert(page);
                    local.changes += 1;
                    gone += 1;
                    continue;
                }
                local.spill.clean.remove(&page);
                if local.node.access(page) == Access::Write {
                    if let Err(e) = core.write_protect(page, 1, true) {
                        local.spill.order.push_back(page);
                        return Err(format!("page {page}: {e}"));
                    }
                }
                match self.read_page(&local, page) {
                    Ok(bytes) => copies.push((page, bytes)),
                    Err(e) => {
                        local.spill.order.push_back(page);
                        Self::keep(&mut local, &copies);
                        return Err(e);
                    }
                }
                // Picked to be stored anew: a free of its old copy still queued would free the
                // new one.
                local.spill.stale.retain(|p| *p != page);
                local.spill.evicting.insert(page);
            }
        }
        if copies.is_empty() {
            return Ok(gone);
        }
        let batch: Vec<(u64, &Page)> = copies.iter().map(|(p, b)| (*p, &**b)).collect();
        let stored = spill.store.store(&batch);
        let mut local = lock(&self.local);
        if let Err(e) = stored {
            Self::keep(&mut local, &copies);
            return Err(e.to_string());
        }
        spill.stored.fetch_add(copies.len() as u64, Ordering::Relaxed);
        for (k, (page, _)) in copies.iter().enumerate() {
            let page = *page;
            if local.spill.evicting.remove(&page) && local.mapped.contains(&page) {
                if let Err(e) = core.drop_pages(page, 1) {
                    Self::keep(&mut local, &copies[k..]);
                    return Err(format!("page {page}: {e}"));
                }
                local.mapped.remove(&page);
                local.spill.spilled.insert(page);
                local.changes += 1;
                gone += 1;
            } else {
                // Written, dropped or installed anew meanwhile: the copy just stored is stale.
                local.spill.stale.push(page);
                if local.mapped.contains(&page) {
                    local.spill.order.push_back(page);
                }
            }
        }
        Ok(gone)
    }

    /// Pages picked for a round that stay mapped after all (the round failed): no longer
    /// `evicting`, back in the evictor's order.
    fn keep(local: &mut Local, copies: &[(PageNo, Box<Page>)]) {
        for (page, _) in copies {
            local.spill.evicting.remove(page);
            // Whatever was stored of it (a store can fail for some pages only) is not tracked.
            local.spill.stale.push(*page);
            if local.mapped.contains(page) {
                local.spill.order.push_back(*page);
            }
        }
    }
}

/// Sends the node's waiting messages when dropped (after the lock taken meanwhile is released).
struct Flush<'a>(&'a Shared);

impl Drop for Flush<'_> {
    fn drop(&mut self) {
        self.0.flush();
    }
}
