//! Compute backends: kernels on quantized blocks with f32 activations.

pub mod cpu;
