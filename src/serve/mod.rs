//! The HTTP server: an OpenAI-compatible API, the web chat page, health,
//! metrics and the cluster view.
//!
//! - [`api`]: request and response shapes, and the checks on requests.
//! - [`scheduler`]: the compute thread, which owns the [`Engine`] and runs
//!   continuous batching over the queued requests.
//! - [`http`]: the axum routes, limits, API key and error mapping.
//! - [`metrics`]: counters and histograms in Prometheus' text format.
//! - [`page`]: the chat page, embedded from `assets/`.
//! - [`discovery`]: the mDNS announcement of the endpoint for clients.
//!
//! A single node serves alone for now, as its own leader; in a cluster a
//! follower will forward completion requests to the leader, and
//! `/v1/cluster` will list every node (the shapes already allow it).
//!
//! # Threads
//!
//! The tokio runtime's workers only parse, tokenize and move bytes. One
//! dedicated OS thread owns the engine; requests reach it through a bounded
//! queue and it answers each through that request's own bounded channel.

pub mod api;
pub mod cluster;
pub mod discovery;
pub mod http;
pub mod metrics;
pub mod page;
pub mod scheduler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::engine::offload::{Budget, LoadMode};
use crate::engine::EngineError;
use crate::model::chat::{ChatError, TemplateChoice};
use crate::model::tokenizer::TokenizerError;

/// Limits that protect the server from its clients; each is configurable.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bodies larger than this are refused with 413 on every route.
    pub body_bytes: usize,
    /// A client must send a request's headers within this time, or the
    /// connection is closed (slowloris); also bounds an idle keep-alive.
    pub header_timeout: Duration,
    /// A streaming client that takes none of its output for this long is
    /// cut off and its sequence leaves the batch.
    pub sse_stall: Duration,
    /// Requests handled at once on the routes behind the limiter (all but
    /// `/health` and the page).
    pub concurrent_requests: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            body_bytes: 2 << 20,
            header_timeout: Duration::from_secs(10),
            sse_stall: Duration::from_secs(30),
            concurrent_requests: 512,
        }
    }
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub addr: SocketAddr,
    /// When set, every route but `/health` and the page needs
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Sequences decoded together at most (the pipeline's capacity).
    pub max_batch: usize,
    /// Requests waiting for a place in the batch; `None` is twice
    /// `max_batch`.
    pub queue: Option<usize>,
    /// Tokens a sequence may hold; `None` is the model's context.
    pub context: Option<usize>,
    pub threads: usize,
    /// Run under a memory budget: (budget, load mode, slots).
    pub memory: Option<(Budget, LoadMode, usize)>,
    /// Under a budget, adapt the resident set to the KV cache as it grows
    /// (`engine::adapt`); without, the KV of `max_batch` full-context
    /// sequences is reserved up front (the fixed reservation).
    pub adapt: bool,
    /// The node's database (adaptation state); `None` is the default
    /// directory.
    pub data_dir: Option<PathBuf>,
    pub template: TemplateChoice,
    pub limits: Limits,
    /// Announce the endpoint over mDNS (never for a loopback address).
    pub mdns: bool,
}

impl ServeConfig {
    pub fn queue_depth(&self) -> usize {
        self.queue.unwrap_or(2 * self.max_batch)
    }

    /// The model's name in the API: its file name without `.gguf`.
    pub fn model_name(&self) -> String {
        let name = self
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        name.strip_suffix(".gguf").unwrap_or(&name).to_string()
    }
}

/// Everything that can go wrong while serving; [`http`] maps each variant
/// to a status and OpenAI's error shape in one place.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("invalid JSON body: {0}")]
    BadJson(String),
    #[error("invalid parameter `{param}`: {message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    #[error(
        "this model's maximum context length is {limit} tokens; the prompt has {prompt} tokens \
         and max_tokens is {max_tokens} ({} in all): shorten the prompt or lower max_tokens",
        prompt + max_tokens
    )]
    ContextExceeded {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error(
        "the prompt has {prompt} tokens and max_tokens is {max_tokens}: under this node's memory \
         budget a sequence can hold at most {limit} tokens of KV cache"
    )]
    MemoryExceeded {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("--context {asked} is longer than the model's context of {model} tokens")]
    ContextTooLong { asked: usize, model: usize },
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("a valid API key is required: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("the request queue is full ({depth} waiting): retry later")]
    QueueFull { depth: usize },
    #[error("the server is busy: too many requests at once")]
    Busy,
    #[error("the model is not ready yet")]
    NotReady,
    #[error("no route for {0}")]
    NotFound(String),
    #[error(transparent)]
    Template(#[from] ChatError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("the cluster refused the request: {0}")]
    Refused(String),
    #[error("the cluster cannot serve: {0}")]
    ClusterUnavailable(String),
    #[error("loading the model: {0}")]
    Load(#[from] EngineError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves until the process ends. `on_listening` is called with the bound
/// address once the socket listens (the model may still be loading).
pub fn run(
    config: ServeConfig,
    on_listening: impl FnOnce(SocketAddr) + Send + 'static,
) -> Result<(), ServeError> {
    // One worker: the runtime only parses and moves bytes, and on a small
    // device more workers steal cores from the compute pool's threads (on
    // 2 cores, 2 workers cut the aggregate tok/s of 8 clients by 2.5x).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("loip-http")
        .build()?;
    runtime.block_on(http::serve(
        Arc::new(config),
        http::Backend::Local,
        on_listening,
    ))
}

/// This machine's host name, as the node's id for now.
pub fn node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
