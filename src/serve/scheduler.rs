//! Continuous batching on a dedicated compute thread.
//!
//! The thread owns the [`Engine`]. Each turn of its loop:
//! 1. admits queued requests while the batch has room: each is prefilled
//!    alone, in the prompt-determined chunks of [`Engine::prefill`], and
//!    its first token sampled;
//! 2. runs one decode step over every active sequence together (each
//!    sequence's logits are bit-identical to running it alone, so batching
//!    never changes an answer) and samples each with its own [`Sampler`];
//! 3. hands each sequence's new text to its request's channel, and drops
//!    the sequences that finished, whose client went away, or whose client
//!    has taken nothing for the stall timeout.
//!
//! # Concurrency contract
//!
//! - The queue is a bounded `std` channel: [`Queue::submit`] never blocks
//!   (full is [`ServeError::QueueFull`]), and the compute thread takes a job
//!   only when the batch has room.
//! - Each request's events go through its own bounded tokio channel, which
//!   the compute thread only `try_send`s to: a slow client never blocks the
//!   loop. What a full channel cannot take waits in the sequence's
//!   [`Outbox`] (at most the request's own output) until the stall timeout.
//! - Dropping the receiving end (a handler future dropped because its
//!   client left) closes the channel; the sequence leaves the batch at the
//!   next step.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tmpsc;

use super::api::Usage;
use super::metrics::{Metrics, Outcome};
use super::ServeError;
use crate::engine::adapt::{Change, Ignored, Observation, Policy};
use crate::engine::forward::TokenIn;
use crate::engine::generate::Engine;
use crate::engine::kv::KvCache;
use crate::engine::sampler::{FinishReason, Sampler, SamplingParams, TextStream};
use crate::engine::weights::Unit;
use crate::model::tokenizer::Tokenizer;
use crate::store::{Store, Tree};

/// Events for one request, in order: text pieces, then one `Done` or
/// `Failed`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    Failed(String),
    /// Failed with an error of its own status (a cluster's refusal).
    Refused(ServeError),
}

/// Capacity of a request's event channel.
pub const EVENT_CAPACITY: usize = 64;

/// A request for the compute thread.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub events: tmpsc::Sender<Event>,
    pub arrived: Instant,
}

/// The sending side of the queue.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    depth: usize,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// A queue of `depth` waiting jobs and the compute thread's end of it.
    pub fn new(depth: usize, metrics: Arc<Metrics>) -> (Queue, Receiver<Job>) {
        let (tx, rx) = mpsc::sync_channel(depth);
        (Queue { tx, depth, metrics }, rx)
    }

    /// Queues a job, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ServeError> {
        // Counted before sending, so the compute thread never takes a job
        // it has not seen counted.
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => Err(ServeError::QueueFull { depth: self.depth }),
                    TrySendError::Disconnected(_) => Err(ServeError::Generation(
                        "the compute thread has stopped".into(),
                    )),
                }
            }
        }
    }
}

/// What the loop needs besides the engine.
pub struct LoopConfig {
    pub max_batch: usize,
    /// Tokens a sequence may hold.
    pub context: usize,
    pub sse_stall: Duration,
}

/// Online adaptation under a memory budget (`engine::adapt`): the policy,
/// the KV geometry it is fed with, and where its state is kept.
///
/// Each sequence reserves, at admission, the KV it can grow to (its prompt
/// plus its `max_tokens`, within the context); a job whose reservation
/// does not fit beside the running ones' with every unit streamed waits
/// at the head of the queue. So a running sequence always fits: before
/// each step the policy demotes what the step's KV growth needs, and
/// after sequences end it promotes units back.
pub struct Adaptation {
    pub policy: Policy,
    /// KV bytes per position, and positions a cache grows by at once.
    pub kv_per_position: u64,
    pub kv_grow: usize,
    /// The node's database and the key of this model's state in `adapt`.
    pub store: Option<(Store, Vec<u8>)>,
    /// Model name and layer count, saved with the demotions.
    pub model: String,
    pub n_layer: usize,
}

/// What `adapt` keeps in the database: the units streamed now.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdaptState {
    pub model: String,
    pub n_layer: usize,
    /// Units by name (`attn.3`, `mlp.3`, `head`), in use order.
    pub streamed: Vec<String>,
}

impl Adaptation {
    /// The key of `model`'s state in the `adapt` tree.
    pub fn key(model: &str) -> Vec<u8> {
        format!("demotions/{model}").into_bytes()
    }

    /// The KV a cache holding `positions` positions has allocated.
    pub fn kv_bytes(&self, positions: usize) -> u64 {
        positions.div_ceil(self.kv_grow) as u64 * self.kv_grow as u64 * self.kv_per_position
    }

    /// Asks the policy about `obs` and applies its answer to the engine.
    fn adapt(&mut self, engine: &mut Engine, obs: Observation, metrics: &Metrics) {
        let change = match self.policy.decide(obs) {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e @ Ignored::OverCapacity { .. }) => {
                log::warn!("adaptation: {e}");
                return;
            }
            Err(e) => {
                log::debug!("adaptation: observation ignored: {e}");
                return;
            }
        };
        let mut streamed: BTreeSet<Unit> = self.policy.streamed().into_iter().collect();
        let (units, counter) = match &change {
            Change::Demote(u) => {
                streamed.extend(u.iter().copied());
                (u, &metrics.demotions)
            }
            Change::Promote(u) => {
                for x in u {
                    streamed.remove(x);
                }
                (u, &metrics.promotions)
            }
        };
        let t = Instant::now();
        match engine.set_resident(|u| !streamed.contains(&u)) {
            Ok(()) => {
                self.policy.commit(&change);
                counter.fetch_add(units.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                log::warn!("adaptation: applying {change:?} failed: {e}");
                self.policy.resync(&engine.streamed_units());
            }
        }
        log::info!(
            "adaptation: {change:?} in {:.1} ms (KV {} bytes, {} units resident)",
            t.elapsed().as_secs_f64() * 1e3,
            obs.kv_bytes,
            self.policy.resident_count()
        );
        self.publish(metrics);
        self.persist();
    }

    /// Shows the current placement in the metrics and `/v1/cluster`.
    pub fn publish(&self, metrics: &Metrics) {
        metrics
            .resident_units
            .store(self.policy.resident_count() as u64, Ordering::Relaxed);
        metrics
            .budget_bytes
            .store(self.policy.limits().budget, Ordering::Relaxed);
        metrics
            .weights_bytes
            .store(self.policy.total(0), Ordering::Relaxed);
        *metrics
            .streamed_units
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(self.policy.streamed());
    }

    /// Writes the current demotions to the database, flushed.
    fn persist(&self) {
        let Some((store, key)) = &self.store else {
            return;
        };
        let state = AdaptState {
            model: self.model.clone(),
            n_layer: self.n_layer,
            streamed: self
                .policy
                .streamed()
                .iter()
                .map(|u| u.to_string())
                .collect(),
        };
        if let Err(e) = store
            .put_json(Tree::Adapt, key, &state)
            .and_then(|()| store.flush())
        {
            log::warn!("adaptation: saving the demotions: {e}");
        }
    }
}

/// Events waiting for a client that is not reading yet.
struct Outbox {
    tx: tmpsc::Sender<Event>,
    text: String,
    end: Option<Event>,
    stalled_since: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Everything queued so far was delivered (with the end, if any).
    Sent,
    /// The channel is full; some events wait.
    Waiting,
    /// The receiver is gone.
    Closed,
}

impl Outbox {
    fn new(tx: tmpsc::Sender<Event>) -> Outbox {
        Outbox {
            tx,
            text: String::new(),
            end: None,
            stalled_since: None,
        }
    }

    fn send(&mut self, now: Instant, event: Event) -> Result<(), Delivery> {
        match self.tx.try_send(event) {
            Ok(()) => Ok(()),
            Err(tmpsc::error::TrySendError::Closed(_)) => Err(Delivery::Closed),
            Err(tmpsc::error::TrySendError::Full(event)) => {
                match event {
                    Event::Text(t) => self.text.insert_str(0, &t),
                    end => self.end = Some(end),
                }
                self.stalled_since.get_or_insert(now);
                Err(Delivery::Waiting)
            }
        }
    }

    /// Tries to deliver the waiting text, then the end.
    fn flush(&mut self, now: Instant) -> Delivery {
        if self.tx.is_closed() {
            return Delivery::Closed;
        }
        if !self.text.is_empty() {
            let text = std::mem::take(&mut self.text);
            if let Err(d) = self.send(now, Event::Text(text)) {
                return d;
            }
        }
        if let Some(end) = self.end.take() {
            if let Err(d) = self.send(now, end) {
                return d;
            }
        }
        self.stalled_since = None;
        Delivery::Sent
    }

    fn stalled_for(&self, now: Instant) -> Duration {
        self.stalled_since
            .map_or(Duration::ZERO, |s| now.duration_since(s))
    }
}

/// One sequence in the batch.
struct Seq<'t> {
    prompt_len: usize,
    /// KV bytes reserved at admission (under adaptation).
    reserved: u64,
    sampler: Sampler,
    stream: TextStream<'t>,
    tokens: Vec<u32>,
    outbox: Outbox,
    arrived: Instant,
    last_token: Option<Instant>,
    finish: Option<FinishReason>,
}

impl Seq<'_> {
    /// Samples the next token from `logits` and queues its text.
    fn advance(&mut self, logits: &[f32], context_left: bool, metrics: &Metrics, now: Instant) {
        let id = self.sampler.sample(logits, &self.tokens);
        self.tokens.push(id);
        match self.last_token {
            None => metrics
                .ttft
                .observe(now.duration_since(self.arrived).as_secs_f64()),
            Some(t) => metrics
                .inter_token
                .observe(now.duration_since(t).as_secs_f64()),
        }
        self.last_token = Some(now);
        metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let step = self.stream.push(id);
        self.outbox.text.push_str(step.text);
        self.finish = step.finish;
        if self.finish.is_none() && !context_left {
            self.outbox.text.push_str(self.stream.finish());
            self.finish = Some(FinishReason::ContextFull);
        }
        if let Some(finish) = self.finish {
            self.outbox.end = Some(Event::Done {
                finish,
                usage: Usage::new(self.prompt_len, self.tokens.len()),
            });
        }
    }
}

/// Generated tokens per second over a sliding window.
pub(super) struct Rate {
    window: Duration,
    events: VecDeque<(Instant, usize)>,
}

impl Rate {
    /// Over the last three seconds.
    pub(super) fn new() -> Rate {
        Rate {
            window: Duration::from_secs(3),
            events: VecDeque::new(),
        }
    }

    pub(super) fn record(&mut self, now: Instant, n: usize) -> f64 {
        self.events.push_back((now, n));
        while self
            .events
            .front()
            .is_some_and(|&(t, _)| now.duration_since(t) > self.window)
        {
            self.events.pop_front();
        }
        let total: usize = self.events.iter().map(|&(_, n)| n).sum();
        total as f64 / self.window.as_secs_f64()
    }
}

/// Runs the scheduler until every [`Queue`] is dropped.
pub fn run(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    jobs: Receiver<Job>,
    config: &LoopConfig,
    metrics: &Metrics,
    mut adaptation: Option<&mut Adaptation>,
) {
    let n_vocab = engine.model().config.n_vocab;
    let context = config.context;
    // A job that waits for KV room, taken from the queue but still counted
    // in its depth.
    let mut pending: Option<Job> = None;
    if let Some(a) = adaptation.as_deref() {
        a.publish(metrics);
    }
    let mut seqs: Vec<Seq<'_>> = Vec::new();
    let mut caches: Vec<KvCache> = Vec::new();
    // Finished sequences whose client has not taken everything yet.
    let mut draining: Vec<Outbox> = Vec::new();
    let mut rate = Rate::new();
    let mut open = true;
    while open || pending.is_some() || !seqs.is_empty() || !draining.is_empty() {
        // 1. Admit.
        while (open || pending.is_some()) && seqs.len() < config.max_batch {
            let job = if let Some(j) = pending.take() {
                j
            } else if !seqs.is_empty() {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            } else if !draining.is_empty() {
                match jobs.recv_timeout(Duration::from_millis(20)) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            } else {
                rate.record(Instant::now(), 0);
                metrics.tokens_per_s.set(0.0);
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            };
            if job.events.is_closed() {
                metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                metrics.request(Outcome::Cancelled);
                continue;
            }
            let mut reserved = 0;
            if let Some(a) = adaptation.as_deref_mut() {
                let want = job.prompt.len() + job.params.max_tokens.unwrap_or(context);
                reserved = a.kv_bytes(want.min(context));
                let held: u64 = seqs.iter().map(|s| s.reserved).sum();
                if reserved > a.policy.kv_capacity() {
                    // Not even alone (the HTTP side refuses these first).
                    metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                    metrics.request(Outcome::Failed);
                    let _ = job.events.try_send(Event::Failed(format!(
                        "the KV cache of {want} tokens does not fit the memory budget"
                    )));
                    continue;
                }
                if held + reserved > a.policy.kv_capacity() {
                    // Past capacity: wait for running sequences to end.
                    pending = Some(job);
                    break;
                }
                let kv: u64 = caches.iter().map(|c| c.bytes() as u64).sum::<u64>()
                    + a.kv_bytes(job.prompt.len());
                let obs = Observation {
                    kv_bytes: kv as i64,
                    sequences: seqs.len() + 1,
                };
                a.adapt(engine, obs, metrics);
            }
            metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            match admit(engine, tokenizer, job, n_vocab, context, metrics) {
                Some((mut seq, cache)) => {
                    seq.reserved = reserved;
                    seqs.push(seq);
                    caches.push(cache);
                }
                None => continue,
            }
        }

        // 2. One decode step over every sequence still generating.
        let now = Instant::now();
        let stepping: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].finish.is_none())
            .collect();
        if let (Some(a), false) = (adaptation.as_deref_mut(), stepping.is_empty()) {
            // The KV every sequence will hold once this step has grown it.
            let kv: u64 = (0..seqs.len())
                .map(|i| {
                    let now = caches[i].bytes() as u64;
                    if seqs[i].finish.is_none() {
                        now.max(a.kv_bytes(caches[i].len() + 1))
                    } else {
                        now
                    }
                })
                .sum();
            let obs = Observation {
                kv_bytes: kv as i64,
                sequences: seqs.len(),
            };
            a.adapt(engine, obs, metrics);
        }
        if !stepping.is_empty() {
            let batch: Vec<TokenIn> = stepping
                .iter()
                .map(|&i| TokenIn {
                    id: *seqs[i].tokens.last().expect("a sequence has a token"),
                    seq: i,
                    pos: caches[i].len(),
                })
                .collect();
            let want: Vec<usize> = (0..batch.len()).collect();
            match engine.step(&batch, &mut caches, &want) {
                Ok(rows) => {
                    let now = Instant::now();
                    for (k, &i) in stepping.iter().enumerate() {
                        let left = caches[i].len() < context;
                        seqs[i].advance(&rows[k * n_vocab..(k + 1) * n_vocab], left, metrics, now);
                    }
                    metrics.tokens_per_s.set(rate.record(now, stepping.len()));
                }
                Err(e) => {
                    log::error!("decode step failed: {e}");
                    for seq in &mut seqs {
                        seq.outbox.text.clear();
                        seq.outbox.end = Some(Event::Failed(e.to_string()));
                        seq.finish = Some(FinishReason::Cancelled);
                        metrics.request(Outcome::Failed);
                    }
                }
            }
        }
        let _ = now;

        // 3. Deliver, and drop what is done.
        let now = Instant::now();
        let mut i = 0;
        while i < seqs.len() {
            let delivery = seqs[i].outbox.flush(now);
            let stalled = seqs[i].outbox.stalled_for(now) > config.sse_stall;
            let finished = seqs[i].finish.is_some();
            if delivery == Delivery::Closed || stalled {
                if stalled {
                    metrics.stalled.fetch_add(1, Ordering::Relaxed);
                }
                metrics.request(Outcome::Cancelled);
                seqs.swap_remove(i);
                caches.swap_remove(i);
            } else if finished {
                let seq = seqs.swap_remove(i);
                caches.swap_remove(i);
                if !matches!(seq.finish, Some(FinishReason::Cancelled)) {
                    metrics.request(Outcome::Ok);
                }
                if delivery == Delivery::Waiting {
                    draining.push(seq.outbox);
                }
            } else {
                i += 1;
            }
        }
        draining.retain_mut(|o| {
            let d = o.flush(now);
            let stalled = o.stalled_for(now) > config.sse_stall;
            if stalled {
                metrics.stalled.fetch_add(1, Ordering::Relaxed);
            }
            d == Delivery::Waiting && !stalled
        });

        metrics.active.store(seqs.len() as u64, Ordering::Relaxed);
        let kv: u64 = caches.iter().map(|c| c.bytes() as u64).sum();
        metrics.kv_bytes.store(kv, Ordering::Relaxed);
        if let Some(a) = adaptation.as_deref_mut() {
            // Sequences that ended may have freed enough to promote.
            if pending.is_none() {
                let obs = Observation {
                    kv_bytes: kv as i64,
                    sequences: seqs.len(),
                };
                a.adapt(engine, obs, metrics);
            }
        }
        if let Some(load) = engine.load_stats() {
            metrics.bubbles.store(load.bubbles, Ordering::Relaxed);
            metrics.bubble_seconds.set(load.bubble_s);
            metrics.bytes_read.store(load.bytes_read, Ordering::Relaxed);
        }
    }
}

/// Prefills a job's prompt alone and samples its first token.
fn admit<'t>(
    engine: &mut Engine,
    tokenizer: &'t Tokenizer,
    job: Job,
    n_vocab: usize,
    context: usize,
    metrics: &Metrics,
) -> Option<(Seq<'t>, KvCache)> {
    let fail = |job: &Job, message: String| {
        metrics.request(Outcome::Failed);
        let _ = job.events.try_send(Event::Failed(message));
    };
    let sampler = match Sampler::new(job.params.clone(), n_vocab) {
        Ok(s) => s,
        Err(e) => {
            fail(&job, e.to_string());
            return None;
        }
    };
    if let Err(e) = engine.check_prompt(&job.prompt, job.params.max_tokens.unwrap_or(0)) {
        fail(&job, e.to_string());
        return None;
    }
    let mut cache = engine.new_cache();
    let logits = match engine.prefill(&mut cache, &job.prompt, false) {
        Ok(l) => l,
        Err(e) => {
            fail(&job, e.to_string());
            return None;
        }
    };
    metrics
        .prompt_tokens
        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
    let mut seq = Seq {
        prompt_len: job.prompt.len(),
        reserved: 0,
        sampler,
        stream: TextStream::new(tokenizer, &job.params),
        tokens: Vec::new(),
        outbox: Outbox::new(job.events),
        arrived: job.arrived,
        last_token: None,
        finish: None,
    };
    seq.advance(&logits, cache.len() < context, metrics, Instant::now());
    Some((seq, cache))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_holds_what_a_full_channel_cannot_take_and_times_the_stall() {
        let (tx, mut rx) = tmpsc::channel(1);
        let mut o = Outbox::new(tx);
        let t0 = Instant::now();
        o.text.push('a');
        assert_eq!(o.flush(t0), Delivery::Sent);
        o.text.push('b');
        assert_eq!(o.flush(t0), Delivery::Waiting);
        o.text.push('c');
        o.end = Some(Event::Failed("x".into()));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(o.flush(later), Delivery::Waiting);
        // The stall is timed from the first refusal.
        assert_eq!(o.stalled_for(later), Duration::from_secs(5));
        assert!(matches!(rx.try_recv(), Ok(Event::Text(t)) if t == "a"));
        assert_eq!(o.flush(later), Delivery::Waiting, "the end still waits");
        assert!(matches!(rx.try_recv(), Ok(Event::Text(t)) if t == "bc"));
        assert_eq!(o.flush(later), Delivery::Sent);
        assert_eq!(o.stalled_for(later), Duration::ZERO);
        assert!(matches!(rx.try_recv(), Ok(Event::Failed(_))));
        drop(rx);
        assert_eq!(o.flush(later), Delivery::Closed);
    }
}
