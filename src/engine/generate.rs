//! The local generation loop: chunked prefill, greedy decoding, scoring.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::forward::{forward, Scratch, TokenIn};
use super::kv::KvCache;
use super::loader::{LoadStats, StreamMode, Streamer};
use super::weights::{Model, Unit};
use super::EngineError;
use crate::compute::cpu::Pool;

/// Prompts are prefilled in chunks of this many tokens. The split depends
/// on the prompt alone, never on load (DESIGN.md §2).
pub const PREFILL_CHUNK: usize = 64;

/// A model with its compute threads and reusable buffers.
pub struct Engine {
    model: Arc<Model>,
    pool: Pool,
    streamer: Option<Streamer>,
    /// Slots and mode for a streamer restarted by [`Engine::set_resident`].
    restream: Option<(usize, StreamMode)>,
    /// Loading statistics of streamers replaced since the last reset.
    past_load: LoadStats,
    scratch: Scratch,
    logits: Vec<f32>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Loading bubbles and storage reads, when layers are streamed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadStats>,
    /// Peak resident memory of the process (VmHWM), where the OS tells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tokens: usize,
    pub decode_s: f64,
    pub decode_tok_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub tokens: Vec<u32>,
    pub timings: Timings,
}

/// One position of a teacher-forced pass.
#[derive(Clone, Debug, Serialize)]
pub struct Scored {
    pub argmax: u32,
    /// The five largest logits, largest first (lowest id first on ties).
    pub top: Vec<(u32, f32)>,
    /// log p(next id), absent at the last position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob_next: Option<f64>,
}

impl Engine {
    pub fn new(model: Arc<Model>, threads: usize) -> Engine {
        Engine {
            model,
            pool: Pool::new(threads),
            streamer: None,
            restream: None,
            past_load: LoadStats::default(),
            scratch: Scratch::default(),
            logits: Vec::new(),
        }
    }

    /// Streams the units `streamer` covers instead of reading them from
    /// memory or the mapped file.
    pub fn with_streamer(mut self, streamer: Streamer) -> Engine {
        self.streamer = Some(streamer);
        self
    }

    /// Lets [`Engine::set_resident`] change the resident set, streaming
    /// what is not resident through `slots` slots in `mode`.
    pub fn with_restream(mut self, slots: usize, mode: StreamMode) -> Engine {
        self.restream = Some((slots, mode));
        self
    }

    /// The units the streamer streams, in use order (none without one).
    pub fn streamed_units(&self) -> Vec<Unit> {
        self.streamer
            .as_ref()
            .map_or_else(Vec::new, |s| s.units().collect())
    }

    /// Bytes the streaming slots take.
    pub fn slot_bytes(&self) -> usize {
        self.streamer.as_ref().map_or(0, |s| s.slot_bytes())
    }

    /// Changes which units are resident, between two steps: promotes the
    /// units `resident` selects that are not in memory, demotes the others,
    /// and restarts the streamer on the new list of streamed units. A
    /// unit's weights are the same bytes wherever they come from, so no
    /// logit changes (DESIGN.md §2).
    ///
    /// Slot hand-over: the old streamer is dropped first. Dropping closes
    /// its `free` channel and joins its loader thread, so every slot is back
    /// in this thread's hands (or the loader's read of it has ended) before
    /// its memory is unmapped; the new streamer starts at the first
    /// streamed unit of a step, with fresh slots sized for its units. It
    /// runs between steps only: a step that failed half-way has already
    /// been brought back to its start by `finish_step`.
    ///
    /// Demotions happen before promotions, so memory never holds both. A
    /// promotion that fails to read leaves its unit streamed, and the error
    /// is returned after the streamer has been restarted on what is
    /// actually resident: the engine stays usable.
    pub fn set_resident(&mut self, resident: impl Fn(Unit) -> bool) -> Result<(), EngineError> {
        let (slots, mode) = self.restream.ok_or_else(|| {
            EngineError::Batch("this engine was opened without a budget to adapt".into())
        })?;
        if let Some(mut s) = self.streamer.take() {
            s.finish_step();
            self.past_load = add_stats(self.past_load, s.stats());
        }
        let all = Unit::all(self.model.config.n_layer);
        let model = Arc::get_mut(&mut self.model).ok_or_else(|| {
            EngineError::Batch("the model is shared: cannot change its resident set".into())
        })?;
        for &u in &all {
            if !resident(u) {
                model.demote(u);
            }
        }
        let mut failed = None;
        for &u in &all {
            if resident(u) {
                if let Err(e) = model.promote(u) {
                    failed.get_or_insert(e);
                }
            }
        }
        let streamed: Vec<Unit> = all.into_iter().filter(|&u| !model.is_resident(u)).collect();
        self.streamer = Some(Streamer::start(model, &streamed, slots, mode)?);
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Loading statistics since the last reset, when streaming.
    pub fn load_stats(&self) -> Option<LoadStats> {
        self.streamer
            .as_ref()
            .map(|s| add_stats(self.past_load, s.stats()))
    }

    pub fn reset_load_stats(&mut self) {
        self.past_load = LoadStats::default();
        if let Some(s) = self.streamer.as_mut() {
            s.reset_stats();
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// The compute threads, for measurements beside the engine's own work
    /// (the bench's plain read runs on the threads decode runs on).
    pub(super) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn new_cache(&self) -> KvCache {
        let c = &self.model.config;
        KvCache::new(c.n_layer, c.n_head_kv, c.head_dim)
    }

    /// Runs one batch; returns the logits of the tokens in `want`, a row of
    /// `n_vocab` each.
    pub fn step(
        &mut self,
        batch: &[TokenIn],
        caches: &mut [KvCache],
        want: &[usize],
    ) -> Result<&[f32], EngineError> {
        forward(
            &self.model,
            &self.pool,
            &mut self.scratch,
            self.streamer.as_mut(),
            batch,
            caches,
            want,
            &mut self.logits,
        )?;
        Ok(&self.logits)
    }

    /// Feeds `ids` to one sequence in prompt-determined chunks; returns the
    /// logits after the last token (all positions' when `every` is set).
    pub fn prefill(
        &mut self,
        cache: &mut KvCache,
        ids: &[u32],
        every: bool,
    ) -> Result<Vec<f32>, EngineError> {
        let n_vocab = self.model.config.n_vocab;
        let mut out = Vec::with_capacity(if every { ids.len() * n_vocab } else { n_vocab });
        let start = cache.len();
        let mut batch = Vec::with_capacity(PREFILL_CHUNK);
        for (c, chunk) in ids.chunks(PREFILL_CHUNK).enumerate() {
            batch.clear();
            batch.extend(chunk.iter().enumerate().map(|(i, &id)| TokenIn {
                id,
                seq: 0,
                pos: start + c * PREFILL_CHUNK + i,
            }));
            let last_chunk = (c + 1) * PREFILL_CHUNK >= ids.len();
            let want: Vec<usize> = if every {
                (0..chunk.len()).collect()
            } else if last_chunk {
                vec![chunk.len() - 1]
            } else {
                Vec::new()
            };
            let logits = self.step(&batch, std::slice::from_mut(cache), &want)?;
            out.extend_from_slice(logits);
        }
        Ok(out)
    }

    /// Greedy decoding from token ids: stops after `max_tokens` or at `stop`.
    pub fn generate_greedy(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        stop: Option<u32>,
    ) -> Result<Generation, EngineError> {
        self.check_prompt(prompt, max_tokens)?;
        let mut cache = self.new_cache();
        self.reset_load_stats();
        let t0 = Instant::now();
        let mut logits = self.prefill(&mut cache, prompt, false)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut tokens = Vec::with_capacity(max_tokens);
        let t1 = Instant::now();
        while tokens.len() < max_tokens {
            let next = argmax(&logits);
            tokens.push(next);
            if Some(next) == stop || tokens.len() == max_tokens {
                break;
            }
            let tok = TokenIn {
                id: next,
                seq: 0,
                pos: cache.len(),
            };
            logits = self
                .step(&[tok], std::slice::from_mut(&mut cache), &[0])?
                .to_vec();
        }
        let decode_s = t1.elapsed().as_secs_f64();
        // The first token comes from the prefill's logits: count only steps.
        let steps = tokens.len().saturating_sub(1);
        Ok(Generation {
            prompt_ids: prompt.to_vec(),
            timings: Timings {
                load: self.load_stats(),
                peak_rss_bytes: super::offload::peak_rss_bytes(),
                prefill_tokens: prompt.len(),
                prefill_s,
                prefill_tok_s: prompt.len() as f64 / prefill_s.max(1e-9),
                decode_tokens: steps,
                decode_s,
                decode_tok_s: steps as f64 / decode_s.max(1e-9),
            },
            tokens,
        })
    }

    /// Teacher forcing: one pass over `ids`, a `Scored` per position.
    pub fn score(&mut self, ids: &[u32]) -> Result<Vec<Scored>, EngineError> {
        self.check_prompt(ids, 0)?;
        let mut cache = self.new_cache();
        let logits = self.prefill(&mut cache, ids, true)?;
        let n_vocab = self.model.config.n_vocab;
        Ok(logits
            .chunks_exact(n_vocab)
            .enumerate()
            .map(|(i, row)| Scored {
                argmax: argmax(row),
                top: top_k(row, 5),
                logprob_next: ids
                    .get(i + 1)
                    .map(|&next| log_softmax_at(row, next as usize)),
            })
            .collect())
    }

    /// Refuses an empty prompt, ids outside the vocabulary, and a prompt
    /// that leaves no room in the context for `max_tokens` new tokens.
    pub(crate) fn check_prompt(
        &self,
        prompt: &[u32],
        max_tokens: usize,
    ) -> Result<(), EngineError> {
        let c = &self.model.config;
        if prompt.is_empty() {
            return Err(EngineError::Batch("the prompt is empty".into()));
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= c.n_vocab) {
            return Err(EngineError::TokenOutOfRange {
                id: id as u64,
                vocab: c.n_vocab,
            });
        }
        if prompt.len() + max_tokens.saturating_sub(1) > c.context_length {
            return Err(EngineError::PromptTooLong {
                prompt: prompt.len(),
                max_tokens,
                limit: c.context_length,
            });
        }
        Ok(())
    }
}

/// Loading statistics of two streamers one after the other.
fn add_stats(a: LoadStats, b: LoadStats) -> LoadStats {
    LoadStats {
        bubbles: a.bubbles + b.bubbles,
        bubble_s: a.bubble_s + b.bubble_s,
        units_read: a.units_read + b.units_read,
        bytes_read: a.bytes_read + b.bytes_read,
        read_s: a.read_s + b.read_s,
        direct_io: b.direct_io,
    }
}

/// The index of the largest logit; the lowest index wins a tie.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest logits, largest first, the lower id first on ties.
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        if top.len() < k || v > top[top.len() - 1].1 {
            let at = top.partition_point(|&(_, t)| t >= v);
            top.insert(at, (i as u32, v));
            top.truncate(k);
        }
    }
    top
}

/// `log softmax(row)[at]`, computed in f64.
pub fn log_softmax_at(row: &[f32], at: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[at] as f64 - max - sum.ln()
}
