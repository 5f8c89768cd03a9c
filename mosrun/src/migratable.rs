//! `mosrun --migratable`: runs a program that can move to other nodes while it runs
//! (`mosctl migrate PID --to NODE`). mosrun stays its home: it keeps the job's record, writes its
//! output and feeds its input while it runs elsewhere, and exits with its status.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use std::time::{Duration, Instant};

use mosaic_cluster::{migrate_job, resolve_node, run_dir, Home, MIGRATE_SIGNAL};
use mosaic_transport::{connect, ClusterKey, ConnectOptions};

use crate::{find_preload, Cli};

/// The exit code for a wait status, saying so when the program died of a signal.
fn exit_code(program: &str, status: i32) -> ExitCode {
    if libc::WIFEXITED(status) {
        ExitCode::from(u8::try_from(libc::WEXITSTATUS(status)).unwrap_or(1))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        eprintln!("mosrun: {program} died of signal {sig}");
        ExitCode::from(u8::try_from(128 + sig).unwrap_or(255))
    } else {
        ExitCode::FAILURE
    }
}

/// Where the local agent's view says new work runs best (`policy::place_spread`), if not at
/// `node`.
fn best_node(node: &str, key: &ClusterKey) -> Result<Option<String>, String> {
    let mut o = ConnectOptions::new(key.clone());
    o.timeout = Duration::from_secs(2);
    o.connect_timeout = Duration::from_secs(2);
    let c = connect(node, &o).map_err(|e| mosaic_transport::error_chain(&e))?;
    let view = mosaic_cluster::gossip::ask_view(&c)?;
    // Jobs started together each get one of the nodes about as idle, at random by spare
    // capacity: not all the least loaded one.
    let mut pick = [0u8; 8];
    getrandom::fill(&mut pick).map_err(|e| format!("no random number: {e}"))?;
    let best = mosaic_cluster::policy::place_spread(
        &view.own,
        &view.window,
        0,
        Duration::from_secs(10),
        u64::from_le_bytes(pick),
    );
    Ok(best.filter(|b| *b != view.own.node))
}

/// Moves the job just started (pid `pid` at `node`) to where the view finds room, if that is not
/// `node`. The job's checkpoint handler is installed as it starts (the agent refuses a process
/// without it), so a refusal for that reason is retried for a second. A failure leaves the job
/// running here, and says why.
fn place(node: &str, pid: u32, key: &ClusterKey, verbose: bool) {
    let dest = match best_node(node, key) {
        Ok(Some(d)) => d,
        Ok(None) => {
            if verbose {
                eprintln!("mosrun: job {pid} stays at {node}: no node is lighter");
            }
            return;
        }
        Err(e) => {
            eprintln!("mosrun: cannot ask {node} where to place job {pid} ({e}); it runs here");
            return;
        }
    };
    let start = Instant::now();
    loop {
        match migrate_job(&run_dir(), pid, &dest, key) {
            Ok(m) => {
                if verbose {
                    eprintln!(
                        "mosrun: job {pid} placed at {dest}, a lighter node (stopped {:.1} ms to move)",
                        m.freeze_us as f64 / 1000.0
                    );
                }
                return;
            }
            Err(e) if e.to_string().contains("does not catch signal") && start.elapsed() < Duration::from_secs(1) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("mosrun: cannot place job {pid} at {dest} ({e}); it runs here");
                return;
            }
        }
    }
}

pub(crate) fn run(cli: &Cli) -> Result<ExitCode, String> {
    let preload = find_preload(cli)?;
    let key = ClusterKey::from_env().map_err(|e| format!("{e} (the nodes' agents share it)"))?;
    let node =
        cli.node.clone().or_else(|| std::env::var("MOSAIC_NODE").ok()).unwrap_or_else(|| "tcp://127.0.0.1:7070".into());
    let node = resolve_node(&node).map_err(|e| e.to_string())?;
    let mut preloads = preload.display().to_string();
    if let Ok(old) = std::env::var("LD_PRELOAD") {
        if !old.is_empty() {
            preloads = format!("{preloads}:{old}");
        }
    }
    let program = &cli.program[0];
    let mut cmd = Command::new(program);
    // Only standard input, output and error go to the program: an inherited pipe (a make
    // jobserver's, a test harness's) would keep it from moving.
    mosaic_migrate::process::standard_descriptors_only(&mut cmd);
    let mut child = cmd
        .args(&cli.program[1..])
        .env("LD_PRELOAD", preloads)
        .env("MOSAIC_MIGRATE_SIGNAL", MIGRATE_SIGNAL.to_string())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let pid = child.id();
    let home = Home::start(&format!("tcp://{}:0", cli.home_address), key.clone(), &node, pid, &cli.program.join(" "))
        .and_then(|mut h| {
            h.publish(&run_dir())?;
            Ok(h)
        });
    let home = match home {
        Ok(h) => h,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.to_string());
        }
    };
    if cli.verbose {
        eprintln!(
            "mosrun: job {pid} runs at {node}, its home at {}: `mosctl migrate {pid} --to NODE` moves it",
            home.uri()
        );
    }
    if cli.place {
        place(&node, pid, &key, cli.verbose);
    }
    let waiter = std::thread::spawn(move || child.wait().map(ExitStatusExt::into_raw));
    loop {
        if waiter.is_finished() {
            let status = waiter
                .join()
                .map_err(|_| "the thread waiting for the program failed".to_string())?
                .map_err(|e| format!("waiting for {program}: {e}"))?;
            // What ended here is the job itself, or the stopped copy of a job that left.
            return Ok(exit_code(program, if home.left() { home.wait_exit() } else { status }));
        }
        if let Some(status) = home.exit_status() {
            // The job ended elsewhere; the stopped copy here goes too (its node's agent, which
            // would have killed it, may be gone).
            // SAFETY: kill(2) of our own child, reaped by the waiting thread.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Ok(exit_code(program, status));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
