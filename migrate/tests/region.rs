//! Region post-copy between two processes (`migrate-probe source` and `dest`): every page
//! arrives, untouched pages are never sent, and the bytes sent stay within 5% of the touched
//! bytes plus the descriptor.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::{field, probe};

/// Moves a region of `size` (MiB, or KiB with a K) with `pct`% of its pages touched; returns
/// (the source's lines, the destination's).
fn migrate(size: &str, pct: u64) -> (String, String) {
    let mut src = probe()
        .args(["source", size, &pct.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the source");
    let mut lines = BufReader::new(src.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("the source's first line").expect("a line");
    let uri = first.split_whitespace().nth(1).expect("URI").to_string();
    let dest = probe().args(["dest", &uri, size, &pct.to_string()]).output().expect("run the destination");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = src.wait().expect("the source");
    let d = String::from_utf8_lossy(&dest.stdout).to_string();
    assert!(
        dest.status.success() && status.success(),
        "dest: {d}{}\nsource: {first} {rest:?}",
        String::from_utf8_lossy(&dest.stderr)
    );
    (format!("{first}\n{}", rest.join("\n")), d)
}

#[test]
fn a_region_arrives_whole_and_only_touched_pages_travel() {
    // 1000 KiB: 250 pages, no whole number of chunks nor of 64 pages.
    for (size, pages, pct) in [("4", 1024, 0), ("4", 1024, 1), ("8", 2048, 10), ("8", 2048, 100), ("1000K", 250, 50)] {
        let (src, dest) = migrate(size, pct);
        let sent = src.lines().find(|l| l.starts_with("SENT")).expect("SENT");
        let present = field(sent, "PRESENT");
        assert_eq!(field(sent, "PAGES"), present, "every present page once: {src}");
        let touched_bytes = present * 4096;
        let bytes = field(sent, "BYTES");
        // Headers: 9 bytes a pushed page, 65 a fetched one (with its chunk's present bits), 73 a
        // chunk's bits on the stream, and the descriptor.
        assert!(bytes * 100 <= touched_bytes * 105 + 64 * 1024 * 100, "{bytes} bytes for {touched_bytes}: {src}");
        assert!(bytes >= touched_bytes, "{src}");
        assert_eq!(field(&dest, "ZERO") + present, pages, "the rest zeros, never sent: {dest}");
        assert_eq!(field(&dest, "FAULTED") + field(&dest, "PUSHED"), present, "{dest}");
    }
}

#[test]
fn a_wrong_key_or_no_source_is_a_clear_error() {
    let out = probe().args(["dest", "tcp://127.0.0.1:1", "4", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut src = probe().args(["source", "4", "10"]).stdout(Stdio::piped()).spawn().unwrap();
    let first = BufReader::new(src.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let uri = first.split_whitespace().nth(1).unwrap().to_string();
    let out = probe()
        .env("MOSAIC_CLUSTER_KEY", "another-key-altogether-0123456789")
        .args(["dest", &uri, "4", "10"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("key"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = src.kill();
    let _ = src.wait();
}

/// No destination takes the region over: the source gives it back to itself, whole and writable.
#[test]
fn a_region_no_destination_took_over_is_thawed_at_the_source() {
    let out = probe().args(["source", "4", "30"]).env("MIGRATE_PROBE_WAIT_MS", "300").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("THAWED OK"), "{text}{}", String::from_utf8_lossy(&out.stderr));
}

/// The source dies right after the hand-over: the pages already here read right, a page still
/// missing raises SIGBUS (named in the log), never zeros.
#[test]
fn a_source_that_dies_after_the_hand_over_leaves_sigbus_not_zeros() {
    use std::os::unix::process::ExitStatusExt;
    let mut src = probe()
        .args(["source", "64", "100"])
        .env("MIGRATE_PROBE_QUIT_AT_COMMIT", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let first = BufReader::new(src.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let uri = first.split_whitespace().nth(1).unwrap().to_string();
    let dest = probe().env("RUST_LOG", "error").args(["dest", &uri, "64", "100"]).output().unwrap();
    let _ = src.wait();
    let err = String::from_utf8_lossy(&dest.stderr);
    assert_eq!(dest.status.signal(), Some(libc::SIGBUS), "{}{err}", String::from_utf8_lossy(&dest.stdout));
    assert!(err.contains("page"), "{err}");
}
