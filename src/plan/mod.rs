//! The leader's brain: device and link descriptions, the cost model, an
//! event simulator that plays out a plan, and the allocation scheduler with
//! its two baselines (DESIGN.md §6).
//!
//! Entry points: [`plan`] makes a [`Plan`] and its [`Prediction`];
//! [`simulate`] predicts any plan; [`plan_report`] is what `loip plan`
//! prints.
//!
//! # Execution model (what the simulator plays)
//!
//! The model is a sequence of *units* ([`ModelShape`]): the decoder layers,
//! then the output head. A plan cuts them into windows run in order, each
//! on one device; activations (`hidden` f32 per token) cross a link between
//! consecutive windows, and the sampled token goes back from the last
//! window to the first. Work travels in *micro-batches*: a prefill chunk, or
//! a group of decoding sequences. A *step* moves every micro-batch through
//! every window once (one token per sequence; the prompt for prefill).
//!
//! Each device has a compute resource and a loader. The loader reads the
//! device's streamed units one at a time, in the order the device runs
//! them, into `K` rotating slots, each the size of the device's largest
//! streamed unit; a slot is freed when the last micro-batch of the step has
//! run its unit. With [`Loading::Prefetch`] a read starts as soon as the
//! loader and a slot are free (the first `K` reads are done while the
//! cluster is idle); with [`Loading::OnDemand`] it also waits until the
//! device is ready to run the unit. The compute resource runs its work in
//! a fixed order: step by step, window by window; within a window that
//! streams at most `K` units, micro-batch by micro-batch (each runs all the
//! window's units, so the first can leave early), otherwise unit by unit
//! (each unit for every micro-batch, so that its slot can be freed), once
//! all of the step's micro-batches are there (the ring runs them as one
//! batch then: it cannot hold all of the window's units at once). A unit
//! starts when its input is there, the device is free and, if streamed, its
//! slot is loaded; the wait for the slot is a *loading bubble* (stall).
//! Each directed link sends one message at a time (`bytes·8/bandwidth`)
//! and delivers it `latency` later.
//!
//! Because every resource serves its work in a fixed order, each start
//! time is the maximum of finish times that come earlier in that order:
//! the simulator is one forward pass, and shorter durations never make
//! anything later (the scheduler relies on this).
//!
//! Memory of a device: resident weights + `K`·largest streamed unit +
//! KV cache for the target batch and context of its layers + scratch; it
//! must stay within the budget.

mod baseline;
mod cost;
mod device;
mod error;
mod fit;
mod link;
mod model;
mod placement;
pub mod profile;
mod report;
mod search;
mod sim;
pub mod validate;

use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use device::{ComputeModel, DeviceProfile, DeviceSpec, StorageProfile, WeightRate};
pub use error::PlanError;
pub use fit::{fit_compute, fit_storage, MatmulSample, ReadSample, UnitSample};
pub use link::{Link, Network};
pub use model::{ModelDescription, ModelShape, UnitShape, WeightBytes};
pub use placement::{Loading, MemoryUse, Plan, Window};
pub use report::{plan_report, DeviceReport, DeviceSource, PlanRequest, Report};
pub use search::SearchInfo;
pub use sim::{DeviceUsage, MemorySample, Prediction};

/// How requests arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pattern {
    /// One request at a time.
    Sporadic,
    /// `n` requests arrive together.
    Bursty(u32),
}

impl Pattern {
    /// Sequences decoded together.
    pub fn batch(self) -> u32 {
        match self {
            Pattern::Sporadic => 1,
            Pattern::Bursty(n) => n,
        }
    }
}

impl FromStr for Pattern {
    type Err = PlanError;

    /// `sporadic` or `bursty:N` (N ≥ 1).
    fn from_str(s: &str) -> Result<Pattern, PlanError> {
        let bad = |problem: &str| PlanError::Parse {
            what: "pattern",
            input: s.to_string(),
            problem: format!("{problem} (expected sporadic or bursty:N)"),
        };
        if s == "sporadic" {
            return Ok(Pattern::Sporadic);
        }
        let n = s
            .strip_prefix("bursty:")
            .ok_or_else(|| bad("unknown pattern"))?;
        match n.parse::<u32>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(Pattern::Bursty(n)),
            _ => Err(bad("N must be an integer from 1 to 1024")),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Sporadic => f.write_str("sporadic"),
            Pattern::Bursty(n) => write!(f, "bursty:{n}"),
        }
    }
}

/// What the scheduler minimizes; both are steady-state decode figures of
/// the simulator at the target context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Objective {
    /// Time per output token of one request alone.
    Latency,
    /// Seconds per generated token with the whole target batch decoding
    /// (the inverse of throughput).
    Throughput,
}

impl Objective {
    /// Latency for sporadic load, throughput for bursty load.
    pub fn for_pattern(p: Pattern) -> Objective {
        match p {
            Pattern::Sporadic => Objective::Latency,
            Pattern::Bursty(_) => Objective::Throughput,
        }
    }
}

/// Which planner makes the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Planner {
    /// The allocation scheduler of this module.
    Loip,
    /// Equal windows in k rounds with prefetch (prima.cpp's piped ring).
    Ring,
    /// One window per device, proportional to memory, loads on demand.
    Contiguous,
}

impl FromStr for Planner {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Planner, PlanError> {
        match s {
            "loip" => Ok(Planner::Loip),
            "ring" => Ok(Planner::Ring),
            "contiguous" => Ok(Planner::Contiguous),
            _ => Err(PlanError::Parse {
                what: "planner",
                input: s.to_string(),
                problem: "expected loip, ring or contiguous".into(),
            }),
        }
    }
}

impl std::fmt::Display for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Planner::Loip => "loip",
            Planner::Ring => "ring",
            Planner::Contiguous => "contiguous",
        })
    }
}

/// The requests a plan is made for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub pattern: Pattern,
    /// Prompt length of each request (for TTFT).
    pub prompt_tokens: u32,
    /// Tokens generated per request (at least 2).
    pub output_tokens: u32,
    /// Context each sequence may reach: the KV cache is budgeted for
    /// `batch × context_tokens`, and the objective is measured there.
    pub context_tokens: u32,
    /// Prefill chunk size in tokens.
    pub prefill_chunk: u32,
}

impl Workload {
    /// Prompts of 128 tokens, 128 output tokens, 1024 tokens of context,
    /// prefill chunks of 64.
    pub fn new(pattern: Pattern) -> Workload {
        Workload {
            pattern,
            prompt_tokens: 128,
            output_tokens: 128,
            context_tokens: 1024,
            prefill_chunk: 64,
        }
    }

    pub fn batch(&self) -> u32 {
        self.pattern.batch()
    }

    fn validate(&self) -> Result<(), PlanError> {
        let bad = |s: String| Err(PlanError::Workload(s));
        if self.batch() == 0 {
            return bad("the batch must be at least 1".into());
        }
        if self.prompt_tokens == 0 || self.prefill_chunk == 0 {
            return bad("prompt and prefill chunk must be at least 1 token".into());
        }
        if self.output_tokens < 2 {
            return bad("at least 2 output tokens are needed to measure TPOT".into());
        }
        if self.prompt_tokens as u64 + self.output_tokens as u64 > self.context_tokens as u64 {
            return bad(format!(
                "prompt {} + output {} exceed the context of {} tokens",
                self.prompt_tokens, self.output_tokens, self.context_tokens
            ));
        }
        Ok(())
    }
}

/// Everything the planner and the simulator need.
#[derive(Clone, Debug)]
pub struct Problem {
    pub devices: Vec<DeviceProfile>,
    pub network: Network,
    pub model: ModelShape,
    pub workload: Workload,
    pub objective: Objective,
}

impl Problem {
    /// A problem whose objective follows the pattern.
    pub fn new(
        devices: Vec<DeviceProfile>,
        network: Network,
        model: ModelShape,
        workload: Workload,
    ) -> Problem {
        Problem {
            objective: Objective::for_pattern(workload.pattern),
            devices,
            network,
            model,
            workload,
        }
    }
}

/// Makes a plan with `planner` and predicts it with the full simulation.
pub fn plan(planner: Planner, problem: &Problem) -> Result<(Plan, Prediction), PlanError> {
    let (plan, _) = plan_with_info(planner, problem)?;
    let prediction = simulate(&plan, problem)?;
    Ok((plan, prediction))
}

/// As [`plan`], without the full simulation, and with how the search went.
pub fn plan_with_info(
    planner: Planner,
    problem: &Problem,
) -> Result<(Plan, SearchInfo), PlanError> {
    let costs = cost::Costs::new(problem)?;
    let (layout, info) = match planner {
        Planner::Loip => search::loip(&costs)?,
        Planner::Ring => baseline::ring(&costs)?,
        Planner::Contiguous => baseline::contiguous(&costs)?,
    };
    Ok((placement::to_plan(&costs, &layout, planner), info))
}

/// Plays `plan` for the problem's workload: prefill of every request, then
/// decoding until each has its output tokens.
pub fn simulate(plan: &Plan, problem: &Problem) -> Result<Prediction, PlanError> {
    let costs = cost::Costs::new(problem)?;
    let layout = placement::from_plan(&costs, plan)?;
    costs.check_memory(&layout)?;
    Ok(sim::predict(&costs, &layout))
}

/// The value the scheduler minimizes for `plan` (seconds per token; see
/// [`Objective`]); an error when the plan is malformed or over budget.
pub fn objective_value(plan: &Plan, problem: &Problem) -> Result<f64, PlanError> {
    let costs = cost::Costs::new(problem)?;
    let layout = placement::from_plan(&costs, plan)?;
    costs.check_memory(&layout)?;
    Ok(sim::objective(&costs, &layout))
}

/// Memory of each ring device of `plan`, in ring order.
pub fn memory_use(plan: &Plan, problem: &Problem) -> Result<Vec<MemoryUse>, PlanError> {
    let costs = cost::Costs::new(problem)?;
    let layout = placement::from_plan(&costs, plan)?;
    Ok((0..layout.ring.len())
        .map(|p| costs.memory(&layout, p))
        .collect())
}

/// The heuristic search alone, without the exhaustive path that small
/// problems take: for measuring its quality against brute force.
#[doc(hidden)]
pub fn plan_heuristic(problem: &Problem) -> Result<Plan, PlanError> {
    let costs = cost::Costs::new(problem)?;
    let (layout, _) = search::heuristic(&costs)?;
    Ok(placement::to_plan(&costs, &layout, Planner::Loip))
}
