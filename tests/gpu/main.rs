//! GPU kernels against the CPU stages (the oracle), on fresh random inputs every run. One test
//! binary (the bundle for the GPU machine stays small), one file per stage:
//!
//! - `setup`: the kernel parameter layout, argument validation, the NVRTC fallback and the
//!   NVRTC compile of the embedded sources (the last needs no device);
//! - `encode`: encode (append) and calibrate, bit-exact;
//! - `decode`: select, attend and attend_dense on ragged batches (the shape matrix, the
//!   reference profile, a sequence longer than 128K tokens);
//! - `graph`: a whole decode step captured in a CUDA graph and replayed;
//! - `rows`: select and attend over several query rows per sequence, and the kernels' check of
//!   the rows' offsets;
//! - `tolerance`: the rounding budget of attend outputs on the decode matrix's recorded misses
//!   of the old fixed tolerance, regenerated on the host (needs no device).
//!
//! Every case is its own test, named `<stage>::<case>` (libtest filters select them). Without
//! a CUDA device each prints one line `skipped: no CUDA device (<stage>::<case>)` and returns;
//! CI counts those lines. Every case prints its seed (`SIKV_TEST_SEED` replays it).
//! SIKV_GPU_TEST_QUICK=1 shrinks every size (for compute-sanitizer runs). Outputs are poisoned
//! (0xFF bytes: NaN for 16-bit floats, -1 for ints) before every GPU launch, so an element a
//! kernel fails to write shows up.
//!
//! Comparison rules:
//! - encode / calibrate: bit-exact (planes, state records, dense entries): the kernels use the
//!   CPU's operation order without FMA contraction.
//! - select: counts equal and index sets equal. A mismatch is accepted only as a tie within
//!   float rounding: every position in the symmetric difference must have a final-stage CPU
//!   score within 1e-4 (relative, floor 1e-4 absolute) of the smallest selected CPU score;
//!   each such row is printed, so a run shows whether any tie was needed.
//! - attend / attend_dense: on the SAME indices, |gpu - cpu| per element within the rounding
//!   budget of the f16 tensor-core tiles (`out_bound::attend_bound`: six standard deviations
//!   of the error that the f16 roundings of Q', K, P and V give to first order, computed from
//!   the CPU's logits, weights and values, plus the output's rounding and a floor of 1e-4 of
//!   the row's max |cpu|); each comparison prints its worst error as a fraction of the allowed
//!   one. attend over several query rows (`rows`): max |gpu - cpu| <= tol * max |cpu| per row,
//!   tol = 1e-2 (f16; 2e-2 above 64K tokens) or 3e-2 (bf16) (`fixture::tol`).
//! - CUDA graph: graph replays bit-identical to eager launches of the same steps.

#[path = "../common/mod.rs"]
mod common;
#[macro_use]
#[path = "../common/gpu_fixture.rs"]
mod fixture;
#[path = "../common/out_bound.rs"]
mod out_bound;
#[path = "../common/tc_model.rs"]
mod tc_model;

mod decode;
mod encode;
mod graph;
mod rows;
mod setup;
mod tolerance;
