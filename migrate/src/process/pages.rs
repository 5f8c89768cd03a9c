//! The source's side of a moved process's post-copy: its anonymous memory, read from the stopped
//! copy, with which pages hold data learned a chunk (2 MiB) at a time when first asked, so that
//! stopping the process costs the same whatever its size.
//!
//! Two requests, as for a region ([`crate::Outgoing`]): *fetch* (pages a fault wants: each comes
//! back as data, as never there, or as sent already in a stream answer) and *next* (up to so
//! many pages with data not sent yet, from a hint on, round the mappings). Each page with data is
//! sent once.

// Page numbers and counts: x86-64 only, where usize is u64.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Mutex;

use super::capture::read_memory;
use super::image::ProcessImage;
use crate::source::lock;
use crate::MigrateError;

const PAGE: u64 = 4096;
/// Pages whose presence is learned together.
const CHUNK: u64 = 512;

/// What a fetched page is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Got {
    /// It never held data: zeros.
    Zero = 0,
    /// Its bytes follow.
    Data = 1,
    /// It went in a stream answer already.
    Sent = 2,
}

impl Got {
    /// From its wire byte.
    pub fn from_u8(b: u8) -> Option<Got> {
        [Got::Zero, Got::Data, Got::Sent].into_iter().find(|g| *g as u8 == b)
    }
}

/// An anonymous mapping whose pages follow post-copy.
#[derive(Clone, Copy, Debug)]
struct Area {
    start: u64,
    pages: u64,
    /// Global index of its first page.
    first: usize,
}

#[derive(Debug)]
struct State {
    /// Chunks scanned (a bit per chunk of each area, global chunk index).
    scanned: Vec<bool>,
    /// Pages with data (learned as chunks are scanned).
    present: Vec<u64>,
    /// Pages sent (or that came early, with the image).
    taken: Vec<u64>,
    /// Present pages not taken yet among the scanned chunks, and chunks not scanned yet.
    left: usize,
    unscanned: usize,
}

/// A moved process's anonymous memory, served from its stopped copy.
#[derive(Debug)]
pub struct SourcePages {
    pid: u32,
    areas: Vec<Area>,
    /// Global chunk index of each area's first chunk.
    chunk_base: Vec<usize>,
    state: Mutex<State>,
}

fn bit(v: &[u64], i: usize) -> bool {
    v[i / 64] & (1 << (i % 64)) != 0
}
fn set(v: &mut [u64], i: usize) {
    v[i / 64] |= 1 << (i % 64);
}

impl SourcePages {
    /// The pages of process `pid` (stopped) that `image` says follow post-copy; those that
    /// travel with the image (the threads' contexts) count as sent.
    pub fn new(pid: u32, image: &ProcessImage) -> SourcePages {
        let mut areas = Vec::new();
        let mut chunk_base = Vec::new();
        let (mut n, mut chunks) = (0usize, 0usize);
        for m in image.mappings.iter().filter(|m| m.follows_post_copy()) {
            let pages = (m.end - m.start) / PAGE;
            areas.push(Area { start: m.start, pages, first: n });
            chunk_base.push(chunks);
            n += pages as usize;
            chunks += pages.div_ceil(CHUNK) as usize;
        }
        let words = n.div_ceil(64);
        let mut s = SourcePages {
            pid,
            areas,
            chunk_base,
            state: Mutex::new(State {
                scanned: vec![false; chunks],
                present: vec![0; words],
                taken: vec![0; words],
                left: 0,
                unscanned: chunks,
            }),
        };
        let early: Vec<u64> = image
            .mappings
            .iter()
            .filter(|m| m.follows_post_copy())
            .flat_map(|m| m.early.iter().flat_map(|r| (r.start..r.end).step_by(PAGE as usize)))
            .collect();
        let st = s.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        for a in early {
            if let Some(i) = index_of(&s.areas, a) {
                set(&mut st.taken, i);
            }
        }
        s
    }

    /// The page's address.
    fn addr(&self, i: usize) -> u64 {
        let k = self.areas.partition_point(|a| a.first <= i) - 1;
        self.areas[k].start + (i - self.areas[k].first) as u64 * PAGE
    }

    /// Learns which pages of chunk `c` (global) hold data, if not known yet.
    fn scan(&self, st: &mut State, c: usize) -> Result<(), MigrateError> {
        if st.scanned[c] {
            return Ok(());
        }
        let k = self.chunk_base.partition_point(|&b| b <= c) - 1;
        let a = self.areas[k];
        let first = (c - self.chunk_base[k]) as u64 * CHUNK;
        let pages = CHUNK.min(a.pages - first);
        let start = a.start + first * PAGE;
        let runs = mosaic_pager::private_pages_of(self.pid, start, start + pages * PAGE, true)
            .map_err(|e| MigrateError::Os(format!("scanning the pages of process {}: {e}", self.pid)))?;
        for r in runs {
            for addr in (r.start..r.end).step_by(PAGE as usize) {
                let i = a.first + ((addr - a.start) / PAGE) as usize;
                set(&mut st.present, i);
                if !bit(&st.taken, i) {
                    st.left += 1;
                }
            }
        }
        st.scanned[c] = true;
        st.unscanned -= 1;
        Ok(())
    }

    /// Past the last page of page `i`'s chunk.
    fn chunk_end(&self, i: usize) -> usize {
        let k = self.areas.partition_point(|a| a.first <= i) - 1;
        let a = self.areas[k];
        let o = (i - a.first) as u64;
        a.first + ((o / CHUNK + 1) * CHUNK).min(a.pages) as usize
    }

    fn chunk_of(&self, i: usize) -> usize {
        let k = self.areas.partition_point(|a| a.first <= i) - 1;
        self.chunk_base[k] + (i - self.areas[k].first) / CHUNK as usize
    }

    /// What each page at `addrs` is; the bytes of those with data are appended to `out`, in
    /// order. They count as sent.
    pub fn fetch(&self, addrs: &[u64], out: &mut Vec<u8>) -> Result<Vec<Got>, MigrateError> {
        let mut kinds = Vec::with_capacity(addrs.len());
        let mut to_read = Vec::new();
        {
            let mut st = lock(&self.state);
            for &a in addrs {
                let Some(i) = index_of(&self.areas, a) else {
                    kinds.push(Got::Zero);
                    continue;
                };
                self.scan(&mut st, self.chunk_of(i))?;
                let g = if bit(&st.taken, i) {
                    Got::Sent
                } else if bit(&st.present, i) {
                    set(&mut st.taken, i);
                    st.left -= 1;
                    to_read.push(a);
                    Got::Data
                } else {
                    Got::Zero
                };
                kinds.push(g);
            }
        }
        self.read(&to_read, out)?;
        Ok(kinds)
    }

    /// Up to `most` pages with data not sent yet, from the page at `hint` on, round the
    /// mappings: their addresses, and their bytes appended to `out`. `true` once every page
    /// with data has been sent.
    pub fn next(&self, hint: u64, most: usize, out: &mut Vec<u8>) -> Result<(Vec<u64>, bool), MigrateError> {
        let total = self.areas.last().map_or(0, |a| a.first + a.pages as usize);
        let mut addrs = Vec::new();
        {
            let mut st = lock(&self.state);
            if total == 0 {
                return Ok((addrs, true));
            }
            let start = index_of(&self.areas, hint).unwrap_or(0);
            let mut i = start;
            let mut seen = 0;
            while addrs.len() < most && seen < total && (st.left > 0 || st.unscanned > 0) {
                let c = self.chunk_of(i);
                self.scan(&mut st, c)?;
                // Whole words of pages with nothing to send are skipped at once (within the
                // chunk just scanned: the next chunk's bits are not known yet).
                let w = i / 64;
                let nothing = st.present[w] & !st.taken[w] == 0;
                let step = if nothing {
                    (64 - i % 64).min(self.chunk_end(i) - i)
                } else {
                    if bit(&st.present, i) && !bit(&st.taken, i) {
                        set(&mut st.taken, i);
                        st.left -= 1;
                        addrs.push(self.addr(i));
                    }
                    1
                };
                i += step;
                seen += step;
                if i >= total {
                    i = 0;
                }
            }
            let done = st.left == 0 && st.unscanned == 0;
            drop(st);
            self.read(&addrs, out)?;
            Ok((addrs, done))
        }
    }

    /// Appends the bytes of the pages at `addrs`, reading runs of consecutive pages at once.
    fn read(&self, addrs: &[u64], out: &mut Vec<u8>) -> Result<(), MigrateError> {
        let mut k = 0;
        while k < addrs.len() {
            let mut n = 1;
            while k + n < addrs.len() && addrs[k + n] == addrs[k] + n as u64 * PAGE {
                n += 1;
            }
            let at = out.len();
            out.resize(at + n * PAGE as usize, 0);
            read_memory(self.pid, addrs[k], &mut out[at..])?;
            k += n;
        }
        Ok(())
    }
}

fn index_of(areas: &[Area], a: u64) -> Option<usize> {
    let k = areas.partition_point(|x| x.start <= a).checked_sub(1)?;
    let x = areas[k];
    (a < x.start + x.pages * PAGE).then(|| x.first + ((a - x.start) / PAGE) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(areas: &[(u64, u64)]) -> SourcePages {
        let mut v = Vec::new();
        let mut base = Vec::new();
        let (mut n, mut c) = (0, 0);
        for &(start, p) in areas {
            v.push(Area { start, pages: p, first: n });
            base.push(c);
            n += p as usize;
            c += p.div_ceil(CHUNK) as usize;
        }
        let words = n.div_ceil(64);
        SourcePages {
            pid: 0,
            areas: v,
            chunk_base: base,
            state: Mutex::new(State {
                scanned: vec![true; c],
                present: vec![0; words],
                taken: vec![0; words],
                left: 0,
                unscanned: 0,
            }),
        }
    }

    #[test]
    fn chunks_end_at_their_area_or_after_512_pages() {
        let p = pages(&[(0x10000, 100), (0x1000000, 1000)]);
        assert_eq!(p.chunk_end(0), 100);
        assert_eq!(p.chunk_end(99), 100);
        assert_eq!(p.chunk_end(100), 612);
        assert_eq!(p.chunk_end(612), 1100);
        assert_eq!((p.chunk_of(99), p.chunk_of(100), p.chunk_of(612)), (0, 1, 2));
        assert_eq!(index_of(&p.areas, 0x1000000 + 5 * PAGE), Some(105));
        assert_eq!(index_of(&p.areas, 0x10000 + 100 * PAGE), None);
        assert_eq!(p.addr(105), 0x1000000 + 5 * PAGE);
    }

    #[test]
    fn the_stream_takes_each_present_page_once_and_says_when_all_went() {
        let p = pages(&[(0x10000, 100), (0x1000000, 1000)]);
        {
            let mut st = p.state.lock().unwrap();
            for i in [3usize, 70, 99, 100, 700, 1099] {
                set(&mut st.present, i);
                st.left += 1;
            }
            // One came early, with the image.
            set(&mut st.taken, 700);
            st.left -= 1;
        }
        let st_addr = |i| p.addr(i);
        let mut out = Vec::new();
        let got: Vec<u64> = {
            let mut st = p.state.lock().unwrap();
            // What `next` selects, without reading memory (pid 0).
            let mut v = Vec::new();
            for i in 0..1100 {
                if bit(&st.present, i) && !bit(&st.taken, i) {
                    set(&mut st.taken, i);
                    v.push(st_addr(i));
                }
            }
            st.left = 0;
            v
        };
        assert_eq!(got.len(), 5);
        out.clear();
        assert_eq!(p.next(0x10000, 64, &mut out).unwrap(), (vec![], true));
    }
}
