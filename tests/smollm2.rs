//! The real model against the reference fixtures (../shared/fixtures),
//! compared as the fixtures README says.

mod common;

use std::sync::Arc;

use loip::engine::generate::Engine;
use loip::engine::weights::Model;
use serde_json::Value;

const NEAR_TIE: f64 = 0.05;

struct Case {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    gaps: Vec<f64>,
    top1: Vec<f64>,
    first_top5: Vec<(u32, f64)>,
}

fn cases() -> Vec<Case> {
    let text =
        std::fs::read_to_string(common::fixtures_dir().join("smollm2/greedy.jsonl")).unwrap();
    let ids = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    let floats = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let cases: Vec<Case> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Case {
                prompt_ids: ids(&v["prompt_ids"]),
                greedy_ids: ids(&v["greedy_ids"]),
                gaps: floats(&v["gaps"]),
                top1: floats(&v["top1_logits"]),
                first_top5: v["first_top5"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap()))
                    .collect(),
            }
        })
        .collect();
    assert!(cases.len() >= 6, "expected the six fixture chats");
    cases
}

fn engine() -> Engine {
    let m = Model::open(&common::smollm2()).unwrap();
    assert_eq!(m.config.n_layer, 30);
    Engine::new(Arc::new(m), 2)
}

#[test]
fn teacher_forced_argmax_and_top_logit_match() {
    let mut engine = engine();
    for (c, case) in cases().iter().enumerate() {
        let mut ids = case.prompt_ids.clone();
        ids.extend(&case.greedy_ids);
        let scored = engine.score(&ids).unwrap();
        let base = case.prompt_ids.len() - 1;
        for (i, &want) in case.greedy_ids.iter().enumerate() {
            let s = &scored[base + i];
            if case.gaps[i] >= NEAR_TIE {
                assert_eq!(
                    s.argmax, want,
                    "chat {c} step {i}: argmax (gap {})",
                    case.gaps[i]
                );
            }
            let top = s.top[0].1 as f64;
            assert!(
                (top - case.top1[i]).abs() <= NEAR_TIE,
                "chat {c} step {i}: top logit {top} vs {}",
                case.top1[i]
            );
        }
    }
}

#[test]
fn free_running_greedy_matches_up_to_the_first_near_tie() {
    let mut engine = engine();
    let mut compared = 0;
    for (c, case) in cases().iter().enumerate() {
        let g = engine
            .generate_greedy(&case.prompt_ids, case.greedy_ids.len(), Some(2))
            .unwrap();
        let exact = case
            .gaps
            .iter()
            .position(|&g| g < NEAR_TIE)
            .map_or(case.greedy_ids.len(), |i| i + 1);
        assert_eq!(
            &g.tokens[..exact.min(g.tokens.len())],
            &case.greedy_ids[..exact],
            "chat {c}: greedy tokens diverge before the first near-tie"
        );
        compared += exact;
    }
    assert!(compared > 50, "only {compared} tokens compared");
}

#[test]
fn first_top5_within_tolerance() {
    let mut engine = engine();
    for (c, case) in cases().iter().enumerate() {
        let scored = engine.score(&case.prompt_ids).unwrap();
        let last = scored.last().unwrap();
        for (i, &(id, want)) in case.first_top5.iter().enumerate() {
            let (got_id, got) = last.top[i];
            assert!(
                (got as f64 - want).abs() <= NEAR_TIE,
                "chat {c} rank {i}: logit {got} vs {want}"
            );
            // Ids may swap only where the reference's own values are that close.
            if got_id != id {
                let other = case.first_top5.iter().find(|p| p.0 == got_id).map(|p| p.1);
                assert!(
                    other.is_some_and(|o| (o - want).abs() <= NEAR_TIE),
                    "chat {c} rank {i}: id {got_id} vs {id}"
                );
            }
        }
    }
}

/// Weights are used exactly as stored: the Q4_1 file and a copy with every
/// tensor dequantized to F32 (by the reference dequantizer, into a file our
/// writer builds) give the same logits, bit for bit, in prefill and in
/// decode. The two run different kernels (the Q4_1 weight table against
/// plain f32 loads) in the same reduction order, so any weight that a
/// kernel rounds, or any step taken in another order, shows here.
#[test]
fn the_model_and_its_f32_copy_give_the_same_logits_bit_for_bit() {
    use loip::engine::forward::TokenIn;
    use loip::engine::kv::KvCache;
    use loip::model::dtype::{self, GgmlType};
    use loip::model::gguf::{Gguf, GgufWriter};

    let src = Arc::new(Gguf::open(&common::smollm2()).unwrap());
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata().iter() {
        w.add_kv(k, v.clone());
    }
    let mut quantized = 0;
    for t in src.tensors() {
        quantized += usize::from(t.ty != GgmlType::F32);
        let (src, info) = (src.clone(), t.clone());
        w.add_tensor_with(&t.name, &t.dims, GgmlType::F32, move |out| {
            let (bytes, ne0) = (src.tensor_data(&info), info.dims[0] as usize);
            let mut row = vec![0f32; ne0];
            for r in bytes.chunks_exact(info.row_bytes() as usize) {
                dtype::dequantize_row(info.ty, r, &mut row).expect("a row of the checked file");
                out.write_all(bytemuck::cast_slice(&row))?;
            }
            Ok(())
        });
    }
    assert!(
        quantized > 200,
        "the model should be quantized: {quantized} tensors"
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("smollm2-f32.gguf");
    w.write(&copy).unwrap();

    let case = &cases()[0];
    let run = |path: &std::path::Path| {
        let mut e = Engine::new(Arc::new(Model::open(path).unwrap()), 2);
        let mut cache: KvCache = e.new_cache();
        let mut logits = e.prefill(&mut cache, &case.prompt_ids, true).unwrap();
        for &id in &case.greedy_ids[..8] {
            let tok = TokenIn {
                id,
                seq: 0,
                pos: cache.len(),
            };
            let step = e
                .step(&[tok], std::slice::from_mut(&mut cache), &[0])
                .unwrap();
            logits.extend_from_slice(step);
        }
        logits
    };
    let (q, f) = (run(&common::smollm2()), run(&copy));
    let n_vocab = 49152;
    assert_eq!(q.len(), (case.prompt_ids.len() + 8) * n_vocab);
    assert_eq!(q.len(), f.len());
    if let Some(i) = q
        .iter()
        .zip(&f)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        panic!(
            "position {} id {}: Q4_1 logit {} vs F32 copy {}",
            i / n_vocab,
            i % n_vocab,
            q[i],
            f[i]
        );
    }
}
