//! The Mamba-2 mixer (`mamba_ssm.modules.mamba2.Mamba2`, HF `Mamba2Mixer`).
//!
//! ```text
//! u (b, l, d_model) ─ in_proj ─┬─ z0, x0 (d_mlp each): gated MLP branch  silu(z0)·x0
//!                              ├─ z (d_ssm): gate
//!                              ├─ xBC (d_ssm + 2·G·N) ─ causal conv1d ─ SiLU ─ x (H, P), B (G, N), C (G, N)
//!                              └─ dt (H)
//! y = SSD(x, dt, A = −exp(A_log), B, C, D, dt_bias, softplus, dt_limit)
//! y = RMSNormGated(y, z) per group of d_ssm/G (or y·SiLU(z) without the norm)
//! out = out_proj([silu(z0)·x0 | y])
//! ```

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use ouro_kernels::conv::{causal_conv1d, conv_state_after};
use ouro_kernels::decode::{mamba2_step, StepInput};
use ouro_kernels::norm::gated_rms_norm;
use ouro_kernels::ssd::{ssd_xbc, ssd_xbc_y, Algo, XbcShape};
use serde::{Deserialize, Serialize};

/// Mixer hyper-parameters (`mamba_ssm` names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mamba2Config {
    pub d_model: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    /// Width of the inner projections when it is not expand·d_model (Nemotron-H: mamba_num_heads ·
    /// mamba_head_dim, any multiple of headdim); `None` → expand·d_model.
    #[serde(default)]
    pub d_inner: Option<usize>,
    pub headdim: usize,
    pub ngroups: usize,
    /// Width of the SSM branch; `None` → expand·d_model (extra in_proj channels form a gated MLP).
    pub d_ssm: Option<usize>,
    pub rmsnorm: bool,
    pub norm_before_gate: bool,
    pub norm_eps: f64,
    pub dt_limit: (f64, f64),
    pub bias: bool,
    pub conv_bias: bool,
    pub d_has_hdim: bool,
    pub chunk_size: usize,
}

impl Default for Mamba2Config {
    fn default() -> Self {
        Self {
            d_model: 256,
            d_state: 128,
            d_conv: 4,
            expand: 2,
            d_inner: None,
            headdim: 64,
            ngroups: 1,
            d_ssm: None,
            rmsnorm: true,
            norm_before_gate: false,
            norm_eps: 1e-5,
            dt_limit: (0.0, f64::INFINITY),
            bias: false,
            conv_bias: true,
            d_has_hdim: false,
            chunk_size: 256,
        }
    }
}

impl Mamba2Config {
    pub fn d_inner(&self) -> usize {
        self.d_inner.unwrap_or(self.expand * self.d_model)
    }
    pub fn d_ssm(&self) -> usize {
        self.d_ssm.unwrap_or(self.d_inner())
    }
    pub fn nheads(&self) -> usize {
        self.d_ssm() / self.headdim
    }
    pub fn d_mlp(&self) -> usize {
        self.d_inner() - self.d_ssm()
    }
    pub fn conv_dim(&self) -> usize {
        self.d_ssm() + 2 * self.ngroups * self.d_state
    }
    pub fn d_in_proj(&self) -> usize {
        2 * self.d_inner() + 2 * self.ngroups * self.d_state + self.nheads()
    }
    pub fn validate(&self) -> Result<()> {
        if self.headdim == 0 || self.d_ssm() % self.headdim != 0 {
            bail!("mamba2: d_ssm {} is not a multiple of headdim {}", self.d_ssm(), self.headdim);
        }
        if self.ngroups == 0 || self.nheads() % self.ngroups != 0 {
            bail!("mamba2: {} heads are not divisible into {} groups", self.nheads(), self.ngroups);
        }
        if self.d_ssm() > self.d_inner() {
            bail!("mamba2: d_ssm {} exceeds d_inner {}", self.d_ssm(), self.d_inner());
        }
        if self.d_conv == 0 || self.chunk_size == 0 {
            bail!("mamba2: d_conv and chunk_size must be positive");
        }
        Ok(())
    }
}

/// Recurrent state of one mixer: the last d_conv−1 conv inputs and the SSM state.
#[derive(Clone, Debug)]
pub struct Mamba2State {
    /// (b, d_conv − 1, conv_dim)
    pub conv: Tensor,
    /// (b, H, P, N), f32
    pub ssm: Tensor,
}

#[derive(Clone, Debug)]
pub struct Mamba2 {
    pub cfg: Mamba2Config,
    pub in_proj: Linear,
    /// (conv_dim, 1, d_conv)
    pub conv_weight: Tensor,
    pub conv_bias: Option<Tensor>,
    pub dt_bias: Tensor,
    pub a_log: Tensor,
    pub d: Tensor,
    pub norm_weight: Option<Tensor>,
    pub out_proj: Linear,
}

fn linear(vb: &VarBuilder, i: usize, o: usize, bias: bool) -> Result<Linear> {
    if bias {
        candle_nn::linear(i, o, vb.clone())
    } else {
        candle_nn::linear_no_bias(i, o, vb.clone())
    }
}

impl Mamba2 {
    /// Loads (or, from a `VarMap`-backed builder, initialises) the parameters under `vb`.
    pub fn new(cfg: Mamba2Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (h, conv_dim) = (cfg.nheads(), cfg.conv_dim());
        let in_proj = linear(&vb.pp("in_proj"), cfg.d_model, cfg.d_in_proj(), cfg.bias)?;
        let conv_weight = vb.get((conv_dim, 1, cfg.d_conv), "conv1d.weight")?;
        let conv_bias = if cfg.conv_bias { Some(vb.get(conv_dim, "conv1d.bias")?) } else { None };
        let dt_bias = vb.get(h, "dt_bias")?;
        let a_log = vb.get(h, "A_log")?;
        let d = if cfg.d_has_hdim { vb.get(cfg.d_ssm(), "D")? } else { vb.get(h, "D")? };
        let norm_weight = if cfg.rmsnorm { Some(vb.get(cfg.d_ssm(), "norm.weight")?) } else { None };
        let out_proj = linear(&vb.pp("out_proj"), cfg.d_inner(), cfg.d_model, cfg.bias)?;
        Ok(Self { cfg, in_proj, conv_weight, conv_bias, dt_bias, a_log, d, norm_weight, out_proj })
    }

    /// A = −exp(A_log), always in f32.
    pub fn a(&self) -> Result<Tensor> {
        self.a_log.to_dtype(DType::F32)?.exp()?.neg()
    }

    fn d_skip(&self) -> Result<Tensor> {
        if self.cfg.d_has_hdim {
            self.d.reshape((self.cfg.nheads(), self.cfg.headdim))
        } else {
            Ok(self.d.clone())
        }
    }

    /// in_proj as its five parts (z0, x0, z, xBC, dt), each its own product with a slice of the weight:
    /// contiguous outputs, and a backward pass that never pads activation gradients to d_in_proj.
    fn in_proj_parts(&self, u: &Tensor) -> Result<[Tensor; 5]> {
        let c = &self.cfg;
        let sizes = [c.d_mlp(), c.d_mlp(), c.d_ssm(), c.conv_dim(), c.nheads()];
        let lead = u.dims()[..u.rank() - 1].to_vec();
        let u2 = u.reshape(((), c.d_model))?;
        let w = self.in_proj.weight();
        let mut out = Vec::with_capacity(5);
        let mut off = 0;
        for s in sizes {
            let mut y = u2.matmul(&w.narrow(0, off, s)?.t()?)?;
            if let Some(b) = self.in_proj.bias() {
                y = y.broadcast_add(&b.narrow(0, off, s)?)?;
            }
            let mut shape = lead.clone();
            shape.push(s);
            out.push(y.reshape(shape)?);
            off += s;
        }
        Ok(out.try_into().unwrap())
    }

    fn output(&self, y: Tensor, z: &Tensor, z0: &Tensor, x0: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let y = match &self.norm_weight {
            Some(w) => gated_rms_norm(&y, Some(z), w, c.norm_eps, Some(c.d_ssm() / c.ngroups), c.norm_before_gate)?,
            None => y.mul(&z.to_dtype(DType::F32)?.silu()?)?,
        };
        let y = if c.d_mlp() > 0 {
            let mlp = z0.to_dtype(DType::F32)?.silu()?.mul(&x0.to_dtype(DType::F32)?)?;
            Tensor::cat(&[&mlp, &y], D::Minus1)?
        } else {
            y
        };
        self.out_proj.forward(&y.to_dtype(self.out_proj.weight().dtype())?)
    }

    /// A zero state for `batch` sequences.
    pub fn zero_state(&self, batch: usize) -> Result<Mamba2State> {
        let c = &self.cfg;
        let dev = self.a_log.device();
        Ok(Mamba2State {
            conv: Tensor::zeros((batch, c.d_conv - 1, c.conv_dim()), DType::F32, dev)?,
            ssm: Tensor::zeros((batch, c.nheads(), c.headdim, c.d_state), DType::F32, dev)?,
        })
    }

    /// Parallel forward over u (b, l, d_model) with the chunked SSD. With `state`, the sequence continues
    /// from it and the state is advanced to the end (prefill); `seq_idx` (b, l) marks packed documents.
    pub fn forward(&self, u: &Tensor, seq_idx: Option<&Tensor>, state: Option<&mut Mamba2State>) -> Result<Tensor> {
        let chunk = if u.device().is_cpu() { ouro_kernels::ssd::CPU_CHUNK } else { self.cfg.chunk_size };
        self.forward_with(u, seq_idx, state, Algo::Chunked(chunk))
    }

    /// [`Mamba2::forward`] with an explicit SSD algorithm.
    pub fn forward_with(&self, u: &Tensor, seq_idx: Option<&Tensor>, state: Option<&mut Mamba2State>, algo: Algo) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, l, dm) = u.dims3()?;
        if dm != c.d_model {
            bail!("mamba2: input has width {dm}, the mixer expects d_model {}", c.d_model);
        }
        let [z0, x0, z, xbc, dt] = self.in_proj_parts(u)?;
        let conv_in = state.as_ref().map(|s| s.conv.clone());
        let xbc_conv = causal_conv1d(&xbc, &self.conv_weight, self.conv_bias.as_ref(), conv_in.as_ref(), seq_idx)?.silu()?;
        let shape = XbcShape { heads: c.nheads(), head_dim: c.headdim, groups: c.ngroups, d_state: c.d_state };
        let y = match state {
            Some(st) => {
                let (y, final_state) = ssd_xbc(&xbc_conv, &dt, shape, &self.a()?, Some(&self.dt_bias), Some(&self.d_skip()?), true, c.dt_limit, Some(&st.ssm), seq_idx, algo)?;
                st.conv = conv_state_after(&xbc, conv_in.as_ref(), c.d_conv, seq_idx)?;
                st.ssm = final_state;
                y
            }
            // No state in or out (training): on CUDA in bf16 one op each way, y in bf16. A layer computing in
            // bf16 hands it xBC in bf16 (the conv's output is f32), as mamba_ssm's layer does.
            None => {
                let xbc_conv = if self.in_proj.weight().dtype() == DType::BF16 { xbc_conv.to_dtype(DType::BF16)? } else { xbc_conv };
                ssd_xbc_y(&xbc_conv, &dt, shape, &self.a()?, Some(&self.dt_bias), Some(&self.d_skip()?), true, c.dt_limit, seq_idx, algo)?.to_dtype(DType::F32)?
            }
        };
        self.output(y.reshape((b, l, c.d_ssm()))?, &z, &z0, &x0)
    }

    /// One token per sequence: u (b, d_model) → (b, d_model), advancing `state`.
    pub fn step(&self, u: &Tensor, state: &mut Mamba2State) -> Result<Tensor> {
        let c = &self.cfg;
        let b = u.dim(0)?;
        let [z0, x0, z, xbc, dt] = self.in_proj_parts(u)?;
        let shape = XbcShape { heads: c.nheads(), head_dim: c.headdim, groups: c.ngroups, d_state: c.d_state };
        let (a, d) = (self.a()?, self.d_skip()?);
        let (y, conv, ssm) = mamba2_step(&StepInput {
            conv_state: &state.conv,
            xbc: &xbc,
            conv_weight: &self.conv_weight,
            conv_bias: self.conv_bias.as_ref(),
            ssm: &state.ssm,
            dt: &dt,
            a: &a,
            dt_bias: &self.dt_bias,
            d: &d,
            dt_limit: c.dt_limit,
            shape,
        })?;
        state.conv = conv;
        state.ssm = ssm;
        self.output(y.reshape((b, c.d_ssm()))?, &z, &z0, &x0)
    }

    /// Floats held by the recurrent state per sequence (constant in the context length).
    pub fn state_size(&self) -> usize {
        let c = &self.cfg;
        (c.d_conv - 1) * c.conv_dim() + c.nheads() * c.headdim * c.d_state
    }
}
