#![allow(missing_docs)]
//! Process migration on one host: an unmodified C program, started with the checkpoint
//! handler, is stopped, rebuilt in a new pid namespace by the restorer, and its memory follows
//! post-copy; its output is what an unmigrated run prints. Needs root (pid namespaces).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mosaic_migrate::process::{check_movable, stop, FetchPages, Got, PostCopy, Restorer, SourcePages};
use mosaic_pager::ForeignUffd;

fn c_program(name: &str) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/c/{name}.c"));
    let st = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "cc failed");
    out
}

/// libmosaic_preload.so (built here: a test of this package alone does not build another's
/// library).
fn shim() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let probe = PathBuf::from(env!("CARGO_BIN_EXE_migrate-probe"));
    let dir = probe.parent().unwrap().to_path_buf();
    BUILD.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", "mosaic-preload"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        assert!(cargo.status().unwrap().success(), "building mosaic-preload failed");
    });
    dir.join("libmosaic_preload.so")
}

fn root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The source's pages, served in this process (the agents do it over the network).
struct Local(SourcePages);

impl FetchPages for Local {
    fn fetch(&self, pages: &[u64]) -> Result<(Vec<Got>, Vec<u8>), String> {
        let mut out = Vec::new();
        let kinds = self.0.fetch(pages, &mut out).map_err(|e| e.to_string())?;
        Ok((kinds, out))
    }

    fn next(&self, hint: u64, most: usize) -> Result<(Vec<u64>, Vec<u8>, bool), String> {
        let mut out = Vec::new();
        let (addrs, done) = self.0.next(hint, most, &mut out).map_err(|e| e.to_string())?;
        Ok((addrs, out, done))
    }
}

/// Starts `prog` with the checkpoint handler, and with no descriptor but standard ones (the
/// test harness's inherited pipes would make it unmovable).
fn launch(prog: &PathBuf, args: &[&str]) -> std::process::Child {
    let mut c = Command::new(prog);
    mosaic_migrate::process::standard_descriptors_only(&mut c);
    c.args(args).env("LD_PRELOAD", shim()).env("MOSAIC_MIGRATE_SIGNAL", "63").stdout(Stdio::piped()).spawn().unwrap()
}

#[test]
fn a_c_program_moves_to_a_new_process_and_prints_what_it_would_have() {
    if !root() {
        eprintln!("skipped: needs root (pid namespaces)");
        return;
    }
    let prog = c_program("counter");
    let args = ["30", "16", "20"];
    let expected = String::from_utf8(Command::new(&prog).args(args).output().unwrap().stdout).unwrap();

    let mut child = launch(&prog, &args);
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut before = String::new();
    for _ in 0..5 {
        out.read_line(&mut before).unwrap();
    }
    check_movable(pid, 63).unwrap();
    let stopped = stop(pid, 63, Duration::from_secs(5)).unwrap();
    let image = stopped.capture().unwrap();
    assert!(image.post_copy_bytes() >= 16 << 20, "{}", image.post_copy_bytes());

    let mut keeper = Command::new(env!("CARGO_BIN_EXE_migrate-probe"));
    keeper.arg("restore").stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut restorer = Restorer::spawn(keeper, &image.encode()).unwrap();
    let mut keeper_out = restorer.take_stdout().unwrap();
    let restored = match restorer.running(Duration::from_secs(10)) {
        Ok(r) => r,
        Err(e) => {
            stopped.resume();
            panic!("restore failed: {e}");
        }
    };
    let remains = stopped.stay();

    let mut post = PostCopy::start(
        ForeignUffd::from_fd(restored.uffd),
        &image,
        Arc::new(Local(SourcePages::new(remains.pid(), &image))),
    )
    .unwrap();
    let stats = post.wait(Duration::from_secs(60)).unwrap();
    assert!(stats.fetched_for_faults + stats.streamed >= 16 << 8, "{stats:?}");
    assert_eq!(stats.poisoned, 0);
    remains.kill();
    // The source's output ends where it stopped.
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let _ = child.wait();
    let status = restorer.exited().unwrap();
    let mut after = String::new();
    keeper_out.read_to_string(&mut after).unwrap();
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");
    assert!(after.starts_with("step "), "nothing printed after the move: {after:?}");
    assert_eq!(format!("{before}{rest}{after}"), expected);
}

#[test]
fn a_process_without_the_checkpoint_handler_is_refused_not_signalled() {
    // Signal 63's default action would kill it: the check must come first.
    let mut child = Command::new("sleep").arg("5").spawn().unwrap();
    let e = check_movable(child.id(), 63).unwrap_err().to_string();
    assert!(e.contains("does not catch signal 63"), "{e}");
    assert!(child.try_wait().unwrap().is_none(), "the process must live on");
    let _ = child.kill();
    let _ = child.wait();
}
