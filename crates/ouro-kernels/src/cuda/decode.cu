// Mamba-2's single-token step for a batch, fused: conv update + SiLU, dt = softplus(dt + bias) clamped,
// S ← exp(dt·A)·S + dt·x ⊗ B, y = S·C + D·x. Compiled with -DP=head_dim -DN=d_state -DKW=conv width.
// Inputs (f32, contiguous): S (Bt, H, P, N), conv state (Bt, KW−1, CD), xBC (Bt, CD) with CD = H·P + 2·G·N,
// dt (Bt, H), conv weight (CD, KW), conv bias (CD) or null, A (H), dt_bias (H), D at h·DH + p·DP.
// out = [y (Bt, H, P) | conv state (Bt, KW−1, CD) | pad | S (Bt, H, P, N)], S at S_OFF (a multiple of 4).
// Grid (H, Bt), NT threads: a block convolves its head's P channels and its group's 2N channels (a group's
// B/C conv state is written by the group's first head), then warps update S R rows at a time (see below).

#define NT 128
#define R 4                     // rows of S per warp iteration
#define K4 ((N + 127) / 128)    // float4 per lane per row

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

extern "C" __global__ void __launch_bounds__(NT) mamba2_decode(const float* __restrict__ ssm, const float* __restrict__ conv_state,
                                                                const float* __restrict__ xbc, const float* __restrict__ dtr,
                                                                const float* __restrict__ cw, const float* __restrict__ cb,
                                                                const float* __restrict__ A, const float* __restrict__ dt_bias,
                                                                const float* __restrict__ Dp, int DH, int DP, float* __restrict__ out,
                                                                int Bt, int H, int G, float dt_min, float dt_max, long S_OFF) {
    __shared__ float xs[P], bs[N], cs[N];
    const int h = blockIdx.x, b = blockIdx.y, HPG = H / G, g = h / HPG;
    const long CD = (long)H * P + 2L * G * N;
    float* y = out;
    float* conv_out = y + (long)Bt * H * P;
    float* s_out = out + S_OFF;

    for (int j = threadIdx.x; j < P + 2 * N; j += NT) {
        const long c = j < P ? (long)h * P + j : (j < P + N ? (long)H * P + g * N + (j - P) : (long)H * P + (long)G * N + g * N + (j - P - N));
        const float* st = conv_state + (long)b * (KW - 1) * CD + c;
        const float xn = xbc[(long)b * CD + c];
        float v = cb ? cb[c] : 0.f;
#pragma unroll
        for (int s = 0; s < KW - 1; ++s) v = fmaf(cw[c * KW + s], st[s * CD], v);
        v = fmaf(cw[c * KW + KW - 1], xn, v);
        v = silu(v);
        if (j < P) xs[j] = v;
        else if (j < P + N) bs[j - P] = v;
        else cs[j - P - N] = v;
        if (j < P || h % HPG == 0) {
            float* so = conv_out + (long)b * (KW - 1) * CD + c;
#pragma unroll
            for (int s = 0; s < KW - 1; ++s) so[s * CD] = s + 1 < KW - 1 ? st[(s + 1) * CD] : xn;
        }
    }
    float dt = dtr[(long)b * H + h] + dt_bias[h];
    dt = dt > 20.f ? dt : log1pf(expf(dt));
    dt = fminf(fmaxf(dt, dt_min), dt_max);
    const float da = expf(dt * A[h]);
    __syncthreads();

    // Warps take R rows of S at a time, their loads all issued before any use (R·K4 float4 in flight per
    // lane); lane j holds states n = 4j + 128k.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long base = ((long)b * H + h) * P * N;
    for (int p0 = warp * R; p0 < P; p0 += (NT / 32) * R) {
        float4 sv[R][K4];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int k = 0; k < K4; ++k) {
                const int p = p0 + r, n = 4 * lane + 128 * k;
                if (p < P && n < N) sv[r][k] = *reinterpret_cast<const float4*>(ssm + base + (long)p * N + n);
            }
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int p = p0 + r;
            acc[r] = 0.f;
            if (p >= P) continue;
            const float dx = dt * xs[p];
#pragma unroll
            for (int k = 0; k < K4; ++k) {
                const int n = 4 * lane + 128 * k;
                if (n >= N) continue;
                float4 o;
                o.x = fmaf(da, sv[r][k].x, dx * bs[n]);
                o.y = fmaf(da, sv[r][k].y, dx * bs[n + 1]);
                o.z = fmaf(da, sv[r][k].z, dx * bs[n + 2]);
                o.w = fmaf(da, sv[r][k].w, dx * bs[n + 3]);
                *reinterpret_cast<float4*>(s_out + base + (long)p * N + n) = o;
                acc[r] += o.x * cs[n] + o.y * cs[n + 1] + o.z * cs[n + 2] + o.w * cs[n + 3];
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
            const int p = p0 + r;
            if (lane == 0 && p < P) y[((long)b * H + h) * P + p] = acc[r] + Dp[(long)h * DH + (long)p * DP] * xs[p];
        }
    }
}
