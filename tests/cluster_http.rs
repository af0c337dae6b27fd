//! The OpenAI-compatible API in front of a cluster (`loip run --http`),
//! with real processes on 127.0.0.1 and the real SmolLM2: every node
//! answers, whole and streamed, greedy and seeded-sampled, exactly as the
//! single-node server (`loip serve`) does, also with concurrent requests
//! through different nodes and when a member is killed in the middle of a
//! sampled answer; `/health` is 503 until a plan runs; `/v1/cluster` shows
//! the ring; the API key guards the cluster's API as it does one node's;
//! `/metrics` and `/v1/cluster` carry every member's figures.

mod serve_util;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use loip::net::NodeId;
use serde_json::json;
use serve_util::common::cluster::{self, identities, NodeFiles, Proc};
use serve_util::{common, request, Resp, Server, Stream};

/// One cluster at a time: failure detection runs on wall-clock time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Node {
    proc: Proc,
    http: SocketAddr,
    quic: String,
}

impl Node {
    fn post(&self, path: &str, body: &str) -> Resp {
        request(self.http, "POST", path, &[], body.as_bytes())
    }

    fn get(&self, path: &str) -> Resp {
        request(self.http, "GET", path, &[], b"")
    }

    fn metrics(&self) -> Metrics {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200);
        Metrics::parse(&String::from_utf8(r.body).unwrap())
    }
}

/// Node `n`'s id as the figures label it.
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

struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new(nodes: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        identities(dir.path(), nodes, |n| NodeId(0x50 + n));
        Cluster { dir }
    }

    /// Starts node `n` (seeded with `peer`), serving HTTP; `extra` flags.
    fn start(&self, n: u64, peer: Option<&str>, extra: &[&str]) -> Node {
        self.start_with(n, peer, 3, true, extra)
    }

    /// As `start`, waiting for `expect` nodes, with or without the model.
    fn start_with(
        &self,
        n: u64,
        peer: Option<&str>,
        expect: usize,
        model: bool,
        extra: &[&str],
    ) -> Node {
        let files = NodeFiles::numbered(self.dir.path(), n);
        let device = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/devices/emu-a.toml");
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = files.command(expect, peer);
        cmd.arg("--no-mdns")
            .arg("--device")
            .arg(&device)
            // Budgets that make every plan stream layers.
            .args(["--mem-budget", "60MiB"])
            .args(
                model
                    .then(|| ["--model".into(), common::smollm2().into_os_string()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--http")
            .arg(http.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .env("LOIP_RING_THREADS", "1");
        let (proc, quic) = files.spawn(&mut cmd);
        Node { proc, http, quic }
    }

    fn three(&self, extra: &[&str]) -> Vec<Node> {
        let a = self.start(1, None, extra);
        let b = self.start(2, Some(&a.quic), extra);
        let c = self.start(3, Some(&a.quic), extra);
        vec![a, b, c]
    }
}

fn logs(nodes: &[Node]) -> String {
    cluster::logs(&nodes.iter().map(|n| &n.proc).collect::<Vec<_>>())
}

/// Waits until every node's /health is 200 on one plan epoch.
fn wait_healthy(nodes: &[Node]) -> u64 {
    let t0 = Instant::now();
    loop {
        // The API starts listening just after the node does.
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
            t0.elapsed() < Duration::from_secs(60),
            "never healthy: {:?}{}",
            h.iter().map(|r| r.status).collect::<Vec<_>>(),
            logs(nodes)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn chat(message: &str, max_tokens: usize, extra: serde_json::Value) -> String {
    let mut body = json!({
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

fn content(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

const CHAT: &str = "/v1/chat/completions";

#[test]
fn every_node_answers_as_one_node_does() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let alone = Server::start(&["--no-mdns", "--max-batch", "8"]);
    let c = Cluster::new(3);
    let nodes = c.three(&[]);
    let epoch = wait_healthy(&nodes);

    // The ring: three members, each unit in exactly one window, and some
    // of them streamed.
    let view = nodes[1].get("/v1/cluster").json();
    assert_eq!(view["plan_epoch"], epoch, "{view}");
    let members = view["nodes"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{view}");
    assert_eq!(
        members.iter().filter(|m| m["role"] == "leader").count(),
        1,
        "{view}"
    );
    let mut units = 0;
    let mut streamed = 0;
    for w in members
        .iter()
        .flat_map(|m| m["windows"].as_array().unwrap())
    {
        let n = w["last_layer"].as_u64().unwrap() + 1 - w["first_layer"].as_u64().unwrap();
        let (r, s) = (
            w["resident"].as_array().unwrap().len(),
            w["streamed"].as_array().unwrap().len(),
        );
        assert_eq!(n as usize, r + s, "{w}");
        units += n;
        streamed += s;
    }
    // The figures of this node's own HTTP traffic are numbers, the
    // others' null; its ring figures are there from the start.
    for m in members {
        assert_eq!(
            m["http_tokens_per_s"].is_number(),
            m["this_node"] == true,
            "{m}"
        );
        if m["this_node"] == true {
            assert!(m["tokens_per_s"].is_number(), "{m}");
        }
        assert!(m["address"].is_string(), "{m}");
    }
    assert_eq!(units, 31, "30 layers and the head: {view}");
    assert!(streamed > 0, "{view}");

    // Greedy, whole, through each node.
    let q = chat("What is the capital of France?", 24, json!({}));
    let want = content(&alone.post(CHAT, &q));
    for n in &nodes {
        assert_eq!(content(&n.post(CHAT, &q)), want);
    }
    // Streamed, with usage.
    let q = chat(
        "Name three colours.",
        32,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (want, _) = Stream::open(alone.addr, CHAT, &q).rest_text();
    let (got, done) = Stream::open(nodes[2].http, CHAT, &q).rest_text();
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(got, want);
    // Sampled with a seed: the same draws as one node.
    let q = chat(
        "Write a short poem about the sea.",
        40,
        json!({"temperature": 0.9, "top_p": 0.95, "seed": 7}),
    );
    let want = content(&alone.post(CHAT, &q));
    assert_eq!(content(&nodes[0].post(CHAT, &q)), want);
    assert_eq!(content(&nodes[2].post(CHAT, &q)), want);
    // Completions too.
    let q = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}).to_string();
    let text = |r: Resp| {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(
        text(nodes[1].post("/v1/completions", &q)),
        text(alone.post("/v1/completions", &q))
    );

    // Eight at once through the three nodes: each as alone.
    let asks: Vec<String> = (0..8)
        .map(|i| {
            chat(
                &format!("Tell me a fact about the number {i}."),
                24,
                json!({}),
            )
        })
        .collect();
    let want: Vec<String> = asks.iter().map(|q| content(&alone.post(CHAT, q))).collect();
    let handles: Vec<_> = asks
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let (addr, q) = (nodes[i % 3].http, q.clone());
            std::thread::spawn(move || request(addr, "POST", CHAT, &[], q.as_bytes()))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(content(&h.join().unwrap()), want[i], "request {i}");
    }

    // Bad input is refused as on one node, and the node goes on.
    let r = nodes[1].post(CHAT, "{not json");
    assert_eq!(r.status, 400);
    let r = nodes[1].post(CHAT, &chat("hi", 8, json!({"temperature": 7})));
    assert_eq!(r.status, 400, "{}", r.error());
    let metrics = String::from_utf8(nodes[0].get("/metrics").body).unwrap();
    assert!(metrics.contains("loip_requests_total"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("loip_plan_epoch {epoch}")),
        "{metrics}"
    );
    assert!(!content(&nodes[1].post(CHAT, &chat("Hi!", 4, json!({})))).is_empty());
}

#[test]
fn a_sampled_answer_survives_a_member_killed_mid_stream() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let alone = Server::start(&["--no-mdns"]);
    let q = chat(
        "Write a long story about a dragon who learns to cook.",
        200,
        json!({"temperature": 0.8, "seed": 11, "stream": true}),
    );
    let (want, _) = Stream::open(alone.addr, CHAT, &q).rest_text();
    drop(alone);

    let c = Cluster::new(3);
    let mut nodes = c.three(&[]);
    wait_healthy(&nodes);
    // The entry node is node 1; kill another member once text flows. The
    // plan may put the head anywhere: whichever member dies, the entry
    // node resumes the request on the next plan.
    let mut s = Stream::open(nodes[0].http, CHAT, &q);
    let mut got = String::new();
    for _ in 0..12 {
        let d = s.next_data().expect("streamed text before the kill");
        got.push_str(&serve_util::delta_text(&d));
    }
    let victim = nodes.remove(2);
    drop(victim);
    let (rest, done) = s.rest_text();
    got.push_str(&rest);
    assert!(done, "the stream ended with [DONE]{}", logs(&nodes));
    assert_eq!(got, want, "{}", logs(&nodes));
}

#[test]
fn health_is_503_until_a_plan_runs_and_the_key_guards_the_api() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3);
    // Alone, it waits for the two others (--expect 3): no plan.
    let first = c.start(1, None, &["--api-key", "sesame"]);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(first.http).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no HTTP API");
        std::thread::sleep(Duration::from_millis(100));
    }
    let h = first.get("/health");
    assert_eq!(h.status, 503);
    assert_eq!(h.json()["status"], "loading");
    let r = request(
        first.http,
        "POST",
        CHAT,
        &[("Authorization", "Bearer sesame")],
        chat("hi", 4, json!({})).as_bytes(),
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("Retry-After").is_some());
    let others = [
        c.start(2, Some(&first.quic), &["--api-key", "sesame"]),
        c.start(3, Some(&first.quic), &["--api-key", "sesame"]),
    ];
    let nodes = vec![first];
    wait_healthy(&nodes);
    assert_eq!(nodes[0].post(CHAT, &chat("hi", 4, json!({}))).status, 401);
    let r = request(
        nodes[0].http,
        "POST",
        CHAT,
        &[("Authorization", "Bearer sesame")],
        chat("hi", 4, json!({})).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    drop(others);
}

/// Zero-config join: a node with only its certificate (no model) joins a
/// running cluster, is planned in, fetches the tensors of its windows from
/// its peers, and answers requests exactly.
#[test]
fn a_node_without_the_model_joins_fetches_its_layers_and_serves() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let alone = Server::start(&["--no-mdns"]);
    let q = chat("What is the capital of France?", 24, json!({}));
    let want = content(&alone.post(CHAT, &q));
    drop(alone);

    let c = Cluster::new(3);
    let a = c.start_with(1, None, 2, true, &[]);
    let b = c.start_with(2, Some(&a.quic), 2, true, &[]);
    let mut nodes = vec![a, b];
    let before = wait_healthy(&nodes);
    let bare = c.start_with(3, Some(&nodes[0].quic), 2, false, &[]);
    nodes.push(bare);
    // A new epoch with three members, the bare node holding windows.
    let t0 = Instant::now();
    loop {
        let epoch = wait_healthy(&nodes);
        let view = nodes[2].get("/v1/cluster").json();
        let members = view["nodes"].as_array().unwrap();
        let mine = members
            .iter()
            .find(|m| m["this_node"] == true)
            .map(|m| m["windows"].as_array().unwrap().len());
        if epoch > before && members.len() == 3 && mine.is_some_and(|w| w > 0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the bare node was not planned in: {view}{}",
            logs(&nodes)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let shard = c.dir.path().join("d3").join("model-shard.gguf");
    assert!(
        shard.is_file(),
        "the fetched tensors are in {}",
        shard.display()
    );
    assert_eq!(content(&nodes[2].post(CHAT, &q)), want, "{}", logs(&nodes));
    assert_eq!(content(&nodes[0].post(CHAT, &q)), want);
    // A shard is not a model to run alone: a one-line error, no panic.
    let out = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args([
            "generate",
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "2",
            "--model",
        ])
        .arg(&shard)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("missing tensor"), "{err}");
}

/// A full disk while a node fetches its layers: the node reports it (in
/// `loip status`), leaves no shard it would trust, and the cluster plans
/// without it and goes on serving. Needs root to mount a small tmpfs.
#[test]
fn a_full_disk_during_a_layer_fetch_is_reported_and_leaves_no_shard() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP a_full_disk_during_a_layer_fetch_is_reported_and_leaves_no_shard: mounting a tmpfs needs root");
        return;
    }
    let c = Cluster::new(3);
    let data = c.dir.path().join("d3");
    std::fs::create_dir_all(&data).unwrap();
    // Room for the node's database, not for a third of the model.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs at {}", data.display());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());

    let a = c.start_with(1, None, 2, true, &[]);
    let b = c.start_with(2, Some(&a.quic), 2, true, &[]);
    let mut nodes = vec![a, b];
    wait_healthy(&nodes);
    nodes.push(c.start_with(3, Some(&nodes[0].quic), 2, false, &[]));
    let t0 = Instant::now();
    let error = loop {
        if let Ok(st) = loip::cluster::shell::read_status(&data) {
            if let Some(e) = st.prepare_error {
                break e;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no preparation error{}",
            logs(&nodes)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(error.contains("No space left on device"), "{error}");
    assert!(
        !data.join("model-shard.gguf").exists(),
        "a shard was left under the name the node reads"
    );
    // The two others serve on, planned without it (or with it when it is
    // tried again: it fails the same way and is left out).
    let q = chat("What is the capital of France?", 8, json!({}));
    let healthy = [nodes.remove(0), nodes.remove(0)];
    wait_healthy(&healthy);
    assert!(!content(&healthy[0].post(CHAT, &q)).is_empty());
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

/// The cluster's serving figures (issue #8): while and after requests go through one node,
/// another node's `/metrics` shows every ring member's KV (used, at most
/// what is held), loading bubbles on each node that streams, bytes on every
/// link of the ring and none where no member sends, and a backlog back at
/// 0 once idle; its `/v1/cluster` carries the same figures; and a member
/// that is killed drops out of the figures.
#[test]
fn every_members_kv_bubbles_links_and_backlog_show_on_any_node() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::new(3);
    let mut nodes = cluster.three(&[]);
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
    // tokens): every member holds no KV (the ended requests released
    // theirs, and a cache gives its memory back), and has no backlog; each node that
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
            let cap = m.node("loip_kv_capacity_bytes", n);
            let used = m.node("loip_kv_bytes", n);
            if cap != Some(0.0) || used != Some(0.0) {
                return Err(format!("{n}: idle, KV used {used:?}, held {cap:?}"));
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
            // Each member tells the head its KV capacity once, when its
            // ring starts (one small message, `ring::kvpressure`).
            let allowed = if *to == r.head { 16.0 } else { 0.0 };
            assert!(
                links.get(&pair).copied().unwrap_or(0.0) <= allowed,
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
                // Every member runs under its budget, so it told how much
                // KV it can hold (`ring::kvpressure`), and how many units
                // it demoted (none may be needed here).
                assert!(
                    n["kv_pressure"]["kv_positions"].as_u64().unwrap() > 0,
                    "{n}"
                );
                assert!(n["kv_pressure"]["demoted_units"].is_u64(), "{n}");
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
