// Exact dequantization of one element of a GGUF block, read in place.
//
// Each deq_<type>(block, e) returns element e of the block at `b` by the
// format's own formula with the roundings of src/model/dtype.rs (see the
// table there): products of an f16 scale and small integers are exact, and
// the one rounded operation (the offset add or the min subtraction) is a
// separate add or sub, never fused (the units are compiled --fmad=false).
// BLOCK_<type> and SIZE_<type> give the elements and bytes per block.

#define BLOCK_f32 1
#define SIZE_f32 4
#define BLOCK_f16 1
#define SIZE_f16 2
#define BLOCK_bf16 1
#define SIZE_bf16 2
#define BLOCK_q4_0 32
#define SIZE_q4_0 18
#define BLOCK_q4_1 32
#define SIZE_q4_1 20
#define BLOCK_q5_0 32
#define SIZE_q5_0 22
#define BLOCK_q5_1 32
#define SIZE_q5_1 24
#define BLOCK_q8_0 32
#define SIZE_q8_0 34
#define BLOCK_iq4_nl 32
#define SIZE_iq4_nl 18
#define BLOCK_q2_k 256
#define SIZE_q2_k 84
#define BLOCK_q3_k 256
#define SIZE_q3_k 110
#define BLOCK_q4_k 256
#define SIZE_q4_k 144
#define BLOCK_q5_k 256
#define SIZE_q5_k 176
#define BLOCK_q6_k 256
#define SIZE_q6_k 210
#define BLOCK_iq4_xs 256
#define SIZE_iq4_xs 136

// The 16 levels of IQ4_NL and IQ4_XS.
__constant__ i8 KVALUES_IQ4NL[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
};

// F32: the stored bits.
__device__ __forceinline__ float deq_f32(const u8* b, int) {
    return __int_as_float((int)load_u32(b));
}

// F16: exact widening.
__device__ __forceinline__ float deq_f16(const u8* b, int) { return load_f16(b); }

// BF16: the 16 bits as the high half of an f32.
__device__ __forceinline__ float deq_bf16(const u8* b, int) {
    return __int_as_float((int)((u32)load_u16(b) << 16));
}

// The 4-bit code of element e < 32 of a 16-byte nibble array (low nibbles
// are elements 0..16, high nibbles 16..32).
__device__ __forceinline__ int nibble32(const u8* qs, int e) {
    return (qs[e & 15] >> (4 * (e >> 4))) & 0x0F;
}

// Q4_0 {d: f16, qs[16]}: d * (q - 8), exact.
__device__ __forceinline__ float deq_q4_0(const u8* b, int e) {
    float d = load_f16(b);
    return d * (float)(nibble32(b + 2, e) - 8);
}

// Q4_1 {d: f16, m: f16, qs[16]}: d * q + m, one rounding (the add).
__device__ __forceinline__ float deq_q4_1(const u8* b, int e) {
    float d = load_f16(b);
    float m = load_f16(b + 2);
    return d * (float)nibble32(b + 4, e) + m;
}

// The 5-bit code of element e < 32: nibble from qs, bit 4 from qh.
__device__ __forceinline__ int code5(const u8* qh, const u8* qs, int e) {
    return nibble32(qs, e) | (((load_u32(qh) >> e) & 1) << 4);
}

// Q5_0 {d: f16, qh[4], qs[16]}: d * (q - 16), exact.
__device__ __forceinline__ float deq_q5_0(const u8* b, int e) {
    float d = load_f16(b);
    return d * (float)(code5(b + 2, b + 6, e) - 16);
}

// Q5_1 {d: f16, m: f16, qh[4], qs[16]}: d * q + m, one rounding.
__device__ __forceinline__ float deq_q5_1(const u8* b, int e) {
    float d = load_f16(b);
    float m = load_f16(b + 2);
    return d * (float)code5(b + 4, b + 8, e) + m;
}

// Q8_0 {d: f16, qs[32] signed}: d * q, exact.
__device__ __forceinline__ float deq_q8_0(const u8* b, int e) {
    float d = load_f16(b);
    return d * (float)(i8)b[2 + e];
}

// IQ4_NL {d: f16, qs[16]}: d * KVALUES[q], exact.
__device__ __forceinline__ float deq_iq4_nl(const u8* b, int e) {
    float d = load_f16(b);
    return d * (float)KVALUES_IQ4NL[nibble32(b + 2, e)];
}

// Q2_K {scales[16], qs[64], d: f16, dmin: f16}: (d*sc)*q - dmin*mn.
__device__ __forceinline__ float deq_q2_k(const u8* b, int e) {
    float d = load_f16(b + 80);
    float dmin = load_f16(b + 82);
    int s = e >> 4;
    float dl = d * (float)(b[s] & 0x0F);
    float ml = dmin * (float)(b[s] >> 4);
    int h = e >> 7, j = (e & 127) >> 5, i = e & 31;
    int q = (b[16 + 32 * h + i] >> (2 * j)) & 3;
    return dl * (float)q - ml;
}

// Q3_K {hmask[32], qs[64], scales[12], d: f16}: (d*sc)*q, exact.
__device__ __forceinline__ float deq_q3_k(const u8* b, int e) {
    const u8* hmask = b;
    const u8* qs = b + 32;
    const u8* sc = b + 96;
    float d = load_f16(b + 108);
    int k = e >> 4;
    int lo = (sc[k & 7] >> (4 * (k >> 3))) & 0x0F;
    int hi = (sc[8 + (k & 3)] >> (2 * (k >> 2))) & 0x03;
    int scale = (lo | (hi << 4)) - 32;
    int h = e >> 7, j = (e & 127) >> 5, i = e & 31;
    int low = (qs[32 * h + i] >> (2 * j)) & 3;
    int high = (hmask[i] >> (e >> 5)) & 1;
    int q = high ? low : low - 4;
    return (d * (float)scale) * (float)q;
}

// (scale, min) of sub-block j < 8 of Q4_K / Q5_K, 6 bits each.
__device__ __forceinline__ void k_scale_min(const u8* s, int j, int* sc, int* mn) {
    if (j < 4) {
        *sc = s[j] & 0x3F;
        *mn = s[j + 4] & 0x3F;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K {d: f16, dmin: f16, scales[12], qs[128]}: (d*sc)*q - dmin*mn.
__device__ __forceinline__ float deq_q4_k(const u8* b, int e) {
    float d = load_f16(b);
    float dmin = load_f16(b + 2);
    int sc, mn;
    k_scale_min(b + 4, e >> 5, &sc, &mn);
    int c = e >> 6, k = (e & 63) >> 5, l = e & 31;
    int q = (b[16 + 32 * c + l] >> (4 * k)) & 0x0F;
    return (d * (float)sc) * (float)q - dmin * (float)mn;
}

// Q5_K {d: f16, dmin: f16, scales[12], qh[32], qs[128]}: as Q4_K, 5-bit q.
__device__ __forceinline__ float deq_q5_k(const u8* b, int e) {
    float d = load_f16(b);
    float dmin = load_f16(b + 2);
    int sc, mn;
    k_scale_min(b + 4, e >> 5, &sc, &mn);
    int c = e >> 6, k = (e & 63) >> 5, l = e & 31;
    int lo = (b[48 + 32 * c + l] >> (4 * k)) & 0x0F;
    int hi = (b[16 + (e & 31)] >> (e >> 5)) & 1;
    return (d * (float)sc) * (float)(lo | (hi << 4)) - dmin * (float)mn;
}

// Q6_K {ql[128], qh[64], scales[16] signed, d: f16}: (d*sc)*q, exact.
__device__ __forceinline__ float deq_q6_k(const u8* b, int e) {
    float d = load_f16(b + 208);
    int h = e >> 7, r = e & 127;
    int lo = (b[64 * h + (r & 63)] >> (4 * (r >> 6))) & 0x0F;
    int hi = (b[128 + 32 * h + (r & 31)] >> (2 * (r >> 5))) & 0x03;
    int q = (lo | (hi << 4)) - 32;
    float sc = (float)(i8)b[192 + (e >> 4)];
    return (d * sc) * (float)q;
}

// IQ4_XS {d: f16, scales_h: u16, scales_l[4], qs[128]}: (d*ls)*KVALUES[q].
__device__ __forceinline__ float deq_iq4_xs(const u8* b, int e) {
    float d = load_f16(b);
    int ib = e >> 5;
    int lo = (b[4 + (ib >> 1)] >> (4 * (ib & 1))) & 0x0F;
    int hi = (load_u16(b + 2) >> (2 * ib)) & 0x03;
    int ls = (lo | (hi << 4)) - 32;
    int k = (e & 31) >> 4, l = e & 15;
    int q = (b[8 + 16 * ib + l] >> (4 * k)) & 0x0F;
    return (d * (float)ls) * (float)KVALUES_IQ4NL[q];
}

// Element j of a row of `fmt` that starts at `row`.
#define DEQ_AT(fmt, row, j) \
    deq_##fmt((row) + (size_t)((j) / BLOCK_##fmt) * SIZE_##fmt, (j) % BLOCK_##fmt)

// Stamps `M(fmt)` for every block format of the engine.
#define FOR_EACH_FORMAT(M) \
    M(f32) M(f16) M(bf16) M(q4_0) M(q4_1) M(q5_0) M(q5_1) M(q8_0) \
    M(q2_k) M(q3_k) M(q4_k) M(q5_k) M(q6_k) M(iq4_nl) M(iq4_xs)
