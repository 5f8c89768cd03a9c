//! A single-producer single-consumer byte ring, for shared memory between two processes.
//!
//! The algorithm is the classic Lamport SPSC queue over bytes (as in the Linux `kfifo` and the
//! Myrinet GM send/receive queues): two free-running 64-bit counters, `tail` (bytes ever written)
//! written only by the producer and `head` (bytes ever read) written only by the consumer. The
//! producer copies bytes into `[tail, tail + n)` (modulo the capacity, a power of two) and then
//! publishes them with a release store of `tail`; the consumer acquires `tail`, copies out
//! `[head, tail)` and releases the space with a release store of `head`. Each side reads the
//! other's counter with acquire, so a byte is never read before it is written, nor overwritten
//! before it is read. Counters never wrap in practice (2^64 bytes).
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

/// The atomic the producer's `head` cache is made of (loom's under `cfg(loom)`).
pub(crate) type HeadCache = AtomicU64;

/// One value on its own cache line, so producer and consumer counters do not false-share.
#[repr(C, align(64))]
pub(crate) struct CacheLine<T>(pub(crate) T);

/// The shared control block of one ring.
#[repr(C)]
pub(crate) struct RingHeader {
    /// Bytes ever written (producer-owned).
    pub(crate) tail: CacheLine<AtomicU64>,
    /// Bytes ever read (consumer-owned).
    pub(crate) head: CacheLine<AtomicU64>,
    /// Set by the consumer while it sleeps waiting for bytes.
    pub(crate) reader_sleeping: CacheLine<AtomicU32>,
    /// Set by the producer while it sleeps waiting for room.
    pub(crate) writer_sleeping: CacheLine<AtomicU32>,
}

impl RingHeader {
    /// A fresh, empty header.
    #[cfg(loom)]
    pub(crate) fn new() -> RingHeader {
        RingHeader {
            tail: CacheLine(AtomicU64::new(0)),
            head: CacheLine(AtomicU64::new(0)),
            reader_sleeping: CacheLine(AtomicU32::new(0)),
            writer_sleeping: CacheLine(AtomicU32::new(0)),
        }
    }
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
    /// The producer's last view of `head`, in its own (unshared) memory.
    head_cache: &'a AtomicU64,
}

impl<'a, B: RingBytes> Ring<'a, B> {
    /// A ring over `hdr` and `bytes`.
    pub(crate) fn new(hdr: &'a RingHeader, bytes: B, head_cache: &'a AtomicU64) -> Ring<'a, B> {
        debug_assert!(bytes.capacity().is_power_of_two());
        Ring { hdr, bytes, head_cache }
    }

    /// The control block.
    pub(crate) fn header(&self) -> &RingHeader {
        self.hdr
    }

    fn cap(&self) -> u64 {
        self.bytes.capacity() as u64
    }

    /// Copies `[from, from + dst_or_src.len())` in ring coordinates, split at the wrap point.
    fn split(&self, pos: u64, len: usize) -> (usize, usize, usize) {
        let cap = self.bytes.capacity();
        // pos % cap < cap <= usize::MAX
        let at = usize::try_from(pos % self.cap()).unwrap_or(0);
        let first = len.min(cap - at);
        (at, first, len - first)
    }

    /// Producer: appends as much of `src` as fits; returns the number of bytes written.
    pub(crate) fn push(&self, src: &[u8]) -> usize {
        let tail = self.hdr.tail.0.load(Ordering::Relaxed); // only we write it
                                                            // A stale `head` only under-states the free space, so read the consumer's line (a
                                                            // cache miss) only when the cached value says there is not enough room.
        let mut head = self.head_cache.load(Ordering::Relaxed);
        if self.cap() - (tail - head) < src.len() as u64 {
            head = self.hdr.head.0.load(Ordering::Acquire);
            self.head_cache.store(head, Ordering::Relaxed);
        }
        let free = self.cap() - (tail - head);
        let n = usize::try_from(free).unwrap_or(usize::MAX).min(src.len());
        if n == 0 {
            return 0;
        }
        let (at, first, second) = self.split(tail, n);
        // SAFETY: [tail, tail + n) is free space (n <= cap - (tail - head)): the consumer has
        // released it (acquire load of head) and reads nothing beyond the published tail. Both
        // pieces lie within the capacity by construction of `split`.
        unsafe {
            self.bytes.write(at, &src[..first]);
            self.bytes.write(0, &src[first..first + second]);
        }
        self.hdr.tail.0.store(tail + n as u64, Ordering::Release);
        n
    }

    /// Consumer: moves up to `dst.len()` available bytes into `dst`; returns how many.
    pub(crate) fn pop(&self, dst: &mut [u8]) -> usize {
        let head = self.hdr.head.0.load(Ordering::Relaxed); // only we write it
        let tail = self.hdr.tail.0.load(Ordering::Acquire);
        let n = usize::try_from(tail - head).unwrap_or(usize::MAX).min(dst.len());
        if n == 0 {
            return 0;
        }
        let (at, first, second) = self.split(head, n);
        // SAFETY: [head, head + n) was published by the producer (acquire load of tail) and it
        // writes nothing there until we release it below. Both pieces are within the capacity.
        unsafe {
            self.bytes.read(at, &mut dst[..first]);
            self.bytes.read(0, &mut dst[first..first + second]);
        }
        self.hdr.head.0.store(head + n as u64, Ordering::Release);
        n
    }

    /// Bytes available to the consumer.
    pub(crate) fn available(&self) -> u64 {
        self.hdr.tail.0.load(Ordering::Acquire) - self.hdr.head.0.load(Ordering::Acquire)
    }

    /// True if the producer has no room.
    pub(crate) fn is_full(&self) -> bool {
        self.available() >= self.cap()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn header() -> Box<RingHeader> {
        Box::new(RingHeader {
            tail: CacheLine(AtomicU64::new(0)),
            head: CacheLine(AtomicU64::new(0)),
            reader_sleeping: CacheLine(AtomicU32::new(0)),
            writer_sleeping: CacheLine(AtomicU32::new(0)),
        })
    }

    #[test]
    fn bytes_come_out_in_order_across_the_wrap() {
        let hdr = header();
        let mut store = vec![0u8; 8];
        let cache = AtomicU64::new(0);
        let ring = Ring::new(&hdr, RawBytes { ptr: store.as_mut_ptr(), cap: 8 }, &cache);
        let mut out = Vec::new();
        let mut next = 0u8;
        let mut buf = [0u8; 5];
        for round in 0..50usize {
            let chunk: Vec<u8> = (0..(round % 7) + 1).map(|i| next.wrapping_add(i as u8)).collect();
            let n = ring.push(&chunk);
            next = next.wrapping_add(u8::try_from(n).unwrap());
            let m = ring.pop(&mut buf[..(round % 5) + 1]);
            out.extend_from_slice(&buf[..m]);
        }
        while ring.available() > 0 {
            let m = ring.pop(&mut buf);
            out.extend_from_slice(&buf[..m]);
        }
        let want: Vec<u8> = (0..out.len()).map(|i| i as u8).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn a_full_ring_takes_nothing_more() {
        let hdr = header();
        let mut store = vec![0u8; 4];
        let cache = AtomicU64::new(0);
        let ring = Ring::new(&hdr, RawBytes { ptr: store.as_mut_ptr(), cap: 4 }, &cache);
        assert_eq!(ring.push(b"abcdef"), 4);
        assert!(ring.is_full());
        assert_eq!(ring.push(b"x"), 0);
        let mut b = [0u8; 2];
        assert_eq!(ring.pop(&mut b), 2);
        assert_eq!(&b, b"ab");
        assert_eq!(ring.push(b"xyz"), 2);
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
                let cache = AtomicU64::new(0);
                let ring = Ring::new(&h2, Shared(s2), &cache);
                let data = [1u8, 2, 3, 4, 5, 6];
                let mut sent = 0;
                while sent < data.len() {
                    let n = ring.push(&data[sent..(sent + 3).min(data.len())]);
                    sent += n;
                    if n == 0 {
                        loom::thread::yield_now();
                    }
                }
            });
            let cache = AtomicU64::new(0);
            let ring = Ring::new(&hdr, Shared(store), &cache);
            let mut got = Vec::new();
            let mut buf = [0u8; 3];
            while got.len() < 6 {
                let n = ring.pop(&mut buf);
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
