//! The destination's side of process migration: a process becomes the migrated one.
//!
//! The rebuilt process must end up with the migrated process's memory at the same addresses,
//! but it starts as a copy of the agent, whose own mappings lie anywhere. So it prepares
//! everything it can with ordinary code (descriptors, signal dispositions, a userfaultfd, the
//! bytes of the pages that travel with the image), then copies a small position-independent
//! interpreter ([`RESTORER_START`]..[`RESTORER_END`], written in assembly) into a *hole*, a range
//! free in both layouts, writes there a program of system calls ([`Step`]s), switches to a stack
//! in the hole and jumps. The program unmaps everything of the agent's, moves the kernel's
//! `[vvar]`/`[vdso]` mappings to where the migrated process had them, maps the migrated
//! process's mappings (files from the same files, anonymous memory registered with the
//! userfaultfd, so that its pages come from the source on first touch), sets the `mm` fields,
//! drops to the process's ids, creates each thread with its own id (`clone3` with `set_tid`,
//! inside a fresh pid namespace), and every thread returns into its saved `ucontext` with
//! `rt_sigreturn`, which restores its registers, FPU state, signal mask and alternate stack.
//!
//! A failed step writes its number and error on the report descriptor and exits with 127;
//! [`describe_failure`] names it from the step table written before the jump.

// System-call arguments and results (pids, descriptors, addresses, kernel ABI words) pass
// between C and Rust integer types here; every value is one the kernel gave or takes.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};

use mosaic_pager::ForeignUffd;

use super::image::{Backing, Mapping, OpenFile, ProcessImage, USER_END};
use crate::MigrateError;

const PAGE: u64 = 4096;

/// Step kinds (the first word of a [`Step`]).
const OP_SYSCALL: u64 = 1;
/// A system call whose failure is ignored.
const OP_TRY: u64 = 2;
/// `clone3`: the new thread goes on with the next step, the caller skips `args[5]` steps.
const OP_CLONE: u64 = 3;
/// `rt_sigreturn` with the stack pointer at `args[0]` (the saved `ucontext`).
const OP_SIGRETURN: u64 = 4;

/// One step of the restore program, read by the interpreter: a kind, a system call number and
/// its six arguments (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Step {
    op: u64,
    nr: u64,
    args: [u64; 6],
}

core::arch::global_asm!(
    ".pushsection .text.mosaic_restorer,\"ax\",@progbits",
    ".globl mosaic_restorer_start",
    ".globl mosaic_restorer_end",
    ".p2align 4",
    // rdi: the first step; rsi: the report descriptor. Uses no memory but the steps (and, to
    // report a failure, 16 bytes of stack).
    "mosaic_restorer_start:",
    "mov r12, rdi",
    "mov r13, rdi",
    "mov r14, rsi",
    "mosaic_restorer_loop:",
    "mov rax, [r12]",
    "cmp rax, 4",
    "je mosaic_restorer_sigreturn",
    "mov rax, [r12 + 8]",
    "mov rdi, [r12 + 16]",
    "mov rsi, [r12 + 24]",
    "mov rdx, [r12 + 32]",
    "mov r10, [r12 + 40]",
    "mov r8, [r12 + 48]",
    "mov r9, [r12 + 56]",
    "syscall",
    "mov rcx, [r12]",
    "cmp rcx, 2",
    "je mosaic_restorer_next",
    "cmp rax, -4095",
    "jae mosaic_restorer_fail",
    "cmp rcx, 3",
    "jne mosaic_restorer_next",
    "test rax, rax",
    "jz mosaic_restorer_next",
    "mov rcx, [r12 + 56]",
    "shl rcx, 6",
    "add r12, rcx",
    "mosaic_restorer_next:",
    "add r12, 64",
    "jmp mosaic_restorer_loop",
    "mosaic_restorer_sigreturn:",
    "mov rsp, [r12 + 16]",
    "mov eax, 15",
    "syscall",
    "ud2",
    "mosaic_restorer_fail:",
    "sub r12, r13",
    "push rax",
    "push r12",
    "mov eax, 1",
    "mov rdi, r14",
    "mov rsi, rsp",
    "mov edx, 16",
    "syscall",
    "mov eax, 231",
    "mov edi, 127",
    "syscall",
    "ud2",
    "mosaic_restorer_end:",
    ".popsection",
);

extern "C" {
    /// The interpreter's first byte.
    #[link_name = "mosaic_restorer_start"]
    static RESTORER_START: u8;
    /// Past its last byte.
    #[link_name = "mosaic_restorer_end"]
    static RESTORER_END: u8;
}

/// Bytes of stack each thread has in the hole until its `rt_sigreturn`.
const THREAD_STACK: u64 = 1024;

/// The hole: a range free in both the agent's layout and the migrated process's, holding the
/// interpreter, room to park the kernel's mappings, the steps and what they point to.
struct Hole {
    base: u64,
    len: u64,
    /// Where the kernel mappings wait while the agent's mappings go.
    parking: u64,
    /// Next free byte of the data area.
    next: u64,
}

impl Hole {
    /// Bump-allocates `len` bytes aligned to 16, returning their address.
    fn alloc(&mut self, len: u64) -> Result<u64, MigrateError> {
        let at = self.next.next_multiple_of(16);
        if at + len > self.base + self.len {
            return Err(MigrateError::Restore("the restore program outgrew its hole".into()));
        }
        self.next = at + len;
        Ok(at)
    }

    /// Copies `bytes` into the hole, returning their address.
    fn put(&mut self, bytes: &[u8]) -> Result<u64, MigrateError> {
        let at = self.alloc(bytes.len() as u64)?;
        // SAFETY: `at..at + len` lies inside the hole, mapped read-write by this process.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
        Ok(at)
    }

    fn put_words(&mut self, words: &[u64]) -> Result<u64, MigrateError> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.put(&bytes)
    }
}

/// The program, with a description of each step for the failure report.
#[derive(Default)]
struct Program {
    steps: Vec<Step>,
    what: Vec<String>,
}

impl Program {
    fn call(&mut self, op: u64, nr: libc::c_long, args: &[u64], what: impl Into<String>) {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        self.steps.push(Step { op, nr: nr as u64, args: a });
        self.what.push(what.into());
    }
    fn must(&mut self, nr: libc::c_long, args: &[u64], what: impl Into<String>) {
        self.call(OP_SYSCALL, nr, args, what);
    }
    fn try_(&mut self, nr: libc::c_long, args: &[u64], what: impl Into<String>) {
        self.call(OP_TRY, nr, args, what);
    }
}

/// A range of the agent's own layout (from `/proc/self/maps`).
#[derive(Clone, Debug)]
struct Own {
    start: u64,
    end: u64,
    name: String,
}

fn own_layout() -> Result<Vec<Own>, MigrateError> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| MigrateError::Restore(format!("/proc/self/maps: {e}")))?;
    let mut out = Vec::with_capacity(512);
    for l in maps.lines() {
        let mut it = l.split_whitespace();
        let Some((s, e)) = it.next().and_then(|r| r.split_once('-')) else { continue };
        let name = it.nth(4).unwrap_or("").to_string();
        let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else { continue };
        out.push(Own { start, end, name });
    }
    Ok(out)
}

/// The lowest free range of `len` bytes at or above 4 GiB that neither layout uses.
fn find_hole(own: &[Own], image: &ProcessImage, len: u64) -> Option<u64> {
    let mut used: Vec<(u64, u64)> = own.iter().map(|o| (o.start, o.end)).collect();
    used.extend(image.mappings.iter().map(|m| (m.start, m.end)));
    used.sort();
    let mut at: u64 = 1 << 32;
    for (s, e) in used {
        // Keep a page of distance from anything.
        if s >= at + len + PAGE {
            return Some(at);
        }
        at = at.max((e + PAGE).next_multiple_of(PAGE));
    }
    (at + len < USER_END - (1 << 30)).then_some(at)
}

fn restore_err(what: impl std::fmt::Display) -> MigrateError {
    MigrateError::Restore(what.to_string())
}

fn last_os(what: impl std::fmt::Display) -> MigrateError {
    restore_err(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// Moves descriptor `fd` to the lowest free number at or above `min` (close-on-exec).
fn lift(fd: RawFd, min: RawFd) -> Result<RawFd, MigrateError> {
    // SAFETY: fcntl/close on descriptors this process owns.
    unsafe {
        let n = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min);
        if n < 0 {
            return Err(last_os("move a descriptor"));
        }
        libc::close(fd);
        Ok(n)
    }
}

/// Turns this process into the one `image` describes. Meant for a fresh single-threaded
/// process whose pid (and, in its pid namespace, only other process) is right: the image's pid.
/// Standard input, output and error are left as they are (the job's connection to its home).
/// The userfaultfd for the post-copy ranges is sent on `control` (tag `b'U'`); the step table
/// and any failure go to `report`. Returns only if something failed before the jump.
///
/// # Safety
/// Replaces the whole address space: nothing of this process's may run afterwards, and no
/// other thread may exist.
pub unsafe fn become_process(image: &ProcessImage, control: RawFd, report: RawFd) -> MigrateError {
    // SAFETY: the caller promises what `prepare_and_jump` needs: a single-threaded process whose
    // address space may be replaced.
    match unsafe { prepare_and_jump(image, control, report) } {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// # Safety
/// As [`become_process`].
unsafe fn prepare_and_jump(
    image: &ProcessImage,
    control: RawFd,
    report: RawFd,
) -> Result<std::convert::Infallible, MigrateError> {
    // Nothing may interrupt from here on: the threads' own masks come back with rt_sigreturn.
    // SAFETY: sigprocmask with a full set.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    // Our libc registered an rseq area in memory about to go: the kernel must stop writing it.
    super::shim::unregister_rseq();
    let own = own_layout()?;
    // The kernel mappings must be the same sizes (the same kernel).
    let kernel: Vec<&Mapping> = image.mappings.iter().filter(|m| matches!(m.backing, Backing::Kernel(_))).collect();
    let mut parked: Vec<(Own, u64)> = Vec::new();
    for m in &kernel {
        let Backing::Kernel(name) = &m.backing else { continue };
        let o = own
            .iter()
            .find(|o| &o.name == name)
            .ok_or_else(|| restore_err(format!("this kernel has no {name} mapping (the source's kernel differs)")))?;
        if o.end - o.start != m.end - m.start {
            return Err(restore_err(format!(
                "{name} is {} bytes here, {} at the source (a different kernel)",
                o.end - o.start,
                m.end - m.start
            )));
        }
        parked.push((o.clone(), 0));
    }
    for o in &own {
        if matches!(o.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]")
            && !parked.iter().any(|(p, _)| p.name == o.name)
        {
            return Err(restore_err(format!("the source had no {} mapping (a different kernel)", o.name)));
        }
    }

    // Descriptors of ours go above every descriptor the process has.
    let top = image.files.iter().map(OpenFile::fd);
    let floor = top.max().unwrap_or(2).max(2) + 1;
    let control = lift(control, floor)?;
    let report = lift(report, floor)?;

    // The files mapped, each opened once and checked to be the same file.
    let mut mapped: Vec<(String, RawFd)> = Vec::new();
    for m in &image.mappings {
        let (Backing::PrivateFile { path, id, .. } | Backing::SharedFile { path, id, .. }) = &m.backing else {
            continue;
        };
        if mapped.iter().any(|(p, _)| p == path) {
            continue;
        }
        let here = super::image::FileId::of(path).map_err(|e| restore_err(format!("{path}: {e}")))?;
        if here != *id {
            return Err(restore_err(format!("{path} is not the same file here (size or modification time differ)")));
        }
        let c = CString::new(path.as_str()).map_err(|_| restore_err("a path with a NUL"))?;
        // SAFETY: open of a NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(last_os(path));
        }
        mapped.push((path.clone(), lift(fd, floor)?));
    }
    let exe_fd = {
        let c = CString::new(image.exe.as_str()).map_err(|_| restore_err("a path with a NUL"))?;
        // SAFETY: open of a NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            -1
        } else {
            lift(fd, floor)?
        }
    };

    // The pages that travel with the image, in a memory file the program reads them from.
    // SAFETY: memfd_create with a NUL-terminated name.
    let memfd = unsafe { libc::memfd_create(c"mosaic-restore".as_ptr(), libc::MFD_CLOEXEC) };
    if memfd < 0 {
        return Err(last_os("memfd_create"));
    }
    let memfd = lift(memfd, floor)?;
    {
        // SAFETY: a descriptor of ours, wrapped for writing and given back below.
        let mut f = unsafe { std::fs::File::from_raw_fd(memfd) };
        for m in &image.mappings {
            f.write_all(&m.eager).map_err(|e| restore_err(format!("memfd: {e}")))?;
        }
        let _ = f.into_raw_fd();
    }

    // The userfaultfd, handed to the agent now; the program registers the ranges with it.
    let uffd = ForeignUffd::open().map_err(|e| restore_err(format!("userfaultfd: {e}")))?;
    super::fdpass::send_fd(control, b'U', uffd.raw_fd())
        .map_err(|e| restore_err(format!("send the userfaultfd: {e}")))?;
    let uffd: OwnedFd = uffd.into();
    let uffd = lift(uffd.into_raw_fd(), floor)?;

    // Signal dispositions (the threads' masks come back with their contexts).
    let actions = &image.threads[0].0.actions;
    for (i, a) in actions.iter().enumerate() {
        let sig = i as i32 + 1;
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads a kernel sigaction of the right layout.
        unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, a as *const _, 0usize, 8usize) };
    }
    for &(res, soft, hard) in &image.rlimits {
        let l = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        // SAFETY: prlimit on this process with a limit built here.
        if unsafe { libc::prlimit(0, res as _, &l, std::ptr::null_mut()) } != 0 {
            log::warn!("restoring resource limit {res}: {}", std::io::Error::last_os_error());
        }
    }
    let cwd = CString::new(image.cwd.as_str()).map_err(|_| restore_err("a path with a NUL"))?;
    // SAFETY: chdir/umask/prctl with valid arguments.
    unsafe {
        if libc::chdir(cwd.as_ptr()) != 0 {
            return Err(last_os(format!("working directory {}", image.cwd)));
        }
        libc::umask(image.umask as libc::mode_t);
        let comm = CString::new(image.comm.as_str()).unwrap_or_default();
        libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
    }

    // The process's descriptors at their numbers. Standard ones are the job's already.
    for f in &image.files {
        let OpenFile::Path { fd, path, flags, pos, id } = f else { continue };
        if let Some(id) = id {
            let here = super::image::FileId::of(path).map_err(|e| restore_err(format!("{path}: {e}")))?;
            if here != *id {
                return Err(restore_err(format!("descriptor {fd}: {path} is not the same file here")));
            }
        }
        let c = CString::new(path.as_str()).map_err(|_| restore_err("a path with a NUL"))?;
        let open_flags = (*flags as i32) & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC);
        // SAFETY: open/lseek/dup3/close on descriptors of ours.
        unsafe {
            let n = libc::open(c.as_ptr(), open_flags);
            if n < 0 {
                return Err(last_os(format!("descriptor {fd}: {path}")));
            }
            libc::lseek(n, *pos as i64, libc::SEEK_SET);
            let cloexec = if (*flags as i32) & libc::O_CLOEXEC != 0 { libc::O_CLOEXEC } else { 0 };
            if n != *fd {
                if libc::dup3(n, *fd, cloexec) < 0 {
                    return Err(last_os(format!("descriptor {fd}")));
                }
                libc::close(n);
            } else if cloexec != 0 {
                libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    // Its own pipes, made again with what was in them.
    let mut made: Vec<(u64, [RawFd; 2])> = Vec::new();
    for f in &image.files {
        let OpenFile::Pipe { fd, pipe, flags, buffered } = f else { continue };
        let ends = match made.iter().find(|(p, _)| p == pipe) {
            Some((_, e)) => *e,
            None => {
                let mut e = [0; 2];
                // SAFETY: pipe2 writes two descriptors, moved above the process's below.
                if unsafe { libc::pipe2(e.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                    return Err(last_os("a pipe"));
                }
                let e = [lift(e[0], floor)?, lift(e[1], floor)?];
                made.push((*pipe, e));
                e
            }
        };
        // SAFETY: writing to and duplicating descriptors of ours.
        unsafe {
            if buffered.len() > 65536 {
                // A pipe holds 64 KiB unless made larger, as the source's was.
                libc::fcntl(ends[1], libc::F_SETPIPE_SZ, buffered.len() as libc::c_int);
            }
            if !buffered.is_empty()
                && libc::write(ends[1], buffered.as_ptr().cast(), buffered.len()) != buffered.len() as isize
            {
                return Err(last_os(format!("refilling the pipe of descriptor {fd}")));
            }
            let end = if *flags & 3 == libc::O_WRONLY as u32 { ends[1] } else { ends[0] };
            let cloexec = if (*flags as i32) & libc::O_CLOEXEC != 0 { libc::O_CLOEXEC } else { 0 };
            if libc::dup3(end, *fd, cloexec) < 0 {
                return Err(last_os(format!("descriptor {fd}")));
            }
            if (*flags as i32) & libc::O_NONBLOCK != 0 {
                libc::fcntl(*fd, libc::F_SETFL, libc::fcntl(*fd, libc::F_GETFL) | libc::O_NONBLOCK);
            }
        }
    }
    for (_, [r, w]) in made {
        // SAFETY: our spare ends, duplicated where the process has them.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }
    // Close what the process did not have (of standard input, output, error) and everything else
    // of ours but what the program uses.
    let keep: Vec<RawFd> = image
        .files
        .iter()
        .map(OpenFile::fd)
        .chain([report, memfd, uffd, exe_fd])
        .chain(mapped.iter().map(|(_, fd)| *fd))
        .collect();
    if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<RawFd> = rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
        for fd in fds {
            if !keep.contains(&fd) {
                // SAFETY: closing a descriptor of ours nothing else uses (the listing's own is
                // gone by now or fails harmlessly).
                unsafe { libc::close(fd) };
            }
        }
    }
    let _ = control;

    // Room: the interpreter, the parked kernel mappings, the steps and their data, stacks.
    let code_len = (&raw const RESTORER_END as u64) - (&raw const RESTORER_START as u64);
    let parking_len: u64 = kernel.iter().map(|m| m.end - m.start).sum();
    let steps_max = own.len() as u64
        + 64
        + image.mappings.iter().map(|m| 4 + (m.private.len() + m.early.len()) as u64).sum::<u64>()
        + 12 * image.threads.len() as u64;
    let data_len = steps_max * 64
        + 256 * image.mappings.len() as u64
        + image.threads.len() as u64 * (THREAD_STACK + 256)
        + image.auxv.len() as u64
        + 4 * image.creds.groups.len() as u64
        + 8 * PAGE;
    let len = (PAGE + parking_len + data_len).next_multiple_of(PAGE);
    let base =
        find_hole(&own, image, len).ok_or_else(|| restore_err("no room left for the restorer in the address space"))?;
    // SAFETY: a fresh anonymous mapping where nothing is mapped (MAP_FIXED_NOREPLACE).
    let p = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as u64 != base {
        return Err(last_os("map the restorer's hole"));
    }
    // SAFETY: the interpreter's bytes (a static range of this binary's text) into the hole's
    // first page, then made executable.
    unsafe {
        std::ptr::copy_nonoverlapping(&raw const RESTORER_START, base as *mut u8, code_len as usize);
        if libc::mprotect(base as *mut libc::c_void, PAGE as usize, libc::PROT_READ | libc::PROT_EXEC) != 0 {
            return Err(last_os("mprotect the restorer"));
        }
    }
    let mut hole = Hole { base, len, parking: base + PAGE, next: base + PAGE + parking_len };

    let mut prog = Program::default();
    // 1. Park the kernel mappings in the hole, 2. unmap the agent, 3. put them in place.
    let mut at = hole.parking;
    for (o, slot) in &mut parked {
        *slot = at;
        let l = o.end - o.start;
        prog.must(
            libc::SYS_mremap,
            &[o.start, l, l, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64, at],
            format!("park {}", o.name),
        );
        at += l;
    }
    // Everything of the agent's below and above the hole (what it mapped after its layout was
    // read included); `[vsyscall]` lies above the user address space.
    prog.must(libc::SYS_munmap, &[0, hole.base], "unmap the agent below the hole");
    let top = hole.base + hole.len;
    // (The user address space ends a page below 2^47: TASK_SIZE_MAX.)
    prog.must(libc::SYS_munmap, &[top, USER_END - PAGE - top], "unmap the agent above the hole");
    for (o, slot) in &parked {
        let m =
            kernel.iter().find(|m| matches!(&m.backing, Backing::Kernel(n) if *n == o.name)).expect("matched above");
        let l = o.end - o.start;
        prog.must(
            libc::SYS_mremap,
            &[*slot, l, l, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64, m.start],
            format!("move {} to {:#x}", o.name, m.start),
        );
    }

    // 4. The process's mappings.
    let mut eager_at = 0u64;
    for m in &image.mappings {
        let l = m.end - m.start;
        let at = format!("{:#x}-{:#x}", m.start, m.end);
        let eager = !m.eager.is_empty();
        let prot = u64::from(m.prot) | if eager { (libc::PROT_WRITE | libc::PROT_READ) as u64 } else { 0 };
        let fixed = (libc::MAP_FIXED | libc::MAP_PRIVATE) as u64;
        match &m.backing {
            Backing::Kernel(_) => continue,
            Backing::Anonymous => {
                let flags =
                    fixed | libc::MAP_ANONYMOUS as u64 | if m.grows_down { libc::MAP_GROWSDOWN as u64 } else { 0 };
                prog.must(libc::SYS_mmap, &[m.start, l, prot, flags, u64::MAX, 0], format!("map {at} (anonymous)"));
            }
            Backing::PrivateFile { path, offset, .. } | Backing::SharedFile { path, offset, .. } => {
                let fd = mapped.iter().find(|(p, _)| p == path).map(|(_, fd)| *fd).expect("opened above");
                let flags = if matches!(m.backing, Backing::SharedFile { .. }) {
                    (libc::MAP_FIXED | libc::MAP_SHARED) as u64
                } else {
                    fixed
                };
                prog.must(
                    libc::SYS_mmap,
                    &[m.start, l, prot, flags, fd as u64, *offset],
                    format!("map {at} from {path}"),
                );
            }
        }
        if eager {
            for r in m.eager_ranges() {
                let n = r.end - r.start;
                prog.must(
                    libc::SYS_pread64,
                    &[memfd as u64, r.start, n, eager_at],
                    format!("fill {:#x}-{:#x}", r.start, r.end),
                );
                eager_at += n;
            }
            prog.must(libc::SYS_mprotect, &[m.start, l, u64::from(m.prot)], format!("protect {at}"));
        }
        if m.follows_post_copy() && l > m.early_bytes() {
            let (req, arg) = ForeignUffd::register_request(m.start, l);
            let a = hole.put_words(&arg)?;
            prog.must(libc::SYS_ioctl, &[uffd as u64, req, a], format!("register {at} for post-copy"));
        }
    }

    // 5. The mm fields, the executable's link, then our descriptors go.
    let auxv = hole.put(&image.auxv)?;
    let mm = &image.mm;
    let mut map_words = vec![
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv,
    ];
    map_words.push(u64::from(image.auxv.len() as u32) | (u64::from(u32::MAX) << 32));
    let map = hole.put_words(&map_words)?;
    prog.must(
        libc::SYS_prctl,
        &[libc::PR_SET_MM as u64, libc::PR_SET_MM_MAP as u64, map, 104, 0],
        "set the mm fields (PR_SET_MM_MAP)",
    );
    if exe_fd >= 0 {
        prog.try_(
            libc::SYS_prctl,
            &[libc::PR_SET_MM as u64, libc::PR_SET_MM_EXE_FILE as u64, exe_fd as u64, 0, 0],
            "link the executable",
        );
    }
    for fd in mapped.iter().map(|(_, fd)| *fd).chain([memfd, uffd, exe_fd]) {
        if fd >= 0 {
            prog.try_(libc::SYS_close, &[fd as u64], "close a restorer descriptor");
        }
    }

    // 6. The process's ids, given up by each thread itself as its last step (at the level of
    // system calls ids are per thread, and creating threads with chosen ids needs privileges).
    let c = &image.creds;
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    let ids = Ids { groups: hole.put(&groups)?, n_groups: c.groups.len() as u64, gid: c.gid, uid: c.uid };

    // 7. The other threads, each with its id, thread pointer and clear-tid address.
    for (t, comm) in &image.threads[1..] {
        let stack = hole.alloc(THREAD_STACK)?;
        let tid = hole.put(&(t.tid as i32).to_le_bytes())?;
        let mut flags = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS;
        if t.clear_tid != 0 {
            flags |= libc::CLONE_CHILD_CLEARTID;
        }
        // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
        // stack_size, tls, set_tid, set_tid_size, cgroup.
        let args = hole.put_words(&[flags as u64, 0, t.clear_tid, 0, 0, stack, THREAD_STACK, t.fs_base, tid, 1, 0])?;
        let name = hole.put(&{
            let mut n = [0u8; 16];
            let b = comm.as_bytes();
            n[..b.len().min(15)].copy_from_slice(&b[..b.len().min(15)]);
            n
        })?;
        let first = prog.steps.len();
        prog.call(OP_CLONE, libc::SYS_clone3, &[args, 88], format!("create thread {}", t.tid));
        prog.try_(libc::SYS_prctl, &[libc::PR_SET_NAME as u64, name], "name the thread");
        thread_tail(&mut prog, t, &ids);
        let sub = (prog.steps.len() - first - 1) as u64;
        prog.steps[first].args[5] = sub;
    }
    // 8. The main thread last.
    let main = &image.threads[0].0;
    prog.must(libc::SYS_set_tid_address, &[main.clear_tid], "set the main thread's clear-tid address");
    prog.must(libc::SYS_arch_prctl, &[0x1002 /* ARCH_SET_FS */, main.fs_base], "set the main thread's thread pointer");
    prog.try_(libc::SYS_close, &[report as u64], "close the report descriptor");
    thread_tail(&mut prog, main, &ids);

    let steps_at = hole.alloc(prog.steps.len() as u64 * 64)?;
    // SAFETY: `steps_at` has room for the steps (allocated just above), in the hole.
    unsafe { std::ptr::copy_nonoverlapping(prog.steps.as_ptr(), steps_at as *mut Step, prog.steps.len()) };
    let stack_top = hole.alloc(4 * PAGE)? + 4 * PAGE - 64;

    // The table of steps, for a failure's report, then the word that the jump comes.
    let mut table = String::new();
    for (i, w) in prog.what.iter().enumerate() {
        table.push_str(&format!("{i} {w}\n"));
    }
    table.push_str("GO\n");
    // SAFETY: a descriptor of ours, wrapped for writing and given back.
    let mut f = unsafe { std::fs::File::from_raw_fd(report) };
    let wrote = f.write_all(table.as_bytes());
    let _ = f.into_raw_fd();
    wrote.map_err(|e| restore_err(format!("report: {e}")))?;

    let entry = base;
    // SAFETY: the jump into the interpreter, on the hole's stack, never to return; it reads only
    // the steps and the data they point to, all in the hole.
    unsafe {
        core::arch::asm!(
            "mov rsp, {stack}",
            "jmp {entry}",
            stack = in(reg) stack_top,
            entry = in(reg) entry,
            in("rdi") steps_at,
            in("rsi") report as u64,
            options(noreturn)
        )
    }
}

/// The ids each thread takes before it runs the program's code again.
struct Ids {
    groups: u64,
    n_groups: u64,
    gid: [u32; 3],
    uid: [u32; 3],
}

/// A thread's last steps: its robust list, its `rseq` area, the process's ids, back into its
/// context.
fn thread_tail(prog: &mut Program, t: &super::record::ThreadRecord, ids: &Ids) {
    if t.robust_head != 0 {
        prog.try_(
            libc::SYS_set_robust_list,
            &[t.robust_head, t.robust_len],
            format!("thread {}: robust futex list", t.tid),
        );
    }
    if t.rseq_addr != 0 {
        prog.try_(libc::SYS_rseq, &[t.rseq_addr, t.rseq_len, 0, t.rseq_sig], format!("thread {}: rseq", t.tid));
    }
    prog.must(libc::SYS_setgroups, &[ids.n_groups, ids.groups], format!("thread {}: supplementary groups", t.tid));
    prog.must(
        libc::SYS_setresgid,
        &[ids.gid[0].into(), ids.gid[1].into(), ids.gid[2].into()],
        format!("thread {}: group ids", t.tid),
    );
    prog.must(
        libc::SYS_setresuid,
        &[ids.uid[0].into(), ids.uid[1].into(), ids.uid[2].into()],
        format!("thread {}: user ids", t.tid),
    );
    prog.call(OP_SIGRETURN, 0, &[t.ucontext], format!("thread {}: resume", t.tid));
}

/// Reads what a restoring process wrote on its report descriptor (to its end): `Ok` if it
/// jumped and nothing failed, else why, with the failed step named from its table.
pub fn describe_failure(report: &[u8]) -> Result<(), String> {
    let text_end = report.windows(3).position(|w| w == b"GO\n").map(|p| p + 3);
    let Some(end) = text_end else {
        let t = String::from_utf8_lossy(report);
        return Err(if t.trim().is_empty() {
            "the restorer ended before it was ready".into()
        } else {
            t.trim().to_string()
        });
    };
    let rest = &report[end..];
    if rest.is_empty() {
        return Ok(());
    }
    if rest.len() < 16 {
        return Err("the restorer failed (a report cut short)".into());
    }
    let off = u64::from_le_bytes(rest[0..8].try_into().expect("8 bytes"));
    let err = -(i64::from_le_bytes(rest[8..16].try_into().expect("8 bytes")));
    let step = off / 64;
    let table = String::from_utf8_lossy(&report[..end]);
    let what = table.lines().find_map(|l| l.strip_prefix(&format!("{step} "))).unwrap_or("?");
    Err(format!("restore step {step} ({what}) failed: {}", std::io::Error::from_raw_os_error(err as i32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_report_names_the_step() {
        let mut r = b"0 park [vvar]\n1 map 0x1000-0x2000 (anonymous)\nGO\n".to_vec();
        assert_eq!(describe_failure(&r), Ok(()));
        r.extend_from_slice(&64u64.to_le_bytes());
        r.extend_from_slice(&(-i64::from(libc::ENOMEM)).to_le_bytes());
        let e = describe_failure(&r).unwrap_err();
        assert!(e.contains("step 1 (map 0x1000-0x2000 (anonymous))"), "{e}");
        assert!(describe_failure(b"cannot open /lib/x.so").unwrap_err().contains("/lib/x.so"));
    }

    #[test]
    fn the_interpreter_is_small_and_in_one_page() {
        // SAFETY: addresses of two linker symbols.
        let len = (&raw const RESTORER_END as u64) - (&raw const RESTORER_START as u64);
        assert!(len > 32 && len < PAGE, "{len}");
    }
}
