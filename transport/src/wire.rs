//! The wire format shared by every byte-stream back-end (tcp, shm, sim).
//!
//! Every frame is a fixed 32-byte little-endian header followed by `len` payload bytes:
//!
//! | offset | size | field        | meaning                                                     |
//! |--------|------|--------------|-------------------------------------------------------------|
//! | 0      | 4    | `magic`      | `b"MOSA"`                                                   |
//! | 4      | 1    | `version`    | [`VERSION`]; a peer with another version is refused          |
//! | 5      | 1    | `opcode`     | [`Opcode`]                                                  |
//! | 6      | 2    | `flags`      | [`FLAG_RESPONSE`], [`FLAG_ERROR`]; other bits must be zero    |
//! | 8      | 8    | `request_id` | chosen by the requester, echoed in the response             |
//! | 16     | 8    | `arg`        | method id of a call, page index of a page op                |
//! | 24     | 4    | `len`        | payload length, at most the connection's maximum frame size |
//! | 28     | 4    | `status`     | error code in an error response, else zero                  |
//!
//! Decoding checks every field before anything else looks at the frame, and the payload length
//! is checked against the maximum *before* any buffer is allocated, so a hostile length never
//! turns into a large allocation. Per-opcode rules (a page op carries exactly one page, a
//! read request carries none) are checked by [`Header::decode`] too.

use thiserror::Error;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"MOSA";
/// The protocol version this build speaks.
pub const VERSION: u8 = 2;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 32;
/// The size of one page in bytes: the unit of one-sided reads and writes.
pub use mosaic_page::PAGE_SIZE;
/// [`PAGE_SIZE`] as the `u32` of a frame's length field.
pub const PAGE_SIZE_U32: u32 = 4096;
const _: () = assert!(PAGE_SIZE_U32 as usize == PAGE_SIZE);
/// Default maximum payload of one frame (1 MiB).
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;
/// Hard upper bound on any configured maximum payload (64 MiB).
pub const MAX_FRAME_LIMIT: u32 = 64 << 20;

/// Set in every response frame.
pub const FLAG_RESPONSE: u16 = 1 << 0;
/// Set in a response that reports a failure: `status` holds the code, the payload a UTF-8 message.
pub const FLAG_ERROR: u16 = 1 << 1;
const KNOWN_FLAGS: u16 = FLAG_RESPONSE | FLAG_ERROR;

/// A payload's length as the header's `len` field. Callers bound payloads by the maximum frame
/// size (at most [`MAX_FRAME_LIMIT`]) before sending, so the saturation never happens in practice.
pub(crate) fn len32(payload: &[u8]) -> u32 {
    u32::try_from(payload.len()).unwrap_or(u32::MAX)
}

/// The `len` field of an encoded header, without validating the rest (for code that only
/// follows frame boundaries, like the simulated link).
pub(crate) fn length_field(header: &[u8; HEADER_LEN]) -> u32 {
    u32::from_le_bytes([header[24], header[25], header[26], header[27]])
}

/// What a frame asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Handshake step 1, client to server: the client's nonce.
    Hello = 1,
    /// Handshake step 2, server to client: the server's nonce, its proof of the key, its limits.
    Challenge = 2,
    /// Handshake step 3, client to server: the client's proof of the key.
    Auth = 3,
    /// Handshake step 4, server to client: authenticated (or, with [`FLAG_ERROR`], refused).
    AuthResult = 4,
    /// A request/response message: `arg` is the method id, the payload is opaque.
    Call = 16,
    /// Read one page of the server's window: `arg` is the page index.
    ReadPage = 17,
    /// Write one page of the server's window: `arg` is the page index, the payload the page.
    WritePage = 18,
}

impl Opcode {
    /// Decodes an opcode byte.
    pub fn from_u8(byte: u8) -> Option<Opcode> {
        Some(match byte {
            1 => Opcode::Hello,
            2 => Opcode::Challenge,
            3 => Opcode::Auth,
            4 => Opcode::AuthResult,
            16 => Opcode::Call,
            17 => Opcode::ReadPage,
            18 => Opcode::WritePage,
            _ => return None,
        })
    }

    /// True for the opcodes that may only appear during the handshake.
    pub fn is_handshake(self) -> bool {
        matches!(self, Opcode::Hello | Opcode::Challenge | Opcode::Auth | Opcode::AuthResult)
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame asks for or answers.
    pub opcode: Opcode,
    /// [`FLAG_RESPONSE`] and [`FLAG_ERROR`].
    pub flags: u16,
    /// Matches a response to its request.
    pub request_id: u64,
    /// Method id or page index.
    pub arg: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// Error code of an error response.
    pub status: u32,
}

/// Why a frame header was rejected. Any of these closes the connection it arrived on.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The first four bytes are not `MOSA`: not a Mosaic peer, or the stream lost sync.
    #[error("bad magic {found:02x?} (expected \"MOSA\")")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found} (this build speaks {VERSION})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The opcode byte names no known operation.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// Reserved flag bits are set.
    #[error("unknown flag bits {0:#06x}")]
    UnknownFlags(u16),
    /// The payload is larger than the connection's maximum frame size.
    #[error("payload of {len} bytes exceeds the maximum frame size of {max} bytes")]
    Oversized {
        /// Claimed payload length.
        len: u32,
        /// The connection's maximum.
        max: u32,
    },
    /// The payload length does not fit the opcode (a page op must carry exactly one page).
    #[error("{opcode:?} {kind} carries {len} bytes, expected {expected}")]
    BadLength {
        /// The frame's opcode.
        opcode: Opcode,
        /// "request" or "response".
        kind: &'static str,
        /// Claimed payload length.
        len: u32,
        /// Required payload length.
        expected: u32,
    },
    /// A non-error frame carries a status code, or an error flag without the response flag.
    #[error("inconsistent flags {flags:#06x} with status {status}")]
    BadStatus {
        /// The frame's flags.
        flags: u16,
        /// The frame's status field.
        status: u32,
    },
    /// Fewer bytes than a header were given (only from [`Header::decode_slice`]).
    #[error("truncated header: {0} of {HEADER_LEN} bytes")]
    Truncated(usize),
}

impl Header {
    /// A request header.
    pub fn request(opcode: Opcode, request_id: u64, arg: u64, len: u32) -> Header {
        Header { opcode, flags: 0, request_id, arg, len, status: 0 }
    }

    /// A successful response to `req` carrying `len` payload bytes.
    pub fn response(req: &Header, len: u32) -> Header {
        Header { opcode: req.opcode, flags: FLAG_RESPONSE, request_id: req.request_id, arg: req.arg, len, status: 0 }
    }

    /// An error response to `req`: `status` is the code, the payload (of `len` bytes) a message.
    pub fn error_response(req: &Header, status: u32, len: u32) -> Header {
        Header {
            opcode: req.opcode,
            flags: FLAG_RESPONSE | FLAG_ERROR,
            request_id: req.request_id,
            arg: req.arg,
            len,
            status,
        }
    }

    /// True if this frame answers a request.
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    /// True if this frame reports a failure.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }

    /// Encodes the header into its 32 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.opcode as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.arg.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..32].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    /// Decodes and validates a header; `max_len` is the connection's maximum payload.
    pub fn decode(b: &[u8; HEADER_LEN], max_len: u32) -> Result<Header, FrameError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if b[4] != VERSION {
            return Err(FrameError::UnsupportedVersion { found: b[4] });
        }
        let opcode = Opcode::from_u8(b[5]).ok_or(FrameError::UnknownOpcode(b[5]))?;
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(flags & !KNOWN_FLAGS));
        }
        let le64 = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let header = Header { opcode, flags, request_id: le64(8), arg: le64(16), len: le32(24), status: le32(28) };
        header.validate(max_len)?;
        Ok(header)
    }

    /// Decodes a header from the start of `bytes`, which may be shorter than a header.
    pub fn decode_slice(bytes: &[u8], max_len: u32) -> Result<Header, FrameError> {
        let b: &[u8; HEADER_LEN] =
            bytes.get(..HEADER_LEN).and_then(|s| s.try_into().ok()).ok_or(FrameError::Truncated(bytes.len()))?;
        Header::decode(b, max_len)
    }

    fn validate(&self, max_len: u32) -> Result<(), FrameError> {
        if self.len > max_len {
            return Err(FrameError::Oversized { len: self.len, max: max_len });
        }
        let error = self.is_error();
        if (error && !self.is_response()) || (!error && self.status != 0) {
            return Err(FrameError::BadStatus { flags: self.flags, status: self.status });
        }
        if error {
            return Ok(()); // an error response carries a message of any (bounded) length
        }
        let page = PAGE_SIZE_U32;
        let expected = match (self.opcode, self.is_response()) {
            (Opcode::ReadPage, false) | (Opcode::WritePage, true) => Some(0),
            (Opcode::ReadPage, true) | (Opcode::WritePage, false) => Some(page),
            _ => None,
        };
        match expected {
            Some(expected) if expected != self.len => Err(FrameError::BadLength {
                opcode: self.opcode,
                kind: if self.is_response() { "response" } else { "request" },
                len: self.len,
                expected,
            }),
            _ => Ok(()),
        }
    }
}

/// Error codes carried in the `status` field of an error response. Codes are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum Status {
    /// The request named a method the server does not serve.
    UnknownMethod = 1,
    /// A page index beyond the server's window.
    PageOutOfRange = 2,
    /// The server exposes no page window.
    NoWindow = 3,
    /// The service handler failed; the message says why.
    Handler = 4,
    /// The server has no room (memory, slots) for the request.
    Full = 5,
    /// Authentication failed: the peers do not share the cluster key.
    AuthFailed = 6,
    /// The request was malformed at the application level.
    BadRequest = 7,
    /// The named item (page, region, session) does not exist on this server.
    NotFound = 8,
    /// The client's lease expired: the server reclaimed what it held for it.
    Expired = 9,
    /// The caller may not use what it named (another client's session, say).
    Forbidden = 10,
}

impl Status {
    /// Decodes a status code; unknown codes are kept as raw numbers by the caller.
    pub fn from_u32(code: u32) -> Option<Status> {
        Some(match code {
            1 => Status::UnknownMethod,
            2 => Status::PageOutOfRange,
            3 => Status::NoWindow,
            4 => Status::Handler,
            5 => Status::Full,
            6 => Status::AuthFailed,
            7 => Status::BadRequest,
            8 => Status::NotFound,
            9 => Status::Expired,
            10 => Status::Forbidden,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_opcode() -> impl Strategy<Value = Opcode> {
        prop_oneof![
            Just(Opcode::Hello),
            Just(Opcode::Challenge),
            Just(Opcode::Auth),
            Just(Opcode::AuthResult),
            Just(Opcode::Call),
            Just(Opcode::ReadPage),
            Just(Opcode::WritePage),
        ]
    }

    proptest! {
        #[test]
        fn valid_headers_round_trip(op in any_opcode(), resp in any::<bool>(), id in any::<u64>(),
                                    arg in any::<u64>(), len in 0u32..=DEFAULT_MAX_FRAME) {
            let mut h = Header::request(op, id, arg, len);
            if resp { h.flags = FLAG_RESPONSE; }
            match Header::decode(&h.encode(), DEFAULT_MAX_FRAME) {
                Ok(d) => prop_assert_eq!(d, h),
                // Only the per-opcode length rule may reject a well-formed header.
                Err(FrameError::BadLength { .. }) => prop_assert!(matches!(op, Opcode::ReadPage | Opcode::WritePage)),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        #[test]
        fn error_responses_round_trip(op in any_opcode(), id in any::<u64>(), status in 1u32..,
                                      len in 0u32..=4096) {
            let req = Header::request(op, id, 7, 0);
            let h = Header::error_response(&req, status, len);
            prop_assert_eq!(Header::decode(&h.encode(), DEFAULT_MAX_FRAME), Ok(h));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Header::decode_slice(&bytes, DEFAULT_MAX_FRAME);
        }
    }

    #[test]
    fn each_malformation_is_named() {
        let good = Header::request(Opcode::Call, 1, 2, 10).encode();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(Header::decode(&b, 100), Err(FrameError::BadMagic { .. })));
        let mut b = good;
        b[4] = 9;
        assert_eq!(Header::decode(&b, 100), Err(FrameError::UnsupportedVersion { found: 9 }));
        let mut b = good;
        b[5] = 200;
        assert_eq!(Header::decode(&b, 100), Err(FrameError::UnknownOpcode(200)));
        let mut b = good;
        b[7] = 0x80;
        assert_eq!(Header::decode(&b, 100), Err(FrameError::UnknownFlags(0x8000)));
        assert_eq!(Header::decode(&good, 5), Err(FrameError::Oversized { len: 10, max: 5 }));
        let mut b = good;
        b[28] = 1;
        assert!(matches!(Header::decode(&b, 100), Err(FrameError::BadStatus { .. })));
        let mut b = Header::request(Opcode::Call, 1, 2, 0).encode();
        b[6] = FLAG_ERROR as u8;
        assert!(matches!(Header::decode(&b, 100), Err(FrameError::BadStatus { .. })));
        let short = Header::request(Opcode::WritePage, 1, 2, 100).encode();
        assert!(matches!(Header::decode(&short, 1 << 20), Err(FrameError::BadLength { .. })));
        let read_with_body = Header::request(Opcode::ReadPage, 1, 2, 1).encode();
        assert!(matches!(Header::decode(&read_with_body, 1 << 20), Err(FrameError::BadLength { .. })));
        assert_eq!(Header::decode_slice(&good[..31], 100), Err(FrameError::Truncated(31)));
    }
}
