//! A network-RAM region migrating through the C ABI (`mosaic_netram_hand_over`, `_take_over`,
//! `mosaic_netram_out_*`): only its table crosses, its pages stay on the memory servers (see
//! `mosaic_migrate::NetRamOutgoing`).

use std::ffi::{c_char, CString};
use std::time::Duration;

use mosaic_migrate::{take_over_netram, NetRamOutgoing};

use crate::migrate::migrate_error;
use crate::MosaicStatus::*;
use crate::{
    c, fail, guard, is_live, key, lock, register, unregister, with_region, Failure, MosaicNetram, MosaicStatus, LIVE,
};

/// A network-RAM region handed over by this process and offered to a destination (opaque).
pub struct MosaicNetramOut {
    out: NetRamOutgoing,
    uri: CString,
}

/// What a network-RAM region's migration cost at the source (`mosaic_netram_out_finish()`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct MosaicNetramHandOverStats {
    /// Microseconds from the start of the hand-over to its description being ready (dirty
    /// pages written back, the session cloned on the servers).
    pub hand_over_us: u64,
    /// Dirty pages written back to the memory servers by the hand-over.
    pub written_back_pages: u64,
    /// Pages with data on the servers (none of them crossed the migration link).
    pub remote_pages: u64,
    /// Bytes sent to the destination (the description).
    pub bytes_sent: u64,
}

/// Checks that `h` is a live hand-over handle.
fn live_out(h: *const MosaicNetramOut) -> Result<(), Failure> {
    if h.is_null() {
        return fail(MosaicErrNull, "the hand-over handle is NULL");
    }
    if !is_live(h as usize) {
        return fail(MosaicErrBadHandle, "the hand-over handle is not live");
    }
    Ok(())
}

/// Hands the region `r` over to another process (stop the threads using it first): its dirty
/// pages are written back, the memory servers keep its pages for the destination, and it is
/// offered at `listen` (`tcp://HOST:0`...) to whoever holds the cluster key; stores the
/// handle in `*out`. On success `r` is no longer a live handle (the region belongs to the
/// hand-over: it ends here once a destination took it, or comes back with
/// `mosaic_netram_out_thaw()`); on error `r` stays live and the region works on.
#[no_mangle]
pub extern "C" fn mosaic_netram_hand_over(
    r: *mut MosaicNetram,
    listen: *const c_char,
    out: *mut *mut MosaicNetramOut,
) -> MosaicStatus {
    guard(|| {
        // SAFETY: `out` is NULL or writable storage nobody else touches for the call (mosaic.h).
        let out = unsafe { c::mut_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: NULL or a NUL-terminated string for the call (mosaic.h).
        let listen = unsafe { c::str_arg(listen, "listen") }?;
        let key = key()?;
        let mut o =
            with_region(r, |region| NetRamOutgoing::start(&region.ram, listen, key))?.map_err(|e| migrate_error(&e))?;
        let uri = CString::new(o.uri()).map_err(|_| Failure(MosaicErrInvalid, "a URI with a NUL".into()))?;
        {
            let mut live = lock(&LIVE);
            if !live.as_mut().is_some_and(|l| l.remove(&(r as usize))) {
                // Destroyed by another thread meanwhile (which mosaic.h forbids): nothing to give.
                return fail(MosaicErrBadHandle, "the region handle was destroyed during the hand-over");
            }
        }
        // SAFETY: the handle was live, so it came from Box::into_raw in mosaic_netram_create or
        // _take_over; it was just removed from the registry under its lock: nobody uses it again.
        let region = unsafe { c::take_box(r) };
        o.give(region.ram);
        let handle = Box::into_raw(Box::new(MosaicNetramOut { out: o, uri }));
        register(handle as usize);
        *out = handle;
        Ok(())
    })
}

/// Where the destination connects (valid while the handle lives), or NULL for a bad handle.
#[no_mangle]
pub extern "C" fn mosaic_netram_out_uri(h: *const MosaicNetramOut) -> *const c_char {
    let mut p = std::ptr::null();
    guard(|| {
        live_out(h)?;
        // SAFETY: a live handle (checked above), freed only by _finish or _thaw, which no thread
        // may call while another uses it (mosaic.h).
        p = unsafe { c::ref_arg(h, "hand-over") }?.uri.as_ptr();
        Ok(())
    });
    p
}

/// Waits (at most `timeout_ms`) until a destination took the region over, then ends it here
/// (the destination's copy on the servers keeps every page), fills `*stats` (if not NULL) and
/// frees the handle. On time-out the handle stays: call it again, or `mosaic_netram_out_thaw()`.
#[no_mangle]
pub extern "C" fn mosaic_netram_out_finish(
    h: *mut MosaicNetramOut,
    timeout_ms: u64,
    stats: *mut MosaicNetramHandOverStats,
) -> MosaicStatus {
    guard(|| {
        live_out(h)?;
        // SAFETY: a live handle (checked above), used by this thread alone for the call (mosaic.h).
        let o = unsafe { c::mut_arg(h, "hand-over") }?;
        let s = o.out.finish(Duration::from_millis(timeout_ms)).map_err(|e| migrate_error(&e))?;
        if !stats.is_null() {
            // SAFETY: non-null, writable storage for the call (mosaic.h).
            *unsafe { c::mut_arg(stats, "stats") }? = MosaicNetramHandOverStats {
                hand_over_us: s.hand_over_us,
                written_back_pages: s.written_back_pages,
                remote_pages: s.remote_pages,
                bytes_sent: s.bytes_sent,
            };
        }
        if unregister(h as usize) {
            // SAFETY: the live handle from Box::into_raw, just unregistered: not used again.
            drop(unsafe { c::take_box(h) });
        }
        Ok(())
    })
}

/// Takes the region back if no destination took it over: it works on here, and its new handle
/// goes to `*region`; the hand-over handle is freed. `MOSAIC_ERR_INVALID` (and nothing changed)
/// if a destination did.
#[no_mangle]
pub extern "C" fn mosaic_netram_out_thaw(h: *mut MosaicNetramOut, region: *mut *mut MosaicNetram) -> MosaicStatus {
    guard(|| {
        // SAFETY: NULL or writable storage for the call (mosaic.h).
        let region = unsafe { c::mut_arg(region, "region") }?;
        *region = std::ptr::null_mut();
        live_out(h)?;
        // SAFETY: a live handle (checked above), used by this thread alone for the call (mosaic.h).
        if unsafe { c::ref_arg(h, "hand-over") }?.out.committed() {
            return fail(MosaicErrInvalid, "a destination took the region over: it cannot thaw here");
        }
        unregister(h as usize);
        // SAFETY: the live handle from Box::into_raw, just unregistered: not used again.
        let o = unsafe { c::take_box(h) };
        let ram = o.out.thaw().map_err(|e| migrate_error(&e))?;
        let r = Box::into_raw(Box::new(MosaicNetram { ram }));
        register(r as usize);
        *region = r;
        Ok(())
    })
}

/// Takes over the network-RAM region offered at `uri` (by `mosaic_netram_hand_over()` in
/// another process): maps it here at the same address, its pages coming from the memory servers
/// on touch, with at most `resident_budget` bytes in local RAM; stores the region's handle in
/// `*out` (use it as one from `mosaic_netram_create()`).
#[no_mangle]
pub extern "C" fn mosaic_netram_take_over(
    uri: *const c_char,
    resident_budget: u64,
    out: *mut *mut MosaicNetram,
) -> MosaicStatus {
    guard(|| {
        // SAFETY: NULL or writable storage for the call (mosaic.h).
        let out = unsafe { c::mut_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: NULL or a NUL-terminated string for the call (mosaic.h).
        let uri = unsafe { c::str_arg(uri, "uri") }?;
        let (ram, _) = take_over_netram(uri, key()?, resident_budget).map_err(|e| migrate_error(&e))?;
        let r = Box::into_raw(Box::new(MosaicNetram { ram }));
        register(r as usize);
        *out = r;
        Ok(())
    })
}
