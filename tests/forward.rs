//! The whole forward pass on tiny random models: against the plain
//! reference, and invariant to batching, threads and chunking.

mod common;

use std::sync::Arc;

use loip::engine::forward::TokenIn;
use loip::engine::generate::Engine;
use loip::engine::reference::reference_logits;
use loip::engine::weights::Model;
use loip::engine::EngineError;
use loip::model::dtype::GgmlType;
use loip::model::gguf::Gguf;
use loip::model::synth::SynthSpec;

fn model(spec: &SynthSpec) -> Arc<Model> {
    let bytes = spec.writer().to_bytes().unwrap();
    Arc::new(Model::from_gguf(Arc::new(Gguf::from_bytes(bytes).unwrap())).unwrap())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

const IDS: [u32; 11] = [1, 17, 300, 42, 42, 5, 511, 0, 99, 256, 7];

#[test]
fn matches_the_reference_forward_for_several_types() {
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ] {
        let mut spec = SynthSpec::tiny(ty);
        spec.embeddings = GgmlType::Q8_0;
        spec.tied_output = ty != GgmlType::Q8_0;
        spec.rope_freqs = ty == GgmlType::Q4_K;
        let m = model(&spec);
        let want = reference_logits(&m, &IDS).unwrap();
        let mut engine = Engine::new(m.clone(), 2);
        let mut cache = engine.new_cache();
        let got = engine.prefill(&mut cache, &IDS, true).unwrap();
        let n = m.config.n_vocab;
        for (p, w) in want.iter().enumerate() {
            let g = &got[p * n..(p + 1) * n];
            let scale = w.iter().fold(0f32, |a, &b| a.max(b.abs()));
            let worst = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * scale.max(1.0),
                "{ty} position {p}: worst diff {worst} (scale {scale})"
            );
        }
    }
}

#[test]
fn prefill_and_token_by_token_give_the_same_bits() {
    let m = model(&SynthSpec::tiny(GgmlType::Q4_1));
    let mut engine = Engine::new(m.clone(), 2);
    let mut cache = engine.new_cache();
    let all = engine.prefill(&mut cache, &IDS, true).unwrap();
    let mut cache = engine.new_cache();
    let n = m.config.n_vocab;
    for (p, &id) in IDS.iter().enumerate() {
        let tok = TokenIn { id, seq: 0, pos: p };
        let one = engine
            .step(&[tok], std::slice::from_mut(&mut cache), &[0])
            .unwrap()
            .to_vec();
        assert_eq!(bits(&one), bits(&all[p * n..(p + 1) * n]), "position {p}");
    }
}

/// Decode attention split across threads (several key blocks per pair,
/// tasks that share a pair, pairs that span tasks) gives the bits of a
/// prefill, whatever the thread count.
#[test]
fn long_decode_matches_prefill_for_any_thread_count() {
    let m = model(&SynthSpec::tiny(GgmlType::Q4_1));
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 97 + 13) % 512).collect();
    let n = m.config.n_vocab;
    let mut engine = Engine::new(m.clone(), 2);
    let mut cache = engine.new_cache();
    let all = engine.prefill(&mut cache, &ids, true).unwrap();
    for threads in [1, 2, 3] {
        let mut engine = Engine::new(m.clone(), threads);
        let mut cache = engine.new_cache();
        engine.prefill(&mut cache, &ids[..100], false).unwrap();
        for (p, &id) in ids.iter().enumerate().skip(100) {
            let tok = TokenIn { id, seq: 0, pos: p };
            let one = engine
                .step(&[tok], std::slice::from_mut(&mut cache), &[0])
                .unwrap()
                .to_vec();
            assert_eq!(
                bits(&one),
                bits(&all[p * n..(p + 1) * n]),
                "{threads} threads, position {p}"
            );
        }
    }
}

#[test]
fn batched_decode_equals_each_sequence_alone() {
    let m = model(&SynthSpec::tiny(GgmlType::Q4_1));
    let prompts: [&[u32]; 3] = [&IDS[..3], &IDS[3..9], &IDS[5..6]];
    let mut engine = Engine::new(m.clone(), 2);
    let n = m.config.n_vocab;
    // Alone: each sequence prefilled, then 4 decode steps of fixed tokens.
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut cache = engine.new_cache();
            engine.prefill(&mut cache, p, false).unwrap();
            (0..4u32)
                .map(|s| {
                    let tok = TokenIn {
                        id: 10 + s,
                        seq: 0,
                        pos: cache.len(),
                    };
                    engine
                        .step(&[tok], std::slice::from_mut(&mut cache), &[0])
                        .unwrap()
                        .to_vec()
                })
                .collect()
        })
        .collect();
    // Together: the same sequences decoded in one batch per step.
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = engine.new_cache();
            engine.prefill(&mut c, p, false).unwrap();
            c
        })
        .collect();
    for s in 0..4u32 {
        let batch: Vec<TokenIn> = (0..3)
            .map(|q| TokenIn {
                id: 10 + s,
                seq: q,
                pos: caches[q].len(),
            })
            .collect();
        let logits = engine
            .step(&batch, &mut caches, &[0, 1, 2])
            .unwrap()
            .to_vec();
        for q in 0..3 {
            assert_eq!(
                bits(&logits[q * n..(q + 1) * n]),
                bits(&alone[q][s as usize]),
                "sequence {q} step {s}"
            );
        }
    }
}

#[test]
fn thread_count_does_not_change_bits() {
    let m = model(&SynthSpec::tiny(GgmlType::Q8_0));
    let run = |threads| {
        let mut engine = Engine::new(m.clone(), threads);
        let mut cache = engine.new_cache();
        bits(&engine.prefill(&mut cache, &IDS, true).unwrap())
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn bad_prompts_are_errors() {
    let m = model(&SynthSpec::tiny(GgmlType::Q4_1));
    let mut engine = Engine::new(m.clone(), 1);
    let e = engine.generate_greedy(&[1, 512], 4, None).unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::TokenOutOfRange {
                id: 512,
                vocab: 512
            }
        ),
        "{e}"
    );
    let long = vec![1u32; 250];
    let e = engine.generate_greedy(&long, 10, None).unwrap_err();
    assert!(
        matches!(e, EngineError::PromptTooLong { limit: 256, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("256"));
    let e = engine.generate_greedy(&[], 4, None).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn greedy_generation_stops_at_the_stop_token_or_the_limit() {
    let m = model(&SynthSpec::tiny(GgmlType::Q4_1));
    let mut engine = Engine::new(m.clone(), 2);
    let g = engine.generate_greedy(&IDS, 12, None).unwrap();
    assert_eq!(g.tokens.len(), 12);
    let stop = g.tokens[4];
    let first = g.tokens.iter().position(|&t| t == stop).unwrap();
    let h = engine.generate_greedy(&IDS, 12, Some(stop)).unwrap();
    assert_eq!(h.tokens, g.tokens[..=first].to_vec());
}
