//! The `ouro` binary end to end on the small checkpoints of tests/fixtures (runs in CI).

mod common;
use common::{fixture, ouro, run};

#[test]
fn generate_on_a_random_weight_checkpoint() {
    for model in ["lm/mamba2_hf", "lm/mamba_ssm", "lm/llama_gqa", "lm/llamba"] {
        let (ok, out, err) = run(ouro()
            .args(["generate", "--model"])
            .arg(fixture(model))
            .args(["--prompt", "Hello", "--tokenizer", "bytes", "--max-new-tokens", "6", "--seed", "3"]));
        assert!(ok, "{model}: {err}");
        assert!(out.starts_with("Hello"), "{model}: {out}");
        assert!(err.contains("generated 6 tokens"), "{model}: {err}");
    }
    // Several samples as one batch.
    let (ok, out, err) = run(ouro()
        .args(["generate", "--model"])
        .arg(fixture("lm/mamba2_hf"))
        .args(["--prompt", "ab", "--tokenizer", "bytes", "--max-new-tokens", "4", "--num-samples", "3"]));
    assert!(ok, "{err}");
    assert_eq!(out.matches("--- sample").count(), 3, "{out}");
    assert!(err.contains("generated 12 tokens in 3 sequences"), "{err}");
}

#[test]
fn generate_with_the_gguf_tokenizer() {
    let (ok, out, err) = run(ouro()
        .args(["generate", "--model"])
        .arg(fixture("lm/llama_gguf/tiny-llama-mixed.gguf"))
        .args(["--prompt", "The boat", "--max-new-tokens", "5", "--temperature", "0"]));
    assert!(ok, "{err}");
    assert!(out.starts_with("The boat"), "{out}");
}

#[test]
fn logits_match_the_reference() {
    let dir = std::env::temp_dir().join(format!("ouro-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("logits.safetensors");
    let exp = candle_core::safetensors::load(fixture("lm/llama_tied/expected.safetensors"), &candle_core::Device::Cpu).unwrap();
    let ids: Vec<Vec<i64>> = exp["input_ids"].to_vec2().unwrap();
    let mut cmd = ouro();
    cmd.args(["logits", "--model"]).arg(fixture("lm/llama_tied")).arg("--out").arg(&out);
    for row in &ids {
        cmd.arg("--ids").arg(row.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","));
    }
    let (ok, _, err) = run(&mut cmd);
    assert!(ok, "{err}");
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    ouro_kernels::testing::assert_close(&got["logits"], &exp["logits"], 1e-4, "ouro logits");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn info_describes_the_checkpoint() {
    let (ok, out, err) = run(ouro().args(["info", "--model"]).arg(fixture("lm/mamba2_hybrid_ssm")));
    assert!(ok, "{err}");
    assert!(out.contains("architecture: mamba_ssm"), "{out}");
    assert!(out.contains("mamba2×1 attention×1 mamba2×2"), "{out}");
    assert!(out.contains("kv cache:"), "{out}");
}

#[test]
fn bad_input_errors_clearly() {
    let (ok, _, err) = run(ouro().args(["info", "--model", "/nonexistent/model"]));
    assert!(!ok && err.contains("/nonexistent/model") && err.contains("no such file"), "{err}");
    let (ok, _, err) = run(ouro().args(["logits", "--model"]).arg(fixture("lm/mamba2_hf")).args(["--ids", "1,2,99999", "--out", "/tmp/x.safetensors"]));
    assert!(!ok && err.contains("99999") && err.contains("outside the vocabulary"), "{err}");
    let (ok, _, err) = run(ouro().args(["logits", "--model"]).arg(fixture("lm/mamba2_hf")).args(["--ids", "1,2", "--ids", "3", "--out", "/tmp/x.safetensors"]));
    assert!(!ok && err.contains("same length"), "{err}");
    let (ok, _, err) = run(ouro().args(["generate", "--model"]).arg(fixture("lm/mamba2_hf")).args(["--prompt", "x"]));
    assert!(!ok && err.contains("no tokenizer.json"), "{err}");
    let (ok, _, err) = run(ouro().args(["generate", "--model"]).arg(fixture("lm/mamba2_hf")).args(["--prompt", "x", "--tokenizer", "bytes", "--device", "cuda"]));
    assert!(!ok && (err.contains("CUDA build") || err.contains("cuda")), "{err}");
}

#[test]
fn fit_predict_and_evaluate_end_to_end() {
    let dir = std::env::temp_dir().join(format!("ouro-cli-fit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Label: the number of hydrophobic residues (I, L, V, F); CSV for training, TSV for validation.
    let mut s = 12345u64;
    let mut table = |n: usize, sep: &str| {
        let mut t = format!("seq{sep}y\n");
        for _ in 0..n {
            let len = 8 + (s % 9) as usize;
            let seq: String = (0..len)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    b"ACDEFGHIKLMNPQRSTVWY"[(s >> 33) as usize % 20] as char
                })
                .collect();
            let y = seq.chars().filter(|c| "ILVF".contains(*c)).count();
            t.push_str(&format!("{seq}{sep}{y}\n"));
        }
        t
    };
    let (train, valid) = (dir.join("train.csv"), dir.join("valid.tsv"));
    std::fs::write(&train, table(96, ",")).unwrap();
    std::fs::write(&valid, table(32, "\t")).unwrap();
    let model = dir.join("model");
    let (ok, out, err) = run(ouro()
        .args(["fit", "--train"])
        .arg(&train)
        .arg("--valid")
        .arg(&valid)
        .args(["--sequence-column", "seq", "--label-column", "y", "--task", "regression", "--alphabet", "protein", "--model", "lyra"])
        .args(["--d-model", "16", "--epochs", "2", "--batch-size", "16", "--quiet", "--out"])
        .arg(&model));
    assert!(ok, "{err}");
    assert!(out.contains("best epoch") && out.contains("parameters"), "{out}");
    assert!(err.contains("model lyra") && err.contains("parameters"), "the parameter count is printed: {err}");
    let preds = dir.join("preds.csv");
    let (ok, _, err) = run(ouro().args(["predict", "--model"]).arg(&model).arg("--input").arg(&valid).args(["--sequence-column", "seq", "--out"]).arg(&preds));
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&preds).unwrap();
    assert_eq!(text.lines().next().unwrap(), "seq,y,prediction");
    assert_eq!(text.lines().count(), 33);
    let (ok, out, err) = run(ouro().args(["evaluate", "--model"]).arg(&model).arg("--input").arg(&valid).args(["--sequence-column", "seq", "--label-column", "y", "--json"]));
    assert!(ok, "{err}");
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(m["n"], 32);
    assert!(m["spearman"].is_number() && m["pearson"].is_number() && m["mse"].is_number(), "{m}");
    // An ensemble: --model repeated (here the same folder twice, so the same predictions).
    let (ok, out2, err) = run(ouro().args(["evaluate", "--model"]).arg(&model).arg("--model").arg(&model).arg("--input").arg(&valid).args(["--sequence-column", "seq", "--label-column", "y", "--json"]));
    assert!(ok, "{err}");
    let m2: serde_json::Value = serde_json::from_str(out2.trim()).unwrap();
    assert!((m2["mse"].as_f64().unwrap() - m["mse"].as_f64().unwrap()).abs() < 1e-9, "{m2} vs {m}");
    // Scoring an existing column (a baseline's predictions) with the same metrics: the labels score ρ = 1.
    let (ok, out, err) = run(ouro().args(["evaluate", "--prediction-column", "y", "--label-column", "y", "--json", "--input"]).arg(&preds));
    assert!(ok, "{err}");
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!((m["spearman"].as_f64().unwrap() - 1.0).abs() < 1e-12, "{m}");
    let (ok, _, err) = run(ouro().args(["evaluate", "--prediction-column", "seq", "--label-column", "y", "--input"]).arg(&preds));
    assert!(!ok && err.contains("preds.csv") && err.contains("row 2") && err.contains("is not a number"), "{err}");
    let (ok, _, err) = run(ouro().args(["evaluate", "--label-column", "y", "--input"]).arg(&preds));
    assert!(!ok && err.contains("--model"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_a_builtin_synthetic_task() {
    let dir = std::env::temp_dir().join(format!("ouro-cli-task-{}", std::process::id()));
    let (ok, out, err) = run(ouro().args(["train", "--task", "selective-copying", "--steps", "2", "--quiet", "--threads", "1", "--out"]).arg(&dir));
    assert!(ok, "{err}");
    assert!(err.contains("selective-copying") && out.contains("accuracy at context length 128"), "{out}\n{err}");
    assert!(dir.join("checkpoint/model.safetensors").exists() && dir.join("metrics.jsonl").exists());
    let (ok, _, err) = run(ouro().args(["train", "--task", "copying"]));
    assert!(!ok && err.contains("unknown task 'copying'") && err.contains("induction-heads"), "{err}");
    let (ok, _, err) = run(ouro().args(["train", "--steps", "2"]));
    assert!(!ok && err.contains("--config"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pde_generate_writes_trajectories() {
    let dir = std::env::temp_dir().join(format!("ouro-cli-pde-{}", std::process::id()));
    let out = dir.join("ks.safetensors");
    let (ok, _, err) = run(ouro()
        .args(["pde", "generate", "--equation", "burgers", "--viscosity", "0.1", "--samples", "3", "--resolution", "32,48", "--grid", "128", "--frames", "6", "--t-end", "0.5", "--out"])
        .arg(&out));
    assert!(ok, "{err}");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("u_32").unwrap().shape(), &[3, 6, 32]);
    assert_eq!(st.tensor("u_48").unwrap().shape(), &[3, 6, 48]);
    assert_eq!(st.tensor("t").unwrap().shape(), &[6]);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["equation"], "burgers");
    let (ok, _, err) = run(ouro().args(["pde", "generate", "--equation", "heat", "--viscosity", "0.1", "--samples", "1", "--out"]).arg(&out));
    assert!(!ok && err.contains("unknown equation 'heat'"), "{err}");
    let (ok, _, err) = run(ouro().args(["pde", "generate", "--equation", "ks", "--viscosity", "0.1", "--samples", "1", "--resolution", "1024", "--out"]).arg(&out));
    assert!(!ok && err.contains("resolution 1024"), "{err}");
    // Train a small MemNO on the 32-point fields (last trajectory held out), evaluate it again from its folder.
    let (ok, _, err) = run(ouro().args(["pde", "generate", "--equation", "ks", "--viscosity", "0.1", "--samples", "12", "--resolution", "16", "--grid", "64", "--frames", "6", "--t-end", "0.5", "--out"]).arg(&out));
    assert!(ok, "{err}");
    let run_dir = dir.join("run");
    let (ok, stdout, err) = run(ouro()
        .args(["pde", "train", "--model", "memno", "--width", "8", "--modes", "4", "--layers", "2", "--memory-after", "1", "--d-state", "8", "--epochs", "2", "--batch-size", "4", "--holdout", "0.25", "--json", "--train"])
        .arg(&out)
        .arg("--out")
        .arg(&run_dir));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(v["rollout_nrmse"].as_f64().unwrap().is_finite() && v["resolution"] == 16, "{v}");
    assert!(run_dir.join("curves.svg").exists() && run_dir.join("model/config.json").exists());
    assert_eq!(std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap().lines().count(), 2);
    let (ok, stdout, err) = run(ouro().args(["pde", "evaluate", "--json", "--model"]).arg(run_dir.join("model")).arg("--data").arg(&out));
    assert!(ok, "{err}");
    let e: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(e["trajectories"], 12);
    let (ok, _, err) = run(ouro().args(["pde", "train", "--model", "unet", "--out"]).arg(&run_dir).arg("--train").arg(&out));
    assert!(!ok && err.contains("unknown neural operator 'unet'"), "{err}");
    let (ok, _, err) = run(ouro().args(["pde", "train", "--resolution", "64", "--out"]).arg(&run_dir).arg("--train").arg(&out));
    assert!(!ok && err.contains("no resolution 64 (has [16])"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quantize_then_bench_and_generate() {
    let out = std::env::temp_dir().join(format!("ouro-cli-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (ok, stdout, err) = run(ouro().args(["quantize", "--model"]).arg(fixture("lm/mamba2_q")).args(["--format", "q4_0", "--out"]).arg(&out));
    assert!(ok, "{err}");
    assert!(stdout.contains("in q4_0"), "{stdout}");
    // The engine benchmark on the quantised folder (its stored format wins over --weights).
    let (ok, stdout, err) = run(ouro()
        .args(["--threads", "1", "bench", "--model"])
        .arg(&out)
        .args(["--prompt-len", "20", "--gen-len", "5", "--batch", "3", "--repeats", "1", "--no-bandwidth", "--json"]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["weights"], "q4_0");
    assert_eq!(v["batch"], 3);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0 && v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["state_bytes_per_sequence"].as_u64().unwrap() > 0);
    // Every other command reads the quantised checkpoint.
    let (ok, stdout, err) = run(ouro().args(["generate", "--model"]).arg(&out).args(["--prompt", "ab", "--tokenizer", "bytes", "--max-new-tokens", "3"]));
    assert!(ok, "{err}");
    assert!(stdout.starts_with("ab") && err.contains("[cpu engine, q4_0 weights]"), "{stdout} {err}");
    // Generation through the engine (f32 products) and through the model code agree, greedy, 2 samples.
    let gen = |extra: &[&str]| {
        let (ok, stdout, err) = run(ouro()
            .args(["generate", "--model"])
            .arg(fixture("lm/mamba2_q"))
            .args(["--prompt", "hello", "--tokenizer", "bytes", "--max-new-tokens", "8", "--temperature", "0", "--num-samples", "2"])
            .args(extra));
        assert!(ok, "{err}");
        (stdout, err)
    };
    let (engine, e_err) = gen(&["--no-bf16"]);
    let (generic, g_err) = gen(&["--no-engine"]);
    assert_eq!(engine, generic);
    assert!(e_err.contains("[cpu engine, f32 weights]") && !g_err.contains("cpu engine"), "{e_err} {g_err}");
    let (ok, _, err) = run(ouro().args(["generate", "--no-engine", "--weights", "q8_0", "--prompt", "a", "--model"]).arg(fixture("lm/mamba2_q")));
    assert!(!ok && err.contains("needs the CPU engine"), "{err}");
    // Bad input.
    let (ok, _, err) = run(ouro().args(["quantize", "--model"]).arg(fixture("lm/mamba2_q")).args(["--format", "q5_k", "--out"]).arg(out.join("x")));
    assert!(!ok && err.contains("q5_k"), "{err}");
    let (ok, _, err) = run(ouro().args(["bench", "--model"]).arg(fixture("lm/llama_gqa")).args(["--gen-len", "2", "--no-bandwidth"]));
    assert!(!ok && err.contains("Mamba-2"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn distill_a_tiny_llama_into_llamba_then_generate() {
    // The teacher: a 2-layer Llama GGUF with its BPE tokenizer (4 heads of 16, 2 KV heads).
    let dir = std::env::temp_dir().join(format!("ouro-cli-distill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.txt");
    let line = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun. ";
    std::fs::write(&text, line.repeat(60)).unwrap();
    let student = dir.join("student.toml");
    std::fs::write(&student, "[ssm_cfg]\nd_state = 16\nn_v_heads = 4\nn_qk_heads = 4\n").unwrap();
    let out = dir.join("run");
    let teacher = fixture("lm/llama_gguf/tiny-llama-mixed.gguf");
    let distill = || {
        let mut c = ouro();
        c.args(["distill", "--teacher"]).arg(&teacher).arg("--student-config").arg(&student).arg("--data").arg(&text);
        c.args(["--batch-size", "2", "--seq-len", "32", "--quiet"]);
        c
    };
    let (ok, stdout, err) = run(distill().args(["--stage", "all", "--tokens", "256,256,256", "--eval-tokens", "128", "--out"]).arg(&out));
    assert!(ok, "{err}");
    assert!(err.contains("x ← v_proj (KV heads repeated ×2)"), "{err}");
    let stages: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(stages.as_array().unwrap().len(), 3, "{stdout}");
    for s in stages.as_array().unwrap() {
        assert!(s["last_loss"].as_f64().unwrap().is_finite() && s["student_ppl"].as_f64().unwrap().is_finite(), "{s}");
    }
    for f in ["stage1/config.json", "stage2/model.safetensors", "stage3/tokenizer.json", "metrics.jsonl", "loss.svg", "summary.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // The student runs with `ouro generate`, with the teacher's tokenizer.
    let (ok, gen, err) = run(ouro().args(["generate", "--model"]).arg(out.join("stage3")).args(["--prompt", "The quick", "--max-new-tokens", "5", "--seed", "1"]));
    assert!(ok, "{err}");
    assert!(gen.starts_with("The quick"), "{gen}");
    // Stage 3 alone from the stage-2 student (--init), and a clear error for an unknown config key.
    let (ok, _, err) = run(distill().arg("--init").arg(out.join("stage2")).args(["--stage", "3", "--tokens", "0,0,128", "--eval-tokens", "64", "--out"]).arg(dir.join("run3")));
    assert!(ok, "{err}");
    // A time budget instead of tokens: the step count is fixed from the step time measured first.
    let (ok, stdout, err) = run(distill().args(["--stage", "3", "--seconds", "1,1,0.5", "--eval-tokens", "64", "--out"]).arg(dir.join("timed")));
    assert!(ok, "{err}");
    assert!(err.contains("s per step →"), "{err}");
    let stages: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(stages[0]["steps"].as_u64().unwrap() >= 1, "{stdout}");
    // Paused before its first step (--pause-after), then finished with --resume, which takes the paused
    // run's settings; resuming with nothing paused names the missing file.
    let paused = dir.join("paused");
    let (ok, stdout, err) = run(distill().args(["--stage", "all", "--tokens", "128,128,128", "--eval-tokens", "64", "--pause-after", "1e-9", "--out"]).arg(&paused));
    assert!(ok && stdout.contains("\"paused\"") && err.contains("--resume"), "{stdout} {err}");
    assert!(paused.join("resume/resume.json").exists() && !paused.join("summary.json").exists());
    let (ok, _, err) = run(distill().args(["--resume", "--valid-fraction", "0.3", "--out"]).arg(&paused));
    assert!(!ok && err.contains("--valid-fraction 0.1") && err.contains("run.json"), "{err}");
    let (ok, stdout, err) = run(distill().args(["--resume", "--out"]).arg(&paused));
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(stdout.trim()).unwrap().as_array().unwrap().len(), 3, "{stdout}");
    assert!(paused.join("summary.json").exists() && !paused.join("resume").exists());
    let (ok, _, err) = run(distill().args(["--resume", "--out"]).arg(&paused));
    assert!(!ok && err.contains("resume.json"), "{err}");
    let (ok, _, err) = run(distill().args(["--stage", "3", "--seconds", "1,1,0", "--out"]).arg(dir.join("bad0")));
    assert!(!ok && err.contains("time budget"), "{err}");
    std::fs::write(&student, "[ssm_cfg]\nd_state = 16\nn_v_heads = 4\nn_qk_heads = 4\nd_staet = 3\n").unwrap();
    let (ok, _, err) = run(distill().arg("--out").arg(dir.join("bad")));
    assert!(!ok && err.contains("student.toml") && err.contains("d_staet"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
