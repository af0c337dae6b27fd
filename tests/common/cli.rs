//! Running the `loip` binary as a user would, for the command-line tests:
//! a command must succeed, or fail with one line `error: ...` and never a
//! panic.

use std::ffi::OsStr;
use std::process::Command;

use serde_json::Value;

/// What a run of `loip` ended with.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `loip` with `args`, without the backtrace, log and data-directory
/// settings of the environment the tests run in.
pub fn loip<S: AsRef<OsStr>>(args: &[S]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LOG")
        .env_remove("LOIP_DATA_DIR")
        .output()
        .expect("running the loip binary");
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `args` as text, for messages.
pub fn shown<S: AsRef<OsStr>>(args: &[S]) -> Vec<String> {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect()
}

/// Runs a command that must succeed.
pub fn ok<S: AsRef<OsStr>>(args: &[S]) -> Out {
    let o = loip(args);
    assert_eq!(
        o.code,
        Some(0),
        "loip {:?} failed: {}",
        shown(args),
        o.stderr
    );
    o
}

/// Runs a command that must succeed and print one JSON object.
pub fn ok_json<S: AsRef<OsStr>>(args: &[S]) -> Value {
    let o = ok(args);
    assert_eq!(
        o.stdout.lines().count(),
        1,
        "one line of JSON: {}",
        o.stdout
    );
    serde_json::from_str(&o.stdout).expect("valid JSON")
}

/// Runs a command that must fail with exit code 1 and one line on stderr
/// naming the problem: each of `needles` must appear in it. Returns the
/// line.
pub fn fails<S: AsRef<OsStr>>(args: &[S], needles: &[&str]) -> String {
    let o = loip(args);
    let args = shown(args);
    assert_eq!(
        o.code,
        Some(1),
        "loip {args:?}: exit code; stderr {}",
        o.stderr
    );
    assert!(
        !o.stderr.contains("panicked") && !o.stderr.contains("internal error"),
        "loip {args:?} panicked: {}",
        o.stderr
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "loip {args:?}: one line, got {:?}",
        o.stderr
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for n in needles {
        assert!(
            lines[0].contains(n),
            "loip {args:?}: {:?} does not mention {n:?}",
            lines[0]
        );
    }
    assert!(o.stdout.is_empty(), "nothing on stdout: {}", o.stdout);
    lines[0].to_string()
}
