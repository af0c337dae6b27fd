//! Which compute backend runs the model: the `--backend` choice and its
//! resolution on this machine.
//!
//! `cpu` always works. `cuda` needs a build with the `cuda` feature, a
//! loadable driver (`libcuda`) and a device; without any of them it is an
//! error that says which is missing. `auto` takes the GPU when `cuda` would
//! work and falls back to the CPU otherwise, saying why in a log line.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// The backend asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// The CPU kernels (`compute::cpu`).
    #[default]
    Cpu,
    /// The CUDA kernels (`compute::cuda`), or an error.
    Cuda,
    /// CUDA when a usable GPU is found, else the CPU.
    Auto,
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(BackendChoice::Cpu),
            "cuda" => Ok(BackendChoice::Cuda),
            "auto" => Ok(BackendChoice::Auto),
            _ => Err(format!("unknown backend {s:?}: expected cpu, cuda or auto")),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Cpu => "cpu",
            BackendChoice::Cuda => "cuda",
            BackendChoice::Auto => "auto",
        })
    }
}

/// The backend that will run, after resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    /// A CUDA device, described (name, compute capability, memory model).
    Cuda(String),
}

/// Why the CUDA backend cannot run here.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// A build without the `cuda` cargo feature.
    #[error("this loip was built without CUDA support (rebuild with `cargo build --release --features cuda`)")]
    NotBuilt,
    /// No usable GPU: no driver library, no device, or the driver failed.
    #[error("no usable CUDA GPU: {0}")]
    NoGpu(String),
    /// A GPU is there, but the engine's forward pass does not run on it yet.
    #[error("CUDA device {0} found, but the engine's forward pass does not run on the GPU yet (issue #11); use --backend cpu or auto")]
    EngineNotWired(String),
}

/// Resolves `choice` on this machine. `auto` never fails: it logs why it
/// falls back to the CPU.
pub fn resolve(choice: BackendChoice) -> Result<Backend, BackendError> {
    resolve_with(choice, probe_gpu)
}

/// `resolve` with the GPU probe given, so the decision is testable without
/// hardware.
pub fn resolve_with(
    choice: BackendChoice,
    probe: impl FnOnce() -> Result<String, BackendError>,
) -> Result<Backend, BackendError> {
    match choice {
        BackendChoice::Cpu => Ok(Backend::Cpu),
        BackendChoice::Cuda => {
            let device = probe()?;
            // The kernels, the PTX cache and the weight mapping exist
            // (compute::cuda); the engine's layers are not wired to them yet.
            Err(BackendError::EngineNotWired(device))
        }
        BackendChoice::Auto => match probe() {
            Ok(device) => {
                log::warn!(
                    "backend auto: CUDA device {device} found, but the engine runs on the CPU until the GPU forward pass lands"
                );
                Ok(Backend::Cpu)
            }
            Err(e) => {
                log::warn!("backend auto: using the CPU: {e}");
                Ok(Backend::Cpu)
            }
        },
    }
}

/// Probes for a usable GPU: in a CUDA build, the driver library, a device
/// and a context; otherwise `NotBuilt`.
pub fn probe_gpu() -> Result<String, BackendError> {
    #[cfg(feature = "cuda")]
    {
        super::cuda::probe()
            .map(|info| info.to_string())
            .map_err(|e| BackendError::NoGpu(e.to_string()))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(BackendError::NotBuilt)
    }
}

/// Where a layer's weights live for a GPU that computes on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightHome {
    /// The mapped file (or streaming slot) itself, host-registered and read
    /// in place by the kernels: no copy (Jetson, unified memory).
    MappedHost,
    /// A copy in device memory (a discrete GPU).
    Device,
}

/// What a device reports about host memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryModel {
    /// CU_DEVICE_ATTRIBUTE_INTEGRATED: the GPU shares the host's DRAM.
    pub integrated: bool,
    /// CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING.
    pub unified_addressing: bool,
    /// CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY.
    pub can_map_host: bool,
}

impl MemoryModel {
    /// Resident weights are host-registered and read in place where the GPU
    /// shares memory with the host and can map it; a discrete GPU gets a
    /// device copy, since reading over PCIe on every product is slower than
    /// one copy. Streamed layers follow the same rule for their slots.
    pub fn weight_home(self) -> WeightHome {
        if self.integrated && self.unified_addressing && self.can_map_host {
            WeightHome::MappedHost
        } else {
            WeightHome::Device
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for c in [BackendChoice::Cpu, BackendChoice::Cuda, BackendChoice::Auto] {
            assert_eq!(c.to_string().parse::<BackendChoice>(), Ok(c));
        }
        assert_eq!("CUDA".parse::<BackendChoice>(), Ok(BackendChoice::Cuda));
        assert!("gpu"
            .parse::<BackendChoice>()
            .unwrap_err()
            .contains("cpu, cuda or auto"));
    }

    #[test]
    fn auto_falls_back_and_cuda_fails_without_a_gpu() {
        let none = || Err(BackendError::NoGpu("libcuda not found".into()));
        assert_eq!(resolve_with(BackendChoice::Auto, none), Ok(Backend::Cpu));
        assert_eq!(
            resolve_with(BackendChoice::Cuda, none),
            Err(BackendError::NoGpu("libcuda not found".into()))
        );
        assert_eq!(
            resolve_with(BackendChoice::Cpu, || unreachable!()),
            Ok(Backend::Cpu)
        );
        let gpu = || Ok("Orin (sm_87)".to_string());
        assert_eq!(resolve_with(BackendChoice::Auto, gpu), Ok(Backend::Cpu));
        assert!(matches!(
            resolve_with(BackendChoice::Cuda, gpu),
            Err(BackendError::EngineNotWired(_))
        ));
    }

    #[test]
    fn unified_memory_reads_weights_in_place() {
        let jetson = MemoryModel {
            integrated: true,
            unified_addressing: true,
            can_map_host: true,
        };
        assert_eq!(jetson.weight_home(), WeightHome::MappedHost);
        let discrete = MemoryModel {
            integrated: false,
            ..jetson
        };
        assert_eq!(discrete.weight_home(), WeightHome::Device);
        let no_map = MemoryModel {
            can_map_host: false,
            ..jetson
        };
        assert_eq!(no_map.weight_home(), WeightHome::Device);
    }
}
