//! The ring runtime: the devices of a plan run the model together
//! (DESIGN.md §1 step 6, §5, §7).
//!
//! Each node runs its windows on one dedicated compute thread (never a
//! tokio worker) with the [window executor](crate::engine::window). Work
//! travels in micro-batches: a prefill chunk of one prompt, or the decoding
//! sequences whose tokens came back together. A micro-batch's activations
//! go to the next window's node as a control message and one tensor frame
//! over QUIC; the node of the last window samples (greedy) and sends the
//! tokens to the head, the node of the first window, which takes requests,
//! embeds, and sends each next token round again. Many micro-batches are in
//! flight at once, so every node has work.
//!
//! # A node's compute loop
//!
//! Work goes round in numbered steps (see the head's module): a step moves
//! every sequence in the ring through every window once, in a few
//! micro-batches (a prompt chunk each, or the plan's decode groups), as
//! the simulator plays a plan (`crate::plan`). A node runs the steps in
//! order, and in each step visits its windows in plan order; a visit runs
//! the step's micro-batches one by one as they arrive and hands each on at
//! once, so that the next node can start on it. The window's streamed
//! units come from the node's one streamer, which loads them in this
//! cyclic order (prefetching the next window's units while this one
//! computes): a visit takes them once and holds them until the step's
//! last micro-batch has run, so each streamed unit is read once per step
//! whatever the micro-batching. When a window streams more units than the
//! streamer has slots, the visit waits for all of the step's micro-batches
//! and runs them as one batch instead (the simulator's "unit by unit"
//! order). A visit knows it is complete when every sequence that passed
//! the window in the last step, and every prompt that starts in this one,
//! has passed it or ended. Batching changes no bits: every product reduces
//! each (row, token) the same way whatever the batch (DESIGN.md §2).

//! # Exactness
//!
//! A sequence's logits depend only on its tokens: windows run the same
//! per-unit code as a single node, activations cross the wire as raw f32,
//! and prompts are cut into chunks by the prompt alone. `tests/ring.rs`
//! compares the logits' bits with the single-node engine.
//!
//! # Figures
//!
//! Each node measures itself in [`RingStats`]: the compute thread sets
//! KV used and held, its loading bubbles and when its oldest unfinished
//! input arrived (the backlog) between window runs, and each sender task
//! adds the bytes it writes to its link; atomics only, read by
//! [`RingStats::snapshot`]. The shell gossips them (`cluster::stats`).
//!
//! # Bad input
//!
//! Every message is checked against the plan (window, epoch, shape, the
//! sequence's next position). A message from another plan epoch is dropped
//! and counted ([`RingStats::stale`]). Activations of the wrong shape, or
//! anything else malformed, reset that stream; the requests it names fail
//! with an error and the node goes on serving.

pub mod bench;
pub mod demo;
pub mod emulation;
mod head;
pub mod kvpressure;
mod node;
mod transport;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::engine::EngineError;
use crate::net::emulated::LinkEmulation;
use crate::net::quic::Endpoint;
use crate::net::NodeId;
use crate::plan::Plan;

pub use head::{RequestHandle, RingOutput, RingRequest};
pub use kvpressure::KvPressure;
pub use transport::Acceptor;

#[derive(Debug, Error)]
pub enum RingError {
    #[error("plan: {0}")]
    Plan(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("bad request: {0}")]
    Request(String),
    #[error("request failed in the ring: {0}")]
    Failed(String),
    #[error("this node does not hold the first window; send requests to ring node {head}")]
    NotHead { head: usize },
    #[error("the ring runtime stopped")]
    Stopped,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("starting the compute thread: {0}")]
    Thread(std::io::Error),
}

/// One member of the ring: its node id and QUIC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: NodeId,
    pub addr: SocketAddr,
}

/// What a node needs to run its part of a plan.
#[derive(Clone, Debug)]
pub struct RingConfig {
    pub plan: Plan,
    /// This node's index in `plan.ring`.
    pub me: usize,
    /// Every ring member, in ring order (this node included).
    pub peers: Vec<Peer>,
    pub model: PathBuf,
    /// Compute threads.
    pub threads: usize,
    /// Emulated links from this node, by destination ring index (none
    /// where absent).
    pub links: Vec<Option<LinkEmulation>>,
    /// An emulated link to every peer that may change while the ring runs
    /// (over `links`; the test knob `LOIP_TEST_LINK_FILE` under `loip run`).
    pub live_link: Option<tokio::sync::watch::Receiver<Option<LinkEmulation>>>,
    /// Emulated slower storage and compute (benchmarks and tests only).
    pub emulation: emulation::Emulation,
    /// This node's memory budget, under which it adapts its resident set
    /// to the KV it holds ([`kvpressure`]); `None`: the plan's placement
    /// as it is, and no limit on the KV it holds.
    pub kv_pressure: Option<KvPressure>,
}

impl RingConfig {
    pub fn new(plan: Plan, me: usize, peers: Vec<Peer>, model: PathBuf) -> RingConfig {
        RingConfig {
            plan,
            me,
            peers,
            model,
            threads: 1,
            links: Vec::new(),
            live_link: None,
            emulation: emulation::Emulation::default(),
            kv_pressure: None,
        }
    }

    /// Ring index of the node that holds the first window.
    pub fn head(&self) -> usize {
        self.plan.windows.first().map_or(0, |w| w.device)
    }
}

/// Counters and gauges of one node, shared with its tasks. The compute
/// thread and the sender tasks only store and add (no lock, no
/// allocation); [`RingStats::snapshot`] reads them.
#[derive(Debug, Default)]
pub struct RingStats {
    /// Messages from another plan epoch, dropped.
    pub stale: AtomicU64,
    /// Malformed messages or frames; each reset its stream.
    pub bad: AtomicU64,
    /// Window runs, and tokens through them.
    pub window_runs: AtomicU64,
    pub tokens: AtomicU64,
    /// Visits that passed over a streamed window with nothing queued.
    pub streamed_skips: AtomicU64,
    /// Messages sent, and their bytes.
    pub sent: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// KV cache bytes the filled positions take, and bytes the caches
    /// hold (gauges, set by the compute thread between window runs).
    pub kv_used_bytes: AtomicU64,
    pub kv_capacity_bytes: AtomicU64,
    /// Resident weights and streaming slots, bytes (set once at start).
    pub weights_bytes: AtomicU64,
    /// Loading bubbles: waits of compute for a streamed unit, and their
    /// total time in microseconds (from the streamer, set between runs).
    pub bubbles: AtomicU64,
    pub bubble_us: AtomicU64,
    /// When the oldest input that reached the compute thread and is not
    /// finished arrived, on [`clock_us`]; 0 when there is none.
    pub oldest_input_us: AtomicU64,
    /// KV pressure ([`kvpressure`]): units demoted and promoted (counters),
    /// units demoted now, the positions of KV the node can hold after
    /// demoting all it can (0: no budget), and its memory budget (0: none).
    pub demotions: AtomicU64,
    pub promotions: AtomicU64,
    pub demoted_units: AtomicU64,
    pub kv_positions: AtomicU64,
    pub memory_budget_bytes: AtomicU64,
    /// On the head: requests waiting for KV room now, and requests that
    /// waited (counter).
    pub kv_waiting: AtomicU64,
    pub kv_waited: AtomicU64,
    /// Bytes written to each ring member, by ring index (the sender tasks
    /// add them once a message is on its stream).
    pub link_bytes: Box<[AtomicU64]>,
    /// Micro-batches passed on empty, their sequences having ended on the
    /// way (so that later windows see their step go by).
    pub empty_passes: AtomicU64,
    /// Window visits that stopped waiting for the rest of their step.
    pub step_give_ups: AtomicU64,
}

/// A snapshot of [`RingStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RingCounts {
    pub stale: u64,
    pub bad: u64,
    pub window_runs: u64,
    pub tokens: u64,
    pub streamed_skips: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    #[serde(default)]
    pub kv_used_bytes: u64,
    #[serde(default)]
    pub kv_capacity_bytes: u64,
    #[serde(default)]
    pub weights_bytes: u64,
    #[serde(default)]
    pub bubbles: u64,
    #[serde(default)]
    pub bubble_us: u64,
    /// Age of the oldest input not finished, in milliseconds (0 when
    /// idle).
    #[serde(default)]
    pub backlog_ms: u64,
    #[serde(default)]
    pub empty_passes: u64,
    #[serde(default)]
    pub step_give_ups: u64,
    #[serde(default)]
    pub demotions: u64,
    #[serde(default)]
    pub promotions: u64,
    #[serde(default)]
    pub demoted_units: u64,
    #[serde(default)]
    pub kv_positions: u64,
    #[serde(default)]
    pub memory_budget_bytes: u64,
    #[serde(default)]
    pub kv_waiting: u64,
    #[serde(default)]
    pub kv_waited: u64,
}

impl RingStats {
    /// Counters for a ring of `members` nodes.
    pub fn new(members: usize) -> RingStats {
        RingStats {
            link_bytes: (0..members).map(|_| AtomicU64::new(0)).collect(),
            ..RingStats::default()
        }
    }

    pub fn snapshot(&self) -> RingCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let oldest = g(&self.oldest_input_us);
        RingCounts {
            stale: g(&self.stale),
            bad: g(&self.bad),
            window_runs: g(&self.window_runs),
            tokens: g(&self.tokens),
            streamed_skips: g(&self.streamed_skips),
            sent: g(&self.sent),
            sent_bytes: g(&self.sent_bytes),
            kv_used_bytes: g(&self.kv_used_bytes),
            kv_capacity_bytes: g(&self.kv_capacity_bytes),
            weights_bytes: g(&self.weights_bytes),
            bubbles: g(&self.bubbles),
            bubble_us: g(&self.bubble_us),
            backlog_ms: match oldest {
                0 => 0,
                t => clock_us().saturating_sub(t) / 1000,
            },
            empty_passes: g(&self.empty_passes),
            step_give_ups: g(&self.step_give_ups),
            demotions: g(&self.demotions),
            promotions: g(&self.promotions),
            demoted_units: g(&self.demoted_units),
            kv_positions: g(&self.kv_positions),
            memory_budget_bytes: g(&self.memory_budget_bytes),
            kv_waiting: g(&self.kv_waiting),
            kv_waited: g(&self.kv_waited),
        }
    }

    /// Bytes written to each ring member so far, by ring index.
    pub fn link_bytes(&self) -> Vec<u64> {
        self.link_bytes
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    pub(crate) fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set(a: &AtomicU64, v: u64) {
        a.store(v, Ordering::Relaxed);
    }
}

/// Microseconds on a monotonic clock shared by the whole process, never 0
/// (so that 0 can mean "none").
pub fn clock_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
        + 1
}

/// A running ring node: its compute thread and its network tasks.
pub struct RingNode {
    inbox: std::sync::mpsc::Sender<node::Input>,
    thread: Option<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    endpoint: Endpoint,
    /// The acceptor this node started on its own endpoint (`None` when it
    /// shares a longer-lived one's).
    acceptor: Option<Acceptor>,
    stats: Arc<RingStats>,
    /// Ring members' ids, in ring order.
    members: Vec<NodeId>,
    /// This node's windows in the plan.
    local_windows: usize,
    /// The plan's KV budget for this node.
    kv_budget_bytes: u64,
    head: usize,
    me: usize,
    epoch: u64,
}

impl RingNode {
    /// Loads this node's windows of the plan (resident units into memory,
    /// a streamer for the streamed ones), starts its compute thread, and
    /// links it to the other members over `endpoint`, which it accepts on
    /// and closes when it stops. Network tasks run on `rt`.
    pub fn start(
        config: RingConfig,
        endpoint: Endpoint,
        rt: &tokio::runtime::Handle,
    ) -> Result<RingNode, RingError> {
        let acceptor = Acceptor::start(&endpoint, rt);
        let mut node = RingNode::start_shared(config, endpoint, &acceptor, rt)?;
        node.acceptor = Some(acceptor);
        Ok(node)
    }

    /// As [`RingNode::start`] on an endpoint that outlives this ring (one
    /// ring per plan epoch, one after the other): `acceptor` hands this
    /// ring the messages of its epoch from now on, and the endpoint stays
    /// open when it stops.
    pub fn start_shared(
        config: RingConfig,
        endpoint: Endpoint,
        acceptor: &Acceptor,
        rt: &tokio::runtime::Handle,
    ) -> Result<RingNode, RingError> {
        let layout = node::Layout::check(&config)?;
        let stats = Arc::new(RingStats::new(config.peers.len()));
        let (inbox_tx, inbox_rx) = std::sync::mpsc::channel();
        let compute = {
            let (outs, tasks) = transport::start_senders(&config, &endpoint, &inbox_tx, &stats, rt);
            match node::Compute::open(&config, layout.clone(), outs, stats.clone()) {
                Ok(c) => (c, tasks),
                Err(e) => {
                    tasks.iter().for_each(|t| t.abort());
                    return Err(e);
                }
            }
        };
        let (compute, tasks) = compute;
        let thread = std::thread::Builder::new()
            .name(format!("loip-ring-{}", config.me))
            .spawn(move || compute.run(inbox_rx))
            .map_err(RingError::Thread)?;
        acceptor.publish(Arc::new(transport::Check::new(
            &config,
            layout,
            inbox_tx.clone(),
            stats.clone(),
        )));
        Ok(RingNode {
            inbox: inbox_tx,
            thread: Some(thread),
            tasks,
            endpoint,
            acceptor: None,
            stats,
            members: config.peers.iter().map(|p| p.id).collect(),
            local_windows: config
                .plan
                .windows
                .iter()
                .filter(|w| w.device == config.me)
                .count(),
            kv_budget_bytes: config
                .plan
                .kv_budget_bytes
                .get(config.me)
                .copied()
                .unwrap_or(0),
            head: config.head(),
            me: config.me,
            epoch: config.plan.epoch,
        })
    }

    /// Submits a request; only the head node (the first window's) takes
    /// them.
    pub fn submit(&self, request: RingRequest) -> Result<RequestHandle, RingError> {
        self.submit_to(request, None)
    }

    /// As [`RingNode::submit`], and each token is also sent to `tokens`
    /// as soon as it is sampled (for streaming to a client).
    pub fn submit_streaming(
        &self,
        request: RingRequest,
        tokens: tokio::sync::mpsc::UnboundedSender<u32>,
    ) -> Result<RequestHandle, RingError> {
        self.submit_to(request, Some(tokens))
    }

    fn submit_to(
        &self,
        request: RingRequest,
        sink: Option<tokio::sync::mpsc::UnboundedSender<u32>>,
    ) -> Result<RequestHandle, RingError> {
        if self.me != self.head {
            return Err(RingError::NotHead { head: self.head });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (id_tx, id_rx) = std::sync::mpsc::channel();
        self.inbox
            .send(node::Input::Submit {
                request,
                reply: tx,
                id: id_tx,
                sink,
            })
            .map_err(|_| RingError::Stopped)?;
        let id = id_rx.recv().map_err(|_| RingError::Stopped)??;
        Ok(RequestHandle::new(id, rx))
    }

    /// Ends request `id` (it answers with an error): its sequence leaves
    /// the ring at the next step. Unknown or ended ids are ignored.
    pub fn cancel(&self, id: u64) {
        let _ = self.inbox.send(node::Input::Cancel(id));
    }

    /// Asks the compute thread to stop after the step it is running (the
    /// requests in flight end with [`RingError::Stopped`]); returns at
    /// once. Dropping the node then joins the thread and ends its tasks.
    pub fn halt(&self) {
        let _ = self.inbox.send(node::Input::Stop);
    }

    /// The plan epoch this ring runs.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether this node holds the first window and takes requests.
    pub fn is_head(&self) -> bool {
        self.me == self.head
    }

    pub fn stats(&self) -> RingCounts {
        self.stats.snapshot()
    }

    /// Bytes this node wrote to each other ring member, by its id.
    pub fn link_bytes(&self) -> Vec<(NodeId, u64)> {
        self.members
            .iter()
            .zip(self.stats.link_bytes())
            .enumerate()
            .filter(|&(i, _)| i != self.me)
            .map(|(_, (&id, b))| (id, b))
            .collect()
    }

    /// This node's windows in the plan it runs.
    pub fn local_windows(&self) -> usize {
        self.local_windows
    }

    /// The plan's KV budget for this node, bytes.
    pub fn kv_budget_bytes(&self) -> u64 {
        self.kv_budget_bytes
    }

    /// Stops the compute thread (requests in flight end with
    /// [`RingError::Stopped`]) and the network tasks.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.inbox.send(node::Input::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if self.acceptor.take().is_some() {
            self.endpoint.close();
        }
    }
}

impl Drop for RingNode {
    fn drop(&mut self) {
        self.stop();
    }
}
