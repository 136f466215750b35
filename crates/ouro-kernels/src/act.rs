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

/// √x whose gradient is bounded: d/dx = 1/√max(4x, 1/max_grad²), i.e. at most `max_grad` (RecurrentGemma's
/// `SqrtBoundDerivative`, max_grad 1000), so that √(1 − a²) stays trainable as a → 1.
pub fn sqrt_bound(x: &Tensor, max_grad: f64) -> Result<Tensor> {
    let x = x.to_dtype(candle_core::DType::F32)?;
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(SqrtBound { max_grad })
    } else {
        x.sqrt()
    }
}

struct SqrtBound {
    max_grad: f64,
}

impl CustomOp1 for SqrtBound {
    fn name(&self) -> &'static str {
        "sqrt-bound"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "sqrt")?;
        Ok((CpuStorage::F32(x.iter().map(|v| v.sqrt()).collect()), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let floor = 1.0 / (self.max_grad * self.max_grad);
        let denom = (arg.detach() * 4.0)?.maximum(floor)?.sqrt()?;
        Ok(Some(grad.div(&denom)?))
    }
}
