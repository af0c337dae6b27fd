//! The forward pass: a batch of tokens, from any mix of sequences, through
//! every layer to logits.

use super::kv::KvCache;
use super::loader::Streamer;
use super::weights::{AttnWeights, MlpWeights, Model, Unit, UnitWeights};
use super::window::{Exec, WindowInput};
use super::EngineError;
use crate::compute::cpu::ops;
use crate::compute::cpu::pool::{share, SendPtr};
use crate::compute::cpu::{matmul::matmul_many, Isa, LineBuf, Pool, QMatrix};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// One token of a batch: its id, the sequence (an index into the caches
/// passed with the batch) and its position in that sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenIn {
    pub id: u32,
    pub seq: usize,
    pub pos: usize,
}

/// Buffers reused from step to step, so that steady decoding allocates
/// nothing.
#[derive(Default)]
pub struct Scratch {
    x: LineBuf,
    xn: LineBuf,
    q: LineBuf,
    k: LineBuf,
    v: LineBuf,
    attn: LineBuf,
    o: LineBuf,
    gate: LineBuf,
    up: LineBuf,
    rope: Vec<(f32, f32)>,
    /// Per-thread scores of attention run per (token, kv head).
    scores: Vec<LineBuf>,
    /// Every (token, head)'s scores, for attention split within pairs.
    scores_all: LineBuf,
    /// Per (token, kv head) pair: key blocks scored, and whether its rows
    /// are softmaxed, for attention split within pairs.
    progress: Vec<(AtomicUsize, AtomicBool)>,
    last: LineBuf,
}

/// Runs `batch` through the model, appending each token's keys and values
/// to its sequence's cache, and writes the logits of the tokens listed in
/// `want` (indices into `batch`) into `logits`, one row of `n_vocab` each.
///
/// Each sequence's tokens must be in order and continue its cache. Units
/// the streamer streams come from its slots; resident ones from memory; any
/// other from the mapped file.
///
/// This is the window executor run on one window that holds every unit
/// (`super::window`), so a single node and a ring share every line of the
/// per-unit code.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    model: &Model,
    pool: &Pool,
    scratch: &mut Scratch,
    streamer: Option<&mut Streamer>,
    batch: &[TokenIn],
    caches: &mut [KvCache],
    want: &[usize],
    logits: &mut Vec<f32>,
) -> Result<(), EngineError> {
    // A bad batch is refused before the streamer moves: the window
    // executor would otherwise take (and read) every streamed unit to stay
    // in step.
    validate(model, batch, caches, true)?;
    let units = Unit::all(model.config.n_layer);
    let mut exec = Exec {
        model,
        pool,
        scratch,
        streamer,
        compute_factor: 1.0,
    };
    exec.run(&units, WindowInput::Embed, batch, caches, want, logits)
}

/// Puts the batch's embeddings into the residual stream, computes its
/// rotations and makes room in the caches for its positions.
pub(super) fn prepare(
    model: &Model,
    scratch: &mut Scratch,
    batch: &[TokenIn],
    caches: &mut [KvCache],
) -> Result<(), EngineError> {
    embed(model, scratch, batch)?;
    prepare_positions(model, scratch, batch, caches);
    Ok(())
}

/// Writes the batch's token embeddings into the residual stream.
pub(super) fn embed(
    model: &Model,
    scratch: &mut Scratch,
    batch: &[TokenIn],
) -> Result<(), EngineError> {
    let d = model.config.n_embd;
    let x = scratch.x.grow(batch.len() * d);
    for (t, tok) in batch.iter().enumerate() {
        model.embed(tok.id, &mut x[t * d..(t + 1) * d])?;
    }
    Ok(())
}

/// Copies hidden states that arrived from the previous window into the
/// residual stream; `hidden` holds `n_embd` values per token of `batch`.
pub(super) fn load_hidden(
    model: &Model,
    scratch: &mut Scratch,
    n_tokens: usize,
    hidden: &[f32],
) -> Result<(), EngineError> {
    let d = model.config.n_embd;
    if hidden.len() != n_tokens * d {
        return Err(EngineError::Batch(format!(
            "{} hidden values for {n_tokens} tokens of width {d}",
            hidden.len()
        )));
    }
    scratch.x.grow(n_tokens * d).copy_from_slice(hidden);
    Ok(())
}

/// Computes the batch's rotations and makes room in the caches for its
/// positions.
pub(super) fn prepare_positions(
    model: &Model,
    scratch: &mut Scratch,
    batch: &[TokenIn],
    caches: &mut [KvCache],
) {
    let c = &model.config;
    for tok in batch {
        caches[tok.seq].reserve(tok.pos + 1);
    }
    let half = c.head_dim / 2;
    scratch.rope.resize(batch.len() * half, (0.0, 0.0));
    for (t, tok) in batch.iter().enumerate() {
        model.rope_at(tok.pos, &mut scratch.rope[t * half..(t + 1) * half]);
    }
}

impl Scratch {
    /// The residual stream of the last `n` tokens run: what a window hands
    /// to the next one.
    pub fn hidden(&self, n: usize, n_embd: usize) -> &[f32] {
        &self.x[..n * n_embd]
    }
}

/// Runs one unit on the residual stream of a prepared batch.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_unit(
    model: &Model,
    pool: &Pool,
    scratch: &mut Scratch,
    w: UnitWeights,
    unit: Unit,
    batch: &[TokenIn],
    caches: &mut [KvCache],
    want: &[usize],
    logits: &mut Vec<f32>,
) {
    match (w, unit) {
        (UnitWeights::Attn(w), Unit::Attn(l)) => {
            attention_block(model, pool, scratch, &w, l, batch, caches)
        }
        (UnitWeights::Mlp(w), _) => mlp_block(model, pool, scratch, &w, batch.len()),
        (UnitWeights::Head(head), _) => head_block(model, pool, scratch, &head, want, logits),
        _ => unreachable!("unit_weights returns the unit's own kind"),
    }
}

/// Runs `f` on the weights of `unit`, wherever they are: a streamer's slot
/// (released afterwards), resident memory, or the mapped file.
pub(super) fn with_unit(
    model: &Model,
    streamer: Option<&mut Streamer>,
    unit: Unit,
    f: impl FnOnce(UnitWeights),
) -> Result<(), EngineError> {
    if let Some(s) = streamer.filter(|s| s.streams(unit)) {
        let slot = s.acquire(unit);
        let r = s.view(model, &slot).map(f);
        s.release(slot);
        return r;
    }
    f(model.weights(unit)?);
    Ok(())
}

/// Checks that each sequence's tokens are in order and continue its cache,
/// and, when the batch is embedded here, that every id is in the vocabulary.
pub(super) fn validate(
    model: &Model,
    batch: &[TokenIn],
    caches: &[KvCache],
    embeds: bool,
) -> Result<(), EngineError> {
    let c = &model.config;
    let mut next: Vec<Option<usize>> = vec![None; caches.len()];
    for tok in batch {
        if embeds && tok.id as usize >= c.n_vocab {
            return Err(EngineError::TokenOutOfRange {
                id: tok.id as u64,
                vocab: c.n_vocab,
            });
        }
        let Some(slot) = next.get_mut(tok.seq) else {
            return Err(EngineError::Batch(format!(
                "sequence {} has no cache",
                tok.seq
            )));
        };
        let want = slot.unwrap_or(caches[tok.seq].len());
        if tok.pos != want {
            return Err(EngineError::Batch(format!(
                "sequence {} expects position {want}, got {}",
                tok.seq, tok.pos
            )));
        }
        if tok.pos >= c.context_length {
            return Err(EngineError::ContextFull {
                limit: c.context_length,
            });
        }
        *slot = Some(tok.pos + 1);
    }
    Ok(())
}

/// The attention half of a layer: norm, Q/K/V, RoPE, cache, attention,
/// output projection, residual.
fn attention_block(
    model: &Model,
    pool: &Pool,
    s: &mut Scratch,
    w: &AttnWeights,
    l: usize,
    batch: &[TokenIn],
    caches: &mut [KvCache],
) {
    let c = &model.config;
    let (n, d, qd, kvd, hd) = (batch.len(), c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
    let x = &mut s.x[..n * d];
    let xn = s.xn.grow(n * d);
    ops::rmsnorm(x, w.norm, c.rms_eps, xn);
    let q = s.q.grow(n * qd);
    let k = s.k.grow(n * kvd);
    let v = s.v.grow(n * kvd);
    matmul_many(pool, &mut [(&w.q, q), (&w.k, k), (&w.v, v)], xn, n);
    let half = hd / 2;
    for t in 0..n {
        let cs = &s.rope[t * half..(t + 1) * half];
        for h in s.q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
            ops::rope_head(h, cs);
        }
        for h in s.k[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
            ops::rope_head(h, cs);
        }
    }
    for (t, tok) in batch.iter().enumerate() {
        caches[tok.seq].put(
            l,
            tok.pos,
            &s.k[t * kvd..(t + 1) * kvd],
            &s.v[t * kvd..(t + 1) * kvd],
        );
    }
    attention(model, pool, s, l, batch, caches);
    let o = s.o.grow(n * d);
    matmul_many(pool, &mut [(&w.o, o)], &s.attn[..n * qd], n);
    for (xi, oi) in s.x[..n * d].iter_mut().zip(&s.o[..n * d]) {
        *xi += oi;
    }
}

/// The MLP half of a layer: norm, gate and up, SwiGLU, down, residual.
fn mlp_block(model: &Model, pool: &Pool, s: &mut Scratch, w: &MlpWeights, n: usize) {
    let c = &model.config;
    let d = c.n_embd;
    let xn = s.xn.grow(n * d);
    ops::rmsnorm(&s.x[..n * d], w.norm, c.rms_eps, xn);
    let gate = s.gate.grow(n * c.n_ff);
    let up = s.up.grow(n * c.n_ff);
    matmul_many(pool, &mut [(&w.gate, gate), (&w.up, up)], xn, n);
    ops::swiglu(&mut s.gate[..n * c.n_ff], &s.up[..n * c.n_ff]);
    let o = s.o.grow(n * d);
    matmul_many(pool, &mut [(&w.down, o)], &s.gate[..n * c.n_ff], n);
    for (xi, oi) in s.x[..n * d].iter_mut().zip(&s.o[..n * d]) {
        *xi += oi;
    }
}

/// Final norm and output head, only for the tokens whose logits are wanted.
fn head_block(
    model: &Model,
    pool: &Pool,
    s: &mut Scratch,
    head: &QMatrix,
    want: &[usize],
    logits: &mut Vec<f32>,
) {
    let d = model.config.n_embd;
    logits.resize(want.len() * head.rows, 0.0);
    if want.is_empty() {
        return;
    }
    let last = s.last.grow(want.len() * d);
    for (i, &t) in want.iter().enumerate() {
        last[i * d..(i + 1) * d].copy_from_slice(&s.x[t * d..(t + 1) * d]);
    }
    let xn = s.xn.grow(want.len() * d);
    ops::rmsnorm(last, model.output_norm(), model.config.rms_eps, xn);
    matmul_many(pool, &mut [(head, &mut logits[..])], xn, want.len());
}

/// Causal attention for every (token, head) of the batch, spread over the
/// pool; each output is computed by one thread alone, with the same bits
/// whichever of the two splits below runs it.
fn attention(
    model: &Model,
    pool: &Pool,
    s: &mut Scratch,
    l: usize,
    batch: &[TokenIn],
    caches: &[KvCache],
) {
    let c = &model.config;
    let (n, qd) = (batch.len(), c.q_dim());
    let attn = s.attn.grow(n * qd);
    let out = SendPtr(attn.as_mut_ptr());
    let at = Attend {
        c,
        l,
        batch,
        caches,
        q: &s.q[..n * qd],
        out,
        isa: Isa::detect(),
    };
    // With fewer (token, kv head) pairs than a few per thread (decode of
    // one or two sequences), a pair per task would leave threads idle: the
    // work is then split within the pairs.
    if n * c.n_head_kv < SPLIT_BELOW * pool.n_threads() {
        at.split(pool, &mut s.scores_all, &mut s.progress);
    } else {
        at.by_pair(pool, &mut s.scores);
    }
}

/// Below this many (token, kv head) pairs per thread, attention splits
/// each pair's positions and dimensions across threads.
const SPLIT_BELOW: usize = 4;

/// Chunks of 16 dimensions per mix task of split attention: two keep
/// enough independent sums in flight per thread (each is a chain of
/// fused multiply-adds in position order).
const MIX_CHUNKS: usize = 2;

/// Sets its flag when dropped during a panic.
struct FailOnPanic<'a>(&'a AtomicBool);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// One layer's attention over a batch.
struct Attend<'a> {
    c: &'a crate::model::config::Config,
    l: usize,
    batch: &'a [TokenIn],
    caches: &'a [KvCache],
    /// Rotated queries, `[token][head][head_dim]`.
    q: &'a [f32],
    /// `[token][head][head_dim]`.
    out: SendPtr<f32>,
    isa: Isa,
}

impl Attend<'_> {
    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.c.n_head / self.c.n_head_kv
    }

    /// The queries (and outputs) of the group of `kv_head` for token `t`.
    fn heads(&self, t: usize, kv_head: usize) -> std::ops::Range<usize> {
        let w = self.group() * self.c.head_dim;
        t * self.c.q_dim() + kv_head * w..t * self.c.q_dim() + (kv_head + 1) * w
    }

    fn cache(&self, t: usize, kv_head: usize) -> ops::HeadCache<'_> {
        self.caches[self.batch[t].seq].head(self.l, kv_head)
    }

    /// One task per run of (token, kv head) pairs: each reads its keys and
    /// values once for the group's query heads.
    fn by_pair(&self, pool: &Pool, scores: &mut Vec<LineBuf>) {
        let c = self.c;
        let max_pos = self.batch.iter().map(|t| t.pos).max().unwrap_or(0);
        scores.resize_with(pool.n_threads(), LineBuf::default);
        for sc in scores.iter_mut() {
            sc.grow(self.group() * ops::score_row(max_pos + 1));
        }
        let scores = SendPtr(scores.as_mut_ptr());
        let jobs = self.batch.len() * c.n_head_kv;
        pool.run(jobs.min(4 * pool.n_threads()), &|task, n_tasks, thread| {
            let (a, b) = share(jobs, task, n_tasks, 1);
            // SAFETY: a thread uses only its own scores buffer, and a task
            // only the outputs of its own (token, kv head) range.
            let sc = unsafe { &mut *scores.get().add(thread) };
            for job in a..b {
                let (t, kh) = (job / c.n_head_kv, job % c.n_head_kv);
                let heads = self.heads(t, kh);
                let o = unsafe {
                    std::slice::from_raw_parts_mut(self.out.get().add(heads.start), heads.len())
                };
                let pos = self.batch[t].pos;
                ops::attend_group(self.isa, &self.q[heads], self.cache(t, kh), pos, sc, o);
            }
        });
    }

    /// One job: first the scores of every (token, kv head, key block),
    /// split evenly, then the mix of every (token, kv head, `MIX_CHUNKS`
    /// chunks of 16 dimensions). The task that scores a pair's last key
    /// block softmaxes its rows; a mix task waits for the softmax of its
    /// pairs. Threads claim tasks in order, so every scores task has been
    /// claimed (and runs, waiting on nothing) before a mix task waits on
    /// it: no deadlock, and one dispatch per layer instead of three.
    fn split(&self, pool: &Pool, all: &mut LineBuf, progress: &mut Vec<(AtomicUsize, AtomicBool)>) {
        let c = self.c;
        let (n, hd) = (self.batch.len(), c.head_dim);
        let max_pos = self.batch.iter().map(|t| t.pos).max().unwrap_or(0);
        let row = ops::score_row(max_pos + 1);
        let scores = SendPtr(all.grow(n * c.n_head * row).as_mut_ptr());
        let group_rows = |t: usize, kh: usize| (t * c.n_head + kh * self.group()) * row;
        let pairs = n * c.n_head_kv;
        if progress.len() < pairs {
            progress.resize_with(pairs, Default::default);
        }
        for (blocks, ready) in &progress[..pairs] {
            blocks.store(0, Ordering::Relaxed);
            ready.store(false, Ordering::Relaxed);
        }
        let progress = &progress[..pairs];
        // Set when a task panics, so that mix tasks stop waiting (the pool
        // reports the panic).
        let failed = AtomicBool::new(false);
        let blocks = |t: usize| ops::score_row(self.batch[t].pos + 1) / ops::KEY_BLOCK;
        let score_units: usize = (0..n).map(|t| blocks(t) * c.n_head_kv).sum();
        let score_tasks = (4 * pool.n_threads()).min(score_units);
        let chunks = hd / 16;
        let per_pair = chunks.div_ceil(MIX_CHUNKS);
        let mix_tasks = pairs * per_pair;
        pool.run(score_tasks + mix_tasks, &|task, _, _| {
            let _guard = FailOnPanic(&failed);
            if task < score_tasks {
                let (a, b) = share(score_units, task, score_tasks, 1);
                let mut first = 0;
                for (pair, (done, ready)) in progress.iter().enumerate() {
                    let (t, kh) = (pair / c.n_head_kv, pair % c.n_head_kv);
                    let nb = blocks(t);
                    let run = a.max(first)..b.min(first + nb);
                    first += nb;
                    if run.is_empty() {
                        continue;
                    }
                    let blk = run.start - (first - nb)..run.end - (first - nb);
                    let heads = self.heads(t, kh);
                    let sp = group_rows(t, kh);
                    // SAFETY: each task writes the scores of its own key
                    // blocks; the buffer holds every group's rows.
                    unsafe {
                        let p = scores.get().add(sp);
                        ops::attn_scores(self.isa, &self.q[heads], self.cache(t, kh), blk, row, p);
                    }
                    // The last to finish sees every block (AcqRel) and
                    // softmaxes the rows.
                    if done.fetch_add(run.len(), Ordering::AcqRel) + run.len() == nb {
                        let len = self.batch[t].pos + 1;
                        for h in 0..self.group() {
                            // SAFETY: every block of the pair is scored and
                            // no other task touches its rows until `ready`.
                            unsafe {
                                ops::softmax(std::slice::from_raw_parts_mut(
                                    scores.get().add(sp + h * row),
                                    len,
                                ))
                            };
                        }
                        ready.store(true, Ordering::Release);
                    }
                    if first >= b {
                        break;
                    }
                }
                return;
            }
            let u = task - score_tasks;
            let (pair, part) = (u / per_pair, u % per_pair);
            let (t, kh) = (pair / c.n_head_kv, pair % c.n_head_kv);
            let run = part * MIX_CHUNKS..((part + 1) * MIX_CHUNKS).min(chunks);
            let mut spins = 0u32;
            while !progress[pair].1.load(Ordering::Acquire) && !failed.load(Ordering::Relaxed) {
                spins += 1;
                if spins < 1 << 14 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            let heads = self.heads(t, kh);
            let len = self.batch[t].pos + 1;
            // SAFETY: the pair's rows are final (`ready`, Acquire); each
            // task writes its own chunks of the output.
            unsafe {
                let p = std::slice::from_raw_parts(
                    scores.get().add(group_rows(t, kh)),
                    self.group() * row,
                );
                ops::attn_mix(
                    self.isa,
                    p,
                    row,
                    len,
                    self.cache(t, kh),
                    run,
                    true,
                    self.out.get().add(heads.start),
                );
            }
        });
    }
}
