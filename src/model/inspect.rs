//! A summary of a model file, for `loip inspect`: what the file declares and
//! what its tensors cost, without touching the weights.

use std::fmt;

use serde::Serialize;

use super::config::{Config, ConfigError, RopeScaling};
use super::dtype::GgmlType;
use super::gguf::Gguf;

/// Everything `loip inspect` shows, serializable as its `--json` form.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub gguf_version: u32,
    /// `general.name`, when the file has one.
    pub name: Option<String>,
    pub architecture: String,
    pub file_bytes: u64,
    pub metadata_keys: usize,
    pub hyper: Hyper,
    /// One entry per tensor type, the most bytes first.
    pub tensor_types: Vec<TypeTotal>,
    pub n_tensors: usize,
    /// Sum of the tensors' data, padding excluded.
    pub tensor_bytes: u64,
    pub n_params: u64,
}

/// The hyper-parameters the engine runs the model with.
#[derive(Clone, Debug, Serialize)]
pub struct Hyper {
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
    /// "none", or the scaling kind with its parameters.
    pub rope_scaling: String,
    pub eos_token: Option<u32>,
    pub tied_output: bool,
}

/// The tensors of one element type.
#[derive(Clone, Debug, Serialize)]
pub struct TypeTotal {
    #[serde(rename = "type")]
    pub ty: String,
    pub count: usize,
    pub bytes: u64,
    pub n_params: u64,
}

/// Reads the configuration (validating it as the engine would) and totals
/// the tensors by type.
pub fn summary(gguf: &Gguf) -> Result<Summary, ConfigError> {
    let c = Config::from_gguf(gguf)?;
    let mut by_type: Vec<(GgmlType, TypeTotal)> = Vec::new();
    for t in gguf.tensors() {
        let at = match by_type.iter().position(|(ty, _)| *ty == t.ty) {
            Some(at) => at,
            None => {
                let total = TypeTotal {
                    ty: t.ty.name().to_string(),
                    count: 0,
                    bytes: 0,
                    n_params: 0,
                };
                by_type.push((t.ty, total));
                by_type.len() - 1
            }
        };
        let total = &mut by_type[at].1;
        total.count += 1;
        total.bytes = total.bytes.saturating_add(t.size);
        total.n_params = total.n_params.saturating_add(t.n_elements());
    }
    let mut tensor_types: Vec<TypeTotal> = by_type.into_iter().map(|(_, t)| t).collect();
    tensor_types.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.ty.cmp(&b.ty)));
    let sum = |f: fn(&TypeTotal) -> u64| {
        tensor_types
            .iter()
            .map(f)
            .fold(0u64, |a, b| a.saturating_add(b))
    };
    Ok(Summary {
        gguf_version: gguf.version(),
        name: gguf
            .metadata()
            .get_str("general.name")
            .ok()
            .map(str::to_string),
        architecture: c.arch.clone(),
        file_bytes: gguf.file_len(),
        metadata_keys: gguf.metadata().len(),
        n_tensors: gguf.tensors().len(),
        tensor_bytes: sum(|t| t.bytes),
        n_params: sum(|t| t.n_params),
        tensor_types,
        hyper: Hyper {
            n_layer: c.n_layer,
            n_embd: c.n_embd,
            n_ff: c.n_ff,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            n_vocab: c.n_vocab,
            context_length: c.context_length,
            rms_eps: c.rms_eps,
            rope_base: c.rope_base,
            rope_scaling: describe_rope_scaling(&c.rope_scaling),
            eos_token: c.eos_token,
            tied_output: c.tied_output,
        },
    })
}

fn describe_rope_scaling(s: &RopeScaling) -> String {
    match s {
        RopeScaling::None => "none".into(),
        RopeScaling::Linear { factor } => format!("linear (factor {factor})"),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => format!(
            "llama3 (factor {factor}, low {low_freq_factor}, high {high_freq_factor}, \
             original context {original_context})"
        ),
    }
}

/// Bytes in binary units, e.g. "93.8 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The human-readable form `loip inspect` prints.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.hyper;
        let opt = |v: Option<u32>| v.map_or("none".to_string(), |v| v.to_string());
        writeln!(f, "name            {}", self.name.as_deref().unwrap_or("-"))?;
        writeln!(f, "architecture    {}", self.architecture)?;
        writeln!(f, "gguf version    {}", self.gguf_version)?;
        writeln!(
            f,
            "file size       {} ({} bytes)",
            human_bytes(self.file_bytes),
            self.file_bytes
        )?;
        writeln!(f, "metadata keys   {}", self.metadata_keys)?;
        writeln!(f, "layers          {}", h.n_layer)?;
        writeln!(f, "embedding       {}", h.n_embd)?;
        writeln!(f, "feed-forward    {}", h.n_ff)?;
        writeln!(
            f,
            "heads           {} query, {} key/value, dim {}",
            h.n_head, h.n_head_kv, h.head_dim
        )?;
        writeln!(f, "vocabulary      {}", h.n_vocab)?;
        writeln!(f, "context length  {}", h.context_length)?;
        writeln!(f, "rms eps         {:e}", h.rms_eps)?;
        writeln!(f, "rope base       {}", h.rope_base)?;
        writeln!(f, "rope scaling    {}", h.rope_scaling)?;
        writeln!(f, "eos token       {}", opt(h.eos_token))?;
        writeln!(
            f,
            "output head     {}",
            if h.tied_output {
                "tied to the token embedding"
            } else {
                "separate"
            }
        )?;
        writeln!(
            f,
            "tensors         {} ({} parameters, {})",
            self.n_tensors,
            self.n_params,
            human_bytes(self.tensor_bytes)
        )?;
        for t in &self.tensor_types {
            writeln!(
                f,
                "  {:<8} {:>5} tensors {:>12} parameters {:>11}",
                t.ty,
                t.count,
                t.n_params,
                human_bytes(t.bytes)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::SynthSpec;

    #[test]
    fn tiny_summary_counts_every_tensor_once() {
        let bytes = SynthSpec::tiny(GgmlType::Q4_1).writer().to_bytes().unwrap();
        let g = Gguf::from_bytes(bytes).unwrap();
        let s = summary(&g).unwrap();
        assert_eq!(s.n_tensors, g.tensors().len());
        let counted: usize = s.tensor_types.iter().map(|t| t.count).sum();
        assert_eq!(counted, s.n_tensors);
        let bytes: u64 = g.tensors().iter().map(|t| t.size).sum();
        assert_eq!(s.tensor_bytes, bytes);
        assert_eq!(s.hyper.n_layer, 2);
        assert_eq!(s.hyper.n_vocab, 512);
        assert!(s.tensor_types.windows(2).all(|w| w[0].bytes >= w[1].bytes));
        assert!(s.to_string().contains("Q4_1"));
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(98_362_432), "93.8 MiB");
    }
}
