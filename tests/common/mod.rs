//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod chat;
pub mod cli;
pub mod cluster;
pub mod ring;

use std::path::PathBuf;

/// The models directory: `$LOIP_MODELS_DIR`, else `models/` in the repo.
pub fn models_dir() -> PathBuf {
    std::env::var_os("LOIP_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// The real SmolLM2 model. Fails the test, with the fix, when it is absent:
/// the fixtures are required, never silently skipped.
pub fn smollm2() -> PathBuf {
    let p = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh (or set LOIP_MODELS_DIR)",
        p.display()
    );
    p
}

/// The shared fixtures: `$LOIP_FIXTURES`, else `../shared/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    let p = std::env::var_os("LOIP_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(
        p.exists(),
        "fixtures not found at {} (set LOIP_FIXTURES)",
        p.display()
    );
    p
}

/// A small deterministic generator for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// Spawns `cmd`, a `loip run` with its standard output piped, and waits
/// (20 s at most) for its first line, `node ID listening on ADDR`; returns
/// the child and ADDR.
pub fn spawn_node(cmd: &mut std::process::Command) -> (std::process::Child, String) {
    use std::io::Read;
    let mut child = cmd.spawn().expect("starting loip run");
    let mut stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Byte by byte: the rest of the output stays unread, and the
        // child never blocks on a full pipe for this line.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while stdout.read(&mut b).is_ok_and(|n| n == 1) && b[0] != b'\n' {
            line.push(b[0]);
        }
        let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the node reports its address");
    let addr = line
        .split_whitespace()
        .last()
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, addr)
}
