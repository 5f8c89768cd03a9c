//! The processes that rebuild a migrated one at the destination, and the agent's handle on them.
//!
//! ```text
//! agent ──(spawns, control socket)──> keeper            (outside: reports to the agent)
//!                                       └─ init, pid 1 of a new pid namespace
//!                                            └─ the process, pid = the migrated pid
//! ```
//! The keeper reads the image from the control socket, makes a pid namespace, and its first
//! child (the namespace's init) creates the process with the migrated pid (`clone3` with
//! `set_tid`), which rebuilds itself ([`become_process`]) and sends its userfaultfd to the agent.
//! The keeper tells the agent whether the process runs ([`RestoreEvent::Running`]) or why not,
//! then, when it ends, its wait status. Standard input, output and error pass through to the
//! process unchanged.

// System-call arguments and results (pids, descriptors, addresses, kernel ABI words) pass
// between C and Rust integer types here; every value is one the kernel gave or takes.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use super::fdpass::{pipe, read_frame, recv_fd, write_frame};
use super::image::ProcessImage;
use super::restore::{become_process, describe_failure};
use crate::MigrateError;

/// The environment variable naming the keeper's control descriptor.
pub const CONTROL_FD_ENV: &str = "MOSAIC_RESTORE_FD";

const TAG_IMAGE: u8 = b'I';
const TAG_UFFD: u8 = b'U';
const TAG_RUNNING: u8 = b'R';
const TAG_FAILED: u8 = b'F';
const TAG_EXITED: u8 = b'X';
const TAG_ALL_HERE: u8 = b'A';

/// What the agent hears from a keeper.
#[derive(Debug)]
pub enum RestoreEvent {
    /// The process's userfaultfd (for [`super::PostCopy`]).
    Uffd(OwnedFd),
    /// The process runs; its pid as this host sees it.
    Running(u32),
    /// It could not be rebuilt: why.
    Failed(String),
    /// It ended: its wait status (as `waitpid` gives it).
    Exited(i32),
}

/// The agent's handle on a keeper.
#[derive(Debug)]
pub struct Restorer {
    child: Child,
    ctl: UnixStream,
}

/// A process rebuilt and running, and how to follow it.
#[derive(Debug)]
pub struct Restored {
    /// Its userfaultfd.
    pub uffd: OwnedFd,
    /// Its pid here.
    pub pid: u32,
}

impl Restorer {
    /// Starts `keeper` (a command whose program calls [`keeper_main`], given the descriptor
    /// through `CONTROL_FD_ENV`) and sends it `image` (encoded). Set the command's standard
    /// input, output and error to what the process should have.
    pub fn spawn(mut keeper: Command, image: &[u8]) -> Result<Restorer, MigrateError> {
        let (mut ours, theirs) = UnixStream::pair().map_err(|e| MigrateError::Os(format!("socketpair: {e}")))?;
        let fd = theirs.as_raw_fd();
        keeper.env(CONTROL_FD_ENV, fd.to_string());
        // SAFETY: between fork and exec, only fcntl on a descriptor of the child's.
        unsafe {
            keeper.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = keeper.spawn().map_err(|e| MigrateError::Restore(format!("cannot start the restorer: {e}")))?;
        drop(theirs);
        write_frame(&mut ours, TAG_IMAGE, image)
            .map_err(|e| MigrateError::Restore(format!("sending the image: {e}")))?;
        Ok(Restorer { child, ctl: ours })
    }

    /// The next event, waiting at most `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<RestoreEvent, MigrateError> {
        self.ctl.set_read_timeout(Some(timeout)).ok();
        let lost = |e: std::io::Error| {
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                MigrateError::TimedOut(timeout)
            } else {
                MigrateError::Restore(format!("the restorer went away: {e}"))
            }
        };
        let (tag, fd) = recv_fd(self.ctl.as_raw_fd()).map_err(lost)?;
        if tag == TAG_UFFD {
            return fd
                .map(RestoreEvent::Uffd)
                .ok_or_else(|| MigrateError::Restore("a userfaultfd message without one".into()));
        }
        let mut len = [0u8; 4];
        self.ctl.read_exact(&mut len).map_err(lost)?;
        let mut body = vec![0u8; u32::from_le_bytes(len).min(1 << 20) as usize];
        self.ctl.read_exact(&mut body).map_err(lost)?;
        let word = |b: &[u8]| b.get(..4).map_or(0, |w| u32::from_le_bytes(w.try_into().expect("4 bytes")));
        Ok(match tag {
            TAG_RUNNING => RestoreEvent::Running(word(&body)),
            TAG_FAILED => RestoreEvent::Failed(String::from_utf8_lossy(&body).into_owned()),
            TAG_EXITED => RestoreEvent::Exited(word(&body) as i32),
            t => return Err(MigrateError::Restore(format!("an unknown message {t:#x} from the restorer"))),
        })
    }

    /// The process's standard input, if the keeper was started with it piped.
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// The process's standard output, if the keeper was started with it piped.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The process's standard error, if the keeper was started with it piped.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Waits for the process to run (its userfaultfd first), at most `timeout` for each step.
    pub fn running(&mut self, timeout: Duration) -> Result<Restored, MigrateError> {
        let mut uffd = None;
        loop {
            match self.next(timeout)? {
                RestoreEvent::Uffd(f) => uffd = Some(f),
                RestoreEvent::Running(pid) => {
                    let uffd = uffd.ok_or_else(|| MigrateError::Restore("running without a userfaultfd".into()))?;
                    return Ok(Restored { uffd, pid });
                }
                RestoreEvent::Failed(why) => return Err(MigrateError::Restore(why)),
                RestoreEvent::Exited(s) => return Err(MigrateError::Restore(format!("ended at once (status {s:#x})"))),
            }
        }
    }

    /// Tells the keeper every page of the process is here: from now on the process no longer
    /// needs the agent, and lives on if the agent goes (before this, it is killed with it).
    pub fn all_here(&mut self) {
        use std::io::Write;
        let _ = self.ctl.write_all(&[TAG_ALL_HERE]);
    }

    /// Waits for the process's end (however long it runs): its wait status.
    pub fn exited(&mut self) -> Result<i32, MigrateError> {
        loop {
            let ev = match self.next(Duration::from_secs(3600)) {
                Err(MigrateError::TimedOut(_)) => continue,
                other => other?,
            };
            match ev {
                RestoreEvent::Exited(s) => {
                    let _ = self.child.wait();
                    return Ok(s);
                }
                RestoreEvent::Failed(why) => return Err(MigrateError::Restore(why)),
                _ => {}
            }
        }
    }

    /// Kills the keeper, and with its namespace the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_raw(fd: RawFd, b: &[u8]) {
    // SAFETY: write from a valid buffer.
    let _ = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
}

/// The keeper: what a program's `restore` mode runs (the control descriptor from
/// `CONTROL_FD_ENV`). Returns the exit code for the program. Must run in a single-threaded
/// process (it forks).
pub fn keeper_main() -> u8 {
    let Some(fd) = std::env::var(CONTROL_FD_ENV).ok().and_then(|v| v.parse::<RawFd>().ok()) else {
        eprintln!("mosaic restorer: {CONTROL_FD_ENV} is not set (this mode is started by the node agent)");
        return 2;
    };
    // SAFETY: the descriptor the agent passed us, ours alone.
    let mut ctl = unsafe { UnixStream::from_raw_fd(fd) };
    let failed = |ctl: &mut UnixStream, why: String| {
        let _ = write_frame(ctl, TAG_FAILED, why.as_bytes());
        1
    };
    let image = match read_frame(&mut ctl, 1 << 30) {
        Ok((TAG_IMAGE, body)) => match ProcessImage::decode(&body) {
            Ok(i) => i,
            Err(e) => return failed(&mut ctl, e.to_string()),
        },
        Ok((t, _)) => return failed(&mut ctl, format!("expected the image, got {t:#x}")),
        Err(e) => return failed(&mut ctl, format!("reading the image: {e}")),
    };
    if image.pid <= 1 {
        return failed(&mut ctl, format!("pid {} cannot be given back", image.pid));
    }
    let ((rep_r, rep_w), (st_r, st_w)) = match (pipe(libc::O_CLOEXEC), pipe(libc::O_CLOEXEC)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return failed(&mut ctl, "pipe".into()),
    };
    // SAFETY: unshare(2) of the pid namespace for the children to come.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return failed(
            &mut ctl,
            format!("a new pid namespace: {} (the agent needs CAP_SYS_ADMIN)", std::io::Error::last_os_error()),
        );
    }
    // SAFETY: fork in a single-threaded process.
    let init = unsafe { libc::fork() };
    if init < 0 {
        return failed(&mut ctl, format!("fork: {}", std::io::Error::last_os_error()));
    }
    if init == 0 {
        // Pid 1 of the namespace; it goes with the keeper (and the namespace with it).
        // SAFETY: prctl on this process.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        drop(rep_r);
        drop(st_r);
        let tid = image.pid as i32;
        // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
        // stack_size, tls, set_tid, set_tid_size, cgroup.
        let args: [u64; 11] = [0, 0, 0, 0, libc::SIGCHLD as u64, 0, 0, 0, (&raw const tid) as u64, 1, 0];
        // SAFETY: clone3 without CLONE_VM (a fork), from a single-threaded process.
        let b = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), 88usize) };
        if b == 0 {
            drop(st_w);
            // SAFETY: a fresh single-threaded process with the right pid, about to become the
            // migrated one.
            let e = unsafe { become_process(&image, ctl.as_raw_fd(), rep_w.as_raw_fd()) };
            write_raw(rep_w.as_raw_fd(), e.to_string().as_bytes());
            // SAFETY: leaving the child at once.
            unsafe { libc::_exit(1) };
        }
        if b < 0 {
            let e = std::io::Error::last_os_error();
            write_raw(rep_w.as_raw_fd(), format!("creating the process with pid {tid}: {e}").as_bytes());
            // SAFETY: leaving at once.
            unsafe { libc::_exit(1) };
        }
        drop(rep_w);
        drop(ctl);
        loop {
            let mut status = 0;
            // SAFETY: waitpid for any child (init reaps whatever the namespace orphans).
            let w = unsafe { libc::waitpid(-1, &mut status, 0) };
            if w == b as i32 {
                write_raw(st_w.as_raw_fd(), &status.to_le_bytes());
                // SAFETY: leaving at once.
                unsafe { libc::_exit(0) };
            }
            if w < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // SAFETY: leaving at once.
                unsafe { libc::_exit(0) };
            }
        }
    }
    drop(rep_w);
    drop(st_w);
    let mut report = Vec::new();
    let _ = std::fs::File::from(rep_r).read_to_end(&mut report);
    if std::env::var_os("MOSAIC_RESTORE_DEBUG").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&report));
    }
    if let Err(why) = describe_failure(&report) {
        // SAFETY: killing and reaping our own child (and so its namespace).
        unsafe {
            libc::kill(init, libc::SIGKILL);
            libc::waitpid(init, std::ptr::null_mut(), 0);
        }
        return failed(&mut ctl, why);
    }
    let pid = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(0);
    if write_frame(&mut ctl, TAG_RUNNING, &pid.to_le_bytes()).is_err() {
        // The agent is gone: nobody serves the process's memory. It cannot run on.
        // SAFETY: as above.
        unsafe {
            libc::kill(init, libc::SIGKILL);
            libc::waitpid(init, std::ptr::null_mut(), 0);
        }
        return 1;
    }
    // Until every page is here, the process lives only as long as the agent serving them.
    let mut arrived = false;
    loop {
        let mut p = [
            libc::pollfd { fd: st_r.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: if arrived { -1 } else { ctl.as_raw_fd() }, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll on our descriptors (a negative one is ignored).
        if unsafe { libc::poll(p.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if p[0].revents != 0 {
            break;
        }
        if p[1].revents != 0 {
            let mut b = [0u8; 1];
            match ctl.read(&mut b) {
                Ok(1) if b[0] == TAG_ALL_HERE => arrived = true,
                Ok(1) => {}
                _ => {
                    // The agent is gone with pages still to come: they never will.
                    // SAFETY: killing our own child (init), and so the namespace.
                    unsafe { libc::kill(init, libc::SIGKILL) };
                    arrived = true;
                }
            }
        }
    }
    let mut st = [0u8; 4];
    let status = match std::fs::File::from(st_r).read_exact(&mut st) {
        Ok(()) => i32::from_le_bytes(st),
        Err(_) => libc::SIGKILL, // init itself was killed: report the process as killed
    };
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(init, std::ptr::null_mut(), 0) };
    let _ = write_frame(&mut ctl, TAG_EXITED, &status.to_le_bytes());
    0
}
