//! Mamba and Mamba-2 language models: `mamba_ssm`'s `MixerModel` + LM head, which is also HF's
//! `MambaForCausalLM`, `FalconMambaForCausalLM` and `Mamba2ForCausalLM`; and the hybrid layer patterns of
//! NVIDIA's Mamba-2-Hybrid / Nemotron-H (HF `NemotronHForCausalLM`).
//!
//! ```text
//! h = embedding(ids)
//! for each layer:  h = h + mixer(RMSNorm(h))          mixer: Mamba, Mamba-2, attention (attn_layer_idx,
//!                                                     pattern '*') or an MLP alone (pattern '-')
//!                  h = h + GatedMLP(RMSNorm₂(h))      when d_intermediate > 0
//! logits = lm_head(RMSNorm_f(h))                      lm_head tied to the embedding unless stored
//! ```
//!
//! Configs are read from HF (`model_type` mamba / falcon_mamba / mamba2 / nemotron_h) or `mamba_ssm`
//! (`d_model`, `n_layer`, `ssm_cfg`, `attn_layer_idx`, `attn_cfg`, `d_intermediate`) files. A Nemotron-H
//! config describes its layers by `hybrid_override_pattern`, one character per layer (`M` Mamba-2, `*`
//! attention, `-` MLP; [`parse_pattern`]), or by the equivalent `layers_block_type` list; every layer is one
//! pre-norm residual block with exactly one sublayer: Mamba-2 with `mamba_num_heads · mamba_head_dim`
//! channels, attention with separate q/k/v/o projections, GQA and no positional encoding, or an ungated MLP
//! `down(relu2(up(x)))`.

use crate::checkpoint::Checkpoint;
use crate::layers::{embedding, linear, Attention, AttentionConfig, GatedMlp, KvCache, PlainAct, PlainMlp, RmsNorm};
use crate::lm::{Cache, LanguageModel, LayerCache, ModelInfo};
use crate::mamba::{Mamba, MambaConfig};
use crate::mamba2::{Mamba2, Mamba2Config};
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which mixer (sublayer) a layer uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LayerKind {
    Mamba(MambaConfig),
    Mamba2(Mamba2Config),
    Attention(AttentionSpec),
    /// A block whose only sublayer is an MLP (Nemotron-H's `-`): no state, no cache.
    Mlp(MlpSpec),
}

/// An ungated MLP sublayer `down(act(up(x)))` under `mixer.` (HF `NemotronHMLP`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpSpec {
    pub hidden: usize,
    /// "relu2" (squared ReLU) or an activation name of [`crate::layers::Act`].
    pub act: String,
    pub bias: bool,
}

/// One character of a hybrid layer pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternLayer {
    /// `M`
    Mamba2,
    /// `*`
    Attention,
    /// `-`
    Mlp,
}

/// The layers of a hybrid pattern string (NVIDIA's Mamba-2-Hybrid / Nemotron-H `hybrid_override_pattern`):
/// one character per layer, `M` Mamba-2, `*` attention, `-` MLP. Any other character is an error naming it
/// and its position (`E`, Nemotron-H's mixture-of-experts layer, is recognised but not supported).
pub fn parse_pattern(pattern: &str) -> Result<Vec<PatternLayer>> {
    if pattern.is_empty() {
        bail!("hybrid pattern is empty (one character per layer: M Mamba-2, * attention, - MLP)");
    }
    pattern
        .chars()
        .enumerate()
        .map(|(i, ch)| match ch {
            'M' => Ok(PatternLayer::Mamba2),
            '*' => Ok(PatternLayer::Attention),
            '-' => Ok(PatternLayer::Mlp),
            'E' => bail!("hybrid pattern \"{pattern}\": character 'E' at position {i} is a mixture-of-experts layer, which is not supported (M Mamba-2, * attention, - MLP)"),
            other => bail!("hybrid pattern \"{pattern}\": unknown character '{other}' at position {i} (M Mamba-2, * attention, - MLP)"),
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub num_heads: usize,
    pub num_heads_kv: usize,
    pub head_dim: usize,
    pub rotary_emb_dim: usize,
    pub rotary_emb_base: f64,
    pub qkv_proj_bias: bool,
    pub out_proj_bias: bool,
    /// Llama/Nemotron-H layout (`q_proj`, `k_proj`, `v_proj`, `o_proj`) instead of mamba_ssm's fused
    /// `in_proj` / `out_proj`.
    #[serde(default)]
    pub separate_qkv: bool,
}

/// ouro's description of a MixerModel LM, whatever file format it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MambaLmConfig {
    pub d_model: usize,
    pub n_layer: usize,
    /// Rows of the embedding (vocab padded as stored).
    pub vocab_size: usize,
    pub layers: Vec<LayerKind>,
    /// Width of the gated MLP after each mixer (0: none); the MLP rounds it up to a multiple of 128.
    pub d_intermediate: usize,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    /// Prefix of the backbone's tensors: "backbone".
    pub embedding_name: String,
}

fn get<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|x| !x.is_null())
}
fn usize_or(v: &Value, k: &str, d: usize) -> Result<usize> {
    match get(v, k) {
        None => Ok(d),
        Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| candle_core::Error::Msg(format!("config '{k}' must be a non-negative integer, got {x}"))),
    }
}
fn f64_or(v: &Value, k: &str, d: f64) -> Result<f64> {
    match get(v, k) {
        None => Ok(d),
        Some(x) => x.as_f64().ok_or_else(|| candle_core::Error::Msg(format!("config '{k}' must be a number, got {x}"))),
    }
}
fn bool_or(v: &Value, k: &str, d: bool) -> Result<bool> {
    match get(v, k) {
        None => Ok(d),
        Some(x) => x.as_bool().ok_or_else(|| candle_core::Error::Msg(format!("config '{k}' must be true or false, got {x}"))),
    }
}
fn need(v: &Value, k: &str) -> Result<usize> {
    get(v, k).and_then(|x| x.as_u64()).map(|x| x as usize).ok_or_else(|| candle_core::Error::Msg(format!("config has no integer '{k}'")))
}
/// (lo, hi) from a JSON pair where "inf"/null/absent means ∞.
fn limit(v: Option<&Value>) -> Result<(f64, f64)> {
    let Some(v) = v else { return Ok((0.0, f64::INFINITY)) };
    let arr = v.as_array().filter(|a| a.len() == 2).ok_or_else(|| candle_core::Error::Msg(format!("dt limit must be a pair, got {v}")))?;
    let num = |x: &Value| -> f64 {
        match x {
            Value::Number(n) => n.as_f64().unwrap_or(f64::INFINITY),
            _ => f64::INFINITY,
        }
    };
    Ok((num(&arr[0]).min(f64::MAX).max(0.0), num(&arr[1])))
}

impl MambaLmConfig {
    /// Reads an HF (mamba, falcon_mamba, mamba2) or mamba_ssm config. `vocab_rows` is the embedding's
    /// row count in the checkpoint.
    pub fn from_json(c: &Value, arch: &str, vocab_rows: usize) -> Result<Self> {
        match arch {
            "mamba" | "falcon_mamba" => {
                let d = need(c, "hidden_size")?;
                let n_layer = need(c, "num_hidden_layers")?;
                let mut m = MambaConfig::new(d);
                m.d_inner = usize_or(c, "intermediate_size", usize_or(c, "expand", 2)? * d)?;
                m.d_state = usize_or(c, "state_size", 16)?;
                m.d_conv = usize_or(c, "conv_kernel", 4)?;
                m.dt_rank = match get(c, "time_step_rank") {
                    Some(Value::String(s)) if s == "auto" => d.div_ceil(16),
                    _ => usize_or(c, "time_step_rank", d.div_ceil(16))?,
                };
                m.bias = bool_or(c, "use_bias", false)?;
                m.conv_bias = bool_or(c, "use_conv_bias", true)?;
                if arch == "falcon_mamba" {
                    m.bcdt_rms = true;
                    m.bcdt_rms_eps = f64_or(c, "mixer_rms_eps", 1e-6)?;
                }
                if let Some(act) = get(c, "hidden_act").and_then(|a| a.as_str()) {
                    if act != "silu" {
                        bail!("hidden_act '{act}' is not supported by the Mamba mixer (silu only)");
                    }
                }
                Ok(Self {
                    d_model: d,
                    n_layer,
                    vocab_size: vocab_rows,
                    layers: vec![LayerKind::Mamba(m); n_layer],
                    d_intermediate: 0,
                    norm_eps: f64_or(c, "layer_norm_epsilon", 1e-5)?,
                    tie_embeddings: bool_or(c, "tie_word_embeddings", true)?,
                    embedding_name: "backbone.embeddings".into(),
                })
            }
            "mamba2" => {
                let d = need(c, "hidden_size")?;
                let n_layer = need(c, "num_hidden_layers")?;
                let expand = usize_or(c, "expand", 2)?;
                let heads = need(c, "num_heads")?;
                let headdim = usize_or(c, "head_dim", 64)?;
                if heads * headdim != expand * d {
                    bail!("mamba2 config: num_heads·head_dim = {} differs from expand·hidden_size = {}", heads * headdim, expand * d);
                }
                let m = Mamba2Config {
                    d_model: d,
                    d_state: usize_or(c, "state_size", 128)?,
                    d_conv: usize_or(c, "conv_kernel", 4)?,
                    expand,
                    d_inner: None,
                    headdim,
                    ngroups: usize_or(c, "n_groups", 1)?,
                    d_ssm: None,
                    rmsnorm: bool_or(c, "rms_norm", true)?,
                    norm_before_gate: false,
                    norm_eps: f64_or(c, "layer_norm_epsilon", 1e-5)?,
                    dt_limit: limit(get(c, "time_step_limit"))?,
                    bias: bool_or(c, "use_bias", false)?,
                    conv_bias: bool_or(c, "use_conv_bias", true)?,
                    d_has_hdim: false,
                    chunk_size: usize_or(c, "chunk_size", 256)?,
                };
                Ok(Self {
                    d_model: d,
                    n_layer,
                    vocab_size: vocab_rows,
                    layers: vec![LayerKind::Mamba2(m); n_layer],
                    d_intermediate: 0,
                    norm_eps: f64_or(c, "layer_norm_epsilon", 1e-5)?,
                    tie_embeddings: bool_or(c, "tie_word_embeddings", false)?,
                    embedding_name: "backbone.embeddings".into(),
                })
            }
            "mamba_ssm" => Self::from_mamba_ssm(c, vocab_rows),
            "nemotron_h" => Self::from_nemotron_h(c, vocab_rows),
            other => bail!("not a Mamba architecture: {other}"),
        }
    }

    fn from_mamba_ssm(c: &Value, vocab_rows: usize) -> Result<Self> {
        let d = need(c, "d_model")?;
        let n_layer = need(c, "n_layer")?;
        if !bool_or(c, "rms_norm", true)? {
            bail!("rms_norm = false (LayerNorm blocks) is not supported");
        }
        let empty = Value::Object(Default::default());
        let ssm = get(c, "ssm_cfg").unwrap_or(&empty);
        let layer = get(ssm, "layer").and_then(|v| v.as_str()).unwrap_or("Mamba1");
        let known_ssm = ["layer", "d_state", "d_conv", "expand", "dt_rank", "bias", "conv_bias", "headdim", "ngroups", "chunk_size", "rmsnorm", "norm_before_gate", "dt_limit", "D_has_hdim", "d_ssm", "dt_min", "dt_max", "dt_init_floor", "A_init_range", "dt_init", "dt_scale", "use_fast_path", "learnable_init_states", "activation", "lti"];
        if let Some(obj) = ssm.as_object() {
            if let Some(k) = obj.keys().find(|k| !known_ssm.contains(&k.as_str())) {
                bail!("unknown ssm_cfg key '{k}'");
            }
        }
        let mixer = match layer {
            "Mamba1" => {
                let mut m = MambaConfig::new(d);
                m.d_state = usize_or(ssm, "d_state", 16)?;
                m.d_conv = usize_or(ssm, "d_conv", 4)?;
                m.d_inner = usize_or(ssm, "expand", 2)? * d;
                m.dt_rank = match get(ssm, "dt_rank") {
                    None => d.div_ceil(16),
                    Some(Value::String(s)) if s == "auto" => d.div_ceil(16),
                    Some(_) => usize_or(ssm, "dt_rank", 0)?,
                };
                m.bias = bool_or(ssm, "bias", false)?;
                m.conv_bias = bool_or(ssm, "conv_bias", true)?;
                m.lti = bool_or(ssm, "lti", false)?;
                LayerKind::Mamba(m)
            }
            "Mamba2" => LayerKind::Mamba2(Mamba2Config {
                d_model: d,
                d_state: usize_or(ssm, "d_state", 128)?,
                d_conv: usize_or(ssm, "d_conv", 4)?,
                expand: usize_or(ssm, "expand", 2)?,
                d_inner: None,
                headdim: usize_or(ssm, "headdim", 64)?,
                ngroups: usize_or(ssm, "ngroups", 1)?,
                d_ssm: get(ssm, "d_ssm").and_then(|v| v.as_u64()).map(|v| v as usize),
                rmsnorm: bool_or(ssm, "rmsnorm", true)?,
                norm_before_gate: bool_or(ssm, "norm_before_gate", false)?,
                norm_eps: 1e-5,
                dt_limit: limit(get(ssm, "dt_limit"))?,
                bias: bool_or(ssm, "bias", false)?,
                conv_bias: bool_or(ssm, "conv_bias", true)?,
                d_has_hdim: bool_or(ssm, "D_has_hdim", false)?,
                chunk_size: usize_or(ssm, "chunk_size", 256)?,
            }),
            other => bail!("ssm_cfg layer '{other}' is not supported (Mamba1, Mamba2)"),
        };
        let attn_idx: Vec<usize> = match get(c, "attn_layer_idx") {
            None => vec![],
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| candle_core::Error::Msg(format!("attn_layer_idx: {e}")))?,
        };
        let attn = get(c, "attn_cfg").unwrap_or(&empty);
        let known_attn = ["num_heads", "num_heads_kv", "head_dim", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved", "qkv_proj_bias", "out_proj_bias", "causal", "softmax_scale", "d_conv", "mlp_dim"];
        if let Some(obj) = attn.as_object() {
            if let Some(k) = obj.keys().find(|k| !known_attn.contains(&k.as_str())) {
                bail!("unknown attn_cfg key '{k}'");
            }
        }
        if usize_or(attn, "d_conv", 0)? > 0 || usize_or(attn, "mlp_dim", 0)? > 0 {
            bail!("attn_cfg d_conv / mlp_dim are not supported");
        }
        if bool_or(attn, "rotary_emb_interleaved", false)? {
            bail!("attn_cfg rotary_emb_interleaved = true is not supported");
        }
        if !bool_or(attn, "causal", true)? {
            bail!("attn_cfg causal = false makes no sense in a causal LM");
        }
        if get(attn, "softmax_scale").is_some() {
            bail!("attn_cfg softmax_scale is not supported (1/sqrt(head_dim) is used)");
        }
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            if attn_idx.contains(&i) {
                let heads = need(attn, "num_heads")?;
                let head_dim = usize_or(attn, "head_dim", d / heads)?;
                layers.push(LayerKind::Attention(AttentionSpec {
                    num_heads: heads,
                    num_heads_kv: usize_or(attn, "num_heads_kv", heads)?,
                    head_dim,
                    rotary_emb_dim: usize_or(attn, "rotary_emb_dim", 0)?,
                    rotary_emb_base: f64_or(attn, "rotary_emb_base", 10000.0)?,
                    qkv_proj_bias: bool_or(attn, "qkv_proj_bias", true)?,
                    out_proj_bias: bool_or(attn, "out_proj_bias", true)?,
                    separate_qkv: false,
                }));
            } else {
                layers.push(mixer.clone());
            }
        }
        if let Some(&bad) = attn_idx.iter().find(|&&i| i >= n_layer) {
            bail!("attn_layer_idx {bad} is not a layer (n_layer = {n_layer})");
        }
        Ok(Self {
            d_model: d,
            n_layer,
            vocab_size: vocab_rows,
            layers,
            d_intermediate: usize_or(c, "d_intermediate", 0)?,
            norm_eps: f64_or(c, "norm_epsilon", 1e-5)?,
            tie_embeddings: bool_or(c, "tie_embeddings", true)?,
            embedding_name: "backbone.embedding".into(),
        })
    }
}

impl MambaLmConfig {
    /// The pattern of a Nemotron-H config: `layers_block_type` (what transformers ≥ 5 writes; it wins when
    /// both are present, as in transformers) or `hybrid_override_pattern` (the Hub's configs).
    pub fn nemotron_pattern(c: &Value) -> Result<String> {
        if let Some(list) = get(c, "layers_block_type").or_else(|| get(c, "layer_types")) {
            let arr = list.as_array().ok_or_else(|| candle_core::Error::Msg(format!("config 'layers_block_type' must be a list, got {list}")))?;
            return arr
                .iter()
                .map(|t| match t.as_str() {
                    Some("mamba" | "linear_attention") => Ok('M'),
                    Some("attention" | "full_attention") => Ok('*'),
                    Some("mlp") => Ok('-'),
                    Some("moe") => Ok('E'),
                    _ => bail!("config 'layers_block_type': unknown layer type {t} (mamba/linear_attention, attention/full_attention, mlp)"),
                })
                .collect();
        }
        match get(c, "hybrid_override_pattern") {
            Some(Value::String(p)) => Ok(p.clone()),
            Some(other) => bail!("config 'hybrid_override_pattern' must be a string, got {other}"),
            None => bail!("nemotron_h config has neither 'hybrid_override_pattern' nor 'layers_block_type'"),
        }
    }

    /// HF `NemotronHConfig` (transformers 5.x modeling_nemotron_h.py); absent keys take its defaults, and the
    /// older `mamba_*` spellings (mamba_n_groups, mamba_d_conv, ...) win over the new ones, as there.
    fn from_nemotron_h(c: &Value, vocab_rows: usize) -> Result<Self> {
        let d = need(c, "hidden_size")?;
        let pattern = Self::nemotron_pattern(c)?;
        let kinds = parse_pattern(&pattern)?;
        if let Some(n) = get(c, "num_hidden_layers") {
            if n.as_u64() != Some(kinds.len() as u64) {
                bail!("hybrid pattern \"{pattern}\" has {} layers, num_hidden_layers is {n}", kinds.len());
            }
        }
        let alias = |new: &str, old: &str| if get(c, old).is_some() { old.to_string() } else { new.to_string() };
        let eps = f64_or(c, "layer_norm_epsilon", 1e-5)?;
        if let Some(act) = get(c, "mamba_hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" && act != "swish" {
                bail!("mamba_hidden_act '{act}' is not supported (silu only)");
            }
        }
        let (heads, head_dim) = (usize_or(c, "mamba_num_heads", 128)?, usize_or(c, "mamba_head_dim", 64)?);
        let mamba = Mamba2Config {
            d_model: d,
            d_state: usize_or(c, "ssm_state_size", 128)?,
            d_conv: usize_or(c, &alias("conv_kernel", "mamba_d_conv"), 4)?,
            expand: usize_or(c, &alias("expand", "mamba_expand"), 2)?,
            d_inner: Some(heads * head_dim),
            headdim: head_dim,
            ngroups: usize_or(c, &alias("n_groups", "mamba_n_groups"), 8)?,
            d_ssm: None,
            rmsnorm: true,
            norm_before_gate: false,
            norm_eps: eps,
            // NemotronHMamba2Mixer clamps dt to (time_step_min, ∞) whatever time_step_limit says.
            dt_limit: (f64_or(c, &alias("time_step_min", "mamba_dt_min"), 1e-3)?, f64::INFINITY),
            bias: bool_or(c, "use_bias", false)?,
            conv_bias: bool_or(c, &alias("use_conv_bias", "mamba_conv_bias"), true)?,
            d_has_hdim: false,
            chunk_size: usize_or(c, &alias("chunk_size", "mamba_chunk_size"), 128)?,
        };
        let n_heads = usize_or(c, "num_attention_heads", 32)?;
        let attention = AttentionSpec {
            num_heads: n_heads,
            num_heads_kv: match get(c, "num_key_value_heads") {
                None if c.get("num_key_value_heads").is_some() => n_heads, // null: MHA, as in transformers
                _ => usize_or(c, "num_key_value_heads", 8)?,
            },
            head_dim: match c.get("head_dim") {
                Some(Value::Null) => d / n_heads.max(1),
                _ => usize_or(c, "head_dim", 128)?,
            },
            rotary_emb_dim: 0, // no positional encoding: the Mamba-2 layers carry position
            rotary_emb_base: 10000.0,
            qkv_proj_bias: false, // NemotronHAttention: bias=False whatever attention_bias says
            out_proj_bias: false,
            separate_qkv: true,
        };
        let act = get(c, "mlp_hidden_act").and_then(|a| a.as_str()).unwrap_or("relu2").to_string();
        PlainAct::parse(&act)?;
        let mlp = MlpSpec { hidden: usize_or(c, "intermediate_size", 21504)?, act, bias: bool_or(c, "mlp_bias", false)? };
        let layers = kinds
            .iter()
            .map(|k| match k {
                PatternLayer::Mamba2 => LayerKind::Mamba2(mamba.clone()),
                PatternLayer::Attention => LayerKind::Attention(attention.clone()),
                PatternLayer::Mlp => LayerKind::Mlp(mlp.clone()),
            })
            .collect::<Vec<_>>();
        if kinds.contains(&PatternLayer::Mamba2) {
            mamba.validate()?;
        }
        Ok(Self {
            d_model: d,
            n_layer: layers.len(),
            vocab_size: vocab_rows,
            layers,
            d_intermediate: 0,
            norm_eps: eps,
            tie_embeddings: bool_or(c, "tie_word_embeddings", false)?,
            embedding_name: "backbone.embeddings".into(),
        })
    }
}

enum Mixer {
    Mamba(Mamba),
    Mamba2(Mamba2),
    Attention(Attention),
    Mlp(PlainMlp),
}

struct Block {
    norm: RmsNorm,
    mixer: Mixer,
    mlp: Option<(RmsNorm, GatedMlp)>,
}

pub struct MambaLm {
    pub cfg: MambaLmConfig,
    arch: String,
    embedding: Embedding,
    blocks: Vec<Block>,
    norm_f: RmsNorm,
    lm_head: Linear,
    device: Device,
}

impl MambaLm {
    pub fn load(ck: &Checkpoint, dtype: DType, dev: &Device) -> Result<Self> {
        let arch = crate::lm::architecture_of(ck)?;
        let emb_rows = ["backbone.embeddings.weight", "backbone.embedding.weight", "model.embeddings.weight"]
            .iter()
            .find_map(|n| ck.tensor(n))
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: missing tensor 'backbone.embedding.weight' (or 'backbone.embeddings.weight', 'model.embeddings.weight')", ck.path.display())))?
            .dim(0)?;
        let mut cfg = MambaLmConfig::from_json(&ck.config, arch, emb_rows).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", ck.config_path().display())))?;
        if arch == "nemotron_h" && ck.tensor("lm_head.weight").is_some() {
            cfg.tie_embeddings = false; // transformers never ties this model's head: a stored one is used
        }
        // Both embedding spellings load, and transformers' in-memory `model.` prefix (Nemotron-H).
        let vb = ck.var_builder(dtype, dev, &[("backbone.embedding.", "backbone.embeddings."), ("backbone.embeddings.", "backbone.embedding."), ("backbone.", "model.")]);
        Self::new(cfg, arch, vb)
    }

    /// Builds the model from a config and a VarBuilder (a checkpoint, or a VarMap for training).
    pub fn new(cfg: MambaLmConfig, arch: &str, vb: VarBuilder) -> Result<Self> {
        if cfg.layers.len() != cfg.n_layer {
            bail!("config lists {} layers, n_layer is {}", cfg.layers.len(), cfg.n_layer);
        }
        let d = cfg.d_model;
        let embedding = embedding(vb.pp(&cfg.embedding_name), cfg.vocab_size, d)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for (i, kind) in cfg.layers.iter().enumerate() {
            let lvb = vb.pp(format!("backbone.layers.{i}"));
            let mixer = match kind {
                LayerKind::Mamba(m) => Mixer::Mamba(Mamba::new(m.clone(), lvb.pp("mixer"))?),
                LayerKind::Mamba2(m) => Mixer::Mamba2(Mamba2::new(m.clone(), lvb.pp("mixer"))?),
                LayerKind::Attention(a) => {
                    let acfg = AttentionConfig {
                        d_model: d,
                        n_heads: a.num_heads,
                        n_kv_heads: a.num_heads_kv,
                        head_dim: a.head_dim,
                        rotary_dim: a.rotary_emb_dim,
                        rope_theta: a.rotary_emb_base,
                        qkv_bias: a.qkv_proj_bias,
                        out_bias: a.out_proj_bias,
                        window: None, causal: true,
                    };
                    Mixer::Attention(if a.separate_qkv { Attention::new_llama(acfg, lvb.pp("mixer"))? } else { Attention::new_fused(acfg, lvb.pp("mixer"))? })
                }
                LayerKind::Mlp(m) => Mixer::Mlp(PlainMlp::new(d, m.hidden, m.bias, PlainAct::parse(&m.act)?, lvb.pp("mixer"))?),
            };
            let mlp = if cfg.d_intermediate > 0 {
                // mamba_ssm's GatedMLP rounds its width up to a multiple of 128.
                let hidden = cfg.d_intermediate.div_ceil(128) * 128;
                Some((RmsNorm::new(d, cfg.norm_eps, lvb.pp("norm2"))?, GatedMlp::new(d, hidden, false, lvb.pp("mlp"))?))
            } else {
                None
            };
            blocks.push(Block { norm: RmsNorm::new(d, cfg.norm_eps, lvb.pp("norm"))?, mixer, mlp });
        }
        let norm_f = RmsNorm::new(d, cfg.norm_eps, vb.pp("backbone.norm_f"))?;
        let lm_head = if cfg.tie_embeddings {
            Linear::new(embedding.embeddings().clone(), None)
        } else {
            linear(vb.pp("lm_head"), d, cfg.vocab_size, false)?
        };
        let device = vb.device().clone();
        Ok(Self { cfg, arch: arch.to_string(), embedding, blocks, norm_f, lm_head, device })
    }

    fn run(&self, ids: &Tensor, seq_idx: Option<&Tensor>, cache: Option<&mut Cache>) -> Result<Tensor> {
        self.lm_head.forward(&self.hidden(ids, seq_idx, cache)?.to_dtype(self.dtype())?)
    }

    /// The parameters' dtype, which the layers compute in; the residual stream h stays f32 (mamba_ssm's
    /// residual_in_fp32), each layer's input cast to it and its output back.
    fn dtype(&self) -> DType {
        self.embedding.embeddings().dtype()
    }

    /// Final normalised hidden states (b, l, d), f32.
    pub fn hidden(&self, ids: &Tensor, seq_idx: Option<&Tensor>, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let mut h = self.embedding.forward(ids)?.to_dtype(DType::F32)?;
        let dt = self.dtype();
        for (i, blk) in self.blocks.iter().enumerate() {
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let x = blk.norm.forward(&h)?.to_dtype(dt)?;
            let y = match (&blk.mixer, lc) {
                (Mixer::Mamba(m), Some(LayerCache::Mamba(s))) => m.forward(&x, seq_idx, Some(s))?,
                (Mixer::Mamba(m), None) => m.forward(&x, seq_idx, None)?,
                (Mixer::Mamba2(m), Some(LayerCache::Mamba2(s))) => m.forward(&x, seq_idx, Some(s))?,
                (Mixer::Mamba2(m), None) => m.forward(&x, seq_idx, None)?,
                (Mixer::Attention(a), Some(LayerCache::Attention(c))) => a.forward(&x, seq_idx, Some(c))?,
                (Mixer::Attention(a), None) => a.forward(&x, seq_idx, None)?,
                (Mixer::Mlp(m), None | Some(LayerCache::None)) => m.forward(&x)?,
                _ => bail!("cache layer {i} does not match the model"),
            };
            h = (h + y.to_dtype(DType::F32)?)?;
            if let Some((n2, mlp)) = &blk.mlp {
                h = (&h + mlp.forward(&n2.forward(&h)?.to_dtype(dt)?)?.to_dtype(DType::F32)?)?;
            }
        }
        self.norm_f.forward(&h)
    }
}

impl LanguageModel for MambaLm {
    fn features(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden(ids, None, None)?.unsqueeze(3)
    }

    fn info(&self) -> ModelInfo {
        let mut state = 0;
        let mut kv = 0;
        let mut kinds = Vec::new();
        for b in &self.blocks {
            match &b.mixer {
                Mixer::Mamba(m) => {
                    state += m.state_size();
                    kinds.push("mamba".to_string());
                }
                Mixer::Mamba2(m) => {
                    state += m.state_size();
                    kinds.push("mamba2".to_string());
                }
                Mixer::Attention(a) => {
                    kv += 2 * a.cfg.n_kv_heads * a.cfg.head_dim;
                    kinds.push("attention".to_string());
                }
                Mixer::Mlp(_) => kinds.push("mlp".to_string()),
            }
        }
        ModelInfo {
            architecture: self.arch.clone(),
            vocab_size: self.cfg.vocab_size,
            d_model: self.cfg.d_model,
            n_layers: self.cfg.n_layer,
            state_floats_per_seq: state,
            kv_floats_per_token: kv,
            layer_kinds: kinds,
        }
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn new_cache(&self, batch: usize) -> Result<Cache> {
        let layers = self
            .blocks
            .iter()
            .map(|b| {
                Ok(match &b.mixer {
                    Mixer::Mamba(m) => LayerCache::Mamba(m.zero_state(batch)?),
                    Mixer::Mamba2(m) => LayerCache::Mamba2(m.zero_state(batch)?),
                    Mixer::Attention(_) => LayerCache::Attention(KvCache::default()),
                    Mixer::Mlp(_) => LayerCache::None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Cache::new(layers))
    }

    fn forward(&self, ids: &Tensor, seq_idx: Option<&Tensor>, cache: Option<&mut Cache>) -> Result<Tensor> {
        let l = ids.dim(1)?;
        match cache {
            Some(c) => {
                let out = self.run(ids, seq_idx, Some(c))?;
                c.seqlen += l;
                Ok(out)
            }
            None => self.run(ids, seq_idx, None),
        }
    }

    fn step(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut h = self.embedding.forward(ids)?.to_dtype(DType::F32)?; // (b, d)
        let dt = self.dtype();
        for (i, blk) in self.blocks.iter().enumerate() {
            let x = blk.norm.forward(&h)?.to_dtype(dt)?;
            let y = match (&blk.mixer, &mut cache.layers[i]) {
                (Mixer::Mamba(m), LayerCache::Mamba(s)) => m.step(&x, s)?,
                (Mixer::Mamba2(m), LayerCache::Mamba2(s)) => m.step(&x, s)?,
                (Mixer::Attention(a), LayerCache::Attention(c)) => a.forward(&x.unsqueeze(1)?, None, Some(c))?.squeeze(1)?,
                (Mixer::Mlp(m), LayerCache::None) => m.forward(&x)?,
                _ => bail!("cache layer {i} does not match the model"),
            };
            h = (h + y.to_dtype(DType::F32)?)?;
            if let Some((n2, mlp)) = &blk.mlp {
                h = (&h + mlp.forward(&n2.forward(&h)?.to_dtype(dt)?)?.to_dtype(DType::F32)?)?;
            }
        }
        cache.seqlen += 1;
        self.lm_head.forward(&self.norm_f.forward(&h)?.to_dtype(dt)?)
    }
}
