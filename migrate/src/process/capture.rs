//! The source's side of process migration: check that a process can move, stop it through
//! its checkpoint handlers, and read what it is from `/proc` (see [`super`]).

// System-call arguments and results (pids, descriptors, addresses, kernel ABI words) pass
// between C and Rust integer types here; every value is one the kernel gave or takes.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::image::{Backing, Credentials, FileId, Mapping, MmFields, OpenFile, ProcessImage};
use super::record::{socket_addr, ThreadRecord, VERDICT_RESUME, VERDICT_STAY};
use crate::MigrateError;

fn refuse(why: impl Into<String>) -> MigrateError {
    MigrateError::Refused(why.into())
}

fn os(what: impl std::fmt::Display, e: std::io::Error) -> MigrateError {
    MigrateError::Os(format!("{what}: {e}"))
}

fn read(path: &str) -> Result<String, MigrateError> {
    std::fs::read_to_string(path).map_err(|e| os(path, e))
}

/// Character devices that are the same everywhere, opened again by path.
const PORTABLE_DEVICES: [&str; 5] = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// Why process `pid` cannot move, if it cannot: what openMosix called a process's "locks".
/// `signal` is the checkpoint handler's (see [`super::shim`]), which the process must catch.
/// Nothing is stopped; the answer reflects the moment of the call.
pub fn check_movable(pid: u32, signal: i32) -> Result<(), MigrateError> {
    let status = read(&format!("/proc/{pid}/status")).map_err(|_| refuse(format!("no process {pid}")))?;
    // The signal must be caught: its default action would kill the process.
    let caught = status_field(&status, "SigCgt:").and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
    if !(1..=64).contains(&signal) || caught & (1 << (signal - 1)) == 0 {
        return Err(refuse(format!(
            "it does not catch signal {signal}, the checkpoint handler's (start it with `mosrun --migratable`)"
        )));
    }
    if status_field(&status, "TracerPid:").is_some_and(|t| t != "0") {
        return Err(refuse("it is being traced (ptrace)"));
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| os("its threads", e))?;
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        if !children.trim().is_empty() {
            return Err(refuse(format!("it has children (pids {})", children.trim())));
        }
    }
    let fds = descriptors(pid)?;
    for (fd, target) in &fds {
        if *fd <= 2 {
            continue;
        }
        what_a_descriptor_is(pid, *fd, target, &fds)?;
    }
    for line in read(&format!("/proc/{pid}/maps"))?.lines() {
        let m = MapsLine::parse(line).ok_or_else(|| MigrateError::Os(format!("maps line {line:?}")))?;
        m.backing()?;
    }
    Ok(())
}

/// The descriptors of `pid`, with what each points to.
fn descriptors(pid: u32) -> Result<Vec<(i32, String)>, MigrateError> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| os(&dir, e))?.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // A descriptor closed meanwhile is simply not there.
        if let Ok(t) = std::fs::read_link(e.path()) {
            out.push((fd, t.to_string_lossy().into_owned()));
        }
    }
    out.sort();
    Ok(out)
}

/// The `flags:` of a descriptor's fdinfo.
fn fd_flags(pid: u32, fd: i32) -> Result<u32, MigrateError> {
    let info = read(&format!("/proc/{pid}/fdinfo/{fd}"))?;
    let f = info.lines().find_map(|l| l.strip_prefix("flags:")).map(str::trim).unwrap_or("0");
    u32::from_str_radix(f, 8).map_err(|_| MigrateError::Os(format!("fdinfo {fd} flags")))
}

/// How descriptor `fd` (pointing at `target`; `all` the process's descriptors) moves, or why
/// it cannot.
fn what_a_descriptor_is(pid: u32, fd: i32, target: &str, all: &[(i32, String)]) -> Result<OpenFile, MigrateError> {
    let cannot = |what: &str| refuse(format!("descriptor {fd} is {what} ({target}), which cannot move yet"));
    if target.starts_with("socket:") {
        return Err(cannot("a socket"));
    }
    if let Some(inode) =
        target.strip_prefix("pipe:[").and_then(|t| t.strip_suffix(']')).and_then(|t| t.parse::<u64>().ok())
    {
        // Movable if the process holds both ends (reads are O_RDONLY, writes O_WRONLY).
        let ends: Vec<u32> = all
            .iter()
            .filter(|(_, t)| t == target)
            .map(|(f, _)| fd_flags(pid, *f).map(|x| x & 3))
            .collect::<Result<_, _>>()?;
        if !(ends.contains(&(libc::O_RDONLY as u32)) && ends.contains(&(libc::O_WRONLY as u32))) {
            return Err(cannot("a pipe to another process"));
        }
        return Ok(OpenFile::Pipe { fd, pipe: inode, flags: fd_flags(pid, fd)?, buffered: Vec::new() });
    }
    if target.starts_with("anon_inode:") {
        return Err(cannot(if target.contains("userfaultfd") {
            "a userfaultfd (network RAM?)"
        } else {
            "a kernel object"
        }));
    }
    if !target.starts_with('/') || target.ends_with(" (deleted)") {
        return Err(cannot("not a file that can be opened again"));
    }
    let info = read(&format!("/proc/{pid}/fdinfo/{fd}"))?;
    let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("0").to_string();
    let flags = u32::from_str_radix(&field("flags:"), 8).map_err(|_| MigrateError::Os(format!("fdinfo {fd} flags")))?;
    let pos = field("pos:").parse().unwrap_or(0);
    let meta = std::fs::metadata(target).map_err(|e| os(target, e))?;
    let id = if meta.is_file() {
        Some(FileId::of(target).map_err(|e| os(target, e))?)
    } else if meta.is_dir() || PORTABLE_DEVICES.contains(&target) {
        None
    } else {
        return Err(cannot("a device"));
    };
    Ok(OpenFile::Path { fd, path: target.to_string(), flags, pos, id })
}

/// One line of `/proc/PID/maps`.
struct MapsLine<'a> {
    start: u64,
    end: u64,
    perms: &'a str,
    offset: u64,
    path: &'a str,
}

impl<'a> MapsLine<'a> {
    fn parse(line: &'a str) -> Option<MapsLine<'a>> {
        let mut it = line.splitn(6, ' ');
        let (range, perms, offset) = (it.next()?, it.next()?, it.next()?);
        let (_dev, _inode) = (it.next()?, it.next()?);
        let path = it.next().unwrap_or("").trim_start();
        let (s, e) = range.split_once('-')?;
        Some(MapsLine {
            start: u64::from_str_radix(s, 16).ok()?,
            end: u64::from_str_radix(e, 16).ok()?,
            perms,
            offset: u64::from_str_radix(offset, 16).ok()?,
            path,
        })
    }

    fn prot(&self) -> u32 {
        let b = self.perms.as_bytes();
        let mut p = 0;
        if b.first() == Some(&b'r') {
            p |= libc::PROT_READ;
        }
        if b.get(1) == Some(&b'w') {
            p |= libc::PROT_WRITE;
        }
        if b.get(2) == Some(&b'x') {
            p |= libc::PROT_EXEC;
        }
        p as u32
    }

    fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }

    /// What backs it; `None` for `[vsyscall]`, which is the same fixed page everywhere.
    fn backing(&self) -> Result<Option<Backing>, MigrateError> {
        let at = format!(
            "mapping {:#x}-{:#x} ({})",
            self.start,
            self.end,
            if self.path.is_empty() { "anonymous" } else { self.path }
        );
        match self.path {
            "[vsyscall]" => return Ok(None),
            "[vdso]" | "[vvar]" | "[vvar_vclock]" => return Ok(Some(Backing::Kernel(self.path.to_string()))),
            _ => {}
        }
        let anonymous =
            self.path.is_empty() || matches!(self.path, "[heap]" | "[stack]") || self.path.starts_with("[anon:");
        if self.shared() {
            if anonymous || self.path.starts_with("[anon_shmem:") || self.path.starts_with("/dev/zero") {
                return Err(refuse(format!("{at} is memory shared with other processes")));
            }
            if self.prot() & libc::PROT_WRITE as u32 != 0 {
                return Err(refuse(format!("{at} is a file mapped shared and writable")));
            }
        }
        if anonymous {
            return Ok(Some(Backing::Anonymous));
        }
        if self.path.starts_with('[') || self.path.ends_with(" (deleted)") || !self.path.starts_with('/') {
            return Err(refuse(format!("{at} cannot be mapped again elsewhere")));
        }
        if self.path.starts_with("/SYSV") || self.path.starts_with("/dev/") {
            return Err(refuse(format!("{at} is shared memory or a device")));
        }
        let id = FileId::of(self.path).map_err(|e| os(&at, e))?;
        let (path, offset) = (self.path.to_string(), self.offset);
        Ok(Some(if self.shared() {
            Backing::SharedFile { path, offset, id }
        } else {
            Backing::PrivateFile { path, offset, id }
        }))
    }
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
}

/// A process stopped by its checkpoint handlers: every thread waits in its handler for a
/// verdict. Dropping it resumes the process.
#[derive(Debug)]
pub struct Stopped {
    pid: u32,
    /// The process, as a descriptor: its pid cannot be taken by another while this is open.
    pidfd: OwnedFd,
    threads: Vec<(ThreadRecord, UnixStream)>,
    /// Bytes taken out of the process's own pipes by the capture, with a write end of each
    /// pipe: given back if the process resumes here.
    taken: std::sync::Mutex<Vec<(i32, Vec<u8>)>>,
    settled: bool,
}

/// Stops process `pid` (started with the checkpoint handler for `signal` installed: see
/// [`super::shim`]): queues the signal to each of its threads and waits, at most `timeout`,
/// for every thread to report. A thread that never reports (no handler, the signal blocked)
/// resumes the others and names the thread.
pub fn stop(pid: u32, signal: i32, timeout: Duration) -> Result<Stopped, MigrateError> {
    let token = {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| MigrateError::Os(format!("random token: {e}")))?;
        u64::from_le_bytes(b)
    };
    let listener = listen_abstract(token).map_err(|e| os("checkpoint socket", e))?;
    let pidfd = pidfd_open(pid).map_err(|_| refuse(format!("no process {pid}")))?;
    let mut stopped =
        Stopped { pid, pidfd, threads: Vec::new(), taken: std::sync::Mutex::new(Vec::new()), settled: false };
    let mut signalled: Vec<u64> = Vec::new();
    let deadline = Instant::now() + timeout;
    // Threads may start or end while this runs: signal the new ones until every thread there
    // is has reported (bounded by the deadline).
    loop {
        // Each thread as this host knows it, and as the process does (they differ when the
        // process runs in a pid namespace of its own, as a process that moved here does).
        let tids = threads_of(pid)?;
        if tids.is_empty() {
            return Err(refuse(format!("process {pid} is gone")));
        }
        let missing: Vec<(u64, u64)> =
            tids.iter().copied().filter(|(_, inner)| !stopped.threads.iter().any(|(r, _)| r.tid == *inner)).collect();
        if missing.is_empty() {
            break;
        }
        for &(t, _) in &missing {
            if !signalled.contains(&t) {
                queue_signal(pid, t, signal, token).map_err(|e| os(format!("signal thread {t}"), e))?;
                signalled.push(t);
            }
        }
        match accept_until(&listener, deadline) {
            Some(mut s) => {
                let mut b = vec![0u8; size_of::<ThreadRecord>()];
                s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                if s.read_exact(&mut b).is_ok() {
                    if let Some(r) = ThreadRecord::from_bytes(&b) {
                        stopped.threads.push((r, s));
                    }
                }
            }
            None => {
                let missing: Vec<u64> = missing.iter().map(|&(t, _)| t).collect();
                return Err(refuse(format!(
                    "thread(s) {missing:?} of process {pid} did not stop within {timeout:?}: was it started by \
                     mosrun (with the checkpoint handler for signal {signal}), and does it block or use that signal?"
                )));
            }
        }
    }
    // The main thread first.
    let pos =
        stopped.threads.iter().position(|(r, _)| r.tid == r.pid).ok_or_else(|| refuse("the main thread is gone"))?;
    stopped.threads.swap(0, pos);
    Ok(stopped)
}

/// The threads of `pid`: each one's id here and in the process's own pid namespace (the last
/// of its `NSpid` ids).
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor, owned at once.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as i32, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process behind `pidfd` still lives (signal 0).
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 only checks.
    unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 0, std::ptr::null::<u8>(), 0) == 0 }
}

fn threads_of(pid: u32) -> Result<Vec<(u64, u64)>, MigrateError> {
    let dir = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&dir).map_err(|_| refuse(format!("no process {pid}")))?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else { continue };
        // A thread gone meanwhile is simply not there.
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let inner =
            status_field(&status, "NSpid:").and_then(|l| l.split_whitespace().last()?.parse().ok()).unwrap_or(tid);
        out.push((tid, inner));
    }
    Ok(out)
}

fn queue_signal(pid: u32, tid: u64, signal: i32, token: u64) -> std::io::Result<()> {
    // siginfo for SI_QUEUE on x86-64: signo @0, code @8, pid @16, uid @20, value @24.
    let mut info = [0u64; 16];
    info[0] = signal as u32 as u64;
    info[1] = libc::SI_QUEUE as u32 as u64;
    // SAFETY: getpid/getuid cannot fail.
    info[2] = u64::from(unsafe { libc::getpid() } as u32) | (u64::from(unsafe { libc::getuid() }) << 32);
    info[3] = token;
    // SAFETY: rt_tgsigqueueinfo reads a 128-byte siginfo from `info`.
    let r = unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid as i32, tid as i32, signal, info.as_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn listen_abstract(token: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: socket/bind/listen with a sockaddr_un filled in here; the descriptor is owned
    // at once.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let (addr, len) = socket_addr(token);
        if libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) != 0 || libc::listen(fd.as_raw_fd(), 128) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn accept_until(listener: &OwnedFd, deadline: Instant) -> Option<UnixStream> {
    loop {
        // SAFETY: accept4 on a listening socket; the result is owned at once.
        let fd = unsafe {
            libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor.
            return Some(unsafe { UnixStream::from_raw_fd(fd) });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut p = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd.
        unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 100) as i32) };
    }
}

impl Stopped {
    /// The process's pid (here).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Reads what the process is: its threads' records, mappings (with the byte ranges of its
    /// own data in each, and the bytes of those that travel with the image), descriptors,
    /// working directory, limits and ids.
    pub fn capture(&self) -> Result<ProcessImage, MigrateError> {
        let pid = self.pid;
        let status = read(&format!("/proc/{pid}/status"))?;
        let ids = |name: &str| -> Vec<u32> {
            status_field(&status, name).unwrap_or("").split_whitespace().filter_map(|v| v.parse().ok()).collect()
        };
        let (uid, gid) = (ids("Uid:"), ids("Gid:"));
        if uid.len() < 3 || gid.len() < 3 {
            return Err(MigrateError::Os("ids in /proc/PID/status".into()));
        }
        let creds =
            Credentials { uid: [uid[0], uid[1], uid[2]], gid: [gid[0], gid[1], gid[2]], groups: ids("Groups:") };
        let umask = status_field(&status, "Umask:").and_then(|u| u32::from_str_radix(u, 8).ok()).unwrap_or(0o022);
        let link = |what: &str| {
            std::fs::read_link(format!("/proc/{pid}/{what}"))
                .map(|p| p.to_string_lossy().into_owned())
                .map_err(|e| os(format!("/proc/{pid}/{what}"), e))
        };
        let mut rlimits = Vec::new();
        for res in 0..16u32 {
            let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: prlimit reads into `old`.
            if unsafe { libc::prlimit(pid as i32, res as _, std::ptr::null(), &mut old) } == 0 {
                rlimits.push((res, old.rlim_cur, old.rlim_max));
            }
        }
        let ours: Vec<i32> = self.threads.iter().map(|(r, _)| r.socket_fd as i32).collect();
        let all: Vec<(i32, String)> = descriptors(pid)?.into_iter().filter(|(fd, _)| !ours.contains(fd)).collect();
        let mut files = Vec::new();
        for (fd, target) in &all {
            files.push(if *fd <= 2 { OpenFile::Stdio(*fd) } else { what_a_descriptor_is(pid, *fd, target, &all)? });
        }
        let mut mappings = Vec::new();
        let mut heap_end = 0;
        for line in read(&format!("/proc/{pid}/maps"))?.lines() {
            let l = MapsLine::parse(line).ok_or_else(|| MigrateError::Os(format!("maps line {line:?}")))?;
            let Some(backing) = l.backing()? else { continue };
            if l.path == "[heap]" {
                heap_end = l.end;
            }
            let lazy = matches!(backing, Backing::Anonymous) && l.prot() & libc::PROT_READ as u32 != 0;
            let private = if lazy || matches!(backing, Backing::Kernel(_) | Backing::SharedFile { .. }) {
                // Pages that follow post-copy are learned at the source as they are asked for.
                Vec::new()
            } else {
                mosaic_pager::private_pages_of(pid, l.start, l.end, matches!(backing, Backing::Anonymous))
                    .map_err(|e| MigrateError::Os(format!("{line}: {e}")))?
            };
            let mut m = Mapping {
                start: l.start,
                end: l.end,
                prot: l.prot(),
                grows_down: l.path == "[stack]",
                backing,
                private,
                early: vec![],
                eager: vec![],
            };
            if !m.travels_eagerly() {
                m.early = self.contexts_within(&m);
            }
            let mut buf = Vec::new();
            for r in m.eager_ranges() {
                let at = buf.len();
                buf.resize(at + (r.end - r.start) as usize, 0);
                read_memory(pid, r.start, &mut buf[at..])?;
            }
            m.eager = buf;
            mappings.push(m);
        }
        let stat = read(&format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces), numbered from 3.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
        let at = |n: usize| f.get(n - 3).copied().unwrap_or(0);
        let mut mm = MmFields {
            start_code: at(26),
            end_code: at(27),
            start_stack: at(28),
            start_data: at(45),
            end_data: at(46),
            start_brk: at(47),
            arg_start: at(48),
            arg_end: at(49),
            env_start: at(50),
            env_end: at(51),
            brk: 0,
        };
        mm.brk = heap_end.max(mm.start_brk);
        let here = threads_of(pid)?;
        let mut threads = Vec::new();
        for (r, _) in &self.threads {
            let tid = here.iter().find(|(_, inner)| *inner == r.tid).map_or(r.tid, |(t, _)| *t);
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            threads.push((*r, comm.trim_end().to_string()));
        }
        let auxv = std::fs::read(format!("/proc/{pid}/auxv")).map_err(|e| os("auxv", e))?;
        self.still_movable()?;
        // Last, as it changes the process (given back if it resumes here).
        self.take_pipe_contents(&mut files)?;
        Ok(ProcessImage {
            pid: self.threads[0].0.pid as u32,
            comm: read(&format!("/proc/{pid}/comm"))?.trim_end().to_string(),
            exe: link("exe")?,
            cwd: link("cwd")?,
            umask,
            creds,
            rlimits,
            mm,
            auxv,
            threads,
            mappings,
            files,
            stdin_unread: Vec::new(),
        })
    }

    /// What may have changed between the check and the stop: children, a tracer, a signal that
    /// came meanwhile and waits (it would be lost), POSIX timers (they would not follow).
    fn still_movable(&self) -> Result<(), MigrateError> {
        let pid = self.pid;
        let status = read(&format!("/proc/{pid}/status"))?;
        if status_field(&status, "TracerPid:").is_some_and(|t| t != "0") {
            return Err(refuse("it is being traced (ptrace)"));
        }
        let pending =
            |st: &str, f: &str| status_field(st, f).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
        if pending(&status, "ShdPnd:") != 0 {
            return Err(refuse("a signal waits to be delivered to it (it would be lost); try again"));
        }
        for (tid, _) in threads_of(pid)? {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
            if !children.trim().is_empty() {
                return Err(refuse(format!("it has children (pids {})", children.trim())));
            }
            let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
            if pending(&st, "SigPnd:") != 0 {
                return Err(refuse(format!(
                    "a signal waits to be delivered to thread {tid} (it would be lost); try again"
                )));
            }
        }
        if !std::fs::read_to_string(format!("/proc/{pid}/timers")).unwrap_or_default().trim().is_empty() {
            return Err(refuse("it has POSIX timers (timer_create), which cannot move yet"));
        }
        Ok(())
    }

    /// Takes what is buffered in the process's own pipes (read through a copy of a read end),
    /// onto the first read end of each in `files`. Given back if the process resumes here.
    fn take_pipe_contents(&self, files: &mut [OpenFile]) -> Result<(), MigrateError> {
        let mut done: Vec<u64> = Vec::new();
        let write_ends: Vec<(u64, i32)> = files
            .iter()
            .filter_map(|g| match g {
                OpenFile::Pipe { fd, pipe, flags, .. } if *flags & 3 == libc::O_WRONLY as u32 => Some((*pipe, *fd)),
                _ => None,
            })
            .collect();
        for f in files.iter_mut() {
            let OpenFile::Pipe { fd, pipe, flags, buffered } = f else { continue };
            if *flags & 3 != libc::O_RDONLY as u32 || done.contains(pipe) {
                continue;
            }
            done.push(*pipe);
            let copy = self.their_fd(*fd)?;
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD on our copy of the pipe's read end.
            unsafe { libc::ioctl(copy.as_raw_fd(), libc::FIONREAD, &mut n) };
            if n > 0 {
                let mut b = vec![0u8; n as usize];
                // The process is stopped: the bytes counted are there, and reading them cannot block.
                std::fs::File::from(copy).read_exact(&mut b).map_err(|e| os("reading a pipe of the process", e))?;
                if let Some(&(_, w)) = write_ends.iter().find(|(q, _)| q == pipe) {
                    crate::source::lock(&self.taken).push((w, b.clone()));
                }
                *buffered = b;
            }
        }
        Ok(())
    }

    /// Takes what waits unread in the process's standard input, if that is a pipe (the relay of
    /// a node agent, which alone can give it back: see [`ProcessImage::stdin_unread`]).
    pub fn take_unread_input(&self) -> Result<Vec<u8>, MigrateError> {
        let target = std::fs::read_link(format!("/proc/{}/fd/0", self.pid)).unwrap_or_default();
        if !target.to_string_lossy().starts_with("pipe:") {
            return Ok(Vec::new());
        }
        let copy = self.their_fd(0)?;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on our copy of the pipe's read end.
        unsafe { libc::ioctl(copy.as_raw_fd(), libc::FIONREAD, &mut n) };
        let mut b = vec![0u8; n.max(0) as usize];
        if n > 0 {
            // The process is stopped and its relay is held: the bytes counted stay there.
            std::fs::File::from(copy).read_exact(&mut b).map_err(|e| os("reading the process's standard input", e))?;
        }
        Ok(b)
    }

    /// A copy of the process's descriptor `fd` (pidfd_getfd).
    fn their_fd(&self, fd: i32) -> Result<OwnedFd, MigrateError> {
        // SAFETY: pidfd_getfd returns a new descriptor, owned at once.
        unsafe {
            let copy = libc::syscall(libc::SYS_pidfd_getfd, self.pidfd.as_raw_fd(), fd, 0);
            if copy < 0 {
                return Err(os(format!("a copy of descriptor {fd}"), std::io::Error::last_os_error()));
            }
            Ok(OwnedFd::from_raw_fd(copy as i32))
        }
    }

    /// Puts back what capturing took out of the process's own pipes, for a process that resumes.
    fn give_back(&self) {
        for (w, bytes) in crate::source::lock(&self.taken).drain(..) {
            match self.their_fd(w) {
                Ok(copy) => {
                    if let Err(e) = std::fs::File::from(copy).write_all(&bytes) {
                        log::error!(
                            "process {}: {} bytes of its pipe (descriptor {w}) could not be put back: {e}",
                            self.pid,
                            bytes.len()
                        );
                    }
                }
                Err(e) => {
                    log::error!("process {}: its pipe (descriptor {w}) lost {} bytes: {e}", self.pid, bytes.len())
                }
            }
        }
    }

    /// The pages of `m` holding the threads' saved contexts (each signal frame: the `ucontext`
    /// and the FPU state above it, within 16 KiB of it).
    fn contexts_within(&self, m: &Mapping) -> Vec<std::ops::Range<u64>> {
        const PAGE: u64 = 4096;
        let mut want: Vec<std::ops::Range<u64>> = Vec::new();
        for (r, _) in &self.threads {
            let from = (r.ucontext - 8) & !(PAGE - 1);
            let to = (r.ucontext + 16384).next_multiple_of(PAGE);
            let (a, b) = (m.start.max(from), m.end.min(to));
            if a < b {
                want.push(a..b);
            }
        }
        want.sort_by_key(|r| r.start);
        let mut merged: Vec<std::ops::Range<u64>> = Vec::new();
        for r in want {
            match merged.last_mut() {
                Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged
    }

    /// Lets the process run on here (the migration did not happen).
    pub fn resume(mut self) {
        self.settle(VERDICT_RESUME);
    }

    /// Keeps the process stopped for good: it runs elsewhere now, and this copy only holds its
    /// memory for [`read_memory`] until it is killed ([`Remains::kill`]).
    pub fn stay(mut self) -> Remains {
        self.settle(VERDICT_STAY);
        // The descriptor goes with the remains (a copy: this one closes with `self`).
        let pidfd = self.pidfd.try_clone().ok();
        Remains { pid: self.pid, pidfd }
    }

    /// Whether the stopped process still lives (its pages can still be read).
    pub fn alive(&self) -> bool {
        alive(&self.pidfd)
    }

    fn settle(&mut self, verdict: u8) {
        if verdict == VERDICT_RESUME {
            self.give_back();
        }
        for (_, s) in &mut self.threads {
            let _ = s.write_all(&[verdict]);
        }
        self.settled = true;
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(VERDICT_RESUME);
        }
    }
}

/// What is left of a process that moved: its memory, read until the destination has it all.
#[derive(Debug)]
pub struct Remains {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl Remains {
    /// Its pid here.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it still lives: its pages read since it stopped are its own (its pid cannot have
    /// been taken by another process while it lived).
    pub fn alive(&self) -> bool {
        self.pidfd.as_ref().is_some_and(alive)
    }

    /// Kills it (its memory goes with it).
    pub fn kill(self) {
        if let Some(fd) = &self.pidfd {
            // SAFETY: pidfd_send_signal to the process itself, never to a pid reused by another.
            unsafe {
                libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
            };
        }
    }
}

/// Reads `out.len()` bytes at `addr` of process `pid`.
pub fn read_memory(pid: u32, addr: u64, out: &mut [u8]) -> Result<(), MigrateError> {
    let mut done = 0;
    while done < out.len() {
        let local = libc::iovec { iov_base: out[done..].as_mut_ptr().cast(), iov_len: out.len() - done };
        let remote = libc::iovec { iov_base: (addr + done as u64) as *mut libc::c_void, iov_len: out.len() - done };
        // SAFETY: process_vm_readv writes at most `iov_len` bytes into `out`.
        let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            return Err(os(
                format!("read {} bytes at {:#x} of process {pid}", out.len() - done, addr + done as u64),
                std::io::Error::last_os_error(),
            ));
        }
        done += n as usize;
    }
    Ok(())
}
