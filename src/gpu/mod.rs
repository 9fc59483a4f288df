//! CUDA dispatch: the driver API in the device's primary context (the one the CUDA runtime
//! uses), module loading (embedded fatbin, else NVRTC), and one launcher per stage.
//!
//! Layers, bottom up (like cudarc): [`driver`] wraps raw `sys` calls and maps every failure to
//! `SIKV_ERR_CUDA` naming the call; [`kernels`] is the per-configuration kernel table;
//! [`params`] is the by-value argument block and [`geometry`] the launch constants and fault
//! bits, both written into the kernels' generated header by build.rs (their only definition);
//! [`workspace`] carves the caller's workspace. The safe layer: `desc` holds the typed
//! descriptors of borrowed device memory the launchers take, `launch` the stage launchers,
//! `memory` allocations, copies, streams and graphs (create time, tests, benchmarks); this
//! file the context itself (creation, kernel loading, the fault word).
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
//! hold. A kernel still running when the next call starts reports at the call after it.
//! Several launches that make one exported call (decode = select + attend) run inside
//! [`GpuContext::one_call`], which checks once at the start, so a call never reports a fault
//! of its own earlier kernels.
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

mod desc;
mod driver;
mod gate;
pub mod geometry;
mod kernels;
mod launch;
mod memory;
mod nvrtc;
pub mod params;
pub mod switches;
pub mod upload;
pub mod workspace;

/// Test hooks, not part of the supported interface.
#[doc(hidden)]
pub mod testing {
    pub use super::driver::{inject_launch_error, CUresult};
}

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::config::{CacheConfig, Dtype};
use crate::layout::Layout;
use crate::status::{Error, Result};
use geometry::{FINAL_CLUSTER_SIZES, FINAL_MAX_CLUSTER, FUSED_MAX_CLUSTER, TOPK_THREADS};
pub use switches::TopkPath;
use switches::{FusedMode, Switches};

use cudarc::driver::sys;
pub use desc::{DevBatch, DevLayer, DevPageTable, DevPrompt, DevRows, DevSelection, DevTokens, DevWorkspace};
pub use gate::StreamGate;
use geometry::*;
use kernels::{Kernel, Kernels};
pub use memory::{DeviceBuffer, Graph, OwnedStream};
use params::SikvParams;

/// Parts of `select` (see [`GpuContext::select_stages`]).
pub const SELECT_SCORE: u32 = 1;
pub const SELECT_TOPK: u32 = 2;
pub const SELECT_RERANK: u32 = 4;
pub const SELECT_ALL: u32 = 7;
/// Benchmarking aid (multi-CTA top-k only): the final top-k kernel leaves the candidate counter
/// as it found it; alone, it launches only that kernel. `SELECT_TOPK | SELECT_TOPK_FINAL` once,
/// then `SELECT_TOPK_FINAL` repeatedly times the final kernel over the same candidates. Not with
/// `SELECT_SCORE` unless `SELECT_TOPK` is set too (select_stages refuses it); alone, not right
/// after a call that ended with the score kernel: the final kernel reads the histograms before
/// its grid dependency, so the launch just ahead of it must not be the one that adds into them.
pub const SELECT_TOPK_FINAL: u32 = 16;

/// A caller's stream: `cudaStream_t` / `CUstream` (null = legacy default stream). Borrowed.
pub type CUstream = *mut c_void;

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
    /// The testing switches, as read at create time ([`switches`]).
    switches: Switches,
    /// The fused select (score + stage-1 top-k in clusters, `select`): entry c, for c in
    /// 1..=FUSED_MAX_CLUSTER, is how many clusters of c CTAs the device holds at once; all zero
    /// below sm_90, with the single-CTA top-k, or with SIKV_FUSED=off.
    fused_clusters: [u32; FUSED_MAX_CLUSTER as usize + 1],
    /// The stage-1 final select's clusters (`final_cluster`): entry c, for c in
    /// FINAL_CLUSTER_SIZES, is how many clusters of c CTAs of it the device holds at once (the
    /// others zero); all zero below sm_90 or with the single-CTA top-k.
    final_clusters: [u32; FINAL_MAX_CLUSTER as usize + 1],
}

/// The fused select's occupancy table ([`Inner::fused_clusters`]).
fn fused_clusters(major: i32, sw: &Switches, f: driver::CUfunction) -> [u32; FUSED_MAX_CLUSTER as usize + 1] {
    let mut table = [0u32; FUSED_MAX_CLUSTER as usize + 1];
    if major >= 9 && sw.fused != FusedMode::Off && sw.topk != TopkPath::Single {
        for (c, n) in table.iter_mut().enumerate().skip(1) {
            *n = driver::max_active_clusters(f, TOPK_THREADS, c as u32);
        }
    }
    table
}

/// The final select's occupancy table ([`Inner::final_clusters`]): each size's own kernel.
fn final_clusters(major: i32, sw: &Switches, k: &Kernels) -> [u32; FINAL_MAX_CLUSTER as usize + 1] {
    let mut table = [0u32; FINAL_MAX_CLUSTER as usize + 1];
    if major >= 9 && sw.topk != TopkPath::Single {
        for c in FINAL_CLUSTER_SIZES {
            table[c as usize] = driver::max_active_clusters(k.topk_final_for(c).f, TOPK_THREADS, c);
        }
    }
    table
}

/// What the stream runs just before an attend ([`GpuContext::attend_after`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Predecessor {
    /// This call's own select, on the same stream and workspace, nothing queued between them.
    Select,
    /// Anything else (an append, the engine's kernels, another call).
    Other,
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

fn cuda_stream(s: CUstream) -> sys::CUstream {
    s as sys::CUstream
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
        let switches = match Switches::from_env() {
            Ok(s) => s,
            Err(e) => return Err(release(e, &dev)),
        };
        if let Err(e) = driver::set_current(dev.ctx) {
            return Err(release(e, &dev));
        }
        let (module, kernels, build_path) = match Self::load(&dev, cfg.head_dim, dt, switches.force_nvrtc) {
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
        let fused_clusters = fused_clusters(dev.major, &switches, kernels.score_topk.f);
        let final_clusters = final_clusters(dev.major, &switches, &kernels);
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
                switches,
                fused_clusters,
                final_clusters,
            }),
        })
    }

    fn load(dev: &driver::Device, d: u32, dt: &str, force_nvrtc: bool) -> Result<(driver::CUmodule, Kernels, String)> {
        let mut why = String::new();
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

    /// Whether SIKV_FUSED=on forces the fused select and, for cluster sizes
    /// 1..=FUSED_MAX_CLUSTER, how many of its clusters the device holds at once (entry 0 unused).
    pub fn fused_select(&self) -> (bool, &[u32]) {
        (
            self.inner.switches.fused == FusedMode::Always,
            &self.inner.fused_clusters,
        )
    }

    /// For each cluster size c of FINAL_CLUSTER_SIZES, entry c: how many clusters of the stage-1
    /// final select the device holds at once (other entries zero; all zero where the final select
    /// runs one CTA a row): what launch.rs final_cluster chooses from.
    pub fn final_select_clusters(&self) -> &[u32] {
        &self.inner.final_clusters
    }

    /// The stage-1 top-k implementation `select` uses (SIKV_TOPK at create time).
    pub fn topk_path(&self) -> TopkPath {
        self.inner.switches.topk
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
        self.launch_clusters(k, grid, block, 1, stream, p)
    }

    /// [`launch`](Self::launch) in thread block clusters of `cluster` CTAs along x.
    fn launch_clusters(
        &self,
        k: &Kernel,
        grid: (u32, u32, u32),
        block: u32,
        cluster: u32,
        stream: CUstream,
        p: &SikvParams,
    ) -> Result<()> {
        let mut p = *p;
        p.fault = self.inner.fault_dev;
        driver::launch_cluster(k.f, k.name, grid, block, cluster, cuda_stream(stream), &p, self.pdl())
    }

    /// Whether the stages launch with programmatic dependent launch: sm_90 and newer, unless
    /// SIKV_PDL=0. Each kernel waits for the grid before it (`griddepcontrol.wait`) before it
    /// touches memory, so the next kernel's blocks can be launched while this one finishes, and
    /// the order of every memory access is what plain stream order gives.
    fn pdl(&self) -> bool {
        self.inner.dev.major >= 9 && self.inner.switches.pdl
    }

    /// Reports (and clears) the device faults raised since the last call: `Ok` when none,
    /// else `SIKV_ERR_OUT_OF_BOUNDS` naming each failed check. A host load of mapped memory:
    /// no synchronisation, so it sees the faults of kernels that have completed. Every public
    /// launcher calls it first (see the module doc).
    pub fn take_fault(&self) -> Result<()> {
        if IN_CALL.with(|c| c.get()) {
            return Ok(());
        }
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

    /// Runs `f`, several launches that make up one call of the caller (decode = select +
    /// attend), with one fault check at its start: the launches inside do not check, so a
    /// fault raised by the call's own first kernels is reported by the next call, as for a
    /// single launch, and never halfway through this one (which depends on timing).
    pub fn one_call<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.take_fault()?;
        let outer = IN_CALL.with(|c| c.replace(true));
        let r = f();
        IN_CALL.with(|c| c.set(outer));
        r
    }
}

thread_local! {
    /// Inside GpuContext::one_call on this thread: the launchers skip their fault check.
    static IN_CALL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
