//! Hyper-parameters of a Llama-family model, and the table of its tensors.

use super::dtype::GgmlType;
use super::gguf::{Gguf, GgufError, Metadata, TensorInfo};
use thiserror::Error;

/// Architectures whose GGUF layout this engine runs.
const ARCHITECTURES: [&str; 2] = ["llama", "mistral"];

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture {0:?} (supported: llama, mistral)")]
    Architecture(String),
    #[error("metadata key {key}: {why}")]
    BadValue { key: String, why: String },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name}: shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("tensor {name}: type {ty} is not supported for this role")]
    Type { name: String, ty: GgmlType },
    #[error("{found} tensors in the file, but a {layers}-layer model has {expected}")]
    TensorCount {
        found: usize,
        expected: usize,
        layers: usize,
    },
}

/// How RoPE frequencies are adjusted for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3: per-dimension factors from `rope.scaling.*` keys.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: u32,
    },
    /// Linear position interpolation.
    Linear {
        factor: f32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub rope_scaling: RopeScaling,
    /// The end-of-generation token, when the file names one.
    pub eos_token: Option<u32>,
    /// The output head shares the token embedding.
    pub tied_output: bool,
    /// A `rope_freqs` tensor gives per-dimension frequency divisors.
    pub has_rope_freqs: bool,
}

/// Metadata key of a shard: a file with a model's metadata and only the
/// tensors one node's windows need (`cluster::prepare` writes it, with the
/// digest of the whole model). Its tensors are checked as a model's are;
/// the others may be absent.
pub const SHARD_KEY: &str = "loip.shard.model";

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Config, ConfigError> {
        let md = g.metadata();
        let arch = md.get_str("general.architecture")?.to_string();
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ConfigError::Architecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_embd = positive(md, &key("embedding_length"))?;
        let n_head = positive(md, &key("attention.head_count"))?;
        let n_head_kv = match md.get(&key("attention.head_count_kv")) {
            Some(_) => positive(md, &key("attention.head_count_kv"))?,
            None => n_head,
        };
        if n_head % n_head_kv != 0 {
            return Err(bad(
                &key("attention.head_count_kv"),
                format!("{n_head_kv} does not divide {n_head} heads"),
            ));
        }
        let head_dim = match md.get(&key("attention.key_length")) {
            Some(_) => positive(md, &key("attention.key_length"))?,
            None => n_embd / n_head,
        };
        if head_dim % 16 != 0 || head_dim > 256 {
            return Err(bad(
                &key("attention.key_length"),
                format!("head size {head_dim} is not a multiple of 16 up to 256"),
            ));
        }
        let n_layer = positive(md, &key("block_count"))?;
        if n_layer > 1024 {
            return Err(bad(
                &key("block_count"),
                format!("{n_layer} layers is not plausible"),
            ));
        }
        let shard = md.get(SHARD_KEY).is_some();
        let n_vocab = match g.tensor("token_embd.weight") {
            Some(embd) => *embd.dims.get(1).unwrap_or(&0) as usize,
            // A shard of a node that neither embeds nor runs a tied head:
            // the vocabulary is the output matrix's, or the metadata's.
            None if shard => match g.tensor("output.weight") {
                Some(out) => *out.dims.get(1).unwrap_or(&0) as usize,
                None => match md.get(&key("vocab_size")) {
                    Some(_) => positive(md, &key("vocab_size"))?,
                    None => md.get_str_array("tokenizer.ggml.tokens")?.len(),
                },
            },
            None => return Err(ConfigError::MissingTensor("token_embd.weight".into())),
        };
        let rope_base = match md.get(&key("rope.freq_base")) {
            Some(_) => md.get_f32(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(bad(
                &key("rope.freq_base"),
                format!("{rope_base} is not a valid base"),
            ));
        }
        let rms_eps = md.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(bad(
                &key("attention.layer_norm_rms_epsilon"),
                format!("{rms_eps}"),
            ));
        }
        let rope_scaling = rope_scaling(md, &arch)?;
        let cfg = Config {
            n_ff: positive(md, &key("feed_forward_length"))?,
            context_length: positive(md, &key("context_length"))?,
            eos_token: md
                .get("tokenizer.ggml.eos_token_id")
                .map(|_| md.get_u32("tokenizer.ggml.eos_token_id"))
                .transpose()?,
            tied_output: g.tensor("output.weight").is_none(),
            has_rope_freqs: g.tensor("rope_freqs.weight").is_some(),
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            rms_eps,
            rope_base,
            rope_scaling,
        };
        cfg.check_tensors(g, shard)?;
        Ok(cfg)
    }

    /// Width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Checks every tensor of the table against the file: present when
    /// required, the expected shape, a supported type; and no strays. In a
    /// shard, the tensors it has are checked and the others may be absent.
    fn check_tensors(&self, g: &Gguf, shard: bool) -> Result<(), ConfigError> {
        let mut expected = 0;
        for role in Role::GLOBAL.iter().chain(Role::LAYER.iter()) {
            let layers = if role.per_layer() { self.n_layer } else { 1 };
            for l in 0..layers {
                let name = role.name(l);
                let Some(t) = g.tensor(&name) else {
                    if role.required(self) && !shard {
                        return Err(ConfigError::MissingTensor(name));
                    }
                    continue;
                };
                expected += 1;
                check_tensor(t, &role.shape(self), role.is_vector())?;
            }
        }
        if g.tensors().len() != expected && !(shard && g.tensors().len() < expected) {
            return Err(ConfigError::TensorCount {
                found: g.tensors().len(),
                expected,
                layers: self.n_layer,
            });
        }
        Ok(())
    }
}

fn check_tensor(t: &TensorInfo, shape: &[u64], vector: bool) -> Result<(), ConfigError> {
    if t.dims != shape {
        return Err(ConfigError::Shape {
            name: t.name.clone(),
            found: t.dims.clone(),
            expected: shape.to_vec(),
        });
    }
    let float = matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    if vector && !float {
        return Err(ConfigError::Type {
            name: t.name.clone(),
            ty: t.ty,
        });
    }
    Ok(())
}

fn bad(key: &str, why: String) -> ConfigError {
    ConfigError::BadValue {
        key: key.into(),
        why,
    }
}

fn positive(md: &Metadata, key: &str) -> Result<usize, ConfigError> {
    match md.get_u32(key)? {
        0 => Err(bad(key, "must be positive".into())),
        v => Ok(v as usize),
    }
}

fn rope_scaling(md: &Metadata, arch: &str) -> Result<RopeScaling, ConfigError> {
    let k = |s: &str| format!("{arch}.rope.scaling.{s}");
    let Some(_) = md.get(&k("type")) else {
        return Ok(RopeScaling::None);
    };
    let ty = md.get_str(&k("type"))?;
    let f = |s: &str| -> Result<f32, ConfigError> {
        let v = md.get_f32(&k(s))?;
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(bad(&k(s), format!("{v} must be positive")))
        }
    };
    Ok(match ty {
        "none" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: f("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_context: md.get_u32(&k("original_context_length"))?,
        },
        other => {
            return Err(bad(
                &k("type"),
                format!("unsupported rope scaling {other:?}"),
            ))
        }
    })
}

/// The role of a tensor in a Llama model: one table for names, shapes and
/// whether a file must have it (STYLE.md, habit 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    TokenEmbd,
    OutputNorm,
    Output,
    RopeFreqs,
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
}

impl Role {
    pub const GLOBAL: [Role; 4] = [
        Role::TokenEmbd,
        Role::OutputNorm,
        Role::Output,
        Role::RopeFreqs,
    ];
    pub const LAYER: [Role; 9] = [
        Role::AttnNorm,
        Role::AttnQ,
        Role::AttnK,
        Role::AttnV,
        Role::AttnOutput,
        Role::FfnNorm,
        Role::FfnGate,
        Role::FfnUp,
        Role::FfnDown,
    ];

    pub fn per_layer(self) -> bool {
        Self::LAYER.contains(&self)
    }

    /// The GGUF tensor name; `layer` is ignored for global tensors.
    pub fn name(self, layer: usize) -> String {
        let stem = match self {
            Role::TokenEmbd => return "token_embd.weight".into(),
            Role::OutputNorm => return "output_norm.weight".into(),
            Role::Output => return "output.weight".into(),
            Role::RopeFreqs => return "rope_freqs.weight".into(),
            Role::AttnNorm => "attn_norm",
            Role::AttnQ => "attn_q",
            Role::AttnK => "attn_k",
            Role::AttnV => "attn_v",
            Role::AttnOutput => "attn_output",
            Role::FfnNorm => "ffn_norm",
            Role::FfnGate => "ffn_gate",
            Role::FfnUp => "ffn_up",
            Role::FfnDown => "ffn_down",
        };
        format!("blk.{layer}.{stem}.weight")
    }

    /// GGUF dims (row length first).
    pub fn shape(self, c: &Config) -> Vec<u64> {
        let d = |v: usize| v as u64;
        match self {
            Role::TokenEmbd | Role::Output => vec![d(c.n_embd), d(c.n_vocab)],
            Role::OutputNorm | Role::AttnNorm | Role::FfnNorm => vec![d(c.n_embd)],
            Role::RopeFreqs => vec![d(c.head_dim / 2)],
            Role::AttnQ => vec![d(c.n_embd), d(c.q_dim())],
            Role::AttnK | Role::AttnV => vec![d(c.n_embd), d(c.kv_dim())],
            Role::AttnOutput => vec![d(c.q_dim()), d(c.n_embd)],
            Role::FfnGate | Role::FfnUp => vec![d(c.n_embd), d(c.n_ff)],
            Role::FfnDown => vec![d(c.n_ff), d(c.n_embd)],
        }
    }

    /// Norm weights and frequency factors are vectors, read as floats.
    pub fn is_vector(self) -> bool {
        matches!(
            self,
            Role::OutputNorm | Role::AttnNorm | Role::FfnNorm | Role::RopeFreqs
        )
    }

    fn required(self, _c: &Config) -> bool {
        !matches!(self, Role::Output | Role::RopeFreqs)
    }
}
