//! The language-model interface shared by every architecture, its per-layer recurrent cache, and
//! loading a model from a checkpoint by its config.

use crate::checkpoint::Checkpoint;
use crate::layers::KvCache;
use crate::mamba::MambaState;
use crate::mamba2::Mamba2State;
use crate::rglru::RgLruState;
use candle_core::{bail, DType, Device, Result, Tensor};

/// What one layer carries between calls.
#[derive(Clone, Debug)]
pub enum LayerCache {
    /// Stateless layer (e.g. an MLP).
    None,
    Mamba(MambaState),
    /// Mamba-2 and discrete Mamba-2 mixers.
    Mamba2(Mamba2State),
    Attention(KvCache),
    /// Hawk/Griffin recurrent block.
    RgLru(RgLruState),
}

/// The recurrent state of a whole model for a batch of sequences.
#[derive(Clone, Debug)]
pub struct Cache {
    pub layers: Vec<LayerCache>,
    /// Tokens consumed so far (rows at different positions, see [`Cache::set_row`]: the most by any row).
    pub seqlen: usize,
}

impl Cache {
    pub fn new(layers: Vec<LayerCache>) -> Self {
        Self { layers, seqlen: 0 }
    }

    /// Applies `f` to every state tensor and `kv` to every KV cache.
    fn map(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>, kv: &dyn Fn(&KvCache) -> Result<KvCache>) -> Result<Cache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(match l {
                    LayerCache::None => LayerCache::None,
                    LayerCache::Mamba(s) => LayerCache::Mamba(MambaState { conv: f(&s.conv)?, ssm: f(&s.ssm)? }),
                    LayerCache::Mamba2(s) => LayerCache::Mamba2(Mamba2State { conv: f(&s.conv)?, ssm: f(&s.ssm)? }),
                    LayerCache::Attention(c) => LayerCache::Attention(kv(c)?),
                    LayerCache::RgLru(s) => LayerCache::RgLru(RgLruState { conv: f(&s.conv)?, h: f(&s.h)? }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Cache { layers, seqlen: self.seqlen })
    }

    /// Each sequence's state repeated `n` times along the batch (b → b·n, sequence i → rows i·n..(i+1)·n).
    pub fn repeat_interleave(&self, n: usize) -> Result<Cache> {
        let f = |t: &Tensor| {
            let dims = t.dims();
            let mut expanded = vec![dims[0], n];
            expanded.extend_from_slice(&dims[1..]);
            let mut out = vec![dims[0] * n];
            out.extend_from_slice(&dims[1..]);
            t.unsqueeze(1)?.expand(expanded)?.contiguous()?.reshape(out)
        };
        self.map(&f, &|c: &KvCache| match (&c.rows, c.batch()) {
            (Some(_), Some(b)) => c.select(&(0..(b * n) as u32).map(|r| r / n as u32).collect::<Vec<_>>()),
            _ => Ok(KvCache { k: c.k.as_ref().map(f).transpose()?, v: c.v.as_ref().map(f).transpose()?, seen: c.seen, rows: None }),
        })
    }

    /// The sub-batch of the given sequences (new row r is old row rows[r]).
    pub fn select(&self, rows: &[u32]) -> Result<Cache> {
        let idx = rows.to_vec();
        self.map(&|t: &Tensor| t.contiguous()?.index_select(&Tensor::new(idx.as_slice(), t.device())?, 0), &|c: &KvCache| c.select(rows))
    }

    /// Rows in the batch (None when no layer holds a tensor yet).
    pub fn batch_size(&self) -> Option<usize> {
        self.layers.iter().find_map(|l| match l {
            LayerCache::None => None,
            LayerCache::Mamba(s) => s.ssm.dim(0).ok(),
            LayerCache::Mamba2(s) => s.ssm.dim(0).ok(),
            LayerCache::Attention(c) => c.batch(),
            LayerCache::RgLru(s) => s.h.dim(0).ok(),
        })
    }

    /// The batches of several caches of one model stacked into one, in order. Attention layers whose rows
    /// have consumed different numbers of tokens keep per-row positions ([`KvCache`]); `seqlen` becomes the
    /// most tokens any part has consumed.
    pub fn cat(parts: &[&Cache]) -> Result<Cache> {
        let Some(first) = parts.first() else { bail!("cache: nothing to concatenate") };
        if parts.iter().any(|p| p.layers.len() != first.layers.len()) {
            bail!("cache: caches of different models");
        }
        let cat = |ts: Vec<&Tensor>| Tensor::cat(&ts, 0);
        let layers = (0..first.layers.len())
            .map(|i| {
                let ls: Vec<&LayerCache> = parts.iter().map(|p| &p.layers[i]).collect();
                let mismatch = || candle_core::Error::Msg(format!("cache: layer {i} differs between the caches"));
                Ok(match ls[0] {
                    LayerCache::None => LayerCache::None,
                    LayerCache::Mamba(_) => {
                        let s: Vec<&MambaState> = ls.iter().map(|l| if let LayerCache::Mamba(s) = l { Ok(s) } else { Err(mismatch()) }).collect::<Result<_>>()?;
                        LayerCache::Mamba(MambaState { conv: cat(s.iter().map(|s| &s.conv).collect())?, ssm: cat(s.iter().map(|s| &s.ssm).collect())? })
                    }
                    LayerCache::Mamba2(_) => {
                        let s: Vec<&Mamba2State> = ls.iter().map(|l| if let LayerCache::Mamba2(s) = l { Ok(s) } else { Err(mismatch()) }).collect::<Result<_>>()?;
                        LayerCache::Mamba2(Mamba2State { conv: cat(s.iter().map(|s| &s.conv).collect())?, ssm: cat(s.iter().map(|s| &s.ssm).collect())? })
                    }
                    LayerCache::Attention(_) => {
                        let c: Vec<&KvCache> = ls.iter().map(|l| if let LayerCache::Attention(c) = l { Ok(c) } else { Err(mismatch()) }).collect::<Result<_>>()?;
                        LayerCache::Attention(KvCache::cat(&c)?)
                    }
                    LayerCache::RgLru(_) => {
                        let s: Vec<&RgLruState> = ls.iter().map(|l| if let LayerCache::RgLru(s) = l { Ok(s) } else { Err(mismatch()) }).collect::<Result<_>>()?;
                        LayerCache::RgLru(RgLruState { conv: cat(s.iter().map(|s| &s.conv).collect())?, h: cat(s.iter().map(|s| &s.h).collect())? })
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Cache { layers, seqlen: parts.iter().map(|p| p.seqlen).max().unwrap_or(0) })
    }

    /// A batch assembled from rows of several caches of one model: new row r is row `rows[r].1` of
    /// `parts[rows[r].0]` (continuous batching: the running rows that stay plus the sequences that join,
    /// in two copies of the state however many rows change).
    pub fn gather(parts: &[&Cache], rows: &[(usize, usize)]) -> Result<Cache> {
        let mut offsets = Vec::with_capacity(parts.len());
        let mut total = 0;
        for (k, p) in parts.iter().enumerate() {
            offsets.push(total);
            total += p.batch_size().ok_or_else(|| candle_core::Error::Msg(format!("cache: part {k} holds no state yet")))?;
        }
        let idx = rows
            .iter()
            .map(|&(k, i)| match parts.get(k) {
                Some(p) if p.batch_size().is_some_and(|b| i < b) => Ok((offsets[k] + i) as u32),
                _ => bail!("cache: no row {i} in part {k}"),
            })
            .collect::<Result<Vec<_>>>()?;
        let all = if parts.len() == 1 { parts[0].clone() } else { Cache::cat(parts)? };
        let mut out = all.select(&idx)?;
        out.seqlen = rows.iter().map(|&(k, _)| parts[k].seqlen).max().unwrap_or(0);
        Ok(out)
    }

    /// Writes the single sequence of `src` (a cache of one row, e.g. a prefilled prompt) into row `i`,
    /// leaving the other rows as they are: a new sequence joins a running batch.
    pub fn set_row(&mut self, i: usize, src: &Cache) -> Result<()> {
        if src.layers.len() != self.layers.len() {
            bail!("cache: caches of different models");
        }
        if let Some(b) = src.batch_size().filter(|&b| b != 1) {
            bail!("cache: set_row takes a cache of one sequence, got {b}");
        }
        let put = |t: &Tensor, s: &Tensor| -> Result<Tensor> {
            if i >= t.dim(0)? {
                bail!("cache: row {i} of a batch of {}", t.dim(0)?);
            }
            t.slice_scatter0(s, i)
        };
        for (n, (dst, s)) in self.layers.iter_mut().zip(&src.layers).enumerate() {
            match (dst, s) {
                (LayerCache::None, LayerCache::None) => {}
                (LayerCache::Mamba(d), LayerCache::Mamba(s)) => *d = MambaState { conv: put(&d.conv, &s.conv)?, ssm: put(&d.ssm, &s.ssm)? },
                (LayerCache::Mamba2(d), LayerCache::Mamba2(s)) => *d = Mamba2State { conv: put(&d.conv, &s.conv)?, ssm: put(&d.ssm, &s.ssm)? },
                (LayerCache::Attention(d), LayerCache::Attention(s)) => d.set_row(i, s)?,
                (LayerCache::RgLru(d), LayerCache::RgLru(s)) => *d = RgLruState { conv: put(&d.conv, &s.conv)?, h: put(&d.h, &s.h)? },
                _ => bail!("cache: layer {n} differs between the caches"),
            }
        }
        self.seqlen = self.seqlen.max(src.seqlen);
        Ok(())
    }

    /// Bytes held by the cache (state of SSM layers plus KV of attention layers).
    pub fn bytes(&self) -> usize {
        let sz = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.layers
            .iter()
            .map(|l| match l {
                LayerCache::None => 0,
                LayerCache::Mamba(s) => sz(&s.conv) + sz(&s.ssm),
                LayerCache::Mamba2(s) => sz(&s.conv) + sz(&s.ssm),
                LayerCache::Attention(c) => c.k.as_ref().map_or(0, sz) + c.v.as_ref().map_or(0, sz),
                LayerCache::RgLru(s) => sz(&s.conv) + sz(&s.h),
            })
            .sum()
    }
}

/// Facts about a loaded model, for `ouro info` and the generation engine.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    pub architecture: String,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    /// Recurrent state per sequence in floats (0 for pure attention models), constant in the context length.
    pub state_floats_per_seq: usize,
    /// KV cache floats per token per sequence (0 for pure SSMs).
    pub kv_floats_per_token: usize,
    /// Layer kinds in order, e.g. "mamba2", "attention".
    pub layer_kinds: Vec<String>,
}

/// A causal language model.
pub trait LanguageModel: Send + Sync {
    fn info(&self) -> ModelInfo;
    fn device(&self) -> &Device;
    /// An empty cache for `batch` sequences.
    fn new_cache(&self, batch: usize) -> Result<Cache>;
    /// ids (b, l) u32 → logits (b, l, vocab) f32. With a cache, continues from it and advances it (prefill);
    /// `seq_idx` (b, l) marks packed documents (training without a cache).
    fn forward(&self, ids: &Tensor, seq_idx: Option<&Tensor>, cache: Option<&mut Cache>) -> Result<Tensor>;
    /// One token per sequence: ids (b) → logits (b, vocab), advancing the cache.
    fn step(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor>;
    /// Final normalised hidden states for a classification head: (b, l, d, strands), with 2 strands (forward
    /// and reverse-complement representations, aligned) for RC-equivariant models and 1 otherwise.
    fn features(&self, ids: &Tensor) -> Result<Tensor> {
        let _ = ids;
        bail!("{} does not expose its hidden states", self.info().architecture)
    }
    /// Bidirectional encoders (masked LMs) see the whole sequence and cannot decode.
    fn is_bidirectional(&self) -> bool {
        false
    }
}

/// The architecture named by a checkpoint's config.
pub fn architecture_of(ck: &Checkpoint) -> Result<&'static str> {
    architecture_of_config(&ck.config).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", ck.config_path().display())))
}

/// The architecture a config.json describes: its `model_type`, or the shape of a mamba_ssm / Llamba config.
pub fn architecture_of_config(c: &serde_json::Value) -> Result<&'static str> {
    if let Some(mt) = c.get("model_type").and_then(|v| v.as_str()) {
        return Ok(match mt {
            "mamba" => "mamba",
            "falcon_mamba" => "falcon_mamba",
            "mamba2" => "mamba2",
            "nemotron_h" => "nemotron_h",
            "llama" => "llama",
            "llamba" => "llamba",
            "recurrent_gemma" => "recurrent_gemma",
            "caduceus" => "caduceus",
            "mixer_encoder" => "mixer_encoder",
            other => bail!("model_type '{other}' is not supported (supported: mamba, falcon_mamba, mamba2, nemotron_h, llama, llamba, recurrent_gemma, caduceus, mixer_encoder, and mamba_ssm configs)"),
        });
    }
    // Configs without model_type: mamba_ssm's MambaConfig or Cartesia's LlambaConfig.
    if c.get("mlp_cfg").is_some() || c.pointer("/ssm_cfg/n_v_heads").is_some() {
        return Ok("llamba");
    }
    if c.get("rcps").is_some() || c.get("bidirectional_weight_tie").is_some() {
        return Ok("caduceus");
    }
    if c.get("d_model").is_some() && c.get("n_layer").is_some() {
        return Ok("mamba_ssm");
    }
    bail!("cannot tell the architecture (no model_type, and not a mamba_ssm or Llamba config)")
}

/// Loads the model a checkpoint describes, computing in f32 on `dev`.
pub fn load(ck: &Checkpoint, dev: &Device) -> Result<Box<dyn LanguageModel>> {
    let dtype = DType::F32;
    Ok(match architecture_of(ck)? {
        "mamba" | "falcon_mamba" | "mamba2" | "mamba_ssm" | "nemotron_h" => Box::new(crate::mamba_lm::MambaLm::load(ck, dtype, dev)?),
        "llama" => Box::new(crate::llama::Llama::load(ck, dtype, dev)?),
        "llamba" => Box::new(crate::llamba::Llamba::load(ck, dtype, dev)?),
        "recurrent_gemma" => Box::new(crate::griffin::Griffin::load(ck, dtype, dev)?),
        "caduceus" => Box::new(crate::caduceus::Caduceus::load(ck, dtype, dev)?),
        "mixer_encoder" => Box::new(crate::encoder::Encoder::load(ck, dtype, dev)?),
        other => bail!("architecture {other} has no loader"),
    })
}

/// Token ids as a (rows, len) u32 tensor; rows must have equal lengths.
pub fn ids_tensor(rows: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    let len = rows.first().map_or(0, |r| r.len());
    if len == 0 {
        bail!("empty token sequence");
    }
    if rows.iter().any(|r| r.len() != len) {
        bail!("all rows must have the same length ({len})");
    }
    Tensor::from_vec(rows.concat(), (rows.len(), len), dev)
}

/// Checks ids against the vocabulary, naming the offending id.
pub fn check_ids<R: AsRef<[u32]>>(rows: &[R], vocab: usize) -> Result<()> {
    for r in rows {
        if let Some(&bad) = r.as_ref().iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary (size {vocab})");
        }
    }
    Ok(())
}
