//! The CPU backend: every stage over layout memory (plane pools, state records, CSR page
//! tables), built from the per-head reference. Activations arrive as f32 (the caller converts
//! from its dtype); pools are byte slices laid out as [`crate::layout::Layout`] says.
//!
//! Sequence geometry, shared with the kernels: a sequence of length `len` (from its page
//! table) has sinks `[0, S)`, a recent window `[max(S, len - W), len)`, heavy positions chosen
//! at calibration inside `[S, prompt_len - W)`, and candidates = `[S, max(S, len - W))` minus
//! heavy. Dense entries: index `p` for sink position p, `S + i` for heavy i,
//! `S + H + (p mod W)` for window position p.

pub mod stages;
pub use stages::*;
