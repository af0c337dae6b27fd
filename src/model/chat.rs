//! Chat templates: the model's own `tokenizer.chat_template` (a Jinja
//! template written for HF transformers), rendered with minijinja.
//!
//! The environment mirrors the one transformers renders with: `trim_blocks`
//! and `lstrip_blocks` on, `loop_controls`, Python string and dict methods
//! (`.strip()`, `.items()`, …), `raise_exception(msg)`, and the variables
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token`. Models
//! without a template get ChatML. `strftime_now` is not provided: templates
//! that use it test `is defined` and fall back to a fixed date, which keeps a
//! prompt's tokens the same from one day to the next.
//!
//! [`TemplateChoice`] picks between the model's template and plain ChatML;
//! its default follows llama.cpp.

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::gguf::{GgufError, Metadata, OptionalKey};
use crate::model::tokenizer::Tokenizer;

/// The metadata key of the template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// ChatML, for models that carry no template.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages -%}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/// Template instructions one render may run: a bound on what a hostile
/// template can make us do, far above what a chat of any length needs.
const RENDER_FUEL: u64 = 50_000_000;

/// Name of the template inside its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Errors from loading or rendering a chat template.
#[derive(Debug, Error)]
pub enum ChatError {
    /// `tokenizer.chat_template` is not a string.
    #[error("chat template metadata: {0}")]
    Metadata(#[from] GgufError),
    /// The template does not parse.
    #[error("chat template does not compile: {0}")]
    Compile(#[source] minijinja::Error),
    /// Rendering failed; with `raise_exception`, its message is in here.
    #[error("chat template failed to render: {0}")]
    Render(#[source] minijinja::Error),
}

/// Who wrote a message. Serialized in lowercase (`"user"`); any other role is
/// a deserialization error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name as templates see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a chat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }
}

/// Which template renders a model's chats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TemplateChoice {
    /// As llama.cpp, the reference implementation, chooses: plain ChatML
    /// when the model's template is ChatML-shaped (see
    /// [`is_chatml_shaped`]), the model's own template otherwise, ChatML when
    /// the model has none. SmolLM2's template, for one, adds a default system
    /// message that llama.cpp's ChatML does not.
    #[default]
    Auto,
    /// The model's own template, as its model card renders chats (ChatML
    /// when the model has none).
    Model,
    /// Plain ChatML, whatever the model carries.
    Chatml,
}

impl TemplateChoice {
    /// The names [`TemplateChoice::from_name`] accepts.
    pub const NAMES: [&'static str; 3] = ["auto", "model", "chatml"];

    /// The choice for `auto`, `model` or `chatml`.
    pub fn from_name(name: &str) -> Option<TemplateChoice> {
        match name {
            "auto" => Some(TemplateChoice::Auto),
            "model" => Some(TemplateChoice::Model),
            "chatml" => Some(TemplateChoice::Chatml),
            _ => None,
        }
    }
}

/// Whether llama.cpp would render chats for this template with its
/// built-in ChatML: the template writes `<|im_start|>` and none of the
/// markers of the ChatML variants llama.cpp tells apart (`<|im_sep|>` of
/// Phi-4, `<end_of_utterance>` of SmolVLM).
pub fn is_chatml_shaped(source: &str) -> bool {
    source.contains("<|im_start|>")
        && !source.contains("<|im_sep|>")
        && !source.contains("<end_of_utterance>")
}

/// A compiled chat template with the model's BOS and EOS texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The model's template from `tokenizer.chat_template`, or ChatML when it
    /// has none; `bos_token` and `eos_token` are the texts of the tokenizer's
    /// BOS and EOS (empty when it has none).
    pub fn from_gguf(meta: &Metadata, tokenizer: &Tokenizer) -> Result<ChatTemplate, ChatError> {
        ChatTemplate::for_model(meta, tokenizer, TemplateChoice::Model)
    }

    /// The template `choice` picks for a model; `bos_token` and `eos_token`
    /// as in [`ChatTemplate::from_gguf`].
    pub fn for_model(
        meta: &Metadata,
        tokenizer: &Tokenizer,
        choice: TemplateChoice,
    ) -> Result<ChatTemplate, ChatError> {
        let source = meta.get_str(CHAT_TEMPLATE_KEY).optional()?;
        let use_chatml = match choice {
            TemplateChoice::Auto => source.is_none_or(is_chatml_shaped),
            TemplateChoice::Model => source.is_none(),
            TemplateChoice::Chatml => true,
        };
        let text = |id: Option<u32>| id.and_then(|id| tokenizer.token_text(id)).unwrap_or("");
        ChatTemplate::new(
            match source {
                Some(s) if !use_chatml => s,
                _ => CHATML_TEMPLATE,
            },
            text(tokenizer.bos()),
            text(tokenizer.eos()),
        )
    }

    /// ChatML with the given BOS and EOS texts.
    pub fn chatml(bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        ChatTemplate::new(CHATML_TEMPLATE, bos_token, eos_token)
    }

    /// Compiles a template.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        let mut syntax = SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(ChatError::Compile)?);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(ChatError::Compile)?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a chat to prompt text; `add_generation_prompt` appends the
    /// opening of the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatError::Render)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(ChatError::Render)
    }
}

/// `raise_exception(message)`: transformers' way for a template to refuse a
/// chat (say, roles that do not alternate). Fails the render with `message`.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}
