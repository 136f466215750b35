//! The CPU inference engine for Mamba-2 language models: a fused per-layer decode step over plain
//! buffers (no tensor framework, no allocation per token) and a prefill through the chunked SSD with
//! large matmuls. Linear weights are f32, f16, Q8_0 or Q4_0 ([`QMatrix`]); the recurrent parameters
//! (A_log, D, dt_bias, conv, norms) and the state stay f32.
//!
//! ```text
//! step, per layer, for a batch of B tokens:
//!   u  = RMSNorm(h)                                   (B, d_model)
//!   zxbcdt = in_proj · u                              (B, d_in_proj)     one pass over the weights
//!   xBC = SiLU(conv1d over [conv state | xBC])        (B, conv_dim)      the state shifts by one
//!   per (b, head):  dt = softplus(dt + dt_bias);  dA = exp(dt·A)
//!                   s[p, :] = dA·s[p, :] + dt·x[p]·B        (P, N) read and written once
//!                   y[p] = s[p, :]·C + D·x[p]
//!   y = RMSNorm_group(y·SiLU(z))                      (B, d_ssm)
//!   h += out_proj · y                                 (B, d_model)
//! logits = lm_head · RMSNorm_f(h)                     (B, vocab)
//! ```
//!
//! The math is [`crate::mamba2::Mamba2`]'s (which is `mamba_ssm`'s); tests hold the two to 1e-4 with
//! f32 products. Two options trade exactness for speed where the CPU has AVX-512 BF16:
//! `bf16_matmul` (on by default there) runs prefill and steps of ≥ 8 sequences as bf16 matmuls over
//! packed copies of the weights (made on first use, 2 bytes per weight), and `state_bf16` (off by
//! default) stores the SSM state in bf16, halving the state traffic of batched decoding; tests bound
//! both against f32 (logits within 1% relative L2).

use crate::checkpoint::Checkpoint;
use crate::mamba2::Mamba2Config;
use crate::mamba_lm::{LayerKind, MambaLmConfig};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{bail, DType, Device, Result};
use ouro_kernels::bf16::PackedBf16;
use ouro_kernels::cpu::{exp, softplus, SendPtr};
use ouro_kernels::norm::gated_rms_norm_row;
use ouro_kernels::quant::{Format, QMatrix};
use ouro_kernels::ssd::{scan_chunked, Dims, ScanIn, CPU_CHUNK};
use ouro_kernels::Segments;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

/// The file a quantised checkpoint folder keeps its tensors in (beside `config.json`).
pub const QUANTIZED_FILE: &str = "model.gguf";

struct Layer {
    norm: Vec<f32>,
    in_proj: QMatrix,
    in_bias: Option<Vec<f32>>,
    /// (conv_dim, d_conv), as stored
    conv_w: Vec<f32>,
    /// (d_conv, conv_dim): the same taps, transposed for the decode step
    conv_wt: Vec<f32>,
    conv_b: Vec<f32>,
    dt_bias: Vec<f32>,
    /// A = −exp(A_log), (H)
    a: Vec<f32>,
    /// D per head (H) or per channel (H·P)
    d: Vec<f32>,
    norm_w: Option<Vec<f32>>,
    out_proj: QMatrix,
    out_bias: Option<Vec<f32>>,
    /// bf16 copies for prefill and batched decode, packed on first use.
    in_bf: OnceLock<PackedBf16>,
    out_bf: OnceLock<PackedBf16>,
}

/// The bf16 copy of `m`, packed on first use.
fn packed<'a>(cell: &'a OnceLock<PackedBf16>, m: &QMatrix) -> &'a PackedBf16 {
    cell.get_or_init(|| PackedBf16::pack(m.rows, m.cols, |j, buf| m.dequantize_row(j, buf)))
}

/// From this many sequences on, a decode step runs its products as bf16 matmuls (when enabled).
pub const BF16_BATCH: usize = 8;

/// A Mamba-2 LM ready for CPU inference.
pub struct Mamba2Engine {
    pub cfg: Mamba2Config,
    pub n_layer: usize,
    pub vocab: usize,
    eps: f32,
    /// (vocab, d_model); also the LM head when tied.
    embedding: QMatrix,
    lm_head: Option<QMatrix>,
    norm_f: Vec<f32>,
    layers: Vec<Layer>,
    head_bf: OnceLock<PackedBf16>,
    /// Run prefill and decode steps of ≥ [`BF16_BATCH`] sequences as bf16 matmuls (AVX-512 BF16;
    /// inputs rounded to bf16, f32 accumulation). On by default where the CPU has the instructions.
    pub bf16_matmul: bool,
    /// Store the SSM state in bf16 (math in f32): half the state traffic of batched decoding. Off by
    /// default; applies to states made by [`Mamba2Engine::new_state`] after it is set.
    pub state_bf16: bool,
}

/// The recurrent state of `batch` sequences: everything decoding needs, constant in the context length.
#[derive(Clone, Debug)]
pub struct EngineState {
    pub batch: usize,
    /// (batch, layer, d_conv − 1, conv_dim): the last inputs of the conv, oldest first.
    pub conv: Vec<f32>,
    /// (batch, layer, H, P, N), f32 (empty when the state is stored in bf16)
    pub ssm: Vec<f32>,
    /// (batch, layer, H, P, N) as bf16 bits, for engines with `state_bf16` (else empty)
    pub ssm_bf16: Vec<u16>,
}

impl EngineState {
    pub fn bytes(&self) -> usize {
        4 * (self.conv.len() + self.ssm.len()) + 2 * self.ssm_bf16.len()
    }

    /// Each sequence repeated `n` times in a row (sequence i becomes i·n … i·n + n − 1).
    pub fn repeat_interleave(&self, n: usize) -> EngineState {
        fn rep<T: Copy>(v: &[T], batch: usize, n: usize) -> Vec<T> {
            if v.is_empty() {
                return Vec::new();
            }
            let per = v.len() / batch;
            v.chunks_exact(per).flat_map(|s| std::iter::repeat_n(s, n).flatten().copied()).collect()
        }
        EngineState {
            batch: self.batch * n,
            conv: rep(&self.conv, self.batch, n),
            ssm: rep(&self.ssm, self.batch, n),
            ssm_bf16: rep(&self.ssm_bf16, self.batch, n),
        }
    }
}

/// Generation through the engine ([`crate::generate::generate_with`]): prefill in blocks, then batched steps.
pub struct EngineDecoder<'a> {
    engine: &'a Mamba2Engine,
    state: Option<(EngineState, Workspace)>,
}

impl<'a> EngineDecoder<'a> {
    pub fn new(engine: &'a Mamba2Engine) -> Self {
        Self { engine, state: None }
    }
}

impl crate::generate::Decoder for EngineDecoder<'_> {
    fn vocab_size(&self) -> usize {
        self.engine.vocab
    }

    fn start(&mut self, prompt: &[u32], n: usize) -> Result<Vec<f32>> {
        let mut st = self.engine.new_state(1);
        let last = self.engine.prefill(prompt, &mut st, 0)?;
        self.state = Some((st.repeat_interleave(n), self.engine.workspace(n)));
        Ok(last)
    }

    fn step(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let Some((st, ws)) = self.state.as_mut() else { bail!("engine decoder: step before start") };
        self.engine.step(tokens, st, ws)?;
        Ok(&ws.logits)
    }

    fn cache_bytes(&self) -> usize {
        self.state.as_ref().map_or(0, |(s, _)| s.bytes())
    }
}

impl EngineState {
    /// The floats of one sequence in each of the three state vectors.
    fn per_row(&self) -> (usize, usize, usize) {
        let b = self.batch.max(1);
        (self.conv.len() / b, self.ssm.len() / b, self.ssm_bf16.len() / b)
    }
}

/// Continuous batching ([`crate::sample::sample_with`]) through the engine: the state's rows are plain
/// slices, so a joining sequence is one row copied; a workspace is kept for the current batch size.
pub struct EngineBatcher<'a> {
    engine: &'a Mamba2Engine,
    ws: std::sync::Mutex<Option<Workspace>>,
}

impl<'a> EngineBatcher<'a> {
    pub fn new(engine: &'a Mamba2Engine) -> Self {
        Self { engine, ws: std::sync::Mutex::new(None) }
    }
}

impl crate::sample::Batcher for EngineBatcher<'_> {
    type State = EngineState;
    fn vocab_size(&self) -> usize {
        self.engine.vocab
    }
    fn prefill(&self, prompt: &[u32]) -> Result<(EngineState, Vec<f32>)> {
        let mut st = self.engine.new_state(1);
        let last = self.engine.prefill(prompt, &mut st, 0)?;
        Ok((st, last))
    }
    fn set_row(&self, batch: &mut EngineState, i: usize, src: &EngineState) -> Result<()> {
        if src.batch != 1 || i >= batch.batch {
            bail!("engine: set_row {i} of a batch of {} from a state of {} sequences", batch.batch, src.batch);
        }
        let (c, s, h) = batch.per_row();
        batch.conv[i * c..(i + 1) * c].copy_from_slice(&src.conv);
        batch.ssm[i * s..(i + 1) * s].copy_from_slice(&src.ssm);
        batch.ssm_bf16[i * h..(i + 1) * h].copy_from_slice(&src.ssm_bf16);
        Ok(())
    }
    fn gather(&self, parts: &[&EngineState], order: &[(usize, usize)]) -> Result<EngineState> {
        let mut out = self.engine.new_state(order.len());
        let (c, s, h) = out.per_row();
        for (r, &(k, i)) in order.iter().enumerate() {
            let Some(p) = parts.get(k).filter(|p| i < p.batch) else { bail!("engine: no row {i} in part {k}") };
            out.conv[r * c..(r + 1) * c].copy_from_slice(&p.conv[i * c..(i + 1) * c]);
            out.ssm[r * s..(r + 1) * s].copy_from_slice(&p.ssm[i * s..(i + 1) * s]);
            out.ssm_bf16[r * h..(r + 1) * h].copy_from_slice(&p.ssm_bf16[i * h..(i + 1) * h]);
        }
        Ok(out)
    }
    fn step(&self, batch: &mut EngineState, ids: &[u32]) -> Result<Vec<f32>> {
        let mut guard = self.ws.lock().map_err(|_| candle_core::Error::Msg("engine: workspace lock poisoned".into()))?;
        if guard.as_ref().is_none_or(|w| w.batch != batch.batch) {
            *guard = Some(self.engine.workspace(batch.batch));
        }
        let ws = guard.as_mut().expect("workspace set above");
        self.engine.step(ids, batch, ws)?;
        Ok(ws.logits.clone())
    }
}

/// Buffers a step reuses (sized for one batch): decoding allocates nothing per token.
pub struct Workspace {
    batch: usize,
    h: Vec<f32>,
    u: Vec<f32>,
    zx: Vec<f32>,
    xbc: Vec<f32>,
    y: Vec<f32>,
    /// y gated and normalised, the input of out_proj
    yn: Vec<f32>,
    out: Vec<f32>,
    pub logits: Vec<f32>,
}

/// Where tensors come from: an f32 checkpoint (quantised on load) or a quantised GGUF.
enum Stored {
    F32(Vec<f32>, Vec<usize>),
    Q(QMatrix),
}

struct Source {
    path: String,
    tensors: HashMap<String, Stored>,
}

impl Source {
    fn take(&mut self, names: &[&str]) -> Result<(String, Stored)> {
        for n in names {
            if let Some(t) = self.tensors.remove(*n) {
                return Ok((n.to_string(), t));
            }
        }
        bail!("{}: missing tensor '{}'", self.path, names[0])
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (n, t) = self.take(&[name])?;
        let v = match t {
            Stored::F32(v, _) => v,
            Stored::Q(m) => m.dequantize(),
        };
        if v.len() != len {
            bail!("{}: tensor '{n}' has {} values, expected {len}", self.path, v.len());
        }
        Ok(v)
    }
    fn matrix(&mut self, names: &[&str], rows: usize, cols: usize, fmt: Format) -> Result<QMatrix> {
        let (n, t) = self.take(names)?;
        match t {
            Stored::F32(v, shape) => {
                if v.len() != rows * cols || shape.first() != Some(&rows) {
                    bail!("{}: tensor '{n}' has shape {shape:?}, expected [{rows}, {cols}]", self.path);
                }
                let fmt = if fmt.supports(cols) { fmt } else { Format::F32 };
                Ok(QMatrix::quantize(&v, rows, cols, fmt))
            }
            Stored::Q(m) => {
                if (m.rows, m.cols) != (rows, cols) {
                    bail!("{}: tensor '{n}' is {}×{}, expected {rows}×{cols}", self.path, m.rows, m.cols);
                }
                Ok(m)
            }
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// RMSNorm of one row (the norm kernel's row, ungated, one group).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    gated_rms_norm_row(x, None, w, eps, x.len(), false, out);
}

/// Reads a quantised checkpoint's GGUF tensors as they are stored.
fn read_gguf(file: &Path) -> Result<HashMap<String, Stored>> {
    let ctx = |e: String| candle_core::Error::Msg(format!("{}: {e}", file.display()));
    let mut f = std::fs::File::open(file).map_err(|e| ctx(e.to_string()))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| ctx(format!("not a valid GGUF file: {e}")))?;
    let mut out = HashMap::new();
    for (name, info) in content.tensor_infos.iter() {
        let qt = content.tensor(&mut f, name, &Device::Cpu).map_err(|e| ctx(format!("tensor '{name}': {e}")))?;
        let shape = info.shape.dims().to_vec();
        let fmt = Format::from_ggml(qt.dtype()).ok_or_else(|| ctx(format!("tensor '{name}' has type {:?} (supported: f32, f16, q8_0, q4_0)", qt.dtype())))?;
        let stored = if shape.len() == 2 && fmt != Format::F32 {
            let bytes = qt.data().map_err(|e| ctx(format!("tensor '{name}': {e}")))?;
            Stored::Q(QMatrix::from_bytes(&bytes, shape[0], shape[1], fmt).map_err(|e| ctx(format!("tensor '{name}': {e}")))?)
        } else {
            let t = qt.dequantize(&Device::Cpu).map_err(|e| ctx(format!("tensor '{name}': {e}")))?;
            Stored::F32(t.flatten_all()?.to_vec1::<f32>()?, shape)
        };
        out.insert(name.clone(), stored);
    }
    Ok(out)
}

/// The one Mamba-2 layer config of a stack of identical Mamba-2 layers without MLPs, if it is one.
fn pure_mamba2(lm: &MambaLmConfig) -> Option<Mamba2Config> {
    let Some(LayerKind::Mamba2(cfg)) = lm.layers.first().cloned() else { return None };
    let pure = lm.layers.iter().all(|l| *l == LayerKind::Mamba2(cfg.clone())) && lm.d_intermediate == 0 && cfg.d_mlp() == 0;
    pure.then_some(cfg)
}

impl Mamba2Engine {
    /// Loads a pure Mamba-2 LM (HF `Mamba2ForCausalLM` or `mamba_ssm` layout) from a checkpoint folder.
    /// A folder with a quantised `model.gguf` (written by `ouro quantize`) keeps its stored formats;
    /// otherwise the linear weights are converted to `format` on load.
    pub fn load(path: &Path, format: Format) -> Result<Self> {
        let gguf = path.join(QUANTIZED_FILE);
        let (config, mut src) = if path.is_dir() && gguf.exists() {
            let config = crate::checkpoint::read_config(path)?;
            (config, Source { path: gguf.display().to_string(), tensors: read_gguf(&gguf)? })
        } else {
            let ck = Checkpoint::open(path)?;
            let mut tensors = HashMap::new();
            for e in &ck.entries {
                let t = ck.tensor(&e.name).expect("listed tensor").to_dtype(DType::F32)?;
                tensors.insert(e.name.clone(), Stored::F32(t.flatten_all()?.to_vec1::<f32>()?, e.shape.clone()));
            }
            (ck.config.clone(), Source { path: path.display().to_string(), tensors })
        };
        let arch = crate::lm::architecture_of_config(&config)?;
        if !matches!(arch, "mamba2" | "mamba_ssm") {
            bail!("{}: the CPU engine runs Mamba-2 language models; this is a '{arch}' checkpoint (`ouro bench decode` times any model)", path.display());
        }
        let emb_names = ["backbone.embeddings.weight", "backbone.embedding.weight"];
        let vocab_rows = emb_names
            .iter()
            .find_map(|n| match src.tensors.get(*n) {
                Some(Stored::F32(_, s)) => s.first().copied(),
                Some(Stored::Q(m)) => Some(m.rows),
                None => None,
            })
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: missing tensor 'backbone.embeddings.weight'", src.path)))?;
        let lm = MambaLmConfig::from_json(&config, arch, vocab_rows)?;
        Self::build(lm, &mut src, format)
    }

    /// Whether `path` is a checkpoint folder the engine runs: a pure Mamba-2 LM (what [`Self::load`] accepts).
    pub fn supports(path: &Path) -> bool {
        if !path.is_dir() {
            return false;
        }
        let Ok(config) = crate::checkpoint::read_config(path) else { return false };
        let Ok(arch) = crate::lm::architecture_of_config(&config) else { return false };
        if !matches!(arch, "mamba2" | "mamba_ssm") {
            return false;
        }
        let vocab = config.get("vocab_size").and_then(|v| v.as_u64()).unwrap_or(1) as usize;
        MambaLmConfig::from_json(&config, arch, vocab).is_ok_and(|lm| pure_mamba2(&lm).is_some())
    }

    fn build(lm: MambaLmConfig, src: &mut Source, fmt: Format) -> Result<Self> {
        if !matches!(lm.layers.first(), Some(LayerKind::Mamba2(_))) {
            bail!("{}: the CPU engine runs Mamba-2 language models (this one's first layer is not Mamba-2)", src.path);
        }
        let Some(cfg) = pure_mamba2(&lm) else {
            bail!("{}: the CPU engine runs pure Mamba-2 stacks (no attention or MLP layers, d_ssm = expand·d_model)", src.path);
        };
        cfg.validate()?;
        let (d, h) = (lm.d_model, cfg.nheads());
        let embedding = src.matrix(&["backbone.embeddings.weight", "backbone.embedding.weight"], lm.vocab_size, d, fmt)?;
        let mut layers = Vec::with_capacity(lm.n_layer);
        for i in 0..lm.n_layer {
            let p = format!("backbone.layers.{i}");
            let m = format!("{p}.mixer");
            let conv_dim = cfg.conv_dim();
            layers.push(Layer {
                norm: src.vector(&format!("{p}.norm.weight"), d)?,
                in_proj: src.matrix(&[&format!("{m}.in_proj.weight")], cfg.d_in_proj(), d, fmt)?,
                in_bias: if cfg.bias { Some(src.vector(&format!("{m}.in_proj.bias"), cfg.d_in_proj())?) } else { None },
                conv_w: src.vector(&format!("{m}.conv1d.weight"), conv_dim * cfg.d_conv)?,
                conv_wt: Vec::new(),
                conv_b: if cfg.conv_bias { src.vector(&format!("{m}.conv1d.bias"), conv_dim)? } else { vec![0.0; conv_dim] },
                dt_bias: src.vector(&format!("{m}.dt_bias"), h)?,
                a: src.vector(&format!("{m}.A_log"), h)?.iter().map(|v| -v.exp()).collect(),
                d: src.vector(&format!("{m}.D"), if cfg.d_has_hdim { cfg.d_ssm() } else { h })?,
                norm_w: if cfg.rmsnorm { Some(src.vector(&format!("{m}.norm.weight"), cfg.d_ssm())?) } else { None },
                out_proj: src.matrix(&[&format!("{m}.out_proj.weight")], d, cfg.d_inner(), fmt)?,
                out_bias: if cfg.bias { Some(src.vector(&format!("{m}.out_proj.bias"), d)?) } else { None },
                in_bf: OnceLock::new(),
                out_bf: OnceLock::new(),
            });
        }
        for l in &mut layers {
            let (cd, k) = (cfg.conv_dim(), cfg.d_conv);
            l.conv_wt = (0..k * cd).map(|i| l.conv_w[(i % cd) * k + i / cd]).collect();
        }
        let norm_f = src.vector("backbone.norm_f.weight", d)?;
        // As MambaLm: tied unless the config unties it, and then lm_head.weight must be there.
        let lm_head = if lm.tie_embeddings { None } else { Some(src.matrix(&["lm_head.weight"], lm.vocab_size, d, fmt)?) };
        Ok(Self {
            cfg,
            n_layer: lm.n_layer,
            vocab: lm.vocab_size,
            eps: lm.norm_eps as f32,
            embedding,
            lm_head,
            norm_f,
            layers,
            head_bf: OnceLock::new(),
            bf16_matmul: ouro_kernels::bf16::available(),
            state_bf16: false,
        })
    }

    fn head(&self) -> &QMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }

    /// The formats of the linear weights (in_proj / out_proj, and the embedding), for reports.
    pub fn formats(&self) -> (Format, Format) {
        (self.layers.first().map_or(self.embedding.format(), |l| l.in_proj.format()), self.embedding.format())
    }

    /// Bytes of weights one decode step reads (every linear weight, the head once, the small
    /// recurrent parameters; the embedding row lookup is negligible).
    /// With bf16 matmuls (batches ≥ [`BF16_BATCH`]) the products read the packed bf16 copies instead.
    pub fn weight_bytes_per_step(&self, batch: usize) -> usize {
        let c = &self.cfg;
        let small = 4 * (2 * c.d_model + c.conv_dim() * (c.d_conv + 1) + 3 * c.nheads() + c.d_ssm());
        let size = |m: &QMatrix| if self.batched_bf16(batch) { 2 * m.rows * m.cols } else { m.bytes() };
        self.layers.iter().map(|l| size(&l.in_proj) + size(&l.out_proj) + small).sum::<usize>() + size(self.head())
    }

    /// Floats of recurrent state per sequence.
    pub fn state_floats(&self) -> usize {
        let c = &self.cfg;
        self.n_layer * ((c.d_conv - 1) * c.conv_dim() + c.nheads() * c.headdim * c.d_state)
    }

    /// Bytes of recurrent state per sequence, as stored (f32 conv state; SSM state f32 or bf16).
    pub fn state_bytes(&self) -> usize {
        let c = &self.cfg;
        let ssm = self.n_layer * c.nheads() * c.headdim * c.d_state;
        4 * (self.state_floats() - ssm) + if self.state_bf16 { 2 } else { 4 } * ssm
    }

    pub fn new_state(&self, batch: usize) -> EngineState {
        let c = &self.cfg;
        EngineState {
            batch,
            conv: vec![0.0; batch * self.n_layer * (c.d_conv - 1) * c.conv_dim()],
            ssm: if self.state_bf16 { Vec::new() } else { vec![0.0; batch * self.n_layer * c.nheads() * c.headdim * c.d_state] },
            ssm_bf16: if self.state_bf16 { vec![0; batch * self.n_layer * c.nheads() * c.headdim * c.d_state] } else { Vec::new() },
        }
    }

    pub fn workspace(&self, batch: usize) -> Workspace {
        let (c, d) = (&self.cfg, self.cfg.d_model);
        Workspace {
            batch,
            h: vec![0.0; batch * d],
            u: vec![0.0; batch * d],
            zx: vec![0.0; batch * c.d_in_proj()],
            xbc: vec![0.0; batch * c.conv_dim()],
            y: vec![0.0; batch * c.d_ssm()],
            yn: vec![0.0; batch * c.d_ssm()],
            out: vec![0.0; batch * d],
            logits: vec![0.0; batch * self.vocab],
        }
    }

    /// One token for each of the state's sequences; the logits land in `ws.logits` (batch, vocab).
    pub fn step(&self, tokens: &[u32], state: &mut EngineState, ws: &mut Workspace) -> Result<()> {
        let b = tokens.len();
        if b != state.batch || b != ws.batch {
            bail!("step: {b} tokens for a state of {} and a workspace of {} sequences", state.batch, ws.batch);
        }
        crate::lm::check_ids(&[tokens], self.vocab)?;
        let d = self.cfg.d_model;
        for (i, &t) in tokens.iter().enumerate() {
            self.embedding.dequantize_row(t as usize, &mut ws.h[i * d..(i + 1) * d]);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            self.layer_step(li, layer, state, ws);
        }
        for i in 0..b {
            let h = &ws.h[i * d..(i + 1) * d];
            rms_norm(h, &self.norm_f, self.eps, &mut ws.u[i * d..(i + 1) * d]);
        }
        if self.batched_bf16(b) {
            packed(&self.head_bf, self.head()).matmul(&ws.u, b, &mut ws.logits);
        } else {
            self.head().matvec(&ws.u, b, &mut ws.logits);
        }
        Ok(())
    }

    fn batched_bf16(&self, batch: usize) -> bool {
        self.bf16_matmul && batch >= BF16_BATCH
    }

    fn layer_step(&self, li: usize, l: &Layer, st: &mut EngineState, ws: &mut Workspace) {
        let c = &self.cfg;
        let (b, d) = (ws.batch, c.d_model);
        let (h, p, n, g) = (c.nheads(), c.headdim, c.d_state, c.ngroups);
        let (dssm, conv_dim, k, dip) = (c.d_ssm(), c.conv_dim(), c.d_conv, c.d_in_proj());
        // Per-sequence work runs in parallel over the batch (serial for one sequence: no fork-join cost).
        let par = b > 1;
        for_rows(par, &mut ws.u, d, |i, u| rms_norm(&ws.h[i * d..(i + 1) * d], &l.norm, self.eps, u));
        if self.batched_bf16(b) {
            packed(&l.in_bf, &l.in_proj).matmul(&ws.u, b, &mut ws.zx);
        } else {
            l.in_proj.matvec(&ws.u, b, &mut ws.zx);
        }
        if let Some(bias) = &l.in_bias {
            ws.zx.chunks_exact_mut(dip).for_each(|r| r.iter_mut().zip(bias).for_each(|(v, bb)| *v += bb));
        }
        // Conv over [state | xBC] with SiLU, then shift the state by one (oldest out, this token in).
        let conv_per_seq = (k - 1) * conv_dim;
        let ssm_per_seq = h * p * n;
        let (cs, ss) = (self.n_layer * conv_per_seq, self.n_layer * ssm_per_seq);
        let (conv_base, ssm_base) = (li * conv_per_seq, li * ssm_per_seq);
        let zx = &ws.zx;
        let conv_ptr = SendPtr(st.conv.as_mut_ptr());
        for_rows(par, &mut ws.xbc, conv_dim, |bi, xo| {
            // SAFETY: sequence bi's conv state for this layer belongs to this call.
            let hist = unsafe { conv_ptr.slice(bi * cs + conv_base, conv_per_seq) };
            let xin = &zx[bi * dip + dssm..bi * dip + dssm + conv_dim];
            // Tap by tap over contiguous rows (weights stored (d_conv, conv_dim)): vectorised loops.
            xo.copy_from_slice(&l.conv_b);
            for j in 0..k {
                let src = if j + 1 < k { &hist[j * conv_dim..(j + 1) * conv_dim] } else { xin };
                xo.iter_mut().zip(&l.conv_wt[j * conv_dim..(j + 1) * conv_dim]).zip(src).for_each(|((o, w), v)| *o += w * v);
            }
            xo.iter_mut().for_each(|v| *v = silu(*v));
            hist.copy_within(conv_dim.., 0);
            hist[(k - 2) * conv_dim..].copy_from_slice(xin);
        });
        // SSM update and output: one task per (sequence, head), owning its state block and y slice.
        let (lo, hi) = (c.dt_limit.0 as f32, c.dt_limit.1 as f32);
        let clamp = lo > 0.0 || hi.is_finite();
        let ssm_ptr = SendPtr(st.ssm.as_mut_ptr());
        let bf16_state = !st.ssm_bf16.is_empty();
        let ssm_bf16_addr = st.ssm_bf16.as_mut_ptr() as usize;
        let y_ptr = SendPtr(ws.y.as_mut_ptr());
        let xbc = &ws.xbc;
        let hpg = h / g;
        (0..b * h).into_par_iter().for_each(|task| {
            let (bi, hi_) = (task / h, task % h);
            let gi = hi_ / hpg;
            let row = &zx[bi * dip..(bi + 1) * dip];
            let xr = &xbc[bi * conv_dim..(bi + 1) * conv_dim];
            let bm = &xr[dssm + gi * n..dssm + (gi + 1) * n];
            let cm = &xr[dssm + g * n + gi * n..dssm + g * n + (gi + 1) * n];
            let mut dt = softplus(row[dssm + conv_dim + hi_] + l.dt_bias[hi_]);
            if clamp {
                dt = dt.clamp(lo, hi);
            }
            let da = exp(dt * l.a[hi_]);
            // SAFETY: head hi_ of sequence bi: its state block and y slice belong to this task.
            let off = bi * ss + ssm_base + hi_ * p * n;
            let y = unsafe { y_ptr.slice(bi * dssm + hi_ * p, p) };
            for pi in 0..p {
                let x = xr[hi_ * p + pi];
                let sy = if bf16_state {
                    // SAFETY: as above, in the bf16 copy of the state.
                    let s = unsafe { std::slice::from_raw_parts_mut((ssm_bf16_addr as *mut u16).add(off + pi * n), n) };
                    ouro_kernels::quant::simd::ssm_update_row_bf16(s, bm, cm, da, dt * x)
                } else {
                    let s = unsafe { ssm_ptr.slice(off + pi * n, n) };
                    ouro_kernels::quant::simd::ssm_update_row(s, bm, cm, da, dt * x)
                };
                let dskip = if c.d_has_hdim { l.d[hi_ * p + pi] } else { l.d[hi_] };
                y[pi] = sy + dskip * x;
            }
        });
        // Gate and norm per group of d_ssm / G channels.
        let gs = dssm / g;
        let eps = self.eps_gate();
        let y = &ws.y;
        for_rows(par, &mut ws.yn, dssm, |bi, yn| gate_norm(&y[bi * dssm..(bi + 1) * dssm], &zx[bi * dip..bi * dip + dssm], l.norm_w.as_deref(), gs, eps, c.norm_before_gate, yn));
        if self.batched_bf16(b) {
            packed(&l.out_bf, &l.out_proj).matmul(&ws.yn, b, &mut ws.out);
        } else {
            l.out_proj.matvec(&ws.yn, b, &mut ws.out);
        }
        let out = &ws.out;
        for_rows(par, &mut ws.h, d, |bi, hrow| {
            let o = &out[bi * d..(bi + 1) * d];
            match &l.out_bias {
                Some(bias) => hrow.iter_mut().zip(o).zip(bias).for_each(|((a, v), bb)| *a += v + bb),
                None => hrow.iter_mut().zip(o).for_each(|(a, v)| *a += v),
            }
        });
    }

    fn eps_gate(&self) -> f32 {
        self.cfg.norm_eps as f32
    }

    /// Runs a prompt through the model from `state` (sequence `seq` of a batch state), advancing it,
    /// and returns the logits after the last token. Large matmuls and the chunked SSD, in blocks of at
    /// most `block` tokens (memory stays bounded for any prompt length).
    pub fn prefill(&self, tokens: &[u32], state: &mut EngineState, seq: usize) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            bail!("prefill: empty prompt");
        }
        if seq >= state.batch {
            bail!("prefill: sequence {seq} of a state for {}", state.batch);
        }
        crate::lm::check_ids(&[tokens], self.vocab)?;
        let mut scratch = PrefillScratch::default();
        let mut logits = Vec::new();
        for part in tokens.chunks(PREFILL_BLOCK) {
            logits = self.prefill_block(part, state, seq, &mut scratch)?;
        }
        Ok(logits)
    }

    fn prefill_block(&self, tokens: &[u32], st: &mut EngineState, seq: usize, sc: &mut PrefillScratch) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let t = tokens.len();
        let d = c.d_model;
        let (h, p, n, g, k) = (c.nheads(), c.headdim, c.d_state, c.ngroups, c.d_conv);
        let (dssm, conv_dim, dip) = (c.d_ssm(), c.conv_dim(), c.d_in_proj());
        let mut hs = vec![0f32; t * d];
        for (i, &tok) in tokens.iter().enumerate() {
            self.embedding.dequantize_row(tok as usize, &mut hs[i * d..(i + 1) * d]);
        }
        let mut u = vec![0f32; t * d];
        let mut zx = vec![0f32; t * dip];
        let mut xbc = vec![0f32; t * conv_dim];
        let mut xs = vec![0f32; t * dssm];
        let mut aa = vec![0f32; t * h];
        let mut bmat = vec![0f32; t * g * n];
        let mut cmat = vec![0f32; t * g * n];
        let mut y = vec![0f32; t * dssm];
        let mut yn = vec![0f32; t * dssm];
        let mut out = vec![0f32; t * d];
        let mut ext: Vec<f32> = Vec::with_capacity((t + k - 1) * conv_dim);
        let conv_per_seq = (k - 1) * conv_dim;
        let ssm_per_seq = h * p * n;
        let seg = Segments::none();
        for (li, l) in self.layers.iter().enumerate() {
            u.par_chunks_mut(d).zip(hs.par_chunks(d)).for_each(|(o, x)| rms_norm(x, &l.norm, self.eps, o));
            if self.bf16_matmul {
                packed(&l.in_bf, &l.in_proj).matmul(&u, t, &mut zx);
            } else {
                sc.matmul(&l.in_proj, &u, t, &mut zx);
            }
            if let Some(bias) = &l.in_bias {
                zx.chunks_exact_mut(dip).for_each(|r| r.iter_mut().zip(bias).for_each(|(v, bb)| *v += bb));
            }
            // Causal conv over [state | xBC] (k − 1 + t rows), tap by tap over contiguous rows, then SiLU;
            // the new state is the last k − 1 rows.
            let hist_off = (seq * self.n_layer + li) * conv_per_seq;
            ext.clear();
            ext.extend_from_slice(&st.conv[hist_off..hist_off + conv_per_seq]);
            for ti in 0..t {
                ext.extend_from_slice(&zx[ti * dip + dssm..ti * dip + dssm + conv_dim]);
            }
            {
                let ext = &ext;
                xbc.par_chunks_mut(conv_dim).enumerate().for_each(|(ti, o)| {
                    o.copy_from_slice(&l.conv_b);
                    for j in 0..k {
                        let row = &ext[(ti + j) * conv_dim..(ti + j + 1) * conv_dim];
                        o.iter_mut().zip(&l.conv_wt[j * conv_dim..(j + 1) * conv_dim]).zip(row).for_each(|((o, w), v)| *o += w * v);
                    }
                    o.iter_mut().for_each(|v| *v = silu(*v));
                });
            }
            st.conv[hist_off..hist_off + conv_per_seq].copy_from_slice(&ext[t * conv_dim..]);
            // Discretise: X = dt·x, a = dt·A; split B and C.
            let (lo, hi) = (c.dt_limit.0 as f32, c.dt_limit.1 as f32);
            let clamp = lo > 0.0 || hi.is_finite();
            xs.par_chunks_mut(dssm)
                .zip(aa.par_chunks_mut(h))
                .zip(bmat.par_chunks_mut(g * n).zip(cmat.par_chunks_mut(g * n)))
                .enumerate()
                .for_each(|(ti, ((xr, ar), (br, cr)))| {
                    let xb = &xbc[ti * conv_dim..(ti + 1) * conv_dim];
                    for hh in 0..h {
                        let mut dt = softplus(zx[ti * dip + dssm + conv_dim + hh] + l.dt_bias[hh]);
                        if clamp {
                            dt = dt.clamp(lo, hi);
                        }
                        ar[hh] = dt * l.a[hh];
                        xr[hh * p..(hh + 1) * p].iter_mut().zip(&xb[hh * p..(hh + 1) * p]).for_each(|(o, v)| *o = dt * v);
                    }
                    br.copy_from_slice(&xb[dssm..dssm + g * n]);
                    cr.copy_from_slice(&xb[dssm + g * n..]);
                });
            let s_off = (seq * self.n_layer + li) * ssm_per_seq;
            let bf16_state = !st.ssm_bf16.is_empty();
            let s0: Vec<f32> = if bf16_state {
                st.ssm_bf16[s_off..s_off + ssm_per_seq].iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect()
            } else {
                st.ssm[s_off..s_off + ssm_per_seq].to_vec()
            };
            let dims = Dims { b: 1, l: t, h, p, g, n };
            let inp = ScanIn { x: &xs, a: &aa, bm: &bmat, cm: &cmat, s0: Some(&s0), seg: &seg };
            if bf16_state {
                let mut s1 = vec![0f32; ssm_per_seq];
                scan_chunked(dims, CPU_CHUNK, inp, &mut y, &mut s1);
                st.ssm_bf16[s_off..s_off + ssm_per_seq].iter_mut().zip(&s1).for_each(|(o, &v)| *o = half::bf16::from_f32(v).to_bits());
            } else {
                scan_chunked(dims, CPU_CHUNK, inp, &mut y, &mut st.ssm[s_off..s_off + ssm_per_seq]);
            }
            // y += D·x, then gate and norm.
            let gs = dssm / g;
            let eps = self.eps_gate();
            yn.par_chunks_mut(dssm).zip(y.par_chunks_mut(dssm)).enumerate().for_each(|(ti, (yo, yr))| {
                for hh in 0..h {
                    for pi in 0..p {
                        let dskip = if c.d_has_hdim { l.d[hh * p + pi] } else { l.d[hh] };
                        yr[hh * p + pi] += dskip * xbc[ti * conv_dim + hh * p + pi];
                    }
                }
                gate_norm(yr, &zx[ti * dip..ti * dip + dssm], l.norm_w.as_deref(), gs, eps, c.norm_before_gate, yo);
            });
            if self.bf16_matmul {
                packed(&l.out_bf, &l.out_proj).matmul(&yn, t, &mut out);
            } else {
                sc.matmul(&l.out_proj, &yn, t, &mut out);
            }
            hs.par_chunks_mut(d).zip(out.par_chunks(d)).for_each(|(a, o)| match &l.out_bias {
                Some(bias) => a.iter_mut().zip(o).zip(bias).for_each(|((a, v), bb)| *a += v + bb),
                None => a.iter_mut().zip(o).for_each(|(a, v)| *a += v),
            });
        }
        let last = &hs[(t - 1) * d..];
        let mut un = vec![0f32; d];
        rms_norm(last, &self.norm_f, self.eps, &mut un);
        let mut logits = vec![0f32; self.vocab];
        self.head().matvec(&un, 1, &mut logits);
        Ok(logits)
    }
}

/// f(i, row) for each `width`-long row of `rows`, in parallel when `par`.
fn for_rows(par: bool, rows: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if par {
        rows.par_chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        rows.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Prompt tokens per prefill block.
pub const PREFILL_BLOCK: usize = 512;

/// f32 copies of a quantised weight for prefill's matmuls (one matrix at a time).
#[derive(Default)]
struct PrefillScratch {
    w: Vec<f32>,
}

impl PrefillScratch {
    /// out (t, rows) = x (t, cols) · Wᵀ with all threads.
    fn matmul(&mut self, m: &QMatrix, x: &[f32], t: usize, out: &mut [f32]) {
        let (rows, cols) = (m.rows, m.cols);
        let w: &[f32] = match m.as_f32() {
            Some(w) => w,
            None => {
                self.w.resize(rows * cols, 0.0);
                m.dequantize_into(&mut self.w);
                &self.w
            }
        };
        // SAFETY: sizes match the slices; out does not alias x or w.
        unsafe {
            gemm::gemm(
                t,
                rows,
                cols,
                out.as_mut_ptr(),
                1,
                rows as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                w.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            )
        }
    }
}

/// out = RMSNorm_group(y·SiLU(z))·w (or RMSNorm_group(y)·w·SiLU(z) with `norm_before_gate`; y·SiLU(z)
/// without a norm weight).
fn gate_norm(y: &[f32], z: &[f32], w: Option<&[f32]>, group: usize, eps: f32, norm_before_gate: bool, out: &mut [f32]) {
    match w {
        Some(w) => gated_rms_norm_row(y, Some(z), w, eps, group, norm_before_gate, out),
        None => out.iter_mut().zip(y).zip(z).for_each(|((o, &v), &zz)| *o = v * silu(zz)),
    }
}

/// What [`quantize_checkpoint`] wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantizeSummary {
    pub tensors: usize,
    pub quantized: usize,
    pub bytes_in: usize,
    pub bytes_out: usize,
}

/// Writes `src` (any checkpoint folder ouro reads) to the folder `out` with its 2-D weight matrices in
/// `format` (rows of whole 32-weight blocks; the rest, and every 1-D or 3-D tensor, f32): `config.json`,
/// tokenizer files, and `model.gguf` with the tensors under their checkpoint names in ggml's layouts.
/// The folder appears complete or not at all (written beside it, then renamed).
pub fn quantize_checkpoint(src: &Path, format: Format, out: &Path) -> Result<QuantizeSummary> {
    let ck = Checkpoint::open(src)?;
    if !matches!(ck.format, crate::checkpoint::Format::Safetensors | crate::checkpoint::Format::Pth) || src.is_file() {
        bail!("{}: quantize reads a checkpoint folder (config.json + weights)", src.display());
    }
    if out.exists() {
        bail!("{}: already exists (choose a new output folder)", out.display());
    }
    let mut qts = Vec::with_capacity(ck.entries.len());
    let mut sum = QuantizeSummary { tensors: 0, quantized: 0, bytes_in: 0, bytes_out: 0 };
    for e in &ck.entries {
        let stored = ck.tensor(&e.name).expect("listed tensor");
        let t = stored.to_dtype(DType::F32)?;
        let quantize = t.rank() == 2 && format.supports(t.dim(1)?) && e.name.ends_with("weight");
        let qt = candle_core::quantized::QTensor::quantize(&t, if quantize { format.ggml() } else { GgmlDType::F32 })
            .map_err(|err| candle_core::Error::Msg(format!("{}: tensor '{}': {err}", src.display(), e.name)))?;
        sum.tensors += 1;
        sum.quantized += quantize as usize;
        sum.bytes_in += t.elem_count() * stored.dtype().size_in_bytes();
        sum.bytes_out += qt.storage_size_in_bytes();
        qts.push((e.name.clone(), qt));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", parent.display())))?;
    let tmp = parent.join(format!(".{}.partial", out.file_name().and_then(|n| n.to_str()).unwrap_or("quantized")));
    let _ = std::fs::remove_dir_all(&tmp);
    let io = |e: std::io::Error, p: &Path| candle_core::Error::Msg(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(&tmp).map_err(|e| io(e, &tmp))?;
    let result = (|| -> Result<()> {
        for entry in std::fs::read_dir(src).map_err(|e| io(e, src))? {
            let p = entry.map_err(|e| io(e, src))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let keep = name == "config.json" || name == "generation_config.json" || name.starts_with("tokenizer") || name == "special_tokens_map.json" || name == "vocab.json" || name == "merges.txt";
            if keep && p.is_file() {
                std::fs::copy(&p, tmp.join(&name)).map_err(|e| io(e, &p))?;
            }
        }
        let file = tmp.join(QUANTIZED_FILE);
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file).map_err(|e| io(e, &file))?);
        let arch = gguf_file::Value::String("ouro".into());
        let fmt_v = gguf_file::Value::String(format.name().into());
        let tensors: Vec<(&str, &candle_core::quantized::QTensor)> = qts.iter().map(|(n, q)| (n.as_str(), q)).collect();
        gguf_file::write(&mut w, &[("general.architecture", &arch), ("ouro.weight_format", &fmt_v)], &tensors)?;
        use std::io::Write;
        w.flush().map_err(|e| io(e, &file))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| io(e, out))?;
    Ok(sum)
}
