//! `ouro fit`, `ouro predict`, `ouro evaluate`, `ouro data split`: labelled biological sequences.

use anyhow::{bail, Result};
use ouro_train::seqfit::{examples, fit, metrics, Alphabet, Ensemble, FitOptions, ModelSpec, Table, Target, Task};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct FitArgs {
    /// Training data: CSV, TSV (by extension, optionally .gz) or FASTA with labels in the headers.
    #[arg(long)]
    train: PathBuf,
    /// Validation data (the best epoch by its Spearman ρ or accuracy is kept).
    #[arg(long)]
    valid: PathBuf,
    #[arg(long)]
    sequence_column: String,
    #[arg(long)]
    label_column: String,
    /// regression or classification.
    #[arg(long)]
    task: String,
    /// protein, dna or rna.
    #[arg(long)]
    alphabet: String,
    /// lyra, cnn, transformer, mamba (small fixed models), or backbone (a model of `ouro train`: see
    /// --backbone and --init).
    #[arg(long, default_value = "lyra")]
    model: String,
    /// --model backbone: a TOML whose [model] table (as in `ouro train` configs) describes the backbone.
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// --model backbone: start from a checkpoint (e.g. pretrained with `ouro train`); its config.json is the
    /// backbone.
    #[arg(long)]
    init: Option<PathBuf>,
    /// DNA: reverse-complement augmentation while training (Caduceus-Ph).
    #[arg(long)]
    rc_augment: bool,
    /// DNA: predictions average the outputs on the sequence and on its reverse complement (post-hoc conjoining).
    #[arg(long)]
    conjoin: bool,
    /// How the head pools the sequence: mean (over real positions) or center (the middle position(s);
    /// for fixed windows centred on a site, e.g. splice junctions).
    #[arg(long, default_value = "mean")]
    pooling: String,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// onehot or learned.
    #[arg(long, default_value = "onehot")]
    embedding: String,
    #[arg(long, default_value_t = 0.2)]
    dropout: f64,
    /// Regression target: standardized (MSE on standardised labels) or rank (MSE on the labels' standardised
    /// ranks; predictions map back to label units through the training quantiles).
    #[arg(long, default_value = "standardized")]
    target: String,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (config.json + model.safetensors of the best epoch).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    quiet: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn fit_cmd(a: FitArgs) -> Result<()> {
    let task = match a.task.as_str() {
        "regression" => Task::Regression,
        "classification" => Task::Classification,
        other => bail!("--task must be regression or classification, got '{other}'"),
    };
    let alphabet = Alphabet::parse(&a.alphabet)?;
    let mut classes = Vec::new();
    let t0 = std::time::Instant::now();
    let train = examples(&Table::read(&a.train)?, &a.sequence_column, Some(&a.label_column), alphabet, task, &mut classes, false)?;
    classes.sort();
    // Re-read with the sorted class list so that class indices are stable.
    let train = if task == Task::Classification { examples(&Table::read(&a.train)?, &a.sequence_column, Some(&a.label_column), alphabet, task, &mut classes, true)? } else { train };
    let valid = examples(&Table::read(&a.valid)?, &a.sequence_column, Some(&a.label_column), alphabet, task, &mut classes, true)?;
    eprintln!("{} training and {} validation sequences{}", train.seqs.len(), valid.seqs.len(), if classes.is_empty() { String::new() } else { format!(", classes {}", classes.join(", ")) });
    let mut spec = ModelSpec::simple(&a.model, a.d_model, &a.embedding, a.dropout);
    spec.rc_augment = a.rc_augment;
    spec.conjoin = a.conjoin;
    ouro_train::seqfit::Pool::parse(&a.pooling)?;
    spec.pool = a.pooling.clone();
    if a.model == "backbone" {
        spec.backbone = Some(match (&a.init, &a.backbone) {
            (Some(ck), _) => ouro_nn::checkpoint::Checkpoint::open(ck)?.config,
            (None, Some(toml_path)) => {
                let text = std::fs::read_to_string(toml_path).map_err(|e| anyhow::anyhow!("{}: {e}", toml_path.display()))?;
                let doc: toml::Value = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", toml_path.display()))?;
                let table = doc.get("model").ok_or_else(|| anyhow::anyhow!("{}: no [model] table", toml_path.display()))?;
                let m: ouro_train::config::ModelSpec = table.clone().try_into().map_err(|e| anyhow::anyhow!("{}: [model]: {e}", toml_path.display()))?;
                let (_, vocab) = ouro_train::seqfit::backbone_tokens(alphabet);
                let max_len = train.seqs.iter().chain(&valid.seqs).map(|s| s.len()).max().unwrap_or(1);
                let tokenizer = if alphabet == Alphabet::Dna { "dna" } else { "none" };
                m.checkpoint_config(vocab, tokenizer, max_len)?
            }
            (None, None) => bail!("--model backbone needs --backbone CONFIG.toml or --init CHECKPOINT"),
        });
    } else if a.init.is_some() || a.backbone.is_some() {
        bail!("--backbone and --init go with --model backbone");
    }
    let o = FitOptions { target: Target::parse(&a.target)?, init: a.init.clone(), epochs: a.epochs, batch_size: a.batch_size, lr: a.lr, weight_decay: a.weight_decay, seed: a.seed, progress: !a.quiet, checkpoint: Some(a.out.clone()) };
    // fit writes each new best epoch into --out (`checkpoint`), so the model it returns is already there.
    let fitted = fit(&train, &valid, task, alphabet, classes, spec, (&a.sequence_column, &a.label_column), &o, &crate::device::parse(&a.device)?, &mut |s| eprintln!("{s}"))?;
    println!(
        "best epoch {} ({} {:.4} on {}); {} parameters; {:.1} s; saved {}",
        fitted.cfg.best_epoch,
        fitted.cfg.best_metric.0,
        fitted.cfg.best_metric.1,
        a.valid.display(),
        fitted.cfg.parameters,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// A folder written by `ouro fit`; repeat it for an ensemble (the mean of the models' predictions).
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    sequence_column: String,
    /// Output CSV: the input rows plus `prediction` (and one probability column per class).
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn predict_cmd(a: PredictArgs) -> Result<()> {
    let dev = crate::device::parse(&a.device)?;
    let f = Ensemble::load(&a.model, &dev)?;
    let cfg = f.cfg();
    let t = Table::read(&a.input)?;
    let mut classes = cfg.classes.clone();
    let ex = examples(&t, &a.sequence_column, None, cfg.alphabet, cfg.task, &mut classes, true)?;
    let preds = f.predict(&ex, &dev)?;
    let mut header = t.header.clone();
    header.push("prediction".into());
    if cfg.task == Task::Classification {
        header.extend(cfg.classes.iter().map(|c| format!("prob_{c}")));
    }
    let rows: Vec<Vec<String>> = t
        .rows
        .iter()
        .zip(&preds)
        .map(|(r, p)| {
            let mut r = r.clone();
            match cfg.task {
                Task::Regression => r.push(format!("{}", p[0])),
                Task::Classification => {
                    let best = p.iter().enumerate().fold((0, f64::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
                    r.push(cfg.classes[best].clone());
                    r.extend(p.iter().map(|x| format!("{x:.6}")));
                }
            }
            r
        })
        .collect();
    Table::write_csv(&a.out, &header, &rows)?;
    eprintln!("wrote {} predictions to {}", rows.len(), a.out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct EvaluateArgs {
    /// A folder written by `ouro fit`; repeat it to score an ensemble (the mean of the models' predictions).
    #[arg(long, required_unless_present = "prediction_column", conflicts_with = "prediction_column")]
    model: Vec<PathBuf>,
    /// Score the numbers already in this column instead of a model's (e.g. a published tool's predictions, as a
    /// baseline under the same metrics); regression only.
    #[arg(long)]
    prediction_column: Option<String>,
    #[arg(long)]
    input: PathBuf,
    /// The sequences (with --model).
    #[arg(long, default_value = "sequence")]
    sequence_column: String,
    #[arg(long)]
    label_column: String,
    /// Print a JSON object.
    #[arg(long)]
    json: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn evaluate_cmd(a: EvaluateArgs) -> Result<()> {
    let t = Table::read(&a.input)?;
    let (m, n) = match (a.model.is_empty(), &a.prediction_column) {
        (false, _) => {
            let dev = crate::device::parse(&a.device)?;
            let f = Ensemble::load(&a.model, &dev)?;
            let cfg = f.cfg();
            let mut classes = cfg.classes.clone();
            let ex = examples(&t, &a.sequence_column, Some(&a.label_column), cfg.alphabet, cfg.task, &mut classes, true)?;
            let preds = f.predict(&ex, &dev)?;
            (metrics(cfg.task, &preds, &ex.labels, cfg.classes.len().max(1)), ex.seqs.len())
        }
        (true, Some(col)) => {
            let (pi, li) = (t.column(col)?, t.column(&a.label_column)?);
            let preds = (0..t.rows.len()).map(|r| t.number(r, pi, col).map(|v| vec![v])).collect::<candle_core::Result<Vec<_>>>()?;
            let labels = (0..t.rows.len()).map(|r| t.number(r, li, &a.label_column)).collect::<candle_core::Result<Vec<_>>>()?;
            (metrics(Task::Regression, &preds, &labels, 1), labels.len())
        }
        (true, None) => bail!("give --model DIR or --prediction-column NAME"),
    };
    if a.json {
        let mut o = serde_json::Map::new();
        for (k, v) in &m {
            o.insert(k.clone(), serde_json::json!(v));
        }
        o.insert("n".into(), serde_json::json!(n));
        println!("{}", serde_json::Value::Object(o));
    } else {
        println!("{n} sequences from {}", a.input.display());
        for (k, v) in &m {
            println!("{k:<9} {v:.4}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct SplitArgs {
    /// CSV/TSV/FASTA to split by rows.
    input: PathBuf,
    /// Fraction held out as the test set.
    #[arg(long, default_value_t = 0.3)]
    test_fraction: f64,
    /// Fraction of the rest held out for validation.
    #[arg(long, default_value_t = 0.1)]
    valid_fraction: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: train.csv, valid.csv, test.csv.
    #[arg(long)]
    out: PathBuf,
}

pub fn split_cmd(a: SplitArgs) -> Result<()> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    if !(0.0..1.0).contains(&a.test_fraction) || !(0.0..1.0).contains(&a.valid_fraction) {
        bail!("--test-fraction and --valid-fraction must be in [0, 1)");
    }
    let t = Table::read(&a.input)?;
    let mut idx: Vec<usize> = (0..t.rows.len()).collect();
    let mut rng = StdRng::seed_from_u64(a.seed);
    for i in (1..idx.len()).rev() {
        idx.swap(i, rng.random_range(0..=i));
    }
    let n_test = (a.test_fraction * idx.len() as f64).round() as usize;
    let n_valid = (a.valid_fraction * (idx.len() - n_test) as f64).round() as usize;
    std::fs::create_dir_all(&a.out)?;
    let parts = [("test.csv", &idx[..n_test]), ("valid.csv", &idx[n_test..n_test + n_valid]), ("train.csv", &idx[n_test + n_valid..])];
    for (name, ids) in parts {
        let rows: Vec<Vec<String>> = ids.iter().map(|&i| t.rows[i].clone()).collect();
        Table::write_csv(&a.out.join(name), &t.header, &rows)?;
        println!("{}: {} rows", a.out.join(name).display(), rows.len());
    }
    Ok(())
}
