//! `ouro`: train, distill and run state-space sequence models.

mod cmd;
mod device;

use clap::{Parser, Subcommand};

// Training and inference allocate and free many large tensors: mimalloc reuses that memory instead of
// returning it to the OS and faulting it back in (glibc's default for large blocks).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ouro", version, about = "Train, distill and run state-space sequence models (Mamba, Mamba-2, ...)")]
struct Cli {
    /// Worker threads for CPU kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks: `--model PATH` times the CPU inference engine (prefill, decode, memory, bandwidth
    /// limit); subcommands time kernels.
    Bench(cmd::bench::Bench),
    /// Writes a checkpoint with its linear weights in f16, Q8_0 or Q4_0 (GGUF block layouts).
    Quantize(cmd::engine::QuantizeArgs),
    /// Checks the build and a compute device: features, CPU SIMD, and a numeric check on the device.
    Doctor(cmd::doctor::Args),
    /// Writes a model's logits for given token ids to a safetensors file (tensor `logits`).
    Logits(cmd::lm::LogitsArgs),
    /// Generates text from a prompt, streaming it (several samples decode as one batch).
    Generate(cmd::lm::GenerateArgs),
    /// Many completions per prompt for test-time compute: continuous batching, answer extraction,
    /// majority vote and pass@k, or a time budget instead of a sample count.
    Sample(cmd::sample::SampleArgs),
    /// Describes a checkpoint: architecture, parameters, dtypes, state size, tensors.
    Info(cmd::lm::InfoArgs),
    /// Trains a model from a TOML config (causal or masked LM), with checkpoints, metrics and plots.
    Train(cmd::train::TrainArgs),
    /// Public corpora: fetch, list.
    #[command(subcommand)]
    Data(cmd::train::Data),
    /// Draws the loss/perplexity plot of one or more runs.
    Plot(cmd::train::PlotArgs),
    /// Distils a Llama teacher into a Llamba student (MOHAWK: matrix orientation, hidden-state alignment,
    /// knowledge distillation).
    Distill(cmd::distill::DistillArgs),
    /// Fits a sequence property predictor (Lyra and baselines) on labelled sequences.
    Fit(cmd::fit::FitArgs),
    /// Predicts with a fitted model: the input rows plus a `prediction` column.
    Predict(cmd::fit::PredictArgs),
    /// Scores a fitted model on labelled data (Spearman/Pearson/MSE or accuracy/AUROC/F1).
    Evaluate(cmd::fit::EvaluateArgs),
    /// Time-dependent PDE data (Kuramoto–Sivashinsky, Burgers) for neural operators.
    #[command(subcommand)]
    Pde(cmd::pde::Pde),
}

/// mimalloc's `mi_option_purge_delay` (enum index in mimalloc.h) and `mi_option_arena_eager_commit`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

fn main() {
    // Keep freed memory for reuse rather than returning it to the OS (measured ~10% faster training).
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
    }
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        // candle's matmuls run on its own worker pool, sized once from CANDLE_NUM_THREADS on first use; its
        // idle workers spin, so a pool larger than --threads steals the cores other work was given.
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().expect("thread pool already set");
    }
    let res = match cli.command {
        Command::Bench(b) => cmd::bench::run(b),
        Command::Quantize(a) => cmd::engine::quantize(a),
        Command::Doctor(a) => cmd::doctor::run(a),
        Command::Logits(a) => cmd::lm::logits(a),
        Command::Generate(a) => cmd::lm::generate_cmd(a),
        Command::Sample(a) => cmd::sample::sample_cmd(a),
        Command::Info(a) => cmd::lm::info(a),
        Command::Train(a) => cmd::train::train(a),
        Command::Data(d) => cmd::train::data(d),
        Command::Plot(a) => cmd::train::plot(a),
        Command::Distill(a) => cmd::distill::distill_cmd(a),
        Command::Fit(a) => cmd::fit::fit_cmd(a),
        Command::Predict(a) => cmd::fit::predict_cmd(a),
        Command::Evaluate(a) => cmd::fit::evaluate_cmd(a),
        Command::Pde(p) => cmd::pde::run(p),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
