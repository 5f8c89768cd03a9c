//! Mosaic's C ABI: `libmosaic.so` / `libmosaic.a`, declared in `include/mosaic.h`.
//!
//! Conventions, after rustls-ffi:
//! - every exported function catches panics at the boundary (`MOSAIC_ERR_PANIC`, never an unwind
//!   into C);
//! - failures return a `MosaicStatus` and leave a description for the calling thread in
//!   `mosaic_last_error()`;
//! - handles are opaque pointers, live in a registry, and are freed exactly once: a second
//!   destroy, or any use of a destroyed handle, is refused with `MOSAIC_ERR_BAD_HANDLE` (as long
//!   as the address was not handed out again by a newer create);
//! - pointers from C are checked for NULL; strings must be NUL-terminated UTF-8.
//!
//! All `unsafe` of this crate is in the small `c` module below: turning C pointers into Rust
//! references and strings.

// The exported functions are C entry points: they take raw pointers by design, check them (NULL,
// the live-handle registry) and only then dereference them in the `c` module.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, PoisonError};

use mosaic_dsm::{AllocError, Job, JobConfig, JoinError};
use mosaic_netram::{MemServer, MemServerConfig, NetRam, NetRamConfig, NetRamError};
use mosaic_pager::{FaultMode, PagerError};
use mosaic_transport::ClusterKey;

mod c;
mod migrate;
mod netram_migrate;
pub use migrate::{MosaicMigrateStats, MosaicMigrationIn, MosaicMigrationOut};
mod sigchain;

/// Status of a call. `MOSAIC_OK` is zero; every other value is a failure, described further by
/// `mosaic_last_error()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum MosaicStatus {
    /// Success.
    MosaicOk = 0,
    /// A required pointer argument was NULL.
    MosaicErrNull = 1,
    /// An argument is invalid (a size, a URI, a string that is not UTF-8, an impossible budget).
    MosaicErrInvalid = 2,
    /// `mosaic_init` has not been called (or `mosaic_finalize` was).
    MosaicErrNotInitialized = 3,
    /// `mosaic_init` was already called.
    MosaicErrAlreadyInitialized = 4,
    /// A memory server could not be reached, or refused the cluster key.
    MosaicErrUnreachable = 5,
    /// The kernel lacks a userfaultfd feature Mosaic needs.
    MosaicErrUnsupported = 6,
    /// The handle is not live: never created, or already destroyed.
    MosaicErrBadHandle = 7,
    /// Handles are still live (`mosaic_finalize`).
    MosaicErrBusy = 8,
    /// A system call failed.
    MosaicErrOs = 9,
    /// Mosaic panicked (a bug); the call had no effect that can be relied on.
    MosaicErrPanic = 10,
    /// No room: the shared region has no free block large enough for the allocation.
    MosaicErrNoSpace = 11,
}

use MosaicStatus::*;

/// Serve faults on the faulting thread (the default; fastest; a system call that touches a
/// missing page fails with EFAULT).
pub const MOSAIC_FAULT_THREAD: u32 = 0;
/// Serve faults with one pinned worker per CPU (system calls into region memory work).
pub const MOSAIC_FAULT_PER_CPU: u32 = 1;

/// Options of `mosaic_netram_create()`. Initialise with `mosaic_netram_options_init()`, then set
/// what differs.
#[repr(C)]
#[derive(Debug)]
pub struct MosaicNetramOptions {
    /// Region size in bytes.
    pub size: u64,
    /// Local RAM the region may use, in bytes (at least 256 KiB).
    pub resident_budget: u64,
    /// Memory servers, comma-separated URIs (`tcp://host:port,...`); NULL: the environment
    /// variable `MOSAIC_SERVERS`.
    pub servers: *const c_char,
    /// Copies of each page on distinct servers; 0: 2 where two servers exist, else 1.
    pub copies: u32,
    /// `MOSAIC_FAULT_THREAD` or `MOSAIC_FAULT_PER_CPU`.
    pub fault_mode: u32,
    /// A local file that also keeps every written-back page (created, truncated); NULL: none.
    pub backing_file: *const c_char,
    /// Map the region at exactly this address (page-aligned; creating it fails if anything is
    /// mapped there); 0: wherever the kernel puts it.
    pub fixed_addr: u64,
}

/// Counters of a region (`mosaic_netram_get_stats()`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct MosaicNetramStats {
    /// Faults served from a server.
    pub fetched: u64,
    /// Pages brought in ahead of strided fault streams.
    pub prefetched: u64,
    /// Faults served from the local cache of recently evicted pages.
    pub cache_hits: u64,
    /// Faults on never-written pages, served as zeros.
    pub zero_filled: u64,
    /// Pages dropped from local RAM.
    pub evicted: u64,
    /// Dirty pages written to the servers.
    pub written_back: u64,
    /// Reads that used another copy because a server failed.
    pub failovers: u64,
    /// Copies re-created after a server was lost.
    pub rebuilt: u64,
    /// Pages lost (touching one raises SIGBUS).
    pub lost: u64,
    /// Pages in local RAM now.
    pub resident: u64,
    /// Pages moved off memory servers that asked for their pages to go elsewhere.
    pub ushered: u64,
}

/// A network-RAM region (opaque).
pub struct MosaicNetram {
    ram: NetRam,
}

/// A memory server running in this process (opaque).
pub struct MosaicMemserver {
    server: MemServer,
    uri: CString,
}

/// This process's node of a DSM job (opaque).
pub struct MosaicDsm {
    job: Job,
}

/// Why a call failed: the status and a message for `mosaic_last_error`.
struct Failure(MosaicStatus, String);

type Outcome = Result<(), Failure>;

fn fail<T>(status: MosaicStatus, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(status, message.into()))
}

/// Runs `f` behind the panic boundary, recording a failure for `mosaic_last_error`.
fn guard(f: impl FnOnce() -> Outcome) -> MosaicStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => MosaicOk,
        Ok(Err(Failure(status, message))) => {
            c::set_last_error(&message);
            status
        }
        Err(_) => {
            c::set_last_error("Mosaic panicked (a bug); please report it with the log");
            MosaicErrPanic
        }
    }
}

struct Global {
    key: ClusterKey,
}

static GLOBAL: Mutex<Option<Global>> = Mutex::new(None);
/// Addresses of live handles (regions and servers).
static LIVE: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn register(addr: usize) {
    lock(&LIVE).get_or_insert_with(HashSet::new).insert(addr);
}

fn is_live(addr: usize) -> bool {
    lock(&LIVE).as_ref().is_some_and(|l| l.contains(&addr))
}

/// Removes `addr` from the live set; false if it was not there.
fn unregister(addr: usize) -> bool {
    lock(&LIVE).as_mut().is_some_and(|l| l.remove(&addr))
}

fn key() -> Result<ClusterKey, Failure> {
    match lock(&GLOBAL).as_ref() {
        Some(g) => Ok(g.key.clone()),
        None => fail(MosaicErrNotInitialized, "call mosaic_init first"),
    }
}

/// Initialises the library with the cluster key (at least 16 bytes), or with NULL to read it
/// from `MOSAIC_CLUSTER_KEY` or `MOSAIC_CLUSTER_KEY_FILE`.
#[no_mangle]
pub extern "C" fn mosaic_init(cluster_key: *const c_char) -> MosaicStatus {
    guard(|| {
        let key = if cluster_key.is_null() {
            ClusterKey::from_env().map_err(|e| Failure(MosaicErrInvalid, e.to_string()))?
        } else {
            // SAFETY: `cluster_key` is NULL or a NUL-terminated string for the call: mosaic.h's contract for it.
            let text = unsafe { c::str_arg(cluster_key, "cluster_key") }?;
            ClusterKey::from_bytes(text.as_bytes()).map_err(|e| Failure(MosaicErrInvalid, e.to_string()))?
        };
        let mut g = lock(&GLOBAL);
        if g.is_some() {
            return fail(MosaicErrAlreadyInitialized, "mosaic_init was already called");
        }
        *g = Some(Global { key });
        Ok(())
    })
}

/// Releases the library. Refused with `MOSAIC_ERR_BUSY` while regions or servers are live.
#[no_mangle]
pub extern "C" fn mosaic_finalize() -> MosaicStatus {
    guard(|| {
        let live = lock(&LIVE).as_ref().map_or(0, HashSet::len);
        if live > 0 {
            return fail(MosaicErrBusy, format!("{live} region(s) or server(s) are still live: destroy them first"));
        }
        if lock(&GLOBAL).take().is_none() {
            return fail(MosaicErrNotInitialized, "mosaic_init was not called");
        }
        Ok(())
    })
}

/// A description of `status` (a static string; unknown values get "unknown status").
#[no_mangle]
pub extern "C" fn mosaic_strerror(status: c_int) -> *const c_char {
    // Cannot panic (a table of static strings), but every export keeps the boundary.
    catch_unwind(|| strerror(status)).unwrap_or(c"unknown status".as_ptr())
}

fn strerror(status: c_int) -> *const c_char {
    let s: &'static std::ffi::CStr = match status {
        0 => c"success",
        1 => c"a required pointer argument was NULL",
        2 => c"invalid argument",
        3 => c"mosaic_init has not been called",
        4 => c"mosaic_init was already called",
        5 => c"a memory server could not be reached or refused the cluster key",
        6 => c"the kernel lacks a userfaultfd feature Mosaic needs",
        7 => c"the handle is not live (never created, or already destroyed)",
        8 => c"handles are still live",
        9 => c"a system call failed",
        10 => c"Mosaic panicked (a bug)",
        11 => c"no room in the shared region for the allocation",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// What went wrong in the last failing call on this thread ("" if none). The string stays valid
/// until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn mosaic_last_error() -> *const c_char {
    catch_unwind(c::last_error).unwrap_or(c"".as_ptr())
}

/// Fills `opts` with the defaults: no size, a 64 MiB budget, servers from the environment,
/// default copies, faults on the faulting thread, no backing file, no fixed address.
#[no_mangle]
pub extern "C" fn mosaic_netram_options_init(opts: *mut MosaicNetramOptions) -> MosaicStatus {
    guard(|| {
        // SAFETY: `opts` is NULL or writable storage nobody else touches for the call: mosaic.h's contract for it.
        let o = unsafe { c::mut_arg(opts, "opts") }?;
        *o = MosaicNetramOptions {
            size: 0,
            resident_budget: 64 << 20,
            servers: std::ptr::null(),
            copies: 0,
            fault_mode: MOSAIC_FAULT_THREAD,
            backing_file: std::ptr::null(),
            fixed_addr: 0,
        };
        Ok(())
    })
}

fn netram_error(e: NetRamError) -> Failure {
    Failure(netram_status(&e), mosaic_transport::error_chain(&e))
}

/// The status a network-RAM error is reported with.
fn netram_status(e: &NetRamError) -> MosaicStatus {
    match e {
        NetRamError::Unreachable { .. } => MosaicErrUnreachable,
        NetRamError::Pager(PagerError::Unsupported { .. } | PagerError::NoUserfaultfd(_)) => MosaicErrUnsupported,
        NetRamError::Pager(_) => MosaicErrOs,
        _ => MosaicErrInvalid,
    }
}

/// Creates a network-RAM region as `opts` says and stores its handle in `*out`.
#[no_mangle]
pub extern "C" fn mosaic_netram_create(opts: *const MosaicNetramOptions, out: *mut *mut MosaicNetram) -> MosaicStatus {
    guard(|| {
        // SAFETY: `opts` is NULL or a valid value to read for the call: mosaic.h's contract for it.
        let o = unsafe { c::ref_arg(opts, "opts") }?;
        // SAFETY: `out` is NULL or writable storage nobody else touches for the call: mosaic.h's contract for it.
        let out = unsafe { c::mut_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        let key = key()?;
        let servers = if o.servers.is_null() {
            std::env::var("MOSAIC_SERVERS").map_err(|_| {
                Failure(MosaicErrInvalid, "no memory servers: set opts.servers or MOSAIC_SERVERS".to_string())
            })?
        } else {
            // SAFETY: `o.servers` is NULL or a NUL-terminated string for the call: mosaic.h's contract for it.
            unsafe { c::str_arg(o.servers, "opts.servers") }?.to_string()
        };
        let servers: Vec<String> =
            servers.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        let mut cfg = NetRamConfig::new(servers, key, o.size, o.resident_budget);
        if o.copies > 0 {
            cfg.copies = o.copies as usize;
        }
        cfg.fault_mode = fault_mode_of(o.fault_mode)?;
        if !o.backing_file.is_null() {
            // SAFETY: `o.backing_file` is NULL or a NUL-terminated string for the call: mosaic.h's contract for it.
            cfg.backing_file = Some(unsafe { c::str_arg(o.backing_file, "opts.backing_file") }?.into());
        }
        if o.fixed_addr != 0 {
            let a = usize::try_from(o.fixed_addr)
                .map_err(|_| Failure(MosaicErrInvalid, "fixed_addr is too large".into()))?;
            cfg.fixed_addr = Some(a);
        }
        cfg.name = "c".into();
        let ram = NetRam::new(cfg).map_err(netram_error)?;
        let handle = Box::into_raw(Box::new(MosaicNetram { ram }));
        register(handle as usize);
        *out = handle;
        Ok(())
    })
}

/// The fault mode an option's `fault_mode` names.
fn fault_mode_of(m: u32) -> Result<FaultMode, Failure> {
    match m {
        MOSAIC_FAULT_THREAD => Ok(FaultMode::FaultingThread),
        MOSAIC_FAULT_PER_CPU => Ok(FaultMode::PerCpu),
        m => fail(MosaicErrInvalid, format!("unknown fault_mode {m}")),
    }
}

/// Runs `f` on the region behind a live handle.
fn with_region<T>(r: *const MosaicNetram, f: impl FnOnce(&MosaicNetram) -> T) -> Result<T, Failure> {
    if r.is_null() {
        return fail(MosaicErrNull, "the region handle is NULL");
    }
    // The registry lock is held while `f` runs, so a concurrent destroy cannot free the region.
    let live = lock(&LIVE);
    if !live.as_ref().is_some_and(|l| l.contains(&(r as usize))) {
        return fail(MosaicErrBadHandle, "the region handle is not live (destroyed, or never created)");
    }
    // SAFETY: `r` is in the registry of live regions (checked above, under its lock, held until
    // `f` returns), so it points to a region no one frees meanwhile.
    let region = unsafe { c::ref_arg(r, "region") }?;
    let v = f(region);
    drop(live);
    Ok(v)
}

/// The first byte of the region, or NULL for a NULL or dead handle.
#[no_mangle]
pub extern "C" fn mosaic_netram_ptr(r: *const MosaicNetram) -> *mut c_void {
    let mut p = std::ptr::null_mut();
    guard(|| {
        p = with_region(r, |r| r.ram.as_ptr().cast())?;
        Ok(())
    });
    p
}

/// The region's size in bytes (a whole number of pages), or 0 for a NULL or dead handle.
#[no_mangle]
pub extern "C" fn mosaic_netram_size(r: *const MosaicNetram) -> u64 {
    let mut n = 0;
    guard(|| {
        n = with_region(r, |r| r.ram.len() as u64)?;
        Ok(())
    });
    n
}

/// Copies the region's counters into `*out`.
#[no_mangle]
pub extern "C" fn mosaic_netram_get_stats(r: *const MosaicNetram, out: *mut MosaicNetramStats) -> MosaicStatus {
    guard(|| {
        // SAFETY: `out` is NULL or writable storage nobody else touches for the call: mosaic.h's contract for it.
        let out = unsafe { c::mut_arg(out, "out") }?;
        let s = with_region(r, |r| r.ram.stats())?;
        *out = MosaicNetramStats {
            fetched: s.fetched,
            prefetched: s.prefetched,
            cache_hits: s.cache_hits,
            zero_filled: s.zero_filled,
            evicted: s.evicted,
            written_back: s.written_back,
            failovers: s.failovers,
            rebuilt: s.rebuilt,
            lost: s.lost,
            resident: s.resident,
            ushered: s.ushered,
        };
        Ok(())
    })
}

/// Unmaps the region and frees its pages on the servers. The handle is dead afterwards; a second
/// destroy is refused with `MOSAIC_ERR_BAD_HANDLE`.
#[no_mangle]
pub extern "C" fn mosaic_netram_destroy(r: *mut MosaicNetram) -> MosaicStatus {
    guard(|| {
        if r.is_null() {
            return fail(MosaicErrNull, "the region handle is NULL");
        }
        if !unregister(r as usize) {
            return fail(MosaicErrBadHandle, "the region handle is not live (already destroyed, or never created)");
        }
        // SAFETY: the handle was live, so it came from Box::into_raw in mosaic_netram_create and
        // nobody else frees it: it was just removed from the registry under its lock.
        drop(unsafe { c::take_box(r) });
        Ok(())
    })
}

/// Starts a memory server in this process at `uri` (`tcp://127.0.0.1:0` picks a port) donating
/// `capacity` bytes, and stores its handle in `*out`.
#[no_mangle]
pub extern "C" fn mosaic_memserver_start(
    uri: *const c_char,
    capacity: u64,
    out: *mut *mut MosaicMemserver,
) -> MosaicStatus {
    guard(|| {
        // SAFETY: `out` is NULL or writable storage nobody else touches for the call: mosaic.h's contract for it.
        let out = unsafe { c::mut_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: `uri` is NULL or a NUL-terminated string for the call: mosaic.h's contract for it.
        let uri = unsafe { c::str_arg(uri, "uri") }?;
        let key = key()?;
        let server = MemServer::start(uri, MemServerConfig::new(capacity, key)).map_err(|e| {
            let status = if matches!(e, NetRamError::Config(_)) { MosaicErrInvalid } else { MosaicErrOs };
            Failure(status, mosaic_transport::error_chain(&e))
        })?;
        let uri = CString::new(server.uri()).map_err(|e| Failure(MosaicErrInvalid, e.to_string()))?;
        let handle = Box::into_raw(Box::new(MosaicMemserver { server, uri }));
        register(handle as usize);
        *out = handle;
        Ok(())
    })
}

/// The URI clients connect to (valid while the server lives), or NULL for a NULL or dead handle.
#[no_mangle]
pub extern "C" fn mosaic_memserver_uri(s: *const MosaicMemserver) -> *const c_char {
    let mut p = std::ptr::null();
    guard(|| {
        if s.is_null() {
            return fail(MosaicErrNull, "the server handle is NULL");
        }
        if !is_live(s as usize) {
            return fail(MosaicErrBadHandle, "the server handle is not live");
        }
        // SAFETY: `s` is a live server handle (checked above): it points to a server that only
        // mosaic_memserver_stop frees, which no thread may call while another uses the handle
        // (mosaic.h).
        p = unsafe { c::ref_arg(s, "server") }?.uri.as_ptr();
        Ok(())
    });
    p
}

/// Stops a server started by `mosaic_memserver_start()`; its clients' requests fail from then on.
/// The handle is dead afterwards; as with `free()`, no other thread may be using it meanwhile.
#[no_mangle]
pub extern "C" fn mosaic_memserver_stop(s: *mut MosaicMemserver) -> MosaicStatus {
    guard(|| {
        if s.is_null() {
            return fail(MosaicErrNull, "the server handle is NULL");
        }
        if !unregister(s as usize) {
            return fail(MosaicErrBadHandle, "the server handle is not live (already stopped, or never started)");
        }
        // SAFETY: as in mosaic_netram_destroy: a live handle from Box::into_raw, now unregistered.
        let MosaicMemserver { server, .. } = *unsafe { c::take_box(s) };
        server.shutdown();
        Ok(())
    })
}

fn dsm_error(e: &JoinError) -> Failure {
    let status = match e {
        JoinError::Environment { .. } | JoinError::Config(_) | JoinError::Key(_) | JoinError::Lock { .. } => {
            MosaicErrInvalid
        }
        JoinError::Region(PagerError::Unsupported { .. }) => MosaicErrUnsupported,
        JoinError::Region(_) | JoinError::Listen { .. } | JoinError::Rendezvous { .. } => MosaicErrOs,
        JoinError::Alloc { source: AllocError::Full { .. }, .. } => MosaicErrNoSpace,
        JoinError::Alloc { .. } | JoinError::Address { .. } | JoinError::Diverged { .. } => MosaicErrInvalid,
        _ => MosaicErrUnreachable,
    };
    Failure(status, mosaic_transport::error_chain(e))
}

/// Joins this process's DSM job as the environment describes it (`MOSAIC_DSM_RANK`,
/// `MOSAIC_DSM_SIZE` and `MOSAIC_DSM_RENDEZVOUS`, which `mosrun -n N` sets), with the cluster
/// key given to `mosaic_init`, sharing a region of `size` bytes (a whole number of pages, the
/// same on every node) mapped at the same address on every node. Waits until every node has
/// joined (30 s at most, `MOSAIC_DSM_JOIN_TIMEOUT_MS`) and stores the handle in `*out`.
#[no_mangle]
pub extern "C" fn mosaic_dsm_join(size: u64, out: *mut *mut MosaicDsm) -> MosaicStatus {
    guard(|| {
        // SAFETY: `out` is NULL or writable storage nobody else touches for the call: mosaic.h's contract for it.
        let out = unsafe { c::mut_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        let cfg = JobConfig::from_env_with_key(size, key()?).map_err(|e| dsm_error(&e))?;
        let job = Job::join(cfg).map_err(|e| dsm_error(&e))?;
        let handle = Box::into_raw(Box::new(MosaicDsm { job }));
        register(handle as usize);
        *out = handle;
        Ok(())
    })
}

/// Runs `f` on the job behind a live handle.
fn with_dsm<T>(d: *const MosaicDsm, f: impl FnOnce(&MosaicDsm) -> T) -> Result<T, Failure> {
    if d.is_null() {
        return fail(MosaicErrNull, "the DSM handle is NULL");
    }
    if !is_live(d as usize) {
        return fail(MosaicErrBadHandle, "the DSM handle is not live (left, or never joined)");
    }
    // SAFETY: `d` is a live handle (checked above): it points to a job that only mosaic_dsm_leave
    // frees, which no thread may call while another uses the handle (mosaic.h).
    let dsm = unsafe { c::ref_arg(d, "dsm") }?;
    Ok(f(dsm))
}

/// The first byte of the shared region and of its collective heap (the same address on every
/// node), or NULL for a NULL or dead handle. Lay the heap out yourself, or allocate from it with
/// `mosaic_dsm_alloc()`: one or the other.
#[no_mangle]
pub extern "C" fn mosaic_dsm_ptr(d: *const MosaicDsm) -> *mut c_void {
    let mut p = std::ptr::null_mut();
    guard(|| {
        p = with_dsm(d, |d| d.job.as_ptr().cast())?;
        Ok(())
    });
    p
}

/// The size in bytes of the collective heap that `mosaic_dsm_ptr()` points to (the `size` given
/// to `mosaic_dsm_join`), or 0 for a NULL or dead handle.
#[no_mangle]
pub extern "C" fn mosaic_dsm_bytes(d: *const MosaicDsm) -> u64 {
    let mut n = 0;
    guard(|| {
        n = with_dsm(d, |d| d.job.len() as u64)?;
        Ok(())
    });
    n
}

/// This node's rank (0 to `mosaic_dsm_nodes() - 1`), or -1 for a NULL or dead handle.
#[no_mangle]
pub extern "C" fn mosaic_dsm_rank(d: *const MosaicDsm) -> c_int {
    let mut r = -1;
    guard(|| {
        r = with_dsm(d, |d| c_int::from(d.job.rank()))?;
        Ok(())
    });
    r
}

/// The number of nodes in the job, or 0 for a NULL or dead handle.
#[no_mangle]
pub extern "C" fn mosaic_dsm_nodes(d: *const MosaicDsm) -> c_int {
    let mut n = 0;
    guard(|| {
        n = with_dsm(d, |d| c_int::from(d.job.size()))?;
        Ok(())
    });
    n
}

/// Waits until every node of the job has called `mosaic_dsm_barrier` as often as this one (one
/// thread per node calls it). Every access to the region before a node's call is seen by every
/// node after theirs.
#[no_mangle]
pub extern "C" fn mosaic_dsm_barrier(d: *const MosaicDsm) -> MosaicStatus {
    guard(|| with_dsm(d, |d| d.job.barrier())?.map_err(|e| dsm_error(&e)))
}

/// Takes DSM lock `id` (any number): waits until this node is granted it (locks are granted
/// in the order asked, by the lock's home node). One thread of a node holds a lock at a time.
#[no_mangle]
pub extern "C" fn mosaic_dsm_lock(d: *const MosaicDsm, id: u64) -> MosaicStatus {
    guard(|| with_dsm(d, |d| d.job.lock(id))?.map_err(|e| dsm_error(&e)))
}

/// Gives DSM lock `id` up; `MOSAIC_ERR_INVALID` if this node does not hold it.
#[no_mangle]
pub extern "C" fn mosaic_dsm_unlock(d: *const MosaicDsm, id: u64) -> MosaicStatus {
    guard(|| with_dsm(d, |d| d.job.unlock(id))?.map_err(|e| dsm_error(&e)))
}

/// Runs `f` on a live handle's job, storing what it gives in `*out` (NULL on failure).
fn dsm_out<T: Copy>(
    d: *const MosaicDsm,
    out: *mut T,
    none: T,
    f: impl FnOnce(&Job) -> Result<T, JoinError>,
) -> MosaicStatus {
    guard(|| {
        if out.is_null() {
            return fail(MosaicErrNull, "out is NULL");
        }
        // Done before `*out` is written (once, at the end): `out` may alias the operation's
        // word in the caller's view (fetch_add into the word it adds to).
        let result = with_dsm(d, |d| f(&d.job)).and_then(|r| r.map_err(|e| dsm_error(&e)));
        // SAFETY: `out` is non-NULL, writable private storage nobody else touches for the call:
        // mosaic.h's contract for it.
        let out = unsafe { c::mut_arg(out, "out") }?;
        *out = *result.as_ref().unwrap_or(&none);
        result.map(drop)
    })
}

/// Allocates `bytes` from the collective heap and stores the block's address in `*out`, the same
/// on every node. Collective: every node calls it, in the same order with the same size (one
/// thread per node), like `MPI_Win_allocate`; nodes that differ get `MOSAIC_ERR_INVALID`. Blocks
/// of a page or more are page-aligned, smaller ones 64-byte aligned; their pages' homes take turns
/// among the nodes. `MOSAIC_ERR_NO_SPACE` if the heap has no room.
#[no_mangle]
pub extern "C" fn mosaic_dsm_alloc(d: *const MosaicDsm, bytes: u64, out: *mut *mut c_void) -> MosaicStatus {
    dsm_out(d, out, std::ptr::null_mut(), |job| job.alloc(bytes).map(<*mut u8>::cast))
}

/// Frees a block from `mosaic_dsm_alloc()`. Collective, as the allocation was.
#[no_mangle]
pub extern "C" fn mosaic_dsm_free(d: *const MosaicDsm, block: *mut c_void) -> MosaicStatus {
    guard(|| with_dsm(d, |d| d.job.free(block.cast()))?.map_err(|e| dsm_error(&e)))
}

/// Allocates `bytes` from this node's arena (any thread, no other node involved) and stores the
/// block's address in `*out`: this node is home of its pages, so it uses them without asking
/// anyone until another node touches them. The address is valid on every node.
/// `MOSAIC_ERR_NO_SPACE` if the arena (`MOSAIC_DSM_ARENA_BYTES`) has no room.
#[no_mangle]
pub extern "C" fn mosaic_dsm_alloc_local(d: *const MosaicDsm, bytes: u64, out: *mut *mut c_void) -> MosaicStatus {
    dsm_out(d, out, std::ptr::null_mut(), |job| job.alloc_local(bytes).map(<*mut u8>::cast))
}

/// Frees a block from `mosaic_dsm_alloc_local()` on this node (`MOSAIC_ERR_INVALID` for another
/// node's block).
#[no_mangle]
pub extern "C" fn mosaic_dsm_free_local(d: *const MosaicDsm, block: *mut c_void) -> MosaicStatus {
    guard(|| with_dsm(d, |d| d.job.free_local(block.cast()))?.map_err(|e| dsm_error(&e)))
}

/// Adds `value` to the 64-bit word at `word` (in the shared region, 8-byte aligned) atomically
/// across every thread of every node, and stores what it held before in `*old` (wrapping on
/// overflow). `MOSAIC_ERR_INVALID` for a word outside the region or misaligned. `old` must be
/// the caller's own memory, not the shared region. (A C compiler's own atomics on region memory,
/// `__atomic_fetch_add`, are atomic across nodes too.)
#[no_mangle]
pub extern "C" fn mosaic_dsm_fetch_add(d: *const MosaicDsm, word: *mut u64, value: u64, old: *mut u64) -> MosaicStatus {
    dsm_out(d, old, 0, |job| job.fetch_add(word, value))
}

/// Stores `desired` in the 64-bit word at `word` if it holds `expected`, atomically across
/// every thread of every node; stores the value found in `*old` either way (the exchange
/// happened if it equals `expected`).
#[no_mangle]
pub extern "C" fn mosaic_dsm_compare_exchange(
    d: *const MosaicDsm,
    word: *mut u64,
    expected: u64,
    desired: u64,
    old: *mut u64,
) -> MosaicStatus {
    dsm_out(d, old, 0, |job| job.compare_exchange(word, expected, desired).map(|r| r.unwrap_or_else(|v| v)))
}

/// Leaves the job: waits until every node is done with the region, then unmaps it. The handle
/// is dead afterwards; as with `free()`, no other thread may be using it meanwhile.
#[no_mangle]
pub extern "C" fn mosaic_dsm_leave(d: *mut MosaicDsm) -> MosaicStatus {
    guard(|| {
        if d.is_null() {
            return fail(MosaicErrNull, "the DSM handle is NULL");
        }
        if !unregister(d as usize) {
            return fail(MosaicErrBadHandle, "the DSM handle is not live (already left, or never joined)");
        }
        // SAFETY: as in mosaic_netram_destroy: a live handle from Box::into_raw, now unregistered.
        let MosaicDsm { job } = *unsafe { c::take_box(d) };
        job.leave().map_err(|e| dsm_error(&e))
    })
}
