//! A node's load vector: what it tells the others about itself, measured from `/proc`.

use std::time::Duration;

/// What one node says about itself (the seed's load vector): enough for a peer to decide
/// whether to send it work or memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadVector {
    /// The node's agent address (how to reach it).
    pub node: String,
    /// Runnable threads, averaged over the last minute, in hundredths (`/proc/loadavg`).
    pub load: u32,
    /// CPUs the node has.
    pub cpus: u16,
    /// The node's speed per CPU, in arbitrary units the cluster agrees on (1,000: a reference
    /// core; `mosctl tune` measures it).
    pub speed: u32,
    /// Share of CPU time busy since the previous measure, in hundredths of a percent.
    pub busy: u16,
    /// Memory available for new work, bytes (`MemAvailable`).
    pub free_memory: u64,
    /// All memory, bytes.
    pub total_memory: u64,
    /// Memory pressure: share of the last 10 s in which some task stalled on memory, in
    /// hundredths of a percent (`/proc/pressure/memory`, `some avg10`; 0 where absent).
    pub pressure: u16,
    /// Processes it would still take (0: full).
    pub free_slots: u16,
    /// How old this information is, as the sender knew it when it sent it.
    pub age: Duration,
    /// The node's memory server (network RAM it donates), empty if none.
    pub memory_server: String,
}

/// Bytes of a vector's encoding besides its node's and memory server's addresses (and the
/// memory server's length byte).
pub const FIXED_BYTES: usize = 4 + 2 + 4 + 2 + 8 + 8 + 2 + 2 + 4 + 1;

impl LoadVector {
    /// A vector for `node` with nothing measured (an idle node of one CPU, no memory).
    pub fn empty(node: &str) -> LoadVector {
        LoadVector {
            node: node.to_string(),
            load: 0,
            cpus: 1,
            speed: 1000,
            busy: 0,
            free_memory: 0,
            total_memory: 0,
            pressure: 0,
            free_slots: 0,
            age: Duration::ZERO,
            memory_server: String::new(),
        }
    }

    /// Appends the encoding (little-endian; the two addresses last, each after its length in a
    /// byte).
    pub fn encode(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.load.to_le_bytes());
        b.extend_from_slice(&self.cpus.to_le_bytes());
        b.extend_from_slice(&self.speed.to_le_bytes());
        b.extend_from_slice(&self.busy.to_le_bytes());
        b.extend_from_slice(&self.free_memory.to_le_bytes());
        b.extend_from_slice(&self.total_memory.to_le_bytes());
        b.extend_from_slice(&self.pressure.to_le_bytes());
        b.extend_from_slice(&self.free_slots.to_le_bytes());
        let age_ms = u32::try_from(self.age.as_millis()).unwrap_or(u32::MAX);
        b.extend_from_slice(&age_ms.to_le_bytes());
        for text in [&self.node, &self.memory_server] {
            let bytes = &text.as_bytes()[..text.len().min(255)];
            b.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
            b.extend_from_slice(bytes);
        }
    }

    /// Decodes one from the front of `b`, returning it and what follows; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<(LoadVector, &[u8])> {
        let (fixed, rest) = b.split_at_checked(FIXED_BYTES)?;
        let u16_at = |i: usize| u16::from_le_bytes([fixed[i], fixed[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(fixed[i..i + 8].try_into().unwrap_or_default());
        let len = usize::from(fixed[FIXED_BYTES - 1]);
        let (addr, rest) = rest.split_at_checked(len)?;
        let node = std::str::from_utf8(addr).ok()?.to_string();
        let (&len, rest) = rest.split_first()?;
        let (memory, rest) = rest.split_at_checked(usize::from(len))?;
        let memory_server = std::str::from_utf8(memory).ok()?.to_string();
        let v = LoadVector {
            node,
            load: u32_at(0),
            cpus: u16_at(4),
            speed: u32_at(6),
            busy: u16_at(10),
            free_memory: u64_at(12),
            total_memory: u64_at(20),
            pressure: u16_at(28),
            free_slots: u16_at(30),
            age: Duration::from_millis(u64::from(u32_at(32))),
            memory_server,
        };
        (v.cpus > 0 && v.free_memory <= v.total_memory).then_some((v, rest))
    }

    /// The load per CPU, scaled by speed: runnable threads per reference core, in hundredths.
    /// What balancing compares between nodes.
    pub fn effective_load(&self) -> u64 {
        let capacity = u64::from(self.cpus.max(1)) * u64::from(self.speed.max(1));
        u64::from(self.load) * 1000 / capacity
    }
}

/// What a node carries from one measure to the next: CPU time counters (how busy the CPUs were
/// in between) and the smoothed load.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
    /// Runnable threads on the node's CPUs, smoothed, in hundredths.
    load: Option<u32>,
}

/// Measures this node's vector from `/proc` (fields it cannot read stay as in
/// [`LoadVector::empty`]). `last` holds what the previous measure left and is updated.
///
/// The node's CPUs are those this process may run on (its affinity: all of the host's, unless
/// the agent was started pinned, as tests pin agents to stand for separate hosts on one
/// machine); its load is the number of threads runnable on them (sampled from
/// `/proc/*/task/*/stat`, the agent's own left out), smoothed over a few seconds: faster than
/// the one-minute load average, so that a process that just left stops counting soon.
pub fn measure(node: &str, speed: u32, free_slots: u16, last: &mut CpuTimes) -> LoadVector {
    let mut v = LoadVector::empty(node);
    v.speed = speed;
    v.free_slots = free_slots;
    let cpus = own_cpus();
    v.cpus = u16::try_from(cpus.len().max(1)).unwrap_or(u16::MAX);
    let now = runnable_on(&cpus).saturating_mul(100);
    let smoothed = last.load.map_or(now, |l| (l + now) / 2);
    last.load = Some(smoothed);
    v.load = smoothed;
    if let Ok(s) = std::fs::read_to_string("/proc/meminfo") {
        let (free, total) = parse_meminfo(&s);
        v.free_memory = free.min(total);
        v.total_memory = total;
    }
    // A node in a memory cgroup with a limit (a container) has that much memory.
    if let Some((limit, room)) = cgroup_memory() {
        v.total_memory = v.total_memory.min(limit);
        v.free_memory = v.free_memory.min(room).min(v.total_memory);
    }
    if let Ok(s) = std::fs::read_to_string("/proc/pressure/memory") {
        v.pressure = parse_pressure(&s).unwrap_or(0);
    }
    if let Ok(s) = std::fs::read_to_string("/proc/stat") {
        if let Some(now) = parse_stat(&s) {
            let (busy, total) = (now.busy.saturating_sub(last.busy), now.total.saturating_sub(last.total));
            if total > 0 && last.total > 0 {
                v.busy = u16::try_from(busy * 10_000 / total).unwrap_or(10_000);
            }
            *last = CpuTimes { load: last.load, ..now };
        }
    }
    v
}

/// The CPUs this process may run on.
pub fn own_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it for this process.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, std::num::NonZero::get)).collect();
        }
        set
    };
    // SAFETY: CPU_ISSET reads the set filled above, within CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Threads of other processes runnable (state R) whose last CPU is in `cpus`.
pub fn runnable_on(cpus: &[usize]) -> u32 {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    let mut n = 0;
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit()) && *s != me) else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
            if let Some((state, cpu)) = parse_task_stat(&stat) {
                n += u32::from(state == 'R' && cpus.contains(&cpu));
            }
        }
    }
    n
}

/// The fields of a `/proc/PID/stat` (or task `stat`) line from the state (field 3) on: the
/// name before it, in parentheses, may hold spaces. Field N is at index N - 3.
pub(crate) fn stat_fields(s: &str) -> Option<Vec<&str>> {
    Some(s.get(s.rfind(')')? + 2..)?.split_whitespace().collect())
}

/// A task's state and last CPU from its `stat` line (fields 3 and 39).
fn parse_task_stat(s: &str) -> Option<(char, usize)> {
    let f = stat_fields(s)?;
    Some((f.first()?.chars().next()?, f.get(36)?.parse().ok()?))
}

/// The one-minute load average of `/proc/loadavg`, in hundredths.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to the range first
#[cfg(test)]
fn parse_loadavg(s: &str) -> Option<u32> {
    let first: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some((first * 100.0).round().clamp(0.0, f64::from(u32::MAX)) as u32)
}

/// `MemAvailable` and `MemTotal` of `/proc/meminfo`, in bytes.
fn parse_meminfo(s: &str) -> (u64, u64) {
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemAvailable:"), field("MemTotal:"))
}

/// The memory limit of this process's memory cgroups, and the room left under it, if its own or
/// an ancestor has a limit: of the cgroups from its own up to the root, the smallest limit and
/// the least room (limit less use; the two may come from different cgroups).
/// cgroup v2's `memory.max` and `memory.current`, or v1's `memory.limit_in_bytes` and
/// `memory.usage_in_bytes`; inactive file cache, which the kernel drops before it runs short,
/// is not counted as used.
fn cgroup_memory() -> Option<(u64, u64)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let (base, v1) = if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", true)
        } else if id == "0" && controllers.is_empty() {
            ("/sys/fs/cgroup", false)
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(format!("{base}{path}"));
        let mut tightest: Option<(u64, u64)> = None;
        while dir.starts_with(base) {
            if let Some((limit, used)) = cgroup_dir_memory(&dir, v1) {
                let room = limit.saturating_sub(used);
                tightest = Some(tightest.map_or((limit, room), |(l, r)| (l.min(limit), r.min(room))));
            }
            if !dir.pop() {
                break;
            }
        }
        if tightest.is_some() || v1 {
            return tightest;
        }
    }
    None
}

/// The limit and use of the memory cgroup at `dir` (v1 or v2), if it has a limit.
fn cgroup_dir_memory(dir: &std::path::Path, v1: bool) -> Option<(u64, u64)> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let number = |name: &str| read(name)?.trim().parse::<u64>().ok();
    let stat = read("memory.stat").unwrap_or_default();
    let (limit, used, cache) = if v1 {
        (number("memory.limit_in_bytes")?, number("memory.usage_in_bytes")?, stat_value(&stat, "total_inactive_file"))
    } else {
        // "max": no limit.
        (number("memory.max")?, number("memory.current")?, stat_value(&stat, "inactive_file"))
    };
    Some((limit, used.saturating_sub(cache.unwrap_or(0))))
}

/// The value of `name` in a cgroup `memory.stat` file.
fn stat_value(stat: &str, name: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `some avg10` of `/proc/pressure/memory`, in hundredths of a percent.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to the range first
fn parse_pressure(s: &str) -> Option<u16> {
    let some = s.lines().find(|l| l.starts_with("some"))?;
    let avg10: f64 = some.split_whitespace().find_map(|w| w.strip_prefix("avg10="))?.parse().ok()?;
    Some((avg10 * 100.0).round().clamp(0.0, 10_000.0) as u16)
}

/// The busy and total jiffies of `/proc/stat`'s `cpu` line (idle and iowait are not busy).
fn parse_stat(s: &str) -> Option<CpuTimes> {
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let n: Vec<u64> = line.split_whitespace().skip(1).filter_map(|w| w.parse().ok()).collect();
    let total: u64 = n.iter().take(8).sum();
    let idle = n.get(3).copied().unwrap_or(0) + n.get(4).copied().unwrap_or(0);
    Some(CpuTimes { busy: total.saturating_sub(idle), total, load: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_round_trips_and_a_cut_one_is_refused() {
        let v = LoadVector {
            node: "tcp://10.0.0.7:7070".into(),
            load: 350,
            cpus: 16,
            speed: 1200,
            busy: 8_750,
            free_memory: 3 << 30,
            total_memory: 64 << 30,
            pressure: 125,
            free_slots: 4,
            age: Duration::from_millis(1500),
            memory_server: "tcp://10.0.0.7:7071".into(),
        };
        let mut b = Vec::new();
        v.encode(&mut b);
        b.push(9);
        let (back, rest) = LoadVector::decode(&b).unwrap();
        assert_eq!((back, rest), (v.clone(), &[9u8][..]));
        for cut in 0..b.len() - 1 {
            assert!(LoadVector::decode(&b[..cut]).is_none(), "cut at {cut}");
        }
        let mut bent = v.clone();
        bent.free_memory = bent.total_memory + 1;
        let mut b = Vec::new();
        bent.encode(&mut b);
        assert!(LoadVector::decode(&b).is_none(), "more free memory than memory");
    }

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_loadavg("1.25 0.80 0.50 2/345 6789\n"), Some(125));
        let meminfo = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(meminfo), (20_000_000 * 1024, 24_576_000 * 1024));
        let psi = "some avg10=1.50 avg60=0.20 avg300=0.00 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_pressure(psi), Some(150));
        let cg = "cache 5\nhierarchical_memory_limit 536870912\ninactive_file 7\ntotal_inactive_file 4096\n";
        assert_eq!(stat_value(cg, "hierarchical_memory_limit"), Some(512 << 20));
        assert_eq!((stat_value(cg, "inactive_file"), stat_value(cg, "total_inactive_file")), (Some(7), Some(4096)));
        assert_eq!(stat_value(cg, "active_file"), None);
        let stat = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n";
        let t = parse_stat(stat).unwrap();
        assert_eq!((t.busy, t.total), (200, 1000));
        let mut last = CpuTimes::default();
        let v = measure("tcp://127.0.0.1:1", 1000, 2, &mut last);
        assert!(v.total_memory > 0 && v.cpus >= 1 && last.total > 0, "{v:?}");
        let stat = "1234 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 1 7 0 0";
        assert_eq!(parse_task_stat(stat), Some(('R', 1)));
        assert_eq!(parse_task_stat("1 (x) S 1"), None);
    }

    #[test]
    fn effective_load_counts_cpus_and_speed() {
        let mut v = LoadVector::empty("a");
        v.load = 400;
        v.cpus = 4;
        assert_eq!(v.effective_load(), 100);
        v.speed = 2000;
        assert_eq!(v.effective_load(), 50);
    }
}
