//! The async shell of a ring node: one sender task per peer, which writes
//! that link's messages in order on one QUIC stream (through the emulated
//! link when one is set), and a receiver that checks every message before
//! the compute thread sees it.
//!
//! # Cancel safety
//!
//! Tasks are aborted at shutdown; a message half written is lost with its
//! stream, which the peer sees reset. Nothing else is shared with them.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::node::{requests_of, Input, Layout, Outgoing};
use super::wire::{self, Hop, Msg};
use super::{Peer, RingConfig, RingStats};
use crate::net::emulated::{LinkEmulation, Pacer};
use crate::net::frame::{Frame, FrameError};
use crate::net::quic::{self, Endpoint, PeerConnection, Received};
use crate::net::NodeId;

/// The loss reason of a peer that could not be dialled.
pub(super) const UNREACHABLE: &str = "unreachable";

/// Most tokens one message may carry.
const MAX_HOP_TOKENS: usize = 8192;

/// Starts a sender task for every other member; returns their queues by
/// ring index (`None` for this node). Each adds the bytes it writes to
/// `stats`' count for its link.
pub(super) fn start_senders(
    config: &RingConfig,
    endpoint: &Endpoint,
    inbox: &Sender<Input>,
    stats: &Arc<RingStats>,
    rt: &tokio::runtime::Handle,
) -> (
    Vec<Option<UnboundedSender<Outgoing>>>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let mut outs = Vec::new();
    let mut tasks = Vec::new();
    for (i, peer) in config.peers.iter().enumerate() {
        if i == config.me {
            outs.push(None);
            continue;
        }
        let (tx, rx) = unbounded_channel();
        let link = config.links.get(i).copied().flatten();
        let watch = Watch {
            index: i,
            inbox: inbox.clone(),
            stats: stats.clone(),
        };
        let live = config.live_link.clone();
        tasks.push(rt.spawn(send_loop(endpoint.clone(), *peer, link, live, rx, watch)));
        outs.push(Some(tx));
    }
    (outs, tasks)
}

async fn connect(endpoint: &Endpoint, peer: Peer) -> Option<PeerConnection> {
    for attempt in 0..100u32 {
        match endpoint.connect(peer.addr, peer.id).await {
            Ok(c) => return Some(c),
            Err(e) => {
                log::debug!("dialling ring peer {} (attempt {attempt}): {e}", peer.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    log::warn!("ring peer {} at {} is unreachable", peer.id, peer.addr);
    None
}

/// Who to tell when the link to peer `index` is lost, and where its bytes
/// are counted.
struct Watch {
    index: usize,
    inbox: Sender<Input>,
    stats: Arc<RingStats>,
}

impl Watch {
    fn lost(&self, reason: String) {
        let _ = self.inbox.send(Input::PeerLost {
            peer: self.index,
            reason,
        });
    }
}

/// Writes a peer's messages in order; after the emulated link's delay
/// when there is one. A stream the peer reset is replaced by a new one.
/// The connection is made at once and watched: when it closes, or cannot
/// be made, the compute thread hears of it (the head fails the requests in
/// flight rather than leave them waiting).
async fn send_loop(
    endpoint: Endpoint,
    peer: Peer,
    link: Option<LinkEmulation>,
    live: Option<tokio::sync::watch::Receiver<Option<LinkEmulation>>>,
    mut rx: UnboundedReceiver<Outgoing>,
    watch: Watch,
) {
    let mut pacer = link.map(Pacer::new);
    let mut conn: Option<PeerConnection> = connect(&endpoint, peer).await;
    if conn.is_none() {
        watch.lost(UNREACHABLE.into());
    }
    let mut stream: Option<SendStream> = None;
    loop {
        let msg = match conn.as_ref().map(|c| c.conn.clone()) {
            Some(c) => tokio::select! {
                m = rx.recv() => m,
                e = c.closed() => {
                    watch.lost(e.to_string());
                    conn = None;
                    stream = None;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(msg) = msg else { return };
        if let Some(live) = &live {
            let now = *live.borrow();
            if now.or(link) != pacer.as_ref().map(Pacer::link) {
                pacer = now.or(link).map(Pacer::new);
            }
        }
        if let Some(p) = pacer.as_mut() {
            let due = p.due(msg.sent_at, msg.bytes.len());
            tokio::time::sleep_until(due.into()).await;
        }
        for _ in 0..2 {
            // Closed while this message was on its way (paced, or being
            // written), so the `select!` above never saw it: the compute
            // thread must hear of the loss all the same, and before the
            // redial, which may take long against a dead peer.
            if let Some(e) = conn.as_ref().and_then(|c| c.conn.close_reason()) {
                watch.lost(e.to_string());
                conn = None;
            }
            if conn.is_none() {
                conn = connect(&endpoint, peer).await;
                stream = None;
                if conn.is_none() {
                    watch.lost(UNREACHABLE.into());
                }
            }
            let Some(c) = conn.as_ref() else { break };
            if stream.is_none() {
                stream = c.conn.open_bi().await.ok().map(|(s, _)| s);
            }
            let Some(s) = stream.as_mut() else { continue };
            match s.write_all(&msg.bytes).await {
                Ok(()) => {
                    if let Some(b) = watch.stats.link_bytes.get(watch.index) {
                        RingStats::add(b, msg.bytes.len() as u64);
                    }
                    break;
                }
                Err(e) => {
                    log::debug!("ring peer {}: stream lost ({e}); opening another", peer.id);
                    stream = None;
                }
            }
        }
    }
}

/// What a receiver checks messages against: one ring's epoch.
pub(super) struct Check {
    pub layout: Layout,
    pub members: Vec<NodeId>,
    pub inbox: Sender<Input>,
    pub stats: Arc<RingStats>,
}

impl Check {
    pub fn new(
        config: &RingConfig,
        layout: Layout,
        inbox: Sender<Input>,
        stats: Arc<RingStats>,
    ) -> Check {
        Check {
            layout,
            members: config.peers.iter().map(|p| p.id).collect(),
            inbox,
            stats,
        }
    }
}

/// How long a message of an epoch newer than this node's ring waits for
/// that ring to start (nodes start the rings of a new epoch at slightly
/// different moments).
const NEWER_EPOCH_WAIT: Duration = Duration::from_secs(10);

/// Accepts ring connections on an endpoint for as long as it lives, and
/// hands each message to the ring of its epoch: the ring running now, or
/// (after a bounded wait) the next one. One acceptor serves the rings of
/// every epoch in turn, so a node's ring endpoint outlives its rings.
///
/// # Cancel safety
///
/// Dropping the acceptor aborts its tasks: the accept loop owns the
/// connection tasks, which own their stream tasks (a `JoinSet` each).
pub struct Acceptor {
    current: tokio::sync::watch::Sender<Option<Arc<Check>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Acceptor {
    /// Starts accepting on `endpoint`, with no ring yet.
    pub fn start(endpoint: &Endpoint, rt: &tokio::runtime::Handle) -> Acceptor {
        let (tx, rx) = tokio::sync::watch::channel(None::<Arc<Check>>);
        let endpoint = endpoint.clone();
        let task = rt.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Some(peer) = endpoint.accept().await {
                let rx = rx.clone();
                let endpoint = endpoint.clone();
                conns.spawn(async move {
                    let mut streams = tokio::task::JoinSet::new();
                    while let Ok((send, recv)) = peer.conn.accept_bi().await {
                        let endpoint = endpoint.clone();
                        let rx = rx.clone();
                        streams.spawn(async move {
                            serve_stream(&endpoint, rx, peer.id, send, recv).await
                        });
                        while streams.try_join_next().is_some() {}
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Acceptor { current: tx, task }
    }

    /// Makes `check`'s ring the one messages of its epoch go to.
    pub(super) fn publish(&self, check: Arc<Check>) {
        self.current.send_replace(Some(check));
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The ring a message of `epoch` goes to: the current one if it is of that
/// epoch, after waiting (bounded) for it when the epoch is newer; `None`
/// for a message of an older epoch (or a newer one that never came).
async fn ring_for(
    rx: &mut tokio::sync::watch::Receiver<Option<Arc<Check>>>,
    epoch: u64,
) -> Option<Arc<Check>> {
    let deadline = tokio::time::Instant::now() + NEWER_EPOCH_WAIT;
    loop {
        let cur = rx.borrow_and_update().clone();
        match cur {
            Some(c) if c.layout.epoch == epoch => return Some(c),
            Some(c) if c.layout.epoch > epoch => return None,
            _ => {}
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
    }
}

/// Reads a stream's messages until it ends or one is bad; a bad one resets
/// the stream (and fails the requests it names).
async fn serve_stream(
    endpoint: &Endpoint,
    mut rings: tokio::sync::watch::Receiver<Option<Arc<Check>>>,
    from: NodeId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    loop {
        match serve_one(endpoint, &mut rings, from, &mut recv).await {
            Ok(true) => {}
            Ok(false) => return,
            Err((FrameError::Stream(e), requests)) if requests.is_empty() => {
                // The connection went away (a peer stopped): not bad input.
                log::debug!("ring: stream from {from} ended: {e}");
                return;
            }
            Err((e, requests)) => {
                log::warn!("ring: bad message from {from}: {e}; resetting the stream");
                if let Some(check) = rings.borrow().clone() {
                    RingStats::add(&check.stats.bad, 1);
                    if !requests.is_empty() {
                        let _ = check.inbox.send(Input::Failed {
                            requests,
                            reason: e.to_string(),
                        });
                    }
                }
                let code = quinn::VarInt::from_u32(e.code());
                let _ = recv.stop(code);
                let _ = send.reset(code);
                return;
            }
        }
    }
}

type Bad = (FrameError, Vec<u64>);

async fn next_frame(endpoint: &Endpoint, recv: &mut RecvStream) -> Result<Option<Received>, Bad> {
    let l = &endpoint.limits;
    quic::read_frame(recv, &l.frames, None, &endpoint.budget, l.frame_timeout)
        .await
        .map_err(|e| (e, Vec::new()))
}

/// Reads and hands on one message (with its tensor); `Ok(false)` at the
/// end of the stream.
async fn serve_one(
    endpoint: &Endpoint,
    rings: &mut tokio::sync::watch::Receiver<Option<Arc<Check>>>,
    from: NodeId,
    recv: &mut RecvStream,
) -> Result<bool, Bad> {
    let Some(got) = next_frame(endpoint, recv).await? else {
        return Ok(false);
    };
    let msg: Msg = match &got.frame {
        Frame::Control(_) => got.frame.control().map_err(|e| (e, Vec::new()))?,
        Frame::Tensor(t)
            if rings
                .borrow()
                .as_ref()
                .is_some_and(|c| c.layout.epoch != t.header.epoch) =>
        {
            if let Some(c) = rings.borrow().as_ref() {
                RingStats::add(&c.stats.stale, 1);
            }
            return Ok(true);
        }
        Frame::Tensor(_) => {
            return Err((
                FrameError::BadTensor("a tensor frame that follows no message".into()),
                Vec::new(),
            ))
        }
    };
    let epoch = match &msg {
        Msg::Hop(h) => h.epoch,
        Msg::Sampled(s) => s.epoch,
        Msg::Release { epoch, .. } | Msg::Failed { epoch, .. } | Msg::Capacity { epoch, .. } => {
            *epoch
        }
    };
    let follows = match &msg {
        Msg::Hop(h) => h.hidden,
        Msg::Sampled(s) => s.logits_rows() > 0,
        _ => false,
    };
    let ring = ring_for(rings, epoch).await;
    let Some(check) = ring.filter(|c| c.layout.epoch == epoch) else {
        // Another plan's message: dropped and counted, with its tensor.
        if let Some(c) = rings.borrow().as_ref() {
            RingStats::add(&c.stats.stale, 1);
        }
        if follows {
            next_frame(endpoint, recv).await?;
        }
        return Ok(true);
    };
    if !check.members.contains(&from) {
        return Err((
            FrameError::BadTensor(format!("node {from} is not in plan epoch {epoch}")),
            Vec::new(),
        ));
    }
    let lay = &check.layout;
    let to_compute = |i: Input| check.inbox.send(i).map(|_| true).or(Ok(false));
    match msg {
        Msg::Hop(hop) => {
            let requests = requests_of(&hop.tokens);
            let Some(&window) = lay.local.get(&hop.window) else {
                return Err((
                    FrameError::BadTensor(format!("window {} is not this node's", hop.window)),
                    requests,
                ));
            };
            match checked_hop(&hop, lay, endpoint, recv, &requests).await {
                Ok((hidden, hold)) => to_compute(Input::Work {
                    window,
                    hop,
                    hidden,
                    hold,
                }),
                Err(e) => {
                    // Its requests fail, but its step still passes this
                    // window: an empty micro-batch tells the windows from
                    // here on not to wait for it.
                    let _ = check.inbox.send(Input::Work {
                        window,
                        hop: step_marker(hop, lay.context),
                        hidden: Vec::new(),
                        hold: None,
                    });
                    Err(e)
                }
            }
        }
        Msg::Sampled(s) => {
            let requests: Vec<u64> = s.picks.iter().map(|p| p.request).collect();
            if !lay.local.contains_key(&0) {
                return Err((
                    FrameError::BadTensor(
                        "sampled tokens sent to a node that is not the head".into(),
                    ),
                    Vec::new(),
                ));
            }
            let rows = s.logits_rows();
            let logits = if rows > 0 {
                let (frame, _hold) = tensor(endpoint, recv, &requests).await?;
                let last = (lay.windows.len() - 1) as u16;
                wire::check_follows(
                    &frame.header,
                    s.epoch,
                    s.micro_batch,
                    last,
                    rows,
                    lay.n_vocab,
                )
                .map_err(|m| (FrameError::BadTensor(m), requests.clone()))?;
                frame.data
            } else {
                Vec::new()
            };
            to_compute(Input::Sampled { sampled: s, logits })
        }
        Msg::Release { requests, .. } => to_compute(Input::Release(requests)),
        Msg::Failed {
            requests, reason, ..
        } => to_compute(Input::Failed { requests, reason }),
        Msg::Capacity { kv_positions, .. } => {
            let Some(peer) = check.members.iter().position(|&m| m == from) else {
                return Ok(true);
            };
            to_compute(Input::Capacity { peer, kv_positions })
        }
    }
}

/// The tensor frame that must follow a message.
/// Checks a micro-batch against this node's layout and reads the
/// activations that follow it.
async fn checked_hop(
    hop: &Hop,
    lay: &super::node::Layout,
    endpoint: &Endpoint,
    recv: &mut RecvStream,
    requests: &[u64],
) -> Result<(Vec<f32>, Option<crate::net::quic::BudgetHold>), Bad> {
    let bad = |m: String| (FrameError::BadTensor(m), requests.to_vec());
    // An empty micro-batch marks a step whose sequences all ended on the
    // way: it carries no activations.
    if hop.tokens.len() > MAX_HOP_TOKENS || (hop.tokens.is_empty() && hop.hidden) {
        return Err(bad(format!("{} tokens in a micro-batch", hop.tokens.len())));
    }
    if let Some(t) = hop.tokens.iter().find(|t| t.pos as usize >= lay.context) {
        return Err(bad(format!("position {} is past the context", t.pos)));
    }
    if !fresh_lengths_fit(hop, lay.context) {
        return Err(bad(format!(
            "{} prompt lengths for {} new prompts, or one outside 1..={}",
            hop.fresh_tokens.len(),
            hop.fresh.len(),
            lay.context
        )));
    }
    if !hop.tokens.is_empty() && hop.hidden != (hop.window != 0) {
        return Err(bad(format!(
            "window {} does not take {}",
            hop.window,
            if hop.hidden {
                "activations"
            } else {
                "token ids"
            }
        )));
    }
    if hop.window == 0 && hop.tokens.iter().any(|t| t.id as usize >= lay.n_vocab) {
        return Err(bad("a token id outside the vocabulary".into()));
    }
    if !hop.hidden {
        return Ok((Vec::new(), None));
    }
    let (frame, hold) = tensor(endpoint, recv, requests).await?;
    wire::check_follows(
        &frame.header,
        hop.epoch,
        hop.micro_batch,
        hop.window,
        hop.tokens.len(),
        lay.n_embd,
    )
    .map_err(bad)?;
    Ok((frame.data, Some(hold)))
}

fn fresh_lengths_fit(hop: &Hop, context: usize) -> bool {
    hop.fresh_tokens.len() == hop.fresh.len()
        && hop
            .fresh_tokens
            .iter()
            .all(|&n| n != 0 && n as usize <= context)
}

/// A refused micro-batch as an empty one of the same step; its new
/// prompts only if their lengths were sound.
fn step_marker(mut hop: Hop, context: usize) -> Hop {
    hop.tokens.clear();
    hop.hidden = false;
    if !fresh_lengths_fit(&hop, context) {
        hop.fresh.clear();
        hop.fresh_tokens.clear();
    }
    hop
}

async fn tensor(
    endpoint: &Endpoint,
    recv: &mut RecvStream,
    requests: &[u64],
) -> Result<(crate::net::frame::TensorFrame, crate::net::quic::BudgetHold), Bad> {
    match next_frame(endpoint, recv).await {
        Ok(Some(Received {
            frame: Frame::Tensor(t),
            hold,
        })) => Ok((t, hold)),
        Ok(Some(_)) => Err((
            FrameError::BadTensor("a message where its tensor was expected".into()),
            requests.to_vec(),
        )),
        Ok(None) => Err((FrameError::Truncated, requests.to_vec())),
        Err((e, _)) => Err((e, requests.to_vec())),
    }
}
