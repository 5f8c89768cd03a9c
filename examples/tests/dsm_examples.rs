//! The lock-protected counter and the parallel histogram with global atomics, on 1 and 3 nodes
//! of two threads each: every node checks the shared result and says so.

mod common;

#[test]
fn the_locked_counter_loses_no_increment() {
    for nodes in [1, 3] {
        let outs = common::run_job(env!("CARGO_BIN_EXE_dsm-counter"), "counter", nodes, &["50".into(), "2".into()]);
        let want = format!("counter {} (expected", 50 * 2 * u64::from(nodes));
        assert!(outs.iter().all(|o| o.contains(&want)), "{outs:?}");
    }
}

#[test]
fn the_histogram_of_every_nodes_samples_is_right_everywhere() {
    for nodes in [1, 3] {
        let outs =
            common::run_job(env!("CARGO_BIN_EXE_dsm-histogram"), "histogram", nodes, &["3000".into(), "37".into()]);
        let want = format!("{} samples in 37 bins, all bins right", 3000 * u64::from(nodes));
        assert!(outs.iter().all(|o| o.contains(&want)), "{outs:?}");
    }
}
