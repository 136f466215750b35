//! The RG-LRU's linear recurrence: the parallel (chunked) scan equals the sequential one, a carried state
//! equals one run, gradients equal finite differences; the bounded √ has the reference's clipped gradient.

use candle_core::{DType, Tensor, Var};
use ouro_kernels::act::sqrt_bound;
use ouro_kernels::linear_scan::{linear_scan, ScanAlgo};
use ouro_kernels::testing::{assert_close, Gen};

#[test]
fn parallel_scan_equals_sequential() {
    let mut r = Gen::new(1);
    let (b, l, w) = (2, 37, 70);
    let x = r.normal(&[b, l, w], 1.0);
    let a = r.uniform(&[b, l, w], 0.5, 1.0);
    let h0 = r.normal(&[b, w], 1.0);
    let (y, h) = linear_scan(&x, &a, Some(&h0), ScanAlgo::Sequential).unwrap();
    // Reference: the recurrence in tensor ops.
    let mut hr = h0.clone();
    let mut ys = Vec::new();
    for t in 0..l {
        hr = (a.narrow(1, t, 1).unwrap().squeeze(1).unwrap() * &hr).unwrap().add(&x.narrow(1, t, 1).unwrap().squeeze(1).unwrap()).unwrap();
        ys.push(hr.unsqueeze(1).unwrap());
    }
    assert_close(&y, &Tensor::cat(&ys, 1).unwrap(), 1e-6, "sequential vs tensor recurrence");
    for q in [1, 4, 16, 64] {
        let (yc, hc) = linear_scan(&x, &a, Some(&h0), ScanAlgo::Chunked(q)).unwrap();
        assert_close(&yc, &y, 1e-5, &format!("chunked({q})"));
        assert_close(&hc, &h, 1e-5, &format!("chunked({q}) last state"));
    }
    // Carried state: two calls equal one.
    let (y1, h1) = linear_scan(&x.narrow(1, 0, 20).unwrap(), &a.narrow(1, 0, 20).unwrap(), Some(&h0), ScanAlgo::Sequential).unwrap();
    let (y2, h2) = linear_scan(&x.narrow(1, 20, 17).unwrap(), &a.narrow(1, 20, 17).unwrap(), Some(&h1), ScanAlgo::Chunked(8)).unwrap();
    assert_close(&Tensor::cat(&[&y1, &y2], 1).unwrap(), &y, 1e-5, "split");
    assert_close(&h2, &h, 1e-5, "split state");
}

#[test]
fn gradients_match_finite_differences() {
    let mut r = Gen::new(2);
    let (b, l, w) = (1, 11, 5);
    let (x, a, h0) = (r.normal(&[b, l, w], 1.0), r.uniform(&[b, l, w], 0.3, 1.0), r.normal(&[b, w], 1.0));
    let (wy, wh) = (r.normal(&[b, l, w], 1.0), r.normal(&[b, w], 1.0));
    for algo in [ScanAlgo::Sequential, ScanAlgo::Chunked(3)] {
        let vars = [Var::from_tensor(&x).unwrap(), Var::from_tensor(&a).unwrap(), Var::from_tensor(&h0).unwrap()];
        let f = |x: &Tensor, a: &Tensor, h: &Tensor| {
            let (y, hl) = linear_scan(x, a, Some(h), algo).unwrap();
            ((y * &wy).unwrap().sum_all().unwrap() + (hl * &wh).unwrap().sum_all().unwrap()).unwrap()
        };
        let g = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor()).backward().unwrap();
        for k in 0..3 {
            let grad = g.get(vars[k].as_tensor()).unwrap();
            let dir = r.normal(grad.dims(), 1.0);
            let pred = (grad * &dir).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let eps = 1e-2;
            let shifted = |s: f64| {
                let mut v = [x.clone(), a.clone(), h0.clone()];
                v[k] = (&v[k] + (&dir * (s * eps)).unwrap()).unwrap();
                f(&v[0], &v[1], &v[2]).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
            };
            let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
            assert!((fd - pred).abs() < 2e-3 * pred.abs().max(1.0), "{algo:?} arg {k}: {fd} vs {pred}");
        }
    }
}

#[test]
fn sqrt_gradient_is_bounded() {
    let x = Var::from_tensor(&Tensor::new(&[0.0f32, 1e-9, 0.25, 4.0], &candle_core::Device::Cpu).unwrap()).unwrap();
    let y = sqrt_bound(x.as_tensor(), 1000.0).unwrap();
    assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.0, 1e-9f32.sqrt(), 0.5, 2.0]);
    let g: Vec<f32> = y.sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().to_vec1().unwrap();
    // d√x/dx = 1/(2√x), capped at 1000 (RecurrentGemma's SqrtBoundDerivative).
    assert!((g[0] - 1000.0).abs() < 1e-2 && (g[1] - 1000.0).abs() < 1e-2, "{g:?}");
    assert!((g[2] - 1.0).abs() < 1e-6 && (g[3] - 0.25).abs() < 1e-6, "{g:?}");
}
