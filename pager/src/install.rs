//! Installing pages into a registered range, with every way the kernel can stop part-way.
//!
//! `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_MOVE` and `UFFDIO_POISON` each handle a range of
//! pages and may stop early:
//! - a *partial* result: some bytes done, then an error: continue after them;
//! - `EEXIST`: the next page is already present (another thread installed it first, or it was
//!   never dropped): skip that one page, count it as present, continue;
//! - `EAGAIN`: the address space is changing (an mremap, fork or unmap event is waiting to be
//!   read): let the caller read its events, then retry, a bounded number of times;
//! - `ENOENT` / `ESRCH`: the range is no longer registered or the process is exiting: stop, the
//!   region is gone;
//! - anything else is an error with the kernel's errno.
//!
//! This logic is written against [`UffdOps`] so the tests below drive every path with a fake.

use std::io;
use std::time::{Duration, Instant};

use crate::uffd::{Partial, UffdOps};
use crate::PAGE_SIZE;

/// What to put into the missing pages.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fill {
    /// Copy from `src` (same length as the destination), write-protected if `wp`.
    Copy { src: u64, wp: bool },
    /// Map the shared zero page.
    Zero,
    /// Move the pages at `src` (emptying them).
    Move { src: u64 },
    /// Poison: every access raises SIGBUS.
    Poison,
}

/// What an install did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Installed {
    /// Pages this call filled.
    pub(crate) new: u64,
    /// Pages that were already present and left as they were.
    pub(crate) present: u64,
}

/// Why an install failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InstallError {
    /// The range is no longer registered, or the process is exiting.
    #[error("the range is no longer registered (the region was unmapped or the process is exiting)")]
    Gone,
    /// The address space kept changing for longer than the retry budget.
    #[error("the address space kept changing (EAGAIN) for {0:?}")]
    Busy(Duration),
    /// Any other kernel error.
    #[error("{op} failed: {err}")]
    Os {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        err: io::Error,
    },
}

/// How long an install retries `EAGAIN` before giving up.
const AGAIN_BUDGET: Duration = Duration::from_secs(5);

/// Fills the missing pages of `[dst, dst + len)` with `fill`, continuing past partial results
/// and already-present pages. `on_again` runs before each retry after `EAGAIN`; it must let the
/// pending address-space events be read (it is how a lone fault worker avoids waiting on itself).
/// Waiters are woken unless `dont_wake`, in which case the caller wakes the range.
pub(crate) fn install(
    ops: &dyn UffdOps,
    dst: u64,
    len: u64,
    fill: Fill,
    dont_wake: bool,
    on_again: &mut dyn FnMut(),
) -> Result<Installed, InstallError> {
    debug_assert!(dst % PAGE_SIZE as u64 == 0 && len % PAGE_SIZE as u64 == 0);
    let page = PAGE_SIZE as u64;
    let mut out = Installed::default();
    let mut off = 0u64;
    let mut again_since: Option<Instant> = None;
    while off < len {
        let (d, n) = (dst + off, len - off);
        let r: Partial = match fill {
            Fill::Copy { src, wp } => ops.copy(d, src + off, n, wp, dont_wake),
            Fill::Zero => ops.zeropage(d, n, dont_wake),
            Fill::Move { src } => ops.move_pages(d, src + off, n, dont_wake),
            Fill::Poison => ops.poison(d, n),
        };
        // Whole pages only: the kernel never reports a fraction, but do not trust a bad value.
        let done = (r.done / page * page).min(n);
        out.new += done / page;
        off += done;
        match r.errno {
            0 if off >= len => break,
            0 => {} // a short success: carry on with the rest
            libc::EEXIST => {
                out.present += 1;
                if !dont_wake {
                    // Whoever installed it woke its waiters; a waiter that queued since then
                    // must not sleep forever.
                    let _ = ops.wake(dst + off, page);
                }
                off += page;
            }
            libc::EAGAIN => {
                if done > 0 {
                    again_since = None;
                }
                let since = *again_since.get_or_insert_with(Instant::now);
                if since.elapsed() > AGAIN_BUDGET {
                    return Err(InstallError::Busy(AGAIN_BUDGET));
                }
                on_again();
                std::thread::yield_now();
            }
            libc::ENOENT | libc::ESRCH => return Err(InstallError::Gone),
            e => return Err(InstallError::Os { op: fill.op_name(), err: io::Error::from_raw_os_error(e) }),
        }
    }
    Ok(out)
}

impl Fill {
    fn op_name(self) -> &'static str {
        match self {
            Fill::Copy { .. } => "UFFDIO_COPY",
            Fill::Zero => "UFFDIO_ZEROPAGE",
            Fill::Move { .. } => "UFFDIO_MOVE",
            Fill::Poison => "UFFDIO_POISON",
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake userfaultfd: a set of present pages, and a script of failures to inject.

    use std::collections::{BTreeSet, VecDeque};
    use std::io;
    use std::sync::Mutex;

    use crate::uffd::{Partial, UffdOps};
    use crate::PAGE_SIZE;

    /// One injected outcome for the next install call.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Inject {
        /// Do this many pages, then fail with `errno` (0: report a short success).
        Stop { pages: u64, errno: i32 },
    }

    #[derive(Default)]
    pub(crate) struct FakeUffd {
        pub(crate) present: Mutex<BTreeSet<u64>>,
        pub(crate) script: Mutex<VecDeque<Inject>>,
        pub(crate) calls: Mutex<Vec<(&'static str, u64, u64)>>,
        pub(crate) wakes: Mutex<Vec<(u64, u64)>>,
    }

    impl FakeUffd {
        pub(crate) fn with_present(pages: &[u64]) -> FakeUffd {
            let f = FakeUffd::default();
            f.present.lock().unwrap().extend(pages.iter().map(|p| p * PAGE_SIZE as u64));
            f
        }

        pub(crate) fn inject(&self, i: Inject) {
            self.script.lock().unwrap().push_back(i);
        }

        fn fill(&self, op: &'static str, dst: u64, len: u64) -> Partial {
            self.calls.lock().unwrap().push((op, dst, len));
            let page = PAGE_SIZE as u64;
            let limit =
                self.script.lock().unwrap().pop_front().map(|Inject::Stop { pages, errno }| (pages * page, errno));
            let mut present = self.present.lock().unwrap();
            let mut done = 0;
            while done < len {
                if let Some((max, errno)) = limit {
                    if done >= max {
                        return Partial { done, errno };
                    }
                }
                if present.contains(&(dst + done)) {
                    return Partial { done, errno: libc::EEXIST };
                }
                present.insert(dst + done);
                done += page;
            }
            Partial { done, errno: 0 }
        }
    }

    impl UffdOps for FakeUffd {
        fn copy(&self, dst: u64, _src: u64, len: u64, _wp: bool, _dont_wake: bool) -> Partial {
            self.fill("copy", dst, len)
        }
        fn zeropage(&self, dst: u64, len: u64, _dont_wake: bool) -> Partial {
            self.fill("zeropage", dst, len)
        }
        fn move_pages(&self, dst: u64, _src: u64, len: u64, _dont_wake: bool) -> Partial {
            self.fill("move", dst, len)
        }
        fn poison(&self, dst: u64, len: u64) -> Partial {
            self.fill("poison", dst, len)
        }
        fn wake(&self, start: u64, len: u64) -> io::Result<()> {
            self.wakes.lock().unwrap().push((start, len));
            Ok(())
        }
        fn write_protect(&self, _start: u64, _len: u64, _protect: bool) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeUffd, Inject};
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    fn run(f: &FakeUffd, first: u64, pages: u64) -> Result<Installed, InstallError> {
        install(f, first * P, pages * P, Fill::Copy { src: 1 << 40, wp: false }, false, &mut || {})
    }

    #[test]
    fn installs_everything_in_one_call() {
        let f = FakeUffd::default();
        assert_eq!(run(&f, 0, 8).unwrap(), Installed { new: 8, present: 0 });
        assert_eq!(f.calls.lock().unwrap().len(), 1);
        assert!(f.wakes.lock().unwrap().is_empty());
    }

    #[test]
    fn eexist_skips_the_present_page_wakes_it_and_continues() {
        let f = FakeUffd::with_present(&[2, 5]);
        assert_eq!(run(&f, 0, 8).unwrap(), Installed { new: 6, present: 2 });
        // Calls: [0,8) stops at 2; [3,8) stops at 5; [6,8) finishes.
        let calls: Vec<_> = f.calls.lock().unwrap().iter().map(|c| (c.1 / P, c.2 / P)).collect();
        assert_eq!(calls, vec![(0, 8), (3, 5), (6, 2)]);
        assert_eq!(*f.wakes.lock().unwrap(), vec![(2 * P, P), (5 * P, P)]);
        assert_eq!(f.present.lock().unwrap().len(), 8);
    }

    #[test]
    fn eexist_with_dont_wake_leaves_waking_to_the_caller() {
        let f = FakeUffd::with_present(&[0]);
        let r = install(&f, 0, 2 * P, Fill::Zero, true, &mut || {}).unwrap();
        assert_eq!(r, Installed { new: 1, present: 1 });
        assert!(f.wakes.lock().unwrap().is_empty());
    }

    #[test]
    fn partial_copy_then_eagain_retries_the_rest_after_reading_events() {
        let f = FakeUffd::default();
        f.inject(Inject::Stop { pages: 3, errno: libc::EAGAIN });
        f.inject(Inject::Stop { pages: 0, errno: libc::EAGAIN });
        let mut events_read = 0;
        let r = install(&f, 0, 8 * P, Fill::Zero, false, &mut || events_read += 1).unwrap();
        assert_eq!(r, Installed { new: 8, present: 0 });
        assert_eq!(events_read, 2, "each EAGAIN lets the caller read events first");
        let calls: Vec<_> = f.calls.lock().unwrap().iter().map(|c| (c.1 / P, c.2 / P)).collect();
        assert_eq!(calls, vec![(0, 8), (3, 5), (3, 5)]);
    }

    #[test]
    fn a_short_success_continues() {
        let f = FakeUffd::default();
        f.inject(Inject::Stop { pages: 1, errno: 0 });
        assert_eq!(run(&f, 0, 4).unwrap(), Installed { new: 4, present: 0 });
    }

    #[test]
    fn enoent_and_esrch_mean_the_region_is_gone() {
        for errno in [libc::ENOENT, libc::ESRCH] {
            let f = FakeUffd::default();
            f.inject(Inject::Stop { pages: 2, errno });
            assert!(matches!(run(&f, 0, 4), Err(InstallError::Gone)));
        }
    }

    #[test]
    fn other_errors_carry_the_errno_and_the_operation() {
        let f = FakeUffd::default();
        f.inject(Inject::Stop { pages: 0, errno: libc::ENOMEM });
        match install(&f, 0, P, Fill::Poison, false, &mut || {}) {
            Err(InstallError::Os { op, err }) => {
                assert_eq!(op, "UFFDIO_POISON");
                assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn every_page_already_present_installs_nothing() {
        let f = FakeUffd::with_present(&[0, 1, 2]);
        assert_eq!(run(&f, 0, 3).unwrap(), Installed { new: 0, present: 3 });
    }
}
