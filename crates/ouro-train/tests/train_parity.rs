//! Whole-model training parity: three AdamW steps (with gradient clipping and weight-decay groups) of HF
//! transformers' Mamba2ForCausalLM, from scripts/fixtures/gen_train.py. Parameters after each step must
//! match within 1e-4 relative (max |ours − ref| / max |ref| per tensor); step-1 gradients within 1e-4.

use candle_core::{DType, Device, Tensor};
use ouro_kernels::testing::{assert_close, Fixture};
use ouro_nn::checkpoint::Checkpoint;
use ouro_train::data::Batch;
use ouro_train::model::Trainable;
use ouro_train::optim::AdamW;
use ouro_train::train::{batch_loss, train_step};

#[test]
fn three_adamw_steps_match_pytorch() {
    let dir = Fixture::path("train/mamba2_adamw");
    let ck = Checkpoint::open(&dir).unwrap();
    let tr = Trainable::new(ck.config.clone(), &Device::Cpu).unwrap();
    tr.load_weights(&ck).unwrap();
    let exp = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let l = ids.dim(1).unwrap() - 1;
    let batch = Batch {
        inputs: ids.narrow(1, 0, l).unwrap(),
        targets: ids.narrow(1, 1, l).unwrap(),
        weights: Tensor::ones((2, l), DType::F32, &Device::Cpu).unwrap(),
        seq_idx: None,
    };
    let mut opt = AdamW::new(tr.named_vars(), 0.9, 0.95, 1e-8, 0.1).unwrap();
    // Step-1 gradients.
    let loss = batch_loss(tr.model.as_ref(), &batch).unwrap();
    let l1 = loss.to_scalar::<f32>().unwrap();
    let want = exp["loss.1"].to_vec1::<f32>().unwrap()[0];
    assert!((l1 - want).abs() < 1e-4 * want, "loss {l1} vs {want}");
    let grads = loss.backward().unwrap();
    for (name, var) in tr.named_vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(g, &exp[&format!("grad1.{name}")], 1e-4, &format!("grad of {name}"));
    }
    for step in 1..=3 {
        let (loss, _) = train_step(tr.model.as_ref(), &mut opt, std::slice::from_ref(&batch), 1e-2, 0.5).unwrap();
        let want = exp[&format!("loss.{step}")].to_vec1::<f32>().unwrap()[0] as f64;
        assert!((loss - want).abs() < 1e-4 * want, "step {step} loss {loss} vs {want}");
        if step == 1 || step == 3 {
            for (name, var) in tr.named_vars() {
                assert_close(var.as_tensor(), &exp[&format!("step{step}.{name}")], 1e-4, &format!("{name} after step {step}"));
            }
        }
    }
}
