//! Batched sampling (`ouro sample`): continuous batching gives the completions of one-sequence generation,
//! the same seed gives the same samples whatever the batch size, attention rows at different positions
//! equal each row run alone, and the answer extraction / majority vote / pass@k arithmetic.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ouro_kernels::testing::{assert_close, Gen};
use ouro_nn::checkpoint::Checkpoint;
use ouro_nn::generate::{generate, GenerateOptions, SamplingParams};
use ouro_nn::layers::{Attention, AttentionConfig, KvCache};
use ouro_nn::lm::{load, LanguageModel};
use ouro_kernels::quant::Format;
use ouro_nn::engine::{EngineBatcher, Mamba2Engine};
use ouro_nn::sample::*;

fn model(name: &str) -> Box<dyn LanguageModel> {
    let ck = Checkpoint::open(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lm").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    load(&ck, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Prompts of different lengths (rows of one batch sit at different positions).
fn prompts(vocab: usize, lens: &[usize]) -> Vec<Vec<u32>> {
    let mut s = 99u64;
    lens.iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 33) % vocab.min(256) as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// A stop rule that ends completions after different numbers of tokens, so that rows leave and join
/// mid-flight.
fn ragged_stop(t: &[u32]) -> bool {
    t.len() >= 2 && (t[t.len() - 1] as usize + t.len()) % 5 == 0
}

fn opts(num_samples: usize, max_new_tokens: usize, temperature: f64, batch_size: usize) -> SampleOptions {
    SampleOptions {
        num_samples: Some(num_samples),
        max_new_tokens,
        sampling: SamplingParams { temperature, top_k: 0, top_p: 1.0, seed: 5 },
        batch_size,
        time_budget: None,
        stop_tokens: vec![],
    }
}

/// Greedy completions through the continuous batch equal one-sequence `generate`, token for token.
fn greedy_matches_generate(name: &str, lens: &[usize], max_new: usize) {
    let m = model(name);
    let ps = prompts(m.info().vocab_size, lens);
    let o = opts(2, max_new, 0.0, 3); // 2·len(ps) sequences through 3 rows
    let (got, stats) = sample_batched(m.as_ref(), &ps, &o, &ragged_stop, &mut |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut lengths = std::collections::HashSet::new();
    for (p, prompt) in ps.iter().enumerate() {
        let g = GenerateOptions { max_new_tokens: max_new, num_samples: 1, sampling: SamplingParams { temperature: 0.0, ..Default::default() }, stop: vec![] };
        let (want, _) = generate(m.as_ref(), prompt, &g, |_, _| Ok(())).unwrap();
        let mut want = want[0].clone();
        if let Some(end) = (1..=want.len()).find(|&n| ragged_stop(&want[..n])) {
            want.truncate(end);
        }
        assert_eq!(got[p].len(), 2, "{name}: prompt {p}");
        for c in &got[p] {
            assert_eq!(c.tokens, want, "{name}: prompt {p} (length {}) sample {}", prompt.len(), c.sample);
            let expect = if want.len() == max_new && !ragged_stop(&want) { Finish::Length } else { Finish::Stop };
            assert_eq!(c.finish, expect, "{name}: prompt {p}");
            lengths.insert(c.tokens.len());
        }
    }
    assert!(lengths.len() > 1, "{name}: every completion has the same length; the test wants rows leaving mid-flight");
    assert!(stats.row_steps > stats.steps, "{name}: no step decoded more than one row");
    assert_eq!(stats.completions, 2 * ps.len());
    assert_eq!(stats.prompt_tokens, lens.iter().sum::<usize>(), "{name}: each prompt prefilled once");
}

#[test]
fn greedy_continuous_batching_equals_generate_mamba2() {
    greedy_matches_generate("mamba2_hf", &[3, 9, 5, 14, 1], 12);
}

/// The Mamba-2 CPU engine through the same scheduler (its flat state rows copied on joins and leaves):
/// greedy completions equal the generic model's, token for token, with rows leaving and joining mid-flight.
#[test]
fn engine_batcher_equals_the_generic_model() {
    for name in ["mamba2_hf", "mamba2_g2"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lm").join(name);
        let m = model(name);
        let mut e = Mamba2Engine::load(&path, Format::F32).unwrap();
        e.bf16_matmul = false;
        let ps = prompts(m.info().vocab_size, &[3, 9, 5, 14, 1]);
        let o = opts(2, 12, 0.0, 3); // 10 sequences through 3 rows
        let (want, _) = sample_batched(m.as_ref(), &ps, &o, &ragged_stop, &mut |_| {}).unwrap();
        let (got, stats) = sample_with(&EngineBatcher::new(&e), &ps, &o, &ragged_stop, &mut |_| {}).unwrap();
        assert_eq!(stats.completions, 10, "{name}");
        for (p, (g, w)) in got.iter().zip(&want).enumerate() {
            let toks = |c: &Vec<Completion>| c.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>();
            assert_eq!(toks(g), toks(w), "{name}: prompt {p}");
        }
        let lengths: std::collections::HashSet<usize> = got.iter().flatten().map(|c| c.tokens.len()).collect();
        assert!(lengths.len() > 1, "{name}: completions of different lengths (rows leave and join): {lengths:?}");
    }
}

#[test]
fn greedy_continuous_batching_equals_generate_llama() {
    greedy_matches_generate("llama_gqa", &[3, 9, 5, 14, 1], 12);
}

#[test]
fn greedy_continuous_batching_equals_generate_hybrid() {
    greedy_matches_generate("mamba2_hybrid_ssm", &[3, 9, 5, 14, 1], 12);
}

/// NVIDIA's Mamba-2-Hybrid layout (HF nemotron_h: `M` Mamba-2, `*` attention without RoPE, `-` MLP).
#[test]
fn greedy_continuous_batching_equals_generate_nemotron_h() {
    greedy_matches_generate("nemotron_h", &[3, 9, 5, 14, 1], 12);
}

#[test]
fn greedy_continuous_batching_equals_generate_other_models() {
    greedy_matches_generate("mamba_hf", &[4, 7, 2], 10);
    greedy_matches_generate("llamba", &[4, 7, 2], 10);
    // Local attention over a window of 16: prompts and completions cross it.
    greedy_matches_generate("recurrent_gemma", &[3, 20, 9, 17], 14);
}

/// With temperature, each sample has its own RNG: the same seed gives the same completions at batch sizes
/// 1 and 7.
#[test]
fn sampling_does_not_depend_on_the_batch_size() {
    for name in ["mamba2_hybrid_ssm", "llama_gqa"] {
        let m = model(name);
        let ps = prompts(m.info().vocab_size, &[4, 11, 6]);
        let mut o = opts(5, 10, 0.9, 1);
        o.sampling.top_k = 40;
        let run = |o: &SampleOptions| {
            let (c, _) = sample_batched(m.as_ref(), &ps, o, &ragged_stop, &mut |_| {}).unwrap();
            c.iter().map(|p| p.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        let one = run(&o);
        o.batch_size = 7;
        let seven = run(&o);
        assert_eq!(one, seven, "{name}");
        // Samples of one prompt differ (their RNGs do).
        let distinct: std::collections::HashSet<_> = one[1].iter().collect();
        assert!(distinct.len() > 1, "{name}: {:?}", one[1]);
        o.sampling.seed = 6;
        assert_ne!(run(&o), one, "{name}: another seed");
    }
}

#[test]
fn time_budget_starts_samples_round_robin() {
    let m = model("mamba2_hf");
    let ps = prompts(m.info().vocab_size, &[3, 5]);
    let mut o = opts(3, 4, 0.8, 4);
    o.time_budget = Some(60.0); // generous: the cap of 3 per prompt ends the run
    let (c, stats) = sample_batched(m.as_ref(), &ps, &o, &|_| false, &mut |_| {}).unwrap();
    assert_eq!(c.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![3, 3]);
    assert_eq!(stats.dropped, 0);
    assert!(c.iter().flatten().all(|c| c.seconds > 0.0 && c.seconds <= stats.seconds));
    // A tiny budget with no cap: samples run until it is spent and the unfinished ones are dropped.
    o.num_samples = None;
    o.time_budget = Some(0.3);
    o.max_new_tokens = 64;
    let (c, stats) = sample_batched(m.as_ref(), &ps, &o, &|_| false, &mut |_| {}).unwrap();
    let n: usize = c.iter().map(|p| p.len()).sum();
    assert!(n >= 2 && stats.completions == n, "{n} completions, {stats:?}");
    assert!(c.iter().flatten().all(|c| c.seconds <= stats.seconds && c.seconds < 0.3), "a completion counted past the budget");
    assert!(stats.dropped >= 1 && stats.dropped_tokens >= stats.dropped, "the rows running at the budget are dropped: {stats:?}");
    assert!(c[0].len().abs_diff(c[1].len()) <= 1, "round-robin: {} vs {}", c[0].len(), c[1].len());
}

#[test]
fn bad_options_error_clearly() {
    let m = model("mamba2_hf");
    let ps = prompts(m.info().vocab_size, &[3]);
    let err = |o: &SampleOptions, ps: &[Vec<u32>]| sample_batched(m.as_ref(), ps, o, &|_| false, &mut |_| {}).unwrap_err().to_string();
    assert!(err(&opts(0, 4, 0.0, 2), &ps).contains("at least 1"));
    assert!(err(&opts(1, 0, 0.0, 2), &ps).contains("max_new_tokens"));
    assert!(err(&opts(1, 4, 0.0, 2), &[vec![1], vec![]]).contains("prompt 1 is empty"));
    assert!(err(&opts(1, 4, 0.0, 2), &[vec![99999]]).contains("outside the vocabulary"));
}

/// One decode step (and a 3-token chunk) of rows at different positions — cache rows padded, RoPE at each
/// row's position, a sliding window — equals each row run alone.
#[test]
fn attention_rows_at_different_positions_equal_each_row_alone() {
    for window in [None, Some(4)] {
        let cfg = AttentionConfig { d_model: 16, n_heads: 4, n_kv_heads: 2, head_dim: 4, rotary_dim: 4, rope_theta: 10000.0, qkv_bias: true, out_bias: false, window, causal: true };
        let vm = VarMap::new();
        let att = Attention::new_llama(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let mut g = Gen::new(3);
        for (_, v) in ouro_nn::checkpoint::named_vars(&vm) {
            v.set(&g.normal(v.dims(), 0.5)).unwrap();
        }
        let lens = [3usize, 8, 5];
        let xs: Vec<Tensor> = lens.iter().map(|&n| g.normal(&[1, n, 16], 1.0)).collect();
        let news: Vec<Tensor> = (0..3).map(|_| g.normal(&[3, 3, 16], 1.0)).collect(); // 3 calls: a step, a chunk of 3, a step
        // Alone: prefill, then the same calls.
        let mut alone: Vec<Vec<Tensor>> = Vec::new();
        let mut caches = Vec::new();
        for (i, x) in xs.iter().enumerate() {
            let mut c = KvCache::default();
            att.forward(x, None, Some(&mut c)).unwrap();
            caches.push(c.clone());
            let mut outs = Vec::new();
            for (call, n) in news.iter().zip([1, 3, 1]) {
                outs.push(att.forward(&call.narrow(0, i, 1).unwrap().narrow(1, 0, n).unwrap(), None, Some(&mut c)).unwrap());
            }
            alone.push(outs);
        }
        // Together: rows 0 and 2 stacked, then row 1 written over a third row (set_row), so every row
        // sits at its own position.
        let mut batch = KvCache::cat(&[&caches[0], &caches[0], &caches[2]]).unwrap();
        batch.set_row(1, &caches[1]).unwrap();
        assert_eq!(batch.rows.as_ref().unwrap().iter().map(|r| r.seen).collect::<Vec<_>>(), lens.to_vec());
        for (k, (call, n)) in news.iter().zip([1, 3, 1]).enumerate() {
            let y = att.forward(&call.narrow(1, 0, n).unwrap(), None, Some(&mut batch)).unwrap();
            for (i, want) in alone.iter().enumerate() {
                assert_close(&y.narrow(0, i, 1).unwrap(), &want[k], 1e-5, &format!("window {window:?}, call {k}, row {i}"));
            }
        }
        // Keys no row needs are dropped: the longest row holds 8 + 5 tokens (or the window).
        assert_eq!(batch.len(), window.unwrap_or(13));
        // Selecting rows keeps their positions.
        let sel = batch.select(&[2, 0]).unwrap();
        assert_eq!(sel.rows.as_ref().unwrap().iter().map(|r| r.seen).collect::<Vec<_>>(), vec![lens[2] + 5, lens[0] + 5]);
        assert_eq!(sel.len(), window.unwrap_or(lens[2] + 5));
    }
}

/// Decoding token by token through the KV cache equals the full forward, and a clone taken mid-way and the
/// original, stepped in turn with different tokens, each equal the full forward of their own sequence
/// (neither sees the other's keys).
#[test]
fn kv_cache_decode_and_clones_stay_apart() {
    let cfg = AttentionConfig { d_model: 16, n_heads: 4, n_kv_heads: 2, head_dim: 4, rotary_dim: 4, rope_theta: 10000.0, qkv_bias: false, out_bias: false, window: None, causal: true };
    let vm = VarMap::new();
    let att = Attention::new_llama(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let mut g = Gen::new(4);
    for v in vm.all_vars() {
        v.set(&g.normal(v.dims(), 0.5)).unwrap();
    }
    let (x, x2) = (g.normal(&[2, 60, 16], 1.0), g.normal(&[2, 29, 16], 1.0));
    let full = att.forward(&x, None, None).unwrap();
    let forked = Tensor::cat(&[&x.narrow(1, 0, 31).unwrap(), &x2], 1).unwrap();
    let full_fork = att.forward(&forked, None, None).unwrap();
    let mut c = KvCache::default();
    att.forward(&x.narrow(1, 0, 5).unwrap(), None, Some(&mut c)).unwrap();
    let mut fork: Option<KvCache> = None;
    for t in 5..60 {
        let y = att.forward(&x.narrow(1, t, 1).unwrap(), None, Some(&mut c)).unwrap();
        assert_close(&y, &full.narrow(1, t, 1).unwrap(), 1e-5, &format!("step {t}"));
        if let Some(f) = fork.as_mut() {
            let y = att.forward(&forked.narrow(1, t, 1).unwrap(), None, Some(f)).unwrap();
            assert_close(&y, &full_fork.narrow(1, t, 1).unwrap(), 1e-5, &format!("fork, step {t}"));
        }
        if t == 30 {
            fork = Some(c.clone());
        }
    }
    assert_eq!((c.len(), c.seen, fork.unwrap().len()), (60, 60, 60));
}

#[test]
fn answer_extraction_rules() {
    let d = AnswerRule::Default;
    assert_eq!(d.extract("She has 3 apples and buys 4.\n#### 7"), Some("7".into()));
    assert_eq!(d.extract("#### 1 then #### 1,234.00\nmore text 99"), Some("1234".into()));
    assert_eq!(d.extract("so 2 + 3 = 5 and the total is -12.5."), Some("-12.5".into()));
    assert_eq!(d.extract("#### yes\n"), Some("yes".into()));
    assert_eq!(d.extract("no digits here"), None);
    assert_eq!(d.extract("####   \n"), None);
    let r = AnswerRule::regex(r"answer is (\w+)").unwrap();
    assert_eq!(r.extract("the answer is 4, no, the answer is 5"), Some("5".into()));
    assert_eq!(r.extract("#### 7"), None);
    assert!(AnswerRule::regex("no group").unwrap_err().to_string().contains("exactly one capture group"));
    assert!(AnswerRule::regex("(a)(b)").is_err());
    assert!(AnswerRule::regex("(").unwrap_err().to_string().contains("answer regex"));
    assert_eq!(normalize_answer(" $1,000. "), "1000");
    assert_eq!(normalize_answer("0.50"), "0.5");
    assert_eq!(normalize_answer("Paris"), "Paris");
    assert_eq!(normalize_answer("-007"), "-7");
    assert_ne!(normalize_answer("12345678901234567"), normalize_answer("12345678901234568"));
    assert_eq!(reference_answer("Natalia sold 48/2 = 24 clips.\n#### 72"), "72");
    assert_eq!(reference_answer("72.0"), "72");
}

#[test]
fn majority_vote_and_pass_at_k_by_hand() {
    let a = |v: &[Option<&str>]| v.iter().map(|x| x.map(String::from)).collect::<Vec<_>>();
    assert_eq!(majority_vote(&a(&[Some("3"), Some("5"), Some("5"), None, Some("3"), Some("5")])), Some(("5".into(), 3)));
    // A tie goes to the answer seen first.
    assert_eq!(majority_vote(&a(&[None, Some("b"), Some("a"), Some("a"), Some("b")])), Some(("b".into(), 2)));
    assert_eq!(majority_vote(&a(&[None, None])), None);
    // n = 5, c = 2: pass@1 = 2/5; pass@2 = 1 − C(3,2)/C(5,2) = 1 − 3/10; pass@4 = 1 − 0 (C(3,4) = 0).
    assert!((pass_at_k(5, 2, 1) - 0.4).abs() < 1e-12);
    assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
    assert_eq!(pass_at_k(5, 2, 4), 1.0);
    // n = 8, c = 1: pass@k = k/8.
    for k in [1, 2, 4, 8] {
        assert!((pass_at_k(8, 1, k) - k as f64 / 8.0).abs() < 1e-12);
    }
    // n = 10, c = 3, k = 4: 1 − C(7,4)/C(10,4) = 1 − 35/210.
    assert!((pass_at_k(10, 3, 4) - (1.0 - 35.0 / 210.0)).abs() < 1e-12);
    assert_eq!(pass_at_k(4, 0, 2), 0.0);
    assert_eq!(pass_ks(6), vec![1, 2, 4]);
    assert_eq!(pass_ks(8), vec![1, 2, 4, 8]);
    let s = score(&a(&[Some("7"), Some("8"), Some("7"), None]), Some("7"));
    assert_eq!(s.majority, Some(("7".into(), 2)));
    assert_eq!(s.correct, Some(vec![true, false, true, false]));
    assert_eq!(s.majority_correct, Some(true));
    // n = 4, c = 2: pass@1 = 1/2, pass@2 = 1 − C(2,2)/C(4,2) = 5/6, pass@4 = 1.
    let want = [(1, 0.5), (2, 5.0 / 6.0), (4, 1.0)];
    assert_eq!(s.pass_at_k.len(), 3);
    for ((k, p), (wk, wp)) in s.pass_at_k.iter().zip(want) {
        assert!(*k == wk && (p - wp).abs() < 1e-12, "pass@{k} = {p}, want {wp}");
    }
    let s = score(&a(&[Some("8"), Some("8"), Some("7")]), Some("7"));
    assert_eq!(s.majority_correct, Some(false));
    assert_eq!(score(&a(&[Some("8")]), None).pass_at_k, vec![]);
}
