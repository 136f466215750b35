//! Hybrid layer patterns (NVIDIA's Mamba-2-Hybrid / Nemotron-H: `M` Mamba-2, `*` attention, `-` MLP) from an
//! `ouro train` TOML config: the run trains (loss falls), its checkpoint is a `nemotron_h` model that loads back
//! to the same logits and decodes token by token (SSM state for M, KV cache for *, nothing for -) exactly as
//! its full forward; bad patterns are errors naming the file and the character.

use candle_core::{Device, Tensor};
use ouro_kernels::testing::assert_close;
use ouro_nn::checkpoint::Checkpoint;
use ouro_nn::lm::{load, Cache, LanguageModel, LayerCache};
use ouro_train::config::TrainConfig;
use ouro_train::model::Trainable;
use ouro_train::train::{read_metrics, train};
use std::path::Path;

mod common;
use common::tmp;

fn toml(pattern: &str, n_layer: usize, corpus: &Path, out: &Path) -> String {
    format!(
        r#"
[model]
arch = "hybrid"
pattern = "{pattern}"
d_model = 32
n_layer = {n_layer}
d_state = 8
headdim = 8
n_heads = 4
n_kv_heads = 2
intermediate_size = 64

[data]
corpus = "{}"
seq_len = 32
valid_fraction = 0.2

[train]
batch_size = 4
steps = 12
lr = 1e-2
warmup = 2
eval_every = 12
eval_tokens = 256
save_every = 12
samples = 0
out = "{}"
"#,
        corpus.display(),
        out.display()
    )
}

/// Prefill of `prefill` tokens, then one token at a time.
fn decode(model: &dyn LanguageModel, ids: &Tensor, prefill: usize) -> (Tensor, Cache) {
    let (b, l) = ids.dims2().unwrap();
    let mut cache = model.new_cache(b).unwrap();
    let mut rows = vec![model.forward(&ids.narrow(1, 0, prefill).unwrap(), None, Some(&mut cache)).unwrap()];
    for t in prefill..l {
        rows.push(model.step(&ids.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &mut cache).unwrap().unsqueeze(1).unwrap());
    }
    (Tensor::cat(&rows, 1).unwrap(), cache)
}

#[test]
fn hybrid_pattern_trains_saves_loads_and_decodes() {
    let dir = tmp("hybrid");
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for i in 0..4 {
        let text: String = (0..300).map(|j| format!("line {j} of document {i}: the quick brown fox.\n")).collect();
        std::fs::write(corpus.join(format!("doc{i}.txt")), text).unwrap();
    }
    let file = dir.join("hybrid.toml");
    std::fs::write(&file, toml("M-*M-", 5, &corpus, &dir.join("run"))).unwrap();
    let cfg = TrainConfig::from_file(&file).unwrap();
    train(&cfg, &Device::Cpu, false, false, None, &mut |_| {}).unwrap();

    // The loss falls.
    let losses: Vec<f64> = read_metrics(&dir.join("run/metrics.jsonl")).unwrap().iter().filter_map(|m| m.loss).collect();
    assert_eq!(losses.len(), 12);
    let (first, last) = (losses[..3].iter().sum::<f64>() / 3.0, losses[9..].iter().sum::<f64>() / 3.0);
    assert!(last < first - 0.3, "loss did not fall: {losses:?}");

    // The checkpoint is an HF Nemotron-H config with the pattern, and loads as the hybrid it describes.
    let ck = Checkpoint::open(dir.join("run/checkpoint")).unwrap();
    assert_eq!(ck.config["model_type"], "nemotron_h");
    assert_eq!(ck.config["hybrid_override_pattern"], "M-*M-");
    let model = load(&ck, &Device::Cpu).unwrap();
    let info = model.info();
    assert_eq!(info.layer_kinds, ["mamba2", "mlp", "attention", "mamba2", "mlp"]);
    assert_eq!(info.kv_floats_per_token, 2 * 2 * 8);
    assert!(info.state_floats_per_seq > 0);

    // Prefill + steps equal the full forward: SSM state for M, KV cache for *, nothing for -.
    let ids = Tensor::from_vec((0..40u32).map(|i| (i * 37 + 11) % 256).collect::<Vec<_>>(), (2, 20), &Device::Cpu).unwrap();
    let full = model.forward(&ids, None, None).unwrap();
    let (dec, cache) = decode(model.as_ref(), &ids, 7);
    assert_close(&dec, &full, 1e-4, "hybrid decode vs forward");
    assert_eq!(cache.seqlen, 20);
    assert!(matches!(cache.layers[0], LayerCache::Mamba2(_)) && matches!(cache.layers[2], LayerCache::Attention(_)));
    assert!(matches!(cache.layers[1], LayerCache::None) && matches!(cache.layers[4], LayerCache::None));

    // The training-side model over the checkpoint's weights is the loaded model.
    let tr = Trainable::new(ck.config.clone(), &Device::Cpu).unwrap();
    tr.load_weights(&ck).unwrap();
    assert_close(&tr.model.forward(&ids, None, None).unwrap(), &full, 1e-6, "trainable vs loaded");

    // Save → load gives the same logits for a freshly initialised model too.
    let fresh = Trainable::new(ck.config.clone(), &Device::Cpu).unwrap();
    fresh.init(7).unwrap();
    let saved = dir.join("fresh");
    std::fs::create_dir_all(&saved).unwrap();
    std::fs::write(saved.join("config.json"), serde_json::to_string(&fresh.config).unwrap()).unwrap();
    fresh.varmap.save(saved.join("model.safetensors")).unwrap();
    let back = load(&Checkpoint::open(&saved).unwrap(), &Device::Cpu).unwrap();
    assert_close(&back.forward(&ids, None, None).unwrap(), &fresh.model.forward(&ids, None, None).unwrap(), 1e-6, "saved vs in-memory");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_hybrid_patterns_are_clear_errors() {
    let dir = tmp("hybrid-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    let err = |text: String| {
        std::fs::write(&f, text).unwrap();
        TrainConfig::from_file(&f).expect_err("config accepted").to_string()
    };
    let (c, o) = (dir.join("corpus"), dir.join("out"));
    let e = err(toml("M-X*", 4, &c, &o));
    assert!(e.contains("bad.toml") && e.contains("'X'") && e.contains("position 2"), "{e}");
    let e = err(toml("M-E*", 4, &c, &o));
    assert!(e.contains("bad.toml") && e.contains("'E'") && e.contains("mixture-of-experts"), "{e}");
    let e = err(toml("M-*", 4, &c, &o));
    assert!(e.contains("bad.toml") && e.contains("has 3 layers") && e.contains("n_layer is 4"), "{e}");
    let e = err(toml("M-*M", 4, &c, &o).replace("pattern = \"M-*M\"\n", ""));
    assert!(e.contains("bad.toml") && e.contains("needs model.pattern"), "{e}");
    let e = err(toml("M-*M", 4, &c, &o).replace("arch = \"hybrid\"", "arch = \"mamba2\""));
    assert!(e.contains("bad.toml") && e.contains("model.pattern goes with arch = \"hybrid\""), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
