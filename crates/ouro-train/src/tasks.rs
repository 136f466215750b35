//! The Mamba paper's synthetic tasks (Gu & Dao 2023, §4.1), generated on the fly from (seed, step).
//!
//! - **Selective copying**: `n_memorize` data tokens scattered at random positions among noise tokens in a
//!   context of `len` positions, followed by `n_memorize` marker tokens; at the i-th marker the model must
//!   output the i-th data token. Solving it needs content-aware (selective) state updates: an LTI SSM
//!   cannot ignore the noise.
//! - **Induction heads**: random tokens containing a trigger token followed by a target token; the last
//!   token is the trigger again, and the model must output the target. Trained at one length, tested at
//!   longer ones.
//!
//! Tokens: 0 = noise (selective copying), 1 = marker / trigger, 2.. = data.

use crate::data::Batch;
use candle_core::{bail, Device, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Task {
    SelectiveCopying { n_memorize: usize, n_data: usize },
    InductionHeads { n_data: usize },
}

impl Task {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "selective-copying" => Some(Task::SelectiveCopying { n_memorize: 16, n_data: 16 }),
            "induction-heads" => Some(Task::InductionHeads { n_data: 16 }),
            _ => None,
        }
    }

    pub fn vocab(&self) -> usize {
        match self {
            Task::SelectiveCopying { n_data, .. } | Task::InductionHeads { n_data } => 2 + n_data,
        }
    }

    /// Input length for a context of `len` positions.
    pub fn input_len(&self, len: usize) -> usize {
        match self {
            Task::SelectiveCopying { n_memorize, .. } => len + n_memorize,
            Task::InductionHeads { .. } => len,
        }
    }

    /// A batch at context length `len`; only the answer positions are scored.
    pub fn batch(&self, batch: usize, len: usize, seed: u64, dev: &Device) -> Result<Batch> {
        let mut rng = StdRng::seed_from_u64(seed);
        let total = self.input_len(len);
        let mut inputs = vec![0u32; batch * total];
        let mut targets = vec![0u32; batch * total];
        let mut weights = vec![0f32; batch * total];
        for b in 0..batch {
            let row = &mut inputs[b * total..(b + 1) * total];
            let trow = &mut targets[b * total..(b + 1) * total];
            let wrow = &mut weights[b * total..(b + 1) * total];
            match *self {
                Task::SelectiveCopying { n_memorize, n_data } => {
                    if len < n_memorize {
                        bail!("selective copying needs a context of at least {n_memorize} positions");
                    }
                    // Distinct sorted positions for the data tokens.
                    let mut pos: Vec<usize> = Vec::with_capacity(n_memorize);
                    while pos.len() < n_memorize {
                        let p = rng.random_range(0..len);
                        if !pos.contains(&p) {
                            pos.push(p);
                        }
                    }
                    pos.sort_unstable();
                    for (i, &p) in pos.iter().enumerate() {
                        let tok = 2 + rng.random_range(0..n_data) as u32;
                        row[p] = tok;
                        row[len + i] = 1;
                        trow[len + i] = tok;
                        wrow[len + i] = 1.0;
                    }
                }
                Task::InductionHeads { n_data } => {
                    if len < 4 {
                        bail!("induction heads needs at least 4 positions");
                    }
                    for v in row.iter_mut() {
                        *v = 2 + rng.random_range(0..n_data) as u32;
                    }
                    let p = rng.random_range(0..len - 2);
                    let answer = 2 + rng.random_range(0..n_data) as u32;
                    row[p] = 1;
                    row[p + 1] = answer;
                    row[len - 1] = 1;
                    trow[len - 1] = answer;
                    wrow[len - 1] = 1.0;
                }
            }
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (batch, total), dev)?,
            targets: Tensor::from_vec(targets, (batch, total), dev)?,
            weights: Tensor::from_vec(weights, (batch, total), dev)?,
            seq_idx: None,
        })
    }
}

/// Fraction of answer positions predicted exactly (greedy), over `batches` fresh batches at context `len`.
pub fn accuracy(model: &dyn ouro_nn::lm::LanguageModel, task: &Task, len: usize, batch: usize, batches: usize, seed: u64) -> Result<f64> {
    let (mut hit, mut total) = (0f64, 0f64);
    for i in 0..batches {
        let b = task.batch(batch, len, seed ^ (0xacc0 + i as u64), model.device())?;
        let logits = model.forward(&b.inputs, None, None)?;
        let pred = logits.argmax(candle_core::D::Minus1)?.to_dtype(candle_core::DType::U32)?;
        let correct = pred.eq(&b.targets)?.to_dtype(candle_core::DType::F32)?;
        hit += (correct * &b.weights)?.sum_all()?.to_scalar::<f32>()? as f64;
        total += b.weights.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(hit / total.max(1.0))
}
