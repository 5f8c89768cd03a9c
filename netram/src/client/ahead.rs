//! Read-ahead of a strided fault stream.
//!
//! When a fault fetches a prefetch window, the window after it is requested at once, without
//! waiting ([`mosaic_transport::Connection::start_call_pages`]): its transfer then overlaps the
//! installs of the current window and the program's work on it, instead of following them. The
//! fault on the first page of that window (the next fault of the stream) collects it, installs
//! it, and requests the next one: one window is always on its way.
//!
//! The pages of an outstanding window are FETCHING and belong to the window (see
//! [`crate::pages`], invariant 1): whoever takes the window out of [`Shared::ahead`] owns them
//! and moves each out of FETCHING, to CLEAN when installed or back to REMOTE. A fault on any of
//! them takes the window; a discard of any of them, or a newer window, gives it up.

use std::collections::BTreeMap;
use std::ops::Range;

use mosaic_pager::Fault;
use mosaic_transport::{Page, PagesInFlight};

use super::{bump, Shared};
use crate::pages::{CLEAN, FETCHING, REMOTE};
use crate::servers::FILE_HOLDER;

/// Pages requested ahead of a fault stream and not yet collected.
pub(super) struct Ahead {
    /// Per server: the pages asked of it, in order, and the calls bringing them.
    calls: Vec<(Vec<u64>, PagesInFlight)>,
    /// The window's last page along the stride: the next window starts after it.
    last: u64,
}

impl Ahead {
    fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.calls.iter().flat_map(|(pages, _)| pages.iter().copied())
    }
}

impl Shared {
    /// Requests, without waiting, the up to `window` pages after `from` along `stride` that are
    /// on the servers (and not resident or busy). A window still outstanding is given up.
    pub(super) fn request_ahead(&self, from: u64, stride: i64, window: u64) {
        let mut pages = Vec::new();
        for k in 1..=window {
            let Some(p) = from.checked_add_signed(stride.saturating_mul(k as i64)).filter(|p| *p < self.table.len())
            else {
                break;
            };
            if self.table.get(p) == REMOTE && self.table.cas(p, REMOTE, FETCHING) {
                pages.push(p);
            }
        }
        let Some(&last) = pages.last() else { return };
        let mut by_server: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for p in pages {
            match self.servers.live_holder(self.table.holders(p) & !FILE_HOLDER) {
                Some(server) => by_server.entry(server).or_default().push(p),
                None => self.table.set(p, REMOTE), // a fault fetches it, with failover
            }
        }
        let mut calls = Vec::new();
        for (server, pages) in by_server {
            match self.servers.start_fetch(server, &pages) {
                Ok(call) => calls.push((pages, call)),
                Err(_) => pages.iter().for_each(|p| self.table.set(*p, REMOTE)),
            }
        }
        if calls.is_empty() {
            return;
        }
        let old = crate::lock(&self.ahead).replace(Ahead { calls, last });
        if let Some(old) = old {
            self.give_up(old);
        }
    }

    /// Takes the outstanding window if it holds page `i`.
    pub(super) fn take_ahead_holding(&self, i: u64) -> Option<Ahead> {
        let mut ahead = crate::lock(&self.ahead);
        if ahead.as_ref().is_some_and(|a| a.pages().any(|p| p == i)) {
            ahead.take()
        } else {
            None
        }
    }

    /// Gives up the outstanding window if it holds a page of `range` (or any page, for `None`).
    pub(super) fn give_up_ahead(&self, range: Option<Range<u64>>) {
        let taken = {
            let mut ahead = crate::lock(&self.ahead);
            let hit = ahead.as_ref().is_some_and(|a| range.as_ref().is_none_or(|r| a.pages().any(|p| r.contains(&p))));
            if hit {
                ahead.take()
            } else {
                None
            }
        };
        if let Some(a) = taken {
            self.give_up(a);
        }
    }

    /// Drops window `a`: its calls are given up, its pages are remote again.
    fn give_up(&self, a: Ahead) {
        for (pages, call) in a.calls {
            drop(call);
            for p in pages {
                self.table.set(p, REMOTE);
            }
        }
    }

    /// Collects window `a`, taken because page `i` of it faulted: waits for its pages and
    /// installs them, except `i`, whose contents go to `dst` for the pager to install. Returns
    /// whether `i` arrived (if not, it is still FETCHING, the caller's to fetch alone), and
    /// the window's last page.
    pub(super) fn collect_ahead(&self, fault: &Fault<'_>, a: Ahead, i: u64, dst: &mut Page) -> (bool, u64) {
        let mut got = false;
        let mut arrived = Vec::new();
        for (pages, call) in a.calls {
            let (bufs, ok) = call.wait();
            let mut k = 0;
            while k < pages.len() {
                if pages[k] == i {
                    if ok[k] {
                        dst.0.copy_from_slice(&bufs[k].0);
                        got = true;
                    }
                    k += 1;
                    continue;
                }
                if !ok[k] {
                    self.table.set(pages[k], REMOTE);
                    k += 1;
                    continue;
                }
                // A run of consecutive pages that arrived: one install.
                let mut end = k + 1;
                while end < pages.len() && ok[end] && pages[end] == pages[end - 1] + 1 && pages[end] != i {
                    end += 1;
                }
                let whole = fault.region.install_bytes(pages[k], Page::as_bytes(&bufs[k..end])).is_ok();
                for j in k..end {
                    // After a failed run install some pages may be in: installing again one by
                    // one tells (Ok means present now, whoever put it there).
                    let here = whole || fault.region.install_bytes(pages[j], Page::as_bytes(&bufs[j..=j])).is_ok();
                    if here {
                        // A copy from an earlier eviction is stale once the page is back.
                        self.victims.take(pages[j]);
                        self.table.set(pages[j], CLEAN);
                        arrived.push(pages[j]);
                    } else {
                        self.table.set(pages[j], REMOTE);
                    }
                }
                k = end;
            }
        }
        let n = arrived.len() as u64;
        bump(&self.stats.prefetched, n);
        self.note_protected_install(n);
        self.admit(&arrived);
        (got, a.last)
    }
}

impl Shared {
    /// Serves a fault on page `i` of the outstanding window `a`: requests the next window (so
    /// it travels while this one is installed), collects this one, and fetches `i` alone if
    /// it did not arrive.
    pub(super) fn fill_from_ahead(
        &self,
        fault: &Fault<'_>,
        a: Ahead,
        i: u64,
        page: &mut mosaic_pager::PageBuf,
    ) -> Result<mosaic_pager::Filled, mosaic_pager::FillError> {
        use mosaic_pager::{FillError, Filled};
        let write = fault.write || self.writes_likely();
        if write && !fault.write {
            fault.install_writable();
        }
        let dst = &mut Page::slice_from_bytes_mut(&mut page.0).ok_or_else(|| FillError("misaligned page".into()))?[0];
        self.victims.take(i);
        let trend =
            if self.prefetch_on.load(std::sync::atomic::Ordering::Relaxed) { self.prefetch.on_fault(i) } else { None };
        self.prefetch.prefetched_up_to(a.last);
        if let Some((stride, window)) = trend {
            self.request_ahead(a.last, stride, window);
        }
        let (got, _) = self.collect_ahead(fault, a, i, dst);
        match if got { Ok(()) } else { self.fetch(i, dst) } {
            Ok(()) => {
                super::DECIDED.set((i, if write { super::DIRTY } else { CLEAN }, false));
                bump(&self.stats.fetched, 1);
                Ok(Filled::Data)
            }
            Err(why) => {
                self.table.set(i, super::LOST);
                bump(&self.stats.lost, 1);
                Err(FillError(why))
            }
        }
    }
}
