//! Cluster formation (DESIGN.md §1, §3): membership, leader election and
//! plan epochs as a deterministic state machine; later discovery and the
//! ring runtime.

pub mod config;
pub mod dist;
pub mod fetch;
pub mod membership;
pub mod prepare;
pub mod shell;

pub use membership::{
    Action, Beat, Config, Epoch, Event, HardState, Member, Millis, Msg, Node, NodeConfig, Plan,
    RoleKind, Status, Term, Timing, VoteRequest,
};
