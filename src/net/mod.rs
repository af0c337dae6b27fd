//! Networking leaves used by `cluster` and `serve` (DESIGN.md §3): node
//! identity, and later the QUIC endpoint and wire frames.

pub mod identity;
pub mod node_id;

pub use node_id::{NodeId, NodeIdParseError};
