//! The CUDA implementation of the executor: device descriptors into the launchers of
//! [`crate::gpu::GpuContext`], which check pointers, alignment and workspace size.

use super::{Batch, Executor, LayerPools, LayerView, MemMut, NewTokens, Prompt, Selected, Stream, Table, Workspace};
use crate::ensure;
use crate::gpu::{DevLayer, DevPageTable, GpuContext};
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
fn device_batch(b: &Batch) -> Result<(DevPageTable, u64, u64)> {
    let t = match &b.table {
        Table::Device(t) => *t,
        Table::Host(_) => return Err(Error::invalid("`page_table` must be device memory on a CUDA device")),
    };
    Ok((t, b.seq_slot.device("seq_slot")?, b.q.device("q")?))
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
    g.calibrate(
        &ex.cfg,
        &ex.layout,
        &layer,
        p.seq_slot,
        p.n_tokens,
        p.k.device("k")?,
        p.v.device("v")?,
        p.n_query,
        p.q_tail.device("q_tail")?,
        p.slot_mapping.device("slot_mapping")?,
        ws.ptr,
        ws.bytes,
        stream,
    )
}

pub(super) fn append(ex: &Executor, g: &GpuContext, pools: LayerPools, t: &NewTokens, stream: Stream) -> Result<()> {
    let layer = device_pools(pools)?;
    g.append(
        &ex.cfg,
        &ex.layout,
        &layer,
        t.n_tokens,
        t.k.device("k")?,
        t.v.device("v")?,
        t.slot_mapping.device("slot_mapping")?,
        t.seq_slot.device("seq_slot")?,
        t.position.device("position")?,
        stream,
    )
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
    let (t, ss, q) = device_batch(b)?;
    g.select(
        &ex.cfg,
        &ex.layout,
        &layer,
        &t,
        ss,
        q,
        indices.device("indices")?,
        counts.device("counts")?,
        ws.ptr,
        ws.bytes,
        stream,
    )
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
    let (t, ss, q) = device_batch(b)?;
    let out = out.device("out")?;
    match sel {
        Selected::All => g.attend_dense(&ex.cfg, &ex.layout, &layer, &t, ss, q, out, ws.ptr, ws.bytes, stream),
        Selected::Given { indices, counts } => g.attend(
            &ex.cfg,
            &ex.layout,
            &layer,
            &t,
            ss,
            q,
            indices.device("indices")?,
            counts.device("counts")?,
            out,
            ws.ptr,
            ws.bytes,
            stream,
        ),
    }
}

#[allow(clippy::too_many_arguments)] // one descriptor per kind of memory the stage touches
pub(super) fn decode(
    ex: &Executor,
    g: &GpuContext,
    pools: LayerView,
    b: &Batch,
    dense: bool,
    out: MemMut<u8>,
    ws: Workspace,
    stream: Stream,
) -> Result<()> {
    let need = ex.decode_workspace(b.table.batch());
    ensure!(
        ws.bytes >= need.total,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "workspace_bytes = {} is smaller than the {} bytes decode needs",
        ws.bytes,
        need.total
    );
    ensure!(ws.ptr != 0, SIKV_ERR_NULL_POINTER, "`workspace` is NULL");
    // The stage workspace is the prefix before the selection.
    let stage_ws = Workspace {
        ptr: ws.ptr,
        bytes: need.indices,
    };
    let layer = device_view(pools)?;
    let (t, ss, q) = device_batch(b)?;
    let out = out.device("out")?;
    if dense {
        return g.attend_dense(
            &ex.cfg,
            &ex.layout,
            &layer,
            &t,
            ss,
            q,
            out,
            stage_ws.ptr,
            stage_ws.bytes,
            stream,
        );
    }
    let (idx, cnt) = (ws.ptr + need.indices as u64, ws.ptr + need.counts as u64);
    g.select(
        &ex.cfg,
        &ex.layout,
        &layer,
        &t,
        ss,
        q,
        idx,
        cnt,
        stage_ws.ptr,
        stage_ws.bytes,
        stream,
    )?;
    g.attend(
        &ex.cfg,
        &ex.layout,
        &layer,
        &t,
        ss,
        q,
        idx,
        cnt,
        out,
        stage_ws.ptr,
        stage_ws.bytes,
        stream,
    )
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
