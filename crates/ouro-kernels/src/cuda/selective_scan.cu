// Mamba-1 selective scan (S6) in f32, forward and backward, on the packed layouts of selective_scan.rs:
//   ud (Bt, L, 2, D) = [u; Δ]   ah (Bt+1, D, N) = [A; h0]   bc (Bt, L, G, 2N) = [B; C]   seg (Bt, L) or null
// h_t = exp(Δ_t·A) ⊙ h_{t−1} + Δ_t·u_t·B_t,  y_t = ⟨h_t, C_t⟩; h resets to 0 where seg changes.
// Compiled by NVRTC with -DN=d_state -DNL=lanes per channel (a power of two ≤ 32) -DTC=checkpoint interval.
// Each channel is scanned by NL lanes of one warp, lane j holding the states n = j + k·NL (k < KS): the
// sums over n are shuffles within those lanes. Blocks of NT threads hold CPB channels; grid (⌈D/CPB⌉, Bt).

#define NT 128
#define CPB (NT / NL)
#define KS ((N + NL - 1) / NL)

// Σ over the NL lanes of a channel.
__device__ __forceinline__ float lane_sum(float v) {
#pragma unroll
    for (int o = NL / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Σ over the channels of a warp, per lane position (lanes j, j+NL, j+2NL, …).
__device__ __forceinline__ float warp_channel_sum(float v) {
#pragma unroll
    for (int o = NL; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// This thread's channel (clamped into range: threads past D compute on channel D−1 and write nothing).
struct Lane {
    int b, ch, lane, gi;
    bool active;
};

__device__ __forceinline__ Lane lane_of(int D, int G) {
    Lane z;
    z.lane = threadIdx.x % NL;
    const int raw = blockIdx.x * CPB + threadIdx.x / NL;
    z.active = raw < D;
    z.ch = z.active ? raw : D - 1;
    z.b = blockIdx.y;
    z.gi = z.ch / (D / G);
    return z;
}

__device__ __forceinline__ bool reset_at(const unsigned* seg, long r, int t) {
    return seg != nullptr && t > 0 && seg[r] != seg[r - 1];
}

// One step of the recurrence for this thread's states; returns its part of ⟨h_t, C_t⟩.
__device__ __forceinline__ float step(float* h, const float* a, float u, float dl, const float* bt, int lane) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < KS; ++k) {
        const int n = lane + k * NL;
        if (n < N) {
            h[k] = expf(dl * a[k]) * h[k] + dl * u * bt[n];
            acc += h[k] * bt[N + n];
        }
    }
    return acc;
}

__device__ __forceinline__ void load_states(float* h, const float* src, int lane) {
#pragma unroll
    for (int k = 0; k < KS; ++k) {
        const int n = lane + k * NL;
        h[k] = n < N ? src[n] : 0.f;
    }
}

// y (Bt, L, D) and the final states hf (Bt, D, N).
extern "C" __global__ void __launch_bounds__(NT) sscan_fwd(const float* __restrict__ ud, const float* __restrict__ ah,
                                                            const float* __restrict__ bc, const unsigned* __restrict__ seg,
                                                            float* __restrict__ y, float* __restrict__ hf, int L, int D, int G) {
    const Lane z = lane_of(D, G);
    float a[KS], h[KS];
    load_states(a, ah + (long)z.ch * N, z.lane);
    load_states(h, ah + ((long)(z.b + 1) * D + z.ch) * N, z.lane);
    for (int t = 0; t < L; ++t) {
        const long r = (long)z.b * L + t;
        if (reset_at(seg, r, t))
            for (int k = 0; k < KS; ++k) h[k] = 0.f;
        const float u = ud[r * 2 * D + z.ch], dl = ud[r * 2 * D + D + z.ch];
        const float acc = lane_sum(step(h, a, u, dl, bc + (r * G + z.gi) * 2 * N, z.lane));
        if (z.active && z.lane == 0) y[r * D + z.ch] = acc;
    }
    if (z.active)
        for (int k = 0; k < KS; ++k) {
            const int n = z.lane + k * NL;
            if (n < N) hf[((long)z.b * D + z.ch) * N + n] = h[k];
        }
}

// Backward. dy (Bt, L, D), dhf (Bt, D, N). Writes dud (Bt, L, 2, D) = [du; dΔ] and dh0 (Bt, D, N); adds
// into dbc (Bt, L, G, 2N) and dA (D, N) (zeroed by the caller). ckpt (Bt, ⌈L/TC⌉, D, N) is scratch: the
// state entering every TC-step segment, from a first forward pass; each segment's states are then
// recomputed from it and the adjoint runs backwards through the segment:
//   dh += dy_t·C_t;  dC_t += dy_t·h_t;  dB_t += dh·Δ·u;  dΔ = Σ_n dh·(A·exp(ΔA)·h_{t−1} + u·B_t);
//   du = Δ·Σ_n dh·B_t;  dA += dh·Δ·exp(ΔA)·h_{t−1};  dh ← exp(ΔA)·dh.
// When all of a block's channels share one group, dB and dC are summed over the block in shared memory
// (sbc, TC·2N) and added to dbc once per segment; otherwise each thread adds its own.
extern "C" __global__ void __launch_bounds__(NT) sscan_bwd(const float* __restrict__ ud, const float* __restrict__ ah,
                                                            const float* __restrict__ bc, const unsigned* __restrict__ seg,
                                                            const float* __restrict__ dy, const float* __restrict__ dhf,
                                                            float* __restrict__ ckpt, float* __restrict__ dud,
                                                            float* __restrict__ dbc, float* __restrict__ da,
                                                            float* __restrict__ dh0, int L, int D, int G) {
    extern __shared__ float sbc[];
    const Lane z = lane_of(D, G);
    const int cpg = D / G, nseg = (L + TC - 1) / TC;
    const int first = blockIdx.x * CPB, last = min(first + CPB, D) - 1;
    const bool block_sums = first / cpg == last / cpg;
    for (int i = threadIdx.x; i < TC * 2 * N; i += NT) sbc[i] = 0.f;
    __syncthreads();

    float a[KS], h[KS];
    load_states(a, ah + (long)z.ch * N, z.lane);
    load_states(h, ah + ((long)(z.b + 1) * D + z.ch) * N, z.lane);
    const long ck = (long)z.b * nseg;
    for (int t = 0; t < L; ++t) {
        const long r = (long)z.b * L + t;
        if (t % TC == 0)
            for (int k = 0; k < KS; ++k) {
                const int n = z.lane + k * NL;
                if (n < N) ckpt[((ck + t / TC) * D + z.ch) * N + n] = h[k];
            }
        if (reset_at(seg, r, t))
            for (int k = 0; k < KS; ++k) h[k] = 0.f;
        step(h, a, ud[r * 2 * D + z.ch], ud[r * 2 * D + D + z.ch], bc + (r * G + z.gi) * 2 * N, z.lane);
    }

    float dh[KS], dak[KS];
    if (dhf != nullptr && z.active) load_states(dh, dhf + ((long)z.b * D + z.ch) * N, z.lane);
    else
        for (int k = 0; k < KS; ++k) dh[k] = 0.f;
    for (int k = 0; k < KS; ++k) dak[k] = 0.f;
    float hs[TC][KS];  // the states h_t of the current segment
    for (int c = nseg - 1; c >= 0; --c) {
        const int t0 = c * TC, t1 = min(t0 + TC, L);
        float hin[KS];
        load_states(hin, ckpt + ((ck + c) * D + z.ch) * N, z.lane);
        for (int k = 0; k < KS; ++k) h[k] = hin[k];
        for (int t = t0; t < t1; ++t) {
            const long r = (long)z.b * L + t;
            if (reset_at(seg, r, t))
                for (int k = 0; k < KS; ++k) h[k] = 0.f;
            step(h, a, ud[r * 2 * D + z.ch], ud[r * 2 * D + D + z.ch], bc + (r * G + z.gi) * 2 * N, z.lane);
            for (int k = 0; k < KS; ++k) hs[t - t0][k] = h[k];
        }
        for (int t = t1 - 1; t >= t0; --t) {
            const long r = (long)z.b * L + t;
            const bool reset = reset_at(seg, r, t);
            const float u = ud[r * 2 * D + z.ch], dl = ud[r * 2 * D + D + z.ch];
            const float dyv = z.active ? dy[r * D + z.ch] : 0.f;
            const float* bt = bc + (r * G + z.gi) * 2 * N;
            float* dbt = dbc + (r * G + z.gi) * 2 * N;
            float sdd = 0.f, sdu = 0.f;
#pragma unroll
            for (int k = 0; k < KS; ++k) {
                const int n = z.lane + k * NL;
                const bool on = n < N;
                const float bn = on ? bt[n] : 0.f, cn = on ? bt[N + n] : 0.f;
                const float hprev = reset ? 0.f : (t > t0 ? hs[t - 1 - t0][k] : hin[k]);
                dh[k] += dyv * cn;
                const float dav = expf(dl * a[k]), dah = dav * hprev;
                sdd += dh[k] * (a[k] * dah + u * bn);
                sdu += dh[k] * bn;
                dak[k] += dh[k] * dl * dah;
                float gb = dh[k] * dl * u, gc = dyv * hs[t - t0][k];
                if (block_sums) {
                    gb = warp_channel_sum(gb);
                    gc = warp_channel_sum(gc);
                    if (threadIdx.x % 32 < NL && on) {
                        atomicAdd(&sbc[(t - t0) * 2 * N + n], gb);
                        atomicAdd(&sbc[(t - t0) * 2 * N + N + n], gc);
                    }
                } else if (z.active && on) {
                    atomicAdd(&dbt[n], gb);
                    atomicAdd(&dbt[N + n], gc);
                }
                dh[k] = reset ? 0.f : dh[k] * dav;
            }
            sdd = lane_sum(sdd);
            sdu = lane_sum(sdu);
            if (z.active && z.lane == 0) {
                dud[r * 2 * D + z.ch] = sdu * dl;
                dud[r * 2 * D + D + z.ch] = sdd;
            }
        }
        if (block_sums) {
            __syncthreads();
            const int gblock = first / cpg;
            for (int i = threadIdx.x; i < (t1 - t0) * 2 * N; i += NT) {
                const long r = (long)z.b * L + t0 + i / (2 * N);
                atomicAdd(&dbc[(r * G + gblock) * 2 * N + i % (2 * N)], sbc[i]);
                sbc[i] = 0.f;
            }
            __syncthreads();
        }
    }
    if (z.active)
        for (int k = 0; k < KS; ++k) {
            const int n = z.lane + k * NL;
            if (n < N) {
                dh0[((long)z.b * D + z.ch) * N + n] = dh[k];
                atomicAdd(&da[(long)z.ch * N + n], dak[k]);
            }
        }
}
