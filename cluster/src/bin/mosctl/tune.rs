//! `mosctl tune`: the measuring (see `mosaic_cluster::tune`), the probe migration, the file.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mosaic_cluster::tune::{self, Tuning, PROBE_MIB};
use mosaic_cluster::{agent_status, connect_agent, local_agent, migrate_job, resolve_node, run_dir};
use mosaic_transport::ClusterKey;

/// What to measure and where the figures go.
pub struct TuneArgs {
    pub node: Option<String>,
    pub to: Option<String>,
    pub out: Option<PathBuf>,
    pub no_probe: bool,
    pub json: bool,
}

pub fn run(a: TuneArgs, key: &ClusterKey) -> Result<(), String> {
    let from = resolve_node(&a.node.unwrap_or_else(local_agent)).map_err(|e| e.to_string())?;
    let c = connect_agent(&from, key, Duration::from_secs(5))?;
    let view = mosaic_cluster::gossip::ask_view(&c)?;
    let to = match a.to {
        Some(t) => resolve_node(&t).map_err(|e| e.to_string())?,
        None => view.window.first().map(|v| v.node.clone()).ok_or_else(|| {
            format!("{from} knows no other node: give one with --to (or start another agent with --join {from})")
        })?,
    };
    eprintln!("tune: {from} -> {to}");
    eprintln!("  [1/3] round trip and bandwidth...");
    let (round_trip_us, bandwidth_mib_s) = tune::link(&to, key, 200)?;
    eprintln!("        {round_trip_us:.0} us, {bandwidth_mib_s:.0} MiB/s");
    eprintln!("  [2/3] a fault served from its memory server...");
    let remote_fault_us = match agent_status(&to, key)?.memory_server {
        Some(server) => {
            let us = tune::remote_fault(&server, key)?;
            eprintln!("        {us:.0} us");
            us
        }
        None => {
            eprintln!("        skipped: {to} has no memory server");
            0.0
        }
    };
    eprintln!("  [3/3] moving a {PROBE_MIB} MiB probe process there...");
    let probe_freeze_ms = if a.no_probe {
        eprintln!("        skipped (--no-probe): the freeze is estimated from the round trip");
        0.0
    } else {
        let ms = probe(&from, &to, key)?;
        eprintln!("        frozen {ms:.1} ms");
        ms
    };
    let tenth = |x: f64| (x * 10.0).round() / 10.0;
    let t = Tuning {
        measured_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        from,
        to,
        round_trip_us: tenth(round_trip_us),
        bandwidth_mib_s: tenth(bandwidth_mib_s),
        remote_fault_us: tenth(remote_fault_us),
        probe_freeze_ms: tenth(probe_freeze_ms),
        migration_cost_ms: tenth(Tuning::cost_ms(round_trip_us, bandwidth_mib_s, probe_freeze_ms)),
    };
    let text = if a.json { serde_json::to_string(&t).unwrap_or_default() + "\n" } else { t.to_toml() };
    match &a.out {
        Some(path) => {
            write_atomically(path, &text)?;
            eprintln!("tune: migration cost {:.1} ms; written to {}", t.migration_cost_ms, path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file beside it: a reader never sees half of it.
fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A child killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a probe job (`mosrun --migratable`, holding [`PROBE_MIB`] MiB) at `from`, moves it
/// to `to` and returns its freeze time in milliseconds; the probe then ends.
fn probe(from: &str, to: &str, key: &ClusterKey) -> Result<f64, String> {
    let me = std::env::current_exe().map_err(|e| format!("finding mosctl itself: {e}"))?;
    let mosrun = me.with_file_name("mosrun");
    let mosrun = if mosrun.exists() { mosrun } else { PathBuf::from("mosrun") };
    let dir = run_dir();
    let mut child = Command::new(&mosrun)
        .args(["--migratable", "--node", from, "--"])
        .arg(&me)
        .args(["tune-probe", &PROBE_MIB.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the probe with {}: {e} (or use --no-probe)", mosrun.display()))?;
    let out = child.stdout.take();
    let mut child = Reaped(child);
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = out {
        std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
    }
    // "ready PID": its pid, which names its job file.
    let said = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let Some(pid) = said.strip_prefix("ready ").and_then(|p| p.parse::<u32>().ok()) else {
        return Err("the probe did not start (see mosrun's message above; or use --no-probe)".into());
    };
    let moved = migrate_job(&dir, pid, to, key).map_err(|e| format!("moving the probe to {to}: {e}"))?;
    // End of input ends the probe wherever it runs.
    drop(child.0.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(moved.freeze_us as f64 / 1000.0)
}

/// The probe itself (run by mosrun): holds `mib` MiB written, says "ready PID", and ends at the
/// end of its input (or after a minute).
pub fn probe_main(mib: u64) -> Result<(), String> {
    let mut held = vec![0u8; usize::try_from(mib << 20).map_err(|e| e.to_string())?];
    for (i, b) in held.iter_mut().enumerate().step_by(4096) {
        *b = (i >> 12).to_le_bytes()[0] | 1;
    }
    println!("ready {}", std::process::id());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(60));
    std::hint::black_box(&held);
    Ok(())
}
