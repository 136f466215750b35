//! RMSNorm and the gated RMSNorm of Mamba-2 (`mamba_ssm.ops.triton.layernorm_gated.rms_norm_ref`).
//! Computed in f32 with candle ops, so they are differentiable; the result has x's dtype.

use candle_core::{bail, DType, Result, Tensor, D};

/// x · rsqrt(mean(x², last dim) + eps) · w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    if w.dims() != [dim] {
        bail!("rms_norm: weight must be ({dim}), got shape {:?}", w.dims());
    }
    let xf = x.to_dtype(DType::F32)?;
    let rstd = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&rstd)?.broadcast_mul(&w.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

/// Gated RMSNorm over the last dim, normalised per group of `group_size` channels (None: all):
/// `norm_before_gate = false` (Mamba-2): rmsnorm(x ⊙ SiLU(z)) · w;
/// `norm_before_gate = true` (Hydra): rmsnorm(x) · w ⊙ SiLU(z).
pub fn gated_rms_norm(
    x: &Tensor,
    z: Option<&Tensor>,
    w: &Tensor,
    eps: f64,
    group_size: Option<usize>,
    norm_before_gate: bool,
) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    if w.dims() != [dim] {
        bail!("gated_rms_norm: weight must be ({dim}), got shape {:?}", w.dims());
    }
    let gs = group_size.unwrap_or(dim);
    if gs == 0 || dim % gs != 0 {
        bail!("gated_rms_norm: group_size {gs} does not divide the normalised dim {dim}");
    }
    let gate = match z {
        Some(z) => {
            if z.dims() != x.dims() {
                bail!("gated_rms_norm: z shape {:?} differs from x shape {:?}", z.dims(), x.dims());
            }
            Some(z.to_dtype(DType::F32)?.silu()?)
        }
        None => None,
    };
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
