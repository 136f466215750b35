//! `ouro pde generate`: Kuramoto–Sivashinsky and Burgers trajectories for the neural-operator experiments.

use anyhow::Result;
use ouro_train::pde::{generate, save, Equation, GenerateOptions};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Pde {
    /// Solves a 1-D periodic PDE from random smooth initial conditions (ETDRK4 pseudo-spectral on --grid points)
    /// and saves the trajectories resampled to each --resolution as safetensors (`u_R`: samples × frames × R).
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// ks (u_t + u u_x + u_xx + ν u_xxxx = 0) or burgers (u_t + u u_x = ν u_xx).
    #[arg(long)]
    equation: String,
    /// ν.
    #[arg(long)]
    viscosity: f64,
    #[arg(long)]
    samples: usize,
    /// Saved grid sizes, comma-separated (e.g. 32,48,64,96,128).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    resolution: Vec<usize>,
    /// Solver grid points.
    #[arg(long, default_value_t = 512)]
    grid: usize,
    /// Domain length (periodic).
    #[arg(long, default_value_t = 2.0 * std::f64::consts::PI)]
    length: f64,
    /// Saved frames, evenly spaced over [0, t_end] (both ends included).
    #[arg(long, default_value_t = 25)]
    frames: usize,
    #[arg(long, default_value_t = 2.5)]
    t_end: f64,
    /// Largest solver time step.
    #[arg(long, default_value_t = 1e-3)]
    max_dt: f64,
    /// Gaussian observation noise, as a fraction of each sample's standard deviation (the clean fields are
    /// saved too, as `u_clean_R`).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(p: Pde) -> Result<()> {
    match p {
        Pde::Generate(a) => {
            let mut o = GenerateOptions::new(Equation::parse(&a.equation)?, a.viscosity, a.samples, a.resolution.clone());
            o.grid = a.grid;
            o.length = a.length;
            o.frames = a.frames;
            o.t_end = a.t_end;
            o.max_dt = a.max_dt;
            o.noise = a.noise;
            o.seed = a.seed;
            let t0 = std::time::Instant::now();
            let bar = indicatif::ProgressBar::new(a.samples as u64);
            bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} trajectories [{elapsed_precise}<{eta_precise}]").unwrap());
            let d = generate(&o, &mut |i| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            save(&a.out, &o, &d)?;
            eprintln!(
                "{} {} trajectories (ν {}, {} frames to t = {}, grid {}, step {:.2e}) at resolutions {:?} in {:.1} s: {}",
                a.samples,
                a.equation,
                a.viscosity,
                a.frames,
                a.t_end,
                a.grid,
                d.solver_dt,
                a.resolution,
                t0.elapsed().as_secs_f64(),
                a.out.display()
            );
            Ok(())
        }
    }
}
