//! The lifecycle core against a model of the region's memory and the servers' copies.
//!
//! [`World`] plays the I/O layer: the region's pages (a version number per present page; 0 is
//! zeros), which are write-protected, the servers (alive or dead, a version per page held),
//! and what the program last wrote to each page. Eviction rounds advance a step at a time,
//! interleaved with the program's reads and writes and with server deaths, and every I/O step
//! can fail. After every operation the world is checked: the program never reads anything but
//! its last write, a page leaves local RAM only with a live copy of its current contents, and
//! pages are lost only with every server that held them.

use std::collections::{HashMap, HashSet, VecDeque};

use proptest::prelude::*;

use super::*;

const PAGES: u64 = 6;
const SERVERS: usize = 3;

#[derive(Default)]
struct Server {
    dead: bool,
    pages: HashMap<u64, u32>,
}

/// A prefetch window in the model: its pages.
#[derive(Debug)]
struct Window(Vec<u64>);

impl Holds for Window {
    fn holds(&self, i: u64) -> bool {
        self.0.contains(&i)
    }
}

/// Where an eviction round is.
enum Stage {
    Idle,
    Claimed(Vec<Victim>),
    Frozen(Vec<Victim>),
    Placed(Vec<(u64, PageState)>),
}

struct World {
    table: PageTable,
    /// Pages present in the region's memory, and the version each holds.
    memory: HashMap<u64, u32>,
    protected: HashSet<u64>,
    servers: Vec<Server>,
    copies: usize,
    /// What the program last wrote to each page (0: never written: zeros).
    latest: HashMap<u64, u32>,
    versions: u32,
    queue: VecDeque<u64>,
    stage: Stage,
    kind: Round,
    /// Pages lost with their servers: their contents are no longer checked.
    lost: HashSet<u64>,
    ahead: AheadSlot<Window>,
}

#[derive(Clone, Debug)]
enum Op {
    Read(u64),
    Write(u64),
    Hot(u64),
    /// Starts a round over the first `n` queued pages (clean-only if `clean_only`).
    Claim {
        n: usize,
        clean_only: bool,
    },
    /// Write-protects the pages to save; bit k of `fail` fails the k-th.
    Freeze {
        fail: u8,
    },
    /// Stores them: bit (k * SERVERS + s) of `fail` fails the k-th page on server s.
    Store {
        fail: u32,
    },
    /// Drops the pages leaving; bit k of `fail` fails the k-th.
    Drop {
        fail: u8,
    },
    Kill(usize),
    /// Requests a window of up to `n` pages after `from` (stride 1), replacing any.
    Ahead {
        from: u64,
        n: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES).prop_map(Op::Read),
        4 => (0..PAGES).prop_map(Op::Write),
        1 => (0..PAGES).prop_map(Op::Hot),
        3 => (1..5usize, any::<bool>()).prop_map(|(n, clean_only)| Op::Claim { n, clean_only }),
        3 => prop_oneof![3 => Just(0u8), 1 => any::<u8>()].prop_map(|fail| Op::Freeze { fail }),
        3 => prop_oneof![3 => Just(0u32), 1 => any::<u32>()].prop_map(|fail| Op::Store { fail }),
        3 => prop_oneof![3 => Just(0u8), 1 => any::<u8>()].prop_map(|fail| Op::Drop { fail }),
        1 => (0..SERVERS).prop_map(Op::Kill),
        2 => (0..PAGES, 1..4u64).prop_map(|(from, n)| Op::Ahead { from, n }),
    ]
}

fn bit(mask: u64, k: usize) -> bool {
    k < 64 && mask >> k & 1 == 1
}

impl World {
    fn new(copies: usize) -> World {
        World {
            table: PageTable::new(PAGES),
            memory: HashMap::new(),
            protected: HashSet::new(),
            servers: (0..SERVERS).map(|_| Server::default()).collect(),
            copies,
            latest: HashMap::new(),
            versions: 0,
            queue: VecDeque::new(),
            stage: Stage::Idle,
            kind: Round::All,
            lost: HashSet::new(),
            ahead: AheadSlot::new(),
        }
    }

    fn latest(&self, i: u64) -> u32 {
        self.latest.get(&i).copied().unwrap_or(0)
    }

    fn live_mask(&self) -> u32 {
        (0..SERVERS).filter(|&s| !self.servers[s].dead).fold(0, |m, s| m | 1 << s)
    }

    /// The version of page `i` a live holder returns, if any; if none, checks that a server
    /// holding it died (a page is lost only with its servers).
    fn fetch(&self, i: u64) -> Option<u32> {
        let holders = self.table.holders(i);
        let found = (0..SERVERS)
            .filter(|&s| holders & 1 << s != 0 && !self.servers[s].dead)
            .find_map(|s| self.servers[s].pages.get(&i).copied());
        match found {
            Some(v) => assert_eq!(v, self.latest(i), "page {i} came back stale"),
            None => {
                let had = (0..SERVERS).any(|s| holders & 1 << s != 0 && self.servers[s].dead);
                assert!(had, "page {i} has no copy, and no server holding it died: lost by the logic");
            }
        }
        found
    }

    fn request_ahead(&mut self, from: u64, n: u64) {
        let pages = claim_along(&self.table, from, 1, n);
        if pages.is_empty() {
            return;
        }
        if let Some(old) = self.ahead.put(Window(pages)) {
            for p in old.0 {
                self.table.set(p, Remote); // given up
            }
        }
    }

    /// A fault collecting window `w`: what arrived is installed clean, the rest is remote again.
    fn collect(&mut self, w: Window) {
        for p in w.0 {
            match self.fetch(p) {
                Some(v) => {
                    self.memory.insert(p, v);
                    self.protected.insert(p);
                    self.table.set(p, Clean);
                    self.queue.push_back(p);
                }
                None => self.table.set(p, Remote),
            }
        }
    }

    /// A fault on page `i`, not present: the fault path's transitions, with the fetch
    /// served by any live holder.
    fn fault(&mut self, i: u64, write: bool) {
        match look(&self.table, &self.ahead, i) {
            Busy::Collect(w) => {
                self.collect(w);
                if self.memory.contains_key(&i) {
                    return if write { self.write(i) } else { self.read(i) };
                }
            }
            Busy::Wait => panic!("a fault on page {i} would wait for ever: busy, and nobody owns it"),
            Busy::Settled(_) => {}
        }
        let st = self.table.get(i);
        match st {
            Absent | Remote => assert!(self.table.cas(i, st, Fetching)),
            Lost => return,
            other => panic!("page {i} faulted in state {other:?} while not present"),
        }
        let version = if st == Absent {
            0
        } else if let Some(v) = self.fetch(i) {
            v
        } else {
            self.table.set(i, Lost);
            self.lost.insert(i);
            return;
        };
        self.memory.insert(i, version);
        if write {
            self.table.set(i, Dirty);
        } else {
            self.protected.insert(i);
            self.table.set(i, if st == Absent { CleanAbsent } else { Clean });
        }
        self.queue.push_back(i);
    }

    fn read(&mut self, i: u64) {
        match self.memory.get(&i) {
            Some(&v) => assert_eq!(v, self.latest(i), "page {i} read stale"),
            None => self.fault(i, false),
        }
    }

    fn write(&mut self, i: u64) {
        if !self.memory.contains_key(&i) {
            self.fault(i, true);
            if self.table.get(i) != Dirty {
                return; // lost
            }
        } else if self.protected.contains(&i) {
            match begin_write(&self.table, i) {
                WriteStep::Unprotect(was) => {
                    self.protected.remove(&i);
                    end_write(&self.table, i, was);
                }
                // The writer waits for the evictor; this write happens later, or never.
                WriteStep::Wait => return,
                WriteStep::NotResident(s) => panic!("page {i} is present but {s:?}"),
            }
        }
        self.versions += 1;
        self.memory.insert(i, self.versions);
        self.latest.insert(i, self.versions);
    }

    fn claim(&mut self, n: usize, clean_only: bool) {
        if !matches!(self.stage, Stage::Idle) {
            return;
        }
        let batch: Vec<u64> = (0..n).filter_map(|_| self.queue.pop_front()).collect();
        self.kind = if clean_only { Round::CleanOnly } else { Round::All };
        let c = claim(&self.table, &batch, self.kind, self.live_mask() | FILE_HOLDER);
        if self.kind == Round::CleanOnly {
            assert!(to_save(&c.victims).is_empty(), "a clean-only round took a page to copy: {c:?}");
        }
        self.queue.extend(c.requeue);
        self.stage = Stage::Claimed(c.victims);
    }

    fn freeze(&mut self, fail: u8) {
        if !matches!(self.stage, Stage::Claimed(_)) {
            return; // not at this step: nothing to do
        }
        let Stage::Claimed(mut victims) = std::mem::replace(&mut self.stage, Stage::Idle) else { return };
        let save = to_save(&victims);
        let unfrozen: Vec<u64> =
            save.iter().enumerate().filter(|(k, _)| bit(u64::from(fail), *k)).map(|(_, p)| *p).collect();
        for p in &save {
            if !unfrozen.contains(p) {
                self.protected.insert(*p);
            }
        }
        victims.retain(|v| !unfrozen.contains(&v.page));
        self.queue.extend(keep_dirty(&self.table, &unfrozen));
        self.stage = Stage::Frozen(victims);
    }

    fn store(&mut self, fail: u32) {
        if !matches!(self.stage, Stage::Frozen(_)) {
            return; // not at this step: nothing to do
        }
        let Stage::Frozen(victims) = std::mem::replace(&mut self.stage, Stage::Idle) else { return };
        let mut stored = HashMap::new();
        for (k, p) in to_save(&victims).into_iter().enumerate() {
            let v = self.memory[&p];
            let mut mask = 0;
            // Like the real placement: the first `copies` live servers.
            let targets: Vec<usize> = (0..SERVERS).filter(|&s| !self.servers[s].dead).take(self.copies).collect();
            for s in targets {
                if !bit(u64::from(fail), k * SERVERS + s) {
                    self.servers[s].pages.insert(p, v);
                    mask |= 1 << s;
                }
            }
            stored.insert(p, mask);
        }
        let placed = place(&self.table, &victims, &stored, self.copies);
        for (mask, pages) in placed.stale {
            for s in (0..SERVERS).filter(|s| mask & 1 << s != 0) {
                for p in &pages {
                    self.servers[s].pages.remove(p);
                }
            }
        }
        for p in &placed.kept {
            self.protected.remove(p);
        }
        self.queue.extend(placed.kept);
        self.stage = Stage::Placed(placed.leaving);
    }

    fn drop_pages(&mut self, fail: u8) {
        if !matches!(self.stage, Stage::Placed(_)) {
            return; // not at this step: nothing to do
        }
        let Stage::Placed(mut leaving) = std::mem::replace(&mut self.stage, Stage::Idle) else { return };
        let orphaned = recheck(&self.table, &mut leaving, self.live_mask() | FILE_HOLDER);
        self.queue.extend(orphaned);
        let failed: HashSet<u64> =
            leaving.iter().enumerate().filter(|(k, _)| bit(u64::from(fail), *k)).map(|(_, l)| l.0).collect();
        for (p, next) in &leaving {
            if failed.contains(p) {
                continue;
            }
            // Invariant 1: only with a live copy of what it holds now, or as zeros never stored.
            let v = self.memory[p];
            if *next == Remote {
                let holders = self.table.holders(*p);
                let live = (0..SERVERS).any(|s| {
                    holders & 1 << s != 0 && !self.servers[s].dead && self.servers[s].pages.get(p) == Some(&v)
                });
                assert!(live, "page {p} left local RAM with no live copy of version {v}");
            } else {
                assert_eq!(v, 0, "page {p} left as Absent holding version {v}");
            }
            self.memory.remove(p);
            self.protected.remove(p);
        }
        let (gone, requeue) = finish(&self.table, &leaving, &failed);
        assert_eq!(gone, (leaving.len() - failed.len()) as u64);
        self.queue.extend(requeue);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Read(i) => self.read(i),
            Op::Write(i) => self.write(i),
            Op::Hot(i) => self.table.mark_hot(i),
            Op::Claim { n, clean_only } => self.claim(n, clean_only),
            Op::Freeze { fail } => self.freeze(fail),
            Op::Store { fail } => self.store(fail),
            Op::Drop { fail } => self.drop_pages(fail),
            Op::Kill(s) => self.servers[s].dead = true,
            Op::Ahead { from, n } => self.request_ahead(from, n),
        }
        self.check();
    }

    /// The invariants of [`crate::pages`] on the whole world.
    fn check(&self) {
        let in_round: HashSet<u64> = match &self.stage {
            Stage::Idle => HashSet::new(),
            Stage::Claimed(v) | Stage::Frozen(v) => v.iter().map(|v| v.page).collect(),
            Stage::Placed(l) => l.iter().map(|l| l.0).collect(),
        };
        let window = self.ahead.take();
        let ahead: HashSet<u64> = window.iter().flat_map(|w| w.0.iter().copied()).collect();
        if let Some(w) = window {
            self.ahead.put(w);
        }
        for i in 0..PAGES {
            let st = self.table.get(i);
            let present = self.memory.get(&i).copied();
            match st {
                Clean | CleanAbsent | Dirty | Evicting => {
                    let v = present.unwrap_or_else(|| panic!("page {i} is {st:?} but not in memory"));
                    assert_eq!(v, self.latest(i), "page {i} holds a stale version");
                }
                Absent | Remote | Lost => assert!(present.is_none(), "page {i} is {st:?} but in memory"),
                Fetching => {
                    assert!(ahead.contains(&i), "page {i} is Fetching, and no window holds it");
                    assert!(present.is_none(), "page {i} is on its way but in memory");
                }
            }
            if matches!(st, Clean | CleanAbsent) {
                // Invariant 4: its first write faults, and marks it dirty first.
                assert!(self.protected.contains(&i), "page {i} is {st:?} but writable");
            }
            if st == Clean {
                let v = present.unwrap_or_default();
                let h = self.table.holders(i);
                assert!(
                    (0..SERVERS).any(|s| h & 1 << s != 0 && self.servers[s].pages.get(&i) == Some(&v)),
                    "page {i} is Clean but no holder has version {v}"
                );
            }
            if matches!(st, CleanAbsent | Absent) {
                assert_eq!(self.latest(i), 0, "page {i} is {st:?} after a write");
            }
            if st == Evicting {
                assert!(in_round.contains(&i), "page {i} is Evicting outside a round");
            }
            if st.is_resident() {
                assert!(
                    self.queue.contains(&i) || in_round.contains(&i),
                    "resident page {i} fell out of the evictor's queue: it could never be evicted"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn no_sequence_loses_a_write_or_strands_a_page(copies in 1..=2usize, ops in proptest::collection::vec(op(), 1..80)) {
        let mut w = World::new(copies);
        for op in &ops {
            w.apply(op);
        }
        // Finish any round, then read everything back.
        w.apply(&Op::Freeze { fail: 0 });
        w.apply(&Op::Store { fail: 0 });
        w.apply(&Op::Drop { fail: 0 });
        for i in 0..PAGES {
            w.apply(&Op::Read(i));
        }
    }
}

/// A world with page 0 written (Dirty), queued.
fn with_dirty_page() -> World {
    let mut w = World::new(1);
    w.apply(&Op::Write(0));
    assert_eq!(w.table.get(0), Dirty);
    w
}

#[test]
fn a_write_to_a_page_being_saved_waits_for_the_evictor() {
    // Last round's lost write: the evictor froze and copied a dirty page; a write fault on it
    // must not make it writable until the page is dropped (then the write faults it back in).
    let mut w = with_dirty_page();
    let first = w.latest(0);
    w.apply(&Op::Claim { n: 1, clean_only: false });
    w.apply(&Op::Freeze { fail: 0 });
    assert_eq!(begin_write(&w.table, 0), WriteStep::Wait, "a write got past the evictor's freeze");
    w.apply(&Op::Write(0)); // waits: lands nowhere
    assert_eq!(w.latest(0), first);
    w.apply(&Op::Store { fail: 0 });
    w.apply(&Op::Drop { fail: 0 });
    assert_eq!(w.table.get(0), Remote);
    w.apply(&Op::Write(0)); // the retried write: faults the page back, then writes
    assert_eq!(w.table.get(0), Dirty);
    w.apply(&Op::Claim { n: 1, clean_only: false });
    w.apply(&Op::Freeze { fail: 0 });
    w.apply(&Op::Store { fail: 0 });
    w.apply(&Op::Drop { fail: 0 });
    w.apply(&Op::Read(0));
    assert_eq!(w.memory[&0], w.latest(0));
}

#[test]
fn a_clean_only_round_takes_nothing_it_would_have_to_read() {
    // Last round's helper that died of SIGBUS: a fault helping the evictor copied a page the
    // application had discarded, and faulted inside fault service. A clean-only round takes
    // clean pages with a readable copy only, and copies nothing.
    let mut w = with_dirty_page();
    w.apply(&Op::Claim { n: 1, clean_only: false });
    w.apply(&Op::Freeze { fail: 0 });
    w.apply(&Op::Store { fail: 0 });
    w.apply(&Op::Drop { fail: 0 });
    w.apply(&Op::Read(0)); // Clean again, its copy on server 0
    w.apply(&Op::Read(1)); // CleanAbsent
    w.apply(&Op::Write(2)); // Dirty
    w.apply(&Op::Kill(0)); // page 0 is now an orphan: its only copy is on a dead server
    w.queue = [0, 1, 2].into();
    let c = claim(&w.table, &[0, 1, 2], Round::CleanOnly, w.live_mask() | FILE_HOLDER);
    assert!(to_save(&c.victims).is_empty());
    assert_eq!(c.victims.iter().map(|v| v.page).collect::<Vec<_>>(), vec![1], "only the zero page can go");
    assert_eq!(c.requeue, vec![0, 2], "the orphan and the dirty page wait for the evictor");
    // The evictor's own round saves the orphan rather than dropping it.
    let c = claim(&w.table, &[0], Round::All, w.live_mask() | FILE_HOLDER);
    assert_eq!(c.orphans, 1);
    assert!(c.victims[0].save);
}

#[test]
fn a_page_no_server_took_stays_resident_and_dirty() {
    let mut w = with_dirty_page();
    w.apply(&Op::Claim { n: 1, clean_only: false });
    w.apply(&Op::Freeze { fail: 0 });
    w.apply(&Op::Store { fail: u32::MAX });
    assert_eq!(w.table.get(0), Dirty);
    assert!(!w.protected.contains(&0), "kept pages are writable again");
    assert!(matches!(&w.stage, Stage::Placed(l) if l.is_empty()));
}

#[test]
fn a_fault_on_a_page_of_an_uncollected_window_collects_it() {
    // Last round's 60-second hang: a fault waited for a page of the window requested ahead,
    // which nobody was going to collect (the stream that asked for it had moved on).
    let mut w = World::new(1);
    for i in 0..4 {
        w.apply(&Op::Write(i));
    }
    w.apply(&Op::Claim { n: 4, clean_only: false });
    w.apply(&Op::Freeze { fail: 0 });
    w.apply(&Op::Store { fail: 0 });
    w.apply(&Op::Drop { fail: 0 });
    w.apply(&Op::Ahead { from: 0, n: 3 });
    assert_eq!((1..4).map(|i| w.table.get(i)).collect::<Vec<_>>(), vec![Fetching; 3]);
    match look(&w.table, &w.ahead, 2) {
        Busy::Collect(win) => {
            assert_eq!(win.0, vec![1, 2, 3]);
            w.collect(win);
        }
        other => panic!("a page of the window is {other:?}, not collected"),
    }
    assert_eq!((1..4).map(|i| w.table.get(i)).collect::<Vec<_>>(), vec![Clean; 3]);
    // The model's fault does the same.
    w.apply(&Op::Claim { n: 4, clean_only: false });
    w.apply(&Op::Freeze { fail: 0 });
    w.apply(&Op::Store { fail: 0 });
    w.apply(&Op::Drop { fail: 0 });
    w.apply(&Op::Ahead { from: 0, n: 3 });
    w.apply(&Op::Read(3));
    assert_eq!((1..4).map(|i| w.table.get(i)).collect::<Vec<_>>(), vec![Clean; 3]);
    // A page owned by a thread (not the window) is waited for.
    assert!(w.table.cas(0, Remote, Fetching));
    assert!(matches!(look(&w.table, &w.ahead, 0), Busy::Wait));
}
