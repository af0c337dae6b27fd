//! The non-matmul operators of a Llama layer, each with one fixed
//! reduction order so that results do not depend on the ISA or threads.
//!
//! Operators that need fused multiply-adds run on the detected ISA through
//! `simd_fn!`; the rest use plain IEEE additions and multiplications only,
//! which every CPU rounds the same way.

use super::simd::{simd_fn, tree_sum, Isa, Lanes, Scalar};

/// `sum(a[j] * b[j])` in the canonical order (lane `j % 16`, then the tree).
///
/// # Safety
/// `a` and `b` are valid for `n` floats, `n` is a multiple of 16, and the
/// CPU has the features of `V`.
#[inline(always)]
pub unsafe fn dot<V: Lanes>(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = V::zero();
    let mut j = 0;
    while j < n {
        acc = V::fma(V::load(a.add(j)), V::load(b.add(j)), acc);
        j += 16;
    }
    acc.hsum()
}

/// RMSNorm of each of the `n_tok` rows of `x` (length `w.len()`), scaled by
/// `w`, into `out`: `out = (x * (1 / sqrt(mean(x²) + eps))) * w`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert!(n.is_multiple_of(16) && x.len() == out.len() && x.len().is_multiple_of(n));
    // SAFETY: lengths checked above.
    unsafe { rmsnorm_on(Isa::detect(), x, w, eps, out) }
}

simd_fn! {
    unsafe fn rmsnorm_on<V: Lanes>(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let n = w.len();
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let ss = dot::<V>(xr.as_ptr(), xr.as_ptr(), n);
            let scale = 1.0 / (ss / n as f32 + eps).sqrt();
            for ((o, &xi), &wi) in or.iter_mut().zip(xr).zip(w) {
                *o = (xi * scale) * wi;
            }
        }
    }
}

/// `e^x` on 16 lanes with plain IEEE additions, subtractions and
/// multiplications only (no fused operations), so every ISA gives the same
/// bits. Relative error about 2 ulp; inputs are clamped to [-86, 88], so
/// `e^x` never underflows to a subnormal nor overflows (softmax and SiLU
/// never need more range).
///
/// # Safety
/// The CPU has the features of `V`.
#[inline(always)]
pub unsafe fn exp_lanes<V: Lanes>(x: V) -> V {
    let x = V::max(V::min(x, V::splat(88.0)), V::splat(-86.0));
    // Round x·log2(e) to the nearest integer: adding 1.5·2^23 pushes the
    // fraction bits out of the mantissa (round to nearest even).
    const MAGIC: f32 = 12_582_912.0;
    let m = V::splat(MAGIC);
    let n = V::sub(V::add(V::mul(x, V::splat(std::f32::consts::LOG2_E)), m), m);
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = V::sub(
        V::sub(x, V::mul(n, V::splat(LN2_HI))),
        V::mul(n, V::splat(LN2_LO)),
    );
    // Taylor polynomial of e^r on |r| <= ln2/2.
    let mut p = V::splat(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = V::add(V::mul(p, r), V::splat(c));
    }
    V::mul(p, V::pow2i(n))
}

/// `e^x` for one value: `exp_lanes` on the scalar lanes.
pub fn exp(x: f32) -> f32 {
    // SAFETY: the scalar lanes need no CPU feature.
    unsafe { exp_lanes(Scalar::splat(x)).0[0] }
}

/// SiLU(gate) * up, in place in `gate`: `(g / (1 + e^-g)) * u`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    // SAFETY: lengths checked.
    unsafe { swiglu_on(Isa::detect(), gate, up) }
}

simd_fn! {
    /// `swiglu` on a chosen ISA.
    ///
    /// # Safety
    /// `isa` is one this CPU has (`Isa::available`).
    pub unsafe fn swiglu_on<V: Lanes>(gate: &mut [f32], up: &[f32]) {
        let n = gate.len() / 16 * 16;
        let one = V::splat(1.0);
        let zero = V::zero();
        let mut j = 0;
        while j < n {
            let g = V::load(gate.as_ptr().add(j));
            let e = exp_lanes(V::sub(zero, g));
            let y = V::mul(V::div(g, V::add(one, e)), V::load(up.as_ptr().add(j)));
            y.store(gate.as_mut_ptr().add(j));
            j += 16;
        }
        for i in n..gate.len() {
            let g = gate[i];
            gate[i] = (g / (1.0 + exp(0.0 - g))) * up[i];
        }
    }
}

/// Softmax in place: `e^(x - max) / sum`, the sum in the canonical order.
pub fn softmax(x: &mut [f32]) {
    // SAFETY: the slice bounds every access.
    unsafe { softmax_on(Isa::detect(), x) }
}

simd_fn! {
    /// `softmax` on a chosen ISA.
    ///
    /// # Safety
    /// `isa` is one this CPU has (`Isa::available`).
    pub unsafe fn softmax_on<V: Lanes>(x: &mut [f32]) {
        let n = x.len() / 16 * 16;
        // The largest score; max is exact, so the order does not matter
        // (but for the sign of a zero, which `x - max` does not see).
        let mut mv = V::splat(f32::NEG_INFINITY);
        let mut j = 0;
        while j < n {
            mv = V::max(mv, V::load(x.as_ptr().add(j)));
            j += 16;
        }
        let max = x[n..].iter().copied().fold(mv.hmax(), f32::max);
        let mv = V::splat(max);
        let mut acc = V::zero();
        let mut j = 0;
        while j < n {
            let e = exp_lanes(V::sub(V::load(x.as_ptr().add(j)), mv));
            e.store(x.as_mut_ptr().add(j));
            acc = V::add(acc, e);
            j += 16;
        }
        let mut lanes = [0f32; 16];
        acc.store(lanes.as_mut_ptr());
        for i in n..x.len() {
            x[i] = exp(x[i] - max);
            lanes[i - n] += x[i];
        }
        let inv = 1.0 / tree_sum(lanes);
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

/// Rotary position embedding ("normal" Llama style: pairs (2i, 2i+1)) for
/// one head of `cs.len()` dimensions, with `cs[i] = (cos, sin)` for pair i.
#[inline]
pub fn rope_head(x: &mut [f32], cs: &[(f32, f32)]) {
    for (pair, &(c, s)) in x.chunks_exact_mut(2).zip(cs) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// Positions per key block. A kv head's keys are stored in blocks of this
/// many positions, each block transposed (`[dim][position % KEY_BLOCK]`),
/// so that one 16-lane load holds one dimension of 16 positions and the
/// scores of 16 positions come out of one vector without a horizontal sum
/// per position.
pub const KEY_BLOCK: usize = 16;

/// Where the key of position `t`, dimension `d` lives in a kv head's key
/// blocks (`head_dim` dimensions per position).
#[inline]
pub fn key_index(t: usize, d: usize, head_dim: usize) -> usize {
    (t / KEY_BLOCK) * head_dim * KEY_BLOCK + d * KEY_BLOCK + t % KEY_BLOCK
}

/// Where the value of position `t`, dimension `d` lives in a kv head's
/// value chunks: `[d / 16][position][d % 16]` for `cap` positions, so that
/// each 16 dimensions of every position are one contiguous stream.
#[inline]
pub fn value_index(t: usize, d: usize, cap: usize) -> usize {
    (d / 16 * cap + t) * 16 + d % 16
}

/// The keys and values of one kv head, room for `cap` positions (a
/// multiple of `KEY_BLOCK`): keys in key blocks (`key_index`), values in
/// value chunks (`value_index`).
#[derive(Clone, Copy, Debug)]
pub struct HeadCache<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub head_dim: usize,
    pub cap: usize,
}

/// Floats a score row takes for `n` positions: whole key blocks.
pub fn score_row(n: usize) -> usize {
    n.div_ceil(KEY_BLOCK) * KEY_BLOCK
}

/// Causal attention of the query heads of one GQA group (`q` holds
/// `q.len() / head_dim` heads that share the kv head of `cache`) over
/// positions `0..=pos`. Each key and value is read once for the whole
/// group, and every head's result has the bits of that head attended alone
/// and of [`attend_ref`].
///
/// `scores` must hold `heads * score_row(pos + 1)` floats; `out` is as long
/// as `q`.
pub fn attend_group(
    isa: Isa,
    q: &[f32],
    cache: HeadCache<'_>,
    pos: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = cache.head_dim;
    let (n, heads) = (pos + 1, q.len() / hd.max(1));
    let row = score_row(n);
    assert!(hd.is_multiple_of(16) && hd <= 256 && q.len().is_multiple_of(hd));
    assert!(out.len() == q.len() && scores.len() >= heads * row);
    assert!(cache.cap.is_multiple_of(KEY_BLOCK) && n <= cache.cap);
    assert!(cache.keys.len() >= cache.cap * hd && cache.values.len() >= cache.cap * hd);
    // SAFETY: lengths checked above.
    unsafe {
        attn_scores(isa, q, cache, 0..row / KEY_BLOCK, row, scores.as_mut_ptr());
        for r in scores.chunks_exact_mut(row).take(heads) {
            softmax(&mut r[..n]);
        }
        let p = &scores[..heads * row];
        attn_mix(isa, p, row, n, cache, 0..hd / 16, false, out.as_mut_ptr());
    }
}

/// The reference attention of one query head over keys and values laid out
/// `[position][head_dim]`, in the canonical order that the fast kernels
/// keep: each score a `dot` (lane `j % 16`, then the tree) times
/// `1 / sqrt(head_dim)`, the softmax of `softmax`, and each output dimension
/// `sum_t p[t] * v[t]` fused-multiply-added in increasing `t`.
pub fn attend_ref(q: &[f32], keys: &[f32], values: &[f32], n: usize, out: &mut [f32]) {
    let hd = q.len();
    assert!(hd.is_multiple_of(16) && keys.len() >= n * hd && values.len() >= n * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut p: Vec<f32> = (0..n)
        .map(|t| {
            let mut lanes = [0f32; 16];
            for (j, (&a, &b)) in q.iter().zip(&keys[t * hd..(t + 1) * hd]).enumerate() {
                lanes[j % 16] = a.mul_add(b, lanes[j % 16]);
            }
            tree_sum(lanes) * scale
        })
        .collect();
    // SAFETY: the scalar lanes need no CPU feature.
    unsafe { softmax_on(Isa::Scalar, &mut p) };
    for (d, o) in out.iter_mut().enumerate() {
        *o = (0..n).fold(0.0, |acc, t| p[t].mul_add(values[t * hd + d], acc));
    }
}

/// Query heads mixed together: their accumulators stay in registers.
const GROUP_TILE: usize = 4;
/// Chunks of 16 dimensions mixed together.
const CHUNK_TILE: usize = 4;

/// Runs `$f::<V, G, ..>` for the group size `$g` (1 to `GROUP_TILE`).
macro_rules! by_group {
    ($g:expr, $f:ident::<$V:ident $(, $c:literal)?>($($arg:expr),*)) => {
        match $g {
            1 => $f::<$V, 1 $(, $c)?>($($arg),*),
            2 => $f::<$V, 2 $(, $c)?>($($arg),*),
            3 => $f::<$V, 3 $(, $c)?>($($arg),*),
            _ => $f::<$V, 4 $(, $c)?>($($arg),*),
        }
    };
}

simd_fn! {
    /// `scores[g * row + t] = dot(q[g], k[t]) / sqrt(head_dim)` for every
    /// head `g` of `q` and every position `t` of the key blocks `blocks`.
    ///
    /// # Safety
    /// `cache.keys` holds the blocks, `q` whole heads, and `scores` has room
    /// for the heads' rows of `row` floats at the blocks' positions; the CPU
    /// has the features of `isa`. Other threads may write other positions
    /// of the same rows.
    pub unsafe fn attn_scores<V: Lanes>(q: &[f32], cache: HeadCache<'_>, blocks: std::ops::Range<usize>, row: usize, scores: *mut f32) {
        let hd = cache.head_dim;
        let heads = q.len() / hd;
        for b in blocks.clone() {
            let kb = cache.keys.as_ptr().add(b * hd * KEY_BLOCK);
            // Blocks ahead are fetched while this one is scored: a block is
            // one 4 KiB page, where hardware prefetch restarts. Past the
            // run's end this fetches the blocks that follow, wherever they
            // are (no fetch faults): often the next task's, and measured
            // faster than leaving the run's last blocks unfetched.
            let ahead = KEY_AHEAD * hd * KEY_BLOCK;
            for g0 in (0..heads).step_by(GROUP_TILE) {
                let g = (heads - g0).min(GROUP_TILE);
                let (qg, sg) = (q.as_ptr().add(g0 * hd), scores.add(g0 * row + b * KEY_BLOCK));
                let ahead = if g0 == 0 { ahead } else { 0 };
                by_group!(g, block_scores::<V>(qg, kb, hd, ahead, row, sg));
            }
        }
    }
}

/// The scores of `G` heads (`q`, `hd` apart) against the 16 keys of one key
/// block, stored `row` apart from `out`: lane `l` is position `l`'s.
/// Vector `x_l` accumulates what the canonical `dot` accumulates in lane
/// `l`, for all 16 positions at once, and the lanes are then added in the
/// canonical tree (halves folded: 8, 4, 2, 1), depth first so that few
/// partial sums are live. Each key row is loaded once for all `G` heads.
/// Also fetches the rows `ahead` floats on (none when 0).
#[inline(always)]
unsafe fn block_scores<V: Lanes, const G: usize>(
    q: *const f32,
    kb: *const f32,
    hd: usize,
    ahead: usize,
    row: usize,
    out: *mut f32,
) {
    let mut halves = [[V::zero(); G]; 2];
    for (i, half) in halves.iter_mut().enumerate() {
        let mut quarters = [[V::zero(); G]; 2];
        for (j, quarter) in quarters.iter_mut().enumerate() {
            let mut pairs = [[V::zero(); G]; 2];
            for (k, pair) in pairs.iter_mut().enumerate() {
                let l = i + 2 * j + 4 * k;
                let lo = lane_dots::<V, G>(q, kb, hd, l, ahead);
                let hi = lane_dots::<V, G>(q, kb, hd, l + 8, ahead);
                for g in 0..G {
                    pair[g] = V::add(lo[g], hi[g]);
                }
            }
            for g in 0..G {
                quarter[g] = V::add(pairs[0][g], pairs[1][g]);
            }
        }
        for g in 0..G {
            half[g] = V::add(quarters[0][g], quarters[1][g]);
        }
    }
    let scale = V::splat(1.0 / (hd as f32).sqrt());
    for g in 0..G {
        V::mul(V::add(halves[0][g], halves[1][g]), scale).store(out.add(g * row));
    }
}

/// Lane `l` of `dot(q[g], k[t])` for the `G` heads and the 16 positions of
/// a key block: one key row load feeds every head.
#[inline(always)]
unsafe fn lane_dots<V: Lanes, const G: usize>(
    q: *const f32,
    kb: *const f32,
    hd: usize,
    l: usize,
    ahead: usize,
) -> [V; G] {
    let mut acc = [V::zero(); G];
    let mut d = l;
    while d < hd {
        let kr = kb.add(d * KEY_BLOCK);
        if ahead != 0 {
            V::prefetch_l2(kr.wrapping_add(ahead) as *const u8);
        }
        let k = V::load(kr);
        for (g, a) in acc.iter_mut().enumerate() {
            *a = V::fma(V::splat(*q.add(g * hd + d)), k, *a);
        }
        d += 16;
    }
    acc
}

simd_fn! {
    /// `out[g][c] = sum_t p[g][t] * v[t][c]`, in increasing `t` over
    /// `0..n`, for each head `g` of the `p` rows (`row` floats apart, as
    /// many heads as `p` holds whole rows) and
    /// the 16-dimension chunks `chunks`; `out` holds the heads' outputs,
    /// `head_dim` apart.
    ///
    /// `ahead` fetches the value streams ahead of use: for a decode step,
    /// which streams the cache from memory. A prompt's tokens find their
    /// values in cache, where fetching ahead only costs (about a third of
    /// prefill's mix time).
    ///
    /// # Safety
    /// `p` holds the heads' rows, `cache.values` `n` positions, `out` room
    /// for every head; the CPU has the features of `isa`. Only the chunks
    /// `chunks` of `out` are written: other threads may write the others.
    pub unsafe fn attn_mix<V: Lanes>(p: &[f32], row: usize, n: usize, cache: HeadCache<'_>, chunks: std::ops::Range<usize>, ahead: bool, out: *mut f32) {
        let hd = cache.head_dim;
        let heads = p.len() / row;
        for g0 in (0..heads).step_by(GROUP_TILE) {
            let g = (heads - g0).min(GROUP_TILE);
            let pg = p.as_ptr().add(g0 * row);
            let og = out.add(g0 * hd);
            let mut c = chunks.start;
            while c < chunks.end {
                let v = cache.values.as_ptr().add(c * cache.cap * 16);
                let o = og.add(c * 16);
                // Tiles of 4, 2 and 1 chunks.
                let step = match chunks.end - c {
                    1 => 1,
                    2 | 3 => 2,
                    _ => CHUNK_TILE,
                };
                match step {
                    1 => by_group!(g, mix_tile::<V, 1>(pg, row, n, v, cache.cap, hd, ahead, o)),
                    2 => by_group!(g, mix_tile::<V, 2>(pg, row, n, v, cache.cap, hd, ahead, o)),
                    _ => by_group!(g, mix_tile::<V, 4>(pg, row, n, v, cache.cap, hd, ahead, o)),
                }
                c += step;
            }
        }
    }
}

/// Positions the value streams are fetched ahead of use (into L2): a
/// decode step streams the cache from memory, and fetching 4 KiB ahead
/// per stream was the fastest of the distances tried.
const MIX_AHEAD: usize = 64;
/// Key blocks fetched ahead of use (into L2), likewise.
const KEY_AHEAD: usize = 2;

/// `mix` for `G` heads and the `C` value chunks from `v` on (`cap`
/// positions apart), every accumulator in a register.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn mix_tile<V: Lanes, const G: usize, const C: usize>(
    p: *const f32,
    row: usize,
    n: usize,
    v: *const f32,
    cap: usize,
    hd: usize,
    ahead: bool,
    out: *mut f32,
) {
    let mut acc = [[V::zero(); C]; G];
    for t in 0..n {
        let vp = v.add(t * 16);
        // Each chunk is a stream of its own, so hardware prefetch restarts
        // at every 4 KiB page of each; a fetch past `n` is harmless.
        if ahead {
            for c in 0..C {
                V::prefetch_l2(vp.wrapping_add(c * cap * 16 + MIX_AHEAD * 16) as *const u8);
            }
        }
        let mut pt = [V::zero(); G];
        for (g, x) in pt.iter_mut().enumerate() {
            *x = V::splat(*p.add(g * row + t));
        }
        for c in 0..C {
            let vv = V::load(vp.add(c * cap * 16));
            for g in 0..G {
                acc[g][c] = V::fma(pt[g], vv, acc[g][c]);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        for (c, x) in a.iter().enumerate() {
            x.store(out.add(g * hd + c * 16));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_std() {
        let mut worst = 0f64;
        let mut x = -86.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-100.0) < 1e-37);
        assert!(exp(100.0).is_finite());
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        softmax(&mut x);
        let s: f32 = x.iter().sum();
        assert!((s - 1.0).abs() < 1e-5);
    }
}
