//! Emulated devices: a test and benchmark feature that makes a ring node
//! on a shared machine behave like a slower device of its own, so that a
//! cluster can be measured on one host (`loip bench-ring`).
//!
//! Off by default ([`Emulation::default`]), and never touching numerics:
//! the same reads, the same arithmetic, only slower.
//!
//! - storage: the node's streamer reads at most `read_bytes_per_s`
//!   ([`ReadPace`]; reads stay real O_DIRECT reads);
//! - compute: each unit's run is stretched to `compute_factor` times its
//!   compute time (the window executor's `compute_factor`), so the node
//!   behaves like a device that many times slower, and several nodes on a
//!   few host cores leave the host mostly idle;
//! - links: [`super::RingConfig::links`] (bandwidth and latency on send).
//!
//! The memory budget is the plan's: the node keeps resident what the plan
//! says and streams the rest.

use serde::{Deserialize, Serialize};

use crate::engine::loader::{ReadPace, StreamMode};
use crate::plan::{Loading, Plan};

/// How one node is slowed down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Emulation {
    /// Storage read bandwidth cap, bytes per second; `None`: the host's.
    #[serde(default)]
    pub read_bytes_per_s: Option<f64>,
    /// Compute slowdown (at least 1); `None`: the host's speed.
    #[serde(default)]
    pub compute_factor: Option<f64>,
}

impl Emulation {
    /// The streamer's read pace.
    pub fn read_pace(&self) -> Option<ReadPace> {
        self.read_bytes_per_s
            .map(|bytes_per_s| ReadPace { bytes_per_s })
    }

    /// The window executor's stretch factor (1: off).
    pub fn compute_factor(&self) -> f64 {
        self.compute_factor.unwrap_or(1.0).max(1.0)
    }
}

/// How a node streams the units of `plan`: the plan's loading mode, and
/// its slots counted in engine units. A planner unit is a decoder layer,
/// which the engine streams as two units (attention, then MLP), so a plan
/// that reads `K` layers ahead needs `2K` engine slots.
pub fn streaming_of(plan: &Plan) -> (StreamMode, usize) {
    let mode = match plan.loading {
        Loading::Prefetch => StreamMode::Prefetch,
        Loading::OnDemand => StreamMode::OnDemand,
    };
    (mode, 2 * (plan.slots as usize).max(1))
}
