// Causal depthwise conv1d in f32, forward and backward, on the layouts of conv.rs's op:
//   xs (Bt, L+KW−1, C): the input after the KW−1 carried (or zero) inputs   wb (C, KB): taps, then the
//   bias as column KW when KB = KW+1   seg (Bt, L) document ids or null.
// y_t[c] = bias[c] + Σ_{s<KW} w[c, s]·xs_{t+s}[c], a tap skipped where its input lies in another document
// than the output (the carried inputs belong to the first document). Compiled with -DKW=width -DKB=KW|KW+1.

// Document id of padded position u of row b (the first KW−1 are the carried inputs).
__device__ __forceinline__ unsigned seg_ext(const unsigned* seg, long row0, int u) {
    return seg[row0 + (u < KW - 1 ? 0 : u - (KW - 1))];
}

// Thread per output element.
extern "C" __global__ void conv_fwd(const float* __restrict__ xs, const float* __restrict__ wb, const unsigned* __restrict__ seg,
                                    float* __restrict__ y, int Bt, int L, int C) {
    const long total = (long)Bt * L * C, lp = L + KW - 1;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int ch = i % C;
        const long r = i / C;
        const int t = r % L, b = r / L;
        float acc = KB > KW ? wb[(long)ch * KB + KW] : 0.f;
        const unsigned st = seg ? seg[r] : 0u;
#pragma unroll
        for (int s = 0; s < KW; ++s) {
            if (seg && seg_ext(seg, (long)b * L, t + s) != st) continue;
            acc = fmaf(wb[(long)ch * KB + s], xs[((long)b * lp + t + s) * C + ch], acc);
        }
        y[i] = acc;
    }
}

// dxs[b, u, c] = Σ_s w[c, s]·dy[b, u−s, c] over outputs t = u−s ∈ [0, L) of the same document.
extern "C" __global__ void conv_bwd_x(const float* __restrict__ wb, const float* __restrict__ dy, const unsigned* __restrict__ seg,
                                      float* __restrict__ dxs, int Bt, int L, int C) {
    const long lp = L + KW - 1, total = (long)Bt * lp * C;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int ch = i % C;
        const long r = i / C;
        const int u = r % lp, b = r / lp;
        const unsigned su = seg ? seg_ext(seg, (long)b * L, u) : 0u;
        float acc = 0.f;
#pragma unroll
        for (int s = 0; s < KW; ++s) {
            const int t = u - s;
            if (t < 0 || t >= L) continue;
            if (seg && seg[(long)b * L + t] != su) continue;
            acc = fmaf(wb[(long)ch * KB + s], dy[((long)b * L + t) * C + ch], acc);
        }
        dxs[i] = acc;
    }
}

// dwb[c, s] += Σ_{b,t} dy[b, t, c]·xs[b, t+s, c] (and the bias column: Σ dy). Blocks of 32 channels × 8
// row lanes; each thread sums a strided set of rows, the block sums its 8 lanes and adds once per channel.
extern "C" __global__ void __launch_bounds__(256) conv_bwd_w(const float* __restrict__ xs, const float* __restrict__ dy,
                                                             const unsigned* __restrict__ seg, float* __restrict__ dwb,
                                                             int Bt, int L, int C) {
    __shared__ float part[8][32][KB];
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const int ch = blockIdx.x * 32 + tx;
    const long lp = L + KW - 1, rows = (long)Bt * L;
    float acc[KB];
#pragma unroll
    for (int j = 0; j < KB; ++j) acc[j] = 0.f;
    if (ch < C)
        for (long r = blockIdx.y * 8L + ty; r < rows; r += gridDim.y * 8L) {
            const int t = r % L, b = r / L;
            const float g = dy[r * C + ch];
            const unsigned st = seg ? seg[r] : 0u;
#pragma unroll
            for (int s = 0; s < KW; ++s) {
                if (seg && seg_ext(seg, (long)b * L, t + s) != st) continue;
                acc[s] = fmaf(g, xs[((long)b * lp + t + s) * C + ch], acc[s]);
            }
            if (KB > KW) acc[KB - 1] += g;
        }
#pragma unroll
    for (int j = 0; j < KB; ++j) part[ty][tx][j] = acc[j];
    __syncthreads();
    if (ty == 0 && ch < C)
        for (int j = 0; j < KB; ++j) {
            float v = 0.f;
            for (int i = 0; i < 8; ++i) v += part[i][tx][j];
            atomicAdd(&dwb[(long)ch * KB + j], v);
        }
}
