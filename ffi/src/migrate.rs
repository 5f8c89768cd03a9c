//! Region post-copy through the C ABI (`mosaic_migrate_*`): see `mosaic_migrate`.

use std::ffi::{c_char, c_void, CString};
use std::time::Duration;

use mosaic_migrate::{Incoming, MigrateError, Outgoing};

use crate::MosaicStatus::*;
use crate::{c, fail, guard, is_live, key, register, unregister, Failure, MosaicStatus};

/// A region frozen in this process and served to a destination (opaque).
pub struct MosaicMigrationOut {
    out: Outgoing,
    uri: CString,
}

/// A region arriving in this process (opaque).
pub struct MosaicMigrationIn {
    inc: Incoming,
}

/// What a source sent (`mosaic_migrate_finish()`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct MosaicMigrateStats {
    /// Pages that held data at the source.
    pub present_pages: u64,
    /// Pages sent (each once).
    pub pages_sent: u64,
    /// Of those, pages sent because the destination faulted on them.
    pub pages_fetched: u64,
    /// Bytes sent: pages, their headers and the descriptor.
    pub bytes_sent: u64,
}

pub(crate) fn migrate_error(e: &MigrateError) -> Failure {
    let status = match e {
        MigrateError::Range(_) => MosaicErrInvalid,
        MigrateError::Pager(mosaic_pager::PagerError::Unsupported { .. }) => MosaicErrUnsupported,
        MigrateError::Pager(_) | MigrateError::Listen(_) => MosaicErrOs,
        MigrateError::NetRam(e) => crate::netram_status(e),
        _ => MosaicErrUnreachable,
    };
    Failure(status, mosaic_transport::error_chain(e))
}

/// Checks that `h` is a live handle of this module.
fn live<T>(h: *const T, what: &str) -> Result<(), Failure> {
    if h.is_null() {
        return fail(MosaicErrNull, format!("the {what} handle is NULL"));
    }
    if !is_live(h as usize) {
        return fail(MosaicErrBadHandle, format!("the {what} handle is not live"));
    }
    Ok(())
}

/// Freezes the `len` bytes at `addr` (private anonymous memory of this process, whole pages,
/// which the caller no longer uses: stop the threads writing it first) and serves them at
/// `listen` (`tcp://HOST:0`, `shm://NAME`) to a destination holding the cluster key; stores the
/// handle in `*out`. `mosaic_migrate_uri()` says where to connect.
#[no_mangle]
pub extern "C" fn mosaic_migrate_freeze(
    addr: *mut c_void,
    len: u64,
    listen: *const c_char,
    out: *mut *mut MosaicMigrationOut,
) -> MosaicStatus {
    guard(|| {
        // SAFETY: `out` is NULL or writable storage nobody else touches for the call (mosaic.h).
        let out = unsafe { c::mut_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: NULL or a NUL-terminated string for the call (mosaic.h).
        let listen = unsafe { c::str_arg(listen, "listen") }?;
        let len = usize::try_from(len).map_err(|_| Failure(MosaicErrInvalid, "len is too large".into()))?;
        if addr.is_null() {
            return fail(MosaicErrNull, "addr is NULL");
        }
        // SAFETY: mosaic.h's contract for this call is Outgoing::freeze's: private anonymous
        // memory of this process that the caller gives up.
        let o = unsafe { Outgoing::freeze(addr as usize, len, listen, key()?) }.map_err(|e| migrate_error(&e))?;
        let uri = CString::new(o.uri()).map_err(|_| Failure(MosaicErrInvalid, "a URI with a NUL".into()))?;
        let handle = Box::into_raw(Box::new(MosaicMigrationOut { out: o, uri }));
        register(handle as usize);
        *out = handle;
        Ok(())
    })
}

/// Where the destination connects (valid while the handle lives), or NULL for a bad handle.
#[no_mangle]
pub extern "C" fn mosaic_migrate_uri(m: *const MosaicMigrationOut) -> *const c_char {
    let mut p = std::ptr::null();
    guard(|| {
        live(m, "migration")?;
        // SAFETY: a live handle (checked above), freed only by mosaic_migrate_finish or _thaw,
        // which no thread may call while another uses it (mosaic.h).
        p = unsafe { c::ref_arg(m, "migration") }?.uri.as_ptr();
        Ok(())
    });
    p
}

/// Waits (at most `timeout_ms`) until a destination took the region over and every page left,
/// then stops serving, unmaps the range here, fills `*stats` (if not NULL) and frees the
/// handle. On time-out the handle stays: call it again, or `mosaic_migrate_thaw()` if no
/// destination took the region over.
#[no_mangle]
pub extern "C" fn mosaic_migrate_finish(
    m: *mut MosaicMigrationOut,
    timeout_ms: u64,
    stats: *mut MosaicMigrateStats,
) -> MosaicStatus {
    guard(|| {
        live(m, "migration")?;
        // SAFETY: a live handle (checked above), used by this thread alone for the call (mosaic.h).
        let h = unsafe { c::mut_arg(m, "migration") }?;
        let s = h.out.finish(Duration::from_millis(timeout_ms)).map_err(|e| migrate_error(&e))?;
        if !stats.is_null() {
            // SAFETY: non-null, writable storage for the call (mosaic.h).
            let st = unsafe { c::mut_arg(stats, "stats") }?;
            *st = MosaicMigrateStats {
                present_pages: s.present_pages,
                pages_sent: s.pages_sent,
                pages_fetched: s.pages_fetched,
                bytes_sent: s.bytes_sent,
            };
        }
        if unregister(m as usize) {
            // SAFETY: the live handle from Box::into_raw, just unregistered: not used again.
            drop(unsafe { c::take_box(m) });
        }
        Ok(())
    })
}

/// Gives the region back to this process if no destination took it over (every page where it
/// was, writable again) and frees the handle; `MOSAIC_ERR_INVALID` (and nothing changed) if a
/// destination did.
#[no_mangle]
pub extern "C" fn mosaic_migrate_thaw(m: *mut MosaicMigrationOut) -> MosaicStatus {
    guard(|| {
        live(m, "migration")?;
        // SAFETY: a live handle (checked above), used by this thread alone for the call (mosaic.h).
        if unsafe { c::ref_arg(m, "migration") }?.out.committed() {
            return fail(MosaicErrInvalid, "a destination took the region over: it cannot thaw here");
        }
        unregister(m as usize);
        // SAFETY: the live handle from Box::into_raw, just unregistered: not used again.
        let h = unsafe { c::take_box(m) };
        h.out.thaw().map(drop).map_err(|e| migrate_error(&e))
    })
}

/// Connects to a frozen region's source at `uri`, maps the region here at its address and takes
/// it over; stores the handle in `*incoming`, the address in `*addr` and the size in `*len` (each
/// out-pointer may be NULL but `incoming`). The region is usable at once; its pages arrive as touched
/// and in the background.
#[no_mangle]
pub extern "C" fn mosaic_migrate_connect(
    uri: *const c_char,
    incoming: *mut *mut MosaicMigrationIn,
    addr: *mut *mut c_void,
    len: *mut u64,
) -> MosaicStatus {
    guard(|| {
        // SAFETY: NULL or writable storage for the call (mosaic.h).
        let handle = unsafe { c::mut_arg(incoming, "incoming") }?;
        *handle = std::ptr::null_mut();
        // SAFETY: NULL or a NUL-terminated string for the call (mosaic.h).
        let uri = unsafe { c::str_arg(uri, "uri") }?;
        let inc = Incoming::connect(uri, key()?).map_err(|e| migrate_error(&e))?;
        let (p, l) = (inc.as_ptr(), inc.len() as u64);
        if !addr.is_null() {
            // SAFETY: non-null, writable storage for the call (mosaic.h).
            *unsafe { c::mut_arg(addr, "addr") }? = p.cast();
        }
        if !len.is_null() {
            // SAFETY: as above.
            *unsafe { c::mut_arg(len, "len") }? = l;
        }
        let h = Box::into_raw(Box::new(MosaicMigrationIn { inc }));
        register(h as usize);
        *handle = h;
        Ok(())
    })
}

/// Waits (at most `timeout_ms`) until every page is here, then leaves the region mapped as
/// ordinary memory of this process (nothing of Mosaic's behind it any more) and frees the
/// handle. On time-out the handle stays.
#[no_mangle]
pub extern "C" fn mosaic_migrate_complete(m: *mut MosaicMigrationIn, timeout_ms: u64) -> MosaicStatus {
    guard(|| {
        live(m, "arriving region")?;
        // SAFETY: a live handle (checked above), used by this thread alone for the call (mosaic.h).
        let h = unsafe { c::mut_arg(m, "arriving region") }?;
        h.inc.wait_resident(Duration::from_millis(timeout_ms)).map_err(|e| migrate_error(&e))?;
        unregister(m as usize);
        // SAFETY: the live handle from Box::into_raw, just unregistered: not used again.
        let h = unsafe { c::take_box(m) };
        h.inc.into_raw(Duration::from_millis(timeout_ms)).map(drop).map_err(|e| migrate_error(&e))
    })
}
