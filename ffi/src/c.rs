//! The C boundary: C pointers into Rust references, C strings into `&str`, the thread's last
//! error. Every `unsafe` block of the crate but the two handle frees is here.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};

use crate::{Failure, MosaicStatus};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `message` as this thread's last error (interior NULs are replaced).
pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// This thread's last error; valid until the next failure on this thread.
pub(crate) fn last_error() -> *const c_char {
    // The CString lives in the thread-local until replaced, so the pointer outlives this call.
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A NUL-terminated UTF-8 string argument.
pub(crate) fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure(MosaicStatus::MosaicErrNull, format!("{name} is NULL")));
    }
    // SAFETY: the C caller passes a NUL-terminated string that stays valid during the call (the
    // documented contract of every string parameter in mosaic.h).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| Failure(MosaicStatus::MosaicErrInvalid, format!("{name} is not UTF-8")))
}

/// A pointer argument to read.
pub(crate) fn ref_arg<'a, T>(p: *const T, name: &str) -> Result<&'a T, Failure> {
    // SAFETY: non-null pointers from C point to a valid, initialised T for the call (the
    // documented contract); handles were checked against the live registry by the caller.
    unsafe { p.as_ref() }.ok_or_else(|| Failure(MosaicStatus::MosaicErrNull, format!("{name} is NULL")))
}

/// A pointer argument to write.
pub(crate) fn mut_arg<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: non-null out-pointers from C point to writable storage for a T, not aliased during
    // the call (the documented contract).
    unsafe { p.as_mut() }.ok_or_else(|| Failure(MosaicStatus::MosaicErrNull, format!("{name} is NULL")))
}

/// Takes back ownership of a handle.
///
/// # Safety
/// `p` must come from `Box::into_raw` and must not be used again.
pub(crate) unsafe fn take_box<T>(p: *mut T) -> Box<T> {
    // SAFETY: the caller guarantees `p` came from Box::into_raw and is not used again.
    unsafe { Box::from_raw(p) }
}
