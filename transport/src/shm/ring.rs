//! A single-producer single-consumer byte ring, for shared memory between two processes.
//!
//! The algorithm is the classic Lamport SPSC queue over bytes (as in the Linux `kfifo` and the
//! Myrinet GM send/receive queues): two free-running 64-bit counters, `tail` (bytes ever written)
//! written only by the producer and `head` (bytes ever read) written only by the consumer. The
//! producer copies bytes into `[tail, tail + n)` (modulo the capacity, a power of two) and then
//! publishes them with a release store of `tail`; the consumer acquires `tail`, copies out
//! `[head, tail)` and releases the space with a release store of `head`. Each side reads the
//! other's counter with acquire, so a byte is never read before it is written, nor overwritten
//! before it is read. Counters are free-running modulo 2^64: all arithmetic on them wraps, so
//! a peer's value near the wrap point is judged like any other.
//!
//! # The peer is not trusted
//! The counters live in memory the other process can write at will. So each side keeps the
//! counter it owns in its own private memory ([`RingEnd`]) and only *publishes* it to the shared
//! header; it never reads its own counter back from shared memory. The peer's counter is read
//! once per operation and checked before it is used: the peer's `tail` must be at most
//! `capacity` bytes ahead of our private `head`, the peer's `head` at most `capacity` bytes
//! behind our private `tail` (and never ahead of it). A counter outside those bounds is a
//! [`RingCorrupt`] error, which closes the connection; no length derived from shared memory is
//! used unchecked. Bytes inside the ring may still be scribbled on by the peer at any time: the
//! ring copies them out as opaque bytes, and the frame layer checks everything it decodes.
//!
//! Sleeping is the caller's business (see `shm::stream`): a side about to sleep sets its
//! `*_sleeping` flag, issues a SeqCst fence and re-checks the ring; a side that publishes issues a
//! SeqCst fence and then looks at the other's flag. The two fences make it impossible for both to
//! miss each other (Dekker's pattern), so no wake-up is lost.
//!
//! The byte storage is behind [`RingBytes`] so that the loom model (`cfg(loom)`) can track every
//! byte access with `loom::cell::UnsafeCell` and detect a publication that comes too early.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// One value on its own cache line, so producer and consumer counters do not false-share.
#[repr(C, align(64))]
pub(crate) struct CacheLine<T>(pub(crate) T);

/// The shared control block of one ring.
#[repr(C)]
pub(crate) struct RingHeader {
    /// Bytes ever written (published by the producer).
    pub(crate) tail: CacheLine<AtomicU64>,
    /// Bytes ever read (published by the consumer).
    pub(crate) head: CacheLine<AtomicU64>,
    /// Set by the consumer while it sleeps waiting for bytes.
    pub(crate) reader_sleeping: CacheLine<AtomicU32>,
    /// Set by the producer while it sleeps waiting for room.
    pub(crate) writer_sleeping: CacheLine<AtomicU32>,
}

impl RingHeader {
    /// A fresh, empty header.
    #[cfg(any(loom, test, fuzzing))]
    pub(crate) fn new() -> RingHeader {
        RingHeader {
            tail: CacheLine(AtomicU64::new(0)),
            head: CacheLine(AtomicU64::new(0)),
            reader_sleeping: CacheLine(AtomicU32::new(0)),
            writer_sleeping: CacheLine(AtomicU32::new(0)),
        }
    }
}

/// One side's private state for one ring, in its own (unshared) memory: the counter it owns
/// (the producer's `tail`, the consumer's `head`) and, for the producer, its last checked view of
/// the consumer's `head`.
pub(crate) struct RingEnd {
    own: AtomicU64,
    peer_cache: AtomicU64,
}

impl RingEnd {
    /// The state of a fresh ring (both counters at zero).
    pub(crate) fn new() -> RingEnd {
        RingEnd { own: AtomicU64::new(0), peer_cache: AtomicU64::new(0) }
    }
}

/// The peer published a counter that no correct peer could: it claims more bytes than the ring
/// holds, or moved backwards. The connection cannot be trusted any further.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the peer corrupted the shared ring: its {which} counter is {found}, ours is {ours} (capacity {cap})")]
pub(crate) struct RingCorrupt {
    /// `"tail"` (a producer's) or `"head"` (a consumer's).
    pub(crate) which: &'static str,
    /// The value found in shared memory.
    pub(crate) found: u64,
    /// Our own counter it was checked against.
    pub(crate) ours: u64,
    /// The ring's capacity.
    pub(crate) cap: u64,
}

/// The ring's byte storage.
///
/// # Safety
/// Implementations must give `capacity()` bytes, a power of two, that stay valid for as long as
/// the value lives. `write` and `read` may be called concurrently on *disjoint* ranges.
pub(crate) unsafe trait RingBytes {
    /// Capacity in bytes (a power of two).
    fn capacity(&self) -> usize;
    /// Copies `src` to `[at, at + src.len())`.
    ///
    /// # Safety
    /// The range lies within the capacity and no one reads or writes it concurrently.
    unsafe fn write(&self, at: usize, src: &[u8]);
    /// Copies `[at, at + dst.len())` into `dst`.
    ///
    /// # Safety
    /// The range lies within the capacity and no one writes it concurrently.
    unsafe fn read(&self, at: usize, dst: &mut [u8]);
}

/// Raw shared memory as ring storage.
pub(crate) struct RawBytes {
    pub(crate) ptr: *mut u8,
    pub(crate) cap: usize,
}

// SAFETY: RawBytes is constructed (in shm::stream) over a mapping of `cap` bytes that outlives
// it, with `cap` a power of two; copies go through raw pointers, never references.
unsafe impl RingBytes for RawBytes {
    fn capacity(&self) -> usize {
        self.cap
    }
    unsafe fn write(&self, at: usize, src: &[u8]) {
        // SAFETY: the caller guarantees [at, at + len) is in bounds and not accessed concurrently.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) };
    }
    unsafe fn read(&self, at: usize, dst: &mut [u8]) {
        // SAFETY: the caller guarantees [at, at + len) is in bounds and not written concurrently.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), dst.as_mut_ptr(), dst.len()) };
    }
}

/// One end of a ring: the producer calls [`Ring::push`], the consumer [`Ring::pop`]. Each end is
/// used by one thread at a time (the stream serialises its writers and its readers).
pub(crate) struct Ring<'a, B: RingBytes> {
    hdr: &'a RingHeader,
    bytes: B,
    /// Our side's private counters.
    end: &'a RingEnd,
}

impl<'a, B: RingBytes> Ring<'a, B> {
    /// A ring over `hdr` and `bytes`, with this side's private state `end`.
    pub(crate) fn new(hdr: &'a RingHeader, bytes: B, end: &'a RingEnd) -> Ring<'a, B> {
        debug_assert!(bytes.capacity().is_power_of_two());
        Ring { hdr, bytes, end }
    }

    /// The control block.
    pub(crate) fn header(&self) -> &RingHeader {
        self.hdr
    }

    fn cap(&self) -> u64 {
        self.bytes.capacity() as u64
    }

    /// Producer: the consumer's published `head`, checked against our `tail`: it may trail it by
    /// at most the capacity and never lead it.
    fn checked_head(&self, tail: u64) -> Result<u64, RingCorrupt> {
        let head = self.hdr.head.0.load(Ordering::Acquire);
        if tail.wrapping_sub(head) > self.cap() {
            return Err(RingCorrupt { which: "head", found: head, ours: tail, cap: self.cap() });
        }
        Ok(head)
    }

    /// Consumer: the producer's published `tail`, checked against our `head`: it may lead it by
    /// at most the capacity and never trail it.
    fn checked_tail(&self, head: u64) -> Result<u64, RingCorrupt> {
        let tail = self.hdr.tail.0.load(Ordering::Acquire);
        if tail.wrapping_sub(head) > self.cap() {
            return Err(RingCorrupt { which: "tail", found: tail, ours: head, cap: self.cap() });
        }
        Ok(tail)
    }

    /// Splits `len` bytes from ring position `pos` at the wrap point: (offset, first, second).
    fn split(&self, pos: u64, len: usize) -> (usize, usize, usize) {
        let cap = self.bytes.capacity();
        // pos % cap < cap <= usize::MAX
        let at = usize::try_from(pos % self.cap()).unwrap_or(0);
        let first = len.min(cap - at);
        (at, first, len - first)
    }

    /// Producer: appends as much of `src` as fits; returns the number of bytes written.
    pub(crate) fn push(&self, src: &[u8]) -> Result<usize, RingCorrupt> {
        let tail = self.end.own.load(Ordering::Relaxed);
        // Our cached view of `head` was checked when read, and we never write past it, so
        // `tail - head <= cap` holds for it. A stale view only under-states the free space, so
        // read the consumer's line (a cache miss) only when it says there is not enough room.
        let mut head = self.end.peer_cache.load(Ordering::Relaxed);
        if self.cap() - tail.wrapping_sub(head) < src.len() as u64 {
            head = self.checked_head(tail)?;
            self.end.peer_cache.store(head, Ordering::Relaxed);
        }
        let free = self.cap() - tail.wrapping_sub(head);
        let n = usize::try_from(free).unwrap_or(usize::MAX).min(src.len());
        if n == 0 {
            return Ok(0);
        }
        let (at, first, second) = self.split(tail, n);
        // SAFETY: both pieces lie within the capacity by construction of `split` (n <= cap).
        // [tail, tail + n) is free space by a checked `head` (n <= cap - (tail - head)): a
        // correct consumer has released it and reads nothing beyond the published tail. A
        // hostile one may read or scribble on it concurrently; the copy goes through raw
        // pointers and treats the bytes as opaque, so that only garbles its own input.
        unsafe {
            self.bytes.write(at, &src[..first]);
            self.bytes.write(0, &src[first..first + second]);
        }
        self.end.own.store(tail.wrapping_add(n as u64), Ordering::Relaxed);
        self.hdr.tail.0.store(tail.wrapping_add(n as u64), Ordering::Release);
        Ok(n)
    }

    /// Consumer: moves up to `dst.len()` available bytes into `dst`; returns how many.
    pub(crate) fn pop(&self, dst: &mut [u8]) -> Result<usize, RingCorrupt> {
        let head = self.end.own.load(Ordering::Relaxed);
        let tail = self.checked_tail(head)?;
        let n = usize::try_from(tail.wrapping_sub(head)).unwrap_or(usize::MAX).min(dst.len());
        if n == 0 {
            return Ok(0);
        }
        let (at, first, second) = self.split(head, n);
        // SAFETY: both pieces lie within the capacity (`split`, and n <= tail - head <= cap by
        // the check). [head, head + n) was published by the producer (acquire load of tail); a
        // correct producer writes nothing there until we release it below, a hostile one may,
        // and then only the bytes we copy out are garbage: the frame layer checks them.
        unsafe {
            self.bytes.read(at, &mut dst[..first]);
            self.bytes.read(0, &mut dst[first..first + second]);
        }
        self.end.own.store(head.wrapping_add(n as u64), Ordering::Relaxed);
        self.hdr.head.0.store(head.wrapping_add(n as u64), Ordering::Release);
        Ok(n)
    }

    /// Consumer: bytes available to read.
    pub(crate) fn available(&self) -> Result<u64, RingCorrupt> {
        let head = self.end.own.load(Ordering::Relaxed);
        Ok(self.checked_tail(head)?.wrapping_sub(head))
    }

    /// Producer: true if there is no room.
    pub(crate) fn is_full(&self) -> Result<bool, RingCorrupt> {
        let tail = self.end.own.load(Ordering::Relaxed);
        Ok(tail.wrapping_sub(self.checked_head(tail)?) >= self.cap())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A producer end and a consumer end over one header and one byte store.
    struct Pair {
        hdr: Box<RingHeader>,
        store: Vec<u8>,
        producer: RingEnd,
        consumer: RingEnd,
    }

    impl Pair {
        fn new(cap: usize) -> Pair {
            Pair {
                hdr: Box::new(RingHeader::new()),
                store: vec![0u8; cap],
                producer: RingEnd::new(),
                consumer: RingEnd::new(),
            }
        }
        fn producer(&mut self) -> Ring<'_, RawBytes> {
            let cap = self.store.len();
            Ring::new(&self.hdr, RawBytes { ptr: self.store.as_mut_ptr(), cap }, &self.producer)
        }
        fn consumer(&mut self) -> Ring<'_, RawBytes> {
            let cap = self.store.len();
            Ring::new(&self.hdr, RawBytes { ptr: self.store.as_mut_ptr(), cap }, &self.consumer)
        }
    }

    #[test]
    fn bytes_come_out_in_order_across_the_wrap() {
        let mut pair = Pair::new(8);
        let mut out = Vec::new();
        let mut next = 0u8;
        let mut buf = [0u8; 5];
        for round in 0..50usize {
            let chunk: Vec<u8> = (0..(round % 7) + 1).map(|i| next.wrapping_add(i as u8)).collect();
            let n = pair.producer().push(&chunk).unwrap();
            next = next.wrapping_add(u8::try_from(n).unwrap());
            let m = pair.consumer().pop(&mut buf[..(round % 5) + 1]).unwrap();
            out.extend_from_slice(&buf[..m]);
        }
        while pair.consumer().available().unwrap() > 0 {
            let m = pair.consumer().pop(&mut buf).unwrap();
            out.extend_from_slice(&buf[..m]);
        }
        let want: Vec<u8> = (0..out.len()).map(|i| i as u8).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn a_full_ring_takes_nothing_more() {
        let mut pair = Pair::new(4);
        assert_eq!(pair.producer().push(b"abcdef").unwrap(), 4);
        assert!(pair.producer().is_full().unwrap());
        assert_eq!(pair.producer().push(b"x").unwrap(), 0);
        let mut b = [0u8; 2];
        assert_eq!(pair.consumer().pop(&mut b).unwrap(), 2);
        assert_eq!(&b, b"ab");
        assert_eq!(pair.producer().push(b"xyz").unwrap(), 2);
    }

    #[test]
    fn a_producer_claiming_more_than_the_capacity_is_refused() {
        let mut pair = Pair::new(8);
        // The peer publishes tail - head = cap + 1: popping would copy past the ring.
        pair.hdr.tail.0.store(9, Ordering::Release);
        let mut b = [0u8; 64];
        let e = pair.consumer().pop(&mut b).unwrap_err();
        assert_eq!((e.which, e.found, e.ours, e.cap), ("tail", 9, 0, 8));
        assert!(pair.consumer().available().is_err());
        // A tail behind our head (it moved backwards) is refused too.
        pair.hdr.tail.0.store(4, Ordering::Release);
        assert_eq!(pair.consumer().pop(&mut b).unwrap(), 4);
        pair.hdr.tail.0.store(2, Ordering::Release);
        assert_eq!(pair.consumer().pop(&mut b).unwrap_err().which, "tail");
        // And the largest lie of all.
        pair.hdr.tail.0.store(u64::MAX, Ordering::Release);
        assert!(pair.consumer().pop(&mut b).is_err());
    }

    /// A fuzzer find: a consumer's `head` published as u64::MAX (one behind our tail of 0, modulo
    /// 2^64) made the producer's `tail - head` overflow (a panic in checked builds). Counters
    /// are modular: it is judged like any other value.
    #[test]
    fn counters_near_the_wrap_point_are_judged_modulo_2_64() {
        let mut pair = Pair::new(64);
        pair.hdr.head.0.store(u64::MAX, Ordering::Release);
        assert_eq!(pair.producer().push(&[1u8; 100]).unwrap(), 63, "one byte counted as unread");
        pair.hdr.tail.0.store(u64::MAX, Ordering::Release);
        assert!(pair.consumer().pop(&mut [0u8; 8]).is_err(), "a tail far behind our head");
    }

    #[test]
    fn a_consumer_claiming_bytes_it_never_got_is_refused() {
        let mut pair = Pair::new(8);
        assert_eq!(pair.producer().push(b"abcdefgh").unwrap(), 8);
        // The peer publishes a head ahead of our tail: the free space would exceed the ring.
        pair.hdr.head.0.store(9, Ordering::Release);
        let e = pair.producer().push(b"x").unwrap_err();
        assert_eq!((e.which, e.found, e.ours), ("head", 9, 8));
        assert!(pair.producer().is_full().is_err());
        // Our own counter is never read back from shared memory: the peer rewriting our tail
        // changes nothing we compute.
        pair.hdr.head.0.store(8, Ordering::Release);
        pair.hdr.tail.0.store(1 << 40, Ordering::Release);
        assert_eq!(pair.producer().push(b"12345678").unwrap(), 8);
        assert_eq!(pair.hdr.tail.0.load(Ordering::Acquire), 16, "republished from the private tail");
    }
}

/// The loom model: every interleaving of a producer and a consumer over a 4-byte ring.
/// Run with `RUSTFLAGS="--cfg loom" cargo test -p mosaic-transport --lib --release loom`;
/// with `LOOM_MAX_PREEMPTIONS=3` it explores the full model in a few seconds.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    struct LoomBytes(Vec<UnsafeCell<u8>>);

    // SAFETY: capacity is the vector's fixed length (a power of two in the tests); every access
    // goes through loom's UnsafeCell, which reports any concurrent access to the same byte.
    unsafe impl RingBytes for LoomBytes {
        fn capacity(&self) -> usize {
            self.0.len()
        }
        unsafe fn write(&self, at: usize, src: &[u8]) {
            for (i, b) in src.iter().enumerate() {
                // SAFETY: loom checks exclusivity of this access at run time.
                self.0[at + i].with_mut(|p| unsafe { *p = *b });
            }
        }
        unsafe fn read(&self, at: usize, dst: &mut [u8]) {
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: loom checks that no write to this byte runs concurrently.
                *d = self.0[at + i].with(|p| unsafe { *p });
            }
        }
    }

    #[test]
    fn loom_spsc_ring_delivers_every_byte_in_order() {
        loom::model(|| {
            let hdr = Arc::new(RingHeader::new());
            let store = Arc::new(LoomBytes((0..4).map(|_| UnsafeCell::new(0)).collect()));
            struct Shared(Arc<LoomBytes>);
            // SAFETY: forwards to the shared storage, whose contract is upheld by the ring.
            unsafe impl RingBytes for Shared {
                fn capacity(&self) -> usize {
                    self.0.capacity()
                }
                unsafe fn write(&self, at: usize, src: &[u8]) {
                    // SAFETY: forwarded contract.
                    unsafe { self.0.write(at, src) }
                }
                unsafe fn read(&self, at: usize, dst: &mut [u8]) {
                    // SAFETY: forwarded contract.
                    unsafe { self.0.read(at, dst) }
                }
            }
            let (h2, s2) = (hdr.clone(), store.clone());
            let producer = loom::thread::spawn(move || {
                let end = RingEnd::new();
                let ring = Ring::new(&h2, Shared(s2), &end);
                let data = [1u8, 2, 3, 4, 5, 6];
                let mut sent = 0;
                while sent < data.len() {
                    let n = ring.push(&data[sent..(sent + 3).min(data.len())]).unwrap();
                    sent += n;
                    if n == 0 {
                        loom::thread::yield_now();
                    }
                }
            });
            let end = RingEnd::new();
            let ring = Ring::new(&hdr, Shared(store), &end);
            let mut got = Vec::new();
            let mut buf = [0u8; 3];
            while got.len() < 6 {
                let n = ring.pop(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                if n == 0 {
                    loom::thread::yield_now();
                }
            }
            producer.join().unwrap();
            assert_eq!(got, [1, 2, 3, 4, 5, 6]);
        });
    }
}
