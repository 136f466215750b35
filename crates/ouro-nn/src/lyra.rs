//! Lyra (Ramesh et al. 2025; `sameedmsiddiqui/lyra` `nn/lyra_base.py`): projected gated convolutions and an
//! S4D layer for biological sequence property prediction, ~50k parameters at width 64.
//!
//! ```text
//! x = encoder(u)                                       Linear(d_input → d)
//! x = PGC₀.₂₅(x);  x = PGC₂(x)                         PGC_e: xv = RMSNorm(in_proj(x)); x, v = split;
//!                                                      g = v ⊙ DepthwiseConv₃(x) ("same"); RMSNorm(out_proj(g))
//! x = dropout(S4D(RMSNorm(x))) + x
//! y = decoder(mean over the sequence of x)
//! ```
//! RMSNorm here is Lyra's (bzhang/rmsnorm): x / (‖x‖/√d + eps) · scale, eps 1e-8. Padding positions are
//! zeroed after every sequence-mixing layer and left out of the mean, so a batch of mixed lengths gives
//! each sequence the result it would get alone.

use crate::layers::{linear, linear_rows, mul_rows, rows_like};
use crate::s4d::S4d;
use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LyraConfig {
    pub d_input: usize,
    pub d_output: usize,
    pub d_model: usize,
    #[serde(default = "d_state")]
    pub d_state: usize,
    #[serde(default = "dropout")]
    pub dropout: f64,
}

fn d_state() -> usize {
    64
}
fn dropout() -> f64 {
    0.2
}

/// Lyra's RMSNorm: x / (‖x‖₂/√d + eps) · scale.
#[derive(Clone, Debug)]
pub struct LyraNorm {
    scale: Tensor,
    eps: f64,
}

impl LyraNorm {
    pub fn new(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { scale: vb.get_with_hints(d, "scale", candle_nn::Init::Const(1.0))?, eps })
    }
}

impl Module for LyraNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)? as f64;
        // The 1e-24 under the root keeps the gradient finite on all-zero rows (masked padding): d√s/ds is
        // infinite at 0. It changes ‖x‖ by at most 1e-12.
        let rms = ((x.sqr()?.sum_keepdim(D::Minus1)? + 1e-24)?.sqrt()? / d.sqrt())?;
        mul_rows(&x.broadcast_div(&(rms + self.eps)?)?, &self.scale)
    }
}

/// Projected gated convolution.
#[derive(Clone, Debug)]
pub struct Pgc {
    e: usize,
    in_proj: Linear,
    in_norm: LyraNorm,
    conv_w: Tensor,
    conv_b: Tensor,
    out_proj: Linear,
    out_norm: LyraNorm,
}

impl Pgc {
    pub fn new(d: usize, expansion: f64, vb: VarBuilder) -> Result<Self> {
        let e = (d as f64 * expansion) as usize;
        if e == 0 {
            bail!("PGC: expansion {expansion} of width {d} leaves no channels");
        }
        Ok(Self {
            e,
            in_proj: linear(vb.pp("in_proj"), d, 2 * e, true)?,
            in_norm: LyraNorm::new(2 * e, 1e-8, vb.pp("in_norm"))?,
            conv_w: vb.get((e, 1, 3), "conv.weight")?,
            conv_b: vb.get(e, "conv.bias")?,
            out_proj: linear(vb.pp("out_proj"), e, d, true)?,
            out_norm: LyraNorm::new(d, 1e-8, vb.pp("out_norm"))?,
        })
    }

    /// x (b, l, d); `mask` (b, l, 1) zeroes padding before the convolution.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xv = self.in_norm.forward(&linear_rows(&self.in_proj, x)?)?;
        let (xx, v) = (xv.narrow(2, 0, self.e)?.broadcast_mul(mask)?, xv.narrow(2, self.e, self.e)?);
        // Depthwise conv, kernel 3, padding 1: y_t = w0 x_{t−1} + w1 x_t + w2 x_{t+1} + b.
        let (b, l, e) = xx.dims3()?;
        let zero = Tensor::zeros((b, 1, e), DType::F32, x.device())?;
        let padded = Tensor::cat(&[&zero, &xx, &zero], 1)?;
        let w = self.conv_w.reshape((e, 3))?;
        let mut y = rows_like(&self.conv_b, &xx)?;
        for s in 0..3 {
            y = (y + mul_rows(&padded.narrow(1, s, l)?, &w.narrow(1, s, 1)?.squeeze(1)?)?)?;
        }
        self.out_norm.forward(&linear_rows(&self.out_proj, &(v * y)?)?)
    }
}

#[derive(Clone, Debug)]
pub struct Lyra {
    pub cfg: LyraConfig,
    encoder: Linear,
    pgc1: Pgc,
    pgc2: Pgc,
    s4d: S4d,
    norm: LyraNorm,
    decoder: Linear,
}

impl Lyra {
    /// Names as in `lyra_base.py` (encoder, pgc1, pgc2, s4d, norm, decoder).
    pub fn new(cfg: LyraConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            encoder: linear(vb.pp("encoder"), cfg.d_input, d, true)?,
            pgc1: Pgc::new(d, 0.25, vb.pp("pgc1"))?,
            pgc2: Pgc::new(d, 2.0, vb.pp("pgc2"))?,
            s4d: S4d::new(d, cfg.d_state, vb.pp("s4d"))?,
            norm: LyraNorm::new(d, 1e-8, vb.pp("norm"))?,
            decoder: linear(vb.pp("decoder"), d, cfg.d_output, true)?,
            cfg,
        })
    }

    /// u (b, l, d_input), mask (b, l) with 1 on real positions → (b, d_output). `drop` applies dropout to the
    /// S4D activations (identity at evaluation).
    pub fn forward(&self, u: &Tensor, mask: &Tensor, drop: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        self.forward_pooled(u, mask, mask, drop)
    }

    /// [`Lyra::forward`] with the pooling weights `pool` (b, l) of the head (the mask: mean pooling).
    pub fn forward_pooled(&self, u: &Tensor, mask: &Tensor, pool: &Tensor, drop: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, l, 1)
        let x = linear_rows(&self.encoder, &u.to_dtype(DType::F32)?)?.broadcast_mul(&m)?;
        let x = self.pgc1.forward(&x, &m)?.broadcast_mul(&m)?;
        let x = self.pgc2.forward(&x, &m)?.broadcast_mul(&m)?;
        let z = self.norm.forward(&x)?.broadcast_mul(&m)?;
        let x = (drop(&self.s4d.forward(&z, drop)?)? + x)?.broadcast_mul(&m)?;
        let w = pool.to_dtype(DType::F32)?.unsqueeze(2)?;
        // Σ_t w_t x_t as (b, 1, l) · (b, l, d): a sum over the middle axis is candle's slow CPU reduction.
        let pooled = w.transpose(1, 2)?.contiguous()?.matmul(&x.contiguous()?)?.squeeze(1)?.broadcast_div(&w.sum(1)?.clamp(1.0, f64::MAX)?)?;
        self.decoder.forward(&pooled)
    }

    pub fn s4d(&self) -> &S4d {
        &self.s4d
    }
}
