//! `loip bench-ring`: the three planners' plans run by the ring runtime on
//! emulated clusters of one host, beside the simulator's predictions.
//!
//! Each node is a process of its own on loopback with an emulated device
//! ([`super::emulation`]): this host's profiled compute (one thread)
//! slowed by a factor, a storage read bandwidth, a memory budget below its
//! share of the model (so that every plan offloads) and an outgoing link.
//! The devices differ from each other. For every load pattern and planner
//! the bench asks the planner for a plan for those devices (the code of
//! `loip plan`), starts the nodes with it, and times a burst of greedy
//! requests from their submission to their last token. It checks that
//! every run gives the same tokens for the same prompt, and records what
//! the host spent (CPU from `/proc/stat` and the processes' own CPU time,
//! bytes read from storage), to show that the host's cores and disk are
//! not what limits the emulated cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::demo::{prepare_plan, start_node, write_file};
use super::emulation::Emulation;
use super::head::{RequestHandle, RingRequest};
use super::node::Input;
use super::{RingError, RingNode};
use crate::engine::loader::ColdReader;
use crate::engine::weights::Model;
use crate::plan::profile::{profile, ProfileSpec};
use crate::plan::{
    plan_with_info, simulate, DeviceProfile, Link, ModelShape, Network, Pattern, Plan, Planner,
    Prediction, Problem, StorageProfile, Workload,
};

fn err(what: &str, e: impl std::fmt::Display) -> RingError {
    RingError::Plan(format!("{what}: {e}"))
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub model: PathBuf,
    /// Node counts; each gets its own emulated cluster.
    pub nodes: Vec<usize>,
    pub loads: Vec<Pattern>,
    pub planners: Vec<Planner>,
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    pub gen_tokens: usize,
    /// The `loip` executable, started as `demo-node` for the other nodes.
    pub exe: PathBuf,
    /// Where this host's profile is kept.
    pub data_dir: PathBuf,
    /// A quick profile of this host (seconds rather than minutes).
    pub quick_profile: bool,
}

/// One emulated device.
#[derive(Clone, Debug, Serialize)]
pub struct EmulatedDevice {
    pub name: String,
    pub compute_factor: f64,
    pub read_bytes_per_s: f64,
    pub budget_bytes: u64,
    /// Its outgoing link, `BANDWIDTH/LATENCY`.
    pub link: String,
    #[serde(skip)]
    pub profile: DeviceProfile,
}

/// The devices of an `n`-node cluster: compute `F` times slower than one
/// host thread, storage of a fraction of a host disk, budgets that add up
/// to about two thirds of the model, and links from 1 Gbit/s down to 100
/// Mbit/s; the first device is the strongest, the last the weakest.
pub fn emulated_devices(
    host: &DeviceProfile,
    model_bytes: u64,
    n: usize,
) -> Result<Vec<EmulatedDevice>, RingError> {
    // (compute factor, storage MB/s, budget as a share of the model, link)
    let presets: &[(f64, f64, f64, &str)] = match n {
        3 => &[
            (4.0, 320.0, 0.32, "1gbit/1ms"),
            (6.0, 200.0, 0.22, "500mbit/2ms"),
            (8.0, 120.0, 0.14, "200mbit/3ms"),
        ],
        // Two strong devices with fast storage (NVMe) and three weaker
        // ones down to SD-card reads: the spread a cluster of mixed edge
        // boards has. The last device holds the output head; the ring
        // baseline keeps two slots of it (prima.cpp's rule: a window's
        // worth), so its budget is not the smallest.
        5 => &[
            (3.0, 450.0, 0.17, "1gbit/1ms"),
            (3.0, 320.0, 0.14, "500mbit/2ms"),
            (6.0, 160.0, 0.12, "300mbit/2ms"),
            (9.0, 80.0, 0.10, "200mbit/3ms"),
            (12.0, 50.0, 0.14, "100mbit/4ms"),
        ],
        _ => {
            return Err(RingError::Plan(format!(
                "the ring bench has emulated clusters of 3 and 5 nodes, not {n}"
            )))
        }
    };
    Ok(presets
        .iter()
        .enumerate()
        .map(|(i, &(f, mbs, share, link))| {
            let mut profile = host.clone();
            profile.name = format!("emu{}-{i}", n);
            scale_compute(&mut profile, f);
            profile.storage = StorageProfile {
                read_bytes_per_s: mbs * 1e6,
                read_latency_s: 0.0,
            };
            profile.memory_budget_bytes = (model_bytes as f64 * share) as u64;
            EmulatedDevice {
                name: profile.name.clone(),
                compute_factor: f,
                read_bytes_per_s: mbs * 1e6,
                budget_bytes: profile.memory_budget_bytes,
                link: link.to_string(),
                profile,
            }
        })
        .collect())
}

/// A device `f` times slower: every term of the compute model scales.
fn scale_compute(p: &mut DeviceProfile, f: f64) {
    let c = &mut p.compute;
    c.layer_overhead_s *= f;
    c.per_token_s *= f;
    c.kv_s_per_byte *= f;
    for r in c.weights.values_mut() {
        r.s_per_byte *= f;
        r.s_per_byte_token *= f;
    }
}

/// The planners' network: each device's outgoing link to every other.
pub fn network(devices: &[EmulatedDevice]) -> Result<Network, RingError> {
    let parse = |s: &str| -> Result<Link, RingError> {
        s.replace('/', ",").parse().map_err(|e| err("link", e))
    };
    let mut overrides = std::collections::BTreeMap::new();
    for (a, d) in devices.iter().enumerate() {
        let link = parse(&d.link)?;
        for b in 0..devices.len() {
            if a != b {
                overrides.insert((a, b), link);
            }
        }
    }
    Ok(Network {
        default: parse(&devices[0].link)?,
        overrides,
    })
}

/// Host resources used during a run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct HostUse {
    /// Cores of the host busy (all processes), from `/proc/stat`.
    pub host_busy_cores: f64,
    /// Cores the ring's processes used (their own CPU time).
    pub ring_cores: f64,
    /// Bytes per second the ring's processes read from storage.
    pub ring_read_bytes_per_s: f64,
}

/// One measured run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub nodes: usize,
    pub pattern: String,
    pub planner: String,
    /// Windows, rounds and streamed layers of the plan.
    pub windows: usize,
    pub rounds: usize,
    pub streamed_layers: usize,
    pub slots: u32,
    /// The decode micro-batches the planner chose (the ring runs them).
    pub planned_micro_batches: u32,
    pub tokens: usize,
    pub seconds: f64,
    pub measured_tok_s: f64,
    pub predicted_tok_s: f64,
    /// (measured − predicted) / predicted.
    pub error: f64,
    pub host: HostUse,
}

/// Everything a bench run found.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub host_cores: usize,
    /// Host disk: O_DIRECT reads of the model file, bytes per second.
    pub host_disk_bytes_per_s: f64,
    pub clusters: Vec<(usize, Vec<EmulatedDevice>)>,
    pub rows: Vec<BenchRow>,
    /// Every run gave the same tokens for the same prompt.
    pub exact: bool,
}

/// The prompt of request `i`: the same length for all, different tokens.
fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| 1 + ((j * 37 + i * 101) % 500) as u32)
        .collect()
}

/// Reads of the model file as the loader does them (aligned, O_DIRECT):
/// the host disk's bandwidth.
pub fn host_disk_bandwidth(model: &Path) -> Result<f64, RingError> {
    let m = Model::open_with(model, |_| false)?;
    let chunk = 64u64 << 20;
    let mut r = ColdReader::open(&m, chunk)?;
    let len = r.file_len();
    let n = (len / chunk).clamp(1, 16);
    let (mut bytes, mut secs) = (0u64, 0f64);
    for i in 0..n {
        let (b, s) = r.read(i * (len / n) / 4096 * 4096, chunk.min(len - 1))?;
        bytes += b;
        secs += s;
    }
    Ok(bytes as f64 / secs.max(1e-9))
}

/// Runs the bench.
pub fn run(spec: &BenchSpec) -> Result<BenchReport, RingError> {
    let host = profile(
        &ProfileSpec {
            model: spec.model.clone(),
            threads: 1,
            quick: spec.quick_profile,
            budget: None,
            progress: false,
        },
        &spec.data_dir,
        false,
    )
    .map_err(|e| err("profiling this host", e))?
    .stored
    .device;
    let shape = ModelShape::from_gguf(&spec.model).map_err(|e| err("model", e))?;
    let model_bytes = shape.placed_bytes();
    let disk = host_disk_bandwidth(&spec.model)?;
    let mut report = BenchReport {
        model: spec.model.display().to_string(),
        prompt_tokens: spec.prompt_tokens,
        gen_tokens: spec.gen_tokens,
        host_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        host_disk_bytes_per_s: disk,
        clusters: Vec::new(),
        rows: Vec::new(),
        exact: true,
    };
    // Tokens of each prompt from the first run that made them.
    let mut first: Vec<Option<Vec<u32>>> = Vec::new();
    for &n in &spec.nodes {
        let devices = emulated_devices(&host, model_bytes, n)?;
        let net = network(&devices)?;
        for &pattern in &spec.loads {
            let batch = pattern.batch() as usize;
            let workload = Workload {
                pattern,
                prompt_tokens: spec.prompt_tokens as u32,
                output_tokens: spec.gen_tokens as u32,
                context_tokens: (spec.prompt_tokens + spec.gen_tokens) as u32,
                prefill_chunk: crate::engine::generate::PREFILL_CHUNK as u32,
            };
            let problem = Problem::new(
                devices.iter().map(|d| d.profile.clone()).collect(),
                net.clone(),
                shape.clone(),
                workload,
            );
            for &planner in &spec.planners {
                let (plan, _) =
                    plan_with_info(planner, &problem).map_err(|e| err("planning", e))?;
                let planned_mb = plan.micro_batches;
                let predicted = simulate(&plan, &problem).map_err(|e| err("simulating", e))?;
                log::info!("{n} nodes, {pattern}, {planner}: {plan:?}");
                let requests: Vec<RingRequest> = (0..batch)
                    .map(|i| RingRequest {
                        prompt: prompt(i, spec.prompt_tokens),
                        max_tokens: spec.gen_tokens,
                        stop: None,
                        keep_logits: false,
                        sampling: None,
                    })
                    .collect();
                let (outs, secs, host_use) = run_plan(spec, &plan, &devices, &requests)?;
                for (i, t) in outs.iter().enumerate() {
                    if first.len() <= i {
                        first.resize(i + 1, None);
                    }
                    match &first[i] {
                        Some(f) if f != t => report.exact = false,
                        Some(_) => {}
                        None => first[i] = Some(t.clone()),
                    }
                }
                let tokens: usize = outs.iter().map(Vec::len).sum();
                let measured = tokens as f64 / secs;
                let p = predicted_tok_s(&predicted);
                report.rows.push(BenchRow {
                    nodes: n,
                    pattern: pattern.to_string(),
                    planner: planner.to_string(),
                    windows: plan.windows.len(),
                    rounds: plan.rounds(),
                    streamed_layers: plan
                        .windows
                        .iter()
                        .flat_map(|w| w.streamed.iter())
                        .filter(|&&s| s)
                        .count(),
                    slots: plan.slots,
                    planned_micro_batches: planned_mb,
                    tokens,
                    seconds: secs,
                    measured_tok_s: measured,
                    predicted_tok_s: p,
                    error: (measured - p) / p,
                    host: host_use,
                });
                log::info!("{:?}", report.rows.last());
            }
        }
        report.clusters.push((n, devices));
    }
    Ok(report)
}

/// Output tokens per second over a run, prefill included.
fn predicted_tok_s(p: &Prediction) -> f64 {
    p.throughput_tok_s
}

/// Starts the plan's nodes (the head here, the others as child processes
/// with their emulation), warms the ring up with one short request, then
/// times `requests` submitted together. Returns each request's tokens,
/// the seconds from submission to the last token, and the host's use.
fn run_plan(
    spec: &BenchSpec,
    plan: &Plan,
    devices: &[EmulatedDevice],
    requests: &[RingRequest],
) -> Result<(Vec<Vec<u32>>, f64, HostUse), RingError> {
    let dir = std::env::temp_dir().join(format!(
        "loip-bench-ring-{}-{}",
        std::process::id(),
        unique()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| err("creating the bench directory", e))?;
    let cleanup = Cleanup {
        dir: dir.clone(),
        children: Vec::new(),
    };
    let mut cleanup = cleanup;
    let mut file = prepare_plan(&dir, &spec.model, plan.clone())?;
    let by_name = |name: &str| devices.iter().find(|d| d.name == name);
    for name in &plan.ring {
        let d = by_name(name)
            .ok_or_else(|| RingError::Plan(format!("plan names unknown device {name}")))?;
        file.emulation.push(Emulation {
            read_bytes_per_s: Some(d.read_bytes_per_s),
            compute_factor: Some(d.compute_factor),
        });
        file.links.push(Some(d.link.clone()));
    }
    write_file(&dir, &file)?;
    let head = plan.windows.first().map_or(0, |w| w.device);
    for i in (0..plan.ring.len()).filter(|&i| i != head) {
        let child = std::process::Command::new(&spec.exe)
            .arg("demo-node")
            .arg("--dir")
            .arg(&dir)
            .arg("--index")
            .arg(i.to_string())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| err("starting a node process", e))?;
        cleanup.children.push(child);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| err("starting the runtime", e))?;
    let node = start_node(&dir, head, rt.handle())?;
    // Warm-up: one token through every window, which also waits until
    // every node has its resident layers in memory.
    node.submit(RingRequest {
        prompt: prompt(999, 4),
        max_tokens: 1,
        stop: None,
        keep_logits: false,
        sampling: None,
    })?
    .wait(Duration::from_secs(900))?;
    // Let every loader fill its slots, as the simulator's idle cluster
    // does before the first step.
    std::thread::sleep(settle_time(plan, devices));
    let pids: Vec<u32> = std::iter::once(std::process::id())
        .chain(cleanup.children.iter().map(|c| c.id()))
        .collect();
    let before = Sample::take(&pids);
    let t0 = Instant::now();
    let handles = node.submit_burst(requests.to_vec())?;
    let mut outs = Vec::new();
    for h in handles {
        outs.push(h.wait(Duration::from_secs(1800))?.tokens);
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = Sample::take(&pids);
    node.shutdown();
    drop(rt);
    drop(cleanup);
    Ok((outs, secs, before.until(&after, secs)))
}

/// Long enough for the slowest loader to fill all its slots.
fn settle_time(plan: &Plan, devices: &[EmulatedDevice]) -> Duration {
    let slowest = devices
        .iter()
        .map(|d| d.read_bytes_per_s)
        .fold(f64::INFINITY, f64::min);
    // A slot holds at most the output head (the largest unit), ~140 MB for
    // the 1.1B model; allow for 200 MB per slot.
    let slots = 2.0 * plan.slots as f64;
    Duration::from_secs_f64((slots * 200e6 / slowest).clamp(0.5, 20.0))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The bench directory and the node processes: ended (their standard
/// input closed) and removed when dropped.
struct Cleanup {
    dir: PathBuf,
    children: Vec<std::process::Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            drop(c.stdin.take());
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Counters of the host and of the ring's processes at one moment.
struct Sample {
    /// `/proc/stat`: total and idle (idle + iowait) jiffies.
    total: u64,
    idle: u64,
    /// The processes' user + system jiffies, and bytes read from storage.
    proc_cpu: u64,
    proc_read: u64,
}

impl Sample {
    fn take(pids: &[u32]) -> Sample {
        let (mut total, mut idle) = (0, 0);
        if let Ok(s) = std::fs::read_to_string("/proc/stat") {
            if let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) {
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                total = v.iter().take(8).sum();
                idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            }
        }
        let (mut proc_cpu, mut proc_read) = (0, 0);
        for pid in pids {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // Fields after the command name, which ends with ')'.
                if let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    // utime and stime are fields 14 and 15 (1-based), i.e.
                    // 11 and 12 after the state field at index 0.
                    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
                    proc_cpu += get(11).unwrap_or(0) + get(12).unwrap_or(0);
                }
            }
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
                proc_read += s
                    .lines()
                    .find_map(|l| l.strip_prefix("read_bytes:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Sample {
            total,
            idle,
            proc_cpu,
            proc_read,
        }
    }

    fn until(&self, later: &Sample, secs: f64) -> HostUse {
        let ticks = 100.0; // USER_HZ
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let dt = later.total.saturating_sub(self.total).max(1) as f64;
        let busy = 1.0 - later.idle.saturating_sub(self.idle) as f64 / dt;
        HostUse {
            host_busy_cores: busy * cores,
            ring_cores: later.proc_cpu.saturating_sub(self.proc_cpu) as f64 / ticks / secs,
            ring_read_bytes_per_s: later.proc_read.saturating_sub(self.proc_read) as f64 / secs,
        }
    }
}

impl RingNode {
    /// Submits `requests` together: the compute thread takes them in one
    /// message, so that they start in one step, as the plan's burst does.
    pub fn submit_burst(
        &self,
        requests: Vec<RingRequest>,
    ) -> Result<Vec<RequestHandle>, RingError> {
        if self.me != self.head {
            return Err(RingError::NotHead { head: self.head });
        }
        let mut pending = Vec::new();
        let mut burst = Vec::new();
        for request in requests {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (id_tx, id_rx) = std::sync::mpsc::channel();
            burst.push(Input::Submit {
                request,
                reply: tx,
                id: id_tx,
                sink: None,
            });
            pending.push((id_rx, rx));
        }
        self.inbox
            .send(Input::Burst(burst))
            .map_err(|_| RingError::Stopped)?;
        pending
            .into_iter()
            .map(|(id_rx, rx)| {
                let id = id_rx.recv().map_err(|_| RingError::Stopped)??;
                Ok(RequestHandle::new(id, rx))
            })
            .collect()
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: f64| b / 1e9;
        writeln!(
            f,
            "loip bench-ring: {} (prompt {} tokens, {} generated per request)",
            self.model, self.prompt_tokens, self.gen_tokens
        )?;
        writeln!(
            f,
            "host: {} cores; disk {:.2} GB/s (O_DIRECT reads of the model)",
            self.host_cores,
            gb(self.host_disk_bytes_per_s)
        )?;
        for (n, devs) in &self.clusters {
            let storage: f64 = devs.iter().map(|d| d.read_bytes_per_s).sum();
            let budget: u64 = devs.iter().map(|d| d.budget_bytes).sum();
            writeln!(
                f,
                "\n{n} nodes: emulated storage {:.2} GB/s in all ({:.0}% of the host disk), budgets {:.2} GB in all",
                gb(storage),
                100.0 * storage / self.host_disk_bytes_per_s,
                gb(budget as f64)
            )?;
            writeln!(f, "| device | compute | storage MB/s | budget MB | link |")?;
            writeln!(f, "|---|---|---|---|---|")?;
            for d in devs {
                writeln!(
                    f,
                    "| {} | {}x slower | {:.0} | {:.0} | {} |",
                    d.name,
                    d.compute_factor,
                    d.read_bytes_per_s / 1e6,
                    d.budget_bytes as f64 / 1e6,
                    d.link
                )?;
            }
        }
        writeln!(f)?;
        writeln!(f, "| nodes | load | planner | windows (rounds) | streamed layers | slots | micro-batches | tokens | s | measured tok/s | predicted tok/s | error | host busy cores | ring cores | ring reads MB/s |")?;
        writeln!(
            f,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {} | {} | {} ({}) | {} | {} | {} | {} | {:.1} | {:.3} | {:.3} | {:+.1}% | {:.2} | {:.2} | {:.0} |",
                r.nodes,
                r.pattern,
                r.planner,
                r.windows,
                r.rounds,
                r.streamed_layers,
                r.slots,
                r.planned_micro_batches,
                r.tokens,
                r.seconds,
                r.measured_tok_s,
                r.predicted_tok_s,
                100.0 * r.error,
                r.host.host_busy_cores,
                r.host.ring_cores,
                r.host.ring_read_bytes_per_s / 1e6
            )?;
        }
        writeln!(f)?;
        for &n in self.clusters.iter().map(|(n, _)| n) {
            let mut patterns: Vec<&str> = Vec::new();
            for r in self.rows.iter().filter(|r| r.nodes == n) {
                if !patterns.contains(&r.pattern.as_str()) {
                    patterns.push(&r.pattern);
                }
            }
            for pat in patterns {
                let get = |pl: &str| {
                    self.rows
                        .iter()
                        .find(|r| r.nodes == n && r.planner == pl && r.pattern == pat)
                        .map(|r| r.measured_tok_s)
                };
                if let (Some(l), Some(r), Some(c)) = (get("loip"), get("ring"), get("contiguous")) {
                    writeln!(
                        f,
                        "{n} nodes, {pat}: loip {:.2}x ring, {:.2}x contiguous",
                        l / r,
                        l / c
                    )?;
                }
            }
        }
        let worst = self.rows.iter().map(|r| r.error.abs()).fold(0.0, f64::max);
        writeln!(
            f,
            "worst prediction error {:.1}%; outputs {}",
            100.0 * worst,
            if self.exact {
                "identical across planners and loads"
            } else {
                "DIFFER between runs"
            }
        )
    }
}
