//! Tokenizers: HF `tokenizer.json` (via the `tokenizers` crate), the BPE vocabulary embedded in GGUF
//! files, and raw bytes (ouro's byte-level models).

use crate::checkpoint::Checkpoint;
use candle_core::quantized::gguf_file::Value;
use candle_core::{bail, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

pub enum Tokenizer {
    Hf { tok: Box<tokenizers::Tokenizer>, bos: Option<u32>, eos: Vec<u32>, add_bos: bool },
    /// Token = byte value (vocab 256, plus any specials above it).
    Bytes,
    /// Caduceus' DNA characters ([`crate::caduceus::DNA_VOCAB`]: 7 specials, then A C G T N; vocab 12):
    /// A/C/G/T/N in either case, whitespace skipped, anything else [UNK].
    Dna,
}

fn msg<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> candle_core::Error {
    move |e| candle_core::Error::Msg(format!("{what}: {e}"))
}

impl Tokenizer {
    /// The tokenizer of a checkpoint: `override_` (a tokenizer.json path, or "bytes"), else the folder's
    /// `tokenizer.json`, else the GGUF vocabulary, else the config's `"tokenizer": "bytes"`.
    pub fn for_checkpoint(ck: &Checkpoint, override_: Option<&str>) -> Result<Self> {
        match (&ck.gguf_meta, override_) {
            (Some(meta), None) => Self::from_gguf(meta).map_err(msg(ck.path.display())),
            _ => Self::for_folder(&ck.path, &ck.config, override_),
        }
    }

    /// The tokenizer of a checkpoint folder with this config (`tokenizer.json`, or what the config names).
    pub fn for_folder(dir: &Path, config: &serde_json::Value, override_: Option<&str>) -> Result<Self> {
        let eos_cfg = eos_from_config(config);
        match override_ {
            Some("bytes") => return Ok(Tokenizer::Bytes),
            Some("dna") => return Ok(Tokenizer::Dna),
            Some(p) => return Self::from_file(Path::new(p), None, eos_cfg),
            None => {}
        }
        let file = dir.join("tokenizer.json");
        if file.exists() {
            let bos = config.get("bos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32);
            let mut tok = Self::from_file(&file, bos, eos_cfg)?;
            // A GGUF teacher's "prepend BOS" flag, kept in the config of checkpoints written from it.
            if let (Tokenizer::Hf { add_bos, .. }, Some(true)) = (&mut tok, config.get("add_bos_token").and_then(|v| v.as_bool())) {
                *add_bos = true;
            }
            return Ok(tok);
        }
        match config.get("tokenizer").and_then(|v| v.as_str()) {
            Some("bytes") => return Ok(Tokenizer::Bytes),
            Some("dna") => return Ok(Tokenizer::Dna),
            _ => {}
        }
        if config.get("rcps").is_some() {
            return Ok(Tokenizer::Dna); // Caduceus checkpoints use the DNA character tokenizer
        }
        bail!("{}: no tokenizer.json (pass --tokenizer FILE, --tokenizer bytes for a byte-level model or --tokenizer dna)", dir.display())
    }

    pub fn from_file(path: &Path, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path).map_err(msg(path.display()))?;
        Ok(Tokenizer::Hf { tok: Box::new(tok), bos, eos, add_bos: false })
    }

    /// Writes this tokenizer beside a checkpoint in `dir` so that [`Tokenizer::for_folder`] finds it:
    /// `tokenizer.json` plus `bos_token_id` / `eos_token_id` (and `add_bos_token` when a GGUF's vocabulary
    /// asks for a BOS before every text) in `config`, or `"tokenizer"` for the
    /// character tokenizers.
    pub fn save_for_folder(&self, dir: &Path, config: &mut serde_json::Value) -> Result<()> {
        let Some(obj) = config.as_object_mut() else { bail!("tokenizer: the checkpoint config is not a JSON object") };
        match self {
            Tokenizer::Bytes => {
                obj.insert("tokenizer".into(), "bytes".into());
            }
            Tokenizer::Dna => {
                obj.insert("tokenizer".into(), "dna".into());
            }
            Tokenizer::Hf { tok, bos, eos, add_bos } => {
                let file = dir.join("tokenizer.json");
                tok.save(&file, false).map_err(msg(file.display()))?;
                if let Some(b) = bos {
                    obj.insert("bos_token_id".into(), (*b).into());
                }
                if *add_bos {
                    obj.insert("add_bos_token".into(), true.into());
                }
                match eos.as_slice() {
                    [] => {}
                    [e] => {
                        obj.insert("eos_token_id".into(), (*e).into());
                    }
                    many => {
                        obj.insert("eos_token_id".into(), many.to_vec().into());
                    }
                }
            }
        }
        Ok(())
    }

    /// A GPT-2-style byte-level BPE from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(meta: &HashMap<String, Value>) -> Result<Self> {
        let model = meta.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("");
        if model != "gpt2" {
            bail!("GGUF tokenizer model '{model}' is not supported (gpt2 BPE only)");
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            let v = meta.get(k).ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata has no '{k}'")))?;
            v.to_vec()?.iter().map(|x| x.to_string().cloned()).collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| candle_core::Error::Msg(format!("bad GGUF merge '{m}'"))))
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match meta.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|x| x.to_i32()).collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(msg("GGUF BPE"))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre = meta.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
        // llama.cpp's "smollm" and "llama-bpe" style pre-tokenizers split digits one by one.
        let pre_tok: PreTokenizerWrapper = match pre {
            "smollm" | "llama-bpe" | "llama3" | "qwen2" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            _ => byte_level.into(),
        };
        tok.with_pre_tokenizer(Some(pre_tok));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens are matched whole in text.
        let specials: Vec<AddedToken> =
            tokens.iter().zip(&types).filter(|(_, &t)| t == 3 || t == 4).map(|(s, &t)| AddedToken::from(s.clone(), t == 3)).collect();
        tok.add_special_tokens(specials).map_err(msg("GGUF special tokens"))?;
        let id = |k: &str| meta.get(k).and_then(|v| v.to_u32().ok());
        let add_bos = meta.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(e) = id("tokenizer.ggml.eot_token_id") {
            eos.push(e);
        }
        Ok(Tokenizer::Hf { tok: Box::new(tok), bos: id("tokenizer.ggml.bos_token_id"), eos, add_bos })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Dna => Ok(text
                .bytes()
                .filter(|b| !b.is_ascii_whitespace())
                .map(|b| match b.to_ascii_uppercase() {
                    b'A' => 7,
                    b'C' => 8,
                    b'G' => 9,
                    b'T' => 10,
                    b'N' => 11,
                    _ => 6,
                })
                .collect()),
            Tokenizer::Hf { tok, bos, add_bos, .. } => {
                let enc = tok.encode(text, true).map_err(msg("tokenizing"))?;
                let mut ids = enc.get_ids().to_vec();
                if let (true, Some(b)) = (*add_bos, bos) {
                    if ids.first() != Some(b) {
                        ids.insert(0, *b);
                    }
                }
                Ok(ids)
            }
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Dna => Ok(ids
                .iter()
                .map(|&t| crate::caduceus::DNA_VOCAB.get(t as usize).copied().unwrap_or("[UNK]"))
                .collect()),
            Tokenizer::Hf { tok, .. } => tok.decode(ids, false).map_err(msg("decoding")),
        }
    }

    /// Tokens that end a generation.
    pub fn eos(&self) -> Vec<u32> {
        match self {
            Tokenizer::Bytes | Tokenizer::Dna => vec![],
            Tokenizer::Hf { eos, .. } => eos.clone(),
        }
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, s: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Dna => crate::caduceus::DNA_VOCAB.iter().position(|&t| t == s).map(|i| i as u32),
            Tokenizer::Hf { tok, .. } => tok.token_to_id(s),
        }
    }

    /// Vocabulary size (specials included; Bytes: 256).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Dna => crate::caduceus::DNA_VOCAB.len(),
            Tokenizer::Hf { tok, .. } => tok.get_vocab_size(true),
        }
    }
}

fn eos_from_config(c: &serde_json::Value) -> Vec<u32> {
    match c.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
        _ => vec![],
    }
}

/// Streams text as tokens arrive: returns the new suffix of the decoded text at each token, holding back
/// incomplete UTF-8 sequences.
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self { ids: Vec::new(), printed: 0 }
    }
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let out = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(out)
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}
