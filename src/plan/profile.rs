//! Profiling this device (DESIGN.md §1 step 2): measure what the cost
//! model needs, fit its coefficients, and keep the result in the node's
//! database keyed by the model and the hardware.
//!
//! What is measured, with the engine's own code:
//! - each matrix product of one attention unit, one MLP unit and the head,
//!   for 1 to 32 tokens (decode batches) and a prefill chunk;
//! - those whole units for decode batches 1 to 32 at contexts up to 4096
//!   (attention only: the other units do not depend on the context), and
//!   prefill chunks (`engine::profile`);
//! - reads of whole unit spans and of smaller ranges of the model file, as
//!   the loader does them (aligned, O_DIRECT): the loader reads the same
//!   units again every step, so the figure fitted is that of reads after
//!   the first pass; the first pass is kept for reference. On bare metal
//!   the two agree; on a virtual machine the host may cache the file, and
//!   then the loader sees the faster one;
//! - the memory budget: `MemAvailable` less a reserve, or the budget given.
//!
//! The coefficients are fitted with [`super::fit_compute`] and
//! [`super::fit_storage`]. A stored profile is reused until the model's
//! digest, the hardware fingerprint or the thread count changes, or
//! `--refresh` asks for a new one.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::compute::cpu::Isa;
use crate::engine::loader::{ColdReader, Span};
use crate::engine::offload::Budget;
use crate::engine::profile::{UnitTimer, Work};
use crate::engine::weights::{Model, Unit};
use crate::model::gguf::Gguf;
use crate::store::{ProfileKey, Store};

use super::device::{ComputeModel, DeviceProfile, StorageProfile, WeightRate};
use super::fit::{fit_compute, fit_storage, MatmulSample, ReadSample, UnitSample};
use super::model::{ModelShape, UnitShape};
use super::PlanError;

/// Memory kept back from `MemAvailable` for the OS and other programs: a
/// tenth of the total, at most 1 GiB.
fn memory_reserve(total: u64) -> u64 {
    (total / 10).min(1 << 30)
}

/// Raised scheduling priority for the duration of a measurement.
///
/// On a machine shared with other programs (a developer's workstation, a
/// CI runner), the kernel shares the CPUs fairly between sessions, not
/// processes (autogroups), so a build in another terminal can take most of
/// the CPU away from the compute threads and make every timing several
/// times too long. While this guard lives, the session's autogroup (and
/// the calling thread, for kernels without autogroups) runs at nice −20
/// when the process may raise its priority; it is put back on drop.
/// Without the privilege nothing changes. On a node alone on its device
/// it makes no difference.
pub struct PriorityBoost {
    autogroup: Option<i32>,
    thread: Option<i32>,
}

const AUTOGROUP: &str = "/proc/self/autogroup";

fn autogroup_nice() -> Option<i32> {
    let s = std::fs::read_to_string(AUTOGROUP).ok()?;
    s.split_whitespace().last()?.parse().ok()
}

impl PriorityBoost {
    /// Raises the priority as far as allowed (see the type docs).
    pub fn raise() -> PriorityBoost {
        let autogroup = autogroup_nice().filter(|_| std::fs::write(AUTOGROUP, "-20").is_ok());
        // SAFETY: plain syscalls on the calling thread.
        let thread = unsafe {
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, 0);
            let ok = *libc::__errno_location() == 0
                && libc::setpriority(libc::PRIO_PROCESS, 0, -20) == 0;
            ok.then_some(old)
        };
        PriorityBoost { autogroup, thread }
    }

    /// Whether anything was raised.
    pub fn raised(&self) -> bool {
        self.autogroup.is_some() || self.thread.is_some()
    }
}

impl Drop for PriorityBoost {
    fn drop(&mut self) {
        if let Some(n) = self.autogroup {
            let _ = std::fs::write(AUTOGROUP, n.to_string());
        }
        if let Some(n) = self.thread {
            // SAFETY: plain syscall on the calling thread.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, n);
            }
        }
    }
}

/// What identifies this machine's hardware for the profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_bytes: u64,
    /// The instruction set the kernels use (`Isa::detect`).
    pub isa: String,
}

/// `key: value` lines of a /proc file.
fn proc_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// `MemTotal` and `MemAvailable` from /proc/meminfo, in bytes.
fn meminfo() -> Result<(u64, u64), PlanError> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| PlanError::Profile(format!("reading /proc/meminfo: {e}")))?;
    let kib = |key: &str| -> Result<u64, PlanError> {
        proc_field(&text, key)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|k| k * 1024)
            .ok_or_else(|| PlanError::Profile(format!("/proc/meminfo has no {key}")))
    };
    Ok((kib("MemTotal")?, kib("MemAvailable")?))
}

impl Hardware {
    /// Reads /proc/cpuinfo and /proc/meminfo.
    pub fn detect() -> Result<Hardware, PlanError> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        // x86 names its CPU in "model name"; ARM kernels give "Hardware",
        // "Model" or only the part numbers.
        let cpu_model = ["model name", "Hardware", "Model", "CPU part"]
            .iter()
            .find_map(|k| proc_field(&cpuinfo, k))
            .unwrap_or("unknown")
            .to_string();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (memory_bytes, _) = meminfo()?;
        Ok(Hardware {
            cpu_model,
            cores,
            memory_bytes,
            isa: Isa::detect().name().to_string(),
        })
    }

    /// The fingerprint: a hash of the fields above.
    pub fn fingerprint(&self) -> [u8; 32] {
        let text = format!(
            "cpu={}\ncores={}\nmemory={}\nisa={}\n",
            self.cpu_model, self.cores, self.memory_bytes, self.isa
        );
        Sha256::digest(text.as_bytes()).into()
    }
}

/// The digest of a model file: SHA-256 of its GGUF header (metadata and
/// tensor infos, up to the start of the tensor data) and its length.
///
/// Not a hash of the whole file: that would read every byte (minutes for a
/// 140 GB model on a Jetson) at each start. A profile depends on tensor
/// shapes, types and placement in the file, which the header fixes; the
/// weight values do not change any timing. (Checking that the weights are
/// the published ones is a separate matter.)
pub fn model_digest(path: &Path) -> Result<[u8; 32], PlanError> {
    let g = Gguf::open(path).map_err(crate::engine::EngineError::from)?;
    let header_len = g.data_offset() as usize;
    let mut file = std::fs::File::open(path).map_err(|e| PlanError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut header = vec![0u8; header_len];
    std::io::Read::read_exact(&mut file, &mut header).map_err(|e| PlanError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut h = Sha256::new();
    h.update(&header);
    h.update(g.file_len().to_le_bytes());
    Ok(h.finalize().into())
}

/// The memory budget: `budget` of the model's bytes when given, else
/// `MemAvailable` less a reserve.
pub fn memory_budget(budget: Option<Budget>, model_bytes: u64) -> Result<u64, PlanError> {
    match budget {
        Some(b) => Ok(b.bytes(model_bytes)),
        None => {
            let (total, available) = meminfo()?;
            Ok(available.saturating_sub(memory_reserve(total)))
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct ProfileSpec {
    pub model: PathBuf,
    pub threads: usize,
    /// Fewer batches, contexts and repetitions: seconds instead of a
    /// minute, for tests.
    pub quick: bool,
    /// The memory budget; `None`: `MemAvailable` less a reserve.
    pub budget: Option<Budget>,
    /// Show a progress bar (only ever on a terminal).
    pub progress: bool,
}

/// A timed run of one engine unit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitTime {
    pub kind: UnitKind,
    pub tokens: usize,
    /// (query, key) pairs attended.
    pub attended: u64,
    /// Decode context, or prefill offset.
    pub context: usize,
    pub prefill: bool,
    pub seconds: f64,
}

/// The three kinds of engine unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitKind {
    Attn,
    Mlp,
    Head,
}

/// Everything measured, before fitting.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurements {
    pub threads: usize,
    /// Layers resident and timed in turn.
    pub timed_layers: usize,
    /// (type name, bytes, tokens, seconds) of each matrix product.
    pub matmuls: Vec<(String, u64, u32, f64)>,
    pub units: Vec<UnitTime>,
    /// Reads after the first pass over the same ranges: what the loader
    /// sees in steady state.
    pub reads: Vec<(u64, f64)>,
    /// The first read of each range.
    pub first_reads: Vec<(u64, f64)>,
    /// Whether reads bypassed the page cache with O_DIRECT.
    pub direct_io: bool,
}

/// The grid of one profiling run.
struct Grid {
    batches: Vec<usize>,
    contexts: Vec<usize>,
    /// (chunk, offset) of prefill samples.
    prefill: Vec<(usize, usize)>,
    matmul_tokens: Vec<usize>,
    /// Seconds of decode passes run before anything is timed: the first
    /// second or two after the weights are copied into memory is faster
    /// than the steady state (they are still in the last-level cache).
    warmup_s: f64,
    /// Passes over the layers per sample: at least one, more until this
    /// many seconds have gone by, at most `max_reps`.
    min_sample_s: f64,
    max_reps: usize,
    /// Unit spans of each kind read per pass, and passes.
    spans_per_kind: usize,
    read_passes: usize,
}

impl Grid {
    fn new(quick: bool, context_length: usize) -> Grid {
        let fits = |c: &usize| *c + 64 < context_length;
        if quick {
            Grid {
                batches: vec![1, 4, 16],
                contexts: [0, 256].into_iter().filter(fits).collect(),
                prefill: vec![(64, 0)],
                matmul_tokens: vec![1, 4, 16, 64],
                warmup_s: 1.0,
                min_sample_s: 0.25,
                max_reps: 10,
                spans_per_kind: 2,
                read_passes: 3,
            }
        } else {
            Grid {
                batches: vec![1, 2, 4, 8, 16, 32],
                contexts: [0, 512, 2048, 4096].into_iter().filter(fits).collect(),
                prefill: [(16, 0), (64, 0), (64, 1024), (64, 2048)]
                    .into_iter()
                    .filter(|(n, o)| fits(&(n + o)))
                    .collect(),
                matmul_tokens: vec![1, 2, 4, 8, 16, 32, 64],
                warmup_s: 2.0,
                min_sample_s: 0.25,
                max_reps: 20,
                spans_per_kind: 4,
                read_passes: 3,
            }
        }
    }
}

/// A progress bar on stderr when it is a terminal, else nothing.
fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} profiling [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Median of `v` (not empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// How many layers the profiler keeps resident: all when the model takes
/// at most half the memory available, else as many as fit in that half.
fn timed_layers(path: &Path) -> Result<usize, PlanError> {
    let m = Model::open_with(path, |_| false)?;
    let per_layer = m.resident_bytes(Unit::Attn(0)) + m.resident_bytes(Unit::Mlp(0));
    let room = memory_budget(None, 0)? / 2;
    let room = room.saturating_sub(m.resident_bytes(Unit::Head));
    Ok(((room / per_layer.max(1)) as usize).clamp(1, m.config.n_layer))
}

/// Unit times gathered over passes, before taking medians.
#[derive(Clone, Debug, Default)]
pub struct UnitTimes {
    pub attn: Vec<f64>,
    pub mlp: Vec<f64>,
    pub head: Vec<f64>,
}

/// Units of the model resident and timed on demand: what [`measure`] does
/// at each point of its grid, for a caller that wants a point measured at
/// a moment of its choosing (validation times a row's batch right around
/// the engine's own steps, so that both see the machine in the same state).
pub struct Sampler {
    timer: UnitTimer,
    cache_cap: u64,
}

impl Sampler {
    /// Makes the timed layers of `model` resident (all of them when the
    /// model takes at most half the available memory).
    pub fn open(model: &Path, threads: usize) -> Result<Sampler, PlanError> {
        let n = timed_layers(model)?;
        let timed = |u: Unit| match u {
            Unit::Attn(l) | Unit::Mlp(l) => l < n,
            Unit::Head => true,
        };
        let model = Arc::new(Model::open_with(model, timed)?);
        // KV caches beyond an eighth of the available memory are not worth
        // the risk: batches and contexts that need more for one layer are
        // skipped.
        let cache_cap = memory_budget(None, 0)? / 8;
        Ok(Sampler {
            timer: UnitTimer::new(model, (0..n).collect(), threads, cache_cap)?,
            cache_cap,
        })
    }

    /// A sampler over a model whose every unit is already resident (an
    /// engine's, fully resident), timing its own weights.
    pub fn of_resident(model: Arc<Model>, threads: usize) -> Result<Sampler, PlanError> {
        let cache_cap = memory_budget(None, 0)? / 8;
        let layers = (0..model.config.n_layer).collect();
        Ok(Sampler {
            timer: UnitTimer::new(model, layers, threads, cache_cap)?,
            cache_cap,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        self.timer.model()
    }

    /// Layers resident and timed in turn.
    pub fn timed_layers(&self) -> usize {
        self.timer.layers().len()
    }

    /// Whether `work` fits the cache cap.
    pub fn fits(&self, work: Work) -> bool {
        self.timer.cache_bytes_per_layer(work) <= self.cache_cap
    }

    /// Runs passes of `work` for at least `min_s` seconds (at least one,
    /// at most `max_passes`), adding every unit's time to `acc`.
    pub fn sample(
        &mut self,
        work: Work,
        min_s: f64,
        max_passes: usize,
        acc: &mut UnitTimes,
    ) -> Result<(), PlanError> {
        let t = std::time::Instant::now();
        for i in 0..max_passes.max(1) {
            if i > 0 && t.elapsed().as_secs_f64() >= min_s {
                break;
            }
            let p = self.timer.time_pass(work)?;
            acc.attn.extend(p.attn);
            acc.mlp.extend(p.mlp);
            acc.head.push(p.head);
        }
        Ok(())
    }
}

impl Measurements {
    /// Replaces the unit samples of `work` (attention at its context, MLP
    /// and head at its token count) by the medians of `times`.
    pub fn set_samples(&mut self, work: Work, times: UnitTimes) {
        let prefill = matches!(work, Work::Prefill { .. });
        let context = match work {
            Work::Decode { context, .. } => context,
            Work::Prefill { offset, .. } => offset,
        };
        let tokens = work.tokens();
        for (kind, times, attended, context) in [
            (UnitKind::Attn, times.attn, work.attended(), context),
            (UnitKind::Mlp, times.mlp, 0, 0),
            (UnitKind::Head, times.head, 0, 0),
        ] {
            if times.is_empty() {
                continue;
            }
            let sample = UnitTime {
                kind,
                tokens,
                attended,
                context,
                prefill,
                seconds: median(times),
            };
            let same = |u: &UnitTime| {
                u.kind == kind && u.tokens == tokens && u.prefill == prefill && u.context == context
            };
            match self.units.iter_mut().find(|u| same(u)) {
                Some(u) => *u = sample,
                None => self.units.push(sample),
            }
        }
    }
}

/// Measures this device on `spec.model` (module docs), with raised
/// priority ([`PriorityBoost`]).
pub fn measure(spec: &ProfileSpec) -> Result<Measurements, PlanError> {
    let _boost = PriorityBoost::raise();
    let mut sampler = Sampler::open(&spec.model, spec.threads)?;
    let n = sampler.timed_layers();
    let model = sampler.model().clone();
    let c = model.config.clone();
    let grid = Grid::new(spec.quick, c.context_length);
    let timer = &mut sampler.timer;
    let mut work: Vec<Work> = Vec::new();
    for &batch in &grid.batches {
        for &context in &grid.contexts {
            work.push(Work::Decode { batch, context });
        }
    }
    for &(chunk, offset) in &grid.prefill {
        work.push(Work::Prefill { chunk, offset });
    }
    work.retain(|&w| timer.cache_bytes_per_layer(w) <= sampler.cache_cap);
    let steps = 1 + grid.matmul_tokens.len() + work.len() + grid.read_passes;
    let bar = progress_bar(spec.progress, steps as u64);
    // Repeats `f` for one sample (see `Grid::min_sample_s`).
    let repeat = |f: &mut dyn FnMut() -> Result<(), PlanError>| -> Result<(), PlanError> {
        let t = std::time::Instant::now();
        for i in 0..grid.max_reps {
            if i > 0 && t.elapsed().as_secs_f64() >= grid.min_sample_s {
                break;
            }
            f()?;
        }
        Ok(())
    };

    bar.set_message("warming up");
    let t = std::time::Instant::now();
    while t.elapsed().as_secs_f64() < grid.warmup_s {
        timer.time_pass(Work::Decode {
            batch: 1,
            context: 0,
        })?;
    }
    bar.inc(1);

    bar.set_message("matrix products");
    let mut by_matrix: std::collections::BTreeMap<(String, u64, u32), Vec<f64>> =
        Default::default();
    for &tokens in &grid.matmul_tokens {
        repeat(&mut || {
            for m in timer.time_matmuls(tokens)? {
                by_matrix
                    .entry((m.dtype.name().to_string(), m.bytes, tokens as u32))
                    .or_default()
                    .push(m.seconds);
            }
            Ok(())
        })?;
        bar.inc(1);
    }
    let matmuls = by_matrix
        .into_iter()
        .map(|((name, bytes, tokens), times)| (name, bytes, tokens, median(times)))
        .collect();

    // Every pass runs whole steps' worth of units, so that each unit meets
    // the caches as in a step; the MLP and head do not depend on the
    // context, so their times at one token count are pooled.
    bar.set_message("units");
    let mut units = Vec::new();
    let mut pooled: std::collections::BTreeMap<(usize, bool), (Vec<f64>, Vec<f64>)> =
        Default::default();
    for w in work {
        let mut attn = Vec::new();
        let prefill = matches!(w, Work::Prefill { .. });
        let (mlp, head) = pooled.entry((w.tokens(), prefill)).or_default();
        repeat(&mut || {
            let t = timer.time_pass(w)?;
            attn.extend(t.attn);
            mlp.extend(t.mlp);
            head.push(t.head);
            Ok(())
        })?;
        bar.inc(1);
        let context = match w {
            Work::Decode { context, .. } => context,
            Work::Prefill { offset, .. } => offset,
        };
        units.push(UnitTime {
            kind: UnitKind::Attn,
            tokens: w.tokens(),
            attended: w.attended(),
            context,
            prefill,
            seconds: median(attn),
        });
    }
    for ((tokens, prefill), (mlp, head)) in pooled {
        for (kind, times) in [(UnitKind::Mlp, mlp), (UnitKind::Head, head)] {
            units.push(UnitTime {
                kind,
                tokens,
                attended: 0,
                context: 0,
                prefill,
                seconds: median(times),
            });
        }
    }
    drop(sampler);

    bar.set_message("storage");
    let (reads, first_reads, direct_io) = measure_reads(&model, &grid, &bar)?;
    bar.finish_and_clear();
    Ok(Measurements {
        threads: spec.threads,
        timed_layers: n,
        matmuls,
        units,
        reads,
        first_reads,
        direct_io,
    })
}

/// The read ranges: whole spans of units spread over the file, and
/// ranges of 64 KiB, 256 KiB and 1 MiB at the start of other units, so
/// that sizes differ enough to separate latency from bandwidth.
fn read_ranges(model: &Model, per_kind: usize) -> Vec<(u64, u64)> {
    let l = model.config.n_layer;
    let layers: Vec<usize> = (0..per_kind.min(l))
        .map(|i| (2 * i + 1) * l / (2 * per_kind.min(l)))
        .collect();
    let mut ranges = Vec::new();
    for &layer in &layers {
        for u in [Unit::Attn(layer), Unit::Mlp(layer)] {
            let s = Span::of(model, u);
            ranges.push((s.start, s.len));
        }
    }
    let head = Span::of(model, Unit::Head);
    ranges.push((head.start, head.len));
    // A ladder of sizes over the whole file, so that even a small model
    // gives reads of several sizes.
    let file = model.gguf().file_len();
    for (i, size) in [64u64 << 10, 1 << 20, 16 << 20].into_iter().enumerate() {
        let len = size.min(file);
        let start = (file - len) * (2 * i as u64 + 1) / 6;
        ranges.push((start, len));
    }
    let small = [64u64 << 10, 256 << 10, 1 << 20];
    for (i, &layer) in layers.iter().enumerate() {
        let other = (layer + l / 2 + 1) % l;
        let s = Span::of(model, Unit::Mlp(other));
        let len = small[i % small.len()].min(s.len);
        ranges.push((s.start, len));
        let s = Span::of(model, Unit::Attn(other));
        ranges.push((s.start, small[(i + 1) % small.len()].min(s.len)));
    }
    ranges.sort();
    ranges.dedup();
    ranges
}

type Reads = (Vec<(u64, f64)>, Vec<(u64, f64)>, bool);

fn measure_reads(
    model: &Model,
    grid: &Grid,
    bar: &indicatif::ProgressBar,
) -> Result<Reads, PlanError> {
    let ranges = read_ranges(model, grid.spans_per_kind);
    let max = ranges.iter().map(|r| r.1).max().unwrap_or(4096);
    let mut reader = ColdReader::open(model, max + 8192)?;
    let (mut first, mut later) = (Vec::new(), Vec::new());
    for pass in 0..grid.read_passes {
        for &(start, len) in &ranges {
            let sample = reader.read(start, len)?;
            if pass == 0 {
                first.push(sample);
            } else {
                later.push(sample);
            }
        }
        bar.inc(1);
    }
    Ok((later, first, reader.direct()))
}

/// Timed reads of the spans of `units`, in order, as the loader reads
/// them, `passes` times (at least 2): the first pass is not kept, since
/// the loader reads the same units every step. Reads of 64 KiB, 256 KiB
/// and 1 MiB at the start of the spans are added (after a pass of their
/// own) so that the fit can tell latency from bandwidth.
pub fn measure_unit_reads(
    model: &Model,
    units: &[Unit],
    passes: usize,
) -> Result<Vec<ReadSample>, PlanError> {
    let spans: Vec<Span> = units.iter().map(|&u| Span::of(model, u)).collect();
    let max = spans.iter().map(|s| s.len).max().unwrap_or(4096);
    let mut reader = ColdReader::open(model, max + 8192)?;
    let small: Vec<(u64, u64)> = spans
        .iter()
        .zip([64u64 << 10, 256 << 10, 1 << 20].iter().cycle())
        .map(|(s, &len)| (s.start, len.min(s.len)))
        .collect();
    let mut samples = Vec::new();
    for pass in 0..passes.max(2) {
        for &(start, len) in spans
            .iter()
            .map(|s| (s.start, s.len))
            .collect::<Vec<_>>()
            .iter()
            .chain(&small)
        {
            let (bytes, seconds) = reader.read(start, len)?;
            if pass > 0 {
                samples.push(ReadSample { bytes, seconds });
            }
        }
    }
    Ok(samples)
}

/// How units are grouped when fitting: the per-unit overhead of the
/// compute model is per unit of the shape it will be used with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// Decoder layers and the head ([`ModelShape::of_model`]): for planning.
    DecoderLayers,
    /// The engine's units ([`ModelShape::engine_units`]): for predicting
    /// the local engine.
    EngineUnits,
}

/// Bytes by type of one engine unit of `kind`, as the timer ran it.
fn engine_unit_shape(shape: &ModelShape, kind: UnitKind) -> UnitShape {
    match kind {
        UnitKind::Attn => shape.layers[0].clone(),
        UnitKind::Mlp => shape.layers[1].clone(),
        UnitKind::Head => shape.head.clone(),
    }
}

/// Fits the compute model of `m` for `model` at `grouping`, and adds a
/// `default` rate (the slowest measured) for weights of other types, such
/// as the f32 norm vectors of a decoder layer.
pub fn fit_measurements(
    m: &Measurements,
    model: &Model,
    grouping: Grouping,
) -> Result<(ComputeModel, StorageProfile), PlanError> {
    let matmuls: Vec<MatmulSample> = m
        .matmuls
        .iter()
        .map(|(name, bytes, tokens, seconds)| {
            let dtype = crate::model::dtype::GgmlType::from_name(name)
                .ok_or_else(|| PlanError::Fit(format!("unknown type {name}")))?;
            Ok(MatmulSample {
                dtype,
                bytes: *bytes,
                tokens: *tokens,
                seconds: *seconds,
            })
        })
        .collect::<Result<_, PlanError>>()?;
    let shape = ModelShape::engine_units(model, "profile")?;
    let unit_of = |k: UnitKind| engine_unit_shape(&shape, k);
    let layers = model.config.n_layer as f64;
    // Attention samples at one token count share the layers' weight.
    let contexts = |u: &UnitTime| {
        m.units
            .iter()
            .filter(|v| v.kind == UnitKind::Attn && v.tokens == u.tokens && v.prefill == u.prefill)
            .count()
            .max(1) as f64
    };
    // A prefill chunk's queries share each key they read, so attention
    // costs less per pair than in decode, where every sequence reads its
    // own cache; one `r` cannot follow both, and decode steps are what the
    // scheduler's objective is made of: prefill samples count a quarter.
    let prefill_weight = |u: &UnitTime| if u.prefill { 0.25 } else { 1.0 };
    let units: Vec<UnitSample> = match grouping {
        Grouping::EngineUnits => m
            .units
            .iter()
            .map(|u| UnitSample {
                unit: unit_of(u.kind),
                tokens: u.tokens as u32,
                attended: u.attended,
                seconds: u.seconds,
                weight: prefill_weight(u)
                    * match u.kind {
                        UnitKind::Attn => layers / contexts(u),
                        UnitKind::Mlp => layers,
                        UnitKind::Head => 1.0,
                    },
            })
            .collect(),
        Grouping::DecoderLayers => {
            // A layer's sample: its attention at some context plus its MLP
            // for the same tokens (the MLP does not depend on the context).
            let mut layer = unit_of(UnitKind::Attn);
            let mlp = unit_of(UnitKind::Mlp);
            for w in &mlp.weights {
                match layer.weights.iter_mut().find(|x| x.dtype == w.dtype) {
                    Some(x) => x.bytes += w.bytes,
                    None => layer.weights.push(*w),
                }
            }
            let mut out = Vec::new();
            for a in m.units.iter().filter(|u| u.kind == UnitKind::Attn) {
                if let Some(f) = m.units.iter().find(|u| {
                    u.kind == UnitKind::Mlp && u.tokens == a.tokens && u.prefill == a.prefill
                }) {
                    out.push(UnitSample {
                        unit: layer.clone(),
                        tokens: a.tokens as u32,
                        attended: a.attended,
                        seconds: a.seconds + f.seconds,
                        weight: prefill_weight(a) * layers / contexts(a),
                    });
                }
            }
            out.extend(
                m.units
                    .iter()
                    .filter(|u| u.kind == UnitKind::Head)
                    .map(|u| UnitSample {
                        unit: unit_of(UnitKind::Head),
                        tokens: u.tokens as u32,
                        attended: 0,
                        seconds: u.seconds,
                        weight: prefill_weight(u),
                    }),
            );
            out
        }
    };
    let mut compute = fit_compute(&matmuls, &units)?;
    let slowest = compute
        .weights
        .values()
        .copied()
        .fold(None::<WeightRate>, |a, w| match a {
            Some(a) if a.s_per_byte >= w.s_per_byte => Some(a),
            _ => Some(w),
        });
    if let Some(w) = slowest {
        compute.weights.entry("default".into()).or_insert(w);
    }
    let reads: Vec<ReadSample> = m
        .reads
        .iter()
        .map(|&(bytes, seconds)| ReadSample { bytes, seconds })
        .collect();
    let storage = fit_storage(&reads)?;
    Ok((compute, storage))
}

/// A profile as kept in the database.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredProfile {
    /// The fitted device, for planning with decoder layers as units.
    pub device: DeviceProfile,
    pub hardware: Hardware,
    /// The model file it was measured on.
    pub model_path: PathBuf,
    pub threads: usize,
    pub quick: bool,
    /// Seconds since the Unix epoch.
    pub measured_at: u64,
    /// Read bandwidth of the first pass over each range (bytes/s).
    pub first_read_bytes_per_s: f64,
    pub measurements: Measurements,
}

/// What [`profile`] did.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileOutcome {
    pub stored: StoredProfile,
    /// Taken from the database rather than measured now.
    pub reused: bool,
    /// Why it was measured (or "reused").
    pub reason: String,
    pub data_dir: PathBuf,
    /// Set when the database was unusable and rebuilt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_recovered: Option<String>,
}

/// The device name of this machine: its host name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "self".into())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn model_bytes(model: &Model) -> u64 {
    model.gguf().tensors().iter().map(|t| t.size).sum()
}

/// Measures and fits a profile for planning, without the database.
pub fn measure_profile(spec: &ProfileSpec) -> Result<StoredProfile, PlanError> {
    let hardware = Hardware::detect()?;
    let measurements = measure(spec)?;
    let model = Model::open_with(&spec.model, |_| false)?;
    let (compute, storage) = fit_measurements(&measurements, &model, Grouping::DecoderLayers)?;
    let first: Vec<ReadSample> = measurements
        .first_reads
        .iter()
        .map(|&(bytes, seconds)| ReadSample { bytes, seconds })
        .collect();
    let first_read_bytes_per_s = fit_storage(&first)
        .map(|s| s.read_bytes_per_s)
        .unwrap_or(storage.read_bytes_per_s);
    Ok(StoredProfile {
        device: DeviceProfile {
            name: host_name(),
            memory_budget_bytes: memory_budget(spec.budget, model_bytes(&model))?,
            storage,
            compute,
        },
        hardware,
        model_path: spec.model.clone(),
        threads: spec.threads,
        quick: spec.quick,
        measured_at: unix_now(),
        first_read_bytes_per_s,
        measurements,
    })
}

/// The stored profile of this machine for `model`, if any, with its
/// memory budget brought up to date (memory is cheap to measure again and
/// changes with what else runs).
pub fn stored_profile(
    model: &Path,
    data_dir: &Path,
    budget: Option<Budget>,
) -> Result<Option<StoredProfile>, PlanError> {
    stored_profile_in(&Store::open(data_dir)?, model, budget)
}

/// [`stored_profile`] from a store that is already open (a running node's).
pub fn stored_profile_in(
    store: &Store,
    model: &Path,
    budget: Option<Budget>,
) -> Result<Option<StoredProfile>, PlanError> {
    let key = ProfileKey {
        model: model_digest(model)?,
        hardware: Hardware::detect()?.fingerprint(),
    };
    let Some(mut p) = store.get_profile::<StoredProfile>(&key).ok().flatten() else {
        return Ok(None);
    };
    let m = Model::open_with(model, |_| false)?;
    p.device.memory_budget_bytes = memory_budget(budget, model_bytes(&m))?;
    Ok(Some(p))
}

/// `loip profile`: the stored profile when it is still valid, else a new
/// measurement, stored.
pub fn profile(
    spec: &ProfileSpec,
    data_dir: &Path,
    refresh: bool,
) -> Result<ProfileOutcome, PlanError> {
    let store = Store::open(data_dir)?;
    let database_recovered = store.recovery().map(|r| {
        format!(
            "the database was unusable ({}); it was moved to {} and rebuilt",
            r.reason,
            r.set_aside.display()
        )
    });
    let hardware = Hardware::detect()?;
    let key = ProfileKey {
        model: model_digest(&spec.model)?,
        hardware: hardware.fingerprint(),
    };
    // A value that does not decode is measured again and overwritten.
    let old = store.get_profile::<StoredProfile>(&key).ok().flatten();
    let reason = match &old {
        _ if refresh => "--refresh".to_string(),
        None => "no stored profile for this model and hardware".to_string(),
        Some(p) if p.threads != spec.threads => {
            format!("stored for {} threads, not {}", p.threads, spec.threads)
        }
        Some(p) if p.quick && !spec.quick => "the stored profile is a quick one".to_string(),
        Some(_) => "reused".to_string(),
    };
    if let (Some(mut p), "reused") = (old, reason.as_str()) {
        let m = Model::open_with(&spec.model, |_| false)?;
        p.device.memory_budget_bytes = memory_budget(spec.budget, model_bytes(&m))?;
        return Ok(ProfileOutcome {
            stored: p,
            reused: true,
            reason,
            data_dir: data_dir.to_path_buf(),
            database_recovered,
        });
    }
    let stored = measure_profile(spec)?;
    store.put_profile(&key, &stored)?;
    store.flush()?;
    Ok(ProfileOutcome {
        stored,
        reused: false,
        reason,
        data_dir: data_dir.to_path_buf(),
        database_recovered,
    })
}

impl std::fmt::Display for ProfileOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.stored;
        let d = &p.device;
        if let Some(r) = &self.database_recovered {
            writeln!(f, "warning: {r}")?;
        }
        writeln!(
            f,
            "{} profile of `{}` ({}, {} cores, {:.1} GiB, {}) for {}, {} threads{}",
            if self.reused { "stored" } else { "new" },
            d.name,
            p.hardware.cpu_model,
            p.hardware.cores,
            p.hardware.memory_bytes as f64 / (1u64 << 30) as f64,
            p.hardware.isa,
            p.model_path.display(),
            p.threads,
            if p.quick { " (quick)" } else { "" }
        )?;
        if !self.reused {
            writeln!(f, "measured because: {}", self.reason)?;
        }
        writeln!(
            f,
            "memory budget    {:.2} GiB",
            d.memory_budget_bytes as f64 / (1u64 << 30) as f64
        )?;
        writeln!(
            f,
            "storage          {:.2} GB/s, {:.0} us per read ({}; first pass {:.2} GB/s)",
            d.storage.read_bytes_per_s / 1e9,
            d.storage.read_latency_s * 1e6,
            if p.measurements.direct_io {
                "O_DIRECT"
            } else {
                "buffered, pages dropped"
            },
            p.first_read_bytes_per_s / 1e9
        )?;
        let c = &d.compute;
        writeln!(
            f,
            "compute          {:.1} us per layer, {:.2} us per token, {:.3} ns per KV byte",
            c.layer_overhead_s * 1e6,
            c.per_token_s * 1e6,
            c.kv_s_per_byte * 1e9
        )?;
        for (name, w) in &c.weights {
            writeln!(
                f,
                "  {name:<8}       {:.2} GB/s memory-bound, {:.1} GB·token/s arithmetic-bound",
                1.0 / w.s_per_byte / 1e9,
                1.0 / w.s_per_byte_token / 1e9
            )?;
        }
        let factors: Vec<String> = c
            .token_factors
            .iter()
            .map(|(n, x)| format!("{n}: {x:.2}"))
            .collect();
        writeln!(
            f,
            "  roofline       {}; batch factors {}",
            c.roofline_exponent
                .map_or("sharp".to_string(), |p| format!("exponent {p}")),
            if factors.is_empty() {
                "none".to_string()
            } else {
                factors.join(", ")
            }
        )?;
        write!(f, "data directory   {}", self.data_dir.display())?;
        writeln!(f)
    }
}
