//! The benchmark behind `loip bench`: prefill speed of a prompt, then decode
//! speed of greedy steps after it, for one or several sequences decoded
//! together.
//!
//! The prompt ids are a pure function of the seed and the vocabulary, so two
//! runs (or two machines) measure the same work. Decoding never stops early:
//! the end-of-generation token is ignored, so every run does the same number
//! of steps.

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use super::forward::TokenIn;
use super::generate::{argmax, Engine};
use super::kv::KvCache;
use super::loader::LoadStats;
use super::offload::Placement;
use super::weights::Unit;
use super::EngineError;
use crate::compute::cpu::memread::ReadProbe;
use crate::compute::cpu::Isa;

/// Ids below this are left out of benchmark prompts: models keep their
/// special tokens (BOS, EOS, chat markers) at the start of the vocabulary.
pub const FIRST_PLAIN_ID: u32 = 17;

/// What to measure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchSpec {
    /// Prompt length of each sequence.
    pub prompt_tokens: usize,
    /// Decode steps after the prompt; each feeds one token per sequence.
    pub gen_tokens: usize,
    /// Sequences decoded together, one token each per step.
    pub batch: usize,
    /// Measured runs, after one unmeasured warm-up run.
    pub repeat: usize,
    /// Seed of the prompt ids.
    pub seed: u64,
    /// A model file whose pages are dropped from the page cache before each
    /// run (the mapped baseline starts cold).
    pub cold_file: Option<std::path::PathBuf>,
}

impl Default for BenchSpec {
    fn default() -> Self {
        BenchSpec {
            prompt_tokens: 512,
            gen_tokens: 128,
            batch: 1,
            repeat: 3,
            seed: 0x5EED,
            cold_file: None,
        }
    }
}

/// Median, minimum and maximum over the measured runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// One measured run. Token counts are summed over the batch.
#[derive(Clone, Debug, Serialize)]
pub struct RunTimes {
    /// Decode steps (each feeds one token per sequence).
    pub steps: usize,
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tokens: usize,
    pub decode_s: f64,
    pub decode_tok_s: f64,
    /// Loading during the decode steps, when units are streamed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_load: Option<LoadStats>,
}

/// The result of [`run`], serializable as `loip bench --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub isa: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub batch: usize,
    pub repeat: usize,
    /// Prompt tokens per second, all sequences' prefills together.
    pub prefill_tok_s: Stat,
    /// Aggregate decode tokens per second: `batch` tokens per step.
    pub decode_tok_s: Stat,
    /// Decode step time, seconds.
    pub step_s: Stat,
    /// Share of decode time spent waiting for streamed units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bubble_share: Option<Stat>,
    /// Storage read bandwidth the loader achieved, bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_bandwidth: Option<Stat>,
    /// Decode step time not spent waiting: compute alone, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_step_s: Option<Stat>,
    /// Where the memory went, when run under a budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Decode's reading rate against a plain read, when every weight is
    /// resident.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streaming: Option<Streaming>,
    pub runs: Vec<RunTimes>,
}

/// What a decode step reads, and how fast, against a plain read of as
/// many bytes on as many threads measured after each run. A shared
/// machine's bandwidth moves by tens of percent within an hour, so tok/s
/// from different hours do not compare; this share does, and it says how
/// far decode is from what memory gives.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Streaming {
    /// Every resident weight once, and the keys and values of the mean
    /// number of positions a step attends to.
    pub step_bytes: u64,
    /// `step_bytes` over the step time.
    pub decode_bytes_per_s: Stat,
    /// The plain read (`compute::cpu::memread`), three passes after each run.
    pub read_bytes_per_s: Stat,
    /// Decode's rate over the read's, run by run.
    pub share_of_read: Stat,
}

impl BenchReport {
    pub fn set_placement(&mut self, placement: Option<Placement>) {
        self.placement = placement;
    }

    /// The step-time bound max(compute, streamed bytes / read bandwidth),
    /// with the compute time given (e.g. measured all resident).
    pub fn bound_s(&self, compute_step_s: f64) -> Option<f64> {
        let p = self.placement.as_ref()?;
        let bw = self.read_bandwidth?.median;
        Some(compute_step_s.max(p.accounting.streamed_per_step as f64 / bw.max(1.0)))
    }
}

/// `len` deterministic prompt ids in `FIRST_PLAIN_ID..n_vocab`.
pub fn bench_prompt(n_vocab: usize, len: usize, seed: u64) -> Vec<u32> {
    let span = (n_vocab as u64)
        .saturating_sub(FIRST_PLAIN_ID as u64)
        .max(1);
    let mut state = seed;
    (0..len)
        .map(|_| {
            // SplitMix64: a fixed, well-mixed sequence for any seed.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            FIRST_PLAIN_ID + (z % span) as u32
        })
        .collect()
}

/// Checks the spec against the model before any work is done.
fn check(engine: &Engine, spec: &BenchSpec) -> Result<(), EngineError> {
    let c = &engine.model().config;
    for (name, v) in [
        ("prompt tokens", spec.prompt_tokens),
        ("generated tokens", spec.gen_tokens),
        ("batch", spec.batch),
        ("repeat", spec.repeat),
    ] {
        if v == 0 {
            return Err(EngineError::Batch(format!(
                "the benchmark's {name} must be at least 1"
            )));
        }
    }
    if c.n_vocab <= FIRST_PLAIN_ID as usize {
        return Err(EngineError::Batch(format!(
            "the vocabulary ({}) has no ids past the special ones (0..{FIRST_PLAIN_ID})",
            c.n_vocab
        )));
    }
    if spec.prompt_tokens.saturating_add(spec.gen_tokens) > c.context_length {
        return Err(EngineError::PromptTooLong {
            prompt: spec.prompt_tokens,
            max_tokens: spec.gen_tokens,
            limit: c.context_length,
        });
    }
    Ok(())
}

/// Runs one warm-up and `spec.repeat` measured runs.
pub fn run(engine: &mut Engine, spec: &BenchSpec) -> Result<BenchReport, EngineError> {
    check(engine, spec)?;
    let n_vocab = engine.model().config.n_vocab;
    let prompts: Vec<Vec<u32>> = (0..spec.batch as u64)
        .map(|s| bench_prompt(n_vocab, spec.prompt_tokens, spec.seed.wrapping_add(s)))
        .collect();
    // Only with every weight resident: streamed units are read from
    // storage, and the probe's memory would count against the budget.
    let probe = if engine.streamed_units().is_empty() {
        let bytes = step_bytes(engine, spec);
        let probe = ReadProbe::new(bytes as usize)
            .map_err(|e| EngineError::Read("the plain-read probe".into(), e.to_string()))?;
        Some((probe, bytes))
    } else {
        None
    };
    once(engine, spec, &prompts)?;
    let mut runs = Vec::with_capacity(spec.repeat);
    let mut reads = Vec::with_capacity(spec.repeat);
    for _ in 0..spec.repeat {
        runs.push(once(engine, spec, &prompts)?);
        if let Some((probe, _)) = &probe {
            reads.push(probe.bytes_per_s(engine.pool(), 3));
        }
    }
    let stat = |f: &dyn Fn(&RunTimes) -> f64| {
        let v: Vec<f64> = runs.iter().map(f).collect();
        Stat::of(&v).expect("repeat checked to be at least 1")
    };
    let streamed = runs
        .iter()
        .all(|r| r.decode_load.is_some_and(|l| l.units_read > 0));
    let load = |f: fn(&RunTimes, &LoadStats) -> f64| {
        streamed.then(|| stat(&|r: &RunTimes| f(r, &r.decode_load.expect("checked above"))))
    };
    let steps = spec.gen_tokens as f64;
    let streaming = probe.map(|(_, bytes)| {
        let rate = |r: &RunTimes| bytes as f64 * steps / r.decode_s.max(1e-9);
        let shares: Vec<f64> = runs.iter().zip(&reads).map(|(r, b)| rate(r) / b).collect();
        Streaming {
            step_bytes: bytes,
            decode_bytes_per_s: stat(&rate),
            read_bytes_per_s: Stat::of(&reads).expect("one read per run"),
            share_of_read: Stat::of(&shares).expect("one read per run"),
        }
    });
    Ok(BenchReport {
        isa: Isa::detect().name().to_string(),
        threads: engine.threads(),
        prompt_tokens: spec.prompt_tokens,
        gen_tokens: spec.gen_tokens,
        batch: spec.batch,
        repeat: spec.repeat,
        prefill_tok_s: stat(&|r| r.prefill_tok_s),
        decode_tok_s: stat(&|r| r.decode_tok_s),
        step_s: stat(&|r| r.decode_s / steps),
        bubble_share: load(|r, l| l.bubble_s / r.decode_s.max(1e-9)),
        read_bandwidth: load(|_, l| l.read_bandwidth()),
        compute_step_s: load(|r, l| (r.decode_s - l.bubble_s) / r.steps.max(1) as f64),
        placement: None,
        streaming,
        runs,
    })
}

/// Bytes a decode step of `spec` reads: every weight once (however many
/// sequences share the step), and each sequence's keys and values at the
/// mean position of its steps.
fn step_bytes(engine: &Engine, spec: &BenchSpec) -> u64 {
    let m = engine.model();
    let c = &m.config;
    let weights: u64 = Unit::all(c.n_layer)
        .into_iter()
        .map(|u| m.resident_bytes(u))
        .sum();
    // Step s (from 0) attends to prompt + s + 1 positions.
    let positions = spec.prompt_tokens as f64 + (spec.gen_tokens as f64 + 1.0) / 2.0;
    let kv = KvCache::bytes_per_position(c.n_layer, c.kv_dim()) as f64 * positions;
    weights + (kv * spec.batch as f64) as u64
}

/// One run: prefill every sequence, then `gen_tokens` batched greedy steps.
fn once(
    engine: &mut Engine,
    spec: &BenchSpec,
    prompts: &[Vec<u32>],
) -> Result<RunTimes, EngineError> {
    let n_vocab = engine.model().config.n_vocab;
    if let Some(path) = &spec.cold_file {
        super::offload::drop_page_cache(path)
            .map_err(|e| EngineError::Read(path.display().to_string(), e.to_string()))?;
    }
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| engine.new_cache()).collect();
    let mut next = Vec::with_capacity(prompts.len());
    let t0 = Instant::now();
    for (prompt, cache) in prompts.iter().zip(caches.iter_mut()) {
        let logits = engine.prefill(cache, prompt, false)?;
        next.push(argmax(&logits));
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    let want: Vec<usize> = (0..prompts.len()).collect();
    let mut batch: Vec<TokenIn> = Vec::with_capacity(prompts.len());
    engine.reset_load_stats();
    let t1 = Instant::now();
    for _ in 0..spec.gen_tokens {
        batch.clear();
        batch.extend(next.iter().enumerate().map(|(seq, &id)| TokenIn {
            id,
            seq,
            pos: caches[seq].len(),
        }));
        let logits = engine.step(&batch, &mut caches, &want)?;
        for (n, row) in next.iter_mut().zip(logits.chunks_exact(n_vocab)) {
            *n = argmax(row);
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let prefill_tokens = spec.prompt_tokens * prompts.len();
    let decode_tokens = spec.gen_tokens * prompts.len();
    Ok(RunTimes {
        steps: spec.gen_tokens,
        prefill_tokens,
        prefill_s,
        prefill_tok_s: prefill_tokens as f64 / prefill_s.max(1e-9),
        decode_tokens,
        decode_s,
        decode_tok_s: decode_tokens as f64 / decode_s.max(1e-9),
        decode_load: engine.load_stats(),
    })
}

/// The human-readable form `loip bench` prints.
impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "isa {}, {} thread{}, batch {}, {} run{} after a warm-up",
            self.isa,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.batch,
            self.repeat,
            if self.repeat == 1 { "" } else { "s" },
        )?;
        let line = |f: &mut fmt::Formatter<'_>, what: &str, tokens: usize, s: &Stat| {
            writeln!(
                f,
                "{what:<8} {tokens:>5} tokens  {:>9.1} tok/s  (min {:.1}, max {:.1})",
                s.median, s.min, s.max
            )
        };
        line(f, "prefill", self.prompt_tokens, &self.prefill_tok_s)?;
        line(f, "decode", self.gen_tokens, &self.decode_tok_s)?;
        writeln!(f, "step     {:>9.2} ms", self.step_s.median * 1e3)?;
        if let Some(p) = &self.placement {
            let a = &p.accounting;
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            writeln!(
                f,
                "budget   {:.1} MiB: resident {:.1}, slots {} x {:.1}, KV {:.1}, scratch {:.1} MiB; {} of {} units streamed, {:.1} MiB per step",
                mib(a.budget),
                mib(a.resident),
                p.slots,
                mib(a.slots / p.slots.max(1) as u64),
                mib(a.kv),
                mib(a.scratch),
                p.streamed.len(),
                p.streamed.len() + p.resident.len(),
                mib(a.streamed_per_step)
            )?;
        }
        if let Some(s) = &self.streaming {
            writeln!(
                f,
                "memory   a step reads {:.1} MB at {:.1} GB/s; a plain read of as many bytes on {} thread{} {:.1} GB/s (decode at {:.2} of it)",
                s.step_bytes as f64 / 1e6,
                s.decode_bytes_per_s.median / 1e9,
                self.threads,
                if self.threads == 1 { "" } else { "s" },
                s.read_bytes_per_s.median / 1e9,
                s.share_of_read.median
            )?;
        }
        if let (Some(b), Some(bw), Some(c)) =
            (self.bubble_share, self.read_bandwidth, self.compute_step_s)
        {
            writeln!(
                f,
                "loading  bubbles {:.1}% of decode time, storage {:.2} GB/s, compute {:.2} ms per step",
                b.median * 100.0,
                bw.median / 1e9,
                c.median * 1e3
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_is_deterministic_and_avoids_special_ids() {
        let a = bench_prompt(512, 300, 9);
        assert_eq!(a, bench_prompt(512, 300, 9));
        assert_ne!(a, bench_prompt(512, 300, 10));
        assert!(a.iter().all(|&id| (FIRST_PLAIN_ID..512).contains(&id)));
    }

    #[test]
    fn stat_takes_the_middle() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[4.0, 1.0]).unwrap().median, 2.5);
        assert!(Stat::of(&[]).is_none());
    }
}
