//! The agent acting on the balancing policy ([`crate::policy::balance`]): once a second it
//! lists the migratable processes running at its node (jobs whose home is here and that run
//! here, found through their job files, and processes that moved in), measures what each used
//! of a CPU since the last look, and, if the policy says so, asks the job's home to move one to
//! the node it names (the home moves it as `mosctl migrate` would). After a move it lets the
//! destination's load settle for a few seconds, and until the destination's vector is younger
//! than the move it counts the process there itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mosaic_transport::{connect, ClusterKey, ConnectOptions};

use crate::gossip::Gossiper;
use crate::policy::{balance, BalanceParams, Candidate};
use crate::wire;

/// A process the balancer could move: its pid here, and how to reach its home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Here {
    /// A job whose home is this node (its pid at home: its job file's name).
    Home(u32),
    /// A process that moved in; its home's address.
    Guest(String),
}

/// What the balancer remembers of a process between looks.
struct Seen {
    first: Instant,
    cpu_ticks: u64,
    at: Instant,
}

/// How long to wait after a move before deciding again (fresh load of the destination).
const AFTER_MOVE: Duration = Duration::from_secs(3);

/// Runs the balancing loop until `stop`: `here` lists the processes running at this node
/// (pid here, and how to move it).
pub(crate) fn run(
    gossip: &Gossiper,
    params: &BalanceParams,
    key: &ClusterKey,
    here: &dyn Fn() -> Vec<(u32, Here)>,
    stop: &Arc<AtomicBool>,
) {
    let tick = clock_ticks();
    let mut seen: HashMap<u32, Seen> = HashMap::new();
    let mut quiet_until = Instant::now();
    let mut refused: HashMap<u32, Instant> = HashMap::new();
    // Moves whose destination has not said since that it has the process: (node, when, share).
    let mut pending: Vec<(String, Instant, u64)> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_secs(1));
        let procs = here();
        let now = Instant::now();
        seen.retain(|pid, _| procs.iter().any(|(p, _)| p == pid));
        let mut candidates = Vec::new();
        for (pid, _) in &procs {
            let Some((ticks, age)) = cpu_and_age(*pid, tick) else { continue };
            let s = seen.entry(*pid).or_insert(Seen { first: now, cpu_ticks: ticks, at: now });
            let elapsed = now.duration_since(s.at).as_secs_f64();
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a few seconds of ticks
            // Hundredths of a CPU: ticks used over ticks elapsed.
            let elapsed_ticks = (elapsed * tick as f64) as u64;
            let cpu = ticks.saturating_sub(s.cpu_ticks) * 100 / elapsed_ticks.max(1);
            (s.cpu_ticks, s.at) = (ticks, now);
            candidates.push(Candidate {
                pid: *pid,
                ran: age.max(now.duration_since(s.first)),
                here_for: now.duration_since(s.first),
                cpu,
                locked: false,
            });
        }
        refused.retain(|_, until| *until > now);
        candidates.retain(|c| !refused.contains_key(&c.pid));
        if now < quiet_until || candidates.is_empty() {
            continue;
        }
        let view = gossip.view();
        // What was heard of a destination before a move there does not count the process sent:
        // count it until a vector younger than the move comes.
        pending.retain(|(_, at, _)| at.elapsed() < Duration::from_secs(60));
        let mut window = view.window.clone();
        pending.retain(|(dest, at, share)| {
            let Some(w) = window.iter_mut().find(|w| &w.node == dest) else { return true };
            if w.age < at.elapsed() {
                return false; // fresh: it counts the process itself
            }
            w.load = w.load.saturating_add(u32::try_from(*share).unwrap_or(u32::MAX));
            w.free_slots = w.free_slots.saturating_sub(1);
            true
        });
        log::debug!(
            "balancing: load here {} on {} CPU(s); there {:?}; candidates {:?}",
            view.own.load,
            view.own.cpus,
            window.iter().map(|w| (&w.node, w.load, w.cpus, w.age)).collect::<Vec<_>>(),
            candidates.iter().map(|c| (c.pid, c.cpu, c.here_for)).collect::<Vec<_>>()
        );
        let Some(m) = balance(&view.own, &window, &candidates, params) else { continue };
        let share = candidates.iter().find(|c| c.pid == m.pid).map_or(100, |c| c.cpu.max(100));
        let Some((_, how)) = procs.iter().find(|(p, _)| *p == m.pid) else { continue };
        log::info!(
            "balancing: moving process {} to {} (expected to save {:.1} s)",
            m.pid,
            m.to,
            m.expected_gain.as_secs_f64()
        );
        match ask_home(how, &m.to, key, true) {
            Ok(()) => {
                log::info!("balancing: process {} moved to {}", m.pid, m.to);
                pending.push((m.to.clone(), Instant::now(), share));
            }
            Err(e) => {
                log::warn!("balancing: process {} could not move to {}: {e}", m.pid, m.to);
                // Not tried again for a minute (locked to its node, say).
                refused.insert(m.pid, Instant::now() + Duration::from_secs(60));
            }
        }
        seen.remove(&m.pid);
        quiet_until = Instant::now() + AFTER_MOVE;
    }
}

/// Asks the home of a process to move it to `to`; `automatic`: the balancer asks (a job locked
/// to its node refuses), not an admin.
pub(crate) fn ask_home(how: &Here, to: &str, key: &ClusterKey, automatic: bool) -> Result<(), String> {
    match how {
        Here::Home(pid) => {
            let home = std::fs::read_to_string(crate::job_file(&crate::run_dir(), *pid))
                .map_err(|e| format!("the job file of {pid}: {e}"))?;
            ask(home.trim(), to, key, automatic)
        }
        Here::Guest(home) => ask(home, to, key, automatic),
    }
}

/// Asks the home at `home` to move its job to `to`.
fn ask(home: &str, to: &str, key: &ClusterKey, automatic: bool) -> Result<(), String> {
    let mut o = ConnectOptions::new(key.clone());
    o.timeout = Duration::from_secs(60);
    o.connect_timeout = Duration::from_secs(5);
    let c = connect(home, &o).map_err(|e| mosaic_transport::error_chain(&e))?;
    let mut e = wire::Enc::default();
    e.str(to).u8(u8::from(automatic));
    c.call(wire::MIGRATE, &e.0).map(drop).map_err(|e| mosaic_transport::error_chain(&e))
}

/// The kernel's clock ticks per second (`USER_HZ`).
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// A process's CPU time (user + system, in ticks) and age, from `/proc/PID/stat`.
fn cpu_and_age(pid: u32, tick: u64) -> Option<(u64, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = crate::info::load::stat_fields(&stat)?;
    // Fields 14, 15 (utime, stime) and 22 (starttime).
    let (utime, stime, start): (u64, u64, u64) =
        (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?, f.get(19)?.parse().ok()?);
    let uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
    let age = Duration::from_secs_f64((uptime - start as f64 / tick as f64).max(0.0));
    Some((utime + stime, age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_cpu_time_and_age_are_read() {
        let (ticks, age) = cpu_and_age(std::process::id(), clock_ticks()).unwrap();
        let _ = ticks;
        assert!(age < Duration::from_secs(3600), "{age:?}");
        assert!(cpu_and_age(u32::MAX, 100).is_none());
    }
}
