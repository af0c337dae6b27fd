//! The allocation scheduler: exact against brute force on small problems,
//! fast on large ones, and its plans and the baselines' always fit.

mod plan_common;

use std::time::Instant;

use loip::plan::{
    memory_use, objective_value, plan, plan_heuristic, plan_with_info, DeviceProfile, Link,
    ModelShape, Network, Pattern, PlanError, Planner, Problem, Workload,
};
use plan_common::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// Every plan fits each device's budget, and the plan checks out.
fn assert_fits(p: &Problem, planner: Planner) {
    let Ok((pl, _)) = plan(planner, p) else {
        return;
    };
    for (pos, m) in memory_use(&pl, p).unwrap().iter().enumerate() {
        let d = p.devices.iter().find(|d| d.name == pl.ring[pos]).unwrap();
        assert!(
            m.total() <= d.memory_budget_bytes,
            "{planner}: {} over budget",
            d.name
        );
    }
    objective_value(&pl, p).unwrap();
}

fn check_exact(seed: u64, n_dev: usize, n_layers: usize) {
    let p = random_problem(seed, n_dev, n_layers);
    let brute = brute_force(&p);
    let got = plan_with_info(Planner::Loip, &p);
    match (brute, got) {
        (
            None,
            Err(PlanError::DoesNotFit {
                shortfall_bytes, ..
            }),
        ) => assert!(shortfall_bytes > 0),
        (None, Ok(_)) => panic!("seed {seed}: the scheduler found a plan, brute force none"),
        (None, Err(e)) => panic!("seed {seed}: wrong error {e}"),
        (Some((v, _)), Err(e)) => {
            panic!("seed {seed}: brute force found {v}, the scheduler failed: {e}")
        }
        (Some((v, best)), Ok((pl, info))) => {
            assert!(
                info.exhaustive,
                "seed {seed}: small problems are searched exhaustively"
            );
            let got = objective_value(&pl, &p).unwrap();
            assert!(
                close(got, v),
                "seed {seed} ({n_dev} devices, {n_layers} layers, {:?}, {:?}): scheduler {got}, brute force {v}\n{pl:?}\n{best:?}",
                p.workload.pattern,
                p.objective
            );
        }
    }
}

#[test]
fn exact_against_brute_force_on_small_problems() {
    for seed in 0..60 {
        let n_dev = 1 + (seed % 3) as usize;
        let n_layers = 1 + (seed / 3 % 5) as usize;
        check_exact(seed, n_dev, n_layers);
    }
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "brute force over 8 layers is slow unoptimized"
)]
fn exact_against_brute_force_with_8_layers_and_3_devices() {
    for seed in 1000..1003 {
        check_exact(seed, 3, 8);
    }
}

#[test]
fn heuristic_is_near_brute_force_on_small_problems() {
    let mut worst = 1.0f64;
    for seed in 200..230 {
        let p = random_problem(seed, 1 + (seed % 3) as usize, 2 + (seed % 4) as usize);
        let Some((v, _)) = brute_force(&p) else {
            continue;
        };
        let h = plan_heuristic(&p).expect("brute force found a plan");
        let hv = objective_value(&h, &p).unwrap();
        assert!(hv >= v * (1.0 - 1e-9), "seed {seed}: below the optimum");
        worst = worst.max(hv / v);
    }
    println!("worst heuristic / optimum: {worst:.3}");
    assert!(worst < 1.5, "heuristic is {worst:.2}x the optimum");
}

#[test]
fn plans_of_every_planner_fit() {
    for seed in 300..330 {
        let p = random_problem(seed, 1 + (seed % 3) as usize, 1 + (seed % 8) as usize);
        for planner in [Planner::Loip, Planner::Ring, Planner::Contiguous] {
            assert_fits(&p, planner);
        }
    }
}

fn jetson_like(n: usize) -> Vec<DeviceProfile> {
    // Budgets of 6 to 62 GiB, NVMe 1.4 to 4 GB/s, 48 to 164 GB/s memory.
    (0..n)
        .map(|i| {
            let f = [1.0, 0.5, 0.25, 0.1, 0.1, 0.5, 0.25, 1.0][i % 8];
            device(
                &format!("j{i}"),
                ((62.0 * f) as u64).max(6) << 30,
                1.36e9 + 2.6e9 * f,
                1.0 / (48e9 + 116e9 * f),
            )
        })
        .collect()
}

/// The search is bounded by the plans it simulates, a count that does not
/// depend on the machine; the seconds are printed for the README's figure
/// (30 and 140 ms here) and only guarded against a hang.
#[test]
fn plans_80_layers_on_8_devices_with_a_bounded_search() {
    let model = ModelShape::llama3_70b();
    for pattern in [Pattern::Sporadic, Pattern::Bursty(16)] {
        let p = Problem::new(
            jetson_like(8),
            Network::uniform("1gbit,1ms".parse::<Link>().unwrap()),
            model.clone(),
            Workload::new(pattern),
        );
        let t = Instant::now();
        let (pl, info) = plan_with_info(Planner::Loip, &p).unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "80 layers x 8 devices, {pattern}: {secs:.3} s, {} plans simulated, {} windows",
            info.evaluations,
            pl.windows.len()
        );
        assert!(info.evaluations <= 1000, "{pattern}: {info:?}");
        assert!(secs < 60.0, "{pattern}: {secs} s");
    }
}

#[test]
fn drops_a_device_that_slows_the_cluster() {
    // Three good devices, and one whose link is a dial-up line: any window
    // on it costs seconds per token.
    let m = model(&[4 << 20; 16], 2 << 20);
    let mut devices: Vec<DeviceProfile> = (0..3)
        .map(|i| device(&format!("good{i}"), 40 << 20, 2e9, 1e-10))
        .collect();
    devices.push(device("slow", 40 << 20, 2e9, 1e-10));
    let mut net = Network::uniform(Link {
        bandwidth_bps: 1e9,
        latency_s: 1e-4,
    });
    for i in 0..3 {
        net = net.with_link(
            i,
            3,
            Link {
                bandwidth_bps: 56e3,
                latency_s: 0.1,
            },
        );
    }
    let p = Problem::new(devices, net, m, small_workload(Pattern::Sporadic));
    let (pl, _) = plan(Planner::Loip, &p).unwrap();
    assert!(!pl.ring.contains(&"slow".to_string()), "{:?}", pl.ring);
    // The ring baseline uses every device and pays for it.
    let (_, ring) = plan(Planner::Ring, &p).unwrap();
    let (_, loip) = plan(Planner::Loip, &p).unwrap();
    assert!(loip.tpot_s < ring.tpot_s);

    // A device that computes 1000 times slower is dropped too.
    let mut devices: Vec<DeviceProfile> = (0..3)
        .map(|i| device(&format!("good{i}"), 40 << 20, 2e9, 1e-10))
        .collect();
    devices.push(device("snail", 40 << 20, 2e9, 1e-7));
    let p = Problem::new(
        devices,
        Network::uniform(Link {
            bandwidth_bps: 1e9,
            latency_s: 1e-4,
        }),
        model(&[4 << 20; 16], 2 << 20),
        small_workload(Pattern::Bursty(4)),
    );
    let (pl, _) = plan(Planner::Loip, &p).unwrap();
    assert!(!pl.ring.contains(&"snail".to_string()), "{:?}", pl.ring);
}

#[test]
fn no_fit_states_the_shortfall() {
    // 16 sequences of 4096 tokens of f32 KV cache for LLaMA-3-70B: 40 GiB
    // of cache alone, on two 8 GB devices.
    let nano = DeviceProfile::from_toml_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/devices/orin-nano-8gb.toml"
    ))
    .unwrap();
    let mut other = nano.clone();
    other.name = "nano-2".into();
    let mut w = Workload::new(Pattern::Bursty(16));
    w.context_tokens = 4096;
    let budgets = 2 * nano.memory_budget_bytes;
    let kv = 16 * 4096 * 640 * 1024u64;
    let p = Problem::new(
        vec![nano, other],
        Network::uniform("1gbit,1ms".parse().unwrap()),
        ModelShape::llama3_70b(),
        w,
    );
    for planner in [Planner::Loip, Planner::Ring, Planner::Contiguous] {
        let e = plan(planner, &p).unwrap_err();
        let PlanError::DoesNotFit {
            shortfall_bytes, ..
        } = &e
        else {
            panic!("{e}")
        };
        // At least the cache beyond the budgets; at most that plus a slot
        // of weights and scratch per device.
        assert!(*shortfall_bytes >= kv - budgets, "{e}");
        assert!(
            *shortfall_bytes <= kv - budgets + 2 * (2 * 2_101_000_000 + (1 << 30)),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("bytes") && msg.contains(&shortfall_bytes.to_string()),
            "{msg}"
        );
    }
}

#[test]
fn loip_is_no_worse_than_the_ring_baseline() {
    // The ring baseline's layout lies in loip's space.
    for seed in 400..420 {
        let p = random_problem(seed, 2 + (seed % 2) as usize, 20);
        let (Ok((l, _)), Ok((r, _))) = (plan(Planner::Loip, &p), plan(Planner::Ring, &p)) else {
            continue;
        };
        let (lv, rv) = (
            objective_value(&l, &p).unwrap(),
            objective_value(&r, &p).unwrap(),
        );
        assert!(lv <= rv * (1.0 + 1e-9), "seed {seed}: loip {lv} ring {rv}");
    }
}

#[test]
#[cfg_attr(debug_assertions, ignore = "speed is measured in release builds")]
fn exhaustive_search_of_8_layers_on_3_devices_is_quick() {
    for seed in 1000..1003 {
        let p = random_problem(seed, 3, 8);
        let t = Instant::now();
        let r = plan_with_info(Planner::Loip, &p);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "8 layers x 3 devices, seed {seed}: {secs:.3} s, {:?}",
            r.as_ref().map(|x| x.1)
        );
        assert!(secs < 10.0, "{secs} s");
    }
}
