#![allow(missing_docs, clippy::cast_possible_truncation)]
//! The pager against the real kernel: faults served in both modes, installs, drops, dirty
//! tracking, mremap/munmap/MADV_DONTNEED/fork, and failing closed (SIGBUS, never zeros).
//!
//! Scenarios that must end in a signal run in a child process: this test binary re-run with one
//! ignored helper test, named in `MOSAIC_PAGER_CHILD`.

use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mosaic_pager::{
    ConfigError, DirtyTracking, Fault, FaultMode, FillError, Filled, Outcome, Page, PageSource, PagerError, PagerStats,
    Region, RegionConfig, Token, WriteDecision, PAGE_SIZE,
};

const MODES: [FaultMode; 4] =
    [FaultMode::Workers(1), FaultMode::Workers(3), FaultMode::FaultingThread, FaultMode::PerCpu];

/// Fills page i with bytes derived from i; counts calls; pages listed in `fail` fail; page
/// `zero_from..` are zero pages.
#[derive(Default)]
struct Pattern {
    calls: AtomicU64,
    fail: Vec<u64>,
    discarded: Mutex<Vec<Range<u64>>>,
    /// Where the region is, once known, so `written` can look at a page before it is written.
    base: AtomicU64,
    /// (page, its first byte when `written` was called, whether the fault said "write").
    written: Mutex<Vec<(u64, u8)>>,
    write_faults: Mutex<Vec<u64>>,
    /// (page, token, outcome) of every `installed` call.
    installed: Mutex<Vec<(u64, Token, Outcome)>>,
}

fn byte(index: u64, offset: usize) -> u8 {
    (index.wrapping_mul(31) as u8) ^ (offset as u8)
}

impl PageSource for Pattern {
    fn fill(&self, fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if fault.write {
            self.write_faults.lock().unwrap().push(fault.index);
        }
        if self.fail.contains(&fault.index) {
            return Err(FillError::new(format!("test source refuses page {}", fault.index)));
        }
        if fault.index >= 1000 {
            return Ok(Filled::Zero(Token(fault.index + 1)));
        }
        for (o, b) in page.0.iter_mut().enumerate() {
            *b = byte(fault.index, o);
        }
        Ok(Filled::Data(Token(fault.index + 1)))
    }

    fn installed(&self, index: u64, token: Token, outcome: Outcome) {
        self.installed.lock().unwrap().push((index, token, outcome));
    }

    fn discarded(&self, pages: Range<u64>) {
        self.discarded.lock().unwrap().push(pages);
    }

    fn written(&self, fault: &Fault<'_>) -> WriteDecision {
        let index = fault.index;
        let base = self.base.load(Ordering::SeqCst);
        // SAFETY: the page is present and write-protected; reading it does not fault.
        let first = unsafe { std::ptr::read_volatile((base + index * PAGE_SIZE as u64) as *const u8) };
        self.written.lock().unwrap().push((index, first));
        WriteDecision::Proceed
    }
}

fn region(pages: u64, mode: FaultMode, dirty: DirtyTracking) -> (Region, Arc<Pattern>) {
    let src = Arc::new(Pattern::default());
    let r = Region::new(RegionConfig::new(pages).mode(mode).dirty(dirty).name("test"), src.clone()).unwrap();
    (r, src)
}

fn page_slice(r: &Region, index: u64) -> &[u8] {
    // SAFETY: the page is inside the live region; reading it faults it in.
    // SAFETY: the page is inside the live region; reading it faults it in.
    unsafe { std::slice::from_raw_parts(r.as_ptr().add(index as usize * PAGE_SIZE), PAGE_SIZE) }
}

fn check_page(r: &Region, index: u64) {
    let p = page_slice(r, index);
    for (o, b) in p.iter().enumerate() {
        assert_eq!(*b, byte(index, o), "page {index} offset {o}");
    }
}

/// The region's counters once they satisfy `ok` (a worker counts an install just after the
/// faulting thread resumes), or as they are after 2 s.
fn settled(r: &Region, ok: impl Fn(&PagerStats) -> bool) -> PagerStats {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let s = r.stats();
        if ok(&s) || std::time::Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn faults_are_served_with_the_sources_data_in_every_mode() {
    for mode in MODES {
        let (r, src) = region(64, mode, DirtyTracking::Off);
        for i in (0..64).rev() {
            check_page(&r, i);
        }
        assert_eq!(src.calls.load(Ordering::SeqCst), 64, "{mode:?}: one fill per page");
        let s = settled(&r, |s| s.installed >= 64);
        assert_eq!((s.faults, s.installed, s.lost), (64, 64, 0), "{mode:?}");
        // Present pages do not fault again.
        check_page(&r, 7);
        assert_eq!(src.calls.load(Ordering::SeqCst), 64);
    }
}

#[test]
fn many_threads_faulting_the_same_pages_all_see_the_right_data() {
    for mode in MODES {
        let (r, src) = region(256, mode, DirtyTracking::Off);
        let r = Arc::new(r);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for k in 0..256u64 {
                        check_page(&r, (k * 7 + t) % 256);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = settled(&r, |s| s.installed >= 256);
        assert_eq!(s.installed, 256, "{mode:?}: each page installed once");
        assert!(src.calls.load(Ordering::SeqCst) >= 256);
        assert_eq!(s.lost, 0);
    }
}

#[test]
fn writes_after_a_fault_stick_and_zero_pages_are_writable() {
    for mode in MODES {
        let (r, _src) = region(2000, mode, DirtyTracking::Scan);
        let p = r.as_ptr();
        // SAFETY: inside the region.
        unsafe {
            *p.add(3 * PAGE_SIZE + 5) = 0xAB; // write fault on a data page
            assert_eq!(*p.add(1500 * PAGE_SIZE), 0); // zero page, read
            *p.add(1500 * PAGE_SIZE + 1) = 7; // then written (copy-on-write of the zero page)
            *p.add(1501 * PAGE_SIZE) = 9; // write fault on a zero page
            assert_eq!(*p.add(3 * PAGE_SIZE + 5), 0xAB);
            assert_eq!(*p.add(3 * PAGE_SIZE + 6), byte(3, 6));
            assert_eq!(*p.add(1500 * PAGE_SIZE + 1), 7);
            assert_eq!(*p.add(1501 * PAGE_SIZE), 9);
        }
        assert_eq!(settled(&r, |s| s.zero >= 2).zero, 2, "{mode:?}");
    }
}

#[test]
fn installed_pages_need_no_fault_and_existing_pages_are_kept() {
    let (r, src) = region(16, FaultMode::Workers(1), DirtyTracking::Off);
    let mut pages = vec![Page::ZERO, Page::ZERO];
    pages[0].0.fill(1);
    pages[1].0.fill(2);
    check_page(&r, 5); // present before the install
    assert_eq!(r.install(4, &pages).unwrap(), 1, "page 5 was already present");
    assert_eq!(r.stats().already_present, 1);
    assert!(page_slice(&r, 4).iter().all(|b| *b == 1));
    check_page(&r, 5);
    assert_eq!(src.calls.load(Ordering::SeqCst), 1);
    assert_eq!(r.install_zero(8, 4).unwrap(), 4);
    assert!(page_slice(&r, 9).iter().all(|b| *b == 0));
    assert_eq!(src.calls.load(Ordering::SeqCst), 1);
    assert_eq!(r.present(0, 16).unwrap(), vec![4..6, 8..12]);
}

#[test]
fn install_moving_moves_pages_without_copying() {
    let (r, src) = region(300, FaultMode::Workers(1), DirtyTracking::Scan);
    let mut staging: Vec<Page> = (0..256).map(|_| Page::ZERO).collect();
    for (i, p) in staging.iter_mut().enumerate() {
        p.0.fill(i as u8);
    }
    assert_eq!(r.install_moving(10, &mut staging).unwrap(), 256);
    for i in 0..256u64 {
        assert!(page_slice(&r, 10 + i).iter().all(|b| *b == i as u8), "page {}", 10 + i);
    }
    assert_eq!(src.calls.load(Ordering::SeqCst), 0);
    // The staging buffer is still usable memory afterwards.
    staging[3].0[0] = 1;
    assert_eq!(staging[3].0[0], 1);
}

#[test]
fn dropped_pages_fault_again_and_are_not_reported_as_discarded() {
    for mode in MODES {
        let (r, src) = region(32, mode, DirtyTracking::Off);
        for i in 0..32 {
            check_page(&r, i);
        }
        r.drop_pages(8, 8).unwrap();
        assert_eq!(r.present(0, 32).unwrap(), vec![0..8, 16..32]);
        for i in 0..32 {
            check_page(&r, i);
        }
        assert_eq!(src.calls.load(Ordering::SeqCst), 40, "{mode:?}");
        assert!(src.discarded.lock().unwrap().is_empty(), "our own drop is not the application's");
    }
}

#[test]
fn runs_dropped_in_one_batch_fault_again_and_the_rest_stay() {
    for report in [false, true] {
        let src = Arc::new(Pattern::default());
        let r = Region::new(RegionConfig::new(64).report_discards(report).name("test"), src.clone()).unwrap();
        for i in 0..64 {
            check_page(&r, i);
        }
        let dropped_before = r.stats().dropped;
        // Scattered runs, the way eviction drops a round of random pages, and one run outside.
        let failed = r.drop_runs(&[1..2, 5..9, 20..21, 40..48, 63..64, 60..70]);
        assert_eq!(failed.len(), 1, "only the run past the end fails (report_discards({report}))");
        assert_eq!(failed[0].0, 60..70);
        assert!(matches!(failed[0].1, PagerError::OutOfRange { .. }), "{:?}", failed[0].1);
        assert_eq!(r.present(0, 64).unwrap(), vec![0..1, 2..5, 9..20, 21..40, 48..63]);
        assert_eq!(r.stats().dropped - dropped_before, 15);
        for i in 0..64 {
            check_page(&r, i);
        }
        assert_eq!(src.calls.load(Ordering::SeqCst), 64 + 15, "each dropped page faulted once more");
        assert!(src.discarded.lock().unwrap().is_empty(), "our own drop is not the application's");
    }
}

#[test]
fn the_applications_madv_dontneed_reaches_the_source() {
    let (r, src) = region(32, FaultMode::Workers(1), DirtyTracking::Off);
    for i in 0..32 {
        check_page(&r, i);
    }
    // SAFETY: advising pages inside the region, as an application would.
    let rc = unsafe { libc::madvise(r.as_ptr().add(4 * PAGE_SIZE).cast(), 3 * PAGE_SIZE, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    // madvise returns once a worker has read the event; the source hears of it just after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while src.discarded.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(*src.discarded.lock().unwrap(), vec![4..7]);
}

#[test]
fn written_pages_are_reported_once_per_write_epoch() {
    for mode in MODES {
        let (r, _src) = region(2000, mode, DirtyTracking::Scan);
        for i in 0..16 {
            check_page(&r, i);
        }
        // SAFETY: reading a zero page inside the region.
        unsafe { assert_eq!(*r.as_ptr().add(1200 * PAGE_SIZE), 0) };
        assert_eq!(r.take_written(0, 2000).unwrap(), Vec::<Range<u64>>::new(), "{mode:?}: reads are clean");
        let p = r.as_ptr();
        // SAFETY: writes inside the region.
        unsafe {
            *p.add(5 * PAGE_SIZE) = 1;
            *p.add(6 * PAGE_SIZE + 100) = 1;
            *p.add(12 * PAGE_SIZE) = 1;
            *p.add(1200 * PAGE_SIZE) = 1;
            *p.add(1900 * PAGE_SIZE) = 1; // never faulted before: write fault on a missing page
        }
        let written = r.take_written(0, 2000).unwrap();
        assert_eq!(written, vec![5..7, 12..13, 1200..1201, 1900..1901], "{mode:?}");
        assert_eq!(r.take_written(0, 2000).unwrap(), Vec::<Range<u64>>::new(), "{mode:?}: re-protected");
        // SAFETY: a write inside the region.
        unsafe { *p.add(6 * PAGE_SIZE) = 2 };
        assert_eq!(r.take_written(0, 2000).unwrap(), vec![6..7], "{mode:?}");
        // The data survived the protect/unprotect cycles.
        // SAFETY: reads inside the region.
        unsafe {
            assert_eq!(*p.add(6 * PAGE_SIZE), 2);
            assert_eq!(*p.add(6 * PAGE_SIZE + 100), 1);
            assert_eq!(*p.add(6 * PAGE_SIZE + 1), byte(6, 1));
        }
    }
}

#[test]
fn exact_dirty_tracking_hears_of_each_first_write_before_it_lands() {
    for mode in MODES {
        let (r, src) = region(2000, mode, DirtyTracking::Faults);
        src.base.store(r.as_ptr() as u64, Ordering::SeqCst);
        let p = r.as_ptr();
        check_page(&r, 4); // read: installed protected
                           // SAFETY: reads and writes inside the region.
        unsafe {
            assert_eq!(std::ptr::read_volatile(p.add(1100 * PAGE_SIZE)), 0); // zero page, read
            *p.add(4 * PAGE_SIZE) = 0xEE; // first write: written(4) sees the old byte
            *p.add(4 * PAGE_SIZE + 1) = 0xEF; // same epoch: no call
            *p.add(9 * PAGE_SIZE) = 1; // a write fault on a missing page: installed writable
            *p.add(9 * PAGE_SIZE + 1) = 2;
            *p.add(1100 * PAGE_SIZE) = 5; // a protected zero page: heard of too
            assert_eq!(*p.add(4 * PAGE_SIZE), 0xEE);
            assert_eq!(*p.add(4 * PAGE_SIZE + 2), byte(4, 2));
            assert_eq!(*p.add(1100 * PAGE_SIZE), 5);
        }
        assert_eq!(*src.written.lock().unwrap(), vec![(4, byte(4, 0)), (1100, 0)], "{mode:?}");
        assert_eq!(*src.write_faults.lock().unwrap(), vec![9], "{mode:?}");
        // Protect again (a new epoch): the next write is heard of again.
        r.write_protect(4, 1, true).unwrap();
        // SAFETY: a write inside the region.
        unsafe { *p.add(4 * PAGE_SIZE + 3) = 1 };
        assert_eq!(src.written.lock().unwrap().last(), Some(&(4, 0xEE)), "{mode:?}");
    }
}

/// A source that, on a first write, makes page 4 writable itself, and answers `Retry` for the
/// first write to page 5 (as a source that dropped the page meanwhile would), then `Proceed`.
#[derive(Default)]
struct Unprotecting {
    written: Mutex<Vec<u64>>,
    fills: Mutex<Vec<(u64, bool)>>,
}

impl PageSource for Unprotecting {
    fn fill(&self, fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError> {
        self.fills.lock().unwrap().push((fault.index, fault.write));
        page.0.fill(fault.index as u8);
        Ok(Filled::Data(Token::default()))
    }

    fn written(&self, fault: &Fault<'_>) -> WriteDecision {
        self.written.lock().unwrap().push(fault.index);
        match fault.index {
            4 => {
                fault.unprotect().unwrap();
                WriteDecision::Proceed
            }
            5 if self.written.lock().unwrap().len() == 2 => WriteDecision::Retry,
            _ => WriteDecision::Proceed,
        }
    }
}

#[test]
fn a_source_can_unprotect_a_page_itself_or_have_the_write_retried() {
    for mode in MODES {
        let src = Arc::new(Unprotecting::default());
        let r = Region::new(RegionConfig::new(16).mode(mode).dirty(DirtyTracking::Faults), src.clone()).unwrap();
        let p = r.as_ptr();
        // SAFETY: reads and writes inside the region.
        unsafe {
            assert_eq!(std::ptr::read_volatile(p.add(4 * PAGE_SIZE)), 4); // read: protected
            assert_eq!(std::ptr::read_volatile(p.add(5 * PAGE_SIZE)), 5);
            *p.add(4 * PAGE_SIZE) = 0x44; // unprotected by the source
            *p.add(4 * PAGE_SIZE + 1) = 0x45; // writable now: no second call
            *p.add(5 * PAGE_SIZE) = 0x55; // retried: the second write fault proceeds
            assert_eq!(std::ptr::read_volatile(p.add(4 * PAGE_SIZE)), 0x44);
            assert_eq!(std::ptr::read_volatile(p.add(4 * PAGE_SIZE + 1)), 0x45);
            assert_eq!(std::ptr::read_volatile(p.add(5 * PAGE_SIZE)), 0x55);
            assert_eq!(std::ptr::read_volatile(p.add(5 * PAGE_SIZE + 1)), 5);
        }
        assert_eq!(*src.written.lock().unwrap(), vec![4, 5, 5], "{mode:?}");
        assert_eq!(*src.fills.lock().unwrap(), vec![(4, false), (5, false)], "{mode:?}");
    }
}

/// Installs every page itself (its first byte the page's index + 1) and answers `Present`;
/// counts `installed` calls, which must not come.
#[derive(Default)]
struct InstallsItself {
    installed_calls: AtomicU64,
}

impl PageSource for InstallsItself {
    fn fill(&self, fault: &Fault<'_>, _page: &mut Page) -> Result<Filled, FillError> {
        let mut p = Page::ZERO;
        p.0[0] = fault.index as u8 + 1;
        fault.region.install(fault.index, std::slice::from_ref(&p)).map_err(FillError::new)?;
        Ok(Filled::Present)
    }

    fn installed(&self, _index: u64, _token: Token, _outcome: Outcome) {
        self.installed_calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_source_that_installs_the_page_itself_only_has_its_thread_woken() {
    for mode in MODES {
        let src = Arc::new(InstallsItself::default());
        let r = Region::new(RegionConfig::new(8).mode(mode), src.clone()).unwrap();
        let p = r.as_ptr();
        for i in 0..8 {
            // SAFETY: a read inside the region.
            assert_eq!(unsafe { std::ptr::read_volatile(p.add(i * PAGE_SIZE)) }, i as u8 + 1, "{mode:?}");
        }
        // The stats may trail the woken thread by a moment.
        let s = settled(&r, |s| s.installed == 8 && s.faults == 8);
        assert_eq!((s.installed, s.faults), (8, 8), "{mode:?}");
        assert_eq!(src.installed_calls.load(Ordering::Relaxed), 0, "{mode:?}");
    }
}

#[test]
fn a_fixed_address_is_honoured_and_an_occupied_one_refused() {
    // An address far from where the kernel places mappings, so parallel tests cannot take it.
    let addr = 0x3f00_0000_0000usize + (std::process::id() as usize % 1024) * (1 << 24);
    let src = Arc::new(Pattern::default());
    let r = Region::new(RegionConfig::new(64).fixed_addr(addr), src.clone()).unwrap();
    assert_eq!(r.as_ptr() as usize, addr);
    check_page(&r, 63);
    let again = Region::new(RegionConfig::new(64).fixed_addr(addr), src);
    assert!(matches!(again, Err(PagerError::Config(ConfigError::AddressInUse { addr: a })) if a == addr), "{again:?}");
}

#[test]
fn bad_configurations_and_ranges_are_refused() {
    let src = Arc::new(Pattern::default());
    assert!(matches!(Region::new(RegionConfig::new(0), src.clone()), Err(PagerError::Config(ConfigError::NoPages))));
    assert!(matches!(
        Region::new(RegionConfig::new(1 << 40), src.clone()),
        Err(PagerError::Config(ConfigError::TooLarge { .. }) | PagerError::Os { .. })
    ));
    assert!(matches!(
        Region::new(RegionConfig::new(4).fixed_addr(12345), src.clone()),
        Err(PagerError::Config(ConfigError::BadAddress { addr: 12345 }))
    ));
    assert!(matches!(
        Region::new(RegionConfig::new(4).mode(FaultMode::Workers(0)), src.clone()),
        Err(PagerError::Config(ConfigError::NoWorkers))
    ));
    let (r, _) = region(8, FaultMode::Workers(1), DirtyTracking::Off);
    assert!(matches!(r.drop_pages(6, 3), Err(PagerError::OutOfRange { first: 6, end: 9, pages: 8 })));
    assert!(matches!(r.install_zero(u64::MAX, 2), Err(PagerError::OutOfRange { .. })));
    assert!(matches!(r.poison(0, 0), Err(PagerError::OutOfRange { .. })));
    assert!(matches!(r.take_written(0, 8), Err(PagerError::NoDirtyTracking { .. })), "needs track_dirty");
}

#[test]
fn mremap_of_the_whole_region_is_followed() {
    for mode in [FaultMode::Workers(1), FaultMode::FaultingThread] {
        let (r, src) = region(16, mode, DirtyTracking::Off);
        check_page(&r, 0);
        let old = r.as_ptr();
        // SAFETY: move the whole region elsewhere, as an application's realloc might.
        let new = unsafe {
            libc::mremap(
                old.cast(),
                16 * PAGE_SIZE,
                16 * PAGE_SIZE,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                old.add(64 << 20).cast::<libc::c_void>(),
            )
        };
        assert_ne!(new, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        // The event is read by a worker; wait until the region follows.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while r.as_ptr() != new.cast() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(r.as_ptr(), new.cast::<u8>(), "{mode:?}");
        for i in 0..16 {
            check_page(&r, i);
        }
        assert_eq!(src.calls.load(Ordering::SeqCst), 16);
        drop(r); // unmaps the new location
                 // SAFETY: probing whether the new range is still mapped.
        let still = unsafe { libc::msync(new, PAGE_SIZE, libc::MS_ASYNC) };
        assert_eq!(still, -1, "{mode:?}: the moved region was not unmapped");
    }
}

#[test]
fn an_application_munmap_is_noticed_and_not_unmapped_again() {
    let (r, _src) = region(16, FaultMode::Workers(1), DirtyTracking::Off);
    let p = r.as_ptr();
    // SAFETY: the application maps something of its own over the region's last four
    // pages (an implicit munmap, atomic so no parallel test can take the hole), which dropping
    // the region must not unmap.
    unsafe {
        let mine = libc::mmap(
            p.add(12 * PAGE_SIZE).cast(),
            4 * PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
        assert_eq!(mine.cast::<u8>(), p.add(12 * PAGE_SIZE));
        *mine.cast::<u8>() = 42;
        // The region still serves its other pages.
        check_page(&r, 3);
        drop(r);
        assert_eq!(*mine.cast::<u8>(), 42, "the application's new mapping survived the region's drop");
        libc::munmap(mine, 4 * PAGE_SIZE);
    }
}

// ----- scenarios that end in a signal, run in a child process -----

const CHILD_ENV: &str = "MOSAIC_PAGER_CHILD";

/// Runs `scenario` in a child process (killed after 30 s) and returns its exit status and
/// standard error.
fn run_child(scenario: &str) -> (std::process::ExitStatus, String) {
    run_child_env(scenario, &[])
}

fn run_child_env(scenario: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_scenario", "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .env(CHILD_ENV, scenario)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = Vec::new();
        let _ = stderr.by_ref().take(1 << 20).read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let s = child.wait().unwrap();
            panic!("{scenario}: child hung, killed ({s:?})\n{}", reader.join().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    (status, reader.join().unwrap())
}

/// The child's part. Ignored, so it is never a test by itself.
#[test]
#[ignore = "the child process of the signal tests, not a test by itself"]
fn child_scenario() {
    let scenario = std::env::var(CHILD_ENV).expect("run by the signal tests");
    let (mode, what) = scenario.split_once(':').unwrap();
    let mode = if mode == "signal" { FaultMode::FaultingThread } else { FaultMode::Workers(2) };
    let src = Arc::new(Pattern { fail: vec![3], ..Pattern::default() });
    let r = Region::new(RegionConfig::new(8).mode(mode).name("doomed"), PanicOn5(src)).unwrap();
    match what {
        "lost" => {
            check_page(&r, 2);
            eprintln!("READ PAGE 2");
            touch(&r, 3); // the source fails: SIGBUS
            eprintln!("READ PAGE 3: SHOULD NOT GET HERE");
        }
        "panic" => {
            touch(&r, 5);
            eprintln!("READ PAGE 5: SHOULD NOT GET HERE");
        }
        "foreign-sigbus" => {
            // A SIGBUS that is not the pager's (a mapped file truncated under us) must still
            // have its usual effect.
            let f = tempfile();
            // SAFETY: mapping a file of one page, then reading past its end.
            unsafe {
                let p = libc::mmap(std::ptr::null_mut(), 2 * PAGE_SIZE, libc::PROT_READ, libc::MAP_SHARED, f, 0);
                assert_ne!(p, libc::MAP_FAILED);
                check_page(&r, 1);
                eprintln!("MAPPED");
                let _ = std::ptr::read_volatile(p.cast::<u8>().add(PAGE_SIZE));
            }
            eprintln!("READ PAST EOF: SHOULD NOT GET HERE");
        }
        "fork" => {
            check_page(&r, 0);
            // SAFETY: the child only touches memory and exits; it inherits no region.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: the child reads the (not inherited) region: SIGSEGV.
                unsafe {
                    let _ = std::ptr::read_volatile(r.as_ptr());
                    libc::_exit(0);
                }
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            eprintln!("CHILD SIGNAL {}", libc::WTERMSIG(status));
            check_page(&r, 1);
            eprintln!("PARENT STILL SERVED");
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Reads one byte of page `index` (a real load, unlike `let _ = ...`).
fn touch(r: &Region, index: u64) -> u8 {
    // SAFETY: inside the region.
    unsafe { std::ptr::read_volatile(r.as_ptr().add(index as usize * PAGE_SIZE)) }
}

fn tempfile() -> i32 {
    let path = std::env::temp_dir().join(format!("mosaic-pager-test-{}", std::process::id()));
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: creating, sizing and unlinking a temporary file.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, 0o600);
        assert!(fd >= 0);
        libc::unlink(c.as_ptr());
        assert_eq!(libc::ftruncate(fd, PAGE_SIZE as libc::off_t), 0);
        fd
    }
}

/// A source that panics on page 5.
struct PanicOn5(Arc<Pattern>);

impl PageSource for PanicOn5 {
    fn fill(&self, fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError> {
        assert_ne!(fault.index, 5, "test source panics on page 5");
        self.0.fill(fault, page)
    }
}

#[test]
fn a_failed_fetch_raises_sigbus_and_names_the_page_never_zeros() {
    for mode in ["workers", "signal"] {
        let (status, stderr) = run_child(&format!("{mode}:lost"));
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{mode}: {status:?}\n{stderr}");
        assert!(stderr.contains("READ PAGE 2"), "{mode}: {stderr}");
        assert!(!stderr.contains("SHOULD NOT GET HERE"), "{mode}: {stderr}");
        assert!(stderr.contains("region doomed page 3"), "{mode}: {stderr}");
        assert!(stderr.contains("test source refuses page 3"), "{mode}: {stderr}");
    }
}

#[test]
fn without_uffdio_poison_a_failed_fetch_still_raises_sigbus() {
    // Kernels before 6.6 have no UFFDIO_POISON: the pager signals the faulting thread instead.
    for mode in ["workers", "signal"] {
        let (status, stderr) = run_child_env(&format!("{mode}:lost"), &[("MOSAIC_PAGER_DISABLE_FEATURES", "POISON")]);
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{mode}: {status:?}\n{stderr}");
        assert!(stderr.contains("READ PAGE 2"), "{mode}: {stderr}");
        assert!(!stderr.contains("SHOULD NOT GET HERE"), "{mode}: {stderr}");
        assert!(stderr.contains("region doomed page 3"), "{mode}: {stderr}");
    }
}

#[test]
fn a_panicking_source_loses_the_page_not_the_process() {
    for mode in ["workers", "signal"] {
        let (status, stderr) = run_child(&format!("{mode}:panic"));
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{mode}: {status:?}\n{stderr}");
        assert!(stderr.contains("the page source panicked"), "{mode}: {stderr}");
    }
}

#[test]
fn a_sigbus_that_is_not_ours_keeps_its_default_action() {
    let (status, stderr) = run_child("signal:foreign-sigbus");
    assert!(stderr.contains("MAPPED"), "{stderr}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}\n{stderr}");
    assert!(!stderr.contains("SHOULD NOT GET HERE"), "{stderr}");
}

#[test]
fn a_forked_child_does_not_inherit_the_region() {
    for mode in ["workers", "signal"] {
        let (status, stderr) = run_child(&format!("{mode}:fork"));
        assert!(status.success(), "{mode}: {status:?}\n{stderr}");
        assert!(stderr.contains(&format!("CHILD SIGNAL {}", libc::SIGSEGV)), "{mode}: {stderr}");
        assert!(stderr.contains("PARENT STILL SERVED"), "{mode}: {stderr}");
    }
}

/// Page 0 is busy until page 1 has been served: a source whose own work (here, page 1's fault)
/// must finish before it can serve page 0, as an evictor copying a discarded page must.
#[derive(Default)]
struct Gate {
    page1_served: std::sync::atomic::AtomicBool,
    busy_answers: AtomicU64,
    longest_wait: Mutex<std::time::Duration>,
    blocking_asks: AtomicU64,
}

impl PageSource for Gate {
    fn fill(&self, fault: &Fault<'_>, page: &mut Page) -> Result<Filled, FillError> {
        if fault.index == 1 {
            page.0.fill(11);
            self.page1_served.store(true, Ordering::SeqCst);
            return Ok(Filled::Data(Token::default()));
        }
        if !self.page1_served.load(Ordering::SeqCst) {
            if !fault.can_defer {
                self.blocking_asks.fetch_add(1, Ordering::SeqCst);
                // The faulting thread may block: only it waits, page 1 is served elsewhere.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while !self.page1_served.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            } else {
                self.busy_answers.fetch_add(1, Ordering::SeqCst);
                let mut w = self.longest_wait.lock().unwrap();
                *w = (*w).max(fault.waited);
                return Ok(Filled::Busy);
            }
        }
        page.0.fill(10);
        Ok(Filled::Data(Token::default()))
    }
}

/// With one fault worker, a fault whose page the source is busy with is deferred, not waited
/// for: the fault that finishes the source's work (queued behind it on the same worker) is served
/// meanwhile, then the deferred one. Waiting in the worker instead would deadlock both.
#[test]
fn a_busy_page_is_deferred_so_the_worker_serves_the_faults_behind_it() {
    for mode in [FaultMode::Workers(1), FaultMode::FaultingThread] {
        let src = Arc::new(Gate::default());
        let r = Arc::new(Region::new(RegionConfig::new(4).mode(mode).name("gate"), src.clone()).unwrap());
        let r0 = r.clone();
        let first = std::thread::spawn(move || page_slice(&r0, 0)[0]);
        // Page 0's fault is being asked about (and answered busy, or waiting) before page 1's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while src.busy_answers.load(Ordering::SeqCst) + src.blocking_asks.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "{mode:?}: page 0 was never asked for");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(page_slice(&r, 1)[0], 11, "{mode:?}");
        while !first.is_finished() {
            assert!(std::time::Instant::now() < deadline, "{mode:?}: the deferred fault was never served");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(first.join().unwrap(), 10, "{mode:?}");
        let stats = r.stats();
        assert_eq!(stats.lost, 0, "{mode:?}");
        if mode == FaultMode::FaultingThread {
            assert_eq!(src.busy_answers.load(Ordering::SeqCst), 0, "never deferrable on the faulting thread");
            assert_eq!(stats.deferred, 0);
        } else {
            let busy = src.busy_answers.load(Ordering::SeqCst);
            assert!(busy >= 1 && stats.deferred == busy, "{mode:?}: {busy} busy answers, {stats:?}");
            // Asked again with the time it has waited so far (if it was asked more than twice).
            if busy > 2 {
                assert!(*src.longest_wait.lock().unwrap() > std::time::Duration::ZERO);
            }
        }
    }
}

#[test]
fn each_fill_token_comes_back_to_installed_with_its_page() {
    for mode in MODES {
        let src = Arc::new(Pattern::default());
        let r = Region::new(RegionConfig::new(1100).mode(mode).name("tokens"), src.clone()).unwrap();
        let touch = |i: u64| {
            // SAFETY: inside the region, which lives until the end of the loop body.
            unsafe { std::ptr::read_volatile(r.as_ptr().add(i as usize * PAGE_SIZE)) }
        };
        for i in [0, 1, 2, 4, 1000, 1001] {
            touch(i);
        }
        // A fault worker calls `installed` after waking the faulting thread: wait for the last.
        for _ in 0..1000 {
            if src.installed.lock().unwrap().len() >= 6 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut got = src.installed.lock().unwrap().clone();
        got.sort_by_key(|g| g.0);
        let want: Vec<(u64, Token, Outcome)> =
            [0, 1, 2, 4, 1000, 1001].iter().map(|&i| (i, Token(i + 1), Outcome::Installed)).collect();
        assert_eq!(got, want, "{mode:?}");
    }
}
