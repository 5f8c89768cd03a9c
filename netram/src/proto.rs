//! The memory-server protocol: calls over any transport, little-endian, every field checked.
//!
//! | method | request                                              | response                    |
//! |--------|------------------------------------------------------|-----------------------------|
//! | OPEN   | client, grace_ms, secret                             | [`ServerState`]             |
//! | PUT    | client, region, n, n page numbers, n pages of data   | [`ServerState`]             |
//! | GET    | client, region, page                                 | the page (4096 bytes)       |
//! | FREE   | client, region, n, n page numbers (n = ALL: region)  | pages freed (u64)           |
//! | STAT   | (empty)                                              | [`ServerState`]             |
//! | RENEW  | client                                               | [`ServerState`]             |
//! | CLOSE  | client                                               | pages freed (u64)           |
//! | CLONE  | parent client, child client, grace_ms, child secret  | [`ServerState`]             |
//! | TRANSFER | client, new client, grace_ms, new secret           | [`ServerState`]             |
//!
//! # Sessions
//! A client is a random 128-bit id chosen by the client, with a 32-byte secret only it knows.
//! Pages are stored under (client, region, page). OPEN on a connection binds the client to that
//! connection: the first OPEN of an id creates the session and records a hash of the secret; a
//! later OPEN of the same id (a second connection, or a reconnect) must present the same secret.
//! Every other request names a client, and is refused with `Status::Forbidden` unless that client
//! was opened on the same connection: one authenticated peer cannot read, overwrite or end
//! another's session.
//!
//! # Clones
//! CLONE (for a process that forks) makes a new session holding a copy of every page the parent
//! has here, as they are at that moment; later writes of either do not reach the other. It needs
//! the parent's session on the calling connection. The copy is copy-on-write on the server: the
//! clone costs a table entry per page until one side writes a page. The child session starts
//! detached (bound to no connection, its grace time running): the child process attaches to it
//! with OPEN and the child secret, and if it never does, it is reclaimed like any detached one.
//!
//! # Transfers
//! TRANSFER (for a region handed over to another process) renames a session: its pages, as they
//! are, belong from then on to a new detached session with a new secret, and every connection
//! bound to the old name loses it. Nothing is copied. The taker attaches with OPEN and the new
//! secret; the giver can take it back the same way (OPEN with the new secret, TRANSFER to its old
//! name), after which the taker's connections lose it in turn.
//!
//! # Leaving
//! Every [`ServerState`] carries a *leaving* flag: the server's node is short of memory and asks
//! its clients to move their pages to other servers (the cluster's memory ushering). A client
//! places no new slab on a leaving server, writes pages back elsewhere, moves the pages it has
//! there to its other servers and frees them here. Nothing is refused meanwhile: a client with
//! nowhere else to go keeps its pages here (and stores there what no other server takes). Freed
//! slots give their memory back to the system while the flag is set. Apart from it, the free
//! pages a server reports may be fewer than its free capacity: what its node can spare.
//!
//! # Leases
//! While any connection of a client is open, nothing of it is reclaimed, however long the client
//! is silent (a stopped process, a debugger, a paused VM). When its last connection closes, the
//! server keeps its pages for the client's *grace time* (asked for in OPEN, capped by the
//! server), so a client that reconnects within it finds everything; after that they are
//! reclaimed. OPEN's answer says whether it resumed an existing session: a client that expected
//! its pages and finds a fresh session knows they are gone from that server.

use crate::PAGE_SIZE;

/// Opens (or resumes) a session.
pub const OPEN: u64 = 1;
/// Stores pages.
pub const PUT: u64 = 2;
/// Fetches one page.
pub const GET: u64 = 3;
/// Frees pages, or a whole region.
pub const FREE: u64 = 4;
/// Capacity and free space.
pub const STAT: u64 = 5;
/// Renews a lease.
pub const RENEW: u64 = 6;
/// Ends a session, freeing everything.
pub const CLOSE: u64 = 7;

/// Clones a session (for a forked child).
pub const CLONE: u64 = 8;
/// Moves a session under a new name and secret (a region handed over to another process).
pub const TRANSFER: u64 = 9;

/// A client's identity.
pub type ClientId = [u8; 16];

/// `FREE` with this count frees the whole region.
pub const ALL: u32 = u32::MAX;

/// Most pages in one PUT or FREE: a full PUT (240 pages and their numbers, 985 KB) stays under
/// the transport's default maximum frame of 1 MiB.
pub const MAX_BATCH: usize = 240;

/// A request that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed {what} request: {why}")]
pub struct ProtoError {
    /// Which request.
    pub what: &'static str,
    /// What is wrong.
    pub why: String,
}

pub(crate) fn err(what: &'static str, why: impl Into<String>) -> ProtoError {
    ProtoError { what, why: why.into() }
}

/// A little-endian reader over a request, failing with a [`ProtoError`].
pub(crate) struct Reader<'a> {
    pub(crate) what: &'static str,
    pub(crate) buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(err(self.what, format!("truncated: needs {n} more bytes, has {}", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap_or_default()))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default()))
    }
    pub(crate) fn client(&mut self) -> Result<ClientId, ProtoError> {
        Ok(self.take(16)?.try_into().unwrap_or_default())
    }
    pub(crate) fn end(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(err(self.what, format!("{} unexpected trailing bytes", self.buf.len())))
        }
    }
}

/// Server capacity and free space, in pages, and what it grants the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerState {
    /// Pages the server can hold.
    pub capacity_pages: u64,
    /// Pages still free.
    pub free_pages: u64,
    /// The grace time granted after a disconnect, in milliseconds (0 in STAT).
    pub grace_ms: u32,
    /// OPEN: true if it resumed a session that already existed (with its pages).
    pub resumed: bool,
    /// The server asks its clients to move their pages elsewhere (see "Leaving").
    pub leaving: bool,
    /// Most pages one client may store here.
    pub quota_pages: u64,
}

impl ServerState {
    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.capacity_pages.to_le_bytes());
        out.extend_from_slice(&self.free_pages.to_le_bytes());
        out.extend_from_slice(&self.grace_ms.to_le_bytes());
        let flags = u32::from(self.resumed) | u32::from(self.leaving) << 1;
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.quota_pages.to_le_bytes());
    }

    /// Parses a response.
    pub fn decode(buf: &[u8]) -> Result<ServerState, ProtoError> {
        let mut r = Reader { what: "server state", buf };
        let (capacity_pages, free_pages, grace_ms) = (r.u64()?, r.u64()?, r.u32()?);
        let flags = r.u32()?;
        if flags > 3 {
            return Err(err("server state", format!("unknown flags {flags:#x}")));
        }
        let (resumed, leaving) = (flags & 1 != 0, flags & 2 != 0);
        let s = ServerState { capacity_pages, free_pages, grace_ms, resumed, leaving, quota_pages: r.u64()? };
        r.end()?;
        Ok(s)
    }
}

/// Length of the secret that proves a client's identity on OPEN.
pub const SECRET_LEN: usize = 32;

/// A client's secret: whoever presents it may attach to the client's session.
pub type Secret = [u8; SECRET_LEN];

/// An OPEN request.
pub fn encode_open(client: &ClientId, grace_ms: u32, secret: &Secret) -> Vec<u8> {
    let mut v = client.to_vec();
    v.extend_from_slice(&grace_ms.to_le_bytes());
    v.extend_from_slice(secret);
    v
}

/// Parses an OPEN request: (client, grace_ms, secret).
pub fn decode_open(buf: &[u8]) -> Result<(ClientId, u32, Secret), ProtoError> {
    let mut r = Reader { what: "OPEN", buf };
    let client = r.client()?;
    let grace = r.u32()?;
    let secret = r.take(SECRET_LEN)?.try_into().unwrap_or([0; SECRET_LEN]);
    r.end()?;
    Ok((client, grace, secret))
}

/// A CLONE request: `parent`'s pages copied into a new session `child` (opened with its grace
/// time and secret, as OPEN would).
pub fn encode_clone(parent: &ClientId, child: &ClientId, grace_ms: u32, secret: &Secret) -> Vec<u8> {
    let mut v = parent.to_vec();
    v.extend_from_slice(&encode_open(child, grace_ms, secret));
    v
}

/// Parses a CLONE request: (parent, child, grace_ms, child secret).
pub fn decode_clone(buf: &[u8]) -> Result<(ClientId, ClientId, u32, Secret), ProtoError> {
    let mut r = Reader { what: "CLONE", buf };
    let parent = r.client()?;
    let (child, grace, secret) = decode_open(r.buf).map_err(|e| err("CLONE", e.why))?;
    Ok((parent, child, grace, secret))
}

/// Parses a request that carries only the client id (RENEW, CLOSE).
pub fn decode_client(what: &'static str, buf: &[u8]) -> Result<ClientId, ProtoError> {
    let mut r = Reader { what, buf };
    let c = r.client()?;
    r.end()?;
    Ok(c)
}

/// A GET request.
pub fn encode_get(client: &ClientId, region: u64, page: u64) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..16].copy_from_slice(client);
    v[16..24].copy_from_slice(&region.to_le_bytes());
    v[24..].copy_from_slice(&page.to_le_bytes());
    v
}

/// Parses a GET request.
pub fn decode_get(buf: &[u8]) -> Result<(ClientId, u64, u64), ProtoError> {
    let mut r = Reader { what: "GET", buf };
    let out = (r.client()?, r.u64()?, r.u64()?);
    r.end()?;
    Ok(out)
}

/// The head of a PUT or FREE: client, region, page numbers.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<'a> {
    /// Who.
    pub client: ClientId,
    /// Which region.
    pub region: u64,
    /// The page numbers (`None` for FREE of the whole region).
    pub pages: Option<Vec<u64>>,
    /// For PUT: the pages' data, `pages.len() * PAGE_SIZE` bytes.
    pub data: &'a [u8],
}

/// A PUT request of `pages` (page number, data) pairs.
pub fn encode_put(client: &ClientId, region: u64, pages: &[(u64, &[u8; PAGE_SIZE])]) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + pages.len() * (8 + PAGE_SIZE));
    encode_batch_head(&mut v, client, region, count(pages.len()));
    for (p, _) in pages {
        v.extend_from_slice(&p.to_le_bytes());
    }
    for (_, d) in pages {
        v.extend_from_slice(&d[..]);
    }
    v
}

/// A FREE request for `pages`, or for the whole region if `None`.
pub fn encode_free(client: &ClientId, region: u64, pages: Option<&[u64]>) -> Vec<u8> {
    let mut v = Vec::new();
    match pages {
        None => encode_batch_head(&mut v, client, region, ALL),
        Some(ps) => {
            encode_batch_head(&mut v, client, region, count(ps.len()));
            for p in ps {
                v.extend_from_slice(&p.to_le_bytes());
            }
        }
    }
    v
}

/// A batch length for the wire. Batches beyond [`MAX_BATCH`] are refused by the server, so an
/// impossible length only needs to stay distinct from [`ALL`].
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(ALL - 1).min(ALL - 1)
}

fn encode_batch_head(v: &mut Vec<u8>, client: &ClientId, region: u64, n: u32) {
    v.extend_from_slice(client);
    v.extend_from_slice(&region.to_le_bytes());
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(&[0u8; 4]);
}

/// Parses a PUT (`with_data`) or FREE request.
pub fn decode_batch<'a>(what: &'static str, buf: &'a [u8], with_data: bool) -> Result<Batch<'a>, ProtoError> {
    let mut r = Reader { what, buf };
    let client = r.client()?;
    let region = r.u64()?;
    let n = r.u32()?;
    r.take(4)?;
    if n == ALL && !with_data {
        r.end()?;
        return Ok(Batch { client, region, pages: None, data: &[] });
    }
    let n = n as usize;
    if n == 0 || n > MAX_BATCH {
        return Err(err(what, format!("{n} pages: must be between 1 and {MAX_BATCH}")));
    }
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        pages.push(r.u64()?);
    }
    let data = if with_data { r.take(n * PAGE_SIZE)? } else { &[] };
    r.end()?;
    Ok(Batch { client, region, pages: Some(pages), data })
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: ClientId = [7; 16];

    #[test]
    fn requests_round_trip() {
        assert_eq!(decode_open(&encode_open(&C, 1500, &[5; 32])).unwrap(), (C, 1500, [5; 32]));
        assert_eq!(decode_get(&encode_get(&C, 3, 99)).unwrap(), (C, 3, 99));
        assert_eq!(decode_clone(&encode_clone(&C, &[8; 16], 70, &[6; 32])).unwrap(), (C, [8; 16], 70, [6; 32]));
        assert!(decode_clone(&encode_clone(&C, &[8; 16], 70, &[6; 32])[..60]).is_err());
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        let put = encode_put(&C, 5, &[(10, &a), (12, &b)]);
        let batch = decode_batch("PUT", &put, true).unwrap();
        assert_eq!((batch.client, batch.region, batch.pages.clone()), (C, 5, Some(vec![10, 12])));
        assert_eq!(&batch.data[..PAGE_SIZE], &a[..]);
        assert_eq!(&batch.data[PAGE_SIZE..], &b[..]);
        let free = encode_free(&C, 5, Some(&[1, 2, 3]));
        assert_eq!(decode_batch("FREE", &free, false).unwrap().pages, Some(vec![1, 2, 3]));
        let all = encode_free(&C, 5, None);
        assert_eq!(decode_batch("FREE", &all, false).unwrap().pages, None);
        for (resumed, leaving) in [(false, false), (true, false), (false, true), (true, true)] {
            let s = ServerState { capacity_pages: 10, free_pages: 4, grace_ms: 9, resumed, leaving, quota_pages: 7 };
            let mut v = Vec::new();
            s.encode(&mut v);
            assert_eq!(ServerState::decode(&v).unwrap(), s);
            v[20] = 4;
            assert!(ServerState::decode(&v).unwrap_err().why.contains("unknown flags"));
        }
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        assert!(decode_open(&[0; 51]).unwrap_err().why.contains("truncated"));
        assert!(decode_open(&[0; 53]).unwrap_err().why.contains("trailing"));
        assert!(decode_get(&[0; 31]).is_err());
        let a = [1u8; PAGE_SIZE];
        let put = encode_put(&C, 5, &[(10, &a)]);
        assert!(decode_batch("PUT", &put[..put.len() - 1], true).is_err(), "short data");
        let mut zero = encode_free(&C, 5, Some(&[]));
        assert!(decode_batch("FREE", &zero, false).unwrap_err().why.contains("between 1 and"));
        zero[24..28].copy_from_slice(&1000u32.to_le_bytes());
        assert!(decode_batch("FREE", &zero, false).is_err(), "too many pages");
        // A PUT cannot use the whole-region count.
        let mut all = encode_free(&C, 5, None);
        all.extend_from_slice(&[0; 8]);
        assert!(decode_batch("PUT", &all, true).is_err());
    }
}
