//! The head's bookkeeping: requests in flight, their prefill chunks and
//! their next tokens. It runs on the head node's compute thread, as plain
//! state fed by events; it sends nothing itself but returns the hops and
//! releases to send.

use std::collections::HashMap;
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

/// Requests in flight at the head.
pub(super) struct Head {
    epoch: u64,
    context: usize,
    n_vocab: usize,
    next_request: u64,
    next_micro_batch: u64,
    live: HashMap<u64, Live>,
}

impl Head {
    pub fn new(epoch: u64, context: usize, n_vocab: usize) -> Head {
        Head {
            epoch,
            context,
            n_vocab,
            next_request: 1,
            next_micro_batch: 1,
            live: HashMap::new(),
        }
    }

    /// Admits a request: its prompt as first-window hops, one per chunk
    /// (the split depends on the prompt alone).
    pub fn submit(
        &mut self,
        r: RingRequest,
        reply: Reply,
        sink: Option<TokenSink>,
    ) -> Result<(u64, Vec<Hop>), RingError> {
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
        Ok((id, hops))
    }

    fn hop(&mut self, tokens: Vec<TokenMeta>) -> Hop {
        let mb = self.next_micro_batch;
        self.next_micro_batch += 1;
        Hop {
            epoch: self.epoch,
            micro_batch: mb,
            window: 0,
            tokens,
            hidden: false,
            sampling: Vec::new(),
        }
    }

    /// Takes sampled tokens (with their logits rows, in pick order): the
    /// next micro-batch for the first window, and the requests that ended.
    pub fn on_sampled(&mut self, s: Sampled, logits: &[f32]) -> (Option<Hop>, Vec<u64>) {
        let mut next = Vec::new();
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
                ended.push(p.request);
            } else {
                next.push(TokenMeta {
                    request: p.request,
                    pos: p.pos + 1,
                    id: p.token,
                    want: true,
                    logits: live.keep_logits,
                });
            }
        }
        let hop = (!next.is_empty()).then(|| self.hop(next));
        (hop, ended)
    }

    /// Fails `requests` that are still live; returns those that were.
    pub fn fail(&mut self, requests: &[u64], reason: &str) -> Vec<u64> {
        let mut ended = Vec::new();
        for r in requests {
            if let Some(l) = self.live.remove(r) {
                let _ = l.reply.send(Err(RingError::Failed(reason.to_string())));
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
    }
}
