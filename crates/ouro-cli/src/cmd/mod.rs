pub mod bench;
pub mod doctor;
pub mod fit;
pub mod lm;
pub mod train;
pub mod pde;
