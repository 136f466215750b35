//! The Mamba and Mamba-2 mixers against HF transformers' `MambaMixer` / `Mamba2Mixer` (random weights,
//! fixtures from scripts/fixtures/gen_core.py), and their internal identities (prefill + steps ==
//! forward, carried state, documents), for n_groups ∈ {1, 2, 4}.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ouro_kernels::ssd::Algo;
use ouro_kernels::testing::{assert_close, Fixture, Gen};
use ouro_nn::{Mamba, Mamba2, Mamba2Config, MambaConfig};

/// A VarMap holding the fixture's parameters as trainable variables.
fn varmap_from(fx: &Fixture, case: &str) -> (VarMap, Vec<(String, Var)>) {
    let vm = VarMap::new();
    let mut vars = Vec::new();
    {
        let mut data = vm.data().lock().unwrap();
        for name in fx.names(&format!("{case}.param.")) {
            let v = Var::from_tensor(&fx.get(&format!("{case}.param.{name}"))).unwrap();
            data.insert(name.clone(), v.clone());
            vars.push((name, v));
        }
    }
    (vm, vars)
}

fn check(fx: &Fixture, case: &str, y: &Tensor, hidden: &Var, vars: &[(String, Var)]) {
    // f32 on both sides: forward 1e-4, gradients 1e-4 relative to their scale.
    assert_close(y, &fx.get(&format!("{case}.out.y")), 1e-4, &format!("{case} y"));
    let grads = fx.loss(case, &[("y", y)]).backward().unwrap();
    assert_close(grads.get(hidden.as_tensor()).unwrap(), &fx.get(&format!("{case}.grad.hidden")), 1e-4, &format!("{case} d hidden"));
    for (name, v) in vars {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        assert_close(g, &fx.get(&format!("{case}.grad.{name}")), 1e-4, &format!("{case} d {name}"));
    }
}

fn mamba2_cfg_from_hf(c: &serde_json::Value) -> Mamba2Config {
    let lim = &c["time_step_limit"];
    Mamba2Config {
        d_model: c["hidden_size"].as_u64().unwrap() as usize,
        d_state: c["state_size"].as_u64().unwrap() as usize,
        d_conv: c["conv_kernel"].as_u64().unwrap() as usize,
        expand: c["expand"].as_u64().unwrap() as usize,
        d_inner: None,
        headdim: c["head_dim"].as_u64().unwrap() as usize,
        ngroups: c["n_groups"].as_u64().unwrap() as usize,
        d_ssm: None,
        rmsnorm: true,
        norm_before_gate: false,
        norm_eps: c["layer_norm_epsilon"].as_f64().unwrap(),
        dt_limit: (lim[0].as_f64().unwrap(), lim[1].as_f64().unwrap_or(f64::INFINITY)),
        bias: c["use_bias"].as_bool().unwrap(),
        conv_bias: c["use_conv_bias"].as_bool().unwrap(),
        d_has_hdim: false,
        chunk_size: c["chunk_size"].as_u64().unwrap() as usize,
    }
}

#[test]
fn mamba2_mixer_matches_hf() {
    let fx = Fixture::load("core.safetensors");
    for case in ["hf_mamba2", "hf_mamba2_g2"] {
        let cfg = mamba2_cfg_from_hf(&fx.meta(case)["config"]);
        let (vm, vars) = varmap_from(&fx, case);
        let mixer = Mamba2::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let hidden = Var::from_tensor(&fx.get(&format!("{case}.in.hidden"))).unwrap();
        let y = mixer.forward(hidden.as_tensor(), None, None).unwrap();
        check(&fx, case, &y, &hidden, &vars);
    }
}

#[test]
fn mamba_mixer_matches_hf() {
    let fx = Fixture::load("core.safetensors");
    let c = &fx.meta("hf_mamba")["config"];
    let mut cfg = MambaConfig::new(c["hidden_size"].as_u64().unwrap() as usize);
    cfg.d_inner = c["intermediate_size"].as_u64().unwrap() as usize;
    cfg.d_state = c["state_size"].as_u64().unwrap() as usize;
    cfg.d_conv = c["conv_kernel"].as_u64().unwrap() as usize;
    cfg.dt_rank = c["time_step_rank"].as_u64().unwrap() as usize;
    let (vm, vars) = varmap_from(&fx, "hf_mamba");
    let mixer = Mamba::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let hidden = Var::from_tensor(&fx.get("hf_mamba.in.hidden")).unwrap();
    let y = mixer.forward(hidden.as_tensor(), None, None).unwrap();
    check(&fx, "hf_mamba", &y, &hidden, &vars);
}

/// Random non-trivial parameters for a mixer built from `f`.
fn random_mixer<T>(seed: u64, f: impl Fn(VarBuilder) -> candle_core::Result<T>) -> T {
    let vm = VarMap::new();
    let m = f(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let mut r = Gen::new(seed);
    for (name, v) in ouro_nn::checkpoint::named_vars(&vm) {
        let t = if name.ends_with("A_log") {
            r.uniform(v.dims(), -0.5, 1.5)
        } else if name.ends_with("dt_bias") || name.ends_with("dt_proj.bias") {
            r.uniform(v.dims(), -3.0, -1.0)
        } else {
            r.normal(v.dims(), 0.3)
        };
        v.set(&t).unwrap();
    }
    m
}

fn mamba2_small(ngroups: usize, d_mlp: bool) -> Mamba2Config {
    Mamba2Config {
        d_model: 16,
        d_state: 8,
        d_conv: 4,
        expand: 2,
        headdim: 4,
        ngroups,
        d_ssm: if d_mlp { Some(24) } else { None },
        chunk_size: 8,
        dt_limit: (0.0, 0.8),
        ..Default::default()
    }
}

#[test]
fn mamba2_prefill_then_steps_equals_forward() {
    for (g, mlp) in [(1, false), (2, true), (4, false)] {
        let cfg = mamba2_small(g, mlp);
        let m = random_mixer(g as u64, |vb| Mamba2::new(cfg.clone(), vb));
        let u = Gen::new(7).normal(&[2, 21, 16], 1.0);
        let full = m.forward(&u, None, None).unwrap();
        for algo in [Algo::Recurrent, Algo::Quadratic, Algo::Chunked(3)] {
            let other = m.forward_with(&u, None, None, algo).unwrap();
            assert_close(&other, &full, 1e-5, &format!("g={g} {algo:?} vs chunked"));
        }
        let mut st = m.zero_state(2).unwrap();
        let pre = m.forward(&u.narrow(1, 0, 13).unwrap(), None, Some(&mut st)).unwrap();
        assert_close(&pre, &full.narrow(1, 0, 13).unwrap(), 1e-5, "prefill");
        // Two more tokens as a short chunk, then steps.
        let mid = m.forward(&u.narrow(1, 13, 2).unwrap(), None, Some(&mut st)).unwrap();
        assert_close(&mid, &full.narrow(1, 13, 2).unwrap(), 1e-5, "continued chunk");
        for t in 15..21 {
            let y = m.step(&u.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &mut st).unwrap();
            assert_close(&y, &full.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), 1e-5, &format!("g={g} step {t}"));
        }
    }
}

#[test]
fn mamba2_packed_documents_equal_separate_runs() {
    let cfg = mamba2_small(2, false);
    let m = random_mixer(3, |vb| Mamba2::new(cfg.clone(), vb));
    let u = Gen::new(8).normal(&[1, 30, 16], 1.0);
    let ids: Vec<u32> = (0..30).map(|t| if t < 9 { 0 } else if t < 10 { 1 } else { 2 }).collect();
    let seq = Tensor::from_vec(ids, (1, 30), &Device::Cpu).unwrap();
    let mut st = m.zero_state(1).unwrap();
    let packed = m.forward(&u, Some(&seq), Some(&mut st)).unwrap();
    let mut last_state = None;
    for (s, l) in [(0usize, 9usize), (9, 1), (10, 20)] {
        let mut s1 = m.zero_state(1).unwrap();
        let alone = m.forward(&u.narrow(1, s, l).unwrap(), None, Some(&mut s1)).unwrap();
        assert_close(&packed.narrow(1, s, l).unwrap(), &alone, 1e-5, &format!("document at {s}"));
        last_state = Some(s1);
    }
    let last = last_state.unwrap();
    assert_close(&st.ssm, &last.ssm, 1e-5, "ssm state of the last document");
    assert_close(&st.conv, &last.conv, 1e-6, "conv state of the last document");
}

#[test]
fn mamba_prefill_then_steps_equals_forward() {
    for bcdt_rms in [false, true] {
        let mut cfg = MambaConfig::new(12);
        cfg.bcdt_rms = bcdt_rms;
        let m = random_mixer(5, |vb| Mamba::new(cfg.clone(), vb));
        let u = Gen::new(9).normal(&[2, 17, 12], 1.0);
        let full = m.forward(&u, None, None).unwrap();
        let mut st = m.zero_state(2).unwrap();
        let pre = m.forward(&u.narrow(1, 0, 10).unwrap(), None, Some(&mut st)).unwrap();
        assert_close(&pre, &full.narrow(1, 0, 10).unwrap(), 1e-5, "prefill");
        for t in 10..17 {
            let y = m.step(&u.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &mut st).unwrap();
            assert_close(&y, &full.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), 1e-5, &format!("step {t} (bcdt_rms={bcdt_rms})"));
        }
    }
}

#[test]
fn mixers_reject_bad_shapes() {
    let cfg = mamba2_small(1, false);
    let m = random_mixer(1, |vb| Mamba2::new(cfg.clone(), vb));
    let e = m.forward(&Tensor::zeros((1, 4, 15), DType::F32, &Device::Cpu).unwrap(), None, None).unwrap_err().to_string();
    assert!(e.contains("d_model"), "{e}");
    let bad = Mamba2Config { ngroups: 3, ..mamba2_small(1, false) };
    let vm = VarMap::new();
    let e = Mamba2::new(bad, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap_err().to_string();
    assert!(e.contains("groups"), "{e}");
}
