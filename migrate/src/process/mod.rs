//! Process migration: a running program started by `mosrun` moves to another node and only
//! the pages it touches follow (issue 13, item 3).
//!
//! In the order things happen:
//! 1. **Check** ([`check_movable`]): what cannot move yet (sockets, pipes other than standard
//!    input/output/error, shared memory, children, a tracer, devices) refuses with the reason
//!    before anything is stopped.
//! 2. **Stop** ([`stop`]): every thread is sent the checkpoint signal; the handler that `mosrun`'s
//!    shim installed ([`shim`]) reports what only the thread sees ([`ThreadRecord`]) and waits.
//! 3. **Capture** ([`Stopped::capture`]): the rest comes from `/proc` (mappings; descriptors,
//!    working directory, limits, ids, `mm` fields, auxiliary vector) into a [`ProcessImage`]. The
//!    pages of private file mappings that the process wrote (found by `PAGEMAP_SCAN`) and those
//!    holding the threads' saved contexts travel with it; the rest of its anonymous memory does
//!    not, and which of its pages hold data is not even looked at: so the pause does not grow
//!    with the process's size.
//! 4. **Restore** ([`keeper_main`], [`become_process`]): at the destination a fresh process in
//!    a new pid namespace takes the migrated pid and rebuilds the process at the same addresses;
//!    threads get their ids back and resume from their saved contexts.
//! 5. **Post-copy** ([`PostCopy`], [`SourcePages`]): faults pull their pages from the source,
//!    which reads them from the stopped process and learns which pages hold data a chunk (2 MiB)
//!    at a time as it is asked; a stream pulls the rest; the stopped copy is killed when all are
//!    here (it keeps its memory until then: pages are not freed at the source as they leave).
//!
//! x86-64 only: the restorer's interpreter and the signal frame are the architecture's.
//! aarch64 would need the interpreter in its assembly (`svc #0`, `x8` for the call number), its
//! `rt_sigreturn` frame and `TPIDR_EL0` for the thread pointer (set by `clone3`'s `tls` too).

mod capture;
mod fdpass;
mod image;
mod keeper;
mod pages;
mod postcopy;
mod record;
mod restore;
pub mod shim;

pub use capture::{check_movable, read_memory, stop, Remains, Stopped};
pub use fdpass::{read_frame, recv_fd, send_fd, write_frame};
pub use image::{Backing, Credentials, FileId, Mapping, MmFields, OpenFile, ProcessImage};
pub use keeper::{keeper_main, RestoreEvent, Restored, Restorer};
pub use pages::{Got, SourcePages};
pub use postcopy::{FetchPages, PostCopy, PostCopyStats};
pub use record::{KernelSigaction, ThreadRecord};
pub use restore::{become_process, describe_failure};

/// Makes `cmd` start its program with standard input, output and error only: an inherited
/// descriptor (a make jobserver's pipe, a test harness's) would keep it from moving.
pub fn standard_descriptors_only(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range between fork and exec touches only the child's descriptors.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}
