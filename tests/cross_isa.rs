//! The real model gives the same bits on every ISA: each x86 kernel set
//! (`LOIP_ISA`), and aarch64, the Jetsons' ISA, cross-built and run under
//! qemu. A cluster may mix them, and its answers must not depend on which
//! node ran a layer (DESIGN.md §2).
//!
//! `loip score --json` prints every position's top five logits and the
//! log-probability of the next id in shortest round-trip form, so equal
//! output means equal bits.

mod common;

use std::path::PathBuf;
use std::process::Command;

const IDS: &str = "1,504,3458,282,253,1420";

fn score(cmd: &mut Command) -> String {
    let m = common::smollm2();
    let out = cmd
        .args(["score", "--model", m.to_str().unwrap(), "--ids", IDS])
        .args(["--threads", "2", "--json"])
        .output()
        .expect("running loip");
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"positions\""), "{text}");
    text
}

fn native() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loip"))
}

#[test]
fn every_isa_of_this_cpu_scores_the_model_with_the_same_bits() {
    let best = score(&mut native());
    #[allow(unused_mut)]
    let mut isas = vec!["scalar"];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        isas.push("avx2");
    }
    for isa in isas {
        assert_eq!(
            score(native().env("LOIP_ISA", isa)),
            best,
            "{isa} against the best ISA"
        );
    }
}

/// Needs `LOIP_AARCH64_LOIP`, a `loip` built for aarch64-unknown-linux-gnu,
/// and `qemu-aarch64` with the aarch64 libraries under /usr/aarch64-linux-gnu
/// (scripts/setup-test.sh provides them; `LOIP_REQUIRE_AARCH64=1` makes
/// their absence a failure).
#[test]
fn aarch64_scores_the_model_with_the_same_bits_as_this_cpu() {
    let require = std::env::var_os("LOIP_REQUIRE_AARCH64").is_some_and(|v| v == "1");
    let skip = |why: &str| {
        assert!(!require, "LOIP_REQUIRE_AARCH64=1 but {why}");
        eprintln!("skipped: {why}");
    };
    let Some(bin) = std::env::var_os("LOIP_AARCH64_LOIP").map(PathBuf::from) else {
        return skip("LOIP_AARCH64_LOIP (a loip built for aarch64) is not set");
    };
    if !bin.is_file() {
        return skip(&format!("{} is not a file", bin.display()));
    }
    if Command::new("qemu-aarch64")
        .arg("--version")
        .output()
        .is_err()
    {
        return skip("qemu-aarch64 is not installed");
    }
    let mut arm = Command::new("qemu-aarch64");
    arm.args(["-L", "/usr/aarch64-linux-gnu"]).arg(&bin);
    assert_eq!(
        score(&mut arm),
        score(&mut native()),
        "aarch64 against this CPU"
    );
}
