//! DNA models through `ouro train`: the character tokenizer, masked-LM pretraining of every bidirectional
//! architecture (Caduceus-PS/-Ph, Hydra, the matrix-mixer encoder, the bidirectional Transformer), and the
//! property Caduceus-PS is built for: after training, the checkpoint is still exactly reverse-complement
//! equivariant (weights are shared between strands by construction, not by luck of initialisation).

use candle_core::{Device, IndexOp, Tensor};
use ouro_nn::tokenizer::Tokenizer;
use ouro_train::config::TrainConfig;
use ouro_train::train::train;
use std::path::{Path, PathBuf};

mod common;
use common::tmp;

/// Random DNA documents with a planted motif (something to learn), lower case and line breaks included.
fn corpus(dir: &Path) -> PathBuf {
    let c = dir.join("genome");
    std::fs::create_dir_all(&c).unwrap();
    let mut s = 12345u64;
    for i in 0..5 {
        let mut text = String::new();
        for j in 0..3000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push(b"ACGTacgt"[(s >> 61) as usize] as char);
            if j % 80 == 79 {
                text.push_str(if j % 400 == 399 { "GATTACAGATTACA\n" } else { "\n" });
            }
        }
        std::fs::write(c.join(format!("chr{i}.txt")), text).unwrap();
    }
    c
}

fn config(model: &str, corpus: &Path, out: &Path, rc_augment: bool) -> TrainConfig {
    let text = format!(
        r#"
[model]
{model}
d_model = 16
n_layer = 2
d_state = 4
headdim = 8
n_heads = 2

[data]
corpus = "{}"
tokenizer = "dna"
seq_len = 40
valid_fraction = 0.2

[train]
objective = "masked"
rc_augment = {rc_augment}
batch_size = 4
steps = 6
lr = 3e-3
warmup = 2
eval_every = 3
eval_tokens = 160
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

/// Complement on token ids: A(7) ↔ T(10), C(8) ↔ G(9), everything else fixed.
fn comp(v: usize) -> usize {
    match v {
        7 => 10,
        10 => 7,
        8 => 9,
        9 => 8,
        _ => v,
    }
}

#[test]
fn dna_tokenizer() {
    let t = Tokenizer::Dna;
    assert_eq!(t.encode("ACgt\nNx").unwrap(), vec![7, 8, 9, 10, 11, 6]);
    assert_eq!(t.decode(&[7, 8, 9, 10, 11, 3]).unwrap(), "ACGTN[MASK]");
    assert_eq!(t.vocab_size(), 12);
    assert_eq!(t.token_id("[MASK]"), Some(3));
}

#[test]
fn caduceus_ps_stays_rc_equivariant_after_training() {
    let dir = tmp("dna-ps");
    let c = corpus(&dir);
    let cfg = config("arch = \"caduceus\"\nrcps = true", &c, &dir.join("run"), false);
    let out = train(&cfg, &Device::Cpu, false, false, None, &mut |_| {}).unwrap();
    assert!(out.final_val_loss.unwrap().is_finite());
    let ck = ouro_nn::checkpoint::Checkpoint::open(dir.join("run/checkpoint")).unwrap();
    let m = ouro_nn::lm::load(&ck, &Device::Cpu).unwrap();
    assert!(m.is_bidirectional());
    // The checkpoint names its tokenizer: DNA.
    let tok = Tokenizer::for_checkpoint(&ck, None).unwrap();
    let x = tok.encode("ACGTTGCANNACGGATTACAGCCT").unwrap();
    let rc: Vec<u32> = x.iter().rev().map(|&v| comp(v as usize) as u32).collect();
    let dev = Device::Cpu;
    let lx = m.forward(&Tensor::new(x.as_slice(), &dev).unwrap().unsqueeze(0).unwrap(), None, None).unwrap().i(0).unwrap();
    let lrc = m.forward(&Tensor::new(rc.as_slice(), &dev).unwrap().unsqueeze(0).unwrap(), None, None).unwrap().i(0).unwrap();
    let (l, v) = lx.dims2().unwrap();
    let (a, b) = (lx.to_vec2::<f32>().unwrap(), lrc.to_vec2::<f32>().unwrap());
    let mut worst = 0f32;
    for t in 0..l {
        for k in 0..v {
            // logits(rc(x))[t, k] = logits(x)[L−1−t, comp(k)]
            worst = worst.max((b[t][k] - a[l - 1 - t][comp(k)]).abs());
        }
    }
    assert!(worst <= 1e-5, "trained Caduceus-PS is not RC-equivariant: max |Δ| = {worst}");
    // And the model learned something: logits differ between strands of a non-palindrome.
    assert!((&lx - &lrc).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_bidirectional_architecture_trains_on_dna() {
    let dir = tmp("dna-archs");
    let c = corpus(&dir);
    for (name, model, rc) in [
        ("caduceus-ph", "arch = \"caduceus\"\nbidirectional_strategy = \"ew_multiply\"", true),
        ("hydra", "arch = \"hydra\"", true),
        ("toeplitz", "arch = \"mixer\"\nmixer = \"toeplitz\"", false),
        ("quasiseparable-di", "arch = \"mixer\"\nmixer = \"quasiseparable\"\ndata_dependent = false", false),
        ("bert", "arch = \"bert\"", true),
    ] {
        let cfg = config(model, &c, &dir.join(name), rc);
        let out = train(&cfg, &Device::Cpu, false, false, None, &mut |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
        let loss = out.final_val_loss.unwrap();
        // Masked-LM loss starts near ln(vocab); it must be finite and below uniform-over-16.
        assert!(loss.is_finite() && loss < (16f64).ln(), "{name}: validation loss {loss}");
        let ck = ouro_nn::checkpoint::Checkpoint::open(dir.join(name).join("checkpoint")).unwrap();
        let m = ouro_nn::lm::load(&ck, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(m.is_bidirectional(), "{name}");
        // Features at the training length (data-independent mixers learn a fixed L×L matrix).
        let ids: Vec<u32> = (0..40).map(|i| 7 + (i * 7 % 5) as u32).collect();
        let f = m.features(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
        assert_eq!(f.dims()[..2], [1, 40], "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dna_config_errors_are_clear() {
    let dir = tmp("dna-bad");
    let c = corpus(&dir);
    let mut cfg = config("arch = \"caduceus\"\nrcps = true", &c, &dir.join("run"), false);
    cfg.data.tokenizer = "bytes".into();
    let e = cfg.validate().err().unwrap().to_string();
    assert!(e.contains("rcps") && e.contains("dna"), "{e}");
    let mut cfg = config("arch = \"hydra\"", &c, &dir.join("run"), false);
    cfg.train.objective = "causal".into();
    let e = cfg.validate().err().unwrap().to_string();
    assert!(e.contains("masked"), "{e}");
    let mut cfg = config("arch = \"mamba2\"", &c, &dir.join("run"), true);
    cfg.data.tokenizer = "bytes".into();
    cfg.train.objective = "causal".into();
    let e = cfg.validate().err().unwrap().to_string();
    assert!(e.contains("rc_augment"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Labelled DNA: 30-nt random sequences, class 1 when the motif GATTACA is planted (on either strand).
fn labelled(n: usize, seed: u64) -> ouro_train::seqfit::Examples {
    let mut s = seed;
    let mut rnd = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    let (mut seqs, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let mut x: Vec<u8> = (0..30).map(|_| (rnd() % 4) as u8).collect();
        if i % 2 == 1 {
            let motif: Vec<u8> = "GATTACA".bytes().map(|b| b"ACGT".iter().position(|&c| c == b).unwrap() as u8).collect();
            let motif = if rnd() % 2 == 0 { motif } else { ouro_train::seqfit::reverse_complement(&motif) };
            let at = rnd() % 23;
            x[at..at + 7].copy_from_slice(&motif);
        }
        seqs.push(x);
        labels.push((i % 2) as f64);
    }
    ouro_train::seqfit::Examples { seqs, labels }
}

#[test]
fn fine_tuning_a_pretrained_backbone_keeps_rc_symmetry() {
    use ouro_train::seqfit::{fit, reverse_complement, Alphabet, Examples, FitOptions, Fitted, ModelSpec, Task};
    let dir = tmp("dna-finetune");
    let c = corpus(&dir);
    let (train_ex, valid_ex) = (labelled(192, 1), labelled(64, 2));
    let rc_ex = Examples { seqs: valid_ex.seqs.iter().map(|s| reverse_complement(s)).collect(), labels: valid_ex.labels.clone() };
    // Caduceus-PS (equivariant: pooled features are RC-invariant) and Caduceus-Ph (post-hoc conjoining).
    // Caduceus-PS once more with center pooling: the middle position(s) of x and rc(x) map onto each other.
    for (name, model, conjoin, pool) in [
        ("ps", "arch = \"caduceus\"\nrcps = true", false, "mean"),
        ("ph", "arch = \"caduceus\"", true, "mean"),
        ("ps-center", "arch = \"caduceus\"\nrcps = true", false, "center"),
    ] {
        let run = dir.join(format!("pretrain-{name}"));
        train(&config(model, &c, &run, !conjoin), &Device::Cpu, false, false, None, &mut |_| {}).unwrap();
        let ck = run.join("checkpoint");
        let backbone: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
        let mut spec = ModelSpec::simple("backbone", 16, "learned", 0.0);
        spec.backbone = Some(backbone);
        spec.rc_augment = conjoin;
        spec.conjoin = conjoin;
        spec.pool = pool.into();
        let opts = FitOptions { target: Default::default(), init: Some(ck), epochs: 6, batch_size: 16, lr: 5e-3, weight_decay: 0.0, seed: 0, progress: false, checkpoint: None };
        let mut lines = Vec::new();
        let fitted = fit(&train_ex, &valid_ex, Task::Classification, Alphabet::Dna, vec!["no".into(), "motif".into()], spec, ("sequence", "label"), &opts, &Device::Cpu, &mut |l| lines.push(l.to_string())).unwrap();
        assert!(lines.iter().any(|l| l.contains("initialised from")), "{name}: {lines:?}");
        let p = fitted.predict(&valid_ex, &Device::Cpu).unwrap();
        let prc = fitted.predict(&rc_ex, &Device::Cpu).unwrap();
        let worst = p.iter().flatten().zip(prc.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        assert!(worst <= 1e-5, "{name}: P(class | x) and P(class | rc(x)) differ by {worst}");
        // The motif is learnable: better than chance on held-out sequences.
        let (metric, acc) = &fitted.cfg.best_metric;
        assert!(metric == "accuracy" && (pool == "center" || *acc > 0.6), "{name}: {metric} {acc}; {lines:?}");
        // Save and load give the same predictions.
        let out = dir.join(format!("fitted-{name}"));
        fitted.save(&out).unwrap();
        let again = Fitted::load(&out, &Device::Cpu).unwrap().predict(&valid_ex, &Device::Cpu).unwrap();
        assert_eq!(p, again, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
