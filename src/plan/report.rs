//! What `loip plan` prints: the library side of the command.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::placement::{MemoryUse, Plan};
use super::search::SearchInfo;
use super::sim::Prediction;
use super::{
    plan_with_info, simulate, DeviceProfile, Link, ModelShape, Network, Objective, PlanError,
    Planner, Problem, Workload,
};

/// The arguments of `loip plan`, parsed.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    /// From `--model-spec` ([`ModelShape::preset`]) or a GGUF file.
    pub model: ModelShape,
    /// The devices (`--devices a.toml,self,b.toml`), in ring order for the
    /// baselines.
    pub devices: Vec<DeviceSource>,
    /// Every pair of devices is joined by this link (`--link 1gbit,2ms`).
    pub link: Link,
    /// `--pattern` and the prompt, output and context lengths.
    pub workload: Workload,
    /// `None`: latency for sporadic, throughput for bursty.
    pub objective: Option<Objective>,
    pub planner: Planner,
}

/// Where a device's profile comes from.
#[derive(Clone, Debug)]
pub enum DeviceSource {
    /// A device TOML file, spec or profiled form.
    File(PathBuf),
    /// A profile at hand: this machine's stored one (`self`).
    Profile(DeviceProfile),
}

impl From<PathBuf> for DeviceSource {
    fn from(p: PathBuf) -> DeviceSource {
        DeviceSource::File(p)
    }
}

impl DeviceSource {
    fn load(&self) -> Result<DeviceProfile, PlanError> {
        match self {
            DeviceSource::File(p) => DeviceProfile::from_toml_file(p),
            DeviceSource::Profile(d) => Ok(d.clone()),
        }
    }
}

/// One device's line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    pub name: String,
    /// Unit ranges of its windows, in execution order ("0-9", "80 (head)").
    pub windows: Vec<String>,
    pub resident_units: usize,
    pub streamed_units: usize,
    pub memory: MemoryUse,
    pub budget_bytes: u64,
}

/// A plan, how it was found, and what the simulator predicts for it.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub link: Link,
    pub workload: Workload,
    pub objective: Objective,
    pub search: SearchInfo,
    pub plan: Plan,
    pub devices: Vec<DeviceReport>,
    /// Devices given that the plan leaves out.
    pub unused_devices: Vec<String>,
    pub prediction: Prediction,
}

/// Reads the device files, plans and simulates: everything `loip plan`
/// does except parsing its arguments and printing (`Display` for people,
/// `serde_json` for `--json`).
pub fn plan_report(req: &PlanRequest) -> Result<Report, PlanError> {
    let devices = req
        .devices
        .iter()
        .map(DeviceSource::load)
        .collect::<Result<Vec<_>, _>>()?;
    let mut problem = Problem::new(
        devices,
        Network::uniform(req.link),
        req.model.clone(),
        req.workload,
    );
    if let Some(o) = req.objective {
        problem.objective = o;
    }
    let (plan, search) = plan_with_info(req.planner, &problem)?;
    let prediction = simulate(&plan, &problem)?;
    let n_layers = problem.model.layers.len() as u32;
    let devices = plan
        .ring
        .iter()
        .enumerate()
        .map(|(pos, name)| {
            let mine: Vec<_> = plan.windows.iter().filter(|w| w.device == pos).collect();
            let usage = &prediction.devices[pos];
            DeviceReport {
                name: name.clone(),
                windows: mine
                    .iter()
                    .map(|w| {
                        let (a, b) = (w.units.start, w.units.end - 1);
                        let head = if b == n_layers { " (head)" } else { "" };
                        if a == b {
                            format!("{a}{head}")
                        } else {
                            format!("{a}-{b}{head}")
                        }
                    })
                    .collect(),
                resident_units: mine
                    .iter()
                    .map(|w| w.streamed.iter().filter(|s| !**s).count())
                    .sum(),
                streamed_units: mine
                    .iter()
                    .map(|w| w.streamed.iter().filter(|s| **s).count())
                    .sum(),
                memory: usage.memory,
                budget_bytes: usage.budget_bytes,
            }
        })
        .collect();
    let unused_devices = problem
        .devices
        .iter()
        .filter(|d| !plan.ring.contains(&d.name))
        .map(|d| d.name.clone())
        .collect();
    Ok(Report {
        model: problem.model.name.clone(),
        link: req.link,
        workload: req.workload,
        objective: problem.objective,
        search,
        plan,
        devices,
        unused_devices,
        prediction,
    })
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.plan;
        let w = &self.workload;
        writeln!(
            f,
            "{} plan for {}: {} devices, link {}, {} (prompt {}, output {}, context {}), {:?} objective",
            p.planner,
            self.model,
            p.ring.len(),
            self.link,
            w.pattern,
            w.prompt_tokens,
            w.output_tokens,
            w.context_tokens,
            self.objective
        )?;
        writeln!(
            f,
            "ring: {}; {} windows in {} rounds; {} slot(s) per device, {:?}; {} micro-batch(es); {} ({} plans simulated)",
            p.ring.join(" -> "),
            p.windows.len(),
            p.rounds(),
            p.slots,
            p.loading,
            p.micro_batches,
            if self.search.exhaustive {
                "exhaustive search: optimal"
            } else {
                "heuristic search"
            },
            self.search.evaluations
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<16} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  windows (units)",
            "device",
            "resident",
            "streamed",
            "weights",
            "slots",
            "kv",
            "scratch",
            "total",
            "budget"
        )?;
        for d in &self.devices {
            let m = &d.memory;
            writeln!(
                f,
                "{:<16} {:>8} {:>8} {:>8.2}G {:>8.2}G {:>8.2}G {:>8.2}G {:>8.2}G {:>8.2}G  {}",
                d.name,
                d.resident_units,
                d.streamed_units,
                gib(m.resident_bytes),
                gib(m.slot_bytes),
                gib(m.kv_bytes),
                gib(m.scratch_bytes),
                gib(m.total()),
                gib(d.budget_bytes),
                d.windows.join(", ")
            )?;
        }
        if !self.unused_devices.is_empty() {
            writeln!(
                f,
                "not used (they would slow the cluster down): {}",
                self.unused_devices.join(", ")
            )?;
        }
        let pr = &self.prediction;
        writeln!(f)?;
        writeln!(
            f,
            "predicted: TTFT {:.3} s, TPOT {:.3} s, throughput {:.3} tok/s (decode {:.3} tok/s), makespan {:.1} s",
            pr.ttft_s, pr.tpot_s, pr.throughput_tok_s, pr.decode_tok_s, pr.makespan_s
        )?;
        writeln!(
            f,
            "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "device", "busy s", "stall s", "idle s", "loader s", "peak GiB"
        )?;
        for d in &pr.devices {
            let peak = d.timeline.iter().map(|s| s.bytes).max().unwrap_or(0);
            writeln!(
                f,
                "{:<16} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                d.name,
                d.busy_s,
                d.stall_s,
                d.idle_s,
                d.loader_busy_s,
                gib(peak)
            )?;
        }
        Ok(())
    }
}
