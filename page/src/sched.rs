//! How Mosaic's threads share the CPUs with the application's.
//!
//! A thread waiting for a peer's answer busy-polls for a while before it sleeps, because waking
//! a thread on an idle CPU costs 30-70 us. That is right while CPUs are idle, and wrong where a
//! CPU-bound thread wants the CPU (the normal state of an HPC node: one CPU-bound process per
//! core): polling takes the CPU from that thread, a yield gives it away for that thread's whole
//! time slice (1-3 ms) even if the answer comes at once, and a service thread woken from sleep
//! with the default slice may wait as long before it runs. Measured on 2 vCPUs with both kept
//! busy (BENCHMARKS.md, session 18): a DSM read miss took 4 ms instead of 17 us.
//!
//! A [`Poll`] watches for that: a poller that lost its CPU for a slice ([`LOST_CPU`]) notes the
//! CPU as contended for a while ([`CONTENDED_MIN`]..[`CONTENDED_MAX`]), and meanwhile
//! - a service thread ([`serves`]: a DSM node's connection threads and senders) takes a short
//!   time slice ([`SLICE_ENV`]; Linux 6.12's EEVDF scheduler lets a thread with a
//!   short slice preempt a CPU-bound one as soon as it wakes) and sleeps instead of polling;
//! - any other thread (the application's: a DSM fault waiting for its page, a barrier) polls
//!   without yielding: it could not preempt anyone once asleep.
//!
//! On an idle machine nothing changes: no poller loses its CPU, and service threads keep the
//! default slice (a short one makes the scheduler favour them over the application's pollers).

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The time slice, in microseconds, service threads take while their CPU is contended
/// (optional; 100 by default, the shortest the kernel accepts; `0` never changes their slice,
/// and they poll like any other thread).
pub const SLICE_ENV: &str = "MOSAIC_SERVICE_SLICE_US";

/// A gap this long between two looks of a polling thread means it lost its CPU to another
/// thread for a time slice (a CPU-bound one: the kernel's default slice is 0.7-3 ms, by the
/// CPUs), not for a moment (a service thread of ours handling a message takes 5-20 us).
pub const LOST_CPU: Duration = Duration::from_micros(500);

/// How long a thread that lost its CPU while polling behaves as on a contended CPU:
/// [`CONTENDED_MIN`] the first time, twice as long each time it loses its CPU again soon after,
/// up to [`CONTENDED_MAX`]. A lone gap (an interrupt, the hypervisor running another guest)
/// costs little; under a lasting load the thread tries its policy again, and loses a slice for
/// it, about every [`CONTENDED_MAX`].
pub const CONTENDED_MIN: Duration = Duration::from_millis(2);
/// See [`CONTENDED_MIN`].
pub const CONTENDED_MAX: Duration = Duration::from_millis(64);

thread_local! {
    /// Until when this thread behaves as on a contended CPU, and for how long that was set.
    static CONTENDED_UNTIL: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
    /// This thread is one of Mosaic's service threads ([`serves`]).
    static SERVES: Cell<bool> = const { Cell::new(false) };
    /// This thread has the short slice now.
    static SHORT_SLICE: Cell<bool> = const { Cell::new(false) };
}

/// The slice service threads take on a contended CPU: [`SLICE_ENV`], or 100 us; `None`: never.
fn short_slice() -> Option<Duration> {
    static SLICE: OnceLock<Option<Duration>> = OnceLock::new();
    *SLICE.get_or_init(|| {
        let us = match std::env::var(SLICE_ENV) {
            Ok(v) => v.trim().parse::<u64>().unwrap_or(100),
            Err(_) => 100,
        };
        (us > 0).then(|| Duration::from_micros(us.clamp(100, 100_000)))
    })
}

/// Marks the calling thread as one of Mosaic's service threads: one that sleeps between
/// requests and must answer each at once (see the module's documentation).
pub fn serves() {
    SERVES.with(|c| c.set(true));
}

/// A thread's busy-poll while it waits for a peer (see the module's documentation): call
/// [`alone`](Poll::alone) at every look (every few microseconds), and yield between looks only
/// where [`may_yield`](Poll::may_yield) says so.
#[derive(Debug)]
pub struct Poll {
    last: Instant,
    may_yield: bool,
}

impl Poll {
    /// Starts a poll; `None` for a service thread on a contended CPU (sleep at once: it is
    /// woken promptly).
    pub fn start() -> Option<Poll> {
        let now = Instant::now();
        let contended = CONTENDED_UNTIL.with(Cell::get).is_some_and(|(until, _)| now < until);
        if SHORT_SLICE.with(Cell::get) {
            if contended {
                return None;
            }
            // The contention is over: back to the default slice.
            if set_time_slice(None).is_ok() {
                SHORT_SLICE.with(|c| c.set(false));
            }
        }
        Some(Poll { last: now, may_yield: !contended })
    }

    /// Whether polling on is worth it, looked at `now`: `false` for a service thread that lost
    /// its CPU for [`LOST_CPU`] since its last look (it now has a short slice: sleep).
    #[must_use = "false means: stop polling"]
    pub fn alone(&mut self, now: Instant) -> bool {
        let gap = now.saturating_duration_since(self.last);
        self.last = now;
        if gap < LOST_CPU {
            return true;
        }
        contended();
        self.may_yield = false;
        !SHORT_SLICE.with(Cell::get)
    }

    /// Whether this poll may yield the CPU between looks (where the policy says to): not on a
    /// contended CPU.
    pub fn may_yield(&self) -> bool {
        self.may_yield
    }
}

/// Notes that the calling thread lost its CPU to a CPU-bound thread (see the module's
/// documentation); a service thread takes its short slice.
pub fn contended() {
    let now = Instant::now();
    CONTENDED_UNTIL.with(|c| {
        let period = match c.get() {
            // Again within as long again as the last period: twice as long.
            Some((until, last)) if now < until + last => (last * 2).min(CONTENDED_MAX),
            _ => CONTENDED_MIN,
        };
        c.set(Some((now + period, period)));
    });
    if SERVES.with(Cell::get) && !SHORT_SLICE.with(Cell::get) {
        if let Some(slice) = short_slice() {
            match set_time_slice(Some(slice)) {
                Ok(()) => SHORT_SLICE.with(|c| c.set(true)),
                // Before Linux 6.12: it polls on like any thread.
                Err(e) => log_once(&e),
            }
        }
    }
}

fn log_once(e: &io::Error) {
    static SAID: OnceLock<()> = OnceLock::new();
    SAID.get_or_init(|| eprintln!("mosaic: cannot shorten a service thread's time slice ({e}); it polls instead"));
}

/// `struct sched_attr` of `sched_setattr(2)`, up to `sched_period` (48 bytes, the first size
/// the kernel accepts).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// `size_of::<SchedAttr>()`, which the kernel reads as the structure's version.
const SCHED_ATTR_SIZE: u32 = 48;
const _: () = assert!(size_of::<SchedAttr>() == SCHED_ATTR_SIZE as usize);

/// Sets the calling thread's time slice under the normal policy (`SCHED_OTHER`), keeping its
/// nice value: `slice`, or the kernel's default with `None`. Needs no privilege; kernels before
/// 6.12 refuse a slice (EINVAL).
fn set_time_slice(slice: Option<Duration>) -> io::Result<()> {
    // SAFETY: getpriority(PRIO_PROCESS, 0) only reads the calling thread's nice value; errno
    // is cleared first because -1 is also a valid nice value.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    let attr = SchedAttr {
        size: SCHED_ATTR_SIZE,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: slice.map_or(0, |s| u64::try_from(s.as_nanos()).unwrap_or(u64::MAX)),
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads `attr.size` bytes from a valid, initialised SchedAttr; pid 0
    // is the calling thread; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls on a thread among more spinning threads than CPUs, which must lose its CPU for a
    /// slice of another's (0.7-3 ms) within a few of its own; bounded at 2 s. Returns whether
    /// the poll said to stop, whether it may still yield, and whether the next poll starts.
    fn poll_among_spinners(service: bool) -> (bool, bool, bool) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..cpus + 1)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let poller = std::thread::spawn(move || {
            if service {
                serves();
            }
            let mut poll = Poll::start().expect("a fresh thread was never contended");
            let until = Instant::now() + Duration::from_secs(2);
            let mut alone = true;
            while poll.may_yield() && Instant::now() < until {
                alone = poll.alone(Instant::now());
            }
            (!alone, poll.may_yield(), Poll::start().is_some())
        });
        let seen = poller.join().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        seen
    }

    /// Whether this kernel gives threads slices of their own (Linux 6.12 and later).
    fn kernel_has_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u32>().ok());
        (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 12)
    }

    #[test]
    fn a_service_thread_that_loses_its_cpu_while_polling_sleeps_instead() {
        let (stopped, may_yield, next_polls) = poll_among_spinners(true);
        assert!(!may_yield, "the poller never lost its CPU among more spinners than CPUs");
        if kernel_has_slices() {
            assert!(stopped, "a service thread must stop polling");
            assert!(!next_polls, "and its next waits sleep at once");
        }
    }

    #[test]
    fn an_application_thread_that_loses_its_cpu_polls_on_without_yielding() {
        let (stopped, may_yield, next_polls) = poll_among_spinners(false);
        assert!(!may_yield, "the poller never lost its CPU among more spinners than CPUs");
        assert!(!stopped, "an application's thread polls on");
        assert!(next_polls, "and its next waits poll too");
        let next_yields = std::thread::spawn(|| {
            contended();
            Poll::start().map(|p| p.may_yield())
        });
        assert_eq!(next_yields.join().unwrap(), Some(false), "without yielding");
    }

    #[test]
    fn contention_noted_again_soon_lasts_twice_as_long() {
        std::thread::spawn(|| {
            let period = || CONTENDED_UNTIL.with(Cell::get).map(|(_, p)| p);
            contended();
            assert_eq!(period(), Some(CONTENDED_MIN));
            contended();
            assert_eq!(period(), Some(CONTENDED_MIN * 2));
            for _ in 0..10 {
                contended();
            }
            assert_eq!(period(), Some(CONTENDED_MAX));
            // Long after the last period ended: back to the shortest.
            let long_ago = Instant::now().checked_sub(3 * CONTENDED_MAX);
            if let Some(t) = long_ago {
                CONTENDED_UNTIL.with(|c| c.set(Some((t, CONTENDED_MAX))));
                contended();
                assert_eq!(period(), Some(CONTENDED_MIN));
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_service_thread_takes_back_the_default_slice_when_the_contention_is_over() {
        std::thread::spawn(|| {
            serves();
            assert!(Poll::start().is_some_and(|p| p.may_yield()));
            contended();
            if !kernel_has_slices() {
                return;
            }
            assert!(SHORT_SLICE.with(Cell::get), "a contended service thread takes a short slice");
            // The periods set by hand: this test's thread may itself wait for a CPU (the other
            // tests spin), longer than CONTENDED_MIN.
            let set_until = |t: Instant| CONTENDED_UNTIL.with(|c| c.set(Some((t, CONTENDED_MIN))));
            set_until(Instant::now() + Duration::from_secs(60));
            assert!(Poll::start().is_none(), "and sleeps at once");
            set_until(Instant::now());
            assert!(Poll::start().is_some_and(|p| p.may_yield()), "then polls as before");
            assert!(!SHORT_SLICE.with(Cell::get), "with the default slice");
        })
        .join()
        .unwrap();
    }
}
