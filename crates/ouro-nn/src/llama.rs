//! Llama (HF `LlamaForCausalLM`): RMSNorm, RoPE (`rope_theta`), grouped-query attention with a KV cache,
//! SwiGLU MLP, tied or untied head. The Transformer baseline and the distillation teacher.
//!
//! ```text
//! h = embed_tokens(ids)
//! for each layer:  h = h + self_attn(input_layernorm(h));  h = h + mlp(post_attention_layernorm(h))
//! logits = lm_head(norm(h))
//! ```

use crate::checkpoint::Checkpoint;
use crate::layers::{embedding, linear, Act, Attention, AttentionConfig, GluMlp, KvCache, RmsNorm};
use crate::lm::{Cache, LanguageModel, LayerCache, ModelInfo};
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// HF `LlamaConfig` keys that ouro uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 keeps `rope_theta` here (with `rope_type`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// false: a bidirectional encoder (BERT-style attention over the whole row; masked-LM training).
    #[serde(default = "yes")]
    pub is_causal: bool,
}

fn yes() -> bool {
    true
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// Takes `rope_theta` from `rope_parameters` when present; rejects RoPE scaling ouro does not implement.
    pub fn resolve_rope(&mut self) -> Result<()> {
        for v in [&self.rope_scaling, &self.rope_parameters].into_iter().flatten() {
            match v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()) {
                None | Some("default") => {}
                Some(other) => bail!("rope type '{other}' is not supported (default RoPE only)"),
            }
        }
        if let Some(theta) = self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()) {
            self.rope_theta = theta;
        }
        Ok(())
    }
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn attention(&self) -> AttentionConfig {
        AttentionConfig {
            d_model: self.hidden_size,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            rotary_dim: self.head_dim(),
            rope_theta: self.rope_theta,
            qkv_bias: self.attention_bias,
            out_bias: self.attention_bias,
            window: None, causal: self.is_causal,
        }
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GluMlp,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
}

impl Llama {
    pub fn load(ck: &Checkpoint, dtype: DType, dev: &Device) -> Result<Self> {
        let path = ck.config_path();
        let mut cfg: LlamaConfig = serde_json::from_value(ck.config.clone()).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        cfg.resolve_rope().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Self::new(cfg, ck.var_builder(dtype, dev, &[]))
    }

    pub fn new(cfg: LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let act = Act::parse(&cfg.hidden_act)?;
        let embed_tokens = embedding(vb.pp("model.embed_tokens"), cfg.vocab_size, d)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let lvb = vb.pp(format!("model.layers.{i}"));
                Ok(Layer {
                    input_layernorm: RmsNorm::new(d, cfg.rms_norm_eps, lvb.pp("input_layernorm"))?,
                    self_attn: Attention::new_llama(cfg.attention(), lvb.pp("self_attn"))?,
                    post_attention_layernorm: RmsNorm::new(d, cfg.rms_norm_eps, lvb.pp("post_attention_layernorm"))?,
                    mlp: GluMlp::new(d, cfg.intermediate_size, cfg.mlp_bias, act, lvb.pp("mlp"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(d, cfg.rms_norm_eps, vb.pp("model.norm"))?;
        let lm_head = if cfg.tie_word_embeddings { Linear::new(embed_tokens.embeddings().clone(), None) } else { linear(vb.pp("lm_head"), d, cfg.vocab_size, false)? };
        let device = vb.device().clone();
        Ok(Self { cfg, embed_tokens, layers, norm, lm_head, device })
    }

    /// Hidden states after each layer, (b, l, d) each, and the logits: the teacher's view for distillation.
    pub fn forward_hidden(&self, ids: &Tensor, seq_idx: Option<&Tensor>) -> Result<(Vec<Tensor>, Tensor)> {
        let mut h = self.embed_tokens.forward(ids)?;
        let mut hs = vec![h.clone()];
        for layer in &self.layers {
            h = self.layer_forward(layer, &h, seq_idx, None)?;
            hs.push(h.clone());
        }
        let logits = self.lm_head.forward(&self.norm.forward(&h)?)?;
        Ok((hs, logits))
    }

    /// Layer `i`'s attention matrix (b, heads, l, l) for its input h (b, l, d) (before the layer's norm).
    pub fn attention_matrix(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        let layer = self.layers.get(i).ok_or_else(|| candle_core::Error::Msg(format!("llama: no layer {i}")))?;
        layer.self_attn.matrix(&layer.input_layernorm.forward(h)?, None)
    }

    fn layer_forward(&self, layer: &Layer, h: &Tensor, seq_idx: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = (h + layer.self_attn.forward(&layer.input_layernorm.forward(h)?, seq_idx, cache)?)?;
        &h + layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?
    }
}

impl LanguageModel for Llama {
    fn is_bidirectional(&self) -> bool {
        !self.cfg.is_causal
    }
    fn features(&self, ids: &Tensor) -> Result<Tensor> {
        let mut h = self.embed_tokens.forward(ids)?;
        for layer in &self.layers {
            h = self.layer_forward(layer, &h, None, None)?;
        }
        self.norm.forward(&h)?.unsqueeze(3)
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            architecture: "llama".into(),
            vocab_size: self.cfg.vocab_size,
            d_model: self.cfg.hidden_size,
            n_layers: self.cfg.num_hidden_layers,
            state_floats_per_seq: 0,
            kv_floats_per_token: self.cfg.num_hidden_layers * 2 * self.cfg.kv_heads() * self.cfg.head_dim(),
            layer_kinds: vec!["attention".into(); self.cfg.num_hidden_layers],
        }
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn new_cache(&self, _batch: usize) -> Result<Cache> {
        if !self.cfg.is_causal {
            candle_core::bail!("a bidirectional (is_causal = false) Llama cannot decode token by token");
        }
        Ok(Cache::new((0..self.layers.len()).map(|_| LayerCache::Attention(KvCache::default())).collect()))
    }

    fn forward(&self, ids: &Tensor, seq_idx: Option<&Tensor>, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let l = ids.dim(1)?;
        let mut h = self.embed_tokens.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = match cache.as_deref_mut().map(|c| &mut c.layers[i]) {
                Some(LayerCache::Attention(kv)) => Some(kv),
                Some(_) => bail!("cache layer {i} does not match the model"),
                None => None,
            };
            h = self.layer_forward(layer, &h, seq_idx, kv)?;
        }
        if let Some(c) = cache {
            c.seqlen += l;
        }
        self.lm_head.forward(&self.norm.forward(&h)?)
    }

    fn step(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.forward(&ids.unsqueeze(1)?, None, Some(cache))?.squeeze(1)
    }
}
