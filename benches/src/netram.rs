//! `mosaic-bench netram`: remote fault latency and throughput, scans with and without prefetch,
//! and random read-modify-write at several resident fractions, beside the two costs a fault is
//! made of, measured in the same run: the transport's 4 KiB page read (the memory server's GET,
//! the request a fault sends) and the pager's local install (`UFFDIO_COPY` of one page).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mosaic_netram::{proto, NetRam, NetRamConfig};
use mosaic_pager::{Fault, FaultMode, FillError, Filled, Page, PageSource, Region, RegionConfig};
use mosaic_transport::{connect, ClusterKey, ConnectOptions, PAGE_SIZE};
use serde_json::json;

use crate::stats::round3;

use crate::serve::ChildServer;
use crate::stats::{count_f64, Samples, Summary};

/// What to measure.
pub struct Plan {
    /// Transports: tcp, shm, sim (tcp through a shaped link, see `sim_link`).
    pub transports: Vec<String>,
    /// Use these servers instead of starting one per transport; the cluster key then comes
    /// from `MOSAIC_CLUSTER_KEY` or `MOSAIC_CLUSTER_KEY_FILE`.
    pub servers: Vec<String>,
    /// The link preset or parameters for `sim` (see [`mosaic_transport::LinkSpec::parse`]).
    pub sim_link: String,
    /// Thread counts for faults/s.
    pub threads: Vec<usize>,
    /// Resident fractions (percent) for the read-modify-write workload.
    pub resident: Vec<u64>,
    /// Region size for the fault and scan figures, in bytes.
    pub size: u64,
    /// Working set of the read-modify-write workload, in bytes.
    pub rmw_size: u64,
    /// Seconds per timed figure.
    pub time: Duration,
    /// Serve faults with worker threads instead of on the faulting thread.
    pub workers: bool,
    /// One JSON object per line.
    pub json: bool,
}

/// One figure.
#[derive(Default)]
struct Figure {
    transport: String,
    op: &'static str,
    threads: usize,
    resident_pct: Option<u64>,
    prefetch: Option<bool>,
    outstanding: Option<usize>,
    /// For page reads: how many distinct stored pages the reads were spread over.
    spread_pages: Option<u64>,
    latency: Option<Summary>,
    per_s: Option<(&'static str, f64)>,
    mb_per_s: Option<f64>,
}

impl Figure {
    fn new(transport: &str, op: &'static str) -> Figure {
        Figure { transport: transport.into(), op, threads: 1, ..Figure::default() }
    }

    fn print(&self, json_out: bool, mode: &str) {
        if json_out {
            let mut v = json!({"bench": "netram", "transport": self.transport, "op": self.op, "threads": self.threads, "fault_mode": mode});
            let o = v.as_object_mut().expect("object");
            if let Some(p) = self.resident_pct {
                o.insert("resident_pct".into(), json!(p));
            }
            if let Some(p) = self.prefetch {
                o.insert("prefetch".into(), json!(p));
            }
            if let Some(n) = self.outstanding {
                o.insert("outstanding".into(), json!(n));
            }
            if let Some(n) = self.spread_pages {
                o.insert("spread_pages".into(), json!(n));
            }
            if let Some(l) = self.latency {
                o.insert("min_us".into(), json!(round3(l.min_us)));
                o.insert("median_us".into(), json!(round3(l.median_us)));
                o.insert("p99_us".into(), json!(round3(l.p99_us)));
                o.insert("samples".into(), json!(l.count));
            }
            if let Some((k, v)) = self.per_s {
                o.insert(k.into(), json!(v.round()));
            }
            if let Some(b) = self.mb_per_s {
                o.insert("mb_per_s".into(), json!(round3(b)));
            }
            println!("{v}");
        } else {
            let mut what = self.op.to_string();
            if let Some(p) = self.prefetch {
                what += if p { " +prefetch" } else { " no-prefetch" };
            }
            if let Some(p) = self.resident_pct {
                what += &format!(" {p}% resident");
            }
            if let Some(n) = self.outstanding {
                what += &format!(" x{n}");
            }
            if let Some(n) = self.spread_pages {
                what += &format!(" over {n} pages");
            }
            let lat = self
                .latency
                .map(|l| format!("min {:.2} / median {:.2} / p99 {:.2} us", l.min_us, l.median_us, l.p99_us))
                .unwrap_or_default();
            let rate = self.per_s.map(|(k, v)| format!("{v:.0} {}", k.trim_end_matches("_per_s"))).unwrap_or_default();
            let bw = self.mb_per_s.map(|b| format!("{b:.0} MB/s")).unwrap_or_default();
            println!("{:<5} {:<32} {:>3} thr  {lat} {rate} {bw}", self.transport, what, self.threads);
        }
    }
}

/// Runs the plan.
pub fn run(plan: &Plan) -> Result<(), String> {
    let key_text = ClusterKey::random_text().map_err(|e| e.to_string())?;
    let key = if plan.servers.is_empty() {
        ClusterKey::from_bytes(key_text.as_bytes()).map_err(|e| e.to_string())?
    } else {
        // Servers started elsewhere know their cluster's key; ours must match it.
        ClusterKey::from_env().map_err(|e| format!("--servers needs the servers' cluster key: {e}"))?
    };
    let mode = if plan.workers { "workers" } else { "faulting-thread" };
    if !plan.json {
        println!("mosaic-bench netram: faults served on the {mode}, {:.2} s per timed figure", plan.time.as_secs_f64());
    }
    let install = install_figure()?;
    install.print(plan.json, mode);
    for t in &plan.transports {
        let (_children, uris) = servers_for(t, plan, &key_text)?;
        eprintln!("[{t}] servers: {}", uris.join(", "));
        for f in transport_figures(t, &uris, &key, plan)? {
            f.print(plan.json, mode);
        }
        for f in fault_and_scan_figures(t, &uris, &key, plan)? {
            f.print(plan.json, mode);
        }
        for &pct in &plan.resident {
            eprintln!("[{t}] rmw at {pct}% resident");
            rmw_figure(t, &uris, &key, plan, pct)?.print(plan.json, mode);
        }
    }
    eprintln!("[local] rmw on ordinary memory");
    rmw_local(plan).print(plan.json, mode);
    Ok(())
}

/// The figures a DSM read miss is compared with, from one memory server over tcp in a child
/// process: the pager's install and the bare transport's 4 KiB page read (`mosaic-bench dsm`).
pub fn baselines(transports: &[String], time: Duration, json_out: bool) -> Result<(), String> {
    let plan = Plan {
        transports: transports.to_vec(),
        servers: Vec::new(),
        sim_link: "10gbe".into(),
        threads: Vec::new(),
        resident: Vec::new(),
        size: 64 << 20,
        rmw_size: 64 << 20,
        time,
        workers: true,
        json: json_out,
    };
    let key_text = ClusterKey::random_text().map_err(|e| e.to_string())?;
    let key = ClusterKey::from_bytes(key_text.as_bytes()).map_err(|e| e.to_string())?;
    install_figure()?.print(json_out, "workers");
    for t in transports {
        let (_children, uris) = servers_for(t, &plan, &key_text)?;
        for f in transport_figures(t, &uris, &key, &plan)? {
            f.print(json_out, "workers");
        }
    }
    Ok(())
}

fn servers_for(t: &str, plan: &Plan, key_text: &str) -> Result<(Vec<ChildServer>, Vec<String>), String> {
    let (children, uris) = if plan.servers.is_empty() {
        // One server: on a machine with few cores, every extra server's busy-polling thread
        // competes with the client for a CPU, which would measure the co-location and not the
        // fault path.
        let capacity = (plan.size.max(plan.rmw_size) * 2).to_string();
        let uri = match t {
            "tcp" | "sim" => "tcp://127.0.0.1:0".to_string(),
            "shm" => format!("shm://mosaic-bench-ram-{}-0", std::process::id()),
            other => return Err(format!("unknown transport {other:?}: expected tcp, shm or sim")),
        };
        let child = ChildServer::spawn(&["serve-ram", "--uri", &uri, "--capacity", &capacity], key_text, &uri)?;
        let uris = vec![child.uri.clone()];
        (vec![child], uris)
    } else {
        (Vec::new(), plan.servers.clone())
    };
    // `sim` shapes the link to each server, started here or given.
    let uris = if t == "sim" { uris.iter().map(|u| format!("sim://{}@{u}", plan.sim_link)).collect() } else { uris };
    Ok((children, uris))
}

fn config(uris: &[String], key: &ClusterKey, size: u64, budget: u64, plan: &Plan) -> NetRamConfig {
    let mut cfg = NetRamConfig::new(uris.to_vec(), key.clone(), size, budget);
    cfg.copies = 1;
    if plan.workers {
        cfg.fault_mode = FaultMode::Workers(1);
    }
    cfg.name = "bench".into();
    cfg
}

/// The pager's local install cost: one page copied into a fresh page of a registered region.
fn install_figure() -> Result<Figure, String> {
    struct Never;
    impl PageSource for Never {
        fn fill(&self, _: &Fault<'_>, _: &mut Page) -> Result<Filled, FillError> {
            Err(FillError::new("the install benchmark never faults"))
        }
    }
    let pages = 20_000u64;
    let region = Region::new(RegionConfig::new(pages), Never).map_err(|e| e.to_string())?;
    let page = [Page([7; PAGE_SIZE])];
    let mut s = Samples::with_capacity(20_000);
    for i in 0..pages {
        let t = Instant::now();
        region.install(i, &page).map_err(|e| e.to_string())?;
        s.push(t.elapsed());
    }
    let mut f = Figure::new("local", "install");
    f.latency = s.summary();
    Ok(f)
}

/// The memory server's GET (the request a fault sends) over the bare transport: one at a time,
/// over a few pages (in the server's cache) and over as many random pages as the fault figures
/// use (as a fault's GET finds them: mostly not in cache), and 64 in flight over each.
fn transport_figures(t: &str, uris: &[String], key: &ClusterKey, plan: &Plan) -> Result<Vec<Figure>, String> {
    let conn = connect(&uris[0], &ConnectOptions::new(key.clone())).map_err(|e| format!("{t}: {e}"))?;
    let client = [0x42u8; 16];
    conn.call(proto::OPEN, &proto::encode_open(&client, 60_000, &[0x24; proto::SECRET_LEN]))
        .map_err(|e| e.to_string())?;
    // Region 1: a few pages, read in a fixed stride; 64 in flight always ask for the same 64.
    let few = proto::MAX_BATCH as u64;
    let mut next = 0u64;
    let hot = GetPattern {
        region: 1,
        pages: few,
        one: &mut || {
            next = (next + 97) % few;
            next
        },
        stride: 3,
        advance: 0,
    };
    let (one, many) = get_figures(t, &conn, &client, plan, hot, (few, 64))?;
    // Region 2, as large as the fault figures' region: random single GETs, and 64 in flight
    // of consecutive pages sweeping it (the baselines faults and scans are compared with).
    let total = (plan.size / PAGE_SIZE as u64).max(1);
    let mut r = rng(3);
    let spread = GetPattern { region: 2, pages: total, one: &mut || r() % total, stride: 1, advance: 64 };
    let (spread_one, spread_many) = get_figures(t, &conn, &client, plan, spread, (total, total))?;
    let _ = conn.call(proto::CLOSE, &client);
    Ok(vec![one, spread_one, many, spread_many])
}

/// Which pages [`get_figures`] stores and reads: `pages` pages under `region`; single GETs of
/// page `one()`; batch `b` of 64 in flight asks for pages `(first_b + k * stride) % pages`, with
/// `first_b = b * advance`.
struct GetPattern<'a> {
    region: u64,
    pages: u64,
    one: &'a mut dyn FnMut() -> u64,
    stride: u64,
    advance: u64,
}

/// Stores `p.pages` pages, then times single GETs and batches of 64 in flight as `p` says;
/// `spread` labels the two figures with how many distinct pages each reads.
fn get_figures(
    t: &str,
    conn: &mosaic_transport::Connection,
    client: &[u8; 16],
    plan: &Plan,
    p: GetPattern<'_>,
    spread: (u64, u64),
) -> Result<(Figure, Figure), String> {
    let data = [6u8; PAGE_SIZE];
    let all: Vec<u64> = (0..p.pages).collect();
    for chunk in all.chunks(proto::MAX_BATCH) {
        let batch: Vec<(u64, &[u8; PAGE_SIZE])> = chunk.iter().map(|i| (*i, &data)).collect();
        conn.call(proto::PUT, &proto::encode_put(client, p.region, &batch)).map_err(|e| e.to_string())?;
    }
    let mut page = Page::boxed();
    let one_page = p.one;
    let (mut s, _) = crate::stats::time_loop(plan.time / 5, plan.time, 2_000_000, || {
        conn.call_page(proto::GET, &proto::encode_get(client, p.region, one_page()), &mut page)
    })
    .map_err(|e| e.to_string())?;
    let mut one = Figure::new(t, "read_page");
    one.latency = s.summary();
    one.outstanding = Some(1);
    one.spread_pages = Some(spread.0);
    let mut bufs = Page::vec(64);
    let mut first = 0u64;
    let (s, wall) = crate::stats::time_loop(plan.time / 5, plan.time, usize::MAX, || {
        let reqs: Vec<[u8; 32]> =
            (0..64).map(|k| proto::encode_get(client, p.region, (first + k * p.stride) % p.pages)).collect();
        first = (first + p.advance) % p.pages;
        let mut calls: Vec<(&[u8], &mut Page)> = reqs.iter().map(|r| &r[..]).zip(bufs.iter_mut()).collect();
        conn.call_pages(proto::GET, &mut calls)
    })
    .map_err(|e| e.to_string())?;
    let mut many = Figure::new(t, "read_page");
    many.outstanding = Some(64);
    many.spread_pages = Some(spread.1);
    many.mb_per_s = Some(count_f64(s.len() * 64 * PAGE_SIZE) / wall.as_secs_f64() / 1e6);
    Ok((one, many))
}

/// Fills every page of `ram` with data and waits until the evictor has pushed nearly all of it
/// to the servers.
fn populate(ram: &NetRam) {
    let words = ram.len() / 8;
    // SAFETY: the region is mapped for ram.len() bytes while `ram` lives.
    let w = unsafe { std::slice::from_raw_parts_mut(ram.as_ptr().cast::<u64>(), words) };
    for (i, x) in w.iter_mut().enumerate().step_by(PAGE_SIZE / 8) {
        *x = i as u64;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let budget_pages = 512;
    while ram.stats().resident > budget_pages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Makes every page remote: shrinks the budget to the minimum, waits for the evictor, then
/// (if `roomy`) raises it to the whole region so the next figure runs without eviction.
fn make_remote(ram: &NetRam, roomy: bool) {
    let min = mosaic_netram::MIN_BUDGET_PAGES * PAGE_SIZE as u64;
    let _ = ram.set_resident_budget(min);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ram.stats().resident > mosaic_netram::MIN_BUDGET_PAGES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    if roomy {
        let _ = ram.set_resident_budget(ram.len() as u64 + (16 << 20));
    }
}

/// A cheap per-thread random sequence.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn touch(ram: &NetRam, page: u64) -> u8 {
    // SAFETY: `page` is below the region's page count; reading one byte faults it in.
    unsafe { std::ptr::read_volatile(ram.as_ptr().add(usize::try_from(page).unwrap_or(0) * PAGE_SIZE)) }
}

fn fault_and_scan_figures(t: &str, uris: &[String], key: &ClusterKey, plan: &Plan) -> Result<Vec<Figure>, String> {
    let mut out = Vec::new();
    let ram = NetRam::new(config(uris, key, plan.size, 1 << 20, plan)).map_err(|e| e.to_string())?;
    let pages = (ram.len() / PAGE_SIZE) as u64;
    eprintln!("[{t}] populating {} MiB", plan.size >> 20);
    populate(&ram);
    ram.set_prefetch(false);

    // Latency of single faults, in random order, with no eviction running (eviction is part of
    // the throughput figures below).
    eprintln!("[{t}] fault latency");
    make_remote(&ram, true);
    let mut next = rng(7);
    let mut s = Samples::with_capacity(100_000);
    let end = Instant::now() + plan.time;
    while Instant::now() < end {
        let p = next() % pages;
        let before = ram.stats().fetched;
        let t0 = Instant::now();
        touch(&ram, p);
        let d = t0.elapsed();
        if ram.stats().fetched > before {
            s.push(d);
        }
    }
    let mut f = Figure::new(t, "fault");
    f.latency = s.summary();
    f.prefetch = Some(false);
    out.push(f);

    // Faults per second with several threads.
    let ram = Arc::new(ram);
    // Steady state: pages cycle through a 1 MiB budget, so eviction runs alongside.
    make_remote(&ram, false);
    let _ = ram.set_resident_budget(1 << 20);
    for &threads in &plan.threads {
        eprintln!("[{t}] faults/s with {threads} threads");
        let stop = Arc::new(AtomicBool::new(false));
        let before = ram.stats().fetched;
        let start = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                let (ram, stop) = (ram.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut next = rng(k as u64 * 7919 + 1);
                    while !stop.load(Ordering::Relaxed) {
                        touch(&ram, next() % pages);
                    }
                })
            })
            .collect();
        std::thread::sleep(plan.time);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.join();
        }
        let faults = ram.stats().fetched - before;
        let mut f = Figure::new(t, "fault");
        f.threads = threads;
        f.prefetch = Some(false);
        f.per_s =
            Some(("faults_per_s", count_f64(usize::try_from(faults).unwrap_or(0)) / start.elapsed().as_secs_f64()));
        out.push(f);
    }

    // Sequential scans of the whole region, without and with prefetch.
    for prefetch in [false, true] {
        eprintln!("[{t}] sequential scan, prefetch {prefetch}");
        // A scan of data larger than its budget: eviction runs alongside.
        make_remote(&ram, false);
        let _ = ram.set_resident_budget(1 << 20);
        ram.set_prefetch(prefetch);
        let sum = AtomicU64::new(0);
        // Whole scans, again and again for the figure's time (one scan of 64 MiB takes only
        // 40-200 ms, too short to average out this machine's noise). Each scan finds its pages
        // remote: the previous one evicted them as it went.
        let start = Instant::now();
        let mut scans = 0u64;
        while scans == 0 || start.elapsed() < plan.time {
            for p in 0..pages {
                sum.fetch_add(u64::from(touch(&ram, p)), Ordering::Relaxed);
            }
            scans += 1;
        }
        let wall = start.elapsed();
        let mut f = Figure::new(t, "scan");
        f.prefetch = Some(prefetch);
        f.mb_per_s = Some(count_f64(ram.len()) * scans as f64 / wall.as_secs_f64() / 1e6);
        out.push(f);
    }
    Ok(out)
}

/// The read-modify-write loop: random 8-byte updates over `w` for `time`; returns ops/s.
pub fn rmw_ops_per_s(w: &mut [u64], time: Duration) -> f64 {
    let mut next = rng(99);
    let n = w.len() as u64;
    let mut ops = 0usize;
    let start = Instant::now();
    while start.elapsed() < time {
        for _ in 0..256 {
            let i = usize::try_from(next() % n).unwrap_or(0);
            w[i] = w[i].wrapping_mul(31).wrapping_add(1);
        }
        ops += 256;
    }
    count_f64(ops) / start.elapsed().as_secs_f64()
}

fn rmw_figure(t: &str, uris: &[String], key: &ClusterKey, plan: &Plan, pct: u64) -> Result<Figure, String> {
    let budget = (plan.rmw_size * pct / 100).max(mosaic_netram::MIN_BUDGET_PAGES * PAGE_SIZE as u64);
    // Headroom over the working set at 100%, so "all resident" really is.
    let budget = if pct >= 100 { budget + (4 << 20) } else { budget };
    let ram = NetRam::new(config(uris, key, plan.rmw_size, budget, plan)).map_err(|e| e.to_string())?;
    let words = ram.len() / 8;
    // SAFETY: the region is mapped for ram.len() bytes while `ram` lives.
    let w = unsafe { std::slice::from_raw_parts_mut(ram.as_ptr().cast::<u64>(), words) };
    fill_random(w);
    let rate = rmw_ops_per_s(w, plan.time);
    let mut f = Figure::new(t, "rmw");
    f.resident_pct = Some(pct);
    f.per_s = Some(("ops_per_s", rate));
    Ok(f)
}

/// Fills `w` with incompressible data (so kernel swap to zram gets no help from compression).
pub fn fill_random(w: &mut [u64]) {
    let mut next = rng(0xDA7A);
    for x in w.iter_mut() {
        *x = next();
    }
}

fn rmw_local(plan: &Plan) -> Figure {
    let mut w: Vec<u64> = vec![0; usize::try_from(plan.rmw_size / 8).unwrap_or(0)];
    fill_random(&mut w);
    let rate = rmw_ops_per_s(&mut w, plan.time);
    let mut f = Figure::new("local", "rmw");
    f.resident_pct = Some(100);
    f.per_s = Some(("ops_per_s", rate));
    f
}
