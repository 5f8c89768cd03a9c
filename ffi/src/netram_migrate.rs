//! A network-RAM region migrating through the C ABI (`mosaic_netram_hand_over`, `_take_over`,
//! `mosaic_netram_out_*`): only its table crosses, its pages stay on the memory servers (see
//! `mosaic_migrate::NetRamOutgoing`).

use std::ffi::{c_char, CString};
use std::time::Duration;

use mosaic_migrate::{take_over_netram_over, NetRamOutgoing};
use mosaic_pager::FaultMode;

use crate::migrate::migrate_error;
use crate::MosaicStatus::*;
use crate::{
    c, fail, fault_mode_of, guard, is_live, key, register, unregister, Failure, MosaicNetram, MosaicNetramOptions,
    MosaicStatus,
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
    /// pages written back, the session handed over on the servers).
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
        if r.is_null() {
            return fail(MosaicErrNull, "the region handle is NULL");
        }
        // Out of the registry for the hand-over (which takes a while: no other call waits on the
        // registry's lock meanwhile), back in if it fails.
        if !unregister(r as usize) {
            return fail(MosaicErrBadHandle, "the region handle is not live (destroyed, or never created)");
        }
        // SAFETY: the handle was live, so it came from Box::into_raw in mosaic_netram_create or
        // _take_over; it was just removed from the registry under its lock, so no other call
        // reaches it until it is registered again.
        let region = unsafe { c::ref_arg(r, "region") }?;
        let mut o = match NetRamOutgoing::start(&region.ram, listen, key) {
            Ok(o) => o,
            Err(e) => {
                register(r as usize);
                return Err(migrate_error(&e));
            }
        };
        // SAFETY: as above: ours alone, out of the registry; not used again after this.
        let region = unsafe { c::take_box(r) };
        o.give(region.ram);
        // A transport URI holds no NUL.
        let uri = CString::new(o.uri()).unwrap_or_default();
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
        let o = unsafe { c::mut_arg(h, "hand-over") }?;
        // Fails (a destination committed) without changing anything: the handle stays.
        let ram = o.out.try_thaw().map_err(|e| Failure(MosaicErrInvalid, mosaic_transport::error_chain(&e)))?;
        if unregister(h as usize) {
            // SAFETY: the live handle from Box::into_raw, just unregistered: not used again.
            drop(unsafe { c::take_box(h) });
        }
        let r = Box::into_raw(Box::new(MosaicNetram { ram }));
        register(r as usize);
        *region = r;
        Ok(())
    })
}

/// Takes over the network-RAM region offered at `uri` (by `mosaic_netram_hand_over()` in
/// another process): maps it here at the same address, its pages coming from the memory servers
/// on touch, and stores the region's handle in `*out` (use it as one from
/// `mosaic_netram_create()`). From `opts` (NULL: the defaults of `mosaic_netram_options_init()`)
/// only `resident_budget` and `fault_mode` count: the size, servers, copies and address are the
/// region's; a backing file is refused.
#[no_mangle]
pub extern "C" fn mosaic_netram_take_over(
    uri: *const c_char,
    opts: *const MosaicNetramOptions,
    out: *mut *mut MosaicNetram,
) -> MosaicStatus {
    guard(|| {
        // SAFETY: NULL or writable storage for the call (mosaic.h).
        let out = unsafe { c::mut_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: NULL or a NUL-terminated string for the call (mosaic.h).
        let uri = unsafe { c::str_arg(uri, "uri") }?;
        let (budget, fault_mode) = if opts.is_null() {
            (64 << 20, FaultMode::FaultingThread)
        } else {
            // SAFETY: non-null: a valid value to read for the call (mosaic.h).
            let o = unsafe { c::ref_arg(opts, "opts") }?;
            if !o.backing_file.is_null() {
                return fail(MosaicErrInvalid, "a region taken over cannot have a backing file");
            }
            (o.resident_budget, fault_mode_of(o.fault_mode)?)
        };
        let key = key()?;
        let conn = mosaic_transport::connect(uri, &mosaic_transport::ConnectOptions::new(key.clone()))
            .map_err(|e| migrate_error(&e.into()))?;
        let (ram, _) = take_over_netram_over(&conn, |h| {
            let mut cfg = h.config(key, budget);
            cfg.fault_mode = fault_mode;
            cfg.name = "c".into();
            cfg
        })
        .map_err(|e| migrate_error(&e))?;
        let r = Box::into_raw(Box::new(MosaicNetram { ram }));
        register(r as usize);
        *out = r;
        Ok(())
    })
}
