//! CUDA dispatch: cudarc driver API in the device's primary context, module loading (embedded
//! fatbin, else NVRTC), and one launcher per stage.

/// What build.rs embedded: the fatbin (when nvcc was found) and/or the kernel sources.
pub mod embed {
    include!(concat!(env!("OUT_DIR"), "/kernels_embed.rs"));
}

// Interim stand-ins until the CUDA launchers land: every GPU request reports NO_DEVICE.
use crate::config::CacheConfig;
use crate::layout::{Layout, SIKV_NUM_PLANES};
use crate::status::{Error, Result, SikvStatus};

pub type CUstream = *mut std::ffi::c_void;

pub struct DevLayer {
    pub planes: [u64; SIKV_NUM_PLANES],
    pub state: u64,
}
pub struct DevPageTable {
    pub indptr: u64,
    pub indices: u64,
    pub last_page_len: u64,
    pub batch: u32,
}
pub struct GpuContext;

fn no_device() -> Error {
    Error::new(SikvStatus::SIKV_ERR_NO_DEVICE, "this build has no CUDA backend yet")
}

#[allow(clippy::too_many_arguments, unused_variables)]
impl GpuContext {
    pub fn new(cfg: &CacheConfig, layout: &Layout) -> Result<GpuContext> {
        Err(no_device())
    }
    pub fn workspace_bytes(cfg: &CacheConfig, layout: &Layout, batch: u32) -> usize {
        0
    }
    pub fn calibrate(&self, cfg: &CacheConfig, layout: &Layout, layer: &DevLayer, seq_slot: u32, n: u32, k: u64, v: u64, nq: u32, q_tail: u64, slot_mapping: u64, ws: u64, ws_bytes: usize, stream: CUstream) -> Result<()> {
        Err(no_device())
    }
    pub fn append(&self, cfg: &CacheConfig, layout: &Layout, layer: &DevLayer, n: u32, k: u64, v: u64, slot_mapping: u64, seq_slot: u64, position: u64, stream: CUstream) -> Result<()> {
        Err(no_device())
    }
    pub fn select(&self, cfg: &CacheConfig, layout: &Layout, layer: &DevLayer, table: &DevPageTable, seq_slot: u64, q: u64, indices: u64, counts: u64, ws: u64, ws_bytes: usize, stream: CUstream) -> Result<()> {
        Err(no_device())
    }
    pub fn attend(&self, cfg: &CacheConfig, layout: &Layout, layer: &DevLayer, table: &DevPageTable, seq_slot: u64, q: u64, indices: u64, counts: u64, out: u64, ws: u64, ws_bytes: usize, stream: CUstream) -> Result<()> {
        Err(no_device())
    }
    pub fn attend_dense(&self, cfg: &CacheConfig, layout: &Layout, layer: &DevLayer, table: &DevPageTable, seq_slot: u64, q: u64, out: u64, ws: u64, ws_bytes: usize, stream: CUstream) -> Result<()> {
        Err(no_device())
    }
}
