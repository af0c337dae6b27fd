//! Sampling, incremental detokenization and stop handling.

mod common;

use std::collections::BTreeMap;

use loip::engine::sampler::{
    Detokenizer, FinishReason, Sampler, SamplingError, SamplingParams, StopMatcher, TextStream,
};
use loip::model::gguf::Gguf;
use loip::model::tokenizer::Tokenizer;
use serde_json::Value as Json;

// ---------------------------------------------------------------------------
// Sampling

/// Counts allocations made by the current thread, to check that sampling
/// allocates nothing once the sampler exists.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn sampler(params: SamplingParams, vocab: usize) -> Sampler {
    Sampler::new(params, vocab).expect("valid parameters")
}

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// Logits whose softmax is `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

/// How often each token is drawn in `n` draws.
fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(s.sample(logits, &[])).or_insert(0) += 1;
    }
    counts
}

#[test]
fn greedy_takes_the_argmax_and_the_lowest_id_on_ties() {
    let mut s = sampler(SamplingParams::greedy(), 6);
    assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9, 0.0, 2.0 - 1e-6], &[]), 1);
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, 3.0, 0.0, 0.0], &[]), 1);
    assert_eq!(
        s.sample(&[f32::NAN, -5.0, f32::NAN, -4.0, -6.0, -4.0], &[]),
        3
    );
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 6], &[]), 0);
    // Penalties apply before the argmax.
    let mut s = sampler(
        SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::greedy()
        },
        3,
    );
    assert_eq!(s.sample(&[1.0, 1.5, 0.0], &[1]), 0);
}

/// Pseudo-random logits, the same on every run.
fn noisy_logits(step: usize, vocab: usize) -> Vec<f32> {
    (0..vocab)
        .map(|i| (((i * 7919 + step * 104_729) % 1000) as f32) / 250.0)
        .collect()
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    let vocab = 500;
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 100,
        top_p: 0.95,
        min_p: 0.01,
        repetition_penalty: 1.1,
        frequency_penalty: 0.2,
        ..seeded(1234)
    };
    let run = || {
        let mut s = sampler(params.clone(), vocab);
        let mut history = Vec::new();
        for step in 0..200 {
            let id = s.sample(&noisy_logits(step, vocab), &history);
            history.push(id);
        }
        history
    };
    let first = run();
    assert_eq!(first, run());
    // Not a constant: the draws vary.
    let distinct: std::collections::BTreeSet<_> = first.iter().collect();
    assert!(distinct.len() > 20, "{distinct:?}");
}

#[test]
fn the_stream_for_a_seed_is_pinned() {
    // ChaCha8 from seed 42 (rand_core's seed_from_u64), one 64-bit draw
    // per token, on a flat distribution over 1000 tokens: token
    // floor(1000 * (x >> 11) / 2^53). The ids were computed by a separate
    // ChaCha8 written from the specification, so a change here means seeded
    // outputs changed between versions.
    let mut s = sampler(seeded(42), 1000);
    let flat = vec![0.0f32; 1000];
    let ids: Vec<u32> = (0..8).map(|_| s.sample(&flat, &[])).collect();
    let mut again = sampler(seeded(42), 1000);
    let ids2: Vec<u32> = (0..8).map(|_| again.sample(&flat, &[])).collect();
    assert_eq!(ids, ids2);
    assert_eq!(ids, PINNED_SEED_42);
}

/// See `the_stream_for_a_seed_is_pinned`.
const PINNED_SEED_42: [u32; 8] = [681, 950, 427, 627, 288, 149, 308, 803];

#[test]
fn a_sequence_resumed_after_n_tokens_draws_what_it_would_have() {
    let vocab = 500;
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        ..seeded(77)
    };
    let mut whole = sampler(params.clone(), vocab);
    let all: Vec<u32> = (0..40)
        .map(|step| whole.sample(&noisy_logits(step, vocab), &[]))
        .collect();
    for n in [0usize, 1, 17, 39] {
        // A new sampler (another node, a new plan) from token n on.
        let mut resumed = sampler(params.clone(), vocab);
        resumed.resume_at(n as u64);
        let rest: Vec<u32> = (n..40)
            .map(|step| resumed.sample(&noisy_logits(step, vocab), &[]))
            .collect();
        assert_eq!(rest, all[n..], "resumed at {n}");
    }
    // A draw for every sampled token, even with nothing to draw from.
    let mut a = sampler(params.clone(), vocab);
    a.sample(&[f32::NEG_INFINITY; 500], &[]);
    let mut b = sampler(params, vocab);
    b.resume_at(1);
    let flat = vec![0.0f32; vocab];
    assert_eq!(a.sample(&flat, &[]), b.sample(&flat, &[]));
}

#[test]
fn different_seeds_give_different_tokens() {
    let flat = vec![0.0f32; 1000];
    let draws = |seed| {
        let mut s = sampler(seeded(seed), 1000);
        (0..50).map(|_| s.sample(&flat, &[])).collect::<Vec<u32>>()
    };
    let a = draws(1);
    let b = draws(2);
    assert_ne!(a, b);
    // Almost every position differs: 1/1000 chance each to agree.
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same < 5, "{same} of 50 equal");
    // An unseeded sampler draws its seed from the OS.
    let mut s1 = sampler(SamplingParams::default(), 1000);
    let mut s2 = sampler(SamplingParams::default(), 1000);
    let u1: Vec<u32> = (0..50).map(|_| s1.sample(&flat, &[])).collect();
    let u2: Vec<u32> = (0..50).map(|_| s2.sample(&flat, &[])).collect();
    assert_ne!(u1, u2);
}

#[test]
fn temperature_one_samples_the_softmax() {
    let probs = [0.5, 0.3, 0.2];
    let mut s = sampler(seeded(7), 3);
    let n = 20_000;
    let h = histogram(&mut s, &logits_of(&probs), n);
    for (id, p) in probs.iter().enumerate() {
        let freq = *h.get(&(id as u32)).unwrap_or(&0) as f64 / n as f64;
        // 5 standard deviations at most.
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((freq - p).abs() < 5.0 * sd, "token {id}: {freq} vs {p}");
    }
    // A low temperature sharpens towards the argmax.
    let mut cold = sampler(
        SamplingParams {
            temperature: 0.1,
            ..seeded(7)
        },
        3,
    );
    let h = histogram(&mut cold, &logits_of(&probs), 2000);
    assert!(h[&0] > 1900, "{h:?}");
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    // Ten tokens, probability falling with the id; k = 3.
    let probs: Vec<f64> = (0..10).map(|i| 0.3 / (1.0 + i as f64)).collect();
    let mut s = sampler(
        SamplingParams {
            top_k: 3,
            ..seeded(3)
        },
        10,
    );
    let h = histogram(&mut s, &logits_of(&probs), 3000);
    assert_eq!(h.keys().copied().collect::<Vec<_>>(), [0, 1, 2], "{h:?}");
    // k = 0 disables it: every token can come.
    let mut s = sampler(seeded(3), 10);
    let flat = vec![0.0f32; 10];
    assert_eq!(histogram(&mut s, &flat, 3000).len(), 10);
    // Ties at the cut go to the lowest ids.
    let mut s = sampler(
        SamplingParams {
            top_k: 2,
            ..seeded(3)
        },
        10,
    );
    let h = histogram(&mut s, &flat, 1000);
    assert_eq!(h.keys().copied().collect::<Vec<_>>(), [0, 1], "{h:?}");
}

#[test]
fn top_p_keeps_the_nucleus() {
    let probs = [0.05, 0.5, 0.15, 0.3];
    let nucleus = |top_p: f32| {
        let mut s = sampler(
            SamplingParams {
                top_p,
                ..seeded(11)
            },
            4,
        );
        histogram(&mut s, &logits_of(&probs), 3000)
            .keys()
            .copied()
            .collect::<Vec<_>>()
    };
    // Sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0).
    assert_eq!(nucleus(0.4), [1]);
    assert_eq!(nucleus(0.75), [1, 3]);
    assert_eq!(nucleus(0.9), [1, 2, 3]);
    assert_eq!(nucleus(1.0), [0, 1, 2, 3]);
}

#[test]
fn min_p_drops_unlikely_tokens() {
    let probs = [0.5, 0.3, 0.15, 0.05];
    let support = |min_p: f32| {
        let mut s = sampler(SamplingParams { min_p, ..seeded(5) }, 4);
        histogram(&mut s, &logits_of(&probs), 3000)
            .keys()
            .copied()
            .collect::<Vec<_>>()
    };
    // Floors 0.125, 0.2 and 0.5 times the top probability 0.5.
    assert_eq!(support(0.25), [0, 1, 2]);
    assert_eq!(support(0.4), [0, 1]);
    assert_eq!(support(0.9), [0]);
    assert_eq!(support(0.0), [0, 1, 2, 3]);
}

#[test]
fn truncation_does_not_depend_on_temperature() {
    // min_p works on temperature-1 probabilities (llama.cpp's order), so a
    // high temperature cannot bring back a token it dropped.
    let probs = [0.5, 0.3, 0.15, 0.05];
    let mut s = sampler(
        SamplingParams {
            min_p: 0.25,
            temperature: 50.0,
            ..seeded(9)
        },
        4,
    );
    let h = histogram(&mut s, &logits_of(&probs), 3000);
    assert_eq!(h.keys().copied().collect::<Vec<_>>(), [0, 1, 2], "{h:?}");
}

#[test]
fn penalties_change_the_logits_as_documented() {
    let logits = [2.0f32, -2.0, 1.0, 0.5];
    // Token 0 seen once, token 1 twice, tokens 2 and 3 never; 99 is outside
    // the vocabulary and ignored.
    let history = [1, 0, 1, 99];
    let penalized = |params: SamplingParams| {
        let mut s = sampler(params, 4);
        s.apply_penalties(&logits, &history).to_vec()
    };
    let base = SamplingParams::default();
    assert_eq!(penalized(base.clone()), logits);
    // Repetition: positive logits divided, negative ones multiplied.
    assert_eq!(
        penalized(SamplingParams {
            repetition_penalty: 2.0,
            ..base.clone()
        }),
        [1.0, -4.0, 1.0, 0.5]
    );
    // Frequency: minus count × penalty.
    assert_eq!(
        penalized(SamplingParams {
            frequency_penalty: 0.5,
            ..base.clone()
        }),
        [1.5, -3.0, 1.0, 0.5]
    );
    // Presence: minus the penalty once per seen token.
    assert_eq!(
        penalized(SamplingParams {
            presence_penalty: 0.5,
            ..base.clone()
        }),
        [1.5, -2.5, 1.0, 0.5]
    );
    // All three: repetition first, then the other two.
    assert_eq!(
        penalized(SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: -0.25,
            ..base.clone()
        }),
        [1.0 - 0.5 + 0.25, -4.0 - 1.0 + 0.25, 1.0, 0.5]
    );
    // The counts do not leak into the next call.
    let mut s = sampler(
        SamplingParams {
            frequency_penalty: 1.0,
            ..base
        },
        4,
    );
    s.apply_penalties(&logits, &history);
    assert_eq!(s.apply_penalties(&logits, &[2]), [2.0, -2.0, 0.0, 0.5]);
}

#[test]
fn invalid_parameters_are_rejected_by_name() {
    let base = SamplingParams::default();
    let cases: Vec<(&str, SamplingParams)> = vec![
        (
            "temperature",
            SamplingParams {
                temperature: -0.1,
                ..base.clone()
            },
        ),
        (
            "temperature",
            SamplingParams {
                temperature: f32::NAN,
                ..base.clone()
            },
        ),
        (
            "temperature",
            SamplingParams {
                temperature: f32::INFINITY,
                ..base.clone()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: 0.0,
                ..base.clone()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: 1.5,
                ..base.clone()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: f32::NAN,
                ..base.clone()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: -0.1,
                ..base.clone()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: 1.1,
                ..base.clone()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: f32::NAN,
                ..base.clone()
            },
        ),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: 0.0,
                ..base.clone()
            },
        ),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: -1.0,
                ..base.clone()
            },
        ),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: f32::NAN,
                ..base.clone()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: 2.5,
                ..base.clone()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: f32::NAN,
                ..base.clone()
            },
        ),
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: -3.0,
                ..base.clone()
            },
        ),
        (
            "max_tokens",
            SamplingParams {
                max_tokens: Some(0),
                ..base.clone()
            },
        ),
        (
            "stop",
            SamplingParams {
                stop: vec![String::new()],
                ..base.clone()
            },
        ),
        (
            "stop",
            SamplingParams {
                stop: vec!["x".into(); 100],
                ..base.clone()
            },
        ),
        (
            "stop",
            SamplingParams {
                stop: vec!["x".repeat(5000)],
                ..base.clone()
            },
        ),
    ];
    for (param, params) in cases {
        let err: SamplingError = params.validate().expect_err(param);
        assert_eq!(err.param, param, "{params:?}");
        assert!(err.to_string().contains(param), "{err}");
        assert!(Sampler::new(params, 10).is_err());
    }
    // Only the sampler knows the vocabulary.
    let params = SamplingParams {
        stop_tokens: vec![3, 10],
        ..base.clone()
    };
    assert!(params.validate().is_ok());
    let err = Sampler::new(params, 10).unwrap_err();
    assert_eq!(err.param, "stop_tokens");
    assert_eq!(
        Sampler::new(base.clone(), 0).unwrap_err().param,
        "vocab_size"
    );
    // The limits themselves are fine, and top_k = 0 means "off".
    let edge = SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 1.0,
        repetition_penalty: 0.01,
        presence_penalty: -2.0,
        frequency_penalty: 2.0,
        ..base
    };
    assert!(edge.validate().is_ok());
}

#[test]
fn sampling_allocates_nothing() {
    let vocab = 4096;
    let history: Vec<u32> = (0..300).map(|i| (i * 37) % vocab as u32).collect();
    let logits = noisy_logits(1, vocab);
    // The counter sees this thread's allocations.
    let before = ALLOCATIONS.with(|n| n.get());
    drop(std::hint::black_box(vec![0u8; 16]));
    assert_eq!(ALLOCATIONS.with(|n| n.get()), before + 1);
    let all = [
        SamplingParams::greedy(),
        seeded(1),
        SamplingParams {
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            temperature: 0.7,
            repetition_penalty: 1.2,
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            ..seeded(2)
        },
        SamplingParams {
            top_p: 0.5,
            ..seeded(3)
        },
    ];
    for params in all {
        let mut s = sampler(params.clone(), vocab);
        let before = ALLOCATIONS.with(|n| n.get());
        for _ in 0..20 {
            std::hint::black_box(s.sample(&logits, &history));
        }
        let after = ALLOCATIONS.with(|n| n.get());
        assert_eq!(after - before, 0, "{params:?}");
    }
}

#[test]
#[should_panic(expected = "logits for 3 tokens")]
fn logits_of_the_wrong_length_panic() {
    sampler(SamplingParams::greedy(), 4).sample(&[0.0; 3], &[]);
}

// ---------------------------------------------------------------------------
// Detokenization and stops, on SmolLM2's tokenizer

/// The real SmolLM2 model's tokenizer; a missing file fails the test.
fn smollm2_tokenizer() -> Tokenizer {
    let path = common::smollm2();
    let gguf = Gguf::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    Tokenizer::from_gguf(gguf.metadata()).unwrap()
}

/// Pushes every id; returns what each push emitted, then what finish gave.
fn stream(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
    let mut d = Detokenizer::new(tok);
    let steps = ids.iter().map(|&id| d.push(id).to_string()).collect();
    (steps, d.finish().to_string())
}

#[test]
fn characters_split_across_tokens_are_emitted_whole() {
    let tok = smollm2_tokenizer();
    for text in [
        "emoji 🚀🔥 and symbols ©®™",
        "日本語のテキストと中文",
        "naïve café résumé über",
    ] {
        let ids = tok.encode(text, false).unwrap();
        // Some tokens hold part of a character.
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err()),
            "{text}: no token splits a character"
        );
        let (steps, tail) = stream(&tok, &ids);
        assert_eq!(tail, "");
        assert_eq!(steps.concat(), text);
        assert!(steps.iter().all(|s| !s.contains('\u{FFFD}')), "{steps:?}");
        // Somewhere the text emitted lags the bytes pushed: bytes were held.
        let (mut pushed, mut emitted, mut held) = (0, 0, false);
        for (id, step) in ids.iter().zip(&steps) {
            pushed += tok.token_bytes(*id).len();
            emitted += step.len();
            held |= emitted < pushed;
        }
        assert!(held, "{steps:?}");
    }
    // The rocket alone: four bytes over several tokens, out in one piece.
    let ids = tok.encode("🚀", false).unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let (steps, _) = stream(&tok, &ids);
    assert_eq!(steps.last().unwrap(), "🚀");
    assert!(steps[..steps.len() - 1].iter().all(String::is_empty));
}

#[test]
fn finish_flushes_an_incomplete_character_as_a_replacement() {
    let tok = smollm2_tokenizer();
    // The first token of the rocket: a lead byte without its continuation.
    let first = tok.encode("🚀", false).unwrap()[0];
    let mut d = Detokenizer::new(&tok);
    assert_eq!(d.push(tok.encode("a", false).unwrap()[0]), "a");
    assert_eq!(d.push(first), "");
    assert_eq!(d.finish(), "\u{FFFD}");
    // Invalid bytes in the middle are replaced at once.
    let mut d = Detokenizer::new(&tok);
    assert_eq!(d.push(first), "");
    assert_eq!(d.push(tok.encode("b", false).unwrap()[0]), "\u{FFFD}b");
    assert_eq!(d.finish(), "");
}

#[test]
fn special_tokens_give_no_text_when_streaming() {
    let tok = smollm2_tokenizer();
    let ids = tok
        .encode("<|im_start|>assistant\nHi<|im_end|>", true)
        .unwrap();
    let (steps, _) = stream(&tok, &ids);
    assert_eq!(steps.concat(), "assistant\nHi");
}

#[test]
fn stop_strings_are_found_across_chunks_and_never_emitted() {
    let stops = vec!["###".to_string(), "User:".to_string()];
    let mut m = StopMatcher::new(&stops);
    let mut out = String::new();
    for chunk in ["Hello #", "#", " not a stop; #", "## after"] {
        let step = m.push(chunk);
        out.push_str(step.text);
        if step.stopped.is_some() {
            break;
        }
    }
    assert_eq!(out, "Hello ## not a stop; ");
    assert_eq!(m.stopped(), Some(0));
    assert_eq!(m.finish(), "");
    assert_eq!(m.push("more").text, "");

    // Held text is let out once it cannot be a stop any more.
    let mut m = StopMatcher::new(&stops);
    assert_eq!(m.push("Use").text, "");
    assert_eq!(m.push("d").text, "Used");
    assert_eq!(m.push("Us").text, "");
    assert_eq!(m.finish(), "Us");

    // The earliest stop wins; several in one chunk.
    let mut m = StopMatcher::new(&stops);
    let step = m.push("a User: b ### c");
    assert_eq!((step.text, step.stopped), ("a ", Some(1)));

    // Multi-byte characters are held whole.
    let mut m = StopMatcher::new(&["é!".to_string()]);
    assert_eq!(m.push("caf").text, "caf");
    assert_eq!(m.push("é").text, "");
    assert_eq!(m.push("?").text, "é?");
}

/// The greedy fixture: (generated ids, text without special tokens).
fn greedy_outputs() -> Vec<(Vec<u32>, String)> {
    let path = common::fixtures_dir().join("smollm2/greedy.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let v: Json = serde_json::from_str(line).unwrap();
            let ids = v["greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            (ids, v["greedy_text"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Streams `ids` until the stream finishes.
fn run_stream(
    tok: &Tokenizer,
    params: &SamplingParams,
    ids: &[u32],
) -> (String, Option<FinishReason>, usize) {
    let mut s = TextStream::new(tok, params);
    let mut out = String::new();
    let mut used = 0;
    for &id in ids {
        used += 1;
        let step = s.push(id);
        out.push_str(step.text);
        if step.finish.is_some() {
            break;
        }
    }
    if s.finish_reason().is_none() {
        out.push_str(s.finish());
    }
    (out, s.finish_reason(), used)
}

#[test]
fn text_stream_reproduces_the_greedy_texts() {
    let tok = smollm2_tokenizer();
    for (ids, text) in greedy_outputs() {
        let params = SamplingParams {
            max_tokens: Some(48),
            ..SamplingParams::greedy()
        };
        let (out, finish, used) = run_stream(&tok, &params, &ids);
        assert_eq!(out, text);
        assert_eq!(used, ids.len());
        if ids.last() == Some(&2) {
            // <|im_end|> stops generation and its text is not output.
            assert_eq!(finish, Some(FinishReason::StopToken(2)));
        } else {
            assert_eq!(finish, Some(FinishReason::MaxTokens));
        }
    }
}

#[test]
fn text_stream_stops_on_strings_tokens_and_length() {
    let tok = smollm2_tokenizer();
    // "The capital of France is Paris.<|im_end|>"
    let ids = [504, 3575, 282, 4649, 314, 7042, 30, 2];
    assert_eq!(tok.decode(&ids, true), "The capital of France is Paris.");

    // A stop string across the tokens " is" and " Paris".
    let params = SamplingParams {
        stop: vec!["is Par".into()],
        ..SamplingParams::greedy()
    };
    let (out, finish, used) = run_stream(&tok, &params, &ids);
    assert_eq!(out, "The capital of France ");
    assert_eq!(finish, Some(FinishReason::StopString(0)));
    assert_eq!(used, 6);

    // Held text that turns out not to be a stop comes out before EOS ends it.
    let params = SamplingParams {
        stop: vec!["Paris!".into()],
        ..SamplingParams::greedy()
    };
    let (out, finish, _) = run_stream(&tok, &params, &ids);
    assert_eq!(out, "The capital of France is Paris.");
    assert_eq!(finish, Some(FinishReason::StopToken(2)));

    // Extra stop tokens: " France" (4649) ends it, unprinted.
    let params = SamplingParams {
        stop_tokens: vec![4649],
        ..SamplingParams::greedy()
    };
    let (out, finish, _) = run_stream(&tok, &params, &ids);
    assert_eq!(out, "The capital of");
    assert_eq!(finish, Some(FinishReason::StopToken(4649)));

    // max_tokens.
    let params = SamplingParams {
        max_tokens: Some(3),
        ..SamplingParams::greedy()
    };
    let (out, finish, used) = run_stream(&tok, &params, &ids);
    assert_eq!(
        (out.as_str(), finish, used),
        ("The capital of", Some(FinishReason::MaxTokens), 3)
    );

    // A stop string that the final flush completes is still withheld.
    let params = SamplingParams {
        stop: vec!["Paris.".into()],
        max_tokens: Some(7),
        ..SamplingParams::greedy()
    };
    let (out, finish, _) = run_stream(&tok, &params, &ids);
    assert_eq!(out, "The capital of France is ");
    assert_eq!(finish, Some(FinishReason::StopString(0)));
}
