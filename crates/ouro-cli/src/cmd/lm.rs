//! `ouro logits`, `ouro generate`, `ouro info`: language models from checkpoint folders or GGUF files.

use anyhow::{bail, Context, Result};
use candle_core::DType;
use ouro_nn::checkpoint::Checkpoint;
use ouro_nn::engine::{EngineDecoder, Mamba2Engine};
use ouro_nn::generate::{generate_with, Decoder, GenerateOptions, ModelDecoder, SamplingParams};
use ouro_kernels::quant::Format;
use ouro_nn::lm::{check_ids, ids_tensor, load};
use ouro_nn::tokenizer::{TextStream, Tokenizer};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Checkpoint folder (config.json + safetensors or pytorch_model.bin) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The sampler's flags (`ouro generate`, `ouro sample`).
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed }
    }
}

#[derive(clap::Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Token ids of one sequence, comma-separated; repeat for a batch (equal lengths).
    #[arg(long, required = true, action = clap::ArgAction::Append)]
    ids: Vec<String>,
    /// Output safetensors file with tensor `logits` (batch, len, vocab), f32.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    s: SamplingArgs,
    /// Completions of the prompt, decoded together as one batch through the recurrent state.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Wrap the prompt in the ChatML template (<|im_start|>user ... <|im_start|>assistant).
    #[arg(long)]
    chat: bool,
    /// tokenizer.json to use, or "bytes" (default: the checkpoint's own).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Weight format of the CPU engine for an f32/f16/bf16 Mamba-2 checkpoint: f32, f16, q8_0, q4_0
    /// (a quantised checkpoint keeps its own).
    #[arg(long, default_value = "f32")]
    weights: String,
    /// Decode with the generic model code even where the CPU engine applies (pure Mamba-2 on the CPU).
    #[arg(long)]
    no_engine: bool,
    /// Engine: f32 products everywhere (by default the prompt and batches of ≥ 8 samples use bf16
    /// matmuls where the CPU has AVX-512 BF16).
    #[arg(long)]
    no_bf16: bool,
}

#[derive(clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// List every tensor.
    #[arg(long)]
    tensors: bool,
}

fn open(m: &ModelArgs) -> Result<(Checkpoint, Box<dyn ouro_nn::lm::LanguageModel>)> {
    let dev = crate::device::parse(&m.device)?;
    let ck = Checkpoint::open(&m.model)?;
    let model = load(&ck, &dev)?;
    Ok((ck, model))
}

/// The CPU inference engine for `path` where it applies — a pure Mamba-2 checkpoint folder on the CPU,
/// unless `no_engine` — in weight format `fmt`.
pub(crate) fn cpu_engine(path: &Path, dev: &candle_core::Device, no_engine: bool, fmt: Format) -> Result<Option<Mamba2Engine>> {
    if !(dev.is_cpu() && !no_engine && Mamba2Engine::supports(path)) {
        return Ok(None);
    }
    Ok(Some(Mamba2Engine::load(path, fmt).with_context(|| format!("loading {}", path.display()))?))
}

/// What decodes `m` (`ouro generate`, `ouro sample`) and its tokenizer: the CPU inference engine for a pure
/// Mamba-2 on the CPU (fused steps, quantised weights; bf16 matmuls unless `no_bf16`), else — and with
/// `no_engine` — the generic model code, which takes f32 weights only.
pub(crate) type Decoding = (Tokenizer, Option<Mamba2Engine>, Option<Box<dyn ouro_nn::lm::LanguageModel>>);
pub(crate) fn load_for_decoding(m: &ModelArgs, tokenizer: Option<&str>, fmt: Format, no_engine: bool, no_bf16: bool) -> Result<Decoding> {
    let dev = crate::device::parse(&m.device)?;
    if let Some(mut engine) = cpu_engine(&m.model, &dev, no_engine, fmt)? {
        let config = ouro_nn::checkpoint::read_config(&m.model)?;
        let tok = Tokenizer::for_folder(&m.model, &config, tokenizer)?;
        engine.bf16_matmul &= !no_bf16;
        return Ok((tok, Some(engine), None));
    }
    if fmt != Format::F32 {
        bail!("--weights {} needs the CPU engine (a pure Mamba-2 checkpoint folder on the CPU, without --no-engine)", fmt.name());
    }
    let (ck, model) = open(m)?;
    Ok((Tokenizer::for_checkpoint(&ck, tokenizer)?, None, Some(model)))
}

/// Writes `path` atomically: into a temporary file beside it, then renamed.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("out")));
    write(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    // Each --ids occurrence is one row.
    let rows: Vec<Vec<u32>> = a
        .ids
        .iter()
        .map(|r| r.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse::<u32>().with_context(|| format!("--ids: '{s}' is not a token id"))).collect())
        .collect::<Result<_>>()?;
    let (_ck, model) = open(&a.m)?;
    check_ids(&rows, model.info().vocab_size)?;
    let ids = ids_tensor(&rows, model.device())?;
    let logits = model.forward(&ids, None, None)?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
    let map = std::collections::HashMap::from([("logits".to_string(), logits.clone())]);
    write_atomic(&a.out, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))?;
    eprintln!("wrote {} with logits {:?}", a.out.display(), logits.dims());
    Ok(())
}

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let fmt = Format::parse(&a.weights).with_context(|| format!("--weights '{}': expected f32, f16, q8_0 or q4_0", a.weights))?;
    let (tok, engine, model) = load_for_decoding(&a.m, a.tokenizer.as_deref(), fmt, a.no_engine, a.no_bf16)?;
    let mut dec: Box<dyn Decoder + '_> = match (&engine, &model) {
        (Some(e), _) => Box::new(EngineDecoder::new(e)),
        (_, Some(m)) => Box::new(ModelDecoder::new(m.as_ref())),
        _ => unreachable!("an engine or a model is loaded"),
    };
    let text = if a.chat { format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", a.prompt) } else { a.prompt.clone() };
    let prompt = tok.encode(&text)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut stop = tok.eos();
    if a.chat {
        stop.extend(tok.token_id("<|im_end|>"));
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        num_samples: a.num_samples,
        sampling: a.s.params(),
        stop: stop.clone(),
    };
    let stream = a.num_samples == 1;
    let mut ts = TextStream::new();
    let mut out = std::io::stdout().lock();
    let shown_prompt = if a.chat { format!("{}\n", a.prompt) } else { a.prompt.clone() };
    if stream {
        write!(out, "{shown_prompt}")?;
        out.flush()?;
    }
    let (samples, stats) = generate_with(dec.as_mut(), &prompt, &opts, |_, t| {
        if stream && !stop.contains(&t) {
            let s = ts.push(&tok, t)?;
            write!(out, "{s}").map_err(candle_core::Error::wrap)?;
            out.flush().map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    })?;
    if stream {
        writeln!(out)?;
    } else {
        for (i, s) in samples.iter().enumerate() {
            let body: Vec<u32> = s.iter().copied().filter(|t| !stop.contains(t)).collect();
            writeln!(out, "--- sample {} ---\n{shown_prompt}{}", i + 1, tok.decode(&body)?)?;
        }
    }
    eprintln!(
        "{}prompt {} tokens, prefill {:.1} tok/s; generated {} tokens in {} sequences, {:.1} tok/s; cache {:.2} MiB",
        engine.as_ref().map_or(String::new(), |e| format!("[cpu engine, {} weights] ", e.formats().0.name())),
        stats.prompt_tokens,
        stats.prompt_tokens as f64 / stats.prefill_seconds.max(1e-9),
        stats.generated_tokens,
        a.num_samples,
        stats.generated_tokens as f64 / stats.decode_seconds.max(1e-9),
        stats.cache_bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}

pub fn info(a: InfoArgs) -> Result<()> {
    let (ck, model) = open(&a.m)?;
    let i = model.info();
    println!("checkpoint:   {}", ck.path.display());
    println!("architecture: {}", i.architecture);
    println!("parameters:   {} ({:.1} M)", ck.parameter_count(), ck.parameter_count() as f64 / 1e6);
    let dts: Vec<String> = ck.dtype_summary().into_iter().map(|(k, v)| format!("{k} ×{v}")).collect();
    println!("stored dtype: {}", dts.join(", "));
    println!("layers:       {} (d_model {}, vocab {})", i.n_layers, i.d_model, i.vocab_size);
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for k in &i.layer_kinds {
        match kinds.last_mut() {
            Some((last, n)) if last == k => *n += 1,
            _ => kinds.push((k.clone(), 1)),
        }
    }
    println!("layer kinds:  {}", kinds.iter().map(|(k, n)| format!("{k}×{n}")).collect::<Vec<_>>().join(" "));
    println!(
        "state:        {} floats = {:.2} MiB per sequence (f32), constant in the context length",
        i.state_floats_per_seq,
        i.state_floats_per_seq as f64 * 4.0 / (1 << 20) as f64
    );
    if i.kv_floats_per_token > 0 {
        println!("kv cache:     {} floats = {:.1} KiB per token per sequence (f32), grows with the context", i.kv_floats_per_token, i.kv_floats_per_token as f64 * 4.0 / 1024.0);
    }
    if a.tensors {
        for e in &ck.entries {
            println!("  {:<60} {:<8} {:?}", e.name, e.dtype, e.shape);
        }
    } else {
        println!("tensors:      {} (list them with --tensors)", ck.entries.len());
    }
    Ok(())
}
