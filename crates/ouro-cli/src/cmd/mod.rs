pub mod bench;
pub mod bench_gpu;
pub mod engine;
pub mod doctor;
pub mod fit;
pub mod lm;
pub mod train;
pub mod pde;
