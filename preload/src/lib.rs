//! `libmosaic_preload.so`: an unmodified program's memory on network RAM.
//!
//! Loaded with `LD_PRELOAD` (normally by `mosrun`), it interposes `malloc`, `calloc`, `realloc`,
//! `free`, `posix_memalign`, `aligned_alloc`, `memalign`, `valloc`, `pvalloc`,
//! `malloc_usable_size`, `mmap` (and `mmap64`)/`munmap`/`mremap` of private anonymous memory, and
//! `madvise`.
//! One network-RAM region holds the program's memory, created when the library is loaded:
//! - requests of at least the threshold (default 1 MiB), and private anonymous `mmap`s of that
//!   size, are carved out of the region's page heap, whole pages each;
//! - smaller requests go to mimalloc, whose only memory is an arena of the region (a quarter of
//!   its address space; see [`small`]), so a program made of small allocations keeps to the
//!   budget too.
//!
//! What stays outside the region: what was allocated before it existed (by the dynamic loader
//! and libc's start-up), thread stacks, small `mmap`s, and Mosaic's own memory (its start-up,
//! its threads, the victim cache, buffers), all of which go to glibc (`__libc_malloc` and
//! friends) or the kernel. The budget counts them: the region keeps to what they leave.
//! With `MOSAIC_SMALL=0` (`mosrun --large-only`) small requests go to glibc and the region is
//! created at the first large one.
//!
//! # Mappings
//! On region memory, `munmap`, `mremap` and `madvise` behave as the kernel's do on anonymous
//! memory, page by page: unmapping part of a block keeps the rest allocated (an allocator that
//! maps too much and trims the ends keeps exactly its middle), `mremap` shrinks in place, grows in
//! place when the pages after are free and moves otherwise (with `MREMAP_MAYMOVE`), and
//! `MADV_DONTNEED`/`MADV_FREE` make the pages read as zeros (their copies on the servers are
//! freed). `MREMAP_DONTUNMAP` on region memory fails with `EINVAL`.
//!
//! # Configuration (environment, read once when the library is loaded)
//! - `MOSAIC_SERVERS`: memory servers, comma-separated URIs (required; without it nothing changes).
//! - `MOSAIC_CLUSTER_KEY` or `MOSAIC_CLUSTER_KEY_FILE`: the cluster key.
//! - `MOSAIC_LOCAL_BUDGET`: local RAM for the region (default 1G).
//! - `MOSAIC_THRESHOLD`: smallest allocation placed on the region's page heap (default 1M).
//! - `MOSAIC_NETRAM_SIZE`: address space reserved for the region (default 16G; a quarter of it
//!   is the small allocations' arena).
//! - `MOSAIC_SMALL`: `0` keeps allocations below the threshold in glibc's heap, outside the
//!   region (default: on).
//! - `MOSAIC_COPIES`: copies of each page (default 2 with two or more servers).
//!
//! - `MOSAIC_MIGRATE_SIGNAL`: a real-time signal number; the process gets the checkpoint handler
//!   of process migration for it (`mosrun --migratable` sets it; see `mosaic_migrate::process`).
//!   Works with or without network RAM (a process with a network-RAM region cannot migrate yet).
//! - `MOSAIC_STATS`: when set (to anything but `0`), each process prints one line of network-RAM
//!   counters on standard error when it exits (`mosrun --stats`).
//! - `MOSAIC_BUDGET_FD`: a descriptor of the budget shared by a `mosrun` job's processes (set
//!   by `mosrun`). Without it the process makes its own, which the children it forks share.
//!
//! # Threads, signals, fork
//! Thread-safe: one lock guards the region's page heap, mimalloc is thread-safe; a thread-local
//! flag sends allocations made while Mosaic itself runs (its start-up, and for their whole
//! lives the threads it starts: see the interposed `pthread_create`) to glibc. Faults are served by
//! one pinned worker per CPU, so system calls that read into large buffers work.
//!
//! `fork` works as it does for anonymous memory: the child sees the parent's allocations as
//! they were at the fork, and each side's writes afterwards are its own. Fork handlers clone
//! the region's session on the servers (copy-on-write there) just before the fork, and the
//! child adopts the inherited mapping with a region of its own (see `mosaic_netram`'s fork
//! module). Parent and children keep within one shared budget. If the child cannot adopt the
//! region (a server is unreachable), a message says so and the region is unmapped in the
//! child: with small allocations on the region (the default) its heap is gone, and it exits
//! with status 71; with `MOSAIC_SMALL=0` it goes on, and touching a large allocation is a
//! segmentation fault, never a read of zeros. `system()` and
//! `posix_spawn` do not run fork handlers and cost nothing; neither does a child that execs.
//!
//! # Failure
//! If the region cannot be created (no servers, unreachable, wrong key), the reason is printed
//! once on standard error and every allocation stays local.

#![allow(clippy::not_unsafe_ptr_arg_deref)]
// The unit tests exclude the interposed entry points, which are what use the rest.
#![cfg_attr(any(test, fuzzing), allow(dead_code, clippy::cast_possible_truncation))]

pub mod heap;
pub mod small;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Mutex, OnceLock};

use heap::Heap;
use mosaic_netram::{parse_size, ForkTicket, NetRam, NetRamConfig, SharedBudget, PAGE_SIZE};
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
    /// Set while Mosaic code runs on this thread, and for good on the threads Mosaic starts:
    /// their allocations go to glibc.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// The environment as it was when the library was loaded: a program that changes its
/// environment later (Python's `os.environ`, `setenv`) changes nothing here.
struct Config {
    servers: Option<String>,
    key: Result<ClusterKey, String>,
    size: u64,
    budget: u64,
    threshold: usize,
    copies: Option<usize>,
    /// The descriptor of the budget shared by a `mosrun` job's processes.
    budget_fd: Option<i32>,
    /// Print the region's counters at exit.
    stats: bool,
    /// Small allocations on the region too (mimalloc over an arena of it).
    small: bool,
}

impl Config {
    fn from_env() -> Config {
        let size_of =
            |name: &std::ffi::CStr, default: u64| env(name).and_then(|s| parse_size(s).ok()).unwrap_or(default);
        Config {
            servers: env(c"MOSAIC_SERVERS").map(String::from),
            key: ClusterKey::from_env().map_err(|e| e.to_string()),
            size: size_of(c"MOSAIC_NETRAM_SIZE", 16 << 30),
            budget: size_of(c"MOSAIC_LOCAL_BUDGET", 1 << 30),
            threshold: usize::try_from(size_of(c"MOSAIC_THRESHOLD", 1 << 20)).unwrap_or(usize::MAX).max(PAGE_SIZE),
            copies: env(c"MOSAIC_COPIES").and_then(|s| s.parse().ok()),
            budget_fd: env(c"MOSAIC_BUDGET_FD").and_then(|s| s.parse().ok()),
            stats: env(c"MOSAIC_STATS").is_some_and(|s| !s.is_empty() && s != "0"),
            small: env(c"MOSAIC_SMALL").is_none_or(|s| !matches!(s, "0" | "off" | "no" | "false")),
        }
    }
}

static CONFIG: OnceLock<Config> = OnceLock::new();

fn config() -> &'static Config {
    CONFIG.get_or_init(|| inside(Config::from_env))
}

/// Reads the environment when the library is loaded, before the program runs, and creates the
/// region then if small allocations go to it (every allocation after this one can).
extern "C" fn read_env_at_load() {
    // Before mimalloc's own constructor: its page map is mapped here, outside the region.
    inside(small::start);
    let c = config();
    if c.stats {
        // SAFETY: duplicating standard error to a close-on-exec descriptor of our own.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 100) };
        STATS_FD.store(fd, Ordering::Relaxed);
    }
    if c.small && c.servers.is_some() {
        backend();
    }
    if let Some(sig) = env(c"MOSAIC_MIGRATE_SIGNAL") {
        match sig.parse::<i32>() {
            Ok(n) if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&n) => {
                if let Err(e) = mosaic_migrate::process::shim::install(n) {
                    report(&format!("migration is off: cannot set the handler of signal {n}: {e}"));
                }
            }
            _ => report(&format!("migration is off: MOSAIC_MIGRATE_SIGNAL={sig} is not a real-time signal")),
        }
    }
}

/// Where the exit report goes: a copy of standard error taken at load, because programs close
/// theirs before they exit (xz does, to catch write errors).
static STATS_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

#[used]
#[link_section = ".init_array"]
static READ_ENV_AT_LOAD: extern "C" fn() = read_env_at_load;
/// Set in a forked child, or once the region failed: everything goes to glibc.
static DISABLED: AtomicBool = AtomicBool::new(false);
static BACKEND: OnceLock<Option<Backend>> = OnceLock::new();

struct Backend {
    /// The region; replaced (never freed) only in a forked child, where no other thread runs.
    ram: AtomicPtr<NetRam>,
    /// The region's pages, for allocations of at least the threshold; the small allocations'
    /// arena is one block of it, allocated for good.
    heap: Mutex<Heap>,
    /// Where allocations below the threshold go, when they go to the region.
    small: Option<small::Arena>,
    base: usize,
    len: usize,
}

impl Backend {
    fn ram(&self) -> &NetRam {
        // SAFETY: the pointer comes from `Box::into_raw` and is never freed: it is replaced only
        // in a forked child (see `fork_child`), where the old region is leaked, not dropped.
        unsafe { &*self.ram.load(Ordering::Acquire) }
    }
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
    config().threshold
}

fn report(msg: &str) {
    let line = format!("mosaic: {msg}\n");
    // SAFETY: write(2) of a valid buffer to standard error.
    let _ = unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

fn init() -> Option<Backend> {
    inside(|| {
        let c = config();
        let servers: Vec<String> =
            c.servers.as_ref()?.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        let key = match &c.key {
            Ok(k) => k.clone(),
            Err(e) => {
                report(&format!("network RAM is off: {e}"));
                return None;
            }
        };
        let mut cfg = NetRamConfig::new(servers, key, c.size, c.budget);
        if let Some(n) = c.copies {
            cfg.copies = n;
        }
        cfg.fault_mode = FaultMode::PerCpu;
        cfg.name = "preload".into();
        cfg.shared_budget = shared_budget(c);
        // The budget is the program's local RAM: its own heap, stacks and Mosaic's buffers
        // count, and the network RAM region gets what they leave.
        cfg.count_process_memory = true;
        match NetRam::new(cfg) {
            Ok(ram) => {
                let (base, len) = (ram.as_ptr() as usize, ram.len());
                let mut heap = Heap::new((len / PAGE_SIZE) as u64, PAGE_SIZE as u64);
                let small = if c.small { small_arena(&mut heap, base, len) } else { None };
                let heap = Mutex::new(heap);
                // SAFETY: registering plain functions as fork handlers.
                unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
                if c.stats {
                    // SAFETY: registering a plain function to run at exit.
                    unsafe { libc::atexit(print_stats) };
                }
                Some(Backend { ram: AtomicPtr::new(Box::into_raw(Box::new(ram))), heap, small, base, len })
            }
            Err(e) => {
                report(&format!("network RAM is off, allocations stay local: {}", mosaic_transport::error_chain(&e)));
                None
            }
        }
    })
}

/// Allocates a quarter of the region for good and hands it to mimalloc, for the allocations
/// below the threshold.
fn small_arena(heap: &mut Heap, base: usize, len: usize) -> Option<small::Arena> {
    let size = (len / 4) / small::ARENA_ALIGN * small::ARENA_ALIGN;
    if size < small::ARENA_MIN {
        report("small allocations stay local: the region is too small for their arena");
        return None;
    }
    // Aligned in the address space, not within the region (whose start is only page-aligned).
    let off = heap.alloc(size + small::ARENA_ALIGN, PAGE_SIZE as u64)?;
    let start = (base + usize::try_from(off).ok()?).next_multiple_of(small::ARENA_ALIGN);
    // SAFETY: the block is region memory (mapped, zero until written), allocated in the heap for
    // the rest of the process, so nothing else is placed there; this runs once, in `init`.
    let arena = unsafe { small::Arena::adopt(start, size) };
    if arena.is_none() {
        report("small allocations stay local: the allocator refused its arena");
    }
    arena
}

/// The job's shared budget (from `mosrun`), or one of this process's own, which the children
/// it forks share.
fn shared_budget(c: &Config) -> Option<SharedBudget> {
    let made = match c.budget_fd {
        Some(fd) => SharedBudget::open(fd),
        None => SharedBudget::create(c.budget).map(|(b, _fd)| b),
    };
    made.map_err(|e| report(&format!("each process keeps its own budget: {}", mosaic_transport::error_chain(&e)))).ok()
}

thread_local! {
    /// Between the fork handlers (which run on the forking thread): the heap, locked so the
    /// child's copy is consistent, and what the region prepared.
    static FORKING: std::cell::RefCell<Option<(std::sync::MutexGuard<'static, Heap>, Option<ForkTicket>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Before `fork`: the heap is locked and the region prepared for the child (cloned on the
/// servers). If that fails, the child does without the region.
extern "C" fn fork_prepare() {
    let Some(b) = BACKEND.get().and_then(Option::as_ref).filter(|_| !DISABLED.load(Ordering::Relaxed)) else {
        return;
    };
    inside(|| {
        let heap = lock(b);
        let ticket = match b.ram().prepare_fork() {
            Ok(t) => Some(t),
            Err(e) => {
                report(&format!(
                    "fork: the child will not have the parent's large allocations: {}",
                    mosaic_transport::error_chain(&e)
                ));
                None
            }
        };
        FORKING.with(|f| *f.borrow_mut() = Some((heap, ticket)));
    });
}

/// After `fork` (or a failed one) in the parent.
extern "C" fn fork_parent() {
    inside(|| {
        let Some((heap, ticket)) = FORKING.with(|f| f.borrow_mut().take()) else { return };
        if let (Some(t), Some(b)) = (ticket, BACKEND.get().and_then(Option::as_ref)) {
            b.ram().fork_parent(t);
        }
        drop(heap);
    });
}

/// After `fork` in the child: the region becomes the child's own copy, or, if it cannot, the
/// child does without it (its addresses then fault; never read as zeros).
extern "C" fn fork_child() {
    inside(|| {
        let forking = FORKING.with(|f| f.borrow_mut().take());
        let Some(b) = BACKEND.get().and_then(Option::as_ref) else { return };
        let Some((heap, Some(ticket))) = forking else {
            DISABLED.store(true, Ordering::Relaxed);
            if b.small.is_some() {
                child_without_heap();
            }
            return;
        };
        // SAFETY: only this thread exists in the child. The parent's region is read out of its
        // box and handed to `fork_child`, which leaks what belongs to the parent; the box is
        // left allocated (never used again: it is replaced below, or the shim is disabled).
        let parent = unsafe { std::ptr::read(b.ram.load(Ordering::Acquire)) };
        match parent.fork_child(ticket) {
            Ok(ram) => b.ram.store(Box::into_raw(Box::new(ram)), Ordering::Release),
            Err(e) => {
                report(&format!(
                    "fork: the child lost the parent's large allocations: {}",
                    mosaic_transport::error_chain(&e)
                ));
                DISABLED.store(true, Ordering::Relaxed);
                if b.small.is_some() {
                    child_without_heap();
                }
            }
        }
        drop(heap);
    });
}

/// A forked child that could not adopt the region has lost its whole heap (small allocations
/// and mimalloc's own state are in the region): it says so and exits with status 71
/// (`EX_OSERR`) rather than crash at its next allocation or read a heap that is not there.
fn child_without_heap() -> ! {
    report("fork: the child cannot reach the parent's heap on network RAM and exits (status 71)");
    // SAFETY: ending the process at once, without running the program's exit handlers.
    unsafe { libc::_exit(71) }
}

/// At exit with `MOSAIC_STATS`: one line of the region's counters on standard error.
extern "C" fn print_stats() {
    let Some(b) = BACKEND.get().and_then(Option::as_ref).filter(|_| !DISABLED.load(Ordering::Relaxed)) else {
        return;
    };
    let fd = STATS_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    inside(|| {
        let line = format!("mosaic: {}\n", stats_line(std::process::id(), &b.ram().stats(), &b.ram().region().stats()));
        // SAFETY: write(2) of a valid buffer to our copy of standard error.
        let _ = unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
    });
}

/// The exit report: what the pager served and what network RAM did, in `key=value` pairs.
fn stats_line(pid: u32, n: &mosaic_netram::NetRamStats, p: &mosaic_pager::PagerStats) -> String {
    format!(
        "stats pid={pid} faults={} fetched={} zero_filled={} cache_hits={} prefetched={} evicted={} \
         written_back={} throttled={} failovers={} lost={} resident_pages={} outside_pages={} under_replicated={} cached_pages={}",
        p.faults,
        n.fetched,
        n.zero_filled,
        n.cache_hits,
        n.prefetched,
        n.evicted,
        n.written_back,
        n.throttled,
        n.failovers,
        n.lost,
        n.resident,
        n.outside,
        n.under_replicated,
        n.cached,
    )
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

/// The backend and byte offset of `p`, if it lies in the region's page heap, outside the small
/// allocations' arena.
fn ours(p: *mut c_void) -> Option<(&'static Backend, u64)> {
    let b = BACKEND.get()?.as_ref()?;
    let a = p as usize;
    (a >= b.base && a < b.base + b.len && !b.small.as_ref().is_some_and(|s| s.contains(p)))
        .then(|| (b, (a - b.base) as u64))
}

/// The small allocations' arena, if `p` lies in it.
fn arena_of(p: *const c_void) -> Option<&'static small::Arena> {
    BACKEND.get()?.as_ref()?.small.as_ref().filter(|s| s.contains(p))
}

/// The arena for a new allocation below the threshold, unless it goes to glibc: the caller is
/// Mosaic itself, the region is off or not made yet (never made here: see `read_env_at_load`),
/// or this is a forked child without it.
fn small_target() -> Option<&'static small::Arena> {
    if is_inside() || DISABLED.load(Ordering::Relaxed) {
        return None;
    }
    BACKEND.get()?.as_ref()?.small.as_ref()
}

/// `size` bytes below the threshold from the arena, or NULL (the caller goes to glibc).
fn small_alloc(size: usize, f: impl FnOnce(&small::Arena) -> *mut c_void) -> *mut c_void {
    if size >= threshold() {
        return std::ptr::null_mut();
    }
    small_target().map_or(std::ptr::null_mut(), f)
}

/// Frees a region allocation: its pages are discarded (zeros, no write-back) before they can be
/// handed out again.
fn big_free(b: &Backend, off: u64) {
    if DISABLED.load(Ordering::Relaxed) {
        return; // a forked child: the region is not mapped here
    }
    inside(|| {
        let Some(block) = lock(b).get(off) else { return };
        if let Err(e) = b.ram().discard(block.start, block.pages) {
            report(&format!("freeing {} pages failed: {}", block.pages, mosaic_transport::error_chain(&e)));
        }
        lock(b).free(off);
    });
}

/// Unmaps region pages `first..first + pages` as `munmap` does: the allocated ones are discarded
/// (they read as zeros if handed out again; their copies on the servers are freed), then given
/// back to the heap, trimming or splitting the blocks they belonged to.
fn unmap_pages(b: &Backend, first: u64, pages: u64) {
    if DISABLED.load(Ordering::Relaxed) {
        return;
    }
    inside(|| {
        // Discarded while still allocated, so no other thread can be handed them meanwhile.
        discard_pages(b, first, pages);
        lock(b).release(first, pages);
    });
}

/// Makes the allocated pages among `first..first + pages` read as zeros (`MADV_DONTNEED`).
fn discard_pages(b: &Backend, first: u64, pages: u64) {
    inside(|| {
        let runs = lock(b).allocated_within(first, pages);
        for (s, n) in runs {
            if let Err(e) = b.ram().discard(s, n) {
                report(&format!("discarding {n} pages failed: {}", mosaic_transport::error_chain(&e)));
            }
        }
    });
}

/// How `[addr, addr + len)` meets the region: the byte ranges before and after it (for the
/// kernel) and the region's pages in between (first page, pages), `len` rounded up to pages.
struct Split {
    before: Option<(usize, usize)>,
    pages: Option<(u64, u64)>,
    after: Option<(usize, usize)>,
}

fn split(b: &Backend, addr: usize, len: usize) -> Split {
    let end = addr.saturating_add(len.div_ceil(PAGE_SIZE) * PAGE_SIZE);
    let (lo, hi) = (addr.max(b.base), end.min(b.base + b.len));
    Split {
        before: (addr < b.base).then(|| (addr, end.min(b.base) - addr)),
        pages: (lo < hi).then(|| (((lo - b.base) / PAGE_SIZE) as u64, ((hi - lo) / PAGE_SIZE) as u64)),
        after: (end > b.base + b.len).then(|| (addr.max(b.base + b.len), end - addr.max(b.base + b.len))),
    }
}

/// The backend, if `[addr, addr + len)` touches the region.
fn overlapping(addr: usize, len: usize) -> Option<&'static Backend> {
    let b = BACKEND.get()?.as_ref()?;
    (addr < b.base + b.len && addr.saturating_add(len) > b.base).then_some(b)
}

fn set_errno(e: i32) {
    // SAFETY: errno is thread-local.
    unsafe { *libc::__errno_location() = e };
}

fn size_of_ours(b: &Backend, off: u64) -> usize {
    inside(|| lock(b).get(off).map_or(0, |blk| usize::try_from(blk.pages).unwrap_or(0) * PAGE_SIZE))
}

/// The interposed entry points. Not compiled into this crate's own tests or the fuzz targets,
/// where they would replace the harness's allocator.
#[cfg(not(any(test, fuzzing)))]
mod interpose {
    use super::*;

    /// The address of the next definition of `name` after this library's (libc's), found with
    /// dlsym on first use and kept in `cache`; 0 if there is none.
    fn next_definition(cache: &std::sync::atomic::AtomicUsize, name: &std::ffi::CStr) -> usize {
        let mut f = cache.load(Ordering::Relaxed);
        if f == 0 {
            // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; it may allocate, which the
            // re-entrancy flag sends to glibc.
            f = inside(|| unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }) as usize;
            cache.store(f, Ordering::Relaxed);
        }
        f
    }

    /// libc's definition of the function this library interposes as `name`, typed as `ty` (its
    /// C signature), or `None` if libc has none.
    macro_rules! next_fn {
        ($name:literal as $ty:ty) => {{
            static CACHE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            match next_definition(&CACHE, $name) {
                0 => None,
                // SAFETY: the address dlsym gave for this name, a function of this signature.
                f => Some(unsafe { std::mem::transmute::<usize, $ty>(f) }),
            }
        }};
    }

    /// glibc's malloc_usable_size.
    fn real_usable_size(p: *mut c_void) -> usize {
        next_fn!(c"malloc_usable_size" as extern "C" fn(*mut c_void) -> usize).map_or(0, |real| real(p))
    }

    #[no_mangle]
    pub extern "C" fn malloc(size: usize) -> *mut c_void {
        let p = small_alloc(size, |a| a.alloc(size));
        if !p.is_null() {
            return p;
        }
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
        let p = small_alloc(total, |a| a.calloc(n, size));
        if !p.is_null() {
            return p;
        }
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
        if let Some(a) = arena_of(p) {
            if !DISABLED.load(Ordering::Relaxed) {
                // SAFETY: a block of the arena, which the program frees once.
                unsafe { a.free(p) };
            } // else a forked child without the region: the block is not mapped here
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
        if let Some(a) = arena_of(p) {
            if DISABLED.load(Ordering::Relaxed) {
                set_errno(libc::ENOMEM); // a forked child without the region: not mapped here
                return std::ptr::null_mut();
            }
            if size < threshold() {
                // SAFETY: a live block of the arena.
                let n = unsafe { a.realloc(p, size) };
                if !n.is_null() {
                    return n;
                }
                // The arena is full: the block moves out of it, as `malloc` would place it.
            }
            // SAFETY: as above.
            let old_size = unsafe { a.usable_size(p) };
            let n = malloc(size);
            if !n.is_null() {
                // SAFETY: both blocks are live and at least this long; they do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), n.cast::<u8>(), old_size.min(size)) };
                // SAFETY: a live block of the arena, moved out.
                unsafe { a.free(p) };
            }
            return n;
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
        let p = small_alloc(size, |a| a.aligned(align, size));
        if !p.is_null() {
            return p;
        }
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
        if let Some(a) = arena_of(p) {
            if DISABLED.load(Ordering::Relaxed) {
                return 0; // a forked child without the region: not mapped here
            }
            // SAFETY: a live block of the arena (the program's contract).
            return unsafe { a.usable_size(p) };
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

    type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
    type PthreadCreate =
        unsafe extern "C" fn(*mut libc::pthread_t, *const libc::pthread_attr_t, StartRoutine, *mut c_void) -> i32;

    /// `pthread_create`, interposed: a thread that Mosaic starts (the creator is inside Mosaic)
    /// is marked as Mosaic's before any of its code runs, so what libc allocates for it at its
    /// start (the C++ / Rust thread-exit list) goes to glibc too, not to the region it serves.
    /// The program's threads start as they would.
    #[no_mangle]
    pub unsafe extern "C" fn pthread_create(
        thread: *mut libc::pthread_t,
        attr: *const libc::pthread_attr_t,
        start: StartRoutine,
        arg: *mut c_void,
    ) -> i32 {
        let Some(real) = next_fn!(c"pthread_create" as PthreadCreate) else { return libc::EAGAIN };
        if !is_inside() {
            // SAFETY: the caller's arguments, passed on.
            return unsafe { real(thread, attr, start, arg) };
        }
        let job = Box::into_raw(Box::new((start, arg)));
        // SAFETY: the caller's arguments, with the start routine wrapped; `job` is handed to the
        // new thread, which owns it from then on.
        let rc = unsafe { real(thread, attr, start_marked, job.cast()) };
        if rc != 0 {
            // SAFETY: no thread was made, so `job` is still ours.
            drop(unsafe { Box::from_raw(job) });
        }
        rc
    }

    /// `setlocale`, interposed: the locale it loads is kept in glibc's heap, never the region's.
    /// Every thread reads the global locale when it starts (glibc's `__ctype_init`), Mosaic's
    /// fault workers too: in a forked child they would wait for a page only they can bring back.
    #[no_mangle]
    pub extern "C" fn setlocale(category: libc::c_int, locale: *const libc::c_char) -> *mut libc::c_char {
        let real = next_fn!(c"setlocale" as extern "C" fn(libc::c_int, *const libc::c_char) -> *mut libc::c_char);
        real.map_or(std::ptr::null_mut(), |real| inside(|| real(category, locale)))
    }

    /// `dlopen`, interposed: what the dynamic loader allocates for the library (its link map, its
    /// thread-local storage records) is kept in glibc's heap. `pthread_create` reads those
    /// records in the creating thread, also when Mosaic starts a forked child's fault workers,
    /// before any thread could bring an evicted page back.
    #[no_mangle]
    pub extern "C" fn dlopen(file: *const libc::c_char, flags: libc::c_int) -> *mut c_void {
        let real = next_fn!(c"dlopen" as extern "C" fn(*const libc::c_char, libc::c_int) -> *mut c_void);
        real.map_or(std::ptr::null_mut(), |real| inside(|| real(file, flags)))
    }

    /// `dlmopen`, interposed as `dlopen` is.
    #[no_mangle]
    pub extern "C" fn dlmopen(lmid: libc::c_long, file: *const libc::c_char, flags: libc::c_int) -> *mut c_void {
        let real = next_fn!(c"dlmopen" as extern "C" fn(libc::c_long, *const libc::c_char, libc::c_int) -> *mut c_void);
        real.map_or(std::ptr::null_mut(), |real| inside(|| real(lmid, file, flags)))
    }

    /// The start of a thread Mosaic made: marks it, then runs what was asked.
    extern "C" fn start_marked(job: *mut c_void) -> *mut c_void {
        INSIDE.with(|i| i.set(true));
        // SAFETY: `job` is the box `pthread_create` made for this thread, handed over once.
        let (start, arg) = *unsafe { Box::from_raw(job.cast::<(StartRoutine, *mut c_void)>()) };
        start(arg)
    }

    /// `mmap64`, the name programs built with `_FILE_OFFSET_BITS=64` call (CPython among them,
    /// for its object arenas): the same function as `mmap` on 64-bit Linux.
    #[no_mangle]
    pub extern "C" fn mmap64(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut c_void {
        mmap(addr, len, prot, flags, fd, off)
    }

    /// `sigaction`, interposed: a program's SIGBUS handler is recorded beside Mosaic's rather
    /// than replacing it (see `mosaic_pager::program_sigaction`); everything else goes to libc.
    #[no_mangle]
    pub unsafe extern "C" fn sigaction(
        sig: libc::c_int,
        act: *const libc::sigaction,
        old: *mut libc::sigaction,
    ) -> libc::c_int {
        // SAFETY: the caller's contract is sigaction(2)'s, which is what this one asks.
        unsafe { mosaic_pager::interposed_sigaction(sig, act, old) }
    }

    /// `signal`, interposed like `sigaction`.
    #[no_mangle]
    pub unsafe extern "C" fn signal(sig: libc::c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
        // SAFETY: the caller's contract is signal(2)'s, which is what this one asks.
        unsafe { mosaic_pager::interposed_signal(sig, handler) }
    }

    fn sys_munmap(addr: usize, len: usize) -> i32 {
        // SAFETY: the raw system call, exactly as the caller asked.
        let r = unsafe { libc::syscall(libc::SYS_munmap, addr, len) };
        i32::try_from(r).unwrap_or(-1)
    }

    #[no_mangle]
    pub extern "C" fn munmap(addr: *mut c_void, len: usize) -> i32 {
        let a = addr as usize;
        // Mosaic's own calls (its start-up, or code running inside it) go straight to the kernel.
        let target = overlapping(a, len).filter(|_| !DISABLED.load(Ordering::Relaxed) && !is_inside());
        let Some(b) = target else { return sys_munmap(a, len) };
        if a % PAGE_SIZE != 0 || len == 0 {
            set_errno(libc::EINVAL);
            return -1;
        }
        on_pages(b, a, len, |first, pages| unmap_pages(b, first, pages), sys_munmap)
    }

    /// Applies `ours` to the region's pages of `[addr, addr + len)` and `sys` to what lies
    /// outside the region; returns 0, or -1 if `sys` failed on a part.
    fn on_pages(
        b: &Backend,
        addr: usize,
        len: usize,
        ours: impl FnOnce(u64, u64),
        sys: impl Fn(usize, usize) -> i32,
    ) -> i32 {
        let sp = split(b, addr, len);
        if let Some((first, pages)) = sp.pages {
            ours(first, pages);
        }
        [sp.before, sp.after].into_iter().flatten().fold(0, |rc, (x, n)| rc | sys(x, n))
    }

    #[no_mangle]
    pub extern "C" fn madvise(addr: *mut c_void, len: usize, advice: i32) -> i32 {
        let a = addr as usize;
        let discard = advice == libc::MADV_DONTNEED || advice == libc::MADV_FREE;
        let sys = |x: usize, n: usize| {
            // SAFETY: the raw system call, exactly as the caller asked.
            let r = unsafe { libc::syscall(libc::SYS_madvise, x, n, advice) };
            i32::try_from(r).unwrap_or(-1)
        };
        let target = overlapping(a, len).filter(|_| discard && !DISABLED.load(Ordering::Relaxed) && !is_inside());
        let Some(b) = target else { return sys(a, len) };
        if a % PAGE_SIZE != 0 {
            set_errno(libc::EINVAL);
            return -1;
        }
        // The kernel would drop the local pages only, and the next touch would bring back the
        // old contents from the servers: discard them everywhere instead.
        on_pages(b, a, len, |first, pages| discard_pages(b, first, pages), sys)
    }

    /// Allocates `size` bytes in the region whatever the threshold (`mremap` moving region
    /// memory keeps it there), else as anonymous memory from the kernel.
    fn remap_target(b: &Backend, size: usize) -> *mut c_void {
        if let Some(off) = inside(|| lock(b).alloc(size, PAGE_SIZE as u64)) {
            return (b.base + usize::try_from(off).unwrap_or(0)) as *mut c_void;
        }
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        sys_mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0)
    }

    #[no_mangle]
    pub extern "C" fn mremap(
        old: *mut c_void,
        old_len: usize,
        new_len: usize,
        flags: i32,
        new_addr: *mut c_void,
    ) -> *mut c_void {
        let Some((b, off)) = ours(old).filter(|_| !DISABLED.load(Ordering::Relaxed) && !is_inside()) else {
            // SAFETY: the raw system call, exactly as the caller asked.
            let r = unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) };
            return r as *mut c_void;
        };
        let fail = |e: i32| {
            set_errno(e);
            libc::MAP_FAILED
        };
        let known = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
        if off % PAGE_SIZE as u64 != 0 || new_len == 0 || old_len == 0 || flags & !known != 0 {
            return fail(libc::EINVAL);
        }
        if flags & libc::MREMAP_FIXED != 0 {
            return fail(libc::EINVAL); // moving region memory to a fixed address: not supported
        }
        let first = off / PAGE_SIZE as u64;
        let old_pages = old_len.div_ceil(PAGE_SIZE) as u64;
        let new_pages = new_len.div_ceil(PAGE_SIZE) as u64;
        let held: u64 = inside(|| lock(b).allocated_within(first, old_pages)).iter().map(|r| r.1).sum();
        if held != old_pages {
            return fail(libc::EFAULT); // part of the old range is not mapped
        }
        if new_pages <= old_pages {
            unmap_pages(b, first + new_pages, old_pages - new_pages);
            return old;
        }
        // Pages after the block that are free were discarded when freed: they read as zeros,
        // as new anonymous pages do.
        if inside(|| lock(b).grow_in_place(first + old_pages, new_pages - old_pages)) {
            return old;
        }
        if flags & libc::MREMAP_MAYMOVE == 0 {
            return fail(libc::ENOMEM);
        }
        let n = remap_target(b, new_len);
        if n == libc::MAP_FAILED || n.is_null() {
            return fail(libc::ENOMEM);
        }
        // SAFETY: both ranges are mapped and at least old_pages pages long; they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(old.cast::<u8>(), n.cast::<u8>(), old_len.div_ceil(PAGE_SIZE) * PAGE_SIZE)
        };
        unmap_pages(b, first, old_pages);
        n
    }
}
