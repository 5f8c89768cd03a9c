//! Latency samples and the figures reported from them.

use std::time::{Duration, Instant};

/// Latency samples in nanoseconds.
#[derive(Debug, Default)]
pub struct Samples(Vec<u64>);

/// Summary of a set of latency samples, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Smallest sample.
    pub min_us: f64,
    /// 50th percentile.
    pub median_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Number of samples.
    pub count: usize,
}

impl Samples {
    /// Room for `n` samples without reallocating inside a timed loop.
    pub fn with_capacity(n: usize) -> Samples {
        Samples(Vec::with_capacity(n))
    }

    /// Records one sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Min, median and 99th percentile (nearest-rank), or `None` without samples.
    pub fn summary(&mut self) -> Option<Summary> {
        if self.0.is_empty() {
            return None;
        }
        self.0.sort_unstable();
        let n = self.0.len();
        let rank = |p: usize| self.0[((n * p).div_ceil(100)).clamp(1, n) - 1];
        Some(Summary { min_us: us(self.0[0]), median_us: us(rank(50)), p99_us: us(rank(99)), count: n })
    }
}

fn us(ns: u64) -> f64 {
    ns_to_f64(ns) / 1000.0
}

/// A nanosecond count as f64 (exact below 2^53 ns, i.e. 104 days).
pub fn ns_to_f64(ns: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let f = ns as f64;
    f
}

/// A count as f64, for rates.
pub fn count_f64(n: usize) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let f = n as f64;
    f
}

/// Runs `op` repeatedly: `warmup` untimed, then timed until `time` passes or `max` samples are
/// taken. Returns the samples and the wall time of the timed part.
pub fn time_loop<E>(
    warmup: Duration,
    time: Duration,
    max: usize,
    mut op: impl FnMut() -> Result<(), E>,
) -> Result<(Samples, Duration), E> {
    let w_end = Instant::now() + warmup;
    while Instant::now() < w_end {
        op()?;
    }
    let mut s = Samples::with_capacity(max.min(4 << 20));
    let start = Instant::now();
    let end = start + time;
    while s.len() < max {
        let t = Instant::now();
        if t >= end {
            break;
        }
        op()?;
        s.push(t.elapsed());
    }
    Ok((s, start.elapsed()))
}

/// `x` rounded to three decimals (the figures' JSON precision).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Samples::default();
        for i in 1..=100u64 {
            s.push(Duration::from_micros(i));
        }
        let m = s.summary().unwrap();
        assert_eq!((m.min_us, m.median_us, m.p99_us, m.count), (1.0, 50.0, 99.0, 100));
        let mut one = Samples::default();
        one.push(Duration::from_micros(7));
        assert_eq!(one.summary().unwrap().p99_us, 7.0);
        assert!(Samples::default().summary().is_none());
    }
}
