//! `libmosaic_preload.so`: an unmodified program's large allocations on network RAM.
//!
//! Loaded with `LD_PRELOAD` (normally by `mosrun`), it interposes `malloc`, `calloc`, `realloc`,
//! `free`, `posix_memalign`, `aligned_alloc`, `memalign`, `valloc`, `pvalloc`,
//! `malloc_usable_size`, and `mmap`/`munmap`/`mremap` of private anonymous memory. Requests of at
//! least the threshold (default 1 MiB) are carved out of one network-RAM region, created at the
//! first such request; smaller ones, and everything Mosaic allocates for itself, go to glibc's
//! allocator (`__libc_malloc` and friends).
//!
//! # Configuration (environment)
//! - `MOSAIC_SERVERS`: memory servers, comma-separated URIs (required; without it nothing changes).
//! - `MOSAIC_CLUSTER_KEY` or `MOSAIC_CLUSTER_KEY_FILE`: the cluster key.
//! - `MOSAIC_LOCAL_BUDGET`: local RAM for the region (default 1G).
//! - `MOSAIC_THRESHOLD`: smallest allocation placed on network RAM (default 1M).
//! - `MOSAIC_NETRAM_SIZE`: address space reserved for large allocations (default 16G).
//! - `MOSAIC_COPIES`: copies of each page (default 2 with two or more servers).
//!
//! # Threads, signals, fork
//! Thread-safe: one lock guards the region's page map; a thread-local flag sends allocations
//! made while Mosaic itself runs (its start-up, its own threads) to glibc. Faults are served by
//! one pinned worker per CPU, so system calls that read into large buffers work.
//! A child created by `fork` does not inherit the region (it is not mapped in the child): the
//! child's new allocations go to glibc, and freeing a pointer inherited from the region is
//! ignored; touching such a pointer in the child is a segmentation fault. A child that calls
//! `exec` (the common case) is unaffected.
//!
//! # Failure
//! If the region cannot be created (no servers, unreachable, wrong key), the reason is printed
//! once on standard error and every allocation stays local.

#![allow(clippy::not_unsafe_ptr_arg_deref)]
// The unit tests exclude the interposed entry points, which are what use the rest.
#![cfg_attr(test, allow(dead_code))]

pub mod heap;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use heap::Heap;
use mosaic_netram::{parse_size, NetRam, NetRamConfig, PAGE_SIZE};
use mosaic_pager::FaultMode;
use mosaic_transport::ClusterKey;

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

/// Mosaic's own allocations, wherever they come from in this library, go straight to glibc:
/// never to the region they serve.
struct Glibc;

// SAFETY: glibc's allocator functions meet GlobalAlloc's contract (alignment via memalign).
unsafe impl GlobalAlloc for Glibc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: plain calls into glibc's allocator.
        unsafe {
            if l.align() <= 16 {
                __libc_malloc(l.size()).cast()
            } else {
                __libc_memalign(l.align(), l.size()).cast()
            }
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, _l: Layout) {
        // SAFETY: `p` came from `alloc` above.
        unsafe { __libc_free(p.cast()) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`; memalign memory is zeroed by hand.
        unsafe {
            if l.align() <= 16 {
                __libc_calloc(1, l.size()).cast()
            } else {
                let p: *mut u8 = __libc_memalign(l.align(), l.size()).cast();
                if !p.is_null() {
                    std::ptr::write_bytes(p, 0, l.size());
                }
                p
            }
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        // SAFETY: as in `alloc`; over-aligned blocks are moved by hand.
        unsafe {
            if l.align() <= 16 {
                return __libc_realloc(p.cast(), size).cast();
            }
            let n = self.alloc(Layout::from_size_align_unchecked(size, l.align()));
            if !n.is_null() {
                std::ptr::copy_nonoverlapping(p, n, l.size().min(size));
                self.dealloc(p, l);
            }
            n
        }
    }
}

#[global_allocator]
static GLIBC: Glibc = Glibc;

thread_local! {
    /// Set while Mosaic code runs on this thread: its allocations go to glibc.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Smallest request placed on network RAM; 0 until read from the environment.
static THRESHOLD: AtomicUsize = AtomicUsize::new(0);
/// Set in a forked child, or once the region failed: everything goes to glibc.
static DISABLED: AtomicBool = AtomicBool::new(false);
static BACKEND: OnceLock<Option<Backend>> = OnceLock::new();

struct Backend {
    ram: NetRam,
    heap: Mutex<Heap>,
    base: usize,
    len: usize,
}

/// Runs `f` with the re-entrancy flag set.
fn inside<T>(f: impl FnOnce() -> T) -> T {
    let was = INSIDE.with(|i| i.replace(true));
    let v = f();
    INSIDE.with(|i| i.set(was));
    v
}

fn is_inside() -> bool {
    INSIDE.with(Cell::get)
}

/// `getenv` without allocating (safe to call from inside malloc).
fn env(name: &std::ffi::CStr) -> Option<&'static str> {
    // SAFETY: getenv returns NULL or a pointer into the environment, valid until it changes;
    // the program does not change these variables while running under mosrun.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string from the environment.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_str().ok()
}

fn threshold() -> usize {
    let t = THRESHOLD.load(Ordering::Relaxed);
    if t != 0 {
        return t;
    }
    let t = env(c"MOSAIC_THRESHOLD")
        .and_then(|s| parse_size(s).ok())
        .map_or(1 << 20, |v| usize::try_from(v).unwrap_or(usize::MAX))
        .max(PAGE_SIZE);
    THRESHOLD.store(t, Ordering::Relaxed);
    t
}

fn report(msg: &str) {
    let line = format!("mosaic: {msg}\n");
    // SAFETY: write(2) of a valid buffer to standard error.
    let _ = unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

fn init() -> Option<Backend> {
    inside(|| {
        let servers: Vec<String> =
            env(c"MOSAIC_SERVERS")?.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        let key = match ClusterKey::from_env() {
            Ok(k) => k,
            Err(e) => {
                report(&format!("network RAM is off: {e}"));
                return None;
            }
        };
        let size = env(c"MOSAIC_NETRAM_SIZE").and_then(|s| parse_size(s).ok()).unwrap_or(16 << 30);
        let budget = env(c"MOSAIC_LOCAL_BUDGET").and_then(|s| parse_size(s).ok()).unwrap_or(1 << 30);
        let mut cfg = NetRamConfig::new(servers, key, size, budget);
        if let Some(c) = env(c"MOSAIC_COPIES").and_then(|s| s.parse().ok()) {
            cfg.copies = c;
        }
        cfg.fault_mode = FaultMode::PerCpu;
        cfg.name = "preload".into();
        match NetRam::new(cfg) {
            Ok(ram) => {
                let (base, len) = (ram.as_ptr() as usize, ram.len());
                let heap = Mutex::new(Heap::new((len / PAGE_SIZE) as u64, PAGE_SIZE as u64));
                // A forked child has no region: it must not use it.
                // SAFETY: registering a plain function as the fork child handler.
                unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
                Some(Backend { ram, heap, base, len })
            }
            Err(e) => {
                report(&format!("network RAM is off, allocations stay local: {e}"));
                None
            }
        }
    })
}

extern "C" fn in_child() {
    DISABLED.store(true, Ordering::Relaxed);
}

fn backend() -> Option<&'static Backend> {
    if DISABLED.load(Ordering::Relaxed) {
        return None;
    }
    BACKEND.get_or_init(init).as_ref()
}

fn lock(b: &Backend) -> std::sync::MutexGuard<'_, Heap> {
    b.heap.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Places `size` bytes aligned to `align` on network RAM, or returns NULL (the caller falls back
/// to glibc).
fn big_alloc(size: usize, align: usize) -> *mut c_void {
    if is_inside() || size < threshold() {
        return std::ptr::null_mut();
    }
    let Some(b) = backend() else { return std::ptr::null_mut() };
    match inside(|| lock(b).alloc(size, align as u64)) {
        Some(off) => (b.base + usize::try_from(off).unwrap_or(0)) as *mut c_void,
        None => std::ptr::null_mut(),
    }
}

/// The backend and byte offset of `p`, if it lies in the region.
fn ours(p: *mut c_void) -> Option<(&'static Backend, u64)> {
    let b = BACKEND.get()?.as_ref()?;
    let a = p as usize;
    (a >= b.base && a < b.base + b.len).then(|| (b, (a - b.base) as u64))
}

/// Frees a region allocation: its pages are discarded (zeros, no write-back) before they can be
/// handed out again.
fn big_free(b: &Backend, off: u64) {
    if DISABLED.load(Ordering::Relaxed) {
        return; // a forked child: the region is not mapped here
    }
    inside(|| {
        let Some(block) = lock(b).get(off) else { return };
        if let Err(e) = b.ram.discard(block.start, block.pages) {
            report(&format!("freeing {} pages failed: {e}", block.pages));
        }
        lock(b).free(off);
    });
}

fn size_of_ours(b: &Backend, off: u64) -> usize {
    inside(|| lock(b).get(off).map_or(0, |blk| usize::try_from(blk.pages).unwrap_or(0) * PAGE_SIZE))
}

/// The interposed entry points. Not compiled into this crate's own tests, where they would
/// replace the test harness's allocator.
#[cfg(not(test))]
mod interpose {
    use super::*;

    /// glibc's malloc_usable_size, found with dlsym on first use.
    fn real_usable_size(p: *mut c_void) -> usize {
        static REAL: AtomicUsize = AtomicUsize::new(0);
        let mut f = REAL.load(Ordering::Relaxed);
        if f == 0 {
            // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; it may allocate, which the
            // re-entrancy flag sends to glibc.
            f = inside(|| unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) }) as usize;
            REAL.store(f, Ordering::Relaxed);
        }
        if f == 0 {
            return 0;
        }
        // SAFETY: `f` is glibc's malloc_usable_size, of this signature.
        let real: extern "C" fn(*mut c_void) -> usize = unsafe { std::mem::transmute(f) };
        real(p)
    }

    #[no_mangle]
    pub extern "C" fn malloc(size: usize) -> *mut c_void {
        let p = big_alloc(size, PAGE_SIZE);
        if !p.is_null() {
            return p;
        }
        // SAFETY: glibc's allocator.
        unsafe { __libc_malloc(size) }
    }

    #[no_mangle]
    pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
        let Some(total) = n.checked_mul(size) else {
            // SAFETY: errno is thread-local.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            return std::ptr::null_mut();
        };
        // Region pages handed out are fresh or discarded: they read as zeros already.
        let p = big_alloc(total, PAGE_SIZE);
        if !p.is_null() {
            return p;
        }
        // SAFETY: glibc's allocator.
        unsafe { __libc_calloc(n, size) }
    }

    #[no_mangle]
    pub extern "C" fn free(p: *mut c_void) {
        if p.is_null() {
            return;
        }
        match ours(p) {
            Some((b, off)) => big_free(b, off),
            // SAFETY: not ours, so glibc's.
            None => unsafe { __libc_free(p) },
        }
    }

    #[no_mangle]
    pub extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
        if p.is_null() {
            return malloc(size);
        }
        if size == 0 {
            free(p);
            return std::ptr::null_mut();
        }
        let (old_size, mine) = match ours(p) {
            Some((b, off)) => {
                let have = size_of_ours(b, off);
                if size <= have {
                    return p;
                }
                (have, true)
            }
            None => {
                if is_inside() || size < threshold() || DISABLED.load(Ordering::Relaxed) {
                    // SAFETY: glibc's pointer, glibc's realloc.
                    return unsafe { __libc_realloc(p, size) };
                }
                (real_usable_size(p), false)
            }
        };
        let n = malloc(size);
        if n.is_null() {
            return n;
        }
        // SAFETY: both blocks are live and at least this long; they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), n.cast::<u8>(), old_size.min(size)) };
        if mine {
            free(p);
        } else {
            // SAFETY: glibc's pointer.
            unsafe { __libc_free(p) };
        }
        n
    }

    fn aligned(align: usize, size: usize) -> *mut c_void {
        let p = big_alloc(size, align.max(PAGE_SIZE));
        if !p.is_null() {
            return p;
        }
        // SAFETY: glibc's allocator.
        unsafe { __libc_memalign(align, size) }
    }

    #[no_mangle]
    pub extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> libc::c_int {
        if out.is_null() || !align.is_power_of_two() || align % size_of::<usize>() != 0 {
            return libc::EINVAL;
        }
        let p = aligned(align, size);
        if p.is_null() {
            return libc::ENOMEM;
        }
        // SAFETY: `out` is a valid pointer from the caller.
        unsafe { *out = p };
        0
    }

    #[no_mangle]
    pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
        if !align.is_power_of_two() {
            // SAFETY: errno is thread-local.
            unsafe { *libc::__errno_location() = libc::EINVAL };
            return std::ptr::null_mut();
        }
        aligned(align, size)
    }

    #[no_mangle]
    pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
        aligned(align, size)
    }

    #[no_mangle]
    pub extern "C" fn valloc(size: usize) -> *mut c_void {
        aligned(PAGE_SIZE, size)
    }

    #[no_mangle]
    pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
        aligned(PAGE_SIZE, size.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE)
    }

    #[no_mangle]
    pub extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
        if p.is_null() {
            return 0;
        }
        match ours(p) {
            Some((b, off)) => size_of_ours(b, off),
            None => real_usable_size(p),
        }
    }

    fn sys_mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut c_void {
        // SAFETY: the raw system call, exactly as the caller asked.
        let r = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) };
        r as *mut c_void
    }

    #[no_mangle]
    pub extern "C" fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut c_void {
        let anon_private = flags & (libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
            == (libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
            && flags
                & (libc::MAP_FIXED
                    | libc::MAP_SHARED
                    | libc::MAP_FIXED_NOREPLACE
                    | libc::MAP_GROWSDOWN
                    | libc::MAP_STACK)
                == 0;
        if addr.is_null() && anon_private && prot == libc::PROT_READ | libc::PROT_WRITE {
            let p = big_alloc(len, PAGE_SIZE);
            if !p.is_null() {
                return p;
            }
        }
        sys_mmap(addr, len, prot, flags, fd, off)
    }

    #[no_mangle]
    pub extern "C" fn munmap(addr: *mut c_void, len: usize) -> i32 {
        if let Some((b, off)) = ours(addr) {
            big_free(b, off);
            return 0;
        }
        // SAFETY: the raw system call, exactly as the caller asked.
        let r = unsafe { libc::syscall(libc::SYS_munmap, addr, len) };
        i32::try_from(r).unwrap_or(-1)
    }

    #[no_mangle]
    pub extern "C" fn mremap(
        old: *mut c_void,
        old_len: usize,
        new_len: usize,
        flags: i32,
        new_addr: *mut c_void,
    ) -> *mut c_void {
        if let Some((b, off)) = ours(old) {
            if new_len <= size_of_ours(b, off) {
                return old;
            }
            if flags & libc::MREMAP_MAYMOVE == 0 {
                // SAFETY: errno is thread-local.
                unsafe { *libc::__errno_location() = libc::ENOMEM };
                return libc::MAP_FAILED;
            }
            let n = malloc(new_len);
            if n.is_null() {
                return libc::MAP_FAILED;
            }
            // SAFETY: both blocks are live and at least old_len long; they do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(old.cast::<u8>(), n.cast::<u8>(), old_len.min(new_len)) };
            big_free(b, off);
            return n;
        }
        // SAFETY: the raw system call, exactly as the caller asked.
        let r = unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) };
        r as *mut c_void
    }
}
