//! The non-matmul operators of a Llama layer, each with one fixed
//! reduction order so that results do not depend on the ISA or threads.
//!
//! Operators that need fused multiply-adds run on the detected ISA through
//! `dispatch!`; the rest use plain IEEE additions and multiplications only,
//! which every CPU rounds the same way.

use super::simd::{simd_fn, tree_sum, Isa, Lanes};

/// `sum(a[j] * b[j])` in the canonical order (lane `j % 16`, then the tree).
/// `a.len()` must be a multiple of 16.
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
    assert!(n % 16 == 0 && x.len() == out.len() && x.len() % n == 0);
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

/// `e^x` with mul/add only (no fused operations), so every CPU gives the same
/// bits. Relative error about 2 ulp; `exp(x) = 0` below -87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < -87.0 {
        return 0.0;
    }
    let x = x.min(88.5);
    // Round x·log2(e) to the nearest integer: adding 1.5·2^23 pushes the
    // fraction bits out of the mantissa (round to nearest even).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor polynomial of e^r on |r| <= ln2/2.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // Scale by 2^n in two steps so that n = 128 does not overflow the
    // exponent field before the multiply.
    let n = n as i32;
    let h = n / 2;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - h + 127) as u32) << 23);
    (p * s1) * s2
}

/// SiLU(gate) * up, in place in `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = (x / (1.0 + exp(-x))) * u;
    }
}

/// Softmax in place: `e^(x - max) / sum`, the sum in the canonical order.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = [0f32; 16];
    for (j, v) in x.iter_mut().enumerate() {
        *v = exp(*v - max);
        lanes[j % 16] += *v;
    }
    let sum = tree_sum(lanes);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
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

/// Causal attention of one query head over positions `0..=pos` of a KV cache
/// laid out `[position][kv_head][head_dim]`.
///
/// `scores` must hold `pos + 1` floats; `out` gets `head_dim` floats.
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
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
    assert!(hd % 16 == 0 && hd <= 256 && q.len() == hd && out.len() == hd);
    assert!(k.len() >= (pos + 1) * stride && v.len() >= (pos + 1) * stride);
    let scores = &mut scores[..pos + 1];
    let scale = 1.0 / (hd as f32).sqrt();
    // SAFETY: lengths checked above.
    unsafe {
        scores_on(isa, q, k, kv_head * hd, stride, scale, scores);
        softmax(scores);
        mix_on(isa, scores, v, kv_head * hd, stride, out);
    }
}

simd_fn! {
    /// `scores[t] = dot(q, k[t]) * scale` over the head at `offset`.
    unsafe fn scores_on<V: Lanes>(q: &[f32], k: &[f32], offset: usize, stride: usize, scale: f32, scores: &mut [f32]) {
        for (t, s) in scores.iter_mut().enumerate() {
            let kp = k.as_ptr().add(t * stride + offset);
            *s = dot::<V>(q.as_ptr(), kp, q.len()) * scale;
        }
    }
}

simd_fn! {
    /// `out = sum_t p[t] * v[t]`, in increasing t, over the head at `offset`.
    unsafe fn mix_on<V: Lanes>(p: &[f32], v: &[f32], offset: usize, stride: usize, out: &mut [f32]) {
        let mut acc = [V::zero(); 16];
        let chunks = out.len() / 16;
        for (t, &pt) in p.iter().enumerate() {
            let pv = V::splat(pt);
            let vp = v.as_ptr().add(t * stride + offset);
            for (c, a) in acc.iter_mut().take(chunks).enumerate() {
                *a = V::fma(pv, V::load(vp.add(c * 16)), *a);
            }
        }
        for (c, a) in acc.iter().take(chunks).enumerate() {
            a.store(out.as_mut_ptr().add(c * 16));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
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
