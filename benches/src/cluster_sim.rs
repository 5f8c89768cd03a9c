//! `mosaic-bench cluster-sim`: the cluster's information layer at 16 to thousands of nodes in one
//! process, in simulated time (`mosaic_cluster::info::sim`): what each node sends per second,
//! how old the information it holds is, and how long the others take to find a node that died
//! (one node, the middle one, stops dead ten seconds after the warm-up).

use std::time::Duration;

use mosaic_cluster::info::sim::{simulate, SimConfig};
use mosaic_transport::LinkSpec;
use serde_json::json;

/// Simulates each size in `nodes` for `seconds` after `warm_up` over `link` (a `sim` preset),
/// printing a line per size.
pub fn run(
    nodes: &[usize],
    seconds: u64,
    warm_up: Duration,
    join_over: Option<Duration>,
    link: &str,
    json: bool,
) -> Result<(), String> {
    let spec = LinkSpec::parse(link)?;
    if join_over.is_some_and(|j| j > warm_up) {
        return Err("--join-over longer than --warm-up: nodes would still join while counting".into());
    }
    for &n in nodes {
        if n < 3 {
            return Err(format!("{n} nodes: at least 3 (one of them dies)"));
        }
        let started = std::time::Instant::now();
        let r = simulate(&SimConfig {
            nodes: n,
            duration: warm_up + Duration::from_secs(seconds),
            warm_up,
            join_over,
            link: spec.clone(),
            kill: Some((n / 2, warm_up + Duration::from_secs(10))),
            seed: 42,
        });
        let ms = |d: Option<Duration>| d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let line = json!({
            "bench": "cluster-sim", "nodes": n, "link": link, "seconds": seconds, "warm_up_s": warm_up.as_secs(),
            "join_over_s": join_over.map(|d| d.as_secs()),
            "frames_per_node_s": (r.frames_per_node_s * 100.0).round() / 100.0,
            "bytes_per_node_s": r.bytes_per_node_s.round(),
            "mean_info_age_ms": ms(Some(r.mean_age)),
            "max_info_age_ms": ms(Some(r.max_age)),
            "window_entries": (r.window_entries * 10.0).round() / 10.0,
            "fewest_members": r.fewest_members,
            "detect_first_ms": ms(r.detect_first), "detect_all_ms": ms(r.detect_all),
            "wall_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        });
        if json {
            println!("{line}");
        } else {
            println!(
                "{n:>6} nodes: {:>6.2} frames/s and {:>7.0} B/s per node; info age mean {:>5} ms, max {:>6} ms; {:.1} window entries; fewest members known {}; dead node found by the first after {} ms, by all after {} ms",
                r.frames_per_node_s,
                r.bytes_per_node_s,
                r.mean_age.as_millis(),
                r.max_age.as_millis(),
                r.window_entries,
                r.fewest_members,
                ms(r.detect_first).map_or("-".into(), |v| v.to_string()),
                ms(r.detect_all).map_or("-".into(), |v| v.to_string()),
            );
        }
    }
    Ok(())
}
