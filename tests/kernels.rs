//! Every fast kernel against its plain reference, on every ISA this CPU has.

mod common;

use common::Rng;
use loip::compute::cpu::matmul::matmul_many_isa;
use loip::compute::cpu::ops::{self, HeadCache};
use loip::compute::cpu::{Isa, Pool, QMatrix};
use loip::model::dtype::{dequantize_row, random_blocks, vec_dot_ref, GgmlType};

fn product(isa: Isa, threads: usize, w: &QMatrix, x: &[f32], n_tok: usize) -> Vec<f32> {
    let pool = Pool::new(threads);
    let mut out = vec![f32::NAN; n_tok * w.rows];
    matmul_many_isa(isa, &pool, &mut [(w, &mut out)], x, n_tok);
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn matmul_matches_reference_for_every_type() {
    let mut rng = Rng(1);
    for ty in GgmlType::ALL {
        let (rows, cols) = (37, 512);
        let data = random_blocks(ty, rows * cols / ty.block_size(), 3);
        let w = QMatrix::gguf(ty, rows, cols, &data);
        // One vector (the decode tiles, rows apart) and several (adjacent).
        for n_tok in [1, 2, 3] {
            let x = rng.vec(n_tok * cols);
            let got = product(Isa::detect(), 2, &w, &x, n_tok);
            let rb = w.row_bytes();
            for t in 0..n_tok {
                let xt = &x[t * cols..(t + 1) * cols];
                for r in 0..rows {
                    let row = &data[r * rb..(r + 1) * rb];
                    let want = vec_dot_ref(ty, row, xt);
                    let mut deq = vec![0f32; cols];
                    dequantize_row(ty, row, &mut deq).unwrap();
                    let mag: f32 = deq.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                    let g = got[t * rows + r];
                    assert!(
                        (g - want).abs() <= 1e-5 * mag + 1e-30,
                        "{ty} row {r} of {n_tok} tokens, token {t}: {g} vs reference {want} (scale {mag})"
                    );
                }
            }
        }
    }
}

#[test]
fn every_isa_gives_the_same_bits() {
    let isas = Isa::available();
    eprintln!("ISAs on this CPU: {:?}", isas);
    let mut rng = Rng(2);
    for ty in GgmlType::ALL {
        let (rows, cols) = (21, 256);
        let data = random_blocks(ty, rows * cols / ty.block_size(), 5);
        let w = QMatrix::gguf(ty, rows, cols, &data);
        let x = rng.vec(5 * cols);
        let first = bits(&product(isas[0], 1, &w, &x, 5));
        for &isa in &isas[1..] {
            assert_eq!(first, bits(&product(isa, 1, &w, &x, 5)), "{ty} on {isa:?}");
        }
    }
}

#[test]
fn batching_and_threads_do_not_change_bits() {
    let mut rng = Rng(3);
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let (rows, cols) = (45, 512);
        let data = random_blocks(ty, rows * cols / ty.block_size(), 9);
        let w = QMatrix::gguf(ty, rows, cols, &data);
        let n_tok = 13;
        let x = rng.vec(n_tok * cols);
        for isa in Isa::available() {
            let batched = product(isa, 2, &w, &x, n_tok);
            for t in 0..n_tok {
                let single = product(isa, 1, &w, &x[t * cols..(t + 1) * cols], 1);
                assert_eq!(
                    bits(&batched[t * rows..(t + 1) * rows]),
                    bits(&single),
                    "{ty} {isa:?} token {t}"
                );
            }
            for threads in [1, 3, 4] {
                assert_eq!(
                    bits(&batched),
                    bits(&product(isa, threads, &w, &x, n_tok)),
                    "{ty} {isa:?} {threads} threads"
                );
            }
        }
    }
}

#[test]
fn rmsnorm_matches_reference_and_isas_agree() {
    let mut rng = Rng(4);
    let x = rng.vec(3 * 576);
    let w = rng.vec(576);
    let mut fast = vec![0f32; x.len()];
    ops::rmsnorm(&x, &w, 1e-5, &mut fast);
    for (row, out) in x.chunks(576).zip(fast.chunks(576)) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / 576.0;
        let s = 1.0 / (ms + 1e-5).sqrt();
        for ((&xi, &wi), &o) in row.iter().zip(&w).zip(out) {
            let want = xi as f64 * s * wi as f64;
            assert!(
                (o as f64 - want).abs() <= 1e-5 * want.abs().max(1e-3),
                "{o} vs {want}"
            );
        }
    }
}

/// One kv head's keys and values, given `[position][head_dim]`, in the
/// cache layout the kernels read (`ops::key_index`, `ops::value_index`), with
/// room for `cap` positions; the room past the given positions holds NaN,
/// which no kernel may read into a result.
fn cache_layout(k: &[f32], v: &[f32], hd: usize, cap: usize) -> (Vec<f32>, Vec<f32>) {
    let mut keys = vec![f32::NAN; cap * hd];
    let mut values = vec![f32::NAN; cap * hd];
    for t in 0..k.len() / hd {
        for d in 0..hd {
            keys[ops::key_index(t, d, hd)] = k[t * hd + d];
            values[ops::value_index(t, d, cap)] = v[t * hd + d];
        }
    }
    (keys, values)
}

#[test]
fn attention_matches_reference_and_isas_agree() {
    let mut rng = Rng(5);
    let hd = 64;
    for n in [1, 15, 16, 17, 41, 300] {
        let k = rng.vec(n * hd);
        let v = rng.vec(n * hd);
        let q: Vec<f32> = rng.vec(hd).iter().map(|x| x * 3.0).collect();
        let cap = ops::score_row(n) + 16;
        let (keys, values) = cache_layout(&k, &v, hd, cap);
        let cache = HeadCache {
            keys: &keys,
            values: &values,
            head_dim: hd,
            cap,
        };
        let mut want = vec![0f32; hd];
        ops::attend_ref(&q, &k, &v, n, &mut want);
        // The canonical order against the maths, in f64.
        let s: Vec<f64> = (0..n)
            .map(|t| {
                (0..hd)
                    .map(|i| q[i] as f64 * k[t * hd + i] as f64)
                    .sum::<f64>()
                    / 8.0
            })
            .collect();
        let m = s.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        for i in 0..hd {
            let exact: f64 = (0..n).map(|t| e[t] / sum * v[t * hd + i] as f64).sum();
            assert!(
                (want[i] as f64 - exact).abs() < 1e-5,
                "n {n}, dim {i}: {} vs {exact}",
                want[i]
            );
        }
        for isa in Isa::available() {
            let mut scores = vec![0f32; ops::score_row(n)];
            let mut out = vec![0f32; hd];
            ops::attend_group(isa, &q, cache, n - 1, &mut scores, &mut out);
            assert_eq!(bits(&out), bits(&want), "{isa:?}, {n} positions");
        }
    }
}

/// The passes attention splits across threads, run over any split of key
/// blocks and of dimensions, give the bits of the whole group at once.
#[test]
fn split_attention_passes_equal_the_whole() {
    let mut rng = Rng(8);
    let (hd, group, n) = (64, 3, 75);
    let k = rng.vec(n * hd);
    let v = rng.vec(n * hd);
    let q = rng.vec(group * hd);
    let cap = 256;
    let (keys, values) = cache_layout(&k, &v, hd, cap);
    let cache = HeadCache {
        keys: &keys,
        values: &values,
        head_dim: hd,
        cap,
    };
    let row = ops::score_row(n);
    for isa in Isa::available() {
        let mut scores = vec![0f32; group * row];
        let mut whole = vec![0f32; group * hd];
        ops::attend_group(isa, &q, cache, n - 1, &mut scores, &mut whole);
        for (blocks, chunks) in [
            (vec![0, 5], vec![0, 4]),
            (vec![0, 1, 2, 5], vec![0, 1, 3, 4]),
        ] {
            let mut split = vec![f32::NAN; group * hd];
            let mut p = vec![f32::NAN; group * row];
            // SAFETY: the buffers hold every head's row and output.
            unsafe {
                for w in blocks.windows(2) {
                    ops::attn_scores(isa, &q, cache, w[0]..w[1], row, p.as_mut_ptr());
                }
                for r in p.chunks_exact_mut(row) {
                    ops::softmax(&mut r[..n]);
                }
                for w in chunks.windows(2) {
                    ops::attn_mix(
                        isa,
                        &p,
                        row,
                        n,
                        cache,
                        w[0]..w[1],
                        w[0] % 2 == 0,
                        split.as_mut_ptr(),
                    );
                }
            }
            assert_eq!(
                bits(&split),
                bits(&whole),
                "{isa:?}, {blocks:?}, {chunks:?}"
            );
        }
    }
}

#[test]
fn swiglu_and_softmax_match_reference() {
    let mut rng = Rng(6);
    let g: Vec<f32> = rng.vec(1000).iter().map(|x| x * 12.0).collect();
    let u = rng.vec(1000);
    let mut out = g.clone();
    ops::swiglu(&mut out, &u);
    for i in 0..1000 {
        let want = g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64;
        assert!(
            (out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "{} vs {want}",
            out[i]
        );
    }
}

#[test]
fn wide_packing_gives_the_same_bits_as_the_file_layout() {
    use loip::compute::cpu::blocks::{dequantize_packed, pack, Packing};
    let mut rng = Rng(7);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        // Rows of 16, 18 and 3 blocks; 29 rows leave a tail past the last
        // tile of 4, and the token counts take every tile shape.
        for cols in [512, 576, 96] {
            let rows = 29;
            let data = random_blocks(ty, rows * cols / ty.block_size(), 11);
            let mut packed = Vec::new();
            pack(ty, Packing::Wide, &data, &mut packed);
            let g = QMatrix::gguf(ty, rows, cols, &data);
            let w = QMatrix {
                packing: Packing::Wide,
                data: &packed,
                ..g
            };
            assert_eq!(packed.len(), rows * w.row_bytes(), "{ty}");
            let x = rng.vec(9 * cols);
            for isa in Isa::available() {
                for n_tok in [1, 2, 3, 4, 6, 9] {
                    assert_eq!(
                        bits(&product(isa, 2, &g, &x, n_tok)),
                        bits(&product(isa, 2, &w, &x, n_tok)),
                        "{ty} {cols} columns, {n_tok} tokens, {isa:?}"
                    );
                }
            }
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                let (gr, pr) = (g.rows_slice(r, r + 1), w.rows_slice(r, r + 1));
                dequantize_row(ty, gr.data, &mut a).unwrap();
                dequantize_packed(ty, Packing::Wide, pr.data, &mut b).unwrap();
                assert_eq!(bits(&a), bits(&b), "{ty} row {r} dequantized");
            }
        }
    }
}

#[test]
fn exp_softmax_and_swiglu_agree_bit_for_bit_across_isas() {
    let mut rng = Rng(8);
    // Lengths that leave a tail past the last 16-lane chunk.
    let x: Vec<f32> = rng.vec(1003).iter().map(|v| v * 40.0).collect();
    let u = rng.vec(1003);
    let mut soft = Vec::new();
    let mut glu = Vec::new();
    for isa in Isa::available() {
        let mut s = x.clone();
        let mut g = x.clone();
        unsafe {
            ops::softmax_on(isa, &mut s);
            ops::swiglu_on(isa, &mut g, &u);
        }
        soft.push(bits(&s));
        glu.push(bits(&g));
    }
    assert!(
        soft.windows(2).all(|w| w[0] == w[1]),
        "softmax differs between ISAs"
    );
    assert!(
        glu.windows(2).all(|w| w[0] == w[1]),
        "swiglu differs between ISAs"
    );
    // And the vectorized exp is the scalar one, lane for lane.
    let mut s = x.clone();
    ops::softmax(&mut s);
    let max = x.iter().copied().fold(f32::MIN, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| ops::exp(v - max)).collect();
    let sum: f64 = e.iter().map(|&v| v as f64).sum();
    for (got, want) in s.iter().zip(&e) {
        assert!((*got as f64 - *want as f64 / sum).abs() < 1e-6);
    }
}

/// A GQA group attended together gives each head the bits of that head
/// attended alone, for group sizes that fill the register tile, fall short
/// of it and overflow it, on every ISA.
#[test]
fn grouped_attention_equals_heads_alone() {
    let mut rng = Rng(6);
    let hd = 64;
    for group in [1, 3, 4, 5, 8] {
        let n = 38;
        let k = rng.vec(n * hd);
        let v = rng.vec(n * hd);
        let q = rng.vec(group * hd);
        let (keys, values) = cache_layout(&k, &v, hd, 48);
        let cache = HeadCache {
            keys: &keys,
            values: &values,
            head_dim: hd,
            cap: 48,
        };
        for isa in Isa::available() {
            let mut scores = vec![0f32; group * ops::score_row(n)];
            let mut together = vec![0f32; group * hd];
            ops::attend_group(isa, &q, cache, n - 1, &mut scores, &mut together);
            for h in 0..group {
                let mut alone = vec![0f32; hd];
                let qh = &q[h * hd..(h + 1) * hd];
                ops::attend_group(isa, qh, cache, n - 1, &mut scores, &mut alone);
                assert_eq!(
                    bits(&alone),
                    bits(&together[h * hd..(h + 1) * hd]),
                    "group {group}, head {h}, {isa:?}"
                );
            }
        }
    }
}
