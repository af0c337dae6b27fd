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
//! Not yet here: link measurement, the scheduler and window
//! preparation (a plan's body is only its member list, and preparing it
//! succeeds at once), tensor fetch.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::config::{resolve_peer, RunConfig};
use super::discovery::{self, DiscoveryConfig, Found};
use super::membership::{Action, Config, Event, Msg, Node, NodeConfig, Status, Timing};
use super::state::NodeState;
use crate::net::frame::{self, Frame, FrameError};
use crate::net::identity::{self, IdOrigin, IdentityError, NodeIdentity};
use crate::net::quic::{self, Endpoint, Limits, NetError, PeerConnection};
use crate::net::NodeId;

/// Most peers kept in the address book.
pub const MAX_ADDRESSES: usize = 64;
/// Frames queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 256;
const TICK: Duration = Duration::from_millis(50);
const GOSSIP_EVERY: Duration = Duration::from_secs(2);
const REDIAL_AFTER: Duration = Duration::from_secs(2);

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
}

/// Messages between shells, in control frames.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Wire {
    /// First frame on a connection: the port the sender listens on, and a
    /// random number per process (two processes with one id differ in it).
    Hello {
        listen_port: u16,
        instance: u64,
    },
    Membership(Msg),
    /// Peers the sender knows, for the receiver to dial.
    Peers(Vec<(NodeId, SocketAddr)>),
}

/// What `loip status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub listen: SocketAddr,
    pub membership: Status,
    /// Connected peers and their addresses.
    pub connected: Vec<(NodeId, SocketAddr)>,
    /// This node's windows in the committed plan (none until the scheduler
    /// is wired in).
    pub windows: Vec<String>,
    /// Another process presents this node's id (a copied identity): its
    /// address.
    pub duplicate_id: Option<SocketAddr>,
    /// What mDNS discovery has done; `None` when it is off.
    #[serde(default)]
    pub discovery: Option<discovery::DiscoveryStats>,
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
}

/// What a node says first on each connection.
#[derive(Clone, Copy, Debug)]
struct Hello {
    listen_port: u16,
    instance: u64,
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
pub async fn run(cfg: RunConfig, ready: impl FnOnce(NodeId, SocketAddr)) -> Result<(), ShellError> {
    fs::create_dir_all(&cfg.data_dir).map_err(|e| ShellError::State {
        path: cfg.data_dir.clone(),
        message: e.to_string(),
    })?;
    let mut state = NodeState::open(&cfg.data_dir)?;
    let ident = device_identity(&cfg, &mut state)?;
    let me = ident.id;
    let hard = state.load_hard_state()?;
    let endpoint = Endpoint::bind(cfg.listen, &ident, Limits::default())?;
    let listen = endpoint.local_addr().map_err(|source| NetError::Bind {
        addr: cfg.listen,
        source,
    })?;

    let start = Instant::now();
    let now_ms = move || start.elapsed().as_millis() as u64;
    let mut seed = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .expect("the system random generator works");
    let node_cfg = NodeConfig {
        id: me,
        score: 0,
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
    };

    let (events_tx, mut events) = mpsc::channel::<ShellEvent>(1024);
    let (status_tx, status_rx) = watch::channel(None::<NodeStatus>);
    serve_status(&cfg.data_dir, status_rx)?;

    // Incoming connections.
    {
        let endpoint = endpoint.clone();
        let tx = events_tx.clone();
        tokio::spawn(async move {
            while let Some(peer) = endpoint.accept().await {
                attach(&endpoint, peer, hello, tx.clone()).await;
            }
        });
    }
    // Static peers.
    for p in &cfg.peers {
        let endpoint = endpoint.clone();
        let tx = events_tx.clone();
        let p = p.clone();
        tokio::spawn(async move { dial_static(endpoint, p, hello, tx).await });
    }
    // mDNS: candidates arrive on `found_rx`; `found_tx` lives as long as
    // the loop, so the branch below only waits when discovery is off.
    let (found_tx, mut found_rx) = mpsc::channel::<Found>(64);
    let mdns = cfg
        .mdns
        .then(|| discovery::start(discovery_config(&cfg, &ident, listen), found_tx.clone()));
    ready(me, listen);

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
                        links.insert(id, Link { conn: peer.conn, out });
                        queue.push_back(Event::PeerDiscovered(id));
                    }
                }
                Some(ShellEvent::Closed { id, stable_id }) => {
                    if links.get(&id).is_some_and(|l| l.conn.stable_id() == stable_id) {
                        links.remove(&id);
                    }
                }
                Some(ShellEvent::Inbound { from, addr, wire }) => match wire {
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
                    Wire::Hello { listen_port, .. } => {
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
                },
            },
        }

        while let Some(event) = queue.pop_front() {
            for action in node.handle(now_ms(), event) {
                match action {
                    Action::Persist(h) => state.save_hard_state(&h)?,
                    Action::Send { to, msg } => send(&links, to, &Wire::Membership(msg)),
                    Action::BecameLeader { term } => log::info!("leader of term {term}"),
                    Action::SteppedDown { term } => log::info!("stepped down in term {term}"),
                    Action::ComputePlan { epoch, members } => {
                        // The scheduler is wired in later: the body names the members.
                        let body = postcard::to_stdvec(&members).unwrap_or_default();
                        queue.push_back(Event::PlanComputed { epoch, body });
                    }
                    Action::Prepare(plan) => queue.push_back(Event::Prepared {
                        epoch: plan.config.epoch,
                        ok: true,
                    }),
                    Action::PlanCommitted(c) => log_plan(&c),
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
            tokio::spawn(async move {
                match endpoint.connect(addr, id).await {
                    Ok(peer) => attach(&endpoint, peer, hello, tx).await,
                    Err(e) => log::debug!("dialling {id} at {addr}: {e}"),
                }
            });
        }
        if now >= last_gossip + GOSSIP_EVERY {
            last_gossip = now;
            let list: Vec<(NodeId, SocketAddr)> = book.iter().map(|(&i, &a)| (i, a)).collect();
            for &to in links.keys() {
                send(&links, to, &Wire::Peers(list.clone()));
            }
        }
        let status = NodeStatus {
            id: me,
            listen,
            membership: node.status(now_ms()),
            connected: links
                .iter()
                .map(|(&i, l)| (i, l.conn.remote_address()))
                .collect(),
            windows: Vec::new(),
            duplicate_id: duplicate,
            discovery: mdns.as_ref().map(|d| d.stats()),
        };
        let _ = status_tx.send(Some(status));
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
            version: env!("CARGO_PKG_VERSION").to_string(),
            quic_port: listen.port(),
            http_port: None,
            model,
        },
        ip: Some(listen.ip()),
        interfaces: cfg.interfaces.clone(),
        mdns_port: discovery::MDNS_PORT,
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
) {
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(PEER_QUEUE);
    let conn = peer.conn.clone();
    let id = peer.id;
    let hello = match frame::encode_control(&Wire::Hello {
        listen_port: hello.listen_port,
        instance: hello.instance,
    }) {
        Ok(b) => b,
        Err(_) => return,
    };
    let _ = out_tx.try_send(hello);
    // Writer: our stream.
    tokio::spawn(async move {
        let Ok((mut send, _recv)) = conn.open_bi().await else {
            return;
        };
        while let Some(bytes) = out_rx.recv().await {
            if send.write_all(&bytes).await.is_err() {
                return;
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
            quic::serve_connection(&endpoint, peer, None, move |from, f: Frame| {
                let wire: Wire = f.control()?;
                if let Wire::Peers(list) = &wire {
                    if list.len() > MAX_ADDRESSES {
                        return Err(FrameError::Decode(format!("{} peers", list.len())));
                    }
                }
                // A full queue drops the message, as the network might.
                let _ = inbound.try_send(ShellEvent::Inbound { from, addr, wire });
                Ok(None)
            })
            .await;
            let _ = tx.send(ShellEvent::Closed { id, stable_id }).await;
        });
    }
    let _ = tx.send(ShellEvent::Connected { peer, out: out_tx }).await;
}

/// Keeps a connection to a static peer, redialling when it drops.
async fn dial_static(endpoint: Endpoint, peer: String, hello: Hello, tx: mpsc::Sender<ShellEvent>) {
    loop {
        if let Some(addr) = resolve_peer(&peer) {
            match endpoint.connect_any(addr).await {
                Ok(p) => {
                    let same = p.id == endpoint.id();
                    let conn = p.conn.clone();
                    attach(&endpoint, p, hello, tx.clone()).await;
                    conn.closed().await;
                    if same {
                        // This node itself, or a copy of its identity (the
                        // main loop reports which): not dialled again.
                        return;
                    }
                }
                Err(e) => log::debug!("dialling {peer}: {e}"),
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
