//! `netram-demo`: a local Mosaic cluster on loopback, and a sort four times larger than its RAM.
//!
//! Starts memory servers as separate processes on 127.0.0.1 (this binary, re-run as `serve`),
//! maps a network-RAM region whose resident budget is a quarter of its size, fills it with
//! pseudo-random 64-bit keys, sorts them in place, and proves the result: sorted, and the same
//! multiset of keys (sum and xor of all keys unchanged). It prints where the pages went and the
//! figures, beside the same sort on ordinary local memory. Then DSM: the Jacobi example
//! (`mosaic_examples::jacobi`) on a job of one process and on a job of `--dsm-nodes` processes
//! (this binary, re-run as `jacobi-node`, meeting at a node agent), whose checksums must be
//! equal. Then migration: two node agents in this process, and `python3` moved from one to the
//! other and back while it runs, its output equal to an unmigrated run's (root only; see
//! `mosaic_examples::migration`). Then balancing (see `mosaic_examples::balancing`).
//!
//! ```text
//! cargo run --release -p mosaic-examples --bin netram-demo
//! cargo run --release -p mosaic-examples --bin netram-demo -- --size 1G --budget 256M --servers 4
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mosaic_cluster::{Agent, AgentConfig};
use mosaic_dsm::Rendezvous;
use mosaic_examples::{balancing, jacobi};
use mosaic_netram::{parse_size, MemServer, MemServerConfig, NetRam, NetRamConfig};
use mosaic_pager::FaultMode;
use mosaic_transport::ClusterKey;

#[derive(Parser)]
#[command(
    name = "netram-demo",
    version,
    about = "A local Mosaic cluster on loopback sorting more data than its RAM budget"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Data to sort (a network-RAM region of this size).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Local RAM the region may use.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    budget: u64,
    /// Memory servers to start (separate processes on 127.0.0.1).
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Copies of each page (on distinct servers).
    #[arg(long, default_value_t = 2)]
    copies: usize,
    /// Transport between the program and its servers: tcp or shm.
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Serve faults with worker threads instead of on the faulting thread.
    #[arg(long)]
    workers: bool,
    /// Skip the all-local reference run.
    #[arg(long)]
    no_reference: bool,
    /// Kill one memory server (SIGKILL, the one holding the most pages) this many seconds into
    /// the sort, to see what losing a server costs: with two copies nothing is lost.
    #[arg(long, value_name = "SECS")]
    kill_server_after: Option<f64>,
    /// Processes of the DSM job that runs the Jacobi example after the sort (0: no DSM part).
    #[arg(long, default_value_t = 3)]
    dsm_nodes: u16,
    /// The Jacobi grid's side (the grid is N x N doubles, two copies in the shared region).
    #[arg(long, default_value_t = 256)]
    dsm_grid: usize,
    /// Jacobi iterations.
    #[arg(long, default_value_t = 50)]
    dsm_iterations: usize,
    /// Skip the migration part (python3 moved between two node agents and back; needs root).
    #[arg(long)]
    no_migration: bool,
    /// Skip the balancing part (two CPU-bound jobs, one moved to an idle node by its agent).
    #[arg(long)]
    no_balancing: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs one memory server until standard input closes (used by the demo itself).
    Serve {
        /// Where to listen.
        #[arg(long)]
        uri: String,
        /// RAM to donate.
        #[arg(long, value_parser = parse_size)]
        capacity: u64,
    },
    /// Runs a node agent pinned to one CPU, balancing, until standard input closes (used by the
    /// demo itself).
    #[command(hide = true)]
    NodeAgent {
        /// The CPU it stands for a host with.
        #[arg(long)]
        cpu: usize,
        /// An agent to join through.
        #[arg(long)]
        join: Option<String>,
    },
    /// A CPU-bound job on one CPU: prints the result of a hash computation (used by the demo).
    #[command(hide = true)]
    Spin {
        /// The CPU it starts on.
        #[arg(long)]
        cpu: usize,
    },
    /// Runs one node of the DSM Jacobi job (used by the demo itself).
    #[command(hide = true)]
    JacobiNode {
        /// The grid's side.
        #[arg(long)]
        grid: usize,
        /// Iterations.
        #[arg(long)]
        iterations: usize,
    },
}

fn main() -> ExitCode {
    // The node agents' restorer (this program run again): first, before any thread starts.
    if std::env::args().nth(1).as_deref() == Some("restore") {
        return ExitCode::from(mosaic_migrate::process::keeper_main());
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Some(Cmd::Serve { uri, capacity }) => serve(uri, *capacity),
        Some(Cmd::JacobiNode { grid, iterations }) => jacobi_node(*grid, *iterations),
        Some(Cmd::NodeAgent { cpu, join }) => balancing::agent_main(*cpu, join.clone()),
        Some(Cmd::Spin { cpu }) => {
            balancing::pin_to(*cpu).map(|()| println!("{}", balancing::spin(balancing::SPIN_ROUNDS)))
        }
        None => demo(&cli).and_then(|()| dsm_part(&cli)).and_then(|()| migration_part(&cli)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netram-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Migration, then balancing (both need root: see `mosaic_examples::migration`).
fn migration_part(cli: &Cli) -> Result<(), String> {
    if !cli.no_migration {
        println!();
        if let Some(why) = mosaic_examples::migration::run()? {
            println!("migration: skipped: {why}");
        }
    }
    if !cli.no_balancing {
        println!();
        if let Some(why) = balancing::run()? {
            println!("balancing: skipped: {why}");
        }
    }
    Ok(())
}

fn serve(uri: &str, capacity: u64) -> Result<(), String> {
    let key = ClusterKey::from_env().map_err(|e| e.to_string())?;
    let server = MemServer::start(uri, MemServerConfig::new(capacity, key)).map_err(|e| e.to_string())?;
    println!("READY {}", server.uri());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    server.shutdown();
    Ok(())
}

/// A memory server in a child process; it exits when this handle (its stdin) is dropped.
struct ServerProcess {
    child: Child,
    _stdin: ChildStdin,
    uri: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(uri: &str, capacity: u64, key_text: &str) -> Result<ServerProcess, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let mut child = Command::new(exe)
        .args(["serve", "--uri", uri, "--capacity", &capacity.to_string()])
        .env("MOSAIC_CLUSTER_KEY", key_text)
        .env_remove("MOSAIC_CLUSTER_KEY_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start a memory server: {e}"))?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(|e| e.to_string())?;
    let uri = line
        .trim()
        .strip_prefix("READY ")
        .ok_or_else(|| format!("memory server failed to start: {line:?}"))?
        .to_string();
    Ok(ServerProcess { child, _stdin: stdin, uri })
}

fn mib(bytes: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let m = bytes as f64 / (1u64 << 20) as f64;
    m
}

/// xorshift64*: reproducible keys without a dependency.
fn keys(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// (wrapping sum, xor) of the keys: unchanged by any permutation.
fn checksum(v: &[u64]) -> (u64, u64) {
    v.iter().fold((0u64, 0u64), |(s, x), k| (s.wrapping_add(*k), x ^ k))
}

fn fill(v: &mut [u64]) -> (u64, u64) {
    let mut next = keys(0x5EED);
    for k in v.iter_mut() {
        *k = next();
    }
    checksum(v)
}

fn check(v: &[u64], before: (u64, u64)) -> Result<(), String> {
    if let Some(i) = v.windows(2).position(|w| w[0] > w[1]) {
        return Err(format!("not sorted at element {i}"));
    }
    let after = checksum(v);
    if after != before {
        return Err(format!("checksum changed: {before:x?} before, {after:x?} after"));
    }
    Ok(())
}

fn demo(cli: &Cli) -> Result<(), String> {
    if cli.size < 1 << 20 || cli.budget < 1 << 20 {
        return Err("--size and --budget must be at least 1M".into());
    }
    if !["tcp", "shm"].contains(&cli.transport.as_str()) {
        return Err(format!("--transport {}: expected tcp or shm", cli.transport));
    }
    if cli.servers == 0 || cli.copies == 0 || cli.copies > cli.servers {
        return Err(format!("{} copies need at least as many servers (got {})", cli.copies, cli.servers));
    }
    let key_text = ClusterKey::random_text().map_err(|e| e.to_string())?;
    let key = ClusterKey::from_bytes(key_text.as_bytes()).map_err(|e| e.to_string())?;
    // Room for every copy, plus half again so placement has a choice.
    let capacity = cli.size * cli.copies as u64 / cli.servers as u64 * 3 / 2 + (16 << 20);
    println!(
        "starting {} memory servers on loopback ({}), {:.0} MiB each...",
        cli.servers,
        cli.transport,
        mib(capacity)
    );
    let mut servers = Vec::new();
    for n in 0..cli.servers {
        let uri = match cli.transport.as_str() {
            "shm" => format!("shm://netram-demo-{}-{n}", std::process::id()),
            _ => "tcp://127.0.0.1:0".to_string(),
        };
        let s = start_server(&uri, capacity, &key_text)?;
        println!("  server {n}: {} (pid {})", s.uri, s.child.id());
        servers.push(s);
    }
    let mut cfg = NetRamConfig::new(servers.iter().map(|s| s.uri.clone()).collect(), key, cli.size, cli.budget);
    cfg.copies = cli.copies;
    cfg.name = "sort".into();
    if cli.workers {
        cfg.fault_mode = FaultMode::Workers(2);
    }
    let ram = NetRam::new(cfg).map_err(|e| e.to_string())?;
    println!(
        "network RAM: a {:.0} MiB region with a {:.0} MiB resident budget ({:.1}x), {} copies of every page",
        mib(cli.size),
        mib(cli.budget),
        mib(cli.size) / mib(cli.budget),
        cli.copies
    );
    let n = ram.len() / 8;
    // SAFETY: the region is mapped, readable and writable, for `ram.len()` bytes while `ram`
    // lives, and nothing else refers to it.
    let data = unsafe { std::slice::from_raw_parts_mut(ram.as_ptr().cast::<u64>(), n) };

    let t = Instant::now();
    let sums = fill(data);
    let fill_time = t.elapsed();
    println!("filled {n} keys in {:.2} s", fill_time.as_secs_f64());
    let t = Instant::now();
    let killer = cli.kill_server_after.map(|secs| {
        // The server with the most pages: its loss costs the most rebuilding.
        let placed = ram.placement();
        let victim = (0..servers.len()).max_by_key(|k| placed.get(*k).map_or(0, |p| p.2)).unwrap_or(0);
        let pid = servers[victim].child.id();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs.max(0.0)));
            let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status().is_ok_and(|s| s.success());
            (victim, pid, killed)
        })
    });
    data.sort_unstable();
    let sort_time = t.elapsed();
    println!("sorted in {:.2} s", sort_time.as_secs_f64());
    if let Some(k) = killer {
        match k.join() {
            Ok((victim, pid, true)) => println!(
                "  server {victim} (pid {pid}) was killed {:.2} s into the sort",
                cli.kill_server_after.unwrap_or(0.0)
            ),
            _ => println!("  (the server to kill was not killed: the sort ended first, or kill failed)"),
        }
    }
    let t = Instant::now();
    let verdict = check(data, sums);
    let check_time = t.elapsed();
    let st = ram.stats();
    println!(
        "checked in {:.2} s: {}",
        check_time.as_secs_f64(),
        verdict.as_ref().map_or_else(|e| e.as_str(), |()| "sorted, checksum equal")
    );
    println!();
    println!("where the pages went:");
    println!(
        "  resident here: {} pages ({:.1} MiB, budget {:.0} MiB)",
        st.resident,
        mib(st.resident * 4096),
        mib(cli.budget)
    );
    for (uri, alive, pages) in ram.placement() {
        println!("  {uri}: {pages} pages ({:.1} MiB){}", mib(pages * 4096), if alive { "" } else { " (dead)" });
    }
    println!(
        "faults served from servers: {} (plus {} pages prefetched), as zeros: {}; pages evicted: {} ({} by faults making room for a prefetch), written back: {}, lost: {}; faults that waited for the evictor: {}; failovers: {}, copies rebuilt: {}",
        st.fetched, st.prefetched, st.zero_filled, st.evicted, st.evicted_by_faults, st.written_back, st.lost, st.throttled, st.failovers, st.rebuilt
    );
    let total = fill_time + sort_time + check_time;
    if !cli.no_reference {
        let t = Instant::now();
        let mut local = vec![0u64; n];
        let sums = fill(&mut local);
        local.sort_unstable();
        check(&local, sums)?;
        let local_time = t.elapsed();
        println!(
            "\nthe same job on local memory: {:.2} s; under network RAM: {:.2} s ({:.1}x, with {:.0}% of the data resident)",
            local_time.as_secs_f64(),
            total.as_secs_f64(),
            total.as_secs_f64() / local_time.as_secs_f64().max(1e-9),
            mib(cli.budget) / mib(cli.size) * 100.0
        );
    }
    drop(ram);
    drop(servers);
    verdict
}

/// One node of the demo's DSM job: prints its outcome as one line for the parent.
fn jacobi_node(n: usize, iterations: usize) -> Result<(), String> {
    let cfg =
        mosaic_dsm::JobConfig::from_env(jacobi::region_bytes(n)).map_err(|e| mosaic_transport::error_chain(&e))?;
    let job = mosaic_dsm::Job::join(cfg).map_err(|e| mosaic_transport::error_chain(&e))?;
    let o = jacobi::run(&job, n, iterations)?;
    let stats = job.stats();
    job.leave().map_err(|e| mosaic_transport::error_chain(&e))?;
    println!(
        "OUTCOME {:.12e} {:016x} {:.1} {} {} {} {}",
        o.sum,
        o.bits,
        o.us_per_iteration,
        stats.messages_sent,
        stats.bytes_sent,
        stats.pages_stored,
        stats.pages_fetched
    );
    Ok(())
}

/// The DSM part of the demo: Jacobi on one process, then on `--dsm-nodes` processes.
fn dsm_part(cli: &Cli) -> Result<(), String> {
    if cli.dsm_nodes == 0 {
        return Ok(());
    }
    let (n, iterations) = (cli.dsm_grid, cli.dsm_iterations);
    println!(
        "\nDSM: a {n}x{n} Jacobi stencil, {iterations} iterations, on a job of processes sharing one address space"
    );
    // The processes of each job meet at a node agent (mosaicd's), as jobs of a cluster do.
    let key = ClusterKey::random_text().map_err(|e| e.to_string())?;
    let mut agent_cfg =
        AgentConfig::new("tcp://127.0.0.1:0", ClusterKey::from_bytes(key.as_bytes()).map_err(|e| e.to_string())?);
    agent_cfg.usher = None;
    let agent = Agent::start(agent_cfg).map_err(|e| format!("the node agent: {e}"))?;
    println!("  each job's processes meet at a node agent: {}", Rendezvous::agent(agent.uri(), "JOB"));
    let meeting = Meeting { agent: agent.uri(), key: &key };
    let mut results = Vec::new();
    for nodes in [1, cli.dsm_nodes] {
        let outs = jacobi_job(&meeting, nodes, n, iterations, &[])?;
        let o = &outs[0];
        let agree = outs.iter().all(|x| x[..2] == o[..2]);
        let messages: u64 = outs.iter().filter_map(|x| x[3].parse::<u64>().ok()).sum();
        let bytes: u64 = outs.iter().filter_map(|x| x[4].parse::<u64>().ok()).sum();
        println!(
            "  {nodes} process{}: checksum {} {}{}, {} us per iteration; {:.0} messages and {:.1} KiB per iteration",
            if nodes == 1 { "" } else { "es" },
            o[0],
            o[1],
            if agree { "" } else { " (THE NODES DISAGREE)" },
            o[2],
            messages as f64 / iterations as f64,
            bytes as f64 / iterations as f64 / 1024.0
        );
        if !agree {
            return Err("the nodes of one job computed different grids".into());
        }
        results.push(o[..2].to_vec());
    }
    if results[0] != results[1] {
        return Err(format!("the {}-process grid differs from the one-process grid", cli.dsm_nodes));
    }
    println!("  the same grid, bit for bit, on 1 and {} processes", cli.dsm_nodes);
    behind_network_ram(cli, &meeting, &results[0])
}

/// Where the processes of a DSM job meet: a node agent, and the cluster key it holds.
struct Meeting<'a> {
    agent: &'a str,
    key: &'a str,
}

/// Jacobi again on `--dsm-nodes` processes, each page homed where first touched and each node
/// keeping at most an eighth of the region mapped: the rest on a memory server.
fn behind_network_ram(cli: &Cli, meeting: &Meeting, want: &[String]) -> Result<(), String> {
    let (n, iterations, nodes) = (cli.dsm_grid, cli.dsm_iterations, cli.dsm_nodes);
    let server_key = ClusterKey::from_bytes(meeting.key.as_bytes()).map_err(|e| e.to_string())?;
    let server = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(1 << 30, server_key))
        .map_err(|e| mosaic_transport::error_chain(&e))?;
    let budget = (jacobi::region_bytes(n) / 8).max(64 * 4096);
    let env = [
        ("MOSAIC_DSM_SERVERS".to_string(), server.uri().to_string()),
        ("MOSAIC_DSM_BUDGET".to_string(), budget.to_string()),
        ("MOSAIC_DSM_PLACEMENT".to_string(), "first-touch".to_string()),
    ];
    let outs = jacobi_job(meeting, nodes, n, iterations, &env)?;
    let o = &outs[0];
    let stored: u64 = outs.iter().filter_map(|x| x.get(5)?.parse::<u64>().ok()).sum();
    let fetched: u64 = outs.iter().filter_map(|x| x.get(6)?.parse::<u64>().ok()).sum();
    println!(
        "  {nodes} processes, pages homed where first touched, each keeping at most {} KiB of the {} KiB region \
         mapped: checksum {} {}, {} us per iteration; {stored} pages went to the memory server, {fetched} came back",
        budget / 1024,
        jacobi::region_bytes(n) / 1024,
        o[0],
        o[1],
        o[2]
    );
    if outs.iter().any(|x| x[..2] != want[..2]) {
        return Err("the grid computed behind network RAM differs from the one-process grid".into());
    }
    println!("  the same grid again, bit for bit");
    Ok(())
}

/// Runs `nodes` copies of this binary as a DSM job meeting at `meeting`, with `env` besides;
/// returns each node's outcome fields.
fn jacobi_job(
    meeting: &Meeting,
    nodes: u16,
    n: usize,
    iterations: usize,
    env: &[(String, String)],
) -> Result<Vec<Vec<String>>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let job = format!("demo-jacobi-{}-{nodes}-{}", std::process::id(), env.len());
    let at = Rendezvous::agent(meeting.agent, &job).to_string();
    let children: Vec<Child> = (0..nodes)
        .map(|rank| {
            Command::new(&exe)
                .args(["jacobi-node", "--grid", &n.to_string(), "--iterations", &iterations.to_string()])
                .env("MOSAIC_DSM_RANK", rank.to_string())
                .env("MOSAIC_DSM_SIZE", nodes.to_string())
                .env("MOSAIC_DSM_RENDEZVOUS", &at)
                .env(mosaic_transport::KEY_ENV, meeting.key)
                .env_remove(mosaic_transport::KEY_FILE_ENV)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start DSM node {rank}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut outs = Vec::new();
    for (rank, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&o.stdout);
        let fields =
            text.lines().find_map(|l| l.strip_prefix("OUTCOME ")).map(|l| l.split(' ').map(String::from).collect());
        match (o.status.success(), fields) {
            (true, Some(f)) => outs.push(f),
            _ => return Err(format!("DSM node {rank} failed ({})", o.status)),
        }
    }
    Ok(outs)
}
