//! Each node's serving figures, gossiped: the KV its ring holds, its memory
//! budget, its loading bubbles, how old its oldest unfinished input is,
//! its tokens per second and the bytes it sent over each link. Every node
//! measures its own ([`super::ring::RingStats`]), sends them to its peers
//! with each gossip round ([`super::shell::Wire::Stats`]), and keeps the
//! latest of every peer with the time it came ([`StatsBook`]); the HTTP API
//! reads them from the node's status (`/metrics`, `/v1/cluster`).
//!
//! No I/O here: times come in as milliseconds, so the book and the rate
//! are tested without a clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::net::NodeId;

/// A peer's figures are dropped when none came for this long (five
/// gossip rounds): a node that left disappears from the metrics.
pub const STALE_MS: u64 = 10_000;

/// Links one message may list, and nodes a book keeps: the address
/// book's bound ([`super::shell::MAX_ADDRESSES`]).
pub const MAX_NODES: usize = 64;

/// One node's figures, as it measured them. Counters (`_total` in
/// `/metrics`) count from the node's start; gauges are as of sending.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// The plan epoch of the ring these figures are of; 0 when no ring
    /// runs on the node (then every ring figure is 0).
    pub epoch: u64,
    /// The node's memory budget.
    pub budget_bytes: u64,
    /// Resident weights and streaming slots of its ring.
    pub weights_bytes: u64,
    /// KV the filled positions take, and what its caches hold.
    pub kv_used_bytes: u64,
    pub kv_capacity_bytes: u64,
    /// The plan's KV budget for the node.
    pub kv_budget_bytes: u64,
    /// Loading bubbles: times compute waited for a streamed unit, and
    /// their total time.
    pub bubbles: u64,
    pub bubble_seconds: f64,
    /// Age of the oldest input that reached the node's compute thread and
    /// is not finished (0 when idle): stalls show as a growing backlog.
    pub backlog_ms: u64,
    /// Token positions through the node (each token once, however many
    /// windows it holds), and their rate over the last gossip round.
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Bytes sent to each other ring member, by its id (members it never
    /// sent to are absent).
    pub links: Vec<(NodeId, u64)>,
    /// KV pressure (`ring::kvpressure`, loip/3): units its ring demoted
    /// and promoted (counters), units demoted now, and the positions of
    /// KV it can hold after demoting all it can (0: no limit).
    pub demotions: u64,
    pub promotions: u64,
    pub demoted_units: u64,
    pub kv_positions: u64,
    /// On the head: requests waiting for KV room now, and those that
    /// waited (counter).
    pub kv_waiting: u64,
    pub kv_waited: u64,
}

impl NodeStats {
    /// Whether a peer's message is within bounds (checked on receipt).
    pub fn is_sane(&self) -> bool {
        self.links.len() <= MAX_NODES
            && self.bubble_seconds.is_finite()
            && self.bubble_seconds >= 0.0
            && self.tokens_per_s.is_finite()
            && self.tokens_per_s >= 0.0
    }
}

/// A node's latest figures and how old they are, for the HTTP side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerStats {
    pub id: NodeId,
    /// Seconds since they came (0 for the node's own).
    pub age_s: f64,
    pub stats: NodeStats,
}

/// The latest figures of each node, with when they came.
#[derive(Clone, Debug, Default)]
pub struct StatsBook {
    entries: BTreeMap<NodeId, (NodeStats, u64)>,
}

impl StatsBook {
    /// Keeps `stats` as `from`'s latest, received at `now_ms`. A message
    /// out of bounds is refused (false), and so is a new node past
    /// [`MAX_NODES`].
    pub fn insert(&mut self, from: NodeId, stats: NodeStats, now_ms: u64) -> bool {
        if !stats.is_sane()
            || (self.entries.len() >= MAX_NODES && !self.entries.contains_key(&from))
        {
            return false;
        }
        self.entries.insert(from, (stats, now_ms));
        true
    }

    /// Drops the figures older than [`STALE_MS`].
    pub fn expire(&mut self, now_ms: u64) {
        self.entries
            .retain(|_, (_, at)| now_ms.saturating_sub(*at) < STALE_MS);
    }

    /// The figures not yet stale, by node id.
    pub fn list(&self, now_ms: u64) -> Vec<PeerStats> {
        self.entries
            .iter()
            .filter(|(_, (_, at))| now_ms.saturating_sub(*at) < STALE_MS)
            .map(|(&id, (s, at))| PeerStats {
                id,
                age_s: now_ms.saturating_sub(*at) as f64 / 1000.0,
                stats: s.clone(),
            })
            .collect()
    }
}

/// A counter's rate between two readings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    last: Option<(u64, u64)>,
    per_s: f64,
}

impl Rate {
    /// Takes a reading of `count` at `now_ms`; returns the rate since the
    /// previous one (a counter that went back, on a restart, counts from
    /// zero).
    pub fn update(&mut self, now_ms: u64, count: u64) -> f64 {
        if let Some((t, c)) = self.last {
            let dt = now_ms.saturating_sub(t);
            if dt == 0 {
                return self.per_s;
            }
            let dc = if count >= c { count - c } else { count };
            self.per_s = dc as f64 * 1000.0 / dt as f64;
        }
        self.last = Some((now_ms, count));
        self.per_s
    }

    pub fn get(&self) -> f64 {
        self.per_s
    }
}

/// Counters of the rings a node ran before the current one, so that its
/// `_total` figures only grow across plan epochs.
#[derive(Clone, Debug, Default)]
pub struct Carried {
    pub bubbles: u64,
    pub bubble_us: u64,
    pub demotions: u64,
    pub promotions: u64,
    pub kv_waited: u64,
    pub tokens: u64,
    pub links: BTreeMap<NodeId, u64>,
}

impl Carried {
    /// Adds a ring's final counts.
    pub fn add(&mut self, counts: &super::ring::RingCounts, tokens: u64, links: &[(NodeId, u64)]) {
        self.bubbles += counts.bubbles;
        self.bubble_us += counts.bubble_us;
        self.demotions += counts.demotions;
        self.promotions += counts.promotions;
        self.kv_waited += counts.kv_waited;
        self.tokens += tokens;
        for &(id, b) in links {
            *self.links.entry(id).or_default() += b;
        }
    }

    /// The running ring's links plus what earlier rings sent; links with
    /// no bytes left out.
    pub fn links_with(&self, now: &[(NodeId, u64)]) -> Vec<(NodeId, u64)> {
        let mut all = self.links.clone();
        for &(id, b) in now {
            *all.entry(id).or_default() += b;
        }
        all.into_iter()
            .filter(|&(_, b)| b > 0)
            .take(MAX_NODES)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeStats {
        NodeStats {
            epoch: 3,
            budget_bytes: 60 << 20,
            weights_bytes: 40 << 20,
            kv_used_bytes: 123_456,
            kv_capacity_bytes: 1 << 20,
            kv_budget_bytes: 8 << 20,
            bubbles: 17,
            bubble_seconds: 0.25,
            backlog_ms: 42,
            tokens: 900,
            tokens_per_s: 12.5,
            links: vec![(NodeId(0x51), 4096), (NodeId(u64::MAX), 1)],
            demotions: 9,
            promotions: 4,
            demoted_units: 5,
            kv_positions: 3072,
            kv_waiting: 1,
            kv_waited: 2,
        }
    }

    #[test]
    fn the_stats_message_round_trips_and_bad_bytes_are_refused() {
        use crate::cluster::shell::Wire;
        use crate::net::frame::{decode, encode_control, FrameLimits};
        let bytes = encode_control(&Wire::Stats(Box::new(sample()))).unwrap();
        // After the eight variants of loip/1 (Hello … Generated), whose
        // tags stay as they were.
        assert_eq!(bytes[5], 8, "Wire::Stats is variant 8");
        let frame = decode(&bytes, &FrameLimits::default(), None).unwrap();
        match frame.control::<Wire>().unwrap() {
            Wire::Stats(s) => assert_eq!(*s, sample()),
            other => panic!("decoded as {other:?}"),
        }
        // Postcard alone, every truncation: an error, never a panic or a
        // different message.
        let raw = postcard::to_stdvec(&sample()).unwrap();
        assert_eq!(postcard::from_bytes::<NodeStats>(&raw).unwrap(), sample());
        for n in 0..raw.len() {
            assert!(postcard::from_bytes::<NodeStats>(&raw[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn the_book_keeps_the_latest_and_forgets_a_node_that_left() {
        let mut b = StatsBook::default();
        assert!(b.insert(NodeId(1), sample(), 1_000));
        let mut later = sample();
        later.tokens = 1_000;
        assert!(b.insert(NodeId(1), later.clone(), 3_000));
        assert!(b.insert(NodeId(2), sample(), 2_000));
        let l = b.list(4_000);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].stats, later);
        assert_eq!(l[0].age_s, 1.0);
        // Node 2 stops sending: gone from the list once stale, and from
        // the book once expired.
        let l = b.list(2_000 + STALE_MS);
        assert_eq!(l.iter().map(|p| p.id).collect::<Vec<_>>(), [NodeId(1)]);
        b.expire(3_000 + STALE_MS);
        assert!(b.list(3_000).is_empty());
        // Out of bounds: refused.
        let mut bad = sample();
        bad.links = (0..=MAX_NODES as u64).map(|i| (NodeId(i), 1)).collect();
        assert!(!b.insert(NodeId(3), bad, 0));
        bad = sample();
        bad.bubble_seconds = f64::NAN;
        assert!(!b.insert(NodeId(3), bad, 0));
        for i in 0..MAX_NODES as u64 {
            assert!(b.insert(NodeId(100 + i), sample(), 0));
        }
        assert!(
            !b.insert(NodeId(7), sample(), 0),
            "a full book takes no new node"
        );
        assert!(b.insert(NodeId(100), sample(), 0), "but updates one it has");
    }

    #[test]
    fn a_rate_is_per_second_and_survives_a_counter_reset() {
        let mut r = Rate::default();
        assert_eq!(r.update(0, 100), 0.0);
        assert_eq!(r.update(2_000, 300), 100.0);
        assert_eq!(r.update(2_000, 999), 100.0, "no time passed");
        assert_eq!(r.update(3_000, 50), 50.0, "counted from zero");
    }

    #[test]
    fn carried_counts_add_up_across_rings() {
        let mut c = Carried::default();
        let counts = crate::cluster::ring::RingCounts {
            bubbles: 2,
            bubble_us: 5,
            ..Default::default()
        };
        c.add(&counts, 10, &[(NodeId(1), 100), (NodeId(2), 0)]);
        assert_eq!(
            c.links_with(&[(NodeId(1), 1), (NodeId(3), 7)]),
            [(NodeId(1), 101), (NodeId(3), 7)]
        );
        assert_eq!((c.bubbles, c.bubble_us, c.tokens), (2, 5, 10));
    }
}
