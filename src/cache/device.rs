//! The managed cache's memory on a CUDA device: pools (owned or borrowed), the workspace, and
//! the device copies of each call's metadata (page table, slot mappings, a caller's selection).
//!
//! Metadata goes up in one copy per call from a page-locked ring ([`UploadRing`]), so a call
//! never waits for the stream; a page table identical to the last one uploaded (every layer
//! of a decode step) is not sent again. The device regions are reused call after call, so the
//! calls on one cache must be ordered on one stream (or by the caller).
//!
//! Host activations are accepted as a convenience for tools and tests: they are staged through
//! a device buffer allocated on first use, and a host output is read back synchronously.
//! Engines pass device pointers and get neither.

use super::store::ForkCopies;
use super::{Activations, Fnv, Output, OwnedPageTable, Pools};
use crate::config::CacheConfig;
use crate::exec::{
    Batch, Executor, LayerPools, LayerView, Mem, MemMut, NewTokens, Prompt, Selected, Stream, Table, Workspace,
};
use crate::gpu::upload::UploadRing;
use crate::gpu::{DevLayer, DevPageTable, DeviceBuffer, GpuContext};
use crate::layout::{Layout, SIKV_NUM_PLANES};
use crate::status::{Error, Result};

/// Device memory the cache owns or borrows.
pub enum DevStore {
    Owned(DeviceBuffer),
    Borrowed { ptr: u64, bytes: usize },
}

impl DevStore {
    pub fn ptr(&self) -> u64 {
        match self {
            DevStore::Owned(b) => b.ptr(),
            DevStore::Borrowed { ptr, .. } => *ptr,
        }
    }
    pub fn bytes(&self) -> usize {
        match self {
            DevStore::Owned(b) => b.bytes(),
            DevStore::Borrowed { bytes, .. } => *bytes,
        }
    }
}

/// Parts inside a region start on this boundary (kernels read them with up to 16-byte loads).
const PART_ALIGN: usize = 16;

fn part(bytes: usize) -> usize {
    bytes.div_ceil(PART_ALIGN) * PART_ALIGN
}

/// Where the parts of one upload go: byte offsets from the region's start, and the total.
struct Packing<const N: usize> {
    at: [usize; N],
    total: usize,
}

impl<const N: usize> Packing<N> {
    fn new(sizes: [usize; N]) -> Packing<N> {
        let mut at = [0; N];
        let mut off = 0;
        for (a, s) in at.iter_mut().zip(sizes) {
            *a = off;
            off += part(s);
        }
        Packing { at, total: off }
    }
}

fn put_i32s(dst: &mut [u8], at: usize, v: &[i32]) {
    for (i, x) in v.iter().enumerate() {
        dst[at + 4 * i..at + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
}

fn put_i64s(dst: &mut [u8], at: usize, v: &[i64]) {
    for (i, x) in v.iter().enumerate() {
        dst[at + 8 * i..at + 8 * i + 8].copy_from_slice(&x.to_le_bytes());
    }
}

/// The three metadata regions of the device buffer, each sized from the declared bounds.
struct Regions {
    table: usize,
    tokens: usize,
    selection: usize,
    table_bytes: usize,
    total: usize,
}

impl Regions {
    fn new(cfg: &CacheConfig) -> Regions {
        let b = cfg.max_batch as usize;
        let toks = cfg.max_append_tokens.max(cfg.max_seq_len) as usize;
        let rows = b * cfg.num_kv_heads as usize;
        // indptr, page indices, last_page_len, seq_slot, the query rows' offsets.
        let table_bytes = 2 * part(4 * (b + 1)) + part(4 * b * cfg.pages_per_seq_max() as usize) + 2 * part(4 * b);
        let tokens = part(8 * toks) + 2 * part(4 * toks);
        let selection = part(4 * rows * cfg.budget.max as usize) + part(4 * rows);
        let r = |x: usize| x.div_ceil(256) * 256;
        Regions {
            table: 0,
            tokens: r(table_bytes),
            selection: r(table_bytes) + r(tokens),
            table_bytes,
            total: r(table_bytes) + r(tokens) + r(selection),
        }
    }
    fn largest(&self) -> usize {
        self.tokens
            .max(self.selection - self.tokens)
            .max(self.total - self.selection)
    }
}

pub struct DeviceStore {
    ctx: GpuContext,
    planes: DevStore,
    state: DevStore,
    workspace: DevStore,
    meta: DeviceBuffer,
    regions: Regions,
    ring: UploadRing,
    /// The bytes of the last page-table upload (capacity reserved at create time).
    last_table: Vec<u8>,
    /// attend_rows' row offsets, refilled by each call (capacity reserved at create time).
    row_offsets: Vec<i32>,
    staging: Option<DeviceBuffer>,
}

/// Staged inputs start at multiples of this many bytes in the staging buffer.
const STAGING_ALIGN: usize = 256;

/// The staging bytes `len` bytes take: rounded up to STAGING_ALIGN.
fn staged_len(len: usize) -> usize {
    len.div_ceil(STAGING_ALIGN) * STAGING_ALIGN
}

/// The staging bytes an input takes: staged_len of its length on the host, none on the device.
fn staged_bytes(a: &Activations) -> usize {
    match a {
        Mem::Host(b) => staged_len(b.len()),
        Mem::Device(_) => 0,
    }
}

impl DeviceStore {
    pub fn create(exec: &Executor, pools: Option<Pools>) -> Result<DeviceStore> {
        let (cfg, layout) = (exec.cfg(), exec.layout());
        let ctx = exec.gpu().expect("a device store needs a CUDA executor").clone();
        let ws_need = exec.stage_workspace_bytes(cfg.max_batch);
        let (planes, state, workspace) = match pools {
            None => {
                // Owned pools start zeroed (once, at create time): the checksum reads whole pools,
                // and bytes no call has written yet would otherwise differ between two caches
                // fed the same calls (compute-sanitizer initcheck flagged the read).
                let (planes, state) = (
                    ctx.alloc(layout.total_plane_bytes())?,
                    ctx.alloc(layout.total_state_bytes())?,
                );
                let null = std::ptr::null_mut();
                ctx.memset_async(planes.ptr(), 0, layout.total_plane_bytes(), null)?;
                ctx.memset_async(state.ptr(), 0, layout.total_state_bytes(), null)?;
                ctx.synchronize(null)?;
                (
                    DevStore::Owned(planes),
                    DevStore::Owned(state),
                    DevStore::Owned(ctx.alloc(ws_need)?),
                )
            }
            Some(Pools::Device {
                planes,
                planes_bytes,
                state,
                state_bytes,
                workspace,
                workspace_bytes,
            }) => {
                let check = |have: usize, need: usize, name: &str| -> Result<()> {
                    crate::ensure!(
                        have >= need,
                        SIKV_ERR_BUFFER_TOO_SMALL,
                        "pools.{name} = {have} is smaller than the {need} bytes the layout needs"
                    );
                    Ok(())
                };
                check(planes_bytes, layout.total_plane_bytes(), "planes_bytes")?;
                check(state_bytes, layout.total_state_bytes(), "state_bytes")?;
                check(workspace_bytes, ws_need, "workspace_bytes")?;
                crate::ensure!(workspace != 0, SIKV_ERR_NULL_POINTER, "`pools.workspace` is NULL");
                for (p, name) in [(planes, "planes"), (state, "state"), (workspace, "workspace")] {
                    crate::ensure!(
                        p % 256 == 0,
                        SIKV_ERR_MISALIGNED,
                        "`pools.{name}` is not 256-byte aligned"
                    );
                }
                (
                    DevStore::Borrowed {
                        ptr: planes,
                        bytes: planes_bytes,
                    },
                    DevStore::Borrowed {
                        ptr: state,
                        bytes: state_bytes,
                    },
                    DevStore::Borrowed {
                        ptr: workspace,
                        bytes: workspace_bytes,
                    },
                )
            }
            Some(Pools::Host { .. }) => {
                return Err(Error::invalid(
                    "host pools were given to a cache running on a CUDA device",
                ))
            }
        };
        let regions = Regions::new(cfg);
        let meta = ctx.alloc(regions.total)?;
        // Room for several calls' metadata in flight before the host has to wait.
        let ring = UploadRing::new(&ctx, (4 << 20).max(4 * regions.largest()))?;
        let last_table = Vec::with_capacity(regions.table_bytes);
        ctx.memset_async(state.ptr(), 0, layout.total_state_bytes(), std::ptr::null_mut())?;
        ctx.synchronize(std::ptr::null_mut())?;
        Ok(DeviceStore {
            ctx,
            planes,
            state,
            workspace,
            meta,
            regions,
            ring,
            last_table,
            row_offsets: Vec::with_capacity(cfg.max_batch as usize + 1),
            staging: None,
        })
    }

    fn layer(&self, layout: &Layout, layer: u32) -> DevLayer {
        let base = self.planes.ptr() + (layer as usize * layout.layer_plane_bytes) as u64;
        let mut planes = [0u64; SIKV_NUM_PLANES];
        for (p, x) in planes.iter_mut().enumerate() {
            if layout.format.has(p) {
                *x = base + layout.plane_offset[p] as u64;
            }
        }
        DevLayer {
            planes,
            state: self.state.ptr() + (layer as usize * layout.layer_state_bytes) as u64,
        }
    }

    fn workspace(&self) -> Workspace {
        Workspace {
            ptr: self.workspace.ptr(),
            bytes: self.workspace.bytes(),
        }
    }

    /// Grows the staging buffer to at least `bytes` (nothing for 0, or when it is that large).
    fn reserve_staging(&mut self, bytes: usize) -> Result<()> {
        if bytes > 0 && self.staging.as_ref().map(|s| s.bytes() < bytes).unwrap_or(true) {
            self.staging = Some(self.ctx.alloc(bytes)?);
        }
        Ok(())
    }

    /// Device addresses for `acts`: device pointers pass through, host bytes are staged from
    /// the start of the staging buffer, each taking staged_bytes.
    fn device_inputs<const N: usize>(&mut self, acts: [Activations; N], stream: Stream) -> Result<[u64; N]> {
        let host: usize = acts.iter().map(staged_bytes).sum();
        self.reserve_staging(host)?;
        let mut off = 0u64;
        let mut out = [0u64; N];
        for (o, a) in out.iter_mut().zip(acts) {
            *o = match a {
                Mem::Device(p) => p,
                Mem::Host(b) => {
                    let dst = self.staging.as_ref().expect("staging allocated above").ptr() + off;
                    self.ctx.copy_htod_async(dst, b, stream)?;
                    off += staged_bytes(&a) as u64;
                    dst
                }
            };
        }
        Ok(out)
    }

    /// Uploads a batch's page table and seq slots (skipped when the device holds them already).
    fn upload_table(&mut self, t: &OwnedPageTable, seq_slot: &[i32], stream: Stream) -> Result<(DevPageTable, u64)> {
        let (table, ss, _) = self.upload_table_rows(t, seq_slot, &[], stream)?;
        Ok((table, ss))
    }

    /// upload_table with the query rows' offsets (`row_offsets`, empty for none) after the seq
    /// slots; returns their address too.
    fn upload_table_rows(
        &mut self,
        t: &OwnedPageTable,
        seq_slot: &[i32],
        row_offsets: &[i32],
        stream: Stream,
    ) -> Result<(DevPageTable, u64, u64)> {
        let b = seq_slot.len();
        let pk = Packing::new([4 * (b + 1), 4 * t.indices.len(), 4 * b, 4 * b, 4 * row_offsets.len()]);
        let base = self.meta.ptr() + self.regions.table as u64;
        let last = &mut self.last_table;
        self.ring.upload(base, pk.total, stream, |bytes| {
            bytes.fill(0); // padding too, so equal tables compare equal
            put_i32s(bytes, pk.at[0], &t.indptr);
            put_i32s(bytes, pk.at[1], &t.indices);
            put_i32s(bytes, pk.at[2], &t.last_page_len);
            put_i32s(bytes, pk.at[3], seq_slot);
            put_i32s(bytes, pk.at[4], row_offsets);
            if last.as_slice() == &bytes[..] {
                return false;
            }
            last.clear();
            last.extend_from_slice(bytes);
            true
        })?;
        let at = |i: usize| base + pk.at[i] as u64;
        let table = DevPageTable {
            indptr: at(0),
            indices: at(1),
            last_page_len: at(2),
            batch: b as u32,
        };
        Ok((table, at(3), at(4)))
    }

    #[allow(clippy::too_many_arguments)] // the stage's prompt, unpacked by the cache
    pub fn calibrate(
        &mut self,
        exec: &Executor,
        layer: u32,
        slot: u32,
        n: u32,
        k: Activations,
        v: Activations,
        nq: u32,
        q_tail: Activations,
        slot_mapping: &[i64],
        stream: Stream,
    ) -> Result<()> {
        let [k, v, q] = self.device_inputs([k, v, q_tail], stream)?;
        let sm = self.meta.ptr() + self.regions.tokens as u64;
        self.ring.upload(sm, 8 * slot_mapping.len(), stream, |bytes| {
            put_i64s(bytes, 0, slot_mapping);
            true
        })?;
        let prompt = Prompt {
            seq_slot: slot,
            n_tokens: n,
            k: Mem::Device(k),
            v: Mem::Device(v),
            n_query: nq,
            q_tail: Mem::Device(q),
            slot_mapping: Mem::Device(sm),
        };
        let pools = LayerPools::Device(self.layer(exec.layout(), layer));
        exec.calibrate(pools, &prompt, self.workspace(), stream)
    }

    #[allow(clippy::too_many_arguments)] // the stage's tokens, unpacked by the cache
    pub fn append(
        &mut self,
        exec: &Executor,
        layer: u32,
        k: Activations,
        v: Activations,
        slot_mapping: &[i64],
        seq_slot: &[i32],
        position: &[i32],
        stream: Stream,
    ) -> Result<()> {
        let [k, v] = self.device_inputs([k, v], stream)?;
        let n = slot_mapping.len();
        let pk = Packing::new([8 * n, 4 * n, 4 * n]);
        let base = self.meta.ptr() + self.regions.tokens as u64;
        self.ring.upload(base, pk.total, stream, |bytes| {
            put_i64s(bytes, pk.at[0], slot_mapping);
            put_i32s(bytes, pk.at[1], seq_slot);
            put_i32s(bytes, pk.at[2], position);
            true
        })?;
        let at = |i: usize| base + pk.at[i] as u64;
        let tokens = NewTokens {
            n_tokens: n as u32,
            k: Mem::Device(k),
            v: Mem::Device(v),
            slot_mapping: Mem::Device(at(0)),
            seq_slot: Mem::Device(at(1)),
            position: Mem::Device(at(2)),
        };
        let pools = LayerPools::Device(self.layer(exec.layout(), layer));
        exec.append(pools, &tokens, stream)
    }

    /// The selection into host arrays (synchronises: telemetry and tools).
    #[allow(clippy::too_many_arguments)] // the batch, unpacked by the cache
    pub fn select(
        &mut self,
        exec: &Executor,
        layer: u32,
        table: &OwnedPageTable,
        seq_slot: &[i32],
        q: Activations,
        indices: &mut [i32],
        counts: &mut [i32],
        stream: Stream,
    ) -> Result<()> {
        let [q] = self.device_inputs([q], stream)?;
        let (t, ss) = self.upload_table(table, seq_slot, stream)?;
        let rows = seq_slot.len() * exec.cfg().num_kv_heads as usize;
        let pk = Packing::new([4 * rows * exec.cfg().budget.max as usize, 4 * rows]);
        let base = self.meta.ptr() + self.regions.selection as u64;
        let (si, sc) = (base + pk.at[0] as u64, base + pk.at[1] as u64);
        let batch = Batch {
            table: Table::Device(t),
            seq_slot: Mem::Device(ss),
            q: Mem::Device(q),
            live_max: None,
        };
        let pools = LayerView::Device(self.layer(exec.layout(), layer));
        exec.select(
            pools,
            &batch,
            MemMut::Device(si),
            MemMut::Device(sc),
            self.workspace(),
            stream,
        )?;
        self.ctx.synchronize(stream)?;
        self.read_i32s(indices, si)?;
        self.read_i32s(counts, sc)
    }

    /// Copies `dst.len()` int32 values from device address `src` (after a synchronize).
    fn read_i32s(&self, dst: &mut [i32], src: u64) -> Result<()> {
        let mut buf = vec![0u8; 4 * dst.len()];
        self.ctx.copy_dtoh(&mut buf, src)?;
        for (i, x) in dst.iter_mut().enumerate() {
            *x = crate::numeric::read_i32(&buf, i);
        }
        Ok(())
    }

    /// The device addresses of an attend's query and output (`out_bytes` of it, checked for a
    /// host output): device pointers pass through; host ones are staged, a host output being
    /// written by the kernels into the staging buffer and read back by [`read_back`](Self::read_back).
    fn attend_io(&mut self, q: Activations, out: &Output, out_bytes: usize, stream: Stream) -> Result<(u64, u64)> {
        match out {
            MemMut::Device(p) => Ok((self.device_inputs([q], stream)?[0], *p)),
            MemMut::Host(h) => {
                crate::ensure!(
                    h.len() >= out_bytes,
                    SIKV_ERR_BUFFER_TOO_SMALL,
                    "`out` holds {} bytes, {out_bytes} needed",
                    h.len()
                );
                // The output's staging follows q's, zeroed on the device: no host buffer per call.
                let q_staged = staged_bytes(&q);
                self.reserve_staging(q_staged + staged_len(out_bytes))?;
                let [qd] = self.device_inputs([q], stream)?;
                let od = self.staging.as_ref().expect("staging reserved above").ptr() + q_staged as u64;
                self.ctx.memset_async(od, 0, out_bytes, stream)?;
                Ok((qd, od))
            }
        }
    }

    /// Copies a host output back from its staging address `od` (after a synchronize); nothing
    /// for a device output.
    fn read_back(&self, out: Output, od: u64, out_bytes: usize, stream: Stream) -> Result<()> {
        if let MemMut::Host(h) = out {
            self.ctx.synchronize(stream)?;
            self.ctx.copy_dtoh(&mut h[..out_bytes], od)?;
        }
        Ok(())
    }

    /// Decode attention: the library's selection (`sel = None`), a caller's host selection,
    /// or the dense decode.
    #[allow(clippy::too_many_arguments)] // the batch, unpacked by the cache
    pub fn attend(
        &mut self,
        exec: &Executor,
        layer: u32,
        table: &OwnedPageTable,
        seq_slot: &[i32],
        q: Activations,
        out: Output,
        sel: super::Selection,
        stream: Stream,
    ) -> Result<()> {
        let cfg = exec.cfg();
        let b = seq_slot.len();
        let out_bytes = b * (cfg.num_q_heads * cfg.head_dim) as usize * cfg.dtype.size();
        let (qd, od) = self.attend_io(q, &out, out_bytes, stream)?;
        let (t, ss) = self.upload_table(table, seq_slot, stream)?;
        let batch = Batch {
            table: Table::Device(t),
            seq_slot: Mem::Device(ss),
            q: Mem::Device(qd),
            live_max: Some(table.longest(cfg.page_size)),
        };
        let pools = LayerView::Device(self.layer(exec.layout(), layer));
        let ws = self.workspace();
        match sel {
            super::Selection::All => exec.attend(pools, &batch, Selected::All, MemMut::Device(od), ws, stream)?,
            super::Selection::Select => {
                let rows = b * cfg.num_kv_heads as usize;
                let pk = Packing::new([4 * rows * cfg.budget.max as usize, 4 * rows]);
                let base = self.meta.ptr() + self.regions.selection as u64;
                let (si, sc) = (base + pk.at[0] as u64, base + pk.at[1] as u64);
                exec.select_attend(
                    pools,
                    &batch,
                    MemMut::Device(si),
                    MemMut::Device(sc),
                    MemMut::Device(od),
                    ws,
                    stream,
                )?;
            }
            super::Selection::Given { indices, counts } => {
                let pk = Packing::new([4 * indices.len(), 4 * counts.len()]);
                let base = self.meta.ptr() + self.regions.selection as u64;
                self.ring.upload(base, pk.total, stream, |bytes| {
                    put_i32s(bytes, pk.at[0], indices);
                    put_i32s(bytes, pk.at[1], counts);
                    true
                })?;
                let sel = Selected::Given {
                    indices: Mem::Device(base + pk.at[0] as u64),
                    counts: Mem::Device(base + pk.at[1] as u64),
                };
                exec.attend(pools, &batch, sel, MemMut::Device(od), ws, stream)?;
            }
        }
        self.read_back(out, od, out_bytes, stream)
    }

    /// Attention for several query rows per sequence (`rows[i]` for sequence i), selecting per
    /// row; the selection goes to the selection region, so at most max_batch rows in all
    /// (`Cache::attend_rows` splits larger calls into groups of whole sequences).
    #[allow(clippy::too_many_arguments)] // the batch and its rows, unpacked by the cache
    pub fn attend_rows(
        &mut self,
        exec: &Executor,
        layer: u32,
        table: &OwnedPageTable,
        seq_slot: &[i32],
        q: Activations,
        rows: &[u32],
        out: Output,
        stream: Stream,
    ) -> Result<()> {
        let cfg = exec.cfg();
        let total = crate::cpu::rows_total(rows, seq_slot.len())?;
        crate::ensure!(
            total <= cfg.max_batch as usize,
            SIKV_ERR_OUT_OF_BOUNDS,
            "{total} query rows in all exceed max_batch ({}): a CUDA cache's workspace and selection hold max_batch query rows",
            cfg.max_batch
        );
        let out_bytes = total * (cfg.num_q_heads * cfg.head_dim) as usize * cfg.dtype.size();
        let (qd, od) = self.attend_io(q, &out, out_bytes, stream)?;
        let mut offsets = std::mem::take(&mut self.row_offsets);
        offsets.clear();
        offsets.push(0i32);
        for &n in rows {
            offsets.push(offsets[offsets.len() - 1] + n as i32);
        }
        let uploaded = self.upload_table_rows(table, seq_slot, &offsets, stream);
        self.row_offsets = offsets;
        let (t, ss, off) = uploaded?;
        let batch = Batch {
            table: Table::Device(t),
            seq_slot: Mem::Device(ss),
            q: Mem::Device(qd),
            live_max: None,
        };
        let pools = LayerView::Device(self.layer(exec.layout(), layer));
        let sel_rows = total * cfg.num_kv_heads as usize;
        let pk = Packing::new([4 * sel_rows * cfg.budget.max as usize, 4 * sel_rows]);
        let base = self.meta.ptr() + self.regions.selection as u64;
        exec.select_attend_rows(
            pools,
            &batch,
            Mem::Device(off),
            total as u32,
            MemMut::Device(base + pk.at[0] as u64),
            MemMut::Device(base + pk.at[1] as u64),
            MemMut::Device(od),
            self.workspace(),
            stream,
        )?;
        self.read_back(out, od, out_bytes, stream)
    }

    pub fn reset_slot(&mut self, exec: &Executor, slot: u32) -> Result<()> {
        let layout = exec.layout();
        for l in 0..layout.num_layers {
            let state = self.layer(layout, l as u32).state;
            exec.reset_sequence(MemMut::Device(state), slot, std::ptr::null_mut())?;
        }
        self.ctx.synchronize(std::ptr::null_mut())
    }

    /// A fork's copies, device to device (fork is not a hot path: it waits for the device
    /// before and after).
    pub fn copy_seq(&mut self, copies: &ForkCopies) -> Result<()> {
        let null = std::ptr::null_mut();
        self.ctx.synchronize(null)?;
        for (base, list) in [(self.state.ptr(), &copies.state), (self.planes.ptr(), &copies.planes)] {
            for &(from, to, len) in list {
                self.ctx
                    .copy_dtod_async(base + to as u64, base + from as u64, len, null)?;
            }
        }
        self.ctx.synchronize(null)
    }

    pub fn synchronize(&self, stream: Stream) -> Result<()> {
        self.ctx.synchronize(stream)
    }

    pub fn read_state(&self, layout: &Layout, layer: u32, slot: u32, head: u32) -> Result<Vec<u8>> {
        self.ctx.synchronize(std::ptr::null_mut())?;
        let at = self.state.ptr()
            + (layer as usize * layout.layer_state_bytes + layout.state_offset(slot as usize, head as usize)) as u64;
        let mut rec = vec![0u8; layout.state.bytes];
        self.ctx.copy_dtoh(&mut rec, at)?;
        Ok(rec)
    }

    pub fn hash_pools(&self, layout: &Layout, h: &mut Fnv) -> Result<()> {
        self.ctx.synchronize(std::ptr::null_mut())?;
        let chunk = 64 << 20;
        for (base, total) in [
            (self.planes.ptr(), layout.total_plane_bytes()),
            (self.state.ptr(), layout.total_state_bytes()),
        ] {
            let mut off = 0usize;
            let mut buf = vec![0u8; chunk.min(total.max(1))];
            while off < total {
                let n = chunk.min(total - off);
                self.ctx.copy_dtoh(&mut buf[..n], base + off as u64)?;
                h.write(&buf[..n]);
                off += n;
            }
        }
        Ok(())
    }
}
