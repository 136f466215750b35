//! Hydra: the fast forward (two SSD scans) equals its explicit quasiseparable matrix times the input
//! (f32 1e-4); gradients of the whole layer match finite differences.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ouro_kernels::testing::{assert_close, Gen};

mod common;
use ouro_nn::hydra::{Hydra, HydraConfig};

fn hydra(seed: u64, ngroups: usize) -> (VarMap, Hydra) {
    let vm = VarMap::new();
    let cfg = HydraConfig { d_model: 8, d_state: 8, d_conv: 7, expand: 2, headdim: 4, ngroups };
    let h = Hydra::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    common::randomize(&vm, seed);
    (vm, h)
}

#[test]
fn fast_forward_equals_quasiseparable_matrix() {
    for g in [1, 2] {
        let (_, h) = hydra(3 + g as u64, g);
        let u = Gen::new(9).normal(&[2, 13, 8], 1.0);
        let (y, _) = h.mix(&u).unwrap(); // (b, L, H, P)
        let m = h.materialize(&u).unwrap(); // (b, H, L, L)
        let x = h.mixer_input(&u).unwrap().permute((0, 2, 1, 3)).unwrap().contiguous().unwrap();
        let ym = m.matmul(&x).unwrap().permute((0, 2, 1, 3)).unwrap();
        assert_close(&y, &ym, 1e-4, &format!("hydra ngroups={g}"));
        // Bidirectional: the first output depends on the last input.
        assert!(m.narrow(2, 0, 1).unwrap().narrow(3, 12, 1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let (vm, h) = hydra(5, 1);
    let u = Var::from_tensor(&Gen::new(6).normal(&[1, 9, 8], 1.0)).unwrap();
    let w = Gen::new(7).normal(&[1, 9, 8], 1.0);
    let loss = |h: &Hydra, u: &Tensor| h.forward(u).unwrap().mul(&w).unwrap().sum_all().unwrap();
    let grads = loss(&h, u.as_tensor()).backward().unwrap();
    let mut targets = ouro_nn::checkpoint::named_vars(&vm);
    targets.push(("u".into(), u.clone()));
    let mut r = Gen::new(8);
    for (name, var) in targets {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let dir = r.normal(g.dims(), 1.0);
        let pred = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let orig = var.as_tensor().copy().unwrap();
        let at = |s: f64| {
            var.set(&(&orig + (&dir * s).unwrap()).unwrap()).unwrap();
            let v = loss(&h, u.as_tensor()).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            var.set(&orig).unwrap();
            v
        };
        // Central differences with Richardson extrapolation (error O(eps⁴)).
        let eps = 1e-2;
        let d1 = (at(eps) - at(-eps)) / (2.0 * eps);
        let d2 = (at(eps / 2.0) - at(-eps / 2.0)) / eps;
        let fd = (4.0 * d2 - d1) / 3.0;
        assert!((fd - pred).abs() < 3e-3 * pred.abs().max(1.0), "d{name}: finite difference {fd} vs backward {pred}");
    }
}

#[test]
fn matches_reference_forward() {
    // scripts/fixtures/gen_bidir.py: hydra.py's forward in float64 with the SSD in its quadratic form.
    let fx = ouro_kernels::testing::Fixture::load("bidir/hydra.safetensors");
    for case in ["hydra_g1", "hydra_g2"] {
        let m = fx.meta(case);
        let g = |k: &str| m[k].as_u64().unwrap() as usize;
        let cfg = HydraConfig { d_model: g("d_model"), d_state: g("d_state"), d_conv: g("d_conv"), expand: g("expand"), headdim: g("headdim"), ngroups: g("ngroups") };
        let prefix = format!("{case}.");
        let weights: std::collections::HashMap<String, Tensor> = fx.names(&prefix).into_iter().filter(|n| n != "u" && n != "y").map(|n| (n.clone(), fx.get(&format!("{prefix}{n}")))).collect();
        let h = Hydra::new(cfg, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap();
        assert_close(&h.forward(&fx.get(&format!("{prefix}u"))).unwrap(), &fx.get(&format!("{prefix}y")), 1e-4, case);
    }
}
