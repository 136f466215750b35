//! Generation: prefill the prompt with the parallel forward, then decode with the recurrent step for a
//! whole batch of samples at once (the prompt's state is computed once and replicated).

use crate::lm::{check_ids, ids_tensor, LanguageModel};
use candle_core::{bail, Result, Tensor};
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

/// Generates `num_samples` continuations of `prompt` in one batch. `on_token(sample, token)` is called as
/// each token is produced. Returns the generated ids per sample (stop token included when hit).
pub fn generate(
    model: &dyn LanguageModel,
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
    let info = model.info();
    check_ids(&[prompt.to_vec()], info.vocab_size)?;
    let dev = model.device().clone();
    let mut stats = GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
    let n = opts.num_samples;
    let mut out = vec![Vec::new(); n];
    if opts.max_new_tokens == 0 {
        return Ok((out, stats));
    }
    let t0 = std::time::Instant::now();
    let mut cache = model.new_cache(1)?;
    let logits = model.forward(&ids_tensor(&[prompt.to_vec()], &dev)?, None, Some(&mut cache))?; // (1, l, V)
    let last: Vec<f32> = logits.narrow(1, prompt.len() - 1, 1)?.flatten_all()?.to_vec1()?;
    let mut cache = if n > 1 { cache.repeat_interleave(n)? } else { cache };
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
        let logits = model.step(&Tensor::new(next.as_slice(), &dev)?, &mut cache)?; // (n, V)
        let v = info.vocab_size;
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        next = (0..n).map(|i| sampler.sample(&flat[i * v..(i + 1) * v])).collect();
    }
    stats.decode_seconds = t1.elapsed().as_secs_f64();
    stats.cache_bytes = cache.bytes();
    Ok((out, stats))
}
