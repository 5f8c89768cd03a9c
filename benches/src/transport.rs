//! `mosaic-bench transport`: latency and bandwidth of every transport, beside the peer tools.

use std::time::{Duration, Instant};

use mosaic_transport::{connect, ClusterKey, ConnectOptions, Connection, Page, Protection, WaitPolicy};
use serde_json::json;

use crate::stats::round3;

use crate::peer::{self, PeerFigure};
use crate::serve::{ChildServer, ECHO, SINK};
use crate::stats::{count_f64, ns_to_f64, time_loop, Summary};

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Transports to measure: tcp, shm, sim, rdma.
    pub transports: Vec<String>,
    /// Ping-pong message sizes.
    pub sizes: Vec<usize>,
    /// Outstanding page reads to measure.
    pub outstanding: Vec<usize>,
    /// Timed seconds per figure.
    pub time: Duration,
    /// Spin-then-sleep (false) or pure blocking (true).
    pub blocking: bool,
    /// Run the peer tools too.
    pub peer: bool,
    /// The link preset for `sim`.
    pub sim_link: String,
    /// Protections of the frames to measure each transport with (`None`: automatic).
    pub protections: Vec<Option<Protection>>,
    /// One JSON object per line instead of a table.
    pub json: bool,
}

/// One measured figure.
#[derive(Clone, Debug)]
pub struct Figure {
    transport: String,
    protection: Protection,
    op: &'static str,
    size: usize,
    outstanding: usize,
    latency: Option<Summary>,
    mb_per_s: Option<f64>,
    pages_per_s: Option<f64>,
    peer: Option<PeerFigure>,
}

impl Figure {
    fn new(transport: &str, op: &'static str, size: usize, outstanding: usize) -> Figure {
        Figure {
            transport: transport.into(),
            protection: Protection::None,
            op,
            size,
            outstanding,
            latency: None,
            mb_per_s: None,
            pages_per_s: None,
            peer: None,
        }
    }

    /// Ours divided by the peer's: for latency lower is better, for bandwidth higher.
    fn ratio(&self) -> Option<f64> {
        let p = self.peer.as_ref()?;
        match (self.latency, p.median_us, self.mb_per_s, p.mb_per_s) {
            (Some(l), Some(pm), _, _) => Some(l.median_us / pm),
            (_, _, Some(ours), Some(theirs)) => Some(ours / theirs),
            _ => None,
        }
    }

    fn to_json(&self, wait: &str) -> serde_json::Value {
        let mut v = json!({
            "bench": "transport",
            "transport": self.transport,
            "protection": protection_name(self.protection),
            "op": self.op,
            "size": self.size,
            "outstanding": self.outstanding,
            "wait": wait,
        });
        let o = v.as_object_mut().expect("object");
        if let Some(l) = self.latency {
            o.insert("min_us".into(), json!(round3(l.min_us)));
            o.insert("median_us".into(), json!(round3(l.median_us)));
            o.insert("p99_us".into(), json!(round3(l.p99_us)));
            o.insert("samples".into(), json!(l.count));
        }
        if let Some(b) = self.mb_per_s {
            o.insert("mb_per_s".into(), json!(round3(b)));
        }
        if let Some(p) = self.pages_per_s {
            o.insert("pages_per_s".into(), json!(p.round()));
        }
        if let Some(p) = &self.peer {
            o.insert("peer".into(), json!(p.tool));
            if let Some(m) = p.median_us {
                o.insert("peer_median_us".into(), json!(round3(m)));
            }
            if let Some(b) = p.mb_per_s {
                o.insert("peer_mb_per_s".into(), json!(round3(b)));
            }
            if let Some(r) = self.ratio() {
                o.insert("ratio".into(), json!(round3(r)));
            }
        }
        v
    }

    fn table_row(&self) -> String {
        let f = |x: Option<f64>, w: usize| x.map_or(format!("{:>w$}", "-"), |v| format!("{v:>w$.2}"));
        let peer = match &self.peer {
            Some(p) => format!(
                "{} {} (x{})",
                p.tool,
                p.median_us
                    .map(|m| format!("{m:.2} us"))
                    .or(p.mb_per_s.map(|b| format!("{b:.0} MB/s")))
                    .unwrap_or_default(),
                self.ratio().map_or("?".into(), |r| format!("{r:.2}"))
            ),
            None => String::new(),
        };
        format!(
            "{:<5} {:<9} {:<10} {:>7} {:>4} {} {} {} {} {}  {}",
            self.transport,
            protection_name(self.protection),
            self.op,
            human_size(self.size),
            self.outstanding,
            f(self.latency.map(|l| l.min_us), 9),
            f(self.latency.map(|l| l.median_us), 9),
            f(self.latency.map(|l| l.p99_us), 9),
            f(self.mb_per_s, 9),
            f(self.pages_per_s, 10),
            peer
        )
    }
}

fn human_size(n: usize) -> String {
    if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

const TABLE_HEADER: &str =
    "trans frames    op            size  out    min_us median_us    p99_us   MB/s     pages/s  peer (ours/peer)";

/// The name of a protection, as `--protection` takes it and JSON reports it.
fn protection_name(p: Protection) -> &'static str {
    match p {
        Protection::Encrypt => "encrypt",
        Protection::Integrity => "integrity",
        _ => "none",
    }
}

/// Pages in the benchmark server's window (16 MiB).
const WINDOW_PAGES: u64 = 4096;
/// Calls in flight in the streaming test.
const STREAM_BATCH: usize = 16;
/// Message size of the streaming test.
const STREAM_SIZE: usize = 64 << 10;

struct Progress {
    done: usize,
    total: usize,
    quiet: bool,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        if !self.quiet {
            eprintln!("[{}/{}] {what}", self.done, self.total);
        }
    }
}

/// Runs the plan and prints the figures.
pub fn run(plan: &Plan) -> Result<(), String> {
    // A fresh key per run, handed to the child servers through their environment.
    let key_text = ClusterKey::random_text().map_err(|e| e.to_string())?;
    let key = ClusterKey::from_bytes(key_text.as_bytes()).map_err(|e| e.to_string())?;
    let policy = if plan.blocking { WaitPolicy::blocking() } else { WaitPolicy::DEFAULT };
    let wait = if plan.blocking { "blocking" } else { "spin" };
    let per_transport = (plan.sizes.len() + 1 + plan.outstanding.len()) * plan.protections.len();
    let mut progress = Progress { done: 0, total: per_transport * plan.transports.len(), quiet: false };
    if !plan.json {
        println!(
            "mosaic-bench transport: wait={wait}, {:.2} s per figure, round trips unless noted",
            plan.time.as_secs_f64()
        );
        println!("{TABLE_HEADER}");
    }
    let emit = |f: &Figure| {
        if plan.json {
            println!("{}", f.to_json(wait));
        } else {
            println!("{}", f.table_row());
        }
    };
    for t in &plan.transports {
        let (_server, uri) = match start_for(t, &key_text, plan) {
            Ok(x) => x,
            Err(reason) => {
                eprintln!("{t}: skipped: {reason}");
                progress.done += per_transport;
                continue;
            }
        };
        // The peer tools run once per transport, beside the first protection's figures; the
        // other protections' figures are compared with the same peer figures, from the same run.
        let mut peers: std::collections::HashMap<(&'static str, usize, usize), PeerFigure> = Default::default();
        for (k, wish) in plan.protections.iter().enumerate() {
            let mut opts = ConnectOptions::new(key.clone()).policy(policy).timeout(Duration::from_secs(30));
            opts.protection = *wish;
            let conn = connect(&uri, &opts).map_err(|e| format!("{t}: {}", mosaic_transport::error_chain(&e)))?;
            let prot = conn.protection();
            let mut with_peer = |mut f: Figure, peer: &dyn Fn() -> Option<PeerFigure>| {
                f.protection = prot;
                if plan.peer {
                    let key = (f.op, f.size, f.outstanding);
                    if k == 0 {
                        if let Some(p) = peer() {
                            peers.insert(key, p);
                        }
                    }
                    f.peer = peers.get(&key).cloned();
                }
                emit(&f);
            };
            let label = protection_name(prot);
            for &size in &plan.sizes {
                progress.step(&format!("{t} ({label}) pingpong {}", human_size(size)));
                with_peer(pingpong(&conn, t, size, plan)?, &|| peer_pingpong(t, size, plan));
            }
            progress.step(&format!("{t} ({label}) stream {}", human_size(STREAM_SIZE)));
            with_peer(stream(&conn, t, plan)?, &|| peer_stream(t, plan));
            if plan.peer && t == "shm" && k == 0 {
                memcpy_figures(plan.time).iter().for_each(&emit);
            }
            for &n in &plan.outstanding {
                progress.step(&format!("{t} ({label}) read_page x{n}"));
                // sockperf's 4 KiB ping-pong is the like-for-like peer of one outstanding read.
                let peer =
                    || if t == "tcp" && n == 1 { peer_pingpong(t, mosaic_transport::PAGE_SIZE, plan) } else { None };
                with_peer(read_pages(&conn, t, n, plan)?, &peer);
            }
        }
    }
    Ok(())
}

/// Starts the server a transport is measured against; returns it and the client URI.
fn start_for(t: &str, key_text: &str, plan: &Plan) -> Result<(Option<ChildServer>, String), String> {
    match t {
        "tcp" => {
            let s = ChildServer::start("tcp://127.0.0.1:0", key_text, WINDOW_PAGES, plan.blocking)?;
            let uri = s.uri.clone();
            Ok((Some(s), uri))
        }
        "shm" => {
            let name = format!("shm://mosaic-bench-{}", std::process::id());
            let s = ChildServer::start(&name, key_text, WINDOW_PAGES, plan.blocking)?;
            let uri = s.uri.clone();
            Ok((Some(s), uri))
        }
        "sim" => {
            let s = ChildServer::start("tcp://127.0.0.1:0", key_text, WINDOW_PAGES, plan.blocking)?;
            let uri = format!("sim://{}@{}", plan.sim_link, s.uri);
            Ok((Some(s), uri))
        }
        "rdma" if cfg!(feature = "rdma") => {
            let s = ChildServer::start("rdma://127.0.0.1:0", key_text, WINDOW_PAGES, plan.blocking)?;
            let uri = s.uri.clone();
            Ok((Some(s), uri))
        }
        "rdma" => Err("built without RDMA (cargo build --release -p mosaic-bench --features rdma)".into()),
        other => Err(format!("unknown transport {other:?}")),
    }
}

fn call_err(t: &str) -> impl Fn(mosaic_transport::CallError) -> String + '_ {
    move |e| format!("{t}: {e}")
}

fn max_samples(size: usize) -> usize {
    if size >= 64 << 10 {
        200_000
    } else {
        2_000_000
    }
}

fn pingpong(conn: &Connection, t: &str, size: usize, plan: &Plan) -> Result<Figure, String> {
    let msg = vec![0x5Au8; size];
    let (mut s, _) = time_loop(plan.time / 5, plan.time, max_samples(size), || {
        let r = conn.call(ECHO, &msg)?;
        debug_assert_eq!(r.len(), size);
        Ok(())
    })
    .map_err(call_err(t))?;
    let mut f = Figure::new(t, "pingpong", size, 1);
    f.latency = s.summary();
    Ok(f)
}

fn stream(conn: &Connection, t: &str, plan: &Plan) -> Result<Figure, String> {
    let msg = vec![0xA5u8; STREAM_SIZE];
    let batch: Vec<&[u8]> = (0..STREAM_BATCH).map(|_| &msg[..]).collect();
    let (s, wall) = time_loop(plan.time / 5, plan.time, usize::MAX, || conn.call_batch(SINK, &batch).map(|_| ()))
        .map_err(call_err(t))?;
    let bytes = s.len() * STREAM_BATCH * STREAM_SIZE;
    let mut f = Figure::new(t, "stream", STREAM_SIZE, STREAM_BATCH);
    f.mb_per_s = Some(count_f64(bytes) / wall.as_secs_f64() / 1e6);
    Ok(f)
}

fn read_pages(conn: &Connection, t: &str, n: usize, plan: &Plan) -> Result<Figure, String> {
    let mut bufs = Page::vec(n);
    let mut next: u64 = 0;
    let (mut s, wall) = time_loop(plan.time / 5, plan.time, max_samples(0), || {
        let mut reads: Vec<(u64, &mut Page)> = bufs
            .iter_mut()
            .map(|b| {
                // A stride that visits the whole window: no two reads of a batch hit one page.
                next = (next + 97) % WINDOW_PAGES;
                (next, b)
            })
            .collect();
        conn.read_pages(&mut reads)
    })
    .map_err(call_err(t))?;
    let batches = s.len();
    let mut f = Figure::new(t, "read_page", mosaic_transport::PAGE_SIZE, n);
    f.latency = s.summary();
    f.pages_per_s = Some(count_f64(batches * n) / wall.as_secs_f64());
    Ok(f)
}

fn peer_secs(plan: &Plan) -> u32 {
    u32::try_from(plan.time.as_secs()).unwrap_or(1).max(1)
}

fn peer_pingpong(t: &str, size: usize, plan: &Plan) -> Option<PeerFigure> {
    let r = match t {
        "tcp" if peer::installed("sockperf") => {
            peer::sockperf_pingpong(size, peer_secs(plan), !plan.blocking).map(|x| x.0)
        }
        "tcp" => Err("sockperf is not installed (apt-get install sockperf)".into()),
        "shm" if plan.blocking => Err("ucx_perftest has no blocking mode to compare with".into()),
        "shm" if peer::installed("ucx_perftest") => {
            peer::ucx_pingpong(size, if size >= 64 << 10 { 20_000 } else { 200_000 })
        }
        "shm" => Err("ucx_perftest is not installed (apt-get install ucx-utils)".into()),
        _ => return None,
    };
    r.map_err(|e| eprintln!("{t}: peer skipped: {e}")).ok()
}

fn peer_stream(t: &str, plan: &Plan) -> Option<PeerFigure> {
    let r = match t {
        "shm" if plan.blocking => Err("ucx_perftest has no blocking mode to compare with".into()),
        "shm" if peer::installed("ucx_perftest") => peer::ucx_bandwidth(STREAM_SIZE, 20_000),
        "shm" => Err("ucx_perftest is not installed (apt-get install ucx-utils)".into()),
        _ => return None,
    };
    r.map_err(|e| eprintln!("{t}: peer skipped: {e}")).ok()
}

/// Single-thread memcpy of 64 KiB blocks over `span` bytes (pre-touched), as reference lines
/// beside the shm stream: a 1 MiB span stays in cache like the shm ring, a 256 MiB span does not.
fn memcpy_figures(time: Duration) -> Vec<Figure> {
    [1usize << 20, 256 << 20]
        .into_iter()
        .map(|span| {
            let mut f = Figure::new("local", "memcpy", span, 0);
            f.mb_per_s = Some(memcpy_mb_per_s(span, time));
            f
        })
        .collect()
}

/// Single-thread memcpy bandwidth: 64 KiB blocks copied across `span` bytes, repeatedly.
pub fn memcpy_mb_per_s(span: usize, time: Duration) -> f64 {
    let src = vec![0x11u8; span];
    let mut dst = vec![0x22u8; span]; // written, so every page is touched before timing
    let blocks = span / STREAM_SIZE;
    let start = Instant::now();
    let mut copies = 0usize;
    while start.elapsed() < time {
        for i in 0..blocks {
            let r = i * STREAM_SIZE..(i + 1) * STREAM_SIZE;
            dst[r.clone()].copy_from_slice(&src[r]);
            copies += 1;
        }
        std::hint::black_box(&mut dst);
    }
    let secs = ns_to_f64(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)) / 1e9;
    count_f64(copies * STREAM_SIZE) / secs / 1e6
}
