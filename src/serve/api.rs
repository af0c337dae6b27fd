//! OpenAI's request and response shapes, and the checks a request passes
//! before it is queued.
//!
//! Requests are hostile input: the body is parsed by `serde_json` (whose
//! recursion limit refuses deeply nested JSON), unknown fields are ignored
//! as OpenAI clients send many, and every parameter we use is checked here,
//! so that the scheduler only ever sees a request it can run to the end.

use serde::{Deserialize, Serialize};

use super::ServeError;
use crate::engine::sampler::{FinishReason, SamplingParams};
use crate::model::chat::{ChatMessage, Role};

/// At most this many stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// `max_tokens` when the request names none.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's `content`: text, or a list of parts of which only text is
/// understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (`developer` is taken as `system`,
    /// as OpenAI does for older models); any other role is refused.
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The parameters common to both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: Common,
}

/// `prompt`: one string, or a list holding one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub common: Common,
}

/// Which endpoint a request came through: it decides the response shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A request's checked parameters.
#[derive(Clone, Debug)]
pub struct Checked {
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stream: bool,
    pub include_usage: bool,
}

fn bad(param: &'static str, message: impl Into<String>) -> ServeError {
    ServeError::InvalidParam {
        param,
        message: message.into(),
    }
}

/// Parses a JSON body; any failure is a 400 whose message says where.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ServeError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ServeError::BadJson(format!("the body is not valid UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| ServeError::BadJson(e.to_string()))
}

impl Common {
    /// Checks the parameters and builds the sampling parameters.
    pub fn check(&self) -> Result<Checked, ServeError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(bad("n", format!("n = {n}: only n = 1 is supported")));
            }
        }
        let max = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let max_tokens = match max {
            None => DEFAULT_MAX_TOKENS,
            Some((param, m)) if m < 1 => {
                return Err(bad(param, format!("{param} = {m}: must be at least 1")))
            }
            Some((_, m)) => usize::try_from(m).unwrap_or(usize::MAX),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(bad(
                "temperature",
                format!("temperature = {temperature}: must be between 0 and 2"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad("top_p", format!("top_p = {top_p}: must be in (0, 1]")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(bad(
                "stop",
                format!(
                    "{} stop strings: at most {MAX_STOP} are allowed",
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(|s| s.is_empty()) {
            return Err(bad("stop", "a stop string is empty"));
        }
        let params = SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed: self.seed.map(|s| s as u64),
            max_tokens: Some(max_tokens),
            stop,
            ..SamplingParams::default()
        };
        params.validate().map_err(|e| bad(e.param, e.to_string()))?;
        Ok(Checked {
            params,
            max_tokens,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

impl ChatRequest {
    /// The messages as the chat template takes them.
    pub fn chat(&self) -> Result<Vec<ChatMessage>, ServeError> {
        if self.messages.is_empty() {
            return Err(bad("messages", "the list of messages is empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => {
                        return Err(bad(
                            "messages",
                            format!(
                                "messages[{i}].role = {other:?}: unknown role \
                                 (expected system, developer, user or assistant)"
                            ),
                        ))
                    }
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(bad(
                                        "messages",
                                        format!(
                                            "messages[{i}]: content part of type {kind:?} \
                                             is not supported (only text)"
                                        ),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(ChatMessage::new(role, content))
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn text(&self) -> Result<&str, ServeError> {
        match &self.prompt {
            Prompt::One(s) => Ok(s),
            Prompt::Many(v) if v.len() == 1 => Ok(&v[0]),
            Prompt::Many(v) => Err(bad(
                "prompt",
                format!("{} prompts: exactly one is supported", v.len()),
            )),
        }
    }
}

/// OpenAI's name for why generation ended.
pub fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::StopToken(_) | FinishReason::StopString(_) => "stop",
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        // The client left: nobody reads this.
        FinishReason::Cancelled => "stop",
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// The body of a whole (not streamed) response.
pub fn full_response(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: &str,
    usage: Usage,
) -> serde_json::Value {
    match endpoint {
        Endpoint::Chat => serde_json::json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }],
            "usage": usage,
        }),
        Endpoint::Completions => serde_json::json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }),
    }
}

/// One streamed chunk: `delta` text, or the end with `finish`; `first`
/// marks the chunk that opens a chat answer with its role.
pub fn chunk(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    delta: Option<&str>,
    finish: Option<&str>,
    first: bool,
) -> serde_json::Value {
    match endpoint {
        Endpoint::Chat => {
            let mut d = serde_json::Map::new();
            if first {
                d.insert("role".into(), "assistant".into());
            }
            if let Some(t) = delta {
                d.insert("content".into(), t.into());
            }
            serde_json::json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}],
            })
        }
        Endpoint::Completions => serde_json::json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": delta.unwrap_or(""), "logprobs": null,
                         "finish_reason": finish}],
        }),
    }
}

/// The chunk with usage that ends a stream with `include_usage`.
pub fn usage_chunk(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    usage: Usage,
) -> serde_json::Value {
    let object = match endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    serde_json::json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": [], "usage": usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(json: &str) -> Result<Checked, ServeError> {
        parse::<Common>(json.as_bytes())?.check()
    }

    #[test]
    fn parameters_are_checked() {
        assert_eq!(common("{}").unwrap().max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(common(r#"{"max_tokens": 7}"#).unwrap().max_tokens, 7);
        assert_eq!(
            common(r#"{"max_tokens": 7, "max_completion_tokens": 9}"#)
                .unwrap()
                .max_tokens,
            9
        );
        for bad in [
            r#"{"max_tokens": 0}"#,
            r#"{"max_tokens": -1}"#,
            r#"{"max_tokens": 1e9}"#,
            r#"{"n": 2}"#,
            r#"{"n": -1}"#,
            r#"{"temperature": -0.5}"#,
            r#"{"temperature": 3}"#,
            r#"{"temperature": "hot"}"#,
            r#"{"top_p": 0}"#,
            r#"{"stop": ["a","b","c","d","e"]}"#,
            r#"{"stop": [""]}"#,
            r#"{"temperature": NaN}"#,
        ] {
            assert!(common(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn roles_and_messages() {
        let r: ChatRequest = parse(br#"{"messages": []}"#).unwrap();
        assert!(r.chat().unwrap_err().to_string().contains("empty"));
        let r: ChatRequest =
            parse(br#"{"messages": [{"role": "wizard", "content": "x"}]}"#).unwrap();
        assert!(r.chat().unwrap_err().to_string().contains("unknown role"));
        let r: ChatRequest = parse(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.chat().unwrap()[0].content, "hi");
    }

    #[test]
    fn hostile_bodies_are_errors() {
        let deep = "[".repeat(100_000);
        assert!(parse::<ChatRequest>(deep.as_bytes()).is_err());
        assert!(parse::<ChatRequest>(b"{\"messages\": \"\xff\"}").is_err());
    }
}
