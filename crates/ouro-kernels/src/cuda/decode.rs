//! Mamba-2's single-token step on CUDA, fused for a whole batch (kernel in `decode.cu`); the entry point
//! is [`crate::decode::mamba2_step`].

use super::{alloc_f32, function, launch, module, poison, ptr, Arg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

const SOURCE: &str = include_str!("decode.cu");

/// The fused step as an op on the SSM state S (b, h, p, n); the other inputs ride along in the op (read
/// in place: no packing, so that a step is one launch) and must be f32, contiguous, on the same device.
/// Output: [y | conv state | pad | S], at [`DecodeOp::offsets`].
pub(crate) struct DecodeOp {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub d_state: usize,
    pub width: usize,
    pub dt_limit: (f32, f32),
    /// conv state (b, k−1, cd), xBC (b, cd), dt (b, h), conv weight (cd, k), A (h), dt_bias (h), D (h) or (h, p)
    pub conv_state: Tensor,
    pub xbc: Tensor,
    pub dt: Tensor,
    pub conv_weight: Tensor,
    pub a: Tensor,
    pub dt_bias: Tensor,
    pub d: Tensor,
    /// (cd), or none
    pub conv_bias: Option<Tensor>,
}

impl DecodeOp {
    fn conv_dim(&self) -> usize {
        self.heads * self.head_dim + 2 * self.groups * self.d_state
    }
    /// (offset of the conv state, offset of S, total length) in the output for `b` sequences.
    pub fn offsets(&self, b: usize) -> (usize, usize, usize) {
        let conv = b * self.heads * self.head_dim;
        let s = (conv + b * (self.width - 1) * self.conv_dim()).next_multiple_of(4);
        (conv, s, s + b * self.heads * self.head_dim * self.d_state)
    }
}

/// The device address of an f32 contiguous CUDA tensor with `dims`.
fn tensor_ptr(t: &Tensor, dims: &[usize], what: &str) -> Result<u64> {
    if t.dims() != dims || t.dtype() != DType::F32 {
        bail!("mamba2-decode: {what} must be f32 {dims:?}, got {:?} {:?}", t.dtype(), t.dims());
    }
    let (st, lay) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(s) => ptr(s, lay, what),
        _ => bail!("mamba2-decode: {what} is not on a CUDA device"),
    }
}

impl CustomOp1 for DecodeOp {
    fn name(&self) -> &'static str {
        "mamba2-decode"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("mamba2-decode: the fused step runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout) -> Result<(CudaStorage, Shape)> {
        let (b, h, p, n) = l1.shape().dims4()?;
        let (g, k, cd) = (self.groups, self.width, self.conv_dim());
        if (h, p, n) != (self.heads, self.head_dim, self.d_state) || n % 4 != 0 || l1.start_offset() % 4 != 0 {
            bail!("mamba2-decode: state {:?} does not fit heads {}, head_dim {}, d_state {} (a multiple of 4, aligned)", l1.shape(), self.heads, self.head_dim, self.d_state);
        }
        let (dh, dp) = if self.d.rank() == 1 { (1, 0) } else { (p, 1) };
        let d_dims: &[usize] = if self.d.rank() == 1 { &[h] } else { &[h, p] };
        let cb = match &self.conv_bias {
            Some(t) => tensor_ptr(t, &[cd], "conv bias")?,
            None => 0,
        };
        let dev = s1.device.clone();
        let m = module(&dev, "decode.cu", SOURCE, &[("P", p as i64), ("N", n as i64), ("KW", k as i64)])?;
        let (_, s_off, total) = self.offsets(b);
        let (out, po) = alloc_f32(&dev, total, false)?;
        poison(&dev, po, total)?;
        launch(&dev.cuda_stream(), &function(&m, "mamba2_decode", 0)?, (h as u32, b as u32, 1), 128, 0, &[
            Arg::Ptr(ptr(s1, l1, "decode state")?),
            Arg::Ptr(tensor_ptr(&self.conv_state, &[b, k - 1, cd], "conv state")?),
            Arg::Ptr(tensor_ptr(&self.xbc, &[b, cd], "xBC")?),
            Arg::Ptr(tensor_ptr(&self.dt, &[b, h], "dt")?),
            Arg::Ptr(tensor_ptr(&self.conv_weight, &[cd, k], "conv weight")?),
            Arg::Ptr(cb),
            Arg::Ptr(tensor_ptr(&self.a, &[h], "A")?),
            Arg::Ptr(tensor_ptr(&self.dt_bias, &[h], "dt_bias")?),
            Arg::Ptr(tensor_ptr(&self.d, d_dims, "D")?),
            Arg::I32(dh as i32),
            Arg::I32(dp),
            Arg::Ptr(po),
            Arg::I32(b as i32),
            Arg::I32(h as i32),
            Arg::I32(g as i32),
            Arg::F32(self.dt_limit.0),
            Arg::F32(self.dt_limit.1),
            Arg::I64(s_off as i64),
        ])?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(total)))
    }
}
