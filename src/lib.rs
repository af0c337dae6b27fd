//! loip: lossless LLM inference on a cluster of edge devices.
//!
//! Dependencies point one way: `model` ← `compute` ← `engine` ← `plan` ←
//! `cluster` ← `serve`; `net` and `store` are leaves used by `cluster` and
//! `serve`.

pub mod cluster;
pub mod compute;
pub mod engine;
pub mod model;
pub mod net;
pub mod plan;
pub mod serve;
pub mod store;
