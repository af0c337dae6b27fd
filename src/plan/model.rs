//! The model as the planner sees it: a sequence of units with weight bytes
//! per type, KV bytes per token and activation sizes.
//!
//! Unit `u < n_layers` is decoder layer `u`; unit `n_layers` is the output
//! head (final norm and LM head). The head runs on the device of the last
//! window, so it is scheduled like a layer. The embedding table is not a
//! unit: it stays on storage, and the head window reads one row per token.

use crate::engine::weights::{tensor_resident_bytes, Model, Unit};
use crate::model::config::Role;
use crate::model::dtype::GgmlType;

use super::PlanError;

/// Bytes of one weight type in a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightBytes {
    pub dtype: GgmlType,
    pub bytes: u64,
}

/// One schedulable unit: a decoder layer or the output head.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitShape {
    /// Weight bytes grouped by type (one entry per type).
    pub weights: Vec<WeightBytes>,
    /// KV-cache bytes one token adds to this unit (0 for the head).
    pub kv_bytes_per_token: u64,
}

impl UnitShape {
    /// All weight bytes of the unit.
    pub fn bytes(&self) -> u64 {
        self.weights.iter().map(|w| w.bytes).sum()
    }
}

/// What the planner needs to know about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub name: String,
    /// Width of the activation that crosses a link: `hidden` f32 per token.
    pub hidden: u32,
    /// Decoder layers, in order.
    pub layers: Vec<UnitShape>,
    /// Output norm and LM head.
    pub head: UnitShape,
    /// Bytes of one embedding row, read from storage per token.
    pub embedding_row_bytes: u64,
    /// Working memory per token in flight (activations, logits).
    pub scratch_bytes_per_token: u64,
    /// Working memory per token in flight per token of context
    /// (attention scores).
    pub scratch_bytes_per_token_ctx: u64,
}

/// Dimensions and tensor sizes of a model, as the engine reads them from a
/// GGUF file. [`ModelShape::from_description`] turns it into a shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDescription {
    pub name: String,
    pub hidden: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub ffn: u32,
    pub vocab: u32,
    /// Tensors of each decoder layer: (type, bytes), any number per type.
    pub layers: Vec<Vec<WeightBytes>>,
    /// Tensors of the output head (output norm, output or tied embedding).
    pub head: Vec<WeightBytes>,
    /// Type of the token embedding table.
    pub embedding_dtype: GgmlType,
    /// Bytes per element of the KV cache (4: the lossless f32 cache).
    pub kv_bytes_per_element: u32,
}

/// Sums bytes per type, keeping the first-seen order of types.
fn group(tensors: &[WeightBytes]) -> Result<Vec<WeightBytes>, PlanError> {
    let mut out: Vec<WeightBytes> = Vec::new();
    for t in tensors {
        match out.iter_mut().find(|w| w.dtype == t.dtype) {
            Some(w) => {
                w.bytes = w
                    .bytes
                    .checked_add(t.bytes)
                    .ok_or_else(|| PlanError::Model("unit bytes overflow".into()))?
            }
            None => out.push(*t),
        }
    }
    Ok(out)
}

impl ModelDescription {
    /// The tensors of one Llama-style decoder layer stored in `dtype`, with
    /// f32 norms: the description a GGUF of that shape yields.
    pub fn llama_layer(&self, dtype: GgmlType) -> Result<Vec<WeightBytes>, PlanError> {
        let (h, kv, f) = (
            self.hidden as u64,
            (self.n_kv_heads * self.head_dim) as u64,
            self.ffn as u64,
        );
        let q_out = (self.n_heads * self.head_dim) as u64;
        let row = |n: u64, rows: u64| -> Result<WeightBytes, PlanError> {
            let b = dtype
                .row_bytes(n)
                .and_then(|r| r.checked_mul(rows))
                .ok_or_else(|| {
                    PlanError::Model(format!("{n} is not a whole number of {dtype} blocks"))
                })?;
            Ok(WeightBytes { dtype, bytes: b })
        };
        let norms = WeightBytes {
            dtype: GgmlType::F32,
            bytes: 2 * h * 4,
        };
        Ok(vec![
            row(h, q_out)?, // attn_q
            row(h, kv)?,    // attn_k
            row(h, kv)?,    // attn_v
            row(q_out, h)?, // attn_output
            row(h, f)?,     // ffn_gate
            row(h, f)?,     // ffn_up
            row(f, h)?,     // ffn_down
            norms,
        ])
    }
}

/// The weight bytes of `unit` by type, as the engine holds them resident.
fn unit_weights(model: &Model, unit: Unit) -> Vec<WeightBytes> {
    model
        .unit_tensors(unit)
        .iter()
        .map(|(_, t)| WeightBytes {
            dtype: t.ty,
            bytes: tensor_resident_bytes(t),
        })
        .collect()
}

impl ModelDescription {
    /// The description of a loaded model, named `name`. A decoder layer is
    /// the engine's attention and MLP units plus the layer's two f32 norm
    /// vectors; the head is the output norm and the output matrix (the
    /// token embedding when tied). Bytes are the engine's resident bytes
    /// ([`Model::resident_bytes`]): what a resident unit costs in memory.
    pub fn of_model(model: &Model, name: &str) -> ModelDescription {
        let c = &model.config;
        let norm = WeightBytes {
            dtype: GgmlType::F32,
            bytes: c.n_embd as u64 * 4,
        };
        let layers = (0..c.n_layer)
            .map(|l| {
                let mut w = unit_weights(model, Unit::Attn(l));
                w.extend(unit_weights(model, Unit::Mlp(l)));
                w.extend([norm, norm]);
                w
            })
            .collect();
        let mut head = vec![norm];
        head.extend(unit_weights(model, Unit::Head));
        let embedding_dtype = model
            .gguf()
            .tensor(&Role::TokenEmbd.name(0))
            .map_or(GgmlType::F32, |t| t.ty);
        ModelDescription {
            name: name.to_string(),
            hidden: c.n_embd as u32,
            n_heads: c.n_head as u32,
            n_kv_heads: c.n_head_kv as u32,
            head_dim: c.head_dim as u32,
            ffn: c.n_ff as u32,
            vocab: c.n_vocab as u32,
            layers,
            head,
            embedding_dtype,
            kv_bytes_per_element: 4,
        }
    }
}

impl ModelShape {
    /// The shape of a loaded model with decoder layers as units: what
    /// `loip plan --model` plans.
    pub fn of_model(model: &Model, name: &str) -> Result<ModelShape, PlanError> {
        ModelShape::from_description(&ModelDescription::of_model(model, name))
    }

    /// The shape of the GGUF model at `path` (decoder layers as units),
    /// named after the file.
    pub fn from_gguf(path: &std::path::Path) -> Result<ModelShape, PlanError> {
        let model = Model::open_with(path, |_| false)?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        ModelShape::of_model(&model, &name)
    }

    /// The shape of a loaded model with the engine's units of placement as
    /// units: attention and MLP of each layer in turn, then the head, with
    /// the KV cache on the attention units and the norm vectors left out
    /// (the engine keeps them resident apart from any unit). This is the
    /// granularity at which the local engine streams, so it is the one for
    /// predicting it ([`super::validate`]).
    pub fn engine_units(model: &Model, name: &str) -> Result<ModelShape, PlanError> {
        let mut shape = ModelShape::of_model(model, name)?;
        let kv = shape.layers[0].kv_bytes_per_token;
        shape.layers = (0..model.config.n_layer)
            .flat_map(|l| [(Unit::Attn(l), kv), (Unit::Mlp(l), 0)])
            .map(|(u, kv)| {
                Ok(UnitShape {
                    weights: group(&unit_weights(model, u))?,
                    kv_bytes_per_token: kv,
                })
            })
            .collect::<Result<_, PlanError>>()?;
        shape.head = UnitShape {
            weights: group(&unit_weights(model, Unit::Head))?,
            kv_bytes_per_token: 0,
        };
        Ok(shape)
    }

    /// Builds a shape from a GGUF-derived description, checking its figures.
    pub fn from_description(d: &ModelDescription) -> Result<ModelShape, PlanError> {
        let bad = |what: &str| Err(PlanError::Model(format!("{}: {what}", d.name)));
        if d.hidden == 0 || d.n_heads == 0 || d.n_kv_heads == 0 || d.head_dim == 0 {
            return bad("hidden, heads and head_dim must be positive");
        }
        if d.ffn == 0 || d.vocab == 0 {
            return bad("ffn and vocab must be positive");
        }
        if d.layers.is_empty() {
            return bad("no layers");
        }
        if d.kv_bytes_per_element == 0 {
            return bad("kv_bytes_per_element must be positive");
        }
        let kv_per_token =
            2 * d.n_kv_heads as u64 * d.head_dim as u64 * d.kv_bytes_per_element as u64;
        let mut layers = Vec::with_capacity(d.layers.len());
        for (i, tensors) in d.layers.iter().enumerate() {
            let weights = group(tensors)?;
            if weights.iter().map(|w| w.bytes).sum::<u64>() == 0 {
                return bad(&format!("layer {i} has no weight bytes"));
            }
            layers.push(UnitShape {
                weights,
                kv_bytes_per_token: kv_per_token,
            });
        }
        let head = UnitShape {
            weights: group(&d.head)?,
            kv_bytes_per_token: 0,
        };
        if head.bytes() == 0 {
            return bad("the head has no weight bytes");
        }
        let embedding_row_bytes = d
            .embedding_dtype
            .row_bytes(d.hidden as u64)
            .ok_or_else(|| PlanError::Model("embedding row is not whole blocks".into()))?;
        let (h, kv, f, v) = (
            d.hidden as u64,
            (d.n_kv_heads * d.head_dim) as u64,
            d.ffn as u64,
            d.vocab as u64,
        );
        Ok(ModelShape {
            name: d.name.clone(),
            hidden: d.hidden,
            layers,
            head,
            embedding_row_bytes,
            // f32 residual, normed input, attention output, q, k, v, two
            // FFN halves and the logits.
            scratch_bytes_per_token: 4 * (4 * h + 2 * kv + 2 * f + v),
            scratch_bytes_per_token_ctx: 4 * d.n_heads as u64,
        })
    }

    /// LLaMA-3.3-70B-Instruct in BF16 (figures in `shared/JETSONS.md`): 80
    /// layers of 855.6 M parameters, hidden 8192, 64 heads, 8 KV heads of
    /// 128, FFN 28672, vocab 128256, untied embeddings.
    ///
    /// The KV cache is f32, as the engine keeps it: K and V are activations,
    /// and rounding them to BF16 would not be lossless. That is 640 KiB per
    /// token, twice the 320 KiB of a BF16 cache.
    pub fn llama3_70b() -> ModelShape {
        let mut d = ModelDescription {
            name: "llama3-70b (BF16)".into(),
            hidden: 8192,
            n_heads: 64,
            n_kv_heads: 8,
            head_dim: 128,
            ffn: 28672,
            vocab: 128256,
            layers: Vec::new(),
            head: vec![
                WeightBytes {
                    dtype: GgmlType::F32,
                    bytes: 8192 * 4,
                },
                WeightBytes {
                    dtype: GgmlType::BF16,
                    bytes: 128256 * 8192 * 2,
                },
            ],
            embedding_dtype: GgmlType::BF16,
            kv_bytes_per_element: 4,
        };
        let layer = d
            .llama_layer(GgmlType::BF16)
            .expect("BF16 rows are whole blocks");
        d.layers = vec![layer; 80];
        ModelShape::from_description(&d).expect("the preset is valid")
    }

    /// A preset by its command-line name (`llama3-70b`).
    pub fn preset(name: &str) -> Option<ModelShape> {
        match name {
            "llama3-70b" | "llama-3.3-70b" => Some(ModelShape::llama3_70b()),
            _ => None,
        }
    }

    /// Decoder layers plus the head.
    pub fn n_units(&self) -> usize {
        self.layers.len() + 1
    }

    /// Unit `u`: a decoder layer, or the head for `u == layers.len()`.
    pub fn unit(&self, u: usize) -> &UnitShape {
        if u < self.layers.len() {
            &self.layers[u]
        } else {
            &self.head
        }
    }

    /// All weight bytes that are placed (layers and head; not the
    /// embedding table, which stays on storage).
    pub fn placed_bytes(&self) -> u64 {
        self.layers.iter().map(UnitShape::bytes).sum::<u64>() + self.head.bytes()
    }

    /// Bytes of the f32 activation of `tokens` tokens crossing a link.
    pub fn activation_bytes(&self, tokens: u32) -> u64 {
        tokens as u64 * self.hidden as u64 * 4
    }

    /// Working memory of a device that runs `tokens` tokens at once with
    /// `ctx` tokens of context.
    pub fn scratch_bytes(&self, tokens: u32, ctx: u32) -> u64 {
        tokens as u64
            * (self.scratch_bytes_per_token + ctx as u64 * self.scratch_bytes_per_token_ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_70b_matches_published_figures() {
        let m = ModelShape::llama3_70b();
        assert_eq!(m.layers.len(), 80);
        // 855.6 M parameters per layer in BF16, plus two f32 norms.
        let params = (m.layers[0].bytes() - 2 * 8192 * 4) / 2;
        assert_eq!(params / 100_000, 8556);
        // 1.05 B parameters in the head.
        assert_eq!((m.head.bytes() - 8192 * 4) / 2 / 10_000_000, 105);
        // f32 KV: 640 KiB per token over all layers.
        let kv: u64 = m.layers.iter().map(|l| l.kv_bytes_per_token).sum();
        assert_eq!(kv, 640 * 1024);
        // About 141 GB with the embedding table.
        let total = m.placed_bytes() + 128256 * 8192 * 2;
        assert_eq!(total / 1_000_000_000, 141);
    }
}
