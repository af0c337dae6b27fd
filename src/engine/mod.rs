//! The local engine: decoder layers, KV cache, generation loops.

pub mod adapt;
pub mod bench;
pub mod forward;
pub mod generate;
pub mod kv;
pub mod loader;
pub mod offload;
pub mod profile;
pub mod reference;
pub mod sampler;
pub mod session;
pub mod textgen;
pub mod weights;
pub mod window;

use thiserror::Error;

use crate::model::config::ConfigError;
use crate::model::dtype::DtypeError;
use crate::model::gguf::GgufError;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Dtype(#[from] DtypeError),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("token id {id} is outside the vocabulary (0..{vocab})")]
    TokenOutOfRange { id: u64, vocab: usize },
    #[error("the context is full: the model holds {limit} positions")]
    ContextFull { limit: usize },
    #[error(
        "the prompt ({prompt} tokens) plus {max_tokens} new tokens exceeds the context of {limit}"
    )]
    PromptTooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error(transparent)]
    Budget(#[from] offload::BudgetError),
    #[error("reading {0}: {1}")]
    Read(String, String),
    #[error("tensor {0} is not resident")]
    NotResident(String),
    #[error("cannot allocate memory for the weights: {0}")]
    Memory(std::io::Error),
    #[error("bad batch: {0}")]
    Batch(String),
}
