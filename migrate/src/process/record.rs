//! What each thread of a process being migrated reports from inside (see [`super::shim`]).
//!
//! The record is a plain `repr(C)` block written on a Unix socket by the thread's signal
//! handler: whatever the kernel keeps per thread that `/proc` does not show.

/// The first word of a record: "MOSCKPT1".
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"MOSCKPT1");

/// Signals the kernel knows (1 to 64).
pub const SIGNALS: usize = 64;

/// A signal's disposition as `rt_sigaction(2)` has it on x86-64 (the kernel's layout, which
/// keeps the handler's `sa_restorer`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSigaction {
    /// The handler, `SIG_DFL` (0) or `SIG_IGN` (1).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// Where the handler returns to (libc's `__restore_rt`).
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

/// One thread's state, as its checkpoint handler saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadRecord {
    /// `RECORD_MAGIC`.
    pub magic: u64,
    /// The thread's id (as the process sees it).
    pub tid: u64,
    /// The process's id (as the process sees it).
    pub pid: u64,
    /// The address of the `ucontext` the kernel saved on the thread's stack when the signal came:
    /// registers, FPU state, signal mask and alternate stack. Returning through it (with
    /// `rt_sigreturn`) resumes the thread where it was.
    pub ucontext: u64,
    /// The thread pointer (`FS` base).
    pub fs_base: u64,
    /// The robust futex list (`get_robust_list`).
    pub robust_head: u64,
    /// Its length.
    pub robust_len: u64,
    /// The registered `rseq` area, or 0.
    pub rseq_addr: u64,
    /// Its length as registered.
    pub rseq_len: u64,
    /// Its signature.
    pub rseq_sig: u64,
    /// Where the kernel clears the thread id when the thread exits (`set_tid_address`), or 0.
    pub clear_tid: u64,
    /// The descriptor of the socket this record came on (not the program's: left out of the
    /// files that move).
    pub socket_fd: u64,
    /// Every signal's disposition (index `n - 1` for signal `n`); the same in every thread.
    pub actions: [KernelSigaction; SIGNALS],
}

impl ThreadRecord {
    /// The record's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: a repr(C) block of u64s only (no padding), read as bytes.
        unsafe { std::slice::from_raw_parts((self as *const ThreadRecord).cast::<u8>(), size_of::<ThreadRecord>()) }
    }

    /// A record from bytes, if they are one.
    pub fn from_bytes(b: &[u8]) -> Option<ThreadRecord> {
        if b.len() != size_of::<ThreadRecord>() {
            return None;
        }
        // SAFETY: the length is right and every bit pattern is a valid record (all u64s);
        // read_unaligned copes with any alignment of the buffer.
        let r = unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<ThreadRecord>()) };
        (r.magic == RECORD_MAGIC).then_some(r)
    }
}

/// The verdict a stopped thread waits for: go on here (the migration did not happen).
pub const VERDICT_RESUME: u8 = b'R';
/// The verdict a stopped thread waits for: stay stopped for good (the process runs elsewhere now
/// and this copy only serves its pages until it is killed).
pub const VERDICT_STAY: u8 = b'S';

/// The abstract Unix socket name the handlers connect to, for a migration's token.
pub fn socket_name(token: u64) -> [u8; 32] {
    let mut name = *b"\0mosaic-migrate-0000000000000000";
    let hex = b"0123456789abcdef";
    for i in 0..16 {
        name[16 + i] = hex[((token >> (60 - 4 * i)) & 0xf) as usize];
    }
    name
}

/// The abstract Unix socket address for a migration's token, and its length (what both the
/// handlers' `connect` and the agent's `bind` take; building it is async-signal-safe).
#[allow(clippy::cast_possible_truncation)] // AF_UNIX and a 48-byte length: small constants
pub fn socket_addr(token: u64) -> (libc::sockaddr_un, libc::socklen_t) {
    let name = socket_name(token);
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(name) {
        *d = s as libc::c_char;
    }
    let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + name.len()) as libc::socklen_t;
    (addr, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_spell_the_token_in_hex() {
        assert_eq!(&socket_name(0x0123_4567_89ab_cdef)[..], b"\0mosaic-migrate-0123456789abcdef");
    }

    #[test]
    fn records_round_trip_and_others_are_refused() {
        let mut r = ThreadRecord {
            magic: RECORD_MAGIC,
            tid: 7,
            pid: 7,
            ucontext: 0x7fff_0000,
            fs_base: 1,
            robust_head: 2,
            robust_len: 24,
            rseq_addr: 3,
            rseq_len: 32,
            rseq_sig: 0x5305_3053,
            clear_tid: 4,
            socket_fd: 5,
            actions: [KernelSigaction::default(); SIGNALS],
        };
        r.actions[9].handler = 0x1234;
        let back = ThreadRecord::from_bytes(r.as_bytes()).unwrap();
        assert_eq!((back.tid, back.ucontext, back.actions[9].handler), (7, 0x7fff_0000, 0x1234));
        assert!(ThreadRecord::from_bytes(&r.as_bytes()[1..]).is_none());
        r.magic = 0;
        assert!(ThreadRecord::from_bytes(r.as_bytes()).is_none());
    }
}
