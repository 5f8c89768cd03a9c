//! `mosrun -n N`: the nodes of a DSM job, on this host or on the hosts given with `--hosts`.
//!
//! On this host the nodes meet in a fresh rendezvous directory. Across hosts, they meet at the
//! local node agent (`mosaicd`) when it runs with the job's cluster key and listens where the
//! hosts reach it (`agent+tcp://HOST:PORT/JOB`), or else at a rendezvous server mosrun runs
//! for the job (on the address of this machine that the hosts reach). mosrun starts
//! node `i` on host `i mod H` through the launcher (`ssh` by default; `ip netns exec {host}` in
//! the tests, each network namespace standing for a host), and tells each node the address to
//! listen on. The cluster key travels as a file's path, never on a command line.

use std::io::Write;
use std::net::{IpAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use mosaic_dsm::{job, Rendezvous, RendezvousServer};
use mosaic_netram::MemServer;
use mosaic_transport::{ClusterKey, KEY_ENV, KEY_FILE_ENV};

use crate::Cli;

/// Most nodes of a job (the DSM directory's limit).
const MAX_NODES: u16 = 64;

/// Where the nodes of a job meet (`--rendezvous`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Meet {
    /// The local node agent across hosts when it can serve, else mosrun's own.
    Auto,
    /// The local node agent, or fail.
    Agent,
    /// mosrun's own: a server across hosts, a directory on this host.
    Mosrun,
}

/// Whether the cluster key comes from the environment (so the node agent may hold it too).
fn key_in_env() -> bool {
    std::env::var_os(KEY_ENV).is_some() || std::env::var_os(KEY_FILE_ENV).is_some()
}

/// A fresh name for a job meeting at an agent.
fn job_name() -> String {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("mosrun-{}-{stamp}", std::process::id())
}

/// The IP address in `tcp://HOST:PORT`, if HOST is one (an IPv4-mapped IPv6 address as IPv4).
fn uri_ip(uri: &str) -> Option<IpAddr> {
    let (host, _port) = uri.split_once("://")?.1.rsplit_once(':')?;
    host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// Why the agent at `agent` (the address it gives of itself) cannot be the rendezvous of nodes
/// at `hosts`, which reach this machine at `here`, if it cannot: with `insist` (`--rendezvous
/// agent`) only a loopback agent for other hosts is refused, else the agent must be at `here`.
fn unreachable_agent(agent: &str, hosts: &[IpAddr], here: Option<IpAddr>, insist: bool) -> Option<String> {
    let all_loopback = hosts.iter().all(|h| h.to_canonical().is_loopback());
    match uri_ip(agent) {
        Some(ip) if ip.is_loopback() && !all_loopback => {
            Some(format!("the agent listens at {agent}, which other hosts cannot reach"))
        }
        _ if insist || hosts.is_empty() => None,
        Some(ip) if Some(ip) == here.map(|h| h.to_canonical()) || (all_loopback && ip.is_loopback()) => None,
        Some(_) => Some(format!(
            "the agent listens at {agent}, not at {} where the hosts reach this machine",
            here.map_or("?".to_string(), |h| h.to_string())
        )),
        None => Some(format!("the agent's address {agent} is no IP address the hosts are known to reach")),
    }
}

/// The local node agent's rendezvous for a new job whose nodes run at `hosts` (none: this
/// host), which reach this machine at `here`, when `--rendezvous` allows it and the agent can
/// serve it (`Err` only when `--rendezvous agent` and it cannot).
fn agent_rendezvous(
    cli: &Cli,
    key: &ClusterKey,
    hosts: &[IpAddr],
    here: Option<IpAddr>,
) -> Result<Option<Rendezvous>, String> {
    if cli.rendezvous == Meet::Mosrun {
        return Ok(None);
    }
    let insist = cli.rendezvous == Meet::Agent;
    let usable = || -> Result<String, String> {
        if !key_in_env() {
            return Err(format!("no cluster key in the environment ({KEY_ENV} or {KEY_FILE_ENV})"));
        }
        let uri = mosaic_cluster::resolve_node(&mosaic_cluster::local_agent()).map_err(|e| e.to_string())?;
        let status = mosaic_cluster::agent_status(&uri, key)?;
        if let Some(why) = unreachable_agent(&status.agent, hosts, here, insist) {
            return Err(why);
        }
        mosaic_dsm::rendezvous::agent_keeps_books(&uri, key).map_err(|e| format!("{uri}: {e}"))?;
        Ok(status.agent)
    };
    match usable() {
        Ok(agent) => Ok(Some(Rendezvous::agent(&agent, &job_name()))),
        Err(why) if insist => Err(format!("--rendezvous agent: cannot meet at the node agent: {why}")),
        Err(why) => {
            if cli.verbose {
                eprintln!("mosrun: not meeting at the node agent ({why})");
            }
            Ok(None)
        }
    }
}

/// The launcher used when `--launcher` is not given.
pub const DEFAULT_LAUNCHER: &str = "ssh -o BatchMode=yes {host}";

/// A host of `--hosts`: what the launcher is given, and the address the job's nodes there
/// listen on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The name the launcher is given (`{host}`).
    pub name: String,
    /// The address its nodes listen on and are reached by.
    pub addr: IpAddr,
}

/// Parses `NAME` or `NAME=ADDRESS` (a name alone is resolved).
pub fn parse_host(text: &str) -> Result<Host, String> {
    let (name, addr) = match text.split_once('=') {
        Some((n, a)) => {
            let addr = a.parse().map_err(|_| format!("--hosts {text}: {a} is not an IP address"))?;
            (n, addr)
        }
        None => {
            let addr = (text, 0)
                .to_socket_addrs()
                .map_err(|e| format!("--hosts {text}: cannot resolve it ({e}); give NAME=ADDRESS"))?
                .next()
                .ok_or_else(|| format!("--hosts {text}: no address; give NAME=ADDRESS"))?
                .ip();
            (text, addr)
        }
    };
    if name.is_empty() {
        return Err(format!("--hosts {text}: no host name"));
    }
    if addr.is_unspecified() {
        return Err(format!("--hosts {text}: {addr} is no host's address"));
    }
    Ok(Host { name: name.to_string(), addr })
}

/// A URI's host part for `addr` (IPv6 in brackets).
fn uri_host(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// The address of this machine that packets to `to` leave from (no packet is sent).
fn local_addr_towards(to: IpAddr) -> Result<IpAddr, String> {
    let any: IpAddr = if to.is_ipv4() { [0, 0, 0, 0].into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() };
    let sock = UdpSocket::bind((any, 0)).map_err(|e| e.to_string())?;
    sock.connect((to, 9)).map_err(|e| format!("no route to {to}: {e}"))?;
    Ok(sock.local_addr().map_err(|e| e.to_string())?.ip())
}

/// The launcher's words for `host`: `template` split at spaces, `{host}` replaced.
fn launcher_words(template: &str, host: &str) -> Vec<String> {
    template.split_whitespace().map(|w| w.replace("{host}", host)).collect()
}

/// `mosrun -n N`: runs `n` copies of the program as the nodes of a DSM job; stops the rest when
/// one fails.
pub fn run(cli: &Cli, n: u16) -> Result<ExitCode, String> {
    if n == 0 || n > MAX_NODES {
        return Err(format!("-n {n}: a job has 1 to {MAX_NODES} nodes"));
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("mosaic-job-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make the job's directory {}: {e}", dir.display()))?;
    let cleanup = RemoveDir(dir.clone());
    let (commands, _rendezvous, _memory) =
        if cli.hosts.is_empty() { on_this_host(cli, n, &dir)? } else { on_hosts(cli, n, &dir)? };
    let mut children = Vec::new();
    for (rank, mut cmd) in commands.into_iter().enumerate() {
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                stop_all(&mut children);
                return Err(format!("cannot run {:?} (node {rank}): {e}", cmd.get_program()));
            }
        }
    }
    let failed = watch(&mut children);
    drop(cleanup);
    Ok(match failed {
        None => ExitCode::SUCCESS,
        Some((_, status)) => match (status.code(), status.signal()) {
            (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
            (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(255)),
            _ => ExitCode::FAILURE,
        },
    })
}

/// The nodes' commands, the rendezvous server they meet at and the memory server mosrun runs for
/// them (if any: kept running until the job ends).
type Launch = (Vec<Command>, Option<RendezvousServer>, Option<MemServer>);

/// An environment variable for the nodes: name and value.
type EnvVar = (String, String);

/// Network RAM behind the nodes' pages, when `--servers` or `--local-budget` is given: the
/// settings for the nodes, and the memory server started for them on `listen_host` when no
/// servers are given.
fn network_ram(cli: &Cli, key: &ClusterKey, listen_host: &str) -> Result<(Vec<EnvVar>, Option<MemServer>), String> {
    let Some(budget) = cli.local_budget else {
        if cli.servers.is_empty() {
            return Ok((Vec::new(), None));
        }
        return Err(
            "-n with --servers needs --local-budget: the most of the shared region each node keeps mapped".into()
        );
    };
    let (servers, embedded) = crate::servers_or_one_of_ours(cli, key, listen_host)?;
    let mut env =
        vec![(job::SERVERS_ENV.to_string(), servers.join(",")), (job::BUDGET_ENV.to_string(), budget.to_string())];
    if let Some(c) = cli.copies {
        env.push((job::COPIES_ENV.to_string(), c.to_string()));
    }
    Ok((env, embedded))
}

/// Every node on this host, meeting in `dir` (or at the local agent, if asked).
fn on_this_host(cli: &Cli, n: u16, dir: &Path) -> Result<Launch, String> {
    let (key, key_text) = match ClusterKey::from_env() {
        Ok(k) => (k, None),
        Err(_) => {
            let text = ClusterKey::random_text().map_err(|e| e.to_string())?;
            (ClusterKey::from_bytes(text.as_bytes()).map_err(|e| e.to_string())?, Some(text))
        }
    };
    let (memory, memory_server) = network_ram(cli, &key, "127.0.0.1")?;
    // On this host the directory serves unless the agent is asked for.
    let agent = if cli.rendezvous == Meet::Agent { agent_rendezvous(cli, &key, &[], None)? } else { None };
    let meet = agent.unwrap_or_else(|| Rendezvous::Dir(dir.to_path_buf()));
    if cli.verbose {
        eprintln!("mosrun: {n} nodes of {}, meeting at {meet}", cli.program[0]);
    }
    let commands = (0..n)
        .map(|rank| {
            let mut cmd = Command::new(&cli.program[0]);
            cmd.args(&cli.program[1..])
                .env("MOSAIC_DSM_RANK", rank.to_string())
                .env("MOSAIC_DSM_SIZE", n.to_string())
                .env("MOSAIC_DSM_RENDEZVOUS", meet.to_string())
                .envs(memory.iter().map(|(k, v)| (k, v)));
            if let Some(text) = &key_text {
                cmd.env(KEY_ENV, text).env_remove(KEY_FILE_ENV);
            }
            cmd
        })
        .collect();
    Ok((commands, None, memory_server))
}

/// Node `i` on host `i mod H` through the launcher, meeting at the local agent or a rendezvous
/// server of ours.
fn on_hosts(cli: &Cli, n: u16, dir: &Path) -> Result<Launch, String> {
    let hosts = cli.hosts.iter().map(|h| parse_host(h)).collect::<Result<Vec<_>, _>>()?;
    let here = match &cli.rendezvous_address {
        Some(a) => a.parse().map_err(|_| format!("--rendezvous-address {a}: not an IP address"))?,
        None => local_addr_towards(hosts[0].addr)
            .map_err(|e| format!("cannot find this machine's address towards {}: {e}", hosts[0].name))?,
    };
    // The key as a file whose path every node is given (its own, or a fresh key's, readable by
    // the user alone): never on a command line, where any local user could read it.
    let key_file = match std::env::var_os(KEY_FILE_ENV).filter(|_| std::env::var_os(KEY_ENV).is_none()) {
        Some(p) => std::path::absolute(PathBuf::from(p)).map_err(|e| format!("{KEY_FILE_ENV}: {e}"))?,
        None => {
            let text = match std::env::var(KEY_ENV) {
                Ok(t) => t,
                Err(_) => ClusterKey::random_text().map_err(|e| e.to_string())?,
            };
            let path = dir.join("cluster-key");
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|e| format!("cannot write the job's key to {}: {e}", path.display()))?;
            path
        }
    };
    let key = ClusterKey::from_file(&key_file).map_err(|e| e.to_string())?;
    let (memory, memory_server) = network_ram(cli, &key, &uri_host(here))?;
    let addrs: Vec<IpAddr> = hosts.iter().map(|h| h.addr).collect();
    let (meet, server) = match agent_rendezvous(cli, &key, &addrs, Some(here))? {
        Some(at) => (at, None),
        None => {
            let server = RendezvousServer::start(&format!("tcp://{}:0", uri_host(here)), key, n).map_err(|e| {
                format!("cannot start the job's rendezvous on {here}: {}", mosaic_transport::error_chain(&e))
            })?;
            (Rendezvous::parse(server.uri()), Some(server))
        }
    };
    let template = cli.launcher.as_deref().unwrap_or(DEFAULT_LAUNCHER);
    if cli.verbose {
        let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        eprintln!(
            "mosrun: {n} nodes of {} on {} (by turns, started with `{template}`), meeting at {}",
            cli.program[0],
            names.join(","),
            meet
        );
    }
    let commands = (0..n)
        .map(|rank| {
            let host = &hosts[usize::from(rank) % hosts.len()];
            let words = launcher_words(template, &host.name);
            let mut cmd = Command::new(&words[0]);
            cmd.args(&words[1..])
                .arg("env")
                .arg(format!("MOSAIC_DSM_RANK={rank}"))
                .arg(format!("MOSAIC_DSM_SIZE={n}"))
                .arg(format!("MOSAIC_DSM_RENDEZVOUS={meet}"))
                .arg(format!("MOSAIC_DSM_LISTEN=tcp://{}:0", uri_host(host.addr)))
                .arg(format!("{KEY_FILE_ENV}={}", key_file.display()))
                .args(memory.iter().map(|(k, v)| format!("{k}={v}")))
                .args(&cli.program)
                .env_remove(KEY_ENV);
            cmd
        })
        .collect();
    Ok((commands, server, memory_server))
}

/// Waits for every node; when one fails, stops the others. Returns the first failure.
fn watch(children: &mut [Option<std::process::Child>]) -> Option<(usize, std::process::ExitStatus)> {
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    while children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() && failed.is_none() {
                        failed = Some((rank, status));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("mosrun: cannot wait for node {rank}: {e}");
                    *slot = None;
                }
            }
        }
        if let Some((rank, status)) = failed {
            if children.iter().any(Option::is_some) {
                eprintln!("mosrun: node {rank} failed ({status}); stopping the others");
                stop_all(children);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    failed
}

/// Stops every node still running: SIGTERM, then SIGKILL after two seconds.
fn stop_all(children: &mut [Option<std::process::Child>]) {
    for c in children.iter().flatten() {
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: signalling a child process of ours that we have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for slot in children.iter_mut() {
        let Some(c) = slot else { continue };
        while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if c.try_wait().ok().flatten().is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        *slot = None;
    }
}

/// Removes the job's directory when the job ends.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_names_with_addresses() {
        let h = parse_host("node7=10.1.2.3").unwrap();
        assert_eq!((h.name.as_str(), h.addr), ("node7", "10.1.2.3".parse().unwrap()));
        assert_eq!(parse_host("v6=::1").unwrap().addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(parse_host("localhost").unwrap().name, "localhost");
        for bad in ["x=notanip", "=10.0.0.1", "x=0.0.0.0", "no-such-host.invalid"] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
        assert_eq!(uri_host("::1".parse().unwrap()), "[::1]");
        assert_eq!(launcher_words("ssh -p 22 {host}", "a"), ["ssh", "-p", "22", "a"]);
        assert_eq!(local_addr_towards("127.0.0.1".parse().unwrap()).unwrap(), "127.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn an_agent_is_met_at_only_where_the_hosts_reach_it() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let remote = [ip("10.0.0.2"), ip("10.0.0.3")];
        let here = Some(ip("10.0.0.1"));
        assert_eq!(unreachable_agent("tcp://10.0.0.1:7070", &remote, here, false), None);
        assert_eq!(unreachable_agent("tcp://[::ffff:10.0.0.1]:7070", &remote, here, false), None);
        for agent in ["tcp://127.0.0.1:7070", "tcp://[::ffff:127.0.0.1]:7070"] {
            assert!(unreachable_agent(agent, &remote, here, false).unwrap().contains("cannot reach"));
            assert!(unreachable_agent(agent, &remote, here, true).is_some(), "{agent}");
        }
        // On another interface, or a name: not by default; when insisted on, tried.
        assert!(unreachable_agent("tcp://192.168.9.9:7070", &remote, here, false).unwrap().contains("not at 10.0.0.1"));
        assert!(unreachable_agent("tcp://head:7070", &remote, here, false).is_some());
        assert_eq!(unreachable_agent("tcp://192.168.9.9:7070", &remote, here, true), None);
        // Hosts on loopback meet at a loopback agent.
        let local = [ip("127.0.0.2"), ip("127.0.0.3")];
        assert_eq!(unreachable_agent("tcp://127.0.0.1:7070", &local, Some(ip("127.0.0.1")), false), None);
        assert_eq!(unreachable_agent("tcp://127.0.0.1:7070", &[], None, false), None);
    }
}
