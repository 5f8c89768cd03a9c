#![allow(missing_docs, clippy::cast_possible_truncation, clippy::cast_precision_loss)]
//! Measurements, not checks (all `#[ignore]`d): the local cost of serving a fault in each mode,
//! and of installing pages. `mosaic-bench netram` reports the same figures beside the remote ones.
//!
//! `cargo test --release -p mosaic-pager --test measure -- --ignored --nocapture --test-threads=1`

use std::time::{Duration, Instant};

use mosaic_pager::{Fault, FaultMode, FillError, Filled, Page, PageSource, Region, RegionConfig, Token, PAGE_SIZE};

/// A source that copies one prepared page: the local floor of a fault.
struct Local(Box<Page>);

impl PageSource for Local {
    fn fill(&self, _fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError> {
        page.0.copy_from_slice(&self.0 .0);
        Ok(Filled::Data(Token::default()))
    }
}

fn summary(mut ns: Vec<u64>) -> String {
    ns.sort_unstable();
    let n = ns.len();
    format!(
        "min {:.2} us, median {:.2} us, p99 {:.2} us ({n} samples)",
        ns[0] as f64 / 1e3,
        ns[n / 2] as f64 / 1e3,
        ns[n * 99 / 100] as f64 / 1e3
    )
}

fn fault_latency(mode: FaultMode, pages: u64) -> Vec<u64> {
    let src = Local(Box::new(Page([7; PAGE_SIZE])));
    let r = Region::new(RegionConfig::new(pages).mode(mode), src).unwrap();
    let mut lat = Vec::with_capacity(pages as usize);
    for i in 0..pages as usize {
        let t = Instant::now();
        // SAFETY: inside the region; the read faults the page in.
        let b = unsafe { std::ptr::read_volatile(r.as_ptr().add(i * PAGE_SIZE)) };
        lat.push(t.elapsed().as_nanos() as u64);
        assert_eq!(b, 7);
    }
    lat
}

#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn local_fault_latency_by_mode() {
    for round in 0..3 {
        for mode in [FaultMode::Workers(1), FaultMode::FaultingThread, FaultMode::PerCpu] {
            let lat = fault_latency(mode, 20_000);
            println!("round {round} {mode:?}: {}", summary(lat));
        }
    }
}

#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn install_cost() {
    let pages = 65_536u64;
    let src = Local(Box::new(Page([7; PAGE_SIZE])));
    let r = Region::new(RegionConfig::new(pages), src).unwrap();
    let one = [Page([1; PAGE_SIZE])];
    let mut lat = Vec::new();
    for i in 0..20_000 {
        let t = Instant::now();
        r.install(i, &one).unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
    }
    println!("install (UFFDIO_COPY) 1 page: {}", summary(lat));
    let mut batch: Vec<Page> = (0..256).map(|_| Page([2; PAGE_SIZE])).collect();
    let mut moved = 0;
    let mut spent = Duration::ZERO;
    for b in 0..40 {
        for p in batch.iter_mut() {
            p.0[0] = 3; // make every staging page present again
        }
        let t = Instant::now();
        moved += r.install_moving(31_000 + b * 256, &mut batch).unwrap();
        spent += t.elapsed();
    }
    println!("install_moving (UFFDIO_MOVE) batches of 256: {:.3} us/page", spent.as_secs_f64() * 1e6 / moved as f64);
}

#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn install_batch_sizes() {
    for batch_pages in [1usize, 8, 64, 256] {
        let src = Local(Box::new(Page([7; PAGE_SIZE])));
        let r = Region::new(RegionConfig::new(1 << 16), src).unwrap();
        let batch: Vec<Page> = (0..batch_pages).map(|_| Page([2; PAGE_SIZE])).collect();
        let mut spent = Duration::ZERO;
        let mut n = 0;
        let mut at = 0;
        while at + batch_pages as u64 <= 1 << 15 {
            let t = Instant::now();
            n += r.install(at, &batch).unwrap();
            spent += t.elapsed();
            at += batch_pages as u64;
        }
        println!(
            "UFFDIO_COPY batches of {batch_pages}: {:.3} us/page over {n} pages",
            spent.as_secs_f64() * 1e6 / n as f64
        );
    }
}
