//! `mosaic-memserver`: donates RAM to network-RAM clients until interrupted.
//!
//! ```text
//! MOSAIC_CLUSTER_KEY_FILE=/etc/mosaic/key mosaic-memserver --listen tcp://0.0.0.0:7100 --capacity 16G
//! ```

use std::process::ExitCode;

use clap::Parser;
use mosaic_netram::{parse_size, MemServer, MemServerConfig};
use mosaic_transport::{ClusterKey, Limits};

#[derive(Parser)]
#[command(
    name = "mosaic-memserver",
    version,
    about = "Donates RAM to Mosaic network-RAM clients",
    long_about = "Donates RAM to Mosaic network-RAM clients: stores their pages, refuses with a \
                  'server full' error when the capacity (or a client's quota) is used, and \
                  reclaims a client's pages only after its last connection closed and its grace \
                  time passed: a client that is merely stopped keeps everything. Each client's \
                  session is bound to the connections that opened it with its secret; no other \
                  connection can touch it. The cluster key comes from MOSAIC_CLUSTER_KEY or \
                  MOSAIC_CLUSTER_KEY_FILE. Prints 'READY <uri>' once listening; stops on SIGINT, \
                  SIGTERM or when standard input closes with --stdin-lifetime."
)]
struct Cli {
    /// Where to listen: tcp://HOST:PORT (port 0 picks one), shm://NAME, rdma://HOST:PORT.
    #[arg(long, default_value = "tcp://127.0.0.1:7100")]
    listen: String,
    /// RAM to donate, e.g. 512M, 16G, 1GiB.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    capacity: u64,
    /// Most memory one client may store here, e.g. 2G (default: the whole capacity).
    #[arg(long, value_parser = parse_size)]
    quota: Option<u64>,
    /// Most client sessions held at once, connected or in their grace time.
    #[arg(long, default_value_t = 4096)]
    max_clients: usize,
    /// Longest grace time granted to a disconnected client before its pages are reclaimed, in
    /// seconds (clients ask for less: 600 by default).
    #[arg(long, default_value_t = 3600)]
    max_grace: u64,
    /// Most connections open at once.
    #[arg(long, default_value_t = Limits::default().connections)]
    max_connections: usize,
    /// Most connections in their handshake at once (what unauthenticated peers can hold).
    #[arg(long, default_value_t = Limits::default().handshakes)]
    max_handshakes: usize,
    /// Most connections in their handshake from one address (or one local user over shm).
    #[arg(long, default_value_t = Limits::default().handshakes_per_source)]
    handshakes_per_source: usize,
    /// Exit when standard input closes (so a parent that dies takes the server with it).
    #[arg(long)]
    stdin_lifetime: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let key = match ClusterKey::from_env() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("mosaic-memserver: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cfg = MemServerConfig::new(cli.capacity, key);
    cfg.quota_bytes = cli.quota.unwrap_or(cli.capacity);
    cfg.max_clients = cli.max_clients;
    cfg.max_grace = std::time::Duration::from_secs(cli.max_grace);
    cfg.limits = Limits {
        connections: cli.max_connections,
        handshakes: cli.max_handshakes,
        handshakes_per_source: cli.handshakes_per_source,
    };
    let server = match MemServer::start(&cli.listen, cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mosaic-memserver: {}", mosaic_transport::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    println!("READY {}", server.uri());
    log::info!("serving {} MiB at {}", cli.capacity >> 20, server.uri());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if cli.stdin_lifetime {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    } else {
        wait_for_termination();
    }
    let s = server.stats();
    log::info!("stopping: {} pages held for {} clients", s.used_pages, s.clients);
    server.shutdown();
    ExitCode::SUCCESS
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_termination() {
    // SAFETY: building a signal set and blocking SIGINT/SIGTERM for this thread (threads started
    // later inherit the mask, so sigwait below receives them).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}
