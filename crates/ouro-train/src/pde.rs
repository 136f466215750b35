//! Time-dependent 1-D PDE data (the MemNO benchmark): Kuramoto–Sivashinsky and viscous Burgers on a
//! periodic domain [0, L), solved pseudo-spectrally with ETDRK4 (Kassam & Trefethen 2005, "Fourth-order
//! time-stepping for stiff PDEs"), then resampled to coarse grids.
//!
//! ```text
//! KS:       u_t + u u_x + u_xx + ν u_xxxx = 0     û_t = (k² − ν k⁴) û − (i k / 2) F[u²]
//! Burgers:  u_t + u u_x = ν u_xx                  û_t = (−ν k²) û      − (i k / 2) F[u²]
//! ```
//! The linear part is integrated exactly (exponentials of h·L); the nonlinear part by the 4-stage ETDRK4
//! scheme, its φ-function coefficients computed by contour integrals over 32 points (stable for h·L ≈ 0).
//! The product u² is de-aliased by the 2/3 rule. Initial conditions are random smooth sums of low modes,
//! u₀(x) = Σ_j A_j sin(2π l_j x / L + φ_j).

use candle_core::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use rustfft::num_complex::Complex64 as C64;
use rustfft::{Fft, FftPlanner};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Equation {
    KuramotoSivashinsky,
    Burgers,
}

impl Equation {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ks" => Ok(Equation::KuramotoSivashinsky),
            "burgers" => Ok(Equation::Burgers),
            other => bail!("unknown equation '{other}' (ks, burgers)"),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Equation::KuramotoSivashinsky => "ks",
            Equation::Burgers => "burgers",
        }
    }
}

/// An ETDRK4 integrator on n grid points with step h.
pub struct Solver {
    pub n: usize,
    pub h: f64,
    /// Wavenumbers 2π m / L in FFT order.
    k: Vec<f64>,
    e: Vec<C64>,
    e2: Vec<C64>,
    q: Vec<C64>,
    f1: Vec<C64>,
    f2: Vec<C64>,
    f3: Vec<C64>,
    /// −i k / 2, zero on the de-aliased modes.
    g: Vec<C64>,
    fwd: Arc<dyn Fft<f64>>,
    inv: Arc<dyn Fft<f64>>,
}

impl Solver {
    pub fn new(eq: Equation, nu: f64, length: f64, n: usize, h: f64) -> Result<Self> {
        if n < 8 || n % 2 != 0 {
            bail!("pde: the grid needs an even number of points ≥ 8, got {n}");
        }
        if !(nu > 0.0) || !(length > 0.0) || !(h > 0.0) {
            bail!("pde: viscosity, domain length and time step must be positive (got ν {nu}, L {length}, h {h})");
        }
        let k: Vec<f64> = (0..n).map(|m| {
            let m = if m <= n / 2 { m as f64 } else { m as f64 - n as f64 };
            2.0 * std::f64::consts::PI * m / length
        }).collect();
        let lin: Vec<f64> = k
            .iter()
            .map(|&k| match eq {
                Equation::KuramotoSivashinsky => k * k - nu * k.powi(4),
                Equation::Burgers => -nu * k * k,
            })
            .collect();
        // φ-functions by the mean over M points on a circle around h·L (Kassam & Trefethen, eq. 2.5 and §5).
        const M: usize = 32;
        let roots: Vec<C64> = (1..=M).map(|j| C64::from_polar(1.0, std::f64::consts::PI * (j as f64 - 0.5) / M as f64)).collect();
        let mean = |f: &dyn Fn(C64) -> C64, l: f64| -> C64 {
            let s: C64 = roots.iter().map(|&r| f(C64::new(h * l, 0.0) + r)).sum();
            C64::new(h * (s / M as f64).re, 0.0)
        };
        let q = lin.iter().map(|&l| mean(&|z: C64| ((z / 2.0).exp() - 1.0) / z, l)).collect();
        let f1 = lin.iter().map(|&l| mean(&|z: C64| (-4.0 - z + z.exp() * (4.0 - 3.0 * z + z * z)) / z.powi(3), l)).collect();
        let f2 = lin.iter().map(|&l| mean(&|z: C64| (2.0 + z + z.exp() * (-2.0 + z)) / z.powi(3), l)).collect();
        let f3 = lin.iter().map(|&l| mean(&|z: C64| (-4.0 - 3.0 * z - z * z + z.exp() * (4.0 - z)) / z.powi(3), l)).collect();
        let cutoff = n / 3; // 2/3 rule: keep |m| ≤ n/3
        let g = (0..n)
            .map(|m| {
                let am = if m <= n / 2 { m } else { n - m };
                if am > cutoff || m == n / 2 { C64::new(0.0, 0.0) } else { C64::new(0.0, -0.5 * k[m]) }
            })
            .collect();
        let mut planner = FftPlanner::new();
        Ok(Self {
            n,
            h,
            e: lin.iter().map(|&l| C64::new((h * l).exp(), 0.0)).collect(),
            e2: lin.iter().map(|&l| C64::new((h * l / 2.0).exp(), 0.0)).collect(),
            q,
            f1,
            f2,
            f3,
            g,
            k,
            fwd: planner.plan_fft_forward(n),
            inv: planner.plan_fft_inverse(n),
        })
    }

    pub fn to_spectral(&self, u: &[f64]) -> Vec<C64> {
        let mut v: Vec<C64> = u.iter().map(|&x| C64::new(x, 0.0)).collect();
        self.fwd.process(&mut v);
        v
    }

    pub fn to_physical(&self, v: &[C64]) -> Vec<f64> {
        let mut w = v.to_vec();
        self.inv.process(&mut w);
        w.iter().map(|c| c.re / self.n as f64).collect()
    }

    /// N(v) = −(i k / 2) F[u²], de-aliased.
    fn nonlinear(&self, v: &[C64]) -> Vec<C64> {
        let u = self.to_physical(v);
        let u2: Vec<f64> = u.iter().map(|x| x * x).collect();
        let f = self.to_spectral(&u2);
        f.iter().zip(&self.g).map(|(a, g)| a * g).collect()
    }

    /// One ETDRK4 step of the spectral state.
    pub fn step(&self, v: &mut [C64]) {
        let n = self.n;
        let nv = self.nonlinear(v);
        let a: Vec<C64> = (0..n).map(|i| self.e2[i] * v[i] + self.q[i] * nv[i]).collect();
        let na = self.nonlinear(&a);
        let b: Vec<C64> = (0..n).map(|i| self.e2[i] * v[i] + self.q[i] * na[i]).collect();
        let nb = self.nonlinear(&b);
        let c: Vec<C64> = (0..n).map(|i| self.e2[i] * a[i] + self.q[i] * (2.0 * nb[i] - nv[i])).collect();
        let nc = self.nonlinear(&c);
        for i in 0..n {
            v[i] = self.e[i] * v[i] + nv[i] * self.f1[i] + 2.0 * (na[i] + nb[i]) * self.f2[i] + nc[i] * self.f3[i];
        }
    }

    /// u after `steps` steps from u0.
    pub fn run(&self, u0: &[f64], steps: usize) -> Vec<f64> {
        let mut v = self.to_spectral(u0);
        for _ in 0..steps {
            self.step(&mut v);
        }
        self.to_physical(&v)
    }

    /// ∂ₓ^order of a grid function, spectrally.
    pub fn derivative(&self, u: &[f64], order: u32) -> Vec<f64> {
        let v = self.to_spectral(u);
        let d: Vec<C64> = v.iter().zip(&self.k).enumerate().map(|(m, (c, &k))| if m == self.n / 2 { C64::new(0.0, 0.0) } else { c * C64::new(0.0, k).powu(order) }).collect();
        self.to_physical(&d)
    }
}

/// Fourier resampling of a periodic grid function to `r` points (band-limited interpolation; the modes the
/// coarse grid cannot hold are dropped, its Nyquist mode zeroed).
pub fn resample(u: &[f64], r: usize) -> Vec<f64> {
    let mut planner = FftPlanner::new();
    let mut v: Vec<C64> = u.iter().map(|&x| C64::new(x, 0.0)).collect();
    planner.plan_fft_forward(u.len()).process(&mut v);
    from_spectrum(&v, r, planner.plan_fft_inverse(r).as_ref())
}

/// [`resample`] from the unnormalised spectrum `v` of the n-point function; `inv` is an inverse FFT of length r.
fn from_spectrum(v: &[C64], r: usize, inv: &dyn Fft<f64>) -> Vec<f64> {
    let n = v.len();
    let keep = (r.min(n) - 1) / 2; // |m| ≤ keep
    let mut w = vec![C64::new(0.0, 0.0); r];
    for m in 0..=keep {
        w[m] = v[m];
        if m > 0 {
            w[r - m] = v[n - m];
        }
    }
    inv.process(&mut w);
    w.iter().map(|c| c.re / n as f64).collect()
}

/// Settings of `ouro pde generate`.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub equation: Equation,
    pub viscosity: f64,
    pub samples: usize,
    pub resolutions: Vec<usize>,
    /// Solver grid (512).
    pub grid: usize,
    /// Domain length L (2π).
    pub length: f64,
    /// Saved frames, evenly spaced over [0, t_end] including both ends.
    pub frames: usize,
    pub t_end: f64,
    /// Largest solver step; the step used divides the frame interval.
    pub max_dt: f64,
    /// Observation noise: Gaussian with this standard deviation, relative to the sample's std.
    pub noise: f64,
    pub seed: u64,
}

impl GenerateOptions {
    pub fn new(equation: Equation, viscosity: f64, samples: usize, resolutions: Vec<usize>) -> Self {
        Self { equation, viscosity, samples, resolutions, grid: 512, length: 2.0 * std::f64::consts::PI, frames: 25, t_end: 2.5, max_dt: 1e-3, noise: 0.0, seed: 0 }
    }
}

/// A random smooth initial condition: Σ_{j<5} A_j sin(2π l_j x / L + φ_j), A ~ U(−½, ½), l ∈ {1, 2, 3},
/// φ ~ U(0, 2π).
pub fn initial_condition(rng: &mut StdRng, n: usize, length: f64) -> Vec<f64> {
    let terms: Vec<(f64, f64, f64)> = (0..5).map(|_| (rng.random_range(-0.5..0.5), rng.random_range(1..=3) as f64, rng.random_range(0.0..2.0 * std::f64::consts::PI))).collect();
    (0..n)
        .map(|i| {
            let x = i as f64 * length / n as f64;
            terms.iter().map(|&(a, l, p)| a * (2.0 * std::f64::consts::PI * l * x / length + p).sin()).sum()
        })
        .collect()
}

/// Trajectories per resolution, each (samples, frames, r) row-major, plus the frame times.
pub struct Dataset {
    pub times: Vec<f64>,
    /// The solver's time step (the largest ≤ max_dt that divides the frame interval).
    pub solver_dt: f64,
    pub fields: Vec<(usize, Vec<f32>)>,
    pub clean: Vec<(usize, Vec<f32>)>,
}

pub fn generate(o: &GenerateOptions, progress: &mut dyn FnMut(usize)) -> Result<Dataset> {
    if o.samples == 0 || o.frames < 2 || !(o.t_end > 0.0) {
        bail!("pde generate: need ≥ 1 sample, ≥ 2 frames and a positive end time");
    }
    for &r in &o.resolutions {
        if r < 4 || r > o.grid {
            bail!("pde generate: resolution {r} must be between 4 and the solver grid {}", o.grid);
        }
    }
    if !(o.noise >= 0.0) {
        bail!("pde generate: noise must be ≥ 0");
    }
    let frame_dt = o.t_end / (o.frames - 1) as f64;
    let substeps = (frame_dt / o.max_dt).ceil() as usize;
    let solver = Solver::new(o.equation, o.viscosity, o.length, o.grid, frame_dt / substeps as f64)?;
    let times: Vec<f64> = (0..o.frames).map(|i| i as f64 * frame_dt).collect();
    let mut clean: Vec<(usize, Vec<f32>)> = o.resolutions.iter().map(|&r| (r, Vec::with_capacity(o.samples * o.frames * r))).collect();
    let mut planner = FftPlanner::new();
    let inverse: Vec<Arc<dyn Fft<f64>>> = o.resolutions.iter().map(|&r| planner.plan_fft_inverse(r)).collect();
    let mut rng = StdRng::seed_from_u64(o.seed);
    for s in 0..o.samples {
        let u0 = initial_condition(&mut rng, o.grid, o.length);
        let mut v = solver.to_spectral(&u0);
        for f in 0..o.frames {
            if f > 0 {
                for _ in 0..substeps {
                    solver.step(&mut v);
                }
            }
            if v.iter().any(|c| !c.re.is_finite() || !c.im.is_finite()) {
                bail!("pde generate: sample {s} blew up at t = {:.3} (ν {}, step {:.2e}); lower --max-dt", times[f], o.viscosity, solver.h);
            }
            for ((r, out), inv) in clean.iter_mut().zip(&inverse) {
                out.extend(from_spectrum(&v, *r, inv.as_ref()).into_iter().map(|x| x as f32));
            }
        }
        progress(s + 1);
    }
    let fields = if o.noise > 0.0 {
        let mut nrng = StdRng::seed_from_u64(o.seed ^ 0x0b5e_4a7e);
        clean
            .iter()
            .map(|(r, c)| {
                let per = o.frames * r;
                let noisy = c
                    .chunks(per)
                    .flat_map(|sample| {
                        let m = sample.iter().map(|&x| x as f64).sum::<f64>() / per as f64;
                        let sd = (sample.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / per as f64).sqrt();
                        sample.iter().map(|&x| (x as f64 + o.noise * sd * nrng.sample::<f64, _>(StandardNormal)) as f32).collect::<Vec<_>>()
                    })
                    .collect();
                (*r, noisy)
            })
            .collect()
    } else {
        clean.clone()
    };
    Ok(Dataset { times, solver_dt: solver.h, fields, clean: if o.noise > 0.0 { clean } else { vec![] } })
}

/// Writes the dataset as safetensors (atomically): `u_R` (samples, frames, R) f32 per resolution (with noise:
/// `u_R` noisy and `u_clean_R`), `t` (frames), `x_R` (R); metadata: equation, viscosity, domain, grid, dt, seed.
pub fn save(path: &std::path::Path, o: &GenerateOptions, d: &Dataset) -> Result<()> {
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = vec![("t".into(), vec![d.times.len()], bytes(&d.times.iter().map(|&t| t as f32).collect::<Vec<_>>()))];
    for (prefix, set) in [("u", &d.fields), ("u_clean", &d.clean)] {
        for (r, v) in set.iter() {
            data.push((format!("{prefix}_{r}"), vec![o.samples, o.frames, *r], bytes(v)));
        }
    }
    for &r in &o.resolutions {
        let x: Vec<f32> = (0..r).map(|i| (i as f64 * o.length / r as f64) as f32).collect();
        data.push((format!("x_{r}"), vec![r], bytes(&x)));
    }
    let meta: std::collections::HashMap<String, String> = [
        ("equation", o.equation.name().to_string()),
        ("viscosity", o.viscosity.to_string()),
        ("length", o.length.to_string()),
        ("grid", o.grid.to_string()),
        ("solver_dt", d.solver_dt.to_string()),
        ("t_end", o.t_end.to_string()),
        ("frames", o.frames.to_string()),
        ("samples", o.samples.to_string()),
        ("resolutions", o.resolutions.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")),
        ("noise", o.noise.to_string()),
        ("seed", o.seed.to_string()),
        ("solver", "ETDRK4 pseudo-spectral, 2/3 de-aliasing".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors_bytes(&data, meta).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    crate::write_file(path, bytes)
}

/// f32 tensors (name, shape, little-endian bytes) and string metadata as a safetensors file image.
pub fn safetensors_bytes(data: &[(String, Vec<usize>, Vec<u8>)], meta: std::collections::HashMap<String, String>) -> std::result::Result<Vec<u8>, safetensors::SafeTensorError> {
    use safetensors::tensor::{Dtype, TensorView};
    let views = data.iter().map(|(k, shape, b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (k.as_str(), v))).collect::<std::result::Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn grid(n: usize, l: f64) -> Vec<f64> {
        (0..n).map(|i| i as f64 * l / n as f64).collect()
    }

    /// Cole–Hopf: φ = 2 + e^{−νt} cos x solves φ_t = ν φ_xx, so u = −2ν φ_x / φ solves Burgers.
    fn burgers_exact(x: f64, t: f64, nu: f64) -> f64 {
        let e = (-nu * t).exp();
        2.0 * nu * e * x.sin() / (2.0 + e * x.cos())
    }

    #[test]
    fn burgers_matches_the_cole_hopf_solution() {
        for nu in [0.05, 0.1, 0.5] {
            let n = 128;
            let s = Solver::new(Equation::Burgers, nu, 2.0 * PI, n, 1e-3).unwrap();
            let x = grid(n, 2.0 * PI);
            let u0: Vec<f64> = x.iter().map(|&x| burgers_exact(x, 0.0, nu)).collect();
            let u = s.run(&u0, 1000);
            let err = x.iter().zip(&u).map(|(&x, &u)| (u - burgers_exact(x, 1.0, nu)).abs()).fold(0f64, f64::max);
            assert!(err < 1e-10, "ν {nu}: max error {err:.2e} at t = 1");
        }
    }

    #[test]
    fn ks_conserves_the_mean_and_follows_its_energy_budget() {
        // d/dt ½∫u² = ∫u_x² − ν∫u_xx² (the advection term moves no energy).
        let (n, l, nu, h) = (256, 2.0 * PI, 0.1, 1e-4);
        let s = Solver::new(Equation::KuramotoSivashinsky, nu, l, n, h).unwrap();
        let u0 = initial_condition(&mut StdRng::seed_from_u64(3), n, l);
        let dx = l / n as f64;
        let energy = |u: &[f64]| 0.5 * u.iter().map(|x| x * x).sum::<f64>() * dx;
        let mean = |u: &[f64]| u.iter().sum::<f64>() / n as f64;
        let mut v = s.to_spectral(&u0);
        for _ in 0..5000 {
            s.step(&mut v); // to t = 0.5, past the transient
        }
        let before = s.to_physical(&v);
        s.step(&mut v);
        let mid = s.to_physical(&v);
        s.step(&mut v);
        let after = s.to_physical(&v);
        let de = (energy(&after) - energy(&before)) / (2.0 * h);
        let (ux, uxx) = (s.derivative(&mid, 1), s.derivative(&mid, 2));
        let budget = (ux.iter().map(|x| x * x).sum::<f64>() - nu * uxx.iter().map(|x| x * x).sum::<f64>()) * dx;
        assert!((de - budget).abs() < 1e-5 * budget.abs().max(1.0), "dE/dt {de} vs budget {budget}");
        assert!((mean(&after) - mean(&u0)).abs() < 1e-12, "mean {} → {}", mean(&u0), mean(&after));
    }

    #[test]
    fn etdrk4_converges_under_step_refinement() {
        // KS at ν = 0.1 is stiff (ν k⁴ up to 2·10⁶ on 128 points); Cox–Matthews ETDRK4 then converges at an
        // observed order ≈ 3 over these steps (stiff order reduction, Hochbruck & Ostermann 2005), 4 as h → 0.
        let (n, l, nu) = (128, 2.0 * PI, 0.1);
        let u0 = initial_condition(&mut StdRng::seed_from_u64(5), n, l);
        let solve = |h: f64| Solver::new(Equation::KuramotoSivashinsky, nu, l, n, h).unwrap().run(&u0, (1.0 / h).round() as usize);
        let reference = solve(1.0 / 6400.0);
        let err = |h: f64| solve(h).iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        let e: Vec<f64> = [50.0, 100.0, 200.0, 400.0].iter().map(|s| err(1.0 / s)).collect();
        let orders: Vec<f64> = e.windows(2).map(|w| (w[0] / w[1]).log2()).collect();
        assert!(orders.iter().all(|&p| p > 2.7), "errors {e:?}: observed orders {orders:.2?}");
        assert!(e[3] < 1e-7, "errors {e:?}");
    }

    #[test]
    fn resampling_is_exact_for_band_limited_functions() {
        let f = |x: f64| 0.3 + (x).sin() - 0.5 * (3.0 * x + 1.0).cos() + 0.1 * (7.0 * x).sin();
        let fine: Vec<f64> = grid(512, 2.0 * PI).into_iter().map(f).collect();
        for r in [32, 48, 64, 96, 128] {
            let coarse = resample(&fine, r);
            let err = grid(r, 2.0 * PI).into_iter().zip(&coarse).map(|(x, c)| (f(x) - c).abs()).fold(0f64, f64::max);
            assert!(err < 1e-12, "resolution {r}: {err:.2e}");
        }
    }

    #[test]
    fn generate_shapes_noise_and_errors() {
        let mut o = GenerateOptions::new(Equation::KuramotoSivashinsky, 0.1, 2, vec![32, 48]);
        o.grid = 64;
        o.frames = 5;
        o.t_end = 0.4;
        let d = generate(&o, &mut |_| {}).unwrap();
        assert_eq!(d.times.len(), 5);
        assert!((d.times[4] - 0.4).abs() < 1e-12);
        assert_eq!(d.fields[0].1.len(), 2 * 5 * 32);
        assert_eq!(d.fields[1].1.len(), 2 * 5 * 48);
        assert!(d.clean.is_empty());
        // The same seed gives the same data; noise keeps the clean copy.
        assert_eq!(generate(&o, &mut |_| {}).unwrap().fields[0].1, d.fields[0].1);
        o.noise = 0.1;
        let dn = generate(&o, &mut |_| {}).unwrap();
        assert_eq!(dn.clean[0].1, d.fields[0].1);
        assert_ne!(dn.fields[0].1, d.fields[0].1);
        o.resolutions = vec![128];
        assert!(generate(&o, &mut |_| {}).err().unwrap().to_string().contains("resolution 128"));
        assert!(Solver::new(Equation::Burgers, 0.0, 1.0, 64, 1e-3).is_err());
        assert!(Equation::parse("heat").is_err());
    }
}
