//! Hawk/Griffin's recurrent block with the RG-LRU (De et al. 2024; `google-deepmind/recurrentgemma`,
//! HF `RecurrentGemmaRecurrentBlock` / `RecurrentGemmaRglru`).
//!
//! ```text
//! y = GeLU_tanh(linear_y(x))
//! u = Conv1D(linear_x(x))                                   causal, width 4, bias, no activation
//! gate_x = σ(BlockDiag_x(u)),  gate_a = σ(BlockDiag_a(u))   H blocks of W/H channels
//! log a_t = −8·gate_a·softplus(Λ);  a_t = exp(log a_t)
//! h_t = a_t·h_{t−1} + √(1 − a_t²)·gate_x·u_t                (a_t := 0 and √· := 1 at segment starts)
//! out = linear_out(h ⊙ y)
//! ```
//! The state is (conv inputs (b, 3, W), h (b, W) in f32), constant in the context length.

use crate::layers::linear;
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use ouro_kernels::conv::{causal_conv1d, causal_conv1d_step, conv_state_after};
use ouro_kernels::linear_scan::{linear_scan, ScanAlgo};

/// Gradient bound of √(1 − a²) (RecurrentGemma's `_MAX_SQRT_GRADIENT`).
const MAX_SQRT_GRADIENT: f64 = 1000.0;

#[derive(Clone, Debug)]
pub struct RgLruState {
    /// (b, conv_width − 1, W)
    pub conv: Tensor,
    /// (b, W), f32
    pub h: Tensor,
}

#[derive(Clone, Debug)]
pub struct RecurrentBlock {
    pub width: usize,
    pub heads: usize,
    linear_y: Linear,
    linear_x: Linear,
    linear_out: Linear,
    conv_weight: Tensor,
    conv_bias: Tensor,
    conv_width: usize,
    recurrent_param: Tensor,
    input_gate_weight: Tensor,
    input_gate_bias: Tensor,
    recurrent_gate_weight: Tensor,
    recurrent_gate_bias: Tensor,
    pub scan: ScanAlgo,
}

impl RecurrentBlock {
    /// HF names under `vb` (`linear_y`, `linear_x`, `linear_out`, `conv_1d`, `rg_lru.*`).
    pub fn new(d_model: usize, width: usize, heads: usize, conv_width: usize, vb: VarBuilder) -> Result<Self> {
        if heads == 0 || width % heads != 0 {
            bail!("rg-lru: lru_width {width} is not divisible into {heads} blocks");
        }
        let bw = width / heads;
        let r = vb.pp("rg_lru");
        Ok(Self {
            width,
            heads,
            linear_y: linear(vb.pp("linear_y"), d_model, width, true)?,
            linear_x: linear(vb.pp("linear_x"), d_model, width, true)?,
            linear_out: linear(vb.pp("linear_out"), width, d_model, true)?,
            conv_weight: vb.get((width, 1, conv_width), "conv_1d.weight")?,
            conv_bias: vb.get(width, "conv_1d.bias")?,
            conv_width,
            recurrent_param: r.get(width, "recurrent_param")?,
            input_gate_weight: r.get((heads, bw, bw), "input_gate_weight")?,
            input_gate_bias: r.get((heads, bw), "input_gate_bias")?,
            recurrent_gate_weight: r.get((heads, bw, bw), "recurrent_gate_weight")?,
            recurrent_gate_bias: r.get((heads, bw), "recurrent_gate_bias")?,
            scan: ScanAlgo::Sequential,
        })
    }

    pub fn zero_state(&self, batch: usize, dev: &Device) -> Result<RgLruState> {
        Ok(RgLruState {
            conv: Tensor::zeros((batch, self.conv_width - 1, self.width), DType::F32, dev)?,
            h: Tensor::zeros((batch, self.width), DType::F32, dev)?,
        })
    }

    /// u (rows, W) → σ(blockdiag(u) + bias) for one of the gates, in u's dtype (the conv's f32 output).
    fn gate(&self, u: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let rows = u.dim(0)?;
        let bw = self.width / self.heads;
        let uh = u.reshape((rows, self.heads, bw))?.transpose(0, 1)?.contiguous()?; // (H, rows, bw)
        let g = uh.matmul(&w.to_dtype(u.dtype())?)?.broadcast_add(&b.to_dtype(u.dtype())?.unsqueeze(1)?)?; // (H, rows, bw)
        candle_nn::ops::sigmoid(&g.transpose(0, 1)?.reshape((rows, self.width))?)
    }

    /// The RG-LRU's decay a and gated, normalised input over rows (rows, W); `reset` (rows, 1) is 1 at
    /// segment starts.
    fn lru_inputs(&self, u: &Tensor, reset: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let gx = self.gate(u, &self.input_gate_weight, &self.input_gate_bias)?;
        let ga = self.gate(u, &self.recurrent_gate_weight, &self.recurrent_gate_bias)?;
        let log_a = ga.broadcast_mul(&ouro_kernels::act::softplus(&self.recurrent_param.to_dtype(ga.dtype())?)?)?.affine(-8.0, 0.0)?;
        let a = log_a.exp()?;
        let a2 = (&log_a * 2.0)?.exp()?;
        let mult = ouro_kernels::act::sqrt_bound(&a2.affine(-1.0, 1.0)?, MAX_SQRT_GRADIENT)?;
        let (a, mult) = match reset {
            Some(r) => {
                let keep = r.affine(-1.0, 1.0)?; // 0 at resets
                (a.broadcast_mul(&keep)?, (mult.broadcast_mul(&keep)?.broadcast_add(r))?)
            }
            None => (a, mult),
        };
        let x = (u.to_dtype(DType::F32)? * gx)?.mul(&mult)?;
        Ok((a, x))
    }

    /// x (b, l, d_model). `reset` (b, l) f32 marks segment starts (position 0 of a sequence or document).
    pub fn forward(&self, x: &Tensor, reset: &Tensor, seq_idx: Option<&Tensor>, state: Option<&mut RgLruState>) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let w = self.width;
        let y = ouro_kernels::act::gelu_tanh(&self.linear_y.forward(x)?)?;
        let xb = self.linear_x.forward(x)?;
        let conv_in = state.as_ref().map(|s| s.conv.clone());
        let u = causal_conv1d(&xb, &self.conv_weight, Some(&self.conv_bias), conv_in.as_ref(), seq_idx)?;
        let (a, xn) = self.lru_inputs(&u.reshape((b * l, w))?, Some(&reset.reshape((b * l, 1))?))?;
        let h0 = state.as_ref().map(|s| s.h.clone());
        let (h, h_last) = linear_scan(&xn.reshape((b, l, w))?, &a.reshape((b, l, w))?, h0.as_ref(), self.scan)?;
        if let Some(st) = state {
            st.conv = conv_state_after(&xb, conv_in.as_ref(), self.conv_width, seq_idx)?;
            st.h = h_last;
        }
        self.linear_out.forward(&(h * y.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?)
    }

    /// One token per sequence: x (b, d_model). `reset`: this token starts its sequence.
    pub fn step(&self, x: &Tensor, reset: bool, state: &mut RgLruState) -> Result<Tensor> {
        let b = x.dim(0)?;
        let y = ouro_kernels::act::gelu_tanh(&self.linear_y.forward(x)?)?;
        let xb = self.linear_x.forward(x)?;
        let (u, conv) = causal_conv1d_step(&state.conv, &xb, &self.conv_weight, Some(&self.conv_bias))?;
        let r = Tensor::full(reset as u8 as f32, (b, 1), x.device())?;
        let (a, xn) = self.lru_inputs(&u, Some(&r))?;
        let h = (a.mul(&state.h)? + xn)?;
        state.conv = conv;
        state.h = h.clone();
        self.linear_out.forward(&(h * y.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?)
    }

    pub fn state_size(&self) -> usize {
        (self.conv_width - 1) * self.width + self.width
    }
}
