//! Prefetching strided fault streams, after Leap's majority-trend detector (Maruf and
//! Chowdhury, ATC '20).
//!
//! The last [`HISTORY`] faulting pages are kept; a stride that appears in more than half of the
//! differences between consecutive entries is the trend. While a trend holds, each fault brings
//! in the pages ahead of it along the stride, in the same round trip; the window doubles each
//! time the trend continues (up to [`MAX_WINDOW`]) and falls back when it breaks. Prefetched pages
//! never fault, so the detector records the last prefetched page as if it had: the next fault of
//! a scan then shows the same stride again.

use std::sync::Mutex;

/// Faults remembered.
const HISTORY: usize = 8;
/// First window once a trend appears.
const MIN_WINDOW: u64 = 4;
/// Largest window, in pages.
pub(crate) const MAX_WINDOW: u64 = 64;

#[derive(Default)]
struct State {
    last: [u64; HISTORY],
    len: usize,
    next: usize,
    stride: i64,
    window: u64,
}

impl State {
    fn push(&mut self, page: u64) {
        self.last[self.next] = page;
        self.next = (self.next + 1) % HISTORY;
        self.len = (self.len + 1).min(HISTORY);
    }

    /// The majority stride of the history, if there is one.
    fn majority(&self) -> Option<i64> {
        if self.len < 3 {
            return None;
        }
        let start = (self.next + HISTORY - self.len) % HISTORY;
        let at = |k: usize| self.last[(start + k) % HISTORY];
        let mut buf = [0i64; HISTORY];
        for k in 1..self.len {
            #[allow(clippy::cast_possible_wrap)]
            let d = at(k).wrapping_sub(at(k - 1)) as i64;
            buf[k - 1] = d;
        }
        let deltas = &buf[..self.len - 1];
        // Boyer-Moore vote, then a count to confirm.
        let (mut cand, mut votes) = (0i64, 0usize);
        for &d in deltas {
            if votes == 0 {
                cand = d;
                votes = 1;
            } else if d == cand {
                votes += 1;
            } else {
                votes -= 1;
            }
        }
        let count = deltas.iter().filter(|d| **d == cand).count();
        (cand != 0 && count * 2 > deltas.len()).then_some(cand)
    }
}

/// The detector of one region.
#[derive(Default)]
pub(crate) struct Prefetcher {
    state: Mutex<State>,
}

impl Prefetcher {
    /// Records a fault at `page`; returns the stride and window to prefetch along, if a trend
    /// holds.
    pub(crate) fn on_fault(&self, page: u64) -> Option<(i64, u64)> {
        let mut s = crate::lock(&self.state);
        s.push(page);
        match s.majority() {
            Some(stride) => {
                s.window = if stride == s.stride { (s.window * 2).clamp(MIN_WINDOW, MAX_WINDOW) } else { MIN_WINDOW };
                s.stride = stride;
                Some((stride, s.window))
            }
            None => {
                s.stride = 0;
                s.window = 0;
                None
            }
        }
    }

    /// Records that pages up to `page` were prefetched along the current stride.
    pub(crate) fn prefetched_up_to(&self, page: u64) {
        crate::lock(&self.state).push(page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_scan_is_detected_and_the_window_grows() {
        let p = Prefetcher::default();
        assert_eq!(p.on_fault(10), None);
        assert_eq!(p.on_fault(11), None);
        assert_eq!(p.on_fault(12), Some((1, MIN_WINDOW)));
        // The scan continues past the prefetched pages.
        p.prefetched_up_to(16);
        assert_eq!(p.on_fault(17), Some((1, 2 * MIN_WINDOW)));
        p.prefetched_up_to(25);
        assert_eq!(p.on_fault(26), Some((1, 4 * MIN_WINDOW)));
        for page in 27..40 {
            p.on_fault(page);
        }
        assert_eq!(p.on_fault(40), Some((1, MAX_WINDOW)));
        // One jump is noise; a run of them ends the trend.
        assert_eq!(p.on_fault(5000), Some((1, MAX_WINDOW)));
        for page in [9000, 12, 7777, 300, 4242] {
            p.on_fault(page);
        }
        assert_eq!(p.on_fault(31), None);
    }

    #[test]
    fn strides_and_noise() {
        let p = Prefetcher::default();
        for page in [0, 3, 6, 9] {
            p.on_fault(page);
        }
        assert_eq!(p.on_fault(12).map(|t| t.0), Some(3));
        // A backwards scan.
        let q = Prefetcher::default();
        for page in [100, 99, 98] {
            q.on_fault(page);
        }
        assert_eq!(q.on_fault(97).map(|t| t.0), Some(-1));
        // Random faults: no majority.
        let r = Prefetcher::default();
        for page in [5, 900, 17, 4000, 33, 2, 777, 64] {
            r.on_fault(page);
        }
        assert_eq!(r.on_fault(1234), None);
        // A majority survives a little noise: 1,1,1,1,X,1,1
        let n = Prefetcher::default();
        for page in [0, 1, 2, 3, 4, 50, 51] {
            n.on_fault(page);
        }
        assert_eq!(n.on_fault(52).map(|t| t.0), Some(1));
    }
}
