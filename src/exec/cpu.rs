//! The CPU implementation of the executor: host descriptors into the CPU stages.

use super::{Batch, Executor, LayerPools, LayerView, Mem, MemMut, NewTokens, Prompt, Route, Selected, Table};
use crate::cpu::{self, PageTable};
use crate::ensure;
use crate::numeric;
use crate::status::{Error, Result};

/// Host activations of the model dtype as f32, checking that `n` elements are there.
fn acts_f32(ex: &Executor, a: Mem<u8>, n: usize, what: &str) -> Result<Vec<f32>> {
    let bytes = a.host(what)?;
    let need = n * ex.cfg.dtype.size();
    ensure!(
        bytes.len() >= need,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "`{what}` holds {} bytes, {need} needed",
        bytes.len()
    );
    let mut out = vec![0f32; n];
    numeric::to_f32(ex.cfg.dtype, &bytes[..need], &mut out);
    Ok(out)
}

fn host_array<'a, T>(m: Mem<'a, T>, n: usize, what: &str) -> Result<&'a [T]> {
    let s = m.host(what)?;
    ensure!(
        s.len() >= n,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "`{what}` holds {} entries, {n} needed",
        s.len()
    );
    Ok(&s[..n])
}

fn host_array_mut<'a, T>(m: MemMut<'a, T>, n: usize, what: &str) -> Result<&'a mut [T]> {
    let s = m.host(what)?;
    ensure!(
        s.len() >= n,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "`{what}` holds {} entries, {n} needed",
        s.len()
    );
    Ok(&mut s[..n])
}

fn host_table<'a>(t: &Table<'a>) -> Result<PageTable<'a>> {
    match t {
        Table::Host(t) => Ok(*t),
        Table::Device(_) => Err(crate::status::Error::invalid(
            "`page_table` must be host memory on the CPU",
        )),
    }
}

fn pools_mut(p: LayerPools) -> Result<cpu::LayerMut> {
    match p {
        LayerPools::Host(l) => Ok(l),
        LayerPools::Device(_) => Err(crate::status::Error::invalid("`pools` must be host memory on the CPU")),
    }
}

fn pools_ref(p: LayerView) -> Result<cpu::LayerRef> {
    match p {
        LayerView::Host(l) => Ok(l),
        LayerView::Device(_) => Err(crate::status::Error::invalid("`pools` must be host memory on the CPU")),
    }
}

pub(super) fn calibrate(ex: &Executor, pools: LayerPools, p: &Prompt) -> Result<()> {
    let c = &ex.cfg;
    let n = p.n_tokens as usize;
    let kv = n * (c.num_kv_heads * c.head_dim) as usize;
    let qn = p.n_query as usize * (c.num_q_heads * c.head_dim) as usize;
    let k = acts_f32(ex, p.k, kv, "k")?;
    let v = acts_f32(ex, p.v, kv, "v")?;
    let q = acts_f32(ex, p.q_tail, qn, "q_tail")?;
    let sm = host_array(p.slot_mapping, n, "slot_mapping")?;
    let mut layer = pools_mut(pools)?;
    cpu::calibrate(&ex.layout, c, &mut layer, p.seq_slot as usize, &k, &v, &q, sm)
}

pub(super) fn append(ex: &Executor, pools: LayerPools, t: &NewTokens) -> Result<()> {
    let c = &ex.cfg;
    let n = t.n_tokens as usize;
    let kv = n * (c.num_kv_heads * c.head_dim) as usize;
    let k = acts_f32(ex, t.k, kv, "k")?;
    let v = acts_f32(ex, t.v, kv, "v")?;
    let sm = host_array(t.slot_mapping, n, "slot_mapping")?;
    let ss = host_array(t.seq_slot, n, "seq_slot")?;
    let pos = host_array(t.position, n, "position")?;
    let mut layer = pools_mut(pools)?;
    cpu::append(&ex.layout, c, &mut layer, &k, &v, sm, ss, pos)
}

/// The batch's table, seq slots and queries (as f32) on the host.
fn host_batch<'a>(ex: &Executor, b: &Batch<'a>) -> Result<(PageTable<'a>, &'a [i32], Vec<f32>)> {
    let c = &ex.cfg;
    let t = host_table(&b.table)?;
    let n = t.batch();
    let ss = host_array(b.seq_slot, n, "seq_slot")?;
    let q = acts_f32(ex, b.q, n * (c.num_q_heads * c.head_dim) as usize, "q")?;
    Ok((t, ss, q))
}

pub(super) fn select(
    ex: &Executor,
    pools: LayerView,
    b: &Batch,
    indices: MemMut<i32>,
    counts: MemMut<i32>,
) -> Result<()> {
    let c = &ex.cfg;
    let (t, ss, q) = host_batch(ex, b)?;
    let rows = t.batch() * c.num_kv_heads as usize;
    let idx = host_array_mut(indices, rows * c.budget.max as usize, "indices")?;
    let cnt = host_array_mut(counts, rows, "counts")?;
    let layer = pools_ref(pools)?;
    cpu::select(&ex.layout, c, &layer, &t, ss, &q, idx, cnt)
}

pub(super) fn attend(ex: &Executor, pools: LayerView, b: &Batch, sel: Selected, out: MemMut<u8>) -> Result<()> {
    let c = &ex.cfg;
    let (t, ss, q) = host_batch(ex, b)?;
    let out = host_array_mut(out, q.len() * c.dtype.size(), "out")?;
    let layer = pools_ref(pools)?;
    let mut o = vec![0f32; q.len()];
    match sel {
        Selected::All => cpu::attend_dense(&ex.layout, c, &layer, &t, ss, &q, &mut o)?,
        Selected::Given { indices, counts } => {
            let rows = t.batch() * c.num_kv_heads as usize;
            let idx = host_array(indices, rows * c.budget.max as usize, "indices")?;
            let cnt = host_array(counts, rows, "counts")?;
            cpu::attend(&ex.layout, c, &layer, &t, ss, &q, idx, cnt, &mut o)?;
        }
    }
    numeric::from_f32(c.dtype, &o, out);
    Ok(())
}

pub(super) fn decode(ex: &Executor, pools: LayerView, b: &Batch, route: Route, out: MemMut<u8>) -> Result<()> {
    let c = &ex.cfg;
    let dense = match route {
        Route::Sparse => false,
        Route::Dense => true,
        Route::Live(most) => {
            let t = host_table(&b.table)?;
            t.validate(&ex.layout, c)?;
            let tokens: u64 = (0..t.batch()).map(|i| t.seq_len(i, c.page_size as usize) as u64).sum();
            tokens <= most
        }
    };
    if dense {
        return attend(ex, pools, b, Selected::All, out);
    }
    // One conversion of the queries serves both stages.
    let (t, ss, q) = host_batch(ex, b)?;
    let out = host_array_mut(out, q.len() * c.dtype.size(), "out")?;
    let layer = pools_ref(pools)?;
    let rows = t.batch() * c.num_kv_heads as usize;
    let mut idx = vec![-1i32; rows * c.budget.max as usize];
    let mut cnt = vec![0i32; rows];
    cpu::select(&ex.layout, c, &layer, &t, ss, &q, &mut idx, &mut cnt)?;
    let mut o = vec![0f32; q.len()];
    cpu::attend(&ex.layout, c, &layer, &t, ss, &q, &idx, &cnt, &mut o)?;
    numeric::from_f32(c.dtype, &o, out);
    Ok(())
}

pub(super) fn attend_rows(ex: &Executor, pools: LayerView, b: &Batch, rows: &[u32], out: MemMut<u8>) -> Result<()> {
    let sel_rows = cpu::rows_total(rows, b.table.batch() as usize)? * ex.cfg.num_kv_heads as usize;
    let mut idx = vec![-1i32; sel_rows * ex.cfg.budget.max as usize];
    let mut cnt = vec![0i32; sel_rows];
    select_attend_rows(ex, pools, b, rows, &mut idx, &mut cnt, out)
}

/// Select + attend for query rows, the selection written to `indices` / `counts`
/// (`[sum rows][H_kv][budget_max]`, `[sum rows][H_kv]`).
pub(super) fn select_attend_rows(
    ex: &Executor,
    pools: LayerView,
    b: &Batch,
    rows: &[u32],
    indices: &mut [i32],
    counts: &mut [i32],
    out: MemMut<u8>,
) -> Result<()> {
    let c = &ex.cfg;
    let t = host_table(&b.table)?;
    let ss = host_array(b.seq_slot, t.batch(), "seq_slot")?;
    // The rows size q and out; checked here before they do.
    let total = cpu::rows_total(rows, t.batch())?;
    let q = acts_f32(ex, b.q, total * (c.num_q_heads * c.head_dim) as usize, "q")?;
    let out = host_array_mut(out, q.len() * c.dtype.size(), "out")?;
    let layer = pools_ref(pools)?;
    cpu::select_rows(
        &ex.layout,
        c,
        &layer,
        &t,
        ss,
        rows,
        &q,
        c.row_selection,
        indices,
        counts,
    )?;
    let mut o = vec![0f32; q.len()];
    cpu::attend_rows(&ex.layout, c, &layer, &t, ss, rows, &q, indices, counts, &mut o)?;
    numeric::from_f32(c.dtype, &o, out);
    Ok(())
}

/// Host query-row offsets (`Executor::decode_rows`) as rows per sequence, checked: `batch + 1`
/// entries from 0 to `n_rows`, each sequence 1..=`cpu::SIKV_MAX_QUERY_ROWS` rows (`cpu::rows_total`'s
/// check, on the differences).
pub(super) fn rows_from_offsets(offsets: Mem<i32>, batch: usize, n_rows: u32) -> Result<Vec<u32>> {
    let off = host_array(offsets, batch + 1, "row_offsets")?;
    ensure!(
        off[0] == 0 && off[batch] as i64 == n_rows as i64,
        SIKV_ERR_INVALID_ARGUMENT,
        "row_offsets must run from 0 to n_rows ({n_rows}); they run from {} to {}",
        off[0],
        off[batch]
    );
    // A descending pair gives 0 rows, which the check below refuses.
    let rows: Vec<u32> = off
        .windows(2)
        .map(|w| (w[1] as i64 - w[0] as i64).max(0) as u32)
        .collect();
    cpu::rows_total(&rows, batch).map_err(|e| {
        Error::new(
            e.status,
            format!(
                "row_offsets (rows[i] = row_offsets[i + 1] - row_offsets[i]): {}",
                e.message
            ),
        )
    })?;
    Ok(rows)
}

pub(super) fn reset_sequence(ex: &Executor, state: MemMut<u8>, seq_slot: u32) -> Result<()> {
    let st = host_array_mut(state, ex.layout.layer_state_bytes, "pools.state")?;
    cpu::reset_sequence(&ex.layout, st, seq_slot as usize)
}
