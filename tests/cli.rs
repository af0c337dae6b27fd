//! The `loip` binary end to end: every subcommand on the real model and on a
//! tiny synthetic one, and every kind of bad input the user can give, which
//! must end in one line `error: ...` and a non-zero exit, never a panic.
//!
//! Model-running commands use one thread: tests run in parallel on small
//! machines, and oversubscribed compute threads only slow them down.

mod common;

use std::path::{Path, PathBuf};

use common::cli::{fails, loip, ok, ok_json};
use serde_json::Value;
use tempfile::TempDir;

/// The first fixture chat: "What is the capital of France?" in ChatML.
const CHAT_PROMPT: [u32; 16] = [
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];
/// Its greedy continuation, ending with `<|im_end|>` (2).
const CHAT_GREEDY: [u32; 8] = [504, 3575, 282, 4649, 314, 7042, 30, 2];

fn real() -> String {
    common::smollm2().to_str().unwrap().to_string()
}

fn ids(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn as_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// A temp dir holding `tiny.gguf`, written by `loip synth --preset tiny`
/// (2 layers, vocabulary 512, context 256).
fn tiny() -> (TempDir, String) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tiny.gguf");
    let o = ok(&["synth", "--out", path.to_str().unwrap(), "--preset", "tiny"]);
    assert!(o.stdout.contains("tiny.gguf"), "{}", o.stdout);
    assert!(path.exists());
    (dir, path.to_str().unwrap().to_string())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p: PathBuf = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// The real model

#[test]
fn fixture_chat_matches_the_test_constants() {
    let text =
        std::fs::read_to_string(common::fixtures_dir().join("smollm2/greedy.jsonl")).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(as_ids(&first["prompt_ids"]), CHAT_PROMPT);
    assert_eq!(as_ids(&first["greedy_ids"]), CHAT_GREEDY);
}

#[test]
fn inspect_real_model() {
    let m = real();
    let v = ok_json(&["inspect", "--model", &m, "--json"]);
    assert_eq!(v["gguf_version"], 3);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["file_bytes"], 98_362_432);
    let h = &v["hyper"];
    assert_eq!(h["n_layer"], 30);
    assert_eq!(h["n_embd"], 576);
    assert_eq!(h["n_ff"], 1536);
    assert_eq!(h["n_head"], 9);
    assert_eq!(h["n_head_kv"], 3);
    assert_eq!(h["head_dim"], 64);
    assert_eq!(h["n_vocab"], 49152);
    assert_eq!(h["context_length"], 8192);
    assert_eq!(h["eos_token"], 2);
    assert_eq!(h["tied_output"], true);
    assert_eq!(v["n_tensors"], 272);
    let types: Vec<(String, u64)> = v["tensor_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert!(t["bytes"].as_u64().unwrap() > 0);
            (
                t["type"].as_str().unwrap().to_string(),
                t["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        types,
        [("Q4_1".into(), 210), ("Q8_0".into(), 1), ("F32".into(), 61)]
    );
    let sum: u64 = v["tensor_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(v["tensor_bytes"].as_u64().unwrap(), sum);

    let human = ok(&["inspect", "--model", &m]).stdout;
    for s in ["llama", "49152", "8192", "Q4_1", "Q8_0", "F32"] {
        assert!(human.contains(s), "inspect output lacks {s}: {human}");
    }
}

#[test]
fn generate_real_model_reproduces_the_fixture() {
    let m = real();
    let p = ids(&CHAT_PROMPT);
    let v = ok_json(&[
        "generate",
        "--model",
        &m,
        "--prompt-ids",
        &p,
        "--max-tokens",
        "48",
        "--threads",
        "1",
        "--json",
    ]);
    assert_eq!(as_ids(&v["prompt_ids"]), CHAT_PROMPT);
    // Stops at the end token, 2, well before 48 tokens.
    assert_eq!(as_ids(&v["tokens"]), CHAT_GREEDY);
    for k in ["prefill_tok_s", "decode_tok_s"] {
        let x = v["timings"][k].as_f64().unwrap_or(-1.0);
        assert!(
            x.is_finite() && x >= 0.0,
            "timings.{k} = {}",
            v["timings"][k]
        );
    }

    // Human form: the ids, comma-separated; a max-tokens cut-off.
    let o = ok(&[
        "generate",
        "--model",
        &m,
        "--prompt-ids",
        &p,
        "--max-tokens",
        "3",
        "--threads",
        "1",
    ]);
    assert_eq!(o.stdout.trim(), ids(&CHAT_GREEDY[..3]));
}

#[test]
fn score_real_model() {
    let m = real();
    let mut all = CHAT_PROMPT.to_vec();
    all.extend(&CHAT_GREEDY[..2]);
    let v = ok_json(&[
        "score",
        "--model",
        &m,
        "--ids",
        &ids(&all),
        "--threads",
        "1",
        "--json",
    ]);
    let pos = v["positions"].as_array().unwrap();
    assert_eq!(pos.len(), all.len());
    for (i, p) in pos.iter().enumerate() {
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        assert_eq!(p["argmax"], top[0][0]);
        let values: Vec<f64> = top.iter().map(|t| t[1].as_f64().unwrap()).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{values:?}");
        if i + 1 < pos.len() {
            let lp = p["logprob_next"].as_f64().unwrap();
            assert!(lp <= 0.0 && lp.is_finite(), "{lp}");
        } else {
            assert!(p.get("logprob_next").is_none_or(Value::is_null));
        }
    }
    // Teacher-forced: after the prompt, the greedy tokens are predicted.
    let last_prompt = CHAT_PROMPT.len() - 1;
    assert_eq!(pos[last_prompt]["argmax"], CHAT_GREEDY[0]);
    assert_eq!(pos[last_prompt + 1]["argmax"], CHAT_GREEDY[1]);

    let human = ok(&[
        "score",
        "--model",
        &m,
        "--ids",
        "1,4093,198",
        "--threads",
        "1",
    ])
    .stdout;
    assert_eq!(human.lines().count(), 3, "one line per position: {human}");
    assert!(human.lines().next().unwrap().contains("logprob"));
}

#[test]
fn bench_real_model_small() {
    let m = real();
    // One run on one thread of `prompt` tokens and `gen` steps, with `extra`.
    let bench = |prompt: &str, gen: &str, extra: &[&str]| {
        let mut args = vec!["bench", "--model", &m, "--threads", "1", "--repeat", "1"];
        args.extend(["--prompt-tokens", prompt, "--gen-tokens", gen, "--json"]);
        args.extend(extra);
        ok_json(&args)
    };
    let v = bench("32", "4", &[]);
    assert!(!v["isa"].as_str().unwrap().is_empty());
    assert_eq!(v["threads"], 1);
    assert_eq!(v["prompt_tokens"], 32);
    assert_eq!(v["gen_tokens"], 4);
    assert_eq!(v["batch"], 1);
    assert_eq!(v["runs"].as_array().unwrap().len(), 1);
    for k in ["prefill_tok_s", "decode_tok_s"] {
        let s = &v[k];
        let (lo, mid, hi) = (
            s["min"].as_f64().unwrap(),
            s["median"].as_f64().unwrap(),
            s["max"].as_f64().unwrap(),
        );
        assert!(0.0 < lo && lo <= mid && mid <= hi, "{k}: {s}");
    }
    // A step reads every resident weight once, in the kernels' packing (Q4_1
    // 24 bytes a block, the Q8_0 head 36), and the keys and values of the
    // mean position its steps attend to: 32 + (4 + 1) / 2, 46080 bytes each
    // (2 x 30 layers x 192 floats).
    let s = &v["streaming"];
    let want = 106_168_320 / 32 * 24 + 28_311_552 / 32 * 36 + (46_080.0 * 34.5) as u64;
    assert_eq!(s["step_bytes"].as_u64(), Some(want), "{s}");
    for k in ["decode_bytes_per_s", "read_bytes_per_s", "share_of_read"] {
        let x = s[k]["median"].as_f64().unwrap();
        assert!(x.is_finite() && x > 0.0, "{k}: {s}");
    }
    let steps_per_s = v["decode_tok_s"]["median"].as_f64().unwrap();
    let rate = s["decode_bytes_per_s"]["median"].as_f64().unwrap();
    assert!(
        (rate / (want as f64 * steps_per_s) - 1.0).abs() < 1e-9,
        "decode's rate is its bytes per step times steps per second: {s}"
    );

    // Under a budget, streamed units come from storage: no memory baseline.
    let v = bench("8", "2", &["--mem-budget", "70%"]);
    assert!(v.get("placement").is_some(), "{v}");
    assert!(v.get("streaming").is_none(), "{v}");
}

#[test]
fn bad_ids_and_lengths_on_the_real_model() {
    let m = real();
    let e = fails(
        &["generate", "--model", &m, "--prompt-ids", "1,49152,2"],
        &["49152", "vocabulary"],
    );
    assert!(e.contains("49152"), "{e}");
    fails(
        &["score", "--model", &m, "--ids", "1,70000"],
        &["70000", "vocabulary"],
    );
    fails(
        &[
            "generate",
            "--model",
            &m,
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "9000",
        ],
        &["8192", "context"],
    );
}

// ---------------------------------------------------------------------------
// A tiny synthetic model

#[test]
fn every_subcommand_on_a_synthetic_model() {
    let (_dir, m) = tiny();
    let v = ok_json(&["inspect", "--model", &m, "--json"]);
    assert_eq!(v["hyper"]["n_layer"], 2);
    assert_eq!(v["hyper"]["n_vocab"], 512);
    assert_eq!(v["hyper"]["context_length"], 256);

    let v = ok_json(&[
        "generate",
        "--model",
        &m,
        "--prompt-ids",
        "1,20,30",
        "--max-tokens",
        "5",
        "--threads",
        "1",
        "--json",
    ]);
    let tokens = as_ids(&v["tokens"]);
    assert!(!tokens.is_empty() && tokens.len() <= 5, "{tokens:?}");
    assert!(tokens.iter().all(|&t| t < 512));
    // Stops early only at the end token.
    assert!(tokens.len() == 5 || tokens.last() == Some(&2), "{tokens:?}");

    let v = ok_json(&["score", "--model", &m, "--ids", "5,6,7,8", "--json"]);
    assert_eq!(v["positions"].as_array().unwrap().len(), 4);

    let v = ok_json(&[
        "bench",
        "--model",
        &m,
        "--threads",
        "1",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "8",
        "--batch",
        "3",
        "--repeat",
        "2",
        "--json",
    ]);
    assert_eq!(v["batch"], 3);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        assert_eq!(r["prefill_tokens"], 16 * 3);
        assert_eq!(r["decode_tokens"], 8 * 3);
    }
    let human = ok(&[
        "bench",
        "--model",
        &m,
        "--threads",
        "1",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--repeat",
        "1",
    ])
    .stdout;
    assert!(
        human.contains("prefill") && human.contains("decode") && human.contains("plain read"),
        "{human}"
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let (_dir, m) = tiny();
    let long = ids(&[20; 257]);
    fails(&["score", "--model", &m, "--ids", &long], &["257", "256"]);
    fails(
        &["generate", "--model", &m, "--prompt-ids", &long],
        &["257", "256"],
    );
    fails(
        &[
            "generate",
            "--model",
            &m,
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "300",
        ],
        &["context", "256"],
    );
    // The bench's default 512 + 128 tokens do not fit either.
    fails(&["bench", "--model", &m], &["512", "256"]);
    fails(
        &["generate", "--model", &m, "--prompt-ids", "1,512"],
        &["512", "vocabulary"],
    );
}

#[test]
fn unknown_preset_lists_the_valid_ones() {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("x.gguf");
    fails(
        &[
            "synth",
            "--out",
            out.to_str().unwrap(),
            "--preset",
            "huge-9000",
        ],
        &["huge-9000", "tiny", "smollm2-135m-shape"],
    );
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------
// Bad files: each subcommand that reads a model must say what is wrong.

/// Every subcommand that opens a model, with arguments that would be valid.
fn model_commands(model: &str) -> Vec<Vec<String>> {
    let v = |a: &[&str]| {
        let mut args: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        args.splice(1..1, ["--model".to_string(), model.to_string()]);
        args
    };
    vec![
        v(&["inspect"]),
        v(&["generate", "--prompt-ids", "1,2", "--max-tokens", "2"]),
        v(&["score", "--ids", "1,2"]),
        v(&["bench", "--prompt-tokens", "4", "--gen-tokens", "2"]),
    ]
}

fn all_fail(model: &str, needles: &[&str]) {
    for args in model_commands(model) {
        fails(&args, needles);
    }
}

#[test]
fn missing_file() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("no-such-model.gguf");
    all_fail(p.to_str().unwrap(), &["no-such-model.gguf", "No such file"]);
}

#[test]
fn unreadable_file() {
    let dir = TempDir::new().unwrap();
    // A directory is never readable as a file.
    let d = dir.path().join("a-directory.gguf");
    std::fs::create_dir(&d).unwrap();
    all_fail(d.to_str().unwrap(), &["a-directory.gguf"]);

    // A file without read permission; root reads it anyway, so check only
    // where permissions hold.
    use std::os::unix::fs::PermissionsExt;
    let (_t, m) = tiny();
    let locked = write(dir.path(), "locked.gguf", &std::fs::read(&m).unwrap());
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&locked).is_err() {
        all_fail(&locked, &["locked.gguf", "ermission denied"]);
    }
}

#[test]
fn not_a_gguf_file() {
    let dir = TempDir::new().unwrap();
    let text = write(dir.path(), "notes.txt", b"these are not weights\n");
    all_fail(&text, &["notes.txt", "not a GGUF file"]);
    let zeros = write(dir.path(), "zeros.gguf", &[0u8; 4096]);
    all_fail(&zeros, &["zeros.gguf", "not a GGUF file"]);
    let empty = write(dir.path(), "empty.gguf", b"");
    all_fail(&empty, &["empty.gguf", "truncated"]);
}

#[test]
fn unknown_gguf_version() {
    let dir = TempDir::new().unwrap();
    let (_t, m) = tiny();
    let mut bytes = std::fs::read(&m).unwrap();
    bytes[4..8].copy_from_slice(&99u32.to_le_bytes());
    let p = write(dir.path(), "v99.gguf", &bytes);
    all_fail(&p, &["v99.gguf", "version 99"]);
}

#[test]
fn truncated_file() {
    let dir = TempDir::new().unwrap();
    let (_t, m) = tiny();
    let bytes = std::fs::read(&m).unwrap();
    // Cut inside the header's metadata, then inside the tensor data.
    let header_cut = write(dir.path(), "cut-header.gguf", &bytes[..64]);
    all_fail(&header_cut, &["cut-header.gguf", "remain"]);
    let data_cut = write(dir.path(), "cut-data.gguf", &bytes[..bytes.len() / 2]);
    all_fail(&data_cut, &["cut-data.gguf", "past the data section"]);
}

#[test]
fn usage_errors_exit_with_2() {
    let (_dir, m) = tiny();
    for args in [
        vec!["generate", "--model", &m],
        vec!["generate", "--model", &m, "--prompt-ids", "1,x"],
        vec![
            "generate",
            "--model",
            &m,
            "--prompt-ids",
            "1",
            "--threads",
            "0",
        ],
        vec!["score", "--model", &m],
        vec!["bench", "--model", &m, "--batch", "0"],
        vec!["no-such-subcommand"],
    ] {
        let o = loip(&args);
        assert_eq!(o.code, Some(2), "loip {args:?}: {}", o.stderr);
        assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    }
}
