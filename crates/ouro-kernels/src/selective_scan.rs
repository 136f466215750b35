//! Mamba-1's selective scan (S6), `mamba_ssm` `selective_scan_fn` semantics, channels-last.
//!
//! Per channel c (group g = c / (D/G)), with Δ = softplus(delta + delta_bias) when asked:
//!
//! ```text
//! h_t = exp(Δ_t·A_c) ⊙ h_{t−1} + Δ_t·u_t·B_{t,g}        h: (N)
//! y_t = ⟨h_t, C_{t,g}⟩ + D_c·u_t,   then y ⊙ SiLU(z) if z is given
//! ```
//!
//! The kernel runs the scan in f32 over blocks of channels in parallel; the backward pass recomputes the
//! states of its block and runs the adjoint recurrence in reverse. `seq_idx` resets h at document starts.
//! With the `cuda` feature the same op runs on CUDA devices (`cuda::selective_scan`, same layouts).

use crate::cpu::{dot, exp, SendPtr};
use crate::util::{cpu_f32, expect_dims, Segments};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// Channels per task.
const BLOCK: usize = 8;

/// Batch, length, channels, state size, groups of B/C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub l: usize,
    pub d: usize,
    pub n: usize,
    pub g: usize,
}

/// Kernel inputs (contiguous f32); `delta` is the final Δ (bias and softplus applied).
#[derive(Clone, Copy)]
pub struct ScanIn<'a> {
    /// (b, l, d)
    pub u: &'a [f32],
    /// (b, l, d)
    pub delta: &'a [f32],
    /// (d, n)
    pub a: &'a [f32],
    /// (b, l, g, n)
    pub bm: &'a [f32],
    /// (b, l, g, n)
    pub cm: &'a [f32],
    /// (b, d, n)
    pub h0: Option<&'a [f32]>,
    pub seg: &'a Segments,
}

fn blocks(dm: &Dims) -> usize {
    dm.d.div_ceil(BLOCK)
}

/// Forward scan: y (b, l, d) and final states (b, d, n).
pub fn scan_fwd(dm: Dims, inp: ScanIn, y: &mut [f32], h_final: &mut [f32]) {
    assert_eq!(y.len(), dm.b * dm.l * dm.d);
    assert_eq!(h_final.len(), dm.b * dm.d * dm.n);
    let yp = SendPtr(y.as_mut_ptr());
    let hp = SendPtr(h_final.as_mut_ptr());
    (0..dm.b * blocks(&dm)).into_par_iter().for_each(|task| {
        let (bi, blk) = (task / blocks(&dm), task % blocks(&dm));
        let c0 = blk * BLOCK;
        let cn = BLOCK.min(dm.d - c0);
        // SAFETY: channels [c0, c0+cn) of row bi belong to this task.
        let hf = unsafe { hp.slice((bi * dm.d + c0) * dm.n, cn * dm.n) };
        fwd_block(dm, &inp, bi, c0, cn, Some(yp), hf, None);
    });
}

/// Scans channels [c0, c0+cn) of row bi. `h` (cn, n) ends as the final state; when `hist` is given it
/// receives every state (l, cn, n).
#[multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn fwd_block(dm: Dims, inp: &ScanIn, bi: usize, c0: usize, cn: usize, y: Option<SendPtr>, h: &mut [f32], mut hist: Option<&mut [f32]>) {
    let Dims { l, d, n, g, .. } = dm;
    let cpg = d / g;
    match inp.h0 {
        Some(h0) => h.copy_from_slice(&h0[(bi * d + c0) * n..][..cn * n]),
        None => h.fill(0.0),
    }
    let seg = inp.seg.row(bi, l);
    let mut da = vec![0f32; n];
    for t in 0..l {
        if let Some(s) = seg {
            if t > 0 && s[t] != s[t - 1] {
                h.fill(0.0);
            }
        }
        let row = (bi * l + t) * d;
        for ci in 0..cn {
            let ch = c0 + ci;
            let gi = ch / cpg;
            let br = &inp.bm[((bi * l + t) * g + gi) * n..][..n];
            let cr = &inp.cm[((bi * l + t) * g + gi) * n..][..n];
            let (dl, uu) = (inp.delta[row + ch], inp.u[row + ch]);
            let ar = &inp.a[ch * n..(ch + 1) * n];
            for k in 0..n {
                da[k] = exp(dl * ar[k]);
            }
            let hs = &mut h[ci * n..(ci + 1) * n];
            let du = dl * uu;
            for k in 0..n {
                hs[k] = da[k] * hs[k] + du * br[k];
            }
            if let Some(y) = y {
                // SAFETY: element (b, t, ch) is written by this task only.
                unsafe { *y.0.add(row + ch) = dot(hs, cr) };
            }
        }
        if let Some(hist) = hist.as_deref_mut() {
            hist[t * cn * n..(t + 1) * cn * n].copy_from_slice(h);
        }
    }
}

/// Gradients, in the layouts of the inputs.
pub struct ScanGrads<'a> {
    pub du: &'a mut [f32],
    pub ddelta: &'a mut [f32],
    pub da: &'a mut [f32],
    pub dbm: &'a mut [f32],
    pub dcm: &'a mut [f32],
    pub dh0: &'a mut [f32],
}

/// Backward pass. `dy` (b, l, d), `dh_final` (b, d, n) or none.
pub fn scan_bwd(dm: Dims, inp: ScanIn, dy: &[f32], dh_final: Option<&[f32]>, gr: ScanGrads) {
    let Dims { b, l, d, n, g } = dm;
    let nb = blocks(&dm);
    let ptr = (SendPtr(gr.du.as_mut_ptr()), SendPtr(gr.ddelta.as_mut_ptr()), SendPtr(gr.dh0.as_mut_ptr()));
    // Each task returns its partial dA (cn, n) and dB/dC (l, n) for its group.
    let partials: Vec<(usize, usize, Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * nb)
        .into_par_iter()
        .map(|task| {
            let (bi, blk) = (task / nb, task % nb);
            let c0 = blk * BLOCK;
            let cn = BLOCK.min(d - c0);
            let mut da = vec![0f32; cn * n];
            let mut db = vec![0f32; l * g * n];
            let mut dc = vec![0f32; l * g * n];
            bwd_block(dm, &inp, dy, dh_final, bi, c0, cn, ptr, &mut da, &mut db, &mut dc);
            (bi, c0, da, db, dc)
        })
        .collect();
    gr.da.fill(0.0);
    gr.dbm.fill(0.0);
    gr.dcm.fill(0.0);
    for (bi, c0, da, db, dc) in partials {
        for (o, v) in gr.da[c0 * n..c0 * n + da.len()].iter_mut().zip(&da) {
            *o += v;
        }
        let off = bi * l * g * n;
        for (o, v) in gr.dbm[off..off + l * g * n].iter_mut().zip(&db) {
            *o += v;
        }
        for (o, v) in gr.dcm[off..off + l * g * n].iter_mut().zip(&dc) {
            *o += v;
        }
    }
}

#[multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn bwd_block(
    dm: Dims,
    inp: &ScanIn,
    dy: &[f32],
    dh_final: Option<&[f32]>,
    bi: usize,
    c0: usize,
    cn: usize,
    (du, ddelta, dh0): (SendPtr, SendPtr, SendPtr),
    da_acc: &mut [f32],
    db: &mut [f32],
    dc: &mut [f32],
) {
    let Dims { l, d, n, g, .. } = dm;
    let cpg = d / g;
    let mut hist = vec![0f32; l * cn * n];
    let mut h = vec![0f32; cn * n];
    fwd_block(dm, inp, bi, c0, cn, None, &mut h, Some(&mut hist));
    // SAFETY (all writes below): channels [c0, c0+cn) of row bi belong to this task.
    let dh = unsafe { dh0.slice((bi * d + c0) * n, cn * n) };
    match dh_final {
        Some(df) => dh.copy_from_slice(&df[(bi * d + c0) * n..][..cn * n]),
        None => dh.fill(0.0),
    }
    let seg = inp.seg.row(bi, l);
    let zeros = vec![0f32; n];
    let mut dav = vec![0f32; n];
    let mut t_dd = vec![0f32; n];
    for t in (0..l).rev() {
        let reset = seg.is_some_and(|s| t > 0 && s[t] != s[t - 1]);
        let row = (bi * l + t) * d;
        for ci in 0..cn {
            let ch = c0 + ci;
            let gi = ch / cpg;
            let bo = ((bi * l + t) * g + gi) * n;
            let lo = (t * g + gi) * n;
            let br = &inp.bm[bo..bo + n];
            let cr = &inp.cm[bo..bo + n];
            let (dl, uu) = (inp.delta[row + ch], inp.u[row + ch]);
            let ar = &inp.a[ch * n..(ch + 1) * n];
            let h_t = &hist[(t * cn + ci) * n..][..n];
            let h_prev: &[f32] = if reset {
                &zeros
            } else if t > 0 {
                &hist[((t - 1) * cn + ci) * n..][..n]
            } else {
                match inp.h0 {
                    Some(h0) => &h0[(bi * d + ch) * n..][..n],
                    None => &zeros,
                }
            };
            let dyv = dy[row + ch];
            let dhs = &mut dh[ci * n..(ci + 1) * n];
            // y_t = ⟨h_t, C_t⟩
            for k in 0..n {
                dhs[k] += dyv * cr[k];
                dc[lo + k] += dyv * h_t[k];
            }
            for k in 0..n {
                dav[k] = exp(dl * ar[k]);
            }
            // h_t = dA ⊙ h_prev + Δ·u·B. The per-k terms of dΔ and du go to vectors and are reduced with
            // `dot` (independent accumulators), so that this loop vectorises without fast-math.
            let dar = &mut da_acc[ci * n..(ci + 1) * n];
            for k in 0..n {
                let gdh = dhs[k];
                let dah = dav[k] * h_prev[k];
                t_dd[k] = ar[k] * dah + uu * br[k];
                dar[k] += gdh * dl * dah;
                db[lo + k] += gdh * dl * uu;
            }
            let dd = dot(dhs, &t_dd);
            let duv = dot(dhs, br);
            unsafe {
                *ddelta.0.add(row + ch) = dd;
                *du.0.add(row + ch) = duv * dl;
            }
            if reset {
                dhs.fill(0.0);
            } else {
                for k in 0..n {
                    dhs[k] *= dav[k];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The candle op. Packed inputs: ud (b, l, 2, d) = [u; Δ], ah (b+1, d, n) = [A; h0], bc (b, l, g, 2n).
// Output: 1-D [y (b·l·d) | final states (b·d·n)].
// ---------------------------------------------------------------------------------------------

struct Unpacked {
    u: Vec<f32>,
    delta: Vec<f32>,
    bm: Vec<f32>,
    cm: Vec<f32>,
}

fn dims_of(lu: &Layout, lbc: &Layout, la: &Layout) -> Result<Dims> {
    let (b, l, _, d) = lu.shape().dims4()?;
    let (_, _, g, n2) = lbc.shape().dims4()?;
    let _ = la;
    Ok(Dims { b, l, d, n: n2 / 2, g })
}

fn unpack(dm: &Dims, ud: &[f32], bc: &[f32]) -> Unpacked {
    let Dims { b, l, d, n, g } = *dm;
    let mut u = vec![0f32; b * l * d];
    let mut delta = vec![0f32; b * l * d];
    for r in 0..b * l {
        u[r * d..(r + 1) * d].copy_from_slice(&ud[2 * r * d..(2 * r + 1) * d]);
        delta[r * d..(r + 1) * d].copy_from_slice(&ud[(2 * r + 1) * d..(2 * r + 2) * d]);
    }
    let mut bm = vec![0f32; b * l * g * n];
    let mut cm = vec![0f32; b * l * g * n];
    for r in 0..b * l * g {
        bm[r * n..(r + 1) * n].copy_from_slice(&bc[2 * r * n..(2 * r + 1) * n]);
        cm[r * n..(r + 1) * n].copy_from_slice(&bc[(2 * r + 1) * n..(2 * r + 2) * n]);
    }
    Unpacked { u, delta, bm, cm }
}

struct ScanOp {
    seg: Segments,
}

impl CustomOp3 for ScanOp {
    fn name(&self) -> &'static str {
        "selective-scan"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims_of(l1, l3, l2)?;
        let up = unpack(&dm, cpu_f32(s1, l1, "selective scan u/delta")?, cpu_f32(s3, l3, "selective scan B/C")?);
        let ah = cpu_f32(s2, l2, "selective scan A/h0")?;
        let (a, h0) = ah.split_at(dm.d * dm.n);
        let inp = ScanIn { u: &up.u, delta: &up.delta, a, bm: &up.bm, cm: &up.cm, h0: Some(h0), seg: &self.seg };
        let ny = dm.b * dm.l * dm.d;
        let mut out = vec![0f32; ny + dm.b * dm.d * dm.n];
        let (y, hf) = out.split_at_mut(ny);
        scan_fwd(dm, inp, y, hf);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::selective_scan::fwd(dims_of(l1, l3, l2)?, &self.seg, (s1, l1), (s2, l2), (s3, l3))
    }
    fn bwd(
        &self,
        ud: &Tensor,
        ah: &Tensor,
        bc: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = Tensor::cat(&[&ah.detach().flatten_all()?, &grad.detach().flatten_all()?], 0)?;
        let g = ud.detach().apply_op3_no_bwd(&bc.detach(), &packed, &ScanBwdOp { seg: self.seg.clone() })?;
        let (nu, nbc) = (ud.elem_count(), bc.elem_count());
        let dud = g.narrow(0, 0, nu)?.reshape(ud.shape())?;
        let dbc = g.narrow(0, nu, nbc)?.reshape(bc.shape())?;
        let dah = g.narrow(0, nu + nbc, ah.elem_count())?.reshape(ah.shape())?;
        Ok((Some(dud), Some(dah), Some(dbc)))
    }
}

/// (ud, bc, [A | h0 | dy | dh_final]) → 1-D [dud | dbc | dA | dh0].
struct ScanBwdOp {
    seg: Segments,
}

impl CustomOp3 for ScanBwdOp {
    fn name(&self) -> &'static str {
        "selective-scan-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims_of(l1, l2, l3)?;
        let Dims { b, l, d, n, g } = dm;
        let up = unpack(&dm, cpu_f32(s1, l1, "selective scan u/delta")?, cpu_f32(s2, l2, "selective scan B/C")?);
        let packed = cpu_f32(s3, l3, "selective scan grads")?;
        let (a, rest) = packed.split_at(d * n);
        let (h0, rest) = rest.split_at(b * d * n);
        let (dy, dhf) = rest.split_at(b * l * d);
        let inp = ScanIn { u: &up.u, delta: &up.delta, a, bm: &up.bm, cm: &up.cm, h0: Some(h0), seg: &self.seg };
        let mut du = vec![0f32; b * l * d];
        let mut ddelta = vec![0f32; b * l * d];
        let mut da = vec![0f32; d * n];
        let mut dbm = vec![0f32; b * l * g * n];
        let mut dcm = vec![0f32; b * l * g * n];
        let mut dh0 = vec![0f32; b * d * n];
        let gr = ScanGrads { du: &mut du, ddelta: &mut ddelta, da: &mut da, dbm: &mut dbm, dcm: &mut dcm, dh0: &mut dh0 };
        scan_bwd(dm, inp, dy, Some(dhf), gr);
        let mut out = Vec::with_capacity(2 * b * l * d + 2 * b * l * g * n + (b + 1) * d * n);
        for r in 0..b * l {
            out.extend_from_slice(&du[r * d..(r + 1) * d]);
            out.extend_from_slice(&ddelta[r * d..(r + 1) * d]);
        }
        for r in 0..b * l * g {
            out.extend_from_slice(&dbm[r * n..(r + 1) * n]);
            out.extend_from_slice(&dcm[r * n..(r + 1) * n]);
        }
        out.extend_from_slice(&da);
        out.extend_from_slice(&dh0);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::selective_scan::bwd(dims_of(l1, l2, l3)?, &self.seg, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// Inputs of [`selective_scan`], as `selective_scan_fn` (channels-last).
#[derive(Clone, Copy)]
pub struct ScanInput<'a> {
    /// (b, l, d)
    pub u: &'a Tensor,
    /// (b, l, d), raw
    pub delta: &'a Tensor,
    /// A (d, n), negative
    pub a: &'a Tensor,
    /// (b, l, n) or (b, l, g, n)
    pub b: &'a Tensor,
    /// (b, l, n) or (b, l, g, n)
    pub c: &'a Tensor,
    /// (d)
    pub d: Option<&'a Tensor>,
    /// (b, l, d)
    pub z: Option<&'a Tensor>,
    /// (d)
    pub delta_bias: Option<&'a Tensor>,
    pub delta_softplus: bool,
    /// (b, d, n)
    pub initial_state: Option<&'a Tensor>,
    /// (b, l)
    pub seq_idx: Option<&'a Tensor>,
}

impl<'a> ScanInput<'a> {
    pub fn new(u: &'a Tensor, delta: &'a Tensor, a: &'a Tensor, b: &'a Tensor, c: &'a Tensor) -> Self {
        Self {
            u,
            delta,
            a,
            b,
            c,
            d: None,
            z: None,
            delta_bias: None,
            delta_softplus: false,
            initial_state: None,
            seq_idx: None,
        }
    }
}

fn as_grouped(t: &Tensor, b: usize, l: usize, what: &str) -> Result<Tensor> {
    match t.dims() {
        &[bb, ll, n] if bb == b && ll == l => t.reshape((b, l, 1, n)),
        &[bb, ll, _, _] if bb == b && ll == l => Ok(t.clone()),
        s => bail!("selective_scan: {what} must be ({b}, {l}, n) or ({b}, {l}, groups, n), got shape {s:?}"),
    }
}

/// Δ after bias and softplus (f32).
fn process_delta(delta: &Tensor, bias: Option<&Tensor>, softplus: bool) -> Result<Tensor> {
    let mut dl = delta.to_dtype(DType::F32)?;
    if let Some(bias) = bias {
        dl = dl.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    if softplus {
        dl = crate::act::softplus(&dl)?;
    }
    Ok(dl)
}

/// Mamba-1 selective scan with the options of `selective_scan_fn`. Returns y (b, l, d) in u's dtype and
/// the last state (b, d, n) in f32. Differentiable w.r.t. every tensor input.
pub fn selective_scan(inp: &ScanInput) -> Result<(Tensor, Tensor)> {
    let (b, l, d) = match inp.u.dims() {
        &[b, l, d] => (b, l, d),
        s => bail!("selective_scan: u must be (batch, len, channels), got shape {s:?}"),
    };
    if l == 0 {
        bail!("selective_scan: empty sequence (len 0)");
    }
    expect_dims(inp.delta, &[b, l, d], "selective_scan: delta")?;
    let (ad, n) = inp.a.dims2().map_err(|_| candle_core::Error::Msg(format!("selective_scan: A must be (d, n), got shape {:?}", inp.a.dims())))?;
    if ad != d {
        bail!("selective_scan: A has {ad} channels, u has {d}");
    }
    let bm = as_grouped(inp.b, b, l, "B")?;
    let cm = as_grouped(inp.c, b, l, "C")?;
    let g = bm.dim(2)?;
    if bm.dim(3)? != n {
        bail!("selective_scan: B has state size {}, A has {n}", bm.dim(3)?);
    }
    expect_dims(&cm, &[b, l, g, n], "selective_scan: C")?;
    if d % g != 0 {
        bail!("selective_scan: channels ({d}) must be divisible by groups ({g})");
    }
    if let Some(t) = inp.d {
        expect_dims(t, &[d], "selective_scan: D")?;
    }
    if let Some(t) = inp.z {
        expect_dims(t, &[b, l, d], "selective_scan: z")?;
    }
    if let Some(t) = inp.delta_bias {
        expect_dims(t, &[d], "selective_scan: delta_bias")?;
    }
    if let Some(t) = inp.initial_state {
        expect_dims(t, &[b, d, n], "selective_scan: initial_state")?;
    }
    let seg = Segments::from_tensor(inp.seq_idx, b, l)?;
    let u = inp.u.to_dtype(DType::F32)?;
    let delta = process_delta(inp.delta, inp.delta_bias, inp.delta_softplus)?;
    let ud = Tensor::stack(&[&u, &delta], 2)?.contiguous()?; // (b, l, 2, d)
    let h0 = match inp.initial_state {
        Some(h) => h.to_dtype(DType::F32)?,
        None => Tensor::zeros((b, d, n), DType::F32, u.device())?,
    };
    let ah = Tensor::cat(&[&inp.a.to_dtype(DType::F32)?.unsqueeze(0)?, &h0], 0)?.contiguous()?;
    let bc = Tensor::cat(&[&bm.to_dtype(DType::F32)?, &cm.to_dtype(DType::F32)?], 3)?.contiguous()?;
    if !(u.device().is_cpu() || u.device().is_cuda()) {
        bail!("selective_scan: runs on the CPU and on CUDA devices, not on {:?}", u.device().location());
    }
    let out = ud.apply_op3(&ah, &bc, ScanOp { seg })?;
    let mut y = out.narrow(0, 0, b * l * d)?.reshape((b, l, d))?;
    let last = out.narrow(0, b * l * d, b * d * n)?.reshape((b, d, n))?;
    if let Some(dd) = inp.d {
        y = (y + u.broadcast_mul(&dd.to_dtype(DType::F32)?)?)?;
    }
    if let Some(z) = inp.z {
        y = (y * z.to_dtype(DType::F32)?.silu()?)?;
    }
    Ok((y.to_dtype(inp.u.dtype())?, last))
}

/// One recurrent step for a batch of single tokens, in candle ops. state (b, d, n); u, delta (b, d);
/// A (d, n); B, C (b, n) or (b, g, n); D (d); z (b, d). Returns (y (b, d), new state).
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_step(
    state: &Tensor,
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    bm: &Tensor,
    cm: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
    delta_softplus: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, dd, n) = state.dims3()?;
    expect_dims(u, &[b, dd], "selective_scan_step: u")?;
    expect_dims(delta, &[b, dd], "selective_scan_step: delta")?;
    let per_channel = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        let t = if t.rank() == 2 { t.unsqueeze(1)? } else { t }; // (b, g, n)
        let g = t.dim(1)?;
        if dd % g != 0 {
            bail!("selective_scan_step: channels ({dd}) must be divisible by groups ({g})");
        }
        t.unsqueeze(2)?.expand((b, g, dd / g, n))?.reshape((b, dd, n))
    };
    let (bc, cc) = (per_channel(bm)?, per_channel(cm)?);
    let u = u.to_dtype(DType::F32)?;
    let dl = process_delta(delta, delta_bias, delta_softplus)?; // (b, d)
    let da = dl.unsqueeze(2)?.broadcast_mul(&a.to_dtype(DType::F32)?.unsqueeze(0)?)?.exp()?; // (b, d, n)
    let new_state = (state.mul(&da)? + bc.broadcast_mul(&(&dl * &u)?.unsqueeze(2)?)?)?;
    let mut y = new_state.mul(&cc)?.sum(2)?;
    if let Some(dv) = d {
        y = (y + u.broadcast_mul(&dv.to_dtype(DType::F32)?)?)?;
    }
    if let Some(z) = z {
        y = (y * z.to_dtype(DType::F32)?.silu()?)?;
    }
    Ok((y, new_state))
}
