//! Counters, gauges and histograms, written in Prometheus' text exposition
//! format by hand: a dozen series do not justify a dependency, and writing
//! them ourselves keeps the names, labels and buckets in one visible place.
//!
//! Everything is atomics or a short mutex: the compute thread records, the
//! HTTP side reads, and neither waits on the other for long.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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

    /// The exposition text for `GET /metrics`.
    pub fn render(&self) -> String {
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
        for (name, kind, help, v) in per_node {
            head(&mut o, name, kind, help);
            let _ = writeln!(o, "{name}{{{node}}} {v}");
        }
        // One node: no links yet. Series appear as `{from, to}` pairs once
        // a cluster carries activations.
        head(
            &mut o,
            "loip_link_bytes_total",
            "counter",
            "Bytes sent over each link between nodes.",
        );
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
}
