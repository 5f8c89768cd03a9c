//! Safe wrappers over `shim.c`: one RC queue pair, its completion queues, memory registration.
//!
//! Every `unsafe` call into the shim is here. Work requests take raw addresses: the functions that
//! post them are `unsafe fn`s whose callers guarantee the buffer outlives the completion.

use crate::rdma_wire::QpAddr;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

#[repr(C)]
struct RawCtx {
    _private: [u8; 0],
}

/// What one side tells the other to connect its queue pair: the wire's checked [`QpAddr`], whose
/// `repr(C)` layout is also the C layer's.
pub(crate) type QpInfo = QpAddr;

/// One work completion.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Wc {
    pub(crate) wr_id: u64,
    pub(crate) status: u32,
    pub(crate) opcode: u32,
    pub(crate) byte_len: u32,
}

const ERR_LEN: usize = 256;

extern "C" {
    fn mrd_open(
        dev: *const c_char,
        gid_index: c_int,
        depth: u32,
        out: *mut *mut RawCtx,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn mrd_close(c: *mut RawCtx);
    fn mrd_local_info(c: *mut RawCtx, psn: u32, info: *mut QpInfo, err: *mut c_char, errlen: usize) -> c_int;
    fn mrd_connect(c: *mut RawCtx, psn: u32, remote: *const QpInfo, err: *mut c_char, errlen: usize) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn mrd_reg(
        c: *mut RawCtx,
        addr: *mut c_void,
        len: usize,
        remote: c_int,
        mr: *mut *mut c_void,
        lkey: *mut u32,
        rkey: *mut u32,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn mrd_dereg(mr: *mut c_void);
    fn mrd_post_recv(c: *mut RawCtx, wr_id: u64, addr: *mut c_void, len: u32, lkey: u32) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn mrd_post(
        c: *mut RawCtx,
        op: c_int,
        wr_id: u64,
        addr: *mut c_void,
        len: u32,
        lkey: u32,
        raddr: u64,
        rkey: u32,
    ) -> c_int;
    fn mrd_poll(c: *mut RawCtx, which: c_int, out: *mut Wc, max: c_int) -> c_int;
    fn mrd_wc_status_str(status: u32) -> *const c_char;
    fn mrd_recv_fd(c: *mut RawCtx) -> c_int;
    fn mrd_arm_recv(c: *mut RawCtx) -> c_int;
    fn mrd_ack_recv(c: *mut RawCtx) -> c_int;
}

fn shim_error(rc: c_int, err: &[c_char; ERR_LEN]) -> io::Error {
    // SAFETY: the shim always NUL-terminates what it writes (snprintf), and the buffer was zeroed,
    // so there is a NUL within ERR_LEN bytes.
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    io::Error::new(io::Error::from_raw_os_error(rc).kind(), msg)
}

/// A queue pair with its device context, protection domain and completion queues.
pub(crate) struct QueuePair {
    raw: NonNull<RawCtx>,
}

// SAFETY: libibverbs objects may be used from any thread; rdma-core serialises posting and
// polling internally per queue. Destruction happens once, in Drop, with exclusive access.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

/// Which completion queue.
#[derive(Clone, Copy)]
pub(crate) enum Queue {
    /// SEND, RDMA READ and RDMA WRITE completions.
    Send = 0,
    /// RECV completions.
    Recv = 1,
}

/// A work request's operation.
#[derive(Clone, Copy)]
pub(crate) enum Op {
    Send = 0,
    Read = 1,
    Write = 2,
}

impl QueuePair {
    /// Opens `device` (the first device if empty) and creates an RC queue pair in INIT.
    pub(crate) fn open(device: &str, gid_index: i32, depth: u32) -> io::Result<QueuePair> {
        let dev = CString::new(device).map_err(|_| io::Error::other("NUL in device name"))?;
        let mut err = [0 as c_char; ERR_LEN];
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated string, valid out-pointer and error buffer of ERR_LEN.
        let rc = unsafe { mrd_open(dev.as_ptr(), gid_index, depth, &raw mut raw, err.as_mut_ptr(), ERR_LEN) };
        if rc != 0 {
            return Err(shim_error(rc, &err));
        }
        let raw = NonNull::new(raw).ok_or_else(|| io::Error::other("mrd_open returned null"))?;
        Ok(QueuePair { raw })
    }

    /// This side's connection info, with send PSN `psn`.
    pub(crate) fn local_info(&self, psn: u32) -> io::Result<QpInfo> {
        let mut info = QpInfo::default();
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: `raw` is a live context; `info` and `err` are valid for writing.
        let rc = unsafe { mrd_local_info(self.raw.as_ptr(), psn, &raw mut info, err.as_mut_ptr(), ERR_LEN) };
        if rc != 0 {
            return Err(shim_error(rc, &err));
        }
        Ok(info)
    }

    /// Connects to the peer described by `remote` (INIT -> RTR -> RTS).
    pub(crate) fn connect(&self, my_psn: u32, remote: &QpInfo) -> io::Result<()> {
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: `raw` is live; `remote` and `err` are valid for the call.
        let rc = unsafe { mrd_connect(self.raw.as_ptr(), my_psn, remote, err.as_mut_ptr(), ERR_LEN) };
        if rc != 0 {
            return Err(shim_error(rc, &err));
        }
        Ok(())
    }

    /// Registers `len` bytes at `addr`; `remote` also allows the peer's RDMA READ and WRITE.
    ///
    /// # Safety
    /// `[addr, addr + len)` must stay mapped for as long as the returned region lives.
    pub(crate) unsafe fn register(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
        remote: bool,
    ) -> io::Result<MemoryRegion> {
        let mut err = [0 as c_char; ERR_LEN];
        let (mut mr, mut lkey, mut rkey) = (std::ptr::null_mut(), 0u32, 0u32);
        // SAFETY: `raw` is live; the memory contract is the caller's; out-pointers are valid.
        let rc = unsafe {
            mrd_reg(
                self.raw.as_ptr(),
                addr.cast(),
                len,
                c_int::from(remote),
                &raw mut mr,
                &raw mut lkey,
                &raw mut rkey,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        if rc != 0 {
            return Err(shim_error(rc, &err));
        }
        Ok(MemoryRegion { mr, lkey, rkey, addr: addr as u64, _qp: self.clone() })
    }

    /// Posts a receive of up to `len` bytes into `addr`.
    ///
    /// # Safety
    /// `[addr, addr + len)` lies in a region registered here with `lkey`, and stays untouched by
    /// anyone else until this request's completion is polled.
    pub(crate) unsafe fn post_recv(&self, wr_id: u64, addr: *mut u8, len: u32, lkey: u32) -> io::Result<()> {
        // SAFETY: `raw` is live; the buffer contract is the caller's.
        let rc = unsafe { mrd_post_recv(self.raw.as_ptr(), wr_id, addr.cast(), len, lkey) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Posts a SEND, RDMA READ or RDMA WRITE (always signalled).
    ///
    /// # Safety
    /// `[addr, addr + len)` lies in a region registered here with `lkey` and stays valid (and, for
    /// a READ, untouched by anyone else) until this request's completion is polled. For READ and
    /// WRITE, `raddr`/`rkey` name memory the peer registered for remote access.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn post(
        &self,
        op: Op,
        wr_id: u64,
        addr: *mut u8,
        len: u32,
        lkey: u32,
        raddr: u64,
        rkey: u32,
    ) -> io::Result<()> {
        // SAFETY: `raw` is live; the buffer contract is the caller's.
        let rc = unsafe { mrd_post(self.raw.as_ptr(), op as c_int, wr_id, addr.cast(), len, lkey, raddr, rkey) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Polls up to `out.len()` (at most 32) completions from `queue`.
    pub(crate) fn poll(&self, queue: Queue, out: &mut [Wc]) -> io::Result<usize> {
        let max = c_int::try_from(out.len().min(32)).unwrap_or(32);
        // SAFETY: `raw` is live; `out` has room for `max` completions.
        let n = unsafe { mrd_poll(self.raw.as_ptr(), queue as c_int, out.as_mut_ptr(), max) };
        usize::try_from(n).map_err(|_| io::Error::other("ibv_poll_cq failed"))
    }

    /// The completion channel of the receive queue (non-blocking).
    pub(crate) fn recv_fd(&self) -> std::os::fd::RawFd {
        // SAFETY: `raw` is live; returns an fd owned by the context.
        unsafe { mrd_recv_fd(self.raw.as_ptr()) }
    }

    /// Asks for an event on the next receive completion.
    pub(crate) fn arm_recv(&self) -> io::Result<()> {
        // SAFETY: `raw` is live.
        match unsafe { mrd_arm_recv(self.raw.as_ptr()) } {
            0 => Ok(()),
            rc => Err(io::Error::from_raw_os_error(rc)),
        }
    }

    /// Consumes a pending receive event, if any.
    pub(crate) fn ack_recv(&self) {
        // SAFETY: `raw` is live; the channel is non-blocking, so this never blocks.
        let _ = unsafe { mrd_ack_recv(self.raw.as_ptr()) };
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: `raw` came from mrd_open and is closed exactly once. Every memory region holds
        // an Arc of this queue pair, so all of them are deregistered before this runs.
        unsafe { mrd_close(self.raw.as_ptr()) };
    }
}

/// Human-readable completion status.
pub(crate) fn status_str(status: u32) -> String {
    // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any value.
    unsafe { CStr::from_ptr(mrd_wc_status_str(status)) }.to_string_lossy().into_owned()
}

/// A registered memory region.
pub(crate) struct MemoryRegion {
    mr: *mut c_void,
    pub(crate) lkey: u32,
    pub(crate) rkey: u32,
    pub(crate) addr: u64,
    /// Keeps the protection domain alive until this region is deregistered.
    _qp: Arc<QueuePair>,
}

// SAFETY: an MR handle is an opaque token usable from any thread; it is deregistered once.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above; shared access only reads the keys.
unsafe impl Sync for MemoryRegion {}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: `mr` came from ibv_reg_mr and is deregistered exactly once.
        unsafe { mrd_dereg(self.mr) };
    }
}
