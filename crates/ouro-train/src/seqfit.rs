//! Sequence property prediction (`ouro fit` / `predict` / `evaluate`): labelled biological sequences from
//! CSV/TSV/FASTA, one-hot or learned-embedding encoders, a choice of models (Lyra, a CNN, a Transformer
//! encoder, a Mamba-2 encoder), regression (MSE on standardised labels) or classification (cross-entropy),
//! the best epoch kept by its validation metric, and the metrics of the Lyra paper.

use crate::optim::AdamW;
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder, VarMap};
use ouro_nn::layers::{linear, Attention, AttentionConfig, RmsNorm};
use ouro_nn::lyra::{Lyra, LyraConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

// ------------------------------------------------------------------------------------------------
// Data
// ------------------------------------------------------------------------------------------------

/// Residue alphabets. Each symbol is one-hot; ambiguity codes are uniform over the standard symbols and
/// padding codes are all-zero (masked out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Alphabet {
    Protein,
    Dna,
    Rna,
}

impl Alphabet {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "protein" => Alphabet::Protein,
            "dna" => Alphabet::Dna,
            "rna" => Alphabet::Rna,
            other => bail!("unknown alphabet '{other}' (protein, dna, rna)"),
        })
    }
    pub fn symbols(&self) -> &'static str {
        match self {
            Alphabet::Protein => "ACDEFGHIKLMNPQRSTVWY",
            Alphabet::Dna => "ACGT",
            Alphabet::Rna => "ACGU",
        }
    }
    /// Ambiguous symbol (uniform) and padding symbols (zero).
    fn ambiguous(&self) -> char {
        match self {
            Alphabet::Protein => 'X',
            _ => 'N',
        }
    }
    fn padding(&self) -> &'static str {
        "J-"
    }
    pub fn size(&self) -> usize {
        self.symbols().len()
    }

    /// Token per position: 0..size for symbols, `size` for ambiguous, `size + 1` for padding.
    pub fn encode(&self, seq: &str, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        let syms = self.symbols().as_bytes();
        seq.trim()
            .chars()
            .map(|c| {
                let u = c.to_ascii_uppercase();
                let u = if *self == Alphabet::Rna && u == 'T' { 'U' } else if *self == Alphabet::Dna && u == 'U' { 'T' } else { u };
                if let Some(i) = syms.iter().position(|&s| s as char == u) {
                    Ok(i as u8)
                } else if u == self.ambiguous() {
                    Ok(self.size() as u8)
                } else if self.padding().contains(u) {
                    Ok(self.size() as u8 + 1)
                } else {
                    bail!("{}: unknown character '{c}' for the {:?} alphabet ({} plus {} and padding {})", what(), self, self.symbols(), self.ambiguous(), self.padding())
                }
            })
            .collect()
    }
}

#[derive(Clone, Debug)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub path: String,
}

impl Table {
    /// CSV or TSV by extension (optionally .gz), or FASTA (.fa/.fasta/.fna): FASTA records become rows with
    /// columns `id`, `sequence` and one column per `key=value` in the header line (a bare last token is
    /// `label`).
    pub fn read(path: &Path) -> Result<Self> {
        let name = path.to_string_lossy().to_string();
        let raw = std::fs::read(path).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        let text = if name.ends_with(".gz") {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&raw[..]), &mut s).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
            s
        } else {
            String::from_utf8(raw).map_err(|_| candle_core::Error::Msg(format!("{name}: not UTF-8 text")))?
        };
        let base = name.trim_end_matches(".gz");
        let t = if base.ends_with(".fa") || base.ends_with(".fasta") || base.ends_with(".fna") {
            Self::fasta(&text, &name)?
        } else {
            let delim = if base.ends_with(".tsv") || base.ends_with(".tab") {
                b'\t'
            } else if base.ends_with(".csv") {
                b','
            } else {
                bail!("{name}: unknown file type (expected .csv, .tsv, .fa/.fasta, optionally .gz)")
            };
            let mut rdr = csv::ReaderBuilder::new().delimiter(delim).from_reader(text.as_bytes());
            let header: Vec<String> = rdr.headers().map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?.iter().map(|s| s.to_string()).collect();
            let rows = rdr
                .records()
                .enumerate()
                .map(|(i, r)| r.map(|r| r.iter().map(|s| s.to_string()).collect()).map_err(|e| candle_core::Error::Msg(format!("{name}: row {}: {e}", i + 2))))
                .collect::<Result<Vec<Vec<String>>>>()?;
            Table { header, rows, path: name.clone() }
        };
        if t.rows.is_empty() {
            bail!("{name}: no data rows");
        }
        Ok(t)
    }

    fn fasta(text: &str, name: &str) -> Result<Self> {
        let mut header = vec!["id".to_string(), "sequence".to_string()];
        let mut recs: Vec<(String, String, Vec<(String, String)>)> = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(h) = line.strip_prefix('>') {
                let mut parts = h.split_whitespace();
                let id = parts.next().unwrap_or("").to_string();
                let mut kv = Vec::new();
                for p in parts {
                    match p.split_once('=') {
                        Some((k, v)) => kv.push((k.to_string(), v.to_string())),
                        None => kv.push(("label".to_string(), p.to_string())),
                    }
                }
                recs.push((id, String::new(), kv));
            } else if !line.is_empty() {
                match recs.last_mut() {
                    Some(r) => r.1.push_str(line),
                    None => bail!("{name}: sequence data before the first '>' header"),
                }
            }
        }
        for (_, _, kv) in &recs {
            for (k, _) in kv {
                if !header.contains(k) {
                    header.push(k.clone());
                }
            }
        }
        let rows = recs
            .into_iter()
            .map(|(id, seq, kv)| {
                let mut row = vec![id, seq];
                for col in &header[2..] {
                    row.push(kv.iter().find(|(k, _)| k == col).map(|(_, v)| v.clone()).unwrap_or_default());
                }
                row
            })
            .collect();
        Ok(Table { header, rows, path: name.to_string() })
    }

    pub fn column(&self, name: &str) -> Result<usize> {
        self.header.iter().position(|h| h == name).ok_or_else(|| candle_core::Error::Msg(format!("{}: no column '{name}' (columns: {})", self.path, self.header.join(", "))))
    }

    /// The finite number in row `r` (0-based data row), column `i`; `what` names the column in the error.
    pub fn number(&self, r: usize, i: usize, what: &str) -> Result<f64> {
        let v = self.rows[r].get(i).map(|s| s.trim()).unwrap_or("");
        v.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| candle_core::Error::Msg(format!("{}: row {}: {what} '{v}' is not a number", self.path, r + 2)))
    }

    pub fn write_csv(path: &Path, header: &[String], rows: &[Vec<String>]) -> Result<()> {
        let tmp = path.with_extension("csv.tmp");
        {
            let mut w = csv::Writer::from_path(&tmp).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.display())))?;
            w.write_record(header).map_err(candle_core::Error::wrap)?;
            for r in rows {
                w.write_record(r).map_err(candle_core::Error::wrap)?;
            }
            w.flush().map_err(candle_core::Error::wrap)?;
        }
        std::fs::rename(&tmp, path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }
}

/// Encoded sequences and labels.
#[derive(Clone, Debug)]
pub struct Examples {
    pub seqs: Vec<Vec<u8>>,
    /// Regression targets, or class indices as f64.
    pub labels: Vec<f64>,
}

/// Reads sequences (and labels, when `label_col` is given) from a table.
pub fn examples(t: &Table, seq_col: &str, label_col: Option<&str>, alphabet: Alphabet, task: Task, classes: &mut Vec<String>, fixed_classes: bool) -> Result<Examples> {
    let si = t.column(seq_col)?;
    let li = label_col.map(|c| t.column(c)).transpose()?;
    let mut seqs = Vec::with_capacity(t.rows.len());
    let mut labels = Vec::with_capacity(t.rows.len());
    for (r, row) in t.rows.iter().enumerate() {
        let cell = |i: usize| row.get(i).map(|s| s.as_str()).unwrap_or("");
        let s = alphabet.encode(cell(si), &|| format!("{}: row {} column '{seq_col}'", t.path, r + 2))?;
        if s.is_empty() {
            bail!("{}: row {}: empty sequence", t.path, r + 2);
        }
        seqs.push(s);
        if let Some(li) = li {
            let v = cell(li).trim();
            labels.push(match task {
                Task::Regression => t.number(r, li, "label")?,
                Task::Classification => match classes.iter().position(|c| c == v) {
                    Some(i) => i as f64,
                    None if !fixed_classes => {
                        classes.push(v.to_string());
                        (classes.len() - 1) as f64
                    }
                    None => bail!("{}: row {}: class '{v}' was not seen in training (classes: {})", t.path, r + 2, classes.join(", ")),
                },
            });
        }
    }
    Ok(Examples { seqs, labels })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Regression,
    Classification,
}

/// A batch: one-hot (b, L, A) or token ids (b, L), and the mask (b, L).
struct Encoded {
    onehot: Tensor,
    ids: Tensor,
    mask: Tensor,
    /// (b, L) pooling weights of the head: the mask (mean pooling), or 1 at the middle real position(s)
    /// (center pooling).
    pool: Tensor,
    /// (b, L) u32 document ids for attention: each run of padding or of real positions is its own document
    /// (the ids count the mask's changes, so they never decrease wherever the padding sits, e.g. Gifford's
    /// leading and trailing 'J'), so real positions never attend to padding.
    segments: Tensor,
}

fn encode_batch(seqs: &[&Vec<u8>], alphabet: Alphabet, pool: Pool, dev: &Device) -> Result<Encoded> {
    let a = alphabet.size();
    let l = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
    let b = seqs.len();
    let mut oh = vec![0f32; b * l * a];
    let mut ids = vec![(a + 1) as u32; b * l];
    let mut mask = vec![0f32; b * l];
    for (i, s) in seqs.iter().enumerate() {
        for (t, &c) in s.iter().enumerate() {
            let o = (i * l + t) * a;
            ids[i * l + t] = c as u32;
            if (c as usize) < a {
                oh[o + c as usize] = 1.0;
                mask[i * l + t] = 1.0;
            } else if c as usize == a {
                oh[o..o + a].fill(1.0 / a as f32);
                mask[i * l + t] = 1.0;
            }
        }
    }
    let pool_w: Vec<f32> = match pool {
        Pool::Mean => mask.clone(),
        Pool::Center => mask
            .chunks(l)
            .flat_map(|row| {
                // The middle of the real positions (one, or the two around the middle of an even count).
                let first = row.iter().position(|&m| m > 0.0).unwrap_or(0);
                let n = row.iter().filter(|&&m| m > 0.0).count().max(1);
                let (lo, hi) = (first + (n - 1) / 2, first + n / 2);
                (0..l).map(move |t| (t == lo || t == hi) as u8 as f32)
            })
            .collect(),
    };
    let segments: Vec<u32> = mask
        .chunks(l)
        .flat_map(|row| {
            let mut id = 0u32;
            (0..l).map(move |t| {
                if t > 0 && row[t] != row[t - 1] {
                    id += 1;
                }
                id
            })
        })
        .collect();
    Ok(Encoded {
        onehot: Tensor::from_vec(oh, (b, l, a), dev)?,
        ids: Tensor::from_vec(ids, (b, l), dev)?,
        mask: Tensor::from_vec(mask, (b, l), dev)?,
        pool: Tensor::from_vec(pool_w, (b, l), dev)?,
        segments: Tensor::from_vec(segments, (b, l), dev)?,
    })
}

// ------------------------------------------------------------------------------------------------
// Models
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// lyra, cnn, transformer, mamba, or backbone (any model `ouro train` builds, described by `backbone`)
    pub kind: String,
    pub d_model: usize,
    /// One-hot inputs (Lyra's default) or a learned embedding.
    pub embedding: String,
    pub dropout: f64,
    /// kind = backbone: the checkpoint config.json of the sequence model under the classification head
    /// (Caduceus, Hydra, a matrix-mixer encoder, Mamba, Llama/BERT, ...). Its token ids: the DNA tokenizer's
    /// for DNA, the alphabet index (symbols, ambiguous, padding) otherwise.
    #[serde(default)]
    pub backbone: Option<serde_json::Value>,
    /// Reverse-complement augmentation while training (DNA): each sequence is replaced by its reverse
    /// complement with probability ½ (Caduceus-Ph).
    #[serde(default)]
    pub rc_augment: bool,
    /// Post-hoc conjoining (DNA): predictions average the model's outputs on x and on rc(x).
    #[serde(default)]
    pub conjoin: bool,
    /// How the head pools the sequence: "mean" over real positions, or "center" (the middle position(s),
    /// for fixed windows centred on a site, e.g. splice junctions).
    #[serde(default = "default_pool")]
    pub pool: String,
}

fn default_pool() -> String {
    "mean".into()
}

/// The head's pooling ([`ModelSpec::pool`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Mean,
    Center,
}

impl Pool {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pool::Mean),
            "center" => Ok(Pool::Center),
            other => bail!("unknown pooling '{other}' (mean or center)"),
        }
    }
}

impl ModelSpec {
    /// A small fixed model of `kind` (lyra, cnn, transformer, mamba) with d_model channels.
    pub fn simple(kind: &str, d_model: usize, embedding: &str, dropout: f64) -> Self {
        Self { kind: kind.into(), d_model, embedding: embedding.into(), dropout, backbone: None, rc_augment: false, conjoin: false, pool: default_pool() }
    }
}

/// The backbone's token id for each alphabet index (symbols, ambiguous, padding) and its vocabulary size.
pub fn backbone_tokens(alphabet: Alphabet) -> (Vec<u32>, usize) {
    match alphabet {
        // Caduceus' DNA characters: A C G T N, padding [PAD].
        Alphabet::Dna => (vec![7, 8, 9, 10, 11, ouro_nn::caduceus::DNA_PAD], ouro_nn::caduceus::DNA_VOCAB.len()),
        a => ((0..a.size() as u32 + 2).collect(), a.size() + 2),
    }
}

/// The reverse complement of an encoded DNA sequence (alphabet indices A C G T = 0..3; N and padding kept).
pub fn reverse_complement(seq: &[u8]) -> Vec<u8> {
    seq.iter().rev().map(|&c| if c < 4 { 3 - c } else { c }).collect()
}

/// Models mapping an encoded batch to (b, outputs).
enum Net {
    Lyra(Lyra),
    Cnn { input: Input, convs: Vec<(Tensor, Tensor)>, head: Linear },
    Transformer { input: Input, layers: Vec<(RmsNorm, Attention, RmsNorm, ouro_nn::layers::GluMlp)>, norm: RmsNorm, head: Linear },
    Mamba { input: Input, layers: Vec<(RmsNorm, ouro_nn::Mamba2)>, norm: RmsNorm, head: Linear },
    /// Any trainable sequence model's final hidden states (b, L, d, strands), masked mean over L, a linear
    /// head per strand, averaged over strands (Caduceus' CaduceusForSequenceClassification).
    Backbone { tr: crate::model::Trainable, tokens: Vec<u32>, head: Linear },
}

/// One-hot through a linear layer, or a learned embedding.
enum Input {
    OneHot(Linear),
    Embedding(Embedding),
}

impl Input {
    fn new(spec: &ModelSpec, a: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match spec.embedding.as_str() {
            "onehot" => Input::OneHot(linear(vb.pp("encoder"), a, spec.d_model, true)?),
            "learned" => Input::Embedding(Embedding::new(vb.get((a + 2, spec.d_model), "embedding.weight")?, spec.d_model)),
            other => bail!("unknown embedding '{other}' (onehot, learned)"),
        })
    }
    fn forward(&self, e: &Encoded) -> Result<Tensor> {
        let x = match self {
            Input::OneHot(l) => l.forward(&e.onehot)?,
            Input::Embedding(emb) => emb.forward(&e.ids)?,
        };
        x.broadcast_mul(&e.mask.unsqueeze(2)?)
    }
}

fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?.clamp(1.0, f64::MAX)?)
}

impl Net {
    fn new(spec: &ModelSpec, alphabet: Alphabet, outputs: usize, varmap: &VarMap, dev: &Device) -> Result<Self> {
        let a = alphabet.size();
        let vb = VarBuilder::from_varmap(varmap, DType::F32, dev);
        let d = spec.d_model;
        if (spec.rc_augment || spec.conjoin) && alphabet != Alphabet::Dna {
            bail!("reverse-complement augmentation and conjoining need the dna alphabet");
        }
        Ok(match spec.kind.as_str() {
            "backbone" => {
                let cfg = spec.backbone.clone().ok_or_else(|| candle_core::Error::Msg("model backbone: no backbone config".into()))?;
                let tr = crate::model::Trainable::new(cfg, dev)?;
                let (tokens, vocab) = backbone_tokens(alphabet);
                let rows = tr.model.info().vocab_size;
                if rows < vocab {
                    bail!("the backbone has {rows} token embeddings, the {alphabet:?} alphabet needs {vocab}");
                }
                // The backbone's parameters join the fit's VarMap under "backbone.", sharing storage.
                for (k, v) in tr.named_vars() {
                    varmap.data().lock().unwrap().insert(format!("backbone.{k}"), v);
                }
                Net::Backbone { head: linear(vb.pp("head"), tr.model.info().d_model, outputs, true)?, tr, tokens }
            }
            "lyra" => {
                if spec.embedding != "onehot" {
                    bail!("lyra takes one-hot inputs (--embedding onehot)");
                }
                Net::Lyra(Lyra::new(LyraConfig { d_input: a, d_output: outputs, d_model: d, d_state: 64, dropout: spec.dropout }, vb)?)
            }
            "cnn" => {
                let input = Input::new(spec, a, vb.clone())?;
                let convs = (0..3).map(|i| Ok((vb.get((d, d, 5), &format!("conv{i}.weight"))?, vb.get(d, &format!("conv{i}.bias"))?))).collect::<Result<Vec<_>>>()?;
                Net::Cnn { input, convs, head: linear(vb.pp("head"), d, outputs, true)? }
            }
            "transformer" => {
                let input = Input::new(spec, a, vb.clone())?;
                let heads = (d / 16).max(1);
                let layers = (0..2)
                    .map(|i| {
                        let l = vb.pp(format!("layers.{i}"));
                        Ok((
                            RmsNorm::new(d, 1e-5, l.pp("norm1"))?,
                            Attention::new_llama(
                                AttentionConfig { d_model: d, n_heads: heads, n_kv_heads: heads, head_dim: d / heads, rotary_dim: d / heads, rope_theta: 10000.0, qkv_bias: false, out_bias: false, window: None, causal: false },
                                l.pp("attn"),
                            )?,
                            RmsNorm::new(d, 1e-5, l.pp("norm2"))?,
                            ouro_nn::layers::GluMlp::new(d, 2 * d, false, ouro_nn::layers::Act::Silu, l.pp("mlp"))?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Net::Transformer { input, layers, norm: RmsNorm::new(d, 1e-5, vb.pp("norm"))?, head: linear(vb.pp("head"), d, outputs, true)? }
            }
            "mamba" => {
                let input = Input::new(spec, a, vb.clone())?;
                let layers = (0..2)
                    .map(|i| {
                        let l = vb.pp(format!("layers.{i}"));
                        let cfg = ouro_nn::Mamba2Config { d_model: d, d_state: 16, expand: 2, headdim: 16, chunk_size: 64, ..Default::default() };
                        Ok((RmsNorm::new(d, 1e-5, l.pp("norm"))?, ouro_nn::Mamba2::new(cfg, l.pp("mixer"))?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Net::Mamba { input, layers, norm: RmsNorm::new(d, 1e-5, vb.pp("norm"))?, head: linear(vb.pp("head"), d, outputs, true)? }
            }
            other => bail!("unknown model '{other}' (lyra, cnn, transformer, mamba, backbone)"),
        })
    }

    fn forward(&self, e: &Encoded, drop: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let m3 = e.mask.unsqueeze(2)?;
        match self {
            Net::Lyra(l) => l.forward_pooled(&e.onehot, &e.mask, &e.pool, drop),
            Net::Cnn { input, convs, head } => {
                let mut x = input.forward(e)?; // (b, l, d)
                for (w, b) in convs {
                    // "same" conv over (b, d, l) then GELU, residual.
                    let y = x.transpose(1, 2)?.contiguous()?.conv1d(w, 2, 1, 1, 1)?.broadcast_add(&b.reshape((1, (), 1))?)?.transpose(1, 2)?;
                    x = (drop(&y.gelu_erf()?)? + x)?.broadcast_mul(&m3)?;
                }
                head.forward(&masked_mean(&x, &e.pool)?)
            }
            Net::Transformer { input, layers, norm, head } => {
                let mut x = input.forward(e)?;
                for (n1, attn, n2, mlp) in layers {
                    x = (&x + drop(&attn.forward(&n1.forward(&x)?, Some(&e.segments), None)?)?)?;
                    x = (&x + drop(&mlp.forward(&n2.forward(&x)?)?)?)?;
                }
                head.forward(&masked_mean(&norm.forward(&x)?, &e.pool)?)
            }
            Net::Mamba { input, layers, norm, head } => {
                let mut x = input.forward(e)?;
                for (n, mixer) in layers {
                    x = (&x + drop(&mixer.forward(&n.forward(&x)?, None, None)?)?)?.broadcast_mul(&m3)?;
                }
                head.forward(&masked_mean(&norm.forward(&x)?, &e.pool)?)
            }
            Net::Backbone { tr, tokens, head } => {
                let map = Tensor::new(tokens.as_slice(), e.ids.device())?;
                let (b, l) = e.ids.dims2()?;
                let ids = map.index_select(&e.ids.flatten_all()?, 0)?.reshape((b, l))?;
                let f = tr.model.features(&ids)?; // (b, L, d, strands)
                let strands = f.dim(3)?;
                let mut out: Option<Tensor> = None;
                for s in 0..strands {
                    let y = head.forward(&drop(&masked_mean(&f.narrow(3, s, 1)?.squeeze(3)?, &e.pool)?)?)?;
                    out = Some(match out {
                        None => y,
                        Some(o) => (o + y)?,
                    });
                }
                out.expect("at least one strand") / strands as f64
            }
        }
    }
}

/// Initialises a fresh network's parameters (PyTorch-style defaults; Lyra's S4D as in s4d.py).
fn init(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    for (name, var) in ouro_nn::checkpoint::named_vars(varmap) {
        if name.starts_with("backbone.") {
            continue; // initialised by the backbone's own rules (or loaded from --init)
        }
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let mut normal = |std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
                    (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect()
        };
        let v: Vec<f32> = if name.ends_with("kernel.log_dt") {
            (0..n).map(|_| rng.random_range(0.001f64.ln()..0.1f64.ln()) as f32).collect()
        } else if name.ends_with("kernel.log_A_real") {
            vec![(0.5f32).ln(); n]
        } else if name.ends_with("kernel.A_imag") {
            (0..n).map(|i| std::f32::consts::PI * (i % dims[1]) as f32).collect()
        } else if name.ends_with("kernel.C") {
            normal(std::f64::consts::FRAC_1_SQRT_2) // complex N(0, 1): each part N(0, ½)
        } else if name.ends_with("s4d.D") {
            normal(1.0)
        } else if name.ends_with("scale") || (name.contains("norm") && name.ends_with("weight")) {
            vec![1.0; n]
        } else if name.ends_with("A_log") {
            (0..n).map(|_| rng.random_range(1.0f64..16.0).ln() as f32).collect()
        } else if name.ends_with("dt_bias") {
            (0..n).map(|_| {
                let dt = rng.random_range(1e-3f64.ln()..1e-1f64.ln()).exp();
                (dt + (-(-dt).exp_m1()).ln()) as f32
            }).collect()
        } else if name.ends_with(".D") {
            vec![1.0; n]
        } else if name.contains("embedding") {
            normal(1.0)
        } else {
            // PyTorch Linear/Conv default: U(±1/√fan_in) for weights and biases.
            let fan_in = if dims.len() >= 2 { dims[1..].iter().product::<usize>() } else { dims[0] };
            let fan_in = if name.ends_with("bias") {
                let w = name.replace("bias", "weight");
                varmap.data().lock().unwrap().get(&w).map(|v| v.dims()[1..].iter().product::<usize>()).unwrap_or(fan_in)
            } else {
                fan_in
            };
            let b = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
        };
        var.set(&Tensor::from_vec(v, dims, var.device())?)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Metrics
// ------------------------------------------------------------------------------------------------

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].partial_cmp(&v[b]).unwrap_or(std::cmp::Ordering::Equal));
    let mut r = vec![0f64; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = avg;
        }
        i = j + 1;
    }
    r
}

pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    if saa == 0.0 || sbb == 0.0 {
        return 0.0;
    }
    sab / (saa * sbb).sqrt()
}

/// Spearman's ρ (Pearson of average ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// Area under the ROC curve of scores for a binary labelling (Mann–Whitney, ties counted half).
pub fn auroc(scores: &[f64], positive: &[bool]) -> f64 {
    let r = ranks(scores);
    let npos = positive.iter().filter(|&&p| p).count() as f64;
    let nneg = positive.len() as f64 - npos;
    if npos == 0.0 || nneg == 0.0 {
        return f64::NAN;
    }
    let sum: f64 = r.iter().zip(positive).filter(|(_, &p)| p).map(|(r, _)| r).sum();
    (sum - npos * (npos + 1.0) / 2.0) / (npos * nneg)
}

/// Metrics by name: regression (spearman, pearson, mse) or classification (accuracy, auroc, f1).
pub fn metrics(task: Task, preds: &[Vec<f64>], labels: &[f64], classes: usize) -> Vec<(String, f64)> {
    match task {
        Task::Regression => {
            let p: Vec<f64> = preds.iter().map(|v| v[0]).collect();
            let mse = p.iter().zip(labels).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / p.len() as f64;
            vec![("spearman".into(), spearman(&p, labels)), ("pearson".into(), pearson(&p, labels)), ("mse".into(), mse)]
        }
        Task::Classification => {
            let argmax = |v: &Vec<f64>| v.iter().enumerate().fold((0, f64::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
            let pred: Vec<usize> = preds.iter().map(argmax).collect();
            let y: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            let acc = pred.iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64;
            // Macro F1 and macro one-vs-rest AUROC (binary: the positive class's AUROC).
            let mut f1s = Vec::new();
            let mut aucs = Vec::new();
            for c in 0..classes {
                let tp = pred.iter().zip(&y).filter(|(p, t)| **p == c && **t == c).count() as f64;
                let fp = pred.iter().zip(&y).filter(|(p, t)| **p == c && **t != c).count() as f64;
                let fneg = pred.iter().zip(&y).filter(|(p, t)| **p != c && **t == c).count() as f64;
                f1s.push(if tp == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fneg) });
                let scores: Vec<f64> = preds.iter().map(|v| v[c]).collect();
                let a = auroc(&scores, &y.iter().map(|&t| t == c).collect::<Vec<_>>());
                if a.is_finite() {
                    aucs.push(a);
                }
            }
            let auc = if classes == 2 { aucs.last().copied().unwrap_or(f64::NAN) } else { aucs.iter().sum::<f64>() / aucs.len().max(1) as f64 };
            vec![("accuracy".into(), acc), ("auroc".into(), auc), ("f1".into(), f1s.iter().sum::<f64>() / classes as f64)]
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Training, saving, prediction
// ------------------------------------------------------------------------------------------------

/// Everything a fitted model folder needs besides its weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FitConfig {
    pub task: Task,
    pub alphabet: Alphabet,
    pub model: ModelSpec,
    /// Regression labels are standardised with these.
    pub label_mean: f64,
    pub label_std: f64,
    /// `--target rank`: the training labels' quantiles at q = 0, 1/K, …, 1; the network then predicts the
    /// standardised rank (q − ½)·√12 and predictions map back through these quantiles. Empty: standardised
    /// labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_quantiles: Vec<f64>,
    pub classes: Vec<String>,
    pub sequence_column: String,
    pub label_column: String,
    pub best_epoch: usize,
    pub best_metric: (String, f64),
    pub parameters: usize,
}

pub struct FitOptions {
    /// Regression target: standardised labels (MSE in label units) or their ranks (MSE on ranks, closer to
    /// the Spearman ρ that property prediction is judged by; robust to heavy-tailed labels).
    pub target: Target,
    /// kind = backbone: start from this checkpoint's weights (e.g. a model pretrained by `ouro train`).
    pub init: Option<std::path::PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub progress: bool,
    /// Write the best model so far into this folder at each new best epoch (config.json +
    /// model.safetensors, through a temporary folder), so an interrupted fit leaves its best epoch.
    pub checkpoint: Option<std::path::PathBuf>,
}

pub struct Fitted {
    pub cfg: FitConfig,
    varmap: VarMap,
    net: Net,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Target {
    #[default]
    Standardized,
    Rank,
}

impl Target {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "standardized" | "standardised" => Ok(Target::Standardized),
            "rank" => Ok(Target::Rank),
            other => bail!("unknown target '{other}' (standardized, rank)"),
        }
    }
}

const RANK_SCALE: f64 = 3.464_101_615_137_754_6; // √12: a uniform rank on [−½, ½] has unit variance

/// v at the fractional index `pos` ∈ [0, len − 1], linearly interpolated.
fn interpolate(v: &[f64], pos: f64) -> f64 {
    let (lo, f) = (pos.floor() as usize, pos.fract());
    if lo + 1 < v.len() { v[lo] * (1.0 - f) + v[lo + 1] * f } else { v[lo] }
}

/// Quantiles of `labels` at q = k/K, k = 0..=K (linear interpolation between order statistics).
fn quantiles(labels: &[f64], k: usize) -> Vec<f64> {
    let mut v = labels.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    (0..=k).map(|i| interpolate(&v, i as f64 / k as f64 * (v.len() - 1) as f64)).collect()
}

/// Label → standardised rank through a quantile table (the training distribution).
fn to_rank(q: &[f64], v: f64) -> f64 {
    let k = q.len() - 1;
    let pos = q.partition_point(|&x| x < v);
    let frac = if pos == 0 {
        0.0
    } else if pos > k {
        1.0
    } else {
        // q[pos−1] < v ≤ q[pos]; a value equal to a run of quantiles takes the middle of the run.
        let hi = q.partition_point(|&x| x <= v).min(k + 1);
        let (a, b) = (q[pos - 1], q[pos]);
        if hi > pos + 1 { (pos as f64 + hi as f64 - 1.0) / 2.0 / k as f64 } else { (pos as f64 - 1.0 + (v - a) / (b - a)) / k as f64 }
    };
    (frac - 0.5) * RANK_SCALE
}

/// Standardised rank → label through the quantile table.
fn from_rank(q: &[f64], z: f64) -> f64 {
    interpolate(q, (z / RANK_SCALE + 0.5).clamp(0.0, 1.0) * (q.len() - 1) as f64)
}

/// Standardised ranks of `labels` among themselves (ties share their mean rank), on the quantile table's
/// scale: the r-th smallest of n sits at q = (r − 1)/(n − 1).
fn own_ranks(labels: &[f64]) -> Vec<f64> {
    let n = labels.len() as f64;
    ranks(labels).into_iter().map(|r| (if n > 1.0 { (r - 1.0) / (n - 1.0) } else { 0.5 } - 0.5) * RANK_SCALE).collect()
}

/// The network's raw outputs (b, outputs); with `conjoin`, the mean of the outputs on x and on rc(x).
fn predict_raw(net: &Net, ex: &Examples, alphabet: Alphabet, spec: &ModelSpec, batch: usize, dev: &Device) -> Result<Vec<Vec<f64>>> {
    let (conjoin, pool) = (spec.conjoin, Pool::parse(&spec.pool)?);
    let mut out = Vec::with_capacity(ex.seqs.len());
    let id = |t: &Tensor| Ok(t.clone());
    for chunk in ex.seqs.chunks(batch) {
        let refs: Vec<&Vec<u8>> = chunk.iter().collect();
        let mut y = net.forward(&encode_batch(&refs, alphabet, pool, dev)?, &id)?;
        if conjoin {
            let rc: Vec<Vec<u8>> = chunk.iter().map(|s| reverse_complement(s)).collect();
            let refs: Vec<&Vec<u8>> = rc.iter().collect();
            y = ((y + net.forward(&encode_batch(&refs, alphabet, pool, dev)?, &id)?)? * 0.5)?;
        }
        out.extend(y.to_dtype(DType::F64)?.to_vec2::<f64>()?);
    }
    Ok(out)
}

impl Fitted {
    /// Predictions in label units (regression) or class probabilities.
    pub fn predict(&self, ex: &Examples, dev: &Device) -> Result<Vec<Vec<f64>>> {
        let raw = predict_raw(&self.net, ex, self.cfg.alphabet, &self.cfg.model, 256, dev)?;
        Ok(match self.cfg.task {
            Task::Regression if !self.cfg.label_quantiles.is_empty() => raw.into_iter().map(|v| vec![from_rank(&self.cfg.label_quantiles, v[0])]).collect(),
            Task::Regression => raw.into_iter().map(|v| vec![v[0] * self.cfg.label_std + self.cfg.label_mean]).collect(),
            Task::Classification => raw
                .into_iter()
                .map(|v| {
                    let m = v.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
                    let s: f64 = e.iter().sum();
                    e.into_iter().map(|x| x / s).collect()
                })
                .collect(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        save_model(dir, &self.cfg, &self.varmap)
    }

    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let cp = dir.join("config.json");
        let cfg: FitConfig = serde_json::from_str(&std::fs::read_to_string(&cp).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cp.display())))?)
            .map_err(|e| candle_core::Error::Msg(format!("{}: not a fitted-model config: {e}", cp.display())))?;
        let mut varmap = VarMap::new();
        let outputs = if cfg.task == Task::Regression { 1 } else { cfg.classes.len() };
        let net = Net::new(&cfg.model, cfg.alphabet, outputs, &varmap, dev)?;
        varmap.load(dir.join("model.safetensors")).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.join("model.safetensors").display())))?;
        Ok(Self { cfg, varmap, net })
    }
}

/// config.json + model.safetensors into `dir`, written in a temporary folder and renamed over it.
fn save_model(dir: &Path, cfg: &FitConfig, varmap: &VarMap) -> Result<()> {
    crate::write_folder(dir, |tmp| {
        let file = tmp.join("config.json");
        std::fs::write(&file, serde_json::to_string_pretty(cfg).unwrap()).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
        varmap.save(tmp.join("model.safetensors"))
    })
}

/// Several fitted models of one task (e.g. the same configuration fitted with different seeds) predicting
/// together: the mean of their predictions in label units (regression) or of their class probabilities.
pub struct Ensemble {
    pub members: Vec<Fitted>,
}

impl Ensemble {
    /// Loads the model folders; they must share the task, alphabet, classes and sequence column.
    pub fn load(dirs: &[std::path::PathBuf], dev: &Device) -> Result<Self> {
        let Some(first) = dirs.first() else { bail!("ensemble: no model folder given") };
        let members = dirs.iter().map(|d| Fitted::load(d, dev)).collect::<Result<Vec<_>>>()?;
        let c0 = &members[0].cfg;
        for (d, m) in dirs.iter().zip(&members).skip(1) {
            let c = &m.cfg;
            if (c.task, c.alphabet, &c.classes, &c.sequence_column) != (c0.task, c0.alphabet, &c0.classes, &c0.sequence_column) {
                bail!(
                    "ensemble: {} predicts {:?} over the {:?} alphabet (classes {:?}, column '{}') but {} predicts {:?} over {:?} (classes {:?}, column '{}')",
                    d.display(), c.task, c.alphabet, c.classes, c.sequence_column,
                    first.display(), c0.task, c0.alphabet, c0.classes, c0.sequence_column
                );
            }
        }
        Ok(Self { members })
    }

    /// The first member's configuration (task, alphabet, classes are shared by all).
    pub fn cfg(&self) -> &FitConfig {
        &self.members[0].cfg
    }

    pub fn parameters(&self) -> usize {
        self.members.iter().map(|m| m.cfg.parameters).sum()
    }

    /// The members' mean prediction per sequence.
    pub fn predict(&self, ex: &Examples, dev: &Device) -> Result<Vec<Vec<f64>>> {
        let mut sum: Option<Vec<Vec<f64>>> = None;
        for m in &self.members {
            let p = m.predict(ex, dev)?;
            sum = Some(match sum {
                None => p,
                Some(s) => s.into_iter().zip(p).map(|(a, b)| a.into_iter().zip(b).map(|(x, y)| x + y).collect()).collect(),
            });
        }
        let k = self.members.len() as f64;
        Ok(sum.unwrap_or_default().into_iter().map(|v| v.into_iter().map(|x| x / k).collect()).collect())
    }
}

/// Inverted dropout: each element zeroed with probability p, the rest scaled by 1/(1 − p). On the CPU the
/// mask comes from `rng` (a fit with a given seed is reproducible); on a GPU from the device's generator, which
/// `fit` seeds once: drawing millions of numbers per step on the host and uploading them bound the GPU step.
pub fn dropout(t: &Tensor, p: f64, rng: &mut StdRng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(t.clone());
    }
    if !(0.0..1.0).contains(&p) {
        bail!("dropout probability {p} must be in [0, 1)");
    }
    let scale = 1.0 / (1.0 - p);
    if !t.device().is_cpu() {
        let keep = Tensor::rand(0f32, 1f32, t.shape(), t.device())?.ge(p)?.to_dtype(t.dtype())?;
        return t.mul(&(keep * scale)?);
    }
    let v: Vec<f32> = (0..t.elem_count()).map(|_| if rng.random::<f64>() < p { 0.0 } else { scale as f32 }).collect();
    t.mul(&Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?)
}

/// Trains on `train`, keeps the epoch with the best validation metric (Spearman or accuracy), and
/// returns the fitted model and the per-epoch log lines.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    train: &Examples,
    valid: &Examples,
    task: Task,
    alphabet: Alphabet,
    classes: Vec<String>,
    spec: ModelSpec,
    columns: (&str, &str),
    o: &FitOptions,
    dev: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<Fitted> {
    if train.seqs.is_empty() || valid.seqs.is_empty() {
        bail!("fit: empty training or validation set");
    }
    if task == Task::Classification && classes.len() < 2 {
        bail!("fit: classification needs at least two classes, found {:?}", classes);
    }
    let (mean, std) = if task == Task::Regression {
        let n = train.labels.len() as f64;
        let m = train.labels.iter().sum::<f64>() / n;
        let s = (train.labels.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n).sqrt();
        (m, if s > 0.0 { s } else { 1.0 })
    } else {
        (0.0, 1.0)
    };
    // Training targets, and the validation labels in the same units.
    let (targets, vlabels, label_quantiles): (Vec<f64>, Vec<f64>, Vec<f64>) = match (task, o.target) {
        (Task::Classification, _) => (train.labels.clone(), valid.labels.clone(), vec![]),
        (Task::Regression, Target::Standardized) => (train.labels.iter().map(|v| (v - mean) / std).collect(), valid.labels.iter().map(|v| (v - mean) / std).collect(), vec![]),
        (Task::Regression, Target::Rank) => {
            let q = quantiles(&train.labels, 1000);
            (own_ranks(&train.labels), valid.labels.iter().map(|&v| to_rank(&q, v)).collect(), q)
        }
    };
    let outputs = if task == Task::Regression { 1 } else { classes.len() };
    let pool = Pool::parse(&spec.pool)?;
    let varmap = VarMap::new();
    let net = Net::new(&spec, alphabet, outputs, &varmap, dev)?;
    init(&varmap, o.seed)?;
    match (&net, &o.init) {
        (Net::Backbone { tr, .. }, Some(path)) => {
            let ck = ouro_nn::checkpoint::Checkpoint::open(path)?;
            tr.load_weights(&ck)?;
            log(&format!("backbone initialised from {}", path.display()));
        }
        (Net::Backbone { tr, .. }, None) => tr.init(o.seed)?,
        (_, Some(_)) => bail!("--init needs a backbone model"),
        _ => {}
    }
    let named = ouro_nn::checkpoint::named_vars(&varmap);
    let params: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
    log(&format!("model {} (d_model {}, {}): {params} parameters", spec.kind, spec.d_model, spec.embedding));
    let mut opt = AdamW::new(named, 0.9, 0.999, 1e-8, o.weight_decay)?;
    let mut rng = StdRng::seed_from_u64(o.seed ^ 0xf17);
    if !dev.is_cpu() {
        dev.set_seed(o.seed ^ 0xd70)?;
    }
    let metric_name = if task == Task::Regression { "spearman" } else { "accuracy" };
    let config = |best_epoch: usize, best_score: f64| FitConfig {
        task,
        alphabet,
        model: spec.clone(),
        label_mean: mean,
        label_std: std,
        label_quantiles: label_quantiles.clone(),
        classes: classes.clone(),
        sequence_column: columns.0.to_string(),
        label_column: columns.1.to_string(),
        best_epoch,
        best_metric: (metric_name.to_string(), best_score),
        parameters: params,
    };
    let mut best: Option<(usize, f64, Vec<(String, Tensor)>)> = None;
    let steps_per_epoch = train.seqs.len().div_ceil(o.batch_size);
    let total = o.epochs * steps_per_epoch;
    let mut step = 0;
    let bar = o.progress.then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").unwrap());
        b
    });
    for epoch in 1..=o.epochs {
        let mut order: Vec<usize> = (0..train.seqs.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut loss_sum = 0f64;
        for chunk in order.chunks(o.batch_size) {
            let seqs: Vec<Vec<u8>> = chunk
                .iter()
                .map(|&i| if spec.rc_augment && rng.random::<bool>() { reverse_complement(&train.seqs[i]) } else { train.seqs[i].clone() })
                .collect();
            let refs: Vec<&Vec<u8>> = seqs.iter().collect();
            let e = encode_batch(&refs, alphabet, pool, dev)?;
            let p = spec.dropout;
            let mut drop_rng = StdRng::seed_from_u64(o.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let masks = std::cell::RefCell::new(&mut drop_rng);
            let drop = |t: &Tensor| dropout(t, p, &mut masks.borrow_mut());
            let out = net.forward(&e, &drop)?;
            let loss = match task {
                Task::Regression => {
                    let y: Vec<f32> = chunk.iter().map(|&i| targets[i] as f32).collect();
                    let y = Tensor::from_vec(y, (chunk.len(), 1), dev)?;
                    (out - y)?.sqr()?.mean_all()?
                }
                Task::Classification => {
                    let y: Vec<u32> = chunk.iter().map(|&i| targets[i] as u32).collect();
                    candle_nn::loss::cross_entropy(&out, &Tensor::from_vec(y, chunk.len(), dev)?)?
                }
            };
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                bail!("epoch {epoch}: the loss is {lv}");
            }
            loss_sum += lv * chunk.len() as f64;
            let mut acc = Vec::new();
            opt.accumulate(&mut acc, &loss.backward()?)?;
            opt.step(&acc, o.lr * crate::optim::lr_at(step, total, total / 20, 1.0, 0.05), 1.0)?;
            step += 1;
            if let Some(b) = &bar {
                b.set_position(step as u64);
                b.set_message(format!("epoch {epoch} loss {lv:.4}"));
            }
        }
        let preds = predict_raw(&net, valid, alphabet, &spec, 256, dev)?;
        let m = metrics(task, &preds, &vlabels, outputs);
        let score = m.iter().find(|(k, _)| k == metric_name).map(|x| x.1).unwrap_or(f64::NAN);
        let line = format!("epoch {epoch}: train loss {:.4}, valid {}", loss_sum / train.seqs.len() as f64, m.iter().map(|(k, v)| format!("{k} {v:.4}")).collect::<Vec<_>>().join(", "));
        match &bar {
            Some(b) => b.println(line),
            None => log(&line),
        }
        if best.as_ref().is_none_or(|b| score > b.1) {
            let snapshot = varmap.data().lock().unwrap().iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect::<Result<Vec<_>>>()?;
            best = Some((epoch, score, snapshot));
            if let Some(dir) = &o.checkpoint {
                save_model(dir, &config(epoch, score), &varmap)?;
            }
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let (best_epoch, best_score, snapshot) = best.expect("at least one epoch");
    {
        let data = varmap.data().lock().unwrap();
        for (k, t) in snapshot {
            data[&k].set(&t)?;
        }
    }
    Ok(Fitted { cfg: config(best_epoch, best_score), varmap, net })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_pooling_weighs_the_middle_of_the_real_positions() {
        // Lengths 5 and 6 padded to 6, and a protein with Gifford-style padding ('J') at both ends.
        let (a, b) = (vec![0u8, 1, 2, 3, 0], vec![0u8, 1, 2, 3, 0, 1]);
        let e = encode_batch(&[&a, &b], Alphabet::Dna, Pool::Center, &Device::Cpu).unwrap();
        assert_eq!(e.pool.to_vec2::<f32>().unwrap(), vec![vec![0., 0., 1., 0., 0., 0.], vec![0., 0., 1., 1., 0., 0.]]);
        let e = encode_batch(&[&a, &b], Alphabet::Dna, Pool::Mean, &Device::Cpu).unwrap();
        assert_eq!(e.pool.to_vec2::<f32>().unwrap(), e.mask.to_vec2::<f32>().unwrap());
        let pad = Alphabet::Protein.size() as u8 + 1;
        let c = vec![pad, pad, 4, 5, 6, pad];
        let e = encode_batch(&[&c], Alphabet::Protein, Pool::Center, &Device::Cpu).unwrap();
        assert_eq!(e.pool.to_vec2::<f32>().unwrap(), vec![vec![0., 0., 0., 1., 0., 0.]]);
        assert!(Pool::parse("center").is_ok() && Pool::parse("cls").is_err());
    }

    #[test]
    fn rank_targets_round_trip_through_the_quantile_table() {
        // Smooth labels: the table gives back each label from its rank and each rank from its label.
        let labels: Vec<f64> = (0..500).map(|i| (((i * 37) % 500) as f64 * 0.01).powi(2)).collect();
        let q = quantiles(&labels, 1000);
        let (lo, hi) = labels.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert_eq!((q[0], q[1000]), (lo, hi));
        let z = own_ranks(&labels);
        let (m, v) = (z.iter().sum::<f64>() / 500.0, z.iter().map(|x| x * x).sum::<f64>() / 500.0);
        assert!(m.abs() < 1e-12 && (v - 1.0).abs() < 0.01, "ranks are standardised: mean {m}, var {v}");
        for (&l, &zi) in labels.iter().zip(&z) {
            assert!((from_rank(&q, zi) - l).abs() < 1e-3, "label {l}: {}", from_rank(&q, zi));
            assert!((to_rank(&q, l) - zi).abs() < 1e-3, "label {l}: rank {} vs {zi}", to_rank(&q, l));
        }
        // Heavy-tailed labels with ties: both maps stay monotone, so ranks (and Spearman's ρ) survive.
        let labels: Vec<f64> = (0..300).map(|i| if i % 7 == 0 { 100.0 + (i % 3) as f64 } else { (i % 10) as f64 * 0.01 }).collect();
        let q = quantiles(&labels, 1000);
        let z = own_ranks(&labels);
        let back: Vec<f64> = z.iter().map(|&zi| from_rank(&q, zi)).collect();
        assert!((spearman(&back, &labels) - 1.0).abs() < 1e-12);
        let again: Vec<f64> = labels.iter().map(|&l| to_rank(&q, l)).collect();
        assert!((spearman(&again, &z) - 1.0).abs() < 1e-12);
        // Clamped outside the training range.
        assert!(to_rank(&q, -1.0) == -0.5 * RANK_SCALE && to_rank(&q, 1e9) == 0.5 * RANK_SCALE);
        assert_eq!(from_rank(&q, 10.0), q[1000]);
        assert!(Target::parse("rank").is_ok() && Target::parse("ranks").is_err());
    }
}
