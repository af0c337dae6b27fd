//! Counters, gauges and histograms, written in Prometheus' text exposition
//! format by hand: a dozen series do not justify a dependency, and writing
//! them ourselves keeps the names, labels and buckets in one visible place.
//!
//! Everything is atomics or a short mutex: the compute thread records, the
//! HTTP side reads, and neither waits on the other for long.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::cluster::stats::PeerStats;
use crate::net::NodeId;

/// How a node id is written as a `node`, `from` or `to` label (escaped
/// after).
pub type NodeLabel = dyn Fn(NodeId) -> String;

/// Upper bounds of the latency buckets, in seconds.
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A histogram with fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistInner>,
}

#[derive(Default)]
struct HistInner {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            inner: Mutex::new(HistInner {
                counts: vec![0; bounds.len()],
                ..HistInner::default()
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            h.counts[i] += 1;
        }
        h.sum += v;
        h.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&h.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", h.count);
    }
}

/// A float gauge stored as bits.
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// How a completion request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Generated to the end.
    Ok,
    /// Refused before it was queued (bad input, context, key).
    Invalid,
    /// The queue was full.
    QueueFull,
    /// The client left, or stalled past the timeout.
    Cancelled,
    /// The engine failed.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Invalid,
        Outcome::QueueFull,
        Outcome::Cancelled,
        Outcome::Failed,
    ];
    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Invalid => "invalid",
            Outcome::QueueFull => "queue_full",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// The server's metrics.
pub struct Metrics {
    node: String,
    outcomes: [AtomicU64; 5],
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub queue_depth: AtomicU64,
    pub active: AtomicU64,
    pub kv_bytes: AtomicU64,
    pub bubbles: AtomicU64,
    pub bubble_seconds: Gauge,
    pub bytes_read: AtomicU64,
    pub plan_epoch: AtomicU64,
    pub stalled: AtomicU64,
    /// Generated tokens per second over the last few seconds.
    pub tokens_per_s: Gauge,
    /// Units demoted to streamed, and promoted back, under KV pressure.
    pub demotions: AtomicU64,
    pub promotions: AtomicU64,
    /// Units resident now (under a budget).
    pub resident_units: AtomicU64,
    /// Under adaptation: the budget, and what resident weights, slots and
    /// scratch take now (KV is `kv_bytes`).
    pub budget_bytes: AtomicU64,
    pub weights_bytes: AtomicU64,
    /// Units streamed now, once adaptation runs (for `/v1/cluster`).
    pub streamed_units: Mutex<Option<Vec<crate::engine::weights::Unit>>>,
}

impl Metrics {
    pub fn new(node: String) -> Metrics {
        Metrics {
            node,
            outcomes: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            inter_token: Histogram::new(ITL_BUCKETS),
            queue_depth: AtomicU64::new(0),
            active: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
            bubbles: AtomicU64::new(0),
            bubble_seconds: Gauge::default(),
            bytes_read: AtomicU64::new(0),
            plan_epoch: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            tokens_per_s: Gauge::default(),
            demotions: AtomicU64::new(0),
            promotions: AtomicU64::new(0),
            resident_units: AtomicU64::new(0),
            budget_bytes: AtomicU64::new(0),
            weights_bytes: AtomicU64::new(0),
            streamed_units: Mutex::new(None),
        }
    }

    pub fn request(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|&o| o == outcome).unwrap_or(0);
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self, outcome: Outcome) -> u64 {
        let i = Outcome::ALL.iter().position(|&o| o == outcome).unwrap_or(0);
        self.outcomes[i].load(Ordering::Relaxed)
    }

    /// The exposition text for `GET /metrics` of one node's engine.
    pub fn render(&self) -> String {
        self.render_with(None)
    }

    /// As [`Metrics::render`], on a node of a cluster: the per-node series
    /// are each member's latest figures, with `label(id)` as its `node`
    /// label, and the links' bytes are filled in.
    pub fn render_cluster(&self, nodes: &[PeerStats], label: &NodeLabel) -> String {
        self.render_with(Some((nodes, label)))
    }

    fn render_with(&self, cluster: Option<(&[PeerStats], &NodeLabel)>) -> String {
        let mut o = String::new();
        let node = format!("node=\"{}\"", escape(&self.node));
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        head(
            &mut o,
            "loip_requests_total",
            "counter",
            "Completion requests by outcome.",
        );
        for outcome in Outcome::ALL {
            let _ = writeln!(
                o,
                "loip_requests_total{{outcome=\"{}\"}} {}",
                outcome.name(),
                self.requests(outcome)
            );
        }
        let simple: [(&str, &str, &str, f64); 8] = [
            (
                "loip_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                get(&self.prompt_tokens) as f64,
            ),
            (
                "loip_generated_tokens_total",
                "counter",
                "Tokens generated.",
                get(&self.generated_tokens) as f64,
            ),
            (
                "loip_queue_depth",
                "gauge",
                "Requests waiting for a place in the batch.",
                get(&self.queue_depth) as f64,
            ),
            (
                "loip_active_sequences",
                "gauge",
                "Sequences in the batch.",
                get(&self.active) as f64,
            ),
            (
                "loip_sse_stalled_total",
                "counter",
                "Streams cut because the client stopped reading.",
                get(&self.stalled) as f64,
            ),
            (
                "loip_demotions_total",
                "counter",
                "Units demoted from resident to streamed under KV pressure.",
                get(&self.demotions) as f64,
            ),
            (
                "loip_promotions_total",
                "counter",
                "Units promoted back to resident when memory freed up.",
                get(&self.promotions) as f64,
            ),
            (
                "loip_resident_units",
                "gauge",
                "Units (attention, MLP, head) resident in memory.",
                get(&self.resident_units) as f64,
            ),
        ];
        for (name, kind, help, v) in simple {
            head(&mut o, name, kind, help);
            let _ = writeln!(o, "{name} {v}");
        }
        head(
            &mut o,
            "loip_ttft_seconds",
            "histogram",
            "Time from arrival to the first token.",
        );
        self.ttft.write(&mut o, "loip_ttft_seconds", "");
        head(
            &mut o,
            "loip_inter_token_seconds",
            "histogram",
            "Time between a sequence's tokens.",
        );
        self.inter_token
            .write(&mut o, "loip_inter_token_seconds", "");
        let per_node: [(&str, &str, &str, f64); 5] = [
            (
                "loip_kv_bytes",
                "gauge",
                "KV cache bytes held per node.",
                get(&self.kv_bytes) as f64,
            ),
            (
                "loip_loading_bubbles_total",
                "counter",
                "Times compute waited for a streamed unit.",
                get(&self.bubbles) as f64,
            ),
            (
                "loip_loading_bubble_seconds_total",
                "counter",
                "Time compute waited for streamed units.",
                self.bubble_seconds.get(),
            ),
            (
                "loip_storage_read_bytes_total",
                "counter",
                "Bytes of streamed weights read from storage.",
                get(&self.bytes_read) as f64,
            ),
            (
                "loip_tokens_per_second",
                "gauge",
                "Generated tokens per second, recent.",
                self.tokens_per_s.get(),
            ),
        ];
        match cluster {
            None => {
                for (name, kind, help, v) in per_node {
                    head(&mut o, name, kind, help);
                    let _ = writeln!(o, "{name}{{{node}}} {v}");
                }
                // One node: no links.
                head(&mut o, LINK_BYTES.0, "counter", LINK_BYTES.1);
            }
            Some((nodes, label)) => write_members(&mut o, nodes, label),
        }
        head(
            &mut o,
            "loip_plan_epoch",
            "gauge",
            "Epoch of the active plan (0 before one is active).",
        );
        let _ = writeln!(o, "loip_plan_epoch {}", get(&self.plan_epoch));
        o
    }
}

/// The links' family: name and help.
const LINK_BYTES: (&str, &str) = (
    "loip_link_bytes_total",
    "Bytes sent over each link between nodes.",
);

/// The per-node series of a cluster: one line per member with figures,
/// and one per link that carried bytes.
fn write_members(o: &mut String, nodes: &[PeerStats], label: &NodeLabel) {
    type Field = fn(&PeerStats) -> f64;
    let families: [(&str, &str, &str, Field); 17] = [
        (
            "loip_kv_bytes",
            "gauge",
            "KV cache bytes the filled positions take, per node.",
            |p| p.stats.kv_used_bytes as f64,
        ),
        (
            "loip_kv_capacity_bytes",
            "gauge",
            "KV cache bytes allocated, per node.",
            |p| p.stats.kv_capacity_bytes as f64,
        ),
        (
            "loip_kv_budget_bytes",
            "gauge",
            "The plan's KV budget, per node.",
            |p| p.stats.kv_budget_bytes as f64,
        ),
        (
            "loip_memory_budget_bytes",
            "gauge",
            "Memory budget, per node.",
            |p| p.stats.budget_bytes as f64,
        ),
        (
            "loip_weights_bytes",
            "gauge",
            "Resident weights and streaming slots, bytes, per node.",
            |p| p.stats.weights_bytes as f64,
        ),
        (
            "loip_loading_bubbles_total",
            "counter",
            "Times compute waited for a streamed unit.",
            |p| p.stats.bubbles as f64,
        ),
        (
            "loip_loading_bubble_seconds_total",
            "counter",
            "Time compute waited for streamed units.",
            |p| p.stats.bubble_seconds,
        ),
        (
            "loip_ring_tokens_total",
            "counter",
            "Token positions through the node's windows.",
            |p| p.stats.tokens as f64,
        ),
        (
            "loip_tokens_per_second",
            "gauge",
            "Token positions through the node's windows per second, recent.",
            |p| p.stats.tokens_per_s,
        ),
        (
            "loip_ring_backlog_seconds",
            "gauge",
            "Age of the oldest input the node has not finished (0 when idle).",
            |p| p.stats.backlog_ms as f64 / 1000.0,
        ),
        (
            "loip_ring_epoch",
            "gauge",
            "Plan epoch of the ring the node runs (0: none).",
            |p| p.stats.epoch as f64,
        ),
        (
            "loip_ring_demotions_total",
            "counter",
            "Units the node's ring demoted to streamed under KV pressure.",
            |p| p.stats.demotions as f64,
        ),
        (
            "loip_ring_promotions_total",
            "counter",
            "Units the node's ring promoted back to resident.",
            |p| p.stats.promotions as f64,
        ),
        (
            "loip_ring_demoted_units",
            "gauge",
            "Units the node's ring has demoted now (beyond what the plan streams).",
            |p| p.stats.demoted_units as f64,
        ),
        (
            "loip_ring_kv_positions",
            "gauge",
            "Positions of KV the node can hold after demoting all it can (0: no limit).",
            |p| p.stats.kv_positions as f64,
        ),
        (
            "loip_ring_kv_waiting",
            "gauge",
            "Requests waiting at the head for KV room.",
            |p| p.stats.kv_waiting as f64,
        ),
        (
            "loip_node_stats_age_seconds",
            "gauge",
            "Age of the node's figures here (they are gossiped).",
            |p| p.age_s,
        ),
    ];
    let names: Vec<String> = nodes.iter().map(|p| escape(&label(p.id))).collect();
    for (name, kind, help, field) in families {
        head(o, name, kind, help);
        for (p, n) in nodes.iter().zip(&names) {
            let _ = writeln!(o, "{name}{{node=\"{n}\"}} {}", field(p));
        }
    }
    head(o, LINK_BYTES.0, "counter", LINK_BYTES.1);
    for (p, from) in nodes.iter().zip(&names) {
        for &(to, bytes) in &p.stats.links {
            let to = escape(&label(to));
            let _ = writeln!(o, "{}{{from=\"{from}\",to=\"{to}\"}} {bytes}", LINK_BYTES.0);
        }
    }
}

fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new("n\"1".into());
        m.ttft.observe(0.03);
        m.ttft.observe(0.3);
        m.ttft.observe(100.0);
        let text = m.render();
        assert!(
            text.contains("loip_ttft_seconds_bucket{le=\"0.05\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("loip_ttft_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("loip_ttft_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("loip_ttft_seconds_count 3\n"));
        assert!(text.contains("loip_kv_bytes{node=\"n\\\"1\"} 0\n"));
    }

    #[test]
    fn a_cluster_node_writes_every_members_figures_and_links_with_labels_escaped() {
        use crate::cluster::stats::NodeStats;
        let m = Metrics::new("host".into());
        let stats = |kv, links| NodeStats {
            kv_used_bytes: kv,
            kv_capacity_bytes: 4096,
            bubble_seconds: 0.5,
            backlog_ms: 1500,
            links,
            ..NodeStats::default()
        };
        let nodes = [
            PeerStats {
                id: NodeId(1),
                age_s: 0.0,
                stats: stats(100, vec![(NodeId(2), 7)]),
            },
            PeerStats {
                id: NodeId(2),
                age_s: 2.5,
                stats: stats(0, vec![]),
            },
        ];
        let label = |id: NodeId| match id {
            NodeId(1) => "a\"b\\c\nd".to_string(),
            id => id.to_string(),
        };
        let text = m.render_cluster(&nodes, &label);
        let a = r#"node="a\"b\\c\nd""#;
        let b = r#"node="0000000000000002""#;
        for want in [
            format!("loip_kv_bytes{{{a}}} 100\n"),
            format!("loip_kv_bytes{{{b}}} 0\n"),
            format!("loip_kv_capacity_bytes{{{b}}} 4096\n"),
            format!("loip_loading_bubble_seconds_total{{{a}}} 0.5\n"),
            format!("loip_ring_backlog_seconds{{{b}}} 1.5\n"),
            format!("loip_node_stats_age_seconds{{{b}}} 2.5\n"),
            r#"loip_link_bytes_total{from="a\"b\\c\nd",to="0000000000000002"} 7"#.to_string()
                + "\n",
        ] {
            assert!(text.contains(&want), "no {want:?} in\n{text}");
        }
        // One link only, and the engine's own node label is not used.
        assert_eq!(text.matches("loip_link_bytes_total{").count(), 1, "{text}");
        assert!(!text.contains("host"), "{text}");
        // Each family once, its samples right after its HELP and TYPE.
        let mut families = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(families.insert(current.clone()), "{current} twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(name.starts_with(current.as_str()), "{line} under {current}");
            }
        }
        // A node alone writes no link.
        assert!(!m.render().contains("loip_link_bytes_total{"));
    }
}
