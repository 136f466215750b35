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
}

fn main() {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().expect("thread pool already set");
    }
    let res = match cli.command {
        Command::Bench(b) => cmd::bench::run(b),
        Command::Doctor(a) => cmd::doctor::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
