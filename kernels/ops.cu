// The other operators of a Llama layer, each with the CPU's reduction order
// (src/compute/cpu/ops.rs), so that each output has the CPU's bits.

// RMSNorm of each of the `n_rows` rows of x (length n) scaled by w:
// out = (x * (1 / sqrt(mean(x^2) + eps))) * w. The sum of squares is the
// canonical 16-lane dot product.
// Launch: block (16, 8); grid ceil(n_rows / 8).
extern "C" __global__ void rmsnorm(const float* x, const float* w, float eps, int n,
                                   int n_rows, float* out) {
    int row = blockIdx.x * blockDim.y + threadIdx.y;
    int lane = threadIdx.x;
    const float* xr = x + (size_t)row * n;
    float acc = 0.0f;
    if (row < n_rows)
        for (int j = lane; j < n; j += 16) acc = fmaf(xr[j], xr[j], acc);
    float ss = __shfl_sync(0xffffffffu, tree_sum16(acc), 0, 16);
    if (row >= n_rows) return;
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int j = lane; j < n; j += 16) out[(size_t)row * n + j] = (xr[j] * scale) * w[j];
}

// Rotary embedding, pairs (2i, 2i+1), in place on x = [n_tok][n_heads][head_dim].
// cs = [n_tok][head_dim / 2] of (cos, sin), computed on the host as the CPU
// does (f64 angles rounded to f32), so both rotate by the same numbers.
// Launch: any 1-D grid; threads stride over the n_tok * n_heads * head_dim / 2 pairs.
extern "C" __global__ void rope(float* x, const float* cs, int n_tok, int n_heads,
                                int head_dim) {
    int half = head_dim / 2;
    size_t total = (size_t)n_tok * n_heads * half;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x) {
        size_t t = k / ((size_t)n_heads * half);
        int i = (int)(k % half);
        float c = cs[2 * (t * half + i)];
        float s = cs[2 * (t * half + i) + 1];
        float* p = x + 2 * k;
        float a = p[0], b = p[1];
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
    }
}

// SiLU(gate) * up, in place in gate: (g / (1 + e^-g)) * u.
// Launch: any 1-D grid.
extern "C" __global__ void swiglu(float* gate, const float* up, u64 n) {
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
         k += (size_t)gridDim.x * blockDim.x) {
        float g = gate[k];
        gate[k] = (g / (1.0f + loip_exp(0.0f - g))) * up[k];
    }
}

// Writes the keys (or values) of n_tok new tokens of one sequence into its
// cache, laid out [kv_head][cap][head_dim] as the CPU's KvCache:
// cache[h][pos[t]][c] = src[t][h][c].
// Launch: any 1-D grid.
extern "C" __global__ void kv_store(const float* src, const u32* pos, int n_tok,
                                    int n_head_kv, int head_dim, int cap, float* cache) {
    size_t total = (size_t)n_tok * n_head_kv * head_dim;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(k % head_dim);
        int h = (int)((k / head_dim) % n_head_kv);
        size_t t = k / ((size_t)head_dim * n_head_kv);
        cache[((size_t)h * cap + pos[t]) * head_dim + c] = src[k];
    }
}

// Causal attention with grouped-query heads over one sequence's f32 cache
// ([kv_head][cap][head_dim]). q and out are [n_tok][n_head][head_dim]; token
// t attends positions 0..=pos[t]; query head h reads kv head
// h / (n_head / n_head_kv). scores is scratch of n_tok * n_head * cap floats.
//
// Per (token, head), as attend_group on the CPU: score[p] = dot(q, k[p]) *
// scale in the canonical 16-lane order; softmax with e^(s - max) summed in
// 16 lanes (lane p % 16, increasing p) and the tree; then
// out[c] = sum_p fma(prob[p], v[p][c], acc) in increasing p.
// Launch: block (16, 8); grid (n_head, n_tok).
extern "C" __global__ void attention(const float* q, const float* k, const float* v,
                                     const u32* pos, int n_head, int n_head_kv,
                                     int head_dim, int cap, float scale, float* scores,
                                     float* out) {
    int h = blockIdx.x, t = blockIdx.y;
    int lane = threadIdx.x, group = threadIdx.y, groups = blockDim.y;
    int tid = group * 16 + lane, nthreads = groups * 16;
    int kh = h / (n_head / n_head_kv);
    int n = (int)pos[t] + 1;
    const float* qh = q + ((size_t)t * n_head + h) * head_dim;
    const float* kb = k + (size_t)kh * cap * head_dim;
    const float* vb = v + (size_t)kh * cap * head_dim;
    float* sc = scores + ((size_t)t * n_head + h) * cap;
    __shared__ float red[16];
    __shared__ float shared_max, shared_inv;

    // Scores: one 16-lane group per position. The loop bound is the same
    // for every lane of a group, so the shuffles see all 16 lanes.
    for (int p0 = 0; p0 < n; p0 += groups) {
        int p = p0 + group;
        float acc = 0.0f;
        if (p < n) {
            const float* kp = kb + (size_t)p * head_dim;
            for (int c = lane; c < head_dim; c += 16) acc = fmaf(qh[c], kp[c], acc);
        }
        acc = tree_sum16(acc);
        if (p < n && lane == 0) sc[p] = acc * scale;
    }
    __syncthreads();

    // Max: exact in any order.
    if (tid == 0) {
        float m = -__int_as_float(0x7f800000);
        for (int p = 0; p < n; p++) m = fmaxf(m, sc[p]);
        shared_max = m;
    }
    __syncthreads();
    float m = shared_max;
    for (int p = tid; p < n; p += nthreads) sc[p] = loip_exp(sc[p] - m);
    __syncthreads();

    // Sum: lane p % 16 adds in increasing p, then the tree.
    if (tid < 16) {
        float acc = 0.0f;
        for (int p = tid; p < n; p += 16) acc = acc + sc[p];
        red[tid] = acc;
    }
    __syncthreads();
    if (tid == 0) {
        for (int step = 8; step > 0; step /= 2)
            for (int i = 0; i < step; i++) red[i] = red[i] + red[i + step];
        shared_inv = 1.0f / red[0];
    }
    __syncthreads();
    float inv = shared_inv;
    for (int p = tid; p < n; p += nthreads) sc[p] = sc[p] * inv;
    __syncthreads();

    // Mix: one thread per output element, positions in increasing order.
    float* oh = out + ((size_t)t * n_head + h) * head_dim;
    for (int c = tid; c < head_dim; c += nthreads) {
        float acc = 0.0f;
        for (int p = 0; p < n; p++) acc = fmaf(sc[p], vb[(size_t)p * head_dim + c], acc);
        oh[c] = acc;
    }
}
