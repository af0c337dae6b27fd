//! Whether this node is fit to hold windows: a pure state machine the shell
//! feeds with its ring's backlog and failures, whose verdict travels in the
//! node's report for the leader to plan by (`dist::make_plan`).
//!
//! A node is unfit when its ring stalls (an input has waited at its compute
//! thread longer than the stall limit: the device fell so far behind that
//! the ring waits for it) or when its ring failed to start on a committed
//! plan. The node itself decides, because it alone sees its queue; a node
//! that stops answering altogether is the membership's failure detector's.
//!
//! Hysteresis: an unfit node stays unfit for a cool-down (ten stall limits
//! and at least a minute, doubled on each new strike up to an hour), so a node that stalls once it
//! holds windows again is not planned in and out at every step. A node
//! that stayed fit for longer than its last cool-down starts from the first
//! strike again.

use std::time::{Duration, Instant};

/// The shortest and the longest cool-down.
const MIN_COOLDOWN: Duration = Duration::from_secs(60);
const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

/// This node's fitness to hold windows.
#[derive(Debug)]
pub struct Fitness {
    stall_limit: Duration,
    /// The reason and the end of the current cool-down, while unfit.
    unfit: Option<(String, Instant)>,
    /// Strikes so far, and when the last cool-down ended.
    strikes: u32,
    fit_since: Option<Instant>,
}

impl Fitness {
    pub fn new(stall_limit: Duration) -> Fitness {
        Fitness {
            stall_limit,
            unfit: None,
            strikes: 0,
            fit_since: None,
        }
    }

    /// Why the node should hold no windows, while it should not.
    pub fn unfit(&self) -> Option<&str> {
        self.unfit.as_ref().map(|(why, _)| why.as_str())
    }

    /// The oldest input at the ring's compute thread is `backlog` old.
    /// Returns whether the verdict changed.
    pub fn backlog(&mut self, backlog: Duration, now: Instant) -> bool {
        if backlog <= self.stall_limit || self.unfit.is_some() {
            return false;
        }
        self.strike(
            format!(
                "its ring stalled: an input waited {:.1} s at its compute thread (limit {:.1} s)",
                backlog.as_secs_f64(),
                self.stall_limit.as_secs_f64()
            ),
            now,
        );
        true
    }

    /// The ring of a committed plan failed to start. Returns whether the
    /// verdict changed.
    pub fn ring_failed(&mut self, why: &str, now: Instant) -> bool {
        if self.unfit.is_some() {
            return false;
        }
        self.strike(format!("its ring failed to start: {why}"), now);
        true
    }

    /// Time passes: ends a cool-down that is over. Returns whether the
    /// verdict changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        match &self.unfit {
            Some((_, until)) if now >= *until => {
                self.unfit = None;
                self.fit_since = Some(now);
                true
            }
            _ => false,
        }
    }

    /// The cool-down of the `strikes`-th strike.
    fn cooldown(&self, strikes: u32) -> Duration {
        let base = self.stall_limit.saturating_mul(10).max(MIN_COOLDOWN);
        base.saturating_mul(1u32 << strikes.saturating_sub(1).min(16))
            .min(MAX_COOLDOWN)
    }

    fn strike(&mut self, why: String, now: Instant) {
        let forgiven = self
            .fit_since
            .is_some_and(|t| now.duration_since(t) > self.cooldown(self.strikes));
        if forgiven {
            self.strikes = 0;
        }
        self.strikes += 1;
        let until = now + self.cooldown(self.strikes);
        self.unfit = Some((why, until));
        self.fit_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_backlog_within_the_limit_keeps_the_node_fit() {
        let mut f = Fitness::new(10 * S);
        let t = Instant::now();
        assert!(!f.backlog(10 * S, t));
        assert!(!f.backlog(Duration::ZERO, t));
        assert_eq!(f.unfit(), None);
    }

    #[test]
    fn a_stall_makes_it_unfit_for_a_cooldown_that_doubles_per_strike() {
        let mut f = Fitness::new(10 * S);
        let t0 = Instant::now();
        assert!(f.backlog(11 * S, t0));
        let why = f.unfit().unwrap().to_string();
        assert!(why.contains("stalled") && why.contains("11.0 s"), "{why}");
        // Unfit the whole cool-down (10 limits), whatever the backlog says.
        assert!(!f.backlog(Duration::ZERO, t0 + 5 * S));
        assert!(!f.tick(t0 + 99 * S));
        assert!(f.unfit().is_some());
        assert!(f.tick(t0 + 100 * S));
        assert_eq!(f.unfit(), None);
        // Stalls again soon after: twice as long.
        let t1 = t0 + 105 * S;
        assert!(f.backlog(20 * S, t1));
        assert!(!f.tick(t1 + 199 * S));
        assert!(f.tick(t1 + 200 * S));
        // And again: four times.
        let t2 = t1 + 201 * S;
        assert!(f.backlog(20 * S, t2));
        assert!(!f.tick(t2 + 399 * S));
        assert!(f.tick(t2 + 400 * S));
    }

    #[test]
    fn a_node_fit_for_longer_than_its_last_cooldown_starts_over() {
        let mut f = Fitness::new(10 * S);
        let t0 = Instant::now();
        f.backlog(11 * S, t0);
        f.tick(t0 + 100 * S);
        let t1 = t0 + 100 * S + 101 * S;
        assert!(f.backlog(11 * S, t1));
        assert!(!f.tick(t1 + 99 * S));
        assert!(f.tick(t1 + 100 * S), "the first strike's cool-down again");
    }

    #[test]
    fn cooldowns_are_a_minute_to_an_hour() {
        assert_eq!(Fitness::new(S).cooldown(1), MIN_COOLDOWN);
        let f = Fitness::new(100 * S);
        assert_eq!(f.cooldown(1), 1000 * S);
        assert_eq!(f.cooldown(3), MAX_COOLDOWN);
        assert_eq!(f.cooldown(40), MAX_COOLDOWN);
    }

    #[test]
    fn a_ring_that_failed_to_start_is_unfit_with_its_reason() {
        let mut f = Fitness::new(10 * S);
        let t = Instant::now();
        assert!(f.ring_failed("no tensor blk.3.attn_q.weight", t));
        assert!(f.unfit().unwrap().contains("blk.3.attn_q.weight"));
        assert!(!f.ring_failed("again", t));
        assert!(f.tick(t + 100 * S));
    }
}
