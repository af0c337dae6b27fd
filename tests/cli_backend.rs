//! `--backend` on `loip generate`, `bench` and `serve`: `cpu` runs, `auto`
//! falls back to the CPU with a log line when no GPU can be used, and `cuda`
//! without a usable GPU (or in a build without the `cuda` feature) is one
//! error line naming why, exit code 1. This machine has no GPU: where one
//! is present, the `cuda` and `auto` expectations change and these tests
//! say so rather than fail.

mod common;

use common::cli::{loip, Out};
use tempfile::TempDir;

/// A tiny synthetic model in a temporary folder.
fn tiny_model() -> (TempDir, String) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tiny.gguf");
    let p = path.to_str().unwrap().to_string();
    let o = loip(&["synth", "--out", &p, "--preset", "tiny"]);
    assert_eq!(o.code, Some(0), "synth: {}", o.stderr);
    (dir, p)
}

/// The reason `cuda` must give on this build, or None where a GPU answers
/// (then the expectations below do not hold).
fn expected_reason() -> Option<&'static str> {
    if !cfg!(feature = "cuda") {
        return Some("built without CUDA support");
    }
    if std::path::Path::new("/dev/nvidiactl").exists()
        || std::path::Path::new("/dev/nvhost-ctrl").exists()
    {
        eprintln!("an NVIDIA device node is present: the no-GPU expectations are skipped");
        return None;
    }
    Some("no usable CUDA GPU")
}

fn generate(model: &str, backend: &str) -> Out {
    loip(&[
        "generate",
        "--model",
        model,
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "3",
        "--threads",
        "1",
        "--backend",
        backend,
    ])
}

#[test]
fn cpu_and_auto_generate_the_same_tokens() {
    let (_dir, model) = tiny_model();
    let cpu = generate(&model, "cpu");
    assert_eq!(cpu.code, Some(0), "cpu: {}", cpu.stderr);
    assert!(
        !cpu.stderr.contains("backend"),
        "cpu says nothing: {}",
        cpu.stderr
    );
    let auto = generate(&model, "auto");
    assert_eq!(auto.code, Some(0), "auto: {}", auto.stderr);
    assert_eq!(auto.stdout, cpu.stdout);
    if expected_reason().is_some() {
        assert!(
            auto.stderr.contains("backend auto: using the CPU"),
            "auto names its fallback: {}",
            auto.stderr
        );
    }
}

#[test]
fn cuda_without_a_gpu_is_one_error_line() {
    let Some(reason) = expected_reason() else {
        return;
    };
    let (_dir, model) = tiny_model();
    let cases: [Vec<&str>; 3] = [
        vec![
            "generate",
            "--model",
            &model,
            "--prompt-ids",
            "1,2",
            "--backend",
            "cuda",
        ],
        vec![
            "bench",
            "--model",
            &model,
            "--prompt-tokens",
            "4",
            "--gen-tokens",
            "2",
            "--backend",
            "cuda",
        ],
        vec![
            "serve",
            "--model",
            &model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-mdns",
            "--backend",
            "cuda",
        ],
    ];
    for args in cases {
        let o = loip(&args);
        assert_eq!(o.code, Some(1), "{args:?}: {}", o.stderr);
        let lines: Vec<&str> = o.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {}", o.stderr);
        assert!(lines[0].starts_with("error: "), "{args:?}: {}", o.stderr);
        assert!(lines[0].contains(reason), "{args:?}: {}", o.stderr);
        assert!(o.stdout.is_empty(), "{args:?}: {}", o.stdout);
    }
}

#[test]
fn an_unknown_backend_is_a_usage_error() {
    let o = loip(&[
        "generate",
        "--model",
        "x.gguf",
        "--prompt-ids",
        "1",
        "--backend",
        "gpu",
    ]);
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(
        o.stderr.contains("expected cpu, cuda or auto"),
        "{}",
        o.stderr
    );
}
