//! The main job's balancing part: two node agents in processes of their own (this program re-run
//! as `node-agent`), each pinned to a CPU of its own so that it stands for a host, with balancing
//! on; two CPU-bound jobs (this program re-run as `spin`) started at the first, this process
//! their home. The first agent moves one to the second, and both finish sooner than the same
//! two jobs sharing one CPU (measured first, in the same run). It prints what `mosctl ps` and
//! `mosmon --once` show.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mosaic_cluster::gossip::ask_view;
use mosaic_cluster::{job_where, Agent, AgentConfig, Home, MIGRATE_SIGNAL};
use mosaic_transport::ClusterKey;

/// Rounds of `spin` a job does: a few seconds of one CPU here.
pub const SPIN_ROUNDS: u64 = 3_000_000_000;

/// Runs this process (and the threads it starts from now on) on CPU `cpu` only.
pub fn pin_to(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it (cpu is checked
    // against CPU_SETSIZE), and sched_setaffinity reads it.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(format!("no CPU {cpu}"));
        }
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    ok.then_some(()).ok_or_else(|| format!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error()))
}

/// A CPU-bound computation: `rounds` of a xorshift hash.
pub fn spin(rounds: u64) -> u64 {
    let mut x: u64 = 88_172_645_463_325_252;
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x)
}

/// The `node-agent` mode: an agent pinned to `cpu`, gossiping (through `join`, if given) and
/// balancing, until its standard input closes. Prints `listening at URI` first.
pub fn agent_main(cpu: usize, join: Option<String>) -> Result<(), String> {
    pin_to(cpu)?;
    let key = ClusterKey::from_env().map_err(|e| e.to_string())?;
    let mut c = AgentConfig::new("tcp://127.0.0.1:0", key);
    c.restorer = (std::env::current_exe().map_err(|e| e.to_string())?, vec!["restore".into()]);
    c.gossip = Some(mosaic_cluster::gossip::GossipSettings::new(join.into_iter().collect()));
    c.balance = Some(mosaic_cluster::policy::BalanceParams {
        min_residence: Duration::from_millis(1500),
        ..Default::default()
    });
    let agent = Agent::start(c).map_err(|e| e.to_string())?;
    println!("listening at {}", agent.uri());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    agent.shutdown();
    Ok(())
}

/// A child process killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a `node-agent` on `cpu`; returns it and its address.
fn start_agent(
    exe: &Path,
    cpu: usize,
    join: Option<&str>,
    key: &str,
    run_dir: &Path,
) -> Result<(Reaped, String), String> {
    let mut cmd = Command::new(exe);
    cmd.args(["node-agent", "--cpu", &cpu.to_string()]);
    if let Some(j) = join {
        cmd.args(["--join", j]);
    }
    let mut child = cmd
        .env("MOSAIC_CLUSTER_KEY", key)
        .env("MOSAIC_RUN_DIR", run_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting an agent: {e}"))?;
    let out = child.stdout.take().ok_or("no output")?;
    let child = Reaped(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).map_err(|e| e.to_string())?;
    let uri = line.trim().strip_prefix("listening at ").ok_or_else(|| format!("the agent said {line:?}"))?;
    Ok((child, uri.to_string()))
}

/// Two `spin`s at once on CPU 0, as plain processes: how long until both ended.
fn two_sharing_a_cpu(exe: &Path) -> Result<Duration, String> {
    let t = Instant::now();
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let c = Command::new(exe).args(["spin", "--cpu", "0"]).stdout(Stdio::null()).spawn();
        jobs.push(Reaped(c.map_err(|e| e.to_string())?));
    }
    for j in &mut jobs {
        j.0.wait().map_err(|e| e.to_string())?;
    }
    Ok(t.elapsed())
}

/// One migratable job: the process, its home here, and its output.
struct Job {
    child: Reaped,
    home: Home,
    out: Arc<Mutex<Vec<u8>>>,
    /// Reads what it prints while it runs here.
    reader: Option<std::thread::JoinHandle<()>>,
    /// The process here ended (the job itself, or the stopped copy of a job that left).
    ended_here: bool,
    status: Option<i32>,
}

impl Job {
    fn start(exe: &Path, preload: &Path, agent: &str, key: &ClusterKey, run_dir: &Path) -> Result<Job, String> {
        let mut cmd = Command::new(exe);
        cmd.args(["spin", "--cpu", "0"])
            .env("LD_PRELOAD", preload)
            .env("MOSAIC_MIGRATE_SIGNAL", MIGRATE_SIGNAL.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        mosaic_migrate::process::standard_descriptors_only(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| format!("spin: {e}"))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let child = Reaped(child);
        let out = Arc::new(Mutex::new(Vec::new()));
        let reader = stdout.map(|mut s| {
            let o = out.clone();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = std::io::Read::read_to_end(&mut s, &mut v);
                o.lock().map(|mut o| o.extend_from_slice(&v)).ok();
            })
        });
        let mut home = Home::start("tcp://127.0.0.1:0", key.clone(), agent, pid, "spin").map_err(|e| e.to_string())?;
        home.publish(run_dir).map_err(|e| e.to_string())?;
        let o = out.clone();
        home.set_output(Box::new(move |_stream, bytes| {
            o.lock().map(|mut v| v.extend_from_slice(bytes)).map_err(|_| std::io::Error::other("lock"))
        }));
        Ok(Job { child, home, out, reader, ended_here: false, status: None })
    }

    /// Its wait status, once it ended (here, or wherever it moved); never waits for it.
    fn poll(&mut self) -> Result<Option<i32>, String> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        if let Some(s) = self.home.exit_status() {
            // It ended elsewhere: the stopped copy here goes.
            let _ = self.child.0.kill();
            let _ = self.child.0.wait();
            self.status = Some(s);
        } else if !self.ended_here {
            if let Some(st) = self.child.0.try_wait().map_err(|e| e.to_string())? {
                self.ended_here = true;
                // (left() waits only while a move is under way.)
                if !self.home.left() {
                    self.status = Some(raw(st));
                }
            }
        }
        if self.status.is_some() {
            if let Some(r) = self.reader.take() {
                let _ = r.join();
            }
        }
        Ok(self.status)
    }
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn raw(st: ExitStatus) -> i32 {
    std::os::unix::process::ExitStatusExt::into_raw(st)
}

/// Runs the part; `Ok(None)` with the reason when it cannot run here.
pub fn run() -> Result<Option<String>, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Some("needs root (moving a process makes a pid namespace)".into()));
    }
    let Some(preload) = crate::migration::preload() else {
        return Ok(Some("libmosaic_preload.so is not built (cargo build --release -p mosaic-preload)".into()));
    };
    if std::thread::available_parallelism().map_or(1, std::num::NonZero::get) < 2 {
        return Ok(Some("needs two CPUs (one per node)".into()));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let key_text = ClusterKey::random_text().map_err(|e| e.to_string())?;
    let key = ClusterKey::from_bytes(key_text.as_bytes()).map_err(|e| e.to_string())?;
    let dir = TempDir(std::env::temp_dir().join(format!("netram-demo-balance-{}", std::process::id())));
    let run_dir = dir.0.clone();
    let expected = format!("{}\n", spin(SPIN_ROUNDS));
    let off = two_sharing_a_cpu(&exe)?;
    let (_a, a) = start_agent(&exe, 0, None, &key_text, &run_dir)?;
    let (_b, b) = start_agent(&exe, 1, Some(&a), &key_text, &run_dir)?;
    println!("balancing: agents A at {a} (CPU 0) and B at {b} (CPU 1), each standing for a host, balancing on");
    let conn = mosaic_cluster::connect_agent(&a, &key, Duration::from_secs(5))?;
    let t = Instant::now();
    while !ask_view(&conn).is_ok_and(|v| v.window.iter().any(|w| w.node == b)) {
        if t.elapsed() > Duration::from_secs(15) {
            return Err("agent A never heard of B".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let mut jobs = (0..2).map(|_| Job::start(&exe, &preload, &a, &key, &run_dir)).collect::<Result<Vec<_>, _>>()?;
    println!("balancing: two CPU-bound jobs started at A");
    let mut moved = false;
    let mut table = None;
    while jobs.iter().any(|j| j.status.is_none()) {
        if t.elapsed() > Duration::from_secs(120) {
            return Err("the jobs did not end within two minutes".into());
        }
        for j in &mut jobs {
            j.poll()?;
        }
        if !moved {
            for j in &jobs {
                let pid = j.child.0.id();
                if let Ok((node, there, _, _)) = job_where(&run_dir, pid, &key) {
                    if node == b {
                        moved = true;
                        println!(
                            "balancing: A moved job {pid} to B (`mosctl ps` after {:.1} s: {pid} at {node}, pid {there} there)",
                            t.elapsed().as_secs_f64()
                        );
                        // What mosmon shows while both run, a second later (fresh load).
                        std::thread::sleep(Duration::from_secs(1));
                        table = ask_view(&conn).ok().map(|v| v.text_table());
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let on = t.elapsed();
    for j in &jobs {
        let st = j.status.unwrap_or(-1);
        if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
            return Err(format!("a job ended with wait status {st:#x}"));
        }
        if String::from_utf8_lossy(&j.out.lock().map_err(|_| "lock")?) != expected {
            return Err("a job printed something else than the computation's result".into());
        }
    }
    if let Some(t) = table {
        println!("balancing: what `mosmon --once` showed from A then:");
        for line in t.lines() {
            println!("balancing:   {line}");
        }
    }
    if !moved {
        return Err("no job moved to the idle node".into());
    }
    println!(
        "balancing: both jobs done in {:.2} s with balancing, against {:.2} s for the same two sharing one CPU; results right",
        on.as_secs_f64(),
        off.as_secs_f64()
    );
    Ok(None)
}
