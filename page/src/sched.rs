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
//! On an idle machine with a CPU per polling thread nothing changes: no poller loses its CPU,
//! and service threads keep the default slice (a short one makes the scheduler favour them over
//! the application's pollers). Where Mosaic's own pollers outnumber the CPUs (4 DSM nodes on 2
//! CPUs) they take each other's CPU for slices too, and adapt the same way.
//! A service thread takes the default slice back at its first wait after the contention ended.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The time slice, in microseconds, service threads take while their CPU is contended
/// (optional; 100 by default, the shortest the kernel accepts; at most 100,000; a value that is
/// not a number counts as 100; `0` never changes their slice, and they poll like any other
/// thread).
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
    /// A poll notes what it sees in its thread's state: not to be moved to another thread.
    _this_thread: std::marker::PhantomData<*const ()>,
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
        Some(Poll { last: now, may_yield: !contended, _this_thread: std::marker::PhantomData })
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
        contended_at(now);
        self.may_yield = false;
        !SHORT_SLICE.with(Cell::get)
    }

    /// One look of a poll that lasts until `until`: whether to poll on. Looks first
    /// ([`alone`](Poll::alone)): a thread that lost its CPU has usually passed `until` too.
    #[must_use = "false means: stop polling"]
    pub fn on(&mut self, now: Instant, until: Instant) -> bool {
        self.alone(now) && now < until
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
    contended_at(Instant::now());
}

/// [`contended`], noted at `now`.
fn contended_at(now: Instant) {
    CONTENDED_UNTIL.with(|c| {
        let period = match c.get() {
            // Again within as long again as the last period: twice as long.
            Some((until, last)) if now < until + last => (last * 2).min(CONTENDED_MAX),
            _ => CONTENDED_MIN,
        };
        c.set(Some((now + period, period)));
    });
    if SERVES.with(Cell::get) && !SHORT_SLICE.with(Cell::get) && !NO_SLICES.load(Ordering::Relaxed) {
        if let Some(slice) = short_slice() {
            match set_time_slice(Some(slice)) {
                Ok(()) => SHORT_SLICE.with(|c| c.set(true)),
                // Before Linux 6.12, or a real-time, batch or idle thread: it polls on like any
                // thread. The kernel's answer holds for every thread: not asked again.
                Err(e) => {
                    if e.kind() == io::ErrorKind::Unsupported && !NO_SLICES.swap(true, Ordering::Relaxed) {
                        log::info!("service threads get no time slice of their own ({e}): they poll instead");
                    }
                }
            }
        }
    }
}

/// Set once the kernel refused a service thread a slice because it keeps none per thread.
static NO_SLICES: AtomicBool = AtomicBool::new(false);

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

/// `SCHED_FLAG_KEEP_POLICY`: keep the thread's scheduling policy (a real-time thread is then
/// refused a slice, EINVAL, instead of being turned into a normal one).
const SCHED_FLAG_KEEP_POLICY: u64 = 0x08;

/// Sets the calling thread's time slice, keeping its policy and nice value: `slice`, or the
/// kernel's default with `None`. Needs no privilege. Kernels before 6.12 accept the call and
/// ignore the slice, so the slice is read back: a slice not taken is an error (`Unsupported`).
fn set_time_slice(slice: Option<Duration>) -> io::Result<()> {
    // SAFETY: getpriority(PRIO_PROCESS, 0) only reads the calling thread's nice value; errno is
    // cleared first and read after, because -1 is also a valid nice value.
    let (nice, errno) = unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        (nice, *libc::__errno_location())
    };
    if nice == -1 && errno != 0 {
        return Err(io::Error::from_raw_os_error(errno));
    }
    let wanted = slice.map_or(0, |s| u64::try_from(s.as_nanos()).unwrap_or(u64::MAX));
    let attr = SchedAttr {
        size: SCHED_ATTR_SIZE,
        sched_flags: SCHED_FLAG_KEEP_POLICY,
        sched_nice: nice,
        sched_runtime: wanted,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads `attr.size` bytes from a valid, initialised SchedAttr; pid 0
    // is the calling thread; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if slice.is_none() {
        return Ok(());
    }
    // Linux 6.12 and later report a normal thread's slice in `sched_runtime`; earlier kernels 0.
    let mut now = SchedAttr::default();
    // SAFETY: sched_getattr writes at most `SCHED_ATTR_SIZE` bytes (the size passed) into the
    // valid, writable SchedAttr; pid 0 is the calling thread; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &raw mut now, SCHED_ATTR_SIZE, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel clamps a slice to 0.1-100 ms: taken if it is what the kernel keeps now. Only a
    // SCHED_OTHER thread preempts others when it wakes (SCHED_BATCH and SCHED_IDLE threads do
    // not, whatever their slice). (Under a sched_ext scheduler slices mean what it says.)
    if now.sched_policy != libc::SCHED_OTHER as u32 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a batch or idle thread does not preempt when it wakes",
        ));
    }
    if now.sched_runtime == wanted.clamp(100_000, 100_000_000) {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this kernel keeps no time slice per thread (Linux 6.12 does)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// CPU-bound threads, one more than the CPUs, stopped when dropped (a failed assertion
    /// included).
    struct Spinners {
        stop: Arc<AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Spinners {
        fn start() -> Spinners {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let stop = Arc::new(AtomicBool::new(false));
            let threads = (0..=cpus)
                .map(|_| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                    })
                })
                .collect();
            Spinners { stop, threads }
        }
    }

    impl Drop for Spinners {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// Polls on a thread among more CPU-bound threads than CPUs, until the poll sees its thread
    /// lose the CPU for a slice of another's (0.7-3 ms; the scheduler must give them their turn
    /// within a few of the poller's own); bounded at 10 s. Returns whether the poll said to
    /// stop, and whether it may still yield.
    fn poll_among_spinners(service: bool) -> (bool, bool) {
        let _spinners = Spinners::start();
        std::thread::spawn(move || {
            if service {
                serves();
            }
            let mut poll = Poll::start().expect("a fresh thread was never contended");
            let until = Instant::now() + Duration::from_secs(10);
            let mut alone = true;
            while poll.may_yield() && Instant::now() < until {
                alone = poll.alone(Instant::now());
            }
            (!alone, poll.may_yield())
        })
        .join()
        .unwrap()
    }

    /// Whether this thread can take a time slice of its own here (Linux 6.12 and later, and
    /// slices not turned off by `MOSAIC_SERVICE_SLICE_US=0`).
    fn slices_here() -> bool {
        short_slice().is_some() && set_time_slice(Some(Duration::from_micros(100))).is_ok()
    }

    #[test]
    fn a_service_thread_that_loses_its_cpu_while_polling_sleeps_instead() {
        let (stopped, may_yield) = poll_among_spinners(true);
        assert!(!may_yield, "the poller never lost its CPU among more CPU-bound threads than CPUs");
        assert_eq!(stopped, std::thread::spawn(slices_here).join().unwrap(), "it sleeps where it gets a short slice");
    }

    #[test]
    fn an_application_thread_that_loses_its_cpu_polls_on_without_yielding() {
        let (stopped, may_yield) = poll_among_spinners(false);
        assert!(!may_yield, "the poller never lost its CPU among more CPU-bound threads than CPUs");
        assert!(!stopped, "an application's thread polls on");
    }

    #[test]
    fn on_a_contended_cpu_an_application_thread_polls_without_yielding() {
        std::thread::spawn(|| {
            assert!(Poll::start().is_some_and(|p| p.may_yield()));
            CONTENDED_UNTIL.with(|c| c.set(Some((Instant::now() + Duration::from_secs(60), CONTENDED_MIN))));
            assert!(Poll::start().is_some_and(|p| !p.may_yield()), "it polls, without yielding");
            CONTENDED_UNTIL.with(|c| c.set(Some((Instant::now(), CONTENDED_MIN))));
            assert!(Poll::start().is_some_and(|p| p.may_yield()), "then as before");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn contention_noted_again_soon_lasts_twice_as_long() {
        std::thread::spawn(|| {
            let period = || CONTENDED_UNTIL.with(Cell::get).map(|(_, p)| p);
            let t0 = Instant::now();
            contended_at(t0);
            assert_eq!(period(), Some(CONTENDED_MIN));
            // Within the period, or within as long again after it: twice as long.
            contended_at(t0 + CONTENDED_MIN / 2);
            assert_eq!(period(), Some(CONTENDED_MIN * 2));
            contended_at(t0 + CONTENDED_MIN / 2 + CONTENDED_MIN * 3);
            assert_eq!(period(), Some(CONTENDED_MIN * 4));
            for _ in 0..10 {
                contended_at(t0 + CONTENDED_MIN * 4);
            }
            assert_eq!(period(), Some(CONTENDED_MAX));
            // Long after the last period ended: back to the shortest.
            contended_at(t0 + CONTENDED_MAX * 4);
            assert_eq!(period(), Some(CONTENDED_MIN));
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
            if !slices_here() {
                assert!(!SHORT_SLICE.with(Cell::get));
                CONTENDED_UNTIL.with(|c| c.set(Some((Instant::now() + Duration::from_secs(60), CONTENDED_MIN))));
                assert!(Poll::start().is_some_and(|p| !p.may_yield()), "without a slice it polls");
                return;
            }
            assert!(SHORT_SLICE.with(Cell::get), "a contended service thread takes a short slice");
            // The periods set by hand: this thread may itself wait for a CPU longer than one.
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

    #[test]
    fn a_batch_thread_keeps_its_policy_and_gets_no_slice() {
        // Any user may make its own thread a batch one.
        let (result, policy) = std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sets the calling thread's policy from a valid sched_param.
            assert_eq!(unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) }, 0);
            let result = set_time_slice(Some(Duration::from_micros(100))).map_err(|e| e.kind());
            // SAFETY: reads the calling thread's policy.
            (result, unsafe { libc::sched_getscheduler(0) })
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_BATCH, "the thread stays a batch one");
        assert_eq!(result, Err(io::ErrorKind::Unsupported), "and is refused a slice (it would not preempt)");
    }

    #[test]
    fn a_slice_counts_as_taken_only_where_the_kernel_keeps_it() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u32>().ok());
        let version = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        let taken = std::thread::spawn(|| set_time_slice(Some(Duration::from_micros(200))).map_err(|e| e.kind()))
            .join()
            .unwrap();
        if version < (6, 12) {
            assert_eq!(taken, Err(io::ErrorKind::Unsupported), "Linux {release} keeps no slice per thread");
        } else {
            assert_eq!(taken, Ok(()), "Linux {release} keeps a slice per thread");
        }
    }

    #[test]
    fn a_real_time_thread_keeps_its_policy() {
        // SCHED_FIFO needs privilege; where it cannot be had there is nothing to check.
        let kept = std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: sets the calling thread's policy from a valid sched_param.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                return None;
            }
            let refused = set_time_slice(Some(Duration::from_micros(100))).is_err();
            // SAFETY: reads the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            Some((refused, policy))
        })
        .join()
        .unwrap();
        if let Some((refused, policy)) = kept {
            assert!(refused, "a real-time thread is refused a slice");
            assert_eq!(policy, libc::SCHED_FIFO, "and stays real-time");
        }
    }
}
