//! The fault path: the region's [`PageSource`], which the pager calls on every fault, and the
//! decisions it makes (wait for room, fetch with prefetch, install writable, admit).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mosaic_pager::{Fault, FillError, Filled, Outcome, Page, PageSource, Token, WriteDecision};

use super::config::bump;
use super::lifecycle::{self, Busy, WriteStep};
use super::{window, Shared, SETTLE_LIMIT};
use crate::pages::PageState::{self, Absent, Clean, CleanAbsent, Dirty, Evicting, Fetching, Lost, Remote};
use crate::PageError;

/// What a `fill` decided, carried to `installed` in the pager's [`Token`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    /// Nothing for `installed` to do: the page is not ours (the evictor's copy of a page the
    /// application discarded, served as zeros while the evictor owns it).
    Nothing,
    /// The page, Fetching and ours, takes `state` once in; `counted`: it is already counted as
    /// resident (it was resident in our books and faulted: discarded, or a stale fault).
    Install { state: PageState, counted: bool },
}

impl Decision {
    const INSTALL: u64 = 1 << 16;

    fn token(self) -> Token {
        match self {
            Decision::Nothing => Token(0),
            Decision::Install { state, counted } => {
                Token(Self::INSTALL | u64::from(counted) << 8 | u64::from(state as u8))
            }
        }
    }

    fn of(token: Token) -> Decision {
        if token.0 & Self::INSTALL == 0 {
            return Decision::Nothing;
        }
        let state = PageState::from_bits(token.0.to_le_bytes()[0]);
        Decision::Install { state, counted: token.0 >> 8 & 1 == 1 }
    }

    /// A page that takes `state` once in and was not counted yet.
    fn install(state: PageState) -> Filled {
        Filled::Data(Decision::Install { state, counted: false }.token())
    }
}

/// What a wait for a busy page ended with (see [`Shared::settle_or_take_ahead`]).
pub(super) enum Settled {
    /// The page left Fetching/Evicting for this state.
    State(PageState),
    /// It belongs to the window requested ahead, which the caller now owns.
    Ahead(window::Ahead),
    /// It stayed busy for [`SETTLE_LIMIT`].
    Hung,
}

/// The region's page source: what the pager calls on faults.
pub(super) struct Source(pub(super) Arc<Shared>);

impl PageSource for Source {
    fn fill(&self, fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError> {
        let s = &self.0;
        let i = fault.index;
        if s.copying.load(Ordering::Acquire) == i && s.table.get(i) == Evicting {
            s.copy_discarded.store(true, Ordering::Release);
            return Ok(Filled::Zero(Decision::Nothing.token()));
        }
        if s.throttle(fault) {
            return Ok(Filled::Busy);
        }
        // A page of the window requested ahead (such pages are Fetching, so other faults take
        // no lock here): this fault collects the window.
        if let Some(a) = (s.table.get(i) == Fetching).then(|| s.ahead.take_holding(i)).flatten() {
            return s.fill_from_ahead(fault, a, i, page);
        }
        let hung = || FillError::new(PageError::Hung { page: i, waited: SETTLE_LIMIT });
        loop {
            let st = if fault.can_defer {
                // A fault worker must not wait here: the evictor owning the page may itself
                // fault (on a page the application discarded) and need this worker.
                match s.table.get(i) {
                    Fetching | Evicting if fault.waited > SETTLE_LIMIT => return Err(hung()),
                    Fetching | Evicting => return Ok(Filled::Busy),
                    st => st,
                }
            } else {
                match s.settle_or_take_ahead(i) {
                    Settled::State(st) => st,
                    Settled::Ahead(a) => return s.fill_from_ahead(fault, a, i, page),
                    Settled::Hung => return Err(hung()),
                }
            };
            if !s.table.cas(i, st, Fetching) {
                continue;
            }
            let write = s.decide_write(fault);
            let dirty_or = |clean| if write { Dirty } else { clean };
            return match st {
                Absent => {
                    bump(&s.stats.zero_filled, 1);
                    Ok(Filled::Zero(Decision::Install { state: dirty_or(CleanAbsent), counted: false }.token()))
                }
                Remote => {
                    let dst = page;
                    if let Some(copy) = s.victims.take(i) {
                        dst.0.copy_from_slice(&copy[..]);
                        bump(&s.stats.cache_hits, 1);
                        s.table.mark_hot(i);
                        return Ok(Decision::install(dirty_or(Clean)));
                    }
                    let prefetched = match s.trend(i) {
                        Some((stride, window)) => {
                            let got = s.fetch_with_prefetch(fault, i, stride, window, dst);
                            // And the window after, without waiting: the next fault collects it.
                            if let Some(end) = i.checked_add_signed(stride.saturating_mul(window as i64)) {
                                s.request_ahead(end, stride, window);
                            }
                            got
                        }
                        None => false,
                    };
                    s.finish_fetch(i, write, prefetched, dst)
                }
                Lost => {
                    s.table.set(i, Lost);
                    Err(FillError::new(PageError::LostEarlier { page: i }))
                }
                // Resident in our books, yet it faulted: either a stale fault another thread
                // already served (the install will find the page present), or the application
                // discarded it (MADV_DONTNEED), which by Linux semantics reads as zeros. Either
                // way zeros are right; mark it dirty so its remote copy is replaced.
                _ => Ok(Filled::Zero(Decision::Install { state: Dirty, counted: true }.token())),
            };
        }
    }

    fn installed(&self, index: u64, token: Token, outcome: Outcome) {
        let s = &self.0;
        let Decision::Install { state, counted } = Decision::of(token) else { return };
        if s.table.get(index) != Fetching {
            return; // cannot happen: the page is ours from fill to here
        }
        match outcome {
            Outcome::Installed | Outcome::AlreadyPresent => {
                s.table.set(index, state);
                if state != Dirty {
                    s.note_protected_install(1);
                }
                if !counted && outcome == Outcome::Installed {
                    s.admit(&[index]);
                }
            }
            Outcome::Lost => {
                s.table.set(index, Lost);
                if counted {
                    // It was resident (counted) and is not any more.
                    s.resident.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    fn written(&self, fault: &Fault<'_>) -> WriteDecision {
        let (s, index) = (&self.0, fault.index);
        loop {
            match lifecycle::begin_write(&s.table, index) {
                // Made writable while the page is ours, and only then Dirty (see `begin_write`).
                WriteStep::Unprotect(was) => {
                    if let Err(e) = fault.unprotect() {
                        log::error!("region {}: page {index}: {e}", s.name);
                    }
                    if lifecycle::end_write(&s.table, index, was) {
                        s.upgrades.fetch_add(1, Ordering::Relaxed);
                    }
                    return WriteDecision::Proceed;
                }
                // Being saved and dropped, or fetched: wait (a worker asks again later, see
                // `fill`); the write then faults the page back in if it left.
                WriteStep::Wait if fault.can_defer && fault.waited <= SETTLE_LIMIT => return WriteDecision::Busy,
                WriteStep::Wait if fault.can_defer => return WriteDecision::Retry,
                WriteStep::Wait => {
                    if s.table.settle(index, SETTLE_LIMIT).is_none() {
                        return WriteDecision::Retry;
                    }
                }
                // No longer resident (evicted, or lost): the retried write faults it back in.
                WriteStep::NotResident(_) => return WriteDecision::Retry,
            }
        }
    }
}

impl Shared {
    /// Back-pressure: a fault that would take the resident set past its ceiling waits for the
    /// evictor, however long that takes, so a fast faulting thread cannot outrun eviction and
    /// overshoot the budget. The one way past is the evictor saying it cannot make room at
    /// all (`evict_stalled`: every server full or gone, nothing evictable), where waiting would
    /// hang the program. Returns true if the fault should be deferred instead (a worker asks
    /// again later); a fault on the faulting thread waits here.
    pub(super) fn throttle(&self, fault: &Fault<'_>) -> bool {
        if !self.over_hard_limit() {
            return false;
        }
        if fault.waited.is_zero() {
            bump(&self.stats.throttled, 1);
        }
        if fault.can_defer {
            return true;
        }
        self.wait_for_room();
        false
    }

    /// The stride and window of the fault stream page `i` continues, if prefetch is on and it
    /// continues one.
    pub(super) fn trend(&self, i: u64) -> Option<(i64, u64)> {
        if self.prefetch_on.load(Ordering::Relaxed) {
            self.prefetch.on_fault(i)
        } else {
            None
        }
    }

    /// Waits until the resident set is below its ceiling or the evictor stalls. Polls with
    /// short sleeps and takes no lock but the evictor's wake-up (renewed every millisecond).
    pub(super) fn wait_for_room(&self) {
        let mut polls = 0u32;
        while self.over_hard_limit() {
            if polls % 20 == 0 {
                self.wake_evictor();
            }
            polls = polls.wrapping_add(1);
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Whether a read fault installs its page writable (and dirty) at once: in a
    /// read-modify-write stream a read fault is followed by a write-protect fault on the same
    /// page, and when enough are, installing writable spares the second fault.
    pub(super) fn decide_write(&self, fault: &Fault<'_>) -> bool {
        let write = fault.write || self.writes_likely();
        if write && !fault.write {
            fault.install_writable();
        }
        write
    }

    /// The end of a fault on a remote page `i` (Fetching, ours): `dst` holds it if `arrived`,
    /// else it is fetched alone, with failover; a page no server can return is lost.
    pub(super) fn finish_fetch(&self, i: u64, write: bool, arrived: bool, dst: &mut Page) -> Result<Filled, FillError> {
        match if arrived { Ok(()) } else { self.fetch(i, dst) } {
            Ok(()) => {
                bump(&self.stats.fetched, 1);
                Ok(Decision::install(if write { Dirty } else { Clean }))
            }
            Err(why) => {
                self.table.set(i, Lost);
                bump(&self.stats.lost, 1);
                Err(FillError::new(why))
            }
        }
    }

    /// Waits for page `i` to settle, for a fault or a discard that can wait, except that a page
    /// of the window requested ahead is not waited for: the window is taken and handed to the
    /// caller instead ([`lifecycle::look`]).
    pub(super) fn settle_or_take_ahead(&self, i: u64) -> Settled {
        // Nearly always settled at once: then no clock read (one costs 30-50 ns here).
        let mut hung_at = None;
        let mut spins = 0u32;
        loop {
            match lifecycle::look(&self.table, &self.ahead, i) {
                Busy::Settled(st) => return Settled::State(st),
                Busy::Collect(a) => return Settled::Ahead(a),
                Busy::Wait => {}
            }
            if Instant::now() >= *hung_at.get_or_insert_with(|| Instant::now() + SETTLE_LIMIT) {
                return Settled::Hung;
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// Whether more than a quarter of the pages installed write-protected were written soon
    /// after, over a window of the last few thousand installs. A write-protect fault (the trap,
    /// the source, and an unprotect whose TLB flush interrupts every other CPU running the
    /// process) costs more than writing back a page that was not written after all (a copy and
    /// its share of a batched PUT), so a minority of writes is enough. Random read-modify-write
    /// at 25% resident, writing every other access (measured with a compressed victim cache
    /// since backed out): 13.6 and 15.7 s with a quarter against 18.4 and 16.8 s with three
    /// quarters (BENCHMARKS.md, 2026-12-04).
    pub(super) fn writes_likely(&self) -> bool {
        let reads = self.protected_installs.load(Ordering::Relaxed);
        let writes = self.upgrades.load(Ordering::Relaxed);
        reads >= 64 && writes * 4 > reads
    }

    /// Counts pages installed write-protected; ages both counters so the prediction follows
    /// the workload.
    pub(super) fn note_protected_install(&self, n: u64) {
        if self.protected_installs.fetch_add(n, Ordering::Relaxed) + n > 4096 {
            self.protected_installs.store(2048, Ordering::Relaxed);
            let w = self.upgrades.load(Ordering::Relaxed);
            self.upgrades.store(w / 2, Ordering::Relaxed);
        }
    }

    /// Counts newly installed pages as resident and hands them to the evictor (counted first,
    /// so the evictor never takes away more than was counted).
    pub(super) fn admit(&self, pages: &[u64]) {
        let n = pages.len() as u64;
        let resident = self.resident.fetch_add(n, Ordering::AcqRel) + n;
        crate::lock(&self.queue).extend(pages.iter().copied());
        if resident > self.active_budget() {
            self.wake_evictor();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_survives_the_token() {
        assert_eq!(Decision::of(Decision::Nothing.token()), Decision::Nothing);
        assert_eq!(Decision::of(Token::default()), Decision::Nothing);
        for state in [Clean, CleanAbsent, Dirty] {
            for counted in [false, true] {
                let d = Decision::Install { state, counted };
                assert_eq!(Decision::of(d.token()), d);
            }
        }
    }
}
