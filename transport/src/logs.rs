//! Rate-limited warnings, for events a peer can cause at will (refused connections, failed
//! handshakes): a flood of bad connections must not become a flood of log lines.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// At most this many lines per window...
const PER_WINDOW: u32 = 5;
/// ...of this length; what was held back is counted and reported once the window ends.
const WINDOW: Duration = Duration::from_secs(10);

/// A warning site that logs at most [`PER_WINDOW`] lines every [`WINDOW`].
pub(crate) struct RateLimited {
    what: &'static str,
    state: Mutex<State>,
}

struct State {
    started: Option<Instant>,
    shown: u32,
    held_back: u64,
}

impl RateLimited {
    /// A site whose held-back lines are summarised as "`n` more `what`".
    pub(crate) const fn new(what: &'static str) -> RateLimited {
        RateLimited { what, state: Mutex::new(State { started: None, shown: 0, held_back: 0 }) }
    }

    /// Logs `args` as a warning, unless this window's lines are used up.
    pub(crate) fn warn(&self, args: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        let mut s = lock(&self.state);
        if s.started.is_none_or(|t| now.duration_since(t) >= WINDOW) {
            if s.held_back > 0 {
                log::warn!(
                    "{} more {} in the last {} s (not logged one by one)",
                    s.held_back,
                    self.what,
                    WINDOW.as_secs()
                );
            }
            *s = State { started: Some(now), shown: 0, held_back: 0 };
        }
        if s.shown < PER_WINDOW {
            s.shown += 1;
            drop(s);
            log::warn!("{args}");
        } else {
            s.held_back += 1;
        }
    }

    /// Lines held back in the current window (for tests).
    #[cfg(test)]
    pub(crate) fn held_back(&self) -> u64 {
        lock(&self.state).held_back
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_a_few_lines_and_counted() {
        let site = RateLimited::new("refusals");
        for i in 0..100 {
            site.warn(format_args!("refused {i}"));
        }
        assert_eq!(site.held_back(), 95);
    }
}
