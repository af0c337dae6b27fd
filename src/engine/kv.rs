//! The KV cache of one sequence: f32 keys and values per layer.

/// Positions are reserved in steps of this many, so that a growing
/// sequence reallocates rarely and memory follows use.
const GROW: usize = 256;

/// Keys and values of one sequence, laid out `[position][kv_head][head_dim]`
/// per layer. Activations stay f32 (DESIGN.md §2).
#[derive(Clone, Debug)]
pub struct KvCache {
    kv_dim: usize,
    len: usize,
    /// The layers this cache holds positions for: all of them on one node,
    /// a window's on a ring node (the others stay empty).
    held: std::ops::Range<usize>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(n_layer: usize, kv_dim: usize) -> KvCache {
        KvCache::for_layers(n_layer, kv_dim, 0..n_layer)
    }

    /// A cache for a window: indexed by the model's layer numbers, holding
    /// positions only for the layers of `held`.
    pub fn for_layers(n_layer: usize, kv_dim: usize, held: std::ops::Range<usize>) -> KvCache {
        KvCache {
            kv_dim,
            len: 0,
            held: held.start.min(n_layer)..held.end.min(n_layer),
            k: vec![Vec::new(); n_layer],
            v: vec![Vec::new(); n_layer],
        }
    }

    /// Layers the cache holds.
    pub fn layers(&self) -> usize {
        self.k.len()
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions `n..`; the next token goes at position `n`.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Bytes held, for budget accounting.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.capacity() * 4).sum()
    }

    /// Bytes per position across all layers.
    pub fn bytes_per_position(n_layer: usize, kv_dim: usize) -> usize {
        2 * n_layer * kv_dim * 4
    }

    /// Makes room for positions `..end` in every layer.
    pub(crate) fn reserve(&mut self, end: usize) {
        let want = end * self.kv_dim;
        let held = self.held.clone();
        for b in self.k[held.clone()]
            .iter_mut()
            .chain(self.v[held].iter_mut())
        {
            if b.len() < want {
                let cap = end.div_ceil(GROW) * GROW * self.kv_dim;
                b.reserve_exact(cap.saturating_sub(b.len()));
                b.resize(want, 0.0);
            }
        }
    }

    /// Stores the key and value of `layer` at `pos` (room reserved before).
    pub(crate) fn put(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = pos * self.kv_dim;
        self.k[layer][at..at + self.kv_dim].copy_from_slice(k);
        self.v[layer][at..at + self.kv_dim].copy_from_slice(v);
    }

    /// Marks positions `..end` as filled.
    pub(crate) fn set_len(&mut self, end: usize) {
        self.len = end;
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}
