// Mamba-2 SSD, chunked, forward and backward (see ssd.rs beside this for the math and the launch).
// Compiled at run time by NVRTC with the sizes fixed: -DT_BF16=0|1 -DP=head_dim -DN=d_state -DQ=chunk.
//
// Inputs, for Bt sequences of L tokens, H heads of P channels, G groups of N states:
//   xbc   (Bt, L, ROW) of T: x of head h at X_OFF + h·P, B of group g at B_OFF + g·N, C at C_OFF + g·N
//   dt    (Bt, L, H) f32: the multiplier of x (Mamba-2: softplus(dt + bias), clamped)
//   la    (Bt, L, H) f32: the log decay per step (Mamba-2: dt·A)
//   s0    (Bt, H, P, N) f32: the incoming state (optional)
// Recurrence: S_t = exp(la_t)·S_{t−1} + dt_t·x_t ⊗ B_t, y_t = S_t·C_t. Computed per chunk of Q tokens:
//   cs_i = Σ_{t ≤ i} la_t (within the chunk), S_in = the state entering the chunk,
//   y_i = exp(cs_i)·S_in C_i + Σ_{j ≤ i} (C_i·B_j)·exp(cs_i − cs_j)·dt_j·x_j
//   S_out = exp(cs_last)·S_in + Σ_j exp(cs_last − cs_j)·dt_j·x_j ⊗ B_j
// Kernels: chunk_state (the chunk's own S contribution) → state_passing (S_in of every chunk, sequential
// over chunks) → chunk_scan (y). Backward: the same two passes, then chunk_dstate (dL/dS_in from y) →
// state_passing_bwd (dL/dS_out per chunk, sequential backwards) → chunk_bwd (everything per chunk).
// All arithmetic is f32; T is the storage type of xbc (f32 or bf16).

#ifndef NT
#define NT 256
#endif
#define SP (P + 1)
#define SN (N + 1)
#define SQ (Q + 1)

#if T_BF16
typedef unsigned short T;
__device__ __forceinline__ float ld(const T* p, long i) { return __uint_as_float(((unsigned)p[i]) << 16); }
#else
typedef float T;
__device__ __forceinline__ float ld(const T* p, long i) { return p[i]; }
#endif

// out(r, c) = Σ_k A(r, k)·B(k, c), r < R, c < CC; A(r, k) = a[r·ar + k·ak], B(k, c) = b[k·bk + c·bc].
// Each thread owns 4×4 outputs; the thread → output map depends only on R and CC, so two calls with the
// same R and CC give each output to the same thread (epilogues may accumulate without a barrier).
template <int R, int CC, int K, class Epi>
__device__ __forceinline__ void mm(const float* a, int ar, int ak, const float* b, int bk, int bc, Epi epi) {
    constexpr int TR = R / 4, TC = CC / 4;
    for (int t = threadIdx.x; t < TR * TC; t += NT) {
        const int r0 = (t / TC) * 4, c0 = (t % TC) * 4;
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
#pragma unroll 4
        for (int k = 0; k < K; ++k) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                av[i] = a[(r0 + i) * ar + k * ak];
                bv[i] = b[k * bk + (c0 + i) * bc];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) epi(r0 + i, c0 + j, acc[i][j]);
    }
}

// cs[i] = Σ_{t ≤ i} la[base + t·H] for i < Q (la = 0 past the nq valid tokens). Ends with a barrier.
__device__ __forceinline__ void chunk_cumsum(const float* la, long base, int H, int nq, float* cs) {
    __shared__ float wsum[NT / 32];
    const int i = threadIdx.x, lane = i & 31, warp = i >> 5;
    float v = (i < Q && i < nq) ? la[base + (long)i * H] : 0.f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    if (lane == 31) wsum[warp] = v;
    __syncthreads();
    if (i < Q) {
        float add = 0.f;
        for (int w = 0; w < warp; ++w) add += wsum[w];
        cs[i] = v + add;
    }
    __syncthreads();
}

extern "C" __global__ void fill_f32(float* p, float v, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) p[i] = v;
}

// Grid (NC, H, Bt). states[b, c, h] = Σ_j exp(cs_last − cs_j)·dt_j·x_j ⊗ B_j; csum[b, h, c] = cs_last.
extern "C" __global__ void __launch_bounds__(NT) ssd_chunk_state(const T* xbc, const float* dt, const float* la, float* states,
                                                                  float* csum, int L, int H, int HPG, int ROW, int X_OFF,
                                                                  int B_OFF, int NC) {
    extern __shared__ float sm[];
    float* cs = sm;          // Q
    float* w = cs + Q;       // Q
    float* xs = w + Q;       // Q × SP, x scaled by w
    float* bs = xs + Q * SP; // Q × SN
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / HPG;
    const int t0 = c * Q, nq = min(Q, L - t0);
    const long r0 = (long)b * L + t0; // first row of the chunk
    chunk_cumsum(la, r0 * H + h, H, nq, cs);
    const float csl = cs[Q - 1];
    for (int i = threadIdx.x; i < Q; i += NT) w[i] = i < nq ? __expf(csl - cs[i]) * dt[(r0 + i) * H + h] : 0.f;
    __syncthreads();
    for (int e = threadIdx.x; e < Q * P; e += NT) {
        const int i = e / P, p = e % P;
        xs[i * SP + p] = i < nq ? w[i] * ld(xbc, (r0 + i) * ROW + X_OFF + h * P + p) : 0.f;
    }
    for (int e = threadIdx.x; e < Q * N; e += NT) {
        const int i = e / N, n = e % N;
        bs[i * SN + n] = i < nq ? ld(xbc, (r0 + i) * ROW + B_OFF + g * N + n) : 0.f;
    }
    __syncthreads();
    float* out = states + (((long)b * NC + c) * H + h) * (P * N);
    mm<P, N, Q>(xs, 1, SP, bs, SN, 1, [&](int p, int n, float v) { out[p * N + n] = v; });
    if (threadIdx.x == 0) csum[((long)b * H + h) * NC + c] = csl;
}

// Grid (⌈P·N/NT⌉, H, Bt). In place: states[b, c, h] becomes the state entering chunk c; sf the final state.
extern "C" __global__ void __launch_bounds__(NT) ssd_state_passing(float* states, const float* csum, const float* s0, float* sf,
                                                                    int H, int NC) {
    const int e = blockIdx.x * NT + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (e >= P * N) return;
    const long bh = (long)b * H + h;
    float run = s0 ? s0[bh * (P * N) + e] : 0.f;
    for (int c = 0; c < NC; ++c) {
        const long idx = (((long)b * NC + c) * H + h) * (P * N) + e;
        const float mine = states[idx];
        states[idx] = run;
        run = __expf(csum[bh * NC + c]) * run + mine;
    }
    if (sf) sf[bh * (P * N) + e] = run;
}

// Grid (NC, H, Bt). y (Bt, L, H, P) f32.
extern "C" __global__ void __launch_bounds__(NT) ssd_chunk_scan(const T* xbc, const float* dt, const float* la, const float* states,
                                                                 float* y, int L, int H, int HPG, int ROW, int X_OFF, int B_OFF,
                                                                 int C_OFF, int NC) {
    extern __shared__ float sm[];
    float* cs = sm;           // Q
    float* dts = cs + Q;      // Q
    float* cm = dts + Q;      // Q × SN
    float* bm = cm + Q * SN;  // Q × SN
    float* xs = bm + Q * SN;  // Q × SP
    float* ss = xs + Q * SP;  // P × SN: the state entering the chunk
    float* mq = ss + P * SN;  // Q × SQ: (C_i·B_j)·exp(cs_i − cs_j)·dt_j, j ≤ i
    float* ys = mq + Q * SQ;  // Q × SP: exp(cs_i)·S_in C_i
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / HPG;
    const int t0 = c * Q, nq = min(Q, L - t0);
    const long r0 = (long)b * L + t0;
    chunk_cumsum(la, r0 * H + h, H, nq, cs);
    for (int i = threadIdx.x; i < Q; i += NT) dts[i] = i < nq ? dt[(r0 + i) * H + h] : 0.f;
    for (int e = threadIdx.x; e < Q * N; e += NT) {
        const int i = e / N, n = e % N;
        const long row = (r0 + i) * ROW;
        cm[i * SN + n] = i < nq ? ld(xbc, row + C_OFF + g * N + n) : 0.f;
        bm[i * SN + n] = i < nq ? ld(xbc, row + B_OFF + g * N + n) : 0.f;
    }
    for (int e = threadIdx.x; e < Q * P; e += NT) {
        const int i = e / P, p = e % P;
        xs[i * SP + p] = i < nq ? ld(xbc, (r0 + i) * ROW + X_OFF + h * P + p) : 0.f;
    }
    const float* sin = states + (((long)b * NC + c) * H + h) * (P * N);
    for (int e = threadIdx.x; e < P * N; e += NT) ss[(e / N) * SN + e % N] = sin[e];
    __syncthreads();
    mm<Q, Q, N>(cm, SN, 1, bm, 1, SN, [&](int i, int j, float v) { mq[i * SQ + j] = j <= i ? v * __expf(cs[i] - cs[j]) * dts[j] : 0.f; });
    mm<Q, P, N>(cm, SN, 1, ss, 1, SN, [&](int i, int p, float v) { ys[i * SP + p] = v * __expf(cs[i]); });
    __syncthreads();
    mm<Q, P, Q>(mq, SQ, 1, xs, SP, 1, [&](int i, int p, float v) {
        if (i < nq) y[((r0 + i) * H + h) * P + p] = ys[i * SP + p] + v;
    });
}

// Grid (NC, H, Bt). dstates[b, c, h] = dL/dS_in of chunk c through its outputs: Σ_i exp(cs_i)·dy_i ⊗ C_i.
extern "C" __global__ void __launch_bounds__(NT) ssd_chunk_dstate(const T* xbc, const float* la, const float* dy, float* dstates,
                                                                   int L, int H, int HPG, int ROW, int C_OFF, int NC) {
    extern __shared__ float sm[];
    float* cs = sm;           // Q
    float* ds = cs + Q;       // Q × SP: dy scaled by exp(cs)
    float* cm = ds + Q * SP;  // Q × SN
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / HPG;
    const int t0 = c * Q, nq = min(Q, L - t0);
    const long r0 = (long)b * L + t0;
    chunk_cumsum(la, r0 * H + h, H, nq, cs);
    for (int e = threadIdx.x; e < Q * P; e += NT) {
        const int i = e / P, p = e % P;
        ds[i * SP + p] = i < nq ? __expf(cs[i]) * dy[((r0 + i) * H + h) * P + p] : 0.f;
    }
    for (int e = threadIdx.x; e < Q * N; e += NT) {
        const int i = e / N, n = e % N;
        cm[i * SN + n] = i < nq ? ld(xbc, (r0 + i) * ROW + C_OFF + g * N + n) : 0.f;
    }
    __syncthreads();
    float* out = dstates + (((long)b * NC + c) * H + h) * (P * N);
    mm<P, N, Q>(ds, 1, SP, cm, SN, 1, [&](int p, int n, float v) { out[p * N + n] = v; });
}

// Grid (⌈P·N/NT⌉, H, Bt). In place: dstates[b, c, h] (dL/dS_in of chunk c from its own outputs) becomes
// dL/dS_out of chunk c (= dL/dS_in of chunk c + 1); dcsum[b, h, c] += dL/dcs_last of chunk c through
// the decay of S_in; ds0 = dL/dS_in of chunk 0. dsf: dL/d(final state), or null.
extern "C" __global__ void __launch_bounds__(NT) ssd_state_passing_bwd(float* dstates, const float* states, const float* csum,
                                                                        const float* dsf, float* dcsum, float* ds0, int H, int NC) {
    const int e = blockIdx.x * NT + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
    const bool live = e < P * N;
    const long bh = (long)b * H + h;
    float gr = (live && dsf) ? dsf[bh * (P * N) + e] : 0.f;
    for (int c = NC - 1; c >= 0; --c) {
        const long idx = (((long)b * NC + c) * H + h) * (P * N) + e;
        const float decay = __expf(csum[bh * NC + c]);
        float part = 0.f;
        if (live) {
            const float mine = dstates[idx];
            dstates[idx] = gr;
            part = gr * states[idx] * decay;
            gr = decay * gr + mine;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        if ((threadIdx.x & 31) == 0 && part != 0.f) atomicAdd(&dcsum[bh * NC + c], part);
    }
    if (live && ds0) ds0[bh * (P * N) + e] = gr;
}

// Grid (NC, H, Bt). Everything inside chunk c of head h: dx, dB, dC (into dxbc, f32, zeroed; B and C
// summed over the heads of a group by atomics), ddt and dla (Bt, L, H).
extern "C" __global__ void __launch_bounds__(NT) ssd_chunk_bwd(const T* xbc, const float* dt, const float* la, const float* states,
                                                                const float* dstates, const float* dcsum, const float* dy,
                                                                float* dxbc, float* ddt, float* dla, int L, int H, int HPG,
                                                                int ROW, int X_OFF, int B_OFF, int C_OFF, int NC) {
    extern __shared__ float sm[];
    float* cs = sm;            // Q
    float* dts = cs + Q;       // Q
    float* wl = dts + Q;       // Q: exp(cs_last − cs_j)
    float* dcs = wl + Q;       // Q: dL/dcs
    float* ddts = dcs + Q;     // Q: dL/ddt (diagonal part)
    float* us = ddts + Q;      // Q: exp(cs_last − cs_j)·x_j·(dSL B_j)
    float* xs = us + Q;        // Q × SP
    float* dys = xs + Q * SP;  // Q × SP
    float* cm = dys + Q * SP;  // Q × SN
    float* bm = cm + Q * SN;   // Q × SN
    float* ss = bm + Q * SN;   // P × SN: S_in
    float* dsl = ss + P * SN;  // P × SN: dL/dS_out
    float* mq = dsl + P * SN;  // Q × SQ
    float* wq = mq + Q * SQ;   // Q × SQ
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / HPG;
    const int t0 = c * Q, nq = min(Q, L - t0);
    const long r0 = (long)b * L + t0;
    chunk_cumsum(la, r0 * H + h, H, nq, cs);
    const float csl = cs[Q - 1];
    for (int i = threadIdx.x; i < Q; i += NT) {
        dts[i] = i < nq ? dt[(r0 + i) * H + h] : 0.f;
        wl[i] = i < nq ? __expf(csl - cs[i]) : 0.f;
        dcs[i] = 0.f;
        ddts[i] = 0.f;
        us[i] = 0.f;
    }
    for (int e = threadIdx.x; e < Q * P; e += NT) {
        const int i = e / P, p = e % P;
        xs[i * SP + p] = i < nq ? ld(xbc, (r0 + i) * ROW + X_OFF + h * P + p) : 0.f;
        dys[i * SP + p] = i < nq ? dy[((r0 + i) * H + h) * P + p] : 0.f;
    }
    for (int e = threadIdx.x; e < Q * N; e += NT) {
        const int i = e / N, n = e % N;
        const long row = (r0 + i) * ROW;
        cm[i * SN + n] = i < nq ? ld(xbc, row + C_OFF + g * N + n) : 0.f;
        bm[i * SN + n] = i < nq ? ld(xbc, row + B_OFF + g * N + n) : 0.f;
    }
    const long so = (((long)b * NC + c) * H + h) * (P * N);
    for (int e = threadIdx.x; e < P * N; e += NT) {
        ss[(e / N) * SN + e % N] = states[so + e];
        dsl[(e / N) * SN + e % N] = dstates[so + e];
    }
    __syncthreads();
    // CB and dy·x over the causal triangle.
    mm<Q, Q, N>(cm, SN, 1, bm, 1, SN, [&](int i, int j, float v) { mq[i * SQ + j] = (j <= i && i < nq) ? v : 0.f; });
    mm<Q, Q, P>(dys, SP, 1, xs, 1, SP, [&](int i, int j, float v) { wq[i * SQ + j] = (j <= i && i < nq) ? v : 0.f; });
    __syncthreads();
    for (int e = threadIdx.x; e < Q * Q; e += NT) {
        const int i = e / Q, j = e % Q;
        if (j <= i && i < nq) {
            const float ex = __expf(cs[i] - cs[j]), cb = mq[i * SQ + j], dyx = wq[i * SQ + j];
            const float v = cb * ex * dts[j] * dyx;
            atomicAdd(&dcs[i], v);
            atomicAdd(&dcs[j], -v);
            atomicAdd(&ddts[j], cb * ex * dyx);
            mq[i * SQ + j] = cb * ex * dts[j]; // M
            wq[i * SQ + j] = ex * dts[j] * dyx; // W
        }
    }
    __syncthreads();
    float* dxr = dxbc;
    // dx_j = Σ_i M_ij dy_i + exp(cs_last − cs_j)·dt_j·dSL B_j
    mm<Q, P, Q>(mq, 1, SQ, dys, SP, 1, [&](int j, int p, float v) {
        if (j < nq) dxr[(r0 + j) * ROW + X_OFF + h * P + p] = v;
    });
    mm<Q, P, N>(bm, SN, 1, dsl, 1, SN, [&](int j, int p, float v) {
        if (j < nq) dxr[(r0 + j) * ROW + X_OFF + h * P + p] += wl[j] * dts[j] * v;
    });
    // dC_i = Σ_j W_ij B_j + exp(cs_i)·dy_i S_in; the second term also gives dcs_i.
    mm<Q, N, Q>(wq, SQ, 1, bm, SN, 1, [&](int i, int n, float v) {
        if (i < nq) atomicAdd(&dxr[(r0 + i) * ROW + C_OFF + g * N + n], v);
    });
    mm<Q, N, P>(dys, SP, 1, ss, SN, 1, [&](int i, int n, float v) {
        if (i < nq) {
            const float val = __expf(cs[i]) * v;
            atomicAdd(&dxr[(r0 + i) * ROW + C_OFF + g * N + n], val);
            atomicAdd(&dcs[i], val * cm[i * SN + n]);
        }
    });
    // dB_j = Σ_i W_ij C_i + exp(cs_last − cs_j)·dt_j·dSL^T x_j; the second term also gives us_j.
    mm<Q, N, Q>(wq, 1, SQ, cm, SN, 1, [&](int j, int n, float v) {
        if (j < nq) atomicAdd(&dxr[(r0 + j) * ROW + B_OFF + g * N + n], v);
    });
    mm<Q, N, P>(xs, SP, 1, dsl, SN, 1, [&](int j, int n, float v) {
        if (j < nq) {
            const float val = wl[j] * v;
            atomicAdd(&dxr[(r0 + j) * ROW + B_OFF + g * N + n], dts[j] * val);
            atomicAdd(&us[j], val * bm[j * SN + n]);
        }
    });
    __syncthreads();
    // Per token: ddt, then dcs → dla by a reverse cumulative sum over the chunk.
    if (threadIdx.x == 0) {
        float tot = 0.f;
        for (int j = 0; j < nq; ++j) tot += dts[j] * us[j];
        dcs[nq - 1] += tot + dcsum[((long)b * H + h) * NC + c];
        float run = 0.f;
        for (int j = nq - 1; j >= 0; --j) {
            run += dcs[j] - dts[j] * us[j];
            dla[(r0 + j) * H + h] = run;
            ddt[(r0 + j) * H + h] = ddts[j] + us[j];
        }
    }
}
