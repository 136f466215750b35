//! ouro's layers and models, built on candle and the kernels of `ouro-kernels`.
//!
//! Every sequence mixer offers a parallel `forward` (training and prefill), a recurrent `step` with an
//! explicit state struct, and — where it is defined — its L×L mixing matrix.

pub mod mamba;
pub mod mamba2;

pub use mamba::{Mamba, MambaConfig, MambaState};
pub use mamba2::{Mamba2, Mamba2Config, Mamba2State};
