//! GGUF block formats and their exact dequantization.
//!
//! Every format is dequantized by its own formula, bit for bit as the
//! reference implementation (the `gguf` Python package's `dequantize()`,
//! numpy f32 arithmetic) does: `tests/dtypes.rs` checks each type against
//! `fixtures/dtypes/`.
//!
//! Each block is an explicit `#[repr(C)]` struct whose fields are bytes only,
//! so every block has alignment 1 and size `GgmlType::type_size()`; a raw
//! tensor slice of a mapped GGUF file (any alignment) is viewed as blocks with
//! [`view_blocks`] or `bytemuck::cast_slice`, without copying.
//!
//! # Exact formulas
//!
//! `d`, `m`, `dmin` are f16 scales widened to f32 (exact); `sc`, `mn`, `q`
//! are small integers converted to f32 (exact). "exact" means every
//! intermediate is representable in f32, so the result is the real-number
//! value and the association of the products does not matter (see the
//! signed-zero note below); "1 rounding" means one correctly rounded f32
//! operation, where a fused multiply-add gives the same bits.
//!
//! | type   | value                          | ranges                          | rounding |
//! |--------|--------------------------------|---------------------------------|----------|
//! | F32    | `x`                            |                                 | copy     |
//! | F16    | `f32(h)`                       |                                 | exact    |
//! | BF16   | `f32::from_bits(b << 16)`      |                                 | exact    |
//! | Q4_0   | `d * (q - 8)`                  | q ∈ 0..=15                      | exact    |
//! | Q4_1   | `d * q + m`                    | q ∈ 0..=15                      | 1 (add) = `fma(d, q, m)` |
//! | Q5_0   | `d * (q - 16)`                 | q ∈ 0..=31                      | exact    |
//! | Q5_1   | `d * q + m`                    | q ∈ 0..=31                      | 1 (add) = `fma(d, q, m)` |
//! | Q8_0   | `d * q`                        | q ∈ -128..=127                  | exact    |
//! | Q2_K   | `(d * sc) * q - dmin * mn`     | sc, mn ∈ 0..=15, q ∈ 0..=3      | 1 (sub) = `fma(d*sc, q, -(dmin*mn))` |
//! | Q3_K   | `(d * sc) * q`                 | sc ∈ -32..=31, q ∈ -4..=3       | exact    |
//! | Q4_K   | `(d * sc) * q - dmin * mn`     | sc, mn ∈ 0..=63, q ∈ 0..=15     | 1 (sub) = `fma(d*sc, q, -(dmin*mn))` |
//! | Q5_K   | `(d * sc) * q - dmin * mn`     | sc, mn ∈ 0..=63, q ∈ 0..=31     | 1 (sub) = `fma(d*sc, q, -(dmin*mn))` |
//! | Q6_K   | `(d * sc) * q`                 | sc ∈ -128..=127, q ∈ -32..=31   | exact    |
//! | IQ4_NL | `d * KVALUES[q]`               | q ∈ 0..=15, KVALUES ∈ -127..=113 | exact   |
//! | IQ4_XS | `(d * ls) * KVALUES[q]`        | ls ∈ -32..=31, q ∈ 0..=15       | exact    |
//!
//! Why products are exact: an f16 has an 11-bit significand, so `d * k` for
//! an integer `|k| <= 2^b` has at most `11 + b` significant bits, and f32 holds
//! 24; the largest case (Q6_K: 11 + 7 + 5 = 23 bits) fits. The exponent range
//! of f32 holds every such product of an f16 (normal or subnormal) without
//! underflow or overflow. This holds for finite scales; an inf/NaN scale
//! gives inf/NaN as the reference does.
//!
//! Signed zeros: the reference multiplies in f32, so a zero result carries
//! the XOR of the signs of all factors (e.g. Q6_K with `d > 0`, `sc < 0`,
//! `q = 0` gives `-0.0`). A kernel that multiplies the integers first
//! (`(sc * q) as f32`) gets `+0.0` there: equal as numbers, different bits,
//! and no effect on any sum that has a non-zero term. Kernels that must match
//! bit for bit keep the float products.

use std::mem::offset_of;

use bytemuck::{Pod, Zeroable};
use thiserror::Error;

/// A GGML tensor element type, with the id GGUF stores for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    IQ4_NL = 20,
    IQ4_XS = 23,
    BF16 = 30,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown or unsupported ggml type id {0}")]
pub struct UnknownType(pub u32);

impl GgmlType {
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];

    pub fn from_id(id: u32) -> Result<Self, UnknownType> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| *t as u32 == id)
            .ok_or(UnknownType(id))
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    /// Elements per block.
    pub const fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4_NL => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS => 256,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            IQ4_NL => 18,
            IQ4_XS => 136,
        }
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            IQ4_NL => "IQ4_NL",
            IQ4_XS => "IQ4_XS",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Bytes of a row of `n` elements; `None` when `n` is not a whole number
    /// of blocks or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if n % bs != 0 {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl GgmlType {
    /// Storage cost: bits per weight, block header included.
    pub fn bits_per_weight(self) -> f64 {
        (self.type_size() * 8) as f64 / self.block_size() as f64
    }
}

// ---------------------------------------------------------------------------
// Scalar fields. Stored as little-endian bytes so that every block struct has
// alignment 1 and can be viewed in place from any byte offset of a file.
// ---------------------------------------------------------------------------

/// An IEEE binary16 value as its two little-endian bytes.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct F16Le(pub [u8; 2]);

impl F16Le {
    pub const fn from_bits(bits: u16) -> Self {
        F16Le(bits.to_le_bytes())
    }

    pub const fn to_bits(self) -> u16 {
        u16::from_le_bytes(self.0)
    }

    /// Exact widening. A NaN keeps its sign and payload and gets the quiet
    /// bit set, as x86 F16C and Arm FCVT do.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        half::f16::from_bits(self.to_bits()).to_f32()
    }
}

impl std::fmt::Debug for F16Le {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_f32())
    }
}

/// A bfloat16 value as its two little-endian bytes.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Bf16Le(pub [u8; 2]);

impl Bf16Le {
    pub const fn from_bits(bits: u16) -> Self {
        Bf16Le(bits.to_le_bytes())
    }

    pub const fn to_bits(self) -> u16 {
        u16::from_le_bytes(self.0)
    }

    /// Exact widening: the 16 bits become the high half of an f32, every bit
    /// kept (NaN payloads included).
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl std::fmt::Debug for Bf16Le {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_f32())
    }
}

/// An IEEE binary32 value as its four little-endian bytes.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct F32Le(pub [u8; 4]);

impl F32Le {
    pub const fn from_bits(bits: u32) -> Self {
        F32Le(bits.to_le_bytes())
    }

    pub const fn to_bits(self) -> u32 {
        u32::from_le_bytes(self.0)
    }

    /// The stored bits as an f32, unchanged.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        f32::from_bits(self.to_bits())
    }
}

impl std::fmt::Debug for F32Le {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_f32())
    }
}

/// The 16 non-uniform levels of IQ4_NL and IQ4_XS, indexed by a 4-bit code.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Elements per super-block of the K-quants and IQ4_XS.
pub const QK_K: usize = 256;

// ---------------------------------------------------------------------------
// The block trait
// ---------------------------------------------------------------------------

/// A GGUF block format: `ELEMS` weights stored in `size_of::<Self>()` bytes.
///
/// Every implementor is `#[repr(C)]`, made of byte fields only (alignment 1),
/// so `bytemuck::cast_slice::<u8, B>` never fails on alignment.
pub trait Block: Pod + std::fmt::Debug {
    /// The GGUF type this block stores.
    const TYPE: GgmlType;
    /// Weights per block (`TYPE.block_size()`).
    const ELEMS: usize;

    /// Exact dequantization of this block into `out`.
    ///
    /// Panics unless `out.len() == Self::ELEMS` (an `assert!` that holds in
    /// release builds). The typed `dequantize(&self, &mut [f32; N])` methods
    /// on each block struct need no check.
    fn dequantize_to(&self, out: &mut [f32]);
}

/// `out` as a fixed-size array, or a panic naming the type.
#[inline(always)]
fn out_array<const N: usize>(ty: GgmlType, out: &mut [f32]) -> &mut [f32; N] {
    let len = out.len();
    match <&mut [f32; N]>::try_from(out) {
        Ok(a) => a,
        Err(_) => panic!("{ty}: output holds {len} floats, a block has {N}"),
    }
}

macro_rules! impl_block {
    ($B:ident, $ty:expr, $elems:expr) => {
        const _: () = assert!(
            std::mem::size_of::<$B>() == $ty.type_size()
                && std::mem::align_of::<$B>() == 1
                && $ty.block_size() == $elems
        );

        impl Block for $B {
            const TYPE: GgmlType = $ty;
            const ELEMS: usize = $elems;

            #[inline(always)]
            fn dequantize_to(&self, out: &mut [f32]) {
                self.dequantize(out_array::<$elems>(Self::TYPE, out))
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Float types (one element per "block")
// ---------------------------------------------------------------------------

/// F32: one f32. 32 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockF32 {
    /// The value, little-endian.
    pub v: F32Le,
}
const _: () = assert!(size_of::<BlockF32>() == 4);
impl_block!(BlockF32, GgmlType::F32, 1);

impl BlockF32 {
    /// `y = x`: a bit copy.
    #[inline(always)]
    pub fn dequantize(&self, out: &mut [f32; 1]) {
        out[0] = self.v.to_f32();
    }
}

/// F16: one IEEE binary16. 16 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockF16 {
    /// The value, little-endian.
    pub v: F16Le,
}
const _: () = assert!(size_of::<BlockF16>() == 2);
impl_block!(BlockF16, GgmlType::F16, 1);

impl BlockF16 {
    /// `y = f32(h)`: exact widening (hardware `vcvtph2ps` / `fcvtl` agree).
    #[inline(always)]
    pub fn dequantize(&self, out: &mut [f32; 1]) {
        out[0] = self.v.to_f32();
    }
}

/// BF16: one bfloat16. 16 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockBF16 {
    /// The value, little-endian.
    pub v: Bf16Le,
}
const _: () = assert!(size_of::<BlockBF16>() == 2);
impl_block!(BlockBF16, GgmlType::BF16, 1);

impl BlockBF16 {
    /// `y = f32::from_bits(b << 16)`: exact, a shift of the bits.
    #[inline(always)]
    pub fn dequantize(&self, out: &mut [f32; 1]) {
        out[0] = self.v.to_f32();
    }
}

// ---------------------------------------------------------------------------
// 32-element blocks
// ---------------------------------------------------------------------------

/// Q4_0: 32 weights, 4-bit codes around 8 with one f16 scale.
/// 4.5 bits per weight.
///
/// Element `j < 16` is the low nibble of `qs[j]`, element `j + 16` the high
/// nibble of `qs[j]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: F16Le,
    /// 32 unsigned 4-bit codes, two per byte (low nibbles first half).
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);
impl_block!(BlockQ4_0, GgmlType::Q4_0, 32);

impl BlockQ4_0 {
    /// `y = d * (q - 8)`, `q ∈ 0..=15`.
    ///
    /// Exact form: `(q - 8)` is an integer of at most 4 bits, `d` has 11
    /// significant bits, so the one product is exact: no rounding anywhere.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        for (j, &b) in self.qs.iter().enumerate() {
            out[j] = d * ((b & 0x0F) as i32 - 8) as f32;
            out[j + 16] = d * ((b >> 4) as i32 - 8) as f32;
        }
    }
}

/// Q4_1: 32 weights, 4-bit codes with an f16 scale and an f16 offset.
/// 5.0 bits per weight.
///
/// Nibble order as [`BlockQ4_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: F16Le,
    /// Offset (the block minimum).
    pub m: F16Le,
    /// 32 unsigned 4-bit codes, two per byte (low nibbles first half).
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
impl_block!(BlockQ4_1, GgmlType::Q4_1, 32);

impl BlockQ4_1 {
    /// `y = d * q + m`, `q ∈ 0..=15`.
    ///
    /// Exact form: `d * q` is exact (≤ 15 significant bits); the single
    /// rounding is the add. So `q.mul_add(d, m)` (one FMA) gives the same
    /// bits, signed zeros included.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        let m = self.m.to_f32();
        for (j, &b) in self.qs.iter().enumerate() {
            out[j] = d * (b & 0x0F) as f32 + m;
            out[j + 16] = d * (b >> 4) as f32 + m;
        }
    }
}

/// Q5_0: 32 weights, 5-bit codes around 16 with one f16 scale.
/// 5.5 bits per weight.
///
/// The low 4 bits are nibbles as in [`BlockQ4_0`]; bit 4 of element `j` is
/// bit `j` of the little-endian u32 `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: F16Le,
    /// Bit 4 of each code: bit `j` of this little-endian u32 is element `j`'s.
    pub qh: [u8; 4],
    /// Low 4 bits of the 32 codes, two per byte (low nibbles first half).
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);
impl_block!(BlockQ5_0, GgmlType::Q5_0, 32);

impl BlockQ5_0 {
    /// The 5-bit code of element `j` (0..=31), before the offset.
    #[inline(always)]
    pub fn code(&self, j: usize) -> u8 {
        q5_code(&self.qs, self.qh, j)
    }

    /// `y = d * (q - 16)`, `q ∈ 0..=31`.
    ///
    /// Exact form: one product of an 11-bit by a ≤5-bit integer: exact, no
    /// rounding.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        for (j, o) in out.iter_mut().enumerate() {
            *o = d * (self.code(j) as i32 - 16) as f32;
        }
    }
}

/// Q5_1: 32 weights, 5-bit codes with an f16 scale and an f16 offset.
/// 6.0 bits per weight.
///
/// Code layout as [`BlockQ5_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: F16Le,
    /// Offset (the block minimum).
    pub m: F16Le,
    /// Bit 4 of each code: bit `j` of this little-endian u32 is element `j`'s.
    pub qh: [u8; 4],
    /// Low 4 bits of the 32 codes, two per byte (low nibbles first half).
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
impl_block!(BlockQ5_1, GgmlType::Q5_1, 32);

impl BlockQ5_1 {
    /// The 5-bit code of element `j` (0..=31).
    #[inline(always)]
    pub fn code(&self, j: usize) -> u8 {
        q5_code(&self.qs, self.qh, j)
    }

    /// `y = d * q + m`, `q ∈ 0..=31`.
    ///
    /// Exact form: `d * q` is exact (≤ 16 significant bits); the single
    /// rounding is the add, so `q.mul_add(d, m)` gives the same bits.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        let m = self.m.to_f32();
        for (j, o) in out.iter_mut().enumerate() {
            *o = d * self.code(j) as f32 + m;
        }
    }
}

#[inline(always)]
fn q5_code(qs: &[u8; 16], qh: [u8; 4], j: usize) -> u8 {
    let lo = (qs[j % 16] >> (4 * (j / 16))) & 0x0F;
    let hi = ((u32::from_le_bytes(qh) >> j) & 1) as u8;
    lo | (hi << 4)
}

/// Q8_0: 32 weights, signed 8-bit codes with one f16 scale.
/// 8.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: F16Le,
    /// 32 signed codes, element `j` in `qs[j]`.
    pub qs: [i8; 32],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
impl_block!(BlockQ8_0, GgmlType::Q8_0, 32);

impl BlockQ8_0 {
    /// `y = d * q`, `q ∈ -128..=127`.
    ///
    /// Exact form: one product of 11 by ≤ 8 significant bits: exact.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = d * q as f32;
        }
    }
}

/// IQ4_NL: 32 weights, 4-bit indices into [`KVALUES_IQ4NL`] with one f16
/// scale. 4.5 bits per weight.
///
/// Nibble order as [`BlockQ4_0`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockIQ4NL {
    /// Scale.
    pub d: F16Le,
    /// 32 4-bit indices into `KVALUES_IQ4NL`, two per byte (low nibbles first half).
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockIQ4NL>() == 18);
impl_block!(BlockIQ4NL, GgmlType::IQ4_NL, 32);

impl BlockIQ4NL {
    /// `y = d * KVALUES_IQ4NL[q]`, `q ∈ 0..=15`.
    ///
    /// Exact form: one product of 11 by ≤ 7 significant bits: exact.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        for (j, &b) in self.qs.iter().enumerate() {
            out[j] = d * KVALUES_IQ4NL[(b & 0x0F) as usize] as f32;
            out[j + 16] = d * KVALUES_IQ4NL[(b >> 4) as usize] as f32;
        }
    }
}

// ---------------------------------------------------------------------------
// 256-element super-blocks
// ---------------------------------------------------------------------------

/// Q2_K: 256 weights in 16 sub-blocks of 16; 2-bit codes, a 4-bit scale and
/// a 4-bit min per sub-block, f16 super-scales. 2.625 bits per weight.
///
/// Element `e = 128*h + 32*j + i` (`h < 2`, `j < 4`, `i < 32`) has code
/// `(qs[32*h + i] >> 2*j) & 3` and belongs to sub-block `e / 16`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ2K {
    /// Per sub-block: scale in the low nibble, min in the high nibble.
    pub scales: [u8; 16],
    /// 256 2-bit codes, four per byte (see the element order above).
    pub qs: [u8; 64],
    /// Super-scale of the sub-block scales.
    pub d: F16Le,
    /// Super-scale of the sub-block mins.
    pub dmin: F16Le,
}
const _: () = assert!(size_of::<BlockQ2K>() == 84);
impl_block!(BlockQ2K, GgmlType::Q2_K, 256);

impl BlockQ2K {
    /// `(scale, min)` of sub-block `s < 16`, each 0..=15.
    #[inline(always)]
    pub fn scale_min(&self, s: usize) -> (u8, u8) {
        (self.scales[s] & 0x0F, self.scales[s] >> 4)
    }

    /// The 2-bit code of element `e < 256`.
    #[inline(always)]
    pub fn code(&self, e: usize) -> u8 {
        let (h, j, i) = (e / 128, (e % 128) / 32, e % 32);
        (self.qs[32 * h + i] >> (2 * j)) & 3
    }

    /// `y = (d * sc) * q - dmin * mn`, `sc, mn ∈ 0..=15`, `q ∈ 0..=3`.
    ///
    /// Exact form: `d * sc` and `dmin * mn` are exact f32 (≤ 15 bits), and so
    /// is `(d * sc) * q` (≤ 17 bits); the single rounding is the subtraction.
    /// So `fma(d*sc, q, -(dmin*mn))` gives the same bits.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        let d = self.d.to_f32();
        let dmin = self.dmin.to_f32();
        for (s, chunk) in out.chunks_exact_mut(16).enumerate() {
            let (sc, mn) = self.scale_min(s);
            let dl = d * sc as f32;
            let ml = dmin * mn as f32;
            for (l, o) in chunk.iter_mut().enumerate() {
                *o = dl * self.code(16 * s + l) as f32 - ml;
            }
        }
    }
}

/// Q3_K: 256 weights in 16 sub-blocks of 16; 3-bit signed codes (2 low bits
/// plus a high bit in `hmask`), 6-bit signed sub-block scales, one f16
/// super-scale. 3.4375 bits per weight.
///
/// Element `e = 128*h + 32*j + i` has low bits `(qs[32*h + i] >> 2*j) & 3`
/// and high bit `(hmask[e % 32] >> (e / 32)) & 1`; the code is
/// `low - (high ? 0 : 4)`, in -4..=3.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ3K {
    /// High bit of each code: bit `e / 32` of byte `e % 32`; a clear bit subtracts 4.
    pub hmask: [u8; 32],
    /// Low 2 bits of the 256 codes, four per byte (order as Q2_K).
    pub qs: [u8; 64],
    /// 16 6-bit scales biased by 32: low nibbles in bytes 0..8, 2-bit highs in 8..12.
    pub scales: [u8; 12],
    /// Super-scale.
    pub d: F16Le,
}
const _: () = assert!(size_of::<BlockQ3K>() == 110);
impl_block!(BlockQ3K, GgmlType::Q3_K, 256);

impl BlockQ3K {
    /// The 16 sub-block scales, each in -32..=31.
    ///
    /// Scale `k`: low 4 bits are nibble `k / 8` of `scales[k % 8]`, high 2
    /// bits are bits `2*(k/4)..` of `scales[8 + k % 4]`.
    #[inline]
    pub fn sub_scales(&self) -> [i8; 16] {
        let mut out = [0i8; 16];
        for (k, o) in out.iter_mut().enumerate() {
            let lo = (self.scales[k % 8] >> (4 * (k / 8))) & 0x0F;
            let hi = (self.scales[8 + k % 4] >> (2 * (k / 4))) & 0x03;
            *o = (lo | (hi << 4)) as i8 - 32;
        }
        out
    }

    /// The signed code of element `e < 256`, in -4..=3.
    #[inline(always)]
    pub fn code(&self, e: usize) -> i8 {
        let (h, j, i) = (e / 128, (e % 128) / 32, e % 32);
        let low = ((self.qs[32 * h + i] >> (2 * j)) & 3) as i8;
        let high = (self.hmask[i] >> (e / 32)) & 1;
        if high == 0 {
            low - 4
        } else {
            low
        }
    }

    /// `y = (d * sc) * q`, `sc ∈ -32..=31`, `q ∈ -4..=3`.
    ///
    /// Exact form: ≤ 11 + 5 + 2 significant bits: every product exact, no
    /// rounding, any association (see the module note on signed zeros).
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        let d = self.d.to_f32();
        let sc = self.sub_scales();
        for (s, chunk) in out.chunks_exact_mut(16).enumerate() {
            let dl = d * sc[s] as f32;
            for (l, o) in chunk.iter_mut().enumerate() {
                *o = dl * self.code(16 * s + l) as f32;
            }
        }
    }
}

/// Unpack the 8 6-bit (scale, min) pairs of Q4_K / Q5_K.
///
/// Bytes 0..4 hold scales 0..4 (low 6 bits), bytes 4..8 mins 0..4; scales
/// and mins 4..8 take their low 4 bits from bytes 8..12 (scale: low nibble,
/// min: high nibble) and their high 2 bits from the top of bytes 0..4
/// (scale) and 4..8 (min).
#[inline(always)]
fn k_scale_min(scales: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 0x3F, scales[j + 4] & 0x3F)
    } else {
        let sc = (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4);
        let mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc, mn)
    }
}

/// Q4_K: 256 weights in 8 sub-blocks of 32; 4-bit codes, 6-bit scale and
/// min per sub-block, f16 super-scales. 4.5 bits per weight.
///
/// Element `e = 64*c + 32*k + l` (`c < 4`, `k < 2`, `l < 32`) has code
/// `(qs[32*c + l] >> 4*k) & 15` and belongs to sub-block `e / 32`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4K {
    /// Super-scale of the sub-block scales.
    pub d: F16Le,
    /// Super-scale of the sub-block mins.
    pub dmin: F16Le,
    /// 8 6-bit scales and 8 6-bit mins, packed (see [`BlockQ4K::scale_min`]).
    pub scales: [u8; 12],
    /// 256 4-bit codes, two per byte (see the element order above).
    pub qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);
impl_block!(BlockQ4K, GgmlType::Q4_K, 256);

impl BlockQ4K {
    /// `(scale, min)` of sub-block `j < 8`, each 0..=63.
    #[inline(always)]
    pub fn scale_min(&self, j: usize) -> (u8, u8) {
        k_scale_min(&self.scales, j)
    }

    /// The 4-bit code of element `e < 256`.
    #[inline(always)]
    pub fn code(&self, e: usize) -> u8 {
        let (c, k, l) = (e / 64, (e % 64) / 32, e % 32);
        (self.qs[32 * c + l] >> (4 * k)) & 0x0F
    }

    /// `y = (d * sc) * q - dmin * mn`, `sc, mn ∈ 0..=63`, `q ∈ 0..=15`.
    ///
    /// Exact form: `d * sc` and `dmin * mn` are exact (≤ 17 bits), and so is
    /// `(d * sc) * q` (≤ 21 bits); the single rounding is the subtraction.
    /// So `fma(d*sc, q, -(dmin*mn))` gives the same bits. Only the order
    /// "both products, then one subtraction" matters: folding `dmin*mn` into
    /// a running sum before subtracting would add a second rounding.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        let d = self.d.to_f32();
        let dmin = self.dmin.to_f32();
        for (s, chunk) in out.chunks_exact_mut(32).enumerate() {
            let (sc, mn) = self.scale_min(s);
            let dl = d * sc as f32;
            let ml = dmin * mn as f32;
            for (l, o) in chunk.iter_mut().enumerate() {
                *o = dl * self.code(32 * s + l) as f32 - ml;
            }
        }
    }
}

/// Q5_K: 256 weights in 8 sub-blocks of 32; 5-bit codes, 6-bit scale and
/// min per sub-block, f16 super-scales. 5.5 bits per weight.
///
/// Low 4 bits as [`BlockQ4K`]; bit 4 of element `e` is
/// `(qh[e % 32] >> (e / 32)) & 1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5K {
    /// Super-scale of the sub-block scales.
    pub d: F16Le,
    /// Super-scale of the sub-block mins.
    pub dmin: F16Le,
    /// 8 6-bit scales and 8 6-bit mins, packed as in Q4_K.
    pub scales: [u8; 12],
    /// Bit 4 of each code: bit `e / 32` of byte `e % 32`.
    pub qh: [u8; 32],
    /// Low 4 bits of the 256 codes, two per byte (order as Q4_K).
    pub qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);
impl_block!(BlockQ5K, GgmlType::Q5_K, 256);

impl BlockQ5K {
    /// `(scale, min)` of sub-block `j < 8`, each 0..=63.
    #[inline(always)]
    pub fn scale_min(&self, j: usize) -> (u8, u8) {
        k_scale_min(&self.scales, j)
    }

    /// The 5-bit code of element `e < 256`.
    #[inline(always)]
    pub fn code(&self, e: usize) -> u8 {
        let (c, k, l) = (e / 64, (e % 64) / 32, e % 32);
        let lo = (self.qs[32 * c + l] >> (4 * k)) & 0x0F;
        let hi = (self.qh[e % 32] >> (e / 32)) & 1;
        lo | (hi << 4)
    }

    /// `y = (d * sc) * q - dmin * mn`, `sc, mn ∈ 0..=63`, `q ∈ 0..=31`.
    ///
    /// Exact form: both products exact (`(d * sc) * q` ≤ 22 bits); the single
    /// rounding is the subtraction, so `fma(d*sc, q, -(dmin*mn))` gives the
    /// same bits.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        let d = self.d.to_f32();
        let dmin = self.dmin.to_f32();
        for (s, chunk) in out.chunks_exact_mut(32).enumerate() {
            let (sc, mn) = self.scale_min(s);
            let dl = d * sc as f32;
            let ml = dmin * mn as f32;
            for (l, o) in chunk.iter_mut().enumerate() {
                *o = dl * self.code(32 * s + l) as f32 - ml;
            }
        }
    }
}

/// Q6_K: 256 weights in 16 sub-blocks of 16; 6-bit codes around 32, signed
/// 8-bit sub-block scales, one f16 super-scale. 6.5625 bits per weight.
///
/// For element `e = 128*h + r` (`h < 2`, `r < 128`): low 4 bits are
/// `(ql[64*h + r % 64] >> 4*(r / 64)) & 15`, high 2 bits are
/// `(qh[32*h + r % 32] >> 2*(r / 32)) & 3`; sub-block `e / 16`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ6K {
    /// Low 4 bits of the 256 codes, two per byte (see the element order above).
    pub ql: [u8; 128],
    /// High 2 bits of the 256 codes, four per byte.
    pub qh: [u8; 64],
    /// Signed scale of each 16-element sub-block.
    pub scales: [i8; 16],
    /// Super-scale.
    pub d: F16Le,
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);
impl_block!(BlockQ6K, GgmlType::Q6_K, 256);

impl BlockQ6K {
    /// The signed code of element `e < 256`, in -32..=31.
    #[inline(always)]
    pub fn code(&self, e: usize) -> i8 {
        let (h, r) = (e / 128, e % 128);
        let lo = (self.ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
        let hi = (self.qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        (lo | (hi << 4)) as i8 - 32
    }

    /// `y = (d * sc) * q`, `sc ∈ -128..=127`, `q ∈ -32..=31`.
    ///
    /// Exact form: ≤ 11 + 7 + 5 = 23 significant bits, so every product is
    /// exact, no rounding, any association (see the module note on signed
    /// zeros).
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        let d = self.d.to_f32();
        for (s, chunk) in out.chunks_exact_mut(16).enumerate() {
            let dl = d * self.scales[s] as f32;
            for (l, o) in chunk.iter_mut().enumerate() {
                *o = dl * self.code(16 * s + l) as f32;
            }
        }
    }
}

/// IQ4_XS: 256 weights in 8 sub-blocks of 32; 4-bit indices into
/// [`KVALUES_IQ4NL`], 6-bit signed sub-block scales, one f16 super-scale.
/// 4.25 bits per weight.
///
/// Element `e = 32*ib + 16*k + l` (`ib < 8`, `k < 2`, `l < 16`) has index
/// `(qs[16*ib + l] >> 4*k) & 15`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockIQ4XS {
    /// Super-scale.
    pub d: F16Le,
    /// High 2 bits of the 8 sub-block scales (little-endian u16, 2 bits each).
    pub scales_h: [u8; 2],
    /// Low 4 bits of the 8 sub-block scales, two per byte (low nibble first).
    pub scales_l: [u8; 4],
    /// 256 4-bit indices into `KVALUES_IQ4NL` (see the element order above).
    pub qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockIQ4XS>() == 136);
impl_block!(BlockIQ4XS, GgmlType::IQ4_XS, 256);

impl BlockIQ4XS {
    /// Scale of sub-block `ib < 8`, in -32..=31.
    #[inline(always)]
    pub fn sub_scale(&self, ib: usize) -> i8 {
        let lo = (self.scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F;
        let hi = ((u16::from_le_bytes(self.scales_h) >> (2 * ib)) & 0x03) as u8;
        (lo | (hi << 4)) as i8 - 32
    }

    /// The 4-bit index of element `e < 256` (into `KVALUES_IQ4NL`).
    #[inline(always)]
    pub fn code(&self, e: usize) -> u8 {
        let (ib, k, l) = (e / 32, (e % 32) / 16, e % 16);
        (self.qs[16 * ib + l] >> (4 * k)) & 0x0F
    }

    /// `y = (d * ls) * KVALUES_IQ4NL[q]`, `ls ∈ -32..=31`.
    ///
    /// Exact form: ≤ 11 + 5 + 7 = 23 significant bits: every product exact,
    /// no rounding, any association (see the module note on signed zeros).
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        let d = self.d.to_f32();
        for (ib, chunk) in out.chunks_exact_mut(32).enumerate() {
            let dl = d * self.sub_scale(ib) as f32;
            for (l, o) in chunk.iter_mut().enumerate() {
                *o = dl * KVALUES_IQ4NL[self.code(32 * ib + l) as usize] as f32;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A length that does not fit a block format.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DtypeError {
    /// An element count that is not a whole number of blocks.
    #[error("{ty}: {n} elements is not a whole number of {block_size}-element blocks")]
    PartialBlock {
        ty: GgmlType,
        n: usize,
        block_size: usize,
    },
    /// A byte slice of the wrong length for the element count.
    #[error("{ty}: {n} elements take {expected} bytes, got {got}")]
    ByteLength {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
    /// A byte slice that is not a whole number of blocks.
    #[error("{ty}: {bytes} bytes is not a whole number of {type_size}-byte blocks")]
    PartialBlockBytes {
        ty: GgmlType,
        bytes: usize,
        type_size: usize,
    },
    /// An element count whose byte size overflows.
    #[error("{ty}: {n} elements is too many")]
    TooLarge { ty: GgmlType, n: usize },
}

/// Bytes of `n` elements of `ty`, checked.
fn checked_row_bytes(ty: GgmlType, n: usize) -> Result<usize, DtypeError> {
    if n % ty.block_size() != 0 {
        return Err(DtypeError::PartialBlock {
            ty,
            n,
            block_size: ty.block_size(),
        });
    }
    (n / ty.block_size())
        .checked_mul(ty.type_size())
        .ok_or(DtypeError::TooLarge { ty, n })
}

// ---------------------------------------------------------------------------
// Slices of blocks
// ---------------------------------------------------------------------------

/// View raw tensor bytes (any alignment) as blocks of `B`, without copying.
pub fn view_blocks<B: Block>(bytes: &[u8]) -> Result<&[B], DtypeError> {
    bytemuck::try_cast_slice(bytes).map_err(|_| DtypeError::PartialBlockBytes {
        ty: B::TYPE,
        bytes: bytes.len(),
        type_size: B::TYPE.type_size(),
    })
}

/// Dispatch `$f::<BlockT>($args)` on a runtime type.
macro_rules! with_block {
    ($ty:expr, $f:ident ( $($arg:expr),* )) => {
        match $ty {
            GgmlType::F32 => $f::<BlockF32>($($arg),*),
            GgmlType::F16 => $f::<BlockF16>($($arg),*),
            GgmlType::BF16 => $f::<BlockBF16>($($arg),*),
            GgmlType::Q4_0 => $f::<BlockQ4_0>($($arg),*),
            GgmlType::Q4_1 => $f::<BlockQ4_1>($($arg),*),
            GgmlType::Q5_0 => $f::<BlockQ5_0>($($arg),*),
            GgmlType::Q5_1 => $f::<BlockQ5_1>($($arg),*),
            GgmlType::Q8_0 => $f::<BlockQ8_0>($($arg),*),
            GgmlType::Q2_K => $f::<BlockQ2K>($($arg),*),
            GgmlType::Q3_K => $f::<BlockQ3K>($($arg),*),
            GgmlType::Q4_K => $f::<BlockQ4K>($($arg),*),
            GgmlType::Q5_K => $f::<BlockQ5K>($($arg),*),
            GgmlType::Q6_K => $f::<BlockQ6K>($($arg),*),
            GgmlType::IQ4_NL => $f::<BlockIQ4NL>($($arg),*),
            GgmlType::IQ4_XS => $f::<BlockIQ4XS>($($arg),*),
        }
    };
}

#[inline(always)]
fn dequantize_block_as<B: Block>(block: &[u8], out: &mut [f32]) {
    bytemuck::from_bytes::<B>(block).dequantize_to(out)
}

/// Exact dequantization of one block of `ty` into `out`.
///
/// Precondition: `block.len() == ty.type_size()` and
/// `out.len() == ty.block_size()`. Checked by an `assert!` that also holds in
/// release builds (two compares per block); a violation panics. Meant for hot
/// loops that dequantize one block into a stack buffer, e.g.
/// `let mut buf = [0f32; QK_K]; dequantize_block(ty, blk, &mut buf[..ty.block_size()])`.
/// For the float types a "block" is one element; use [`dequantize_row`] for
/// those. Where the type is known statically, the typed
/// `Block*::dequantize` methods avoid the dispatch.
#[inline]
pub fn dequantize_block(ty: GgmlType, block: &[u8], out: &mut [f32]) {
    assert!(
        block.len() == ty.type_size() && out.len() == ty.block_size(),
        "{ty}: dequantize_block got {} bytes into {} floats, a block is {} bytes into {}",
        block.len(),
        out.len(),
        ty.type_size(),
        ty.block_size(),
    );
    with_block!(ty, dequantize_block_as(block, out))
}

fn dequantize_row_as<B: Block>(src: &[u8], dst: &mut [f32]) {
    let blocks: &[B] = bytemuck::cast_slice(src);
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(B::ELEMS)) {
        b.dequantize_to(out);
    }
}

/// Exact dequantization of a row: `src` must be exactly the
/// `dst.len() / ty.block_size()` blocks that fill `dst`. Lengths are checked
/// and a mismatch is an error, never a panic.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DtypeError> {
    let expected = checked_row_bytes(ty, dst.len())?;
    if src.len() != expected {
        return Err(DtypeError::ByteLength {
            ty,
            n: dst.len(),
            expected,
            got: src.len(),
        });
    }
    with_block!(ty, dequantize_row_as(src, dst));
    Ok(())
}

/// Dequantize `n` elements of `ty` from `src` into a new vector. The lengths
/// are checked before anything is allocated.
pub fn dequantize_to_vec(ty: GgmlType, src: &[u8], n: usize) -> Result<Vec<f32>, DtypeError> {
    let expected = checked_row_bytes(ty, n)?;
    if src.len() != expected {
        return Err(DtypeError::ByteLength {
            ty,
            n,
            expected,
            got: src.len(),
        });
    }
    let mut out = vec![0f32; n];
    dequantize_row(ty, src, &mut out)?;
    Ok(out)
}

/// Reference dot product of a quantized row with `x`: dequantize block by
/// block, accumulate `w * x` in f64 (each product exact), round once to f32.
/// It reads like the maths and is for tests with a tolerance; it is not the
/// summation order of any kernel.
///
/// Panics unless `row` holds exactly the blocks of `x.len()` elements.
pub fn vec_dot_ref(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    // Chunks of QK_K elements: a whole number of blocks for every type.
    let mut buf = [0f32; QK_K];
    let chunk_bytes = QK_K / ty.block_size() * ty.type_size();
    let expected = checked_row_bytes(ty, x.len());
    assert!(
        expected == Ok(row.len()),
        "{ty}: vec_dot_ref of {} elements got {} bytes ({expected:?})",
        x.len(),
        row.len(),
    );
    let mut acc = 0f64;
    for (src, xs) in row.chunks(chunk_bytes).zip(x.chunks(QK_K)) {
        let w = &mut buf[..xs.len()];
        if let Err(e) = dequantize_row(ty, src, w) {
            panic!("vec_dot_ref: {e}");
        }
        acc += w
            .iter()
            .zip(xs)
            .map(|(&w, &x)| w as f64 * x as f64)
            .sum::<f64>();
    }
    acc as f32
}

// ---------------------------------------------------------------------------
// Random valid blocks
// ---------------------------------------------------------------------------

/// splitmix64: a tiny, well-mixed deterministic generator. Written here
/// rather than taken from `rand` (a dev-dependency only) because the library
/// itself (the model synthesizer) needs reproducible bytes, and this stream
/// must never change under a crate upgrade.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// A random f16 with magnitude in [2^-10, 2^-4) and a random sign.
fn random_scale_f16(rng: &mut SplitMix64) -> F16Le {
    let r = rng.next_u64();
    let exp = 5 + (r % 6) as u16; // biased exponent 5..=10: 2^-10 ..= 2^-5
    let mant = ((r >> 8) & 0x3FF) as u16;
    let sign = ((r >> 20) & 1) as u16;
    F16Le::from_bits((sign << 15) | (exp << 10) | mant)
}

/// Byte offsets of the f16 scale fields of one block of `ty`.
fn scale_offsets(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    const D_M: [usize; 2] = [0, 2];
    const Q2K: [usize; 2] = [offset_of!(BlockQ2K, d), offset_of!(BlockQ2K, dmin)];
    const Q3K: [usize; 1] = [offset_of!(BlockQ3K, d)];
    const Q6K: [usize; 1] = [offset_of!(BlockQ6K, d)];
    const _: () = assert!(
        offset_of!(BlockQ4_1, m) == 2
            && offset_of!(BlockQ5_1, m) == 2
            && offset_of!(BlockQ4K, dmin) == 2
            && offset_of!(BlockQ5K, dmin) == 2
    );
    match ty {
        F32 | F16 | BF16 => &[],
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL | IQ4_XS => &D_M[..1],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &D_M,
        Q2_K => &Q2K,
        Q3_K => &Q3K,
        Q6_K => &Q6K,
    }
}

/// `n_blocks` random, valid blocks of `ty`, deterministic in `seed`.
///
/// Codes and sub-block scales are random bytes (every bit pattern is valid);
/// the f16 scales (`d`, `m`, `dmin`) have a random sign and magnitude in
/// [2^-10, 2^-4), so every dequantized value is finite (|y| < 2^9). For the
/// float types every element has magnitude in [2^-10, 2^-4) and a random
/// sign. Usable for kernel tests and for synthesizing small random models.
pub fn random_blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    let ts = ty.type_size();
    let mut out = vec![0u8; n_blocks * ts];
    rng.fill(&mut out);
    for block in out.chunks_exact_mut(ts) {
        match ty {
            GgmlType::F32 => {
                let r = rng.next_u64();
                let exp = (117 + r % 6) as u32; // 2^-10 ..= 2^-5
                let bits =
                    (((r >> 8) & 1) as u32) << 31 | exp << 23 | ((r >> 32) as u32 & 0x7F_FFFF);
                block.copy_from_slice(&bits.to_le_bytes());
            }
            GgmlType::F16 => block.copy_from_slice(&random_scale_f16(&mut rng).0),
            GgmlType::BF16 => {
                let r = rng.next_u64();
                let exp = (117 + r % 6) as u16;
                let bits = (((r >> 8) & 1) as u16) << 15 | exp << 7 | ((r >> 16) as u16 & 0x7F);
                block.copy_from_slice(&bits.to_le_bytes());
            }
            _ => {
                for &off in scale_offsets(ty) {
                    block[off..off + 2].copy_from_slice(&random_scale_f16(&mut rng).0);
                }
            }
        }
    }
    out
}
