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

/// A NUL-terminated UTF-8 string argument (NULL is an error, not undefined behaviour).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a` (the
/// documented contract of every string parameter in mosaic.h, for the duration of the call).
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure(MosaicStatus::MosaicErrNull, format!("{name} is NULL")));
    }
    // SAFETY: non-null, and NUL-terminated and valid for 'a by this function's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| Failure(MosaicStatus::MosaicErrInvalid, format!("{name} is not UTF-8")))
}

/// A pointer argument to read (NULL is an error).
///
/// # Safety
/// `p` is NULL or points to a valid, initialised `T` that nobody writes for `'a`.
pub(crate) unsafe fn ref_arg<'a, T>(p: *const T, name: &str) -> Result<&'a T, Failure> {
    // SAFETY: by this function's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Failure(MosaicStatus::MosaicErrNull, format!("{name} is NULL")))
}

/// A pointer argument to write (NULL is an error).
///
/// # Safety
/// `p` is NULL or points to a valid `T` that nothing else reads or writes for `'a`.
pub(crate) unsafe fn mut_arg<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: by this function's contract.
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
