//! RecurrentGemma/Griffin: packed documents reset the RG-LRU and the attention like separate sequences
//! (the reference resets at position 0), and decoding keeps memory bounded by the window.

use candle_core::{Device, Tensor};
use ouro_kernels::testing::assert_close;
use ouro_nn::checkpoint::Checkpoint;
use ouro_nn::lm::load;

#[test]
fn packed_documents_equal_separate_runs_and_memory_is_bounded() {
    let ck = Checkpoint::open(ouro_kernels::testing::Fixture::path("lm/recurrent_gemma")).unwrap();
    let m = load(&ck, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 520).collect();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let seq: Vec<u32> = (0..40).map(|i| if i < 13 { 0 } else { 1 }).collect();
    let seq = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let packed = m.forward(&t, Some(&seq), None).unwrap();
    for (s, l) in [(0usize, 13usize), (13, 27)] {
        let alone = m.forward(&t.narrow(1, s, l).unwrap(), None, None).unwrap();
        assert_close(&packed.narrow(1, s, l).unwrap(), &alone, 1e-5, &format!("document at {s}"));
    }
    // Decode 80 tokens one by one: the cache stops growing once the window (16) is full.
    let mut cache = m.new_cache(1).unwrap();
    let mut sizes = Vec::new();
    for i in 0..80u32 {
        m.step(&Tensor::new(&[i % 500], &Device::Cpu).unwrap(), &mut cache).unwrap();
        sizes.push(cache.bytes());
    }
    assert!(sizes[0] < sizes[15], "the KV cache fills during the window: {:?}", &sizes[..16]);
    assert_eq!(sizes[20], sizes[79], "cache grows past the window: {:?}", &sizes[14..22]);
}
