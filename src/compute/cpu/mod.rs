//! CPU kernels: matrix products on quantized blocks, and the other operators
//! of a Llama layer, with run-time ISA selection and a fixed reduction order.

// Kernels index lanes, rows and chunks by number: it reads like the maths.
#![allow(clippy::needless_range_loop)]

pub mod blocks;
pub mod lines;
pub mod matmul;
pub mod memread;
pub mod ops;
pub mod pool;
pub mod simd;

pub use lines::LineBuf;
pub use matmul::{matmul, QMatrix};
pub use pool::Pool;
pub use simd::Isa;
