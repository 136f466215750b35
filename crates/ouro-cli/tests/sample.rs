//! `ouro sample` end to end on the tiny random-weight checkpoints of tests/fixtures.

use serde_json::Value;
use std::path::Path;

mod common;
use common::{fixture, ouro, run};

fn sample(model: &str, prompts: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    run(ouro().args(["sample", "--tokenizer", "bytes", "--model"]).arg(fixture(model)).arg("--prompts").arg(prompts).arg("--out").arg(out).args(extra))
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn sample_scores_and_writes_every_prompt() {
    let dir = std::env::temp_dir().join(format!("ouro-cli-sample-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.jsonl");
    // The answer rule reads the first character of a completion: greedy completions of a prompt agree, so
    // the first run's majority answer is the reference of the second.
    std::fs::write(&prompts, "{\"prompt\": \"Q: 2+3?\", \"answer\": \"5\", \"id\": \"a\"}\n\n{\"prompt\": \"To be, or not\", \"answer\": 7}\n{\"prompt\": \"x\"}\n").unwrap();
    let out = dir.join("out.jsonl");
    let greedy = ["--num-samples", "3", "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "4", "--answer-regex", "(?s)^(.)"];
    for model in ["lm/llama_gqa", "lm/mamba2_hybrid_ssm"] {
        let (ok, stdout, err) = sample(model, &prompts, &out, &greedy);
        assert!(ok, "{model}: {err}");
        let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{model}: {e}: {stdout}"));
        assert_eq!(summary["prompts"], 3);
        assert_eq!(summary["samples"], 9);
        assert_eq!(summary["generated_tokens"], 54);
        assert_eq!(summary["scored_prompts"], 2);
        assert!(summary["pass_at_k"]["2"].is_number() && summary["pass_at_k"].get("4").is_none(), "{stdout}");
        assert!(err.contains("tokens/s") && err.contains("majority-vote accuracy"), "{err}");
        let lines = read_jsonl(&out);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["id"], "a");
        assert_eq!(lines[1]["reference"], "7");
        assert!(lines[2].get("pass_at_k").is_none() && lines[2].get("id").is_none());
        for l in &lines {
            let c = l["completions"].as_array().unwrap();
            assert_eq!(c.len(), 3);
            assert!(c.iter().all(|s| s["tokens"].as_array().unwrap().len() == 6 && s["finish"] == "length" && s["seconds"].as_f64().unwrap() > 0.0));
            // Greedy: the three completions agree, and so do their answers.
            assert!(c.iter().all(|s| s["tokens"] == c[0]["tokens"] && s["text"] == c[0]["text"]));
            if c[0]["answer"].is_string() {
                assert_eq!(l["majority"], c[0]["answer"]);
                assert_eq!(l["majority_votes"], 3);
            }
            if let Some(r) = l.get("reference") {
                let right = l["majority"] == *r;
                assert_eq!(l["majority_correct"], right);
                assert_eq!(l["num_correct"], if right { 3 } else { 0 });
                assert_eq!(l["pass_at_k"]["1"].as_f64().unwrap(), if right { 1.0 } else { 0.0 });
            }
        }
        // Scored against its own majority answers: everything is right.
        let own = dir.join("own.jsonl");
        let body: String = lines
            .iter()
            .map(|l| format!("{}\n", serde_json::json!({"prompt": l["prompt"], "answer": l["majority"].as_str().unwrap_or("none")})))
            .collect();
        std::fs::write(&own, body).unwrap();
        let (ok, stdout, err) = sample(model, &own, &out, &greedy);
        assert!(ok, "{model}: {err}");
        let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
        let answered = lines.iter().filter(|l| l["majority"].is_string()).count() as f64;
        assert_eq!(summary["majority_accuracy"].as_f64().unwrap(), answered / 3.0, "{stdout}");
        assert_eq!(summary["pass_at_k"]["1"].as_f64().unwrap(), answered / 3.0, "{stdout}");
    }
    // A stop string cuts the completion (the generic decoder: this seed's draws hit one); a time budget
    // records what finished in it (a pure Mamba-2 on the CPU: the engine).
    let (ok, _, err) = sample("lm/mamba2_hf", &prompts, &out, &["--num-samples", "2", "--max-new-tokens", "40", "--stop", "e", "--stop", "a", "--seed", "1", "--no-engine"]);
    assert!(ok, "{err}");
    let mut stopped = 0;
    for l in read_jsonl(&out) {
        for c in l["completions"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            assert!(!text.contains('e') && !text.contains('a'), "{text:?}");
            stopped += (c["finish"] == "stop") as usize;
        }
    }
    assert!(stopped > 0, "no completion hit a stop string: the cut is untested");
    let (ok, stdout, err) = sample("lm/mamba2_hf", &prompts, &out, &["--time-budget", "0.5", "--max-new-tokens", "8", "--batch-size", "8"]);
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(summary["samples"].as_u64().unwrap() >= 3, "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sample_bad_input_errors_clearly() {
    let dir = std::env::temp_dir().join(format!("ouro-cli-sample-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.jsonl");
    let args = ["--num-samples", "2", "--max-new-tokens", "4"];
    let check = |body: Option<&str>, extra: &[&str], want: &[&str]| {
        let p = dir.join("prompts.jsonl");
        match body {
            Some(b) => std::fs::write(&p, b).unwrap(),
            None => {
                let _ = std::fs::remove_file(&p);
            }
        }
        let (ok, _, err) = sample("lm/mamba2_hf", &p, &out, if extra.is_empty() { &args } else { extra });
        assert!(!ok, "{body:?} should fail");
        for w in want {
            assert!(err.contains(w), "{body:?}: wanted {w:?} in {err}");
        }
        assert!(!out.exists(), "no output on error");
    };
    check(None, &[], &["prompts.jsonl", "No such file"]);
    check(Some("{\"prompt\": \"a\"}\n{\"prompt\": oops}\n"), &[], &["prompts.jsonl:2", "not valid JSON"]);
    check(Some("{\"prompt\": \"a\"}\n\n{\"question\": \"b\"}\n"), &[], &["prompts.jsonl:3", "no \"prompt\""]);
    check(Some("{\"prompt\": 5}\n"), &[], &["prompts.jsonl:1", "must be a string"]);
    check(Some("\n\n"), &[], &["prompts.jsonl", "no prompts"]);
    check(Some("{\"prompt\": \"a\"}\n"), &["--num-samples", "0", "--max-new-tokens", "4"], &["--num-samples", "at least 1"]);
    check(Some("{\"prompt\": \"a\"}\n"), &["--max-new-tokens", "4"], &["--num-samples", "--time-budget"]);
    check(Some("{\"prompt\": \"a\"}\n"), &["--num-samples", "1", "--max-new-tokens", "4", "--answer-regex", "no group"], &["capture group"]);
    check(Some("{\"prompt\": \"\"}\n"), &[], &["prompts.jsonl:1", "no tokens"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
