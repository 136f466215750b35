//! Mamba-1's selective scan on CUDA (kernels in `selective_scan.cu`): the CUDA half of the selective-scan
//! op in [`crate::selective_scan`], on the same packed f32 layouts.

use super::{alloc_f32, function, launch, module, poison, ptr, ptr_u32, upload_segments, Arg};
use crate::selective_scan::Dims;
use crate::util::Segments;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result, Shape};

const SOURCE: &str = include_str!("selective_scan.cu");
const NT: usize = 128;
/// Steps between the backward pass's stored states.
const TC: usize = 32;

/// Lanes per channel: the smallest power of two ≥ d_state, at most a warp.
fn lanes(n: usize) -> usize {
    n.next_power_of_two().min(32)
}

fn grid(dm: &Dims) -> (u32, u32, u32) {
    let cpb = NT / lanes(dm.n);
    (dm.d.div_ceil(cpb) as u32, dm.b as u32, 1)
}

fn sizes(dm: &Dims) -> [Arg; 3] {
    [Arg::I32(dm.l as i32), Arg::I32(dm.d as i32), Arg::I32(dm.g as i32)]
}

fn load(s: &CudaStorage, dm: &Dims) -> Result<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>> {
    module(&s.device, "selective_scan.cu", SOURCE, &[("N", dm.n as i64), ("NL", lanes(dm.n) as i64), ("TC", TC as i64)])
}

/// Forward: (ud, ah, bc) → [y (b·l·d) | final states (b·d·n)].
pub(crate) fn fwd(dm: Dims, seg: &Segments, ud: (&CudaStorage, &Layout), ah: (&CudaStorage, &Layout), bc: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = ud.0.device.clone();
    let m = load(ud.0, &dm)?;
    let segs = upload_segments(&dev, seg)?;
    let (ny, nh) = (dm.b * dm.l * dm.d, dm.b * dm.d * dm.n);
    let (out, po) = alloc_f32(&dev, ny + nh, false)?;
    poison(&dev, po, ny + nh)?;
    let args = [
        &[Arg::Ptr(ptr(ud.0, ud.1, "selective scan u/Δ")?), Arg::Ptr(ptr(ah.0, ah.1, "selective scan A/h0")?), Arg::Ptr(ptr(bc.0, bc.1, "selective scan B/C")?)][..],
        &[Arg::Ptr(ptr_u32(&segs, &dev)), Arg::Ptr(po), Arg::Ptr(po + 4 * ny as u64)],
        &sizes(&dm),
    ]
    .concat();
    launch(&dev.cuda_stream(), &function(&m, "sscan_fwd", 0)?, grid(&dm), NT as u32, 0, &args)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(ny + nh)))
}

/// Backward: (ud, bc, [A | h0 | dy | dh_final]) → [dud | dbc | dA | dh0].
pub(crate) fn bwd(dm: Dims, seg: &Segments, ud: (&CudaStorage, &Layout), bc: (&CudaStorage, &Layout), packed: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let Dims { b, l, d, n, g } = dm;
    let dev = ud.0.device.clone();
    let m = load(ud.0, &dm)?;
    let segs = upload_segments(&dev, seg)?;
    let pk = ptr(packed.0, packed.1, "selective scan grads")?;
    // packed = [A (d·n) | h0 (b·d·n) | dy (b·l·d) | dh_final (b·d·n)]; ah = [A | h0] is its prefix.
    let (pdy, pdhf) = (pk + 4 * ((b + 1) * d * n) as u64, pk + 4 * ((b + 1) * d * n + b * l * d) as u64);
    let (nud, nbc) = (2 * b * l * d, 2 * b * l * g * n);
    let total = nud + nbc + d * n + b * d * n;
    let (out, po) = alloc_f32(&dev, total, true)?;
    let (pdbc, pda, pdh0) = (po + 4 * nud as u64, po + 4 * (nud + nbc) as u64, po + 4 * (nud + nbc + d * n) as u64);
    poison(&dev, po, nud)?;
    poison(&dev, pdh0, b * d * n)?;
    let (_ckpt, pck) = alloc_f32(&dev, b * l.div_ceil(TC) * d * n, false)?;
    let smem = 4 * TC * 2 * n;
    let args = [
        &[Arg::Ptr(ptr(ud.0, ud.1, "selective scan u/Δ")?), Arg::Ptr(pk), Arg::Ptr(ptr(bc.0, bc.1, "selective scan B/C")?), Arg::Ptr(ptr_u32(&segs, &dev))][..],
        &[Arg::Ptr(pdy), Arg::Ptr(pdhf), Arg::Ptr(pck), Arg::Ptr(po), Arg::Ptr(pdbc), Arg::Ptr(pda), Arg::Ptr(pdh0)],
        &sizes(&dm),
    ]
    .concat();
    launch(&dev.cuda_stream(), &function(&m, "sscan_bwd", smem)?, grid(&dm), NT as u32, smem, &args)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(total)))
}
