//! `--device cpu | cuda | cuda:N`.

use anyhow::{bail, Result};
use candle_core::Device;

pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("unknown device '{spec}': use cpu, cuda or cuda:N"),
        },
        None => bail!("unknown device '{spec}': use cpu, cuda or cuda:N"),
    };
    if !cfg!(feature = "cuda") {
        bail!("device '{spec}' needs a CUDA build of ouro (cargo build --release --features cuda; see scripts/build-cuda.sh)");
    }
    let dev = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    ouro_kernels::cuda::prepare_device(&dev)?;
    Ok(dev)
}
