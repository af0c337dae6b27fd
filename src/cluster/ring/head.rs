//! The head's bookkeeping: requests in flight, their prefill chunks and
//! their next tokens. It runs on the head node's compute thread, as plain
//! state fed by events; it sends nothing itself but returns the hops and
//! releases to send.
//!
//! # Steps and micro-batches
//!
//! Work goes round the ring in numbered *steps*, as the simulator plays a
//! plan (`crate::plan`): a step moves every sequence in the ring through
//! every window once, in a few micro-batches, and every node runs each of
//! its windows once per step for all of them. The prompts that arrived
//! together start in one step, a micro-batch per chunk; their sequences
//! then decode in the plan's number of groups (`Plan::micro_batches`),
//! each group one micro-batch per step, launched as soon as the group's
//! tokens of the step before are back. A step is declared when its first
//! micro-batch can go, and holds every live group: a group whose sequences
//! all end before its turn leaves it, which the nodes learn from the
//! release of those requests.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::sync::oneshot;

use super::wire::{Hop, Sampled, TailSampling, TokenMeta};
use super::RingError;
use crate::engine::generate::PREFILL_CHUNK;

/// A generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct RingRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Generation ends after this token.
    pub stop: Option<u32>,
    /// Return the logits of every generated token (for bit comparisons).
    pub keep_logits: bool,
    /// How the last window samples; `None` is greedy.
    pub sampling: Option<TailSampling>,
}

/// What a request produced.
#[derive(Clone, Debug, PartialEq)]
pub struct RingOutput {
    pub tokens: Vec<u32>,
    /// When asked for: the logits each token was sampled from, a row of
    /// `n_vocab` per token.
    pub logits: Vec<Vec<f32>>,
}

type Reply = oneshot::Sender<Result<RingOutput, RingError>>;
/// Where a request's tokens go, one at a time, as they are sampled.
pub(super) type TokenSink = tokio::sync::mpsc::UnboundedSender<u32>;

/// The answer to a submitted request.
pub struct RequestHandle {
    id: u64,
    rx: oneshot::Receiver<Result<RingOutput, RingError>>,
}

impl RequestHandle {
    pub(super) fn new(id: u64, rx: oneshot::Receiver<Result<RingOutput, RingError>>) -> Self {
        RequestHandle { id, rx }
    }

    /// The request's id on the wire.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the answer from a plain thread.
    pub fn wait(self, timeout: Duration) -> Result<RingOutput, RingError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut rx = self.rx;
        loop {
            match rx.try_recv() {
                Ok(r) => return r,
                Err(oneshot::error::TryRecvError::Closed) => return Err(RingError::Stopped),
                Err(oneshot::error::TryRecvError::Empty) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(RingError::Timeout(timeout));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// Waits for the answer on an async task.
    pub async fn answer(self) -> Result<RingOutput, RingError> {
        self.rx.await.unwrap_or(Err(RingError::Stopped))
    }
}

struct Live {
    max_tokens: usize,
    stop: Option<u32>,
    keep_logits: bool,
    out: RingOutput,
    reply: Reply,
    sink: Option<TokenSink>,
}

/// Sequences that decode together, one micro-batch per step.
#[derive(Default)]
struct Group {
    /// Live members, in submission order.
    members: Vec<u64>,
    /// Each member's next token, once sampled.
    next: HashMap<u64, TokenMeta>,
}

impl Group {
    /// Every member's next token is back: the group can go.
    fn ready(&self) -> bool {
        !self.members.is_empty() && self.members.iter().all(|r| self.next.contains_key(r))
    }
}

/// Requests in flight at the head.
pub(super) struct Head {
    epoch: u64,
    context: usize,
    n_vocab: usize,
    /// Decode groups a burst is cut into (the plan's micro-batches).
    micro_batches: usize,
    next_request: u64,
    next_micro_batch: u64,
    live: HashMap<u64, Live>,
    /// Submitted requests waiting for KV room (`super::kvpressure`), in
    /// order: their chunks, the positions they can reach, and whether they
    /// were told to wait yet.
    waiting: std::collections::VecDeque<(u64, Vec<Hop>, usize, bool)>,
    /// Prompt lengths of the requests live or starting in the declared
    /// step (hops carry those of their step).
    prompt_lens: HashMap<u64, u32>,
    /// Admitted requests whose prompts have not started: their chunks.
    pending: Vec<(u64, Vec<Hop>)>,
    groups: BTreeMap<u64, Group>,
    group_of: HashMap<u64, u64>,
    next_group: u64,
    /// The last step declared.
    step: u64,
    /// The groups of the declared step not launched yet (`None`: every
    /// micro-batch of the last step has gone).
    open: Option<Vec<u64>>,
    /// The requests whose prompts start in the declared step.
    fresh: Vec<u64>,
}

/// The first request id of a head's run: the microsecond it started. A
/// head restarted within the epoch must not reuse the ids of its run
/// before: members remember those as released and drop their tokens.
fn first_request_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}

impl Head {
    pub fn new(epoch: u64, context: usize, n_vocab: usize, micro_batches: usize) -> Head {
        Head {
            epoch,
            context,
            n_vocab,
            micro_batches: micro_batches.max(1),
            next_request: first_request_id(),
            next_micro_batch: 1,
            live: HashMap::new(),
            waiting: std::collections::VecDeque::new(),
            prompt_lens: HashMap::new(),
            pending: Vec::new(),
            groups: BTreeMap::new(),
            group_of: HashMap::new(),
            next_group: 1,
            step: 0,
            open: None,
            fresh: Vec::new(),
        }
    }

    /// Takes a request: its prompt as first-window hops, one per chunk
    /// (the split depends on the prompt alone), which wait for
    /// [`Head::admit`] and then go in the next step [`Head::pump`] declares.
    pub fn submit(
        &mut self,
        r: RingRequest,
        reply: Reply,
        sink: Option<TokenSink>,
    ) -> Result<u64, RingError> {
        if r.prompt.is_empty() {
            return Err(RingError::Request("the prompt is empty".into()));
        }
        if r.max_tokens == 0 {
            return Err(RingError::Request("max_tokens must be at least 1".into()));
        }
        if let Some(&id) = r.prompt.iter().find(|&&id| id as usize >= self.n_vocab) {
            return Err(RingError::Request(format!(
                "token id {id} is outside the vocabulary (0..{})",
                self.n_vocab
            )));
        }
        if r.prompt.len() + r.max_tokens - 1 > self.context {
            return Err(RingError::Request(format!(
                "the prompt ({} tokens) plus {} new tokens exceeds the context of {}",
                r.prompt.len(),
                r.max_tokens,
                self.context
            )));
        }
        if let Some(s) = r.sampling {
            let params = crate::engine::sampler::SamplingParams {
                temperature: s.temperature,
                top_p: s.top_p,
                seed: Some(s.seed),
                ..Default::default()
            };
            params
                .validate()
                .map_err(|e| RingError::Request(e.to_string()))?;
        }
        let id = self.next_request;
        self.next_request += 1;
        let last = r.prompt.len() - 1;
        let chunks = r.prompt.len().div_ceil(PREFILL_CHUNK);
        let hops = r
            .prompt
            .chunks(PREFILL_CHUNK)
            .enumerate()
            .map(|(c, chunk)| {
                let tokens = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &tok)| {
                        let pos = c * PREFILL_CHUNK + i;
                        TokenMeta {
                            request: id,
                            pos: pos as u32,
                            id: tok,
                            want: pos == last,
                            logits: pos == last && r.keep_logits,
                        }
                    })
                    .collect();
                let mut hop = self.hop(tokens);
                // The last window samples the request's first token from
                // the last chunk: it learns there how to.
                if let (Some(s), true) = (r.sampling, c + 1 == chunks) {
                    hop.sampling.push((id, s));
                }
                hop
            })
            .collect();
        self.live.insert(
            id,
            Live {
                max_tokens: r.max_tokens,
                stop: r.stop,
                keep_logits: r.keep_logits,
                out: RingOutput {
                    tokens: Vec::new(),
                    logits: Vec::new(),
                },
                reply,
                sink,
            },
        );
        self.prompt_lens.insert(id, r.prompt.len() as u32);
        self.waiting
            .push_back((id, hops, r.prompt.len() + r.max_tokens - 1, false));
        Ok(id)
    }

    /// Moves waiting requests, in order, to the next step while `verdict`
    /// admits them (it is given each one's id and the positions it can
    /// reach); stops at the first that must wait. Fails those that can
    /// never fit, and returns them, with how many requests were told to
    /// wait for the first time.
    pub fn admit(
        &mut self,
        mut verdict: impl FnMut(u64, usize) -> super::kvpressure::Verdict,
    ) -> (Vec<u64>, usize) {
        use super::kvpressure::Verdict;
        let mut refused = Vec::new();
        let mut waited = 0;
        while let Some(&(id, _, end, _)) = self.waiting.front() {
            match verdict(id, end) {
                Verdict::Admit => {
                    if let Some((id, hops, _, _)) = self.waiting.pop_front() {
                        self.pending.push((id, hops));
                    }
                }
                Verdict::Wait => {
                    for w in self.waiting.iter_mut().filter(|w| !w.3) {
                        w.3 = true;
                        waited += 1;
                    }
                    break;
                }
                Verdict::Never { limit } => {
                    let reason = format!(
                        "the request can reach {end} positions; under their memory budgets \
                         the ring's nodes can hold {limit} positions of KV"
                    );
                    if let Some(l) = self.live.remove(&id) {
                        let _ = l.reply.send(Err(RingError::Request(reason)));
                    }
                    self.leave(id);
                    refused.push(id);
                }
            }
        }
        let (live, fresh) = (&self.live, &self.fresh);
        self.prompt_lens
            .retain(|r, _| live.contains_key(r) || fresh.contains(r));
        (refused, waited)
    }

    /// Requests waiting for KV room.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The prompt length of `request`, while it is live or starts in the
    /// declared step.
    pub fn prompt_len(&self, request: u64) -> Option<u32> {
        self.prompt_lens.get(&request).copied()
    }

    fn hop(&mut self, tokens: Vec<TokenMeta>) -> Hop {
        let mb = self.next_micro_batch;
        self.next_micro_batch += 1;
        Hop {
            epoch: self.epoch,
            micro_batch: mb,
            step: 0,
            fresh: Vec::new(),
            fresh_tokens: Vec::new(),
            window: 0,
            tokens,
            hidden: false,
            sampling: Vec::new(),
        }
    }

    /// The micro-batches that can go now, in order, for the first window.
    ///
    /// With no step open, a step is declared when a group is ready or
    /// prompts wait: it holds the waiting prompts (sent at once, a
    /// micro-batch per chunk, and cut into new decode groups) and every
    /// live group, each sent when it is ready. The step closes when all
    /// of them have gone.
    pub fn pump(&mut self) -> Vec<Hop> {
        let mut out = Vec::new();
        loop {
            if self.open.is_none() {
                if self.pending.is_empty() && !self.groups.values().any(Group::ready) {
                    break;
                }
                self.step += 1;
                let counted: Vec<u64> = self
                    .groups
                    .iter()
                    .filter(|(_, g)| !g.members.is_empty())
                    .map(|(&id, _)| id)
                    .collect();
                let pending = std::mem::take(&mut self.pending);
                let fresh: Vec<u64> = pending.iter().map(|(id, _)| *id).collect();
                for (_, hops) in &pending {
                    for h in hops {
                        let mut h = h.clone();
                        h.step = self.step;
                        h.fresh = fresh.clone();
                        out.push(h);
                    }
                }
                // The new sequences decode in the plan's groups, in order.
                let m = self.micro_batches.min(fresh.len());
                let mut at = 0;
                for g in 0..m {
                    let size = fresh.len() / m + usize::from(g < fresh.len() % m);
                    let id = self.next_group;
                    self.next_group += 1;
                    let members = fresh[at..at + size].to_vec();
                    for &r in &members {
                        self.group_of.insert(r, id);
                    }
                    self.groups.insert(
                        id,
                        Group {
                            members,
                            next: HashMap::new(),
                        },
                    );
                    at += size;
                }
                self.fresh = fresh;
                self.open = Some(counted);
            }
            let mut open = self.open.take().unwrap_or_default();
            open.retain(|g| self.groups.get(g).is_some_and(|g| !g.members.is_empty()));
            let mut left = Vec::new();
            for id in open {
                let ready = self.groups.get(&id).is_some_and(Group::ready);
                if !ready {
                    left.push(id);
                    continue;
                }
                let tokens: Vec<TokenMeta> = {
                    let g = self.groups.get_mut(&id).expect("ready group");
                    let t = g.members.iter().map(|r| g.next[r]).collect();
                    g.next.clear();
                    t
                };
                let mut h = self.hop(tokens);
                h.step = self.step;
                h.fresh = self.fresh.clone();
                out.push(h);
            }
            if left.is_empty() {
                continue;
            }
            self.open = Some(left);
            break;
        }
        out
    }

    /// Takes sampled tokens (with their logits rows, in pick order); returns
    /// the requests that ended. Their groups' next micro-batches come from
    /// [`Head::pump`].
    pub fn on_sampled(&mut self, s: Sampled, logits: &[f32]) -> Vec<u64> {
        let mut ended = Vec::new();
        let mut row = 0;
        for p in &s.picks {
            let row_of = if p.logits {
                row += 1;
                logits.get((row - 1) * self.n_vocab..row * self.n_vocab)
            } else {
                None
            };
            let Some(live) = self.live.get_mut(&p.request) else {
                continue;
            };
            live.out.tokens.push(p.token);
            if let Some(sink) = &live.sink {
                let _ = sink.send(p.token);
            }
            if live.keep_logits {
                live.out
                    .logits
                    .push(row_of.map(<[f32]>::to_vec).unwrap_or_default());
            }
            let done = live.out.tokens.len() >= live.max_tokens || Some(p.token) == live.stop;
            if done {
                if let Some(l) = self.live.remove(&p.request) {
                    let _ = l.reply.send(Ok(l.out));
                }
                self.leave(p.request);
                ended.push(p.request);
            } else {
                let keep_logits = live.keep_logits;
                if let Some(g) = self
                    .group_of
                    .get(&p.request)
                    .and_then(|g| self.groups.get_mut(g))
                {
                    g.next.insert(
                        p.request,
                        TokenMeta {
                            request: p.request,
                            pos: p.pos + 1,
                            id: p.token,
                            want: true,
                            logits: keep_logits,
                        },
                    );
                }
            }
        }
        ended
    }

    /// A request ended: it leaves its group (and the prompts waiting).
    fn leave(&mut self, request: u64) {
        self.pending.retain(|(r, _)| *r != request);
        self.waiting.retain(|w| w.0 != request);
        if let Some(gid) = self.group_of.remove(&request) {
            if let Some(g) = self.groups.get_mut(&gid) {
                g.members.retain(|&r| r != request);
                g.next.remove(&request);
                if g.members.is_empty() {
                    self.groups.remove(&gid);
                }
            }
        }
    }

    /// Fails `requests` that are still live; returns those that were.
    pub fn fail(&mut self, requests: &[u64], reason: &str) -> Vec<u64> {
        let mut ended = Vec::new();
        for r in requests {
            if let Some(l) = self.live.remove(r) {
                let _ = l.reply.send(Err(RingError::Failed(reason.to_string())));
                self.leave(*r);
                ended.push(*r);
            }
        }
        ended
    }

    /// Fails every live request; returns them.
    pub fn fail_all(&mut self, reason: &str) -> Vec<u64> {
        let all: Vec<u64> = self.live.keys().copied().collect();
        self.fail(&all, reason)
    }

    /// Ends every live request with `Stopped`.
    pub fn stop_all(&mut self) {
        for (_, l) in self.live.drain() {
            let _ = l.reply.send(Err(RingError::Stopped));
        }
        self.pending.clear();
        self.waiting.clear();
        self.groups.clear();
        self.group_of.clear();
    }
}
