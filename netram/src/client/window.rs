//! Prefetch windows along a strided fault stream.
//!
//! A fault with a trend fetches its page together with a window of pages after it, in one round
//! trip, and installs them ([`Shared::fetch_with_prefetch`]). It also requests the window after
//! that one without waiting ([`mosaic_transport::Connection::start_call_pages`]): its transfer
//! then overlaps the installs of the current window and the program's work on it. The fault on a
//! page of that window (the stream's next fault) collects it, installs it and requests the next
//! one: one window is always on its way.
//!
//! The pages of an outstanding window are Fetching and belong to the window (see
//! [`crate::pages`], invariant 1): whoever takes the window out of [`Shared::ahead`] owns them
//! and moves each out of Fetching, to Clean when installed or back to Remote. A fault on any of
//! them takes the window, and so does anyone who would otherwise wait for one of them
//! ([`Shared::settle_or_take_ahead`]); a newer window, a rebuild or the region's end gives it up.

use std::collections::BTreeMap;

use mosaic_pager::{Fault, FillError, Filled, Page, RegionCore};
use mosaic_transport::PagesInFlight;

use super::lifecycle::{self, Holds};
use super::{bump, Shared};
use crate::pages::PageState::{Clean, Remote};
use crate::servers::FILE_HOLDER;

/// Pages requested ahead of a fault stream and not yet collected.
pub(super) struct Ahead {
    /// Per server: the pages asked of it, in order, and the calls bringing them.
    calls: Vec<(Vec<u64>, PagesInFlight)>,
    /// The window's last page along the stride: the next window starts after it.
    last: u64,
}

impl Holds for Ahead {
    fn holds(&self, i: u64) -> bool {
        self.calls.iter().any(|(pages, _)| pages.contains(&i))
    }
}

impl Shared {
    /// Installs the claimed `pages` of a window: `bufs[k]` holds page `pages[k]` if `ok[k]`.
    /// Runs of consecutive pages go in with one ioctl each. Every page but `skip` (the faulting
    /// page, which the pager installs) leaves Fetching: Clean if it is in, Remote if not. What
    /// came in is counted as prefetched and admitted to the resident set.
    fn install_window(&self, region: &RegionCore, pages: &[u64], bufs: &[Page], ok: &[bool], skip: Option<u64>) {
        let mut arrived = Vec::with_capacity(pages.len());
        let mut k = 0;
        while k < pages.len() {
            if Some(pages[k]) == skip {
                k += 1;
                continue;
            }
            if !ok[k] {
                self.table.set(pages[k], Remote);
                k += 1;
                continue;
            }
            let mut end = k + 1;
            while end < pages.len() && ok[end] && pages[end] == pages[end - 1] + 1 && Some(pages[end]) != skip {
                end += 1;
            }
            let whole = region.install_bytes(pages[k], Page::as_bytes(&bufs[k..end])).is_ok();
            // After a failed run install some pages may be in: installing again one by one tells
            // (Ok means present now, whoever put it there).
            let (came, missed): (Vec<usize>, Vec<usize>) =
                (k..end).partition(|&j| whole || region.install_bytes(pages[j], Page::as_bytes(&bufs[j..=j])).is_ok());
            let came: Vec<u64> = came.into_iter().map(|j| pages[j]).collect();
            // A copy from an earlier eviction is stale once its page is back: dropped while the
            // pages are still Fetching, before anyone can evict them again.
            self.victims.discard(&came);
            came.iter().for_each(|p| self.table.set(*p, Clean));
            missed.iter().for_each(|j| self.table.set(pages[*j], Remote));
            arrived.extend(came);
            k = end;
        }
        let n = arrived.len() as u64;
        bump(&self.stats.prefetched, n);
        self.note_protected_install(n);
        self.admit(&arrived);
    }

    /// Fetches page `i` into `dst` together with up to `window` pages after it along `stride`
    /// that are on the servers, and installs those. Returns whether `i` arrived (if not, the
    /// caller fetches it alone, with failover).
    pub(super) fn fetch_with_prefetch(
        &self,
        fault: &Fault<'_>,
        i: u64,
        stride: i64,
        window: u64,
        dst: &mut Page,
    ) -> bool {
        let extra = lifecycle::claim_along(&self.table, i, stride, window);
        let Some(&last) = extra.last() else { return false };
        let mut bufs = Page::vec(extra.len());
        let reqs: Vec<(u64, u32)> =
            std::iter::once(i).chain(extra.iter().copied()).map(|p| (p, self.table.holders(p))).collect();
        let ok = {
            let mut dsts: Vec<&mut Page> = std::iter::once(dst).chain(bufs.iter_mut()).collect();
            self.servers.fetch_many(&reqs, &mut dsts)
        };
        self.install_window(fault.region, &extra, &bufs, &ok[1..], None);
        self.prefetch.prefetched_up_to(last);
        ok[0]
    }

    /// Requests, without waiting, the up to `window` pages after `from` along `stride` that are
    /// on the servers. A window still outstanding is given up.
    pub(super) fn request_ahead(&self, from: u64, stride: i64, window: u64) {
        let pages = lifecycle::claim_along(&self.table, from, stride, window);
        let Some(&last) = pages.last() else { return };
        let mut by_server: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for p in pages {
            match self.servers.live_holder(self.table.holders(p) & !FILE_HOLDER) {
                Some(server) => by_server.entry(server).or_default().push(p),
                None => self.table.set(p, Remote), // a fault fetches it, with failover
            }
        }
        let mut calls = Vec::new();
        for (server, pages) in by_server {
            match self.servers.start_fetch(server, &pages) {
                Ok(call) => calls.push((pages, call)),
                Err(_) => pages.iter().for_each(|p| self.table.set(*p, Remote)),
            }
        }
        if calls.is_empty() {
            return;
        }
        if let Some(old) = self.ahead.put(Ahead { calls, last }) {
            self.give_up(old);
        }
    }

    /// Gives up the outstanding window, if any.
    pub(super) fn give_up_ahead(&self) {
        if let Some(a) = self.ahead.take() {
            self.give_up(a);
        }
    }

    /// Drops window `a`: its calls are given up, its pages are remote again.
    pub(super) fn give_up(&self, a: Ahead) {
        for (pages, call) in a.calls {
            drop(call);
            for p in pages {
                self.table.set(p, Remote);
            }
        }
    }

    /// Serves a fault on page `i` of the outstanding window `a`: requests the next window (so
    /// it travels while this one is installed), collects this one, and fetches `i` alone if it
    /// did not arrive.
    pub(super) fn fill_from_ahead(
        &self,
        fault: &Fault<'_>,
        a: Ahead,
        i: u64,
        page: &mut Page,
    ) -> Result<Filled, FillError> {
        let write = self.decide_write(fault);
        let dst = page;
        self.victims.discard(&[i]);
        let trend = self.trend(i);
        self.prefetch.prefetched_up_to(a.last);
        if let Some((stride, window)) = trend {
            self.request_ahead(a.last, stride, window);
        }
        // While the window is still on its way, make room for it.
        self.help_evict(fault.region, a.calls.iter().map(|(pages, _)| pages.len() as u64).sum());
        let mut got = false;
        for (pages, call) in a.calls {
            let (bufs, ok) = call.wait();
            if let Some(k) = pages.iter().position(|p| *p == i).filter(|k| ok[*k]) {
                dst.0.copy_from_slice(&bufs[k].0);
                got = true;
            }
            self.install_window(fault.region, &pages, &bufs, &ok, Some(i));
        }
        self.finish_fetch(i, write, got, dst)
    }
}
