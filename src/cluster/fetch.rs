//! Tensor fetch and link probes over QUIC.
//!
//! # Fetch
//!
//! A node that lacks tensors of its windows opens a stream to a peer that
//! holds the model and sends one [`FetchRequest`] control frame: the model's
//! metadata (as a GGUF with no tensors), or one tensor by name. The peer
//! answers `Begin { len }`, then the bytes in [`Chunk`](FetchReply::Chunk)
//! frames of at most [`CHUNK`] bytes, then `End`; or `Refused`. The
//! receiver streams the bytes into a part file while hashing them, and
//! checks the length and the SHA-256 published with the plan before the
//! part file is used; a wrong digest is an error that names the tensor and
//! the peer, and the part file is removed. Every frame must arrive within
//! the stall timeout, or the stream is reset and the fetch fails with a
//! one-line error. Memory stays at one chunk per transfer on both sides.
//!
//! Requests carry the plan epoch they are for; a peer whose committed epoch
//! is newer refuses them (and counts them as out-of-epoch).
//!
//! # Probes
//!
//! The leader measures its link to a node with [`probe_link`]: pings for
//! the round trip, then a timed 256 KiB payload, both answered on the same
//! stream by the node's control handler.
//!
//! # Test knobs
//!
//! [`ServeKnobs`] makes a serving node misbehave, for tests only: the shell
//! reads `LOIP_TEST_CORRUPT_SERVE=1` (flip one byte of every tensor it
//! serves) and `LOIP_TEST_STALL_SERVE=BYTES` (stop sending after that many
//! bytes of a tensor, without closing the stream).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use super::dist::{Digest, ModelInfo, TensorEntry};
use super::linkwatch::LinkSample;
use super::membership::Epoch;
use crate::model::gguf::{Gguf, GgufError, GgufWriter};
use crate::net::frame::{self, FrameError, FrameLimits};
use crate::net::quic::{self, ByteBudget, StreamTask};
use crate::net::NodeId;
use crate::plan::Link;

/// Largest chunk of tensor bytes in one frame.
pub const CHUNK: usize = 256 << 10;
/// Payload of the throughput probe.
pub const PROBE_BYTES: usize = 256 << 10;
/// Pings of the RTT probe.
pub const PROBE_PINGS: usize = 4;

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("{what} from {peer}: opening a stream: {message}")]
    Open {
        what: String,
        peer: NodeId,
        message: String,
    },
    #[error("{what} from {peer}: refused: {reason}")]
    Refused {
        what: String,
        peer: NodeId,
        reason: String,
    },
    #[error("{what} from {peer}: stalled for {secs:.1} s after {got} of {len} bytes")]
    Stalled {
        what: String,
        peer: NodeId,
        secs: f64,
        got: u64,
        len: u64,
    },
    #[error("{what} from {peer}: digest mismatch (SHA-256 of the {len} bytes received is not the plan's)")]
    Digest {
        what: String,
        peer: NodeId,
        len: u64,
    },
    #[error("{what} from {peer}: {message}")]
    Protocol {
        what: String,
        peer: NodeId,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A request, the first frame of a fetch stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchRequest {
    /// The model's metadata as a GGUF file with no tensors.
    Metadata { epoch: Epoch, model: Digest },
    /// One tensor's bytes.
    Tensor {
        epoch: Epoch,
        model: Digest,
        name: String,
    },
}

impl FetchRequest {
    pub fn epoch(&self) -> Epoch {
        match self {
            FetchRequest::Metadata { epoch, .. } | FetchRequest::Tensor { epoch, .. } => *epoch,
        }
    }

    /// What is asked for, for messages.
    pub fn what(&self) -> String {
        match self {
            FetchRequest::Metadata { .. } => "model metadata".into(),
            FetchRequest::Tensor { name, .. } => format!("tensor {name}"),
        }
    }
}

/// The frames of a fetch stream's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchReply {
    Begin { len: u64 },
    Chunk(Vec<u8>),
    End,
    Refused(String),
}

/// Misbehaviour of a serving node, for tests (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeKnobs {
    /// Flip one byte of every tensor served.
    pub corrupt: bool,
    /// Stop sending a tensor after this many bytes, keeping the stream open.
    pub stall_after: Option<u64>,
}

impl ServeKnobs {
    /// From `LOIP_TEST_CORRUPT_SERVE` and `LOIP_TEST_STALL_SERVE`.
    pub fn from_env() -> ServeKnobs {
        ServeKnobs {
            corrupt: std::env::var("LOIP_TEST_CORRUPT_SERVE").is_ok_and(|v| v == "1"),
            stall_after: std::env::var("LOIP_TEST_STALL_SERVE")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }
}

/// The model's metadata as a GGUF file with no tensors, and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataFile {
    pub bytes: Vec<u8>,
    pub sha256: Digest,
}

/// A local model file, opened for planning and for serving its tensors.
pub struct LocalModel {
    pub path: PathBuf,
    pub gguf: Arc<Gguf>,
    pub info: ModelInfo,
    metadata: OnceLock<Result<Arc<MetadataFile>, String>>,
    /// The hyper-parameters and the scheduler's shape, parsed once: the
    /// leader plans with them at every link evaluation.
    plan_shape: OnceLock<Result<Arc<PlanShape>, String>>,
    tensor_sha: Mutex<std::collections::HashMap<String, Digest>>,
}

/// A model as the scheduler sees it.
pub struct PlanShape {
    pub config: crate::model::config::Config,
    pub shape: crate::plan::ModelShape,
}

impl LocalModel {
    pub fn open(path: &Path) -> Result<LocalModel, GgufError> {
        let gguf = Arc::new(Gguf::open(path)?);
        let digest = crate::plan::profile::model_digest(path).map_err(|e| GgufError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let tensor_bytes = gguf.tensors().iter().map(|t| t.size).sum();
        Ok(LocalModel {
            path: path.to_path_buf(),
            gguf,
            info: ModelInfo {
                digest,
                tensor_bytes,
            },
            metadata: OnceLock::new(),
            plan_shape: OnceLock::new(),
            tensor_sha: Mutex::new(Default::default()),
        })
    }

    /// The metadata-only GGUF and its SHA-256 (made once).
    pub fn metadata(&self) -> Result<Arc<MetadataFile>, String> {
        self.metadata
            .get_or_init(|| {
                let bytes = metadata_gguf(&self.gguf).map_err(|e| e.to_string())?;
                let sha256: Digest = Sha256::digest(&bytes).into();
                Ok(Arc::new(MetadataFile { bytes, sha256 }))
            })
            .clone()
    }

    /// The model's hyper-parameters and scheduler shape (cached).
    pub fn plan_shape(&self) -> Result<Arc<PlanShape>, String> {
        self.plan_shape
            .get_or_init(|| {
                let config = crate::model::config::Config::from_gguf(&self.gguf)
                    .map_err(|e| e.to_string())?;
                let shape =
                    crate::plan::ModelShape::from_gguf(&self.path).map_err(|e| e.to_string())?;
                Ok(Arc::new(PlanShape { config, shape }))
            })
            .clone()
    }

    /// SHA-256 of a tensor's bytes (cached).
    pub fn tensor_sha(&self, name: &str) -> Option<Digest> {
        if let Some(d) = self.tensor_sha.lock().ok()?.get(name) {
            return Some(*d);
        }
        let t = self.gguf.tensor(name)?;
        let d: Digest = Sha256::digest(self.gguf.tensor_data(t)).into();
        self.tensor_sha.lock().ok()?.insert(name.to_string(), d);
        Some(d)
    }
}

/// The model's metadata, in file order, as a GGUF file with no tensors.
pub fn metadata_gguf(g: &Gguf) -> Result<Vec<u8>, GgufError> {
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata().iter() {
        w.add_kv(k, v.clone());
    }
    w.to_bytes()
}

/// What a node serves: its model (if any), the epoch it is at, and knobs.
#[derive(Clone)]
pub struct Server {
    pub model: Option<Arc<LocalModel>>,
    pub knobs: ServeKnobs,
}

/// The task that answers one fetch request on its stream. `stale` when the
/// request's epoch is older than the committed one.
pub fn serve_task(server: Server, req: FetchRequest, stale: Option<Epoch>) -> StreamTask {
    Box::new(move |send, recv| serve(server, req, stale, send, recv).boxed())
}

async fn send_reply(send: &mut SendStream, r: &FetchReply) -> bool {
    match frame::encode_control(r) {
        Ok(b) => send.write_all(&b).await.is_ok(),
        Err(_) => false,
    }
}

async fn serve(
    server: Server,
    req: FetchRequest,
    stale: Option<Epoch>,
    mut send: SendStream,
    _recv: RecvStream,
) {
    let refuse = |reason: String| FetchReply::Refused(reason);
    let model = match (&server.model, &req) {
        (_, r) if stale.is_some() => Err(refuse(format!(
            "request for epoch {} is older than the committed epoch {}",
            r.epoch(),
            stale.unwrap_or_default()
        ))),
        (None, _) => Err(refuse("no model file here".into())),
        (Some(m), FetchRequest::Metadata { model, .. } | FetchRequest::Tensor { model, .. })
            if *model != m.info.digest =>
        {
            Err(refuse("another model file here".into()))
        }
        (Some(m), _) => Ok(m.clone()),
    };
    let model = match model {
        Ok(m) => m,
        Err(r) => {
            send_reply(&mut send, &r).await;
            let _ = send.finish();
            return;
        }
    };
    match &req {
        FetchRequest::Metadata { .. } => match model.metadata() {
            Ok(md) => {
                let _ = send_bytes(&mut send, &md.bytes, ServeKnobs::default()).await;
            }
            Err(e) => {
                send_reply(&mut send, &refuse(e)).await;
            }
        },
        FetchRequest::Tensor { name, .. } => match model.gguf.tensor(name) {
            Some(t) => {
                let data = model.gguf.tensor_data(t);
                let _ = send_bytes(&mut send, data, server.knobs).await;
            }
            None => {
                send_reply(&mut send, &refuse(format!("no tensor {name:?}"))).await;
            }
        },
    }
    let _ = send.finish();
}

/// `Begin`, chunks, `End`; one chunk in memory at a time.
async fn send_bytes(send: &mut SendStream, data: &[u8], knobs: ServeKnobs) -> Option<()> {
    let len = data.len() as u64;
    send_reply(send, &FetchReply::Begin { len })
        .await
        .then_some(())?;
    let mut sent = 0u64;
    for piece in data.chunks(CHUNK) {
        if let Some(limit) = knobs.stall_after {
            if sent + piece.len() as u64 > limit {
                // Test knob: hold the stream open until the receiver gives up.
                let _ = send.stopped().await;
                return None;
            }
        }
        let mut chunk = piece.to_vec();
        if knobs.corrupt && sent == 0 {
            if let Some(b) = chunk.first_mut() {
                *b ^= 0x5a;
            }
        }
        send_reply(send, &FetchReply::Chunk(chunk))
            .await
            .then_some(())?;
        sent += piece.len() as u64;
    }
    send_reply(send, &FetchReply::End).await.then_some(())
}

/// How a fetch is bounded.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    /// Each frame of the answer must arrive within this.
    pub stall: Duration,
    pub frames: FrameLimits,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            stall: Duration::from_secs(10),
            frames: FrameLimits::default(),
        }
    }
}

/// What a fetch must produce.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub len: u64,
    pub sha256: Digest,
}

impl Expect {
    pub fn of(t: &TensorEntry) -> Expect {
        Expect {
            len: t.size,
            sha256: t.sha256,
        }
    }
}

/// Fetches what `req` names from `peer` into the file `part`, checking the
/// length and digest. On any error the part file is removed.
pub async fn fetch_to_file(
    conn: &Connection,
    peer: NodeId,
    req: &FetchRequest,
    expect: Expect,
    part: &Path,
    limits: &FetchLimits,
) -> Result<(), FetchError> {
    let r = fetch_inner(conn, peer, req, expect, part, limits).await;
    if r.is_err() {
        let _ = fs::remove_file(part);
    }
    r
}

async fn fetch_inner(
    conn: &Connection,
    peer: NodeId,
    req: &FetchRequest,
    expect: Expect,
    part: &Path,
    limits: &FetchLimits,
) -> Result<(), FetchError> {
    let what = req.what();
    let proto = |message: String| FetchError::Protocol {
        what: what.clone(),
        peer,
        message,
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| FetchError::Open {
        what: what.clone(),
        peer,
        message: e.to_string(),
    })?;
    let bytes = super::shell::Wire::Fetch(req.clone());
    let bytes = frame::encode_control(&bytes).map_err(|e| proto(e.to_string()))?;
    send.write_all(&bytes)
        .await
        .map_err(|e| proto(e.to_string()))?;
    let _ = send.finish();
    // Frames of the answer are not held against the endpoint's budget: one
    // chunk at a time per fetch.
    let budget = ByteBudget::new(limits.frames.max_control);
    let io = |source| FetchError::Io {
        path: part.to_path_buf(),
        source,
    };
    let mut file = BufWriter::new(File::create(part).map_err(io)?);
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let mut len = None;
    let started = Instant::now();
    loop {
        let next = tokio::time::timeout(
            limits.stall,
            quic::read_frame(&mut recv, &limits.frames, None, &budget, limits.stall),
        )
        .await;
        let frame = match next {
            Err(_) | Ok(Err(FrameError::Timeout)) => {
                let code = VarInt::from_u32(FrameError::Timeout.code());
                let _ = recv.stop(code);
                let _ = send.reset(code);
                return Err(FetchError::Stalled {
                    what,
                    peer,
                    secs: limits.stall.as_secs_f64(),
                    got,
                    len: len.unwrap_or(expect.len),
                });
            }
            Ok(Err(e)) => return Err(proto(e.to_string())),
            Ok(Ok(None)) => return Err(proto("stream ended before the data did".into())),
            Ok(Ok(Some(r))) => r.frame,
        };
        let reply: FetchReply = frame.control().map_err(|e| proto(e.to_string()))?;
        match (reply, len) {
            (FetchReply::Refused(reason), _) => {
                return Err(FetchError::Refused { what, peer, reason });
            }
            (FetchReply::Begin { len: n }, None) => {
                if n != expect.len {
                    return Err(proto(format!(
                        "{n} bytes offered, the plan says {}",
                        expect.len
                    )));
                }
                len = Some(n);
            }
            (FetchReply::Chunk(c), Some(n)) => {
                got += c.len() as u64;
                if got > n {
                    return Err(proto(format!("more than the {n} bytes announced")));
                }
                hash.update(&c);
                file.write_all(&c).map_err(io)?;
            }
            (FetchReply::End, Some(n)) => {
                if got != n {
                    return Err(proto(format!("ended after {got} of {n} bytes")));
                }
                break;
            }
            (r, _) => return Err(proto(format!("unexpected {}", reply_name(&r)))),
        }
    }
    let sha: Digest = hash.finalize().into();
    if sha != expect.sha256 {
        return Err(FetchError::Digest {
            what,
            peer,
            len: got,
        });
    }
    let f = file.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    log::debug!(
        "fetched {} ({got} bytes) from {peer} in {:?}",
        req.what(),
        started.elapsed()
    );
    Ok(())
}

fn reply_name(r: &FetchReply) -> &'static str {
    match r {
        FetchReply::Begin { .. } => "Begin",
        FetchReply::Chunk(_) => "Chunk",
        FetchReply::End => "End",
        FetchReply::Refused(_) => "Refused",
    }
}

/// Probe frames, answered by a node's control handler on the same stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    Ping(u64),
    Pong(u64),
    /// A payload to time.
    Bulk(Vec<u8>),
    /// The payload's length, received.
    BulkAck(u64),
}

/// The answer to a probe frame, if it needs one.
pub fn answer_probe(p: &Probe) -> Option<Probe> {
    match p {
        Probe::Ping(n) => Some(Probe::Pong(*n)),
        Probe::Bulk(b) => Some(Probe::BulkAck(b.len() as u64)),
        Probe::Pong(_) | Probe::BulkAck(_) => None,
    }
}

/// Answers the probes of one stream as a node behind `link` would: each
/// reply waits two one-way latencies, and a bulk transfer its bytes over
/// the bandwidth too (the test knob `LOIP_TEST_LINK_FILE`; see `shell`).
pub async fn answer_probes_emulated(
    first: Probe,
    link: crate::net::emulated::LinkEmulation,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let limits = FrameLimits::default();
    let budget = ByteBudget::new(limits.max_control);
    let mut probe = first;
    loop {
        let mut delay = link.latency * 2;
        if let Probe::Bulk(b) = &probe {
            delay += Duration::from_secs_f64(b.len() as f64 * 8.0 / link.bandwidth_bps);
        }
        tokio::time::sleep(delay).await;
        let Some(reply) = answer_probe(&probe) else {
            return;
        };
        let Ok(bytes) = frame::encode_control(&super::shell::Wire::Probe(reply)) else {
            return;
        };
        if send.write_all(&bytes).await.is_err() {
            return;
        }
        let next =
            quic::read_frame(&mut recv, &limits, None, &budget, Duration::from_secs(5)).await;
        match next
            .ok()
            .flatten()
            .map(|f| f.frame.control::<super::shell::Wire>())
        {
            Some(Ok(super::shell::Wire::Probe(p))) => probe = p,
            _ => return,
        }
    }
}

/// Measures the link to `peer`: the median of a few ping round trips, and
/// the throughput of a 256 KiB transfer. Bounded by `timeout` in all.
pub async fn probe_link(conn: &Connection, timeout: Duration) -> Option<Link> {
    let s = probe_sample(conn, timeout).await?;
    // The transfer's time less one round trip (the ack).
    let secs = s.transfer_s.max(1e-6);
    Some(Link {
        bandwidth_bps: (s.bytes as f64 * 8.0 / secs).clamp(1e6, 1e12),
        latency_s: (s.rtt_s / 2.0).max(1e-6),
    })
}

/// The raw figures of one probe, for the leader's link watch to judge
/// (`cluster::linkwatch`), which refuses the implausible ones that
/// [`probe_link`] clamps.
pub async fn probe_sample(conn: &Connection, timeout: Duration) -> Option<LinkSample> {
    tokio::time::timeout(timeout, probe_inner(conn))
        .await
        .ok()
        .flatten()
}

async fn probe_inner(conn: &Connection) -> Option<LinkSample> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    let limits = FrameLimits::default();
    let budget = ByteBudget::new(limits.max_control);
    let mut rtts = Vec::new();
    for n in 0..PROBE_PINGS as u64 {
        let t = Instant::now();
        let b = frame::encode_control(&super::shell::Wire::Probe(Probe::Ping(n))).ok()?;
        send.write_all(&b).await.ok()?;
        let f = quic::read_frame(&mut recv, &limits, None, &budget, Duration::from_secs(5))
            .await
            .ok()??;
        match f.frame.control::<super::shell::Wire>().ok()? {
            super::shell::Wire::Probe(Probe::Pong(m)) if m == n => {}
            _ => return None,
        }
        rtts.push(t.elapsed().as_secs_f64());
    }
    rtts.sort_by(f64::total_cmp);
    let rtt = rtts[rtts.len() / 2];
    let payload = vec![0xa5u8; PROBE_BYTES];
    let b = frame::encode_control(&super::shell::Wire::Probe(Probe::Bulk(payload))).ok()?;
    let t = Instant::now();
    send.write_all(&b).await.ok()?;
    let f = quic::read_frame(&mut recv, &limits, None, &budget, Duration::from_secs(5))
        .await
        .ok()??;
    match f.frame.control::<super::shell::Wire>().ok()? {
        super::shell::Wire::Probe(Probe::BulkAck(n)) if n == PROBE_BYTES as u64 => {}
        _ => return None,
    }
    let _ = send.finish();
    Some(LinkSample {
        bytes: PROBE_BYTES as u64,
        transfer_s: t.elapsed().as_secs_f64() - rtt,
        rtt_s: rtt,
    })
}
