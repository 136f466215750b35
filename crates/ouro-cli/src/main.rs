//! `ouro`: train, distill and run state-space sequence models.

mod cmd;
mod device;

use clap::{Parser, Subcommand};

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
    /// Benchmarks (kernels and models).
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
    /// Checks the build and a compute device: features, CPU SIMD, and a numeric check on the device.
    Doctor(cmd::doctor::Args),
    /// Writes a model's logits for given token ids to a safetensors file (tensor `logits`).
    Logits(cmd::lm::LogitsArgs),
    /// Generates text from a prompt, streaming it (several samples decode as one batch).
    Generate(cmd::lm::GenerateArgs),
    /// Describes a checkpoint: architecture, parameters, dtypes, state size, tensors.
    Info(cmd::lm::InfoArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().expect("thread pool already set");
    }
    let res = match cli.command {
        Command::Bench(b) => cmd::bench::run(b),
        Command::Doctor(a) => cmd::doctor::run(a),
        Command::Logits(a) => cmd::lm::logits(a),
        Command::Generate(a) => cmd::lm::generate_cmd(a),
        Command::Info(a) => cmd::lm::info(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
