//! The event simulator: plays a layout as the execution model of the
//! module docs describes, in one forward pass over (step, window,
//! micro-batch).

use serde::{Deserialize, Serialize};

use super::cost::Costs;
use super::placement::{Layout, Loading, MemoryUse};
use super::Objective;

/// Decode steps of the steady-state probe, and how many of the last ones
/// are measured (the others warm the loaders' slots up).
const PROBE_STEPS: usize = 6;
const PROBE_MEASURED: usize = 3;

/// What a micro-batch waits for before it enters the first window.
enum Dep {
    /// Nothing: it is there at time 0.
    Start,
    /// Micro-batch `i` of the previous step (the same sequences).
    Same(usize),
    /// All of these micro-batches of the previous step (prefill chunks).
    All(Vec<usize>),
}

/// A micro-batch in one step.
struct Mb {
    tokens: u32,
    /// (query, key) pairs attended in each layer.
    attended: u64,
    dep: Dep,
}

/// Per-device figures collected by a recorded run.
struct Record {
    busy: Vec<f64>,
    stall: Vec<f64>,
    loader_busy: Vec<f64>,
    /// Per step, per ring position: when the device finished its last
    /// item of the step.
    step_end: Vec<Vec<f64>>,
}

/// One device's share of a prediction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceUsage {
    pub name: String,
    /// Seconds computing.
    pub busy_s: f64,
    /// Seconds waiting for a slot load with input ready (loading bubbles).
    pub stall_s: f64,
    /// The rest of the run.
    pub idle_s: f64,
    /// Seconds its loader spent reading from storage.
    pub loader_busy_s: f64,
    /// Memory planned for the target batch and context.
    pub memory: MemoryUse,
    pub budget_bytes: u64,
    /// Memory actually in use as the KV cache fills, after each step.
    pub timeline: Vec<MemorySample>,
}

/// Memory in use at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    pub t_s: f64,
    pub bytes: u64,
}

/// What the simulator predicts for a plan and a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Time to first token, mean over requests.
    pub ttft_s: f64,
    /// Time per output token after the first, mean over requests.
    pub tpot_s: f64,
    /// Output tokens per second over the whole run, prefill included.
    pub throughput_tok_s: f64,
    /// Tokens per second while decoding (after the last first token).
    pub decode_tok_s: f64,
    /// From arrival to the last token.
    pub makespan_s: f64,
    /// The scheduler's objective (seconds per token, steady state).
    pub objective_s: f64,
    /// Per ring device, in ring order.
    pub devices: Vec<DeviceUsage>,
}

/// A run of units of one window that shares a fate: consecutive resident
/// units, or one streamed unit.
struct Segment {
    units: std::ops::Range<usize>,
    /// Load seconds, for a streamed unit.
    load: Option<f64>,
}

/// Per-window figures of a run.
struct Win {
    pos: usize,
    dev: usize,
    segments: Vec<Segment>,
    /// Micro-batch by micro-batch (true) or unit by unit.
    mb_major: bool,
}

/// Loader state of one device.
struct Loader {
    free: f64,
    /// Reads issued so far.
    issued: usize,
    /// Per slot: when the unit last read into it was finished.
    slot_free: Vec<f64>,
}

impl Loader {
    /// Issues the next read, of `dur` seconds, for a unit the device could
    /// first run at `ready`; returns when it is loaded, its slot, and
    /// whether the loader spent time on it now (not while idle before).
    fn read(&mut self, loading: Loading, dur: f64, ready: f64) -> (f64, usize, bool) {
        let k = self.slot_free.len();
        let i = self.issued;
        self.issued += 1;
        let slot = i % k;
        if loading == Loading::Prefetch && i < k {
            // Read while the cluster was idle.
            return (0.0, slot, false);
        }
        let mut start = self.free.max(self.slot_free[slot]);
        if loading == Loading::OnDemand {
            start = start.max(ready);
        }
        self.free = start + dur;
        (self.free, slot, true)
    }
}

/// Plays `steps`; returns, per step and micro-batch, when it left the last
/// window.
fn run(
    costs: &Costs,
    layout: &Layout,
    steps: &[Vec<Mb>],
    mut rec: Option<&mut Record>,
) -> Vec<Vec<f64>> {
    let r = layout.ring.len();
    let nw = layout.n_windows();
    let k = layout.slots as usize;
    let hidden = costs.problem().model.hidden as u64;
    let wins: Vec<Win> = (0..nw)
        .map(|w| {
            let pos = layout.win_pos[w];
            let dev = layout.ring[pos];
            let mut segments: Vec<Segment> = Vec::new();
            for u in layout.units(w) {
                if layout.streamed[u] {
                    segments.push(Segment {
                        units: u..u + 1,
                        load: Some(costs.load(dev, costs.unit_bytes(u), 1)),
                    });
                } else {
                    match segments.last_mut() {
                        Some(s) if s.load.is_none() => s.units.end = u + 1,
                        _ => segments.push(Segment {
                            units: u..u + 1,
                            load: None,
                        }),
                    }
                }
            }
            let streamed = segments.iter().filter(|s| s.load.is_some()).count();
            Win {
                pos,
                dev,
                segments,
                mb_major: streamed <= k,
            }
        })
        .collect();
    // Directed links by ring positions: (busy seconds per byte, latency).
    let links: Vec<(f64, f64)> = (0..r * r)
        .map(|i| {
            let l = costs.link(layout.ring[i / r], layout.ring[i % r]);
            (8.0 / l.bandwidth_bps, l.latency_s)
        })
        .collect();
    let mut link_free = vec![0.0f64; r * r];
    let mut send = |from: usize, to: usize, bytes: u64, t: f64| -> f64 {
        if from == to {
            return t;
        }
        let i = from * r + to;
        let depart = t.max(link_free[i]);
        link_free[i] = depart + bytes as f64 * links[i].0;
        link_free[i] + links[i].1
    };
    let mut dev_free = vec![0.0f64; r];
    let mut loaders: Vec<Loader> = (0..r)
        .map(|_| Loader {
            free: 0.0,
            issued: 0,
            slot_free: vec![0.0; k],
        })
        .collect();
    let (head, tail) = (wins[0].pos, wins[nw - 1].pos);
    let mut out: Vec<Vec<f64>> = Vec::with_capacity(steps.len());
    // Per segment of the current window: (loaded at, slot).
    let mut seg_load: Vec<(f64, usize)> = Vec::new();
    for mbs in steps {
        let mut cur: Vec<f64> = Vec::with_capacity(mbs.len());
        for mb in mbs {
            let after = match &mb.dep {
                Dep::Start => {
                    cur.push(0.0);
                    continue;
                }
                Dep::Same(i) => out.last().map_or(0.0, |p| p[*i]),
                Dep::All(v) => v
                    .iter()
                    .map(|&i| out.last().map_or(0.0, |p| p[i]))
                    .fold(0.0, f64::max),
            };
            // The sampled tokens (4 bytes each) go back to the head.
            cur.push(send(tail, head, 4 * mb.tokens as u64, after));
        }
        for (w, win) in wins.iter().enumerate() {
            let pos = win.pos;
            seg_load.clear();
            seg_load.resize(win.segments.len(), (0.0, usize::MAX));
            let last_mb = mbs.len() - 1;
            // Runs segment `j` for micro-batch `i`.
            let mut step = |i: usize,
                            j: usize,
                            dev_free: &mut f64,
                            rec: &mut Option<&mut Record>,
                            cur: &mut Vec<f64>| {
                let seg = &win.segments[j];
                let ready = cur[i].max(*dev_free);
                if i == 0 {
                    if let Some(dur) = seg.load {
                        let (at, slot, now) = loaders[pos].read(layout.loading, dur, ready);
                        seg_load[j] = (at, slot);
                        if let Some(rec) = rec.as_deref_mut().filter(|_| now) {
                            rec.loader_busy[pos] += dur;
                        }
                    }
                }
                let start = ready.max(seg_load[j].0);
                let mb = &mbs[i];
                let mut dur = costs.compute(win.dev, seg.units.clone(), mb.tokens, mb.attended);
                if w == 0 && j == 0 {
                    dur += costs.embed(win.dev, mb.tokens);
                }
                let end = start + dur;
                *dev_free = end;
                cur[i] = end;
                if let Some(rec) = rec.as_deref_mut() {
                    rec.busy[pos] += dur;
                    rec.stall[pos] += start - ready;
                }
                if i == last_mb && seg.load.is_some() {
                    let slot = seg_load[j].1;
                    loaders[pos].slot_free[slot] = end;
                }
            };
            let nseg = win.segments.len();
            if win.mb_major {
                for i in 0..mbs.len() {
                    for j in 0..nseg {
                        step(i, j, &mut dev_free[pos], &mut rec, &mut cur);
                    }
                }
            } else {
                // The ring runs them together once all are there.
                let all = cur.iter().copied().fold(0.0, f64::max);
                cur.iter_mut().for_each(|c| *c = all);
                for j in 0..nseg {
                    for i in 0..mbs.len() {
                        step(i, j, &mut dev_free[pos], &mut rec, &mut cur);
                    }
                }
            }
            if w + 1 < nw {
                let next = wins[w + 1].pos;
                for (i, mb) in mbs.iter().enumerate() {
                    cur[i] = send(pos, next, mb.tokens as u64 * hidden * 4, cur[i]);
                }
            }
        }
        if let Some(rec) = rec.as_deref_mut() {
            rec.step_end.push(dev_free.clone());
        }
        out.push(cur);
    }
    out
}

/// Sizes of `m` micro-batches sharing `n` sequences (differ by at most 1).
fn split(n: u32, m: u32) -> impl Iterator<Item = u32> {
    (0..m).map(move |i| n / m + u32::from(i < n % m))
}

/// Steady-state seconds per decode step with micro-batches of `sizes`
/// sequences at the target context.
fn probe_period(costs: &Costs, layout: &Layout, sizes: &[u32]) -> f64 {
    let ctx = costs.problem().workload.context_tokens as u64;
    let steps: Vec<Vec<Mb>> = (0..PROBE_STEPS)
        .map(|s| {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &b)| Mb {
                    tokens: b,
                    attended: b as u64 * ctx,
                    dep: if s == 0 { Dep::Start } else { Dep::Same(i) },
                })
                .collect()
        })
        .collect();
    let ends = run(costs, layout, &steps, None);
    let last = |s: usize| ends[s].iter().copied().fold(0.0, f64::max);
    (last(PROBE_STEPS - 1) - last(PROBE_STEPS - 1 - PROBE_MEASURED)) / PROBE_MEASURED as f64
}

/// Seconds per token under `layout`'s micro-batching for the whole batch.
pub(crate) fn throughput_objective(costs: &Costs, layout: &Layout) -> f64 {
    let n = costs.problem().workload.batch();
    let sizes: Vec<u32> = split(n, layout.micro_batches).collect();
    probe_period(costs, layout, &sizes) / n as f64
}

/// The objective the scheduler minimizes (see [`Objective`]).
pub(crate) fn objective(costs: &Costs, layout: &Layout) -> f64 {
    match costs.problem().objective {
        Objective::Latency => probe_period(costs, layout, &[1]),
        Objective::Throughput => throughput_objective(costs, layout),
    }
}

/// Lower bound on the latency objective: one token's trip through every
/// window and link, with no waiting.
pub(crate) fn chain_bound(costs: &Costs, layout: &Layout) -> f64 {
    let ctx = costs.problem().workload.context_tokens as u64;
    let hidden = costs.problem().model.hidden as u64;
    let nw = layout.n_windows();
    let mut t = costs.embed(layout.ring[layout.win_pos[0]], 1);
    for w in 0..nw {
        let dev = layout.ring[layout.win_pos[w]];
        t += costs.compute(dev, layout.units(w), 1, ctx);
        let next = layout.ring[layout.win_pos[(w + 1) % nw]];
        if next != dev {
            let l = costs.link(dev, next);
            let bytes = if w + 1 < nw { hidden * 4 } else { 4 };
            t += l.busy_seconds(bytes) + l.latency_s;
        }
    }
    t
}

/// The full simulation of the problem's workload under `layout`.
pub(crate) fn predict(costs: &Costs, layout: &Layout) -> Prediction {
    let p = costs.problem();
    let w = &p.workload;
    let n = w.batch();
    let (prompt, chunk) = (w.prompt_tokens, w.prefill_chunk);
    let chunks = prompt.div_ceil(chunk) as usize;
    // Step 0: every prompt, in chunks, request after request.
    let mut steps: Vec<Vec<Mb>> = vec![(0..n as usize * chunks)
        .map(|i| {
            let off = (i % chunks) as u64 * chunk as u64;
            let len = (prompt as u64 - off).min(chunk as u64);
            Mb {
                tokens: len as u32,
                attended: len * off + len * (len + 1) / 2,
                dep: Dep::Start,
            }
        })
        .collect()];
    let sizes: Vec<u32> = split(n, layout.micro_batches).collect();
    for s in 1..w.output_tokens as usize {
        let mut first = 0usize;
        let mut mbs = Vec::with_capacity(sizes.len());
        for (g, &b) in sizes.iter().enumerate() {
            let dep = if s == 1 {
                Dep::All(
                    (first..first + b as usize)
                        .map(|q| (q + 1) * chunks - 1)
                        .collect(),
                )
            } else {
                Dep::Same(g)
            };
            mbs.push(Mb {
                tokens: b,
                attended: b as u64 * (prompt as u64 + s as u64),
                dep,
            });
            first += b as usize;
        }
        steps.push(mbs);
    }
    let r = layout.ring.len();
    let mut rec = Record {
        busy: vec![0.0; r],
        stall: vec![0.0; r],
        loader_busy: vec![0.0; r],
        step_end: Vec::with_capacity(steps.len()),
    };
    let ends = run(costs, layout, &steps, Some(&mut rec));
    // Token times per request: the first from its last prefill chunk, then
    // one per decode step from its micro-batch.
    let group_of: Vec<usize> = sizes
        .iter()
        .enumerate()
        .flat_map(|(g, &b)| std::iter::repeat_n(g, b as usize))
        .collect();
    let ttft: Vec<f64> = (0..n as usize)
        .map(|q| ends[0][(q + 1) * chunks - 1])
        .collect();
    let last: Vec<f64> = (0..n as usize)
        .map(|q| ends[ends.len() - 1][group_of[q]])
        .collect();
    let makespan = last.iter().copied().fold(0.0, f64::max);
    let decode_tokens = (n * (w.output_tokens - 1)) as f64;
    let tpot = (0..n as usize)
        .map(|q| (last[q] - ttft[q]) / (w.output_tokens - 1) as f64)
        .sum::<f64>()
        / n as f64;
    let max_ttft = ttft.iter().copied().fold(0.0, f64::max);
    let devices = (0..r)
        .map(|pos| {
            let dev = layout.ring[pos];
            let memory = costs.memory(layout, pos);
            let fixed = memory.resident_bytes + memory.slot_bytes + memory.scratch_bytes;
            let kv_token: u64 = layout
                .windows_of(pos)
                .map(|w| costs.kv_per_token(layout.units(w)))
                .sum();
            let mut timeline = vec![MemorySample {
                t_s: 0.0,
                bytes: fixed,
            }];
            for (s, end) in rec.step_end.iter().enumerate() {
                let cached = n as u64 * (prompt as u64 + s as u64);
                timeline.push(MemorySample {
                    t_s: end[pos],
                    bytes: fixed + cached * kv_token,
                });
            }
            DeviceUsage {
                name: p.devices[dev].name.clone(),
                busy_s: rec.busy[pos],
                stall_s: rec.stall[pos],
                idle_s: (makespan - rec.busy[pos] - rec.stall[pos]).max(0.0),
                loader_busy_s: rec.loader_busy[pos],
                memory,
                budget_bytes: costs.budget(dev),
                timeline,
            }
        })
        .collect();
    Prediction {
        ttft_s: ttft.iter().sum::<f64>() / n as f64,
        tpot_s: tpot,
        throughput_tok_s: (n * w.output_tokens) as f64 / makespan,
        decode_tok_s: decode_tokens / (makespan - max_ttft),
        makespan_s: makespan,
        objective_s: objective(costs, layout),
        devices,
    }
}
