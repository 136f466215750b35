//! Every matrix mixer's fast forward equals its materialised L×L matrix times the input (f32, 1e-4), in the
//! data-independent and the sequence-aligned (data-dependent) forms.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use ouro_kernels::testing::{assert_close, Gen};

mod common;
use common::randomize;
use ouro_nn::matrix_mixer::{MatrixMixer, MatrixMixerConfig, MixerKind};

#[test]
fn fast_forward_equals_materialized_matrix() {
    let kinds = [
        (MixerKind::Dense, false),
        (MixerKind::Toeplitz, false),
        (MixerKind::Toeplitz, true),
        (MixerKind::Vandermonde, false),
        (MixerKind::Vandermonde, true),
        (MixerKind::Cauchy, false),
        (MixerKind::Cauchy, true),
        (MixerKind::LowRank, false),
        (MixerKind::LowRank, true),
        (MixerKind::Attention, false),
        (MixerKind::Attention, true),
        (MixerKind::Semiseparable, false),
        (MixerKind::Semiseparable, true),
        (MixerKind::Quasiseparable, false),
        (MixerKind::Quasiseparable, true),
    ];
    let (b, l) = (2, 12);
    for (i, (kind, dd)) in kinds.into_iter().enumerate() {
        let cfg = MatrixMixerConfig { kind, data_dependent: dd, d_model: 8, qk_dim: 4, max_seq_len: l, d_conv: 7, expand: 2, headdim: 8 };
        let vm = VarMap::new();
        let mixer = MatrixMixer::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        randomize(&vm, i as u64);
        let u = Gen::new(100 + i as u64).normal(&[b, l, 8], 1.0);
        let (_, m) = mixer.prepare(&u).unwrap();
        let fast = mixer.mix(&m).unwrap(); // (b, L, n, h)
        let mat = mixer.matrix(&m).unwrap(); // (b|1, n, L, L)
        let v = m.v.permute((0, 2, 1, 3)).unwrap().contiguous().unwrap();
        let slow = mat.broadcast_matmul(&v).unwrap().permute((0, 2, 1, 3)).unwrap();
        assert_close(&fast, &slow, 1e-4, &format!("{kind:?} (data-dependent: {dd})"));
        // And the whole layer runs.
        assert_eq!(mixer.forward(&u).unwrap().dims(), &[b, l, 8]);
    }
}
