//! The ring runtime on the real SmolLM2 model, nodes on 127.0.0.1 with
//! real QUIC and mutual TLS (one process, a thread per node's compute):
//! greedy generations, and the logits each token was sampled from, are
//! bit-identical to the single-node engine's, under several plans
//! (contiguous, interleaved, streamed, three nodes), concurrent requests
//! and throttled links. Bad input: frames of another plan epoch are dropped
//! and counted; activations of the wrong shape reset their stream, fail
//! the request they name, and the node keeps serving.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::ring::{endpoints, greedy, identities, limits, runtime};
use loip::cluster::ring::wire::{self, Hop, Msg, TokenMeta};
use loip::cluster::ring::{
    Peer, RequestHandle, RingConfig, RingError, RingNode, RingOutput, RingRequest,
};
use loip::engine::generate::Engine;
use loip::engine::weights::Model;
use loip::net::emulated::LinkEmulation;
use loip::net::identity::NodeIdentity;
use loip::net::quic::Endpoint;
use loip::plan::{Loading, Plan, Planner, Window};

const WAIT: Duration = Duration::from_secs(300);

/// Prompts: one over two prefill chunks, a short one, one of one token.
fn prompts() -> Vec<Vec<u32>> {
    let mut rng = common::Rng(7);
    let long: Vec<u32> = (0..150)
        .map(|_| (rng.next_u64() % 49000) as u32 + 1)
        .collect();
    let short: Vec<u32> = vec![1, 9690, 28, 2114, 314, 253, 1456, 30];
    vec![long, short, vec![504]]
}

const MAX_TOKENS: usize = 6;

/// What the single-node engine generates for each prompt, with the logits
/// of every sampled token.
fn reference() -> &'static Vec<RingOutput> {
    static REF: OnceLock<Vec<RingOutput>> = OnceLock::new();
    REF.get_or_init(|| {
        let model = Arc::new(Model::open(&common::smollm2()).unwrap());
        let mut engine = Engine::new(model, 1);
        prompts()
            .iter()
            .map(|p| greedy(&mut engine, p, MAX_TOKENS, true))
            .collect()
    })
}

/// A plan from `(device, first unit, end unit, streamed units)` windows;
/// unit 30 is the head.
fn plan(ring: usize, windows: &[(usize, u32, u32, &[u32])]) -> Plan {
    Plan {
        epoch: 5,
        planner: Planner::Ring,
        ring: (0..ring).map(|i| format!("node{i}")).collect(),
        windows: windows
            .iter()
            .map(|&(device, a, b, streamed)| Window {
                device,
                units: a..b,
                streamed: (a..b).map(|u| streamed.contains(&u)).collect(),
            })
            .collect(),
        kv_budget_bytes: vec![0; ring],
        slots: 2,
        loading: Loading::Prefetch,
        micro_batches: 1,
        batch: 4,
        context_tokens: 1024,
    }
}

/// A running cluster on loopback, and the runtime of its network tasks.
struct Cluster {
    nodes: Vec<RingNode>,
    peers: Vec<Peer>,
    identities: Vec<NodeIdentity>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn start(plan: Plan, links: Option<LinkEmulation>) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let n = plan.ring.len();
    let ids = identities(dir.path(), n, 0x100);
    let rt = runtime();
    let _g = rt.enter();
    let (endpoints, peers) = endpoints(&ids);
    let nodes = endpoints
        .into_iter()
        .enumerate()
        .map(|(i, ep)| {
            let mut c = RingConfig::new(plan.clone(), i, peers.clone(), common::smollm2());
            c.links = vec![links; n];
            RingNode::start(c, ep, rt.handle()).unwrap()
        })
        .collect();
    Cluster {
        nodes,
        peers,
        identities: ids,
        rt,
        _dir: dir,
    }
}

impl Cluster {
    fn head(&self) -> &RingNode {
        &self.nodes[0]
    }

    /// A request of 1000 tokens, just submitted.
    fn submit_long(&self) -> RequestHandle {
        self.head()
            .submit(RingRequest {
                prompt: vec![1, 2, 3],
                max_tokens: 1000,
                stop: None,
                keep_logits: false,
                sampling: None,
            })
            .unwrap()
    }

    /// Shuts node 1 down: `long` must then fail, naming the lost node,
    /// within 15 s (not hang).
    fn lose_node_1_and_expect_failure(&mut self, long: RequestHandle) {
        let t = Instant::now();
        self.nodes.remove(1).shutdown();
        match long.wait(Duration::from_secs(30)) {
            Err(RingError::Failed(m)) => assert!(m.contains("ring node 1 was lost"), "{m}"),
            other => panic!("the request should fail, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }

    /// A request of 1000 tokens, submitted 300 ms ago: in flight.
    fn long_request_running(&self) -> RequestHandle {
        let long = self.submit_long();
        std::thread::sleep(Duration::from_millis(300));
        long
    }

    /// Shuts node `i` down, runs `between`, and starts it again on its
    /// address with its identity, under `plan`: as a service manager
    /// restarts a crashed process within the epoch.
    fn restart(&mut self, i: usize, plan: &Plan, between: impl FnOnce()) {
        self.nodes.remove(i).shutdown();
        between();
        let _g = self.rt.enter();
        let t0 = Instant::now();
        let ep = loop {
            match Endpoint::bind(self.peers[i].addr, &self.identities[i], limits()) {
                Ok(ep) => break ep,
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    eprintln!("{e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let config = RingConfig::new(plan.clone(), i, self.peers.clone(), common::smollm2());
        let node = RingNode::start(config, ep, self.rt.handle()).unwrap();
        self.nodes.insert(i, node);
    }

    /// Every prompt at once; each answer checked against the reference,
    /// bit for bit.
    fn assert_exact(&self, what: &str) {
        let want = reference();
        let handles: Vec<_> = prompts()
            .into_iter()
            .map(|prompt| {
                self.head()
                    .submit(RingRequest {
                        prompt,
                        max_tokens: MAX_TOKENS,
                        stop: None,
                        keep_logits: true,
                        sampling: None,
                    })
                    .unwrap()
            })
            .collect();
        for (i, (h, want)) in handles.into_iter().zip(want).enumerate() {
            let got = h
                .wait(WAIT)
                .unwrap_or_else(|e| panic!("{what}: prompt {i}: {e}"));
            assert_eq!(got.tokens, want.tokens, "{what}: prompt {i} tokens");
            assert_eq!(got.logits.len(), want.logits.len(), "{what}: prompt {i}");
            for (step, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
                assert_eq!(g.len(), w.len(), "{what}: prompt {i} step {step}");
                let differ = g
                    .iter()
                    .zip(w)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{what}: prompt {i} step {step}: {differ} logits differ in their bits"
                );
            }
        }
    }
}

#[test]
fn two_nodes_are_bit_exact_under_several_plans() {
    let plans = [
        ("contiguous", plan(2, &[(0, 0, 15, &[]), (1, 15, 31, &[])])),
        (
            "interleaved",
            plan(
                2,
                &[
                    (0, 0, 8, &[]),
                    (1, 8, 16, &[]),
                    (0, 16, 24, &[]),
                    (1, 24, 31, &[]),
                ],
            ),
        ),
        (
            "interleaved and streamed",
            plan(
                2,
                &[
                    (0, 0, 7, &[2, 3, 5]),
                    (1, 7, 13, &[8, 12]),
                    (0, 13, 22, &[14, 20, 21]),
                    (1, 22, 31, &[23, 24, 30]),
                ],
            ),
        ),
    ];
    for (what, p) in plans {
        let c = start(p, None);
        c.assert_exact(what);
        // Both nodes ran windows; nothing was refused.
        for (i, n) in c.nodes.iter().enumerate() {
            let s = n.stats();
            assert!(s.window_runs > 0, "{what}: node {i} ran nothing");
            assert_eq!((s.bad, s.stale), (0, 0), "{what}: node {i}");
        }
    }
}

/// Three nodes of two non-adjacent windows each, some layers streamed.
fn three_interleaved() -> Plan {
    plan(
        3,
        &[
            (0, 0, 4, &[1]),
            (1, 4, 9, &[5, 6]),
            (2, 9, 14, &[]),
            (0, 14, 19, &[15, 18]),
            (1, 19, 25, &[]),
            (2, 25, 31, &[26, 30]),
        ],
    )
}

#[test]
fn three_nodes_interleaved_and_streamed_are_bit_exact() {
    let p = three_interleaved();
    let c = start(p, None);
    c.assert_exact("three nodes");
    // Again, with the caches of the first requests released and reused.
    c.assert_exact("three nodes, second round");
    for (i, n) in c.nodes.iter().enumerate() {
        assert!(n.stats().window_runs > 0, "node {i} ran nothing");
    }
}

#[test]
fn a_throttled_ring_is_still_exact_and_slower() {
    let latency = Duration::from_millis(15);
    let link = LinkEmulation {
        bandwidth_bps: 50e6,
        latency,
    };
    let c = start(
        plan(2, &[(0, 0, 10, &[]), (1, 10, 20, &[11]), (0, 20, 31, &[])]),
        Some(link),
    );
    let t = Instant::now();
    c.assert_exact("throttled");
    let took = t.elapsed();
    // Each token crosses 0→1 and 1→0, one latency each, step after step
    // (the first token's prefill crosses them once as well).
    let floor = latency * 2 * MAX_TOKENS as u32;
    assert!(
        took >= floor,
        "{took:?} is under the links' floor of {floor:?}"
    );
    let s = c.nodes[0].stats();
    assert!(s.sent_bytes > 0);
}

/// A rogue connection with the head's own certificate (a member of the
/// cluster gone wrong), talking to node 1.
/// A request cancelled while its micro-batch is out in the ring empties
/// that micro-batch on the way; it still passes on, so the windows after it
/// see its step go by instead of waiting for it, and the next request runs
/// at once and exactly.
#[test]
fn a_request_cancelled_in_flight_leaves_no_window_waiting_for_its_step() {
    let link = LinkEmulation {
        bandwidth_bps: 1e9,
        latency: Duration::from_millis(20),
    };
    let c = start(
        plan(
            3,
            &[
                (0, 0, 6, &[]),
                (1, 6, 12, &[]),
                (2, 12, 18, &[]),
                (0, 18, 24, &[]),
                (1, 24, 28, &[]),
                (2, 28, 31, &[]),
            ],
        ),
        Some(link),
    );
    for round in 0..3 {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let h = c
            .head()
            .submit_streaming(
                RingRequest {
                    prompt: prompts()[1].clone(),
                    max_tokens: 64,
                    stop: None,
                    keep_logits: false,
                    sampling: None,
                },
                tx,
            )
            .unwrap();
        // A token reaches the head just before the next micro-batch leaves
        // it; one link's latency later, that micro-batch is between
        // windows, which is when the cancel should catch it.
        for _ in 0..2 {
            rx.blocking_recv().expect("a token");
        }
        std::thread::sleep(link.latency);
        c.head().cancel(h.id());
        assert!(
            h.wait(WAIT).is_err(),
            "round {round}: a cancelled request answers with an error"
        );
        c.assert_exact(&format!("after cancel {round}"));
    }
    let counts: Vec<_> = c.nodes.iter().map(RingNode::stats).collect();
    assert!(
        counts.iter().map(|s| s.empty_passes).sum::<u64>() > 0,
        "no micro-batch was emptied on the way: {counts:?}"
    );
    for (i, s) in counts.iter().enumerate() {
        assert_eq!(s.step_give_ups, 0, "node {i} waited out a step: {s:?}");
        assert_eq!(s.bad, 0, "node {i}: {s:?}");
    }
}

struct Rogue {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

fn rogue(c: &Cluster) -> Rogue {
    let ep = {
        let _g = c.rt.enter();
        Endpoint::bind("127.0.0.1:0".parse().unwrap(), &c.identities[0], limits()).unwrap()
    };
    let peer = c.peers[1];
    c.rt.block_on(async move {
        let conn = ep.connect(peer.addr, peer.id).await.unwrap();
        let (send, recv) = conn.conn.open_bi().await.unwrap();
        // Keep the endpoint alive with the connection.
        std::mem::forget(ep);
        Rogue { send, recv }
    })
}

impl Rogue {
    fn send(&mut self, c: &Cluster, bytes: Vec<u8>) -> bool {
        c.rt.block_on(self.send.write_all(&bytes)).is_ok()
    }

    /// Whether node 1 reset the stream (reading sees it stopped).
    fn was_reset(&mut self, c: &Cluster) -> bool {
        c.rt.block_on(async {
            let mut buf = [0u8; 16];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), self.recv.read(&mut buf)).await,
                Ok(Err(_))
            )
        })
    }
}

fn hop(epoch: u64, request: u64, pos: u32, rows: usize, cols: usize) -> Vec<u8> {
    let h = Hop {
        epoch,
        micro_batch: 999,
        step: 0,
        fresh: Vec::new(),
        fresh_tokens: Vec::new(),
        window: 1,
        tokens: (0..rows as u32)
            .map(|i| TokenMeta {
                request,
                pos: pos + i,
                id: 0,
                want: false,
                logits: false,
            })
            .collect(),
        hidden: true,
        sampling: Vec::new(),
    };
    let th = wire::tensor_header(epoch, 999, 1, rows, cols);
    let data = vec![0.5f32; rows * cols];
    wire::encode(&Msg::Hop(h), Some((&th, &data))).unwrap()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn frames_of_an_old_epoch_are_dropped_and_counted() {
    let c = start(plan(2, &[(0, 0, 15, &[]), (1, 15, 31, &[])]), None);
    let mut r = rogue(&c);
    // Well-formed activations, but for plan epoch 4 (the ring is at 5).
    assert!(r.send(&c, hop(4, 77, 0, 2, 576)));
    wait_until("one stale message", || c.nodes[1].stats().stale == 1);
    // The stream is not reset for it: the next one is counted too.
    assert!(r.send(&c, hop(3, 77, 0, 1, 576)));
    wait_until("two stale messages", || c.nodes[1].stats().stale == 2);
    assert_eq!(c.nodes[1].stats().bad, 0);
    // And the ring serves, exactly.
    c.assert_exact("after stale frames");
}

#[test]
fn activations_of_the_wrong_shape_fail_their_request_and_the_node_keeps_serving() {
    let c = start(plan(2, &[(0, 0, 15, &[]), (1, 15, 31, &[])]), None);
    // A long generation, to be in flight when the bad frame comes.
    let victim = c.long_request_running();
    let id = victim.id();
    let mut r = rogue(&c);
    // Two tokens' worth of rows, one value short each: 2 × 575.
    assert!(r.send(&c, hop(5, id, 3, 2, 575)));
    assert!(r.was_reset(&c), "the bad stream was not reset");
    match victim.wait(WAIT) {
        Err(RingError::Failed(m)) => assert!(m.contains("shape"), "{m}"),
        other => panic!("the request should fail, got {other:?}"),
    }
    assert_eq!(c.nodes[1].stats().bad, 1);
    // The node keeps serving, exactly, and no window waited out a step for
    // the refused micro-batch (its step went on as an empty one).
    c.assert_exact("after a bad frame");
    for (i, n) in c.nodes.iter().enumerate() {
        assert_eq!(n.stats().step_give_ups, 0, "node {i}");
    }
    // And a prompt outside the vocabulary is refused up front.
    let e = c
        .head()
        .submit(RingRequest {
            prompt: vec![u32::MAX],
            max_tokens: 2,
            stop: None,
            keep_logits: false,
            sampling: None,
        })
        .err()
        .unwrap();
    assert!(matches!(e, RingError::Request(_)), "{e}");
}

#[test]
fn loip_demo_chats_with_a_ring_of_processes() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["demo", "--nodes", "2", "--max-tokens", "12", "--model"])
        .arg(common::smollm2())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "answer: {stdout:?}; {stderr}");
    assert!(
        !stderr.contains("error") && !stderr.contains("WARN"),
        "{stderr}"
    );
}

#[test]
fn a_lost_node_fails_the_requests_in_flight_instead_of_hanging() {
    let mut c = start(plan(2, &[(0, 0, 15, &[]), (1, 15, 31, &[])]), None);
    let long = c.long_request_running();
    c.lose_node_1_and_expect_failure(long);
}

/// The same, when the member goes while a message to it is on its way:
/// the sender finds the connection closed on its way to write, not while
/// waiting for the next message, and must report the loss then too rather
/// than redial a dead peer for ever. Every message takes a second on the
/// links, so once node 1 has run the prompt, its answer reaches the head
/// a second later and the head's next hop then waits a second to leave:
/// half-way through that wait, node 1 goes.
#[test]
fn a_node_lost_while_a_message_to_it_is_on_its_way_fails_the_requests() {
    let link = LinkEmulation {
        bandwidth_bps: 1e9,
        latency: Duration::from_secs(1),
    };
    let mut c = start(plan(2, &[(0, 0, 15, &[]), (1, 15, 31, &[])]), Some(link));
    let long = c.submit_long();
    wait_until("node 1 runs the prompt", || {
        c.nodes[1].stats().window_runs > 0
    });
    std::thread::sleep(Duration::from_millis(1500));
    c.lose_node_1_and_expect_failure(long);
}

/// A member restarted within the epoch (same address, same identity, as a
/// service manager restarts a crashed process) starts its ring at step 1,
/// while the head has declared many: it moves to the ring's step rather
/// than wait for its own, and answers stay exact.
#[test]
fn a_member_restarted_within_the_epoch_moves_to_the_ring_step() {
    let p = three_interleaved();
    let mut c = start(p.clone(), None);
    c.assert_exact("before the restart");
    c.restart(1, &p, || {});
    c.assert_exact("after the restart");
    let counts = c.nodes[1].stats();
    assert!(counts.window_runs > 0, "the restarted member ran nothing");
    assert_eq!(
        counts.step_give_ups, 0,
        "the restarted member waited for a step the ring had left"
    );
}

/// The head restarted within the epoch while a request was in flight: the
/// members drop that request's sequences when they lose the head, and
/// move back to the new head's first step rather than wait for tokens
/// that never come.
#[test]
fn a_head_restarted_within_the_epoch_finds_its_members_ready() {
    let p = plan(3, &[(0, 0, 10, &[]), (1, 10, 20, &[]), (2, 20, 31, &[])]);
    let mut c = start(p.clone(), None);
    c.assert_exact("before the restart");
    let long = c.long_request_running();
    c.restart(0, &p, || {
        let ended = long.wait(Duration::from_secs(30));
        assert!(ended.is_err(), "it ended with its head");
    });
    c.assert_exact("after the restart");
    for (i, n) in c.nodes.iter().enumerate() {
        let counts = n.stats();
        assert_eq!(counts.step_give_ups, 0, "node {i} waited for a lost step");
    }
}
