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
// state_passing_bwd (dL/dS_out per chunk, sequential backwards) → chunk_bwd (everything per chunk). In the
// y-only op, where the batch × heads fill the GPU, ssd_state_pass_mma does chunk_state + state_passing in one
// walk over the chunks and ssd_dstate_pass_mma chunk_dstate + state_passing_bwd in one walk back (state_walk);
// its forward is ssd_chunk_cb_mma (C·Bᵀ per chunk and group) then ssd_scan_walk_mma, the whole forward in one walk
// over the chunks (scan_walk: no passed states in memory).
// All arithmetic is f32; T is the storage type of xbc (f32 or bf16). With -DIO_T=1 (the y-only training op, bf16
// tensor-core kernels only) y is written, dy read and dx, dB, dC written in T as well; else they are f32.
// The tensor-core chunk_state, chunk_scan and chunk_dstate take HB heads of one group per block (B / C
// shared, the next head's tiles in flight by cp.async); the passed states they read are bf16.
// ssd_prep_dt / ssd_prep_dt_bwd: Mamba-2's dt preparation (bias, softplus, clamp, ·A) and its backward, for
// the op that takes the raw dt.

#ifndef NT
#define NT 256
#endif
#define SP (P + 1)
#define SN (N + 1)
#define SQ (Q + 1)

#ifndef IO_T
#define IO_T 0
#endif

// The chunks' own states and their gradients (written by chunk_state / chunk_dstate, read by the state
// passing): bf16 in the y-only op (IO_T: its y and gradients are bf16 too), else f32.
#if IO_T
typedef unsigned short CT;
#else
typedef float CT;
#endif

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

// cs[k·R + i] = Σ_{t ≤ i} la[base + t·H + k] for the rows i < R ≤ 64 of a chunk and its HB ≤ 8 heads k (la = 0
// past the nq valid tokens): warps 0 and 1 hold the rows, each thread's HB loads issued together, then a warp
// scan per head. Ends with a barrier.
template <int R>
__device__ __forceinline__ void chunk_cumsum(const float* la, long base, int H, int nq, float* cs, int HB = 1) {
    static_assert(R <= 64, "two warps of rows");
    __shared__ float wsum[8]; // warp 0's total per head
    const int i = threadIdx.x, lane = i & 31, warp = i >> 5;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (i < R && k < HB && i < nq) ? la[base + (long)i * H + k] : 0.f;
    if (i < R) {
#pragma unroll
        for (int o = 1; o < 32; o <<= 1)
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (k < HB) {
                    const float u = __shfl_up_sync(0xffffffffu, v[k], o);
                    if (lane >= o) v[k] += u;
                }
        if (warp == 0 && lane == 31)
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (k < HB) wsum[k] = v[k];
    }
    __syncthreads();
    if (i < R)
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (k < HB) cs[k * R + i] = v[k] + (warp == 1 ? wsum[k] : 0.f);
    __syncthreads();
}

// v[k] = p[base + i·H + k] for this thread's row i = threadIdx.x < R of a chunk and its HB ≤ 8 heads k (0 past
// the nq valid rows, the heads past HB, and for threads ≥ R): a row's HB values by one thread, issued together
// (before chunk_cumsum, whose own loads then fly beside them).
template <int R>
__device__ __forceinline__ void rows_of_heads(const float* p, long base, int H, int nq, int HB, float* v) {
    const int i = threadIdx.x;
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (i < R && i < nq && k < HB) ? p[base + (long)i * H + k] : 0.f;
}

// The last step of a chunk backward, by one warp (nq ≤ 64 rows, two per lane): dla_j = Σ_{k ≥ j} (dcs_k −
// dt_k·us_k), with Σ_k dt_k·us_k + dlast (dL/dcs_last through the decay of S_in) added at the last row, as a
// suffix sum over the lanes; ddt_j = ddts_j + us_j. Row j of dla and ddt at base + j·H.
__device__ __forceinline__ void chunk_dla_ddt(int nq, const float* dts, const float* us, const float* dcs, const float* ddts, float dlast,
                                              float* dla, float* ddt, long base, int H) {
    const int lane = threadIdx.x & 31, j0 = 2 * lane, j1 = j0 + 1;
    const float u0 = j0 < nq ? dts[j0] * us[j0] : 0.f, u1 = j1 < nq ? dts[j1] * us[j1] : 0.f;
    float tot = u0 + u1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, o);
    const float last = tot + dlast;
    const float v0 = j0 < nq ? dcs[j0] - u0 + (j0 == nq - 1 ? last : 0.f) : 0.f;
    const float v1 = j1 < nq ? dcs[j1] - u1 + (j1 == nq - 1 ? last : 0.f) : 0.f;
    float run = v0 + v1; // becomes Σ over the rows of lanes ≥ this one
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float t = __shfl_down_sync(0xffffffffu, run, o);
        if (lane + o < 32) run += t;
    }
    if (j0 < nq) {
        dla[base + (long)j0 * H] = run;
        ddt[base + (long)j0 * H] = ddts[j0] + us[j0];
    }
    if (j1 < nq) {
        dla[base + (long)j1 * H] = run - v0;
        ddt[base + (long)j1 * H] = ddts[j1] + us[j1];
    }
}
static_assert(Q <= 64, "chunk_dla_ddt takes at most 64 rows");

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
    chunk_cumsum<Q>(la, r0 * H + h, H, nq, cs);
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

// Grid (⌈P·N/(4·NT)⌉, H, Bt), 4 elements per thread. In place: states[b, c, h] becomes the state
// entering chunk c; sf the final state. Loads (the states and their decays) run AHEAD chunks ahead of
// the sequential walk over chunks.
// The _bf16 variants write the passed states (and read them back in the backward) in bf16 — the tensor-core
// kernels round them to bf16 anyway — halving those bytes; `out` is then a separate buffer.
#define AHEAD 8

// Four consecutive f32 or bf16 values as loaded (float4 / uint2: what a walk holds in registers ahead of
// their use, bf16 in half the registers) and as a float4; and back (bf16 rounded to nearest even).
template <typename X> struct Raw4;
template <> struct Raw4<float> {
    using type = float4;
    __device__ static type load(const float* p) { return *reinterpret_cast<const float4*>(p); }
    __device__ static float4 f(type v) { return v; }
};
template <> struct Raw4<unsigned short> {
    using type = uint2;
    __device__ static type load(const unsigned short* p) { return *reinterpret_cast<const uint2*>(p); }
    __device__ static float4 f(type u) {
        return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
    }
};
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ unsigned bf_bits(float f) {
    const unsigned u = __float_as_uint(f);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ void st4(unsigned short* p, float4 v) {
    *reinterpret_cast<uint2*>(p) = make_uint2(bf_bits(v.x) | (bf_bits(v.y) << 16), bf_bits(v.z) | (bf_bits(v.w) << 16));
}

// states (f32 or bf16, the chunks' own contributions) → out[b, c, h] = the state entering chunk c (OT: f32, which
// may be states itself, or bf16).
template <typename IT, typename OT>
__device__ __forceinline__ void state_passing(const IT* states, OT* out, const float* csum, const float* s0, float* sf, int H, int NC) {
    const int e = 4 * (blockIdx.x * NT + threadIdx.x), h = blockIdx.y, b = blockIdx.z;
    if (e >= P * N) return;
    const long bh = (long)b * H + h;
    // s0 and sf may sit at any 4-byte offset (inside packed buffers): scalar accesses.
    const float* s0e = s0 ? s0 + bh * (P * N) + e : nullptr;
    float4 run = s0e ? make_float4(s0e[0], s0e[1], s0e[2], s0e[3]) : make_float4(0.f, 0.f, 0.f, 0.f);
    const long off = ((long)b * NC * H + h) * (P * N) + e;
    const long cstride = (long)H * (P * N); // elements between chunks
    for (int c0 = 0; c0 < NC; c0 += AHEAD) {
        typename Raw4<IT>::type mine[AHEAD];
        float dk[AHEAD];
#pragma unroll
        for (int k = 0; k < AHEAD; ++k)
            if (c0 + k < NC) {
                mine[k] = Raw4<IT>::load(states + off + (c0 + k) * cstride);
                dk[k] = csum[bh * NC + c0 + k];
            }
#pragma unroll
        for (int k = 0; k < AHEAD; ++k)
            if (c0 + k < NC) {
                const float d = __expf(dk[k]);
                const float4 m = Raw4<IT>::f(mine[k]);
                st4(out + off + (c0 + k) * cstride, run);
                run = make_float4(d * run.x + m.x, d * run.y + m.y, d * run.z + m.z, d * run.w + m.w);
            }
    }
    if (sf) {
        float* o = sf + bh * (P * N) + e;
        o[0] = run.x, o[1] = run.y, o[2] = run.z, o[3] = run.w;
    }
}

extern "C" __global__ void __launch_bounds__(NT) ssd_state_passing(float* states, const float* csum, const float* s0, float* sf, int H, int NC) {
    state_passing(states, states, csum, s0, sf, H, NC);
}

extern "C" __global__ void __launch_bounds__(NT) ssd_state_passing_bf16(const CT* states, unsigned short* out, const float* csum, const float* s0,
                                                                         float* sf, int H, int NC) {
    state_passing(states, out, csum, s0, sf, H, NC);
}

// Grid (NC, H, Bt). y (Bt, L, H, P) f32.
extern "C" __global__ void __launch_bounds__(NT) ssd_chunk_scan(const T* xbc, const float* dt, const float* la, const float* states,
                                                                 float* y, int L, int H, int HPG, int ROW, int X_OFF, int B_OFF,
                                                                 int C_OFF, int NC, const float* D) {
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
    chunk_cumsum<Q>(la, r0 * H + h, H, nq, cs);
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
        if (i < nq) y[((r0 + i) * H + h) * P + p] = ys[i * SP + p] + v + D[h * P + p] * xs[i * SP + p];
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
    chunk_cumsum<Q>(la, r0 * H + h, H, nq, cs);
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

// Grid (⌈P·N/(4·NT)⌉, H, Bt), 4 elements per thread. In place: dstates[b, c, h] (dL/dS_in of chunk c
// from its own outputs) becomes dL/dS_out of chunk c (= dL/dS_in of chunk c + 1); dcsum[b, h, c] +=
// dL/dcs_last of chunk c through the decay of S_in; ds0 = dL/dS_in of chunk 0. dsf: dL/d(final state),
// or null. Loads run AHEAD chunks ahead.
// ST: the passed states' type (f32 or bf16); the result goes to dout (OT: f32, which may be dstates
// itself, or bf16).
template <typename DT, typename ST, typename OT>
__device__ __forceinline__ void state_passing_bwd(const DT* dstates, OT* dout, const ST* states, const float* csum, const float* dsf, float* dcsum, float* ds0, int H, int NC) {
    const int e = 4 * (blockIdx.x * NT + threadIdx.x), h = blockIdx.y, b = blockIdx.z;
    const bool live = e < P * N;
    const long bh = (long)b * H + h;
    const float4 z4 = make_float4(0.f, 0.f, 0.f, 0.f);
    const float* dse = (live && dsf) ? dsf + bh * (P * N) + e : nullptr;
    float4 gr = dse ? make_float4(dse[0], dse[1], dse[2], dse[3]) : z4;
    const long off = ((long)b * NC * H + h) * (P * N) + (live ? e : 0);
    const long cstride = (long)H * (P * N) / 4; // float4s between chunks
    for (int c0 = NC - 1; c0 >= 0; c0 -= AHEAD) {
        typename Raw4<DT>::type mine[AHEAD];
        typename Raw4<ST>::type sin[AHEAD];
        float dk[AHEAD];
#pragma unroll
        for (int k = 0; k < AHEAD; ++k) {
            mine[k] = {};
            sin[k] = {};
            dk[k] = 0.f;
            if (c0 - k >= 0) dk[k] = csum[bh * NC + c0 - k];
            if (live && c0 - k >= 0) {
                mine[k] = Raw4<DT>::load(dstates + off + (c0 - k) * cstride * 4);
                sin[k] = Raw4<ST>::load(states + off + (c0 - k) * cstride * 4);
            }
        }
#pragma unroll
        for (int k = 0; k < AHEAD; ++k) {
            const int c = c0 - k;
            if (c < 0) break;
            const float d = __expf(dk[k]);
            if (live) st4(dout + off + c * cstride * 4, gr);
            const float4 si = Raw4<ST>::f(sin[k]), m = Raw4<DT>::f(mine[k]);
            float part = d * (gr.x * si.x + gr.y * si.y + gr.z * si.z + gr.w * si.w);
            gr = make_float4(d * gr.x + m.x, d * gr.y + m.y, d * gr.z + m.z, d * gr.w + m.w);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
            if ((threadIdx.x & 31) == 0 && part != 0.f) atomicAdd(&dcsum[bh * NC + c], part);
        }
    }
    if (live && ds0) {
        float* o = ds0 + bh * (P * N) + e;
        o[0] = gr.x, o[1] = gr.y, o[2] = gr.z, o[3] = gr.w;
    }
}

extern "C" __global__ void __launch_bounds__(NT) ssd_state_passing_bwd(float* dstates, const float* states, const float* csum,
                                                                        const float* dsf, float* dcsum, float* ds0, int H, int NC) {
    state_passing_bwd(dstates, dstates, states, csum, dsf, dcsum, ds0, H, NC);
}

extern "C" __global__ void __launch_bounds__(NT) ssd_state_passing_bwd_bf16(const CT* dstates, unsigned short* dout, const unsigned short* states,
                                                                             const float* csum, const float* dsf, float* dcsum, float* ds0, int H, int NC) {
    state_passing_bwd(dstates, dout, states, csum, dsf, dcsum, ds0, H, NC);
}

// Grid (NC, H, Bt). Everything inside chunk c of head h: dx, dB, dC (into dxbc, f32, zeroed; B and C
// summed over the heads of a group by atomics), ddt and dla (Bt, L, H).
extern "C" __global__ void __launch_bounds__(NT) ssd_chunk_bwd(const T* xbc, const float* dt, const float* la, const float* states,
                                                                const float* dstates, const float* dcsum, const float* dy,
                                                                float* dxbc, float* ddt, float* dla, int L, int H, int HPG,
                                                                int ROW, int X_OFF, int B_OFF, int C_OFF, int NC, const float* D,
                                                                float* dD) {
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
    chunk_cumsum<Q>(la, r0 * H + h, H, nq, cs);
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
        if (j < nq) dxr[(r0 + j) * ROW + X_OFF + h * P + p] += wl[j] * dts[j] * v + D[h * P + p] * dys[j * SP + p];
    });
    // The skip y += D·x: dD = Σ_j x_j·dy_j over the chunk.
    for (int p = threadIdx.x; p < P; p += NT) {
        float acc = 0.f;
        for (int j = 0; j < nq; ++j) acc += xs[j * SP + p] * dys[j * SP + p];
        atomicAdd(&dD[h * P + p], acc);
    }
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
    if (threadIdx.x < 32) chunk_dla_ddt(nq, dts, us, dcs, ddts, dcsum[((long)b * H + h) * NC + c], dla, ddt, r0 * H + h, H);
}

// softplus(x) with torch's threshold (x > 20 → x) when `on`, else x.
__device__ __forceinline__ float maybe_softplus(float x, int on) { return on && x <= 20.f ? log1pf(__expf(x)) : x; }

// Over (rows, H) f32: dtp = clamp(softplus(dt + bias_h), lo, hi) (softplus when `softplus`), la = dtp·A_h.
// start (b·l, or null): added to la at every head of a position (document boundaries, ssd.rs's
// doc_start_decay); a constant, so the backward does not see it.
extern "C" __global__ void ssd_prep_dt(const float* dt, const float* A, const float* bias, const float* start, float* dtp, float* la, long total,
                                       int H, int softplus, float lo, float hi) {
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        const int h = e % H;
        const float x = dt[e] + bias[h];
        const float v = fminf(fmaxf(maybe_softplus(x, softplus), lo), hi);
        dtp[e] = v;
        la[e] = start ? fmaf(v, A[h], start[e / H]) : v * A[h];
    }
}

// The backward of ssd_prep_dt, from ddtp and dla: g = ddtp + dla·A_h, ddt = g·σ(dt + bias_h) (softplus;
// 0 where the clamp holds); dA_h += Σ dla·dtp and dbias_h += Σ ddt over the rows (dA, dbias zeroed;
// per-block sums in shared memory, 2H floats, then one atomic per head and block).
extern "C" __global__ void ssd_prep_dt_bwd(const float* dt, const float* A, const float* bias, const float* ddtp, const float* dla,
                                           float* ddt, float* dA, float* dbias, long total, int H, int softplus, float lo, float hi) {
    extern __shared__ float acc[]; // dA (H), then dbias (H)
    for (int i = threadIdx.x; i < 2 * H; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        const int h = e % H;
        const float x = dt[e] + bias[h];
        const float sp = maybe_softplus(x, softplus);
        const float v = fminf(fmaxf(sp, lo), hi);
        float g = 0.f;
        if (sp >= lo && sp <= hi) g = (ddtp[e] + dla[e] * A[h]) * (softplus ? 1.f / (1.f + __expf(-x)) : 1.f);
        ddt[e] = g;
        atomicAdd(&acc[h], dla[e] * v);
        atomicAdd(&acc[H + h], g);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        atomicAdd(&dA[i], acc[i]);
        atomicAdd(&dbias[i], acc[H + i]);
    }
}

// ---------------------------------------------------------------------------------------------------
// bf16 tensor-core kernels (mma.sync m16n8k16, f32 accumulation; sm_80 and newer): Q = 64, P and N
// multiples of 16, 128 threads (4 warps). Shared tiles are bf16 with rows padded by 8 elements (conflict-free fragment loads).
// ---------------------------------------------------------------------------------------------------
#if T_BF16 && P % 16 == 0 && N % 16 == 0 && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define MQ 64
#define PADK 8
typedef unsigned short bf;

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats as a bf16 pair (lo in the low half), rounded to nearest even.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ bf to_bf(float f) { return (bf)(pack2(f, 0.f) & 0xffffu); }

__device__ __forceinline__ unsigned ld2(const bf* s) { return *reinterpret_cast<const unsigned*>(s); }

// The type of y, dy and dx: bf16 in the y-only op (IO_T), else f32. Two adjacent elements at i (even).
#if IO_T
typedef bf YT;
#else
typedef float YT;
#endif
__device__ __forceinline__ void st2(float* p, long i, float a, float b) { *reinterpret_cast<float2*>(p + i) = make_float2(a, b); }
__device__ __forceinline__ void st2(bf* p, long i, float a, float b) { *reinterpret_cast<unsigned*>(p + i) = pack2(a, b); }
__device__ __forceinline__ float2 ld2f(const float* p, long i) { return *reinterpret_cast<const float2*>(p + i); }
__device__ __forceinline__ float2 ld2f(const bf* p, long i) {
    const unsigned u = *reinterpret_cast<const unsigned*>(p + i);
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
// The passed states' type read by the tensor-core kernels: bf16 (ssd_state_passing_bf16; the products round
// them to bf16 anyway).
typedef bf ST;
__device__ __forceinline__ void st1(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ float ld1(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld1(const bf* p, long i) { return __uint_as_float((unsigned)p[i] << 16); }
__device__ __forceinline__ void st1(bf* p, long i, float v) { p[i] = to_bf(v); }

// Accumulator rows stored whole: four n8 tiles of an m16n8 accumulator strip (columns c0..c0+31; thread
// (gq, tq) holds columns 8t + 2tq, +1 of tile t in rows gq and gq + 8) written 16 bytes per thread (bf16) or
// 2 × 16 (f32) instead of 4 (8): the quad trades its pairs (a transpose by four xor shuffles per row) so that thread tq holds
// columns 8tq..8tq+7 of both rows. Each store instruction then covers whole 32-byte sectors (two per row),
// where the pairs covered half of one. pa / pb: row gq's / row gq+8's element c0; a row is skipped when its
// flag is false (past the chunk's end; all 32 lanes still shuffle).
__device__ __forceinline__ void quad_trade(unsigned* v) { // v[t] (column pair 2tq of tile t) → v[s] (pair s of tile tq)
    // A 4 × 4 transpose over the quad (lane tq, index t) in two butterfly steps: the first swaps bit 0 of
    // the lane with bit 0 of the index (v[1], v[3] of even lanes ↔ v[0], v[2] of odd ones), the second bit 1.
    const bool o1 = threadIdx.x & 1, o2 = threadIdx.x & 2;
    unsigned x = o1 ? v[0] : v[1], y = o1 ? v[2] : v[3];
    x = __shfl_xor_sync(0xffffffffu, x, 1);
    y = __shfl_xor_sync(0xffffffffu, y, 1);
    if (o1) v[0] = x, v[2] = y;
    else v[1] = x, v[3] = y;
    x = o2 ? v[0] : v[2], y = o2 ? v[1] : v[3];
    x = __shfl_xor_sync(0xffffffffu, x, 2);
    y = __shfl_xor_sync(0xffffffffu, y, 2);
    if (o2) v[0] = x, v[1] = y;
    else v[2] = x, v[3] = y;
}
__device__ __forceinline__ void st_rows4(bf* pa, bf* pb, bool va, bool vb, const float (*acc)[4]) {
    unsigned a[4], b[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        a[t] = pack2(acc[t][0], acc[t][1]);
        b[t] = pack2(acc[t][2], acc[t][3]);
    }
    quad_trade(a);
    quad_trade(b);
    const int c = 8 * (threadIdx.x & 3);
    if (va) *reinterpret_cast<uint4*>(pa + c) = make_uint4(a[0], a[1], a[2], a[3]);
    if (vb) *reinterpret_cast<uint4*>(pb + c) = make_uint4(b[0], b[1], b[2], b[3]);
}
__device__ __forceinline__ void st_rows4(float* pa, float* pb, bool va, bool vb, const float (*acc)[4]) {
    unsigned a0[4], a1[4], b0[4], b1[4]; // the pairs' first and second elements as bits
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        a0[t] = __float_as_uint(acc[t][0]);
        a1[t] = __float_as_uint(acc[t][1]);
        b0[t] = __float_as_uint(acc[t][2]);
        b1[t] = __float_as_uint(acc[t][3]);
    }
    quad_trade(a0);
    quad_trade(a1);
    quad_trade(b0);
    quad_trade(b1);
    const int c = 8 * (threadIdx.x & 3);
    if (va) {
        *reinterpret_cast<uint4*>(pa + c) = make_uint4(a0[0], a1[0], a0[1], a1[1]);
        *reinterpret_cast<uint4*>(pa + c + 4) = make_uint4(a0[2], a1[2], a0[3], a1[3]);
    }
    if (vb) {
        *reinterpret_cast<uint4*>(pb + c) = make_uint4(b0[0], b1[0], b0[1], b1[1]);
        *reinterpret_cast<uint4*>(pb + c + 4) = make_uint4(b0[2], b1[2], b0[3], b1[3]);
    }
}
// A strip's TILES n8 tiles (columns 0..8·TILES) of rows gq (at pa) and gq + 8 (at pb): by st_rows4 when TILES
// is a multiple of 4, else pair by pair.
template <int TILES, typename O>
__device__ __forceinline__ void st_strip(O* pa, O* pb, bool va, bool vb, const float (*acc)[4]) {
    if constexpr (TILES % 4 == 0) {
#pragma unroll
        for (int t = 0; t < TILES; t += 4) st_rows4(pa + 8 * t, pb + 8 * t, va, vb, acc + t);
    } else {
        const int c = 2 * (threadIdx.x & 3);
#pragma unroll
        for (int t = 0; t < TILES; ++t) {
            if (va) st2(pa, 8 * t + c, acc[t][0], acc[t][1]);
            if (vb) st2(pb, 8 * t + c, acc[t][2], acc[t][3]);
        }
    }
}

// The A fragment (16×16, row-major) at rows r0.., cols k0.. of a row-major tile with row stride `st`.
__device__ __forceinline__ void frag_a(unsigned* a, const bf* s, int st, int r0, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    a[0] = ld2(s + (r0 + g) * st + k0 + 2 * t);
    a[1] = ld2(s + (r0 + g + 8) * st + k0 + 2 * t);
    a[2] = ld2(s + (r0 + g) * st + k0 + 2 * t + 8);
    a[3] = ld2(s + (r0 + g + 8) * st + k0 + 2 * t + 8);
}

// The B fragment (16×8, k × n) from a tile stored [n][k] with row stride `st`, at n0, k0.
__device__ __forceinline__ void frag_b(unsigned* b, const bf* s, int st, int n0, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    b[0] = ld2(s + (n0 + g) * st + k0 + 2 * t);
    b[1] = ld2(s + (n0 + g) * st + k0 + 2 * t + 8);
}

// The same B fragment from a tile stored [k][n] (row stride `st`, rows 16-byte aligned) by ldmatrix.trans:
// lanes 0–7 address rows k0..k0+7, lanes 8–15 rows k0+8..k0+15, each at column n0.
__device__ __forceinline__ void frag_b_t(unsigned* b, const bf* s, int st, int n0, int k0) {
    const int r = threadIdx.x & 15;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(s + (k0 + r) * st + n0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
}

// Two such B fragments, n8 tiles n0 and n0 + 8 (b[0..1], b[2..3]), by one ldmatrix.x4.trans: lanes 16–31
// address the rows at n0 + 8.
__device__ __forceinline__ void frag_b_t2(unsigned* b, const bf* s, int st, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(s + (k0 + (lane & 15)) * st + n0 + (lane >> 4) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(addr));
}

// Tile loaders: rows [0, ROWS) of a row-major global matrix (row r at g + r·rs), columns [0, W), into a
// bf16 shared tile stored as is (nat[r·sn + k], rows padded) and/or transposed (tr[k·st + r]); rows ≥ nr
// read as zeros; optionally each row scaled by scale[r]. 16-byte global loads, issued 8 per thread before
// any is stored (the loads' latency overlaps); consecutive threads take consecutive rows, so the
// transposed stores are conflict-free. For 128-thread blocks; W % 8 == 0 (bf16) or W % 4 == 0 (f32).
#define LT 128
// One 16-byte global load as bf16 for the tile: 8 bf16 kept as they are, or 4 f32 rounded; scaled by f when
// `scaled`.
template <typename T> struct Load16;
template <> struct Load16<bf> {
    static constexpr int E = 8;
    using Packed = uint4;
    __device__ static Packed to_bf16(uint4 v, bool scaled, float f) {
        if (scaled) {
            unsigned* w = reinterpret_cast<unsigned*>(&v);
#pragma unroll
            for (int q = 0; q < 4; ++q) w[q] = pack2(f * __uint_as_float(w[q] << 16), f * __uint_as_float(w[q] & 0xffff0000u));
        }
        return v;
    }
};
template <> struct Load16<float> {
    static constexpr int E = 4;
    using Packed = uint2;
    __device__ static Packed to_bf16(uint4 v, bool scaled, float f) {
        float4 x = make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w));
        if (scaled) {
            x.x *= f; x.y *= f; x.z *= f; x.w *= f;
        }
        return make_uint2(pack2(x.x, x.y), pack2(x.z, x.w));
    }
};

template <typename T, int ROWS, int W>
__device__ __forceinline__ void load_tile(const T* g, long rs, int nr, const float* scale, bf* nat, int sn, bf* tr, int st) {
    using L = Load16<T>;
    constexpr int E = L::E, TOTAL = ROWS * (W / E), ITER = (TOTAL + LT - 1) / LT;
#pragma unroll
    for (int b0 = 0; b0 < ITER; b0 += 8) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int e = (b0 + u) * LT + threadIdx.x, r = e % ROWS;
            v[u] = make_uint4(0u, 0u, 0u, 0u);
            if (b0 + u < ITER && e < TOTAL && r < nr) v[u] = __ldg(reinterpret_cast<const uint4*>(g + r * rs + E * (e / ROWS)));
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int e = (b0 + u) * LT + threadIdx.x, r = e % ROWS, se = E * (e / ROWS);
            if (b0 + u >= ITER || e >= TOTAL) continue;
            const typename L::Packed w = L::to_bf16(v[u], scale != nullptr, scale ? scale[r] : 1.f);
            if (nat) *reinterpret_cast<typename L::Packed*>(nat + r * sn + se) = w;
            if (tr) {
                const bf* b = reinterpret_cast<const bf*>(&w);
#pragma unroll
                for (int q = 0; q < E; ++q) tr[(se + q) * st + r] = b[q];
            }
        }
    }
}
// The A fragment (16×16, rows m, cols k) at m0, k0 from a tile stored [k][m] (row stride `st`, rows 16-byte
// aligned) by ldmatrix.x4.trans: lanes 8q..8q+7 address the rows of 8×8 block q (q & 1: m + 8, q & 2: k + 8).
__device__ __forceinline__ void frag_a_t(unsigned* a, const bf* s, int st, int m0, int k0) {
    const int lane = threadIdx.x & 31, q = lane >> 3;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(s + (k0 + (lane & 7) + (q & 2) * 4) * st + m0 + (q & 1) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}

// Asynchronous copies (cp.async, sm_80): 16 bytes global → shared, zero-filled when !valid; a group of them
// is committed, then waited for with W groups left in flight.
__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int W>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(W)); }

// Rows [0, ROWS) × W bf16 columns of a row-major global matrix (row r at g + r·rs) into a shared tile stored
// as is (s[r·sn + k]), by cp.async, rows ≥ nr zero-filled. Consecutive threads take consecutive 16-byte
// pieces of a row. For NTH-thread blocks; W % 8 == 0.
template <int ROWS, int W, int NTH = 128>
__device__ __forceinline__ void cp_tile(const bf* g, long rs, int nr, bf* s, int sn) {
    constexpr int PR = W / 8;
#pragma unroll 4
    for (int e = threadIdx.x; e < ROWS * PR; e += NTH) {
        const int r = e / PR, k = 8 * (e % PR);
        cp16(s + r * sn + k, r < nr ? g + r * rs + k : g, r < nr);
    }
}

// Rows of a tile loaded by cp_tile<ROWS, W>, each scaled by w[r] in place: the pieces this thread copied
// (call after its cp_wait, before the barrier that shows the tile to the other threads).
template <int ROWS, int W>
__device__ __forceinline__ void scale_own_rows(bf* s, int sn, const float* w) {
    constexpr int PR = W / 8;
#pragma unroll 4
    for (int e = threadIdx.x; e < ROWS * PR; e += 128) {
        const int r = e / PR, k = 8 * (e % PR);
        uint4* v = reinterpret_cast<uint4*>(s + r * sn + k);
        *v = Load16<bf>::to_bf16(*v, true, w[r]);
    }
}

// acc[t] += A[r0..r0+16][k]·B[t·TS..t·TS+8][k]ᵀ summed over the k-steps kt ∈ [kt_from, K/16) (k = 16·kt),
// for the n8 tiles t < live of TILES (TS = 16: every other n8 tile of B): A stored [row][k] (stride sa), B stored
// [n][k] (stride sb), or [k][n] when BT (loaded by ldmatrix.trans). UNROLL is the k loop's unroll factor.
template <int TILES, int K, int UNROLL, bool BT = false, int TS = 8>
__device__ __forceinline__ void strip_mma(float (*acc)[4], const bf* a, int sa, int r0, const bf* b, int sb, int kt_from = 0, int live = TILES) {
#pragma unroll (UNROLL)
    for (int kt = 0; kt < K / 16; ++kt)
        if (kt >= kt_from) {
            unsigned fa[4];
            frag_a(fa, a, sa, r0, kt * 16);
#pragma unroll
            for (int t = 0; t < TILES; ++t)
                if (t < live) {
                    unsigned fb[2];
                    if (BT) frag_b_t(fb, b, sb, t * TS, kt * 16);
                    else frag_b(fb, b, sb, t * TS, kt * 16);
                    mma16816(acc[t], fa, fb);
                }
        }
}

template <int TILES>
__device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
    for (int t = 0; t < TILES; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
}

// out_k[p][n] = Σ_j w_k[j]·v_k[j][p]·u[j][n] over the chunk, for the HB heads k of a block (one group): u
// (MQ rows of N, shared by the heads) loaded once; each head's v (MQ rows of P at v + k·P, row stride vrs)
// arrives by cp.async a head ahead of its product (two buffers) and is scaled in place by w_k (f32 v is
// loaded, scaled and converted synchronously instead); out_k at out + k·P·N (CT). Shared memory: um
// (MQ × (N + PADK)) and vs (2 × MQ × (P + PADK)). Reads w (HB × MQ) after its first barrier.
template <typename VT>
__device__ __forceinline__ void pn_heads(const bf* u, long urs, const VT* v, long vrs, int nq, const float* w, CT* out, int HB, bf* um, bf* vs) {
    constexpr int SN2 = N + PADK, SP2 = P + PADK;
    constexpr bool async = sizeof(VT) == 2;
    auto issue = [&](int k) { // head k's v into buffer k & 1
        if constexpr (async) cp_tile<MQ, P>(v + k * P, vrs, nq, vs + (k & 1) * MQ * SP2, SP2);
        cp_commit();
    };
    cp_tile<MQ, N>(u, urs, nq, um, SN2);
    issue(0);
    if (HB > 1) issue(1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2;
    for (int k = 0; k < HB; ++k) {
        bf* vk = vs + (k & 1) * MQ * SP2;
        if (k + 1 < HB) cp_wait<1>();
        else cp_wait<0>();
        if (k == 0) __syncthreads(); // w written by the caller
        if constexpr (async) scale_own_rows<MQ, P>(vk, SP2, w + k * MQ);
        else load_tile<VT, MQ, P>(v + k * P, vrs, nq, w + k * MQ, vk, SP2, nullptr, 0);
        __syncthreads();
        // A = v_kᵀ and B = u, both read transposed by ldmatrix.
        CT* o = out + (long)k * P * N;
        for (int strip = warp; strip < P / 16; strip += 4) {
            float acc[N / 8][4];
            zero<N / 8>(acc);
#pragma unroll
            for (int kt = 0; kt < MQ / 16; ++kt) {
                unsigned fa[4];
                frag_a_t(fa, vk, SP2, strip * 16, kt * 16);
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt) {
                    unsigned fb[2];
                    frag_b_t(fb, um, SN2, nt * 8, kt * 16);
                    mma16816(acc[nt], fa, fb);
                }
            }
            const int pp = strip * 16 + gq;
            st_strip<N / 8>(o + pp * N, o + (pp + 8) * N, true, true, acc);
        }
        __syncthreads(); // buffer k & 1 is free
        if (k + 2 < HB) issue(k + 2);
    }
}

// chunk_state_mma and chunk_dstate_mma hold 38 KB of tiles per block at P = 64, N = 128: capped at 96
// registers (five blocks per multiprocessor; the launch sets the largest shared-memory carveout to match)
// they ran 3% and 10% faster at 4 × 8192 than at four blocks. At N = 64 the cap measured 4–5% slower (the
// default carveout already fits more blocks there); at N = 256 it would spill the accumulators. Other sizes
// keep the compiler's choice.
#if P == 64 && N == 128
#define PN_BOUNDS __launch_bounds__(128, 5)
#else
#define PN_BOUNDS __launch_bounds__(128)
#endif

// Grid (NC, H/HB, Bt), 128 threads. As ssd_chunk_state, for the HB heads h0.. of one group (HB divides HPG),
// by pn_heads: v = x, u = B, w_j = exp(cs_last − cs_j)·dt_j.
extern "C" __global__ void PN_BOUNDS ssd_chunk_state_mma(const T* xbc, const float* dt, const float* la, CT* states,
                                                                      float* csum, int L, int H, int HPG, int ROW, int X_OFF,
                                                                      int B_OFF, int NC, int HB) {
    constexpr int SN2 = N + PADK;
    extern __shared__ float sm[];
    float* cs = sm;                                   // HB × MQ
    float* w = cs + HB * MQ;                          // HB × MQ
    bf* um = reinterpret_cast<bf*>(w + HB * MQ);      // MQ × SN2: B [j][n]
    bf* vs = um + MQ * SN2;                           // 2 × MQ × SP2: x [j][p]
    const int c = blockIdx.x, h0 = blockIdx.y * HB, b = blockIdx.z, g = h0 / HPG;
    const int t0 = c * MQ, nq = min(MQ, L - t0);
    const long r0 = (long)b * L + t0;
    float dtv[8];
    rows_of_heads<MQ>(dt, r0 * H + h0, H, nq, HB, dtv);
    chunk_cumsum<MQ>(la, r0 * H + h0, H, nq, cs, HB);
    if (threadIdx.x < MQ)
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (k < HB) w[k * MQ + threadIdx.x] = __expf(cs[k * MQ + MQ - 1] - cs[k * MQ + threadIdx.x]) * dtv[k];
    if (threadIdx.x < HB) csum[((long)b * H + h0 + threadIdx.x) * NC + c] = cs[threadIdx.x * MQ + MQ - 1];
    pn_heads(xbc + r0 * ROW + B_OFF + g * N, ROW, xbc + r0 * ROW + X_OFF + h0 * P, ROW, nq, w, states + (((long)b * NC + c) * H + h0) * (P * N), HB, um, vs);
}

// chunk_state and the state passing in one walk over the chunks (the y-only op: no initial state, no final
// state), and in the backward chunk_dstate and state_passing_bwd in one walk back. Grid (P/PT, H, Bt), NTH
// threads: a block walks the NC chunks of one sequence and head, for PT of its P channels, holding that
// slice (PT × N, f32) of the running state in its warps' accumulators. Forward, chunks in order, G = S:
//   passed[b, c, h] = S (bf16); S ← exp(cs_last)·S + Σ_j (exp(cs_last − cs_j)·dt_j·x_j) ⊗ B_j
// Backward, chunks in reverse, G = dL/dS_out of chunk c (zero after the last):
//   dpassed[b, c, h] = G (bf16); dcsum[b, h, c] += exp(cs_last)·⟨G, S_in⟩; G ← exp(cs_last)·G + Σ_i (exp(cs_i)·dy_i) ⊗ C_i
// So the chunks' own states (or state gradients) are never stored and read back: those bytes are passed's
// (dpassed's) once. Both are G += (w ∘ v)ᵀ·u by mma per chunk: v = x or dy (rows of the chunk, PT columns),
// u = B or C, w_j = exp(cs_last − cs_j)·dt_j or exp(cs_j). The next chunks' v, u, la and dt (and S_in in the
// backward) are copied by cp.async FS − 1 steps ahead, and each step computes the next chunk's weights (every
// warp scans its la itself, two rows per lane) beside this chunk's products, so the scan's shuffles are off the
// path from one chunk to the next; the weights scale the A fragments (v) as they are loaded. Warps PT/16 ×
// NTH/(2·PT) over the slice, 16 rows each; the forward writes csum[b, h, c] = cs_last as chunk_state_mma does.
// Parallel over b, h and the slices only: the launch falls back to the separate kernels when that is too few
// blocks (ssd.rs). N a power of two, ≥ 32 (≥ 64 at PT = 16 or 512 threads).
#define FS 4
__device__ __forceinline__ void cp4(void* dst, const void* src, bool valid) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0));
}
// A bf16 pair scaled by (lo, hi) and rounded back.
__device__ __forceinline__ unsigned scale2(unsigned v, float lo, float hi) {
    return pack2(lo * __uint_as_float(v << 16), hi * __uint_as_float(v & 0xffff0000u));
}
// Rows [0, ROWS) × W bf16 columns (row r at g + r·rs) into a shared tile (s[r·sn + k]) by cp.async (rows ≥ nr
// zero-filled), 16 bytes per copy: with NTH threads, a thread's column is fixed and its rows step by
// NTH / (W / 8), so the copies unroll with no index arithmetic.
template <int ROWS, int W, int NTH>
__device__ __forceinline__ void cp_rows(const bf* g, long rs, int nr, bf* s, int sn) {
    constexpr int PR = W / 8, STEP = NTH / PR, U = (ROWS + STEP - 1) / STEP;
    static_assert(NTH % PR == 0, "a thread's column is fixed");
    const int r0 = threadIdx.x / PR, k = 8 * (threadIdx.x % PR);
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int r = r0 + u * STEP;
        if (ROWS % STEP == 0 || r < ROWS) cp16(s + r * sn + k, g + (long)(r < nr ? r : 0) * rs + k, r < nr);
    }
}
// The weights of one chunk for this lane's A fragments: w[4kt + q] = w_j at rows j = 16kt + 2tq + (0, 1, 8, 9)[q];
// forward w_j = exp(cs_last − cs_j)·dt_j, backward exp(cs_j), from the chunk's la and dt at lav (MQ each);
// cs_last to `last`, and the cumulative sums cs_j (× cs_scale) to `cs` when given.
// The cumulative sums of a chunk's 64 values by one warp, two per lane (rows 2·lane and 2·lane + 1: l0, l1): returns
// the sum through row 2·lane + 1 (through row 2·lane is that − l1), and the chunk's total in `last`.
__device__ __forceinline__ float warp_cumsum2(float l0, float l1, float& last) {
    const int lane = threadIdx.x & 31;
    float run = l0 + l1;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float u = __shfl_up_sync(0xffffffffu, run, o);
        if (lane >= o) run += u;
    }
    last = __shfl_sync(0xffffffffu, run, 31);
    return run;
}
template <bool BWD>
__device__ __forceinline__ void chunk_weights(const float* lav, float* w, float& last, float* cs = nullptr, float cs_scale = 1.f) {
    const int lane = threadIdx.x & 31, tq = lane & 3;
    const float2 l2 = *reinterpret_cast<const float2*>(lav + 2 * lane);
    const float run = warp_cumsum2(l2.x, l2.y, last); // rows 2·lane and 2·lane + 1 in this lane
    if (cs) *reinterpret_cast<float2*>(cs + 2 * lane) = make_float2(cs_scale * (run - l2.y), cs_scale * run);
    float w0, w1;
    if constexpr (BWD) {
        w0 = __expf(run - l2.y), w1 = __expf(run);
    } else {
        const float2 d2 = *reinterpret_cast<const float2*>(lav + MQ + 2 * lane);
        w0 = __expf(last - (run - l2.y)) * d2.x, w1 = __expf(last - run) * d2.y;
    }
#pragma unroll
    for (int kt = 0; kt < MQ / 16; ++kt) {
        w[4 * kt] = __shfl_sync(0xffffffffu, w0, 8 * kt + tq);
        w[4 * kt + 1] = __shfl_sync(0xffffffffu, w1, 8 * kt + tq);
        w[4 * kt + 2] = __shfl_sync(0xffffffffu, w0, 8 * kt + 4 + tq);
        w[4 * kt + 3] = __shfl_sync(0xffffffffu, w1, 8 * kt + 4 + tq);
    }
}
// acc[t] += A·B_t for the TILES n8 tiles t of a [k][n] tile (stride st) at columns n0 + 8t, k-step k0: two tiles
// per ldmatrix.x4.trans where TILES is even.
template <int TILES>
__device__ __forceinline__ void mma_tiles_t(float (*acc)[4], const unsigned* a, const bf* s, int st, int n0, int k0) {
    if constexpr (TILES % 2 == 0) {
#pragma unroll
        for (int t = 0; t < TILES; t += 2) {
            unsigned fb[4];
            frag_b_t2(fb, s, st, n0 + t * 8, k0);
            mma16816(acc[t], a, fb);
            mma16816(acc[t + 1], a, fb + 2);
        }
    } else {
#pragma unroll
        for (int t = 0; t < TILES; ++t) {
            unsigned fb[2];
            frag_b_t(fb, s, st, n0 + t * 8, k0);
            mma16816(acc[t], a, fb);
        }
    }
}
// One chunk of a walk: G ← dc·G + (w ∘ v)ᵀ·u over the chunk's rows j (the mma's k), for this warp's 16 rows
// (m0..) and NTW n8 tiles (n0..) of G, held in acc: v [j][p] (row stride SX) and u [j][n] (SB) in shared memory.
// A = vᵀ by ldmatrix.trans, its k columns 2tq, 2tq + 1 and 2tq + 8, + 9 scaled by the weights (chunk_weights) in
// registers.
template <int NTW, int SX, int SB>
__device__ __forceinline__ void walk_update(float (*acc)[4], float dc, const float* w, const bf* vs, const bf* us, int m0, int n0) {
#pragma unroll
    for (int t = 0; t < NTW; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] *= dc;
#pragma unroll
    for (int kt = 0; kt < MQ / 16; ++kt) {
        unsigned fa[4];
        frag_a_t(fa, vs, SX, m0, kt * 16);
        fa[0] = scale2(fa[0], w[4 * kt], w[4 * kt + 1]);
        fa[1] = scale2(fa[1], w[4 * kt], w[4 * kt + 1]);
        fa[2] = scale2(fa[2], w[4 * kt + 2], w[4 * kt + 3]);
        fa[3] = scale2(fa[3], w[4 * kt + 2], w[4 * kt + 3]);
        mma_tiles_t<NTW>(acc, fa, us, SB, n0, kt * 16);
    }
}
// u: B or C of the chunk's rows (xbc, row stride ROW); v: x (xbc) or dy (row stride vrs), at this head and slice;
// sin: the passed states (backward); out: passed or dpassed; sums: csum or dcsum.
template <int PT, int NTH, bool BWD>
__device__ __forceinline__ void state_walk(const bf* u, const bf* v, long vrs, const float* dt, const float* la, const bf* sin, bf* out,
                                           float* sums, int L, int H, int ROW, int NC) {
    constexpr int WM = PT / 16, WN = NTH / 32 / WM, NTW = N / (8 * WN); // warp (wm, wn): rows 16·wm.., NTW n8 tiles
    static_assert(P % PT == 0 && N % (8 * WN) == 0, "slices of P, warps' columns of N");
    constexpr int SX = PT + PADK, SB = N + PADK;
    constexpr int STAGE = MQ * (SX + SB) + (BWD ? PT * SB : 0); // bf16 elements of a stage's tiles: v, u (, S_in)
    extern __shared__ float sm[];
    float* vecs = sm;                                    // FS × (la, dt) × MQ
    bf* tiles = reinterpret_cast<bf*>(sm + FS * 2 * MQ); // FS × (v [j][p] MQ × SX, u [j][n] MQ × SB (, S_in [p][n] PT × SB))
    const int p0 = blockIdx.x * PT, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const int m0 = (warp / WN) * 16, n0 = (warp % WN) * NTW * 8;
    const long cstride = (long)H * P * N;                         // elements between chunks of passed / dpassed
    const long slice = ((long)b * NC * H + h) * (P * N) + (long)p0 * N; // this block's slice of chunk 0 there
    auto chunk = [&](int k) { return BWD ? NC - 1 - k : k; };     // the chunk of step k
    auto issue = [&](int k) {
        if (k < NC) {
            const int c = chunk(k), s = k % FS, t0 = c * MQ, nq = min(MQ, L - t0);
            const long r0 = (long)b * L + t0;
            bf* vs = tiles + s * STAGE;
            cp_rows<MQ, PT, NTH>(v + r0 * vrs, vrs, nq, vs, SX);
            cp_rows<MQ, N, NTH>(u + r0 * ROW, ROW, nq, vs + MQ * SX, SB);
            if constexpr (BWD) cp_rows<PT, N, NTH>(sin + slice + c * cstride, N, PT, vs + MQ * (SX + SB), SB);
            if (threadIdx.x < (BWD ? MQ : 2 * MQ)) { // threads 0..63: la, 64..127: dt (0 past the chunk's end)
                const int i = threadIdx.x & (MQ - 1);
                cp4(vecs + s * 2 * MQ + threadIdx.x, (threadIdx.x < MQ ? la : dt) + (r0 + (i < nq ? i : 0)) * H + h, i < nq);
            }
        }
        cp_commit(); // a group every call, empty past the end, so that the waits count alike
    };
    float* sums_bh = sums + ((long)b * H + h) * NC;
    const bool writes_csum = !BWD && blockIdx.x == 0 && threadIdx.x == 31;
#pragma unroll
    for (int k = 0; k < FS - 1; ++k) issue(k);
    cp_wait<FS - 2>();
    __syncthreads();
    float w[16], last;
    chunk_weights<BWD>(vecs, w, last);
    if (writes_csum) sums_bh[0] = last;
    float acc[NTW][4];
    zero<NTW>(acc);
    bf* o0 = out + slice + (long)(m0 + gq) * N + n0;
    for (int k = 0; k < NC; ++k) {
        cp_wait<FS - 3>();
        __syncthreads(); // steps k and k + 1 are in; step k − 1's stage is free for step k + FS − 1
        issue(k + FS - 1);
        const int c = chunk(k);
        const bf* vs = tiles + (k % FS) * STAGE;
        const bf* us = vs + MQ * SX;
        // G of chunk c out (rows gq and gq + 8 of the warp's strip), then the decay over the chunk.
        bf* o = o0 + c * cstride;
        st_strip<NTW>(o, o + 8 * N, true, true, acc);
        const float dc = __expf(last);
        if constexpr (BWD) { // dL/dcs_last through the decay of S_in: exp(cs_last)·⟨G, S_in⟩ over the slice
            const bf* si = us + MQ * SB + (m0 + gq) * SB + n0 + 2 * tq;
            float part = 0.f;
#pragma unroll
            for (int t = 0; t < NTW; ++t) {
                const unsigned a = ld2(si + 8 * t), e = ld2(si + 8 * SB + 8 * t);
                part += acc[t][0] * __uint_as_float(a << 16) + acc[t][1] * __uint_as_float(a & 0xffff0000u);
                part += acc[t][2] * __uint_as_float(e << 16) + acc[t][3] * __uint_as_float(e & 0xffff0000u);
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
            if (lane == 0 && part != 0.f) atomicAdd(sums_bh + c, dc * part);
        }
        walk_update<NTW, SX, SB>(acc, dc, w, vs, us, m0, n0);
        // Step k + 1's weights (past the last step: a stale stage, not used).
        chunk_weights<BWD>(vecs + ((k + 1) % FS) * 2 * MQ, w, last);
        if (writes_csum && k + 1 < NC) sums_bh[k + 1] = last;
    }
    cp_wait<0>();
}

#define POW2_N ((N & (N - 1)) == 0)
// ssd_state_pass_mma{PT}_{NTH}: chunk_state_mma + ssd_state_passing_bf16 (no s0, no sf) for the y-only op.
// ssd_dstate_pass_mma{PT}_{NTH}: chunk_dstate_mma + ssd_state_passing_bwd_bf16 (no dsf, no ds0); dcsum zeroed.
#define STATE_WALKS(PT, NTH, OK)                                                                                                              \
    extern "C" __global__ void __launch_bounds__(NTH) ssd_state_pass_mma##PT##_##NTH(const T* xbc, const float* dt, const float* la,         \
                                                                                    bf* passed, float* csum, int L, int H, int HPG,          \
                                                                                    int ROW, int X_OFF, int B_OFF, int NC) {                 \
        if constexpr (OK)                                                                                                                     \
            state_walk<PT, NTH, false>(xbc + B_OFF + (blockIdx.y / HPG) * N, xbc + X_OFF + blockIdx.y * P + blockIdx.x * PT, ROW, dt, la,    \
                                       nullptr, passed, csum, L, H, ROW, NC);                                                                 \
    }                                                                                                                                         \
    extern "C" __global__ void __launch_bounds__(NTH) ssd_dstate_pass_mma##PT##_##NTH(const T* xbc, const float* la, const YT* dy,           \
                                                                                     const bf* passed, bf* dpassed, float* dcsum, int L,     \
                                                                                     int H, int HPG, int ROW, int C_OFF, int NC) {           \
        if constexpr (OK && IO_T)                                                                                                             \
            state_walk<PT, NTH, true>(xbc + C_OFF + (blockIdx.y / HPG) * N, (const bf*)dy + blockIdx.y * P + blockIdx.x * PT, (long)H * P, la, \
                                      la, passed, dpassed, dcsum, L, H, ROW, NC);                                                             \
    }
STATE_WALKS(64, 256, P % 64 == 0 && POW2_N && N >= 32)
STATE_WALKS(32, 256, P % 32 == 0 && POW2_N && N >= 32)
STATE_WALKS(16, 256, POW2_N && N >= 64)
STATE_WALKS(64, 512, P % 64 == 0 && POW2_N && N >= 64)
STATE_WALKS(32, 512, P % 32 == 0 && POW2_N && N >= 64)

// C·Bᵀ of every chunk and group, for the scan walk: cb[b, c, g] (MQ × MQ, f32, row i, column j) over the causal
// n8 tiles (j < 8·⌈(i + 1)/8⌉ per 16-row strip; the tiles past them 0). Grid (NC, G, Bt), 128 threads: warp w
// rows 16w.. . Rows past the sequence's end are 0 (their C rows load as zeros).
extern "C" __global__ void __launch_bounds__(128) ssd_chunk_cb_mma(const T* xbc, float* cb, int L, int G, int ROW, int B_OFF, int C_OFF, int NC) {
    constexpr int SN2 = N + PADK;
    extern __shared__ float sm[];
    bf* cm = reinterpret_cast<bf*>(sm); // MQ × SN2: C [i][n]
    bf* bm = cm + MQ * SN2;             // MQ × SN2: B [j][n]
    const int c = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    const int t0 = c * MQ, nq = min(MQ, L - t0);
    const long r0 = (long)b * L + t0;
    cp_tile<MQ, N>(xbc + r0 * ROW + C_OFF + g * N, ROW, nq, cm, SN2);
    cp_tile<MQ, N>(xbc + r0 * ROW + B_OFF + g * N, ROW, nq, bm, SN2);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    const int warp = threadIdx.x >> 5, gq = (threadIdx.x & 31) >> 2;
    float acc[MQ / 8][4];
    zero<MQ / 8>(acc);
    strip_mma<MQ / 8, N, 2>(acc, cm, SN2, warp * 16, bm, SN2, 0, 2 * (warp + 1));
    float* o = cb + (((long)b * NC + c) * G + g) * (MQ * MQ) + (warp * 16 + gq) * MQ;
    st_strip<MQ / 8>(o, o + 8 * MQ, true, true, acc);
}

// The whole forward of the y-only op in one walk over the chunks (no initial or final state): chunk_state,
// the state passing and chunk_scan together, so the passed states never leave the multiprocessor. Grid (P/PT,
// H, Bt), 256 threads: a block walks the NC chunks of one sequence and head for PT of its P channels. At chunk c:
//   y_i = exp(cs_i)·S_in C_i + Σ_{j ≤ i} (C_i·B_j)·exp(cs_i − cs_j)·dt_j·x_j + D·x_i    (y warps 0..3: rows 16w..)
//   S ← exp(cs_last)·S + Σ_j (exp(cs_last − cs_j)·dt_j·x_j) ⊗ B_j                        (state warps 4..7)
// The state warps hold the running state's slice (PT × N, f32) in their accumulators (walk_update, as
// state_walk) and leave S_in of the next chunk in shared memory (bf16, two slots); they also make each chunk's
// weights and write its cumulative sums, ×log2 e, beside its la and dt. C·Bᵀ is the same for every head of a
// group: ssd_chunk_cb_mma computes it once, and the y warps read it (f32). Copies by cp.async, two chunks ahead
// (SW stages): chunk c's x, B, C and C·Bᵀ, with la and dt of chunk c + 1 (a ring of 4 slots: c's sums are read
// while c + 1's weights are made and c + 2's, c + 3's arrive), by cp_rows.
// Segments: where the sequences × heads × slices are too few blocks for the GPU, each sequence's chunks are
// split into segments of CPS chunks (grid z: Bt × segments), each walked from a zero state. A segment's own
// final state goes to sfin (b, segment, h, P, N; f32) and the sums of la from its start through each chunk to
// pre (b, h, NC); ssd_walk_fixup then adds what the states entering the segments contribute. CPS ≥ NC: one
// segment, sfin and pre unused (null).
#define SW 3
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// One k-step (kt) of the chunk's causal product Σ_{j ≤ i} M_ij·x_j for this warp's rows ra and rb = ra + 8:
// M_ij = C_i·B_j · exp(cs_i − cs_j)·dt_j, made in registers as the A fragment from cbv(s) (C·Bᵀ at rows ra, rb
// and columns j, j + 1 for j = 16kt + 8s + 2tq, as (ra j, ra j+1, rb j, rb j+1)), the chunk's sums cs (natural
// units, or ×log2 e when LOG2) and dt; then TILES n8 tiles of x [j][p] (stride SX) from column p0 into acc.
// PAIRED (the scan walk): cs and dt read in pairs, x two tiles per ldmatrix; else (chunk_scan_mma, at its cap of
// 128 registers) one value and one tile at a time, as each was measured.
template <int TILES, int SX, bool LOG2, bool PAIRED, class CBV>
__device__ __forceinline__ void causal_mx(float (*acc)[4], int kt, int ra, int rb, float csa, float csb, const float* cs, const float* dt, CBV cbv,
                                          const bf* xs, int p0) {
    const int tq = threadIdx.x & 3;
    auto e = [](float x) { return LOG2 ? ex2(x) : __expf(x); };
    float m[2][4];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        const int j = (2 * kt + s) * 8 + 2 * tq;
        const float4 v = cbv(s);
        float2 cj, dj;
        if constexpr (PAIRED) cj = *reinterpret_cast<const float2*>(cs + j), dj = *reinterpret_cast<const float2*>(dt + j);
        else dj = make_float2(dt[j], dt[j + 1]), cj = make_float2(cs[j], cs[j + 1]);
        m[s][0] = j <= ra ? v.x * e(csa - cj.x) * dj.x : 0.f;
        m[s][1] = j + 1 <= ra ? v.y * e(csa - cj.y) * dj.y : 0.f;
        m[s][2] = j <= rb ? v.z * e(csb - cj.x) * dj.x : 0.f;
        m[s][3] = j + 1 <= rb ? v.w * e(csb - cj.y) * dj.y : 0.f;
    }
    const unsigned a[4] = {pack2(m[0][0], m[0][1]), pack2(m[0][2], m[0][3]), pack2(m[1][0], m[1][1]), pack2(m[1][2], m[1][3])};
    if constexpr (PAIRED) {
        mma_tiles_t<TILES>(acc, a, xs, SX, p0, kt * 16);
    } else {
#pragma unroll
        for (int t = 0; t < TILES; ++t) {
            unsigned fb[2];
            frag_b_t(fb, xs, SX, p0 + t * 8, kt * 16);
            mma16816(acc[t], a, fb);
        }
    }
}
// The A fragment (16×16) at r0, k0 of a tile stored [row][k] (stride st, rows 16-byte aligned), by ldmatrix.x4:
// lanes 8q..8q+7 address the rows of 8×8 block q (q & 1: rows + 8, q & 2: k + 8).
__device__ __forceinline__ void ldsm_a(unsigned* a, const bf* s, int st, int r0, int k0) {
    const int lane = threadIdx.x & 31;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(s + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * st + k0 + (lane >> 4) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}
// The B fragments of n8 tiles n0 and n0 + 8 (b[0..1], b[2..3]) at k0 from a tile stored [n][k] (stride st), by
// ldmatrix.x4: lanes 8q..8q+7 address the rows of block q (q & 1: k + 8, q & 2: n + 8).
__device__ __forceinline__ void ldsm_b2(unsigned* b, const bf* s, int st, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(s + (n0 + (lane & 7) + (lane >> 4) * 8) * st + k0 + ((lane >> 3) & 1) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(addr));
}
// ya = C·Sᵀ for this warp's 16 rows from r0 and YT n8 tiles of S's rows (channels): C stored [i][n], S stored
// [p][n], both with stride sb (N columns), by ldmatrix.
template <int YT>
__device__ __forceinline__ void c_state(float (*ya)[4], const bf* cm, const bf* s, int sb, int r0) {
    zero<YT>(ya);
#pragma unroll
    for (int kt = 0; kt < N / 16; ++kt) {
        unsigned fa[4];
        ldsm_a(fa, cm, sb, r0, kt * 16);
#pragma unroll
        for (int t = 0; t < YT; t += 2) {
            unsigned fb[4];
            ldsm_b2(fb, s, sb, t * 8, kt * 16);
            mma16816(ya[t], fa, fb);
            mma16816(ya[t + 1], fa, fb + 2);
        }
    }
}
template <int PT>
__device__ __forceinline__ void scan_walk(const T* xbc, const float* cbg, const float* dt, const float* la, bf* y, const float* D, int L,
                                          int H, int HPG, int ROW, int X_OFF, int B_OFF, int C_OFF, int NC, int CPS, float* sfin, float* pre) {
    constexpr int NTH = 256, WM = PT / 16, WN = 4 / WM, NTW = N / (8 * WN); // the state warps' grid over the slice
    constexpr int YT = PT / 8;                                              // n8 tiles of a y warp's rows
    static_assert(P % PT == 0 && N % (8 * WN) == 0 && YT % 2 == 0, "slices of P, warps' columns of N");
    constexpr int SX = PT + PADK, SB = N + PADK, SC = MQ + 8;
    constexpr int STAGE = MQ * (SX + 2 * SB); // bf16 elements of a stage's tiles: x [j][p], B [j][n], C [i][n]
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ float sm[];
    float* cbs = sm;                                      // SW × MQ × SC: C·Bᵀ [i][j]
    float* vecs = cbs + SW * MQ * SC;                     // 4 × (la, dt, cs·log2 e) × MQ
    bf* tiles = reinterpret_cast<bf*>(vecs + 4 * 3 * MQ); // SW × STAGE
    bf* sins = tiles + SW * STAGE;                        // 2 × PT × SB: S_in [p][n]
    const int NS = (NC + CPS - 1) / CPS, seg = blockIdx.z % NS, c0 = seg * CPS, c1 = min(NC, c0 + CPS); // this block's chunks
    const int p0 = blockIdx.x * PT, h = blockIdx.y, b = blockIdx.z / NS, g = h / HPG, G = H / HPG;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const bf* xb = reinterpret_cast<const bf*>(xbc);
    const long seq0 = (long)b * L; // the sequence's first row
    const bf* cb0 = reinterpret_cast<const bf*>(cbg + ((long)b * NC * G + g) * (MQ * MQ)); // C·Bᵀ rows (MQ f32) as 2·MQ bf16
    auto vec_issue = [&](int c) { // la and dt of chunk c into slot c % 4 (0 past the sequence's end)
        if (c < c1 && threadIdx.x < 2 * MQ) {
            const int nq = min(MQ, L - c * MQ), i = threadIdx.x & (MQ - 1);
            cp4(vecs + (c % 4) * 3 * MQ + threadIdx.x, (threadIdx.x < MQ ? la : dt) + (seq0 + c * MQ + (i < nq ? i : 0)) * H + h, i < nq);
        }
    };
    auto issue = [&](int c) { // chunk c's tiles and C·Bᵀ, chunk c + 1's la and dt: one group
        if (c < c1) {
            const int nq = min(MQ, L - c * MQ), s = c % SW; // rows past the sequence's end: zeros
            const bf* rows = xb + (seq0 + (long)c * MQ) * ROW;   // the chunk's first row
            bf* xs = tiles + s * STAGE;
            cp_rows<MQ, PT, NTH>(rows + X_OFF + h * P + p0, ROW, nq, xs, SX);
            cp_rows<MQ, N, NTH>(rows + B_OFF + g * N, ROW, nq, xs + MQ * SX, SB);
            cp_rows<MQ, N, NTH>(rows + C_OFF + g * N, ROW, nq, xs + MQ * (SX + SB), SB);
            cp_rows<MQ, 2 * MQ, NTH>(cb0 + (long)c * (2 * G * MQ * MQ), 2 * MQ, MQ, reinterpret_cast<bf*>(cbs + s * MQ * SC), 2 * SC);
            vec_issue(c + 1);
        }
        cp_commit();
    };
    vec_issue(c0);
    issue(c0);
    issue(c0 + 1);
    for (int e = threadIdx.x; e < PT * SB; e += NTH) sins[(c0 & 1) * PT * SB + e] = 0; // S_in of the first chunk
    cp_wait<1>();
    __syncthreads();
    if (warp < 4) {
        // y warps: rows ra, rb of each chunk (strip wi), every column of the slice.
        const int wi = warp, i0 = wi * 16, ra = i0 + gq, rb = ra + 8;
        float dv[YT][2];
#pragma unroll
        for (int t = 0; t < YT; ++t) dv[t][0] = D[h * P + p0 + t * 8 + 2 * tq], dv[t][1] = D[h * P + p0 + t * 8 + 2 * tq + 1];
        bf* yt = y + (seq0 * H + h) * P + p0 + 2 * tq; // row 0 of the sequence, this lane's column pair
        const long yrow = (long)H * P;
        for (int c = c0; c < c1; ++c) {
            cp_wait<1>();    // chunk c's group (and c + 1's la and dt)
            __syncthreads(); // ... seen by all; S_in and the sums of c written; chunk c − 1's stage and slots free
            issue(c + 2);
            const int nq = min(MQ, L - c * MQ);
            const bf* xs = tiles + (c % SW) * STAGE;
            const bf* cms = xs + MQ * (SX + SB);
            const float* cb = cbs + (c % SW) * MQ * SC;
            const float* dts = vecs + (c % 4) * 3 * MQ + MQ;
            const float* csl = dts + MQ;
            const bf* sin = sins + (c & 1) * PT * SB;
            // C·S_inᵀ, scaled by exp(cs_i); then M·X with M = C·Bᵀ ∘ exp(cs_i − cs_j)·dt_j (j ≤ i) made in registers.
            float ya[YT][4];
            c_state<YT>(ya, cms, sin, SB, i0);
            const float csa = csl[ra], csb = csl[rb], ea = ex2(csa), eb = ex2(csb);
#pragma unroll
            for (int t = 0; t < YT; ++t) ya[t][0] *= ea, ya[t][1] *= ea, ya[t][2] *= eb, ya[t][3] *= eb;
#pragma unroll
            for (int kt = 0; kt < MQ / 16; ++kt)
                if (kt <= wi)
                    causal_mx<YT, SX, true, true>(ya, kt, ra, rb, csa, csb, csl, dts, [&](int s) {
                        const int j = (2 * kt + s) * 8 + 2 * tq;
                        const float2 u = *reinterpret_cast<const float2*>(cb + ra * SC + j), v = *reinterpret_cast<const float2*>(cb + rb * SC + j);
                        return make_float4(u.x, u.y, v.x, v.y);
                    }, xs, 0);
            // + D·x, out in bf16.
            bf* yc = yt + (long)c * MQ * yrow;
#pragma unroll
            for (int t = 0; t < YT; ++t) {
                const int p = t * 8 + 2 * tq;
                const float2 xa = ld2f(xs, ra * SX + p), xc = ld2f(xs, rb * SX + p);
                if (ra < nq) st2(yc, ra * yrow + t * 8, ya[t][0] + dv[t][0] * xa.x, ya[t][1] + dv[t][1] * xa.y);
                if (rb < nq) st2(yc, rb * yrow + t * 8, ya[t][2] + dv[t][0] * xc.x, ya[t][3] + dv[t][1] * xc.y);
            }
        }
    } else {
        // State warps: the slice's rows m0.. and n8 tiles n0.. of S.
        const int sw = warp - 4, m0 = (sw / WN) * 16, n0 = (sw % WN) * NTW * 8;
        float* cs_out = sw == 0 ? vecs + 2 * MQ : nullptr; // warp 4 writes the sums (slot offset added below)
        float w[16], last, run = 0.f;                      // run: the sum of la from the segment's start
        const int s0 = (c0 % 4) * 3 * MQ;
        chunk_weights<false>(vecs + s0, w, last, cs_out ? cs_out + s0 : nullptr, LOG2E);
        float acc[NTW][4];
        zero<NTW>(acc);
        bf* so0 = sins + (m0 + gq) * SB + n0 + 2 * tq;
        float* pre_bh = pre && sw == 0 && lane == 0 && blockIdx.x == 0 ? pre + ((long)b * H + h) * NC : nullptr;
        for (int c = c0; c < c1; ++c) {
            cp_wait<1>();
            __syncthreads();
            issue(c + 2);
            const bf* xs = tiles + (c % SW) * STAGE;
            walk_update<NTW, SX, SB>(acc, __expf(last), w, xs, xs + MQ * SX, m0, n0);
            run += last;
            if (pre_bh) pre_bh[c] = run;
            // S_out of chunk c = S_in of c + 1, in bf16 for the y warps' next step.
            bf* so = so0 + ((c + 1) & 1) * PT * SB;
#pragma unroll
            for (int t = 0; t < NTW; ++t) {
                st2(so, 8 * t, acc[t][0], acc[t][1]);
                st2(so, 8 * SB + 8 * t, acc[t][2], acc[t][3]);
            }
            // Chunk c + 1's weights and sums (past the last chunk: a stale slot, not used).
            const int s1 = ((c + 1) % 4) * 3 * MQ;
            chunk_weights<false>(vecs + s1, w, last, cs_out ? cs_out + s1 : nullptr, LOG2E);
        }
        if (sfin && seg + 1 < NS) { // the segment's own final state, for the segments after it
            float* f = sfin + (((long)b * NS + seg) * H + h) * (P * N) + (long)(p0 + m0 + gq) * N + n0 + 2 * tq;
#pragma unroll
            for (int t = 0; t < NTW; ++t) {
                st2(f, 8 * t, acc[t][0], acc[t][1]);
                st2(f, 8 * N + 8 * t, acc[t][2], acc[t][3]);
            }
        }
    }
    cp_wait<0>();
}

// ssd_walk_states: the states entering the segments of a split scan walk, S_1 = F_0, S_{k+1} = exp(A_k)·S_k + F_k
// (F_k segment k's own final state, A_k its sum of la), in bf16 as the walk's own S_in: sseg (b, segment, h, P,
// N), slot 0 unused. Grid (H, Bt, P·N / 256), 256 threads, an element each through all the segments (a chain
// of NS − 1 dependent steps: with a few elements per thread instead, 16 heads × 8 segments took 93 µs).
extern "C" __global__ void __launch_bounds__(256) ssd_walk_states(const float* __restrict__ sfin, const float* __restrict__ pre, bf* __restrict__ sseg,
                                                                  int H, int NC, int CPS) {
    const int NS = (NC + CPS - 1) / CPS, h = blockIdx.x, b = blockIdx.y, e = blockIdx.z * 256 + threadIdx.x;
    if (e >= P * N) return;
    const float* pr = pre + ((long)b * H + h) * NC;
    float s = 0.f;
    for (int k = 0; k + 1 < NS; ++k) {
        const long o = (((long)b * NS + k) * H + h) * (P * N) + e;
        s = __expf(pr[(k + 1) * CPS - 1]) * s + sfin[o];
        sseg[o + (long)H * P * N] = to_bf(s);
    }
}

// ssd_walk_fixup: the segments of a split scan walk made whole. A segment after the first was walked from a zero
// state; the state entering it, S_k (ssd_walk_states), adds exp(Σ_{s = start..t} la_s)·C_t·S_kᵀ to y_t. Grid
// (GPS·(NS − 1), H, Bt): GPS groups of at most FG chunks per segment, a block per group and head; 128 threads,
// warp w rows 16w.. and all P columns. S_k arrives once; each chunk's C, y and la by cp.async into one of two
// stages, the next chunk's while one is computed. y is added to in bf16 and written back 16 bytes at a time.
extern "C" __global__ void __launch_bounds__(128) ssd_walk_fixup(const T* xbc, const float* la, const bf* sseg, const float* pre, bf* y,
                                                                 int L, int H, int HPG, int ROW, int C_OFF, int NC, int CPS, int FG) {
    constexpr int SB = N + PADK, SY = P + PADK, YT = P / 8, STAGE = MQ * (SB + SY);
    extern __shared__ float sm[];
    float* lav = sm;                                       // 2 × MQ: la of a stage's chunk
    float* pfx = lav + 2 * MQ;                             // FG: the sum of la from the segment's start to each chunk's start
    bf* ss = reinterpret_cast<bf*>(pfx + ((FG + 3) & ~3)); // P × SB: S_k [p][n] (16-byte aligned)
    bf* stages = ss + P * SB;                              // 2 × (C [i][n] MQ × SB, y [i][p] MQ × SY)
    const int NS = (NC + CPS - 1) / CPS, GPS = (CPS + FG - 1) / FG;
    const int seg = 1 + blockIdx.x / GPS, h = blockIdx.y, b = blockIdx.z, g = h / HPG;
    const int cb = seg * CPS + (blockIdx.x % GPS) * FG, cnt = min(min(FG, (seg + 1) * CPS - cb), NC - cb);
    if (cnt <= 0) return;
    const float* pr = pre + ((long)b * H + h) * NC;
    if (threadIdx.x < cnt) pfx[threadIdx.x] = cb + (int)threadIdx.x > seg * CPS ? pr[cb + threadIdx.x - 1] : 0.f;
    cp_tile<P, N>(sseg + (((long)b * NS + seg) * H + h) * (P * N), N, P, ss, SB);
    auto issue = [&](int i) { // chunk cb + i into stage i & 1
        if (i < cnt) {
            const int c = cb + i, nq = min(MQ, L - c * MQ);
            const long r0 = (long)b * L + (long)c * MQ;
            bf* cm = stages + (i & 1) * STAGE;
            cp_tile<MQ, N>(reinterpret_cast<const bf*>(xbc) + r0 * ROW + C_OFF + g * N, ROW, nq, cm, SB);
            cp_tile<MQ, P>(y + (r0 * H + h) * P, (long)H * P, nq, cm + MQ * SB, SY);
            if (threadIdx.x < MQ) cp4(lav + (i & 1) * MQ + threadIdx.x, la + (r0 + (threadIdx.x < nq ? threadIdx.x : 0)) * H + h, threadIdx.x < nq);
        }
        cp_commit();
    };
    issue(0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const int ra = warp * 16 + gq, rb = ra + 8;
    for (int i = 0; i < cnt; ++i) {
        const int c = cb + i, nq = min(MQ, L - c * MQ);
        __syncthreads(); // chunk i − 1's stage written back: free for chunk i + 1
        issue(i + 1);
        cp_wait<1>();
        __syncthreads(); // chunk i's stage (and S_k, the prefixes) seen by all
        const bf* cm = stages + (i & 1) * STAGE;
        bf* ym = const_cast<bf*>(cm) + MQ * SB;
        // This warp's rows' sums of la, from the chunk's cumulative sums (lane k holds rows 2k, 2k + 1).
        const float2 l2 = *reinterpret_cast<const float2*>(lav + (i & 1) * MQ + 2 * lane);
        float last;
        const float run = warp_cumsum2(l2.x, l2.y, last), prev = run - l2.y;
        const float ra1 = __shfl_sync(0xffffffffu, run, ra >> 1), ra0 = __shfl_sync(0xffffffffu, prev, ra >> 1);
        const float rb1 = __shfl_sync(0xffffffffu, run, rb >> 1), rb0 = __shfl_sync(0xffffffffu, prev, rb >> 1);
        const float ca = ra & 1 ? ra1 : ra0, cbv = rb & 1 ? rb1 : rb0;
        float ya[YT][4];
        c_state<YT>(ya, cm, ss, SB, warp * 16);
        const float ea = __expf(pfx[i] + ca), eb = __expf(pfx[i] + cbv);
#pragma unroll
        for (int t = 0; t < YT; ++t) { // each element of the tile this thread's alone
            const int p = t * 8 + 2 * tq;
            const float2 u = ld2f(ym, ra * SY + p), v = ld2f(ym, rb * SY + p);
            st2(ym, ra * SY + p, u.x + ea * ya[t][0], u.y + ea * ya[t][1]);
            st2(ym, rb * SY + p, v.x + eb * ya[t][2], v.y + eb * ya[t][3]);
        }
        __syncthreads();
        bf* yc = y + (((long)b * L + (long)c * MQ) * H + h) * P;
        for (int e = threadIdx.x; e < MQ * (P / 8); e += 128) {
            const int r = e / (P / 8), k = 8 * (e % (P / 8));
            if (r < nq) *reinterpret_cast<uint4*>(yc + (long)r * H * P + k) = *reinterpret_cast<const uint4*>(ym + r * SY + k);
        }
    }
    cp_wait<0>();
}

// ssd_scan_walk_mma{PT}: the y-only op's forward in one kernel (scan_walk) after ssd_chunk_cb_mma.
#define SCAN_WALK(PT, OK)                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 1) ssd_scan_walk_mma##PT(const T* xbc, const float* cb, const float* dt, const float* la, \
                                                                               bf* y, const float* D, int L, int H, int HPG, int ROW,       \
                                                                               int X_OFF, int B_OFF, int C_OFF, int NC, int CPS, float* sfin, \
                                                                               float* pre) {                                                \
        if constexpr (OK && IO_T) scan_walk<PT>(xbc, cb, dt, la, y, D, L, H, HPG, ROW, X_OFF, B_OFF, C_OFF, NC, CPS, sfin, pre);              \
    }
SCAN_WALK(64, P % 64 == 0 && POW2_N && N >= 16)
SCAN_WALK(32, P % 32 == 0 && POW2_N && N >= 16)
SCAN_WALK(16, POW2_N && N >= 32)

// Grid (NC, H/HB, Bt), 128 threads. As ssd_chunk_dstate, for the HB heads h0.. of one group (HB divides HPG),
// by pn_heads: v = dy, u = C, w_i = exp(cs_i).
extern "C" __global__ void PN_BOUNDS ssd_chunk_dstate_mma(const T* xbc, const float* la, const YT* dy, CT* dstates,
                                                                       int L, int H, int HPG, int ROW, int C_OFF, int NC, int HB) {
    constexpr int SN2 = N + PADK;
    extern __shared__ float sm[];
    float* cs = sm;                                   // HB × MQ
    float* w = cs + HB * MQ;                          // HB × MQ
    bf* um = reinterpret_cast<bf*>(w + HB * MQ);      // MQ × SN2: C [i][n]
    bf* vs = um + MQ * SN2;                           // 2 × MQ × SP2: dy [i][p]
    const int c = blockIdx.x, h0 = blockIdx.y * HB, b = blockIdx.z, g = h0 / HPG;
    const int t0 = c * MQ, nq = min(MQ, L - t0);
    const long r0 = (long)b * L + t0;
    chunk_cumsum<MQ>(la, r0 * H + h0, H, nq, cs, HB);
    for (int e = threadIdx.x; e < HB * MQ; e += blockDim.x) w[e] = __expf(cs[e]);
    pn_heads(xbc + r0 * ROW + C_OFF + g * N, ROW, dy + (r0 * H + h0) * P, (long)H * P, nq, w, dstates + (((long)b * NC + c) * H + h0) * (P * N), HB, um, vs);
}

// Grid (NC, H/HB, Bt), 128 threads: warp w computes rows 16w..16w+15 of the chunk. As ssd_chunk_scan, for the
// HB heads h0.. of one group (HB divides HPG): C and B loaded and C·Bᵀ computed once for them (kept in
// registers). B is needed only for C·Bᵀ, so its tile then holds each head's S_in in turn: head k + 1's x is
// issued when head k starts (two x buffers), its S_in once every warp has done C·S_inᵀ of head k (it flies
// during head k's M·X). C·S_inᵀ is accumulated first, scaled by exp(cs_i), then M·X added to it. 55 KB of
// shared memory at p = 64, n = 128 and at most 128 registers: four blocks per multiprocessor (three when
// S_in had its own two buffers and C·S_inᵀ its own accumulator: 71 KB, 166 registers; 9% slower).
#if P <= 64
#define SCAN_BOUNDS __launch_bounds__(128, 4)
#else
#define SCAN_BOUNDS __launch_bounds__(128) // at p = 128 the accumulators alone take 64 registers
#endif
extern "C" __global__ void SCAN_BOUNDS ssd_chunk_scan_mma(const T* xbc, const float* dt, const float* la, const ST* states, YT* y, int L,
                                                          int H, int HPG, int ROW, int X_OFF, int B_OFF, int C_OFF, int NC,
                                                          const float* D, int HB) {
    constexpr int SN2 = N + PADK, SP2 = P + PADK, R1 = (MQ > P ? MQ : P) * SN2;
    extern __shared__ float sm[];
    float* cs = sm;                                   // HB × MQ
    float* dts = cs + HB * MQ;                        // HB × MQ
    bf* cm = reinterpret_cast<bf*>(dts + HB * MQ);    // MQ × SN2: C [i][n]
    bf* bm = cm + MQ * SN2;                           // max(MQ, P) × SN2: B [j][n], then S_in [p][n]
    bf* xs = bm + R1;                                 // 2 × MQ × SP2: x [j][p]
    const int c = blockIdx.x, h0 = blockIdx.y * HB, b = blockIdx.z, g = h0 / HPG;
    const int t0 = c * MQ, nq = min(MQ, L - t0);
    const long r0 = (long)b * L + t0;
    auto issue_x = [&](int k) { cp_tile<MQ, P>(xbc + r0 * ROW + X_OFF + (h0 + k) * P, ROW, nq, xs + (k & 1) * MQ * SP2, SP2); };
    auto issue_s = [&](int k) { cp_tile<P, N>(states + (((long)b * NC + c) * H + h0 + k) * (P * N), N, P, bm, SN2); };
    cp_tile<MQ, N>(xbc + r0 * ROW + C_OFF + g * N, ROW, nq, cm, SN2);
    cp_tile<MQ, N>(xbc + r0 * ROW + B_OFF + g * N, ROW, nq, bm, SN2);
    issue_x(0);
    cp_commit();
    float dtv[8];
    rows_of_heads<MQ>(dt, r0 * H + h0, H, nq, HB, dtv);
    chunk_cumsum<MQ>(la, r0 * H + h0, H, nq, cs, HB);
    if (threadIdx.x < MQ)
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (k < HB) dts[k * MQ + threadIdx.x] = dtv[k];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const int i0 = warp * 16, ra = i0 + gq, rb = ra + 8;
    const int jt_end = 2 * (warp + 1); // n8 tiles of j that reach the causal triangle of these rows
    float cb[MQ / 8][4];
    cp_wait<0>();
    __syncthreads();
    zero<MQ / 8>(cb);
    strip_mma<MQ / 8, N, 2>(cb, cm, SN2, i0, bm, SN2, 0, jt_end); // C·Bᵀ, the causal tiles, for every head
    __syncthreads();                                                // B's tile is free: S_in of head 0
    issue_s(0);
    cp_commit();
    for (int k = 0; k < HB; ++k) {
        const int h = h0 + k;
        const bf* xk = xs + (k & 1) * MQ * SP2;
        const float* csk = cs + k * MQ;
        const float* dtk = dts + k * MQ;
        cp_wait<0>(); // head k's S_in and x
        __syncthreads(); // ... seen by every thread; head k − 1 done, its x buffer free for head k + 1's
        if (k + 1 < HB) {
            issue_x(k + 1);
            cp_commit();
        }
        float acc[P / 8][4];
        zero<P / 8>(acc);
        strip_mma<P / 8, N, 2>(acc, cm, SN2, i0, bm, SN2); // C·S_inᵀ
        __syncthreads();                                 // S_in read by every warp: head k + 1's may come
        if (k + 1 < HB) {
            issue_s(k + 1);
            cp_commit();
        }
        const float csa = csk[ra], csb = csk[rb], ea = __expf(csa), eb = __expf(csb);
#pragma unroll
        for (int pt = 0; pt < P / 8; ++pt) acc[pt][0] *= ea, acc[pt][1] *= ea, acc[pt][2] *= eb, acc[pt][3] *= eb;
        // M = C·Bᵀ ∘ exp(cs_i − cs_j)·dt_j (j ≤ i), turned into A fragments in registers; then M·X.
#pragma unroll
        for (int kt = 0; kt < MQ / 16; ++kt)
            if (kt <= warp)
                causal_mx<P / 8, SP2, false, false>(acc, kt, ra, rb, csa, csb, csk, dtk, [&](int s) {
                    const float* v = cb[2 * kt + s];
                    return make_float4(v[0], v[1], v[2], v[3]);
                }, xk, 0);
#pragma unroll
        for (int pt = 0; pt < P / 8; ++pt) {
            const int p = pt * 8 + 2 * tq;
            const float d0 = D[h * P + p], d1 = D[h * P + p + 1];
            if (ra < nq) st2(y, ((r0 + ra) * H + h) * P + p, acc[pt][0] + d0 * ld(xk, ra * SP2 + p), acc[pt][1] + d1 * ld(xk, ra * SP2 + p + 1));
            if (rb < nq) st2(y, ((r0 + rb) * H + h) * P + p, acc[pt][2] + d0 * ld(xk, rb * SP2 + p), acc[pt][3] + d1 * ld(xk, rb * SP2 + p + 1));
        }
    }
}

// Sum over the 4 threads of a quad (the threads holding one accumulator row).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

// Two adjacent gradient elements of B or C (k: 0..N−1 for B, N..2N−1 for C), summed over a block's heads, at one
// row: into the partials part (rows, HS, 2N) at slot hs when given (summed by ssd_reduce_heads), else into dxbc:
// stored in the y-only op (IO_T: the block holds every head of its group), added otherwise.
__device__ __forceinline__ void bc_grad(YT* dxbc, YT* part, long row, int ROW, int col, int HS, int hs, int k, float v0, float v1) {
    if (part) {
        st2(part, (row * HS + hs) * (2 * N) + k, v0, v1);
    } else {
#if IO_T
        st2(dxbc, row * ROW + col, v0, v1);
#else
        atomicAdd(dxbc + row * ROW + col, v0);
        atomicAdd(dxbc + row * ROW + col + 1, v1);
#endif
    }
}

// dxbc's B and C columns = the per-head partials summed over the heads of each group.
extern "C" __global__ void ssd_reduce_heads(const YT* part, YT* dxbc, long rows, int H, int HPG, int ROW, int B_OFF, int C_OFF) {
    const int G = H / HPG;
    const long total = rows * G * (2 * N);
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        const int k = e % (2 * N), gg = (e / (2 * N)) % G;
        const long row = e / (2 * N * G);
        float sum = 0.f;
        for (int hh = gg * HPG; hh < (gg + 1) * HPG; ++hh) sum += ld1(part, (row * H + hh) * (2 * N) + k);
        st1(dxbc, row * ROW + (k < N ? B_OFF + gg * N + k : C_OFF + gg * N + k - N), sum);
    }
}

// One head's per-chunk vectors in chunk_bwd_heads (a slot of its ring): cs (cumulative la), dts (dt), wl
// (exp(cs_last − cs_j)), dcs, ddts, us (the gradient terms gathered over the head's products), dds (dD).
struct BwdSlot {
    float *cs, *dts, *wl, *dcs, *ddts, *us, *dds;
    __device__ BwdSlot(float* f) : cs(f), dts(f + MQ), wl(f + 2 * MQ), dcs(f + 3 * MQ), ddts(f + 4 * MQ), us(f + 5 * MQ), dds(f + 6 * MQ) {}
    static constexpr int FLOATS = 6 * MQ + P;
    // By one warp: the head's rows (la and dt at base + j·H, zero past nq), two per lane.
    __device__ void prep(const float* dt, const float* la, long base, int H, int nq) {
        const int lane = threadIdx.x & 31, j0 = 2 * lane, j1 = j0 + 1;
        const float l0 = j0 < nq ? la[base + (long)j0 * H] : 0.f, l1 = j1 < nq ? la[base + (long)j1 * H] : 0.f;
        const float d0 = j0 < nq ? dt[base + (long)j0 * H] : 0.f, d1 = j1 < nq ? dt[base + (long)j1 * H] : 0.f;
        float last;
        const float run = warp_cumsum2(l0, l1, last), c0 = run - l1;
        cs[j0] = c0;
        cs[j1] = run;
        dts[j0] = d0;
        dts[j1] = d1;
        wl[j0] = j0 < nq ? __expf(last - c0) : 0.f;
        wl[j1] = j1 < nq ? __expf(last - run) : 0.f;
        dcs[j0] = dcs[j1] = ddts[j0] = ddts[j1] = us[j0] = us[j1] = 0.f;
        for (int p = lane; p < P; p += 32) dds[p] = 0.f;
    }
    // By one warp, once every warp is done with the head: dD's chunk partial, dla and ddt.
    __device__ void finish(int nq, float dlast, float* dla, float* ddt, long base, int H, float* dD) const {
        for (int p = threadIdx.x & 31; p < P; p += 32) dD[p] = dds[p];
        chunk_dla_ddt(nq, dts, us, dcs, ddts, dlast, dla, ddt, base, H);
    }
};
static_assert(MQ == 64, "BwdSlot::prep: two rows per lane");

// Grid (H / HB, NC, Bt), 256 threads: as ssd_chunk_bwd, on tensor cores, for HB heads of one group per block
// (HB divides H / G). A chunk's B and C tiles are read once for its HB heads, and their gradients are summed
// over the heads in registers: written once per block (to dxbc, or to the partials `part` when HB < H / G, slot
// h / HB). Each head's x, dy, S_in and dL/dS_out arrive by cp.async into one of NB buffers: with NB = 2 the next
// head's while this one computes.
//
// Warps w and w + 4 share rows 16·rt..16·rt+15 (rt = w mod 4) of each chunk-sized product (rows i for dC, rows j
// for dB and dx): half hf = w / 4 takes the n8 column tiles 2u + hf of the causal products M and W, and the
// columns [hf, hf + 1)·N/2 of dC and dB, [hf, hf + 1)·P/2 of dx.
template <int NB>
__device__ __forceinline__ void chunk_bwd_heads(const T* xbc, const float* dt, const float* la, const ST* states, const ST* dstates,
                                                const float* dcsum, const YT* dy, YT* dxbc, float* ddt, float* dla, int L, int H,
                                                int HPG, int ROW, int X_OFF, int B_OFF, int C_OFF, int NC, YT* part, const float* D,
                                                float* dD, int HB) {
    constexpr int SN2 = N + PADK, SK = MQ + PADK, SP2 = P + PADK, NTH = 256;
    constexpr int NH = N / 16, PH = P / 16; // n8 tiles of a half of dC / dB and of dx
    constexpr int BUF = 2 * P * SN2 + 2 * MQ * SP2; // bf16 per head buffer: dsl, st, xs, dys
    extern __shared__ float sm[];
    float* slots = sm;                                         // NB × BwdSlot::FLOATS
    bf* cm = reinterpret_cast<bf*>(slots + NB * BwdSlot::FLOATS); // MQ × SN2: C [i][n]
    bf* bm = cm + MQ * SN2;   // MQ × SN2: B [j][n]
    bf* mt = bm + MQ * SN2;   // MQ × SK: M [j][i]
    bf* wt = mt + MQ * SK;    // MQ × SK: W [j][i]
    bf* bufs = wt + MQ * SK;  // NB × BUF: dL/dS_out [p][n], S_in [p][n], x [j][p], dy [i][p]
    const int hs = blockIdx.x, c = blockIdx.y, b = blockIdx.z, h0 = hs * HB, g = h0 / HPG;
    const int t0 = c * MQ, nq = min(MQ, L - t0);
    const long r0 = (long)b * L + t0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const int rt = warp & 3, hf = warp >> 2, i0 = rt * 16, ra = i0 + gq, rb = ra + 8;
    const int n0 = hf * (N / 2), p0 = hf * (P / 2);
    // Head k's tiles into buffer k mod NB (one cp.async group; dy, when f32, loaded synchronously).
    auto issue = [&](int k) {
        bf* dsl = bufs + (k % NB) * BUF;
        bf *st = dsl + P * SN2, *xs = st + P * SN2, *dys = xs + MQ * SP2;
        const int h = h0 + k;
        const long so = (((long)b * NC + c) * H + h) * (P * N);
        cp_tile<MQ, P, NTH>(xbc + r0 * ROW + X_OFF + h * P, ROW, nq, xs, SP2);
        if constexpr (sizeof(YT) == 2) cp_tile<MQ, P, NTH>(reinterpret_cast<const bf*>(dy) + (r0 * H + h) * P, (long)H * P, nq, dys, SP2);
        cp_tile<P, N, NTH>(states + so, N, P, st, SN2);
        cp_tile<P, N, NTH>(dstates + so, N, P, dsl, SN2);
        cp_commit();
        if constexpr (sizeof(YT) != 2) {
            if (threadIdx.x < LT) load_tile<YT, MQ, P>(dy + (r0 * H + h) * P, (long)H * P, nq, nullptr, dys, SP2, nullptr, 0);
        }
    };
    auto slot = [&](int k) { return BwdSlot(slots + (k % NB) * BwdSlot::FLOATS); };
    auto finish = [&](int k) {
        const int h = h0 + k;
        slot(k).finish(nq, dcsum[((long)b * H + h) * NC + c], dla, ddt, r0 * H + h, H, dD + (((long)b * NC + c) * H + h) * P);
    };
    cp_tile<MQ, N, NTH>(xbc + r0 * ROW + C_OFF + g * N, ROW, nq, cm, SN2);
    cp_tile<MQ, N, NTH>(xbc + r0 * ROW + B_OFF + g * N, ROW, nq, bm, SN2);
    issue(0);
    if (NB > 1 && HB > 1) issue(1);
    if (warp == 0)
        for (int k = 0; k < NB && k < HB; ++k) slot(k).prep(dt, la, r0 * H + h0 + k, H, nq);
    // dC and dB at this warp's rows and columns, summed over the heads.
    float dc[NH][4], db[NH][4];
    zero<NH>(dc);
    zero<NH>(db);
    for (int k = 0; k < HB; ++k) {
        if (NB == 1 && k > 0) { // head k − 1 done: its buffer and slot are free
            __syncthreads();
            issue(k);
            if (warp == 0) {
                finish(k - 1);
                slot(k).prep(dt, la, r0 * H + h0 + k, H, nq);
            }
        }
        if (NB > 1 && k == 0 && HB > 1) cp_wait<1>();
        else cp_wait<0>();
        __syncthreads(); // head k's tiles and slot; with NB = 2, every warp done with head k − 1
        if (NB > 1 && k > 0) {
            if (k + 1 < HB) issue(k + 1); // into head k − 1's buffer
            if (warp == 0) {
                finish(k - 1);
                if (k + 1 < HB) slot(k + 1).prep(dt, la, r0 * H + h0 + k + 1, H, nq); // head k − 1's slot
            }
        }
        const int h = h0 + k;
        const BwdSlot v = slot(k);
        const bf* dsl = bufs + (k % NB) * BUF;
        const bf *st = dsl + P * SN2, *xs = st + P * SN2, *dys = xs + MQ * SP2;
        {
            // C·Bᵀ and dy·xᵀ at this warp's rows and its n8 tiles jt = 2u + hf, u ≤ rt (the causal triangle).
            float cb[MQ / 16][4], dyx[MQ / 16][4];
            zero<MQ / 16>(cb);
            zero<MQ / 16>(dyx);
            strip_mma<MQ / 16, N, 2, false, 16>(cb, cm, SN2, i0, bm + hf * 8 * SN2, SN2, 0, rt + 1);
            strip_mma<MQ / 16, P, 2, false, 16>(dyx, dys, SP2, i0, xs + hf * 8 * SP2, SP2, 0, rt + 1);
            // M = CB∘E∘dt and W = E∘dt∘(dy·x) over the causal triangle (E = exp(cs_i − cs_j)); the
            // diagonal terms of dcs and ddt.
            const float csa = v.cs[ra], csb = v.cs[rb];
            float rowa = 0.f, rowb = 0.f;
#pragma unroll
            for (int u = 0; u < MQ / 16; ++u) {
                const int jt = 2 * u + hf;
                float colv[2] = {0.f, 0.f}, cold[2] = {0.f, 0.f}; // columns j = jt·8 + 2tq + {0, 1}
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int r = q < 2 ? ra : rb, j = jt * 8 + 2 * tq + (q & 1);
                    float m = 0.f, w = 0.f;
                    if (u <= rt && j <= r && r < nq) {
                        const float ex = __expf((q < 2 ? csa : csb) - v.cs[j]);
                        m = cb[u][q] * ex * v.dts[j];
                        w = ex * v.dts[j] * dyx[u][q];
                        const float e = m * dyx[u][q];
                        if (q < 2) rowa += e; else rowb += e;
                        colv[q & 1] -= e;
                        cold[q & 1] += cb[u][q] * ex * dyx[u][q];
                    }
                    if (u <= rt) {
                        mt[j * SK + r] = to_bf(m);
                        wt[j * SK + r] = to_bf(w);
                    }
                }
                if (u <= rt) {
                    // Sum the columns over the warp's 16 rows (the 8 row groups), one atomic per column.
#pragma unroll
                    for (int o = 4; o < 32; o <<= 1)
#pragma unroll
                        for (int z = 0; z < 2; ++z) {
                            colv[z] += __shfl_xor_sync(0xffffffffu, colv[z], o);
                            cold[z] += __shfl_xor_sync(0xffffffffu, cold[z], o);
                        }
                    if (gq == 0)
#pragma unroll
                        for (int z = 0; z < 2; ++z) {
                            atomicAdd(&v.dcs[jt * 8 + 2 * tq + z], colv[z]);
                            atomicAdd(&v.ddts[jt * 8 + 2 * tq + z], cold[z]);
                        }
                }
            }
            rowa = quad_sum(rowa);
            rowb = quad_sum(rowb);
            if (tq == 0) {
                atomicAdd(&v.dcs[ra], rowa);
                atomicAdd(&v.dcs[rb], rowb);
            }
        }
        __syncthreads(); // mt and wt complete
        // dC_i += Σ_j W_ij B_j + exp(cs_i)·dy_i S_in; the second term's row dot with C_i is dcs_i's.
        {
#pragma unroll
            for (int kt = 0; kt < MQ / 16; ++kt)
                if (kt <= rt) { // W_ij ≠ 0 for j ≤ i only
                    unsigned wf[4];
                    frag_a_t(wf, wt, SK, i0, kt * 16);
#pragma unroll
                    for (int nt = 0; nt < NH; ++nt) {
                        unsigned bb[2];
                        frag_b_t(bb, bm + n0, SN2, nt * 8, kt * 16);
                        mma16816(dc[nt], wf, bb);
                    }
                }
            float off[NH][4];
            zero<NH>(off);
            strip_mma<NH, P, 2, true>(off, dys, SP2, i0, st + n0, SN2);
            const float ea = __expf(v.cs[ra]), eb = __expf(v.cs[rb]);
            float rowa = 0.f, rowb = 0.f;
#pragma unroll
            for (int nt = 0; nt < NH; ++nt) {
                const int n = n0 + nt * 8 + 2 * tq;
                rowa += ea * (off[nt][0] * ld(cm, ra * SN2 + n) + off[nt][1] * ld(cm, ra * SN2 + n + 1));
                rowb += eb * (off[nt][2] * ld(cm, rb * SN2 + n) + off[nt][3] * ld(cm, rb * SN2 + n + 1));
                dc[nt][0] += ea * off[nt][0];
                dc[nt][1] += ea * off[nt][1];
                dc[nt][2] += eb * off[nt][2];
                dc[nt][3] += eb * off[nt][3];
            }
            rowa = quad_sum(rowa);
            rowb = quad_sum(rowb);
            if (tq == 0) {
                atomicAdd(&v.dcs[ra], rowa);
                atomicAdd(&v.dcs[rb], rowb);
            }
        }
        // Rows j of this warp: ja, jb; sc = exp(cs_last − cs_j)·dt_j scales the state terms.
        const int ja = ra, jb = rb;
        const float sca = v.wl[ja] * v.dts[ja], scb = v.wl[jb] * v.dts[jb];
        // dB_j += Σ_i W_ij C_i + sc_j·x_j dSL; the second term's row dot with B_j gives us_j (without dt_j).
        {
            strip_mma<NH, MQ, MQ / 16, true>(db, wt, SK, i0, cm + n0, SN2, rt); // W_ij ≠ 0 for i ≥ j only
            float sx[NH][4];
            zero<NH>(sx);
            strip_mma<NH, P, 2, true>(sx, xs, SP2, i0, dsl + n0, SN2);
            // (The same steps as dC's state term above: as one shared function, measured 2% slower end to end at
            // d_state 128.)
            float rowa = 0.f, rowb = 0.f;
#pragma unroll
            for (int nt = 0; nt < NH; ++nt) {
                const int n = n0 + nt * 8 + 2 * tq;
                rowa += v.wl[ja] * (sx[nt][0] * ld(bm, ja * SN2 + n) + sx[nt][1] * ld(bm, ja * SN2 + n + 1));
                rowb += v.wl[jb] * (sx[nt][2] * ld(bm, jb * SN2 + n) + sx[nt][3] * ld(bm, jb * SN2 + n + 1));
                db[nt][0] += sca * sx[nt][0];
                db[nt][1] += sca * sx[nt][1];
                db[nt][2] += scb * sx[nt][2];
                db[nt][3] += scb * sx[nt][3];
            }
            rowa = quad_sum(rowa);
            rowb = quad_sum(rowb);
            if (tq == 0) { // the two halves' columns
                atomicAdd(&v.us[ja], rowa);
                atomicAdd(&v.us[jb], rowb);
            }
        }
        // dx_j = Σ_i M_ij dy_i + sc_j·dSL B_j.
        {
            float acc[PH][4], sx[PH][4];
            zero<PH>(acc);
            zero<PH>(sx);
            strip_mma<PH, MQ, MQ / 16, true>(acc, mt, SK, i0, dys + p0, SP2, rt); // M_ij ≠ 0 for i ≥ j only
            strip_mma<PH, N, 2>(sx, bm, SN2, i0, dsl + p0 * SN2, SN2);
#pragma unroll
            for (int pt = 0; pt < PH; ++pt) {
                const int p = p0 + pt * 8 + 2 * tq;
                const float d0 = D[h * P + p], d1 = D[h * P + p + 1];
                // The skip y += D·x, with dy in f32 from memory (rows past the chunk's end read as zero).
                const float2 dya = ja < nq ? ld2f(dy, ((r0 + ja) * H + h) * P + p) : make_float2(0.f, 0.f);
                const float2 dyb = jb < nq ? ld2f(dy, ((r0 + jb) * H + h) * P + p) : make_float2(0.f, 0.f);
                if (ja < nq) st2(dxbc, (r0 + ja) * ROW + X_OFF + h * P + p, acc[pt][0] + sca * sx[pt][0] + d0 * dya.x, acc[pt][1] + sca * sx[pt][1] + d1 * dya.y);
                if (jb < nq) st2(dxbc, (r0 + jb) * ROW + X_OFF + h * P + p, acc[pt][2] + scb * sx[pt][2] + d0 * dyb.x, acc[pt][3] + scb * sx[pt][3] + d1 * dyb.y);
                // dD: this warp's rows, summed over the 8 row groups of the warp.
                float s0 = ld(xs, ja * SP2 + p) * dya.x + ld(xs, jb * SP2 + p) * dyb.x;
                float s1 = ld(xs, ja * SP2 + p + 1) * dya.y + ld(xs, jb * SP2 + p + 1) * dyb.y;
#pragma unroll
                for (int o = 4; o < 32; o <<= 1) {
                    s0 += __shfl_xor_sync(0xffffffffu, s0, o);
                    s1 += __shfl_xor_sync(0xffffffffu, s1, o);
                }
                if (gq == 0) {
                    atomicAdd(&v.dds[p], s0);
                    atomicAdd(&v.dds[p + 1], s1);
                }
            }
        }
    }
    __syncthreads();
    if (warp == 0) finish(HB - 1);
    // The B and C gradients of the block's heads.
    const int HS = H / HB;
#pragma unroll
    for (int nt = 0; nt < NH; ++nt) {
        const int n = n0 + nt * 8 + 2 * tq;
        if (ra < nq) {
            bc_grad(dxbc, part, r0 + ra, ROW, C_OFF + g * N + n, HS, hs, N + n, dc[nt][0], dc[nt][1]);
            bc_grad(dxbc, part, r0 + ra, ROW, B_OFF + g * N + n, HS, hs, n, db[nt][0], db[nt][1]);
        }
        if (rb < nq) {
            bc_grad(dxbc, part, r0 + rb, ROW, C_OFF + g * N + n, HS, hs, N + n, dc[nt][2], dc[nt][3]);
            bc_grad(dxbc, part, r0 + rb, ROW, B_OFF + g * N + n, HS, hs, n, db[nt][2], db[nt][3]);
        }
    }
}

// Blocks per multiprocessor: two buffers at d_state ≤ 64 and one at 128 fit two blocks' shared memory, for which
// registers are capped at 128 (spilling a little at d_state 128); two buffers at 128 take one block.
#define CHUNK_BWD(NAME, NB, MINB)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, MINB) NAME(const T* xbc, const float* dt, const float* la, const ST* states,     \
                                                                 const ST* dstates, const float* dcsum, const YT* dy, YT* dxbc,        \
                                                                 float* ddt, float* dla, int L, int H, int HPG, int ROW, int X_OFF,    \
                                                                 int B_OFF, int C_OFF, int NC, YT* part, const float* D, float* dD,    \
                                                                 int HB) {                                                            \
        chunk_bwd_heads<NB>(xbc, dt, la, states, dstates, dcsum, dy, dxbc, ddt, dla, L, H, HPG, ROW, X_OFF, B_OFF, C_OFF, NC, part, D,   \
                            dD, HB);                                                                                                 \
    }
CHUNK_BWD(ssd_chunk_bwd_mma, 2, (N <= 64 ? 2 : 1))
CHUNK_BWD(ssd_chunk_bwd_mma1, 1, 2)

// dD[h·P + p] = Σ over the Bt·NC chunk partials part[(bc·H + h)·P + p]. 1024 threads per block of 32
// columns: warp w sums partials w, w + 32, … (a coalesced row of 32 columns per load, four in flight), then
// the 32 warps' sums are added in shared memory.
extern "C" __global__ void __launch_bounds__(1024) ssd_reduce_dd(const float* part, float* dD, int BNC, int HP) {
    __shared__ float sums[32][33];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, e = blockIdx.x * 32 + lane;
    float s = 0.f;
    if (e < HP) {
#pragma unroll 4
        for (int k = w; k < BNC; k += 32) s += part[(long)k * HP + e];
    }
    sums[w][lane] = s;
    __syncthreads();
    if (w == 0) {
        float t = 0.f;
        for (int u = 0; u < 32; ++u) t += sums[u][lane];
        if (e < HP) dD[e] = t;
    }
}
#endif
