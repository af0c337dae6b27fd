//! Sending generation requests to the cluster from any node
//! (DESIGN.md §1 step 6, step 7 for losses).
//!
//! A [`ClusterClient`] lives in every `loip run` process. It sends each
//! request to the head of the committed plan (the node of the first
//! window): straight to the local [`RingNode`] when this node is the head,
//! else over the node's QUIC connection to the head (a [`RemoteRequest`]
//! as the first control frame of a new stream, answered with one
//! [`RemoteEvent`] per token and a last one that ends it). Tokens reach
//! the caller one by one as they are sampled ([`Event::Token`]).
//!
//! # Losses and new plans
//!
//! The node a client talks to (the *entry* node) keeps each request's
//! prompt and the tokens it has received. When the request cannot go on
//! under its plan epoch (a member was lost and the ring failed it, the
//! ring was stopped for a new epoch, the head itself went away, or no
//! token came for [`ClientLimits::stall`]), the entry node waits for a
//! newer committed epoch (at most [`ClientLimits::plan_wait`]) and
//! submits `prompt + received` as the prompt with the tokens still to
//! come: the new ring re-prefills, which rebuilds the caches on the new
//! windows, and greedy decoding continues exactly where it stopped (a
//! sequence's logits depend only on its tokens, DESIGN.md §2). Doing this
//! at the entry node rather than at the head covers the head's own loss.
//! A plan with no windows (the model no longer fits the nodes left) fails
//! the request with the leader's reason; every wait is bounded, so a
//! request always ends.
//!
//! # Sampling
//!
//! At temperature 0 the last window takes the argmax. Above it, it keeps a
//! sampler per request, seeded with the request's seed (one drawn here
//! when the request has none, and kept across resubmissions) and moved to
//! the draw of the next token ([`TailSampling::drawn`]), so a resumed
//! request draws exactly what it would have drawn, and a seeded request
//! gets the tokens a single node gives it.
//!
//! # `loip ask`
//!
//! A Unix socket `ask.sock` in the data directory takes one JSON
//! [`AskRequest`] line per connection and answers with JSON [`AskLine`]s:
//! a token per line, then the result or an error ([`ask`] is the client).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::ring::wire::TailSampling;
use super::ring::{RingError, RingNode, RingRequest};
use super::shell::Wire;
use crate::net::frame::{self, Frame};
use crate::net::quic::{self, Endpoint};
use crate::net::NodeId;

/// How many times one request is submitted again before it fails.
pub const MAX_RESUBMITS: u32 = 8;

#[derive(Debug, Error, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientError {
    #[error("bad request: {0}")]
    Request(String),
    #[error("the model does not fit on the cluster's nodes: {0}")]
    NoPlan(String),
    #[error("{0}")]
    Failed(String),
    #[error("the node's ask socket {path}: {message}")]
    Socket { path: String, message: String },
}

/// Sampling parameters of a request: 0 is greedy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
}

/// A generation request, as the HTTP layer or `loip ask` makes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Generation ends after any of these tokens; `None` takes the
    /// model's end-of-generation tokens (when this node has the model).
    #[serde(default)]
    pub stop: Option<Vec<u32>>,
    #[serde(default)]
    pub sampling: Sampling,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// A stop token was produced (it is the last token).
    Stop,
    /// `max_tokens` were produced.
    Length,
}

/// What a request produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateResult {
    pub tokens: Vec<u32>,
    pub finish: Finish,
    /// The plan epochs the request ran under, in order: more than one when
    /// it was resumed on a new plan.
    pub epochs: Vec<u64>,
}

/// What a [`Generation`] yields.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token(u32),
    /// The last event.
    Finished(Result<GenerateResult, ClientError>),
}

/// A request under way: its events, in order.
pub struct Generation {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Generation {
    /// The next event; `None` after [`Event::Finished`].
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Waits for the end, dropping the token events.
    pub async fn result(mut self) -> Result<GenerateResult, ClientError> {
        while let Some(e) = self.rx.recv().await {
            if let Event::Finished(r) = e {
                return r;
            }
        }
        Err(ClientError::Failed("the node stopped".into()))
    }
}

/// The committed plan as the client needs it; the shell publishes it.
#[derive(Clone, Default)]
pub struct RingView {
    /// The committed plan epoch (0: none yet).
    pub epoch: u64,
    /// The head node, when the plan has windows.
    pub head: Option<NodeId>,
    /// Why the plan has no windows.
    pub note: Option<String>,
    /// This node's ring of `epoch`, when it is the head and its ring runs.
    pub local: Option<Arc<RingNode>>,
    /// The connection to the head, when it is another node.
    pub head_conn: Option<quinn::Connection>,
    /// Every member of the epoch's ring was heard from within the
    /// failure detector's timeout.
    pub members_live: bool,
}

impl RingView {
    /// Whether a request can be sent (or must fail) under this view.
    fn settled(&self) -> bool {
        match self.head {
            None => self.note.is_some(),
            Some(_) => self.local.is_some() || self.head_conn.is_some(),
        }
    }

    /// Two views send requests the same way.
    pub fn same_as(&self, o: &RingView) -> bool {
        self.epoch == o.epoch
            && self.head == o.head
            && self.note == o.note
            && match (&self.local, &o.local) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
            && self.head_conn.as_ref().map(|c| c.stable_id())
                == o.head_conn.as_ref().map(|c| c.stable_id())
            && self.members_live == o.members_live
    }
}

/// Bounds on a request's waits.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    /// Longest wait for a committed plan (at first, and after a loss).
    pub plan_wait: Duration,
    /// Longest wait for the next token.
    pub stall: Duration,
    /// After a loss, how long a newer plan is waited for before the
    /// request goes again under the same epoch, if all of its members are
    /// still alive (the link failed, or a member restarted within the
    /// epoch). Longer than the failure detector's timeout, so that a
    /// member that died is seen dead first.
    pub replan_grace: Duration,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            plan_wait: Duration::from_secs(30),
            stall: Duration::from_secs(30),
            replan_grace: Duration::from_secs(3),
        }
    }
}

/// Sends requests to the cluster from this node (module docs).
#[derive(Clone)]
pub struct ClusterClient {
    view: watch::Receiver<RingView>,
    endpoint: Endpoint,
    default_stop: Vec<u32>,
    limits: ClientLimits,
}

/// How one submission ended.
enum Outcome {
    Done(Finish),
    /// The request cannot go on under this epoch; submit it again on a
    /// newer one.
    Retry(String),
    Fatal(ClientError),
}

impl ClusterClient {
    pub fn new(
        view: watch::Receiver<RingView>,
        endpoint: Endpoint,
        default_stop: Vec<u32>,
        limits: ClientLimits,
    ) -> ClusterClient {
        ClusterClient {
            view,
            endpoint,
            default_stop,
            limits,
        }
    }

    /// Starts a request; its tokens and result come from the
    /// [`Generation`]. Dropping the generation cancels the request at the
    /// next token.
    pub fn generate(&self, req: GenerateRequest) -> Generation {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        tokio::spawn(async move {
            let r = me.run(req, &tx).await;
            let _ = tx.send(Event::Finished(r));
        });
        Generation { rx }
    }

    fn check(&self, req: &GenerateRequest) -> Result<(), ClientError> {
        let bad = |m: String| Err(ClientError::Request(m));
        let s = &req.sampling;
        if !s.temperature.is_finite() || s.temperature < 0.0 {
            return bad(format!(
                "temperature {} is not a number >= 0",
                s.temperature
            ));
        }
        if let Some(p) = s.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p {p} is not in (0, 1]"));
            }
        }
        if req.prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        if req.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        Ok(())
    }

    async fn run(
        &self,
        req: GenerateRequest,
        tx: &mpsc::UnboundedSender<Event>,
    ) -> Result<GenerateResult, ClientError> {
        self.check(&req)?;
        let stop = req
            .stop
            .clone()
            .unwrap_or_else(|| self.default_stop.clone());
        // A seed of its own when it has none, kept across resubmissions.
        let seed = req.sampling.seed.unwrap_or_else(random_seed);
        let mut job = Job {
            req,
            stop,
            seed,
            produced: Vec::new(),
            tx,
        };
        let mut epochs = Vec::new();
        let mut min_epoch = 1;
        let mut last_reason = String::new();
        for attempt in 0..=MAX_RESUBMITS {
            let view = self
                .wait_view(min_epoch, attempt > 0)
                .await
                .ok_or_else(|| {
                    ClientError::Failed(if attempt == 0 {
                        format!("no plan was committed within {:?}", self.limits.plan_wait)
                    } else {
                        format!(
                            "the request stopped ({last_reason}) and no new plan was committed \
                         within {:?}",
                            self.limits.plan_wait
                        )
                    })
                })?;
            if view.head.is_none() {
                return Err(ClientError::NoPlan(
                    view.note
                        .unwrap_or_else(|| "the plan has no windows".into()),
                ));
            }
            epochs.push(view.epoch);
            let outcome = match &view.local {
                Some(ring) => self.run_local(ring.clone(), &mut job).await,
                None => self.run_remote(&view, &mut job).await,
            };
            match outcome {
                Outcome::Done(finish) => {
                    return Ok(GenerateResult {
                        tokens: job.produced,
                        finish,
                        epochs,
                    })
                }
                Outcome::Fatal(e) => return Err(e),
                Outcome::Retry(reason) => {
                    if tx.is_closed() {
                        return Err(ClientError::Failed("the caller went away".into()));
                    }
                    log::warn!(
                        "request stopped under plan epoch {} after {} tokens ({reason}); \
                         resubmitting on a newer epoch, or on this one if its members are \
                         all still alive in {:?}",
                        view.epoch,
                        job.produced.len(),
                        self.limits.replan_grace
                    );
                    last_reason = reason;
                    min_epoch = view.epoch + 1;
                }
            }
        }
        Err(ClientError::Failed(format!(
            "the request was resubmitted {MAX_RESUBMITS} times and still did not finish \
             ({last_reason})"
        )))
    }

    /// The first settled view of epoch `min_epoch` or later, within the
    /// plan wait. After a loss (`after_loss`, `min_epoch` being one past
    /// the epoch that failed), the failed epoch itself does once the
    /// replan grace has gone by with every member of it still alive: no
    /// newer plan is coming then, and its ring redials the link that
    /// failed.
    async fn wait_view(&self, min_epoch: u64, after_loss: bool) -> Option<RingView> {
        let mut rx = self.view.clone();
        let now = tokio::time::Instant::now();
        let deadline = now + self.limits.plan_wait;
        let grace = after_loss.then_some(now + self.limits.replan_grace);
        loop {
            {
                let v = rx.borrow_and_update();
                if v.epoch >= min_epoch && v.settled() {
                    return Some(v.clone());
                }
                let graced = grace.is_some_and(|g| tokio::time::Instant::now() >= g);
                if graced && v.epoch + 1 == min_epoch && v.members_live && v.settled() {
                    log::warn!(
                        "no plan newer than epoch {} and all its members are alive: \
                         resubmitting under it",
                        v.epoch
                    );
                    return Some(v.clone());
                }
            }
            let wake = grace
                .filter(|&g| g < deadline && tokio::time::Instant::now() < g)
                .unwrap_or(deadline);
            match tokio::time::timeout_at(wake, rx.changed()).await {
                Ok(Ok(())) => {}
                Err(_) if wake < deadline => {}
                _ => return None,
            }
        }
    }

    /// Runs the request on this node's ring (it is the head).
    async fn run_local(&self, ring: Arc<RingNode>, job: &mut Job<'_>) -> Outcome {
        let (tok_tx, mut tok_rx) = mpsc::unbounded_channel();
        let sub = job.submission();
        let r = {
            let ring = ring.clone();
            tokio::task::spawn_blocking(move || ring.submit_streaming(sub, tok_tx)).await
        };
        let handle = match r {
            Ok(Ok(h)) => h,
            Ok(Err(RingError::Request(m))) => return Outcome::Fatal(ClientError::Request(m)),
            Ok(Err(e)) => return Outcome::Retry(e.to_string()),
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        let id = handle.id();
        let mut answer = std::pin::pin!(handle.answer());
        loop {
            tokio::select! {
                t = tok_rx.recv() => {
                    let Some(t) = t else { continue };
                    match job.push(t) {
                        Push::More => {}
                        Push::Done(f) => {
                            ring.cancel(id);
                            return Outcome::Done(f);
                        }
                        Push::Gone => {
                            ring.cancel(id);
                            return Outcome::Fatal(ClientError::Failed("the caller went away".into()));
                        }
                    }
                }
                a = &mut answer => {
                    // Tokens are sent before the answer: take the rest.
                    while let Ok(t) = tok_rx.try_recv() {
                        if let Push::Done(f) = job.push(t) {
                            return Outcome::Done(f);
                        }
                    }
                    return match a {
                        Ok(_) => Outcome::Retry("the ring ended the request early".into()),
                        Err(RingError::Request(m)) => Outcome::Fatal(ClientError::Request(m)),
                        Err(e) => Outcome::Retry(e.to_string()),
                    };
                }
                _ = tokio::time::sleep(self.limits.stall) => {
                    ring.cancel(id);
                    return Outcome::Retry(format!("no token for {:?}", self.limits.stall));
                }
            }
        }
    }

    /// Sends the request to the head over QUIC and reads its tokens; gives
    /// up when the committed plan changes.
    async fn run_remote(&self, view: &RingView, job: &mut Job<'_>) -> Outcome {
        let Some(conn) = view.head_conn.clone() else {
            return Outcome::Retry("no connection to the head".into());
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return Outcome::Retry(format!("opening a stream to the head: {e}")),
        };
        let sub = job.submission();
        let req = RemoteRequest {
            epoch: view.epoch,
            prompt: sub.prompt,
            max_tokens: sub.max_tokens as u64,
            stop: sub.stop,
            sampling: sub.sampling,
        };
        let bytes = match frame::encode_control(&Wire::Generate(req)) {
            Ok(b) => b,
            Err(e) => return Outcome::Fatal(ClientError::Request(e.to_string())),
        };
        if let Err(e) = send.write_all(&bytes).await {
            return Outcome::Retry(format!("sending to the head: {e}"));
        }
        let mut views = self.view.clone();
        let epoch = view.epoch;
        let limits = self.endpoint.limits;
        let outcome = loop {
            let read = quic::read_frame(
                &mut recv,
                &limits.frames,
                None,
                &self.endpoint.budget,
                limits.frame_timeout,
            );
            tokio::select! {
                r = tokio::time::timeout(self.limits.stall, read) => {
                    let ev = match r {
                        Err(_) => break Outcome::Retry(format!("no token for {:?}", self.limits.stall)),
                        Ok(Ok(None)) => break Outcome::Retry("the head closed the stream".into()),
                        Ok(Err(e)) => break Outcome::Retry(format!("the head's stream: {e}")),
                        Ok(Ok(Some(got))) => match decode_event(&got.frame) {
                            Ok(ev) => ev,
                            Err(e) => break Outcome::Retry(e),
                        },
                    };
                    match ev {
                        RemoteEvent::Token(t) => match job.push(t) {
                            Push::More => {}
                            Push::Done(f) => break Outcome::Done(f),
                            Push::Gone => break Outcome::Fatal(ClientError::Failed("the caller went away".into())),
                        },
                        RemoteEvent::Done => {
                            break Outcome::Retry("the head ended the request early".into())
                        }
                        RemoteEvent::Failed { retry: true, message } => break Outcome::Retry(message),
                        RemoteEvent::Failed { retry: false, message } => {
                            break Outcome::Fatal(ClientError::Request(message))
                        }
                    }
                }
                changed = views.changed() => {
                    if changed.is_err() {
                        break Outcome::Fatal(ClientError::Failed("the node stopped".into()));
                    }
                    if views.borrow_and_update().epoch != epoch {
                        break Outcome::Retry(format!("plan epoch {epoch} was replaced"));
                    }
                }
            }
        };
        // Ends the head's side: a request still running there is cancelled.
        let _ = send.reset(quinn::VarInt::from_u32(quic::CLOSE_OK));
        let _ = recv.stop(quinn::VarInt::from_u32(quic::CLOSE_OK));
        outcome
    }
}

fn decode_event(f: &Frame) -> Result<RemoteEvent, String> {
    match f.control::<Wire>() {
        Ok(Wire::Generated(ev)) => Ok(ev),
        Ok(_) => Err("the head answered with another message".into()),
        Err(e) => Err(format!("the head's answer: {e}")),
    }
}

/// A request's state at the entry node.
struct Job<'a> {
    req: GenerateRequest,
    stop: Vec<u32>,
    seed: u64,
    produced: Vec<u32>,
    tx: &'a mpsc::UnboundedSender<Event>,
}

enum Push {
    More,
    Done(Finish),
    Gone,
}

impl Job<'_> {
    /// What to submit now: the prompt and the tokens received so far, for
    /// the tokens still to come. The ring stops at the one stop token it
    /// knows; with several, the client stops it.
    fn submission(&self) -> RingRequest {
        let mut prompt = self.req.prompt.clone();
        prompt.extend_from_slice(&self.produced);
        RingRequest {
            prompt,
            max_tokens: self.req.max_tokens - self.produced.len(),
            stop: match self.stop.as_slice() {
                [one] => Some(*one),
                _ => None,
            },
            keep_logits: false,
            sampling: (self.req.sampling.temperature > 0.0).then_some(TailSampling {
                temperature: self.req.sampling.temperature,
                top_p: self.req.sampling.top_p.unwrap_or(1.0),
                seed: self.seed,
                drawn: self.produced.len() as u64,
            }),
        }
    }

    fn push(&mut self, t: u32) -> Push {
        self.produced.push(t);
        if self.tx.send(Event::Token(t)).is_err() {
            return Push::Gone;
        }
        if self.stop.contains(&t) {
            Push::Done(Finish::Stop)
        } else if self.produced.len() >= self.req.max_tokens {
            Push::Done(Finish::Length)
        } else {
            Push::More
        }
    }
}

/// A request forwarded to the head: the first frame of its stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteRequest {
    /// The epoch the entry node sends under; a head on another answers
    /// with a retryable failure.
    pub epoch: u64,
    pub prompt: Vec<u32>,
    pub max_tokens: u64,
    pub stop: Option<u32>,
    pub sampling: Option<TailSampling>,
}

/// The head's answers on a forwarded request's stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteEvent {
    Token(u32),
    /// The ring ended the request (its last token was sent).
    Done,
    /// The request failed; with `retry`, a newer plan may serve it.
    Failed {
        retry: bool,
        message: String,
    },
}

/// How long the head waits for its ring of the request's epoch to start.
const HEAD_RING_WAIT: Duration = Duration::from_secs(10);

/// Serves a forwarded request at the head: runs it on the local ring of
/// its epoch and writes each token back. A client that resets the stream
/// cancels the request.
pub async fn serve_remote(
    mut view: watch::Receiver<RingView>,
    req: RemoteRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let write = |ev: RemoteEvent| frame::encode_control(&Wire::Generated(ev)).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + HEAD_RING_WAIT;
    let ring = loop {
        let ring = {
            let v = view.borrow_and_update();
            if v.epoch > req.epoch {
                None
            } else {
                v.local.clone().filter(|r| r.epoch() == req.epoch)
            }
        };
        if ring.is_some() || view.borrow().epoch > req.epoch {
            break ring;
        }
        match tokio::time::timeout_at(deadline, view.changed()).await {
            Ok(Ok(())) => {}
            _ => break None,
        }
    };
    let Some(ring) = ring else {
        let msg = format!("this node runs no head for plan epoch {}", req.epoch);
        let _ = send
            .write_all(&write(RemoteEvent::Failed {
                retry: true,
                message: msg,
            }))
            .await;
        let _ = send.finish();
        return;
    };
    let (tok_tx, mut tok_rx) = mpsc::unbounded_channel();
    let sub = RingRequest {
        prompt: req.prompt,
        max_tokens: req.max_tokens as usize,
        stop: req.stop,
        keep_logits: false,
        sampling: req.sampling,
    };
    let r = {
        let ring = ring.clone();
        tokio::task::spawn_blocking(move || ring.submit_streaming(sub, tok_tx)).await
    };
    let handle = match r {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let retry = !matches!(e, RingError::Request(_));
            let ev = RemoteEvent::Failed {
                retry,
                message: e.to_string(),
            };
            let _ = send.write_all(&write(ev)).await;
            let _ = send.finish();
            return;
        }
        Err(e) => {
            let ev = RemoteEvent::Failed {
                retry: true,
                message: e.to_string(),
            };
            let _ = send.write_all(&write(ev)).await;
            let _ = send.finish();
            return;
        }
    };
    let id = handle.id();
    let mut answer = std::pin::pin!(handle.answer());
    let mut probe = [0u8; 64];
    let mut client_open = true;
    loop {
        tokio::select! {
            t = tok_rx.recv() => {
                let Some(t) = t else { continue };
                if send.write_all(&write(RemoteEvent::Token(t))).await.is_err() {
                    ring.cancel(id);
                    return;
                }
            }
            a = &mut answer => {
                let mut bytes = Vec::new();
                while let Ok(t) = tok_rx.try_recv() {
                    bytes.extend(write(RemoteEvent::Token(t)));
                }
                bytes.extend(write(match a {
                    Ok(_) => RemoteEvent::Done,
                    Err(e) => RemoteEvent::Failed {
                        retry: !matches!(e, RingError::Request(_)),
                        message: e.to_string(),
                    },
                }));
                let _ = send.write_all(&bytes).await;
                let _ = send.finish();
                return;
            }
            r = recv.read(&mut probe), if client_open => match r {
                // The client never writes after its request: an end is
                // fine, an error is the client going away.
                Ok(Some(_)) => {}
                Ok(None) => client_open = false,
                Err(_) => {
                    ring.cancel(id);
                    return;
                }
            },
        }
    }
}

/// The socket `loip ask` talks to.
pub fn ask_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("ask.sock")
}

/// A `loip ask` request line.
pub type AskRequest = GenerateRequest;

/// A line of a `loip ask` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AskLine {
    Token(u32),
    Done(GenerateResult),
    Error(ClientError),
}

/// Most bytes of an ask request line.
const MAX_ASK_LINE: u64 = 1 << 20;

/// Serves `loip ask` on the data directory's socket, for as long as the
/// runtime runs.
pub fn serve_ask(data_dir: &Path, client: ClusterClient) -> std::io::Result<()> {
    let path = ask_socket(data_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let client = client.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut line = String::new();
                let mut r =
                    tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_ASK_LINE));
                let read =
                    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
                let out = |l: &AskLine| {
                    let mut s = serde_json::to_string(l).unwrap_or_default();
                    s.push('\n');
                    s
                };
                let req: AskRequest = match read.map(|r| r.map(|_| serde_json::from_str(&line))) {
                    Ok(Ok(Ok(req))) => req,
                    Ok(Ok(Err(e))) => {
                        let e = ClientError::Request(format!("the request does not decode: {e}"));
                        let _ = w.write_all(out(&AskLine::Error(e)).as_bytes()).await;
                        return;
                    }
                    _ => return,
                };
                let mut g = client.generate(req);
                while let Some(ev) = g.next().await {
                    let line = match ev {
                        Event::Token(t) => AskLine::Token(t),
                        Event::Finished(Ok(r)) => AskLine::Done(r),
                        Event::Finished(Err(e)) => AskLine::Error(e),
                    };
                    if w.write_all(out(&line).as_bytes()).await.is_err() {
                        // The asker went away: dropping `g` cancels.
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Sends `req` to the node of `data_dir` and reads its answer; each token
/// goes to `on_token` as it comes. Fails when nothing arrives for
/// `stall`.
pub fn ask(
    data_dir: &Path,
    req: &AskRequest,
    stall: Duration,
    mut on_token: impl FnMut(u32),
) -> Result<GenerateResult, ClientError> {
    let path = ask_socket(data_dir);
    let err = |message: String| ClientError::Socket {
        path: path.display().to_string(),
        message,
    };
    let mut sock =
        std::os::unix::net::UnixStream::connect(&path).map_err(|e| err(e.to_string()))?;
    sock.set_read_timeout(Some(stall))
        .map_err(|e| err(e.to_string()))?;
    let mut line = serde_json::to_string(req).map_err(|e| err(e.to_string()))?;
    line.push('\n');
    sock.write_all(line.as_bytes())
        .map_err(|e| err(e.to_string()))?;
    let reader = BufReader::new(sock);
    for l in reader.lines() {
        let l = l.map_err(|e| err(format!("reading the answer: {e}")))?;
        match serde_json::from_str::<AskLine>(&l).map_err(|e| err(e.to_string()))? {
            AskLine::Token(t) => on_token(t),
            AskLine::Done(r) => return Ok(r),
            AskLine::Error(e) => return Err(e),
        }
    }
    Err(err(
        "the node closed the socket before the answer ended".into()
    ))
}

/// A seed from the operating system's generator.
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random generator works");
    u64::from_le_bytes(b)
}
