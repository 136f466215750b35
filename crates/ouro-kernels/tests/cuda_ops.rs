//! The CUDA kernels of the selective scan, conv1d, gated RMSNorm, the linear recurrence (RG-LRU) and the fused Mamba-2 decode step against
//! the CPU implementation, forward and gradients, on random inputs; outputs poisoned with NaN before each
//! run (every element must be written). f32 throughout: tolerance 1e-4 relative. Skips without a device.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use ouro_kernels::testing::{rel_err, Gen};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| std::env::set_var("OURO_CUDA_POISON", "1"));
            Some(d)
        }
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

const TOL: f32 = 1e-4;

/// Runs `f` on `inputs` (moved to `dev`, as variables) and returns its outputs followed by the gradients of
/// Σ_k ⟨output_k, w_k⟩ (fixed random w_k) with respect to every input, all on the CPU.
fn outputs_and_grads(dev: &Device, inputs: &[Tensor], seed: u64, f: &dyn Fn(&[Tensor]) -> Vec<Tensor>) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let outs = f(&ts);
    let mut r = Gen::new(seed);
    let mut loss = Tensor::zeros((), DType::F32, dev).unwrap();
    for o in &outs {
        let w = r.normal(o.dims(), 1.0).to_device(dev).unwrap();
        loss = (loss + o.to_dtype(DType::F32).unwrap().mul(&w).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    let mut all = outs;
    for v in &vars {
        all.push(grads.get(v.as_tensor()).cloned().unwrap_or_else(|| v.as_tensor().zeros_like().unwrap()));
    }
    all.into_iter().map(|t| t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap()).collect()
}

fn check(what: &str, names: &[&str], inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Vec<Tensor>) {
    let Some(dev) = cuda() else { return };
    let want = outputs_and_grads(&Device::Cpu, inputs, 99, f);
    let got = outputs_and_grads(&dev, inputs, 99, f);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = rel_err(g, w);
        let name = names.get(i).copied().unwrap_or("?");
        eprintln!("{what}: {name} rel err {e:.2e}");
        assert!(e < TOL, "{what}: {name}: relative error {e} (tolerance {TOL})");
    }
}

fn seq_idx(b: usize, l: usize, cuts: &[usize], dev: &Device) -> Tensor {
    let ids: Vec<u32> = (0..b * l).map(|i| cuts.iter().filter(|&&c| i % l >= c).count() as u32 + (i / l) as u32).collect();
    Tensor::from_vec(ids, (b, l), dev).unwrap()
}

/// Mamba-1's selective scan with every option: D, z, delta bias + softplus, groups, initial state, and
/// (when `docs`) document boundaries.
fn selective_scan_case(b: usize, l: usize, d: usize, n: usize, g: usize, docs: bool) {
    let mut r = Gen::new((b * 1000 + l * 10 + n) as u64);
    let inputs = vec![
        r.normal(&[b, l, d], 1.0),          // u
        r.normal(&[b, l, d], 0.5),          // delta
        r.uniform(&[d, n], -2.0, -0.1),     // A
        r.normal(&[b, l, g, n], 1.0),       // B
        r.normal(&[b, l, g, n], 1.0),       // C
        r.normal(&[d], 1.0),                // D
        r.normal(&[b, l, d], 1.0),          // z
        r.uniform(&[d], -1.0, 0.5),         // delta_bias
        r.normal(&[b, d, n], 0.5),          // initial state
    ];
    let cuts = [l / 3, l / 3 + 1, 2 * l / 3];
    let f = move |t: &[Tensor]| {
        let si = docs.then(|| seq_idx(b, l, &cuts, t[0].device()));
        let mut inp = ouro_kernels::selective_scan::ScanInput::new(&t[0], &t[1], &t[2], &t[3], &t[4]);
        inp.d = Some(&t[5]);
        inp.z = Some(&t[6]);
        inp.delta_bias = Some(&t[7]);
        inp.delta_softplus = true;
        inp.initial_state = Some(&t[8]);
        inp.seq_idx = si.as_ref();
        let (y, last) = ouro_kernels::selective_scan::selective_scan(&inp).unwrap();
        vec![y, last]
    };
    let names = ["y", "last state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dh0"];
    check(&format!("selective scan b{b} l{l} d{d} n{n} g{g} docs {docs}"), &names, &inputs, &f);
}

#[test]
fn selective_scan_mamba_sizes() {
    // d_state 16: 16 lanes per channel, 8 channels per block; 2 groups of 48 channels (block-level sums).
    selective_scan_case(2, 100, 96, 16, 2, false);
}

#[test]
fn selective_scan_odd_state_many_groups_documents() {
    // d_state 7 on 8 lanes (one idle), 5 channels per group (per-thread sums), document boundaries, l not a
    // multiple of the checkpoint interval.
    selective_scan_case(2, 77, 20, 7, 4, true);
}

#[test]
fn selective_scan_large_state_one_group() {
    // d_state 64: 2 states per lane of a full warp; partial last block (d = 10).
    selective_scan_case(1, 65, 10, 64, 1, false);
}

fn conv_case(b: usize, l: usize, c: usize, k: usize, bias: bool, state: bool, docs: bool) {
    let mut r = Gen::new((b + l + c + k) as u64);
    let mut inputs = vec![r.normal(&[b, l, c], 1.0), r.normal(&[c, 1, k], 0.5), r.normal(&[c], 1.0)];
    if state {
        inputs.push(r.normal(&[b, k - 1, c], 1.0));
    }
    let cuts = [3, l / 2];
    let f = move |t: &[Tensor]| {
        let si = docs.then(|| seq_idx(b, l, &cuts, t[0].device()));
        let y = ouro_kernels::conv::causal_conv1d(&t[0], &t[1], bias.then_some(&t[2]), t.get(3), si.as_ref()).unwrap();
        vec![y]
    };
    check(&format!("conv1d b{b} l{l} c{c} k{k} bias {bias} state {state} docs {docs}"), &["y", "dx", "dweight", "dbias", "dstate"], &inputs, &f);
}

#[test]
fn conv1d_forward_and_gradients() {
    conv_case(2, 50, 70, 4, true, true, false);
    conv_case(2, 33, 40, 4, false, false, true);
    conv_case(3, 9, 5, 3, true, true, true);
    conv_case(1, 20, 8, 1, true, false, false);
}

fn norm_case(rows: usize, d: usize, group: Option<usize>, gated: bool, before: bool) {
    let mut r = Gen::new((rows + d) as u64);
    let inputs = vec![r.normal(&[rows, d], 1.0), r.normal(&[rows, d], 1.0), r.normal(&[d], 1.0)];
    let f = move |t: &[Tensor]| vec![ouro_kernels::norm::gated_rms_norm(&t[0], gated.then_some(&t[1]), &t[2], 1e-5, group, before).unwrap()];
    check(&format!("rms norm rows {rows} d {d} group {group:?} gated {gated} before {before}"), &["y", "dx", "dz", "dw"], &inputs, &f);
}

#[test]
fn gated_rms_norm_forward_and_gradients() {
    norm_case(37, 256, Some(64), true, false); // Mamba-2 order, groups of whole warps
    norm_case(20, 96, Some(24), true, true); // Hydra order, groups inside warps
    norm_case(50, 300, None, false, false); // plain RMSNorm, d not a multiple of the block
    norm_case(3, 1024, None, true, false);
}

/// The fused decode step against the composed candle ops on the CPU, over three steps (states fed back).
fn decode_case(b: usize, h: usize, p: usize, g: usize, n: usize, k: usize, per_channel_d: bool, dt_limit: (f64, f64)) {
    let Some(dev) = cuda() else { return };
    use ouro_kernels::decode::{mamba2_step, StepInput};
    use ouro_kernels::ssd::XbcShape;
    let shape = XbcShape { heads: h, head_dim: p, groups: g, d_state: n };
    let cd = h * p + 2 * g * n;
    let mut r = Gen::new((b * h + p + n) as u64);
    let w = r.normal(&[cd, 1, k], 0.5);
    let cb = r.normal(&[cd], 0.5);
    let a = r.uniform(&[h], -2.0, -0.3);
    let dtb = r.uniform(&[h], -1.0, 0.5);
    let d = if per_channel_d { r.normal(&[h, p], 1.0) } else { r.normal(&[h], 1.0) };
    let conv0 = r.normal(&[b, k - 1, cd], 1.0);
    let ssm0 = r.normal(&[b, h, p, n], 0.5);
    let tokens: Vec<(Tensor, Tensor)> = (0..3).map(|_| (r.normal(&[b, cd], 1.0), r.normal(&[b, h], 1.0))).collect();
    let run = |dev: &Device| {
        let m = |t: &Tensor| t.to_device(dev).unwrap();
        let (w, cb, a, dtb, d) = (m(&w), m(&cb), m(&a), m(&dtb), m(&d));
        let (mut conv, mut ssm) = (m(&conv0), m(&ssm0));
        let mut ys = Vec::new();
        for (xbc, dt) in &tokens {
            let (xbc, dt) = (m(xbc), m(dt));
            let (y, c2, s2) = mamba2_step(&StepInput { conv_state: &conv, xbc: &xbc, conv_weight: &w, conv_bias: Some(&cb), ssm: &ssm, dt: &dt, a: &a, dt_bias: &dtb, d: &d, dt_limit, shape }).unwrap();
            ys.push(y.to_device(&Device::Cpu).unwrap());
            (conv, ssm) = (c2, s2);
        }
        ys.push(conv.to_device(&Device::Cpu).unwrap());
        ys.push(ssm.to_device(&Device::Cpu).unwrap());
        ys
    };
    let (want, got) = (run(&Device::Cpu), run(&dev));
    for (i, (gt, wt)) in got.iter().zip(&want).enumerate() {
        let e = rel_err(gt, wt);
        eprintln!("decode b{b} h{h} p{p} g{g} n{n} k{k}: output {i} rel err {e:.2e}");
        assert!(e < TOL, "decode output {i}: relative error {e}");
    }
}

#[test]
fn decode_step_fused_matches_the_cpu() {
    decode_case(3, 8, 64, 2, 128, 4, false, (0.0, f64::INFINITY));
    decode_case(2, 4, 12, 1, 20, 4, true, (0.001, 0.1));
    decode_case(5, 6, 16, 3, 64, 2, false, (0.0, f64::INFINITY));
}

#[test]
fn linear_scan_forward_and_gradients() {
    // h_t = a_t ⊙ h_{t−1} + x_t (Hawk/Griffin's RG-LRU): a thread per channel, 8 steps' loads at a time. Lengths
    // not a multiple of 8 and shorter than 8, channels over more than one block of 128 and fewer than a block.
    for (b, l, w) in [(2, 77, 200), (1, 5, 3), (3, 64, 130)] {
        let mut r = Gen::new((b * 100 + l + w) as u64);
        let inputs = vec![r.normal(&[b, l, w], 1.0), r.uniform(&[b, l, w], 0.5, 0.999), r.normal(&[b, w], 1.0)];
        let f = |t: &[Tensor]| {
            let (y, last) = ouro_kernels::linear_scan::linear_scan(&t[0], &t[1], Some(&t[2]), ouro_kernels::linear_scan::ScanAlgo::Sequential).unwrap();
            vec![y, last]
        };
        check(&format!("linear scan b{b} l{l} w{w}"), &["y", "last state", "dx", "da", "dh0"], &inputs, &f);
    }
}
