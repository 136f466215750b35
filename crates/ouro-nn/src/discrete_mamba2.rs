//! The discrete Mamba-2 mixer of MOHAWK / Phi-Mamba / Llamba (`goombalab/phi-mamba`
//! `modules/mixers/discrete_mamba2.py`, copied into `cartesia-ai/edge` Llamba).
//!
//! ```text
//! u ─ in_proj ─┬─ xBC (E + 2·H_qk·N) ─ conv1d (causal, k=4) ─ act (identity by default) ─ x (H_v, P), B, C (H_qk, N)
//!              ├─ z (E)
//!              └─ A_log (H_v): per-step decay a_t = exp(−softplus(A_log_t))
//! S_t = a_t·S_{t−1} + x_t ⊗ B_t ;  y_t = S_t·C_t + D·x_t ;  out = out_proj(y ⊙ SiLU(z + z_bias))
//! ```
//!
//! There is no Δ on the input (the reference divides x by softplus(A_log) and multiplies it back; here
//! the scan takes x directly), and no norm. B/C heads are groups: value head h reads qk head h / (H_v/H_qk).

use crate::layers::{linear, Act};
use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use ouro_kernels::conv::{causal_conv1d, causal_conv1d_step, conv_state_after};
use ouro_kernels::ssd::{materialize_discrete, scan, scan_step, Algo, CPU_CHUNK};
use ouro_kernels::Segments;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscreteMamba2Config {
    pub d_model: usize,
    pub d_state: usize,
    pub n_v_heads: usize,
    pub n_qk_heads: usize,
    pub expand: usize,
    pub d_conv: usize,
    pub conv_bias: bool,
    /// Bias of in_proj/out_proj; without it the mixer has a separate `z_bias`.
    pub bias: bool,
    /// Activation after the conv: "identity" (default) or "silu".
    pub activation: String,
    pub chunk_size: usize,
}

impl DiscreteMamba2Config {
    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }
    pub fn headdim(&self) -> usize {
        self.d_inner() / self.n_v_heads
    }
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.n_qk_heads * self.d_state
    }
}

#[derive(Clone, Debug)]
pub struct DiscreteMamba2 {
    pub cfg: DiscreteMamba2Config,
    pub in_proj: Linear,
    pub conv_weight: Tensor,
    pub conv_bias: Option<Tensor>,
    pub z_bias: Option<Tensor>,
    pub d: Tensor,
    pub out_proj: Linear,
    act: Option<Act>,
}

/// State: conv inputs (b, d_conv−1, conv_dim) and SSM state (b, H_v, P, N).
pub type DiscreteMamba2State = crate::mamba2::Mamba2State;

impl DiscreteMamba2 {
    pub fn new(cfg: DiscreteMamba2Config, vb: VarBuilder) -> Result<Self> {
        let (e, hv, hq, n) = (cfg.d_inner(), cfg.n_v_heads, cfg.n_qk_heads, cfg.d_state);
        if hv == 0 || hq == 0 || hv % hq != 0 || e % hv != 0 {
            bail!("discrete mamba2: n_v_heads {hv} must be a multiple of n_qk_heads {hq} and divide d_inner {e}");
        }
        let act = match cfg.activation.as_str() {
            "identity" | "" => None,
            other => Some(Act::parse(other)?),
        };
        Ok(Self {
            in_proj: linear(vb.pp("in_proj"), cfg.d_model, 2 * e + 2 * hq * n + hv, cfg.bias)?,
            conv_weight: vb.get((cfg.conv_dim(), 1, cfg.d_conv), "conv1d.weight")?,
            conv_bias: if cfg.conv_bias { Some(vb.get(cfg.conv_dim(), "conv1d.bias")?) } else { None },
            z_bias: if cfg.bias { None } else { Some(vb.get_with_hints(e, "z_bias", candle_nn::Init::Const(0.0))?) },
            d: vb.get_with_hints(hv, "D", candle_nn::Init::Const(1.0))?,
            out_proj: linear(vb.pp("out_proj"), e, cfg.d_model, cfg.bias)?,
            act,
            cfg,
        })
    }

    fn split(&self, proj: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (e, cd) = (self.cfg.d_inner(), self.cfg.conv_dim());
        Ok((proj.narrow(D::Minus1, 0, cd)?, proj.narrow(D::Minus1, cd, e)?, proj.narrow(D::Minus1, cd + e, self.cfg.n_v_heads)?))
    }

    fn activate(&self, t: Tensor) -> Result<Tensor> {
        match self.act {
            Some(a) => a.apply(&t),
            None => Ok(t),
        }
    }

    /// Per-step log decay −softplus(A_log) (…, H_v), f32.
    fn log_decay(a_log: &Tensor) -> Result<Tensor> {
        ouro_kernels::act::softplus(a_log)?.neg()
    }

    fn gate_out(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(DType::F32)?;
        let z = match &self.z_bias {
            Some(zb) => z.broadcast_add(&zb.to_dtype(DType::F32)?)?,
            None => z,
        };
        let g = (y * z.silu()?)?;
        self.out_proj.forward(&g.to_dtype(self.out_proj.weight().dtype())?)
    }

    pub fn zero_state(&self, batch: usize) -> Result<DiscreteMamba2State> {
        let c = &self.cfg;
        let dev = self.d.device();
        Ok(DiscreteMamba2State {
            conv: Tensor::zeros((batch, c.d_conv - 1, c.conv_dim()), DType::F32, dev)?,
            ssm: Tensor::zeros((batch, c.n_v_heads, c.headdim(), c.d_state), DType::F32, dev)?,
        })
    }

    /// The parts the scan needs: x (b, l, H_v, P), log decays (b, l, H_v), B, C (b, l, H_qk, N), z.
    fn prepare(&self, u: &Tensor, seq_idx: Option<&Tensor>, conv_state: Option<&Tensor>) -> Result<[Tensor; 6]> {
        let c = &self.cfg;
        let (b, l, _) = u.dims3()?;
        let (xbc_raw, z, a_log) = self.split(&self.in_proj.forward(u)?)?;
        let xbc = self.activate(causal_conv1d(&xbc_raw, &self.conv_weight, self.conv_bias.as_ref(), conv_state, seq_idx)?)?;
        let (e, hv, hq, n) = (c.d_inner(), c.n_v_heads, c.n_qk_heads, c.d_state);
        let x = xbc.narrow(2, 0, e)?.reshape((b, l, hv, c.headdim()))?;
        let bm = xbc.narrow(2, e, hq * n)?.reshape((b, l, hq, n))?;
        let cm = xbc.narrow(2, e + hq * n, hq * n)?.reshape((b, l, hq, n))?;
        Ok([x, Self::log_decay(&a_log)?, bm, cm, z, xbc_raw])
    }

    pub fn forward(&self, u: &Tensor, seq_idx: Option<&Tensor>, state: Option<&mut DiscreteMamba2State>) -> Result<Tensor> {
        let chunk = if u.device().is_cpu() { CPU_CHUNK } else { self.cfg.chunk_size };
        self.forward_with(u, seq_idx, state, Algo::Chunked(chunk))
    }

    pub fn forward_with(&self, u: &Tensor, seq_idx: Option<&Tensor>, state: Option<&mut DiscreteMamba2State>, algo: Algo) -> Result<Tensor> {
        let (b, l, dm) = u.dims3()?;
        if dm != self.cfg.d_model {
            bail!("discrete mamba2: input has width {dm}, the mixer expects d_model {}", self.cfg.d_model);
        }
        let conv_in = state.as_ref().map(|s| s.conv.clone());
        let [x, a, bm, cm, z, xbc_raw] = self.prepare(u, seq_idx, conv_in.as_ref())?;
        let s0 = state.as_ref().map(|s| s.ssm.clone());
        let (y, sf) = scan(&x, &a, &bm, &cm, s0.as_ref(), seq_idx, algo)?;
        let y = self.add_d(&y, &x)?;
        if let Some(st) = state {
            st.conv = conv_state_after(&xbc_raw, conv_in.as_ref(), self.cfg.d_conv, seq_idx)?;
            st.ssm = sf;
        }
        self.gate_out(&y.reshape((b, l, self.cfg.d_inner()))?, &z)
    }

    fn add_d(&self, y: &Tensor, x: &Tensor) -> Result<Tensor> {
        let d = self.d.to_dtype(DType::F32)?;
        let shape: Vec<usize> = std::iter::repeat_n(1, x.rank() - 2).chain([self.cfg.n_v_heads, 1]).collect();
        y.add(&x.to_dtype(DType::F32)?.broadcast_mul(&d.reshape(shape)?)?)
    }

    /// One token per sequence: u (b, d_model) → (b, d_model).
    pub fn step(&self, u: &Tensor, state: &mut DiscreteMamba2State) -> Result<Tensor> {
        let c = &self.cfg;
        let b = u.dim(0)?;
        let (xbc, z, a_log) = self.split(&self.in_proj.forward(u)?)?;
        let (xbc, conv) = causal_conv1d_step(&state.conv, &xbc, &self.conv_weight, self.conv_bias.as_ref())?;
        let xbc = self.activate(xbc)?;
        let (e, hv, hq, n) = (c.d_inner(), c.n_v_heads, c.n_qk_heads, c.d_state);
        let x = xbc.narrow(1, 0, e)?.reshape((b, hv, c.headdim()))?;
        let bm = xbc.narrow(1, e, hq * n)?.reshape((b, hq, n))?;
        let cm = xbc.narrow(1, e + hq * n, hq * n)?.reshape((b, hq, n))?;
        let (y, ssm) = scan_step(&state.ssm, &x, &Self::log_decay(&a_log)?, &bm, &cm)?;
        let y = self.add_d(&y, &x)?;
        state.conv = conv;
        state.ssm = ssm;
        self.gate_out(&y.reshape((b, e))?, &z)
    }

    /// The mixer's L×L matrix per value head (b, H_v, l, l): T[i, j] = ⟨C_i, B_j⟩·Π_{j<k≤i} a_k, plus D on the
    /// diagonal — the matrix MOHAWK's stage 1 aligns with the teacher's attention.
    pub fn materialize(&self, u: &Tensor, with_d: bool) -> Result<Tensor> {
        let l = u.dim(1)?;
        let [_, a, bm, cm, _, _] = self.prepare(u, None, None)?;
        let m = materialize_discrete(&a, &bm, &cm, &Segments::none())?;
        if !with_d {
            return Ok(m);
        }
        let eye = Tensor::eye(l, DType::F32, u.device())?.reshape((1, 1, l, l))?;
        let d = self.d.to_dtype(DType::F32)?.reshape((1, self.cfg.n_v_heads, 1, 1))?;
        m.broadcast_add(&eye.broadcast_mul(&d)?)
    }

    pub fn state_size(&self) -> usize {
        let c = &self.cfg;
        (c.d_conv - 1) * c.conv_dim() + c.d_inner() * c.d_state
    }
}
