//! `ouro bench ...`: kernel and model benchmarks, each printed beside the peer run in the same process.

use anyhow::{bail, Context, Result};
use ouro_kernels::ssd::{self, Dims, ScanGrads, ScanIn};
use ouro_kernels::Segments;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// `ouro bench --model PATH …` measures the CPU inference engine (see [`crate::cmd::engine`]);
/// the subcommands measure kernels.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Bench {
    #[command(subcommand)]
    cmd: Option<BenchCmd>,
    #[command(flatten)]
    model: crate::cmd::engine::BenchArgs,
}

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// The Mamba-2 SSD scan on the CPU: chunked vs sequential, forward and forward+backward.
    Ssd(SsdArgs),
    /// The RG-LRU linear recurrence (Hawk/Griffin): parallel (chunked) vs sequential scan, forward.
    Scan(ScanArgs),
    /// The Mamba-2 SSD layer on a CUDA device (forward, forward+backward) against the measured bandwidth
    /// and matmul ceilings, beside mamba_ssm's Triton kernels (`--peer`).
    SsdGpu(crate::cmd::bench_gpu::SsdGpuArgs),
    /// Decode throughput of any model through the candle path (tokens/s at a batch size) and its memory
    /// per sequence; `ouro bench --model` measures the CPU engine.
    Decode(DecodeArgs),
    /// Sampling throughput of several models (e.g. an SSM, a hybrid and a Transformer of equal parameter
    /// count): tokens/s of `ouro sample`'s batched decoding vs batch size and generation length, and the
    /// cache memory per sequence; prints markdown tables and the ratios to a reference model.
    Sample(SampleBenchArgs),
}

#[derive(clap::Args)]
pub struct SampleBenchArgs {
    /// Checkpoints to compare (repeat the flag).
    #[arg(long = "model", required = true, action = clap::ArgAction::Append)]
    models: Vec<std::path::PathBuf>,
    /// Batch sizes (rows decoded together; every row samples the same prompt), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256,512")]
    batches: Vec<usize>,
    /// Generation lengths: every completion runs to exactly this many tokens (no EOS, no stop string).
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    lens: Vec<usize>,
    /// Prompt tokens (fixed pseudo-random ids), prefilled once per cell.
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Cache memory budget in MiB: a cell whose cache at the final length — batch · (SSM state + KV per token
    /// · (prompt + length)) — exceeds it is not run and shows as "over".
    #[arg(long, default_value_t = 1024.0)]
    memory_budget_mib: f64,
    /// Wall-clock cap per cell in seconds: a cell still running then stops; its tokens/s is over the positions
    /// it reached (marked "*" with the position).
    #[arg(long, default_value_t = 30.0)]
    cell_seconds: f64,
    /// The model the ratios are taken against: an index into the --model list (default: the last).
    #[arg(long)]
    reference: Option<usize>,
    /// Also write one JSON object per cell to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Decode pure Mamba-2 models with the generic model code even on the CPU (by default they run on the
    /// inference engine there, as `ouro sample` does; their name then says "engine").
    #[arg(long)]
    no_engine: bool,
}

#[derive(clap::Args)]
pub struct ScanArgs {
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Channels (lru_width).
    #[arg(long, default_value_t = 2560)]
    width: usize,
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    lens: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    chunk: usize,
    #[arg(long, default_value_t = 7)]
    iters: usize,
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// Checkpoint folder or .gguf.
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
}

#[derive(clap::Args)]
pub struct SsdArgs {
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 24)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 128)]
    state: usize,
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    lens: Vec<usize>,
    /// Chunk size of the chunked algorithm.
    #[arg(long, default_value_t = ouro_kernels::ssd::CPU_CHUNK)]
    chunk: usize,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Also time the backward pass.
    #[arg(long)]
    backward: bool,
    /// Run a peer side by side: a Python interpreter with torch, running scripts/peers/ssd_torch.py
    /// (`mamba_ssm`'s ssd_minimal_discrete and its sequential reference on CPU PyTorch).
    #[arg(long)]
    peer_python: Option<String>,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    len: usize,
    algo: String,
    pass: &'static str,
    seconds: f64,
    tokens_per_s: f64,
    gflops: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time<F: FnMut()>(iters: usize, mut f: F) -> f64 {
    f(); // warm-up
    median((0..iters.max(1)).map(|_| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    }).collect())
}

/// FLOPs of the chunked forward per (batch·token): per head 2·(Q·N [CBᵀ, shared by a group] / (H/G)
/// + Q·P [M·X] + 2·P·N [chunk state, C·Sᵀ]).
fn chunked_flops(d: &Dims, q: usize) -> f64 {
    let (h, p, n, g) = (d.h as f64, d.p as f64, d.n as f64, d.g as f64);
    let q = q.min(d.l) as f64;
    2.0 * (g * q * n + h * (q * p + 2.0 * p * n))
}

pub fn run(b: Bench) -> Result<()> {
    match b.cmd {
        Some(BenchCmd::Ssd(a)) => ssd_bench(a),
        Some(BenchCmd::Scan(a)) => scan_bench(a),
        Some(BenchCmd::Decode(a)) => decode_bench(a),
        Some(BenchCmd::Sample(a)) => sample_bench(a),
        Some(BenchCmd::SsdGpu(a)) => crate::cmd::bench_gpu::ssd_gpu(a),
        None => crate::cmd::engine::bench(b.model),
    }
}

fn scan_bench(a: ScanArgs) -> Result<()> {
    use ouro_kernels::linear_scan::{scan_fwd, ScanAlgo};
    let mut rng = StdRng::seed_from_u64(0);
    println!("linear recurrence h = a⊙h + x, CPU f32, b={} width={}, {} threads (median of {})", a.batch, a.width, rayon::current_num_threads(), a.iters);
    println!("{:>6}  {:<14} {:>10} {:>12}", "len", "algorithm", "ms", "tokens/s");
    for &l in &a.lens {
        let n = a.batch * l * a.width;
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let av: Vec<f32> = (0..n).map(|_| rng.random_range(0.5..1.0)).collect();
        let h0 = vec![0f32; a.batch * a.width];
        let mut y = vec![0f32; n];
        let mut hl = vec![0f32; a.batch * a.width];
        let mut rates = Vec::new();
        for algo in [ScanAlgo::Sequential, ScanAlgo::Chunked(a.chunk)] {
            let t = time(a.iters, || scan_fwd(a.batch, l, a.width, &x, &av, &h0, algo, &mut y, &mut hl));
            let toks = (a.batch * l) as f64 / t;
            rates.push(toks);
            println!("{:>6}  {:<14} {:>10.2} {:>12.0}", l, format!("{algo:?}"), t * 1e3, toks);
        }
        println!("len {l}: parallel / sequential = {:.2}x", rates[1] / rates[0]);
    }
    Ok(())
}

fn decode_bench(a: DecodeArgs) -> Result<()> {
    let ck = ouro_nn::checkpoint::Checkpoint::open(&a.model)?;
    let model = ouro_nn::lm::load(&ck, &candle_core::Device::Cpu)?;
    let v = model.info().vocab_size as u32;
    let prompt: Vec<u32> = (0..a.prompt_len as u32).map(|i| (i * 7 + 3) % v).collect();
    let opts = ouro_nn::generate::GenerateOptions {
        max_new_tokens: a.gen_len,
        num_samples: a.batch,
        sampling: ouro_nn::generate::SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 },
        stop: vec![],
    };
    let (_, st) = ouro_nn::generate::generate(model.as_ref(), &prompt, &opts, |_, _| Ok(()))?;
    println!(
        "{}: batch {} prompt {} gen {}: prefill {:.0} tok/s, decode {:.1} tok/s, cache {:.3} MiB ({:.3} MiB per sequence)",
        a.model.display(),
        a.batch,
        a.prompt_len,
        a.gen_len,
        st.prompt_tokens as f64 / st.prefill_seconds,
        st.generated_tokens as f64 / st.decode_seconds,
        st.cache_bytes as f64 / (1 << 20) as f64,
        st.cache_bytes as f64 / a.batch as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// One cell of `ouro bench sample`.
#[derive(Serialize, Clone)]
struct SampleCell {
    model: String,
    parameters: usize,
    batch: usize,
    len: usize,
    /// Cache bytes per sequence at the final length (SSM state + KV).
    bytes_per_seq: usize,
    /// None: over the memory budget, not run.
    tokens_per_s: Option<f64>,
    generated_tokens: usize,
    seconds: f64,
    /// The position every row reached when the cell was cut by --cell-seconds (None: ran to `len`).
    partial_at: Option<usize>,
}

/// A short name for a checkpoint path: `runs/x/checkpoint` → `x`.
fn model_name(p: &std::path::Path) -> String {
    let p = if p.file_name().is_some_and(|n| n == "checkpoint") { p.parent().unwrap_or(p) } else { p };
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

fn sample_bench(a: SampleBenchArgs) -> Result<()> {
    use ouro_nn::generate::SamplingParams;
    use ouro_nn::engine::EngineBatcher;
    use ouro_nn::sample::{sample_batched, sample_with, Completion, SampleOptions, SampleStats};
    if a.batches.contains(&0) || a.lens.contains(&0) || a.prompt_len == 0 {
        bail!("--batches, --lens and --prompt-len must be at least 1");
    }
    if !(a.cell_seconds > 0.0) {
        bail!("--cell-seconds must be positive");
    }
    let reference = a.reference.unwrap_or(a.models.len() - 1);
    if reference >= a.models.len() {
        bail!("--reference {reference}: there are {} models (indices from 0)", a.models.len());
    }
    let budget = a.memory_budget_mib * (1u64 << 20) as f64;
    let dev = crate::device::parse(&a.device)?;
    let mut json = match &a.json {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)),
        None => None,
    };
    let mut cells: Vec<Vec<SampleCell>> = Vec::new();
    let mut infos = Vec::new();
    for path in &a.models {
        let ck = ouro_nn::checkpoint::Checkpoint::open(path)?;
        let model = ouro_nn::lm::load(&ck, &dev)?;
        let info = model.info();
        let engine = super::lm::cpu_engine(path, &dev, a.no_engine, ouro_kernels::quant::Format::F32)?;
        let name = if engine.is_some() { format!("{} (engine)", model_name(path)) } else { model_name(path) };
        let v = info.vocab_size as u32;
        let prompt: Vec<u32> = (0..a.prompt_len as u32).map(|i| (i * 7 + 3) % v).collect();
        // `ouro sample`'s batched decoding of the prompt, on the engine where it applies.
        let run = |o: &SampleOptions| -> Result<SampleStats> {
            let (prompts, none, mut done) = (std::slice::from_ref(&prompt), |_: &[u32]| false, |_: &Completion| {});
            Ok(match &engine {
                Some(e) => sample_with(&EngineBatcher::new(e), prompts, o, &none, &mut done)?.1,
                None => sample_batched(model.as_ref(), prompts, o, &none, &mut done)?.1,
            })
        };
        let params = ck.parameter_count();
        let opts = |batch: usize, len: usize, budget: Option<f64>| SampleOptions {
            num_samples: Some(batch),
            max_new_tokens: len,
            sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 },
            batch_size: batch,
            time_budget: budget,
            stop_tokens: vec![],
        };
        // Warm-up at the largest batch that fits the budget (allocator arenas, thread pools): without it the
        // first large cell pays for faulting its memory in.
        let warm = a.batches.iter().copied().filter(|&b| (b * 4 * (info.state_floats_per_seq + info.kv_floats_per_token * (a.prompt_len + 8))) as f64 <= budget).max().unwrap_or(1);
        run(&opts(warm, 8, None))?;
        eprintln!("{name}: {params} parameters, {} ({} state floats per sequence, {} KV floats per token)", info.layer_kinds.join(","), info.state_floats_per_seq, info.kv_floats_per_token);
        let mut mine = Vec::new();
        for &len in &a.lens {
            let per_seq = 4 * (info.state_floats_per_seq + info.kv_floats_per_token * (a.prompt_len + len));
            for &batch in &a.batches {
                let mut cell = SampleCell { model: name.clone(), parameters: params, batch, len, bytes_per_seq: per_seq, tokens_per_s: None, generated_tokens: 0, seconds: 0.0, partial_at: None };
                if (per_seq * batch) as f64 <= budget {
                    let st = run(&opts(batch, len, Some(a.cell_seconds)))?;
                    cell.tokens_per_s = Some(st.generated_tokens as f64 / st.seconds.max(1e-9));
                    cell.generated_tokens = st.generated_tokens;
                    cell.seconds = st.seconds;
                    if st.dropped > 0 || st.completions < batch {
                        cell.partial_at = Some(st.generated_tokens / batch);
                    }
                }
                eprintln!(
                    "  len {len:>5} batch {batch:>4}: {}",
                    match (cell.tokens_per_s, cell.partial_at) {
                        (None, _) => format!("over the memory budget ({:.0} MiB of cache)", (per_seq * batch) as f64 / (1u64 << 20) as f64),
                        (Some(t), None) => format!("{t:.0} tokens/s ({:.1} s)", cell.seconds),
                        (Some(t), Some(p)) => format!("{t:.0} tokens/s, cut at position {p} after {:.1} s", cell.seconds),
                    }
                );
                if let Some(j) = json.as_mut() {
                    serde_json::to_writer(&mut *j, &cell)?;
                    std::io::Write::write_all(j, b"\n")?;
                    std::io::Write::flush(j)?;
                }
                mine.push(cell);
            }
        }
        infos.push((name, params, info));
        cells.push(mine);
    }

    // Tables: tokens/s per model, bytes per sequence, ratios to the reference.
    let fmt_cell = |c: &SampleCell| match (c.tokens_per_s, c.partial_at) {
        (None, _) => "over".to_string(),
        (Some(t), None) => format!("{t:.0}"),
        (Some(t), Some(p)) => format!("{t:.0}*{p}"),
    };
    let header = |first: &str| {
        println!("| {first} | {} |", a.batches.iter().map(|b| format!("batch {b}")).collect::<Vec<_>>().join(" | "));
        println!("| --- |{}", " ---: |".repeat(a.batches.len()));
    };
    println!(
        "sampling throughput, {} f32, {} CPU threads: tokens/s (generated tokens ÷ wall time, prefill of a {}-token prompt included); \"over\": cache above {} MiB, not run; \"T*P\": cut after {} s at position P",
        if dev.is_cuda() { "CUDA" } else { "CPU" },
        rayon::current_num_threads(),
        a.prompt_len,
        a.memory_budget_mib,
        a.cell_seconds
    );
    for (m, (name, params, info)) in infos.iter().enumerate() {
        println!("\n{name} ({params} parameters; {}):\n", info.layer_kinds.join(" "));
        header("length");
        for (li, &len) in a.lens.iter().enumerate() {
            let row: Vec<String> = cells[m][li * a.batches.len()..(li + 1) * a.batches.len()].iter().map(fmt_cell).collect();
            println!("| {len} | {} |", row.join(" | "));
        }
    }
    println!("\ncache per sequence at the final length (bytes: SSM state + KV cache, f32):\n");
    println!("| model | parameters | {} |", a.lens.iter().map(|l| format!("length {l}")).collect::<Vec<_>>().join(" | "));
    println!("| --- | ---: |{}", " ---: |".repeat(a.lens.len()));
    for (m, (name, params, _)) in infos.iter().enumerate() {
        let row: Vec<String> = (0..a.lens.len()).map(|li| cells[m][li * a.batches.len()].bytes_per_seq.to_string()).collect();
        println!("| {name} | {params} | {} |", row.join(" | "));
    }
    let rname = &infos[reference].0;
    for (m, (name, ..)) in infos.iter().enumerate().filter(|(m, _)| *m != reference) {
        println!("\n{name} ÷ {rname} (tokens/s; \"only {name}\": {rname} over the memory budget):\n");
        header("length");
        for (li, &len) in a.lens.iter().enumerate() {
            let row: Vec<String> = (0..a.batches.len())
                .map(|bi| {
                    let (x, r) = (&cells[m][li * a.batches.len() + bi], &cells[reference][li * a.batches.len() + bi]);
                    match (x.tokens_per_s, r.tokens_per_s) {
                        (Some(x), Some(r)) => format!("{:.2}×", x / r),
                        (Some(_), None) => format!("only {name}"),
                        (None, Some(_)) => format!("only {rname}"),
                        (None, None) => "over".into(),
                    }
                })
                .collect();
            println!("| {len} | {} |", row.join(" | "));
        }
    }
    Ok(())
}

fn ssd_bench(a: SsdArgs) -> Result<()> {
    if a.heads % a.groups != 0 {
        bail!("--heads {} must be divisible by --groups {}", a.heads, a.groups);
    }
    let mut rows = Vec::new();
    let mut rng = StdRng::seed_from_u64(0);
    for &l in &a.lens {
        let d = Dims { b: a.batch, l, h: a.heads, p: a.head_dim, g: a.groups, n: a.state };
        let mut rand = |n: usize, lo: f32, hi: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(lo..hi)).collect() };
        let x = rand(d.b * l * d.h * d.p, -0.1, 0.1); // X = dt·x with dt ≈ 0.1
        let av = rand(d.b * l * d.h, -0.2, -0.001);
        let bm = rand(d.b * l * d.g * d.n, -1.0, 1.0);
        let cm = rand(d.b * l * d.g * d.n, -1.0, 1.0);
        let seg = Segments::none();
        let inp = ScanIn { x: &x, a: &av, bm: &bm, cm: &cm, s0: None, seg: &seg };
        let mut y = vec![0f32; x.len()];
        let mut sf = vec![0f32; d.b * d.h * d.p * d.n];
        let toks = (d.b * l) as f64;
        let flops = chunked_flops(&d, a.chunk) * toks;
        let t = time(a.iters, || ssd::scan_chunked(d, a.chunk, inp, &mut y, &mut sf));
        rows.push(Row { len: l, algo: format!("chunked(Q={})", a.chunk), pass: "fwd", seconds: t, tokens_per_s: toks / t, gflops: flops / t / 1e9 });
        let rec_flops = 4.0 * (d.h * d.p * d.n) as f64 * toks;
        let t = time(a.iters, || ssd::scan_recurrent(d, inp, &mut y, &mut sf));
        rows.push(Row { len: l, algo: "sequential".into(), pass: "fwd", seconds: t, tokens_per_s: toks / t, gflops: rec_flops / t / 1e9 });
        if a.backward {
            let dy = rand(x.len(), -1.0, 1.0);
            let (mut dx, mut da) = (vec![0f32; x.len()], vec![0f32; av.len()]);
            let (mut dbm, mut dcm, mut ds0) = (vec![0f32; bm.len()], vec![0f32; cm.len()], vec![0f32; sf.len()]);
            let t = time(a.iters, || {
                ssd::scan_chunked(d, a.chunk, inp, &mut y, &mut sf);
                let gr = ScanGrads { dx: &mut dx, da: &mut da, dbm: &mut dbm, dcm: &mut dcm, ds0: &mut ds0 };
                ssd::scan_chunked_bwd(d, a.chunk, inp, &dy, None, gr);
            });
            rows.push(Row { len: l, algo: format!("chunked(Q={})", a.chunk), pass: "fwd+bwd", seconds: t, tokens_per_s: toks / t, gflops: f64::NAN });
        }
    }
    let peer = match &a.peer_python {
        Some(py) => Some(run_peer(py, &a)?),
        None => None,
    };
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        if let Some(p) = &peer {
            for r in p {
                println!("{}", serde_json::to_string(r)?);
            }
        }
        return Ok(());
    }
    println!(
        "SSD scan, CPU f32, b={} h={} p={} n={} g={}, {} threads (median of {})",
        a.batch, a.heads, a.head_dim, a.state, a.groups, rayon::current_num_threads(), a.iters
    );
    println!("{:>6}  {:<16} {:<8} {:>10} {:>12} {:>8}", "len", "algorithm", "pass", "ms", "tokens/s", "GFLOP/s");
    for r in &rows {
        println!("{:>6}  {:<16} {:<8} {:>10.2} {:>12.0} {:>8.1}", r.len, r.algo, r.pass, r.seconds * 1e3, r.tokens_per_s, r.gflops);
    }
    for &l in &a.lens {
        let get = |algo: &str, pass: &str| rows.iter().find(|r| r.len == l && r.algo.starts_with(algo) && r.pass == pass).map(|r| r.tokens_per_s);
        if let (Some(c), Some(s)) = (get("chunked", "fwd"), get("sequential", "fwd")) {
            println!("len {l}: chunked / sequential = {:.2}x", c / s);
        }
    }
    if let Some(p) = peer {
        println!("\npeer (PyTorch CPU, same shapes, same process tree):");
        for r in &p {
            let ours = rows.iter().find(|o| o.len == r.len && o.pass == r.pass && o.algo.starts_with(if r.algo.contains("sequential") { "sequential" } else { "chunked" }));
            let ratio = ours.map(|o| o.tokens_per_s / r.tokens_per_s).unwrap_or(f64::NAN);
            println!("{:>6}  {:<28} {:<8} {:>10.2} ms {:>12.0} tok/s   ouro is {:.1}x", r.len, r.algo, r.pass, r.seconds * 1e3, r.tokens_per_s, ratio);
        }
    }
    Ok(())
}

#[derive(serde::Deserialize, Serialize)]
struct PeerRow {
    len: usize,
    algo: String,
    pass: String,
    seconds: f64,
    tokens_per_s: f64,
}

fn run_peer(python: &str, a: &SsdArgs) -> Result<Vec<PeerRow>> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/peers/ssd_torch.py");
    let lens: Vec<String> = a.lens.iter().map(|l| l.to_string()).collect();
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--batch", &a.batch.to_string(), "--heads", &a.heads.to_string(), "--head-dim", &a.head_dim.to_string()])
        .args(["--state", &a.state.to_string(), "--groups", &a.groups.to_string(), "--chunk", &a.chunk.to_string()])
        .args(["--iters", &a.iters.to_string(), "--threads", &rayon::current_num_threads().to_string(), "--lens", &lens.join(",")])
        .args(if a.backward { vec!["--backward"] } else { vec![] })
        .output()
        .with_context(|| format!("running the peer {python} {}", script.display()))?;
    if !out.status.success() {
        bail!("peer benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).context("peer output"))
        .collect()
}
