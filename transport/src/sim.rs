//! `sim`: a shaped link around any other back-end: latency, bandwidth, loss and partition.
//!
//! A [`LinkSpec`] says how the link behaves; `sim://LINK@INNER` connects to `INNER` (tcp or shm)
//! and shapes both directions on the connecting side. Each direction is a queue with its own
//! clock: a chunk of `n` bytes leaves when the link is free and takes `n * 8 / bandwidth` to
//! serialise, then arrives `latency` later. The link is reliable, like the TCP it models, so a
//! lost frame shows up as delay: it arrives after a retransmission time-out (`rto`), and the
//! frames behind it wait (head-of-line blocking). Which frames are lost is decided per frame by a
//! PRNG seeded from the spec, so the same seed loses the same frames in every run. While the link
//! is partitioned ([`SimLink::partition`]) nothing is delivered; requests then time out with an
//! error (never hang), and delivery resumes in order when the partition heals.
//!
//! Presets reproduce the networks Mosaic cares about: `fast-ethernet` (100 Mb/s, 150 us each
//! way: the ~300 us remote call of the openMosix era), `10gbe` (10 Gb/s, 5 us) and `100gbe`
//! (100 Gb/s, 1 us).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::stream::{read_some, ByteStream, ReadStop, WaitPolicy};
use crate::wire::HEADER_LEN;

/// How a simulated link behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    /// One-way propagation delay.
    pub latency: Duration,
    /// Bits per second; `None` means unlimited.
    pub bandwidth_bps: Option<u64>,
    /// Probability that a frame is lost and retransmitted after `rto`.
    pub loss: f64,
    /// Retransmission delay added to a lost frame.
    pub rto: Duration,
    /// Seed of the loss decisions.
    pub seed: u64,
}

impl LinkSpec {
    /// 100 Mb/s, 150 us one way.
    pub fn fast_ethernet() -> LinkSpec {
        LinkSpec::new(Duration::from_micros(150), Some(100_000_000))
    }

    /// 10 Gb/s, 5 us one way.
    pub fn ten_gbe() -> LinkSpec {
        LinkSpec::new(Duration::from_micros(5), Some(10_000_000_000))
    }

    /// 100 Gb/s, 1 us one way.
    pub fn hundred_gbe() -> LinkSpec {
        LinkSpec::new(Duration::from_micros(1), Some(100_000_000_000))
    }

    /// A lossless link with `latency` and `bandwidth_bps`.
    pub fn new(latency: Duration, bandwidth_bps: Option<u64>) -> LinkSpec {
        LinkSpec { latency, bandwidth_bps, loss: 0.0, rto: Duration::from_millis(1), seed: 1 }
    }

    /// Parses `PRESET[,key=value...]` or `key=value[,...]`, with keys `lat` (e.g. `150us`,
    /// `2ms`), `bw` (e.g. `100Mbit`, `10Gbit`, `0` for unlimited), `loss` (0..1), `rto`, `seed`.
    pub fn parse(s: &str) -> Result<LinkSpec, String> {
        let mut spec = LinkSpec::new(Duration::ZERO, None);
        for (i, part) in s.split(',').enumerate() {
            let Some((k, v)) = part.split_once('=') else {
                if i > 0 {
                    return Err(format!("expected key=value, got {part:?}"));
                }
                spec = match part {
                    "fast-ethernet" | "fe" => LinkSpec::fast_ethernet(),
                    "10gbe" => LinkSpec::ten_gbe(),
                    "100gbe" => LinkSpec::hundred_gbe(),
                    "ideal" => LinkSpec::new(Duration::ZERO, None),
                    _ => return Err(format!("unknown link preset {part:?} (fast-ethernet, 10gbe, 100gbe, ideal)")),
                };
                continue;
            };
            match k {
                "lat" | "latency" => spec.latency = parse_duration(v)?,
                "rto" => spec.rto = parse_duration(v)?,
                "bw" | "bandwidth" => spec.bandwidth_bps = parse_bits(v)?,
                "loss" => {
                    spec.loss =
                        v.parse::<f64>().ok().filter(|p| (0.0..1.0).contains(p)).ok_or("loss must be in [0, 1)")?;
                }
                "seed" => spec.seed = v.parse().map_err(|_| "seed must be an integer")?,
                _ => return Err(format!("unknown link parameter {k:?} (lat, bw, loss, rto, seed)")),
            }
        }
        Ok(spec)
    }

    /// Time to serialise `bytes` onto the link.
    fn serialisation(&self, bytes: usize) -> Duration {
        match self.bandwidth_bps {
            Some(bps) if bps > 0 => {
                let nanos = (bytes as u128 * 8 * 1_000_000_000) / u128::from(bps);
                Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
            _ => Duration::ZERO,
        }
    }
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    let (num, unit) = split_unit(v);
    let n: f64 = num.parse().map_err(|_| format!("bad duration {v:?}"))?;
    let secs = match unit {
        "ns" => n * 1e-9,
        "us" => n * 1e-6,
        "ms" => n * 1e-3,
        "s" => n,
        _ => return Err(format!("bad duration unit in {v:?} (ns, us, ms, s)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("bad duration {v:?}"))
}

fn parse_bits(v: &str) -> Result<Option<u64>, String> {
    let (num, unit) = split_unit(v);
    let n: f64 = num.parse().map_err(|_| format!("bad bandwidth {v:?}"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "bit" | "bps" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(format!("bad bandwidth unit in {v:?} (bit, kbit, Mbit, Gbit)")),
    };
    let bps = n * mult;
    if !(0.0..=1e15).contains(&bps) {
        return Err(format!("bandwidth {v:?} out of range"));
    }
    // In range and non-negative: the cast neither wraps nor truncates meaningfully.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bps = bps as u64;
    Ok((bps > 0).then_some(bps))
}

fn split_unit(v: &str) -> (&str, &str) {
    let at = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    v.split_at(at)
}

/// SplitMix64: a tiny deterministic PRNG for loss decisions.
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random mantissa bits; the cast is exact.
        #[allow(clippy::cast_precision_loss)]
        let f = (z >> 11) as f64 / (1u64 << 53) as f64;
        f
    }
}

/// Tracks frame boundaries in a byte stream so loss is decided once per frame. A unit is a
/// Mosaic frame (it starts with the magic `MOSA`), or, on a connection whose frames are protected,
/// a record of the secure layer (a little-endian length, that many bytes, a 16-byte tag): a
/// record's length is at most 64 KiB, so its first four bytes are never the magic.
struct FrameSplitter {
    header: [u8; HEADER_LEN],
    have: usize,
    payload_left: u64,
}

impl FrameSplitter {
    fn new() -> FrameSplitter {
        FrameSplitter { header: [0; HEADER_LEN], have: 0, payload_left: 0 }
    }

    /// Feeds `bytes`; returns how many units start in them.
    fn feed(&mut self, mut bytes: &[u8]) -> usize {
        let mut starts = 0;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left).unwrap_or(usize::MAX).min(bytes.len());
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            if self.have == 0 {
                starts += 1;
            }
            // Four bytes tell a frame from a record; a frame needs its whole header.
            let need = if self.have < 4 { 4 } else { HEADER_LEN };
            let n = (need - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 4 && self.header[..4] != crate::wire::MAGIC {
                self.have = 0;
                let len = u32::from_le_bytes([self.header[0], self.header[1], self.header[2], self.header[3]]);
                self.payload_left = u64::from(len) + crate::secure::TAG as u64;
            } else if self.have == HEADER_LEN {
                self.have = 0;
                // A malformed header is the receiver's business, not ours.
                self.payload_left = u64::from(crate::wire::length_field(&self.header));
            }
        }
        starts
    }
}

/// One direction of the link: its clock, its loss decisions and its queue.
struct Direction {
    state: Mutex<DirState>,
    cv: Condvar,
}

struct DirState {
    queue: VecDeque<Chunk>,
    link_free: Instant,
    last_arrival: Instant,
    rng: SplitMix,
    frames: FrameSplitter,
    /// End of stream (or an error) after the queued chunks, inbound only.
    end: Option<io::ErrorKind>,
    /// Bytes of the front chunk already consumed, inbound only.
    front_off: usize,
    /// Frames that started in this direction, and how many of them were lost (and resent).
    frames_sent: u64,
    frames_lost: u64,
}

struct Chunk {
    arrive: Instant,
    bytes: Vec<u8>,
}

impl Direction {
    fn new(seed: u64) -> Direction {
        let now = Instant::now();
        Direction {
            state: Mutex::new(DirState {
                queue: VecDeque::new(),
                link_free: now,
                last_arrival: now,
                rng: SplitMix(seed),
                frames: FrameSplitter::new(),
                end: None,
                front_off: 0,
                frames_sent: 0,
                frames_lost: 0,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DirState> {
        crate::sync::lock(&self.state)
    }

    /// Queues `bytes`, stamped with their arrival time under `spec`.
    fn push(&self, spec: &LinkSpec, bytes: Vec<u8>) {
        let mut st = self.lock();
        let now = Instant::now();
        let depart = st.link_free.max(now) + spec.serialisation(bytes.len());
        st.link_free = depart;
        let mut arrive = depart + spec.latency;
        let starts = st.frames.feed(&bytes);
        st.frames_sent += starts as u64;
        for _ in 0..starts {
            if spec.loss > 0.0 && st.rng.next_f64() < spec.loss {
                arrive += spec.rto;
                st.frames_lost += 1;
            }
        }
        // A reliable link delivers in order: nothing overtakes a retransmitted frame.
        arrive = arrive.max(st.last_arrival);
        st.last_arrival = arrive;
        st.queue.push_back(Chunk { arrive, bytes });
        drop(st);
        self.cv.notify_all();
    }
}

/// Shared state of one simulated link.
struct LinkState {
    spec: LinkSpec,
    partitioned: AtomicBool,
    closed: AtomicBool,
    out: Direction,
    inb: Direction,
}

/// A handle on a simulated link: partition it and heal it.
#[derive(Clone)]
pub struct SimLink(Arc<LinkState>);

impl std::fmt::Debug for SimLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimLink").field("spec", &self.0.spec).field("partitioned", &self.is_partitioned()).finish()
    }
}

impl SimLink {
    /// Stops all delivery in both directions until [`SimLink::heal`].
    pub fn partition(&self) {
        self.0.partitioned.store(true, Ordering::Release);
    }

    /// Resumes delivery; frames held during the partition arrive in order.
    pub fn heal(&self) {
        self.0.partitioned.store(false, Ordering::Release);
        self.0.out.cv.notify_all();
        self.0.inb.cv.notify_all();
    }

    /// True while partitioned.
    pub fn is_partitioned(&self) -> bool {
        self.0.partitioned.load(Ordering::Acquire)
    }

    /// Frames that crossed the link so far and how many of them were lost (each cost `rto`),
    /// both directions together: `(sent, lost)`.
    pub fn frame_counts(&self) -> (u64, u64) {
        let (o, i) = (self.0.out.lock(), self.0.inb.lock());
        (o.frames_sent + i.frames_sent, o.frames_lost + i.frames_lost)
    }

    /// The link's behaviour.
    pub fn spec(&self) -> &LinkSpec {
        &self.0.spec
    }
}

/// Sleeps until `at`, sleeping coarse and spinning the last stretch for accuracy.
fn sleep_until(at: Instant) {
    const SPIN: Duration = Duration::from_micros(60);
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        let left = at - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// A [`ByteStream`] that shapes another.
pub(crate) struct SimStream {
    link: Arc<LinkState>,
    inner: Arc<dyn ByteStream>,
    pumps: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl SimStream {
    /// Wraps `inner` in a link that behaves as `spec`; returns the stream and its handle.
    pub(crate) fn wrap(inner: Box<dyn ByteStream>, spec: LinkSpec) -> io::Result<(SimStream, SimLink)> {
        let seed = spec.seed;
        let link = Arc::new(LinkState {
            spec,
            partitioned: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            out: Direction::new(seed),
            inb: Direction::new(seed ^ 0x005E_ED0F_1B0B),
        });
        let inner: Arc<dyn ByteStream> = Arc::from(inner);
        let (l1, i1) = (link.clone(), inner.clone());
        let out = std::thread::Builder::new().name("mosaic-sim-out".into()).spawn(move || pump_out(&l1, &*i1))?;
        let (l2, i2) = (link.clone(), inner.clone());
        let inb = std::thread::Builder::new().name("mosaic-sim-in".into()).spawn(move || pump_in(&l2, &*i2))?;
        let handle = SimLink(link.clone());
        Ok((SimStream { link, inner, pumps: Mutex::new(vec![out, inb]) }, handle))
    }
}

/// Moves outbound chunks to the inner stream at their arrival times.
fn pump_out(link: &LinkState, inner: &dyn ByteStream) {
    let dir = &link.out;
    loop {
        let chunk = {
            let mut st = dir.lock();
            loop {
                if link.closed.load(Ordering::Acquire) {
                    return;
                }
                if !link.partitioned.load(Ordering::Acquire) {
                    if let Some(c) = st.queue.front() {
                        let now = Instant::now();
                        if c.arrive <= now {
                            break;
                        }
                        let wait = c.arrive - now;
                        drop(st);
                        sleep_until(now + wait);
                        st = dir.lock();
                        continue;
                    }
                }
                st = dir
                    .cv
                    .wait_timeout(st, Duration::from_millis(20))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            st.queue.pop_front()
        };
        if let Some(c) = chunk {
            if let Err(e) = inner.write_all(&[&c.bytes]) {
                log::debug!("sim link: inner write failed: {e}");
                inner.shutdown();
                return;
            }
        }
    }
}

/// Reads the inner stream and queues what arrives, stamped with its simulated arrival time.
fn pump_in(link: &LinkState, inner: &dyn ByteStream) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        if link.closed.load(Ordering::Acquire) {
            return;
        }
        let deadline = Some(Instant::now() + Duration::from_millis(20));
        match read_some(inner, &mut buf, WaitPolicy::blocking(), deadline) {
            Ok(n) => link.inb.push(&link.spec, buf[..n].to_vec()),
            Err(ReadStop::TimedOut) => {}
            Err(stop) => {
                let kind = match stop {
                    ReadStop::Io(e) => e.kind(),
                    _ => io::ErrorKind::UnexpectedEof,
                };
                link.inb.lock().end = Some(kind);
                link.inb.cv.notify_all();
                return;
            }
        }
    }
}

impl ByteStream for SimStream {
    fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        if self.link.closed.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "sim link closed"));
        }
        self.link.out.push(&self.link.spec, bufs.concat());
        Ok(())
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = self.link.inb.lock();
        if self.link.partitioned.load(Ordering::Acquire) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let now = Instant::now();
        let off = st.front_off;
        let Some(front) = st.queue.front() else {
            return match st.end {
                Some(io::ErrorKind::UnexpectedEof) => Ok(0),
                Some(kind) => Err(kind.into()),
                None => Err(io::ErrorKind::WouldBlock.into()),
            };
        };
        if front.arrive > now {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = (front.bytes.len() - off).min(buf.len());
        buf[..n].copy_from_slice(&front.bytes[off..off + n]);
        if off + n == front.bytes.len() {
            st.queue.pop_front();
            st.front_off = 0;
        } else {
            st.front_off = off + n;
        }
        Ok(n)
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        let st = self.link.inb.lock();
        let until = Instant::now() + timeout;
        let next =
            if self.link.partitioned.load(Ordering::Acquire) { None } else { st.queue.front().map(|c| c.arrive) };
        if st.end.is_some() && st.queue.is_empty() {
            return Ok(());
        }
        match next {
            Some(at) => {
                drop(st);
                sleep_until(at.min(until));
            }
            None => {
                let _ = self.link.inb.cv.wait_timeout(st, timeout);
            }
        }
        Ok(())
    }

    fn shutdown(&self) {
        self.link.closed.store(true, Ordering::Release);
        self.inner.shutdown();
        self.link.out.cv.notify_all();
        self.link.inb.cv.notify_all();
    }

    fn peer_hung_up(&self) -> bool {
        self.link.closed.load(Ordering::Acquire) || self.inner.peer_hung_up()
    }

    /// A simulated link stands for a network between hosts, whatever it runs over.
    fn is_same_host(&self) -> bool {
        false
    }

    fn peer(&self) -> String {
        format!("sim({})", self.inner.peer())
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        self.shutdown();
        let pumps: Vec<_> = crate::sync::lock(&self.pumps).drain(..).collect();
        for p in pumps {
            let _ = p.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_parameters_parse() {
        assert_eq!(LinkSpec::parse("fast-ethernet").unwrap(), LinkSpec::fast_ethernet());
        let s = LinkSpec::parse("10gbe,loss=0.01,seed=9").unwrap();
        assert_eq!(s.bandwidth_bps, Some(10_000_000_000));
        assert_eq!((s.loss, s.seed), (0.01, 9));
        let s = LinkSpec::parse("lat=2ms,bw=100Mbit,rto=5ms").unwrap();
        assert_eq!(s.latency, Duration::from_millis(2));
        assert_eq!(s.rto, Duration::from_millis(5));
        assert_eq!(s.bandwidth_bps, Some(100_000_000));
        assert_eq!(LinkSpec::parse("bw=0").unwrap().bandwidth_bps, None);
        for bad in ["warp", "lat=5", "lat=xus", "bw=3furlongs", "loss=1.5", "seed=x", "10gbe,oops", "mtu=9000"] {
            assert!(LinkSpec::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn serialisation_time_follows_bandwidth() {
        let fe = LinkSpec::fast_ethernet();
        // 4096 bytes at 100 Mb/s = 327.68 us
        assert_eq!(fe.serialisation(4096), Duration::from_nanos(327_680));
        assert_eq!(LinkSpec::new(Duration::ZERO, None).serialisation(1 << 20), Duration::ZERO);
    }

    #[test]
    fn splitter_counts_frames_across_chunk_boundaries() {
        let mut h = crate::wire::Header::request(crate::wire::Opcode::Call, 1, 0, 5).encode().to_vec();
        h.extend_from_slice(b"hello");
        let two = [h.clone(), h].concat();
        let mut s = FrameSplitter::new();
        let mut starts = 0;
        for chunk in two.chunks(7) {
            starts += s.feed(chunk);
        }
        assert_eq!(starts, 2);
        assert_eq!(FrameSplitter::new().feed(&two), 2);
    }

    #[test]
    fn loss_decisions_repeat_for_a_seed() {
        let draw = |seed| {
            let mut r = SplitMix(seed);
            (0..64).map(|_| r.next_f64() < 0.3).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let hits = draw(7).iter().filter(|x| **x).count();
        assert!((5..40).contains(&hits), "{hits} of 64 at p=0.3");
    }
}
