//! Llamba (Cartesia; `cartesia-ai/edge` `cartesia_pytorch/Llamba`): Llama's blocks with the attention
//! replaced by the discrete Mamba-2 mixer — the MOHAWK-distilled student.
//!
//! ```text
//! h = embedding(ids)
//! for each layer:  h = h + mixer(input_layernorm(h));  h = h + mlp(post_attention_layernorm(h))
//! logits = lm_head(final_layernorm(h))
//! ```

use crate::checkpoint::Checkpoint;
use crate::discrete_mamba2::{DiscreteMamba2, DiscreteMamba2Config};
use crate::layers::{embedding, linear, Act, GluMlp, RmsNorm};
use crate::lm::{Cache, LanguageModel, LayerCache, ModelInfo};
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlambaMlpConfig {
    pub intermediate_size: usize,
    #[serde(default)]
    pub bias: bool,
    #[serde(default = "silu")]
    pub act_fn: String,
}

fn silu() -> String {
    "silu".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlambaSsmConfig {
    pub d_state: usize,
    pub n_v_heads: usize,
    pub n_qk_heads: usize,
    #[serde(default = "one")]
    pub expand: usize,
    #[serde(default = "chunk")]
    pub chunk_size: usize,
    #[serde(default = "identity")]
    pub activation: String,
    #[serde(default)]
    pub bias: bool,
    #[serde(default = "four")]
    pub d_conv: usize,
    #[serde(default = "yes")]
    pub conv_bias: bool,
}

fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn chunk() -> usize {
    128
}
fn identity() -> String {
    "identity".into()
}
fn yes() -> bool {
    true
}

/// `LlambaConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlambaConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layer: usize,
    #[serde(default)]
    pub tie_embeddings: bool,
    #[serde(default = "eight")]
    pub pad_vocab_size_multiple: usize,
    #[serde(default)]
    pub lm_head_bias: bool,
    #[serde(default = "eps")]
    pub norm_epsilon: f64,
    pub mlp_cfg: LlambaMlpConfig,
    pub ssm_cfg: LlambaSsmConfig,
}

fn eight() -> usize {
    8
}
fn eps() -> f64 {
    1e-5
}

impl LlambaConfig {
    pub fn mixer(&self) -> DiscreteMamba2Config {
        let s = &self.ssm_cfg;
        DiscreteMamba2Config {
            d_model: self.d_model,
            d_state: s.d_state,
            n_v_heads: s.n_v_heads,
            n_qk_heads: s.n_qk_heads,
            expand: s.expand,
            d_conv: s.d_conv,
            conv_bias: s.conv_bias,
            bias: s.bias,
            activation: s.activation.clone(),
            chunk_size: s.chunk_size,
        }
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    mixer: DiscreteMamba2,
    post_attention_layernorm: RmsNorm,
    mlp: GluMlp,
}

pub struct Llamba {
    pub cfg: LlambaConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    final_layernorm: RmsNorm,
    lm_head: Linear,
    vocab_rows: usize,
    device: Device,
}

impl Llamba {
    pub fn load(ck: &Checkpoint, dtype: DType, dev: &Device) -> Result<Self> {
        let (cfg, rows) = Self::config_of(ck)?;
        Self::new(cfg, rows, ck.var_builder(dtype, dev, &[]))
    }

    /// A checkpoint's config and embedding rows (the vocabulary padded as stored).
    pub fn config_of(ck: &Checkpoint) -> Result<(LlambaConfig, usize)> {
        let mut config = ck.config.clone();
        if let Some(o) = config.as_object_mut() {
            // Descriptive keys of the HF wrapper, not model hyper-parameters.
            for k in ["model_type", "architectures", "torch_dtype", "transformers_version", "auto_map", "resid_dropout", "bos_token_id", "eos_token_id", "pad_token_id"] {
                o.remove(k);
            }
        }
        let cfg: LlambaConfig = serde_json::from_value(config).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", ck.config_path().display())))?;
        let rows = ck
            .tensor("backbone.embedding.weight")
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: missing tensor 'backbone.embedding.weight'", ck.path.display())))?
            .dim(0)?;
        Ok((cfg, rows))
    }

    /// `vocab_rows`: the embedding's rows (vocab padded to `pad_vocab_size_multiple`).
    pub fn new(cfg: LlambaConfig, vocab_rows: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        if vocab_rows < cfg.vocab_size {
            bail!("embedding has {vocab_rows} rows, fewer than vocab_size {}", cfg.vocab_size);
        }
        let act = Act::parse(&cfg.mlp_cfg.act_fn)?;
        let embedding = embedding(vb.pp("backbone.embedding"), vocab_rows, d)?;
        let layers = (0..cfg.n_layer)
            .map(|i| {
                let lvb = vb.pp(format!("backbone.layers.{i}"));
                // The reference's block norms use eps 1e-5 whatever norm_epsilon says (it applies to the final norm).
                Ok(Layer {
                    input_layernorm: RmsNorm::new(d, 1e-5, lvb.pp("input_layernorm"))?,
                    mixer: DiscreteMamba2::new(cfg.mixer(), lvb.pp("mixer"))?,
                    post_attention_layernorm: RmsNorm::new(d, 1e-5, lvb.pp("post_attention_layernorm"))?,
                    mlp: GluMlp::new(d, cfg.mlp_cfg.intermediate_size, cfg.mlp_cfg.bias, act, lvb.pp("mlp"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layernorm = RmsNorm::new(d, cfg.norm_epsilon, vb.pp("backbone.final_layernorm"))?;
        let lm_head = if cfg.tie_embeddings { Linear::new(embedding.embeddings().clone(), None) } else { linear(vb.pp("lm_head"), d, vocab_rows, cfg.lm_head_bias)? };
        let device = vb.device().clone();
        Ok(Self { cfg, embedding, layers, final_layernorm, lm_head, vocab_rows, device })
    }

    /// The discrete Mamba-2 mixers, layer by layer (MOHAWK aligns them with the teacher's attention).
    pub fn mixers(&self) -> Vec<&DiscreteMamba2> {
        self.layers.iter().map(|l| &l.mixer).collect()
    }

    /// Layer `i`'s mixer matrix (b, n_v_heads, l, l), D on the diagonal, for the layer input h (b, l, d).
    pub fn mixer_matrix(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        let layer = self.layer(i)?;
        layer.mixer.materialize(&layer.input_layernorm.forward(h)?, true)
    }

    /// Layer `i` (mixer and MLP with their residuals) on its input h (b, l, d).
    pub fn layer_forward(&self, i: usize, h: &Tensor, seq_idx: Option<&Tensor>) -> Result<Tensor> {
        let layer = self.layer(i)?;
        let h = (h + layer.mixer.forward(&layer.input_layernorm.forward(h)?, seq_idx, None)?)?;
        &h + layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?
    }

    fn layer(&self, i: usize) -> Result<&Layer> {
        self.layers.get(i).ok_or_else(|| candle_core::Error::Msg(format!("llamba: no layer {i}")))
    }
}

impl LanguageModel for Llamba {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            architecture: "llamba".into(),
            vocab_size: self.vocab_rows,
            d_model: self.cfg.d_model,
            n_layers: self.cfg.n_layer,
            state_floats_per_seq: self.layers.iter().map(|l| l.mixer.state_size()).sum(),
            kv_floats_per_token: 0,
            layer_kinds: vec!["discrete_mamba2".into(); self.cfg.n_layer],
        }
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn new_cache(&self, batch: usize) -> Result<Cache> {
        Ok(Cache::new(self.layers.iter().map(|l| Ok(LayerCache::Mamba2(l.mixer.zero_state(batch)?))).collect::<Result<Vec<_>>>()?))
    }

    fn forward(&self, ids: &Tensor, seq_idx: Option<&Tensor>, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let l = ids.dim(1)?;
        let mut h = self.embedding.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let st = match cache.as_deref_mut().map(|c| &mut c.layers[i]) {
                Some(LayerCache::Mamba2(s)) => Some(s),
                Some(_) => bail!("cache layer {i} does not match the model"),
                None => None,
            };
            h = (&h + layer.mixer.forward(&layer.input_layernorm.forward(&h)?, seq_idx, st)?)?;
            h = (&h + layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?)?;
        }
        if let Some(c) = cache {
            c.seqlen += l;
        }
        self.lm_head.forward(&self.final_layernorm.forward(&h)?)
    }

    fn step(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut h = self.embedding.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let LayerCache::Mamba2(s) = &mut cache.layers[i] else { bail!("cache layer {i} does not match the model") };
            h = (&h + layer.mixer.step(&layer.input_layernorm.forward(&h)?, s)?)?;
            h = (&h + layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?)?;
        }
        cache.seqlen += 1;
        self.lm_head.forward(&self.final_layernorm.forward(&h)?)
    }
}
