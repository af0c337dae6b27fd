//! The CUDA backend (cargo feature `cuda`): kernels from `kernels/`
//! compiled at run time by NVRTC and cached per device, the device and its
//! context, and weights read in place from host-registered memory where the
//! GPU shares the host's memory (Jetson; DESIGN.md §5).
//!
//! Everything is loaded at run time through cudarc (`dynamic-loading`):
//! building needs no CUDA toolkit, and a machine without a GPU gets errors,
//! never a panic, because the libraries are probed before cudarc uses them.
//!
//! What runs without a GPU (and is tested in CI): finding NVRTC, compiling
//! every unit to PTX, the PTX cache, NVRTC's log in compile errors, the
//! probe's error without a driver. What needs a GPU: [`device`] and [`uma`].

pub mod cache;
pub mod device;
pub mod kernels;
pub mod nvrtc;
pub mod uma;

use thiserror::Error;

pub use cache::{PtxCache, PtxSource};
pub use device::{probe, DeviceInfo, Gpu, WeightView};
pub use uma::{CopyStats, HostSlot, Registered};

/// What went wrong in the CUDA backend.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CudaError {
    /// The driver library (`libcuda.so`) cannot be loaded.
    #[error(
        "the CUDA driver library (libcuda.so) cannot be loaded: no NVIDIA driver on this machine"
    )]
    DriverMissing,
    /// The driver loads but reports no device.
    #[error("the CUDA driver reports no device")]
    NoDevice,
    /// NVRTC cannot be loaded.
    #[error("NVRTC not found: {0}")]
    NvrtcMissing(String),
    /// A kernel did not compile; `log` is NVRTC's.
    #[error("kernel {file} does not compile for {arch}:\n{log}")]
    Compile {
        file: String,
        arch: String,
        log: String,
    },
    /// Device memory ran out; the caller streams more layers instead.
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },
    /// A driver call failed.
    #[error("CUDA driver: {call}: {msg}")]
    Driver { call: &'static str, msg: String },
    /// Arguments that do not fit a kernel (a caller's bug, not input).
    #[error("CUDA kernel arguments: {0}")]
    Shape(String),
}

impl CudaError {
    fn driver(call: &'static str, e: cudarc::driver::DriverError) -> CudaError {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return CudaError::OutOfMemory { bytes: 0 };
        }
        CudaError::Driver {
            call,
            msg: format!("{e:?}"),
        }
    }
}
