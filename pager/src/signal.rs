//! Serving faults on the faulting thread: the process-wide SIGBUS handler and the table of
//! regions it serves.
//!
//! With `UFFD_FEATURE_SIGBUS` a missing-page fault raises SIGBUS (code `BUS_ADRERR`) in the
//! faulting thread instead of queueing a message. The handler looks the address up in a fixed
//! table of regions (no allocation, no lock), serves the fault with the region's source, and
//! returns: the access is retried and finds the page. A SIGBUS that is not ours (another cause,
//! or a poisoned page: code `BUS_MCEERR_AR`) goes to the program's own handler, or gets the
//! default action (the process dies with SIGBUS, as it would have without Mosaic).
//!
//! # The program's own SIGBUS handler
//! The program's handler is the one installed before ours, or one it installs later: libraries
//! that link the pager (libmosaic, the LD_PRELOAD shim) interpose `sigaction` and `signal` (as
//! Android's libsigchain does) and hand SIGBUS requests to [`program_sigaction`], which records
//! the program's disposition and reports it back, leaving ours installed. So a program with its
//! own SIGBUS handler keeps both working: its faults in regions are served, its other SIGBUSes
//! reach its handler.
//!
//! # Lifetimes
//! The table holds a strong reference to each registered region. A handler announces itself in
//! `ACTIVE` before it reads the table; unregistering clears the slot and then waits until no
//! handler is active before it releases the reference, so a handler never sees a freed region.

use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::region_core::{wait_until, RegionCore, Served};
use crate::{ConfigError, PagerError, Retry};

/// Regions that can be registered at once in this mode.
const SLOTS: usize = 64;

static REGIONS: [AtomicPtr<RegionCore>; SLOTS] = [const { AtomicPtr::new(null_mut()) }; SLOTS];
/// Handlers currently between reading the table and finishing with what they found.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    /// The page this thread last failed to get. Kernels without CONFIG_MEMORY_FAILURE report an
    /// access to a poisoned page as an ordinary BUS_ADRERR, which would look like the next
    /// missing-page fault: a second SIGBUS for the same page is passed on instead, so the thread
    /// dies of SIGBUS rather than retrying forever. (Const-initialised and without a destructor,
    /// so reading it in a signal handler allocates nothing.)
    static LAST_LOST: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
}

/// The SIGBUS disposition before ours, or why ours could not be installed.
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();
/// The program's SIGBUS disposition set after ours was installed (null: `PREVIOUS` stands).
/// Each update leaks its predecessor: the handler may be reading it, and updates are rare.
static PROGRAM: AtomicPtr<libc::sigaction> = AtomicPtr::new(null_mut());
/// libc's `sigaction`, found past any interposer (`dlsym(RTLD_NEXT)`), as an address.
static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);

type SigactionFn = unsafe extern "C" fn(libc::c_int, *const libc::sigaction, *mut libc::sigaction) -> libc::c_int;

/// Calls libc's own `sigaction`, never an interposed one.
///
/// # Safety
/// As `sigaction(2)`: `act` and `old` are null or valid.
unsafe fn real_sigaction(sig: libc::c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> libc::c_int {
    let mut f = REAL_SIGACTION.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"sigaction".as_ptr()) } as usize;
        REAL_SIGACTION.store(f, Ordering::Release);
    }
    if f == 0 {
        // SAFETY: forwarded to the caller.
        return unsafe { libc::sigaction(sig, act, old) };
    }
    // SAFETY: `f` is libc's sigaction, of this signature.
    let real: SigactionFn = unsafe { std::mem::transmute::<usize, SigactionFn>(f) };
    // SAFETY: forwarded to the caller.
    unsafe { real(sig, act, old) }
}

/// Whether Mosaic's SIGBUS handler is installed: then the program's `sigaction(SIGBUS, ...)`
/// must go to [`program_sigaction`] instead of the kernel.
pub fn sigbus_claimed() -> bool {
    matches!(PREVIOUS.get(), Some(Ok(_)))
}

/// The program's current SIGBUS disposition, as it sees it.
fn program_disposition() -> libc::sigaction {
    let p = PROGRAM.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: a non-null PROGRAM points at a leaked, never freed, sigaction.
        return unsafe { *p };
    }
    match PREVIOUS.get() {
        Some(Ok(prev)) => *prev,
        // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask.
        _ => unsafe { std::mem::zeroed() },
    }
}

/// An interposed `sigaction(SIGBUS, act, old)` while [`sigbus_claimed`]: records `act` (if not
/// null) as the program's disposition, which Mosaic's handler passes foreign SIGBUSes to, and
/// writes the previous one to `old` (if not null). Returns 0, as `sigaction` does.
///
/// # Safety
/// `act` and `old` are null or point at valid `sigaction` structs.
pub unsafe fn program_sigaction(act: *const libc::sigaction, old: *mut libc::sigaction) -> libc::c_int {
    let was = program_disposition();
    if !act.is_null() {
        // SAFETY: the caller's valid sigaction.
        let new = Box::into_raw(Box::new(unsafe { *act }));
        PROGRAM.store(new, Ordering::Release);
    }
    if !old.is_null() {
        // SAFETY: the caller's valid, writable sigaction.
        unsafe { *old = was };
    }
    0
}

/// The body of an interposed `sigaction`: SIGBUS requests go to [`program_sigaction`] while
/// Mosaic's handler is installed, everything else to libc.
///
/// # Safety
/// As `sigaction(2)`.
pub unsafe fn interposed_sigaction(
    sig: libc::c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> libc::c_int {
    if sig == libc::SIGBUS && sigbus_claimed() {
        // SAFETY: forwarded to the caller.
        return unsafe { program_sigaction(act, old) };
    }
    // SAFETY: forwarded to the caller.
    unsafe { real_sigaction(sig, act, old) }
}

/// The body of an interposed `signal(sig, handler)` (the BSD semantics glibc gives it: the
/// handler stays installed, interrupted calls restart).
///
/// # Safety
/// As `signal(2)`.
pub unsafe fn interposed_signal(sig: libc::c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: a zeroed sigaction is a valid value to fill in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler;
    sa.sa_flags = libc::SA_RESTART;
    // SAFETY: `sa.sa_mask` is a valid sigset_t; its own signal is blocked while it runs.
    unsafe {
        libc::sigemptyset(&raw mut sa.sa_mask);
        libc::sigaddset(&raw mut sa.sa_mask, sig);
    }
    // SAFETY: as above, to receive the old disposition.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both point at valid structs.
    if unsafe { interposed_sigaction(sig, &raw const sa, &raw mut old) } != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// A region's place in the table; unregister before the region is torn down.
#[derive(Debug)]
pub(crate) struct Slot(usize);

impl Slot {
    pub(crate) fn register(core: &Arc<RegionCore>) -> Result<Slot, PagerError> {
        install_handler()?;
        let p = Arc::into_raw(core.clone()).cast_mut();
        for (i, s) in REGIONS.iter().enumerate() {
            if s.compare_exchange(null_mut(), p, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return Ok(Slot(i));
            }
        }
        // SAFETY: `p` came from `Arc::into_raw` above and was not stored anywhere.
        drop(unsafe { Arc::from_raw(p) });
        Err(PagerError::Config(ConfigError::TooManyFaultingThreadRegions { max: SLOTS }))
    }

    /// Empties the slot without waiting for handlers or releasing its region (in a forked
    /// child, whose other threads, and their handlers, do not exist).
    pub(crate) fn forget(self) {
        REGIONS[self.0].store(null_mut(), Ordering::SeqCst);
    }

    pub(crate) fn unregister(self) {
        let p = REGIONS[self.0].swap(null_mut(), Ordering::SeqCst);
        if p.is_null() {
            return;
        }
        // A handler that read the slot before the swap is counted in ACTIVE. It is serving a
        // fault, which is bounded by the source's own time-outs.
        if wait_until(|| ACTIVE.load(Ordering::SeqCst) == 0, Duration::from_secs(120)) {
            // SAFETY: `p` came from `Arc::into_raw` in `register`, the slot no longer holds it,
            // and no handler that could have read it is still running.
            drop(unsafe { Arc::from_raw(p) });
        } else {
            log::error!("a SIGBUS handler is still running after 120 s; leaking one region's bookkeeping");
        }
    }
}

fn install_handler() -> Result<(), PagerError> {
    let prev = PREVIOUS.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no handler, empty mask" value to fill in.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigbus as *const () as usize;
        // Not SA_ONSTACK: the handler fetches pages over the network and needs a real stack, not
        // the few KiB of an alternate signal stack (Rust's runtime installs one per thread).
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `sa.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&raw mut sa.sa_mask) };
        // SAFETY: as above, an all-zero sigaction to receive the previous disposition.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigaction structs for the call.
        if unsafe { real_sigaction(libc::SIGBUS, &raw const sa, &raw mut old) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
        }
        Ok(old)
    });
    prev.as_ref().map(|_| ()).map_err(|e| PagerError::Signal(std::io::Error::from_raw_os_error(*e)))
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; saving and restoring it keeps the interrupted code's value.
    let saved_errno = unsafe { *libc::__errno_location() };
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    let mut served = false;
    let page = addr & !(crate::PAGE_SIZE as u64 - 1);
    if code == libc::BUS_ADRERR && LAST_LOST.get() != page {
        for s in &REGIONS {
            let p = s.load(Ordering::SeqCst);
            if p.is_null() {
                continue;
            }
            // SAFETY: a non-null slot holds a strong reference that `unregister` releases only
            // after ACTIVE (which counts us) drops to zero.
            let core = unsafe { &*p };
            if core.owns_fault(addr) {
                let (write, protection) = access(ctx);
                // A fault on the faulting thread is never deferred: the source may block here,
                // stopping only this thread.
                let retry = Retry::default();
                let outcome = if protection {
                    core.serve_write_fault(addr, false, retry)
                } else {
                    core.serve_fault(addr, write, false, None, retry, &mut || {})
                };
                match outcome {
                    Served::Done => {}
                    Served::Lost => LAST_LOST.set(page),
                    // A source that answers Busy anyway: pause, and let the retried access ask
                    // again.
                    Served::Busy => std::thread::sleep(Duration::from_micros(20)),
                }
                served = true;
                break;
            }
        }
    }
    ACTIVE.fetch_sub(1, Ordering::SeqCst);
    // SAFETY: restoring the value saved above.
    unsafe { *libc::__errno_location() = saved_errno };
    if !served {
        chain(sig, info, ctx);
    }
}

/// Passes a SIGBUS that is not ours to the program's handler, or gives it the default action.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if !sigbus_claimed() {
        return;
    }
    let prev = program_disposition();
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Restore the default and re-raise: it is delivered when this handler returns (SIGBUS is
        // blocked while it runs), so the process dies of SIGBUS as it would have without us.
        // SAFETY: a zeroed sigaction is SIG_DFL; sigaction (libc's own) and raise are
        // async-signal-safe.
        unsafe {
            let dfl: libc::sigaction = std::mem::zeroed();
            real_sigaction(libc::SIGBUS, &raw const dfl, null_mut());
            libc::raise(libc::SIGBUS);
        }
        return;
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous disposition was installed as an SA_SIGINFO handler with this
        // signature; we forward the arguments the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the previous disposition was a plain one-argument handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}

/// (write access, protection fault on a present page) from the fault's saved state.
#[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
fn access(ctx: *mut libc::c_void) -> (bool, bool) {
    // SAFETY: the kernel passes a valid ucontext for a SA_SIGINFO handler; on x86-64 the page
    // fault error code is saved in REG_ERR: bit 0 set means the page was present (a protection
    // fault), bit 1 a write access.
    let err = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_ERR as usize] };
    (err & 2 != 0, err & 1 != 0)
}

/// Elsewhere the kind is unknown: treated as a missing page; `serve_fault` notices a present
/// page and treats the fault as a write to a protected one.
#[cfg(not(all(target_arch = "x86_64", target_env = "gnu")))]
fn access(_ctx: *mut libc::c_void) -> (bool, bool) {
    (false, false)
}
