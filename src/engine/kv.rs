//! The KV cache of one sequence: f32 keys and values per layer.

use crate::compute::cpu::ops::{self, HeadCache};

/// Positions are reserved in steps of this many, so that a growing
/// sequence reallocates rarely and memory follows use.
pub const GROW: usize = 256;
const _: () = assert!(GROW.is_multiple_of(ops::KEY_BLOCK));

/// Keys and values of one sequence, each kv head's positions together per
/// layer, so that attention reads each head's keys and values as one
/// contiguous stream (the position-major layout read 256 of every 768
/// bytes and cost a quarter of a decode step at 600 positions). Within a
/// head, keys are in transposed blocks of 16 positions (`ops::key_index`),
/// which let attention score 16 positions per vector, and values in chunks
/// of 16 dimensions (`ops::value_index`), so that threads splitting a head's
/// dimensions each read a contiguous stream. Activations stay f32
/// (DESIGN.md §2).
///
/// Every held layer's keys and values live in one anonymous buffer advised
/// for transparent huge pages: a decode step streams the whole cache, and
/// through 4 KiB pages (a page per key block) it ran at about 60% of the
/// speed two threads stream a huge-page buffer.
#[derive(Debug)]
pub struct KvCache {
    n_layer: usize,
    n_head_kv: usize,
    head_dim: usize,
    /// Positions each head has room for.
    cap: usize,
    len: usize,
    /// The layers this cache holds positions for: all of them on one node,
    /// a window's on a ring node (the others stay empty).
    held: std::ops::Range<usize>,
    /// For each held layer, its keys then its values, `n_head_kv * cap *
    /// head_dim` floats each; `None` until the first reservation.
    buf: Option<memmap2::MmapMut>,
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
        assert!(
            head_dim.is_multiple_of(16),
            "head_dim {head_dim} is not a multiple of 16"
        );
        KvCache {
            n_layer,
            n_head_kv,
            head_dim,
            cap: 0,
            len: 0,
            held: held.start.min(n_layer)..held.end.min(n_layer),
            buf: None,
        }
    }

    /// Layers the cache holds.
    pub fn layers(&self) -> usize {
        self.n_layer
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
        self.buf = None;
    }

    /// Bytes held, for budget accounting.
    pub fn bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
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

    /// Floats of one layer's keys (or values) for `cap` positions.
    fn part(&self, cap: usize) -> usize {
        self.n_head_kv * cap * self.head_dim
    }

    fn floats(&self) -> &[f32] {
        self.buf
            .as_ref()
            .map_or(&[], |b| bytemuck::cast_slice(&b[..]))
    }

    /// Makes room for positions `..end` in every layer, moving each head's
    /// filled positions to its new place.
    pub(crate) fn reserve(&mut self, end: usize) {
        if end <= self.cap || self.held.is_empty() {
            return;
        }
        let cap = end.div_ceil(GROW) * GROW;
        let hd = self.head_dim;
        let bytes = 2 * self.held.len() * self.part(cap) * 4;
        let mut grown = memmap2::MmapMut::map_anon(bytes).expect("mapping KV cache memory");
        #[cfg(target_os = "linux")]
        let _ = grown.advise(memmap2::Advice::HugePage);
        // Whole key blocks: a block holds positions of both sides of `len`.
        let keep = ops::score_row(self.len.min(self.cap)).min(self.cap);
        let (old_part, new_part) = (self.part(self.cap), self.part(cap));
        let old = self.floats();
        let dst: &mut [f32] = bytemuck::cast_slice_mut(&mut grown[..]);
        // A head's filled part is `runs` runs, each at the start of its
        // stretch of positions: one for keys (key blocks follow each other),
        // one per value chunk of 16 dimensions.
        let (key_runs, value_runs) = (1, hd / 16);
        if !old.is_empty() {
            for i in 0..self.held.len() {
                for (half, runs) in [(0, key_runs), (1, value_runs)] {
                    let src = &old[(2 * i + half) * old_part..][..old_part];
                    let to = &mut dst[(2 * i + half) * new_part..][..new_part];
                    let (from, into, n) = (self.cap * hd / runs, cap * hd / runs, keep * hd / runs);
                    for h in 0..self.n_head_kv {
                        for r in 0..runs {
                            to[h * cap * hd + r * into..][..n]
                                .copy_from_slice(&src[h * self.cap * hd + r * from..][..n]);
                        }
                    }
                }
            }
        }
        self.buf = Some(grown);
        self.cap = cap;
    }

    /// The keys and values of `layer`, all heads (room reserved before).
    fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let part = self.part(self.cap);
        let i = layer - self.held.start;
        let buf = self.buf.as_mut().expect("positions reserved before use");
        let all: &mut [f32] = bytemuck::cast_slice_mut(&mut buf[..]);
        all[2 * i * part..(2 * i + 2) * part].split_at_mut(part)
    }

    /// Stores the key and value of `layer` at `pos` (room reserved before);
    /// `k` and `v` hold every kv head, head after head.
    pub(crate) fn put(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (hd, cap, n_head_kv) = (self.head_dim, self.cap, self.n_head_kv);
        assert!(pos < cap && self.held.contains(&layer));
        let (keys, values) = self.layer_mut(layer);
        for h in 0..n_head_kv {
            let head = h * cap * hd..(h + 1) * cap * hd;
            let keys = &mut keys[head.clone()];
            for (d, &x) in k[h * hd..(h + 1) * hd].iter().enumerate() {
                keys[ops::key_index(pos, d, hd)] = x;
            }
            let values = &mut values[head];
            for (c, x) in v[h * hd..(h + 1) * hd].chunks_exact(16).enumerate() {
                let at = ops::value_index(pos, c * 16, cap);
                values[at..at + 16].copy_from_slice(x);
            }
        }
    }

    /// Marks positions `..end` as filled.
    pub(crate) fn set_len(&mut self, end: usize) {
        self.len = end;
    }

    /// The keys and values of one kv head of `layer`, for every reserved
    /// position.
    pub(crate) fn head(&self, layer: usize, kv_head: usize) -> HeadCache<'_> {
        let (part, n) = (self.part(self.cap), self.cap * self.head_dim);
        let i = layer - self.held.start;
        let all = self.floats();
        HeadCache {
            keys: &all[2 * i * part + kv_head * n..][..n],
            values: &all[(2 * i + 1) * part + kv_head * n..][..n],
            head_dim: self.head_dim,
            cap: self.cap,
        }
    }
}
