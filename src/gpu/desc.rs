//! Descriptors of borrowed device memory, the launchers' arguments: typed structs instead of
//! runs of bare `u64` addresses, so that a call site names every address it passes and two
//! addresses cannot be swapped silently. Each says the element type and shape the kernels
//! read or write; the launchers check null pointers and alignment, the kernels check the
//! indices stored in them (device faults, see the module doc of `gpu`).

use crate::layout::SIKV_NUM_PLANES;

/// One layer's pools on the device: the base address of each plane (0 for absent planes) and
/// of the layer's state pool; borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevLayer {
    pub planes: [u64; SIKV_NUM_PLANES],
    pub state: u64,
}

/// A FlashInfer-style CSR page table in device memory: int32 `indptr[batch + 1]`,
/// `indices[..]`, `last_page_len[batch]`; borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPageTable {
    pub indptr: u64,
    pub indices: u64,
    pub last_page_len: u64,
    pub batch: u32,
}

/// A decode batch on the device (select, attend, attend_dense): the page table, int32
/// `seq_slot[batch]` (each sequence's state slot) and the queries `q`, `[rows][H_q][d]` in the
/// model dtype, 16-byte aligned; borrowed. `table.batch` is the batch size; the query rows are
/// one per sequence, or `rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevBatch {
    pub table: DevPageTable,
    pub seq_slot: u64,
    pub q: u64,
    pub rows: Option<DevRows>,
}

/// Several query rows per sequence (`cpu::rows`: its last tokens, appended before the call,
/// each attending causally): `n` rows in all, sequence b's rows `[offsets[b], offsets[b + 1])`
/// of int32 `offsets[batch + 1]` in device memory, borrowed. The kernels check the offsets
/// (device fault `FAULT_QUERY_ROWS`); q, out, the selection and the workspace then hold `n`
/// rows where a batch holds one per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevRows {
    pub offsets: u64,
    pub n: u32,
    /// Select once per sequence from the mean of its rows' queries (`cpu::RowSelection::MeanQuery`):
    /// the selection then holds one row per sequence, `[batch][H_kv][budget_max]`, and each
    /// query row attends the positions of it below its causal bound.
    pub mean: bool,
}

/// A selection on the device, written by select and read by attend: int32
/// `indices[batch][H_kv][budget_max]` (ascending positions, the rest of a row -1) and int32
/// `counts[batch][H_kv]`; borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevSelection {
    pub indices: u64,
    pub counts: u64,
}

/// The caller's device workspace: `bytes` at `ptr` (16-byte aligned), at least
/// [`GpuContext::workspace_bytes`](super::GpuContext::workspace_bytes) for the call's batch; borrowed, and reused freely between
/// calls on one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevWorkspace {
    pub ptr: u64,
    pub bytes: usize,
}

/// New tokens of any sequences (append): `n` rows of keys and values `k`, `v`,
/// `[n][H_kv][d]` in the model dtype (16-byte aligned); int64 `slot_mapping[n]`
/// (`page * page_size + slot`, `< 0` = no page write); int32 `seq_slot[n]` and `position[n]`
/// (whose token it is, and where in its sequence); borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevTokens {
    pub n: u32,
    pub k: u64,
    pub v: u64,
    pub slot_mapping: u64,
    pub seq_slot: u64,
    pub position: u64,
}

/// One sequence's prompt (calibrate): `n_tokens` rows of keys and values `k`, `v`,
/// `[n_tokens][H_kv][d]`; the last `n_query` prompt queries `q_tail`, `[n_query][H_q][d]`
/// (model dtype, 16-byte aligned); int64 `slot_mapping[n_tokens]` (`< 0` = no page write).
/// `seq_slot` is the state slot calibrated. Device addresses borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPrompt {
    pub seq_slot: u32,
    pub n_tokens: u32,
    pub k: u64,
    pub v: u64,
    pub n_query: u32,
    pub q_tail: u64,
    pub slot_mapping: u64,
}
