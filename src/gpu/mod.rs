//! CUDA dispatch: the driver API in the device's primary context (the one the CUDA runtime
//! uses), module loading (embedded fatbin, else NVRTC), and one launcher per stage.
//!
//! Layers, bottom up (like cudarc): [`driver`] wraps raw `sys` calls and maps every failure to
//! `SIKV_ERR_CUDA` naming the call; [`kernels`] is the per-configuration kernel table;
//! [`params`] is the by-value argument block and [`geometry`] the launch constants and fault
//! bits, both written into the kernels' generated header by build.rs (their only definition);
//! [`workspace`] carves the caller's workspace; this file holds the safe launchers.
//!
//! Device faults. The host validates what it can see (sizes, batch bounds, pointers), but the
//! engine's index arrays live on the device: seq_slot, position, slot_mapping, the page table,
//! counts and indices. Kernels check each such index once per work item before it addresses
//! memory; a bad one skips the item (kernels never touch memory outside the pools) and ORs a
//! `geometry::FAULT_*` bit into a 32-bit fault word in page-locked host memory mapped into the
//! device (one per context, allocated at create time). The rule: **every public launcher
//! first calls [`GpuContext::take_fault`]**, so a fault raised by a kernel that has completed
//! is reported by the next call on the handle as `SIKV_ERR_OUT_OF_BOUNDS`, naming the failed
//! checks, the same status the CPU backend returns for the same input at once. Reading the word
//! is a host load: no synchronisation, no copy, so graph capture and the hot-path contract
//! hold. A kernel still running when the next call starts reports at the call after it; an
//! executor may also call [`GpuContext::check_faults`] after it synchronises.
//!
//! Contract of the hot-path launchers (`append`, `select`, `attend`, `attend_dense`): they only
//! validate host-side arguments and enqueue kernels on the caller's stream. No allocation, no
//! synchronisation, no device-to-host read, no module loading, grids derived from the
//! configuration bounds (never from live lengths): CUDA-graph capturable. Streams are borrowed
//! `CUstream`/`cudaStream_t` handles (null = the legacy default stream); device pointers are
//! borrowed `u64` addresses.

/// What build.rs embedded: the fatbin (when nvcc was found) and/or the kernel sources.
pub mod embed {
    include!(concat!(env!("OUT_DIR"), "/kernels_embed.rs"));
}

mod driver;
mod gate;
pub mod geometry;
mod kernels;
mod nvrtc;
pub mod params;
pub mod upload;
pub mod workspace;

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::config::{CacheConfig, Dtype};
use crate::layout::{Layout, SIKV_NUM_PLANES};
use crate::status::{Error, Result, SikvStatus};

use cudarc::driver::sys;
pub use gate::StreamGate;
use geometry::*;
use kernels::{Kernel, Kernels};
use params::SikvParams;
use workspace::Workspace;

/// Parts of `select` (see [`GpuContext::select_stages`]).
pub const SELECT_SCORE: u32 = 1;
pub const SELECT_TOPK: u32 = 2;
pub const SELECT_RERANK: u32 = 4;
pub const SELECT_ALL: u32 = 7;
/// Benchmarking aid (multi-CTA top-k only): the final top-k kernel leaves the candidate counter
/// as it found it; alone, it launches only that kernel. `SELECT_TOPK | SELECT_TOPK_FINAL` once,
/// then `SELECT_TOPK_FINAL` repeatedly times the final kernel over the same candidates.
pub const SELECT_TOPK_FINAL: u32 = 16;

/// A caller's stream: `cudaStream_t` / `CUstream` (null = legacy default stream). Borrowed.
pub type CUstream = *mut c_void;

/// One layer's pools on the device: the base address of each plane (0 for absent planes) and
/// of the layer's state pool; borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevLayer {
    pub planes: [u64; SIKV_NUM_PLANES],
    pub state: u64,
}

/// A FlashInfer-style CSR page table in device memory: int32 `indptr[batch + 1]`,
/// `indices[..]`, `last_page_len[batch]`; borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPageTable {
    pub indptr: u64,
    pub indices: u64,
    pub last_page_len: u64,
    pub batch: u32,
}

/// A decode batch on the device (select, attend, attend_dense): the page table, int32
/// `seq_slot[batch]` (each sequence's state slot) and the queries `q`, `[batch][H_q][d]` in the
/// model dtype, 16-byte aligned; borrowed. `table.batch` is the batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevBatch {
    pub table: DevPageTable,
    pub seq_slot: u64,
    pub q: u64,
}

/// A selection on the device, written by select and read by attend: int32
/// `indices[batch][H_kv][budget_max]` (ascending positions, the rest of a row -1) and int32
/// `counts[batch][H_kv]`; borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevSelection {
    pub indices: u64,
    pub counts: u64,
}

/// The caller's device workspace: `bytes` at `ptr` (16-byte aligned), at least
/// [`GpuContext::workspace_bytes`] for the call's batch; borrowed, and reused freely between
/// calls on one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevWorkspace {
    pub ptr: u64,
    pub bytes: usize,
}

/// New tokens of any sequences (append): `n` rows of keys and values `k`, `v`,
/// `[n][H_kv][d]` in the model dtype (16-byte aligned); int64 `slot_mapping[n]`
/// (`page * page_size + slot`, `< 0` = no page write); int32 `seq_slot[n]` and `position[n]`
/// (whose token it is, and where in its sequence); borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevTokens {
    pub n: u32,
    pub k: u64,
    pub v: u64,
    pub slot_mapping: u64,
    pub seq_slot: u64,
    pub position: u64,
}

/// One sequence's prompt (calibrate): `n_tokens` rows of keys and values `k`, `v`,
/// `[n_tokens][H_kv][d]`; the last `n_query` prompt queries `q_tail`, `[n_query][H_q][d]`
/// (model dtype, 16-byte aligned); int64 `slot_mapping[n_tokens]` (`< 0` = no page write).
/// `seq_slot` is the state slot calibrated. Device addresses borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPrompt {
    pub seq_slot: u32,
    pub n_tokens: u32,
    pub k: u64,
    pub v: u64,
    pub n_query: u32,
    pub q_tail: u64,
    pub slot_mapping: u64,
}

struct Inner {
    dev: driver::Device,
    module: driver::CUmodule,
    /// The fault word: page-locked host memory (u32) and its device address.
    fault_host: *mut u8,
    fault_dev: u64,
    kernels: Kernels,
    build_path: String,
    head_dim: u32,
    dtype: Dtype,
    topk: TopkPath,
}

/// Which stage-1 top-k `select` runs (env SIKV_TOPK, read once at [`GpuContext::new`]):
/// `single` = one CTA per row (the original kernel), anything else or unset = multi-CTA
/// (histogram in the score kernel, multi-CTA compaction, one-CTA finish). `multi:N` also caps
/// the candidate slots per row at N (a testing aid: small N sends rows down the on-device
/// fallback to the one-CTA select).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkPath {
    Single,
    Multi { cand_cap: Option<u32> },
}

impl TopkPath {
    fn from_env() -> TopkPath {
        match std::env::var("SIKV_TOPK") {
            Ok(v) if v.trim() == "single" => TopkPath::Single,
            Ok(v) => TopkPath::Multi {
                cand_cap: v.trim().strip_prefix("multi:").and_then(|n| n.parse().ok()),
            },
            Err(_) => TopkPath::Multi { cand_cap: None },
        }
    }
}

// SAFETY: the raw handles are process-wide driver objects; CUDA allows using a context, module
// and functions from any thread, and nothing here is mutated after creation.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        if driver::set_current(self.dev.ctx).is_ok() {
            driver::unload_module(self.module);
            driver::host_free_pinned(self.fault_host);
        }
        driver::release_primary(self.dev.dev);
    }
}

/// The CUDA backend of one configuration. `Send + Sync`; cheap to clone (shared handles).
#[derive(Clone)]
pub struct GpuContext {
    inner: Arc<Inner>,
}

/// A device allocation made at create time (`cuMemAlloc`), freed on drop.
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    inner: Arc<Inner>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The whole buffer as a launcher's workspace.
    pub fn as_workspace(&self) -> DevWorkspace {
        DevWorkspace {
            ptr: self.ptr,
            bytes: self.bytes,
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if driver::set_current(self.inner.dev.ctx).is_ok() {
            driver::mem_free(self.ptr);
        }
    }
}

/// A stream created by the library (tests and benches only; engines pass their own).
pub struct OwnedStream {
    pub raw: CUstream,
    inner: Arc<Inner>,
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        if driver::set_current(self.inner.dev.ctx).is_ok() {
            driver::stream_destroy(self.raw as sys::CUstream);
        }
    }
}

/// An instantiated CUDA graph (tests and benches).
pub struct Graph {
    exec: sys::CUgraphExec,
    inner: Arc<Inner>,
}

impl Graph {
    pub fn launch(&self, stream: CUstream) -> Result<()> {
        driver::set_current(self.inner.dev.ctx)?;
        driver::graph_launch(self.exec, stream as sys::CUstream)
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if driver::set_current(self.inner.dev.ctx).is_ok() {
            driver::graph_destroy(self.exec);
        }
    }
}

/// encode: one warp per (token, KV head).
fn encode_grid(n: u32, num_kv_heads: u32) -> (u32, u32, u32) {
    let warps = n as u64 * num_kv_heads as u64;
    (warps.div_ceil((ENCODE_THREADS / 32) as u64) as u32, 1, 1)
}

// The attend kernel keeps ATTEND_MAX_GROUP query heads per KV head in shared memory.
const _: () = assert!(crate::config::MAX_GQA_RATIO <= ATTEND_MAX_GROUP);
// Launch sizes the kernels assume: whole warps, and (top-k histogram scan) bins that split
// evenly over the threads.
const _: () = assert!(ENCODE_THREADS % 32 == 0 && ATTEND_THREADS % 32 == 0 && COMBINE_THREADS % 32 == 0);
const _: () = assert!(TOPK_HIST_BINS % TOPK_THREADS as usize == 0 && TOPK_HIST_BINS % COMPACT_THREADS as usize == 0);

fn cuda_stream(s: CUstream) -> sys::CUstream {
    s as sys::CUstream
}

fn need(ptr: u64, name: &str) -> Result<()> {
    if ptr == 0 {
        return Err(Error::null(name));
    }
    Ok(())
}

fn aligned(ptr: u64, align: u64, name: &str) -> Result<()> {
    if ptr % align != 0 {
        return Err(Error::new(
            SikvStatus::SIKV_ERR_MISALIGNED,
            format!("`{name}` = {ptr:#x} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

/// Required and aligned (device pointers read with vector loads are 16-byte aligned).
fn dev_ptr(ptr: u64, align: u64, name: &str) -> Result<()> {
    need(ptr, name)?;
    aligned(ptr, align, name)
}

/// The message of a nonzero fault word: each set bit's check, in bit order.
fn fault_message(bits: u32) -> String {
    let mut what: Vec<String> = FAULT_NAMES
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let known = FAULT_NAMES.iter().fold(0, |a, (b, _)| a | b);
    if bits & !known != 0 {
        what.push(format!("unknown fault bits {:#x}", bits & !known));
    }
    format!(
        "detected on the device in an earlier call on this handle (the offending work items were skipped): {}",
        what.join("; ")
    )
}

fn dtype_name(d: Dtype) -> Result<&'static str> {
    match d {
        Dtype::F16 => Ok("f16"),
        Dtype::Bf16 => Ok("bf16"),
        Dtype::F32 => Err(Error::unsupported(
            "config.dtype = F32 is not supported by the CUDA backend (use F16 or BF16 activations)",
        )),
    }
}

/// Compiles the embedded kernel sources with NVRTC for compute capability `major.minor`
/// without a device (the fallback path's compile step): returns the image size and what was
/// built. An error when libnvrtc is missing or the sources fail to compile.
/// `only` = Some((head_dim, "f16" | "bf16")) compiles one variant, as GpuContext::new does.
pub fn nvrtc_check(major: i32, minor: i32, only: Option<(u32, &str)>) -> Result<(usize, String)> {
    let (image, desc) = nvrtc::compile_variant(embed::NVRTC_MAIN, embed::SOURCES, major, minor, only)?;
    Ok((image.len(), desc))
}

impl GpuContext {
    /// Opens the driver, retains the primary context of `cfg.device_ordinal` and loads the
    /// kernels of this configuration (embedded fatbin, else NVRTC). NO_DEVICE when there is
    /// no driver or device; UNSUPPORTED for f32 activations or a GPU older than sm_80.
    pub fn new(cfg: &CacheConfig, layout: &Layout) -> Result<GpuContext> {
        let _ = layout;
        driver::init()?;
        let dev = driver::retain_primary(cfg.device_ordinal)?;
        let release = |e: Error, dev: &driver::Device| {
            driver::release_primary(dev.dev);
            e
        };
        if dev.major < 8 {
            let e = Error::unsupported(format!(
                "device {} ({}) has compute capability {}.{}; sm_80 or newer is required",
                cfg.device_ordinal, dev.name, dev.major, dev.minor
            ));
            return Err(release(e, &dev));
        }
        let dt = match dtype_name(cfg.dtype) {
            Ok(d) => d,
            Err(e) => return Err(release(e, &dev)),
        };
        if let Err(e) = driver::set_current(dev.ctx) {
            return Err(release(e, &dev));
        }
        let (module, kernels, build_path) = match Self::load(&dev, cfg.head_dim, dt) {
            Ok(x) => x,
            Err(e) => return Err(release(e, &dev)),
        };
        let fault = driver::host_alloc_pinned(4).and_then(|h| match driver::host_device_ptr(h) {
            Ok(d) => Ok((h, d)),
            Err(e) => {
                driver::host_free_pinned(h);
                Err(e)
            }
        });
        let (fault_host, fault_dev) = match fault {
            Ok(x) => x,
            Err(e) => {
                driver::unload_module(module);
                return Err(release(e, &dev));
            }
        };
        // SAFETY: a fresh 4-byte (at least) page-locked allocation, aligned for u32.
        unsafe { std::ptr::write_volatile(fault_host as *mut u32, 0) };
        Ok(GpuContext {
            inner: Arc::new(Inner {
                dev,
                module,
                fault_host,
                fault_dev,
                kernels,
                build_path,
                head_dim: cfg.head_dim,
                dtype: cfg.dtype,
                topk: TopkPath::from_env(),
            }),
        })
    }

    fn load(dev: &driver::Device, d: u32, dt: &str) -> Result<(driver::CUmodule, Kernels, String)> {
        let mut why = String::new();
        // SIKV_FORCE_NVRTC=1 skips the embedded fatbin (to exercise the fallback).
        let force_nvrtc = std::env::var("SIKV_FORCE_NVRTC").map(|v| v == "1").unwrap_or(false);
        let fatbin = if force_nvrtc { None } else { embed::FATBIN };
        if let Some(fb) = fatbin {
            match driver::load_module(fb) {
                Ok(m) => match Kernels::load(m, d, dt) {
                    Ok(k) => return Ok((m, k, "fatbin".to_string())),
                    Err(e) => {
                        driver::unload_module(m);
                        why = format!("fatbin kernels: {}", e.message);
                    }
                },
                Err(e) => why = format!("fatbin: {}", e.message),
            }
        }
        let (image, _desc) =
            nvrtc::compile_variant(embed::NVRTC_MAIN, embed::SOURCES, dev.major, dev.minor, Some((d, dt))).map_err(
                |e| {
                    Error::new(
                        e.status,
                        if why.is_empty() {
                            e.message
                        } else {
                            format!("{} (after {why})", e.message)
                        },
                    )
                },
            )?;
        let m = driver::load_module(&image)?;
        match Kernels::load(m, d, dt) {
            Ok(k) => Ok((m, k, "nvrtc".to_string())),
            Err(e) => {
                driver::unload_module(m);
                Err(e)
            }
        }
    }

    /// "fatbin" or "nvrtc": how the kernels were loaded.
    pub fn build_path(&self) -> &str {
        &self.inner.build_path
    }

    /// The stage-1 top-k implementation `select` uses (SIKV_TOPK at create time).
    pub fn topk_path(&self) -> TopkPath {
        self.inner.topk
    }

    /// Compute capability and name of the device.
    pub fn device_info(&self) -> (i32, i32, String) {
        (self.inner.dev.major, self.inner.dev.minor, self.inner.dev.name.clone())
    }

    fn current(&self) -> Result<()> {
        driver::set_current(self.inner.dev.ctx)
    }

    fn check_cfg(&self, cfg: &CacheConfig) -> Result<()> {
        if cfg.head_dim != self.inner.head_dim || cfg.dtype != self.inner.dtype {
            return Err(Error::invalid(format!(
                "this GPU context was created for head_dim {} / {:?}, called with head_dim {} / {:?}",
                self.inner.head_dim, self.inner.dtype, cfg.head_dim, cfg.dtype
            )));
        }
        Ok(())
    }

    /// Every kernel launch goes through here, so every one carries the fault word's address.
    fn launch(&self, k: &Kernel, grid: (u32, u32, u32), block: u32, stream: CUstream, p: &SikvParams) -> Result<()> {
        let mut p = *p;
        p.fault = self.inner.fault_dev;
        driver::launch(k.f, k.name, grid, block, cuda_stream(stream), &p)
    }

    /// Reports (and clears) the device faults raised since the last call: `Ok` when none,
    /// else `SIKV_ERR_OUT_OF_BOUNDS` naming each failed check. A host load of mapped memory:
    /// no synchronisation, so it sees the faults of kernels that have completed. Every public
    /// launcher calls it first (see the module doc).
    pub fn take_fault(&self) -> Result<()> {
        let word = self.inner.fault_host as *const u32;
        // SAFETY: the word lives as long as `inner`; the device writes it concurrently, hence
        // the volatile load.
        if unsafe { std::ptr::read_volatile(word) } == 0 {
            return Ok(());
        }
        // SAFETY: as above, and 4-byte aligned; the swap keeps bits the device sets after the
        // load for the next call.
        let bits = unsafe { AtomicU32::from_ptr(word as *mut u32) }.swap(0, Ordering::SeqCst);
        if bits == 0 {
            return Ok(());
        }
        Err(Error::bounds(fault_message(bits)))
    }

    /// The same check as [`take_fault`](Self::take_fault), for callers outside the launchers
    /// (an executor after it synchronises a stream, say).
    pub fn check_faults(&self) -> Result<()> {
        self.take_fault()
    }

    // ------------------------------------------------------------------------------------
    // Memory helpers (create time, tests, non-hot paths).

    /// `cuMemAlloc` (create time only); freed when the buffer drops.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.current()?;
        let ptr = driver::mem_alloc(bytes)?;
        Ok(DeviceBuffer {
            ptr,
            bytes,
            inner: self.inner.clone(),
        })
    }

    pub fn memset_async(&self, dst: u64, value: u8, bytes: usize, stream: CUstream) -> Result<()> {
        self.current()?;
        driver::memset_async(dst, value, bytes, cuda_stream(stream))
    }

    pub fn copy_htod_async(&self, dst: u64, src: &[u8], stream: CUstream) -> Result<()> {
        self.current()?;
        driver::copy_htod_async(dst, src, cuda_stream(stream))
    }

    /// Device-to-device copy on `stream` (sequence forks: state records, pages).
    pub fn copy_dtod_async(&self, dst: u64, src: u64, bytes: usize, stream: CUstream) -> Result<()> {
        self.current()?;
        driver::copy_dtod_async(dst, src, bytes, cuda_stream(stream))
    }

    /// The device twin of cpu::reset_sequence for one layer: zeroes the state records of
    /// `seq_slot` (all KV heads; not calibrated) and marks every dense entry empty. Two
    /// memsets per KV head, asynchronous on `stream`.
    pub fn reset_sequence(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        seq_slot: u32,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        crate::ensure!(
            seq_slot < cfg.max_seqs,
            SIKV_ERR_OUT_OF_BOUNDS,
            "seq_slot = {seq_slot} is outside 0..max_seqs ({})",
            cfg.max_seqs
        );
        dev_ptr(layer.state, 16, "state")?;
        self.current()?;
        let st = &layout.state;
        for h in 0..layout.num_kv_heads {
            let rec = layer.state + layout.state_offset(seq_slot as usize, h) as u64;
            driver::memset_async(rec, 0, st.bytes, cuda_stream(stream))?;
            if st.dense_capacity > 0 {
                driver::memset32_async(
                    rec + st.dense_pos as u64,
                    u32::MAX,
                    st.dense_capacity,
                    cuda_stream(stream),
                )?;
            }
        }
        Ok(())
    }

    /// Synchronous device-to-host copy (tests and non-hot paths only).
    pub fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.current()?;
        driver::copy_dtoh(dst, src)
    }

    pub fn synchronize(&self, stream: CUstream) -> Result<()> {
        self.current()?;
        driver::stream_sync(cuda_stream(stream))
    }

    /// A non-blocking stream owned by the returned value (tests and benches).
    pub fn create_stream(&self) -> Result<OwnedStream> {
        self.current()?;
        Ok(OwnedStream {
            raw: driver::stream_create()? as CUstream,
            inner: self.inner.clone(),
        })
    }

    /// Records everything `body` enqueues on `stream` (a non-default stream) into a graph.
    pub fn capture<F: FnOnce() -> Result<()>>(&self, stream: CUstream, body: F) -> Result<Graph> {
        self.current()?;
        driver::begin_capture(cuda_stream(stream))?;
        let r = body();
        let g = driver::end_capture(cuda_stream(stream));
        r?;
        Ok(Graph {
            exec: g?,
            inner: self.inner.clone(),
        })
    }

    /// Milliseconds taken on `stream` by what `body` enqueues (CUDA events; synchronises).
    pub fn time_ms<F: FnOnce() -> Result<()>>(&self, stream: CUstream, body: F) -> Result<f32> {
        self.current()?;
        let a = driver::event_create()?;
        let b = driver::event_create()?;
        let r = (|| {
            driver::event_record(a, cuda_stream(stream))?;
            body()?;
            driver::event_record(b, cuda_stream(stream))?;
            driver::event_elapsed_ms(a, b)
        })();
        driver::event_destroy(a);
        driver::event_destroy(b);
        r
    }

    /// The C layout of SikvParams as the device sees it (see params::layout_probe).
    pub fn params_layout(&self) -> Result<[i32; 7]> {
        self.current()?;
        let buf = self.alloc(64)?;
        let ptr = buf.ptr();
        let f = self.inner.kernels.params_layout;
        driver::launch(f.f, f.name, (1, 1, 1), 1, std::ptr::null_mut(), &ptr)?;
        driver::stream_sync(std::ptr::null_mut())?;
        let mut out = [0u8; 28];
        driver::copy_dtoh(&mut out, ptr)?;
        let mut v = [0i32; 7];
        for (i, x) in v.iter_mut().enumerate() {
            *x = i32::from_le_bytes(out[4 * i..4 * i + 4].try_into().unwrap());
        }
        Ok(v)
    }

    // ------------------------------------------------------------------------------------
    // Workspace.

    /// Bytes of workspace every call with a batch of up to `batch` sequences needs (from the
    /// declared maxima only). Calibrate needs `workspace_bytes(cfg, layout, 1)`.
    pub fn workspace_bytes(cfg: &CacheConfig, layout: &Layout, batch: u32) -> usize {
        Workspace::new(cfg, layout, batch).total
    }

    fn with_ws(p: &mut SikvParams, ws: u64, w: &Workspace) {
        p.ws_keys = ws + w.keys as u64;
        p.ws_list = ws + w.list as u64;
        p.ws_list_n = ws + w.list_n as u64;
        p.ws_keys2 = ws + w.keys2 as u64;
        p.ws_part_acc = ws + w.part_acc as u64;
        p.ws_part_ml = ws + w.part_ml as u64;
        p.ws_qbar = ws + w.qbar as u64;
        p.ws_rank = ws + w.rank as u64;
        p.ws_hist = ws + w.hist as u64;
        p.ws_cand = ws + w.cand as u64;
        p.key_stride = w.key_stride as i32;
        p.cand_cap = w.cand_cap as i32;
    }

    fn check_ws(ws: DevWorkspace, w: &Workspace) -> Result<()> {
        dev_ptr(ws.ptr, 16, "ws")?;
        if ws.bytes < w.total {
            return Err(Error::new(
                SikvStatus::SIKV_ERR_BUFFER_TOO_SMALL,
                format!(
                    "ws_bytes = {} is smaller than the {} bytes the workspace needs",
                    ws.bytes, w.total
                ),
            ));
        }
        Ok(())
    }

    fn layer_params(cfg: &CacheConfig, layout: &Layout, layer: &DevLayer) -> Result<SikvParams> {
        let mut p = SikvParams::from_config(cfg, layout);
        for (i, base) in layer.planes.iter().enumerate() {
            if layout.format.has(i) {
                dev_ptr(*base, 16, crate::layout::PLANE_NAMES[i])?;
                p.plane[i] = *base;
            }
        }
        dev_ptr(layer.state, 16, "state")?;
        p.state = layer.state;
        Ok(p)
    }

    fn table_params(cfg: &CacheConfig, p: &mut SikvParams, table: &DevPageTable) -> Result<()> {
        if table.batch > cfg.max_batch {
            return Err(Error::bounds(format!(
                "page table batch = {} exceeds max_batch ({})",
                table.batch, cfg.max_batch
            )));
        }
        dev_ptr(table.indptr, 4, "page_table.indptr")?;
        dev_ptr(table.indices, 4, "page_table.indices")?;
        dev_ptr(table.last_page_len, 4, "page_table.last_page_len")?;
        p.indptr = table.indptr;
        p.page_indices = table.indices;
        p.last_page_len = table.last_page_len;
        p.batch = table.batch as i32;
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // Stages.

    /// Stage `calibrate` for one sequence (cpu::calibrate) from its prompt (see
    /// [`DevPrompt`]); `ws` holds at least `workspace_bytes(cfg, layout, 1)`. Not a hot path
    /// (nine small launches), but asynchronous and without allocation all the same. Overwrites
    /// the state records of `prompt.seq_slot` (the caller tracks whether it was calibrated).
    pub fn calibrate(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        prompt: &DevPrompt,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        self.check_cfg(cfg)?;
        let DevPrompt {
            seq_slot,
            n_tokens: n,
            k,
            v,
            n_query: nq,
            q_tail,
            slot_mapping,
        } = *prompt;
        crate::ensure!(
            n >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "calibrate: n = 0 (the prompt needs >= 1 token)"
        );
        crate::ensure!(
            n <= cfg.max_seq_len,
            SIKV_ERR_OUT_OF_BOUNDS,
            "calibrate: prompt length {n} exceeds max_seq_len ({})",
            cfg.max_seq_len
        );
        crate::ensure!(
            nq >= 1,
            SIKV_ERR_INVALID_ARGUMENT,
            "calibrate: nq = 0 (q_tail needs >= 1 row)"
        );
        crate::ensure!(
            nq <= n,
            SIKV_ERR_INVALID_ARGUMENT,
            "calibrate: nq = {nq} exceeds the prompt length {n}"
        );
        crate::ensure!(
            seq_slot < cfg.max_seqs,
            SIKV_ERR_OUT_OF_BOUNDS,
            "seq_slot = {seq_slot} is outside 0..max_seqs ({})",
            cfg.max_seqs
        );
        let mut p = Self::layer_params(cfg, layout, layer)?;
        dev_ptr(k, 16, "k")?;
        dev_ptr(v, 16, "v")?;
        dev_ptr(q_tail, 16, "q_tail")?;
        dev_ptr(slot_mapping, 8, "slot_mapping")?;
        let w = Workspace::new(cfg, layout, 1);
        Self::check_ws(ws, &w)?;
        Self::with_ws(&mut p, ws.ptr, &w);
        p.k = k;
        p.v = v;
        p.q = q_tail;
        p.slot_mapping = slot_mapping;
        p.n_tokens = n as i32;
        p.nq = nq as i32;
        p.calib_slot = seq_slot as i32;
        p.mode = 1;
        self.current()?;
        let kn = &self.inner.kernels;
        let h = cfg.num_kv_heads;
        let hd = h * cfg.head_dim;
        let chan = (hd.div_ceil(CALIB_CHANNEL_THREADS), 1, 1);
        self.launch(&kn.calib_init, (h, 1, 1), CALIB_INIT_THREADS, stream, &p)?;
        if p.centre_mean != 0 {
            self.launch(&kn.calib_mean, chan, CALIB_CHANNEL_THREADS, stream, &p)?;
        } else {
            self.launch(&kn.calib_median, (hd, 1, 1), CALIB_MEDIAN_THREADS, stream, &p)?;
        }
        self.launch(&kn.calib_qbar, chan, CALIB_CHANNEL_THREADS, stream, &p)?;
        if nq >= 2 {
            self.launch(&kn.calib_qmed, (hd, 1, 1), CALIB_MEDIAN_THREADS, stream, &p)?;
        }
        let range = (n as i64 - cfg.n_window as i64 - cfg.n_sink as i64).max(0) as u32;
        if range > 0 && cfg.n_heavy > 0 {
            let grid = (range.div_ceil(CALIB_HEAVY_SCORE_THREADS), h, 1);
            self.launch(&kn.calib_heavy_score, grid, CALIB_HEAVY_SCORE_THREADS, stream, &p)?;
        }
        self.launch(
            &kn.calib_heavy_select,
            (h, 1, 1),
            CALIB_HEAVY_SELECT_THREADS,
            stream,
            &p,
        )?;
        self.launch(&kn.calib_scale, chan, CALIB_CHANNEL_THREADS, stream, &p)?;
        let subvectors = hd / crate::layout::SUBVEC as u32;
        let grid = (subvectors.div_ceil(CALIB_CODEBOOK_THREADS), 1, 1);
        self.launch(&kn.calib_codebook, grid, CALIB_CODEBOOK_THREADS, stream, &p)?;
        self.launch(&kn.encode, encode_grid(n, h), ENCODE_THREADS, stream, &p)?;
        Ok(())
    }

    /// Stage `encode` (cpu::append) of `tokens` (see [`DevTokens`]). Hot path. Tokens whose
    /// seq_slot, position or slot_mapping is out of range are skipped on the device and
    /// reported by the next call (device faults, module doc).
    pub fn append(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        tokens: &DevTokens,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        self.check_cfg(cfg)?;
        let n = tokens.n;
        crate::ensure!(
            n <= cfg.max_append_tokens,
            SIKV_ERR_OUT_OF_BOUNDS,
            "append of {n} tokens exceeds max_append_tokens ({})",
            cfg.max_append_tokens
        );
        let mut p = Self::layer_params(cfg, layout, layer)?;
        if n == 0 {
            return Ok(());
        }
        dev_ptr(tokens.k, 16, "k")?;
        dev_ptr(tokens.v, 16, "v")?;
        dev_ptr(tokens.slot_mapping, 8, "slot_mapping")?;
        dev_ptr(tokens.seq_slot, 4, "seq_slot")?;
        dev_ptr(tokens.position, 4, "position")?;
        p.k = tokens.k;
        p.v = tokens.v;
        p.slot_mapping = tokens.slot_mapping;
        p.seq_slot = tokens.seq_slot;
        p.position = tokens.position;
        p.n_tokens = n as i32;
        p.mode = 0;
        self.current()?;
        let grid = encode_grid(n, cfg.num_kv_heads);
        self.launch(&self.inner.kernels.encode, grid, ENCODE_THREADS, stream, &p)
    }

    /// Selection (cpu::select): score, top-k (and rerank when two-stage) for `batch`; writes
    /// `sel` (see [`DevSelection`]). Hot path.
    #[allow(clippy::too_many_arguments)] // one typed descriptor per kind of memory the stage touches
    pub fn select(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.select_stages(SELECT_ALL, cfg, layout, layer, batch, sel, ws, stream)
    }

    /// The parameters every batch call (select, attend, attend_dense) shares: layer, batch
    /// (page table, seq_slot, q) and workspace, validated; None for an empty batch (nothing to
    /// launch).
    fn batch_params(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        ws: DevWorkspace,
    ) -> Result<Option<(SikvParams, Workspace)>> {
        self.check_cfg(cfg)?;
        let table = &batch.table;
        let mut p = Self::layer_params(cfg, layout, layer)?;
        Self::table_params(cfg, &mut p, table)?;
        if table.batch == 0 {
            return Ok(None);
        }
        dev_ptr(batch.seq_slot, 4, "seq_slot")?;
        dev_ptr(batch.q, 16, "q")?;
        let w = Workspace::new(cfg, layout, table.batch);
        Self::check_ws(ws, &w)?;
        crate::ensure!(
            w.max_splits() <= COMBINE_MAX_SPLITS,
            SIKV_ERR_UNSUPPORTED,
            "{} attention splits per query head exceed the combine kernel's {COMBINE_MAX_SPLITS}",
            w.max_splits()
        );
        Self::with_ws(&mut p, ws.ptr, &w);
        p.seq_slot = batch.seq_slot;
        p.q = batch.q;
        Ok(Some((p, w)))
    }

    /// Checks a selection's addresses and points the kernels' parameters at it.
    fn selection_params(p: &mut SikvParams, sel: DevSelection) -> Result<()> {
        dev_ptr(sel.indices, 4, "indices")?;
        dev_ptr(sel.counts, 4, "counts")?;
        p.indices = sel.indices;
        p.counts = sel.counts;
        Ok(())
    }

    /// Benchmarking aid: launches only the parts of `select` named by `stages` (bits
    /// SELECT_SCORE, SELECT_TOPK, SELECT_RERANK; each part reads what the previous one left in
    /// the workspace, so time a part only after a full select on the same workspace).
    #[allow(clippy::too_many_arguments)] // select's arguments plus the stage bits
    pub fn select_stages(
        &self,
        stages: u32,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        let Some((mut p, _)) = self.batch_params(cfg, layout, layer, batch, ws)? else {
            return Ok(());
        };
        Self::selection_params(&mut p, sel)?;
        self.current()?;
        let kn = &self.inner.kernels;
        let (h, b) = (cfg.num_kv_heads, batch.table.batch);
        let tiles = cfg.max_seq_len.div_ceil(SCORE_TILE);
        let multi = match self.inner.topk {
            TopkPath::Single => false,
            TopkPath::Multi { cand_cap } => {
                if let Some(c) = cand_cap {
                    p.cand_cap = p.cand_cap.min(c.max(1) as i32);
                }
                true
            }
        };
        p.topk_multi = multi as i32;
        if stages & SELECT_SCORE != 0 {
            if multi {
                // The score kernel adds into the per-row histograms (and the final top-k kernel
                // expects zero candidate counters): zero both on the stream.
                let words = b as usize * h as usize * TOPK_HIST_STRIDE;
                driver::memset32_async(p.ws_hist, 0, words, cuda_stream(stream))?;
            }
            self.launch(&kn.score, (tiles, h, b), SCORE_THREADS, stream, &p)?;
        }
        // SELECT_TOPK_FINAL: the final kernel keeps the candidate counter (p.mode = 1).
        let mut pf = p;
        pf.mode = (stages & SELECT_TOPK_FINAL != 0) as i32;
        if stages & SELECT_TOPK != 0 {
            if multi {
                let ctiles = cfg.max_seq_len.div_ceil(COMPACT_TILE);
                self.launch(&kn.topk_compact, (ctiles, h, b), COMPACT_THREADS, stream, &p)?;
                self.launch(&kn.topk_final, (h, b, 1), TOPK_THREADS, stream, &pf)?;
            } else {
                self.launch(&kn.topk_stage1, (h, b, 1), TOPK_THREADS, stream, &p)?;
            }
        } else if multi && stages & SELECT_TOPK_FINAL != 0 {
            self.launch(&kn.topk_final, (h, b, 1), TOPK_THREADS, stream, &pf)?;
        }
        if cfg.two_stage() && stages & SELECT_RERANK != 0 {
            let grid = (cfg.stage1_max().div_ceil(RERANK_THREADS), h, b);
            self.launch(&kn.rerank_score, grid, RERANK_THREADS, stream, &p)?;
            self.launch(&kn.topk_stage2, (h, b, 1), TOPK_THREADS, stream, &p)?;
        }
        Ok(())
    }

    /// Stage `attend` + `combine` (cpu::attend): attention over the dense set and the selected
    /// positions `sel`; `out`: `[batch][H_q][d]` in the model dtype (16-byte aligned). Hot path.
    #[allow(clippy::too_many_arguments)] // one typed descriptor per kind of memory the stage touches
    pub fn attend(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        sel: DevSelection,
        out: u64,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        let Some((mut p, w)) = self.batch_params(cfg, layout, layer, batch, ws)? else {
            return Ok(());
        };
        Self::selection_params(&mut p, sel)?;
        dev_ptr(out, 16, "out")?;
        p.out = out;
        p.num_splits = w.sparse_splits as i32;
        self.current()?;
        let kn = &self.inner.kernels;
        let (h, b) = (cfg.num_kv_heads, batch.table.batch);
        self.launch(&kn.attend, (w.sparse_splits as u32, h, b), ATTEND_THREADS, stream, &p)?;
        self.launch(&kn.combine, (cfg.num_q_heads, b, 1), COMBINE_THREADS, stream, &p)
    }

    /// Dense decode (cpu::attend_dense): every candidate dequantised plus the dense set, no
    /// selection; `out` as for [`attend`](Self::attend). Hot path (the crossover path and our
    /// own baseline).
    #[allow(clippy::too_many_arguments)] // one typed descriptor per kind of memory the stage touches
    pub fn attend_dense(
        &self,
        cfg: &CacheConfig,
        layout: &Layout,
        layer: &DevLayer,
        batch: &DevBatch,
        out: u64,
        ws: DevWorkspace,
        stream: CUstream,
    ) -> Result<()> {
        self.take_fault()?;
        let Some((mut p, w)) = self.batch_params(cfg, layout, layer, batch, ws)? else {
            return Ok(());
        };
        dev_ptr(out, 16, "out")?;
        p.out = out;
        p.num_splits = w.dense_total_splits as i32;
        p.dense_splits = w.dense_splits as i32;
        p.dense_chunk = w.dense_chunk as i32;
        p.mode = 1;
        self.current()?;
        let kn = &self.inner.kernels;
        let (h, b) = (cfg.num_kv_heads, batch.table.batch);
        self.launch(
            &kn.attend_dense,
            (w.dense_total_splits as u32, h, b),
            ATTEND_THREADS,
            stream,
            &p,
        )?;
        self.launch(&kn.combine, (cfg.num_q_heads, b, 1), COMBINE_THREADS, stream, &p)
    }
}
