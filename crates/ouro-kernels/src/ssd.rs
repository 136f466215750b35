//! Mamba-2's SSD layer (state space duality), `mamba_ssm` semantics.
//!
//! Per head h (group g = h / (H/G)), with dt already biased/softplus'd/clamped, X_t = dt_t·x_t and
//! a_t = dt_t·A_h (the log of the per-step decay):
//!
//! ```text
//! S_t = exp(a_t)·S_{t−1} + X_t ⊗ B_{t,g}        S: (P, N)
//! y_t = S_t·C_{t,g} + D_h·x_t,   then y ⊙ SiLU(z) if z is given
//! ```
//!
//! computed three ways that must agree: [`Algo::Recurrent`] (the scan above), [`Algo::Chunked`] (the SSD
//! algorithm: quadratic "attention" inside chunks of Q steps, a recurrence over chunk states between
//! them — `ssd_minimal_discrete`), and [`Algo::Quadratic`] (the whole L×L semiseparable matrix from
//! [`materialize`], times X). Document boundaries (`seq_idx`) reset the state.
//!
//! The slice-level kernels work on the discretised inputs (X, a, B, C, S₀); [`ssd`] does the
//! preprocessing (dt bias, softplus, clamp), the D skip and the z gate with candle ops, so that all of it
//! is differentiable. The chunked backward pass is hand-written and serves both fast algorithms.

use crate::cpu::{dot, exp, matmul, Mat, SendPtr};
use crate::util::{cpu_f32, expect_dims, to_f32_contig, Segments};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use multiversion::multiversion;
use rayon::prelude::*;

/// Chunk size for the CPU kernels: the result does not depend on it (up to rounding), and on AVX-512
/// CPUs 24–32 runs fastest (see docs/performance.md); GPU kernels use the checkpoint's chunk size.
pub const CPU_CHUNK: usize = 32;

/// How far the CUDA kernels, which take no document ids, lower the log-decay a_t of a document's first
/// position: the state entering it (the previous document's) is then scaled by exp(a_t − 24) < 4e-11, below
/// f32's rounding (6e-8) of what the document adds, while the decays inside a document are unchanged
/// (they are differences of cumulative sums, from which the offset cancels). The decay a_t itself
/// multiplies nothing else, so its gradient is the same ~0 as under an exact reset. Each boundary in a
/// chunk adds 24 to the magnitude of that chunk's cumulative sums, and with it a rounding of 2⁻²⁴·24·k to
/// their differences (k boundaries before the position in the chunk): 2e-5 relative at k = 16.
pub const DOC_START_DECAY: f64 = 24.0;

/// (b, l, 1) f32 on `dev`, or None without documents: −[`DOC_START_DECAY`] where a position's document
/// id differs from its predecessor's, 0 elsewhere. Added to the log-decay, it resets the state at every
/// boundary, the first document of a row taking the initial state, as the exact masks of the CPU path do.
pub fn doc_start_decay(seg: &Segments, b: usize, l: usize, dev: &candle_core::Device) -> Result<Option<Tensor>> {
    let Some(ids) = seg.ids() else { return Ok(None) };
    let v: Vec<f32> = (0..b * l).map(|i| if i % l > 0 && ids[i] != ids[i - 1] { -DOC_START_DECAY as f32 } else { 0.0 }).collect();
    Tensor::from_vec(v, (b, l, 1), dev).map(Some)
}

/// Problem sizes: batch, length, heads, head dim, groups, state size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub l: usize,
    pub h: usize,
    pub p: usize,
    pub g: usize,
    pub n: usize,
}

impl Dims {
    /// Heads per group.
    #[inline]
    pub fn hpg(&self) -> usize {
        self.h / self.g
    }
    fn chunks(&self, q: usize) -> usize {
        self.l.div_ceil(q)
    }
}

/// Discretised kernel inputs (contiguous f32).
#[derive(Clone, Copy)]
pub struct ScanIn<'a> {
    /// X = dt·x, (b, l, h, p)
    pub x: &'a [f32],
    /// a = dt·A, (b, l, h)
    pub a: &'a [f32],
    /// (b, l, g, n)
    pub bm: &'a [f32],
    /// (b, l, g, n)
    pub cm: &'a [f32],
    /// Initial states (b, h, p, n); zero when absent.
    pub s0: Option<&'a [f32]>,
    pub seg: &'a Segments,
}

/// The algorithm computing the scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// The SSD chunked algorithm with this chunk size.
    Chunked(usize),
    /// The sequential recurrence.
    Recurrent,
    /// The materialised L×L matrix (candle ops; memory O(L²)).
    Quadratic,
}

// ---------------------------------------------------------------------------------------------
// Sequential recurrence.
// ---------------------------------------------------------------------------------------------

/// The recurrence, one (batch, head) per task. Writes y (b, l, h, p) and the final states (b, h, p, n).
pub fn scan_recurrent(d: Dims, inp: ScanIn, y: &mut [f32], s_final: &mut [f32]) {
    let Dims { b, l, h, p, n, .. } = d;
    assert_eq!(y.len(), b * l * h * p);
    assert_eq!(s_final.len(), b * h * p * n);
    let yp = SendPtr(y.as_mut_ptr());
    s_final.par_chunks_mut(p * n).enumerate().for_each(|(bh, st)| {
        recurrent_one(d, &inp, bh / h, bh % h, yp, st);
    });
}

#[multiversion(targets = "simd")]
fn recurrent_one(d: Dims, inp: &ScanIn, bi: usize, hi: usize, y: SendPtr, st: &mut [f32]) {
    let Dims { l, h, p, g, n, .. } = d;
    let gi = hi / d.hpg();
    match inp.s0 {
        Some(s0) => st.copy_from_slice(&s0[(bi * h + hi) * p * n..][..p * n]),
        None => st.fill(0.0),
    }
    let seg = inp.seg.row(bi, l);
    for t in 0..l {
        if let Some(s) = seg {
            if t > 0 && s[t] != s[t - 1] {
                st.fill(0.0);
            }
        }
        let row = (bi * l + t) * h + hi;
        let decay = exp(inp.a[row]);
        let xr = &inp.x[row * p..][..p];
        let br = &inp.bm[((bi * l + t) * g + gi) * n..][..n];
        let cr = &inp.cm[((bi * l + t) * g + gi) * n..][..n];
        // SAFETY: each (b, t, h) row of y is written by exactly one task.
        let yr = unsafe { y.slice(row * p, p) };
        for (i, si) in st.chunks_exact_mut(n).enumerate() {
            let xi = xr[i];
            for k in 0..n {
                si[k] = decay * si[k] + xi * br[k];
            }
            yr[i] = dot(si, cr);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked SSD.
// ---------------------------------------------------------------------------------------------

/// One chunk of one row: positions [t0, t0 + q) and their document structure.
struct Chunk<'s> {
    t0: usize,
    q: usize,
    /// Document ids of the chunk's positions (None: one document).
    sid: Option<&'s [u32]>,
    /// Document the incoming state belongs to.
    prev: u32,
}

impl<'s> Chunk<'s> {
    fn new(d: &Dims, seg: &'s Segments, bi: usize, c: usize, q_max: usize) -> Self {
        let t0 = c * q_max;
        let q = q_max.min(d.l - t0);
        let row = seg.row(bi, d.l);
        let sid = row.map(|r| &r[t0..t0 + q]);
        let prev = row.map_or(0, |r| if t0 == 0 { r[0] } else { r[t0 - 1] });
        Self { t0, q, sid, prev }
    }
    #[inline(always)]
    fn same(&self, i: usize, j: usize) -> bool {
        self.sid.is_none_or(|s| s[i] == s[j])
    }
    /// Position i still sees the incoming state.
    #[inline(always)]
    fn sees_prev(&self, i: usize) -> bool {
        self.sid.is_none_or(|s| s[i] == self.prev)
    }
    /// Position j contributes to the outgoing state.
    #[inline(always)]
    fn reaches_end(&self, j: usize) -> bool {
        self.sid.is_none_or(|s| s[j] == s[self.q - 1])
    }
}

/// Per-(chunk, head) decay factors.
struct Decay {
    /// Inclusive cumulative sum of a over the chunk.
    acum: Vec<f32>,
    /// e_i = exp(acum_i): decay of the incoming state to position i (0 across a boundary).
    e: Vec<f32>,
    /// w_j = exp(acum_end − acum_j): decay of position j's input to the chunk end (0 across a boundary).
    w: Vec<f32>,
    /// exp(acum_end): decay of the incoming state across the whole chunk.
    alpha: f32,
}

impl Decay {
    fn new(q_max: usize) -> Self {
        Self { acum: vec![0.0; q_max], e: vec![0.0; q_max], w: vec![0.0; q_max], alpha: 0.0 }
    }
    fn compute(&mut self, d: &Dims, a: &[f32], bi: usize, hi: usize, ch: &Chunk) {
        let q = ch.q;
        let mut s = 0f32;
        for i in 0..q {
            s += a[(bi * d.l + ch.t0 + i) * d.h + hi];
            self.acum[i] = s;
        }
        let end = self.acum[q - 1];
        for i in 0..q {
            self.e[i] = if ch.sees_prev(i) { exp(self.acum[i]) } else { 0.0 };
            self.w[i] = if ch.reaches_end(i) { exp(end - self.acum[i]) } else { 0.0 };
        }
        self.alpha = if ch.sees_prev(q - 1) { exp(end) } else { 0.0 };
    }
    /// L[i, j] = exp(acum_i − acum_j) for j ≤ i in one document, else 0. Writes a (q, q) matrix.
    fn fill_l(&self, ch: &Chunk, l_mat: &mut [f32]) {
        let q = ch.q;
        let mut start = 0; // first position of i's document inside the chunk (documents are contiguous)
        for i in 0..q {
            if i > 0 && !ch.same(i, i - 1) {
                start = i;
            }
            let row = &mut l_mat[i * q..(i + 1) * q];
            row[..start].fill(0.0);
            exp_diff(self.acum[i], &self.acum[start..=i], &mut row[start..=i]);
            row[i + 1..].fill(0.0);
        }
    }
}

/// out[j] = exp(a − b[j]).
#[multiversion(targets = "simd")]
fn exp_diff(a: f32, b: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(b) {
        *o = exp(a - v);
    }
}

/// Offsets of row (b, t) of the (b, l, h, p) and (b, l, g, n) layouts.
#[inline(always)]
fn x_off(d: &Dims, bi: usize, t: usize, hi: usize) -> usize {
    ((bi * d.l + t) * d.h + hi) * d.p
}
#[inline(always)]
fn bc_off(d: &Dims, bi: usize, t: usize, gi: usize) -> usize {
    ((bi * d.l + t) * d.g + gi) * d.n
}

/// The chunked SSD forward. Writes y (b, l, h, p) and the final states (b, h, p, n).
///
/// One task per (batch, block of heads in a group) sweeps the chunks in order, carrying its heads'
/// states (P×N each, cache-resident): per chunk, G = C·Bᵀ once for the block, then per head
/// Y = (G ∘ L)·X + diag(e)·C·Sᵀ and S ← α·S + Xᵀ·diag(w)·B. Inputs are read once and nothing of size
/// O(L·P·N) is materialised. Blocks split a group's heads only as far as needed to feed every thread.
pub fn scan_chunked(d: Dims, q_max: usize, inp: ScanIn, y: &mut [f32], s_final: &mut [f32]) {
    let Dims { b, l, h, p, g, n } = d;
    assert!(q_max > 0);
    assert_eq!(y.len(), b * l * h * p);
    assert_eq!(s_final.len(), b * h * p * n);
    let hpg = d.hpg();
    let (blocks_per_group, hb) = head_blocks(&d);
    let yp = SendPtr(y.as_mut_ptr());
    let sp = SendPtr(s_final.as_mut_ptr());
    (0..b * g * blocks_per_group).into_par_iter().for_each(|task| {
        let blk = task % blocks_per_group;
        let gi = (task / blocks_per_group) % g;
        let bi = task / (blocks_per_group * g);
        let h0 = gi * hpg + blk * hb;
        let h1 = (h0 + hb).min((gi + 1) * hpg);
        // SAFETY: heads [h0, h1) of row bi (their states and outputs) belong to this task.
        let states = unsafe { sp.slice((bi * h + h0) * p * n, (h1 - h0) * p * n) };
        fwd_sweep(d, q_max, &inp, bi, gi, h0, h1, yp, states);
    });
}

#[allow(clippy::too_many_arguments)]
fn fwd_sweep(d: Dims, q_max: usize, inp: &ScanIn, bi: usize, gi: usize, h0: usize, h1: usize, y: SendPtr, states: &mut [f32]) {
    let Dims { h, p, g, n, .. } = d;
    let pn = p * n;
    match inp.s0 {
        Some(s0) => states.copy_from_slice(&s0[(bi * h + h0) * pn..(bi * h + h1) * pn]),
        None => states.fill(0.0),
    }
    let mut sc = ChunkScratch::new(q_max, p.max(n));
    for c in 0..d.chunks(q_max) {
        let ch = Chunk::new(&d, inp.seg, bi, c, q_max);
        let q = ch.q;
        let bco = bc_off(&d, bi, ch.t0, gi);
        fill_g(&d, inp, bi, gi, &ch, &mut sc.gm);
        for hi in h0..h1 {
            let s_h = &mut states[(hi - h0) * pn..(hi - h0 + 1) * pn];
            sc.dec.compute(&d, inp.a, bi, hi, &ch);
            sc.dec.fill_l(&ch, &mut sc.lm);
            for ((m, &gv), &lv) in sc.mm[..q * q].iter_mut().zip(&sc.gm[..q * q]).zip(&sc.lm[..q * q]) {
                *m = gv * lv;
            }
            let xo = x_off(&d, bi, ch.t0, hi);
            // Ce = diag(e) C (q, n)
            for i in 0..q {
                let ei = sc.dec.e[i];
                for (o, &cv) in sc.t1[i * n..(i + 1) * n].iter_mut().zip(&inp.cm[bco + i * g * n..][..n]) {
                    *o = ei * cv;
                }
            }
            unsafe {
                // Y = M·X ; Y += Ce·Sᵀ
                matmul(q, p, q, y.0.add(xo), h * p, 0.0, Mat::rows(&sc.mm, 0, q), Mat::rows(inp.x, xo, h * p), 1.0);
                matmul(q, p, n, y.0.add(xo), h * p, 1.0, Mat::rows(&sc.t1, 0, n), Mat::rows_t(s_h, 0, n), 1.0);
            }
            // S = α·S + Xᵀ·diag(w)·B
            state_update(&d, inp, bi, gi, hi, &ch, &sc.dec, &mut sc.t2, s_h);
        }
    }
}

struct ChunkScratch {
    dec: Decay,
    gm: Vec<f32>,  // (q, q) C Bᵀ
    lm: Vec<f32>,  // (q, q) decays
    mm: Vec<f32>,  // (q, q) M = G ∘ L
    dm: Vec<f32>,  // (q, q)
    dg: Vec<f32>,  // (q, q)
    t1: Vec<f32>,  // (q, max(p, n))
    t2: Vec<f32>,  // (q, max(p, n))
    t3: Vec<f32>,  // (q, max(p, n))
    dacum: Vec<f32>,
}

impl ChunkScratch {
    fn new(q: usize, w: usize) -> Self {
        Self {
            dec: Decay::new(q),
            gm: vec![0.0; q * q],
            lm: vec![0.0; q * q],
            mm: vec![0.0; q * q],
            dm: vec![0.0; q * q],
            dg: vec![0.0; q * q],
            t1: vec![0.0; q * w],
            t2: vec![0.0; q * w],
            t3: vec![0.0; q * w],
            dacum: vec![0.0; q],
        }
    }
}

/// G = C·Bᵀ for one (batch, chunk, group): shared by the group's heads.
fn fill_g(d: &Dims, inp: &ScanIn, bi: usize, gi: usize, ch: &Chunk, gm: &mut [f32]) {
    let off = bc_off(d, bi, ch.t0, gi);
    unsafe {
        matmul(
            ch.q,
            ch.q,
            d.n,
            gm.as_mut_ptr(),
            ch.q,
            0.0,
            Mat::rows(inp.cm, off, d.g * d.n),
            Mat::rows_t(inp.bm, off, d.g * d.n),
            1.0,
        );
    }
}

/// Gradients of the scan, all with the layouts of the inputs.
pub struct ScanGrads<'a> {
    pub dx: &'a mut [f32],
    pub da: &'a mut [f32],
    pub dbm: &'a mut [f32],
    pub dcm: &'a mut [f32],
    pub ds0: &'a mut [f32],
}

/// Chunks per checkpoint segment of the backward sweep: states are stored at segment starts and
/// recomputed inside a segment, so the backward pass keeps O(L·P·N / SEGMENT) floats per head.
const SEGMENT: usize = 8;

/// How a group's heads are split into blocks so that every thread has work: (blocks per group, heads per block).
fn head_blocks(d: &Dims) -> (usize, usize) {
    let hpg = d.hpg();
    let want = 2 * rayon::current_num_threads();
    let hb = hpg.div_ceil(want.div_ceil(d.b * d.g).clamp(1, hpg));
    (hpg.div_ceil(hb), hb)
}

/// S ← α·S + Xᵀ·diag(w)·B for head `hi` over chunk `ch` (decays in `dec`; `xw` is (q, p) scratch).
#[allow(clippy::too_many_arguments)]
fn state_update(d: &Dims, inp: &ScanIn, bi: usize, gi: usize, hi: usize, ch: &Chunk, dec: &Decay, xw: &mut [f32], s_h: &mut [f32]) {
    let (h, p, n) = (d.h, d.p, d.n);
    let xo = x_off(d, bi, ch.t0, hi);
    for j in 0..ch.q {
        let wj = dec.w[j];
        for (o, &xv) in xw[j * p..(j + 1) * p].iter_mut().zip(&inp.x[xo + j * h * p..][..p]) {
            *o = wj * xv;
        }
    }
    unsafe {
        matmul(p, n, ch.q, s_h.as_mut_ptr(), n, dec.alpha, Mat::rows_t(xw, 0, p), Mat::rows(inp.bm, bc_off(d, bi, ch.t0, gi), d.g * n), 1.0);
    }
}

/// Backward pass of the scan (any algorithm: it is the gradient of the function), via the chunked
/// decomposition. `dy` (b, l, h, p), `ds_final` (b, h, p, n) or none.
///
/// One task per (batch, block of heads) sweeps forward to checkpoint the states, then backward over
/// the chunks carrying each head's state gradient D (the gradient w.r.t. the state at the chunk's end):
/// D ← α·D + Σ_i e_i dY_i ⊗ C_i. dB and dC, shared by a group's heads, go to per-block partial sums
/// when a group is split over several tasks.
pub fn scan_chunked_bwd(d: Dims, q_max: usize, inp: ScanIn, dy: &[f32], ds_final: Option<&[f32]>, gr: ScanGrads) {
    let Dims { b, l, h, p, g, n } = d;
    let hpg = d.hpg();
    let pn = p * n;
    let (bpg, hb) = head_blocks(&d);
    let nbc = b * l * g * n;
    let mut partial = if bpg > 1 { vec![0f32; bpg * 2 * nbc] } else { Vec::new() };
    let (dxp, dap, dbp, dcp, pp) = (
        SendPtr(gr.dx.as_mut_ptr()),
        SendPtr(gr.da.as_mut_ptr()),
        SendPtr(gr.dbm.as_mut_ptr()),
        SendPtr(gr.dcm.as_mut_ptr()),
        SendPtr(partial.as_mut_ptr()),
    );
    let ds0p = SendPtr(gr.ds0.as_mut_ptr());
    (0..b * g * bpg).into_par_iter().for_each(|task| {
        let blk = task % bpg;
        let gi = (task / bpg) % g;
        let bi = task / (bpg * g);
        let h0 = gi * hpg + blk * hb;
        let h1 = (h0 + hb).min((gi + 1) * hpg);
        let (db, dc) = if bpg == 1 { (dbp, dcp) } else { (pp.offset(blk * 2 * nbc), pp.offset(blk * 2 * nbc + nbc)) };
        // SAFETY: heads [h0, h1) of row bi are this task's; so are its dB/dC rows (or partial buffer).
        let d_run = unsafe { ds0p.slice((bi * h + h0) * pn, (h1 - h0) * pn) };
        bwd_sweep(d, q_max, &inp, dy, ds_final, bi, gi, h0, h1, (dxp, dap, db, dc), d_run);
    });
    if bpg > 1 {
        for (k, dst) in [gr.dbm, gr.dcm].into_iter().enumerate() {
            dst.par_chunks_mut(4096).enumerate().for_each(|(ci, out)| {
                let off = ci * 4096;
                out.fill(0.0);
                for blk in 0..bpg {
                    let src = &partial[blk * 2 * nbc + k * nbc + off..][..out.len()];
                    out.iter_mut().zip(src).for_each(|(o, v)| *o += v);
                }
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn bwd_sweep(
    d: Dims,
    q_max: usize,
    inp: &ScanIn,
    dy: &[f32],
    ds_final: Option<&[f32]>,
    bi: usize,
    gi: usize,
    h0: usize,
    h1: usize,
    ptrs: (SendPtr, SendPtr, SendPtr, SendPtr),
    d_run: &mut [f32],
) {
    let Dims { h, p, n, .. } = d;
    let (pn, hb, t_n) = (p * n, h1 - h0, d.chunks(q_max));
    let nseg = t_n.div_ceil(SEGMENT);
    let mut sc = ChunkScratch::new(q_max, p.max(n));
    // Forward: checkpoint the states entering each segment.
    let mut ckpt = vec![0f32; nseg * hb * pn];
    let mut s_run = match inp.s0 {
        Some(s0) => s0[(bi * h + h0) * pn..(bi * h + h1) * pn].to_vec(),
        None => vec![0f32; hb * pn],
    };
    for c in 0..t_n {
        if c % SEGMENT == 0 {
            ckpt[(c / SEGMENT) * hb * pn..][..hb * pn].copy_from_slice(&s_run);
        }
        let ch = Chunk::new(&d, inp.seg, bi, c, q_max);
        for hi in h0..h1 {
            sc.dec.compute(&d, inp.a, bi, hi, &ch);
            state_update(&d, inp, bi, gi, hi, &ch, &sc.dec, &mut sc.t2, &mut s_run[(hi - h0) * pn..][..pn]);
        }
    }
    // Backward over segments and chunks.
    match ds_final {
        Some(df) => d_run.copy_from_slice(&df[(bi * h + h0) * pn..(bi * h + h1) * pn]),
        None => d_run.fill(0.0),
    }
    let mut seg_states = vec![0f32; SEGMENT * hb * pn];
    for s in (0..nseg).rev() {
        let (c0, c1) = (s * SEGMENT, ((s + 1) * SEGMENT).min(t_n));
        seg_states[..hb * pn].copy_from_slice(&ckpt[s * hb * pn..(s + 1) * hb * pn]);
        for c in c0..c1 - 1 {
            let ch = Chunk::new(&d, inp.seg, bi, c, q_max);
            let k = c - c0;
            let (prev, next) = seg_states.split_at_mut((k + 1) * hb * pn);
            next[..hb * pn].copy_from_slice(&prev[k * hb * pn..]);
            for hi in h0..h1 {
                sc.dec.compute(&d, inp.a, bi, hi, &ch);
                state_update(&d, inp, bi, gi, hi, &ch, &sc.dec, &mut sc.t2, &mut next[(hi - h0) * pn..][..pn]);
            }
        }
        for c in (c0..c1).rev() {
            let ch = Chunk::new(&d, inp.seg, bi, c, q_max);
            let s_block = &seg_states[(c - c0) * hb * pn..][..hb * pn];
            chunk_bwd(&d, inp, dy, bi, gi, h0, h1, &ch, s_block, d_run, ptrs, &mut sc);
        }
    }
}

/// Gradients of one chunk for heads [h0, h1): writes dX and da of these heads, overwrites then accumulates
/// this group's dB, dC rows, and moves each head's D from the chunk's end to its start.
#[allow(clippy::too_many_arguments)]
fn chunk_bwd(
    d: &Dims,
    inp: &ScanIn,
    dy: &[f32],
    bi: usize,
    gi: usize,
    h0: usize,
    h1: usize,
    ch: &Chunk,
    s_block: &[f32],
    d_block: &mut [f32],
    (dx, da, dbm, dcm): (SendPtr, SendPtr, SendPtr, SendPtr),
    sc: &mut ChunkScratch,
) {
    let Dims { l, h, p, g, n, .. } = *d;
    let (q, pn, gn) = (ch.q, p * n, g * n);
    let bco = bc_off(d, bi, ch.t0, gi);
    fill_g(d, inp, bi, gi, ch, &mut sc.gm);
    sc.dg[..q * q].fill(0.0);
    unsafe {
        for i in 0..q {
            dbm.slice(bco + i * gn, n).fill(0.0);
            dcm.slice(bco + i * gn, n).fill(0.0);
        }
    }
    for hi in h0..h1 {
        let s_c = &s_block[(hi - h0) * pn..][..pn];
        let d_c = &mut d_block[(hi - h0) * pn..][..pn];
        let dec = &mut sc.dec;
        dec.compute(d, inp.a, bi, hi, ch);
        dec.fill_l(ch, &mut sc.lm);
        for ((m, &gv), &lv) in sc.mm[..q * q].iter_mut().zip(&sc.gm[..q * q]).zip(&sc.lm[..q * q]) {
            *m = gv * lv;
        }
        let xo = x_off(d, bi, ch.t0, hi);
        unsafe {
            // dM = dY·Xᵀ (q, q); dX = Mᵀ·dY (q, p)
            matmul(q, q, p, sc.dm.as_mut_ptr(), q, 0.0, Mat::rows(dy, xo, h * p), Mat::rows_t(inp.x, xo, h * p), 1.0);
            matmul(q, p, q, dx.0.add(xo), h * p, 0.0, Mat::rows_t(&sc.mm, 0, q), Mat::rows(dy, xo, h * p), 1.0);
        }
        // L[i, j] = exp(acum_i − acum_j): ∂/∂acum_i = +dM∘M, ∂/∂acum_j = −dM∘M.
        let dacum = &mut sc.dacum[..q];
        dacum.fill(0.0);
        for i in 0..q {
            let mut row_sum = 0f32;
            for j in 0..=i {
                let dmij = sc.dm[i * q + j];
                let r = dmij * sc.mm[i * q + j];
                row_sum += r;
                dacum[j] -= r;
                sc.dg[i * q + j] += dmij * sc.lm[i * q + j];
            }
            dacum[i] += row_sum;
        }
        // Incoming state: Y_i += e_i S_c C_i.
        let (dye, cs, bd) = (&mut sc.t3, &mut sc.t1, &mut sc.t2);
        for i in 0..q {
            let ei = dec.e[i];
            for (o, &v) in dye[i * p..(i + 1) * p].iter_mut().zip(&dy[xo + i * h * p..][..p]) {
                *o = ei * v;
            }
        }
        unsafe {
            // dC += diag(e)·dY·S_c ; CS = C·S_cᵀ
            matmul(q, n, p, dcm.0.add(bco), gn, 1.0, Mat::rows(dye, 0, p), Mat::rows(s_c, 0, n), 1.0);
            matmul(q, p, n, cs.as_mut_ptr(), p, 0.0, Mat::rows(inp.cm, bco, gn), Mat::rows_t(s_c, 0, n), 1.0);
        }
        for i in 0..q {
            dacum[i] += dot(&dy[xo + i * h * p..][..p], &cs[i * p..(i + 1) * p]) * dec.e[i];
        }
        // This chunk's contribution to its end state: s = Σ_j w_j X_j ⊗ B_j.
        unsafe {
            // BD = B·D_cᵀ (q, p)
            matmul(q, p, n, bd.as_mut_ptr(), p, 0.0, Mat::rows(inp.bm, bco, gn), Mat::rows_t(d_c, 0, n), 1.0);
        }
        let xw = &mut sc.t1;
        let mut daend = 0f32;
        for j in 0..q {
            let wj = dec.w[j];
            let xr = &inp.x[xo + j * h * p..][..p];
            let bdr = &bd[j * p..(j + 1) * p];
            let dxr = unsafe { dx.slice(xo + j * h * p, p) };
            for i in 0..p {
                dxr[i] += wj * bdr[i];
            }
            let dw = dot(xr, bdr) * wj;
            dacum[j] -= dw;
            daend += dw;
            for (o, &v) in xw[j * p..(j + 1) * p].iter_mut().zip(xr) {
                *o = wj * v;
            }
        }
        unsafe {
            // dB += diag(w)·X·D_c
            matmul(q, n, p, dbm.0.add(bco), gn, 1.0, Mat::rows(xw, 0, p), Mat::rows(d_c, 0, n), 1.0);
        }
        daend += dot(s_c, d_c) * dec.alpha;
        dacum[q - 1] += daend;
        // a_k enters every acum_i with i ≥ k.
        let mut run = 0f32;
        for k in (0..q).rev() {
            run += dacum[k];
            unsafe { *da.0.add((bi * l + ch.t0 + k) * h + hi) = run };
        }
        unsafe {
            // D ← α·D + (diag(e)·dY)ᵀ·C: the gradient w.r.t. the state entering this chunk.
            matmul(p, n, q, d_c.as_mut_ptr(), n, dec.alpha, Mat::rows_t(dye, 0, p), Mat::rows(inp.cm, bco, gn), 1.0);
        }
    }
    unsafe {
        // dC += dG·B ; dB += dGᵀ·C
        matmul(q, n, q, dcm.0.add(bco), gn, 1.0, Mat::rows(&sc.dg, 0, q), Mat::rows(inp.bm, bco, gn), 1.0);
        matmul(q, n, q, dbm.0.add(bco), gn, 1.0, Mat::rows_t(&sc.dg, 0, q), Mat::rows(inp.cm, bco, gn), 1.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The candle op. Autodiff sees three tensors, in one of two layouts:
//   Discrete:  xa (b, l, h, p+1) = [X | a],  bc (b, l, g, 2n) = [B | C],  s0 (b, h, p, n)
//   Xbc:       xbc (b, l, h·p + 2·g·n) = [x | B | C] (the Mamba-2 conv output as it is),
//              dt (b, l, h) raw, params 1-D [A (h) | dt_bias (h) | D (h, h·p or none) | s0 (b·h·p·n)];
//              dt = clamp(softplus(dt + dt_bias)), X = x·dt, a = dt·A and y += D·x happen inside.
// Output: 1-D [y (b·l·h·p) | final states (b·h·p·n)].
// ---------------------------------------------------------------------------------------------

/// The fused input preparation of the Xbc layout.
#[derive(Clone, Copy, Debug)]
struct Prep {
    h: usize,
    p: usize,
    g: usize,
    n: usize,
    softplus: bool,
    lo: f32,
    hi: f32,
    /// D per head (h), per channel (h·p), or none (0).
    d_len: usize,
}

#[derive(Clone, Copy, Debug)]
enum OpLayout {
    Discrete,
    Xbc(Prep),
}

/// Parameters of the Xbc layout's third input.
struct PrepParams<'a> {
    a: &'a [f32],
    dt_bias: &'a [f32],
    d: &'a [f32],
    s0: &'a [f32],
}

/// The scan's inputs in its own layout, unpacked from either op layout.
struct Unpacked {
    x: Vec<f32>,
    a: Vec<f32>,
    bm: Vec<f32>,
    cm: Vec<f32>,
}

impl Prep {
    fn row(&self) -> usize {
        self.h * self.p + 2 * self.g * self.n
    }

    fn split<'a>(&self, b: usize, packed: &'a [f32]) -> (PrepParams<'a>, &'a [f32]) {
        let (a, rest) = packed.split_at(self.h);
        let (dt_bias, rest) = rest.split_at(self.h);
        let (d, rest) = rest.split_at(self.d_len);
        let (s0, rest) = rest.split_at(b * self.h * self.p * self.n);
        (PrepParams { a, dt_bias, d, s0 }, rest)
    }

    /// dt after bias, softplus and clamp, and d dt / d dt_raw (0 where the clamp is active).
    #[inline(always)]
    fn dt(&self, raw: f32, bias: f32) -> (f32, f32) {
        let v = raw + bias;
        let (sp, dsp) = if self.softplus { (crate::cpu::softplus(v), 1.0 / (1.0 + (-v).exp())) } else { (v, 1.0) };
        if sp < self.lo || sp > self.hi {
            (sp.clamp(self.lo, self.hi), 0.0)
        } else {
            (sp, dsp)
        }
    }

    fn unpack(&self, rows: usize, xbc: &[f32], dt_raw: &[f32], pp: &PrepParams) -> Unpacked {
        let (h, p, g, n, c) = (self.h, self.p, self.g, self.n, self.row());
        let mut u = Unpacked { x: vec![0f32; rows * h * p], a: vec![0f32; rows * h], bm: vec![0f32; rows * g * n], cm: vec![0f32; rows * g * n] };
        for r in 0..rows {
            let src = &xbc[r * c..(r + 1) * c];
            for hi in 0..h {
                let (dt, _) = self.dt(dt_raw[r * h + hi], pp.dt_bias[hi]);
                for (o, &v) in u.x[(r * h + hi) * p..(r * h + hi + 1) * p].iter_mut().zip(&src[hi * p..(hi + 1) * p]) {
                    *o = v * dt;
                }
                u.a[r * h + hi] = dt * pp.a[hi];
            }
            u.bm[r * g * n..(r + 1) * g * n].copy_from_slice(&src[h * p..h * p + g * n]);
            u.cm[r * g * n..(r + 1) * g * n].copy_from_slice(&src[h * p + g * n..]);
        }
        u
    }

    #[inline(always)]
    fn d_at(&self, d: &[f32], hi: usize, i: usize) -> f32 {
        match self.d_len {
            0 => 0.0,
            len if len == self.h => d[hi],
            _ => d[hi * self.p + i],
        }
    }

    /// y += D·x.
    fn add_skip(&self, rows: usize, xbc: &[f32], d: &[f32], y: &mut [f32]) {
        if self.d_len == 0 {
            return;
        }
        let (h, p, c) = (self.h, self.p, self.row());
        for r in 0..rows {
            for hi in 0..h {
                for i in 0..p {
                    y[(r * h + hi) * p + i] += self.d_at(d, hi, i) * xbc[r * c + hi * p + i];
                }
            }
        }
    }
}

/// X and a from the packed (b, l, h, p+1) [X | a], and B, C from (b, l, g, 2n).
fn unpack_discrete(d: &Dims, xa: &[f32], bc: &[f32]) -> Unpacked {
    let (rows, p, n) = (d.b * d.l * d.h, d.p, d.n);
    let mut x = vec![0f32; rows * p];
    let mut a = vec![0f32; rows];
    for r in 0..rows {
        x[r * p..(r + 1) * p].copy_from_slice(&xa[r * (p + 1)..r * (p + 1) + p]);
        a[r] = xa[r * (p + 1) + p];
    }
    let rows = d.b * d.l * d.g;
    let mut bm = vec![0f32; rows * n];
    let mut cm = vec![0f32; rows * n];
    for r in 0..rows {
        bm[r * n..(r + 1) * n].copy_from_slice(&bc[r * 2 * n..r * 2 * n + n]);
        cm[r * n..(r + 1) * n].copy_from_slice(&bc[r * 2 * n + n..(r + 1) * 2 * n]);
    }
    Unpacked { x, a, bm, cm }
}

fn dims_of(layout: &OpLayout, l1: &Layout, l2: &Layout) -> Result<Dims> {
    Ok(match layout {
        OpLayout::Discrete => {
            let (b, l, h, p1) = l1.shape().dims4()?;
            let (_, _, g, n2) = l2.shape().dims4()?;
            Dims { b, l, h, p: p1 - 1, g, n: n2 / 2 }
        }
        OpLayout::Xbc(pr) => {
            let (b, l, _) = l1.shape().dims3()?;
            Dims { b, l, h: pr.h, p: pr.p, g: pr.g, n: pr.n }
        }
    })
}

struct SsdOp {
    algo: Algo,
    seg: Segments,
    layout: OpLayout,
}

impl CustomOp3 for SsdOp {
    fn name(&self) -> &'static str {
        "ssd-scan"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = dims_of(&self.layout, l1, l2)?;
        let (in1, in2, in3) = (cpu_f32(s1, l1, "ssd input 1")?, cpu_f32(s2, l2, "ssd input 2")?, cpu_f32(s3, l3, "ssd input 3")?);
        let (u, s0, skip) = match &self.layout {
            OpLayout::Discrete => (unpack_discrete(&d, in1, in2), in3, None),
            OpLayout::Xbc(pr) => {
                let (pp, _) = pr.split(d.b, in3);
                (pr.unpack(d.b * d.l, in1, in2, &pp), pp.s0, Some((pr, pp.d)))
            }
        };
        let inp = ScanIn { x: &u.x, a: &u.a, bm: &u.bm, cm: &u.cm, s0: Some(s0), seg: &self.seg };
        let ny = d.b * d.l * d.h * d.p;
        let mut out = vec![0f32; ny + d.b * d.h * d.p * d.n];
        let (y, sf) = out.split_at_mut(ny);
        match self.algo {
            Algo::Chunked(q) => scan_chunked(d, q, inp, y, sf),
            Algo::Recurrent => scan_recurrent(d, inp, y, sf),
            Algo::Quadratic => bail!("ssd-scan: the quadratic form is computed with tensor ops"),
        }
        if let Some((pr, dv)) = skip {
            pr.add_skip(d.b * d.l, in1, dv, y);
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    fn bwd(&self, t1: &Tensor, t2: &Tensor, t3: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let q = match self.algo {
            Algo::Chunked(q) => q,
            _ => CPU_CHUNK,
        };
        let packed = Tensor::cat(&[&t3.detach().flatten_all()?, &grad.detach().flatten_all()?], 0)?;
        let op = SsdBwdOp { q, seg: self.seg.clone(), layout: self.layout };
        let g = t1.detach().apply_op3_no_bwd(&t2.detach(), &packed, &op)?;
        let (n1, n2) = (t1.elem_count(), t2.elem_count());
        let d1 = g.narrow(0, 0, n1)?.reshape(t1.shape())?;
        let d2 = g.narrow(0, n1, n2)?.reshape(t2.shape())?;
        let d3 = g.narrow(0, n1 + n2, t3.elem_count())?.reshape(t3.shape())?;
        Ok((Some(d1), Some(d2), Some(d3)))
    }
}

/// Backward op: (input 1, input 2, [input 3 | dy | ds_final]) → 1-D [d input 1 | d input 2 | d input 3].
struct SsdBwdOp {
    q: usize,
    seg: Segments,
    layout: OpLayout,
}

impl CustomOp3 for SsdBwdOp {
    fn name(&self) -> &'static str {
        "ssd-scan-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = dims_of(&self.layout, l1, l2)?;
        let Dims { b, l, h, p, g, n } = d;
        let (in1, in2, packed) = (cpu_f32(s1, l1, "ssd input 1")?, cpu_f32(s2, l2, "ssd input 2")?, cpu_f32(s3, l3, "ssd grads")?);
        let (ns, ny) = (b * h * p * n, b * l * h * p);
        let (u, s0, pp, rest) = match &self.layout {
            OpLayout::Discrete => {
                let (s0, rest) = packed.split_at(ns);
                (unpack_discrete(&d, in1, in2), s0, None, rest)
            }
            OpLayout::Xbc(pr) => {
                let (pp, rest) = pr.split(b, packed);
                (pr.unpack(b * l, in1, in2, &pp), pp.s0, Some(pp), rest)
            }
        };
        let (dy, dsf) = rest.split_at(ny);
        let inp = ScanIn { x: &u.x, a: &u.a, bm: &u.bm, cm: &u.cm, s0: Some(s0), seg: &self.seg };
        let mut dx = vec![0f32; ny];
        let mut da = vec![0f32; b * l * h];
        let mut dbm = vec![0f32; b * l * g * n];
        let mut dcm = vec![0f32; b * l * g * n];
        let mut ds0 = vec![0f32; ns];
        let gr = ScanGrads { dx: &mut dx, da: &mut da, dbm: &mut dbm, dcm: &mut dcm, ds0: &mut ds0 };
        scan_chunked_bwd(d, self.q, inp, dy, Some(dsf), gr);
        let mut out = Vec::with_capacity(in1.len() + in2.len() + packed.len() - rest.len());
        match (&self.layout, pp) {
            (OpLayout::Xbc(pr), Some(pp)) => {
                // Chain rule through X = x·dt, a = dt·A, dt = clamp(softplus(raw + bias)), y += D·x.
                let (gn, c) = (g * n, pr.row());
                let mut ddt_raw = vec![0f32; b * l * h];
                let mut d_a = vec![0f32; h];
                let mut d_bias = vec![0f32; h];
                let mut d_d = vec![0f32; pr.d_len];
                for r in 0..b * l {
                    let src = &in1[r * c..(r + 1) * c];
                    for hi in 0..h {
                        let k = r * h + hi;
                        let (dt, ddt_draw) = pr.dt(in2[k], pp.dt_bias[hi]);
                        let dxr = &dx[k * p..(k + 1) * p];
                        let dyr = &dy[k * p..(k + 1) * p];
                        let xr = &src[hi * p..(hi + 1) * p];
                        let mut ddt = da[k] * pp.a[hi];
                        for i in 0..p {
                            ddt += dxr[i] * xr[i];
                            match pr.d_len {
                                0 => {}
                                len if len == h => d_d[hi] += dyr[i] * xr[i],
                                _ => d_d[hi * p + i] += dyr[i] * xr[i],
                            }
                            out.push(dxr[i] * dt + dyr[i] * pr.d_at(pp.d, hi, i));
                        }
                        ddt_raw[k] = ddt * ddt_draw;
                        d_a[hi] += da[k] * dt;
                        d_bias[hi] += ddt_raw[k];
                    }
                    out.extend_from_slice(&dbm[r * gn..(r + 1) * gn]);
                    out.extend_from_slice(&dcm[r * gn..(r + 1) * gn]);
                }
                out.extend_from_slice(&ddt_raw);
                out.extend_from_slice(&d_a);
                out.extend_from_slice(&d_bias);
                out.extend_from_slice(&d_d);
                out.extend_from_slice(&ds0);
            }
            _ => {
                for r in 0..b * l * h {
                    out.extend_from_slice(&dx[r * p..(r + 1) * p]);
                    out.push(da[r]);
                }
                for r in 0..b * l * g {
                    out.extend_from_slice(&dbm[r * n..(r + 1) * n]);
                    out.extend_from_slice(&dcm[r * n..(r + 1) * n]);
                }
                out.extend_from_slice(&ds0);
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

// ---------------------------------------------------------------------------------------------
// Quadratic ("masked attention") form.
// ---------------------------------------------------------------------------------------------

/// (1, 1, l, l) or (b, 1, l, l) u8 mask: j ≤ i and i, j in the same document.
fn causal_doc_mask(b: usize, l: usize, seg: &Segments, dev: &candle_core::Device) -> Result<Tensor> {
    let rows = if seg.is_none() { 1 } else { b };
    let mut m = vec![0u8; rows * l * l];
    for bi in 0..rows {
        for i in 0..l {
            for j in 0..=i {
                m[(bi * l + i) * l + j] = (seg.id(bi, l, i) == seg.id(bi, l, j)) as u8;
            }
        }
    }
    Tensor::from_vec(m, (rows, 1, l, l), dev)
}

/// Broadcasts (b, l, g, n) over the heads of each group → (b, h, l, n).
fn heads_of_groups(t: &Tensor, h: usize) -> Result<Tensor> {
    let (b, l, g, n) = t.dims4()?;
    t.permute((0, 2, 1, 3))?.unsqueeze(2)?.expand((b, g, h / g, l, n))?.reshape((b, h, l, n))
}

/// Segment-sum decays: exp(Σ_{j<k≤i} a_k) for j ≤ i in one document, else 0. `a` (b, l, h) → (b, h, l, l).
pub fn decay_matrix(a: &Tensor, seg: &Segments) -> Result<Tensor> {
    let (b, l, _h) = a.dims3()?;
    let acum = a.transpose(1, 2)?.contiguous()?.cumsum(D::Minus1)?; // (b, h, l)
    let diff = acum.unsqueeze(3)?.broadcast_sub(&acum.unsqueeze(2)?)?; // [i, j] = acum_i − acum_j
    let mask = causal_doc_mask(b, l, seg, a.device())?.broadcast_as(diff.shape())?;
    let neg_inf = Tensor::new(f32::NEG_INFINITY, a.device())?.broadcast_as(diff.shape())?;
    mask.where_cond(&diff, &neg_inf)?.exp()
}

/// The SSD mixing matrix in discretised form: M[b, h, i, j] = (C_i·B_j)·exp(Σ_{j<k≤i} a_k), so that
/// y_i = Σ_j M[i, j] X_j (without the incoming state and the D skip).
/// `a` (b, l, h) = dt·A, B and C (b, l, g, n). Returns (b, h, l, l).
pub fn materialize_discrete(a: &Tensor, bm: &Tensor, cm: &Tensor, seg: &Segments) -> Result<Tensor> {
    let h = a.dim(2)?;
    let bh = heads_of_groups(bm, h)?;
    let ch = heads_of_groups(cm, h)?;
    let cb = ch.matmul(&bh.t()?)?; // (b, h, l, l)
    cb.mul(&decay_matrix(a, seg)?)
}

/// The quadratic form: y and final state from materialised matrices (candle ops: autodiff).
fn scan_quadratic(x: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, s0: &Tensor, seg: &Segments) -> Result<(Tensor, Tensor)> {
    let (b, l, h, _p) = x.dims4()?;
    let m = materialize_discrete(a, bm, cm, seg)?;
    let xh = x.permute((0, 2, 1, 3))?.contiguous()?; // (b, h, l, p)
    let mut y = m.matmul(&xh)?; // (b, h, l, p)
    // Incoming state: y_i += e_i S0 C_i with e_i = exp(acum_i) while in the first document.
    let acum = a.transpose(1, 2)?.contiguous()?.cumsum(D::Minus1)?; // (b, h, l)
    let first = first_doc_mask(b, l, seg, a.device())?; // (b, 1, l) f32
    let e = acum.exp()?.broadcast_mul(&first)?;
    let ch = heads_of_groups(cm, h)?; // (b, h, l, n)
    let from_s0 = ch.matmul(&s0.t()?)?.broadcast_mul(&e.unsqueeze(3)?)?; // (b, h, l, p)
    y = (y + from_s0)?;
    // Final state: Σ_j w_j X_j ⊗ B_j over the last document, plus α·S0 if one document.
    let last = last_doc_mask(b, l, seg, a.device())?; // (b, 1, l)
    let aend = acum.narrow(2, l - 1, 1)?; // (b, h, 1)
    let w = aend.broadcast_sub(&acum)?.exp()?.broadcast_mul(&last)?; // (b, h, l)
    let bh = heads_of_groups(bm, h)?;
    let sf = xh.broadcast_mul(&w.unsqueeze(3)?)?.t()?.matmul(&bh)?; // (b, h, p, n)
    let alpha = aend.exp()?.broadcast_mul(&first.narrow(2, l - 1, 1)?)?; // (b, h, 1)
    let sf = (sf + s0.broadcast_mul(&alpha.unsqueeze(3)?)?)?;
    Ok((y.permute((0, 2, 1, 3))?.contiguous()?, sf))
}

fn first_doc_mask(b: usize, l: usize, seg: &Segments, dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..b).flat_map(|bi| (0..l).map(move |t| (seg.id(bi, l, t) == seg.id(bi, l, 0)) as u8 as f32)).collect();
    Tensor::from_vec(v, (b, 1, l), dev)
}

fn last_doc_mask(b: usize, l: usize, seg: &Segments, dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> =
        (0..b).flat_map(|bi| (0..l).map(move |t| (seg.id(bi, l, t) == seg.id(bi, l, l - 1)) as u8 as f32)).collect();
    Tensor::from_vec(v, (b, 1, l), dev)
}

// ---------------------------------------------------------------------------------------------
// The public entry point: `mamba_chunk_scan_combined`.
// ---------------------------------------------------------------------------------------------

/// Inputs of [`ssd`], as in `mamba_ssm`'s `mamba_chunk_scan_combined`.
#[derive(Clone, Copy)]
pub struct SsdInput<'a> {
    /// (b, l, h, p)
    pub x: &'a Tensor,
    /// (b, l, h), raw (before `dt_bias` and softplus)
    pub dt: &'a Tensor,
    /// A (h), negative
    pub a: &'a Tensor,
    /// (b, l, g, n)
    pub b: &'a Tensor,
    /// (b, l, g, n)
    pub c: &'a Tensor,
    /// D skip: (h) or (h, p)
    pub d: Option<&'a Tensor>,
    /// Gate (b, l, h, p): y ⊙ SiLU(z)
    pub z: Option<&'a Tensor>,
    /// (h)
    pub dt_bias: Option<&'a Tensor>,
    pub dt_softplus: bool,
    /// Clamp of dt after softplus; (0, ∞) is no clamp.
    pub dt_limit: (f64, f64),
    /// (b, h, p, n)
    pub initial_states: Option<&'a Tensor>,
    /// Document ids (b, l), non-decreasing per row.
    pub seq_idx: Option<&'a Tensor>,
}

impl<'a> SsdInput<'a> {
    pub fn new(x: &'a Tensor, dt: &'a Tensor, a: &'a Tensor, b: &'a Tensor, c: &'a Tensor) -> Self {
        Self {
            x,
            dt,
            a,
            b,
            c,
            d: None,
            z: None,
            dt_bias: None,
            dt_softplus: false,
            dt_limit: (0.0, f64::INFINITY),
            initial_states: None,
            seq_idx: None,
        }
    }

    /// Validates shapes and returns the problem sizes.
    pub fn dims(&self) -> Result<Dims> {
        let (b, l, h, p) = match self.x.dims() {
            &[b, l, h, p] => (b, l, h, p),
            s => bail!("ssd: x must be (batch, len, heads, head_dim), got shape {s:?}"),
        };
        if l == 0 {
            bail!("ssd: empty sequence (len 0)");
        }
        let (g, n) = match self.b.dims() {
            &[bb, ll, g, n] if bb == b && ll == l => (g, n),
            s => bail!("ssd: B must be ({b}, {l}, groups, d_state), got shape {s:?}"),
        };
        if g == 0 || h % g != 0 {
            bail!("ssd: heads ({h}) must be divisible by groups ({g})");
        }
        expect_dims(self.c, &[b, l, g, n], "ssd: C")?;
        expect_dims(self.dt, &[b, l, h], "ssd: dt")?;
        expect_dims(self.a, &[h], "ssd: A")?;
        if let Some(d) = self.d {
            if d.dims() != [h] && d.dims() != [h, p] {
                bail!("ssd: D must be ({h}) or ({h}, {p}), got shape {:?}", d.dims());
            }
        }
        if let Some(z) = self.z {
            expect_dims(z, &[b, l, h, p], "ssd: z")?;
        }
        if let Some(t) = self.dt_bias {
            expect_dims(t, &[h], "ssd: dt_bias")?;
        }
        if let Some(s) = self.initial_states {
            expect_dims(s, &[b, h, p, n], "ssd: initial_states")?;
        }
        if !(self.dt_limit.0 <= self.dt_limit.1) {
            bail!("ssd: dt_limit ({}, {}) is not an interval", self.dt_limit.0, self.dt_limit.1);
        }
        Ok(Dims { b, l, h, p, g, n })
    }

    /// dt after bias, softplus and clamp, f32 (b, l, h).
    pub fn processed_dt(&self) -> Result<Tensor> {
        process_dt(self.dt, self.dt_bias, self.dt_softplus, self.dt_limit)
    }
}

/// dt after bias, softplus and clamp, f32 (b, l, h), in candle ops.
fn process_dt(dt: &Tensor, dt_bias: Option<&Tensor>, softplus: bool, dt_limit: (f64, f64)) -> Result<Tensor> {
    let mut dt = dt.to_dtype(DType::F32)?;
    if let Some(bias) = dt_bias {
        dt = dt.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    if softplus {
        dt = crate::act::softplus(&dt)?;
    }
    let (lo, hi) = dt_limit;
    if lo > 0.0 || hi.is_finite() {
        dt = dt.clamp(lo as f32, hi as f32)?;
    }
    Ok(dt)
}

/// Mamba-2 SSD with every option of `mamba_chunk_scan_combined`. Returns y (b, l, h, p) in x's dtype
/// and the final states (b, h, p, n) in f32. Differentiable w.r.t. every tensor input.
pub fn ssd(inp: &SsdInput, algo: Algo) -> Result<(Tensor, Tensor)> {
    let dm = inp.dims()?;
    if let Algo::Chunked(0) = algo {
        bail!("ssd: chunk size must be positive");
    }
    let dev = inp.x.device();
    let (mut y, sf) = if algo != Algo::Quadratic && (dev.is_cpu() || dev.is_cuda()) { ssd_fused(inp, &dm, algo)? } else { ssd_reference_path(inp, algo)? };
    if let Some(z) = inp.z {
        y = (y * z.to_dtype(DType::F32)?.silu()?)?;
    }
    Ok((y.to_dtype(inp.x.dtype())?, sf))
}

/// The SSD preparation in candle ops around [`scan`] (any device, any algorithm); without the z gate.
fn ssd_reference_path(inp: &SsdInput, algo: Algo) -> Result<(Tensor, Tensor)> {
    let h = inp.a.dim(0)?;
    let x = inp.x.to_dtype(DType::F32)?;
    let dt = inp.processed_dt()?; // (b, l, h)
    let a_t = dt.broadcast_mul(&inp.a.to_dtype(DType::F32)?.reshape((1, 1, h))?)?; // (b, l, h)
    let xd = x.broadcast_mul(&dt.unsqueeze(3)?)?; // X = dt·x
    let (mut y, sf) = scan(&xd, &a_t, inp.b, inp.c, inp.initial_states, inp.seq_idx, algo)?;
    if let Some(d) = inp.d {
        let d = d.to_dtype(DType::F32)?;
        let d = if d.rank() == 1 { d.unsqueeze(1)? } else { d }; // (h, 1) or (h, p)
        y = (y + x.broadcast_mul(&d)?)?;
    }
    Ok((y, sf))
}

/// [`ssd`] on the CPU: x, B, C concatenated per row and handed to [`ssd_xbc`].
fn ssd_fused(inp: &SsdInput, dm: &Dims, algo: Algo) -> Result<(Tensor, Tensor)> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let (b, l) = (dm.b, dm.l);
    let xbc = Tensor::cat(&[&f(inp.x)?.reshape((b, l, dm.h * dm.p))?, &f(inp.b)?.reshape((b, l, dm.g * dm.n))?, &f(inp.c)?.reshape((b, l, dm.g * dm.n))?], 2)?;
    let shape = XbcShape { heads: dm.h, head_dim: dm.p, groups: dm.g, d_state: dm.n };
    ssd_xbc(&xbc, inp.dt, shape, inp.a, inp.dt_bias, inp.d, inp.dt_softplus, inp.dt_limit, inp.initial_states, inp.seq_idx, algo)
}

/// Head and group sizes of an xBC row [x (heads·head_dim) | B (groups·d_state) | C (groups·d_state)].
#[derive(Clone, Copy, Debug)]
pub struct XbcShape {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub d_state: usize,
}

/// The SSD layer on Mamba-2's conv output as it is: xbc (b, l, h·p + 2·g·n), raw dt (b, l, h); the dt
/// bias/softplus/clamp, the discretisation and the D skip run inside one op each way (CPU). Returns y
/// (b, l, h, p) f32 and the final states (b, h, p, n). Differentiable w.r.t. every tensor.
#[allow(clippy::too_many_arguments)]
pub fn ssd_xbc(
    xbc: &Tensor,
    dt: &Tensor,
    shape: XbcShape,
    a: &Tensor,
    dt_bias: Option<&Tensor>,
    d: Option<&Tensor>,
    dt_softplus: bool,
    dt_limit: (f64, f64),
    initial_states: Option<&Tensor>,
    seq_idx: Option<&Tensor>,
    algo: Algo,
) -> Result<(Tensor, Tensor)> {
    let XbcShape { heads: h, head_dim: p, groups: g, d_state: n } = shape;
    let (b, l, c) = xbc.dims3()?;
    if c != h * p + 2 * g * n {
        bail!("ssd: xbc rows have {c} channels, expected heads·head_dim + 2·groups·d_state = {}", h * p + 2 * g * n);
    }
    if l == 0 {
        bail!("ssd: empty sequence (len 0)");
    }
    if g == 0 || h % g != 0 {
        bail!("ssd: heads ({h}) must be divisible by groups ({g})");
    }
    expect_dims(dt, &[b, l, h], "ssd: dt")?;
    expect_dims(a, &[h], "ssd: A")?;
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let dev = xbc.device();
    #[cfg(feature = "cuda")]
    if algo != Algo::Quadratic && crate::cuda::ssd::supported(dev, xbc.dtype(), p, n) {
        // The CUDA kernels read x, B, C from the rows as they are; dt and the decay are prepared here,
        // document boundaries as a lowered decay.
        let dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit)?;
        let mut la = dtp.broadcast_mul(&f(a)?.reshape((1, 1, h))?)?;
        if let Some(starts) = doc_start_decay(&Segments::from_tensor(seq_idx, b, l)?, b, l, dev)? {
            la = la.broadcast_add(&starts)?;
        }
        return crate::cuda::ssd::scan_xbc(xbc, &dtp, &la, d, initial_states, crate::cuda::ssd::XbcLayout::mamba2(h, p, g, n));
    }
    if !dev.is_cpu() || algo == Algo::Quadratic {
        // Device-generic path through the separate-input API.
        let x = xbc.narrow(2, 0, h * p)?.reshape((b, l, h, p))?;
        let bm = xbc.narrow(2, h * p, g * n)?.reshape((b, l, g, n))?;
        let cm = xbc.narrow(2, h * p + g * n, g * n)?.reshape((b, l, g, n))?;
        let mut inp = SsdInput::new(&x, dt, a, &bm, &cm);
        inp.dt_bias = dt_bias;
        inp.d = d;
        inp.dt_softplus = dt_softplus;
        inp.dt_limit = dt_limit;
        inp.initial_states = initial_states;
        inp.seq_idx = seq_idx;
        return ssd_reference_path(&inp, algo);
    }
    let seg = Segments::from_tensor(seq_idx, b, l)?;
    let dt_bias = match dt_bias {
        Some(t) => {
            expect_dims(t, &[h], "ssd: dt_bias")?;
            f(t)?
        }
        None => Tensor::zeros(h, DType::F32, dev)?,
    };
    let d = match d {
        Some(t) => {
            if t.dims() != [h] && t.dims() != [h, p] {
                bail!("ssd: D must be ({h}) or ({h}, {p}), got shape {:?}", t.dims());
            }
            f(t)?.flatten_all()?
        }
        None => Tensor::zeros(0, DType::F32, dev)?,
    };
    let s0 = match initial_states {
        Some(s) => {
            expect_dims(s, &[b, h, p, n], "ssd: initial_states")?;
            f(s)?.flatten_all()?
        }
        None => Tensor::zeros(b * h * p * n, DType::F32, dev)?,
    };
    let params = Tensor::cat(&[&f(a)?, &dt_bias, &d, &s0], 0)?;
    let (lo, hi) = dt_limit;
    let prep = Prep { h, p, g, n, softplus: dt_softplus, lo: lo as f32, hi: if hi.is_finite() { hi as f32 } else { f32::INFINITY }, d_len: d.elem_count() };
    let out = f(xbc)?.contiguous()?.apply_op3(&f(dt)?.contiguous()?, &params, SsdOp { algo, seg, layout: OpLayout::Xbc(prep) })?;
    let ny = b * l * h * p;
    let y = out.narrow(0, 0, ny)?.reshape((b, l, h, p))?;
    let sf = out.narrow(0, ny, b * h * p * n)?.reshape((b, h, p, n))?;
    Ok((y, sf))
}

/// [`ssd_xbc`]'s y alone, from a zero initial state (training: no state in, none out). On CUDA with bf16
/// xbc this is one op each way on the tensor-core kernels (the dt preparation inside; y, dy and the xbc
/// gradient in bf16; document boundaries as in [`DOC_START_DECAY`]), and y comes back in bf16; elsewhere it is
/// `ssd_xbc`'s y (f32).
#[allow(clippy::too_many_arguments)]
pub fn ssd_xbc_y(xbc: &Tensor, dt: &Tensor, shape: XbcShape, a: &Tensor, dt_bias: Option<&Tensor>, d: Option<&Tensor>, dt_softplus: bool, dt_limit: (f64, f64), seq_idx: Option<&Tensor>, algo: Algo) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if algo != Algo::Quadratic && xbc.device().is_cuda() && xbc.dim(1)? > 0 {
        let XbcShape { heads: h, head_dim: p, groups: g, d_state: n } = shape;
        expect_dims(a, &[h], "ssd: A")?;
        // Rows of another width are left to ssd_xbc's error; groups that do not divide the heads to scan_xbc_y's None.
        if xbc.dim(2)? == h * p + 2 * g * n {
            let (b, l, _) = xbc.dims3()?;
            let starts = doc_start_decay(&Segments::from_tensor(seq_idx, b, l)?, b, l, xbc.device())?;
            let lay = crate::cuda::ssd::XbcLayout::mamba2(h, p, g, n);
            if let Some(y) = crate::cuda::ssd::scan_xbc_y(xbc, dt, a, dt_bias, d, dt_softplus, dt_limit, starts.as_ref(), lay)? {
                return Ok(y);
            }
        }
    }
    Ok(ssd_xbc(xbc, dt, shape, a, dt_bias, d, dt_softplus, dt_limit, None, seq_idx, algo)?.0)
}

/// The scan on discretised inputs, for mixers that parameterise the decay themselves (e.g. the discrete
/// Mamba-2 of Llamba): S_t = exp(a_t)·S_{t−1} + X_t ⊗ B_t, y_t = S_t·C_t. X (b, l, h, p), a (b, l, h),
/// B, C (b, l, g, n), initial states (b, h, p, n). Returns y and the final states in f32; differentiable.
pub fn scan(
    x: &Tensor,
    a: &Tensor,
    bm: &Tensor,
    cm: &Tensor,
    initial_states: Option<&Tensor>,
    seq_idx: Option<&Tensor>,
    algo: Algo,
) -> Result<(Tensor, Tensor)> {
    let (b, l, h, p) = x.dims4()?;
    if l == 0 {
        bail!("ssd scan: empty sequence (len 0)");
    }
    expect_dims(a, &[b, l, h], "ssd scan: a")?;
    let (g, n) = match bm.dims() {
        &[bb, ll, g, n] if bb == b && ll == l => (g, n),
        s => bail!("ssd scan: B must be ({b}, {l}, groups, d_state), got shape {s:?}"),
    };
    if g == 0 || h % g != 0 {
        bail!("ssd scan: heads ({h}) must be divisible by groups ({g})");
    }
    expect_dims(cm, &[b, l, g, n], "ssd scan: C")?;
    if let Algo::Chunked(0) = algo {
        bail!("ssd: chunk size must be positive");
    }
    let seg = Segments::from_tensor(seq_idx, b, l)?;
    let (x, a) = (x.to_dtype(DType::F32)?, a.to_dtype(DType::F32)?);
    let (bm, cm) = (bm.to_dtype(DType::F32)?, cm.to_dtype(DType::F32)?);
    let s0 = match initial_states {
        Some(s) => {
            expect_dims(s, &[b, h, p, n], "ssd scan: initial_states")?;
            s.to_dtype(DType::F32)?
        }
        None => Tensor::zeros((b, h, p, n), DType::F32, x.device())?,
    };
    #[cfg(feature = "cuda")]
    if algo != Algo::Quadratic && crate::cuda::ssd::supported(x.device(), DType::F32, p, n) {
        let xbc = Tensor::cat(&[&x.reshape((b, l, h * p))?, &bm.reshape((b, l, g * n))?, &cm.reshape((b, l, g * n))?], 2)?;
        let ones = Tensor::ones((b, l, h), DType::F32, x.device())?;
        let a = match doc_start_decay(&seg, b, l, x.device())? {
            Some(starts) => a.broadcast_add(&starts)?,
            None => a,
        };
        return crate::cuda::ssd::scan_xbc(&xbc, &ones, &a, None, Some(&s0), crate::cuda::ssd::XbcLayout::mamba2(h, p, g, n));
    }
    match algo {
        Algo::Quadratic => scan_quadratic(&x, &a, &bm, &cm, &s0, &seg),
        // Other devices, and CUDA where its kernels do not apply (odd sizes): the quadratic form (exact,
        // O(L²) memory).
        _ if !x.device().is_cpu() => scan_quadratic(&x, &a, &bm, &cm, &s0, &seg),
        _ => {
            let xa = to_f32_contig(&Tensor::cat(&[&x, &a.unsqueeze(3)?], 3)?)?;
            let bc = to_f32_contig(&Tensor::cat(&[&bm, &cm], 3)?)?;
            let out = xa.apply_op3(&bc, &s0.contiguous()?, SsdOp { algo, seg, layout: OpLayout::Discrete })?;
            let ny = b * l * h * p;
            let y = out.narrow(0, 0, ny)?.reshape((b, l, h, p))?;
            let sf = out.narrow(0, ny, b * h * p * n)?.reshape((b, h, p, n))?;
            Ok((y, sf))
        }
    }
}

/// One step of [`scan`] for a batch of single tokens: state (b, h, p, n), X (b, h, p), a (b, h),
/// B, C (b, g, n). Returns (y (b, h, p), new state), in candle ops.
pub fn scan_step(state: &Tensor, x: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, h, p, n) = state.dims4()?;
    let g = bm.dim(1)?;
    expect_dims(x, &[b, h, p], "ssd step: x")?;
    expect_dims(a, &[b, h], "ssd step: a")?;
    expect_dims(bm, &[b, g, n], "ssd step: B")?;
    expect_dims(cm, &[b, g, n], "ssd step: C")?;
    if g == 0 || h % g != 0 {
        bail!("ssd step: heads ({h}) must be divisible by groups ({g})");
    }
    let expand = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.unsqueeze(2)?.expand((b, g, h / g, n))?.reshape((b, h, n)) };
    let (bh, ch) = (expand(bm)?, expand(cm)?);
    let decay = a.to_dtype(DType::F32)?.exp()?; // (b, h)
    let new_state = state
        .to_dtype(DType::F32)?
        .broadcast_mul(&decay.reshape((b, h, 1, 1))?)?
        .add(&x.to_dtype(DType::F32)?.unsqueeze(3)?.broadcast_mul(&bh.unsqueeze(2)?)?)?;
    let y = new_state.matmul(&ch.unsqueeze(3)?)?.squeeze(3)?;
    Ok((y, new_state))
}

/// The SSD mixing matrix for raw x: y_i = Σ_j M[i, j]·x_j (+ D·x_i when `d` is given, on the diagonal),
/// per head, for the given (processed) dt (b, l, h), A (h), B, C (b, l, g, n). Returns (b, h, l, l).
/// This is the semiseparable matrix of the SSD duality; the Hydra and MOHAWK code build on it.
pub fn materialize(dt: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, d: Option<&Tensor>, seq_idx: Option<&Tensor>) -> Result<Tensor> {
    let (b, l, h) = dt.dims3()?;
    let seg = Segments::from_tensor(seq_idx, b, l)?;
    let dt = dt.to_dtype(DType::F32)?;
    let a_t = dt.broadcast_mul(&a.to_dtype(DType::F32)?.reshape((1, 1, h))?)?;
    let m = materialize_discrete(&a_t, &bm.to_dtype(DType::F32)?, &cm.to_dtype(DType::F32)?, &seg)?;
    let m = m.broadcast_mul(&dt.transpose(1, 2)?.unsqueeze(2)?)?; // scale column j by dt_j
    match d {
        None => Ok(m),
        Some(d) => {
            let eye = Tensor::eye(l, DType::F32, dt.device())?.reshape((1, 1, l, l))?;
            m.broadcast_add(&eye.broadcast_mul(&d.to_dtype(DType::F32)?.reshape((1, h, 1, 1))?)?)
        }
    }
}

/// One recurrent step for a batch of single tokens (decode), in candle ops.
/// `state` (b, h, p, n) f32; x (b, h, p); dt (b, h) raw; A (h); B, C (b, g, n); D (h) or (h, p);
/// z (b, h, p). dt is processed like [`SsdInput`] does. Returns (y (b, h, p), new state).
#[allow(clippy::too_many_arguments)]
pub fn ssd_step(
    state: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    bm: &Tensor,
    cm: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    dt_bias: Option<&Tensor>,
    dt_softplus: bool,
    dt_limit: (f64, f64),
) -> Result<(Tensor, Tensor)> {
    let (b, h, _, _) = state.dims4()?;
    expect_dims(dt, &[b, h], "ssd_step: dt")?;
    // Reuse SsdInput's dt processing on a length-1 sequence.
    let dt3 = dt.unsqueeze(1)?;
    let mut si = SsdInput::new(x, &dt3, a, bm, cm);
    si.dt_bias = dt_bias;
    si.dt_softplus = dt_softplus;
    si.dt_limit = dt_limit;
    let dt = si.processed_dt()?.squeeze(1)?; // (b, h)
    let x = x.to_dtype(DType::F32)?;
    let a_t = dt.broadcast_mul(&a.to_dtype(DType::F32)?.unsqueeze(0)?)?; // (b, h)
    let (mut y, new_state) = scan_step(state, &x.broadcast_mul(&dt.unsqueeze(2)?)?, &a_t, bm, cm)?;
    if let Some(d) = d {
        let d = d.to_dtype(DType::F32)?;
        let d = if d.rank() == 1 { d.unsqueeze(1)? } else { d };
        y = (y + x.broadcast_mul(&d)?)?;
    }
    if let Some(z) = z {
        y = (y * z.to_dtype(DType::F32)?.silu()?)?;
    }
    Ok((y, new_state))
}
