//! Several query rows per sequence in one call (speculative-decoding verification, chunked
//! prefill): the CPU reference of `select_rows` / `attend_rows`.
//!
//! Sequence b's last `rows[b]` positions are its new tokens, appended before the call. Query
//! row r of b (0-based) stands at position `len_b - rows[b] + r` and attends causally: to the
//! positions below its bound `len_b - rows[b] + r + 1`. Every row sees the cache as the append
//! left it: the same dense set (sinks, heavy, the window of the last W positions) and the same
//! candidates `[S, max(S, len_b - W))` minus heavy, both cut at the row's bound. So one row
//! (`rows[b] = 1`) is exactly `select` + `attend`, and a row r < rows[b] - 1 can see, as
//! candidates, the positions that a one-token decode at its position would still have held in
//! its window: the window has moved on by the later rows' tokens.
//!
//! Selection ([`RowSelection`]): per row, from that row's group-mean query; or once per sequence
//! and KV head from the mean over its rows' queries, each row then keeping the selected
//! positions below its bound.
//!
//! Layouts: `q` and `out` are `R x H_q x d`, `indices` `R x H_kv x budget_max` and `counts`
//! `R x H_kv`, with R = the sum of `rows` and sequence b's rows after those of b - 1.

use super::pools::{check_pools_ref, LayerRef};
use super::stages::{
    attend_head, check_batch_rows, check_selection_buffers, check_selection_row, group_rows, select_head,
};
use super::table::PageTable;
use crate::config::CacheConfig;
pub use crate::config::RowSelection;
use crate::ensure;
use crate::layout::Layout;
use crate::reference::score::group_mean_query;
use crate::status::Result;

/// Most query rows (new tokens) one sequence may bring to `sikv_attend_rows` or
/// `sikv_kernel_decode_rows`.
pub const SIKV_MAX_QUERY_ROWS: u32 = 16;

/// The query rows of a call over `batch` sequences (their sum), after checking that `rows` has
/// one entry per sequence, each in 1..=SIKV_MAX_QUERY_ROWS: what sizes `q` and `out`.
pub fn rows_total(rows: &[u32], batch: usize) -> Result<usize> {
    ensure!(
        rows.len() == batch,
        SIKV_ERR_INVALID_ARGUMENT,
        "rows has {} entries, the batch has {batch} sequences",
        rows.len()
    );
    let mut total = 0usize;
    for (b, &n) in rows.iter().enumerate() {
        ensure!(
            (1..=SIKV_MAX_QUERY_ROWS).contains(&n),
            SIKV_ERR_OUT_OF_BOUNDS,
            "rows[{b}] = {n} is outside 1..={SIKV_MAX_QUERY_ROWS}"
        );
        total += n as usize;
    }
    Ok(total)
}

/// First query row of each sequence, and the total, after checking `rows` against the batch
/// and the sequences' lengths.
fn row_starts(layout: &Layout, table: &PageTable, rows: &[u32]) -> Result<(Vec<usize>, usize)> {
    let total = rows_total(rows, table.batch())?;
    let mut starts = Vec::with_capacity(rows.len());
    let mut at = 0usize;
    for (b, &n) in rows.iter().enumerate() {
        let len = table.seq_len(b, layout.page_size);
        ensure!(
            n as usize <= len,
            SIKV_ERR_OUT_OF_BOUNDS,
            "rows[{b}] = {n} exceeds the sequence's length {len} (the rows' tokens are appended first)"
        );
        starts.push(at);
        at += n as usize;
    }
    Ok((starts, total))
}

/// What select_rows and attend_rows both take and check first.
struct Call<'a> {
    layout: &'a Layout,
    cfg: &'a CacheConfig,
    layer: &'a LayerRef<'a>,
    table: &'a PageTable<'a>,
    seq_slot: &'a [i32],
    rows: &'a [u32],
    q: &'a [f32],
}

impl Call<'_> {
    /// Pools, page table, rows, slots, q and the selection buffers' sizes; returns the first
    /// query row of each sequence and the slots.
    fn check(&self, indices: usize, counts: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        let (layout, cfg) = (self.layout, self.cfg);
        check_pools_ref(layout, self.layer)?;
        self.table.validate(layout, cfg)?;
        let (starts, total) = row_starts(layout, self.table, self.rows)?;
        let slots = check_batch_rows(layout, cfg, self.layer.state, self.table, self.seq_slot, self.q, total)?;
        check_selection_buffers(cfg, total, "query rows", indices, counts)?;
        Ok((starts, slots))
    }
}

/// Causal bound of row r of a sequence of length `len` that brought `n` rows.
fn bound(len: usize, n: usize, r: usize) -> usize {
    len - n + r + 1
}

/// Selection for every query row; see the module documentation.
#[allow(clippy::too_many_arguments)] // select's inputs plus the rows
pub fn select_rows(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    seq_slot: &[i32],
    rows: &[u32],
    q: &[f32],
    mode: RowSelection,
    indices: &mut [i32],
    counts: &mut [i32],
) -> Result<()> {
    let d = cfg.head_dim as usize;
    let hkv = cfg.num_kv_heads as usize;
    let kmax = cfg.budget.max as usize;
    let call = Call {
        layout,
        cfg,
        layer,
        table,
        seq_slot,
        rows,
        q,
    };
    let (starts, slots) = call.check(indices.len(), counts.len())?;
    for (b, &slot) in slots.iter().enumerate() {
        let len = table.seq_len(b, layout.page_size);
        let n = rows[b] as usize;
        for h in 0..hkv {
            let shared = match mode {
                RowSelection::PerRow => None,
                RowSelection::MeanQuery => {
                    let all: Vec<f32> = (0..n)
                        .flat_map(|r| q[group_rows(cfg, starts[b] + r, h)].to_vec())
                        .collect();
                    let qbar = group_mean_query(&all, d);
                    Some(select_head(layout, cfg, layer, table, b, slot, h, len, len, &qbar))
                }
            };
            for r in 0..n {
                let at = bound(len, n, r);
                let chosen: Vec<u32> = match &shared {
                    Some(sel) => sel.iter().copied().filter(|&p| (p as usize) < at).collect(),
                    None => {
                        let qbar = group_mean_query(&q[group_rows(cfg, starts[b] + r, h)], d);
                        select_head(layout, cfg, layer, table, b, slot, h, len, at, &qbar)
                    }
                };
                let i = (starts[b] + r) * hkv + h;
                let row = &mut indices[i * kmax..(i + 1) * kmax];
                row.fill(-1);
                for (o, &p) in row.iter_mut().zip(&chosen) {
                    *o = p as i32;
                }
                counts[i] = chosen.len() as i32;
            }
        }
    }
    Ok(())
}

/// Attention of every query row over the dense set and its selected positions, both cut at
/// the row's causal bound; see the module documentation.
#[allow(clippy::too_many_arguments)] // attend's inputs plus the rows
pub fn attend_rows(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    seq_slot: &[i32],
    rows: &[u32],
    q: &[f32],
    indices: &[i32],
    counts: &[i32],
    out: &mut [f32],
) -> Result<()> {
    let hkv = cfg.num_kv_heads as usize;
    let kmax = cfg.budget.max as usize;
    let call = Call {
        layout,
        cfg,
        layer,
        table,
        seq_slot,
        rows,
        q,
    };
    let (starts, slots) = call.check(indices.len(), counts.len())?;
    ensure!(
        out.len() >= q.len(),
        SIKV_ERR_BUFFER_TOO_SMALL,
        "out has {} floats, query rows x num_q_heads x head_dim = {} needed",
        out.len(),
        q.len()
    );
    // Every selection is checked before anything is written.
    for (b, &n) in rows.iter().enumerate() {
        let (len, n) = (table.seq_len(b, layout.page_size), n as usize);
        for r in 0..n {
            let at = bound(len, n, r);
            for h in 0..hkv {
                check_selection_row(indices, counts, (starts[b] + r) * hkv + h, kmax, at, || {
                    format!("0..{at}, the causal bound of row {r} of sequence {b}")
                })?;
            }
        }
    }
    for (b, &slot) in slots.iter().enumerate() {
        let (len, n) = (table.seq_len(b, layout.page_size), rows[b] as usize);
        for r in 0..n {
            let at = bound(len, n, r);
            for h in 0..hkv {
                let i = (starts[b] + r) * hkv + h;
                let sel: Vec<u32> = indices[i * kmax..i * kmax + counts[i] as usize]
                    .iter()
                    .map(|&p| p as u32)
                    .collect();
                let span = group_rows(cfg, starts[b] + r, h);
                let o = attend_head(layout, cfg, layer, table, b, slot, h, len, at, &sel, &q[span.clone()]);
                out[span].copy_from_slice(&o);
            }
        }
    }
    Ok(())
}
