//! `mosaic-bench migrate`: region post-copy between two processes of this host.
//!
//! For each transport, size and share of touched pages: a source process fills the share of a
//! fresh region, then (told to go) freezes it; a destination process, waiting already, connects,
//! maps the region and is running again (`freeze_us`: from the source's freeze call to the
//! destination's return, on the host's monotonic clock, both processes reading it), then waits
//! until every page is in (`residence_ms`, from the same start). The destination touches nothing:
//! the background stream alone brings the pages. `bytes_sent` is what the source sent (pages,
//! headers, the descriptor), `touched_bytes` what was there to send.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mosaic_migrate::{Incoming, Outgoing};
use mosaic_transport::{ClusterKey, ConnectOptions, LinkSpec};
use serde_json::json;

/// Where the region lives in both processes.
const ADDR: usize = 0x6200_0000_0000;
const PAGE: usize = 4096;

/// What to measure.
pub struct Plan {
    /// Region sizes in bytes.
    pub sizes: Vec<u64>,
    /// Shares of pages touched, in percent.
    pub touched: Vec<u64>,
    /// tcp, shm, or sim presets (`sim:fast-ethernet`, `sim:10gbe`).
    pub transports: Vec<String>,
    /// The largest region measured over a simulated link (they are slow by design).
    pub sim_max: u64,
    /// `region`, `process`, `netram`, or several.
    pub ops: Vec<String>,
    /// JSON lines instead of a table.
    pub json: bool,
}

/// The host's monotonic clock in nanoseconds (the same clock in every process).
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Whether page `p` is among the `pct`% touched.
pub(crate) fn touched(p: usize, pct: u64) -> bool {
    ((p * 7919) % 100) < usize::try_from(pct).unwrap_or(100)
}

/// Runs the plan, printing a line per figure.
pub fn run(plan: &Plan) -> Result<(), String> {
    let key = ClusterKey::random_text().map_err(|e| e.to_string())?;
    for transport in &plan.transports {
        for &size in &plan.sizes {
            if transport.starts_with("sim") && size > plan.sim_max {
                continue;
            }
            for (op, &pct) in plan.ops.iter().flat_map(|o| plan.touched.iter().map(move |p| (o, p))) {
                let r = if op == "process" {
                    crate::migrate_process::one(transport, size, pct, &key)?
                } else if op == "netram" {
                    if transport.starts_with("sim") {
                        continue; // the table crosses, the pages stay on the servers' links
                    }
                    crate::migrate_netram::one(transport, size, pct, &key)?
                } else {
                    one(transport, size, pct, &key)?
                };
                if plan.json {
                    println!("{r}");
                } else {
                    println!(
                        "{:<8} {:<18} {:>6} MiB {:>3}% touched: freeze {:>9.0} us, resident after {:>9.1} ms, {:>12} bytes sent for {:>12} touched ({:.4}x)",
                        op,
                        transport,
                        size >> 20,
                        pct,
                        r["freeze_us"].as_f64().unwrap_or(0.0),
                        r["residence_ms"].as_f64().unwrap_or(0.0),
                        r["bytes_sent"],
                        r["touched_bytes"],
                        r["bytes_sent"].as_f64().unwrap_or(0.0) / r["touched_bytes"].as_f64().unwrap_or(1.0).max(1.0)
                    );
                }
            }
        }
    }
    Ok(())
}

/// A process of a figure, killed (and waited for) when dropped: a figure that fails leaves no
/// process behind.
pub(crate) struct Spawned(Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A figure's source and destination processes, told what to do through their stdin: started,
/// the source filled (READY) and told to go, its next line (what the destination needs) handed
/// to the destination.
pub(crate) struct Figure {
    src: Spawned,
    dest: Spawned,
    src_out: std::io::Lines<BufReader<std::process::ChildStdout>>,
    dest_out: std::io::Lines<BufReader<std::process::ChildStdout>>,
    /// The source's line after it went, as handed to the destination.
    pub(crate) handed: String,
}

impl Figure {
    /// Starts both (this program with `src_args` and `dest_args`) and runs them to the hand-off.
    pub(crate) fn go(src_args: &[String], dest_args: &[String], key: &str) -> Result<Figure, String> {
        let mut src = spawn(src_args, key)?;
        let mut dest = spawn(dest_args, key)?;
        let src_out = BufReader::new(src.stdout.take().ok_or("no source output")?).lines();
        let dest_out = BufReader::new(dest.stdout.take().ok_or("no destination output")?).lines();
        let mut fig = Figure { src, dest, src_out, dest_out, handed: String::new() };
        let ready = fig.src_line()?;
        if ready != "READY" {
            return Err(format!("source: {ready}"));
        }
        let mut src_in = fig.src.stdin.take().ok_or("no source input")?;
        writeln!(src_in, "go").map_err(|e| e.to_string())?;
        fig.handed = fig.src_line()?;
        let mut dest_in = fig.dest.stdin.take().ok_or("no destination input")?;
        writeln!(dest_in, "{}", fig.handed).map_err(|e| e.to_string())?;
        Ok(fig)
    }

    /// The source's next line.
    pub(crate) fn src_line(&mut self) -> Result<String, String> {
        self.src_out.next().and_then(Result::ok).ok_or("the source stopped early".to_string())
    }

    /// The destination's next line.
    pub(crate) fn dest_line(&mut self) -> Result<String, String> {
        self.dest_out.next().and_then(Result::ok).ok_or("the destination stopped early".to_string())
    }

    /// Waits for both to end.
    pub(crate) fn wait(&mut self) {
        let (_, _) = (self.src.wait(), self.dest.wait());
    }
}

/// This program run again with `args`, the cluster key in its environment.
pub(crate) fn spawn(args: &[String], key: &str) -> Result<Spawned, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new(exe)
        .args(args)
        .env(mosaic_transport::KEY_ENV, key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map(Spawned)
        .map_err(|e| format!("cannot start {args:?}: {e}"))
}

/// One figure: a source and a destination process, told what to do through their stdin.
fn one(transport: &str, size: u64, pct: u64, key: &str) -> Result<serde_json::Value, String> {
    let (listen, link) = match transport {
        "tcp" => ("tcp://127.0.0.1:0".to_string(), None),
        "shm" => (format!("shm://mosaic-bench-migrate-{}", std::process::id()), None),
        t => match t.strip_prefix("sim:") {
            Some(preset) => ("tcp://127.0.0.1:0".to_string(), Some(preset.to_string())),
            None => return Err(format!("transport {t}: tcp, shm, or sim:PRESET (sim:fast-ethernet, sim:10gbe)")),
        },
    };
    let mut dest_args = vec!["migrate-dest".to_string()];
    dest_args.extend(link);
    let mut fig = Figure::go(&["migrate-source".into(), size.to_string(), pct.to_string(), listen], &dest_args, key)?;
    let frozen = fig.handed.clone(); // URI t0
    let f: Vec<&str> = frozen.split_whitespace().collect();
    let t0: u64 = match f[..] {
        [_, t0] => t0.parse().map_err(|_| "t0")?,
        _ => return Err(format!("source: {frozen}")),
    };
    let arrived = fig.dest_line()?; // t1 t2
    let sent = fig.src_line()?; // bytes present
    fig.wait();
    let a: Vec<u64> = arrived.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let (bytes_sent, present) = match sent.split_whitespace().map(str::parse::<u64>).collect::<Vec<_>>()[..] {
        [Ok(b), Ok(p)] => (b, p),
        _ => return Err(format!("source: {sent}")),
    };
    let [t1, t2] = a[..] else { return Err(format!("destination: {arrived}")) };
    Ok(json!({
        "bench": "migrate", "op": "region", "transport": transport, "size": size, "touched_pct": pct,
        "freeze_us": ((t1.saturating_sub(t0)) as f64 / 1e3 * 10.0).round() / 10.0,
        "residence_ms": ((t2.saturating_sub(t0)) as f64 / 1e6 * 10.0).round() / 10.0,
        "bytes_sent": bytes_sent, "touched_bytes": present * PAGE as u64,
    }))
}

/// `mosaic-bench migrate-source SIZE PCT LISTEN`: fills, says READY, freezes when told, prints
/// `URI T0`, then the bytes sent and the pages present once every page left.
pub fn source(size: u64, pct: u64, listen: &str) -> Result<(), String> {
    let len = usize::try_from(size).map_err(|_| "size")?;
    mosaic_migrate::map_anonymous_at(ADDR, len).map_err(|e| format!("cannot map {len} bytes at {ADDR:#x}: {e}"))?;
    for page in (0..len / PAGE).filter(|p| touched(*p, pct)) {
        // SAFETY: inside the mapping just made; this thread alone uses it.
        unsafe { (ADDR as *mut u64).add(page * PAGE / 8).write(page as u64 + 1) };
    }
    println!("READY");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).map_err(|e| e.to_string())?;
    let key = ClusterKey::from_env().map_err(|e| e.to_string())?;
    let t0 = now_ns();
    // SAFETY: the mapping made above; this process does not use it after this point.
    let mut out = unsafe { Outgoing::freeze(ADDR, len, listen, key) }.map_err(|e| mosaic_transport::error_chain(&e))?;
    println!("{} {t0}", out.uri());
    let s = out.finish(Duration::from_secs(3600)).map_err(|e| mosaic_transport::error_chain(&e))?;
    println!("{} {}", s.bytes_sent, s.present_pages);
    Ok(())
}

/// `mosaic-bench migrate-dest [SIM_PRESET]`: reads `URI T0`, takes the region over,
/// prints when it ran again and when every page was in.
pub fn dest(link: Option<&str>) -> Result<(), String> {
    let mut frozen = String::new();
    std::io::stdin().read_line(&mut frozen).map_err(|e| e.to_string())?;
    let uri = frozen.split_whitespace().next().ok_or("no URI")?;
    let key = ClusterKey::from_env().map_err(|e| e.to_string())?;
    let opts = ConnectOptions::new(key);
    let conn = match link {
        None => mosaic_transport::connect(uri, &opts).map_err(|e| mosaic_transport::error_chain(&e))?,
        Some(preset) => {
            let spec = LinkSpec::parse(preset)?;
            mosaic_transport::connect_sim(uri, spec, &opts).map_err(|e| mosaic_transport::error_chain(&e))?.0
        }
    };
    let mut inc = Incoming::over(conn).map_err(|e| mosaic_transport::error_chain(&e))?;
    let t1 = now_ns();
    inc.wait_resident(Duration::from_secs(3600)).map_err(|e| mosaic_transport::error_chain(&e))?;
    let t2 = now_ns();
    println!("{t1} {t2}");
    Ok(())
}
