//! Compute backends: kernels on quantized blocks with f32 activations.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
