//! A plain read of memory on the pool's threads: the baseline that decode's
//! streaming of weights is measured against.
//!
//! On a shared machine the bandwidth a process gets moves by tens of
//! percent within an hour, so tok/s from different hours do not compare;
//! the share of a plain read of as many bytes, measured beside each run,
//! does. `loip bench` reports it, and `benches/stream.rs` uses the same
//! read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::pool::{share, Pool};

/// Sums `words` as fast as this core reads: four independent accumulators
/// of eight words, each line asked for 1 KiB ahead. Compiled for AVX-512
/// where the CPU has it: with 16-byte loads the loop keeps too few lines in
/// flight to show what memory gives.
pub fn read_words(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn wide(words: &[u64]) -> u64 {
            read_lines(words)
        }
        // SAFETY: the CPU has AVX-512F.
        return unsafe { wide(words) };
    }
    read_lines(words)
}

#[inline(always)]
fn read_lines(words: &[u64]) -> u64 {
    let mut acc = [[0u64; 8]; 4];
    let lines = words.chunks_exact(32);
    let rest: u64 = lines.remainder().iter().fold(0, |s, &w| s.wrapping_add(w));
    for (i, chunk) in lines.enumerate() {
        prefetch_ahead(words, i * 32);
        for (a, part) in acc.iter_mut().zip(chunk.chunks_exact(8)) {
            for (s, &w) in a.iter_mut().zip(part) {
                *s = s.wrapping_add(w);
            }
        }
    }
    acc.iter().flatten().fold(rest, |s, &w| s.wrapping_add(w))
}

/// Asks for the four lines 1 KiB past word `at` (x86; elsewhere the
/// hardware prefetchers alone).
#[inline(always)]
fn prefetch_ahead(words: &[u64], at: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; any address is allowed.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let ahead = words.as_ptr().wrapping_add(at + 128) as *const i8;
        for l in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (words, at);
}

/// Reads all of `words` once on every thread of `pool`, each thread a
/// contiguous share (one stream, as a matrix product's rows are), and
/// returns the sum so that the reads cannot be optimized away.
pub fn read_on(pool: &Pool, words: &[u64]) -> u64 {
    let sum = AtomicU64::new(0);
    let n = pool.n_threads();
    pool.run(n, &|task, n_tasks, _| {
        let (a, b) = share(words.len(), task, n_tasks, 8);
        sum.fetch_add(read_words(&words[a..b]), Ordering::Relaxed);
    });
    sum.into_inner()
}

/// A buffer of a given size in anonymous memory advised for transparent
/// huge pages, as resident weights are, so that both are read through the
/// same kind of pages.
pub struct ReadProbe {
    buf: memmap2::MmapMut,
}

impl ReadProbe {
    /// `bytes` (rounded up to whole 64-byte lines), every page touched.
    pub fn new(bytes: usize) -> std::io::Result<ReadProbe> {
        let len = bytes.max(64).div_ceil(64) * 64;
        let mut buf = memmap2::MmapOptions::new().len(len).map_anon()?;
        #[cfg(target_os = "linux")]
        let _ = buf.advise(memmap2::Advice::HugePage);
        for (i, w) in bytemuck::cast_slice_mut::<u8, u64>(&mut buf)
            .iter_mut()
            .enumerate()
        {
            *w = i as u64;
        }
        Ok(ReadProbe { buf })
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Bytes per second of `passes` reads of the whole buffer on `pool`,
    /// after one untimed pass.
    pub fn bytes_per_s(&self, pool: &Pool, passes: usize) -> f64 {
        let words: &[u64] = bytemuck::cast_slice(&self.buf);
        std::hint::black_box(read_on(pool, words));
        let passes = passes.max(1);
        let t = Instant::now();
        for _ in 0..passes {
            std::hint::black_box(read_on(pool, words));
        }
        (passes * self.bytes()) as f64 / t.elapsed().as_secs_f64().max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_sums_every_word_once_whatever_the_length() {
        for n in [0, 1, 7, 31, 32, 33, 100, 4096 + 5] {
            let words: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
            let want = words.iter().fold(0u64, |s, &w| s.wrapping_add(w));
            assert_eq!(read_words(&words), want, "{n} words");
            let pool = Pool::new(3);
            assert_eq!(read_on(&pool, &words), want, "{n} words on 3 threads");
        }
    }

    #[test]
    fn a_probe_reports_a_rate() {
        let probe = ReadProbe::new(1 << 20).unwrap();
        assert_eq!(probe.bytes(), 1 << 20);
        let words: &[u64] = bytemuck::cast_slice(&probe.buf);
        let n = words.len() as u64;
        let pool = Pool::new(2);
        assert_eq!(read_on(&pool, words), n * (n - 1) / 2);
        let rate = probe.bytes_per_s(&pool, 3);
        assert!(rate.is_finite() && rate > 1e6, "{rate} bytes/s");
    }
}
