//! Training for ouro: corpora and packed batches, AdamW with decay groups, warmup + cosine schedule,
//! the training loop (checkpoints, bit-for-bit resume, metrics, plots), and the Mamba paper's synthetic tasks.

pub mod arith;
pub mod config;
pub mod data;
pub mod distill;
pub mod fetch;
pub mod model;
pub mod operator;
pub mod optim;
pub mod pde;
pub mod plot;
pub mod seqfit;
pub mod tasks;
pub mod train;
