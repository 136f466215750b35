//! `ouro train` configuration (TOML; unknown keys are errors) and the model it describes, written as a
//! checkpoint `config.json` in a format the loaders read (mamba_ssm's for Mamba/Mamba-2, HF's for Llama).

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSpec,
    pub data: DataSpec,
    pub train: TrainSpec,
}

/// The model to train. `arch`: causal "mamba2", "mamba", "llama", "hawk", "griffin", "hybrid" (a layer
/// pattern, see `pattern`); bidirectional (masked objective) "caduceus" (BiMamba, or RCPS with `rcps = true`), "hydra", "mixer" (a matrix-mixer encoder),
/// "bert" (the Llama Transformer with bidirectional attention).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: String,
    pub d_model: usize,
    pub n_layer: usize,
    /// SSM state size (Mamba: 16, Mamba-2: 64 by default).
    #[serde(default)]
    pub d_state: Option<usize>,
    #[serde(default = "two")]
    pub expand: usize,
    /// Mamba-2 head dim.
    #[serde(default = "default_headdim")]
    pub headdim: usize,
    #[serde(default = "one")]
    pub ngroups: usize,
    #[serde(default = "four")]
    pub d_conv: usize,
    /// Gated MLP width after each mixer (Mamba/Mamba-2; 0 = none).
    #[serde(default)]
    pub d_intermediate: usize,
    /// Llama: attention heads (head dim = d_model / n_heads).
    #[serde(default)]
    pub n_heads: Option<usize>,
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// Llama MLP width; default: chosen so the model has as many parameters as the Mamba-2 of the same
    /// d_model and n_layer.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Mamba (S6) mixer: data-independent Δ, B, C (an LTI SSM baseline).
    #[serde(default)]
    pub lti: bool,
    /// Hawk/Griffin: RG-LRU width (default d_model).
    #[serde(default)]
    pub lru_width: Option<usize>,
    /// Griffin: local attention window.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Caduceus: reverse-complement parameter sharing (Caduceus-PS); needs the DNA tokenizer.
    #[serde(default)]
    pub rcps: bool,
    /// Caduceus: how the two directions combine ("add" or "ew_multiply").
    #[serde(default = "add")]
    pub bidirectional_strategy: String,
    /// arch = "mixer": the matrix-mixer class (dense, toeplitz, vandermonde, cauchy, low_rank, attention,
    /// semiseparable, quasiseparable).
    #[serde(default)]
    pub mixer: Option<String>,
    /// arch = "mixer": sequence-aligned (input-dependent) matrices, or learned data-independent ones.
    #[serde(default = "yes")]
    pub data_dependent: bool,
    /// arch = "hybrid": one character per layer (NVIDIA's Mamba-2-Hybrid / Nemotron-H), `M` Mamba-2 (d_state,
    /// headdim, expand, ngroups, d_conv), `*` attention (n_heads, n_kv_heads; no positional encoding), `-` an
    /// MLP down(relu²(up(x))) of width intermediate_size (default 4·d_model); e.g. "M-M*-M-". Its length is
    /// n_layer. The checkpoint is an HF `NemotronHForCausalLM` config.
    #[serde(default)]
    pub pattern: Option<String>,
}

fn add() -> String {
    "add".into()
}
fn yes() -> bool {
    true
}

/// Architectures that see the whole sequence (trained with the masked objective).
pub const BIDIRECTIONAL: [&str; 4] = ["caduceus", "hydra", "mixer", "bert"];

fn default_window() -> usize {
    128
}

fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn default_headdim() -> usize {
    32
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// A corpus name (`ouro data fetch NAME`: shakespeare, kjv, austen, celegans-chrx, ecoli), "arithmetic"
    /// (worked multi-step arithmetic, generated on first use; `ouro data arithmetic`), a text file, a folder of
    /// .txt files, several of those joined by '+' ("austen+kjv+shakespeare"), or a synthetic task
    /// (selective-copying, induction-heads).
    pub corpus: String,
    /// "bytes", "dna" (Caduceus' DNA characters, with a complement map) or a path to a tokenizer.json.
    #[serde(default = "bytes")]
    pub tokenizer: String,
    pub seq_len: usize,
    /// Fraction of documents held out for validation (document-level split, e.g. whole plays).
    #[serde(default = "valid_fraction")]
    pub valid_fraction: f64,
    /// Where fetched corpora live.
    #[serde(default = "data_dir")]
    pub data_dir: PathBuf,
    /// Synthetic tasks: context lengths at which accuracy is reported (default: seq_len).
    #[serde(default)]
    pub eval_lengths: Vec<usize>,
}

fn bytes() -> String {
    "bytes".into()
}
fn valid_fraction() -> f64 {
    0.1
}
fn data_dir() -> PathBuf {
    PathBuf::from("data")
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// "causal" or "masked".
    #[serde(default = "causal")]
    pub objective: String,
    /// Fraction of tokens masked (masked objective).
    #[serde(default = "mask_prob")]
    pub mask_prob: f64,
    /// Reverse-complement data augmentation (DNA tokenizer): each training window is replaced by its
    /// reverse complement with probability ½ (Caduceus-Ph pretraining).
    #[serde(default)]
    pub rc_augment: bool,
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub steps: usize,
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup: usize,
    #[serde(default = "wd")]
    pub weight_decay: f64,
    #[serde(default = "beta1")]
    pub beta1: f64,
    #[serde(default = "beta2")]
    pub beta2: f64,
    #[serde(default = "clip")]
    pub grad_clip: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "eval_every")]
    pub eval_every: usize,
    /// Tokens scored per validation.
    #[serde(default = "eval_tokens")]
    pub eval_tokens: usize,
    #[serde(default = "save_every")]
    pub save_every: usize,
    /// Stop (and save) after this many minutes of wall time, whatever `steps` says (0: no limit).
    #[serde(default)]
    pub time_limit_minutes: f64,
    /// Run directory: checkpoints, metrics.jsonl, plots.
    pub out: PathBuf,
    /// Samples printed at the end (text corpora).
    #[serde(default = "samples")]
    pub samples: usize,
    #[serde(default = "sample_tokens")]
    pub sample_tokens: usize,
    /// Device: cpu, cuda, cuda:N.
    #[serde(default = "cpu")]
    pub device: String,
    /// Mixed precision: each step computes in bf16 on a bf16 copy of the f32 parameters (the casts are in the
    /// graph, so the gradients reach the f32 parameters, which the optimizer and the checkpoints keep); the loss in
    /// f32. For CUDA, where the bf16 kernels run (on the CPU bf16 is slower than f32 unless it has AVX-512 BF16).
    #[serde(default)]
    pub bf16: bool,
}

fn causal() -> String {
    "causal".into()
}
fn mask_prob() -> f64 {
    0.15
}
fn wd() -> f64 {
    0.1
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.95
}
fn clip() -> f64 {
    1.0
}
fn eval_every() -> usize {
    200
}
fn eval_tokens() -> usize {
    65536
}
fn save_every() -> usize {
    500
}
fn samples() -> usize {
    2
}
fn sample_tokens() -> usize {
    300
}
fn cpu() -> String {
    "cpu".into()
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        cfg.validate().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let (m, d, t) = (&self.model, &self.data, &self.train);
        if m.lti && m.arch != "mamba" {
            bail!("model.lti applies to arch = \"mamba\" (an S6 mixer with data-independent Δ, B, C)");
        }
        if !["mamba", "mamba2", "llama", "hawk", "griffin", "hybrid", "caduceus", "hydra", "mixer", "bert"].contains(&m.arch.as_str()) {
            bail!("model.arch '{}' is not one of mamba, mamba2, llama, hawk, griffin, hybrid, caduceus, hydra, mixer, bert", m.arch);
        }
        match (&m.pattern, m.arch == "hybrid") {
            (None, true) => bail!("model.arch = \"hybrid\" needs model.pattern (one character per layer: M Mamba-2, * attention, - MLP; e.g. \"M-M*-M-\")"),
            (Some(_), false) => bail!("model.pattern goes with arch = \"hybrid\" and only with it"),
            (Some(p), true) => {
                ouro_nn::mamba_lm::parse_pattern(p).map_err(|e| candle_core::Error::Msg(format!("model.pattern: {e}")))?;
                if p.chars().count() != m.n_layer {
                    bail!("model.pattern \"{p}\" has {} layers, model.n_layer is {}", p.chars().count(), m.n_layer);
                }
            }
            (None, false) => {}
        }
        let bidirectional = BIDIRECTIONAL.contains(&m.arch.as_str());
        if t.bf16 && bidirectional {
            bail!("train.bf16 runs the causal language models (mamba, mamba2, llama, hawk, griffin, hybrid); model.arch = \"{}\" trains in f32", m.arch);
        }
        if bidirectional && t.objective != "masked" {
            bail!("model.arch = \"{}\" is bidirectional: set train.objective = \"masked\"", m.arch);
        }
        if m.rcps && (m.arch != "caduceus" || d.tokenizer != "dna") {
            bail!("model.rcps needs arch = \"caduceus\" and data.tokenizer = \"dna\" (the complement map)");
        }
        if t.rc_augment && d.tokenizer != "dna" {
            bail!("train.rc_augment needs data.tokenizer = \"dna\"");
        }
        if (m.arch == "mixer") != m.mixer.is_some() {
            bail!("model.mixer (the matrix-mixer class) goes with arch = \"mixer\" and only with it");
        }
        if !["add", "ew_multiply"].contains(&m.bidirectional_strategy.as_str()) {
            bail!("model.bidirectional_strategy '{}' is not add or ew_multiply", m.bidirectional_strategy);
        }
        if m.d_model == 0 || m.n_layer == 0 {
            bail!("model.d_model and model.n_layer must be positive");
        }
        if d.seq_len < 2 {
            bail!("data.seq_len must be at least 2");
        }
        if !(0.0..1.0).contains(&d.valid_fraction) {
            bail!("data.valid_fraction must be in [0, 1)");
        }
        if !["causal", "masked"].contains(&t.objective.as_str()) {
            bail!("train.objective '{}' is not causal or masked", t.objective);
        }
        if t.batch_size == 0 || t.grad_accum == 0 || t.steps == 0 {
            bail!("train.batch_size, train.grad_accum and train.steps must be positive");
        }
        if !(t.lr > 0.0) || t.min_lr < 0.0 || t.min_lr > t.lr {
            bail!("train.lr must be positive and train.min_lr in [0, lr]");
        }
        Ok(())
    }
}

impl ModelSpec {
    pub fn d_state(&self) -> usize {
        self.d_state.unwrap_or(if self.arch == "mamba" { 16 } else { 64 })
    }

    /// The checkpoint config.json for this model with `vocab` tokens and windows of `seq_len`.
    pub fn checkpoint_config(&self, vocab: usize, tokenizer: &str, seq_len: usize) -> Result<serde_json::Value> {
        let tok = if tokenizer == "bytes" || tokenizer == "dna" { json!(tokenizer) } else { json!(null) };
        Ok(match self.arch.as_str() {
            "caduceus" => json!({
                "model_type": "caduceus", "d_model": self.d_model, "n_layer": self.n_layer, "vocab_size": vocab,
                "ssm_cfg": {"d_state": self.d_state(), "d_conv": self.d_conv, "expand": self.expand},
                "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true, "norm_epsilon": 1e-5,
                "bidirectional": true, "bidirectional_strategy": self.bidirectional_strategy, "bidirectional_weight_tie": true,
                "rcps": self.rcps, "pad_vocab_size_multiple": 8, "tokenizer": tok,
            }),
            "hydra" | "mixer" => {
                if (self.expand * self.d_model) % self.headdim != 0 {
                    bail!("model: expand·d_model = {} is not a multiple of headdim {}", self.expand * self.d_model, self.headdim);
                }
                json!({
                    "model_type": "mixer_encoder", "d_model": self.d_model, "n_layer": self.n_layer, "vocab_size": vocab,
                    "mixer": self.mixer.clone().unwrap_or_else(|| "hydra".into()), "data_dependent": self.data_dependent,
                    "d_state": self.d_state(), "headdim": self.headdim, "expand": self.expand, "d_conv": 7,
                    "ngroups": self.ngroups, "max_seq_len": seq_len, "d_intermediate": self.d_intermediate,
                    "pad_vocab_size_multiple": 8, "tokenizer": tok,
                })
            }
            "mamba" | "mamba2" => {
                let ssm = if self.arch == "mamba2" {
                    if (self.expand * self.d_model) % self.headdim != 0 {
                        bail!("model: expand·d_model = {} is not a multiple of headdim {}", self.expand * self.d_model, self.headdim);
                    }
                    json!({"layer": "Mamba2", "d_state": self.d_state(), "d_conv": self.d_conv, "expand": self.expand,
                           "headdim": self.headdim, "ngroups": self.ngroups, "chunk_size": 64})
                } else {
                    let mut c = json!({"layer": "Mamba1", "d_state": self.d_state(), "d_conv": self.d_conv, "expand": self.expand});
                    if self.lti {
                        c["lti"] = json!(true);
                    }
                    c
                };
                json!({
                    "d_model": self.d_model, "n_layer": self.n_layer, "vocab_size": vocab, "d_intermediate": self.d_intermediate,
                    "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": true, "residual_in_fp32": true,
                    "fused_add_norm": true, "pad_vocab_size_multiple": 8, "tie_embeddings": true, "tokenizer": tok,
                })
            }
            "hybrid" => {
                let pattern = self.pattern.clone().unwrap_or_default();
                let heads = self.n_heads.unwrap_or((self.d_model / 64).max(1));
                let kv = self.n_kv_heads.unwrap_or(heads);
                if self.d_model % heads != 0 || heads % kv != 0 {
                    bail!("model: d_model {} must be divisible by n_heads {heads}, and n_heads by n_kv_heads {kv}", self.d_model);
                }
                let inner = self.expand * self.d_model;
                if inner % self.headdim != 0 || (inner / self.headdim) % self.ngroups != 0 {
                    bail!("model: expand·d_model = {inner} must split into heads of headdim {} divisible into ngroups {}", self.headdim, self.ngroups);
                }
                // HF NemotronHForCausalLM's config (Hub form: the pattern string). No tied embeddings: transformers
                // never ties this model's LM head.
                json!({
                    "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": vocab,
                    "hidden_size": self.d_model, "hybrid_override_pattern": pattern, "num_hidden_layers": self.n_layer,
                    "mamba_num_heads": inner / self.headdim, "mamba_head_dim": self.headdim, "ssm_state_size": self.d_state(),
                    "n_groups": self.ngroups, "conv_kernel": self.d_conv, "expand": self.expand, "chunk_size": 64,
                    "use_bias": false, "use_conv_bias": true, "mamba_hidden_act": "silu", "time_step_min": 0.001,
                    "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": self.d_model / heads,
                    "attention_bias": false, "intermediate_size": self.intermediate_size.unwrap_or(4 * self.d_model),
                    "mlp_hidden_act": "relu2", "mlp_bias": false, "layer_norm_epsilon": 1e-5,
                    "tie_word_embeddings": false, "tokenizer": tok,
                })
            }
            "llama" | "bert" => {
                let heads = self.n_heads.unwrap_or((self.d_model / 64).max(1));
                if self.d_model % heads != 0 {
                    bail!("model: d_model {} is not divisible by n_heads {heads}", self.d_model);
                }
                json!({
                    "is_causal": self.arch == "llama",
                    "model_type": "llama", "vocab_size": vocab, "hidden_size": self.d_model,
                    "intermediate_size": self.intermediate_size.unwrap_or_else(|| self.matched_intermediate(vocab)),
                    "num_hidden_layers": self.n_layer, "num_attention_heads": heads,
                    "num_key_value_heads": self.n_kv_heads.unwrap_or(heads), "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "tie_word_embeddings": true, "hidden_act": "silu", "tokenizer": tok,
                })
            }
            "hawk" | "griffin" => {
                let heads = self.n_heads.unwrap_or((self.d_model / 64).max(1));
                let width = self.lru_width.unwrap_or(self.d_model);
                if self.d_model % heads != 0 || width % heads != 0 {
                    bail!("model: d_model {} and lru_width {width} must be divisible by n_heads {heads}", self.d_model);
                }
                let blocks = if self.arch == "hawk" { json!(["recurrent"]) } else { json!(["recurrent", "recurrent", "attention"]) };
                json!({
                    "model_type": "recurrent_gemma", "vocab_size": vocab, "hidden_size": self.d_model,
                    "intermediate_size": self.intermediate_size.unwrap_or_else(|| 2 * self.matched_griffin_mlp()),
                    "num_hidden_layers": self.n_layer, "num_attention_heads": heads, "num_key_value_heads": 1,
                    "lru_width": width, "attention_window_size": self.window, "conv1d_width": self.d_conv,
                    "logits_soft_cap": 0.0, "rms_norm_eps": 1e-6, "block_types": blocks,
                    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5},
                    "attention_bias": false, "tie_word_embeddings": true, "hidden_activation": "gelu_pytorch_tanh",
                    "tokenizer": tok,
                })
            }
            other => bail!("unknown arch {other}"),
        })
    }

    /// Griffin/Hawk MLP half-width giving a recurrent layer as many parameters as the Mamba-2 layer.
    pub fn matched_griffin_mlp(&self) -> usize {
        let d = self.d_model;
        let w = self.lru_width.unwrap_or(d);
        let heads = self.n_heads.unwrap_or((d / 64).max(1));
        let recurrent = 3 * d * w + 2 * w + d + 2 * w * (w / heads) + 2 * w + w * (self.d_conv + 1) + w + 2 * d;
        (self.mamba2_layer_params().saturating_sub(recurrent) / (3 * d)).max(8)
    }

    /// Parameters of the Mamba-2 of this width and depth (per layer; embeddings excluded).
    fn mamba2_layer_params(&self) -> usize {
        let (d, e, n, g) = (self.d_model, self.expand * self.d_model, self.d_state(), self.ngroups);
        let h = e / self.headdim.max(1);
        let conv_dim = e + 2 * g * n;
        d * (2 * e + 2 * g * n + h) + conv_dim * (self.d_conv + 1) + 3 * h + e + e * d + d
    }

    /// Llama MLP width giving a Llama with as many parameters per layer as the Mamba-2.
    pub fn matched_intermediate(&self, _vocab: usize) -> usize {
        let d = self.d_model;
        let heads = self.n_heads.unwrap_or((d / 64).max(1));
        let kv = self.n_kv_heads.unwrap_or(heads);
        let attn = d * d * 2 + 2 * d * (kv * d / heads) + 2 * d; // q, o, k, v, two norms
        let target = self.mamba2_layer_params();
        (target.saturating_sub(attn) / (3 * d)).max(8)
    }
}
