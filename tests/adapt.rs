//! Online adaptation to KV pressure (issue #9, one node): the policy alone,
//! the engine's resident set changed mid-generation without changing a
//! logit, `loip serve` under a tight budget, and its state across a restart.

mod serve_util;

use std::path::Path;
use std::time::{Duration, Instant};

use loip::engine::adapt::{Change, Ignored, Limits, Observation, Policy, Rates, UnitCost};
use loip::engine::forward::TokenIn;
use loip::engine::generate::Engine;
use loip::engine::offload::{open_adaptive, Budget, Demand, LoadMode, OffloadSpec};
use loip::engine::weights::{Model, Unit};
use loip::model::dtype::GgmlType;
use loip::model::synth::SynthSpec;
use serve_util::Server;

// ---------------------------------------------------------------- policy

/// Four layers: attention 100 bytes, MLP 300, head 500; a step computes
/// for 1 s in all; storage reads 100 bytes/s.
fn units(compute_each: f64) -> Vec<UnitCost> {
    Unit::all(4)
        .into_iter()
        .map(|u| {
            let size = match u {
                Unit::Attn(_) => 100,
                Unit::Mlp(_) => 300,
                Unit::Head => 500,
            };
            UnitCost {
                unit: u,
                memory: size,
                span: size,
                compute_s: compute_each,
            }
        })
        .collect()
}

const RATES: Rates = Rates {
    storage_bps: 1e6,
    latency_s: 0.0,
};

fn limits(budget: u64) -> Limits {
    Limits {
        budget,
        slots: 2,
        fixed: 50,
        margin: 200,
        max_kv_per_sequence: 10_000,
    }
}

fn obs(kv: i64, sequences: usize) -> Observation {
    Observation {
        kv_bytes: kv,
        sequences,
    }
}

/// Applies what the policy decides, as the server does.
fn step(p: &mut Policy, o: Observation) -> Option<Change> {
    let c = p.decide(o).unwrap();
    if let Some(c) = &c {
        p.commit(c);
    }
    c
}

#[test]
fn policy_demotes_only_what_the_kv_needs_spread_and_cheapest_first() {
    // All resident: 4·100 + 4·300 + 500 + 50 fixed = 2150.
    let lim = Limits {
        margin: 100,
        ..limits(2300)
    };
    let mut p = Policy::new(units(1.0), &[], lim, RATES);
    assert_eq!(p.total(0), 2150);
    assert_eq!(p.decide(obs(0, 0)), Ok(None));
    // 250 bytes of KV: 100 over. Streaming attention needs slots of 2·100,
    // so three attention units (300 bytes) are the least to stream; with
    // MLPs the slots alone would take 600.
    let c = step(&mut p, obs(250, 1)).expect("must demote");
    assert!(p.total(250) <= 2300, "{}", p.total(250));
    let Change::Demote(d) = c else {
        panic!("{c:?}")
    };
    // Loads stay hidden under 9 s of compute, so no delay: the least
    // streaming wins, attention only.
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(d.iter().all(|u| matches!(u, Unit::Attn(_))), "{d:?}");
    // Hysteresis: a little less KV changes nothing; more demotes again.
    assert_eq!(p.decide(obs(200, 1)), Ok(None));
    assert_eq!(p.decide(obs(150, 1)), Ok(None));
    // Once the KV is gone and the margin is free, everything comes back.
    let c = step(&mut p, obs(0, 0)).expect("must promote");
    assert!(matches!(c, Change::Promote(_)), "{c:?}");
    assert!(p.streamed().is_empty(), "{:?}", p.streamed());
}

#[test]
fn pinned_units_stay_streamed_and_the_ceiling_keeps_a_unit_whose_slots_cost_more() {
    // Four slots: streaming the head (500) costs 2000 in slots, more than
    // it frees, so the most KV fits with every layer streamed and the head
    // resident: 500 + 4·300 + 50 = 1750 of 3000.
    let lim = Limits {
        slots: 4,
        ..limits(3000)
    };
    let p = Policy::new(units(1.0), &[], lim, RATES);
    assert_eq!(p.kv_capacity(), 3000 - (4 * 500 + 50));
    assert_eq!(p.kv_ceiling(), 3000 - 1750);
    // The demotion search reaches it.
    let Some(Change::Demote(d)) = p.decide(obs(1250, 1)).unwrap() else {
        panic!("no demotion");
    };
    assert_eq!(d.len(), 8, "{d:?}");
    assert!(!d.contains(&Unit::Head));

    // A pinned unit is streamed at once and never promoted; the others
    // come back as memory frees.
    let mut p = Policy::new(units(1.0), &[], limits(3000), RATES);
    p.pin(&[Unit::Attn(0)]);
    assert_eq!(p.streamed(), [Unit::Attn(0)]);
    assert_eq!(p.decide(obs(0, 0)).unwrap(), None);
    assert!(matches!(
        step(&mut p, obs(1600, 2)),
        Some(Change::Demote(_))
    ));
    let Some(Change::Promote(back)) = step(&mut p, obs(0, 0)) else {
        panic!("no promotion");
    };
    assert!(!back.contains(&Unit::Attn(0)), "{back:?}");
    assert_eq!(p.streamed(), [Unit::Attn(0)]);
}

#[test]
fn policy_ranks_by_delay_per_byte_freed() {
    // Compute is nearly free, so every load is delay: a unit that frees
    // more memory per byte it reads goes first. MLPs here take 600 bytes
    // resident for a 300-byte read (their ratio is twice attention's).
    let mut us = units(1e-6);
    for u in &mut us {
        if matches!(u.unit, Unit::Mlp(_)) {
            u.memory = 600;
        }
    }
    let all: u64 = us.iter().map(|u| u.memory).sum::<u64>() + 50;
    let mut p = Policy::new(us, &[], limits(all), RATES);
    let Some(Change::Demote(d)) = step(&mut p, obs(1000, 1)) else {
        panic!("must demote")
    };
    assert!(d.iter().all(|u| matches!(u, Unit::Mlp(_))), "{d:?}");
    assert!(p.total(1000) <= all);
}

#[test]
fn policy_ignores_absurd_inputs_and_never_exceeds_the_budget() {
    let mut p = Policy::new(units(1.0), &[], limits(2150), RATES);
    let before = p.streamed();
    for (o, what) in [
        (obs(-5, 1), "negative"),
        (obs(0, 3), "no KV for running sequences"),
        (obs(500, 0), "KV without sequences"),
        (obs(10_001, 1), "more than a sequence can hold"),
    ] {
        assert!(p.decide(o).is_err(), "{what}: {:?}", p.decide(o));
    }
    assert_eq!(p.set_budget(0), Err(Ignored::ZeroBudget));
    assert_eq!(p.set_budget(2150), Err(Ignored::UnchangedBudget(2150)));
    assert!(matches!(
        p.set_budget(10),
        Err(Ignored::BudgetBelowMinimum { .. })
    ));
    for bad in [f64::NAN, f64::INFINITY, 0.0, -1e9] {
        let r = Rates {
            storage_bps: bad,
            latency_s: 0.0,
        };
        assert!(p.set_rates(r).is_err(), "{bad}");
    }
    // A plausible new bandwidth only ranks units: it changes nothing now.
    p.set_rates(Rates {
        storage_bps: 5e8,
        latency_s: 1e-4,
    })
    .unwrap();
    assert_eq!(p.streamed(), before);
    assert_eq!(p.decide(obs(0, 0)), Ok(None));
    // Past capacity: refused, nothing changes.
    let cap = p.kv_capacity();
    assert!(matches!(
        p.decide(obs(cap as i64 + 1, 2)),
        Err(Ignored::OverCapacity { .. })
    ));
    assert_eq!(p.streamed(), before);
    // A deterministic walk of KV sizes within capacity: after each change
    // the total is within the budget.
    let mut x: u64 = 7;
    let mut changes = 0;
    for _ in 0..2000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let kv = (x >> 33) % (cap + 1);
        let seqs = if kv == 0 { 0 } else { 1 };
        if step(&mut p, obs(kv as i64, seqs)).is_some() {
            changes += 1;
        }
        assert!(p.total(kv) <= 2150, "kv {kv}: total {}", p.total(kv));
    }
    assert!(changes > 0);
}

// ---------------------------------------------------------------- engine

fn synth(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("adapt.gguf");
    SynthSpec {
        n_layer: 6,
        n_embd: 256,
        n_ff: 768,
        n_head: 4,
        n_head_kv: 2,
        n_vocab: 512,
        context_length: 256,
        weights: GgmlType::Q4_1,
        embeddings: GgmlType::Q8_0,
        tied_output: false,
        rope_freqs: false,
        seed: 9,
    }
    .write(&path)
    .unwrap();
    path
}

/// Three sequences: prefills, then `steps` batched decode steps; before
/// step i, `change(i, engine)` may change the resident set. Every logit's
/// bits, in order.
fn run(engine: &mut Engine, steps: u32, mut change: impl FnMut(u32, &mut Engine)) -> Vec<u32> {
    let prompts: [&[u32]; 3] = [&[1, 17, 300, 42, 5, 511, 0, 99], &[3, 4, 5], &[200; 20]];
    let mut out = Vec::new();
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = engine.new_cache();
            let l = engine.prefill(&mut c, p, true).unwrap();
            out.extend(l.iter().map(|f| f.to_bits()));
            c
        })
        .collect();
    for i in 0..steps {
        change(i, engine);
        let batch: Vec<TokenIn> = (0..3)
            .map(|s| TokenIn {
                id: (7 * i + 31 * s as u32) % 512,
                seq: s,
                pos: caches[s].len(),
            })
            .collect();
        let l = engine.step(&batch, &mut caches, &[0, 1, 2]).unwrap();
        out.extend(l.iter().map(|f| f.to_bits()));
    }
    out
}

#[test]
fn demoting_and_promoting_mid_generation_keeps_logits_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path());
    let mut reference = Engine::new(std::sync::Arc::new(Model::open(&path).unwrap()), 2);
    let want = run(&mut reference, 12, |_, _| {});
    for mode in [LoadMode::Prefetch, LoadMode::OnDemand] {
        let spec = OffloadSpec {
            budget: Budget::Bytes(1 << 40),
            demand: Demand {
                batch: 3,
                positions: 64,
                slots: 2,
            },
            threads: 2,
            mode,
        };
        let (mut engine, placement) = open_adaptive(&path, &spec, 0, &[]).unwrap();
        assert!(placement.streamed.is_empty());
        // Attention of odd layers, then MLPs and the head, then some back,
        // then all back: each change between two steps.
        let plan: [(u32, &dyn Fn(Unit) -> bool); 4] = [
            (2, &|u| !matches!(u, Unit::Attn(l) if l % 2 == 1)),
            (5, &|u| matches!(u, Unit::Attn(0) | Unit::Mlp(5))),
            (8, &|u| {
                !matches!(u, Unit::Mlp(1) | Unit::Mlp(2) | Unit::Head)
            }),
            (10, &|_| true),
        ];
        let got = run(&mut engine, 12, |i, e| {
            if let Some((_, keep)) = plan.iter().find(|(at, _)| *at == i) {
                e.set_resident(keep).unwrap();
                let streamed = e.streamed_units();
                for u in Unit::all(6) {
                    assert_eq!(streamed.contains(&u), !keep(u), "{mode:?} step {i}: {u}");
                    assert_eq!(e.model().is_resident(u), keep(u), "{u}");
                }
            }
        });
        assert!(
            got == want,
            "{mode:?}: logits differ from the all-resident run"
        );
        let load = engine.load_stats().unwrap();
        assert!(load.units_read > 0, "{load:?}");
    }
}

// ---------------------------------------------------------------- serve

fn completion(server: &Server, prompt: &str, max_tokens: usize) -> serve_util::Resp {
    let body = serde_json::json!({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
    });
    server.post("/v1/completions", &body.to_string())
}

fn text(r: &serve_util::Resp) -> String {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

fn streamed_units(server: &Server) -> Vec<String> {
    let c = server.get("/v1/cluster").json();
    c["nodes"][0]["windows"][0]["streamed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

const TIGHT: &[&str] = &[
    "--mem-budget",
    "120MiB",
    "--context",
    "512",
    "--max-batch",
    "4",
    "--no-mdns",
];

#[test]
fn a_tight_budget_demotes_as_kv_grows_promotes_after_and_answers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut args = TIGHT.to_vec();
    args.extend(["--queue", "8", "--data-dir", data]);
    let server = Server::start(&args);
    assert_eq!(server.metric("loip_demotions_total"), 0.0);
    let resident_at_start = server.metric("loip_resident_units");
    assert!(resident_at_start > 0.0);
    let prompts: Vec<String> = (0..4)
        .map(|i| format!("Chapter {i}. The old lighthouse keeper"))
        .collect();
    let answers: Vec<serve_util::Resp> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| completion(&server, p, 300)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let got: Vec<String> = answers.iter().map(text).collect();
    assert!(server.metric("loip_demotions_total") > 0.0, "no demotion");
    server.wait_metric("loip_promotions_total", 1.0);
    assert_eq!(
        server.metric("loip_requests_total{outcome=\"failed\"}"),
        0.0
    );
    // A request whose KV could never fit is refused at once, clearly.
    let c = server.get("/v1/cluster").json();
    let limit = c["nodes"][0]["adaptation"]["sequence_limit"]
        .as_u64()
        .unwrap();
    assert!(limit >= 309, "{c}");
    // Idle again: what the node holds is within the budget with room for
    // the margin.
    let a = &c["nodes"][0]["adaptation"];
    let (budget, held) = (
        a["budget_bytes"].as_u64().unwrap(),
        a["weights_slots_scratch_bytes"].as_u64().unwrap(),
    );
    assert!(held > 0 && held < budget, "{a}");
    drop(server);
    // The same requests, each alone, on a server without a budget.
    let free = Server::start(&["--context", "512", "--no-mdns"]);
    for (p, g) in prompts.iter().zip(&got) {
        assert_eq!(&text(&completion(&free, p, 300)), g, "{p}");
    }
}

#[test]
fn past_capacity_requests_wait_or_get_429_and_none_fails() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // With every unit streamed, 100 MiB leaves the KV room for a few cache
    // blocks only, so most requests wait for others to end.
    let server = Server::start(&[
        "--mem-budget",
        "100MiB",
        "--context",
        "2048",
        "--max-batch",
        "8",
        "--queue",
        "2",
        "--no-mdns",
        "--data-dir",
        data,
    ]);
    let c = server.get("/v1/cluster").json();
    let limit = c["nodes"][0]["adaptation"]["sequence_limit"]
        .as_u64()
        .unwrap() as usize;
    // Beyond what one sequence can hold in the budget: refused, 400.
    assert!(limit < 2048, "{c}");
    let r = completion(&server, "Hello", limit);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.error().contains("memory budget"), "{}", r.error());
    let t0 = Instant::now();
    let rs: Vec<serve_util::Resp> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let server = &server;
                s.spawn(move || completion(server, &format!("Item {i}:"), 120))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = rs.iter().filter(|r| r.status == 200).count();
    let busy = rs.iter().filter(|r| r.status == 429).count();
    assert_eq!(
        ok + busy,
        8,
        "{:?}",
        rs.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    // The queue's two always run; a third only when the first left the
    // queue before the last request arrived, which is up to the scheduler.
    assert!(ok >= 2, "{ok} answered");
    assert!(busy >= 1, "the queue of 2 must overflow");
    for r in rs.iter().filter(|r| r.status == 429) {
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(
        server.metric("loip_requests_total{outcome=\"failed\"}"),
        0.0
    );
    assert!(t0.elapsed() < Duration::from_secs(120));
}

#[test]
fn a_restarted_server_resumes_its_saved_demotions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let data_s = data.to_str().unwrap();
    let mut args = TIGHT.to_vec();
    args.extend(["--data-dir", data_s]);
    let fresh_streamed;
    {
        let server = Server::start(&args);
        fresh_streamed = streamed_units(&server);
        // Two long generations; kill the node (SIGKILL) while they run and
        // their KV keeps units demoted. The clients are left to fail.
        for i in 0..2 {
            let addr = server.addr;
            let body = serde_json::json!({
                "prompt": format!("Tale {i}. In the beginning"), "max_tokens": 400, "temperature": 0,
            })
            .to_string();
            std::thread::spawn(move || {
                let _ = std::panic::catch_unwind(|| {
                    serve_util::request(addr, "POST", "/v1/completions", &[], body.as_bytes())
                });
            });
        }
        let t0 = Instant::now();
        while server.metric("loip_demotions_total") == 0.0 {
            assert!(t0.elapsed() < Duration::from_secs(60), "no demotion");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let store = loip::store::Store::open(&data).unwrap();
    let saved: serde_json::Value = store
        .get_json(
            loip::store::Tree::Adapt,
            b"demotions/SmolLM2-135M-Instruct.Q4_1",
        )
        .unwrap()
        .expect("the demotions were saved");
    drop(store);
    let saved: Vec<String> = saved["streamed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        saved.iter().any(|u| !fresh_streamed.contains(u)),
        "saved {saved:?} adds nothing to a fresh start's {fresh_streamed:?}"
    );
    let server = Server::start(&args);
    let now = streamed_units(&server);
    for u in &saved {
        assert!(
            now.contains(u),
            "{u} not streamed after the restart: {now:?}"
        );
    }
    // And it serves, exactly as before.
    let r = completion(&server, "Tale 0. In the beginning", 8);
    assert_eq!(r.status, 200);
}
