//! Devices: what the cost model knows about one machine, and the two TOML
//! forms it is read from.
//!
//! # The compute model
//!
//! The time a device takes to run unit `u` for one micro-batch of `n`
//! tokens that together attend to `A` (query, key) pairs is
//!
//! ```text
//! t = o + o_n·n + Σ_type W_type(u) · max(m_type, n·c_type) + A · kv(u) · r
//! ```
//!
//! - `o` ([`ComputeModel::layer_overhead_s`]): fixed cost per unit and step
//!   (kernel launches, norms, synchronisation);
//! - `o_n` ([`ComputeModel::per_token_s`]): per-token cost of the small
//!   operations (RoPE, norms, residuals, sampling);
//! - `W_type(u)`: the unit's weight bytes of that type; `m_type`
//!   ([`WeightRate::s_per_byte`]) is the time to stream one byte of weights
//!   from memory, `c_type` ([`WeightRate::s_per_byte_token`]) the arithmetic
//!   time per byte and token. The `max` is a roofline: small batches are
//!   bound by memory bandwidth, large ones (and prefill chunks) by
//!   arithmetic. A measured device may give a finite exponent `p`
//!   ([`ComputeModel::roofline_exponent`]): the `max` becomes the soft
//!   maximum `(m^p + (n·c)^p)^(1/p)`, for hardware on which loading weights
//!   and arithmetic overlap only in part (a CPU: at 4 tokens a product
//!   already takes half as long again as at 1, where the sharp roofline
//!   says it takes no longer). `p = 1` is no overlap at all; without `p`,
//!   the sharp roofline;
//! - `kv(u)` the unit's KV bytes per token and `r`
//!   ([`ComputeModel::kv_s_per_byte`]) the time to read one byte of cache.
//!   A decode micro-batch of `b` sequences at context `s` has `A = b·s`; a
//!   prefill chunk of `n` tokens at offset `p` has `A = Σ_{i<n} (p+i+1)`.
//!
//! A profiler measures, per weight type, matrix products at 1 to 32 tokens
//! and prefill chunk sizes, and whole units at several batches and context
//! lengths; [`super::fit`] fits the coefficients by least squares. A spec
//! sheet gives them directly: `m = 1/(efficiency·memory bandwidth)`, and
//! `c = (2 FLOP per weight)/(bytes per weight·efficiency·FLOPS)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::model::dtype::GgmlType;

use super::model::UnitShape;
use super::PlanError;

const GIB: f64 = (1u64 << 30) as f64;

/// Per-byte rates for weights of one type.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightRate {
    /// Seconds to stream one byte of weights from memory (`m`).
    pub s_per_byte: f64,
    /// Seconds of arithmetic per byte of weights per token (`c`).
    pub s_per_byte_token: f64,
}

/// Fitted coefficients of the compute model (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComputeModel {
    /// `o`: seconds per unit per micro-batch.
    pub layer_overhead_s: f64,
    /// `o_n`: seconds per unit per token.
    pub per_token_s: f64,
    /// `r`: seconds per byte of KV cache attended.
    pub kv_s_per_byte: f64,
    /// Rates by GGML type name (`BF16`, `Q4_K`, ...); the key `default`
    /// covers types not listed.
    pub weights: BTreeMap<String, WeightRate>,
    /// `p` of the soft roofline (module docs), at least 1; `None`: the
    /// sharp roofline `max(m, n·c)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roofline_exponent: Option<f64>,
    /// Measured corrections of the weight term at these token counts: the
    /// kernels' tile shapes make some batch sizes dearer than any smooth
    /// roofline says (on a CPU, 16 tokens cost more than the average of 8
    /// and 32). Linear in between, the nearest one outside; none: 1.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub token_factors: BTreeMap<u32, f64>,
}

impl ComputeModel {
    /// The correction of the weight term at `tokens` (see
    /// [`ComputeModel::token_factors`]).
    pub fn token_factor(&self, tokens: u32) -> f64 {
        let below = self.token_factors.range(..=tokens).next_back();
        let above = self.token_factors.range(tokens..).next();
        match (below, above) {
            (Some((&a, &fa)), Some((&b, &fb))) if b > a => {
                fa + (fb - fa) * (tokens - a) as f64 / (b - a) as f64
            }
            (Some((_, &f)), _) | (None, Some((_, &f))) => f,
            (None, None) => 1.0,
        }
    }
}

/// Seconds per byte of weights at rate `r` for `n` tokens, with the
/// roofline exponent `p` (see the module docs).
pub(crate) fn seconds_per_byte(r: WeightRate, n: f64, p: Option<f64>) -> f64 {
    let (m, a) = (r.s_per_byte, n * r.s_per_byte_token);
    match p {
        None => m.max(a),
        Some(p) => {
            // (m^p + a^p)^(1/p), scaled by the larger term so that neither
            // overflows nor underflows.
            let hi = m.max(a);
            if hi <= 0.0 {
                return 0.0;
            }
            hi * ((m / hi).powf(p) + (a / hi).powf(p)).powf(1.0 / p)
        }
    }
}

impl ComputeModel {
    /// The rate for weights of type `dtype`, or the `default` rate.
    pub fn rate(&self, dtype: GgmlType) -> Option<WeightRate> {
        self.weights
            .get(dtype.name())
            .or_else(|| self.weights.get("default"))
            .copied()
    }

    /// Seconds to run `unit` for `tokens` tokens attending `attended` pairs.
    pub fn unit_seconds(&self, unit: &UnitShape, tokens: u32, attended: u64) -> Option<f64> {
        let n = tokens as f64;
        let mut weights = 0.0;
        for w in &unit.weights {
            let r = self.rate(w.dtype)?;
            weights += w.bytes as f64 * seconds_per_byte(r, n, self.roofline_exponent);
        }
        Some(
            self.layer_overhead_s
                + self.per_token_s * n
                + weights * self.token_factor(tokens)
                + attended as f64 * unit.kv_bytes_per_token as f64 * self.kv_s_per_byte,
        )
    }
}

/// Storage reads of streamed layers (cold: bypassing the page cache).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorageProfile {
    /// Sustained read bandwidth, bytes per second.
    pub read_bytes_per_s: f64,
    /// Fixed cost of one read request, seconds.
    pub read_latency_s: f64,
}

impl StorageProfile {
    /// Seconds to read `bytes` in `reads` requests.
    pub fn read_seconds(&self, bytes: u64, reads: u32) -> f64 {
        bytes as f64 / self.read_bytes_per_s + reads as f64 * self.read_latency_s
    }
}

/// A device as the planner uses it: the profiled form. A spec sheet
/// ([`DeviceSpec`]) is converted into one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    /// Unique name within a cluster; plans refer to devices by it.
    pub name: String,
    /// Memory the node may use for weights, slots, KV cache and scratch.
    pub memory_budget_bytes: u64,
    pub storage: StorageProfile,
    pub compute: ComputeModel,
}

/// A device described by published figures, for devices we cannot measure.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSpec {
    pub name: String,
    pub memory_bytes: u64,
    /// Kept back for the OS and the runtime.
    pub os_reserve_bytes: u64,
    /// Peak memory bandwidth, bytes per second.
    pub memory_bandwidth_bytes_per_s: f64,
    /// Fraction of peak bandwidth decode reaches (about 0.8 on Jetson).
    pub memory_efficiency: f64,
    /// Dense throughput, FLOP/s, by GGML type name or `default`: the rate
    /// at which the engine runs weights of that type (f32 arithmetic).
    pub flops: BTreeMap<String, f64>,
    /// Fraction of peak FLOPS reached (about 0.6 for GEMM on Orin).
    pub compute_efficiency: f64,
    pub storage: StorageProfile,
    /// Fixed cost per unit and micro-batch.
    pub layer_overhead_s: f64,
}

impl DeviceSpec {
    /// Derives the compute model from the spec figures (module docs).
    pub fn to_profile(&self) -> DeviceProfile {
        let m = 1.0 / (self.memory_bandwidth_bytes_per_s * self.memory_efficiency);
        let rate = |key: &str, flops: f64| -> WeightRate {
            // Two FLOP per weight per token, over the type's bytes per weight.
            let bytes_per_weight = match key {
                "default" => 2.0,
                name => GgmlType::from_name(name).map_or(2.0, |t| t.bits_per_weight() / 8.0),
            };
            WeightRate {
                s_per_byte: m,
                s_per_byte_token: 2.0 / bytes_per_weight / (flops * self.compute_efficiency),
            }
        };
        DeviceProfile {
            name: self.name.clone(),
            memory_budget_bytes: self.memory_bytes - self.os_reserve_bytes,
            storage: self.storage,
            compute: ComputeModel {
                layer_overhead_s: self.layer_overhead_s,
                per_token_s: 0.0,
                kv_s_per_byte: m,
                weights: self
                    .flops
                    .iter()
                    .map(|(k, &f)| (k.clone(), rate(k, f)))
                    .collect(),
                roofline_exponent: None,
                token_factors: BTreeMap::new(),
            },
        }
    }
}

/// Typed, checked access to one TOML table; errors name file and field.
struct Fields<'a> {
    path: &'a Path,
    table: &'a Table,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn err(&self, key: &str, problem: impl Into<String>) -> PlanError {
        PlanError::DeviceField {
            path: self.path.to_path_buf(),
            field: self.field(key),
            problem: problem.into(),
        }
    }

    fn field(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// Fails on a key outside `allowed`: a typo must not pass silently.
    fn only(&self, allowed: &[&str]) -> Result<(), PlanError> {
        match self.table.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(self.err(
                k,
                format!("unknown field (expected one of: {})", allowed.join(", ")),
            )),
            None => Ok(()),
        }
    }

    fn sub(&self, key: &str) -> Result<Fields<'a>, PlanError> {
        match self.table.get(key) {
            Some(Value::Table(t)) => Ok(Fields {
                path: self.path,
                table: t,
                prefix: self.field(key),
            }),
            Some(_) => Err(self.err(key, "must be a table")),
            None => Err(self.err(key, "missing")),
        }
    }

    fn string(&self, key: &str) -> Result<String, PlanError> {
        match self.table.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(self.err(key, "must not be empty")),
            Some(_) => Err(self.err(key, "must be a string")),
            None => Err(self.err(key, "missing")),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, PlanError> {
        let v = match self.table.get(key) {
            None => return Ok(None),
            Some(Value::Integer(i)) => *i as f64,
            Some(Value::Float(f)) => *f,
            Some(_) => return Err(self.err(key, "must be a number")),
        };
        if !v.is_finite() {
            return Err(self.err(key, format!("must be finite, got {v}")));
        }
        Ok(Some(v))
    }

    /// A required number > 0.
    fn positive(&self, key: &str) -> Result<f64, PlanError> {
        match self.number(key)? {
            None => Err(self.err(key, "missing")),
            Some(v) if v > 0.0 => Ok(v),
            Some(v) => Err(self.err(key, format!("must be positive, got {v}"))),
        }
    }

    /// An optional number >= 0, or `default`.
    fn non_negative_or(&self, key: &str, default: f64) -> Result<f64, PlanError> {
        match self.number(key)? {
            None => Ok(default),
            Some(v) if v >= 0.0 => Ok(v),
            Some(v) => Err(self.err(key, format!("must not be negative, got {v}"))),
        }
    }

    /// An optional fraction in (0, 1], or `default`.
    fn fraction_or(&self, key: &str, default: f64) -> Result<f64, PlanError> {
        match self.number(key)? {
            None => Ok(default),
            Some(v) if v > 0.0 && v <= 1.0 => Ok(v),
            Some(v) => Err(self.err(key, format!("must be in (0, 1], got {v}"))),
        }
    }

    /// A required byte count > 0 (integer).
    fn bytes(&self, key: &str) -> Result<u64, PlanError> {
        match self.table.get(key) {
            None => Err(self.err(key, "missing")),
            Some(Value::Integer(i)) if *i > 0 => Ok(*i as u64),
            Some(Value::Integer(i)) => Err(self.err(key, format!("must be positive, got {i}"))),
            Some(_) => Err(self.err(key, "must be an integer number of bytes")),
        }
    }

    /// Keys of a table of per-type entries: GGML type names or `default`.
    fn dtype_keys(&self) -> Result<Vec<String>, PlanError> {
        if self.table.is_empty() {
            return Err(PlanError::DeviceField {
                path: self.path.to_path_buf(),
                field: self.prefix.clone(),
                problem: "needs at least one type (or `default`)".into(),
            });
        }
        self.table
            .keys()
            .map(|k| match k.as_str() {
                "default" => Ok("default".to_string()),
                name => GgmlType::from_name(name)
                    .map(|t| t.name().to_string())
                    .ok_or_else(|| {
                        self.err(k, "not a GGML type name (BF16, Q4_K, ...) nor `default`")
                    }),
            })
            .collect()
    }
}

/// Fixed per-unit overhead assumed for a spec-form device that gives none:
/// about fifteen kernel launches of a few microseconds.
const DEFAULT_LAYER_OVERHEAD_US: f64 = 100.0;
/// Read latency assumed for NVMe when a spec gives none.
const DEFAULT_READ_LATENCY_US: f64 = 100.0;

impl DeviceSpec {
    fn from_fields(f: &Fields) -> Result<DeviceSpec, PlanError> {
        f.only(&[
            "form",
            "name",
            "description",
            "memory",
            "compute",
            "storage",
        ])?;
        let name = f.string("name")?;
        let mem = f.sub("memory")?;
        mem.only(&[
            "total_gib",
            "os_reserve_gib",
            "bandwidth_gb_s",
            "efficiency",
        ])?;
        let total = mem.positive("total_gib")?;
        let reserve = mem.non_negative_or("os_reserve_gib", 2.0)?;
        if reserve >= total {
            return Err(mem.err(
                "os_reserve_gib",
                format!("{reserve} GiB leaves nothing of the {total} GiB total"),
            ));
        }
        let compute = f.sub("compute")?;
        compute.only(&["tflops", "efficiency", "layer_overhead_us"])?;
        let tflops = compute.sub("tflops")?;
        let mut flops = BTreeMap::new();
        for (raw, key) in tflops.table.keys().zip(tflops.dtype_keys()?) {
            flops.insert(key, tflops.positive(raw)? * 1e12);
        }
        let storage = f.sub("storage")?;
        storage.only(&["read_gb_s", "read_latency_us"])?;
        Ok(DeviceSpec {
            name,
            memory_bytes: (total * GIB) as u64,
            os_reserve_bytes: (reserve * GIB) as u64,
            memory_bandwidth_bytes_per_s: mem.positive("bandwidth_gb_s")? * 1e9,
            memory_efficiency: mem.fraction_or("efficiency", 0.8)?,
            flops,
            compute_efficiency: compute.fraction_or("efficiency", 0.6)?,
            storage: StorageProfile {
                read_bytes_per_s: storage.positive("read_gb_s")? * 1e9,
                read_latency_s: storage
                    .non_negative_or("read_latency_us", DEFAULT_READ_LATENCY_US)?
                    * 1e-6,
            },
            layer_overhead_s: compute
                .non_negative_or("layer_overhead_us", DEFAULT_LAYER_OVERHEAD_US)?
                * 1e-6,
        })
    }
}

impl DeviceProfile {
    fn from_fields(f: &Fields) -> Result<DeviceProfile, PlanError> {
        f.only(&[
            "form",
            "name",
            "description",
            "memory",
            "compute",
            "storage",
        ])?;
        let name = f.string("name")?;
        let mem = f.sub("memory")?;
        mem.only(&["budget_bytes"])?;
        let storage = f.sub("storage")?;
        storage.only(&["read_bytes_per_s", "read_latency_s"])?;
        let compute = f.sub("compute")?;
        compute.only(&[
            "layer_overhead_s",
            "per_token_s",
            "kv_s_per_byte",
            "roofline_exponent",
            "token_factors",
            "weights",
        ])?;
        let mut token_factors = BTreeMap::new();
        if compute.table.contains_key("token_factors") {
            let tf = compute.sub("token_factors")?;
            for key in tf.table.keys() {
                let n: u32 = key
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| tf.err(key, "not a token count (a positive integer)"))?;
                token_factors.insert(n, tf.positive(key)?);
            }
        }
        let roofline_exponent = match compute.number("roofline_exponent")? {
            None => None,
            Some(p) if p >= 1.0 => Some(p),
            Some(p) => {
                return Err(compute.err("roofline_exponent", format!("must be at least 1, got {p}")))
            }
        };
        let weights_f = compute.sub("weights")?;
        let mut weights = BTreeMap::new();
        for (raw, key) in weights_f.table.keys().zip(weights_f.dtype_keys()?) {
            let w = weights_f.sub(raw)?;
            w.only(&["s_per_byte", "s_per_byte_token"])?;
            weights.insert(
                key,
                WeightRate {
                    s_per_byte: w.positive("s_per_byte")?,
                    s_per_byte_token: w.positive("s_per_byte_token")?,
                },
            );
        }
        Ok(DeviceProfile {
            name,
            memory_budget_bytes: mem.bytes("budget_bytes")?,
            storage: StorageProfile {
                read_bytes_per_s: storage.positive("read_bytes_per_s")?,
                read_latency_s: storage.non_negative_or("read_latency_s", 0.0)?,
            },
            compute: ComputeModel {
                layer_overhead_s: compute.non_negative_or("layer_overhead_s", 0.0)?,
                per_token_s: compute.non_negative_or("per_token_s", 0.0)?,
                kv_s_per_byte: compute.positive("kv_s_per_byte")?,
                weights,
                roofline_exponent,
                token_factors,
            },
        })
    }

    /// Reads a device file of either form (`form = "spec"` or
    /// `"profiled"`); a spec is converted with [`DeviceSpec::to_profile`].
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<DeviceProfile, PlanError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        DeviceProfile::from_toml_str(&text, path)
    }

    /// Parses device TOML; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<DeviceProfile, PlanError> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| PlanError::Toml {
            path: origin.to_path_buf(),
            message: e.message().to_string(),
        })?;
        let f = Fields {
            path: origin,
            table: &table,
            prefix: String::new(),
        };
        match f.string("form")?.as_str() {
            "spec" => Ok(DeviceSpec::from_fields(&f)?.to_profile()),
            "profiled" => DeviceProfile::from_fields(&f),
            other => Err(f.err(
                "form",
                format!("`{other}`: expected \"spec\" or \"profiled\""),
            )),
        }
    }

    /// The profiled form as TOML, for a profiler to write; it reads back
    /// with [`DeviceProfile::from_toml_str`].
    pub fn to_toml(&self) -> String {
        let mut weights = Table::new();
        for (k, w) in &self.compute.weights {
            let mut t = Table::new();
            t.insert("s_per_byte".into(), Value::Float(w.s_per_byte));
            t.insert("s_per_byte_token".into(), Value::Float(w.s_per_byte_token));
            weights.insert(k.clone(), Value::Table(t));
        }
        let mut compute = Table::new();
        compute.insert(
            "layer_overhead_s".into(),
            Value::Float(self.compute.layer_overhead_s),
        );
        compute.insert("per_token_s".into(), Value::Float(self.compute.per_token_s));
        compute.insert(
            "kv_s_per_byte".into(),
            Value::Float(self.compute.kv_s_per_byte),
        );
        if let Some(p) = self.compute.roofline_exponent {
            compute.insert("roofline_exponent".into(), Value::Float(p));
        }
        if !self.compute.token_factors.is_empty() {
            let t: Table = self
                .compute
                .token_factors
                .iter()
                .map(|(n, f)| (n.to_string(), Value::Float(*f)))
                .collect();
            compute.insert("token_factors".into(), Value::Table(t));
        }
        compute.insert("weights".into(), Value::Table(weights));
        let mut storage = Table::new();
        storage.insert(
            "read_bytes_per_s".into(),
            Value::Float(self.storage.read_bytes_per_s),
        );
        storage.insert(
            "read_latency_s".into(),
            Value::Float(self.storage.read_latency_s),
        );
        let mut memory = Table::new();
        memory.insert(
            "budget_bytes".into(),
            Value::Integer(self.memory_budget_bytes.min(i64::MAX as u64) as i64),
        );
        let mut top = Table::new();
        top.insert("form".into(), Value::String("profiled".into()));
        top.insert("name".into(), Value::String(self.name.clone()));
        top.insert("memory".into(), Value::Table(memory));
        top.insert("storage".into(), Value::Table(storage));
        top.insert("compute".into(), Value::Table(compute));
        toml::to_string(&top).expect("a table of plain values serializes")
    }

    /// Checks the figures of a profile built in code (files are checked as
    /// they are read, with the file and field in the error).
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |field: &str, v: f64| PlanError::DeviceField {
            path: PathBuf::from(format!("<device {}>", self.name)),
            field: field.to_string(),
            problem: format!("impossible value {v}"),
        };
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(field, v))
            }
        };
        let non_negative = |field: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(bad(field, v))
            }
        };
        if self.name.trim().is_empty() {
            return Err(bad("name", 0.0));
        }
        positive("memory.budget_bytes", self.memory_budget_bytes as f64)?;
        positive("storage.read_bytes_per_s", self.storage.read_bytes_per_s)?;
        non_negative("storage.read_latency_s", self.storage.read_latency_s)?;
        non_negative("compute.layer_overhead_s", self.compute.layer_overhead_s)?;
        non_negative("compute.per_token_s", self.compute.per_token_s)?;
        positive("compute.kv_s_per_byte", self.compute.kv_s_per_byte)?;
        if let Some(p) = self.compute.roofline_exponent {
            if !(p.is_finite() && p >= 1.0) {
                return Err(bad("compute.roofline_exponent", p));
            }
        }
        for (n, f) in &self.compute.token_factors {
            positive(&format!("compute.token_factors.{n}"), *f)?;
        }
        if self.compute.weights.is_empty() {
            return Err(bad("compute.weights", 0.0));
        }
        for (k, w) in &self.compute.weights {
            positive(&format!("compute.weights.{k}.s_per_byte"), w.s_per_byte)?;
            positive(
                &format!("compute.weights.{k}.s_per_byte_token"),
                w.s_per_byte_token,
            )?;
        }
        Ok(())
    }
}
