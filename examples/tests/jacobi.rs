//! The Jacobi example gives bit-identical grids on 1, 2 and 4 nodes.

use std::process::{Command, Stdio};

/// Runs dsm-jacobi on `nodes` processes; returns the checksum every node printed.
fn checksum(nodes: u16, n: usize, iterations: usize) -> String {
    let dir = std::env::temp_dir().join(format!("mosaic-jacobi-test-{}-{nodes}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let children: Vec<_> = (0..nodes)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_dsm-jacobi"))
                .args([n.to_string(), iterations.to_string()])
                .env("MOSAIC_DSM_RANK", rank.to_string())
                .env("MOSAIC_DSM_SIZE", nodes.to_string())
                .env("MOSAIC_DSM_RENDEZVOUS", &dir)
                .env("MOSAIC_CLUSTER_KEY", "jacobi-test-cluster-key-0123456789")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start dsm-jacobi")
        })
        .collect();
    let mut sums = Vec::new();
    for (rank, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().expect("dsm-jacobi output");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "node {rank} of {nodes}: {out}{}", String::from_utf8_lossy(&o.stderr));
        let sum =
            out.lines().find_map(|l| l.split_once("checksum ").map(|(_, s)| s.to_string())).expect("a checksum line");
        sums.push(sum);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(sums.iter().all(|s| *s == sums[0]), "nodes of one job disagree: {sums:?}");
    sums.swap_remove(0)
}

#[test]
fn the_grid_is_bit_identical_on_one_two_and_four_nodes() {
    let one = checksum(1, 128, 20);
    assert_eq!(checksum(2, 128, 20), one);
    assert_eq!(checksum(4, 128, 20), one);
    // A different grid gives a different checksum (the test can fail).
    assert_ne!(checksum(1, 128, 21), one);
}
