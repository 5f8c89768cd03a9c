//! Fault worker threads: read the userfaultfd's messages and serve them.
//!
//! An idle worker busy-polls the descriptor for a bounded time (a cross-core wake-up of a
//! sleeping worker costs 30-70 us on the machines this was built on), then sleeps in `poll(2)` on
//! the descriptor and a stop eventfd.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::region_core::{RegionCore, Served};
use crate::uffd::{self, RawMsg, UffdOps};
use crate::Retry;

/// Messages read per `read(2)`.
const BATCH: usize = 16;

/// The running workers of one region.
#[derive(Debug)]
pub(crate) struct Workers {
    stop: Arc<AtomicBool>,
    stop_fd: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` workers; with `pin`, worker `i` runs only on CPU `pin[i]`.
    pub(crate) fn start(core: &Arc<RegionCore>, n: usize, spin: Duration, pin: &[usize]) -> io::Result<Workers> {
        // SAFETY: eventfd returns a new descriptor that we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let stop_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut w = Workers { stop: Arc::new(AtomicBool::new(false)), stop_fd, threads: Vec::new() };
        let running = Arc::new(AtomicUsize::new(0));
        for i in 0..n {
            let (core, stop, stop_fd, running) = (core.clone(), w.stop.clone(), w.stop_fd.clone(), running.clone());
            let cpu = pin.get(i).copied();
            let t = std::thread::Builder::new().name(format!("mosaic-fault-{i}")).spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                running.fetch_add(1, Ordering::Release);
                run(&core, &stop, &stop_fd, spin);
            });
            match t {
                Ok(t) => w.threads.push(t),
                Err(e) => {
                    w.stop();
                    return Err(e);
                }
            }
        }
        serve_until_running(core, &running, n);
        Ok(w)
    }

    /// Stops and joins every worker.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        let _ = unsafe { libc::write(self.stop_fd.as_raw_fd(), (&raw const one).cast(), 8) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How long the starting thread serves faults while it waits for its workers to run.
const START_WAIT: Duration = Duration::from_secs(10);

/// Serves the region's faults on the calling thread until all `n` workers run.
///
/// A new thread can need a page of the region before it runs a line of its own: glibc reads the
/// program's global locale when any thread starts, and under the `LD_PRELOAD` shim that may lie
/// in the region; in a forked child such a page may be on the servers, and the only threads
/// that could bring it back are the ones waiting for it. Messages still deferred when the
/// workers run are not kept here: their threads are woken, fault again, and a worker serves
/// them.
fn serve_until_running(core: &RegionCore, running: &AtomicUsize, n: usize) {
    let until = Instant::now() + START_WAIT;
    let mut msgs = [RawMsg::default(); BATCH];
    let (mut backlog, mut deferred) = (VecDeque::new(), Vec::new());
    while running.load(Ordering::Acquire) < n && Instant::now() < until {
        let got = core.uffd().read_msgs(&mut msgs).unwrap_or(0);
        for m in msgs[..got].iter().copied().chain(std::mem::take(&mut backlog)) {
            serve_or_defer(core, m, None, &mut backlog, &mut deferred);
        }
        for d in std::mem::take(&mut deferred) {
            serve_or_defer(core, d.msg, Some(d.since), &mut backlog, &mut deferred);
        }
        if got == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    for m in backlog.into_iter().chain(deferred.into_iter().map(|d| d.msg)) {
        if m.event == uffd::EVENT_PAGEFAULT {
            let page = m.arg[1] & !(crate::PAGE_SIZE as u64 - 1);
            let _ = core.uffd().wake(page, crate::PAGE_SIZE as u64);
        }
    }
}

/// Restricts the calling thread to `cpu` (best effort: a failure leaves it unpinned).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity(0, ...) act on
    // that local set and the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::debug!("cannot pin a fault worker to CPU {cpu}: {}", io::Error::last_os_error());
        }
    }
}

/// The CPUs this process may run on.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set we pass; CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize).filter(|c| libc::CPU_ISSET(*c, &set)).collect()
    }
}

/// A fault the source was busy with, kept for later, and since when.
struct Deferred {
    msg: RawMsg,
    since: Instant,
}

/// How often deferred faults are asked about again once nothing else is pending.
const RETRY_PAUSE: Duration = Duration::from_micros(20);

fn run(core: &RegionCore, stop: &AtomicBool, stop_fd: &OwnedFd, spin: Duration) {
    let mut msgs = [RawMsg::default(); BATCH];
    let mut backlog: VecDeque<RawMsg> = VecDeque::new();
    let mut deferred: Vec<Deferred> = Vec::new();
    let mut idle_since: Option<Instant> = None;
    loop {
        if let Some(m) = backlog.pop_front() {
            serve_or_defer(core, m, None, &mut backlog, &mut deferred);
            continue;
        }
        let n = match core.uffd().read_msgs(&mut msgs) {
            Ok(n) => n,
            Err(e) => {
                log::error!("region {}: reading fault messages failed, worker stops: {e}", core.name());
                return;
            }
        };
        for m in &msgs[..n] {
            serve_or_defer(core, *m, None, &mut backlog, &mut deferred);
        }
        if !deferred.is_empty() {
            if stop.load(Ordering::Acquire) {
                return; // closing the descriptor wakes their threads
            }
            // Ask again about every deferred fault: a new message came, or, when none did,
            // after a short pause (their pages are busy with work that takes a while).
            if n == 0 {
                std::thread::sleep(RETRY_PAUSE);
            }
            for d in std::mem::take(&mut deferred) {
                serve_or_defer(core, d.msg, Some(d.since), &mut backlog, &mut deferred);
            }
            idle_since = None;
            continue;
        }
        if n > 0 {
            idle_since = None;
            continue;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        let idle = *idle_since.get_or_insert_with(Instant::now);
        if idle.elapsed() < spin {
            std::hint::spin_loop();
            continue;
        }
        let mut fds = [
            libc::pollfd { fd: core.uffd().as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        idle_since = None;
    }
}

/// Serves one message, or keeps it in `deferred` if the source is busy with its page (`since`:
/// when it was first deferred).
fn serve_or_defer(
    core: &RegionCore,
    m: RawMsg,
    since: Option<Instant>,
    backlog: &mut VecDeque<RawMsg>,
    deferred: &mut Vec<Deferred>,
) {
    let retry = Retry { can_defer: true, waited: since.map(|t| t.elapsed()).unwrap_or_default() };
    if handle(core, &m, retry, backlog) == Served::Busy {
        deferred.push(Deferred { msg: m, since: since.unwrap_or_else(Instant::now) });
    }
}

fn handle(core: &RegionCore, m: &RawMsg, retry: Retry, backlog: &mut VecDeque<RawMsg>) -> Served {
    if m.event != uffd::EVENT_PAGEFAULT {
        core.handle_event(m);
        return Served::Done;
    }
    let (flags, addr) = (m.arg[0], m.arg[1]);
    if flags & uffd::PAGEFAULT_FLAG_WP != 0 {
        return core.serve_write_fault(addr, true, retry);
    }
    let write = flags & uffd::PAGEFAULT_FLAG_WRITE != 0;
    // The faulting thread's id, where the kernel reports it (UFFD_FEATURE_THREAD_ID).
    let tid = i32::try_from(m.arg[2] & 0xffff_ffff).ok().filter(|t| *t > 0);
    let mut on_again = || read_events(core, backlog);
    core.serve_fault(addr, write, true, tid, retry, &mut on_again)
}

/// While an install waits for the address space to settle: read pending messages, handle the
/// events among them now (they are what it waits for), keep the faults for later.
fn read_events(core: &RegionCore, backlog: &mut VecDeque<RawMsg>) {
    let mut msgs = [RawMsg::default(); BATCH];
    if let Ok(n) = core.uffd().read_msgs(&mut msgs) {
        for m in &msgs[..n] {
            if m.event == uffd::EVENT_PAGEFAULT {
                backlog.push_back(*m);
            } else {
                core.handle_event(m);
            }
        }
    }
}
