//! Caduceus: parity with the reference (`scripts/fixtures/gen_bidir.py`: CaduceusForMaskedLM semantics with HF
//! transformers' MambaMixer as each direction), and reverse-complement equivariance at every level — embedding,
//! block, whole model, LM head — max abs difference ≤ 1e-5 in f32, for random weights. (Equivariance after
//! training is checked in ouro-train's tests, on a model trained by `ouro train`.)

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ouro_kernels::testing::{assert_close, Fixture, Gen};
use ouro_nn::caduceus::{rc_hidden, Caduceus, CaduceusConfig};
use ouro_nn::checkpoint::Checkpoint;
use ouro_nn::lm::{load, LanguageModel};

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn matches_reference_checkpoints() {
    for (name, tol) in [("bidir/caduceus_bimamba", 1e-4), ("bidir/caduceus_ps", 1e-4)] {
        let ck = Checkpoint::open(Fixture::path(name)).unwrap();
        let exp = Fixture::load(&format!("{name}/expected.safetensors"));
        let ids = exp.get("input_ids").to_dtype(DType::U32).unwrap();
        // Through the generic loader (config detection) ...
        let m = load(&ck, &Device::Cpu).unwrap();
        assert!(m.info().architecture.starts_with("caduceus"));
        assert_close(&m.forward(&ids, None, None).unwrap(), &exp.get("logits"), tol, &format!("{name} logits"));
        // ... and directly, for the classifier features and the reverse complement.
        let c = Caduceus::load(&ck, DType::F32, &Device::Cpu).unwrap();
        assert_close(&c.features(&ids).unwrap(), &exp.get("features"), tol, &format!("{name} features"));
        assert_close(&c.forward(&c.rc_ids(&ids).unwrap(), None, None).unwrap(), &exp.get("logits_rc"), tol, &format!("{name} rc logits"));
    }
}

fn random_ps(seed: u64, strategy: &str) -> Caduceus {
    let cfg: CaduceusConfig = serde_json::from_value(serde_json::json!({
        "d_model": 24, "n_layer": 3, "vocab_size": 12, "rcps": true, "bidirectional_strategy": strategy,
        "ssm_cfg": {"d_state": 8, "d_conv": 4, "expand": 2}
    }))
    .unwrap();
    let vm = VarMap::new();
    let m = Caduceus::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let mut g = Gen::new(seed);
    for (name, v) in ouro_nn::checkpoint::named_vars(&vm) {
        let t = if name.ends_with("A_log") {
            g.uniform(v.dims(), -0.5, 1.5)
        } else if name.ends_with("dt_proj.bias") {
            g.uniform(v.dims(), -4.0, -2.0)
        } else {
            g.normal(v.dims(), 0.5)
        };
        v.set(&t).unwrap();
    }
    m
}

/// rc of token ids, (b, l).
fn rc_ids(m: &Caduceus, ids: &Tensor) -> Tensor {
    m.rc_ids(ids).unwrap()
}

/// flip over length and map the vocabulary axis through the complement: what logits(rc(x)) must equal.
fn rc_logits(m: &Caduceus, logits: &Tensor) -> Tensor {
    let c = Tensor::new(m.complement(), &Device::Cpu).unwrap();
    logits.flip(&[1]).unwrap().index_select(&c, 2).unwrap()
}

#[test]
fn rcps_is_reverse_complement_equivariant_at_every_level() {
    for strategy in ["add", "ew_multiply"] {
        let m = random_ps(3, strategy);
        let ids: Vec<u32> = (0..2 * 41).map(|i| [7u32, 8, 9, 10, 11, 7, 9][(i * 5 + i / 3) % 7]).collect();
        let ids = Tensor::from_vec(ids, (2, 41), &Device::Cpu).unwrap();
        let rc = rc_ids(&m, &ids);
        // rc is an involution on ids.
        assert_eq!(rc_ids(&m, &rc).to_vec2::<u32>().unwrap(), ids.to_vec2::<u32>().unwrap());
        // Embedding.
        let e = m.embed(&ids).unwrap();
        let err = max_abs(&m.embed(&rc).unwrap(), &rc_hidden(&e).unwrap());
        assert!(err <= 1e-5, "{strategy}: embedding: {err}");
        // One block, with and without a residual stream.
        let h = Gen::new(4).normal(&[2, 41, 48], 1.0);
        let r = Gen::new(5).normal(&[2, 41, 48], 1.0);
        for (i, res) in [(0, None), (1, Some(&r))] {
            let (y, yr) = m.block(i, &h, res).unwrap();
            let rres = res.map(|r| rc_hidden(r).unwrap());
            let (y2, yr2) = m.block(i, &rc_hidden(&h).unwrap(), rres.as_ref()).unwrap();
            let err = max_abs(&y2, &rc_hidden(&y).unwrap()).max(max_abs(&yr2, &rc_hidden(&yr).unwrap()));
            assert!(err <= 1e-5, "{strategy}: block {i}: {err}");
        }
        // Whole model (hidden states).
        let hs = m.hidden(&ids).unwrap();
        let err = max_abs(&m.hidden(&rc).unwrap(), &rc_hidden(&hs).unwrap());
        assert!(err <= 1e-5, "{strategy}: model: {err}");
        // LM head on arbitrary hidden states, and end to end.
        let err = max_abs(&m.logits(&rc_hidden(&h).unwrap()).unwrap(), &rc_logits(&m, &m.logits(&h).unwrap()));
        assert!(err <= 1e-5, "{strategy}: LM head: {err}");
        let lg = m.forward(&ids, None, None).unwrap();
        let err = max_abs(&m.forward(&rc, None, None).unwrap(), &rc_logits(&m, &lg));
        assert!(err <= 1e-5, "{strategy}: logits: {err}");
        // The classifier features of rc(x) are those of x with the two strands swapped (so a pooled, strand-
        // averaged classifier is RC-invariant).
        let f = m.features(&ids).unwrap();
        let frc = m.features(&rc).unwrap();
        let err = max_abs(&frc.i((.., .., .., 0)).unwrap(), &f.i((.., .., .., 1)).unwrap()).max(max_abs(&frc.i((.., .., .., 1)).unwrap(), &f.i((.., .., .., 0)).unwrap()));
        assert!(err <= 1e-5, "{strategy}: features: {err}");
    }
}

#[test]
fn bimamba_is_bidirectional_and_ties_projections() {
    let cfg: CaduceusConfig = serde_json::from_value(serde_json::json!({
        "d_model": 16, "n_layer": 2, "vocab_size": 12, "ssm_cfg": {"d_state": 8}
    }))
    .unwrap();
    let vm = VarMap::new();
    let m = Caduceus::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let mut g = Gen::new(9);
    for (name, v) in ouro_nn::checkpoint::named_vars(&vm) {
        v.set(&if name.ends_with("dt_proj.bias") { g.uniform(v.dims(), -3.0, -1.0) } else { g.normal(v.dims(), 0.5) }).unwrap();
    }
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    assert!(names.iter().any(|n| n.contains("mamba_rev.conv1d")), "reverse direction has its own conv");
    assert!(!names.iter().any(|n| n.contains("mamba_rev.in_proj") || n.contains("mamba_rev.out_proj")), "tied projections are stored once: {names:?}");
    // Changing the last token changes the first position's output (the reverse direction sees it).
    let a = Tensor::new(&[[7u32, 8, 9, 10, 7, 8]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[7u32, 8, 9, 10, 7, 10]], &Device::Cpu).unwrap();
    let d = max_abs(&m.hidden(&a).unwrap().narrow(1, 0, 1).unwrap(), &m.hidden(&b).unwrap().narrow(1, 0, 1).unwrap());
    assert!(d > 1e-4, "first position does not see the last token: {d}");
}
