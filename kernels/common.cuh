// Shared helpers of every loip kernel: exact scalar conversions, the
// canonical 16-lane reduction and the engine's exp.
//
// NVRTC compiles these sources at run time with no headers (the pip wheel of
// NVRTC ships none), so only built-in types are used. Every unit is compiled
// with --fmad=false --prec-div=true --prec-sqrt=true --ftz=false: a product
// followed by an add is never fused unless written as fmaf(), exactly as the
// CPU code (Rust does not contract), so both round alike (README, "Numerics:
// one reduction order everywhere").

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Exact widening of an IEEE binary16 given by its bits (hardware cvt).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Little-endian loads from byte pointers of any alignment: GGUF blocks have
// alignment 1 and are read in place from the mapped file.
__device__ __forceinline__ u16 load_u16(const u8* p) {
    return (u16)(p[0] | (p[1] << 8));
}
__device__ __forceinline__ u32 load_u32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}
__device__ __forceinline__ float load_f16(const u8* p) { return f16_to_f32(load_u16(p)); }

// The canonical lane sum of the 16 lanes of a half-warp group (lane =
// threadIdx.x % 16): halves folded onto each other, 8, 4, 2, 1, as the CPU's
// tree_sum. Lane 0 of the group holds the result; every lane of the warp
// must call it.
__device__ __forceinline__ float tree_sum16(float v) {
    v += __shfl_down_sync(0xffffffffu, v, 8, 16);
    v += __shfl_down_sync(0xffffffffu, v, 4, 16);
    v += __shfl_down_sync(0xffffffffu, v, 2, 16);
    v += __shfl_down_sync(0xffffffffu, v, 1, 16);
    return v;
}

// e^x with IEEE add, sub and mul only and an exact power-of-two scale: the
// bits of the CPU's exp_lanes (src/compute/cpu/ops.rs). Constants are given
// by their f32 bits.
__device__ __forceinline__ float loip_exp(float x) {
    x = fmaxf(fminf(x, 88.0f), -86.0f);
    const float magic = 12582912.0f;                     // 1.5 * 2^23
    const float log2e = __int_as_float(0x3fb8aa3b);
    const float ln2_hi = __int_as_float(0x3f317200);
    const float ln2_lo = __int_as_float(0x35bfbe8e);
    float n = (x * log2e + magic) - magic;
    float r = (x - n * ln2_hi) - n * ln2_lo;
    float p = __int_as_float(0x39500d01);                // 1/5040
    p = p * r + __int_as_float(0x3ab60b61);              // 1/720
    p = p * r + __int_as_float(0x3c088889);              // 1/120
    p = p * r + __int_as_float(0x3d2aaaab);              // 1/24
    p = p * r + __int_as_float(0x3e2aaaab);              // 1/6
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * __int_as_float(((int)n + 127) << 23);
}
