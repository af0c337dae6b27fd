//! How fast a matrix product streams its weights, against the working set.
//!
//! `cargo bench --bench stream` runs SmolLM2's Q/K/V product shape (960 x
//! 576 Q4_1, packed as the engine packs it) over copies of the matrix that
//! fill a working set, one product after another as a decode step runs
//! them, and a plain read of the same bytes on the same threads. A decode
//! step reads every weight (and the KV cache) once, so once its working
//! set outgrows the caches, its time is bytes over the product's rate.
//!
//! `LOIP_THREADS` (default: every CPU), `LOIP_ROWS`, `LOIP_COLS` and
//! `LOIP_TOKENS` (input vectors per product, default 1; a prefill chunk is
//! 64) change the setting. `thread-ns/block` is thread time per 32-weight
//! block, for all the tokens.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use loip::compute::cpu::blocks::{pack, Packing};
use loip::compute::cpu::memread::read_on;
use loip::compute::cpu::{matmul, LineBuf, Pool, QMatrix};
use loip::model::dtype::GgmlType;

/// What to run, from the environment.
struct Setting {
    threads: usize,
    rows: usize,
    cols: usize,
    tokens: usize,
}

impl Setting {
    fn from_env() -> Setting {
        let var = |name: &str| -> Option<usize> { std::env::var(name).ok()?.parse().ok() };
        Setting {
            threads: var("LOIP_THREADS")
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            rows: var("LOIP_ROWS").unwrap_or(960),
            cols: var("LOIP_COLS").unwrap_or(576),
            tokens: var("LOIP_TOKENS").unwrap_or(1),
        }
    }
}

const MIB: usize = 1 << 20;
/// Each measurement runs at least this long.
const MIN_TIME: Duration = Duration::from_millis(400);

/// One matrix of Q4_1 blocks with finite scales and varied quants, packed.
fn matrix_bytes(rows: usize, cols: usize) -> Vec<u8> {
    let blocks = rows * cols / 32;
    let mut src = Vec::with_capacity(blocks * 20);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for b in 0..blocks {
        let d = half::f16::from_f32(0.01 + (b % 7) as f32 * 1e-3);
        let m = half::f16::from_f32(-0.08 + (b % 5) as f32 * 1e-3);
        src.extend_from_slice(&d.to_le_bytes());
        src.extend_from_slice(&m.to_le_bytes());
        for _ in 0..16 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            src.push(state as u8);
        }
    }
    let mut packed = Vec::new();
    pack(
        GgmlType::Q4_1,
        Packing::preferred(GgmlType::Q4_1),
        &src,
        &mut packed,
    );
    packed
}

/// Runs `pass` until `MIN_TIME` has gone by; seconds per pass.
fn time_passes(mut pass: impl FnMut()) -> f64 {
    pass();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < MIN_TIME {
        pass();
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn main() {
    let Setting {
        threads,
        rows,
        cols,
        tokens,
    } = Setting::from_env();
    assert!(
        rows > 0 && cols > 0 && cols % 32 == 0 && tokens > 0,
        "LOIP_ROWS, LOIP_COLS (a multiple of 32) and LOIP_TOKENS must be positive"
    );
    let pool = Pool::new(threads);
    let one = matrix_bytes(rows, cols);
    let sets_mib = [8usize, 16, 32, 48, 64, 96, 128];
    let most = (sets_mib[sets_mib.len() - 1] * MIB / one.len()).max(1) * one.len();
    // Anonymous memory advised for huge pages, as the engine keeps weights.
    let mut buf = memmap2::MmapMut::map_anon(most).expect("mapping the working set");
    #[cfg(target_os = "linux")]
    let _ = buf.advise(memmap2::Advice::HugePage);
    for chunk in buf.chunks_exact_mut(one.len()) {
        chunk.copy_from_slice(&one);
    }
    // Aligned to a cache line, as the engine's activations are.
    let x: LineBuf = (0..cols * tokens)
        .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
        .collect();
    let mut out = vec![0f32; rows * tokens];
    let sink = AtomicU64::new(0);

    println!(
        "{threads} threads, {rows}x{cols} Q4_1 products of {tokens} token{} ({} bytes each)",
        if tokens == 1 { "" } else { "s" },
        one.len()
    );
    println!("working set   product GB/s   thread-ns/block   read GB/s   product/read");
    for mib in sets_mib {
        let n = mib * MIB / one.len();
        if n == 0 {
            println!("{mib:>7} MiB   (smaller than one matrix)");
            continue;
        }
        let set = &buf[..n * one.len()];
        let mats: Vec<QMatrix> = set
            .chunks_exact(one.len())
            .map(|data| QMatrix {
                ty: GgmlType::Q4_1,
                packing: Packing::preferred(GgmlType::Q4_1),
                rows,
                cols,
                data,
            })
            .collect();
        let product_s = time_passes(|| {
            for m in &mats {
                matmul(&pool, m, &x, tokens, &mut out);
            }
            black_box(&out);
        });
        let words: &[u64] = bytemuck::cast_slice(&set[..set.len() / 8 * 8]);
        let read_s = time_passes(|| {
            sink.fetch_add(read_on(&pool, words), Ordering::Relaxed);
        });
        let bytes = set.len() as f64;
        let blocks = (n * rows * cols / 32) as f64;
        println!(
            "{:>7} MiB   {:>12.1}   {:>15.2}   {:>9.1}   {:>12.2}",
            mib,
            bytes / product_s / 1e9,
            product_s / blocks * 1e9 * threads as f64,
            bytes / read_s / 1e9,
            read_s / product_s
        );
    }
    black_box(sink.load(Ordering::Relaxed));
}
