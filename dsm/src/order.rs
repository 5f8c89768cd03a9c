//! Each peer's messages back in the order it sent them, once each.
//!
//! The protocol needs every pair of nodes' messages in the order sent ([`crate::protocol`]). A
//! node numbers its messages to each peer; the receiver hands them on in that order, holding a
//! message that comes early (another thread sent it first, or a message before it was lost and
//! is on its way again) until its turn, and dropping a second copy of one it has had (a retry
//! whose first copy did arrive). The same code runs in the nodes ([`crate::job`]) and in the
//! model checker, which loses, delays and repeats messages to test it.

use std::collections::BTreeMap;

/// The receiving side for every peer of one node. Sequence numbers compare as TCP's do (by
/// wrapping difference), so that the model checker can renumber them from zero.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Inorder<T> {
    /// Per peer: the number of the next message to hand on.
    expected: Vec<u64>,
    /// Per peer: messages that came ahead of their turn.
    early: Vec<BTreeMap<u64, T>>,
}

/// Whether `seq` comes before `expected` (was handed on already).
fn before(seq: u64, expected: u64) -> bool {
    // Wrapping difference read as signed: the gap between two live numbers is far below 2^63.
    (seq.wrapping_sub(expected) as i64) < 0
}

impl<T> Inorder<T> {
    /// For a node with `peers` peers (numbered 0 to `peers - 1`), each starting at message 0.
    pub fn new(peers: usize) -> Inorder<T> {
        Inorder { expected: vec![0; peers], early: (0..peers).map(|_| BTreeMap::new()).collect() }
    }

    /// Takes message `seq` from peer `from`: `false` (and the message is dropped) if it was had
    /// already, or `from` is no peer.
    pub fn accept(&mut self, from: usize, seq: u64, message: T) -> bool {
        let (Some(&expected), Some(early)) = (self.expected.get(from), self.early.get_mut(from)) else {
            return false;
        };
        if before(seq, expected) || early.contains_key(&seq) {
            return false;
        }
        early.insert(seq, message);
        true
    }

    /// The next message from `from` in order, if it is here.
    pub fn next(&mut self, from: usize) -> Option<T> {
        let expected = self.expected.get_mut(from)?;
        let message = self.early.get_mut(from)?.remove(expected)?;
        *expected = expected.wrapping_add(1);
        Some(message)
    }

    /// The number of the next message expected from `from`.
    pub fn expected(&self, from: usize) -> u64 {
        self.expected.get(from).copied().unwrap_or(0)
    }

    /// Messages held, from every peer, waiting for their turn.
    pub fn held(&self) -> usize {
        self.early.iter().map(BTreeMap::len).sum()
    }

    /// Renumbers `from`'s messages so that the next expected is 0 (for the model checker, whose
    /// states must not differ by message counts alone); returns how much was subtracted.
    pub fn rebase(&mut self, from: usize) -> u64 {
        let Some(base) = self.expected.get(from).copied() else { return 0 };
        if base != 0 {
            self.expected[from] = 0;
            let early = std::mem::take(&mut self.early[from]);
            self.early[from] = early.into_iter().map(|(seq, m)| (seq.wrapping_sub(base), m)).collect();
        }
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_out_in_order_once_each() {
        let mut o = Inorder::new(2);
        assert!(o.accept(1, 1, "b"));
        assert_eq!(o.next(1), None, "message 0 has not come");
        assert!(o.accept(1, 0, "a"));
        assert!(!o.accept(1, 1, "b again"), "held already");
        assert_eq!((o.next(1), o.next(1), o.next(1)), (Some("a"), Some("b"), None));
        assert!(!o.accept(1, 0, "a again"), "handed on already");
        assert!(!o.accept(5, 0, "from nobody"));
        assert_eq!(o.expected(1), 2);
        assert_eq!(o.expected(0), 0, "each peer counts apart");
    }

    #[test]
    fn renumbering_keeps_what_is_held_and_what_is_old() {
        let mut o = Inorder::new(1);
        for seq in 0..5 {
            assert!(o.accept(0, seq, seq));
            assert_eq!(o.next(0), Some(seq));
        }
        assert!(o.accept(0, 6, 6));
        assert_eq!(o.rebase(0), 5);
        assert_eq!(o.held(), 1);
        // What was 4 is now "-1": had already.
        assert!(!o.accept(0, 4u64.wrapping_sub(5), 4));
        assert!(o.accept(0, 0, 5));
        assert_eq!((o.next(0), o.next(0)), (Some(5), Some(6)));
    }
}
