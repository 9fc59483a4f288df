//! The managed cache on a CUDA device: pools in device memory (owned or borrowed), a metadata
//! buffer for the host-built page tables and slot mappings, and the stage launchers.
//!
//! Metadata goes up with asynchronous copies on the caller's stream into one buffer sized from
//! the declared bounds, so calls on one cache must be ordered on one stream (or by the caller).
//! Host activations (`Activations::Host`) are accepted as a convenience for tools and tests:
//! they are staged through a device buffer allocated on first use, and a host output is read
//! back synchronously. Engines pass device pointers and get neither.

use super::backend::{Activations, Output, Selection};
use super::{Fnv, OwnedPageTable, Stream};
use crate::config::CacheConfig;
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

/// Offsets of the metadata buffer's regions (bytes, 256-aligned).
struct MetaLayout {
    indptr: usize,
    indices: usize,
    last_page_len: usize,
    seq_slot: usize,
    position: usize,
    slot_mapping: usize,
    sel_indices: usize,
    sel_counts: usize,
    total: usize,
}

impl MetaLayout {
    fn new(cfg: &CacheConfig) -> MetaLayout {
        let b = cfg.max_batch as usize;
        let toks = cfg.max_append_tokens.max(cfg.max_seq_len) as usize;
        let rows = b * cfg.num_kv_heads as usize;
        let mut off = 0usize;
        let mut take = |bytes: usize| {
            let at = off;
            off = (off + bytes.max(1)).div_ceil(256) * 256;
            at
        };
        MetaLayout {
            indptr: take(4 * (b + 1)),
            indices: take(4 * b * cfg.pages_per_seq_max() as usize),
            last_page_len: take(4 * b),
            seq_slot: take(4 * toks.max(b)),
            position: take(4 * toks),
            slot_mapping: take(8 * toks),
            sel_indices: take(4 * rows * cfg.budget.max as usize),
            sel_counts: take(4 * rows),
            total: off,
        }
    }
}

pub struct DeviceBackend {
    ctx: GpuContext,
    planes: DevStore,
    state: DevStore,
    workspace: DevStore,
    meta: DeviceBuffer,
    meta_layout: MetaLayout,
    staging: Option<DeviceBuffer>,
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl DeviceBackend {
    pub fn create(cfg: &CacheConfig, layout: &Layout, pools: Option<super::Pools>) -> Result<DeviceBackend> {
        let ctx = GpuContext::new(cfg, layout)?;
        let ws_need = GpuContext::workspace_bytes(cfg, layout, cfg.max_batch);
        let (planes, state, workspace) = match pools {
            None => (
                DevStore::Owned(ctx.alloc(layout.total_plane_bytes())?),
                DevStore::Owned(ctx.alloc(layout.total_state_bytes())?),
                DevStore::Owned(ctx.alloc(ws_need)?),
            ),
            Some(super::Pools::Device {
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
            Some(super::Pools::Host { .. }) => {
                return Err(Error::invalid(
                    "host pools were given to a cache running on a CUDA device",
                ))
            }
        };
        let meta_layout = MetaLayout::new(cfg);
        let meta = ctx.alloc(meta_layout.total)?;
        ctx.memset_async(state.ptr(), 0, layout.total_state_bytes(), std::ptr::null_mut())?;
        ctx.synchronize(std::ptr::null_mut())?;
        Ok(DeviceBackend {
            ctx,
            planes,
            state,
            workspace,
            meta,
            meta_layout,
            staging: None,
        })
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
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

    fn meta_at(&self, off: usize) -> u64 {
        self.meta.ptr() + off as u64
    }

    /// Device addresses for `acts`: device pointers pass through, host bytes are staged.
    fn device_inputs(&mut self, acts: &[Activations], stream: Stream) -> Result<Vec<u64>> {
        let host: usize = acts
            .iter()
            .map(|a| {
                if let Activations::Host(b) = a {
                    b.len().div_ceil(256) * 256
                } else {
                    0
                }
            })
            .sum();
        if host > 0 && self.staging.as_ref().map(|s| s.bytes() < host).unwrap_or(true) {
            self.staging = Some(self.ctx.alloc(host)?);
        }
        let mut off = 0u64;
        let mut out = Vec::with_capacity(acts.len());
        for a in acts {
            match a {
                Activations::Device(p) => out.push(*p),
                Activations::Host(b) => {
                    let dst = self.staging.as_ref().unwrap().ptr() + off;
                    self.ctx.copy_htod_async(dst, b, stream as _)?;
                    out.push(dst);
                    off += (b.len().div_ceil(256) * 256) as u64;
                }
            }
        }
        Ok(out)
    }

    pub fn reset_slot(&mut self, cfg: &CacheConfig, layout: &Layout, slot: u32) -> Result<()> {
        for l in 0..layout.num_layers {
            let layer = self.layer(layout, l as u32);
            self.ctx
                .reset_sequence(cfg, layout, &layer, slot, std::ptr::null_mut())?;
        }
        self.ctx.synchronize(std::ptr::null_mut())
    }

    /// Copies state records and pages through the host (fork is not a hot path).
    pub fn copy_seq(&mut self, layout: &Layout, src: u32, dst: u32, pages: &[(u32, u32)]) -> Result<()> {
        self.ctx.synchronize(std::ptr::null_mut())?;
        let rec = layout.num_kv_heads * layout.state.bytes;
        let mut buf = vec![0u8; rec];
        for l in 0..layout.num_layers {
            let base = self.state.ptr() + (l * layout.layer_state_bytes) as u64;
            self.ctx.copy_dtoh(&mut buf, base + (src as usize * rec) as u64)?;
            self.ctx
                .copy_htod_async(base + (dst as usize * rec) as u64, &buf, std::ptr::null_mut())?;
        }
        for l in 0..layout.num_layers {
            for p in 0..SIKV_NUM_PLANES {
                let block = layout.num_kv_heads * layout.page_size * layout.format.row_bytes[p];
                if block == 0 {
                    continue;
                }
                let base = self.planes.ptr() + (l * layout.layer_plane_bytes + layout.plane_offset[p]) as u64;
                let mut page = vec![0u8; block];
                for &(from, to) in pages {
                    self.ctx.copy_dtoh(&mut page, base + (from as usize * block) as u64)?;
                    self.ctx
                        .copy_htod_async(base + (to as usize * block) as u64, &page, std::ptr::null_mut())?;
                }
            }
        }
        self.ctx.synchronize(std::ptr::null_mut())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn calibrate(
        &mut self,
        cfg: &CacheConfig,
        layout: &Layout,
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
        let ins = self.device_inputs(&[k, v, q_tail], stream)?;
        let sm = self.meta_at(self.meta_layout.slot_mapping);
        self.ctx.copy_htod_async(sm, &i64_bytes(slot_mapping), stream as _)?;
        let dl = self.layer(layout, layer);
        let ws = self.workspace.ptr();
        let wsb = self.workspace.bytes();
        self.ctx.calibrate(
            cfg,
            layout,
            &dl,
            slot,
            n,
            ins[0],
            ins[1],
            nq,
            ins[2],
            sm,
            ws,
            wsb,
            stream as _,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: u32,
        k: Activations,
        v: Activations,
        slot_mapping: &[i64],
        seq_slot: &[i32],
        position: &[i32],
        stream: Stream,
    ) -> Result<()> {
        let ins = self.device_inputs(&[k, v], stream)?;
        let m = &self.meta_layout;
        let (sm, ss, pos) = (
            self.meta_at(m.slot_mapping),
            self.meta_at(m.seq_slot),
            self.meta_at(m.position),
        );
        self.ctx.copy_htod_async(sm, &i64_bytes(slot_mapping), stream as _)?;
        self.ctx.copy_htod_async(ss, &i32_bytes(seq_slot), stream as _)?;
        self.ctx.copy_htod_async(pos, &i32_bytes(position), stream as _)?;
        let dl = self.layer(layout, layer);
        self.ctx.append(
            cfg,
            layout,
            &dl,
            slot_mapping.len() as u32,
            ins[0],
            ins[1],
            sm,
            ss,
            pos,
            stream as _,
        )
    }

    fn upload_table(&self, table: &OwnedPageTable, seq_slot: &[i32], stream: Stream) -> Result<(DevPageTable, u64)> {
        let m = &self.meta_layout;
        let t = DevPageTable {
            indptr: self.meta_at(m.indptr),
            indices: self.meta_at(m.indices),
            last_page_len: self.meta_at(m.last_page_len),
            batch: seq_slot.len() as u32,
        };
        self.ctx
            .copy_htod_async(t.indptr, &i32_bytes(&table.indptr), stream as _)?;
        if !table.indices.is_empty() {
            self.ctx
                .copy_htod_async(t.indices, &i32_bytes(&table.indices), stream as _)?;
        }
        self.ctx
            .copy_htod_async(t.last_page_len, &i32_bytes(&table.last_page_len), stream as _)?;
        let ss = self.meta_at(m.seq_slot);
        self.ctx.copy_htod_async(ss, &i32_bytes(seq_slot), stream as _)?;
        Ok((t, ss))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn select(
        &mut self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: u32,
        table: &OwnedPageTable,
        seq_slot: &[i32],
        q: Activations,
        indices: &mut [i32],
        counts: &mut [i32],
        stream: Stream,
    ) -> Result<()> {
        let ins = self.device_inputs(&[q], stream)?;
        let (t, ss) = self.upload_table(table, seq_slot, stream)?;
        let dl = self.layer(layout, layer);
        let (si, sc) = (
            self.meta_at(self.meta_layout.sel_indices),
            self.meta_at(self.meta_layout.sel_counts),
        );
        let (ws, wsb) = (self.workspace.ptr(), self.workspace.bytes());
        self.ctx
            .select(cfg, layout, &dl, &t, ss, ins[0], si, sc, ws, wsb, stream as _)?;
        self.ctx.synchronize(stream as _)?;
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

    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: u32,
        table: &OwnedPageTable,
        seq_slot: &[i32],
        q: Activations,
        out: Output,
        sel: Selection,
        stream: Stream,
    ) -> Result<()> {
        let b = seq_slot.len();
        let out_bytes = b * (cfg.num_q_heads * cfg.head_dim) as usize * cfg.dtype.size();
        // A host output is written by the kernels into the staging buffer, then read back.
        let zeros;
        let mut acts = vec![q];
        if let Output::Host(_) = out {
            zeros = vec![0u8; out_bytes];
            acts.push(Activations::Host(&zeros));
        }
        let ins = self.device_inputs(&acts, stream)?;
        let od = match out {
            Output::Device(p) => p,
            Output::Host(_) => ins[1],
        };
        let (t, ss) = self.upload_table(table, seq_slot, stream)?;
        let dl = self.layer(layout, layer);
        let (ws, wsb) = (self.workspace.ptr(), self.workspace.bytes());
        let (si, sc) = (
            self.meta_at(self.meta_layout.sel_indices),
            self.meta_at(self.meta_layout.sel_counts),
        );
        match sel {
            Selection::All => {
                self.ctx
                    .attend_dense(cfg, layout, &dl, &t, ss, ins[0], od, ws, wsb, stream as _)?;
            }
            Selection::Select => {
                self.ctx
                    .select(cfg, layout, &dl, &t, ss, ins[0], si, sc, ws, wsb, stream as _)?;
                self.ctx
                    .attend(cfg, layout, &dl, &t, ss, ins[0], si, sc, od, ws, wsb, stream as _)?;
            }
            Selection::Given { indices, counts } => {
                // Fits: the meta regions hold max_batch rows, the cache passes n_seqs of them.
                self.ctx.copy_htod_async(si, &i32_bytes(indices), stream as _)?;
                self.ctx.copy_htod_async(sc, &i32_bytes(counts), stream as _)?;
                self.ctx
                    .attend(cfg, layout, &dl, &t, ss, ins[0], si, sc, od, ws, wsb, stream as _)?;
            }
        }
        if let Output::Host(h) = out {
            crate::ensure!(
                h.len() >= out_bytes,
                SIKV_ERR_BUFFER_TOO_SMALL,
                "`out` holds {} bytes, {out_bytes} needed",
                h.len()
            );
            self.ctx.synchronize(stream as _)?;
            self.ctx.copy_dtoh(&mut h[..out_bytes], od)?;
        }
        Ok(())
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
