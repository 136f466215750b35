//! `ouro bench --model` (the CPU inference engine: prefill, decode, memory, and the bandwidth limit
//! measured in the same run) and `ouro quantize`.

use anyhow::{bail, Context, Result};
use ouro_kernels::quant::Format;
use ouro_nn::engine::{quantize_checkpoint, Mamba2Engine};
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Checkpoint folder of a Mamba-2 LM (HF or mamba_ssm layout, or written by `ouro quantize`).
    #[arg(long, required = true)]
    model: Option<PathBuf>,
    /// Prompt tokens for the prefill measurement (one sequence, like llama-bench's ppN).
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens decoded per sequence (like llama-bench's tgN).
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Weight format for an f32/f16/bf16 checkpoint (a quantised checkpoint keeps its own): f32, f16,
    /// q8_0, q4_0.
    #[arg(long, default_value = "f32")]
    weights: String,
    /// f32 products everywhere (by default prefill and decode steps of ≥ 8 sequences use bf16 matmuls
    /// where the CPU has AVX-512 BF16).
    #[arg(long)]
    no_bf16: bool,
    /// Store the SSM state in bf16 (math in f32): half the state traffic per step.
    #[arg(long)]
    state_bf16: bool,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Skip the memory-bandwidth measurement (and so the fraction of the limit).
    #[arg(long)]
    no_bandwidth: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    weights: String,
    embedding: String,
    /// Whether prefill / batched decode ran bf16 matmuls.
    bf16_matmul: bool,
    state_bf16: bool,
    threads: usize,
    batch: usize,
    prompt_len: usize,
    gen_len: usize,
    prefill_tokens_per_s: Option<f64>,
    decode_tokens_per_s: f64,
    /// Bytes one decode step reads: weights once, the state read and written per sequence.
    bytes_per_step: usize,
    weight_bytes: usize,
    state_bytes_per_sequence: usize,
    peak_rss_bytes: Option<u64>,
    read_bandwidth_gb_s: Option<f64>,
    /// batch × bandwidth / bytes_per_step.
    decode_limit_tokens_per_s: Option<f64>,
    fraction_of_limit: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Peak resident memory of this process so far (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Read bandwidth with every thread of the pool: a 1 GiB f32 array streamed through the engine's own
/// AVX-512 dot kernel (x·x reads each line once), median of 5 passes (GB/s).
pub fn read_bandwidth() -> f64 {
    let v: Vec<f32> = (0..1usize << 28).map(|i| (i % 7) as f32).collect();
    let pass = || v.par_chunks(1 << 16).map(|c| ouro_kernels::quant::simd::dot_f32(c, c)).sum::<f32>();
    std::hint::black_box(pass());
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(pass());
            t.elapsed().as_secs_f64()
        })
        .collect();
    (v.len() * 4) as f64 / median(times) / 1e9
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let path = a.model.clone().context("--model is required")?;
    let fmt = Format::parse(&a.weights).with_context(|| format!("--weights '{}': expected f32, f16, q8_0 or q4_0", a.weights))?;
    if a.batch == 0 || a.gen_len == 0 || a.repeats == 0 {
        bail!("--batch, --gen-len and --repeats must be positive");
    }
    let mut engine = Mamba2Engine::load(&path, fmt).with_context(|| format!("loading {}", path.display()))?;
    if a.no_bf16 {
        engine.bf16_matmul = false;
    }
    engine.state_bf16 = a.state_bf16;
    let vocab = engine.vocab as u32;
    let ids = |n: usize, salt: u32| -> Vec<u32> { (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(salt)) % vocab).collect() };
    // Prefill: one sequence of prompt_len tokens from an empty state.
    let prefill = if a.prompt_len > 0 {
        let prompt = ids(a.prompt_len, 17);
        let mut st = engine.new_state(1);
        engine.prefill(&prompt, &mut st, 0)?; // warm-up
        let times: Vec<f64> = (0..a.repeats)
            .map(|_| {
                let mut st = engine.new_state(1);
                let t = Instant::now();
                engine.prefill(&prompt, &mut st, 0).map(|_| t.elapsed().as_secs_f64())
            })
            .collect::<candle_core::Result<_>>()?;
        Some(a.prompt_len as f64 / median(times))
    } else {
        None
    };
    // Decode: `batch` sequences from an empty state, gen_len steps.
    let mut ws = engine.workspace(a.batch);
    let mut decode_run = || -> candle_core::Result<f64> {
        let mut st = engine.new_state(a.batch);
        let mut toks = ids(a.batch, 5);
        let t = Instant::now();
        for _ in 0..a.gen_len {
            engine.step(&toks, &mut st, &mut ws)?;
            // Greedy next tokens: the work a real decoder does per step.
            for (b, tok) in toks.iter_mut().enumerate() {
                let row = &ws.logits[b * engine.vocab..(b + 1) * engine.vocab];
                *tok = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 as u32;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    };
    decode_run()?; // warm-up
    let times: Vec<f64> = (0..a.repeats).map(|_| decode_run()).collect::<candle_core::Result<_>>()?;
    let decode = (a.batch * a.gen_len) as f64 / median(times);
    let peak = peak_rss();
    let state = engine.state_bytes();
    let weight_bytes = engine.weight_bytes_per_step(a.batch);
    let bytes_per_step = weight_bytes + 2 * a.batch * state;
    let bw = if a.no_bandwidth { None } else { Some(read_bandwidth()) };
    let limit = bw.map(|g| a.batch as f64 * g * 1e9 / bytes_per_step as f64);
    let (w, e) = engine.formats();
    let r = Report {
        model: path.display().to_string(),
        weights: w.name().into(),
        embedding: e.name().into(),
        bf16_matmul: engine.bf16_matmul,
        state_bf16: engine.state_bf16,
        threads: rayon::current_num_threads(),
        batch: a.batch,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        prefill_tokens_per_s: prefill,
        decode_tokens_per_s: decode,
        bytes_per_step,
        weight_bytes,
        state_bytes_per_sequence: state,
        peak_rss_bytes: peak,
        read_bandwidth_gb_s: bw,
        decode_limit_tokens_per_s: limit,
        fraction_of_limit: limit.map(|l| decode / l),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    println!(
        "{}: weights {} (embedding/head {}), {} threads, {} products for prefill and batches ≥ {}, {} SSM state",
        r.model,
        r.weights,
        r.embedding,
        r.threads,
        if r.bf16_matmul { "bf16" } else { "f32" },
        ouro_nn::engine::BF16_BATCH,
        if r.state_bf16 { "bf16" } else { "f32" }
    );
    if let Some(p) = prefill {
        println!("  prefill  pp{:<5} {:>9.1} tokens/s", a.prompt_len, p);
    }
    println!("  decode   tg{:<5} {:>9.1} tokens/s at batch {}", a.gen_len, decode, a.batch);
    println!(
        "  per step: weights {:.1} MiB + state {:.2} MiB × 2 (read, write) × {} sequences = {:.1} MiB",
        mib(weight_bytes as f64),
        mib(state as f64),
        a.batch,
        mib(bytes_per_step as f64)
    );
    if let (Some(bw), Some(l)) = (bw, limit) {
        println!("  read bandwidth {bw:.1} GB/s → limit {l:.1} tokens/s; decode at {:.0}% of it", 100.0 * decode / l);
    }
    if let Some(p) = peak {
        println!("  peak memory {:.1} MiB", mib(p as f64));
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Checkpoint folder (config.json + safetensors or pytorch_model.bin).
    #[arg(long)]
    model: PathBuf,
    /// Format of the 2-D weight matrices: f16, q8_0 or q4_0 (f32 keeps them; 1-D tensors stay f32).
    #[arg(long)]
    format: String,
    /// New folder: config.json, tokenizer files and model.gguf.
    #[arg(long)]
    out: PathBuf,
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let fmt = Format::parse(&a.format).with_context(|| format!("--format '{}': expected f32, f16, q8_0 or q4_0", a.format))?;
    let s = quantize_checkpoint(&a.model, fmt, &a.out)?;
    println!(
        "{}: {} tensors, {} in {}; {:.1} MiB → {:.1} MiB",
        a.out.display(),
        s.tensors,
        s.quantized,
        fmt.name(),
        s.bytes_in as f64 / (1u64 << 20) as f64,
        s.bytes_out as f64 / (1u64 << 20) as f64
    );
    Ok(())
}
