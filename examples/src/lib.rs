//! Code the example programs share.

pub mod jacobi;

/// Runs `work(t)` on `threads` threads at once (t = 0 to `threads - 1`) and waits for all:
/// the first error any returned, or a panic, is the result.
pub fn on_threads(threads: u64, work: impl Fn(u64) -> Result<(), String> + Sync) -> Result<(), String> {
    let work = &work;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|t| s.spawn(move || work(t))).collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| "a thread panicked".to_string())?)
    })
}
