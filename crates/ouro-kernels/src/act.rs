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
        let sig = res.detach().neg()?.exp()?.affine(-1.0, 1.0)?;
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

/// GELU with the tanh approximation (PyTorch `gelu(approximate="tanh")`, HF `gelu_pytorch_tanh`):
/// ½x(1 + tanh(√(2/π)(x + 0.044715x³))). On the CPU a vectorised custom op with its backward (libm's
/// scalar tanhf dominated Hawk/Griffin training); elsewhere candle's `gelu`. Keeps the input dtype.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(GeluTanh)
}

const GELU_K: f32 = 0.797_884_6; // √(2/π)
const GELU_C: f32 = 0.044_715;

/// tanh(u) = 1 − 2/(1 + e^{2u}), branch-free on the vectorisable exp.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (1.0 + crate::cpu::exp(2.0 * u))
}

#[multiversion::multiversion(targets = "simd")]
fn gelu_tanh_fwd(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + tanh(GELU_K * (x + GELU_C * x * x * x)));
    }
}

/// dx = dy · (½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²)).
#[multiversion::multiversion(targets = "simd")]
fn gelu_tanh_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
        let t = tanh(GELU_K * (x + GELU_C * x * x * x));
        *dx = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x * x));
    }
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        const CHUNK: usize = 1 << 14;
        use rayon::prelude::*;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| gelu_tanh_fwd(x, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        arg.detach().apply_op2_no_bwd(&grad.detach().contiguous()?, &GeluTanhBwd).map(Some)
    }
}

struct GeluTanhBwd;

impl candle_core::CustomOp2 for GeluTanhBwd {
    fn name(&self) -> &'static str {
        "gelu-tanh-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (cpu_f32(s1, l1, "gelu x")?, cpu_f32(s2, l2, "gelu grad")?);
        let mut dx = vec![0f32; x.len()];
        const CHUNK: usize = 1 << 14;
        use rayon::prelude::*;
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| gelu_tanh_bwd(x, dy, dx));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gelu_tanh_matches_candle_and_its_gradient() -> Result<()> {
        let xs: Vec<f32> = (0..4001).map(|i| -12.0 + i as f32 * 0.006).collect();
        let x = Var::new(xs.as_slice(), &Device::Cpu)?;
        let ours = gelu_tanh(x.as_tensor())?;
        let reference = x.as_tensor().gelu()?;
        let err = (&ours - &reference)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 2e-6, "gelu_tanh vs candle gelu: max abs error {err}");
        // Gradient against candle's gelu backward and against central finite differences (in f64).
        let w = Tensor::new((0..4001).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
        let g_ours = ours.mul(&w)?.sum_all()?.backward()?.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
        let g_ref = reference.mul(&w)?.sum_all()?.backward()?.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
        let wv = w.to_vec1::<f32>()?;
        let f = |v: f64| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
        for i in 0..xs.len() {
            let h = 1e-4;
            let v = xs[i] as f64;
            let fd = (f(v + h) - f(v - h)) / (2.0 * h) * wv[i] as f64;
            assert!((g_ours[i] - g_ref[i]).abs() < 1e-5, "x={} ours {} candle {}", xs[i], g_ours[i], g_ref[i]);
            assert!((g_ours[i] as f64 - fd).abs() < 1e-5, "x={} ours {} finite difference {fd}", xs[i], g_ours[i]);
        }
        Ok(())
    }
}
