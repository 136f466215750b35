//! Test-time-compute tooling end to end: `ouro bench sample` on the tiny random-weight checkpoints of
//! tests/fixtures, and `ouro data arithmetic` feeding `ouro sample`.

use serde_json::Value;
use std::path::PathBuf;

mod common;
use common::{fixture, ouro, run};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ouro-cli-ttc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn bench_sample_tables_every_cell() {
    let dir = tmp("bench");
    let cells = dir.join("cells.jsonl");
    let (ok, out, err) = run(ouro()
        .args(["--threads", "1", "bench", "sample", "--model"])
        .arg(fixture("lm/mamba2_hf"))
        .arg("--model")
        .arg(fixture("lm/nemotron_h"))
        .arg("--model")
        .arg(fixture("lm/llama_gqa"))
        .args(["--batches", "1,3", "--lens", "4,9", "--prompt-len", "3", "--cell-seconds", "30", "--json"])
        .arg(&cells));
    assert!(ok, "{err}");
    let rows: Vec<Value> = std::fs::read_to_string(&cells).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3 * 2 * 2);
    for r in &rows {
        // Every completion ran to its full length: no stop token, no early end.
        let (b, l) = (r["batch"].as_u64().unwrap(), r["len"].as_u64().unwrap());
        assert_eq!(r["generated_tokens"].as_u64().unwrap(), b * l, "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0 && r["partial_at"].is_null(), "{r}");
    }
    // The SSM's cache per sequence does not grow with the length; the Transformer's does.
    let bytes = |m: &str, l: u64| rows.iter().find(|r| r["model"] == m && r["len"] == l).unwrap()["bytes_per_seq"].as_u64().unwrap();
    // A pure Mamba-2 on the CPU runs on the inference engine, and its name says so.
    assert_eq!(bytes("mamba2_hf (engine)", 4), bytes("mamba2_hf (engine)", 9));
    assert!(bytes("llama_gqa", 9) > bytes("llama_gqa", 4));
    assert!(bytes("nemotron_h", 9) > bytes("nemotron_h", 4));
    assert!(out.contains("| length | batch 1 | batch 3 |") && out.contains("mamba2_hf (engine) ÷ llama_gqa") && out.contains("nemotron_h ÷ llama_gqa"), "{out}");
    assert!(out.contains("cache per sequence"), "{out}");
    // --no-engine: the generic model code.
    let (ok, out, err) = run(ouro().args(["--threads", "1", "bench", "sample", "--no-engine", "--model"]).arg(fixture("lm/mamba2_hf")).args(["--batches", "1", "--lens", "4", "--prompt-len", "3"]));
    assert!(ok && out.contains("mamba2_hf") && !out.contains("engine"), "{out}\n{err}");

    // A memory budget below one sequence's cache: nothing runs, every cell is "over".
    let (ok, out, err) = run(ouro()
        .args(["--threads", "1", "bench", "sample", "--model"])
        .arg(fixture("lm/llama_gqa"))
        .args(["--batches", "2", "--lens", "4", "--memory-budget-mib", "0.000001"]));
    assert!(ok, "{err}");
    assert!(out.contains("| 4 | over |") && err.contains("over the memory budget"), "{out}\n{err}");
    let (ok, _, err) = run(ouro().args(["bench", "sample", "--model"]).arg(fixture("lm/llama_gqa")).args(["--reference", "3"]));
    assert!(!ok && err.contains("--reference 3"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn data_arithmetic_writes_a_corpus_and_scorable_prompts() {
    let dir = tmp("arith");
    let (ok, out, err) = run(ouro().args(["data", "arithmetic", "--train", "300", "--documents", "3", "--test", "4", "--seed", "5", "--out"]).arg(&dir));
    assert!(ok, "{err}");
    assert!(out.trim().ends_with(dir.file_name().unwrap().to_str().unwrap()), "{out}");
    let text: String = (0..3).map(|i| std::fs::read_to_string(dir.join(format!("train/part-00{i}.txt"))).unwrap()).collect();
    assert_eq!(text.lines().count(), 300);
    assert!(text.lines().all(|l| l.starts_with("Q: ") && l.contains("= A: ") && l.contains(" #### ")), "{text}");
    // The held-out prompts score in `ouro sample`: the reference is the number after ####.
    let prompts = dir.join("test.jsonl");
    let out_file = dir.join("out.jsonl");
    let (ok, stdout, err) = run(ouro()
        .args(["sample", "--tokenizer", "bytes", "--model"])
        .arg(fixture("lm/mamba2_hf"))
        .arg("--prompts")
        .arg(&prompts)
        .args(["--num-samples", "2", "--max-new-tokens", "4", "--stop", "\n", "--out"])
        .arg(&out_file));
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["scored_prompts"], 4);
    for l in std::fs::read_to_string(&out_file).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let answer = v["answer"].as_str().unwrap();
        assert_eq!(v["reference"].as_str().unwrap(), answer.rsplit_once("#### ").unwrap().1, "{v}");
    }
    let (ok, _, err) = run(ouro().args(["data", "arithmetic", "--ops", "3-x", "--out"]).arg(&dir));
    assert!(!ok && err.contains("--ops"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
