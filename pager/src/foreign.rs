//! A userfaultfd of another process: what a whole process's post-copy migration serves faults
//! with. The process being rebuilt opens it ([`ForeignUffd::open`]), registers its ranges itself
//! (with the request [`ForeignUffd::register_request`] describes) and hands the descriptor over;
//! the agent that holds it installs pages in that process's memory ([`ForeignUffd::copy`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::uffd::{
    feature, RawMsg, UffdOps, Userfaultfd, EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP,
    NEED_RANGE_IOCTLS, REGISTER_MODE_MISSING, UFFDIO_REGISTER_NR,
};

/// What the process did that the holder must know of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread touched the missing page at this (page-aligned) address and waits for it.
    Fault(u64),
    /// `mremap` moved `len` bytes from `from` to `to` (their missing pages with them).
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Bytes moved.
        len: u64,
    },
    /// `[start, end)` was discarded (`MADV_DONTNEED`, `MADV_REMOVE`): it reads zeros now.
    Remove {
        /// First byte.
        start: u64,
        /// Past the last.
        end: u64,
    },
    /// The process forked: the child's userfaultfd (a descriptor number, now the holder's to
    /// close), whose ranges are the parent's as they were. Pages not installed in the parent
    /// are missing in the child too.
    Fork(i32),
    /// `[start, end)` was unmapped.
    Unmap {
        /// First byte.
        start: u64,
        /// Past the last.
        end: u64,
    },
}

/// A userfaultfd whose ranges belong to another process (or to this one).
#[derive(Debug)]
pub struct ForeignUffd {
    uffd: Userfaultfd,
}

/// How installing pages went.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// The pages are there (or were there already: a page the process faulted in another way).
    Done,
    /// Some of the range is no longer mapped in that process (it unmapped it): those pages
    /// were skipped, the others installed.
    Gone,
    /// The process is changing its mappings and an event about it waits to be read: the first
    /// `done` bytes are installed; read the events, then try the rest again.
    Again {
        /// Bytes installed before it stopped.
        done: u64,
    },
}

impl ForeignUffd {
    /// Opens a userfaultfd for this process's memory, with `UFFDIO_POISON` if the kernel has it
    /// (so pages that can no longer come can fail loudly).
    /// Asks for the events that move or drop missing pages (`mremap`, `MADV_DONTNEED`,
    /// `munmap`) or copy them (`fork`), which the holder must follow: [`Event`].
    pub fn open() -> io::Result<ForeignUffd> {
        let need = feature::EVENT_REMAP | feature::EVENT_REMOVE | feature::EVENT_UNMAP | feature::EVENT_FORK;
        let have = Userfaultfd::available_features()?;
        if have & need != need {
            return Err(io::Error::other("this kernel's userfaultfd lacks the remap/remove/unmap events"));
        }
        if have & feature::POISON == 0 {
            // Without it, pages that can no longer come could only be left to read as zeros.
            return Err(io::Error::other("this kernel's userfaultfd lacks UFFDIO_POISON (Linux 6.6 or newer)"));
        }
        let wanted = feature::POISON | need;
        Ok(ForeignUffd { uffd: Userfaultfd::open(wanted)? })
    }

    /// Adopts a descriptor received from the process it belongs to.
    pub fn from_fd(fd: OwnedFd) -> ForeignUffd {
        // The features were negotiated by the opener ([`ForeignUffd::open`]).
        ForeignUffd { uffd: Userfaultfd::from_fd(fd, feature::POISON) }
    }

    /// The descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.uffd.raw_fd()
    }

    /// The `ioctl` request number that registers a range, and the 32-byte argument that
    /// registers `[start, start + len)` for missing-page faults: for a restorer that issues the
    /// call itself, with nothing but system calls left to it.
    pub fn register_request(start: u64, len: u64) -> (u64, [u64; 4]) {
        (UFFDIO_REGISTER_NR, [start, len, REGISTER_MODE_MISSING, 0])
    }

    /// The range ioctls a registration must grant (the last word of the argument after the call).
    pub const NEEDED_IOCTLS: u64 = NEED_RANGE_IOCTLS;

    /// Registers `[start, start + len)` of this process (the opener) for missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        self.uffd.register(start, len, REGISTER_MODE_MISSING).map(|_| ())
    }

    /// Waits up to `timeout` for events and appends them to `out`. Returns how many were
    /// added; 0 on timeout. A process waits in `mremap`, `madvise` or `munmap` until its event
    /// is read.
    pub fn read_events(&self, timeout: Duration, out: &mut Vec<Event>) -> io::Result<usize> {
        let mut p = libc::pollfd { fd: self.raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd.
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll on one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        if rc == 0 {
            return Ok(0);
        }
        if p.revents & (libc::POLLERR | libc::POLLHUP) != 0 && p.revents & libc::POLLIN == 0 {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let mut msgs = [RawMsg::default(); 32];
        let n = self.uffd.read_msgs(&mut msgs)?;
        let before = out.len();
        for m in &msgs[..n] {
            let a = m.arg;
            out.push(match m.event {
                EVENT_PAGEFAULT => Event::Fault(a[1] & !(crate::PAGE_SIZE as u64 - 1)),
                EVENT_REMAP => Event::Remap { from: a[0], to: a[1], len: a[2] },
                EVENT_REMOVE => Event::Remove { start: a[0], end: a[1] },
                EVENT_UNMAP => Event::Unmap { start: a[0], end: a[1] },
                EVENT_FORK => Event::Fork(i32::try_from(a[0]).unwrap_or(-1)),
                _ => continue,
            });
        }
        Ok(out.len() - before)
    }

    /// Copies `src` (whole pages) to the missing pages at `dst` and wakes what waits on them.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<Installed> {
        self.install(dst, src.len() as u64, |at, done, len| {
            self.uffd.copy(at, src.as_ptr() as u64 + done, len, false, false)
        })
    }

    /// Maps zero pages at the missing pages `[dst, dst + len)`.
    pub fn zero(&self, dst: u64, len: u64) -> io::Result<Installed> {
        self.install(dst, len, |at, _, len| self.uffd.zeropage(at, len, false))
    }

    /// Wakes the threads waiting on faults in `[start, start + len)`: they fault again (and
    /// are served afresh) if their page is still missing.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        self.uffd.wake(start, len)
    }

    /// Poisons the missing pages `[dst, dst + len)`: an access raises SIGBUS.
    pub fn poison(&self, dst: u64, len: u64) -> io::Result<Installed> {
        self.install(dst, len, |at, _, len| self.uffd.poison(at, len))
    }

    /// Runs an install ioctl over `[dst, dst + len)` to the end, page by page past a page that
    /// is there already, or where the range turns out to cross mappings (the process split one
    /// with `mprotect` or `madvise`: the kernel refuses such a range whole, `ENOENT`); stops at
    /// `EAGAIN` (an event to read first). Pages no longer mapped are skipped ([`Installed::Gone`]).
    fn install(&self, dst: u64, len: u64, op: impl Fn(u64, u64, u64) -> crate::uffd::Partial) -> io::Result<Installed> {
        let page = crate::PAGE_SIZE as u64;
        let mut done = 0;
        let mut gone = false;
        // After a refusal of a whole range, one page at a time.
        let mut one_by_one = false;
        while done < len {
            let n = if one_by_one { page } else { len - done };
            let p = op(dst + done, done, n);
            done += p.done;
            match p.errno {
                0 => {}
                libc::EEXIST => done += page,
                libc::EAGAIN => return Ok(Installed::Again { done }),
                libc::ENOENT | libc::ESRCH if !one_by_one && len - done > page => one_by_one = true,
                libc::ENOENT | libc::ESRCH => {
                    gone = true;
                    done += page;
                }
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
        Ok(if gone { Installed::Gone } else { Installed::Done })
    }
}

impl AsRawFd for ForeignUffd {
    fn as_raw_fd(&self) -> RawFd {
        self.raw_fd()
    }
}

impl From<ForeignUffd> for OwnedFd {
    fn from(f: ForeignUffd) -> OwnedFd {
        f.uffd.into_fd()
    }
}
