//! CPU reference of every pipeline stage, per (sequence, KV head), written for clarity and
//! exactness. It is the oracle of every test, and the CPU backend ([`crate::cpu`]) runs it
//! over layout memory. Stage names are shared with `kernels/*.cu` and `src/gpu/*.rs`.

pub mod attend;
pub mod calibrate;
pub mod encode;
pub mod rerank;
pub mod score;
pub mod topk;
