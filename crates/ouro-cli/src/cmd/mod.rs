pub mod bench;
pub mod doctor;
pub mod lm;
pub mod train;
