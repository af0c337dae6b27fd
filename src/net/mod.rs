//! Networking leaves used by `cluster` and `serve` (DESIGN.md §3): node
//! identity, wire frames and the QUIC endpoint.

pub mod emulated;
pub mod frame;
pub mod identity;
pub mod node_id;
pub mod quic;

pub use node_id::{NodeId, NodeIdParseError};
