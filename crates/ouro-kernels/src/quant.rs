//! Weight matrices for CPU inference: f32, f16 and the GGUF block formats Q8_0 and Q4_0, with the
//! matrix–vector products that decoding streams them through.
//!
//! ```text
//! Q8_0: 32 weights per 34-byte block: d (f16), q[32] (i8)            w = d·q
//! Q4_0: 32 weights per 18-byte block: d (f16), qs[16] (4-bit pairs)  w = d·(nibble − 8)
//!       weight j < 16 is the low nibble of qs[j], weight j ≥ 16 the high nibble of qs[j − 16]
//! ```
//!
//! The block layouts are ggml's, so the bytes read from or written to a GGUF file are used as they are.
//! A matrix is (rows, cols) row-major, as `nn.Linear` stores (out, in); `matvec` computes
//! y[b, r] = Σ_k W[r, k]·x[b, k] for a batch of vectors, reading each weight once for the whole batch.
//! Rows are split across rayon's threads; AVX-512 kernels are chosen at run time, with portable
//! fallbacks that compute the same sums.

use half::f16;
use rayon::prelude::*;

/// Weights per quantisation block.
pub const QK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34 && std::mem::size_of::<BlockQ4_0>() == 18);

/// A storage format for a weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "q8_0" => Some(Self::Q8_0),
            "q4_0" => Some(Self::Q4_0),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }
    /// Bytes of one row of `cols` weights.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::F32 => 4 * cols,
            Self::F16 => 2 * cols,
            Self::Q8_0 => cols / QK * 34,
            Self::Q4_0 => cols / QK * 18,
        }
    }
    /// The ggml type of this format (GGUF tensors).
    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            Self::F32 => G::F32,
            Self::F16 => G::F16,
            Self::Q8_0 => G::Q8_0,
            Self::Q4_0 => G::Q4_0,
        }
    }
    /// The format of a ggml type, when it is one of these.
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        [Self::F32, Self::F16, Self::Q8_0, Self::Q4_0].into_iter().find(|f| f.ggml() == t)
    }
    /// Whether rows of `cols` weights can be stored (the block formats need whole blocks).
    pub fn supports(self, cols: usize) -> bool {
        matches!(self, Self::F32 | Self::F16) || cols % QK == 0
    }
}

#[derive(Clone, Debug)]
enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8_0(Vec<BlockQ8_0>),
    Q4_0(Vec<BlockQ4_0>),
}

/// A (rows, cols) row-major weight matrix in one of the [`Format`]s.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    data: Data,
}

fn round_q8(v: f32) -> i8 {
    v.round().clamp(-128.0, 127.0) as i8
}

/// ggml's `quantize_row_q8_0`: d = max|w| / 127, q = round(w / d).
pub fn quantize_q8_0(w: &[f32]) -> Vec<BlockQ8_0> {
    assert_eq!(w.len() % QK, 0);
    w.chunks_exact(QK)
        .map(|c| {
            let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; QK];
            for (q, v) in qs.iter_mut().zip(c) {
                *q = round_q8(v * id);
            }
            BlockQ8_0 { d: f16::from_f32(d), qs }
        })
        .collect()
}

/// ggml's `quantize_row_q4_0`: d = w_max / −8 where w_max is the weight of largest magnitude (with its
/// sign), q = min(15, trunc(w / d + 8.5)).
pub fn quantize_q4_0(w: &[f32]) -> Vec<BlockQ4_0> {
    assert_eq!(w.len() % QK, 0);
    w.chunks_exact(QK)
        .map(|c| {
            let mut amax = 0f32;
            let mut max = 0f32;
            for &v in c {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0u8; QK / 2];
            for j in 0..QK / 2 {
                let lo = ((c[j] * id + 8.5) as u8).min(15);
                let hi = ((c[j + QK / 2] * id + 8.5) as u8).min(15);
                qs[j] = lo | (hi << 4);
            }
            BlockQ4_0 { d: f16::from_f32(d), qs }
        })
        .collect()
}

impl QMatrix {
    /// Stores `w` (rows × cols, row-major) in `format`.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, format: Format) -> Self {
        assert_eq!(w.len(), rows * cols, "quantize: {} values for a {rows}×{cols} matrix", w.len());
        assert!(format.supports(cols), "{}: rows of {cols} are not whole blocks of {QK}", format.name());
        let data = match format {
            Format::F32 => Data::F32(w.to_vec()),
            Format::F16 => Data::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
            Format::Q8_0 => Data::Q8_0(quantize_q8_0(w)),
            Format::Q4_0 => Data::Q4_0(quantize_q4_0(w)),
        };
        Self { rows, cols, data }
    }

    /// Reads ggml-layout bytes (a GGUF tensor's data) of a (rows, cols) matrix.
    pub fn from_bytes(bytes: &[u8], rows: usize, cols: usize, format: Format) -> Result<Self, String> {
        if !format.supports(cols) {
            return Err(format!("{}: rows of {cols} are not whole blocks of {QK}", format.name()));
        }
        let want = rows * format.row_bytes(cols);
        if bytes.len() != want {
            return Err(format!("{} {rows}×{cols}: expected {want} bytes, got {}", format.name(), bytes.len()));
        }
        fn cast<T: Copy>(bytes: &[u8], size: usize, read: impl Fn(&[u8]) -> T) -> Vec<T> {
            bytes.chunks_exact(size).map(read).collect()
        }
        let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        let data = match format {
            Format::F32 => Data::F32(cast(bytes, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            Format::F16 => Data::F16(cast(bytes, 2, h)),
            Format::Q8_0 => Data::Q8_0(cast(bytes, 34, |b| BlockQ8_0 { d: h(b), qs: std::array::from_fn(|i| b[2 + i] as i8) })),
            Format::Q4_0 => Data::Q4_0(cast(bytes, 18, |b| BlockQ4_0 { d: h(b), qs: std::array::from_fn(|i| b[2 + i]) })),
        };
        Ok(Self { rows, cols, data })
    }

    /// The ggml-layout bytes (little-endian), as a GGUF file stores them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows * self.format().row_bytes(self.cols));
        match &self.data {
            Data::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::F16(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::Q8_0(v) => v.iter().for_each(|b| {
                out.extend_from_slice(&b.d.to_le_bytes());
                out.extend(b.qs.iter().map(|&q| q as u8));
            }),
            Data::Q4_0(v) => v.iter().for_each(|b| {
                out.extend_from_slice(&b.d.to_le_bytes());
                out.extend_from_slice(&b.qs);
            }),
        }
        out
    }

    pub fn format(&self) -> Format {
        match self.data {
            Data::F32(_) => Format::F32,
            Data::F16(_) => Format::F16,
            Data::Q8_0(_) => Format::Q8_0,
            Data::Q4_0(_) => Format::Q4_0,
        }
    }

    /// The weights when stored as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Bytes a pass over the whole matrix reads.
    pub fn bytes(&self) -> usize {
        self.rows * self.format().row_bytes(self.cols)
    }

    /// Writes row `r` as f32 into `out` (len cols).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        assert!(r < self.rows && out.len() == c);
        match &self.data {
            Data::F32(v) => out.copy_from_slice(&v[r * c..(r + 1) * c]),
            Data::F16(v) => f16_to_f32(&v[r * c..(r + 1) * c], out),
            Data::Q8_0(v) => {
                for (blk, o) in v[r * c / QK..(r + 1) * c / QK].iter().zip(out.chunks_exact_mut(QK)) {
                    let d = blk.d.to_f32();
                    for (o, &q) in o.iter_mut().zip(&blk.qs) {
                        *o = d * q as f32;
                    }
                }
            }
            Data::Q4_0(v) => {
                for (blk, o) in v[r * c / QK..(r + 1) * c / QK].iter().zip(out.chunks_exact_mut(QK)) {
                    let d = blk.d.to_f32();
                    for j in 0..QK / 2 {
                        o[j] = d * ((blk.qs[j] & 15) as i32 - 8) as f32;
                        o[j + QK / 2] = d * ((blk.qs[j] >> 4) as i32 - 8) as f32;
                    }
                }
            }
        }
    }

    /// The whole matrix as f32 (rows × cols), in parallel over rows.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_into(&mut out);
        out
    }

    /// [`QMatrix::dequantize`] into a caller's buffer (for prefill's per-layer scratch).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.rows * self.cols);
        if self.cols == 0 {
            return;
        }
        out.par_chunks_mut(self.cols).enumerate().for_each(|(r, o)| self.dequantize_row(r, o));
    }

    /// Σ_k W[r, k]·x[k].
    #[inline]
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let c = self.cols;
        debug_assert!(x.len() == c);
        match &self.data {
            Data::F32(v) => simd::dot_f32(&v[r * c..(r + 1) * c], x),
            Data::F16(v) => simd::dot_f16(&v[r * c..(r + 1) * c], x),
            Data::Q8_0(v) => simd::dot_q8_0(&v[r * c / QK..(r + 1) * c / QK], x),
            Data::Q4_0(v) => simd::dot_q4_0(&v[r * c / QK..(r + 1) * c / QK], x),
        }
    }

    /// y[b, r] = Σ_k W[r, k]·x[b, k] for b < batch: x is (batch, cols), y (batch, rows).
    ///
    /// Each weight row is read once for the whole batch: for batch 1 the row is dotted as stored, for
    /// larger batches a block-format row is expanded to f32 once (in L1) and dotted with every vector.
    pub fn matvec(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), batch * cols, "matvec: x has {} values, expected {batch}×{cols}", x.len());
        assert_eq!(y.len(), batch * rows, "matvec: y has {} values, expected {batch}×{rows}", y.len());
        if rows == 0 || batch == 0 {
            return;
        }
        // Rows per task: enough work to amortise the task (~32 KiB of weights), several tasks per thread.
        let per = (32768 / self.format().row_bytes(cols).max(1)).clamp(4, 256).min(rows.div_ceil(4 * rayon::current_num_threads()).max(4));
        let yp = crate::cpu::SendPtr(y.as_mut_ptr());
        if batch >= GEMM_BATCH {
            // Register-blocked: 4 rows × 4 vectors per pass over k (16 accumulators; 8 loads per 16 FMAs);
            // tasks of whole groups of 4 rows.
            let per = per.div_ceil(4) * 4;
            let tasks = rows.div_ceil(per);
            (0..tasks).into_par_iter().for_each_init(Vec::new, |buf: &mut Vec<f32>, t| {
                let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
                let tile: &[f32] = match &self.data {
                    Data::F32(v) => &v[r0 * cols..r1 * cols],
                    _ => {
                        buf.resize((r1 - r0) * cols, 0.0);
                        for (i, r) in (r0..r1).enumerate() {
                            self.dequantize_row(r, &mut buf[i * cols..(i + 1) * cols]);
                        }
                        buf
                    }
                };
                let row = |i: usize| &tile[i * cols..(i + 1) * cols];
                let xv = |b: usize| &x[b * cols..(b + 1) * cols];
                let mut i = 0;
                while i < r1 - r0 {
                    let nr = (r1 - r0 - i).min(4);
                    let mut b = 0;
                    while b < batch {
                        let nb = (batch - b).min(4);
                        let out = if nr == 4 && nb == 4 {
                            simd::dot_4x4_f32([row(i), row(i + 1), row(i + 2), row(i + 3)], [xv(b), xv(b + 1), xv(b + 2), xv(b + 3)])
                        } else {
                            let mut o = [[0f32; 4]; 4];
                            for (ri, orow) in o.iter_mut().enumerate().take(nr) {
                                for (bj, v) in orow.iter_mut().enumerate().take(nb) {
                                    *v = simd::dot_f32(row(i + ri), xv(b + bj));
                                }
                            }
                            o
                        };
                        for (ri, orow) in out.iter().enumerate().take(nr) {
                            for (bj, &v) in orow.iter().enumerate().take(nb) {
                                // SAFETY: (b + bj, r0 + i + ri) lies in this task's rows.
                                unsafe { *yp.offset((b + bj) * rows + r0 + i + ri).0 = v };
                            }
                        }
                        b += nb;
                    }
                    i += nr;
                }
            });
            return;
        }
        let tasks = rows.div_ceil(per);
        let expand = batch > 1 && !matches!(self.data, Data::F32(_));
        (0..tasks).into_par_iter().for_each_init(
            || if expand { vec![0f32; cols] } else { Vec::new() },
            |buf, t| {
                let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
                for r in r0..r1 {
                    let row: Option<&[f32]> = if expand {
                        self.dequantize_row(r, buf);
                        Some(buf)
                    } else if let Data::F32(v) = &self.data {
                        Some(&v[r * cols..(r + 1) * cols])
                    } else {
                        None
                    };
                    for b in 0..batch {
                        let xb = &x[b * cols..(b + 1) * cols];
                        let v = match row {
                            Some(w) => simd::dot_f32(w, xb),
                            None => self.dot_row(r, xb),
                        };
                        // SAFETY: (b, r) for r in this task's rows is written by this task only.
                        unsafe { *yp.offset(b * rows + r).0 = v };
                    }
                }
            },
        );
    }
}

/// From this batch size on, `matvec` computes 4×4 blocks of (row, vector) dot products together.
pub const GEMM_BATCH: usize = 4;

fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Dot-product kernels: AVX-512 when the CPU has it (checked once), portable code otherwise.
pub mod simd {
    use super::{BlockQ4_0, BlockQ8_0, QK};
    use half::f16;

    #[cfg(target_arch = "x86_64")]
    fn has_avx512() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("OURO_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has AVX-512F/BW, FMA and F16C (checked above).
            return unsafe { avx512::dot_f32(w, x) };
        }
        crate::cpu::dot(w, x)
    }

    pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: as above.
            return unsafe { avx512::dot_f16(w, x) };
        }
        portable::dot_f16(w, x)
    }

    pub fn dot_q8_0(w: &[BlockQ8_0], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: as above.
            return unsafe { avx512::dot_q8_0(w, x) };
        }
        portable::dot_q8_0(w, x)
    }

    pub fn dot_q4_0(w: &[BlockQ4_0], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: as above.
            return unsafe { avx512::dot_q4_0(w, x) };
        }
        portable::dot_q4_0(w, x)
    }

    /// [[w_r · x_b for b in 0..4] for r in 0..4].
    pub fn dot_4x4_f32(w: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: as above.
            return unsafe { avx512::dot_4x4_f32(w, x) };
        }
        std::array::from_fn(|r| std::array::from_fn(|b| crate::cpu::dot(w[r], x[b])))
    }

    /// One row of the SSM decode update: s ← da·s + dx·b, returns s·c (all slices of length N).
    pub fn ssm_update_row(s: &mut [f32], b: &[f32], c: &[f32], da: f32, dx: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: as above.
            return unsafe { avx512::ssm_update_row(s, b, c, da, dx) };
        }
        portable::ssm_update_row(s, b, c, da, dx)
    }

    /// [`ssm_update_row`] on a state stored as bf16 (math in f32, the result rounded to nearest even).
    pub fn ssm_update_row_bf16(s: &mut [u16], b: &[f32], c: &[f32], da: f32, dx: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() && crate::bf16::available() {
            // SAFETY: AVX-512F/BW and AVX-512 BF16 are available (checked).
            return unsafe { avx512::ssm_update_row_bf16(s, b, c, da, dx) };
        }
        portable::ssm_update_row_bf16(s, b, c, da, dx)
    }

    /// Plain Rust (vectorised by the compiler where it can); also the reference for the AVX-512 code.
    pub mod portable {
        use super::*;

        pub fn ssm_update_row_bf16(s: &mut [u16], b: &[f32], c: &[f32], da: f32, dx: f32) -> f32 {
            let mut acc = 0f32;
            for ((sv, &bv), &cv) in s.iter_mut().zip(b).zip(c) {
                let v = half::bf16::from_bits(*sv).to_f32() * da + dx * bv;
                *sv = half::bf16::from_f32(v).to_bits();
                acc += v * cv;
            }
            acc
        }

        pub fn ssm_update_row(s: &mut [f32], b: &[f32], c: &[f32], da: f32, dx: f32) -> f32 {
            let mut acc = 0f32;
            for ((sv, &bv), &cv) in s.iter_mut().zip(b).zip(c) {
                *sv = *sv * da + dx * bv;
                acc += *sv * cv;
            }
            acc
        }

        pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
            let mut acc = [0f32; 16];
            let mut buf = [0f32; 16];
            let (wc, xc) = (w.chunks_exact(16), x.chunks_exact(16));
            let (wr, xr) = (wc.remainder(), xc.remainder());
            for (a, b) in wc.zip(xc) {
                super::super::f16_to_f32(a, &mut buf);
                for j in 0..16 {
                    acc[j] += buf[j] * b[j];
                }
            }
            acc.iter().sum::<f32>() + wr.iter().zip(xr).map(|(a, b)| a.to_f32() * b).sum::<f32>()
        }

        pub fn dot_q8_0(w: &[BlockQ8_0], x: &[f32]) -> f32 {
            let mut s = 0f32;
            for (blk, xb) in w.iter().zip(x.chunks_exact(QK)) {
                let mut acc = [0f32; 16];
                for j in 0..QK {
                    acc[j % 16] += blk.qs[j] as f32 * xb[j];
                }
                s += blk.d.to_f32() * acc.iter().sum::<f32>();
            }
            s
        }

        pub fn dot_q4_0(w: &[BlockQ4_0], x: &[f32]) -> f32 {
            let mut s = 0f32;
            for (blk, xb) in w.iter().zip(x.chunks_exact(QK)) {
                let mut acc = [0f32; 16];
                for j in 0..QK / 2 {
                    acc[j] += ((blk.qs[j] & 15) as i32 - 8) as f32 * xb[j] + ((blk.qs[j] >> 4) as i32 - 8) as f32 * xb[j + QK / 2];
                }
                s += blk.d.to_f32() * acc.iter().sum::<f32>();
            }
            s
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use super::*;
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f,fma")]
        pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
            let n = w.len().min(x.len());
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(wp.add(i + 16 * k)), _mm512_loadu_ps(xp.add(i + 16 * k)), *a);
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(wp.add(i)), _mm512_loadu_ps(xp.add(i)), acc[0]);
                i += 16;
            }
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
            while i < n {
                s += w[i] * x[i];
                i += 1;
            }
            s
        }

        #[target_feature(enable = "avx512f,fma")]
        pub unsafe fn dot_4x4_f32(w: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
            let n = w.iter().chain(x.iter()).map(|s| s.len()).min().unwrap();
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            let mut i = 0;
            while i + 16 <= n {
                let xv: [__m512; 4] = std::array::from_fn(|b| _mm512_loadu_ps(x[b].as_ptr().add(i)));
                for r in 0..4 {
                    let wv = _mm512_loadu_ps(w[r].as_ptr().add(i));
                    for b in 0..4 {
                        acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
                    }
                }
                i += 16;
            }
            let mut out = [[0f32; 4]; 4];
            for r in 0..4 {
                for b in 0..4 {
                    let mut s = _mm512_reduce_add_ps(acc[r][b]);
                    for j in i..n {
                        s += w[r][j] * x[b][j];
                    }
                    out[r][b] = s;
                }
            }
            out
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
        pub unsafe fn ssm_update_row_bf16(s: &mut [u16], b: &[f32], c: &[f32], da: f32, dx: f32) -> f32 {
            let n = s.len().min(b.len()).min(c.len());
            let (sp, bp, cp) = (s.as_mut_ptr(), b.as_ptr(), c.as_ptr());
            let (vda, vdx) = (_mm512_set1_ps(da), _mm512_set1_ps(dx));
            let mut acc = _mm512_setzero_ps();
            let mut i = 0;
            while i + 16 <= n {
                let raw = _mm256_loadu_si256(sp.add(i) as *const __m256i);
                let old = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                let v = _mm512_fmadd_ps(old, vda, _mm512_mul_ps(vdx, _mm512_loadu_ps(bp.add(i))));
                let packed: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(sp.add(i) as *mut __m256i, packed);
                acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(cp.add(i)), acc);
                i += 16;
            }
            let mut t = _mm512_reduce_add_ps(acc);
            while i < n {
                let v = half::bf16::from_bits(s[i]).to_f32() * da + dx * b[i];
                s[i] = half::bf16::from_f32(v).to_bits();
                t += v * c[i];
                i += 1;
            }
            t
        }

        #[target_feature(enable = "avx512f,fma")]
        pub unsafe fn ssm_update_row(s: &mut [f32], b: &[f32], c: &[f32], da: f32, dx: f32) -> f32 {
            let n = s.len().min(b.len()).min(c.len());
            let (sp, bp, cp) = (s.as_mut_ptr(), b.as_ptr(), c.as_ptr());
            let (vda, vdx) = (_mm512_set1_ps(da), _mm512_set1_ps(dx));
            let mut acc = [_mm512_setzero_ps(); 2];
            let mut i = 0;
            while i + 16 <= n {
                let v = _mm512_fmadd_ps(_mm512_loadu_ps(sp.add(i)), vda, _mm512_mul_ps(vdx, _mm512_loadu_ps(bp.add(i))));
                _mm512_storeu_ps(sp.add(i), v);
                let a = &mut acc[(i / 16) & 1];
                *a = _mm512_fmadd_ps(v, _mm512_loadu_ps(cp.add(i)), *a);
                i += 16;
            }
            let mut t = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
            while i < n {
                s[i] = s[i] * da + dx * b[i];
                t += s[i] * c[i];
                i += 1;
            }
            t
        }

        #[target_feature(enable = "avx512f,fma")]
        pub unsafe fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
            let n = w.len().min(x.len());
            let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let h = _mm256_loadu_si256(wp.add(i + 16 * k) as *const __m256i);
                    *a = _mm512_fmadd_ps(_mm512_cvtph_ps(h), _mm512_loadu_ps(xp.add(i + 16 * k)), *a);
                }
                i += 64;
            }
            while i + 16 <= n {
                let h = _mm256_loadu_si256(wp.add(i) as *const __m256i);
                acc[0] = _mm512_fmadd_ps(_mm512_cvtph_ps(h), _mm512_loadu_ps(xp.add(i)), acc[0]);
                i += 16;
            }
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
            while i < n {
                s += w[i].to_f32() * x[i];
                i += 1;
            }
            s
        }

        /// Per block: 32 int8 → two 16-lane f32 vectors, multiplied with x, summed into a block
        /// accumulator, then scaled by d into the running sum (two blocks in flight).
        #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
        pub unsafe fn dot_q8_0(w: &[BlockQ8_0], x: &[f32]) -> f32 {
            let xp = x.as_ptr();
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            for (i, blk) in w.iter().enumerate() {
                let q = blk.qs.as_ptr() as *const __m128i;
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(1))));
                let xb = xp.add(i * QK);
                let s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xb)));
                let d = _mm512_set1_ps(blk.d.to_f32());
                if i & 1 == 0 {
                    acc0 = _mm512_fmadd_ps(d, s, acc0);
                } else {
                    acc1 = _mm512_fmadd_ps(d, s, acc1);
                }
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }

        /// Per block: 16 bytes → low and high nibbles (weights 0..16 and 16..32) as f32 minus 8.
        #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
        pub unsafe fn dot_q4_0(w: &[BlockQ4_0], x: &[f32]) -> f32 {
            let xp = x.as_ptr();
            let mask = _mm512_set1_epi32(15);
            let eight = _mm512_set1_epi32(8);
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            for (i, blk) in w.iter().enumerate() {
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.qs.as_ptr() as *const __m128i));
                let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, mask), eight));
                let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
                let xb = xp.add(i * QK);
                let s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xb)));
                let d = _mm512_set1_ps(blk.d.to_f32());
                if i & 1 == 0 {
                    acc0 = _mm512_fmadd_ps(d, s, acc0);
                } else {
                    acc1 = _mm512_fmadd_ps(d, s, acc1);
                }
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut r = StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// The reference: f32 dot of the dequantised row, in f64.
    fn reference(m: &QMatrix, x: &[f32], batch: usize) -> Vec<f32> {
        let w = m.dequantize();
        let mut y = vec![0f32; batch * m.rows];
        for b in 0..batch {
            for r in 0..m.rows {
                y[b * m.rows + r] = (0..m.cols).map(|k| w[r * m.cols + k] as f64 * x[b * m.cols + k] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matvec_matches_dequantised_reference_in_every_format() {
        for (rows, cols) in [(37, 64), (5, 768), (130, 96)] {
            let w = randn(rows * cols, 1);
            for fmt in [Format::F32, Format::F16, Format::Q8_0, Format::Q4_0] {
                let m = QMatrix::quantize(&w, rows, cols, fmt);
                for batch in [1, 3, 16] {
                    let x = randn(batch * cols, 2 + batch as u64);
                    let want = reference(&m, &x, batch);
                    let mut got = vec![f32::NAN; batch * rows];
                    m.matvec(&x, batch, &mut got);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{fmt:?} {rows}×{cols} batch {batch}: {g} vs {w}");
                    }
                }
                // The portable kernels agree with whatever the CPU dispatch picked.
                let x = randn(cols, 9);
                for r in 0..rows {
                    let p = match fmt {
                        Format::F32 => crate::cpu::dot(&w[r * cols..(r + 1) * cols], &x),
                        Format::F16 => {
                            let Data::F16(v) = &m.data else { unreachable!() };
                            simd::portable::dot_f16(&v[r * cols..(r + 1) * cols], &x)
                        }
                        Format::Q8_0 => {
                            let Data::Q8_0(v) = &m.data else { unreachable!() };
                            simd::portable::dot_q8_0(&v[r * cols / QK..(r + 1) * cols / QK], &x)
                        }
                        Format::Q4_0 => {
                            let Data::Q4_0(v) = &m.data else { unreachable!() };
                            simd::portable::dot_q4_0(&v[r * cols / QK..(r + 1) * cols / QK], &x)
                        }
                    };
                    assert!((p - m.dot_row(r, &x)).abs() <= 1e-4 * (1.0 + p.abs()));
                }
            }
        }
    }

    #[test]
    fn ssm_update_row_matches_the_portable_code() {
        for n in [16, 64, 128, 37] {
            let (b, c) = (randn(n, 10), randn(n, 11));
            let mut s1 = randn(n, 12);
            let mut s2 = s1.clone();
            let y1 = simd::ssm_update_row(&mut s1, &b, &c, 0.9, 0.3);
            let y2 = simd::portable::ssm_update_row(&mut s2, &b, &c, 0.9, 0.3);
            assert!((y1 - y2).abs() <= 1e-5 * (1.0 + y2.abs()), "n {n}: {y1} vs {y2}");
            for (a, b) in s1.iter().zip(&s2) {
                assert!((a - b).abs() <= 1e-6, "n {n}: state {a} vs {b}");
            }
        }
    }

    #[test]
    fn ssm_update_row_bf16_matches_the_portable_code() {
        for n in [16, 128, 37] {
            let (b, c) = (randn(n, 13), randn(n, 14));
            let mut s1: Vec<u16> = randn(n, 15).iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let mut s2 = s1.clone();
            let y1 = simd::ssm_update_row_bf16(&mut s1, &b, &c, 0.9, 0.3);
            let y2 = simd::portable::ssm_update_row_bf16(&mut s2, &b, &c, 0.9, 0.3);
            assert!((y1 - y2).abs() <= 1e-5 * (1.0 + y2.abs()), "n {n}: {y1} vs {y2}");
            assert_eq!(s1, s2, "n {n}: rounded states differ");
        }
    }

    #[test]
    fn quantisation_error_is_within_the_format_step() {
        let w = randn(64 * 96, 3);
        // Q8_0 rounds to the nearest of ±127 steps; Q4_0's levels run −8..7 with the largest magnitude at
        // −8, so a weight of the opposite sign near it clamps to 7: up to one whole step.
        for (fmt, levels, steps) in [(Format::Q8_0, 127.0, 0.5), (Format::Q4_0, 8.0, 1.0)] {
            let m = QMatrix::quantize(&w, 64, 96, fmt);
            let back = m.dequantize();
            for (blk_w, blk_b) in w.chunks(QK).zip(back.chunks(QK)) {
                let amax = blk_w.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (a, b) in blk_w.iter().zip(blk_b) {
                    // The rounding step of d = amax/levels, plus the f16 rounding of d (2⁻¹¹ relative).
                    assert!((a - b).abs() <= amax / levels * steps + a.abs() * 1e-3 + 1e-6, "{fmt:?}: {a} → {b}");
                }
            }
        }
    }

    /// An independent reference: candle's port of ggml's quantisers must produce the same bytes.
    #[test]
    fn blocks_equal_ggml_quantisation_bytes() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let w = randn(16 * 256, 5);
        let t = candle_core::Tensor::from_slice(&w, (16, 256), &candle_core::Device::Cpu).unwrap();
        for (fmt, ty) in [(Format::Q8_0, GgmlDType::Q8_0), (Format::Q4_0, GgmlDType::Q4_0), (Format::F16, GgmlDType::F16)] {
            let ours = QMatrix::quantize(&w, 16, 256, fmt).to_bytes();
            let theirs = QTensor::quantize(&t, ty).unwrap().data().unwrap().to_vec();
            assert_eq!(ours.len(), theirs.len(), "{fmt:?}");
            let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{fmt:?}: {differ} bytes differ from ggml's");
        }
    }

    #[test]
    fn bytes_round_trip_in_ggml_layout() {
        let w = randn(8 * 64, 4);
        for fmt in [Format::F32, Format::F16, Format::Q8_0, Format::Q4_0] {
            let m = QMatrix::quantize(&w, 8, 64, fmt);
            let bytes = m.to_bytes();
            assert_eq!(bytes.len(), m.bytes());
            let back = QMatrix::from_bytes(&bytes, 8, 64, fmt).unwrap();
            assert_eq!(back.dequantize(), m.dequantize());
            assert!(QMatrix::from_bytes(&bytes[1..], 8, 64, fmt).is_err());
        }
        assert!(QMatrix::from_bytes(&[0; 18], 1, 20, Format::Q4_0).unwrap_err().contains("whole blocks"));
    }
}
