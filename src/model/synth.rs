//! Llama-shaped models with random weights, for tests and benchmarks.
//!
//! The weights are random but valid blocks of the chosen type, so every
//! kernel runs on real data layouts; the model writes through `GgufWriter`
//! and streams its tensors, so a multi-gigabyte preset needs little memory.

use std::path::Path;

use super::config::Role;
use super::dtype::{random_blocks, GgmlType};
use super::gguf::{GgufError, GgufWriter, Value};

/// The shape and types of a synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
    pub context_length: usize,
    /// Type of the layer matrices.
    pub weights: GgmlType,
    /// Type of the token embedding (and of the head when not tied).
    pub embeddings: GgmlType,
    pub tied_output: bool,
    /// Adds a `rope_freqs` tensor (Llama-3 style frequency divisors).
    pub rope_freqs: bool,
    pub seed: u64,
}

impl SynthSpec {
    /// A model small enough for unit tests.
    pub fn tiny(weights: GgmlType) -> SynthSpec {
        SynthSpec {
            n_layer: 2,
            n_embd: 256,
            n_ff: 512,
            n_head: 4,
            n_head_kv: 2,
            n_vocab: 512,
            context_length: 256,
            weights,
            embeddings: weights,
            tied_output: true,
            rope_freqs: false,
            seed: 7,
        }
    }

    /// Named presets for `loip synth`.
    pub fn preset(name: &str) -> Option<SynthSpec> {
        let tinyllama = |weights| SynthSpec {
            n_layer: 22,
            n_embd: 2048,
            n_ff: 5632,
            n_head: 32,
            n_head_kv: 4,
            n_vocab: 32000,
            context_length: 2048,
            weights,
            embeddings: weights,
            tied_output: false,
            rope_freqs: false,
            seed: 11,
        };
        Some(match name {
            "tiny" => Self::tiny(GgmlType::Q4_1),
            "tinyllama-1.1b-f16" => tinyllama(GgmlType::F16),
            // About 210 MB of F16: big enough that a budget test means
            // something, small enough for CI.
            "budget-test" => SynthSpec {
                n_layer: 8,
                n_embd: 1024,
                n_ff: 2816,
                n_head: 16,
                n_head_kv: 4,
                n_vocab: 8000,
                context_length: 1024,
                weights: GgmlType::F16,
                embeddings: GgmlType::F16,
                tied_output: false,
                rope_freqs: false,
                seed: 17,
            },
            "tinyllama-1.1b-q4_k" => tinyllama(GgmlType::Q4_K),
            "smollm2-135m-shape" => SynthSpec {
                n_layer: 30,
                n_embd: 576,
                n_ff: 1536,
                n_head: 9,
                n_head_kv: 3,
                n_vocab: 49152,
                context_length: 2048,
                weights: GgmlType::Q4_1,
                embeddings: GgmlType::Q8_0,
                tied_output: true,
                rope_freqs: false,
                seed: 13,
            },
            _ => return None,
        })
    }

    pub const PRESETS: [&'static str; 4] = [
        "tiny",
        "smollm2-135m-shape",
        "tinyllama-1.1b-f16",
        "tinyllama-1.1b-q4_k",
    ];

    /// The writer for this model; `write` or `to_bytes` produces it.
    pub fn writer(&self) -> GgufWriter {
        let mut w = GgufWriter::new();
        let u = |v: usize| Value::U32(v as u32);
        w.add_kv("general.architecture", Value::String("llama".into()))
            .add_kv("general.name", Value::String("loip synthetic".into()))
            .add_kv("llama.block_count", u(self.n_layer))
            .add_kv("llama.vocab_size", u(self.n_vocab))
            .add_kv("llama.embedding_length", u(self.n_embd))
            .add_kv("llama.feed_forward_length", u(self.n_ff))
            .add_kv("llama.attention.head_count", u(self.n_head))
            .add_kv("llama.attention.head_count_kv", u(self.n_head_kv))
            .add_kv("llama.context_length", u(self.context_length))
            .add_kv("llama.rope.freq_base", Value::F32(10000.0))
            .add_kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
            .add_kv("tokenizer.ggml.eos_token_id", Value::U32(2))
            .add_kv("general.alignment", Value::U32(32));
        let head_dim = self.n_embd / self.n_head;
        let mut seed = self.seed;
        let mut next_seed = || {
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            seed
        };
        let mut matrix =
            |w: &mut GgufWriter, name: String, cols: usize, rows: usize, ty: GgmlType| {
                let s = next_seed();
                let blocks_per_row = cols / ty.block_size();
                w.add_tensor_with(&name, &[cols as u64, rows as u64], ty, move |out| {
                    // A few rows at a time keeps memory small for big presets.
                    let step = 64;
                    for r0 in (0..rows).step_by(step) {
                        let n = step.min(rows - r0);
                        out.write_all(&random_blocks(ty, n * blocks_per_row, s ^ r0 as u64))?;
                    }
                    Ok(())
                });
            };
        let vector = |w: &mut GgufWriter, name: String, n: usize, s: u64| {
            let v: Vec<u8> = (0..n)
                .flat_map(|i| (1.0f32 + 0.01 * (((i as u64 ^ s) % 17) as f32 - 8.0)).to_le_bytes())
                .collect();
            w.add_tensor(&name, &[n as u64], GgmlType::F32, v);
        };
        matrix(
            &mut w,
            Role::TokenEmbd.name(0),
            self.n_embd,
            self.n_vocab,
            self.embeddings,
        );
        vector(&mut w, Role::OutputNorm.name(0), self.n_embd, 1);
        if !self.tied_output {
            matrix(
                &mut w,
                Role::Output.name(0),
                self.n_embd,
                self.n_vocab,
                self.embeddings,
            );
        }
        if self.rope_freqs {
            let f: Vec<u8> = (0..head_dim / 2)
                .flat_map(|i| (1.0f32 + i as f32 / 8.0).to_le_bytes())
                .collect();
            w.add_tensor(
                &Role::RopeFreqs.name(0),
                &[(head_dim / 2) as u64],
                GgmlType::F32,
                f,
            );
        }
        let (q, kv) = (self.n_head * head_dim, self.n_head_kv * head_dim);
        for l in 0..self.n_layer {
            vector(&mut w, Role::AttnNorm.name(l), self.n_embd, 2 + l as u64);
            matrix(&mut w, Role::AttnQ.name(l), self.n_embd, q, self.weights);
            matrix(&mut w, Role::AttnK.name(l), self.n_embd, kv, self.weights);
            matrix(&mut w, Role::AttnV.name(l), self.n_embd, kv, self.weights);
            matrix(
                &mut w,
                Role::AttnOutput.name(l),
                q,
                self.n_embd,
                self.weights,
            );
            vector(&mut w, Role::FfnNorm.name(l), self.n_embd, 3 + l as u64);
            matrix(
                &mut w,
                Role::FfnGate.name(l),
                self.n_embd,
                self.n_ff,
                self.weights,
            );
            matrix(
                &mut w,
                Role::FfnUp.name(l),
                self.n_embd,
                self.n_ff,
                self.weights,
            );
            matrix(
                &mut w,
                Role::FfnDown.name(l),
                self.n_ff,
                self.n_embd,
                self.weights,
            );
        }
        w
    }

    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        self.writer().write(path)
    }
}
