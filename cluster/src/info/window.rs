//! The bounded window of the freshest load vectors a node has heard (the seed's information
//! window): at most a fixed number of entries, one per node, the oldest dropped first.

use std::collections::HashMap;
use std::time::Duration;

use super::load::LoadVector;

/// What a node knows of others' load, bounded (see the module's documentation). Times are
/// durations since an arbitrary start (the caller's clock: real or simulated).
#[derive(Clone, Debug)]
pub struct InfoWindow {
    capacity: usize,
    /// Per node: the vector as received (its `age` then) and when it was received.
    entries: HashMap<String, (LoadVector, Duration)>,
}

impl InfoWindow {
    /// A window of at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> InfoWindow {
        InfoWindow { capacity: capacity.max(1), entries: HashMap::new() }
    }

    /// The age of an entry at `now`.
    fn age_at(v: &LoadVector, received: Duration, now: Duration) -> Duration {
        v.age + now.saturating_sub(received)
    }

    /// Takes `v`, received at `now`, if it is fresher than what the window holds of its node;
    /// drops the oldest entry if the window is over its capacity. Returns whether it was kept.
    pub fn offer(&mut self, v: LoadVector, now: Duration) -> bool {
        if let Some((old, at)) = self.entries.get(&v.node) {
            if Self::age_at(old, *at, now) <= v.age {
                return false;
            }
        }
        let node = v.node.clone();
        self.entries.insert(node.clone(), (v, now));
        if self.entries.len() > self.capacity {
            let oldest = self
                .entries
                .iter()
                .max_by_key(|(n, (v, at))| (Self::age_at(v, *at, now), (*n).clone()))
                .map(|(n, _)| n.clone());
            if let Some(o) = oldest {
                self.entries.remove(&o);
                return o != node;
            }
        }
        true
    }

    /// Drops the entries older than `max` at `now`.
    pub fn drop_older_than(&mut self, max: Duration, now: Duration) {
        self.entries.retain(|_, (v, at)| Self::age_at(v, *at, now) <= max);
    }

    /// Forgets `node` (it left, or was found dead).
    pub fn forget(&mut self, node: &str) {
        self.entries.remove(node);
    }

    /// Every entry with its age at `now`, freshest first.
    pub fn entries(&self, now: Duration) -> Vec<LoadVector> {
        let mut v: Vec<LoadVector> =
            self.entries.values().map(|(v, at)| LoadVector { age: Self::age_at(v, *at, now), ..v.clone() }).collect();
        v.sort_by(|a, b| a.age.cmp(&b.age).then_with(|| a.node.cmp(&b.node)));
        v
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The oldest entry's age at `now` (zero if empty).
    pub fn oldest(&self, now: Duration) -> Duration {
        self.entries.values().map(|(v, at)| Self::age_at(v, *at, now)).max().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(node: &str, age_ms: u64) -> LoadVector {
        LoadVector { age: Duration::from_millis(age_ms), ..LoadVector::empty(node) }
    }

    #[test]
    fn the_window_keeps_the_freshest_entry_per_node_and_drops_the_oldest() {
        let ms = Duration::from_millis;
        let mut w = InfoWindow::new(2);
        assert!(w.offer(v("a", 100), ms(0)));
        assert!(!w.offer(v("a", 200), ms(0)), "older than what it holds");
        assert!(w.offer(v("a", 50), ms(10)), "fresher");
        assert!(w.offer(v("b", 500), ms(10)));
        // Over capacity: the oldest (b, 500 ms) goes.
        assert!(w.offer(v("c", 0), ms(10)));
        let e = w.entries(ms(110));
        assert_eq!(e.iter().map(|x| (x.node.as_str(), x.age)).collect::<Vec<_>>(), [("c", ms(100)), ("a", ms(150))]);
        // A vector older than everything held is not kept.
        assert!(!w.offer(v("d", 10_000), ms(110)));
        assert_eq!(w.len(), 2);
        assert_eq!(w.oldest(ms(110)), ms(150));
        w.forget("a");
        assert_eq!(w.entries(ms(110)).len(), 1);
        w.drop_older_than(ms(99), ms(110));
        assert!(w.is_empty());
    }
}
