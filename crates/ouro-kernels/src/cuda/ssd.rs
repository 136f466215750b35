//! The Mamba-2 chunked SSD on CUDA (kernels in `ssd.cu`): S_t = exp(la_t)·S_{t−1} + dt_t·x_t ⊗ B_t,
//! y_t = S_t·C_t, read straight from Mamba-2's conv output rows [x | B | C] in f32 or bf16, f32 math.
//!
//! Forward: chunk_state → state_passing → chunk_scan (the training op, where its walk fills the GPU: chunk_cb
//! → scan_walk, the whole forward in one walk over the chunks; with few sequences × heads, the walk over
//! segments of the sequence, then walk_fixup). Backward: the first two again (the states
//! entering each chunk), then chunk_dstate → state_passing_bwd → chunk_bwd. The chunk size is the largest of
//! 64, 32, 16 whose backward fits in one block's shared memory; bf16 rows aligned to 16 bytes take the
//! tensor-core kernels (chunk 64), whose chunk_state, chunk_scan and chunk_dstate each take several heads
//! of a group per block (`heads_per_block`) and read the passed states in bf16.

use super::{alloc_bf16, alloc_f32, function, launch, max_shared, module, poison, poison_bf16, ptr, Arg, Stash};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

const SOURCE: &str = include_str!("ssd.cu");
const NT: u32 = 256;

/// Where x, B and C sit in a row of the `xbc` tensor (b, l, row), and the head/group sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XbcLayout {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub d_state: usize,
    pub x_off: usize,
    pub b_off: usize,
    pub c_off: usize,
}

impl XbcLayout {
    /// Mamba-2's conv output: [x (heads·head_dim) | B (groups·d_state) | C (groups·d_state)].
    pub fn mamba2(heads: usize, head_dim: usize, groups: usize, d_state: usize) -> Self {
        Self { heads, head_dim, groups, d_state, x_off: 0, b_off: heads * head_dim, c_off: heads * head_dim + groups * d_state }
    }
}

fn f32s(q: usize, p: usize, n: usize) -> [usize; 4] {
    let (sp, sn, sq) = (p + 1, n + 1, q + 1);
    [
        2 * q + q * sp + q * sn,                                  // chunk_state
        2 * q + 2 * q * sn + 2 * q * sp + p * sn + q * sq,        // chunk_scan
        q + q * sp + q * sn,                                      // chunk_dstate
        6 * q + 2 * q * sp + 2 * q * sn + 2 * p * sn + 2 * q * sq, // chunk_bwd
    ]
}

/// Shared-memory bytes of (chunk_state, chunk_scan, chunk_dstate, chunk_bwd) at chunk `q`.
fn smem(q: usize, p: usize, n: usize) -> [usize; 4] {
    f32s(q, p, n).map(|f| 4 * f)
}

/// The chunk of the bf16 tensor-core kernels.
const MMA_CHUNK: usize = 64;

/// The most heads of a group that one block of chunk_state_mma / chunk_scan_mma / chunk_dstate_mma takes.
const MAX_HEADS_PER_BLOCK: usize = 8;

/// Heads per block of chunk_state_mma / chunk_scan_mma / chunk_dstate_mma: 4 (`OURO_SSD_HEADS_PER_BLOCK`: 1, 2, 4 or 8),
/// halved until it divides the heads per group `hpg`.
fn heads_per_block(hpg: usize) -> usize {
    let want = std::env::var("OURO_SSD_HEADS_PER_BLOCK").ok().and_then(|v| v.parse().ok()).filter(|k| [1, 2, 4, 8].contains(k)).unwrap_or(4);
    let mut hb: usize = want;
    while hpg % hb != 0 {
        hb /= 2;
    }
    hb
}

/// Stages of ssd_state_pass_mma's copies (FS in ssd.cu).
const STATE_PASS_STAGES: usize = 4;

/// Shared-memory bytes of ssd_state_pass_mma (`bwd`: ssd_dstate_pass_mma) with a channel slice of `pt`: per
/// stage, la and dt (f32) and the x and B (dy and C) tiles, and in the backward the slice of S_in (bf16, rows
/// padded by 8).
fn state_pass_smem(pt: usize, n: usize, bwd: bool) -> usize {
    STATE_PASS_STAGES * (8 * MMA_CHUNK + 2 * (MMA_CHUNK * (pt + 8 + n + 8) + if bwd { pt * (n + 8) } else { 0 }))
}

/// Chunks per block of ssd_walk_fixup (the state entering a segment read once for them; the next chunk's tiles
/// load while one is computed). At 2×32768×32 heads, 2 segments: 0.118 / 0.108 / 0.105 / 0.106 ms at 2 / 4 / 8 /
/// 16 (one chunk per block, no second stage: 0.123).
const FIXUP_CHUNKS: usize = 8;

/// Segments of the scan walk over `blocks` sequences × heads × slices and `nc` chunks on `sms` multiprocessors:
/// `OURO_SSD_WALK_SEGMENTS` where set (≥ 1), else as many as keep one wave of blocks (⌊sms / blocks⌋, one
/// block per multiprocessor), each of at least 4 chunks. Each segment after the first is walked from a zero
/// state and made whole by ssd_walk_states and ssd_walk_fixup, which read C and y again.
fn walk_segments(blocks: usize, nc: usize, sms: usize) -> usize {
    match std::env::var("OURO_SSD_WALK_SEGMENTS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&k| k >= 1) {
        Some(k) => k,
        None => (sms / blocks.max(1)).min(nc / 4).max(1),
    }
}

/// Stages of ssd_scan_walk_mma's copies (SW in ssd.cu).
const SCAN_WALK_STAGES: usize = 3;

/// Shared-memory bytes of ssd_scan_walk_mma with a channel slice of `pt`: per stage C·Bᵀ (f32, rows padded by
/// 8) and the x, B and C tiles (bf16, rows padded by 8); four slots of la, dt and cs (f32); two S_in slices.
fn scan_walk_smem(pt: usize, n: usize) -> usize {
    let q = MMA_CHUNK;
    4 * (SCAN_WALK_STAGES * q * (q + 8) + 4 * 3 * q) + 2 * (SCAN_WALK_STAGES * q * (pt + 8 + 2 * (n + 8)) + 2 * pt * (n + 8))
}

/// Shared-memory bytes of (chunk_state_mma, chunk_scan_mma, chunk_dstate_mma, chunk_bwd_mma) with `hb`
/// heads per block in the first three: f32 vectors and bf16 tiles with rows padded by 8 (x double-buffered);
/// chunk_bwd_mma's least (one head buffer).
fn smem_mma(p: usize, n: usize, hb: usize) -> [usize; 4] {
    let q = MMA_CHUNK;
    let (sn, sp) = (n + 8, p + 8);
    [
        8 * q * hb + 2 * (q * sn + 2 * q * sp),
        8 * q * hb + 2 * (q * sn + q.max(p) * sn + 2 * q * sp), // B's tile holds S_in once C·Bᵀ is done
        8 * q * hb + 2 * (q * sn + 2 * q * sp),
        bwd_smem(p, n, 1),
    ]
}

/// Shared-memory bytes of chunk_bwd_mma with `nb` buffers of a head's tiles: per buffer the head's vectors (6
/// chunk-long and dD's p), S_in and dL/dS_out (p × (n + 8) bf16 each), x and dy (chunk × (p + 8)); once B and C
/// (chunk × (n + 8)), M and W (chunk × (chunk + 8)).
fn bwd_smem(p: usize, n: usize, nb: usize) -> usize {
    let q = MMA_CHUNK;
    let (sk, sn, sp) = (q + 8, n + 8, p + 8);
    nb * ((6 * q + p) * 4 + 2 * (2 * p * sn + 2 * q * sp)) + 2 * (2 * q * sn + 2 * q * sk)
}

/// Whether bf16 storage of these sizes runs on the tensor-core kernels (chunk 64) on a device with
/// `max` bytes of shared memory per block and compute capability `cc` (bf16 mma needs 8.0).
fn mma_fits(p: usize, n: usize, max: usize, cc: (i32, i32)) -> bool {
    cc.0 >= 8 && p % 16 == 0 && n % 16 == 0 && smem_mma(p, n, MAX_HEADS_PER_BLOCK).iter().all(|&s| s + 256 <= max)
}

/// The chunk size for head_dim `p` and d_state `n` on a device with `max` bytes of shared memory per
/// block, or None when the kernels do not apply (sizes not multiples of 4, or too large).
pub fn chunk_for(p: usize, n: usize, max: usize) -> Option<usize> {
    if p == 0 || n == 0 || p % 4 != 0 || n % 4 != 0 {
        return None;
    }
    [64, 32, 16].into_iter().find(|&q| smem(q, p, n).iter().all(|&s| s + 256 <= max))
}

/// The chunk size and kernel variant (tensor cores or not) for xbc in `dtype` on `dev`, or None where
/// the CUDA SSD does not run.
pub fn plan(dev: &candle_core::Device, dtype: DType, head_dim: usize, d_state: usize) -> Option<(usize, bool)> {
    let candle_core::Device::Cuda(d) = dev else { return None };
    let max = max_shared(d).ok()?;
    let cc = d.cuda_stream().context().compute_capability().ok()?;
    if dtype == DType::BF16 && mma_fits(head_dim, d_state, max, cc) {
        return Some((MMA_CHUNK, true));
    }
    chunk_for(head_dim, d_state, max).map(|q| (q, false))
}

/// Whether the CUDA SSD runs for xbc in `dtype` with these sizes on `dev`.
pub fn supported(dev: &candle_core::Device, dtype: DType, head_dim: usize, d_state: usize) -> bool {
    plan(dev, dtype, head_dim, d_state).is_some()
}

/// The chunked scan on CUDA. `xbc` (b, l, row) f32 or bf16 holds x, B, C per `lay`; `dt`, `la` (b, l, h)
/// f32; the skip `d` (h) or (h, p) adds D·x to y; `s0` (b, h, p, n). Returns y (b, l, h, p) and the final
/// states (b, h, p, n), f32. Differentiable w.r.t. xbc, dt, la, d and s0.
pub fn scan_xbc(xbc: &Tensor, dt: &Tensor, la: &Tensor, d: Option<&Tensor>, s0: Option<&Tensor>, lay: XbcLayout) -> Result<(Tensor, Tensor)> {
    let (b, l, row) = xbc.dims3()?;
    let XbcLayout { heads: h, head_dim: p, groups: g, d_state: n, .. } = lay;
    if g == 0 || h % g != 0 {
        bail!("ssd (cuda): heads ({h}) must be divisible by groups ({g})");
    }
    if lay.x_off + h * p > row || lay.b_off + g * n > row || lay.c_off + g * n > row {
        bail!("ssd (cuda): rows of {row} channels do not hold x, B and C at {lay:?}");
    }
    if !xbc.device().is_cuda() {
        bail!("ssd (cuda): xbc is not on a CUDA device");
    }
    let xbc = match xbc.dtype() {
        DType::F32 | DType::BF16 => xbc.contiguous()?,
        _ => xbc.to_dtype(DType::F32)?.contiguous()?,
    };
    // The tensor-core kernels load rows 16 bytes at a time: with row width or offsets not multiples of 8,
    // bf16 rows take the f32 kernels (planned as for f32 storage).
    let aligned = [row, lay.x_off, lay.b_off, lay.c_off].iter().all(|v| v % 8 == 0);
    let plan_dtype = if aligned { xbc.dtype() } else { DType::F32 };
    let Some((q, mma)) = plan(xbc.device(), plan_dtype, p, n) else { bail!("ssd (cuda): head_dim {p} and d_state {n} do not fit the kernels") };
    let xbc = if mma && xbc.layout().start_offset() % 8 != 0 { xbc.copy()? } else { xbc };
    let d = skip_hp(d, h, p, xbc.device())?;
    for (t, what) in [(dt, "dt"), (la, "la")] {
        if t.dims() != [b, l, h] {
            bail!("ssd (cuda): {what} must be ({b}, {l}, {h}), got shape {:?}", t.dims());
        }
    }
    if let Some(s) = s0 {
        if s.dims() != [b, h, p, n] {
            bail!("ssd (cuda): the initial states must be ({b}, {h}, {p}, {n}), got shape {:?}", s.dims());
        }
    }
    let mut parts = vec![dt.to_dtype(DType::F32)?.flatten_all()?, la.to_dtype(DType::F32)?.flatten_all()?, d.flatten_all()?];
    if let Some(s) = s0 {
        parts.push(s.to_dtype(DType::F32)?.flatten_all()?);
    }
    let packed = Tensor::cat(&parts, 0)?.contiguous()?;
    if packed.elem_count() != 2 * b * l * h + h * p + if s0.is_some() { b * h * p * n } else { 0 } {
        bail!("ssd (cuda): dt and la must be ({b}, {l}, {h}) and the initial states ({b}, {h}, {p}, {n})");
    }
    let out = xbc.apply_op2(&packed, SsdCuda { lay, q, has_s0: s0.is_some(), mma, io_t: false })?;
    let ny = b * l * h * p;
    Ok((out.narrow(0, 0, ny)?.reshape((b, l, h, p))?, out.narrow(0, ny, b * h * p * n)?.reshape((b, h, p, n))?))
}

/// The skip D as (h, p) f32 (zeros without one); its gradient flows back through the broadcast.
fn skip_hp(d: Option<&Tensor>, h: usize, p: usize, dev: &candle_core::Device) -> Result<Tensor> {
    Ok(match d {
        Some(d) if d.dims() == [h] => d.to_dtype(DType::F32)?.reshape((h, 1))?.broadcast_as((h, p))?,
        Some(d) if d.dims() == [h, p] => d.to_dtype(DType::F32)?,
        Some(d) => bail!("ssd (cuda): D must be ({h}) or ({h}, {p}), got shape {:?}", d.dims()),
        None => Tensor::zeros((h, p), DType::F32, dev)?,
    })
}

#[derive(Clone, Copy)]
struct SsdCuda {
    lay: XbcLayout,
    q: usize,
    has_s0: bool,
    /// bf16 tensor-core kernels (q = 64) instead of the f32 ones.
    mma: bool,
    /// y, dy and dx in bf16 (the y-only op's kernels, compiled with IO_T).
    io_t: bool,
}

/// (chunk_state, chunk_scan, chunk_dstate, chunk_bwd) of one variant.
struct Kernels {
    state: &'static str,
    scan: &'static str,
    dstate: &'static str,
    bwd: &'static str,
    threads: u32,
    smem: [usize; 4],
    /// heads per block of state, scan and dstate (the tensor-core kernels take it as their last argument)
    hb: usize,
}

/// Sizes of one call, from the xbc layout.
struct Sizes {
    b: usize,
    l: usize,
    row: usize,
    nc: usize,
}

impl SsdCuda {
    fn sizes(&self, l1: &Layout) -> Result<Sizes> {
        let (b, l, row) = l1.shape().dims3()?;
        Ok(Sizes { b, l, row, nc: l.div_ceil(self.q) })
    }

    fn module(&self, s: &CudaStorage) -> Result<Module> {
        let bf16 = match s.dtype() {
            DType::BF16 => 1,
            DType::F32 => 0,
            d => bail!("ssd (cuda): xbc must be f32 or bf16, got {d:?}"),
        };
        let XbcLayout { head_dim: p, d_state: n, .. } = self.lay;
        module(&s.device, "ssd.cu", SOURCE, &[("T_BF16", bf16), ("P", p as i64), ("N", n as i64), ("Q", self.q as i64), ("IO_T", self.io_t as i64)])
    }

    /// The kernel names, threads per block and shared memory of this call's variant.
    fn kernels(&self) -> Kernels {
        let XbcLayout { head_dim: p, d_state: n, .. } = self.lay;
        if self.mma {
            let hb = heads_per_block(self.lay.heads / self.lay.groups);
            Kernels { state: "ssd_chunk_state_mma", scan: "ssd_chunk_scan_mma", dstate: "ssd_chunk_dstate_mma", bwd: "ssd_chunk_bwd_mma", threads: 128, smem: smem_mma(p, n, hb), hb }
        } else {
            Kernels { state: "ssd_chunk_state", scan: "ssd_chunk_scan", dstate: "ssd_chunk_dstate", bwd: "ssd_chunk_bwd", threads: NT, smem: smem(self.q, p, n), hb: 1 }
        }
    }

    fn common(&self, z: &Sizes) -> [Arg; 5] {
        let lay = self.lay;
        [Arg::I32(z.l as i32), Arg::I32(lay.heads as i32), Arg::I32((lay.heads / lay.groups) as i32), Arg::I32(z.row as i32), Arg::I32(lay.x_off as i32)]
    }

    /// The chunk grid (NC, H, Bt) and the state-passing grid.
    fn grids(&self, z: &Sizes) -> ((u32, u32, u32), (u32, u32, u32)) {
        let XbcLayout { heads: h, head_dim: p, d_state: n, .. } = self.lay;
        ((z.nc as u32, h as u32, z.b as u32), ((p * n).div_ceil(4 * NT as usize) as u32, h as u32, z.b as u32))
    }

    /// The grid and arguments of chunk_state, chunk_scan or chunk_dstate: the chunk grid with its heads
    /// axis divided by `k.hb` and, for the tensor-core kernels, hb as the last argument.
    fn heads_grid(&self, k: &Kernels, z: &Sizes, mut args: Vec<Arg>) -> ((u32, u32, u32), Vec<Arg>) {
        let (c, h, b) = self.grids(z).0;
        if self.mma {
            args.push(Arg::I32(k.hb as i32));
        }
        ((c, h / k.hb as u32, b), args)
    }

    /// chunk_state, then state passing: each chunk's own state (at `pst`: f32, bf16 in the y-only op) and total decay (`pcs`), then the
    /// state entering every chunk, in place at `pst` or, given `bf16`, there in bf16 (what the tensor-core kernels
    /// read); the final state to `sf` (0: none) from `s0` (0: zeros). Given `walk` ([`Self::state_pass_kernel`]'s
    /// choice), with `bf16` and neither s0 nor sf, both in one walk straight to `bf16` instead. Returns the passed
    /// states' address.
    #[allow(clippy::too_many_arguments)]
    fn launch_states(&self, m: &Module, stream: &Stream, z: &Sizes, [xbc, dt, la]: [u64; 3], s0: u64, sf: u64, pst: u64, pcs: u64, bf16: Option<u64>, walk: Option<(usize, u32)>) -> Result<u64> {
        let k = self.kernels();
        let pass_grid = self.grids(z).1;
        let (hi, nci) = (Arg::I32(self.lay.heads as i32), Arg::I32(z.nc as i32));
        let walk = match (bf16, s0, sf, walk) {
            (Some(out), 0, 0, Some(w)) => Some((out, w)),
            _ => None,
        };
        // chunk_state's and the walk's arguments: they differ only in where the states go.
        let args = [&[Arg::Ptr(xbc), Arg::Ptr(dt), Arg::Ptr(la), Arg::Ptr(walk.map_or(pst, |w| w.0)), Arg::Ptr(pcs)][..], &self.common(z), &[Arg::I32(self.lay.b_off as i32), nci]].concat();
        if let Some((out, (pt, threads))) = walk {
            // Both in one walk over the chunks (ssd_state_pass_mma): the chunks' own states are not stored.
            let XbcLayout { heads: h, head_dim: p, .. } = self.lay;
            let smem = state_pass_smem(pt, self.lay.d_state, false);
            let grid = ((p / pt) as u32, h as u32, z.b as u32);
            launch(stream, &function(m, &format!("ssd_state_pass_mma{pt}_{threads}"), smem)?, grid, threads, smem, &args)?;
            return Ok(out);
        }
        let (grid, args) = self.heads_grid(&k, z, args);
        launch(stream, &self.occupying(m, k.state, k.smem[0])?, grid, k.threads, k.smem[0], &args)?;
        match bf16 {
            None => {
                launch(stream, &function(m, "ssd_state_passing", 0)?, pass_grid, NT, 0, &[Arg::Ptr(pst), Arg::Ptr(pcs), Arg::Ptr(s0), Arg::Ptr(sf), hi, nci])?;
                Ok(pst)
            }
            Some(out) => {
                launch(stream, &function(m, "ssd_state_passing_bf16", 0)?, pass_grid, NT, 0, &[Arg::Ptr(pst), Arg::Ptr(out), Arg::Ptr(pcs), Arg::Ptr(s0), Arg::Ptr(sf), hi, nci])?;
                Ok(out)
            }
        }
    }

    /// The channel slice (PT of head_dim) of a walk over the chunks for the y-only op, or None. The walks are
    /// parallel over sequences, heads and slices only, so by default the first slice of `auto` that divides
    /// head_dim is taken where it gives about every multiprocessor a block (0.9×), at d_state 64 or 128 (the
    /// sizes the CUDA tests run them at) and where `fits(pt, max shared memory per block)`; the variable `var`
    /// (64, 32 or 16; 0: none) forces the choice.
    /// With `segments`, a walk may split each sequence's chunks into segments (see [`walk_segments`]), which
    /// count as blocks here; the choice is returned beside the slice (1 without).
    fn walk_slice(&self, stream: &Stream, z: &Sizes, var: &str, auto: &[usize], segments: bool, fits: impl Fn(usize, usize) -> bool) -> Result<Option<(usize, usize)>> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
        let XbcLayout { heads: h, head_dim: p, d_state: n, .. } = self.lay;
        if !(self.mma && self.io_t) {
            return Ok(None);
        }
        let max = super::device_attribute(stream, A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let sms = super::device_attribute(stream, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let fits = |pt: usize| p % pt == 0 && fits(pt, max);
        let segs = |pt: usize| if segments { walk_segments(z.b * h * (p / pt), z.nc, sms) } else { 1 };
        Ok(match std::env::var(var).ok().and_then(|v| v.parse::<usize>().ok()) {
            Some(want) => Some(want).filter(|&pt| [16, 32, 64].contains(&pt) && fits(pt)).map(|pt| (pt, segs(pt))),
            None => auto
                .iter()
                .copied()
                .find(|&pt| p % pt == 0)
                .map(|pt| (pt, segs(pt)))
                .filter(|&(pt, k)| (n == 64 || n == 128) && fits(pt) && 10 * z.b * h * (p / pt) * k >= 9 * sms),
        })
    }

    /// The channel slice and threads of ssd_state_pass_mma (chunk_state and the state passing in one walk over
    /// the chunks) and ssd_dstate_pass_mma (chunk_dstate and the state passing backward in one walk back), for
    /// the y-only op's bf16 passed states; None: the separate kernels instead. By default slices of 64 (32 at
    /// head_dim 32) with 256 threads ([`Self::walk_slice`]); `OURO_SSD_STATE_TILE` (64, 32 or 16; 0: the two
    /// kernels) and `OURO_SSD_STATE_THREADS` (256 or 512) force the choice.
    fn state_pass_kernel(&self, stream: &Stream, z: &Sizes) -> Result<Option<(usize, u32)>> {
        let n = self.lay.d_state;
        let threads = std::env::var("OURO_SSD_STATE_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&t| t == 512).unwrap_or(256);
        // The kernels ssd.cu instantiates: N a power of two, ≥ 32 (≥ 64 for PT 16 or 512 threads).
        let least_n = |pt: usize| if pt == 16 || threads == 512 { 64 } else { 32 };
        let fits = |pt: usize, max: usize| !(pt == 16 && threads == 512) && n.is_power_of_two() && n >= least_n(pt) && state_pass_smem(pt, n, true) + 256 <= max;
        Ok(self.walk_slice(stream, z, "OURO_SSD_STATE_TILE", &[64, 32], false, fits)?.map(|(pt, _)| (pt, threads as u32)))
    }

    /// The channel slice and segments of ssd_scan_walk_mma, the y-only op's whole forward in one walk over the
    /// chunks, or None: chunk_state and the state passing (or their walk), then chunk_scan. By default slices of
    /// 64 ([`Self::walk_slice`]; one block per multiprocessor: 220 KB of shared memory at d_state 128), and
    /// where the sequences × heads are too few for the multiprocessors, segments ([`walk_segments`]). Narrower
    /// slices, which would cover fewer sequences × heads, measured no faster than the separate kernels (2×32768×32
    /// heads: 0.78 ms at slice 32 against 0.77). `OURO_SSD_SCAN_WALK` (64, 32 or 16; 0: off) forces the slice.
    fn scan_walk_kernel(&self, stream: &Stream, z: &Sizes) -> Result<Option<(usize, usize)>> {
        let n = self.lay.d_state;
        // The kernels ssd.cu instantiates: N a power of two, ≥ 16 (≥ 32 at slice 16).
        let fits = |pt: usize, max: usize| n.is_power_of_two() && n >= if pt == 16 { 32 } else { 16 } && scan_walk_smem(pt, n) + 256 <= max;
        self.walk_slice(stream, z, "OURO_SSD_SCAN_WALK", &[64], true, fits)
    }

    /// y by ssd_chunk_cb_mma (C·Bᵀ per chunk and group) and ssd_scan_walk_mma with slices of `pt` and `segs`
    /// segments (from [`Self::scan_walk_kernel`]), no passed states, then with segments ssd_walk_fixup: the
    /// y-only op's forward.
    #[allow(clippy::too_many_arguments)]
    fn launch_scan_walk(&self, dev: &candle_core::cuda_backend::CudaDevice, m: &Module, z: &Sizes, [xbc, dt, la]: [u64; 3], y: u64, dskip: u64, (pt, segs): (usize, usize)) -> Result<()> {
        let XbcLayout { heads: h, head_dim: p, groups: g, d_state: n, x_off, b_off, c_off } = self.lay;
        let stream = &dev.cuda_stream();
        let (_cb, pcb) = alloc_f32(dev, z.b * z.nc * g * MMA_CHUNK * MMA_CHUNK, false)?;
        let (nci, row) = (Arg::I32(z.nc as i32), Arg::I32(z.row as i32));
        let cb_smem = 4 * MMA_CHUNK * (n + 8);
        launch(stream, &function(m, "ssd_chunk_cb_mma", cb_smem)?, (z.nc as u32, g as u32, z.b as u32), 128, cb_smem, &[
            Arg::Ptr(xbc), Arg::Ptr(pcb), Arg::I32(z.l as i32), Arg::I32(g as i32), row, Arg::I32(b_off as i32), Arg::I32(c_off as i32), nci,
        ])?;
        // Segments of cps chunks (ns of them, the last maybe shorter); their own final states and sums of la.
        let cps = z.nc.div_ceil(segs.clamp(1, z.nc));
        let ns = z.nc.div_ceil(cps);
        let nsf = z.b * ns * h * p * n; // [sfin (b, ns, h, p, n) | pre (b, h, nc)], f32
        let seg_buf = (ns > 1).then(|| alloc_f32(dev, nsf + z.b * h * z.nc, false)).transpose()?;
        let (psfin, ppre) = seg_buf.as_ref().map_or((0, 0), |&(_, a)| (a, a + 4 * nsf as u64));
        let smem = scan_walk_smem(pt, n);
        launch(stream, &function(m, &format!("ssd_scan_walk_mma{pt}"), smem)?, ((p / pt) as u32, h as u32, (z.b * ns) as u32), 256, smem, &[
            Arg::Ptr(xbc), Arg::Ptr(pcb), Arg::Ptr(dt), Arg::Ptr(la), Arg::Ptr(y), Arg::Ptr(dskip), Arg::I32(z.l as i32), Arg::I32(h as i32),
            Arg::I32((h / g) as i32), row, Arg::I32(x_off as i32), Arg::I32(b_off as i32), Arg::I32(c_off as i32), nci, Arg::I32(cps as i32),
            Arg::Ptr(psfin), Arg::Ptr(ppre),
        ])?;
        if ns > 1 {
            // The states entering the segments (bf16), then each chunk after the first segment made whole.
            let (_sseg, psseg) = alloc_bf16(dev, z.b * ns * h * p * n, false)?;
            launch(stream, &function(m, "ssd_walk_states", 0)?, (h as u32, z.b as u32, (p * n).div_ceil(256) as u32), 256, 0, &[
                Arg::Ptr(psfin), Arg::Ptr(ppre), Arg::Ptr(psseg), Arg::I32(h as i32), nci, Arg::I32(cps as i32),
            ])?;
            // la (2 stages) and the chunks' prefixes (f32), S_k, and 2 stages of C and y (bf16, rows padded by 8).
            let smem = 4 * (2 * MMA_CHUNK + FIXUP_CHUNKS.next_multiple_of(4)) + 2 * (p * (n + 8) + 2 * MMA_CHUNK * (n + 8 + p + 8));
            launch(stream, &function(m, "ssd_walk_fixup", smem)?, ((cps.div_ceil(FIXUP_CHUNKS) * (ns - 1)) as u32, h as u32, z.b as u32), 128, smem, &[
                Arg::Ptr(xbc), Arg::Ptr(la), Arg::Ptr(psseg), Arg::Ptr(ppre), Arg::Ptr(y), Arg::I32(z.l as i32), Arg::I32(h as i32),
                Arg::I32((h / g) as i32), row, Arg::I32(c_off as i32), nci, Arg::I32(cps as i32), Arg::I32(FIXUP_CHUNKS as i32),
            ])?;
        }
        Ok(())
    }

    /// chunk_state's or chunk_dstate's kernel; the tensor-core ones at head_dim 64 and d_state 128 (38 KB of
    /// shared memory per block, at most 96 registers: five blocks per multiprocessor, `PN_BOUNDS` in ssd.cu)
    /// with the largest shared-memory carveout.
    fn occupying(&self, m: &Module, name: &str, smem: usize) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
        if self.mma && self.lay.head_dim == 64 && self.lay.d_state == 128 {
            super::function_prefer_shared(m, name, smem)
        } else {
            function(m, name, smem)
        }
    }

    /// chunk_scan: y (f32, or bf16 in the y-only op) from the passed states, with the D skip `dskip`.
    #[allow(clippy::too_many_arguments)]
    fn launch_scan(&self, m: &Module, stream: &Stream, z: &Sizes, [xbc, dt, la]: [u64; 3], passed: u64, y: u64, dskip: u64) -> Result<()> {
        let k = self.kernels();
        let XbcLayout { b_off, c_off, .. } = self.lay;
        let args = [
            &[Arg::Ptr(xbc), Arg::Ptr(dt), Arg::Ptr(la), Arg::Ptr(passed), Arg::Ptr(y)][..], &self.common(z),
            &[Arg::I32(b_off as i32), Arg::I32(c_off as i32), Arg::I32(z.nc as i32), Arg::Ptr(dskip)],
        ]
        .concat();
        let (grid, args) = self.heads_grid(&k, z, args);
        launch(stream, &function(m, k.scan, k.smem[1])?, grid, k.threads, k.smem[1], &args)
    }

    /// Heads per block and head buffers of chunk_bwd_mma (2: the next head's tiles load while one computes; 1
    /// where two would not leave two blocks per multiprocessor). The heads per block divide the heads per group:
    /// by default the most that still make at least two blocks per multiprocessor in all (all of a group's where
    /// they do: no partials to sum). `OURO_SSD_BWD_HEADS` forces a divisor, `OURO_SSD_BWD_BUFFERS=1` one buffer.
    fn bwd_heads(&self, stream: &Stream, z: &Sizes) -> Result<(usize, usize)> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
        let XbcLayout { heads: h, head_dim: p, groups, d_state: n, .. } = self.lay;
        if !self.mma {
            return Ok((1, 1));
        }
        // Two buffers where two blocks still fit a multiprocessor (1 KB of each block's shared memory is the
        // system's): measured, two blocks of one buffer beat one block of two (chunk_bwd 1.12 vs 1.29 ms at
        // 4×8192×32×64×128), and two blocks of two beat two of one (1.38 vs 1.46 ms at 2×32768×32×64×64).
        let per_sm = super::device_attribute(stream, A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?;
        let one = std::env::var("OURO_SSD_BWD_BUFFERS").is_ok_and(|v| v == "1");
        let nb = if !one && 2 * (bwd_smem(p, n, 2) + 1024) <= per_sm { 2 } else { 1 };
        let hpg = h / groups;
        let forced = std::env::var("OURO_SSD_BWD_HEADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&k| k > 0 && hpg % k == 0);
        let hb = match forced {
            Some(k) => k,
            None => {
                let sms = super::device_attribute(stream, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
                (1..=hpg).rev().find(|&k| hpg % k == 0 && z.b * z.nc * (h / k) >= 2 * sms).unwrap_or(1)
            }
        };
        Ok((hb, nb))
    }

    /// The backward from the passed states on: chunk_dstate, state_passing_bwd (dL/dS_out of every chunk, in
    /// place in `dstates` or, given `dpassed`, there in bf16), chunk_bwd, then the sums of the per-chunk dD
    /// partials (`dd_part`, tensor-core kernels; the f32 ones add into `dd`) and of the per-head B/C
    /// partials (`part`: the tensor-core kernel's B/C gradients, one slot per block of `heads.0` heads, where a
    /// group spans blocks; `heads` is [`Self::bwd_heads`]'s choice). Given `walk` ([`Self::state_pass_kernel`]'s
    /// choice), with `dpassed` and neither dsf nor ds0, chunk_dstate and state_passing_bwd in one walk back instead.
    #[allow(clippy::too_many_arguments)]
    fn launch_bwd(&self, m: &Module, stream: &Stream, z: &Sizes, g: &BwdPtrs, walk: Option<(usize, u32)>, heads: (usize, usize)) -> Result<()> {
        let k = self.kernels();
        let XbcLayout { heads: h, head_dim: p, groups, b_off, c_off, .. } = self.lay;
        let (grid, pass_grid) = self.grids(z);
        let (hi, hpg, nci) = (Arg::I32(h as i32), Arg::I32((h / groups) as i32), Arg::I32(z.nc as i32));
        let walk = match (g.dpassed, g.dsf, g.ds0) {
            (Some(out), 0, 0) => walk.map(|w| (out, w)),
            _ => None,
        };
        let dpassed = match (walk, g.dpassed) {
            (Some((out, (pt, threads))), _) => {
                // chunk_dstate and state_passing_bwd in one walk back over the chunks (ssd_dstate_pass_mma).
                let smem = state_pass_smem(pt, self.lay.d_state, true);
                launch(stream, &function(m, &format!("ssd_dstate_pass_mma{pt}_{threads}"), smem)?, ((p / pt) as u32, h as u32, z.b as u32), threads, smem, &[
                    Arg::Ptr(g.xbc), Arg::Ptr(g.la), Arg::Ptr(g.dy), Arg::Ptr(g.passed), Arg::Ptr(out), Arg::Ptr(g.dcsum), Arg::I32(z.l as i32), hi, hpg,
                    Arg::I32(z.row as i32), Arg::I32(c_off as i32), nci,
                ])?;
                out
            }
            (None, dpassed) => {
                let args = vec![Arg::Ptr(g.xbc), Arg::Ptr(g.la), Arg::Ptr(g.dy), Arg::Ptr(g.dstates), Arg::I32(z.l as i32), hi, hpg, Arg::I32(z.row as i32), Arg::I32(c_off as i32), nci];
                let (dgrid, args) = self.heads_grid(&k, z, args);
                launch(stream, &self.occupying(m, k.dstate, k.smem[2])?, dgrid, k.threads, k.smem[2], &args)?;
                match dpassed {
                    None => {
                        launch(stream, &function(m, "ssd_state_passing_bwd", 0)?, pass_grid, NT, 0, &[
                            Arg::Ptr(g.dstates), Arg::Ptr(g.passed), Arg::Ptr(g.csum), Arg::Ptr(g.dsf), Arg::Ptr(g.dcsum), Arg::Ptr(g.ds0), hi, nci,
                        ])?;
                        g.dstates
                    }
                    Some(out) => {
                        launch(stream, &function(m, "ssd_state_passing_bwd_bf16", 0)?, pass_grid, NT, 0, &[
                            Arg::Ptr(g.dstates), Arg::Ptr(out), Arg::Ptr(g.passed), Arg::Ptr(g.csum), Arg::Ptr(g.dsf), Arg::Ptr(g.dcsum), Arg::Ptr(g.ds0), hi, nci,
                        ])?;
                        out
                    }
                }
            }
        };
        let mut args = [
            &[Arg::Ptr(g.xbc), Arg::Ptr(g.dt), Arg::Ptr(g.la), Arg::Ptr(g.passed), Arg::Ptr(dpassed), Arg::Ptr(g.dcsum), Arg::Ptr(g.dy), Arg::Ptr(g.dx), Arg::Ptr(g.ddt), Arg::Ptr(g.dla)][..],
            &self.common(z),
            &[Arg::I32(b_off as i32), Arg::I32(c_off as i32), nci],
        ]
        .concat();
        // The tensor-core kernel: `hb` heads per block, their B/C gradients summed in the block (partials only
        // when a group's heads span blocks).
        let (hb, nb) = heads;
        let part = g.part.filter(|_| hb < h / groups);
        if self.mma {
            args.push(Arg::Ptr(part.unwrap_or(0)));
        }
        args.extend([Arg::Ptr(g.dskip), Arg::Ptr(g.dd_part.unwrap_or(g.dd))]);
        if self.mma {
            args.push(Arg::I32(hb as i32));
            let smem = bwd_smem(p, self.lay.d_state, nb);
            let name = if nb == 2 { "ssd_chunk_bwd_mma" } else { "ssd_chunk_bwd_mma1" };
            launch(stream, &super::function_prefer_shared(m, name, smem)?, ((h / hb) as u32, z.nc as u32, z.b as u32), 256, smem, &args)?;
        } else {
            launch(stream, &function(m, k.bwd, k.smem[3])?, grid, k.threads, k.smem[3], &args)?;
        }
        if let Some(dp) = g.dd_part {
            launch(stream, &function(m, "ssd_reduce_dd", 0)?, ((h * p).div_ceil(32) as u32, 1, 1), 1024, 0, &[
                Arg::Ptr(dp), Arg::Ptr(g.dd), Arg::I32((z.b * z.nc) as i32), Arg::I32((h * p) as i32),
            ])?;
        }
        if let Some(part) = part {
            let blocks = ((z.b * z.l * groups * 2 * self.lay.d_state).div_ceil(256)).min(65535) as u32;
            launch(stream, &function(m, "ssd_reduce_heads", 0)?, (blocks, 1, 1), 256, 0, &[
                Arg::Ptr(part), Arg::Ptr(g.dx), Arg::I64((z.b * z.l) as i64), Arg::I32((h / hb) as i32), Arg::I32((h / groups / hb) as i32), Arg::I32(z.row as i32),
                Arg::I32(b_off as i32), Arg::I32(c_off as i32),
            ])?;
        }
        Ok(())
    }
}

type Module = std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>;
type Stream = std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>;

/// Device addresses of one backward call (0 for none): the inputs, the passed states and decays from
/// [`SsdCuda::launch_states`], the scratch and the outputs.
struct BwdPtrs {
    xbc: u64,
    dt: u64,
    la: u64,
    dy: u64,
    passed: u64,
    csum: u64,
    /// dL/d(final state), dL/d(initial state)
    dsf: u64,
    ds0: u64,
    /// scratch of the chunks' state gradients (b·nc·h·p·n; f32, bf16 in the y-only op), and the bf16
    /// buffer for them when the passed states are bf16 (the tensor-core kernels)
    dstates: u64,
    dpassed: Option<u64>,
    dcsum: u64,
    dx: u64,
    ddt: u64,
    dla: u64,
    part: Option<u64>,
    dskip: u64,
    dd: u64,
    dd_part: Option<u64>,
}

impl CustomOp2 for SsdCuda {
    fn name(&self) -> &'static str {
        "ssd-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("ssd-cuda: runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let z = self.sizes(l1)?;
        let XbcLayout { heads: h, head_dim: p, d_state: n, .. } = self.lay;
        let dev = s1.device.clone();
        let stream = dev.cuda_stream();
        let m = self.module(s1)?;
        let (xbc, packed) = (ptr(s1, l1, "ssd xbc")?, ptr(s2, l2, "ssd dt/la")?);
        let blh = z.b * z.l * h;
        let (dt, la, dskip) = (packed, packed + 4 * blh as u64, packed + 8 * blh as u64);
        let s0 = if self.has_s0 { packed + 4 * (2 * blh + h * p) as u64 } else { 0 };
        let (ny, ns) = (z.b * z.l * h * p, z.b * h * p * n);
        let (out, po) = alloc_f32(&dev, ny + ns, false)?;
        let nst = z.b * z.nc * h * p * n;
        let (_states, pst) = alloc_f32(&dev, nst, false)?;
        // The tensor-core kernels read the passed states in bf16.
        let passed_bf16 = self.mma.then(|| alloc_bf16(&dev, nst, false)).transpose()?;
        let (_csum, pcs) = alloc_f32(&dev, z.b * h * z.nc, false)?;
        poison(&dev, po, ny + ns)?;
        let passed = self.launch_states(&m, &stream, &z, [xbc, dt, la], s0, po + 4 * ny as u64, pst, pcs, passed_bf16.as_ref().map(|v| v.1), None)?;
        self.launch_scan(&m, &stream, &z, [xbc, dt, la], passed, po, dskip)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(ny + ns)))
    }

    fn bwd(&self, t1: &Tensor, t2: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The tensor-core backward reads dy 16 bytes at a time.
        let grad = grad.detach().contiguous()?;
        let grad = if self.mma && grad.layout().start_offset() % 4 != 0 { grad.copy()? } else { grad };
        let g = t1.detach().apply_op3_no_bwd(&t2.detach(), &grad, &SsdCudaBwd { fwd: *self })?;
        let n1 = t1.elem_count();
        let d1 = g.narrow(0, 0, n1)?.reshape(t1.shape())?.to_dtype(t1.dtype())?;
        let d2 = g.narrow(0, n1, t2.elem_count())?.reshape(t2.shape())?;
        Ok((Some(d1), Some(d2)))
    }
}

/// (xbc, [dt | la | D | s0], [dy | dsf]) → [dxbc | ddt | dla | dD | ds0], f32.
struct SsdCudaBwd {
    fwd: SsdCuda,
}

impl CustomOp3 for SsdCudaBwd {
    fn name(&self) -> &'static str {
        "ssd-cuda-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("ssd-cuda-bwd: runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        let f = &self.fwd;
        let z = f.sizes(l1)?;
        let XbcLayout { heads: h, head_dim: p, d_state: n, .. } = f.lay;
        let dev = s1.device.clone();
        let stream = dev.cuda_stream();
        let m = f.module(s1)?;
        let (xbc, packed, grads) = (ptr(s1, l1, "ssd xbc")?, ptr(s2, l2, "ssd dt/la")?, ptr(s3, l3, "ssd grads")?);
        let blh = z.b * z.l * h;
        let (dt, la, dskip) = (packed, packed + 4 * blh as u64, packed + 8 * blh as u64);
        let s0 = if f.has_s0 { packed + 4 * (2 * blh + h * p) as u64 } else { 0 };
        let (ny, ns, nx) = (z.b * z.l * h * p, z.b * h * p * n, z.b * z.l * z.row);
        let (dy, dsf) = (grads, grads + 4 * ny as u64);
        let total = nx + 2 * blh + h * p + if f.has_s0 { ns } else { 0 };
        let (out, po) = alloc_f32(&dev, total, true)?;
        let nst = z.b * z.nc * h * p * n;
        let (_states, pst) = alloc_f32(&dev, nst, false)?;
        let (_dstates, pdst) = alloc_f32(&dev, nst, false)?;
        let (_csum, pcs) = alloc_f32(&dev, z.b * h * z.nc, false)?;
        let (_dcsum, pdcs) = alloc_f32(&dev, z.b * h * z.nc, true)?;
        // Poison what the kernels overwrite without accumulating (ddt, dla, ds0).
        let (pdx, pddt, pdla, pdd) = (po, po + 4 * nx as u64, po + 4 * (nx + blh) as u64, po + 4 * (nx + 2 * blh) as u64);
        let pds0 = if f.has_s0 { po + 4 * (nx + 2 * blh + h * p) as u64 } else { 0 };
        poison(&dev, pddt, 2 * blh)?;
        if f.has_s0 {
            poison(&dev, pds0, ns)?;
        }
        let passed_bf16 = f.mma.then(|| alloc_bf16(&dev, nst, false)).transpose()?;
        let dpassed_bf16 = f.mma.then(|| alloc_bf16(&dev, nst, false)).transpose()?;
        let passed = f.launch_states(&m, &stream, &z, [xbc, dt, la], s0, 0, pst, pcs, passed_bf16.as_ref().map(|v| v.1), None)?;
        // Tensor-core path: B and C gradients summed over each block's heads, into partials (one per block) summed
        // per group where a group's heads span blocks (plain stores instead of atomics contended by the blocks of
        // a group; OURO_SSD_ATOMICS=1 for atomics), else added straight into dxbc.
        let heads = f.bwd_heads(&stream, &z)?;
        let slots = h / heads.0;
        let part = (f.mma && slots > f.lay.groups && std::env::var_os("OURO_SSD_ATOMICS").is_none()).then(|| alloc_f32(&dev, z.b * z.l * slots * 2 * n, false)).transpose()?;
        // The tensor-core kernel writes dD per chunk (reduced after it); the f32 one adds into pdd.
        let dd_part = f.mma.then(|| alloc_f32(&dev, z.b * z.nc * h * p, false)).transpose()?;
        f.launch_bwd(&m, &stream, &z, &BwdPtrs {
            xbc, dt, la, dy, passed, csum: pcs, dsf, ds0: pds0, dstates: pdst, dpassed: dpassed_bf16.as_ref().map(|v| v.1), dcsum: pdcs, dx: pdx, ddt: pddt, dla: pdla,
            part: part.as_ref().map(|v| v.1), dskip, dd: pdd, dd_part: dd_part.as_ref().map(|v| v.1),
        }, None, heads)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(total)))
    }
}

/// The SSD layer for training, on the bf16 tensor-core kernels: y alone (no initial or final state), the
/// dt preparation (bias, softplus, clamp, ·A) inside the op, y written in bf16, and a backward that reads
/// dy and writes the xbc gradient in bf16 — no candle ops around the scan in either direction. `xbc` (b,
/// l, row) bf16 per `lay`, raw `dt` (b, l, h), `a` and `dt_bias` (h), the skip `d` (h) or (h, p).
/// Returns y (b, l, h, p) bf16, or None where these kernels do not apply (then [`scan_xbc`] does).
/// Differentiable w.r.t. xbc, dt, a, dt_bias and d.
#[allow(clippy::too_many_arguments)]
pub fn scan_xbc_y(xbc: &Tensor, dt: &Tensor, a: &Tensor, dt_bias: Option<&Tensor>, d: Option<&Tensor>, softplus: bool, dt_limit: (f64, f64), starts: Option<&Tensor>, lay: XbcLayout) -> Result<Option<Tensor>> {
    let (b, l, row) = xbc.dims3()?;
    let XbcLayout { heads: h, head_dim: p, groups: g, d_state: n, .. } = lay;
    if xbc.dtype() != DType::BF16 || g == 0 || h % g != 0 || std::env::var_os("OURO_SSD_ATOMICS").is_some() {
        return Ok(None);
    }
    if lay.x_off + h * p > row || lay.b_off + g * n > row || lay.c_off + g * n > row || ![row, lay.x_off, lay.b_off, lay.c_off].iter().all(|v| v % 8 == 0) {
        return Ok(None);
    }
    if plan(xbc.device(), DType::BF16, p, n) != Some((MMA_CHUNK, true)) {
        return Ok(None);
    }
    if dt.dims() != [b, l, h] {
        bail!("ssd (cuda): dt must be ({b}, {l}, {h}), got shape {:?}", dt.dims());
    }
    let xbc = xbc.contiguous()?;
    let xbc = if xbc.layout().start_offset() % 8 != 0 { xbc.copy()? } else { xbc };
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let d = skip_hp(d, h, p, xbc.device())?;
    let bias = match dt_bias {
        Some(t) => f(t)?,
        None => Tensor::zeros(h, DType::F32, xbc.device())?,
    };
    // dt as it is (f32, contiguous: no copy when it is already), and [A (h) | dt_bias (h) | D (h·p) | the
    // document starts' decay offsets (b·l) where there are documents], f32.
    let dt = f(dt)?.contiguous()?;
    let mut parts = vec![f(a)?.flatten_all()?, bias.flatten_all()?, d.flatten_all()?];
    if let Some(s) = starts {
        if s.elem_count() != b * l {
            bail!("ssd (cuda): document starts must have {} values, got {}", b * l, s.elem_count());
        }
        parts.push(f(s)?.flatten_all()?);
    }
    let params = Tensor::cat(&parts, 0)?;
    if params.elem_count() != 2 * h + h * p + starts.map_or(0, |_| b * l) {
        bail!("ssd (cuda): A and dt_bias must be ({h})");
    }
    let (lo, hi) = dt_limit;
    let op = SsdYCuda { lay, softplus, lo: lo as f32, hi: if hi.is_finite() { hi as f32 } else { f32::INFINITY }, docs: starts.is_some() };
    Ok(Some(xbc.apply_op3(&dt, &params, op)?))
}

#[derive(Clone, Copy)]
struct SsdYCuda {
    lay: XbcLayout,
    softplus: bool,
    lo: f32,
    hi: f32,
    /// `params` ends with the document starts' decay offsets (b·l).
    docs: bool,
}

impl SsdYCuda {
    /// The launch plan of the y-only op: the tensor-core kernels with y, dy and dx in bf16.
    fn full(&self) -> SsdCuda {
        SsdCuda { lay: self.lay, q: MMA_CHUNK, has_s0: false, mma: true, io_t: true }
    }

    /// Addresses of A, dt_bias and D in `params` ([A (h) | dt_bias (h) | D (h·p)]).
    fn params(&self, params: u64) -> [u64; 3] {
        let h = self.lay.heads;
        [params, params + 4 * h as u64, params + 8 * h as u64]
    }

    /// dtp and la (each b·l·h f32) from the raw `dt` and the parameters at `params`.
    fn prep(&self, dev: &candle_core::cuda_backend::CudaDevice, m: &Module, dt: u64, params: u64, blh: usize) -> Result<(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>, u64, u64)> {
        let h = self.lay.heads;
        let (buf, pb) = alloc_f32(dev, 2 * blh, false)?;
        let [pa, pbias, pd] = self.params(params);
        let start = if self.docs { pd + 4 * (h * self.lay.head_dim) as u64 } else { 0 };
        launch(&dev.cuda_stream(), &function(m, "ssd_prep_dt", 0)?, (blh.div_ceil(256).min(4096) as u32, 1, 1), 256, 0, &[
            Arg::Ptr(dt), Arg::Ptr(pa), Arg::Ptr(pbias), Arg::Ptr(start), Arg::Ptr(pb), Arg::Ptr(pb + 4 * blh as u64), Arg::I64(blh as i64), Arg::I32(h as i32),
            Arg::I32(self.softplus as i32), Arg::F32(self.lo), Arg::F32(self.hi),
        ])?;
        Ok((buf, pb, pb + 4 * blh as u64))
    }
}

impl CustomOp3 for SsdYCuda {
    fn name(&self) -> &'static str {
        "ssd-y-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("ssd-y-cuda: runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        let f = self.full();
        let z = f.sizes(l1)?;
        let XbcLayout { heads: h, head_dim: p, d_state: n, .. } = self.lay;
        let dev = s1.device.clone();
        let stream = dev.cuda_stream();
        let m = f.module(s1)?;
        let (xbc, dt, params) = (ptr(s1, l1, "ssd xbc")?, ptr(s2, l2, "ssd dt")?, ptr(s3, l3, "ssd params")?);
        let blh = z.b * z.l * h;
        let [_, _, dskip] = self.params(params);
        let (_prep, dtp, la) = self.prep(&dev, &m, dt, params, blh)?;
        let ny = z.b * z.l * h * p;
        let (y, py) = alloc_bf16(&dev, ny, false)?;
        poison_bf16(&dev, py, ny)?;
        if let Some(walk) = f.scan_walk_kernel(&stream, &z)? {
            f.launch_scan_walk(&dev, &m, &z, [xbc, dtp, la], py, dskip, walk)?;
            return Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((z.b, z.l, h, p))));
        }
        let nst = z.b * z.nc * h * p * n;
        // The chunks' own states: not stored when the state walk runs.
        let walk = f.state_pass_kernel(&stream, &z)?;
        let own = if walk.is_some() { 1 } else { nst };
        let (_states, pst) = alloc_bf16(&dev, own, false)?;
        let (_passed, ppass) = alloc_bf16(&dev, nst, false)?;
        let (_csum, pcs) = alloc_f32(&dev, z.b * h * z.nc, false)?;
        let passed = f.launch_states(&m, &stream, &z, [xbc, dtp, la], 0, 0, pst, pcs, Some(ppass), walk)?;
        f.launch_scan(&m, &stream, &z, [xbc, dtp, la], passed, py, dskip)?;
        // y in its final shape: a reshape after the op would cost the backward a zero-filled gradient of y
        // and an add (candle's autodiff does that for every node).
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((z.b, z.l, h, p))))
    }

    fn bwd(&self, t1: &Tensor, t2: &Tensor, t3: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // dy in bf16, 16-byte aligned (the tiles load it 16 bytes at a time).
        let grad = grad.detach().to_dtype(DType::BF16)?.contiguous()?;
        let grad = if grad.layout().start_offset() % 8 != 0 { grad.copy()? } else { grad };
        let stash = Stash::default();
        let dxbc = t1.detach().apply_op3_no_bwd(&t2.detach(), &grad, &SsdYCudaBwd { fwd: *self, params: t3.detach(), stash: stash.clone() })?;
        // [ddt | dA | ddt_bias | dD]: dt's gradient, then the parameters' in their layout.
        let d = stash.take(t2)?;
        let blh = t2.elem_count();
        Ok((Some(dxbc.reshape(t1.shape())?), Some(d.narrow(0, 0, blh)?.reshape(t2.shape())?), Some(d.narrow(0, blh, t3.elem_count())?)))
    }
}

/// (xbc, dt, dy bf16) and the parameters [A | dt_bias | D] → dxbc (bf16) as the output, and [ddt | dA |
/// ddt_bias | dD] (f32) left in the stash.
struct SsdYCudaBwd {
    fwd: SsdYCuda,
    params: Tensor,
    stash: Stash,
}

impl CustomOp3 for SsdYCudaBwd {
    fn name(&self) -> &'static str {
        "ssd-y-cuda-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("ssd-y-cuda-bwd: runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
        let y = &self.fwd;
        let f = y.full();
        let z = f.sizes(l1)?;
        let XbcLayout { heads: h, head_dim: p, d_state: n, groups, x_off, .. } = f.lay;
        let dev = s1.device.clone();
        let stream = dev.cuda_stream();
        let m = f.module(s1)?;
        let (xbc, dt, dy) = (ptr(s1, l1, "ssd xbc")?, ptr(s2, l2, "ssd dt")?, ptr(s3, l3, "ssd dy")?);
        let (params_storage, params_layout) = self.params.storage_and_layout();
        let candle_core::Storage::Cuda(ps) = &*params_storage else { bail!("ssd (cuda): the parameters are not on the GPU") };
        let params = ptr(ps, params_layout, "ssd params")?;
        let blh = z.b * z.l * h;
        let [pa, pbias, dskip] = y.params(params);
        let (_prep, dtp, la) = y.prep(&dev, &m, dt, params, blh)?;
        let nx = z.b * z.l * z.row;
        // Columns of a row outside x, B and C get no gradient: zero them first.
        let covered = z.row == h * p + 2 * groups * n && x_off == 0;
        let (dx, pdx) = alloc_bf16(&dev, nx, !covered)?;
        if covered {
            poison_bf16(&dev, pdx, nx)?;
        }
        // (Zero-filled: the document starts, at the end of the parameters, are constants.)
        let total = blh + self.params.elem_count();
        let (dpk, pdpk) = alloc_f32(&dev, total, true)?;
        // dt's gradient, then the parameters' laid out as they are.
        let (pddt, [pda, pdbias, pdd]) = (pdpk, y.params(pdpk + 4 * blh as u64));
        poison(&dev, pddt, blh)?;
        poison(&dev, pdd, h * p)?;
        let nst = z.b * z.nc * h * p * n;
        // The chunks' own states and state gradients: not stored when the state walks run.
        let walk = f.state_pass_kernel(&stream, &z)?;
        let own = if walk.is_some() { 1 } else { nst };
        let (_states, pst) = alloc_bf16(&dev, own, false)?;
        let (_dstates, pdst) = alloc_bf16(&dev, own, false)?;
        let (_csum, pcs) = alloc_f32(&dev, z.b * h * z.nc, false)?;
        let (_dcsum, pdcs) = alloc_f32(&dev, z.b * h * z.nc, true)?;
        let (_passed, ppass) = alloc_bf16(&dev, nst, false)?;
        let (_dpassed, pdpass) = alloc_bf16(&dev, nst, false)?;
        let (_dprep, pddtp) = alloc_f32(&dev, 2 * blh, false)?;
        let pdla = pddtp + 4 * blh as u64;
        let heads = f.bwd_heads(&stream, &z)?;
        let slots = h / heads.0;
        let part = (slots > groups).then(|| alloc_bf16(&dev, z.b * z.l * slots * 2 * n, false)).transpose()?;
        let (_ddp, pddp) = alloc_f32(&dev, z.b * z.nc * h * p, false)?;
        let passed = f.launch_states(&m, &stream, &z, [xbc, dtp, la], 0, 0, pst, pcs, Some(ppass), walk)?;
        f.launch_bwd(&m, &stream, &z, &BwdPtrs {
            xbc, dt: dtp, la, dy, passed, csum: pcs, dsf: 0, ds0: 0, dstates: pdst, dpassed: Some(pdpass), dcsum: pdcs, dx: pdx, ddt: pddtp, dla: pdla,
            part: part.as_ref().map(|v| v.1), dskip, dd: pdd, dd_part: Some(pddp),
        }, walk, heads)?;
        let hi = Arg::I32(h as i32);
        launch(&stream, &function(&m, "ssd_prep_dt_bwd", 0)?, (blh.div_ceil(256).min(1024) as u32, 1, 1), 256, 8 * h, &[
            Arg::Ptr(dt), Arg::Ptr(pa), Arg::Ptr(pbias), Arg::Ptr(pddtp), Arg::Ptr(pdla), Arg::Ptr(pddt), Arg::Ptr(pda), Arg::Ptr(pdbias),
            Arg::I64(blh as i64), hi, Arg::I32(y.softplus as i32), Arg::F32(y.lo), Arg::F32(y.hi),
        ])?;
        self.stash.put(CudaStorage::wrap_cuda_slice(dpk, dev.clone()), Shape::from(total));
        Ok((CudaStorage::wrap_cuda_slice(dx, dev), Shape::from(nx)))
    }
}
