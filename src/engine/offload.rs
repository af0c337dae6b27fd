//! The memory budget, and the local placement that makes the best use of
//! it: which units stay resident and which are streamed (DESIGN.md §5).

use serde::Serialize;
use thiserror::Error;

use super::generate::{Engine, PREFILL_CHUNK};
use super::kv::KvCache;
use super::loader::{Span, StreamMode, Streamer};
use super::weights::{Model, Unit};
use super::EngineError;

#[derive(Debug, Error, PartialEq)]
pub enum BudgetError {
    #[error("memory budget {0:?}: unknown unit (accepted: B, kB, MB, GB, KiB, MiB, GiB, or % of the model)")]
    Unit(String),
    #[error("memory budget {0:?} is not a number followed by a unit")]
    Number(String),
    #[error(
        "memory budget of {budget} bytes is too small: this model needs at least {minimum} bytes \
         ({minimum_mib:.1} MiB) for its largest streamed unit in {slots} slots, the KV cache and scratch"
    )]
    TooSmall {
        budget: u64,
        minimum: u64,
        minimum_mib: f64,
        slots: usize,
    },
}

/// A memory budget as given: bytes, or a share of the model's size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    Bytes(u64),
    /// Percent of the model file's tensor bytes.
    Percent(f64),
}

impl Budget {
    /// Parses `300MiB`, `1.5GB`, `123456`, `50%`.
    pub fn parse(s: &str) -> Result<Budget, BudgetError> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num.parse().map_err(|_| BudgetError::Number(s.into()))?;
        if !value.is_finite() || value < 0.0 {
            return Err(BudgetError::Number(s.into()));
        }
        let scale: f64 = match unit.trim() {
            "%" => return Ok(Budget::Percent(value)),
            "" | "B" => 1.0,
            "kB" | "KB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            other => return Err(BudgetError::Unit(other.into())),
        };
        Ok(Budget::Bytes((value * scale) as u64))
    }

    /// The budget in bytes for a model of `model_bytes`.
    pub fn bytes(self, model_bytes: u64) -> u64 {
        match self {
            Budget::Bytes(b) => b,
            Budget::Percent(p) => (model_bytes as f64 * p / 100.0) as u64,
        }
    }
}

/// What a run needs besides weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    /// Sequences decoded together.
    pub batch: usize,
    /// Positions each sequence may reach.
    pub positions: usize,
    /// Streaming slots.
    pub slots: usize,
}

/// Where the memory of a placement goes.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Accounting {
    pub budget: u64,
    pub resident: u64,
    pub slots: u64,
    pub kv: u64,
    pub scratch: u64,
    /// Norm weights and other small vectors, always resident.
    pub vectors: u64,
    pub streamed_per_step: u64,
}

impl Accounting {
    pub fn total(&self) -> u64 {
        self.resident + self.slots + self.kv + self.scratch + self.vectors
    }
}

/// Which units are resident and which streamed, in use order.
#[derive(Clone, Debug, Serialize)]
pub struct Placement {
    pub resident: Vec<Unit>,
    pub streamed: Vec<Unit>,
    pub slots: usize,
    pub accounting: Accounting,
}

impl Placement {
    pub fn is_resident(&self, u: Unit) -> bool {
        self.resident.contains(&u)
    }
}

/// Bytes of the forward pass's reusable buffers for `tokens` tokens at once.
fn scratch_bytes(model: &Model, tokens: usize, positions: usize, threads: usize) -> u64 {
    let c = &model.config;
    let per_token = 4 * c.n_embd + c.q_dim() * 2 + 2 * c.kv_dim() + 2 * c.n_ff + c.head_dim;
    let logits = tokens * c.n_vocab;
    ((tokens * per_token + logits + threads * positions) * 4) as u64
}

/// Chooses the placement that streams the fewest bytes per step within
/// `budget`: resident bytes plus `slots` times the largest streamed unit
/// plus KV plus scratch.
///
/// Units of a kind (attention, MLP) have the same size in a Llama model, so
/// the search is over how many of each kind stay resident, and the head:
/// exact, and at most (L+1)² · 2 candidates. Streamed units of a kind are
/// spread evenly over the layers so that their loads overlap the compute of
/// the resident layers between them. Keeping every MLP resident and
/// streaming attention only needs smaller slots: the search finds such
/// fine-grained placements when they win.
pub fn place(
    model: &Model,
    budget: u64,
    demand: Demand,
    threads: usize,
) -> Result<Placement, BudgetError> {
    let c = &model.config;
    let kv = (demand.batch * demand.positions * KvCache::bytes_per_position(c.n_layer, c.kv_dim()))
        as u64;
    place_with_kv(model, budget, kv, demand, threads)
}

/// Scratch buffers and always-resident vectors for `demand`: the part of
/// the accounting that is neither weights, slots nor KV.
pub fn fixed_bytes(model: &Model, demand: Demand, threads: usize) -> (u64, u64) {
    let c = &model.config;
    let tokens = demand.batch.max(PREFILL_CHUNK);
    let scratch = scratch_bytes(model, tokens, demand.positions, threads);
    let vectors = ((2 * c.n_layer + 1) * c.n_embd * 4) as u64;
    (scratch, vectors)
}

/// As [`place`], with `kv` bytes of KV cache set aside instead of the
/// demand's full batch: under online adaptation (`engine::adapt`) the KV
/// is budgeted per sequence as it grows, and the demand only sizes scratch.
pub fn place_with_kv(
    model: &Model,
    budget: u64,
    kv: u64,
    demand: Demand,
    threads: usize,
) -> Result<Placement, BudgetError> {
    let c = &model.config;
    let l = c.n_layer;
    let (scratch, vectors) = fixed_bytes(model, demand, threads);
    let fixed = kv + scratch + vectors;
    let size = |u: Unit| (model.resident_bytes(u), Span::of(model, u).len);
    let (attn_res, attn_span) = size(Unit::Attn(0));
    let (mlp_res, mlp_span) = size(Unit::Mlp(0));
    let (head_res, head_span) = size(Unit::Head);
    let k = demand.slots.max(1) as u64;
    let mut best: Option<(u64, u64, usize, usize, bool)> = None;
    let mut minimum = u64::MAX;
    for n_attn in 0..=l {
        for n_mlp in 0..=l {
            for head in [false, true] {
                let resident = n_attn as u64 * attn_res
                    + n_mlp as u64 * mlp_res
                    + if head { head_res } else { 0 };
                let largest = [
                    (n_attn < l, attn_span),
                    (n_mlp < l, mlp_span),
                    (!head, head_span),
                ]
                .iter()
                .filter(|(streamed, _)| *streamed)
                .map(|&(_, s)| s)
                .max()
                .unwrap_or(0);
                let total = resident + k * largest + fixed;
                minimum = minimum.min(total);
                if total > budget {
                    continue;
                }
                let streamed = (l - n_attn) as u64 * attn_span
                    + (l - n_mlp) as u64 * mlp_span
                    + if head { 0 } else { head_span };
                // Fewest streamed bytes; then the least memory.
                if best.is_none_or(|(s, t, ..)| (streamed, total) < (s, t)) {
                    best = Some((streamed, total, n_attn, n_mlp, head));
                }
            }
        }
    }
    let Some((streamed_bytes, _, n_attn, n_mlp, head)) = best else {
        return Err(BudgetError::TooSmall {
            budget,
            minimum,
            minimum_mib: minimum as f64 / (1024.0 * 1024.0),
            slots: k as usize,
        });
    };
    let attn_streamed = spread(l, l - n_attn, 0);
    let mlp_streamed = spread(l, l - n_mlp, 1);
    let (mut resident, mut streamed) = (Vec::new(), Vec::new());
    for u in Unit::all(l) {
        let s = match u {
            Unit::Attn(i) => attn_streamed[i],
            Unit::Mlp(i) => mlp_streamed[i],
            Unit::Head => !head,
        };
        if s {
            streamed.push(u);
        } else {
            resident.push(u);
        }
    }
    let slot_len = streamed
        .iter()
        .map(|&u| Span::of(model, u).len)
        .max()
        .unwrap_or(0);
    let slots = if streamed.is_empty() { 0 } else { k as usize };
    Ok(Placement {
        accounting: Accounting {
            budget,
            resident: resident.iter().map(|&u| model.resident_bytes(u)).sum(),
            slots: slots as u64 * slot_len,
            kv,
            scratch,
            vectors,
            streamed_per_step: streamed_bytes,
        },
        resident,
        streamed,
        slots,
    })
}

/// Marks `n` of `len` positions, spread evenly; `phase` shifts them so that
/// two kinds spread the same way do not pile onto the same layers.
fn spread(len: usize, n: usize, phase: usize) -> Vec<bool> {
    let mut v = vec![false; len];
    for i in 0..n {
        let at = ((2 * i + 1) * len / (2 * n) + phase * len / (4 * n.max(1))) % len;
        let mut j = at;
        while v[j] {
            j = (j + 1) % len;
        }
        v[j] = true;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_units() {
        assert_eq!(Budget::parse("300MiB"), Ok(Budget::Bytes(300 << 20)));
        assert_eq!(Budget::parse("1.5GB"), Ok(Budget::Bytes(1_500_000_000)));
        assert_eq!(Budget::parse("4096"), Ok(Budget::Bytes(4096)));
        assert_eq!(Budget::parse("50%"), Ok(Budget::Percent(50.0)));
        assert_eq!(Budget::Percent(25.0).bytes(1000), 250);
        let e = Budget::parse("300MiBs").unwrap_err();
        assert!(
            e.to_string().contains("MiB") && e.to_string().contains("MiBs"),
            "{e}"
        );
        assert!(matches!(Budget::parse("lots"), Err(BudgetError::Number(_))));
        assert!(matches!(Budget::parse("-5MB"), Err(BudgetError::Number(_))));
    }

    #[test]
    fn spread_marks_exactly_n_distinct_positions() {
        for len in 1..40 {
            for n in 0..=len {
                for phase in 0..2 {
                    assert_eq!(spread(len, n, phase).iter().filter(|&&b| b).count(), n);
                }
            }
        }
    }
}

/// How to run a model under a memory budget.
#[derive(Clone, Copy, Debug)]
pub struct OffloadSpec {
    pub budget: Budget,
    pub demand: Demand,
    pub threads: usize,
    pub mode: LoadMode,
}

/// How weights that are not resident reach compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadMode {
    /// Streamed by the loader thread through rotating slots (the default).
    Prefetch,
    /// Read by compute when needed, into one slot: the no-prefetch baseline.
    OnDemand,
    /// Nothing copied: every unit read in place from the mapped file, left
    /// to the page cache. A baseline; the budget is not enforced.
    Mapped,
}

impl LoadMode {
    pub fn parse(s: &str) -> Option<LoadMode> {
        Some(match s {
            "prefetch" => LoadMode::Prefetch,
            "on-demand" => LoadMode::OnDemand,
            "mmap" | "mapped" => LoadMode::Mapped,
            _ => return None,
        })
    }
}

/// Opens `path` under `spec`: places units within the budget, copies the
/// resident ones into memory and starts the loader for the rest.
pub fn open_offloaded(
    path: &std::path::Path,
    spec: &OffloadSpec,
) -> Result<(Engine, Placement), EngineError> {
    let gguf = std::sync::Arc::new(crate::model::gguf::Gguf::open(path)?);
    let model = Model::from_gguf(gguf)?;
    if spec.mode == LoadMode::Mapped {
        let all = Unit::all(model.config.n_layer);
        let placement = Placement {
            resident: Vec::new(),
            accounting: Accounting {
                streamed_per_step: all.iter().map(|&u| Span::of(&model, u).len).sum(),
                ..Accounting::default()
            },
            streamed: all,
            slots: 0,
        };
        return Ok((
            Engine::new(std::sync::Arc::new(model), spec.threads),
            placement,
        ));
    }
    let model_bytes: u64 = model.gguf().tensors().iter().map(|t| t.size).sum();
    let budget = spec.budget.bytes(model_bytes);
    let placement = place(&model, budget, spec.demand, spec.threads)?;
    let engine = placed_engine(model, &placement, spec)?;
    Ok((engine, placement))
}

/// The engine of `model` under `placement`: its resident units copied into
/// memory, a streamer for the others in the load mode of `spec`.
fn placed_engine(
    mut model: Model,
    placement: &Placement,
    spec: &OffloadSpec,
) -> Result<Engine, EngineError> {
    model.make_resident(|u| placement.is_resident(u))?;
    let stream_mode = match spec.mode {
        LoadMode::OnDemand => StreamMode::OnDemand,
        _ => StreamMode::Prefetch,
    };
    let streamer = Streamer::start(&model, &placement.streamed, spec.demand.slots, stream_mode)?;
    Ok(Engine::new(std::sync::Arc::new(model), spec.threads)
        .with_streamer(streamer)
        .with_restream(spec.demand.slots, stream_mode))
}

/// Opens `path` for online adaptation (`engine::adapt`): places units
/// within the budget with `kv` bytes set aside for the KV cache, streams
/// `demoted` as well (demotions saved before a restart), and returns an
/// engine whose resident set [`Engine::set_resident`] can change.
pub fn open_adaptive(
    path: &std::path::Path,
    spec: &OffloadSpec,
    kv: u64,
    demoted: &[Unit],
) -> Result<(Engine, Placement), EngineError> {
    let gguf = std::sync::Arc::new(crate::model::gguf::Gguf::open(path)?);
    let model = Model::from_gguf(gguf)?;
    let model_bytes: u64 = model.gguf().tensors().iter().map(|t| t.size).sum();
    let budget = spec.budget.bytes(model_bytes);
    let mut placement = place_with_kv(&model, budget, kv, spec.demand, spec.threads)?;
    if !demoted.is_empty() {
        let all = Unit::all(model.config.n_layer);
        let (streamed, resident): (Vec<Unit>, Vec<Unit>) = all
            .into_iter()
            .partition(|u| placement.streamed.contains(u) || demoted.contains(u));
        let slot_len = streamed
            .iter()
            .map(|&u| Span::of(&model, u).len)
            .max()
            .unwrap_or(0);
        placement.slots = if streamed.is_empty() {
            0
        } else {
            spec.demand.slots.max(1)
        };
        placement.accounting.resident = resident.iter().map(|&u| model.resident_bytes(u)).sum();
        placement.accounting.slots = placement.slots as u64 * slot_len;
        placement.accounting.streamed_per_step =
            streamed.iter().map(|&u| Span::of(&model, u).len).sum();
        placement.resident = resident;
        placement.streamed = streamed;
    }
    placement.accounting.kv = 0;
    let engine = placed_engine(model, &placement, spec)?;
    Ok((engine, placement))
}

/// Drops the file's pages from the page cache, so that a mapped run starts
/// cold.
pub fn drop_page_cache(path: &std::path::Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Opens `path` for `threads` threads: fully resident when `memory` is
/// `None`, else under its budget and load mode.
pub fn open_engine(
    path: &std::path::Path,
    threads: usize,
    memory: Option<(Budget, LoadMode, usize)>,
    demand: impl FnOnce(usize) -> Demand,
) -> Result<(Engine, Option<Placement>), EngineError> {
    match memory {
        None => {
            let model = std::sync::Arc::new(Model::open(path)?);
            Ok((Engine::new(model, threads), None))
        }
        Some((budget, mode, slots)) => {
            let spec = OffloadSpec {
                budget,
                demand: Demand {
                    slots,
                    ..demand(slots)
                },
                threads,
                mode,
            };
            let (engine, placement) = open_offloaded(path, &spec)?;
            Ok((engine, Some(placement)))
        }
    }
}

/// This process's peak resident memory (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
