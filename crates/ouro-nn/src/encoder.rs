//! A bidirectional encoder (masked LM) over any matrix mixer: Hydra (goombalab/hydra's quasiseparable mixer)
//! or one of the Hydra paper's matrix-mixer classes ([`crate::matrix_mixer`]: dense, Toeplitz, Vandermonde,
//! Cauchy, low-rank, softmax attention, semiseparable, quasiseparable; data-independent or sequence-aligned).
//!
//! ```text
//! h = embedding(ids)                                             (b, L, d)
//! for each layer:  h = h + mixer(RMSNorm(h));  [h = h + GatedMLP(RMSNorm(h))]   pre-norm residual blocks
//! logits = RMSNorm_f(h) · embeddingᵀ                                 tied head
//! ```
//! Config (`config.json`, `"model_type": "mixer_encoder"`): d_model, n_layer, vocab_size, mixer ("hydra" or a
//! matrix-mixer kind), data_dependent, d_state (Hydra's state / the q-k width of the other mixers), headdim,
//! expand, d_conv, ngroups (Hydra), max_seq_len (data-independent mixers), d_intermediate (0: no MLP).
//! Names: `embedding.weight`, `layers.{i}.norm.weight`, `layers.{i}.mixer.*`, `layers.{i}.norm2.weight`,
//! `layers.{i}.mlp.fc{1,2}.weight`, `norm_f.weight`.

use crate::hydra::{Hydra, HydraConfig};
use crate::layers::{GatedMlp, RmsNorm};
use crate::lm::{Cache, LanguageModel, ModelInfo};
use crate::matrix_mixer::{MatrixMixer, MatrixMixerConfig, MixerKind};
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    pub model_type: String,
    pub d_model: usize,
    pub n_layer: usize,
    pub vocab_size: usize,
    /// "hydra" or a matrix-mixer kind (dense, toeplitz, vandermonde, cauchy, low_rank, attention,
    /// semiseparable, quasiseparable).
    pub mixer: String,
    #[serde(default = "yes")]
    pub data_dependent: bool,
    pub d_state: usize,
    pub headdim: usize,
    #[serde(default = "two")]
    pub expand: usize,
    #[serde(default = "seven")]
    pub d_conv: usize,
    #[serde(default = "one")]
    pub ngroups: usize,
    #[serde(default)]
    pub max_seq_len: usize,
    #[serde(default)]
    pub d_intermediate: usize,
    #[serde(default = "eight")]
    pub pad_vocab_size_multiple: usize,
    /// The tokenizer the model was trained with ("bytes", "dna"), for the CLI.
    #[serde(default)]
    pub tokenizer: Option<String>,
}

fn yes() -> bool {
    true
}
fn two() -> usize {
    2
}
fn seven() -> usize {
    7
}
fn one() -> usize {
    1
}
fn eight() -> usize {
    8
}

impl EncoderConfig {
    pub fn padded_vocab(&self) -> usize {
        let m = self.pad_vocab_size_multiple.max(1);
        self.vocab_size.div_ceil(m) * m
    }
}

#[derive(Clone, Debug)]
enum Mixer {
    Hydra(Hydra),
    Matrix(MatrixMixer),
}

impl Mixer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mixer::Hydra(h) => h.forward(x),
            Mixer::Matrix(m) => m.forward(x),
        }
    }
}

struct Block {
    norm: RmsNorm,
    mixer: Mixer,
    mlp: Option<(RmsNorm, GatedMlp)>,
}

pub struct Encoder {
    pub cfg: EncoderConfig,
    embedding: Embedding,
    blocks: Vec<Block>,
    norm_f: RmsNorm,
    device: Device,
}

impl Encoder {
    pub fn load(ck: &crate::checkpoint::Checkpoint, dtype: DType, dev: &Device) -> Result<Self> {
        let cfg: EncoderConfig = serde_json::from_value(ck.config.clone()).map_err(|e| candle_core::Error::Msg(format!("{}: not a mixer_encoder config: {e}", ck.config_path().display())))?;
        Self::new(cfg, ck.var_builder(dtype, dev, &[]))
    }

    pub fn new(cfg: EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        if cfg.mixer != "hydra" {
            let kind = MixerKind::parse(&cfg.mixer)?;
            if !cfg.data_dependent && cfg.max_seq_len == 0 && kind != MixerKind::Vandermonde {
                bail!("mixer_encoder: a data-independent {} mixer needs max_seq_len", cfg.mixer);
            }
        }
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                let mixer = if cfg.mixer == "hydra" {
                    if !cfg.data_dependent {
                        bail!("mixer_encoder: hydra is data-dependent; use mixer = \"quasiseparable\" with data_dependent = false for its data-independent form");
                    }
                    Mixer::Hydra(Hydra::new(HydraConfig { d_model: d, d_state: cfg.d_state, d_conv: cfg.d_conv, expand: cfg.expand, headdim: cfg.headdim, ngroups: cfg.ngroups }, l.pp("mixer"))?)
                } else {
                    Mixer::Matrix(MatrixMixer::new(
                        MatrixMixerConfig {
                            kind: MixerKind::parse(&cfg.mixer)?,
                            data_dependent: cfg.data_dependent,
                            d_model: d,
                            qk_dim: cfg.d_state,
                            max_seq_len: cfg.max_seq_len,
                            d_conv: cfg.d_conv,
                            expand: cfg.expand,
                            headdim: cfg.headdim,
                        },
                        l.pp("mixer"),
                    )?)
                };
                let mlp = if cfg.d_intermediate > 0 { Some((RmsNorm::new(d, 1e-5, l.pp("norm2"))?, GatedMlp::new(d, cfg.d_intermediate, false, l.pp("mlp"))?)) } else { None };
                Ok(Block { norm: RmsNorm::new(d, 1e-5, l.pp("norm"))?, mixer, mlp })
            })
            .collect::<Result<Vec<_>>>()?;
        let embedding = Embedding::new(vb.get((cfg.padded_vocab(), d), "embedding.weight")?, d);
        let norm_f = RmsNorm::new(d, 1e-5, vb.pp("norm_f"))?;
        Ok(Self { cfg, embedding, blocks, norm_f, device: vb.device().clone() })
    }

    /// Final normalised hidden states (b, L, d).
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let mut h = self.embedding.forward(ids)?.to_dtype(DType::F32)?;
        for b in &self.blocks {
            h = (&h + b.mixer.forward(&b.norm.forward(&h)?)?)?;
            if let Some((n2, mlp)) = &b.mlp {
                h = (&h + mlp.forward(&n2.forward(&h)?)?)?;
            }
        }
        self.norm_f.forward(&h)
    }
}

impl LanguageModel for Encoder {
    fn info(&self) -> ModelInfo {
        let kind = if self.cfg.mixer == "hydra" { "hydra".to_string() } else { format!("{}-{}", self.cfg.mixer, if self.cfg.data_dependent { "dd" } else { "di" }) };
        ModelInfo {
            architecture: format!("mixer_encoder ({kind})"),
            vocab_size: self.cfg.padded_vocab(),
            d_model: self.cfg.d_model,
            n_layers: self.cfg.n_layer,
            state_floats_per_seq: 0,
            kv_floats_per_token: 0,
            layer_kinds: vec![kind; self.cfg.n_layer],
        }
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn new_cache(&self, _batch: usize) -> Result<Cache> {
        bail!("a bidirectional encoder has no recurrent decoding state")
    }
    /// Logits (b, L, V). Each row is one sequence: `seq_idx` is not used (a bidirectional mixer sees the row).
    fn forward(&self, ids: &Tensor, _seq_idx: Option<&Tensor>, cache: Option<&mut Cache>) -> Result<Tensor> {
        if cache.is_some() {
            bail!("a bidirectional encoder has no recurrent decoding state");
        }
        self.hidden(ids)?.broadcast_matmul(&self.embedding.embeddings().t()?)
    }
    fn step(&self, _ids: &Tensor, _cache: &mut Cache) -> Result<Tensor> {
        bail!("a bidirectional encoder cannot decode token by token")
    }
    fn features(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden(ids)?.unsqueeze(3)
    }
    fn is_bidirectional(&self) -> bool {
        true
    }
}
