//! Thousands of nodes of the information layer in one process, in simulated time: the same
//! [`GossipNode`] code the agents run, its frames carried over links shaped like the `sim`
//! transport's ([`LinkSpec`]: one-way latency, bandwidth, loss, where a lost frame is gone,
//! as a datagram would be). Measures what the issue asks of the information layer: messages
//! and bytes per node per second, the age of the information nodes hold, and how long the
//! others take to find a dead node.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use mosaic_transport::LinkSpec;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::load::LoadVector;
use super::node::{Event, GossipConfig, GossipNode};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// How many nodes.
    pub nodes: usize,
    /// Simulated time in all.
    pub duration: Duration,
    /// Time before counting starts (joining, filling the windows).
    pub warm_up: Duration,
    /// How the nodes join: `None`, all through node 0 within the first second (a join storm
    /// on one member); `Some(t)`, at random times over `t`, each through a random node that
    /// joined before it (a cluster booting over a while, its nodes given different seeds).
    pub join_over: Option<Duration>,
    /// The links between any two nodes.
    pub link: LinkSpec,
    /// A node that stops dead at a time, if any (node index, time).
    pub kill: Option<(usize, Duration)>,
    /// The randomness of the nodes and the links.
    pub seed: u64,
}

/// What a simulation measured.
#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    /// Nodes simulated.
    pub nodes: usize,
    /// Frames each node sent per second (mean over nodes, after the warm-up).
    pub frames_per_node_s: f64,
    /// Bytes each node sent per second.
    pub bytes_per_node_s: f64,
    /// The age of the information in the nodes' windows, sampled every second after the
    /// warm-up: the mean over all entries.
    pub mean_age: Duration,
    /// The same, the oldest entry any node held.
    pub max_age: Duration,
    /// Window entries per node at the end (mean).
    pub window_entries: f64,
    /// The fewest members any live node knew at the end (all: nodes - 1, less the dead one).
    pub fewest_members: usize,
    /// From the kill to the first node declaring the dead one down.
    pub detect_first: Option<Duration>,
    /// From the kill to every live node having declared it down.
    pub detect_all: Option<Duration>,
}

/// What happens next in simulated time.
enum Happening {
    /// A frame reaches a node.
    Deliver { to: usize, bytes: Vec<u8> },
    /// A node's timers may be due.
    Wake(usize),
    /// Counting starts.
    StartCounting,
    /// The window ages are sampled.
    Sample,
}

/// The simulation's queue: happenings by time, then by order of scheduling.
struct Queue {
    heap: BinaryHeap<Reverse<(Duration, u64)>>,
    items: HashMap<u64, Happening>,
    seq: u64,
}

impl Queue {
    fn push(&mut self, at: Duration, h: Happening) {
        self.heap.push(Reverse((at, self.seq)));
        self.items.insert(self.seq, h);
        self.seq += 1;
    }

    fn pop(&mut self) -> Option<(Duration, Happening)> {
        let Reverse((at, seq)) = self.heap.pop()?;
        self.items.remove(&seq).map(|h| (at, h))
    }
}

/// Runs a simulation (see the module's documentation).
pub fn simulate(cfg: &SimConfig) -> SimReport {
    let n = cfg.nodes.max(2);
    let swim = GossipConfig::lan(u32::try_from(n).unwrap_or(u32::MAX));
    let addr = |i: usize| format!("sim://{i}");
    let index: HashMap<String, usize> = (0..n).map(|i| (addr(i), i)).collect();
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let mut nodes: Vec<GossipNode> = (0..n)
        .map(|i| {
            let mut node = GossipNode::new(&addr(i), swim.clone(), cfg.seed.wrapping_add(i as u64), Duration::ZERO);
            let mut v = LoadVector::empty("");
            v.load = u32::try_from(i % 400).unwrap_or(0);
            v.total_memory = 64 << 30;
            v.free_memory = 32 << 30;
            node.set_load(v);
            node
        })
        .collect();
    let mut q = Queue { heap: BinaryHeap::new(), items: HashMap::new(), seq: 0 };
    // Joins (the announcement leaves at the node's first wake).
    q.push(Duration::ZERO, Happening::Wake(0));
    let over = u64::try_from(cfg.join_over.unwrap_or(Duration::from_secs(1)).as_micros()).unwrap_or(u64::MAX).max(1);
    let mut order: Vec<(Duration, usize)> =
        (1..n).map(|i| (Duration::from_micros(rng.random_range(0..over)), i)).collect();
    order.sort_unstable();
    for k in 0..order.len() {
        let (at, i) = order[k];
        let through = match cfg.join_over {
            None => 0,
            Some(_) => rng.random_range(0..=k).checked_sub(1).map_or(0, |j| order[j].1),
        };
        nodes[i].join(&addr(through), at);
        q.push(at, Happening::Wake(i));
    }
    q.push(cfg.warm_up, Happening::StartCounting);
    let mut t = cfg.warm_up;
    while t < cfg.duration {
        q.push(t, Happening::Sample);
        t += Duration::from_secs(1);
    }
    let dead = cfg.kill.map(|(k, _)| k);
    let kill_at = cfg.kill.map(|(_, at)| at);
    let is_dead = |i: usize, now: Duration| dead == Some(i) && kill_at.is_some_and(|k| now >= k);
    let (mut frames0, mut bytes0) = (0u64, 0u64);
    let (mut age_sum, mut age_count, mut max_age) = (Duration::ZERO, 0u64, Duration::ZERO);
    let mut detected: Vec<bool> = vec![false; n];
    let (mut detect_first, mut detect_all) = (None, None);
    let sent = |nodes: &[GossipNode]| {
        nodes.iter().fold((0, 0), |(f, b), x| (f + x.stats().frames_sent, b + x.stats().bytes_sent))
    };
    while let Some((now, h)) = q.pop() {
        if now >= cfg.duration {
            break;
        }
        let who = match h {
            Happening::Deliver { to, bytes } => {
                if is_dead(to, now) {
                    continue;
                }
                nodes[to].receive(&bytes, now);
                to
            }
            Happening::Wake(i) => {
                if is_dead(i, now) {
                    continue;
                }
                nodes[i].tick(now);
                let next = nodes[i].next_wakeup().max(now + Duration::from_micros(100));
                q.push(next, Happening::Wake(i));
                i
            }
            Happening::StartCounting => {
                (frames0, bytes0) = sent(&nodes);
                continue;
            }
            Happening::Sample => {
                for (_, node) in nodes.iter().enumerate().filter(|(i, _)| !is_dead(*i, now)) {
                    for v in node.window(now) {
                        age_sum += v.age;
                        age_count += 1;
                        max_age = max_age.max(v.age);
                    }
                }
                continue;
            }
        };
        let (out, events) = nodes[who].drain();
        for e in events {
            if let (Event::Down(gone), Some(d), Some(k)) = (&e, dead, kill_at) {
                if *gone == addr(d) && now >= k && !detected[who] {
                    detected[who] = true;
                    detect_first.get_or_insert(now - k);
                    if (0..n).filter(|i| *i != d).all(|i| detected[i]) {
                        detect_all.get_or_insert(now - k);
                    }
                }
            }
        }
        for o in out {
            let Some(&to) = index.get(&o.to) else { continue };
            if cfg.link.loss > 0.0 && rng.random_bool(cfg.link.loss.clamp(0.0, 1.0)) {
                continue;
            }
            let wire = cfg.link.bandwidth_bps.map_or(Duration::ZERO, |bps| {
                Duration::from_nanos((o.bytes.len() as u64 * 8).saturating_mul(1_000_000_000) / bps.max(1))
            });
            q.push(now + cfg.link.latency + wire, Happening::Deliver { to, bytes: o.bytes });
        }
    }
    let (frames1, bytes1) = sent(&nodes);
    let counted = cfg.duration.saturating_sub(cfg.warm_up).as_secs_f64().max(1e-9) * n as f64;
    let live: Vec<usize> = (0..n).filter(|i| !is_dead(*i, cfg.duration)).collect();
    SimReport {
        nodes: n,
        frames_per_node_s: (frames1 - frames0) as f64 / counted,
        bytes_per_node_s: (bytes1 - bytes0) as f64 / counted,
        mean_age: if age_count > 0 { age_sum / u32::try_from(age_count).unwrap_or(u32::MAX) } else { Duration::ZERO },
        max_age,
        window_entries: live.iter().map(|&i| nodes[i].window(cfg.duration).len()).sum::<usize>() as f64
            / live.len().max(1) as f64,
        fewest_members: live.iter().map(|&i| nodes[i].members().len()).min().unwrap_or(0),
        detect_first,
        detect_all,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_cluster_converges_its_information_stays_fresh_and_a_dead_node_is_found() {
        let r = simulate(&SimConfig {
            nodes: 16,
            duration: Duration::from_secs(60),
            warm_up: Duration::from_secs(20),
            join_over: None,
            link: LinkSpec::ten_gbe(),
            kill: Some((5, Duration::from_secs(30))),
            seed: 7,
        });
        assert_eq!(r.fewest_members, 14, "{r:?}");
        assert!(r.window_entries >= 14.0, "{r:?}");
        assert!(r.mean_age < Duration::from_secs(8) && r.max_age <= Duration::from_secs(21), "{r:?}");
        assert!(r.frames_per_node_s > 1.0 && r.frames_per_node_s < 10.0, "{r:?}");
        let all = r.detect_all.expect("every node found the dead one");
        assert!(r.detect_first.is_some_and(|f| f <= all) && all < Duration::from_secs(30), "{r:?}");
    }

    #[test]
    fn nodes_that_join_while_others_do_learn_every_member_within_a_minute() {
        // Each joins through a random node that joined before it, at a random time within
        // 10 s: updates about some members pass a node by, and only the member lists it asks
        // for (every second while it boots) fill the gaps.
        let r = simulate(&SimConfig {
            nodes: 160,
            duration: Duration::from_secs(50),
            warm_up: Duration::from_secs(40),
            join_over: Some(Duration::from_secs(10)),
            link: LinkSpec::ten_gbe(),
            kill: None,
            seed: 11,
        });
        assert_eq!(r.fewest_members, 159, "{r:?}");
    }
}
