//! The stage executor: the one place that runs a pipeline stage (calibrate, append, select,
//! attend, attend_dense, decode, reset) on described memory, with a CPU and a CUDA
//! implementation. Both ABI layers call it: the stateless calls describe the engine's memory
//! directly; the managed cache describes its own pools after its bookkeeping.
//!
//! Memory arrives as descriptors ([`desc`]): host slices for the CPU, device addresses for
//! CUDA. Every argument the host can check is checked here, once, before either
//! implementation runs, so both answer bad input with the same status. What only the device
//! sees (positions and page ids inside engine-owned tables on the GPU) is checked by the
//! kernels, which skip the work item and raise a fault word that the next launcher call on the
//! handle reports (every `GpuContext` launcher reads it first, so the executor does not).
//!
//! **Where AUTO runs** ([`Executor::create`]): engine-owned memory says where it lives; else
//! CUDA when a driver and a device exist and the device can run the configuration (sm_80 or
//! newer, f16/bf16 activations); else the CPU. Any other failure while opening the device (a
//! driver error, a kernel image that does not load) is reported, not hidden by a fallback.

pub mod desc;

mod cpu;
mod cuda;

pub use desc::{Batch, LayerPools, LayerView, Mem, MemMut, NewTokens, Prompt, Selected, Table, Workspace};

use crate::config::{CacheConfig, Device, Route};
use crate::ensure;
use crate::gpu::GpuContext;
use crate::layout::Layout;
use crate::status::{Error, Result, SikvStatus};

/// A caller's stream (`cudaStream_t` / `CUstream`; null = the legacy default stream). Borrowed;
/// ignored on the CPU.
pub type Stream = *mut std::ffi::c_void;

/// Where engine-owned memory lives, when the engine hands the library its pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Host,
    Device,
}

enum Imp {
    Cpu,
    Cuda(GpuContext),
}

/// What attention [`Executor::decode`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodePath {
    /// Select + attend.
    Sparse,
    /// The dense decode (every stored token).
    Dense,
    /// The configuration's crossover: by `batch * max_seq_len` where that settles it or the
    /// batch exceeds LIVE_CROSSOVER_MAX_BATCH, else by the live lengths of the call's
    /// sequences. A page table in device memory is then read on the device (the launches of
    /// both paths are queued, the unchosen ones return at once), so a captured graph follows
    /// the lengths.
    Crossover,
}

/// Runs the stages of one configuration on the CPU or on a CUDA device.
pub struct Executor {
    cfg: CacheConfig,
    layout: Layout,
    imp: Imp,
}

/// Where `sikv_kernel_decode` keeps its selection inside the caller's workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeWorkspace {
    pub total: usize,
    pub indices: usize,
    pub counts: usize,
}

impl Executor {
    /// Opens the executor of `cfg` (the AUTO rule is in the module documentation).
    pub fn create(cfg: &CacheConfig, memory: Option<Placement>) -> Result<Executor> {
        let layout = Layout::new(cfg);
        let imp = match (cfg.device, memory) {
            (Device::Cpu, Some(Placement::Device)) => {
                return Err(Error::invalid(
                    "device memory was given to a configuration whose device is CPU",
                ))
            }
            (Device::Cuda, Some(Placement::Host)) => {
                return Err(Error::invalid(
                    "host memory was given to a configuration whose device is CUDA",
                ))
            }
            (Device::Cpu, _) | (Device::Auto, Some(Placement::Host)) => Imp::Cpu,
            (Device::Cuda, _) | (Device::Auto, Some(Placement::Device)) => Imp::Cuda(GpuContext::new(cfg, &layout)?),
            (Device::Auto, None) => match GpuContext::new(cfg, &layout) {
                Ok(g) => Imp::Cuda(g),
                Err(e)
                    if e.status == SikvStatus::SIKV_ERR_NO_DEVICE || e.status == SikvStatus::SIKV_ERR_UNSUPPORTED =>
                {
                    Imp::Cpu
                }
                Err(e) => return Err(e),
            },
        };
        Ok(Executor {
            cfg: cfg.clone(),
            layout,
            imp,
        })
    }

    pub fn cfg(&self) -> &CacheConfig {
        &self.cfg
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self.imp, Imp::Cuda(_))
    }

    /// The CUDA context, when the executor runs on a device.
    pub fn gpu(&self) -> Option<&GpuContext> {
        match &self.imp {
            Imp::Cuda(g) => Some(g),
            Imp::Cpu => None,
        }
    }

    /// Workspace bytes of every stage call with up to `batch` sequences (0 on the CPU).
    pub fn stage_workspace_bytes(&self, batch: u32) -> usize {
        match self.imp {
            Imp::Cpu => 0,
            Imp::Cuda(_) => GpuContext::workspace_bytes(&self.cfg, &self.layout, batch),
        }
    }

    /// The decode call's workspace: the stage workspace, then its selection (0 on the CPU).
    pub fn decode_workspace(&self, batch: u32) -> DecodeWorkspace {
        match self.imp {
            Imp::Cpu => DecodeWorkspace {
                total: 0,
                indices: 0,
                counts: 0,
            },
            Imp::Cuda(_) => gpu_decode_workspace(&self.cfg, &self.layout, batch),
        }
    }

    /// Waits for the work queued on `stream` (nothing to wait for on the CPU).
    pub fn synchronize(&self, stream: Stream) -> Result<()> {
        match &self.imp {
            Imp::Cpu => Ok(()),
            Imp::Cuda(g) => g.synchronize(stream),
        }
    }

    // ------------------------------------------------------------------------------------
    // Stages. Each checks what the host can, then runs on the implementation.

    /// Stage `calibrate` of one sequence slot at one layer (see `cpu::calibrate`).
    pub fn calibrate(&self, pools: LayerPools, p: &Prompt, ws: Workspace, stream: Stream) -> Result<()> {
        let cfg = &self.cfg;
        ensure!(p.n_tokens >= 1, SIKV_ERR_INVALID_ARGUMENT, "n_tokens must be >= 1");
        ensure!(
            p.n_tokens <= cfg.max_seq_len,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_tokens = {} exceeds max_seq_len = {}",
            p.n_tokens,
            cfg.max_seq_len
        );
        ensure!(
            p.n_query >= 1 && p.n_query <= p.n_tokens,
            SIKV_ERR_INVALID_ARGUMENT,
            "n_query = {} must be in 1..=n_tokens ({})",
            p.n_query,
            p.n_tokens
        );
        self.check_slot(p.seq_slot)?;
        match &self.imp {
            Imp::Cpu => cpu::calibrate(self, pools, p),
            Imp::Cuda(g) => cuda::calibrate(self, g, pools, p, ws, stream),
        }
    }

    /// Stage `append` (encode) of `n_tokens` new tokens at one layer (see `cpu::append`).
    pub fn append(&self, pools: LayerPools, t: &NewTokens, stream: Stream) -> Result<()> {
        let cfg = &self.cfg;
        ensure!(t.n_tokens >= 1, SIKV_ERR_INVALID_ARGUMENT, "n_tokens must be >= 1");
        ensure!(
            t.n_tokens <= cfg.max_append_tokens,
            SIKV_ERR_OUT_OF_BOUNDS,
            "n_tokens = {} exceeds max_append_tokens = {}",
            t.n_tokens,
            cfg.max_append_tokens
        );
        match &self.imp {
            Imp::Cpu => cpu::append(self, pools, t),
            Imp::Cuda(g) => cuda::append(self, g, pools, t, stream),
        }
    }

    /// Selection (score, top-k, re-rank): `indices` `[batch][H_kv][budget_max]` (ascending,
    /// then -1), `counts` `[batch][H_kv]`.
    pub fn select(
        &self,
        pools: LayerView,
        b: &Batch,
        indices: MemMut<i32>,
        counts: MemMut<i32>,
        ws: Workspace,
        stream: Stream,
    ) -> Result<()> {
        self.check_batch(b)?;
        match &self.imp {
            Imp::Cpu => cpu::select(self, pools, b, indices, counts),
            Imp::Cuda(g) => cuda::select(self, g, pools, b, indices, counts, ws, stream),
        }
    }

    /// [`select`](Self::select) into `indices`/`counts`, then [`attend`](Self::attend) over that
    /// selection, as one call (on a device the attend overlaps the selection's end; the
    /// selection stays readable afterwards).
    #[allow(clippy::too_many_arguments)] // select's and attend's descriptors
    pub fn select_attend(
        &self,
        pools: LayerView,
        b: &Batch,
        indices: MemMut<i32>,
        counts: MemMut<i32>,
        out: MemMut<u8>,
        ws: Workspace,
        stream: Stream,
    ) -> Result<()> {
        self.check_batch(b)?;
        match &self.imp {
            Imp::Cpu => {
                let (si, sc) = (indices.host("indices")?, counts.host("counts")?);
                cpu::select(self, pools, b, MemMut::Host(&mut *si), MemMut::Host(&mut *sc))?;
                let sel = Selected::Given {
                    indices: Mem::Host(si),
                    counts: Mem::Host(sc),
                };
                cpu::attend(self, pools, b, sel, out)
            }
            Imp::Cuda(g) => cuda::select_attend(self, g, pools, b, indices, counts, out, ws, stream),
        }
    }

    /// Stage `attend` + `combine` over the dense set and a selection (or every stored token).
    pub fn attend(
        &self,
        pools: LayerView,
        b: &Batch,
        sel: Selected,
        out: MemMut<u8>,
        ws: Workspace,
        stream: Stream,
    ) -> Result<()> {
        self.check_batch(b)?;
        match &self.imp {
            Imp::Cpu => cpu::attend(self, pools, b, sel, out),
            Imp::Cuda(g) => cuda::attend(self, g, pools, b, sel, out, ws, stream),
        }
    }

    /// Select + attend in one call, or the dense decode (`path`). On a device the selection
    /// lives in the workspace ([`Executor::decode_workspace`]).
    pub fn decode(
        &self,
        pools: LayerView,
        b: &Batch,
        path: DecodePath,
        out: MemMut<u8>,
        ws: Workspace,
        stream: Stream,
    ) -> Result<()> {
        self.check_batch(b)?;
        let n = b.table.batch();
        let route = match path {
            DecodePath::Sparse => Route::Sparse,
            DecodePath::Dense => Route::Dense,
            DecodePath::Crossover => self.cfg.dense_crossover.route(n, self.cfg.max_seq_len),
        };
        match &self.imp {
            Imp::Cpu => cpu::decode(self, pools, b, route, out),
            Imp::Cuda(g) => cuda::decode(self, g, pools, b, route, out, ws, stream),
        }
    }

    /// Select + attend for `rows[i]` query rows of each sequence i (1..=`cpu::SIKV_MAX_QUERY_ROWS`, at
    /// most its length), causal among them (`cpu::rows`): `b.q` and `out` hold
    /// `[sum rows][H_q][d]`, sequence i's rows after those of i - 1. Selection per
    /// `cfg.row_selection`. Host memory (the CPU); a device runs [`decode_rows`](Self::decode_rows).
    pub fn attend_rows(&self, pools: LayerView, b: &Batch, rows: &[u32], out: MemMut<u8>) -> Result<()> {
        self.check_batch(b)?;
        match &self.imp {
            Imp::Cpu => cpu::attend_rows(self, pools, b, rows, out),
            Imp::Cuda(_) => Err(Error::invalid(
                "attend_rows takes host memory; on a CUDA device the rows' offsets go to decode_rows",
            )),
        }
    }

    /// [`attend_rows`](Self::attend_rows) with the rows as offsets: int32 `offsets[batch + 1]`,
    /// sequence i's query rows `[offsets[i], offsets[i + 1])`, `n_rows` = `offsets[batch]`, in
    /// the memory the page table is in (on a device the kernels check them: fault
    /// `FAULT_QUERY_ROWS`). `b.q` and `out` hold `[n_rows][H_q][d]`; on a device the selection
    /// lives in the workspace (`decode_workspace(n_rows)`). Selection per `cfg.row_selection`.
    #[allow(clippy::too_many_arguments)] // decode's arguments plus the rows
    pub fn decode_rows(
        &self,
        pools: LayerView,
        b: &Batch,
        offsets: Mem<i32>,
        n_rows: u32,
        out: MemMut<u8>,
        ws: Workspace,
        stream: Stream,
    ) -> Result<()> {
        self.check_batch(b)?;
        match &self.imp {
            Imp::Cpu => {
                let rows = cpu::rows_from_offsets(offsets, b.table.batch() as usize, n_rows)?;
                cpu::attend_rows(self, pools, b, &rows, out)
            }
            Imp::Cuda(g) => cuda::decode_rows(self, g, pools, b, offsets, n_rows, out, ws, stream),
        }
    }

    /// [`decode_rows`](Self::decode_rows) with the selection written to `indices` / `counts`
    /// (`[n_rows][H_kv][budget_max]`, `[n_rows][H_kv]`) instead of the workspace, which then
    /// needs only the stage workspace of `n_rows` (`stage_workspace_bytes`). Under
    /// `RowSelection::MeanQuery` a device writes one selection per sequence (its first `batch`
    /// rows; each query row attends the positions of it below its bound), the CPU one per row.
    #[allow(clippy::too_many_arguments)] // decode_rows' arguments plus the selection
    pub fn select_attend_rows(
        &self,
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
        self.check_batch(b)?;
        match &self.imp {
            Imp::Cpu => {
                let rows = cpu::rows_from_offsets(offsets, b.table.batch() as usize, n_rows)?;
                let (si, sc) = (indices.host("indices")?, counts.host("counts")?);
                cpu::select_attend_rows(self, pools, b, &rows, si, sc, out)
            }
            Imp::Cuda(g) => {
                cuda::select_attend_rows(self, g, pools, b, offsets, n_rows, indices, counts, out, ws, stream)
            }
        }
    }

    /// Clears the state records of a sequence slot at one layer (`state`: the layer's pool).
    pub fn reset_sequence(&self, state: MemMut<u8>, seq_slot: u32, stream: Stream) -> Result<()> {
        self.check_slot(seq_slot)?;
        match &self.imp {
            Imp::Cpu => cpu::reset_sequence(self, state, seq_slot),
            Imp::Cuda(g) => cuda::reset_sequence(self, g, state, seq_slot, stream),
        }
    }

    fn check_slot(&self, seq_slot: u32) -> Result<()> {
        ensure!(
            seq_slot < self.cfg.max_seqs,
            SIKV_ERR_OUT_OF_BOUNDS,
            "seq_slot = {seq_slot} is outside 0..max_seqs ({})",
            self.cfg.max_seqs
        );
        Ok(())
    }

    fn check_batch(&self, b: &Batch) -> Result<()> {
        let n = b.table.batch();
        ensure!(
            n >= 1 && n <= self.cfg.max_batch,
            SIKV_ERR_OUT_OF_BOUNDS,
            "page_table.batch = {n} must be in 1..=max_batch ({})",
            self.cfg.max_batch
        );
        Ok(())
    }
}

/// The decode workspace on a GPU: the stage workspace, then the selection (indices
/// `[batch][H_kv][budget_max]`, counts `[batch][H_kv]`), each 256-byte aligned.
pub fn gpu_decode_workspace(cfg: &CacheConfig, layout: &Layout, batch: u32) -> DecodeWorkspace {
    let stage = GpuContext::workspace_bytes(cfg, layout, batch);
    let rows = batch as usize * cfg.num_kv_heads as usize;
    let indices = stage.div_ceil(256) * 256;
    let counts = (indices + 4 * rows * cfg.budget.max as usize).div_ceil(256) * 256;
    DecodeWorkspace {
        total: counts + 4 * rows,
        indices,
        counts,
    }
}
