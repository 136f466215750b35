//! `ouro sample`: many completions per prompt for test-time compute — continuous batching, answer
//! extraction, majority vote and pass@k (the library part is `ouro_nn::sample`).

use super::lm::{load_for_decoding, write_atomic, ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use ouro_kernels::quant::Format;
use ouro_nn::engine::EngineBatcher;
use ouro_nn::sample::{pass_ks, reference_answer, sample_batched, sample_with, score, AnswerRule, Completion, Finish, SampleOptions, StopStrings};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct SampleArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// JSON lines, one object per prompt: "prompt" (required), "answer" (reference, optional; a worked
    /// solution ending in "#### X" counts as X), "id" (optional, copied to the output).
    #[arg(long)]
    prompts: PathBuf,
    /// Completions per prompt (with --time-budget: at most this many).
    #[arg(long)]
    num_samples: Option<usize>,
    #[arg(long)]
    max_new_tokens: usize,
    #[command(flatten)]
    s: SamplingArgs,
    /// Sequences decoded together; a finished one leaves its row and the next pending sample joins. Sample
    /// i of prompt p draws from its own RNG, seeded from --seed and (p, i): the completions do not depend
    /// on the batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Seconds: keep starting samples, round-robin over the prompts, until the budget is spent; samples
    /// still running then are dropped (only completions finished within the budget are scored).
    #[arg(long)]
    time_budget: Option<f64>,
    /// Regex with one capture group: the answer is the group of its last match (default: the text after
    /// the last "####", else the last number).
    #[arg(long)]
    answer_regex: Option<String>,
    /// A completion ends once its text contains this string (cut before it); repeatable. The tokenizer's
    /// EOS token always ends a completion.
    #[arg(long = "stop", action = clap::ArgAction::Append)]
    stop: Vec<String>,
    /// tokenizer.json to use, or "bytes" (default: the checkpoint's own).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Output JSON lines: one per prompt with its completions, majority answer and scores.
    #[arg(long)]
    out: PathBuf,
    /// Decode with the generic model code even where the CPU engine applies (pure Mamba-2 on the CPU; the
    /// engine runs f32 weights, the same numbers up to the order of its sums).
    #[arg(long)]
    no_engine: bool,
    /// Engine: f32 products everywhere (by default batches of ≥ 8 rows use bf16 matmuls where the CPU has
    /// AVX-512 BF16).
    #[arg(long)]
    no_bf16: bool,
}

struct PromptLine {
    line: usize,
    prompt: String,
    answer: Option<String>,
    id: Option<Value>,
}

fn read_prompts(path: &Path) -> Result<Vec<PromptLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading prompts {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let Some(obj) = v.as_object() else { bail!("{}: expected a JSON object with a \"prompt\", got {line}", at()) };
        let prompt = match obj.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!("{}: \"prompt\" must be a string, got {other}", at()),
            None => bail!("{}: no \"prompt\" field", at()),
        };
        let answer = match obj.get("answer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => bail!("{}: \"answer\" must be a string or a number, got {other}", at()),
        };
        out.push(PromptLine { line: i + 1, prompt, answer, id: obj.get("id").cloned() });
    }
    if out.is_empty() {
        bail!("{}: no prompts (the file is empty)", path.display());
    }
    Ok(out)
}

pub fn sample_cmd(a: SampleArgs) -> Result<()> {
    if a.time_budget.is_none() && a.num_samples.unwrap_or(0) == 0 {
        bail!("--num-samples must be at least 1 (or give --time-budget SECONDS)");
    }
    if a.num_samples == Some(0) {
        bail!("--num-samples must be at least 1");
    }
    if let Some(t) = a.time_budget.filter(|t| t.is_nan() || *t <= 0.0) {
        bail!("--time-budget must be a positive number of seconds, got {t}");
    }
    if a.max_new_tokens == 0 || a.batch_size == 0 {
        bail!("--max-new-tokens and --batch-size must be at least 1");
    }
    let rule = match &a.answer_regex {
        Some(re) => AnswerRule::regex(re)?,
        None => AnswerRule::Default,
    };
    let lines = read_prompts(&a.prompts)?;
    // Pure Mamba-2 on the CPU decodes on the inference engine (its state rows are plain slices).
    let (tok, engine, model) = load_for_decoding(&a.m, a.tokenizer.as_deref(), Format::F32, a.no_engine, a.no_bf16)?;
    let prompts = lines
        .iter()
        .map(|l| {
            let ids = tok.encode(&l.prompt)?;
            if ids.is_empty() {
                bail!("{}:{}: the prompt encodes to no tokens", a.prompts.display(), l.line);
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let stops = StopStrings::new(&tok, &a.stop)?;
    let opts = SampleOptions {
        num_samples: a.num_samples,
        max_new_tokens: a.max_new_tokens,
        sampling: a.s.params(),
        batch_size: a.batch_size,
        time_budget: a.time_budget,
        stop_tokens: tok.eos(),
    };
    let planned = a.num_samples.filter(|_| a.time_budget.is_none()).map(|n| n * prompts.len());
    let (mut finished, mut last_report) = (0usize, Instant::now());
    let mut report = |c: &Completion| {
        finished += 1;
        if last_report.elapsed().as_secs_f64() >= 5.0 {
            last_report = Instant::now();
            match planned {
                Some(n) => eprintln!("{finished}/{n} samples done ({:.0} s)", c.seconds),
                None => eprintln!("{finished} samples done ({:.0} s)", c.seconds),
            }
        }
    };
    let stop = |t: &[u32]| stops.hit(t);
    let (completions, stats) = match (&engine, &model) {
        (Some(e), _) => sample_with(&EngineBatcher::new(e), &prompts, &opts, &stop, &mut report)?,
        (None, Some(m)) => sample_batched(m.as_ref(), &prompts, &opts, &stop, &mut report)?,
        (None, None) => unreachable!("a model or an engine is loaded"),
    };

    // Answers, votes and scores per prompt.
    let mut out_lines = Vec::with_capacity(lines.len());
    let (mut scored, mut majority_right) = (0usize, 0usize);
    let mut per_prompt_pass: Vec<Vec<(usize, f64)>> = Vec::new();
    let mut min_n = usize::MAX;
    for (l, done) in lines.iter().zip(&completions) {
        let mut texts = Vec::with_capacity(done.len());
        for c in done {
            let body: Vec<u32> = if c.finish == Finish::Eos { c.tokens[..c.tokens.len() - 1].to_vec() } else { c.tokens.clone() };
            let text = tok.decode(&body)?;
            texts.push(if c.finish == Finish::Stop { stops.cut(&text).to_string() } else { text });
        }
        let answers: Vec<Option<String>> = texts.iter().map(|t| rule.extract(t)).collect();
        let reference = l.answer.as_deref().map(reference_answer);
        let s = score(&answers, reference.as_deref());
        let samples: Vec<Value> = done
            .iter()
            .zip(&texts)
            .zip(&answers)
            .enumerate()
            .map(|(i, ((c, text), ans))| {
                let mut v = json!({
                    "sample": c.sample,
                    "text": text,
                    "tokens": c.tokens,
                    "num_tokens": c.tokens.len(),
                    "answer": ans,
                    "finish": c.finish.name(),
                    "seconds": c.seconds,
                });
                if let Some(correct) = &s.correct {
                    v["correct"] = json!(correct[i]);
                }
                v
            })
            .collect();
        let mut line = json!({
            "index": out_lines.len(),
            "prompt": l.prompt,
            "num_samples": done.len(),
            "completions": samples,
            "majority": s.majority.as_ref().map(|(a, _)| a),
            "majority_votes": s.majority.as_ref().map_or(0, |(_, n)| *n),
        });
        if let Some(id) = &l.id {
            line["id"] = id.clone();
        }
        if let (Some(raw), Some(r)) = (&l.answer, &reference) {
            let c = s.correct.as_ref().map_or(0, |c| c.iter().filter(|&&x| x).count());
            line["answer"] = json!(raw);
            line["reference"] = json!(r);
            line["num_correct"] = json!(c);
            line["majority_correct"] = json!(s.majority_correct.unwrap_or(false));
            line["pass_at_k"] = Value::Object(s.pass_at_k.iter().map(|(k, p)| (k.to_string(), json!(p))).collect());
            scored += 1;
            majority_right += s.majority_correct.unwrap_or(false) as usize;
            min_n = min_n.min(done.len());
            per_prompt_pass.push(s.pass_at_k.clone());
        }
        out_lines.push(line);
    }
    write_atomic(&a.out, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        for l in &out_lines {
            serde_json::to_writer(&mut f, l)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        Ok(())
    })?;

    // Summary: throughput, then the scores averaged over the prompts with a reference (pass@k for the k
    // every such prompt has samples for).
    let secs = stats.seconds.max(1e-9);
    let tps = stats.generated_tokens as f64 / secs;
    let mut summary = json!({
        "prompts": lines.len(),
        "samples": stats.completions,
        "dropped": stats.dropped,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "seconds": stats.seconds,
        "prefill_seconds": stats.prefill_seconds,
        "tokens_per_second": tps,
        "batch_size": a.batch_size,
        "mean_rows_per_step": stats.row_steps as f64 / stats.steps.max(1) as f64,
        "out": a.out.display().to_string(),
    });
    eprintln!(
        "{} completions of {} prompts{} in {:.2} s: {} tokens generated, {:.1} tokens/s (batch {}, {:.1} rows per step on average); prefill {} tokens in {:.2} s",
        stats.completions,
        lines.len(),
        if stats.dropped > 0 { format!(" ({} unfinished dropped at the time budget)", stats.dropped) } else { String::new() },
        stats.seconds,
        stats.generated_tokens,
        tps,
        a.batch_size,
        stats.row_steps as f64 / stats.steps.max(1) as f64,
        stats.prompt_tokens,
        stats.prefill_seconds,
    );
    if scored > 0 {
        let maj = majority_right as f64 / scored as f64;
        let ks = if min_n == usize::MAX { vec![] } else { pass_ks(min_n) };
        let pass: Vec<(usize, f64)> = ks
            .iter()
            .map(|&k| (k, per_prompt_pass.iter().map(|p| p.iter().find(|(kk, _)| *kk == k).map_or(0.0, |x| x.1)).sum::<f64>() / scored as f64))
            .collect();
        eprintln!(
            "{scored} prompts with a reference answer: majority-vote accuracy {maj:.3}{}",
            pass.iter().map(|(k, p)| format!(", pass@{k} {p:.3}")).collect::<String>()
        );
        summary["scored_prompts"] = json!(scored);
        summary["majority_accuracy"] = json!(maj);
        summary["pass_at_k"] = Value::Object(pass.iter().map(|(k, p)| (k.to_string(), json!(p))).collect());
    }
    eprintln!("wrote {}", a.out.display());
    println!("{summary}");
    Ok(())
}
