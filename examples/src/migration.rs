//! The main job's migration part: a small cluster of two node agents on loopback
//! (`mosaic_cluster::Agent`, in this process), and an unmodified `python3` computing primes that
//! moves from one to the other and back while it runs; its output must equal an unmigrated
//! run's. This process is the job's home (as `mosrun --migratable` would be) and the agents'
//! restorer (re-run as `restore`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mosaic_cluster::{migrate_job, Agent, AgentConfig, Home, Moved, MIGRATE_SIGNAL};
use mosaic_transport::ClusterKey;

/// The program that moves: primes up to 60,000, a line every 500 numbers.
const SCRIPT: &str = "import time\n\
primes = []\n\
for n in range(2, 60001):\n\
\x20   if all(n % p for p in primes if p * p <= n):\n\
\x20       primes.append(n)\n\
\x20   if n % 500 == 0:\n\
\x20       print(n, len(primes), sum(primes) % 1000003, flush=True)\n\
\x20       time.sleep(0.01)\n";

/// libmosaic_preload.so: beside this program, or where cargo builds it for a dependent.
pub fn preload() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("libmosaic_preload.so"), dir.join("deps/libmosaic_preload.so")].into_iter().find(|p| p.is_file())
}

fn wait_for(out: &Mutex<Vec<u8>>, text: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !String::from_utf8_lossy(&out.lock().map_err(|_| "lock")?).contains(text) {
        if Instant::now() > deadline {
            return Err(format!("python3 never printed {text:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn said(node: &str, m: &Moved) -> String {
    format!(
        "moved to node {node}: stopped {:.1} ms, {} KiB of image, the rest of {:.1} MiB of anonymous mappings following post-copy (pid {} there)",
        m.freeze_us as f64 / 1000.0,
        m.image_bytes / 1024,
        m.post_copy_bytes as f64 / f64::from(1 << 20),
        m.pid
    )
}

/// Runs the part; `Ok(None)` with the reason when it cannot run here.
pub fn run() -> Result<Option<String>, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Some("needs root (the restorer makes a pid namespace)".into()));
    }
    let Some(preload) = preload() else {
        return Ok(Some("libmosaic_preload.so is not built (cargo build --release -p mosaic-preload)".into()));
    };
    let python = Path::new("/usr/bin/python3");
    if !python.is_file() {
        return Ok(Some("no /usr/bin/python3".into()));
    }
    let t = Instant::now();
    let expected = Command::new(python).args(["-c", SCRIPT]).output().map_err(|e| format!("python3: {e}"))?;
    let alone = t.elapsed();

    let key_text = ClusterKey::random_text().map_err(|e| e.to_string())?;
    let key = ClusterKey::from_bytes(key_text.as_bytes()).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let agent = |name: &str, join: Vec<String>| {
        let mut c = AgentConfig::new("tcp://127.0.0.1:0", key.clone());
        c.restorer = (exe.clone(), vec!["restore".into()]);
        c.gossip = Some(mosaic_cluster::gossip::GossipSettings::new(join));
        Agent::start(c).map_err(|e| format!("agent {name}: {e}"))
    };
    let a = agent("A", Vec::new())?;
    let b = agent("B", vec![a.uri().to_string()])?;
    println!("migration: node agents A at {} and B at {} (B joins through A)", a.uri(), b.uri());
    // The cluster level: each agent learns the other and its load by gossip.
    let t = Instant::now();
    let knows = |x: &Agent, y: &Agent| x.cluster_view().is_some_and(|v| v.window.iter().any(|w| w.node == y.uri()));
    while !(knows(&a, &b) && knows(&b, &a)) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(v) = a.cluster_view() {
        println!(
            "cluster: A knows {} other node(s) after {:.0} ms of gossip:",
            v.members.len(),
            t.elapsed().as_secs_f64() * 1000.0
        );
        for w in &v.window {
            println!(
                "cluster:   {} load {:.2} on {} CPU(s), {:.1} of {:.1} GiB free, memory pressure {:.2}%, heard {:.1} s ago",
                w.node,
                f64::from(w.load) / 100.0,
                w.cpus,
                w.free_memory as f64 / f64::from(1u32 << 30),
                w.total_memory as f64 / f64::from(1u32 << 30),
                f64::from(w.pressure) / 100.0,
                w.age.as_secs_f64()
            );
        }
    }

    let out = Arc::new(Mutex::new(Vec::new()));
    let mut cmd = Command::new(python);
    cmd.args(["-c", SCRIPT])
        .env("LD_PRELOAD", &preload)
        .env("MOSAIC_MIGRATE_SIGNAL", MIGRATE_SIGNAL.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    mosaic_migrate::process::standard_descriptors_only(&mut cmd);
    let t = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("python3: {e}"))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().ok_or("no output")?;
    let o = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            o.lock().map(|mut v| v.extend_from_slice(&buf[..n])).ok();
        }
    });
    let run_dir = std::env::temp_dir().join(format!("netram-demo-jobs-{}", std::process::id()));
    let mut home =
        Home::start("tcp://127.0.0.1:0", key.clone(), a.uri(), pid, "python3 -c primes").map_err(|e| e.to_string())?;
    home.publish(&run_dir).map_err(|e| e.to_string())?;
    let o = out.clone();
    home.set_output(Box::new(move |_stream, bytes| {
        o.lock().map(|mut v| v.extend_from_slice(bytes)).map_err(|_| std::io::Error::other("lock"))
    }));
    println!("migration: python3 (pid {pid}) runs at node A, its home here");
    let outcome = (|| {
        wait_for(&out, "\n10000 ", Duration::from_secs(60))?;
        let m = migrate_job(&run_dir, pid, b.uri(), &key).map_err(|e| e.to_string())?;
        println!("migration: python3 {}", said("B", &m));
        wait_for(&out, "\n30000 ", Duration::from_secs(60))?;
        let m = migrate_job(&run_dir, pid, a.uri(), &key).map_err(|e| e.to_string())?;
        println!("migration: python3 {} (and back)", said("A", &m));
        Ok::<_, String>(home.wait_exit())
    })();
    let status = match outcome {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let _ = child.wait();
    let _ = reader.join();
    let _ = std::fs::remove_dir_all(&run_dir);
    let got = out.lock().map_err(|_| "lock")?.clone();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!("the migrated python3 ended with wait status {status:#x}"));
    }
    if got != expected.stdout {
        return Err("the migrated python3 printed something else than the unmigrated run".into());
    }
    println!(
        "migration: python3 moved there and back; {} lines, output identical to the unmigrated run; {:.2} s against {:.2} s unmigrated",
        got.iter().filter(|&&c| c == b'\n').count(),
        t.elapsed().as_secs_f64(),
        alone.as_secs_f64()
    );
    Ok(None)
}
