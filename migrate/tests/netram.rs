//! A network-RAM region migrating between two processes (`migrate-probe netram-source` and
//! `netram-dest`), its pages on two memory servers (`migrate-probe memserver`): only the table
//! crosses, the data written before the hand-over arrives whole, a source that dies right after
//! the hand-over loses nothing, and a destination that dies before committing leaves the region
//! working at the source.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{field, probe};

/// A process killed (and waited for) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with its output piped; returns it and its first line.
fn start(mut cmd: Command) -> (Running, String, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start the probe");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first line").expect("a line");
    (Running(child), first, lines)
}

/// Two memory servers of 512 MiB: the processes and their URIs.
fn memservers() -> (Vec<Running>, Vec<String>) {
    let (mut procs, mut uris) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let mut c = probe();
        c.args(["memserver", "512"]);
        let (p, first, _) = start(c);
        uris.push(first.split_whitespace().nth(1).expect("URI").to_string());
        procs.push(p);
    }
    (procs, uris)
}

/// The source of a 48 MiB region, `pct`% written, 8 MiB resident; its first line.
fn source(
    uris: &[String],
    pct: &str,
    env: &[(&str, &str)],
) -> (Running, String, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut c = probe();
    c.args(["netram-source", "48", pct, "8"]).args(uris).envs(env.iter().copied());
    start(c)
}

#[test]
fn only_the_table_crosses_and_a_source_that_dies_after_the_hand_over_loses_nothing() {
    let (_servers, uris) = memservers();
    let (mut src, first, _) = source(&uris, "60", &[("MIGRATE_PROBE_QUIT_AT_COMMIT", "1")]);
    let uri = first.split_whitespace().nth(1).expect("URI").to_string();
    let round = field(&first, "ROUND");
    assert!(round >= 2, "the writer ran while the region was in use: {first}");
    assert!(field(&first, "WRITTEN_BACK") > 0, "dirty resident pages were written back: {first}");
    let dest =
        probe().args(["netram-dest", &uri, "48", "60", "8", &round.to_string()]).output().expect("run the destination");
    let (out, err) = (String::from_utf8_lossy(&dest.stdout), String::from_utf8_lossy(&dest.stderr));
    assert!(dest.status.success(), "{out}{err}\nsource: {first}");
    // The source killed itself once the destination committed; the destination read every page
    // after that, from the servers.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(src.0.wait().expect("the source").signal(), Some(libc::SIGKILL), "{first}");
    assert_eq!(field(&out, "LOST"), 0, "{out}");
    assert_eq!(field(&out, "REMOTE"), field(&first, "REMOTE"), "{out} / {first}");
    // 48 MiB, 60% written: 7,373 pages with data; the description is the table as runs and the
    // placement of 48 slabs, not the pages.
    let bytes = field(&out, "BYTES");
    assert!(bytes < 64 * 1024, "{bytes} bytes crossed for {} pages of data: {out}", field(&out, "REMOTE"));
}

#[test]
fn a_destination_that_dies_before_committing_leaves_the_region_working_at_the_source() {
    let (_servers, uris) = memservers();
    let (mut src, first, rest) = source(&uris, "30", &[("MIGRATE_PROBE_WAIT_MS", "1500")]);
    let uri = first.split_whitespace().nth(1).expect("URI").to_string();
    let d = probe().args(["netram-describe-only", &uri]).output().expect("run the dying destination");
    assert!(String::from_utf8_lossy(&d.stdout).contains("DESCRIBED"), "{d:?}");
    let rest: Vec<String> = rest.map_while(Result::ok).collect();
    let status = src.0.wait().expect("the source");
    assert!(status.success() && rest.iter().any(|l| l == "THAWED OK"), "{first} {rest:?}");
}

#[test]
fn a_destination_with_another_key_is_refused_and_the_source_keeps_the_region() {
    let (_servers, uris) = memservers();
    let (mut src, first, rest) = source(&uris, "10", &[("MIGRATE_PROBE_WAIT_MS", "1500")]);
    let uri = first.split_whitespace().nth(1).expect("URI").to_string();
    let d = probe()
        .env("MOSAIC_CLUSTER_KEY", "another-key-altogether-0123456789")
        .args(["netram-dest", &uri, "48", "10", "8", "1"])
        .output()
        .expect("run the destination");
    assert!(!d.status.success());
    assert!(String::from_utf8_lossy(&d.stderr).contains("key"), "{}", String::from_utf8_lossy(&d.stderr));
    let rest: Vec<String> = rest.map_while(Result::ok).collect();
    assert!(src.0.wait().expect("the source").success() && rest.iter().any(|l| l == "THAWED OK"), "{rest:?}");
}
