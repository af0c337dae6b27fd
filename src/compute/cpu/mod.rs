//! CPU kernels: matrix products on quantized blocks, and the other operators
//! of a Llama layer, with run-time ISA selection and a fixed reduction order.

pub mod blocks;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod simd;

pub use matmul::{matmul, QMatrix};
pub use pool::Pool;
pub use simd::Isa;
