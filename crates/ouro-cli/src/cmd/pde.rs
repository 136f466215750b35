//! `ouro pde generate | train | evaluate`: Kuramoto–Sivashinsky and Burgers trajectories, and the neural
//! operators (FNO, FFNO, MemNO) trained on them.

use anyhow::{bail, Result};
use ouro_nn::fno::{OperatorConfig, OperatorKind};
use ouro_train::operator::{train, EpochMetric, TrainOptions, TrainedOperator, Trajectories};
use ouro_train::pde::{generate, save, Equation, GenerateOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum Pde {
    /// Solves a 1-D periodic PDE from random smooth initial conditions (ETDRK4 pseudo-spectral on --grid points)
    /// and saves the trajectories resampled to each --resolution as safetensors (`u_R`: samples × frames × R).
    Generate(GenerateArgs),
    /// Trains a neural operator (fno, ffno, memno) for next-frame prediction on `u_R` of a data file; saves the
    /// model, metrics.jsonl and curves.svg in --out, and prints the test trajectory nRMSE.
    Train(TrainArgs),
    /// Prints the trajectory nRMSE (autoregressive rollout from the first frame, and one step from the true
    /// history) of a trained operator on a data file.
    Evaluate(EvaluateArgs),
    /// Collects the `ks-NU-R-MODEL.json` results of scripts/experiments/memno.sh in a folder: prints the
    /// markdown table (rollout nRMSE by viscosity and resolution, one column per model) and draws nRMSE against
    /// resolution, one panel per viscosity, as SVG.
    Summarize(SummarizeArgs),
}

#[derive(clap::Args)]
pub struct SummarizeArgs {
    #[arg(long)]
    runs: PathBuf,
    /// SVG to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training trajectories (safetensors from `ouro pde generate` or `ouro data fetch burgers-lowres`).
    #[arg(long)]
    train: PathBuf,
    /// Test trajectories; without it the last --holdout fraction of --train is held out.
    #[arg(long)]
    test: Option<PathBuf>,
    #[arg(long, default_value_t = 0.1)]
    holdout: f64,
    /// Grid size to train on (the file's `u_R`); needed when the file has several.
    #[arg(long)]
    resolution: Option<usize>,
    /// fno, ffno or memno (FFNO with an S4D memory over time, the paper's S4FFNO).
    #[arg(long, default_value = "ffno")]
    model: String,
    #[arg(long, default_value_t = 64)]
    width: usize,
    #[arg(long, default_value_t = 16)]
    modes: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// MemNO: memory layer position (after this many operator layers).
    #[arg(long, default_value_t = 2)]
    memory_after: usize,
    /// MemNO: S4D state size.
    #[arg(long, default_value_t = 64)]
    d_state: usize,
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score the test rollout every N epochs.
    #[arg(long, default_value_t = 10)]
    eval_every: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the final scores as JSON.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct EvaluateArgs {
    /// A folder written by `ouro pde train`.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    json: bool,
}

/// The test set: --test, or the tail of the training file.
fn split(a: &TrainArgs) -> Result<(Trajectories, Trajectories)> {
    let all = Trajectories::load(&a.train, a.resolution)?;
    if let Some(t) = &a.test {
        let test = Trajectories::load(t, Some(all.resolution))?;
        return Ok((all, test));
    }
    let n = all.samples();
    let k = ((n as f64) * a.holdout).round() as usize;
    if !(0.0..1.0).contains(&a.holdout) || k == 0 || k >= n {
        bail!("{}: cannot hold out {} of {n} trajectories; pass --test FILE or a --holdout in (0, 1)", a.train.display(), a.holdout);
    }
    let part = |s: usize, len: usize| -> Result<Trajectories> { Ok(Trajectories { u: all.u.narrow(0, s, len)?, resolution: all.resolution, meta: all.meta.clone() }) };
    Ok((part(0, n - k)?, part(n - k, k)?))
}

fn report(label: &str, s: &ouro_train::operator::Scores, extra: serde_json::Value, json: bool) {
    if json {
        let mut v = serde_json::json!({"rollout_nrmse": s.rollout_nrmse, "one_step_nrmse": s.one_step_nrmse});
        if let (Some(m), serde_json::Value::Object(x)) = (v.as_object_mut(), extra) {
            m.extend(x);
        }
        println!("{v}");
    } else {
        println!("{label}: nRMSE rollout {:.4}, one step {:.4}", s.rollout_nrmse, s.one_step_nrmse);
    }
}

fn curves(out: &Path, m: &[EpochMetric], name: &str) -> Result<()> {
    use ouro_train::plot::{plot_panels, Panel};
    let loss: Vec<(f64, f64)> = m.iter().map(|e| (e.epoch as f64, e.train_loss)).collect();
    let roll: Vec<(f64, f64)> = m.iter().filter_map(|e| e.test_rollout_nrmse.map(|v| (e.epoch as f64, v))).collect();
    let one: Vec<(f64, f64)> = m.iter().filter_map(|e| e.test_one_step_nrmse.map(|v| (e.epoch as f64, v))).collect();
    plot_panels(
        &[
            Panel { title: format!("{name}: training loss (normalised MSE)"), x_desc: "epoch".into(), y_desc: "loss".into(), log_y: true, series: vec![("train".into(), loss)] },
            Panel { title: "test trajectory nRMSE".into(), x_desc: "epoch".into(), y_desc: "nRMSE".into(), log_y: true, series: vec![("rollout".into(), roll), ("one step".into(), one)] },
        ],
        out,
    )?;
    Ok(())
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// ks (u_t + u u_x + u_xx + ν u_xxxx = 0) or burgers (u_t + u u_x = ν u_xx).
    #[arg(long)]
    equation: String,
    /// ν.
    #[arg(long)]
    viscosity: f64,
    #[arg(long)]
    samples: usize,
    /// Saved grid sizes, comma-separated (e.g. 32,48,64,96,128).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    resolution: Vec<usize>,
    /// Solver grid points.
    #[arg(long, default_value_t = 512)]
    grid: usize,
    /// Domain length (periodic).
    #[arg(long, default_value_t = 2.0 * std::f64::consts::PI)]
    length: f64,
    /// Saved frames, evenly spaced over [0, t_end] (both ends included).
    #[arg(long, default_value_t = 25)]
    frames: usize,
    #[arg(long, default_value_t = 2.5)]
    t_end: f64,
    /// Largest solver time step.
    #[arg(long, default_value_t = 1e-3)]
    max_dt: f64,
    /// Gaussian observation noise, as a fraction of each sample's standard deviation (the clean fields are
    /// saved too, as `u_clean_R`).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(p: Pde) -> Result<()> {
    match p {
        Pde::Generate(a) => {
            let mut o = GenerateOptions::new(Equation::parse(&a.equation)?, a.viscosity, a.samples, a.resolution.clone());
            o.grid = a.grid;
            o.length = a.length;
            o.frames = a.frames;
            o.t_end = a.t_end;
            o.max_dt = a.max_dt;
            o.noise = a.noise;
            o.seed = a.seed;
            let t0 = std::time::Instant::now();
            let bar = indicatif::ProgressBar::new(a.samples as u64);
            bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} trajectories [{elapsed_precise}<{eta_precise}]").unwrap());
            let d = generate(&o, &mut |i| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            save(&a.out, &o, &d)?;
            eprintln!(
                "{} {} trajectories (ν {}, {} frames to t = {}, grid {}, step {:.2e}) at resolutions {:?} in {:.1} s: {}",
                a.samples,
                a.equation,
                a.viscosity,
                a.frames,
                a.t_end,
                a.grid,
                d.solver_dt,
                a.resolution,
                t0.elapsed().as_secs_f64(),
                a.out.display()
            );
            Ok(())
        }
        Pde::Train(a) => {
            let kind = OperatorKind::parse(&a.model)?;
            let dev = crate::device::parse(&a.device)?;
            let (tr, te) = split(&a)?;
            let cfg = OperatorConfig { width: a.width, modes: a.modes, layers: a.layers, memory_after: a.memory_after, d_state: a.d_state, ..OperatorConfig::new(kind) };
            let o = TrainOptions { epochs: a.epochs, batch_size: a.batch_size, lr: a.lr, seed: a.seed, eval_every: a.eval_every, progress: !a.json, ..Default::default() };
            std::fs::create_dir_all(&a.out)?;
            let mpath = a.out.join("metrics.jsonl");
            let mut mfile = std::fs::File::create(&mpath)?;
            let mut log = Vec::new();
            let model = train(cfg, &tr, &te, &o, &dev, &mut |s| eprintln!("{s}"), &mut |m| {
                writeln!(mfile, "{}", serde_json::to_string(m).unwrap()).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", mpath.display())))?;
                log.push(m.clone());
                Ok(())
            })?;
            let mdir = a.out.join("model");
            model.save(&mdir)?;
            curves(&a.out.join("curves.svg"), &log, &a.model)?;
            let last = log.last().expect("at least one epoch");
            let s = ouro_train::operator::Scores { rollout_nrmse: last.test_rollout_nrmse.unwrap_or(f64::NAN), one_step_nrmse: last.test_one_step_nrmse.unwrap_or(f64::NAN) };
            let extra = serde_json::json!({"model": a.model, "resolution": tr.resolution, "parameters": model.ck.parameters, "train_seconds": last.seconds, "epochs": a.epochs, "viscosity": tr.meta.get("viscosity")});
            report(&format!("test ({} trajectories, {:.0} s training, {} parameters)", te.samples(), last.seconds, model.ck.parameters), &s, extra, a.json);
            if !a.json {
                println!("model: {}, metrics: {}, curves: {}", mdir.display(), mpath.display(), a.out.join("curves.svg").display());
            }
            Ok(())
        }
        Pde::Summarize(a) => summarize(&a),
        Pde::Evaluate(a) => {
            let dev = crate::device::parse(&a.device)?;
            let model = TrainedOperator::load(&a.model, &dev)?;
            let data = Trajectories::load(&a.data, Some(model.ck.resolution))?;
            let s = model.score(&data, &dev)?;
            report(&format!("{} ({} trajectories at resolution {})", a.data.display(), data.samples(), data.resolution), &s, serde_json::json!({"trajectories": data.samples(), "resolution": data.resolution}), a.json);
            Ok(())
        }
    }
}

/// (ν, R, model, seed) → rollout nRMSE, from file names `ks-NU-R-MODEL[-sSEED].json`.
fn summarize(a: &SummarizeArgs) -> Result<()> {
    use ouro_train::plot::{plot_panels, Panel};
    use std::collections::BTreeMap;
    let mut res: BTreeMap<(String, usize, String), Vec<f64>> = BTreeMap::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&a.runs)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    // Seed 0 (no suffix) first, then -s1, -s2, ...
    paths.sort_by_key(|p| { let n = p.file_name().unwrap_or_default().to_string_lossy().to_string(); if n.contains("-s") { n } else { n.replace(".json", "-s0.json") } });
    for p in paths {
        let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
        let Some(stem) = name.strip_prefix("ks-").and_then(|n| n.strip_suffix(".json")) else { continue };
        let parts: Vec<&str> = stem.split('-').collect();
        let (nu, r, model) = match parts[..] {
            [nu, r, m] | [nu, r, m, _] => (nu.to_string(), r.parse::<usize>()?, m.to_string()),
            _ => continue,
        };
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        let x = v["rollout_nrmse"].as_f64().ok_or_else(|| anyhow::anyhow!("{}: no rollout_nrmse", p.display()))?;
        res.entry((nu, r, model)).or_default().push(x);
    }
    if res.is_empty() {
        bail!("{}: no ks-NU-R-MODEL.json results", a.runs.display());
    }
    let mut models: Vec<String> = res.keys().map(|k| k.2.clone()).collect();
    models.sort();
    models.dedup();
    let mut nus: Vec<String> = res.keys().map(|k| k.0.clone()).collect();
    nus.sort_by(|x, y| y.parse::<f64>().unwrap_or(0.0).total_cmp(&x.parse::<f64>().unwrap_or(0.0)));
    nus.dedup();
    let median = |v: &Vec<f64>| {
        let mut s = v.clone();
        s.sort_by(f64::total_cmp);
        if s.len() % 2 == 1 { s[s.len() / 2] } else { 0.5 * (s[s.len() / 2 - 1] + s[s.len() / 2]) }
    };
    println!("| ν | R | {} |", models.iter().map(|m| format!("{m} rollout nRMSE")).collect::<Vec<_>>().join(" | "));
    println!("|---|---|{}", "---|".repeat(models.len()));
    let mut panels = Vec::new();
    for nu in &nus {
        let mut rs: Vec<usize> = res.keys().filter(|k| &k.0 == nu).map(|k| k.1).collect();
        rs.sort();
        rs.dedup();
        for r in &rs {
            let cells: Vec<String> = models
                .iter()
                .map(|m| match res.get(&(nu.clone(), *r, m.clone())) {
                    Some(v) => v.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(" / "),
                    None => "–".into(),
                })
                .collect();
            println!("| {nu} | {r} | {} |", cells.join(" | "));
        }
        let series = models
            .iter()
            .map(|m| (m.clone(), rs.iter().filter_map(|r| res.get(&(nu.clone(), *r, m.clone())).map(|v| (*r as f64, median(v)))).collect::<Vec<_>>()))
            .filter(|s| !s.1.is_empty())
            .collect();
        panels.push(Panel { title: format!("KS, ν = {nu}"), x_desc: "resolution".into(), y_desc: "rollout nRMSE".into(), log_y: true, series });
    }
    plot_panels(&panels, &a.out)?;
    eprintln!("plot: {}", a.out.display());
    Ok(())
}
