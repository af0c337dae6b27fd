//! The cost model of DESIGN.md §6 as lookup tables for one problem:
//! `t_comp` per device, unit and token count, `t_load`, `t_net`, memory.

use std::ops::Range;

use super::placement::{Layout, MemoryUse};
use super::{Link, PlanError, Problem};

/// Cost tables of one problem. Built once per planning call; every
/// figure the search and the simulator use comes from here.
pub(crate) struct Costs<'p> {
    problem: &'p Problem,
    n_units: usize,
    /// Token counts 1..=max_tokens have tables.
    max_tokens: u32,
    /// Per device: prefix sums over units of the compute time without
    /// attention, one row of `n_units + 1` per token count.
    base: Vec<Vec<f64>>,
    /// Per device: prefix sums over units of `kv bytes per token · r`.
    kvr: Vec<Vec<f64>>,
    bytes_prefix: Vec<u64>,
    kv_prefix: Vec<u64>,
    unit_bytes: Vec<u64>,
    /// Batch × context: tokens of KV cache each layer keeps.
    kv_tokens: u64,
    scratch: u64,
}

impl<'p> Costs<'p> {
    pub fn new(problem: &'p Problem) -> Result<Costs<'p>, PlanError> {
        if problem.devices.is_empty() {
            return Err(PlanError::Problem("no devices".into()));
        }
        for (i, d) in problem.devices.iter().enumerate() {
            d.validate()?;
            if problem.devices[..i].iter().any(|e| e.name == d.name) {
                return Err(PlanError::DuplicateDevice(d.name.clone()));
            }
        }
        let m = &problem.model;
        if m.layers.is_empty() || m.hidden == 0 || m.unit(0).bytes() == 0 || m.head.bytes() == 0 {
            return Err(PlanError::Model(format!(
                "{}: no layers, no weights or zero width",
                m.name
            )));
        }
        for (i, d) in problem.devices.iter().enumerate() {
            for j in 0..problem.devices.len() {
                let l = problem.network.link(i, j);
                if i != j
                    && !(l.bandwidth_bps.is_finite() && l.bandwidth_bps > 0.0 && l.latency_s >= 0.0)
                {
                    return Err(PlanError::Problem(format!(
                        "link from `{}`: impossible {l:?}",
                        d.name
                    )));
                }
            }
        }
        let w = &problem.workload;
        w.validate()?;
        let n_units = m.n_units();
        let max_tokens = w.batch().max(w.prefill_chunk);
        let mut base = Vec::with_capacity(problem.devices.len());
        let mut kvr = Vec::with_capacity(problem.devices.len());
        for d in &problem.devices {
            let mut rows = Vec::with_capacity(max_tokens as usize * (n_units + 1));
            for n in 1..=max_tokens {
                rows.push(0.0);
                for u in 0..n_units {
                    let t = d.compute.unit_seconds(m.unit(u), n, 0).ok_or_else(|| {
                        let missing = m
                            .unit(u)
                            .weights
                            .iter()
                            .find(|wb| d.compute.rate(wb.dtype).is_none())
                            .map_or("?".to_string(), |wb| wb.dtype.name().to_string());
                        PlanError::MissingDtype {
                            device: d.name.clone(),
                            dtype: missing,
                        }
                    })?;
                    rows.push(rows.last().unwrap() + t);
                }
            }
            base.push(rows);
            let mut k = vec![0.0];
            for u in 0..n_units {
                k.push(
                    k.last().unwrap()
                        + m.unit(u).kv_bytes_per_token as f64 * d.compute.kv_s_per_byte,
                );
            }
            kvr.push(k);
        }
        let unit_bytes: Vec<u64> = (0..n_units).map(|u| m.unit(u).bytes()).collect();
        let mut bytes_prefix = vec![0u64];
        let mut kv_prefix = vec![0u64];
        for u in 0..n_units {
            bytes_prefix.push(bytes_prefix[u] + unit_bytes[u]);
            kv_prefix.push(kv_prefix[u] + m.unit(u).kv_bytes_per_token);
        }
        Ok(Costs {
            problem,
            n_units,
            max_tokens,
            base,
            kvr,
            bytes_prefix,
            kv_prefix,
            unit_bytes,
            kv_tokens: w.batch() as u64 * w.context_tokens as u64,
            scratch: m.scratch_bytes(max_tokens, w.context_tokens),
        })
    }

    pub fn problem(&self) -> &'p Problem {
        self.problem
    }

    pub fn n_units(&self) -> usize {
        self.n_units
    }

    pub fn n_devices(&self) -> usize {
        self.problem.devices.len()
    }

    pub fn unit_bytes(&self, u: usize) -> u64 {
        self.unit_bytes[u]
    }

    pub fn bytes(&self, units: Range<usize>) -> u64 {
        self.bytes_prefix[units.end] - self.bytes_prefix[units.start]
    }

    pub fn budget(&self, dev: usize) -> u64 {
        self.problem.devices[dev].memory_budget_bytes
    }

    /// Compute seconds of `units` on device `dev` for `tokens` tokens
    /// attending `attended` (query, key) pairs in each unit.
    pub fn compute(&self, dev: usize, units: Range<usize>, tokens: u32, attended: u64) -> f64 {
        debug_assert!(tokens >= 1 && tokens <= self.max_tokens);
        let row = &self.base[dev][(tokens as usize - 1) * (self.n_units + 1)..];
        let k = &self.kvr[dev];
        row[units.end] - row[units.start] + attended as f64 * (k[units.end] - k[units.start])
    }

    /// Seconds to read the embedding rows of `tokens` tokens from storage.
    /// The engine reads them through the page cache (rows are small and
    /// frequent tokens repeat), so no per-request latency is charged: a
    /// cold storage read per step would cost as much as a whole step of a
    /// small model, which is not what happens.
    pub fn embed(&self, dev: usize, tokens: u32) -> f64 {
        let row = self.problem.model.embedding_row_bytes;
        self.problem.devices[dev]
            .storage
            .read_seconds(tokens as u64 * row, 0)
    }

    /// `t_load`: seconds to read `bytes` in `reads` requests on `dev`.
    pub fn load(&self, dev: usize, bytes: u64, reads: u32) -> f64 {
        self.problem.devices[dev].storage.read_seconds(bytes, reads)
    }

    pub fn link(&self, from: usize, to: usize) -> Link {
        self.problem.network.link(from, to)
    }

    /// KV bytes the layers `units` keep for the target batch and context.
    pub fn kv_bytes(&self, units: Range<usize>) -> u64 {
        self.kv_tokens * (self.kv_prefix[units.end] - self.kv_prefix[units.start])
    }

    /// KV bytes per token of context of `units` (one sequence).
    pub fn kv_per_token(&self, units: Range<usize>) -> u64 {
        self.kv_prefix[units.end] - self.kv_prefix[units.start]
    }

    /// Scratch of a device that runs any window.
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// Memory of ring position `pos` under `layout`: resident units, `K`
    /// slots of its largest streamed unit, KV cache, scratch.
    pub fn memory(&self, layout: &Layout, pos: usize) -> MemoryUse {
        let mut m = MemoryUse::default();
        let mut largest = 0;
        for w in layout.windows_of(pos) {
            for u in layout.units(w) {
                if layout.streamed[u] {
                    largest = largest.max(self.unit_bytes[u]);
                } else {
                    m.resident_bytes += self.unit_bytes[u];
                }
            }
            m.kv_bytes += self.kv_bytes(layout.units(w));
            m.scratch_bytes = self.scratch;
        }
        m.slot_bytes = layout.slots as u64 * largest;
        m
    }

    /// Fails with the first device over its budget.
    pub fn check_memory(&self, layout: &Layout) -> Result<(), PlanError> {
        for (pos, &dev) in layout.ring.iter().enumerate() {
            let need = self.memory(layout, pos).total();
            if need > self.budget(dev) {
                return Err(PlanError::OverBudget {
                    device: self.problem.devices[dev].name.clone(),
                    need_bytes: need,
                    budget_bytes: self.budget(dev),
                });
            }
        }
        Ok(())
    }

    /// Bytes by which `layout` exceeds the budgets, summed over devices.
    pub fn overflow(&self, layout: &Layout) -> u64 {
        (0..layout.ring.len())
            .map(|pos| {
                self.memory(layout, pos)
                    .total()
                    .saturating_sub(self.budget(layout.ring[pos]))
            })
            .sum()
    }
}
