//! The cluster's decisions, without I/O: when to move a process and where, when to usher memory
//! away and where, where to place new work. Each takes what a node knows (its own
//! [`LoadVector`], its window of others') and returns a decision the agent carries out.
//!
//! Load balancing follows the seed's rules: compare load per reference core (load scaled by
//! CPUs and speed), move only when the process would find the destination lighter than this
//! node by a threshold (so the reverse move can never be decided afterwards: no ping-pong), only processes that
//! have stayed a minimum time, and only when the expected gain over the time the process is
//! likely still to run (as long again as it has run: the seed's heuristic) beats the measured
//! cost of moving it.

use std::time::Duration;

use crate::info::LoadVector;

/// One hundred: a runnable thread in [`LoadVector::load`]'s hundredths.
const ONE: u64 = 100;

/// The balancing policy's settings.
#[derive(Clone, Debug)]
pub struct BalanceParams {
    /// Least difference of load per reference core (hundredths) between this node and the
    /// destination, both counted with the process, for a move.
    pub threshold: u64,
    /// Least time a process stays on a node before it may move again.
    pub min_residence: Duration,
    /// What moving a process costs it (its stop time plus the slowdown of its memory arriving;
    /// `mosctl tune` measures it on this cluster).
    pub migration_cost: Duration,
    /// Information older than this is not acted on.
    pub max_info_age: Duration,
}

impl Default for BalanceParams {
    fn default() -> BalanceParams {
        BalanceParams {
            threshold: 50,
            min_residence: Duration::from_secs(5),
            migration_cost: Duration::from_millis(200),
            max_info_age: Duration::from_secs(10),
        }
    }
}

/// A process the agent could move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its pid.
    pub pid: u32,
    /// How long it has run in all.
    pub ran: Duration,
    /// How long it has been on this node.
    pub here_for: Duration,
    /// Share of a CPU it used lately, in hundredths (100: a whole CPU; a CPU-bound process
    /// sharing one CPU with another gets 50).
    pub cpu: u64,
    /// Locked to this node (`mosctl lock`), or not movable (the migration check refused it).
    pub locked: bool,
}

/// A decision to move a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The process.
    pub pid: u32,
    /// The destination's agent.
    pub to: String,
    /// The run time it is expected to save (already net of the move's cost).
    pub expected_gain: Duration,
}

/// The load per reference core of `v` with `delta` runnable threads (hundredths) added.
fn per_core(v: &LoadVector, delta: i64) -> u64 {
    let load = (i64::from(v.load) + delta).max(0).unsigned_abs();
    LoadVector { load: u32::try_from(load).unwrap_or(u32::MAX), ..v.clone() }.effective_load()
}

/// The speed a CPU-bound thread gets on `v` with `delta` runnable threads (hundredths) added:
/// the node's speed per CPU, shared among the runnable threads once there are more than CPUs.
fn rate(v: &LoadVector, delta: i64) -> u64 {
    let load = (i64::from(v.load) + delta).max(0).unsigned_abs();
    let cpus = ONE * u64::from(v.cpus.max(1));
    u64::from(v.speed) * cpus / load.max(cpus)
}

/// Whether to move one of `candidates` away from this node (`local`), and where, given what it
/// knows of the others (`window`). `None`: stay.
pub fn balance(local: &LoadVector, window: &[LoadVector], candidates: &[Candidate], p: &BalanceParams) -> Option<Move> {
    // The process that gains most from moving: CPU-bound (it gets at least 80% of the share of
    // a CPU the runnable threads here leave each: always runnable, it would use a whole CPU
    // elsewhere), long-running, settled here.
    let fair = ONE * u64::from(local.cpus.max(1)) * ONE / u64::from(local.load).max(ONE);
    let job = candidates
        .iter()
        .filter(|c| !c.locked && c.here_for >= p.min_residence && c.cpu * 10 >= fair.min(ONE) * 8)
        .max_by_key(|c| (c.ran, c.cpu))?;
    // A CPU-bound process is as many runnable threads as it keeps busy, one at least, wherever
    // it is.
    let share = i64::try_from(job.cpu.max(ONE)).unwrap_or(i64::MAX / 2);
    let here_with = per_core(local, 0);
    let best = window
        .iter()
        .filter(|v| v.node != local.node && v.age <= p.max_info_age && v.free_slots > 0)
        .map(|v| (per_core(v, share), v))
        .min_by_key(|(load, v)| (*load, v.node.clone()))?;
    let (there_with, dest) = best;
    // Hysteresis: the destination with the process must be lighter than this node with it by
    // the threshold. The reverse move, decided after this one, would need this node with the
    // process to be lighter than the destination with it by the threshold: never both.
    if there_with + p.threshold > here_with {
        return None;
    }
    // Gain: over the time it is likely still to run (as long as it has run), the work done
    // faster there, less the cost of moving.
    let (rate_here, rate_there) = (rate(local, 0), rate(dest, share));
    if rate_there <= rate_here {
        return None;
    }
    let horizon = job.ran;
    let saved = horizon.mul_f64(1.0 - rate_here as f64 / rate_there as f64);
    let gain = saved.checked_sub(p.migration_cost).filter(|g| !g.is_zero())?;
    Some(Move { pid: job.pid, to: dest.node.clone(), expected_gain: gain })
}

/// The memory policy's settings.
#[derive(Clone, Debug)]
pub struct UsherParams {
    /// Below this share of its memory free (hundredths of a percent), a node ushers memory away.
    pub low_free: u16,
    /// Above this memory pressure (hundredths of a percent of time stalled), likewise.
    pub high_pressure: u16,
    /// A node takes memory only while it keeps this share free after taking it.
    pub keep_free: u16,
    /// Information older than this is not acted on.
    pub max_info_age: Duration,
}

impl Default for UsherParams {
    fn default() -> UsherParams {
        UsherParams { low_free: 1_000, high_pressure: 1_000, keep_free: 2_500, max_info_age: Duration::from_secs(10) }
    }
}

/// A decision to move memory away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usher {
    /// Where to.
    pub to: String,
    /// How many bytes.
    pub bytes: u64,
}

/// Bytes of `total` that make `share` hundredths of a percent.
fn share_of(total: u64, share: u16) -> u64 {
    u64::try_from(u128::from(total) * u128::from(share) / 10_000).unwrap_or(u64::MAX)
}

/// Whether this node (`local`) should usher memory (its network-RAM slabs, its hosted pages)
/// to others, and to which: when its free memory is below the low mark or its memory pressure
/// above the high mark, to the node with the most room above its own keep-free mark, as much as
/// brings this node back to its keep-free mark and fits there.
pub fn usher(local: &LoadVector, window: &[LoadVector], p: &UsherParams) -> Option<Usher> {
    let low = local.free_memory < share_of(local.total_memory, p.low_free);
    if !low && local.pressure <= p.high_pressure {
        return None;
    }
    let want = share_of(local.total_memory, p.keep_free).saturating_sub(local.free_memory).max(1 << 20);
    let (room, dest) = window
        .iter()
        .filter(|v| v.node != local.node && v.age <= p.max_info_age && v.pressure <= p.high_pressure)
        .map(|v| (v.free_memory.saturating_sub(share_of(v.total_memory, p.keep_free)), v))
        .max_by_key(|(room, v)| (*room, std::cmp::Reverse(v.node.clone())))?;
    (room > 0).then(|| Usher { to: dest.node.clone(), bytes: want.min(room) })
}

/// The free memory `v` keeps, in bytes: its keep-free mark.
pub fn keep_free_bytes(v: &LoadVector, p: &UsherParams) -> u64 {
    share_of(v.total_memory, p.keep_free)
}

/// [`usher`] with hysteresis, for a node that is ushering now (`now`) or not: it starts below
/// the low mark (or above the pressure mark), and goes on until the node is back at its keep-free
/// mark (and below the pressure mark), or until no node has room for more.
pub fn ushering(now: bool, local: &LoadVector, window: &[LoadVector], p: &UsherParams) -> Option<Usher> {
    if now {
        usher(local, window, &UsherParams { low_free: p.keep_free, ..p.clone() })
    } else {
        usher(local, window, p)
    }
}

/// The nodes that may take new work needing `memory` bytes: this one, and those whose figures
/// are at most `max_info_age` old, with a free slot and that much memory free.
fn eligible<'a>(
    local: &'a LoadVector,
    window: &'a [LoadVector],
    memory: u64,
    max_info_age: Duration,
) -> impl Iterator<Item = &'a LoadVector> {
    std::iter::once(local)
        .chain(window.iter().filter(move |v| v.node != local.node && v.age <= max_info_age))
        .filter(move |v| v.free_slots > 0 && v.free_memory >= memory)
}

/// Where to start new work needing `memory` bytes: the node (this one included) with the least
/// load per reference core among those with a free slot and that much memory free, ties to this
/// node (no move is cheaper than one).
pub fn place(local: &LoadVector, window: &[LoadVector], memory: u64, max_info_age: Duration) -> Option<String> {
    eligible(local, window, memory, max_info_age)
        .map(|v| (per_core(v, i64::try_from(ONE).unwrap_or(100)), v.node != local.node, v))
        .min_by_key(|(load, remote, v)| (*load, *remote, v.node.clone()))
        .map(|(_, _, v)| v.node.clone())
}

/// [`place`] for work started from many places at once (jobs launched together each see the
/// same, slightly old view, and would all go to one node). Where [`place`] keeps the work here,
/// so does this (no move is cheaper than one). Otherwise the nodes where a new CPU-bound thread
/// would run at least 90% as fast as at the best are about as good, and one of them is chosen
/// by `pick` (a random number), each as likely as the CPU capacity it has to spare (cores left
/// idle times their speed, at least one core's worth): simultaneous starts spread over those
/// nodes about as their room.
pub fn place_spread(
    local: &LoadVector,
    window: &[LoadVector],
    memory: u64,
    max_info_age: Duration,
    pick: u64,
) -> Option<String> {
    let best = place(local, window, memory, max_info_age)?;
    if best == local.node {
        return Some(best);
    }
    let one = i64::try_from(ONE).unwrap_or(100);
    let eligible: Vec<&LoadVector> = eligible(local, window, memory, max_info_age).collect();
    let fastest = eligible.iter().map(|v| rate(v, one)).max()?;
    let mut near: Vec<(&LoadVector, u128)> = eligible
        .iter()
        .filter(|v| rate(v, one) * 10 >= fastest * 9)
        .map(|v| {
            let spare = (ONE * u64::from(v.cpus.max(1))).saturating_sub(u64::from(v.load)).max(ONE);
            (*v, u128::from(spare) * u128::from(v.speed.max(1)))
        })
        .collect();
    near.sort_by(|a, b| a.0.node.cmp(&b.0.node));
    let total: u128 = near.iter().map(|(_, w)| w).sum();
    let mut at = u128::from(pick) % total.max(1);
    for (v, w) in &near {
        if at < *w {
            return Some(v.node.clone());
        }
        at -= w;
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, load: u32, cpus: u16) -> LoadVector {
        LoadVector {
            load,
            cpus,
            free_slots: 8,
            total_memory: 16 << 30,
            free_memory: 8 << 30,
            ..LoadVector::empty(name)
        }
    }

    fn job(pid: u32, ran_s: u64) -> Candidate {
        Candidate {
            pid,
            ran: Duration::from_secs(ran_s),
            here_for: Duration::from_secs(ran_s),
            cpu: 100,
            locked: false,
        }
    }

    #[test]
    fn an_overloaded_node_sends_its_longest_cpu_bound_job_to_the_least_loaded_one() {
        let here = node("a", 400, 2); // 2 runnable per core
        let window = [node("b", 150, 2), node("c", 0, 2), node("d", 0, 1)];
        let jobs = [job(1, 30), job(2, 120), Candidate { cpu: 20, ..job(3, 600) }];
        let m = balance(&here, &window, &jobs, &BalanceParams::default()).unwrap();
        assert_eq!((m.pid, m.to.as_str()), (2, "c"), "{m:?}");
        // It would run at twice the rate there: half of the 120 s it is expected still to need.
        assert!(m.expected_gain > Duration::from_secs(55) && m.expected_gain < Duration::from_secs(61), "{m:?}");
    }

    #[test]
    fn two_jobs_sharing_a_cpu_are_cpu_bound_and_one_moves_to_an_idle_cpu() {
        let here = node("a", 200, 1);
        let half = |pid| Candidate { cpu: 49, ..job(pid, 10) };
        let m = balance(&here, &[node("b", 0, 1)], &[half(1), half(2)], &BalanceParams::default()).unwrap();
        assert_eq!(m.to, "b");
        // A job that sleeps most of the time is not CPU-bound.
        let idle = Candidate { cpu: 10, ..job(3, 10) };
        assert_eq!(balance(&here, &[node("b", 0, 1)], &[idle], &BalanceParams::default()), None);
    }

    #[test]
    fn speed_counts_once_a_slower_idle_node_still_takes_a_job_from_a_crowded_one() {
        // Four runnable on one CPU at reference speed: a quarter of it each (250); an idle node
        // at half the speed gives the job 500.
        let here = node("a", 400, 1);
        let slow = LoadVector { speed: 500, ..node("b", 0, 1) };
        let m = balance(&here, &[slow], &[job(1, 100)], &BalanceParams::default()).unwrap();
        assert_eq!(m.to, "b");
        // Half the time saved of the 100 s it is expected to need still.
        assert!(m.expected_gain > Duration::from_secs(45) && m.expected_gain < Duration::from_secs(51), "{m:?}");
    }

    #[test]
    fn a_job_keeping_four_cpus_busy_counts_as_four_threads_where_it_goes() {
        let here = node("a", 800, 4);
        // Two CPUs idle there: with four more threads, it would be as crowded as here.
        let two = node("b", 0, 2);
        let wide = Candidate { cpu: 400, ..job(1, 100) };
        assert_eq!(balance(&here, &[two], std::slice::from_ref(&wide), &BalanceParams::default()), None);
        assert!(balance(&here, &[node("c", 0, 8)], &[wide], &BalanceParams::default()).is_some());
    }

    #[test]
    fn no_ping_pong_no_move_within_the_threshold_and_none_the_other_way() {
        let p = BalanceParams::default();
        let (a, b) = (node("a", 300, 2), node("b", 100, 2));
        let m = balance(&a, std::slice::from_ref(&b), &[job(1, 100)], &p);
        assert!(m.is_some());
        // After the move: a at 200, b at 200: neither side moves anything back.
        let (a2, b2) = (node("a", 200, 2), node("b", 200, 2));
        assert_eq!(balance(&a2, std::slice::from_ref(&b2), &[job(2, 100)], &p), None);
        assert_eq!(balance(&b2, &[a2], &[job(1, 100)], &p), None);
        // A difference of one thread on two cores: within the threshold, nothing moves.
        assert_eq!(balance(&node("a", 200, 2), &[node("b", 100, 2)], &[job(1, 100)], &p), None);
    }

    #[test]
    fn young_locked_stale_and_not_worth_it_stay() {
        let p = BalanceParams::default();
        let here = node("a", 400, 1);
        let idle = [node("b", 0, 1)];
        let settled = |c: Candidate| balance(&here, &idle, &[c], &p);
        assert_eq!(settled(Candidate { here_for: Duration::from_secs(1), ..job(1, 100) }), None, "just arrived");
        assert_eq!(settled(Candidate { locked: true, ..job(1, 100) }), None, "locked");
        assert!(settled(job(1, 100)).is_some());
        // 100 s run, four times faster there: 75 s saved, less than a move that costs 80 s.
        let dear = BalanceParams { migration_cost: Duration::from_secs(80), ..p.clone() };
        assert_eq!(balance(&here, &idle, &[job(1, 100)], &dear), None, "not worth its cost");
        let stale = [LoadVector { age: Duration::from_secs(60), ..node("b", 0, 1) }];
        assert_eq!(balance(&here, &stale, &[job(1, 100)], &p), None, "stale information");
        let full = [LoadVector { free_slots: 0, ..node("b", 0, 1) }];
        assert_eq!(balance(&here, &full, &[job(1, 100)], &p), None, "no slot there");
        let slow = [LoadVector { speed: 100, ..node("b", 0, 1) }];
        assert_eq!(balance(&here, &slow, &[job(1, 100)], &p), None, "a tenth of the speed: slower there");
    }

    #[test]
    fn memory_is_ushered_from_a_squeezed_node_to_the_roomiest() {
        let p = UsherParams::default();
        let mut here = node("a", 0, 1);
        assert_eq!(usher(&here, &[node("b", 0, 1)], &p), None, "half free: nothing to do");
        here.free_memory = 1 << 30; // 1 of 16 GiB free: below 10%
        let roomy = LoadVector { free_memory: 12 << 30, ..node("c", 0, 1) };
        let pressed = LoadVector { free_memory: 15 << 30, pressure: 5_000, ..node("d", 0, 1) };
        let u = usher(&here, &[node("b", 0, 1), roomy, pressed], &p).unwrap();
        // Back to 25% free: 4 GiB - 1 GiB; c has 12 - 4 = 8 GiB of room.
        assert_eq!((u.to.as_str(), u.bytes), ("c", 3 << 30));
        here.free_memory = 8 << 30;
        here.pressure = 2_000;
        assert!(usher(&here, &[node("b", 0, 1)], &p).is_some(), "pressure alone");
        let tight = LoadVector { free_memory: 4 << 30, ..node("b", 0, 1) };
        assert_eq!(usher(&here, &[tight], &p), None, "nobody has room above their own mark");
    }

    #[test]
    fn ushering_starts_below_the_low_mark_and_stops_at_the_keep_free_mark() {
        let p = UsherParams::default();
        let at = |free_gib: u64| LoadVector { free_memory: free_gib << 30, ..node("a", 0, 1) }; // of 16 GiB
        let roomy = [node("b", 0, 1)];
        // 3 GiB free (18.75%): above the low mark (10%), below the keep-free mark (25%).
        assert_eq!(ushering(false, &at(3), &roomy, &p), None, "not started above the low mark");
        assert!(ushering(true, &at(3), &roomy, &p).is_some(), "goes on until the keep-free mark");
        assert!(ushering(false, &at(1), &roomy, &p).is_some(), "starts below the low mark");
        assert_eq!(ushering(true, &at(4), &roomy, &p), None, "stops at the keep-free mark");
        assert_eq!(ushering(true, &at(1), &[], &p), None, "stops when nobody has room");
    }

    #[test]
    fn new_work_goes_to_the_least_loaded_node_with_room_ties_here() {
        let age = Duration::from_secs(10);
        let here = node("a", 100, 2);
        assert_eq!(place(&here, &[node("b", 100, 2)], 1 << 30, age).as_deref(), Some("a"));
        assert_eq!(place(&here, &[node("b", 0, 2)], 1 << 30, age).as_deref(), Some("b"));
        assert_eq!(place(&here, &[node("b", 0, 2)], 10 << 30, age), None, "nobody has 10 GiB free");
        let stale = LoadVector { age: Duration::from_secs(11), ..node("b", 0, 2) };
        assert_eq!(place(&here, &[stale], 1 << 30, age).as_deref(), Some("a"));
    }

    #[test]
    fn work_started_together_spreads_over_the_nodes_about_as_idle() {
        let age = Duration::from_secs(10);
        let here = node("a", 400, 2);
        let window = [node("b", 0, 2), node("c", 0, 2), node("d", 50, 2), node("e", 300, 2), node("f", 20, 1)];
        // b, c (idle) and d (half a CPU busy of two) would run a new job at full speed; e (four
        // runnable threads on two CPUs) at half, f (one CPU, a fifth busy) at 83%. Spare room:
        // b and c two cores each, d one and a half: of 5,500 picks, 2,000 / 2,000 / 1,500.
        let mut count = std::collections::BTreeMap::new();
        for pick in 0..5_500u64 {
            let at = place_spread(&here, &window, 1 << 30, age, pick * 1000).unwrap();
            *count.entry(at).or_insert(0) += 1;
        }
        assert_eq!(count.into_iter().collect::<Vec<_>>(), [("b".into(), 2000), ("c".into(), 2000), ("d".into(), 1500)]);
        // A big idle node takes most, an idle small one its share.
        let big = LoadVector { cpus: 16, ..node("g", 0, 16) };
        let picks: Vec<_> = (0..18u64)
            .filter_map(|p| place_spread(&here, &[big.clone(), node("b", 0, 2)], 1 << 30, age, p * 100_000))
            .collect();
        assert_eq!(picks.iter().filter(|n| *n == "g").count(), 16, "{picks:?}");
        // Full nodes, stale figures and too little memory are left out as by `place`.
        let full = LoadVector { free_slots: 0, ..node("b", 0, 2) };
        let stale = LoadVector { age: Duration::from_secs(11), ..node("c", 0, 2) };
        for pick in 0..4 {
            assert_eq!(place_spread(&here, &[full.clone(), stale.clone()], 1 << 30, age, pick).as_deref(), Some("a"));
        }
        assert_eq!(place_spread(&here, &window, 10 << 30, age, 0), None, "nobody has 10 GiB free");
        // Where `place` keeps the work here, it stays, whatever the pick.
        let light = node("a", 0, 2);
        for pick in 0..4 {
            assert_eq!(place_spread(&light, &window, 1 << 30, age, pick).as_deref(), Some("a"));
        }
    }
}
