//! The node agent's and the home's methods, and their little-endian encodings.
//!
//! ```text
//! agent (mosaicd):
//!   MIGRATE_OUT  pid u32 | to str | home str | job u64       -> Moved
//!   MIGRATE_IN   id u64 | source str | home str | job u64 | image bytes -> pid u32
//!   FETCH        id u64 | n u32 | n x addr u64               -> n x kind u8 | the bytes of the
//!                                                               pages of kind 1 (0 zero, 2 sent)
//!   NEXT         id u64 | hint u64 | most u32                 -> done u8 | n u32 | n x addr u64 | bytes
//!   DONE         id u64                                       (the destination has every page)
//!   STATUS                                                     -> uri str | memory str | hosted u32
//!   GOSSIP       a frame of the information layer (from another agent)
//!   NODES                                                      -> what it knows of the cluster
//!                                                                 (`gossip::ClusterView`)
//!   DRAIN                                                      -> moved u32 | failed u32 (every
//!                                                                 migratable process here moved away)
//! home (mosrun --migratable):
//!   OUTPUT       job u64 | stream u8 | bytes
//!   INPUT        job u64 | most u32 | pid u32 (asking)        -> 0 | bytes, 1 (end), 2 (nothing yet)
//!   EXITED       job u64 | status i32 (a wait status) | pid u32 (that ended, at its node)
//!   MIGRATE      to str | automatic u8 (optional; 1: the balancer asks) -> Moved
//!   LOCK         locked u8 (1: the balancer leaves the job where it is)
//!   WHERE                                                     -> node str | pid u32 | moves u32 | command str
//! ```
//! A `str` is a u32 length and UTF-8 bytes; `bytes` run to the end of the message.

use mosaic_transport::{ServiceError, Status};

/// Stop a process here and move it (from a job's home).
pub const MIGRATE_OUT: u64 = 0x4d4f_5301;
/// Rebuild a process here (from the source's agent).
pub const MIGRATE_IN: u64 = 0x4d4f_5302;
/// Pages a fault of a process that moved away wants (from the destination's agent).
pub const FETCH: u64 = 0x4d4f_5303;
/// The next pages of a process that moved away (from the destination's stream).
pub const NEXT: u64 = 0x4d4f_5306;
/// The destination has every page: the stopped copy may go.
pub const DONE: u64 = 0x4d4f_5304;
/// What the agent is.
pub const STATUS: u64 = 0x4d4f_5305;
/// A frame of the information layer, from another agent.
pub const GOSSIP: u64 = 0x4d4f_5307;
/// What the agent knows of the cluster (members, their load).
pub const NODES: u64 = 0x4d4f_5308;
/// Output of a job running elsewhere.
pub const OUTPUT: u64 = 0x4d4f_5311;
/// Input for a job running elsewhere.
pub const INPUT: u64 = 0x4d4f_5312;
/// A job running elsewhere ended.
pub const EXITED: u64 = 0x4d4f_5313;
/// Move the job (from `mosctl`).
pub const MIGRATE: u64 = 0x4d4f_5314;
/// Where the job runs.
pub const WHERE: u64 = 0x4d4f_5315;
/// Lock the job to its node, or unlock it (from `mosctl lock` / `unlock`).
pub const LOCK: u64 = 0x4d4f_5316;
/// Move every migratable process of the node away (from `mosctl drain`).
pub const DRAIN: u64 = 0x4d4f_5309;
/// Bytes to throw away, answered with their count (`mosctl tune` measures round trips and
/// bandwidth with it).
pub const SINK: u64 = 0x4d4f_530a;

/// How a move went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// The process's pid at its new node (as that host sees it).
    pub pid: u32,
    /// Microseconds from stopping the process to its running at the destination.
    pub freeze_us: u64,
    /// Bytes of the process image (everything but the anonymous memory that follows).
    pub image_bytes: u64,
    /// Bytes of anonymous mappings whose pages follow post-copy (an upper bound: only the pages
    /// that hold data cross, and which those are is learned as they go).
    pub post_copy_bytes: u64,
    /// Threads moved.
    pub threads: u32,
}

impl Moved {
    /// Its encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(self.pid).u64(self.freeze_us).u64(self.image_bytes).u64(self.post_copy_bytes).u32(self.threads);
        e.0
    }

    /// Decodes one.
    pub fn decode(b: &[u8]) -> Result<Moved, String> {
        let mut d = Dec(b);
        Ok(Moved {
            pid: d.u32()?,
            freeze_us: d.u64()?,
            image_bytes: d.u64()?,
            post_copy_bytes: d.u64()?,
            threads: d.u32()?,
        })
    }
}

/// An encoder.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Enc {
        self.0.push(v);
        self
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Enc {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Enc {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a string (length first).
    pub fn str(&mut self, s: &str) -> &mut Enc {
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// Appends bytes as they are (the last field).
    pub fn rest(&mut self, b: &[u8]) -> &mut Enc {
        self.0.extend_from_slice(b);
        self
    }
}

/// A decoder; errors say what was missing.
pub struct Dec<'a>(pub &'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("a message cut short ({} bytes left, {n} wanted)", self.0.len()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    /// A byte.
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    /// A u32.
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    /// A u64.
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A string.
    pub fn str(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string that is not UTF-8".to_string())
    }
    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// A request that does not decode.
pub fn bad(why: String) -> ServiceError {
    ServiceError::new(Status::BadRequest, why)
}

/// A request that failed.
pub fn failed(why: impl std::fmt::Display) -> ServiceError {
    ServiceError::new(Status::Handler, why.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_round_trip_and_short_messages_are_refused() {
        let m = Moved { pid: 42, freeze_us: 1234, image_bytes: 99, post_copy_bytes: 1 << 30, threads: 3 };
        assert_eq!(Moved::decode(&m.encode()), Ok(m.clone()));
        assert!(Moved::decode(&m.encode()[..10]).unwrap_err().contains("cut short"));
    }
}
