//! ouro's own CUDA kernels (feature `cuda`): CUDA C compiled at run time by NVRTC, specialised for the
//! sizes of each call (head_dim, d_state, chunk) and cached per device, launched on candle's stream.
//!
//! - [`ssd`]: the Mamba-2 chunked SSD scan, forward and backward, as a candle custom op.

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

/// A kernel of `m` whose dynamic shared memory may reach `smem` bytes.
pub(crate) fn function(m: &Arc<CudaModule>, name: &str, smem: usize) -> Result<CudaFunction> {
    let f = m.load_function(name).map_err(|e| candle_core::Error::Msg(format!("kernel {name}: {e}")))?;
    if smem > 48 * 1024 {
        f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| candle_core::Error::Msg(format!("kernel {name}: {smem} bytes of shared memory: {e}")))?;
    }
    Ok(f)
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

/// A kernel argument: a device address (0 for none) or a 32-bit integer or float.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    I64(i64),
}

/// Launches `f` on `stream` with `args` in order.
pub(crate) fn launch(stream: &Arc<CudaStream>, f: &CudaFunction, grid: (u32, u32, u32), block: u32, smem: usize, args: &[Arg]) -> Result<()> {
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

/// The device address of a storage's first element under `layout` (which must be contiguous).
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

/// The device address of an f32 buffer.
pub(crate) fn ptr_f32(v: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>, stream: &Arc<CudaStream>) -> u64 {
    v.device_ptr(stream).0
}
