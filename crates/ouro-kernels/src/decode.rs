//! Mamba-2's single-token step for a batch of sequences (decode): the causal conv update, SiLU, the SSD
//! state update and the output, from the raw in_proj slices.
//!
//! ```text
//! xBC = SiLU(conv(conv_state ++ xBC_raw)),  dt = clamp(softplus(dt_raw + dt_bias)),  x, B, C = split(xBC)
//! S ← exp(dt·A)·S + dt·x ⊗ B,   y = S·C + D·x
//! ```
//!
//! On CUDA (feature `cuda`) one fused kernel does it all for the batch; elsewhere it is
//! [`causal_conv1d_step`] and [`ssd_step`] in candle ops, which is also the reference the kernel is tested
//! against.

use crate::conv::causal_conv1d_step;
use crate::ssd::{ssd_step, XbcShape};
use candle_core::{bail, Result, Tensor};

/// The inputs of one step.
#[derive(Clone, Copy)]
pub struct StepInput<'a> {
    /// (b, d_conv − 1, conv_dim), the last inputs of the conv
    pub conv_state: &'a Tensor,
    /// (b, conv_dim): this token's x, B, C before the conv
    pub xbc: &'a Tensor,
    /// (conv_dim, 1, d_conv) or (conv_dim, d_conv)
    pub conv_weight: &'a Tensor,
    /// (conv_dim)
    pub conv_bias: Option<&'a Tensor>,
    /// (b, h, p, n), f32
    pub ssm: &'a Tensor,
    /// (b, h), before bias and softplus
    pub dt: &'a Tensor,
    /// (h), negative
    pub a: &'a Tensor,
    /// (h)
    pub dt_bias: &'a Tensor,
    /// (h) or (h, p)
    pub d: &'a Tensor,
    pub dt_limit: (f64, f64),
    pub shape: XbcShape,
}

/// One step: returns (y (b, h, p) f32, new conv state, new SSM state).
pub fn mamba2_step(inp: &StepInput) -> Result<(Tensor, Tensor, Tensor)> {
    let XbcShape { heads: h, head_dim: p, groups: g, d_state: n } = inp.shape;
    let (b, cd) = inp.xbc.dims2()?;
    if cd != h * p + 2 * g * n {
        bail!("mamba2 step: xBC has {cd} channels, expected {} (heads·head_dim + 2·groups·d_state)", h * p + 2 * g * n);
    }
    if inp.ssm.dims() != [b, h, p, n] {
        bail!("mamba2 step: the SSM state must be ({b}, {h}, {p}, {n}), got {:?}", inp.ssm.dims());
    }
    #[cfg(feature = "cuda")]
    if inp.xbc.device().is_cuda() && n % 4 == 0 && inp.conv_weight.dims().last().is_some_and(|&k| k > 1) {
        return fused(inp);
    }
    composed(inp)
}

/// The step in candle ops (any device).
pub fn composed(inp: &StepInput) -> Result<(Tensor, Tensor, Tensor)> {
    let XbcShape { heads: h, head_dim: p, groups: g, d_state: n } = inp.shape;
    let b = inp.xbc.dim(0)?;
    let (xbc, conv) = causal_conv1d_step(inp.conv_state, inp.xbc, inp.conv_weight, inp.conv_bias)?;
    let xbc = xbc.silu()?;
    let x = xbc.narrow(1, 0, h * p)?.reshape((b, h, p))?;
    let bm = xbc.narrow(1, h * p, g * n)?.reshape((b, g, n))?;
    let cm = xbc.narrow(1, h * p + g * n, g * n)?.reshape((b, g, n))?;
    let (y, ssm) = ssd_step(inp.ssm, &x, inp.dt, inp.a, &bm, &cm, Some(inp.d), None, Some(inp.dt_bias), true, inp.dt_limit)?;
    Ok((y, conv, ssm))
}

#[cfg(feature = "cuda")]
fn fused(inp: &StepInput) -> Result<(Tensor, Tensor, Tensor)> {
    use crate::cuda::decode::DecodeOp;
    use candle_core::DType;
    let XbcShape { heads: h, head_dim: p, groups: g, d_state: n } = inp.shape;
    let (b, cd) = (inp.xbc.dim(0)?, h * p + 2 * g * n);
    // f32 and contiguous: no-ops for an f32 model's tensors.
    let f = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.contiguous() };
    let w = match inp.conv_weight.dims() {
        &[c, 1, k] | &[c, k] if c == cd => f(&inp.conv_weight.reshape((c, k))?)?,
        s => bail!("mamba2 step: conv weight must be ({cd}, 1, k) or ({cd}, k), got {s:?}"),
    };
    let k = w.dim(1)?;
    let mut ssm = f(inp.ssm)?;
    if ssm.layout().start_offset() % 4 != 0 {
        ssm = ssm.copy()?;
    }
    let op = DecodeOp {
        heads: h,
        head_dim: p,
        groups: g,
        d_state: n,
        width: k,
        dt_limit: (inp.dt_limit.0 as f32, inp.dt_limit.1 as f32),
        conv_state: f(inp.conv_state)?,
        xbc: f(inp.xbc)?,
        dt: f(inp.dt)?,
        conv_weight: w,
        a: f(inp.a)?,
        dt_bias: f(inp.dt_bias)?,
        d: f(inp.d)?,
        conv_bias: inp.conv_bias.map(f).transpose()?,
    };
    let out = ssm.apply_op1_no_bwd(&op)?;
    let (conv_off, s_off, _) = op.offsets(b);
    let y = out.narrow(0, 0, b * h * p)?.reshape((b, h, p))?;
    let conv = out.narrow(0, conv_off, b * (k - 1) * cd)?.reshape((b, k - 1, cd))?;
    let s = out.narrow(0, s_off, b * h * p * n)?.reshape((b, h, p, n))?;
    Ok((y, conv, s))
}
