//! `sigaction` and `signal`, interposed (as Android's libsigchain does): while Mosaic's SIGBUS
//! handler serves faults on the faulting thread, a program that installs its own SIGBUS handler
//! gets it recorded instead of replacing ours (see `mosaic_pager::program_sigaction`). Mosaic's
//! handler serves faults in its regions and passes every other SIGBUS to the program's handler.
//! Every other signal, and SIGBUS while Mosaic has no handler, goes to libc unchanged.
//!
//! These symbols are not part of the C API (mosaic.h does not declare them): a program linked
//! with libmosaic, statically or as a shared library before libc, calls them in place of libc's.

use std::ffi::c_int;

#[no_mangle]
unsafe extern "C" fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    // SAFETY: the caller's contract is sigaction(2)'s, which is what this one asks.
    unsafe { mosaic_pager::interposed_sigaction(sig, act, old) }
}

#[no_mangle]
unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: the caller's contract is signal(2)'s, which is what this one asks.
    unsafe { mosaic_pager::interposed_signal(sig, handler) }
}
