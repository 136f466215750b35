//! Lyra, PGC and S4D against `scripts/fixtures/gen_lyra.py` (the official model's semantics in float64, S4D
//! convolved by FFT), and S4D's three forms (Toeplitz, chunked, recurrent) against each other.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ouro_kernels::testing::{assert_close, Fixture, Gen};
use ouro_nn::lyra::{Lyra, LyraConfig, Pgc};
use ouro_nn::s4d::S4d;

const D_MODEL: usize = 32;
const D_STATE: usize = 16;

fn cfg() -> LyraConfig {
    LyraConfig { d_input: 20, d_output: 1, d_model: D_MODEL, d_state: D_STATE, dropout: 0.2 }
}

fn weights() -> VarBuilder<'static> {
    let path = Fixture::path("lyra/model.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).expect("lyra/model.safetensors");
    VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)
}

fn no_dropout(x: &Tensor) -> candle_core::Result<Tensor> {
    Ok(x.clone())
}

/// A random S4D layer: dt log-uniform in [1e-3, 1e-1], A and C perturbed around their initialisation.
fn random_s4d(h: usize, n: usize, seed: u64) -> S4d {
    let mut r = Gen::new(seed);
    let m = n / 2;
    let a_imag: Vec<f32> = (0..h * m).map(|i| std::f32::consts::PI * (i % m) as f32).collect();
    let mut t = std::collections::HashMap::new();
    t.insert("kernel.log_dt".to_string(), r.uniform(&[h], (1e-3f32).ln(), (1e-1f32).ln()));
    t.insert("kernel.C".to_string(), r.normal(&[h, m, 2], 0.7));
    t.insert("kernel.log_A_real".to_string(), (r.normal(&[h, m], 0.3) + (0.5f64).ln()).unwrap());
    t.insert("kernel.A_imag".to_string(), (Tensor::from_vec(a_imag, (h, m), &Device::Cpu).unwrap() + r.normal(&[h, m], 0.1)).unwrap());
    t.insert("D".to_string(), r.normal(&[h], 1.0));
    t.insert("output_linear.0.weight".to_string(), r.normal(&[2 * h, h, 1], 0.2));
    t.insert("output_linear.0.bias".to_string(), r.normal(&[2 * h], 0.2));
    S4d::new(h, n, VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)).unwrap()
}

#[test]
fn s4d_kernel_and_convolution_match_the_fft_reference() {
    let fx = Fixture::load("lyra/expected.safetensors");
    let s4d = S4d::new(D_MODEL, D_STATE, weights().pp("s4d")).unwrap();
    let l = fx.get("u").dim(1).unwrap();
    assert_close(&s4d.kernel(l, &Device::Cpu).unwrap(), &fx.get("kernel"), 1e-5, "Vandermonde kernel");
    let z = fx.get("z");
    assert_close(&s4d.ssm_conv_toeplitz(&z).unwrap(), &fx.get("s4d_conv"), 1e-5, "Toeplitz convolution vs FFT");
    assert_close(&s4d.ssm_conv_chunked(&z, 4).unwrap(), &fx.get("s4d_conv"), 1e-5, "chunked convolution vs FFT");
    assert_close(&s4d.forward_recurrent(&z).unwrap(), &fx.get("s4d_conv"), 1e-5, "recurrence vs FFT");
    assert_close(&s4d.forward(&z, no_dropout).unwrap(), &fx.get("s4d"), 1e-5, "S4D layer (GELU, 1×1 conv, GLU)");
}

#[test]
fn s4d_convolution_recurrent_and_chunked_forms_agree() {
    // Longer than the fixture, with slow modes (dt down to 1e-3) that carry state across many chunks.
    let s4d = random_s4d(8, 32, 3);
    let u = Gen::new(4).normal(&[2, 300, 8], 1.0);
    let conv = s4d.ssm_conv_toeplitz(&u).unwrap();
    assert_close(&s4d.forward_recurrent(&u).unwrap(), &conv, 1e-4, "recurrent vs convolution");
    for t in [1, 7, 64, 128, 300, 512] {
        assert_close(&s4d.ssm_conv_chunked(&u, t).unwrap(), &conv, 1e-4, &format!("chunked ({t}) vs convolution"));
    }
}

#[test]
fn s4d_long_inputs_take_the_chunked_path() {
    let s4d = random_s4d(4, 8, 5);
    let l = S4d::TOEPLITZ_MAX + 37;
    let u = Gen::new(6).normal(&[1, l, 4], 1.0);
    let y = s4d.ssm_conv(&u).unwrap();
    assert_close(&y, &s4d.forward_recurrent(&u).unwrap(), 1e-4, "long input vs recurrence");
}

#[test]
fn pgc_and_lyra_match_the_reference() {
    let fx = Fixture::load("lyra/expected.safetensors");
    let vb = weights();
    let (u, ones) = (fx.get("u"), Tensor::ones((3, 13, 1), DType::F32, &Device::Cpu).unwrap());
    let enc = candle_nn::Module::forward(&ouro_nn::layers::linear(vb.pp("encoder"), 20, D_MODEL, true).unwrap(), &u).unwrap();
    let p1 = Pgc::new(D_MODEL, 0.25, vb.pp("pgc1")).unwrap().forward(&enc, &ones).unwrap();
    assert_close(&p1, &fx.get("pgc1"), 1e-5, "PGC (expansion 0.25)");
    let p2 = Pgc::new(D_MODEL, 2.0, vb.pp("pgc2")).unwrap().forward(&fx.get("pgc1"), &ones).unwrap();
    assert_close(&p2, &fx.get("pgc2"), 1e-5, "PGC (expansion 2)");
    let lyra = Lyra::new(cfg(), vb).unwrap();
    let mask = Tensor::ones((3, 13), DType::F32, &Device::Cpu).unwrap();
    assert_close(&lyra.forward(&u, &mask, &no_dropout).unwrap(), &fx.get("y"), 1e-5, "Lyra output");
}

#[test]
fn lyra_gradients_match_the_reference() {
    let fx = Fixture::load("lyra/expected.safetensors");
    let mut vm = VarMap::new();
    let lyra = Lyra::new(cfg(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    vm.load(Fixture::path("lyra/model.safetensors")).unwrap();
    let n: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    let expected_n = fx.get("n_params").to_vec1::<i64>().unwrap()[0] as usize;
    assert_eq!(n, expected_n, "parameter count");
    let mask = Tensor::ones((3, 13), DType::F32, &Device::Cpu).unwrap();
    let y = lyra.forward(&fx.get("u"), &mask, &no_dropout).unwrap();
    let grads = (y * fx.get("w")).unwrap().sum_all().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    assert_eq!(data.len(), fx.names("grad.").len(), "every parameter has a reference gradient");
    for (name, var) in data.iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(g, &fx.get(&format!("grad.{name}")), 1e-4, &format!("d/d{name}"));
    }
}

#[test]
fn s4d_gradients_through_the_chunked_form_match_the_toeplitz_form() {
    // The VarBuilder's parameters are constants; make C and log_dt variables to differentiate through them.
    let mut s4d = random_s4d(4, 8, 9);
    s4d.c = Var::from_tensor(&s4d.c).unwrap().into_inner();
    s4d.log_dt = Var::from_tensor(&s4d.log_dt).unwrap().into_inner();
    let u = Var::from_tensor(&Gen::new(10).normal(&[2, 50, 4], 1.0)).unwrap();
    let w = Gen::new(11).normal(&[2, 50, 4], 1.0);
    let g_of = |y: Tensor| {
        let gs = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (gs.get(u.as_tensor()).unwrap().clone(), gs.get(&s4d.c).unwrap().clone(), gs.get(&s4d.log_dt).unwrap().clone())
    };
    let (gu1, gc1, gdt1) = g_of(s4d.ssm_conv_toeplitz(u.as_tensor()).unwrap());
    let (gu2, gc2, gdt2) = g_of(s4d.ssm_conv_chunked(u.as_tensor(), 16).unwrap());
    assert_close(&gu2, &gu1, 1e-4, "du");
    assert_close(&gc2, &gc1, 1e-4, "dC");
    assert_close(&gdt2, &gdt1, 1e-4, "dlog_dt");
}

#[test]
fn padding_is_masked_out() {
    // A batch of mixed lengths gives each sequence what it gets alone.
    let lyra = Lyra::new(cfg(), weights()).unwrap();
    let fx = Fixture::load("lyra/expected.safetensors");
    let u = fx.get("u");
    let lens = [13usize, 9, 4];
    let mut mask = vec![0f32; 3 * 13];
    for (b, &n) in lens.iter().enumerate() {
        mask[b * 13..b * 13 + n].iter_mut().for_each(|m| *m = 1.0);
    }
    let mask = Tensor::from_vec(mask, (3, 13), &Device::Cpu).unwrap();
    // Garbage in the padding must not matter.
    let noisy = (u.clone() + Gen::new(1).normal(&[3, 13, 20], 1.0).broadcast_mul(&(1.0 - mask.unsqueeze(2).unwrap()).unwrap()).unwrap()).unwrap();
    let batched = lyra.forward(&noisy, &mask, &no_dropout).unwrap();
    for (b, &n) in lens.iter().enumerate() {
        let alone = lyra.forward(&u.narrow(0, b, 1).unwrap().narrow(1, 0, n).unwrap(), &Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap(), &no_dropout).unwrap();
        assert_close(&batched.narrow(0, b, 1).unwrap(), &alone, 1e-5, &format!("sequence {b} (length {n})"));
    }
}
