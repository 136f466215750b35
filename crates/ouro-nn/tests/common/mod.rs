//! Shared by the mixer tests: random parameters in the ranges an SSM is trained in.

use candle_nn::VarMap;
use ouro_kernels::testing::Gen;

/// Overwrites every variable: A_log ~ U(−0.5, 0.5), dt_bias ~ U(−3, −1) (softplus ≈ 0.05–0.3), scalar
/// biases ~ U(0.3, 0.7) (Cauchy's offset, kept away from its poles), everything else N(0, 0.4²).
pub fn randomize(vm: &VarMap, seed: u64) {
    let mut r = Gen::new(seed);
    for (name, v) in ouro_nn::checkpoint::named_vars(vm) {
        let t = if name.ends_with("A_log") {
            r.uniform(v.dims(), -0.5, 0.5)
        } else if name.ends_with("dt_bias") {
            r.uniform(v.dims(), -3.0, -1.0)
        } else if name.ends_with("bias") && v.rank() == 0 {
            r.uniform(&[1], 0.3, 0.7).reshape(()).unwrap()
        } else {
            r.normal(v.dims(), 0.4)
        };
        v.set(&t).unwrap();
    }
}
