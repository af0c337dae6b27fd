// Matrix products on quantized weights read in place: out = W x for one
// token (matvec_<type>) or a batch of tokens (matmul_<type>), and the
// dequantization of chosen rows (rows_<type>: embedding lookup).
//
// W has `rows` rows of `cols` elements, row r at `w + r * row_bytes`, in the
// GGUF layout of its type. x is [n_tok][cols] f32, out is [n_tok][rows].
//
// Reduction order: each (row, token) output is computed by one group of 16
// threads. Lane l fused-multiply-adds element j = l, l + 16, l + 32, ... in
// increasing j, then the 16 lanes are summed by the canonical tree: the
// CPU's order, so each output has the CPU's bits, and the batched kernel
// gives every token the bits of the single-token one.
//
// Launch: block (16, ROWS_PER_BLOCK); grid (ceil(rows / ROWS_PER_BLOCK),
// ceil(n_tok / TOK_TILE)) for matmul, (ceil(rows / ROWS_PER_BLOCK), 1) for
// matvec.

#define ROWS_PER_BLOCK 8
#define TOK_TILE 8

#define MATVEC(fmt)                                                              \
extern "C" __global__ void matvec_##fmt(const u8* w, u64 row_bytes, int rows,   \
                                        int cols, const float* x, float* out) { \
    int r = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;                           \
    int lane = threadIdx.x;                                                      \
    float acc = 0.0f;                                                            \
    if (r < rows) {                                                              \
        const u8* row = w + (size_t)r * row_bytes;                               \
        for (int j = lane; j < cols; j += 16)                                    \
            acc = fmaf(DEQ_AT(fmt, row, j), x[j], acc);                          \
    }                                                                            \
    acc = tree_sum16(acc);                                                       \
    if (r < rows && lane == 0) out[r] = acc;                                     \
}

#define MATMUL(fmt)                                                              \
extern "C" __global__ void matmul_##fmt(const u8* w, u64 row_bytes, int rows,   \
                                        int cols, const float* x, int n_tok,     \
                                        float* out) {                            \
    int r = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;                           \
    int lane = threadIdx.x;                                                      \
    int t0 = blockIdx.y * TOK_TILE;                                              \
    int nt = min(TOK_TILE, n_tok - t0);                                          \
    float acc[TOK_TILE];                                                         \
    for (int t = 0; t < TOK_TILE; t++) acc[t] = 0.0f;                            \
    if (r < rows) {                                                              \
        const u8* row = w + (size_t)r * row_bytes;                               \
        const float* xt = x + (size_t)t0 * cols;                                 \
        for (int j = lane; j < cols; j += 16) {                                  \
            float wj = DEQ_AT(fmt, row, j);                                      \
            for (int t = 0; t < TOK_TILE; t++)                                   \
                if (t < nt) acc[t] = fmaf(wj, xt[(size_t)t * cols + j], acc[t]); \
        }                                                                        \
    }                                                                            \
    for (int t = 0; t < TOK_TILE; t++) {                                         \
        float s = tree_sum16(acc[t]);                                            \
        if (r < rows && lane == 0 && t < nt)                                     \
            out[(size_t)(t0 + t) * rows + r] = s;                                \
    }                                                                            \
}

// out[i][j] = element j of row ids[i], for i < n: the embedding lookup.
// Launch: any 1-D grid; threads stride over the n * cols elements.
#define ROWS(fmt)                                                                \
extern "C" __global__ void rows_##fmt(const u8* w, u64 row_bytes, int cols,     \
                                      const u32* ids, int n, float* out) {       \
    size_t total = (size_t)n * cols;                                             \
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;    \
         k += (size_t)gridDim.x * blockDim.x) {                                  \
        int i = (int)(k / cols), j = (int)(k % cols);                            \
        const u8* row = w + (size_t)ids[i] * row_bytes;                          \
        out[k] = DEQ_AT(fmt, row, j);                                            \
    }                                                                            \
}

FOR_EACH_FORMAT(MATVEC)
FOR_EACH_FORMAT(MATMUL)
FOR_EACH_FORMAT(ROWS)
