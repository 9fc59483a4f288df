//! libselfindexkv: a compressed, self-indexing KV cache with sparse decode attention.
//!
//! Keys are stored as a 1-bit sign plane plus low-bit magnitudes; the sign plane doubles as the
//! index that predicts which tokens a decode query needs (a 16-entry centroid LUT per 4-channel
//! sub-vector). Layers, bottom up:
//! - [`config`], [`layout`]: what is stored where (the single source of truth);
//! - [`reference`]: the CPU reference of every pipeline stage, per head, written for exactness;
//! - [`cpu`]: the same stages over layout memory (the CPU backend behind the C ABI);
//! - [`gpu`]: the CUDA launchers for the kernels in `kernels/`;
//! - [`exec`]: the stage executor (CPU or CUDA) both ABI layers run stages through;
//! - [`cache`]: pools, page allocator and sequence slots of the managed cache;
//! - [`ffi`]: the C ABI, the only place with `extern "C"`.

pub mod cache;
pub mod config;
pub mod cpu;
pub mod exec;
pub mod ffi;
pub mod gpu;
pub mod layout;
pub mod numeric;
pub mod reference;
pub mod status;
pub mod telemetry;

pub use config::{CacheConfig, SikvConfig};
pub use layout::Layout;
pub use status::{Error, Result, SikvStatus};
