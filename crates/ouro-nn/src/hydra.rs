//! Hydra (Hwang et al. 2024; `goombalab/hydra` `hydra/modules/hydra.py`): bidirectional Mamba-2 as a
//! quasiseparable matrix mixer.
//!
//! ```text
//! z, xBC, dt = in_proj(u);   xBC = SiLU(conv1d₇(xBC)) ("same" padding)    xBC = [x | B_f C_f | B_b C_b]
//! y₂ = SSD([x; flip x], [dt_f; flip dt_b] + dt_bias, A, [B_f; flip B_b], [C_f; flip C_b])  one batch of 2b
//! y₂ = shift y₂ by one step;   y = y_f + flip(y_b) + x ⊙ (fc_D(x) + D)
//! out = out_proj(RMSNorm(y) ⊙ SiLU(z))                                        norm before the gate
//! ```
//! Its mixing matrix is M = shift(SS_f) + flip(shift(SS_b)) + diag(D + fc_D(x)) ([`Hydra::materialize`]).

use crate::layers::linear;
use crate::matrix_mixer::{same_conv1d, shift_rows};
use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use ouro_kernels::norm::gated_rms_norm;
use ouro_kernels::ssd::{materialize, ssd, Algo, SsdInput, CPU_CHUNK};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HydraConfig {
    pub d_model: usize,
    #[serde(default = "d_state")]
    pub d_state: usize,
    #[serde(default = "d_conv")]
    pub d_conv: usize,
    #[serde(default = "two")]
    pub expand: usize,
    #[serde(default = "headdim")]
    pub headdim: usize,
    #[serde(default = "one")]
    pub ngroups: usize,
}

fn d_state() -> usize {
    64
}
fn d_conv() -> usize {
    7
}
fn two() -> usize {
    2
}
fn headdim() -> usize {
    64
}
fn one() -> usize {
    1
}

impl HydraConfig {
    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }
    pub fn nheads(&self) -> usize {
        self.d_inner() / self.headdim
    }
    fn gn(&self) -> usize {
        self.ngroups * self.d_state
    }
}

#[derive(Clone, Debug)]
pub struct Hydra {
    pub cfg: HydraConfig,
    in_proj: Linear,
    conv_w: Tensor,
    conv_b: Tensor,
    dt_bias: Tensor,
    a_log: Tensor,
    d: Tensor,
    fc_d: Linear,
    norm_w: Tensor,
    out_proj: Linear,
}

/// The two directions' SSD inputs, stacked on the batch axis.
struct Parts {
    z: Tensor,
    /// (b, L, H, P), the un-flipped x
    x: Tensor,
    x2: Tensor,
    dt2: Tensor,
    b2: Tensor,
    c2: Tensor,
}

impl Hydra {
    pub fn new(cfg: HydraConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.d_inner() % cfg.headdim != 0 || cfg.nheads() % cfg.ngroups != 0 {
            bail!("hydra: d_inner {} must split into heads of {} divisible into {} groups", cfg.d_inner(), cfg.headdim, cfg.ngroups);
        }
        let (e, h, gn) = (cfg.d_inner(), cfg.nheads(), cfg.gn());
        let conv_dim = e + 4 * gn;
        Ok(Self {
            in_proj: linear(vb.pp("in_proj"), cfg.d_model, 2 * e + 4 * gn + 2 * h, false)?,
            conv_w: vb.get((conv_dim, 1, cfg.d_conv), "conv1d.weight")?,
            conv_b: vb.get(conv_dim, "conv1d.bias")?,
            dt_bias: vb.get(h, "dt_bias")?,
            a_log: vb.get(h, "A_log")?,
            d: vb.get(h, "D")?,
            fc_d: linear(vb.pp("fc_D"), e, h, false)?,
            norm_w: vb.get(e, "norm.weight")?,
            out_proj: linear(vb.pp("out_proj"), e, cfg.d_model, false)?,
            cfg,
        })
    }

    fn parts(&self, u: &Tensor) -> Result<Parts> {
        let c = &self.cfg;
        let (b, l, _) = u.dims3()?;
        let (e, h, p, g, gn) = (c.d_inner(), c.nheads(), c.headdim, c.ngroups, c.gn());
        let proj = self.in_proj.forward(u)?;
        let z = proj.narrow(2, 0, e)?;
        let xbc = same_conv1d(&proj.narrow(2, e, e + 4 * gn)?.contiguous()?, &self.conv_w, &self.conv_b)?.silu()?;
        let dt = proj.narrow(2, 2 * e + 4 * gn, 2 * h)?;
        let flip = |t: &Tensor| t.contiguous()?.flip(&[1]);
        let x = xbc.narrow(2, 0, e)?.reshape((b, l, h, p))?;
        let x2 = Tensor::cat(&[&x, &flip(&x)?], 0)?;
        let dt2 = Tensor::cat(&[&dt.narrow(2, 0, h)?, &flip(&dt.narrow(2, h, h)?)?], 0)?.broadcast_add(&self.dt_bias)?;
        let bc = |o: usize| -> Result<Tensor> {
            let f = xbc.narrow(2, e + o, gn)?;
            let r = flip(&xbc.narrow(2, e + 2 * gn + o, gn)?)?;
            Tensor::cat(&[&f, &r], 0)?.reshape((2 * b, l, g, c.d_state))
        };
        Ok(Parts { z, x, x2, dt2, b2: bc(0)?, c2: bc(gn)? })
    }

    fn a(&self) -> Result<Tensor> {
        self.a_log.to_dtype(DType::F32)?.exp()?.neg()
    }

    /// The mixer's output before the gated norm: (b, L, H, P).
    pub fn mix(&self, u: &Tensor) -> Result<(Tensor, Tensor)> {
        let pr = self.parts(u)?;
        let (b, l, h, p) = pr.x.dims4()?;
        let a = self.a()?;
        let mut inp = SsdInput::new(&pr.x2, &pr.dt2, &a, &pr.b2, &pr.c2);
        inp.dt_softplus = true;
        let chunk = if u.device().is_cpu() { CPU_CHUNK } else { 256 };
        let (y, _) = ssd(&inp, Algo::Chunked(chunk))?; // (2b, L, H, P)
        let y = Tensor::cat(&[&Tensor::zeros((2 * b, 1, h, p), DType::F32, u.device())?, &y.narrow(1, 0, l - 1)?], 1)?;
        let (yf, yb) = (y.narrow(0, 0, b)?, y.narrow(0, b, b)?.contiguous()?.flip(&[1])?);
        let diag = self.fc_d.forward(&pr.x.reshape((b, l, h * p))?)?.broadcast_add(&self.d)?; // (b, L, H)
        Ok((((yf + yb)? + pr.x.broadcast_mul(&diag.unsqueeze(3)?)?)?, pr.z))
    }

    pub fn forward(&self, u: &Tensor) -> Result<Tensor> {
        let (y, z) = self.mix(u)?;
        let (b, l, _, _) = y.dims4()?;
        let y = gated_rms_norm(&y.reshape((b, l, self.cfg.d_inner()))?, Some(&z), &self.norm_w, 1e-5, None, true)?;
        self.out_proj.forward(&y)
    }

    /// The quasiseparable matrix (b, H, L, L) with mix(u) = M·x per head.
    pub fn materialize(&self, u: &Tensor) -> Result<Tensor> {
        let pr = self.parts(u)?;
        let (b, l, h, p) = pr.x.dims4()?;
        let dt2 = ouro_kernels::act::softplus(&pr.dt2)?;
        let ss = materialize(&dt2, &self.a()?, &pr.b2, &pr.c2, None, None)?; // (2b, H, L, L)
        let f = shift_rows(&ss.narrow(0, 0, b)?)?;
        let r = shift_rows(&ss.narrow(0, b, b)?)?.contiguous()?.flip(&[2, 3])?;
        let diag = self.fc_d.forward(&pr.x.reshape((b, l, h * p))?)?.broadcast_add(&self.d)?; // (b, L, H)
        let eye = Tensor::eye(l, DType::F32, u.device())?.reshape((1, 1, l, l))?;
        (f + r)? + eye.broadcast_mul(&diag.permute((0, 2, 1))?.unsqueeze(3)?)?
    }

    /// The x the matrix multiplies, (b, L, H, P).
    pub fn mixer_input(&self, u: &Tensor) -> Result<Tensor> {
        Ok(self.parts(u)?.x)
    }
}
