//! The Mamba (S6) mixer (`mamba_ssm.modules.mamba_simple.Mamba`, HF `MambaMixer`; FalconMamba's
//! RMS-normalised B/C/dt behind `bcdt_rms`).
//!
//! ```text
//! u (b, l, d_model) ─ in_proj ─┬─ x (E) ─ causal conv1d ─ SiLU ─ x_proj ─ dt_low (R), B (N), C (N)
//!                              └─ z (E)                         Δ = softplus(dt_proj(dt_low) + dt_bias)
//! y = selective_scan(x, Δ, A = −exp(A_log), B, C, D) ⊙ SiLU(z);  out = out_proj(y)
//! ```

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use ouro_kernels::conv::{causal_conv1d, causal_conv1d_step, conv_state_after};
use ouro_kernels::selective_scan::{selective_scan, selective_scan_step, ScanInput};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MambaConfig {
    pub d_model: usize,
    /// E = expand·d_model
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
    pub bias: bool,
    pub conv_bias: bool,
    /// FalconMamba: RMS-normalise B, C and dt_low (no weight) after x_proj.
    pub bcdt_rms: bool,
    pub bcdt_rms_eps: f64,
    /// A data-independent (LTI) baseline: Δ = softplus(dt_bias), and learned per-channel B, C (`B_lti`,
    /// `C_lti`, (E, N)) instead of x_proj/dt_proj — the S4D-like model the Mamba paper compares against.
    #[serde(default)]
    pub lti: bool,
}

impl MambaConfig {
    /// `mamba_ssm` defaults for a given width: expand 2, d_state 16, d_conv 4, dt_rank ⌈d/16⌉.
    pub fn new(d_model: usize) -> Self {
        Self {
            d_model,
            d_inner: 2 * d_model,
            d_state: 16,
            d_conv: 4,
            dt_rank: d_model.div_ceil(16),
            bias: false,
            conv_bias: true,
            bcdt_rms: false,
            bcdt_rms_eps: 1e-6,
            lti: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct MambaState {
    /// (b, d_conv − 1, E)
    pub conv: Tensor,
    /// (b, E, N), f32
    pub ssm: Tensor,
}

#[derive(Clone, Debug)]
pub struct Mamba {
    pub cfg: MambaConfig,
    pub in_proj: Linear,
    pub conv_weight: Tensor,
    pub conv_bias: Option<Tensor>,
    /// x_proj (absent in the LTI variant).
    pub x_proj: Option<Linear>,
    /// dt_proj weight (E, R) applied without its bias; the bias enters the scan as delta_bias.
    pub dt_proj_weight: Option<Tensor>,
    /// LTI variant: B, C (E, N).
    pub bc_lti: Option<(Tensor, Tensor)>,
    pub dt_proj_bias: Tensor,
    pub a_log: Tensor,
    pub d: Tensor,
    pub out_proj: Linear,
}

impl Mamba {
    pub fn new(cfg: MambaConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_projections(cfg, vb.clone(), vb)
    }

    /// A mixer whose `in_proj` and `out_proj` come from `proj_vb` (shared with another mixer — Caduceus
    /// ties the reverse direction's projections to the forward one's) and everything else from `vb`.
    pub fn with_projections(cfg: MambaConfig, vb: VarBuilder, proj_vb: VarBuilder) -> Result<Self> {
        let (e, n, r) = (cfg.d_inner, cfg.d_state, cfg.dt_rank);
        if e == 0 || n == 0 || r == 0 || cfg.d_conv == 0 {
            bail!("mamba: d_inner, d_state, dt_rank and d_conv must be positive ({cfg:?})");
        }
        let lin = |vb: &VarBuilder, name: &str, i: usize, o: usize, bias: bool| {
            if bias {
                candle_nn::linear(i, o, vb.pp(name))
            } else {
                candle_nn::linear_no_bias(i, o, vb.pp(name))
            }
        };
        Ok(Self {
            in_proj: lin(&proj_vb, "in_proj", cfg.d_model, 2 * e, cfg.bias)?,
            conv_weight: vb.get((e, 1, cfg.d_conv), "conv1d.weight")?,
            conv_bias: if cfg.conv_bias { Some(vb.get(e, "conv1d.bias")?) } else { None },
            x_proj: if cfg.lti { None } else { Some(lin(&vb, "x_proj", e, r + 2 * n, false)?) },
            dt_proj_weight: if cfg.lti { None } else { Some(vb.get((e, r), "dt_proj.weight")?) },
            bc_lti: if cfg.lti { Some((vb.get((e, n), "B_lti")?, vb.get((e, n), "C_lti")?)) } else { None },
            dt_proj_bias: vb.get(e, "dt_proj.bias")?,
            a_log: vb.get((e, n), "A_log")?,
            d: vb.get(e, "D")?,
            out_proj: lin(&proj_vb, "out_proj", e, cfg.d_model, cfg.bias)?,
            cfg,
        })
    }

    pub fn a(&self) -> Result<Tensor> {
        self.a_log.to_dtype(DType::F32)?.exp()?.neg()
    }

    /// x_proj → (Δ before bias (…, E), B (…, N) or (…, E, N), C likewise).
    fn ssm_params(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (r, n) = (self.cfg.dt_rank, self.cfg.d_state);
        let (Some(x_proj), Some(dt_w)) = (&self.x_proj, &self.dt_proj_weight) else {
            // LTI: constant Δ (its bias alone), and B, C per channel as groups of one channel.
            let (bl, cl) = self.bc_lti.as_ref().expect("LTI mixer has B_lti, C_lti");
            let mut lead = x.dims().to_vec();
            let delta = Tensor::zeros(lead.as_slice(), DType::F32, x.device())?;
            lead.push(n);
            let shape: Vec<usize> = lead.clone();
            let expand = |t: &Tensor| -> Result<Tensor> {
                let mut s = vec![1; shape.len() - 2];
                s.extend([self.cfg.d_inner, n]);
                t.to_dtype(DType::F32)?.reshape(s)?.broadcast_as(shape.as_slice())?.contiguous()
            };
            return Ok((delta, expand(bl)?, expand(cl)?));
        };
        let x_dbl = x_proj.forward(&x.to_dtype(x_proj.weight().dtype())?)?; // x: the conv's f32 output
        let mut dt_low = x_dbl.narrow(D::Minus1, 0, r)?;
        let mut bm = x_dbl.narrow(D::Minus1, r, n)?;
        let mut cm = x_dbl.narrow(D::Minus1, r + n, n)?;
        if self.cfg.bcdt_rms {
            let eps = self.cfg.bcdt_rms_eps;
            let norm = |t: &Tensor| -> Result<Tensor> {
                let t = t.to_dtype(DType::F32)?;
                t.broadcast_div(&(t.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?)
            };
            dt_low = norm(&dt_low)?;
            bm = norm(&bm)?;
            cm = norm(&cm)?;
        }
        // As a 2-D product of a contiguous lhs (cuBLAS takes neither the strided narrow nor a broadcast rhs).
        let mut lead = dt_low.dims().to_vec();
        lead.pop();
        let dt2 = dt_low.contiguous()?.reshape(((), r))?;
        let delta = dt2.matmul(&dt_w.t()?.to_dtype(dt2.dtype())?)?;
        lead.push(self.cfg.d_inner);
        Ok((delta.reshape(lead)?, bm, cm))
    }

    pub fn zero_state(&self, batch: usize) -> Result<MambaState> {
        let dev = self.a_log.device();
        Ok(MambaState {
            conv: Tensor::zeros((batch, self.cfg.d_conv - 1, self.cfg.d_inner), DType::F32, dev)?,
            ssm: Tensor::zeros((batch, self.cfg.d_inner, self.cfg.d_state), DType::F32, dev)?,
        })
    }

    /// Parallel forward over u (b, l, d_model); with `state`, continues from it and advances it.
    pub fn forward(&self, u: &Tensor, seq_idx: Option<&Tensor>, state: Option<&mut MambaState>) -> Result<Tensor> {
        let (_, _, dm) = u.dims3()?;
        if dm != self.cfg.d_model {
            bail!("mamba: input has width {dm}, the mixer expects d_model {}", self.cfg.d_model);
        }
        let e = self.cfg.d_inner;
        let xz = self.in_proj.forward(u)?;
        let (x_raw, z) = (xz.narrow(2, 0, e)?, xz.narrow(2, e, e)?);
        let conv_in = state.as_ref().map(|s| s.conv.clone());
        let x = causal_conv1d(&x_raw, &self.conv_weight, self.conv_bias.as_ref(), conv_in.as_ref(), seq_idx)?.silu()?;
        let (delta, bm, cm) = self.ssm_params(&x)?;
        let a = self.a()?;
        let mut inp = ScanInput::new(&x, &delta, &a, &bm, &cm);
        inp.d = Some(&self.d);
        inp.z = Some(&z);
        inp.delta_bias = Some(&self.dt_proj_bias);
        inp.delta_softplus = true;
        inp.seq_idx = seq_idx;
        let h0 = state.as_ref().map(|s| s.ssm.clone());
        inp.initial_state = h0.as_ref();
        let (y, last) = selective_scan(&inp)?;
        if let Some(st) = state {
            st.conv = conv_state_after(&x_raw, conv_in.as_ref(), self.cfg.d_conv, seq_idx)?;
            st.ssm = last;
        }
        self.out_proj.forward(&y.to_dtype(self.out_proj.weight().dtype())?)
    }

    /// One token per sequence: u (b, d_model) → (b, d_model).
    pub fn step(&self, u: &Tensor, state: &mut MambaState) -> Result<Tensor> {
        let e = self.cfg.d_inner;
        let xz = self.in_proj.forward(u)?;
        let (x_raw, z) = (xz.narrow(1, 0, e)?, xz.narrow(1, e, e)?);
        let (x, conv) = causal_conv1d_step(&state.conv, &x_raw, &self.conv_weight, self.conv_bias.as_ref())?;
        let x = x.silu()?;
        let (delta, bm, cm) = self.ssm_params(&x)?;
        let (y, ssm) = selective_scan_step(&state.ssm, &x, &delta, &self.a()?, &bm, &cm, Some(&self.d), Some(&z), Some(&self.dt_proj_bias), true)?;
        state.conv = conv;
        state.ssm = ssm;
        self.out_proj.forward(&y.to_dtype(self.out_proj.weight().dtype())?)
    }

    pub fn state_size(&self) -> usize {
        (self.cfg.d_conv - 1) * self.cfg.d_inner + self.cfg.d_inner * self.cfg.d_state
    }
}
