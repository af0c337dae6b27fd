//! KV pressure in the ring (`loip::cluster::ring::kvpressure`), on the real
//! SmolLM2 with two nodes on 127.0.0.1 (real QUIC and mutual TLS, a thread
//! per node's compute), each under a memory budget that holds its weights
//! and two cache blocks of KV:
//!
//! - six long greedy generations, submitted together by one submitter:
//!   the head admits those whose KV fits every node after demotions and
//!   queues the rest; as the caches grow the nodes demote units to
//!   streamed, promote them back when sequences end, and every answer is
//!   the single-node engine's, token for token and (for two of them) logit
//!   for logit, bit for bit;
//! - a node restarted under the same placement resumes the demotions it
//!   saved in its database, and still answers exactly.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ring::{endpoints, greedy, identities, runtime};
use loip::cluster::ring::{KvPressure, RingConfig, RingCounts, RingNode, RingOutput, RingRequest};
use loip::engine::adapt::unit_memory;
use loip::engine::generate::Engine;
use loip::engine::kv::{KvCache, GROW};
use loip::engine::offload::{fixed_bytes, Demand};
use loip::engine::weights::{Model, Unit};
use loip::engine::window::engine_units;
use loip::net::identity::NodeIdentity;
use loip::plan::{Loading, Plan, Planner, Window};
use loip::store::Store;

const WAIT: Duration = Duration::from_secs(900);

/// Two nodes, interleaved: node 0 runs layers 0–7 and 16–23, node 1 the
/// others and the head; nothing streamed by the plan.
fn plan() -> Plan {
    let w = |device, a: u32, b: u32| Window {
        device,
        units: a..b,
        streamed: vec![false; (b - a) as usize],
    };
    Plan {
        epoch: 3,
        planner: Planner::Ring,
        ring: vec!["node0".into(), "node1".into()],
        windows: vec![w(0, 0, 8), w(1, 8, 16), w(0, 16, 24), w(1, 24, 31)],
        kv_budget_bytes: vec![0; 2],
        slots: 2,
        loading: Loading::Prefetch,
        micro_batches: 1,
        batch: 4,
        context_tokens: 1024,
    }
}

/// A budget for `node` that holds every unit of its windows resident, the
/// scratch, and two cache blocks of KV: a third sequence's cache forces a
/// demotion.
fn budget(model: &Model, plan: &Plan, node: usize) -> u64 {
    let n_layer = model.config.n_layer;
    let units: Vec<Unit> = plan
        .windows
        .iter()
        .filter(|w| w.device == node)
        .flat_map(|w| engine_units(n_layer, w.units.start as usize..w.units.end as usize))
        .collect();
    let layers = units.iter().filter(|u| matches!(u, Unit::Attn(_))).count();
    let weights: u64 = units.iter().map(|&u| unit_memory(model, u)).sum();
    let demand = Demand {
        batch: plan.batch as usize,
        positions: plan.context_tokens as usize,
        slots: 4,
    };
    let (scratch, vectors) = fixed_bytes(model, demand, 1);
    let block = (GROW * KvCache::bytes_per_position(layers, model.config.kv_dim())) as u64;
    weights + scratch + vectors + 2 * block
}

fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let mut rng = common::Rng(seed);
    (0..len)
        .map(|_| (rng.next_u64() % 49000) as u32 + 1)
        .collect()
}

/// Starts a ring of `plan` whose node `i` runs under `budgets[i]` with
/// `stores[i]`.
fn start(
    rt: &tokio::runtime::Runtime,
    ids: &[NodeIdentity],
    plan: &Plan,
    budgets: &[u64],
    stores: &[Store],
) -> Vec<RingNode> {
    let _g = rt.enter();
    let (endpoints, peers) = endpoints(ids);
    endpoints
        .into_iter()
        .enumerate()
        .map(|(i, ep)| {
            let mut c = RingConfig::new(plan.clone(), i, peers.clone(), common::smollm2());
            c.kv_pressure = Some(KvPressure {
                budget_bytes: budgets[i],
                store: Some(stores[i].clone()),
            });
            RingNode::start(c, ep, rt.handle()).unwrap()
        })
        .collect()
}

fn request(prompt: Vec<u32>, max_tokens: usize, keep_logits: bool) -> RingRequest {
    RingRequest {
        prompt,
        max_tokens,
        stop: None,
        keep_logits,
        sampling: None,
    }
}

fn assert_same(what: &str, got: &RingOutput, want: &RingOutput) {
    assert_eq!(got.tokens, want.tokens, "{what}: tokens");
    if want.logits.is_empty() {
        return;
    }
    assert_eq!(got.logits.len(), want.logits.len(), "{what}");
    for (step, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
        let differ = g
            .iter()
            .zip(w)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert!(
            g.len() == w.len() && differ == 0,
            "{what}: step {step}: {differ} logits differ in their bits"
        );
    }
}

fn sum(nodes: &[RingNode], f: impl Fn(&RingCounts) -> u64) -> u64 {
    nodes.iter().map(|n| f(&n.stats())).sum()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(120), "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn growing_caches_demote_layers_queue_requests_and_answers_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(&common::smollm2()).unwrap();
    let plan = plan();
    let budgets: Vec<u64> = (0..2).map(|i| budget(&model, &plan, i)).collect();
    drop(model);
    const N: usize = 300;
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(11 + i, 10 + i as usize)).collect();
    // Logits of the first and the last request are compared too.
    let keep = |i: usize| i == 0 || i == 5;
    let want: Vec<RingOutput> = {
        let model = Arc::new(Model::open(&common::smollm2()).unwrap());
        let mut engine = Engine::new(model, 1);
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| greedy(&mut engine, p, N, keep(i)))
            .collect()
    };

    let rt = runtime();
    let ids = identities(dir.path(), 2, 0x200);
    let stores: Vec<Store> = (0..2)
        .map(|i| Store::open(dir.path().join(format!("data{i}"))).unwrap())
        .collect();
    let nodes = start(&rt, &ids, &plan, &budgets, &stores);
    wait_until("every node says its KV capacity", || {
        nodes.iter().all(|n| n.stats().kv_positions > 0)
    });
    for (i, n) in nodes.iter().enumerate() {
        let s = n.stats();
        assert_eq!(
            s.demoted_units, 0,
            "node {i} starts with everything resident"
        );
        assert_eq!(s.memory_budget_bytes, budgets[i]);
        // Each request reserves 512 positions: three fit, not four.
        assert!(
            (3 * 512..4 * 512).contains(&s.kv_positions),
            "node {i}: room for {} positions",
            s.kv_positions
        );
    }
    // One submitter: all six at once.
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| nodes[0].submit(request(p.clone(), N, keep(i))).unwrap())
        .collect();
    for (i, (h, w)) in handles.into_iter().zip(&want).enumerate() {
        let got = h.wait(WAIT).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_same(&format!("request {i}"), &got, w);
    }
    assert!(
        sum(&nodes, |c| c.demotions) > 0,
        "no demotion: {:?}",
        nodes.iter().map(|n| n.stats()).collect::<Vec<_>>()
    );
    let head = nodes[0].stats();
    assert!(head.kv_waited >= 3, "requests waited: {}", head.kv_waited);
    assert_eq!(head.kv_waiting, 0);
    // Memory has freed: the next runs promote units back, and a request
    // that needs more than the ring can hold is refused at once.
    let last = greedy(
        &mut Engine::new(Arc::new(Model::open(&common::smollm2()).unwrap()), 1),
        &prompts[1],
        4,
        false,
    );
    let got = nodes[0]
        .submit(request(prompts[1].clone(), 4, false))
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert_same("after the load", &got, &last);
    assert!(
        sum(&nodes, |c| c.promotions) > 0,
        "no promotion: {:?}",
        nodes.iter().map(|n| n.stats()).collect::<Vec<_>>()
    );
    let too_long = nodes[0]
        .submit(request(prompts[0].clone(), 4 * 512, false))
        .unwrap()
        .wait(WAIT);
    let e = too_long
        .expect_err("a request larger than the ring's KV room")
        .to_string();
    assert!(e.contains("positions of KV"), "{e}");
    for (i, n) in nodes.iter().enumerate() {
        let s = n.stats();
        assert_eq!((s.bad, s.stale), (0, 0), "node {i}");
    }
}

#[test]
fn a_restarted_node_resumes_its_saved_demotions() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(&common::smollm2()).unwrap();
    let plan = plan();
    let budgets: Vec<u64> = (0..2).map(|i| budget(&model, &plan, i)).collect();
    drop(model);
    let rt = runtime();
    let ids = identities(dir.path(), 2, 0x200);
    let stores: Vec<Store> = (0..2)
        .map(|i| Store::open(dir.path().join(format!("data{i}"))).unwrap())
        .collect();
    let nodes = start(&rt, &ids, &plan, &budgets, &stores);
    // Three sequences' caches do not fit beside every unit.
    let handles: Vec<_> = (0..3)
        .map(|i| {
            nodes[0]
                .submit(request(prompt(40 + i, 12), 200, false))
                .unwrap()
        })
        .collect();
    wait_until("a demotion", || {
        nodes.iter().any(|n| n.stats().demoted_units > 0)
    });
    for n in &nodes {
        n.halt();
    }
    for h in handles {
        let _ = h.wait(WAIT);
    }
    drop(nodes);

    let nodes = start(&rt, &ids, &plan, &budgets, &stores);
    wait_until("every node says its KV capacity", || {
        nodes.iter().all(|n| n.stats().kv_positions > 0)
    });
    assert!(
        nodes.iter().any(|n| n.stats().demoted_units > 0),
        "no node resumed its demotions: {:?}",
        nodes.iter().map(|n| n.stats()).collect::<Vec<_>>()
    );
    let p = prompt(40, 12);
    let want = greedy(
        &mut Engine::new(Arc::new(Model::open(&common::smollm2()).unwrap()), 1),
        &p,
        8,
        true,
    );
    let got = nodes[0]
        .submit(request(p, 8, true))
        .unwrap()
        .wait(WAIT)
        .unwrap();
    assert_same("after the restart", &got, &want);
}
