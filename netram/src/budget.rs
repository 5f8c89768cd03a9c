//! One local-RAM budget shared by several processes (a `mosrun` job and the children it forks
//! or runs): a page of shared memory where each process publishes how much of the budget it
//! holds, and reads what the others hold.
//!
//! Each process keeps its resident pages (and its cache of recent victims) within
//! `max(budget - others, budget / processes, MIN_BUDGET_PAGES)`: a process alone may use the
//! whole budget; when several need memory, none is pushed below an equal share, and those above
//! it give back until the sum is within the budget. Figures are published and read by each
//! region's evictor every few milliseconds, so the sum can pass the budget for that long.
//!
//! The page is shared with the job's other processes, which are the same user's and trusted as
//! much as the program itself; still, nothing read from it is used unchecked: a slot claiming
//! more than the budget counts as the budget.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{NetRamError, MIN_BUDGET_PAGES};

/// Processes one budget can be shared by.
const SLOTS: usize = 255;
/// Marks a budget page (and its layout version).
const MAGIC: u64 = 0x6d6f_7361_6963_4201; // "mosaicB", 1

/// The shared page.
#[repr(C)]
struct Ledger {
    magic: AtomicU64,
    /// The budget, in pages.
    budget: AtomicU64,
    /// Per process: its pid (0: free) and the pages it holds.
    slots: [[AtomicU64; 2]; SLOTS],
}

const _: () = assert!(size_of::<Ledger>() <= 4096);

/// The shared mapping; never unmapped (a forked child inherits it, and slots point into it).
struct Mapping(*const Ledger);

// SAFETY: the mapping is shared memory accessed only through atomics, never unmapped.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// A budget shared between processes. Cloning it gives another handle on the same page.
#[derive(Clone)]
pub struct SharedBudget {
    map: Arc<Mapping>,
}

impl std::fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudget").field("budget_pages", &self.budget_pages()).finish_non_exhaustive()
    }
}

fn os(op: &'static str) -> NetRamError {
    NetRamError::SharedBudget { op, source: std::io::Error::last_os_error() }
}

impl SharedBudget {
    /// A new shared budget of `bytes`, and the descriptor other processes open it with
    /// ([`SharedBudget::open`]; it is close-on-exec: clear that to hand it to a program).
    pub fn create(bytes: u64) -> Result<(SharedBudget, OwnedFd), NetRamError> {
        // SAFETY: memfd_create with a NUL-terminated name; returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"mosaic-budget".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) } != 0 {
            return Err(os("ftruncate"));
        }
        let b = SharedBudget::map(fd.as_raw_fd())?;
        let l = b.ledger();
        l.budget.store(bytes / crate::PAGE_SIZE as u64, Ordering::Relaxed);
        l.magic.store(MAGIC, Ordering::Release);
        Ok((b, fd))
    }

    /// Opens the shared budget behind descriptor `fd` (made by [`SharedBudget::create`]).
    pub fn open(fd: RawFd) -> Result<SharedBudget, NetRamError> {
        // SAFETY: fstat into a zeroed stat of a descriptor the caller names.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &raw mut st) } != 0 {
            return Err(os("fstat of its descriptor"));
        }
        if st.st_size < 4096 {
            return Err(NetRamError::NotABudget { fd });
        }
        let b = SharedBudget::map(fd)?;
        if b.ledger().magic.load(Ordering::Acquire) != MAGIC {
            return Err(NetRamError::NotABudget { fd });
        }
        Ok(b)
    }

    fn map(fd: RawFd) -> Result<SharedBudget, NetRamError> {
        // SAFETY: a shared mapping of one page of a descriptor at least that long; the result
        // is checked, and the mapping is never unmapped (see `Mapping`).
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        Ok(SharedBudget { map: Arc::new(Mapping(p.cast())) })
    }

    fn ledger(&self) -> &Ledger {
        // SAFETY: the mapping is one page, large enough for a Ledger (asserted above), aligned
        // (a page), made only of atomics (any bits are valid), and never unmapped.
        unsafe { &*self.map.0 }
    }

    /// The whole budget, in pages.
    pub fn budget_pages(&self) -> u64 {
        self.ledger().budget.load(Ordering::Relaxed)
    }

    /// Takes a slot for this process (reusing one whose process is gone); `None` if all are
    /// held by live processes.
    pub(crate) fn join(&self) -> Option<Share> {
        // SAFETY: getpid cannot fail.
        let me = u64::try_from(unsafe { libc::getpid() }).unwrap_or(0);
        let slots = &self.ledger().slots;
        for pass in 0..2 {
            for (i, s) in slots.iter().enumerate() {
                let pid = s[0].load(Ordering::Acquire);
                let free = pid == 0 || (pass == 1 && !alive(pid));
                if free && s[0].compare_exchange(pid, me, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    s[1].store(0, Ordering::Release);
                    return Some(Share { budget: self.clone(), slot: i });
                }
            }
        }
        None
    }
}

fn alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() != libc::ESRCH }
}

/// One process's place in a [`SharedBudget`]; leaving it (drop) frees the slot.
pub(crate) struct Share {
    budget: SharedBudget,
    slot: usize,
}

impl Share {
    /// Publishes that this process holds `pages`, and returns how many it may hold.
    pub(crate) fn update(&self, pages: u64) -> u64 {
        let l = self.budget.ledger();
        let total = l.budget.load(Ordering::Relaxed).max(MIN_BUDGET_PAGES);
        l.slots[self.slot][1].store(pages, Ordering::Release);
        let (mut others, mut procs) = (0u64, 1u64);
        for (i, s) in l.slots.iter().enumerate() {
            if i != self.slot && s[0].load(Ordering::Acquire) != 0 {
                others = others.saturating_add(s[1].load(Ordering::Acquire).min(total));
                procs += 1;
            }
        }
        total.saturating_sub(others).max(total / procs).max(MIN_BUDGET_PAGES)
    }

    /// Clears slots of processes that are gone (they died without leaving).
    pub(crate) fn sweep(&self) {
        for (i, s) in self.budget.ledger().slots.iter().enumerate() {
            let pid = s[0].load(Ordering::Acquire);
            if i != self.slot && pid != 0 && !alive(pid) {
                let _ = s[0].compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let s = &self.budget.ledger().slots[self.slot];
        s[1].store(0, Ordering::Release);
        s[0].store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_share_one_budget() {
        let (b, fd) = SharedBudget::create(1024 * 4096).unwrap();
        let other = SharedBudget::open(fd.as_raw_fd()).unwrap();
        assert_eq!(other.budget_pages(), 1024);
        let a = b.join().unwrap();
        // Alone: the whole budget.
        assert_eq!(a.update(10), 1024);
        // Two: what the other leaves, at least half.
        let c = other.join().unwrap();
        assert_eq!(c.update(900), 1014);
        assert_eq!(a.update(10), 512, "the other holds 900: an equal share");
        assert_eq!(c.update(900), 1014, "the other holds 10");
        assert_eq!(a.update(512), 512);
        assert_eq!(c.update(900), 512, "now over: back to an equal share");
        drop(c);
        assert_eq!(a.update(512), 1024, "alone again");
        // A slot claiming absurd figures counts as the budget, no more.
        let d = other.join().unwrap();
        assert_eq!(d.update(u64::MAX), 512);
        assert_eq!(a.update(1), 512);
    }

    #[test]
    fn what_is_not_a_budget_page_is_refused() {
        // SAFETY: a fresh memfd of zero length.
        let fd = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(SharedBudget::open(fd).is_err());
        assert!(SharedBudget::open(-1).is_err());
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
    }
}
