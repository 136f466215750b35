// (Gated) RMSNorm in f32, forward and backward, per row of D channels normalised in groups of GS:
//   before = 0 (Mamba-2): u = x ⊙ SiLU(z) (or u = x ungated);  y = u·rsqrt(mean_group(u²) + eps)·w
//   before = 1 (Hydra):   u = x;  y = u·rsqrt(mean_group(u²) + eps)·w ⊙ SiLU(z)
// Blocks of NT threads; thread j of a row owns channels j, j+NT, … (so per-channel sums need no atomics).

#define NT 256

__device__ __forceinline__ float sigm(float v) { return 1.f / (1.f + expf(-v)); }

// Adds v into acc[j / GS] for channel j: one atomic per warp when a warp's 32 channels share a group.
__device__ __forceinline__ void group_add(float* acc, int j, int GS, float v) {
    if (GS % 32 == 0) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if ((threadIdx.x & 31) == 0) atomicAdd(&acc[j / GS], v);
    } else {
        atomicAdd(&acc[j / GS], v);
    }
}

// The normalised input u of channel j.
__device__ __forceinline__ float norm_input(const float* xr, const float* zr, int j, int gated, int before) {
    return (gated && !before) ? xr[j] * zr[j] * sigm(zr[j]) : xr[j];
}

// Σ u² per group of the row into ss (D/GS floats, zeroed here). Ends with a barrier.
__device__ __forceinline__ void group_squares(const float* xr, const float* zr, int D, int GS, int gated, int before, float* ss) {
    for (int g = threadIdx.x; g < D / GS; g += NT) ss[g] = 0.f;
    __syncthreads();
    // Every thread runs the same number of iterations (the shuffles in group_add need full warps).
    for (int j0 = 0; j0 < D; j0 += NT) {
        const int j = j0 + threadIdx.x;
        const float u = j < D ? norm_input(xr, zr, j, gated, before) : 0.f;
        group_add(ss, j < D ? j : D - 1, GS, u * u);
    }
    __syncthreads();
}

// Grid: one block per row.
extern "C" __global__ void __launch_bounds__(NT) norm_fwd(const float* __restrict__ x, const float* __restrict__ z,
                                                           const float* __restrict__ w, float* __restrict__ y, int D,
                                                           int GS, float eps, int gated, int before) {
    extern __shared__ float ss[];
    const long row = blockIdx.x;
    const float *xr = x + row * D, *zr = z + row * D;
    group_squares(xr, zr, D, GS, gated, before, ss);
    for (int j = threadIdx.x; j < D; j += NT) {
        const float r = rsqrtf(ss[j / GS] / GS + eps);
        float v = norm_input(xr, zr, j, gated, before) * r * w[j];
        if (gated && before) v *= zr[j] * sigm(zr[j]);
        y[row * D + j] = v;
    }
}

// Grid: one block per RPB rows. Writes dx and dz (zeros ungated), adds the block's dw into dw.
extern "C" __global__ void __launch_bounds__(NT) norm_bwd(const float* __restrict__ x, const float* __restrict__ z,
                                                           const float* __restrict__ w, const float* __restrict__ dy,
                                                           float* __restrict__ dx, float* __restrict__ dz,
                                                           float* __restrict__ dw, long rows, int D, int GS, float eps,
                                                           int gated, int before, int RPB) {
    extern __shared__ float sh[];
    float *dwacc = sh, *ss = sh + D, *gu = ss + D / GS;
    for (int j = threadIdx.x; j < D; j += NT) dwacc[j] = 0.f;
    const long r0 = (long)blockIdx.x * RPB, r1 = min(r0 + RPB, rows);
    for (long row = r0; row < r1; ++row) {
        const float *xr = x + row * D, *zr = z + row * D, *dyr = dy + row * D;
        for (int g = threadIdx.x; g < D / GS; g += NT) gu[g] = 0.f;
        group_squares(xr, zr, D, GS, gated, before, ss);
        // g = ∂L/∂(u·r) = dy·w (·SiLU(z) when the gate comes after): dw += dy·gate·u·r, gu = Σ dy·gate·w·u.
        for (int j0 = 0; j0 < D; j0 += NT) {
            const int j = j0 + threadIdx.x;
            float v = 0.f;
            if (j < D) {
                const float u = norm_input(xr, zr, j, gated, before), r = rsqrtf(ss[j / GS] / GS + eps);
                const float gate = (gated && before) ? zr[j] * sigm(zr[j]) : 1.f;
                dwacc[j] += dyr[j] * gate * u * r;
                v = dyr[j] * gate * w[j] * u;
            }
            group_add(gu, j < D ? j : D - 1, GS, v);
        }
        __syncthreads();
        for (int j = threadIdx.x; j < D; j += NT) {
            const float u = norm_input(xr, zr, j, gated, before), r = rsqrtf(ss[j / GS] / GS + eps);
            const float c = r * r * r * gu[j / GS] / GS;
            const float s = gated ? sigm(zr[j]) : 0.f, zj = gated ? zr[j] : 0.f;
            const float gate = (gated && before) ? zj * s : 1.f;
            const float du = r * dyr[j] * gate * w[j] - c * u;
            const float dsilu = s * (1.f + zj * (1.f - s));
            float gx = du, gz = 0.f;
            if (gated && !before) {
                gx = du * zj * s;
                gz = du * xr[j] * dsilu;
            } else if (gated) {
                gz = dyr[j] * xr[j] * r * w[j] * dsilu;
            }
            dx[row * D + j] = gx;
            dz[row * D + j] = gz;
        }
        __syncthreads();
    }
    for (int j = threadIdx.x; j < D; j += NT) atomicAdd(&dw[j], dwacc[j]);
}
