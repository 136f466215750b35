//! Internal consistency of the Mamba-1 selective scan and the causal conv1d: carried state, document
//! packing, steps vs forward, and gradients against finite differences.

use candle_core::{DType, Device, Tensor, Var};
use ouro_kernels::conv::{causal_conv1d, causal_conv1d_step, conv_state_after};
use ouro_kernels::selective_scan::{selective_scan, selective_scan_step, ScanInput};
use ouro_kernels::testing::{assert_close, Gen};

struct Case {
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Tensor,
    z: Tensor,
    bias: Tensor,
    h0: Tensor,
}

fn case(seed: u64, b: usize, l: usize, d: usize, n: usize, g: usize) -> Case {
    let mut r = Gen::new(seed);
    Case {
        u: r.normal(&[b, l, d], 1.0),
        delta: r.normal(&[b, l, d], 0.5),
        a: r.uniform(&[d, n], -2.0, -0.1),
        b: r.normal(&[b, l, g, n], 1.0),
        c: r.normal(&[b, l, g, n], 1.0),
        d: r.normal(&[d], 1.0),
        z: r.normal(&[b, l, d], 1.0),
        bias: r.uniform(&[d], -2.0, 0.0),
        h0: r.normal(&[b, d, n], 1.0),
    }
}

fn input<'a>(c: &'a Case, with_state: bool) -> ScanInput<'a> {
    let mut i = ScanInput::new(&c.u, &c.delta, &c.a, &c.b, &c.c);
    i.d = Some(&c.d);
    i.z = Some(&c.z);
    i.delta_bias = Some(&c.bias);
    i.delta_softplus = true;
    if with_state {
        i.initial_state = Some(&c.h0);
    }
    i
}

fn part(t: &Tensor, s: usize, l: usize) -> Tensor {
    t.narrow(1, s, l).unwrap()
}

#[test]
fn scan_split_and_steps_equal_one_run() {
    let cs = case(1, 2, 40, 20, 8, 2); // 20 channels: blocks of 8 leave a partial block
    let (y_full, h_full) = selective_scan(&input(&cs, true)).unwrap();
    let l1 = 23;
    let c1 = Case {
        u: part(&cs.u, 0, l1),
        delta: part(&cs.delta, 0, l1),
        a: cs.a.clone(),
        b: part(&cs.b, 0, l1),
        c: part(&cs.c, 0, l1),
        d: cs.d.clone(),
        z: part(&cs.z, 0, l1),
        bias: cs.bias.clone(),
        h0: cs.h0.clone(),
    };
    let (y1, h1) = selective_scan(&input(&c1, true)).unwrap();
    assert_close(&y1, &part(&y_full, 0, l1), 1e-6, "prefix");
    // Continue token by token with the step.
    let mut h = h1;
    for t in l1..40 {
        let at = |x: &Tensor| x.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        let (y, hn) = selective_scan_step(&h, &at(&cs.u), &at(&cs.delta), &cs.a, &at(&cs.b), &at(&cs.c), Some(&cs.d), Some(&at(&cs.z)), Some(&cs.bias), true).unwrap();
        assert_close(&y, &at(&y_full), 1e-5, &format!("step {t}"));
        h = hn;
    }
    assert_close(&h, &h_full, 1e-5, "state after steps");
}

#[test]
fn scan_packed_documents_equal_separate_runs() {
    let cs = case(2, 1, 30, 8, 4, 1);
    let ids: Vec<u32> = (0..30).map(|t| if t < 11 { 0 } else { 1 }).collect();
    let seq = Tensor::from_vec(ids, (1, 30), &Device::Cpu).unwrap();
    let mut inp = input(&cs, false);
    inp.seq_idx = Some(&seq);
    let (y, h) = selective_scan(&inp).unwrap();
    for (s, l) in [(0usize, 11usize), (11, 19)] {
        let c = Case {
            u: part(&cs.u, s, l),
            delta: part(&cs.delta, s, l),
            a: cs.a.clone(),
            b: part(&cs.b, s, l),
            c: part(&cs.c, s, l),
            d: cs.d.clone(),
            z: part(&cs.z, s, l),
            bias: cs.bias.clone(),
            h0: cs.h0.clone(),
        };
        let (ys, hs) = selective_scan(&input(&c, false)).unwrap();
        assert_close(&part(&y, s, l), &ys, 1e-6, &format!("document at {s}"));
        if s == 11 {
            assert_close(&h, &hs, 1e-6, "final state of the last document");
        }
    }
}

#[test]
fn scan_gradients_match_finite_differences_with_documents() {
    let (b, l, d, n, g) = (1, 12, 4, 4, 1);
    let cs = case(3, b, l, d, n, g);
    let ids: Vec<u32> = (0..l as u32).map(|t| t / 5).collect();
    let seq = Tensor::from_vec(ids, (1, l), &Device::Cpu).unwrap();
    let mut r = Gen::new(9);
    let wy = r.normal(&[b, l, d], 1.0);
    let wh = r.normal(&[b, d, n], 1.0);
    let fields = ["u", "delta", "A", "B", "C", "D", "z", "bias", "h0"];
    let get = |c: &Case, f: &str| -> Tensor {
        match f {
            "u" => c.u.clone(),
            "delta" => c.delta.clone(),
            "A" => c.a.clone(),
            "B" => c.b.clone(),
            "C" => c.c.clone(),
            "D" => c.d.clone(),
            "z" => c.z.clone(),
            "bias" => c.bias.clone(),
            _ => c.h0.clone(),
        }
    };
    let loss_of = |vals: &[Tensor]| -> Tensor {
        let mut i = ScanInput::new(&vals[0], &vals[1], &vals[2], &vals[3], &vals[4]);
        i.d = Some(&vals[5]);
        i.z = Some(&vals[6]);
        i.delta_bias = Some(&vals[7]);
        i.delta_softplus = true;
        i.initial_state = Some(&vals[8]);
        i.seq_idx = Some(&seq);
        let (y, h) = selective_scan(&i).unwrap();
        ((y * &wy).unwrap().sum_all().unwrap() + (h * &wh).unwrap().sum_all().unwrap()).unwrap()
    };
    let vars: Vec<Var> = fields.iter().map(|f| Var::from_tensor(&get(&cs, f)).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss_of(&ts).backward().unwrap();
    for (k, f) in fields.iter().enumerate() {
        let g = grads.get(vars[k].as_tensor()).unwrap();
        let dir = r.normal(g.dims(), 1.0);
        let predicted = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let eps = 1e-2;
        let at = |sign: f64| -> f64 {
            let mut vals: Vec<Tensor> = fields.iter().map(|f| get(&cs, f)).collect();
            vals[k] = (&vals[k] + (&dir * (sign * eps)).unwrap()).unwrap();
            loss_of(&vals).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let fd = (at(1.0) - at(-1.0)) / (2.0 * eps);
        let err = (fd - predicted).abs() / predicted.abs().max(1.0);
        assert!(err < 2e-3, "d{f}: finite difference {fd} vs backward {predicted} (rel {err:.2e})");
    }
}

#[test]
fn conv_state_steps_and_documents() {
    let mut r = Gen::new(4);
    let (b, l, c, k) = (2, 13, 5, 4);
    let x = r.normal(&[b, l, c], 1.0);
    let w = r.normal(&[c, 1, k], 1.0);
    let bias = r.normal(&[c], 1.0);
    let y = causal_conv1d(&x, &w, Some(&bias), None, None).unwrap();
    // Prefill 6, then step the rest.
    let x1 = x.narrow(1, 0, 6).unwrap();
    let y1 = causal_conv1d(&x1, &w, Some(&bias), None, None).unwrap();
    assert_close(&y1, &y.narrow(1, 0, 6).unwrap(), 1e-6, "prefill");
    let mut st = conv_state_after(&x1, None, k, None).unwrap();
    for t in 6..l {
        let (yt, s2) = causal_conv1d_step(&st, &x.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &w, Some(&bias)).unwrap();
        assert_close(&yt, &y.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), 1e-6, &format!("step {t}"));
        st = s2;
    }
    // Continue with a short chunk (shorter than the window) from the carried state.
    let x2 = x.narrow(1, 6, 2).unwrap();
    let st6 = conv_state_after(&x1, None, k, None).unwrap();
    let y2 = causal_conv1d(&x2, &w, Some(&bias), Some(&st6), None).unwrap();
    assert_close(&y2, &y.narrow(1, 6, 2).unwrap(), 1e-6, "continued chunk");
    let st8 = conv_state_after(&x2, Some(&st6), k, None).unwrap();
    assert_close(&st8, &x.narrow(1, 5, 3).unwrap(), 0.0, "state after a short chunk");
    // Documents: positions 0..4 and 4..13 of row 0 behave as separate inputs.
    let ids: Vec<u32> = (0..b * l).map(|i| if i % l < 4 { 0 } else { 1 }).collect();
    let seq = Tensor::from_vec(ids, (b, l), &Device::Cpu).unwrap();
    let ys = causal_conv1d(&x, &w, Some(&bias), None, Some(&seq)).unwrap();
    let alone = causal_conv1d(&x.narrow(1, 4, 9).unwrap(), &w, Some(&bias), None, None).unwrap();
    assert_close(&ys.narrow(1, 4, 9).unwrap(), &alone, 1e-6, "second document");
    assert_close(&ys.narrow(1, 0, 4).unwrap(), &y.narrow(1, 0, 4).unwrap(), 1e-6, "first document");
}

#[test]
fn conv_gradients_with_documents_match_finite_differences() {
    let mut r = Gen::new(6);
    let (b, l, c, k) = (1, 9, 3, 4);
    let x = r.normal(&[b, l, c], 1.0);
    let w = r.normal(&[c, k], 1.0);
    let st = r.normal(&[b, k - 1, c], 1.0);
    let wy = r.normal(&[b, l, c], 1.0);
    let seq = Tensor::from_vec(vec![0u32, 0, 0, 1, 1, 1, 1, 2, 2], (1, l), &Device::Cpu).unwrap();
    let f = |x: &Tensor, w: &Tensor, st: &Tensor| -> Tensor {
        causal_conv1d(x, w, None, Some(st), Some(&seq)).unwrap().mul(&wy).unwrap().sum_all().unwrap()
    };
    let (vx, vw, vs) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap(), Var::from_tensor(&st).unwrap());
    let gs = f(vx.as_tensor(), vw.as_tensor(), vs.as_tensor()).backward().unwrap();
    for (k_, var) in [&vx, &vw, &vs].iter().enumerate() {
        let g = gs.get(var.as_tensor()).unwrap();
        let dir = r.normal(g.dims(), 1.0);
        let predicted = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let shifted = |s: f32| {
            let mut v = [x.clone(), w.clone(), st.clone()];
            v[k_] = (&v[k_] + (&dir * s as f64).unwrap()).unwrap();
            f(&v[0], &v[1], &v[2]).to_scalar::<f32>().unwrap()
        };
        // Linear in each argument: central differences are exact up to rounding.
        let fd = (shifted(0.5) - shifted(-0.5)) / 1.0;
        assert!((fd - predicted).abs() <= 1e-4 * predicted.abs().max(1.0), "conv arg {k_}: {fd} vs {predicted}");
    }
    // The state only reaches the first document.
    let gst = gs.get(vs.as_tensor()).unwrap();
    let st_only = causal_conv1d(&x, &w, None, Some(&st), Some(&seq)).unwrap().narrow(1, 3, 6).unwrap();
    let no_state = causal_conv1d(&x, &w, None, None, Some(&seq)).unwrap().narrow(1, 3, 6).unwrap();
    assert_close(&st_only, &no_state, 0.0, "later documents ignore the carried state");
    assert!(gst.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

#[test]
fn bad_input_is_a_clear_error() {
    let cs = case(1, 1, 6, 4, 3, 1);
    let wrong_a = Gen::new(1).normal(&[5, 3], 1.0);
    let e = selective_scan(&ScanInput::new(&cs.u, &cs.delta, &wrong_a, &cs.b, &cs.c)).unwrap_err().to_string();
    assert!(e.contains("A has 5 channels"), "{e}");
    let b3 = Gen::new(2).normal(&[1, 6, 3, 3], 1.0);
    let e = selective_scan(&ScanInput::new(&cs.u, &cs.delta, &cs.a, &b3, &b3)).unwrap_err().to_string();
    assert!(e.contains("divisible by groups"), "{e}");
    let short = cs.delta.narrow(1, 0, 5).unwrap();
    let e = selective_scan(&ScanInput::new(&cs.u, &short, &cs.a, &cs.b, &cs.c)).unwrap_err().to_string();
    assert!(e.contains("delta") && e.contains("expected shape"), "{e}");
    let x = Gen::new(3).normal(&[1, 5, 4], 1.0);
    let e = causal_conv1d(&x, &Gen::new(4).normal(&[3, 1, 4], 1.0), None, None, None).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
    let e = causal_conv1d(&x, &Gen::new(4).normal(&[4, 2, 4], 1.0), None, None, None).unwrap_err().to_string();
    assert!(e.contains("(channels, 1, width)"), "{e}");
    let e = causal_conv1d(&x.narrow(1, 0, 0).unwrap(), &Gen::new(4).normal(&[4, 4], 1.0), None, None, None).unwrap_err().to_string();
    assert!(e.contains("empty sequence"), "{e}");
}
