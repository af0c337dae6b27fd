//! The async shell around the membership state machine (STYLE.md, habit 7):
//! it owns the QUIC endpoint, the peer connections, the clock and the disk,
//! and feeds the machine events and carries out its actions.
//!
//! # Peers
//!
//! Static peers (`--peer host:port`) are dialled with any cluster
//! certificate accepted and the id read from it; peers learned from other
//! nodes' gossip are dialled with the id they were announced under, so a
//! false announcement fails the handshake. Each side of a connection opens
//! one stream for its own control frames and serves the other side's. When
//! a peer has several connections (both dialled at once, or it restarted)
//! the newest carries what we send and the others serve until they close or
//! idle out. Outgoing frames wait in a bounded
//! queue per peer; when it is full they are dropped (the protocol tolerates
//! loss), so a slow peer cannot grow memory.
//!
//! # Disk
//!
//! The node id and the membership state live in the sled database of the
//! data directory ([`NodeState`]). [`Action::Persist`] is written and
//! flushed there before any later action runs, so a term or vote is on
//! disk before any message that depends on it is sent.
//!
//! # Discovery
//!
//! Unless disabled, the node announces itself and browses over mDNS
//! ([`super::discovery`]). A peer found that way is only a candidate: it is
//! dialled with the id it announced, and it enters the address book (and
//! the gossip) only once the handshake proved that id.
//!
//! # Status
//!
//! A Unix socket `loip.sock` in the data directory answers each connection
//! with one JSON [`NodeStatus`] line (`loip status`).
//!
//! # Plans
//!
//! Every node sends its [`NodeReport`] (device profile, memory budget,
//! model digest) to each peer when a connection opens and with each gossip
//! round. For [`Action::ComputePlan`] the leader probes its links to the
//! members ([`fetch::probe_link`]), runs the scheduler off the async
//! workers ([`dist::make_plan`]) and answers with the encoded
//! [`PlanBody`]. For [`Action::Prepare`] a node prepares its windows
//! ([`prepare::prepare`], fetching missing tensors from peers) and answers
//! with the outcome; the body of the committed epoch gives `loip status`
//! its windows. A node with a model file runs with score 1, one without
//! with score 0, so the leader is a node that can plan when there is one.
//!
//! The body of the plan a node prepared is written (temporary name, fsync,
//! rename) to `plan-pending.bin` before the node acknowledges it, and that
//! of the committed plan to `plan-committed.bin`, so that a node restarted
//! on the same epoch still knows its windows ([`BodyFile`]).
//!
//! Out-of-epoch control frames (a plan proposal or a fetch request for an
//! epoch older than the committed one) are dropped and counted; control
//! frames that do not decode reset their stream and are counted
//! ([`FrameCounters`]).
//!
//! Test knobs (environment): `LOIP_TEST_PREPARE_DELAY_MS` delays each
//! preparation; `LOIP_TEST_REPORT_DELAY_MS` holds back this node's report
//! for that long after it starts (a report that arrives after the plan);
//! `LOIP_TEST_FETCH_STALL_MS` sets the fetch stall timeout;
//! `LOIP_TEST_CORRUPT_SERVE` and `LOIP_TEST_STALL_SERVE` make a node serve
//! bad tensors ([`fetch::ServeKnobs`]).

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::client::{self, ClientLimits, ClusterClient, RemoteEvent, RemoteRequest, RingView};
use super::config::{resolve_peer, RunConfig};
use super::discovery::{self, DiscoveryConfig, Found};
use super::dist::{self, NodeReport, PlanBody, WindowStatus};
use super::fetch::{self, FetchLimits, FetchRequest, LocalModel, Probe, ServeKnobs, Server};
use super::fitness::Fitness;
use super::linkwatch::{self, LinkSample, LinkWatch, ReplanGate, StoredLink};
use super::membership::{Action, Config, Epoch, Event, Msg, Node, NodeConfig, Status, Timing};
use super::prepare::{self, PrepareSpec};
use super::ring::{Acceptor, KvPressure, Peer, RingConfig, RingNode};
use super::state::NodeState;
use super::stats::{Carried, NodeStats, PeerStats, Rate, StatsBook};
use crate::net::frame::{self, Frame, FrameError};
use crate::net::identity::{self, IdOrigin, IdentityError, NodeIdentity};
use crate::net::quic::{self, Endpoint, Handled, Limits, NetError, PeerConnection};
use crate::net::NodeId;
use crate::plan::{DeviceProfile, Link as NetLink};
use crate::store::Tree;

/// Most peers kept in the address book.
pub const MAX_ADDRESSES: usize = 64;
/// Frames queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 256;
const TICK: Duration = Duration::from_millis(50);
/// How long a committed epoch's ring waits for a member's ring address
/// (its Hello) before the node reports that it has no ring.
const RING_ADDRESS_WAIT: Duration = Duration::from_secs(10);
const GOSSIP_EVERY: Duration = Duration::from_secs(2);
const REDIAL_AFTER: Duration = Duration::from_secs(2);
/// Link measurements are reused for this long.
const LINK_FRESH: Duration = Duration::from_secs(60);
/// The most a link probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the leader probes its members' links while a plan runs.
const WATCH_EVERY: Duration = Duration::from_secs(3);
/// Stored link estimates older than this are not resumed.
const STORED_LINKS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// The key of the leader's link estimates in the `links` tree.
const LINKS_KEY: &[u8] = b"estimates";

/// Milliseconds since the Unix epoch (0 before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
/// Plan bodies kept for epochs not yet committed.
const MAX_BODIES: usize = 8;

#[derive(Debug, Error)]
pub enum ShellError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{}: {message}", path.display())]
    State { path: PathBuf, message: String },
    #[error(
        "the certificate in {} is for node {cert}, but this device is node {device} \
         (its id was remade because the hardware changed): provision a certificate \
         with `loip provision node --id {device}`",
        dir.display()
    )]
    WrongCertificate {
        dir: PathBuf,
        cert: NodeId,
        device: NodeId,
    },
    #[error("status socket {}: {source}", path.display())]
    Status {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model {}: {message}", path.display())]
    Model { path: PathBuf, message: String },
    #[error("device: {0}")]
    Device(String),
}

/// Messages between shells, in control frames.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Wire {
    /// First frame on a connection: the port the sender listens on, and a
    /// random number per process (two processes with one id differ in it).
    Hello {
        listen_port: u16,
        instance: u64,
        /// The port of the sender's ring endpoint (same address).
        ring_port: u16,
    },
    Membership(Msg),
    /// Peers the sender knows, for the receiver to dial.
    Peers(Vec<(NodeId, SocketAddr)>),
    /// The sender's device, budget and model, for the leader's planning.
    Report(Box<NodeReport>),
    /// The first frame of a tensor fetch stream ([`fetch`]).
    Fetch(FetchRequest),
    /// Link probes, answered on the same stream.
    Probe(Probe),
    /// The first frame of a stream that forwards a generation request to
    /// the head ([`client`]).
    Generate(RemoteRequest),
    /// The head's answers on such a stream.
    Generated(RemoteEvent),
    /// The sender's serving figures, with each gossip round ([`super::stats`]).
    /// Added in loip/2; new variants go after it, so that the tags of the
    /// others stay.
    Stats(Box<NodeStats>),
}

/// Frames a node dropped or refused, for `loip status`.
#[derive(Debug, Default)]
pub struct FrameCounters {
    /// Control frames that did not decode (their stream was reset).
    pub malformed: AtomicU64,
    /// Control frames for an epoch older than the committed one.
    pub out_of_epoch: AtomicU64,
}

/// What the connection handlers share with the main loop.
struct Shared {
    server: Server,
    /// The committed plan as requests see it.
    view: watch::Receiver<RingView>,
    committed: AtomicU64,
    counters: FrameCounters,
}

/// This node's part of the committed plan, for `loip status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStatus {
    /// The epoch whose body this is.
    pub epoch: Epoch,
    /// Units in the model (decoder layers, then the head).
    pub n_units: u32,
    /// Nodes in ring order.
    pub ring: Vec<NodeId>,
    /// This node's windows.
    pub windows: Vec<WindowStatus>,
    /// Every node's windows, in ring order.
    #[serde(default)]
    pub ring_windows: Vec<Vec<WindowStatus>>,
    /// Streaming slots per device.
    pub slots: u32,
    /// Why the plan has no windows, when it has none.
    pub note: Option<String>,
    /// Where this node reads its fetched tensors from.
    pub shard: Option<PathBuf>,
    /// Members that asked to hold no windows (`cluster::fitness`), and why.
    #[serde(default)]
    pub unfit: Vec<(NodeId, String)>,
    /// Whether they hold windows all the same: the others cannot hold the
    /// model without them.
    #[serde(default)]
    pub kept_unfit: bool,
    /// The members whose reports the plan was made with; the leader plans
    /// again once a member missing here reports.
    #[serde(default)]
    pub planned_with: Vec<NodeId>,
}

/// What `loip status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub listen: SocketAddr,
    /// Where this node's ring endpoint listens (kept across restarts).
    #[serde(default)]
    pub ring_listen: Option<SocketAddr>,
    pub membership: Status,
    /// Connected peers and their addresses.
    pub connected: Vec<(NodeId, SocketAddr)>,
    /// This node's windows in the committed plan, as text
    /// ([`dist::window_text`]); [`NodeStatus::plan`] has them as data.
    pub windows: Vec<String>,
    /// Another process presents this node's id (a copied identity): its
    /// address.
    pub duplicate_id: Option<SocketAddr>,
    /// What mDNS discovery has done; `None` when it is off.
    #[serde(default)]
    pub discovery: Option<discovery::DiscoveryStats>,
    /// The committed plan's body as it concerns this node.
    #[serde(default)]
    pub plan: Option<PlanStatus>,
    /// Control frames that did not decode.
    #[serde(default)]
    pub malformed_frames: u64,
    /// Control frames dropped for an old epoch.
    #[serde(default)]
    pub out_of_epoch_frames: u64,
    /// The last preparation that failed, and why.
    #[serde(default)]
    pub prepare_error: Option<String>,
    /// Links this node measured (as leader), with their age in seconds.
    #[serde(default)]
    pub links: Vec<LinkStatus>,
    /// This node's ring, when one runs.
    #[serde(default)]
    pub ring: Option<RingStatus>,
    /// Why the committed plan's ring did not start here.
    #[serde(default)]
    pub ring_error: Option<String>,
    /// The serving figures of this node and of each peer that sent them
    /// recently, by node id ([`super::stats`]).
    #[serde(default)]
    pub stats: Vec<PeerStats>,
}

/// This node's ring, for `loip status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingStatus {
    /// The plan epoch it runs.
    pub epoch: Epoch,
    /// It holds the first window and takes requests.
    pub head: bool,
    pub counts: crate::cluster::ring::RingCounts,
}

/// A measured link, for `loip status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub peer: NodeId,
    pub bandwidth_bps: f64,
    pub latency_s: f64,
    pub age_s: f64,
}

/// A plan body on disk, with its epoch.
#[derive(Debug, Clone)]
pub struct BodyFile {
    pub path: PathBuf,
}

impl BodyFile {
    /// The stored body if it is for `epoch` and decodes; anything else is
    /// ignored (it is only a cache of what the leader sent).
    pub fn load(&self, epoch: Epoch) -> Option<PlanBody> {
        let bytes = fs::read(&self.path).ok()?;
        let (e, body): (Epoch, Vec<u8>) = postcard::from_bytes(&bytes).ok()?;
        (e == epoch).then(|| PlanBody::decode(&body).ok()).flatten()
    }

    /// Durable when it returns.
    pub fn save(&self, epoch: Epoch, body: &PlanBody) -> Result<(), ShellError> {
        let err = |message: String| ShellError::State {
            path: self.path.clone(),
            message,
        };
        let bytes = postcard::to_stdvec(&(epoch, body.encode())).map_err(|e| err(e.to_string()))?;
        crate::store::atomic::write(&self.path, &bytes, 0o600).map_err(|e| err(e.to_string()))
    }
}

enum ShellEvent {
    Connected {
        peer: PeerConnection,
        out: mpsc::Sender<Vec<u8>>,
    },
    Closed {
        id: NodeId,
        stable_id: usize,
    },
    Inbound {
        from: NodeId,
        addr: SocketAddr,
        wire: Wire,
    },
    PlanComputed {
        epoch: Epoch,
        body: Vec<u8>,
    },
    Prepared {
        epoch: Epoch,
        result: Result<prepare::Prepared, String>,
    },
    Measured(Vec<(NodeId, NetLink)>),
    /// The leader's periodic probes (`None`: the probe failed).
    LinkSamples(Vec<(NodeId, Option<LinkSample>, Instant)>),
    /// The predicted gain of re-planning the epoch under the links now.
    Gain {
        epoch: Epoch,
        gain: Option<f64>,
    },
    /// A ring was started (or not) for a committed epoch.
    RingStarted {
        epoch: Epoch,
        result: Result<Box<RingNode>, String>,
    },
}

/// What a node says first on each connection.
#[derive(Clone, Copy, Debug)]
struct Hello {
    listen_port: u16,
    instance: u64,
    ring_port: u16,
}

struct Link {
    conn: quinn::Connection,
    out: mpsc::Sender<Vec<u8>>,
}

/// The address of the socket `loip status` reads.
pub fn status_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("loip.sock")
}

/// Decides the node id (see [`identity::resolve_node_id`]) and checks that
/// the certificate is this device's.
pub fn device_identity(cfg: &RunConfig, state: &mut NodeState) -> Result<NodeIdentity, ShellError> {
    let ident = NodeIdentity::load(&cfg.identity)?;
    let (id, origin) = identity::resolve_node_id(
        state,
        identity::hardware_fingerprint(),
        Some(ident.id),
        identity::random_node_id,
    )?;
    if let IdOrigin::Regenerated { old } = origin {
        log::warn!("hardware changed: node id {old} replaced by {id}");
    }
    if id != ident.id {
        return Err(ShellError::WrongCertificate {
            dir: cfg.identity.clone(),
            cert: ident.id,
            device: id,
        });
    }
    Ok(ident)
}

/// Runs a node until the process ends. `ready` receives the bound address.
/// What a running node hands out once it listens: for `loip run`'s
/// output, readiness, and the HTTP API in front of the cluster.
pub struct Running {
    pub id: NodeId,
    pub listen: SocketAddr,
    /// Sends requests to the cluster from this node.
    pub client: ClusterClient,
    /// The node's view, as `loip status` shows it.
    pub status: watch::Receiver<Option<NodeStatus>>,
}

pub async fn run(cfg: RunConfig, ready: impl FnOnce(Running)) -> Result<(), ShellError> {
    fs::create_dir_all(&cfg.data_dir).map_err(|e| ShellError::State {
        path: cfg.data_dir.clone(),
        message: e.to_string(),
    })?;
    let mut state = NodeState::open(&cfg.data_dir)?;
    let ident = device_identity(&cfg, &mut state)?;
    let me = ident.id;
    let hard = state.load_hard_state()?;
    let local = match &cfg.model {
        Some(path) => Some(Arc::new(LocalModel::open(path).map_err(|e| {
            ShellError::Model {
                path: path.clone(),
                message: e.to_string(),
            }
        })?)),
        None => None,
    };
    let mut report = node_report(&cfg, state.store(), me, local.as_deref())?;
    log::info!(
        "device profile: {} (budget {} MiB)",
        report.device_source,
        report.device.memory_budget_bytes >> 20
    );
    let (view_tx, view_rx) = watch::channel(RingView::default());
    let shared = Arc::new(Shared {
        view: view_rx.clone(),
        server: Server {
            model: local.clone(),
            knobs: ServeKnobs::from_env(),
        },
        committed: AtomicU64::new(hard.committed.epoch),
        counters: FrameCounters::default(),
    });
    let prepare_delay = env_ms("LOIP_TEST_PREPARE_DELAY_MS");
    let report_from = Instant::now() + env_ms("LOIP_TEST_REPORT_DELAY_MS").unwrap_or_default();
    let fetch_limits = FetchLimits {
        stall: env_ms("LOIP_TEST_FETCH_STALL_MS").unwrap_or(FetchLimits::default().stall),
        ..FetchLimits::default()
    };
    let endpoint = Endpoint::bind(cfg.listen, &ident, Limits::default())?;
    let listen = endpoint.local_addr().map_err(|source| NetError::Bind {
        addr: cfg.listen,
        source,
    })?;
    // The ring runs on an endpoint of its own, on a port the node names in
    // its Hello: one acceptor serves the rings of successive epochs.
    let (ring_endpoint, ring_addr) = bind_ring(listen.ip(), &ident, state.store())?;
    let acceptor = Arc::new(Acceptor::start(
        &ring_endpoint,
        &tokio::runtime::Handle::current(),
    ));
    let default_stop = local
        .as_ref()
        .and_then(|m| {
            crate::model::tokenizer::Tokenizer::from_gguf(m.gguf.metadata())
                .ok()
                .map(|t| t.eog_ids().to_vec())
        })
        .unwrap_or_default();
    let cluster_client = ClusterClient::new(
        view_rx.clone(),
        endpoint.clone(),
        default_stop,
        ClientLimits::default(),
    );
    client::serve_ask(&cfg.data_dir, cluster_client.clone()).map_err(|source| {
        ShellError::Status {
            path: client::ask_socket(&cfg.data_dir),
            source,
        }
    })?;

    let start = Instant::now();
    let now_ms = move || start.elapsed().as_millis() as u64;
    let mut seed = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .expect("the system random generator works");
    let node_cfg = NodeConfig {
        id: me,
        // A node that can plan (it has the model) leads first.
        score: u64::from(local.is_some()),
        expect: cfg.expect,
        timing: Timing::default(),
        seed: u64::from_le_bytes(seed),
    };
    let mut node = Node::restore(node_cfg, hard, now_ms());
    let instance = {
        let mut b = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("the system random generator works");
        u64::from_le_bytes(b)
    };
    let hello = Hello {
        listen_port: listen.port(),
        instance,
        ring_port: ring_addr.port(),
    };

    let (events_tx, mut events) = mpsc::channel::<ShellEvent>(1024);
    let (status_tx, status_rx) = watch::channel(None::<NodeStatus>);
    serve_status(&cfg.data_dir, status_rx.clone())?;

    // Incoming connections.
    {
        let endpoint = endpoint.clone();
        let tx = events_tx.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(peer) = endpoint.accept().await {
                attach(&endpoint, peer, hello, tx.clone(), shared.clone()).await;
            }
        });
    }
    // Static peers.
    for p in &cfg.peers {
        let endpoint = endpoint.clone();
        let tx = events_tx.clone();
        let p = p.clone();
        let shared = shared.clone();
        tokio::spawn(async move { dial_static(endpoint, p, hello, tx, shared).await });
    }
    // mDNS: candidates arrive on `found_rx`; `found_tx` lives as long as
    // the loop, so the branch below only waits when discovery is off.
    let (found_tx, mut found_rx) = mpsc::channel::<Found>(64);
    let mdns = cfg
        .mdns
        .then(|| discovery::start(discovery_config(&cfg, &ident, listen), found_tx.clone()));
    ready(Running {
        id: me,
        listen,
        client: cluster_client,
        status: status_rx.clone(),
    });

    let mut links: BTreeMap<NodeId, Link> = BTreeMap::new();
    let mut book: BTreeMap<NodeId, SocketAddr> = BTreeMap::new();
    // Peers found over mDNS and not yet proven by a handshake; dialled
    // once each (discovery offers them again later, at its bounded rate).
    let mut candidates: Vec<Found> = Vec::new();
    let mut last_dial: BTreeMap<NodeId, Instant> = BTreeMap::new();
    let mut last_gossip = Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut queue: VecDeque<Event> = VecDeque::new();
    let mut duplicate: Option<SocketAddr> = None;
    let mut reports: BTreeMap<NodeId, NodeReport> = BTreeMap::new();
    reports.insert(me, report.clone());
    let mut measured: BTreeMap<NodeId, (NetLink, Instant)> = BTreeMap::new();
    // The leader's link estimates (resumed from sled after a restart) and
    // the gate that re-plans when they make another plan clearly better.
    let mut watch = LinkWatch::default();
    let stored: Vec<(NodeId, StoredLink)> = state
        .store()
        .get_json(Tree::Links, LINKS_KEY)
        .unwrap_or_else(|e| {
            log::warn!("stored link estimates: {e}");
            None
        })
        .unwrap_or_default();
    for (id, l) in &stored {
        watch.seed(*id, l, unix_ms(), STORED_LINKS_MAX_AGE);
        if let Some(est) = watch.estimate(*id) {
            let age = Duration::from_millis(unix_ms().saturating_sub(l.unix_ms));
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            measured.insert(*id, (est, at));
        }
    }
    if !measured.is_empty() {
        log::info!("resumed the link estimates of {} peers", measured.len());
    }
    let mut gate = ReplanGate::new(linkwatch::MIN_GAIN, linkwatch::SUSTAIN);
    // The test knob's emulated link, re-read every few ticks for the ring.
    let live_link = std::env::var_os("LOIP_TEST_LINK_FILE").map(|_| watch::channel(test_link()));
    let mut last_link_read = Instant::now();
    let mut last_watch = Instant::now();
    let mut watching = false;
    let mut bodies: BTreeMap<Epoch, PlanBody> = BTreeMap::new();
    let committed_file = BodyFile {
        path: cfg.data_dir.join("plan-committed.bin"),
    };
    let pending_file = BodyFile {
        path: cfg.data_dir.join("plan-pending.bin"),
    };
    // Restarted on the same epochs: the bodies as they were.
    let committed_epoch = node.committed().epoch;
    let mut current: Option<(Epoch, PlanBody)> = committed_file
        .load(committed_epoch)
        .map(|b| (committed_epoch, b));
    if let Some(p) = &node.hard_state().pending {
        if let Some(b) = pending_file.load(p.epoch) {
            bodies.insert(p.epoch, b);
        }
    }
    let mut shards: BTreeMap<Epoch, PathBuf> = BTreeMap::new();
    let mut shard: Option<PathBuf> = current.as_ref().and_then(|(_, b)| {
        let path = cfg.data_dir.join(prepare::SHARD_FILE);
        (b.fetch_of(me).is_some() && path.exists()).then_some(path)
    });
    let mut prepare_error: Option<String> = None;
    let mut replanned_for: Option<Epoch> = None;
    // Ring endpoints of the peers, from their Hellos.
    let mut ring_addrs: BTreeMap<NodeId, SocketAddr> = BTreeMap::new();
    // The ring of the committed epoch, once started; why it is not.
    let mut ring: Option<Arc<RingNode>> = None;
    let mut ring_error: Option<String> = None;
    // The committed epoch whose ring is to start, until when it may wait
    // for the members' ring addresses, and the previous ring to drop. A
    // node restarted within an epoch (faster than the failure detector)
    // starts that epoch's ring again: its peers' rings still run it.
    let mut ring_wanted: Option<(Epoch, Instant, Option<Arc<RingNode>>)> = current
        .as_ref()
        .map(|(e, _)| (*e, Instant::now() + RING_ADDRESS_WAIT, None));
    // Whether this node should hold windows; its verdict goes out in the
    // report.
    let mut fitness = Fitness::new(cfg.stall);
    let mut fitness_changed = false;
    // Serving figures: the peers' latest, what this node's earlier rings
    // counted, and its rate of tokens.
    let mut stats_book = StatsBook::default();
    let mut carried = Carried::default();
    let mut token_rate = Rate::default();

    loop {
        tokio::select! {
            _ = ticker.tick() => queue.push_back(Event::Tick),
            Some(found) = found_rx.recv() => {
                // A connected peer keeps the address it proved.
                if found.id != me
                    && !links.contains_key(&found.id)
                    && book.get(&found.id) != Some(&found.addr)
                    && candidates.len() < MAX_ADDRESSES
                {
                    candidates.push(found);
                }
            }
            ev = events.recv() => match ev {
                None => return Ok(()),
                Some(ShellEvent::Connected { peer, out }) => {
                    let id = peer.id;
                    if id == me {
                        // Ourselves (a static peer naming this node) or a
                        // copy of our identity: the Hellos tell; then close.
                        let conn = peer.conn.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            conn.close(quinn::VarInt::from_u32(quic::CLOSE_OK), b"same id");
                        });
                    } else {
                        // The newest connection carries what we send; older
                        // ones (a simultaneous dial, or one to a peer that
                        // restarted) still deliver until they close or idle out.
                        if Instant::now() >= report_from {
                            let _ = out.try_send(encode(&Wire::Report(Box::new(report.clone()))));
                        }
                        links.insert(id, Link { conn: peer.conn, out });
                        queue.push_back(Event::PeerDiscovered(id));
                    }
                }
                Some(ShellEvent::Closed { id, stable_id }) => {
                    if links.get(&id).is_some_and(|l| l.conn.stable_id() == stable_id) {
                        links.remove(&id);
                    }
                }
                Some(ShellEvent::RingStarted { epoch, result }) => match result {
                    Ok(r) if epoch == node.committed().epoch => {
                        log::info!("plan epoch {epoch}: ring running");
                        ring_error = None;
                        ring = Some(Arc::new(*r));
                    }
                    Ok(r) => {
                        r.halt();
                        tokio::task::spawn_blocking(move || drop(r));
                    }
                    Err(e) => {
                        log::error!("plan epoch {epoch}: starting the ring: {e}");
                        ring_error = Some(format!("epoch {epoch}: {e}"));
                        if epoch == node.committed().epoch {
                            fitness_changed |= fitness.ring_failed(&e, Instant::now());
                        }
                    }
                },
                Some(ShellEvent::PlanComputed { epoch, body }) => {
                    queue.push_back(Event::PlanComputed { epoch, body })
                }
                Some(ShellEvent::Measured(list)) => {
                    let now = Instant::now();
                    for (id, link) in list {
                        measured.insert(id, (link, now));
                    }
                }
                Some(ShellEvent::LinkSamples(samples)) => {
                    watching = false;
                    for (id, sample, at) in samples {
                        match sample.map(|s| watch.observe(id, &s, at)) {
                            Some(Ok(())) => {}
                            Some(Err(why)) => log::info!("link to {id}: probe refused: {why}"),
                            None => log::debug!("link to {id}: probe failed"),
                        }
                    }
                    let now = Instant::now();
                    let estimates = watch.estimates();
                    let stamp = unix_ms();
                    let keep: Vec<(NodeId, StoredLink)> = estimates
                        .iter()
                        .map(|(&id, l)| {
                            measured.insert(id, (*l, now));
                            let s = StoredLink {
                                bandwidth_bps: l.bandwidth_bps,
                                latency_s: l.latency_s,
                                unix_ms: stamp,
                            };
                            (id, s)
                        })
                        .collect();
                    let saved = state
                        .store()
                        .put_json(Tree::Links, LINKS_KEY, &keep)
                        .and_then(|()| state.store().flush());
                    if let Err(e) = saved {
                        log::warn!("saving link estimates: {e}");
                    }
                    // Judge the committed plan under the links as they are.
                    let epoch = node.committed().epoch;
                    let committed = current
                        .as_ref()
                        .filter(|(e, _)| *e == epoch)
                        .and_then(|(_, b)| b.plan.clone());
                    // Only once every estimate rests on a few samples.
                    let settled = estimates.keys().all(|&id| watch.settled(id));
                    if let (Some(committed), Some(model)) = (committed, local.clone()) {
                        if settled && node.is_acting_leader(now_ms()) {
                            watching = true;
                            let job = GainJob {
                                epoch,
                                members: node.committed().ids().collect(),
                                reports: reports.clone(),
                                links: estimates,
                                leader: me,
                                objective: cfg.objective,
                                model,
                                committed,
                            };
                            tokio::spawn(judge_links(job, events_tx.clone()));
                        }
                    }
                }
                Some(ShellEvent::Gain { epoch, gain }) => {
                    watching = false;
                    let now = Instant::now();
                    if let Some(g) = gain {
                        log::debug!(target: "loip::links", "epoch {epoch}: predicted gain {:.1}%", g * 100.0);
                    }
                    if let Some(g) = gain.filter(|_| epoch == node.committed().epoch) {
                        if !cfg.adapt {
                            if g >= linkwatch::MIN_GAIN {
                                log::info!(
                                    "epoch {epoch}: another plan would be {:.0}% better \
                                     (not adapting)",
                                    g * 100.0
                                );
                            }
                        } else if gate.observe(epoch, g, now) {
                            log::warn!(
                                "epoch {epoch}: under the links as measured now another plan \
                                 is {:.0}% better, for {} s: planning again",
                                g * 100.0,
                                linkwatch::SUSTAIN.as_secs()
                            );
                            queue.push_back(Event::Replan);
                        } else if g >= linkwatch::MIN_GAIN {
                            log::info!("epoch {epoch}: another plan would be {:.0}% better", g * 100.0);
                        }
                    }
                }
                Some(ShellEvent::Prepared { epoch, result }) => {
                    let ok = match result {
                        Ok(p) => {
                            if let Some(path) = p.shard {
                                if p.fetched > 0 {
                                    log::info!(
                                        "epoch {epoch}: fetched {} tensors into {}",
                                        p.fetched,
                                        path.display()
                                    );
                                }
                                shards.insert(epoch, path);
                            }
                            true
                        }
                        Err(e) => {
                            log::error!("preparing epoch {epoch}: {e}");
                            prepare_error = Some(format!("epoch {epoch}: {e}"));
                            false
                        }
                    };
                    queue.push_back(Event::Prepared { epoch, ok });
                }
                Some(ShellEvent::Inbound { from, addr, wire }) => match wire {
                    Wire::Membership(Msg::Prepare { plan, .. })
                        if plan.config.epoch < node.hard_state().committed.epoch =>
                    {
                        // A proposal older than what we committed: dropped.
                        shared.counters.out_of_epoch.fetch_add(1, Ordering::Relaxed);
                    }
                    Wire::Membership(msg) if from != me => {
                        queue.push_back(Event::Message { from, msg })
                    }
                    Wire::Membership(_) => {}
                    Wire::Hello { instance: other, .. } if from == me => {
                        if other != instance && duplicate.is_none() {
                            log::error!(
                                "node id {me} is also used by the process at {addr}: \
                                 two devices share one identity"
                            );
                            duplicate = Some(addr);
                        }
                    }
                    Wire::Hello { listen_port, ring_port, .. } => {
                        if ring_addrs.len() < MAX_ADDRESSES || ring_addrs.contains_key(&from) {
                            ring_addrs.insert(from, SocketAddr::new(addr.ip(), ring_port));
                        }
                        let addr = SocketAddr::new(addr.ip(), listen_port);
                        if book.len() < MAX_ADDRESSES || book.contains_key(&from) {
                            book.insert(from, addr);
                        }
                    }
                    Wire::Peers(list) => {
                        for (id, addr) in list.into_iter().take(MAX_ADDRESSES) {
                            if id != me && !book.contains_key(&id) && book.len() < MAX_ADDRESSES {
                                book.insert(id, addr);
                            }
                        }
                    }
                    Wire::Report(r) if from != me => {
                        if reports.len() < MAX_ADDRESSES || reports.contains_key(&from) {
                            reports.insert(from, *r);
                        }
                    }
                    Wire::Stats(s) if from != me => {
                        // Figures out of bounds are refused like a frame
                        // that does not decode; a full book takes no more
                        // nodes (the address book's bound).
                        if s.is_sane() {
                            stats_book.insert(from, *s, now_ms());
                        } else {
                            shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Answered by the connection handlers.
                    Wire::Report(_)
                    | Wire::Stats(_)
                    | Wire::Fetch(_)
                    | Wire::Probe(_)
                    | Wire::Generate(_)
                    | Wire::Generated(_) => {}
                },
            },
        }

        // A member reported after the committed plan was made: plan again
        // (once per epoch). Only a leader with a model can plan.
        if let (Some((epoch, body)), Some(_)) = (&current, &local) {
            let late = node
                .committed()
                .ids()
                .any(|m| reports.contains_key(&m) && !body.planned_with.contains(&m));
            // The members that call themselves unfit are not those the
            // plan was made with: a ring stalled, or a cool-down ended.
            let unfit_now: Vec<NodeId> = node
                .committed()
                .ids()
                .filter(|m| reports.get(m).is_some_and(|r| r.unfit.is_some()))
                .collect();
            let unfit_then: Vec<NodeId> = body.unfit.iter().map(|(id, _)| *id).collect();
            let fitness_moved = unfit_now != unfit_then;
            if (late || fitness_moved)
                && replanned_for != Some(*epoch)
                && node.is_acting_leader(now_ms())
                && *epoch == node.committed().epoch
            {
                replanned_for = Some(*epoch);
                if late {
                    log::info!(
                        "epoch {epoch} was planned before every member reported: planning again"
                    );
                } else {
                    log::warn!(
                        "epoch {epoch}: members unfit to hold windows are now {unfit_now:?} \
                         (were {unfit_then:?}): planning again"
                    );
                }
                queue.push_back(Event::Replan);
            }
        }

        while let Some(event) = queue.pop_front() {
            for action in node.handle(now_ms(), event) {
                match action {
                    Action::Persist(h) => state.save_hard_state(&h)?,
                    Action::Send { to, msg } => send(&links, to, &Wire::Membership(msg)),
                    Action::BecameLeader { term } => log::info!("leader of term {term}"),
                    Action::SteppedDown { term } => log::info!("stepped down in term {term}"),
                    Action::ComputePlan { epoch, members } => {
                        let ids: Vec<NodeId> = members.iter().map(|m| m.id).collect();
                        let fresh = |id: &NodeId| {
                            measured
                                .get(id)
                                .filter(|(_, t)| t.elapsed() < LINK_FRESH)
                                .map(|(l, _)| *l)
                        };
                        let known: BTreeMap<NodeId, NetLink> = ids
                            .iter()
                            .filter_map(|id| Some((*id, fresh(id)?)))
                            .collect();
                        let to_probe: Vec<(NodeId, quinn::Connection)> = ids
                            .iter()
                            .filter(|id| **id != me && !known.contains_key(id))
                            .filter_map(|id| Some((*id, links.get(id)?.conn.clone())))
                            .collect();
                        let job = PlanJob {
                            epoch,
                            members: ids,
                            reports: reports.clone(),
                            known,
                            to_probe,
                            leader: me,
                            objective: cfg.objective,
                            model: local.clone(),
                        };
                        tokio::spawn(compute_plan(job, events_tx.clone()));
                    }
                    Action::Prepare(plan) => {
                        let epoch = plan.config.epoch;
                        match PlanBody::decode(&plan.body) {
                            Ok(body) => {
                                let sources: Vec<(NodeId, quinn::Connection)> = body
                                    .sources
                                    .iter()
                                    .filter(|id| **id != me)
                                    .filter_map(|id| Some((*id, links.get(id)?.conn.clone())))
                                    .collect();
                                bodies.insert(epoch, body.clone());
                                while bodies.len() > MAX_BODIES {
                                    bodies.pop_first();
                                }
                                let job = PrepareJob {
                                    me,
                                    epoch,
                                    file: pending_file.clone(),
                                    body,
                                    local: local.clone(),
                                    data_dir: cfg.data_dir.clone(),
                                    sources,
                                    limits: fetch_limits,
                                    delay: prepare_delay,
                                };
                                tokio::spawn(run_prepare(job, events_tx.clone()));
                            }
                            Err(e) => {
                                log::error!("epoch {epoch}: {e}");
                                prepare_error = Some(format!("epoch {epoch}: {e}"));
                                queue.push_back(Event::Prepared { epoch, ok: false });
                            }
                        }
                    }
                    Action::PlanCommitted(c) => {
                        log_plan(&c);
                        shared.committed.store(c.epoch, Ordering::Relaxed);
                        current = bodies.remove(&c.epoch).map(|b| (c.epoch, b));
                        if let Some((e, b)) = &current {
                            committed_file.save(*e, b)?;
                        }
                        shard = shards.remove(&c.epoch);
                        // The old epoch's ring stops after its current
                        // step; this epoch's starts once it has.
                        let old = ring.take();
                        if let Some(o) = &old {
                            o.halt();
                            carried.add(&o.stats(), ring_tokens(o), &o.link_bytes());
                        }
                        ring_error = None;
                        // An epoch still waiting for an address gives way.
                        if let Some((_, _, Some(o))) = ring_wanted.take() {
                            tokio::task::spawn_blocking(move || drop(o));
                        }
                        ring_wanted = Some((c.epoch, Instant::now() + RING_ADDRESS_WAIT, old));
                        bodies.retain(|&e, _| e > c.epoch);
                        shards.retain(|&e, _| e > c.epoch);
                        if let Some((_, b)) = &current {
                            if let Some(note) = &b.note {
                                log::warn!("plan epoch {}: no windows: {note}", c.epoch);
                            }
                        }
                    }
                }
            }
        }

        // The committed epoch's ring starts once every member has said
        // where its ring listens (a peer that just restarted may not have
        // yet); past the wait, the node says why it has no ring.
        if let Some((epoch, deadline, _)) = &ring_wanted {
            let spec = RingSpec {
                me,
                epoch: *epoch,
                body: current.as_ref().map(|(_, b)| b),
                ring_addrs: &ring_addrs,
                my_addr: ring_addr,
                model: cfg.model.as_deref(),
                shard: shard
                    .clone()
                    .unwrap_or_else(|| cfg.data_dir.join(prepare::SHARD_FILE)),
                live_link: live_link.as_ref().map(|(_, rx)| rx.clone()),
                kv_pressure: KvPressure {
                    budget_bytes: report.device.memory_budget_bytes,
                    store: Some(state.store().clone()),
                },
            };
            let config = ring_config(&spec);
            let waiting =
                matches!(config, Some(Err(NoRing::Address(_)))) && Instant::now() < *deadline;
            if !waiting {
                let (epoch, _, old) = ring_wanted.take().expect("checked above");
                match config {
                    Some(Ok(config)) => {
                        let (ep, acc, tx) =
                            (ring_endpoint.clone(), acceptor.clone(), events_tx.clone());
                        let rt = tokio::runtime::Handle::current();
                        tokio::task::spawn_blocking(move || {
                            drop(old);
                            let result = RingNode::start_shared(config, ep, &acc, &rt)
                                .map(Box::new)
                                .map_err(|e| e.to_string());
                            let _ = tx.blocking_send(ShellEvent::RingStarted { epoch, result });
                        });
                    }
                    Some(Err(e)) => {
                        log::error!("plan epoch {epoch}: no ring: {e}");
                        ring_error = Some(format!("epoch {epoch}: {e}"));
                        tokio::task::spawn_blocking(move || drop(old));
                    }
                    None => {
                        tokio::task::spawn_blocking(move || drop(old));
                    }
                }
            }
        }

        // Dial peers we heard of and are not connected to: the address book
        // (proven peers and gossip) at most every REDIAL_AFTER, and mDNS
        // candidates as they come.
        let now = Instant::now();
        let mut dials: Vec<(NodeId, SocketAddr)> = Vec::new();
        for (&id, &addr) in &book {
            if links.contains_key(&id)
                || last_dial.get(&id).is_some_and(|t| now < *t + REDIAL_AFTER)
            {
                continue;
            }
            last_dial.insert(id, now);
            dials.push((id, addr));
        }
        for f in candidates.drain(..) {
            if !links.contains_key(&f.id) {
                log::debug!("mDNS: dialling candidate {} at {}", f.id, f.addr);
                dials.push((f.id, f.addr));
            }
        }
        for (id, addr) in dials {
            let endpoint = endpoint.clone();
            let tx = events_tx.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                match endpoint.connect(addr, id).await {
                    Ok(peer) => attach(&endpoint, peer, hello, tx, shared).await,
                    Err(e) => dial_failed(&format!("{id} at {addr}"), &e),
                }
            });
        }
        // This node's fitness: a stalled ring or the end of a cool-down
        // goes to every peer at once, for the leader to plan by.
        if let Some(r) = &ring {
            fitness_changed |= fitness.backlog(Duration::from_millis(r.stats().backlog_ms), now);
        }
        fitness_changed |= fitness.tick(now);
        if std::mem::take(&mut fitness_changed) {
            report.unfit = fitness.unfit().map(str::to_string);
            match &report.unfit {
                Some(why) => log::warn!("asking to be planned out: {why}"),
                None => log::info!("fit to hold windows again"),
            }
            reports.insert(me, report.clone());
            for &to in links.keys().filter(|_| now >= report_from) {
                send(&links, to, &Wire::Report(Box::new(report.clone())));
            }
        }
        if let Some((tx, _)) = &live_link {
            if now >= last_link_read + Duration::from_millis(250) {
                last_link_read = now;
                tx.send_if_modified(|l| {
                    let new = test_link();
                    std::mem::replace(l, new) != new
                });
            }
        }
        // The leader probes its members' links continuously while a plan
        // with windows runs (one round at a time).
        if !watching
            && now >= last_watch + WATCH_EVERY
            && local.is_some()
            && node.is_acting_leader(now_ms())
            && current
                .as_ref()
                .is_some_and(|(e, b)| *e == node.committed().epoch && b.plan.is_some())
        {
            last_watch = now;
            let targets: Vec<(NodeId, quinn::Connection)> = node
                .committed()
                .ids()
                .filter(|id| *id != me)
                .filter_map(|id| Some((id, links.get(&id)?.conn.clone())))
                .collect();
            if !targets.is_empty() {
                watching = true;
                tokio::spawn(probe_members(targets, events_tx.clone()));
            }
        }
        let budget = report.device.memory_budget_bytes;
        let mut own = own_stats(ring.as_deref(), &carried, budget, token_rate.get());
        if now >= last_gossip + GOSSIP_EVERY {
            last_gossip = now;
            own.tokens_per_s = token_rate.update(now_ms(), own.tokens);
            let list: Vec<(NodeId, SocketAddr)> = book.iter().map(|(&i, &a)| (i, a)).collect();
            let figures = Wire::Stats(Box::new(own.clone()));
            for &to in links.keys() {
                send(&links, to, &Wire::Peers(list.clone()));
                if now >= report_from {
                    send(&links, to, &Wire::Report(Box::new(report.clone())));
                }
                send(&links, to, &figures);
            }
        }
        stats_book.expire(now_ms());
        let mut figures = vec![PeerStats {
            id: me,
            age_s: 0.0,
            stats: own,
        }];
        figures.extend(stats_book.list(now_ms()));
        let status = NodeStatus {
            id: me,
            listen,
            ring_listen: Some(ring_addr),
            membership: node.status(now_ms()),
            connected: links
                .iter()
                .map(|(&i, l)| (i, l.conn.remote_address()))
                .collect(),
            windows: current
                .as_ref()
                .map(|(_, b)| {
                    b.windows_of(me)
                        .into_iter()
                        .map(|w| dist::window_text(w, b.n_units()))
                        .collect()
                })
                .unwrap_or_default(),
            duplicate_id: duplicate,
            discovery: mdns.as_ref().map(|d| d.stats()),
            plan: current
                .as_ref()
                .map(|(epoch, b)| plan_status(*epoch, b, me, shard.clone())),
            malformed_frames: shared.counters.malformed.load(Ordering::Relaxed),
            out_of_epoch_frames: shared.counters.out_of_epoch.load(Ordering::Relaxed),
            prepare_error: prepare_error.clone(),
            links: measured
                .iter()
                .map(|(&peer, (l, at))| LinkStatus {
                    peer,
                    bandwidth_bps: l.bandwidth_bps,
                    latency_s: l.latency_s,
                    age_s: at.elapsed().as_secs_f64(),
                })
                .collect(),
            ring: ring.as_ref().map(|r| RingStatus {
                epoch: r.epoch(),
                head: r.is_head(),
                counts: r.stats(),
            }),
            ring_error: ring_error.clone(),
            stats: figures,
        };
        let view = ring_view(
            me,
            node.committed().epoch,
            current.as_ref(),
            ring.as_ref(),
            &links,
            &status.membership.peers,
        );
        let _ = status_tx.send(Some(status));
        view_tx.send_if_modified(|v| {
            let changed = !v.same_as(&view);
            if changed {
                *v = view;
            }
            changed
        });
    }
}

/// Token positions through a ring node: its window runs count each token
/// once per window it holds.
fn ring_tokens(r: &RingNode) -> u64 {
    r.stats().tokens / r.local_windows().max(1) as u64
}

/// This node's serving figures: its ring's (none when no ring runs here)
/// on top of what its earlier rings counted.
fn own_stats(ring: Option<&RingNode>, carried: &Carried, budget: u64, rate: f64) -> NodeStats {
    let counts = ring.map(|r| r.stats()).unwrap_or_default();
    let links = ring.map(|r| r.link_bytes()).unwrap_or_default();
    NodeStats {
        epoch: ring.map_or(0, |r| r.epoch()),
        budget_bytes: budget,
        weights_bytes: counts.weights_bytes,
        kv_used_bytes: counts.kv_used_bytes,
        kv_capacity_bytes: counts.kv_capacity_bytes,
        kv_budget_bytes: ring.map_or(0, |r| r.kv_budget_bytes()),
        bubbles: carried.bubbles + counts.bubbles,
        bubble_seconds: (carried.bubble_us + counts.bubble_us) as f64 / 1e6,
        backlog_ms: counts.backlog_ms,
        tokens: carried.tokens + ring.map_or(0, ring_tokens),
        tokens_per_s: rate,
        links: carried.links_with(&links),
        demotions: carried.demotions + counts.demotions,
        promotions: carried.promotions + counts.promotions,
        demoted_units: counts.demoted_units,
        kv_positions: counts.kv_positions,
        kv_waiting: counts.kv_waiting,
        kv_waited: carried.kv_waited + counts.kv_waited,
    }
}

/// Where the ring port is kept (tree `plan`).
const RING_PORT_KEY: &[u8] = b"ring-port";

/// Binds the ring's endpoint on the port this node's ring used before,
/// kept in sled, so that a node restarted within one epoch (faster than the
/// failure detector) is where its peers' rings dial it still; on a fresh
/// port when there is none or it is taken.
fn bind_ring(
    ip: std::net::IpAddr,
    ident: &NodeIdentity,
    store: &crate::store::Store,
) -> Result<(Endpoint, SocketAddr), ShellError> {
    let before = store
        .get_json::<u16>(Tree::Plan, RING_PORT_KEY)
        .unwrap_or_else(|e| {
            log::warn!("the stored ring port: {e}");
            None
        })
        .filter(|&p| p != 0);
    let again = before.and_then(|port| {
        let at = SocketAddr::new(ip, port);
        Endpoint::bind(at, ident, Limits::default())
            .inspect_err(|e| {
                log::warn!("ring port {port} of the last run is taken ({e}): a new one")
            })
            .ok()
    });
    let endpoint = match again {
        Some(e) => e,
        None => Endpoint::bind(SocketAddr::new(ip, 0), ident, Limits::default())?,
    };
    let addr = endpoint.local_addr().map_err(|source| NetError::Bind {
        addr: SocketAddr::new(ip, 0),
        source,
    })?;
    if before != Some(addr.port()) {
        let saved = store
            .put_json(Tree::Plan, RING_PORT_KEY, &addr.port())
            .and_then(|()| store.flush());
        if let Err(e) = saved {
            log::warn!("saving the ring port: {e}");
        }
    }
    Ok((endpoint, addr))
}

/// What a node needs to start its ring for a committed plan.
struct RingSpec<'a> {
    me: NodeId,
    epoch: Epoch,
    body: Option<&'a PlanBody>,
    ring_addrs: &'a BTreeMap<NodeId, SocketAddr>,
    my_addr: SocketAddr,
    /// This node's model file, when it has one.
    model: Option<&'a Path>,
    /// Where its fetched tensors are, when the plan has it fetch.
    shard: PathBuf,
    /// The test knob's emulated link, as it changes.
    live_link: Option<watch::Receiver<Option<crate::net::emulated::LinkEmulation>>>,
    /// The node's memory budget and database, under which its ring
    /// adapts to KV pressure.
    kv_pressure: KvPressure,
}

/// The ring configuration of this node for a committed plan: `None` when
/// the plan gives it no window.
/// Why a committed plan gives this node no ring.
#[derive(Debug, Error)]
enum NoRing {
    #[error("node {0} never said where its ring listens")]
    Address(NodeId),
    #[error("the plan reads a model file this node lacks")]
    Model,
}

fn ring_config(s: &RingSpec) -> Option<Result<RingConfig, NoRing>> {
    let body = s.body?;
    let plan = body.plan.as_ref()?;
    let me = body.position(s.me)?;
    if !plan.windows.iter().any(|w| w.device == me) {
        return None;
    }
    let peers: Result<Vec<Peer>, NoRing> = body
        .ring
        .iter()
        .map(|&id| {
            let addr = if id == s.me {
                Some(s.my_addr)
            } else {
                s.ring_addrs.get(&id).copied()
            };
            addr.map(|addr| Peer { id, addr })
                .ok_or(NoRing::Address(id))
        })
        .collect();
    let model = if body.fetch_of(s.me).is_some() {
        s.shard.clone()
    } else {
        match s.model {
            Some(m) => m.to_path_buf(),
            None => return Some(Err(NoRing::Model)),
        }
    };
    Some(peers.map(|peers| {
        let mut plan = plan.clone();
        plan.epoch = s.epoch;
        let mut config = RingConfig::new(plan, me, peers, model);
        config.threads = ring_threads();
        config.emulation.compute_factor = test_compute_factor();
        config.live_link = s.live_link.clone();
        config.kv_pressure = Some(s.kv_pressure.clone());
        config
    }))
}

/// Test knob `LOIP_TEST_LINK_FILE`: a file holding an emulated link
/// (`2mbit/40ms`), read at each probe and every 250 ms for the ring: this
/// node answers probes, and its ring sends, as if behind that link; no
/// file, or an empty one, is the real link. Lets a test or a benchmark
/// throttle a node's link mid-run without root.
fn test_link() -> Option<crate::net::emulated::LinkEmulation> {
    let path = std::env::var_os("LOIP_TEST_LINK_FILE")?;
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    text.parse()
        .inspect_err(|e| log::warn!("LOIP_TEST_LINK_FILE: {e}"))
        .ok()
}

/// Test knob `LOIP_TEST_COMPUTE_FACTOR`: this node's ring computes that
/// many times slower (`ring::emulation`), as a device that falls behind.
fn test_compute_factor() -> Option<f64> {
    std::env::var("LOIP_TEST_COMPUTE_FACTOR")
        .ok()?
        .parse()
        .ok()
        .filter(|f: &f64| f.is_finite() && *f >= 1.0)
}

/// Compute threads of the ring: `LOIP_RING_THREADS`, else every CPU. The
/// compute pool's workers spin while waiting for work, so processes that
/// share a machine (tests) give each ring one thread: otherwise they starve
/// each other's network tasks and heartbeats.
fn ring_threads() -> usize {
    std::env::var("LOIP_RING_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The committed plan as requests see it.
fn ring_view(
    me: NodeId,
    epoch: Epoch,
    current: Option<&(Epoch, PlanBody)>,
    ring: Option<&Arc<RingNode>>,
    links: &BTreeMap<NodeId, Link>,
    peers_live: &[(NodeId, bool)],
) -> RingView {
    let body = current.filter(|(e, _)| *e == epoch).map(|(_, b)| b);
    let head = body.and_then(|b| {
        let w = b.plan.as_ref()?.windows.first()?;
        b.ring.get(w.device).copied()
    });
    RingView {
        epoch,
        head,
        note: body.filter(|b| b.plan.is_none()).map(|b| {
            b.note
                .clone()
                .unwrap_or_else(|| "the plan has no windows".into())
        }),
        local: ring
            .filter(|r| r.epoch() == epoch && r.is_head() && head == Some(me))
            .cloned(),
        head_conn: head
            .filter(|h| *h != me)
            .and_then(|h| links.get(&h))
            .map(|l| l.conn.clone()),
        members_live: body.is_some_and(|b| {
            b.ring
                .iter()
                .all(|&id| id == me || peers_live.contains(&(id, true)))
        }),
    }
}

/// What this node announces over mDNS.
fn discovery_config(cfg: &RunConfig, ident: &NodeIdentity, listen: SocketAddr) -> DiscoveryConfig {
    let model = cfg.model.as_deref().and_then(|m| {
        crate::plan::profile::model_digest(m)
            .map_err(|e| log::warn!("mDNS: announcing no model digest: {e}"))
            .ok()
    });
    DiscoveryConfig {
        advert: discovery::Advert {
            id: ident.id,
            cluster: ident.fingerprint(),
            version: quic::program_version(),
            quic_port: listen.port(),
            http_port: None,
            model,
        },
        ip: Some(listen.ip()),
        interfaces: cfg.interfaces.clone(),
        mdns_port: discovery::MDNS_PORT,
    }
}

/// A duration in milliseconds from a test knob.
fn env_ms(key: &str) -> Option<Duration> {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

fn encode(wire: &Wire) -> Vec<u8> {
    frame::encode_control(wire).unwrap_or_default()
}

/// This node's report: its device profile from the config's device file,
/// else its stored profile, else nominal figures; the budget applied.
fn node_report(
    cfg: &RunConfig,
    store: &crate::store::Store,
    me: NodeId,
    local: Option<&LocalModel>,
) -> Result<NodeReport, ShellError> {
    use crate::engine::offload::Budget;
    let budget = cfg
        .mem_budget
        .as_deref()
        .map(Budget::parse)
        .transpose()
        .map_err(|e| ShellError::Device(format!("mem_budget: {e}")))?;
    let model_bytes = local.map(|m| m.info.tensor_bytes);
    // A percentage of a model this node lacks is left to the leader.
    let resolved = match (budget, model_bytes) {
        (Some(Budget::Percent(_)), None) => None,
        (Some(b), m) => Some(b.bytes(m.unwrap_or(0))),
        (None, _) => None,
    };
    let (mut device, source): (DeviceProfile, String) = if let Some(path) = &cfg.device {
        let d = DeviceProfile::from_toml_file(path)
            .map_err(|e| ShellError::Device(format!("{}: {e}", path.display())))?;
        (d, format!("file {}", path.display()))
    } else {
        // The node's own store, already open (sled allows one opener).
        let stored = match local {
            Some(m) => match crate::plan::profile::stored_profile_in(store, &m.path, budget) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("stored profile: {e}; using nominal figures");
                    None
                }
            },
            _ => None,
        };
        match stored {
            Some(p) => (p.device, "stored profile".to_string()),
            None => {
                let bytes = match resolved {
                    Some(b) => b,
                    None => crate::plan::profile::memory_budget(None, 0)
                        .map_err(|e| ShellError::Device(e.to_string()))?,
                };
                (
                    dist::nominal_profile(&me.to_string(), bytes),
                    "nominal figures (run `loip profile` for measured ones)".to_string(),
                )
            }
        }
    };
    device.name = me.to_string();
    if let Some(b) = resolved {
        device.memory_budget_bytes = b;
    }
    Ok(NodeReport {
        device,
        device_source: source,
        mem_budget: cfg.mem_budget.clone(),
        model: local.map(|m| m.info.clone()),
        unfit: None,
    })
}

/// What the leader needs to make a plan off the main loop.
struct PlanJob {
    epoch: Epoch,
    members: Vec<NodeId>,
    reports: BTreeMap<NodeId, NodeReport>,
    /// Links measured recently.
    known: BTreeMap<NodeId, NetLink>,
    to_probe: Vec<(NodeId, quinn::Connection)>,
    leader: NodeId,
    objective: crate::plan::Objective,
    model: Option<Arc<LocalModel>>,
}

/// Probes links, runs the scheduler on a blocking thread, and reports the
/// body to the main loop.
async fn compute_plan(job: PlanJob, tx: mpsc::Sender<ShellEvent>) {
    let probes = job
        .to_probe
        .iter()
        .map(|(id, conn)| async move { (*id, fetch::probe_link(conn, PROBE_TIMEOUT).await) });
    let results = futures_util::future::join_all(probes).await;
    let fresh: Vec<(NodeId, NetLink)> = results
        .into_iter()
        .filter_map(|(id, l)| match l {
            Some(l) => Some((id, l)),
            None => {
                log::warn!("link to {id}: probe failed; assuming the default link");
                None
            }
        })
        .collect();
    let mut links = job.known.clone();
    links.extend(fresh.iter().copied());
    if !fresh.is_empty() {
        let _ = tx.send(ShellEvent::Measured(fresh)).await;
    }
    let epoch = job.epoch;
    let body = tokio::task::spawn_blocking(move || plan_body(&job, &links))
        .await
        .unwrap_or_else(|e| PlanBody::empty(format!("scheduler: {e}")));
    let _ = tx
        .send(ShellEvent::PlanComputed {
            epoch,
            body: body.encode(),
        })
        .await;
}

fn plan_body(job: &PlanJob, links: &BTreeMap<NodeId, NetLink>) -> PlanBody {
    let inputs = dist::PlanInputs {
        members: &job.members,
        reports: &job.reports,
        links,
        leader: job.leader,
        objective: job.objective,
    };
    let Some(m) = &job.model else {
        return dist::make_plan(&inputs, None);
    };
    let body = match with_plan_model(m, |pm| dist::make_plan(&inputs, Some(pm))) {
        Ok(body) => body,
        Err(e) => return PlanBody::empty(format!("the leader's model: {e}")),
    };
    if let Some(p) = &body.plan {
        log::info!(
            "epoch {}: planned {} windows over {} nodes ({} fetch tensors)",
            job.epoch,
            p.windows.len(),
            body.ring.len(),
            body.fetch.len()
        );
    }
    body
}

/// Calls `f` with the leader's model as the scheduler needs it.
fn with_plan_model<T>(m: &LocalModel, f: impl FnOnce(&dist::PlanModel) -> T) -> Result<T, String> {
    let parsed = m.plan_shape()?;
    let md = m.metadata()?;
    let name = m
        .path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let sha = |n: &str| m.tensor_sha(n);
    Ok(f(&dist::PlanModel {
        name: &name,
        gguf: &m.gguf,
        config: &parsed.config,
        shape: &parsed.shape,
        info: &m.info,
        metadata_sha256: md.sha256,
        metadata_len: md.bytes.len() as u64,
        tensor_sha: &sha,
    }))
}

/// What the leader needs to judge the committed plan under new links.
struct GainJob {
    epoch: Epoch,
    members: Vec<NodeId>,
    reports: BTreeMap<NodeId, NodeReport>,
    links: BTreeMap<NodeId, NetLink>,
    leader: NodeId,
    objective: crate::plan::Objective,
    model: Arc<LocalModel>,
    committed: crate::plan::Plan,
}

/// Probes every member's link and reports the samples to the main loop.
async fn probe_members(targets: Vec<(NodeId, quinn::Connection)>, tx: mpsc::Sender<ShellEvent>) {
    let probes = targets.iter().map(|(id, conn)| async move {
        (
            *id,
            fetch::probe_sample(conn, PROBE_TIMEOUT).await,
            Instant::now(),
        )
    });
    let samples = futures_util::future::join_all(probes).await;
    let _ = tx.send(ShellEvent::LinkSamples(samples)).await;
}

/// The predicted gain of re-planning under the job's links, off the
/// async workers.
async fn judge_links(job: GainJob, tx: mpsc::Sender<ShellEvent>) {
    let epoch = job.epoch;
    let gain = tokio::task::spawn_blocking(move || {
        let inputs = dist::PlanInputs {
            members: &job.members,
            reports: &job.reports,
            links: &job.links,
            leader: job.leader,
            objective: job.objective,
        };
        with_plan_model(&job.model, |pm| {
            dist::plan_gain(&inputs, pm, &job.committed)
        })
        .ok()
        .flatten()
    })
    .await
    .ok()
    .flatten();
    let _ = tx.send(ShellEvent::Gain { epoch, gain }).await;
}

/// A preparation off the main loop.
struct PrepareJob {
    me: NodeId,
    epoch: Epoch,
    /// Where the body goes before the node acknowledges it.
    file: BodyFile,
    body: PlanBody,
    local: Option<Arc<LocalModel>>,
    data_dir: PathBuf,
    sources: Vec<(NodeId, quinn::Connection)>,
    limits: FetchLimits,
    delay: Option<Duration>,
}

async fn run_prepare(job: PrepareJob, tx: mpsc::Sender<ShellEvent>) {
    if let Some(d) = job.delay {
        tokio::time::sleep(d).await;
    }
    let spec = PrepareSpec {
        me: job.me,
        epoch: job.epoch,
        body: &job.body,
        local: job.local.clone(),
        data_dir: &job.data_dir,
        sources: job.sources.clone(),
        limits: job.limits,
    };
    let mut result = prepare::prepare(spec).await.map_err(|e| e.to_string());
    if result.is_ok() {
        let (file, epoch, body) = (job.file.clone(), job.epoch, job.body.clone());
        let saved = tokio::task::spawn_blocking(move || file.save(epoch, &body))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = saved {
            result = Err(e);
        }
    }
    let _ = tx
        .send(ShellEvent::Prepared {
            epoch: job.epoch,
            result,
        })
        .await;
}

fn plan_status(epoch: Epoch, b: &PlanBody, me: NodeId, shard: Option<PathBuf>) -> PlanStatus {
    let windows_of = |id: NodeId| -> Vec<WindowStatus> {
        b.plan
            .as_ref()
            .map(|p| {
                p.windows
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| b.position(id) == Some(w.device))
                    .map(|(index, w)| WindowStatus {
                        index,
                        units: w.units.clone(),
                        streamed: w.streamed.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    PlanStatus {
        epoch,
        n_units: b.n_units(),
        ring: b.ring.clone(),
        windows: windows_of(me),
        ring_windows: b.ring.iter().map(|&id| windows_of(id)).collect(),
        slots: b.plan.as_ref().map_or(0, |p| p.slots),
        note: b.note.clone(),
        shard,
        unfit: b.unfit.clone(),
        kept_unfit: b.kept_unfit,
        planned_with: b.planned_with.clone(),
    }
}

fn log_plan(c: &Config) {
    let ids: Vec<String> = c.ids().map(|i| i.to_string()).collect();
    log::info!("plan epoch {} committed: {}", c.epoch, ids.join(" "));
}

fn send(links: &BTreeMap<NodeId, Link>, to: NodeId, wire: &Wire) {
    let Some(link) = links.get(&to) else { return };
    match frame::encode_control(wire) {
        Ok(bytes) => {
            // Full queue: drop; membership tolerates loss.
            let _ = link.out.try_send(bytes);
        }
        Err(e) => log::warn!("encoding a message to {to}: {e}"),
    }
}

/// Opens our stream on a new connection, serves the peer's, and tells the
/// main loop.
async fn attach(
    endpoint: &Endpoint,
    peer: PeerConnection,
    hello: Hello,
    tx: mpsc::Sender<ShellEvent>,
    shared: Arc<Shared>,
) {
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(PEER_QUEUE);
    let conn = peer.conn.clone();
    let id = peer.id;
    let hello = match frame::encode_control(&Wire::Hello {
        listen_port: hello.listen_port,
        instance: hello.instance,
        ring_port: hello.ring_port,
    }) {
        Ok(b) => b,
        Err(_) => return,
    };
    let _ = out_tx.try_send(hello);
    // Writer: our stream. A stream the peer reset (it could not use a
    // frame) is replaced by a new one; the frame is sent once more there.
    tokio::spawn(async move {
        let mut stream: Option<quinn::SendStream> = None;
        while let Some(bytes) = out_rx.recv().await {
            for _ in 0..2 {
                if stream.is_none() {
                    match conn.open_bi().await {
                        Ok((send, _recv)) => stream = Some(send),
                        Err(_) => return,
                    }
                }
                if let Some(send) = stream.as_mut() {
                    if send.write_all(&bytes).await.is_ok() {
                        break;
                    }
                }
                stream = None;
            }
        }
    });
    // Reader: the peer's streams.
    {
        let endpoint = endpoint.clone();
        let peer = peer.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let stable_id = peer.conn.stable_id();
            let addr = peer.conn.remote_address();
            let inbound = tx.clone();
            quic::serve_connection_with(&endpoint, peer, None, move |from, f: Frame| {
                let wire: Wire = f.control().inspect_err(|_| {
                    shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
                })?;
                match wire {
                    Wire::Peers(list) if list.len() > MAX_ADDRESSES => {
                        shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
                        return Err(FrameError::Decode(format!("{} peers", list.len())));
                    }
                    Wire::Fetch(req) => {
                        let committed = shared.committed.load(Ordering::Relaxed);
                        let stale = (req.epoch() < committed).then_some(committed);
                        if stale.is_some() {
                            shared.counters.out_of_epoch.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(Handled::TakeOver(fetch::serve_task(
                            shared.server.clone(),
                            req,
                            stale,
                        )));
                    }
                    Wire::Generate(req) => {
                        let view = shared.view.clone();
                        return Ok(Handled::TakeOver(Box::new(move |send, recv| {
                            Box::pin(client::serve_remote(view, req, send, recv))
                        })));
                    }
                    Wire::Probe(p) => {
                        if let Some(link) = test_link() {
                            return Ok(Handled::TakeOver(Box::new(move |send, recv| {
                                Box::pin(fetch::answer_probes_emulated(p, link, send, recv))
                            })));
                        }
                        let reply = fetch::answer_probe(&p)
                            .map(|a| frame::encode_control(&Wire::Probe(a)))
                            .transpose()?;
                        return Ok(Handled::Reply(reply));
                    }
                    wire => {
                        // A full queue drops the message, as the network might.
                        let _ = inbound.try_send(ShellEvent::Inbound { from, addr, wire });
                    }
                }
                Ok(Handled::Reply(None))
            })
            .await;
            let _ = tx.send(ShellEvent::Closed { id, stable_id }).await;
        });
    }
    let _ = tx.send(ShellEvent::Connected { peer, out: out_tx }).await;
}

/// Logs a failed dial: quietly, unless the peer runs another protocol,
/// which no retry can mend.
fn dial_failed(peer: &str, e: &NetError) {
    match e {
        NetError::Version { .. } => log::error!("dialling {peer}: {e}"),
        _ => log::debug!("dialling {peer}: {e}"),
    }
}

/// Keeps a connection to a static peer, redialling when it drops.
async fn dial_static(
    endpoint: Endpoint,
    peer: String,
    hello: Hello,
    tx: mpsc::Sender<ShellEvent>,
    shared: Arc<Shared>,
) {
    loop {
        if let Some(addr) = resolve_peer(&peer) {
            match endpoint.connect_any(addr).await {
                Ok(p) => {
                    let same = p.id == endpoint.id();
                    let conn = p.conn.clone();
                    attach(&endpoint, p, hello, tx.clone(), shared.clone()).await;
                    conn.closed().await;
                    if same {
                        // This node itself, or a copy of its identity (the
                        // main loop reports which): not dialled again.
                        return;
                    }
                }
                Err(e) => dial_failed(&peer, &e),
            }
        } else {
            log::warn!("static peer {peer}: cannot resolve");
        }
        tokio::time::sleep(REDIAL_AFTER).await;
    }
}

fn serve_status(
    data_dir: &Path,
    status: watch::Receiver<Option<NodeStatus>>,
) -> Result<(), ShellError> {
    let path = status_socket(data_dir);
    let _ = fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(|source| ShellError::Status {
        path: path.clone(),
        source,
    })?;
    let status = Arc::new(status);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let line = status
                .borrow()
                .as_ref()
                .and_then(|s| serde_json::to_string(s).ok())
                .unwrap_or_else(|| "null".into());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = sock.write_all(line.as_bytes()).await;
                    let _ = sock.write_all(b"\n").await;
                    let _ = sock.shutdown().await;
                })
                .await;
            });
        }
    });
    Ok(())
}

/// Reads a running node's status from its data directory.
pub fn read_status(data_dir: &Path) -> Result<NodeStatus, ShellError> {
    use std::io::Read;
    let path = status_socket(data_dir);
    let err = |source| ShellError::Status {
        path: path.clone(),
        source,
    };
    let sock = std::os::unix::net::UnixStream::connect(&path).map_err(err)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    let mut text = String::new();
    sock.take(1 << 20).read_to_string(&mut text).map_err(err)?;
    serde_json::from_str(text.trim()).map_err(|e| ShellError::State {
        path: path.clone(),
        message: format!("status does not decode: {e}"),
    })
}
