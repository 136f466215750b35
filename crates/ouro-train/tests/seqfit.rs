//! `ouro fit` internals: metrics against hand-computed values, bad input, and Lyra learning a property.

mod common;

use candle_core::{Device, Tensor};
use common::tmp;
use ouro_train::seqfit::{auroc, dropout, examples, fit, metrics, pearson, spearman, Alphabet, Ensemble, Examples, FitOptions, Fitted, ModelSpec, Table, Target, Task};

#[test]
fn metrics_match_hand_computed_values() {
    // Spearman with a tie: ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4) → 4.5 / √(4.5·5).
    assert!((spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]) - 4.5 / (22.5f64).sqrt()).abs() < 1e-12);
    // Pearson: Σdxdy = 5, Σdx² = 2, Σdy² = 38/3.
    assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 7.0]) - 5.0 / (2.0 * 38.0 / 3.0f64).sqrt()).abs() < 1e-12);
    // The ROC example of scikit-learn's docs: 0.75; ties count half.
    assert!((auroc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]) - 0.75).abs() < 1e-12);
    assert!((auroc(&[0.5, 0.5], &[false, true]) - 0.5).abs() < 1e-12);
    // Classification: predictions 0, 1, 1, 2 for labels 0, 1, 2, 2 → accuracy 3/4, per-class F1 1, 2/3, 2/3.
    let preds = vec![vec![0.8, 0.1, 0.1], vec![0.1, 0.8, 0.1], vec![0.2, 0.5, 0.3], vec![0.1, 0.2, 0.7]];
    let m = metrics(Task::Classification, &preds, &[0.0, 1.0, 2.0, 2.0], 3);
    let get = |k: &str| m.iter().find(|(n, _)| n == k).unwrap().1;
    assert!((get("accuracy") - 0.75).abs() < 1e-12);
    assert!((get("f1") - (1.0 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    let m = metrics(Task::Regression, &[vec![1.0], vec![2.0], vec![4.0]], &[1.0, 3.0, 4.0], 0);
    let get = |k: &str| m.iter().find(|(n, _)| n == k).unwrap().1;
    assert!((get("mse") - 1.0 / 3.0).abs() < 1e-12 && (get("spearman") - 1.0).abs() < 1e-12);
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn read_examples(path: &std::path::Path, task: Task) -> Result<Examples, String> {
    let t = Table::read(path).map_err(|e| e.to_string())?;
    examples(&t, "seq", Some("y"), Alphabet::Protein, task, &mut Vec::new(), false).map_err(|e| e.to_string())
}

#[test]
fn bad_input_is_reported_with_the_file_and_row() {
    let dir = tmp("seqfit-bad");
    let cases: [(&str, &str, &[&str]); 6] = [
        ("unknown.csv", "seq,y\nACDE,1.0\nAC1E,2.0\n", &["unknown.csv", "row 3", "unknown character '1'"]),
        ("empty.csv", "seq,y\n", &["empty.csv", "no data rows"]),
        ("nothing.csv", "", &["nothing.csv"]),
        ("columns.csv", "sequence,y\nACDE,1.0\n", &["columns.csv", "seq"]),
        ("label.csv", "seq,y\nACDE,1.0\nACDE,high\n", &["label.csv", "row 3", "'high' is not a number"]),
        ("blank.tsv", "seq\ty\nACDE\t1\n\t2\n", &["blank.tsv", "row 3", "empty sequence"]),
    ];
    for (name, text, needles) in cases {
        let e = read_examples(&write(&dir, name, text), Task::Regression).expect_err(name);
        for n in needles {
            assert!(e.contains(n), "{name}: '{e}' does not mention '{n}'");
        }
    }
    let e = Table::read(&write(&dir, "data.json", "{}")).unwrap_err().to_string();
    assert!(e.contains("data.json") && e.contains("unknown file type"), "{e}");
    let e = Table::read(&dir.join("missing.csv")).unwrap_err().to_string();
    assert!(e.contains("missing.csv"), "{e}");
    // Classes in validation data that training never saw.
    let t = Table::read(&write(&dir, "cls.csv", "seq,y\nACDE,a\nACDE,b\n")).unwrap();
    let mut classes = vec!["a".to_string()];
    let e = examples(&t, "seq", Some("y"), Alphabet::Protein, Task::Classification, &mut classes, true).unwrap_err().to_string();
    assert!(e.contains("'b' was not seen in training"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fasta_labels_come_from_the_headers_and_padding_is_accepted() {
    let dir = tmp("seqfit-fasta");
    let p = write(&dir, "x.fasta", ">s1 y=0.5\nACDE\nFGH\n>s2 y=-1\nJJACDJJ\n");
    let t = Table::read(&p).unwrap();
    let ex = examples(&t, "sequence", Some("y"), Alphabet::Protein, Task::Regression, &mut Vec::new(), false).unwrap();
    assert_eq!(ex.labels, vec![0.5, -1.0]);
    assert_eq!(ex.seqs[0].len(), 7, "sequence lines are joined");
    assert_eq!(ex.seqs[1][0], Alphabet::Protein.size() as u8 + 1, "J is padding");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Protein sequences of mixed lengths whose label is the fraction of hydrophobic residues (I, L, V, F) plus
/// noise: a property a per-position model with pooling can learn.
fn proteins(n: usize, seed: u64) -> Examples {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let alpha = Alphabet::Protein;
    let mut seqs = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let len = 12 + (rnd() % 20) as usize;
        let text: String = (0..len).map(|_| alpha.symbols().as_bytes()[(rnd() % 20) as usize] as char).collect();
        let frac = text.chars().filter(|c| "ILVF".contains(*c)).count() as f64 / len as f64;
        labels.push(frac + 0.02 * ((rnd() % 1000) as f64 / 1000.0 - 0.5));
        seqs.push(alpha.encode(&text, &|| "test".into()).unwrap());
    }
    Examples { seqs, labels }
}

#[test]
fn lyra_learns_a_sequence_property_and_round_trips() {
    let (train, valid) = (proteins(512, 1), proteins(128, 2));
    let (lo, hi) = train.labels.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    for target in [Target::Standardized, Target::Rank] {
        let spec = ModelSpec::simple("lyra", 16, "onehot", 0.0);
        let opts = FitOptions { target, init: None, epochs: 8, batch_size: 32, lr: 5e-3, weight_decay: 0.0, seed: 0, progress: false, checkpoint: None };
        let mut lines = Vec::new();
        let fitted = fit(&train, &valid, Task::Regression, Alphabet::Protein, vec![], spec, ("sequence", "y"), &opts, &Device::Cpu, &mut |l| lines.push(l.to_string())).unwrap();
        let (metric, rho) = &fitted.cfg.best_metric;
        assert!(metric == "spearman" && *rho > 0.8, "{target:?}: {metric} {rho}; {lines:?}");
        let p = fitted.predict(&valid, &Device::Cpu).unwrap();
        let m = metrics(Task::Regression, &p, &valid.labels, 0);
        // The saved epoch is the best one. (Rank targets map back through the training quantiles, clamped at
        // their ends, which can tie a few extreme predictions.)
        let tol = if target == Target::Rank { 2e-3 } else { 1e-9 };
        assert!((m[0].1 - rho).abs() < tol, "{target:?}: {m:?} vs {rho}");
        // Predictions are in label units with either target.
        let mean_p = p.iter().map(|v| v[0]).sum::<f64>() / p.len() as f64;
        assert!(mean_p > lo && mean_p < hi, "{target:?}: mean prediction {mean_p} outside the labels' range [{lo}, {hi}]");
        let dir = tmp(&format!("seqfit-lyra-{target:?}"));
        fitted.save(&dir).unwrap();
        let again = Fitted::load(&dir, &Device::Cpu).unwrap().predict(&valid, &Device::Cpu).unwrap();
        let worst = p.iter().flatten().zip(again.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        assert!(worst < 1e-9, "{target:?}: predictions after save and load differ by {worst}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Inverted dropout on the CPU: about p of the elements zeroed, the rest scaled by 1/(1 − p) (the mean kept),
/// the same mask for the same seed; p = 0 is the identity and p ≥ 1 an error.
#[test]
fn dropout_keeps_the_mean_and_follows_its_seed() {
    use rand::{rngs::StdRng, SeedableRng};
    let x = Tensor::ones((64, 1000), candle_core::DType::F32, &Device::Cpu).unwrap();
    let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let a = v(dropout(&x, 0.2, &mut StdRng::seed_from_u64(7)).unwrap());
    let zeros = a.iter().filter(|&&e| e == 0.0).count() as f64 / a.len() as f64;
    assert!((zeros - 0.2).abs() < 0.01, "zeroed fraction {zeros}");
    assert!(a.iter().all(|&e| e == 0.0 || (e - 1.25).abs() < 1e-6));
    let mean = a.iter().map(|&e| e as f64).sum::<f64>() / a.len() as f64;
    assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    assert_eq!(a, v(dropout(&x, 0.2, &mut StdRng::seed_from_u64(7)).unwrap()));
    assert_ne!(a, v(dropout(&x, 0.2, &mut StdRng::seed_from_u64(8)).unwrap()));
    assert_eq!(v(dropout(&x, 0.0, &mut StdRng::seed_from_u64(7)).unwrap()), v(x.clone()));
    assert!(dropout(&x, 1.0, &mut StdRng::seed_from_u64(7)).is_err());
}

/// `checkpoint`: the folder holds the best epoch as soon as it is reached (an interrupted fit keeps it),
/// and after the fit it is the model that fit returns, epoch and predictions alike.
#[test]
fn checkpoint_folder_holds_the_best_epoch() {
    let (train, valid) = (proteins(128, 5), proteins(48, 6));
    let dir = tmp("seqfit-checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
    let opts = FitOptions { target: Target::Rank, init: None, epochs: 4, batch_size: 32, lr: 5e-3, weight_decay: 0.0, seed: 0, progress: false, checkpoint: Some(dir.clone()) };
    let mut saved_after = Vec::new();
    let f = fit(&train, &valid, Task::Regression, Alphabet::Protein, vec![], ModelSpec::simple("lyra", 8, "onehot", 0.1), ("sequence", "y"), &opts, &Device::Cpu, &mut |line| {
        // Each epoch's line is logged before its checkpoint is written: the folder holds an earlier best.
        if line.starts_with("epoch") {
            saved_after.push(Fitted::load(&dir, &Device::Cpu).ok().map(|m| m.cfg.best_epoch));
        }
    })
    .unwrap();
    assert_eq!(saved_after[0], None, "nothing is written before the first epoch is scored");
    assert!(saved_after[1..].iter().all(|e| e.is_some()), "{saved_after:?}");
    let kept = Fitted::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(kept.cfg.best_epoch, f.cfg.best_epoch);
    let (a, b) = (kept.predict(&valid, &Device::Cpu).unwrap(), f.predict(&valid, &Device::Cpu).unwrap());
    let worst = a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
    assert!(worst < 1e-9, "the kept model predicts {worst} away from the returned one");
    assert!(!dir.with_extension("tmp").exists(), "the temporary folder is renamed away");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An ensemble predicts the mean of its members' predictions (label units), and refuses members of
/// different tasks.
#[test]
fn ensemble_averages_its_members() {
    let (train, valid) = (proteins(128, 3), proteins(48, 4));
    let opts = |seed| FitOptions { target: Target::Rank, init: None, epochs: 2, batch_size: 32, lr: 5e-3, weight_decay: 0.0, seed, progress: false, checkpoint: None };
    let mut dirs = Vec::new();
    let mut preds = Vec::new();
    for seed in [0, 1] {
        let f = fit(&train, &valid, Task::Regression, Alphabet::Protein, vec![], ModelSpec::simple("lyra", 8, "onehot", 0.0), ("sequence", "y"), &opts(seed), &Device::Cpu, &mut |_| {}).unwrap();
        preds.push(f.predict(&valid, &Device::Cpu).unwrap());
        let dir = tmp(&format!("seqfit-ensemble-{seed}"));
        f.save(&dir).unwrap();
        dirs.push(dir);
    }
    assert_ne!(preds[0], preds[1], "members of different seeds differ");
    let e = Ensemble::load(&dirs, &Device::Cpu).unwrap();
    let got = e.predict(&valid, &Device::Cpu).unwrap();
    for (i, g) in got.iter().enumerate() {
        let want = (preds[0][i][0] + preds[1][i][0]) / 2.0;
        assert!((g[0] - want).abs() < 1e-9, "row {i}: {} vs {want}", g[0]);
    }
    assert_eq!(e.parameters(), 2 * e.cfg().parameters);
    // A classifier cannot join a regressor.
    let classes: Vec<f64> = train.labels.iter().map(|&y| if y > 0.2 { 1.0 } else { 0.0 }).collect();
    let ctrain = Examples { seqs: train.seqs.clone(), labels: classes.clone() };
    let cvalid = Examples { seqs: valid.seqs.clone(), labels: valid.labels.iter().map(|&y| if y > 0.2 { 1.0 } else { 0.0 }).collect() };
    let opts = FitOptions { target: Target::Standardized, ..opts(0) };
    let c = fit(&ctrain, &cvalid, Task::Classification, Alphabet::Protein, vec!["0".into(), "1".into()], ModelSpec::simple("lyra", 8, "onehot", 0.0), ("sequence", "y"), &opts, &Device::Cpu, &mut |_| {}).unwrap();
    let cdir = tmp("seqfit-ensemble-class");
    c.save(&cdir).unwrap();
    let err = Ensemble::load(&[dirs[0].clone(), cdir.clone()], &Device::Cpu).err().expect("mixed tasks must fail").to_string();
    assert!(err.contains("seqfit-ensemble-class") && err.contains("Classification") && err.contains("Regression"), "{err}");
    for d in dirs.iter().chain([&cdir]) {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn every_model_handles_padding_anywhere() {
    // Gifford-style sequences: 'J' padding before and after the residues.
    let alpha = Alphabet::Protein;
    let mk = |n: usize, seed: u64| {
        let mut ex = proteins(n, seed);
        for s in ex.seqs.iter_mut() {
            let pad = alpha.encode("JJ", &|| "test".into()).unwrap();
            *s = pad.iter().chain(s.iter()).chain(pad.iter()).cloned().collect();
        }
        ex
    };
    let (train, valid) = (mk(64, 3), mk(32, 4));
    for kind in ["lyra", "cnn", "transformer", "mamba"] {
        let spec = ModelSpec::simple(kind, 16, "onehot", 0.1);
        let opts = FitOptions { target: Target::Rank, init: None, epochs: 1, batch_size: 16, lr: 1e-3, weight_decay: 0.0, seed: 0, progress: false, checkpoint: None };
        let fitted = fit(&train, &valid, Task::Regression, alpha, vec![], spec, ("sequence", "y"), &opts, &Device::Cpu, &mut |_| {}).unwrap_or_else(|e| panic!("{kind}: {e}"));
        // The padding is masked out: the same sequence without it predicts the same.
        let bare = Examples { seqs: valid.seqs.iter().map(|s| s[2..s.len() - 2].to_vec()).collect(), labels: valid.labels.clone() };
        let (p, q) = (fitted.predict(&valid, &Device::Cpu).unwrap(), fitted.predict(&bare, &Device::Cpu).unwrap());
        let worst = p.iter().flatten().zip(q.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        assert!(worst < 1e-4, "{kind}: padded and bare predictions differ by {worst}");
    }
}

/// On a GPU (skipped without one): the device's dropout masks zero about p of the elements and keep the
/// mean, repeat for the same device seed, and a fit with dropout learns the property as on the CPU and repeats
/// for the same seed.
#[cfg(feature = "cuda")]
#[test]
fn gpu_dropout_and_fit_follow_their_seeds() {
    use rand::{rngs::StdRng, SeedableRng};
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            return;
        }
    };
    let x = Tensor::ones((64, 1000), candle_core::DType::F32, &dev).unwrap();
    let mask = |seed: u64| {
        dev.set_seed(seed).unwrap();
        dropout(&x, 0.2, &mut StdRng::seed_from_u64(0)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let a = mask(3);
    let zeros = a.iter().filter(|&&e| e == 0.0).count() as f64 / a.len() as f64;
    assert!((zeros - 0.2).abs() < 0.01, "zeroed fraction {zeros}");
    assert!(a.iter().all(|&e| e == 0.0 || (e - 1.25).abs() < 1e-6));
    assert_eq!(a, mask(3));
    assert_ne!(a, mask(4));
    let (train, valid) = (proteins(512, 1), proteins(128, 2));
    let opts = FitOptions { target: Target::Rank, init: None, epochs: 8, batch_size: 32, lr: 5e-3, weight_decay: 0.0, seed: 0, progress: false, checkpoint: None };
    let run = || fit(&train, &valid, Task::Regression, Alphabet::Protein, vec![], ModelSpec::simple("lyra", 16, "onehot", 0.1), ("sequence", "y"), &opts, &dev, &mut |_| {}).unwrap();
    let (f1, f2) = (run(), run());
    let rho = f1.cfg.best_metric.1;
    assert!(rho > 0.8, "validation spearman {rho}");
    let (p1, p2) = (f1.predict(&valid, &dev).unwrap(), f2.predict(&valid, &dev).unwrap());
    let worst = p1.iter().flatten().zip(p2.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
    assert!(worst < 1e-5, "two fits with seed 0 differ by {worst}");
}
