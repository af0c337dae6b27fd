//! The KV cache of one sequence: f32 keys and values per layer.

/// Positions are reserved in steps of this many, so that a growing
/// sequence reallocates rarely and memory follows use.
pub const GROW: usize = 256;

/// Keys and values of one sequence, laid out `[kv_head][position][head_dim]`
/// per layer, so that attention reads each head's keys and values as one
/// contiguous stream (the position-major layout read 256 of every 768
/// bytes and cost a quarter of a decode step at 600 positions). Activations
/// stay f32 (DESIGN.md §2).
#[derive(Clone, Debug)]
pub struct KvCache {
    n_head_kv: usize,
    head_dim: usize,
    /// Positions each head has room for.
    cap: usize,
    len: usize,
    /// The layers this cache holds positions for: all of them on one node,
    /// a window's on a ring node (the others stay empty).
    held: std::ops::Range<usize>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(n_layer: usize, n_head_kv: usize, head_dim: usize) -> KvCache {
        KvCache::for_layers(n_layer, n_head_kv, head_dim, 0..n_layer)
    }

    /// A cache for a window: indexed by the model's layer numbers, holding
    /// positions only for the layers of `held`.
    pub fn for_layers(
        n_layer: usize,
        n_head_kv: usize,
        head_dim: usize,
        held: std::ops::Range<usize>,
    ) -> KvCache {
        KvCache {
            n_head_kv,
            head_dim,
            cap: 0,
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

    /// Positions reserved (a multiple of [`GROW`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Forgets every position and gives the memory back, for a sequence
    /// that ended: a cache reused for another keeps no capacity it does
    /// not need, so that the bytes held follow the sequences running.
    pub fn clear(&mut self) {
        self.len = 0;
        self.cap = 0;
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            *b = Vec::new();
        }
    }

    /// Bytes held, for budget accounting.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.capacity() * 4).sum()
    }

    /// Bytes the filled positions take in the layers this cache holds
    /// (at most [`KvCache::bytes`]).
    pub fn used_bytes(&self) -> usize {
        2 * self.held.len() * self.n_head_kv * self.head_dim * 4 * self.len.min(self.cap)
    }

    /// Bytes per position across all layers.
    pub fn bytes_per_position(n_layer: usize, kv_dim: usize) -> usize {
        2 * n_layer * kv_dim * 4
    }

    /// Makes room for positions `..end` in every layer, moving each head's
    /// filled positions to its new place.
    pub(crate) fn reserve(&mut self, end: usize) {
        if end <= self.cap {
            return;
        }
        let cap = end.div_ceil(GROW) * GROW;
        let hd = self.head_dim;
        let (old, keep) = (self.cap * hd, self.len.min(self.cap) * hd);
        let held = self.held.clone();
        for b in self.k[held.clone()]
            .iter_mut()
            .chain(self.v[held].iter_mut())
        {
            let mut grown = Vec::new();
            grown.reserve_exact(self.n_head_kv * cap * hd);
            grown.resize(self.n_head_kv * cap * hd, 0.0);
            for h in 0..self.n_head_kv.min(b.len() / old.max(1)) {
                grown[h * cap * hd..][..keep].copy_from_slice(&b[h * old..][..keep]);
            }
            *b = grown;
        }
        self.cap = cap;
    }

    /// Stores the key and value of `layer` at `pos` (room reserved before);
    /// `k` and `v` hold every kv head, head after head.
    pub(crate) fn put(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (hd, cap) = (self.head_dim, self.cap);
        for h in 0..self.n_head_kv {
            let at = (h * cap + pos) * hd;
            self.k[layer][at..at + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.v[layer][at..at + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Marks positions `..end` as filled.
    pub(crate) fn set_len(&mut self, end: usize) {
        self.len = end;
    }

    /// The keys and values of one kv head of `layer`, `[position][head_dim]`
    /// for every reserved position.
    pub(crate) fn head(&self, layer: usize, kv_head: usize) -> (&[f32], &[f32]) {
        let n = self.cap * self.head_dim;
        (
            &self.k[layer][kv_head * n..][..n],
            &self.v[layer][kv_head * n..][..n],
        )
    }
}
