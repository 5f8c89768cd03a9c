//! The Jacobi example gives bit-identical grids on 1, 2 and 4 nodes.

mod common;

/// Runs dsm-jacobi on `nodes` processes; returns the checksum every node printed.
fn checksum(nodes: u16, n: usize, iterations: usize) -> String {
    let outs =
        common::run_job(env!("CARGO_BIN_EXE_dsm-jacobi"), "jacobi", nodes, &[n.to_string(), iterations.to_string()]);
    let mut sums: Vec<String> = outs
        .iter()
        .map(|out| {
            out.lines().find_map(|l| l.split_once("checksum ").map(|(_, s)| s.to_string())).expect("a checksum line")
        })
        .collect();
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
