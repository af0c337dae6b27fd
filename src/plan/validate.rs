//! Checking the cost model and the simulator against the engine on this
//! machine: for each memory budget and batch, the decode step time the
//! simulator predicts for the engine's own placement, beside the step time
//! the engine takes.
//!
//! 1. Profile this device on the model (compute and storage, as
//!    `loip profile` does) and fit the cost model with the engine's units
//!    as units ([`Grouping::EngineUnits`]): the engine streams attention
//!    and MLP halves of layers separately, so that is the granularity the
//!    prediction must have.
//! 2. For each (budget, batch): open the model under the budget as
//!    `open_offloaded` does, take the placement it chose (`offload::place`:
//!    resident and streamed units, `K` slots), and express it as a plan of
//!    one window on one device. The simulator's steady-state decode step
//!    for that plan at the batch and the context of the timed steps is the
//!    prediction.
//! 3. Run the engine: prefill every sequence, warm up, then time each
//!    decode step (the batched forward pass and the argmax of every
//!    sequence) and take the median.
//!
//! Both sides are measured on the same machine in the same run, so its
//! speed cancels out; on a machine shared with other programs (where this
//! was written, a virtual machine whose storage speed swings between 1 and
//! 3 GB/s from one second to the next) two more steps keep them together:
//! - storage: the prediction takes `t_load` as the loader's own reads took
//!   it in the timed steps (bytes over the time spent inside the read
//!   calls, which excludes waiting for slots and compute). What is checked
//!   is then how the simulator overlaps those loads with compute through
//!   `K` slots, and the compute model. The prediction from reads of the
//!   same units just before the run is reported beside it;
//! - compute, where every unit is resident: passes of the row's batch over
//!   the engine's own weights just before and just after its timed steps
//!   replace the profile's samples at that batch before the fit.
//!
//! With `retry_failed`, a row outside the tolerance is measured again, up
//! to [`MAX_TRIES`] times in all, and the last measurement kept; the report
//! says so. A short step (10 ms on a small model) is easily doubled by one
//! burst of another program on a 2-core machine. Measurements run
//! at raised priority ([`PriorityBoost`]).

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::engine::bench::bench_prompt;
use crate::engine::forward::TokenIn;
use crate::engine::generate::{argmax, Engine};
use crate::engine::kv::KvCache;
use crate::engine::offload::{open_offloaded, Budget, Demand, LoadMode, OffloadSpec, Placement};
use crate::engine::profile::Work;
use crate::engine::weights::{Model, Unit};

use super::fit::fit_storage;
use super::profile::{
    fit_measurements, measure, measure_unit_reads, median, Grouping, PriorityBoost, ProfileSpec,
    Sampler, UnitTimes,
};
use super::{
    objective_value, DeviceProfile, Link, Loading, ModelShape, Network, Objective, Pattern, Plan,
    PlanError, Planner, Problem, StorageProfile, Window, Workload,
};

/// Seconds of compute passes of a row's batch before and after the
/// engine's timed steps.
const SAMPLE_S: f64 = 0.3;

/// Measurements of one row, at most, with `retry_failed`.
pub const MAX_TRIES: usize = 3;

/// What to compare.
#[derive(Clone, Debug)]
pub struct ValidationSpec {
    pub model: PathBuf,
    pub threads: usize,
    /// Memory budgets, in percent of the model's bytes.
    pub budgets: Vec<f64>,
    /// Sequences decoded together.
    pub batches: Vec<usize>,
    /// Streaming slots (K).
    pub slots: usize,
    /// Prompt length of each sequence.
    pub prompt_tokens: usize,
    /// Decode steps run before timing: at least this many, and more until
    /// `warmup_s` seconds have gone by (the first second or so after the
    /// weights are copied into memory runs faster than the steady state).
    pub warmup_steps: usize,
    pub warmup_s: f64,
    /// Decode steps timed; the median is the measurement.
    pub steps: usize,
    /// Largest accepted |predicted − measured| / measured.
    pub tolerance: f64,
    /// Measure a row outside the tolerance once more (module docs).
    pub retry_failed: bool,
    /// A quick profile (tests).
    pub quick_profile: bool,
    /// Show a progress bar while profiling (on a terminal only).
    pub progress: bool,
}

impl ValidationSpec {
    /// Budgets 100%, 50% and 25%, batches 1 and 16, 2 slots, prompts of
    /// 64 tokens, 3 warm-up and 9 timed steps, 15% tolerance.
    pub fn new(model: PathBuf, threads: usize) -> ValidationSpec {
        ValidationSpec {
            model,
            threads,
            budgets: vec![100.0, 50.0, 25.0],
            batches: vec![1, 16],
            slots: 2,
            prompt_tokens: 64,
            warmup_steps: 3,
            warmup_s: 1.0,
            steps: 9,
            tolerance: 0.15,
            retry_failed: false,
            quick_profile: false,
            progress: false,
        }
    }
}

/// One (budget, batch) of the comparison.
#[derive(Clone, Debug, Serialize)]
pub struct ValidationRow {
    pub budget_percent: f64,
    pub batch: usize,
    pub budget_bytes: u64,
    /// Units streamed, of all units.
    pub streamed_units: usize,
    pub units: usize,
    /// Bytes read from storage per decode step.
    pub streamed_bytes_per_step: u64,
    /// The simulator's decode step, seconds, with the storage bandwidth the
    /// loader's reads achieved in the timed steps (module docs).
    pub predicted_step_s: f64,
    /// The same with the storage bandwidth measured on the streamed units
    /// just before the run.
    pub predicted_profiled_storage_step_s: f64,
    /// Of which waiting for slots (the prediction less the same plan with
    /// every unit resident).
    pub predicted_stall_s: f64,
    /// Storage bandwidth measured on the streamed units just before the
    /// run (the profile's when nothing is streamed), bytes per second.
    pub read_bytes_per_s: f64,
    /// Bytes per second the loader's reads achieved in the timed steps
    /// (time inside the reads only), when it streamed.
    pub loader_bytes_per_s: Option<f64>,
    /// The engine's median decode step, seconds.
    pub measured_step_s: f64,
    /// The engine's median loading bubbles per step, seconds.
    pub measured_bubble_s: f64,
    /// (predicted − measured) / measured.
    pub error: f64,
    /// Measured a second time after falling outside the tolerance.
    pub retried: bool,
}

/// The comparison, as `loip validate` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct ValidationReport {
    pub model: PathBuf,
    pub threads: usize,
    pub slots: usize,
    pub context_tokens: usize,
    pub tolerance: f64,
    /// The profile the predictions used (engine units as units).
    pub device: DeviceProfile,
    pub rows: Vec<ValidationRow>,
}

impl ValidationReport {
    /// The largest |error| over the rows.
    pub fn worst_error(&self) -> f64 {
        self.rows.iter().map(|r| r.error.abs()).fold(0.0, f64::max)
    }

    pub fn passes(&self) -> bool {
        self.worst_error() <= self.tolerance
    }
}

/// The engine's placement as a one-device plan over `shape`'s units.
fn plan_of(
    placement: &Placement,
    n_layer: usize,
    shape: &ModelShape,
    device: &str,
    workload: &Workload,
    slots: usize,
    all_resident: bool,
) -> Plan {
    let units = Unit::all(n_layer);
    let streamed: Vec<bool> = units
        .iter()
        .map(|&u| !all_resident && !placement.is_resident(u))
        .collect();
    let kv_per_token: u64 = shape.layers.iter().map(|l| l.kv_bytes_per_token).sum();
    Plan {
        epoch: 0,
        planner: Planner::Loip,
        ring: vec![device.to_string()],
        windows: vec![Window {
            device: 0,
            units: 0..units.len() as u32,
            streamed,
        }],
        kv_budget_bytes: vec![
            workload.batch() as u64 * workload.context_tokens as u64 * kv_per_token,
        ],
        slots: slots.max(1) as u32,
        loading: Loading::Prefetch,
        micro_batches: 1,
        batch: workload.batch(),
        context_tokens: workload.context_tokens,
    }
}

/// What the engine did in the timed steps.
struct EngineTimes {
    /// Median step and median loading bubbles per step, seconds.
    step_s: f64,
    bubble_s: f64,
    /// Bytes per second of the loader's reads (time inside the reads).
    loader_bytes_per_s: Option<f64>,
}

/// Sequences being decoded by the engine for one row.
struct Decoding {
    caches: Vec<KvCache>,
    next: Vec<u32>,
    want: Vec<usize>,
    n_vocab: usize,
}

impl Decoding {
    /// Prefills `batch` sequences with deterministic prompts.
    fn start(
        engine: &mut Engine,
        spec: &ValidationSpec,
        batch: usize,
    ) -> Result<Decoding, PlanError> {
        let n_vocab = engine.model().config.n_vocab;
        let mut caches: Vec<KvCache> = (0..batch).map(|_| engine.new_cache()).collect();
        let mut next = Vec::with_capacity(batch);
        for (s, cache) in caches.iter_mut().enumerate() {
            let prompt = bench_prompt(n_vocab, spec.prompt_tokens, 0x5EED + s as u64);
            let logits = engine.prefill(cache, &prompt, false)?;
            next.push(argmax(&logits));
        }
        Ok(Decoding {
            caches,
            next,
            want: (0..batch).collect(),
            n_vocab,
        })
    }

    /// One decode step with the argmax of every sequence; its seconds.
    fn step(&mut self, engine: &mut Engine) -> Result<f64, PlanError> {
        let tokens: Vec<TokenIn> = self
            .next
            .iter()
            .enumerate()
            .map(|(seq, &id)| TokenIn {
                id,
                seq,
                pos: self.caches[seq].len(),
            })
            .collect();
        let t = Instant::now();
        let logits = engine.step(&tokens, &mut self.caches, &self.want)?;
        for (n, row) in self.next.iter_mut().zip(logits.chunks_exact(self.n_vocab)) {
            *n = argmax(row);
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Warm-up steps: at least `spec.warmup_steps`, more until
    /// `spec.warmup_s` have gone by. They do not grow the context: the
    /// timed steps all start from the prompt, whatever the machine's speed.
    fn warm_up(&mut self, engine: &mut Engine, spec: &ValidationSpec) -> Result<(), PlanError> {
        let start = Instant::now();
        let mut n = 0;
        while n < spec.warmup_steps || start.elapsed().as_secs_f64() < spec.warmup_s {
            self.step(engine)?;
            n += 1;
            for c in self.caches.iter_mut() {
                c.truncate(spec.prompt_tokens);
            }
        }
        Ok(())
    }

    /// Times `spec.steps` steps.
    fn timed(
        &mut self,
        engine: &mut Engine,
        spec: &ValidationSpec,
    ) -> Result<EngineTimes, PlanError> {
        let (mut steps, mut bubbles) = (Vec::new(), Vec::new());
        let (mut read_bytes, mut read_s) = (0u64, 0.0);
        while steps.len() < spec.steps {
            engine.reset_load_stats();
            steps.push(self.step(engine)?);
            let load = engine.load_stats().unwrap_or_default();
            bubbles.push(load.bubble_s);
            read_bytes += load.bytes_read;
            read_s += load.read_s;
        }
        Ok(EngineTimes {
            step_s: median(steps),
            bubble_s: median(bubbles),
            loader_bytes_per_s: (read_s > 0.0).then(|| read_bytes as f64 / read_s),
        })
    }
}

/// Runs the comparison (module docs).
pub fn run(spec: &ValidationSpec) -> Result<ValidationReport, PlanError> {
    if spec.steps == 0 || spec.budgets.is_empty() || spec.batches.is_empty() {
        return Err(PlanError::Problem(
            "validation needs at least one budget, one batch and one timed step".into(),
        ));
    }
    let _boost = PriorityBoost::raise();
    let measurements = measure(&ProfileSpec {
        model: spec.model.clone(),
        threads: spec.threads,
        quick: spec.quick_profile,
        budget: None,
        progress: spec.progress,
    })?;
    let model = Model::open_with(&spec.model, |_| false)?;
    let n_layer = model.config.n_layer;
    let (compute, storage) = fit_measurements(&measurements, &model, Grouping::EngineUnits)?;
    let shape = ModelShape::engine_units(&model, &spec.model.display().to_string())?;
    let device = DeviceProfile {
        name: "this-device".into(),
        // The placement is the engine's; the plan is only timed.
        memory_budget_bytes: u64::MAX / 4,
        storage,
        compute,
    };
    // The context at the middle of the timed steps.
    let context = spec.prompt_tokens + spec.steps / 2;

    let positions = spec.prompt_tokens + spec.steps + 1;
    let mut rows = Vec::new();
    for &pct in &spec.budgets {
        for &batch in &spec.batches {
            let offload = OffloadSpec {
                budget: Budget::Percent(pct),
                demand: Demand {
                    batch,
                    positions,
                    slots: spec.slots,
                },
                threads: spec.threads,
                mode: LoadMode::Prefetch,
            };
            let pattern = if batch == 1 {
                Pattern::Sporadic
            } else {
                Pattern::Bursty(batch as u32)
            };
            let workload = Workload {
                pattern,
                prompt_tokens: 1,
                output_tokens: 2,
                context_tokens: context as u32,
                prefill_chunk: 64,
            };
            let mut problem = Problem::new(
                vec![device.clone()],
                Network::uniform(Link {
                    bandwidth_bps: 1e9,
                    latency_s: 0.0,
                }),
                shape.clone(),
                workload,
            );
            problem.objective = Objective::Throughput;
            let measure_row = || -> Result<ValidationRow, PlanError> {
                let (mut engine, placement) = open_offloaded(&spec.model, &offload)?;
                // Storage speed drifts (other programs' I/O, the host's
                // cache): measure it on the units the loader will read,
                // just before the engine reads them.
                let mut device = device.clone();
                if !placement.streamed.is_empty() {
                    let reads = measure_unit_reads(engine.model(), &placement.streamed, 3)?;
                    device.storage = fit_storage(&reads)?;
                }
                let mut decoding = Decoding::start(&mut engine, spec, batch)?;
                decoding.warm_up(&mut engine, spec)?;
                // With every unit resident, the compute of the row's batch
                // is measured again on the engine's own weights, before and
                // after its timed steps (module docs).
                let mut compute = device.compute.clone();
                let run = if placement.streamed.is_empty() {
                    let work = Work::Decode { batch, context };
                    let mut sampler = Sampler::of_resident(engine.model().clone(), spec.threads)?;
                    let mut around = UnitTimes::default();
                    sampler.sample(work, SAMPLE_S, 100, &mut around)?;
                    let run = decoding.timed(&mut engine, spec)?;
                    sampler.sample(work, SAMPLE_S, 100, &mut around)?;
                    let mut fresh = measurements.clone();
                    fresh.set_samples(work, around);
                    compute = fit_measurements(&fresh, &model, Grouping::EngineUnits)?.0;
                    run
                } else {
                    decoding.timed(&mut engine, spec)?
                };
                let device = DeviceProfile {
                    compute,
                    ..device.clone()
                };
                let predict = |storage: StorageProfile, all_resident: bool| {
                    let mut problem = problem.clone();
                    problem.devices = vec![DeviceProfile {
                        storage,
                        ..device.clone()
                    }];
                    let plan = plan_of(
                        &placement,
                        n_layer,
                        &shape,
                        &device.name,
                        &workload,
                        spec.slots,
                        all_resident,
                    );
                    objective_value(&plan, &problem).map(|v| v * batch as f64)
                };
                let profiled = predict(device.storage, false)?;
                // The storage as the loader read it in the timed steps: its
                // reads, timed inside the read calls, are `t_load` itself.
                let as_read = run
                    .loader_bytes_per_s
                    .map_or(device.storage, |b| StorageProfile {
                        read_bytes_per_s: b,
                        read_latency_s: 0.0,
                    });
                let predicted = predict(as_read, false)?;
                let compute_only = predict(as_read, true)?;
                let (measured, bubble) = (run.step_s, run.bubble_s);
                Ok(ValidationRow {
                    read_bytes_per_s: device.storage.read_bytes_per_s,
                    loader_bytes_per_s: run.loader_bytes_per_s,
                    budget_percent: pct,
                    batch,
                    budget_bytes: placement.accounting.budget,
                    streamed_units: placement.streamed.len(),
                    units: placement.streamed.len() + placement.resident.len(),
                    streamed_bytes_per_step: placement.accounting.streamed_per_step,
                    predicted_step_s: predicted,
                    predicted_profiled_storage_step_s: profiled,
                    predicted_stall_s: (predicted - compute_only).max(0.0),
                    measured_step_s: measured,
                    measured_bubble_s: bubble,
                    error: (predicted - measured) / measured,
                    retried: false,
                })
            };
            let mut row = measure_row()?;
            let mut tries = 1;
            while spec.retry_failed && row.error.abs() > spec.tolerance && tries < MAX_TRIES {
                row = ValidationRow {
                    retried: true,
                    ..measure_row()?
                };
                tries += 1;
            }
            rows.push(row);
        }
    }
    Ok(ValidationReport {
        model: spec.model.clone(),
        threads: spec.threads,
        slots: spec.slots,
        context_tokens: context,
        tolerance: spec.tolerance,
        device,
        rows,
    })
}

impl std::fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.device;
        writeln!(
            f,
            "{}: {} threads, {} slots, context {}; storage {:.2} GB/s + {:.0} us per read",
            self.model.display(),
            self.threads,
            self.slots,
            self.context_tokens,
            d.storage.read_bytes_per_s / 1e9,
            d.storage.read_latency_s * 1e6
        )?;
        writeln!(
            f,
            "| budget | batch | streamed units | streamed MiB/step | storage GB/s: before, in run | predicted ms | measured ms | error | predicted stall ms | measured bubbles ms | predicted ms, storage before |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for r in &self.rows {
            writeln!(
                f,
                "| {}% | {} | {} of {} | {:.1} | {} | {:.2} | {:.2} | {:+.1}%{} | {:.2} | {:.2} | {} |",
                r.budget_percent,
                r.batch,
                r.streamed_units,
                r.units,
                r.streamed_bytes_per_step as f64 / (1u64 << 20) as f64,
                r.loader_bytes_per_s.map_or("-".to_string(), |b| format!(
                    "{:.2}, {:.2}",
                    r.read_bytes_per_s / 1e9,
                    b / 1e9
                )),
                r.predicted_step_s * 1e3,
                r.measured_step_s * 1e3,
                r.error * 100.0,
                if r.retried { " (retried)" } else { "" },
                r.predicted_stall_s * 1e3,
                r.measured_bubble_s * 1e3,
                if r.streamed_units > 0 {
                    format!(
                        "{:.2} ({:+.1}%)",
                        r.predicted_profiled_storage_step_s * 1e3,
                        (r.predicted_profiled_storage_step_s / r.measured_step_s - 1.0) * 100.0
                    )
                } else {
                    "-".to_string()
                }
            )?;
        }
        writeln!(
            f,
            "worst error {:.1}% (tolerance {:.0}%): {}",
            self.worst_error() * 100.0,
            self.tolerance * 100.0,
            if self.passes() { "agree" } else { "DISAGREE" }
        )
    }
}
