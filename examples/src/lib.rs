//! Code the example programs share.

pub mod balancing;
pub mod jacobi;
pub mod migration;

/// Runs `work(t)` on `threads` threads at once (t = 0 to `threads - 1`) and waits for all:
/// the first error any returned, or a panic, is the result.
pub fn on_threads(threads: u64, work: impl Fn(u64) -> Result<(), String> + Sync) -> Result<(), String> {
    let work = &work;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|t| s.spawn(move || work(t))).collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| "a thread panicked".to_string())?)
    })
}

/// An example's arguments: `defaults.len()` numbers, each taken from the command line where given
/// and well-formed, else its default. `None` (after printing `usage`) when help was asked.
pub fn args<T: std::str::FromStr + Copy>(usage: &str, defaults: &[T]) -> Option<Vec<T>> {
    let given: Vec<String> = std::env::args().skip(1).collect();
    if given.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: {usage}");
        return None;
    }
    Some(defaults.iter().enumerate().map(|(i, d)| given.get(i).and_then(|a| a.parse().ok()).unwrap_or(*d)).collect())
}

/// Prints what an example found (a line), or its error under its name; the exit status.
pub fn report(program: &str, outcome: Result<String, String>) -> std::process::ExitCode {
    match outcome {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error with its causes, as one line.
pub fn chain(e: impl std::error::Error) -> String {
    mosaic_transport::error_chain(&e)
}
