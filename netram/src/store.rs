//! [`PageStore`]: pages kept on memory servers for a layer that manages its own mapping (DSM's
//! nodes spill the pages they own there when over their budget).
//!
//! Unlike [`crate::NetRam`] it maps nothing and decides nothing: the caller says which page to
//! store, fetch or forget. Each page goes to its slab's servers (power of two choices over their
//! free memory, as network RAM places slabs), on as many distinct servers as copies were asked
//! for; a fetch fails over between them; a page stored again replaces its copies (stale ones
//! are freed). Every copy is freed when the store is dropped (its sessions end).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use mosaic_transport::{ClusterKey, Page};

use crate::servers::ServerSet;
use crate::{ConfigError, NetRamError, PageError, PAGE_SIZE};

/// Pages on memory servers, by number.
pub struct PageStore {
    servers: ServerSet,
    /// Each stored page's holders (a mask of `servers`' members).
    holders: Mutex<HashMap<u64, u32>>,
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uris: Vec<&str> = self.servers.members.iter().map(|m| m.uri.as_str()).collect();
        f.debug_struct("PageStore").field("servers", &uris).field("pages", &self.len()).finish()
    }
}

/// Why a page could not be stored.
#[derive(Debug, thiserror::Error)]
#[error("page {page}: no memory server could store it (all full or down: {servers})")]
pub struct StoreError {
    /// The page.
    pub page: u64,
    /// The servers, and how many of them are alive.
    pub servers: String,
}

impl PageStore {
    /// Connects to `servers` (transport URIs) with `key`, keeping `copies` copies of each page
    /// on distinct servers (1 to the number of servers).
    pub fn connect(servers: &[String], key: &ClusterKey, copies: usize) -> Result<PageStore, NetRamError> {
        if copies == 0 || copies > servers.len() {
            return Err(ConfigError::Copies { copies, servers: servers.len() }.into());
        }
        let mut id = [0u8; 24 + crate::proto::SECRET_LEN];
        getrandom::fill(&mut id).map_err(NetRamError::Random)?;
        let client: [u8; 16] = id[..16].try_into().unwrap_or_default();
        let region = u64::from_le_bytes(id[16..24].try_into().unwrap_or_default());
        let secret = id[24..].try_into().unwrap_or_default();
        // The pages matter only while this process runs: a short grace after it ends.
        let grace = Duration::from_secs(10);
        let servers = ServerSet::connect(servers, key, client, secret, region, copies, grace, Duration::from_secs(30))?;
        Ok(PageStore { servers, holders: Mutex::new(HashMap::new()) })
    }

    /// Stores `pages` (number, contents), replacing what was stored of them before. A page no
    /// server could take is an error (its previous copies, if any, are kept: they are stale,
    /// and the caller must keep its own copy). A page stored on fewer servers than the copies
    /// asked for is stored (and logged).
    pub fn store(&self, pages: &[(u64, &Page)]) -> Result<(), StoreError> {
        let batch: Vec<(u64, &[u8; PAGE_SIZE])> = pages.iter().map(|(n, p)| (*n, &p.0)).collect();
        let mut stored = self.servers.put(&batch);
        if stored.iter().any(|m| (m.count_ones() as usize) < self.servers.copies()) {
            // A server that was full may have room again (pages freed since): ask each how much
            // it has, and try once more for what is short.
            self.servers.check_sessions();
            let short: Vec<usize> =
                (0..stored.len()).filter(|k| (stored[*k].count_ones() as usize) < self.servers.copies()).collect();
            let again: Vec<(u64, &[u8; PAGE_SIZE])> = short.iter().map(|k| batch[*k]).collect();
            for (k, mask) in short.iter().zip(self.servers.put(&again)) {
                stored[*k] |= mask;
            }
            if stored.iter().any(|m| *m != 0 && (m.count_ones() as usize) < self.servers.copies()) {
                log::warn!(
                    "some pages are stored on fewer than {} servers: {}",
                    self.servers.copies(),
                    self.describe()
                );
            }
        }
        let mut stale: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut failed = None;
        {
            let mut holders = crate::lock(&self.holders);
            for ((page, _), mask) in pages.iter().zip(stored) {
                if mask == 0 {
                    failed.get_or_insert(*page);
                    continue;
                }
                if let Some(old) = holders.insert(*page, mask) {
                    // A server in both holds the new copy (it replaced the old one there).
                    if old & !mask != 0 {
                        stale.entry(old & !mask).or_default().push(*page);
                    }
                }
            }
        }
        self.servers.free_stale(stale);
        match failed {
            None => Ok(()),
            Some(page) => Err(StoreError { page, servers: self.describe() }),
        }
    }

    /// Reads page `page` into `dst` from a server holding it.
    pub fn fetch(&self, page: u64, dst: &mut Page) -> Result<(), PageError> {
        let Some(mut holders) = crate::lock(&self.holders).get(&page).copied() else {
            return Err(PageError::NoCopy { page });
        };
        loop {
            match self.servers.fetch(page, holders, dst) {
                Ok(()) => return Ok(()),
                Err((failed, last)) => {
                    holders &= !failed;
                    if holders == 0 || failed == 0 {
                        return Err(match last {
                            Some((uri, source)) => PageError::Unanswered { page, uri, source },
                            None => PageError::HoldersDown { page },
                        });
                    }
                }
            }
        }
    }

    /// Forgets `pages` (their copies are freed on the servers).
    pub fn forget(&self, pages: &[u64]) {
        let mut by_mask: HashMap<u32, Vec<u64>> = HashMap::new();
        {
            let mut holders = crate::lock(&self.holders);
            for p in pages {
                if let Some(mask) = holders.remove(p) {
                    by_mask.entry(mask).or_default().push(*p);
                }
            }
        }
        self.servers.free_stale(by_mask);
    }

    /// Whether a copy of `page` is stored.
    pub fn holds(&self, page: u64) -> bool {
        crate::lock(&self.holders).contains_key(&page)
    }

    /// Whether a copy of `page` is stored on a server that is alive (as far as this store
    /// knows): whether dropping the caller's own copy is safe.
    pub fn readable(&self, page: u64) -> bool {
        crate::lock(&self.holders).get(&page).is_some_and(|h| self.servers.live_holder(*h).is_some())
    }

    /// Pages stored.
    pub fn len(&self) -> usize {
        crate::lock(&self.holders).len()
    }

    /// Whether no page is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The servers, and how many are alive, for messages.
    fn describe(&self) -> String {
        let alive = self.servers.members.iter().filter(|m| m.alive()).count();
        let uris: Vec<&str> = self.servers.members.iter().map(|m| m.uri.as_str()).collect();
        format!("{} ({alive} of {} alive)", uris.join(", "), uris.len())
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        self.servers.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemServer, MemServerConfig};

    fn key() -> ClusterKey {
        ClusterKey::from_bytes(b"page-store-test-key-0123456789abcdef").unwrap()
    }

    fn page(fill: u8) -> Box<Page> {
        let mut p = Page::boxed();
        p.0.fill(fill);
        p
    }

    #[test]
    fn pages_are_stored_replaced_fetched_and_forgotten() {
        let a = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(1 << 20, key())).unwrap();
        let b = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(1 << 20, key())).unwrap();
        let store = PageStore::connect(&[a.uri().to_string(), b.uri().to_string()], &key(), 2).unwrap();
        let (one, two) = (page(1), page(2));
        store.store(&[(7, &one), (9, &two)]).unwrap();
        let mut got = Page::boxed();
        store.fetch(9, &mut got).unwrap();
        assert_eq!(got.0, two.0);
        store.store(&[(9, &one)]).unwrap();
        store.fetch(9, &mut got).unwrap();
        assert_eq!(got.0, one.0, "the page stored again replaces the old contents");
        // Two copies: one server gone, the other answers.
        a.shutdown();
        store.fetch(7, &mut got).unwrap();
        assert_eq!(got.0, one.0);
        store.forget(&[7]);
        assert!(!store.holds(7) && store.holds(9));
        assert!(matches!(store.fetch(7, &mut got), Err(PageError::NoCopy { page: 7 })));
        assert!(matches!(store.fetch(8, &mut got), Err(PageError::NoCopy { page: 8 })));
    }

    #[test]
    fn a_full_server_is_an_error_and_a_dead_one_loses_its_only_copies() {
        // Room for 64 pages (the least a server takes).
        let a = MemServer::start("tcp://127.0.0.1:0", MemServerConfig::new(64 * 4096, key())).unwrap();
        let store = PageStore::connect(&[a.uri().to_string()], &key(), 1).unwrap();
        let p = page(3);
        let many: Vec<(u64, &Page)> = (0..65).map(|n| (n, &*p)).collect();
        let e = store.store(&many).unwrap_err();
        assert!(e.to_string().contains("no memory server could store it"), "{e}");
        assert_eq!(store.len(), 64);
        a.shutdown();
        let mut got = Page::boxed();
        let e = store.fetch(0, &mut got).unwrap_err();
        assert!(matches!(e, PageError::Unanswered { .. } | PageError::HoldersDown { .. }), "{e}");
        assert!(PageStore::connect(&[], &key(), 1).is_err());
    }
}
