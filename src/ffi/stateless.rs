//! Stateless stage calls (TensorRT / FlashInfer style) on caller-described memory: the
//! engine owns pools, page tables, slot mappings and workspace; the library only computes.

use std::ffi::c_void;
use std::sync::atomic::AtomicBool;

use super::boundary::{boundary, check_out, host_ref, host_slice, host_slice_mut, write_out};
use super::types::{SikvLayerPools, SikvPageTable, SikvStream};
use crate::config::{CacheConfig, SikvConfig};
use crate::cpu::{self, LayerMut, LayerRef, PageTable};
use crate::ensure;
use crate::layout::{Layout, SIKV_NUM_PLANES};
use crate::numeric;
use crate::status::Result;

/// Opaque handle of the stateless kernels for one configuration.
pub struct SikvKernels {
    cfg: CacheConfig,
    layout: Layout,
    exec: crate::cache::backend::Exec,
    poisoned: AtomicBool,
}

fn kernels_ref<'a>(p: *const SikvKernels) -> Result<&'a SikvKernels> {
    host_ref(p, "kernels")
}

fn poison_of(p: *const SikvKernels) -> Option<&'static AtomicBool> {
    // SAFETY: a non-NULL handle comes from sikv_kernels_create and lives until destroy.
    unsafe { p.as_ref() }.map(|k| &k.poisoned)
}

/// Creates the stateless kernels of a configuration (on CUDA: loads the module, once).
#[no_mangle]
pub extern "C" fn sikv_kernels_create(config: *const SikvConfig, out: *mut *mut SikvKernels) -> SikvStatus {
    boundary(None, || {
        let cfg = CacheConfig::from_c(host_ref(config, "config")?)?;
        check_out(out, "out")?;
        let layout = Layout::new(&cfg);
        let exec = crate::cache::backend::Exec::create(&cfg, &layout)?;
        let h = Box::new(SikvKernels {
            cfg,
            layout,
            exec,
            poisoned: AtomicBool::new(false),
        });
        write_out(out, Box::into_raw(h), "out")
    })
}

/// Destroys a kernels handle. NULL is a no-op.
#[no_mangle]
pub extern "C" fn sikv_kernels_destroy(kernels: *mut SikvKernels) {
    let _ = boundary(None, || {
        if !kernels.is_null() {
            // SAFETY: the handle came from Box::into_raw in sikv_kernels_create.
            drop(unsafe { Box::from_raw(kernels) });
        }
        Ok(())
    });
}

/// Workspace bytes enough for every stateless call with up to `batch` sequences: select,
/// attend, attend_dense, decode (which also keeps its selection in the workspace) and, with
/// `batch = 1`, calibrate. 0 on the CPU.
#[no_mangle]
pub extern "C" fn sikv_workspace_size(kernels: *const SikvKernels, batch: u32, out: *mut usize) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let k = kernels_ref(kernels)?;
        check_out(out, "out")?;
        ensure!(
            batch >= 1 && batch <= k.cfg.max_batch,
            SIKV_ERR_OUT_OF_BOUNDS,
            "batch = {batch} must be in 1..=max_batch ({})",
            k.cfg.max_batch
        );
        write_out(out, decode_workspace(k, batch).0, "out")
    })
}

use crate::status::SikvStatus;

/// Workspace of `sikv_kernel_decode` on a GPU: the stage workspace, then the selection
/// (indices `[batch][H_kv][budget_max]`, counts `[batch][H_kv]`). Returns (total, offset of
/// indices, offset of counts).
pub(crate) fn gpu_decode_workspace(cfg: &CacheConfig, layout: &Layout, batch: u32) -> (usize, usize, usize) {
    let stage = crate::gpu::GpuContext::workspace_bytes(cfg, layout, batch);
    let rows = batch as usize * cfg.num_kv_heads as usize;
    let idx = stage.div_ceil(256) * 256;
    let cnt = (idx + 4 * rows * cfg.budget.max as usize).div_ceil(256) * 256;
    (cnt + 4 * rows, idx, cnt)
}

fn decode_workspace(k: &SikvKernels, batch: u32) -> (usize, usize, usize) {
    if !k.exec.is_gpu() {
        return (0, 0, 0);
    }
    gpu_decode_workspace(&k.cfg, &k.layout, batch)
}

/// Host views of one layer's pools (CPU device).
fn host_layer_mut<'a>(k: &SikvKernels, pools: &SikvLayerPools) -> Result<LayerMut<'a>> {
    let mut planes: [&'a mut [u8]; SIKV_NUM_PLANES] = Default::default();
    for (p, slot) in planes.iter_mut().enumerate() {
        if k.layout.plane_bytes[p] != 0 {
            let name = format!("pools.plane[{}]", p);
            *slot = host_slice_mut(pools.plane[p] as *mut u8, k.layout.plane_bytes[p], &name)?;
        }
    }
    let state = host_slice_mut(pools.state as *mut u8, k.layout.layer_state_bytes, "pools.state")?;
    Ok(LayerMut { planes, state })
}

fn host_layer_ref<'a>(k: &SikvKernels, pools: &SikvLayerPools) -> Result<LayerRef<'a>> {
    let mut planes: [&'a [u8]; SIKV_NUM_PLANES] = Default::default();
    for (p, slot) in planes.iter_mut().enumerate() {
        if k.layout.plane_bytes[p] != 0 {
            let name = format!("pools.plane[{}]", p);
            *slot = host_slice(pools.plane[p] as *const u8, k.layout.plane_bytes[p], &name)?;
        }
    }
    let state = host_slice(pools.state as *const u8, k.layout.layer_state_bytes, "pools.state")?;
    Ok(LayerRef { planes, state })
}

/// Host view of a CSR page table, bounds-checked before any slice is formed.
fn host_table<'a>(k: &SikvKernels, t: &SikvPageTable) -> Result<PageTable<'a>> {
    ensure!(
        t.batch >= 1 && t.batch <= k.cfg.max_batch,
        SIKV_ERR_OUT_OF_BOUNDS,
        "page_table.batch = {} must be in 1..=max_batch ({})",
        t.batch,
        k.cfg.max_batch
    );
    let b = t.batch as usize;
    let indptr = host_slice(t.indptr, b + 1, "page_table.indptr")?;
    let total = indptr[b];
    let max_total = k.cfg.max_batch as i64 * k.cfg.pages_per_seq_max() as i64;
    ensure!(
        total >= 0 && total as i64 <= max_total,
        SIKV_ERR_OUT_OF_BOUNDS,
        "page_table.indptr[batch] = {total} is outside 0..={max_total}"
    );
    let indices = host_slice(t.indices, total as usize, "page_table.indices")?;
    let last = host_slice(t.last_page_len, b, "page_table.last_page_len")?;
    Ok(PageTable {
        indptr,
        indices,
        last_page_len: last,
    })
}

fn host_acts<'a>(k: &SikvKernels, p: *const c_void, elems: usize, name: &str) -> Result<Vec<f32>> {
    let bytes: &'a [u8] = host_slice(p as *const u8, elems * k.cfg.dtype.size(), name)?;
    let mut out = vec![0f32; elems];
    numeric::to_f32(k.cfg.dtype, bytes, &mut out);
    Ok(out)
}

fn dev(p: *const c_void, name: &str) -> Result<u64> {
    ensure!(!p.is_null(), SIKV_ERR_NULL_POINTER, "`{name}` is NULL");
    Ok(p as u64)
}

fn dev_layer(k: &SikvKernels, pools: &SikvLayerPools) -> Result<crate::gpu::DevLayer> {
    let mut planes = [0u64; SIKV_NUM_PLANES];
    for (p, slot) in planes.iter_mut().enumerate() {
        if k.layout.plane_bytes[p] != 0 {
            *slot = dev(pools.plane[p], &format!("pools.plane[{p}]"))?;
        }
    }
    Ok(crate::gpu::DevLayer {
        planes,
        state: dev(pools.state, "pools.state")?,
    })
}

fn dev_table(k: &SikvKernels, t: &SikvPageTable) -> Result<crate::gpu::DevPageTable> {
    ensure!(
        t.batch >= 1 && t.batch <= k.cfg.max_batch,
        SIKV_ERR_OUT_OF_BOUNDS,
        "page_table.batch = {} must be in 1..=max_batch ({})",
        t.batch,
        k.cfg.max_batch
    );
    Ok(crate::gpu::DevPageTable {
        indptr: dev(t.indptr as *const c_void, "page_table.indptr")?,
        indices: dev(t.indices as *const c_void, "page_table.indices")?,
        last_page_len: dev(t.last_page_len as *const c_void, "page_table.last_page_len")?,
        batch: t.batch,
    })
}

/// Stage `calibrate` for one sequence slot at one layer: fits centre, scale, codebook, heavy
/// set and dense set from the prompt, and encodes the prompt into the pages named by
/// `slot_mapping` (`page * page_size + slot` per token; negative = skip).
#[no_mangle]
pub extern "C" fn sikv_kernel_calibrate(
    kernels: *const SikvKernels,
    pools: *const SikvLayerPools,
    seq_slot: u32,
    n_tokens: u32,
    k: *const c_void,
    v: *const c_void,
    n_query: u32,
    q_tail: *const c_void,
    slot_mapping: *const i64,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let kn = kernels_ref(kernels)?;
        let pools = host_ref(pools, "pools")?;
        let (cfg, layout) = (&kn.cfg, &kn.layout);
        ensure!(n_tokens >= 1, SIKV_ERR_INVALID_ARGUMENT, "n_tokens must be >= 1");
        ensure!(
            n_tokens <= cfg.max_seq_len,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_tokens = {n_tokens} exceeds max_seq_len = {}",
            cfg.max_seq_len
        );
        ensure!(
            n_query >= 1 && n_query <= n_tokens,
            SIKV_ERR_INVALID_ARGUMENT,
            "n_query = {n_query} must be in 1..=n_tokens ({n_tokens})"
        );
        ensure!(
            seq_slot < cfg.max_seqs,
            SIKV_ERR_OUT_OF_BOUNDS,
            "seq_slot = {seq_slot} is outside 0..max_seqs ({})",
            cfg.max_seqs
        );
        let kv = n_tokens as usize * (cfg.num_kv_heads * cfg.head_dim) as usize;
        let qn = n_query as usize * (cfg.num_q_heads * cfg.head_dim) as usize;
        if kn.exec.is_gpu() {
            let layer = dev_layer(kn, pools)?;
            kn.exec.gpu()?.calibrate(
                cfg,
                layout,
                &layer,
                seq_slot,
                n_tokens,
                dev(k, "k")?,
                dev(v, "v")?,
                n_query,
                dev(q_tail, "q_tail")?,
                dev(slot_mapping as *const c_void, "slot_mapping")?,
                workspace as u64,
                workspace_bytes,
                stream as _,
            )
        } else {
            let kf = host_acts(kn, k, kv, "k")?;
            let vf = host_acts(kn, v, kv, "v")?;
            let qf = host_acts(kn, q_tail, qn, "q_tail")?;
            let sm = host_slice(slot_mapping, n_tokens as usize, "slot_mapping")?;
            let mut lm = host_layer_mut(kn, pools)?;
            cpu::calibrate(layout, cfg, &mut lm, seq_slot as usize, &kf, &vf, &qf, sm)
        }
    })
}

/// Stage `encode` (append) of `n_tokens` tokens at one layer: token t of sequence slot
/// `seq_slot[t]` at position `position[t]` goes to `slot_mapping[t]` (negative = skip).
#[no_mangle]
pub extern "C" fn sikv_kernel_append(
    kernels: *const SikvKernels,
    pools: *const SikvLayerPools,
    n_tokens: u32,
    k: *const c_void,
    v: *const c_void,
    slot_mapping: *const i64,
    seq_slot: *const i32,
    position: *const i32,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let kn = kernels_ref(kernels)?;
        let pools = host_ref(pools, "pools")?;
        let (cfg, layout) = (&kn.cfg, &kn.layout);
        ensure!(n_tokens >= 1, SIKV_ERR_INVALID_ARGUMENT, "n_tokens must be >= 1");
        ensure!(
            n_tokens <= cfg.max_append_tokens,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_tokens = {n_tokens} exceeds max_append_tokens = {}",
            cfg.max_append_tokens
        );
        let n = n_tokens as usize;
        let kv = n * (cfg.num_kv_heads * cfg.head_dim) as usize;
        if kn.exec.is_gpu() {
            let layer = dev_layer(kn, pools)?;
            kn.exec.gpu()?.append(
                cfg,
                layout,
                &layer,
                n_tokens,
                dev(k, "k")?,
                dev(v, "v")?,
                dev(slot_mapping as *const c_void, "slot_mapping")?,
                dev(seq_slot as *const c_void, "seq_slot")?,
                dev(position as *const c_void, "position")?,
                stream as _,
            )
        } else {
            let kf = host_acts(kn, k, kv, "k")?;
            let vf = host_acts(kn, v, kv, "v")?;
            let sm = host_slice(slot_mapping, n, "slot_mapping")?;
            let ss = host_slice(seq_slot, n, "seq_slot")?;
            let pos = host_slice(position, n, "position")?;
            let mut lm = host_layer_mut(kn, pools)?;
            cpu::append(layout, cfg, &mut lm, &kf, &vf, sm, ss, pos)
        }
    })
}

/// Selection (score, top-k, re-rank) for a batch: `indices` `[batch][num_kv_heads][budget_max]`
/// (ascending positions, then -1), `counts` `[batch][num_kv_heads]`, in the device's memory.
#[no_mangle]
pub extern "C" fn sikv_kernel_select(
    kernels: *const SikvKernels,
    pools: *const SikvLayerPools,
    page_table: *const SikvPageTable,
    seq_slot: *const i32,
    q: *const c_void,
    indices: *mut i32,
    counts: *mut i32,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let kn = kernels_ref(kernels)?;
        let pools = host_ref(pools, "pools")?;
        let t = host_ref(page_table, "page_table")?;
        let (cfg, layout) = (&kn.cfg, &kn.layout);
        if kn.exec.is_gpu() {
            let layer = dev_layer(kn, pools)?;
            let table = dev_table(kn, t)?;
            kn.exec.gpu()?.select(
                cfg,
                layout,
                &layer,
                &table,
                dev(seq_slot as *const c_void, "seq_slot")?,
                dev(q, "q")?,
                dev(indices as *const c_void, "indices")?,
                dev(counts as *const c_void, "counts")?,
                workspace as u64,
                workspace_bytes,
                stream as _,
            )
        } else {
            let table = host_table(kn, t)?;
            let b = table.batch();
            let rows = b * cfg.num_kv_heads as usize;
            let qf = host_acts(kn, q, b * (cfg.num_q_heads * cfg.head_dim) as usize, "q")?;
            let ss = host_slice(seq_slot, b, "seq_slot")?;
            let idx = host_slice_mut(indices, rows * cfg.budget.max as usize, "indices")?;
            let cnt = host_slice_mut(counts, rows, "counts")?;
            let lr = host_layer_ref(kn, pools)?;
            cpu::select(layout, cfg, &lr, &table, ss, &qf, idx, cnt)
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn attend_impl(
    kn: &SikvKernels,
    pools: &SikvLayerPools,
    t: &SikvPageTable,
    seq_slot: *const i32,
    q: *const c_void,
    sel: Option<(*const i32, *const i32)>,
    out: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: SikvStream,
) -> Result<()> {
    let (cfg, layout) = (&kn.cfg, &kn.layout);
    if kn.exec.is_gpu() {
        let layer = dev_layer(kn, pools)?;
        let table = dev_table(kn, t)?;
        let g = kn.exec.gpu()?;
        let ss = dev(seq_slot as *const c_void, "seq_slot")?;
        let (qd, od) = (dev(q, "q")?, dev(out, "out")?);
        match sel {
            Some((i, c)) => g.attend(
                cfg,
                layout,
                &layer,
                &table,
                ss,
                qd,
                dev(i as *const c_void, "indices")?,
                dev(c as *const c_void, "counts")?,
                od,
                workspace as u64,
                workspace_bytes,
                stream as _,
            ),
            None => g.attend_dense(
                cfg,
                layout,
                &layer,
                &table,
                ss,
                qd,
                od,
                workspace as u64,
                workspace_bytes,
                stream as _,
            ),
        }
    } else {
        let table = host_table(kn, t)?;
        let b = table.batch();
        let rows = b * cfg.num_kv_heads as usize;
        let n = b * (cfg.num_q_heads * cfg.head_dim) as usize;
        let qf = host_acts(kn, q, n, "q")?;
        let ss = host_slice(seq_slot, b, "seq_slot")?;
        let out_bytes = host_slice_mut(out as *mut u8, n * cfg.dtype.size(), "out")?;
        let lr = host_layer_ref(kn, pools)?;
        let mut o = vec![0f32; n];
        match sel {
            Some((i, c)) => {
                let idx = host_slice(i, rows * cfg.budget.max as usize, "indices")?;
                let cnt = host_slice(c, rows, "counts")?;
                cpu::attend(layout, cfg, &lr, &table, ss, &qf, idx, cnt, &mut o)?;
            }
            None => cpu::attend_dense(layout, cfg, &lr, &table, ss, &qf, &mut o)?,
        }
        numeric::from_f32(cfg.dtype, &o, out_bytes);
        Ok(())
    }
}

/// Stage `attend` (+ `combine`) over the dense set and the given selection:
/// `out` `[batch][num_q_heads][head_dim]`.
#[no_mangle]
pub extern "C" fn sikv_kernel_attend(
    kernels: *const SikvKernels,
    pools: *const SikvLayerPools,
    page_table: *const SikvPageTable,
    seq_slot: *const i32,
    q: *const c_void,
    indices: *const i32,
    counts: *const i32,
    out: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let kn = kernels_ref(kernels)?;
        let pools = host_ref(pools, "pools")?;
        let t = host_ref(page_table, "page_table")?;
        attend_impl(
            kn,
            pools,
            t,
            seq_slot,
            q,
            Some((indices, counts)),
            out,
            workspace,
            workspace_bytes,
            stream,
        )
    })
}

/// Dense decode over every stored token (dequantised), no selection.
#[no_mangle]
pub extern "C" fn sikv_kernel_attend_dense(
    kernels: *const SikvKernels,
    pools: *const SikvLayerPools,
    page_table: *const SikvPageTable,
    seq_slot: *const i32,
    q: *const c_void,
    out: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let kn = kernels_ref(kernels)?;
        let pools = host_ref(pools, "pools")?;
        let t = host_ref(page_table, "page_table")?;
        attend_impl(kn, pools, t, seq_slot, q, None, out, workspace, workspace_bytes, stream)
    })
}

/// Clears the state records of a sequence slot at one layer (not calibrated, no dense
/// entries), so the slot can be calibrated again for a new sequence.
#[no_mangle]
pub extern "C" fn sikv_kernel_reset_slot(
    kernels: *const SikvKernels,
    pools: *const SikvLayerPools,
    seq_slot: u32,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let kn = kernels_ref(kernels)?;
        let pools = host_ref(pools, "pools")?;
        ensure!(
            seq_slot < kn.cfg.max_seqs,
            SIKV_ERR_OUT_OF_BOUNDS,
            "seq_slot = {seq_slot} is outside 0..max_seqs ({})",
            kn.cfg.max_seqs
        );
        if kn.exec.is_gpu() {
            let layer = crate::gpu::DevLayer {
                planes: [0; SIKV_NUM_PLANES],
                state: dev(pools.state, "pools.state")?,
            };
            kn.exec
                .gpu()?
                .reset_sequence(&kn.cfg, &kn.layout, &layer, seq_slot, stream as _)
        } else {
            let state = host_slice_mut(pools.state as *mut u8, kn.layout.layer_state_bytes, "pools.state")?;
            cpu::reset_sequence(&kn.layout, state, seq_slot as usize)
        }
    })
}

/// Select + attend in one call, the selection kept in the workspace (`sikv_workspace_size`
/// accounts for it): what a decode step needs per layer, and what a CUDA graph captures.
#[no_mangle]
pub extern "C" fn sikv_kernel_decode(
    kernels: *const SikvKernels,
    pools: *const SikvLayerPools,
    page_table: *const SikvPageTable,
    seq_slot: *const i32,
    q: *const c_void,
    out: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let kn = kernels_ref(kernels)?;
        let pools = host_ref(pools, "pools")?;
        let t = host_ref(page_table, "page_table")?;
        let (cfg, layout) = (&kn.cfg, &kn.layout);
        if kn.exec.is_gpu() {
            ensure!(
                t.batch >= 1 && t.batch <= cfg.max_batch,
                SIKV_ERR_OUT_OF_BOUNDS,
                "page_table.batch = {} must be in 1..=max_batch ({})",
                t.batch,
                cfg.max_batch
            );
            let (need, idx_off, cnt_off) = decode_workspace(kn, t.batch);
            ensure!(
                workspace_bytes >= need,
                SIKV_ERR_BUFFER_TOO_SMALL,
                "workspace_bytes = {workspace_bytes} is smaller than the {need} bytes decode needs"
            );
            let ws = dev(workspace, "workspace")?;
            let (idx, cnt) = (ws + idx_off as u64, ws + cnt_off as u64);
            let layer = dev_layer(kn, pools)?;
            let table = dev_table(kn, t)?;
            let g = kn.exec.gpu()?;
            let ss = dev(seq_slot as *const c_void, "seq_slot")?;
            let (qd, od) = (dev(q, "q")?, dev(out, "out")?);
            if cfg.dense_crossover > 0 && cfg.max_seq_len <= cfg.dense_crossover {
                // Decided from the declared bounds only, so a captured graph stays valid.
                return g.attend_dense(cfg, layout, &layer, &table, ss, qd, od, ws, idx_off, stream as _);
            }
            g.select(cfg, layout, &layer, &table, ss, qd, idx, cnt, ws, idx_off, stream as _)?;
            g.attend(
                cfg,
                layout,
                &layer,
                &table,
                ss,
                qd,
                idx,
                cnt,
                od,
                ws,
                idx_off,
                stream as _,
            )
        } else if cfg.dense_crossover > 0 && cfg.max_seq_len <= cfg.dense_crossover {
            attend_impl(kn, pools, t, seq_slot, q, None, out, workspace, workspace_bytes, stream)
        } else {
            let table = host_table(kn, t)?;
            let rows = table.batch() * cfg.num_kv_heads as usize;
            let mut idx = vec![-1i32; rows * cfg.budget.max as usize];
            let mut cnt = vec![0i32; rows];
            {
                let qf = host_acts(kn, q, table.batch() * (cfg.num_q_heads * cfg.head_dim) as usize, "q")?;
                let ss = host_slice(seq_slot, table.batch(), "seq_slot")?;
                let lr = host_layer_ref(kn, pools)?;
                cpu::select(layout, cfg, &lr, &table, ss, &qf, &mut idx, &mut cnt)?;
            }
            attend_impl(
                kn,
                pools,
                t,
                seq_slot,
                q,
                Some((idx.as_ptr(), cnt.as_ptr())),
                out,
                workspace,
                workspace_bytes,
                stream,
            )
        }
    })
}
