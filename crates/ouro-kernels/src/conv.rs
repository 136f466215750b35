//! Causal depthwise conv1d over time (Mamba's `conv1d` with padding k−1, truncated to L), channels-last.
//!
//! y_t[c] = bias[c] + Σ_{s<k} w[c, s] · x_{t−(k−1)+s}[c]
//!
//! The k−1 inputs before x come from a carried conv state (prefill continuing a sequence, or decode);
//! with `seq_idx`, an input from another document counts as 0 (the carried state belongs to the first
//! document of each row). The state kept between calls is the last k−1 inputs, (b, k−1, c).

use crate::cpu::SendPtr;
use crate::util::{cpu_f32, expect_dims, Segments};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

const ROWS_PER_TASK: usize = 64;

/// Sizes: batch, length, channels, kernel width.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    l: usize,
    c: usize,
    k: usize,
}

#[cfg(feature = "cuda")]
impl Dims {
    fn cuda(&self, bias: bool) -> crate::cuda::conv::ConvDims {
        crate::cuda::conv::ConvDims { b: self.b, l: self.l, c: self.c, k: self.k, bias }
    }
}

/// Document id of padded position u ∈ [0, l + k − 1) (the first k − 1 are the carried state).
#[inline(always)]
fn seg_ext(seg: &Segments, b: usize, l: usize, k: usize, u: usize) -> u32 {
    if u < k - 1 {
        seg.id(b, l, 0)
    } else {
        seg.id(b, l, u - (k - 1))
    }
}

/// Forward over the padded input xs (b, l+k−1, c) and transposed weights wt (k, c).
fn conv_fwd(d: Dims, xs: &[f32], wt: &[f32], seg: &Segments, y: &mut [f32]) {
    let Dims { l, c, k, .. } = d;
    let lp = l + k - 1;
    y.par_chunks_mut(ROWS_PER_TASK * c).enumerate().for_each(|(blk, yb)| {
        // Blocks are laid over the flattened (b, l) rows.
        let r0 = blk * ROWS_PER_TASK;
        for (ri, yr) in yb.chunks_exact_mut(c).enumerate() {
            let r = r0 + ri;
            let (bi, t) = (r / l, r % l);
            let st = seg.id(bi, l, t);
            yr.fill(0.0);
            for s in 0..k {
                let u = t + s;
                if seg_ext(seg, bi, l, k, u) != st {
                    continue;
                }
                axpy(yr, &wt[s * c..(s + 1) * c], &xs[(bi * lp + u) * c..][..c]);
            }
        }
    });
}

/// y += w ⊙ x
#[multiversion(targets = "simd")]
fn axpy(y: &mut [f32], w: &[f32], x: &[f32]) {
    for ((o, &a), &b) in y.iter_mut().zip(w).zip(x) {
        *o += a * b;
    }
}

/// Backward: dxs (b, l+k−1, c) and dw (c, k).
fn conv_bwd(d: Dims, xs: &[f32], wt: &[f32], dy: &[f32], seg: &Segments, dxs: &mut [f32], dw: &mut [f32]) {
    let Dims { b, l, c, k } = d;
    let lp = l + k - 1;
    // dxs[u] = Σ_s w[s] dy[u − s] over valid (t = u − s ∈ [0, l)).
    let dxp = SendPtr(dxs.as_mut_ptr());
    let n_blocks = (b * lp).div_ceil(ROWS_PER_TASK);
    (0..n_blocks).into_par_iter().for_each(|blk| {
        for r in blk * ROWS_PER_TASK..((blk + 1) * ROWS_PER_TASK).min(b * lp) {
            let (bi, u) = (r / lp, r % lp);
            let su = seg_ext(seg, bi, l, k, u);
            // SAFETY: row r of dxs is written by this task only.
            let dr = unsafe { dxp.slice(r * c, c) };
            dr.fill(0.0);
            for s in 0..k {
                if u < s || u - s >= l {
                    continue;
                }
                let t = u - s;
                if seg.id(bi, l, t) != su {
                    continue;
                }
                axpy(dr, &wt[s * c..(s + 1) * c], &dy[(bi * l + t) * c..][..c]);
            }
        }
    });
    // dw[s] = Σ_t dy[t] ⊙ xs[t + s]; partial sums per block of rows, added in block order (deterministic).
    let n_blocks = (b * l).div_ceil(ROWS_PER_TASK);
    let partials: Vec<Vec<f32>> = (0..n_blocks)
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![0f32; k * c];
            for r in blk * ROWS_PER_TASK..((blk + 1) * ROWS_PER_TASK).min(b * l) {
                let (bi, t) = (r / l, r % l);
                let st = seg.id(bi, l, t);
                for s in 0..k {
                    if seg_ext(seg, bi, l, k, t + s) != st {
                        continue;
                    }
                    fma_into(&mut acc[s * c..(s + 1) * c], &dy[r * c..(r + 1) * c], &xs[(bi * lp + t + s) * c..][..c]);
                }
            }
            acc
        })
        .collect();
    let mut partial = vec![0f32; k * c];
    for p in &partials {
        partial.iter_mut().zip(p).for_each(|(x, y)| *x += y);
    }
    for ch in 0..c {
        for s in 0..k {
            dw[ch * k + s] = partial[s * c + ch];
        }
    }
}

#[multiversion(targets = "simd")]
fn fma_into(acc: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &x), &y) in acc.iter_mut().zip(a).zip(b) {
        *o += x * y;
    }
}

/// The conv as an op over the padded input xs (b, l+k−1, c) and the weight (c, k), or with `bias` the
/// weight with the bias as an extra last column (c, k+1).
struct ConvOp {
    seg: Segments,
    bias: bool,
}

fn dims_of(lx: &Layout, lw: &Layout, bias: bool) -> Result<Dims> {
    let (b, lp, c) = lx.shape().dims3()?;
    let (_, kb) = lw.shape().dims2()?;
    let k = kb - bias as usize;
    Ok(Dims { b, l: lp + 1 - k, c, k })
}

/// Splits a (c, k[+1]) weight into the transposed taps (k, c) and the bias (c, or empty).
fn taps_and_bias(w: &[f32], d: &Dims, bias: bool) -> (Vec<f32>, Vec<f32>) {
    let kb = d.k + bias as usize;
    let mut wt = vec![0f32; d.k * d.c];
    let mut b = vec![0f32; if bias { d.c } else { 0 }];
    for ch in 0..d.c {
        for s in 0..d.k {
            wt[s * d.c + ch] = w[ch * kb + s];
        }
        if bias {
            b[ch] = w[ch * kb + d.k];
        }
    }
    (wt, b)
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "causal-conv1d"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = dims_of(l1, l2, self.bias)?;
        let xs = cpu_f32(s1, l1, "conv1d input")?;
        let (wt, bias) = taps_and_bias(cpu_f32(s2, l2, "conv1d weight")?, &d, self.bias);
        let mut y = vec![0f32; d.b * d.l * d.c];
        conv_fwd(d, xs, &wt, &self.seg, &mut y);
        if self.bias {
            y.par_chunks_mut(d.c).for_each(|r| r.iter_mut().zip(&bias).for_each(|(o, b)| *o += b));
        }
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.l, d.c))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::conv::fwd(dims_of(l1, l2, self.bias)?.cuda(self.bias), &self.seg, (s1, l1), (s2, l2))
    }
    fn bwd(&self, xs: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = ConvBwdOp { seg: self.seg.clone(), bias: self.bias };
        let g = xs.detach().apply_op3_no_bwd(&w.detach(), &grad.detach().contiguous()?, &op)?;
        let nx = xs.elem_count();
        let dxs = g.narrow(0, 0, nx)?.reshape(xs.shape())?;
        let dw = g.narrow(0, nx, w.elem_count())?.reshape(w.shape())?;
        Ok((Some(dxs), Some(dw)))
    }
}

/// (xs, w, dy) → 1-D [dxs | dw] (dw with the bias gradient as its last column when `bias`).
struct ConvBwdOp {
    seg: Segments,
    bias: bool,
}

impl CustomOp3 for ConvBwdOp {
    fn name(&self) -> &'static str {
        "causal-conv1d-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims_of(l1, l2, self.bias)?;
        let xs = cpu_f32(s1, l1, "conv1d input")?;
        let (wt, _) = taps_and_bias(cpu_f32(s2, l2, "conv1d weight")?, &d, self.bias);
        let dy = cpu_f32(s3, l3, "conv1d grad")?;
        let nx = xs.len();
        let kb = d.k + self.bias as usize;
        let mut out = vec![0f32; nx + d.c * kb];
        let (dxs, dwb) = out.split_at_mut(nx);
        let mut dw = vec![0f32; d.c * d.k];
        conv_bwd(d, xs, &wt, dy, &self.seg, dxs, &mut dw);
        for ch in 0..d.c {
            dwb[ch * kb..ch * kb + d.k].copy_from_slice(&dw[ch * d.k..(ch + 1) * d.k]);
        }
        if self.bias {
            for r in dy.chunks_exact(d.c) {
                for ch in 0..d.c {
                    dwb[ch * kb + d.k] += r[ch];
                }
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::conv::bwd(dims_of(l1, l2, self.bias)?.cuda(self.bias), &self.seg, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// Accepts PyTorch's (c, 1, k) or a plain (c, k) weight.
fn weight_2d(w: &Tensor) -> Result<Tensor> {
    match w.dims() {
        &[c, 1, k] => w.reshape((c, k)),
        &[_, _] => Ok(w.clone()),
        s => bail!("conv1d weight must be (channels, 1, width) or (channels, width), got shape {s:?}"),
    }
}

/// The conv in candle ops (any device, differentiable through candle): k shifted multiply-adds over the
/// padded input xs (b, k−1+l, c) and weight (c, k); with document boundaries, each tap is masked where
/// its input lies in another document than the output (as [`conv_fwd`]).
fn conv_taps(xs: &Tensor, w: &Tensor, seg: &Segments, (b, l, c): (usize, usize, usize)) -> Result<Tensor> {
    let k = w.dim(1)?;
    let mask = if seg.is_none() {
        None
    } else {
        let v: Vec<f32> = (0..k)
            .flat_map(|s| (0..b).flat_map(move |bi| (0..l).map(move |t| (seg_ext(seg, bi, l, k, t + s) == seg.id(bi, l, t)) as u8 as f32)))
            .collect();
        Some(Tensor::from_vec(v, (k, b, l, 1), xs.device())?)
    };
    let mut acc = Tensor::zeros((b, l, c), DType::F32, xs.device())?;
    for s in 0..k {
        let mut term = xs.narrow(1, s, l)?.broadcast_mul(&w.narrow(1, s, 1)?.squeeze(1)?)?;
        if let Some(m) = &mask {
            term = term.broadcast_mul(&m.get(s)?)?;
        }
        acc = (acc + term)?;
    }
    Ok(acc)
}

/// Causal depthwise conv1d. x (b, l, c); weight (c, 1, k) or (c, k); bias (c); `state` (b, k−1, c) holds the
/// inputs before x (zeros when absent); `seq_idx` (b, l). Returns y (b, l, c) in f32 (no activation).
pub fn causal_conv1d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: Option<&Tensor>,
    seq_idx: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, l, c) = match x.dims() {
        &[b, l, c] => (b, l, c),
        s => bail!("conv1d: x must be (batch, len, channels), got shape {s:?}"),
    };
    if l == 0 {
        bail!("conv1d: empty sequence (len 0)");
    }
    let w = weight_2d(weight)?.to_dtype(DType::F32)?.contiguous()?;
    let (wc, k) = w.dims2()?;
    if wc != c || k == 0 {
        bail!("conv1d: weight has {wc} channels and width {k}, input has {c} channels");
    }
    let seg = Segments::from_tensor(seq_idx, b, l)?;
    let x = x.to_dtype(DType::F32)?;
    let xs = match (state, k > 1) {
        (_, false) => x.clone(),
        (Some(s), true) => {
            expect_dims(s, &[b, k - 1, c], "conv1d: state")?;
            Tensor::cat(&[&s.to_dtype(DType::F32)?, &x], 1)?
        }
        (None, true) => Tensor::cat(&[&Tensor::zeros((b, k - 1, c), DType::F32, x.device())?, &x], 1)?,
    };
    if x.device().is_cpu() || x.device().is_cuda() {
        let (wb, has_bias) = match bias {
            Some(bias) => {
                expect_dims(bias, &[c], "conv1d: bias")?;
                (Tensor::cat(&[&w, &bias.to_dtype(DType::F32)?.unsqueeze(1)?], 1)?.contiguous()?, true)
            }
            None => (w, false),
        };
        return xs.contiguous()?.apply_op2(&wb, ConvOp { seg, bias: has_bias });
    }
    let y = conv_taps(&xs, &w, &seg, (b, l, c))?;
    match bias {
        Some(bias) => {
            expect_dims(bias, &[c], "conv1d: bias")?;
            y.broadcast_add(&bias.to_dtype(DType::F32)?)
        }
        None => Ok(y),
    }
}

/// The conv state after x: the last k−1 inputs (b, k−1, c), taking older ones from `state` when l < k−1.
/// With `seq_idx`, inputs before the last document's start are zeroed.
pub fn conv_state_after(x: &Tensor, state: Option<&Tensor>, k: usize, seq_idx: Option<&Tensor>) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    if k <= 1 {
        return Tensor::zeros((b, 0, c), DType::F32, x.device());
    }
    let x = x.to_dtype(DType::F32)?;
    let prev = match state {
        Some(s) => s.to_dtype(DType::F32)?,
        None => Tensor::zeros((b, k - 1, c), DType::F32, x.device())?,
    };
    let xs = Tensor::cat(&[&prev, &x], 1)?; // (b, l + k − 1, c)
    let tail = xs.narrow(1, l, k - 1)?;
    match seq_idx {
        None => Ok(tail),
        Some(si) => {
            let seg = Segments::from_tensor(Some(si), b, l)?;
            let mut m = vec![0f32; b * (k - 1)];
            for bi in 0..b {
                let last = seg.id(bi, l, l - 1);
                for j in 0..k - 1 {
                    let u = l + j; // padded index
                    m[bi * (k - 1) + j] = (seg_ext(&seg, bi, l, k, u) == last) as u8 as f32;
                }
            }
            let m = Tensor::from_vec(m, (b, k - 1, 1), x.device())?;
            tail.broadcast_mul(&m)
        }
    }
}

/// One decode step: state (b, k−1, c), x (b, c) → (y (b, c), new state). No activation.
pub fn causal_conv1d_step(state: &Tensor, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (b, c) = x.dims2()?;
    let w = weight_2d(weight)?.to_dtype(DType::F32)?;
    let (_, k) = w.dims2()?;
    expect_dims(state, &[b, k - 1, c], "conv1d step: state")?;
    let window = Tensor::cat(&[&state.to_dtype(DType::F32)?, &x.to_dtype(DType::F32)?.unsqueeze(1)?], 1)?; // (b, k, c)
    let mut y = window.broadcast_mul(&w.t()?.unsqueeze(0)?)?.sum(1)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    let new_state = window.narrow(1, 1, k - 1)?;
    Ok((y, new_state))
}

#[cfg(test)]
mod taps_tests {
    use super::*;
    use crate::testing::{rel_err, Gen};

    /// The device-generic path (devices without a conv kernel) equals the CPU kernel, with document boundaries and a
    /// carried state, forward and gradients.
    #[test]
    fn candle_ops_path_matches_the_cpu_kernel_with_documents() {
        let (b, l, c, k) = (2, 13, 5, 4);
        let mut r = Gen::new(3);
        let x = candle_core::Var::from_tensor(&r.normal(&[b, l, c], 1.0)).unwrap();
        let w = candle_core::Var::from_tensor(&r.normal(&[c, k], 1.0)).unwrap();
        let st = r.normal(&[b, k - 1, c], 1.0);
        let ids: Vec<u32> = (0..b * l).map(|i| [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3][i % l] + (i / l) as u32).collect();
        let seq_idx = Tensor::from_vec(ids, (b, l), &candle_core::Device::Cpu).unwrap();
        let dy = r.normal(&[b, l, c], 1.0);
        let want = causal_conv1d(&x, &w, None, Some(&st), Some(&seq_idx)).unwrap();
        let xs = Tensor::cat(&[&st, x.as_tensor()], 1).unwrap();
        let seg = Segments::from_tensor(Some(&seq_idx), b, l).unwrap();
        let got = conv_taps(&xs, &w, &seg, (b, l, c)).unwrap();
        assert!(rel_err(&got, &want) < 1e-6, "{}", rel_err(&got, &want));
        let gw = (want * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (got * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let e = rel_err(gg.get(v.as_tensor()).unwrap(), gw.get(v.as_tensor()).unwrap());
            assert!(e < 1e-5, "gradient {e}");
        }
    }
}
