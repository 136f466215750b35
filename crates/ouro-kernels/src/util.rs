use candle_core::{backend::BackendStorage, bail, CpuStorage, DType, Layout, Result, Tensor};
use std::sync::Arc;

/// Document boundaries of a packed batch: `seq_idx` (batch, len) as in `mamba_ssm`. A position whose id
/// differs from its predecessor's starts a new document: the recurrent state and the causal conv
/// window are reset there. An incoming (initial) state belongs to the first document of each row.
#[derive(Clone, Debug, Default)]
pub struct Segments(Option<Arc<Vec<u32>>>);

impl Segments {
    pub fn none() -> Self {
        Self(None)
    }
    pub fn new(ids: Vec<u32>) -> Self {
        Self(Some(Arc::new(ids)))
    }
    pub fn from_tensor(t: Option<&Tensor>, batch: usize, len: usize) -> Result<Self> {
        match t {
            None => Ok(Self::none()),
            Some(t) => Ok(Self::new(seq_idx_to_vec(t, batch, len)?)),
        }
    }
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
    /// Document id of position `t` in row `b` (rows of length `len`).
    #[inline(always)]
    pub fn id(&self, b: usize, len: usize, t: usize) -> u32 {
        match &self.0 {
            None => 0,
            Some(v) => v[b * len + t],
        }
    }
    /// All ids (b·l), or `None` when the batch is unsegmented.
    pub fn ids(&self) -> Option<&[u32]> {
        self.0.as_deref().map(|v| v.as_slice())
    }
    /// Ids of row `b`, or `None` when the batch is unsegmented.
    #[inline]
    pub fn row(&self, b: usize, len: usize) -> Option<&[u32]> {
        self.0.as_ref().map(|v| &v[b * len..(b + 1) * len])
    }
}

/// Reads a `seq_idx` tensor (integer dtype, shape (batch, len), non-decreasing along each row).
pub fn seq_idx_to_vec(t: &Tensor, batch: usize, len: usize) -> Result<Vec<u32>> {
    if t.dims() != [batch, len] {
        bail!("seq_idx must have shape ({batch}, {len}) like the input, got {:?}", t.dims());
    }
    let v: Vec<u32> = match t.dtype() {
        DType::U32 => t.flatten_all()?.to_vec1::<u32>()?,
        DType::I64 => t.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|x| x as u32).collect(),
        DType::U8 => t.flatten_all()?.to_vec1::<u8>()?.into_iter().map(u32::from).collect(),
        dt => bail!("seq_idx must be an integer tensor (u32, i64, u8), got {dt:?}"),
    };
    for b in 0..batch {
        let row = &v[b * len..(b + 1) * len];
        if row.windows(2).any(|w| w[1] < w[0]) {
            bail!("seq_idx row {b} is not non-decreasing: documents must be contiguous");
        }
    }
    Ok(v)
}

/// The f32 data of a contiguous CPU tensor region.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        other => bail!("{what}: expected f32 data, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// Checks that `t` has exactly `dims`, naming the argument in the error.
pub(crate) fn expect_dims(t: &Tensor, dims: &[usize], what: &str) -> Result<()> {
    if t.dims() != dims {
        bail!("{what}: expected shape {dims:?}, got {:?}", t.dims());
    }
    Ok(())
}

/// Splits a contiguous f32 tensor into its data for a kernel (CPU) after making it contiguous f32.
pub(crate) fn to_f32_contig(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// A scalar (0) whose `backward()` hands `y` the gradient `dy` and nothing else: torch's `y.backward(dy)`
/// (a vector–Jacobian product) in candle, whose backward starts from a scalar. `dy` must have y's shape
/// and dtype.
pub fn grad_seed(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if y.shape() != dy.shape() || y.dtype() != dy.dtype() {
        bail!("grad_seed: dy {:?} {:?} does not match y {:?} {:?}", dy.dims(), dy.dtype(), y.dims(), y.dtype());
    }
    y.apply_op1(GradSeed { dy: dy.detach() })
}

struct GradSeed {
    dy: Tensor,
}

impl candle_core::CustomOp1 for GradSeed {
    fn name(&self) -> &'static str {
        "grad-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), candle_core::Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendDevice;
        let shape = candle_core::Shape::from(());
        Ok((s.device().zeros_impl(&shape, DType::F32)?, shape))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.dy.clone()))
    }
}

#[cfg(test)]
mod grad_seed_tests {
    use super::grad_seed;
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn seeds_the_gradient_of_y_with_dy() {
        // y = x² (elementwise): dL/dx = 2x·dy, the vector–Jacobian product with dy.
        let x = Var::from_tensor(&Tensor::new(&[[1f32, -2.0, 3.0], [0.5, 4.0, -1.0]], &Device::Cpu).unwrap()).unwrap();
        let dy = Tensor::new(&[[0.1f32, 1.0, -2.0], [3.0, 0.0, 0.5]], &Device::Cpu).unwrap();
        let y = x.as_tensor().sqr().unwrap();
        let seed = grad_seed(&y, &dy).unwrap();
        assert_eq!(seed.to_scalar::<f32>().unwrap(), 0.0);
        let g = seed.backward().unwrap();
        let got: Vec<f32> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, vec![0.2, -4.0, -12.0, 3.0, 0.0, -1.0]);
        assert!(grad_seed(&y, &dy.narrow(0, 0, 1).unwrap()).is_err());
    }
}
