//! The model as stored: GGUF files, block formats, hyper-parameters.

pub mod chat;
pub mod config;
pub mod dtype;
pub mod gguf;
pub mod inspect;
pub mod synth;
pub mod tokenizer;
