//! ouro's layers and models, built on candle and the kernels of `ouro-kernels`.
//!
//! Every sequence mixer offers a parallel `forward` (training and prefill), a recurrent `step` with an
//! explicit state struct, and — where it is defined — its L×L mixing matrix. Models implement
//! [`lm::LanguageModel`] and load from the checkpoints users have ([`checkpoint::Checkpoint`]).

pub mod caduceus;
pub mod checkpoint;
pub mod discrete_mamba2;
pub mod encoder;
pub mod engine;
pub mod fno;
pub mod generate;
pub mod griffin;
pub mod hydra;
pub mod layers;
pub mod llama;
pub mod llamba;
pub mod lm;
pub mod lyra;
pub mod mamba;
pub mod mamba2;
pub mod mamba_lm;
pub mod matrix_mixer;
pub mod rglru;
pub mod s4d;
pub mod sample;
pub mod tokenizer;

pub use mamba::{Mamba, MambaConfig, MambaState};
pub use mamba2::{Mamba2, Mamba2Config, Mamba2State};
