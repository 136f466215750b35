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
