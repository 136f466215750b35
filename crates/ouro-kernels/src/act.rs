//! Elementwise activations not in candle, with backward passes.

use crate::util::cpu_f32;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// softplus(x) = log(1 + eˣ), with torch's threshold (x > 20 → x). Differentiable; f32.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(candle_core::DType::F32)?;
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Softplus)
    } else {
        // Device-generic form: log(1 + eˣ) below the threshold.
        let big = x.gt(20.0)?;
        let soft = (x.clamp(f32::MIN, 20f32)?.exp()? + 1.0)?.log()?;
        big.where_cond(&x, &soft)
    }
}

struct Softplus;

impl CustomOp1 for Softplus {
    fn name(&self) -> &'static str {
        "softplus"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "softplus")?;
        let y: Vec<f32> = x.iter().map(|&v| crate::cpu::softplus(v)).collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d/dx softplus = σ(x) = 1 − exp(−softplus(x)).
        let sig = res.neg()?.exp()?.affine(-1.0, 1.0)?;
        Ok(Some(grad.mul(&sig)?))
    }
}
