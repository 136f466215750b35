//! The training loop: packed batches, causal or masked LM loss, AdamW with clipping and accumulation,
//! validation, atomic checkpoints that `ouro generate` loads directly, bit-for-bit resume, metrics and plots.

use crate::config::TrainConfig;
use crate::data::{batch_from_rows, split, tokenize, Batch, Stream};
use crate::model::Trainable;
use crate::optim::{lr_at, AdamW};
use crate::tasks::Task;
use candle_core::{bail, DType, Device, Result, Tensor, D};
use ouro_nn::lm::LanguageModel;
use ouro_nn::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metric {
    pub step: usize,
    pub tokens: u64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_ppl: Option<f64>,
    /// Synthetic tasks: accuracy per evaluated context length.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_acc: Option<Vec<(usize, f64)>>,
}

/// Progress of a run, saved with each checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    tokens: u64,
    seconds: f64,
    config: TrainConfig,
}

/// Mean cross-entropy of `logits` (b, l, V) against `targets` (b, l), weighted by `weights` (b, l).
pub fn weighted_cross_entropy(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp.gather(&targets.contiguous()?.unsqueeze(2)?, 2)?.squeeze(2)?; // (b, l)
    let total = weights.sum_all()?;
    picked.mul(weights)?.sum_all()?.neg()? / total.to_scalar::<f32>()?.max(1.0) as f64
}

/// The run folder's files.
pub struct RunPaths {
    pub root: PathBuf,
}

impl RunPaths {
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn plot(&self) -> PathBuf {
        self.root.join("loss.svg")
    }
}

/// Where the text comes from, tokenized: (train, valid, tokenizer, mask id for the masked objective).
pub struct Corpus {
    pub train: Stream,
    pub valid: Stream,
    pub tokenizer: Tokenizer,
    pub vocab: usize,
}

pub fn load_corpus(cfg: &TrainConfig, log: &mut dyn FnMut(&str)) -> Result<Corpus> {
    let d = &cfg.data;
    let tokenizer = match d.tokenizer.as_str() {
        "bytes" => Tokenizer::Bytes,
        "dna" => Tokenizer::Dna,
        file => Tokenizer::from_file(Path::new(file), None, vec![])?,
    };
    let vocab = tokenizer.vocab_size();
    let (train, valid) = load_text(&d.corpus, &d.data_dir, &tokenizer, d.valid_fraction, cfg.train.seed, log)?;
    Ok(Corpus { train, valid, tokenizer, vocab })
}

/// A text corpus — a fetchable corpus name (fetched into `data_dir` on first use), "arithmetic" (generated
/// into `data_dir/arithmetic` on first use, see [`crate::arith`]), a file or a folder of .txt files, or several
/// of those joined by `+` (e.g. "austen+kjv+shakespeare": their documents together, each name prefixed with its
/// corpus) — tokenized and split into training and held-out streams by whole documents.
pub fn load_text(corpus: &str, data_dir: &Path, tokenizer: &Tokenizer, valid_fraction: f64, seed: u64, log: &mut dyn FnMut(&str)) -> Result<(Stream, Stream)> {
    let texts = if corpus.contains('+') && !Path::new(corpus).exists() {
        let mut all = Vec::new();
        for part in corpus.split('+') {
            if part.is_empty() {
                bail!("corpus '{corpus}': an empty name between '+'");
            }
            all.extend(text_documents(part, data_dir, log)?.into_iter().map(|(name, text)| (format!("{part}/{name}"), text)));
        }
        all
    } else {
        text_documents(corpus, data_dir, log)?
    };
    let docs = tokenize(texts, tokenizer)?;
    let (train, valid) = split(docs, valid_fraction, seed);
    // The validation documents by name, the first 8 where there are more.
    let mut names = valid.iter().take(8).map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ");
    if valid.len() > 8 {
        names += &format!(", … {} more", valid.len() - 8);
    }
    log(&format!(
        "corpus {}: {} training documents ({} tokens), {} validation documents ({} tokens: {})",
        corpus,
        train.len(),
        train.iter().map(|x| x.tokens.len()).sum::<usize>(),
        valid.len(),
        valid.iter().map(|x| x.tokens.len()).sum::<usize>(),
        names
    ));
    Ok((Stream::new(&train), Stream::new(&valid)))
}

/// The (name, text) documents of one corpus (see [`load_text`]), fetching or generating it first if needed.
fn text_documents(corpus: &str, data_dir: &Path, log: &mut dyn FnMut(&str)) -> Result<Vec<(String, String)>> {
    let path = Path::new(corpus);
    let folder = if corpus == "arithmetic" && !path.exists() {
        // The synthetic arithmetic corpus (crate::arith), generated into data_dir on first use.
        let dir = data_dir.join("arithmetic");
        if !dir.join("train").is_dir() {
            log(&format!("generating the arithmetic corpus (seed 0) into {}", dir.display()));
            crate::arith::write_dataset(&dir, &crate::arith::ArithDataset::default())?;
        }
        dir.join("train")
    } else if crate::fetch::SOURCES.iter().any(|s| s.name == corpus) && !path.exists() {
        crate::fetch::fetch(corpus, data_dir, log)?
    } else {
        path.to_path_buf()
    };
    crate::data::read_text_documents(&folder)
}

/// Replaces a `prob` fraction of input tokens with `mask_id` and scores only those (BERT-style, no
/// random/keep variants), reproducibly from (seed, step, micro).
fn mask_batch(b: Batch, mask_id: u32, prob: f64, seed: u64) -> Result<Batch> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = b.inputs.device().clone();
    let shape = b.inputs.dims2()?;
    let inp: Vec<u32> = b.inputs.flatten_all()?.to_vec1()?;
    let mut masked = inp.clone();
    let mut w = vec![0f32; inp.len()];
    for i in 0..inp.len() {
        if rng.random::<f64>() < prob {
            masked[i] = mask_id;
            w[i] = 1.0;
        }
    }
    Ok(Batch {
        inputs: Tensor::from_vec(masked, shape, &dev)?,
        targets: Tensor::from_vec(inp, shape, &dev)?,
        weights: Tensor::from_vec(w, shape, &dev)?,
        seq_idx: b.seq_idx,
    })
}

/// The loss of one batch under the configured objective.
pub fn batch_loss(model: &dyn LanguageModel, batch: &Batch) -> Result<Tensor> {
    let logits = model.forward(&batch.inputs, batch.seq_idx.as_ref(), None)?;
    weighted_cross_entropy(&logits, &batch.targets, &batch.weights)
}

/// One optimizer step over `micro` batches (gradient accumulation): mean loss, gradients averaged and
/// clipped to a global norm of `clip` (0: none), AdamW at `lr`. Returns (mean loss, gradient norm before
/// clipping). A non-finite loss is an error and leaves the parameters untouched.
pub fn train_step(model: &dyn LanguageModel, opt: &mut AdamW, batches: &[Batch], lr: f64, clip: f64) -> Result<(f64, f64)> {
    let mut acc = Vec::new();
    let mut loss_sum = 0f64;
    for b in batches {
        let loss = batch_loss(model, b)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            bail!("the loss is {lv}");
        }
        loss_sum += lv;
        opt.accumulate(&mut acc, &loss.backward()?)?;
    }
    let mut scale = 1.0 / batches.len() as f64;
    let norm = AdamW::grad_norm(&acc)? * scale;
    if clip > 0.0 && norm > clip {
        scale *= clip / (norm + 1e-6);
    }
    opt.step(&acc, lr, scale)?;
    Ok((loss_sum / batches.len() as f64, norm))
}

/// Validation loss (nats per token) over up to `eval_tokens` tokens of the held-out stream.
pub fn evaluate(model: &dyn LanguageModel, cfg: &TrainConfig, valid: &Stream, mask_id: Option<u32>) -> Result<f64> {
    let (mut total, mut count) = (0f64, 0f64);
    for (i, rows) in valid.sequential(cfg.train.batch_size, cfg.data.seq_len, cfg.train.eval_tokens).into_iter().enumerate() {
        let mut b = batch_from_rows(rows, cfg.data.seq_len, model.device())?;
        if let Some(m) = mask_id {
            b = mask_batch(b, m, cfg.train.mask_prob, 0xe7a1 ^ i as u64)?;
        }
        let n = b.weights.sum_all()?.to_scalar::<f32>()? as f64;
        total += batch_loss(model, &b)?.to_scalar::<f32>()? as f64 * n;
        count += n;
    }
    if count == 0.0 {
        bail!("validation set is empty (seq_len {} longer than the held-out text?)", cfg.data.seq_len);
    }
    Ok(total / count)
}

fn write_checkpoint(paths: &RunPaths, tr: &Trainable, opt: &AdamW, state: &TrainerState) -> Result<()> {
    let tmp = paths.root.join(".checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.display())))?;
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&tr.config).unwrap()).map_err(candle_core::Error::wrap)?;
    tr.varmap.save(tmp.join("model.safetensors"))?;
    candle_core::safetensors::save(&opt.state()?, tmp.join("optimizer.safetensors"))?;
    std::fs::write(tmp.join("trainer.json"), serde_json::to_string_pretty(state).unwrap()).map_err(candle_core::Error::wrap)?;
    let dest = paths.checkpoint();
    let old = paths.root.join(".checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if dest.exists() {
        std::fs::rename(&dest, &old).map_err(candle_core::Error::wrap)?;
    }
    std::fs::rename(&tmp, &dest).map_err(candle_core::Error::wrap)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn append_metric(paths: &RunPaths, m: &Metric) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(paths.metrics()).map_err(candle_core::Error::wrap)?;
    writeln!(f, "{}", serde_json::to_string(m).unwrap()).map_err(candle_core::Error::wrap)
}

pub fn read_metrics(path: &Path) -> Result<Vec<Metric>> {
    let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    text.lines().filter(|l| !l.trim().is_empty()).enumerate().map(|(i, l)| serde_json::from_str(l).map_err(|e| candle_core::Error::Msg(format!("{}:{}: {e}", path.display(), i + 1)))).collect()
}

/// What a finished run reports.
pub struct Outcome {
    pub steps: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub final_val_loss: Option<f64>,
    /// Synthetic tasks: accuracy per context length at the end.
    pub final_accuracy: Option<Vec<(usize, f64)>>,
    pub parameters: usize,
    pub samples: Vec<String>,
}

/// Runs (or resumes) the training a config describes. `log` receives human-readable progress lines.
/// Where batches come from.
enum Source {
    Text(Corpus),
    Task(Task),
}

/// Runs (or resumes) the training a config describes. `stop_at`: end this invocation after that step (with
/// a checkpoint), as an interruption would; `resume` continues it. `log` receives progress lines.
pub fn train(cfg: &TrainConfig, dev: &Device, resume: bool, progress: bool, stop_at: Option<usize>, log: &mut dyn FnMut(&str)) -> Result<Outcome> {
    let paths = RunPaths { root: cfg.train.out.clone() };
    let source = match Task::parse(&cfg.data.corpus) {
        Some(task) => {
            log(&format!("task {}: context {}, accuracy at {:?}", cfg.data.corpus, cfg.data.seq_len, eval_lengths(cfg)));
            Source::Task(task)
        }
        None => Source::Text(load_corpus(cfg, log)?),
    };
    let masked = cfg.train.objective == "masked";
    let base_vocab = match &source {
        Source::Text(c) => c.vocab,
        Source::Task(t) => t.vocab(),
    };
    if masked && matches!(source, Source::Task(_)) {
        bail!("the synthetic tasks are causal: train.objective must be \"causal\"");
    }
    // The mask token: the DNA vocabulary has one ([MASK]); other vocabularies get one appended.
    let dna = cfg.data.tokenizer == "dna";
    let mask_id = masked.then_some(if dna { ouro_nn::caduceus::DNA_MASK } else { base_vocab as u32 });
    let vocab = base_vocab + (masked && !dna) as usize;
    let rc_map = cfg.train.rc_augment.then(|| ouro_nn::caduceus::dna_complement_map(vocab));
    let ck_cfg = cfg.model.checkpoint_config(vocab, &cfg.data.tokenizer, cfg.data.seq_len)?;
    let tr = Trainable::new(ck_cfg, dev)?;
    let mut opt = AdamW::new(tr.named_vars(), cfg.train.beta1, cfg.train.beta2, 1e-8, cfg.train.weight_decay)?;
    let (mut start, mut tokens, mut elapsed0) = (0usize, 0u64, 0f64);
    if resume {
        let ck = paths.checkpoint();
        let state: TrainerState = serde_json::from_str(
            &std::fs::read_to_string(ck.join("trainer.json")).map_err(|e| candle_core::Error::Msg(format!("--resume: {}: {e}", ck.join("trainer.json").display())))?,
        )
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", ck.join("trainer.json").display())))?;
        if state.config.model != cfg.model || state.config.data != cfg.data {
            bail!("--resume: {} was trained with a different model or data configuration", paths.root.display());
        }
        let weights = candle_core::safetensors::load(ck.join("model.safetensors"), dev)?;
        for (name, var) in tr.named_vars() {
            let t = weights.get(&name).ok_or_else(|| candle_core::Error::Msg(format!("{}: missing tensor {name}", ck.display())))?;
            var.set(t)?;
        }
        opt.load_state(&candle_core::safetensors::load(ck.join("optimizer.safetensors"), dev)?)?;
        (start, tokens, elapsed0) = (state.step, state.tokens, state.seconds);
        // Drop metrics written after the checkpoint, so that the log is what one uninterrupted run writes.
        if let Ok(ms) = read_metrics(&paths.metrics()) {
            let kept: Vec<String> = ms.iter().filter(|m| m.step <= start).map(|m| serde_json::to_string(m).unwrap()).collect();
            std::fs::write(paths.metrics(), kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).map_err(candle_core::Error::wrap)?;
        }
        log(&format!("resumed {} at step {start}", paths.root.display()));
    } else {
        if paths.checkpoint().exists() {
            bail!("{} already holds a run; pass --resume to continue it or choose another --out", paths.root.display());
        }
        std::fs::create_dir_all(&paths.root).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", paths.root.display())))?;
        let _ = std::fs::remove_file(paths.metrics());
        tr.init(cfg.train.seed)?;
    }
    let params = tr.parameter_count();
    let dtype = if cfg.train.bf16 { DType::BF16 } else { DType::F32 };
    log(&format!("model {}: {} parameters ({:.2} M){}", cfg.model.arch, params, params as f64 / 1e6, if cfg.train.bf16 { ", computing in bf16" } else { "" }));
    let t = &cfg.train;
    let seq = match &source {
        Source::Task(task) => task.input_len(cfg.data.seq_len),
        Source::Text(_) => cfg.data.seq_len,
    };
    let tokens_per_step = (t.batch_size * t.grad_accum * seq) as u64;
    let bar = if progress {
        let b = indicatif::ProgressBar::new(t.steps as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").unwrap());
        b.set_position(start as u64);
        Some(b)
    } else {
        None
    };
    let t0 = Instant::now();
    let mut last_val = None;
    let mut last_acc = None;
    let mut step = start;
    let mut window_t = Instant::now();
    let mut window_tokens = 0u64;
    while step < t.steps {
        let lr = lr_at(step, t.steps, t.warmup, t.lr, t.min_lr);
        let mut batches = Vec::with_capacity(t.grad_accum);
        for micro in 0..t.grad_accum {
            let mut b = match &source {
                Source::Text(corpus) => corpus.train.sample(t.batch_size, cfg.data.seq_len, t.seed, step as u64, micro as u64, rc_map.as_deref(), dev)?,
                Source::Task(task) => task.batch(t.batch_size, cfg.data.seq_len, task_seed(t.seed, step, micro), dev)?,
            };
            if let Some(m) = mask_id {
                b = mask_batch(b, m, t.mask_prob, t.seed ^ ((step as u64) << 8) ^ micro as u64)?;
            }
            batches.push(b);
        }
        // bf16: a copy of the model on the parameters as they are now (cast again after each update).
        let cast = tr.cast(dtype)?;
        let (loss, norm) = train_step(cast.as_deref().unwrap_or(tr.model.as_ref()), &mut opt, &batches, lr, t.grad_clip)
            .map_err(|e| candle_core::Error::Msg(format!("step {step}: {e}; stopping (the last checkpoint in {} is intact)", paths.checkpoint().display())))?;
        step += 1;
        tokens += tokens_per_step;
        window_tokens += tokens_per_step;
        let seconds = elapsed0 + t0.elapsed().as_secs_f64();
        let tps = window_tokens as f64 / window_t.elapsed().as_secs_f64().max(1e-9);
        append_metric(&paths, &Metric { step, tokens, seconds, loss: Some(loss), lr: Some(lr), grad_norm: Some(norm), tokens_per_s: Some(tps), val_loss: None, val_ppl: None, val_acc: None })?;
        if step % 10 == 0 {
            (window_t, window_tokens) = (Instant::now(), 0);
        }
        let out_of_time = (t.time_limit_minutes > 0.0 && t0.elapsed().as_secs_f64() > t.time_limit_minutes * 60.0) || stop_at == Some(step);
        let last = step == t.steps || out_of_time;
        if step % t.eval_every == 0 || last {
            let cast = tr.cast(dtype)?;
            let model = cast.as_deref().unwrap_or(tr.model.as_ref());
            let (v, acc) = match &source {
                Source::Text(corpus) => (evaluate(model, cfg, &corpus.valid, mask_id)?, None),
                Source::Task(task) => {
                    let b = task.batch(t.batch_size, cfg.data.seq_len, 0xe7a1, dev)?;
                    let v = batch_loss(model, &b)?.to_scalar::<f32>()? as f64;
                    let acc = eval_lengths(cfg)
                        .into_iter()
                        .map(|len| Ok((len, crate::tasks::accuracy(model, task, len, t.batch_size, 4, 0xe7a1)?)))
                        .collect::<Result<Vec<_>>>()?;
                    (v, Some(acc))
                }
            };
            last_val = Some(v);
            last_acc = acc.clone();
            append_metric(&paths, &Metric { step, tokens, seconds, loss: None, lr: None, grad_norm: None, tokens_per_s: None, val_loss: Some(v), val_ppl: Some(v.exp()), val_acc: acc.clone() })?;
            let acc_text = acc.map(|a| a.iter().map(|(l, x)| format!(", acc@{l} {:.1}%", 100.0 * x)).collect::<String>()).unwrap_or_default();
            let line = format!("step {step}: train loss {loss:.4}, val loss {v:.4} (ppl {:.2}){acc_text}, {tps:.0} tok/s", v.exp());
            match &bar {
                Some(b) => b.println(line),
                None => log(&line),
            }
        }
        if let Some(b) = &bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.3} | {tps:.0} tok/s"));
        }
        if step % t.save_every == 0 || last {
            write_checkpoint(&paths, &tr, &opt, &TrainerState { step, tokens, seconds, config: cfg.clone() })?;
        }
        if out_of_time {
            log(&format!("stopped at step {step} (time limit or --stop-at); continue with --resume"));
            break;
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    crate::plot::plot_run(&paths.metrics(), &paths.plot())?;
    let seconds = elapsed0 + t0.elapsed().as_secs_f64();
    let samples = match &source {
        Source::Text(corpus) if !masked && t.samples > 0 => sample_text(tr.model.as_ref(), corpus, t)?,
        _ => Vec::new(),
    };
    Ok(Outcome { steps: step, tokens, seconds, final_val_loss: last_val, final_accuracy: last_acc, parameters: params, samples })
}

fn task_seed(seed: u64, step: usize, micro: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ micro as u64
}

fn eval_lengths(cfg: &TrainConfig) -> Vec<usize> {
    if cfg.data.eval_lengths.is_empty() {
        vec![cfg.data.seq_len]
    } else {
        cfg.data.eval_lengths.clone()
    }
}

/// A few continuations of validation-text prompts.
fn sample_text(model: &dyn LanguageModel, corpus: &Corpus, t: &crate::config::TrainSpec) -> Result<Vec<String>> {
    let src = if corpus.valid.is_empty() { &corpus.train } else { &corpus.valid };
    let mut out = Vec::new();
    for i in 0..t.samples {
        let start = (src.len() / (t.samples + 1)) * (i + 1);
        let prompt: Vec<u32> = src.tokens[start..(start + 48).min(src.len())].to_vec();
        let opts = ouro_nn::generate::GenerateOptions {
            max_new_tokens: t.sample_tokens,
            num_samples: 1,
            sampling: ouro_nn::generate::SamplingParams { temperature: 0.8, top_k: 0, top_p: 0.95, seed: t.seed + i as u64 },
            stop: vec![],
        };
        let (gen, _) = ouro_nn::generate::generate(model, &prompt, &opts, |_, _| Ok(()))?;
        out.push(format!("{}⟨generated⟩{}", corpus.tokenizer.decode(&prompt)?, corpus.tokenizer.decode(&gen[0])?));
    }
    Ok(out)
}
