//! Sixteen f32 lanes, on whatever vector unit this CPU has.
//!
//! Every reduction in loip has one canonical order: element `j` of a dot
//! product is fused-multiply-added into lane `j % 16`, in increasing `j`, and
//! the lanes are then summed by a fixed tree (8, 4, 2, 1). AVX-512 holds the
//! sixteen lanes in one register, AVX2 in two, the scalar path in an array;
//! all three round identically, so a result does not depend on the ISA that
//! computed it (nor on the node of a mixed cluster). Generic SIMD crates pick
//! the lane count per ISA, which is why this small layer is ours.

/// The ISA the kernels run on, detected once at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The best ISA this CPU supports, unless `LOIP_ISA` (scalar, avx2,
    /// avx512) asks for a lesser one.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best();
            match std::env::var("LOIP_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                #[cfg(target_arch = "x86_64")]
                Some("avx2") if Self::has_avx2() => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// Every ISA this CPU can run, for tests that compare them.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if Self::has_avx2() {
                v.push(Isa::Avx2);
            }
            if Self::has_avx512() {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if Self::has_avx512() {
                return Isa::Avx512;
            }
            if Self::has_avx2() {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    #[cfg(target_arch = "x86_64")]
    fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    #[cfg(target_arch = "x86_64")]
    fn has_avx512() -> bool {
        Self::has_avx2() && is_x86_feature_detected!("avx512f")
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
        }
    }
}

/// Sixteen f32 lanes.
///
/// # Safety
/// Every method is `unsafe` because the x86 versions need their target
/// features: call them only from code that `simd_fn!` compiled for this lane
/// type after checking the CPU. Pointers must be valid for 16 f32.
#[allow(clippy::missing_safety_doc)]
pub trait Lanes: Copy {
    /// How many 16-lane vectors the register file holds: kernels size
    /// their tiles to fit, since a spilled accumulator costs more than a
    /// smaller tile.
    const VECTORS: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    /// Loads 16 f32 from `p` (no alignment needed).
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a * b + c` with one rounding.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn div(a: Self, b: Self) -> Self;
    /// `min(a, b)`; `b` where `a` is NaN, as x86's `minps` and `f32::min` do.
    unsafe fn min(a: Self, b: Self) -> Self;
    /// `2^n` exactly, for integral `n` in `[-126, 127]`.
    unsafe fn pow2i(n: Self) -> Self;
    /// The canonical tree sum of the 16 lanes.
    unsafe fn hsum(self) -> f32;
    /// The largest lane.
    unsafe fn hmax(self) -> f32;
    /// Hints that the bytes at `p` will be read soon.
    #[inline(always)]
    unsafe fn prefetch(_p: *const u8) {}
    /// Hints that the bytes at `p` will be read later: fetched into L2,
    /// not L1, for data streamed from memory well ahead of use.
    #[inline(always)]
    unsafe fn prefetch_l2(_p: *const u8) {}
}

/// The reference lanes: plain f32 arithmetic, one lane at a time.
#[derive(Clone, Copy)]
pub struct Scalar(pub [f32; 16]);

impl Lanes for Scalar {
    // As many as 32 128-bit registers hold (aarch64's NEON).
    const VECTORS: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar([0.0; 16])
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Scalar([v; 16])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Scalar(std::ptr::read_unaligned(p as *const [f32; 16]))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; 16], self.0)
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Scalar(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], c.0[i])))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|i| a.0[i] + b.0[i]))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|i| a.0[i] * b.0[i]))
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|i| {
            if a.0[i] > b.0[i] {
                a.0[i]
            } else {
                b.0[i]
            }
        }))
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|i| a.0[i] - b.0[i]))
    }
    #[inline(always)]
    unsafe fn div(a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|i| a.0[i] / b.0[i]))
    }
    #[inline(always)]
    unsafe fn min(a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|i| {
            if a.0[i] < b.0[i] {
                a.0[i]
            } else {
                b.0[i]
            }
        }))
    }
    #[inline(always)]
    unsafe fn pow2i(n: Self) -> Self {
        Scalar(std::array::from_fn(|i| {
            f32::from_bits(((n.0[i] as i32 + 127) as u32) << 23)
        }))
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        tree_sum(self.0)
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        self.0.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// The canonical lane sum: halves folded onto each other, 8, 4, 2, 1.
#[inline(always)]
pub fn tree_sum(mut a: [f32; 16]) -> f32 {
    let mut step = 8;
    while step > 0 {
        for i in 0..step {
            a[i] += a[i + step];
        }
        step /= 2;
    }
    a[0]
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// Sums the 8 lanes of `v` as the canonical tree does for lanes 0..8 of a
    /// 16-lane sum after its first fold.
    #[inline(always)]
    unsafe fn tree8(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }

    /// Lanes 0..8 in `.0`, 8..16 in `.1`.
    #[derive(Clone, Copy)]
    pub struct Avx2(pub __m256, pub __m256);

    impl Lanes for Avx2 {
        // Two of the 16 ymm registers a vector.
        const VECTORS: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Avx2(_mm256_set1_ps(v), _mm256_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0);
            _mm256_storeu_ps(p.add(8), self.1);
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx2(
                _mm256_fmadd_ps(a.0, b.0, c.0),
                _mm256_fmadd_ps(a.1, b.1, c.1),
            )
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Avx2(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Avx2(_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            Avx2(_mm256_max_ps(a.0, b.0), _mm256_max_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            Avx2(_mm256_sub_ps(a.0, b.0), _mm256_sub_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            Avx2(_mm256_div_ps(a.0, b.0), _mm256_div_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn min(a: Self, b: Self) -> Self {
            Avx2(_mm256_min_ps(a.0, b.0), _mm256_min_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn pow2i(n: Self) -> Self {
            let f = |v: __m256| {
                let e = _mm256_add_epi32(_mm256_cvtps_epi32(v), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32(e, 23))
            };
            Avx2(f(n.0), f(n.1))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            tree8(_mm256_add_ps(self.0, self.1))
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            let m = _mm256_max_ps(self.0, self.1);
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1));
            _mm_cvtss_f32(m1)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx512(pub __m512);

    impl Lanes for Avx512 {
        const VECTORS: usize = 32;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Avx512(_mm512_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx512(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Avx512(_mm512_add_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Avx512(_mm512_mul_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            Avx512(_mm512_max_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            Avx512(_mm512_sub_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            Avx512(_mm512_div_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn min(a: Self, b: Self) -> Self {
            Avx512(_mm512_min_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn pow2i(n: Self) -> Self {
            let e = _mm512_add_epi32(_mm512_cvtps_epi32(n.0), _mm512_set1_epi32(127));
            Avx512(_mm512_castsi512_ps(_mm512_slli_epi32(e, 23)))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            let lo = _mm512_castps512_ps256(self.0);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(self.0), 1));
            tree8(_mm256_add_ps(lo, hi))
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            _mm512_reduce_max_ps(self.0)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        }
    }
}

/// Defines `fn $name(isa: Isa, args..) -> ret` that runs `$body` with `$V`
/// bound to the lane type of `isa`, compiled for that ISA's features. The
/// body is an `#[inline(always)]` generic function and each ISA gets its own
/// `#[target_feature]` copy, so that the intrinsics inline (a closure would
/// not be compiled with the features).
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis unsafe fn $name:ident<$V:ident: $B:path>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name(isa: $crate::compute::cpu::simd::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn generic<$V: $B>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn on_avx2($($arg: $ty),*) $(-> $ret)? {
                generic::<$crate::compute::cpu::simd::Avx2>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn on_avx512($($arg: $ty),*) $(-> $ret)? {
                generic::<$crate::compute::cpu::simd::Avx512>($($arg),*)
            }
            match isa {
                $crate::compute::cpu::simd::Isa::Scalar => generic::<$crate::compute::cpu::simd::Scalar>($($arg),*),
                #[cfg(target_arch = "x86_64")]
                $crate::compute::cpu::simd::Isa::Avx2 => on_avx2($($arg),*),
                #[cfg(target_arch = "x86_64")]
                $crate::compute::cpu::simd::Isa::Avx512 => on_avx512($($arg),*),
            }
        }
    };
}
pub(crate) use simd_fn;
