//! A region across `fork`: the child gets the parent's memory as it was at the fork, with its
//! own writes private afterwards, as anonymous memory behaves.
//!
//! ```text
//!  parent, before fork     prepare_fork: close the gate (no eviction, rebuild, discard or
//!                          session check runs), CLONE the session on every live server
//!                          (copy-on-write there), let the child inherit the mapping
//!  fork                    the kernel copies the mapping: resident pages, copy-on-write
//!  parent, after fork      fork_parent: the mapping is not inherited again, the gate opens
//!  child, after fork       fork_child: a new session (the clone, attached with its secret),
//!                          a new userfaultfd on the inherited mapping, a page table made from
//!                          the parent's and from which pages are present here
//! ```
//! Why the child's pages are right: with the gate closed, no page is being written back or
//! dropped, so every page is either present in the mapping (its contents as of the fork, which
//! the kernel copied) or absent, and then its contents are the copy its holder servers had when
//! the clone was made (a fetch in flight changes no server). The child treats every present page
//! as dirty (the parent's write protection does not survive into the child, and nothing else
//! would catch its writes); absent pages with a cloned copy are remote; absent pages whose
//! every holder failed to clone are lost (SIGBUS on touch, never zeros); others read as zeros.
//!
//! A child that cannot adopt the region (the servers cannot be reached, say) unmaps it: its
//! memory then faults as a segmentation fault, never as zeros.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{NetRam, Shared};
use crate::pages::PageState::{self, Absent, Dirty, Lost, Remote};
use crate::pages::PageTable;
use crate::proto::{ClientId, Secret};
use crate::servers::{ServerSet, FILE_HOLDER};
use crate::{ConfigError, NetRamError};

/// Set in the gate's state while it is closed; the rest counts the threads inside.
const CLOSED: u64 = 1 << 63;
/// How long closing the gate waits for the threads inside to leave.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(30);

thread_local! {
    /// Gates this thread is inside: a thread already inside never waits at a gate again (it
    /// would wait for itself).
    static INSIDE: Cell<u32> = const { Cell::new(0) };
}

/// A gate that work changing the servers' copies passes through, closed while the process forks.
#[derive(Default)]
pub(super) struct ForkGate {
    state: AtomicU64,
}

/// A pass through the gate; leaving is dropping it.
pub(super) struct Pass<'a>(&'a ForkGate);

impl ForkGate {
    /// Enters, waiting while the gate is closed.
    pub(super) fn enter(&self) -> Pass<'_> {
        let nested = INSIDE.get() > 0;
        let mut spins = 0u32;
        loop {
            let s = self.state.load(Ordering::Acquire);
            if (s & CLOSED == 0 || nested)
                && self.state.compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                INSIDE.set(INSIDE.get() + 1);
                return Pass(self);
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Closes the gate and waits for everyone inside to leave; false (and open again) if they
    /// did not within `limit`.
    pub(super) fn close(&self, limit: Duration) -> bool {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let start = Instant::now();
        while self.state.load(Ordering::Acquire) & !CLOSED != 0 {
            if start.elapsed() > limit {
                self.open();
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        true
    }

    pub(super) fn open(&self) {
        self.state.fetch_and(!CLOSED, Ordering::AcqRel);
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.state.fetch_sub(1, Ordering::AcqRel);
        INSIDE.set(INSIDE.get() - 1);
    }
}

/// What [`NetRam::prepare_fork`] set up, for the parent ([`NetRam::fork_parent`]) and the child
/// ([`NetRam::fork_child`]) to finish with after the fork.
#[derive(Debug)]
pub struct ForkTicket {
    child: ClientId,
    secret: Secret,
    /// Servers that cloned the session.
    cloned: u32,
}

impl NetRam {
    /// Prepares a `fork` (call it just before, with no other thread forking): stops the
    /// region's background work, clones its session on the servers and lets the child inherit
    /// the mapping. Whatever the fork's outcome, the parent must then call [`fork_parent`]
    /// (which lets the work go on); the child, [`fork_child`]. Errors (the backing file cannot be
    /// shared, the background work did not stop) leave everything as it was: a child then does
    /// not inherit the region.
    ///
    /// [`fork_parent`]: NetRam::fork_parent
    /// [`fork_child`]: NetRam::fork_child
    pub fn prepare_fork(&self) -> Result<ForkTicket, NetRamError> {
        let s = &self.shared;
        if s.file.is_some() {
            return Err(ConfigError::BackingFileWithFork.into());
        }
        let (mut child, mut secret) = ([0u8; 16], [0u8; crate::proto::SECRET_LEN]);
        getrandom::fill(&mut child).and_then(|()| getrandom::fill(&mut secret)).map_err(NetRamError::Random)?;
        if !s.fork_gate.close(CLOSE_WAIT) {
            return Err(NetRamError::ForkPause { waited: CLOSE_WAIT });
        }
        let ticket = ForkTicket { child, secret, cloned: s.servers.clone_session(&child, &secret, None) };
        if let Err(e) = self.region().inherit_on_fork(true) {
            s.fork_gate.open();
            return Err(e.into());
        }
        Ok(ticket)
    }

    /// In the parent after a fork (or after a fork that failed): the mapping is no longer
    /// inherited and the background work goes on. The child's clone on the servers is its own;
    /// if no child attaches to it, the servers reclaim it after the grace time.
    pub fn fork_parent(&self, _ticket: ForkTicket) {
        if let Err(e) = self.region().inherit_on_fork(false) {
            log::error!("region {}: {e} (a later fork's child would inherit the mapping)", self.shared.name);
        }
        self.shared.fork_gate.open();
    }

    /// In the child after a fork: the region inherited from the parent (`self`) becomes the
    /// child's own, at the same address, with the parent's contents as of the fork. On error
    /// the inherited mapping is unmapped (touching it is then a segmentation fault, never a
    /// page of zeros) and the error says why.
    pub fn fork_child(mut self, ticket: ForkTicket) -> Result<NetRam, NetRamError> {
        let (base, pages) = (self.as_ptr() as usize, self.shared.table.len());
        let cfg = self.cfg.clone();
        // The parent's threads do not exist here, its connections are the parent's: nothing of
        // it may run or be dropped (which would close the parent's sessions).
        if let Some(region) = self.region.take() {
            region.forget_after_fork();
        }
        let parent = self.shared.clone();
        std::mem::forget(self);
        let adopted = adopt(&parent, cfg, &ticket, base, pages);
        if adopted.is_err() {
            mosaic_pager::unmap_inherited(base, pages);
        }
        adopted
    }
}

/// What a page not in local memory becomes in a region that takes over another's table (a
/// forked child, a region handed over): its state there and the holders `usable` leaves it.
/// A page whose copies are all on servers it cannot read becomes Lost (SIGBUS, never zeros).
pub(super) fn inherited(state: PageState, holders: u32, usable: u32) -> (PageState, u32) {
    let all = holders & !FILE_HOLDER;
    let kept = all & usable;
    if state == Lost {
        (Lost, 0)
    } else if kept != 0 {
        (Remote, kept)
    } else if all != 0 || state == Remote {
        (Lost, 0)
    } else {
        (Absent, 0)
    }
}

/// Builds the child's region on the mapping at `base` (see the module's documentation).
fn adopt(
    parent: &Shared,
    cfg: super::NetRamConfig,
    t: &ForkTicket,
    base: usize,
    pages: u64,
) -> Result<NetRam, NetRamError> {
    let present = mosaic_pager::present_pages(base, pages)?;
    let servers = ServerSet::connect(
        &cfg.servers,
        &cfg.key,
        t.child,
        t.secret,
        parent.servers.region_id(),
        cfg.copies,
        cfg.grace,
        cfg.timeout,
    )?;
    // Holders the child can read from: servers that cloned, and still had the clone.
    let usable = t.cloned & !servers.fresh_mask();
    let table = PageTable::new(pages);
    let mut queue = std::collections::VecDeque::new();
    let mut next = present.iter().peekable();
    let mut lost = 0u64;
    for i in 0..pages {
        while next.peek().is_some_and(|r| r.end <= i) {
            next.next();
        }
        let here = next.peek().is_some_and(|r| r.contains(&i));
        if here {
            queue.push_back(i);
            table.set(i, Dirty);
            table.set_holders(i, parent.table.holders(i) & !FILE_HOLDER & usable);
            continue;
        }
        let (state, holders) = inherited(parent.table.get(i), parent.table.holders(i), usable);
        lost += u64::from(state == Lost && parent.table.get(i) != Lost);
        if state != Absent {
            table.set(i, state);
            table.set_holders(i, holders);
        }
    }
    if lost > 0 {
        log::error!(
            "region {}: {lost} page(s) inherited from the parent have no copy this child can read (a server could not clone them): touching one raises SIGBUS",
            cfg.name
        );
    }
    let budget = parent.own_budget.load(Ordering::Relaxed);
    let shared = Shared::new(&cfg, servers, table, budget, None);
    shared.resident.store(queue.len() as u64, Ordering::Release);
    *crate::lock(&shared.queue) = queue;
    let ram = NetRam::start(cfg, shared, super::MapAt::Adopt(base))?;
    ram.shared.wake_evictor();
    log::debug!("region {}: adopted in a forked child ({} pages resident)", ram.shared.name, ram.stats().resident);
    Ok(ram)
}
