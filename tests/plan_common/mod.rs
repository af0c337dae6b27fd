//! Helpers shared by the plan tests: random small problems and the
//! brute-force enumeration of the `loip` plan space.
#![allow(dead_code)]

use std::collections::BTreeMap;

use loip::model::dtype::GgmlType;
use loip::plan::{
    objective_value, ComputeModel, DeviceProfile, Link, Loading, ModelShape, Network, Objective,
    Pattern, Plan, PlanError, Planner, Problem, StorageProfile, UnitShape, WeightBytes, WeightRate,
    Window, Workload,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn device(name: &str, budget: u64, read_bytes_per_s: f64, s_per_byte: f64) -> DeviceProfile {
    DeviceProfile {
        name: name.to_string(),
        memory_budget_bytes: budget,
        storage: StorageProfile {
            read_bytes_per_s,
            read_latency_s: 1e-4,
        },
        compute: ComputeModel {
            layer_overhead_s: 5e-5,
            per_token_s: 1e-6,
            kv_s_per_byte: s_per_byte,
            weights: BTreeMap::from([(
                "default".to_string(),
                WeightRate {
                    s_per_byte,
                    s_per_byte_token: s_per_byte / 50.0,
                },
            )]),
            roofline_exponent: None,
            token_factors: BTreeMap::new(),
        },
    }
}

pub fn unit(bytes: u64, kv: u64) -> UnitShape {
    UnitShape {
        weights: vec![WeightBytes {
            dtype: GgmlType::BF16,
            bytes,
        }],
        kv_bytes_per_token: kv,
    }
}

pub fn model(layer_bytes: &[u64], head_bytes: u64) -> ModelShape {
    ModelShape {
        name: "test".into(),
        hidden: 256,
        layers: layer_bytes.iter().map(|&b| unit(b, 2048)).collect(),
        head: unit(head_bytes, 0),
        embedding_row_bytes: 512,
        scratch_bytes_per_token: 4096,
        scratch_bytes_per_token_ctx: 16,
    }
}

pub fn small_workload(pattern: Pattern) -> Workload {
    Workload {
        pattern,
        prompt_tokens: 8,
        output_tokens: 4,
        context_tokens: 64,
        prefill_chunk: 8,
    }
}

/// A random problem of `n_dev` devices and `n_layers` layers.
pub fn random_problem(seed: u64, n_dev: usize, n_layers: usize) -> Problem {
    let mut rng = StdRng::seed_from_u64(seed);
    const MB: u64 = 1 << 20;
    // Two sizes of layers at most, so that equal sizes occur.
    let sizes = [rng.random_range(2..6) * MB, rng.random_range(2..6) * MB];
    let layers: Vec<u64> = (0..n_layers)
        .map(|_| sizes[rng.random_range(0..2)])
        .collect();
    let head = rng.random_range(1..4) * MB;
    let m = model(&layers, head);
    let total = m.placed_bytes();
    let devices: Vec<DeviceProfile> = (0..n_dev)
        .map(|i| {
            let share = total as f64 / n_dev as f64 * rng.random_range(0.3..1.6);
            device(
                &format!("d{i}"),
                share as u64 + 2 * MB,
                rng.random_range(0.2e9..3e9),
                rng.random_range(2e-11..4e-10),
            )
        })
        .collect();
    let mut net = Network::uniform(Link {
        bandwidth_bps: rng.random_range(5e7..1e9),
        latency_s: rng.random_range(0.0..2e-3),
    });
    if n_dev >= 2 && rng.random_bool(0.3) {
        net = net.with_link(
            0,
            1,
            Link {
                bandwidth_bps: 1e6,
                latency_s: 0.05,
            },
        );
    }
    let pattern = if rng.random_bool(0.5) {
        Pattern::Sporadic
    } else {
        Pattern::Bursty(rng.random_range(2..4))
    };
    let mut p = Problem::new(devices, net, m, small_workload(pattern));
    if rng.random_bool(0.3) {
        p.objective = match p.objective {
            Objective::Latency => Objective::Throughput,
            Objective::Throughput => Objective::Latency,
        };
    }
    p
}

/// KV budget of each ring device, as a plan states it.
fn kv_budgets(p: &Problem, ring_len: usize, windows: &[Window]) -> Vec<u64> {
    let tokens = p.workload.batch() as u64 * p.workload.context_tokens as u64;
    (0..ring_len)
        .map(|pos| {
            windows
                .iter()
                .filter(|w| w.device == pos)
                .flat_map(|w| w.units.clone())
                .map(|u| tokens * p.model.unit(u as usize).kv_bytes_per_token)
                .sum()
        })
        .collect()
}

fn rings(n: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    fn rec(n: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if !cur.is_empty() {
            out.push(cur.clone());
        }
        for d in 0..n {
            if !cur.contains(&d) {
                cur.push(d);
                rec(n, cur, out);
                cur.pop();
            }
        }
    }
    rec(n, &mut Vec::new(), &mut out);
    out
}

fn compositions(total: usize, parts: usize) -> Vec<Vec<usize>> {
    if parts == 1 {
        return vec![vec![total]];
    }
    let mut out = Vec::new();
    for first in 1..=total.saturating_sub(parts - 1) {
        for mut rest in compositions(total - first, parts - 1) {
            rest.insert(0, first);
            out.push(rest);
        }
    }
    out
}

/// The best objective over every plan of the `loip` plan space (see
/// `src/plan/search.rs`), naively: every ring, rounds, window sizes,
/// residency subset, slot count and micro-batch count. `None` when none
/// fits.
pub fn brute_force(p: &Problem) -> Option<(f64, Plan)> {
    let u = p.model.n_units();
    let n = p.devices.len();
    let batch = p.workload.batch();
    let mut best: Option<(f64, Plan)> = None;
    for ring in rings(n) {
        let r = ring.len();
        for k in 1..=u / r {
            for sizes in compositions(u, k * r) {
                for slots in [1, 2, 4] {
                    for mask in 0u32..1 << u {
                        let mut windows = Vec::new();
                        let mut start = 0u32;
                        for (w, &s) in sizes.iter().enumerate() {
                            let units = start..start + s as u32;
                            windows.push(Window {
                                device: w % r,
                                streamed: units.clone().map(|x| mask >> x & 1 == 1).collect(),
                                units,
                            });
                            start += s as u32;
                        }
                        for m in 1..=batch {
                            let plan = Plan {
                                epoch: 0,
                                planner: Planner::Loip,
                                ring: ring.iter().map(|&d| p.devices[d].name.clone()).collect(),
                                kv_budget_bytes: kv_budgets(p, r, &windows),
                                windows: windows.clone(),
                                slots,
                                loading: Loading::Prefetch,
                                micro_batches: m,
                                batch,
                                context_tokens: p.workload.context_tokens,
                            };
                            match objective_value(&plan, p) {
                                Ok(v) => {
                                    if best.as_ref().is_none_or(|b| v < b.0) {
                                        best = Some((v, plan));
                                    }
                                }
                                Err(PlanError::OverBudget { .. }) => break,
                                Err(e) => panic!("brute force built an invalid plan: {e}"),
                            }
                        }
                    }
                }
            }
        }
    }
    best
}
