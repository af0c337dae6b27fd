//! A conversation: the history of messages, and an answer to each new one.
//!
//! Every answer renders the whole history with the chat template, encodes
//! it and generates from a fresh cache. Reusing the previous turn's cache
//! would prefill the new part in chunks that depend on where the last turn
//! ended, and chunking must depend on the prompt alone (DESIGN.md §2): this
//! way an answer is exactly what a one-shot request for the same history
//! gives.

use std::sync::atomic::AtomicBool;

use serde::Serialize;
use thiserror::Error;

use super::generate::Engine;
use super::sampler::SamplingParams;
use super::textgen::{Completion, Request, TextGenError};
use crate::model::chat::{ChatError, ChatMessage, ChatTemplate, Role};
use crate::model::tokenizer::{Tokenizer, TokenizerError};

/// Errors from one turn of a conversation. The turn's message is not kept.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The template failed to render the history.
    #[error(transparent)]
    Template(#[from] ChatError),
    /// The rendered history could not be encoded.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Generation failed, or a sampling parameter is invalid.
    #[error(transparent)]
    Generate(#[from] TextGenError),
    /// The history no longer fits the model's context.
    #[error(
        "the conversation is {tokens} tokens, more than the model's context of {context}: \
         start a new chat"
    )]
    TooLong { tokens: usize, context: usize },
}

/// One answer.
#[derive(Clone, Debug, Serialize)]
pub struct Turn {
    /// The history as the template rendered it, the opening of the answer
    /// included.
    pub prompt: String,
    #[serde(flatten)]
    pub completion: Completion,
}

/// A conversation with one model.
pub struct ChatSession {
    engine: Engine,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    params: SamplingParams,
    messages: Vec<ChatMessage>,
}

impl ChatSession {
    /// An empty conversation. `params.max_tokens` bounds each answer; an
    /// answer for which the context has less room runs to the end of the
    /// context instead.
    pub fn new(
        engine: Engine,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        params: SamplingParams,
    ) -> Result<ChatSession, SessionError> {
        params.validate().map_err(TextGenError::from)?;
        Ok(ChatSession {
            engine,
            tokenizer,
            template,
            params,
            messages: Vec::new(),
        })
    }

    /// Adds a message to the history without answering it (a system
    /// message, or earlier turns).
    pub fn push(&mut self, message: ChatMessage) {
        self.messages.push(message);
    }

    /// The history.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Answers `user`, handing each piece of the answer to `on_text` as it
    /// is produced. The message and the answer join the history, also when
    /// the answer was cancelled (the part given so far) or cut short. On an
    /// error the history is left as it was.
    pub fn reply(
        &mut self,
        user: &str,
        cancel: Option<&AtomicBool>,
        on_text: impl FnMut(&str),
    ) -> Result<Turn, SessionError> {
        self.messages.push(ChatMessage::new(Role::User, user));
        let turn = self.answer(cancel, on_text);
        match &turn {
            Ok(t) => {
                let text = t.completion.text.clone().unwrap_or_default();
                self.messages.push(ChatMessage::new(Role::Assistant, text));
            }
            Err(_) => {
                self.messages.pop();
            }
        }
        turn
    }

    fn answer(
        &mut self,
        cancel: Option<&AtomicBool>,
        on_text: impl FnMut(&str),
    ) -> Result<Turn, SessionError> {
        let prompt = self.template.render(&self.messages, true)?;
        let ids = self.tokenizer.encode_prompt(&prompt)?;
        let context = self.engine.model().config.context_length;
        if ids.len() > context {
            return Err(SessionError::TooLong {
                tokens: ids.len(),
                context,
            });
        }
        // Tokens that fit after the prompt: the last one is never fed back.
        let room = context + 1 - ids.len();
        let params = SamplingParams {
            max_tokens: self.params.max_tokens.filter(|&n| n <= room),
            ..self.params.clone()
        };
        let request = Request {
            prompt: &ids,
            params: &params,
            cancel,
        };
        let completion = self
            .engine
            .generate_text(&self.tokenizer, &request, on_text)?;
        Ok(Turn { prompt, completion })
    }
}
