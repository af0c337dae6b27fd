//! Online adaptation to KV pressure (DESIGN.md §1 step 7, §5): as the KV
//! caches of running sequences grow, resident units are demoted to
//! streamed so that resident weights + slots + KV + scratch stay within
//! the budget, and promoted back when memory frees up.
//!
//! [`Policy`] is the decision alone: a deterministic state machine with no
//! I/O (STYLE.md, habit 7). It is told the KV bytes the next step will
//! hold and answers with a [`Change`]; the caller applies it to the engine
//! ([`super::generate::Engine::set_resident`]) and then [`Policy::commit`]s
//! it. Which units go is a cost-model decision: the delay a set of streamed
//! units adds to a step is `max(0, Σ t_load − Σ t_comp)` (their loads
//! overlap the compute of the whole step, DESIGN.md §6), so a demotion is
//! ranked by the delay it adds per byte it frees, then by how far it lies
//! from the units already streamed (spread, as `offload::place` does, so
//! that loads overlap the compute between them), then by its size. Raising
//! the slot size (streaming an MLP where only attention was streamed)
//! costs `slots ×` the growth, which the search accounts for by trying
//! each slot size in turn and keeping the cheapest.
//!
//! Hysteresis: a demotion happens only when the next step would not fit;
//! a promotion only when, after it, a margin is still free. Between the
//! two, nothing moves, so a KV size that wobbles never makes units flap.
//! Inputs that cannot be true (a negative KV size, KV without sequences,
//! a budget of zero, a bandwidth that is not a positive finite number)
//! are refused with an [`Ignored`] and change nothing.

use std::collections::BTreeSet;

use thiserror::Error;

use super::loader::Span;
use super::weights::{Model, Unit};

/// Bytes of memory a resident unit takes: its packed tensors, each
/// rounded to a cache line, the unit rounded to a page (how
/// `Model::make_resident` lays it out).
pub fn unit_memory(model: &Model, unit: Unit) -> u64 {
    model.resident_bytes(unit).next_multiple_of(4096)
}

/// The cost-model figures of one unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnitCost {
    pub unit: Unit,
    /// Memory it takes when resident.
    pub memory: u64,
    /// Bytes read to stream it (its aligned span in the file), which is
    /// also the slot size it needs.
    pub span: u64,
    /// Seconds a step spends computing it (decode, one token).
    pub compute_s: f64,
}

/// Storage and compute rates of the node (the §6 cost model's terms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Storage read bandwidth, bytes per second.
    pub storage_bps: f64,
    /// Per read.
    pub latency_s: f64,
}

impl Rates {
    fn valid(&self) -> bool {
        (1e6..=1e12).contains(&self.storage_bps) && (0.0..=1.0).contains(&self.latency_s)
    }

    fn load_s(&self, span: u64) -> f64 {
        span as f64 / self.storage_bps + self.latency_s
    }
}

impl Default for Rates {
    /// Conservative figures for an SSD or eMMC, until measured.
    fn default() -> Rates {
        Rates {
            storage_bps: 1.5e9,
            latency_s: 1e-4,
        }
    }
}

/// The fixed parts of the memory accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub budget: u64,
    /// Streaming slots (each as large as the largest streamed unit).
    pub slots: usize,
    /// Scratch buffers and the always-resident vectors.
    pub fixed: u64,
    /// Memory that must stay free after a promotion (the hysteresis).
    pub margin: u64,
    /// The most KV bytes one sequence can hold (for telling absurd KV
    /// sizes from real ones).
    pub max_kv_per_sequence: u64,
}

/// What the KV cache will hold at the next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// KV bytes of every sequence after the next step (signed, so that a
    /// bad subtraction upstream shows up as what it is).
    pub kv_bytes: i64,
    pub sequences: usize,
}

/// A change of the resident set, to apply between two steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Demote(Vec<Unit>),
    Promote(Vec<Unit>),
}

/// Why an input changed nothing.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum Ignored {
    #[error("a negative KV size ({0} bytes) is not a measurement")]
    NegativeKv(i64),
    #[error("{sequences} sequence(s) cannot hold {kv_bytes} bytes of KV")]
    AbsurdKv { kv_bytes: i64, sequences: usize },
    #[error("a budget of zero bytes is not a budget")]
    ZeroBudget,
    #[error("the budget is already {0} bytes")]
    UnchangedBudget(u64),
    #[error(
        "a budget of {budget} bytes is below the {minimum} bytes needed with every unit streamed"
    )]
    BudgetBelowMinimum { budget: u64, minimum: u64 },
    #[error("storage rates {0:?} are not plausible")]
    AbsurdRates(Rates),
    #[error(
        "{kv_bytes} bytes of KV do not fit the budget of {budget} bytes even with every unit streamed"
    )]
    OverCapacity { kv_bytes: u64, budget: u64 },
}

/// The KV-pressure policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Every unit, in the order a step uses them.
    units: Vec<UnitCost>,
    streamed: Vec<bool>,
    /// Streamed units that are never promoted ([`Policy::pin`]).
    pinned: Vec<bool>,
    limits: Limits,
    rates: Rates,
}

impl Policy {
    /// A policy over `units` (in use order), of which `streamed` are
    /// streamed now.
    pub fn new(units: Vec<UnitCost>, streamed: &[Unit], limits: Limits, rates: Rates) -> Policy {
        let streamed = units.iter().map(|c| streamed.contains(&c.unit)).collect();
        Policy {
            pinned: vec![false; units.len()],
            units,
            streamed,
            limits,
            rates: if rates.valid() {
                rates
            } else {
                Rates::default()
            },
        }
    }

    /// The units of `model` with their costs; compute time is taken as
    /// proportional to the weight bytes a step reads (`compute_bps`).
    pub fn costs_of(model: &Model, compute_bps: f64) -> Vec<UnitCost> {
        Unit::all(model.config.n_layer)
            .into_iter()
            .map(|u| UnitCost {
                unit: u,
                memory: unit_memory(model, u),
                span: Span::of(model, u).len,
                compute_s: model.resident_bytes(u) as f64 / compute_bps.max(1.0),
            })
            .collect()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Keeps `units` streamed for good: they are streamed now (they become
    /// so) and are never promoted. A ring node pins the units its plan
    /// streams: it demotes and promotes only its own choices, and the plan
    /// stays the leader's.
    pub fn pin(&mut self, units: &[Unit]) {
        for ((c, s), p) in self
            .units
            .iter()
            .zip(self.streamed.iter_mut())
            .zip(self.pinned.iter_mut())
        {
            if units.contains(&c.unit) {
                *s = true;
                *p = true;
            }
        }
    }

    /// The units streamed now, in use order.
    pub fn streamed(&self) -> Vec<Unit> {
        self.set_units(&self.streamed)
    }

    /// Units resident now.
    pub fn resident_count(&self) -> usize {
        self.streamed.iter().filter(|&&s| !s).count()
    }

    fn set_units(&self, set: &[bool]) -> Vec<Unit> {
        self.units
            .iter()
            .zip(set)
            .filter(|(_, &s)| s)
            .map(|(c, _)| c.unit)
            .collect()
    }

    /// Memory of weights and slots when `set` is streamed, plus the fixed
    /// part, without KV.
    fn weights_memory(&self, set: &[bool]) -> u64 {
        let mut resident = 0;
        let mut largest = 0;
        for (c, &s) in self.units.iter().zip(set) {
            if s {
                largest = largest.max(c.span);
            } else {
                resident += c.memory;
            }
        }
        resident + self.limits.slots as u64 * largest + self.limits.fixed
    }

    /// Everything the node holds with the current placement and `kv` bytes
    /// of KV.
    pub fn total(&self, kv: u64) -> u64 {
        self.weights_memory(&self.streamed) + kv
    }

    /// The KV bytes that fit with every unit streamed: past this, nothing
    /// can be admitted.
    pub fn kv_capacity(&self) -> u64 {
        self.limits
            .budget
            .saturating_sub(self.weights_memory(&vec![true; self.units.len()]))
    }

    /// The most KV bytes that fit under any placement: with every unit
    /// streamed whose span is within some slot size (and the pinned ones
    /// streamed), the rest resident, for the slot size that leaves the
    /// most room. Streaming a unit larger than the others (an output
    /// head) can cost more in slots than it frees, so this may exceed
    /// [`Policy::kv_capacity`]; the demotion search reaches it (it tries
    /// each slot size).
    pub fn kv_ceiling(&self) -> u64 {
        let floor = self
            .units
            .iter()
            .zip(&self.pinned)
            .filter(|(_, &p)| p)
            .map(|(c, _)| c.span)
            .max()
            .unwrap_or(0);
        let caps: BTreeSet<u64> = std::iter::once(floor)
            .chain(self.units.iter().map(|c| c.span).filter(|&s| s >= floor))
            .collect();
        let least = caps
            .into_iter()
            .map(|cap| {
                let set: Vec<bool> = self
                    .units
                    .iter()
                    .zip(&self.pinned)
                    .map(|(c, &p)| p || (cap > 0 && c.span <= cap))
                    .collect();
                self.weights_memory(&set)
            })
            .min()
            .unwrap_or(0);
        self.limits.budget.saturating_sub(least)
    }

    /// Seconds streaming `set` adds to a step: loads overlap the compute
    /// of the whole step, and only what they exceed it by is delay.
    fn delay(&self, set: &[bool]) -> f64 {
        let (mut load, mut compute) = (0.0, 0.0);
        for (c, &s) in self.units.iter().zip(set) {
            compute += c.compute_s;
            if s {
                load += self.rates.load_s(c.span);
            }
        }
        (load - compute).max(0.0)
    }

    /// Distance, in units of use order (cyclic), from `i` to the nearest
    /// streamed unit of `set`.
    fn gap(&self, set: &[bool], i: usize) -> usize {
        let n = self.units.len();
        (1..n)
            .find(|&d| set[(i + d) % n] || set[(i + n - d) % n])
            .unwrap_or(n)
    }

    /// What to change before a step that will hold `obs`: `None` when the
    /// placement stays.
    pub fn decide(&self, obs: Observation) -> Result<Option<Change>, Ignored> {
        let kv = self.check(obs)?;
        let budget = self.limits.budget;
        if self.total(kv) > budget {
            return self.demotion(kv).map(|d| Some(Change::Demote(d)));
        }
        Ok(self.promotion(kv).map(Change::Promote))
    }

    /// Refuses observations that cannot be true.
    fn check(&self, obs: Observation) -> Result<u64, Ignored> {
        if obs.kv_bytes < 0 {
            return Err(Ignored::NegativeKv(obs.kv_bytes));
        }
        let kv = obs.kv_bytes as u64;
        let most = self
            .limits
            .max_kv_per_sequence
            .saturating_mul(obs.sequences as u64);
        if (obs.sequences > 0 && kv == 0) || (obs.sequences == 0 && kv > 0) || kv > most {
            return Err(Ignored::AbsurdKv {
                kv_bytes: obs.kv_bytes,
                sequences: obs.sequences,
            });
        }
        Ok(kv)
    }

    /// The cheapest set of resident units whose demotion brings the total
    /// within the budget.
    fn demotion(&self, kv: u64) -> Result<Vec<Unit>, Ignored> {
        let budget = self.limits.budget;
        let fits = |set: &[bool]| self.weights_memory(set) + kv <= budget;
        let current_slot = self
            .units
            .iter()
            .zip(&self.streamed)
            .filter(|(_, &s)| s)
            .map(|(c, _)| c.span)
            .max()
            .unwrap_or(0);
        let caps: BTreeSet<u64> = self
            .units
            .iter()
            .map(|c| c.span.max(current_slot))
            .collect();
        // (delay, streamed bytes, cap) of the best set so far.
        let mut best: Option<((f64, u64, u64), Vec<bool>)> = None;
        for cap in caps {
            let mut set = self.streamed.clone();
            while !fits(&set) {
                let Some(i) = self.next_demotion(&set, cap) else {
                    break;
                };
                set[i] = true;
            }
            if !fits(&set) {
                continue;
            }
            // Give back what the last picks overshot.
            for i in (0..set.len()).rev() {
                if set[i] && !self.streamed[i] {
                    set[i] = false;
                    if !fits(&set) {
                        set[i] = true;
                    }
                }
            }
            let bytes: u64 = self
                .units
                .iter()
                .zip(&set)
                .filter(|(_, &s)| s)
                .map(|(c, _)| c.span)
                .sum();
            let key = (self.delay(&set), bytes, cap);
            let better = best.as_ref().is_none_or(|(k, _)| {
                key.0 < k.0 - 1e-12 || (key.0 <= k.0 + 1e-12 && (key.1, key.2) < (k.1, k.2))
            });
            if better {
                best = Some((key, set));
            }
        }
        let Some((_, set)) = best else {
            return Err(Ignored::OverCapacity {
                kv_bytes: kv,
                budget,
            });
        };
        let added: Vec<bool> = set
            .iter()
            .zip(&self.streamed)
            .map(|(&s, &was)| s && !was)
            .collect();
        Ok(self.set_units(&added))
    }

    /// The resident unit (with a span within `cap`) whose demotion adds the
    /// least delay per byte it frees; then the farthest from the streamed
    /// ones; then the smallest; then the first in use order.
    fn next_demotion(&self, set: &[bool], cap: u64) -> Option<usize> {
        let base = self.delay(set);
        let mut best: Option<(f64, usize, u64, usize)> = None;
        let mut trial = set.to_vec();
        for (i, c) in self.units.iter().enumerate() {
            if set[i] || c.span > cap {
                continue;
            }
            trial[i] = true;
            let per_byte = (self.delay(&trial) - base) / c.memory.max(1) as f64;
            trial[i] = false;
            let gap = self.gap(set, i);
            let better = best.is_none_or(|(p, g, s, _)| {
                per_byte < p - 1e-18
                    || (per_byte <= p + 1e-18 && (gap > g || (gap == g && c.span < s)))
            });
            if better {
                best = Some((per_byte, gap, c.span, i));
            }
        }
        best.map(|b| b.3)
    }

    /// Streamed units to bring back while a margin stays free: the one
    /// whose streaming costs the most delay per byte first, then the most
    /// crowded (nearest to another streamed unit).
    fn promotion(&self, kv: u64) -> Option<Vec<Unit>> {
        let limit = self.limits.budget.checked_sub(self.limits.margin)?;
        let mut set = self.streamed.clone();
        let mut promoted = Vec::new();
        // One unit at a time cannot see that bringing back every unit of
        // the largest span shrinks the slots: try those groups first, all
        // streamed units, then all but the smallest span, and so on.
        let movable = |set: &[bool], i: usize| set[i] && !self.pinned[i];
        let spans: BTreeSet<u64> = self
            .units
            .iter()
            .enumerate()
            .filter(|&(i, _)| movable(&set, i))
            .map(|(_, c)| c.span)
            .collect();
        for &keep_below in std::iter::once(&0).chain(spans.iter()) {
            let group: Vec<usize> = (0..set.len())
                .filter(|&i| movable(&set, i) && self.units[i].span > keep_below)
                .collect();
            if group.is_empty() {
                continue;
            }
            let mut trial = set.clone();
            for &i in &group {
                trial[i] = false;
            }
            if self.weights_memory(&trial) + kv <= limit {
                set = trial;
                promoted.extend(group);
                break;
            }
        }
        loop {
            let base = self.delay(&set);
            let mut best: Option<(f64, usize, usize)> = None;
            let mut trial = set.clone();
            for i in 0..set.len() {
                if !movable(&set, i) {
                    continue;
                }
                trial[i] = false;
                if self.weights_memory(&trial) + kv > limit {
                    trial[i] = true;
                    continue;
                }
                let per_byte = (base - self.delay(&trial)) / self.units[i].memory.max(1) as f64;
                trial[i] = true;
                let gap = self.gap(&set, i);
                if best.is_none_or(|(p, g, _)| {
                    per_byte > p + 1e-18 || (per_byte >= p - 1e-18 && gap < g)
                }) {
                    best = Some((per_byte, gap, i));
                }
            }
            let Some((_, _, i)) = best else { break };
            set[i] = false;
            promoted.push(i);
        }
        if promoted.is_empty() {
            return None;
        }
        promoted.sort_unstable();
        Some(promoted.into_iter().map(|i| self.units[i].unit).collect())
    }

    /// Records that `change` was applied to the engine.
    pub fn commit(&mut self, change: &Change) {
        let (units, streamed) = match change {
            Change::Demote(u) => (u, true),
            Change::Promote(u) => (u, false),
        };
        for (c, s) in self.units.iter().zip(self.streamed.iter_mut()) {
            if units.contains(&c.unit) {
                *s = streamed;
            }
        }
    }

    /// Makes the policy agree with the engine's actual streamed units (after
    /// a change that applied only in part).
    pub fn resync(&mut self, streamed: &[Unit]) {
        for (c, s) in self.units.iter().zip(self.streamed.iter_mut()) {
            *s = streamed.contains(&c.unit);
        }
    }

    /// A new budget; the next [`Policy::decide`] adapts to it.
    pub fn set_budget(&mut self, budget: u64) -> Result<(), Ignored> {
        if budget == 0 {
            return Err(Ignored::ZeroBudget);
        }
        if budget == self.limits.budget {
            return Err(Ignored::UnchangedBudget(budget));
        }
        let minimum = self.weights_memory(&vec![true; self.units.len()]);
        if budget < minimum {
            return Err(Ignored::BudgetBelowMinimum { budget, minimum });
        }
        self.limits.budget = budget;
        Ok(())
    }

    /// Newly measured storage rates. They only rank units for the next
    /// change; they never trigger one.
    pub fn set_rates(&mut self, rates: Rates) -> Result<(), Ignored> {
        if !rates.valid() {
            return Err(Ignored::AbsurdRates(rates));
        }
        self.rates = rates;
        Ok(())
    }
}
