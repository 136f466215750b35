//! Layers shared by the models: RMSNorm, LayerNorm, the two MLP styles, rotary embeddings, and multi-head
//! attention with grouped KV heads and a KV cache (Llama's separate q/k/v projections or `mamba_ssm`'s
//! fused `in_proj`).

use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use ouro_kernels::norm::rms_norm;

pub fn linear(vb: VarBuilder, i: usize, o: usize, bias: bool) -> Result<Linear> {
    if bias {
        candle_nn::linear(i, o, vb)
    } else {
        candle_nn::linear_no_bias(i, o, vb)
    }
}

/// An embedding table (vocab, d) read from the checkpoint (its vocab size is the tensor's).
pub fn embedding(vb: VarBuilder, vocab: usize, d: usize) -> Result<Embedding> {
    Ok(Embedding::new(vb.get((vocab, d), "weight")?, d))
}

/// v (d) repeated over the rows of x (…, d). On the CPU as the outer product ones(rows, 1) · v, so v's
/// gradient is a matrix product; through `broadcast_add` / `broadcast_mul` it is candle's CPU reduction over
/// the leading dims, single-threaded with an integer division per element (a fifth of a Lyra fit). On other
/// devices a broadcast view.
pub fn rows_like(v: &Tensor, x: &Tensor) -> Result<Tensor> {
    let d = v.elem_count();
    if x.dim(D::Minus1)? != d {
        bail!("rows_like: a vector of {d} for rows of {:?}", x.dims());
    }
    if !x.device().is_cpu() {
        return v.reshape(d)?.broadcast_as(x.shape());
    }
    let rows = x.elem_count() / d;
    Tensor::ones((rows, 1), v.dtype(), v.device())?.matmul(&v.reshape((1, d))?)?.reshape(x.shape())
}

/// x + v on every row of x (…, d); see [`rows_like`].
pub fn add_rows(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    x.add(&rows_like(v, x)?)
}

/// x ⊙ v on every row of x (…, d); see [`rows_like`].
pub fn mul_rows(x: &Tensor, v: &Tensor) -> Result<Tensor> {
    x.mul(&rows_like(v, x)?)
}

/// `lin` on x (…, in), its bias added by [`add_rows`] (candle's `Linear` broadcasts it).
pub fn linear_rows(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = Linear::new(lin.weight().clone(), None).forward(x)?;
    match lin.bias() {
        Some(b) => add_rows(&y, b),
        None => Ok(y),
    }
}

/// The Toeplitz matrices M[…, t, s] = r[…, s − t + L − 1] of r (…, 2L − 1), indexed by lag s − t.
///
/// Built by a copy and reshapes only (the skew trick): L copies of the ring R = [r[L−1..], 0, r[..L−1]]
/// (length 2L) are read back as rows of 2L − 1, so row t starts t places earlier and
/// M[t, s] = R[(s − t) mod 2L]. The gradient is a sum over the copies, where a gather (`index_select`)
/// would need a scatter-add, which candle's CUDA backend runs with one thread per row.
pub fn toeplitz(r: &Tensor) -> Result<Tensor> {
    let dims = r.dims();
    let Some((&k, lead)) = dims.split_last() else { bail!("toeplitz: a scalar has no lags") };
    if k % 2 == 0 {
        bail!("toeplitz: {k} lags; expected 2L − 1");
    }
    let l = k.div_ceil(2);
    let mut out_dims = lead.to_vec();
    out_dims.extend([l, l]);
    if l == 1 {
        return r.reshape(out_dims);
    }
    let rows: usize = lead.iter().product();
    let r = r.reshape((rows, k))?;
    let zero = Tensor::zeros((rows, 1), r.dtype(), r.device())?;
    let ring = Tensor::cat(&[&r.narrow(1, l - 1, l)?, &zero, &r.narrow(1, 0, l - 1)?], 1)?; // (rows, 2L)
    // L copies of the ring; on the CPU as ones(L, 1) · ring per row, for the reason given at rows_like.
    let copies = if r.device().is_cpu() {
        Tensor::ones((rows, l, 1), r.dtype(), r.device())?.matmul(&ring.unsqueeze(1)?)?
    } else {
        ring.unsqueeze(1)?.broadcast_as((rows, l, 2 * l))?.contiguous()?
    };
    let copies = copies.reshape((rows, 2 * l * l))?;
    let m = copies.narrow(1, 0, l * (2 * l - 1))?.reshape((rows, l, 2 * l - 1))?.narrow(2, 0, l)?;
    m.contiguous()?.reshape(out_dims)
}

/// x · rsqrt(mean(x²) + eps) · w.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// (x − mean(x)) · rsqrt(var(x) + eps) · w + b over the last axis, written in differentiable tensor ops
/// (candle-nn's fused `LayerNorm` op has no backward pass: gradients into x vanish silently).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?, bias: vb.get_with_hints(d, "bias", candle_nn::Init::Const(0.0))?, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Activations named in configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    Gelu,
    GeluTanh,
    Relu,
}

impl Act {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Act::Silu,
            "gelu" => Act::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            other => bail!("unsupported activation '{other}' (supported: silu, gelu, gelu_pytorch_tanh, relu)"),
        })
    }
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::Silu => x.silu(),
            Act::Gelu => x.gelu_erf(),
            Act::GeluTanh => ouro_kernels::act::gelu_tanh(x),
            Act::Relu => x.relu(),
        }
    }
}

/// Llama's MLP: down(act(gate(x)) ⊙ up(x)).
#[derive(Clone, Debug)]
pub struct GluMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub act: Act,
}

impl GluMlp {
    pub fn new(d: usize, hidden: usize, bias: bool, act: Act, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: linear(vb.pp("gate_proj"), d, hidden, bias)?,
            up_proj: linear(vb.pp("up_proj"), d, hidden, bias)?,
            down_proj: linear(vb.pp("down_proj"), hidden, d, bias)?,
            act,
        })
    }
}

impl Module for GluMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.act.apply(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(g * self.up_proj.forward(x)?)?)
    }
}

/// `mamba_ssm`'s GatedMLP: y, gate = fc1(x).chunk(2); fc2(y ⊙ act(gate)).
#[derive(Clone, Debug)]
pub struct GatedMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub hidden: usize,
    pub act: Act,
}

impl GatedMlp {
    pub fn new(d: usize, hidden: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self { fc1: linear(vb.pp("fc1"), d, 2 * hidden, bias)?, fc2: linear(vb.pp("fc2"), hidden, d, bias)?, hidden, act: Act::Silu })
    }
}

impl Module for GatedMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let y = h.narrow(D::Minus1, 0, self.hidden)?;
        let gate = h.narrow(D::Minus1, self.hidden, self.hidden)?;
        self.fc2.forward(&(y * self.act.apply(&gate)?)?)
    }
}

/// The activation of an ungated MLP: squared ReLU (Nemotron-H's `relu2`, Primer's relu(x)²) or one of [`Act`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainAct {
    Relu2,
    Act(Act),
}

impl PlainAct {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "relu2" => Ok(PlainAct::Relu2),
            other => Act::parse(other)
                .map(PlainAct::Act)
                .map_err(|_| candle_core::Error::Msg(format!("unsupported MLP activation '{other}' (supported: relu2, silu, gelu, gelu_pytorch_tanh, relu)"))),
        }
    }
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            PlainAct::Relu2 => x.relu()?.sqr(),
            PlainAct::Act(a) => a.apply(x),
        }
    }
}

/// Nemotron-H's MLP (HF `NemotronHMLP`): down(act(up(x))), no gate.
#[derive(Clone, Debug)]
pub struct PlainMlp {
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub act: PlainAct,
}

impl PlainMlp {
    pub fn new(d: usize, hidden: usize, bias: bool, act: PlainAct, vb: VarBuilder) -> Result<Self> {
        Ok(Self { up_proj: linear(vb.pp("up_proj"), d, hidden, bias)?, down_proj: linear(vb.pp("down_proj"), hidden, d, bias)?, act })
    }
}

impl Module for PlainMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.act.apply(&self.up_proj.forward(x)?)?)
    }
}

/// The last value a call site made, kept with its key and device and handed out again for the same ones
/// (host-built tables that every layer of a forward asks for alike).
struct KeepLast<K, V>(std::sync::Mutex<Option<(K, Device, V)>>);

impl<K, V: Clone> KeepLast<K, V> {
    const fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    /// The kept value, when `same` holds for its key and it lives on `dev`.
    fn get(&self, same: impl Fn(&K) -> bool, dev: &Device) -> Option<V> {
        self.0.lock().unwrap().as_ref().filter(|(k, d, _)| same(k) && d.same_device(dev)).map(|(_, _, v)| v.clone())
    }

    fn put(&self, key: K, dev: &Device, value: V) {
        *self.0.lock().unwrap() = Some((key, dev.clone(), value));
    }
}

/// Rotary position embedding on the first `dim` channels of each head, rotate-half (GPT-NeoX/HF) layout.
#[derive(Clone, Debug)]
pub struct Rotary {
    pub dim: usize,
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(dim: usize, theta: f64) -> Self {
        let inv_freq = (0..dim / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / dim as f64)) as f32).collect();
        Self { dim, inv_freq }
    }

    /// cos, sin for the given positions: (n, dim/2) each. The last tables made are kept and handed out again
    /// for the same frequencies, positions and device: every layer of a forward (and every training step at
    /// a fixed length) asks for the same ones, and making them is trigonometry on the host plus an upload.
    fn tables(&self, positions: &[u32], dev: &Device) -> Result<(Tensor, Tensor)> {
        static LAST: KeepLast<(Vec<f32>, Vec<u32>), (Tensor, Tensor)> = KeepLast::new();
        if let Some(t) = LAST.get(|(f, p)| *f == self.inv_freq && p == positions, dev) {
            return Ok(t);
        }
        let t = self.make_tables(positions, dev)?;
        LAST.put((self.inv_freq.clone(), positions.to_vec()), dev, t.clone());
        Ok(t)
    }

    fn make_tables(&self, positions: &[u32], dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f64 * f as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((Tensor::from_vec(cos, (positions.len(), half), dev)?, Tensor::from_vec(sin, (positions.len(), half), dev)?))
    }

    /// x (b, heads, l, head_dim); `positions` (b·l, row-major) → rotated x.
    pub fn apply(&self, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
        if self.dim == 0 {
            return Ok(x.clone());
        }
        let (b, _h, l, hd) = x.dims4()?;
        let (cos, sin) = self.tables(positions, x.device())?;
        let half = self.dim / 2;
        let cos = cos.reshape((b, 1, l, half))?.to_dtype(x.dtype())?;
        let sin = sin.reshape((b, 1, l, half))?.to_dtype(x.dtype())?;
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        // [x1, x2] → [x1 cos − x2 sin, x2 cos + x1 sin]
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        if self.dim == hd {
            Tensor::cat(&[&r1, &r2], 3)?.contiguous()
        } else {
            Tensor::cat(&[&r1, &r2, &x.narrow(3, self.dim, hd - self.dim)?], 3)?.contiguous()
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Channels of each head that get RoPE (0: none).
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub qkv_bias: bool,
    pub out_bias: bool,
    /// Sliding window (None: full causal attention).
    pub window: Option<usize>,
    /// false: bidirectional (encoders; `seq_idx` still confines attention to a document, e.g. to exclude
    /// padding by giving it its own id).
    pub causal: bool,
}

#[derive(Clone, Debug)]
enum QkvProj {
    /// Llama: q_proj, k_proj, v_proj.
    Separate(Linear, Linear, Linear),
    /// `mamba_ssm` MHA: one in_proj producing [q | k | v].
    Fused(Linear),
}

/// The keys and values kept so far, (b, kv_heads, len, head_dim) each (with a sliding window, the last
/// `window` of them), and how many tokens the sequence has consumed.
///
/// Rows of a batch may sit at different positions (continuous batching: a sequence joins a batch whose
/// other rows are mid-way through theirs). Then `rows` says, per row, how many tokens it has consumed and
/// how many keys it holds; a row's keys are the last `held` slots along the key axis (right-aligned, so one
/// more token per row is still one concatenation), the slots before them are padding that attention masks,
/// and RoPE rotates each row at its own position. Without `rows` every row has consumed `seen` tokens and
/// holds every slot.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
    /// Tokens consumed by every row (with `rows`: the most any row has consumed).
    pub seen: usize,
    /// Per-row positions when rows differ (see above); None: every row is at `seen`.
    pub rows: Option<Vec<KvRow>>,
}

/// Where one row of a [`KvCache`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRow {
    /// Tokens consumed: the position of the row's next token.
    pub seen: usize,
    /// Keys held: the last `held` slots of the key axis (fewer than `seen` under a sliding window).
    pub held: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows in the cache (None before the first token: the batch is not known yet).
    pub fn batch(&self) -> Option<usize> {
        self.k.as_ref().and_then(|k| k.dim(0).ok())
    }

    /// Where each of the `b` rows stands (the same for every row unless the rows are ragged).
    pub fn row_states(&self, b: usize) -> Result<Vec<KvRow>> {
        match &self.rows {
            Some(r) if r.len() != b => bail!("kv cache: {} rows of positions for a batch of {b}", r.len()),
            Some(r) => Ok(r.clone()),
            None => Ok(vec![KvRow { seen: self.seen, held: self.len() }; b]),
        }
    }

    /// A cache of per-row states: drops the padding slots that no row needs any more.
    fn ragged(k: Tensor, v: Tensor, rows: Vec<KvRow>) -> Result<Self> {
        let (n, keep) = (k.dim(2)?, rows.iter().map(|r| r.held).max().unwrap_or(0));
        let (k, v) = if keep < n { (k.narrow(2, n - keep, keep)?.contiguous()?, v.narrow(2, n - keep, keep)?.contiguous()?) } else { (k, v) };
        let seen = rows.iter().map(|r| r.seen).max().unwrap_or(0);
        Ok(Self { k: Some(k), v: Some(v), seen, rows: Some(rows) })
    }

    fn tensors(&self) -> Result<(&Tensor, &Tensor)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => bail!("kv cache: a sequence that has consumed no token cannot be batched (prefill it first)"),
        }
    }

    /// The rows of several caches stacked into one batch (rows at different positions allowed).
    pub fn cat(parts: &[&KvCache]) -> Result<KvCache> {
        if parts.is_empty() {
            bail!("kv cache: nothing to concatenate");
        }
        let n = parts.iter().map(|p| p.len()).max().unwrap_or(0);
        let (mut ks, mut vs, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for p in parts {
            let (k, v) = p.tensors()?;
            ks.push(k.pad_with_zeros(2, n - k.dim(2)?, 0)?);
            vs.push(v.pad_with_zeros(2, n - v.dim(2)?, 0)?);
            rows.extend(p.row_states(k.dim(0)?)?);
        }
        Self::ragged(Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?, rows)
    }

    /// Replaces row `i` by the single sequence of `src` (a cache of one row).
    pub fn set_row(&mut self, i: usize, src: &KvCache) -> Result<()> {
        let (sk, sv) = src.tensors()?;
        if sk.dim(0)? != 1 {
            bail!("kv cache: set_row takes a cache of one sequence, got {}", sk.dim(0)?);
        }
        let (k, v) = self.tensors()?;
        let b = k.dim(0)?;
        if i >= b {
            bail!("kv cache: row {i} of a batch of {b}");
        }
        let mut rows = self.row_states(b)?;
        let row = src.row_states(1)?[0];
        // Only the held keys travel (right-aligned); either side is padded to the longer key axis.
        let (sk, sv) = (sk.narrow(2, sk.dim(2)? - row.held, row.held)?, sv.narrow(2, sv.dim(2)? - row.held, row.held)?);
        let n = k.dim(2)?.max(row.held);
        let pad = |t: &Tensor| t.pad_with_zeros(2, n - t.dim(2).unwrap_or(n), 0);
        let (k, v) = (pad(k)?.slice_scatter0(&pad(&sk)?, i)?, pad(v)?.slice_scatter0(&pad(&sv)?, i)?);
        rows[i] = row;
        *self = Self::ragged(k, v, rows)?;
        Ok(())
    }

    /// The rows `idx` (new row r is old row idx[r]; repeats allowed).
    pub fn select(&self, idx: &[u32]) -> Result<KvCache> {
        let (k, v) = match (&self.k, &self.v) {
            (Some(k), Some(v)) => (k, v),
            _ => return Ok(self.clone()),
        };
        let t = Tensor::new(idx, k.device())?;
        let (k, v) = (k.contiguous()?.index_select(&t, 0)?, v.contiguous()?.index_select(&t, 0)?);
        match &self.rows {
            None => Ok(KvCache { k: Some(k), v: Some(v), seen: self.seen, rows: None }),
            Some(r) => {
                let rows = idx.iter().map(|&i| r.get(i as usize).copied().ok_or_else(|| candle_core::Error::Msg(format!("kv cache: no row {i}")))).collect::<Result<Vec<_>>>()?;
                Self::ragged(k, v, rows)
            }
        }
    }
}

/// Causal multi-head attention with grouped KV heads.
#[derive(Clone, Debug)]
pub struct Attention {
    pub cfg: AttentionConfig,
    qkv: QkvProj,
    pub out: Linear,
    rope: Rotary,
}

impl Attention {
    /// Llama layout: `q_proj`, `k_proj`, `v_proj`, `o_proj` under `vb`.
    pub fn new_llama(cfg: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        Self::check(&cfg)?;
        let (d, h, kv, hd) = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let qkv = QkvProj::Separate(
            linear(vb.pp("q_proj"), d, h * hd, cfg.qkv_bias)?,
            linear(vb.pp("k_proj"), d, kv * hd, cfg.qkv_bias)?,
            linear(vb.pp("v_proj"), d, kv * hd, cfg.qkv_bias)?,
        );
        let out = linear(vb.pp("o_proj"), h * hd, d, cfg.out_bias)?;
        Ok(Self { rope: Rotary::new(cfg.rotary_dim, cfg.rope_theta), cfg, qkv, out })
    }

    /// `mamba_ssm` MHA layout: fused `in_proj` and `out_proj` under `vb`.
    pub fn new_fused(cfg: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        Self::check(&cfg)?;
        let (d, h, kv, hd) = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let qkv = QkvProj::Fused(linear(vb.pp("in_proj"), d, (h + 2 * kv) * hd, cfg.qkv_bias)?);
        let out = linear(vb.pp("out_proj"), h * hd, d, cfg.out_bias)?;
        Ok(Self { rope: Rotary::new(cfg.rotary_dim, cfg.rope_theta), cfg, qkv, out })
    }

    fn check(cfg: &AttentionConfig) -> Result<()> {
        if cfg.n_kv_heads == 0 || cfg.n_heads % cfg.n_kv_heads != 0 {
            bail!("attention: {} heads are not a multiple of {} KV heads", cfg.n_heads, cfg.n_kv_heads);
        }
        if cfg.rotary_dim > cfg.head_dim || cfg.rotary_dim % 2 != 0 {
            bail!("attention: rotary dim {} must be even and at most head_dim {}", cfg.rotary_dim, cfg.head_dim);
        }
        Ok(())
    }

    /// x (b, l, d). Positions continue from the cache; with `seq_idx`, they restart at each document and
    /// attention stays inside documents.
    pub fn forward(&self, x: &Tensor, seq_idx: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (h, hd) = (self.cfg.n_heads, self.cfg.head_dim);
        let (p, v) = self.probs_and_values(x, seq_idx, cache)?;
        let y = p.matmul(&v.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?; // (b, h, l, hd)
        let y = y.transpose(1, 2)?.reshape((b, l, h * hd))?;
        self.out.forward(&y)
    }

    /// The attention matrix softmax(Q·Kᵀ/√d + mask) (b, h, l, l) of x, from position 0: attention as an
    /// L×L sequence mixer (MOHAWK's stage 1 aligns a student's mixer matrix with it).
    pub fn matrix(&self, x: &Tensor, seq_idx: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.probs_and_values(x, seq_idx, None)?.0)
    }

    /// The attention probabilities (b, h, l, total) and the values (b, h, total, hd), heads expanded.
    fn probs_and_values(&self, x: &Tensor, seq_idx: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<(Tensor, Tensor)> {
        let (b, l, _) = x.dims3()?;
        let (h, kv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim);
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate(qp, kp, vp) => (qp.forward(x)?, kp.forward(x)?, vp.forward(x)?),
            QkvProj::Fused(p) => {
                let qkv = p.forward(x)?;
                (qkv.narrow(2, 0, h * hd)?, qkv.narrow(2, h * hd, kv * hd)?, qkv.narrow(2, (h + kv) * hd, kv * hd)?)
            }
        };
        let q = q.reshape((b, l, h, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, l, kv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, l, kv, hd))?.transpose(1, 2)?.contiguous()?;
        let offset = cache.as_ref().map_or(0, |c| c.seen);
        // Rows at different positions: where each row stands before this call.
        let ragged = match cache.as_ref() {
            Some(c) if c.rows.is_some() => Some(c.row_states(b)?),
            _ => None,
        };
        let docs = match seq_idx {
            Some(s) => Some(ouro_kernels::seq_idx_to_vec(s, b, l)?),
            None => None,
        };
        if docs.is_some() && (offset > 0 || ragged.is_some()) {
            bail!("attention: seq_idx with a non-empty KV cache is not supported");
        }
        let positions: Vec<u32> = (0..b)
            .flat_map(|bi| {
                let docs = docs.as_ref();
                let base = ragged.as_ref().map_or(offset, |r| r[bi].seen);
                (0..l).map(move |t| match docs {
                    None => (base + t) as u32,
                    Some(d) => {
                        let row = &d[bi * l..(bi + 1) * l];
                        let start = (0..=t).rev().take_while(|&s| row[s] == row[t]).last().unwrap_or(t);
                        (t - start) as u32
                    }
                })
            })
            .collect();
        let q = self.rope.apply(&q, &positions)?;
        let k = self.rope.apply(&k, &positions)?;
        let (k, v) = match cache {
            Some(c) => {
                let k = match &c.k {
                    Some(prev) => Tensor::cat(&[prev, &k], 2)?,
                    None => k,
                };
                let v = match &c.v {
                    Some(prev) => Tensor::cat(&[prev, &v], 2)?,
                    None => v,
                };
                // The cache keeps only the window: memory bounded whatever the context length. This call
                // still attends over everything it was given (earlier queries of a chunk see older keys).
                let n = k.dim(2)?;
                match (&ragged, self.cfg.window) {
                    (Some(rows), w) => {
                        let rows = rows.iter().map(|r| KvRow { seen: r.seen + l, held: w.map_or(r.held + l, |w| (r.held + l).min(w)) }).collect();
                        *c = KvCache::ragged(k.clone(), v.clone(), rows)?;
                    }
                    (None, Some(w)) if n > w => {
                        c.seen += l;
                        c.k = Some(k.narrow(2, n - w, w)?.contiguous()?);
                        c.v = Some(v.narrow(2, n - w, w)?.contiguous()?);
                    }
                    (None, _) => {
                        c.seen += l;
                        c.k = Some(k.clone());
                        c.v = Some(v.clone());
                    }
                }
                (k, v)
            }
            None => (k, v),
        };
        let total = k.dim(2)?;
        let start = (offset + l).saturating_sub(total); // absolute position of the first key (uniform rows)
        // Repeat KV heads for the query heads of each group.
        let rep = h / kv;
        let (k, v) = if rep > 1 {
            let expand = |t: &Tensor| -> Result<Tensor> {
                t.unsqueeze(2)?.expand((b, kv, rep, total, hd))?.reshape((b, h, total, hd))
            };
            (expand(&k)?, expand(&v)?)
        } else {
            (k, v)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)? * scale)?; // (b, h, l, total)
        let mask = match &ragged {
            Some(rows) => self.ragged_mask(l, total, rows, x.device())?,
            None => self.mask(b, l, start, offset, total, docs.as_deref(), x.device())?,
        };
        let scores = match mask {
            Some(m) => scores.broadcast_add(&m)?,
            None => scores,
        };
        Ok((candle_nn::ops::softmax(&scores, D::Minus1)?, v))
    }

    /// Additive mask (b or 1, 1, l, total): query at absolute position offset+i sees keys at absolute
    /// positions start+j ≤ offset+i (and > offset+i−window), within its document.
    #[allow(clippy::too_many_arguments)]
    fn mask(&self, b: usize, l: usize, start: usize, offset: usize, total: usize, docs: Option<&[u32]>, dev: &Device) -> Result<Option<Tensor>> {
        if (l == 1 || !self.cfg.causal) && docs.is_none() && self.cfg.window.is_none_or(|w| total <= w) {
            return Ok(None);
        }
        // Without documents the mask depends only on these sizes: the last one is kept and handed out again
        // (every layer of a forward, every step at a fixed length, asks for the same).
        type Key = (usize, usize, usize, usize, bool, Option<usize>); // l, start, offset, total, causal, window
        static LAST: KeepLast<Key, Tensor> = KeepLast::new();
        let key = (l, start, offset, total, self.cfg.causal, self.cfg.window);
        if docs.is_none() {
            if let Some(m) = LAST.get(|k| *k == key, dev) {
                return Ok(Some(m));
            }
        }
        let rows = if docs.is_some() { b } else { 1 };
        let mut m = vec![0f32; rows * l * total];
        for bi in 0..rows {
            for i in 0..l {
                let qpos = offset + i;
                for j in 0..total {
                    let kpos = start + j;
                    let mut ok = kpos <= qpos || !self.cfg.causal;
                    if let Some(w) = self.cfg.window {
                        ok &= qpos - kpos.min(qpos) < w;
                    }
                    if let Some(d) = docs {
                        ok &= d[bi * l + i] == d[bi * l + j];
                    }
                    if !ok {
                        m[(bi * l + i) * total + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let m = Tensor::from_vec(m, (rows, 1, l, total), dev)?;
        if docs.is_none() {
            LAST.put(key, dev, m.clone());
        }
        Ok(Some(m))
    }

    /// The additive mask of rows at different positions (`rows`: where each stood before this call): row r's
    /// keys are its last held+l slots, so the key in slot j sits at position seen + l − total + j and query
    /// i at seen + i. Their distance does not depend on the row: causality and the window are the uniform
    /// [`Self::mask`] (1, 1, l, total) of a sequence at offset total − l, and the rows differ only in their
    /// padding slots j < total − (held + l), masked by a (b, 1, 1, total) built on the device from one number
    /// per row. None when nothing is masked.
    fn ragged_mask(&self, l: usize, total: usize, rows: &[KvRow], dev: &Device) -> Result<Option<Tensor>> {
        let mut first = Vec::with_capacity(rows.len()); // first key slot of each row
        for (bi, r) in rows.iter().enumerate() {
            if r.held + l > total || r.held > r.seen {
                bail!("attention: kv cache row {bi} holds {} keys after {} tokens in {total} slots", r.held, r.seen);
            }
            first.push((total - (r.held + l)) as u32);
        }
        let shared = self.mask(1, l, 0, total - l, total, None, dev)?;
        if first.iter().all(|&f| f == 0) {
            return Ok(shared);
        }
        let shape = (rows.len(), 1, 1, total);
        let keys = Tensor::arange(0, total as u32, dev)?.reshape((1, 1, 1, total))?.broadcast_ge(&Tensor::from_vec(first, (rows.len(), 1, 1, 1), dev)?)?;
        let padding = keys.where_cond(&Tensor::zeros(shape, DType::F32, dev)?, &Tensor::full(f32::NEG_INFINITY, shape, dev)?)?;
        Ok(Some(match shared {
            Some(m) => padding.broadcast_add(&m)?,
            None => padding,
        }))
    }
}

#[cfg(test)]
mod attention_tests {
    use super::*;
    use candle_nn::VarMap;

    /// The attention matrix is what forward mixes with: causal rows that sum to one, and
    /// out_proj(P · V) reproduces the forward output (GQA: 4 query heads on 2 KV heads).
    #[test]
    fn matrix_is_causal_stochastic_and_reproduces_forward() {
        let cfg = AttentionConfig { d_model: 16, n_heads: 4, n_kv_heads: 2, head_dim: 4, rotary_dim: 4, rope_theta: 10000.0, qkv_bias: false, out_bias: false, window: None, causal: true };
        let vm = VarMap::new();
        let att = Attention::new_llama(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 7, 16), &Device::Cpu).unwrap();
        let p = att.matrix(&x, None).unwrap(); // (2, 4, 7, 7)
        assert_eq!(p.dims(), &[2, 4, 7, 7]);
        let rows = p.sum(3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-5), "{rows:?}");
        let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        for (idx, val) in v.iter().enumerate() {
            let (i, j) = ((idx / 7) % 7, idx % 7);
            assert!(j <= i || *val == 0.0, "p[{i},{j}] = {val}");
        }
        // forward = out(P · V) with V's KV heads repeated for their query heads.
        let QkvProj::Separate(_, _, vp) = &att.qkv else { unreachable!() };
        let vv = vp.forward(&x).unwrap().reshape((2, 7, 2, 4)).unwrap().transpose(1, 2).unwrap(); // (2, 2, 7, 4)
        let vv = vv.unsqueeze(2).unwrap().expand((2, 2, 2, 7, 4)).unwrap().reshape((2, 4, 7, 4)).unwrap();
        let y = p.matmul(&vv.contiguous().unwrap()).unwrap().transpose(1, 2).unwrap().reshape((2, 7, 16)).unwrap();
        let want = att.forward(&x, None, None).unwrap();
        let got = att.out.forward(&y).unwrap();
        let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "{err}");
    }

    /// The kept rotary tables and causal mask are handed out only for the same request: interleaved
    /// requests with other positions, frequencies, lengths or windows get their own.
    #[test]
    fn kept_rotary_tables_and_masks_match_fresh_ones() {
        let same = |a: &Tensor, b: &Tensor| a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (r1, r2) = (Rotary::new(8, 10000.0), Rotary::new(8, 500.0));
        let (p1, p2): (Vec<u32>, Vec<u32>) = ((0..6).collect(), (3..9).collect());
        for (r, p) in [(&r1, &p1), (&r1, &p2), (&r2, &p2), (&r1, &p1), (&r1, &p1)] {
            let (c, s) = r.tables(p, &Device::Cpu).unwrap();
            let (fc, fs) = r.make_tables(p, &Device::Cpu).unwrap();
            assert!(same(&c, &fc) && same(&s, &fs));
        }
        let att = |window: Option<usize>| {
            let cfg = AttentionConfig { d_model: 8, n_heads: 2, n_kv_heads: 2, head_dim: 4, rotary_dim: 4, rope_theta: 10000.0, qkv_bias: false, out_bias: false, window, causal: true };
            Attention::new_llama(cfg, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)).unwrap()
        };
        let (a, w) = (att(None), att(Some(2)));
        let masked = |m: &Tensor| m.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|v| v.is_infinite()).count();
        // 5×5 causal: 10 masked; with a window of 2: also the keys 2+ behind (6 more); 4 queries: 6.
        for (att, l, want) in [(&a, 5, 10), (&w, 5, 16), (&a, 4, 6), (&a, 5, 10), (&w, 5, 16)] {
            let m = att.mask(1, l, 0, 0, l, None, &Device::Cpu).unwrap().unwrap();
            assert_eq!((m.dims()[2], masked(&m)), (l, want));
        }
    }
}

#[cfg(test)]
mod toeplitz_tests {
    use super::*;

    /// The skewed copy equals the definition M[t, s] = r[s − t + L − 1], and its gradient equals a gather's
    /// (index_select, whose backward is a scatter-add) for the same upstream gradient.
    #[test]
    fn toeplitz_matches_definition_and_gather_gradient() {
        for l in [1usize, 2, 5, 9] {
            let k = 2 * l - 1;
            let r = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, k), &Device::Cpu).unwrap()).unwrap();
            let m = toeplitz(r.as_tensor()).unwrap();
            assert_eq!(m.dims(), &[2, 3, l, l]);
            let idx: Vec<u32> = (0..l).flat_map(|t| (0..l).map(move |s| (s + l - 1 - t) as u32)).collect();
            let gather = r.as_tensor().index_select(&Tensor::from_vec(idx, l * l, &Device::Cpu).unwrap(), 2).unwrap().reshape((2, 3, l, l)).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&m), flat(&gather), "L = {l}");
            let up = Tensor::randn(0f32, 1.0, (2, 3, l, l), &Device::Cpu).unwrap();
            let (g1, g2) = ((m * &up).unwrap().sum_all().unwrap().backward().unwrap(), (gather * &up).unwrap().sum_all().unwrap().backward().unwrap());
            let (a, b) = (flat(g1.get(r.as_tensor()).unwrap()), flat(g2.get(r.as_tensor()).unwrap()));
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "L = {l}: {a:?} vs {b:?}");
        }
    }
}

#[cfg(test)]
mod rows_tests {
    use super::*;
    use candle_core::Var;

    /// add_rows, mul_rows and linear_rows give what the broadcasts give, values and gradients (the CPU takes
    /// the outer-product path).
    #[test]
    fn row_ops_match_broadcasts_with_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 4), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, 4, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 6, &dev).unwrap()).unwrap();
        let lin = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let up = |t: &Tensor| Tensor::randn(0f32, 1.0, t.dims(), &dev).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let (a, b) = (flat(a), flat(b));
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{what}: {a:?} vs {b:?}");
        };
        let (xt, vt) = (x.as_tensor(), v.as_tensor());
        let cases: [(&str, Tensor, Tensor); 3] = [
            ("add", add_rows(xt, vt).unwrap(), xt.broadcast_add(vt).unwrap()),
            ("mul", mul_rows(xt, vt).unwrap(), xt.broadcast_mul(vt).unwrap()),
            ("linear", linear_rows(&lin, xt).unwrap(), lin.forward(xt).unwrap()),
        ];
        for (what, got, want) in cases {
            close(&got, &want, what);
            let u = up(&got);
            let (g1, g2) = ((&got * &u).unwrap().sum_all().unwrap().backward().unwrap(), (&want * &u).unwrap().sum_all().unwrap().backward().unwrap());
            for (name, var) in [("x", &x), ("v", &v), ("w", &w), ("b", &b)] {
                match (g1.get(var.as_tensor()), g2.get(var.as_tensor())) {
                    (Some(a), Some(c)) => close(a, c, &format!("{what}: d{name}")),
                    (None, None) => {}
                    _ => panic!("{what}: d{name} present on one side only"),
                }
            }
        }
        assert!(rows_like(vt, &Tensor::zeros((2, 3), DType::F32, &dev).unwrap()).is_err(), "a vector of 4 for rows of 3");
    }
}
