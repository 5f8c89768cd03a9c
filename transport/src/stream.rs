//! The byte-stream abstraction that tcp, shm and sim implement, and the wait policy.
//!
//! Framing, authentication and request multiplexing are written once against [`ByteStream`];
//! each back-end only moves bytes. Every read is non-blocking ([`ByteStream::try_read`]); how long
//! a waiter busy-polls before it sleeps in [`ByteStream::wait_readable`] is the [`WaitPolicy`].

use std::io;
use std::time::{Duration, Instant};

use mosaic_page::sched::Poll;

/// How a thread waits for bytes from its peer.
///
/// On these machines waking a sleeping thread on the other core costs 30-35 us, far more than a
/// loopback round trip when both ends poll (about 8 us), so the default busy-polls for a bounded
/// time and only then sleeps in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitPolicy {
    /// How long to busy-poll before sleeping. Zero means block at once (lowest CPU use).
    pub spin: Duration,
    /// Offer the CPU to any other runnable thread between polls (`sched_yield`) instead of
    /// pausing on it: for threads that outnumber the CPUs, where the thread that would produce
    /// the awaited bytes may be queued for this very CPU. Not while a CPU-bound thread keeps
    /// this CPU busy (see `mosaic_page::sched`): a yield to it returns only when its time slice
    /// ends. (Measured on 2 vCPUs, a DSM job of 2
    /// processes: barriers 5-15 us instead of 220-250, a read miss about the same, a lone lock
    /// 3.8-9.8 us instead of 2.6; plain polls for the first 5 us did worse than either.
    /// BENCHMARKS.md, 2026-12-05.)
    pub yielding: bool,
}

impl WaitPolicy {
    /// Spin for 100 us, then sleep: the default.
    pub const DEFAULT: WaitPolicy = WaitPolicy { spin: Duration::from_micros(100), yielding: false };

    /// Never spin: every wait sleeps in the kernel at once.
    pub fn blocking() -> WaitPolicy {
        WaitPolicy { spin: Duration::ZERO, yielding: false }
    }

    /// Spin for `spin`, then sleep.
    pub fn spin_then_sleep(spin: Duration) -> WaitPolicy {
        WaitPolicy { spin, yielding: false }
    }

    /// Poll for `spin`, yielding the CPU between polls, then sleep (see
    /// [`yielding`](Self::yielding)).
    pub fn yield_then_sleep(spin: Duration) -> WaitPolicy {
        WaitPolicy { spin, yielding: true }
    }

    /// Whether a pause of `poll` yields the CPU: where the policy says to and the poll allows
    /// it (not on a CPU a CPU-bound thread keeps busy).
    pub fn yields(&self, poll: &Poll) -> bool {
        self.yielding && poll.may_yield()
    }

    /// Waits a moment between two looks of `poll`: yields the CPU ([`yields`](Self::yields))
    /// or pauses on it.
    pub fn pause(&self, poll: &Poll) {
        if self.yields(poll) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl Default for WaitPolicy {
    fn default() -> Self {
        WaitPolicy::DEFAULT
    }
}

/// A bidirectional byte stream to one peer. Reads are non-blocking; writes block until done.
///
/// A connection serialises writers (one thread writes at a time) and readers (one thread reads at
/// a time), but a reader and a writer may run concurrently.
pub(crate) trait ByteStream: Send + Sync {
    /// Writes every byte of `bufs`, in order, waiting for room as needed.
    fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()>;
    /// Reads what is available into `buf`: `Ok(0)` means the peer closed the stream,
    /// `ErrorKind::WouldBlock` that nothing is available yet.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sleeps until bytes may be available, the stream closed, or `timeout` passed.
    fn wait_readable(&self, timeout: Duration) -> io::Result<()>;
    /// Whether a read costs much more than copying what it returns (a system call per read, as
    /// on a socket): then the client reads many frames at once and copies page payloads out,
    /// rather than reading each page straight into its buffer with a read of its own. Streams
    /// whose read is itself a copy out of shared memory say no.
    fn batch_reads(&self) -> bool {
        true
    }
    /// Closes both directions; blocked readers and writers on both ends return.
    fn shutdown(&self);
    /// True if the peer has hung up (its process died or closed the connection), asked of the
    /// kernel without reading. A peer whose host vanished is not noticed here.
    fn peer_hung_up(&self) -> bool {
        false
    }
    /// True if the peer runs on this host (loopback tcp, shm): only the kernel sits between the
    /// two, so the automatic protection is none.
    fn is_same_host(&self) -> bool {
        false
    }
    /// A human-readable name of the peer, for errors and logs.
    fn peer(&self) -> String;
}

/// When a wait gives up. `In` is resolved against the clock only if the wait actually has to
/// wait, so a read whose bytes are already there costs no clock read (~25 ns on these VMs, and
/// the fault path does several reads per request).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deadline {
    /// At this instant.
    At(Instant),
    /// This long after the wait starts waiting.
    In(Duration),
    /// Never.
    Never,
}

impl Deadline {
    /// The instant, measuring `In` from `now`.
    pub(crate) fn resolve(self, now: Instant) -> Option<Instant> {
        match self {
            Deadline::At(t) => Some(t),
            Deadline::In(d) => Some(now + d),
            Deadline::Never => None,
        }
    }
}

impl From<Option<Instant>> for Deadline {
    fn from(d: Option<Instant>) -> Deadline {
        d.map_or(Deadline::Never, Deadline::At)
    }
}

/// Why a blocking read stopped short.
#[derive(Debug)]
pub(crate) enum ReadStop {
    /// The peer closed the stream.
    Eof,
    /// The deadline passed.
    TimedOut,
    /// The stream failed.
    Io(io::Error),
}

/// Longest single sleep in [`wait_readable`](ByteStream::wait_readable), so deadlines and
/// cancellation are noticed even when the kernel wakes nobody.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// Waits, with `policy`, until `stream` has bytes, then reads what is there into `buf`.
///
/// Returns `Ok(n)` with `n > 0` bytes read, or why it stopped.
pub(crate) fn read_some(
    stream: &dyn ByteStream,
    buf: &mut [u8],
    policy: WaitPolicy,
    deadline: impl Into<Deadline>,
) -> Result<usize, ReadStop> {
    // Fast path: bytes already there, no clock read.
    match stream.try_read(buf) {
        Ok(0) => return Err(ReadStop::Eof),
        Ok(n) => return Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(ReadStop::Io(e)),
    }
    let start = Instant::now();
    let deadline = deadline.into().resolve(start);
    let mut spins: u32 = 0;
    // Polls as the policy says, and differently once a CPU-bound thread took this CPU for a
    // slice: a service thread sleeps, any other stops yielding (see `mosaic_page::sched`).
    let mut poll = if policy.spin.is_zero() { None } else { Poll::start() };
    loop {
        match stream.try_read(buf) {
            Ok(0) => return Err(ReadStop::Eof),
            Ok(n) => {
                // The bytes may have come while another thread had this CPU: note it.
                if let Some(p) = &mut poll {
                    let _ = p.alone(Instant::now());
                }
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadStop::Io(e)),
        }
        spins = spins.wrapping_add(1);
        // Reading the clock costs ~25 ns; check it every few polls only (every poll when
        // yielding, which costs more).
        if spins % 16 != 0 && poll.as_ref().is_some_and(|p| !policy.yields(p)) {
            std::hint::spin_loop();
            continue;
        }
        let now = Instant::now();
        if let Some(d) = deadline {
            if now >= d {
                return Err(ReadStop::TimedOut);
            }
        }
        if let Some(p) = &mut poll {
            if p.on(now, start + policy.spin) {
                policy.pause(p);
                continue;
            }
            poll = None;
        }
        let mut sleep = MAX_SLEEP;
        if let Some(d) = deadline {
            sleep = sleep.min(d.saturating_duration_since(now));
        }
        stream.wait_readable(sleep).map_err(ReadStop::Io)?;
    }
}

/// Fills `buf` completely (see [`read_some`]).
pub(crate) fn read_exact(
    stream: &dyn ByteStream,
    buf: &mut [u8],
    policy: WaitPolicy,
    deadline: impl Into<Deadline>,
) -> Result<(), ReadStop> {
    let mut deadline = deadline.into();
    let mut done = 0;
    while done < buf.len() {
        done += read_some(stream, &mut buf[done..], policy, deadline)?;
        // Later pieces share the first piece's deadline once it is known.
        if let (Deadline::In(d), true) = (deadline, done < buf.len()) {
            deadline = Deadline::At(Instant::now() + d);
        }
    }
    Ok(())
}

/// Converts a [`ReadStop`] into an `io::Error` for contexts that only report.
impl From<ReadStop> for io::Error {
    fn from(stop: ReadStop) -> io::Error {
        match stop {
            ReadStop::Eof => io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the stream"),
            ReadStop::TimedOut => io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            ReadStop::Io(e) => e,
        }
    }
}
