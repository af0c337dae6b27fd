//! Every CUDA kernel against the CPU kernel it replaces, bit for bit, on a
//! GPU (STYLE.md habit 1). Without a usable GPU these tests say so and pass,
//! unless `LOIP_REQUIRE_GPU` is set; NVRTC is found as in tests/cuda_ptx.rs
//! (`LOIP_NVRTC`, or on the loader's path).
#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use cudarc::driver::{CudaSlice, DevicePtr};
use loip::compute::cpu::ops;
use loip::compute::cpu::{matmul, Isa, Pool, QMatrix};
use loip::compute::cuda::device::AttentionShape;
use loip::compute::cuda::{Gpu, PtxCache, Registered, WeightView};
use loip::model::dtype::{dequantize_row, random_blocks, GgmlType};

fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        let dir = std::env::temp_dir().join("loip-test-ptx");
        match Gpu::open(0, &PtxCache::new(dir)) {
            Ok(g) => {
                eprintln!("GPU: {}", g.info);
                Some(g)
            }
            Err(e) if std::env::var_os("LOIP_REQUIRE_GPU").is_some() => {
                panic!("LOIP_REQUIRE_GPU is set but {e}")
            }
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        }
    })
    .as_ref()
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0),
            "{what}[{i}]: GPU {g:e}, CPU {w:e}"
        );
    }
}

fn dptr<T>(g: &Gpu, s: &CudaSlice<T>) -> u64 {
    s.device_ptr(g.stream()).0
}

#[test]
fn matrix_products_match_the_cpu_on_every_format() {
    let Some(g) = gpu() else { return };
    let pool = Pool::new(1);
    let (rows, cols) = (37, 512);
    for ty in GgmlType::ALL {
        let n_blocks = rows * cols / ty.block_size();
        let bytes = random_blocks(ty, n_blocks, 7 + ty.id() as u64);
        let w_dev = g.upload(&bytes).unwrap();
        let w = WeightView::new(ty, rows, cols, dptr(g, &w_dev)).unwrap();
        for n_tok in [1, 3, 11] {
            let x = rand_vec(n_tok * cols, n_tok as u64);
            let mut want = vec![0f32; n_tok * rows];
            matmul(
                &pool,
                &QMatrix::gguf(ty, rows, cols, &bytes),
                &x,
                n_tok,
                &mut want,
            );
            let xd = g.upload(&x).unwrap();
            let mut out = g.zeros(n_tok * rows).unwrap();
            g.matmul(&w, &xd, n_tok, &mut out).unwrap();
            assert_bits(
                &format!("{ty} x {n_tok}"),
                &g.download(&out).unwrap(),
                &want,
            );
        }
        // The embedding lookup: rows dequantized as the reference does.
        let ids: Vec<u32> = vec![0, 36, 5, 5];
        let mut want = vec![0f32; ids.len() * cols];
        for (i, &id) in ids.iter().enumerate() {
            let rb = w.row_bytes;
            dequantize_row(
                ty,
                &bytes[id as usize * rb..][..rb],
                &mut want[i * cols..][..cols],
            )
            .unwrap();
        }
        let mut out = g.zeros(ids.len() * cols).unwrap();
        g.rows(&w, &g.upload(&ids).unwrap(), &mut out).unwrap();
        assert_bits(&format!("{ty} rows"), &g.download(&out).unwrap(), &want);
    }
}

#[test]
fn weights_read_in_place_from_host_memory_give_the_same_bits() {
    let Some(g) = gpu() else { return };
    if !g.info.memory.can_map_host {
        eprintln!("skipping: the device cannot map host memory");
        return;
    }
    let (ty, rows, cols) = (GgmlType::Q4_K, 64, 1024);
    let bytes = random_blocks(ty, rows * cols / 256, 3);
    let x = rand_vec(cols, 1);
    // SAFETY: `bytes` outlives the registration.
    let reg = unsafe { Registered::new(g.context(), bytes.as_ptr(), bytes.len(), true) }.unwrap();
    let mapped = WeightView::new(ty, rows, cols, reg.device_ptr()).unwrap();
    let copied_dev = g.upload(&bytes).unwrap();
    let copied = WeightView::new(ty, rows, cols, dptr(g, &copied_dev)).unwrap();
    let xd = g.upload(&x).unwrap();
    let (mut a, mut b) = (g.zeros(rows).unwrap(), g.zeros(rows).unwrap());
    g.matmul(&mapped, &xd, 1, &mut a).unwrap();
    g.matmul(&copied, &xd, 1, &mut b).unwrap();
    assert_bits(
        "mapped vs copied",
        &g.download(&a).unwrap(),
        &g.download(&b).unwrap(),
    );
    drop(reg);
}

#[test]
fn layer_ops_match_the_cpu() {
    let Some(g) = gpu() else { return };
    // RMSNorm.
    let (n, rows) = (576, 5);
    let x = rand_vec(n * rows, 11);
    let w = rand_vec(n, 12);
    let mut want = vec![0f32; n * rows];
    ops::rmsnorm(&x, &w, 1e-5, &mut want);
    let mut out = g.zeros(n * rows).unwrap();
    g.rmsnorm(
        &g.upload(&x).unwrap(),
        &g.upload(&w).unwrap(),
        1e-5,
        &mut out,
    )
    .unwrap();
    assert_bits("rmsnorm", &g.download(&out).unwrap(), &want);

    // SwiGLU, with a length that is not a multiple of 16.
    let gate: Vec<f32> = rand_vec(1539, 13).iter().map(|v| v * 20.0).collect();
    let up = rand_vec(1539, 14);
    let mut want = gate.clone();
    ops::swiglu(&mut want, &up);
    let mut gd = g.upload(&gate).unwrap();
    g.swiglu(&mut gd, &g.upload(&up).unwrap()).unwrap();
    assert_bits("swiglu", &g.download(&gd).unwrap(), &want);

    // RoPE on 3 tokens of 4 heads of 64.
    let (n_tok, heads, hd) = (3, 4, 64);
    let x = rand_vec(n_tok * heads * hd, 15);
    let cs: Vec<(f32, f32)> = (0..n_tok * hd / 2)
        .map(|i| {
            let a = (i as f64 * 0.37).sin() * 3.0;
            (a.cos() as f32, a.sin() as f32)
        })
        .collect();
    let mut want = x.clone();
    for t in 0..n_tok {
        for h in want[t * heads * hd..(t + 1) * heads * hd].chunks_exact_mut(hd) {
            ops::rope_head(h, &cs[t * hd / 2..(t + 1) * hd / 2]);
        }
    }
    let flat: Vec<f32> = cs.iter().flat_map(|&(c, s)| [c, s]).collect();
    let mut xd = g.upload(&x).unwrap();
    g.rope(&mut xd, &g.upload(&flat).unwrap(), n_tok, heads, hd)
        .unwrap();
    assert_bits("rope", &g.download(&xd).unwrap(), &want);
}

#[test]
fn attention_matches_the_cpu_with_grouped_heads() {
    let Some(g) = gpu() else { return };
    let (n_head, n_head_kv, hd, cap) = (9, 3, 64, 80);
    let group = n_head / n_head_kv;
    let len = 70;
    // Cache [kv_head][cap][hd], positions 0..len filled.
    let k = rand_vec(n_head_kv * cap * hd, 21);
    let v = rand_vec(n_head_kv * cap * hd, 22);
    let pos: Vec<u32> = vec![0, 17, 69];
    let n_tok = pos.len();
    let q = rand_vec(n_tok * n_head * hd, 23);
    let mut want = vec![0f32; n_tok * n_head * hd];
    let mut scores = vec![0f32; group * ops::score_row(len)];
    for (t, &p) in pos.iter().enumerate() {
        for kh in 0..n_head_kv {
            let heads = (t * n_head + kh * group) * hd..(t * n_head + (kh + 1) * group) * hd;
            // The CPU cache's own layout of the same keys and values.
            let (mut kc, mut vc) = (vec![0f32; cap * hd], vec![0f32; cap * hd]);
            for pos in 0..cap {
                for d in 0..hd {
                    kc[ops::key_index(pos, d, hd)] = k[(kh * cap + pos) * hd + d];
                    vc[ops::value_index(pos, d, cap)] = v[(kh * cap + pos) * hd + d];
                }
            }
            let cache = ops::HeadCache {
                keys: &kc,
                values: &vc,
                head_dim: hd,
                cap,
            };
            ops::attend_group(
                Isa::detect(),
                &q[heads.clone()],
                cache,
                p as usize,
                &mut scores,
                &mut want[heads],
            );
        }
    }
    let s = AttentionShape {
        n_tok,
        n_head,
        n_head_kv,
        head_dim: hd,
        cap,
    };
    let mut sc = g.zeros(n_tok * n_head * cap).unwrap();
    let mut out = g.zeros(n_tok * n_head * hd).unwrap();
    g.attention(
        &g.upload(&q).unwrap(),
        &g.upload(&k).unwrap(),
        &g.upload(&v).unwrap(),
        &g.upload(&pos).unwrap(),
        s,
        &mut sc,
        &mut out,
    )
    .unwrap();
    assert_bits("attention", &g.download(&out).unwrap(), &want);
}
