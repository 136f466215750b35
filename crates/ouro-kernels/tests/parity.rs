//! Parity against the reference implementations (fixtures from scripts/fixtures/gen_core.py):
//! `ssd_minimal_discrete` + `mamba_chunk_scan_combined` options, `selective_scan_ref`, gated `rms_norm_ref`,
//! and torch's conv1d, each in float64 with torch autograd gradients.
//!
//! Tolerances (max |ours − ref| / max |ref|, f32 kernels against float64 references):
//! forward 1e-5 and gradients 1e-4 unless stated.

use candle_core::{Tensor, Var};
use ouro_kernels::conv::causal_conv1d;
use ouro_kernels::norm::{gated_rms_norm, rms_norm};
use ouro_kernels::selective_scan::{selective_scan, ScanInput};
use ouro_kernels::ssd::{ssd, Algo, SsdInput};
use ouro_kernels::testing::{assert_close, Fixture};

const FWD_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-4;

fn vars(fx: &Fixture, case: &str, names: &[&str]) -> Vec<(String, Var)> {
    names
        .iter()
        .filter_map(|n| fx.try_get(&format!("{case}.in.{n}")).map(|t| (n.to_string(), Var::from_tensor(&t).unwrap())))
        .collect()
}

fn check_grads(fx: &Fixture, case: &str, vs: &[(String, Var)], loss: &Tensor, what: &str) {
    let gs = loss.backward().unwrap();
    for (name, v) in vs {
        let g = gs.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        assert_close(g, &fx.get(&format!("{case}.grad.{name}")), GRAD_TOL, &format!("{what} d{name}"));
    }
}

#[test]
fn ssd_matches_ssd_minimal_discrete() {
    let fx = Fixture::load("core.safetensors");
    for case in ["ssd_g1", "ssd_g2"] {
        let m = fx.meta(case);
        let lim = &m["dt_limit"];
        let hi = lim[1].as_f64().unwrap_or(f64::INFINITY);
        let dt_limit = (lim[0].as_f64().unwrap(), hi);
        for algo in [Algo::Chunked(16), Algo::Chunked(5), Algo::Recurrent, Algo::Quadratic] {
            let vs = vars(&fx, case, &["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "s0"]);
            let t = |name: &str| vs.iter().find(|(n, _)| n == name).unwrap().1.as_tensor();
            let mut inp = SsdInput::new(t("x"), t("dt"), t("A"), t("B"), t("C"));
            inp.d = Some(t("D"));
            inp.z = Some(t("z"));
            inp.dt_bias = Some(t("dt_bias"));
            inp.dt_softplus = true;
            inp.dt_limit = dt_limit;
            inp.initial_states = Some(t("s0"));
            let (y, s) = ssd(&inp, algo).unwrap();
            let what = format!("{case} {algo:?}");
            assert_close(&y, &fx.get(&format!("{case}.out.y")), FWD_TOL, &format!("{what} y"));
            assert_close(&s, &fx.get(&format!("{case}.out.final_state")), FWD_TOL, &format!("{what} final state"));
            let loss = fx.loss(case, &[("y", &y), ("final_state", &s)]);
            check_grads(&fx, case, &vs, &loss, &what);
        }
    }
}

#[test]
fn selective_scan_matches_selective_scan_ref() {
    let fx = Fixture::load("core.safetensors");
    for case in ["scan_g1", "scan_g2"] {
        let vs = vars(&fx, case, &["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]);
        let t = |name: &str| vs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor());
        let mut inp = ScanInput::new(t("u").unwrap(), t("delta").unwrap(), t("A").unwrap(), t("B").unwrap(), t("C").unwrap());
        inp.d = t("D");
        inp.z = t("z");
        inp.delta_bias = t("delta_bias");
        inp.delta_softplus = true;
        inp.initial_state = t("h0");
        let (y, h) = selective_scan(&inp).unwrap();
        assert_close(&y, &fx.get(&format!("{case}.out.y")), FWD_TOL, &format!("{case} y"));
        assert_close(&h, &fx.get(&format!("{case}.out.last_state")), FWD_TOL, &format!("{case} last state"));
        let loss = fx.loss(case, &[("y", &y), ("last_state", &h)]);
        check_grads(&fx, case, &vs, &loss, case);
    }
}

#[test]
fn gated_rms_norm_matches_rms_norm_ref() {
    let fx = Fixture::load("core.safetensors");
    for case in ["norm_gate_first", "norm_before_gate", "norm_plain"] {
        let m = fx.meta(case);
        let vs = vars(&fx, case, &["x", "weight", "z"]);
        let t = |name: &str| vs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor());
        let gs = m["group_size"].as_u64().map(|g| g as usize);
        let y = gated_rms_norm(t("x").unwrap(), t("z"), t("weight").unwrap(), 1e-5, gs, m["norm_before_gate"].as_bool().unwrap()).unwrap();
        assert_close(&y, &fx.get(&format!("{case}.out.y")), FWD_TOL, &format!("{case} y"));
        if case == "norm_plain" {
            let y2 = rms_norm(t("x").unwrap(), t("weight").unwrap(), 1e-5).unwrap();
            assert_close(&y2, &y, 1e-6, "rms_norm == ungated gated_rms_norm");
        }
        let loss = fx.loss(case, &[("y", &y)]);
        check_grads(&fx, case, &vs, &loss, case);
    }
}

#[test]
fn causal_conv1d_matches_torch_conv1d() {
    let fx = Fixture::load("core.safetensors");
    let vs = vars(&fx, "conv", &["x", "weight", "bias", "state"]);
    let t = |name: &str| vs.iter().find(|(n, _)| n == name).unwrap().1.as_tensor();
    let y = causal_conv1d(t("x"), t("weight"), Some(t("bias")), Some(t("state")), None).unwrap();
    assert_close(&y, &fx.get("conv.out.y"), FWD_TOL, "conv y");
    let loss = fx.loss("conv", &[("y", &y)]);
    check_grads(&fx, "conv", &vs, &loss, "conv");
}
