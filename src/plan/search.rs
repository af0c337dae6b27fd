//! The allocation scheduler.
//!
//! # Plan space
//!
//! For `n` devices and a model of `U` units (decoder layers and the head),
//! a plan of the `loip` planner is
//! - a ring: `r ≥ 1` distinct devices in order (devices left out get
//!   nothing);
//! - a number of rounds `k ≥ 1` and `k·r` windows, window `w` on ring
//!   device `w mod r`, each of at least one unit, together covering the
//!   units in order; sizes are free, so they may differ between rounds;
//! - for every unit, resident or streamed;
//! - `K ∈ {1, 2, 4}` slots per device, [`Loading::Prefetch`];
//! - `m ∈ 1..=N` micro-batches for a target batch of `N`;
//!
//! such that every ring device's memory fits its budget. The objective is
//! the simulator's steady-state figure ([`super::Objective`]); for the
//! latency objective `m` does not change it, and is then chosen for the
//! best throughput.
//!
//! # Exact search on small instances
//!
//! When the space is small (at most 10^7 plans: 8 layers and the head on 3
//! devices for a batch of up to 3, for instance) the scheduler visits every ring, `k`, window sizes, `K`,
//! `m` and every residency that fits in memory (devices' residencies are
//! checked one device at a time, so the infeasible ones are never
//! combined). The latency objective is at least the time of one token's
//! trip through the chain of windows ([`sim::chain_bound`]), which does
//! not depend on residency, `K` or `m`: structures whose bound is no better
//! than the best plan found are skipped whole.
//!
//! # Heuristic search on large instances
//!
//! 1. A surrogate of the cost model gives, for a ring, `k`, `K` and `m`,
//!    the layer count of each device: with a period `T`, device `i` may
//!    take at most the units whose streaming (`s_i(n)·t_load`) and, for
//!    throughput, whose compute for all micro-batches fit in `T`; the rest
//!    go to the fastest devices first; a bisection finds the least `T`
//!    for which the chain of compute and hops also fits. Each device's
//!    units are split evenly over the rounds, and residency is filled
//!    greedily (stream the same number of units in each window, as few as
//!    memory allows, then keep units resident while they fit).
//! 2. The best few surrogate candidates are simulated; devices are dropped
//!    from the ring one at a time while that improves the objective.
//! 3. The ring and contiguous baselines' layouts are candidates too.
//! 4. Hill climbing on the simulated objective, from the best few distinct
//!    candidates: move a window boundary by one unit, move a streamed unit
//!    to the next or previous window of its device, swap two devices in
//!    the ring; a fixed budget of simulations bounds each climb.

use super::baseline;
use super::cost::Costs;
use super::placement::{Layout, Loading};
use super::sim;
use super::{Objective, PlanError, Planner};

/// How a plan was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SearchInfo {
    /// The whole plan space was searched: the plan is optimal.
    pub exhaustive: bool,
    /// Plans simulated.
    pub evaluations: usize,
}

/// Largest count of plans searched exhaustively: (ring, rounds, window
/// sizes) structures × choices of `K` and `m` × residencies (`2^U`). Memory
/// and the latency bound prune most; 8 layers on 3 devices take 0.1 s.
const EXHAUSTIVE_LIMIT: f64 = 1e7;
/// Candidates of the surrogate that are simulated per ring.
const SURROGATE_TOP: usize = 6;
/// Slot counts the search tries.
pub(crate) const SLOT_CHOICES: [u32; 3] = [1, 2, 4];
/// Simulations one hill climb may spend, and how many climbs start from
/// the best distinct candidates.
const CLIMB_BUDGET: usize = 2000;
const CLIMB_STARTS: usize = 4;

pub(crate) fn loip(costs: &Costs) -> Result<(Layout, SearchInfo), PlanError> {
    if costs.n_units() < 30
        && exhaustive_size(costs) * (1u64 << costs.n_units()) as f64 <= EXHAUSTIVE_LIMIT
    {
        exhaustive(costs)
    } else {
        heuristic(costs)
    }
}

fn throughput(costs: &Costs) -> bool {
    costs.problem().objective == Objective::Throughput
}

/// Micro-batch counts the search tries.
fn micro_batch_choices(costs: &Costs, r: usize, all: bool) -> Vec<u32> {
    let n = costs.problem().workload.batch();
    if !throughput(costs) {
        return vec![1];
    }
    if all {
        return (1..=n).collect();
    }
    let mut v: Vec<u32> = [1, 2, r as u32, 2 * r as u32, n]
        .into_iter()
        .filter(|&m| m >= 1 && m <= n)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn binomial(n: usize, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// Structures × K × m of the exhaustive search.
fn exhaustive_size(costs: &Costs) -> f64 {
    let (n, u) = (costs.n_devices(), costs.n_units());
    let mut total = 0.0;
    let mut perms = 1.0;
    for r in 1..=n.min(u) {
        perms *= (n - r + 1) as f64;
        let sizes: f64 = (1..=u / r).map(|k| binomial(u - 1, k * r - 1)).sum();
        total += perms * sizes;
    }
    total * SLOT_CHOICES.len() as f64 * micro_batch_choices(costs, 1, true).len() as f64
}

/// Calls `f` with every sequence of `r` distinct devices out of `n`.
fn for_each_ring(n: usize, r: usize, f: &mut impl FnMut(&[usize])) {
    fn rec(
        n: usize,
        r: usize,
        cur: &mut Vec<usize>,
        used: &mut [bool],
        f: &mut impl FnMut(&[usize]),
    ) {
        if cur.len() == r {
            f(cur);
            return;
        }
        for d in 0..n {
            if !used[d] {
                used[d] = true;
                cur.push(d);
                rec(n, r, cur, used, f);
                cur.pop();
                used[d] = false;
            }
        }
    }
    rec(n, r, &mut Vec::new(), &mut vec![false; n], f);
}

/// Calls `f` with every composition of `total` into `parts` parts ≥ 1.
fn for_each_composition(total: usize, parts: usize, f: &mut impl FnMut(&[usize])) {
    fn rec(left: usize, parts: usize, cur: &mut Vec<usize>, f: &mut impl FnMut(&[usize])) {
        if cur.len() + 1 == parts {
            cur.push(left);
            f(cur);
            cur.pop();
            return;
        }
        for s in 1..=left - (parts - cur.len() - 1) {
            cur.push(s);
            rec(left - s, parts, cur, f);
            cur.pop();
        }
    }
    if parts >= 1 && parts <= total {
        rec(total, parts, &mut Vec::new(), f);
    }
}

/// Every feasible residency of ring position `pos`, as lists of streamed
/// units, and the least memory any residency of it needs.
fn residency_options(costs: &Costs, layout: &Layout, pos: usize) -> (Vec<Vec<usize>>, u64) {
    let units: Vec<usize> = layout
        .windows_of(pos)
        .flat_map(|w| layout.units(w))
        .collect();
    let mut fixed = costs.scratch();
    for w in layout.windows_of(pos) {
        fixed += costs.kv_bytes(layout.units(w));
    }
    let budget = costs.budget(layout.ring[pos]);
    let mut options = Vec::new();
    let mut least = u64::MAX;
    for mask in 0u32..1 << units.len() {
        let (mut resident, mut largest) = (0, 0);
        for (i, &u) in units.iter().enumerate() {
            if mask >> i & 1 == 1 {
                largest = largest.max(costs.unit_bytes(u));
            } else {
                resident += costs.unit_bytes(u);
            }
        }
        let need = fixed + resident + layout.slots as u64 * largest;
        least = least.min(need);
        if need <= budget {
            options.push(
                units
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask >> i & 1 == 1)
                    .map(|(_, &u)| u)
                    .collect(),
            );
        }
    }
    (options, least)
}

/// Best plan so far and bookkeeping shared by both searches.
struct Best {
    layout: Option<Layout>,
    value: f64,
    evaluations: usize,
    /// Least total overflow over the structures seen (for `DoesNotFit`).
    overflow: u64,
}

impl Best {
    fn new() -> Best {
        Best {
            layout: None,
            value: f64::INFINITY,
            evaluations: 0,
            overflow: u64::MAX,
        }
    }

    /// Simulates `layout` (which must fit) and keeps it if better.
    fn offer(&mut self, costs: &Costs, layout: &Layout) -> f64 {
        self.evaluations += 1;
        let v = sim::objective(costs, layout);
        if v < self.value {
            self.value = v;
            self.layout = Some(layout.clone());
        }
        v
    }

    fn finish(self, costs: &Costs, exhaustive: bool) -> Result<(Layout, SearchInfo), PlanError> {
        let info = SearchInfo {
            exhaustive,
            evaluations: self.evaluations,
        };
        match self.layout {
            Some(mut l) => {
                if !throughput(costs) {
                    choose_micro_batches(costs, &mut l);
                }
                Ok((l, info))
            }
            None => Err(does_not_fit(costs, Planner::Loip, self.overflow)),
        }
    }
}

pub(crate) fn does_not_fit(costs: &Costs, planner: Planner, overflow: u64) -> PlanError {
    let p = costs.problem();
    let budgets: u64 = p.devices.iter().map(|d| d.memory_budget_bytes).sum();
    PlanError::DoesNotFit {
        planner,
        shortfall_bytes: overflow.max(1),
        detail: format!(
            "{} needs {} bytes of weights and {} bytes of KV cache for {} × {} tokens; \
             the {} devices have {} bytes",
            p.model.name,
            p.model.placed_bytes(),
            costs.kv_bytes(0..costs.n_units()),
            p.workload.batch(),
            p.workload.context_tokens,
            p.devices.len(),
            budgets
        ),
    }
}

/// For the latency objective: the micro-batching with the best throughput
/// (it does not change the objective).
pub(crate) fn choose_micro_batches(costs: &Costs, layout: &mut Layout) {
    let n = costs.problem().workload.batch();
    let mut best = (f64::INFINITY, 1);
    let r = layout.ring.len() as u32;
    let mut choices: Vec<u32> = [1, 2, r, 2 * r, n]
        .into_iter()
        .filter(|&m| m >= 1 && m <= n)
        .collect();
    choices.dedup();
    for m in choices {
        layout.micro_batches = m;
        let v = sim::throughput_objective(costs, layout);
        if v < best.0 {
            best = (v, m);
        }
    }
    layout.micro_batches = best.1;
}

fn exhaustive(costs: &Costs) -> Result<(Layout, SearchInfo), PlanError> {
    let (n, u) = (costs.n_devices(), costs.n_units());
    let mut best = Best::new();
    let latency = !throughput(costs);
    for r in 1..=n.min(u) {
        for_each_ring(n, r, &mut |ring| {
            for k in 1..=u / r {
                for_each_composition(u, k * r, &mut |sizes| {
                    let bound = sim::chain_bound(
                        costs,
                        &Layout::ring(ring.to_vec(), sizes, 1, Loading::Prefetch),
                    );
                    if latency && bound >= best.value {
                        return;
                    }
                    for slots in SLOT_CHOICES {
                        let mut layout =
                            Layout::ring(ring.to_vec(), sizes, slots, Loading::Prefetch);
                        let mut options = Vec::with_capacity(r);
                        let mut overflow = 0;
                        for (pos, &dev) in ring.iter().enumerate() {
                            let (opts, least) = residency_options(costs, &layout, pos);
                            overflow += least.saturating_sub(costs.budget(dev));
                            options.push(opts);
                        }
                        best.overflow = best.overflow.min(overflow);
                        if options.iter().any(Vec::is_empty) {
                            continue;
                        }
                        let mut pick = vec![0usize; r];
                        loop {
                            layout.streamed.iter_mut().for_each(|s| *s = false);
                            for pos in 0..r {
                                for &unit in &options[pos][pick[pos]] {
                                    layout.streamed[unit] = true;
                                }
                            }
                            for m in micro_batch_choices(costs, r, true) {
                                layout.micro_batches = m;
                                best.offer(costs, &layout);
                            }
                            let mut i = 0;
                            while i < r && pick[i] + 1 == options[i].len() {
                                pick[i] = 0;
                                i += 1;
                            }
                            if i == r {
                                break;
                            }
                            pick[i] += 1;
                        }
                    }
                });
            }
        });
    }
    best.finish(costs, true)
}

/// Fills the residency of ring position `pos` greedily: stream units one
/// at a time, taking the last resident unit of each window in turn (so
/// that streaming spreads over the windows and each streamed unit has the
/// window's earlier units to hide its read behind), until the device fits;
/// then keep units resident again while they fit. False when nothing fits.
pub(crate) fn fill_residency(costs: &Costs, layout: &mut Layout, pos: usize) -> bool {
    let windows: Vec<usize> = layout.windows_of(pos).collect();
    let budget = costs.budget(layout.ring[pos]);
    for &w in &windows {
        for u in layout.units(w) {
            layout.streamed[u] = false;
        }
    }
    let total: usize = windows.iter().map(|&w| layout.units(w).len()).sum();
    let mut streamed = 0;
    while costs.memory(layout, pos).total() > budget {
        if streamed == total {
            return false;
        }
        for &w in &windows {
            if let Some(u) = layout.units(w).rev().find(|&u| !layout.streamed[u]) {
                layout.streamed[u] = true;
                streamed += 1;
                if costs.memory(layout, pos).total() <= budget {
                    break;
                }
            }
        }
    }
    maximize_residency(costs, layout, pos, &windows);
    true
}

fn maximize_residency(costs: &Costs, layout: &mut Layout, pos: usize, windows: &[usize]) {
    let budget = costs.budget(layout.ring[pos]);
    loop {
        // Windows by streamed bytes, most first.
        let mut order: Vec<(u64, usize)> = windows
            .iter()
            .map(|&w| {
                let b = layout
                    .units(w)
                    .filter(|&u| layout.streamed[u])
                    .map(|u| costs.unit_bytes(u))
                    .sum();
                (b, w)
            })
            .filter(|&(b, _)| b > 0)
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut changed = false;
        for (_, w) in order {
            let u = layout
                .units(w)
                .find(|&u| layout.streamed[u])
                .expect("window streams");
            layout.streamed[u] = false;
            if costs.memory(layout, pos).total() <= budget {
                changed = true;
                break;
            }
            layout.streamed[u] = true;
        }
        if !changed {
            return;
        }
    }
}

/// Greedy residency for every device; false when a device cannot fit.
pub(crate) fn fill_all(costs: &Costs, layout: &mut Layout) -> bool {
    (0..layout.ring.len()).all(|pos| fill_residency(costs, layout, pos))
}

/// Window sizes when ring position `p` takes `n[p]` units over `k`
/// rounds, the larger windows first.
fn round_sizes(n: &[usize], k: usize) -> Vec<usize> {
    let r = n.len();
    (0..k * r)
        .map(|w| n[w % r] / k + usize::from(w / r < n[w % r] % k))
        .collect()
}

/// Per-device figures of the surrogate.
struct DeviceFigures {
    per_layer: f64,
    head: f64,
    load_per_layer: f64,
    avail: f64,
}

/// The surrogate of the module docs: least period `T` and units per ring
/// position for a ring, `k`, `K` and `m`.
fn surrogate(
    costs: &Costs,
    ring: &[usize],
    k: usize,
    slots: u32,
    m: u32,
) -> Option<(f64, Vec<usize>)> {
    let p = costs.problem();
    let u = costs.n_units();
    let layers = u - 1;
    let r = ring.len();
    if r * k > u {
        return None;
    }
    let through = throughput(costs);
    let n_batch = p.workload.batch();
    let b = if through { n_batch.div_ceil(m) } else { 1 };
    let ctx = p.workload.context_tokens as u64;
    let ub = costs.bytes(0..layers) as f64 / layers as f64;
    let hb = costs.unit_bytes(layers) as f64;
    let kvu = costs.kv_bytes(0..layers) as f64 / layers as f64;
    let figures: Vec<DeviceFigures> = ring
        .iter()
        .map(|&d| DeviceFigures {
            per_layer: costs.compute(d, 0..layers, b, b as u64 * ctx) / layers as f64,
            head: costs.compute(d, layers..u, b, 0),
            load_per_layer: costs.load(d, ub as u64, 1),
            avail: costs.budget(d) as f64 - costs.scratch() as f64,
        })
        .collect();
    // Per position and unit count: (compute per micro-batch, bound).
    let per_n: Vec<Vec<(f64, f64)>> = figures
        .iter()
        .enumerate()
        .map(|(pos, f)| {
            let tail = pos == r - 1;
            (0..=u)
                .map(|n| {
                    if n < k || (tail && n < 1) {
                        return (0.0, f64::INFINITY);
                    }
                    let lay = if tail { n - 1 } else { n };
                    let bytes = lay as f64 * ub + if tail { hb } else { 0.0 };
                    let kv = lay as f64 * kvu;
                    let compute = lay as f64 * f.per_layer + if tail { f.head } else { 0.0 };
                    // Fewest streamed units that fit beside K slots.
                    let streamed = if bytes + kv <= f.avail {
                        Some(0.0)
                    } else {
                        let need = ((bytes + slots as f64 * ub + kv - f.avail) / ub)
                            .ceil()
                            .max(1.0);
                        (need <= n as f64).then_some(need)
                    };
                    match streamed {
                        None => (compute, f64::INFINITY),
                        Some(s) => {
                            let load = s * f.load_per_layer;
                            let bound = if through {
                                load.max(m as f64 * compute)
                            } else {
                                load
                            };
                            (compute, bound)
                        }
                    }
                })
                .collect()
        })
        .collect();
    let hop = {
        let mut t = 0.0;
        for w in 0..k * r {
            let (a, bdev) = (ring[w % r], ring[(w + 1) % r]);
            if a != bdev {
                let l = costs.link(a, bdev);
                let bytes = if w + 1 < k * r {
                    b as u64 * p.model.hidden as u64 * 4
                } else {
                    4 * b as u64
                };
                t += l.busy_seconds(bytes) + l.latency_s;
            }
        }
        t
    };
    let assign = |t: f64| -> Option<Vec<usize>> {
        let mut hi = vec![0usize; r];
        for pos in 0..r {
            hi[pos] = (k..=u).rev().find(|&n| per_n[pos][n].1 <= t)?;
        }
        if hi.iter().sum::<usize>() < u {
            return None;
        }
        let mut n = vec![k; r];
        let mut left = u - k * r;
        let mut order: Vec<usize> = (0..r).collect();
        order.sort_by(|&a, &b| figures[a].per_layer.total_cmp(&figures[b].per_layer));
        for pos in order {
            let add = left.min(hi[pos] - n[pos]);
            n[pos] += add;
            left -= add;
        }
        let chain: f64 = (0..r).map(|pos| per_n[pos][n[pos]].0).sum::<f64>() + hop;
        (chain <= t).then_some(n)
    };
    let mut hi = 1.0;
    while assign(hi).is_none() {
        hi *= 2.0;
        if hi > 1e9 {
            return None;
        }
    }
    let mut lo = 0.0;
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if assign(mid).is_some() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    assign(hi).map(|n| (hi, n))
}

/// Best layout the surrogate finds for one ring, simulated.
fn best_for_ring(costs: &Costs, ring: &[usize], best: &mut Best) -> Option<(Layout, f64)> {
    let u = costs.n_units();
    let r = ring.len();
    let mut cands = Vec::new();
    let mut fallbacks = Vec::new();
    for k in 1..=u / r {
        for slots in SLOT_CHOICES {
            for m in micro_batch_choices(costs, r, false) {
                if let Some((t, n)) = surrogate(costs, ring, k, slots, m) {
                    cands.push((t, k, slots, m, n));
                }
            }
            // The budget-proportional form of this structure: a candidate
            // where the surrogate's figures are too coarse, and its
            // all-streamed memory for `DoesNotFit`.
            let share: Vec<usize> = proportional(costs, ring, u, k);
            let mut l = Layout::ring(
                ring.to_vec(),
                &round_sizes(&share, k),
                slots,
                Loading::Prefetch,
            );
            l.streamed.iter_mut().for_each(|s| *s = true);
            best.overflow = best.overflow.min(costs.overflow(&l));
            fallbacks.push(l);
        }
    }
    cands.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut found: Option<(Layout, f64)> = None;
    let mut tried = 0;
    let layouts = cands.into_iter().map(|(_, k, slots, m, n)| {
        let mut layout = Layout::ring(ring.to_vec(), &round_sizes(&n, k), slots, Loading::Prefetch);
        layout.micro_batches = m;
        layout
    });
    for mut layout in layouts.chain(fallbacks) {
        if tried == SURROGATE_TOP {
            break;
        }
        if !fill_all(costs, &mut layout) {
            continue;
        }
        tried += 1;
        let v = best.offer(costs, &layout);
        if found.as_ref().is_none_or(|f| v < f.1) {
            found = Some((layout, v));
        }
    }
    found
}

/// Units per ring position in proportion to memory budgets, at least `k`
/// each (largest remainders).
pub(crate) fn proportional(costs: &Costs, ring: &[usize], u: usize, k: usize) -> Vec<usize> {
    let r = ring.len();
    let total: f64 = ring.iter().map(|&d| costs.budget(d) as f64).sum();
    let spare = u - k * r;
    let exact: Vec<f64> = ring
        .iter()
        .map(|&d| spare as f64 * costs.budget(d) as f64 / total)
        .collect();
    let mut n: Vec<usize> = exact.iter().map(|&x| k + x.floor() as usize).collect();
    let mut rest: Vec<usize> = (0..r).collect();
    rest.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    let mut left = u - n.iter().sum::<usize>();
    for pos in rest.into_iter().cycle() {
        if left == 0 {
            break;
        }
        n[pos] += 1;
        left -= 1;
    }
    n
}

/// Devices by memory budget, largest first.
fn by_memory_order(costs: &Costs) -> Vec<usize> {
    let mut v: Vec<usize> = (0..costs.n_devices()).collect();
    v.sort_by(|&a, &b| costs.budget(b).cmp(&costs.budget(a)).then(a.cmp(&b)));
    v
}

pub(crate) fn heuristic(costs: &Costs) -> Result<(Layout, SearchInfo), PlanError> {
    let n = costs.n_devices();
    let mut best = Best::new();
    // Start from all devices, in the given order and by memory.
    let by_memory = by_memory_order(costs);
    let mut current: Option<(Layout, f64)> = None;
    // Starting points of the hill climbing, besides the final ring.
    let mut starts: Vec<(Layout, f64)> = Vec::new();
    for order in [(0..n).collect::<Vec<_>>(), by_memory] {
        let ring: Vec<usize> = order.into_iter().take(costs.n_units()).collect();
        if let Some(c) = best_for_ring(costs, &ring, &mut best) {
            starts.push(c.clone());
            if current.as_ref().is_none_or(|b| c.1 < b.1) {
                current = Some(c);
            }
        }
    }
    // Baselines' layouts, with prefetch, as candidates.
    for mut l in [
        baseline::ring_layout(costs),
        baseline::contiguous_layout(costs),
    ]
    .into_iter()
    .flatten()
    {
        l.loading = Loading::Prefetch;
        for m in micro_batch_choices(costs, l.ring.len(), false) {
            l.micro_batches = m;
            if costs.check_memory(&l).is_ok() {
                let v = best.offer(costs, &l);
                starts.push((l.clone(), v));
                if current.as_ref().is_none_or(|b| v < b.1) {
                    current = Some((l.clone(), v));
                }
            }
        }
    }
    // Nothing fits on every device: leave devices out, the one with the
    // smallest budget first, until something fits.
    let mut set = by_memory_order(costs);
    while current.is_none() && set.len() > 1 {
        for drop in 0..set.len() {
            let ring: Vec<usize> = set
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != drop)
                .map(|(_, &d)| d)
                .collect();
            if let Some(c) = best_for_ring(costs, &ring, &mut best) {
                if current.as_ref().is_none_or(|b| c.1 < b.1) {
                    current = Some(c);
                }
            }
        }
        set.pop();
    }
    // Drop devices while that helps.
    while let Some((layout, value)) = current.clone() {
        if layout.ring.len() == 1 {
            break;
        }
        let mut improved: Option<(Layout, f64)> = None;
        for drop in 0..layout.ring.len() {
            let ring: Vec<usize> = layout
                .ring
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != drop)
                .map(|(_, &d)| d)
                .collect();
            if let Some(c) = best_for_ring(costs, &ring, &mut best) {
                if c.1 < improved.as_ref().map_or(value, |b| b.1) {
                    improved = Some(c);
                }
            }
        }
        match improved {
            Some(c) => current = Some(c),
            None => break,
        }
    }
    if let Some(c) = current {
        starts.push(c);
    }
    starts.sort_by(|a, b| b.1.total_cmp(&a.1));
    starts.dedup_by(|a, b| a.0 == b.0);
    for (layout, value) in starts.into_iter().rev().take(CLIMB_STARTS) {
        climb(costs, layout, value, &mut best);
    }
    best.finish(costs, false)
}

/// Hill climbing on the simulated objective (module docs, step 4).
fn climb(costs: &Costs, mut layout: Layout, mut value: f64, best: &mut Best) {
    let start = best.evaluations;
    let try_move = |cand: Layout, layout: &mut Layout, value: &mut f64, best: &mut Best| -> bool {
        if costs.check_memory(&cand).is_err() {
            return false;
        }
        let v = best.offer(costs, &cand);
        if v < *value * (1.0 - 1e-9) {
            *layout = cand;
            *value = v;
            true
        } else {
            false
        }
    };
    'outer: loop {
        if best.evaluations - start >= CLIMB_BUDGET {
            return;
        }
        let nw = layout.n_windows();
        // Move a window boundary by one unit.
        for w in 0..nw - 1 {
            for grow_left in [true, false] {
                let mut cand = layout.clone();
                let b = cand.bounds[w + 1];
                let nb = if grow_left { b + 1 } else { b - 1 };
                if nb <= cand.bounds[w] || nb >= cand.bounds[w + 2] {
                    continue;
                }
                cand.bounds[w + 1] = nb;
                let (pa, pb) = (cand.win_pos[w], cand.win_pos[w + 1]);
                if !(fill_residency(costs, &mut cand, pa) && fill_residency(costs, &mut cand, pb)) {
                    continue;
                }
                if try_move(cand, &mut layout, &mut value, best) {
                    continue 'outer;
                }
                if best.evaluations - start >= CLIMB_BUDGET {
                    return;
                }
            }
        }
        // Move one streamed unit to the next or previous window of its device.
        for pos in 0..layout.ring.len() {
            let windows: Vec<usize> = layout.windows_of(pos).collect();
            for i in 0..windows.len() {
                for j in [i.wrapping_sub(1), i + 1] {
                    let (Some(&from), Some(&to)) = (windows.get(i), windows.get(j)) else {
                        continue;
                    };
                    let mut cand = layout.clone();
                    let Some(a) = cand.units(from).find(|&u| cand.streamed[u]) else {
                        continue;
                    };
                    let Some(b) = cand.units(to).rev().find(|&u| !cand.streamed[u]) else {
                        continue;
                    };
                    cand.streamed[a] = false;
                    cand.streamed[b] = true;
                    if try_move(cand, &mut layout, &mut value, best) {
                        continue 'outer;
                    }
                    if best.evaluations - start >= CLIMB_BUDGET {
                        return;
                    }
                }
            }
        }
        // Swap two devices in the ring.
        let r = layout.ring.len();
        for a in 0..r {
            for b in a + 1..r {
                let mut cand = layout.clone();
                cand.ring.swap(a, b);
                if !(fill_residency(costs, &mut cand, a) && fill_residency(costs, &mut cand, b)) {
                    continue;
                }
                if try_move(cand, &mut layout, &mut value, best) {
                    continue 'outer;
                }
                if best.evaluations - start >= CLIMB_BUDGET {
                    return;
                }
            }
        }
        return;
    }
}
