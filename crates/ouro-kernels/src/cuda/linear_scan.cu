// The linear recurrence h_t = a_t ⊙ h_{t−1} + x_t (the RG-LRU's scan) in f32, forward and backward, on the
// layouts of linear_scan.rs's op: x, a, y (Bt, L, W), h0 and the last state (Bt, W). A thread per channel of a
// row walks the time steps in order (backward: in reverse), reading U steps' inputs before the U dependent
// FMAs so that the loads overlap; neighbouring threads take neighbouring channels (coalesced).

#define U 8

// y = the states, hl = the last state.
extern "C" __global__ void linear_scan_fwd(const float* __restrict__ x, const float* __restrict__ a, const float* __restrict__ h0,
                                           float* __restrict__ y, float* __restrict__ hl, int Bt, int L, int W) {
    const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)Bt * W) return;
    const long b = i / W, c = i % W, base = b * L * W + c;
    float h = h0[i];
    int t = 0;
    for (; t + U <= L; t += U) {
        float xs[U], as[U];
#pragma unroll
        for (int u = 0; u < U; ++u) xs[u] = x[base + (long)(t + u) * W], as[u] = a[base + (long)(t + u) * W];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            h = fmaf(as[u], h, xs[u]);
            y[base + (long)(t + u) * W] = h;
        }
    }
    for (; t < L; ++t) {
        h = fmaf(a[base + (long)t * W], h, x[base + (long)t * W]);
        y[base + (long)t * W] = h;
    }
    hl[i] = h;
}

// From the states y, the gradients dy of y and dhl of the last state: g_t = dhl (t = L−1 only) + dy_t + a_{t+1}·g_{t+1};
// dx_t = g_t, da_t = g_t·h_{t−1} (h_{−1} = h0), dh0 = a_0·g_0.
extern "C" __global__ void linear_scan_bwd(const float* __restrict__ a, const float* __restrict__ h0, const float* __restrict__ y,
                                           const float* __restrict__ dy, const float* __restrict__ dhl, float* __restrict__ dx,
                                           float* __restrict__ da, float* __restrict__ dh0, int Bt, int L, int W) {
    const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)Bt * W) return;
    const long b = i / W, c = i % W, base = b * L * W + c;
    float g = dhl[i]; // a_{t+1}·g_{t+1} carried down, starting from the last state's gradient
    int t = L - 1;
    for (; t + 1 >= U; t -= U) { // steps t, t−1, …, t−U+1
        float dys[U], as[U], ps[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long o = base + (long)(t - u) * W;
            dys[u] = dy[o], as[u] = a[o], ps[u] = t - u > 0 ? y[o - W] : h0[i];
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long o = base + (long)(t - u) * W;
            const float gk = g + dys[u];
            dx[o] = gk;
            da[o] = gk * ps[u];
            g = as[u] * gk;
        }
    }
    for (; t >= 0; --t) {
        const long o = base + (long)t * W;
        const float gk = g + dy[o];
        dx[o] = gk;
        da[o] = gk * (t > 0 ? y[o - W] : h0[i]);
        g = a[o] * gk;
    }
    dh0[i] = g;
}
