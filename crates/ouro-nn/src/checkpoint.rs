//! Checkpoints as users have them: a folder with `config.json` and `model.safetensors` (or sharded with
//! `model.safetensors.index.json`, or a PyTorch `pytorch_model.bin`), or a single GGUF file (Llama
//! architecture; F32, F16, Q8_0, Q4_0 and Q4_1 tensors are dequantised to f32).
//!
//! Tensors are read once into memory and handed to the models through a `VarBuilder` whose errors name
//! the file, the tensor and the problem.

use candle_core::quantized::gguf_file;
use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One stored tensor, for `ouro info`.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    /// Stored type (safetensors dtype or GGUF block type).
    pub dtype: String,
    pub file: PathBuf,
}

pub enum Format {
    Safetensors,
    Pth,
    Gguf,
}

pub struct Checkpoint {
    pub path: PathBuf,
    pub format: Format,
    /// `config.json`, or for GGUF a config in HF Llama keys synthesised from its metadata.
    pub config: serde_json::Value,
    pub entries: Vec<TensorEntry>,
    tensors: HashMap<String, Tensor>,
    /// GGUF metadata (tokenizer, architecture), when the checkpoint is a GGUF file.
    pub gguf_meta: Option<HashMap<String, gguf_file::Value>>,
}

fn err_ctx<T>(r: Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| candle_core::Error::Msg(format!("{}: {e}", what())))
}

/// A VarMap's variables sorted by name. The map is a HashMap, whose order changes from run to run:
/// whatever draws random values or sums over the variables walks this order instead, so that a seed
/// gives the same result every time.
pub fn named_vars(vm: &VarMap) -> Vec<(String, candle_core::Var)> {
    let mut v: Vec<(String, candle_core::Var)> = vm.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A VarMap's variables cast to `dtype`, by name: the parameters of a mixed-precision step (the casts are in
/// the graph, so the gradients reach the variables themselves).
pub fn cast_vars(vm: &VarMap, dtype: DType) -> Result<HashMap<String, Tensor>> {
    vm.data().lock().unwrap().iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(dtype)?))).collect()
}

/// Reads `config.json` from a checkpoint folder.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let config: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        // Python's json writes bare Infinity/NaN (older transformers configs do): read them as strings.
        Err(e) => serde_json::from_str(&python_json_literals(&text)).map_err(|_| candle_core::Error::Msg(format!("{}: invalid JSON: {e}", cfg_path.display())))?,
    };
    if !config.is_object() {
        bail!("{}: expected a JSON object", cfg_path.display());
    }
    Ok(config)
}

impl Checkpoint {
    /// Opens a checkpoint folder or a `.gguf` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            bail!("{}: no such file or folder", path.display());
        }
        if path.is_file() {
            return match path.extension().and_then(|e| e.to_str()) {
                Some("gguf") => Self::open_gguf(path),
                _ => bail!("{}: expected a checkpoint folder (config.json + weights) or a .gguf file", path.display()),
            };
        }
        let config = read_config(path)?;
        let index = path.join("model.safetensors.index.json");
        let single = path.join("model.safetensors");
        let pth = path.join("pytorch_model.bin");
        let mut ck = Self { path: path.to_path_buf(), format: Format::Safetensors, config, entries: Vec::new(), tensors: HashMap::new(), gguf_meta: None };
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", index.display())))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: invalid JSON: {e}", index.display())))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| candle_core::Error::Msg(format!("{}: no weight_map", index.display())))?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            for f in files {
                ck.load_safetensors(&path.join(f))?;
            }
            for name in map.keys() {
                if !ck.tensors.contains_key(name) {
                    bail!("{}: lists tensor '{name}' but its shard does not contain it", index.display());
                }
            }
        } else if single.exists() {
            ck.load_safetensors(&single)?;
        } else if path.join(crate::engine::QUANTIZED_FILE).exists() {
            // A quantised checkpoint (`ouro quantize`): tensors under their checkpoint names in GGUF.
            ck.load_quantized(&path.join(crate::engine::QUANTIZED_FILE))?;
        } else if pth.exists() {
            ck.format = Format::Pth;
            let all = err_ctx(candle_core::pickle::read_all(&pth), || format!("{}: not a readable PyTorch checkpoint", pth.display()))?;
            for (name, t) in all {
                ck.add(name, t, &pth, None);
            }
        } else {
            let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            shards.sort();
            if shards.is_empty() {
                bail!("{}: no weights found (model.safetensors, model.safetensors.index.json, pytorch_model.bin or model.gguf)", path.display());
            }
            for s in shards {
                ck.load_safetensors(&s)?;
            }
        }
        ck.entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ck)
    }

    fn add(&mut self, name: String, t: Tensor, file: &Path, dtype: Option<String>) {
        self.entries.push(TensorEntry { name: name.clone(), shape: t.dims().to_vec(), dtype: dtype.unwrap_or_else(|| format!("{:?}", t.dtype()).to_lowercase()), file: file.to_path_buf() });
        self.tensors.insert(name, t);
    }

    fn load_safetensors(&mut self, file: &Path) -> Result<()> {
        let bytes = std::fs::read(file).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
        let loaded = err_ctx(candle_core::safetensors::load_buffer(&bytes, &Device::Cpu), || format!("{}: not a valid safetensors file", file.display()))?;
        for (name, t) in loaded {
            self.add(name, t, file, None);
        }
        Ok(())
    }

    /// Reads a quantised checkpoint's tensors, dequantised to f32 for the models built on candle.
    fn load_quantized(&mut self, file: &Path) -> Result<()> {
        let mut f = std::fs::File::open(file).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
        let content = err_ctx(gguf_file::Content::read(&mut f), || format!("{}: not a valid GGUF file", file.display()))?;
        let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        names.sort();
        for name in names {
            let qt = err_ctx(content.tensor(&mut f, &name, &Device::Cpu), || format!("{}: tensor '{name}'", file.display()))?;
            let ggml_type = format!("{:?}", qt.dtype()).to_lowercase();
            let t = err_ctx(qt.dequantize(&Device::Cpu), || format!("{}: dequantising '{name}' ({ggml_type})", file.display()))?;
            self.add(name, t, file, Some(ggml_type));
        }
        Ok(())
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let content = err_ctx(gguf_file::Content::read(&mut f), || format!("{}: not a valid GGUF file", path.display()))?;
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if arch != "llama" {
            bail!("{}: GGUF architecture '{arch}' is not supported (supported: llama)", path.display());
        }
        let meta = |k: &str| -> Result<&gguf_file::Value> {
            content.metadata.get(k).ok_or_else(|| candle_core::Error::Msg(format!("{}: GGUF metadata has no '{k}'", path.display())))
        };
        let n_head = meta("llama.attention.head_count")?.to_u32()? as usize;
        let n_kv = content.metadata.get("llama.attention.head_count_kv").map(|v| v.to_u32()).transpose()?.map_or(n_head, |v| v as usize);
        let d = meta("llama.embedding_length")?.to_u32()? as usize;
        let mut ck = Self { path: path.to_path_buf(), format: Format::Gguf, config: serde_json::Value::Null, entries: Vec::new(), tensors: HashMap::new(), gguf_meta: None };
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let qt = err_ctx(content.tensor(&mut f, name, &Device::Cpu), || format!("{}: tensor '{name}'", path.display()))?;
            let ggml_type = format!("{:?}", qt.dtype()).to_lowercase();
            let t = err_ctx(qt.dequantize(&Device::Cpu), || format!("{}: dequantising '{name}' ({ggml_type})", path.display()))?;
            let hf = gguf_to_hf_name(name).ok_or_else(|| candle_core::Error::Msg(format!("{}: unexpected tensor '{name}' for a llama GGUF", path.display())))?;
            // llama.cpp permutes q/k rows for its interleaved RoPE; undo it for the rotate-half layout.
            let t = if hf.ends_with("self_attn.q_proj.weight") {
                unpermute_rope(&t, n_head)?
            } else if hf.ends_with("self_attn.k_proj.weight") {
                unpermute_rope(&t, n_kv)?
            } else {
                t
            };
            ck.add(hf, t, path, Some(ggml_type));
        }
        let vocab = ck.tensors.get("model.embed_tokens.weight").map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        let get_f = |k: &str, default: f64| content.metadata.get(k).and_then(|v| v.to_f32().ok()).map_or(default, |v| v as f64);
        let ffn = meta("llama.feed_forward_length")?.to_u32()? as usize;
        let layers = meta("llama.block_count")?.to_u32()? as usize;
        ck.config = serde_json::json!({
            "model_type": "llama",
            "hidden_size": d,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": content.metadata.get("llama.attention.key_length").and_then(|v| v.to_u32().ok()).map_or(d / n_head, |v| v as usize),
            "rms_norm_eps": get_f("llama.attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": get_f("llama.rope.freq_base", 10000.0),
            "vocab_size": vocab,
            "tie_word_embeddings": !ck.tensors.contains_key("lm_head.weight"),
            "hidden_act": "silu",
        });
        ck.entries.sort_by(|a, b| a.name.cmp(&b.name));
        ck.gguf_meta = Some(content.metadata);
        Ok(ck)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Number of stored parameters.
    pub fn parameter_count(&self) -> usize {
        self.entries.iter().map(|e| e.shape.iter().product::<usize>()).sum()
    }

    /// A VarBuilder over the checkpoint: tensors are converted to `dtype` on `dev`. `aliases` maps a prefix
    /// the model asks for to alternative prefixes the file may use (first match wins).
    pub fn var_builder(&self, dtype: DType, dev: &Device, aliases: &[(&str, &str)]) -> VarBuilder<'static> {
        let backend = Backend {
            path: self.path.clone(),
            tensors: self.tensors.clone(),
            aliases: aliases.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, dev.clone())
    }

    /// Reads a config field, naming the file on error.
    pub fn cfg<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let v = self.config.get(key).ok_or_else(|| candle_core::Error::Msg(format!("{}: config has no '{key}'", self.config_path().display())))?;
        serde_json::from_value(v.clone()).map_err(|e| candle_core::Error::Msg(format!("{}: config '{key}': {e}", self.config_path().display())))
    }

    /// Reads an optional config field (absent or null → None).
    pub fn cfg_opt<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(_) => self.cfg(key).map(Some),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        match self.format {
            Format::Gguf => self.path.clone(),
            _ => self.path.join("config.json"),
        }
    }

    /// Counts of stored dtypes, e.g. {"bf16": 120}.
    pub fn dtype_summary(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for e in &self.entries {
            *m.entry(e.dtype.clone()).or_insert(0) += 1;
        }
        m
    }
}

struct Backend {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    aliases: Vec<(String, String)>,
}

impl Backend {
    fn resolve(&self, name: &str) -> Option<&Tensor> {
        if let Some(t) = self.tensors.get(name) {
            return Some(t);
        }
        self.aliases.iter().find_map(|(from, to)| name.strip_prefix(from.as_str()).and_then(|rest| self.tensors.get(&format!("{to}{rest}"))))
    }
}

impl SimpleBackend for Backend {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            bail!("{}: tensor '{name}' has shape {:?}, the model expects {:?}", self.path.display(), t.dims(), s.dims());
        }
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.resolve(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => bail!("{}: missing tensor '{name}'", self.path.display()),
        }
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

/// Quotes the non-JSON literals Python's `json` writes (Infinity, -Infinity, NaN) outside strings.
fn python_json_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        if let Some(lit) = ["-Infinity", "Infinity", "NaN"].iter().find(|l| rest.starts_with(**l)) {
            out.push('"');
            out.push_str(lit);
            out.push('"');
            rest = &rest[lit.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// llama.cpp tensor names → HF Llama names.
fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Inverse of llama.cpp's `permute`: rows (heads, 2, d/2) → (heads, d/2, 2) order reversed.
fn unpermute_rope(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_head == 0 || out % (2 * n_head) != 0 {
        bail!("cannot un-permute a ({out}, {inp}) projection over {n_head} heads");
    }
    let hd = out / n_head;
    w.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))
}
