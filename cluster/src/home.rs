//! The home of a migratable job: `mosrun --migratable` runs one per job. It keeps the job's
//! record (where it runs, under which pid, how often it moved: openMosix's home node), moves it
//! when asked (`mosctl migrate`), writes the output of the job while it runs elsewhere, answers
//! its reads of standard input, and learns its exit status.
//!
//! Its address is written to a job file (`RUN_DIR/job-PID`, PID being the job's pid at home),
//! where `mosctl` finds it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use mosaic_transport::{
    connect, listen, Caller, ClusterKey, ConnectOptions, Server, ServerConfig, Service, ServiceError, Status,
};

use crate::wire::{self, bad, failed, Dec, Enc, Moved};
use crate::{resolve_node, ClusterError};

impl Record {
    /// The job's wait status, once the process the record names has ended (not while it moves).
    fn exited(&self) -> Option<i32> {
        if self.moving {
            return None;
        }
        self.exits.iter().find(|(p, _)| *p == self.pid).map(|(_, s)| *s)
    }
}

/// Where the job is.
#[derive(Clone, Debug, Default)]
struct Record {
    /// The agent of the node it runs on.
    node: String,
    /// Its pid there.
    pid: u32,
    moves: u32,
    /// Locked to its node: the balancer leaves it there (`mosctl lock`).
    locked: bool,
    moving: bool,
    /// Ends reported: the pid that ended (at its node) and its wait status. Only the end of the
    /// process the record names is the job's (a stale copy's is not).
    exits: Vec<(u32, i32)>,
}

/// Where a job's output goes while it runs elsewhere.
pub type Sink = Box<dyn FnMut(u8, &[u8]) -> std::io::Result<()> + Send>;

struct State {
    /// Input read from this process's standard input for a copy that moved on before it got it.
    input: Mutex<Vec<u8>>,
    /// Output of the job while it runs elsewhere (stream 1 or 2, bytes); `None`: this
    /// process's own standard output and error.
    sink: Mutex<Option<Sink>>,
    key: ClusterKey,
    uri: OnceLock<String>,
    job: u64,
    command: String,
    record: Mutex<Record>,
    changed: Condvar,
}

/// A job's home.
pub struct Home {
    server: Option<Server>,
    state: Arc<State>,
    job_file: Option<PathBuf>,
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Home").field("uri", &self.uri()).field("job", &self.state.job).finish()
    }
}

/// The directory of job files: `$MOSAIC_RUN_DIR`, else `/run/mosaic` for root and
/// `/tmp/mosaic-UID` for others.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MOSAIC_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/mosaic")
    } else {
        PathBuf::from(format!("/tmp/mosaic-{uid}"))
    }
}

/// The job file of the job whose pid at home is `pid`.
pub fn job_file(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("job-{pid}"))
}

impl Home {
    /// Starts a home listening at `listen` for the job `job` (its pid at home), which runs at
    /// the node whose agent is `node`.
    pub fn start(listen_at: &str, key: ClusterKey, node: &str, job: u32, command: &str) -> Result<Home, ClusterError> {
        let state = Arc::new(State {
            input: Mutex::new(Vec::new()),
            sink: Mutex::new(None),
            key: key.clone(),
            uri: OnceLock::new(),
            job: u64::from(job),
            command: command.to_string(),
            record: Mutex::new(Record { node: node.to_string(), pid: job, ..Record::default() }),
            changed: Condvar::new(),
        });
        let server = listen(listen_at, ServerConfig::new(key).service(HomeService(state.clone()))).map_err(|e| {
            ClusterError::Start(format!("the job's home at {listen_at}: {}", mosaic_transport::error_chain(&e)))
        })?;
        let _ = state.uri.set(server.uri().to_string());
        Ok(Home { server: Some(server), state, job_file: None })
    }

    /// Where it listens.
    pub fn uri(&self) -> &str {
        self.server.as_ref().map_or("", Server::uri)
    }

    /// Sends the job's output, while it runs elsewhere, to `sink` (stream 1 or 2, bytes)
    /// instead of this process's standard output and error.
    pub fn set_output(&self, sink: Sink) {
        *crate::lock(&self.state.sink) = Some(sink);
    }

    /// Writes the job file in `dir` (made if missing), so `mosctl` finds the job.
    pub fn publish(&mut self, dir: &Path) -> Result<(), ClusterError> {
        std::fs::create_dir_all(dir).map_err(|e| ClusterError::Start(format!("{}: {e}", dir.display())))?;
        let path = job_file(dir, u32::try_from(self.state.job).unwrap_or(u32::MAX));
        std::fs::write(&path, format!("{}\n", self.uri()))
            .map_err(|e| ClusterError::Start(format!("{}: {e}", path.display())))?;
        self.job_file = Some(path);
        Ok(())
    }

    /// Whether the job left home (or is leaving now): then its status comes from
    /// [`Home::wait_exit`], and the process at home is only a stopped copy.
    pub fn left(&self) -> bool {
        let mut r = crate::lock(&self.state.record);
        while r.moving {
            r = self.state.changed.wait(r).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        r.moves > 0
    }

    /// The job's wait status, once it ended elsewhere.
    pub fn exit_status(&self) -> Option<i32> {
        crate::lock(&self.state.record).exited()
    }

    /// Waits for the job (running elsewhere) to end: its wait status.
    pub fn wait_exit(&self) -> i32 {
        let mut r = crate::lock(&self.state.record);
        loop {
            if let Some(s) = r.exited() {
                return s;
            }
            r = self.state.changed.wait(r).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Some(p) = self.job_file.take() {
            let _ = std::fs::remove_file(p);
        }
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

struct HomeService(Arc<State>);

impl Service for HomeService {
    fn call(&self, _caller: &Caller, method: u64, request: &[u8], response: &mut Vec<u8>) -> Result<(), ServiceError> {
        let s = &self.0;
        let mut d = Dec(request);
        let for_us = |d: &mut Dec<'_>| -> Result<(), ServiceError> {
            let job = d.u64().map_err(bad)?;
            if job != s.job {
                return Err(ServiceError::new(Status::NotFound, format!("job {job} does not live here")));
            }
            Ok(())
        };
        match method {
            wire::OUTPUT => {
                for_us(&mut d)?;
                let stream = d.u8().map_err(bad)?;
                let bytes = d.rest();
                let mut sink = crate::lock(&s.sink);
                let r = if let Some(f) = sink.as_mut() {
                    f(stream, bytes)
                } else if stream == 2 {
                    let mut e = std::io::stderr().lock();
                    e.write_all(bytes).and_then(|()| e.flush())
                } else {
                    let mut o = std::io::stdout().lock();
                    o.write_all(bytes).and_then(|()| o.flush())
                };
                r.map_err(failed)?;
            }
            wire::INPUT => {
                for_us(&mut d)?;
                let most = d.u32().map_err(bad)?.clamp(1, 1 << 20) as usize;
                let pid = d.u32().map_err(bad)?;
                let here = |s: &State| {
                    let r = crate::lock(&s.record);
                    !r.moving && r.pid == pid
                };
                if !here(s) {
                    // Input goes only to where the job runs now (a copy that moved on gets none).
                    std::thread::sleep(Duration::from_millis(200));
                    response.push(2);
                    return Ok(());
                }
                let mut kept = crate::lock(&s.input);
                if !kept.is_empty() {
                    let n = kept.len().min(most);
                    response.push(0);
                    response.extend(kept.drain(..n));
                    return Ok(());
                }
                drop(kept);
                // (The answer is appended to what `response` holds already.)
                let start = response.len();
                read_input(most, response);
                // Read while the job began to move: kept for where it runs next.
                if response.get(start) == Some(&0) && !here(s) {
                    crate::lock(&s.input).extend_from_slice(&response[start + 1..]);
                    response.truncate(start);
                    response.push(2);
                }
            }
            wire::EXITED => {
                for_us(&mut d)?;
                let status = i32::from_le_bytes(d.u32().map_err(bad)?.to_le_bytes());
                let pid = d.u32().map_err(bad)?;
                crate::lock(&s.record).exits.push((pid, status));
                s.changed.notify_all();
            }
            wire::MIGRATE => {
                let to = resolve_node(&d.str().map_err(bad)?).map_err(failed)?;
                let automatic = d.u8().unwrap_or(0) == 1;
                let moved = migrate(s, &to, automatic)?;
                response.extend_from_slice(&moved.encode());
            }
            wire::LOCK => {
                crate::lock(&s.record).locked = d.u8().map_err(bad)? == 1;
            }
            wire::WHERE => {
                let r = crate::lock(&s.record).clone();
                let mut e = Enc::default();
                e.str(&r.node).u32(r.pid).u32(r.moves).str(&s.command);
                response.extend_from_slice(&e.0);
            }
            m => return Err(ServiceError::new(Status::UnknownMethod, format!("no method {m:#x}"))),
        }
        Ok(())
    }
}

/// Standard input for a job running elsewhere: `0` and bytes, `1` at its end, `2` if nothing
/// came within a second (the agent asks again).
fn read_input(most: usize, response: &mut Vec<u8>) {
    let mut p = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on standard input.
    let ready = unsafe { libc::poll(&mut p, 1, 1000) };
    if ready == 0 {
        response.push(2);
        return;
    }
    let mut buf = vec![0u8; most];
    match std::io::stdin().lock().read(&mut buf) {
        Ok(0) | Err(_) => response.push(1),
        Ok(n) => {
            response.push(0);
            response.extend_from_slice(&buf[..n]);
        }
    }
}

/// Moves the job to `to`; `automatic` (the balancer asks): refused if the job is locked.
fn migrate(s: &State, to: &str, automatic: bool) -> Result<Moved, ServiceError> {
    let (node, pid) = {
        let mut r = crate::lock(&s.record);
        if automatic && r.locked {
            return Err(ServiceError::new(Status::Forbidden, "the job is locked to its node (mosctl unlock)"));
        }
        if r.moving {
            return Err(ServiceError::new(Status::Forbidden, "the job is moving already"));
        }
        if r.exited().is_some() {
            return Err(ServiceError::new(Status::Forbidden, "the job has ended"));
        }
        if r.node == to {
            return Err(ServiceError::new(Status::Forbidden, format!("the job runs at {to} already")));
        }
        r.moving = true;
        (r.node.clone(), r.pid)
    };
    let mut req = Enc::default();
    req.u32(pid).str(to).str(s.uri.get().map_or("", String::as_str)).u64(s.job);
    let mut o = ConnectOptions::new(s.key.clone());
    o.timeout = Duration::from_secs(120);
    let answer = connect(&node, &o)
        .map_err(|e| format!("the node {node}: {}", mosaic_transport::error_chain(&e)))
        .and_then(|c| c.call(wire::MIGRATE_OUT, &req.0).map_err(|e| mosaic_transport::error_chain(&e)))
        .and_then(|a| Moved::decode(&a));
    let mut r = crate::lock(&s.record);
    r.moving = false;
    let out = match answer {
        Ok(m) => {
            r.node = to.to_string();
            r.pid = m.pid;
            r.moves += 1;
            Ok(m)
        }
        Err(e) => Err(failed(e)),
    };
    s.changed.notify_all();
    out
}
