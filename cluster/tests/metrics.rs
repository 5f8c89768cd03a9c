//! `mosaicd --metrics`: the agent's Prometheus endpoint answers its figures over HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

#[test]
fn the_agent_serves_its_figures_to_prometheus() {
    let mut agent = Command::new(env!("CARGO_BIN_EXE_mosaicd"))
        .args(["--listen", "tcp://127.0.0.1:0", "--memory", "64M", "--metrics", "127.0.0.1:0"])
        .env("MOSAIC_CLUSTER_KEY", "metrics-test-cluster-key-0123456789")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    let url = second.strip_prefix("mosaicd: metrics at http://").unwrap_or_else(|| panic!("{first} / {second}"));
    let addr = url.trim_end_matches("/metrics").to_string();
    // The first load measure comes within a second.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
    for want in [
        "mosaic_node_cpus ",
        "mosaic_node_free_memory_bytes ",
        "mosaic_cluster_members 0",
        "mosaic_memserver_capacity_bytes 67108864",
    ] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
}
