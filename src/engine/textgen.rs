//! Sampled generation: prompt ids in, tokens and text out, one token at a
//! time.
//!
//! [`Engine::generate_text`] prefills the prompt, then draws each token with
//! a [`Sampler`] and feeds it to a [`TextStream`], handing every newly final
//! piece of text to a callback as it appears (for `--stream` and chat). It
//! stops at an end-of-generation or stop token, a stop string, `max_tokens`,
//! the end of the context, or when the caller's cancel flag is set.
//! [`Engine::generate_ids`] is the same loop without a tokenizer.
//!
//! At temperature 0 the sampler takes the largest logit, the lowest id on
//! ties, as [`Engine::generate_greedy`] does: the same prompt gives the same
//! tokens through either.
//!
//! # Cancellation
//!
//! The flag is read before each token is chosen, so a cancelled request ends
//! within one decode step; the prompt's prefill is not interrupted. What was
//! generated until then is returned, with [`FinishReason::Cancelled`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Serialize, Serializer};
use thiserror::Error;

use super::forward::TokenIn;
use super::generate::{Engine, Timings};
use super::sampler::{FinishReason, Sampler, SamplingError, SamplingParams, TextStream};
use super::EngineError;
use crate::model::tokenizer::Tokenizer;

/// Errors from a generation request.
#[derive(Debug, Error)]
pub enum TextGenError {
    /// A sampling parameter is invalid (the message names it).
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The prompt does not fit, or the forward pass failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The tokenizer and the model disagree on the vocabulary.
    #[error(
        "the tokenizer has {tokenizer} tokens but the model's vocabulary has {model}: \
         they do not belong together"
    )]
    VocabMismatch { tokenizer: usize, model: usize },
}

/// What to generate from.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The prompt's token ids.
    pub prompt: &'a [u32],
    /// How to choose tokens and when to stop. With `max_tokens`, the prompt
    /// plus that many tokens must fit the context, or the request is refused
    /// up front; without it, generation may run to the end of the context.
    pub params: &'a SamplingParams,
    /// Read before each token; once set, generation ends.
    pub cancel: Option<&'a AtomicBool>,
}

impl<'a> Request<'a> {
    /// A request that cannot be cancelled.
    pub fn new(prompt: &'a [u32], params: &'a SamplingParams) -> Request<'a> {
        Request {
            prompt,
            params,
            cancel: None,
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// The result of a request.
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    pub prompt_ids: Vec<u32>,
    /// Every generated token, the one that stopped generation included.
    pub tokens: Vec<u32>,
    /// The text of `tokens`, without special tokens, stop tokens or stop
    /// strings; absent when generated without a tokenizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Serialized as [`FinishReason::as_str`].
    #[serde(serialize_with = "finish_name")]
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

fn finish_name<S: Serializer>(f: &FinishReason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.as_str())
}

impl Engine {
    /// Generates text. `on_text` receives each piece of text as soon as it
    /// is final (whole UTF-8 characters, never part of a stop string); the
    /// pieces add up to [`Completion::text`].
    pub fn generate_text(
        &mut self,
        tokenizer: &Tokenizer,
        request: &Request<'_>,
        mut on_text: impl FnMut(&str),
    ) -> Result<Completion, TextGenError> {
        let n_vocab = self.model().config.n_vocab;
        if tokenizer.vocab_size() != n_vocab {
            return Err(TextGenError::VocabMismatch {
                tokenizer: tokenizer.vocab_size(),
                model: n_vocab,
            });
        }
        let mut stream = TextStream::new(tokenizer, request.params);
        let mut text = String::new();
        let mut emit = |piece: &str| {
            if !piece.is_empty() {
                text.push_str(piece);
                on_text(piece);
            }
        };
        let mut completion = self.run(request, |id| {
            let step = stream.push(id);
            emit(step.text);
            step.finish
        })?;
        if stream.finish_reason().is_none() {
            // Cancelled, or the context is full: the stream still holds
            // what may have been the start of a character or stop string.
            emit(stream.finish());
        }
        completion.text = Some(text);
        Ok(completion)
    }

    /// Generates token ids without a tokenizer: stops at
    /// `params.stop_tokens`, `max_tokens`, the end of the context or a
    /// cancel. Stop strings need text and are ignored.
    pub fn generate_ids(&mut self, request: &Request<'_>) -> Result<Completion, TextGenError> {
        let stops = &request.params.stop_tokens;
        self.run(request, |id| {
            stops.contains(&id).then_some(FinishReason::StopToken(id))
        })
    }

    /// The loop: prefill, then sample, report each token to `on_token`
    /// (which may end generation), and feed it back.
    fn run(
        &mut self,
        request: &Request<'_>,
        mut on_token: impl FnMut(u32) -> Option<FinishReason>,
    ) -> Result<Completion, TextGenError> {
        let params = request.params;
        let prompt = request.prompt;
        let config = &self.model().config;
        let (n_vocab, context) = (config.n_vocab, config.context_length);
        let mut sampler = Sampler::new(params.clone(), n_vocab)?;
        self.check_prompt(prompt, params.max_tokens.unwrap_or(0))?;
        let limit = params.max_tokens.unwrap_or(usize::MAX);

        let mut cache = self.new_cache();
        self.reset_load_stats();
        let t0 = Instant::now();
        let mut logits = self.prefill(&mut cache, prompt, false)?;
        let prefill_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut tokens = Vec::new();
        let finish = loop {
            if request.cancelled() {
                break FinishReason::Cancelled;
            }
            // Penalties, when asked for, count the generated tokens (OpenAI's
            // rule).
            let next = sampler.sample(&logits, &tokens);
            tokens.push(next);
            if let Some(finish) = on_token(next) {
                break finish;
            }
            if tokens.len() >= limit {
                break FinishReason::MaxTokens;
            }
            if cache.len() >= context {
                break FinishReason::ContextFull;
            }
            let tok = TokenIn {
                id: next,
                seq: 0,
                pos: cache.len(),
            };
            let row = self.step(&[tok], std::slice::from_mut(&mut cache), &[0])?;
            logits.clear();
            logits.extend_from_slice(row);
        };
        let decode_s = t1.elapsed().as_secs_f64();
        // The first token comes from the prefill's logits: count only steps.
        let steps = tokens.len().saturating_sub(1);
        Ok(Completion {
            prompt_ids: prompt.to_vec(),
            tokens,
            text: None,
            finish_reason: finish,
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
        })
    }
}
