//! Matrix products on quantized blocks, in the canonical reduction order.
//!
//! `out[t][r] = dot(row r of W, x[t])` for every token `t`. Each (row, token)
//! accumulator sees the row's weights in the same order whatever the tile
//! shape, the thread count or the number of tokens, so a batched product is
//! bit-identical to one product per token (DESIGN.md §2).

use super::blocks::{Formats, Packing, Unpack, ViaReference, MAX_CHUNKS};
use super::pool::{share, Pool, SendPtr};
use super::simd::{simd_fn, Isa, Lanes};
use crate::model::dtype::GgmlType;

/// A weight matrix: `rows` rows of `cols` elements of type `ty`, its
/// blocks laid out as `packing` says.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub packing: Packing,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// A matrix in the GGUF file's own layout.
    pub fn gguf(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> QMatrix<'a> {
        QMatrix {
            ty,
            packing: Packing::Gguf,
            rows,
            cols,
            data,
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.packing.block_bytes(self.ty)
    }

    /// Rows `[r0, r1)` as a matrix of their own.
    pub fn rows_slice(&self, r0: usize, r1: usize) -> QMatrix<'a> {
        let rb = self.row_bytes();
        QMatrix {
            ty: self.ty,
            packing: self.packing,
            rows: r1 - r0,
            cols: self.cols,
            data: &self.data[r0 * rb..r1 * rb],
        }
    }
}

/// How many tiles ahead each row stream is prefetched. A tile's rows are
/// adjacent, so this reaches into the tiles that follow; measured on decode
/// (SmolLM2, 2 threads): 384 bytes ahead 117 tok/s, 1 tile 163, 3 tiles
/// 200, 6 tiles 187.
const PREFETCH_TILES: usize = 3;

/// How many of its own rows ahead each row of a tile whose rows are apart
/// (a stream of its own) is prefetched: 2, 4 and 8 measured alike.
const STREAM_AHEAD_ROWS: usize = 4;

/// Accumulates one tile of `R` rows by `T` tokens. The tile's rows are
/// `step` rows apart (1: adjacent), and so are their outputs.
///
/// # Safety
/// `w` points at `R` rows of `nblocks` blocks each, `step * row_bytes`
/// apart; `x` at `T` vectors of `nblocks * qk` floats, `x_stride` apart;
/// `out` has room for `T` rows of output, `out_stride` apart, and
/// `(R - 1) * step + 1` columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<V: Lanes, U: Unpack<V>, const R: usize, const T: usize>(
    u: &U,
    w: *const u8,
    row_bytes: usize,
    step: usize,
    nblocks: usize,
    x: *const f32,
    x_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let qk = u.qk();
    let chunks = qk / 16;
    let bytes = u.bytes();
    let mut acc = [[V::zero(); T]; R];
    let mut wv = [[V::zero(); MAX_CHUNKS]; R];
    // Adjacent rows make one stream, `PREFETCH_TILES` tiles ahead; rows
    // apart make R streams, each `STREAM_AHEAD_ROWS` of its rows ahead.
    let ahead = if step == 1 {
        PREFETCH_TILES * R * row_bytes
    } else {
        STREAM_AHEAD_ROWS * row_bytes
    };
    for b in 0..nblocks {
        for r in 0..R {
            let p = w.add(r * step * row_bytes + b * bytes);
            // The hardware prefetchers alone keep too few lines in flight
            // (without this the product streams at a fraction of the rate,
            // rows adjacent or apart); ask for each row's lines well
            // before the tile that needs them.
            V::prefetch(p.wrapping_add(ahead));
            u.unpack(p, &mut wv[r]);
        }
        for c in 0..chunks {
            for t in 0..T {
                let xv = V::load(x.add(t * x_stride + b * qk + c * 16));
                for r in 0..R {
                    acc[r][t] = V::fma(wv[r][c], xv, acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            *out.add(t * out_stride + r * step) = acc[r][t].hsum();
        }
    }
}

/// Products for rows `[r0, r1)` and all `n_tok` tokens.
#[inline(always)]
#[allow(clippy::int_plus_one)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<V: Lanes, U: Unpack<V>>(
    u: &U,
    w: &QMatrix,
    r0: usize,
    r1: usize,
    x: *const f32,
    n_tok: usize,
    out: *mut f32,
) {
    let rb = w.row_bytes();
    let nb = w.cols / u.qk();
    let base = w.data.as_ptr();
    let small = u.qk() <= 32;
    let mut t = 0;
    while t < n_tok {
        let left = n_tok - t;
        let xt = x.add(t * w.cols);
        let ot = out.add(t * w.rows);
        // A product of one to three vectors streams its weights from
        // memory. Rows a quarter (or half) of the run apart make separate
        // streams, which the hardware prefetchers follow better than the
        // one stream of adjacent rows: the product reads ~25% faster from a
        // working set past the cache (`cargo bench --bench stream`). Each
        // row's sum is the same whatever rows share its tile.
        macro_rules! tiles {
            ($R:literal, $T:literal, $apart:expr) => {{
                let n_tiles = (r1 - r0) / $R;
                // Tile i starts at row r0 + i * next; its rows are `step` apart.
                let (next, step) = if $apart { (1, n_tiles) } else { ($R, 1) };
                for i in 0..n_tiles {
                    let r = r0 + i * next;
                    tile::<V, U, $R, $T>(
                        u,
                        base.add(r * rb),
                        rb,
                        step,
                        nb,
                        xt,
                        w.cols,
                        ot.add(r),
                        w.rows,
                    );
                }
                for r in r0 + $R * n_tiles..r1 {
                    tile::<V, U, 1, $T>(
                        u,
                        base.add(r * rb),
                        rb,
                        1,
                        nb,
                        xt,
                        w.cols,
                        ot.add(r),
                        w.rows,
                    );
                }
                t += $T;
            }};
        }
        if left >= 8 {
            tiles!(1, 8, false);
        } else if left >= 4 {
            tiles!(1, 4, false);
        } else if left >= 2 && small && V::VECTORS >= 32 {
            tiles!(4, 2, true);
        } else if left >= 2 && small {
            tiles!(2, 2, true);
        } else if left >= 2 {
            tiles!(2, 2, false);
        } else if small {
            tiles!(4, 1, true);
        } else {
            tiles!(1, 1, false);
        }
    }
}

/// `out[t * w.rows + r] = dot(row r, x[t * w.cols ..])` for `t < n_tok`,
/// on the pool's threads, each owning a contiguous range of rows.
pub fn matmul(pool: &Pool, w: &QMatrix, x: &[f32], n_tok: usize, out: &mut [f32]) {
    matmul_many_isa(Isa::detect(), pool, &mut [(w, out)], x, n_tok)
}

/// Several products of the same input in one dispatch (Q, K and V; gate and
/// up), which halves the per-step cost of waking the pool.
pub fn matmul_many(pool: &Pool, jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n_tok: usize) {
    matmul_many_isa(Isa::detect(), pool, jobs, x, n_tok)
}

/// Tasks per thread: a few, so that a thread the OS delays can be covered
/// by the others, and each task is still a long run of contiguous rows.
/// A product of one to three vectors streams its weights from memory at
/// the rate the core keeps cache misses in flight, and one task per thread
/// (one long run of rows each) measured about 5% faster decode steps than
/// four (SmolLM2-135M, 2 threads); more vectors make it compute-bound.
fn tasks_per_thread(n_tok: usize) -> usize {
    if n_tok < 4 {
        1
    } else {
        4
    }
}

/// `matmul_many` on a chosen ISA (tests compare them).
pub fn matmul_many_isa(
    isa: Isa,
    pool: &Pool,
    jobs: &mut [(&QMatrix, &mut [f32])],
    x: &[f32],
    n_tok: usize,
) {
    for (w, out) in jobs.iter() {
        assert!(
            w.cols % 16 == 0 && w.cols % w.ty.block_size() == 0,
            "matmul: {} columns of {} are not whole 16-lane chunks",
            w.cols,
            w.ty
        );
        assert_eq!(w.data.len(), w.rows * w.row_bytes(), "matmul: weight bytes");
        assert!(x.len() >= n_tok * w.cols, "matmul: input too short");
        assert!(out.len() >= n_tok * w.rows, "matmul: output too short");
    }
    let targets: Vec<(QMatrix, SendPtr<f32>)> = jobs
        .iter_mut()
        .map(|(w, o)| (**w, SendPtr(o.as_mut_ptr())))
        .collect();
    let xp = x.as_ptr() as usize;
    pool.run(tasks_per_thread(n_tok) * pool.n_threads(), &|i, n, _| {
        for (w, op) in &targets {
            let (r0, r1) = share(w.rows, i, n, 4);
            if r0 < r1 {
                // SAFETY: shapes checked above; each thread writes only its rows.
                unsafe { rows_on(isa, w, r0, r1, xp as *const f32, n_tok, op.0) }
            }
        }
    });
}

simd_fn! {
    /// Picks the unpacker for the weight type and runs `rows` on `isa`.
    unsafe fn rows_on<V: Formats>(w: &QMatrix, r0: usize, r1: usize, x: *const f32, n_tok: usize, out: *mut f32) {
        rows_by_type::<V>(w, r0, r1, x, n_tok, out)
    }
}

/// Runs `rows` with the unpacker for the matrix's type and packing.
#[inline(always)]
unsafe fn rows_by_type<V: Formats>(
    w: &QMatrix,
    r0: usize,
    r1: usize,
    x: *const f32,
    n_tok: usize,
    out: *mut f32,
) {
    match (w.packing, w.ty) {
        (Packing::Wide, GgmlType::Q4_1) => rows(&V::WideQ4_1::default(), w, r0, r1, x, n_tok, out),
        (Packing::Wide, GgmlType::Q8_0) => rows(&V::WideQ8_0::default(), w, r0, r1, x, n_tok, out),
        (_, GgmlType::Q4_1) => rows(&V::Q4_1::default(), w, r0, r1, x, n_tok, out),
        (_, GgmlType::Q8_0) => rows(&V::Q8_0::default(), w, r0, r1, x, n_tok, out),
        (_, GgmlType::F32) => rows(&V::F32::default(), w, r0, r1, x, n_tok, out),
        (_, GgmlType::F16) => rows(&V::F16::default(), w, r0, r1, x, n_tok, out),
        (_, ty) => rows::<V, _>(&ViaReference(ty), w, r0, r1, x, n_tok, out),
    }
}
