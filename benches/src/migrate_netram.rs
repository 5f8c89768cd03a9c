//! `mosaic-bench migrate --ops netram`: a network-RAM region moved between two processes of this
//! host by handing over its table.
//!
//! A memory server runs in this process (on the figure's transport); a source process makes a
//! region of the size on it with a resident budget of a quarter of it (at most 64 MiB), writes
//! the share of pages, then (told to go) hands it over; a destination process, waiting already,
//! takes it over (`freeze_us`: from the source's hand-over call to the destination's return:
//! writing back the dirty resident pages, the servers' clone, the table crossing, the mapping),
//! then reads every written page once (`residence_ms`, from the same start: for network RAM,
//! "every page readable here", since its pages stay on the servers by design). `bytes_sent` is
//! what crossed the migration link (the table), `written_back_bytes` what the hand-over wrote to
//! the memory servers. Simulated links are not measured for this op: what moves is the table,
//! and the pages travel on the memory servers' links, not the migration link.

use std::time::Duration;

use mosaic_migrate::{take_over_netram, NetRamOutgoing};
use mosaic_netram::{MemServer, MemServerConfig, NetRam, NetRamConfig};
use mosaic_transport::ClusterKey;
use serde_json::json;

use crate::migrate::{now_ns, touched, Figure};

/// Where the region lives in both processes.
const ADDR: usize = 0x6300_0000_0000;
const PAGE: usize = 4096;

/// The resident budget of a region of `size` bytes at either end.
fn budget(size: u64) -> u64 {
    (size / 4).clamp(1 << 20, 64 << 20)
}

/// One figure.
pub fn one(transport: &str, size: u64, pct: u64, key: &str) -> Result<serde_json::Value, String> {
    let (server_uri, listen) = match transport {
        "tcp" => ("tcp://127.0.0.1:0".to_string(), "tcp://127.0.0.1:0".to_string()),
        "shm" => {
            let id = std::process::id();
            (format!("shm://mosaic-bench-netram-{id}"), format!("shm://mosaic-bench-handover-{id}"))
        }
        t => return Err(format!("transport {t}: the netram op measures tcp and shm")),
    };
    let ck = ClusterKey::from_bytes(key.as_bytes()).map_err(|e| e.to_string())?;
    let server = MemServer::start(&server_uri, MemServerConfig::new(size + (64 << 20), ck))
        .map_err(|e| mosaic_transport::error_chain(&e))?;
    let mut fig = Figure::go(
        &["migrate-netram-source".into(), size.to_string(), pct.to_string(), listen, server.uri().to_string()],
        &["migrate-netram-dest".into(), size.to_string(), pct.to_string()],
        key,
    )?;
    let handed = fig.handed.clone(); // URI T0 WRITTEN_BACK REMOTE
    let f: Vec<&str> = handed.split_whitespace().collect();
    let [_, t0, written_back, remote] = f[..] else { return Err(format!("source: {handed}")) };
    let num = |s: &str| s.parse::<u64>().map_err(|_| format!("source: {handed}"));
    let (t0, written_back, remote) = (num(t0)?, num(written_back)?, num(remote)?);
    let arrived = fig.dest_line()?; // T1 T2
    let sent = fig.src_line()?; // bytes sent
    fig.wait();
    drop(server);
    let a: Vec<u64> = arrived.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let [t1, t2] = a[..] else { return Err(format!("destination: {arrived}")) };
    let bytes_sent: u64 = sent.trim().parse().map_err(|_| format!("source: {sent}"))?;
    Ok(json!({
        "bench": "migrate", "op": "netram", "transport": transport, "size": size, "touched_pct": pct,
        "freeze_us": ((t1.saturating_sub(t0)) as f64 / 1e3 * 10.0).round() / 10.0,
        "residence_ms": ((t2.saturating_sub(t0)) as f64 / 1e6 * 10.0).round() / 10.0,
        "bytes_sent": bytes_sent, "touched_bytes": remote * PAGE as u64,
        "written_back_bytes": written_back * PAGE as u64, "resident_budget": budget(size),
    }))
}

/// `mosaic-bench migrate-netram-source SIZE PCT LISTEN SERVER`: makes and fills the region,
/// says READY, hands it over when told, prints `URI T0 WRITTEN_BACK REMOTE`, then the bytes
/// sent once the destination took it.
pub fn source(size: u64, pct: u64, listen: &str, server: &str) -> Result<(), String> {
    let key = ClusterKey::from_env().map_err(|e| e.to_string())?;
    let mut cfg = NetRamConfig::new(vec![server.to_string()], key.clone(), size, budget(size));
    cfg.fixed_addr = Some(ADDR);
    let ram = NetRam::new(cfg).map_err(|e| mosaic_transport::error_chain(&e))?;
    let len = ram.len();
    for page in (0..len / PAGE).filter(|p| touched(*p, pct)) {
        // SAFETY: inside the region, mapped while `ram` lives; this thread alone uses it.
        unsafe { ram.as_ptr().cast::<u64>().add(page * PAGE / 8).write(page as u64 + 1) };
    }
    println!("READY");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).map_err(|e| e.to_string())?;
    let t0 = now_ns();
    let mut out = NetRamOutgoing::hand_over(ram, listen, key).map_err(|b| mosaic_transport::error_chain(&b.1))?;
    let s = out.stats();
    println!("{} {t0} {} {}", out.uri(), s.written_back_pages, s.remote_pages);
    let s = out.finish(Duration::from_secs(3600)).map_err(|e| mosaic_transport::error_chain(&e))?;
    println!("{}", s.bytes_sent);
    Ok(())
}

/// `mosaic-bench migrate-netram-dest SIZE PCT`: reads `URI T0 ...`, takes the region over, reads
/// every written page once (checking it), prints when it ran again and when it had read them.
pub fn dest(size: u64, pct: u64) -> Result<(), String> {
    let mut handed = String::new();
    std::io::stdin().read_line(&mut handed).map_err(|e| e.to_string())?;
    let uri = handed.split_whitespace().next().ok_or("no URI")?;
    let key = ClusterKey::from_env().map_err(|e| e.to_string())?;
    let (ram, _) = take_over_netram(uri, key, budget(size)).map_err(|e| mosaic_transport::error_chain(&e))?;
    let t1 = now_ns();
    for page in (0..ram.len() / PAGE).filter(|p| touched(*p, pct)) {
        // SAFETY: inside the region taken over, mapped while `ram` lives.
        let got = unsafe { ram.as_ptr().cast::<u64>().add(page * PAGE / 8).read_volatile() };
        if got != page as u64 + 1 {
            return Err(format!("page {page}: {got:#x}, expected {:#x}", page + 1));
        }
    }
    let t2 = now_ns();
    // A page never written reads zeros (checked after the clock stopped).
    if let Some(page) = (0..ram.len() / PAGE).find(|p| !touched(*p, pct)) {
        // SAFETY: as above.
        let got = unsafe { ram.as_ptr().cast::<u64>().add(page * PAGE / 8).read_volatile() };
        if got != 0 {
            return Err(format!("page {page}, never written: {got:#x}"));
        }
    }
    println!("{t1} {t2}");
    Ok(())
}
