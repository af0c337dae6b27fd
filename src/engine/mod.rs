//! The local engine: decoder layers, KV cache, generation loop.

pub mod sampler;
