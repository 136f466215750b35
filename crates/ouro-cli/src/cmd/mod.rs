pub mod bench;
pub mod doctor;
