//! `ouro doctor`: what this build can do, and a numeric check of a device against the CPU.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Device to check: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: Args) -> Result<()> {
    println!("ouro {}", env!("CARGO_PKG_VERSION"));
    println!("features: cuda={}", cfg!(feature = "cuda"));
    #[cfg(target_arch = "x86_64")]
    println!(
        "cpu: avx2={} fma={} avx512f={} avx512bf16={}, {} threads",
        std::arch::is_x86_feature_detected!("avx2"),
        std::arch::is_x86_feature_detected!("fma"),
        std::arch::is_x86_feature_detected!("avx512f"),
        std::arch::is_x86_feature_detected!("avx512bf16"),
        rayon::current_num_threads()
    );
    let dev = crate::device::parse(&args.device)?;
    println!("device: {:?}", dev);
    // Matmul and elementwise ops on the device vs the CPU, on random data.
    let n = 1024usize;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let want = a.matmul(&b)?.silu()?.sum_all()?.to_scalar::<f32>()?;
    let (ad, bd) = (a.to_device(&dev)?, b.to_device(&dev)?);
    let got = ad.matmul(&bd)?.silu()?.sum_all()?.to_scalar::<f32>()?;
    let rel = ((got - want) / want.abs().max(1.0)).abs();
    println!("check: sum(silu(A·B)) device {got:.4} vs cpu {want:.4} (rel {rel:.2e})");
    if !(rel < 1e-3) {
        bail!("device result differs from the CPU's");
    }
    for dtype in [DType::F32, DType::BF16] {
        let (x, y) = (ad.to_dtype(dtype)?, bd.to_dtype(dtype)?);
        x.matmul(&y)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let iters = if dev.is_cpu() { 3 } else { 50 };
        let t = Instant::now();
        let mut acc = None;
        for _ in 0..iters {
            acc = Some(x.matmul(&y)?);
        }
        acc.unwrap().sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?; // synchronise
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        println!("matmul {n}³ {dtype:?}: {:.1} GFLOP/s", 2.0 * (n as f64).powi(3) / dt / 1e9);
    }
    println!("ok");
    Ok(())
}
