//! CPU building blocks shared by the kernels: a branch-free `exp` the compiler can vectorise,
//! and a thin wrapper over the `gemm` crate for the small strided products inside chunks.

/// exp(x) in f32, accurate to ~2 ulp on [-87, 88], 0 below. Branch-free so loops over slices vectorise
/// (Cephes-style range reduction x = n·ln2 + r, degree-6 polynomial on |r| ≤ ln2/2).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest with the 1.5·2²³ trick (f32::round is a libm call that blocks vectorisation).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.5, 88.5);
    let n = (xc * LOG2E + MAGIC) - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let pow2 = f32::from_bits(((n as i32 + 127).max(0) as u32) << 23);
    let out = y * pow2;
    if x < -87.0 {
        0.0
    } else {
        out
    }
}

/// softplus with torch's threshold: x > 20 → x, else log1p(exp(x)).
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// A strided matrix view: element (i, j) at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// Row-major view of `s` starting at `off` with row stride `rs`.
    #[inline]
    pub fn rows(s: &[f32], off: usize, rs: usize) -> Self {
        debug_assert!(off <= s.len());
        Self { ptr: s[off..].as_ptr(), rs: rs as isize, cs: 1 }
    }
    /// The transpose of [`Mat::rows`].
    #[inline]
    pub fn rows_t(s: &[f32], off: usize, rs: usize) -> Self {
        Self::rows(s, off, rs).t()
    }
    #[inline]
    pub fn t(self) -> Self {
        Self { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
}

/// dst (m×n, row stride `dst_rs`, contiguous rows) = dst_scale · dst + scale · lhs (m×k) · rhs (k×n)
/// (dst is not read when `dst_scale` is 0).
///
/// Single-threaded: callers parallelise over independent (batch, head, chunk) work.
///
/// # Safety
/// All three views must address valid memory for the given sizes; `dst` must not alias `lhs`/`rhs`.
#[inline]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_scale: f32,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if dst_scale == 0.0 {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        } else if dst_scale != 1.0 {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).iter_mut().for_each(|v| *v *= dst_scale);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        dst_scale != 0.0,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        dst_scale,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// A raw pointer that may cross into rayon tasks which write disjoint regions of one buffer.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `off` elements further.
    #[inline]
    pub fn offset(&self, off: usize) -> SendPtr {
        SendPtr(self.0.wrapping_add(off))
    }
    /// # Safety
    /// The caller guarantees exclusive access to `[off, off + len)` for the lifetime of the slice.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, off: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let a = super::exp(x) as f64;
            let b = (x as f64).exp();
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(super::exp(-100.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
    }
}

/// Σ a[i]·b[i] with 16 independent accumulators, so the loop vectorises without fast-math.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    let mut h = [0f32; 8];
    for j in 0..8 {
        h[j] = acc[j] + acc[j + 8];
    }
    s + (h[0] + h[4]) + (h[1] + h[5]) + (h[2] + h[6]) + (h[3] + h[7])
}
