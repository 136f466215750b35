//! Hawk, Griffin and RecurrentGemma (HF `RecurrentGemmaForCausalLM` names and config): residual blocks of a
//! temporal mixer — the RG-LRU recurrent block or local multi-query attention over a sliding window — and a
//! GeGLU MLP, cycling through `block_types` (Griffin: recurrent, recurrent, attention; Hawk: all recurrent).
//!
//! ```text
//! h = embed(ids) · bf16(√d)
//! for each layer:  r = h + temporal(RMSNorm₁₊w(h));  h = r + MLP(RMSNorm₁₊w(r))
//! logits = c·tanh(lm_head(RMSNorm₁₊w(h)) / c)               c = logits_soft_cap (0: none)
//! ```
//! Memory is bounded whatever the context: recurrent layers keep (conv, h); attention layers keep at most
//! `attention_window_size` keys and values.

use crate::checkpoint::Checkpoint;
use crate::layers::{embedding, linear, Act, Attention, AttentionConfig, KvCache};
use crate::lm::{Cache, LanguageModel, LayerCache, ModelInfo};
use crate::rglru::RecurrentBlock;
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use ouro_kernels::norm::rms_norm;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
pub struct GriffinConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub lru_width: usize,
    pub attention_window_size: usize,
    pub conv1d_width: usize,
    pub logits_soft_cap: f64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    /// "recurrent" or "attention", cycled over the layers.
    pub block_types: Vec<String>,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub hidden_activation: String,
}

impl GriffinConfig {
    /// HF `recurrent_gemma` config (transformers 4.x or 5.x layout).
    pub fn from_json(c: &Value) -> Result<Self> {
        let u = |k: &str| -> Result<usize> { c.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| candle_core::Error::Msg(format!("config has no integer '{k}'"))) };
        let f = |k: &str, d: f64| c.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let rope = c.get("rope_parameters");
        if let Some(t) = rope.and_then(|r| r.get("rope_type")).and_then(|t| t.as_str()) {
            if t != "default" {
                bail!("rope type '{t}' is not supported");
            }
        }
        let hidden = u("hidden_size")?;
        let heads = u("num_attention_heads")?;
        let block_types: Vec<String> = match c.get("block_types").or_else(|| c.get("_block_types")) {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| candle_core::Error::Msg(format!("block_types: {e}")))?,
            None => vec!["recurrent".into(), "recurrent".into(), "attention".into()],
        };
        if block_types.is_empty() || block_types.iter().any(|b| b != "recurrent" && b != "attention") {
            bail!("block_types must list \"recurrent\" / \"attention\", got {block_types:?}");
        }
        Ok(Self {
            vocab_size: u("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: u("intermediate_size")?,
            num_hidden_layers: u("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: c.get("num_key_value_heads").and_then(|v| v.as_u64()).map_or(heads, |v| v as usize),
            lru_width: c.get("lru_width").and_then(|v| v.as_u64()).map_or(hidden, |v| v as usize),
            attention_window_size: u("attention_window_size")?,
            conv1d_width: c.get("conv1d_width").and_then(|v| v.as_u64()).map_or(4, |v| v as usize),
            logits_soft_cap: f("logits_soft_cap", 30.0),
            rms_norm_eps: f("rms_norm_eps", 1e-6),
            rope_theta: rope.and_then(|r| r.get("rope_theta")).and_then(|v| v.as_f64()).unwrap_or_else(|| f("rope_theta", 10000.0)),
            partial_rotary_factor: rope.and_then(|r| r.get("partial_rotary_factor")).and_then(|v| v.as_f64()).unwrap_or_else(|| f("partial_rotary_factor", 0.5)),
            block_types,
            attention_bias: c.get("attention_bias").and_then(|v| v.as_bool()).unwrap_or(false),
            tie_word_embeddings: c.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(true),
            hidden_activation: c.get("hidden_activation").and_then(|v| v.as_str()).unwrap_or("gelu_pytorch_tanh").to_string(),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn layer_is_attention(&self, i: usize) -> bool {
        self.block_types[i % self.block_types.len()] == "attention"
    }
}

/// RMSNorm with the (1 + w) scale.
#[derive(Clone, Debug)]
struct Norm1p {
    weight: Tensor,
    eps: f64,
}

impl Norm1p {
    fn new(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(d, "weight")?, eps })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &(self.weight.to_dtype(DType::F32)? + 1.0)?, self.eps)
    }
}

enum Temporal {
    Recurrent(RecurrentBlock),
    Attention(Attention),
}

struct Layer {
    temporal_pre_norm: Norm1p,
    temporal: Temporal,
    channel_pre_norm: Norm1p,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

pub struct Griffin {
    pub cfg: GriffinConfig,
    embed_tokens: Embedding,
    /// √d rounded to bfloat16, as the reference multiplies the embeddings.
    normalizer: f64,
    layers: Vec<Layer>,
    final_norm: Norm1p,
    lm_head: Linear,
    act: Act,
    device: Device,
}

impl Griffin {
    pub fn load(ck: &Checkpoint, dtype: DType, dev: &Device) -> Result<Self> {
        let cfg = GriffinConfig::from_json(&ck.config).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", ck.config_path().display())))?;
        Self::new(cfg, ck.var_builder(dtype, dev, &[]))
    }

    pub fn new(cfg: GriffinConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let m = vb.pp("model");
        let embed_tokens = embedding(m.pp("embed_tokens"), cfg.vocab_size, d)?;
        let hd = cfg.head_dim();
        let rotary = ((hd as f64 * cfg.partial_rotary_factor) as usize) & !1;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                let t = l.pp("temporal_block");
                let temporal = if cfg.layer_is_attention(i) {
                    Temporal::Attention(Attention::new_llama(
                        AttentionConfig {
                            d_model: d,
                            n_heads: cfg.num_attention_heads,
                            n_kv_heads: cfg.num_key_value_heads,
                            head_dim: hd,
                            rotary_dim: rotary,
                            rope_theta: cfg.rope_theta,
                            qkv_bias: cfg.attention_bias,
                            out_bias: true,
                            window: Some(cfg.attention_window_size), causal: true,
                        },
                        t,
                    )?)
                } else {
                    Temporal::Recurrent(RecurrentBlock::new(d, cfg.lru_width, cfg.num_attention_heads, cfg.conv1d_width, t)?)
                };
                let mlp = l.pp("mlp_block");
                let half = cfg.intermediate_size / 2;
                Ok(Layer {
                    temporal_pre_norm: Norm1p::new(d, cfg.rms_norm_eps, l.pp("temporal_pre_norm"))?,
                    temporal,
                    channel_pre_norm: Norm1p::new(d, cfg.rms_norm_eps, l.pp("channel_pre_norm"))?,
                    gate_proj: linear(mlp.pp("gate_proj"), d, half, true)?,
                    up_proj: linear(mlp.pp("up_proj"), d, half, true)?,
                    down_proj: linear(mlp.pp("down_proj"), half, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = Norm1p::new(d, cfg.rms_norm_eps, m.pp("final_norm"))?;
        let lm_head = if cfg.tie_word_embeddings { Linear::new(embed_tokens.embeddings().clone(), None) } else { linear(vb.pp("lm_head"), d, cfg.vocab_size, false)? };
        let normalizer = half::bf16::from_f64((d as f64).sqrt()).to_f64();
        let act = Act::parse(&cfg.hidden_activation)?;
        let device = vb.device().clone();
        Ok(Self { cfg, embed_tokens, normalizer, layers, final_norm, lm_head, act, device })
    }

    /// The parameters' dtype, which the layers compute in; the residual stream stays f32, each layer's input
    /// cast to it and its output back.
    fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    fn mlp(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.dtype())?;
        l.down_proj.forward(&(self.act.apply(&l.gate_proj.forward(&x)?)? * l.up_proj.forward(&x)?)?)?.to_dtype(DType::F32)
    }

    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(&self.final_norm.forward(h)?.to_dtype(self.dtype())?)?;
        let c = self.cfg.logits_soft_cap;
        if c > 0.0 {
            (logits / c)?.tanh()? * c
        } else {
            Ok(logits)
        }
    }

    /// (b, l) f32: 1 where a segment starts (absolute position 0, or a new document).
    fn resets(&self, b: usize, l: usize, offset: usize, seq_idx: Option<&Tensor>) -> Result<Tensor> {
        let docs = seq_idx.map(|s| ouro_kernels::seq_idx_to_vec(s, b, l)).transpose()?;
        let v: Vec<f32> = (0..b)
            .flat_map(|bi| {
                let docs = docs.as_ref();
                (0..l).map(move |t| {
                    let new_doc = docs.is_some_and(|d| t > 0 && d[bi * l + t] != d[bi * l + t - 1]);
                    (offset + t == 0 || new_doc) as u8 as f32
                })
            })
            .collect();
        Tensor::from_vec(v, (b, l), &self.device)
    }
}

impl LanguageModel for Griffin {
    fn info(&self) -> ModelInfo {
        let (mut state, mut kinds) = (0, Vec::new());
        let mut window_kv = 0;
        for l in &self.layers {
            match &l.temporal {
                Temporal::Recurrent(r) => {
                    state += r.state_size();
                    kinds.push("rg_lru".to_string());
                }
                Temporal::Attention(a) => {
                    window_kv += 2 * a.cfg.n_kv_heads * a.cfg.head_dim * self.cfg.attention_window_size;
                    kinds.push("local_attention".to_string());
                }
            }
        }
        let arch = if kinds.iter().all(|k| k == "rg_lru") { "hawk" } else { "griffin" };
        ModelInfo {
            architecture: format!("recurrent_gemma ({arch})"),
            vocab_size: self.cfg.vocab_size,
            d_model: self.cfg.hidden_size,
            n_layers: self.cfg.num_hidden_layers,
            // Bounded: recurrent states plus at most one window of keys and values.
            state_floats_per_seq: state + window_kv,
            kv_floats_per_token: 0,
            layer_kinds: kinds,
        }
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn new_cache(&self, batch: usize) -> Result<Cache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(match &l.temporal {
                    Temporal::Recurrent(r) => LayerCache::RgLru(r.zero_state(batch, &self.device)?),
                    Temporal::Attention(_) => LayerCache::Attention(KvCache::default()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Cache::new(layers))
    }

    fn forward(&self, ids: &Tensor, seq_idx: Option<&Tensor>, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.seqlen);
        let resets = self.resets(b, l, offset, seq_idx)?;
        let mut h = (self.embed_tokens.forward(ids)?.to_dtype(DType::F32)? * self.normalizer)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let x = layer.temporal_pre_norm.forward(&h)?.to_dtype(self.dtype())?;
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let t = match (&layer.temporal, lc) {
                (Temporal::Recurrent(r), Some(LayerCache::RgLru(s))) => r.forward(&x, &resets, seq_idx, Some(s))?,
                (Temporal::Recurrent(r), None) => r.forward(&x, &resets, seq_idx, None)?,
                (Temporal::Attention(a), Some(LayerCache::Attention(kv))) => a.forward(&x, seq_idx, Some(kv))?,
                (Temporal::Attention(a), None) => a.forward(&x, seq_idx, None)?,
                _ => bail!("cache layer {i} does not match the model"),
            };
            let r = (t.to_dtype(DType::F32)? + &h)?;
            h = (self.mlp(layer, &layer.channel_pre_norm.forward(&r)?)? + r)?;
        }
        if let Some(c) = cache {
            c.seqlen += l;
        }
        self.head(&h)
    }

    fn step(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let reset = cache.seqlen == 0;
        let mut h = (self.embed_tokens.forward(ids)?.to_dtype(DType::F32)? * self.normalizer)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let x = layer.temporal_pre_norm.forward(&h)?.to_dtype(self.dtype())?;
            let t = match (&layer.temporal, &mut cache.layers[i]) {
                (Temporal::Recurrent(r), LayerCache::RgLru(s)) => r.step(&x, reset, s)?,
                (Temporal::Attention(a), LayerCache::Attention(kv)) => a.forward(&x.unsqueeze(1)?, None, Some(kv))?.squeeze(1)?,
                _ => bail!("cache layer {i} does not match the model"),
            };
            let r = (t.to_dtype(DType::F32)? + &h)?;
            h = (self.mlp(layer, &layer.channel_pre_norm.forward(&r)?)? + r)?;
        }
        cache.seqlen += 1;
        self.head(&h)
    }
}
