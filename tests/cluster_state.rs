//! A node's state in sled, with real `loip run` processes
//! (RELIABILITY.md, "State on disk"): a zero-byte or garbage database is
//! set aside and rebuilt and the node starts anyway; the term survives a
//! SIGKILL and never goes back.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loip::cluster::shell::{read_status, NodeStatus};
use loip::net::identity::{create_ca, create_node};
use loip::net::NodeId;

struct Proc {
    child: Child,
    first_line: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path, identity: &Path) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args([
            "run",
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            "--expect",
            "1",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--identity")
        .arg(identity)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting loip run");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let first_line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    Proc { child, first_line }
}

/// Waits until the node leads itself.
fn wait_leader(data: &Path) -> Option<NodeStatus> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(s) = read_status(data) {
            if s.membership.leader == Some(s.id) && s.membership.committed.epoch > 0 {
                return Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn set_aside_copies(dir: &Path, name: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}.corrupt-")))
        })
        .collect()
}

/// Files to write into a data directory: (name, bytes).
type Files<'a> = &'a [(&'a str, &'a [u8])];

fn provisioned(dir: &Path) -> PathBuf {
    create_ca(&dir.join("ca")).unwrap();
    create_node(&dir.join("ca"), &dir.join("n1"), NodeId(1)).unwrap();
    dir.join("n1")
}

#[test]
fn a_node_starts_over_a_zero_byte_or_garbage_database() {
    let dir = tempfile::tempdir().unwrap();
    let identity = provisioned(dir.path());
    let mut noise = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..8192)
        .map(|_| {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            noise as u8
        })
        .collect();
    let cases: [(&str, Files); 3] = [
        ("zero", &[("db", b"")]),
        ("garbage", &[("db", &garbage), ("conf", &garbage)]),
        (
            "truncated-conf",
            &[("db", b""), ("conf", b"segment_size: 52")],
        ),
    ];
    for (name, files) in cases {
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).unwrap();
        for (file, bytes) in files {
            std::fs::write(data.join(file), bytes).unwrap();
        }
        // The data directory may hold the model too: it must stay put.
        std::fs::write(data.join("model.gguf"), b"weights").unwrap();
        let p = start(&data, &identity);
        assert!(
            p.first_line.starts_with("node 0000000000000001 listening"),
            "{name}: the node did not start: {:?}",
            p.first_line
        );
        let st = wait_leader(&data).unwrap_or_else(|| panic!("{name}: the node never led"));
        assert_eq!(st.id, NodeId(1), "{name}: the certificate's id is adopted");
        assert!(st.discovery.is_none(), "--no-mdns turns discovery off");
        let aside = set_aside_copies(dir.path(), name);
        assert_eq!(aside.len(), 1, "{name}: the damaged database is kept aside");
        assert!(data.join("model.gguf").is_file(), "{name}: the model moved");
        // (sled may already have written into a zero-byte file it opened.)
        for (file, _) in files {
            assert!(aside[0].join(file).exists(), "{name}: {file} is kept");
        }
    }
}

#[test]
fn the_term_survives_a_kill_and_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let identity = provisioned(dir.path());
    let data = dir.path().join("data");
    let mut last = 0;
    for round in 0..3 {
        let p = start(&data, &identity);
        assert!(p.first_line.starts_with("node "), "{:?}", p.first_line);
        let st = wait_leader(&data).unwrap_or_else(|| panic!("round {round}: never led"));
        assert!(
            st.membership.term > last,
            "round {round}: term {} after {last}",
            st.membership.term
        );
        last = st.membership.term;
        drop(p); // SIGKILL
    }
    assert!(
        set_aside_copies(dir.path(), "data").is_empty(),
        "a healthy database is never set aside"
    );
    assert!(
        !data.join("membership.json").exists() && !data.join("identity.json").exists(),
        "the state is in sled, not in JSON files"
    );
}
