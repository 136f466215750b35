//! `ouro distill`: MOHAWK distillation of a Llama teacher into a Llamba student.

use anyhow::{bail, Context, Result};
use ouro_nn::checkpoint::Checkpoint;
use ouro_nn::llama::Llama;
use ouro_nn::llamba::LlambaSsmConfig;
use ouro_nn::tokenizer::Tokenizer;
use ouro_train::distill::{distill, init_student, load_resume, load_student, DistillSpec, Outcome, PauseAfter};
use ouro_train::train::load_text;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DistillArgs {
    /// The teacher: a Llama checkpoint folder or GGUF file (e.g. SmolLM2-135M-Instruct).
    #[arg(long)]
    teacher: PathBuf,
    /// TOML with the student's `[ssm_cfg]` (d_state, n_v_heads, n_qk_heads, …); the rest comes from the
    /// teacher (configs/distill/llamba-135m.toml).
    #[arg(long)]
    student_config: PathBuf,
    /// A corpus name (`ouro data list`), a text file or a folder of .txt files; several joined by '+'.
    #[arg(long)]
    data: String,
    /// 1, 2, 3 or all (1 then 2 then 3).
    #[arg(long, default_value = "all")]
    stage: String,
    #[arg(long)]
    out: PathBuf,
    /// Start from a student checkpoint (an earlier stage's `DIR/stageK`) instead of the teacher's weights
    /// (its own config then applies; --student-config is only checked).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Token budgets of stages 1, 2, 3.
    #[arg(long, value_delimiter = ',', default_value = "1000000,1000000,4000000")]
    tokens: Vec<u64>,
    /// Wall-clock budgets of stages 1, 2, 3 in seconds, instead of --tokens (the step count is fixed
    /// from the step time measured first, on 8 passes that update nothing; they count against the budget).
    #[arg(long, value_delimiter = ',')]
    seconds: Option<Vec<f64>>,
    /// Peak learning rates of stages 1, 2, 3.
    #[arg(long, value_delimiter = ',', default_value = "1e-3,1e-3,3e-4")]
    lr: Vec<f64>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Softmax temperature of the stage-3 distillation loss.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out tokens for the perplexities.
    #[arg(long, default_value_t = 65536)]
    eval_tokens: usize,
    /// Fraction of the text (whole documents) held out.
    #[arg(long, default_value_t = 0.1)]
    valid_fraction: f64,
    /// Where named corpora are fetched to.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On CUDA, run f32 matmuls on the tensor cores in TF32 (10-bit mantissa products, f32 accumulation;
    /// PyTorch's `allow_tf32`). Parameters, activations and losses stay f32.
    #[arg(long)]
    tf32: bool,
    /// Compute in bf16: the teacher's weights and activations, the student's forward and backward; the
    /// student's parameters, optimizer state and losses stay f32 (mixed precision).
    #[arg(long)]
    bf16: bool,
    /// Stop after this many seconds (checked before each step, with room for two of the slowest steps),
    /// leaving the student, the optimizer state and the step in OUT/resume/ for --resume: for machines lent
    /// a few minutes at a time.
    #[arg(long)]
    pause_after: Option<f64>,
    /// Go on with the paused run in --out: its settings (stages, budgets, learning rates, batch, seed) come
    /// from OUT/resume/resume.json; --teacher, --data, --data-dir, --valid-fraction, --tf32 and --bf16 must
    /// be those of the paused run (checked).
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    quiet: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StudentFile {
    ssm_cfg: LlambaSsmConfig,
}

fn stages(s: &str) -> Result<Vec<u8>> {
    match s {
        "all" => Ok(vec![1, 2, 3]),
        "1" | "2" | "3" => Ok(vec![s.parse()?]),
        other => bail!("--stage '{other}': expected 1, 2, 3 or all"),
    }
}

fn three<T: Copy>(v: &[T], what: &str) -> Result<[T; 3]> {
    match *v {
        [a, b, c] => Ok([a, b, c]),
        _ => bail!("--{what}: give three comma-separated values (stages 1, 2, 3), got {}", v.len()),
    }
}

pub fn distill_cmd(a: DistillArgs) -> Result<()> {
    let dev = crate::device::parse(&a.device)?;
    if a.tf32 {
        if !dev.is_cuda() {
            bail!("--tf32 applies to CUDA matmuls; --device is {}", a.device);
        }
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let spec = DistillSpec {
        stages: stages(&a.stage)?,
        tokens: three(&a.tokens, "tokens")?,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        lr: three(&a.lr, "lr")?,
        temperature: a.temperature,
        grad_clip: a.grad_clip,
        seed: a.seed,
        eval_tokens: a.eval_tokens,
        seconds: a.seconds.as_deref().map(|s| three(s, "seconds")).transpose()?,
        bf16: a.bf16,
    };
    if a.batch_size == 0 || a.seq_len == 0 || a.temperature <= 0.0 {
        bail!("--batch-size and --seq-len must be positive, --temperature above 0");
    }
    if matches!(a.pause_after, Some(s) if !(s > 0.0)) {
        bail!("--pause-after must be a positive number of seconds");
    }
    let text = std::fs::read_to_string(&a.student_config).with_context(|| format!("{}", a.student_config.display()))?;
    let student_file: StudentFile = toml::from_str(&text).with_context(|| format!("{}", a.student_config.display()))?;
    let ck = Checkpoint::open(&a.teacher).with_context(|| format!("teacher {}", a.teacher.display()))?;
    let dtype = if a.bf16 { candle_core::DType::BF16 } else { candle_core::DType::F32 };
    let teacher = Llama::load(&ck, dtype, &dev).with_context(|| format!("teacher {} (a Llama checkpoint)", a.teacher.display()))?;
    let tokenizer = Tokenizer::for_checkpoint(&ck, None).with_context(|| format!("the teacher's tokenizer ({})", a.teacher.display()))?;
    if a.resume && a.init.is_some() {
        bail!("--resume continues the student in OUT/resume/; --init does not apply");
    }
    let resume = if a.resume { Some(load_resume(&a.out, &dev).with_context(|| format!("--resume in {}", a.out.display()))?) } else { None };
    if let Some((point, _, _)) = &resume {
        if point.spec.bf16 != a.bf16 {
            bail!("--resume: the paused run computed in {}; {} --bf16", if point.spec.bf16 { "bf16" } else { "f32" }, if point.spec.bf16 { "add" } else { "drop" });
        }
    }
    // What the run reads besides its spec: a resumed run must read the same (OUT/run.json, written at the start).
    let inputs = serde_json::json!({ "teacher": a.teacher, "data": a.data, "data_dir": a.data_dir, "valid_fraction": a.valid_fraction, "tf32": a.tf32 });
    let inputs_file = a.out.join("run.json");
    if resume.is_some() {
        if let Ok(text) = std::fs::read_to_string(&inputs_file) {
            let was: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", inputs_file.display()))?;
            for key in ["teacher", "data", "data_dir", "valid_fraction", "tf32"] {
                if was[key] != inputs[key] {
                    bail!("--resume: the paused run had --{} {} ({}), this command gives {}", key.replace('_', "-"), was[key], inputs_file.display(), inputs[key]);
                }
            }
        }
    } else {
        std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
        std::fs::write(&inputs_file, serde_json::to_string_pretty(&inputs)?).with_context(|| format!("{}", inputs_file.display()))?;
    }
    let (spec, resume) = match resume {
        Some((point, student, opt)) => (point.spec.clone(), Some((point, student, opt))),
        None => (spec, None),
    };
    let (train, valid) = load_text(&a.data, &a.data_dir, &tokenizer, a.valid_fraction, spec.seed, &mut |m| eprintln!("{m}")).with_context(|| format!("--data '{}'", a.data))?;
    if train.len() <= spec.seq_len || valid.len() <= spec.seq_len {
        bail!("--data '{}': {} training and {} held-out tokens; each needs more than --seq-len {}", a.data, train.len(), valid.len(), spec.seq_len);
    }
    let (student, resume) = match (resume, &a.init) {
        (Some((point, student, opt)), _) => (student, Some((point, opt))),
        (None, Some(dir)) => (load_student(dir, &dev).with_context(|| format!("--init {}", dir.display()))?, None),
        (None, None) => {
            let (st, report) = init_student(&ck, &teacher.cfg, student_file.ssm_cfg, a.seed, &dev)?;
            eprintln!("student: {} tensors copied from the teacher; mixers: {}", report.copied, report.mixer.join(", "));
            (st, None)
        }
    };
    let params: usize = student.varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    eprintln!("student: Llamba, {} layers, {params} parameters", student.cfg.n_layer);
    // OURO_CUDA_PROFILE=1: ouro's own CUDA kernels timed one by one (each synchronised), totals at the end.
    #[cfg(feature = "cuda")]
    let kernel_profile = std::env::var_os("OURO_CUDA_PROFILE").is_some() && dev.is_cuda();
    #[cfg(feature = "cuda")]
    if kernel_profile {
        ouro_kernels::cuda::profile(true);
    }
    let pause = a.pause_after.map(PauseAfter::Seconds);
    let outcome = distill(&teacher, &student, &tokenizer, &train, &valid, &spec, &a.out, resume, pause, !a.quiet, &mut |m| eprintln!("{m}"))?;
    #[cfg(feature = "cuda")]
    if kernel_profile {
        for (k, secs, calls) in ouro_kernels::cuda::profile(false) {
            eprintln!("  cuda kernel {k}: {:.3} s ({calls} launches)", secs);
        }
    }
    let results = match outcome {
        Outcome::Done(r) => r,
        Outcome::Paused { stage, step, steps } => {
            let of = steps.map(|n| format!(" of {n}")).unwrap_or_default();
            println!("{}", serde_json::json!({ "paused": { "stage": stage, "step": step, "steps": steps } }));
            eprintln!("paused in stage {stage} at step {step}{of}: run the same command with --resume to go on");
            return Ok(());
        }
    };
    let summary = serde_json::json!({ "teacher": a.teacher, "data": a.data, "spec": spec, "parameters": params, "stages": results });
    let text = serde_json::to_string_pretty(&summary)?;
    super::lm::write_atomic(&a.out.join("summary.json"), |tmp| Ok(std::fs::write(tmp, &text)?))?;
    println!("{}", serde_json::to_string(&summary["stages"])?);
    Ok(())
}
