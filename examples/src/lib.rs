//! Code the example programs share.

pub mod jacobi;
