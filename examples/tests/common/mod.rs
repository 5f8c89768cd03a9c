//! Runs an example as the nodes of a DSM job on this host.

use std::process::{Command, Stdio};

/// Runs `program` with `args` on `nodes` processes (ranks, size, rendezvous and key in the
/// environment, as `mosrun -n` sets them); asserts that every node succeeded and returns each
/// node's output, by rank.
pub fn run_job(program: &str, name: &str, nodes: u16, args: &[String]) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("mosaic-{name}-test-{}-{nodes}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let children: Vec<_> = (0..nodes)
        .map(|rank| {
            Command::new(program)
                .args(args)
                .env("MOSAIC_DSM_RANK", rank.to_string())
                .env("MOSAIC_DSM_SIZE", nodes.to_string())
                .env("MOSAIC_DSM_RENDEZVOUS", &dir)
                .env("MOSAIC_CLUSTER_KEY", "examples-test-cluster-key-0123456789")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("start {program}: {e}"))
        })
        .collect();
    let mut outs = Vec::new();
    let mut failed = Vec::new();
    for (rank, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().expect("a node's output");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        if !o.status.success() {
            failed.push(format!("node {rank} of {nodes}: {out}{}", String::from_utf8_lossy(&o.stderr)));
        }
        outs.push(out);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failed.is_empty(), "{program}: {failed:?}");
    outs
}
