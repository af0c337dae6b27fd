//! Tensor fetch over real QUIC on 127.0.0.1, in one process: a peer that
//! serves corrupt bytes is caught by the digest (the error names the
//! tensor, no file with the final name is left), a peer that stalls mid
//! transfer is timed out with a one-line error, and the serving endpoint
//! goes on serving.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use loip::cluster::dist::{ModelRef, NodeFetch, PlanBody, TensorEntry};
use loip::cluster::fetch::{
    self, Expect, FetchError, FetchLimits, FetchRequest, LocalModel, ServeKnobs, Server,
};
use loip::cluster::prepare::{self, PrepareError, PrepareSpec, SHARD_FILE};
use loip::cluster::shell::Wire;
use loip::model::dtype::GgmlType;
use loip::model::gguf::Gguf;
use loip::model::synth::SynthSpec;
use loip::net::identity::{create_ca, create_node, NodeIdentity};
use loip::net::quic::{self, Endpoint, Handled, Limits, PeerConnection};
use loip::net::NodeId;
use loip::plan::{Loading, Plan, Planner, Window};

const SERVER: NodeId = NodeId(0xa);
const CLIENT: NodeId = NodeId(0xb);

struct Setup {
    dir: tempfile::TempDir,
    model: Arc<LocalModel>,
    server: Endpoint,
    client: Endpoint,
}

fn identity(dir: &Path, id: NodeId) -> NodeIdentity {
    let out = dir.join(format!("n{id}"));
    create_node(&dir.join("ca"), &out, id).unwrap();
    NodeIdentity::load(&out).unwrap()
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A model, and a server endpoint answering fetches with `knobs`.
fn setup(knobs: ServeKnobs) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    create_ca(&dir.path().join("ca")).unwrap();
    let path = dir.path().join("model.gguf");
    let mut spec = SynthSpec::tiny(GgmlType::Q8_0);
    // Tensors of several chunks, so that a stall falls mid-transfer.
    spec.n_embd = 512;
    spec.n_ff = 1536;
    spec.writer().write(&path).unwrap();
    let model = Arc::new(LocalModel::open(&path).unwrap());
    let server = Endpoint::bind(local(), &identity(dir.path(), SERVER), Limits::default()).unwrap();
    let client = Endpoint::bind(local(), &identity(dir.path(), CLIENT), Limits::default()).unwrap();
    let served = Server {
        model: Some(model.clone()),
        knobs,
    };
    let ep = server.clone();
    tokio::spawn(async move {
        while let Some(peer) = ep.accept().await {
            let ep = ep.clone();
            let served = served.clone();
            tokio::spawn(async move {
                quic::serve_connection_with(&ep, peer, None, move |_, f| {
                    match f.control::<Wire>()? {
                        Wire::Fetch(req) => Ok(Handled::TakeOver(fetch::serve_task(
                            served.clone(),
                            req,
                            None,
                        ))),
                        _ => Ok(Handled::Reply(None)),
                    }
                })
                .await
            });
        }
    });
    Setup {
        dir,
        model,
        server,
        client,
    }
}

async fn connect(s: &Setup) -> PeerConnection {
    s.client
        .connect(s.server.local_addr().unwrap(), SERVER)
        .await
        .unwrap()
}

/// A one-node plan whose windows are the whole model, with everything to
/// fetch (the client "has no model").
fn body(m: &LocalModel) -> PlanBody {
    let n_layer = 2u32;
    let md = m.metadata().unwrap();
    let tensors = m
        .gguf
        .tensors()
        .iter()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            ty: t.ty.id(),
            dims: t.dims.clone(),
            size: t.size,
            sha256: m.tensor_sha(&t.name).unwrap(),
        })
        .collect();
    PlanBody {
        model: Some(ModelRef {
            name: "model.gguf".into(),
            digest: m.info.digest,
            metadata_sha256: md.sha256,
            metadata_len: md.bytes.len() as u64,
        }),
        plan: Some(Plan {
            epoch: 1,
            planner: Planner::Loip,
            ring: vec![CLIENT.to_string()],
            windows: vec![Window {
                device: 0,
                units: 0..n_layer + 1,
                streamed: vec![false; n_layer as usize + 1],
            }],
            kv_budget_bytes: vec![0],
            slots: 1,
            loading: Loading::Prefetch,
            micro_batches: 1,
            batch: 1,
            context_tokens: 64,
        }),
        ring: vec![CLIENT],
        fetch: vec![NodeFetch {
            node: CLIENT,
            tensors,
        }],
        sources: vec![SERVER],
        note: None,
        planned_with: vec![CLIENT],
        unfit: Vec::new(),
        kept_unfit: false,
    }
}

#[tokio::test]
async fn a_good_peer_gives_a_shard_with_the_same_tensors() {
    let s = setup(ServeKnobs::default());
    let peer = connect(&s).await;
    let b = body(&s.model);
    let data = s.dir.path().join("client");
    std::fs::create_dir_all(&data).unwrap();
    let spec = PrepareSpec {
        me: CLIENT,
        epoch: 1,
        body: &b,
        local: None,
        data_dir: &data,
        sources: vec![(SERVER, peer.conn.clone())],
        limits: FetchLimits::default(),
    };
    let done = prepare::prepare(spec).await.unwrap();
    assert_eq!(done.fetched, s.model.gguf.tensors().len());
    let shard = Gguf::open(&done.shard.unwrap()).unwrap();
    for t in s.model.gguf.tensors() {
        let got = shard.tensor(&t.name).unwrap();
        assert!(
            shard.tensor_data(got) == s.model.gguf.tensor_data(t),
            "{}",
            t.name
        );
    }
    // Prepared again: everything is reused, nothing fetched.
    let spec = PrepareSpec {
        me: CLIENT,
        epoch: 1,
        body: &b,
        local: None,
        data_dir: &data,
        sources: vec![],
        limits: FetchLimits::default(),
    };
    let again = prepare::prepare(spec).await.unwrap();
    assert_eq!(
        (again.fetched, again.reused),
        (0, s.model.gguf.tensors().len())
    );
}

#[tokio::test]
async fn corrupt_bytes_are_caught_by_the_digest_and_leave_no_shard() {
    let s = setup(ServeKnobs {
        corrupt: true,
        stall_after: None,
    });
    let peer = connect(&s).await;
    let b = body(&s.model);
    let data = s.dir.path().join("client");
    std::fs::create_dir_all(&data).unwrap();
    let spec = PrepareSpec {
        me: CLIENT,
        epoch: 1,
        body: &b,
        local: None,
        data_dir: &data,
        sources: vec![(SERVER, peer.conn.clone())],
        limits: FetchLimits::default(),
    };
    let err = prepare::prepare(spec).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PrepareError::Fetch { .. }), "{text}");
    let first = &s.model.gguf.tensors()[0].name;
    assert!(
        text.contains(&format!("tensor {first}")) && text.contains("digest mismatch"),
        "{text}"
    );
    assert!(
        !data.join(SHARD_FILE).exists(),
        "no file with the final name"
    );
    let parts = std::fs::read_dir(data.join("fetch.tmp")).unwrap().count();
    assert_eq!(parts, 0, "no part files left");
}

#[tokio::test]
async fn a_stalled_transfer_times_out_and_the_server_keeps_serving() {
    let s = setup(ServeKnobs {
        corrupt: false,
        stall_after: Some(fetch::CHUNK as u64),
    });
    let peer = connect(&s).await;
    // The largest tensor spans several chunks.
    let t = s
        .model
        .gguf
        .tensors()
        .iter()
        .max_by_key(|t| t.size)
        .unwrap()
        .clone();
    assert!(t.size > 2 * fetch::CHUNK as u64);
    let req = FetchRequest::Tensor {
        epoch: 1,
        model: s.model.info.digest,
        name: t.name.clone(),
    };
    let expect = Expect {
        len: t.size,
        sha256: s.model.tensor_sha(&t.name).unwrap(),
    };
    let part = s.dir.path().join("t.part");
    let limits = FetchLimits {
        stall: Duration::from_millis(500),
        ..FetchLimits::default()
    };
    let start = Instant::now();
    let err = fetch::fetch_to_file(&peer.conn, SERVER, &req, expect, &part, &limits)
        .await
        .unwrap_err();
    let took = start.elapsed();
    let text = err.to_string();
    assert!(matches!(err, FetchError::Stalled { .. }), "{text}");
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(text.contains(&t.name) && text.contains("stalled"), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!part.exists());
    // The same connection still serves: the metadata is not held back.
    let md = s.model.metadata().unwrap();
    let req = FetchRequest::Metadata {
        epoch: 1,
        model: s.model.info.digest,
    };
    let expect = Expect {
        len: md.bytes.len() as u64,
        sha256: md.sha256,
    };
    fetch::fetch_to_file(&peer.conn, SERVER, &req, expect, &part, &limits)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), md.bytes);
}

#[tokio::test]
async fn requests_for_another_model_or_a_missing_tensor_are_refused() {
    let s = setup(ServeKnobs::default());
    let peer = connect(&s).await;
    let part = s.dir.path().join("x.part");
    let expect = Expect {
        len: 1,
        sha256: [0; 32],
    };
    for req in [
        FetchRequest::Tensor {
            epoch: 1,
            model: [9; 32],
            name: "token_embd.weight".into(),
        },
        FetchRequest::Tensor {
            epoch: 1,
            model: s.model.info.digest,
            name: "blk.99.attn_q.weight".into(),
        },
    ] {
        let err = fetch::fetch_to_file(
            &peer.conn,
            SERVER,
            &req,
            expect,
            &part,
            &FetchLimits::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, FetchError::Refused { .. }), "{err}");
    }
    // A wrong length announced by the plan is an error before any byte.
    let t = &s.model.gguf.tensors()[0];
    let req = FetchRequest::Tensor {
        epoch: 1,
        model: s.model.info.digest,
        name: t.name.clone(),
    };
    let err = fetch::fetch_to_file(
        &peer.conn,
        SERVER,
        &req,
        Expect {
            len: t.size + 1,
            sha256: [0; 32],
        },
        &part,
        &FetchLimits::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("bytes offered"), "{err}");
}
