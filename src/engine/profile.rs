//! Timing the engine's own work piece by piece, for the profiler
//! (`plan::profile`): units for a decode batch or a prefill chunk, and
//! matrix products, run by the same code as a forward pass.
//!
//! Timings are taken the way a decode step meets the weights: the timer
//! runs the units of every resident layer in model order, as a step does,
//! and times each. Timing one unit again and again would find its weights
//! in the CPU's caches, which a step over the whole model does not; on a
//! machine whose last-level cache holds a few layers that made matrix
//! products look several times faster than they are in a step.
//!
//! The KV cache a unit attends to is filled with zeros up to the wanted
//! context instead of by a prefill: attention does the same work whatever
//! the values, and a cache of 32 sequences × 4096 positions would take
//! minutes to fill for real on a small device. The caches hold a few layers
//! that the timed layers take in turn, within a memory cap.

use std::sync::Arc;
use std::time::Instant;

use super::forward::{prepare, run_unit, Scratch, TokenIn};
use super::kv::KvCache;
use super::weights::{Model, Unit, UnitWeights};
use super::EngineError;
use crate::compute::cpu::matmul::matmul_many;
use crate::compute::cpu::{LineBuf, Pool, QMatrix};
use crate::model::dtype::GgmlType;

/// What a timed unit runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// One token each of `batch` sequences, each with `context` positions
    /// already in its cache.
    Decode { batch: usize, context: usize },
    /// `chunk` tokens of one sequence at positions `offset..offset + chunk`.
    Prefill { chunk: usize, offset: usize },
}

impl Work {
    /// Tokens in the batch.
    pub fn tokens(self) -> usize {
        match self {
            Work::Decode { batch, .. } => batch,
            Work::Prefill { chunk, .. } => chunk,
        }
    }

    /// Sequences in the batch.
    pub fn sequences(self) -> usize {
        match self {
            Work::Decode { batch, .. } => batch,
            Work::Prefill { .. } => 1,
        }
    }

    /// (query, key) pairs one attention unit computes.
    pub fn attended(self) -> u64 {
        match self {
            Work::Decode { batch, context } => (batch * (context + 1)) as u64,
            Work::Prefill { chunk, offset } => {
                let (n, p) = (chunk as u64, offset as u64);
                n * p + n * (n + 1) / 2
            }
        }
    }

    /// Positions each cache must hold.
    pub fn positions(self) -> usize {
        match self {
            Work::Decode { context, .. } => context + 1,
            Work::Prefill { chunk, offset } => offset + chunk,
        }
    }

    fn batch(self) -> Vec<TokenIn> {
        match self {
            Work::Decode { batch, context } => (0..batch)
                .map(|seq| TokenIn {
                    id: 0,
                    seq,
                    pos: context,
                })
                .collect(),
            Work::Prefill { chunk, offset } => (0..chunk)
                .map(|i| TokenIn {
                    id: 0,
                    seq: 0,
                    pos: offset + i,
                })
                .collect(),
        }
    }
}

/// Seconds of each unit in one pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassTimes {
    /// One per timed layer.
    pub attn: Vec<f64>,
    pub mlp: Vec<f64>,
    pub head: f64,
}

/// One timed matrix product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulTime {
    pub dtype: GgmlType,
    /// Bytes of the matrix as the kernels read it (resident packing).
    pub bytes: u64,
    pub tokens: usize,
    pub seconds: f64,
}

/// Runs units and matrix products of a model alone and times them.
pub struct UnitTimer {
    model: Arc<Model>,
    /// Layers whose units are resident, timed in this order.
    layers: Vec<usize>,
    pool: Pool,
    scratch: Scratch,
    caches: Vec<KvCache>,
    logits: Vec<f32>,
    cache_cap: u64,
}

impl UnitTimer {
    /// A timer for `model`: the attention and MLP units of `layers` and the
    /// head must be resident. The KV caches take at most `cache_cap` bytes
    /// (at least one layer's worth).
    pub fn new(
        model: Arc<Model>,
        layers: Vec<usize>,
        threads: usize,
        cache_cap: u64,
    ) -> Result<UnitTimer, EngineError> {
        if layers.is_empty() {
            return Err(EngineError::Batch(
                "the timer needs at least one layer".into(),
            ));
        }
        for &l in &layers {
            for u in [Unit::Attn(l), Unit::Mlp(l), Unit::Head] {
                if !model.is_resident(u) {
                    return Err(EngineError::NotResident(u.to_string()));
                }
            }
        }
        Ok(UnitTimer {
            model,
            layers,
            pool: Pool::new(threads),
            scratch: Scratch::default(),
            caches: Vec::new(),
            logits: Vec::new(),
            cache_cap,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The timed layers.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Bytes of KV cache one layer needs for `work`.
    pub fn cache_bytes_per_layer(&self, work: Work) -> u64 {
        (work.sequences()
            * work.positions()
            * KvCache::bytes_per_position(1, self.model.config.kv_dim())) as u64
    }

    /// Times one pass of `work` over the timed layers, attention and MLP of
    /// each in turn and then the head, as a step runs them (module docs).
    pub fn time_pass(&mut self, work: Work) -> Result<PassTimes, EngineError> {
        let c = &self.model.config;
        if work.positions() > c.context_length {
            return Err(EngineError::ContextFull {
                limit: c.context_length,
            });
        }
        let per_layer = self.cache_bytes_per_layer(work).max(1);
        let cache_layers = ((self.cache_cap / per_layer) as usize).clamp(1, self.layers.len());
        let seqs = work.sequences();
        if self.caches.len() != seqs
            || self
                .caches
                .first()
                .is_some_and(|k| k.layers() != cache_layers)
        {
            self.caches = (0..seqs)
                .map(|_| KvCache::new(cache_layers, c.n_head_kv, c.head_dim))
                .collect();
        }
        let batch = work.batch();
        prepare(&self.model, &mut self.scratch, &batch, &mut self.caches)?;
        let want: Vec<usize> = (0..batch.len()).collect();
        let model = &*self.model;
        let mut times = PassTimes::default();
        let run = |unit: Unit,
                   weights_of: Unit,
                   scratch: &mut Scratch,
                   caches: &mut [KvCache],
                   logits: &mut Vec<f32>|
         -> Result<f64, EngineError> {
            let w = model.resident_weights(weights_of)?;
            let t = Instant::now();
            run_unit(
                model, &self.pool, scratch, w, unit, &batch, caches, &want, logits,
            );
            Ok(t.elapsed().as_secs_f64())
        };
        for (i, &l) in self.layers.iter().enumerate() {
            let cache_layer = i % cache_layers;
            times.attn.push(run(
                Unit::Attn(cache_layer),
                Unit::Attn(l),
                &mut self.scratch,
                &mut self.caches,
                &mut self.logits,
            )?);
            times.mlp.push(run(
                Unit::Mlp(l),
                Unit::Mlp(l),
                &mut self.scratch,
                &mut self.caches,
                &mut self.logits,
            )?);
        }
        times.head = run(
            Unit::Head,
            Unit::Head,
            &mut self.scratch,
            &mut self.caches,
            &mut self.logits,
        )?;
        Ok(times)
    }

    /// Times each matrix product of every timed layer, then the head's, for
    /// `tokens` input vectors, in model order.
    pub fn time_matmuls(&mut self, tokens: usize) -> Result<Vec<MatmulTime>, EngineError> {
        let model = &*self.model;
        let width = model
            .config
            .n_embd
            .max(model.config.n_ff)
            .max(model.config.q_dim());
        // A fixed, non-trivial input, aligned as the engine's activations
        // are: the time depends on that, not on the values.
        let x: LineBuf = (0..tokens * width)
            .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
            .collect();
        let mut y = Vec::new();
        let mut out = Vec::new();
        let units = self
            .layers
            .iter()
            .flat_map(|&l| [Unit::Attn(l), Unit::Mlp(l)])
            .chain([Unit::Head]);
        for unit in units {
            let mats: Vec<QMatrix> = match model.resident_weights(unit)? {
                UnitWeights::Attn(w) => vec![w.q, w.k, w.v, w.o],
                UnitWeights::Mlp(w) => vec![w.gate, w.up, w.down],
                UnitWeights::Head(h) => vec![h],
            };
            for m in mats {
                y.resize(tokens * m.rows, 0.0);
                let t = Instant::now();
                matmul_many(&self.pool, &mut [(&m, &mut y[..])], &x, tokens);
                out.push(MatmulTime {
                    dtype: m.ty,
                    bytes: m.data.len() as u64,
                    tokens,
                    seconds: t.elapsed().as_secs_f64(),
                });
            }
        }
        Ok(out)
    }
}
