//! Test helpers shared by ouro's crates: seeded random tensors, error metrics, parity fixtures.
//! (Public so that every crate's tests use one implementation; not part of the stable API.)

use std::collections::HashMap;
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

pub struct Gen(pub StdRng);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.0.random_range(lo..hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self, shape: &[usize], std: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let u1: f32 = self.0.random_range(1e-7..1.0);
                let u2: f32 = self.0.random_range(0.0..1.0);
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// max |a − b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a: Vec<f32> = a.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff.is_finite(), "non-finite values");
    diff / scale
}

#[track_caller]
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

/// A parity fixture file written by `scripts/fixtures/*.py` into `tests/fixtures/`.
pub struct Fixture {
    path: std::path::PathBuf,
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

impl Fixture {
    /// Loads `tests/fixtures/<name>` of the repository.
    pub fn load(name: &str) -> Self {
        let path = Self::path(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = md.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("fixture tensors");
        Self { path, tensors, meta }
    }
    pub fn path(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
    }
    #[track_caller]
    pub fn get(&self, key: &str) -> Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("{} has no tensor {key}", self.path.display())).clone()
    }
    pub fn try_get(&self, key: &str) -> Option<Tensor> {
        self.tensors.get(key).cloned()
    }
    /// Names under `prefix` (e.g. "hf_mamba2.param."), without the prefix.
    pub fn names(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().filter_map(|k| k.strip_prefix(prefix).map(String::from)).collect();
        v.sort();
        v
    }
    /// The JSON settings of a case.
    #[track_caller]
    pub fn meta(&self, case: &str) -> serde_json::Value {
        let s = self.meta.get(case).unwrap_or_else(|| panic!("{} has no metadata for {case}", self.path.display()));
        serde_json::from_str(s).expect("fixture metadata is JSON")
    }
    /// The loss Σ_k Σ out_k ⊙ w_k the fixture's gradients were taken of.
    pub fn loss(&self, case: &str, outs: &[(&str, &Tensor)]) -> Tensor {
        let mut total: Option<Tensor> = None;
        for (name, t) in outs {
            let w = self.get(&format!("{case}.w.{name}"));
            let term = t.to_dtype(candle_core::DType::F32).unwrap().mul(&w).unwrap().sum_all().unwrap();
            total = Some(match total {
                None => term,
                Some(acc) => (acc + term).unwrap(),
            });
        }
        total.expect("at least one output")
    }
}
