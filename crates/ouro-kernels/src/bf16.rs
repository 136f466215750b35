//! bf16 matrix products on AVX-512 BF16 (`vdpbf16ps`: 32 multiply-adds per instruction, accumulated in
//! f32), for the CPU engine's prefill and batched decode.
//!
//! ```text
//! out (t, n) = A (t, k) · Wᵀ          W (n, k) row-major, as nn.Linear stores it
//! W packed once: blocks of 32 output rows; per pair of k, 32 dwords = (W[j][2p], W[j][2p+1]) for the block's j
//! A converted per call: row r, pair p = (A[r][2p], A[r][2p+1])
//! kernel: 8 rows of A × 32 outputs in 16 zmm accumulators; per pair: 2 loads of W, 8 broadcasts of A
//! ```
//!
//! Inputs are rounded to bf16 (8 significant bits), products summed in f32: results differ from f32
//! matmuls by ~0.3% of the summands' magnitude. Callers choose it where that is acceptable.

use rayon::prelude::*;

/// Whether this CPU runs the kernels (AVX-512F + AVX-512 BF16; `OURO_NO_BF16` set disables them).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::env::var_os("OURO_NO_BF16").is_none() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
#[inline]
fn bf16_bits(x: f32) -> u32 {
    half::bf16::from_f32(x).to_bits() as u32
}

/// A weight matrix (n outputs × k inputs) packed for [`PackedBf16::matmul`].
#[derive(Clone, Debug)]
pub struct PackedBf16 {
    pub n: usize,
    pub k: usize,
    /// ⌈k/2⌉ pairs
    kp: usize,
    /// (⌈n/32⌉, kp, 32) bf16 pairs
    data: Vec<u32>,
}

/// Output rows per packed block.
const NB: usize = 32;
/// Rows of A per kernel tile.
const TB: usize = 8;

impl PackedBf16 {
    /// Packs W given row by row: `row(j, buf)` writes row j (k values) into buf.
    pub fn pack(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let kp = k.div_ceil(2);
        let blocks = n.div_ceil(NB);
        let mut data = vec![0u32; blocks * kp * NB];
        data.par_chunks_mut(kp * NB).enumerate().for_each(|(nb, blk)| {
            let mut buf = vec![0f32; 2 * kp];
            for lane in 0..NB {
                let j = nb * NB + lane;
                if j >= n {
                    break;
                }
                row(j, &mut buf[..k]);
                for p in 0..kp {
                    blk[p * NB + lane] = bf16_bits(buf[2 * p]) | (bf16_bits(buf[2 * p + 1]) << 16);
                }
            }
        });
        Self { n, k, kp, data }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.data.len()
    }

    /// out (t, n) = a (t, k) · Wᵀ, with rayon over blocks of outputs. Panics if the CPU lacks the
    /// instructions ([`available`]) or the sizes do not match.
    pub fn matmul(&self, a: &[f32], t: usize, out: &mut [f32]) {
        assert!(available(), "bf16 matmul on a CPU without AVX-512 BF16");
        let (n, k, kp) = (self.n, self.k, self.kp);
        assert_eq!(a.len(), t * k, "bf16 matmul: a has {} values, expected {t}×{k}", a.len());
        assert_eq!(out.len(), t * n, "bf16 matmul: out has {} values, expected {t}×{n}", out.len());
        if t == 0 || n == 0 {
            return;
        }
        // A as bf16 pairs, rows padded to a multiple of the tile with zeros.
        let tp = t.div_ceil(TB) * TB;
        let mut ap = vec![0u32; tp * kp];
        // A pair (lo, hi) in a dword is the row's bf16 values in memory order.
        ap.par_chunks_mut(kp).zip(a.par_chunks(k)).for_each(|(dst, src)| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 BF16 is available (asserted above); dst holds ⌈k/2⌉ dwords = k (+1) bf16.
            unsafe {
                avx512::to_bf16(src, dst.as_mut_ptr() as *mut u16)
            };
        });
        let op = crate::cpu::SendPtr(out.as_mut_ptr());
        let blocks = n.div_ceil(NB);
        (0..blocks).into_par_iter().for_each(|nb| {
            let ncols = NB.min(n - nb * NB);
            let w = &self.data[nb * kp * NB..(nb + 1) * kp * NB];
            for t0 in (0..t).step_by(TB) {
                let rows = TB.min(t - t0);
                // SAFETY: this task writes columns [nb·32, nb·32 + ncols) of rows t0..t0+rows only; the CPU
                // has AVX-512 BF16 (asserted above); ap has TB full rows from t0.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::tile(&ap[t0 * kp..(t0 + TB) * kp], kp, w, op.offset(t0 * n + nb * NB).0, n, rows, ncols)
                };
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{NB, TB};
    use std::arch::x86_64::*;

    /// dst[i] = bf16(src[i]) (round to nearest even), 16 at a time.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn to_bf16(src: &[f32], dst: *mut u16) {
        let n = src.len();
        let mut i = 0;
        while i + 16 <= n {
            let v: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i))));
            _mm256_storeu_si256(dst.add(i) as *mut __m256i, v);
            i += 16;
        }
        while i < n {
            *dst.add(i) = half::bf16::from_f32(src[i]).to_bits();
            i += 1;
        }
    }

    /// out[r][c] = Σ_p dot(a[r][p], w[p][c]) for r < rows, c < ncols (out row stride `ld`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile(a: &[u32], kp: usize, w: &[u32], out: *mut f32, ld: usize, rows: usize, ncols: usize) {
        debug_assert!(a.len() >= TB * kp && w.len() >= kp * NB);
        let mut acc = [[_mm512_setzero_ps(); 2]; TB];
        let (ap, wp) = (a.as_ptr(), w.as_ptr());
        for p in 0..kp {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(p * NB) as *const _));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(p * NB + 16) as *const _));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r * kp + p) as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, w0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, w1);
            }
        }
        let m0: __mmask16 = if ncols >= 16 { 0xFFFF } else { (1u32 << ncols) as u16 - 1 };
        let m1: __mmask16 = if ncols >= 32 { 0xFFFF } else if ncols > 16 { (1u32 << (ncols - 16)) as u16 - 1 } else { 0 };
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            let o = out.add(r * ld);
            _mm512_mask_storeu_ps(o, m0, acc_r[0]);
            _mm512_mask_storeu_ps(o.add(16), m1, acc_r[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn round(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f32() as f64
    }

    #[test]
    fn matmul_equals_the_product_of_bf16_rounded_inputs() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let mut rng = StdRng::seed_from_u64(7);
        for (t, n, k) in [(1, 32, 64), (13, 70, 33), (16, 130, 768), (40, 5, 10)] {
            let w: Vec<f32> = (0..n * k).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let a: Vec<f32> = (0..t * k).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let packed = PackedBf16::pack(n, k, |j, buf| buf.copy_from_slice(&w[j * k..(j + 1) * k]));
            let mut out = vec![f32::NAN; t * n];
            packed.matmul(&a, t, &mut out);
            for r in 0..t {
                for j in 0..n {
                    let want: f64 = (0..k).map(|i| round(a[r * k + i]) * round(w[j * k + i])).sum();
                    let got = out[r * n + j] as f64;
                    assert!((got - want).abs() <= 1e-5 * (1.0 + (k as f64).sqrt()), "({t},{n},{k}) [{r},{j}]: {got} vs {want}");
                }
            }
        }
    }
}
