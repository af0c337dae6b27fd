//! loip: lossless LLM inference on a cluster of edge devices.
//!
//! Dependencies point one way: `model` ← `compute` ← `engine` ← `plan` ←
//! `serve`.

pub mod compute;
pub mod engine;
pub mod model;
pub mod plan;
pub mod serve;
