//! `mosaic-bench serve`: a benchmark server in its own process, and the parent's handle on it.
//!
//! The server answers method [`ECHO`] with its request and method [`SINK`] with nothing, and
//! exposes a page window. It prints `READY <uri>` once listening and exits when its standard input
//! closes, so it never outlives the benchmark that started it, even if that one is killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;

use mosaic_transport::{listen, Caller, ClusterKey, PageWindow, ServerConfig, Service, ServiceError, WaitPolicy};

/// Method id answered with the request itself.
pub const ECHO: u64 = 1;
/// Method id that swallows its request and answers with nothing.
pub const SINK: u64 = 2;

struct BenchService;

impl Service for BenchService {
    fn call(&self, _caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        match method {
            ECHO => {
                response.extend_from_slice(request);
                Ok(())
            }
            SINK => Ok(()),
            m => Err(ServiceError::new(mosaic_transport::Status::UnknownMethod, format!("no method {m}"))),
        }
    }
}

/// Runs a server at `uri` until standard input closes.
pub fn serve(uri: &str, window_pages: u64, policy: WaitPolicy) -> Result<(), String> {
    let key = ClusterKey::from_env().map_err(|e| e.to_string())?;
    let window = Arc::new(PageWindow::new(window_pages).map_err(|e| format!("page window: {e}"))?);
    let cfg = ServerConfig::new(key).service(BenchService).window(window).policy(policy);
    let server = listen(uri, cfg).map_err(|e| mosaic_transport::error_chain(&e))?;
    ready_until_stdin_closes(server.uri())?;
    server.shutdown();
    Ok(())
}

/// Says `READY <uri>` to the parent, then waits for it to close our standard input.
fn ready_until_stdin_closes(uri: &str) -> Result<(), String> {
    println!("READY {uri}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// Runs a memory server at `uri` donating `capacity` bytes until standard input closes.
pub fn serve_ram(uri: &str, capacity: u64) -> Result<(), String> {
    let key = ClusterKey::from_env().map_err(|e| e.to_string())?;
    let server = mosaic_netram::MemServer::start(uri, mosaic_netram::MemServerConfig::new(capacity, key))
        .map_err(|e| e.to_string())?;
    ready_until_stdin_closes(server.uri())?;
    server.shutdown();
    Ok(())
}

/// A benchmark server running in a child process; killed on drop.
pub struct ChildServer {
    child: Child,
    _stdin: ChildStdin,
    /// The URI it listens on.
    pub uri: String,
}

impl ChildServer {
    /// Starts `mosaic-bench serve` at `uri` with `key`, and waits until it listens.
    pub fn start(uri: &str, key_text: &str, window_pages: u64, blocking: bool) -> Result<ChildServer, String> {
        let pages = window_pages.to_string();
        let mut args = vec!["serve", "--uri", uri, "--window-pages", &pages];
        if blocking {
            args.extend(["--wait", "blocking"]);
        }
        ChildServer::spawn(&args, key_text, uri)
    }

    /// Runs this binary with `args` (a server subcommand) and waits for its `READY <uri>` line.
    pub fn spawn(args: &[&str], key_text: &str, uri: &str) -> Result<ChildServer, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args(args);
        let mut child = cmd
            .env(mosaic_transport::KEY_ENV, key_text)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the benchmark server: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin pipe")?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let mut line = String::new();
        // The child prints READY or exits with an error on stderr; either ends this read.
        let n = BufReader::new(stdout).read_line(&mut line).map_err(|e| e.to_string())?;
        let ready = line.trim().strip_prefix("READY ").map(str::to_owned);
        match ready {
            Some(uri) if n > 0 => Ok(ChildServer { child, _stdin: stdin, uri }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("benchmark server for {uri} did not start"))
            }
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
