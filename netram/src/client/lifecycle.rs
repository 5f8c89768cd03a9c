//! The page lifecycle without I/O: the decisions of eviction and of the fault path as
//! transitions of the page table that return what to do, which the I/O layer
//! ([`super::eviction`], [`super::source`]) then does (write-protect these runs, store these
//! pages, free these stale copies, drop these runs).
//!
//! An eviction round, step by step (each step one function here, the I/O between them there):
//!
//! ```text
//!  claim          Clean/CleanAbsent/Dirty --> Evicting (ours); hot pages and busy ones requeued
//!  [write-protect the pages to save, a run at a time]
//!  keep_dirty     a run that could not be write-protected: Evicting --> Dirty, requeued
//!                 (also a page the application discarded while it was being copied)
//!  [copy them, store them on the servers (and the backing file)]
//!  place          stored: holders := where it was stored; the old holders' copies are stale
//!                 stored nowhere: --> Dirty, requeued (never dropped)
//!  [free the stale copies, unprotect what was kept, copy what leaves to the victim cache]
//!  recheck        a page whose copies' servers died meanwhile: --> Dirty, requeued
//!  [drop]
//!  finish         dropped: --> Remote (a copy exists) / Absent (zeros, never stored)
//!                 not dropped: --> Clean / CleanAbsent, requeued
//! ```
//!
//! Invariants these keep (the property test below checks them against a model of the
//! region's memory and the servers' copies, with failures injected at every I/O step):
//! 1. A page leaves local RAM only when a live server (or the backing file) holds its current
//!    contents, or its contents are zeros it never stored (Absent).
//! 2. A page written while it is being evicted is not lost: the evictor owns it (Evicting)
//!    from `claim` to `finish`, and a writer waits for it ([`begin_write`]).
//! 3. A clean page whose copies are all on dead servers is saved like a dirty one.
//! 4. What a round of [`Round::CleanOnly`] takes needs no copy: no page of it is read, so it
//!    cannot fault in a thread that is serving a fault.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::pages::PageState::{self, Absent, Clean, CleanAbsent, Dirty, Evicting, Fetching, Lost, Remote};
use crate::pages::PageTable;
use crate::servers::FILE_HOLDER;

/// Which pages a round of eviction may take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Round {
    /// Any resident page (the evictor thread).
    All,
    /// Only pages it can drop without reading them: clean pages, no copies kept in the victim
    /// cache. For a fault that helps ([`Shared::help_evict`]): reading a page the application
    /// has just discarded faults, and a fault while one is being served cannot be served (the
    /// signal is blocked in its own handler; a lone fault worker is busy with this one).
    CleanOnly,
}

/// A page a round took (Evicting, owned by the round).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Victim {
    pub(super) page: u64,
    /// It must be written back before it leaves: dirty, or clean with no readable copy left.
    pub(super) save: bool,
    /// Its state before (Clean, CleanAbsent or Dirty).
    pub(super) was: PageState,
}

/// What [`claim`] took and left.
#[derive(Debug, Default)]
pub(super) struct Claim {
    /// The pages taken, by page number.
    pub(super) victims: Vec<Victim>,
    /// Pages that stay candidates (hot ones getting their second pass, busy ones, dirty ones
    /// a clean-only round cannot take): back to the resident queue.
    pub(super) requeue: Vec<u64>,
    /// Clean pages saved because none of their copies is readable any more.
    pub(super) orphans: u64,
}

/// Takes what a round of `kind` may evict of `batch`: each such page moves to Evicting.
/// `readable` is the mask of holders a copy can be read back from (live servers, the file).
pub(super) fn claim(table: &PageTable, batch: &[u64], kind: Round, readable: u32) -> Claim {
    let mut c = Claim::default();
    for &i in batch {
        if table.take_hot(i) {
            c.requeue.push(i);
            continue;
        }
        let st = table.get(i);
        let orphan = st == Clean && table.holders(i) & readable == 0;
        let save = st == Dirty || orphan;
        if save && kind == Round::CleanOnly {
            c.requeue.push(i);
        } else if st.is_resident() && table.cas(i, st, Evicting) {
            c.orphans += u64::from(orphan);
            c.victims.push(Victim { page: i, save, was: st });
        } else if !matches!(st, Remote | Absent | Lost) {
            // Busy (a write upgrading it, a rebuild storing it) or changed under us: still
            // resident, so it stays a candidate. A duplicate entry is harmless.
            c.requeue.push(i);
        }
    }
    c.victims.sort_unstable();
    c
}

/// The pages of `victims` to write-protect and copy before they can leave.
pub(super) fn to_save(victims: &[Victim]) -> Vec<u64> {
    victims.iter().filter(|v| v.save).map(|v| v.page).collect()
}

/// Gives `pages` (Evicting, the round's) back as resident dirty pages, to be saved another
/// time (their write-protect failed, no server took them, or the application discarded them
/// while they were on their way out). Returns them for the resident queue.
pub(super) fn keep_dirty(table: &PageTable, pages: &[u64]) -> Vec<u64> {
    for &i in pages {
        table.set(i, Dirty);
    }
    pages.to_vec()
}

/// Where the victims go once the pages to save were stored.
#[derive(Debug, Default)]
pub(super) struct Placement {
    /// Pages that leave local RAM, with the state each takes once dropped.
    pub(super) leaving: Vec<(u64, PageState)>,
    /// Pages to save that no server (nor the file) took: they stay resident and dirty (to be
    /// unprotected and requeued).
    pub(super) kept: Vec<u64>,
    /// Copies on servers the pages no longer use (their placement changed), by holder mask.
    pub(super) stale: HashMap<u32, Vec<u64>>,
    /// Pages written back.
    pub(super) written_back: u64,
    /// Some page was stored with fewer copies than wanted (and not in the file).
    pub(super) short: bool,
}

/// Decides, from where each saved page was stored (`stored`: page -> holder mask, the file's
/// bit included), where every victim goes, and records the new holders. `copies` is how many
/// server copies a page should have.
pub(super) fn place(table: &PageTable, victims: &[Victim], stored: &HashMap<u64, u32>, copies: usize) -> Placement {
    let mut p = Placement::default();
    for v in victims {
        let next = if v.save {
            match stored.get(&v.page).copied().unwrap_or(0) {
                0 => {
                    p.kept.push(v.page);
                    continue;
                }
                mask => {
                    let old = table.holders(v.page) & !mask & !FILE_HOLDER;
                    if old != 0 {
                        p.stale.entry(old).or_default().push(v.page);
                    }
                    table.set_holders(v.page, mask);
                    p.written_back += 1;
                    p.short |= ((mask & !FILE_HOLDER).count_ones() as usize) < copies && mask & FILE_HOLDER == 0;
                    Remote
                }
            }
        } else if v.was == Clean {
            Remote
        } else {
            Absent
        };
        p.leaving.push((v.page, next));
    }
    keep_dirty(table, &p.kept);
    p
}

/// Just before the drop: a page leaving for its copies on the servers whose copies are no
/// longer readable (their servers died since they were stored) stays, resident and dirty, to be
/// saved elsewhere; removed from `leaving` and returned for the resident queue.
pub(super) fn recheck(table: &PageTable, leaving: &mut Vec<(u64, PageState)>, readable: u32) -> Vec<u64> {
    let orphaned: Vec<u64> =
        leaving.iter().filter(|&&(i, next)| next == Remote && table.holders(i) & readable == 0).map(|l| l.0).collect();
    if orphaned.is_empty() {
        return orphaned;
    }
    leaving.retain(|l| !orphaned.contains(&l.0));
    keep_dirty(table, &orphaned)
}

/// The end of a round: pages dropped take their next state; pages whose drop `failed` stay
/// resident as they are (clean: their copies are current), returned for the resident queue.
/// Returns the number gone, and the pages to requeue.
pub(super) fn finish(table: &PageTable, leaving: &[(u64, PageState)], failed: &HashSet<u64>) -> (u64, Vec<u64>) {
    let mut gone = 0;
    let mut requeue = Vec::new();
    for &(i, next) in leaving {
        if failed.contains(&i) {
            table.set(i, if next == Remote { Clean } else { CleanAbsent });
            requeue.push(i);
        } else {
            table.set(i, next);
            gone += 1;
        }
    }
    (gone, requeue)
}

/// What a write fault on a resident page does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WriteStep {
    /// The page is ours (Fetching) until [`end_write`]: unprotect it, then end the write.
    /// Carries the state it had.
    Unprotect(PageState),
    /// Someone owns it (the evictor saving it, a fetch): wait and ask again.
    Wait,
    /// It is not resident (dropped meanwhile, or lost): the write faults it back in.
    NotResident(PageState),
}

/// The start of a write to page `i` that faulted on write protection: the page is claimed
/// before it is made writable, so the evictor, which saves a dirty page by write-protecting
/// and copying it, can never have taken it between the unprotect and the state change (a write
/// landing after the saved copy would be lost).
pub(super) fn begin_write(table: &PageTable, i: u64) -> WriteStep {
    loop {
        match table.get(i) {
            st if st.is_resident() => {
                if table.cas(i, st, Fetching) {
                    return WriteStep::Unprotect(st);
                }
            }
            Fetching | Evicting => return WriteStep::Wait,
            st => return WriteStep::NotResident(st),
        }
    }
}

/// The end of a write [`begin_write`] let through: the page is dirty. Returns whether it was
/// an upgrade of a page installed write-protected (counted by the write predictor).
pub(super) fn end_write(table: &PageTable, i: u64, was: PageState) -> bool {
    table.set(i, Dirty);
    was != Dirty
}

/// Claims (Remote -> Fetching) for a prefetch window the up to `window` pages after `from`
/// along `stride` that are on the servers and neither resident nor busy.
pub(super) fn claim_along(table: &PageTable, from: u64, stride: i64, window: u64) -> Vec<u64> {
    let mut pages = Vec::new();
    for k in 1..=window {
        let Some(p) = from.checked_add_signed(stride.saturating_mul(k as i64)).filter(|p| *p < table.len()) else {
            break;
        };
        if table.cas(p, Remote, Fetching) {
            pages.push(p);
        }
    }
    pages
}

/// What owns Fetching pages without a thread behind it: the window requested ahead of a fault
/// stream, whose pages are on their way while nobody waits for them.
pub(super) trait Holds {
    /// Whether page `i` is one of its pages.
    fn holds(&self, i: u64) -> bool;
}

/// The one window requested ahead, if any. Whoever takes it out owns its pages, and moves each
/// out of Fetching (installed: Clean; not: Remote).
pub(super) struct AheadSlot<W>(Mutex<Option<W>>);

impl<W: Holds> AheadSlot<W> {
    pub(super) fn new() -> AheadSlot<W> {
        AheadSlot(Mutex::new(None))
    }

    /// Puts `w` in the slot; returns the window it replaces, which the caller now owns (to
    /// give up).
    pub(super) fn put(&self, w: W) -> Option<W> {
        crate::lock(&self.0).replace(w)
    }

    /// Takes the window out, if any.
    pub(super) fn take(&self) -> Option<W> {
        crate::lock(&self.0).take()
    }

    /// Takes the window out if it holds page `i`.
    pub(super) fn take_holding(&self, i: u64) -> Option<W> {
        let mut slot = crate::lock(&self.0);
        if slot.as_ref().is_some_and(|w| w.holds(i)) {
            slot.take()
        } else {
            None
        }
    }
}

/// What a thread that needs page `i` to settle finds (see [`look`]).
#[derive(Debug)]
pub(super) enum Busy<W> {
    /// It is in this state, owned by nobody.
    Settled(PageState),
    /// It belongs to the window requested ahead, which the caller now owns and must collect
    /// (or give up).
    Collect(W),
    /// Another thread owns it: look again later.
    Wait,
}

/// One look at page `i` by a thread that needs it settled (a fault, a discard). A page of the
/// window requested ahead is never waited for: nobody might ever collect the window (the fault
/// stream that asked for it may have moved on), so the looker takes it.
pub(super) fn look<W: Holds>(table: &PageTable, ahead: &AheadSlot<W>, i: u64) -> Busy<W> {
    match table.get(i) {
        Fetching => ahead.take_holding(i).map_or(Busy::Wait, Busy::Collect),
        Evicting => Busy::Wait,
        st => Busy::Settled(st),
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
