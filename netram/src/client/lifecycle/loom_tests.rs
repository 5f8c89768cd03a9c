//! Loom: every interleaving of a write fault and an eviction round on one dirty page, with the
//! page's memory and its write protection modelled as one atomic word (a write lands only
//! while the page is present and writable, as the MMU does it), and the server's copy as
//! another. However the two threads interleave, the write is never lost.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p mosaic-netram --lib --release loom`.

use loom::sync::atomic::{AtomicU32, Ordering::SeqCst};
use loom::sync::Arc;
use loom::thread;

use super::*;

/// The page in the region: bit 31 present, bit 30 write-protected, the rest its contents.
const PRESENT: u32 = 1 << 31;
const PROTECTED: u32 = 1 << 30;
const CONTENTS: u32 = PROTECTED - 1;

struct Page {
    table: PageTable,
    memory: AtomicU32,
    /// The server's copy (0: none).
    server: AtomicU32,
}

impl Page {
    /// The program's store of `v`: lands if the page is present and writable.
    fn store(&self, v: u32) -> bool {
        let m = self.memory.load(SeqCst);
        m & PRESENT != 0 && m & PROTECTED == 0 && self.memory.compare_exchange(m, PRESENT | v, SeqCst, SeqCst).is_ok()
    }

    /// The program writing `v`, with the fault path under it: a store that faults is served
    /// (write upgrade, or fetch back) and retried until it lands.
    fn write(&self, v: u32) {
        // Bounded: one eviction round can make a write fault at most three times (frozen,
        // dropped, fetched back); more means the page's state went wrong.
        for _ in 0..8 {
            if self.store(v) {
                return;
            }
            match begin_write(&self.table, 0) {
                WriteStep::Unprotect(was) => {
                    self.memory.fetch_and(!PROTECTED, SeqCst);
                    end_write(&self.table, 0, was);
                }
                WriteStep::Wait => thread::yield_now(),
                WriteStep::NotResident(Remote) => {
                    if self.table.cas(0, Remote, Fetching) {
                        // Installed writable and dirty: the fault is a write.
                        self.memory.store(PRESENT | self.server.load(SeqCst), SeqCst);
                        self.table.set(0, Dirty);
                    }
                }
                WriteStep::NotResident(other) => panic!("page in {other:?}"),
            }
        }
        panic!("the write never landed (state {:?})", self.table.get(0));
    }

    /// One eviction round over the page, as `Shared::evict_batch` does it.
    fn evict(&self) {
        let c = claim(&self.table, &[0], Round::All, 0b1);
        let mut victims = c.victims;
        if victims.is_empty() {
            return;
        }
        let mut stored = HashMap::new();
        if !to_save(&victims).is_empty() {
            self.memory.fetch_or(PROTECTED, SeqCst); // freeze
            let copy = self.memory.load(SeqCst) & CONTENTS;
            self.server.store(copy, SeqCst);
            stored.insert(0, 0b1);
        }
        let mut placed = place(&self.table, &victims, &stored, 1);
        victims.clear();
        let _ = recheck(&self.table, &mut placed.leaving, 0b1);
        for _ in &placed.leaving {
            self.memory.store(0, SeqCst); // dropped
        }
        let (gone, _) = finish(&self.table, &placed.leaving, &HashSet::new());
        assert!(gone <= 1);
    }

    /// What the program would read now.
    fn contents(&self) -> u32 {
        let m = self.memory.load(SeqCst);
        if m & PRESENT != 0 {
            m & CONTENTS
        } else {
            self.server.load(SeqCst)
        }
    }
}

#[test]
fn loom_a_write_racing_an_eviction_is_never_lost() {
    loom::model(|| {
        let page =
            Arc::new(Page { table: PageTable::new(1), memory: AtomicU32::new(PRESENT | 1), server: AtomicU32::new(0) });
        page.table.set(0, Dirty);
        let writer = {
            let page = page.clone();
            thread::spawn(move || page.write(2))
        };
        page.evict();
        writer.join().unwrap();
        assert_eq!(page.contents(), 2, "state {:?}", page.table.get(0));
    });
}
