//! The diagonal linear recurrence h_t = a_t ⊙ h_{t−1} + x_t (Hawk/Griffin's RG-LRU, `rnn_scan`), channels-last
//! (b, l, w), accumulated in f32, with a backward pass.
//!
//! Two algorithms that must agree: [`ScanAlgo::Sequential`] (one pass over time, vectorised over channels)
//! and [`ScanAlgo::Chunked`] (a parallel scan: chunks of time scanned independently from a zero state while
//! carrying the product of their decays, then the chunk carries propagated, then a fix-up pass — work
//! spreads over time as well as over batch and channels). On CUDA, a thread per channel walks the time steps
//! (`cuda/linear_scan.cu`), forward and backward.

use crate::cpu::SendPtr;
use crate::util::{cpu_f32, expect_dims};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanAlgo {
    Sequential,
    /// Parallel over chunks of this many time steps.
    Chunked(usize),
}

/// Channels per task of the sequential scan.
const BLOCK: usize = 64;

/// y (b, l, w) and h_last (b, w) from x, a (b, l, w) and h0 (b, w).
#[allow(clippy::too_many_arguments)]
pub fn scan_fwd(b: usize, l: usize, w: usize, x: &[f32], a: &[f32], h0: &[f32], algo: ScanAlgo, y: &mut [f32], h_last: &mut [f32]) {
    match algo {
        ScanAlgo::Sequential => {
            let yp = SendPtr(y.as_mut_ptr());
            // Tasks: (batch, channel block).
            let nb = w.div_ceil(BLOCK);
            let hp = SendPtr(h_last.as_mut_ptr());
            (0..b * nb).into_par_iter().for_each(|task| {
                let (bi, blk) = (task / nb, task % nb);
                let (c0, c1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(w));
                // SAFETY: channels [c0, c1) of row bi belong to this task.
                let h = unsafe { hp.slice(bi * w + c0, c1 - c0) };
                h.copy_from_slice(&h0[bi * w + c0..bi * w + c1]);
                for t in 0..l {
                    let o = (bi * l + t) * w;
                    let yr = unsafe { yp.slice(o + c0, c1 - c0) };
                    step_into(h, &a[o + c0..o + c1], &x[o + c0..o + c1], yr);
                }
            });
        }
        ScanAlgo::Chunked(q) => {
            let q = q.max(1);
            let nc = l.div_ceil(q);
            // 1. Each chunk from a zero state; also the product of its decays (per channel).
            let mut carry_mult = vec![0f32; b * nc * w];
            let yp = SendPtr(y.as_mut_ptr());
            carry_mult.par_chunks_mut(w).enumerate().for_each(|(idx, prod)| {
                let (bi, c) = (idx / nc, idx % nc);
                let mut h = vec![0f32; w];
                prod.fill(1.0);
                for t in c * q..((c + 1) * q).min(l) {
                    let o = (bi * l + t) * w;
                    let yr = unsafe { yp.slice(o, w) };
                    step_into(&mut h, &a[o..o + w], &x[o..o + w], yr);
                    mul_into(prod, &a[o..o + w]);
                }
            });
            // 2. States entering each chunk: S_{c+1} = prod_c ⊙ S_c + y_last(c).
            let mut enter = vec![0f32; b * nc * w];
            enter.par_chunks_mut(nc * w).zip(h_last.par_chunks_mut(w)).enumerate().for_each(|(bi, (en, hl))| {
                hl.copy_from_slice(&h0[bi * w..(bi + 1) * w]);
                for c in 0..nc {
                    en[c * w..(c + 1) * w].copy_from_slice(hl);
                    let last = (((c + 1) * q).min(l) - 1 + bi * l) * w;
                    let prod = &carry_mult[(bi * nc + c) * w..(bi * nc + c + 1) * w];
                    for k in 0..w {
                        hl[k] = prod[k] * hl[k] + y[last + k];
                    }
                }
            });
            // 3. Fix-up: y_t += (Π_{s ≤ t in chunk} a_s) ⊙ S_c.
            (0..b * nc).into_par_iter().for_each(|idx| {
                let (bi, c) = (idx / nc, idx % nc);
                let mut m = enter[idx * w..(idx + 1) * w].to_vec();
                for t in c * q..((c + 1) * q).min(l) {
                    let o = (bi * l + t) * w;
                    mul_into(&mut m, &a[o..o + w]);
                    let yr = unsafe { yp.slice(o, w) };
                    add_into(yr, &m);
                }
            });
        }
    }
}

/// h = a ⊙ h + x; y = h.
#[multiversion(targets = "simd")]
fn step_into(h: &mut [f32], a: &[f32], x: &[f32], y: &mut [f32]) {
    // Iterators, not indices: no bounds checks, so the loop vectorises.
    for (((h, &a), &x), y) in h.iter_mut().zip(a).zip(x).zip(y.iter_mut()) {
        *h = a * *h + x;
        *y = *h;
    }
}

#[multiversion(targets = "simd")]
fn mul_into(m: &mut [f32], a: &[f32]) {
    for (v, &s) in m.iter_mut().zip(a) {
        *v *= s;
    }
}

#[multiversion(targets = "simd")]
fn add_into(y: &mut [f32], m: &[f32]) {
    for (v, &s) in y.iter_mut().zip(m) {
        *v += s;
    }
}

/// Backward: given y (the forward's states), dy (b, l, w) and dh_last (b, w), writes dx, da (b, l, w) and dh0.
/// dH_t = dy_t + a_{t+1} ⊙ dH_{t+1};  dx_t = dH_t;  da_t = dH_t ⊙ h_{t−1}.
#[allow(clippy::too_many_arguments)]
pub fn scan_bwd(b: usize, l: usize, w: usize, a: &[f32], h0: &[f32], y: &[f32], dy: &[f32], dh_last: &[f32], dx: &mut [f32], da: &mut [f32], dh0: &mut [f32]) {
    let nb = w.div_ceil(BLOCK);
    let (dxp, dap, dhp) = (SendPtr(dx.as_mut_ptr()), SendPtr(da.as_mut_ptr()), SendPtr(dh0.as_mut_ptr()));
    (0..b * nb).into_par_iter().for_each(|task| {
        let (bi, blk) = (task / nb, task % nb);
        let (c0, c1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(w));
        let n = c1 - c0;
        // SAFETY: channels [c0, c1) of row bi belong to this task.
        let g = unsafe { dhp.slice(bi * w + c0, n) };
        g.copy_from_slice(&dh_last[bi * w + c0..bi * w + c1]);
        for t in (0..l).rev() {
            let o = (bi * l + t) * w + c0;
            let prev = if t > 0 { &y[o - w..o - w + n] } else { &h0[bi * w + c0..bi * w + c1] };
            let (dxr, dar) = unsafe { (dxp.slice(o, n), dap.slice(o, n)) };
            bwd_step(g, &dy[o..o + n], &a[o..o + n], prev, dxr, dar);
        }
    });
}

/// g += dy; dx = g; da = g ⊙ prev; g = a ⊙ g (to step t−1).
#[multiversion(targets = "simd")]
fn bwd_step(g: &mut [f32], dy: &[f32], a: &[f32], prev: &[f32], dx: &mut [f32], da: &mut [f32]) {
    let n = g.len();
    let (dy, a, prev, dx, da) = (&dy[..n], &a[..n], &prev[..n], &mut dx[..n], &mut da[..n]);
    for k in 0..n {
        let gk = g[k] + dy[k];
        dx[k] = gk;
        da[k] = gk * prev[k];
        g[k] = a[k] * gk;
    }
}

struct LinearScanOp {
    algo: ScanAlgo,
}

fn dims(l1: &Layout) -> Result<(usize, usize, usize)> {
    l1.shape().dims3()
}

impl CustomOp3 for LinearScanOp {
    fn name(&self) -> &'static str {
        "linear-scan"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, l, w) = dims(l1)?;
        let (x, a, h0) = (cpu_f32(s1, l1, "linear scan x")?, cpu_f32(s2, l2, "linear scan a")?, cpu_f32(s3, l3, "linear scan h0")?);
        let mut out = vec![0f32; b * l * w + b * w];
        let (y, hl) = out.split_at_mut(b * l * w);
        scan_fwd(b, l, w, x, a, h0, self.algo, y, hl);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::linear_scan::fwd(dims(l1)?, (s1, l1), (s2, l2), (s3, l3))
    }
    fn bwd(&self, x: &Tensor, a: &Tensor, h0: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, l, w) = x.dims3()?;
        let y = res.detach().narrow(0, 0, b * l * w)?;
        let packed = Tensor::cat(&[&h0.detach().flatten_all()?, &y, &grad.detach()], 0)?;
        let g = a.detach().apply_op2_no_bwd(&packed, &LinearScanBwdOp { b, l, w })?;
        let n = b * l * w;
        Ok((Some(g.narrow(0, 0, n)?.reshape((b, l, w))?), Some(g.narrow(0, n, n)?.reshape((b, l, w))?), Some(g.narrow(0, 2 * n, b * w)?.reshape((b, w))?)))
    }
}

/// (a, [h0 | y | dy | dh_last]) → [dx | da | dh0].
struct LinearScanBwdOp {
    b: usize,
    l: usize,
    w: usize,
}

impl candle_core::CustomOp2 for LinearScanBwdOp {
    fn name(&self) -> &'static str {
        "linear-scan-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, l, w) = (self.b, self.l, self.w);
        let a = cpu_f32(s1, l1, "linear scan a")?;
        let p = cpu_f32(s2, l2, "linear scan grads")?;
        let n = b * l * w;
        let (h0, rest) = p.split_at(b * w);
        let (y, rest) = rest.split_at(n);
        let (dy, dhl) = rest.split_at(n);
        let mut out = vec![0f32; 2 * n + b * w];
        let (dx, rest) = out.split_at_mut(n);
        let (da, dh0) = rest.split_at_mut(n);
        scan_bwd(b, l, w, a, h0, y, dy, dhl, dx, da, dh0);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::linear_scan::bwd((self.b, self.l, self.w), (s1, l1), (s2, l2))
    }
}

/// h_t = a_t ⊙ h_{t−1} + x_t over (b, l, w) from h0 (b, w) (zeros when absent). Returns (all states y (b, l, w),
/// last state (b, w)), f32, differentiable w.r.t. x, a and h0.
pub fn linear_scan(x: &Tensor, a: &Tensor, h0: Option<&Tensor>, algo: ScanAlgo) -> Result<(Tensor, Tensor)> {
    let (b, l, w) = x.dims3()?;
    if l == 0 {
        bail!("linear scan: empty sequence (len 0)");
    }
    expect_dims(a, &[b, l, w], "linear scan: a")?;
    let f = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.contiguous() };
    let h0 = match h0 {
        Some(h) => {
            expect_dims(h, &[b, w], "linear scan: initial state")?;
            f(h)?
        }
        None => Tensor::zeros((b, w), DType::F32, x.device())?,
    };
    if !(x.device().is_cpu() || x.device().is_cuda()) {
        // Other devices: the recurrence in tensor ops.
        let mut h = h0;
        let mut ys = Vec::with_capacity(l);
        for t in 0..l {
            h = (a.narrow(1, t, 1)?.squeeze(1)?.to_dtype(DType::F32)?.mul(&h)? + x.narrow(1, t, 1)?.squeeze(1)?.to_dtype(DType::F32)?)?;
            ys.push(h.unsqueeze(1)?);
        }
        return Ok((Tensor::cat(&ys, 1)?, h));
    }
    let out = f(x)?.apply_op3(&f(a)?, &h0, LinearScanOp { algo })?;
    Ok((out.narrow(0, 0, b * l * w)?.reshape((b, l, w))?, out.narrow(0, b * l * w, b * w)?.reshape((b, w))?))
}
