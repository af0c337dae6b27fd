//! The cluster's serving figures (issue #8), with three real `loip run
//! --http` processes on 127.0.0.1, the real SmolLM2 and budgets that make
//! every plan stream layers: while and after requests go through one node,
//! another node's `/metrics` shows every ring member's KV (used, at most
//! what is held), loading bubbles on each node that streams, bytes on every
//! link of the ring and none where no member sends, and a backlog back at
//! 0 once idle; its `/v1/cluster` carries the same figures; and a member
//! that is killed drops out of the figures.

mod serve_util;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loip::net::identity::{create_ca, create_node};
use loip::net::NodeId;
use serde_json::json;
use serve_util::{common, request, Resp, Stream};

struct Node {
    child: Child,
    http: SocketAddr,
    quic: String,
    stderr: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn get(&self, path: &str) -> Resp {
        request(self.http, "GET", path, &[], b"")
    }

    fn metrics(&self) -> Metrics {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200);
        Metrics::parse(&String::from_utf8(r.body).unwrap())
    }
}

fn id(n: u64) -> String {
    NodeId(0x50 + n).to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &Path, n: u64, peer: Option<&str>) -> Node {
    create_node(
        &dir.join("ca"),
        &dir.join(format!("n{n}")),
        NodeId(0x50 + n),
    )
    .unwrap();
    let stderr = dir.join(format!("stderr{n}"));
    let device = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/devices/emu-a.toml");
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loip"));
    cmd.args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--no-mdns",
        "--expect",
        "3",
    ])
    .arg("--data-dir")
    .arg(dir.join(format!("d{n}")))
    .arg("--identity")
    .arg(dir.join(format!("n{n}")))
    .arg("--device")
    .arg(&device)
    // Budgets that make every plan stream layers.
    .args(["--mem-budget", "60MiB", "--model"])
    .arg(common::smollm2())
    .arg("--http")
    .arg(http.to_string())
    .env("RUST_LOG", "info")
    .env("LOIP_RING_THREADS", "1")
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&stderr).unwrap());
    if let Some(peer) = peer {
        cmd.args(["--peer", peer]);
    }
    let (child, quic) = common::spawn_node(&mut cmd);
    Node {
        child,
        http,
        quic,
        stderr,
    }
}

fn logs(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| std::fs::read_to_string(&n.stderr).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n----\n")
}

/// Waits until every node's /health is 200 on one plan epoch.
fn wait_healthy(nodes: &[Node]) -> u64 {
    let t0 = Instant::now();
    loop {
        while nodes
            .iter()
            .any(|n| std::net::TcpStream::connect(n.http).is_err())
        {
            assert!(t0.elapsed() < Duration::from_secs(20), "no HTTP API");
            std::thread::sleep(Duration::from_millis(50));
        }
        let h: Vec<Resp> = nodes.iter().map(|n| n.get("/health")).collect();
        if h.iter().all(|r| r.status == 200) {
            let epochs: Vec<u64> = h
                .iter()
                .map(|r| r.json()["plan_epoch"].as_u64().unwrap())
                .collect();
            if epochs.iter().all(|&e| e == epochs[0] && e > 0) {
                return epochs[0];
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "never healthy{}",
            logs(nodes)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A sample's labels, by name.
type Labels = BTreeMap<String, String>;

/// The samples of a `/metrics` text, by family and labels.
struct Metrics {
    text: String,
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut samples: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').unwrap()),
                None => (series, ""),
            };
            // Node ids need no escaping: a plain split will do.
            let labels: Labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            samples
                .entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// The value of family `name` for node `node`.
    fn node(&self, name: &str, node: &str) -> Option<f64> {
        self.samples
            .get(name)?
            .iter()
            .find_map(|(l, v)| (l.get("node").map(String::as_str) == Some(node)).then_some(*v))
    }

    /// Bytes over each link, by (from, to).
    fn links(&self) -> BTreeMap<(String, String), f64> {
        self.samples
            .get("loip_link_bytes_total")
            .into_iter()
            .flatten()
            .map(|(l, v)| ((l["from"].clone(), l["to"].clone()), *v))
            .collect()
    }

    /// The figures a node's `/v1/cluster` entry should repeat.
    fn figures(&self, node: &str) -> Vec<Option<f64>> {
        [
            "loip_kv_bytes",
            "loip_kv_capacity_bytes",
            "loip_loading_bubbles_total",
            "loip_loading_bubble_seconds_total",
            "loip_ring_tokens_total",
        ]
        .iter()
        .map(|f| self.node(f, node))
        .collect()
    }
}

/// The ring as `/v1/cluster` shows it: member ids in ring order, the
/// head, the members with streamed units, and the links activations and
/// tokens take (from each window's node to the next's, and from the last
/// window's to the head).
struct Ring {
    members: Vec<String>,
    head: String,
    streaming: BTreeSet<String>,
    links: BTreeSet<(String, String)>,
}

fn ring(view: &serde_json::Value) -> Ring {
    let nodes = view["nodes"].as_array().unwrap();
    let mut windows: Vec<(u64, String)> = Vec::new();
    let mut streaming = BTreeSet::new();
    for n in nodes {
        let id = n["id"].as_str().unwrap().to_string();
        for w in n["windows"].as_array().unwrap() {
            windows.push((w["index"].as_u64().unwrap(), id.clone()));
            if !w["streamed"].as_array().unwrap().is_empty() {
                streaming.insert(id.clone());
            }
        }
    }
    windows.sort();
    let order: Vec<&String> = windows.iter().map(|(_, id)| id).collect();
    let head = order[0].clone();
    let links: BTreeSet<(String, String)> = order
        .windows(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .chain([(order[order.len() - 1].clone(), head.clone())])
        .filter(|(a, b)| a != b)
        .collect();
    Ring {
        members: nodes
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_string())
            .collect(),
        head,
        streaming,
        links,
    }
}

fn story() -> String {
    json!({
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}],
        "max_tokens": 400,
        "temperature": 0.8,
        "seed": 11,
        "stream": true,
    })
    .to_string()
}

/// Polls `/metrics` on `node` until `check` passes (it says what is
/// missing otherwise), for at most `limit`.
fn wait_for(
    node: &Node,
    limit: Duration,
    nodes: &[Node],
    mut check: impl FnMut(&Metrics) -> Result<(), String>,
) -> Metrics {
    let t0 = Instant::now();
    loop {
        let m = node.metrics();
        match check(&m) {
            Ok(()) => return m,
            Err(why) => assert!(t0.elapsed() < limit, "{why}\n{}\n{}", m.text, logs(nodes)),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn every_members_kv_bubbles_links_and_backlog_show_on_any_node() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    create_ca(&dir.join("ca")).unwrap();
    let a = start(dir, 1, None);
    let b = start(dir, 2, Some(&a.quic));
    let c = start(dir, 3, Some(&a.quic));
    let mut nodes = vec![a, b, c];
    let epoch = wait_healthy(&nodes);
    let view = nodes[2].get("/v1/cluster").json();
    assert_eq!(view["plan_epoch"], epoch, "{view}");
    let r = ring(&view);
    let want: BTreeSet<String> = (1..=3).map(id).collect();
    assert_eq!(r.members.iter().cloned().collect::<BTreeSet<_>>(), want);
    assert!(
        !r.streaming.is_empty(),
        "the budgets make the plan stream: {view}"
    );
    assert!(!r.links.is_empty(), "{view}");

    // A long answer through node 1; node 3's metrics are read meanwhile:
    // every member's KV fills and its tokens flow.
    let mut s = Stream::open(nodes[0].http, "/v1/chat/completions", &story());
    assert_eq!(s.status, 200);
    let mut kv_seen = BTreeSet::new();
    let mut rate_seen = BTreeSet::new();
    let mut last_poll = Instant::now();
    let mut chunks = 0;
    while let Some(d) = s.next_data() {
        if d == "[DONE]" {
            break;
        }
        chunks += 1;
        if last_poll.elapsed() < Duration::from_millis(300) {
            continue;
        }
        last_poll = Instant::now();
        let m = nodes[2].metrics();
        for n in &r.members {
            let used = m.node("loip_kv_bytes", n).unwrap_or(0.0);
            let cap = m.node("loip_kv_capacity_bytes", n).unwrap_or(0.0);
            assert!(used <= cap, "{n}: KV used {used} > held {cap}\n{}", m.text);
            if used > 0.0 {
                kv_seen.insert(n.clone());
            }
            if m.node("loip_tokens_per_second", n).unwrap_or(0.0) > 0.0 {
                rate_seen.insert(n.clone());
            }
        }
    }
    assert!(
        chunks > 50,
        "a long answer: {chunks} chunks{}",
        logs(&nodes)
    );
    assert_eq!(
        kv_seen, want,
        "every member's KV was seen in use during the answer"
    );
    assert_eq!(rate_seen, want, "every member's tokens/s was seen above 0");

    // Two more, at once through the other nodes.
    let asks: Vec<_> = [1, 2]
        .iter()
        .map(|&i| {
            let addr = nodes[i].http;
            std::thread::spawn(move || {
                let body = json!({
                    "messages": [{"role": "user", "content": "Name three colours."}],
                    "max_tokens": 24, "temperature": 0,
                })
                .to_string();
                request(addr, "POST", "/v1/chat/completions", &[], body.as_bytes())
            })
        })
        .collect();
    for h in asks {
        assert_eq!(h.join().unwrap().status, 200);
    }

    // Once idle (every member's figures are of a gossip round with no
    // tokens): every member still holds KV but uses none (the ended
    // requests released theirs), and has no backlog; each node that
    // streams waited for loads; every link of the ring carried bytes; no
    // member sent to a member that is not its next (the head tells every
    // member when a request ends, so its own sends are not checked).
    let idle = wait_for(&nodes[2], Duration::from_secs(40), &nodes, |m| {
        for n in &r.members {
            let rate = m.node("loip_tokens_per_second", n);
            if rate != Some(0.0) {
                return Err(format!("{n}: {rate:?} tokens/s, not idle yet"));
            }
        }
        for n in &r.members {
            let cap = m.node("loip_kv_capacity_bytes", n).unwrap_or(0.0);
            let used = m.node("loip_kv_bytes", n);
            if cap <= 0.0 || used != Some(0.0) {
                return Err(format!("{n}: idle, KV used {used:?}, held {cap}"));
            }
            let backlog = m.node("loip_ring_backlog_seconds", n);
            if backlog != Some(0.0) {
                return Err(format!("{n}: backlog {backlog:?} when idle"));
            }
            if m.node("loip_ring_epoch", n) != Some(epoch as f64) {
                return Err(format!("{n}: not on epoch {epoch}"));
            }
            let age = m.node("loip_node_stats_age_seconds", n).unwrap();
            if !(0.0..10.0).contains(&age) {
                return Err(format!("{n}: figures {age} s old"));
            }
        }
        for n in &r.streaming {
            let bubbles = m.node("loip_loading_bubble_seconds_total", n);
            if bubbles.is_none_or(|b| b <= 0.0) {
                return Err(format!("{n} streams, yet waited {bubbles:?} s for loads"));
            }
        }
        let links = m.links();
        for l in &r.links {
            if links.get(l).is_none_or(|&b| b <= 0.0) {
                return Err(format!("link {l:?}: no bytes in {links:?}"));
            }
        }
        Ok(())
    });
    let links = idle.links();
    for from in &r.members {
        for to in &r.members {
            let pair = (from.clone(), to.clone());
            if from == to || *from == r.head || r.links.contains(&pair) {
                continue;
            }
            assert_eq!(
                links.get(&pair).copied().unwrap_or(0.0),
                0.0,
                "{from} sent to {to}, which is not next in the ring: {links:?}"
            );
        }
    }
    assert!(
        links
            .keys()
            .all(|(f, t)| f != t && want.contains(f) && want.contains(t)),
        "{links:?}"
    );
    // The page's view of node 3 carries the same figures (read between
    // two equal readings of /metrics, so that no gossip came in between).
    let t0 = Instant::now();
    loop {
        let before = nodes[2].metrics();
        let view = nodes[2].get("/v1/cluster").json();
        let after = nodes[2].metrics();
        let same = r
            .members
            .iter()
            .all(|n| before.figures(n) == after.figures(n))
            && before.links() == after.links();
        if same {
            for n in view["nodes"].as_array().unwrap() {
                let id = n["id"].as_str().unwrap();
                let from_view = vec![
                    n["kv_bytes"].as_f64(),
                    n["memory"]["kv_capacity"].as_f64(),
                    n["loading_bubbles"].as_f64(),
                    n["loading_bubble_seconds"].as_f64(),
                    n["ring_tokens"].as_f64(),
                ];
                assert_eq!(from_view, after.figures(id), "{n}");
                assert!(from_view.iter().all(Option::is_some), "{n}");
                assert_eq!(n["tokens_per_s"], 0.0, "{n}");
                assert_eq!(n["backlog_ms"], 0, "{n}");
                assert!(n["memory"]["budget"].as_u64().unwrap() > 0, "{n}");
                assert!(
                    n["memory"]["weights_and_slots"].as_u64().unwrap() > 0,
                    "{n}"
                );
                let sent: BTreeMap<(String, String), f64> = n["link_bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| {
                        let to = l["to"].as_str().unwrap().to_string();
                        ((id.to_string(), to), l["bytes"].as_f64().unwrap())
                    })
                    .collect();
                let mine: BTreeMap<_, _> = after
                    .links()
                    .into_iter()
                    .filter(|((f, _), _)| f == id)
                    .collect();
                assert_eq!(sent, mine, "{n}");
            }
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "figures never still"
        );
    }

    // A member that leaves drops out of the figures.
    let gone = id(2);
    drop(nodes.remove(1));
    wait_for(&nodes[1], Duration::from_secs(40), &nodes, |m| {
        match m.node("loip_kv_capacity_bytes", &gone) {
            Some(_) => Err(format!("{gone} left, yet is still in the figures")),
            None => Ok(()),
        }
    });
}
