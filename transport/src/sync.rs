//! Small synchronisation helpers shared by the crate.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, carrying on past poisoning: every critical section in this crate is a single
/// assignment or container operation, so a panic elsewhere never leaves the data half-updated.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
