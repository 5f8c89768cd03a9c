//! Reading pages back (with failover to other copies and the backing file), writing to the
//! backing file, and rebuilding copies lost with a server.

use std::sync::atomic::{AtomicBool, Ordering};

use mosaic_pager::RegionCore;
use mosaic_transport::Page;

use super::config::bump;
use super::victims::Copy;
use super::Shared;
use crate::pages::PageState::{Clean, Dirty, Evicting, Fetching, Remote};
use crate::servers::FILE_HOLDER;
use crate::{PageError, PAGE_SIZE};

/// Pages re-stored per batch by the rebuild after a server loss (one GET and one PUT request
/// per server per batch).
pub(super) const REBUILD_BATCH: usize = 64;

impl Shared {
    /// Reads page `i` from a server holding it, failing over to the other copies and then to
    /// the backing file.
    pub(super) fn fetch(&self, i: u64, dst: &mut Page) -> Result<(), PageError> {
        let holders = self.table.holders(i);
        if holders == 0 {
            return Err(PageError::NoCopy { page: i });
        }
        let on_servers = holders & !FILE_HOLDER;
        let why = if on_servers == 0 {
            PageError::HoldersDown { page: i }
        } else {
            match self.servers.fetch(i, on_servers, dst) {
                Ok(()) => {
                    if on_servers & !self.servers.live_mask() != 0 {
                        bump(&self.stats.failovers, 1);
                    }
                    return Ok(());
                }
                Err((failed, last)) => {
                    self.table.drop_holders(i, failed);
                    match last {
                        Some((uri, source)) => PageError::Unanswered { page: i, uri, source },
                        None => PageError::HoldersDown { page: i },
                    }
                }
            }
        };
        if holders & FILE_HOLDER != 0 {
            if let Some(f) = &self.file {
                use std::os::unix::fs::FileExt;
                return match f.read_exact_at(&mut dst.0, i * PAGE_SIZE as u64) {
                    Ok(()) => {
                        bump(&self.stats.failovers, u64::from(on_servers != 0));
                        Ok(())
                    }
                    Err(source) => {
                        log::warn!("region {}: {}", self.name, mosaic_transport::error_chain(&why));
                        Err(PageError::File { page: i, source })
                    }
                };
            }
        }
        Err(why)
    }

    /// Writes the pages to the backing file, if there is one; returns which were written.
    pub(super) fn write_file(&self, pages: &[(u64, &[u8; PAGE_SIZE])]) -> Vec<bool> {
        use std::os::unix::fs::FileExt;
        match &self.file {
            None => vec![false; pages.len()],
            Some(f) => pages
                .iter()
                .map(|(i, data)| match f.write_all_at(&data[..], i * PAGE_SIZE as u64) {
                    Ok(()) => true,
                    Err(e) => {
                        log::error!("region {}: writing page {i} to the backing file failed: {e}", self.name);
                        false
                    }
                })
                .collect(),
        }
    }

    /// Re-creates missing copies: of pages on dead servers or on a server that lost the session,
    /// and of pages stored short (servers were full). Remote pages are fetched from a surviving
    /// copy; resident clean pages are copied from local memory (so a page whose every remote copy
    /// is gone, but which is still here, is saved); resident dirty pages get their copies when
    /// they are evicted.
    pub(super) fn rebuild(&self, core: &RegionCore, stop: &AtomicBool) {
        // Pages requested ahead are remote again, so they are rebuilt too.
        self.give_up_ahead();
        let live = self.servers.live_mask();
        let want = self.servers.copies();
        let mut short = false;
        let (mut remote, mut resident) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < self.table.len() {
            if stop.load(Ordering::Acquire) {
                return;
            }
            // The scan claims pages (Fetching) and changes holder masks: inside the gate, as
            // the batch that stores them, so that a fork or a hand-over never sees it half done.
            let _gate = self.fork_gate.enter();
            remote.clear();
            resident.clear();
            while i < self.table.len() && remote.len() + resident.len() < REBUILD_BATCH {
                let all = self.table.holders(i);
                let (file, holders) = (all & FILE_HOLDER, all & !FILE_HOLDER);
                // Enough: as many live copies as wanted, or as the live servers allow, or one
                // plus the backing file. Dead holders are cleared in any case.
                let have = (holders & live).count_ones() as usize;
                let enough = have >= want.min(live.count_ones() as usize).max(1) || file != 0 && have > 0;
                if all != 0 && (holders & !live != 0 || !enough) {
                    if self.table.cas(i, Remote, Fetching) {
                        // Read again now that the page is ours: it may have been written and
                        // evicted elsewhere between the look above and the claim.
                        let all = self.table.holders(i);
                        self.table.set_holders(i, all & (live | FILE_HOLDER));
                        remote.push(i);
                    } else if self.table.get(i) == Clean {
                        resident.push(i);
                    }
                }
                i += 1;
            }
            short |= self.rebuild_batch(core, &remote, &resident, want);
        }
        // Try again later only where enough servers have room (full ones may free some).
        if short && self.servers.with_room() >= want {
            self.rebuild_wanted.store(true, Ordering::Release);
        }
    }

    /// Re-stores a batch: `remote` pages (Fetching, ours) are read in one request per server
    /// (with failover one by one for what fails), `resident` clean pages are copied from local
    /// memory and held Evicting (their writers wait) until their copies are stored; then all go
    /// out in one PUT per server. Returns whether some page is still short of copies.
    pub(super) fn rebuild_batch(&self, core: &RegionCore, remote: &[u64], resident: &[u64], want: usize) -> bool {
        let _gate = self.fork_gate.enter();
        let live = self.servers.live_mask();
        let (fetched, arrived) = self.fetch_claimed(remote);
        let mut data: Vec<(u64, &[u8; PAGE_SIZE])> = Vec::with_capacity(remote.len() + resident.len());
        // Pages no server could return, but of which the victim cache still has a copy.
        let mut cached: Vec<(u64, Copy)> = Vec::new();
        for ((&i, page), ok) in remote.iter().zip(&fetched).zip(arrived) {
            if ok {
                data.push((i, &page.0));
            } else if let Some(copy) = self.victims.take(i) {
                cached.push((i, copy));
            }
            // Else no copy is left: a fault decides Lost later, with the page named.
        }
        let copies = self.copy_clean(core, resident, live | FILE_HOLDER);
        data.extend(copies.iter().map(|(i, c)| (*i, &**c)));
        data.extend(cached.iter().map(|(i, c)| (*i, &**c)));
        let masks = self.servers.put(&data);
        let mut short = false;
        for ((i, _), mask) in data.iter().zip(masks) {
            if mask != 0 {
                bump(&self.stats.rebuilt, 1);
            }
            let now = mask | self.table.holders(*i);
            self.table.set_holders(*i, now);
            short |= ((now & self.servers.live_mask()).count_ones() as usize) < want;
        }
        for &i in remote {
            self.table.set(i, Remote);
        }
        for (i, _) in &copies {
            self.table.set(*i, Clean);
        }
        self.victims.insert_all(cached);
        short
    }

    /// Reads pages this thread claimed (Fetching) from their holders: one batch per server, then
    /// one by one with failover for what failed. The pages, and whether each arrived.
    pub(super) fn fetch_claimed(&self, pages: &[u64]) -> (Vec<Page>, Vec<bool>) {
        let mut fetched = Page::vec(pages.len());
        let reqs: Vec<(u64, u32)> = pages.iter().map(|&i| (i, self.table.holders(i) & !FILE_HOLDER)).collect();
        let mut arrived = {
            let mut dsts: Vec<&mut Page> = fetched.iter_mut().collect();
            self.servers.fetch_many(&reqs, &mut dsts)
        };
        for ((&i, page), ok) in pages.iter().zip(fetched.iter_mut()).zip(arrived.iter_mut()) {
            *ok = *ok || self.fetch(i, page).is_ok();
        }
        (fetched, arrived)
    }

    /// Copies the resident clean pages of `pages` from local memory, each claimed Evicting from
    /// then on (its writers wait) until the caller has stored it and sets it Clean again, and
    /// its holder mask cut to `keep_holders`. Pages that changed meanwhile are left out (dirty
    /// ones are saved at their eviction); one discarded meanwhile (zeros now) is set Dirty, to
    /// be saved at its eviction.
    pub(super) fn copy_clean(&self, core: &RegionCore, pages: &[u64], keep_holders: u32) -> Vec<(u64, Copy)> {
        let mut copies = Vec::with_capacity(pages.len());
        for &i in pages {
            // Under the eviction lock (rounds name one page in `copying`), held Evicting until
            // stored so no write slips in between the copy and its new holders.
            let _round = crate::lock(&self.evicting);
            if !self.table.cas(i, Clean, Evicting) {
                continue;
            }
            self.table.set_holders(i, self.table.holders(i) & keep_holders);
            // SAFETY: inside the live region (the keeper stops before it is unmapped), resident
            // and clean, so write-protected: nobody writes it while we copy.
            match unsafe { self.copy_page(core, i) } {
                (_, true) => self.table.set(i, Dirty),
                (copy, false) => copies.push((i, copy)),
            }
        }
        copies
    }

    /// Pages with a copy somewhere but fewer live server copies than wanted (and no backing file).
    pub(super) fn under_replicated(&self) -> u64 {
        let live = self.servers.live_mask();
        let want = self.servers.copies();
        (0..self.table.len())
            .filter(|&i| {
                let h = self.table.holders(i);
                h != 0 && h & FILE_HOLDER == 0 && ((h & live).count_ones() as usize) < want
            })
            .count() as u64
    }
}
