//! The part of process migration that runs inside the migrated program (loaded by `mosrun`
//! through `libmosaic_preload.so`, the way DMTCP's checkpointer sits in its processes).
//!
//! [`install`] sets a handler for one real-time signal. The node agent stopping a process
//! queues that signal to each of its threads with a token (`rt_tgsigqueueinfo`, `SI_QUEUE`);
//! the handler of each thread collects what only the thread itself can see (its `ucontext` as
//! the kernel saved it, thread pointer, robust futex list, `rseq` area, clear-tid address,
//! the signal dispositions), connects to the abstract Unix socket named by the token, writes
//! its [`ThreadRecord`] and waits for a verdict: resume (`VERDICT_RESUME`, or the agent gone)
//! or stay stopped for good (`VERDICT_STAY`). Everything here is async-signal-safe: system
//! calls only, no allocation, no lock.

// System-call arguments and results (pids, descriptors, addresses, kernel ABI words) pass
// between C and Rust integer types here; every value is one the kernel gave or takes.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use super::record::{socket_addr, KernelSigaction, ThreadRecord, RECORD_MAGIC, SIGNALS, VERDICT_STAY};

/// glibc's `__rseq_offset` (from the thread pointer), read once at install; `i64::MIN` if none.
static RSEQ_OFFSET: AtomicI64 = AtomicI64::new(i64::MIN);
/// glibc's `__rseq_size`.
static RSEQ_SIZE: AtomicU32 = AtomicU32::new(0);
/// The signature glibc registers `rseq` areas with on x86-64.
const RSEQ_SIG: u32 = 0x5305_3053;

/// The signal used unless `MOSAIC_MIGRATE_SIGNAL` says otherwise: the highest real-time signal
/// but one (glibc keeps the lowest two for itself; programs that use real-time signals tend to
/// count up from `SIGRTMIN`).
pub const DEFAULT_SIGNAL: i32 = 63;

/// Reads where glibc keeps each thread's `rseq` area (once is enough: it never changes).
fn learn_rseq() {
    // SAFETY: dlsym with a NUL-terminated name; the symbols, when glibc has them, are an
    // `isize` and a `u32` that glibc sets before any constructor runs.
    unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr());
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr());
        if !off.is_null() && !size.is_null() {
            RSEQ_OFFSET.store(*(off as *const isize) as i64, Ordering::Relaxed);
            RSEQ_SIZE.store(*(size as *const u32), Ordering::Relaxed);
        }
    }
}

/// The calling thread's registered `rseq` area, as (address, length, signature), confirmed
/// with the kernel (registering what is registered answers `EBUSY`).
fn registered_rseq() -> Option<(u64, u64, u64)> {
    let off = RSEQ_OFFSET.load(Ordering::Relaxed);
    let size = RSEQ_SIZE.load(Ordering::Relaxed);
    if off == i64::MIN || size == 0 {
        return None;
    }
    let mut fs = 0u64;
    // SAFETY: arch_prctl writes the FS base into a local; rseq with the area glibc registered
    // (a registered thread answers EBUSY and nothing changes).
    unsafe {
        sys(libc::SYS_arch_prctl, 0x1003 /* ARCH_GET_FS */, &raw mut fs as u64, 0, 0);
        let addr = fs.wrapping_add(off as u64);
        for len in [u64::from(size.max(32)), 32] {
            if sys(libc::SYS_rseq, addr, len, 0, u64::from(RSEQ_SIG)) == -i64::from(libc::EBUSY) {
                return Some((addr, len, u64::from(RSEQ_SIG)));
            }
        }
    }
    None
}

/// Unregisters the calling thread's `rseq` area (a restorer about to unmap the memory it is in:
/// the kernel would write there on the way back to user space, and kill the thread when it
/// cannot). Returns whether there was one.
pub(crate) fn unregister_rseq() -> bool {
    learn_rseq();
    let Some((addr, len, sig)) = registered_rseq() else { return false };
    // SAFETY: unregistering exactly what is registered (RSEQ_FLAG_UNREGISTER = 1).
    unsafe { sys(libc::SYS_rseq, addr, len, 1, sig) == 0 }
}

/// Installs the checkpoint handler for `signal`. Call once, early (a library constructor).
pub fn install(signal: i32) -> std::io::Result<()> {
    learn_rseq();
    // SAFETY: a zeroed sigaction filled in field by field; sigaction(2) copies it.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_checkpoint as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // Nothing else runs on this thread while it reports and waits.
        libc::sigfillset(&mut sa.sa_mask);
        if libc::sigaction(signal, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raw system call returning the kernel's value (negative errno on failure).
///
/// # Safety
/// The arguments must be what system call `nr` expects.
unsafe fn sys(nr: libc::c_long, a: u64, b: u64, c: u64, d: u64) -> i64 {
    // SAFETY: as the caller promises.
    let r = unsafe { libc::syscall(nr, a, b, c, d) };
    if r == -1 {
        // SAFETY: errno of this thread.
        -i64::from(unsafe { *libc::__errno_location() })
    } else {
        r
    }
}

extern "C" fn on_checkpoint(_sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; the token rides in
    // si_value of a queued signal.
    let token = unsafe { (*info).si_value().sival_ptr as u64 };
    // SAFETY: system calls with valid arguments: pointers to locals of the right size.
    unsafe {
        let mut r = ThreadRecord {
            magic: RECORD_MAGIC,
            tid: sys(libc::SYS_gettid, 0, 0, 0, 0) as u64,
            pid: sys(libc::SYS_getpid, 0, 0, 0, 0) as u64,
            ucontext: uc as u64,
            fs_base: 0,
            robust_head: 0,
            robust_len: 0,
            rseq_addr: 0,
            rseq_len: 0,
            rseq_sig: 0,
            clear_tid: 0,
            socket_fd: 0,
            actions: [KernelSigaction::default(); SIGNALS],
        };
        let mut fs = 0u64;
        sys(libc::SYS_arch_prctl, 0x1003 /* ARCH_GET_FS */, &raw mut fs as u64, 0, 0);
        r.fs_base = fs;
        let (mut head, mut len) = (0u64, 0u64);
        if sys(libc::SYS_get_robust_list, 0, &raw mut head as u64, &raw mut len as u64, 0) == 0 {
            (r.robust_head, r.robust_len) = (head, len);
        }
        let mut clear = 0u64;
        if sys(libc::SYS_prctl, libc::PR_GET_TID_ADDRESS as u64, &raw mut clear as u64, 0, 0) == 0 {
            r.clear_tid = clear;
        }
        if let Some((addr, len, sig)) = registered_rseq() {
            (r.rseq_addr, r.rseq_len, r.rseq_sig) = (addr, len, sig);
        }
        for (i, a) in r.actions.iter_mut().enumerate() {
            sys(libc::SYS_rt_sigaction, i as u64 + 1, 0, a as *mut KernelSigaction as u64, 8);
        }
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        r.socket_fd = fd as u64;
        let (addr, alen) = socket_addr(token);
        let verdict = if libc::connect(fd, (&raw const addr).cast(), alen) == 0 && write_all(fd, r.as_bytes()) {
            let mut v = 0u8;
            loop {
                let n = libc::read(fd, (&raw mut v).cast(), 1);
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                break if n == 1 { v } else { 0 };
            }
        } else {
            0
        };
        if verdict == VERDICT_STAY {
            // The process lives elsewhere now; this copy waits to be killed, its memory still
            // read by the agent. Every signal is blocked here, so only SIGKILL ends it.
            loop {
                libc::pause();
            }
        }
        libc::close(fd);
    }
}

/// Writes all of `b` to `fd` (async-signal-safe).
///
/// # Safety
/// `fd` is a descriptor of this process.
unsafe fn write_all(fd: i32, mut b: &[u8]) -> bool {
    while !b.is_empty() {
        // SAFETY: writing from a valid slice.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n < 0 {
            // SAFETY: errno of this thread.
            if unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return false;
        }
        b = &b[n as usize..];
    }
    true
}
