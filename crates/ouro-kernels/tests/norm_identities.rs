//! The fused CPU gated RMSNorm equals its candle-ops reference, forward and gradients, for every gate order
//! and grouping (the fixture in parity.rs covers three of these against PyTorch).

use candle_core::Var;
use ouro_kernels::norm::{gated_rms_norm, gated_rms_norm_reference};
use ouro_kernels::testing::{assert_close, Gen};

#[test]
fn fused_norm_equals_reference() {
    let mut r = Gen::new(1);
    for (gated, before, gs) in [(true, true, Some(4)), (true, false, Some(8)), (true, true, None), (false, false, Some(6)), (false, false, None)] {
        let x = Var::from_tensor(&r.normal(&[3, 5, 24], 1.0)).unwrap();
        let z = Var::from_tensor(&r.normal(&[3, 5, 24], 1.5)).unwrap();
        let w = Var::from_tensor(&r.normal(&[24], 1.0)).unwrap();
        let wy = r.normal(&[3, 5, 24], 1.0);
        let zt = gated.then(|| z.as_tensor());
        let what = format!("gated={gated} before_gate={before} group={gs:?}");
        let y = gated_rms_norm(x.as_tensor(), zt, w.as_tensor(), 1e-5, gs, before).unwrap();
        let y_ref = gated_rms_norm_reference(x.as_tensor(), zt, w.as_tensor(), 1e-5, gs, before).unwrap();
        assert_close(&y, &y_ref, 1e-6, &format!("{what} y"));
        let g = (y * &wy).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &wy).unwrap().sum_all().unwrap().backward().unwrap();
        let mut vars = vec![("x", &x), ("w", &w)];
        if gated {
            vars.push(("z", &z));
        }
        for (name, v) in vars {
            assert_close(g.get(v.as_tensor()).unwrap(), g_ref.get(v.as_tensor()).unwrap(), 1e-5, &format!("{what} d{name}"));
        }
    }
}
