//! The CPU backend: every stage over layout memory (plane pools, state records, CSR page
//! tables), built from the per-head reference. Activations arrive as f32 (the caller converts
//! from its dtype); pools are byte slices laid out as [`crate::layout::Layout`] says.
//!
//! Sequence geometry, shared with the kernels: a sequence of length `len` (from its page
//! table) has sinks `[0, S)`, a recent window `[max(S, len - W), len)`, heavy positions chosen
//! at calibration inside `[S, prompt_len - W)`, and candidates = `[S, max(S, len - W))` minus
//! heavy. Dense entries: index `p` for sink position p, `S + i` for heavy i,
//! `S + H + (p mod W)` for window position p.
//!
//! Files: `table` the CSR page table and its validation, `pools` the layer's pools and
//! their plane rows, `state` the per-sequence state records and the geometry derived from
//! them, `stages` the stage entry points (calibrate, append, select, attend, attend_dense),
//! `rows` select and attend for several query rows per sequence.
//! Everything public is re-exported here, so callers name `crate::cpu::*`.

mod pools;
pub mod rows;
pub mod stages;
mod state;
mod table;

pub use pools::{LayerMut, LayerRef};
pub use rows::{attend_rows, rows_total, select_rows, RowSelection, SIKV_MAX_QUERY_ROWS};
pub use stages::*;
pub use state::{cand_end, dense_entries, expected_candidates, read_state, reset_sequence, StateRecord};
pub use table::PageTable;
