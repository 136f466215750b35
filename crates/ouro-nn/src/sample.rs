//! Batched sampling for test-time compute: many completions per prompt through one running batch, with
//! continuous batching, then answer extraction, majority vote and pass@k.
//!
//! The scheduler keeps at most `batch_size` sequences in one [`Cache`] and advances all of them with one
//! [`LanguageModel::step`] per token. A sequence that finishes (a stop token, a stop check, or
//! `max_new_tokens`) leaves its row and the next pending (prompt, sample) joins in its place at once. Each
//! prompt is prefilled once with the parallel forward; its one-row cache is copied into every row that
//! samples from it ([`Cache::set_row`], [`Cache::gather`]); attention layers then hold rows at different
//! positions (see [`crate::layers::KvCache`]). Every sample draws from its own RNG, seeded from the seed
//! and its (prompt, sample) index, so completions do not depend on the batch size or on the scheduling.
//! The scheduler is written against [`Batcher`] (prefill, step, row operations): the generic model code
//! ([`ModelBatcher`]) or the Mamba-2 CPU engine ([`crate::engine::EngineBatcher`]).

use crate::generate::{Sampler, SamplingParams};
use crate::lm::{check_ids, Cache, LanguageModel};
use crate::tokenizer::Tokenizer;
use candle_core::{bail, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// Completions per prompt. With a time budget, the most per prompt (None: no limit).
    pub num_samples: Option<usize>,
    pub max_new_tokens: usize,
    /// Temperature, top-k, top-p; `seed` seeds every sample's own RNG (see [`sample_seed`]).
    pub sampling: SamplingParams,
    /// Sequences decoded together (rows of the running batch).
    pub batch_size: usize,
    /// Seconds: keep starting samples, round-robin over the prompts, until this much time has passed;
    /// then the samples still running are dropped (only completions finished within the budget count).
    pub time_budget: Option<f64>,
    /// Tokens that end a completion (kept as its last token), e.g. the tokenizer's EOS.
    pub stop_tokens: Vec<u32>,
}

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (EOS).
    Eos,
    /// The stop check (a stop string) fired.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

impl Finish {
    pub fn name(&self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub prompt: usize,
    pub sample: usize,
    /// Generated tokens (a final stop token included).
    pub tokens: Vec<u32>,
    pub finish: Finish,
    /// Seconds from the start of the run at which it finished.
    pub seconds: f64,
}

#[derive(Clone, Debug, Default)]
pub struct SampleStats {
    /// Prompt tokens prefilled (each prompt once).
    pub prompt_tokens: usize,
    /// Tokens generated, those of dropped samples included.
    pub generated_tokens: usize,
    pub completions: usize,
    /// Samples still running when the time budget ran out, and their tokens.
    pub dropped: usize,
    pub dropped_tokens: usize,
    /// Batched decode steps, and the rows they decoded in all.
    pub steps: usize,
    pub row_steps: usize,
    pub prefill_seconds: f64,
    pub seconds: f64,
}

/// The seed of sample `sample` of prompt `prompt` (SplitMix64 of the run's seed and the two indices).
pub fn sample_seed(seed: u64, prompt: usize, sample: usize) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(seed ^ mix(((prompt as u64) << 32) ^ sample as u64))
}

/// What continuous batching needs of a model: a one-sequence prefill, a batched step, and row operations
/// on the batch's state. [`ModelBatcher`] serves any [`LanguageModel`] on any device (a [`Cache`]);
/// [`crate::engine::EngineBatcher`] the Mamba-2 CPU engine (its flat state).
pub trait Batcher {
    type State: Clone;
    fn vocab_size(&self) -> usize;
    /// The state after `prompt` (one row) and the logits after its last token.
    fn prefill(&self, prompt: &[u32]) -> Result<(Self::State, Vec<f32>)>;
    /// Row `i` of `batch` becomes the one row of `src`.
    fn set_row(&self, batch: &mut Self::State, i: usize, src: &Self::State) -> Result<()>;
    /// A batch whose row r is row `order[r].1` of `parts[order[r].0]`.
    fn gather(&self, parts: &[&Self::State], order: &[(usize, usize)]) -> Result<Self::State>;
    /// One token per row; the logits (rows, vocab), row-major.
    fn step(&self, batch: &mut Self::State, ids: &[u32]) -> Result<Vec<f32>>;
}

/// [`Batcher`] for any [`LanguageModel`]: the parallel forward for prompts, `step` on a [`Cache`].
pub struct ModelBatcher<'a>(pub &'a dyn LanguageModel);

impl Batcher for ModelBatcher<'_> {
    type State = Cache;
    fn vocab_size(&self) -> usize {
        self.0.info().vocab_size
    }
    fn prefill(&self, prompt: &[u32]) -> Result<(Cache, Vec<f32>)> {
        crate::generate::prefill(self.0, prompt)
    }
    fn set_row(&self, batch: &mut Cache, i: usize, src: &Cache) -> Result<()> {
        batch.set_row(i, src)
    }
    fn gather(&self, parts: &[&Cache], order: &[(usize, usize)]) -> Result<Cache> {
        Cache::gather(parts, order)
    }
    fn step(&self, batch: &mut Cache, ids: &[u32]) -> Result<Vec<f32>> {
        crate::generate::step_logits(self.0, ids, batch)
    }
}

/// A sequence being decoded.
struct Running {
    prompt: usize,
    sample: usize,
    tokens: Vec<u32>,
    sampler: Sampler,
}

/// Pending (prompt, sample) pairs: prompt by prompt, or round-robin over the prompts under a time budget;
/// each prompt's prefilled cache is kept while samples of it remain to start.
struct Queue<'a, B: Batcher> {
    model: &'a B,
    prompts: &'a [Vec<u32>],
    opts: &'a SampleOptions,
    started: Vec<usize>,
    cursor: usize,
    prefilled: HashMap<usize, (B::State, Vec<f32>)>,
}

impl<B: Batcher> Queue<'_, B> {
    fn cap(&self) -> usize {
        self.opts.num_samples.unwrap_or(usize::MAX)
    }

    fn next_job(&mut self) -> Option<(usize, usize)> {
        let n = self.prompts.len();
        let cap = self.cap();
        let p = if self.opts.time_budget.is_some() {
            // Round-robin: the next prompt after the last one served that has samples left to start.
            let p = (0..n).map(|k| (self.cursor + k) % n).find(|&p| self.started[p] < cap)?;
            self.cursor = (p + 1) % n;
            p
        } else {
            // Prompt by prompt: all samples of one prompt, then the next.
            let p = (self.cursor..n).find(|&p| self.started[p] < cap)?;
            self.cursor = p;
            p
        };
        self.started[p] += 1;
        Some((p, self.started[p] - 1))
    }

    /// The prompt's one-row state and the logits after its last token (prefilled on first use).
    fn prefix(&mut self, p: usize, stats: &mut SampleStats) -> Result<(B::State, Vec<f32>)> {
        if let Some(hit) = self.prefilled.get(&p) {
            return Ok(hit.clone());
        }
        let t = Instant::now();
        let prompt = &self.prompts[p];
        let (state, last) = self.model.prefill(prompt)?;
        stats.prompt_tokens += prompt.len();
        stats.prefill_seconds += t.elapsed().as_secs_f64();
        self.prefilled.insert(p, (state, last));
        Ok(self.prefilled[&p].clone())
    }
}

/// Generates completions for every prompt with continuous batching (see the module docs). `stop` is asked
/// after every token that is not a stop token whether the sample's tokens so far end it (stop strings);
/// `on_done` sees each completion as it finishes. Returns the completions of each prompt in sample order.
pub fn sample_batched(
    model: &dyn LanguageModel,
    prompts: &[Vec<u32>],
    opts: &SampleOptions,
    stop: &(dyn Fn(&[u32]) -> bool + Sync),
    on_done: &mut dyn FnMut(&Completion),
) -> Result<(Vec<Vec<Completion>>, SampleStats)> {
    if model.is_bidirectional() {
        bail!("sample: {} is a bidirectional encoder and cannot generate", model.info().architecture);
    }
    sample_with(&ModelBatcher(model), prompts, opts, stop, on_done)
}

/// [`sample_batched`] through any [`Batcher`] (e.g. the Mamba-2 CPU engine).
pub fn sample_with<B: Batcher>(
    model: &B,
    prompts: &[Vec<u32>],
    opts: &SampleOptions,
    stop: &(dyn Fn(&[u32]) -> bool + Sync),
    on_done: &mut dyn FnMut(&Completion),
) -> Result<(Vec<Vec<Completion>>, SampleStats)> {
    if prompts.is_empty() {
        bail!("sample: no prompts");
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("sample: prompt {i} is empty (no tokens)");
    }
    if opts.num_samples == Some(0) || (opts.num_samples.is_none() && opts.time_budget.is_none()) {
        bail!("sample: the number of samples per prompt must be at least 1 (or give a time budget)");
    }
    if let Some(t) = opts.time_budget.filter(|t| t.is_nan() || *t <= 0.0) {
        bail!("sample: the time budget must be positive, got {t} s");
    }
    if opts.max_new_tokens == 0 || opts.batch_size == 0 {
        bail!("sample: max_new_tokens and batch_size must be at least 1");
    }
    let vocab = model.vocab_size();
    check_ids(prompts, vocab)?;
    Sampler::new(opts.sampling.clone())?;

    let t0 = Instant::now();
    let over_budget = |t0: &Instant| opts.time_budget.is_some_and(|b| t0.elapsed().as_secs_f64() >= b);
    let mut queue = Queue { model, prompts, opts, started: vec![0; prompts.len()], cursor: 0, prefilled: HashMap::new() };
    let mut stats = SampleStats::default();
    let mut done: Vec<Vec<Completion>> = vec![Vec::new(); prompts.len()];
    let mut finish = |c: Completion, stats: &mut SampleStats, done: &mut Vec<Vec<Completion>>| {
        stats.completions += 1;
        on_done(&c);
        done[c.prompt].push(c);
    };
    let ended = |tokens: &[u32]| -> Option<Finish> {
        let last = *tokens.last()?;
        if opts.stop_tokens.contains(&last) {
            Some(Finish::Eos)
        } else if stop(tokens) {
            Some(Finish::Stop)
        } else if tokens.len() >= opts.max_new_tokens {
            Some(Finish::Length)
        } else {
            None
        }
    };

    // Rows of the running batch and its cache (None: no row yet).
    let mut rows: Vec<Option<Running>> = Vec::new();
    let mut cache: Option<B::State> = None;
    loop {
        // Joins: the next pending samples take the free rows, then new rows up to the batch size. A sample
        // whose first token (from the prompt's logits) already ends it never takes a row.
        let mut joins: Vec<(usize, Running, B::State)> = Vec::new(); // (row, sequence, its one-row state)
        let free: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].is_none()).collect();
        let mut slots = free.into_iter().chain(rows.len()..opts.batch_size);
        let mut slot = slots.next();
        while let Some(r) = slot {
            if over_budget(&t0) {
                break;
            }
            let Some((p, s)) = queue.next_job() else { break };
            let (prefix, last) = queue.prefix(p, &mut stats)?;
            if queue.started[p] >= queue.cap() {
                queue.prefilled.remove(&p); // its last sample has started
            }
            let mut sampler = Sampler::new(SamplingParams { seed: sample_seed(opts.sampling.seed, p, s), ..opts.sampling.clone() })?;
            let tokens = vec![sampler.sample(&last)];
            stats.generated_tokens += 1;
            if over_budget(&t0) {
                // The prompt's prefill ran past the budget: this sample is dropped with the running ones.
                stats.dropped += 1;
                stats.dropped_tokens += 1;
                break;
            }
            if let Some(f) = ended(&tokens) {
                finish(Completion { prompt: p, sample: s, tokens, finish: f, seconds: t0.elapsed().as_secs_f64() }, &mut stats, &mut done);
                continue;
            }
            joins.push((r, Running { prompt: p, sample: s, tokens, sampler }, prefix));
            slot = slots.next();
        }
        let vacated = rows.iter().filter(|r| r.is_none()).count();
        let single = joins.len() == 1 && vacated == 1 && joins[0].0 < rows.len();
        if let (true, Some(c)) = (single, cache.as_mut()) {
            // One sequence into the one free row: one copy of the batch's state.
            let (r, run, prefix) = joins.pop().expect("one join");
            model.set_row(c, r, &prefix)?;
            rows[r] = Some(run);
        } else if !joins.is_empty() || vacated > 0 {
            // Rows leave and/or several join: the batch rebuilt from the rows that stay and the new
            // sequences, in row order (two copies of the state).
            let width = rows.len() + joins.iter().filter(|(r, ..)| *r >= rows.len()).count();
            let mut prefixes = Vec::with_capacity(joins.len());
            let mut incoming = HashMap::new(); // row → (its prefix, the sequence)
            for (r, run, prefix) in joins {
                incoming.insert(r, (prefixes.len(), run));
                prefixes.push(prefix);
            }
            let mut parts: Vec<&B::State> = cache.iter().collect();
            let base = parts.len();
            parts.extend(prefixes.iter());
            let (mut order, mut next_rows) = (Vec::new(), Vec::new());
            for r in 0..width {
                let current = rows.get_mut(r).and_then(|x| x.take());
                if let Some((k, run)) = incoming.remove(&r) {
                    order.push((base + k, 0));
                    next_rows.push(Some(run));
                } else if let Some(run) = current {
                    order.push((0, r));
                    next_rows.push(Some(run));
                }
            }
            let next = if order.is_empty() { None } else { Some(model.gather(&parts, &order)?) };
            cache = next;
            rows = next_rows;
        }
        let Some(c) = cache.as_mut() else { break };
        if rows.is_empty() {
            break;
        }
        // One step for every row.
        let ids: Vec<u32> = rows.iter().map(|r| *r.as_ref().expect("running row").tokens.last().expect("a token")).collect();
        let flat = model.step(c, &ids)?;
        if flat.len() != rows.len() * vocab {
            bail!("sample: the step returned {} logits for {} rows of vocab {vocab}", flat.len(), rows.len());
        }
        stats.steps += 1;
        stats.row_steps += rows.len();
        stats.generated_tokens += rows.len();
        let ends: Vec<Option<Finish>> = rows
            .par_iter_mut()
            .enumerate()
            .map(|(i, r)| {
                let run = r.as_mut().expect("running row");
                run.tokens.push(run.sampler.sample(&flat[i * vocab..(i + 1) * vocab]));
                ended(&run.tokens)
            })
            .collect();
        let now = t0.elapsed().as_secs_f64();
        // A step that ends past the budget finishes nothing: its rows are dropped below with the others.
        let late = opts.time_budget.is_some_and(|b| now >= b);
        for (r, f) in rows.iter_mut().zip(ends) {
            if let (Some(f), false) = (f, late) {
                let run = r.take().expect("running row");
                finish(Completion { prompt: run.prompt, sample: run.sample, tokens: run.tokens, finish: f, seconds: now }, &mut stats, &mut done);
            }
        }
        if late {
            for run in rows.iter().flatten() {
                stats.dropped += 1;
                stats.dropped_tokens += run.tokens.len();
            }
            break;
        }
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    for d in &mut done {
        d.sort_by_key(|c| c.sample);
    }
    Ok((done, stats))
}

/// Stop strings: a completion ends once its text contains one of them.
pub struct StopStrings<'a> {
    tok: &'a Tokenizer,
    stops: Vec<String>,
    /// Tokens decoded from the end of a completion to look for a stop string (every token decodes to at
    /// least one byte or one replacement character, so a stop string ending at the last token lies inside).
    window: usize,
}

impl<'a> StopStrings<'a> {
    pub fn new(tok: &'a Tokenizer, stops: &[String]) -> Result<Self> {
        if stops.iter().any(|s| s.is_empty()) {
            bail!("a stop string is empty");
        }
        let window = stops.iter().map(|s| s.len()).max().unwrap_or(0) + 8;
        Ok(Self { tok, stops: stops.to_vec(), window })
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Whether the text of the last tokens contains a stop string.
    pub fn hit(&self, tokens: &[u32]) -> bool {
        if self.stops.is_empty() {
            return false;
        }
        let tail = &tokens[tokens.len().saturating_sub(self.window)..];
        self.tok.decode(tail).is_ok_and(|t| self.stops.iter().any(|s| t.contains(s.as_str())))
    }

    /// The text cut before the first stop string it contains.
    pub fn cut<'t>(&self, text: &'t str) -> &'t str {
        let end = self.stops.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
        &text[..end]
    }
}

/// How an answer is read from a completion.
#[derive(Clone, Debug, Default)]
pub enum AnswerRule {
    /// The text after the last "####" (up to the end of that line), else the last number in the text.
    #[default]
    Default,
    /// Capture group 1 of the regex's last match.
    Regex(regex::Regex),
}

impl AnswerRule {
    /// A regex with exactly one capture group.
    pub fn regex(re: &str) -> Result<Self> {
        let r = regex::Regex::new(re).map_err(|e| candle_core::Error::Msg(format!("answer regex '{re}': {e}")))?;
        if r.captures_len() != 2 {
            bail!("answer regex '{re}' must have exactly one capture group, it has {}", r.captures_len() - 1);
        }
        Ok(AnswerRule::Regex(r))
    }

    /// The normalised answer of a completion (see [`normalize_answer`]), if the rule finds one.
    pub fn extract(&self, text: &str) -> Option<String> {
        let raw = match self {
            AnswerRule::Default => match after_marker(text) {
                Some(a) => a.to_string(),
                None => last_number(text)?,
            },
            AnswerRule::Regex(r) => r.captures_iter(text).last()?.get(1)?.as_str().to_string(),
        };
        let a = normalize_answer(&raw);
        (!a.is_empty()).then_some(a)
    }
}

/// The last number in the text (an optional minus sign, digits with optional thousands commas, an optional
/// decimal part).
pub fn last_number(text: &str) -> Option<String> {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| regex::Regex::new(r"-?\d+(?:,\d{3})*(?:\.\d+)?").expect("number regex"));
    re.find_iter(text).last().map(|m| m.as_str().to_string())
}

/// Answers compare after normalisation: whitespace trimmed, a trailing period dropped, and numbers
/// (optionally with `$`, thousands commas, a trailing `%`) written canonically ("1,000.0" → "1000",
/// "-0.50" → "-0.5").
pub fn normalize_answer(s: &str) -> String {
    let t = s.trim().trim_end_matches('.').trim();
    let num = t.trim_start_matches('$').trim_end_matches('%').replace(',', "");
    if !num.is_empty() && num.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '-') {
        // Integers exactly (an f64 would merge those past 2^53), the rest through f64.
        if let Ok(i) = num.parse::<i128>() {
            return i.to_string();
        }
        if let Ok(x) = num.parse::<f64>() {
            if x.is_finite() {
                return if x == x.trunc() && x.abs() < 1e15 { format!("{}", x as i64) } else { format!("{x}") };
            }
        }
    }
    t.to_string()
}

/// A reference answer: the text after the last "####" when it has one (GSM8K-style worked solutions),
/// else the whole text; normalised.
pub fn reference_answer(s: &str) -> String {
    normalize_answer(after_marker(s).unwrap_or(s))
}

/// The text after the last "####" (GSM8K's answer marker) up to the end of that line, if it has one.
fn after_marker(text: &str) -> Option<&str> {
    text.rfind("####").map(|at| text[at + 4..].lines().next().unwrap_or(""))
}

/// The most common answer and its votes (samples without an answer do not vote); a tie goes to the answer
/// that appears first in sample order.
pub fn majority_vote(answers: &[Option<String>]) -> Option<(String, usize)> {
    let mut counts: Vec<(&str, usize)> = Vec::new(); // in order of first appearance
    for a in answers.iter().flatten() {
        match counts.iter_mut().find(|(x, _)| *x == a.as_str()) {
            Some((_, n)) => *n += 1,
            None => counts.push((a, 1)),
        }
    }
    let best = counts.iter().map(|&(_, n)| n).max()?;
    counts.into_iter().find(|&(_, n)| n == best).map(|(a, n)| (a.to_string(), n))
}

/// The unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021):
/// 1 − C(n−c, k) / C(n, k), computed as 1 − ∏_{i=n−c+1..n} (1 − k/i).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(k >= 1 && k <= n && c <= n, "pass@k needs 1 ≤ k ≤ n and c ≤ n (n {n}, c {c}, k {k})");
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// k = 1, 2, 4, … up to n.
pub fn pass_ks(n: usize) -> Vec<usize> {
    std::iter::successors(Some(1usize), |k| Some(k * 2)).take_while(|&k| k <= n).collect()
}

/// The scores of one prompt's samples.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptScore {
    /// Majority answer and its votes.
    pub majority: Option<(String, usize)>,
    /// With a reference answer: each sample's correctness, the majority's, and pass@k for k in
    /// [`pass_ks`] of the sample count.
    pub correct: Option<Vec<bool>>,
    pub majority_correct: Option<bool>,
    pub pass_at_k: Vec<(usize, f64)>,
}

/// Scores extracted answers against an optional (normalised) reference.
pub fn score(answers: &[Option<String>], reference: Option<&str>) -> PromptScore {
    let majority = majority_vote(answers);
    let Some(r) = reference else { return PromptScore { majority, correct: None, majority_correct: None, pass_at_k: vec![] } };
    let correct: Vec<bool> = answers.iter().map(|a| a.as_deref() == Some(r)).collect();
    let (n, c) = (correct.len(), correct.iter().filter(|&&x| x).count());
    let pass_at_k = pass_ks(n).into_iter().map(|k| (k, pass_at_k(n, c, k))).collect();
    let majority_correct = Some(majority.as_ref().is_some_and(|(a, _)| a == r));
    PromptScore { majority, correct: Some(correct), majority_correct, pass_at_k }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_per_sample() {
        let s: std::collections::HashSet<u64> = (0..4).flat_map(|p| (0..4).map(move |s| sample_seed(7, p, s))).collect();
        assert_eq!(s.len(), 16);
        assert_ne!(sample_seed(1, 0, 0), sample_seed(2, 0, 0));
    }
}
