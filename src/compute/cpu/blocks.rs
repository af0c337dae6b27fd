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

/// How a matrix's blocks are laid out in memory.
///
/// `Wide` regroups a block's bits at load time with its f16 scales widened
/// to f32. Widening is exact, so every weight keeps its value and every
/// product its bits; the kernels then broadcast scales straight from memory
/// instead of converting them per block, which doubles the speed of the
/// Q4_1 matrix-vector product (DESIGN.md §8 allows such regrouping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// As stored in the GGUF file.
    Gguf,
    /// Q4_1: `{d: f32, m: f32, qs: [u8; 16]}`; Q8_0: `{d: f32, qs: [i8; 32]}`.
    Wide,
}

impl Packing {
    /// The packing used for resident weights of type `ty`.
    pub fn preferred(ty: GgmlType) -> Packing {
        match ty {
            GgmlType::Q4_1 | GgmlType::Q8_0 => Packing::Wide,
            _ => Packing::Gguf,
        }
    }

    /// Bytes per block of `ty` in this packing.
    pub fn block_bytes(self, ty: GgmlType) -> usize {
        match (self, ty) {
            (Packing::Wide, GgmlType::Q4_1) => 24,
            (Packing::Wide, GgmlType::Q8_0) => 36,
            _ => ty.type_size(),
        }
    }
}

/// Repacks whole blocks of `ty` from the GGUF layout into `packing`,
/// appending to `dst`.
pub fn pack(ty: GgmlType, packing: Packing, src: &[u8], dst: &mut Vec<u8>) {
    let ts = ty.type_size();
    match (packing, ty) {
        (Packing::Wide, GgmlType::Q4_1) => {
            for b in src.chunks_exact(ts) {
                dst.extend_from_slice(&f16_at(b.as_ptr()).to_le_bytes());
                dst.extend_from_slice(&f16_at(b[2..].as_ptr()).to_le_bytes());
                dst.extend_from_slice(&b[4..20]);
            }
        }
        (Packing::Wide, GgmlType::Q8_0) => {
            for b in src.chunks_exact(ts) {
                dst.extend_from_slice(&f16_at(b.as_ptr()).to_le_bytes());
                dst.extend_from_slice(&b[2..34]);
            }
        }
        _ => dst.extend_from_slice(src),
    }
}

/// Dequantizes a row of `ty` in `packing` into `dst`, exactly.
pub fn dequantize_packed(
    ty: GgmlType,
    packing: Packing,
    src: &[u8],
    dst: &mut [f32],
) -> Result<(), dtype::DtypeError> {
    if packing == Packing::Gguf || Packing::Wide.block_bytes(ty) == ty.type_size() {
        return dtype::dequantize_row(ty, src, dst);
    }
    let bb = packing.block_bytes(ty);
    if src.len() != dst.len() / 32 * bb || !dst.len().is_multiple_of(32) {
        return Err(dtype::DtypeError::ByteLength {
            ty,
            n: dst.len(),
            expected: dst.len() / 32 * bb,
            got: src.len(),
        });
    }
    for (b, out) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(32)) {
        let d = f32_at(b.as_ptr());
        if ty == GgmlType::Q4_1 {
            let m = f32_at(b[4..].as_ptr());
            for i in 0..16 {
                out[i] = ((b[8 + i] & 15) as f32).mul_add(d, m);
                out[i + 16] = ((b[8 + i] >> 4) as f32).mul_add(d, m);
            }
        } else {
            for i in 0..32 {
                out[i] = (b[4 + i] as i8) as f32 * d;
            }
        }
    }
    Ok(())
}

#[inline(always)]
fn f32_at(p: *const u8) -> f32 {
    // SAFETY: callers pass a pointer to a wide block, which starts with f32s.
    f32::from_le_bytes(unsafe { std::ptr::read_unaligned(p as *const [u8; 4]) })
}

pub trait Unpack<V: Lanes> {
    /// Weights per block.
    fn qk(&self) -> usize;
    /// Bytes per block.
    fn bytes(&self) -> usize;
    /// Unpacks the block at `p` into `out[..qk/16]`.
    ///
    /// # Safety
    /// `p` points at `bytes()` readable bytes of one block, and the CPU has
    /// the features of the lane type `V`.
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

/// The formats with fused unpackers, each implemented for every lane type.
/// `G*` read the GGUF layout, `W*` the wide one (`Packing::Wide`).
#[derive(Default)]
pub struct GQ4_1;
#[derive(Default)]
pub struct GQ8_0;
#[derive(Default)]
pub struct GF32;
#[derive(Default)]
pub struct GF16;
#[derive(Default)]
pub struct WQ4_1;
#[derive(Default)]
pub struct WQ8_0;

/// Lanes that have an unpacker for each fused format.
pub trait Formats: Lanes {
    type Q4_1: Unpack<Self> + Default;
    type Q8_0: Unpack<Self> + Default;
    type F32: Unpack<Self> + Default;
    type F16: Unpack<Self> + Default;
    type WideQ4_1: Unpack<Self> + Default;
    type WideQ8_0: Unpack<Self> + Default;
}

macro_rules! formats_for {
    ($V:ty) => {
        impl Formats for $V {
            type Q4_1 = GQ4_1;
            type Q8_0 = GQ8_0;
            type F32 = GF32;
            type F16 = GF16;
            type WideQ4_1 = WQ4_1;
            type WideQ8_0 = WQ8_0;
        }
    };
}
formats_for!(super::simd::Scalar);
#[cfg(target_arch = "x86_64")]
formats_for!(super::simd::Avx2);
#[cfg(target_arch = "x86_64")]
formats_for!(super::simd::Avx512);

/// `qk` and `bytes` of an unpacker, for every lane type at once.
macro_rules! shape {
    ($qk:expr, $bytes:expr) => {
        #[inline(always)]
        fn qk(&self) -> usize {
            $qk
        }
        #[inline(always)]
        fn bytes(&self) -> usize {
            $bytes
        }
    };
}

/// Scalar unpackers: the reference formulas written per lane.
mod scalar {
    use super::*;
    use crate::compute::cpu::simd::Scalar;

    /// Q4_1 weights `fma(q, d, m)`: `d*q` is exact in f32, so one fused
    /// rounding equals the reference's `d*q + m`.
    #[inline(always)]
    unsafe fn q4_1(d: f32, m: f32, qs: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
        for i in 0..16 {
            let q = *qs.add(i);
            out[0].0[i] = ((q & 15) as f32).mul_add(d, m);
            out[1].0[i] = ((q >> 4) as f32).mul_add(d, m);
        }
    }

    /// Q8_0 weights `q * d`, exact.
    #[inline(always)]
    unsafe fn q8_0(d: f32, qs: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
        for i in 0..32 {
            out[i / 16].0[i % 16] = (*qs.add(i) as i8) as f32 * d;
        }
    }

    impl Unpack<Scalar> for GQ4_1 {
        shape!(32, 20);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
            q4_1(f16_at(p), f16_at(p.add(2)), p.add(4), out)
        }
    }

    impl Unpack<Scalar> for WQ4_1 {
        shape!(32, 24);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
            q4_1(f32_at(p), f32_at(p.add(4)), p.add(8), out)
        }
    }

    impl Unpack<Scalar> for GQ8_0 {
        shape!(32, 34);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
            q8_0(f16_at(p), p.add(2), out)
        }
    }

    impl Unpack<Scalar> for WQ8_0 {
        shape!(32, 36);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
            q8_0(f32_at(p), p.add(4), out)
        }
    }

    impl Unpack<Scalar> for GF32 {
        shape!(16, 64);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
            out[0] = Scalar::load(p as *const f32);
        }
    }

    impl Unpack<Scalar> for GF16 {
        shape!(16, 32);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Scalar; MAX_CHUNKS]) {
            for i in 0..16 {
                out[0].0[i] = f16_at(p.add(2 * i));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::compute::cpu::simd::{Avx2, Avx512};
    use std::arch::x86_64::*;

    /// d and m of a Q4_1 block (two f16 side by side), converted by F16C.
    #[inline(always)]
    unsafe fn two_f16(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
    }

    /// Q4_1 on AVX-512: the block's 16 possible weights, each fma(q, d, m)
    /// exactly as the reference computes it; nibbles then index the table
    /// (vpermps reads only an index's low 4 bits).
    #[inline(always)]
    unsafe fn q4_1_512(d: __m512, m: __m512, qs: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
        let iota = _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
        );
        let table = _mm512_fmadd_ps(iota, d, m);
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs as *const __m128i));
        out[0] = Avx512(_mm512_permutexvar_ps(q, table));
        out[1] = Avx512(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table));
    }

    /// Q4_1 on AVX2: nibbles widened and converted, then fma(q, d, m).
    #[inline(always)]
    unsafe fn q4_1_256(d: __m256, m: __m256, qs: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
        let q = _mm_loadu_si128(qs as *const __m128i);
        let mask = _mm_set1_epi8(15);
        let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        let w = |v: __m128i| {
            Avx2(
                _mm256_fmadd_ps(f(v), d, m),
                _mm256_fmadd_ps(f(_mm_srli_si128(v, 8)), d, m),
            )
        };
        out[0] = w(_mm_and_si128(q, mask));
        out[1] = w(_mm_and_si128(_mm_srli_epi16(q, 4), mask));
    }

    /// Q8_0: `q * d`, exact.
    #[inline(always)]
    unsafe fn q8_0_512(d: __m512, qs: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
        for (c, o) in out.iter_mut().take(2).enumerate() {
            let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(qs.add(16 * c) as *const __m128i));
            *o = Avx512(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
        }
    }

    #[inline(always)]
    unsafe fn q8_0_256(d: __m256, qs: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
        for (c, o) in out.iter_mut().take(2).enumerate() {
            let q = _mm_loadu_si128(qs.add(16 * c) as *const __m128i);
            let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
            *o = Avx2(_mm256_mul_ps(a, d), _mm256_mul_ps(b, d));
        }
    }

    /// Broadcasts the little-endian f32 at `p`.
    #[inline(always)]
    unsafe fn f32_512(p: *const u8) -> __m512 {
        _mm512_set1_ps(std::ptr::read_unaligned(p as *const f32))
    }

    #[inline(always)]
    unsafe fn f32_256(p: *const u8) -> __m256 {
        _mm256_set1_ps(std::ptr::read_unaligned(p as *const f32))
    }

    impl Unpack<Avx512> for GQ4_1 {
        shape!(32, 20);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            let (d, m) = two_f16(p);
            q4_1_512(_mm512_set1_ps(d), _mm512_set1_ps(m), p.add(4), out)
        }
    }

    impl Unpack<Avx512> for WQ4_1 {
        shape!(32, 24);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            q4_1_512(f32_512(p), f32_512(p.add(4)), p.add(8), out)
        }
    }

    impl Unpack<Avx2> for GQ4_1 {
        shape!(32, 20);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            let (d, m) = two_f16(p);
            q4_1_256(_mm256_set1_ps(d), _mm256_set1_ps(m), p.add(4), out)
        }
    }

    impl Unpack<Avx2> for WQ4_1 {
        shape!(32, 24);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            q4_1_256(f32_256(p), f32_256(p.add(4)), p.add(8), out)
        }
    }

    impl Unpack<Avx512> for GQ8_0 {
        shape!(32, 34);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            q8_0_512(_mm512_set1_ps(f16_at(p)), p.add(2), out)
        }
    }

    impl Unpack<Avx512> for WQ8_0 {
        shape!(32, 36);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            q8_0_512(f32_512(p), p.add(4), out)
        }
    }

    impl Unpack<Avx2> for GQ8_0 {
        shape!(32, 34);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            q8_0_256(_mm256_set1_ps(f16_at(p)), p.add(2), out)
        }
    }

    impl Unpack<Avx2> for WQ8_0 {
        shape!(32, 36);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            q8_0_256(f32_256(p), p.add(4), out)
        }
    }

    impl Unpack<Avx512> for GF32 {
        shape!(16, 64);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            out[0] = Avx512(_mm512_loadu_ps(p as *const f32));
        }
    }

    impl Unpack<Avx2> for GF32 {
        shape!(16, 64);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            out[0] = <Avx2 as Lanes>::load(p as *const f32);
        }
    }

    impl Unpack<Avx512> for GF16 {
        shape!(16, 32);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx512; MAX_CHUNKS]) {
            out[0] = Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)));
        }
    }

    impl Unpack<Avx2> for GF16 {
        shape!(16, 32);
        #[inline(always)]
        unsafe fn unpack(&self, p: *const u8, out: &mut [Avx2; MAX_CHUNKS]) {
            out[0] = Avx2(
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
            );
        }
    }
}
