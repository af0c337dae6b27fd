//! Cluster formation (DESIGN.md §1, §3): membership, leader election and
//! plan epochs as a deterministic state machine; mDNS discovery; the node's
//! state in sled; the ring runtime; device provisioning and the service.

pub mod client;
pub mod config;
pub mod discovery;
pub mod dist;
pub mod fetch;
pub mod fitness;
pub mod flash;
pub mod linkwatch;
pub mod membership;
pub mod prepare;
pub mod ring;
pub mod service;
pub mod shell;
pub mod state;
pub mod stats;

pub use membership::{
    Action, Beat, Config, Epoch, Event, HardState, Member, Millis, Msg, Node, NodeConfig, Plan,
    RoleKind, Status, Term, Timing, VoteRequest,
};
