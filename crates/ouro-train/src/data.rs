//! Corpora as documents of token ids, a document-level train/validation split, and packed batches.
//!
//! A batch row is a window of `seq_len + 1` tokens from the concatenated documents; `seq_idx` numbers the
//! documents inside the window so that the models reset their state (and attention) at every boundary,
//! and the target that would cross a boundary is not scored. Window offsets are drawn from an RNG seeded
//! by (seed, step), so a resumed run sees exactly the batches the uninterrupted run would have.

use candle_core::{bail, Device, Result, Tensor};
use ouro_nn::tokenizer::Tokenizer;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Document {
    pub name: String,
    pub tokens: Vec<u32>,
}

/// The concatenation of some documents, with each token's document index.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    pub tokens: Vec<u32>,
    pub doc: Vec<u32>,
    pub names: Vec<String>,
}

impl Stream {
    pub fn new(docs: &[Document]) -> Self {
        let mut s = Stream::default();
        for (i, d) in docs.iter().enumerate() {
            s.tokens.extend_from_slice(&d.tokens);
            s.doc.extend(std::iter::repeat_n(i as u32, d.tokens.len()));
            s.names.push(d.name.clone());
        }
        s
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A batch: inputs (b, l), targets (b, l), loss weights (b, l) (0 where not scored), seq_idx (b, l): None
/// where no row's inputs cross a document boundary, so that the models take their paths without resets (on
/// CUDA the SSD kernels, which do not take document boundaries).
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
    pub seq_idx: Option<Tensor>,
}

/// Text documents from a corpus folder (every .txt, sorted by name), a single file, or a fetched corpus.
pub fn read_text_documents(path: &Path) -> Result<Vec<(String, String)>> {
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        return Ok(vec![(path.display().to_string(), text)]);
    }
    if !path.is_dir() {
        bail!("{}: no such corpus file or folder", path.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .txt documents", path.display());
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", f.display())))?;
            Ok((f.file_stem().unwrap().to_string_lossy().into_owned(), text))
        })
        .collect()
}

pub fn tokenize(docs: Vec<(String, String)>, tok: &Tokenizer) -> Result<Vec<Document>> {
    let out: Vec<Document> = docs
        .into_iter()
        .map(|(name, text)| Ok(Document { name, tokens: tok.encode(&text)? }))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|d| !d.tokens.is_empty())
        .collect();
    if out.is_empty() {
        bail!("the corpus is empty (no tokens)");
    }
    Ok(out)
}

/// Splits documents into (train, valid): a seeded shuffle, then whole documents held out until
/// `valid_fraction` of the tokens are. A single document is split at a token position instead.
pub fn split(mut docs: Vec<Document>, valid_fraction: f64, seed: u64) -> (Vec<Document>, Vec<Document>) {
    if valid_fraction <= 0.0 {
        return (docs, Vec::new());
    }
    if docs.len() == 1 {
        let d = docs.pop().unwrap();
        let cut = ((1.0 - valid_fraction) * d.tokens.len() as f64) as usize;
        let (a, b) = d.tokens.split_at(cut);
        return (vec![Document { name: d.name.clone(), tokens: a.to_vec() }], vec![Document { name: format!("{} (tail)", d.name), tokens: b.to_vec() }]);
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5917);
    for i in (1..docs.len()).rev() {
        let j = rng.random_range(0..=i);
        docs.swap(i, j);
    }
    let total: usize = docs.iter().map(|d| d.tokens.len()).sum();
    let want = (valid_fraction * total as f64) as usize;
    let mut valid = Vec::new();
    let mut held = 0;
    while held < want && docs.len() > 1 {
        let d = docs.pop().unwrap();
        held += d.tokens.len();
        valid.push(d);
    }
    docs.sort_by(|a, b| a.name.cmp(&b.name));
    valid.sort_by(|a, b| a.name.cmp(&b.name));
    (docs, valid)
}

fn make_batch(rows: Vec<(Vec<u32>, Vec<u32>)>, seq_len: usize, dev: &Device) -> Result<Batch> {
    let b = rows.len();
    let mut inputs = Vec::with_capacity(b * seq_len);
    let mut targets = Vec::with_capacity(b * seq_len);
    let mut weights = Vec::with_capacity(b * seq_len);
    let mut seq = Vec::with_capacity(b * seq_len);
    for (toks, docs) in rows {
        for t in 0..seq_len {
            inputs.push(toks[t]);
            targets.push(toks[t + 1]);
            weights.push(if docs[t] == docs[t + 1] { 1f32 } else { 0f32 });
            seq.push(docs[t] - docs[0]);
        }
    }
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, seq_len), dev)?,
        targets: Tensor::from_vec(targets, (b, seq_len), dev)?,
        weights: Tensor::from_vec(weights, (b, seq_len), dev)?,
        seq_idx: if seq.iter().any(|&d| d != 0) { Some(Tensor::from_vec(seq, (b, seq_len), dev)?) } else { None },
    })
}

impl Stream {
    fn window(&self, start: usize, seq_len: usize) -> (Vec<u32>, Vec<u32>) {
        (self.tokens[start..start + seq_len + 1].to_vec(), self.doc[start..start + seq_len + 1].to_vec())
    }

    /// `batch` random windows for optimizer step `step` (micro-batch `micro`), reproducible from the seed.
    /// With `rc` (a complement map over token ids), each window is replaced by its reverse complement with
    /// probability ½ (DNA reverse-complement augmentation).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(&self, batch: usize, seq_len: usize, seed: u64, step: u64, micro: u64, rc: Option<&[u32]>, dev: &Device) -> Result<Batch> {
        if self.len() < seq_len + 1 {
            bail!("the training data has {} tokens, fewer than seq_len + 1 = {}", self.len(), seq_len + 1);
        }
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ micro.wrapping_mul(0x94D0_49BB_1331_11EB));
        let rows = (0..batch)
            .map(|_| {
                let (mut toks, mut docs) = self.window(rng.random_range(0..=self.len() - seq_len - 1), seq_len);
                if let Some(map) = rc {
                    if rng.random::<bool>() {
                        toks.reverse();
                        toks.iter_mut().for_each(|t| *t = map.get(*t as usize).copied().unwrap_or(*t));
                        // Documents renumbered so that they still increase along the window.
                        docs.reverse();
                        let first = docs[0];
                        docs.iter_mut().for_each(|d| *d = first - *d);
                    }
                }
                (toks, docs)
            })
            .collect();
        make_batch(rows, seq_len, dev)
    }

    /// Consecutive windows covering up to `max_tokens` of the stream from its start (validation).
    pub fn sequential(&self, batch: usize, seq_len: usize, max_tokens: usize) -> Vec<Vec<(Vec<u32>, Vec<u32>)>> {
        let mut windows = Vec::new();
        let mut start = 0;
        while start + seq_len < self.len() && windows.len() * seq_len < max_tokens {
            windows.push(self.window(start, seq_len));
            start += seq_len;
        }
        windows.chunks(batch).map(|c| c.to_vec()).collect()
    }
}

pub fn batch_from_rows(rows: Vec<(Vec<u32>, Vec<u32>)>, seq_len: usize, dev: &Device) -> Result<Batch> {
    make_batch(rows, seq_len, dev)
}

#[cfg(test)]
mod tests {
    use super::batch_from_rows;
    use candle_core::Device;

    #[test]
    fn seq_idx_only_where_a_row_crosses_a_document_boundary() {
        // Rows of 4 inputs and their targets: (tokens, document of each token).
        let inside = (vec![1, 2, 3, 4, 5], vec![3, 3, 3, 3, 3]);
        let crossing = (vec![1, 2, 3, 4, 5], vec![5, 5, 6, 6, 6]);
        let at_last_target = (vec![1, 2, 3, 4, 5], vec![7, 7, 7, 7, 8]);
        let b = batch_from_rows(vec![inside.clone(), at_last_target], 4, &Device::Cpu).unwrap();
        assert!(b.seq_idx.is_none(), "no boundary inside the inputs: no document ids");
        assert_eq!(b.weights.to_vec2::<f32>().unwrap(), vec![vec![1.0; 4], vec![1.0, 1.0, 1.0, 0.0]]);
        let b = batch_from_rows(vec![inside, crossing], 4, &Device::Cpu).unwrap();
        assert_eq!(b.seq_idx.unwrap().to_vec2::<u32>().unwrap(), vec![vec![0, 0, 0, 0], vec![0, 0, 1, 1]]);
        assert_eq!(b.weights.to_vec2::<f32>().unwrap(), vec![vec![1.0; 4], vec![1.0, 0.0, 1.0, 1.0]]);
    }
}
