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
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let n = x.len() / 16 * 16;
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

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// Causal attention of the query heads of one GQA group (`q` holds
/// `q.len() / head_dim` heads that share kv head `kv_head`) over positions
/// `0..=pos` of a KV cache laid out `[position][kv_head][head_dim]` (a cache
/// that keeps each head's positions together passes `n_head_kv` = 1 and
/// `kv_head` = 0). Each key and value is read once for the whole group;
/// every head's result has the bits of that head attended alone.
///
/// `scores` must hold `group * (pos + 1)` floats; `out` is as long as `q`.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv_head: usize,
    shape: AttnShape,
    pos: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let stride = shape.n_head_kv * hd;
    let n = pos + 1;
    assert!(hd.is_multiple_of(16) && hd <= 256 && q.len().is_multiple_of(hd));
    assert!(out.len() == q.len() && scores.len() >= q.len() / hd * n);
    assert!(k.len() >= n * stride && v.len() >= n * stride && kv_head < shape.n_head_kv);
    let scale = 1.0 / (hd as f32).sqrt();
    let at = (kv_head * hd, stride);
    // SAFETY: lengths checked above.
    unsafe {
        for g0 in (0..q.len() / hd).step_by(GROUP_TILE) {
            let heads = (q.len() / hd - g0).min(GROUP_TILE);
            let (q, out) = (
                &q[g0 * hd..][..heads * hd],
                &mut out[g0 * hd..][..heads * hd],
            );
            let scores = &mut scores[..heads * n];
            scores_on(isa, q, heads, k, at, scale, scores);
            for row in scores.chunks_exact_mut(n) {
                softmax(row);
            }
            mix_on(isa, scores, heads, v, at, out);
        }
    }
}

/// Query heads attended together: their accumulators stay in registers.
const GROUP_TILE: usize = 4;

/// Runs `$f::<V, G>` for the group size `$g` (1 to `GROUP_TILE`).
macro_rules! by_group {
    ($g:expr, $f:ident::<$V:ident>($($arg:expr),*)) => {
        match $g {
            1 => $f::<$V, 1>($($arg),*),
            2 => $f::<$V, 2>($($arg),*),
            3 => $f::<$V, 3>($($arg),*),
            _ => $f::<$V, 4>($($arg),*),
        }
    };
}

simd_fn! {
    /// `scores[g][t] = dot(q[g], k[t]) * scale` for the `heads` heads of
    /// `q`, `k[t]` at `at = (offset, stride)`.
    unsafe fn scores_on<V: Lanes>(q: &[f32], heads: usize, k: &[f32], at: (usize, usize), scale: f32, scores: &mut [f32]) {
        by_group!(heads, scores_tile::<V>(q, k, at, scale, scores))
    }
}

#[inline(always)]
unsafe fn scores_tile<V: Lanes, const G: usize>(
    q: &[f32],
    k: &[f32],
    (offset, stride): (usize, usize),
    scale: f32,
    scores: &mut [f32],
) {
    let hd = q.len() / G;
    let n = scores.len() / G;
    let (qp, sp) = (q.as_ptr(), scores.as_mut_ptr());
    for t in 0..n {
        let kp = k.as_ptr().add(t * stride + offset);
        let mut acc = [V::zero(); G];
        for c in (0..hd).step_by(16) {
            let kv = V::load(kp.add(c));
            for (g, a) in acc.iter_mut().enumerate() {
                *a = V::fma(V::load(qp.add(g * hd + c)), kv, *a);
            }
        }
        for (g, a) in acc.iter().enumerate() {
            *sp.add(g * n + t) = a.hsum() * scale;
        }
    }
}

simd_fn! {
    /// `out[g] = sum_t p[g][t] * v[t]`, in increasing t, for the `heads`
    /// heads of `out`, `v[t]` at `at = (offset, stride)`.
    unsafe fn mix_on<V: Lanes>(p: &[f32], heads: usize, v: &[f32], at: (usize, usize), out: &mut [f32]) {
        by_group!(heads, mix_tile::<V>(p, v, at, out))
    }
}

#[inline(always)]
unsafe fn mix_tile<V: Lanes, const G: usize>(
    p: &[f32],
    v: &[f32],
    (offset, stride): (usize, usize),
    out: &mut [f32],
) {
    let hd = out.len() / G;
    let n = p.len() / G;
    let chunks = hd / 16;
    let mut acc = [[V::zero(); 16]; G];
    for t in 0..n {
        let vp = v.as_ptr().add(t * stride + offset);
        let mut pt = [V::zero(); G];
        for (g, x) in pt.iter_mut().enumerate() {
            *x = V::splat(*p.get_unchecked(g * n + t));
        }
        for c in 0..chunks {
            let vv = V::load(vp.add(c * 16));
            for g in 0..G {
                acc[g][c] = V::fma(pt[g], vv, acc[g][c]);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        for (c, x) in a.iter().take(chunks).enumerate() {
            x.store(out.as_mut_ptr().add(g * hd + c * 16));
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
