//! Generation: prefill the prompt with the parallel forward, then decode with the recurrent step for a
//! whole batch of samples at once (the prompt's state is computed once and replicated).

use crate::lm::{check_ids, ids_tensor, Cache, LanguageModel};
use candle_core::{bail, DType, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 → greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus: keep the smallest set with probability ≥ top_p (1: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

pub struct Sampler {
    p: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(p: SamplingParams) -> Result<Self> {
        if !(p.temperature >= 0.0) || !(p.top_p > 0.0 && p.top_p <= 1.0) {
            bail!("sampling: temperature must be ≥ 0 and top_p in (0, 1], got {} and {}", p.temperature, p.top_p);
        }
        let rng = StdRng::seed_from_u64(p.seed);
        Ok(Self { p, rng })
    }

    /// Draws a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
        if self.p.temperature == 0.0 {
            return argmax();
        }
        let t = self.p.temperature as f32;
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| logits[b as usize].partial_cmp(&logits[a as usize]).unwrap_or(std::cmp::Ordering::Equal));
        if self.p.top_k > 0 {
            idx.truncate(self.p.top_k);
        }
        let m = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i as usize] - m) / t).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.p.top_p < 1.0 {
            let mut acc = 0f32;
            let keep = probs.iter().position(|&p| {
                acc += p;
                acc >= self.p.top_p as f32
            });
            let keep = keep.map_or(probs.len(), |k| k + 1);
            probs.truncate(keep);
            idx.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0f32;
        for (k, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return idx[k];
            }
        }
        *idx.last().unwrap()
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub num_samples: usize,
    pub sampling: SamplingParams,
    /// Generation of a sample stops after any of these tokens.
    pub stop: Vec<u32>,
}

/// Timing of a generation run.
#[derive(Clone, Debug, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Bytes of the recurrent cache at the end (state + KV).
    pub cache_bytes: usize,
}

/// What generation needs from a model: run the prompt once, fork its state into a batch of sequences,
/// then step the whole batch one token at a time.
pub trait Decoder {
    fn vocab_size(&self) -> usize;
    /// Runs `prompt` and leaves `n` sequences continuing it; returns the logits after its last token.
    fn start(&mut self, prompt: &[u32], n: usize) -> Result<Vec<f32>>;
    /// One token per sequence; returns the logits (n, vocab), row-major.
    fn step(&mut self, tokens: &[u32]) -> Result<&[f32]>;
    /// Bytes of the recurrent cache (state + KV).
    fn cache_bytes(&self) -> usize;
}

/// Any [`LanguageModel`] on any device: parallel forward for the prompt, recurrent step after it.
pub struct ModelDecoder<'a> {
    model: &'a dyn LanguageModel,
    cache: Option<Cache>,
    logits: Vec<f32>,
}

impl<'a> ModelDecoder<'a> {
    pub fn new(model: &'a dyn LanguageModel) -> Self {
        Self { model, cache: None, logits: Vec::new() }
    }
}

impl Decoder for ModelDecoder<'_> {
    fn vocab_size(&self) -> usize {
        self.model.info().vocab_size
    }

    fn start(&mut self, prompt: &[u32], n: usize) -> Result<Vec<f32>> {
        let (cache, last) = prefill(self.model, prompt)?;
        self.cache = Some(if n > 1 { cache.repeat_interleave(n)? } else { cache });
        Ok(last)
    }

    fn step(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let Some(cache) = self.cache.as_mut() else { bail!("decoder: step before start") };
        self.logits = step_logits(self.model, tokens, cache)?;
        Ok(&self.logits)
    }

    fn cache_bytes(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.bytes())
    }
}

/// One sequence's prompt through the parallel forward: its cache (one row) and the logits after its last token.
pub fn prefill(model: &dyn LanguageModel, prompt: &[u32]) -> Result<(Cache, Vec<f32>)> {
    let mut cache = model.new_cache(1)?;
    let logits = model.forward(&ids_tensor(&[prompt.to_vec()], model.device())?, None, Some(&mut cache))?; // (1, l, V)
    let last = logits.narrow(1, prompt.len() - 1, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    Ok((cache, last))
}

/// One token per row of `cache` through `step`: the logits (rows, vocab), row-major.
pub fn step_logits(model: &dyn LanguageModel, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
    let logits = model.step(&Tensor::new(tokens, model.device())?, cache)?; // (n, V)
    logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// Generates `num_samples` continuations of `prompt` with `model`; see [`generate_with`].
pub fn generate(
    model: &dyn LanguageModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<(Vec<Vec<u32>>, GenerateStats)> {
    generate_with(&mut ModelDecoder::new(model), prompt, opts, on_token)
}

/// Generates `num_samples` continuations of `prompt` in one batch. `on_token(sample, token)` is called as
/// each token is produced. Returns the generated ids per sample (stop token included when hit).
pub fn generate_with(
    dec: &mut dyn Decoder,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<(Vec<Vec<u32>>, GenerateStats)> {
    if prompt.is_empty() {
        bail!("generate: the prompt is empty (no tokens)");
    }
    if opts.num_samples == 0 {
        bail!("generate: num_samples must be at least 1");
    }
    let v = dec.vocab_size();
    check_ids(&[prompt.to_vec()], v)?;
    let mut stats = GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
    let n = opts.num_samples;
    let mut out = vec![Vec::new(); n];
    if opts.max_new_tokens == 0 {
        return Ok((out, stats));
    }
    let t0 = std::time::Instant::now();
    let last = dec.start(prompt, n)?;
    stats.prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut done = vec![false; n];
    let mut next: Vec<u32> = (0..n).map(|_| sampler.sample(&last)).collect();
    for step in 0..opts.max_new_tokens {
        for (i, &t) in next.iter().enumerate() {
            if !done[i] {
                out[i].push(t);
                stats.generated_tokens += 1;
                on_token(i, t)?;
                if opts.stop.contains(&t) {
                    done[i] = true;
                }
            }
        }
        if step + 1 == opts.max_new_tokens || done.iter().all(|&d| d) {
            break;
        }
        let flat = dec.step(&next)?;
        next = (0..n).map(|i| sampler.sample(&flat[i * v..(i + 1) * v])).collect();
    }
    stats.decode_seconds = t1.elapsed().as_secs_f64();
    stats.cache_bytes = dec.cache_bytes();
    Ok((out, stats))
}
