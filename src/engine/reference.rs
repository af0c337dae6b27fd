//! The plain reference forward pass: one token at a time, every weight
//! dequantized by `model::dtype`, sums in f64, no SIMD and no threads. It
//! reads like the maths and is slow; tests hold the fast path against it
//! (STYLE.md, habit 1).

use super::weights::{Model, Unit, UnitWeights};
use super::EngineError;
use crate::compute::cpu::blocks;
use crate::compute::cpu::QMatrix;

fn matvec(w: &QMatrix, x: &[f32]) -> Result<Vec<f32>, EngineError> {
    let rb = w.row_bytes();
    let mut row = vec![0f32; w.cols];
    (0..w.rows)
        .map(|r| {
            blocks::dequantize_packed(w.ty, w.packing, &w.data[r * rb..(r + 1) * rb], &mut row)?;
            Ok(row
                .iter()
                .zip(x)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32)
        })
        .collect()
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &g)| (v as f64 * scale) as f32 * g)
        .collect()
}

fn rope(x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(cs) {
            let (a, b) = (pair[0] as f64, pair[1] as f64);
            pair[0] = (a * c as f64 - b * s as f64) as f32;
            pair[1] = (a * s as f64 + b * c as f64) as f32;
        }
    }
}

/// Logits after each token of `ids`, one row of `n_vocab` per token.
pub fn reference_logits(model: &Model, ids: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
    let c = &model.config;
    let (d, hd, group) = (c.n_embd, c.head_dim, c.n_head / c.n_head_kv);
    let mut keys = vec![Vec::<Vec<f32>>::new(); c.n_layer];
    let mut values = vec![Vec::<Vec<f32>>::new(); c.n_layer];
    let mut out = Vec::with_capacity(ids.len());
    let mut cs = vec![(0f32, 0f32); hd / 2];
    for (pos, &id) in ids.iter().enumerate() {
        let mut x = vec![0f32; d];
        model.embed(id, &mut x)?;
        model.rope_at(pos, &mut cs);
        for l in 0..c.n_layer {
            let (UnitWeights::Attn(a), UnitWeights::Mlp(m)) =
                (model.weights(Unit::Attn(l))?, model.weights(Unit::Mlp(l))?)
            else {
                unreachable!("units give weights of their own kind")
            };
            let xn = rmsnorm(&x, a.norm, c.rms_eps);
            let mut q = matvec(&a.q, &xn)?;
            let mut k = matvec(&a.k, &xn)?;
            let v = matvec(&a.v, &xn)?;
            rope(&mut q, hd, &cs);
            rope(&mut k, hd, &cs);
            keys[l].push(k);
            values[l].push(v);
            let mut attn = vec![0f32; c.q_dim()];
            for h in 0..c.n_head {
                let kvh = h / group;
                let qh = &q[h * hd..(h + 1) * hd];
                let scores: Vec<f64> = keys[l]
                    .iter()
                    .map(|k| {
                        let kh = &k[kvh * hd..(kvh + 1) * hd];
                        qh.iter()
                            .zip(kh)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (i, o) in attn[h * hd..(h + 1) * hd].iter_mut().enumerate() {
                    *o = e
                        .iter()
                        .zip(&values[l])
                        .map(|(p, v)| p / sum * v[kvh * hd + i] as f64)
                        .sum::<f64>() as f32;
                }
            }
            let o = matvec(&a.o, &attn)?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = rmsnorm(&x, m.norm, c.rms_eps);
            let gate = matvec(&m.gate, &xn)?;
            let up = matvec(&m.up, &xn)?;
            let h: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| ((g as f64 / (1.0 + (-g as f64).exp())) * u as f64) as f32)
                .collect();
            let down = matvec(&m.down, &h)?;
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let xn = rmsnorm(&x, model.output_norm(), c.rms_eps);
        let UnitWeights::Head(head) = model.weights(Unit::Head)? else {
            unreachable!("units give weights of their own kind")
        };
        out.push(matvec(&head, &xn)?);
    }
    Ok(out)
}
