//! A loaded model: its configuration and views of its weights.
//!
//! Matrices stay in the mapped file, exactly as stored; only the small
//! vectors (norm weights, RoPE frequencies) are copied out as f32.

use std::path::Path;
use std::sync::Arc;

use super::EngineError;
use crate::compute::cpu::QMatrix;
use crate::model::config::{Config, Role, RopeScaling};
use crate::model::dtype;
use crate::model::gguf::{Gguf, TensorInfo};

/// The weights of one decoder layer, wherever they live.
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a> {
    pub attn_norm: &'a [f32],
    pub q: QMatrix<'a>,
    pub k: QMatrix<'a>,
    pub v: QMatrix<'a>,
    pub o: QMatrix<'a>,
    pub ffn_norm: &'a [f32],
    pub gate: QMatrix<'a>,
    pub up: QMatrix<'a>,
    pub down: QMatrix<'a>,
}

struct LayerNorms {
    attn: Vec<f32>,
    ffn: Vec<f32>,
}

pub struct Model {
    pub config: Config,
    gguf: Arc<Gguf>,
    /// The tensor data copied into anonymous memory backed by huge pages,
    /// when the model is resident; the mapped file otherwise.
    resident: Option<memmap2::MmapMut>,
    norms: Vec<LayerNorms>,
    output_norm: Vec<f32>,
    /// Per pair i of a head: the rotation frequency, scaling applied.
    rope_freqs: Vec<f64>,
    /// Positions are multiplied by this before rotation (linear scaling).
    rope_pos_scale: f64,
}

impl Model {
    /// Opens a model and copies its weights into memory (resident).
    pub fn open(path: &Path) -> Result<Model, EngineError> {
        let mut m = Model::from_gguf(Arc::new(Gguf::open(path)?))?;
        m.make_resident()?;
        Ok(m)
    }

    /// Copies every tensor into anonymous memory advised for transparent
    /// huge pages: reading weights through 4 KiB page-cache pages costs about
    /// a third of decode speed in TLB misses (DESIGN.md §8). The bytes are
    /// the file's, unchanged.
    pub fn make_resident(&mut self) -> Result<(), EngineError> {
        let data = self.gguf.data_offset() as usize;
        let len = self.gguf.file_len() as usize - data;
        let mut buf = memmap2::MmapMut::map_anon(len.max(1)).map_err(EngineError::Memory)?;
        #[cfg(target_os = "linux")]
        let _ = buf.advise(memmap2::Advice::HugePage);
        for t in self.gguf.tensors() {
            let at = t.offset as usize;
            buf[at..at + t.size as usize].copy_from_slice(self.gguf.tensor_data(t));
        }
        self.resident = Some(buf);
        Ok(())
    }

    fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        match &self.resident {
            Some(buf) => &buf[t.offset as usize..(t.offset + t.size) as usize],
            None => self.gguf.tensor_data(t),
        }
    }

    pub fn from_gguf(gguf: Arc<Gguf>) -> Result<Model, EngineError> {
        let config = Config::from_gguf(&gguf)?;
        let vector = |name: String| -> Result<Vec<f32>, EngineError> {
            let t = gguf
                .tensor(&name)
                .ok_or(EngineError::MissingTensor(name.clone()))?;
            Ok(dtype::dequantize_to_vec(
                t.ty,
                gguf.tensor_data(t),
                t.n_elements() as usize,
            )?)
        };
        let norms = (0..config.n_layer)
            .map(|l| {
                Ok(LayerNorms {
                    attn: vector(Role::AttnNorm.name(l))?,
                    ffn: vector(Role::FfnNorm.name(l))?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let output_norm = vector(Role::OutputNorm.name(0))?;
        let divisors = if config.has_rope_freqs {
            Some(vector(Role::RopeFreqs.name(0))?)
        } else {
            None
        };
        let (rope_freqs, rope_pos_scale) = rope_frequencies(&config, divisors.as_deref());
        Ok(Model {
            config,
            gguf,
            resident: None,
            norms,
            output_norm,
            rope_freqs,
            rope_pos_scale,
        })
    }

    pub fn gguf(&self) -> &Arc<Gguf> {
        &self.gguf
    }

    fn matrix(&self, name: &str) -> QMatrix<'_> {
        // Present and shaped as the role table says: checked by Config.
        let t = self.gguf.tensor(name).expect("tensor checked at load");
        QMatrix {
            ty: t.ty,
            cols: t.dims[0] as usize,
            rows: t.dims[1] as usize,
            data: self.tensor_bytes(t),
        }
    }

    /// Layer `l`'s weights, read in place from the mapped file.
    pub fn layer(&self, l: usize) -> LayerWeights<'_> {
        let m = |r: Role| self.matrix(&r.name(l));
        LayerWeights {
            attn_norm: &self.norms[l].attn,
            q: m(Role::AttnQ),
            k: m(Role::AttnK),
            v: m(Role::AttnV),
            o: m(Role::AttnOutput),
            ffn_norm: &self.norms[l].ffn,
            gate: m(Role::FfnGate),
            up: m(Role::FfnUp),
            down: m(Role::FfnDown),
        }
    }

    pub fn embeddings(&self) -> QMatrix<'_> {
        self.matrix(&Role::TokenEmbd.name(0))
    }

    /// The output head (the embeddings when they are tied).
    pub fn output(&self) -> QMatrix<'_> {
        if self.config.tied_output {
            self.embeddings()
        } else {
            self.matrix(&Role::Output.name(0))
        }
    }

    pub fn output_norm(&self) -> &[f32] {
        &self.output_norm
    }

    /// Writes token `id`'s embedding, dequantized exactly, into `out`.
    pub fn embed(&self, id: u32, out: &mut [f32]) -> Result<(), EngineError> {
        let e = self.embeddings();
        let id = id as usize;
        if id >= e.rows {
            return Err(EngineError::TokenOutOfRange {
                id: id as u64,
                vocab: e.rows,
            });
        }
        let rb = e.row_bytes();
        dtype::dequantize_row(e.ty, &e.data[id * rb..(id + 1) * rb], out)?;
        Ok(())
    }

    /// `(cos, sin)` of every rotation pair at position `pos`.
    pub fn rope_at(&self, pos: usize, out: &mut [(f32, f32)]) {
        let p = pos as f64 * self.rope_pos_scale;
        for (o, &f) in out.iter_mut().zip(&self.rope_freqs) {
            let a = p * f;
            *o = (a.cos() as f32, a.sin() as f32);
        }
    }
}

/// Rotation frequencies per pair, in f64 so that every device rounds the
/// same angle to the same f32 cosine.
fn rope_frequencies(c: &Config, divisors: Option<&[f32]>) -> (Vec<f64>, f64) {
    let hd = c.head_dim as f64;
    let base = c.rope_base as f64;
    let mut freqs: Vec<f64> = (0..c.head_dim / 2)
        .map(|i| base.powf(-2.0 * i as f64 / hd))
        .collect();
    let mut pos_scale = 1.0;
    if let Some(div) = divisors {
        for (f, &d) in freqs.iter_mut().zip(div) {
            *f /= d as f64;
        }
    } else {
        match c.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => pos_scale = 1.0 / factor as f64,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let (factor, lo, hi, orig) = (
                    factor as f64,
                    low_freq_factor as f64,
                    high_freq_factor as f64,
                    original_context as f64,
                );
                for f in freqs.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > orig / lo {
                        *f /= factor;
                    } else if wavelen >= orig / hi {
                        let smooth = (orig / wavelen - lo) / (hi - lo);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
    }
    (freqs, pos_scale)
}
