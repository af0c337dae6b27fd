//! The leader's view of the links as they change: probe samples filtered
//! into estimates, and the gate that turns a better plan under those
//! estimates into a re-plan (issue #9, DESIGN.md §7). Both are pure state
//! machines; the shell probes, plans and keeps the estimates in sled.
//!
//! - [`LinkWatch`]: one estimate per peer, the median of its last
//!   [`WINDOW`] plausible samples. A sample is refused when it cannot be a
//!   measurement: a transfer that took no time, a round trip of zero,
//!   infinity or over a minute, or one taken at an instant before the
//!   previous sample of that peer (a clock that jumped back). A lone
//!   outlier moves a median of five by nothing. Plans are judged by an
//!   estimate only once it rests on [`JUDGE_AFTER`] samples.
//! - [`ReplanGate`]: fires when the best plan under the current estimates
//!   beats the committed one by at least [`MIN_GAIN`] (by the scheduler's
//!   objective) in every evaluation for [`SUSTAIN`], so that noise and a
//!   passing burst do not flap the plan; after firing it waits for a new
//!   epoch to be judged afresh.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::net::NodeId;
use crate::plan::Link;

/// Samples per estimate.
pub const WINDOW: usize = 5;
/// Samples a peer's estimate needs before plans are judged by it: the
/// median of one or two samples is one sample's noise, which on a loaded
/// loopback can move the best plan by several percent.
pub const JUDGE_AFTER: usize = 3;
/// The predicted gain that makes a re-plan worth it.
pub const MIN_GAIN: f64 = 0.10;
/// How long the gain must hold.
pub const SUSTAIN: Duration = Duration::from_secs(4);

/// One probe of a link: a bulk transfer and a round trip.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSample {
    /// Bytes of the bulk transfer.
    pub bytes: u64,
    /// Seconds the transfer took, less one round trip.
    pub transfer_s: f64,
    /// Median round trip of the pings, seconds.
    pub rtt_s: f64,
}

impl LinkSample {
    /// Why this sample cannot be a measurement, if it cannot.
    pub fn implausible(&self) -> Option<&'static str> {
        let finite = self.transfer_s.is_finite() && self.rtt_s.is_finite();
        if !finite {
            Some("a time that is not a number")
        } else if self.bytes == 0 {
            Some("a transfer of no bytes")
        } else if self.transfer_s < 1e-5 {
            Some("a transfer that took no time")
        } else if self.rtt_s <= 0.0 {
            Some("a round trip of no time")
        } else if self.rtt_s > 60.0 || self.transfer_s > 600.0 {
            Some("a time over the probe's limit")
        } else {
            None
        }
    }

    /// The link this sample describes (one-way latency: half the round
    /// trip).
    pub fn link(&self) -> Link {
        Link {
            bandwidth_bps: self.bytes as f64 * 8.0 / self.transfer_s,
            latency_s: self.rtt_s / 2.0,
        }
    }
}

/// A link estimate as kept in sled (tree `links`, key: the peer's id).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredLink {
    pub bandwidth_bps: f64,
    pub latency_s: f64,
    /// When it was measured, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

#[derive(Debug, Default)]
struct Peer {
    /// Recent plausible samples' links, oldest first.
    recent: Vec<Link>,
    last_at: Option<Instant>,
}

/// Link estimates per peer.
#[derive(Debug, Default)]
pub struct LinkWatch {
    peers: BTreeMap<NodeId, Peer>,
    /// Samples refused so far.
    pub refused: u64,
}

impl LinkWatch {
    /// Takes a sample of the link to `peer` taken at `at`; returns why it
    /// was refused, if it was.
    pub fn observe(
        &mut self,
        peer: NodeId,
        sample: &LinkSample,
        at: Instant,
    ) -> Result<(), &'static str> {
        let p = self.peers.entry(peer).or_default();
        let why = sample.implausible().or_else(|| {
            p.last_at
                .is_some_and(|t| at < t)
                .then_some("a sample older than the last one (the clock went back)")
        });
        if let Some(why) = why {
            self.refused += 1;
            return Err(why);
        }
        p.last_at = Some(at);
        if p.recent.len() == WINDOW {
            p.recent.remove(0);
        }
        p.recent.push(sample.link());
        Ok(())
    }

    /// Seeds the estimate of `peer` with a stored one (a restarted node),
    /// unless it comes from the future (a clock that jumped) or is older
    /// than `max_age`.
    pub fn seed(&mut self, peer: NodeId, s: &StoredLink, now_unix_ms: u64, max_age: Duration) {
        let plausible = s.bandwidth_bps.is_finite()
            && s.bandwidth_bps > 0.0
            && s.latency_s.is_finite()
            && s.latency_s >= 0.0;
        let age_ms = now_unix_ms.checked_sub(s.unix_ms);
        if !plausible || age_ms.is_none_or(|a| a > max_age.as_millis() as u64) {
            self.refused += 1;
            return;
        }
        let p = self.peers.entry(peer).or_default();
        if p.recent.is_empty() {
            p.recent.push(Link {
                bandwidth_bps: s.bandwidth_bps,
                latency_s: s.latency_s,
            });
        }
    }

    /// The estimate of the link to `peer`: the medians of its recent
    /// samples' bandwidths and latencies.
    pub fn estimate(&self, peer: NodeId) -> Option<Link> {
        let p = self.peers.get(&peer)?;
        if p.recent.is_empty() {
            return None;
        }
        let median = |f: fn(&Link) -> f64| {
            let mut v: Vec<f64> = p.recent.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Some(Link {
            bandwidth_bps: median(|l| l.bandwidth_bps),
            latency_s: median(|l| l.latency_s),
        })
    }

    /// Whether `peer`'s estimate rests on [`JUDGE_AFTER`] samples or more
    /// (a seeded estimate counts as one).
    pub fn settled(&self, peer: NodeId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.recent.len() >= JUDGE_AFTER)
    }

    /// Every peer's estimate.
    pub fn estimates(&self) -> BTreeMap<NodeId, Link> {
        self.peers
            .keys()
            .filter_map(|&id| Some((id, self.estimate(id)?)))
            .collect()
    }

    /// Forgets a peer (it left the cluster).
    pub fn forget(&mut self, peer: NodeId) {
        self.peers.remove(&peer);
    }
}

/// Whether a better plan has been better for long enough.
#[derive(Debug)]
pub struct ReplanGate {
    min_gain: f64,
    sustain: Duration,
    /// The epoch being judged, and since when every evaluation of it has
    /// shown the gain.
    epoch: u64,
    since: Option<Instant>,
    fired: bool,
}

impl ReplanGate {
    pub fn new(min_gain: f64, sustain: Duration) -> ReplanGate {
        ReplanGate {
            min_gain,
            sustain,
            epoch: 0,
            since: None,
            fired: false,
        }
    }

    /// One evaluation under `epoch`'s plan: the best plan's objective is
    /// `gain` (1 − best / committed) better. Returns true once, when the
    /// gain has held for the sustain time.
    pub fn observe(&mut self, epoch: u64, gain: f64, now: Instant) -> bool {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.since = None;
            self.fired = false;
        }
        if self.fired {
            return false;
        }
        if !(gain.is_finite() && gain >= self.min_gain && gain <= 1.0) {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= self.sustain {
            self.fired = true;
            return true;
        }
        false
    }

    /// Since when the current gain has held, if it holds.
    pub fn holding_since(&self) -> Option<Instant> {
        self.since.filter(|_| !self.fired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn sample(mbit: f64, rtt_ms: f64) -> LinkSample {
        // 256 KiB at `mbit` Mbit/s.
        let bytes = 256 * 1024;
        LinkSample {
            bytes,
            transfer_s: bytes as f64 * 8.0 / (mbit * 1e6),
            rtt_s: rtt_ms / 1e3,
        }
    }

    #[test]
    fn the_estimate_is_the_median_and_one_outlier_moves_it_not() {
        let mut w = LinkWatch::default();
        let t = Instant::now();
        let a = NodeId(2);
        for (i, mbit) in [1000.0, 900.0, 5.0, 1100.0, 1000.0].into_iter().enumerate() {
            w.observe(a, &sample(mbit, 1.0), t + i as u32 * S).unwrap();
        }
        let e = w.estimate(a).unwrap();
        assert!((e.bandwidth_bps - 1e9).abs() < 1e3, "{e:?}");
        assert!(w.settled(a));
        assert!((e.latency_s - 0.5e-3).abs() < 1e-9);
        // A lasting drop shows once it is most of the window.
        for i in 0..3 {
            w.observe(a, &sample(100.0, 1.0), t + (10 + i) * S).unwrap();
        }
        let e = w.estimate(a).unwrap();
        assert!((e.bandwidth_bps - 1e8).abs() < 1e3, "{e:?}");
    }

    #[test]
    fn an_estimate_is_settled_after_enough_samples() {
        let mut w = LinkWatch::default();
        let t = Instant::now();
        let a = NodeId(2);
        assert!(!w.settled(a));
        w.seed(
            a,
            &StoredLink {
                bandwidth_bps: 1e9,
                latency_s: 1e-3,
                unix_ms: 1000,
            },
            2000,
            S,
        );
        assert!(
            w.estimate(a).is_some() && !w.settled(a),
            "a seed is one sample"
        );
        for i in 1..JUDGE_AFTER {
            assert!(!w.settled(a));
            w.observe(a, &sample(1000.0, 1.0), t + i as u32 * S)
                .unwrap();
        }
        assert!(w.settled(a));
        // Refused samples count for nothing.
        let b = NodeId(3);
        for i in 0..2 * JUDGE_AFTER as u32 {
            let _ = w.observe(b, &sample(1000.0, 0.0), t + i * S);
        }
        assert!(!w.settled(b));
        w.forget(a);
        assert!(!w.settled(a));
    }

    #[test]
    fn absurd_samples_are_refused_and_change_nothing() {
        let mut w = LinkWatch::default();
        let t = Instant::now();
        let a = NodeId(2);
        w.observe(a, &sample(1000.0, 1.0), t + 10 * S).unwrap();
        let before = w.estimate(a);
        let zero_time = LinkSample {
            transfer_s: 0.0,
            ..sample(1000.0, 1.0)
        };
        assert_eq!(
            w.observe(a, &zero_time, t + 11 * S),
            Err("a transfer that took no time")
        );
        let nan = LinkSample {
            rtt_s: f64::NAN,
            ..sample(1000.0, 1.0)
        };
        assert!(w.observe(a, &nan, t + 12 * S).is_err());
        let no_rtt = sample(1000.0, 0.0);
        assert!(w.observe(a, &no_rtt, t + 12 * S).is_err());
        let empty = LinkSample {
            bytes: 0,
            ..sample(1000.0, 1.0)
        };
        assert!(w.observe(a, &empty, t + 12 * S).is_err());
        // A sample from before the last one: the clock went back.
        let e = w.observe(a, &sample(1.0, 900.0), t + 5 * S).unwrap_err();
        assert!(e.contains("clock"), "{e}");
        assert_eq!(w.refused, 5);
        assert_eq!(w.estimate(a), before);
    }

    #[test]
    fn stored_estimates_seed_unless_from_the_future_or_stale() {
        let mut w = LinkWatch::default();
        let now = 1_000_000_000;
        let link = |unix_ms| StoredLink {
            bandwidth_bps: 1e8,
            latency_s: 1e-3,
            unix_ms,
        };
        w.seed(NodeId(2), &link(now - 1000), now, 3600 * S);
        w.seed(NodeId(3), &link(now + 60_000), now, 3600 * S);
        w.seed(NodeId(4), &link(now - 7_200_000), now, 3600 * S);
        w.seed(
            NodeId(5),
            &StoredLink {
                bandwidth_bps: f64::INFINITY,
                ..link(now)
            },
            now,
            3600 * S,
        );
        assert_eq!(w.estimate(NodeId(2)).unwrap().bandwidth_bps, 1e8);
        assert_eq!(w.estimate(NodeId(3)), None);
        assert_eq!(w.estimate(NodeId(4)), None);
        assert_eq!(w.estimate(NodeId(5)), None);
        assert_eq!(w.refused, 3);
    }

    #[test]
    fn the_gate_fires_once_on_a_sustained_gain_only() {
        let mut g = ReplanGate::new(MIN_GAIN, SUSTAIN);
        let t = Instant::now();
        // Below the threshold, or flapping around it: never.
        for i in 0..20u32 {
            let gain = if i % 2 == 0 { 0.3 } else { 0.05 };
            assert!(!g.observe(1, gain, t + i * S));
        }
        // Absurd gains reset the clock too.
        assert!(!g.observe(1, 0.3, t + 30 * S));
        assert!(!g.observe(1, f64::NAN, t + 31 * S));
        assert!(!g.observe(1, 0.3, t + 32 * S));
        assert!(!g.observe(1, 0.3, t + 35 * S));
        // Held for the sustain time: once.
        assert!(g.observe(1, 0.3, t + 36 * S));
        assert!(!g.observe(1, 0.3, t + 40 * S));
        // A new epoch is judged afresh.
        assert!(!g.observe(2, 0.3, t + 41 * S));
        assert!(g.observe(2, 0.3, t + 45 * S));
    }
}
