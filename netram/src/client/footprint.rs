//! The process's anonymous memory outside the region: what the budget must leave room for
//! when it bounds the whole program ([`NetRamConfig::count_process_memory`]).
//!
//! Read from `/proc/self/statm` (resident minus file-backed and shared pages), a few
//! microseconds per read; the evictor reads it every round and at least every 20 ms.
//!
//! [`NetRamConfig::count_process_memory`]: super::NetRamConfig::count_process_memory

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// The measurement, kept for the fault path to read without a system call.
pub(super) struct Footprint {
    statm: Option<File>,
    /// Anonymous pages of the process outside the region at the last reading.
    outside: AtomicU64,
}

impl Footprint {
    /// Measures when `on`; otherwise [`outside`](Self::outside) stays zero.
    pub(super) fn new(on: bool) -> Footprint {
        let statm = if on {
            File::open("/proc/self/statm")
                .map_err(|e| log::warn!("cannot read /proc/self/statm ({e}): the budget covers the region only"))
                .ok()
        } else {
            None
        };
        Footprint { statm, outside: AtomicU64::new(0) }
    }

    /// Whether the process's memory is measured.
    pub(super) fn counting(&self) -> bool {
        self.statm.is_some()
    }

    /// Pages of anonymous memory the process held outside the region when last measured.
    pub(super) fn outside(&self) -> u64 {
        self.outside.load(Ordering::Relaxed)
    }

    /// Measures again, given the pages the region holds resident now.
    pub(super) fn measure(&self, region_resident: u64) {
        let Some(f) = &self.statm else { return };
        let mut buf = [0u8; 128];
        let Ok(n) = f.read_at(&mut buf, 0) else { return };
        if let Some(anon) = anonymous_pages(&buf[..n]) {
            self.outside.store(anon.saturating_sub(region_resident), Ordering::Relaxed);
        }
    }
}

/// Resident pages that are neither file-backed nor shared, from the text of
/// `/proc/self/statm` (`size resident shared text lib data dt`, in pages).
fn anonymous_pages(statm: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(statm).ok()?;
    let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
    let _size = fields.next()??;
    let resident = fields.next()??;
    let shared = fields.next()??;
    Some(resident.saturating_sub(shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_text_gives_resident_minus_shared() {
        assert_eq!(anonymous_pages(b"61034 3513 1935 1 0 2114 0\n"), Some(3513 - 1935));
        assert_eq!(anonymous_pages(b"1 2"), None);
        assert_eq!(anonymous_pages(b"x y z"), None);
        assert_eq!(anonymous_pages(b"9 1 5 0 0 0 0"), Some(0));
    }

    #[test]
    fn a_touched_allocation_shows_up_outside_the_region() {
        // Other tests in this process allocate and free meanwhile: a few attempts.
        let f = Footprint::new(true);
        let grew = (0..5).any(|_| {
            f.measure(0);
            let before = f.outside();
            let mut v = vec![0u8; 32 << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            f.measure(0);
            std::hint::black_box(&v);
            f.outside() >= before + 6000
        });
        assert!(grew, "32 MiB touched, and the anonymous pages outside the region did not grow");
        f.measure(u64::MAX / 2);
        assert_eq!(f.outside(), 0, "the region's own pages are not outside it");
        assert_eq!(Footprint::new(false).outside(), 0);
    }
}
