//! The one error type of the `plan` module.

use std::path::PathBuf;

use thiserror::Error;

use super::Planner;

/// What went wrong while reading device files, building a model shape,
/// planning or simulating.
#[derive(Debug, Error)]
pub enum PlanError {
    /// A device file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A device file is not TOML.
    #[error("{}: not valid TOML: {message}", path.display())]
    Toml { path: PathBuf, message: String },
    /// A device file has a missing, unknown or impossible field.
    #[error("{}: field `{field}`: {problem}", path.display())]
    DeviceField {
        path: PathBuf,
        field: String,
        problem: String,
    },
    /// Two devices of one problem share a name: a plan names its devices.
    #[error("two devices are named `{0}`: device names must be unique")]
    DuplicateDevice(String),
    /// The model has weights of a type the device's profile has no rate for.
    #[error(
        "device `{device}` has no compute rate for weights of type {dtype} (and no `default`)"
    )]
    MissingDtype { device: String, dtype: String },
    /// A link or pattern string on the command line is malformed.
    #[error("invalid {what} `{input}`: {problem}")]
    Parse {
        what: &'static str,
        input: String,
        problem: String,
    },
    /// A model shape with impossible figures.
    #[error("invalid model shape: {0}")]
    Model(String),
    /// A workload with impossible figures.
    #[error("invalid workload: {0}")]
    Workload(String),
    /// The problem is outside what the planner accepts (no devices, ...).
    #[error("invalid problem: {0}")]
    Problem(String),
    /// No plan of this planner fits the devices' memory.
    #[error(
        "{planner}: no plan fits in the devices' memory: the closest plan is \
         {shortfall_bytes} bytes ({:.2} GiB) over the budgets ({detail})",
        *shortfall_bytes as f64 / (1u64 << 30) as f64
    )]
    DoesNotFit {
        planner: Planner,
        shortfall_bytes: u64,
        detail: String,
    },
    /// A plan (for instance one received from a peer) is malformed.
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// A plan needs more memory on a device than its budget.
    #[error(
        "plan needs {need_bytes} bytes on device `{device}`, over its budget of {budget_bytes}"
    )]
    OverBudget {
        device: String,
        need_bytes: u64,
        budget_bytes: u64,
    },
    /// Profile measurements from which no coefficients can be fitted.
    #[error("cannot fit the cost model: {0}")]
    Fit(String),
    /// The engine failed while profiling or validating.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The node's database failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// This machine has no stored profile for the model.
    #[error(
        "no stored profile of this machine for {model}: run `loip profile --model {model}` first"
    )]
    NoProfile { model: String },
    /// Measuring this machine failed.
    #[error("profiling: {0}")]
    Profile(String),
}
