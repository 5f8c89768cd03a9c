//! `mosaic-bench migrate --ops process`: whole processes moved between two node agents of this
//! host, as `mosctl migrate` moves them (`op` "process").
//!
//! For each transport, size and share touched: two agents (`mosaic_cluster::Agent`) run in this
//! process; a holder (this program as `migrate-hold`, started with `libmosaic_preload.so`'s
//! checkpoint handler) maps SIZE bytes and writes the share; the source agent stops it and moves
//! it to the destination. `freeze_us` is the source agent's own measure, from stopping the
//! process to its running at the destination; `residence_ms` runs from the request to the last
//! page's arrival (the holder touches nothing afterwards: the stream alone brings the pages);
//! `bytes_sent` is the image (registers, mappings, the written pages of private file mappings)
//! plus the pages that followed; `touched_bytes` what the holder wrote; `image_bytes` the image
//! alone, the process's fixed cost.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mosaic_cluster::{wire, Agent, AgentConfig, Moved, MIGRATE_SIGNAL};
use mosaic_transport::{connect, ClusterKey, ConnectOptions};
use serde_json::json;

const PAGE: u64 = 4096;

/// Whether page `p` is among the `pct`% touched (as the region figures have it).
fn touched(p: u64, pct: u64) -> bool {
    (p * 7919) % 100 < pct
}

/// The holder: maps `size` bytes, writes `pct`% of the pages, says READY and waits to be killed.
pub fn hold(size: u64, pct: u64) -> Result<(), String> {
    let len = usize::try_from(size).map_err(|e| e.to_string())?;
    // SAFETY: a fresh private anonymous mapping, used by this process alone.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {size}: {}", std::io::Error::last_os_error()));
    }
    let base = p.cast::<u64>();
    for page in (0..size / PAGE).filter(|&q| touched(q, pct)) {
        // SAFETY: within the mapping just made.
        unsafe { *base.add(usize::try_from(page * PAGE / 8).unwrap_or(0)) = page | 1 };
    }
    println!("READY");
    for _ in 0..3600 {
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

fn preload_lib() -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let lib = exe.with_file_name("libmosaic_preload.so");
    let dep = exe.with_file_name("deps").join("libmosaic_preload.so");
    [lib.clone(), dep]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{} is missing: build it with `cargo build --release -p mosaic-preload`", lib.display()))
}

/// A free TCP port of loopback (for an agent that must know its address before it listens).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// One figure.
pub fn one(transport: &str, size: u64, pct: u64, key: &str) -> Result<serde_json::Value, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("whole-process figures need root (the restorer makes a pid namespace)".into());
    }
    let preload = preload_lib()?;
    let key = ClusterKey::from_bytes(key.as_bytes()).map_err(|e| e.to_string())?;
    let me = std::process::id();
    let (listen_a, listen_b, link) = match transport {
        "tcp" => ("tcp://127.0.0.1:0".to_string(), "tcp://127.0.0.1:0".to_string(), None),
        "shm" => (format!("shm://mosaic-bench-agent-{me}-a"), format!("shm://mosaic-bench-agent-{me}-b"), None),
        t => match t.strip_prefix("sim:") {
            Some(preset) => {
                (format!("tcp://127.0.0.1:{}", free_port()?), format!("tcp://127.0.0.1:{}", free_port()?), Some(preset))
            }
            None => return Err(format!("transport {t}: tcp, shm, or sim:PRESET")),
        },
    };
    let restorer = (std::env::current_exe().map_err(|e| e.to_string())?, vec!["restore".to_string()]);
    let mut cfg_a = AgentConfig::new(&listen_a, key.clone());
    cfg_a.restorer = restorer.clone();
    // Over a simulated link, both the image and the pages cross it.
    cfg_a.advertise = link.map(|l| format!("sim://{l}@{listen_a}"));
    let mut cfg_b = AgentConfig::new(&listen_b, key.clone());
    cfg_b.restorer = restorer;
    let a = Agent::start(cfg_a).map_err(|e| e.to_string())?;
    let b = Agent::start(cfg_b).map_err(|e| e.to_string())?;
    let to = match link {
        Some(l) => format!("sim://{l}@{}", b.uri()),
        None => b.uri().to_string(),
    };

    let mut holder = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    holder
        .args(["migrate-hold", &size.to_string(), &pct.to_string()])
        .env("LD_PRELOAD", &preload)
        .env("MOSAIC_MIGRATE_SIGNAL", MIGRATE_SIGNAL.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    mosaic_migrate::process::standard_descriptors_only(&mut holder);
    let mut holder = holder.spawn().map_err(|e| format!("cannot start the holder: {e}"))?;
    let mut said = String::new();
    BufReader::new(holder.stdout.take().ok_or("no holder output")?).read_line(&mut said).map_err(|e| e.to_string())?;
    if said.trim() != "READY" {
        let _ = holder.kill();
        return Err(format!("the holder said {said:?}"));
    }

    let t0 = Instant::now();
    let mut req = wire::Enc::default();
    req.u32(holder.id()).str(&to).str("").u64(0);
    let mut o = ConnectOptions::new(key);
    o.timeout = Duration::from_secs(600);
    let moved = connect(a.uri(), &o)
        .map_err(|e| e.to_string())
        .and_then(|c| c.call(wire::MIGRATE_OUT, &req.0).map_err(|e| mosaic_transport::error_chain(&e)))
        .and_then(|r| Moved::decode(&r));
    let moved = match moved {
        Ok(m) => m,
        Err(e) => {
            let _ = holder.kill();
            let _ = holder.wait();
            return Err(format!("the move failed: {e}"));
        }
    };
    let arrived = b.wait_arrived(moved.pid, Duration::from_secs(1800));
    // SAFETY: kill(2) of the process that moved to agent b (its pid on this host).
    unsafe { libc::kill(i32::try_from(moved.pid).unwrap_or(0), libc::SIGKILL) };
    let _ = holder.kill();
    let _ = holder.wait();
    let (at, stats) = arrived.ok_or("the pages did not all come")?;
    let touched_pages = (0..size / PAGE).filter(|&q| touched(q, pct)).count() as u64;
    Ok(json!({
        "bench": "migrate", "op": "process", "transport": transport, "size": size, "touched_pct": pct,
        "freeze_us": moved.freeze_us,
        "residence_ms": (at.duration_since(t0).as_secs_f64() * 1e4).round() / 10.0,
        "bytes_sent": moved.image_bytes + stats.bytes, "touched_bytes": touched_pages * PAGE,
        "image_bytes": moved.image_bytes, "threads": moved.threads,
        "faults": stats.faults, "streamed_pages": stats.streamed,
    }))
}
