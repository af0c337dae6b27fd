//! Plan distribution (DESIGN.md §1 "Plan"): what each node reports to the
//! leader, the plan body the leader publishes with an epoch, and the pure
//! functions between them. The I/O (link probes, tensor fetch, the shard
//! file) is in [`super::fetch`] and the shell.
//!
//! # Inputs the leader gathers
//!
//! - Each node sends a [`NodeReport`] to its peers when a connection opens
//!   and every few seconds after: its device profile, its memory budget and
//!   the digest of its model file (if it has one).
//! - The device profile comes, in order, from the `device` file of the
//!   config (a device TOML, spec or profiled form, as in `assets/devices`),
//!   from this machine's stored profile for the model (`loip profile`), or
//!   from nominal figures ([`nominal_profile`]): starting never waits for a
//!   measurement, and tests pass a device file.
//! - The leader measures its link to each node over QUIC (a few pings for
//!   the RTT, a timed 256 KiB transfer for the throughput). Links between
//!   two other nodes are taken to be the slowest measured one.
//!
//! # The body
//!
//! [`PlanBody`] rides in the membership machine's plan proposal as opaque
//! bytes (postcard). It holds the scheduler's [`plan::Plan`] whose ring
//! names are node ids, and, for every node in the ring that lacks the
//! leader's model file, the tensors its windows need with their SHA-256:
//! what it must fetch and how to check it. Nodes whose model digest equals
//! the leader's read their windows from their own file.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::config::{Config as ModelConfig, Role};
use crate::model::gguf::Gguf;
use crate::net::NodeId;
use crate::plan::{
    self, DeviceProfile, Link, ModelShape, Network, Objective, Pattern, Planner, Problem, Workload,
};

/// SHA-256 digest.
pub type Digest = [u8; 32];

#[derive(Debug, Error)]
pub enum DistError {
    #[error("plan body does not decode: {0}")]
    Decode(String),
    #[error("plan body: {0}")]
    Invalid(String),
}

/// The model file a node holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// [`crate::plan::profile::model_digest`] of the file.
    pub digest: Digest,
    /// Bytes of all its tensors (for budgets given as a percentage).
    pub tensor_bytes: u64,
}

/// What a node tells the leader about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Its device, with the memory budget already applied when it could be
    /// resolved locally. On the wire as its TOML text: the profile's serde
    /// form skips empty fields, which postcard cannot decode.
    #[serde(with = "profile_toml")]
    pub device: DeviceProfile,
    /// Where the profile came from ("file …", "stored profile", "nominal").
    pub device_source: String,
    /// The memory budget as configured (`6GiB`, `50%`); a percentage of a
    /// model this node does not have is resolved by the leader.
    pub mem_budget: Option<String>,
    pub model: Option<ModelInfo>,
    /// Why the node should hold no windows for now (its ring stalled or
    /// failed to start; see `cluster::fitness`), when it should not.
    pub unfit: Option<String>,
}

mod profile_toml {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use crate::plan::DeviceProfile;

    pub fn serialize<S: Serializer>(d: &DeviceProfile, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_toml())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DeviceProfile, D::Error> {
        let text = String::deserialize(d)?;
        DeviceProfile::from_toml_str(&text, std::path::Path::new("node report"))
            .map_err(|e| D::Error::custom(e.to_string()))
    }
}

/// A tensor a node must fetch, and how to check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    /// GGML type id.
    pub ty: u32,
    pub dims: Vec<u64>,
    pub size: u64,
    pub sha256: Digest,
}

/// The tensors one node fetches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFetch {
    pub node: NodeId,
    pub tensors: Vec<TensorEntry>,
}

/// The model a plan is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub digest: Digest,
    /// SHA-256 and length of the metadata-only GGUF a serving peer sends
    /// ([`super::fetch::metadata_gguf`]).
    pub metadata_sha256: Digest,
    pub metadata_len: u64,
}

/// What a plan proposal carries besides its membership.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanBody {
    pub model: Option<ModelRef>,
    /// The scheduler's plan; `None` when there is no model to plan (no node
    /// has one, or the scheduler failed: see `note`).
    pub plan: Option<plan::Plan>,
    /// Node of each ring position of `plan`.
    pub ring: Vec<NodeId>,
    /// Nodes that lack the model and what they fetch.
    pub fetch: Vec<NodeFetch>,
    /// Nodes holding the model, which serve tensors; in the order to try.
    pub sources: Vec<NodeId>,
    /// Why there is no plan, when there is none.
    pub note: Option<String>,
    /// The members whose reports the plan was made with: a member missing
    /// here had not reported yet, and the leader plans again once it has.
    pub planned_with: Vec<NodeId>,
    /// Members that reported themselves unfit when the plan was made, and
    /// why; the leader plans again when that set changes.
    pub unfit: Vec<(NodeId, String)>,
    /// Whether the unfit members were kept all the same, because the
    /// others cannot hold the model without them.
    pub kept_unfit: bool,
}

impl PlanBody {
    /// A body with no windows.
    pub fn empty(note: impl Into<String>) -> PlanBody {
        PlanBody {
            model: None,
            plan: None,
            ring: Vec::new(),
            fetch: Vec::new(),
            sources: Vec::new(),
            note: Some(note.into()),
            planned_with: Vec::new(),
            unfit: Vec::new(),
            kept_unfit: false,
        }
    }

    /// Members the plan leaves out although they reported: the unfit ones,
    /// unless they were kept.
    pub fn left_out(&self) -> impl Iterator<Item = &(NodeId, String)> {
        self.unfit.iter().filter(|_| !self.kept_unfit)
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes and checks a body from the wire.
    pub fn decode(bytes: &[u8]) -> Result<PlanBody, DistError> {
        let b: PlanBody =
            postcard::from_bytes(bytes).map_err(|e| DistError::Decode(e.to_string()))?;
        b.check()?;
        Ok(b)
    }

    /// The ring, windows and digests are consistent: every window's device
    /// is a ring position, units are covered once each, in order.
    pub fn check(&self) -> Result<(), DistError> {
        let bad = |m: String| Err(DistError::Invalid(m));
        let Some(p) = &self.plan else {
            return Ok(());
        };
        if p.ring.len() != self.ring.len() {
            return bad(format!(
                "{} ring names for {} nodes",
                p.ring.len(),
                self.ring.len()
            ));
        }
        for (name, id) in p.ring.iter().zip(&self.ring) {
            if *name != id.to_string() {
                return bad(format!("ring name {name:?} is not node {id}"));
            }
        }
        let mut next = 0u32;
        for w in &p.windows {
            if w.device >= self.ring.len() {
                return bad(format!("window on ring position {}", w.device));
            }
            if w.units.start != next || w.units.end <= w.units.start {
                return bad(format!("window {:?} after unit {next}", w.units));
            }
            if w.streamed.len() != w.units.len() {
                return bad(format!("window {:?}: streamed flags", w.units));
            }
            next = w.units.end;
        }
        Ok(())
    }

    /// This node's ring position.
    pub fn position(&self, id: NodeId) -> Option<usize> {
        self.ring.iter().position(|&r| r == id)
    }

    /// The windows `id` runs, in execution order.
    pub fn windows_of(&self, id: NodeId) -> Vec<&plan::Window> {
        match (self.position(id), &self.plan) {
            (Some(pos), Some(p)) => p.windows.iter().filter(|w| w.device == pos).collect(),
            _ => Vec::new(),
        }
    }

    /// What `id` must fetch.
    pub fn fetch_of(&self, id: NodeId) -> Option<&NodeFetch> {
        self.fetch.iter().find(|f| f.node == id)
    }

    /// Units in the model (layers and head), when there is a plan.
    pub fn n_units(&self) -> u32 {
        self.plan
            .as_ref()
            .and_then(|p| p.windows.last())
            .map_or(0, |w| w.units.end)
    }
}

/// One window as `loip status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowStatus {
    /// Index in the plan's execution order.
    pub index: usize,
    pub units: Range<u32>,
    pub streamed: Vec<bool>,
}

/// A window as text: `0-4 (5 resident)`, `29-30 (head; 1 resident, 1 streamed)`.
pub fn window_text(w: &plan::Window, n_units: u32) -> String {
    let (a, b) = (w.units.start, w.units.end.saturating_sub(1));
    let range = if a == b {
        format!("{a}")
    } else {
        format!("{a}-{b}")
    };
    let s = w.streamed.iter().filter(|x| **x).count();
    let r = w.streamed.len() - s;
    let mut parts = Vec::new();
    if n_units > 0 && w.units.end == n_units {
        parts.push("head".to_string());
    }
    match (r, s) {
        (r, 0) => parts.push(format!("{r} resident")),
        (0, s) => parts.push(format!("{s} streamed")),
        (r, s) => parts.push(format!("{r} resident, {s} streamed")),
    }
    format!("{range} ({})", parts.join("; "))
}

/// The GGUF tensors a node running `windows` needs: every tensor of its
/// decoder layers, the output matrix for the head, the token embedding for
/// the first window of the ring (it embeds the tokens) and for a tied head,
/// the RoPE factors with any layer, and every norm vector (a few KiB each:
/// the engine loads them all, whatever it runs).
pub fn window_tensors(
    config: &ModelConfig,
    windows: &[&plan::Window],
    runs_first: bool,
) -> Vec<String> {
    let n_layer = config.n_layer as u32;
    let mut names = BTreeSet::new();
    for l in 0..config.n_layer {
        names.insert(Role::AttnNorm.name(l));
        names.insert(Role::FfnNorm.name(l));
    }
    names.insert(Role::OutputNorm.name(0));
    let mut layers = false;
    for w in windows {
        for u in w.units.clone() {
            if u < n_layer {
                layers = true;
                for r in Role::LAYER {
                    names.insert(r.name(u as usize));
                }
            } else {
                names.insert(Role::OutputNorm.name(0));
                names.insert(if config.tied_output {
                    Role::TokenEmbd.name(0)
                } else {
                    Role::Output.name(0)
                });
            }
        }
    }
    if runs_first {
        names.insert(Role::TokenEmbd.name(0));
    }
    if layers && config.has_rope_freqs {
        names.insert(Role::RopeFreqs.name(0));
    }
    names.into_iter().collect()
}

/// What the leader plans with.
pub struct PlanInputs<'a> {
    pub members: &'a [NodeId],
    pub reports: &'a BTreeMap<NodeId, NodeReport>,
    /// Measured links from the leader to each node (both directions).
    pub links: &'a BTreeMap<NodeId, Link>,
    pub leader: NodeId,
    pub objective: Objective,
}

/// The leader's model, as the scheduler and digests need it.
pub struct PlanModel<'a> {
    pub name: &'a str,
    pub gguf: &'a Gguf,
    pub config: &'a ModelConfig,
    pub shape: &'a ModelShape,
    pub info: &'a ModelInfo,
    pub metadata_sha256: Digest,
    pub metadata_len: u64,
    /// SHA-256 of a tensor's bytes (cached by the caller).
    pub tensor_sha: &'a dyn Fn(&str) -> Option<Digest>,
}

/// Link assumed where nothing was measured: 1 Gbit/s, 1 ms.
pub fn default_link() -> Link {
    Link {
        bandwidth_bps: 1e9,
        latency_s: 1e-3,
    }
}

/// Runs the scheduler over the members that reported and builds the body.
/// Never fails: a problem becomes a body without windows and a note.
///
/// Members that report themselves unfit get no windows, unless the others
/// cannot hold the model: then they are kept (a slow ring serves; none
/// does not), and the body says so.
pub fn make_plan(inputs: &PlanInputs, model: Option<&PlanModel>) -> PlanBody {
    let unfit: Vec<(NodeId, String)> = inputs
        .members
        .iter()
        .filter_map(|id| Some((*id, inputs.reports.get(id)?.unfit.clone()?)))
        .collect();
    let without = |leave_out: &[(NodeId, String)]| {
        let mut body = plan_over(inputs, model, leave_out);
        body.planned_with
            .extend(leave_out.iter().map(|(id, _)| *id));
        body.planned_with.sort();
        body.unfit = unfit.clone();
        body
    };
    if unfit.is_empty() {
        return without(&[]);
    }
    let body = without(&unfit);
    if body.plan.is_some() {
        return body;
    }
    let mut kept = without(&[]);
    kept.kept_unfit = true;
    kept
}

/// The scheduler's problem over the members with a report, less
/// `leave_out`: the nodes in device order and the problem, or the note of
/// an empty body.
fn problem_of(
    inputs: &PlanInputs,
    m: &PlanModel,
    leave_out: &[(NodeId, String)],
) -> Result<(Vec<NodeId>, Problem), String> {
    // Devices: members with a report, in id order, named by id.
    let mut nodes = Vec::new();
    let mut devices = Vec::new();
    for &id in inputs.members {
        let Some(r) = inputs.reports.get(&id) else {
            continue;
        };
        if leave_out.iter().any(|(l, _)| *l == id) {
            continue;
        }
        let mut d = r.device.clone();
        d.name = id.to_string();
        if let Some(b) = r
            .mem_budget
            .as_deref()
            .and_then(|s| crate::engine::offload::Budget::parse(s).ok())
        {
            d.memory_budget_bytes = b.bytes(m.info.tensor_bytes);
        }
        nodes.push(id);
        devices.push(d);
    }
    if devices.is_empty() {
        return Err("no member has reported its device yet".into());
    }
    let network = network(&nodes, inputs.leader, inputs.links);
    let ctx = (m.config.context_length as u32).clamp(4, 1024);
    let pattern = match inputs.objective {
        Objective::Latency => Pattern::Sporadic,
        Objective::Throughput => Pattern::Bursty(4),
    };
    let workload = Workload {
        pattern,
        prompt_tokens: ctx / 4,
        output_tokens: ctx / 4,
        context_tokens: ctx,
        prefill_chunk: 64,
    };
    let mut problem = Problem::new(devices, network, m.shape.clone(), workload);
    problem.objective = inputs.objective;
    Ok((nodes, problem))
}

/// How much better than `committed` the best plan for `inputs` is, both
/// judged under `inputs` (the links as measured now): 1 − best /
/// committed by the scheduler's objective, with the members that report
/// themselves unfit left out as `make_plan` leaves them. `None` when
/// either cannot be judged (a member left, the plan no longer fits).
pub fn plan_gain(inputs: &PlanInputs, m: &PlanModel, committed: &plan::Plan) -> Option<f64> {
    let unfit: Vec<(NodeId, String)> = inputs
        .members
        .iter()
        .filter_map(|id| Some((*id, inputs.reports.get(id)?.unfit.clone()?)))
        .collect();
    let (_, problem) = problem_of(inputs, m, &unfit).ok()?;
    let now = plan::objective_value(committed, &problem).ok()?;
    let (best, _) = plan::plan(Planner::Loip, &problem).ok()?;
    let best = plan::objective_value(&best, &problem).ok()?;
    (now > 0.0 && best.is_finite()).then(|| 1.0 - best / now)
}

fn plan_over(
    inputs: &PlanInputs,
    model: Option<&PlanModel>,
    leave_out: &[(NodeId, String)],
) -> PlanBody {
    let Some(m) = model else {
        return PlanBody::empty("the leader has no model file");
    };
    let (nodes, problem) = match problem_of(inputs, m, leave_out) {
        Ok(x) => x,
        Err(note) => return PlanBody::empty(note),
    };
    let fail = |note: String| PlanBody {
        planned_with: nodes.clone(),
        ..PlanBody::empty(note)
    };
    let p = match plan::plan(Planner::Loip, &problem) {
        Ok((p, _)) => p,
        Err(e) => return fail(format!("scheduler: {e}")),
    };
    let ring: Vec<NodeId> = p.ring.iter().filter_map(|name| name.parse().ok()).collect();
    let sources: Vec<NodeId> = nodes
        .iter()
        .copied()
        .filter(|id| {
            inputs.reports.get(id).and_then(|r| r.model.as_ref()) == Some(m.info)
                || *id == inputs.leader
        })
        .collect();
    let mut body = PlanBody {
        model: Some(ModelRef {
            name: m.name.to_string(),
            digest: m.info.digest,
            metadata_sha256: m.metadata_sha256,
            metadata_len: m.metadata_len,
        }),
        plan: Some(p),
        ring,
        fetch: Vec::new(),
        sources,
        note: None,
        planned_with: nodes.clone(),
        unfit: Vec::new(),
        kept_unfit: false,
    };
    let first = body
        .plan
        .as_ref()
        .and_then(|p| p.windows.first())
        .map(|w| w.device);
    for (pos, &id) in body.ring.iter().enumerate() {
        if body.sources.contains(&id) {
            continue;
        }
        let windows = body.windows_of(id);
        let names = window_tensors(m.config, &windows, first == Some(pos));
        let mut tensors = Vec::new();
        for name in names {
            let (Some(t), Some(sha)) = (m.gguf.tensor(&name), (m.tensor_sha)(&name)) else {
                return fail(format!("the leader's model has no tensor {name}"));
            };
            tensors.push(TensorEntry {
                name,
                ty: t.ty.id(),
                dims: t.dims.clone(),
                size: t.size,
                sha256: sha,
            });
        }
        body.fetch.push(NodeFetch { node: id, tensors });
    }
    if let Err(e) = body.check() {
        return fail(format!("scheduler output: {e}"));
    }
    body
}

/// The network between `nodes`: measured links from and to the leader;
/// between two other nodes, the worse of their links to the leader (on a
/// switched LAN a path is as slow as its slower end), or the slowest
/// measured link where one end was not measured.
fn network(nodes: &[NodeId], leader: NodeId, links: &BTreeMap<NodeId, Link>) -> Network {
    let worse = |a: Link, b: Link| Link {
        bandwidth_bps: a.bandwidth_bps.min(b.bandwidth_bps),
        latency_s: a.latency_s.max(b.latency_s),
    };
    let measured: Vec<Link> = nodes.iter().filter_map(|n| links.get(n)).copied().collect();
    let slowest = measured
        .iter()
        .copied()
        .reduce(worse)
        .unwrap_or_else(default_link);
    let mut net = Network::uniform(slowest);
    let of = |n: &NodeId| (*n != leader).then(|| links.get(n).copied()).flatten();
    for (i, a) in nodes.iter().enumerate() {
        for (j, b) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let link = match (a == &leader, b == &leader) {
                (true, _) => of(b),
                (_, true) => of(a),
                _ => of(a).zip(of(b)).map(|(x, y)| worse(x, y)),
            };
            if let Some(link) = link {
                net = net.with_link(i, j, link);
            }
        }
    }
    net
}

/// A device profile from nominal figures, for a node that has no device
/// file and no stored profile: a modest CPU (0.05 TFLOP/s, 10 GB/s of
/// memory, 0.5 GB/s of storage). `loip profile` replaces it with a
/// measured one.
pub fn nominal_profile(name: &str, memory_budget_bytes: u64) -> DeviceProfile {
    let spec = plan::DeviceSpec {
        name: name.to_string(),
        memory_bytes: memory_budget_bytes,
        os_reserve_bytes: 0,
        memory_bandwidth_bytes_per_s: 10e9,
        memory_efficiency: 0.8,
        flops: [("default".to_string(), 0.05e12)].into_iter().collect(),
        compute_efficiency: 0.6,
        storage: plan::StorageProfile {
            read_bytes_per_s: 0.5e9,
            read_latency_s: 100e-6,
        },
        layer_overhead_s: 20e-6,
    };
    spec.to_profile()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Loading, Window};

    fn body(windows: Vec<(usize, Range<u32>)>) -> PlanBody {
        let ring = vec![NodeId(1), NodeId(2)];
        PlanBody {
            model: None,
            plan: Some(plan::Plan {
                epoch: 0,
                planner: Planner::Loip,
                ring: ring.iter().map(|i| i.to_string()).collect(),
                windows: windows
                    .into_iter()
                    .map(|(device, units)| Window {
                        device,
                        streamed: vec![false; units.len()],
                        units,
                    })
                    .collect(),
                kv_budget_bytes: vec![0, 0],
                slots: 2,
                loading: Loading::Prefetch,
                micro_batches: 1,
                batch: 1,
                context_tokens: 64,
            }),
            ring,
            fetch: Vec::new(),
            sources: Vec::new(),
            note: None,
            planned_with: Vec::new(),
            unfit: vec![(NodeId(3), "its ring stalled".into())],
            kept_unfit: false,
        }
    }

    #[test]
    fn a_body_round_trips_and_bad_ones_are_refused() {
        let b = body(vec![(0, 0..2), (1, 2..3)]);
        assert_eq!(PlanBody::decode(&b.encode()).unwrap(), b);
        assert_eq!(b.windows_of(NodeId(2)).len(), 1);
        assert_eq!(b.n_units(), 3);
        for bad in [
            body(vec![(0, 0..2), (1, 3..4)]),
            body(vec![(0, 0..2), (2, 2..3)]),
            body(vec![(0, 0..0)]),
        ] {
            assert!(PlanBody::decode(&bad.encode()).is_err());
        }
        let mut wrong_name = b.clone();
        wrong_name.ring[0] = NodeId(7);
        assert!(wrong_name.check().is_err());
        assert!(PlanBody::decode(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn a_report_round_trips_through_postcard() {
        let r = NodeReport {
            device: nominal_profile("0000000000000001", 1 << 30),
            device_source: "nominal".into(),
            mem_budget: Some("40%".into()),
            model: Some(ModelInfo {
                digest: [7; 32],
                tensor_bytes: 99,
            }),
            unfit: Some("its ring stalled".into()),
        };
        let bytes = postcard::to_stdvec(&r).unwrap();
        let back: NodeReport = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.device.name, r.device.name);
        assert_eq!(back.device.memory_budget_bytes, 1 << 30);
        assert_eq!(back.model, r.model);
        assert_eq!(back.mem_budget, r.mem_budget);
        assert_eq!(back.unfit, r.unfit);
    }

    #[test]
    fn window_text_names_the_head_and_the_streamed_units() {
        let w = Window {
            device: 0,
            units: 1..3,
            streamed: vec![false, true],
        };
        assert_eq!(window_text(&w, 3), "1-2 (head; 1 resident, 1 streamed)");
        assert_eq!(window_text(&w, 9), "1-2 (1 resident, 1 streamed)");
    }
}
