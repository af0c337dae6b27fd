//! An emulated link: bandwidth and latency applied on send, so that tests
//! and benchmarks can throttle the links between nodes on one machine
//! without root (no tbf, no namespaces).
//!
//! A link sends one message at a time: a message starts when it was sent
//! and the previous one has left, takes `bytes · 8 / bandwidth` to leave,
//! and arrives `latency` later. [`Pacer`] is that arithmetic alone, with
//! the time passed in; the sender sleeps until [`Pacer::due`] before it
//! writes the message to the real stream.

use std::str::FromStr;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Bandwidth and one-way latency of an emulated link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkEmulation {
    /// Bits per second; must be positive.
    pub bandwidth_bps: f64,
    /// Added to every message after it has left.
    pub latency: Duration,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("emulated link {input:?}: {problem} (expected e.g. 100mbit/2ms)")]
pub struct LinkParseError {
    input: String,
    problem: &'static str,
}

impl FromStr for LinkEmulation {
    type Err = LinkParseError;

    /// `BANDWIDTH/LATENCY`: bandwidth in `bit`, `kbit`, `mbit` or `gbit`
    /// per second, latency in `us`, `ms` or `s`; e.g. `100mbit/2ms`.
    fn from_str(s: &str) -> Result<LinkEmulation, LinkParseError> {
        let err = |problem| LinkParseError {
            input: s.to_string(),
            problem,
        };
        let (bw, lat) = s.split_once('/').ok_or(err("no '/'"))?;
        let number = |t: &str, units: &[(&str, f64)]| -> Option<f64> {
            let (suffix, scale) = units.iter().find(|(u, _)| t.ends_with(u))?;
            let v: f64 = t[..t.len() - suffix.len()].trim().parse().ok()?;
            (v.is_finite() && v >= 0.0).then_some(v * scale)
        };
        let bandwidth_bps = number(
            bw.trim(),
            &[("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)],
        )
        .filter(|&b| b > 0.0)
        .ok_or(err("bad bandwidth"))?;
        let secs = number(lat.trim(), &[("us", 1e-6), ("ms", 1e-3), ("s", 1.0)])
            .filter(|&l| l < 3600.0)
            .ok_or(err("bad latency"))?;
        Ok(LinkEmulation {
            bandwidth_bps,
            latency: Duration::from_secs_f64(secs),
        })
    }
}

/// When each message of one emulated link arrives.
#[derive(Clone, Debug)]
pub struct Pacer {
    link: LinkEmulation,
    /// When the last message finished leaving.
    free_at: Option<Instant>,
}

impl Pacer {
    pub fn new(link: LinkEmulation) -> Pacer {
        Pacer {
            link,
            free_at: None,
        }
    }

    /// The link it paces.
    pub fn link(&self) -> LinkEmulation {
        self.link
    }

    /// The instant a message of `bytes` handed to the link at `sent_at`
    /// arrives. Calls must come in send order.
    pub fn due(&mut self, sent_at: Instant, bytes: usize) -> Instant {
        let start = match self.free_at {
            Some(f) if f > sent_at => f,
            _ => sent_at,
        };
        let wire = Duration::from_secs_f64(bytes as f64 * 8.0 / self.link.bandwidth_bps);
        let left = start + wire;
        self.free_at = Some(left);
        left + self.link.latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_queue_behind_each_other_then_add_latency() {
        let link = LinkEmulation {
            bandwidth_bps: 8e6, // 1 MB/s: 1000 bytes take 1 ms
            latency: Duration::from_millis(5),
        };
        let mut p = Pacer::new(link);
        let t0 = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        assert_eq!(p.due(t0, 1000), t0 + ms(6));
        // Sent while the first is still leaving: waits for it.
        assert_eq!(p.due(t0, 2000), t0 + ms(8));
        // Sent after the link went idle: starts at once.
        assert_eq!(p.due(t0 + ms(100), 1000), t0 + ms(106));
    }

    #[test]
    fn links_parse_with_units_and_refuse_nonsense() {
        let l: LinkEmulation = "100mbit/2ms".parse().unwrap();
        assert_eq!(l.bandwidth_bps, 1e8);
        assert_eq!(l.latency, Duration::from_millis(2));
        let l: LinkEmulation = "1.5gbit/250us".parse().unwrap();
        assert_eq!(l.bandwidth_bps, 1.5e9);
        assert_eq!(l.latency, Duration::from_micros(250));
        for bad in [
            "100mbit",
            "0mbit/1ms",
            "fast/1ms",
            "10mbit/-1ms",
            "10mbit/1h",
            "nanbit/1ms",
        ] {
            assert!(bad.parse::<LinkEmulation>().is_err(), "{bad}");
        }
    }
}
