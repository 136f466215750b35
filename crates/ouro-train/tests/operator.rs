//! Neural operators learn KS trajectories: training lowers the loss, the rollout beats persistence, and a saved
//! model scores the same after loading.

use candle_core::{Device, Tensor};
use ouro_nn::fno::{nrmse, OperatorConfig, OperatorKind};
use ouro_train::operator::{train, TrainOptions, TrainedOperator, Trajectories};
use ouro_train::pde::{generate, Equation, GenerateOptions};

fn ks(samples: usize, seed: u64) -> Trajectories {
    let mut o = GenerateOptions::new(Equation::KuramotoSivashinsky, 0.1, samples, vec![16]);
    o.grid = 64;
    o.frames = 8;
    o.t_end = 0.7;
    o.seed = seed;
    let d = generate(&o, &mut |_| {}).unwrap();
    let u = Tensor::from_vec(d.fields[0].1.clone(), (samples, 8, 16), &Device::Cpu).unwrap();
    Trajectories { u, resolution: 16, meta: Default::default() }
}

#[test]
fn operators_learn_and_round_trip() {
    let (tr, te) = (ks(48, 1), ks(8, 2));
    // Persistence (u_t = u_0 for every t): the baseline a useful model must beat.
    let persist = te.u.narrow(1, 0, 1).unwrap().broadcast_as(te.u.shape()).unwrap().contiguous().unwrap();
    let base = nrmse(&persist, &te.u, 1).unwrap();
    for kind in [OperatorKind::Ffno, OperatorKind::Memno] {
        let cfg = OperatorConfig { width: 16, modes: 6, layers: 2, memory_after: 1, d_state: 8, projection: 32, ..OperatorConfig::new(kind) };
        let o = TrainOptions { epochs: 30, batch_size: 8, lr: 3e-3, eval_every: 30, progress: false, ..Default::default() };
        let mut losses = Vec::new();
        let m = train(cfg, &tr, &te, &o, &Device::Cpu, &mut |_| {}, &mut |e| {
            losses.push(e.train_loss);
            Ok(())
        })
        .unwrap();
        assert!(losses[29] < 0.2 * losses[0], "{kind:?}: loss {} → {}", losses[0], losses[29]);
        let s = m.score(&te, &Device::Cpu).unwrap();
        assert!(s.rollout_nrmse < 0.5 * base, "{kind:?}: rollout nRMSE {} vs persistence {base}", s.rollout_nrmse);
        assert!(s.one_step_nrmse <= s.rollout_nrmse + 1e-6, "{kind:?}: one step {} vs rollout {}", s.one_step_nrmse, s.rollout_nrmse);
        let dir = std::env::temp_dir().join(format!("ouro-op-{kind:?}-{}", std::process::id()));
        m.save(&dir).unwrap();
        let back = TrainedOperator::load(&dir, &Device::Cpu).unwrap().score(&te, &Device::Cpu).unwrap();
        assert_eq!((back.rollout_nrmse, back.one_step_nrmse), (s.rollout_nrmse, s.one_step_nrmse));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
