//! Fourier neural operators on 1-D periodic fields, and MemNO: the same operator with an S4 memory over time.
//!
//! ```text
//! spectral conv   K(h) = irfft( R_k · rfft(h)_k  for k < modes )        R_k ∈ ℂ^{W×W}, one per kept mode
//! FNO layer       h ← act(K(h) + W·h)                                     (Li et al. 2021; no act after the last)
//! FFNO layer      h ← h + FF(K(h)),  FF = Linear(W→fW) → ReLU → Linear(fW→W)   (Tran et al. 2023, 1-D)
//! MemNO           lift → FFNO layers → h + S4D_t(LayerNorm(h)) at every (x, channel) → FFNO layers → project
//! ```
//! (Buitrago Ruiz et al. 2025, "On the benefits of memory for modeling time-dependent PDEs": the paper's S4FFNO.)
//! The truncated real DFT is two small matmuls with cos/sin matrices, so one code path runs on every candle
//! device and differentiates through autograd. Every model maps a trajectory u (b, T, R) to next-frame predictions
//! (b, T, R) — output t predicts u_{t+1} — causally in time: the Markovian operators see only u_t, MemNO sees
//! u_0 … u_t through its memory.

use crate::s4d::S4d;
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use crate::layers::LayerNorm;
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// The truncated real DFT of length `r` as matrices: forward `f` (2M, R) giving [Re X_k; Im X_k] for k < M, and
/// inverse `g` (R, 2M) with y_x = (1/R)·[Re Y_0 + 2 Σ_{k≥1} (Re Y_k cos θ − Im Y_k sin θ)], θ = 2πkx/R (the imaginary
/// part of Y_0 is dropped, as `torch.fft.irfft` does). M ≤ R/2, so no Nyquist term.
pub fn dft_matrices(r: usize, m: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    if m == 0 || m > r / 2 {
        bail!("spectral conv: {m} modes need at least {} grid points, got {r}", 2 * m.max(1));
    }
    let mut f = vec![0f32; 2 * m * r];
    let mut g = vec![0f32; r * 2 * m];
    for k in 0..m {
        let c = if k == 0 { 1.0 } else { 2.0 } / r as f64;
        for x in 0..r {
            let th = 2.0 * std::f64::consts::PI * ((k * x) % r) as f64 / r as f64;
            f[k * r + x] = th.cos() as f32;
            f[(m + k) * r + x] = -th.sin() as f32;
            g[x * 2 * m + k] = (c * th.cos()) as f32;
            g[x * 2 * m + m + k] = (-c * th.sin()) as f32;
        }
    }
    Ok((Tensor::from_vec(f, (2 * m, r), dev)?, Tensor::from_vec(g, (r, 2 * m), dev)?))
}

/// K(h): per kept Fourier mode k, a complex W×W matrix R_k. `weight` (modes, W_in, W_out, 2) (real, imaginary).
#[derive(Clone, Debug)]
pub struct SpectralConv1d {
    pub modes: usize,
    pub width: usize,
    pub weight: Tensor,
    /// The DFT matrices of the last grid seen, (R, M, f, g): built once per resolution, not per call.
    dft: std::sync::Arc<std::sync::Mutex<Option<(usize, usize, Tensor, Tensor)>>>,
}

impl SpectralConv1d {
    pub fn new(width: usize, modes: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::from_weight(modes, width, vb.get((modes, width, width, 2), "weight")?))
    }

    /// From a weight (modes, W, W, 2) already at hand.
    pub fn from_weight(modes: usize, width: usize, weight: Tensor) -> Self {
        Self { modes, width, weight, dft: Default::default() }
    }

    /// [`dft_matrices`] for (r, m) on `dev`, from the cache when the grid and device are unchanged.
    fn dft(&self, r: usize, m: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let mut cache = self.dft.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cr, cm, f, g)) = cache.as_ref() {
            if (*cr, *cm) == (r, m) && f.device().same_device(dev) {
                return Ok((f.clone(), g.clone()));
            }
        }
        let (f, g) = dft_matrices(r, m, dev)?;
        *cache = Some((r, m, f.clone(), g.clone()));
        Ok((f, g))
    }

    /// h (n, R, W) → (n, R, W). Grids with fewer than 2·modes points use the first R/2 modes.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let (n, r, w) = h.dims3()?;
        let m = self.modes.min(r / 2);
        let (f, g) = self.dft(r, m, h.device())?;
        // One GEMM over every row and channel: (2M, R) @ (R, n·W).
        let x = f.matmul(&h.transpose(0, 1)?.contiguous()?.reshape((r, n * w))?)?; // [Re; Im] of the kept modes
        let x = x.reshape((2, m, n, w))?.permute((1, 2, 0, 3))?.contiguous()?.reshape((m, n, 2 * w))?; // (M, n, [Re | Im])
        // (Xr + iXi)(Wr + iWi) as one real product per mode: [Xr | Xi] · [[Wr, Wi], [−Wi, Wr]].
        let wr = self.weight.narrow(0, 0, m)?.narrow(3, 0, 1)?.squeeze(3)?.contiguous()?; // (M, W, W)
        let wi = self.weight.narrow(0, 0, m)?.narrow(3, 1, 1)?.squeeze(3)?.contiguous()?;
        // (candle's cat along an inner axis can return a strided view; cuBLAS needs it dense)
        let block = Tensor::cat(&[&Tensor::cat(&[&wr, &wi], 2)?, &Tensor::cat(&[&wi.neg()?, &wr], 2)?], 1)?.contiguous()?; // (M, 2W, 2W)
        let y = x.matmul(&block)?; // (M, n, 2W)
        let y = y.reshape((m, n, 2, w))?.permute((2, 0, 1, 3))?.contiguous()?.reshape((2 * m, n * w))?;
        g.matmul(&y)?.reshape((r, n, w))?.transpose(0, 1)?.contiguous() // (n, R, W)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorKind {
    Fno,
    Ffno,
    Memno,
}

impl OperatorKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "fno" => Ok(Self::Fno),
            "ffno" => Ok(Self::Ffno),
            "memno" | "s4ffno" => Ok(Self::Memno),
            _ => bail!("unknown neural operator '{s}' (expected fno, ffno or memno)"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    pub kind: OperatorKind,
    /// Channels W.
    pub width: usize,
    /// Kept Fourier modes.
    pub modes: usize,
    /// Operator layers (FNO or FFNO).
    pub layers: usize,
    /// FFNO feed-forward expansion f.
    pub ff_factor: usize,
    /// MemNO: the memory layer comes after this many operator layers.
    pub memory_after: usize,
    /// MemNO: S4D state size N (N/2 complex modes).
    pub d_state: usize,
    /// Hidden width of the projection Q (W → hidden → 1).
    pub projection: usize,
}

impl OperatorConfig {
    pub fn new(kind: OperatorKind) -> Self {
        Self { kind, width: 64, modes: 16, layers: 4, ff_factor: 2, memory_after: 2, d_state: 64, projection: 128 }
    }
}

enum Layer {
    Fno { k: SpectralConv1d, w: Linear },
    Ffno { k: SpectralConv1d, ff1: Linear, ff2: Linear },
}

/// A neural operator for next-frame prediction: FNO, FFNO or MemNO (S4FFNO) by [`OperatorConfig::kind`].
/// Input channels are (u_t, x/L); the output is the increment u_{t+1} − u_t (in the units of u), added back.
pub struct NeuralOperator {
    pub cfg: OperatorConfig,
    lift: Linear,
    layers: Vec<Layer>,
    memory: Option<(LayerNorm, S4d)>,
    proj1: Linear,
    proj2: Linear,
}

impl NeuralOperator {
    /// Names: `lift`, `layers.{i}.spectral.weight`, `layers.{i}.{w | ff.0 | ff.1}`, `memory.{norm, s4d}`, `proj.{0,1}`.
    pub fn new(cfg: OperatorConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.width == 0 || cfg.layers == 0 || cfg.modes == 0 {
            bail!("neural operator: width, layers and modes must be positive ({cfg:?})");
        }
        if cfg.kind == OperatorKind::Memno && cfg.memory_after > cfg.layers {
            bail!("neural operator: memory_after {} is past the last of {} layers", cfg.memory_after, cfg.layers);
        }
        let w = cfg.width;
        let lift = candle_nn::linear(2, w, vb.pp("lift"))?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let lb = vb.pp(format!("layers.{i}"));
            let k = SpectralConv1d::new(w, cfg.modes, lb.pp("spectral"))?;
            layers.push(match cfg.kind {
                OperatorKind::Fno => Layer::Fno { k, w: candle_nn::linear(w, w, lb.pp("w"))? },
                _ => Layer::Ffno { k, ff1: candle_nn::linear(w, cfg.ff_factor * w, lb.pp("ff.0"))?, ff2: candle_nn::linear(cfg.ff_factor * w, w, lb.pp("ff.1"))? },
            });
        }
        let memory = if cfg.kind == OperatorKind::Memno {
            let mb = vb.pp("memory");
            Some((LayerNorm::new(w, 1e-5, mb.pp("norm"))?, S4d::new(w, cfg.d_state, mb.pp("s4d"))?))
        } else {
            None
        };
        let proj1 = candle_nn::linear(w, cfg.projection, vb.pp("proj.0"))?;
        let proj2 = candle_nn::linear(cfg.projection, 1, vb.pp("proj.1"))?;
        Ok(Self { cfg, lift, layers, memory, proj1, proj2 })
    }

    fn layer(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        match &self.layers[i] {
            Layer::Fno { k, w } => {
                let z = (k.forward(h)? + w.forward(h)?)?;
                if i + 1 < self.layers.len() {
                    z.gelu_erf()
                } else {
                    Ok(z)
                }
            }
            Layer::Ffno { k, ff1, ff2 } => h + ff2.forward(&ff1.forward(&k.forward(h)?)?.relu()?)?,
        }
    }

    /// u (b, T, R) in normalised units → predictions of u_{t+1} for every t (b, T, R).
    pub fn forward(&self, u: &Tensor) -> Result<Tensor> {
        let (b, t, r) = u.dims3()?;
        let dev = u.device();
        let x = (Tensor::arange(0u32, r as u32, dev)?.to_dtype(DType::F32)? / r as f64)?;
        let x = x.reshape((1, 1, r, 1))?.broadcast_as((b, t, r, 1))?;
        let inp = Tensor::cat(&[&u.unsqueeze(3)?, &x.contiguous()?], 3)?.contiguous()?.reshape((b * t, r, 2))?;
        let mut h = self.lift.forward(&inp)?; // (b·T, R, W)
        let w = self.cfg.width;
        for i in 0..self.layers.len() {
            if let (Some((norm, s4d)), true) = (&self.memory, i == self.cfg.memory_after) {
                h = self.remember(&h, norm, s4d, (b, t, r, w))?;
            }
            h = self.layer(i, &h)?;
        }
        if let (Some((norm, s4d)), true) = (&self.memory, self.cfg.memory_after == self.layers.len()) {
            h = self.remember(&h, norm, s4d, (b, t, r, w))?;
        }
        let du = self.proj2.forward(&self.proj1.forward(&h)?.gelu_erf()?)?.reshape((b, t, r))?;
        u + du
    }

    /// The memory layer: a causal S4D over time at every grid point and channel, h + S4D(LayerNorm(h)).
    fn remember(&self, h: &Tensor, norm: &LayerNorm, s4d: &S4d, (b, t, r, w): (usize, usize, usize, usize)) -> Result<Tensor> {
        let seq = h.reshape((b, t, r, w))?.permute((0, 2, 1, 3))?.reshape((b * r, t, w))?.contiguous()?; // (b·R, T, W)
        let m = s4d.forward(&norm.forward(&seq)?, |x: &Tensor| Ok(x.clone()))?;
        (seq + m)?.reshape((b, r, t, w))?.permute((0, 2, 1, 3))?.reshape((b * t, r, w))
    }

    /// Autoregressive rollout: from the first `given` frames of u (b, ≥given, R), predicts `steps` more frames,
    /// each fed back as input. Returns (b, given + steps, R) with the given frames first. MemNO sees its whole
    /// (partly predicted) history at every step. Inference only: each predicted frame is detached from the
    /// autograd graph (otherwise the graph of every step stays alive through the next).
    pub fn rollout(&self, u: &Tensor, given: usize, steps: usize) -> Result<Tensor> {
        if given == 0 {
            bail!("rollout needs at least one given frame");
        }
        let mut traj = u.narrow(1, 0, given)?.contiguous()?;
        for _ in 0..steps {
            let t = traj.dim(1)?;
            let next = if self.memory.is_some() {
                self.forward(&traj)?.narrow(1, t - 1, 1)?
            } else {
                self.forward(&traj.narrow(1, t - 1, 1)?)?
            };
            traj = Tensor::cat(&[&traj, &next.detach()], 1)?;
        }
        Ok(traj)
    }
}

/// Normalised RMSE per trajectory, ‖û − u‖ / ‖u‖ over frames `from..` and all points, averaged over the batch.
pub fn nrmse(pred: &Tensor, truth: &Tensor, from: usize) -> Result<f64> {
    let t = truth.dim(1)?;
    let (p, y) = (pred.narrow(1, from, t - from)?, truth.narrow(1, from, t - from)?);
    let num = (p - &y)?.sqr()?.sum((1, 2))?.sqrt()?;
    let den = y.sqr()?.sum((1, 2))?.sqrt()?;
    num.div(&den)?.mean_all()?.to_dtype(DType::F32)?.to_scalar::<f32>().map(|v| v as f64)
}
