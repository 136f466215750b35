//! The (gated) RMSNorm on CUDA (kernels in `norm.cu`): the CUDA half of the norm op in [`crate::norm`].

use super::{alloc_f32, function, launch, module, poison, ptr, Arg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result, Shape};

const SOURCE: &str = include_str!("norm.cu");
/// Rows per block of the backward pass (each block keeps one dw partial in shared memory).
const RPB: usize = 16;

/// The op's settings: channels per group, eps, gated, the norm before the gate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormCfg {
    pub group: usize,
    pub eps: f32,
    pub gated: bool,
    pub before_gate: bool,
}

fn flags(c: &NormCfg) -> [Arg; 4] {
    [Arg::I32(c.group as i32), Arg::F32(c.eps), Arg::I32(c.gated as i32), Arg::I32(c.before_gate as i32)]
}

/// Forward: (x, z, w) → y (x's shape); rows of w.len() channels.
pub(crate) fn fwd(c: NormCfg, x: (&CudaStorage, &Layout), z: (&CudaStorage, &Layout), w: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device.clone();
    let m = module(&dev, "norm.cu", SOURCE, &[])?;
    let (n, d) = (x.1.shape().elem_count(), w.1.shape().elem_count());
    let (out, po) = alloc_f32(&dev, n, false)?;
    poison(&dev, po, n)?;
    let rows = n / d;
    if rows > 0 {
        let smem = 4 * (d / c.group);
        launch(&dev.cuda_stream(), &function(&m, "norm_fwd", smem)?, (rows as u32, 1, 1), 256, smem, &[
            &[Arg::Ptr(ptr(x.0, x.1, "rms norm x")?), Arg::Ptr(ptr(z.0, z.1, "rms norm z")?), Arg::Ptr(ptr(w.0, w.1, "rms norm weight")?), Arg::Ptr(po), Arg::I32(d as i32)][..],
            &flags(&c),
        ]
        .concat())?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), x.1.shape().clone()))
}

/// Backward: (x, z, [w | dy]) → [dx | dz | dw].
pub(crate) fn bwd(c: NormCfg, x: (&CudaStorage, &Layout), z: (&CudaStorage, &Layout), packed: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device.clone();
    let m = module(&dev, "norm.cu", SOURCE, &[])?;
    let n = x.1.shape().elem_count();
    let d = packed.1.shape().elem_count() - n;
    let (out, po) = alloc_f32(&dev, 2 * n + d, true)?;
    poison(&dev, po, 2 * n)?;
    let rows = n / d;
    if rows > 0 {
        let pk = ptr(packed.0, packed.1, "rms norm grads")?;
        let smem = 4 * (d + 2 * (d / c.group));
        launch(&dev.cuda_stream(), &function(&m, "norm_bwd", smem)?, (rows.div_ceil(RPB) as u32, 1, 1), 256, smem, &[
            &[Arg::Ptr(ptr(x.0, x.1, "rms norm x")?), Arg::Ptr(ptr(z.0, z.1, "rms norm z")?), Arg::Ptr(pk), Arg::Ptr(pk + 4 * d as u64)][..],
            &[Arg::Ptr(po), Arg::Ptr(po + 4 * n as u64), Arg::Ptr(po + 8 * n as u64), Arg::I64(rows as i64), Arg::I32(d as i32)],
            &flags(&c),
            &[Arg::I32(RPB as i32)],
        ]
        .concat())?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(2 * n + d)))
}
