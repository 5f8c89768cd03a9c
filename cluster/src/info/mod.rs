//! The information layer of the cluster: what each node knows of the others.
//!
//! - [`LoadVector`]: what a node says about itself (load, CPUs and speed, how busy, free memory
//!   and memory pressure, free slots), measured from `/proc` ([`load::measure`]).
//! - [`InfoWindow`]: the bounded window of the freshest vectors a node has heard, one per node,
//!   the oldest dropped first (the seed's information window).
//! - [`GossipNode`]: one node, without I/O: membership and failure detection by SWIM (the `foca`
//!   crate), and the seed's dissemination: each node sends its vector and a few of the freshest
//!   it holds to a random member at a fixed rate, so what a node sends per second does not grow
//!   with the cluster. The agent (`mosaicd`) carries its frames; [`sim`] carries them for
//!   thousands of nodes in simulated time.

pub mod load;
mod node;
pub mod sim;
mod window;

pub use load::LoadVector;
pub use node::{Event, GossipConfig, GossipNode, GossipStats, NodeId, Outgoing, MAX_FRAME};
pub use window::InfoWindow;
