//! Stage entry points of the CPU backend.

use crate::config::CacheConfig;
use crate::layout::{Layout, SIKV_NUM_PLANES};
use crate::status::Result;

/// One layer's pools, writable.
pub struct LayerMut<'a> {
    /// One slice per plane: the whole plane of this layer (`layout.plane_bytes[p]`), empty
    /// for absent planes.
    pub planes: [&'a mut [u8]; SIKV_NUM_PLANES],
    /// The layer's state pool (`layout.layer_state_bytes`).
    pub state: &'a mut [u8],
}

/// One layer's pools, read-only.
pub struct LayerRef<'a> {
    pub planes: [&'a [u8]; SIKV_NUM_PLANES],
    pub state: &'a [u8],
}

/// FlashInfer-style CSR page table of a batch.
#[derive(Clone, Copy)]
pub struct PageTable<'a> {
    /// `batch + 1` offsets into `indices`.
    pub indptr: &'a [i32],
    /// Page ids.
    pub indices: &'a [i32],
    /// Valid tokens in each sequence's last page (1..=page_size; 0 only for an empty sequence).
    pub last_page_len: &'a [i32],
}

impl PageTable<'_> {
    pub fn batch(&self) -> usize {
        self.last_page_len.len()
    }
    /// Length of sequence `b` in tokens.
    pub fn seq_len(&self, b: usize, page_size: usize) -> usize {
        unimplemented!()
    }
    /// (page id, slot) of position `pos` of sequence `b`.
    pub fn locate(&self, b: usize, pos: usize, page_size: usize) -> (usize, usize) {
        unimplemented!()
    }
    /// Checks shapes and that every page id and length is within the layout's bounds.
    pub fn validate(&self, layout: &Layout, cfg: &CacheConfig) -> Result<()> {
        unimplemented!()
    }
}

/// Stage `calibrate` for one sequence (all KV heads of one layer): fits the state, writes the
/// state records of `seq_slot`, encodes all `n` tokens into their page slots
/// (`slot_mapping[t] = page * page_size + slot`; negative = skip that token's page write) and
/// fills the dense set (sinks, heavy, window). `k`, `v`: `n x H_kv x d`; `q_tail`:
/// `nq x H_q x d` (the last nq prompt queries, nq >= 1). Sets meta prompt_len = n and
/// calibrated = 1. Validates everything before writing anything.
pub fn calibrate(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &mut LayerMut,
    seq_slot: usize,
    k: &[f32],
    v: &[f32],
    q_tail: &[f32],
    slot_mapping: &[i64],
) -> Result<()> {
    unimplemented!()
}

/// Stage `encode` (append): encodes `n` tokens (`k`, `v`: `n x H_kv x d`) into their page
/// slots and updates each token's dense entry when it is a sink or enters the window.
/// `seq_slot[t]` and `position[t]` say whose token it is; `slot_mapping[t] < 0` skips it.
/// The sequence must be calibrated. Validates everything before writing anything.
pub fn append(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &mut LayerMut,
    k: &[f32],
    v: &[f32],
    slot_mapping: &[i64],
    seq_slot: &[i32],
    position: &[i32],
) -> Result<()> {
    unimplemented!()
}

/// Selection for a batch: `score` (+ `topk`, + `rerank` when two-stage) per (sequence, KV
/// head). `q`: `B x H_q x d`. Writes `indices[(b*H_kv + h)*budget_max ..]` (positions,
/// ascending; the rest of the row set to -1) and `counts[b*H_kv + h]`.
pub fn select(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    seq_slot: &[i32],
    q: &[f32],
    indices: &mut [i32],
    counts: &mut [i32],
) -> Result<()> {
    unimplemented!()
}

/// Stage `attend` (+ `combine`): attention over the dense set and the selected tokens for a
/// batch; `out`: `B x H_q x d`.
pub fn attend(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    seq_slot: &[i32],
    q: &[f32],
    indices: &[i32],
    counts: &[i32],
    out: &mut [f32],
) -> Result<()> {
    unimplemented!()
}

/// Dense decode over every token of the cache (dequantised), no selection: the library's own
/// baseline and the path below the crossover length.
pub fn attend_dense(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    seq_slot: &[i32],
    q: &[f32],
    out: &mut [f32],
) -> Result<()> {
    unimplemented!()
}
