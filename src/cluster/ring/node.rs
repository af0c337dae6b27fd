//! A node's compute thread: its windows, their sequences' caches, its
//! streamer, and (on the head) the requests in flight.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::head::{Head, RingRequest};
use super::kvpressure::{self, Admission, Placed, Pressure};
use super::transport::UNREACHABLE;
use super::wire::{self, Hop, Msg, Pick, Sampled, TailSampling, TokenMeta};
use super::{clock_us, RingConfig, RingError, RingStats};
use crate::compute::cpu::Pool;
use crate::engine::forward::{Scratch, TokenIn};
use crate::engine::generate::argmax;
use crate::engine::kv::KvCache;
use crate::engine::loader::Streamer;
use crate::engine::sampler::{Sampler, SamplingParams};
use crate::engine::weights::{Model, Unit};
use crate::engine::window::{engine_units, skip_window, Exec, Held, WindowInput};
use crate::net::quic::BudgetHold;

/// How long a window visit waits, with other work queued, for a
/// micro-batch of its step that does not come before it moves on.
const STEP_WAIT: Duration = Duration::from_secs(30);
/// How often a waiting visit looks up from its inbox.
const WAIT_TICK: Duration = Duration::from_millis(500);

/// Released request ids remembered, so that a late hop cannot bring a
/// released sequence's cache back.
const RELEASED_MEMORY: usize = 4096;

/// The plan as this node needs it, checked.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    pub epoch: u64,
    /// Global window index → (ring index of its device, planner units).
    pub windows: Vec<(usize, Range<usize>)>,
    /// Global window index → index among this node's windows.
    pub local: HashMap<u16, usize>,
    pub head: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_vocab: usize,
    pub context: usize,
}

impl Layout {
    /// Checks the plan against the model and this node: windows cover
    /// every unit once, in order, on ring members.
    pub fn check(config: &RingConfig) -> Result<Layout, RingError> {
        let gguf = crate::model::gguf::Gguf::open(&config.model)
            .map_err(|e| RingError::Engine(e.into()))?;
        let c = crate::model::config::Config::from_gguf(&gguf)
            .map_err(|e| RingError::Engine(e.into()))?;
        let plan = &config.plan;
        let bad = |m: String| Err(RingError::Plan(m));
        if plan.ring.len() != config.peers.len() || config.me >= plan.ring.len() {
            return bad(format!(
                "{} ring members, {} peers, this node at {}",
                plan.ring.len(),
                config.peers.len(),
                config.me
            ));
        }
        if plan.windows.is_empty() || plan.windows.len() > u16::MAX as usize {
            return bad(format!("{} windows", plan.windows.len()));
        }
        let mut at = 0usize;
        let mut windows = Vec::new();
        let mut local = HashMap::new();
        for (i, w) in plan.windows.iter().enumerate() {
            let r = w.units.start as usize..w.units.end as usize;
            if r.start != at || r.end <= r.start || r.end > c.n_layer + 1 {
                return bad(format!(
                    "window {i} covers units {r:?}, expected to start at {at}"
                ));
            }
            if w.streamed.len() != r.len() || w.device >= plan.ring.len() {
                return bad(format!("window {i}: bad device or streamed flags"));
            }
            if w.device == config.me {
                local.insert(i as u16, local.len());
            }
            at = r.end;
            windows.push((w.device, r));
        }
        if at != c.n_layer + 1 {
            return bad(format!(
                "windows end at unit {at}, the model has {}",
                c.n_layer + 1
            ));
        }
        Ok(Layout {
            epoch: plan.epoch,
            head: windows[0].0,
            windows,
            local,
            n_layer: c.n_layer,
            n_embd: c.n_embd,
            n_vocab: c.n_vocab,
            context: c.context_length,
        })
    }
}

/// A message to the compute thread.
pub(super) enum Input {
    /// A micro-batch for local window `window`.
    Work {
        window: usize,
        hop: Hop,
        hidden: Vec<f32>,
        hold: Option<BudgetHold>,
    },
    Sampled {
        sampled: Sampled,
        logits: Vec<f32>,
    },
    Release(Vec<u64>),
    /// Requests failed here or at a peer; the head ends them, others pass
    /// it on to the head.
    Failed {
        requests: Vec<u64>,
        reason: String,
    },
    /// The link to ring member `peer` closed or cannot be made.
    PeerLost {
        peer: usize,
        reason: String,
    },
    Submit {
        request: RingRequest,
        reply: tokio::sync::oneshot::Sender<Result<super::RingOutput, RingError>>,
        id: std::sync::mpsc::Sender<Result<u64, RingError>>,
        sink: Option<super::head::TokenSink>,
    },
    /// Requests submitted together (each a `Submit`): they start in one
    /// step, however the compute thread's reads of its inbox fall.
    Burst(Vec<Input>),
    /// The head's client gave up on a request: it leaves the ring at the
    /// next step.
    Cancel(u64),
    /// Ring member `peer` can hold `kv_positions` of KV (for the head's
    /// admission).
    Capacity {
        peer: usize,
        kv_positions: u64,
    },
    Stop,
}

/// A message for the sender task of one peer.
pub(super) struct Outgoing {
    pub bytes: Vec<u8>,
    pub sent_at: Instant,
}

struct Queued {
    hop: Hop,
    hidden: Vec<f32>,
    _hold: Option<BudgetHold>,
    /// When its input reached the compute thread ([`clock_us`]); a hop
    /// handed to a local window keeps its inputs' oldest.
    arrived: u64,
}

/// How a window visit ended.
enum Visited {
    Complete,
    /// The node is out of step: it moves to this step and local window.
    OutOfStep((u64, usize)),
    Stop,
}

/// One of this node's windows, with its sequences' caches.
struct LocalWindow {
    index: u16,
    units: Vec<Unit>,
    layers: Range<usize>,
    last: bool,
    streams: bool,
    /// Its streamed units fit in the streamer's slots at once: a visit
    /// runs the step's micro-batches one by one on the units it holds
    /// (else it runs them together once all are there).
    holds: bool,
    queue: VecDeque<Queued>,
    /// Requests whose tokens of the last step ran here: each has one in
    /// this step too, unless it ended.
    carried: HashSet<u64>,
    caches: Vec<KvCache>,
    slot_of: HashMap<u64, usize>,
    free: Vec<usize>,
}

impl LocalWindow {
    fn release(&mut self, request: u64) {
        if let Some(s) = self.slot_of.remove(&request) {
            // Its memory goes back: the KV held follows the sequences
            // that run (`kvpressure`).
            self.caches[s].clear();
            self.free.push(s);
        }
    }
}

pub(super) struct Compute {
    model: Arc<Model>,
    pool: Pool,
    scratch: Scratch,
    streamer: Option<Streamer>,
    compute_factor: f64,
    windows: Vec<LocalWindow>,
    layout: Layout,
    me: usize,
    outs: Vec<Option<UnboundedSender<Outgoing>>>,
    stats: Arc<RingStats>,
    head: Option<Head>,
    /// KV pressure: the node's policy (with a budget), and on the head the
    /// admission by every member's capacity (`kvpressure`).
    pressure: Option<Pressure>,
    admission: Option<Admission>,
    /// The step this node is running (module docs of `head`).
    step: u64,
    /// The local window it visits in that step.
    visiting: usize,
    /// Per step, the requests whose prompts start in it, learned from its
    /// micro-batches.
    fresh: HashMap<u64, Vec<u64>>,
    released: (HashSet<u64>, VecDeque<u64>),
    /// On the node of the last window: the samplers of requests not
    /// sampled greedily, until they are released.
    samplers: HashMap<u64, Sampler>,
    // Reused buffers of a window run.
    batch: Vec<TokenIn>,
    input: Vec<f32>,
    want: Vec<usize>,
    logits: Vec<f32>,
}

impl Compute {
    /// Opens the model with this node's resident units in memory and a
    /// streamer for its streamed ones, in the order the node runs them.
    pub fn open(
        config: &RingConfig,
        layout: Layout,
        outs: Vec<Option<UnboundedSender<Outgoing>>>,
        stats: Arc<RingStats>,
    ) -> Result<Compute, RingError> {
        let plan = &config.plan;
        let n_layer = layout.n_layer;
        let mut order = Vec::new();
        let mut windows = Vec::new();
        for (i, w) in plan.windows.iter().enumerate() {
            if w.device != config.me {
                continue;
            }
            let r = w.units.start as usize..w.units.end as usize;
            for (k, u) in r.clone().enumerate() {
                for eu in engine_units(n_layer, u..u + 1) {
                    order.push(Placed {
                        unit: eu,
                        window: windows.len(),
                        planned: w.streamed[k],
                    });
                }
            }
            windows.push(LocalWindow {
                index: i as u16,
                units: engine_units(n_layer, r.clone()),
                layers: r.start.min(n_layer)..r.end.min(n_layer),
                last: i + 1 == plan.windows.len(),
                streams: false,
                holds: true,
                queue: VecDeque::new(),
                carried: HashSet::new(),
                caches: Vec::new(),
                slot_of: HashMap::new(),
                free: Vec::new(),
            });
        }
        // Units the plan streams, and those this node demoted before a
        // restart under the same placement.
        let demoted = kvpressure::saved_demotions(config, &order);
        let streamed: Vec<Unit> = order
            .iter()
            .filter(|p| p.planned || demoted.contains(&p.unit))
            .map(|p| p.unit)
            .collect();
        let resident: HashSet<Unit> = order
            .iter()
            .map(|p| p.unit)
            .filter(|u| !streamed.contains(u))
            .collect();
        let model = Model::open_with(&config.model, |u| resident.contains(&u))?;
        let streamer = if streamed.is_empty() {
            None
        } else {
            let (mode, slots) = super::emulation::streaming_of(plan);
            let pace = config.emulation.read_pace();
            Some(Streamer::start_paced(&model, &streamed, slots, mode, pace)?)
        };
        refresh_holds(&mut windows, streamer.as_ref());
        let head = (config.me == layout.head).then(|| {
            Head::new(
                layout.epoch,
                layout.context,
                layout.n_vocab,
                plan.micro_batches as usize,
            )
        });
        let weights: u64 = resident
            .iter()
            .map(|&u| model.resident_bytes(u))
            .sum::<u64>()
            + streamer.as_ref().map_or(0, |s| s.slot_bytes() as u64);
        RingStats::set(&stats.weights_bytes, weights);
        let pressure = Pressure::new(config, &model, order, &demoted, stats.clone());
        let admission = head.as_ref().map(|_| Admission::new(config.peers.len()));
        let mut compute = Compute {
            model: Arc::new(model),
            pool: Pool::new(config.threads.max(1)),
            scratch: Scratch::default(),
            streamer,
            compute_factor: config.emulation.compute_factor(),
            windows,
            me: config.me,
            layout,
            outs,
            stats,
            head,
            pressure,
            admission,
            step: 1,
            visiting: 0,
            fresh: HashMap::new(),
            released: (HashSet::new(), VecDeque::new()),
            samplers: HashMap::new(),
            batch: Vec::new(),
            input: Vec::new(),
            want: Vec::new(),
            logits: Vec::new(),
        };
        compute.tell_capacity();
        Ok(compute)
    }

    /// Tells the head how much KV this node can hold (the head learns its
    /// own): no limit without a budget.
    fn tell_capacity(&mut self) {
        let kv_positions = self
            .pressure
            .as_ref()
            .map_or(u64::MAX, Pressure::kv_positions);
        match self.admission.as_mut() {
            Some(a) => a.learn(self.me, kv_positions),
            None => {
                let msg = Msg::Capacity {
                    epoch: self.layout.epoch,
                    kv_positions,
                };
                self.send(self.layout.head, &msg, None);
            }
        }
    }

    /// The loop: each step, visit every local window in plan order.
    pub fn run(mut self, inbox: Receiver<Input>) {
        loop {
            if !self.drain(&inbox) {
                return self.stop();
            }
            let resync = match self.visit(self.visiting, &inbox) {
                Visited::Stop => return self.stop(),
                Visited::Complete => None,
                Visited::OutOfStep(to) => Some(to),
            };
            self.publish();
            self.visiting += 1;
            if self.visiting == self.windows.len() {
                self.visiting = 0;
                self.step += 1;
                let step = self.step;
                self.fresh.retain(|&s, _| s >= step);
            }
            if let Some((step, window)) = resync {
                self.resync(step, window);
            }
        }
    }

    /// A node that holds nothing of its step while every micro-batch
    /// queued here is of another step is out of step with the ring: a
    /// member restarted within the epoch starts at step 1 while the head
    /// has declared many. Waiting for its own step would hold the ring
    /// for [`STEP_WAIT`]; it has nothing to finish, so it moves to the
    /// step of the first micro-batch queued, at that micro-batch's window.
    /// Returns that step and local window.
    fn out_of_step(&self) -> Option<(u64, usize)> {
        let released = |r: &u64| self.released.0.contains(r);
        if self.fresh.contains_key(&self.step)
            || self.windows.iter().any(|w| !w.carried.iter().all(released))
        {
            return None;
        }
        let mut first: Option<(u64, usize)> = None;
        for (i, w) in self.windows.iter().enumerate() {
            for q in &w.queue {
                if q.hop.step == self.step {
                    return None;
                }
                if first.is_none_or(|(s, _)| q.hop.step < s) {
                    first = Some((q.hop.step, i));
                }
            }
        }
        first
    }

    /// Moves to local window `window` of `step` (see [`Self::out_of_step`]):
    /// the streamer is walked past the windows between, as visits with
    /// nothing to run would have done; whole rounds leave it where it is.
    fn resync(&mut self, step: u64, window: usize) {
        log::info!(
            "ring node {}: out of step with the ring; moving from step {} to step {step}",
            self.me,
            self.step
        );
        while self.visiting != window {
            let w = &self.windows[self.visiting];
            if w.streams {
                skip_window(self.streamer.as_mut(), &w.units);
                RingStats::add(&self.stats.streamed_skips, 1);
            }
            self.visiting = (self.visiting + 1) % self.windows.len();
        }
        self.step = step;
        self.fresh.retain(|&s, _| s >= step);
        // A step behind the one left was not learned as its micro-batches
        // came (`queue` learns steps from the node's own on).
        for q in self.windows.iter().flat_map(|w| &w.queue) {
            learn_fresh(&mut self.fresh, step, &q.hop);
        }
    }

    /// Takes everything that has arrived, then lets the head send what can
    /// go (so that requests submitted together start in one step).
    /// `false`: stop.
    fn drain(&mut self, inbox: &Receiver<Input>) -> bool {
        loop {
            match inbox.try_recv() {
                Ok(Input::Stop) | Err(TryRecvError::Disconnected) => return false,
                Ok(i) => self.take(i),
                Err(TryRecvError::Empty) => break,
            }
        }
        self.pump();
        true
    }

    /// Runs local window `w` for the current step: every micro-batch of
    /// the step, as it arrives, on the window's streamed units taken once
    /// (held between micro-batches, or all run together when the units do
    /// not fit in the slots at once), until every sequence expected here
    /// has passed, or the node finds itself out of step.
    fn visit(&mut self, w: usize, inbox: &Receiver<Input>) -> Visited {
        let holds = self.windows[w].holds;
        let mut held = Held::default();
        let mut gathered: Vec<Queued> = Vec::new();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut progress = Instant::now();
        let resync = loop {
            // Before taking work: what waits (and how long) is what the
            // node reports, also while it computes what it takes now.
            self.publish();
            if let Some(to) = self.out_of_step() {
                break Some(to);
            }
            while let Some(q) = self.pop_ready(w) {
                if q.hop.step == self.step {
                    seen.extend(q.hop.tokens.iter().filter(|t| t.want).map(|t| t.request));
                }
                if holds {
                    self.run_hops(w, vec![q], Some(&mut held));
                } else {
                    gathered.push(q);
                }
                progress = Instant::now();
            }
            if self.visit_complete(w, &seen) {
                break None;
            }
            match inbox.recv_timeout(WAIT_TICK) {
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    held.finish(self.streamer.as_mut(), &self.windows[w].units);
                    return Visited::Stop;
                }
                Ok(i) => {
                    self.take(i);
                    if !self.drain(inbox) {
                        held.finish(self.streamer.as_mut(), &self.windows[w].units);
                        return Visited::Stop;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            // A micro-batch lost on the way (a bad frame) never comes: do
            // not hold the ring for it once other work has waited long.
            // (An idle ring waits for nothing: the clock starts with work.)
            if self.windows.iter().all(|x| x.queue.is_empty()) {
                progress = Instant::now();
            } else if progress.elapsed() > STEP_WAIT {
                RingStats::add(&self.stats.step_give_ups, 1);
                log::warn!(
                    "ring node {}: window {} gave up waiting for the rest of step {} ({})",
                    self.me,
                    self.windows[w].index,
                    self.step,
                    self.waiting_for(w, &seen)
                );
                break None;
            }
        };
        if holds {
            held.finish(self.streamer.as_mut(), &self.windows[w].units);
        } else if gathered.is_empty() {
            if self.windows[w].streams {
                skip_window(self.streamer.as_mut(), &self.windows[w].units);
                RingStats::add(&self.stats.streamed_skips, 1);
            }
        } else {
            self.run_hops(w, gathered, None);
        }
        self.windows[w].carried = seen;
        match resync {
            Some(to) => Visited::OutOfStep(to),
            None => Visited::Complete,
        }
    }

    /// The next queued micro-batch of window `w` of this step or an
    /// earlier one (one that came late), in arrival order.
    fn pop_ready(&mut self, w: usize) -> Option<Queued> {
        let step = self.step;
        let q = &mut self.windows[w].queue;
        let i = q.iter().position(|q| q.hop.step <= step)?;
        q.remove(i)
    }

    /// Whether every sequence of this step has passed window `w`: those
    /// that passed it in the last step and the step's new prompts, less
    /// those that ended. A micro-batch of a later step queued here also
    /// says so: each link delivers in order, and every node runs the steps
    /// in order.
    fn visit_complete(&self, w: usize, seen: &HashSet<u64>) -> bool {
        let win = &self.windows[w];
        if win.queue.iter().any(|q| q.hop.step > self.step) {
            return true;
        }
        let Some(fresh) = self.fresh.get(&self.step) else {
            // Nothing of this step has come to this node yet.
            return false;
        };
        let done = |r: &u64| seen.contains(r) || self.released.0.contains(r);
        fresh.iter().all(done) && win.carried.iter().all(done)
    }

    /// What visit `w` still waits for, and what is queued on this node:
    /// for the log line of a visit that gives up.
    fn waiting_for(&self, w: usize, seen: &HashSet<u64>) -> String {
        let done = |r: &u64| seen.contains(r) || self.released.0.contains(r);
        let fresh = self.fresh.get(&self.step);
        let mut missing: Vec<u64> = fresh
            .into_iter()
            .flatten()
            .chain(self.windows[w].carried.iter())
            .filter(|r| !done(r))
            .copied()
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let queued: Vec<String> = self
            .windows
            .iter()
            .map(|x| {
                let hops: Vec<String> = x
                    .queue
                    .iter()
                    .map(|q| {
                        format!(
                            "{}@{}{:?}",
                            q.hop.micro_batch,
                            q.hop.step,
                            requests_of(&q.hop.tokens)
                        )
                    })
                    .collect();
                format!("window {}: [{}]", x.index, hops.join(" "))
            })
            .collect();
        format!(
            "missing {missing:?}, fresh known: {}, queued: {}",
            fresh.is_some(),
            queued.join("; ")
        )
    }

    /// Queues a micro-batch for local window `w`, learning its step's new
    /// prompts.
    fn queue(&mut self, w: usize, q: Queued) {
        // An empty micro-batch that comes after its step's visit here
        // carries nothing this window waits for: it only passes on.
        let visited = q.hop.step < self.step || (q.hop.step == self.step && w < self.visiting);
        if q.hop.tokens.is_empty() && visited {
            return self.pass_empty(w, vec![q]);
        }
        learn_fresh(&mut self.fresh, self.step, &q.hop);
        self.windows[w].queue.push_back(q);
    }

    /// Admits the requests that fit the ring's KV (`kvpressure`), then
    /// sends what the head lets go, with the prompt lengths of its step.
    fn pump(&mut self) {
        let (Some(h), Some(a)) = (self.head.as_mut(), self.admission.as_mut()) else {
            return;
        };
        let (refused, waited) = h.admit(|id, end| a.verdict(id, end));
        RingStats::set(&self.stats.kv_waiting, h.waiting() as u64);
        RingStats::add(&self.stats.kv_waited, waited as u64);
        let mut hops = h.pump();
        for hop in &mut hops {
            hop.fresh_tokens = hop
                .fresh
                .iter()
                .map(|&r| h.prompt_len(r).unwrap_or(1))
                .collect();
        }
        if !refused.is_empty() {
            self.broadcast_release(refused);
        }
        for hop in hops {
            self.enqueue_first(hop);
        }
    }

    /// Sets the gauges others read between window runs: KV held, loading
    /// bubbles, and when the oldest input still queued arrived (what the
    /// next run takes is still queued here, so a long run shows as a
    /// growing backlog). Atomics only.
    fn publish(&self) {
        let (mut used, mut capacity, mut oldest) = (0, 0, u64::MAX);
        for w in &self.windows {
            for c in &w.caches {
                used += c.used_bytes() as u64;
                capacity += c.bytes() as u64;
            }
            for q in &w.queue {
                oldest = oldest.min(q.arrived);
            }
        }
        let st = &self.stats;
        RingStats::set(&st.kv_used_bytes, used);
        RingStats::set(&st.kv_capacity_bytes, capacity);
        RingStats::set(
            &st.oldest_input_us,
            if oldest == u64::MAX { 0 } else { oldest },
        );
        if let Some(s) = &self.streamer {
            let l = s.stats();
            RingStats::set(&st.bubbles, l.bubbles);
            RingStats::set(&st.bubble_us, (l.bubble_s * 1e6) as u64);
        }
    }

    fn stop(&mut self) {
        if let Some(s) = &self.streamer {
            log::info!("ring node {}: streaming {:?}", self.me, s.stats());
        }
        if let Some(h) = self.head.as_mut() {
            h.stop_all();
        }
    }

    fn take(&mut self, input: Input) {
        match input {
            Input::Work {
                window,
                hop,
                hidden,
                hold,
            } => self.queue(
                window,
                Queued {
                    hop,
                    hidden,
                    _hold: hold,
                    arrived: clock_us(),
                },
            ),
            Input::Sampled { sampled, logits } => self.on_sampled(sampled, &logits),
            Input::Release(requests) => self.release_local(&requests),
            Input::Failed { requests, reason } => self.fail(requests, reason),
            Input::PeerLost { peer, reason } => self.peer_lost(peer, &reason),
            Input::Cancel(request) => {
                if let Some(h) = self.head.as_mut() {
                    let ended = h.fail(&[request], "cancelled");
                    if !ended.is_empty() {
                        self.broadcast_release(ended);
                    }
                }
            }
            Input::Submit {
                request,
                reply,
                id,
                sink,
            } => {
                let Some(head) = self.head.as_mut() else {
                    let _ = id.send(Err(RingError::NotHead {
                        head: self.layout.head,
                    }));
                    return;
                };
                match head.submit(request, reply, sink) {
                    Ok(rid) => {
                        let _ = id.send(Ok(rid));
                    }
                    Err(e) => {
                        let _ = id.send(Err(e));
                    }
                }
            }
            Input::Burst(inputs) => {
                for i in inputs {
                    self.take(i);
                }
            }
            Input::Capacity { peer, kv_positions } => {
                if let Some(a) = self.admission.as_mut() {
                    a.learn(peer, kv_positions);
                }
            }
            Input::Stop => {}
        }
    }

    /// Queues a hop for the first window, which the head always holds.
    fn enqueue_first(&mut self, hop: Hop) {
        if let Some(&w) = self.layout.local.get(&0) {
            self.queue(
                w,
                Queued {
                    hop,
                    hidden: Vec::new(),
                    _hold: None,
                    arrived: clock_us(),
                },
            );
        }
    }

    fn on_sampled(&mut self, sampled: Sampled, logits: &[f32]) {
        let Some(head) = self.head.as_mut() else {
            return;
        };
        let ended = head.on_sampled(sampled, logits);
        if !ended.is_empty() {
            self.broadcast_release(ended);
        }
    }

    /// A member is gone: the requests in flight cannot finish under this
    /// plan, so the head fails them all with a clear error (re-planning
    /// without the member and resuming them is not done yet).
    ///
    /// A member that loses the head drops every sequence it holds: each
    /// belongs to a request of the head's, which the head failed if it
    /// lives and lost if it died. Left in place, they would hold its
    /// windows waiting for tokens that never come, also for a head
    /// restarted within the epoch (whose requests start afresh). It also
    /// tells its KV capacity again, for such a head.
    fn peer_lost(&mut self, peer: usize, reason: &str) {
        log::debug!("ring node {}: lost ring node {peer}: {reason}", self.me);
        if self.head.is_none() && peer == self.layout.head {
            let mut held: Vec<u64> = self
                .windows
                .iter()
                .flat_map(|w| {
                    let queued = w.queue.iter().flat_map(|q| requests_of(&q.hop.tokens));
                    w.slot_of.keys().chain(&w.carried).copied().chain(queued)
                })
                .filter(|r| !self.released.0.contains(r))
                .collect();
            held.sort_unstable();
            held.dedup();
            if !held.is_empty() {
                log::warn!(
                    "ring node {}: lost the head ({reason}): dropping requests {held:?}",
                    self.me
                );
                self.release_local(&held);
            }
            // A head restarted within the epoch knows no member's KV
            // capacity; this goes to whoever serves the head's address next.
            // Not after a dial that failed: the message would only bring
            // another one.
            if reason != UNREACHABLE {
                self.tell_capacity();
            }
        }
        if let Some(h) = self.head.as_mut() {
            let ended = h.fail_all(&format!(
                "ring node {peer} was lost ({reason}); the request cannot finish under this plan"
            ));
            if !ended.is_empty() {
                log::warn!(
                    "lost ring node {peer} ({reason}): {} requests failed",
                    ended.len()
                );
                self.broadcast_release(ended);
            }
        }
    }

    /// Fails requests: ends them at the head, or tells the head.
    fn fail(&mut self, requests: Vec<u64>, reason: String) {
        log::warn!(
            "ring node {}: requests {requests:?} failed: {reason}",
            self.me
        );
        match self.head.as_mut() {
            Some(h) => {
                let ended = h.fail(&requests, &reason);
                if !ended.is_empty() {
                    self.broadcast_release(ended);
                }
            }
            None => {
                let msg = Msg::Failed {
                    epoch: self.layout.epoch,
                    requests,
                    reason,
                };
                self.send(self.layout.head, &msg, None);
            }
        }
    }

    fn broadcast_release(&mut self, requests: Vec<u64>) {
        self.release_local(&requests);
        let msg = Msg::Release {
            epoch: self.layout.epoch,
            requests,
        };
        for peer in 0..self.outs.len() {
            if peer != self.me {
                self.send(peer, &msg, None);
            }
        }
    }

    fn release_local(&mut self, requests: &[u64]) {
        for &r in requests {
            self.samplers.remove(&r);
            if let Some(a) = self.admission.as_mut() {
                a.release(r);
            }
            for w in &mut self.windows {
                w.release(r);
            }
            let (set, order) = &mut self.released;
            if set.insert(r) {
                order.push_back(r);
                if order.len() > RELEASED_MEMORY {
                    if let Some(old) = order.pop_front() {
                        set.remove(&old);
                    }
                }
            }
        }
    }

    fn send(
        &self,
        peer: usize,
        msg: &Msg,
        tensor: Option<(&crate::net::frame::TensorHeader, &[f32])>,
    ) {
        let bytes = match wire::encode(msg, tensor) {
            Ok(b) => b,
            Err(e) => {
                log::error!("ring node {}: encoding a message: {e}", self.me);
                return;
            }
        };
        RingStats::add(&self.stats.sent, 1);
        RingStats::add(&self.stats.sent_bytes, bytes.len() as u64);
        if let Some(Some(tx)) = self.outs.get(peer) {
            let _ = tx.send(Outgoing {
                bytes,
                sent_at: Instant::now(),
            });
        }
    }

    /// Checks a hop against window `w`'s caches: every token continues
    /// its sequence (given `next`, the positions earlier hops of this run
    /// reach). Makes caches for new sequences.
    fn admit(&mut self, w: usize, hop: &Hop, next: &mut HashMap<u64, usize>) -> Result<(), String> {
        let n_layer = self.layout.n_layer;
        let (n_head_kv, head_dim) = (self.model.config.n_head_kv, self.model.config.head_dim);
        let win = &mut self.windows[w];
        let mut local_next: Vec<(u64, usize)> = Vec::new();
        for t in &hop.tokens {
            let have = local_next
                .iter()
                .rev()
                .find(|(r, _)| *r == t.request)
                .map(|&(_, p)| p)
                .or_else(|| next.get(&t.request).copied())
                .or_else(|| win.slot_of.get(&t.request).map(|&s| win.caches[s].len()));
            let expect = match have {
                Some(p) => p,
                None if self.released.0.contains(&t.request) => {
                    return Err(format!("request {} has ended", t.request))
                }
                None => 0,
            };
            if t.pos as usize != expect {
                return Err(format!(
                    "request {} at position {}, expected {expect}",
                    t.request, t.pos
                ));
            }
            local_next.push((t.request, expect + 1));
        }
        for (r, p) in local_next {
            if !win.slot_of.contains_key(&r) {
                let s = win.free.pop().unwrap_or_else(|| {
                    win.caches.push(KvCache::for_layers(
                        n_layer,
                        n_head_kv,
                        head_dim,
                        win.layers.clone(),
                    ));
                    win.caches.len() - 1
                });
                win.slot_of.insert(r, s);
            }
            next.insert(r, p);
        }
        Ok(())
    }

    /// Runs micro-batches of local window `w` as one batch (on the units
    /// `held` for the visit, if given) and hands each on. First, while the
    /// streamer holds nothing of this window, makes room for the KV the
    /// visit adds (`kvpressure`); a visit that held its window's units and
    /// now streams more of them than there are slots runs each
    /// micro-batch on its own, from a streamer rewound to the window.
    fn run_hops(&mut self, w: usize, hops: Vec<Queued>, held: Option<&mut Held>) {
        let free = held.as_deref().is_none_or(Held::is_empty);
        if free {
            self.make_room(w, &hops);
        }
        let rewind = free && held.is_some() && !self.windows[w].holds;
        self.run_window(w, hops, if rewind { None } else { held });
        if rewind {
            if let Some(p) = self.pressure.as_ref() {
                if let Err(e) = p.rewind(&self.model, &mut self.streamer, w) {
                    log::error!("ring node {}: restarting the streamer: {e}", self.me);
                }
            }
        }
    }

    /// Asks the KV-pressure policy about the KV the caches hold once this
    /// visit of window `w` has grown them, and applies its answer.
    fn make_room(&mut self, w: usize, hops: &[Queued]) {
        let Some(p) = self.pressure.as_ref() else {
            return;
        };
        let (kv, sequences) = self.kv_after(w, hops);
        let Some(change) = p.decide(kv, sequences) else {
            return;
        };
        if let Some(p) = self.pressure.as_mut() {
            if let Err(e) = p.apply(change, kv, &mut self.model, &mut self.streamer, w) {
                log::error!("ring node {}: changing the resident set: {e}", self.me);
            }
        }
        refresh_holds(&mut self.windows, self.streamer.as_ref());
    }

    /// KV bytes the caches hold once this visit of window `w` has grown
    /// them (every sequence that passes it by one position, a prompt that
    /// starts in this step by its length), and the sequences they are for.
    fn kv_after(&self, w: usize, hops: &[Queued]) -> (u64, usize) {
        let win = &self.windows[w];
        let per_position =
            KvCache::bytes_per_position(win.layers.len(), self.model.config.kv_dim()) as u64;
        let mut fresh: HashMap<u64, usize> = HashMap::new();
        for q in hops.iter().chain(&win.queue) {
            if q.hop.step <= self.step {
                let lens = q.hop.fresh.iter().zip(&q.hop.fresh_tokens);
                fresh.extend(lens.map(|(&r, &n)| (r, n as usize)));
            }
        }
        let mut ends: HashMap<u64, usize> = HashMap::new();
        let tokens = hops.iter().flat_map(|q| &q.hop.tokens);
        let passing = win
            .carried
            .iter()
            .copied()
            .chain(fresh.keys().copied())
            .chain(tokens.clone().map(|t| t.request));
        for r in passing {
            if self.released.0.contains(&r) {
                continue;
            }
            let held = win.slot_of.get(&r).map_or(0, |&s| win.caches[s].len());
            let end = fresh.get(&r).map_or(held + 1, |&n| n.max(held));
            let e = ends.entry(r).or_insert(0);
            *e = (*e).max(end);
        }
        for t in tokens {
            if let Some(e) = ends.get_mut(&t.request) {
                *e = (*e).max(t.pos as usize + 1);
            }
        }
        let mut kv: u64 = self
            .windows
            .iter()
            .flat_map(|x| &x.caches)
            .map(|c| c.bytes() as u64)
            .sum();
        for (r, &end) in &ends {
            let cap = win.slot_of.get(r).map_or(0, |&s| win.caches[s].capacity()) as u64;
            kv += kvpressure::blocks(end).saturating_sub(cap) * per_position;
        }
        let mut sequences: HashSet<u64> = ends.into_keys().collect();
        for x in &self.windows {
            sequences.extend(x.slot_of.keys().copied());
        }
        (kv, sequences.len())
    }

    fn run_window(&mut self, w: usize, mut hops: Vec<Queued>, held: Option<&mut Held>) {
        let n_embd = self.layout.n_embd;
        for q in hops.iter_mut() {
            drop_released(&self.released.0, q, n_embd);
        }
        // A micro-batch whose sequences all ended still passes on, empty:
        // the windows after this one learn from it that its step went by.
        let (emptied, hops): (Vec<Queued>, Vec<Queued>) =
            hops.into_iter().partition(|q| q.hop.tokens.is_empty());
        self.pass_empty(w, emptied);
        let mut next = HashMap::new();
        let mut good = Vec::with_capacity(hops.len());
        for q in hops {
            match self.admit(w, &q.hop, &mut next) {
                Ok(()) => good.push(q),
                Err(reason) => {
                    RingStats::add(&self.stats.bad, 1);
                    let requests = requests_of(&q.hop.tokens);
                    self.fail(requests, format!("window {}: {reason}", q.hop.window));
                    let mut marker = q;
                    marker.hop.tokens.clear();
                    marker.hidden.clear();
                    self.pass_empty(w, vec![marker]);
                }
            }
        }
        self.batch.clear();
        self.input.clear();
        self.want.clear();
        let win = &self.windows[w];
        let first = win.index == 0;
        for q in &good {
            for t in &q.hop.tokens {
                if win.last && t.want {
                    self.want.push(self.batch.len());
                }
                self.batch.push(TokenIn {
                    id: t.id,
                    seq: win.slot_of[&t.request],
                    pos: t.pos as usize,
                });
            }
            if !first {
                self.input.extend_from_slice(&q.hidden);
            }
        }
        if good.is_empty() {
            if win.streams && held.is_none() {
                skip_window(self.streamer.as_mut(), &win.units);
            }
            return;
        }
        let input = if first {
            WindowInput::Embed
        } else {
            WindowInput::Hidden(&self.input)
        };
        let win = &mut self.windows[w];
        let (index, last) = (win.index, win.last);
        let mut exec = Exec {
            model: &self.model,
            pool: &self.pool,
            scratch: &mut self.scratch,
            streamer: self.streamer.as_mut(),
            compute_factor: self.compute_factor,
        };
        let r = match held {
            Some(held) => exec.run_held(
                &win.units,
                input,
                &self.batch,
                &mut win.caches,
                &self.want,
                &mut self.logits,
                held,
            ),
            None => exec.run(
                &win.units,
                input,
                &self.batch,
                &mut win.caches,
                &self.want,
                &mut self.logits,
            ),
        };
        RingStats::add(&self.stats.window_runs, 1);
        RingStats::add(&self.stats.tokens, self.batch.len() as u64);
        if let Err(e) = r {
            let tokens: Vec<TokenMeta> = good.iter().flat_map(|q| q.hop.tokens.clone()).collect();
            self.fail(requests_of(&tokens), format!("window {index}: {e}"));
            return;
        }
        if last {
            self.sample(&good);
        } else {
            self.hand_on(index, &good, n_embd);
        }
    }

    /// Hands empty micro-batches on to the next window (none after the
    /// last: the head learns of ended requests from their release).
    fn pass_empty(&mut self, w: usize, emptied: Vec<Queued>) {
        let index = self.windows[w].index;
        if self.windows[w].last {
            return;
        }
        for q in emptied {
            RingStats::add(&self.stats.empty_passes, 1);
            self.forward(index + 1, q.hop, q.arrived, None);
        }
    }

    /// Sends each micro-batch that ran with its activations to the next
    /// window: they stay the step's micro-batches.
    fn hand_on(&mut self, index: u16, good: &[Queued], n_embd: usize) {
        let total: usize = good.iter().map(|q| q.hop.tokens.len()).sum();
        let all = self.scratch.hidden(total, n_embd)[..total * n_embd].to_vec();
        let mut at = 0;
        for q in good {
            let n = q.hop.tokens.len();
            let rows = &all[at * n_embd..(at + n) * n_embd];
            at += n;
            self.forward(index + 1, q.hop.clone(), q.arrived, Some((rows, n_embd)));
        }
    }

    /// Hands `hop` on to window `next`: queued on it when this node holds
    /// it, otherwise sent to its device. `hidden` is the hop's activations
    /// (its rows, and their width), or `None` for an empty hop; the hop is
    /// marked accordingly. `arrived` stays the hop's arrival time.
    fn forward(&mut self, next: u16, hop: Hop, arrived: u64, hidden: Option<(&[f32], usize)>) {
        let hop = Hop {
            window: next,
            hidden: hidden.is_some(),
            ..hop
        };
        let device = self.layout.windows[next as usize].0;
        if device == self.me {
            let local = self.layout.local[&next];
            let queued = Queued {
                hop,
                hidden: hidden.map_or_else(Vec::new, |(rows, _)| rows.to_vec()),
                _hold: None,
                arrived,
            };
            self.queue(local, queued);
        } else {
            let tensor = hidden.map(|(rows, n_embd)| {
                let n = hop.tokens.len();
                let h = wire::tensor_header(self.layout.epoch, hop.micro_batch, next, n, n_embd);
                (h, rows)
            });
            self.send(
                device,
                &Msg::Hop(hop),
                tensor.as_ref().map(|(h, rows)| (h, *rows)),
            );
        }
    }

    /// Samples the wanted tokens of the micro-batches that ran (greedily,
    /// or with the request's sampler) and sends them, with any logits asked
    /// for, to the head: one message per micro-batch.
    fn sample(&mut self, good: &[Queued]) {
        let n_vocab = self.layout.n_vocab;
        for &(request, s) in good.iter().flat_map(|q| &q.hop.sampling) {
            match tail_sampler(s, n_vocab) {
                Some(sampler) => {
                    self.samplers.insert(request, sampler);
                }
                None => log::warn!("request {request}: sampling {s:?} refused; greedy"),
            }
        }
        let mut row = 0;
        for q in good {
            let mut rows: Vec<f32> = Vec::new();
            let mut picks = Vec::new();
            for t in q.hop.tokens.iter().filter(|t| t.want) {
                let l = &self.logits[row * n_vocab..(row + 1) * n_vocab];
                row += 1;
                let token = match self.samplers.get_mut(&t.request) {
                    Some(s) => s.sample(l, &[]),
                    None => argmax(l),
                };
                picks.push(Pick {
                    request: t.request,
                    pos: t.pos,
                    token,
                    logits: t.logits,
                });
                if t.logits {
                    rows.extend_from_slice(l);
                }
            }
            if picks.is_empty() {
                continue;
            }
            let sampled = Sampled {
                epoch: self.layout.epoch,
                micro_batch: q.hop.micro_batch,
                picks,
            };
            if self.layout.head == self.me {
                self.on_sampled(sampled, &rows);
                self.pump();
            } else {
                let n_rows = sampled.logits_rows();
                let h = wire::tensor_header(
                    self.layout.epoch,
                    sampled.micro_batch,
                    q.hop.window,
                    n_rows,
                    n_vocab,
                );
                let tensor = (n_rows > 0).then_some((&h, &rows[..]));
                self.send(self.layout.head, &Msg::Sampled(sampled), tensor);
            }
        }
    }
}

/// Sets which windows stream units, and which can hold them for a whole
/// visit (their streamed units fit in the streamer's slots at once).
fn refresh_holds(windows: &mut [LocalWindow], streamer: Option<&Streamer>) {
    for w in windows {
        let n = streamer.map_or(0, |st| w.units.iter().filter(|&&u| st.streams(u)).count());
        w.streams = n > 0;
        w.holds = streamer.is_none_or(|st| n <= st.slots());
    }
}

/// Learns the new prompts of `hop`'s step from it, when that step is
/// `from` (the node's step) or later and not known yet.
fn learn_fresh(fresh: &mut HashMap<u64, Vec<u64>>, from: u64, hop: &Hop) {
    if hop.step >= from && !fresh.contains_key(&hop.step) {
        fresh.insert(hop.step, hop.fresh.clone());
    }
}

/// The requests a hop's tokens belong to, each once.
pub(super) fn requests_of(tokens: &[TokenMeta]) -> Vec<u64> {
    let mut r: Vec<u64> = tokens.iter().map(|t| t.request).collect();
    r.sort_unstable();
    r.dedup();
    r
}

/// Removes from a queued hop the tokens (and their activations) of
/// requests that have ended: a micro-batch in flight when one of its
/// requests failed still carries the others.
fn drop_released(released: &HashSet<u64>, q: &mut Queued, n_embd: usize) {
    if !q.hop.tokens.iter().any(|t| released.contains(&t.request)) {
        return;
    }
    let mut kept = Vec::with_capacity(q.hop.tokens.len());
    let mut hidden = Vec::new();
    for (i, t) in q.hop.tokens.iter().enumerate() {
        if released.contains(&t.request) {
            continue;
        }
        kept.push(*t);
        if let Some(row) = q.hidden.get(i * n_embd..(i + 1) * n_embd) {
            hidden.extend_from_slice(row);
        }
    }
    q.hop.tokens = kept;
    q.hidden = hidden;
}

/// The sampler a request's [`TailSampling`] asks for, at the draw its next
/// token makes; `None` for parameters no sampler takes (the entry node
/// checked them, so only a bad frame gets here: that request is then
/// sampled greedily rather than failing the node).
fn tail_sampler(s: TailSampling, n_vocab: usize) -> Option<Sampler> {
    let params = SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        seed: Some(s.seed),
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, n_vocab).ok()?;
    sampler.resume_at(s.drawn);
    Some(sampler)
}
