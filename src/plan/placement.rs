//! The plan the leader publishes, and its internal index form.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::cost::Costs;
use super::{PlanError, Planner};

/// When a device's loader reads a streamed window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loading {
    /// As soon as a slot is free: ahead of use.
    Prefetch,
    /// Only when the window's input arrives (no prefetch).
    OnDemand,
}

/// One window: consecutive units run on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Index into [`Plan::ring`].
    pub device: usize,
    /// Units run, in order: unit `u < n_layers` is decoder layer `u`, unit
    /// `n_layers` the output head.
    pub units: Range<u32>,
    /// For each unit of `units`, in order: streamed from storage (true) or
    /// resident (false).
    pub streamed: Vec<bool>,
}

/// Where every unit runs and how it gets there: what the engine applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Plan number; the cluster switches epochs at a token boundary.
    pub epoch: u64,
    pub planner: Planner,
    /// Names of the devices that take part, in ring order.
    pub ring: Vec<String>,
    /// Windows in execution order.
    pub windows: Vec<Window>,
    /// KV-cache bytes each ring device reserves (target batch × context).
    pub kv_budget_bytes: Vec<u64>,
    /// Streaming slots per device (`K`), each the size of its largest
    /// streamed unit.
    pub slots: u32,
    pub loading: Loading,
    /// Micro-batches the target batch is split into.
    pub micro_batches: u32,
    /// The target the plan was made for.
    pub batch: u32,
    pub context_tokens: u32,
}

impl Plan {
    /// Windows per device when every device has the same number.
    pub fn rounds(&self) -> usize {
        self.windows.len() / self.ring.len().max(1)
    }
}

/// Memory one device needs under a plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUse {
    pub resident_bytes: u64,
    /// `K` slots of the largest streamed unit.
    pub slot_bytes: u64,
    pub kv_bytes: u64,
    pub scratch_bytes: u64,
}

impl MemoryUse {
    pub fn total(&self) -> u64 {
        self.resident_bytes + self.slot_bytes + self.kv_bytes + self.scratch_bytes
    }
}

/// A plan by indices, as the search and the simulator use it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Layout {
    /// Device index (into `Problem::devices`) of each ring position.
    pub ring: Vec<usize>,
    /// Window `w` covers units `bounds[w]..bounds[w + 1]`.
    pub bounds: Vec<usize>,
    /// Ring position of each window.
    pub win_pos: Vec<usize>,
    /// Per unit: streamed.
    pub streamed: Vec<bool>,
    pub slots: u32,
    pub loading: Loading,
    pub micro_batches: u32,
}

impl Layout {
    /// A ring layout: window `w` on ring position `w % ring.len()`, with
    /// the given window sizes; everything resident.
    pub fn ring(ring: Vec<usize>, sizes: &[usize], slots: u32, loading: Loading) -> Layout {
        let r = ring.len();
        let mut bounds = Vec::with_capacity(sizes.len() + 1);
        bounds.push(0);
        for s in sizes {
            bounds.push(bounds.last().unwrap() + s);
        }
        let n_units = *bounds.last().unwrap();
        Layout {
            win_pos: (0..sizes.len()).map(|w| w % r).collect(),
            ring,
            bounds,
            streamed: vec![false; n_units],
            slots,
            loading,
            micro_batches: 1,
        }
    }

    pub fn n_windows(&self) -> usize {
        self.win_pos.len()
    }

    pub fn units(&self, w: usize) -> Range<usize> {
        self.bounds[w]..self.bounds[w + 1]
    }

    /// Windows of ring position `pos`, in order.
    pub fn windows_of(&self, pos: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.n_windows()).filter(move |&w| self.win_pos[w] == pos)
    }
}

pub(crate) fn to_plan(costs: &Costs, layout: &Layout, planner: Planner) -> Plan {
    let p = costs.problem();
    Plan {
        epoch: 0,
        planner,
        ring: layout
            .ring
            .iter()
            .map(|&d| p.devices[d].name.clone())
            .collect(),
        windows: (0..layout.n_windows())
            .map(|w| {
                let u = layout.units(w);
                Window {
                    device: layout.win_pos[w],
                    units: u.start as u32..u.end as u32,
                    streamed: layout.streamed[u].to_vec(),
                }
            })
            .collect(),
        kv_budget_bytes: (0..layout.ring.len())
            .map(|pos| costs.memory(layout, pos).kv_bytes)
            .collect(),
        slots: layout.slots,
        loading: layout.loading,
        micro_batches: layout.micro_batches,
        batch: p.workload.batch(),
        context_tokens: p.workload.context_tokens,
    }
}

/// Checks a plan against the problem and converts it; every field a peer
/// could send is checked.
pub(crate) fn from_plan(costs: &Costs, plan: &Plan) -> Result<Layout, PlanError> {
    let p = costs.problem();
    let bad = |s: String| Err(PlanError::InvalidPlan(s));
    if plan.ring.is_empty() || plan.windows.is_empty() {
        return bad("no devices or no windows".into());
    }
    let mut ring = Vec::with_capacity(plan.ring.len());
    for name in &plan.ring {
        let Some(d) = p.devices.iter().position(|d| &d.name == name) else {
            return bad(format!("device `{name}` is not in the problem"));
        };
        if ring.contains(&d) {
            return bad(format!("device `{name}` is twice in the ring"));
        }
        ring.push(d);
    }
    let n_units = p.model.n_units();
    let mut bounds = vec![0usize];
    let mut streamed = Vec::with_capacity(n_units);
    let mut win_pos = Vec::with_capacity(plan.windows.len());
    for (i, w) in plan.windows.iter().enumerate() {
        if w.device >= ring.len() {
            return bad(format!(
                "window {i}: device {} is not in the ring",
                w.device
            ));
        }
        if w.units.start as usize != *bounds.last().unwrap() || w.units.end <= w.units.start {
            return bad(format!(
                "window {i}: units {:?} do not follow the previous window",
                w.units
            ));
        }
        if w.units.end as usize > n_units {
            return bad(format!(
                "window {i}: units {:?} past the model's {n_units}",
                w.units
            ));
        }
        if w.streamed.len() != w.units.len() {
            return bad(format!(
                "window {i}: {} streamed flags for {} units",
                w.streamed.len(),
                w.units.len()
            ));
        }
        bounds.push(w.units.end as usize);
        streamed.extend_from_slice(&w.streamed);
        win_pos.push(w.device);
    }
    if *bounds.last().unwrap() != n_units {
        return bad(format!(
            "windows end at unit {}, the model has {n_units}",
            bounds.last().unwrap()
        ));
    }
    if let Some(pos) = (0..ring.len()).find(|pos| !win_pos.contains(pos)) {
        return bad(format!("device `{}` has no window", plan.ring[pos]));
    }
    if !(1..=64).contains(&plan.slots) {
        return bad(format!("{} slots (1 to 64 allowed)", plan.slots));
    }
    let batch = p.workload.batch();
    if plan.batch != batch || plan.context_tokens != p.workload.context_tokens {
        return bad(format!(
            "made for batch {} × context {}, the workload has {batch} × {}",
            plan.batch, plan.context_tokens, p.workload.context_tokens
        ));
    }
    if plan.micro_batches == 0 || plan.micro_batches > batch {
        return bad(format!(
            "{} micro-batches for a batch of {batch}",
            plan.micro_batches
        ));
    }
    let layout = Layout {
        ring,
        bounds,
        win_pos,
        streamed,
        slots: plan.slots,
        loading: plan.loading,
        micro_batches: plan.micro_batches,
    };
    if plan.kv_budget_bytes.len() != layout.ring.len() {
        return bad(format!(
            "{} KV budgets for {} devices",
            plan.kv_budget_bytes.len(),
            layout.ring.len()
        ));
    }
    for (pos, &kv) in plan.kv_budget_bytes.iter().enumerate() {
        let need = costs.memory(&layout, pos).kv_bytes;
        if kv != need {
            return bad(format!(
                "device `{}`: KV budget {kv} bytes, its layers need {need}",
                plan.ring[pos]
            ));
        }
    }
    Ok(layout)
}
