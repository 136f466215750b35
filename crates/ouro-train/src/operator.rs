//! Training and evaluating neural operators (FNO, FFNO, MemNO) on PDE trajectories: `ouro pde train|evaluate`.
//!
//! Data: a safetensors file from `ouro pde generate` (or `ouro data fetch burgers-lowres`) with `u_R`
//! (samples, frames, R). Training is next-frame prediction with teacher forcing on every frame at once (the
//! memory sees the true history); the loss is the MSE in normalised units. Evaluation is the trajectory nRMSE,
//! ‖û − u‖/‖u‖ over frames 1.. and all points, averaged over trajectories, for the autoregressive rollout from
//! the first frame (the headline) and for one-step prediction from the true history.

use crate::optim::AdamW;
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ouro_nn::fno::{nrmse, NeuralOperator, OperatorConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn msg(path: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {e}", path.display()))
}

/// Trajectories at one resolution: (samples, frames, R) f32 on the host, with the file's metadata.
pub struct Trajectories {
    pub u: Tensor,
    pub resolution: usize,
    pub meta: std::collections::HashMap<String, String>,
}

impl Trajectories {
    /// Reads `u_<resolution>` (or the only `u_R` when `resolution` is None) from a safetensors file.
    pub fn load(path: &Path, resolution: Option<usize>) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| msg(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| msg(path, format!("not a safetensors file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| msg(path, e))?;
        let mut have: Vec<usize> = st.names().iter().filter_map(|n| n.strip_prefix("u_").and_then(|r| r.parse().ok())).collect();
        have.sort();
        let r = match (resolution, &have[..]) {
            (Some(r), _) if have.contains(&r) => r,
            (None, [r]) => *r,
            (None, []) | (Some(_), []) => bail!("{}: no trajectories (no tensor named u_<resolution>)", path.display()),
            (None, _) => bail!("{}: several resolutions {have:?}; pick one with --resolution", path.display()),
            (Some(r), _) => bail!("{}: no resolution {r} (has {have:?})", path.display()),
        };
        let view = st.tensor(&format!("u_{r}")).map_err(|e| msg(path, e))?;
        let u = candle_core::safetensors::Load::load(&view, &Device::Cpu)?.to_dtype(DType::F32)?;
        let dims = u.dims().to_vec();
        if dims.len() != 3 || dims[2] != r || dims[0] == 0 || dims[1] < 2 {
            bail!("{}: u_{r} has shape {dims:?}; expected (samples ≥ 1, frames ≥ 2, {r})", path.display());
        }
        let flat: Vec<f32> = u.flatten_all()?.to_vec1()?;
        if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
            bail!("{}: u_{r} has a non-finite value at flat index {i}", path.display());
        }
        Ok(Self { u, resolution: r, meta })
    }

    pub fn samples(&self) -> usize {
        self.u.dims()[0]
    }

    pub fn frames(&self) -> usize {
        self.u.dims()[1]
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Evaluate the test rollout every this many epochs (and at the end).
    pub eval_every: usize,
    pub progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { epochs: 100, batch_size: 32, lr: 1e-3, weight_decay: 1e-4, seed: 0, eval_every: 10, progress: true }
    }
}

/// What a saved operator carries besides its weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorCheckpoint {
    pub model: OperatorConfig,
    /// Fields are normalised as (u − mean)/std for the network.
    pub mean: f64,
    pub std: f64,
    pub resolution: usize,
    pub frames: usize,
    pub parameters: usize,
    pub data: std::collections::HashMap<String, String>,
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetric {
    pub epoch: usize,
    pub seconds: f64,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub test_rollout_nrmse: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub test_one_step_nrmse: Option<f64>,
}

pub struct TrainedOperator {
    pub ck: OperatorCheckpoint,
    pub varmap: VarMap,
    pub net: NeuralOperator,
}

/// nRMSEs of a model on trajectories: (rollout from the first frame, one step from the true history).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Scores {
    pub rollout_nrmse: f64,
    pub one_step_nrmse: f64,
}

impl TrainedOperator {
    fn normalise(&self, u: &Tensor) -> Result<Tensor> {
        (u - self.ck.mean)? / self.ck.std
    }

    /// Rollout from the first frame and one-step predictions for every trajectory, in the units of u.
    pub fn predict(&self, u: &Tensor, batch: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let (n, t, _) = u.dims3()?;
        let (mut roll, mut one) = (Vec::new(), Vec::new());
        for s in (0..n).step_by(batch.max(1)) {
            let ub = self.normalise(&u.narrow(0, s, batch.min(n - s))?.to_device(dev)?)?;
            let r = self.net.rollout(&ub, 1, t - 1)?;
            let o = self.net.forward(&ub.narrow(1, 0, t - 1)?)?.detach();
            let o = Tensor::cat(&[&ub.narrow(1, 0, 1)?, &o], 1)?; // frame 0 is given
            roll.push(((r * self.ck.std)? + self.ck.mean)?.to_device(&Device::Cpu)?);
            one.push(((o * self.ck.std)? + self.ck.mean)?.to_device(&Device::Cpu)?);
        }
        Ok((Tensor::cat(&roll, 0)?, Tensor::cat(&one, 0)?))
    }

    pub fn score(&self, data: &Trajectories, dev: &Device) -> Result<Scores> {
        if data.resolution != self.ck.resolution {
            bail!("the model was trained at resolution {} but the data has {}", self.ck.resolution, data.resolution);
        }
        let (roll, one) = self.predict(&data.u, 64, dev)?;
        Ok(Scores { rollout_nrmse: nrmse(&roll, &data.u, 1)?, one_step_nrmse: nrmse(&one, &data.u, 1)? })
    }

    /// Saves `config.json` and `model.safetensors` into `dir` (written to a temporary folder, then renamed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::write_folder(dir, |tmp| {
            std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&self.ck).unwrap()).map_err(|e| msg(tmp, e))?;
            self.varmap.save(tmp.join("model.safetensors"))
        })
    }

    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let cp = dir.join("config.json");
        let text = std::fs::read_to_string(&cp).map_err(|e| msg(&cp, e))?;
        let ck: OperatorCheckpoint = serde_json::from_str(&text).map_err(|e| msg(&cp, format!("not a neural-operator config: {e}")))?;
        let mut varmap = VarMap::new();
        let net = NeuralOperator::new(ck.model.clone(), VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
        let wp = dir.join("model.safetensors");
        varmap.load(&wp).map_err(|e| msg(&wp, e))?;
        Ok(Self { ck, varmap, net })
    }
}

/// Initialises the operator: PyTorch's Linear default U(±1/√fan_in); spectral weights U(0, 1/(W·W)) in each
/// part, as FNO does (scale 1/(in·out)); S4D as `s4d.py` (A = −½ + iπn, C ~ CN(0, 1) by Box–Muller, D ~ U(−1, 1))
/// except dt, log-uniform in [e⁻²/frames, 1] so that the memory spans one frame to the whole trajectory, and the
/// memory's output, which starts silent (see below).
fn init(varmap: &VarMap, cfg: &OperatorConfig, frames: usize, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let named = ouro_nn::checkpoint::named_vars(varmap);
    let dims_of = |name: &str| varmap.data().lock().unwrap().get(name).map(|v| v.dims().to_vec());
    for (name, var) in named {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let mut uniform = |lo: f64, hi: f64| -> Vec<f32> { (0..n).map(|_| rng.random_range(lo..hi) as f32).collect() };
        let v: Vec<f32> = if name.ends_with("spectral.weight") {
            let s = 1.0 / (cfg.width * cfg.width) as f64;
            uniform(0.0, s)
        } else if name.ends_with("kernel.log_dt") {
            // Time steps of the memory: from one frame to the whole trajectory.
            uniform((1.0 / frames as f64).ln() - 2.0, 0.0)
        } else if name.ends_with("kernel.log_A_real") {
            vec![0.5f32.ln(); n]
        } else if name.ends_with("kernel.A_imag") {
            (0..n).map(|i| std::f32::consts::PI * (i % dims[1]) as f32).collect()
        } else if name.ends_with("kernel.C") {
            let g: Vec<f32> = uniform(1e-12, 1.0);
            let h: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
            g.iter().zip(&h).map(|(&a, &b)| (std::f64::consts::FRAC_1_SQRT_2 * (-2.0 * (a as f64).ln()).sqrt() * (2.0 * std::f64::consts::PI * b as f64).cos()) as f32).collect()
        } else if name.ends_with("s4d.D") {
            uniform(-1.0, 1.0)
        } else if name.contains("memory.s4d.output_linear") {
            // The memory starts silent: the value half of its GLU is zero, so MemNO begins as its FFNO and
            // learns how much history to add (the gate half keeps its default, so gradients flow).
            let rows = dims[0] / 2;
            let per_row = n / dims[0];
            let b = 1.0 / (cfg.width as f64).sqrt();
            (0..n).map(|i| if i / per_row < rows { 0.0 } else { rng.random_range(-b..b) as f32 }).collect()
        } else if name.contains("norm") {
            if name.ends_with("weight") { vec![1.0; n] } else { vec![0.0; n] }
        } else {
            let fan_in = if name.ends_with("bias") { dims_of(&name.replace("bias", "weight")).map(|d| d[1..].iter().product()).unwrap_or(dims[0]) } else { dims[1..].iter().product::<usize>() };
            let b = 1.0 / (fan_in as f64).sqrt();
            uniform(-b, b)
        };
        var.set(&Tensor::from_vec(v, dims, var.device())?)?;
    }
    Ok(())
}

/// Trains `cfg` on `train` (teacher-forced next-frame MSE), scoring the `test` rollout every `eval_every` epochs;
/// `on_epoch` receives each metric line (for metrics.jsonl and the plot). Returns the final model.
pub fn train(cfg: OperatorConfig, train: &Trajectories, test: &Trajectories, o: &TrainOptions, dev: &Device, log: &mut dyn FnMut(&str), on_epoch: &mut dyn FnMut(&EpochMetric) -> Result<()>) -> Result<TrainedOperator> {
    if train.resolution != test.resolution {
        bail!("training data at resolution {} but test data at {}", train.resolution, test.resolution);
    }
    if o.batch_size == 0 || o.epochs == 0 {
        bail!("epochs and batch size must be positive");
    }
    let (n, t, r) = train.u.dims3()?;
    let flat: Vec<f32> = train.u.flatten_all()?.to_vec1()?;
    let mean = flat.iter().map(|&v| v as f64).sum::<f64>() / flat.len() as f64;
    let std = (flat.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / flat.len() as f64).sqrt();
    if std <= 0.0 {
        bail!("the training fields are constant (std 0): nothing to learn");
    }
    let varmap = VarMap::new();
    let net = NeuralOperator::new(cfg.clone(), VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    init(&varmap, &cfg, t, o.seed)?;
    let named = ouro_nn::checkpoint::named_vars(&varmap);
    let parameters: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
    log(&format!("{:?} (width {}, {} modes, {} layers): {parameters} parameters; {n} training trajectories × {t} frames × {r} points", cfg.kind, cfg.width, cfg.modes, cfg.layers));
    let mut model = TrainedOperator { ck: OperatorCheckpoint { model: cfg, mean, std, resolution: r, frames: t, parameters, data: train.meta.clone() }, varmap, net };
    let mut opt = AdamW::new(named, 0.9, 0.999, 1e-8, o.weight_decay)?;
    let data = ((train.u.to_device(dev)? - mean)? / std)?;
    let mut rng = StdRng::seed_from_u64(o.seed ^ 0x5eed);
    let steps_per_epoch = n.div_ceil(o.batch_size);
    let total = o.epochs * steps_per_epoch;
    let bar = o.progress.then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").unwrap());
        b
    });
    let start = std::time::Instant::now();
    let mut step = 0;
    for epoch in 1..=o.epochs {
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut loss_sum = 0.0;
        for chunk in order.chunks(o.batch_size) {
            let idx = Tensor::from_vec(chunk.to_vec(), chunk.len(), dev)?;
            let u = data.index_select(&idx, 0)?; // (b, T, R)
            let pred = model.net.forward(&u.narrow(1, 0, t - 1)?)?;
            let loss = (pred - u.narrow(1, 1, t - 1)?)?.sqr()?.mean_all()?;
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                bail!("epoch {epoch}: the loss is {lv}; lower --lr");
            }
            loss_sum += lv * chunk.len() as f64;
            let mut acc = Vec::new();
            opt.accumulate(&mut acc, &loss.backward()?)?;
            opt.step(&acc, o.lr * crate::optim::lr_at(step, total, total / 50, 1.0, 0.01), 1.0)?;
            step += 1;
            if let Some(b) = &bar {
                b.set_position(step as u64);
                b.set_message(format!("epoch {epoch} loss {lv:.2e}"));
            }
        }
        let mut m = EpochMetric { epoch, seconds: start.elapsed().as_secs_f64(), train_loss: loss_sum / n as f64, test_rollout_nrmse: None, test_one_step_nrmse: None };
        if epoch % o.eval_every.max(1) == 0 || epoch == o.epochs {
            let s = model.score(test, dev)?;
            m.test_rollout_nrmse = Some(s.rollout_nrmse);
            m.test_one_step_nrmse = Some(s.one_step_nrmse);
            let line = format!("epoch {epoch}: train loss {:.3e}, test nRMSE rollout {:.4}, one step {:.4} ({:.0} s)", m.train_loss, s.rollout_nrmse, s.one_step_nrmse, m.seconds);
            match &bar {
                Some(b) if !b.is_hidden() => b.println(line),
                _ => log(&line),
            }
        }
        on_epoch(&m)?;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    model.ck.data.insert("train_seconds".into(), format!("{:.1}", start.elapsed().as_secs_f64()));
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ouro_nn::fno::OperatorKind;

    fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        use safetensors::tensor::{Dtype, TensorView};
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views: Vec<(&str, TensorView)> = tensors.iter().zip(&bytes).map(|((k, s, _), b)| (*k, TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn memno_starts_as_its_markovian_operator() {
        // After init the memory adds nothing: a frame predicts the same with or without its history.
        let cfg = OperatorConfig { width: 8, modes: 4, layers: 2, memory_after: 1, d_state: 8, projection: 16, ..OperatorConfig::new(OperatorKind::Memno) };
        let vm = VarMap::new();
        let net = NeuralOperator::new(cfg.clone(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        init(&vm, &cfg, 6, 3).unwrap();
        let u = Tensor::randn(0f32, 1.0, (2, 6, 16), &Device::Cpu).unwrap();
        let full = net.forward(&u).unwrap().narrow(1, 4, 1).unwrap();
        let alone = net.forward(&u.narrow(1, 4, 1).unwrap()).unwrap();
        let d = (full - alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn bad_data_gets_clear_errors() {
        let dir = std::env::temp_dir().join(format!("ouro-op-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("two.safetensors");
        write(&p, &[("u_8", vec![2, 3, 8], vec![0.5; 48]), ("u_16", vec![2, 3, 16], vec![0.5; 96])]);
        assert!(Trajectories::load(&p, None).err().unwrap().to_string().contains("several resolutions [8, 16]"));
        assert!(Trajectories::load(&p, Some(32)).err().unwrap().to_string().contains("no resolution 32 (has [8, 16])"));
        assert_eq!(Trajectories::load(&p, Some(16)).unwrap().frames(), 3);
        let p = dir.join("nan.safetensors");
        let mut v = vec![0.1f32; 48];
        v[7] = f32::NAN;
        write(&p, &[("u_8", vec![2, 3, 8], v)]);
        assert!(Trajectories::load(&p, None).err().unwrap().to_string().contains("non-finite value at flat index 7"));
        let p = dir.join("flat.safetensors");
        write(&p, &[("u_8", vec![2, 8], vec![0.0; 16])]);
        assert!(Trajectories::load(&p, None).err().unwrap().to_string().contains("expected (samples"));
        let p = dir.join("junk.safetensors");
        std::fs::write(&p, b"not safetensors").unwrap();
        assert!(Trajectories::load(&p, None).err().unwrap().to_string().contains("junk.safetensors: not a safetensors file"));
        // Constant fields cannot be normalised.
        let p = dir.join("const.safetensors");
        write(&p, &[("u_8", vec![2, 3, 8], vec![0.5; 48])]);
        let d = Trajectories::load(&p, None).unwrap();
        let mut quiet = |_: &str| {};
        let err = train(OperatorConfig::new(OperatorKind::Ffno), &d, &d, &TrainOptions { progress: false, ..Default::default() }, &Device::Cpu, &mut quiet, &mut |_| Ok(())).err().unwrap();
        assert!(err.to_string().contains("constant"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
