//! The few raw system calls the transports need: poll, eventfd, memfd, mmap and fd passing.
//!
//! Every `unsafe` block of the transport crate outside the shm ring and the page window lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::time::Duration;

/// What to wait for in [`poll_one`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Interest {
    /// Readable, or closed.
    Read,
    /// Writable, or closed.
    Write,
}

fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        // Round up so a 10 us wait does not become a busy zero-timeout poll.
        Some(t) => i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
    }
}

/// Waits until `fd` is ready for `interest`, closed, or `timeout` passes. Returns true if ready.
pub(crate) fn poll_one(fd: &impl AsFd, interest: Interest, timeout: Option<Duration>) -> io::Result<bool> {
    let events = match interest {
        Interest::Read => libc::POLLIN,
        Interest::Write => libc::POLLOUT,
    };
    let mut fds = [pollfd(fd.as_fd(), events)];
    poll(&mut fds, timeout).map(|n| n > 0)
}

/// A `pollfd` for `fd` with `events`.
pub(crate) fn pollfd(fd: BorrowedFd<'_>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 }
}

/// `poll(2)` over `fds`; returns the number of ready descriptors. EINTR counts as zero ready.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let n = libc::nfds_t::try_from(fds.len()).map_err(|_| io::Error::other("too many fds"))?;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `n` pollfd structs for the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms(timeout)) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// Drains a side-channel socket that carries nothing after set-up (shm, rdma) and says whether
/// the peer hung up: end of stream or an error other than "nothing to read".
pub(crate) fn side_channel_closed(mut sock: impl std::io::Read) -> bool {
    let mut b = [0u8; 16];
    match sock.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted,
    }
}

/// True if the peer of the connected socket `fd` has hung up or the socket failed, without
/// reading anything (`poll` with `POLLRDHUP` and no wait).
pub(crate) fn hung_up(fd: &impl AsFd) -> bool {
    let mut fds = [pollfd(fd.as_fd(), libc::POLLRDHUP)];
    matches!(poll(&mut fds, Some(Duration::ZERO)), Ok(1))
        && fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// A non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    owned(fd)
}

/// Adds one to an eventfd's counter, waking a poller.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to a descriptor we borrow. A full counter (EAGAIN)
    // already means "signalled", so the result is deliberately ignored.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// Resets an eventfd's counter (non-blocking).
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64; EAGAIN (counter zero) is fine to ignore.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
}

/// An anonymous shared-memory file of `len` bytes that can be sealed ([`seal_size`]).
pub(crate) fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL in memfd name"))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let fd = owned(unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::other("memfd too large"))?;
    // SAFETY: ftruncate on a descriptor we own; no memory is passed.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The seals that fix a memfd's size for good: nobody holding it (the peer included) can
/// shrink it under our mapping (which would turn our next access into SIGBUS), grow it, or
/// remove the seals.
pub(crate) const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Seals a memfd's size ([`SIZE_SEALS`]).
pub(crate) fn seal_size(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl(F_ADD_SEALS) on a descriptor we borrow, with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SIZE_SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of a memfd and its size in bytes.
pub(crate) fn seals_and_size(fd: BorrowedFd<'_>) -> io::Result<(libc::c_int, u64)> {
    // SAFETY: fcntl(F_GET_SEALS) on a descriptor we borrow; it takes no argument.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `stat` is plain old data; fstat fills it for a descriptor we borrow.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable stat buffer for the duration of the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((seals, u64::try_from(st.st_size).unwrap_or(0)))
}

/// The process, user and group at the other end of a connected Unix socket (`SO_PEERCRED`: the
/// credentials the peer had when it connected, vouched for by the kernel).
pub(crate) fn peer_cred(sock: &UnixStream) -> io::Result<libc::ucred> {
    // SAFETY: ucred is plain old data; zero is a valid value for every field.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(0);
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is live and that large.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &raw mut len)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// A shared or anonymous mapping, unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is plain memory; what is stored in it and how it is shared between threads
// is the business of its users (the shm ring and the page window), which document their rules.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only hands out the base pointer and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, read-write.
    pub(crate) fn shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        Mapping::map(len, libc::MAP_SHARED, fd.as_raw_fd())
    }

    /// Maps `len` bytes of private anonymous memory (zero-filled, page-aligned).
    pub(crate) fn anonymous(len: usize) -> io::Result<Mapping> {
        Mapping::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1)
    }

    fn map(len: usize, flags: libc::c_int, fd: RawFd) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // A raw system call, not libc's mmap: a program may interpose that (Mosaic's own LD_PRELOAD
        // shim does), and the transport's buffers must stay ordinary memory.
        // SAFETY: a fresh mapping at an address the kernel picks; it overlaps no Rust object.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                std::ptr::null_mut::<libc::c_void>(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        let p = r as *mut libc::c_void;
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// The first byte.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this Mapping created; no reference into it outlives
        // `self`, because users borrow the Mapping for as long as they touch its memory.
        unsafe { libc::syscall(libc::SYS_munmap, self.ptr.as_ptr(), self.len) };
    }
}

/// The most descriptors passed in one message.
const MAX_FDS: usize = 8;

/// Sends `data` and the descriptors `fds` over a Unix stream socket (SCM_RIGHTS).
pub(crate) fn send_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad fd message"));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    let mut cmsg_buf = [0u64; 16]; // 128 bytes, 8-aligned: room for MAX_FDS descriptors
    let mut iov = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
    // SAFETY: msghdr is plain old data; zero is a valid value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(u32::try_from(fd_bytes).unwrap_or(0)) } as _;
    // SAFETY: msg_control points at `cmsg_buf`, large enough for one cmsghdr with MAX_FDS fds
    // (checked above), so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for `fd_bytes`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(u32::try_from(fd_bytes).unwrap_or(0)) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
    }
    // SAFETY: `msg` and everything it points to (iov, data, cmsg_buf) live across the call.
    let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives up to `data.len()` bytes and up to `MAX_FDS` descriptors (SCM_RIGHTS).
pub(crate) fn recv_fds(sock: &UnixStream, data: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg_buf = [0u64; 16];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: msghdr is plain old data; zero is a valid value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
    // SAFETY: `msg` points at live buffers of the stated sizes for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed cmsghdrs;
    // CMSG_FIRSTHDR/NXTHDR walk only within them, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors that the kernel installed for us to own.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / std::mem::size_of::<RawFd>();
                let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data_ptr.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((usize::try_from(n).unwrap_or(0), fds))
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor returned by the kernel to us and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Fills `buf` with random bytes from the kernel.
pub(crate) fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    getrandom::fill(buf).map_err(|e| io::Error::other(format!("getrandom: {e}")))
}
