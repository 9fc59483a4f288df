//! Plain C structs of the ABI.

use std::ffi::c_void;

use crate::config::CacheConfig;
use crate::layout::{Layout, SIKV_NUM_PLANES};

/// A CUDA stream (`cudaStream_t` / `CUstream`), borrowed; NULL is the legacy default stream.
/// Ignored on the CPU.
pub type SikvStream = *mut c_void;

/// Sizes and offsets of a configuration's memory, for engines that allocate the pools.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SikvLayoutInfo {
    /// Bytes per token per KV head over all planes (112 for 2+1 at head_dim 128).
    pub bytes_per_token: usize,
    /// Bytes of one page over all planes and KV heads of one layer.
    pub bytes_per_page: usize,
    /// fp16 K+V bytes per token per KV head divided by bytes_per_token.
    pub compression_vs_fp16: f64,
    /// Bytes per token row of each plane (SIKV_PLANE_*), 0 for absent planes.
    pub row_bytes: [usize; SIKV_NUM_PLANES],
    /// Offset of each plane inside one layer's plane block (256-byte aligned).
    pub plane_offset: [usize; SIKV_NUM_PLANES],
    /// Bytes of each plane of one layer.
    pub plane_bytes: [usize; SIKV_NUM_PLANES],
    /// Bytes of one layer's planes; layer l's block starts at l * layer_plane_bytes.
    pub layer_plane_bytes: usize,
    /// Bytes of one state record (one sequence slot, layer and KV head).
    pub state_record_bytes: usize,
    /// Bytes of one layer's state pool (max_seqs * num_kv_heads records).
    pub layer_state_bytes: usize,
    /// All layers' planes / state.
    pub total_plane_bytes: usize,
    pub total_state_bytes: usize,
    /// Workspace every stateless call needs at max_batch on a GPU (`sikv_workspace_size`
    /// gives the figure for a live handle and batch; 0 on the CPU).
    pub workspace_bytes: usize,
    /// Pages in the pool.
    pub num_pages: u32,
    /// Dense (full-precision) entries per sequence, layer and KV head.
    pub dense_capacity: u32,
    /// The profile in force: key magnitude bits and value bits (2, 4 or 16) ...
    pub key_bits: u32,
    pub value_bits: u32,
    /// ... and the selection: 0/1 = one stage, c >= 2 = 1-bit scan keeps c*k, re-ranked.
    pub rerank_factor: u32,
}

impl SikvLayoutInfo {
    pub fn from_layout(layout: &Layout, workspace_bytes: usize, cfg: &CacheConfig) -> Self {
        let d = layout.format.head_dim;
        SikvLayoutInfo {
            bytes_per_token: layout.bytes_per_token(),
            bytes_per_page: layout.bytes_per_page(),
            compression_vs_fp16: (4 * d) as f64 / layout.bytes_per_token() as f64,
            row_bytes: layout.format.row_bytes,
            plane_offset: layout.plane_offset,
            plane_bytes: layout.plane_bytes,
            layer_plane_bytes: layout.layer_plane_bytes,
            state_record_bytes: layout.state.bytes,
            layer_state_bytes: layout.layer_state_bytes,
            total_plane_bytes: layout.total_plane_bytes(),
            total_state_bytes: layout.total_state_bytes(),
            workspace_bytes,
            num_pages: layout.num_pages as u32,
            dense_capacity: cfg.dense_capacity(),
            key_bits: cfg.key_bits,
            value_bits: cfg.value_bits,
            rerank_factor: cfg.rerank_factor,
        }
    }
}

/// Engine-owned memory for `sikv_cache_create_with_pools` (host pointers for the CPU device,
/// device pointers for CUDA). Sizes come from `sikv_query_layout`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SikvPoolsDesc {
    pub planes: *mut c_void,
    pub planes_bytes: usize,
    pub state: *mut c_void,
    pub state_bytes: usize,
    /// Device workspace (CUDA only; may be NULL on the CPU).
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
}

/// One layer's pools for the stateless calls: a base pointer per plane (NULL for planes the
/// profile lacks) and the layer's state pool.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SikvLayerPools {
    pub plane: [*mut c_void; SIKV_NUM_PLANES],
    pub state: *mut c_void,
}

/// FlashInfer-style CSR page table (int32): sequence b owns pages
/// `indices[indptr[b] .. indptr[b+1]]`, the last one holding `last_page_len[b]` tokens.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SikvPageTable {
    pub indptr: *const i32,
    pub indices: *const i32,
    pub last_page_len: *const i32,
    pub batch: u32,
}

/// What `sikv_cache_info` reports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SikvCacheInfo {
    /// SIKV_DEVICE_CPU or SIKV_DEVICE_CUDA: where the cache actually runs.
    pub device: u32,
    pub num_seqs: u32,
    pub free_pages: u32,
    pub num_pages: u32,
    pub bytes_per_token: usize,
}
