//! AdamW with weight-decay groups (PyTorch `torch.optim.AdamW` arithmetic), gradient clipping by global norm
//! (`clip_grad_norm_`), and the warmup + cosine learning-rate schedule.

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};
use std::collections::HashMap;

/// Whether a parameter gets weight decay: matrices and embeddings do; biases, norm weights and the SSM's
/// A_log, D and dt biases do not (`mamba_ssm` marks those `_no_weight_decay`).
pub fn decays(name: &str, rank: usize) -> bool {
    let no_decay = ["A_log", "D", "dt_bias", "dt_proj.bias", "z_bias"];
    if no_decay.iter().any(|n| name.ends_with(&format!(".{n}")) || name == *n) {
        return false;
    }
    rank >= 2
}

pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub t: u64,
}

impl AdamW {
    /// Parameters sorted by name (a fixed order makes runs reproducible).
    pub fn new(named: Vec<(String, Var)>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        let mut named = named;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, var)| {
                let decay = decays(&name, var.rank());
                let m = var.zeros_like()?.to_dtype(DType::F32)?;
                let v = m.clone();
                Ok(Param { name, var, decay, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, beta1, beta2, eps, weight_decay, t: 0 })
    }

    /// Adds one backward pass's gradients into `acc` (one slot per parameter, in parameter order).
    pub fn accumulate(&self, acc: &mut Vec<Option<Tensor>>, grads: &GradStore) -> Result<()> {
        acc.resize(self.params.len(), None);
        for (slot, p) in acc.iter_mut().zip(&self.params) {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                // Detached: a gradient produced by a custom op's backward can still reference this step's
                // forward graph, and the moments built from it would chain every step's graph (a leak).
                let g = g.detach().to_dtype(DType::F32)?;
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Global L2 norm of accumulated gradients.
    pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
        let mut total = 0f64;
        for g in grads.iter().flatten() {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(total.sqrt())
    }

    /// One AdamW step with learning rate `lr`, gradients scaled by `grad_scale` first (clipping and
    /// accumulation averaging).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let g = if grad_scale != 1.0 { (g * grad_scale)? } else { g };
            let mut w = p.var.as_tensor().to_dtype(DType::F32)?;
            if p.decay && self.weight_decay != 0.0 {
                w = (w * (1.0 - lr * self.weight_decay))?;
            }
            p.m = ((&p.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?.detach();
            p.v = ((&p.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
            let denom = ((p.v.sqrt()? / bc2_sqrt)? + self.eps)?;
            w = (w - (p.m.div(&denom)? * (lr / bc1))?)?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// Optimizer state as named tensors (m, v per parameter, and the step count).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        for p in &self.params {
            m.insert(format!("m.{}", p.name), p.m.clone());
            m.insert(format!("v.{}", p.name), p.v.clone());
        }
        m.insert("t".into(), Tensor::new(&[self.t as u32], self.params[0].m.device())?);
        Ok(m)
    }

    pub fn load_state(&mut self, s: &HashMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            let (Some(m), Some(v)) = (s.get(&format!("m.{}", p.name)), s.get(&format!("v.{}", p.name))) else {
                bail!("optimizer state has no moments for {}", p.name)
            };
            p.m = m.to_device(p.m.device())?;
            p.v = v.to_device(p.v.device())?;
        }
        self.t = s.get("t").ok_or_else(|| candle_core::Error::Msg("optimizer state has no step count".into()))?.to_vec1::<u32>()?[0] as u64;
        Ok(())
    }
}

/// Linear warmup to `lr`, then cosine decay to `min_lr` at `total` steps.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape};

    /// y = x², whose backward returns a gradient that still references the graph (2·x·grad with x tracked),
    /// as a custom op's backward may.
    struct Square;
    impl CustomOp1 for Square {
        fn name(&self) -> &'static str {
            "square"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            let x = s.as_slice::<f32>()?;
            Ok((CpuStorage::F32(x[l.start_offset()..].iter().map(|v| v * v).collect()), l.shape().clone()))
        }
        fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some((arg * 2.0)?.mul(grad)?))
        }
    }

    #[test]
    fn optimizer_state_holds_no_graph() -> Result<()> {
        let var = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], 0.9, 0.95, 1e-8, 0.0)?;
        for _ in 0..3 {
            let loss = var.as_tensor().apply_op1(Square)?.sum_all()?;
            let mut acc = Vec::new();
            opt.accumulate(&mut acc, &loss.backward()?)?;
            assert!(acc[0].as_ref().is_some_and(|g| !g.track_op()), "accumulated gradient tracks the graph");
            opt.step(&acc, 1e-2, 1.0)?;
            // A moment that tracked its inputs would chain every step's forward graph: memory growing per step.
            assert!(!opt.params[0].m.track_op() && !opt.params[0].v.track_op());
        }
        // AdamW moved every weight towards 0 (the minimum of Σ w²).
        let w = var.as_tensor().to_vec1::<f32>()?;
        for (a, b) in w.iter().zip([1f32, -2.0, 3.0]) {
            assert!(a.abs() < b.abs(), "{w:?}");
        }
        Ok(())
    }
}
