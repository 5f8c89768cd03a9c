//! Eviction: keeping the resident set within the budget. The evictor thread (and faults that
//! help it) take rounds of pages from the resident queue, write back what needs saving, keep
//! copies in the victim cache and drop the pages.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mosaic_pager::RegionCore;

use super::config::bump;
use super::lifecycle::{self, Round};
use super::victims::Copy;
use super::{offset, runs, Shared};
use crate::pages::PageState::{Clean, Dirty, Remote};
use crate::servers::FILE_HOLDER;
use crate::PAGE_SIZE;

/// Copies page `i` of the region.
///
/// # Safety
/// Page `i` must be inside the live region and must not be written during the copy (resident
/// and write-protected).
pub(super) unsafe fn copy_of(core: &RegionCore, i: u64) -> Copy {
    // Not zeroed first: every byte is written below (zeroing cost a memset per evicted page).
    let mut c = Box::<[u8; PAGE_SIZE]>::new_uninit();
    // SAFETY: the caller guarantees the page is mapped, inside the region and stable; the two
    // buffers are PAGE_SIZE bytes each and do not overlap (one is on the heap, one in the
    // region); after the copy every byte of `c` is initialised.
    unsafe {
        std::ptr::copy_nonoverlapping(core.as_ptr().add(offset(i)), c.as_mut_ptr().cast::<u8>(), PAGE_SIZE);
        c.assume_init()
    }
}

/// Pages the evictor takes from its queue per round.
pub(super) const EVICT_BATCH: usize = 64;

/// Dirty pages written back per step of a round (write-protect, copy, store, drop). Clean
/// pages of the round are dropped in one step. Smaller steps let faults through between them:
/// random read-modify-write at 25% resident ran 1.3-2x faster with 16 than with 64 (BENCHMARKS.md,
/// 2026-12-02), while scans, which evict clean pages, need the large round.
pub(super) const WRITE_BACK_STEP: usize = 16;

/// Pages of buffers that may be in flight beside the resident set (a prefetch window on its way
/// and the next one, and a round of eviction's copies): taken out of the budget.
pub(super) const IN_FLIGHT_PAGES: u64 = 2 * crate::prefetch::MAX_WINDOW + EVICT_BATCH as u64;

impl Shared {
    /// Copies page `i`, which the evictor owns (Evicting), announcing it in `copying`.
    ///
    /// # Safety
    /// As [`copy_of`].
    /// Returns the copy, and whether the application had discarded the page (the copy is zeros).
    pub(super) unsafe fn copy_page(&self, core: &RegionCore, i: u64) -> (Copy, bool) {
        self.copy_discarded.store(false, Ordering::Release);
        self.copying.store(i, Ordering::Release);
        // SAFETY: forwarded from the caller.
        let c = unsafe { copy_of(core, i) };
        self.copying.store(u64::MAX, Ordering::Release);
        (c, self.copy_discarded.swap(false, Ordering::AcqRel))
    }

    /// Publishes what the region holds in the shared budget, if any, and takes its share as
    /// the budget; every second, clears the slots of processes that died.
    pub(super) fn follow_shared_budget(&self, next_sweep: &mut Instant) {
        let Some(share) = &self.share else { return };
        let held = self.resident.load(Ordering::Acquire) + self.victims.footprint_pages();
        let allowed = share.update(held).min(self.own_budget.load(Ordering::Relaxed));
        self.budget.store(allowed, Ordering::Relaxed);
        if Instant::now() >= *next_sweep {
            share.sweep();
            *next_sweep = Instant::now() + Duration::from_secs(1);
        }
    }

    /// Pages the region may have resident at most: the budget minus what the victim cache
    /// takes now (its copies are local RAM too), or minus everything the process holds
    /// outside the region where that is counted and more. Faults wait for the evictor there.
    pub(super) fn ceiling(&self) -> u64 {
        let budget = self.budget.load(Ordering::Relaxed);
        // The cache's copies with the allocator's headers and slack (about 9%: 4468 KiB for
        // 1024 copies). The measured footprint outside the region includes the cache as it
        // really is, but is up to a round old: the larger of the two counts. Buffers in flight count too: a
        // prefetch window on its way and the next one, and a round of eviction's copies, made
        // while its pages are still resident.
        let outside = self.victims.footprint_pages().max(self.footprint.outside());
        // The region keeps at least a quarter of the budget (half, when only the cache is
        // counted) to work in.
        let most = if self.footprint.counting() { budget - budget / 4 } else { budget / 2 };
        budget - (outside + IN_FLIGHT_PAGES).min(most)
    }

    /// Pages the evictor keeps the region at: the ceiling minus the slack it works in
    /// (asynchronously, a round at a time), so that faults seldom reach the ceiling. A working
    /// set that fits is never evicted (the cache stays empty); one that does not settles at
    /// about three quarters resident, a quarter cached.
    pub(super) fn active_budget(&self) -> u64 {
        let ceiling = self.ceiling();
        ceiling - (ceiling / 32).max(2 * EVICT_BATCH as u64).min(ceiling / 4)
    }

    /// Whether the resident set is at its ceiling while the evictor can still make room.
    pub(super) fn over_hard_limit(&self) -> bool {
        self.resident.load(Ordering::Acquire) >= self.ceiling() && !self.evict_stalled.load(Ordering::Acquire)
    }

    pub(super) fn wake_evictor(&self) {
        let (m, c) = &self.evict_wanted;
        *crate::lock(m) = true;
        c.notify_one();
    }

    /// Evicts until the resident set is within the budget (or nothing more can go).
    pub(super) fn evict(&self, core: &RegionCore, stop: &AtomicBool) {
        // Read every round: a budget raised meanwhile stops the eviction at once (it used to run
        // on to the old mark, taking pages just brought back).
        let low = || {
            let budget = self.active_budget();
            budget - budget / 32
        };
        let mut stuck_rounds = 0;
        let stuck_limit = || 3 + crate::lock(&self.queue).len() / EVICT_BATCH;
        while self.resident.load(Ordering::Acquire) > low()
            && !stop.load(Ordering::Acquire)
            && stuck_rounds < stuck_limit()
        {
            self.footprint.measure(self.resident.load(Ordering::Acquire));
            let gone = {
                let _gate = self.fork_gate.enter();
                let _round = crate::lock(&self.evicting);
                self.evict_round(core, Round::All)
            };
            match gone {
                None => {
                    self.evict_stalled.store(true, Ordering::Release);
                    return;
                }
                // Rounds that only gave hot pages their second pass are not stuck: after one
                // pass over the queue every mark is spent.
                Some(0) => stuck_rounds += 1,
                Some(_) => {
                    stuck_rounds = 0;
                    self.evict_stalled.store(false, Ordering::Release);
                }
            }
        }
        if stuck_rounds >= stuck_limit() {
            self.evict_stalled.store(true, Ordering::Release);
        }
    }

    /// Makes room for `incoming` pages on a thread that would otherwise only wait (a fault
    /// collecting a prefetch window still on its way): up to two rounds of eviction of clean
    /// pages ([`Round::CleanOnly`]), if the resident set would go over its budget and no other
    /// round is running. On a machine whose
    /// cores are all busy (the program's threads, or here the servers) this turns the wait into
    /// the evictor's work instead of taking a core from someone else for it.
    pub(super) fn help_evict(&self, core: &RegionCore, incoming: u64) {
        for _ in 0..2 {
            if self.resident.load(Ordering::Acquire) + incoming <= self.active_budget() {
                return;
            }
            let _gate = self.fork_gate.enter();
            let Ok(_round) = self.evicting.try_lock() else { return };
            match self.evict_round(core, Round::CleanOnly) {
                Some(gone) if gone > 0 => bump(&self.stats.evicted_by_faults, gone),
                _ => return,
            }
        }
    }

    /// One round of eviction: up to [`EVICT_BATCH`] pages from the queue (those `kind` may not
    /// take go back to it); returns how many left local RAM (`None`: the queue was empty). The
    /// caller holds `evicting`.
    pub(super) fn evict_round(&self, core: &RegionCore, kind: Round) -> Option<u64> {
        let batch: Vec<u64> = {
            let mut q = crate::lock(&self.queue);
            let n = q.len().min(EVICT_BATCH);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            return None;
        }
        // Steps of the round; `evict_batch` rechecks every page's state, so a page that
        // changed between this look and its step is still handled right.
        let (dirty, clean): (Vec<u64>, Vec<u64>) = batch.iter().partition(|&&i| self.table.get(i) == Dirty);
        let dirty: &[u64] = if kind == Round::All {
            &dirty
        } else {
            crate::lock(&self.queue).extend(dirty.iter().copied());
            &[]
        };
        let mut gone = 0;
        for step in std::iter::once(&clean[..]).filter(|c| !c.is_empty()).chain(dirty.chunks(WRITE_BACK_STEP)) {
            gone += self.evict_batch(core, step, kind);
        }
        Some(gone)
    }

    /// Evicts what it can of `batch` (what `kind` allows); returns how many pages left local RAM.
    /// The decisions are [`lifecycle`]'s; this does the I/O between them.
    pub(super) fn evict_batch(&self, core: &RegionCore, batch: &[u64], kind: Round) -> u64 {
        // Where a copy can be read back from. A clean page is dropped only if it has a copy
        // there; a server whose process died is noticed here (two polls per server, no request),
        // before its copies are relied on.
        let any_clean = batch.iter().any(|&i| self.table.get(i) == Clean);
        let readable = if any_clean { self.servers.notice_hang_ups() } else { self.servers.live_mask() } | FILE_HOLDER;
        let lifecycle::Claim { mut victims, requeue, orphans } = lifecycle::claim(&self.table, batch, kind, readable);
        self.requeue(requeue);
        bump(&self.stats.saved_clean, orphans);
        // Freeze the pages to save (one ioctl per contiguous run): from here their writers wait
        // in `written`, so the copies taken below are final. A run that cannot be frozen is not
        // evicted: its pages stay resident and dirty (a copy taken unfrozen could miss a write).
        let mut unfrozen = Vec::new();
        for r in runs(&lifecycle::to_save(&victims)) {
            if let Err(e) = core.write_protect(r.start, r.end - r.start, true) {
                log::warn!("region {}: cannot write-protect pages {r:?}, keeping them: {e}", self.name);
                unfrozen.extend(r);
            }
        }
        if !unfrozen.is_empty() {
            victims.retain(|v| !unfrozen.contains(&v.page));
            self.requeue(lifecycle::keep_dirty(&self.table, &unfrozen));
        }
        let save = lifecycle::to_save(&victims);
        // SAFETY: each page is inside the live region (the evictor stops before the region is
        // unmapped), resident and write-protected, so nobody writes it while we copy.
        // (A discarded dirty page is saved as the zeros it now holds.)
        let saved: Vec<Copy> = save.iter().map(|&i| unsafe { self.copy_page(core, i) }.0).collect();
        let refs: Vec<(u64, &[u8; PAGE_SIZE])> = save.iter().zip(&saved).map(|(i, p)| (*i, &**p)).collect();
        let masks = self.servers.put(&refs);
        let in_file = self.write_file(&refs);
        let stored: HashMap<u64, u32> = save
            .iter()
            .copied()
            .zip(masks.into_iter().zip(in_file).map(|(m, f)| if f { m | FILE_HOLDER } else { m }))
            .collect();
        let mut copies: HashMap<u64, Copy> = save.iter().copied().zip(saved).collect();
        let lifecycle::Placement { mut leaving, kept, stale, written_back, short } =
            lifecycle::place(&self.table, &victims, &stored, self.servers.copies());
        bump(&self.stats.written_back, written_back);
        if short {
            self.rebuild_wanted.store(true, Ordering::Release);
        }
        self.servers.free_stale(stale);
        for r in runs(&kept) {
            let _ = core.write_protect(r.start, r.end - r.start, false);
        }
        self.requeue(kept);
        // Keep copies of what leaves for the servers in the victim cache (clean pages are
        // write-protected, so their copy is stable), then drop, one madvise per contiguous run.
        let caching = self.victims.capacity > 0 && kind == Round::All;
        let mut cached = Vec::new();
        let mut discarded = Vec::new();
        if caching {
            for &(i, next) in &leaving {
                if next != Remote {
                    continue;
                }
                let copy = match copies.remove(&i) {
                    Some(c) => c,
                    // SAFETY: as above: inside the live region, resident, write-protected (clean).
                    None => match unsafe { self.copy_page(core, i) } {
                        (c, false) => c,
                        // The application discarded this clean page: its content is zeros now,
                        // not the servers' copy. Keep it resident and dirty: saved next time.
                        (_, true) => {
                            discarded.push(i);
                            continue;
                        }
                    },
                };
                cached.push((i, copy));
            }
        }
        if !discarded.is_empty() {
            leaving.retain(|(i, _)| !discarded.contains(i));
            self.requeue(lifecycle::keep_dirty(&self.table, &discarded));
        }
        let orphaned = lifecycle::recheck(&self.table, &mut leaving, self.servers.live_mask() | FILE_HOLDER);
        cached.retain(|(i, _)| !orphaned.contains(i));
        self.requeue(orphaned);
        let pages: Vec<u64> = leaving.iter().map(|l| l.0).collect();
        let mut failed = HashSet::new();
        for (r, e) in core.drop_runs(&runs(&pages)) {
            log::warn!("region {}: cannot drop pages {r:?}: {e}", self.name);
            failed.extend(r);
        }
        self.victims.insert_all(cached.into_iter().filter(|(i, _)| !failed.contains(i)));
        let (gone, stayed) = lifecycle::finish(&self.table, &leaving, &failed);
        self.requeue(stayed);
        self.resident.fetch_sub(gone, Ordering::AcqRel);
        bump(&self.stats.evicted, gone);
        gone
    }

    /// Puts resident pages back in the evictor's queue.
    fn requeue(&self, pages: Vec<u64>) {
        if !pages.is_empty() {
            crate::lock(&self.queue).extend(pages);
        }
    }
}
