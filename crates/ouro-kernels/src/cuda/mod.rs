//! ouro's own CUDA kernels (feature `cuda`): CUDA C compiled at run time by NVRTC, specialised for the
//! sizes of each call (head_dim, d_state, chunk) and cached per device, launched on candle's stream.
//!
//! - [`ssd`]: the Mamba-2 chunked SSD scan, forward and backward, as a candle custom op.
//! - [`selective_scan`]: Mamba-1's selective scan (S6), forward and backward.
//! - [`conv`]: the causal depthwise conv1d, forward and backward.
//! - [`norm`]: the (gated) RMSNorm, forward and backward.
//! - [`decode`]: Mamba-2's single-token step (conv update, SiLU, SSD state update, y) fused for a batch.
//!
//! Apart from `ssd` these are the CUDA halves of the CPU custom ops of the same names: the same packed
//! f32 layouts in and out, so that one op (and one backward) serves both devices.

pub mod conv;
pub mod decode;
pub mod linear_scan;
pub mod norm;
pub mod selective_scan;
pub mod ssd;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaModule, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{bail, Layout, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A compiled module: (device ordinal, source name, defines) → module.
type ModuleKey = (usize, &'static str, String);

fn modules() -> &'static Mutex<HashMap<ModuleKey, Arc<CudaModule>>> {
    static M: OnceLock<Mutex<HashMap<ModuleKey, Arc<CudaModule>>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// The module built from `source` with `defines` (`-D` flags) for `dev`, compiled on first use.
pub(crate) fn module(dev: &CudaDevice, name: &'static str, source: &str, defines: &[(&str, i64)]) -> Result<Arc<CudaModule>> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let key_defs: String = defines.iter().map(|(k, v)| format!("-D{k}={v} ")).collect();
    let key = (ctx.ordinal(), name, key_defs.clone());
    if let Some(m) = modules().lock().unwrap().get(&key) {
        return Ok(m.clone());
    }
    let (major, minor) = ctx.compute_capability().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
    let opts = CompileOptions { arch: Some(arch), options: key_defs.split_whitespace().map(String::from).chain(["-std=c++17".to_string()]).collect(), ..Default::default() };
    let ptx = compile_ptx_with_opts(source, opts).map_err(|e| candle_core::Error::Msg(format!("NVRTC compiling {name} ({key_defs}): {e}")))?;
    let m = ctx.load_module(ptx).map_err(|e| candle_core::Error::Msg(format!("loading {name}: {e}")))?;
    modules().lock().unwrap().insert(key, m.clone());
    Ok(m)
}

/// A kernel looked up in a module, with the attributes set on it so far.
struct Kernel {
    f: CudaFunction,
    /// The dynamic shared memory the function has been allowed (0: the default, 48 KB less its static
    /// shared memory: a launch of exactly 48 KB dynamic fails when the kernel has any static).
    smem: usize,
    /// Whether the largest shared-memory carveout was asked for.
    carveout: bool,
}

/// Kernels by (module address, name): looked up and given their attributes once, not at every launch
/// (two driver calls each, on the path of every op).
fn kernels() -> &'static Mutex<HashMap<(usize, String), Kernel>> {
    static K: OnceLock<Mutex<HashMap<(usize, String), Kernel>>> = OnceLock::new();
    K.get_or_init(Default::default)
}

/// A kernel of `m` whose dynamic shared memory may reach `smem` bytes.
pub(crate) fn function(m: &Arc<CudaModule>, name: &str, smem: usize) -> Result<CudaFunction> {
    kernel(m, name, smem, false)
}

/// As [`function`], and asks the driver to give the kernel's multiprocessors the largest shared-memory
/// share of their L1/shared memory (the carveout): by default it picks a smaller one that can hold fewer
/// of the blocks that registers would allow (ssd_chunk_state_mma: 168 of 228 KB, four blocks where five fit).
pub(crate) fn function_prefer_shared(m: &Arc<CudaModule>, name: &str, smem: usize) -> Result<CudaFunction> {
    kernel(m, name, smem, true)
}

fn kernel(m: &Arc<CudaModule>, name: &str, smem: usize, carveout: bool) -> Result<CudaFunction> {
    KERNEL_NAME.with(|n| {
        let mut n = n.borrow_mut();
        n.clear();
        n.push_str(name);
    });
    // Modules live for the process (cached in `modules`), so their addresses identify them.
    let key = (Arc::as_ptr(m) as usize, name.to_string());
    let mut cache = kernels().lock().unwrap();
    let k = match cache.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let f = m.load_function(name).map_err(|e| candle_core::Error::Msg(format!("kernel {name}: {e}")))?;
            e.insert(Kernel { f, smem: 0, carveout: false })
        }
    };
    if smem > k.smem {
        k.f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| candle_core::Error::Msg(format!("kernel {name}: {smem} bytes of shared memory: {e}")))?;
        k.smem = smem;
    }
    if carveout && !k.carveout {
        k.f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)
            .map_err(|e| candle_core::Error::Msg(format!("kernel {name}: shared-memory carveout: {e}")))?;
        k.carveout = true;
    }
    Ok(k.f.clone())
}

/// The most dynamic shared memory one block of this device may use.
pub fn max_shared(dev: &CudaDevice) -> Result<usize> {
    let stream = dev.cuda_stream();
    let v = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    Ok(v as usize)
}

/// An attribute of the device a stream runs on (the multiprocessor count, the largest shared memory…).
pub(crate) fn device_attribute(stream: &CudaStream, a: sys::CUdevice_attribute) -> Result<usize> {
    let v = stream.context().attribute(a).map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    Ok(v as usize)
}

/// A kernel argument: a device address (0 for none) or a 32-bit integer or float.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    I64(i64),
}

/// Per-kernel time (seconds, launches) while profiling is on ([`profile`]).
fn profile_table() -> &'static Mutex<Option<HashMap<String, (f64, usize)>>> {
    static P: OnceLock<Mutex<Option<HashMap<String, (f64, usize)>>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// Turns per-kernel timing on (every launch synchronises: for diagnosis, not for speed) or off; off
/// returns what was timed, as (kernel, seconds, launches), slowest first.
pub fn profile(on: bool) -> Vec<(String, f64, usize)> {
    let mut t = profile_table().lock().unwrap();
    let old = std::mem::replace(&mut *t, on.then(HashMap::new));
    let mut v: Vec<(String, f64, usize)> = old.unwrap_or_default().into_iter().map(|(k, (s, n))| (k, s, n)).collect();
    v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    v
}

/// Launches `f` on `stream` with `args` in order.
pub(crate) fn launch(stream: &Arc<CudaStream>, f: &CudaFunction, grid: (u32, u32, u32), block: u32, smem: usize, args: &[Arg]) -> Result<()> {
    let profiling = profile_table().lock().unwrap().is_some();
    if profiling {
        stream.synchronize().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        let t = std::time::Instant::now();
        launch_now(stream, f, grid, block, smem, args)?;
        stream.synchronize().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        let name = KERNEL_NAME.with(|n| n.borrow().clone());
        if let Some(m) = profile_table().lock().unwrap().as_mut() {
            let e = m.entry(name).or_insert((0.0, 0));
            e.0 += t.elapsed().as_secs_f64();
            e.1 += 1;
        }
        return Ok(());
    }
    launch_now(stream, f, grid, block, smem, args)
}

thread_local! {
    /// The name of the kernel [`function`] last looked up on this thread (for the profile).
    static KERNEL_NAME: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn launch_now(stream: &Arc<CudaStream>, f: &CudaFunction, grid: (u32, u32, u32), block: u32, smem: usize, args: &[Arg]) -> Result<()> {
    let mut b = stream.launch_builder(f);
    for a in args {
        match a {
            Arg::Ptr(p) => b.arg(p),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
            Arg::I64(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem as u32 };
    unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Msg(format!("launching a kernel: {e}")))?;
    Ok(())
}

/// The device address of a storage's first element under `layout` (which must be contiguous). The
/// kernels run on candle's one stream, in order with candle's own work, so cudarc's per-slice stream
/// events (which the returned guard would record) are not needed.
pub(crate) fn ptr(s: &CudaStorage, layout: &Layout, what: &str) -> Result<u64> {
    if !layout.is_contiguous() {
        bail!("{what}: the CUDA kernels take contiguous tensors");
    }
    let stream = s.device.cuda_stream();
    let (base, esize) = match &s.slice {
        CudaStorageSlice::F32(v) => (v.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(v) => (v.device_ptr(&stream).0, 2),
        CudaStorageSlice::F16(v) => (v.device_ptr(&stream).0, 2),
        _ => bail!("{what}: expected f32, bf16 or f16 storage"),
    };
    Ok(base + (layout.start_offset() * esize) as u64)
}

const PROBE: &str = r#"
extern "C" __global__ void fill_f32(float* p, float v, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) p[i] = v;
}
extern "C" __global__ void fill_u16(unsigned short* p, int v, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) p[i] = v;
}
extern "C" __global__ void copy_f4(const float4* __restrict__ src, float4* __restrict__ dst, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) dst[i] = src[i];
}
"#;

/// Fills `len` values at `p` with NaN by the probe kernel `fill` (NaN given as `nan`) when OURO_CUDA_POISON
/// is set (tests: every output element a kernel claims to write must be written).
fn poison_with(dev: &CudaDevice, fill: &str, nan: Arg, p: u64, len: usize) -> Result<()> {
    if std::env::var_os("OURO_CUDA_POISON").is_some() && len > 0 {
        let m = module(dev, "probe", PROBE, &[])?;
        launch(&dev.cuda_stream(), &function(&m, fill, 0)?, (256, 1, 1), 256, 0, &[Arg::Ptr(p), nan, Arg::I64(len as i64)])?;
    }
    Ok(())
}

/// [`poison_with`] for f32 values.
pub(crate) fn poison(dev: &CudaDevice, p: u64, len: usize) -> Result<()> {
    poison_with(dev, "fill_f32", Arg::F32(f32::NAN), p, len)
}

/// [`poison_with`] for bf16 values (0x7fc0: a quiet NaN).
pub(crate) fn poison_bf16(dev: &CudaDevice, p: u64, len: usize) -> Result<()> {
    poison_with(dev, "fill_u16", Arg::I32(0x7fc0), p, len)
}

/// A fresh device buffer of `len` values of T (uninitialised, or zeroed) and its address.
fn alloc<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
    dev: &CudaDevice,
    len: usize,
    zeroed: bool,
) -> Result<(candle_core::cuda_backend::cudarc::driver::CudaSlice<T>, u64)> {
    use candle_core::cuda_backend::WrapErr;
    let stream = dev.cuda_stream();
    let v = if zeroed { stream.alloc_zeros::<T>(len.max(1)).w()? } else { unsafe { stream.alloc::<T>(len.max(1)) }.w()? };
    let p = v.device_ptr(&stream).0;
    Ok((v, p))
}

/// A fresh bf16 device buffer of `len` values (uninitialised, or zeroed) and its address.
pub(crate) fn alloc_bf16(dev: &CudaDevice, len: usize, zeroed: bool) -> Result<(candle_core::cuda_backend::cudarc::driver::CudaSlice<half::bf16>, u64)> {
    alloc(dev, len, zeroed)
}

/// A storage made by a kernel launch beside an op's own output (a candle op returns one storage), left
/// here by the op and turned into a tensor by [`Stash::take`].
#[derive(Clone, Default)]
pub(crate) struct Stash(Arc<Mutex<Option<(CudaStorage, candle_core::Shape)>>>);

impl Stash {
    pub(crate) fn put(&self, s: CudaStorage, shape: candle_core::Shape) {
        *self.0.lock().unwrap() = Some((s, shape));
    }

    /// The stored storage as a tensor on `like`'s device (no gradient).
    pub(crate) fn take(&self, like: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        like.apply_op1_no_bwd(self)
    }
}

impl candle_core::CustomOp1 for Stash {
    fn name(&self) -> &'static str {
        "stash"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        bail!("stash: CUDA only")
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        match self.0.lock().unwrap().take() {
            Some(v) => Ok(v),
            None => bail!("stash: taken before it was filled"),
        }
    }
}

/// A fresh f32 device buffer of `len` values (uninitialised, or zeroed) and its address.
pub(crate) fn alloc_f32(dev: &CudaDevice, len: usize, zeroed: bool) -> Result<(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>, u64)> {
    alloc(dev, len, zeroed)
}

/// Document ids (b·l) on the device, or None (address 0) for an unsegmented batch.
pub(crate) fn upload_segments(dev: &CudaDevice, seg: &crate::util::Segments) -> Result<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>> {
    use candle_core::cuda_backend::WrapErr;
    match seg.ids() {
        None => Ok(None),
        Some(v) => Ok(Some(dev.cuda_stream().clone_htod(v).w()?)),
    }
}

/// The device address of an optional u32 buffer (0 for none).
pub(crate) fn ptr_u32(v: &Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>, dev: &CudaDevice) -> u64 {
    v.as_ref().map_or(0, |v| v.device_ptr(&dev.cuda_stream()).0)
}

/// The device's copy bandwidth in bytes/s (read + written), measured with a float4 copy kernel over
/// `bytes` (median of `iters` timed copies after a warm-up).
pub fn copy_bandwidth(dev: &candle_core::Device, bytes: usize, iters: usize) -> Result<f64> {
    let candle_core::Device::Cuda(d) = dev else { bail!("copy_bandwidth: not a CUDA device") };
    let m = module(d, "probe", PROBE, &[])?;
    let f = function(&m, "copy_f4", 0)?;
    let stream = d.cuda_stream();
    let n4 = bytes / 16;
    let (_src, ps) = alloc_f32(d, n4 * 4, true)?;
    let (_dst, pd) = alloc_f32(d, n4 * 4, true)?;
    let sms = stream.context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    let mut times = Vec::new();
    for i in 0..=iters.max(1) {
        let t = std::time::Instant::now();
        launch(&stream, &f, (sms as u32 * 8, 1, 1), 256, 0, &[Arg::Ptr(ps), Arg::Ptr(pd), Arg::I64(n4 as i64)])?;
        stream.synchronize().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(2.0 * (n4 * 16) as f64 / times[times.len() / 2])
}

/// Readies a freshly created CUDA device for ouro (a no-op on the CPU); call it before creating tensors.
///
/// - Freed device memory stays in the default pool of `dev`'s device instead of being returned at every
///   synchronisation (the pool's release threshold set to the maximum). candle allocates each tensor with
///   cuMemAllocAsync; with the default threshold of 0, every step would map its memory anew.
/// - cudarc's event tracking is off on the device's context, for the buffers allocated from then on: candle
///   and ouro run every kernel on the device's one stream, where the two events cudarc creates and destroys
///   with each buffer (to order its uses across streams) order nothing; they cost driver calls on every op.
///   So only where nothing else makes streams of its own on this device.
pub fn prepare_device(dev: &candle_core::Device) -> Result<()> {
    let candle_core::Device::Cuda(d) = dev else { return Ok(()) };
    // Safety: every launch of candle and ouro on this device goes to its one stream (above).
    unsafe { d.disable_event_tracking() };
    let ordinal = d.cuda_stream().context().ordinal();
    unsafe {
        let mut cu_dev: sys::CUdevice = 0;
        let r = sys::cuDeviceGet(&mut cu_dev, ordinal as i32);
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuDeviceGet({ordinal}): {r:?}");
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev);
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuDeviceGetDefaultMemPool: {r:?}");
        }
        let mut threshold: u64 = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut std::ffi::c_void);
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuMemPoolSetAttribute: {r:?}");
        }
    }
    Ok(())
}
