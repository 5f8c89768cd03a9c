//! The agent's Prometheus endpoint (`mosaicd --metrics HOST:PORT`): `GET /metrics` answers the
//! node's figures in the text exposition format: its load vector, what it knows of the cluster
//! (members, each one's load and the age of that figure), the processes it hosts, the DSM jobs
//! meeting there, its memory server, and what its gossip sent. Plain HTTP/1.0 on a thread of its own: one request per
//! connection, bounded reads, nothing else served.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::gossip::ClusterView;
use crate::info::{GossipStats, LoadVector};

/// What the endpoint reports, gathered when asked.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The cluster as the node knows it (`None`: it does not gossip).
    pub view: Option<ClusterView>,
    /// What its gossip sent.
    pub gossip: Option<GossipStats>,
    /// Processes that moved in and run here.
    pub hosted: u64,
    /// Its memory server's capacity and use, in pages, if it has one.
    pub memory_pages: Option<(u64, u64)>,
    /// Whether its memory server asks clients to move their pages elsewhere.
    pub ushering: bool,
    /// DSM jobs whose nodes are meeting here now.
    pub dsm_jobs_meeting: u64,
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

fn node_gauges(out: &mut String, name: &str, help: &str, nodes: &[LoadVector], f: impl Fn(&LoadVector) -> f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for v in nodes {
        let node = v.node.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = writeln!(out, "{name}{{node=\"{node}\"}} {}", f(v));
    }
}

/// The exposition text of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    if let Some(v) = &s.view {
        let o = &v.own;
        gauge(
            &mut out,
            "mosaic_node_load",
            "Threads runnable on this node's CPUs (smoothed).",
            f64::from(o.load) / 100.0,
        );
        gauge(&mut out, "mosaic_node_cpus", "CPUs of this node.", f64::from(o.cpus));
        gauge(&mut out, "mosaic_node_busy_ratio", "Share of CPU time busy lately.", f64::from(o.busy) / 10_000.0);
        gauge(&mut out, "mosaic_node_free_memory_bytes", "Memory available for new work.", o.free_memory as f64);
        gauge(&mut out, "mosaic_node_total_memory_bytes", "All memory.", o.total_memory as f64);
        gauge(
            &mut out,
            "mosaic_node_memory_pressure_ratio",
            "Share of the last 10 s some task stalled on memory.",
            f64::from(o.pressure) / 10_000.0,
        );
        gauge(&mut out, "mosaic_node_free_slots", "Processes this node would still take.", f64::from(o.free_slots));
        gauge(&mut out, "mosaic_cluster_members", "Other nodes known alive.", v.members.len() as f64);
        node_gauges(&mut out, "mosaic_cluster_node_load", "Another node's load, as last heard.", &v.window, |w| {
            f64::from(w.load) / 100.0
        });
        node_gauges(
            &mut out,
            "mosaic_cluster_node_free_memory_bytes",
            "Another node's free memory, as last heard.",
            &v.window,
            |w| w.free_memory as f64,
        );
        node_gauges(
            &mut out,
            "mosaic_cluster_info_age_seconds",
            "Age of what this node holds of another.",
            &v.window,
            |w| w.age.as_secs_f64(),
        );
    }
    if let Some(g) = s.gossip {
        let _ = writeln!(
            out,
            "# HELP mosaic_gossip_frames_sent_total Gossip frames sent.\n# TYPE mosaic_gossip_frames_sent_total counter\nmosaic_gossip_frames_sent_total {}",
            g.frames_sent
        );
        let _ = writeln!(
            out,
            "# HELP mosaic_gossip_bytes_sent_total Gossip bytes sent.\n# TYPE mosaic_gossip_bytes_sent_total counter\nmosaic_gossip_bytes_sent_total {}",
            g.bytes_sent
        );
    }
    gauge(&mut out, "mosaic_hosted_processes", "Processes that moved in and run here.", s.hosted as f64);
    gauge(
        &mut out,
        "mosaic_dsm_jobs_meeting",
        "DSM jobs whose nodes are meeting here (agent rendezvous).",
        s.dsm_jobs_meeting as f64,
    );
    if let Some((capacity, used)) = s.memory_pages {
        gauge(
            &mut out,
            "mosaic_memserver_capacity_bytes",
            "RAM this node donates to network RAM.",
            (capacity * 4096) as f64,
        );
        gauge(&mut out, "mosaic_memserver_used_bytes", "Of it, holding pages.", (used * 4096) as f64);
        gauge(
            &mut out,
            "mosaic_memserver_ushering",
            "1 while this node is short of memory and asks clients to move their pages elsewhere.",
            f64::from(u8::from(s.ushering)),
        );
    }
    out
}

/// Serves `GET /metrics` on `listener` until `stop`, each answer from `snapshot`.
pub fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    snapshot: impl Fn() -> Snapshot + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("mosaic-metrics".into()).spawn(move || {
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = answer(stream, &snapshot) {
                        log::debug!("metrics: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    log::warn!("metrics: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })
}

/// Reads one request (at most 8 KiB, within 2 s in all: a client trickling bytes cannot hold the
/// endpoint) and answers it.
fn answer(mut stream: TcpStream, snapshot: &dyn Fn() -> Snapshot) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && !req.windows(2).any(|w| w == b"\n\n") && req.len() < 8192 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "a request slower than 2 s"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        ("200 OK", render(&snapshot()))
    } else {
        ("404 Not Found", "only GET /metrics is served here\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_figure_and_each_node() {
        let mut other = LoadVector::empty("tcp://10.0.0.2:7070");
        other.load = 250;
        other.age = Duration::from_millis(1500);
        let s = Snapshot {
            view: Some(ClusterView {
                own: LoadVector { load: 100, cpus: 4, ..LoadVector::empty("tcp://10.0.0.1:7070") },
                members: vec!["tcp://10.0.0.2:7070".into()],
                window: vec![other],
            }),
            gossip: Some(GossipStats { frames_sent: 7, bytes_sent: 900, rejected: 0 }),
            hosted: 2,
            memory_pages: Some((1024, 10)),
            ushering: true,
            dsm_jobs_meeting: 3,
        };
        let t = render(&s);
        for want in [
            "mosaic_node_load 1\n",
            "mosaic_node_cpus 4\n",
            "mosaic_cluster_members 1\n",
            "mosaic_cluster_node_load{node=\"tcp://10.0.0.2:7070\"} 2.5\n",
            "mosaic_cluster_info_age_seconds{node=\"tcp://10.0.0.2:7070\"} 1.5\n",
            "mosaic_gossip_frames_sent_total 7\n",
            "mosaic_hosted_processes 2\n",
            "mosaic_dsm_jobs_meeting 3\n",
            "mosaic_memserver_capacity_bytes 4194304\n",
            "mosaic_memserver_ushering 1\n",
            "# TYPE mosaic_gossip_bytes_sent_total counter\n",
        ] {
            assert!(t.contains(want), "no {want:?} in\n{t}");
        }
    }

    #[test]
    fn the_endpoint_answers_get_metrics_and_nothing_else() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let t = serve(l, stop.clone(), || Snapshot { hosted: 3, ..Snapshot::default() }).unwrap();
        let get = |path: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("/metrics");
        assert!(ok.starts_with("HTTP/1.0 200 OK") && ok.contains("mosaic_hosted_processes 3"), "{ok}");
        assert!(get("/").starts_with("HTTP/1.0 404"));
        stop.store(true, Ordering::Release);
        t.join().unwrap();
    }
}
