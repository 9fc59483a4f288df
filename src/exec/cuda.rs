//! The CUDA implementation of the executor: device descriptors into the launchers of
//! [`crate::gpu::GpuContext`], which check pointers, alignment and workspace size.

use super::{
    Batch, Executor, LayerPools, LayerView, Mem, MemMut, NewTokens, Prompt, Route, Selected, Stream, Table, Workspace,
};
use crate::config::RowSelection;
use crate::ensure;
use crate::gpu::{
    DevBatch, DevLayer, DevPrompt, DevRows, DevSelection, DevTokens, DevWorkspace, GpuContext, Predecessor,
};
use crate::layout::SIKV_NUM_PLANES;
use crate::status::{Error, Result};

fn device_pools(p: LayerPools) -> Result<DevLayer> {
    match p {
        LayerPools::Device(l) => Ok(l),
        LayerPools::Host(_) => Err(Error::invalid("`pools` must be device memory on a CUDA device")),
    }
}

fn device_view(p: LayerView) -> Result<DevLayer> {
    match p {
        LayerView::Device(l) => Ok(l),
        LayerView::Host(_) => Err(Error::invalid("`pools` must be device memory on a CUDA device")),
    }
}

/// The batch's device table, seq-slot and query addresses.
fn device_batch(b: &Batch) -> Result<DevBatch> {
    let table = match &b.table {
        Table::Device(t) => *t,
        Table::Host(_) => return Err(Error::invalid("`page_table` must be device memory on a CUDA device")),
    };
    Ok(DevBatch {
        table,
        seq_slot: b.seq_slot.device("seq_slot")?,
        q: b.q.device("q")?,
        rows: None,
    })
}

/// The device addresses a selection is written to.
fn selection_out(indices: MemMut<i32>, counts: MemMut<i32>) -> Result<DevSelection> {
    Ok(DevSelection {
        indices: indices.device("indices")?,
        counts: counts.device("counts")?,
    })
}

/// The executor's workspace descriptor as the launchers take it (the same two fields; the
/// executor's own type also describes the CPU's unused workspace).
fn device_ws(ws: Workspace) -> DevWorkspace {
    DevWorkspace {
        ptr: ws.ptr,
        bytes: ws.bytes,
    }
}

pub(super) fn calibrate(
    ex: &Executor,
    g: &GpuContext,
    pools: LayerPools,
    p: &Prompt,
    ws: Workspace,
    stream: Stream,
) -> Result<()> {
    let layer = device_pools(pools)?;
    let prompt = DevPrompt {
        seq_slot: p.seq_slot,
        n_tokens: p.n_tokens,
        k: p.k.device("k")?,
        v: p.v.device("v")?,
        n_query: p.n_query,
        q_tail: p.q_tail.device("q_tail")?,
        slot_mapping: p.slot_mapping.device("slot_mapping")?,
    };
    g.calibrate(&ex.cfg, &ex.layout, &layer, &prompt, device_ws(ws), stream)
}

pub(super) fn append(ex: &Executor, g: &GpuContext, pools: LayerPools, t: &NewTokens, stream: Stream) -> Result<()> {
    let layer = device_pools(pools)?;
    let tokens = DevTokens {
        n: t.n_tokens,
        k: t.k.device("k")?,
        v: t.v.device("v")?,
        slot_mapping: t.slot_mapping.device("slot_mapping")?,
        seq_slot: t.seq_slot.device("seq_slot")?,
        position: t.position.device("position")?,
    };
    g.append(&ex.cfg, &ex.layout, &layer, &tokens, stream)
}

#[allow(clippy::too_many_arguments)] // one descriptor per kind of memory the stage touches
pub(super) fn select(
    ex: &Executor,
    g: &GpuContext,
    pools: LayerView,
    b: &Batch,
    indices: MemMut<i32>,
    counts: MemMut<i32>,
    ws: Workspace,
    stream: Stream,
) -> Result<()> {
    let layer = device_view(pools)?;
    let batch = device_batch(b)?;
    let sel = selection_out(indices, counts)?;
    g.select(&ex.cfg, &ex.layout, &layer, &batch, sel, device_ws(ws), stream)
}

#[allow(clippy::too_many_arguments)] // one descriptor per kind of memory the stage touches
pub(super) fn attend(
    ex: &Executor,
    g: &GpuContext,
    pools: LayerView,
    b: &Batch,
    sel: Selected,
    out: MemMut<u8>,
    ws: Workspace,
    stream: Stream,
) -> Result<()> {
    let layer = device_view(pools)?;
    let batch = device_batch(b)?;
    let out = out.device("out")?;
    let ws = device_ws(ws);
    match sel {
        Selected::All => g.attend_dense(&ex.cfg, &ex.layout, &layer, &batch, out, ws, b.live_max, stream),
        Selected::Given { indices, counts } => {
            let sel = DevSelection {
                indices: indices.device("indices")?,
                counts: counts.device("counts")?,
            };
            g.attend(&ex.cfg, &ex.layout, &layer, &batch, sel, out, ws, stream)
        }
    }
}

/// Select into `sel`, then attend over it, as one call: the attend's splits of kept dense
/// entries start while the selection's last kernel runs (`Predecessor::Select`).
#[allow(clippy::too_many_arguments)] // one descriptor per kind of memory the stages touch
fn select_attend_dev(
    ex: &Executor,
    g: &GpuContext,
    layer: &DevLayer,
    batch: &DevBatch,
    sel: DevSelection,
    out: u64,
    ws: DevWorkspace,
    stream: Stream,
) -> Result<()> {
    let (cfg, lay) = (&ex.cfg, &ex.layout);
    g.one_call(|| {
        g.select(cfg, lay, layer, batch, sel, ws, stream)?;
        g.attend_after(cfg, lay, layer, batch, sel, out, ws, stream, Predecessor::Select)
    })
}

#[allow(clippy::too_many_arguments)] // one descriptor per kind of memory the stages touch
pub(super) fn select_attend(
    ex: &Executor,
    g: &GpuContext,
    pools: LayerView,
    b: &Batch,
    indices: MemMut<i32>,
    counts: MemMut<i32>,
    out: MemMut<u8>,
    ws: Workspace,
    stream: Stream,
) -> Result<()> {
    let layer = device_view(pools)?;
    let batch = device_batch(b)?;
    let sel = selection_out(indices, counts)?;
    let out = out.device("out")?;
    select_attend_dev(ex, g, &layer, &batch, sel, out, device_ws(ws), stream)
}

/// The decode workspace of `rows` query rows, checked: the stage workspace (its prefix) and
/// the selection the decode keeps after it.
fn decode_ws(ex: &Executor, ws: Workspace, rows: u32) -> Result<(DevWorkspace, DevSelection)> {
    let need = ex.decode_workspace(rows);
    ensure!(
        ws.bytes >= need.total,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "workspace_bytes = {} is smaller than the {} bytes decode needs",
        ws.bytes,
        need.total
    );
    ensure!(ws.ptr != 0, SIKV_ERR_NULL_POINTER, "`workspace` is NULL");
    let stage = DevWorkspace {
        ptr: ws.ptr,
        bytes: need.indices,
    };
    let sel = DevSelection {
        indices: ws.ptr + need.indices as u64,
        counts: ws.ptr + need.counts as u64,
    };
    Ok((stage, sel))
}

/// The device batch of a multi-row call: `b` with the rows' offsets (checked by the kernels)
/// and the configured row selection.
fn rows_batch(ex: &Executor, b: &Batch, offsets: Mem<i32>, n_rows: u32) -> Result<DevBatch> {
    let mut batch = device_batch(b)?;
    batch.rows = Some(DevRows {
        offsets: offsets.device("row_offsets")?,
        n: n_rows,
        mean: ex.cfg.row_selection == RowSelection::MeanQuery,
    });
    Ok(batch)
}

/// Select + attend for several query rows per sequence, the selection in the workspace
/// (Executor::decode_rows).
#[allow(clippy::too_many_arguments)] // decode's descriptors plus the rows
pub(super) fn decode_rows(
    ex: &Executor,
    g: &GpuContext,
    pools: LayerView,
    b: &Batch,
    offsets: Mem<i32>,
    n_rows: u32,
    out: MemMut<u8>,
    ws: Workspace,
    stream: Stream,
) -> Result<()> {
    let (stage_ws, sel) = decode_ws(ex, ws, n_rows)?;
    let batch = rows_batch(ex, b, offsets, n_rows)?;
    let layer = device_view(pools)?;
    let out = out.device("out")?;
    select_attend_dev(ex, g, &layer, &batch, sel, out, stage_ws, stream)
}

/// Select + attend for several query rows per sequence into a given selection
/// (Executor::select_attend_rows).
#[allow(clippy::too_many_arguments)] // decode_rows' descriptors plus the selection
pub(super) fn select_attend_rows(
    ex: &Executor,
    g: &GpuContext,
    pools: LayerView,
    b: &Batch,
    offsets: Mem<i32>,
    n_rows: u32,
    indices: MemMut<i32>,
    counts: MemMut<i32>,
    out: MemMut<u8>,
    ws: Workspace,
    stream: Stream,
) -> Result<()> {
    let batch = rows_batch(ex, b, offsets, n_rows)?;
    let layer = device_view(pools)?;
    let sel = selection_out(indices, counts)?;
    let out = out.device("out")?;
    select_attend_dev(ex, g, &layer, &batch, sel, out, device_ws(ws), stream)
}

#[allow(clippy::too_many_arguments)] // one descriptor per kind of memory the stage touches
pub(super) fn decode(
    ex: &Executor,
    g: &GpuContext,
    pools: LayerView,
    b: &Batch,
    route: Route,
    out: MemMut<u8>,
    ws: Workspace,
    stream: Stream,
) -> Result<()> {
    // The stage workspace is the prefix before the selection.
    let (stage_ws, sel) = decode_ws(ex, ws, b.table.batch())?;
    let layer = device_view(pools)?;
    let batch = device_batch(b)?;
    let out = out.device("out")?;
    let (cfg, lay) = (&ex.cfg, &ex.layout);
    let sparse = || select_attend_dev(ex, g, &layer, &batch, sel, out, stage_ws, stream);
    let dense = || g.attend_dense(cfg, lay, &layer, &batch, out, stage_ws, None, stream);
    match route {
        Route::Sparse => sparse(),
        Route::Dense => dense(),
        Route::Live(most) => g.decode_routed(cfg, lay, &layer, &batch, sel, out, stage_ws, most, stream),
    }
}

pub(super) fn reset_sequence(
    ex: &Executor,
    g: &GpuContext,
    state: MemMut<u8>,
    seq_slot: u32,
    stream: Stream,
) -> Result<()> {
    let layer = DevLayer {
        planes: [0; SIKV_NUM_PLANES],
        state: state.device("pools.state")?,
    };
    g.reset_sequence(&ex.cfg, &ex.layout, &layer, seq_slot, stream)
}
