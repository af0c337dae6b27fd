//! Upgrades: a node of a newer program version with the same wire protocol
//! joins a running cluster; a node of another protocol is refused at the
//! TLS handshake, before any frame is read, with a message that says so on
//! both sides, and the cluster goes on without it.
//!
//! The other versions are played by the same binary through its test knobs
//! `LOIP_TEST_VERSION` and `LOIP_TEST_PROTOCOL` (`src/net/quic.rs`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loip::cluster::shell::read_status;
use loip::net::identity::{create_ca, create_node};
use loip::net::NodeId;

struct Node {
    child: Child,
    data: PathBuf,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

fn drain(mut stderr: ChildStderr) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

fn start(dir: &Path, n: u64, peer: Option<&str>, env: &[(&str, &str)]) -> Node {
    create_node(
        &dir.join("ca"),
        &dir.join(format!("n{n}")),
        NodeId(0x700 + n),
    )
    .unwrap();
    let data = dir.join(format!("d{n}"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loip"));
    cmd.args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--expect",
        "2",
        "--no-mdns",
    ])
    .arg("--data-dir")
    .arg(&data)
    .arg("--identity")
    .arg(dir.join(format!("n{n}")))
    .env("RUST_LOG", "warn")
    .envs(env.iter().copied())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(p) = peer {
        cmd.args(["--peer", p]);
    }
    let mut child = cmd.spawn().expect("starting loip run");
    let log = drain(child.stderr.take().unwrap());
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .last()
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Node {
        child,
        data,
        addr,
        log,
    }
}

/// Waits until every node's committed plan has exactly `members`, agreed.
fn wait_members(nodes: &[&Node], members: &[u64], limit: Duration) -> Result<(), String> {
    let want: Vec<NodeId> = members.iter().map(|&n| NodeId(0x700 + n)).collect();
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < limit {
        let st: Vec<_> = nodes
            .iter()
            .filter_map(|n| read_status(&n.data).ok())
            .collect();
        if st.len() == nodes.len() {
            let mut got: Vec<Vec<NodeId>> = st
                .iter()
                .map(|s| s.membership.committed.ids().collect())
                .collect();
            got.dedup();
            if got.len() == 1 && got[0] == want {
                return Ok(());
            }
            last = format!("{got:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("members never became {want:?}; last seen {last}"))
}

#[test]
fn a_newer_release_joins_and_another_protocol_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    create_ca(&dir.join("ca")).unwrap();
    let a = start(dir, 1, None, &[]);
    let b = start(dir, 2, Some(&a.addr), &[]);
    wait_members(&[&a, &b], &[1, 2], Duration::from_secs(30)).unwrap();

    // A build of another protocol (4; this one speaks 3) dials the
    // cluster: TLS finds no protocol in common, and both sides say so.
    let other = start(dir, 3, Some(&a.addr), &[("LOIP_TEST_PROTOCOL", "4")]);
    let t0 = Instant::now();
    let needle = "speaks another version of the loip protocol";
    while !(other.log().contains(needle) && a.log().contains(needle)) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no version message\n--- node 3:\n{}\n--- node 1:\n{}",
            other.log(),
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(other.log().contains("(loip/4, program"), "{}", other.log());
    assert!(a.log().contains("(loip/3, program"), "{}", a.log());
    // The cluster did not take it in, and still agrees.
    wait_members(&[&a, &b], &[1, 2], Duration::from_secs(10)).unwrap();
    let st = read_status(&other.data).unwrap();
    assert!(
        st.connected.is_empty(),
        "node 3 connected: {:?}",
        st.connected
    );

    // A newer release of the same protocol joins and is planned in.
    let newer = start(dir, 4, Some(&a.addr), &[("LOIP_TEST_VERSION", "0.2.0")]);
    wait_members(&[&a, &b, &newer], &[1, 2, 4], Duration::from_secs(30)).unwrap();
    assert!(!newer.log().contains(needle), "{}", newer.log());
}
