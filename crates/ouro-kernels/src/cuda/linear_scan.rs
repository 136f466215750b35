//! The linear recurrence h_t = a_t ⊙ h_{t−1} + x_t on CUDA (kernels in `linear_scan.cu`): the CUDA half of the op
//! in [`crate::linear_scan`], on the same f32 layouts.

use super::{alloc_f32, function, launch, module, poison, ptr, Arg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result, Shape};

const SOURCE: &str = include_str!("linear_scan.cu");

fn grid(rows: usize) -> (u32, u32, u32) {
    (rows.div_ceil(128) as u32, 1, 1)
}

/// Forward: (x, a (b, l, w), h0 (b, w)) → [y (b·l·w) | last state (b·w)].
pub(crate) fn fwd((b, l, w): (usize, usize, usize), x: (&CudaStorage, &Layout), a: (&CudaStorage, &Layout), h0: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device.clone();
    let m = module(&dev, "linear_scan.cu", SOURCE, &[])?;
    let n = b * l * w;
    let (out, po) = alloc_f32(&dev, n + b * w, false)?;
    poison(&dev, po, n + b * w)?;
    launch(&dev.cuda_stream(), &function(&m, "linear_scan_fwd", 0)?, grid(b * w), 128, 0, &[
        Arg::Ptr(ptr(x.0, x.1, "linear scan x")?),
        Arg::Ptr(ptr(a.0, a.1, "linear scan a")?),
        Arg::Ptr(ptr(h0.0, h0.1, "linear scan h0")?),
        Arg::Ptr(po),
        Arg::Ptr(po + 4 * n as u64),
        Arg::I32(b as i32),
        Arg::I32(l as i32),
        Arg::I32(w as i32),
    ])?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n + b * w)))
}

/// Backward: (a, [h0 | y | dy | dh_last]) → [dx | da | dh0].
pub(crate) fn bwd((b, l, w): (usize, usize, usize), a: (&CudaStorage, &Layout), packed: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = a.0.device.clone();
    let m = module(&dev, "linear_scan.cu", SOURCE, &[])?;
    let (n, bw) = (b * l * w, b * w);
    let (out, po) = alloc_f32(&dev, 2 * n + bw, false)?;
    poison(&dev, po, 2 * n + bw)?;
    let pk = ptr(packed.0, packed.1, "linear scan grads")?;
    let f = |k: usize| pk + 4 * k as u64; // offsets into the packed f32 values
    launch(&dev.cuda_stream(), &function(&m, "linear_scan_bwd", 0)?, grid(bw), 128, 0, &[
        Arg::Ptr(ptr(a.0, a.1, "linear scan a")?),
        Arg::Ptr(f(0)),
        Arg::Ptr(f(bw)),
        Arg::Ptr(f(bw + n)),
        Arg::Ptr(f(bw + 2 * n)),
        Arg::Ptr(po),
        Arg::Ptr(po + 4 * n as u64),
        Arg::Ptr(po + 8 * n as u64),
        Arg::I32(b as i32),
        Arg::I32(l as i32),
        Arg::I32(w as i32),
    ])?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(2 * n + bw)))
}
