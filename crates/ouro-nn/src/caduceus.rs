//! Caduceus (Schiff et al. 2024; `kuleshov-group/caduceus` `modeling_caduceus.py`, `modeling_rcps.py`): the
//! BiMamba block and reverse-complement parameter sharing (RCPS) for DNA.
//!
//! - **BiMamba**: out = fwd(x) ⊕ flip(rev(flip(x))), ⊕ = `add` or `ew_multiply`; with weight tying the reverse
//!   mixer's in_proj and out_proj are the forward mixer's.
//! - **RCPS** (Caduceus-PS): hidden states are [fwd | rc] of width 2d, rc(h) = flip over (length, channels).
//!   Every submodule f runs as cat(f(h_fwd), rc(f(rc(h_rc)))); the embedding is cat(E(ids), rc(E(rc(ids))))
//!   with rc(ids) = complement(flip(ids)); the LM head is W·h_fwd + W[complement]·flip_C(h_rc). So
//!   f(rc(x)) = rc(f(x)) exactly.
//! - Blocks are mamba_ssm's Add→Norm→Mixer with RMSNorm (no MLP); a final add + norm.

use crate::lm::{Cache, LanguageModel, ModelInfo};
use crate::mamba::{Mamba, MambaConfig};
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use ouro_kernels::norm::rms_norm;
use serde::{Deserialize, Serialize};

/// The DNA character vocabulary of Caduceus' tokenizer (`tokenization_caduceus.py`).
pub const DNA_VOCAB: [&str; 12] = ["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]", "A", "C", "G", "T", "N"];
/// Id of [MASK] and [PAD].
pub const DNA_MASK: u32 = 3;
pub const DNA_PAD: u32 = 4;

/// The complement of each DNA token id (A↔T, C↔G; everything else maps to itself), for `vocab` ids.
pub fn dna_complement_map(vocab: usize) -> Vec<u32> {
    (0..vocab as u32)
        .map(|i| match i {
            7 => 10,
            10 => 7,
            8 => 9,
            9 => 8,
            other => other,
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaduceusConfig {
    pub d_model: usize,
    pub n_layer: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub ssm_cfg: serde_json::Value,
    #[serde(default = "yes")]
    pub rms_norm: bool,
    #[serde(default = "eps")]
    pub norm_epsilon: f64,
    #[serde(default = "yes")]
    pub bidirectional: bool,
    #[serde(default = "add")]
    pub bidirectional_strategy: String,
    #[serde(default = "yes")]
    pub bidirectional_weight_tie: bool,
    #[serde(default)]
    pub rcps: bool,
    #[serde(default)]
    pub complement_map: Option<serde_json::Value>,
    #[serde(default = "eight")]
    pub pad_vocab_size_multiple: usize,
}

fn yes() -> bool {
    true
}
fn eps() -> f64 {
    1e-5
}
fn add() -> String {
    "add".into()
}
fn eight() -> usize {
    8
}

impl CaduceusConfig {
    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(self.pad_vocab_size_multiple.max(1)) * self.pad_vocab_size_multiple.max(1)
    }
    fn mamba(&self) -> Result<MambaConfig> {
        let mut m = MambaConfig::new(self.d_model);
        let s = &self.ssm_cfg;
        let u = |k: &str, d: usize| s.get(k).and_then(|v| v.as_u64()).map_or(d, |v| v as usize);
        m.d_state = u("d_state", 16);
        m.d_conv = u("d_conv", 4);
        m.d_inner = u("expand", 2) * self.d_model;
        if let Some(r) = s.get("dt_rank").and_then(|v| v.as_u64()) {
            m.dt_rank = r as usize;
        }
        m.bias = s.get("bias").and_then(|v| v.as_bool()).unwrap_or(false);
        m.conv_bias = s.get("conv_bias").and_then(|v| v.as_bool()).unwrap_or(true);
        Ok(m)
    }
    /// Complement of each id (padded vocab), from `complement_map` or the DNA default.
    pub fn complement(&self) -> Result<Vec<u32>> {
        let v = self.padded_vocab();
        match &self.complement_map {
            None | Some(serde_json::Value::Null) => Ok(dna_complement_map(v)),
            Some(serde_json::Value::Object(o)) => {
                let mut c: Vec<u32> = (0..v as u32).collect();
                for (k, val) in o {
                    let (i, j) = (k.parse::<usize>().map_err(|_| candle_core::Error::Msg(format!("complement_map key '{k}' is not a token id")))?, val.as_u64().unwrap_or(0) as u32);
                    if i >= v || j as usize >= v {
                        bail!("complement_map maps {i} → {j}, outside the vocabulary ({v})");
                    }
                    c[i] = j;
                }
                Ok(c)
            }
            Some(other) => bail!("complement_map must be an object of id → id, got {other}"),
        }
    }
}

/// rc(h) for hidden states: flip over length and channels.
pub fn rc_hidden(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.flip(&[1, 2])
}

/// BiMamba: the two directions of one layer.
#[derive(Clone, Debug)]
pub struct BiMamba {
    fwd: Mamba,
    rev: Option<Mamba>,
    multiply: bool,
}

impl BiMamba {
    /// `mixer.mamba_fwd.*`, `mixer.mamba_rev.*` (in/out projections of `mamba_rev` read from `mamba_fwd` when tied).
    pub fn new(cfg: &CaduceusConfig, vb: VarBuilder) -> Result<Self> {
        let m = cfg.mamba()?;
        let fwd = Mamba::new(m.clone(), vb.pp("mamba_fwd"))?;
        let rev = if cfg.bidirectional {
            let proj = if cfg.bidirectional_weight_tie { vb.pp("mamba_fwd") } else { vb.pp("mamba_rev") };
            Some(Mamba::with_projections(m, vb.pp("mamba_rev"), proj)?)
        } else {
            None
        };
        let multiply = match cfg.bidirectional_strategy.as_str() {
            "add" => false,
            "ew_multiply" => true,
            other => bail!("bidirectional_strategy '{other}' is not supported (add, ew_multiply)"),
        };
        Ok(Self { fwd, rev, multiply })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.fwd.forward(x, None, None)?;
        match &self.rev {
            None => Ok(out),
            Some(rev) => {
                let r = rev.forward(&x.contiguous()?.flip(&[1])?, None, None)?.contiguous()?.flip(&[1])?;
                if self.multiply {
                    out * r
                } else {
                    out + r
                }
            }
        }
    }
}

struct Layer {
    norm_w: Tensor,
    mixer: BiMamba,
}

/// The Caduceus backbone with its LM head (`CaduceusForMaskedLM`: `caduceus.backbone.*`, `lm_head`).
pub struct Caduceus {
    pub cfg: CaduceusConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    norm_f: Tensor,
    complement: Vec<u32>,
    device: Device,
}

impl Caduceus {
    /// Loads a `CaduceusForMaskedLM` checkpoint folder (config.json + safetensors).
    pub fn load(ck: &crate::checkpoint::Checkpoint, dtype: DType, dev: &Device) -> Result<Self> {
        let cfg: CaduceusConfig = serde_json::from_value(ck.config.clone()).map_err(|e| candle_core::Error::Msg(format!("{}: not a Caduceus config: {e}", ck.config_path().display())))?;
        Self::new(cfg, ck.var_builder(dtype, dev, &[]))
    }

    pub fn new(cfg: CaduceusConfig, vb: VarBuilder) -> Result<Self> {
        let v = cfg.padded_vocab();
        let d = cfg.d_model;
        if !cfg.rms_norm {
            bail!("caduceus: rms_norm = false (LayerNorm) is not supported");
        }
        let b = vb.pp("caduceus.backbone");
        let emb_name = if cfg.rcps { "embeddings.word_embeddings.embedding" } else { "embeddings.word_embeddings" };
        let embedding = Embedding::new(b.pp(emb_name).get((v, d), "weight")?, d);
        let layers = (0..cfg.n_layer)
            .map(|i| {
                let l = b.pp(format!("layers.{i}"));
                let mixer_vb = if cfg.rcps { l.pp("mixer.submodule") } else { l.pp("mixer") };
                let norm_name = if cfg.rcps { "norm.submodule.weight" } else { "norm.weight" };
                Ok(Layer { norm_w: l.get(d, norm_name)?, mixer: BiMamba::new(&cfg, mixer_vb)? })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm_f = b.get(d, if cfg.rcps { "norm_f.submodule.weight" } else { "norm_f.weight" })?;
        let complement = cfg.complement()?;
        let device = vb.device().clone();
        Ok(Self { cfg, embedding, layers, norm_f, complement, device })
    }

    /// ids (b, l) → complement(flip(ids)).
    pub fn rc_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let map = Tensor::new(self.complement.as_slice(), ids.device())?;
        let flipped = ids.contiguous()?.flip(&[1])?;
        let (b, l) = flipped.dims2()?;
        map.index_select(&flipped.flatten_all()?, 0)?.reshape((b, l))
    }

    fn norm(&self, w: &Tensor, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, w, self.cfg.norm_epsilon)
    }

    /// Applies `f` RCPS-style to 2d-wide hidden states (or directly when not RCPS).
    fn rcps<F: Fn(&Tensor) -> Result<Tensor>>(&self, h: &Tensor, f: F) -> Result<Tensor> {
        if !self.cfg.rcps {
            return f(h);
        }
        let d = self.cfg.d_model;
        let fwd = f(&h.narrow(2, 0, d)?)?;
        let rc = rc_hidden(&f(&rc_hidden(&h.narrow(2, d, d)?)?)?)?;
        Tensor::cat(&[&fwd, &rc], 2)
    }

    /// Token embeddings: (b, l, d), or [E(ids) | rc(E(rc(ids)))] (b, l, 2d) with RCPS.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let e = self.embedding.forward(ids)?.to_dtype(DType::F32)?;
        if !self.cfg.rcps {
            return Ok(e);
        }
        let rc = rc_hidden(&self.embedding.forward(&self.rc_ids(ids)?)?.to_dtype(DType::F32)?)?;
        Tensor::cat(&[&e, &rc], 2)
    }

    /// Block `i` (mamba_ssm's Add → Norm → Mixer; RCPS-wrapped): (hidden, residual) → (hidden, residual).
    pub fn block(&self, i: usize, h: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[i];
        let res = match residual {
            Some(r) => (h + r)?,
            None => h.clone(),
        };
        let normed = self.rcps(&res, |x| self.norm(&layer.norm_w, x))?;
        Ok((self.rcps(&normed, |x| layer.mixer.forward(x))?, res))
    }

    /// Final hidden states: (b, l, d) or (b, l, 2d) with RCPS.
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let mut h = self.embed(ids)?;
        let mut residual: Option<Tensor> = None;
        for i in 0..self.layers.len() {
            let (out, res) = self.block(i, &h, residual.as_ref())?;
            h = out;
            residual = Some(res);
        }
        let res = match residual {
            Some(r) => (h + r)?,
            None => h,
        };
        self.rcps(&res, |x| self.norm(&self.norm_f, x))
    }

    /// The complement of each token id (padded vocabulary).
    pub fn complement(&self) -> &[u32] {
        &self.complement
    }

    /// Logits over the vocabulary (b, l, V); with RCPS, W·h_fwd + W[complement]·flip_C(h_rc).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let w = self.embedding.embeddings();
        if !self.cfg.rcps {
            return h.broadcast_matmul(&w.t()?);
        }
        let d = self.cfg.d_model;
        let wc = w.index_select(&Tensor::new(self.complement.as_slice(), w.device())?, 0)?;
        let fwd = h.narrow(2, 0, d)?.broadcast_matmul(&w.t()?)?;
        let rc = h.narrow(2, d, d)?.contiguous()?.flip(&[2])?.broadcast_matmul(&wc.t()?)?;
        fwd + rc
    }

    /// Sequence features for a classifier: the fwd half and the rc half re-aligned, stacked on a last axis
    /// (b, l, d, 2) with RCPS (the `CaduceusForSequenceClassification` layout), else (b, l, d, 1).
    pub fn features(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden(ids)?;
        if !self.cfg.rcps {
            return h.unsqueeze(3);
        }
        let d = self.cfg.d_model;
        Tensor::stack(&[&h.narrow(2, 0, d)?, &rc_hidden(&h.narrow(2, d, d)?)?], 3)
    }
}

impl LanguageModel for Caduceus {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            architecture: format!("caduceus ({})", if self.cfg.rcps { "RCPS" } else { "BiMamba" }),
            vocab_size: self.cfg.padded_vocab(),
            d_model: self.cfg.d_model,
            n_layers: self.cfg.n_layer,
            state_floats_per_seq: 0,
            kv_floats_per_token: 0,
            layer_kinds: vec!["bimamba".into(); self.cfg.n_layer],
        }
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn new_cache(&self, _batch: usize) -> Result<Cache> {
        bail!("Caduceus is bidirectional: it has no recurrent decoding state")
    }
    fn forward(&self, ids: &Tensor, seq_idx: Option<&Tensor>, cache: Option<&mut Cache>) -> Result<Tensor> {
        if cache.is_some() {
            bail!("Caduceus is bidirectional: it has no recurrent decoding state");
        }
        let _ = seq_idx; // documents are encoded independently by the caller (one per row)
        self.logits(&self.hidden(ids)?)
    }
    fn step(&self, _ids: &Tensor, _cache: &mut Cache) -> Result<Tensor> {
        bail!("Caduceus is bidirectional: it cannot decode token by token")
    }
    fn features(&self, ids: &Tensor) -> Result<Tensor> {
        Caduceus::features(self, ids)
    }
    fn is_bidirectional(&self) -> bool {
        true
    }
}
