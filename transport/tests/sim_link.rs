//! The simulated link: partitions fail requests with a time-out (never a hang) and heal in order;
//! bandwidth and latency shape what crosses it.

use std::time::{Duration, Instant};

use mosaic_transport::{connect_sim, listen, CallError, ClusterKey, ConnectOptions, Echo, LinkSpec, ServerConfig};

fn key() -> ClusterKey {
    ClusterKey::from_bytes(b"sim-link-test-cluster-key").unwrap()
}

#[test]
fn a_partition_times_requests_out_and_healing_restores_service() {
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo)).unwrap();
    let opts = ConnectOptions::new(key()).timeout(Duration::from_millis(200));
    let (conn, link) = connect_sim(server.uri(), LinkSpec::ten_gbe(), &opts).unwrap();
    assert_eq!(conn.call(1, b"before").unwrap(), b"before");

    link.partition();
    assert!(link.is_partitioned());
    let start = Instant::now();
    let r = conn.call(1, b"during");
    assert!(matches!(r, Err(CallError::TimedOut { .. })), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(2));

    link.heal();
    // The request sent during the partition is delivered late and its answer discarded; new
    // requests are answered, in order.
    for i in 0..20u8 {
        assert_eq!(conn.call(1, &[i]).unwrap(), [i]);
    }
}

#[test]
fn latency_and_bandwidth_shape_round_trips() {
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo)).unwrap();
    let opts = ConnectOptions::new(key());
    // 2 ms each way, 8 Mb/s: a 10 KB echo takes at least 4 ms + 2 x 10 ms of serialisation.
    let spec = LinkSpec::parse("lat=2ms,bw=8Mbit").unwrap();
    let (conn, _link) = connect_sim(server.uri(), spec, &opts).unwrap();
    let start = Instant::now();
    conn.call(1, b"x").unwrap();
    assert!(start.elapsed() >= Duration::from_millis(4), "{:?}", start.elapsed());
    let start = Instant::now();
    conn.call(1, &[7u8; 10_000]).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(24), "{:?}", start.elapsed());
}

#[test]
fn loss_delays_but_never_corrupts() {
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo)).unwrap();
    let spec = LinkSpec::parse("ideal,loss=0.3,rto=2ms,seed=11").unwrap();
    let (conn, _link) = connect_sim(server.uri(), spec, &ConnectOptions::new(key())).unwrap();
    let start = Instant::now();
    for i in 0..50u32 {
        let msg = i.to_le_bytes();
        assert_eq!(conn.call(1, &msg).unwrap(), msg);
    }
    // With 30% of ~100 frames lost at 2 ms each, the run cannot be as fast as a clean link.
    assert!(start.elapsed() >= Duration::from_millis(20), "{:?}", start.elapsed());
}

/// The frames a seed loses are the same in every run: the k-th frame each way is lost or not
/// by the seed alone, whatever the timing.
#[test]
fn a_seed_loses_the_same_frames_every_run() {
    let server = listen("tcp://127.0.0.1:0", ServerConfig::new(key()).service(Echo)).unwrap();
    let run = |seed: u64| {
        let spec = LinkSpec::parse(&format!("ideal,loss=0.2,rto=100us,seed={seed}")).unwrap();
        let (conn, link) = connect_sim(server.uri(), spec, &ConnectOptions::new(key())).unwrap();
        for i in 0..100u32 {
            conn.call(1, &i.to_le_bytes()).unwrap();
        }
        link.frame_counts()
    };
    let (a, b, c) = (run(5), run(5), run(6));
    assert_eq!(a, b, "same seed, same traffic: same losses");
    // 2 x 100 calls + 4 handshake frames; at p = 0.2 some are lost.
    assert_eq!(a.0, 204);
    assert!(a.1 > 10 && a.1 < 80, "{a:?}");
    assert_ne!(a.1, c.1, "another seed loses other frames (this pair of seeds differs)");
}
