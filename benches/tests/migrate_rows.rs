//! `mosaic-bench migrate --json` prints one row per figure with the fields the issue names, and
//! the bytes it reports are those of the pages touched (plus headers and the descriptor).

use std::process::Command;

#[test]
fn migrate_rows_carry_the_issues_fields() {
    let out = Command::new(env!("CARGO_BIN_EXE_mosaic-bench"))
        .args([
            "migrate",
            "--ops",
            "region",
            "--sizes",
            "1M",
            "--touched",
            "0,100",
            "--transports",
            "tcp,sim:10gbe",
            "--json",
        ])
        .output()
        .expect("run mosaic-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON row")).collect();
    assert_eq!(rows.len(), 4, "{text}");
    for r in &rows {
        assert_eq!(
            (r["bench"].as_str(), r["op"].as_str(), r["size"].as_u64()),
            (Some("migrate"), Some("region"), Some(1 << 20))
        );
        for field in ["freeze_us", "residence_ms"] {
            assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
        }
        let (sent, touched) = (r["bytes_sent"].as_u64().unwrap(), r["touched_bytes"].as_u64().unwrap());
        assert!(sent >= touched && sent <= touched + touched / 20 + 4096, "{r}");
        let want = if r["touched_pct"] == 0 { 0 } else { 1 << 20 };
        assert_eq!(touched, want, "{r}");
    }
}
