//! The causal depthwise conv1d on CUDA (kernels in `conv.cu`): the CUDA half of the conv op in
//! [`crate::conv`], on the same f32 layouts.

use super::{alloc_f32, function, launch, module, poison, ptr, ptr_u32, upload_segments, Arg};
use crate::util::Segments;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result, Shape};

const SOURCE: &str = include_str!("conv.cu");

/// Batch, length, channels, width, and whether the weight carries the bias as its last column.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvDims {
    pub b: usize,
    pub l: usize,
    pub c: usize,
    pub k: usize,
    pub bias: bool,
}

fn load(s: &CudaStorage, d: &ConvDims) -> Result<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>> {
    module(&s.device, "conv.cu", SOURCE, &[("KW", d.k as i64), ("KB", (d.k + d.bias as usize) as i64)])
}

fn elementwise_grid(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1)
}

/// Forward: (xs (b, l+k−1, c), wb (c, k[+1])) → y (b, l, c).
pub(crate) fn fwd(d: ConvDims, seg: &Segments, xs: (&CudaStorage, &Layout), wb: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = xs.0.device.clone();
    let m = load(xs.0, &d)?;
    let segs = upload_segments(&dev, seg)?;
    let n = d.b * d.l * d.c;
    let (out, po) = alloc_f32(&dev, n, false)?;
    poison(&dev, po, n)?;
    launch(&dev.cuda_stream(), &function(&m, "conv_fwd", 0)?, elementwise_grid(n), 256, 0, &[
        Arg::Ptr(ptr(xs.0, xs.1, "conv1d input")?),
        Arg::Ptr(ptr(wb.0, wb.1, "conv1d weight")?),
        Arg::Ptr(ptr_u32(&segs, &dev)),
        Arg::Ptr(po),
        Arg::I32(d.b as i32),
        Arg::I32(d.l as i32),
        Arg::I32(d.c as i32),
    ])?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((d.b, d.l, d.c))))
}

/// Backward: (xs, wb, dy (b, l, c)) → [dxs (b·(l+k−1)·c) | dwb (c·(k[+1]))].
pub(crate) fn bwd(d: ConvDims, seg: &Segments, xs: (&CudaStorage, &Layout), wb: (&CudaStorage, &Layout), dy: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = xs.0.device.clone();
    let m = load(xs.0, &d)?;
    let segs = upload_segments(&dev, seg)?;
    let nx = d.b * (d.l + d.k - 1) * d.c;
    let kb = d.k + d.bias as usize;
    let (out, po) = alloc_f32(&dev, nx + d.c * kb, true)?;
    poison(&dev, po, nx)?;
    let stream = dev.cuda_stream();
    let (px, pw, pdy, ps) = (ptr(xs.0, xs.1, "conv1d input")?, ptr(wb.0, wb.1, "conv1d weight")?, ptr(dy.0, dy.1, "conv1d grad")?, ptr_u32(&segs, &dev));
    let sizes = [Arg::I32(d.b as i32), Arg::I32(d.l as i32), Arg::I32(d.c as i32)];
    launch(&stream, &function(&m, "conv_bwd_x", 0)?, elementwise_grid(nx), 256, 0, &[&[Arg::Ptr(pw), Arg::Ptr(pdy), Arg::Ptr(ps), Arg::Ptr(po)][..], &sizes].concat())?;
    let row_blocks = (d.b * d.l).div_ceil(8).clamp(1, 256) as u32;
    launch(&stream, &function(&m, "conv_bwd_w", 0)?, (d.c.div_ceil(32) as u32, row_blocks, 1), 256, 0, &[
        &[Arg::Ptr(px), Arg::Ptr(pdy), Arg::Ptr(ps), Arg::Ptr(po + 4 * nx as u64)][..],
        &sizes,
    ]
    .concat())?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(nx + d.c * kb)))
}
