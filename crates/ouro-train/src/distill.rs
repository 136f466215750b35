//! MOHAWK (Bick et al., "Transformers to SSMs: Distilling Quadratic Knowledge to Subquadratic Models"):
//! a Llama teacher distilled into a Llamba student (discrete Mamba-2 mixers in the teacher's blocks).
//!
//! ```text
//! init     student = teacher with every attention replaced by a discrete Mamba-2 mixer; embeddings, norms,
//!          MLPs and head copied; mixer in_proj [x | B | C] ← [V | K | Q/√d_head] (KV heads repeated for the
//!          query heads they serve, as GQA does), out_proj ← o_proj, conv = identity, D = 0
//! stage 1  matrix orientation, per layer: ‖T_student(x_i) − softmax(Q Kᵀ/√d + mask)(x_i)‖²_F, where x_i is
//!          the teacher's input to layer i (the student's mixer and the teacher's attention see the same
//!          normalised input); the mixers train, everything else is frozen
//! stage 2  hidden-state alignment, per block: ‖block_student(h_i) − h_{i+1}‖² with h_i the teacher's
//!          hidden states; the mixers train; layers are independent (one backward pass each)
//! stage 3  end-to-end knowledge distillation on the logits: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)); the
//!          whole student trains
//! ```
//!
//! Each stage has its own token budget and writes a checkpoint in the Llamba layout (with the teacher's
//! tokenizer, so `ouro generate` runs it), then the teacher's and the student's held-out perplexity.

use crate::data::{batch_from_rows, Stream};
use crate::optim::{lr_at, AdamW};
use crate::train::batch_loss;
use crate::write_folder;
use candle_core::{bail, DType, Device, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use ouro_nn::checkpoint::Checkpoint;
use ouro_nn::llama::{Llama, LlamaConfig};
use ouro_nn::llamba::{Llamba, LlambaConfig, LlambaMlpConfig, LlambaSsmConfig};
use ouro_nn::lm::LanguageModel;
use ouro_nn::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// The student: its config, parameters and model (built on the parameters).
pub struct Student {
    pub cfg: LlambaConfig,
    pub varmap: VarMap,
    pub model: Llamba,
}

impl Student {
    /// The model a step computes with in `dtype`: None for f32 (the parameters themselves), else a copy of
    /// the model on the parameters cast to `dtype` (mixed precision: the casts are in the graph, so the
    /// gradients reach the f32 parameters, which the optimizer keeps).
    pub fn cast(&self, dtype: DType) -> Result<Option<Llamba>> {
        if dtype == DType::F32 {
            return Ok(None);
        }
        let map = ouro_nn::checkpoint::cast_vars(&self.varmap, dtype)?;
        let emb = map.get("backbone.embedding.weight").ok_or_else(|| candle_core::Error::Msg("distill: the student has no embedding".into()))?;
        let (rows, dev) = (emb.dim(0)?, emb.device().clone());
        Ok(Some(Llamba::new(self.cfg.clone(), rows, VarBuilder::from_tensors(map, dtype, &dev))?))
    }
}

/// Which parts of the student came from the teacher at initialisation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InitReport {
    /// e.g. "x ← v_proj (KV heads repeated ×3)"
    pub mixer: Vec<String>,
    pub copied: usize,
}

/// The Llamba config for a teacher and the student's SSM settings.
pub fn student_config(t: &LlamaConfig, ssm: LlambaSsmConfig) -> LlambaConfig {
    LlambaConfig {
        vocab_size: t.vocab_size,
        d_model: t.hidden_size,
        n_layer: t.num_hidden_layers,
        tie_embeddings: t.tie_word_embeddings,
        pad_vocab_size_multiple: 1,
        lm_head_bias: false,
        norm_epsilon: t.rms_norm_eps,
        mlp_cfg: LlambaMlpConfig { intermediate_size: t.intermediate_size, bias: t.mlp_bias, act_fn: t.hidden_act.clone() },
        ssm_cfg: ssm,
    }
}

/// A projection's weight (out, in) with its output rows grouped in `heads` blocks of `hd`, each block
/// repeated `rep` times in place (KV head k → query heads k·rep … k·rep + rep − 1).
fn repeat_heads(w: &Tensor, heads: usize, hd: usize, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(w.clone());
    }
    let d_in = w.dim(1)?;
    w.reshape((heads, 1, hd, d_in))?.repeat((1, rep, 1, 1))?.reshape((heads * rep * hd, d_in))
}

/// `rows` output rows for a mixer slice from an attention projection of `heads` heads of `hd` rows, when
/// the sizes allow: the projection as it is, or with its heads repeated for the query heads they serve.
/// `slot_hd` is the size of one head of the slot (the mixer's head_dim for x, d_state for B and C): heads
/// map onto heads only when it equals the attention's head size.
#[allow(clippy::too_many_arguments)]
fn fit_rows(w: &Tensor, heads: usize, hd: usize, q_heads: usize, rows: usize, slot_hd: usize, name: &str, slot: &str, report: &mut Vec<String>) -> Result<Option<Tensor>> {
    if slot_hd != hd {
        report.push(format!("{slot}: random (heads of {slot_hd}; {name} has heads of {hd})"));
        return Ok(None);
    }
    if heads * hd == rows {
        report.push(format!("{slot} ← {name}"));
        return Ok(Some(w.clone()));
    }
    if heads < q_heads && q_heads * hd == rows {
        report.push(format!("{slot} ← {name} (KV heads repeated ×{})", q_heads / heads));
        return Ok(Some(repeat_heads(w, heads, hd, q_heads / heads)?));
    }
    report.push(format!("{slot}: random ({rows} rows; {name} has {})", heads * hd));
    Ok(None)
}

/// Builds the student from the teacher checkpoint: non-mixer weights copied, mixers initialised from the
/// attention weights where the shapes allow (see the module docs). f32 parameters on `dev`.
/// The parts of the mixers the teacher does not provide (z, A_log, and any slice whose shape does not fit)
/// are drawn from `seed` (uniform ±1/√d_model, as a Linear initialises), so that runs are reproducible.
pub fn init_student(teacher_ck: &Checkpoint, t: &LlamaConfig, ssm: LlambaSsmConfig, seed: u64, dev: &Device) -> Result<(Student, InitReport)> {
    let cfg = student_config(t, ssm);
    let mixer = cfg.mixer();
    let (d, e, hq, hv, n) = (cfg.d_model, mixer.d_inner(), mixer.n_qk_heads, mixer.n_v_heads, mixer.d_state);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let model = Llamba::new(cfg.clone(), t.vocab_size, vb)?;
    let tvb = teacher_ck.var_builder(DType::F32, dev, &[]);
    let (th, kv, hd) = (t.num_attention_heads, t.kv_heads(), t.head_dim());
    let mut report = InitReport::default();
    let set = |name: String, value: Tensor| -> Result<()> {
        let data = varmap.data().lock().unwrap();
        let var = data.get(&name).ok_or_else(|| candle_core::Error::Msg(format!("distill: the student has no parameter '{name}'")))?;
        if var.dims() != value.dims() {
            bail!("distill: '{name}' is {:?} in the student, the teacher gives {:?}", var.dims(), value.dims());
        }
        var.set(&value.to_dtype(DType::F32)?)
    };
    let mut copy = |to: String, from: String, shape: &[usize]| -> Result<()> {
        let v = tvb.get(shape, &from).map_err(|e| candle_core::Error::Msg(format!("{}: {from}: {e}", teacher_ck.path.display())))?;
        report.copied += 1;
        set(to, v)
    };
    copy("backbone.embedding.weight".into(), "model.embed_tokens.weight".into(), &[t.vocab_size, d])?;
    copy("backbone.final_layernorm.weight".into(), "model.norm.weight".into(), &[d])?;
    if !t.tie_word_embeddings {
        copy("lm_head.weight".into(), "lm_head.weight".into(), &[t.vocab_size, d])?;
    }
    for i in 0..t.num_hidden_layers {
        let (s, tp) = (format!("backbone.layers.{i}"), format!("model.layers.{i}"));
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            copy(format!("{s}.{norm}.weight"), format!("{tp}.{norm}.weight"), &[d])?;
        }
        for (p, shape) in [("gate_proj", [t.intermediate_size, d]), ("up_proj", [t.intermediate_size, d]), ("down_proj", [d, t.intermediate_size])] {
            copy(format!("{s}.mlp.{p}.weight"), format!("{tp}.mlp.{p}.weight"), &shape)?;
            if t.mlp_bias {
                copy(format!("{s}.mlp.{p}.bias"), format!("{tp}.mlp.{p}.bias"), &shape[..1])?;
            }
        }
    }
    // The mixers: in_proj rows [x (E) | B (H_qk·N) | C (H_qk·N) | z (E) | A_log (H_v)].
    let mut mixer_report = Vec::new();
    for i in 0..t.num_hidden_layers {
        let (s, tp) = (format!("backbone.layers.{i}.mixer"), format!("model.layers.{i}.self_attn"));
        let get = |p: &str, rows: usize| tvb.get((rows, d), &format!("{tp}.{p}.weight"));
        let (q, k, v, o) = (get("q_proj", th * hd)?, get("k_proj", kv * hd)?, get("v_proj", kv * hd)?, tvb.get((d, th * hd), &format!("{tp}.o_proj.weight"))?);
        let in_proj = {
            use rand::{rngs::StdRng, Rng, SeedableRng};
            let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let rows = 2 * e + 2 * hq * n + hv;
            let bound = 1.0 / (d as f32).sqrt();
            Tensor::from_vec((0..rows * d).map(|_| rng.random_range(-bound..bound)).collect::<Vec<f32>>(), (rows, d), dev)?
        };
        let mut r = Vec::new();
        // (teacher rows or None, row count) of x, B, C in order; a None keeps the seeded rows.
        let slots = [
            (fit_rows(&v, kv, hd, th, e, e / hv, "v_proj", "x", &mut r)?, e),
            (fit_rows(&k, kv, hd, th, hq * n, n, "k_proj", "B", &mut r)?, hq * n),
            (fit_rows(&(q / (hd as f64).sqrt())?, th, hd, th, hq * n, n, "q_proj / √head_dim", "C", &mut r)?, hq * n),
        ];
        let mut parts = Vec::new();
        let mut at = 0;
        for (w, rows) in slots {
            parts.push(match w {
                Some(w) => w,
                None => in_proj.narrow(0, at, rows)?,
            });
            at += rows;
        }
        parts.push(in_proj.narrow(0, at, in_proj.dim(0)? - at)?); // z, A_log: as initialised
        set(format!("{s}.in_proj.weight"), Tensor::cat(&parts, 0)?)?;
        if o.dims() == [d, e] {
            set(format!("{s}.out_proj.weight"), o)?;
            r.push("out_proj ← o_proj".into());
        } else {
            r.push(format!("out_proj: random (o_proj is {:?})", o.dims()));
        }
        // Identity conv (the current token's tap 1) and no skip: at initialisation the mixer reads x, B, C
        // exactly as the attention read V, K, Q.
        let (cd, kw) = (mixer.conv_dim(), mixer.d_conv);
        let mut taps = vec![0f32; cd * kw];
        (0..cd).for_each(|c| taps[c * kw + kw - 1] = 1.0);
        set(format!("{s}.conv1d.weight"), Tensor::from_vec(taps, (cd, 1, kw), dev)?)?;
        if mixer.conv_bias {
            set(format!("{s}.conv1d.bias"), Tensor::zeros(cd, DType::F32, dev)?)?;
        }
        set(format!("{s}.D"), Tensor::zeros(hv, DType::F32, dev)?)?;
        if i == 0 {
            if t.attention_bias {
                r.push("q/k/v/o biases not transferred (the mixer has none)".into());
            }
            if (t.rms_norm_eps - 1e-5).abs() > 1e-12 {
                r.push(format!("block norms use eps 1e-5 (Llamba's), the teacher's {}", t.rms_norm_eps));
            }
            mixer_report = r;
        }
    }
    report.mixer = mixer_report;
    Ok((Student { cfg, varmap, model }, report))
}

/// A student saved by [`save_student`] (an earlier stage), as trainable parameters on `dev`.
pub fn load_student(dir: &Path, dev: &Device) -> Result<Student> {
    let ck = Checkpoint::open(dir)?;
    let (cfg, rows) = Llamba::config_of(&ck)?;
    let varmap = VarMap::new();
    let model = Llamba::new(cfg.clone(), rows, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    let vb = ck.var_builder(DType::F32, dev, &[]);
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = vb.get(var.dims(), name).map_err(|e| candle_core::Error::Msg(format!("{}: {name}: {e}", dir.display())))?;
        var.set(&t)?;
    }
    Ok(Student { cfg, varmap, model })
}

/// The settings of a distillation run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillSpec {
    /// Stages to run, in order (1, 2, 3).
    pub stages: Vec<u8>,
    /// Token budget of stages 1, 2, 3.
    pub tokens: [u64; 3],
    pub batch_size: usize,
    pub seq_len: usize,
    /// Peak learning rate of stages 1, 2, 3 (warm-up over the first 10% of steps, cosine to a tenth).
    pub lr: [f64; 3],
    pub temperature: f64,
    pub grad_clip: f64,
    pub seed: u64,
    /// Held-out tokens for the perplexities.
    pub eval_tokens: usize,
    /// Wall-clock budget of stages 1, 2, 3 in seconds, instead of `tokens`: the step count is fixed from
    /// the step time measured on 8 passes that update nothing (the first 3 untimed: they carry one-off
    /// start-up costs), and the learning-rate schedule follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<[f64; 3]>,
    /// Compute in bf16: the teacher (loaded in bf16 by the caller) and the student's forward and backward
    /// ([`Student::cast`]); the student's parameters, the optimizer and the losses stay f32.
    #[serde(default)]
    pub bf16: bool,
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillMetric {
    pub stage: u8,
    pub step: usize,
    pub tokens: u64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub teacher_ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub student_ppl: Option<f64>,
}

/// What a run measured, per stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageResult {
    pub stage: u8,
    pub steps: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub teacher_ppl: f64,
    pub student_ppl: f64,
    pub checkpoint: String,
}

/// Where a step's time goes, with OURO_DISTILL_PROFILE=1: the device is synchronised at each mark and the
/// time since the previous mark added to a phase (teacher forward, student forward and loss, backward and
/// gradient accumulation, optimizer step). Stages 1 and 2 interleave the student's forward and backward
/// per layer: both go to the backward phase there.
mod phases {
    use candle_core::{Device, Result};
    use std::sync::Mutex;
    use std::time::Instant;
    pub const NAMES: [&str; 4] = ["teacher forward", "student forward + loss", "backward + accumulate", "optimizer"];
    static STATE: Mutex<Option<([f64; 4], Instant)>> = Mutex::new(None);

    pub fn enabled() -> bool {
        std::env::var_os("OURO_DISTILL_PROFILE").is_some()
    }
    /// Starts a step (and profiling, when enabled).
    pub fn start(dev: &Device) -> Result<()> {
        if enabled() {
            dev.synchronize()?;
            let mut s = STATE.lock().unwrap();
            let acc = s.map(|(a, _)| a).unwrap_or_default();
            *s = Some((acc, Instant::now()));
        }
        Ok(())
    }
    /// The time since the last mark goes to phase `i`.
    pub fn mark(dev: &Device, i: usize) -> Result<()> {
        if STATE.lock().unwrap().is_some() {
            dev.synchronize()?;
            if let Some((acc, t)) = STATE.lock().unwrap().as_mut() {
                acc[i] += t.elapsed().as_secs_f64();
                *t = Instant::now();
            }
        }
        Ok(())
    }
    /// The accumulated phases, reset.
    pub fn take() -> Option<[f64; 4]> {
        STATE.lock().unwrap().take().map(|(a, _)| a)
    }
}

/// Mean of the per-layer stage-1 losses, ‖T_s − A_t‖²_F / (b·heads·l), for one batch; with `backward`,
/// each layer's gradients are added into `acc` as it goes (one graph alive at a time).
fn stage1_loss(teacher: &Llama, student: &Llamba, ids: &Tensor, mut acc: Option<(&AdamW, &mut Vec<Option<Tensor>>)>) -> Result<f64> {
    let (hs, _) = teacher.forward_hidden(ids, None)?;
    phases::mark(ids.device(), 0)?;
    let n = teacher.cfg.num_hidden_layers;
    let mut total = 0.0;
    for i in 0..n {
        let h = hs[i].detach();
        let want = teacher.attention_matrix(i, &h)?.detach();
        let got = student.mixer_matrix(i, &h)?;
        if got.dims() != want.dims() {
            bail!("stage 1: the student's mixer matrix is {:?}, the teacher's attention {:?} (n_v_heads must equal the teacher's heads)", got.dims(), want.dims());
        }
        let (b, heads, l, _) = got.dims4()?;
        let loss = ((got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?.sqr()?.sum_all()? / (b * heads * l) as f64)?;
        total += scalar(&loss, 1, i)?;
        if let Some((opt, acc)) = acc.as_mut() {
            opt.accumulate(acc, &(loss / n as f64)?.backward()?)?;
        }
    }
    phases::mark(ids.device(), 2)?;
    Ok(total / n as f64)
}

/// Mean of the per-block stage-2 losses, mean((block_s(h_i) − h_{i+1})²).
fn stage2_loss(teacher: &Llama, student: &Llamba, ids: &Tensor, mut acc: Option<(&AdamW, &mut Vec<Option<Tensor>>)>) -> Result<f64> {
    let (hs, _) = teacher.forward_hidden(ids, None)?;
    phases::mark(ids.device(), 0)?;
    let n = teacher.cfg.num_hidden_layers;
    let mut total = 0.0;
    for i in 0..n {
        let pred = student.layer_forward(i, &hs[i].detach(), None)?;
        let loss = (pred.to_dtype(DType::F32)? - hs[i + 1].detach().to_dtype(DType::F32)?)?.sqr()?.mean_all()?;
        total += scalar(&loss, 2, i)?;
        if let Some((opt, acc)) = acc.as_mut() {
            opt.accumulate(acc, &(loss / n as f64)?.backward()?)?;
        }
    }
    phases::mark(ids.device(), 2)?;
    Ok(total / n as f64)
}

/// T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), mean over tokens.
pub fn kd_loss(student_logits: &Tensor, teacher_logits: &Tensor, temperature: f64) -> Result<Tensor> {
    let t = temperature;
    let vocab = teacher_logits.dim(D::Minus1)?;
    let s = student_logits.to_dtype(DType::F32)?.narrow(D::Minus1, 0, vocab)?;
    let lt = candle_nn::ops::log_softmax(&(teacher_logits.to_dtype(DType::F32)? / t)?, D::Minus1)?;
    let ls = candle_nn::ops::log_softmax(&(s / t)?, D::Minus1)?;
    let tokens = lt.elem_count() / vocab;
    let kl = (lt.exp()? * (lt - ls)?)?.sum_all()?;
    kl * (t * t / tokens as f64)
}

fn stage3_loss(teacher: &Llama, student: &Llamba, ids: &Tensor, temperature: f64, acc: Option<(&AdamW, &mut Vec<Option<Tensor>>)>) -> Result<f64> {
    let zt = teacher.forward(ids, None, None)?.detach();
    phases::mark(ids.device(), 0)?;
    let zs = student.forward(ids, None, None)?;
    let loss = kd_loss(&zs, &zt, temperature)?;
    let v = scalar(&loss, 3, 0)?;
    phases::mark(ids.device(), 1)?;
    if let Some((opt, acc)) = acc {
        opt.accumulate(acc, &loss.backward()?)?;
    }
    phases::mark(ids.device(), 2)?;
    Ok(v)
}

fn scalar(loss: &Tensor, stage: u8, layer: usize) -> Result<f64> {
    let v = loss.to_scalar::<f32>()? as f64;
    if !v.is_finite() {
        bail!("stage {stage}: the loss is {v} (layer {layer})");
    }
    Ok(v)
}

/// Perplexity of `model` over up to `tokens` held-out tokens (targets across document boundaries not
/// scored).
pub fn perplexity(model: &dyn LanguageModel, valid: &Stream, batch: usize, seq_len: usize, tokens: usize) -> Result<f64> {
    let (mut total, mut count) = (0f64, 0f64);
    for rows in valid.sequential(batch, seq_len, tokens) {
        let b = batch_from_rows(rows, seq_len, model.device())?;
        let n = b.weights.sum_all()?.to_scalar::<f32>()? as f64;
        total += batch_loss(model, &b)?.to_scalar::<f32>()? as f64 * n;
        count += n;
    }
    if count == 0.0 {
        bail!("perplexity: the held-out text has fewer than seq_len + 1 = {} tokens", seq_len + 1);
    }
    Ok((total / count).exp())
}

/// Saves the student in the Llamba checkpoint layout (config.json, model.safetensors, the tokenizer) in
/// `dir`, atomically (a temporary folder renamed over the old one).
pub fn save_student(student: &Student, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    write_folder(dir, |tmp| write_student(student, tokenizer, tmp))
}

fn write_student(student: &Student, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let mut config = serde_json::to_value(&student.cfg).map_err(candle_core::Error::wrap)?;
    config.as_object_mut().expect("object").insert("model_type".into(), "llamba".into());
    tokenizer.save_for_folder(dir, &mut config)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.display())))?;
    student.varmap.save(dir.join("model.safetensors"))
}

/// The student's parameters a stage trains: the mixers (stages 1, 2) or everything (stage 3).
fn trainable(student: &Student, stage: u8) -> Vec<(String, candle_core::Var)> {
    let data = student.varmap.data().lock().unwrap();
    let mut v: Vec<(String, candle_core::Var)> = data.iter().filter(|(k, _)| stage == 3 || k.contains(".mixer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// With a time budget, the step time is measured before the stage's first step, on TIMED_FROM + TIMED_STEPS
/// forward and backward passes that update nothing (the first TIMED_FROM carry one-off start-up costs and are
/// not timed); their time counts against the budget. The steps then follow the schedule of a token budget of
/// the step count that fits.
const TIMED_FROM: usize = 3;
const TIMED_STEPS: usize = 5;

/// When a run stops early to be resumed later (a machine lent for a few minutes at a time): after `Seconds`
/// of this process's run (checked before each step, before a stage's timing passes and before its
/// evaluation, against the slowest step seen so far) or after `Steps` optimizer steps in this process.
#[derive(Clone, Copy, Debug)]
pub enum PauseAfter {
    Seconds(f64),
    Steps(usize),
}

/// Where a paused run stands (`out/resume/resume.json`, beside the student and the optimizer state).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumePoint {
    pub spec: DistillSpec,
    /// The stage in progress (an index into `spec.stages`), its next step and its step count (still
    /// provisional when a time budget had not been measured yet).
    pub stage_index: usize,
    pub step: usize,
    pub steps: usize,
    /// The stage's first and latest loss (none before its first step).
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// The stage's seconds in earlier processes.
    pub seconds: f64,
    pub teacher_ppl: f64,
    /// The stages finished before.
    pub results: Vec<StageResult>,
}

/// How a call to [`distill`] ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    Done(Vec<StageResult>),
    /// Paused: `out/resume/` holds what [`load_resume`] needs to go on.
    /// `steps`: the stage's step count, None while a time budget has not been measured yet.
    Paused { stage: u8, step: usize, steps: Option<usize> },
}

const PROVISIONAL: usize = usize::MAX / 2;

/// A stage's step count, None while it is provisional (a time budget not yet measured).
fn measured(steps: usize) -> Option<usize> {
    (steps != PROVISIONAL).then_some(steps)
}

/// A paused run in `out/resume/`: where it stands, the student (f32 parameters on `dev`) and the optimizer
/// state of the stage in progress.
pub fn load_resume(out: &Path, dev: &Device) -> Result<(ResumePoint, Student, std::collections::HashMap<String, Tensor>)> {
    // resume.json is written last into resume.tmp/, which then replaces resume/: a process stopped between
    // the two steps leaves a complete resume.tmp/ and no resume/.
    let dir = [out.join("resume"), out.join("resume.tmp")].into_iter().find(|d| d.join("resume.json").exists()).unwrap_or_else(|| out.join("resume"));
    let file = dir.join("resume.json");
    let text = std::fs::read_to_string(&file).map_err(|e| candle_core::Error::Msg(format!("{}: {e} (no paused run to resume in {})", file.display(), out.display())))?;
    let point: ResumePoint = serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
    if point.stage_index >= point.spec.stages.len() || point.step > point.steps {
        bail!("{}: stage index {} / step {} of {} do not fit the run's stages {:?}", file.display(), point.stage_index, point.step, point.steps, point.spec.stages);
    }
    let student = load_student(&dir, dev)?;
    let opt_file = dir.join("optimizer.safetensors");
    let opt = if opt_file.exists() { candle_core::safetensors::load(&opt_file, dev).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", opt_file.display())))? } else { Default::default() };
    Ok((point, student, opt))
}

/// Runs `spec.stages` on the student. After each stage: a checkpoint in `out/stage{k}`, the perplexities
/// of teacher and student on `valid`, metrics in `out/metrics.jsonl`. `log` receives progress lines.
/// `resume` continues a paused run (from [`load_resume`], with the student it returned); `pause` stops
/// this call early, leaving `out/resume/` (the student, the optimizer's moments, the step): the resumed
/// run takes the same batches and learning rates as one that was never paused.
#[allow(clippy::too_many_arguments)]
pub fn distill(
    teacher: &Llama,
    student: &Student,
    tokenizer: &Tokenizer,
    train: &Stream,
    valid: &Stream,
    spec: &DistillSpec,
    out: &Path,
    resume: Option<(ResumePoint, std::collections::HashMap<String, Tensor>)>,
    pause: Option<PauseAfter>,
    progress: bool,
    log: &mut dyn FnMut(&str),
) -> Result<Outcome> {
    std::fs::create_dir_all(out).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", out.display())))?;
    let metrics = out.join("metrics.jsonl");
    let write = |m: &DistillMetric| -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&metrics).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", metrics.display())))?;
        writeln!(f, "{}", serde_json::to_string(m).unwrap()).map_err(candle_core::Error::wrap)
    };
    let dev = teacher.device().clone();
    let dtype = if spec.bf16 { DType::BF16 } else { DType::F32 };
    let started = Instant::now();
    let (teacher_ppl, mut results, first_stage, mut at) = match resume {
        Some((point, opt_state)) => {
            let stage = point.spec.stages[point.stage_index];
            log(&format!("resuming stage {stage} at step {} of {}", point.step, measured(point.steps).map_or("(not yet measured)".into(), |n| n.to_string())));
            // Lines a process wrote after the pause it resumes from (one stopped without pausing) are dropped.
            if let Ok(text) = std::fs::read_to_string(&metrics) {
                let kept: Vec<&str> = text
                    .lines()
                    .filter(|l| serde_json::from_str::<DistillMetric>(l).is_ok_and(|m| m.stage < stage || (m.stage == stage && m.step <= point.step && m.loss.is_some())))
                    .collect();
                crate::write_file(&metrics, kept.iter().map(|l| format!("{l}\n")).collect::<String>())?;
            }
            (point.teacher_ppl, point.results.clone(), point.stage_index, Some((point, opt_state)))
        }
        None => {
            // A fresh run: no metrics and no paused state of an earlier run in this folder.
            let _ = std::fs::remove_file(&metrics);
            let _ = std::fs::remove_dir_all(out.join("resume"));
            let teacher_ppl = perplexity(teacher, valid, spec.batch_size, spec.seq_len, spec.eval_tokens)?;
            let cast = student.cast(dtype)?;
            let start_ppl = perplexity(cast.as_ref().unwrap_or(&student.model), valid, spec.batch_size, spec.seq_len, spec.eval_tokens)?;
            log(&format!("held-out perplexity: teacher {teacher_ppl:.3}, student at initialisation {start_ppl:.3}"));
            write(&DistillMetric { stage: 0, step: 0, tokens: 0, seconds: 0.0, loss: None, lr: None, teacher_ppl: Some(teacher_ppl), student_ppl: Some(start_ppl) })?;
            (teacher_ppl, Vec::new(), 0, None)
        }
    };
    let mut steps_here = 0usize; // optimizer steps taken in this call
    let mut slowest = 0f64; // the slowest step of this call, s
    for (index, &stage) in spec.stages.iter().enumerate().skip(first_stage) {
        if !(1..=3).contains(&stage) {
            bail!("distill: stage {stage} does not exist (1, 2 or 3)");
        }
        let per_step = (spec.batch_size * spec.seq_len) as u64;
        let seconds = spec.seconds.map(|s| s[stage as usize - 1]);
        let lr = spec.lr[stage as usize - 1];
        let mut opt = AdamW::new(trainable(student, stage), 0.9, 0.95, 1e-8, if stage == 3 { 0.1 } else { 0.0 })?;
        let (mut step, mut steps, mut first, mut last, prior) = match at.take() {
            Some((p, opt_state)) => {
                if p.step > 0 {
                    opt.load_state(&opt_state).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", out.join("resume/optimizer.safetensors").display())))?;
                }
                (p.step, p.steps, p.first_loss.unwrap_or(f64::NAN), p.last_loss.unwrap_or(f64::NAN), p.seconds)
            }
            None => {
                let steps = match seconds {
                    Some(s) if !(s > 0.0) => bail!("distill: stage {stage} has a time budget of {s} s"),
                    // Provisional: fixed from the step time measured before the first step.
                    Some(_) => PROVISIONAL,
                    None => {
                        let budget = spec.tokens[stage as usize - 1];
                        if budget < per_step {
                            bail!("distill: stage {stage} has {budget} tokens, less than one step of {per_step} (batch × seq_len)");
                        }
                        (budget / per_step) as usize
                    }
                };
                match seconds {
                    Some(s) => log(&format!("stage {stage}: {s} s of steps of {per_step} tokens, lr {lr}, {} parameter tensors", opt.params.len())),
                    None => log(&format!("stage {stage}: {steps} steps of {per_step} tokens, lr {lr}, {} parameter tensors", opt.params.len())),
                }
                (0, steps, f64::NAN, f64::NAN, 0.0)
            }
        };
        let bar = progress.then(|| {
            let b = indicatif::ProgressBar::new(if steps == PROVISIONAL { 0 } else { steps as u64 });
            b.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").unwrap());
            b.set_position(step as u64);
            b
        });
        let t0 = Instant::now();
        let stage_start = step;
        // Pauses (saves OUT/resume/ and returns) when the work ahead, `ahead` times the slowest step of this
        // call, would run past the --pause-after time, or after the given number of optimizer steps.
        macro_rules! pause_if_due {
            ($ahead:expr) => {
                let due = match pause {
                    Some(PauseAfter::Seconds(s)) => started.elapsed().as_secs_f64() + $ahead as f64 * slowest > s,
                    Some(PauseAfter::Steps(n)) => steps_here >= n,
                    None => false,
                };
                if due {
                    if let Some(b) = &bar {
                        b.finish_and_clear();
                    }
                    let point = ResumePoint { spec: spec.clone(), stage_index: index, step, steps, first_loss: first.is_finite().then_some(first), last_loss: last.is_finite().then_some(last), seconds: prior + t0.elapsed().as_secs_f64(), teacher_ppl, results };
                    save_resume(student, tokenizer, &opt, &point, &out.join("resume"))?;
                    log(&format!("paused at stage {stage} step {step} of {}; saved {} (resume with --resume)", measured(steps).map_or("?".into(), |n| n.to_string()), out.join("resume").display()));
                    return Ok(Outcome::Paused { stage, step, steps: measured(steps) });
                }
            };
        }
        // One forward and backward pass on the batch of `step`: the loss, its gradients added into `acc`.
        let pass = |step: usize, opt: &AdamW, acc: &mut Vec<Option<Tensor>>| -> Result<f64> {
            let batch = train.sample(spec.batch_size, spec.seq_len, spec.seed ^ (stage as u64) << 32, step as u64, 0, None, &dev)?;
            phases::start(&dev)?;
            let cast = student.cast(dtype)?;
            phases::mark(&dev, 1)?; // the bf16 copy: the student's part
            let model = cast.as_ref().unwrap_or(&student.model);
            match stage {
                1 => stage1_loss(teacher, model, &batch.inputs, Some((opt, acc))),
                2 => stage2_loss(teacher, model, &batch.inputs, Some((opt, acc))),
                _ => stage3_loss(teacher, model, &batch.inputs, spec.temperature, Some((opt, acc))),
            }
            .map_err(|e| candle_core::Error::Msg(format!("stage {stage} step {step}: {e}")))
        };
        if let (Some(budget), true) = (seconds, steps == PROVISIONAL) {
            pause_if_due!(TIMED_FROM + TIMED_STEPS + 2);
            let mut timed_from = Instant::now();
            for i in 0..TIMED_FROM + TIMED_STEPS {
                if i == TIMED_FROM {
                    dev.synchronize()?;
                    timed_from = Instant::now();
                }
                // A whole step's work: the passes, the gradient norm and an optimizer update at learning
                // rate 0 (the weights stay as they are; the moments and step count are put back after).
                let mut acc = Vec::new();
                pass(i, &opt, &mut acc)?;
                AdamW::grad_norm(&acc)?;
                let kept = opt.state()?;
                opt.step(&acc, 0.0, 1.0)?;
                opt.load_state(&kept)?;
            }
            dev.synchronize()?;
            let per = timed_from.elapsed().as_secs_f64() / TIMED_STEPS as f64;
            let _ = phases::take(); // the timing passes are not steps
            steps = (((budget - prior - t0.elapsed().as_secs_f64()) / per) as usize).max(1);
            log(&format!("stage {stage}: {per:.3} s per step → {steps} steps in {budget} s"));
            if let Some(b) = &bar {
                b.set_length(steps as u64);
            }
        }
        while step < steps {
            pause_if_due!(2);
            let step_start = Instant::now();
            let rate = lr_at(step, steps, steps / 10, lr, lr / 10.0);
            let mut acc = Vec::new();
            let loss = pass(step, &opt, &mut acc)?;
            let norm = AdamW::grad_norm(&acc)?;
            let scale = if spec.grad_clip > 0.0 && norm > spec.grad_clip { spec.grad_clip / (norm + 1e-6) } else { 1.0 };
            opt.step(&acc, rate, scale)?;
            phases::mark(&dev, 3)?;
            if step == 0 {
                first = loss;
            }
            last = loss;
            steps_here += 1;
            slowest = slowest.max(step_start.elapsed().as_secs_f64());
            write(&DistillMetric { stage, step: step + 1, tokens: (step as u64 + 1) * per_step, seconds: prior + t0.elapsed().as_secs_f64(), loss: Some(loss), lr: Some(rate), teacher_ppl: None, student_ppl: None })?;
            match &bar {
                Some(b) => {
                    b.set_position(step as u64 + 1);
                    b.set_message(format!("stage {stage} loss {loss:.4}"));
                }
                None if (step + 1) % 10 == 0 || step + 1 == steps => log(&format!("stage {stage} step {}/{steps}: loss {loss:.5}", step + 1)),
                None => {}
            }
            step += 1;
        }
        // The stage's checkpoint and held-out evaluation: about two steps' work.
        pause_if_due!(2);
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let seconds = prior + t0.elapsed().as_secs_f64();
        if let Some(p) = phases::take() {
            let per: Vec<String> = p.iter().zip(phases::NAMES).map(|(t, n)| format!("{n} {:.3}", t / (steps - stage_start).max(1) as f64)).collect();
            log(&format!("stage {stage} profile, s per step (device synchronised): {}", per.join(", ")));
        }
        let dir = out.join(format!("stage{stage}"));
        save_student(student, tokenizer, &dir)?;
        let cast = student.cast(dtype)?;
        let student_ppl = perplexity(cast.as_ref().unwrap_or(&student.model), valid, spec.batch_size, spec.seq_len, spec.eval_tokens)?;
        log(&format!("stage {stage}: loss {first:.5} → {last:.5} in {seconds:.1} s; perplexity teacher {teacher_ppl:.3}, student {student_ppl:.3}; saved {}", dir.display()));
        write(&DistillMetric { stage, step: steps, tokens: steps as u64 * per_step, seconds, loss: None, lr: None, teacher_ppl: Some(teacher_ppl), student_ppl: Some(student_ppl) })?;
        results.push(StageResult { stage, steps, tokens: steps as u64 * per_step, seconds, first_loss: first, last_loss: last, teacher_ppl, student_ppl, checkpoint: dir.display().to_string() });
    }
    let _ = std::fs::remove_dir_all(out.join("resume")); // finished: nothing left to resume
    plot(&metrics, &out.join("loss.svg"))?;
    Ok(Outcome::Done(results))
}

/// `dir` (atomically): the student as [`save_student`] writes it, the optimizer's state and `resume.json`.
fn save_resume(student: &Student, tokenizer: &Tokenizer, opt: &AdamW, point: &ResumePoint, dir: &Path) -> Result<()> {
    write_folder(dir, |tmp| {
        write_student(student, tokenizer, tmp)?;
        candle_core::safetensors::save(&opt.state()?, tmp.join("optimizer.safetensors"))?;
        let file = tmp.join("resume.json");
        std::fs::write(&file, serde_json::to_string_pretty(point).unwrap()).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))
    })
}

/// One panel per stage: its loss against tokens.
fn plot(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", metrics.display())))?;
    let rows: Vec<DistillMetric> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let names = ["stage 1: matrix orientation", "stage 2: hidden-state alignment", "stage 3: knowledge distillation"];
    let panels: Vec<crate::plot::Panel> = (1..=3u8)
        .filter_map(|s| {
            let pts: Vec<(f64, f64)> = rows.iter().filter(|m| m.stage == s).filter_map(|m| m.loss.map(|l| (m.tokens as f64, l))).collect();
            (!pts.is_empty()).then(|| crate::plot::Panel { title: names[s as usize - 1].into(), x_desc: "tokens".into(), y_desc: "loss".into(), log_y: true, series: vec![("loss".into(), pts)] })
        })
        .collect();
    if panels.is_empty() {
        return Ok(());
    }
    crate::plot::plot_panels(&panels, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A random tiny Llama (GQA: 4 heads, 2 KV heads) saved as a checkpoint folder.
    fn tiny_teacher(dir: &Path) -> (Checkpoint, Llama) {
        let cfg = serde_json::json!({
            "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "hidden_act": "silu"
        });
        let lc: LlamaConfig = serde_json::from_value(cfg.clone()).unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        Llama::new(lc, vb).unwrap();
        // Random weights throughout (some layers start at zero by default), norms at one.
        // In name order: the same teacher in every call.
        let mut r = ouro_kernels::testing::Gen::new(5);
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            if var.rank() == 2 {
                var.set(&r.normal(var.dims(), 0.3)).unwrap();
            }
        }
        drop(data);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        vm.save(dir.join("model.safetensors")).unwrap();
        let ck = Checkpoint::open(dir).unwrap();
        let model = Llama::load(&ck, DType::F32, &Device::Cpu).unwrap();
        (ck, model)
    }

    fn ssm(n_qk: usize, n_v: usize, d_state: usize) -> LlambaSsmConfig {
        serde_json::from_value(serde_json::json!({"d_state": d_state, "n_v_heads": n_v, "n_qk_heads": n_qk})).unwrap()
    }

    fn stream(n: usize, vocab: u32, seed: u64) -> Stream {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut r = StdRng::seed_from_u64(seed);
        Stream::new(&[crate::data::Document { name: "random".into(), tokens: (0..n).map(|_| r.random_range(0..vocab)).collect() }])
    }

    #[test]
    fn attention_weights_map_onto_the_mixer() {
        let dir = std::env::temp_dir().join(format!("ouro-distill-init-{}", std::process::id()));
        let (ck, teacher) = tiny_teacher(&dir);
        // 4 query heads of 8, 2 KV heads: x (E = 32) ← V repeated ×2, B (4·8) ← K repeated ×2, C ← Q.
        let (st, report) = init_student(&ck, &teacher.cfg, ssm(4, 4, 8), 0, &Device::Cpu).unwrap();
        assert_eq!(report.mixer, vec!["x ← v_proj (KV heads repeated ×2)", "B ← k_proj (KV heads repeated ×2)", "C ← q_proj / √head_dim", "out_proj ← o_proj"]);
        let vars: HashMap<String, Tensor> = st.varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        let tvb = ck.var_builder(DType::F32, &Device::Cpu, &[]);
        let w = &vars["backbone.layers.1.mixer.in_proj.weight"]; // (2E + 2·H_qk·N + H_v, d) = (132, 32)
        assert_eq!(w.dims(), &[2 * 32 + 2 * 32 + 4, 32]);
        let v = tvb.get((16, 32), "model.layers.1.self_attn.v_proj.weight").unwrap();
        let k = tvb.get((16, 32), "model.layers.1.self_attn.k_proj.weight").unwrap();
        let q = tvb.get((32, 32), "model.layers.1.self_attn.q_proj.weight").unwrap();
        let rows = |t: &Tensor, a: usize, n: usize| t.narrow(0, a, n).unwrap();
        let same = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0;
        // x head h (8 rows) = V head h / 2; B likewise from K; C = Q.
        for h in 0..4 {
            assert!(same(&rows(w, 8 * h, 8), &rows(&v, 8 * (h / 2), 8)), "x head {h}");
            assert!(same(&rows(w, 32 + 8 * h, 8), &rows(&k, 8 * (h / 2), 8)), "B head {h}");
        }
        assert!(same(&rows(w, 64, 32), &(q / 8f64.sqrt()).unwrap())); // C ← Q / √head_dim
        let o = tvb.get((32, 32), "model.layers.1.self_attn.o_proj.weight").unwrap();
        assert!(same(&vars["backbone.layers.1.mixer.out_proj.weight"], &o));
        let up = tvb.get((48, 32), "model.layers.0.mlp.up_proj.weight").unwrap();
        assert!(same(&vars["backbone.layers.0.mlp.up_proj.weight"], &up));
        // The rest of in_proj (z, A_log) comes from the seed: the same seed, the same student.
        let (again, _) = init_student(&ck, &teacher.cfg, ssm(4, 4, 8), 0, &Device::Cpu).unwrap();
        assert!(same(w, again.varmap.data().lock().unwrap()["backbone.layers.1.mixer.in_proj.weight"].as_tensor()));
        // Fewer B/C rows than the attention has: B from K as is (2 heads of 8), C stays random.
        let (_, report) = init_student(&ck, &teacher.cfg, ssm(2, 4, 8), 0, &Device::Cpu).unwrap();
        assert_eq!(report.mixer[1], "B ← k_proj");
        assert!(report.mixer[2].starts_with("C: random"), "{:?}", report.mixer);
        // d_state 4 ≠ the attention's heads of 8: B and C are not K and Q sliced across heads.
        let (_, report) = init_student(&ck, &teacher.cfg, ssm(4, 4, 4), 0, &Device::Cpu).unwrap();
        assert!(report.mixer[1].starts_with("B: random (heads of 4") && report.mixer[2].starts_with("C: random"), "{:?}", report.mixer);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Runs `steps` of one stage on a fixed batch, computing in `dtype` (f32 parameters either way), and
    /// returns (loss before, loss after).
    fn train_stage(stage: u8, steps: usize, lr: f64, dtype: DType) -> (f64, f64) {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ouro-distill-s{stage}-{call}-{}", std::process::id()));
        let (ck, teacher) = tiny_teacher(&dir);
        let (st, _) = init_student(&ck, &teacher.cfg, ssm(4, 4, 8), 0, &Device::Cpu).unwrap();
        let teacher = Llama::load(&ck, dtype, &Device::Cpu).unwrap();
        let ids = stream(2000, 40, 1).sample(4, 24, 0, 0, 0, None, &Device::Cpu).unwrap().inputs;
        let mut opt = AdamW::new(trainable(&st, stage), 0.9, 0.95, 1e-8, 0.0).unwrap();
        let loss = |acc: Option<(&AdamW, &mut Vec<Option<Tensor>>)>| {
            let cast = st.cast(dtype).unwrap();
            let m = cast.as_ref().unwrap_or(&st.model);
            if dtype != DType::F32 {
                assert_eq!(m.forward(&ids, None, None).unwrap().dtype(), dtype, "the cast student computes in {dtype:?}");
            }
            match stage {
                1 => stage1_loss(&teacher, m, &ids, acc).unwrap(),
                2 => stage2_loss(&teacher, m, &ids, acc).unwrap(),
                _ => stage3_loss(&teacher, m, &ids, 1.0, acc).unwrap(),
            }
        };
        let before = loss(None);
        for _ in 0..steps {
            let mut acc = Vec::new();
            loss(Some((&opt, &mut acc)));
            opt.step(&acc, lr, 1.0).unwrap();
        }
        std::fs::remove_dir_all(&dir).ok();
        (before, loss(None))
    }

    #[test]
    fn stage1_matrix_loss_decreases() {
        let (a, b) = train_stage(1, 30, 1e-2, DType::F32);
        assert!(b < 0.5 * a, "stage 1 loss {a} → {b}");
    }

    #[test]
    fn stage2_hidden_state_loss_decreases() {
        let (a, b) = train_stage(2, 30, 1e-2, DType::F32);
        assert!(b < 0.5 * a, "stage 2 loss {a} → {b}");
    }

    #[test]
    fn stage3_kd_loss_decreases() {
        let (a, b) = train_stage(3, 30, 3e-3, DType::F32);
        assert!(b < 0.7 * a, "stage 3 loss {a} → {b}");
    }

    #[test]
    fn every_stage_trains_in_bf16_on_f32_parameters() {
        // Mixed precision: teacher and the student's computation in bf16, gradients through the casts
        // into the f32 parameters; the same steps as the f32 tests, the losses fall as far.
        for (stage, lr, frac) in [(1, 1e-2, 0.5), (2, 1e-2, 0.5), (3, 3e-3, 0.7)] {
            let (a, b) = train_stage(stage, 30, lr, DType::BF16);
            let (fa, fb) = train_stage(stage, 30, lr, DType::F32);
            eprintln!("stage {stage}: bf16 {a:.4} → {b:.4}, f32 {fa:.4} → {fb:.4}");
            assert!(b < frac * a, "stage {stage} bf16 loss {a} → {b}");
            assert!((a - fa).abs() < 0.05 * fa, "stage {stage}: the bf16 starting loss {a} is far from the f32 one {fa}");
        }
    }

    /// The student's parameters by name, as f32 vectors.
    fn params(st: &Student) -> Vec<(String, Vec<f32>)> {
        let data = st.varmap.data().lock().unwrap();
        let mut v: Vec<(String, Vec<f32>)> = data.iter().map(|(k, var)| (k.clone(), var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn a_paused_and_resumed_run_equals_one_run() {
        // All three stages straight through, and the same run paused every 3 optimizer steps (inside stages
        // and at their boundaries) and resumed from out/resume/ each time: the same losses, the same
        // student, bit for bit, and no resume folder left at the end.
        let dir = std::env::temp_dir().join(format!("ouro-distill-resume-{}", std::process::id()));
        let (ck, teacher) = tiny_teacher(&dir.join("teacher"));
        let (train, valid) = (stream(3000, 40, 1), stream(600, 40, 2));
        let spec = DistillSpec { stages: vec![1, 2, 3], tokens: [4 * 48 * 4, 4 * 48 * 5, 4 * 48 * 4], batch_size: 4, seq_len: 48, lr: [1e-2, 1e-2, 3e-3], temperature: 1.0, grad_clip: 1.0, seed: 3, eval_tokens: 192, seconds: None, bf16: false };
        let tok = Tokenizer::Bytes;
        let (one, _) = init_student(&ck, &teacher.cfg, ssm(4, 4, 8), 0, &Device::Cpu).unwrap();
        let Outcome::Done(straight) = distill(&teacher, &one, &tok, &train, &valid, &spec, &dir.join("one"), None, None, false, &mut |_| {}).unwrap() else { panic!("the straight run paused") };
        let out = dir.join("paused");
        let (mut st, _) = init_student(&ck, &teacher.cfg, ssm(4, 4, 8), 0, &Device::Cpu).unwrap();
        let mut resume = None;
        let mut pauses = Vec::new();
        let resumed = loop {
            match distill(&teacher, &st, &tok, &train, &valid, &spec, &out, resume.take(), Some(PauseAfter::Steps(3)), false, &mut |_| {}).unwrap() {
                Outcome::Done(r) => break r,
                Outcome::Paused { stage, step, .. } => {
                    pauses.push((stage, step));
                    if pauses.len() == 1 {
                        // As if the process stopped between removing resume/ and renaming resume.tmp/ over it.
                        std::fs::rename(out.join("resume"), out.join("resume.tmp")).unwrap();
                    }
                    // A line from a process stopped after the pause (not resumed from): dropped on resume.
                    let stray = DistillMetric { stage, step: step + 1, tokens: 0, seconds: 0.0, loss: Some(9.0), lr: None, teacher_ppl: None, student_ppl: None };
                    let mut text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
                    text.push_str(&format!("{}\n", serde_json::to_string(&stray).unwrap()));
                    std::fs::write(out.join("metrics.jsonl"), text).unwrap();
                    let (point, student, opt) = load_resume(&out, &Device::Cpu).unwrap();
                    st = student;
                    resume = Some((point, opt));
                }
            }
        };
        assert_eq!(pauses, vec![(1, 3), (2, 2), (2, 5), (3, 3)], "where the run paused (2, 5: before stage 2's evaluation)");
        assert_eq!(straight.len(), 3);
        for (a, b) in straight.iter().zip(&resumed) {
            assert_eq!((a.stage, a.steps, a.first_loss, a.last_loss), (b.stage, b.steps, b.first_loss, b.last_loss));
            // The held-out sums may add in another order (threads): equal to the last digits.
            assert!((a.student_ppl - b.student_ppl).abs() < 1e-9 * a.student_ppl, "stage {}: {} vs {}", a.stage, a.student_ppl, b.student_ppl);
        }
        assert_eq!(params(&one), params(&st), "the resumed student differs from the straight one");
        assert!(!out.join("resume").exists(), "a finished run leaves no resume folder");
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count();
        assert_eq!(lines, 1 + 4 + 5 + 4 + 3, "metrics: the start, one line per step, one per stage end");
        // Nothing to resume now: a clear error naming the folder.
        let err = load_resume(&out, &Device::Cpu).err().expect("no paused run").to_string();
        assert!(err.contains("resume.json") && err.contains("no paused run"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_time_budget_trains_as_the_token_budget_of_its_step_count() {
        // The timing passes before a time-budgeted stage update nothing (an optimizer step at learning rate
        // 0, its moments put back): the stage then trains exactly as a token budget of the step count it
        // fixed — same losses, same student, bit for bit.
        let dir = std::env::temp_dir().join(format!("ouro-distill-timed-{}", std::process::id()));
        let (ck, teacher) = tiny_teacher(&dir.join("teacher"));
        let (train, valid) = (stream(3000, 40, 1), stream(600, 40, 2));
        let mut spec = DistillSpec { stages: vec![3], tokens: [0; 3], batch_size: 4, seq_len: 48, lr: [1e-2, 1e-2, 3e-3], temperature: 1.0, grad_clip: 1.0, seed: 3, eval_tokens: 192, seconds: Some([1.0, 1.0, 0.2]), bf16: false };
        let run = |spec: &DistillSpec, out: &str| {
            let (st, _) = init_student(&ck, &teacher.cfg, ssm(4, 4, 8), 0, &Device::Cpu).unwrap();
            let Outcome::Done(r) = distill(&teacher, &st, &Tokenizer::Bytes, &train, &valid, spec, &dir.join(out), None, None, false, &mut |_| {}).unwrap() else { panic!("paused") };
            (r, params(&st))
        };
        let (timed, timed_params) = run(&spec, "timed");
        spec.seconds = None;
        spec.tokens[2] = (timed[0].steps * 4 * 48) as u64;
        let (tokens, token_params) = run(&spec, "tokens");
        assert_eq!((timed[0].steps, timed[0].first_loss, timed[0].last_loss), (tokens[0].steps, tokens[0].first_loss, tokens[0].last_loss));
        assert_eq!(timed_params, token_params, "the timing passes changed the student");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn kd_loss_is_zero_for_equal_logits_and_matches_the_definition() {
        let t = Tensor::new(&[[[1.0f32, 2.0, 0.5]], [[0.0, -1.0, 3.0]]], &Device::Cpu).unwrap();
        let s = Tensor::new(&[[[0.5f32, 1.0, 1.5]], [[1.0, 0.0, 2.0]]], &Device::Cpu).unwrap();
        assert!(kd_loss(&t, &t, 2.0).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-6);
        // By hand: T² · mean over tokens of Σ p_t (log p_t − log p_s), p = softmax(z / T).
        let temp = 2.0f64;
        let rows = [([1.0, 2.0, 0.5], [0.5, 1.0, 1.5]), ([0.0, -1.0, 3.0], [1.0, 0.0, 2.0])];
        let lsm = |z: [f64; 3]| {
            let m = z.iter().map(|v| v / temp).fold(f64::MIN, f64::max);
            let lse = m + z.iter().map(|v| (v / temp - m).exp()).sum::<f64>().ln();
            z.map(|v| v / temp - lse)
        };
        let want: f64 = rows.iter().map(|(zt, zs)| {
            let (lt, ls) = (lsm(*zt), lsm(*zs));
            (0..3).map(|i| lt[i].exp() * (lt[i] - ls[i])).sum::<f64>()
        }).sum::<f64>() / 2.0 * temp * temp;
        let got = kd_loss(&s, &t, temp).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
