//! Finding peers on the LAN over mDNS (DESIGN.md §1, step 3).
//!
//! Each node announces the service [`SERVICE`] with the TXT records of an
//! [`Advert`]: its node id, the cluster fingerprint (SHA-256 of the CA
//! certificate), the program version, its QUIC port (and HTTP port, if it
//! serves one) and the digest of its model. It browses for the same
//! service and hands the peers it finds to the shell as [`Found`]
//! candidates.
//!
//! # mDNS is only a hint
//!
//! Anyone on the LAN can send adverts. So an advert is never trusted: the
//! shell dials a candidate with the id it announced, and the mutual-TLS
//! handshake fails unless the peer holds a certificate of this cluster's
//! CA for that id. A spoofed advert (a real id at another address) costs
//! one failed dial. Adverts of another cluster (another fingerprint),
//! adverts of this node's own id and malformed adverts are dropped here.
//!
//! # Bounded under floods
//!
//! The [`PeerTable`] holds at most [`MAX_ENTRIES`] peers, evicting first
//! those that already had their turn, and hands out candidates from a token bucket
//! ([`OFFERS_PER_SEC`], burst [`OFFER_BURST`]), oldest offer first, so a
//! flood of adverts costs bounded memory and a bounded dial rate, and the
//! real peers among them still get their turn. The table is deterministic
//! (time is passed in) and tested without a network. (The `mdns-sd`
//! daemon keeps its own cache of records, which this does not bound; a
//! daemon that falls behind loses its subscription, which counts as a
//! death and restarts it with an empty cache.)
//!
//! A withdrawn advert (an mDNS goodbye, as unauthenticated as an advert)
//! removes the id from the table; a peer the shell has proven stays in its
//! address book regardless.
//!
//! # Supervision
//!
//! The mDNS daemon (a thread of the `mdns-sd` crate) is watched: when its
//! event channel closes, or it reports that it has shut down, or it stops
//! answering, it is started again with exponential backoff, and browsing
//! goes on with the same peer table. [`Discovery::kill_daemon`] shuts the
//! daemon down from outside, for tests of this.
//!
//! # Interfaces
//!
//! With [`DiscoveryConfig::interfaces`] set, the daemon uses only the named
//! interfaces (all others, loopback included, are disabled); otherwise it
//! uses all of them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::membership::Millis;
use crate::net::NodeId;

/// The cluster's service type.
pub const SERVICE: &str = "_loip._udp.local.";
/// The standard mDNS port.
pub const MDNS_PORT: u16 = 5353;
/// Most peers kept in the table.
pub const MAX_ENTRIES: usize = 128;
/// Candidates handed to the shell per second, on average.
pub const OFFERS_PER_SEC: u64 = 4;
/// Candidates that may be handed out at once after a quiet spell.
pub const OFFER_BURST: u64 = 8;
/// A peer is offered again at most this often (the shell ignores offers
/// of peers it is connected to).
pub const REOFFER_MS: Millis = 5_000;
/// TXT records read from one advert; the rest are ignored.
const MAX_RECORDS: usize = 32;
/// The longest `version` accepted.
const MAX_VERSION: usize = 32;

const TICK: Duration = Duration::from_millis(100);
const HEALTH_EVERY: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive health checks without an answer before the daemon is taken
/// for dead.
const HEALTH_MISSES: u32 = 3;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A daemon that ran this long resets the backoff.
const STABLE: Duration = Duration::from_secs(60);

/// What a node announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub id: NodeId,
    /// SHA-256 of the cluster CA certificate.
    pub cluster: [u8; 32],
    pub version: String,
    pub quic_port: u16,
    pub http_port: Option<u16>,
    /// The model digest (`plan::profile::model_digest`), when the node has
    /// a model.
    pub model: Option<[u8; 32]>,
}

/// Why an advert was dropped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AdvertError {
    #[error("TXT record `{key}` is missing")]
    Missing { key: &'static str },
    #[error("TXT record `{key}`: {message}")]
    Bad { key: &'static str, message: String },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(key: &'static str, v: &str) -> Result<[u8; 32], AdvertError> {
    let bad = || AdvertError::Bad {
        key,
        message: "expected 64 hex digits".into(),
    };
    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&v[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn port(key: &'static str, v: &str) -> Result<u16, AdvertError> {
    v.parse::<u16>()
        .ok()
        .filter(|&p| p != 0 && v.len() <= 5 && v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| AdvertError::Bad {
            key,
            message: "expected a port number 1-65535".into(),
        })
}

impl Advert {
    /// The TXT records: `id`, `cluster`, `version`, `quic`, and `http` and
    /// `model` when known.
    pub fn txt(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("id", self.id.to_string()),
            ("cluster", hex(&self.cluster)),
            ("version", self.version.chars().take(MAX_VERSION).collect()),
            ("quic", self.quic_port.to_string()),
        ];
        if let Some(p) = self.http_port {
            v.push(("http", p.to_string()));
        }
        if let Some(m) = &self.model {
            v.push(("model", hex(m)));
        }
        v
    }

    /// Parses TXT records (key, value) from the network. Keys are matched
    /// without regard to case and the first occurrence of a key wins
    /// (RFC 6763 §6.4); unknown keys are ignored, and only the first
    /// [`MAX_RECORDS`] records are read.
    pub fn parse<'a>(
        records: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Advert, AdvertError> {
        const KEYS: [&str; 6] = ["id", "cluster", "version", "quic", "http", "model"];
        let mut found: [Option<&str>; 6] = [None; 6];
        for (key, value) in records.into_iter().take(MAX_RECORDS) {
            let Some(i) = KEYS.iter().position(|k| k.eq_ignore_ascii_case(key)) else {
                continue;
            };
            if found[i].is_some() {
                continue;
            }
            let text = std::str::from_utf8(value.unwrap_or_default())
                .ok()
                .filter(|t| t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| AdvertError::Bad {
                    key: KEYS[i],
                    message: "not up to 64 printable ASCII characters".into(),
                })?;
            found[i] = Some(text);
        }
        let need = |i: usize| found[i].ok_or(AdvertError::Missing { key: KEYS[i] });
        let id = need(0)?.parse::<NodeId>().map_err(|e| AdvertError::Bad {
            key: "id",
            message: e.to_string(),
        })?;
        let cluster = unhex32("cluster", need(1)?)?;
        let version = need(2)?;
        if version.is_empty() || version.len() > MAX_VERSION {
            return Err(AdvertError::Bad {
                key: "version",
                message: format!("expected 1 to {MAX_VERSION} characters"),
            });
        }
        let quic_port = port("quic", need(3)?)?;
        let http_port = found[4].map(|v| port("http", v)).transpose()?;
        let model = found[5].map(|v| unhex32("model", v)).transpose()?;
        Ok(Advert {
            id,
            cluster,
            version: version.to_string(),
            quic_port,
            http_port,
            model,
        })
    }
}

/// A peer to dial: the id it announced and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub id: NodeId,
    pub addr: SocketAddr,
}

/// The address to dial among those announced: IPv4 before IPv6, loopback
/// last; unspecified, multicast and IPv6 link-local addresses (which need
/// a scope) are never used.
pub fn pick_address(addrs: impl IntoIterator<Item = IpAddr>, port: u16) -> Option<SocketAddr> {
    addrs
        .into_iter()
        .filter(|ip| {
            !ip.is_unspecified()
                && !ip.is_multicast()
                && match ip {
                    IpAddr::V4(v4) => !v4.is_broadcast(),
                    IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
                }
        })
        .min_by_key(|ip| (ip.is_loopback(), ip.is_ipv6(), *ip))
        .map(|ip| SocketAddr::new(ip, port))
}

/// What [`PeerTable::observe`] did with an advert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// A new peer of this cluster.
    Added,
    /// A peer already in the table at that address.
    Refreshed,
    /// A new peer that took the place of the one seen least recently.
    Evicted(NodeId),
    OtherCluster,
    Ourselves,
    NoAddress,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    seen: Millis,
    offered: Option<Millis>,
}

/// The peers found so far, bounded, and the rate at which they are handed
/// to the shell. Deterministic: time comes in as milliseconds.
///
/// When full, a new advert evicts an entry that was offered already (it
/// had its turn), the one seen least recently; only when none was offered
/// yet does it evict one that was not.
///
/// Entries are keyed by id *and* address: a spoofed advert of a real id at
/// another address does not replace the real one, both are offered, and
/// only the real one passes the handshake.
#[derive(Debug)]
pub struct PeerTable {
    me: NodeId,
    cluster: [u8; 32],
    cap: usize,
    entries: BTreeMap<(NodeId, SocketAddr), Entry>,
    tokens: u64,
    refilled: Millis,
}

impl PeerTable {
    pub fn new(me: NodeId, cluster: [u8; 32], cap: usize) -> PeerTable {
        PeerTable {
            me,
            cluster,
            cap: cap.max(1),
            entries: BTreeMap::new(),
            tokens: OFFER_BURST,
            refilled: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.entries.keys().any(|(i, _)| *i == id)
    }

    /// Takes in an advert seen at `now` from the addresses `addrs`.
    pub fn observe(
        &mut self,
        now: Millis,
        advert: &Advert,
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> Observed {
        if advert.cluster != self.cluster {
            return Observed::OtherCluster;
        }
        if advert.id == self.me {
            return Observed::Ourselves;
        }
        let Some(addr) = pick_address(addrs, advert.quic_port) else {
            return Observed::NoAddress;
        };
        if let Some(e) = self.entries.get_mut(&(advert.id, addr)) {
            e.seen = now;
            return Observed::Refreshed;
        }
        let mut result = Observed::Added;
        if self.entries.len() >= self.cap {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(key, e)| (e.offered.is_none(), e.seen, **key))
                .map(|(key, _)| *key);
            if let Some(old) = oldest {
                self.entries.remove(&old);
                result = Observed::Evicted(old.0);
            }
        }
        self.entries.insert(
            (advert.id, addr),
            Entry {
                seen: now,
                offered: None,
            },
        );
        result
    }

    /// Forgets a peer at every address (its advert was withdrawn).
    pub fn remove(&mut self, id: NodeId) {
        self.entries.retain(|(i, _), _| *i != id);
    }

    /// The candidates to hand to the shell at `now`: peers never offered
    /// first, then those offered longest ago, no more than the token bucket
    /// allows, and each at most once per [`REOFFER_MS`].
    pub fn due(&mut self, now: Millis) -> Vec<Found> {
        let earned = now.saturating_sub(self.refilled) * OFFERS_PER_SEC / 1000;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(OFFER_BURST);
            self.refilled += earned * 1000 / OFFERS_PER_SEC;
        }
        if self.tokens == OFFER_BURST {
            self.refilled = now;
        }
        let mut ready: Vec<(Option<Millis>, (NodeId, SocketAddr))> = self
            .entries
            .iter()
            .filter(|(_, e)| e.offered.is_none_or(|t| now >= t + REOFFER_MS))
            .map(|(key, e)| (e.offered, *key))
            .collect();
        ready.sort();
        let take = ready.len().min(self.tokens as usize);
        let mut out = Vec::with_capacity(take);
        for &(_, key) in &ready[..take] {
            if let Some(e) = self.entries.get_mut(&key) {
                e.offered = Some(now);
                out.push(Found {
                    id: key.0,
                    addr: key.1,
                });
            }
        }
        self.tokens -= take as u64;
        out
    }
}

/// How discovery runs.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    pub advert: Advert,
    /// The address to announce; `None` (or an unspecified address)
    /// announces every address of the interfaces in use.
    pub ip: Option<IpAddr>,
    /// Interfaces to use (empty: all).
    pub interfaces: Vec<String>,
    /// The UDP port of mDNS: [`MDNS_PORT`] except in tests.
    pub mdns_port: u16,
}

/// Counters of what discovery has done, for tests and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiscoveryStats {
    /// Times the daemon was started again after it died.
    pub restarts: u64,
    /// Peers in the table now.
    pub peers: usize,
    /// Adverts dropped: malformed, another cluster's, or this node's own.
    pub ignored: u64,
    /// Candidates handed to the shell.
    pub offered: u64,
}

#[derive(Default)]
struct Shared {
    daemon: Mutex<Option<(ServiceDaemon, String)>>,
    restarts: AtomicU64,
    peers: AtomicUsize,
    ignored: AtomicU64,
    offered: AtomicU64,
}

impl Shared {
    fn daemon(&self) -> std::sync::MutexGuard<'_, Option<(ServiceDaemon, String)>> {
        self.daemon.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Running discovery: announces and browses until dropped.
///
/// Cancel safety: dropping it stops the supervising task, withdraws the
/// announcement and shuts the daemon down.
pub struct Discovery {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts discovery on the current tokio runtime; found peers go to `out`
/// (when it is full, offers are dropped and made again later).
pub fn start(cfg: DiscoveryConfig, out: mpsc::Sender<Found>) -> Discovery {
    let shared = Arc::new(Shared::default());
    let task = tokio::spawn(supervise(cfg, shared.clone(), out));
    Discovery { shared, task }
}

impl Discovery {
    /// What discovery has done so far.
    pub fn stats(&self) -> DiscoveryStats {
        DiscoveryStats {
            restarts: self.shared.restarts.load(Ordering::Relaxed),
            peers: self.shared.peers.load(Ordering::Relaxed),
            ignored: self.shared.ignored.load(Ordering::Relaxed),
            offered: self.shared.offered.load(Ordering::Relaxed),
        }
    }

    /// Shuts the running mDNS daemon down from outside, as if it had died;
    /// the supervisor starts a new one. Returns whether one was running.
    /// For tests of the supervision.
    pub fn kill_daemon(&self) -> bool {
        match self.shared.daemon().as_ref() {
            Some((d, _)) => d.shutdown().is_ok(),
            None => false,
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((d, fullname)) = self.shared.daemon().take() {
            let _ = d.unregister(&fullname);
            let _ = d.shutdown();
        }
    }
}

/// Why a daemon stopped being used.
enum Stop {
    /// The shell is gone: discovery ends.
    OutputClosed,
    /// The daemon died: start another.
    Died(&'static str),
}

async fn supervise(cfg: DiscoveryConfig, shared: Arc<Shared>, out: mpsc::Sender<Found>) {
    let origin = Instant::now();
    let mut table = PeerTable::new(cfg.advert.id, cfg.advert.cluster, MAX_ENTRIES);
    let mut backoff = BACKOFF_MIN;
    for name in &cfg.interfaces {
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            log::warn!("mDNS: there is no interface {name} (yet); discovery will not use it");
        }
    }
    loop {
        let began = Instant::now();
        match open_daemon(&cfg) {
            Ok((daemon, fullname, events)) => {
                *shared.daemon() = Some((daemon.clone(), fullname));
                let stop = browse(&daemon, events, &mut table, &shared, &out, origin).await;
                if let Some((d, fullname)) = shared.daemon().take() {
                    let _ = d.unregister(&fullname);
                    let _ = d.shutdown();
                }
                match stop {
                    Stop::OutputClosed => return,
                    Stop::Died(why) => {
                        log::warn!("mDNS: the daemon stopped ({why}); restarting it")
                    }
                }
            }
            Err(e) => log::warn!("mDNS: cannot start the daemon: {e}"),
        }
        if began.elapsed() >= STABLE {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        shared.restarts.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts a daemon on the chosen interfaces, announces, and browses.
fn open_daemon(
    cfg: &DiscoveryConfig,
) -> Result<(ServiceDaemon, String, mdns_sd::Receiver<ServiceEvent>), mdns_sd::Error> {
    let daemon = ServiceDaemon::new_with_port(cfg.mdns_port)?;
    match announce_and_browse(&daemon, cfg) {
        Ok((fullname, events)) => Ok((daemon, fullname, events)),
        Err(e) => {
            let _ = daemon.shutdown();
            Err(e)
        }
    }
}

fn announce_and_browse(
    daemon: &ServiceDaemon,
    cfg: &DiscoveryConfig,
) -> Result<(String, mdns_sd::Receiver<ServiceEvent>), mdns_sd::Error> {
    if !cfg.interfaces.is_empty() {
        daemon.disable_interface(IfKind::All)?;
        daemon.enable_interface(
            cfg.interfaces
                .iter()
                .map(|n| IfKind::Name(n.clone()))
                .collect::<Vec<_>>(),
        )?;
    }
    let instance = cfg.advert.id.to_string();
    let host = format!("loip-{instance}.local.");
    let txt = cfg.advert.txt();
    let props: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let port = cfg.advert.quic_port;
    let info = match cfg.ip.filter(|ip| !ip.is_unspecified()) {
        Some(ip) => ServiceInfo::new(SERVICE, &instance, &host, ip, port, &props[..])?,
        None => {
            ServiceInfo::new(SERVICE, &instance, &host, "", port, &props[..])?.enable_addr_auto()
        }
    };
    let fullname = info.get_fullname().to_string();
    daemon.register(info)?;
    let events = daemon.browse(SERVICE)?;
    Ok((fullname, events))
}

/// A status request to the daemon, answered later.
struct Probe {
    answer: mdns_sd::Receiver<mdns_sd::DaemonStatus>,
    sent: Instant,
}

/// Feeds the daemon's events into the table and hands candidates out,
/// until the daemon dies or the shell goes away.
async fn browse(
    daemon: &ServiceDaemon,
    events: mdns_sd::Receiver<ServiceEvent>,
    table: &mut PeerTable,
    shared: &Shared,
    out: &mpsc::Sender<Found>,
    origin: Instant,
) -> Stop {
    let now = || origin.elapsed().as_millis() as Millis;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut health = tokio::time::interval(HEALTH_EVERY);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The health check never blocks this loop: a busy daemon answers late
    // while events and offers go on.
    let mut probe: Option<Probe> = None;
    let mut misses = 0;
    loop {
        let answer = probe.as_ref().map(|p| p.answer.clone());
        let status = async move {
            match answer {
                Some(rx) => rx.recv_async().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv_async() => match ev {
                Err(_) => return Stop::Died("its event channel closed"),
                Ok(ServiceEvent::ServiceResolved(info)) => {
                    let advert = Advert::parse(
                        info.get_properties().iter().map(|p| (p.key(), p.val())),
                    );
                    let addrs: Vec<IpAddr> = info
                        .get_addresses()
                        .iter()
                        .take(16)
                        .map(|a| a.to_ip_addr())
                        .collect();
                    match &advert {
                        Ok(a) => match table.observe(now(), a, addrs) {
                            Observed::Added => log::debug!("mDNS: found {}", a.id),
                            Observed::Refreshed => {}
                            Observed::Evicted(old) => {
                                log::debug!("mDNS: peer table full; forgot {old}")
                            }
                            Observed::OtherCluster => {
                                log::debug!("mDNS: ignoring {}: another cluster's node", a.id);
                                shared.ignored.fetch_add(1, Ordering::Relaxed);
                            }
                            Observed::Ourselves | Observed::NoAddress => {
                                shared.ignored.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                        Err(e) => {
                            log::debug!("mDNS: ignoring the advert {}: {e}", info.get_fullname());
                            shared.ignored.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    shared.peers.store(table.len(), Ordering::Relaxed);
                }
                Ok(ServiceEvent::ServiceRemoved(_, fullname)) => {
                    let instance = fullname.split('.').next().unwrap_or_default();
                    if let Ok(id) = instance.parse::<NodeId>() {
                        table.remove(id);
                        shared.peers.store(table.len(), Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
            },
            _ = tick.tick() => {
                for found in table.due(now()) {
                    match out.try_send(found) {
                        Ok(()) => {
                            shared.offered.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return Stop::OutputClosed,
                    }
                }
            }
            st = status => {
                probe = None;
                match st {
                    Ok(mdns_sd::DaemonStatus::Running) => misses = 0,
                    _ => return Stop::Died("it reports that it has shut down"),
                }
            }
            _ = health.tick() => {
                if probe.as_ref().is_some_and(|p| p.sent.elapsed() >= HEALTH_TIMEOUT) {
                    probe = None;
                    misses += 1;
                    if misses >= HEALTH_MISSES {
                        return Stop::Died("it does not answer");
                    }
                }
                if probe.is_none() {
                    match daemon.status() {
                        Ok(answer) => probe = Some(Probe { answer, sent: Instant::now() }),
                        // Its command queue is full: it is busy, not dead.
                        Err(mdns_sd::Error::Again) => {}
                        Err(_) => return Stop::Died("it no longer takes commands"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(id: u64, cluster: u8) -> Advert {
        Advert {
            id: NodeId(id),
            cluster: [cluster; 32],
            version: "0.1.0".into(),
            quic_port: 7470,
            http_port: None,
            model: None,
        }
    }

    fn records(txt: &[(&'static str, String)]) -> Vec<(&'static str, Option<Vec<u8>>)> {
        txt.iter()
            .map(|(k, v)| (*k, Some(v.as_bytes().to_vec())))
            .collect()
    }

    fn parse(r: &[(&str, Option<Vec<u8>>)]) -> Result<Advert, AdvertError> {
        Advert::parse(r.iter().map(|(k, v)| (*k, v.as_deref())))
    }

    #[test]
    fn adverts_round_trip_through_txt() {
        let mut a = advert(0xabc, 7);
        assert_eq!(parse(&records(&a.txt())), Ok(a.clone()));
        a.http_port = Some(8080);
        a.model = Some([0x5a; 32]);
        let r = records(&a.txt());
        assert_eq!(parse(&r), Ok(a.clone()));
        // Keys ignore case; the first occurrence wins; unknown keys pass.
        let mut r2: Vec<(&str, Option<Vec<u8>>)> = vec![("ID", Some(b"0000000000000abc".to_vec()))];
        r2.extend(r.iter().cloned());
        r2.push(("extra", None));
        assert_eq!(parse(&r2), Ok(a));
    }

    #[test]
    fn malformed_adverts_are_refused() {
        let good = records(&advert(1, 1).txt());
        let with = |key: &'static str, value: Option<&[u8]>| {
            let mut r: Vec<(&str, Option<Vec<u8>>)> =
                good.iter().filter(|(k, _)| *k != key).cloned().collect();
            r.insert(0, (key, value.map(<[u8]>::to_vec)));
            r
        };
        for key in ["id", "cluster", "version", "quic"] {
            let r: Vec<_> = good.iter().filter(|(k, _)| *k != key).cloned().collect();
            assert_eq!(parse(&r), Err(AdvertError::Missing { key }), "{key}");
        }
        let cases: [(&str, &[u8]); 14] = [
            ("id", b"123"),
            ("id", b"zzzzzzzzzzzzzzzz"),
            ("id", b""),
            ("cluster", b"00"),
            ("cluster", &[b'g'; 64]),
            ("version", b""),
            ("version", &[b'v'; 40]),
            ("version", b"0.1 beta"),
            ("quic", b"0"),
            ("quic", b"65536"),
            ("quic", b"+80"),
            ("http", b"-1"),
            ("model", b"abc"),
            ("id", &[0xff, 0xfe, 0x00]),
        ];
        for (key, value) in cases {
            let e = parse(&with(key, Some(value))).unwrap_err();
            assert!(
                matches!(&e, AdvertError::Bad { key: k, .. } if *k == key),
                "{key}={value:?}: {e}"
            );
        }
        // A value-less key is an empty value.
        assert!(parse(&with("quic", None)).is_err());
        // Huge values and many records cost nothing and do not pass.
        let big = vec![b'a'; 1 << 16];
        assert!(parse(&with("id", Some(&big))).is_err());
        let many: Vec<(&str, Option<Vec<u8>>)> = (0..10_000).map(|_| ("junk", None)).collect();
        assert_eq!(parse(&many), Err(AdvertError::Missing { key: "id" }));
        // Random bytes never panic.
        let mut seed = 11u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        };
        for _ in 0..2000 {
            let mut r = good.clone();
            let i = next() as usize % r.len();
            let len = next() as usize % 80;
            r[i].1 = Some((0..len).map(|_| next()).collect());
            let _ = parse(&r);
        }
    }

    #[test]
    fn addresses_prefer_routable_ipv4() {
        let ips: Vec<IpAddr> = [
            "::1",
            "127.0.0.1",
            "fe80::1",
            "10.0.0.7",
            "fd00::2",
            "0.0.0.0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(
            pick_address(ips.clone(), 9),
            Some("10.0.0.7:9".parse().unwrap())
        );
        assert_eq!(
            pick_address(ips[..3].to_vec(), 9),
            Some("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(
            pick_address(
                vec!["fe80::1".parse().unwrap(), "224.0.0.251".parse().unwrap()],
                9
            ),
            None
        );
    }

    #[test]
    fn the_table_drops_strangers_and_itself() {
        let mut t = PeerTable::new(NodeId(1), [1; 32], 8);
        let ip = || vec!["10.0.0.2".parse::<IpAddr>().unwrap()];
        assert_eq!(t.observe(0, &advert(2, 9), ip()), Observed::OtherCluster);
        assert_eq!(t.observe(0, &advert(1, 1), ip()), Observed::Ourselves);
        assert_eq!(t.observe(0, &advert(2, 1), vec![]), Observed::NoAddress);
        assert!(t.is_empty());
        assert_eq!(t.observe(0, &advert(2, 1), ip()), Observed::Added);
        assert_eq!(
            t.due(0),
            vec![Found {
                id: NodeId(2),
                addr: "10.0.0.2:7470".parse().unwrap()
            }]
        );
        // Not offered again before REOFFER_MS.
        assert_eq!(t.due(REOFFER_MS - 1), vec![]);
        assert_eq!(t.due(REOFFER_MS).len(), 1);
        assert_eq!(
            t.observe(REOFFER_MS, &advert(2, 1), ip()),
            Observed::Refreshed
        );
        // The same id at another address (a move, or a spoof) does not
        // replace the first: both are offered, the handshake tells.
        let other = vec!["10.0.0.3".parse::<IpAddr>().unwrap()];
        assert_eq!(
            t.observe(REOFFER_MS + 1, &advert(2, 1), other),
            Observed::Added
        );
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.due(REOFFER_MS + 300),
            vec![Found {
                id: NodeId(2),
                addr: "10.0.0.3:7470".parse().unwrap()
            }]
        );
        assert!(t.contains(NodeId(2)));
        t.remove(NodeId(2));
        assert!(t.is_empty());
    }

    #[test]
    fn a_flood_is_bounded_and_real_peers_still_get_their_turn() {
        let cap = 64;
        let mut t = PeerTable::new(NodeId(1), [1; 32], cap);
        let ip = vec!["10.0.0.2".parse::<IpAddr>().unwrap()];
        // A real peer, then 100 000 spoofed ids over 10 s, with the real
        // peer re-announcing every second.
        t.observe(0, &advert(2, 1), ip.clone());
        let mut offered = Vec::new();
        for step in 0..100_000u64 {
            let now = step / 10; // 10 adverts per ms
            t.observe(now, &advert(1000 + step, 1), ip.clone());
            if step % 10_000 == 0 {
                t.observe(now, &advert(2, 1), ip.clone());
            }
            assert!(t.len() <= cap);
            if step % 1000 == 0 {
                offered.extend(t.due(now));
            }
        }
        let secs = 10;
        assert!(
            offered.len() as u64 <= OFFER_BURST + OFFERS_PER_SEC * secs,
            "{} offers in {secs} s",
            offered.len()
        );
        assert!(offered.len() as u64 >= OFFERS_PER_SEC * (secs - 1));
        assert!(
            offered.iter().any(|f| f.id == NodeId(2)),
            "the real peer was offered"
        );
    }

    #[test]
    fn a_full_table_evicts_peers_that_had_their_turn_first() {
        let mut t = PeerTable::new(NodeId(1), [1; 32], 2);
        let ip = || vec!["10.0.0.2".parse::<IpAddr>().unwrap()];
        assert_eq!(t.observe(0, &advert(2, 1), ip()), Observed::Added);
        assert_eq!(t.due(0).len(), 1);
        assert_eq!(t.observe(1, &advert(3, 1), ip()), Observed::Added);
        // 2 was offered, 3 not yet: 2 goes although 3 is as old.
        assert_eq!(
            t.observe(2, &advert(4, 1), ip()),
            Observed::Evicted(NodeId(2))
        );
        // None offered: the least recently seen goes.
        assert_eq!(
            t.observe(3, &advert(5, 1), ip()),
            Observed::Evicted(NodeId(3))
        );
        assert!(t.contains(NodeId(4)) && t.contains(NodeId(5)));
    }

    #[test]
    fn the_token_bucket_refills_at_its_rate() {
        let mut t = PeerTable::new(NodeId(1), [1; 32], 1000);
        let ip = vec!["10.0.0.2".parse::<IpAddr>().unwrap()];
        for i in 0..100 {
            t.observe(0, &advert(10 + i, 1), ip.clone());
        }
        assert_eq!(t.due(0).len() as u64, OFFER_BURST);
        assert_eq!(t.due(1).len(), 0);
        let mut total = 0;
        for ms in (0..=10_000).step_by(50) {
            total += t.due(1_000 + ms).len() as u64;
        }
        // 11 s after the burst, at OFFERS_PER_SEC.
        assert!(
            (OFFERS_PER_SEC * 10..=OFFERS_PER_SEC * 11 + 1).contains(&total),
            "{total}"
        );
    }
}
