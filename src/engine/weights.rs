//! A loaded model: its configuration and views of its weights.
//!
//! Matrices stay in the mapped file, exactly as stored; only the small
//! vectors (norm weights, RoPE frequencies) are copied out as f32.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::EngineError;
use crate::compute::cpu::blocks::{self, Packing};
use crate::compute::cpu::QMatrix;
use crate::model::config::{Config, Role, RopeScaling};
use crate::model::dtype;
use crate::model::gguf::{Gguf, TensorInfo};

/// A unit of placement: the attention or the MLP part of a layer, or the
/// output head. Each is resident or streamed as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Unit {
    Attn(usize),
    Mlp(usize),
    Head,
}

impl Unit {
    /// Every unit of an `n_layer` model, in the order a step uses them.
    pub fn all(n_layer: usize) -> Vec<Unit> {
        (0..n_layer)
            .flat_map(|l| [Unit::Attn(l), Unit::Mlp(l)])
            .chain([Unit::Head])
            .collect()
    }
}

impl Unit {
    /// The unit a name written by `Display` stands for (`attn.3`, `mlp.3`,
    /// `head`).
    pub fn parse(s: &str) -> Option<Unit> {
        if s == "head" {
            return Some(Unit::Head);
        }
        let (kind, layer) = s.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        match kind {
            "attn" => Some(Unit::Attn(layer)),
            "mlp" => Some(Unit::Mlp(layer)),
            _ => None,
        }
    }

    /// The layer of an attention or MLP unit; 0 for the head.
    pub fn layer(self) -> usize {
        match self {
            Unit::Attn(l) | Unit::Mlp(l) => l,
            Unit::Head => 0,
        }
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Attn(l) => write!(f, "attn.{l}"),
            Unit::Mlp(l) => write!(f, "mlp.{l}"),
            Unit::Head => f.write_str("head"),
        }
    }
}

/// The attention weights of one layer, wherever they live.
#[derive(Clone, Copy, Debug)]
pub struct AttnWeights<'a> {
    pub norm: &'a [f32],
    pub q: QMatrix<'a>,
    pub k: QMatrix<'a>,
    pub v: QMatrix<'a>,
    pub o: QMatrix<'a>,
}

/// The MLP weights of one layer, wherever they live.
#[derive(Clone, Copy, Debug)]
pub struct MlpWeights<'a> {
    pub norm: &'a [f32],
    pub gate: QMatrix<'a>,
    pub up: QMatrix<'a>,
    pub down: QMatrix<'a>,
}

/// The matrices of a unit, viewed in some memory.
#[derive(Clone, Copy, Debug)]
pub enum UnitWeights<'a> {
    Attn(AttnWeights<'a>),
    Mlp(MlpWeights<'a>),
    Head(QMatrix<'a>),
}

/// Weights copied into memory.
///
/// The units resident at load share one buffer (`regions[0]`), each unit
/// starting on a page, so that transparent huge pages cover them as they
/// did when the buffer held nothing else. A unit demoted later has its
/// pages given back to the kernel (`MADV_DONTNEED`, and `MADV_NOHUGEPAGE`
/// so that khugepaged does not fill the hole again); promoted again, it is
/// read back into the same place. A unit that was not resident at load
/// gets a buffer of its own when promoted, unmapped when it is demoted.
struct Resident {
    regions: Vec<Option<memmap2::MmapMut>>,
    /// Where each unit that has (or had) memory lives: (region, offset,
    /// page-rounded length).
    places: HashMap<Unit, (usize, usize, usize)>,
    /// Resident tensors only: name → (region, offset, length, packing).
    index: HashMap<String, (usize, usize, usize, Packing)>,
}

/// Resident units start on a page, so that one unit's pages can be given
/// back without touching its neighbours'.
const PAGE: usize = 4096;

struct LayerNorms {
    attn: Vec<f32>,
    ffn: Vec<f32>,
}

pub struct Model {
    pub config: Config,
    gguf: Arc<Gguf>,
    /// The matrices of resident units, copied into anonymous memory.
    resident: Resident,
    /// The model file, for reading embedding rows that are not resident.
    file: Option<File>,
    norms: Vec<LayerNorms>,
    output_norm: Vec<f32>,
    /// Per pair i of a head: the rotation frequency, scaling applied.
    rope_freqs: Vec<f64>,
    /// Positions are multiplied by this before rotation (linear scaling).
    rope_pos_scale: f64,
}

impl Model {
    /// Opens a model with every unit resident.
    pub fn open(path: &Path) -> Result<Model, EngineError> {
        let mut m = Model::from_gguf(Arc::new(Gguf::open(path)?))?;
        m.make_resident(|_| true)?;
        Ok(m)
    }

    /// Opens a model, copying into memory only the units `keep` selects.
    pub fn open_with(path: &Path, keep: impl Fn(Unit) -> bool) -> Result<Model, EngineError> {
        let mut m = Model::from_gguf(Arc::new(Gguf::open(path)?))?;
        m.make_resident(keep)?;
        Ok(m)
    }

    /// The tensors of `unit`, by role.
    pub fn unit_tensors(&self, unit: Unit) -> Vec<(Role, &TensorInfo)> {
        let roles: &[Role] = match unit {
            Unit::Attn(_) => &[Role::AttnQ, Role::AttnK, Role::AttnV, Role::AttnOutput],
            Unit::Mlp(_) => &[Role::FfnGate, Role::FfnUp, Role::FfnDown],
            Unit::Head if self.config.tied_output => &[Role::TokenEmbd],
            Unit::Head => &[Role::Output],
        };
        let layer = match unit {
            Unit::Attn(l) | Unit::Mlp(l) => l,
            Unit::Head => 0,
        };
        // A shard lacks the tensors of other nodes' units: they are left
        // out here, and using such a unit is a `MissingTensor` error.
        roles
            .iter()
            .filter_map(|&r| Some((r, self.gguf.tensor(&r.name(layer))?)))
            .collect()
    }

    /// Bytes `unit` takes when resident (packed for the kernels).
    pub fn resident_bytes(&self, unit: Unit) -> u64 {
        self.unit_tensors(unit)
            .iter()
            .map(|(_, t)| tensor_resident_bytes(t))
            .sum()
    }

    /// Copies the matrices of the units `keep` selects into anonymous memory
    /// advised for transparent huge pages: reading weights through 4 KiB
    /// page-cache pages costs about a third of decode speed in TLB misses
    /// (DESIGN.md §8). They are repacked on the way (`Packing::preferred`),
    /// which regroups their bits without changing any value. Data is read
    /// with `pread`, so the file's pages never count in this process's
    /// resident memory.
    pub fn make_resident(&mut self, keep: impl Fn(Unit) -> bool) -> Result<(), EngineError> {
        let units: Vec<Unit> = Unit::all(self.config.n_layer)
            .into_iter()
            .filter(|&u| keep(u))
            .collect();
        let total: usize = units.iter().map(|&u| self.unit_len(u)).sum();
        let mut buf = memmap2::MmapMut::map_anon(total.max(1)).map_err(EngineError::Memory)?;
        #[cfg(target_os = "linux")]
        let _ = buf.advise(memmap2::Advice::HugePage);
        let mut places = HashMap::with_capacity(units.len());
        let mut index = HashMap::new();
        let mut at = 0;
        for &u in &units {
            let len = self.unit_len(u);
            self.fill(u, &mut buf[at..at + len], |name, off, n, packing| {
                index.insert(name, (0, at + off, n, packing));
            })?;
            places.insert(u, (0, at, len));
            at += len;
        }
        self.resident = Resident {
            regions: vec![Some(buf)],
            places,
            index,
        };
        Ok(())
    }

    /// Page-rounded bytes `unit` takes in a resident buffer.
    fn unit_len(&self, unit: Unit) -> usize {
        (self.resident_bytes(unit) as usize).next_multiple_of(PAGE)
    }

    /// Reads `unit`'s tensors from the file, packs them into `dst` (at
    /// least [`Model::unit_len`] bytes) and reports where each went.
    fn fill(
        &self,
        unit: Unit,
        dst: &mut [u8],
        mut placed: impl FnMut(String, usize, usize, Packing),
    ) -> Result<(), EngineError> {
        let (mut at, mut raw, mut packed) = (0, Vec::new(), Vec::new());
        for (_, t) in self.unit_tensors(unit) {
            let (len, packing) = packed_len(t);
            let bytes = match &self.file {
                Some(f) => {
                    raw.resize(t.size as usize, 0);
                    f.read_exact_at(&mut raw, self.gguf.data_offset() + t.offset)
                        .map_err(|e| EngineError::Read(t.name.clone(), e.to_string()))?;
                    &raw[..]
                }
                None => self.gguf.tensor_data(t),
            };
            packed.clear();
            blocks::pack(t.ty, packing, bytes, &mut packed);
            dst[at..at + len].copy_from_slice(&packed);
            placed(t.name.clone(), at, len, packing);
            at += len.next_multiple_of(64);
        }
        Ok(())
    }

    /// Stops keeping `unit` in memory: its tensors leave the index and its
    /// pages go back to the kernel. Reads of it must then come from a
    /// streamer or the mapped file. Needs `&mut self`, so no step can be
    /// reading the unit meanwhile.
    pub fn demote(&mut self, unit: Unit) {
        let Some(&(region, at, len)) = self.resident.places.get(&unit) else {
            return;
        };
        if !self.is_resident(unit) {
            return;
        }
        let names: Vec<String> = self
            .unit_tensors(unit)
            .iter()
            .map(|(_, t)| t.name.clone())
            .collect();
        for name in names {
            self.resident.index.remove(&name);
        }
        if region == 0 {
            if let Some(buf) = &self.resident.regions[0] {
                #[cfg(target_os = "linux")]
                let _ = buf.advise_range(memmap2::Advice::NoHugePage, at, len);
                // SAFETY: the range is this unit's own pages (units start on
                // a page and are page-rounded), which nothing reads any more:
                // its tensors just left the index, and `&mut self` rules out
                // a borrow of them. The pages read as zeros until refilled.
                let _ = unsafe {
                    buf.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, len)
                };
            }
        } else {
            self.resident.regions[region] = None;
            self.resident.places.remove(&unit);
        }
    }

    /// Reads `unit` back into memory (a no-op when it is resident): into
    /// its place in the load-time buffer when it had one, else into a
    /// buffer of its own. On a read error the unit stays streamed.
    pub fn promote(&mut self, unit: Unit) -> Result<(), EngineError> {
        if self.is_resident(unit) {
            return Ok(());
        }
        let len = self.unit_len(unit);
        let (region, at) = match self.resident.places.get(&unit) {
            Some(&(region, at, _)) => (region, at),
            None => {
                let buf = memmap2::MmapMut::map_anon(len).map_err(EngineError::Memory)?;
                #[cfg(target_os = "linux")]
                let _ = buf.advise(memmap2::Advice::HugePage);
                let region = match self.resident.regions.iter().position(Option::is_none) {
                    Some(free) if free > 0 => free,
                    _ => {
                        self.resident.regions.push(None);
                        self.resident.regions.len() - 1
                    }
                };
                self.resident.regions[region] = Some(buf);
                self.resident.places.insert(unit, (region, 0, len));
                (region, 0)
            }
        };
        let mut buf = self.resident.regions[region]
            .take()
            .expect("a unit's region exists");
        #[cfg(target_os = "linux")]
        if region == 0 {
            let _ = buf.advise_range(memmap2::Advice::HugePage, at, len);
        }
        let mut placed = Vec::new();
        let r = self.fill(unit, &mut buf[at..at + len], |name, off, n, packing| {
            placed.push((name, (region, at + off, n, packing)));
        });
        self.resident.regions[region] = Some(buf);
        match r {
            Ok(()) => {
                self.resident.index.extend(placed);
                Ok(())
            }
            Err(e) => {
                if region != 0 {
                    self.resident.regions[region] = None;
                    self.resident.places.remove(&unit);
                }
                Err(e)
            }
        }
    }

    /// Whether every matrix of `unit` is resident.
    pub fn is_resident(&self, unit: Unit) -> bool {
        self.unit_tensors(unit)
            .iter()
            .all(|(_, t)| self.resident.index.contains_key(&t.name))
    }

    /// The weights of `unit`, each tensor's bytes and packing given by `src`.
    pub fn unit_weights<'a>(
        &'a self,
        unit: Unit,
        src: impl Fn(&TensorInfo) -> Result<(&'a [u8], Packing), EngineError>,
    ) -> Result<UnitWeights<'a>, EngineError> {
        let m = |r: Role, l: usize| -> Result<QMatrix<'a>, EngineError> {
            // Absent only from a shard (a node's part of the model).
            let t = self
                .gguf
                .tensor(&r.name(l))
                .ok_or_else(|| EngineError::MissingTensor(r.name(l)))?;
            let (data, packing) = src(t)?;
            Ok(QMatrix {
                ty: t.ty,
                packing,
                cols: t.dims[0] as usize,
                rows: t.dims[1] as usize,
                data,
            })
        };
        Ok(match unit {
            Unit::Attn(l) => UnitWeights::Attn(AttnWeights {
                norm: &self.norms[l].attn,
                q: m(Role::AttnQ, l)?,
                k: m(Role::AttnK, l)?,
                v: m(Role::AttnV, l)?,
                o: m(Role::AttnOutput, l)?,
            }),
            Unit::Mlp(l) => UnitWeights::Mlp(MlpWeights {
                norm: &self.norms[l].ffn,
                gate: m(Role::FfnGate, l)?,
                up: m(Role::FfnUp, l)?,
                down: m(Role::FfnDown, l)?,
            }),
            Unit::Head => UnitWeights::Head(m(
                if self.config.tied_output {
                    Role::TokenEmbd
                } else {
                    Role::Output
                },
                0,
            )?),
        })
    }

    /// The weights of a resident `unit`.
    pub fn resident_weights(&self, unit: Unit) -> Result<UnitWeights<'_>, EngineError> {
        self.unit_weights(unit, |t| {
            let (region, at, len, packing) = *self
                .resident
                .index
                .get(&t.name)
                .ok_or_else(|| EngineError::NotResident(t.name.clone()))?;
            let buf = self.resident.regions[region]
                .as_ref()
                .ok_or_else(|| EngineError::NotResident(t.name.clone()))?;
            Ok((&buf[at..at + len], packing))
        })
    }

    /// The weights of `unit`: resident when it is, else from the mapped file.
    pub fn weights(&self, unit: Unit) -> Result<UnitWeights<'_>, EngineError> {
        if self.is_resident(unit) {
            self.resident_weights(unit)
        } else {
            self.mapped_weights(unit)
        }
    }

    /// The weights of `unit` read in place from the mapped file (the page
    /// cache decides what stays in memory).
    pub fn mapped_weights(&self, unit: Unit) -> Result<UnitWeights<'_>, EngineError> {
        self.unit_weights(unit, |t| Ok((self.gguf.tensor_data(t), Packing::Gguf)))
    }

    pub fn from_gguf(gguf: Arc<Gguf>) -> Result<Model, EngineError> {
        let config = Config::from_gguf(&gguf)?;
        let file = match gguf.path() {
            Some(p) => Some(
                File::open(p)
                    .map_err(|e| EngineError::Read(p.display().to_string(), e.to_string()))?,
            ),
            None => None,
        };
        // Read with `pread`, not through the mapping: a storage error then
        // is an error naming the tensor, where a page fault on the mapping
        // would kill the process with SIGBUS.
        let mut raw = Vec::new();
        let mut vector = |name: String| -> Result<Vec<f32>, EngineError> {
            let t = gguf
                .tensor(&name)
                .ok_or(EngineError::MissingTensor(name.clone()))?;
            let bytes = match &file {
                Some(f) => {
                    raw.resize(t.size as usize, 0);
                    f.read_exact_at(&mut raw, gguf.data_offset() + t.offset)
                        .map_err(|e| EngineError::Read(t.name.clone(), e.to_string()))?;
                    &raw[..]
                }
                None => gguf.tensor_data(t),
            };
            Ok(dtype::dequantize_to_vec(
                t.ty,
                bytes,
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
            file,
            gguf,
            resident: Resident {
                regions: Vec::new(),
                places: HashMap::new(),
                index: HashMap::new(),
            },
            norms,
            output_norm,
            rope_freqs,
            rope_pos_scale,
        })
    }

    pub fn gguf(&self) -> &Arc<Gguf> {
        &self.gguf
    }

    pub fn output_norm(&self) -> &[f32] {
        &self.output_norm
    }

    /// Writes token `id`'s embedding, dequantized exactly, into `out`:
    /// from memory when the embeddings are resident, else one row read from
    /// the file.
    pub fn embed(&self, id: u32, out: &mut [f32]) -> Result<(), EngineError> {
        let t = self
            .gguf
            .tensor(&Role::TokenEmbd.name(0))
            .ok_or_else(|| EngineError::MissingTensor(Role::TokenEmbd.name(0)))?;
        let vocab = t.dims[1] as usize;
        let id = id as usize;
        if id >= vocab {
            return Err(EngineError::TokenOutOfRange {
                id: id as u64,
                vocab,
            });
        }
        let cols = t.dims[0] as usize;
        if let Some((&(_, at, len, packing), Some(buf))) = self
            .resident
            .index
            .get(&t.name)
            .map(|e| (e, self.resident.regions[e.0].as_ref()))
        {
            let rb = len / vocab;
            let row = &buf[at + id * rb..at + (id + 1) * rb];
            blocks::dequantize_packed(t.ty, packing, row, out)?;
            return Ok(());
        }
        let rb = t.ty.row_bytes(cols as u64).unwrap_or(0) as usize;
        match &self.file {
            Some(f) => {
                let mut row = vec![0u8; rb];
                f.read_exact_at(
                    &mut row,
                    self.gguf.data_offset() + t.offset + (id * rb) as u64,
                )
                .map_err(|e| EngineError::Read(t.name.clone(), e.to_string()))?;
                dtype::dequantize_row(t.ty, &row, out)?;
            }
            None => {
                dtype::dequantize_row(t.ty, &self.gguf.tensor_data(t)[id * rb..(id + 1) * rb], out)?
            }
        }
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

/// Bytes tensor `t` takes when resident: packed for the kernels, rounded up
/// to a cache line. [`Model::resident_bytes`] sums them over a unit.
pub fn tensor_resident_bytes(t: &TensorInfo) -> u64 {
    packed_len(t).0.next_multiple_of(64) as u64
}

/// Bytes and packing of tensor `t` when resident.
fn packed_len(t: &TensorInfo) -> (usize, Packing) {
    let packing = Packing::preferred(t.ty);
    (
        t.n_elements() as usize / t.ty.block_size() * packing.block_bytes(t.ty),
        packing,
    )
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
