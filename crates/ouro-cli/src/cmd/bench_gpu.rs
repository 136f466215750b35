//! `ouro bench ssd-gpu`: the Mamba-2 SSD layer on a CUDA device, forward and forward+backward, timed
//! against the device's measured copy bandwidth and bf16 matmul rate, beside `mamba_ssm`'s Triton
//! `mamba_chunk_scan_combined` (scripts/bench/ssd_triton.py) run by the same command; then the fused
//! single-token decode step at several batch sizes, beside `mamba_ssm`'s Triton `selective_state_update`.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(clap::Args)]
pub struct SsdGpuArgs {
    /// Shapes as batch x len x heads x head_dim x d_state, comma-separated (one group).
    #[arg(long, value_delimiter = ',', default_value = "8x2048x32x64x128,4x8192x32x64x128,2x32768x32x64x64")]
    shapes: Vec<String>,
    /// Storage type of x, B, C (and y): bf16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Timed repetitions (median reported), after two warm-ups.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Compare each shape's forward output with the CPU implementation first.
    #[arg(long)]
    check: bool,
    /// Run the peer: a Python with torch and triton, and a folder holding the `mamba_ssm` source (its
    /// Triton ops are imported from there), e.g. `--peer python3 --peer-src peers/mamba`.
    #[arg(long)]
    peer: Option<String>,
    #[arg(long)]
    peer_src: Option<std::path::PathBuf>,
    /// Batch sizes of the decode-step benchmark (at the first shape's heads, head_dim, d_state; conv
    /// width 4), comma-separated; empty to skip it.
    #[arg(long, default_value = "1,64,512", value_parser = batch_list)]
    decode_batches: BatchList,
    /// One JSON object per shape instead of a table.
    #[arg(long)]
    json: bool,
}

/// `--decode-batches`: comma-separated batch sizes; an empty value is the empty list (skip the decode step).
#[derive(Clone, Debug)]
pub struct BatchList(pub Vec<usize>);

fn batch_list(s: &str) -> std::result::Result<BatchList, String> {
    s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| t.parse::<usize>().ok().filter(|&v| v > 0).ok_or_else(|| format!("'{t}' is not a positive batch size"))).collect::<std::result::Result<_, _>>().map(BatchList)
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Shape {
    pub b: usize,
    pub l: usize,
    pub h: usize,
    pub p: usize,
    pub n: usize,
}

fn parse_shape(s: &str) -> Result<Shape> {
    let v: Vec<usize> = s.split('x').map(|t| t.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().with_context(|| format!("--shapes: '{s}' is not BxLxHxPxN"))?;
    match v[..] {
        [b, l, h, p, n] if v.iter().all(|&x| x > 0) => Ok(Shape { b, l, h, p, n }),
        _ => bail!("--shapes: '{s}' is not BxLxHxPxN (five positive integers)"),
    }
}

impl Shape {
    /// The fewest bytes each pass must move: every input read once, every output written once.
    /// Forward: xBC and dt in, y out. Backward: xBC, dt and dy in, dxBC and ddt out.
    fn bytes(&self, elem: usize) -> (f64, f64) {
        let (b, l, h, p, n) = (self.b as f64, self.l as f64, self.h as f64, self.p as f64, self.n as f64);
        let e = elem as f64;
        let xbc = b * l * (h * p + 2.0 * n) * e;
        let dt = b * l * h * 4.0;
        let y = b * l * h * p * e;
        (xbc + dt + y, 2.0 * (xbc + dt) + y)
    }

    /// FLOPs of the chunked algorithm at chunk q (matrix products only; one group): forward per chunk
    /// C·Bᵀ (2q²n), the masked product (2q²p), C·S_inᵀ and the chunk state (2·2qpn); the backward
    /// recomputes the states and does about twice the forward's products.
    fn flops(&self, q: usize) -> (f64, f64) {
        let (b, l, h, p, n) = (self.b as f64, self.l as f64, self.h as f64, self.p as f64, self.n as f64);
        let q = q.min(self.l) as f64;
        let chunks = b * (l / q).ceil();
        let fwd = chunks * (2.0 * q * q * n + h * (2.0 * q * q * p + 4.0 * q * p * n));
        let bwd = chunks * h * (2.0 * q * p * n * 5.0 + 2.0 * q * q * n * 3.0 + 2.0 * q * q * p * 2.0);
        (fwd, fwd + bwd)
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct PeerRow {
    shape: String,
    fwd_ms: f64,
    fwd_bwd_ms: f64,
}

#[derive(Serialize, Deserialize, Debug)]
struct PeerDecodeRow {
    decode_batch: usize,
    decode_ms: f64,
}

#[derive(Serialize)]
struct DecodeRow {
    batch: usize,
    /// the fused kernel (conv update, SiLU, dt, state update, y)
    fused_ms: f64,
    /// the same step in candle ops
    candle_ms: f64,
    tb_s: f64,
    floor_ms: f64,
    /// Triton selective_state_update (the SSM update only: no conv)
    peer_ms: Option<f64>,
    check_rel_err: Option<f32>,
}

#[derive(Serialize)]
struct Row {
    shape: String,
    dtype: String,
    chunk: usize,
    fwd_ms: f64,
    /// the general op (`scan_xbc`: f32 y and the final state, dt and the decay prepared outside the timing),
    /// which prefill with a state uses
    fwd_kernels_ms: f64,
    fwd_bwd_ms: f64,
    /// of fwd_bwd_ms, candle's accumulation of the two large gradients (y's and xBC's), timed alone: for each
    /// a zeros tensor and an add, as candle's backprop does for the first gradient that reaches a node
    fwd_bwd_accum_ms: f64,
    /// forward and forward+backward by the host's clock around the call and a synchronize (the measure
    /// before the do_bench-like one)
    fwd_wall_ms: f64,
    fwd_bwd_wall_ms: f64,
    fwd_tb_s: f64,
    fwd_tflop_s: f64,
    fwd_floor_ms: f64,
    fwd_bwd_floor_ms: f64,
    peer_fwd_ms: Option<f64>,
    peer_fwd_bwd_ms: Option<f64>,
    check_rel_err: Option<f32>,
    bandwidth_tb_s: f64,
    matmul_tflop_s: f64,
}

fn run_peer(python: &str, src: &std::path::Path, shapes: &[String], dtype: &str, iters: usize, decode: &[usize]) -> Result<(Vec<PeerRow>, Vec<PeerDecodeRow>)> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench/ssd_triton.py");
    let script = if script.exists() { script } else { std::path::PathBuf::from("scripts/bench/ssd_triton.py") };
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg("--src")
        .arg(src)
        .args(["--shapes", &shapes.join(","), "--dtype", dtype, "--iters", &iters.to_string()])
        .args(["--decode-batches", &decode.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")])
        .output()
        .with_context(|| format!("running the peer {python} {}", script.display()))?;
    if !out.status.success() {
        bail!("peer benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let (mut scans, mut steps) = (Vec::new(), Vec::new());
    for l in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with('{')) {
        if l.contains("decode_batch") {
            steps.push(serde_json::from_str(l).context("peer output")?);
        } else {
            scans.push(serde_json::from_str(l).context("peer output")?);
        }
    }
    Ok((scans, steps))
}

#[cfg(not(feature = "cuda"))]
pub fn ssd_gpu(_: SsdGpuArgs) -> Result<()> {
    bail!("`ouro bench ssd-gpu` needs a CUDA build of ouro (scripts/build-cuda.sh)")
}

#[cfg(feature = "cuda")]
pub fn ssd_gpu(a: SsdGpuArgs) -> Result<()> {
    use candle_core::{DType, Device, Tensor, Var};
    use ouro_kernels::ssd::{ssd_xbc, ssd_xbc_y, Algo, XbcShape};
    let dev = crate::device::parse(&a.device)?;
    if !dev.is_cuda() {
        bail!("--device: `ouro bench ssd-gpu` runs on a CUDA device");
    }
    let dtype = match a.dtype.as_str() {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        d => bail!("--dtype '{d}': expected bf16 or f32"),
    };
    let shapes: Vec<Shape> = a.shapes.iter().map(|s| parse_shape(s)).collect::<Result<_>>()?;
    let sync = || dev.synchronize();
    // Every call is timed as the peer's triton.testing.do_bench times its calls: the L2 cache flushed first
    // (a 256 MB buffer zeroed), then CUDA events recorded on the stream before and after the call, the median
    // of their elapsed times: the stream's time from the call's first kernel on, host gaps inside included,
    // the wake-up from a synchronize not. `wall` is the earlier measure, kept beside it: the host's clock
    // around the call and a synchronize.
    let Device::Cuda(cuda) = &dev else { bail!("--device: `ouro bench ssd-gpu` runs on a CUDA device") };
    let stream = cuda.cuda_stream();
    let l2 = Tensor::zeros(64 << 20, DType::F32, &dev)?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        for _ in 0..2 {
            f()?;
        }
        sync()?;
        let mut events = Vec::new();
        for _ in 0..a.iters.max(1) {
            l2.zero_set()?;
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            f()?;
            events.push((start, stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?));
        }
        sync()?;
        let mut v = events.iter().map(|(s, e)| Ok(s.elapsed_ms(e)? as f64 / 1e3)).collect::<Result<Vec<f64>>>()?;
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        Ok(v[v.len() / 2])
    };
    let wall = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        for _ in 0..2 {
            f()?;
        }
        sync()?;
        let mut v = Vec::new();
        for _ in 0..a.iters.max(1) {
            let t = std::time::Instant::now();
            f()?;
            sync()?;
            v.push(t.elapsed().as_secs_f64());
        }
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        Ok(v[v.len() / 2])
    };
    // The two ceilings, measured here: a device-to-device copy (bytes read + written) and a bf16 matmul.
    let bandwidth = ouro_kernels::cuda::copy_bandwidth(&dev, 2 << 30, 20)?;
    let m = Tensor::randn(0f32, 1.0, (8192, 8192), &dev)?.to_dtype(DType::BF16)?;
    let mut out = m.matmul(&m)?;
    let mm_s = time(&mut || {
        out = m.matmul(&m)?;
        Ok(())
    })?;
    let peak = 2.0 * 8192f64.powi(3) / mm_s;
    drop((m, out));
    eprintln!("device: copy {:.2} TB/s, bf16 matmul {:.0} TFLOP/s", bandwidth / 1e12, peak / 1e12);
    let (peer, peer_decode) = match (&a.peer, &a.peer_src) {
        (Some(py), Some(src)) => run_peer(py, src, &a.shapes, &a.dtype, a.iters, &a.decode_batches.0)?,
        (Some(_), None) => bail!("--peer needs --peer-src (the mamba_ssm source folder)"),
        _ => (Vec::new(), Vec::new()),
    };
    let elem = if dtype == DType::BF16 { 2 } else { 4 };
    let mut rows = Vec::new();
    for (s, name) in shapes.iter().zip(&a.shapes) {
        let Shape { b, l, h, p, n } = *s;
        let shape = XbcShape { heads: h, head_dim: p, groups: 1, d_state: n };
        let row = h * p + 2 * n;
        let xbc = Tensor::randn(0f32, 1.0, (b, l, row), &dev)?.to_dtype(dtype)?;
        let dt = (Tensor::randn(0f32, 1.0, (b, l, h), &dev)? * 0.5)?;
        let a_ = (Tensor::rand(1f32, 16.0, h, &dev)?.neg())?;
        let dt_bias = Tensor::rand(-4f32, -2.0, h, &dev)?;
        let d = Tensor::ones(h, DType::F32, &dev)?;
        let algo = Algo::Chunked(256);
        // The training path: y alone (no state in or out), in the storage dtype.
        let fwd = |xbc: &Tensor, dt: &Tensor, a_: &Tensor, dt_bias: &Tensor, d: &Tensor| -> Result<Tensor> {
            let y = ssd_xbc_y(xbc, dt, shape, a_, Some(dt_bias), Some(d), true, (0.0, f64::INFINITY), None, algo)?;
            Ok(y.to_dtype(dtype)?)
        };
        let check = if a.check {
            let y = fwd(&xbc, &dt, &a_, &dt_bias, &d)?;
            let c = |t: &Tensor| t.to_device(&Device::Cpu);
            let want = {
                let (y, _) = ssd_xbc(&c(&xbc)?, &c(&dt)?, shape, &c(&a_)?, Some(&c(&dt_bias)?), Some(&c(&d)?), true, (0.0, f64::INFINITY), None, None, algo)?;
                y
            };
            Some(ouro_kernels::testing::rel_err(&y.to_device(&Device::Cpu)?, &want))
        } else {
            None
        };
        let fwd_s = time(&mut || {
            fwd(&xbc, &dt, &a_, &dt_bias, &d)?;
            Ok(())
        })?;
        let fwd_wall_s = wall(&mut || {
            fwd(&xbc, &dt, &a_, &dt_bias, &d)?;
            Ok(())
        })?;
        // The general op (dt and the decay prepared outside the timing; y and the final state in f32).
        let dtp = ouro_kernels::act::softplus(&dt.broadcast_add(&dt_bias)?)?;
        let la = dtp.broadcast_mul(&a_.reshape((1, 1, h))?)?;
        let lay = ouro_kernels::cuda::ssd::XbcLayout::mamba2(h, p, 1, n);
        let kernel_s = time(&mut || {
            ouro_kernels::cuda::ssd::scan_xbc(&xbc, &dtp, &la, Some(&d), None, lay)?;
            Ok(())
        })?;
        let dy = Tensor::randn(0f32, 1.0, (b, l, h, p), &dev)?.to_dtype(dtype)?;
        let vars = [Var::from_tensor(&xbc)?, Var::from_tensor(&dt)?, Var::from_tensor(&a_)?, Var::from_tensor(&dt_bias)?, Var::from_tensor(&d)?];
        let mut fb = || {
            let y = fwd(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), vars[3].as_tensor(), vars[4].as_tensor())?;
            // y's gradient is dy, as the peer's y.backward(dy).
            let g = ouro_kernels::util::grad_seed(&y, &dy)?.backward()?;
            if g.get(vars[0].as_tensor()).is_none() {
                bail!("no gradient for xBC");
            }
            Ok(())
        };
        let fb_s = time(&mut fb)?;
        let fb_wall_s = wall(&mut fb)?;
        // What candle's backprop adds around the op's kernels for the two large gradients: `GradStore::or_insert`
        // makes a zeros tensor for a node's gradient and the backward adds the op's gradient to it.
        let accum_s = time(&mut || {
            dy.zeros_like()?.add(&dy)?;
            xbc.zeros_like()?.add(&xbc)?;
            Ok(())
        })?;
        if std::env::var_os("OURO_CUDA_PROFILE").is_some() {
            ouro_kernels::cuda::profile(true);
            let y = fwd(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), vars[3].as_tensor(), vars[4].as_tensor())?;
            ouro_kernels::util::grad_seed(&y, &dy)?.backward()?;
            sync()?;
            for (k, secs, calls) in ouro_kernels::cuda::profile(false) {
                eprintln!("  {name} {k}: {:.3} ms ({calls} launches)", secs * 1e3);
            }
        }
        let (q, _) = ouro_kernels::cuda::ssd::plan(&dev, dtype, p, n).context("the CUDA SSD kernels do not fit these sizes")?;
        let (bf, bfb) = s.bytes(elem);
        let (ff, ffb) = s.flops(q);
        let floor = |bytes: f64, flops: f64| (bytes / bandwidth).max(flops / peak);
        let pr = peer.iter().find(|r| &r.shape == name);
        rows.push(Row {
            shape: name.clone(),
            dtype: a.dtype.clone(),
            chunk: q,
            fwd_ms: fwd_s * 1e3,
            fwd_kernels_ms: kernel_s * 1e3,
            fwd_bwd_ms: fb_s * 1e3,
            fwd_bwd_accum_ms: accum_s * 1e3,
            fwd_wall_ms: fwd_wall_s * 1e3,
            fwd_bwd_wall_ms: fb_wall_s * 1e3,
            fwd_tb_s: bf / fwd_s / 1e12,
            fwd_tflop_s: ff / fwd_s / 1e12,
            fwd_floor_ms: floor(bf, ff) * 1e3,
            fwd_bwd_floor_ms: floor(bf + bfb, ffb) * 1e3,
            peer_fwd_ms: pr.map(|r| r.fwd_ms),
            peer_fwd_bwd_ms: pr.map(|r| r.fwd_bwd_ms),
            check_rel_err: check,
            bandwidth_tb_s: bandwidth / 1e12,
            matmul_tflop_s: peak / 1e12,
        });
    }
    let decode = decode_rows(&dev, shapes[0], &a.decode_batches.0, &peer_decode, a.check, bandwidth, &time)?;
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        for r in &decode {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!("| shape b×l×h×p×n | chunk | fwd ms (general op) | fwd TB/s | fwd TFLOP/s | fwd ÷ floor | fwd+bwd ms (candle's gradient accumulation) | fwd+bwd ÷ floor | wall-clock fwd / fwd+bwd ms | Triton fwd ms | Triton fwd+bwd ms | ouro speed-up fwd / fwd+bwd | check |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let peer = match (r.peer_fwd_ms, r.peer_fwd_bwd_ms) {
            (Some(f), Some(fb)) => (format!("{f:.3}"), format!("{fb:.3}"), format!("{:.2}× / {:.2}×", f / r.fwd_ms, fb / r.fwd_bwd_ms)),
            _ => ("—".into(), "—".into(), "—".into()),
        };
        println!(
            "| {} | {} | {:.3} ({:.3}) | {:.2} | {:.1} | {:.1}× | {:.3} ({:.3}) | {:.1}× | {:.3} / {:.3} | {} | {} | {} | {} |",
            r.shape,
            r.chunk,
            r.fwd_ms,
            r.fwd_kernels_ms,
            r.fwd_tb_s,
            r.fwd_tflop_s,
            r.fwd_ms / r.fwd_floor_ms,
            r.fwd_bwd_ms,
            r.fwd_bwd_accum_ms,
            r.fwd_bwd_ms / r.fwd_bwd_floor_ms,
            r.fwd_wall_ms,
            r.fwd_bwd_wall_ms,
            peer.0,
            peer.1,
            peer.2,
            r.check_rel_err.map_or("—".into(), |e| format!("{e:.1e}"))
        );
    }
    if !decode.is_empty() {
        let Shape { h, p, n, .. } = shapes[0];
        println!();
        println!("decode step, {h} heads × head_dim {p} × d_state {n}, 1 group, conv width 4, f32 state:");
        println!("| batch | fused ms | candle ops ms | fused TB/s | fused ÷ floor | Triton selective_state_update ms (no conv) | ouro speed-up | check |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in &decode {
            let (pm, ratio) = r.peer_ms.map_or(("—".into(), "—".into()), |m| (format!("{m:.4}"), format!("{:.2}×", m / r.fused_ms)));
            println!(
                "| {} | {:.4} | {:.4} | {:.2} | {:.1}× | {pm} | {ratio} | {} |",
                r.batch,
                r.fused_ms,
                r.candle_ms,
                r.tb_s,
                r.fused_ms / r.floor_ms,
                r.check_rel_err.map_or("—".into(), |e| format!("{e:.1e}"))
            );
        }
    }
    Ok(())
}

/// The fused decode step (and the same step in candle ops) at each batch size.
#[cfg(feature = "cuda")]
fn decode_rows(
    dev: &candle_core::Device,
    s: Shape,
    batches: &[usize],
    peer: &[PeerDecodeRow],
    check: bool,
    bandwidth: f64,
    time: &dyn Fn(&mut dyn FnMut() -> Result<()>) -> Result<f64>,
) -> Result<Vec<DecodeRow>> {
    use candle_core::{DType, Device, Tensor};
    use ouro_kernels::decode::{composed, mamba2_step, StepInput};
    use ouro_kernels::ssd::XbcShape;
    let Shape { h, p, n, .. } = s;
    let (g, k) = (1, 4);
    let cd = h * p + 2 * g * n;
    let shape = XbcShape { heads: h, head_dim: p, groups: g, d_state: n };
    let w = (Tensor::randn(0f32, 1.0, (cd, 1, k), dev)? * 0.3)?;
    let cb = Tensor::randn(0f32, 0.1, cd, dev)?;
    let a_ = Tensor::rand(1f32, 16.0, h, dev)?.neg()?;
    let dt_bias = Tensor::rand(-4f32, -2.0, h, dev)?;
    let d = Tensor::ones(h, DType::F32, dev)?;
    let mut rows = Vec::new();
    for &b in batches {
        let conv = Tensor::randn(0f32, 1.0, (b, k - 1, cd), dev)?;
        let ssm = Tensor::randn(0f32, 1.0, (b, h, p, n), dev)?;
        let xbc = Tensor::randn(0f32, 1.0, (b, cd), dev)?;
        let dt = Tensor::randn(0f32, 0.5, (b, h), dev)?;
        let inp = StepInput { conv_state: &conv, xbc: &xbc, conv_weight: &w, conv_bias: Some(&cb), ssm: &ssm, dt: &dt, a: &a_, dt_bias: &dt_bias, d: &d, dt_limit: (0.0, f64::INFINITY), shape };
        let fused_s = time(&mut || {
            mamba2_step(&inp)?;
            Ok(())
        })?;
        let candle_s = time(&mut || {
            composed(&inp)?;
            Ok(())
        })?;
        let check_err = if check {
            let (y, _, s2) = mamba2_step(&inp)?;
            let c = |t: &Tensor| t.to_device(&Device::Cpu);
            let (cw, ccb, ca, cdb, cdd) = (c(&w)?, c(&cb)?, c(&a_)?, c(&dt_bias)?, c(&d)?);
            let (cconv, cssm, cx, cdt) = (c(&conv)?, c(&ssm)?, c(&xbc)?, c(&dt)?);
            let ci = StepInput { conv_state: &cconv, xbc: &cx, conv_weight: &cw, conv_bias: Some(&ccb), ssm: &cssm, dt: &cdt, a: &ca, dt_bias: &cdb, d: &cdd, dt_limit: (0.0, f64::INFINITY), shape };
            let (wy, _, ws) = composed(&ci)?;
            let e = ouro_kernels::testing::rel_err(&y.to_device(&Device::Cpu)?, &wy).max(ouro_kernels::testing::rel_err(&s2.to_device(&Device::Cpu)?, &ws));
            Some(e)
        } else {
            None
        };
        let bytes = 4.0 * (2.0 * (b * h * p * n) as f64 + 2.0 * (b * (k - 1) * cd) as f64 + (b * (cd + h + h * p)) as f64 + (cd * (k + 1)) as f64);
        rows.push(DecodeRow {
            batch: b,
            fused_ms: fused_s * 1e3,
            candle_ms: candle_s * 1e3,
            tb_s: bytes / fused_s / 1e12,
            floor_ms: bytes / bandwidth * 1e3,
            peer_ms: peer.iter().find(|r| r.decode_batch == b).map(|r| r.decode_ms),
            check_rel_err: check_err,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_batches_parse_and_empty_skips() {
        assert_eq!(batch_list("1,64,512").unwrap().0, vec![1, 64, 512]);
        assert_eq!(batch_list(" 8 ").unwrap().0, vec![8]);
        assert!(batch_list("").unwrap().0.is_empty());
        assert!(batch_list("1,x").unwrap_err().contains("'x'"));
        assert!(batch_list("0").is_err());
    }
}
