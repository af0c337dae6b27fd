//! KV pressure in the ring (DESIGN.md §1 step 7, §5): as the caches of the
//! sequences in flight grow, a node demotes resident units to streamed so
//! that resident weights + streaming slots + KV + scratch stay within its
//! memory budget, promotes them back when memory frees up, and the head
//! admits a request only when the KV its sequence can grow to fits on
//! every member.
//!
//! # The node
//!
//! [`Pressure`] wraps the one KV-pressure policy of the engine
//! ([`crate::engine::adapt::Policy`]), over the units this node runs in the
//! order it runs them. The units the plan streams are pinned (the plan
//! stays the leader's): the node demotes and promotes only its own
//! choices. The memory the policy sees is resident weights + the
//! streamer's slots + scratch + the KV bytes the caches will hold once the
//! next window run has grown them: a visit of a window grows the caches of
//! the sequences that pass it by one position each (decoding), or by their
//! prompt (a prompt starting in this step: hops carry the prompt lengths of
//! their step, [`super::wire::Hop::fresh_tokens`]).
//!
//! A change happens only at the start of a window's run when the streamer
//! holds nothing for that window, so that no slot in use is unmapped. The
//! streamer is then rebuilt on the new streamed set, in this node's run
//! order starting at that window (it streams cyclically, so starting there
//! keeps it in step with the windows that follow). A visit that started
//! holding its window's streamed units and would now stream more units
//! than there are slots runs its micro-batches one at a time, each from a
//! streamer rewound to the window ([`Pressure::rewind`]). Weights are the
//! same bytes resident or streamed, so no logit changes (DESIGN.md §2).
//!
//! Demotions are kept in the node's database (tree `adapt`, key
//! `ring/<model file>`), with the placement they were made under; a node
//! restarted under the same placement starts with them streamed.
//!
//! # The head
//!
//! Every member tells the head, when its ring starts, how many positions
//! of KV it can hold after demoting all it can: every unit streamed that
//! frees more than its slots cost ([`Pressure::kv_positions`]; a node
//! without a budget: no limit). A
//! request reserves its prompt plus its `max_tokens`, in whole cache
//! blocks; [`Admission`] admits it only when every reservation fits the
//! smallest member's figure, else it waits at the head (in order: none
//! overtakes another). So a running sequence always finds room, after
//! demotions, on every node; a request that could not fit even alone is
//! refused with a clear error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{RingConfig, RingError, RingStats};
use crate::engine::adapt::{Change, Ignored, Limits, Observation, Policy, Rates};
use crate::engine::kv::{KvCache, GROW};
use crate::engine::loader::{ReadPace, StreamMode, Streamer};
use crate::engine::offload::{fixed_bytes, Demand};
use crate::engine::weights::{Model, Unit};
use crate::store::{Store, Tree};

/// A ring node's memory budget and its database
/// ([`RingConfig::kv_pressure`]).
#[derive(Clone, Debug)]
pub struct KvPressure {
    /// Bytes the node may use: resident weights, slots, KV and scratch.
    pub budget_bytes: u64,
    /// Where its demotions are kept; `None`: not kept.
    pub store: Option<Store>,
}

/// How long the head waits for every member's capacity before admitting
/// with the figures it has (a warning says so).
const CAPACITY_WAIT: Duration = Duration::from_secs(20);

/// One unit this node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Placed {
    pub unit: Unit,
    /// Index among the node's windows.
    pub window: usize,
    /// The plan streams it.
    pub planned: bool,
}

/// What the database keeps: the demotions, and the placement they were
/// made under (units by name, `attn.3`, `mlp.3`, `head`).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Saved {
    /// The node's units, in run order.
    units: Vec<String>,
    /// Those the plan streams.
    planned: Vec<String>,
    /// Those the node demoted.
    demoted: Vec<String>,
}

impl Saved {
    fn of(order: &[Placed], demoted: &[Unit]) -> Saved {
        let names = |f: &dyn Fn(&Placed) -> bool| {
            order
                .iter()
                .filter(|p| f(p))
                .map(|p| p.unit.to_string())
                .collect()
        };
        Saved {
            units: names(&|_| true),
            planned: names(&|p| p.planned),
            demoted: names(&|p| demoted.contains(&p.unit)),
        }
    }
}

fn key(config: &RingConfig) -> Vec<u8> {
    let name = config
        .model
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    format!("ring/{name}").into_bytes()
}

/// The demotions saved by an earlier run of this node under the same
/// placement (none otherwise), logged when there are some.
pub(super) fn saved_demotions(config: &RingConfig, order: &[Placed]) -> Vec<Unit> {
    let Some(store) = config.kv_pressure.as_ref().and_then(|k| k.store.as_ref()) else {
        return Vec::new();
    };
    let saved: Saved = match store.get_json(Tree::Adapt, &key(config)) {
        Ok(Some(s)) => s,
        Ok(None) => return Vec::new(),
        Err(e) => {
            log::warn!("ring node {}: ignoring the saved demotions: {e}", config.me);
            return Vec::new();
        }
    };
    let now = Saved::of(order, &[]);
    if saved.units != now.units || saved.planned != now.planned {
        log::info!(
            "ring node {}: the saved demotions were made under another placement; starting without",
            config.me
        );
        return Vec::new();
    }
    let demoted: Vec<Unit> = order
        .iter()
        .filter(|p| !p.planned && saved.demoted.contains(&p.unit.to_string()))
        .map(|p| p.unit)
        .collect();
    if !demoted.is_empty() {
        log::info!(
            "ring node {}: resuming with {} unit(s) demoted, as saved: {}",
            config.me,
            demoted.len(),
            names(&demoted)
        );
    }
    demoted
}

fn names(units: &[Unit]) -> String {
    units
        .iter()
        .map(|u| u.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// KV bytes per position of one layer.
fn layer_position_bytes(model: &Model) -> u64 {
    KvCache::bytes_per_position(1, model.config.kv_dim()) as u64
}

/// Positions a sequence reaching `end` positions holds (whole blocks).
pub(super) fn blocks(end: usize) -> u64 {
    (end.div_ceil(GROW) * GROW) as u64
}

/// The KV-pressure state of a node with a budget.
pub(super) struct Pressure {
    policy: Policy,
    order: Vec<Placed>,
    /// KV bytes per position of all the node's layers.
    node_position_bytes: u64,
    store: Option<(Store, Vec<u8>)>,
    stats: Arc<RingStats>,
    me: usize,
    mode: StreamMode,
    slots: usize,
    pace: Option<ReadPace>,
}

impl Pressure {
    /// The policy over `order` (this node's units in run order), of which
    /// the plan's streamed units and `demoted` are streamed now. `None`
    /// without a budget.
    pub fn new(
        config: &RingConfig,
        model: &Model,
        order: Vec<Placed>,
        demoted: &[Unit],
        stats: Arc<RingStats>,
    ) -> Option<Pressure> {
        let kp = config.kv_pressure.as_ref()?;
        let (mode, slots) = super::emulation::streaming_of(&config.plan);
        let layers = order
            .iter()
            .filter(|p| matches!(p.unit, Unit::Attn(_)))
            .count() as u64;
        let node_position_bytes = layers * layer_position_bytes(model);
        let context = model.config.context_length;
        let demand = Demand {
            batch: (config.plan.batch as usize).max(1),
            positions: (config.plan.context_tokens as usize).clamp(1, context),
            slots,
        };
        let (scratch, vectors) = fixed_bytes(model, demand, config.threads.max(1));
        let limits = Limits {
            budget: kp.budget_bytes,
            slots,
            fixed: scratch + vectors,
            // Promote only with this much free (as `loip serve`): a
            // sixteenth of the budget, and at least two cache blocks of a
            // sequence, so that a cache growing right after a promotion
            // does not demote it again at once.
            margin: (kp.budget_bytes / 16).max(2 * GROW as u64 * node_position_bytes),
            max_kv_per_sequence: blocks(context) * node_position_bytes,
        };
        // Only the ratio of compute to storage ranks units (as `loip
        // serve` does: decode reads weights at about 20 GB/s).
        let costs: Vec<_> = Policy::costs_of(model, 20e9)
            .into_iter()
            .filter(|c| order.iter().any(|p| p.unit == c.unit))
            .collect();
        // In this node's run order.
        let costs = order
            .iter()
            .filter_map(|p| costs.iter().find(|c| c.unit == p.unit).copied())
            .collect();
        let planned: Vec<Unit> = order.iter().filter(|p| p.planned).map(|p| p.unit).collect();
        let mut policy = Policy::new(costs, demoted, limits, Rates::default());
        policy.pin(&planned);
        // The plan's KV budget is a floor: the planner counted this node's
        // memory its own way (its scratch figure, not the engine's), and a
        // node that admitted less KV than its plan granted would refuse
        // requests the plan was made for.
        let planned_kv = config
            .plan
            .kv_budget_bytes
            .get(config.me)
            .copied()
            .unwrap_or(0);
        let mut as_planned = policy.clone();
        as_planned.resync(&planned);
        let floor = as_planned.total(planned_kv);
        if floor > kp.budget_bytes {
            log::warn!(
                "ring node {}: the plan needs {} MiB here with its KV budget, over the memory budget of {} MiB; budgeting for the plan",
                config.me,
                floor >> 20,
                kp.budget_bytes >> 20
            );
            let _ = policy.set_budget(floor);
        }
        let store = kp.store.clone().map(|s| (s, key(config)));
        let p = Pressure {
            policy,
            order,
            node_position_bytes,
            store,
            stats,
            me: config.me,
            mode,
            slots,
            pace: config.emulation.read_pace(),
        };
        p.publish();
        Some(p)
    }

    /// Positions of KV (every sequence's, in whole cache blocks) the node
    /// can hold after demoting all it can ([`Policy::kv_ceiling`]).
    pub fn kv_positions(&self) -> u64 {
        self.policy.kv_ceiling() / self.node_position_bytes.max(1)
    }

    /// The change to make before a run after which the caches hold
    /// `kv_bytes` for `sequences` sequences, if any.
    pub fn decide(&self, kv_bytes: u64, sequences: usize) -> Option<Change> {
        let obs = Observation {
            kv_bytes: kv_bytes.min(i64::MAX as u64) as i64,
            sequences,
        };
        match self.policy.decide(obs) {
            Ok(c) => c,
            Err(e @ Ignored::OverCapacity { .. }) => {
                log::warn!("ring node {}: {e}", self.me);
                None
            }
            Err(e) => {
                log::debug!("ring node {}: observation ignored: {e}", self.me);
                None
            }
        }
    }

    /// Applies `change`, decided for `kv` bytes of KV, between window
    /// runs: demotes (freeing the units' memory) before it promotes, then
    /// restarts the streamer on the units streamed now, in run order from
    /// local window `at`. A promotion that fails to read leaves its unit
    /// streamed; the error is logged and the node goes on with what is
    /// resident.
    pub fn apply(
        &mut self,
        change: Change,
        kv: u64,
        model: &mut Arc<Model>,
        streamer: &mut Option<Streamer>,
        at: usize,
    ) -> Result<(), RingError> {
        let t = Instant::now();
        let m = Arc::get_mut(model).ok_or_else(|| {
            RingError::Plan("the model is shared: cannot change residency".into())
        })?;
        // The old streamer goes first: dropping it joins its loader, so
        // no slot is in use when its memory is unmapped.
        *streamer = None;
        let (units, demote) = match &change {
            Change::Demote(u) => (u, true),
            Change::Promote(u) => (u, false),
        };
        for &u in units {
            if demote {
                m.demote(u);
            } else if let Err(e) = m.promote(u) {
                log::warn!("ring node {}: promoting {u}: {e}", self.me);
            }
        }
        let streamed = self.streamed_from(m, at);
        self.policy.resync(&streamed);
        *streamer = self.start(m, &streamed)?;
        let counter = if demote {
            &self.stats.demotions
        } else {
            &self.stats.promotions
        };
        RingStats::add(counter, units.len() as u64);
        log::info!(
            "ring node {}: {} {} in {:.1} ms (KV {kv} bytes; {} unit(s) demoted)",
            self.me,
            if demote { "demoted" } else { "promoted" },
            names(units),
            t.elapsed().as_secs_f64() * 1e3,
            self.demoted().len()
        );
        self.publish();
        self.persist();
        Ok(())
    }

    /// Restarts the streamer at local window `at`, for a visit that runs
    /// its window's micro-batches one at a time on more streamed units
    /// than there are slots: each run takes the window's units, and the
    /// next needs them again.
    pub fn rewind(
        &self,
        model: &Arc<Model>,
        streamer: &mut Option<Streamer>,
        at: usize,
    ) -> Result<(), RingError> {
        *streamer = None;
        let streamed = self.streamed_from(model, at);
        *streamer = self.start(model, &streamed)?;
        Ok(())
    }

    /// The units not resident, in run order starting at local window `at`.
    fn streamed_from(&self, model: &Model, at: usize) -> Vec<Unit> {
        let first = self.order.iter().position(|p| p.window >= at).unwrap_or(0);
        self.order[first..]
            .iter()
            .chain(&self.order[..first])
            .filter(|p| !model.is_resident(p.unit))
            .map(|p| p.unit)
            .collect()
    }

    fn start(&self, model: &Model, streamed: &[Unit]) -> Result<Option<Streamer>, RingError> {
        if streamed.is_empty() {
            return Ok(None);
        }
        Ok(Some(Streamer::start_paced(
            model, streamed, self.slots, self.mode, self.pace,
        )?))
    }

    /// Units the node demoted (not the plan's streamed ones), in run order.
    fn demoted(&self) -> Vec<Unit> {
        let streamed = self.policy.streamed();
        self.order
            .iter()
            .filter(|p| !p.planned && streamed.contains(&p.unit))
            .map(|p| p.unit)
            .collect()
    }

    /// Sets the figures: units demoted, resident weights and slots, and
    /// the KV capacity.
    fn publish(&self) {
        let st = &self.stats;
        RingStats::set(&st.demoted_units, self.demoted().len() as u64);
        let limits = self.policy.limits();
        RingStats::set(&st.weights_bytes, self.policy.total(0) - limits.fixed);
        RingStats::set(&st.kv_positions, self.kv_positions());
        RingStats::set(&st.memory_budget_bytes, limits.budget);
    }

    /// Writes the demotions to the database, flushed.
    fn persist(&self) {
        let Some((store, key)) = &self.store else {
            return;
        };
        let saved = Saved::of(&self.order, &self.demoted());
        if let Err(e) = store
            .put_json(Tree::Adapt, key, &saved)
            .and_then(|()| store.flush())
        {
            log::warn!("ring node {}: saving the demotions: {e}", self.me);
        }
    }
}

/// What the head does with a request that waits for KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// It starts in the next step; its reservation is held.
    Admit,
    /// It waits until sequences end (or the members' figures come).
    Wait,
    /// It cannot fit even alone: the most positions a sequence can have.
    Never { limit: u64 },
}

/// The head's admission by KV: every member's capacity in positions, and
/// the positions each admitted request reserved.
pub(super) struct Admission {
    capacity: Vec<Option<u64>>,
    reserved: HashMap<u64, u64>,
    since: Instant,
    warned: bool,
}

impl Admission {
    pub fn new(members: usize) -> Admission {
        Admission {
            capacity: vec![None; members],
            reserved: HashMap::new(),
            since: Instant::now(),
            warned: false,
        }
    }

    /// Member `peer` can hold `positions` (`u64::MAX`: no limit).
    pub fn learn(&mut self, peer: usize, positions: u64) {
        if let Some(c) = self.capacity.get_mut(peer) {
            *c = Some(positions);
        }
    }

    /// The smallest member's capacity; `None` while a member's is not
    /// known (for at most [`CAPACITY_WAIT`]).
    fn ring_capacity(&mut self) -> Option<u64> {
        let known = self.capacity.iter().flatten().copied().min();
        if self.capacity.iter().all(Option::is_some) {
            return known;
        }
        if self.since.elapsed() < CAPACITY_WAIT {
            return None;
        }
        if !self.warned {
            self.warned = true;
            log::warn!(
                "ring head: {} member(s) never said their KV capacity; admitting by the others'",
                self.capacity.iter().filter(|c| c.is_none()).count()
            );
        }
        Some(known.unwrap_or(u64::MAX))
    }

    /// Whether request `id`, which can reach `end` positions, may start
    /// now; reserves them when it may.
    pub fn verdict(&mut self, id: u64, end: usize) -> Verdict {
        let Some(cap) = self.ring_capacity() else {
            return Verdict::Wait;
        };
        let need = blocks(end);
        if need > cap {
            return Verdict::Never { limit: cap };
        }
        let held: u64 = self.reserved.values().sum();
        if held + need > cap {
            return Verdict::Wait;
        }
        self.reserved.insert(id, need);
        Verdict::Admit
    }

    /// Request `id` ended: its reservation is free.
    pub fn release(&mut self, id: u64) {
        self.reserved.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_waits_for_every_member_then_for_room_in_order() {
        let mut a = Admission::new(3);
        a.learn(0, 1024);
        a.learn(2, u64::MAX);
        assert_eq!(a.verdict(1, 10), Verdict::Wait, "member 1 unknown");
        a.learn(1, 768);
        // Reservations are whole blocks of 256 positions.
        assert_eq!(a.verdict(1, 300), Verdict::Admit); // 512
        assert_eq!(a.verdict(2, 256), Verdict::Admit); // 256: 768 held
        assert_eq!(a.verdict(3, 1), Verdict::Wait);
        assert_eq!(a.verdict(4, 769), Verdict::Never { limit: 768 });
        a.release(1);
        assert_eq!(a.verdict(3, 1), Verdict::Admit);
        // A release of an unknown request changes nothing.
        a.release(99);
        assert_eq!(a.verdict(5, 300), Verdict::Wait);
    }

    #[test]
    fn admission_goes_on_with_the_known_figures_after_a_while() {
        let mut a = Admission::new(2);
        a.learn(0, 512);
        a.since = Instant::now() - CAPACITY_WAIT - Duration::from_secs(1);
        assert_eq!(a.verdict(1, 500), Verdict::Admit);
        assert_eq!(a.verdict(2, 1), Verdict::Wait);
    }

    #[test]
    fn blocks_round_up_to_the_cache_growth() {
        assert_eq!(blocks(1), 256);
        assert_eq!(blocks(256), 256);
        assert_eq!(blocks(257), 512);
        assert_eq!(blocks(0), 0);
    }

    #[test]
    fn saved_state_names_units_in_run_order() {
        let order = [
            Placed {
                unit: Unit::Attn(3),
                window: 0,
                planned: false,
            },
            Placed {
                unit: Unit::Mlp(3),
                window: 0,
                planned: true,
            },
            Placed {
                unit: Unit::Head,
                window: 1,
                planned: false,
            },
        ];
        let s = Saved::of(&order, &[Unit::Head]);
        assert_eq!(s.units, ["attn.3", "mlp.3", "head"]);
        assert_eq!(s.planned, ["mlp.3"]);
        assert_eq!(s.demoted, ["head"]);
    }
}
