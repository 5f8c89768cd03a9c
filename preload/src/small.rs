//! Small allocations on network RAM: mimalloc over an arena that is a block of the region.
//!
//! Allocations below the threshold are too many and too small for the region's page heap, so a
//! real allocator serves them: mimalloc (v3, statically linked), handed one large block of the
//! region as its only memory (`mi_manage_os_memory_ex`), with its allocations from the operating
//! system turned off (`disallow_os_alloc`). Everything a program allocates with `malloc` then
//! lives in the region and counts against its budget; what mimalloc gives back
//! (`madvise(MADV_DONTNEED)` after its purge delay) reaches the shim's `madvise`, which discards
//! the pages here and on the servers.
//!
//! The arena is address space, not memory: its pages cost nothing until touched, as anonymous
//! memory does. Mimalloc's per-thread bookkeeping lives in the arena too; its page map (about
//! 2 MiB of address space, mapped when it starts: [`start`]) is outside the region, and the budget
//! counts what of it is touched.
//!
//! Mimalloc has no fork handlers: a thread holding one of its internal locks while another
//! forks leaves the lock held in the child (as with most allocators but glibc's).

use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Starts mimalloc (its page map, its options from `MIMALLOC_*`) with the calling thread's
/// allocations and mappings kept out of the region: call it under the shim's re-entrancy flag,
/// before anything else of mimalloc's runs.
pub fn start() {
    // SAFETY: mimalloc's initialisation, idempotent.
    unsafe { mi::mi_process_init() }
}

/// Alignment of the arena's start, which mimalloc requires (its slice size, 64 KiB).
pub const ARENA_ALIGN: usize = 64 << 10;

/// Smallest arena mimalloc accepts (32 MiB).
pub const ARENA_MIN: usize = 32 << 20;

/// The block of the region mimalloc allocates from.
#[derive(Debug)]
pub struct Arena {
    base: usize,
    len: usize,
}

impl Arena {
    /// Hands `[base, base + len)` to mimalloc as its only memory. Returns `None` if mimalloc
    /// refuses it (misaligned or too small).
    ///
    /// # Safety
    /// The range must be mapped readable and writable, read as zeros, stay mapped for the rest
    /// of the process, and be used by nothing but mimalloc from now on. Call it once.
    pub unsafe fn adopt(base: usize, len: usize) -> Option<Arena> {
        if base % ARENA_ALIGN != 0 || len < ARENA_MIN {
            return None;
        }
        let mut id: mi::mi_arena_id_t = std::ptr::null_mut();
        // SAFETY: setting an option is always allowed; the range meets `manage_os_memory`'s
        // contract by this function's.
        let ok = unsafe {
            mi::mi_option_set(mi::mi_option_limit_os_alloc, 1);
            mi::mi_manage_os_memory_ex(base as *mut c_void, len, true, false, true, -1, false, &mut id)
        };
        ok.then_some(Arena { base, len })
    }

    /// Whether `p` points into the arena.
    pub fn contains(&self, p: *const c_void) -> bool {
        let a = p as usize;
        a >= self.base && a < self.base + self.len
    }

    /// `malloc` in the arena; NULL when it is full.
    pub fn alloc(&self, size: usize) -> *mut c_void {
        // SAFETY: mimalloc's malloc, for any size.
        unsafe { mi::mi_malloc(size) }
    }

    /// `calloc` in the arena; NULL when it is full or `n * size` overflows.
    pub fn calloc(&self, n: usize, size: usize) -> *mut c_void {
        // SAFETY: mimalloc's calloc checks the product.
        unsafe { mi::mi_calloc(n, size) }
    }

    /// `size` bytes aligned to `align` (a power of two) in the arena; NULL when it is full.
    pub fn aligned(&self, align: usize, size: usize) -> *mut c_void {
        // SAFETY: mimalloc's aligned malloc, for a power-of-two alignment.
        unsafe { mi::mi_malloc_aligned(size, align) }
    }

    /// `realloc` of an arena block, within the arena.
    ///
    /// # Safety
    /// `p` is a live block of this arena.
    pub unsafe fn realloc(&self, p: *mut c_void, size: usize) -> *mut c_void {
        // SAFETY: by the caller's contract.
        unsafe { mi::mi_realloc(p, size) }
    }

    /// Frees an arena block.
    ///
    /// # Safety
    /// `p` is a live block of this arena.
    pub unsafe fn free(&self, p: *mut c_void) {
        // SAFETY: by the caller's contract.
        unsafe { mi::mi_free(p) }
    }

    /// The usable size of an arena block.
    ///
    /// # Safety
    /// `p` is a live block of this arena.
    pub unsafe fn usable_size(&self, p: *const c_void) -> usize {
        // SAFETY: by the caller's contract.
        unsafe { mi::mi_usable_size(p) }
    }
}
