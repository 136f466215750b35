//! Internal consistency of the SSD layer: the three algorithms agree, state carrying and document
//! packing behave like separate runs, the step equals the forward, and the hand-written backward pass
//! equals autodiff through the quadratic form and finite differences.

use candle_core::{DType, Device, Tensor, Var};
use ouro_kernels::testing::{assert_close, rel_err, Gen};
use ouro_kernels::ssd::{materialize, ssd, ssd_step, Algo, SsdInput};

struct Case {
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Tensor,
    z: Tensor,
    dt_bias: Tensor,
    s0: Tensor,
}

fn case(seed: u64, b: usize, l: usize, h: usize, p: usize, g: usize, n: usize) -> Case {
    let mut r = Gen::new(seed);
    Case {
        x: r.normal(&[b, l, h, p], 1.0),
        dt: r.normal(&[b, l, h], 1.0),
        a: r.uniform(&[h], -2.0, -0.2),
        b: r.normal(&[b, l, g, n], 0.5),
        c: r.normal(&[b, l, g, n], 0.5),
        d: r.normal(&[h], 1.0),
        z: r.normal(&[b, l, h, p], 1.0),
        dt_bias: r.uniform(&[h], -3.0, -1.0),
        s0: r.normal(&[b, h, p, n], 0.5),
    }
}

fn full_input(cs: &Case) -> SsdInput<'_> {
    let mut i = SsdInput::new(&cs.x, &cs.dt, &cs.a, &cs.b, &cs.c);
    i.d = Some(&cs.d);
    i.z = Some(&cs.z);
    i.dt_bias = Some(&cs.dt_bias);
    i.dt_softplus = true;
    i.initial_states = Some(&cs.s0);
    i
}

#[test]
fn algorithms_agree_for_every_chunk_size_and_group_count() {
    for &g in &[1usize, 2, 4] {
        let cs = case(10 + g as u64, 2, 100, 4, 8, g, 16);
        let inp = full_input(&cs);
        let (y_ref, s_ref) = ssd(&inp, Algo::Recurrent).unwrap();
        let (y_q, s_q) = ssd(&inp, Algo::Quadratic).unwrap();
        // Tolerance: f32 sums in different orders; 1e-5 relative to the output scale.
        assert_close(&y_q, &y_ref, 1e-5, &format!("quadratic y, g={g}"));
        assert_close(&s_q, &s_ref, 1e-5, &format!("quadratic state, g={g}"));
        for &q in &[1usize, 16, 64, 256] {
            let (y, s) = ssd(&inp, Algo::Chunked(q)).unwrap();
            assert_close(&y, &y_ref, 1e-5, &format!("chunked({q}) y, g={g}"));
            assert_close(&s, &s_ref, 1e-5, &format!("chunked({q}) state, g={g}"));
        }
    }
}

#[test]
fn dt_limit_and_d_per_channel() {
    let cs = case(3, 1, 40, 2, 4, 1, 8);
    let mut r = Gen::new(99);
    let d_hp = r.normal(&[2, 4], 1.0);
    let mut inp = full_input(&cs);
    inp.d = Some(&d_hp);
    inp.dt_limit = (0.05, 0.3);
    let (y_ref, _) = ssd(&inp, Algo::Recurrent).unwrap();
    let (y, _) = ssd(&inp, Algo::Chunked(16)).unwrap();
    assert_close(&y, &y_ref, 1e-5, "chunked with dt_limit");
    // The clamp is visible: results differ from the unclamped run.
    inp.dt_limit = (0.0, f64::INFINITY);
    let (y_free, _) = ssd(&inp, Algo::Recurrent).unwrap();
    assert!(rel_err(&y_free, &y_ref) > 1e-3);
}

#[test]
fn carrying_the_state_equals_one_run() {
    let cs = case(5, 2, 96, 4, 8, 2, 16);
    let inp = full_input(&cs);
    let (y_full, s_full) = ssd(&inp, Algo::Chunked(32)).unwrap();
    let l1 = 37;
    let part = |t: &Tensor, start: usize, len: usize| t.narrow(1, start, len).unwrap();
    let (x1, dt1, b1, c1, z1) = (part(&cs.x, 0, l1), part(&cs.dt, 0, l1), part(&cs.b, 0, l1), part(&cs.c, 0, l1), part(&cs.z, 0, l1));
    let mut i1 = SsdInput::new(&x1, &dt1, &cs.a, &b1, &c1);
    i1.d = Some(&cs.d);
    i1.z = Some(&z1);
    i1.dt_bias = Some(&cs.dt_bias);
    i1.dt_softplus = true;
    i1.initial_states = Some(&cs.s0);
    let (y1, s1) = ssd(&i1, Algo::Chunked(32)).unwrap();
    let l2 = 96 - l1;
    let (x2, dt2, b2, c2, z2) = (part(&cs.x, l1, l2), part(&cs.dt, l1, l2), part(&cs.b, l1, l2), part(&cs.c, l1, l2), part(&cs.z, l1, l2));
    let mut i2 = SsdInput::new(&x2, &dt2, &cs.a, &b2, &c2);
    i2.d = Some(&cs.d);
    i2.z = Some(&z2);
    i2.dt_bias = Some(&cs.dt_bias);
    i2.dt_softplus = true;
    i2.initial_states = Some(&s1);
    let (y2, s2) = ssd(&i2, Algo::Recurrent).unwrap();
    let y = Tensor::cat(&[&y1, &y2], 1).unwrap();
    assert_close(&y, &y_full, 1e-5, "split y");
    assert_close(&s2, &s_full, 1e-5, "split final state");
}

#[test]
fn packed_documents_equal_separate_runs() {
    // Row 0 holds documents of lengths 20, 1, 43; row 1 holds 64 tokens of one document.
    let cs = case(7, 2, 64, 4, 8, 2, 16);
    let mut ids = vec![0u32; 128];
    for (t, id) in ids.iter_mut().enumerate().take(64) {
        *id = if t < 20 { 0 } else if t < 21 { 1 } else { 2 };
    }
    let seq_idx = Tensor::from_vec(ids, (2, 64), &Device::Cpu).unwrap();
    let mut inp = full_input(&cs);
    inp.initial_states = None;
    inp.seq_idx = Some(&seq_idx);
    let (y_rec, s_rec) = ssd(&inp, Algo::Recurrent).unwrap();
    for algo in [Algo::Chunked(16), Algo::Chunked(7), Algo::Quadratic] {
        let (y, s) = ssd(&inp, algo).unwrap();
        assert_close(&y, &y_rec, 1e-5, &format!("{algo:?} with seq_idx"));
        assert_close(&s, &s_rec, 1e-5, &format!("{algo:?} state with seq_idx"));
    }
    // Each document alone.
    for (start, len) in [(0usize, 20usize), (20, 1), (21, 43)] {
        let sl = |t: &Tensor| t.narrow(0, 0, 1).unwrap().narrow(1, start, len).unwrap();
        let (x, dt, b, c, z) = (sl(&cs.x), sl(&cs.dt), sl(&cs.b), sl(&cs.c), sl(&cs.z));
        let mut i = SsdInput::new(&x, &dt, &cs.a, &b, &c);
        i.d = Some(&cs.d);
        i.z = Some(&z);
        i.dt_bias = Some(&cs.dt_bias);
        i.dt_softplus = true;
        let (y, s) = ssd(&i, Algo::Recurrent).unwrap();
        let y_packed = y_rec.narrow(0, 0, 1).unwrap().narrow(1, start, len).unwrap();
        assert_close(&y_packed, &y, 1e-5, &format!("document at {start}"));
        if start + len == 64 {
            assert_close(&s_rec.narrow(0, 0, 1).unwrap(), &s, 1e-5, "last document's state");
        }
    }
}

#[test]
fn prefill_then_steps_equals_forward() {
    let (l, k) = (30usize, 5usize);
    let cs = case(11, 2, l + k, 4, 8, 2, 16);
    let inp = full_input(&cs);
    let (y_full, s_full) = ssd(&inp, Algo::Chunked(16)).unwrap();
    let part = |t: &Tensor| t.narrow(1, 0, l).unwrap();
    let (x, dt, b, c, z) = (part(&cs.x), part(&cs.dt), part(&cs.b), part(&cs.c), part(&cs.z));
    let mut ip = SsdInput::new(&x, &dt, &cs.a, &b, &c);
    ip.d = Some(&cs.d);
    ip.z = Some(&z);
    ip.dt_bias = Some(&cs.dt_bias);
    ip.dt_softplus = true;
    ip.initial_states = Some(&cs.s0);
    let (_, mut state) = ssd(&ip, Algo::Chunked(16)).unwrap();
    for t in l..l + k {
        let at = |x: &Tensor| x.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        let (y, s) = ssd_step(
            &state,
            &at(&cs.x),
            &at(&cs.dt),
            &cs.a,
            &at(&cs.b),
            &at(&cs.c),
            Some(&cs.d),
            Some(&at(&cs.z)),
            Some(&cs.dt_bias),
            true,
            (0.0, f64::INFINITY),
        )
        .unwrap();
        state = s;
        assert_close(&y, &at(&y_full), 1e-5, &format!("step {t}"));
    }
    assert_close(&state, &s_full, 1e-5, "state after steps");
}

#[test]
fn materialized_matrix_times_x_is_the_forward() {
    let cs = case(13, 2, 33, 4, 8, 2, 16);
    let mut inp = SsdInput::new(&cs.x, &cs.dt, &cs.a, &cs.b, &cs.c);
    inp.dt_bias = Some(&cs.dt_bias);
    inp.dt_softplus = true;
    inp.d = Some(&cs.d);
    let (y, _) = ssd(&inp, Algo::Chunked(8)).unwrap();
    let dt = inp.processed_dt().unwrap();
    let m = materialize(&dt, &cs.a, &cs.b, &cs.c, Some(&cs.d), None).unwrap(); // (b, h, l, l)
    let xh = cs.x.permute((0, 2, 1, 3)).unwrap().contiguous().unwrap();
    let ym = m.matmul(&xh).unwrap().permute((0, 2, 1, 3)).unwrap();
    assert_close(&ym, &y, 1e-5, "M·x");
    // Lower triangular (causal).
    let upper = m.narrow(2, 0, 1).unwrap().narrow(3, 1, 32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(upper, 0.0);
}

/// Loss Σ y·wy + Σ s·ws for fixed random weights, so every output element gets a distinct gradient.
fn loss(y: &Tensor, s: &Tensor, wy: &Tensor, ws: &Tensor) -> Tensor {
    ((y * wy).unwrap().sum_all().unwrap() + (s * ws).unwrap().sum_all().unwrap()).unwrap()
}

struct Vars {
    x: Var,
    dt: Var,
    a: Var,
    b: Var,
    c: Var,
    d: Var,
    z: Var,
    dt_bias: Var,
    s0: Var,
}

fn vars(cs: &Case) -> Vars {
    let v = |t: &Tensor| Var::from_tensor(t).unwrap();
    Vars {
        x: v(&cs.x),
        dt: v(&cs.dt),
        a: v(&cs.a),
        b: v(&cs.b),
        c: v(&cs.c),
        d: v(&cs.d),
        z: v(&cs.z),
        dt_bias: v(&cs.dt_bias),
        s0: v(&cs.s0),
    }
}

fn grads_of(vs: &Vars, algo: Algo, seq_idx: Option<&Tensor>, wy: &Tensor, ws: &Tensor) -> Vec<(String, Tensor)> {
    let mut inp = SsdInput::new(vs.x.as_tensor(), vs.dt.as_tensor(), vs.a.as_tensor(), vs.b.as_tensor(), vs.c.as_tensor());
    inp.d = Some(vs.d.as_tensor());
    inp.z = Some(vs.z.as_tensor());
    inp.dt_bias = Some(vs.dt_bias.as_tensor());
    inp.dt_softplus = true;
    inp.initial_states = Some(vs.s0.as_tensor());
    inp.seq_idx = seq_idx;
    let (y, s) = ssd(&inp, algo).unwrap();
    let gs = loss(&y, &s, wy, ws).backward().unwrap();
    [("x", &vs.x), ("dt", &vs.dt), ("A", &vs.a), ("B", &vs.b), ("C", &vs.c), ("D", &vs.d), ("z", &vs.z), ("dt_bias", &vs.dt_bias), ("s0", &vs.s0)]
        .into_iter()
        .map(|(name, v)| (name.to_string(), gs.get(v.as_tensor()).expect(name).clone()))
        .collect()
}

#[test]
fn lowered_decay_at_document_starts_equals_the_exact_reset() {
    // The CUDA kernels take no document ids: ssd::doc_start_decay lowers the log-decay of each document's
    // first position instead. Here, on the CPU, the discretised scan with those offsets and no ids against the
    // exact reset (ids): y, the final state and every gradient. Row 0: single-token documents at the start
    // and back to back, boundaries at the edges of 16-token chunks, 8 in one chunk; row 1: one document.
    let (b, l, h, p, g, n) = (2, 96, 4, 8, 2, 16);
    let cuts = [1usize, 2, 15, 16, 17, 33, 34, 35, 36, 37, 38, 40, 47, 48, 80];
    let ids: Vec<u32> = (0..b * l).map(|i| if i < l { cuts.iter().filter(|&&c| i >= c).count() as u32 } else { 0 }).collect();
    let seq_idx = Tensor::from_vec(ids, (b, l), &Device::Cpu).unwrap();
    let seg = ouro_kernels::util::Segments::from_tensor(Some(&seq_idx), b, l).unwrap();
    let starts = ouro_kernels::ssd::doc_start_decay(&seg, b, l, &Device::Cpu).unwrap().unwrap();
    let mut r = Gen::new(21);
    let v = |t: Tensor| Var::from_tensor(&t).unwrap();
    let (x, a, bm, cm, s0) = (v(r.normal(&[b, l, h, p], 1.0)), v(r.uniform(&[b, l, h], -0.5, -0.01)), v(r.normal(&[b, l, g, n], 1.0)), v(r.normal(&[b, l, g, n], 1.0)), v(r.normal(&[b, h, p, n], 1.0)));
    let (wy, ws) = (r.normal(&[b, l, h, p], 1.0), r.normal(&[b, h, p, n], 1.0));
    let run = |docs: bool, algo: Algo| {
        let la = if docs { a.as_tensor().clone() } else { a.broadcast_add(&starts).unwrap() };
        let (y, sf) = ouro_kernels::ssd::scan(&x, &la, &bm, &cm, Some(&s0), docs.then_some(&seq_idx), algo).unwrap();
        let gs = loss(&y, &sf, &wy, &ws).backward().unwrap();
        let mut out = vec![("y", y), ("final state", sf)];
        for (name, t) in [("x", &x), ("a", &a), ("B", &bm), ("C", &cm), ("s0", &s0)] {
            out.push((name, gs.get(t.as_tensor()).expect(name).clone()));
        }
        out
    };
    let exact = run(true, Algo::Recurrent);
    for algo in [Algo::Recurrent, Algo::Chunked(16), Algo::Chunked(64)] {
        for ((name, got), (_, want)) in run(false, algo).iter().zip(&exact) {
            // y and the final state come out identical (exp(a − 24)·S is below their rounding). The gradients
            // are summed from decays that are differences of cumulative sums grown by 24 per boundary: k
            // boundaries before a position in its chunk round them by up to 2⁻²⁴·24·k relative (k reaches 8
            // in a 16-token chunk here, 14 in a 64-token one; seen: 1.0e-5).
            assert_close(got, want, 3e-5, &format!("{name} ({algo:?})"));
        }
    }
}

#[test]
fn backward_matches_autodiff_of_the_quadratic_form() {
    for (g, seq) in [(1usize, false), (2, false), (4, true)] {
        let (b, l, h, p, n) = (2, 45, 4, 8, 16);
        let cs = case(17 + g as u64, b, l, h, p, g, n);
        let mut r = Gen::new(3);
        let wy = r.normal(&[b, l, h, p], 1.0);
        let ws = r.normal(&[b, h, p, n], 1.0);
        let seq_idx = seq.then(|| {
            let ids: Vec<u32> = (0..b * l).map(|i| ((i % l) / 13) as u32).collect();
            Tensor::from_vec(ids, (b, l), &Device::Cpu).unwrap()
        });
        let vs = vars(&cs);
        let reference = grads_of(&vs, Algo::Quadratic, seq_idx.as_ref(), &wy, &ws);
        // Chunked(4): 12 chunks, more than one checkpoint segment of the backward sweep.
        for algo in [Algo::Chunked(4), Algo::Chunked(16), Algo::Chunked(64), Algo::Recurrent] {
            let got = grads_of(&vs, algo, seq_idx.as_ref(), &wy, &ws);
            for ((name, gr), (_, rf)) in got.iter().zip(&reference) {
                // f32, different summation orders: 2e-5 relative to the gradient's scale.
                assert_close(gr, rf, 2e-5, &format!("d{name} ({algo:?}, g={g}, seq_idx={seq})"));
            }
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    // Directional derivative along a random direction, central differences in f64 over f32 kernels.
    let (b, l, h, p, g, n) = (1, 19, 2, 4, 1, 8);
    let cs = case(23, b, l, h, p, g, n);
    let mut r = Gen::new(5);
    let wy = r.normal(&[b, l, h, p], 1.0);
    let ws = r.normal(&[b, h, p, n], 1.0);
    let vs = vars(&cs);
    let grads = grads_of(&vs, Algo::Chunked(8), None, &wy, &ws);
    let eval = |cs: &Case| -> f64 {
        let (y, s) = ssd(&full_input(cs), Algo::Chunked(8)).unwrap();
        loss(&y, &s, &wy, &ws).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    for (name, grad) in &grads {
        let dir = r.normal(grad.dims(), 1.0);
        let predicted = (grad * &dir).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let eps = 1e-2f64;
        let shift = |sign: f64| -> f64 {
            let mut c2 = case(23, b, l, h, p, g, n);
            let field = match name.as_str() {
                "x" => &mut c2.x,
                "dt" => &mut c2.dt,
                "A" => &mut c2.a,
                "B" => &mut c2.b,
                "C" => &mut c2.c,
                "D" => &mut c2.d,
                "z" => &mut c2.z,
                "dt_bias" => &mut c2.dt_bias,
                "s0" => &mut c2.s0,
                _ => unreachable!(),
            };
            *field = (&*field + (&dir * (sign * eps)).unwrap()).unwrap();
            eval(&c2)
        };
        let fd = (shift(1.0) - shift(-1.0)) / (2.0 * eps);
        let err = (fd - predicted).abs() / predicted.abs().max(1.0);
        // Second-order truncation (eps²) plus f32 rounding of the loss: 2e-3 relative.
        assert!(err < 2e-3, "d{name}: finite difference {fd} vs backward {predicted} (rel {err:.2e})");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let cs = case(1, 1, 8, 4, 4, 2, 8);
    let bad_g = Gen::new(2).normal(&[1, 8, 3, 8], 1.0);
    let e = ssd(&SsdInput::new(&cs.x, &cs.dt, &cs.a, &bad_g, &bad_g), Algo::Chunked(4)).unwrap_err().to_string();
    assert!(e.contains("divisible by groups"), "{e}");
    let short_dt = cs.dt.narrow(1, 0, 7).unwrap();
    let e = ssd(&SsdInput::new(&cs.x, &short_dt, &cs.a, &cs.b, &cs.c), Algo::Chunked(4)).unwrap_err().to_string();
    assert!(e.contains("dt") && e.contains("expected shape"), "{e}");
    let empty = Tensor::zeros((1, 0, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let (dt0, b0) = (Tensor::zeros((1, 0, 4), DType::F32, &Device::Cpu).unwrap(), Tensor::zeros((1, 0, 2, 8), DType::F32, &Device::Cpu).unwrap());
    let e = ssd(&SsdInput::new(&empty, &dt0, &cs.a, &b0, &b0), Algo::Chunked(4)).unwrap_err().to_string();
    assert!(e.contains("empty sequence"), "{e}");
    let e = ssd(&full_input(&cs), Algo::Chunked(0)).unwrap_err().to_string();
    assert!(e.contains("chunk size"), "{e}");
    let bad_seq = Tensor::from_vec(vec![0u32, 0, 1, 1, 0, 2, 2, 2], (1, 8), &Device::Cpu).unwrap();
    let mut inp = full_input(&cs);
    inp.seq_idx = Some(&bad_seq);
    let e = ssd(&inp, Algo::Chunked(4)).unwrap_err().to_string();
    assert!(e.contains("non-decreasing"), "{e}");
}
