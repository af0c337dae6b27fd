//! The simulator against hand-computed cases.

mod plan_common;

use loip::plan::{
    objective_value, simulate, Link, Loading, Network, Objective, Pattern, Plan, PlanError,
    Planner, Problem, Window,
};
use plan_common::*;

const MB: u64 = 1 << 20;

/// A plan over `windows` (device index, units, streamed flags) for `p`.
fn plan_of(
    p: &Problem,
    ring: &[&str],
    windows: Vec<(usize, std::ops::Range<u32>, Vec<bool>)>,
    slots: u32,
    m: u32,
) -> Plan {
    let tokens = p.workload.batch() as u64 * p.workload.context_tokens as u64;
    let windows: Vec<Window> = windows
        .into_iter()
        .map(|(device, units, streamed)| Window {
            device,
            units,
            streamed,
        })
        .collect();
    let kv = (0..ring.len())
        .map(|pos| {
            windows
                .iter()
                .filter(|w| w.device == pos)
                .flat_map(|w| w.units.clone())
                .map(|u| tokens * p.model.unit(u as usize).kv_bytes_per_token)
                .sum()
        })
        .collect();
    Plan {
        epoch: 1,
        planner: Planner::Loip,
        ring: ring.iter().map(|s| s.to_string()).collect(),
        windows,
        kv_budget_bytes: kv,
        slots,
        loading: Loading::Prefetch,
        micro_batches: m,
        batch: p.workload.batch(),
        context_tokens: p.workload.context_tokens,
    }
}

fn net() -> Network {
    Network::uniform(Link {
        bandwidth_bps: 1e9,
        latency_s: 1e-3,
    })
}

#[test]
fn resident_single_device_tpot_is_the_sum_of_unit_times() {
    let m = model(&[4 * MB; 4], 2 * MB);
    let d = device("solo", 1 << 30, 1e9, 1e-10);
    let p = Problem::new(
        vec![d.clone()],
        net(),
        m.clone(),
        small_workload(Pattern::Sporadic),
    );
    let plan = plan_of(&p, &["solo"], vec![(0, 0..5, vec![false; 5])], 1, 1);
    let pred = simulate(&plan, &p).unwrap();
    let w = p.workload;
    // Decode step s: one token attending prompt + s positions, plus the
    // embedding row read (through the page cache: no request latency).
    let step = |s: u32| -> f64 {
        let units: f64 = (0..5)
            .map(|u| {
                d.compute
                    .unit_seconds(m.unit(u), 1, (w.prompt_tokens + s) as u64)
                    .unwrap()
            })
            .sum();
        units + d.storage.read_seconds(m.embedding_row_bytes, 0)
    };
    let want = (1..w.output_tokens).map(step).sum::<f64>() / (w.output_tokens - 1) as f64;
    assert!(
        (pred.tpot_s - want).abs() < 1e-12 * want,
        "{} vs {want}",
        pred.tpot_s
    );
    assert_eq!(pred.devices[0].stall_s, 0.0);
    assert_eq!(pred.devices[0].loader_busy_s, 0.0);
    assert!((pred.decode_tok_s - 1.0 / pred.tpot_s).abs() < 1e-9 / pred.tpot_s);
}

#[test]
fn streaming_slower_than_compute_adds_bubbles() {
    let m = model(&[4 * MB; 4], 2 * MB);
    // Reading a 4 MiB unit takes ~42 ms; computing it ~0.4 ms.
    let d = device("solo", 1 << 30, 1e8, 1e-10);
    let p = Problem::new(vec![d.clone()], net(), m, small_workload(Pattern::Sporadic));
    let resident = simulate(
        &plan_of(&p, &["solo"], vec![(0, 0..5, vec![false; 5])], 1, 1),
        &p,
    )
    .unwrap();
    let streamed = vec![false, true, false, true, false];
    let pred = simulate(&plan_of(&p, &["solo"], vec![(0, 0..5, streamed)], 1, 1), &p).unwrap();
    assert!(pred.devices[0].stall_s > 0.0);
    // Two reads per token, one at a time: the loader bounds the step.
    let per_token_reads = 2.0 * d.storage.read_seconds(4 * MB, 1);
    assert!(
        pred.tpot_s >= per_token_reads * 0.999,
        "{} < {per_token_reads}",
        pred.tpot_s
    );
    assert!(pred.tpot_s > 10.0 * resident.tpot_s);
    // Fast storage hides the reads behind compute: no bubbles after the
    // first step beyond the unit's own read.
    let fast = device("solo", 1 << 30, 1e12, 1e-10);
    let p2 = Problem::new(vec![fast], net(), p.model.clone(), p.workload);
    let pf = simulate(
        &plan_of(
            &p2,
            &["solo"],
            vec![(0, 0..5, vec![false, true, false, true, false])],
            2,
            1,
        ),
        &p2,
    )
    .unwrap();
    assert!(pf.tpot_s < resident.tpot_s * 1.05);
}

#[test]
fn more_micro_batches_raise_throughput_until_saturation() {
    let m = model(&[4 * MB; 6], 2 * MB);
    // Arithmetic-bound devices: splitting the batch costs nothing but the
    // per-micro-batch overhead (memory-bound ones would re-read weights).
    let devices: Vec<_> = (0..3)
        .map(|i| {
            let mut d = device(&format!("d{i}"), 1 << 30, 1e9, 1e-9);
            d.compute
                .weights
                .get_mut("default")
                .unwrap()
                .s_per_byte_token = 1e-9;
            d
        })
        .collect();
    let mut w = small_workload(Pattern::Bursty(12));
    w.output_tokens = 6;
    let mut p = Problem::new(devices, net(), m, w);
    p.objective = Objective::Throughput;
    let mut tok_s = Vec::new();
    for mbs in [1, 2, 3, 6, 12] {
        let plan = plan_of(
            &p,
            &["d0", "d1", "d2"],
            vec![
                (0, 0..2, vec![false; 2]),
                (1, 2..4, vec![false; 2]),
                (2, 4..7, vec![false; 3]),
            ],
            1,
            mbs,
        );
        tok_s.push(1.0 / objective_value(&plan, &p).unwrap());
        assert!(simulate(&plan, &p).unwrap().decode_tok_s > 0.0);
    }
    assert!(tok_s[1] > tok_s[0] * 1.3, "{tok_s:?}");
    assert!(tok_s[2] > tok_s[1] * 1.1, "{tok_s:?}");
    // Three devices: past three micro-batches there is no idle device to fill.
    assert!(
        tok_s[3] < tok_s[2] * 1.15 && tok_s[4] < tok_s[2] * 1.15,
        "{tok_s:?}"
    );
}

#[test]
fn memory_grows_with_the_kv_cache_and_stays_in_budget() {
    let m = model(&[4 * MB; 4], 2 * MB);
    let p = Problem::new(
        vec![
            device("a", 64 * MB, 1e9, 1e-10),
            device("b", 64 * MB, 1e9, 1e-10),
        ],
        net(),
        m,
        small_workload(Pattern::Bursty(3)),
    );
    let (plan, pred) = loip::plan::plan(Planner::Loip, &p).unwrap();
    for d in &pred.devices {
        let first = d.timeline.first().unwrap().bytes;
        let last = d.timeline.last().unwrap().bytes;
        assert!(last > first, "{}: KV must grow", d.name);
        assert!(d
            .timeline
            .windows(2)
            .all(|w| w[1].bytes >= w[0].bytes && w[1].t_s >= w[0].t_s));
        assert!(last <= d.memory.total() && d.memory.total() <= d.budget_bytes);
    }
    // Plans travel as JSON and come back the same.
    let json = serde_json::to_string(&plan).unwrap();
    let back: Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
    assert_eq!(simulate(&back, &p).unwrap(), pred);
}

#[test]
fn slower_links_cost_time() {
    let m = model(&[4 * MB; 4], 2 * MB);
    let devices: Vec<_> = (0..2)
        .map(|i| device(&format!("d{i}"), 1 << 30, 1e9, 1e-10))
        .collect();
    let mut tpot = Vec::new();
    for bw in [1e9, 1e8, 1e7] {
        let net = Network::uniform(Link {
            bandwidth_bps: bw,
            latency_s: 1e-3,
        });
        let p = Problem::new(
            devices.clone(),
            net,
            m.clone(),
            small_workload(Pattern::Sporadic),
        );
        let plan = plan_of(
            &p,
            &["d0", "d1"],
            vec![(0, 0..2, vec![false; 2]), (1, 2..5, vec![false; 3])],
            1,
            1,
        );
        tpot.push(simulate(&plan, &p).unwrap().tpot_s);
    }
    assert!(tpot[0] < tpot[1] && tpot[1] < tpot[2], "{tpot:?}");
    // 1 KiB of activation (256 f32) from d0 to d1 at 10 Mbit/s: 0.8 ms.
    assert!(tpot[2] - tpot[0] > 1024.0 * 8.0 / 1e7 * 0.99, "{tpot:?}");
}

#[test]
fn malformed_plans_are_refused() {
    let m = model(&[4 * MB; 4], 2 * MB);
    let p = Problem::new(
        vec![device("a", 1 << 30, 1e9, 1e-10)],
        net(),
        m,
        small_workload(Pattern::Sporadic),
    );
    let good = plan_of(&p, &["a"], vec![(0, 0..5, vec![false; 5])], 1, 1);
    simulate(&good, &p).unwrap();
    let mut cases = Vec::new();
    let mut b = good.clone();
    b.windows[0].units = 0..4;
    b.windows[0].streamed.pop();
    cases.push(b);
    let mut b = good.clone();
    b.windows[0].device = 3;
    cases.push(b);
    let mut b = good.clone();
    b.ring = vec!["nobody".into()];
    cases.push(b);
    let mut b = good.clone();
    b.windows[0].streamed.push(true);
    cases.push(b);
    let mut b = good.clone();
    b.slots = 0;
    cases.push(b);
    let mut b = good.clone();
    b.micro_batches = 2;
    cases.push(b);
    let mut b = good.clone();
    b.kv_budget_bytes[0] += 1;
    cases.push(b);
    let mut b = good.clone();
    b.windows.clear();
    cases.push(b);
    for bad in cases {
        let e = simulate(&bad, &p).unwrap_err();
        assert!(matches!(e, PlanError::InvalidPlan(_)), "{e}");
    }
    // Over budget.
    let small = Problem::new(
        vec![device("a", 8 * MB, 1e9, 1e-10)],
        net(),
        p.model.clone(),
        p.workload,
    );
    let e = simulate(&good, &small).unwrap_err();
    assert!(matches!(e, PlanError::OverBudget { .. }), "{e}");
}
