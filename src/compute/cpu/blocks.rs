//! Block formats unpacked into 16-lane vectors, exactly.
//!
//! Each `Unpack` turns one block into `CHUNKS` vectors of 16 weights,
//! computing every weight by its format's formula with the same roundings
//! as `model::dtype`'s reference dequantization. The hot formats have fused
//! SIMD unpackers; the rest go through the reference into a stack buffer.

use super::simd::Lanes;
use crate::model::dtype::{self, GgmlType};

/// Most chunks of 16 in any block (a 256-weight super-block).
pub const MAX_CHUNKS: usize = 16;

pub trait Unpack<V: Lanes> {
    /// Weights per block.
    fn qk(&self) -> usize;
    /// Bytes per block.
    fn bytes(&self) -> usize;
    /// Unpacks the block at `p` into `out[..qk/16]`.
    unsafe fn unpack(&self, p: *const u8, out: &mut [V; MAX_CHUNKS]);
}

/// Any format, through the exact reference dequantizer and a stack buffer.
pub struct ViaReference(pub GgmlType);

impl<V: Lanes> Unpack<V> for ViaReference {
    #[inline(always)]
    fn qk(&self) -> usize {
        self.0.block_size().max(16)
    }
    #[inline(always)]
    fn bytes(&self) -> usize {
        self.0.type_size() * (self.0.block_size().max(16) / self.0.block_size())
    }
    #[inline(always)]
    unsafe fn unpack(&self, p: *const u8, out: &mut [V; MAX_CHUNKS]) {
        let qk = <Self as Unpack<V>>::qk(self);
        let mut buf = [0f32; 256];
        let bytes = std::slice::from_raw_parts(p, <Self as Unpack<V>>::bytes(self));
        dtype::dequantize_row(self.0, bytes, &mut buf[..qk])
            .expect("block length is fixed by the format");
        for (c, o) in out.iter_mut().take(qk / 16).enumerate() {
            *o = V::load(buf.as_ptr().add(c * 16));
        }
    }
}

#[inline(always)]
fn f16_at(p: *const u8) -> f32 {
    // SAFETY: callers pass a pointer to a block, whose first bytes are an f16.
    let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
    half::f16::from_bits(u16::from_le(bits)).to_f32()
}

/// Scalar unpackers: the reference formulas written per lane.
pub mod scalar {
    use super::*;
    use crate::compute::cpu::simd::Scalar;

    pub struct Q4_1;
    impl Unpack<Scalar> for Q4_1 {
        fn qk(&self) -> usize {
            32
        }
        fn bytes(&self) -> usize {
            20
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
            let d = f16_at(p);
            let m = f16_at(p.add(2));
            for i in 0..16 {
                let q = *p.add(4 + i);
                // d*q is exact in f32, so one fused rounding equals d*q + m.
                out[0].0[i] = ((q & 15) as f32).mul_add(d, m);
                out[1].0[i] = ((q >> 4) as f32).mul_add(d, m);
            }
        }
    }

    pub struct Q8_0;
    impl Unpack<Scalar> for Q8_0 {
        fn qk(&self) -> usize {
            32
        }
        fn bytes(&self) -> usize {
            34
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
            let d = f16_at(p);
            for i in 0..32 {
                out[i / 16].0[i % 16] = (*p.add(2 + i) as i8) as f32 * d;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::*;
    use crate::compute::cpu::simd::{Avx2, Avx512};
    use std::arch::x86_64::*;

    /// d and m of a Q4_1 block (two f16 side by side), converted by F16C.
    #[inline(always)]
    unsafe fn two_f16(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
    }

    pub struct Q4_1;
    pub struct Q8_0;
    pub struct F32;
    pub struct F16;

    impl Unpack<Avx512> for Q4_1 {
        fn qk(&self) -> usize {
            32
        }
        fn bytes(&self) -> usize {
            20
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            let (d, m) = two_f16(p);
            let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(4) as *const __m128i));
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            out[0] = Avx512(_mm512_fmadd_ps(lo, d, m));
            out[1] = Avx512(_mm512_fmadd_ps(hi, d, m));
        }
    }

    impl Unpack<Avx2> for Q4_1 {
        fn qk(&self) -> usize {
            32
        }
        fn bytes(&self) -> usize {
            20
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            let (d, m) = two_f16(p);
            let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
            let q = _mm_loadu_si128(p.add(4) as *const __m128i);
            let mask = _mm_set1_epi8(15);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            let w = |v: __m128i| {
                Avx2(
                    _mm256_fmadd_ps(f(v), d, m),
                    _mm256_fmadd_ps(f(_mm_srli_si128(v, 8)), d, m),
                )
            };
            out[0] = w(lo);
            out[1] = w(hi);
        }
    }

    impl Unpack<Avx512> for Q8_0 {
        fn qk(&self) -> usize {
            32
        }
        fn bytes(&self) -> usize {
            34
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            let d = _mm512_set1_ps(f16_at(p));
            for c in 0..2 {
                let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2 + 16 * c) as *const __m128i));
                out[c] = Avx512(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
            }
        }
    }

    impl Unpack<Avx2> for Q8_0 {
        fn qk(&self) -> usize {
            32
        }
        fn bytes(&self) -> usize {
            34
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            let d = _mm256_set1_ps(f16_at(p));
            for c in 0..2 {
                let q = _mm_loadu_si128(p.add(2 + 16 * c) as *const __m128i);
                let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
                out[c] = Avx2(_mm256_mul_ps(a, d), _mm256_mul_ps(b, d));
            }
        }
    }

    impl Unpack<Avx512> for F32 {
        fn qk(&self) -> usize {
            16
        }
        fn bytes(&self) -> usize {
            64
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            out[0] = Avx512(_mm512_loadu_ps(p as *const f32));
        }
    }

    impl Unpack<Avx2> for F32 {
        fn qk(&self) -> usize {
            16
        }
        fn bytes(&self) -> usize {
            64
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            out[0] = <Avx2 as Lanes>::load(p as *const f32);
        }
    }

    impl Unpack<Avx512> for F16 {
        fn qk(&self) -> usize {
            16
        }
        fn bytes(&self) -> usize {
            32
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            out[0] = Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)));
        }
    }

    impl Unpack<Avx2> for F16 {
        fn qk(&self) -> usize {
            16
        }
        fn bytes(&self) -> usize {
            32
        }
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            out[0] = Avx2(
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
            );
        }
    }
}
