//! Offloading: exact at every budget, the budget honoured, bad input caught.

mod common;

use std::path::{Path, PathBuf};

use loip::engine::forward::TokenIn;
use loip::engine::generate::Engine;
use loip::engine::offload::{
    open_offloaded, place, Budget, BudgetError, Demand, LoadMode, OffloadSpec, Placement,
};
use loip::engine::weights::{Model, Unit};
use loip::engine::EngineError;
use loip::model::dtype::GgmlType;
use loip::model::synth::SynthSpec;

const PROMPTS: [&[u32]; 2] = [
    &[1, 17, 300, 42, 42, 5, 511, 0, 99, 256, 7, 8, 9],
    &[3, 4, 5, 6, 200],
];
const DEMAND: Demand = Demand {
    batch: 2,
    positions: 32,
    slots: 2,
};

fn spec(weights: GgmlType) -> SynthSpec {
    SynthSpec {
        n_layer: 6,
        n_embd: 256,
        n_ff: 768,
        n_head: 4,
        n_head_kv: 2,
        n_vocab: 512,
        context_length: 256,
        weights,
        embeddings: GgmlType::Q8_0,
        tied_output: false,
        rope_freqs: false,
        seed: 5,
    }
}

fn write_model(dir: &Path, weights: GgmlType) -> PathBuf {
    let path = dir.join(format!("m-{weights}.gguf"));
    spec(weights).write(&path).unwrap();
    path
}

fn open(path: &Path, budget: Budget, mode: LoadMode) -> Result<(Engine, Placement), EngineError> {
    open_offloaded(
        path,
        &OffloadSpec {
            budget,
            demand: DEMAND,
            threads: 2,
            mode,
        },
    )
}

/// Logits of both prompts (every position), then three batched decode steps.
fn run(engine: &mut Engine) -> Vec<u32> {
    let mut out = Vec::new();
    let mut caches: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let mut c = engine.new_cache();
            out.extend(
                engine
                    .prefill(&mut c, p, true)
                    .unwrap()
                    .iter()
                    .map(|f| f.to_bits()),
            );
            c
        })
        .collect();
    for step in 0..3u32 {
        let batch: Vec<TokenIn> = (0..2)
            .map(|s| TokenIn {
                id: 40 + step + s as u32,
                seq: s,
                pos: caches[s].len(),
            })
            .collect();
        out.extend(
            engine
                .step(&batch, &mut caches, &[0, 1])
                .unwrap()
                .iter()
                .map(|f| f.to_bits()),
        );
    }
    out
}

fn minimum(path: &Path) -> u64 {
    let model = Model::from_gguf(std::sync::Arc::new(
        loip::model::gguf::Gguf::open(path).unwrap(),
    ))
    .unwrap();
    match place(&model, 0, DEMAND, 2) {
        Err(BudgetError::TooSmall { minimum, .. }) => minimum,
        other => panic!("a zero budget must be too small, got {other:?}"),
    }
}

#[test]
fn logits_are_bit_identical_at_every_budget() {
    let dir = tempfile::tempdir().unwrap();
    for weights in [GgmlType::Q4_1, GgmlType::F16] {
        let path = write_model(dir.path(), weights);
        let (mut all, p) = open(&path, Budget::Bytes(1 << 40), LoadMode::Prefetch).unwrap();
        assert!(
            p.streamed.is_empty(),
            "an unlimited budget keeps everything resident"
        );
        let want = run(&mut all);
        let min = minimum(&path);
        let full = p.accounting.total();
        // From nearly everything resident down to the minimum.
        let budgets: Vec<Budget> = [0.95, 0.7, 0.45, 0.2, 0.0]
            .iter()
            .map(|&f| Budget::Bytes(min + ((full - min) as f64 * f) as u64))
            .collect();
        let mut kinds_streamed = std::collections::BTreeSet::new();
        for budget in budgets {
            let (mut e, p) = match open(&path, budget, LoadMode::Prefetch) {
                Ok(x) => x,
                Err(EngineError::Budget(BudgetError::TooSmall { .. })) => continue,
                Err(e) => panic!("{weights} {budget:?}: {e}"),
            };
            assert!(
                p.accounting.total() <= p.accounting.budget,
                "{weights} {budget:?}: {:?}",
                p.accounting
            );
            for u in &p.streamed {
                kinds_streamed.insert(match u {
                    Unit::Attn(_) => 0,
                    Unit::Mlp(_) => 1,
                    Unit::Head => 2,
                });
            }
            assert_eq!(
                run(&mut e),
                want,
                "{weights} at {budget:?} ({} streamed)",
                p.streamed.len()
            );
            let stats = e.load_stats().unwrap();
            assert!(
                p.streamed.is_empty() || stats.units_read > 0,
                "{weights} {budget:?}: nothing was read"
            );
        }
        assert_eq!(
            kinds_streamed.len(),
            3,
            "{weights}: attention, MLP and head each streamed at some budget"
        );
        let (mut at_min, p) = open(&path, Budget::Bytes(min), LoadMode::Prefetch).unwrap();
        assert_eq!(
            p.streamed.len(),
            Unit::all(6).len(),
            "the minimum budget streams every unit"
        );
        assert_eq!(run(&mut at_min), want);
        for mode in [LoadMode::OnDemand, LoadMode::Mapped] {
            let (mut e, _) = open(&path, Budget::Bytes((min + full) / 2), mode).unwrap();
            assert_eq!(run(&mut e), want, "{weights} {mode:?}");
        }
    }
}

#[test]
fn a_budget_too_small_states_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), GgmlType::Q4_1);
    let min = minimum(&path);
    let Err(e) = open(&path, Budget::Bytes(min - 1), LoadMode::Prefetch) else {
        panic!("one byte under the minimum must not fit");
    };
    let msg = e.to_string();
    assert!(msg.contains(&min.to_string()), "{msg}");
    assert!(msg.contains("at least"), "{msg}");
    assert!(open(&path, Budget::Bytes(min), LoadMode::Prefetch).is_ok());
}

#[test]
fn placement_prefers_streaming_attention_when_mlps_fit() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), GgmlType::F16);
    let model = Model::from_gguf(std::sync::Arc::new(
        loip::model::gguf::Gguf::open(&path).unwrap(),
    ))
    .unwrap();
    // Exactly the room to stream three attention units through two slots:
    // streaming any MLP or the head would move more bytes per step.
    let full = place(&model, u64::MAX, DEMAND, 2).unwrap().accounting;
    let attn = model.resident_bytes(Unit::Attn(0));
    let span = loip::engine::loader::Span::of(&model, Unit::Attn(0)).len;
    let budget = full.total() - 3 * attn + 2 * span;
    assert!(budget < full.total());
    let p = place(&model, budget, DEMAND, 2).unwrap();
    assert_eq!(p.streamed.len(), 3, "{:?}", p.streamed);
    assert!(
        p.streamed.iter().all(|u| matches!(u, Unit::Attn(_))),
        "{:?}",
        p.streamed
    );
    assert!(p.accounting.total() <= budget);
}

#[test]
fn a_model_file_that_changes_while_streaming_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), GgmlType::Q4_1);
    let min = minimum(&path);
    let (mut e, p) = open(&path, Budget::Bytes(min), LoadMode::Prefetch).unwrap();
    assert!(!p.streamed.is_empty());
    let mut cache = e.new_cache();
    e.prefill(&mut cache, PROMPTS[0], false).unwrap();
    // Grow the file: its size no longer matches what was loaded.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 8192]).unwrap();
    drop(f);
    // The loader may have read ahead before the change; within a few steps
    // the change must surface as an error naming it.
    let mut seen = None;
    for _ in 0..4 {
        let tok = TokenIn {
            id: 7,
            seq: 0,
            pos: cache.len(),
        };
        if let Err(err) = e.step(&[tok], std::slice::from_mut(&mut cache), &[0]) {
            seen = Some(err.to_string());
            break;
        }
    }
    let msg = seen.expect("a changed file must be reported");
    assert!(msg.contains("changed on disk"), "{msg}");
    // The engine stays usable: the next request fails cleanly too.
    let mut fresh = e.new_cache();
    let err = e.prefill(&mut fresh, PROMPTS[1], false).unwrap_err();
    assert!(err.to_string().contains("changed on disk"), "{err}");
}

/// Peak resident memory of `loip generate` run as a child process.
fn peak_rss(model: &Path, budget: Option<&str>) -> u64 {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loip"));
    cmd.args(["generate", "--model"]).arg(model);
    cmd.args([
        "--prompt-ids",
        "1,2,3,4,5,6,7,8",
        "--max-tokens",
        "8",
        "--threads",
        "2",
        "--json",
    ]);
    if let Some(b) = budget {
        cmd.args(["--mem-budget", b]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["timings"]["peak_rss_bytes"]
        .as_u64()
        .expect("peak_rss_bytes in the timings")
}

#[test]
fn a_child_process_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("budget-test.gguf");
    SynthSpec::preset("budget-test")
        .unwrap()
        .write(&path)
        .unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    const OVERHEAD: u64 = 64 << 20;
    let budget = 80u64 << 20;
    let unbounded = peak_rss(&path, None);
    // The measurement can fail: without a budget the whole model is resident.
    assert!(
        unbounded > budget + OVERHEAD,
        "peak {unbounded} without a budget, model {size}"
    );
    let bounded = peak_rss(&path, Some("80MiB"));
    assert!(
        bounded <= budget + OVERHEAD,
        "peak RSS {bounded} over the budget {budget} plus {OVERHEAD} of runtime overhead"
    );
    eprintln!(
        "model {size} B: peak RSS {unbounded} B resident, {bounded} B under an 80 MiB budget"
    );
}

#[test]
fn cli_budget_errors_are_one_line_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), GgmlType::Q4_1);
    let run = |budget: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loip"))
            .args(["generate", "--model"])
            .arg(&path)
            .args([
                "--prompt-ids",
                "1,2,3",
                "--max-tokens",
                "2",
                "--mem-budget",
                budget,
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run("300MiBs");
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("MiBs") && err.contains("KiB, MiB, GiB"),
        "{err}"
    );
    let (code, err) = run("1KiB");
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("at least") && err.contains("MiB"), "{err}");
    assert!(!err.contains("panicked"));
    let (code, err) = run("100%");
    assert_eq!(code, Some(0), "{err}");
}
