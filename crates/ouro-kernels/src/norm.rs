//! RMSNorm and the gated RMSNorm of Mamba-2 (`mamba_ssm.ops.triton.layernorm_gated.rms_norm_ref`), in f32,
//! differentiable; the result has x's dtype.
//!
//! On the CPU and on CUDA (`cuda::norm`) both are one fused op each way (forward; backward giving dx, dz,
//! dw in one pass over the rows). [`gated_rms_norm_reference`] is the same function in plain candle ops: the path for other
//! devices, and the oracle the fused op is tested against.
//!
//! ```text
//! norm_before_gate = false (Mamba-2): u = x ⊙ SiLU(z);  y = u · rsqrt(mean_group(u²) + eps) · w
//! norm_before_gate = true  (Hydra):   y = x · rsqrt(mean_group(x²) + eps) · w ⊙ SiLU(z)
//! ```

use crate::cpu::{exp, SendPtr};
use crate::util::cpu_f32;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use multiversion::multiversion;
use rayon::prelude::*;

/// x · rsqrt(mean(x², last dim) + eps) · w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    gated_rms_norm(x, None, w, eps, None, false)
}

/// Gated RMSNorm over the last dim, normalised per group of `group_size` channels (None: all).
pub fn gated_rms_norm(x: &Tensor, z: Option<&Tensor>, w: &Tensor, eps: f64, group_size: Option<usize>, norm_before_gate: bool) -> Result<Tensor> {
    let gs = check(x, z, w, group_size)?;
    if !(x.device().is_cpu() || x.device().is_cuda()) {
        return gated_rms_norm_reference(x, z, w, eps, group_size, norm_before_gate);
    }
    let op = NormOp { eps: eps as f32, group: gs, before_gate: norm_before_gate, gated: z.is_some() };
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let zf = match z {
        Some(z) => z.to_dtype(DType::F32)?.contiguous()?,
        None => xf.clone(), // unused
    };
    let wf = w.to_dtype(DType::F32)?.contiguous()?;
    xf.apply_op3(&zf, &wf, op)?.to_dtype(x.dtype())
}

fn check(x: &Tensor, z: Option<&Tensor>, w: &Tensor, group_size: Option<usize>) -> Result<usize> {
    let dim = x.dim(D::Minus1)?;
    if w.dims() != [dim] {
        bail!("rms_norm: weight must be ({dim}), got shape {:?}", w.dims());
    }
    let gs = group_size.unwrap_or(dim);
    if gs == 0 || dim % gs != 0 {
        bail!("gated_rms_norm: group_size {gs} does not divide the normalised dim {dim}");
    }
    if let Some(z) = z {
        if z.dims() != x.dims() {
            bail!("gated_rms_norm: z shape {:?} differs from x shape {:?}", z.dims(), x.dims());
        }
    }
    Ok(gs)
}

/// The same function as [`gated_rms_norm`] in plain candle ops (any device).
pub fn gated_rms_norm_reference(x: &Tensor, z: Option<&Tensor>, w: &Tensor, eps: f64, group_size: Option<usize>, norm_before_gate: bool) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let gs = check(x, z, w, group_size)?;
    let gate = z.map(|z| z.to_dtype(DType::F32)?.silu()).transpose()?;
    let mut xf = x.to_dtype(DType::F32)?;
    if let (Some(g), false) = (&gate, norm_before_gate) {
        xf = xf.mul(g)?;
    }
    let shape = xf.shape().clone();
    let mut grouped_dims = shape.dims()[..shape.rank() - 1].to_vec();
    grouped_dims.extend([dim / gs, gs]);
    let xg = xf.reshape(grouped_dims)?;
    let rstd = (xg.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let mut out = xg.broadcast_mul(&rstd)?.reshape(shape)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    if let (Some(g), true) = (&gate, norm_before_gate) {
        out = out.mul(g)?;
    }
    out.to_dtype(x.dtype())
}

/// One row of [`gated_rms_norm`] on plain slices (the CPU kernel's own forward), for callers outside
/// candle such as the decode engine: y = RMSNorm_group(x·SiLU(z))·w, or RMSNorm_group(x)·w·SiLU(z) with
/// `norm_before_gate`; without `z`, RMSNorm per group (group = x.len() for a plain RMSNorm).
#[inline]
pub fn gated_rms_norm_row(x: &[f32], z: Option<&[f32]>, w: &[f32], eps: f32, group: usize, norm_before_gate: bool, y: &mut [f32]) {
    assert!(group > 0 && x.len() % group == 0 && w.len() == x.len() && y.len() == x.len(), "gated_rms_norm_row: sizes");
    assert!(z.is_none_or(|z| z.len() == x.len()), "gated_rms_norm_row: z has {} values for {}", z.map_or(0, |z| z.len()), x.len());
    let op = NormOp { eps, group, before_gate: norm_before_gate, gated: z.is_some() };
    op.row_fwd(x, z.unwrap_or(&[]), w, y);
}

#[derive(Clone, Copy)]
struct NormOp {
    eps: f32,
    group: usize,
    before_gate: bool,
    gated: bool,
}

const ROWS: usize = 32;

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp(-v))
}

impl NormOp {
    #[cfg(feature = "cuda")]
    fn cuda_cfg(&self) -> crate::cuda::norm::NormCfg {
        crate::cuda::norm::NormCfg { group: self.group, eps: self.eps, gated: self.gated, before_gate: self.before_gate }
    }

    /// Forward of one row (d channels).
    #[inline(always)]
    fn row_fwd(&self, x: &[f32], z: &[f32], w: &[f32], y: &mut [f32]) {
        let gs = self.group;
        if self.gated && !self.before_gate {
            for ((yo, &xv), &zv) in y.iter_mut().zip(x).zip(z) {
                *yo = xv * zv * sigmoid(zv);
            }
        } else {
            y.copy_from_slice(x);
        }
        for (yg, wg) in y.chunks_exact_mut(gs).zip(w.chunks_exact(gs)) {
            let mut acc = [0f32; 8];
            let mut it = yg.chunks_exact(8);
            for c in &mut it {
                for j in 0..8 {
                    acc[j] += c[j] * c[j];
                }
            }
            let ss = acc.iter().sum::<f32>() + it.remainder().iter().map(|v| v * v).sum::<f32>();
            let r = 1.0 / (ss / gs as f32 + self.eps).sqrt();
            for (yv, &wv) in yg.iter_mut().zip(wg) {
                *yv *= r * wv;
            }
        }
        if self.gated && self.before_gate {
            for (yo, &zv) in y.iter_mut().zip(z) {
                *yo *= zv * sigmoid(zv);
            }
        }
    }

    /// Backward of one row: writes dx, dz and adds into dw. Branch-free inner loops per gating mode.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn row_bwd(&self, x: &[f32], z: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dz: &mut [f32], dw: &mut [f32]) {
        let gs = self.group;
        let d = x.len();
        // u (the normalised input) goes to dz and the gate σ(z) to dx, as scratch, until the end.
        let gated_first = self.gated && !self.before_gate;
        let gated_after = self.gated && self.before_gate;
        if self.gated {
            for j in 0..d {
                dx[j] = sigmoid(z[j]);
            }
        }
        if gated_first {
            for j in 0..d {
                dz[j] = x[j] * z[j] * dx[j];
            }
        } else {
            dz[..d].copy_from_slice(x);
        }
        for gi in 0..d / gs {
            let rng = gi * gs..(gi + 1) * gs;
            let (u, sg, w, dy, dw) = (&mut dz[rng.clone()], &mut dx[rng.clone()], &w[rng.clone()], &dy[rng.clone()], &mut dw[rng.clone()]);
            let (xg, zg) = (&x[rng.clone()], &z[rng]);
            let mut ss = 0f32;
            for &v in u.iter() {
                ss += v * v;
            }
            let r = 1.0 / (ss / gs as f32 + self.eps).sqrt();
            // g = ∂L/∂(u·r) = dy·w (·silu(z) when the gate comes after).
            let mut gu = 0f32;
            for j in 0..gs {
                let gate = if gated_after { zg[j] * sg[j] } else { 1.0 };
                dw[j] += dy[j] * gate * u[j] * r;
                gu += dy[j] * gate * w[j] * u[j];
            }
            let c = r * r * r * gu / gs as f32;
            for j in 0..gs {
                let s = sg[j];
                let gate = if gated_after { zg[j] * s } else { 1.0 };
                let du = r * dy[j] * gate * w[j] - c * u[j];
                let dsilu = s * (1.0 + zg[j] * (1.0 - s));
                if gated_first {
                    // u = x ⊙ silu(z)
                    let dzj = du * xg[j] * dsilu;
                    sg[j] = du * zg[j] * s;
                    u[j] = dzj;
                } else if gated_after {
                    // y = (x·r·w) ⊙ silu(z)
                    let dzj = dy[j] * xg[j] * r * w[j] * dsilu;
                    sg[j] = du;
                    u[j] = dzj;
                } else {
                    sg[j] = du;
                    u[j] = 0.0;
                }
            }
        }
    }
}

#[multiversion(targets = "simd")]
fn fwd_rows(op: &NormOp, x: &[f32], z: &[f32], w: &[f32], y: &mut [f32], d: usize) {
    for ((xr, zr), yr) in x.chunks_exact(d).zip(z.chunks_exact(d)).zip(y.chunks_exact_mut(d)) {
        op.row_fwd(xr, zr, w, yr);
    }
}

#[multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn bwd_rows(op: &NormOp, x: &[f32], z: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dz: &mut [f32], dw: &mut [f32], d: usize) {
    for r in 0..x.len() / d {
        let s = r * d..(r + 1) * d;
        op.row_bwd(&x[s.clone()], &z[s.clone()], w, &dy[s.clone()], &mut dx[s.clone()], &mut dz[s], dw);
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "gated-rms-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, "rms norm x")?;
        let z = cpu_f32(s2, l2, "rms norm z")?;
        let w = cpu_f32(s3, l3, "rms norm weight")?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(ROWS * d).enumerate().for_each(|(i, yc)| {
            let s = i * ROWS * d..i * ROWS * d + yc.len();
            fwd_rows(self, &x[s.clone()], &z[s], w, yc, d);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::norm::fwd(self.cuda_cfg(), (s1, l1), (s2, l2), (s3, l3))
    }
    fn bwd(&self, x: &Tensor, z: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = Tensor::cat(&[&w.detach(), &grad.detach().contiguous()?.flatten_all()?], 0)?;
        let g = x.detach().apply_op3_no_bwd(&z.detach(), &packed, &NormBwdOp(*self))?;
        let n = x.elem_count();
        let dx = g.narrow(0, 0, n)?.reshape(x.shape())?;
        let dz = if self.gated { Some(g.narrow(0, n, n)?.reshape(z.shape())?) } else { None };
        let dw = g.narrow(0, 2 * n, w.elem_count())?;
        Ok((Some(dx), dz, Some(dw)))
    }
}

/// (x, z, [w | dy]) → 1-D [dx | dz | dw].
struct NormBwdOp(NormOp);

impl CustomOp3 for NormBwdOp {
    fn name(&self) -> &'static str {
        "gated-rms-norm-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, "rms norm x")?;
        let z = cpu_f32(s2, l2, "rms norm z")?;
        let packed = cpu_f32(s3, l3, "rms norm grads")?;
        let n = x.len();
        let d = packed.len() - n;
        let (w, dy) = packed.split_at(d);
        let mut out = vec![0f32; 2 * n + d];
        let (dxz, dw_out) = out.split_at_mut(2 * n);
        let (dx, dz) = dxz.split_at_mut(n);
        let (dxp, dzp) = (SendPtr(dx.as_mut_ptr()), SendPtr(dz.as_mut_ptr()));
        let rows = n / d;
        let partials: Vec<Vec<f32>> = (0..rows.div_ceil(ROWS))
            .into_par_iter()
            .map(|blk| {
                let r0 = blk * ROWS;
                let r1 = (r0 + ROWS).min(rows);
                let s = r0 * d..r1 * d;
                let mut dw = vec![0f32; d];
                // SAFETY: rows [r0, r1) of dx and dz belong to this task.
                let (dxs, dzs) = unsafe { (dxp.slice(r0 * d, (r1 - r0) * d), dzp.slice(r0 * d, (r1 - r0) * d)) };
                bwd_rows(&self.0, &x[s.clone()], &z[s.clone()], w, &dy[s], dxs, dzs, &mut dw, d);
                dw
            })
            .collect();
        for p in &partials {
            dw_out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::norm::bwd(self.0.cuda_cfg(), (s1, l1), (s2, l2), (s3, l3))
    }
}
