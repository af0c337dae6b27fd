//! Plan distribution with real `loip run` processes on 127.0.0.1: the
//! leader plans real windows over the members' devices, a node without the
//! model file fetches its tensors from a peer (checked by digest, also when
//! a peer serves corrupt bytes), a node killed while preparing is planned
//! out, and a node drops out-of-epoch and malformed control frames and keeps
//! running.
//!
//! The processes are told apart by test knobs in the environment (see
//! `cluster::shell` and `cluster::fetch`): `LOIP_TEST_CORRUPT_SERVE=1` makes
//! a node flip a byte of every tensor it serves, `LOIP_TEST_PREPARE_DELAY_MS`
//! holds a node in preparation.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::cluster::{emu_device, identities, wait_for, NodeFiles, Proc};
use loip::cluster::shell::{read_status, NodeStatus};
use loip::model::dtype::GgmlType;
use loip::model::gguf::Gguf;
use loip::model::synth::SynthSpec;
use loip::net::identity::create_node;
use loip::net::NodeId;

/// One cluster at a time: the machine has few cores, and failure detection
/// runs on wall-clock time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Six layers of about 1 MB each: with [`BUDGET`] per node, no node can
/// hold the model resident alone, so the scheduler spreads it over all
/// three (streaming from storage costs far more than the loopback links).
fn model_spec() -> SynthSpec {
    SynthSpec {
        n_layer: 6,
        n_embd: 256,
        n_ff: 1024,
        n_head: 4,
        n_head_kv: 2,
        n_vocab: 512,
        context_length: 256,
        weights: GgmlType::Q8_0,
        embeddings: GgmlType::Q8_0,
        tied_output: true,
        rope_freqs: false,
        seed: 5,
    }
}

const BUDGET: &str = "4500kB";

struct Cluster {
    dir: tempfile::TempDir,
    model: PathBuf,
}

impl Cluster {
    fn new(nodes: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        identities(dir.path(), nodes, NodeId);
        let model = dir.path().join("model.gguf");
        model_spec().writer().write(&model).unwrap();
        Cluster { dir, model }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

struct NodeOpts<'a> {
    n: u64,
    expect: usize,
    model: bool,
    peer: Option<&'a str>,
    env: &'a [(&'a str, &'a str)],
    budget: &'a str,
}

fn start(c: &Cluster, o: NodeOpts) -> (Proc, String) {
    let files = NodeFiles::numbered(c.path(), o.n);
    let mut cmd = files.command(o.expect, o.peer);
    cmd.arg("--device")
        .arg(emu_device(o.n))
        .args(["--mem-budget", o.budget]);
    if o.model {
        cmd.arg("--model").arg(&c.model);
    }
    for (k, v) in o.env {
        cmd.env(k, v);
    }
    files.spawn(&mut cmd)
}

fn node(n: u64, model: bool, peer: Option<&str>) -> NodeOpts<'_> {
    NodeOpts {
        n,
        expect: 3,
        model,
        peer,
        env: &[],
        budget: BUDGET,
    }
}

/// All nodes committed the same epoch with `members` members, nothing is
/// pending, and each knows that epoch's body.
fn agreed(st: &[NodeStatus], members: usize) -> bool {
    let first = &st[0].membership;
    first.committed.members.len() == members
        && first.leader.is_some()
        && st.iter().all(|s| {
            let m = &s.membership;
            m.leader == first.leader
                && m.committed == first.committed
                && m.pending.is_none()
                && s.plan.as_ref().map(|p| p.epoch) == Some(m.committed.epoch)
        })
}

/// Every unit of the model is in exactly one window of exactly one node,
/// and all nodes agree on the ring. Returns the units per node.
fn check_cover(st: &[NodeStatus]) -> Vec<BTreeSet<u32>> {
    let n_units = st[0].plan.as_ref().unwrap().n_units;
    assert_eq!(
        n_units,
        model_spec().n_layer as u32 + 1,
        "layers and the head"
    );
    let ring = &st[0].plan.as_ref().unwrap().ring;
    let mut seen = vec![0u32; n_units as usize];
    let mut indices = BTreeSet::new();
    let mut per_node = Vec::new();
    for s in st {
        let p = s.plan.as_ref().unwrap();
        assert_eq!(&p.ring, ring);
        assert_eq!(p.note, None);
        let mut mine = BTreeSet::new();
        for w in &p.windows {
            assert!(indices.insert(w.index), "window {} twice", w.index);
            assert_eq!(w.streamed.len(), w.units.len());
            for u in w.units.clone() {
                seen[u as usize] += 1;
                mine.insert(u);
            }
        }
        assert_eq!(s.windows.len(), p.windows.len(), "status text per window");
        assert_eq!(
            !p.windows.is_empty(),
            ring.contains(&s.id),
            "a node has windows exactly when it is in the ring"
        );
        per_node.push(mine);
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "each unit in exactly one window: {seen:?}"
    );
    per_node
}

#[test]
fn three_processes_agree_on_a_plan_whose_windows_cover_every_unit_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3);
    let (p1, seed) = start(&c, node(1, true, None));
    let (p2, _) = start(&c, node(2, true, Some(&seed)));
    let (p3, _) = start(&c, node(3, true, Some(&seed)));
    let all = [&p1, &p2, &p3];
    let st = wait_for(&all, Duration::from_secs(40), "a plan", |st| agreed(st, 3));
    let per_node = check_cover(&st);
    assert!(
        per_node.iter().filter(|u| !u.is_empty()).count() >= 2,
        "no node can hold the model alone: {per_node:?}"
    );
    // The leader measured its links to the two others over QUIC.
    let leader = st[0].membership.leader.unwrap();
    let ls = st.iter().find(|s| s.id == leader).unwrap();
    let peers: BTreeSet<NodeId> = ls.links.iter().map(|l| l.peer).collect();
    assert_eq!(peers.len(), 2, "{:?}", ls.links);
    assert!(!peers.contains(&leader));
    for l in &ls.links {
        assert!(l.bandwidth_bps >= 1e6 && l.latency_s > 0.0, "{l:?}");
    }
    // Everyone reads its windows from its own file: nothing fetched.
    assert!(st.iter().all(|s| s.plan.as_ref().unwrap().shard.is_none()));
    // The human form shows the ring and the windows.
    let o = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["status", "--data-dir"])
        .arg(&p1.data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("ring ") && text.contains("7 units"), "{text}");
    assert!(text.contains("windows "), "{text}");
}

#[test]
fn a_plan_made_before_a_member_reported_is_made_again_once_it_has() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3);
    // Every node joins at once but holds its report back for a while: the
    // leader, whichever it is, knows only its own when it first plans.
    let late = [("LOIP_TEST_REPORT_DELAY_MS", "10000"), ("RUST_LOG", "info")];
    let late_node = |n, peer| NodeOpts {
        env: &late,
        ..node(n, true, peer)
    };
    let (p1, seed) = start(&c, late_node(1, None));
    let (p2, _) = start(&c, late_node(2, Some(&seed)));
    let (p3, _) = start(&c, late_node(3, Some(&seed)));
    let all = [&p1, &p2, &p3];
    let st = wait_for(
        &all,
        Duration::from_secs(40),
        "a plan before the reports",
        |st| agreed(st, 3),
    );
    let first = st[0].membership.committed.epoch;
    let leader = st[0].membership.leader.unwrap();
    let plan = st[0].plan.as_ref().unwrap();
    assert_eq!(
        plan.planned_with,
        vec![leader],
        "only the leader's own report"
    );
    assert!(
        plan.ring.iter().all(|&id| id == leader),
        "no windows for a node not heard from: {:?}",
        plan.ring
    );
    let others: Vec<String> = [1, 2, 3]
        .iter()
        .filter(|&&n| NodeId(n) != leader)
        .map(|&n| NodeId(n).to_string())
        .collect();
    let status = || {
        let o = Command::new(env!("CARGO_BIN_EXE_loip"))
            .args(["status", "--data-dir"])
            .arg(&p1.data)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let text = status();
    let line = format!(
        "reports  the plan was made before {} reported",
        others.join(" ")
    );
    assert!(text.contains(&line), "{line:?} in\n{text}");
    // Once they report, the leader plans again, with everyone.
    let st = wait_for(
        &all,
        Duration::from_secs(40),
        "a plan with every report",
        |st| {
            agreed(st, 3)
                && st[0].membership.committed.epoch > first
                && st[0].plan.as_ref().unwrap().planned_with.len() == 3
        },
    );
    let per_node = check_cover(&st);
    assert!(
        per_node.iter().filter(|u| !u.is_empty()).count() >= 2,
        "the others hold windows now: {per_node:?}"
    );
    let ls = all.iter().zip(&st).find(|(_, s)| s.id == leader).unwrap().0;
    let log = std::fs::read_to_string(&ls.stderr).unwrap();
    assert!(
        log.contains("was planned before every member reported: planning again"),
        "{log}"
    );
    let text = status();
    assert!(!text.contains("reports  "), "{text}");
}

#[test]
fn a_restarted_node_listens_for_its_ring_on_the_port_it_had_unless_taken() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(1);
    let alone = || NodeOpts {
        expect: 1,
        ..node(1, true, None)
    };
    let ring_port = |p: &Proc| {
        let st = wait_for(&[p], Duration::from_secs(20), "a plan", |st| agreed(st, 1));
        st[0].ring_listen.expect("a ring endpoint").port()
    };
    let (p, _) = start(&c, alone());
    let first = ring_port(&p);
    drop(p);
    // Restarted (as systemd would after a crash): the same port, where the
    // peers' rings of the running epoch dial it.
    let (p, _) = start(&c, alone());
    assert_eq!(ring_port(&p), first, "the ring port of the last run");
    drop(p);
    // Taken by another socket meanwhile: a new port, and the log says why.
    let squatter = std::net::UdpSocket::bind(("127.0.0.1", first)).unwrap();
    let (p, _) = start(&c, alone());
    let second = ring_port(&p);
    assert_ne!(second, first);
    let log = std::fs::read_to_string(&p.stderr).unwrap();
    assert!(
        log.contains(&format!("ring port {first} of the last run is taken")),
        "{log}"
    );
    drop(p);
    drop(squatter);
    // The new port is the one kept from then on.
    let (p, _) = start(&c, alone());
    assert_eq!(ring_port(&p), second);
    let data = p.data.clone();
    drop(p);
    // A stored port that does not decode: a warning, and a fresh port.
    {
        let store = loip::store::Store::open(&data).unwrap();
        let garbage = serde_json::json!({"port": "none"});
        store
            .put_json(loip::store::Tree::Plan, b"ring-port", &garbage)
            .unwrap();
        store.flush().unwrap();
    }
    let (p, _) = start(&c, alone());
    assert!(ring_port(&p) > 0);
    let log = std::fs::read_to_string(&p.stderr).unwrap();
    assert!(log.contains("the stored ring port"), "{log}");
}

/// The tensors of `shard` are byte for byte those of `model`; returns how
/// many there are.
fn assert_same_tensors(shard: &Path, model: &Path) -> usize {
    let s = Gguf::open(shard).expect("the shard is a valid GGUF file");
    let m = Gguf::open(model).unwrap();
    assert_eq!(
        s.metadata().get("general.architecture"),
        m.metadata().get("general.architecture")
    );
    for t in s.tensors() {
        let o = m.tensor(&t.name).expect("a tensor of the model");
        assert_eq!((&t.dims, t.ty), (&o.dims, o.ty), "{}", t.name);
        assert!(
            s.tensor_data(t) == m.tensor_data(o),
            "{}: bytes differ",
            t.name
        );
    }
    s.tensors().len()
}

/// Waits for a plan in which node 3 (started without the model) has
/// windows and acknowledged them: it fetched its tensors into its shard.
fn wait_fetched(all: &[&Proc]) -> Vec<NodeStatus> {
    wait_for(all, Duration::from_secs(60), "node 3 fetched", |st| {
        agreed(st, 3)
            && st[2]
                .plan
                .as_ref()
                .is_some_and(|p| !p.windows.is_empty() && p.shard.is_some())
    })
}

#[test]
fn a_node_without_the_model_fetches_its_tensors_from_a_peer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3);
    let (p1, seed) = start(&c, node(1, true, None));
    let (p2, _) = start(&c, node(2, true, Some(&seed)));
    let (p3, _) = start(&c, node(3, false, Some(&seed)));
    let all = [&p1, &p2, &p3];
    let st = wait_fetched(&all);
    check_cover(&st);
    let plan = st[2].plan.as_ref().unwrap();
    let shard = plan.shard.as_ref().unwrap();
    let n = assert_same_tensors(shard, &c.model);
    // Every layer of its windows: nine tensors each.
    let layers = plan
        .windows
        .iter()
        .flat_map(|w| w.units.clone())
        .filter(|&u| u < 6)
        .count();
    assert!(n >= 9 * layers, "{n} tensors for {layers} layers");
    assert!(!c.path().join("d3/fetch.tmp/0.part").exists());
    // The leader is a node with the model.
    assert_ne!(st[0].membership.leader, Some(NodeId(3)));

    // Restarted, node 3 knows its windows of the committed epoch at once:
    // the body was stored before it acknowledged.
    let (epoch, windows) = (plan.epoch, plan.windows.clone());
    drop(p3);
    let (p3, _) = start(&c, node(3, false, Some(&seed)));
    let st3 = wait_for(&[&p3], Duration::from_secs(10), "restarted", |_| true);
    let p = st3[0].plan.as_ref().expect("the committed body, from disk");
    assert_eq!(p.epoch, st3[0].membership.committed.epoch);
    if p.epoch == epoch {
        assert_eq!(p.windows, windows);
        assert_eq!(p.shard.as_deref(), Some(shard.as_path()));
    }
    // And it takes part in the plans that follow.
    wait_fetched(&[&p1, &p2, &p3]);
}

#[test]
fn a_corrupt_transfer_is_caught_by_its_digest_and_fetched_again_elsewhere() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3);
    // Node 1 is the first source in every plan (sources go by id) and
    // serves corrupt bytes.
    let (p1, seed) = start(
        &c,
        NodeOpts {
            env: &[("LOIP_TEST_CORRUPT_SERVE", "1")],
            ..node(1, true, None)
        },
    );
    let (p2, _) = start(&c, node(2, true, Some(&seed)));
    let (p3, _) = start(&c, node(3, false, Some(&seed)));
    let all = [&p1, &p2, &p3];
    let st = wait_fetched(&all);
    let shard = st[2].plan.as_ref().unwrap().shard.clone().unwrap();
    assert_same_tensors(&shard, &c.model);
    let log = std::fs::read_to_string(&p3.stderr).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("digest mismatch"))
        .unwrap_or_else(|| panic!("no digest error in {log}"));
    assert!(
        line.contains("tensor ") && line.contains("from 0000000000000001"),
        "the error names the tensor and the peer: {line}"
    );
}

#[test]
fn a_node_killed_while_preparing_is_planned_out() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3);
    // Two nodes must be able to hold the model between them.
    let big = "6MB";
    // Node 1 (never the leader: the lowest id) is slow to prepare.
    let (p1, seed) = start(
        &c,
        NodeOpts {
            env: &[("LOIP_TEST_PREPARE_DELAY_MS", "60000")],
            budget: big,
            ..node(1, true, None)
        },
    );
    let (p2, _) = start(
        &c,
        NodeOpts {
            budget: big,
            ..node(2, true, Some(&seed))
        },
    );
    let (p3, _) = start(
        &c,
        NodeOpts {
            budget: big,
            ..node(3, true, Some(&seed))
        },
    );
    // The others accept the first plan; node 1 is still preparing it.
    wait_for(
        &[&p2, &p3],
        Duration::from_secs(30),
        "epoch 1 pending",
        |st| st.iter().all(|s| s.membership.pending.is_some()),
    );
    let before = read_status(&p2.data).unwrap();
    assert_eq!(
        before.membership.committed.epoch, 0,
        "not committed without node 1"
    );
    drop(p1); // SIGKILL
    let st = wait_for(&[&p2, &p3], Duration::from_secs(20), "re-planned", |st| {
        agreed(st, 2)
    });
    assert!(st[0].membership.committed.epoch >= 2);
    assert!(!st[0].membership.committed.contains(NodeId(1)));
    check_cover(&st);
}

/// Sends `bytes` on a new stream and reads the answer to its end.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .map_err(|_| "timeout".to_string())?;
    r.map_err(|e| e.to_string())
}

#[test]
fn a_node_drops_out_of_epoch_frames_and_survives_malformed_ones() {
    use loip::cluster::fetch::{FetchReply, FetchRequest};
    use loip::cluster::shell::Wire;
    use loip::cluster::{Config, Msg, Plan};
    use loip::net::frame::{self, FrameLimits};
    use loip::net::identity::NodeIdentity;
    use loip::net::quic::{Endpoint, Limits};

    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(1);
    let (mut p1, addr) = start(
        &c,
        NodeOpts {
            expect: 1,
            ..node(1, true, None)
        },
    );
    let st = wait_for(&[&p1], Duration::from_secs(30), "a one-node plan", |st| {
        agreed(st, 1)
    });
    let epoch = st[0].membership.committed.epoch;
    assert!(epoch >= 1);
    // A peer with a valid certificate of the cluster sends bad frames.
    create_node(&c.path().join("ca"), &c.path().join("n9"), NodeId(9)).unwrap();
    let ident = NodeIdentity::load(&c.path().join("n9")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &ident, Limits::default()).unwrap();
        let peer = ep.connect(addr.parse().unwrap(), NodeId(1)).await.unwrap();
        // Postcard that is no message: the stream is reset (code 5).
        let mut garbage = 9u32.to_le_bytes().to_vec();
        garbage.push(frame::KIND_CONTROL);
        garbage.extend_from_slice(&[0xff; 8]);
        let err = exchange(&peer.conn, &garbage).await.unwrap_err();
        assert!(err.contains("error 5"), "{err}");
        // Over the control limit: reset before it is read (code 1).
        let mut huge = (2u32 << 20).to_le_bytes().to_vec();
        huge.push(frame::KIND_CONTROL);
        let err = exchange(&peer.conn, &huge).await.unwrap_err();
        assert!(err.contains("error 1"), "{err}");
        // A fetch for an epoch before the committed one: refused, counted.
        let req = Wire::Fetch(FetchRequest::Metadata {
            epoch: epoch - 1,
            model: [0; 32],
        });
        let reply = exchange(&peer.conn, &frame::encode_control(&req).unwrap())
            .await
            .unwrap();
        let f = frame::decode(&reply, &FrameLimits::default(), None).unwrap();
        match f.control::<FetchReply>().unwrap() {
            FetchReply::Refused(r) => assert!(r.contains("older than"), "{r}"),
            other => panic!("{other:?}"),
        }
        // A plan proposal for an old epoch: dropped, counted.
        let old = Wire::Membership(Msg::Prepare {
            term: 99,
            committed: Config::default(),
            plan: Plan {
                config: Config {
                    epoch: epoch - 1,
                    term: 99,
                    members: vec![],
                },
                body: vec![],
            },
        });
        let _ = exchange(&peer.conn, &frame::encode_control(&old).unwrap()).await;
    });
    let st = wait_for(&[&p1], Duration::from_secs(10), "counted", |st| {
        st[0].malformed_frames >= 1 && st[0].out_of_epoch_frames >= 2
    });
    // Still running, still the leader of the same plan, not moved to term 99.
    assert!(p1.child.try_wait().unwrap().is_none());
    assert_eq!(st[0].membership.committed.epoch, epoch);
    assert_eq!(st[0].membership.leader, Some(NodeId(1)));
    assert!(st[0].membership.term < 99);
    let o = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["status", "--data-dir"])
        .arg(&p1.data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("out of epoch (dropped)"), "{text}");
}

#[test]
fn a_node_that_cannot_fetch_reports_it_and_is_planned_out() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3);
    // Both sources serve corrupt bytes.
    let corrupt: &[(&str, &str)] = &[("LOIP_TEST_CORRUPT_SERVE", "1")];
    let (p1, seed) = start(
        &c,
        NodeOpts {
            env: corrupt,
            ..node(1, true, None)
        },
    );
    let (p2, _) = start(
        &c,
        NodeOpts {
            env: corrupt,
            ..node(2, true, Some(&seed))
        },
    );
    let (p3, _) = start(&c, node(3, false, Some(&seed)));
    let all = [&p1, &p2, &p3];
    let st = wait_for(&all, Duration::from_secs(40), "node 3 planned out", |st| {
        st[2].prepare_error.is_some()
            && st.iter().all(|s| {
                let m = &s.membership.committed;
                m.epoch >= 1 && m.members.len() == 2 && !m.contains(NodeId(3))
            })
    });
    let e = st[2].prepare_error.as_ref().unwrap();
    assert!(
        e.contains("tensor ") && e.contains("digest mismatch"),
        "the error names the tensor: {e}"
    );
    assert!(
        !c.path().join("d3/model-shard.gguf").exists(),
        "no file with the final name"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["status", "--data-dir"])
        .arg(&p3.data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("prepare  failed"), "{text}");
}
