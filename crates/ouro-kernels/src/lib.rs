//! ouro's state-space kernels.
//!
//! Each kernel exists as plain slice functions (the math, written for speed: contiguous inner loops,
//! rayon over independent work, no per-timestep allocation) and as a candle custom op with a
//! backward pass, so models built on candle get autodiff through them.
//!
//! - [`ssd`]: Mamba-2's state space duality layer (`mamba_chunk_scan_combined` semantics), computed as a
//!   recurrence, as a chunked scan, or as masked "attention" through its materialised L×L matrix.
//! - [`selective_scan`]: Mamba-1's S6 selective scan (`selective_scan_fn` semantics).
//! - [`conv`]: causal depthwise conv1d with carried state and document boundaries.
//! - [`norm`]: RMSNorm and gated RMSNorm (`group_size`, both `norm_before_gate` orders).
//! - [`linear_scan`]: the diagonal linear recurrence of Hawk/Griffin's RG-LRU (sequential and parallel).
//! - [`act`]: softplus and the bounded-gradient square root.
//! - [`bf16`]: bf16 matrix products on AVX-512 BF16 for prefill and batched decode.
//! - [`quant`]: f16, Q8_0 and Q4_0 weight matrices (ggml block layouts) and their batched matvec.
//! - [`decode`]: Mamba-2's single-token step for a batch (fused on CUDA).
//! - `cuda` (feature `cuda`): CUDA C kernels compiled at run time by NVRTC: the chunked SSD, the
//!   selective scan, conv1d, gated RMSNorm (forward and backward) and the fused decode step.
//! - [`cpu`]: the scalar helpers (exp, softplus, dot) and buffer utilities the CPU kernels share.

pub mod act;
pub mod bf16;
pub mod conv;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode;
pub mod linear_scan;
pub mod norm;
pub mod quant;
pub mod selective_scan;
pub mod ssd;
#[doc(hidden)]
pub mod testing;
pub mod util;

pub use util::{seq_idx_to_vec, Segments};
