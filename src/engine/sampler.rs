//! Choosing the next token, and turning the chosen tokens into text.
//!
//! - [`Sampler`]: logits → token id, after [`SamplingParams`].
//! - [`Detokenizer`]: token ids → text, never splitting a UTF-8 character.
//! - [`StopMatcher`]: holds back text that may be the start of a stop string.
//! - [`TextStream`]: the three together, for a generation loop.
//!
//! # Sampling, step by step
//!
//! 1. Penalties, on every token that appears in `history` `c > 0` times
//!    (llama.cpp's `penalties` sampler; OpenAI's formula for the last two):
//!    - repetition (CTRL, as in llama.cpp and HF): a positive logit is divided
//!      by `repetition_penalty`, a negative one multiplied by it;
//!    - then `logit -= c * frequency_penalty + presence_penalty`.
//!
//!    `history` is whatever the caller passes: OpenAI counts the generated
//!    tokens, llama.cpp the last 64 tokens of prompt and output.
//! 2. `temperature == 0`: the largest logit wins, the lowest id on ties.
//!    Nothing else below applies, and no random number is drawn.
//! 3. Truncation, in llama.cpp's order, each on what the previous left, all
//!    at temperature 1 so that temperature never changes which tokens remain:
//!    `top_k` keeps the k largest logits; `top_p` keeps the smallest set of
//!    most likely tokens whose probability adds up to at least `top_p`;
//!    `min_p` keeps tokens at least `min_p` times as likely as the most likely.
//! 4. Logits are divided by `temperature`, turned into probabilities, and one
//!    token drawn with one 64-bit number from the generator.
//!
//! Ties are broken by id everywhere, so the outcome depends only on the
//! logits, the history, the parameters and the seed.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::model::tokenizer::Tokenizer;

/// At most this many stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// A stop string is at most this many bytes.
pub const MAX_STOP_LEN: usize = 1024;

/// An invalid sampling parameter.
#[derive(Debug, Error, Clone, PartialEq)]
#[error("invalid sampling parameter `{param}`: {reason}")]
pub struct SamplingError {
    /// The parameter's name, as in [`SamplingParams`].
    pub param: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

fn invalid(param: &'static str, reason: impl Into<String>) -> SamplingError {
    SamplingError {
        param,
        reason: reason.into(),
    }
}

/// How to choose tokens and when to stop. See the module documentation for
/// the exact semantics.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy; otherwise logits are divided by it. At least 0, finite.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Nucleus sampling, in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Relative probability floor, in [0, 1]; 0 disables.
    pub min_p: f32,
    /// Divides positive / multiplies negative logits of seen tokens; > 0,
    /// 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every seen token; in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of seen tokens; in [-2, 2].
    pub frequency_penalty: f32,
    /// Seed of the random generator; `None` takes one from the OS.
    pub seed: Option<u64>,
    /// Most tokens to generate; `None` leaves the limit to the context.
    pub max_tokens: Option<usize>,
    /// Generation stops before any of these strings; none of it is output.
    pub stop: Vec<String>,
    /// Tokens that stop generation besides the model's own end-of-generation
    /// tokens; their text is not output.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution (OpenAI's defaults).
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            stop_tokens: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Checks every parameter; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(invalid(
                "temperature",
                format!("{t}: must be finite and at least 0"),
            ));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid("top_p", format!("{p}: must be in (0, 1]")));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(invalid("min_p", format!("{m}: must be in [0, 1]")));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(invalid(
                "repetition_penalty",
                format!("{r}: must be finite and above 0 (1 disables it)"),
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(invalid(name, format!("{v}: must be in [-2, 2]")));
            }
        }
        if self.max_tokens == Some(0) {
            return Err(invalid("max_tokens", "0: must be at least 1"));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(invalid(
                "stop",
                format!("{} strings, at most {MAX_STOP_STRINGS}", self.stop.len()),
            ));
        }
        for s in &self.stop {
            if s.is_empty() {
                return Err(invalid("stop", "an empty stop string"));
            }
            if s.len() > MAX_STOP_LEN {
                return Err(invalid(
                    "stop",
                    format!("a stop string of {} bytes, at most {MAX_STOP_LEN}", s.len()),
                ));
            }
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// A sampling candidate: a token and its (adjusted) logit.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Most likely first; equal logits by lowest id. A total order, so sorting
/// and selection give the same result on every platform and Rust version.
fn by_rank(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Chooses tokens from logits. All buffers are allocated once, in
/// [`Sampler::new`]; [`Sampler::sample`] allocates nothing.
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    /// ChaCha8: its output for a seed is fixed by the algorithm, and
    /// rand_chacha promises the same stream across versions and platforms
    /// (unlike `StdRng`, which may change algorithm between releases).
    rng: ChaCha8Rng,
    logits: Vec<f32>,
    counts: Vec<u32>,
    seen: Vec<u32>,
    candidates: Vec<Candidate>,
    probs: Vec<f64>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab_size` tokens.
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Sampler, SamplingError> {
        params.validate()?;
        if vocab_size == 0 || vocab_size > u32::MAX as usize {
            return Err(invalid(
                "vocab_size",
                format!("{vocab_size}: must be in 1..=2^32-1"),
            ));
        }
        if let Some(&id) = params
            .stop_tokens
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(invalid(
                "stop_tokens",
                format!("token {id} is outside the vocabulary of {vocab_size}"),
            ));
        }
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Sampler {
            params,
            vocab_size,
            rng,
            logits: vec![0.0; vocab_size],
            counts: vec![0; vocab_size],
            seen: Vec::with_capacity(vocab_size),
            candidates: Vec::with_capacity(vocab_size),
            probs: Vec::with_capacity(vocab_size),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The logits after the penalties (step 1), NaN read as -∞. Ids in
    /// `history` outside the vocabulary are ignored.
    ///
    /// # Panics
    /// If `logits.len()` is not the vocabulary size.
    pub fn apply_penalties(&mut self, logits: &[f32], history: &[u32]) -> &[f32] {
        assert_eq!(
            logits.len(),
            self.vocab_size,
            "logits for {} tokens, the sampler's vocabulary has {}",
            logits.len(),
            self.vocab_size
        );
        for (dst, &src) in self.logits.iter_mut().zip(logits) {
            *dst = if src.is_nan() { f32::NEG_INFINITY } else { src };
        }
        if !self.params.has_penalties() {
            return &self.logits;
        }
        for &id in history {
            let Some(count) = self.counts.get_mut(id as usize) else {
                continue;
            };
            if *count == 0 {
                self.seen.push(id);
            }
            *count += 1;
        }
        let p = &self.params;
        for &id in &self.seen {
            let i = id as usize;
            let c = self.counts[i];
            let l = &mut self.logits[i];
            if *l > 0.0 {
                *l /= p.repetition_penalty;
            } else {
                *l *= p.repetition_penalty;
            }
            *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
            self.counts[i] = 0;
        }
        self.seen.clear();
        &self.logits
    }

    /// Makes the next draw the one the `n`-th token (from 0) of a sequence
    /// sampled with this seed makes. Every token sampled at a temperature
    /// above zero takes exactly one draw, so a sequence resumed after `n`
    /// tokens (on another node, or after a re-plan) draws what it would
    /// have drawn had it never stopped.
    pub fn resume_at(&mut self, n: u64) {
        // One draw is one u64: two of ChaCha's 32-bit words.
        self.rng.set_word_pos(2 * n as u128);
    }

    /// Chooses the next token; `history` is what the penalties look at.
    ///
    /// # Panics
    /// If `logits.len()` is not the vocabulary size.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.apply_penalties(logits, history);
        let argmax = argmax(&self.logits);
        if self.params.temperature == 0.0 {
            return argmax;
        }
        // 53 random bits: a uniform number in [0, 1). Drawn for every token
        // (see `resume_at`).
        let u = (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let max = self.logits[argmax as usize];
        if max.is_infinite() {
            // No distribution to draw from: +∞ takes all, all -∞ leaves none.
            return argmax;
        }

        self.candidates.clear();
        self.candidates.extend(
            self.logits
                .iter()
                .enumerate()
                .filter(|(_, l)| **l > f32::NEG_INFINITY)
                .map(|(id, &logit)| Candidate {
                    id: id as u32,
                    logit,
                }),
        );
        let p = &self.params;
        let mut sorted = false;
        if p.top_k > 0 && p.top_k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(p.top_k - 1, by_rank);
            self.candidates.truncate(p.top_k);
            self.candidates.sort_unstable_by(by_rank);
            sorted = true;
        }
        if p.top_p < 1.0 {
            if !sorted {
                self.candidates.sort_unstable_by(by_rank);
            }
            softmax(&self.candidates, 1.0, &mut self.probs);
            let total: f64 = self.probs.iter().sum();
            let target = p.top_p as f64 * total;
            let mut cumulative = 0.0;
            let mut keep = self.candidates.len();
            for (i, prob) in self.probs.iter().enumerate() {
                cumulative += prob;
                if cumulative >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }
        if p.min_p > 0.0 {
            // p_i >= min_p * p_max  ⇔  logit_i >= max_logit + ln(min_p).
            let floor = max + p.min_p.ln();
            self.candidates.retain(|c| c.logit >= floor);
        }

        softmax(&self.candidates, p.temperature, &mut self.probs);
        let total: f64 = self.probs.iter().sum();
        let target = u * total;
        let mut cumulative = 0.0;
        for (c, prob) in self.candidates.iter().zip(&self.probs) {
            cumulative += prob;
            if cumulative > target {
                return c.id;
            }
        }
        // Rounding left the target past the last sum: the last candidate.
        self.candidates.last().map_or(argmax, |c| c.id)
    }
}

/// Index of the largest value, the lowest on ties (-∞ everywhere gives 0).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Unnormalized probabilities `exp((logit - max) / temperature)`, in f64.
/// `exp` is the platform's libm, which may differ in the last bit between
/// platforms; the random stream does not.
fn softmax(candidates: &[Candidate], temperature: f32, out: &mut Vec<f64>) {
    out.clear();
    let max = candidates
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let t = temperature as f64;
    out.extend(
        candidates
            .iter()
            .map(|c| ((c.logit as f64 - max as f64) / t).exp()),
    );
}

/// Turns token ids into text one token at a time. A UTF-8 character whose
/// bytes span several tokens is emitted once all of them are in; bytes that
/// can never become valid UTF-8 are emitted as U+FFFD.
///
/// Each token's text is llama.cpp's `token_to_piece` for it: special tokens
/// give nothing, SentencePiece's `▁` is a space, and the leading space of the
/// first token is kept, as llama.cpp's generation does: the text continues a
/// prompt. [`Detokenizer::at_start`] instead drops it where
/// [`Tokenizer::decode`] would, for text that starts a sequence.
pub struct Detokenizer<'t> {
    tokenizer: &'t Tokenizer,
    pending: Vec<u8>,
    out: String,
    strip_space: bool,
}

impl<'t> Detokenizer<'t> {
    /// For text that continues a prompt.
    pub fn new(tokenizer: &'t Tokenizer) -> Detokenizer<'t> {
        Detokenizer {
            tokenizer,
            pending: Vec::with_capacity(8),
            out: String::new(),
            strip_space: false,
        }
    }

    /// For text from the start of a sequence: the leading space of a space
    /// prefix is dropped, unless the sequence starts with BOS (the rule of
    /// llama.cpp's `llama_detokenize`).
    pub fn at_start(tokenizer: &'t Tokenizer) -> Detokenizer<'t> {
        Detokenizer {
            strip_space: tokenizer.add_space_prefix(),
            ..Detokenizer::new(tokenizer)
        }
    }

    /// Adds a token; returns the text it completes (often empty for part of a
    /// character, or for a special token).
    pub fn push(&mut self, id: u32) -> &str {
        let tokenizer = self.tokenizer;
        let mut piece = tokenizer.piece(id, true);
        if self.strip_space {
            self.strip_space = false;
            if tokenizer.add_bos() && Some(id) == tokenizer.bos() {
                // llama.cpp keeps the space after a leading BOS.
            } else {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
        }
        self.pending.extend_from_slice(piece);
        self.out.clear();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(text) => {
                    self.out.push_str(text);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // The bytes up to `valid` were just checked.
                    self.out.push_str(
                        std::str::from_utf8(&self.pending[start..valid]).unwrap_or_default(),
                    );
                    match e.error_len() {
                        Some(bad) => {
                            self.out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        None => {
                            // An incomplete character at the end: wait.
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        &self.out
    }

    /// Ends the text: returns what is held back, an incomplete character
    /// becoming U+FFFD.
    pub fn finish(&mut self) -> &str {
        self.out.clear();
        self.out.push_str(&String::from_utf8_lossy(&self.pending));
        self.pending.clear();
        &self.out
    }
}

/// What [`StopMatcher::push`] lets out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopStep<'a> {
    /// Text that is safe to emit.
    pub text: &'a str,
    /// The index of the stop string that was found; the text ends before it.
    pub stopped: Option<usize>,
}

/// Finds stop strings in streamed text, across token boundaries. Text that
/// could be the start of a stop string is held back until it is known not to
/// be one, so no part of a stop string is ever emitted.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    out: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (validation rejects them).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            out: String::new(),
            stopped: None,
        }
    }

    /// Adds text; returns what can be emitted. After a stop, all text is
    /// dropped.
    pub fn push(&mut self, text: &str) -> StopStep<'_> {
        self.out.clear();
        if self.stopped.is_some() {
            return StopStep {
                text: &self.out,
                stopped: self.stopped,
            };
        }
        self.held.push_str(text);
        // The earliest occurrence wins; at one position, the first listed.
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = found {
            self.out.push_str(&self.held[..at]);
            self.held.clear();
            self.stopped = Some(i);
        } else {
            let keep = self.partial_stop_len();
            let emit = self.held.len() - keep;
            self.out.push_str(&self.held[..emit]);
            self.held.drain(..emit);
        }
        StopStep {
            text: &self.out,
            stopped: self.stopped,
        }
    }

    /// Ends the text: returns what was held back (nothing after a stop).
    pub fn finish(&mut self) -> &str {
        self.out.clear();
        self.out.push_str(&self.held);
        self.held.clear();
        &self.out
    }

    /// The index of the stop string found, if any.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// Length of the longest end of the held text that begins a stop string.
    fn partial_stop_len(&self) -> usize {
        let held = self.held.as_str();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        for len in (1..longest.min(held.len() + 1)).rev() {
            let at = held.len() - len;
            if held.is_char_boundary(at) && self.stops.iter().any(|s| s.starts_with(&held[at..])) {
                return len;
            }
        }
        0
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation or stop token (not output).
    StopToken(u32),
    /// The text reached the stop string with this index (not output).
    StopString(usize),
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The sequence filled the model's context.
    ContextFull,
    /// The caller cancelled generation (Ctrl-C, a client that left).
    Cancelled,
}

impl FinishReason {
    /// A short name for output: `stop_token`, `stop_string`, `max_tokens`,
    /// `context_full` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::StopToken(_) => "stop_token",
            FinishReason::StopString(_) => "stop_string",
            FinishReason::MaxTokens => "max_tokens",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What [`TextStream::push`] gives for one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamStep<'a> {
    /// New text to show.
    pub text: &'a str,
    /// Set when this token ended generation; no more tokens should be pushed.
    pub finish: Option<FinishReason>,
}

/// Generated tokens to streamed text: detokenization, stop tokens, stop
/// strings and `max_tokens`, for one request.
pub struct TextStream<'t> {
    detokenizer: Detokenizer<'t>,
    stops: StopMatcher,
    stop_tokens: Vec<u32>,
    max_tokens: Option<usize>,
    generated: usize,
    finish: Option<FinishReason>,
    out: String,
}

impl<'t> TextStream<'t> {
    /// A stream that stops on the tokenizer's end-of-generation tokens and on
    /// `params.stop_tokens`, `params.stop` and `params.max_tokens`.
    pub fn new(tokenizer: &'t Tokenizer, params: &SamplingParams) -> TextStream<'t> {
        let mut stop_tokens: Vec<u32> = tokenizer.eog_ids().to_vec();
        stop_tokens.extend_from_slice(&params.stop_tokens);
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        TextStream {
            detokenizer: Detokenizer::new(tokenizer),
            stops: StopMatcher::new(&params.stop),
            stop_tokens,
            max_tokens: params.max_tokens,
            generated: 0,
            finish: None,
            out: String::new(),
        }
    }

    /// Adds a generated token. Once a step reports `finish`, further tokens
    /// give nothing.
    pub fn push(&mut self, id: u32) -> StreamStep<'_> {
        self.out.clear();
        if self.finish.is_some() {
            return StreamStep {
                text: &self.out,
                finish: self.finish,
            };
        }
        self.generated += 1;
        if self.stop_tokens.binary_search(&id).is_ok() {
            self.finish = Some(FinishReason::StopToken(id));
            self.flush();
        } else {
            let text = self.detokenizer.push(id);
            let step = self.stops.push(text);
            self.out.push_str(step.text);
            if let Some(i) = step.stopped {
                self.finish = Some(FinishReason::StopString(i));
            } else if self.max_tokens.is_some_and(|max| self.generated >= max) {
                self.finish = Some(FinishReason::MaxTokens);
                self.flush();
            }
        }
        StreamStep {
            text: &self.out,
            finish: self.finish,
        }
    }

    /// Ends the stream early (the context is full, the client left): returns
    /// the text still held back.
    pub fn finish(&mut self) -> &str {
        self.out.clear();
        if self.stops.stopped().is_none() {
            self.flush();
        }
        &self.out
    }

    /// Why generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Appends everything held back to `out`, checking it for stop strings.
    fn flush(&mut self) {
        let tail = self.detokenizer.finish();
        let step = self.stops.push(tail);
        self.out.push_str(step.text);
        if let Some(i) = step.stopped {
            self.finish = Some(FinishReason::StopString(i));
        } else {
            self.out.push_str(self.stops.finish());
        }
    }
}
