//! The managed cache (llama.cpp style): the library owns or describes the pools, hands out
//! pages and tracks sequences by id.

use std::ffi::c_void;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use super::boundary::{boundary, check_out, host_ref, host_slice, host_slice_mut, write_out, ForeignBytes};
use super::types::{SikvCacheInfo, SikvLayoutInfo, SikvPoolsDesc, SikvStream};
use crate::cache::{Activations, Cache, Output, Pools};
use crate::config::{CacheConfig, SikvConfig, SIKV_DEVICE_CPU, SIKV_DEVICE_CUDA};
use crate::ensure;
use crate::layout::Layout;
use crate::status::{Result, SikvStatus};

/// Opaque handle of a managed cache.
pub struct SikvCache {
    inner: Mutex<Cache>,
    poisoned: AtomicBool,
}

impl SikvCache {
    fn with<R>(&self, f: impl FnOnce(&mut Cache) -> Result<R>) -> Result<R> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

fn cache_ref<'a>(p: *const SikvCache) -> Result<&'a SikvCache> {
    unsafe { host_ref(p, "cache") }
}

fn poison_of(p: *const SikvCache) -> Option<&'static AtomicBool> {
    // A misaligned pointer cannot be a handle: leave it to the call's own check (MISALIGNED)
    // rather than read through it.
    if (p as usize) % std::mem::align_of::<SikvCache>() != 0 {
        return None;
    }
    // SAFETY: a non-NULL, aligned handle comes from sikv_cache_create and lives until destroy.
    unsafe { p.as_ref() }.map(|c| &c.poisoned)
}

/// Fills `*out` with the defaults of a profile (SIKV_PROFILE_*).
#[no_mangle]
pub extern "C" fn sikv_config_init(out: *mut SikvConfig, profile: u32) -> SikvStatus {
    boundary(None, || {
        check_out(out, "out")?;
        let c = SikvConfig::for_profile(profile)?;
        unsafe { write_out(out, c, "out") }
    })
}

/// Validates a configuration and reports the sizes of its memory.
#[no_mangle]
pub extern "C" fn sikv_query_layout(config: *const SikvConfig, out: *mut SikvLayoutInfo) -> SikvStatus {
    boundary(None, || {
        let cfg = CacheConfig::from_c(unsafe { host_ref(config, "config") }?)?;
        check_out(out, "out")?;
        let layout = Layout::new(&cfg);
        let ws = crate::exec::gpu_decode_workspace(&cfg, &layout, cfg.max_batch).total;
        unsafe { write_out(out, SikvLayoutInfo::from_layout(&layout, ws, &cfg), "out") }
    })
}

/// Creates a managed cache whose pools the library allocates (here, and only here).
///
/// On CUDA the create reads the library's testing switches (`SIKV_*` environment variables,
/// listed in docs/DESIGN.md); one set to a value the library does not understand gives
/// `SIKV_ERR_INVALID_ARGUMENT` naming it. So do `sikv_cache_create_with_pools` and
/// `sikv_kernels_create`.
///
/// Threads: a cache handle may be used from any thread. Calls on one handle from several
/// threads at once are serialised by the handle (one lock each, held for the call's host
/// work); work a call enqueues runs in the order of the streams the callers pass, so threads
/// that share a handle and pass different streams must order those streams themselves when
/// one's work depends on another's. `sikv_cache_destroy` must not race with any other call
/// on the handle. Different handles share nothing and need no coordination.
#[no_mangle]
pub extern "C" fn sikv_cache_create(config: *const SikvConfig, out: *mut *mut SikvCache) -> SikvStatus {
    boundary(None, || {
        let cfg = CacheConfig::from_c(unsafe { host_ref(config, "config") }?)?;
        check_out(out, "out")?;
        let cache = Cache::new(cfg)?;
        let h = Box::new(SikvCache {
            inner: Mutex::new(cache),
            poisoned: AtomicBool::new(false),
        });
        unsafe { write_out(out, Box::into_raw(h), "out") }
    })
}

/// Creates a managed cache over engine-owned pools (`sikv_query_layout` gives their sizes).
/// The pools must outlive the cache; the library never frees them.
#[no_mangle]
pub extern "C" fn sikv_cache_create_with_pools(
    config: *const SikvConfig,
    pools: *const SikvPoolsDesc,
    out: *mut *mut SikvCache,
) -> SikvStatus {
    boundary(None, || {
        let cfg = CacheConfig::from_c(unsafe { host_ref(config, "config") }?)?;
        let d = *unsafe { host_ref(pools, "pools") }?;
        check_out(out, "out")?;
        ensure!(!d.planes.is_null(), SIKV_ERR_NULL_POINTER, "`pools.planes` is NULL");
        ensure!(!d.state.is_null(), SIKV_ERR_NULL_POINTER, "`pools.state` is NULL");
        // Where the pools live follows the configured device; AUTO resolves as for a cache
        // without engine pools, so the engine learns one rule. The executor opened to find out
        // is the cache's own (the device's kernels are loaded once).
        let exec = crate::exec::Executor::create(&cfg, None)?;
        let pools = if exec.is_gpu() {
            Pools::Device {
                planes: d.planes as u64,
                planes_bytes: d.planes_bytes,
                state: d.state as u64,
                state_bytes: d.state_bytes,
                workspace: d.workspace as u64,
                workspace_bytes: d.workspace_bytes,
            }
        } else {
            // SAFETY: the ABI contract of this call: host pools of the given sizes that outlive
            // the cache and that only the cache touches.
            unsafe {
                Pools::Host {
                    planes: ForeignBytes::new(d.planes as *mut u8, d.planes_bytes, "pools.planes")?,
                    state: ForeignBytes::new(d.state as *mut u8, d.state_bytes, "pools.state")?,
                }
            }
        };
        let cache = Cache::on(exec, Some(pools))?;
        let h = Box::new(SikvCache {
            inner: Mutex::new(cache),
            poisoned: AtomicBool::new(false),
        });
        unsafe { write_out(out, Box::into_raw(h), "out") }
    })
}

/// Destroys a cache and frees what the library allocated. NULL is a no-op. Must not race with
/// any other call on the same handle.
#[no_mangle]
pub extern "C" fn sikv_cache_destroy(cache: *mut SikvCache) {
    let _ = boundary(None, || {
        if !cache.is_null() {
            // SAFETY: the handle came from Box::into_raw in sikv_cache_create*.
            drop(unsafe { Box::from_raw(cache) });
        }
        Ok(())
    });
}

/// Where the cache runs and how full it is.
#[no_mangle]
pub extern "C" fn sikv_cache_info(cache: *const SikvCache, out: *mut SikvCacheInfo) -> SikvStatus {
    boundary(poison_of(cache), || {
        let c = cache_ref(cache)?;
        check_out(out, "out")?;
        let info = c.with(|c| {
            let s = c.stats();
            Ok(SikvCacheInfo {
                device: if s.on_gpu { SIKV_DEVICE_CUDA } else { SIKV_DEVICE_CPU },
                num_seqs: s.num_seqs,
                free_pages: s.free_pages,
                num_pages: s.num_pages,
                bytes_per_token: c.layout.bytes_per_token(),
            })
        })?;
        unsafe { write_out(out, info, "out") }
    })
}

/// A 64-bit digest of the whole cache (pools and bookkeeping), for tests and debugging. On a
/// GPU this copies the pools to the host and synchronises: not for hot paths.
#[no_mangle]
pub extern "C" fn sikv_cache_checksum(cache: *const SikvCache, out: *mut u64) -> SikvStatus {
    boundary(poison_of(cache), || {
        let c = cache_ref(cache)?;
        check_out(out, "out")?;
        let h = c.with(|c| c.checksum())?;
        unsafe { write_out(out, h, "out") }
    })
}

/// Adds an empty sequence.
#[no_mangle]
pub extern "C" fn sikv_seq_add(cache: *mut SikvCache, seq_id: i64) -> SikvStatus {
    boundary(poison_of(cache), || cache_ref(cache)?.with(|c| c.add_seq(seq_id)))
}

/// Removes a sequence and releases its pages.
#[no_mangle]
pub extern "C" fn sikv_seq_remove(cache: *mut SikvCache, seq_id: i64) -> SikvStatus {
    boundary(poison_of(cache), || cache_ref(cache)?.with(|c| c.remove_seq(seq_id)))
}

/// Forks `src` into a new sequence `dst` sharing its full pages.
#[no_mangle]
pub extern "C" fn sikv_seq_fork(cache: *mut SikvCache, src_seq_id: i64, dst_seq_id: i64) -> SikvStatus {
    boundary(poison_of(cache), || {
        cache_ref(cache)?.with(|c| c.fork_seq(src_seq_id, dst_seq_id))
    })
}

/// Tokens stored for a sequence at a layer.
#[no_mangle]
pub extern "C" fn sikv_seq_len(cache: *const SikvCache, seq_id: i64, layer: u32, out: *mut u32) -> SikvStatus {
    boundary(poison_of(cache), || {
        let c = cache_ref(cache)?;
        check_out(out, "out")?;
        let n = c.with(|c| c.seq_len(seq_id, layer))?;
        unsafe { write_out(out, n, "out") }
    })
}

/// Activations of the model dtype at a caller pointer: host bytes on the CPU, a device
/// address on CUDA.
///
/// # Safety
/// On the CPU, `p` points to `elems` readable elements for the duration of the call.
unsafe fn activations<'a>(c: &Cache, p: *const c_void, elems: usize, name: &str) -> Result<Activations<'a>> {
    if c.is_gpu() {
        ensure!(!p.is_null(), SIKV_ERR_NULL_POINTER, "`{name}` is NULL");
        Ok(Activations::Device(p as u64))
    } else {
        host_slice(p as *const u8, elems * c.cfg.dtype.size(), name).map(Activations::Host)
    }
}

/// # Safety
/// On the CPU, `p` points to `elems` writable elements for the duration of the call.
unsafe fn output<'a>(c: &Cache, p: *mut c_void, elems: usize, name: &str) -> Result<Output<'a>> {
    if c.is_gpu() {
        ensure!(!p.is_null(), SIKV_ERR_NULL_POINTER, "`{name}` is NULL");
        Ok(Output::Device(p as u64))
    } else {
        host_slice_mut(p as *mut u8, elems * c.cfg.dtype.size(), name).map(Output::Host)
    }
}

fn ids<'a>(n_seqs: u32, seq_ids: *const i64) -> Result<&'a [i64]> {
    ensure!(n_seqs >= 1, SIKV_ERR_INVALID_ARGUMENT, "n_seqs must be >= 1");
    unsafe { host_slice(seq_ids, n_seqs as usize, "seq_ids") }
}

/// The sequence ids of an attend-like call: 1..=max_batch of them.
fn batch_ids<'a>(c: &Cache, n_seqs: u32, seq_ids: *const i64) -> Result<&'a [i64]> {
    ensure!(
        n_seqs <= c.cfg.max_batch,
        SIKV_ERR_OUT_OF_BOUNDS,
        "n_seqs = {n_seqs} exceeds max_batch = {}",
        c.cfg.max_batch
    );
    ids(n_seqs, seq_ids)
}

/// Calibrates a sequence at one layer from its prompt and stores the prompt compressed.
/// `k`, `v`: `[n_tokens][num_kv_heads][head_dim]` post-RoPE; `q_tail`: the last `n_query`
/// prompt queries `[n_query][num_q_heads][head_dim]` (the last row picks the heavy tokens).
/// Pointers are host memory on the CPU, device memory on CUDA; dtype is config.dtype.
#[no_mangle]
pub extern "C" fn sikv_calibrate(
    cache: *mut SikvCache,
    layer: u32,
    seq_id: i64,
    n_tokens: u32,
    k: *const c_void,
    v: *const c_void,
    n_query: u32,
    q_tail: *const c_void,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(cache), || {
        cache_ref(cache)?.with(|c| {
            let kv = n_tokens as usize * (c.cfg.num_kv_heads * c.cfg.head_dim) as usize;
            let qn = n_query as usize * (c.cfg.num_q_heads * c.cfg.head_dim) as usize;
            ensure!(
                n_tokens <= c.cfg.max_seq_len,
                SIKV_ERR_OUT_OF_BOUNDS,
                "n_tokens = {n_tokens} exceeds max_seq_len = {}",
                c.cfg.max_seq_len
            );
            ensure!(
                n_query <= n_tokens,
                SIKV_ERR_INVALID_ARGUMENT,
                "n_query = {n_query} exceeds n_tokens = {n_tokens}"
            );
            let k = unsafe { activations(c, k, kv, "k") }?;
            let v = unsafe { activations(c, v, kv, "v") }?;
            let q = unsafe { activations(c, q_tail, qn, "q_tail") }?;
            c.calibrate(layer, seq_id, n_tokens, k, v, n_query, q, stream)
        })
    })
}

/// Appends tokens at one layer: `n_tokens[i]` tokens to `seq_ids[i]` (NULL `n_tokens` = one
/// each, the decode step). `k`, `v`: all tokens in order, `[total][num_kv_heads][head_dim]`.
#[no_mangle]
pub extern "C" fn sikv_append(
    cache: *mut SikvCache,
    layer: u32,
    n_seqs: u32,
    seq_ids: *const i64,
    n_tokens: *const u32,
    k: *const c_void,
    v: *const c_void,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(cache), || {
        cache_ref(cache)?.with(|c| {
            let ids = ids(n_seqs, seq_ids)?;
            let counts: Vec<u32> = if n_tokens.is_null() {
                vec![1; ids.len()]
            } else {
                unsafe { host_slice(n_tokens, ids.len(), "n_tokens") }?.to_vec()
            };
            let total: u64 = counts.iter().map(|&x| x as u64).sum();
            ensure!(
                total <= c.cfg.max_append_tokens as u64,
                SIKV_ERR_OUT_OF_BOUNDS,
                "n_tokens add up to {total} tokens, over max_append_tokens = {}",
                c.cfg.max_append_tokens
            );
            let kv = total as usize * (c.cfg.num_kv_heads * c.cfg.head_dim) as usize;
            let k = unsafe { activations(c, k, kv, "k") }?;
            let v = unsafe { activations(c, v, kv, "v") }?;
            c.append(layer, ids, &counts, k, v, stream)
        })
    })
}

#[allow(clippy::too_many_arguments)] // the exported call's parameters and which variant
fn attend_common(
    cache: *mut SikvCache,
    layer: u32,
    n_seqs: u32,
    seq_ids: *const i64,
    q: *const c_void,
    out: *mut c_void,
    stream: SikvStream,
    dense: bool,
) -> SikvStatus {
    boundary(poison_of(cache), || {
        cache_ref(cache)?.with(|c| {
            let ids = batch_ids(c, n_seqs, seq_ids)?;
            let n = ids.len() * (c.cfg.num_q_heads * c.cfg.head_dim) as usize;
            let q = unsafe { activations(c, q, n, "q") }?;
            let out = unsafe { output(c, out, n, "out") }?;
            if dense {
                c.attend_dense(layer, ids, q, out, stream)
            } else {
                c.attend(layer, ids, q, out, stream)
            }
        })
    })
}

/// Sparse decode attention at one layer, one query token per sequence:
/// `q`, `out`: `[n_seqs][num_q_heads][head_dim]`.
#[no_mangle]
pub extern "C" fn sikv_attend(
    cache: *mut SikvCache,
    layer: u32,
    n_seqs: u32,
    seq_ids: *const i64,
    q: *const c_void,
    out: *mut c_void,
    stream: SikvStream,
) -> SikvStatus {
    attend_common(cache, layer, n_seqs, seq_ids, q, out, stream, false)
}

/// Attention for several new tokens per sequence in one call (speculative-decoding verification, a
/// chunk of a prompt): sequence `seq_ids[i]` brought `rows[i]` tokens (1..=SIKV_MAX_QUERY_ROWS,
/// appended with sikv_append before this call; `rows` is a HOST array of n_seqs). `q`, `out`:
/// `[R][num_q_heads][head_dim]` with R the sum of `rows`, sequence i's rows after those of i - 1,
/// in position order. Row r of sequence i stands at position len_i - rows[i] + r and attends to the
/// positions up to its own (causal among the new tokens), over the dense set and
/// a selection made per row, or once per sequence from the mean of its rows' queries with
/// SIKV_FLAG_ROWS_MEAN_QUERY. One row per sequence is sikv_attend's selecting path (the dense
/// crossover does not apply here). On a CUDA cache, whose workspace holds max_batch query
/// rows, a call with more runs as consecutive groups of whole sequences on the stream (the same
/// outputs); one sequence may bring at most max_batch rows.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // sikv_attend's parameters plus the rows
pub extern "C" fn sikv_attend_rows(
    cache: *mut SikvCache,
    layer: u32,
    n_seqs: u32,
    seq_ids: *const i64,
    rows: *const u32,
    q: *const c_void,
    out: *mut c_void,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(cache), || {
        cache_ref(cache)?.with(|c| {
            let ids = batch_ids(c, n_seqs, seq_ids)?;
            let rows = unsafe { host_slice(rows, ids.len(), "rows") }?;
            let total = crate::cpu::rows_total(rows, ids.len())?;
            let n = total * (c.cfg.num_q_heads * c.cfg.head_dim) as usize;
            let q = unsafe { activations(c, q, n, "q") }?;
            let out = unsafe { output(c, out, n, "out") }?;
            c.attend_rows(layer, ids, rows, q, out, stream)
        })
    })
}

/// Sparse decode attention with a selection the caller supplies instead of the library's own:
/// `indices` `[n_seqs][num_kv_heads][budget_max]` ascending candidate positions (then anything),
/// `counts` `[n_seqs][num_kv_heads]`, both HOST int32 arrays in sikv_select's layout. The dense
/// set (sinks, heavy, window) is attended as always. For evaluation (oracle selections at the
/// cache's bits) and external selectors; not a hot-path call: it validates on the host and, on a
/// GPU, reads the state records and copies the selection to the device. `q`, `out` as in
/// sikv_attend.
#[no_mangle]
pub extern "C" fn sikv_attend_selected(
    cache: *mut SikvCache,
    layer: u32,
    n_seqs: u32,
    seq_ids: *const i64,
    q: *const c_void,
    indices: *const i32,
    counts: *const i32,
    out: *mut c_void,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(cache), || {
        cache_ref(cache)?.with(|c| {
            let ids = batch_ids(c, n_seqs, seq_ids)?;
            let rows = ids.len() * c.cfg.num_kv_heads as usize;
            let n = ids.len() * (c.cfg.num_q_heads * c.cfg.head_dim) as usize;
            let q = unsafe { activations(c, q, n, "q") }?;
            let idx = unsafe { host_slice(indices, rows * c.cfg.budget.max as usize, "indices") }?;
            let cnt = unsafe { host_slice(counts, rows, "counts") }?;
            let out = unsafe { output(c, out, n, "out") }?;
            c.attend_selected(layer, ids, q, idx, cnt, out, stream)
        })
    })
}

/// Dense decode attention over every stored token (dequantised): the baseline, same shapes.
#[no_mangle]
pub extern "C" fn sikv_attend_dense(
    cache: *mut SikvCache,
    layer: u32,
    n_seqs: u32,
    seq_ids: *const i64,
    q: *const c_void,
    out: *mut c_void,
    stream: SikvStream,
) -> SikvStatus {
    attend_common(cache, layer, n_seqs, seq_ids, q, out, stream, true)
}

/// The selection the sparse path makes, into HOST arrays (telemetry; on a GPU this
/// synchronises): `indices` `[n_seqs][num_kv_heads][budget_max]` ascending positions then -1,
/// `counts` `[n_seqs][num_kv_heads]`.
#[no_mangle]
pub extern "C" fn sikv_select(
    cache: *mut SikvCache,
    layer: u32,
    n_seqs: u32,
    seq_ids: *const i64,
    q: *const c_void,
    indices: *mut i32,
    counts: *mut i32,
    stream: SikvStream,
) -> SikvStatus {
    boundary(poison_of(cache), || {
        cache_ref(cache)?.with(|c| {
            let ids = batch_ids(c, n_seqs, seq_ids)?;
            let rows = ids.len() * c.cfg.num_kv_heads as usize;
            let q = unsafe { activations(c, q, ids.len() * (c.cfg.num_q_heads * c.cfg.head_dim) as usize, "q") }?;
            let idx = unsafe { host_slice_mut(indices, rows * c.cfg.budget.max as usize, "indices") }?;
            let cnt = unsafe { host_slice_mut(counts, rows, "counts") }?;
            let mut idx_tmp = vec![-1i32; idx.len()];
            let mut cnt_tmp = vec![0i32; cnt.len()];
            c.select(layer, ids, q, &mut idx_tmp, &mut cnt_tmp, stream)?;
            idx.copy_from_slice(&idx_tmp);
            cnt.copy_from_slice(&cnt_tmp);
            Ok(())
        })
    })
}

/// Selection telemetry for one sequence and one query token: for each KV head, the exact
/// attention mass the attended set (dense set + selection) captures, divided by the mass of the
/// best set of the same size (oracle top-k by exact q.k), averaged over the head's query heads.
/// `q`: `[num_q_heads][head_dim]` and `k_exact`: the sequence's exact post-RoPE keys
/// `[seq_len][num_kv_heads][head_dim]`, both HOST float32; `recall`: `[num_kv_heads]` floats.
/// Not a hot-path call: it allocates and, on a GPU, synchronises.
#[no_mangle]
pub extern "C" fn sikv_selection_recall(
    cache: *mut SikvCache,
    layer: u32,
    seq_id: i64,
    q: *const f32,
    k_exact: *const f32,
    recall: *mut f32,
) -> SikvStatus {
    boundary(poison_of(cache), || {
        cache_ref(cache)?.with(|c| {
            let (hq, hk, d) = (
                c.cfg.num_q_heads as usize,
                c.cfg.num_kv_heads as usize,
                c.cfg.head_dim as usize,
            );
            let len = c.seq_len(seq_id, layer)? as usize;
            let qf = unsafe { host_slice(q, hq * d, "q") }?;
            let kf = unsafe { host_slice(k_exact, len * hk * d, "k_exact") }?;
            let out = unsafe { host_slice_mut(recall, hk, "recall") }?;
            let r = crate::cache::telemetry_recall(c, layer, seq_id, qf, kf)?;
            out.copy_from_slice(&r);
            Ok(())
        })
    })
}
