//! The CPU inference engine against the HF reference logits (fixtures from scripts/fixtures/gen_lm.py)
//! and against itself: prefill in blocks == token-by-token steps, batched steps == single steps,
//! quantised checkpoints written and read back, and Q8_0 / Q4_0 / f16 logits close to f32.

use candle_core::{DType, Device, Tensor};
use ouro_kernels::quant::Format;
use ouro_kernels::testing::Fixture;
use ouro_nn::engine::{quantize_checkpoint, Mamba2Engine, PREFILL_BLOCK};

fn case(name: &str) -> std::path::PathBuf {
    Fixture::path("lm").join(name)
}

/// The engine with f32 products everywhere (bf16 matmuls are tested separately against it).
fn load(path: &std::path::Path, fmt: Format) -> Mamba2Engine {
    let mut e = Mamba2Engine::load(path, fmt).unwrap();
    e.bf16_matmul = false;
    e
}

/// (ids (b, l), logits (b, l, v), decode_logits (b, l, v): prefill of 8 then steps) of a fixture.
fn reference(name: &str) -> (Vec<Vec<u32>>, Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<f32>>>) {
    let exp = candle_core::safetensors::load(case(name).join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
    (ids, f(&exp["logits"]), f(&exp["decode_logits"]))
}

/// max |a − b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / m
}

/// ‖a − b‖₂ / ‖b‖₂.
fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    (d / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
}

/// Decodes every row of `ids` together (batch = rows): prefill of the first `pre` tokens per row,
/// then batched steps; returns per-row logits at every position ≥ pre − 1.
fn run(engine: &Mamba2Engine, ids: &[Vec<u32>], pre: usize) -> Vec<Vec<Vec<f32>>> {
    let b = ids.len();
    let mut st = engine.new_state(b);
    let mut out: Vec<Vec<Vec<f32>>> = ids.iter().enumerate().map(|(i, row)| vec![engine.prefill(&row[..pre], &mut st, i).unwrap()]).collect();
    let mut ws = engine.workspace(b);
    for t in pre..ids[0].len() {
        let toks: Vec<u32> = ids.iter().map(|r| r[t]).collect();
        engine.step(&toks, &mut st, &mut ws).unwrap();
        for (i, o) in out.iter_mut().enumerate() {
            o.push(ws.logits[i * engine.vocab..(i + 1) * engine.vocab].to_vec());
        }
    }
    out
}

fn check_against_reference(name: &str) {
    let engine = load(&case(name), Format::F32);
    let (ids, logits, decode) = reference(name);
    let l = ids[0].len();
    for pre in [1, 8, l] {
        let got = run(&engine, &ids, pre);
        for (b, rows) in got.iter().enumerate() {
            // Position pre − 1 (prefill's last logits) and every stepped position after it.
            for (j, row) in rows.iter().enumerate() {
                let pos = pre - 1 + j;
                // HF's full forward, and HF's own prefill-8 + steps (the same logits up to rounding).
                for (what, want) in [("forward", &logits[b][pos]), ("decode", &decode[b][pos])] {
                    let e = rel(row, want);
                    assert!(e <= 1e-4, "{name}: prefill {pre}, row {b}, position {pos}: relative error {e:.2e} vs HF {what}");
                }
            }
        }
    }
}

#[test]
fn f32_logits_match_hf_mamba2() {
    check_against_reference("mamba2_hf");
}

#[test]
fn f32_logits_match_hf_mamba2_with_groups_and_dt_limit() {
    check_against_reference("mamba2_g2");
}

#[test]
fn prefill_in_blocks_equals_steps() {
    let engine = load(&case("mamba2_g2"), Format::F32);
    let n = PREFILL_BLOCK + 37;
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % engine.vocab as u32).collect();
    let mut st = engine.new_state(1);
    let prefilled = engine.prefill(&ids, &mut st, 0).unwrap();
    let mut st2 = engine.new_state(1);
    let mut ws = engine.workspace(1);
    for &t in &ids {
        engine.step(&[t], &mut st2, &mut ws).unwrap();
    }
    let e = rel(&prefilled, &ws.logits);
    assert!(e <= 1e-4, "prefill of {n} tokens vs {n} steps: {e:.2e}");
    assert!(rel(&st.ssm, &st2.ssm) <= 1e-4 && rel(&st.conv, &st2.conv) <= 1e-5, "states differ");
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ouro-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn f32_logits_match_hf_mamba2_block_widths() {
    check_against_reference("mamba2_q");
}

/// Every position's logits of the fixture's 2 rows, prefill 8 + steps, flattened.
fn flat(rows: &[Vec<Vec<f32>>]) -> Vec<f32> {
    rows.iter().flatten().flatten().copied().collect()
}

#[test]
fn quantized_logits_match_the_reference_and_stay_close_to_f32() {
    // mamba2_q: every linear weight is whole 32-weight blocks. The fixture holds HF's logits with each
    // 2-D weight replaced by ggml's Q8_0 / Q4_0 round trip (scripts/fixtures/gen_lm.py).
    let exp = candle_core::safetensors::load(case("mamba2_q").join("expected.safetensors"), &Device::Cpu).unwrap();
    let (ids, logits, _) = reference("mamba2_q");
    let pre = 8;
    // Reference rows at positions pre − 1 .. l, in run()'s order.
    let pick = |t: &[Vec<Vec<f32>>]| -> Vec<f32> { t.iter().flat_map(|r| r[pre - 1..].iter().flatten().copied()).collect() };
    let f32_ref = pick(&logits);
    let f32_ours = flat(&run(&load(&case("mamba2_q"), Format::F32), &ids, pre));
    for fmt in [Format::F16, Format::Q8_0, Format::Q4_0] {
        let engine = load(&case("mamba2_q"), fmt);
        assert_eq!(engine.formats(), (fmt, fmt));
        let got = run(&engine, &ids, pre);
        let ours = flat(&got);
        let vs_f32 = rel_l2(&ours, &f32_ours);
        eprintln!("{}: logits vs f32, relative L2 {vs_f32:.4}", fmt.name());
        match fmt {
            // The fixture's weights are bf16 values, which f16 holds exactly.
            Format::F16 => assert!(vs_f32 <= 1e-5, "f16: {vs_f32}"),
            _ => {
                let want = pick(&exp[&format!("logits_{}", fmt.name())].to_vec3::<f32>().unwrap());
                for (i, (a, b)) in ours.chunks(engine.vocab).zip(want.chunks(engine.vocab)).enumerate() {
                    let e = rel(a, b);
                    assert!(e <= 1e-4, "{}: position {i}: {e:.2e} from HF on the ggml-rounded weights", fmt.name());
                }
            }
        }
        if fmt == Format::Q8_0 {
            assert!(vs_f32 > 0.0 && vs_f32 <= 0.02, "q8_0 logits {vs_f32} from f32 (goal: within 2%)");
        }
    }
    assert!(rel(&f32_ours, &f32_ref) <= 1e-4);
}

#[test]
fn quantized_checkpoint_round_trips_and_loads_everywhere() {
    let out = tmp("q8");
    let sum = quantize_checkpoint(&case("mamba2_q"), Format::Q8_0, &out).unwrap();
    assert!(sum.quantized >= 5 && sum.bytes_out < sum.bytes_in * 2, "{sum:?}");
    assert!(out.join("model.gguf").exists() && out.join("config.json").exists());
    // The engine reads the stored blocks: the same logits as quantising on load.
    let (ids, _, _) = reference("mamba2_q");
    let a = run(&load(&out, Format::F32), &ids, 8);
    let b = run(&load(&case("mamba2_q"), Format::Q8_0), &ids, 8);
    assert_eq!(a, b);
    // Every other command loads it through the generic checkpoint reader (dequantised to f32).
    let ck = ouro_nn::checkpoint::Checkpoint::open(&out).unwrap();
    let model = ouro_nn::lm::load(&ck, &Device::Cpu).unwrap();
    let idt = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
    let logits = model.forward(&idt, None, None).unwrap().to_vec3::<f32>().unwrap();
    for (bi, rows) in a.iter().enumerate() {
        let e = rel(&rows[0], &logits[bi][7]);
        assert!(e <= 1e-4, "generic model on the quantised checkpoint vs engine: {e}");
    }
    // Refuses to overwrite; bad input is named.
    assert!(quantize_checkpoint(&case("mamba2_q"), Format::Q8_0, &out).unwrap_err().to_string().contains("already exists"));
    std::fs::write(out.join("model.gguf"), b"not gguf").unwrap();
    let err = Mamba2Engine::load(&out, Format::F32).err().unwrap().to_string();
    assert!(err.contains("model.gguf") && err.contains("GGUF"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn engine_rejects_what_it_cannot_run() {
    let err = Mamba2Engine::load(&case("mamba2_hybrid_ssm"), Format::F32).err().unwrap().to_string();
    assert!(err.contains("pure Mamba-2"), "{err}");
    let err = Mamba2Engine::load(&case("mamba_hf"), Format::F32).err().unwrap().to_string();
    assert!(err.contains("Mamba-2"), "{err}");
    let engine = load(&case("mamba2_g2"), Format::F32);
    let mut st = engine.new_state(1);
    assert!(engine.prefill(&[], &mut st, 0).is_err());
    let err = engine.prefill(&[engine.vocab as u32], &mut st, 0).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let mut ws = engine.workspace(2);
    assert!(engine.step(&[1], &mut st, &mut ws).is_err());
}

#[test]
fn state_is_constant_in_context_length() {
    let engine = load(&case("mamba2_g2"), Format::F32);
    let mut st = engine.new_state(1);
    let before = st.bytes();
    let mut ws = engine.workspace(1);
    let ptrs = (st.ssm.as_ptr(), ws.logits.as_ptr());
    for t in 0..300u32 {
        engine.step(&[t % 100], &mut st, &mut ws).unwrap();
    }
    assert_eq!(st.bytes(), before);
    assert_eq!(st.bytes(), 4 * engine.state_floats());
    assert_eq!((st.ssm.as_ptr(), ws.logits.as_ptr()), ptrs, "buffers were reallocated while decoding");
}

/// ‖logits − f32 logits‖₂ / ‖f32 logits‖₂ of the mamba2_q engine with `tweak` applied, decoding `rows`
/// (prefill of 8, then batched steps).
fn rel_l2_from_f32(rows: &[Vec<u32>], tweak: impl FnOnce(&mut Mamba2Engine)) -> f32 {
    let exact = flat(&run(&load(&case("mamba2_q"), Format::F32), rows, 8));
    let mut e = load(&case("mamba2_q"), Format::F32);
    tweak(&mut e);
    rel_l2(&flat(&run(&e, rows, 8)), &exact)
}

#[test]
fn bf16_matmuls_stay_close_to_f32() {
    if !ouro_kernels::bf16::available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16 (the engine uses f32 products there)");
        return;
    }
    // 16 sequences: prefill and batched steps both take the bf16 path.
    let (ids, _, _) = reference("mamba2_q");
    let rows: Vec<Vec<u32>> = (0..16).map(|i| ids[i % 2].iter().map(|&t| (t + i as u32 * 3) % 256).collect()).collect();
    let err = rel_l2_from_f32(&rows, |e| e.bf16_matmul = true);
    eprintln!("bf16 matmuls: logits vs f32, relative L2 {err:.4}");
    assert!(err > 0.0 && err <= 0.01, "bf16 logits {err} from f32");
}

#[test]
fn bf16_state_stays_close_to_f32() {
    let (ids, _, _) = reference("mamba2_q");
    let mut e = load(&case("mamba2_q"), Format::F32);
    e.state_bf16 = true;
    let st = e.new_state(2);
    assert!(st.ssm.is_empty() && !st.ssm_bf16.is_empty());
    assert_eq!(st.bytes(), 2 * e.state_bytes());
    assert!(e.state_bytes() < 4 * e.state_floats());
    let err = rel_l2_from_f32(&ids, |e| e.state_bf16 = true);
    eprintln!("bf16 state: logits vs f32, relative L2 {err:.4}");
    assert!(err > 0.0 && err <= 0.01, "bf16-state logits {err} from f32");
}

#[test]
fn generation_through_the_engine_matches_the_model_code() {
    use ouro_nn::engine::EngineDecoder;
    use ouro_nn::generate::{generate_with, GenerateOptions, ModelDecoder, SamplingParams};
    let path = case("mamba2_g2");
    let engine = load(&path, Format::F32);
    let ck = ouro_nn::checkpoint::Checkpoint::open(&path).unwrap();
    let model = ouro_nn::lm::load(&ck, &Device::Cpu).unwrap();
    assert!(Mamba2Engine::supports(&path) && !Mamba2Engine::supports(&case("llama_gqa")));
    let prompt: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % engine.vocab as u32).collect();
    // Three samples of one prompt: greedy (all equal) and sampled with a seed (a shared RNG stream).
    for temperature in [0.0, 0.9] {
        let opts = GenerateOptions {
            max_new_tokens: 12,
            num_samples: 3,
            sampling: SamplingParams { temperature, top_k: 0, top_p: 1.0, seed: 5 },
            stop: vec![],
        };
        let (a, sa) = generate_with(&mut EngineDecoder::new(&engine), &prompt, &opts, |_, _| Ok(())).unwrap();
        let (b, sb) = generate_with(&mut ModelDecoder::new(model.as_ref()), &prompt, &opts, |_, _| Ok(())).unwrap();
        assert_eq!(a, b, "temperature {temperature}");
        assert_eq!((sa.generated_tokens, sa.cache_bytes), (sb.generated_tokens, engine.state_bytes() * 3));
        if temperature == 0.0 {
            assert!(a.iter().all(|s| s == &a[0]));
        }
    }
}

#[test]
fn engine_state_repeats_per_sequence() {
    let engine = load(&case("mamba2_g2"), Format::F32);
    let mut st = engine.new_state(2);
    engine.prefill(&[1, 2, 3], &mut st, 0).unwrap();
    engine.prefill(&[4, 5], &mut st, 1).unwrap();
    let r = st.repeat_interleave(3);
    assert_eq!(r.batch, 6);
    let (c, s) = (st.conv.len() / 2, st.ssm.len() / 2);
    for i in 0..6 {
        assert_eq!(r.conv[i * c..(i + 1) * c], st.conv[(i / 3) * c..(i / 3 + 1) * c]);
        assert_eq!(r.ssm[i * s..(i + 1) * s], st.ssm[(i / 3) * s..(i / 3 + 1) * s]);
    }
}
