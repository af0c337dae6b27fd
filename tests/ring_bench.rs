//! The emulation hooks of the ring benchmark (`loip bench-ring`): a paced
//! streamer reads no faster than its bandwidth, a compute factor stretches
//! a window's run, and a ring of real node processes with emulated
//! storage, compute and links gives the same tokens as without.
//!
//! ```sh
//! nice -n 19 cargo test --release --test ring_bench   # about 20 s
//! ```

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use loip::cluster::ring::demo::{demo_plan, prepare_plan, start_node, write_file};
use loip::cluster::ring::emulation::Emulation;
use loip::cluster::ring::RingRequest;
use loip::compute::cpu::Pool;
use loip::engine::forward::{Scratch, TokenIn};
use loip::engine::kv::KvCache;
use loip::engine::loader::{ReadPace, StreamMode, Streamer};
use loip::engine::weights::{Model, Unit};
use loip::engine::window::{Exec, WindowInput};

/// A paced streamer takes at least bytes / bandwidth for a pass over its
/// units, in both loading modes.
#[test]
fn paced_reads_take_bytes_over_bandwidth() {
    let model = Model::open_with(&common::smollm2(), |_| false).unwrap();
    let n = model.config.n_layer;
    let units: Vec<Unit> = (0..n).step_by(3).map(Unit::Mlp).collect();
    let pace = ReadPace { bytes_per_s: 40e6 };
    for mode in [StreamMode::Prefetch, StreamMode::OnDemand] {
        let mut s = Streamer::start_paced(&model, &units, 2, mode, Some(pace)).unwrap();
        let t = Instant::now();
        for &u in &units {
            let slot = s.acquire(u);
            assert!(s.view(&model, &slot).is_ok());
            s.release(slot);
        }
        let secs = t.elapsed().as_secs_f64();
        let bytes = s.stats().bytes_read;
        // The prefetching loader may have read up to two units before the
        // clock started.
        let floor = (bytes as f64 - 2.0 * bytes as f64 / units.len() as f64) / pace.bytes_per_s;
        assert!(
            secs >= 0.95 * floor,
            "{mode:?}: {bytes} bytes in {secs:.3} s at a pace of 40 MB/s (floor {floor:.3} s)"
        );
    }
}

/// Runs every unit of the model on one token with `factor`; returns the
/// logits and the wall time.
fn forward_with(model: &Model, pool: &Pool, factor: f64) -> (Vec<f32>, Duration) {
    let c = &model.config;
    let mut caches = vec![KvCache::new(c.n_layer, c.n_head_kv, c.head_dim)];
    let mut scratch = Scratch::default();
    let mut logits = Vec::new();
    let batch = [TokenIn {
        id: 42,
        seq: 0,
        pos: 0,
    }];
    let t = Instant::now();
    Exec {
        model,
        pool,
        scratch: &mut scratch,
        streamer: None,
        compute_factor: factor,
    }
    .run(
        &Unit::all(c.n_layer),
        WindowInput::Embed,
        &batch,
        &mut caches,
        &[0],
        &mut logits,
    )
    .unwrap();
    (logits, t.elapsed())
}

/// A compute factor stretches a run to about that many times its compute
/// time and leaves every bit of the logits alone.
#[test]
fn compute_factor_stretches_runs_and_keeps_bits() {
    let model = Model::open(&common::smollm2()).unwrap();
    let pool = Pool::new(1);
    let (reference, _) = forward_with(&model, &pool, 1.0);
    // The fastest of a few plain runs is close to the compute time.
    let plain = (0..3)
        .map(|_| forward_with(&model, &pool, 1.0).1)
        .min()
        .unwrap();
    let (logits, slow) = forward_with(&model, &pool, 4.0);
    assert_eq!(
        logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        reference.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let ratio = slow.as_secs_f64() / plain.as_secs_f64();
    assert!(
        ratio >= 3.0,
        "factor 4: {slow:?} against {plain:?} ({ratio:.2}x)"
    );
}

/// Runs `requests` greedily on a 2-node ring of processes (node 1 a
/// `loip demo-node` child) with the demo plan, emulated as given; returns
/// the tokens and the seconds from submission to the last token.
fn ring_run(emulation: Option<(Emulation, &str)>, requests: &[Vec<u32>]) -> (Vec<Vec<u32>>, f64) {
    let model = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let n_layer = Model::open_with(&model, |_| false).unwrap().config.n_layer;
    let mut file = prepare_plan(dir.path(), &model, demo_plan(n_layer, 2).unwrap()).unwrap();
    if let Some((e, link)) = emulation {
        file.emulation = vec![e; 2];
        file.links = vec![Some(link.to_string()); 2];
    }
    write_file(dir.path(), &file).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["demo-node", "--index", "1", "--dir"])
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let head = start_node(dir.path(), 0, rt.handle()).unwrap();
    let wait = Duration::from_secs(120);
    // Warm-up: both nodes up and their slots filled.
    head.submit(RingRequest {
        prompt: vec![1, 2],
        max_tokens: 1,
        stop: None,
        keep_logits: false,
        sampling: None,
    })
    .unwrap()
    .wait(wait)
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let handles: Vec<_> = requests
        .iter()
        .map(|p| {
            head.submit(RingRequest {
                prompt: p.clone(),
                max_tokens: 4,
                stop: None,
                keep_logits: false,
                sampling: None,
            })
            .unwrap()
        })
        .collect();
    let tokens = handles
        .into_iter()
        .map(|h| h.wait(wait).unwrap().tokens)
        .collect();
    let secs = t.elapsed().as_secs_f64();
    head.shutdown();
    drop(child.stdin.take());
    let _ = child.wait();
    (tokens, secs)
}

/// Emulated storage, compute and links on real node processes: the same
/// tokens, and a step that takes at least its streamed bytes over the
/// emulated bandwidth.
#[test]
fn emulated_ring_of_processes_is_exact_and_paced() {
    let requests = vec![vec![1, 9690, 28, 2114, 314, 253], vec![504, 30]];
    let (plain, _) = ring_run(None, &requests);
    let bandwidth = 50e6;
    let emulation = Emulation {
        read_bytes_per_s: Some(bandwidth),
        compute_factor: Some(2.0),
    };
    let (emulated, secs) = ring_run(Some((emulation, "100mbit/2ms")), &requests);
    assert_eq!(plain, emulated, "emulation changed the tokens");
    // The demo plan streams every other layer; each node streams its half
    // of them in every one of the 4 passes (prefill, 3 decode steps).
    let model = Arc::new(Model::open_with(&common::smollm2(), |_| false).unwrap());
    let n_layer = model.config.n_layer;
    let streamed: u64 = (1..n_layer)
        .step_by(2)
        .flat_map(|l| [Unit::Attn(l), Unit::Mlp(l)])
        .map(|u| {
            model
                .unit_tensors(u)
                .iter()
                .map(|(_, t)| t.size)
                .sum::<u64>()
        })
        .sum();
    let per_node_step = streamed as f64 / 2.0 / bandwidth;
    assert!(
        secs >= 0.9 * 3.0 * per_node_step,
        "4 tokens in {secs:.2} s; each node streams {per_node_step:.3} s of reads per step"
    );
}
