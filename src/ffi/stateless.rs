//! Stateless stage calls (TensorRT / FlashInfer style) on caller-described memory: the
//! engine owns pools, page tables, slot mappings and workspace; the library only computes.
//! Each export turns the caller's pointers into descriptors (host slices on the CPU, device
//! addresses on CUDA) and hands them to the stage [`Executor`].

use std::ffi::c_void;
use std::sync::atomic::AtomicBool;

use super::boundary::{boundary, check_out, host_ref, host_slice, host_slice_mut, write_out};
use super::types::{SikvLayerPools, SikvPageTable, SikvStream};
use crate::config::{CacheConfig, SikvConfig};
use crate::cpu::{LayerMut, LayerRef, PageTable, SIKV_MAX_QUERY_ROWS};
use crate::ensure;
use crate::exec::{
    Batch, DecodePath, Executor, LayerPools, LayerView, Mem, MemMut, NewTokens, Prompt, Selected, Table, Workspace,
};
use crate::gpu::{DevLayer, DevPageTable};
use crate::layout::SIKV_NUM_PLANES;
use crate::status::{Result, SikvStatus};

/// Opaque handle of the stateless kernels for one configuration.
pub struct SikvKernels {
    exec: Executor,
    poisoned: AtomicBool,
}

fn kernels_ref<'a>(p: *const SikvKernels) -> Result<&'a SikvKernels> {
    // SAFETY: a non-NULL handle comes from sikv_kernels_create and lives until destroy (ABI
    // contract); the reference does not outlive the call.
    unsafe { host_ref(p, "kernels") }
}

fn poison_of(p: *const SikvKernels) -> Option<&'static AtomicBool> {
    // A misaligned pointer cannot be a handle: leave it to the call's own check (MISALIGNED)
    // rather than read through it.
    if (p as usize) % std::mem::align_of::<SikvKernels>() != 0 {
        return None;
    }
    // SAFETY: a non-NULL, aligned handle comes from sikv_kernels_create and lives until destroy.
    unsafe { p.as_ref() }.map(|k| &k.poisoned)
}

/// Creates the stateless kernels of a configuration (on CUDA: loads the module, once).
///
/// Threads: a kernels handle holds no state that calls change, so any number of threads may
/// call through one handle at once. What the calls write belongs to the caller: two calls
/// that write the same pools, selection or workspace must not run at the same time (on the
/// GPU: not on two streams that nothing orders), so give each thread or stream its own
/// workspace. `sikv_kernels_destroy` must not race with any other call on the handle.
#[no_mangle]
pub extern "C" fn sikv_kernels_create(config: *const SikvConfig, out: *mut *mut SikvKernels) -> SikvStatus {
    boundary(None, || {
        // SAFETY: `config` and `out` are the caller's pointers, checked for NULL and alignment.
        let cfg = CacheConfig::from_c(unsafe { host_ref(config, "config") }?)?;
        check_out(out, "out")?;
        let exec = Executor::create(&cfg, None)?;
        let h = Box::new(SikvKernels {
            exec,
            poisoned: AtomicBool::new(false),
        });
        // SAFETY: checked above.
        unsafe { write_out(out, Box::into_raw(h), "out") }
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
        // SAFETY: the caller's out-pointer, checked for NULL and alignment.
        check_out(out, "out")?;
        let cfg = k.exec.cfg();
        ensure!(
            batch >= 1 && batch <= cfg.max_batch,
            SIKV_ERR_OUT_OF_BOUNDS,
            "batch = {batch} must be in 1..=max_batch ({})",
            cfg.max_batch
        );
        // SAFETY: checked above.
        unsafe { write_out(out, k.exec.decode_workspace(batch).total, "out") }
    })
}

/// Workspace bytes enough for `sikv_kernel_decode_rows` with up to `n_rows` query rows in all
/// (1..=SIKV_MAX_QUERY_ROWS * max_batch; the rows, not the sequences, size its workspace). 0
/// on the CPU.
#[no_mangle]
pub extern "C" fn sikv_workspace_size_rows(kernels: *const SikvKernels, n_rows: u32, out: *mut usize) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let k = kernels_ref(kernels)?;
        check_out(out, "out")?;
        let cfg = k.exec.cfg();
        let most = cfg.max_batch as u64 * SIKV_MAX_QUERY_ROWS as u64;
        ensure!(
            n_rows >= 1 && n_rows as u64 <= most,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_rows = {n_rows} must be in 1..={SIKV_MAX_QUERY_ROWS} * max_batch ({most})"
        );
        // SAFETY: checked above.
        unsafe { write_out(out, k.exec.decode_workspace(n_rows).total, "out") }
    })
}

/// An input array of `n` elements at a caller pointer: host elements on the CPU, the device
/// address on CUDA (NULL is an error either way unless `n == 0` on the host).
///
/// # Safety
/// On the CPU, `p` points to `n` readable elements for the duration of the call.
unsafe fn input<'a, T>(k: &SikvKernels, p: *const T, n: usize, name: &str) -> Result<Mem<'a, T>> {
    if k.exec.is_gpu() {
        ensure!(!p.is_null(), SIKV_ERR_NULL_POINTER, "`{name}` is NULL");
        Ok(Mem::Device(p as u64))
    } else {
        host_slice(p, n, name).map(Mem::Host)
    }
}

/// # Safety
/// On the CPU, `p` points to `n` writable elements for the duration of the call.
unsafe fn output<'a, T>(k: &SikvKernels, p: *mut T, n: usize, name: &str) -> Result<MemMut<'a, T>> {
    if k.exec.is_gpu() {
        ensure!(!p.is_null(), SIKV_ERR_NULL_POINTER, "`{name}` is NULL");
        Ok(MemMut::Device(p as u64))
    } else {
        host_slice_mut(p, n, name).map(MemMut::Host)
    }
}

/// Activations of the model dtype: `elems` elements.
///
/// # Safety
/// As [`input`].
unsafe fn acts<'a>(k: &SikvKernels, p: *const c_void, elems: usize, name: &str) -> Result<Mem<'a, u8>> {
    input(k, p as *const u8, elems * k.exec.cfg().dtype.size(), name)
}

fn dev_layer(k: &SikvKernels, pools: &SikvLayerPools) -> Result<DevLayer> {
    let mut planes = [0u64; SIKV_NUM_PLANES];
    for (p, slot) in planes.iter_mut().enumerate() {
        if k.exec.layout().plane_bytes[p] != 0 {
            ensure!(
                !pools.plane[p].is_null(),
                SIKV_ERR_NULL_POINTER,
                "`pools.plane[{p}]` is NULL"
            );
            *slot = pools.plane[p] as u64;
        }
    }
    ensure!(!pools.state.is_null(), SIKV_ERR_NULL_POINTER, "`pools.state` is NULL");
    Ok(DevLayer {
        planes,
        state: pools.state as u64,
    })
}

/// One layer's pools, writable.
///
/// # Safety
/// On the CPU, each pool pointer addresses the layout's bytes of that pool for the call.
unsafe fn layer_pools<'a>(k: &SikvKernels, pools: &SikvLayerPools) -> Result<LayerPools<'a>> {
    if k.exec.is_gpu() {
        return dev_layer(k, pools).map(LayerPools::Device);
    }
    let layout = k.exec.layout();
    let mut planes: [&'a mut [u8]; SIKV_NUM_PLANES] = Default::default();
    for (p, slot) in planes.iter_mut().enumerate() {
        if layout.plane_bytes[p] != 0 {
            *slot = host_slice_mut(
                pools.plane[p] as *mut u8,
                layout.plane_bytes[p],
                &format!("pools.plane[{p}]"),
            )?;
        }
    }
    let state = host_slice_mut(pools.state as *mut u8, layout.layer_state_bytes, "pools.state")?;
    Ok(LayerPools::Host(LayerMut { planes, state }))
}

/// One layer's pools, read-only.
///
/// # Safety
/// As [`layer_pools`].
unsafe fn layer_view<'a>(k: &SikvKernels, pools: &SikvLayerPools) -> Result<LayerView<'a>> {
    if k.exec.is_gpu() {
        return dev_layer(k, pools).map(LayerView::Device);
    }
    let layout = k.exec.layout();
    let mut planes: [&'a [u8]; SIKV_NUM_PLANES] = Default::default();
    for (p, slot) in planes.iter_mut().enumerate() {
        if layout.plane_bytes[p] != 0 {
            *slot = host_slice(
                pools.plane[p] as *const u8,
                layout.plane_bytes[p],
                &format!("pools.plane[{p}]"),
            )?;
        }
    }
    let state = host_slice(pools.state as *const u8, layout.layer_state_bytes, "pools.state")?;
    Ok(LayerView::Host(LayerRef { planes, state }))
}

/// A CSR page table; on the host, `indices` is bounded by `indptr[batch]` before it is read.
///
/// # Safety
/// On the CPU, the arrays hold `batch + 1`, `indptr[batch]` and `batch` entries.
unsafe fn table<'a>(k: &SikvKernels, t: &SikvPageTable) -> Result<Table<'a>> {
    let cfg = k.exec.cfg();
    ensure!(
        t.batch >= 1 && t.batch <= cfg.max_batch,
        SIKV_ERR_OUT_OF_BOUNDS,
        "page_table.batch = {} must be in 1..=max_batch ({})",
        t.batch,
        cfg.max_batch
    );
    let b = t.batch as usize;
    if k.exec.is_gpu() {
        for (p, name) in [
            (t.indptr, "page_table.indptr"),
            (t.indices, "page_table.indices"),
            (t.last_page_len, "page_table.last_page_len"),
        ] {
            ensure!(!p.is_null(), SIKV_ERR_NULL_POINTER, "`{name}` is NULL");
        }
        return Ok(Table::Device(DevPageTable {
            indptr: t.indptr as u64,
            indices: t.indices as u64,
            last_page_len: t.last_page_len as u64,
            batch: t.batch,
        }));
    }
    let indptr = host_slice(t.indptr, b + 1, "page_table.indptr")?;
    let total = indptr[b];
    let max_total = cfg.max_batch as i64 * cfg.pages_per_seq_max() as i64;
    ensure!(
        total >= 0 && total as i64 <= max_total,
        SIKV_ERR_OUT_OF_BOUNDS,
        "page_table.indptr[batch] = {total} is outside 0..={max_total}"
    );
    Ok(Table::Host(PageTable {
        indptr,
        indices: host_slice(t.indices, total as usize, "page_table.indices")?,
        last_page_len: host_slice(t.last_page_len, b, "page_table.last_page_len")?,
    }))
}

/// A decode batch: page table, seq slots and queries.
///
/// # Safety
/// As [`table`] and [`input`].
unsafe fn batch<'a>(k: &SikvKernels, t: &SikvPageTable, seq_slot: *const i32, q: *const c_void) -> Result<Batch<'a>> {
    batch_rows(k, t, seq_slot, q, t.batch)
}

/// A batch whose queries are `rows` query rows (one per sequence: `rows = t.batch`).
///
/// # Safety
/// As [`table`] and [`input`].
unsafe fn batch_rows<'a>(
    k: &SikvKernels,
    t: &SikvPageTable,
    seq_slot: *const i32,
    q: *const c_void,
    rows: u32,
) -> Result<Batch<'a>> {
    let cfg = k.exec.cfg();
    let table = table(k, t)?;
    Ok(Batch {
        table,
        seq_slot: input(k, seq_slot, t.batch as usize, "seq_slot")?,
        q: acts(k, q, rows as usize * (cfg.num_q_heads * cfg.head_dim) as usize, "q")?,
        live_max: None,
    })
}

fn ws_desc(p: *mut c_void, bytes: usize) -> Workspace {
    Workspace { ptr: p as u64, bytes }
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
        let cfg = kn.exec.cfg();
        // Sizes are only formed for counts the executor accepts.
        let n = n_tokens.min(cfg.max_seq_len);
        let kv = n as usize * (cfg.num_kv_heads * cfg.head_dim) as usize;
        let qn = n_query.min(n) as usize * (cfg.num_q_heads * cfg.head_dim) as usize;
        // SAFETY: the caller's pointers describe memory of the sizes the configuration and the
        // arguments imply, for the duration of the call (ABI contract); NULL and alignment are
        // checked, and sizes are checked before the executor reads them.
        unsafe {
            let pools = layer_pools(kn, host_ref(pools, "pools")?)?;
            let prompt = Prompt {
                seq_slot,
                n_tokens,
                k: acts(kn, k, kv, "k")?,
                v: acts(kn, v, kv, "v")?,
                n_query,
                q_tail: acts(kn, q_tail, qn, "q_tail")?,
                slot_mapping: input(kn, slot_mapping, n as usize, "slot_mapping")?,
            };
            kn.exec
                .calibrate(pools, &prompt, ws_desc(workspace, workspace_bytes), stream)
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
        let cfg = kn.exec.cfg();
        // Sizes are only formed for a count the executor accepts.
        let n = n_tokens.min(cfg.max_append_tokens) as usize;
        let kv = n * (cfg.num_kv_heads * cfg.head_dim) as usize;
        // SAFETY: as in sikv_kernel_calibrate.
        unsafe {
            let pools = layer_pools(kn, host_ref(pools, "pools")?)?;
            let tokens = NewTokens {
                n_tokens,
                k: acts(kn, k, kv, "k")?,
                v: acts(kn, v, kv, "v")?,
                slot_mapping: input(kn, slot_mapping, n, "slot_mapping")?,
                seq_slot: input(kn, seq_slot, n, "seq_slot")?,
                position: input(kn, position, n, "position")?,
            };
            kn.exec.append(pools, &tokens, stream)
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
        let cfg = kn.exec.cfg();
        // SAFETY: as in sikv_kernel_calibrate.
        unsafe {
            let pools = layer_view(kn, host_ref(pools, "pools")?)?;
            let t = host_ref(page_table, "page_table")?;
            let b = batch(kn, t, seq_slot, q)?;
            let rows = t.batch as usize * cfg.num_kv_heads as usize;
            let idx = output(kn, indices, rows * cfg.budget.max as usize, "indices")?;
            let cnt = output(kn, counts, rows, "counts")?;
            kn.exec
                .select(pools, &b, idx, cnt, ws_desc(workspace, workspace_bytes), stream)
        }
    })
}

/// Attend over a selection (`Some`) or every stored token (`None`).
///
/// # Safety
/// As in sikv_kernel_calibrate: the caller's pointers describe the memory the call reads.
#[allow(clippy::too_many_arguments)] // the stateless call's own parameter list
unsafe fn attend_impl(
    kn: &SikvKernels,
    pools: *const SikvLayerPools,
    page_table: *const SikvPageTable,
    seq_slot: *const i32,
    q: *const c_void,
    sel: Option<(*const i32, *const i32)>,
    out: *mut c_void,
    ws: Workspace,
    stream: SikvStream,
) -> Result<()> {
    let cfg = kn.exec.cfg();
    let pools = layer_view(kn, host_ref(pools, "pools")?)?;
    let t = host_ref(page_table, "page_table")?;
    let b = batch(kn, t, seq_slot, q)?;
    let rows = t.batch as usize * cfg.num_kv_heads as usize;
    let n_out = t.batch as usize * (cfg.num_q_heads * cfg.head_dim) as usize * cfg.dtype.size();
    let out = output(kn, out as *mut u8, n_out, "out")?;
    let sel = match sel {
        Some((i, c)) => Selected::Given {
            indices: input(kn, i, rows * cfg.budget.max as usize, "indices")?,
            counts: input(kn, c, rows, "counts")?,
        },
        None => Selected::All,
    };
    kn.exec.attend(pools, &b, sel, out, ws, stream)
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
        let ws = ws_desc(workspace, workspace_bytes);
        // SAFETY: as in sikv_kernel_calibrate.
        unsafe {
            attend_impl(
                kn,
                pools,
                page_table,
                seq_slot,
                q,
                Some((indices, counts)),
                out,
                ws,
                stream,
            )
        }
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
        let ws = ws_desc(workspace, workspace_bytes);
        // SAFETY: as in sikv_kernel_calibrate.
        unsafe { attend_impl(kn, pools, page_table, seq_slot, q, None, out, ws, stream) }
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
        // SAFETY: as in sikv_kernel_calibrate (only the state pool is read).
        unsafe {
            let pools = host_ref(pools, "pools")?;
            let state = output(
                kn,
                pools.state as *mut u8,
                kn.exec.layout().layer_state_bytes,
                "pools.state",
            )?;
            kn.exec.reset_sequence(state, seq_slot, stream)
        }
    })
}

/// Select + attend in one call, the selection kept in the workspace (`sikv_workspace_size`
/// accounts for it): what a decode step needs per layer, and what a CUDA graph captures.
/// The dense crossover: the dense decode when the batch times `max_seq_len` is within it; else
/// the sparse decode when the crossover is off or the call has more than 4 sequences; else
/// whichever the live lengths of the call's sequences give, decided on the device for a device
/// page table (both paths are queued and the unchosen one returns at once), so a captured
/// graph follows the lengths as they grow.
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
        let cfg = kn.exec.cfg();
        // SAFETY: as in sikv_kernel_calibrate.
        unsafe {
            let pools = layer_view(kn, host_ref(pools, "pools")?)?;
            let t = host_ref(page_table, "page_table")?;
            let b = batch(kn, t, seq_slot, q)?;
            let n_out = t.batch as usize * (cfg.num_q_heads * cfg.head_dim) as usize * cfg.dtype.size();
            let out = output(kn, out as *mut u8, n_out, "out")?;
            kn.exec.decode(
                pools,
                &b,
                DecodePath::Crossover,
                out,
                ws_desc(workspace, workspace_bytes),
                stream,
            )
        }
    })
}

/// Several query tokens per sequence in one call (speculative-decoding verification, a chunk of a
/// prompt): sequence i's query rows are `[row_offsets[i], row_offsets[i + 1])` of `q` and `out`
/// (`[n_rows][num_q_heads][head_dim]`), 1..=SIKV_MAX_QUERY_ROWS per sequence, its last tokens,
/// appended before the call: row r of sequence i stands at position len_i - rows_i + r and attends
/// causally (to the positions up to its own) over the dense set and a selection made per row,
/// or once per sequence from the mean of its rows' queries with SIKV_FLAG_ROWS_MEAN_QUERY.
/// `row_offsets` is int32 `[batch + 1]` from 0 to `n_rows`, in the memory of the page table
/// (device memory on a GPU, where the kernels check it and a bad entry is reported by the next
/// call as a device fault; on the CPU it is checked here). Always selects (the dense crossover
/// does not apply). The selection is kept in the workspace: `sikv_workspace_size_rows(kernels, n_rows)` bytes. One row
/// per sequence is sikv_kernel_decode's sparse path. Capturable in a CUDA graph.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // sikv_kernel_decode's parameters plus the rows
pub extern "C" fn sikv_kernel_decode_rows(
    kernels: *const SikvKernels,
    pools: *const SikvLayerPools,
    page_table: *const SikvPageTable,
    seq_slot: *const i32,
    row_offsets: *const i32,
    n_rows: u32,
    q: *const c_void,
    out: *mut c_void,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(kernels), || {
        let kn = kernels_ref(kernels)?;
        let cfg = kn.exec.cfg();
        // SAFETY: as in sikv_kernel_calibrate.
        unsafe {
            let pools = layer_view(kn, host_ref(pools, "pools")?)?;
            let t = host_ref(page_table, "page_table")?;
            // n_rows sizes q and out: bounded (after the batch it is bounded by) before they
            // are taken.
            ensure!(
                t.batch >= 1 && t.batch <= cfg.max_batch,
                SIKV_ERR_OUT_OF_BOUNDS,
                "page_table.batch = {} must be in 1..=max_batch ({})",
                t.batch,
                cfg.max_batch
            );
            let most = t.batch as u64 * SIKV_MAX_QUERY_ROWS as u64;
            ensure!(
                n_rows >= t.batch && n_rows as u64 <= most,
                SIKV_ERR_OUT_OF_BOUNDS,
                "n_rows = {n_rows} must be in batch..=batch * {} ({}..={most})",
                SIKV_MAX_QUERY_ROWS,
                t.batch
            );
            let b = batch_rows(kn, t, seq_slot, q, n_rows)?;
            let offsets = input(kn, row_offsets, t.batch as usize + 1, "row_offsets")?;
            let n_out = n_rows as usize * (cfg.num_q_heads * cfg.head_dim) as usize * cfg.dtype.size();
            let out = output(kn, out as *mut u8, n_out, "out")?;
            kn.exec.decode_rows(
                pools,
                &b,
                offsets,
                n_rows,
                out,
                ws_desc(workspace, workspace_bytes),
                stream,
            )
        }
    })
}
