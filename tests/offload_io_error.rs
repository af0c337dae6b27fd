//! A real I/O error from storage (EIO, from a FUSE file system in
//! `tests/tools/eio_fs.py`) while the engine loads or streams weights: an
//! error naming the tensor, never a crash, and a server that keeps serving.
//!
//! Mounting FUSE needs root, `/dev/fuse`, `fusermount3` and Debian's
//! `python3-fusepy`; without them the tests print why and pass, except
//! when `LOIP_REQUIRE_FUSE` is set (`scripts/setup-test.sh` sets it as
//! root, after installing them), where they fail instead.

mod serve_util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serve_util::{chat_body, common, Server};
use tempfile::TempDir;

const PYTHON: &str = "/usr/bin/python3";

/// Why FUSE cannot be used here, if it cannot.
fn missing() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !ok(Command::new("fusermount3").arg("-V")) {
        return Some("no fusermount3 (Debian package fuse3)".into());
    }
    if !ok(Command::new(PYTHON).args(["-c", "import fusepy"])) {
        return Some("no python3-fusepy".into());
    }
    None
}

fn usable(test: &str) -> bool {
    match missing() {
        None => true,
        Some(why) if std::env::var_os("LOIP_REQUIRE_FUSE").is_some() => {
            panic!("{test}: FUSE is required here (LOIP_REQUIRE_FUSE) but {why}")
        }
        Some(why) => {
            println!("skipping {test}: {why}");
            false
        }
    }
}

/// SmolLM2 seen through the failing file system. Reads past the model's
/// header fail while `flag` exists.
struct FailingMount {
    dir: TempDir,
    child: Child,
    model: PathBuf,
    flag: PathBuf,
}

impl FailingMount {
    fn new() -> FailingMount {
        let source = common::smollm2();
        let dir = TempDir::new().unwrap();
        let at = dir.path().join("mnt");
        std::fs::create_dir(&at).unwrap();
        let flag = dir.path().join("fail");
        // Past the metadata (1.7 MB in this file): every tensor's data.
        let min_offset = 2 << 20;
        let child = Command::new(PYTHON)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tools/eio_fs.py"
            ))
            .arg(&source)
            .arg(&at)
            .arg(&flag)
            .arg(min_offset.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start eio_fs.py");
        let model = at.join(source.file_name().unwrap());
        let t0 = Instant::now();
        while !model.exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "FUSE never mounted");
            std::thread::sleep(Duration::from_millis(50));
        }
        FailingMount {
            dir,
            child,
            model,
            flag,
        }
    }

    fn fail(&self, on: bool) {
        if on {
            std::fs::write(&self.flag, b"").unwrap();
        } else {
            std::fs::remove_file(&self.flag).unwrap();
        }
    }
}

impl Drop for FailingMount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(self.dir.path().join("mnt"))
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_storage_error_while_loading_is_an_error_not_a_crash() {
    if !usable("a_storage_error_while_loading_is_an_error_not_a_crash") {
        return;
    }
    let mount = FailingMount::new();
    mount.fail(true);
    let out = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args([
            "generate",
            "--prompt-ids",
            "1,4093,198",
            "--max-tokens",
            "2",
        ])
        .args(["--mem-budget", "70%", "--threads", "2", "--model"])
        .arg(&mount.model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Exit code 1, not a signal (SIGBUS from a page fault on the mapping).
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains("Input/output error"), "{err}");
    assert!(lines[0].contains(".weight"), "names the tensor: {err}");
}

#[test]
fn a_streamed_read_error_fails_the_request_and_the_server_goes_on() {
    if !usable("a_streamed_read_error_fails_the_request_and_the_server_goes_on") {
        return;
    }
    let mount = FailingMount::new();
    // 150 MiB, with the KV cache of two sequences of 512 tokens: some of
    // the 98 MB model's units are streamed from the file every step.
    let server = Server::start_model(
        &mount.model,
        "127.0.0.1",
        &[
            "--mem-budget",
            "150MiB",
            "--max-batch",
            "2",
            "--context",
            "512",
            // The fixed reservation, so that units stream from the start
            // (adaptation would keep all of them resident at this budget).
            "--no-adapt",
        ],
    );
    let body = chat_body("What is the capital of France?", 8, false);
    let first = server.post("/v1/chat/completions", &body);
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let answer = first.json()["choices"][0]["message"]["content"].clone();
    // Units really are streamed from the failing file system.
    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    let read: f64 = metrics
        .lines()
        .find(|l| l.starts_with("loip_storage_read_bytes_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("loip_storage_read_bytes_total in /metrics");
    assert!(read > 0.0, "{metrics}");

    mount.fail(true);
    let failed = server.post("/v1/chat/completions", &body);
    assert!(
        failed.status >= 500,
        "status {}: {}",
        failed.status,
        String::from_utf8_lossy(&failed.body)
    );
    let message = failed.error();
    assert!(message.contains("Input/output error"), "{message}");
    // It names the unit that could not be read.
    assert!(
        message.contains("reading attn.") || message.contains("reading mlp."),
        "{message}"
    );
    assert_eq!(server.get("/health").status, 200);

    // Storage back: the same request gives the same answer as before.
    mount.fail(false);
    let again = server.post("/v1/chat/completions", &body);
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["choices"][0]["message"]["content"], answer);
}
