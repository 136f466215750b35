//! The matrix-mixer view of sequence mixers (Hwang et al. 2024, "Hydra"; `goombalab/hydra`
//! `hydra/modules/matrix_mixer.py` and `matrix_mixers/*.py`): every mixer is y = M·v per head for an L×L
//! matrix M — dense, Toeplitz, Vandermonde, Cauchy, low-rank (linear attention), softmax attention,
//! semiseparable (SSD) or quasiseparable (Hydra's bidirectional SSD) — either a learned parameter
//! (data-independent, DI) or computed from the input sequence (sequence-aligned, data-dependent, DD).
//!
//! The layer around the matrix is the reference's:
//! ```text
//! z, xqk[, dt] = in_proj(u);  xqk = conv1d(xqk) (non-causal, width 7) then SiLU;  v, q, k = split
//! y = M(q, k, …)·v  (+ v: the identity is part of every mixer but the SSD ones, which have their D term)
//! out = out_proj(RMSNorm(y) ⊙ SiLU(z))
//! ```
//! [`MatrixMixer::materialize`] returns M (including the identity and diagonal terms) and
//! [`MatrixMixer::forward`] computes the same map by each mixer's fast algorithm.

use crate::layers::{linear, toeplitz};
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use ouro_kernels::conv::causal_conv1d;
use ouro_kernels::norm::gated_rms_norm;
use ouro_kernels::ssd::{materialize, ssd, Algo, SsdInput, CPU_CHUNK};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixerKind {
    Dense,
    Toeplitz,
    Vandermonde,
    Cauchy,
    LowRank,
    Attention,
    Semiseparable,
    Quasiseparable,
}

impl MixerKind {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "dense" => MixerKind::Dense,
            "toeplitz" => MixerKind::Toeplitz,
            "vandermonde" => MixerKind::Vandermonde,
            "cauchy" => MixerKind::Cauchy,
            "low_rank" | "lowrank" | "linear_attention" => MixerKind::LowRank,
            "attention" => MixerKind::Attention,
            "semiseparable" => MixerKind::Semiseparable,
            "quasiseparable" => MixerKind::Quasiseparable,
            other => bail!("unknown matrix mixer '{other}' (dense, toeplitz, vandermonde, cauchy, low_rank, attention, semiseparable, quasiseparable)"),
        })
    }
    fn uses_qk(&self) -> bool {
        matches!(self, MixerKind::Vandermonde | MixerKind::Cauchy | MixerKind::LowRank | MixerKind::Attention | MixerKind::Semiseparable | MixerKind::Quasiseparable)
    }
    fn is_ssd(&self) -> bool {
        matches!(self, MixerKind::Semiseparable | MixerKind::Quasiseparable)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatrixMixerConfig {
    pub kind: MixerKind,
    pub data_dependent: bool,
    pub d_model: usize,
    pub qk_dim: usize,
    /// Sequence length of the data-independent matrices.
    pub max_seq_len: usize,
    pub d_conv: usize,
    pub expand: usize,
    pub headdim: usize,
}

impl MatrixMixerConfig {
    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }
    pub fn nheads(&self) -> usize {
        self.d_inner() / self.headdim
    }
    pub fn d_state(&self) -> usize {
        self.nheads() * self.qk_dim
    }
    /// Channels of the conv after in_proj's z: v, then q/k (or B/C) or the Toeplitz kernels when data-dependent.
    fn conv_dim(&self) -> usize {
        let dd = self.data_dependent as usize;
        match self.kind {
            MixerKind::Dense => self.d_inner(),
            MixerKind::Toeplitz => self.d_inner() + dd * 2 * self.nheads(),
            _ => self.d_inner() + dd * 2 * self.d_state(),
        }
    }
    fn d_in_proj(&self) -> usize {
        let dt = if self.kind.is_ssd() && self.data_dependent { (1 + (self.kind == MixerKind::Quasiseparable) as usize) * self.nheads() } else { 0 };
        self.d_inner() + self.conv_dim() + dt
    }
}

/// The learned matrices of the data-independent mixers, and the SSD mixers' parameters.
#[derive(Clone, Debug)]
enum Params {
    /// (n, L, L)
    Dense(Tensor),
    /// (n, 2L − 1)
    Toeplitz(Tensor),
    /// q, k (L, n, d)
    Qk(Tensor, Tensor),
    /// Data-dependent Cauchy's scalar bias.
    CauchyBias(Tensor),
    None,
    Ssd { dt_bias: Tensor, a_log: Tensor, d: Tensor, fc_d: Option<Linear>, bc: Option<Tensor> },
}

/// The mixer's inputs for one sequence batch.
pub struct Mixing {
    /// (b, L, n, h)
    pub v: Tensor,
    /// (b, L, n, d) or the SSD's (b, L, 2·d_state) as [B | C]
    pub q: Option<Tensor>,
    pub k: Option<Tensor>,
    /// SSD mixers: raw dt (b, L, n or 2n), before softplus.
    pub dt: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub struct MatrixMixer {
    pub cfg: MatrixMixerConfig,
    in_proj: Linear,
    conv_w: Tensor,
    conv_b: Tensor,
    norm_w: Tensor,
    out_proj: Linear,
    params: Params,
}

/// Non-causal depthwise conv with "same" padding (odd width k), via the causal kernel on a right-padded input.
pub fn same_conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (bsz, l, c) = x.dims3()?;
    let k = w.dim(w.rank() - 1)?;
    if k % 2 == 0 {
        bail!("same-padded conv needs an odd width, got {k}");
    }
    let pad = Tensor::zeros((bsz, k / 2, c), x.dtype(), x.device())?;
    causal_conv1d(&Tensor::cat(&[x, &pad], 1)?, w, Some(b), None, None)?.narrow(1, k / 2, l)
}

/// Rows shifted down by one (row 0 zero) of (…, L, L).
pub fn shift_rows(m: &Tensor) -> Result<Tensor> {
    let r = m.rank();
    let l = m.dim(r - 2)?;
    let mut zshape = m.dims().to_vec();
    zshape[r - 2] = 1;
    Tensor::cat(&[&Tensor::zeros(zshape, m.dtype(), m.device())?, &m.narrow(r - 2, 0, l - 1)?], r - 2)
}

fn eye(l: usize, dev: &Device) -> Result<Tensor> {
    Tensor::eye(l, DType::F32, dev)?.reshape((1, 1, l, l))
}

impl MatrixMixer {
    pub fn new(cfg: MatrixMixerConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.d_inner() % cfg.headdim != 0 {
            bail!("matrix mixer: d_inner {} is not a multiple of headdim {}", cfg.d_inner(), cfg.headdim);
        }
        if cfg.kind == MixerKind::Dense && cfg.data_dependent {
            bail!("the dense mixer has no data-dependent form");
        }
        let (n, l, d) = (cfg.nheads(), cfg.max_seq_len, cfg.qk_dim);
        let m = vb.pp("matrix_mixer");
        let params = match (cfg.kind, cfg.data_dependent) {
            (MixerKind::Dense, _) => Params::Dense(m.get((n, l, l), "M")?),
            (MixerKind::Toeplitz, false) => Params::Toeplitz(m.get((n, 2 * l - 1), "conv_params")?),
            (MixerKind::Cauchy, true) => Params::CauchyBias(m.get_with_hints((), "bias", candle_nn::Init::Const(0.5))?),
            (MixerKind::Cauchy | MixerKind::LowRank | MixerKind::Attention, false) => Params::Qk(m.get((l, n, d), "q_matrix")?, m.get((l, n, d), "k_matrix")?),
            (k, dd) if k.is_ssd() => Params::Ssd {
                dt_bias: m.get(n, "dt_bias")?,
                a_log: m.get(n, "A_log")?,
                d: m.get(n, "D")?,
                fc_d: if k == MixerKind::Quasiseparable { Some(linear(m.pp("fc_D"), cfg.d_inner(), n, false)?) } else { None },
                bc: if dd { None } else { Some(m.get((l, 2 * cfg.d_state()), "BC")?) },
            },
            _ => Params::None,
        };
        Ok(Self {
            in_proj: linear(vb.pp("in_proj"), cfg.d_model, cfg.d_in_proj(), false)?,
            conv_w: vb.get((cfg.conv_dim(), 1, cfg.d_conv), "conv1d.weight")?,
            conv_b: vb.get(cfg.conv_dim(), "conv1d.bias")?,
            norm_w: vb.get(cfg.d_inner(), "norm.weight")?,
            out_proj: linear(vb.pp("out_proj"), cfg.d_inner(), cfg.d_model, false)?,
            params,
            cfg,
        })
    }

    /// in_proj, conv, activation and split: (z, the mixer's inputs).
    pub fn prepare(&self, u: &Tensor) -> Result<(Tensor, Mixing)> {
        let c = &self.cfg;
        let (b, l, _) = u.dims3()?;
        if !c.data_dependent && l != c.max_seq_len && !matches!(c.kind, MixerKind::Vandermonde) {
            bail!("data-independent {:?} mixer has a fixed length {}, got sequences of {l}", c.kind, c.max_seq_len);
        }
        let (e, n, ds) = (c.d_inner(), c.nheads(), c.d_state());
        let p = self.in_proj.forward(u)?;
        let z = p.narrow(2, 0, e)?;
        let xc = same_conv1d(&p.narrow(2, e, c.conv_dim())?.contiguous()?, &self.conv_w, &self.conv_b)?;
        let dt = if c.kind.is_ssd() && c.data_dependent { Some(p.narrow(2, e + c.conv_dim(), p.dim(2)? - e - c.conv_dim())?) } else { None };
        // The reference applies SiLU to v only for DD attention/Cauchy/Vandermonde, to everything otherwise.
        let silu_v_only = c.data_dependent && matches!(c.kind, MixerKind::Attention | MixerKind::Cauchy | MixerKind::Vandermonde);
        let xc = if silu_v_only { xc } else { xc.silu()? };
        let mut v = xc.narrow(2, 0, e)?;
        if silu_v_only {
            v = v.silu()?;
        }
        let v = v.reshape((b, l, n, c.headdim))?;
        let (q, k) = if c.data_dependent && c.kind == MixerKind::Toeplitz {
            (Some(xc.narrow(2, e, n)?), Some(xc.narrow(2, e + n, n)?))
        } else if c.data_dependent && c.kind.is_ssd() {
            (Some(xc.narrow(2, e, 2 * ds)?), None)
        } else if c.data_dependent && c.kind.uses_qk() {
            (Some(xc.narrow(2, e, ds)?.reshape((b, l, n, c.qk_dim))?), Some(xc.narrow(2, e + ds, ds)?.reshape((b, l, n, c.qk_dim))?))
        } else {
            (None, None)
        };
        Ok((z, Mixing { v, q, k, dt }))
    }

    fn out(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        let (b, l, _, _) = y.dims4()?;
        let y = gated_rms_norm(&y.reshape((b, l, self.cfg.d_inner()))?, Some(z), &self.norm_w, 1e-5, None, true)?;
        self.out_proj.forward(&y)
    }

    pub fn forward(&self, u: &Tensor) -> Result<Tensor> {
        let (z, m) = self.prepare(u)?;
        self.out(&self.mix(&m)?, &z)
    }

    /// The L×L matrices (b or 1, n, L, L) for input u.
    pub fn materialize(&self, u: &Tensor) -> Result<Tensor> {
        let (_, m) = self.prepare(u)?;
        self.matrix(&m)
    }

    fn std(&self) -> f64 {
        let (l, d) = (self.cfg.max_seq_len as f64, self.cfg.qk_dim as f64);
        match self.cfg.kind {
            MixerKind::Dense => 1.0 / l.sqrt(),
            MixerKind::Toeplitz => 0.5 / l.sqrt(),
            MixerKind::Vandermonde if self.cfg.data_dependent => 1.0 / (2.0 * l * d).sqrt(),
            MixerKind::Vandermonde => 1.0 / l.sqrt(),
            MixerKind::Cauchy | MixerKind::LowRank => 1.0 / (l * d).sqrt(),
            _ => 1.0,
        }
    }

    /// SSD inputs for one direction or both: (x (b', L, n, h), dt (b', L, n), B, C (b', L, 1, d_state)).
    fn ssd_parts(&self, m: &Mixing) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let Params::Ssd { dt_bias, bc, .. } = &self.params else { bail!("not an SSD mixer") };
        let (b, l, n, _) = m.v.dims4()?;
        let ds = self.cfg.d_state();
        let bcv = match (&m.q, bc) {
            (Some(q), _) => q.clone(),
            (None, Some(p)) => p.unsqueeze(0)?.broadcast_as((b, l, 2 * ds))?.contiguous()?,
            _ => bail!("SSD mixer without B, C"),
        };
        let dirs = if self.cfg.kind == MixerKind::Quasiseparable { 2 } else { 1 };
        let dt = match &m.dt {
            Some(dt) => dt.broadcast_add(&Tensor::cat(&vec![dt_bias; dirs], 0)?)?,
            None => Tensor::cat(&vec![dt_bias; dirs], 0)?.reshape((1, 1, dirs * n))?.broadcast_as((b, l, dirs * n))?.contiguous()?,
        };
        let (x, dt, bcv) = if dirs == 2 {
            // Both directions as one batch: [forward; time-reversed], sharing B, C (Hydra's matrix-mixer form).
            let x = Tensor::cat(&[&m.v, &m.v.contiguous()?.flip(&[1])?], 0)?;
            let dt = Tensor::cat(&[&dt.narrow(2, 0, n)?, &dt.narrow(2, n, n)?.contiguous()?.flip(&[1])?], 0)?;
            let bcv = Tensor::cat(&[&bcv, &bcv.contiguous()?.flip(&[1])?], 0)?;
            (x, dt, bcv)
        } else {
            (m.v.clone(), dt, bcv)
        };
        let bb = x.dim(0)?;
        let bm = bcv.narrow(2, 0, ds)?.reshape((bb, l, 1, ds))?;
        let cm = bcv.narrow(2, ds, ds)?.reshape((bb, l, 1, ds))?;
        Ok((x, dt, bm, cm))
    }

    /// y = M·v by each mixer's fast algorithm. (b, L, n, h)
    pub fn mix(&self, m: &Mixing) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, l, n, h) = m.v.dims4()?;
        let v = &m.v;
        let s = self.std();
        let vt = || v.permute((0, 2, 1, 3))?.contiguous(); // (b, n, L, h)
        let back = |y: Tensor| -> Result<Tensor> { y.permute((0, 2, 1, 3))?.contiguous() };
        Ok(match (&self.params, c.kind) {
            (Params::Ssd { a_log, d, fc_d, .. }, kind) => {
                let (x, dt, bm, cm) = self.ssd_parts(m)?;
                let a = a_log.exp()?.neg()?;
                let mut inp = SsdInput::new(&x, &dt, &a, &bm, &cm);
                inp.dt_softplus = true;
                let chunk = if v.device().is_cpu() { CPU_CHUNK } else { 256 };
                let (y, _) = ssd(&inp, Algo::Chunked(chunk))?;
                if kind == MixerKind::Semiseparable {
                    (y + v.broadcast_mul(&d.reshape((1, 1, n, 1))?)?)?
                } else {
                    // Shift each direction by one step (strictly causal / anti-causal), add the diagonal.
                    let y = Tensor::cat(&[&Tensor::zeros((2 * b, 1, n, h), DType::F32, v.device())?, &y.narrow(1, 0, l - 1)?], 1)?;
                    let (yf, yb) = (y.narrow(0, 0, b)?, y.narrow(0, b, b)?.contiguous()?.flip(&[1])?);
                    let diag = fc_d.as_ref().unwrap().forward(&v.reshape((b, l, n * h))?)?.broadcast_add(d)?; // (b, L, n)
                    ((yf + yb)? + v.broadcast_mul(&diag.unsqueeze(3)?)?)?
                }
            }
            (_, MixerKind::LowRank) if c.data_dependent => {
                // (Kᵀ V) first: O(L·d·h) instead of O(L²).
                let (q, k) = (m.q.as_ref().unwrap().permute((0, 2, 1, 3))?.contiguous()?, m.k.as_ref().unwrap().permute((0, 2, 1, 3))?.contiguous()?);
                let kv = k.t()?.matmul(&vt()?)?; // (b, n, d, h)
                (back((q.matmul(&kv)? * s)?)? + v)?
            }
            (Params::Qk(q, k), MixerKind::LowRank) => {
                let (q, k) = (q.permute((1, 0, 2))?.contiguous()?, k.permute((1, 0, 2))?.contiguous()?); // (n, L, d)
                let kv = k.t()?.unsqueeze(0)?.broadcast_matmul(&vt()?)?; // (b, n, d, h)
                (back((q.unsqueeze(0)?.broadcast_matmul(&kv)? * s)?)? + v)?
            }
            (_, MixerKind::Toeplitz) => {
                // Lag sums: y_t = Σ_j c_j v_{t−j} over the 2L−1 lags j ∈ (−L, L) (no L×L matrix).
                let kern = self.toeplitz_kernel(m)?; // (b or 1, n, 2L−1), index j + L − 1
                let mut y = Tensor::zeros((b, l, n, h), DType::F32, v.device())?;
                for j in -(l as i64 - 1)..(l as i64) {
                    let cj = kern.narrow(2, (j + l as i64 - 1) as usize, 1)?.squeeze(2)?; // (b|1, n)
                    let (dst0, src0, len) = if j >= 0 { (j as usize, 0, l - j as usize) } else { (0, (-j) as usize, l - (-j) as usize) };
                    let contrib = v.narrow(1, src0, len)?.broadcast_mul(&cj.unsqueeze(1)?.unsqueeze(3)?)?;
                    let padded = Tensor::cat(
                        &[&Tensor::zeros((b, dst0, n, h), DType::F32, v.device())?, &contrib, &Tensor::zeros((b, l - dst0 - len, n, h), DType::F32, v.device())?],
                        1,
                    )?;
                    y = (y + padded)?;
                }
                ((y * s)? + v)?
            }
            _ => {
                // Dense, attention, Cauchy and Vandermonde: their fast form is the matrix product itself.
                let mat = self.matrix(m)?; // includes the identity
                back(mat.broadcast_matmul(&vt()?)?)?
            }
        })
    }

    /// Toeplitz coefficients c_j for lags j ∈ (−L, L), indexed j + L − 1: (1, n, 2L−1) or (b, n, 2L−1).
    fn toeplitz_kernel(&self, m: &Mixing) -> Result<Tensor> {
        let l = m.v.dim(1)?;
        let raw = match (&self.params, &m.q, &m.k) {
            (Params::Toeplitz(p), _, _) => p.unsqueeze(0)?, // (1, n, 2L−1) in the reference's FFT order
            (_, Some(fwd), Some(rev)) => {
                let (f, r) = (fwd.permute((0, 2, 1))?.contiguous()?, rev.permute((0, 2, 1))?.contiguous()?); // (b, n, L)
                Tensor::cat(&[&r.narrow(2, 1, l - 1)?.contiguous()?.flip(&[2])?, &f], 2)?
            }
            _ => bail!("Toeplitz mixer without a kernel"),
        };
        // The reference convolves with an FFT of size K = 2L−1 over the left-padded input: y_t = Σ_s p[(t − s + L) mod K] v_s.
        // Reindex p by lag j = t − s: c_j = p[(j + L) mod K].
        let k = 2 * l - 1;
        let idx: Vec<u32> = (0..k).map(|i| {
            let j = i as i64 - (l as i64 - 1);
            ((j + l as i64).rem_euclid(k as i64)) as u32
        }).collect();
        raw.contiguous()?.index_select(&Tensor::from_vec(idx, k, raw.device())?, 2)
    }

    /// M (b or 1, n, L, L) with y = M·v (the identity and diagonal terms included).
    pub fn matrix(&self, m: &Mixing) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, l, n, _) = m.v.dims4()?;
        let dev = m.v.device();
        let s = self.std();
        let ident = eye(l, dev)?;
        let with_id = |mat: Tensor| -> Result<Tensor> { (mat * s)?.broadcast_add(&ident) };
        let arange = || Tensor::arange(0u32, l as u32, dev)?.to_dtype(DType::F32);
        Ok(match (&self.params, c.kind) {
            (Params::Dense(mm), _) => with_id(mm.unsqueeze(0)?)?,
            (_, MixerKind::Toeplitz) => {
                // M[t, s] = c[t − s + L − 1]: toeplitz() indexes by s − t, so the lags go in reversed.
                let kern = self.toeplitz_kernel(m)?; // (b|1, n, 2L−1) by lag
                with_id(toeplitz(&kern.flip(&[2])?)?)?
            }
            (Params::Qk(q, k), MixerKind::LowRank) => {
                let (q, k) = (q.permute((1, 0, 2))?.contiguous()?, k.permute((1, 0, 2))?.contiguous()?);
                with_id(q.matmul(&k.t()?)?.unsqueeze(0)?)?
            }
            (Params::Qk(q, k), MixerKind::Attention) => {
                let (q, k) = (q.permute((1, 0, 2))?.contiguous()?, k.permute((1, 0, 2))?.contiguous()?);
                let scores = (q.matmul(&k.t()?)? / (c.qk_dim as f64).sqrt())?;
                candle_nn::ops::softmax(&scores, D::Minus1)?.unsqueeze(0)?.broadcast_add(&ident)?
            }
            (Params::Qk(q, k), MixerKind::Cauchy) => {
                // C[l, t] = Σ_d 1 / (e^{q_{l,d}} + e^{k_{t,d}} + tol)
                let (q, k) = (q.exp()?.permute((1, 0, 2))?, k.exp()?.permute((1, 0, 2))?); // (n, L, d)
                let sum = q.unsqueeze(2)?.broadcast_add(&k.unsqueeze(1)?)?; // (n, L, L, d)
                with_id((sum + 1e-8)?.recip()?.sum(3)?.unsqueeze(0)?)?
            }
            (Params::CauchyBias(bias), MixerKind::Cauchy) => {
                let q = m.q.as_ref().unwrap().exp()?.broadcast_add(bias)?.permute((0, 2, 1, 3))?; // (b, n, L, d)
                let k = m.k.as_ref().unwrap().exp()?.broadcast_add(bias)?.permute((0, 2, 1, 3))?;
                let sum = q.unsqueeze(3)?.broadcast_add(&k.unsqueeze(2)?)?; // (b, n, L, L, d)
                with_id((sum + 1e-8)?.recip()?.sum(4)?)?
            }
            (_, MixerKind::LowRank) => {
                let (q, k) = (m.q.as_ref().unwrap().permute((0, 2, 1, 3))?.contiguous()?, m.k.as_ref().unwrap().permute((0, 2, 1, 3))?.contiguous()?);
                with_id(q.matmul(&k.t()?)?)?
            }
            (_, MixerKind::Attention) => {
                let (q, k) = (m.q.as_ref().unwrap().permute((0, 2, 1, 3))?.contiguous()?, m.k.as_ref().unwrap().permute((0, 2, 1, 3))?.contiguous()?);
                let scores = (q.matmul(&k.t()?)? / (c.qk_dim as f64).sqrt())?;
                candle_nn::ops::softmax(&scores, D::Minus1)?.broadcast_add(&ident)?
            }
            (_, MixerKind::Vandermonde) if !c.data_dependent => {
                // The DFT form: M[t, l] = cos(2π t l / L).
                let pos = arange()?;
                let tl = pos.unsqueeze(1)?.broadcast_mul(&pos.unsqueeze(0)?)?;
                with_id((tl * (2.0 * std::f64::consts::PI / l as f64))?.cos()?.reshape((1, 1, l, l))?)?
            }
            (_, MixerKind::Vandermonde) => {
                // M[t, l] = Σ_d cos(2π·eps·q_{t,d}·l) − cos(2π·eps·k_{l,d}·t), eps = 1e-3.
                let eps2pi = 2.0 * std::f64::consts::PI * 1e-3;
                let pos = arange()?;
                let q = m.q.as_ref().unwrap().permute((0, 2, 1, 3))?.contiguous()?; // (b, n, L, d)
                let k = m.k.as_ref().unwrap().permute((0, 2, 1, 3))?.contiguous()?;
                let qm = (q.unsqueeze(3)?.broadcast_mul(&pos.reshape((1, 1, 1, l, 1))?)? * eps2pi)?.cos()?.sum(4)?; // [t, l]
                let km = (k.unsqueeze(2)?.broadcast_mul(&pos.reshape((1, 1, l, 1, 1))?)? * eps2pi)?.cos()?.sum(4)?; // [t, l]: k_l · t
                with_id((qm - km)?)?
            }
            (Params::Ssd { a_log, d, fc_d, .. }, kind) => {
                let (_, dt, bm, cm) = self.ssd_parts(m)?;
                let a = a_log.exp()?.neg()?;
                let dt = ouro_kernels::act::softplus(&dt)?;
                let ss = materialize(&dt, &a, &bm, &cm, None, None)?; // (b', n, L, L)
                if kind == MixerKind::Semiseparable {
                    ss.broadcast_add(&ident.broadcast_mul(&d.reshape((1, n, 1, 1))?)?)?
                } else {
                    let f = shift_rows(&ss.narrow(0, 0, b)?)?;
                    let r = shift_rows(&ss.narrow(0, b, b)?)?.contiguous()?.flip(&[2, 3])?;
                    let (_, _, nn, hh) = m.v.dims4()?;
                    let diag = fc_d.as_ref().unwrap().forward(&m.v.reshape((b, l, nn * hh))?)?.broadcast_add(d)?; // (b, L, n)
                    let diag = ident.broadcast_mul(&diag.permute((0, 2, 1))?.unsqueeze(3)?)?; // (b, n, L, L)
                    ((f + r)? + diag)?
                }
            }
            _ => bail!("no matrix for {:?} (data-dependent: {})", c.kind, c.data_dependent),
        })
    }
}
