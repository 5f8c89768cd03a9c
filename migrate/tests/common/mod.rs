//! Helpers of the migration tests that drive `migrate-probe`.
#![allow(dead_code)]

use std::process::Command;

/// The tests' cluster key.
pub const KEY: &str = "migrate-tests-cluster-key-0123456789";

/// `migrate-probe` with the cluster key in its environment.
pub fn probe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_migrate-probe"));
    c.env("MOSAIC_CLUSTER_KEY", KEY);
    c
}

/// The number after `name` in `line`.
pub fn field(line: &str, name: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == name).unwrap_or_else(|| panic!("no {name} in {line}"));
    words[at + 1].parse().unwrap_or_else(|_| panic!("{name} in {line}"))
}
