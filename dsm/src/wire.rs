//! How protocol messages travel between nodes: batches of messages in transport calls and their
//! responses, each message a fixed 26-byte header and, for [`Msg::Data`], the page's 4096 bytes.
//!
//! ```text
//! kind u8 | flags u8 | from u16 | seq u64 | page u64 | node u16 | acks u32    (little-endian)
//! ```
//! `seq` numbers the messages from one node to another (0, 1, 2, ...): they may travel by
//! different calls and threads, and the receiver handles them in this order.
//! `kind`: 1 Request, 2 Recall, 3 Invalidate, 4 InvalidateAck, 5 Data, 6 Grant, 7 Done,
//! 8 Dropped, 9 Acquire, 10 Granted, 11 Release (`page` holds the lock's number), 12 Locate,
//! 13 Located. `flags`: bit 0 the request is a write; Recall: bit 1 keep, bit 2 send; Grant:
//! bit 3 data. `node`: Recall's `to`, Invalidate's `ack_to`, Located's `home`. `acks`: Grant's. Unused fields are zero,
//! and a decoder refuses anything else: a malformed message is an error, never a guess.

use std::fmt;

use crate::protocol::{Msg, NodeId, Want};
use mosaic_page::{Page, PAGE_SIZE};

/// Bytes of a message's header.
pub const HEADER: usize = 26;

const WRITE: u8 = 1;
const KEEP: u8 = 2;
const SEND: u8 = 4;
const DATA: u8 = 8;

/// A message as it travels: who sent it, the message, and the page's bytes for [`Msg::Data`].
#[derive(Clone)]
pub struct Envelope {
    /// The sending node.
    pub from: NodeId,
    /// Its number among the messages from `from` to the receiver.
    pub seq: u64,
    /// The message.
    pub msg: Msg,
    /// The page's bytes: present exactly for [`Msg::Data`].
    pub bytes: Option<Box<Page>>,
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Envelope) -> bool {
        self.from == other.from
            && self.seq == other.seq
            && self.msg == other.msg
            && self.bytes.as_ref().map(|p| &p.0[..]) == other.bytes.as_ref().map(|p| &p.0[..])
    }
}

impl Eq for Envelope {}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} from {} (#{}){}",
            self.msg,
            self.from,
            self.seq,
            if self.bytes.is_some() { " (with the page)" } else { "" }
        )
    }
}

/// Why bytes did not decode to messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The bytes end inside a message.
    Truncated {
        /// Offset of the message.
        at: usize,
        /// Bytes left from there.
        left: usize,
    },
    /// An unknown message kind.
    UnknownKind {
        /// Offset of the message.
        at: usize,
        /// The kind byte.
        kind: u8,
    },
    /// Flags or fields a message of this kind does not have.
    BadFields {
        /// Offset of the message.
        at: usize,
        /// The kind byte.
        kind: u8,
    },
    /// A [`Msg::Data`] envelope without its page, or another kind with one.
    PageMismatch,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { at, left } => write!(f, "a message at byte {at} is cut short ({left} bytes left)"),
            WireError::UnknownKind { at, kind } => write!(f, "unknown message kind {kind} at byte {at}"),
            WireError::BadFields { at, kind } => {
                write!(f, "a message of kind {kind} at byte {at} has fields it cannot have")
            }
            WireError::PageMismatch => write!(f, "only a Data message carries a page, and it must"),
        }
    }
}

impl std::error::Error for WireError {}

/// Appends `e` to `out`.
pub fn encode(e: &Envelope, out: &mut Vec<u8>) -> Result<(), WireError> {
    let (kind, flags, page, node, acks) = match e.msg {
        Msg::Request { page, want } => (1u8, if want == Want::Write { WRITE } else { 0 }, page, 0, 0),
        Msg::Recall { page, to, keep, send } => {
            (2, if keep { KEEP } else { 0 } | if send { SEND } else { 0 }, page, to, 0)
        }
        Msg::Invalidate { page, ack_to } => (3, 0, page, ack_to, 0),
        Msg::InvalidateAck { page } => (4, 0, page, 0, 0),
        Msg::Data { page } => (5, 0, page, 0, 0),
        Msg::Grant { page, acks, data } => (6, if data { DATA } else { 0 }, page, 0, acks),
        Msg::Done { page } => (7, 0, page, 0, 0),
        Msg::Dropped { page } => (8, 0, page, 0, 0),
        Msg::Acquire { lock } => (9, 0, lock, 0, 0),
        Msg::Granted { lock } => (10, 0, lock, 0, 0),
        Msg::Release { lock } => (11, 0, lock, 0, 0),
        Msg::Locate { page } => (12, 0, page, 0, 0),
        Msg::Located { page, home } => (13, 0, page, home, 0),
    };
    if (kind == 5) != e.bytes.is_some() {
        return Err(WireError::PageMismatch);
    }
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&e.from.to_le_bytes());
    out.extend_from_slice(&e.seq.to_le_bytes());
    out.extend_from_slice(&page.to_le_bytes());
    out.extend_from_slice(&node.to_le_bytes());
    out.extend_from_slice(&acks.to_le_bytes());
    if let Some(p) = &e.bytes {
        out.extend_from_slice(&p.0);
    }
    Ok(())
}

/// Decodes every message in `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Vec<Envelope>, WireError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let left = bytes.len() - at;
        let h = bytes.get(at..at + HEADER).ok_or(WireError::Truncated { at, left })?;
        let (kind, flags) = (h[0], h[1]);
        let from = u16::from_le_bytes([h[2], h[3]]);
        let seq = u64::from_le_bytes(h[4..12].try_into().unwrap_or_else(|_| unreachable!("8 bytes")));
        let page = u64::from_le_bytes(h[12..20].try_into().unwrap_or_else(|_| unreachable!("8 bytes")));
        let node = u16::from_le_bytes([h[20], h[21]]);
        let acks = u32::from_le_bytes(h[22..26].try_into().unwrap_or_else(|_| unreachable!("4 bytes")));
        let bad = WireError::BadFields { at, kind };
        let plain = |m: Msg| if flags == 0 && node == 0 && acks == 0 { Ok(m) } else { Err(bad.clone()) };
        let msg = match kind {
            1 if flags & !WRITE == 0 && node == 0 && acks == 0 => {
                Msg::Request { page, want: if flags & WRITE != 0 { Want::Write } else { Want::Read } }
            }
            2 if flags & !(KEEP | SEND) == 0 && acks == 0 => {
                Msg::Recall { page, to: node, keep: flags & KEEP != 0, send: flags & SEND != 0 }
            }
            3 if flags == 0 && acks == 0 => Msg::Invalidate { page, ack_to: node },
            4 => plain(Msg::InvalidateAck { page })?,
            5 => plain(Msg::Data { page })?,
            6 if flags & !DATA == 0 && node == 0 => Msg::Grant { page, acks, data: flags & DATA != 0 },
            7 => plain(Msg::Done { page })?,
            8 => plain(Msg::Dropped { page })?,
            9 => plain(Msg::Acquire { lock: page })?,
            10 => plain(Msg::Granted { lock: page })?,
            11 => plain(Msg::Release { lock: page })?,
            12 => plain(Msg::Locate { page })?,
            13 if flags == 0 && acks == 0 => Msg::Located { page, home: node },
            1..=13 => return Err(bad),
            _ => return Err(WireError::UnknownKind { at, kind }),
        };
        at += HEADER;
        let bytes = if kind == 5 {
            let src = bytes.get(at..at + PAGE_SIZE).ok_or(WireError::Truncated { at: at - HEADER, left })?;
            let mut p = Page::boxed();
            p.0.copy_from_slice(src);
            at += PAGE_SIZE;
            Some(p)
        } else {
            None
        };
        out.push(Envelope { from, seq, msg, bytes });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg() -> impl Strategy<Value = Msg> {
        let want = prop_oneof![Just(Want::Read), Just(Want::Write)];
        prop_oneof![
            (any::<u64>(), want).prop_map(|(page, want)| Msg::Request { page, want }),
            (any::<u64>(), any::<u16>(), any::<bool>(), any::<bool>()).prop_map(|(page, to, keep, send)| Msg::Recall {
                page,
                to,
                keep,
                send
            }),
            (any::<u64>(), any::<u16>()).prop_map(|(page, ack_to)| Msg::Invalidate { page, ack_to }),
            any::<u64>().prop_map(|page| Msg::InvalidateAck { page }),
            any::<u64>().prop_map(|page| Msg::Data { page }),
            (any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(page, acks, data)| Msg::Grant { page, acks, data }),
            any::<u64>().prop_map(|page| Msg::Done { page }),
            any::<u64>().prop_map(|page| Msg::Dropped { page }),
            any::<u64>().prop_map(|lock| Msg::Acquire { lock }),
            any::<u64>().prop_map(|lock| Msg::Granted { lock }),
            any::<u64>().prop_map(|lock| Msg::Release { lock }),
            any::<u64>().prop_map(|page| Msg::Locate { page }),
            (any::<u64>(), any::<u16>()).prop_map(|(page, home)| Msg::Located { page, home }),
        ]
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        (any::<u16>(), any::<u64>(), msg(), any::<u8>()).prop_map(|(from, seq, msg, fill)| {
            let bytes = matches!(msg, Msg::Data { .. }).then(|| Box::new(Page([fill; PAGE_SIZE])));
            Envelope { from, seq, msg, bytes }
        })
    }

    proptest! {
        #[test]
        fn batches_of_messages_survive_the_wire(batch in proptest::collection::vec(envelope(), 0..8)) {
            let mut buf = Vec::new();
            for e in &batch {
                encode(e, &mut buf).unwrap();
            }
            prop_assert_eq!(decode(&buf).unwrap(), batch);
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn a_batch_cut_inside_a_message_is_an_error(batch in proptest::collection::vec(envelope(), 1..4), cut in 1usize..4200) {
            let mut buf = Vec::new();
            let mut ends = vec![0];
            for e in &batch {
                encode(e, &mut buf).unwrap();
                ends.push(buf.len());
            }
            let keep = buf.len() - cut.min(buf.len());
            match ends.iter().position(|&end| end == keep) {
                // Cut between messages: the ones before the cut, whole.
                Some(k) => prop_assert_eq!(decode(&buf[..keep]).unwrap(), batch[..k].to_vec()),
                None => {
                    let truncated = matches!(decode(&buf[..keep]), Err(WireError::Truncated { .. }));
                    prop_assert!(truncated);
                }
            }
        }
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let mut buf = Vec::new();
        encode(&Envelope { from: 1, seq: 9, msg: Msg::Done { page: 3 }, bytes: None }, &mut buf).unwrap();
        let mut b = buf.clone();
        b[0] = 14;
        assert_eq!(decode(&b), Err(WireError::UnknownKind { at: 0, kind: 14 }));
        let mut b = buf.clone();
        b[0] = 12; // a Locate names no node
        b[20] = 1;
        assert_eq!(decode(&b), Err(WireError::BadFields { at: 0, kind: 12 }));
        let mut b = buf.clone();
        b[1] = 1;
        assert_eq!(decode(&b), Err(WireError::BadFields { at: 0, kind: 7 }));
        assert_eq!(decode(&buf[..10]), Err(WireError::Truncated { at: 0, left: 10 }));
        assert_eq!(decode(&buf).unwrap()[0].seq, 9);
        let e = Envelope { from: 0, seq: 0, msg: Msg::Data { page: 1 }, bytes: None };
        assert_eq!(encode(&e, &mut Vec::new()), Err(WireError::PageMismatch));
        let e = Envelope { from: 0, seq: 0, msg: Msg::Done { page: 1 }, bytes: Some(Page::boxed()) };
        assert_eq!(encode(&e, &mut Vec::new()), Err(WireError::PageMismatch));
        assert!(WireError::BadFields { at: 0, kind: 7 }.to_string().contains("kind 7"));
    }
}
