//! The peer tools measured beside Mosaic in the same run: sockperf (tcp) and ucx_perftest (shm).
//!
//! - `sockperf ping-pong --full-rtt` prints round-trip percentiles; with `--nonblocked` on both
//!   ends it busy-polls, which is what Mosaic's default spin-then-sleep policy is compared with.
//! - `ucx_perftest -t tag_lat` prints *one-way* latency (half the round trip); it is doubled here.
//!   `UCX_TLS=posix,self` restricts UCX to its shared-memory transport.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A figure from a peer tool.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerFigure {
    /// Which tool, with its mode.
    pub tool: String,
    /// Round-trip median in microseconds, for latency figures.
    pub median_us: Option<f64>,
    /// Bandwidth in MB/s, for bandwidth figures.
    pub mb_per_s: Option<f64>,
}

/// True if `tool` is on the PATH.
pub fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn wait_for_port(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("peer server did not listen on port {port}"))
}

/// Parses `---> percentile 50.000 =    9.053` style lines of sockperf.
fn sockperf_value(out: &str, key: &str) -> Option<f64> {
    out.lines().find(|l| l.contains(key)).and_then(|l| l.rsplit('=').next()).and_then(|v| v.trim().parse().ok())
}

/// sockperf's smallest message.
pub const SOCKPERF_MIN: usize = 14;
/// sockperf's largest TCP message (it closes the connection on 64 KiB).
pub const SOCKPERF_MAX: usize = 65_000;

/// sockperf TCP ping-pong round trip of `size` bytes for `secs` seconds; `busy` polls both ends.
pub fn sockperf_pingpong(size: usize, secs: u32, busy: bool) -> Result<(PeerFigure, f64, f64), String> {
    if !(SOCKPERF_MIN..=SOCKPERF_MAX).contains(&size) {
        return Err(format!("sockperf sends {SOCKPERF_MIN} to {SOCKPERF_MAX} bytes, not {size}"));
    }
    let port = free_port()?.to_string();
    let mut srv = Command::new("sockperf");
    srv.args(["server", "--tcp", "-i", "127.0.0.1", "-p", &port]);
    if busy {
        srv.arg("--nonblocked");
    }
    let _srv =
        KillOnDrop(srv.stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| format!("sockperf: {e}"))?);
    wait_for_port(port.parse().unwrap_or(0))?;
    let mut cli = Command::new("sockperf");
    cli.args(["ping-pong", "--tcp", "-i", "127.0.0.1", "-p", &port, "-m", &size.to_string(), "-t", &secs.to_string()]);
    cli.arg("--full-rtt");
    if busy {
        cli.arg("--nonblocked");
    }
    let out = cli.output().map_err(|e| format!("sockperf: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let median = sockperf_value(&text, "percentile 50.000")
        .ok_or_else(|| format!("sockperf printed no median: {}", tail(&text)))?;
    let min = sockperf_value(&text, "<MIN> observation").unwrap_or(f64::NAN);
    let p99 = sockperf_value(&text, "percentile 99.000").unwrap_or(f64::NAN);
    let tool = if busy { "sockperf --nonblocked" } else { "sockperf" };
    Ok((PeerFigure { tool: tool.into(), median_us: Some(median), mb_per_s: None }, min, p99))
}

/// Parses ucx_perftest's `Final:` line: iterations, then latency 50%, avg, overall, then
/// bandwidth avg, overall, then message rate avg, overall.
fn ucx_final(out: &str) -> Option<Vec<f64>> {
    let line = out.lines().find(|l| l.trim_start().starts_with("Final:"))?;
    line.split_whitespace().skip(1).map(|v| v.parse().ok()).collect()
}

/// Runs one ucx_perftest test (`tag_lat` or `tag_bw`) over shared memory; returns `Final:`.
///
/// The ucx_perftest server serves exactly one client, so readiness cannot be probed with a
/// connection: the client is retried until the server listens.
fn ucx_run(test: &str, size: usize, iters: usize) -> Result<Vec<f64>, String> {
    let port = free_port()?.to_string();
    let _srv = KillOnDrop(
        Command::new("ucx_perftest")
            .args(["-p", &port])
            .env("UCX_TLS", "posix,self")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("ucx_perftest: {e}"))?,
    );
    let mut last = String::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(150));
        let out = Command::new("ucx_perftest")
            .args(["127.0.0.1", "-p", &port, "-t", test, "-s", &size.to_string(), "-n", &iters.to_string()])
            .env("UCX_TLS", "posix,self")
            .output()
            .map_err(|e| format!("ucx_perftest: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if let Some(v) = ucx_final(&text).filter(|v| v.len() >= 7) {
            return Ok(v);
        }
        last = text;
    }
    Err(format!("ucx_perftest printed no Final line: {}", tail(&last)))
}

/// The last three lines of a tool's output, for an error message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// ucx_perftest tag_lat over posix shared memory: the round trip (twice the one-way median).
pub fn ucx_pingpong(size: usize, iters: usize) -> Result<PeerFigure, String> {
    let f = ucx_run("tag_lat", size, iters)?;
    Ok(PeerFigure { tool: "ucx_perftest posix".into(), median_us: Some(2.0 * f[1]), mb_per_s: None })
}

/// ucx_perftest tag_bw over posix shared memory: bandwidth in MB/s (UCX prints MiB/s;
/// converted to 10^6 bytes per second like every Mosaic figure).
pub fn ucx_bandwidth(size: usize, iters: usize) -> Result<PeerFigure, String> {
    let f = ucx_run("tag_bw", size, iters)?;
    Ok(PeerFigure { tool: "ucx_perftest posix".into(), median_us: None, mb_per_s: Some(f[5] * 1.048_576) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf_and_ucx_output() {
        let sp = "sockperf: ---> percentile 99.000 =   11.747\nsockperf: ---> percentile 50.000 =    9.053\nsockperf: ---> <MIN> observation =    7.651\n";
        assert_eq!(sockperf_value(sp, "percentile 50.000"), Some(9.053));
        assert_eq!(sockperf_value(sp, "<MIN> observation"), Some(7.651));
        assert_eq!(sockperf_value(sp, "percentile 90.000"), None);
        let ucx = "+---+\nFinal:                100000      0.160     0.184     0.184      330.96     330.96     5422395     5422395\n";
        assert_eq!(ucx_final(ucx).unwrap()[1], 0.160);
        assert_eq!(ucx_final(ucx).unwrap()[5], 330.96);
        assert!(ucx_final("nothing").is_none());
    }
}
