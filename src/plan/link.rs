//! Links between devices.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::PlanError;

/// A directed network path between two devices.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Throughput in bits per second.
    pub bandwidth_bps: f64,
    /// One-way delay in seconds (half the round-trip time).
    pub latency_s: f64,
}

impl Link {
    /// Seconds the link is occupied sending `bytes` (serialization).
    pub fn busy_seconds(&self, bytes: u64) -> f64 {
        bytes as f64 * 8.0 / self.bandwidth_bps
    }
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| {
            !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-')
        })
        .unwrap_or(s.len());
    // "1e" followed by a unit letter: back off a trailing exponent marker.
    let (mut num, mut unit) = s.split_at(end);
    if num.ends_with(['e', 'E']) {
        num = &num[..num.len() - 1];
        unit = &s[num.len()..];
    }
    (num, unit)
}

impl FromStr for Link {
    type Err = PlanError;

    /// `BANDWIDTH,LATENCY`, e.g. `1gbit,2ms` or `300mbit,1ms`. Bandwidth
    /// units: `bit`, `kbit`, `mbit`, `gbit` (decimal, per second; a `/s`
    /// suffix is allowed); latency units: `us`, `ms`, `s`, one-way.
    fn from_str(input: &str) -> Result<Link, PlanError> {
        let bad = |problem: &str| PlanError::Parse {
            what: "link",
            input: input.to_string(),
            problem: format!("{problem} (expected BANDWIDTH,LATENCY such as 1gbit,2ms)"),
        };
        let (bw, lat) = input.split_once(',').ok_or_else(|| bad("no comma"))?;
        let (num, unit) = split_number(bw.trim());
        let value: f64 = num.parse().map_err(|_| bad("bandwidth is not a number"))?;
        let scale = match unit.trim_end_matches("/s").to_ascii_lowercase().as_str() {
            "bit" | "bps" => 1.0,
            "kbit" | "kbps" => 1e3,
            "mbit" | "mbps" => 1e6,
            "gbit" | "gbps" => 1e9,
            _ => return Err(bad("bandwidth unit must be bit, kbit, mbit or gbit")),
        };
        let bandwidth_bps = value * scale;
        if !(bandwidth_bps.is_finite() && bandwidth_bps > 0.0) {
            return Err(bad("bandwidth must be positive"));
        }
        let (num, unit) = split_number(lat.trim());
        let value: f64 = num.parse().map_err(|_| bad("latency is not a number"))?;
        let scale = match unit.to_ascii_lowercase().as_str() {
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            _ => return Err(bad("latency unit must be us, ms or s")),
        };
        let latency_s = value * scale;
        if !(latency_s.is_finite() && latency_s >= 0.0) {
            return Err(bad("latency must not be negative"));
        }
        Ok(Link {
            bandwidth_bps,
            latency_s,
        })
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bw = self.bandwidth_bps;
        let (v, u) = if bw >= 1e9 {
            (bw / 1e9, "gbit")
        } else if bw >= 1e6 {
            (bw / 1e6, "mbit")
        } else if bw >= 1e3 {
            (bw / 1e3, "kbit")
        } else {
            (bw, "bit")
        };
        write!(f, "{v}{u},{}ms", self.latency_s * 1e3)
    }
}

/// The links between the devices of a problem, by device index: one
/// default link, and optional overrides for directed pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    pub default: Link,
    pub overrides: BTreeMap<(usize, usize), Link>,
}

impl Network {
    /// Every pair of devices joined by the same link.
    pub fn uniform(link: Link) -> Network {
        Network {
            default: link,
            overrides: BTreeMap::new(),
        }
    }

    /// Sets the link from device `from` to device `to` and back.
    pub fn with_link(mut self, a: usize, b: usize, link: Link) -> Network {
        self.overrides.insert((a, b), link);
        self.overrides.insert((b, a), link);
        self
    }

    /// The link from device `from` to device `to`.
    pub fn link(&self, from: usize, to: usize) -> Link {
        *self.overrides.get(&(from, to)).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_links() {
        let l: Link = "1gbit,2ms".parse().unwrap();
        assert_eq!(l.bandwidth_bps, 1e9);
        assert!((l.latency_s - 2e-3).abs() < 1e-15);
        let l: Link = "300Mbit/s, 500us".parse().unwrap();
        assert_eq!(l.bandwidth_bps, 3e8);
        assert!((l.latency_s - 5e-4).abs() < 1e-15);
        for bad in [
            "1gbit",
            "0mbit,1ms",
            "-1gbit,1ms",
            "1gbit,-1ms",
            "1tbit,1ms",
            "xgbit,1ms",
            "1gbit,1h",
        ] {
            let e = bad.parse::<Link>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
