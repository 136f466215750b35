//! Building a trainable model from a checkpoint config, and its initialisation (the reference
//! implementations' `_init_weights`: mamba_ssm for Mamba/Mamba-2, HF for Llama).

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ouro_nn::lm::LanguageModel;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A model whose parameters live in `varmap` (names as in the checkpoint files).
pub struct Trainable {
    pub model: Box<dyn LanguageModel>,
    pub varmap: VarMap,
    pub config: serde_json::Value,
}

impl Trainable {
    /// Builds the model a checkpoint config describes, with fresh parameters.
    pub fn new(config: serde_json::Value, dev: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let model = build(&config, vb)?;
        Ok(Self { model, varmap, config })
    }

    /// Named parameters, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        ouro_nn::checkpoint::named_vars(&self.varmap)
    }

    /// The model a step computes with in `dtype`: None for f32 (the parameters themselves), else the same
    /// architecture on the parameters cast to `dtype` (mixed precision: the casts are in the graph, so the
    /// gradients reach the f32 parameters).
    pub fn cast(&self, dtype: DType) -> Result<Option<Box<dyn LanguageModel>>> {
        if dtype == DType::F32 {
            return Ok(None);
        }
        let map = ouro_nn::checkpoint::cast_vars(&self.varmap, dtype)?;
        build(&self.config, VarBuilder::from_tensors(map, dtype, self.model.device())).map(Some)
    }

    pub fn parameter_count(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Loads a checkpoint's parameters into the VarMap (e.g. to fine-tune it).
    pub fn load_weights(&self, ck: &ouro_nn::checkpoint::Checkpoint) -> Result<()> {
        for (name, var) in self.named_vars() {
            let alt = name.replace("backbone.embedding.", "backbone.embeddings.");
            let t = ck.tensor(&name).or_else(|| ck.tensor(&alt)).ok_or_else(|| candle_core::Error::Msg(format!("{}: missing tensor {name}", ck.path.display())))?;
            if t.dims() != var.dims() {
                bail!("{}: tensor {name} has shape {:?}, the model expects {:?}", ck.path.display(), t.dims(), var.dims());
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Initialises every parameter (deterministic in `seed`).
    pub fn init(&self, seed: u64) -> Result<()> {
        let arch = ouro_nn_arch(&self.config);
        let n_layer = self.config.get("n_layer").or_else(|| self.config.get("num_hidden_layers")).and_then(|v| v.as_u64()).unwrap_or(1) as f64;
        let mut rng = StdRng::seed_from_u64(seed);
        let vars = self.named_vars();
        let shape_of = |n: &str| {
            let alt = n.replace(".bias", ".weight");
            vars.iter().find(|(k, _)| *k == alt).map(|(_, v)| v.dims().to_vec())
        };
        for (name, var) in vars.iter().cloned() {
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let uniform = |rng: &mut StdRng, b: f64| -> Vec<f32> { (0..n).map(|_| rng.random_range(-b..b) as f32).collect() };
            let normal = |rng: &mut StdRng, std: f64| -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
                        (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                    })
                    .collect()
            };
            // Xavier (Glorot) std for torch's fan conventions: fan_in = dims[1]·receptive, fan_out = dims[0]·receptive.
            let xavier = || {
                let rf: usize = dims.iter().skip(2).product();
                let (fi, fo) = (dims.get(1).copied().unwrap_or(1) * rf, dims[0] * rf);
                (2.0 / (fi + fo) as f64).sqrt()
            };
            let values: Vec<f32> = if name.contains("matrix_mixer.") && ["M", "q_matrix", "k_matrix", "BC"].iter().any(|p| name.ends_with(&format!(".{p}"))) {
                normal(&mut rng, xavier()) // goombalab/hydra matrix_mixers: xavier_normal_
            } else if name.ends_with("matrix_mixer.conv_params") {
                uniform(&mut rng, xavier() * 3f64.sqrt()) // xavier_uniform_
            } else if name.ends_with("matrix_mixer.bias") {
                vec![0.5; n] // Cauchy's scalar shift
            } else if name.ends_with("A_log") && arch == "mixer_encoder" {
                vec![0.0; n] // Hydra: A = −1 for every head
            } else if name.ends_with("A_log") {
                if dims.len() == 2 {
                    // Mamba: A = −(1..N) per channel (S4D-real).
                    (0..n).map(|i| ((i % dims[1]) as f32 + 1.0).ln()).collect()
                } else {
                    // Mamba-2: A ~ U(1, 16).
                    (0..n).map(|_| rng.random_range(1.0f64..16.0).ln() as f32).collect()
                }
            } else if name.ends_with("dt_bias") || name.ends_with("dt_proj.bias") {
                // dt = exp(U(ln 1e-3, ln 1e-1)) ≥ 1e-4; bias = softplus⁻¹(dt).
                (0..n)
                    .map(|_| {
                        let dt = rng.random_range(1e-3f64.ln()..1e-1f64.ln()).exp().max(1e-4);
                        (dt + (-(-dt).exp_m1()).ln()) as f32
                    })
                    .collect()
            } else if name.ends_with("recurrent_param") {
                // RG-LRU: a = σ-free decay with a^c ∈ [0.9, 0.999] at gate 1 (DeepMind's rnn_param_init):
                // softplus(Λ) = −½·log U(0.9², 0.999²).
                (0..n)
                    .map(|_| {
                        let u: f64 = rng.random_range(0.81..0.998);
                        let c = -0.5 * u.ln();
                        (c.exp_m1()).ln() as f32
                    })
                    .collect()
            } else if name.contains("gate_weight") {
                normal(&mut rng, 1.0 / (dims[2] as f64).sqrt())
            } else if arch == "recurrent_gemma" && name.contains("norm") {
                vec![0.0; n] // RMSNorm scales by (1 + w)
            } else if arch == "recurrent_gemma" && name.contains("embed") {
                normal(&mut rng, 1.0 / (dims[1] as f64).sqrt())
            } else if name.ends_with("B_lti") || name.ends_with("C_lti") {
                normal(&mut rng, 1.0 / (dims[1] as f64).sqrt())
            } else if name.ends_with(".D") || name.contains("norm") {
                vec![1.0; n]
            } else if name.ends_with(".bias") || name.ends_with("z_bias") || name.ends_with("gate_bias") {
                if name.contains("conv1d") || name.contains("conv_1d") {
                    // PyTorch Conv1d: U(±1/√fan_in), fan_in = kernel width for a depthwise conv.
                    let k = shape_of(&name).and_then(|d| d.last().copied()).unwrap_or(4);
                    uniform(&mut rng, 1.0 / (k as f64).sqrt())
                } else {
                    vec![0.0; n]
                }
            } else if name.contains("embed") {
                normal(&mut rng, 0.02)
            } else if name.contains("conv1d.weight") || name.contains("conv_1d.weight") {
                uniform(&mut rng, 1.0 / (dims[2] as f64).sqrt())
            } else if dims.len() == 2 {
                if arch == "recurrent_gemma" {
                    let out_proj = name.ends_with("linear_out.weight") || name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight");
                    let std = (if out_proj { 2.0 / n_layer } else { 1.0 } / dims[1] as f64).sqrt();
                    normal(&mut rng, std)
                } else if arch == "llama" {
                    let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") { 0.02 / (2.0 * n_layer).sqrt() } else { 0.02 };
                    normal(&mut rng, std)
                } else {
                    // PyTorch's Linear default (kaiming uniform, a = √5): U(±1/√fan_in); mamba_ssm rescales the
                    // residual-branch output projections by 1/√n_layer (a hybrid pattern's attention and MLP
                    // blocks are residual branches too).
                    let b = 1.0 / (dims[1] as f64).sqrt();
                    let branch_out = name.ends_with("out_proj.weight") || name.ends_with("fc2.weight") || (arch == "nemotron_h" && (name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight")));
                    let rescale = if branch_out { 1.0 / n_layer.sqrt() } else { 1.0 };
                    uniform(&mut rng, b * rescale)
                }
            } else {
                bail!("no initialisation rule for parameter {name} {dims:?}");
            };
            var.set(&Tensor::from_vec(values, dims, var.device())?)?;
        }
        Ok(())
    }
}

fn ouro_nn_arch(config: &serde_json::Value) -> &'static str {
    ouro_nn::lm::architecture_of_config(config).unwrap_or("mamba_ssm")
}

/// The model of a checkpoint config (any architecture ouro loads) over the given VarBuilder.
pub fn build(config: &serde_json::Value, vb: VarBuilder<'static>) -> Result<Box<dyn LanguageModel>> {
    let arch = ouro_nn::lm::architecture_of_config(config)?;
    Ok(match arch {
        "llamba" => bail!("training Llamba from scratch is not supported; distil it (ouro distill)"),
        "caduceus" => {
            let cfg: ouro_nn::caduceus::CaduceusConfig = serde_json::from_value(config.clone()).map_err(|e| candle_core::Error::Msg(format!("caduceus config: {e}")))?;
            Box::new(ouro_nn::caduceus::Caduceus::new(cfg, vb)?)
        }
        "mixer_encoder" => {
            let cfg: ouro_nn::encoder::EncoderConfig = serde_json::from_value(config.clone()).map_err(|e| candle_core::Error::Msg(format!("mixer_encoder config: {e}")))?;
            Box::new(ouro_nn::encoder::Encoder::new(cfg, vb)?)
        }
        "recurrent_gemma" => Box::new(ouro_nn::griffin::Griffin::new(ouro_nn::griffin::GriffinConfig::from_json(config)?, vb)?),
        "llama" => {
            let mut cfg: ouro_nn::llama::LlamaConfig = serde_json::from_value(config.clone()).map_err(|e| candle_core::Error::Msg(format!("llama config: {e}")))?;
            cfg.resolve_rope()?;
            Box::new(ouro_nn::llama::Llama::new(cfg, vb)?)
        }
        _ => {
            let vocab = config.get("vocab_size").and_then(|v| v.as_u64()).ok_or_else(|| candle_core::Error::Msg("config has no vocab_size".into()))? as usize;
            let pad = config.get("pad_vocab_size_multiple").and_then(|v| v.as_u64()).unwrap_or(1).max(1) as usize;
            let rows = vocab.div_ceil(pad) * pad;
            let cfg = ouro_nn::mamba_lm::MambaLmConfig::from_json(config, arch, rows)?;
            Box::new(ouro_nn::mamba_lm::MambaLm::new(cfg, arch, vb)?)
        }
    })
}
