//! The training loop on tiny settings: a run interrupted and resumed gives the same losses and weights,
//! bit for bit, as one uninterrupted run; checkpoints load with the inference loaders; the synthetic
//! tasks and the masked objective run; bad configs are clear errors.

use candle_core::Device;
use ouro_train::config::TrainConfig;
use ouro_train::train::{read_metrics, train};
use std::path::{Path, PathBuf};

mod common;
use common::tmp;

/// A tiny corpus of several documents.
fn corpus(dir: &Path) -> PathBuf {
    let c = dir.join("corpus");
    std::fs::create_dir_all(&c).unwrap();
    for i in 0..6 {
        let text: String = (0..400).map(|j| format!("line {j} of document {i}: the quick brown fox.\n")).collect();
        std::fs::write(c.join(format!("doc{i}.txt")), text).unwrap();
    }
    c
}

fn config(arch: &str, corpus: &Path, out: &Path, objective: &str) -> TrainConfig {
    let text = format!(
        r#"
[model]
arch = "{arch}"
d_model = 32
n_layer = 2
d_state = 8
headdim = 8
n_heads = 2
window = 8

[data]
corpus = "{}"
seq_len = 32
valid_fraction = 0.2

[train]
objective = "{objective}"
batch_size = 4
grad_accum = 2
steps = 8
lr = 3e-3
warmup = 2
eval_every = 4
eval_tokens = 256
save_every = 3
samples = 0
out = "{}"
"#,
        corpus.display(),
        out.display()
    );
    let c: TrainConfig = toml::from_str(&text).unwrap();
    c.validate().unwrap();
    c
}

fn losses(run: &Path) -> Vec<(usize, u64)> {
    read_metrics(&run.join("metrics.jsonl")).unwrap().iter().filter_map(|m| m.loss.map(|l| (m.step, l.to_bits()))).collect()
}

#[test]
fn resume_is_bit_for_bit() {
    for arch in ["mamba2", "llama", "mamba", "griffin"] {
        let dir = tmp(&format!("resume-{arch}"));
        let c = corpus(&dir);
        let full = config(arch, &c, &dir.join("full"), "causal");
        train(&full, &Device::Cpu, false, false, None, &mut |_| {}).unwrap();
        let split = config(arch, &c, &dir.join("split"), "causal");
        // Interrupted after step 5 (the last checkpoint is at step 5), then resumed.
        train(&split, &Device::Cpu, false, false, Some(5), &mut |_| {}).unwrap();
        let e = train(&split, &Device::Cpu, false, false, None, &mut |_| {}).err().unwrap().to_string();
        assert!(e.contains("--resume"), "{e}");
        train(&split, &Device::Cpu, true, false, None, &mut |_| {}).unwrap();
        assert_eq!(losses(&dir.join("full")), losses(&dir.join("split")), "{arch}: losses differ after resume");
        let a = std::fs::read(dir.join("full/checkpoint/model.safetensors")).unwrap();
        let b = std::fs::read(dir.join("split/checkpoint/model.safetensors")).unwrap();
        assert!(a == b, "{arch}: final weights differ after resume");
        // The checkpoint is a model the inference side loads, with the byte tokenizer.
        let ck = ouro_nn::checkpoint::Checkpoint::open(dir.join("full/checkpoint")).unwrap();
        let m = ouro_nn::lm::load(&ck, &Device::Cpu).unwrap();
        assert_eq!(m.info().vocab_size, 256);
        assert!(ouro_nn::tokenizer::Tokenizer::for_checkpoint(&ck, None).is_ok());
        assert!(dir.join("full/loss.svg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bf16_mixed_precision_tracks_f32() {
    // train.bf16: each step on a bf16 copy of the f32 parameters. Same seed and batches as an f32 run: the first
    // loss within 1% of f32's (bf16 rounding of weights and activations), the loss falls as far, the checkpoint
    // stays f32, and every step's gradients reached the parameters (the weights moved as much).
    for arch in ["mamba2", "llama", "mamba", "griffin", "hybrid"] {
        let dir = tmp(&format!("bf16-{arch}"));
        let c = corpus(&dir);
        // hybrid: a Mamba-2 layer and an attention layer, each with an MLP sublayer after it.
        let make = |out: &str| {
            let mut cfg = config(if arch == "hybrid" { "mamba2" } else { arch }, &c, &dir.join(out), "causal");
            if arch == "hybrid" {
                (cfg.model.arch, cfg.model.pattern) = ("hybrid".into(), Some("M-*-".into()));
                cfg.model.n_layer = 4;
                cfg.validate().unwrap();
            }
            cfg
        };
        let f32_run = make("f32");
        let mut bf16_run = make("bf16");
        bf16_run.train.bf16 = true;
        let (a, b) = (train(&f32_run, &Device::Cpu, false, false, None, &mut |_| {}).unwrap(), train(&bf16_run, &Device::Cpu, false, false, None, &mut |_| {}).unwrap());
        let loss = |run: &str| -> Vec<f64> { read_metrics(&dir.join(run).join("metrics.jsonl")).unwrap().iter().filter_map(|m| m.loss).collect() };
        let (lf, lb) = (loss("f32"), loss("bf16"));
        eprintln!("{arch}: f32 {:.4} → {:.4} (val {:.4}), bf16 {:.4} → {:.4} (val {:.4})", lf[0], lf[7], a.final_val_loss.unwrap(), lb[0], lb[7], b.final_val_loss.unwrap());
        assert!((lb[0] - lf[0]).abs() < 0.01 * lf[0], "{arch}: first loss bf16 {} vs f32 {}", lb[0], lf[0]);
        assert!(lb[7] < lb[0] - 0.5 * (lf[0] - lf[7]), "{arch}: bf16 loss {} → {} (f32 {} → {})", lb[0], lb[7], lf[0], lf[7]);
        assert!((b.final_val_loss.unwrap() - a.final_val_loss.unwrap()).abs() < 0.05 * a.final_val_loss.unwrap(), "{arch}: validation loss bf16 {:?} vs f32 {:?}", b.final_val_loss, a.final_val_loss);
        let w = |run: &str| candle_core::safetensors::load(dir.join(run).join("checkpoint/model.safetensors"), &Device::Cpu).unwrap();
        let (wf, wb) = (w("f32"), w("bf16"));
        for (name, t) in &wb {
            assert_eq!(t.dtype(), candle_core::DType::F32, "{arch}: {name} saved as {:?}", t.dtype());
            let diff = (t - &wf[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let moved = wf[name].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 0.1 * moved.max(0.1), "{arch}: {name} differs from the f32 run by {diff} (scale {moved})");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn masked_objective_and_tasks_run() {
    let dir = tmp("masked");
    let c = corpus(&dir);
    let cfg = config("mamba2", &c, &dir.join("mlm"), "masked");
    let out = train(&cfg, &Device::Cpu, false, false, None, &mut |_| {}).unwrap();
    assert!(out.final_val_loss.unwrap().is_finite());
    // Masked checkpoints have the extra mask token.
    let ck = ouro_nn::checkpoint::Checkpoint::open(dir.join("mlm/checkpoint")).unwrap();
    assert_eq!(ouro_nn::lm::load(&ck, &Device::Cpu).unwrap().info().vocab_size, 264);
    for task in ["selective-copying", "induction-heads"] {
        let mut t = config("mamba", Path::new(task), &dir.join(task), "causal");
        t.data.seq_len = 24;
        t.data.eval_lengths = vec![24, 48];
        let out = train(&t, &Device::Cpu, false, false, None, &mut |_| {}).unwrap();
        let acc = out.final_accuracy.unwrap();
        assert_eq!(acc.len(), 2);
        assert!(acc.iter().all(|(_, a)| (0.0..=1.0).contains(a)));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_are_clear_errors() {
    let dir = tmp("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("c.toml");
    std::fs::write(&f, "[model]\narch = \"mamba2\"\nd_model = 8\nn_layer = 1\ncolour = 3\n").unwrap();
    let e = TrainConfig::from_file(&f).err().unwrap().to_string();
    assert!(e.contains("c.toml") && e.contains("colour"), "{e}");
    let c = corpus(&dir);
    let mut cfg = config("mamba2", &c, &dir.join("run"), "causal");
    cfg.model.arch = "gpt".into();
    assert!(cfg.validate().err().unwrap().to_string().contains("gpt"));
    let mut cfg = config("hydra", &c, &dir.join("run"), "masked");
    cfg.train.bf16 = true;
    assert!(cfg.validate().err().unwrap().to_string().contains("train.bf16"));
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cfg = config("mamba2", &empty, &dir.join("run2"), "causal");
    let e = train(&cfg, &Device::Cpu, false, false, None, &mut |_| {}).err().unwrap().to_string();
    assert!(e.contains("no .txt documents"), "{e}");
    std::fs::write(empty.join("a.txt"), "").unwrap();
    let e = train(&cfg, &Device::Cpu, false, false, None, &mut |_| {}).err().unwrap().to_string();
    assert!(e.contains("empty"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corpora_joined_with_plus_load_together() {
    // "a+b": the documents of both folders, names prefixed with their corpus; the split is by whole documents.
    use ouro_nn::tokenizer::Tokenizer;
    use ouro_train::train::load_text;
    let dir = tmp("plus");
    let (a, b) = (dir.join("a"), dir.join("b"));
    for (d, n) in [(&a, 3), (&b, 2)] {
        std::fs::create_dir_all(d).unwrap();
        for i in 0..n {
            std::fs::write(d.join(format!("doc{i}.txt")), format!("{} document {i}\n", d.display()).repeat(50)).unwrap();
        }
    }
    let joined = format!("{}+{}", a.display(), b.display());
    let mut log = Vec::new();
    let (train, valid) = load_text(&joined, &dir, &Tokenizer::Bytes, 0.2, 0, &mut |m| log.push(m.to_string())).unwrap();
    let names: Vec<&String> = train.names.iter().chain(&valid.names).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    for (d, n) in [(&a, 3), (&b, 2)] {
        let prefix = format!("{}/", d.display());
        assert_eq!(names.iter().filter(|x| x.starts_with(&prefix)).count(), n, "{names:?}");
    }
    assert!(!valid.is_empty() && !train.is_empty());
    // One part alone gives the same tokens as that part within the join (documents are not altered).
    let (ta, va) = load_text(&a.display().to_string(), &dir, &Tokenizer::Bytes, 0.0, 0, &mut |_| {}).unwrap();
    assert!(va.is_empty());
    assert_eq!(ta.len(), std::fs::read_dir(&a).unwrap().map(|f| std::fs::read(f.unwrap().path()).unwrap().len()).sum::<usize>());
    // An empty name between '+' is a clear error.
    let err = load_text(&format!("{}++{}", a.display(), b.display()), &dir, &Tokenizer::Bytes, 0.2, 0, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("empty name"), "{err}");
}
