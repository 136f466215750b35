//! FNO, FFNO and MemNO against `scripts/fixtures/gen_fno.py` (float64 with torch's FFTs; ouro's truncated DFT is
//! a pair of matmuls), MemNO's gradients, its causality in time, and the rollout's consistency with the forward.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ouro_kernels::testing::{assert_close, Fixture, Gen};
use ouro_nn::fno::{dft_matrices, nrmse, NeuralOperator, OperatorConfig, OperatorKind, SpectralConv1d};

fn cfg(kind: OperatorKind) -> OperatorConfig {
    OperatorConfig { kind, width: 8, modes: 4, layers: 3, ff_factor: 2, memory_after: 1, d_state: 8, projection: 16 }
}

fn model(kind: &str) -> (NeuralOperator, VarMap) {
    let mut vm = VarMap::new();
    let m = NeuralOperator::new(cfg(OperatorKind::parse(kind).unwrap()), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    vm.load(Fixture::path(&format!("fno/{kind}.safetensors"))).unwrap();
    (m, vm)
}

#[test]
fn spectral_conv_matches_torch_fft_on_an_odd_grid() {
    let fx = Fixture::load("fno/expected.safetensors");
    let k = SpectralConv1d::from_weight(4, 6, fx.get("spec.weight"));
    assert_close(&k.forward(&fx.get("spec.h")).unwrap(), &fx.get("spec.y"), 1e-5, "spectral conv (R = 9, 4 modes)");
}

#[test]
fn every_operator_matches_the_reference() {
    let fx = Fixture::load("fno/expected.safetensors");
    for kind in ["fno", "ffno", "memno"] {
        let (m, _vm) = model(kind);
        assert_close(&m.forward(&fx.get("u")).unwrap(), &fx.get(&format!("{kind}.y")), 1e-5, kind);
    }
}

#[test]
fn memno_gradients_match_the_reference() {
    let fx = Fixture::load("fno/expected.safetensors");
    let (m, vm) = model("memno");
    let y = m.forward(&fx.get("u")).unwrap();
    let grads = (y * fx.get("w")).unwrap().sum_all().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    assert_eq!(data.len(), fx.names("memno.grad.").len(), "every parameter has a reference gradient");
    for (name, var) in data.iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(g, &fx.get(&format!("memno.grad.{name}")), 1e-4, &format!("d/d{name}"));
    }
}

#[test]
fn predictions_are_causal_in_time_and_markovian_operators_see_one_frame() {
    let fx = Fixture::load("fno/expected.safetensors");
    let u = fx.get("u"); // (2, 5, 16)
    // Change frames 3.. : outputs 0..=2 must not move. The Markovian operators must not move anywhere else.
    let bumped = Tensor::cat(&[&u.narrow(1, 0, 3).unwrap(), &(u.narrow(1, 3, 2).unwrap() * 3.0).unwrap()], 1).unwrap();
    for kind in ["fno", "ffno", "memno"] {
        let (m, _vm) = model(kind);
        let (a, b) = (m.forward(&u).unwrap(), m.forward(&bumped).unwrap());
        assert_close(&b.narrow(1, 0, 3).unwrap(), &a.narrow(1, 0, 3).unwrap(), 1e-6, &format!("{kind}: past outputs"));
        // Each frame alone gives the same prediction as in context, except through MemNO's memory.
        let alone = m.forward(&u.narrow(1, 2, 1).unwrap()).unwrap();
        let diff = (alone - a.narrow(1, 2, 1).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        if kind == "memno" {
            assert!(diff > 1e-3, "memno: frame 2 alone should differ from frame 2 with its history ({diff})");
        } else {
            assert!(diff < 1e-5, "{kind}: frame 2 alone vs in context {diff}");
        }
    }
}

#[test]
fn rollout_feeds_predictions_back() {
    let fx = Fixture::load("fno/expected.safetensors");
    let u = fx.get("u");
    for kind in ["ffno", "memno"] {
        let (m, _vm) = model(kind);
        let r = m.rollout(&u, 2, 3).unwrap(); // (2, 5, 16): frames 0, 1 given, 2..4 predicted
        assert_eq!(r.dims(), &[2, 5, 16]);
        assert_close(&r.narrow(1, 0, 2).unwrap(), &u.narrow(1, 0, 2).unwrap(), 0.0, "given frames kept");
        // Frame 2 is the forward's prediction from the true frames 0, 1; frame 4 from frames 0, 1 and the predicted 2, 3.
        assert_close(&r.narrow(1, 2, 1).unwrap(), &m.forward(&u.narrow(1, 0, 2).unwrap()).unwrap().narrow(1, 1, 1).unwrap(), 1e-6, kind);
        assert_close(&r.narrow(1, 4, 1).unwrap(), &m.forward(&r.narrow(1, 0, 4).unwrap()).unwrap().narrow(1, 3, 1).unwrap(), 1e-6, kind);
    }
}

#[test]
fn dft_matrices_invert_band_limited_fields_and_reject_too_many_modes() {
    // A field with modes 0..M−1 only: inverse(forward(u)) == u.
    let (r, m) = (12, 5);
    let u: Vec<f32> = (0..r).map(|x| {
        let th = 2.0 * std::f32::consts::PI * x as f32 / r as f32;
        0.3 + (th).cos() - 0.5 * (3.0 * th).sin() + 0.25 * (4.0 * th + 1.0).cos()
    }).collect();
    let u = Tensor::from_vec(u, (r, 1), &Device::Cpu).unwrap();
    let (f, g) = dft_matrices(r, m, &Device::Cpu).unwrap();
    assert_close(&g.matmul(&f.matmul(&u).unwrap()).unwrap(), &u, 1e-5, "round trip");
    assert!(dft_matrices(8, 5, &Device::Cpu).unwrap_err().to_string().contains("at least 10 grid points"));
    assert!(OperatorKind::parse("unet").is_err());
}

#[test]
fn nrmse_is_relative_to_the_truth() {
    let y = Gen::new(1).normal(&[3, 4, 8], 1.0);
    assert!(nrmse(&y, &y, 1).unwrap() < 1e-7);
    let half = (&y * 1.5).unwrap();
    assert!((nrmse(&half, &y, 1).unwrap() - 0.5).abs() < 1e-5);
    assert!((nrmse(&Tensor::zeros((3, 4, 8), DType::F32, &Device::Cpu).unwrap(), &y, 0).unwrap() - 1.0).abs() < 1e-6);
}
