//! Where the managed cache's pools live and how its stages run: host memory and the CPU
//! stages, or device memory and the CUDA launchers.

use super::device::DeviceBackend;
use super::{Fnv, OwnedPageTable, Stream};
use crate::config::{CacheConfig, Device};
use crate::cpu::{self, LayerMut, LayerRef, PageTable};
use crate::ensure;
use crate::layout::{Layout, SIKV_NUM_PLANES};
use crate::numeric;
use crate::status::{Error, Result, SikvStatus};

/// Activations passed to a managed call: host bytes (CPU backend) or a device address.
#[derive(Clone, Copy, Debug)]
pub enum Activations<'a> {
    Host(&'a [u8]),
    Device(u64),
}

/// Where a managed call writes its output: host bytes (CPU backend) or a device address.
#[derive(Debug)]
pub enum Output<'a> {
    Host(&'a mut [u8]),
    Device(u64),
}

/// What a decode attention attends beyond the dense set (sinks, heavy, window).
#[derive(Clone, Copy, Debug)]
pub enum Selection<'a> {
    /// Every stored token: the dense decode.
    All,
    /// The library's own selection, made in the same call.
    Select,
    /// A selection the caller made (already validated by the cache): host `indices`
    /// `[n_seqs][H_kv][budget_max]` and `counts` `[n_seqs][H_kv]`.
    Given { indices: &'a [i32], counts: &'a [i32] },
}

/// Host memory that the cache either owns or borrows from the engine for its lifetime.
pub enum HostStore {
    Owned(Vec<u8>),
    Borrowed(&'static mut [u8]),
}

impl HostStore {
    pub fn bytes(&self) -> &[u8] {
        match self {
            HostStore::Owned(v) => v,
            HostStore::Borrowed(s) => s,
        }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            HostStore::Owned(v) => v,
            HostStore::Borrowed(s) => s,
        }
    }
}

/// Engine-owned pools handed to `Cache::with_pools`.
pub enum Pools {
    Host {
        planes: &'static mut [u8],
        state: &'static mut [u8],
    },
    Device {
        planes: u64,
        planes_bytes: usize,
        state: u64,
        state_bytes: usize,
        workspace: u64,
        workspace_bytes: usize,
    },
}

pub enum Backend {
    Cpu { planes: HostStore, state: HostStore },
    Cuda(Box<DeviceBackend>),
}

impl Backend {
    pub fn create(cfg: &CacheConfig, layout: &Layout, pools: Option<Pools>) -> Result<Backend> {
        let gpu = match cfg.device {
            Device::Cpu => false,
            Device::Cuda => true,
            // AUTO: engine-owned pools say where they live; otherwise take a usable GPU.
            Device::Auto => match &pools {
                Some(Pools::Device { .. }) => true,
                Some(Pools::Host { .. }) => false,
                None => runs_on_gpu(cfg)?,
            },
        };
        if gpu {
            return Ok(Backend::Cuda(Box::new(DeviceBackend::create(cfg, layout, pools)?)));
        }
        let (planes, state) = match pools {
            None => (
                HostStore::Owned(try_zeroed(layout.total_plane_bytes(), "plane pool")?),
                HostStore::Owned(try_zeroed(layout.total_state_bytes(), "state pool")?),
            ),
            Some(Pools::Host { planes, state }) => {
                ensure!(
                    planes.len() >= layout.total_plane_bytes(),
                    SIKV_ERR_BUFFER_TOO_SMALL,
                    "pools.planes_bytes = {} is smaller than the {} bytes the layout needs",
                    planes.len(),
                    layout.total_plane_bytes()
                );
                ensure!(
                    state.len() >= layout.total_state_bytes(),
                    SIKV_ERR_BUFFER_TOO_SMALL,
                    "pools.state_bytes = {} is smaller than the {} bytes the layout needs",
                    state.len(),
                    layout.total_state_bytes()
                );
                state.fill(0);
                (HostStore::Borrowed(planes), HostStore::Borrowed(state))
            }
            Some(Pools::Device { .. }) => {
                return Err(Error::invalid("device pools were given to a cache running on the CPU"))
            }
        };
        Ok(Backend::Cpu { planes, state })
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Backend::Cuda(_))
    }

    pub fn reset_slot(&mut self, cfg: &CacheConfig, layout: &Layout, slot: u32) -> Result<()> {
        match self {
            Backend::Cuda(d) => d.reset_slot(cfg, layout, slot),
            Backend::Cpu { state, .. } => {
                let st = state.bytes_mut();
                for l in 0..layout.num_layers {
                    let at = l * layout.layer_state_bytes;
                    cpu::reset_sequence(layout, &mut st[at..at + layout.layer_state_bytes], slot as usize)?;
                }
                Ok(())
            }
        }
    }

    /// Copies the state records of `src` to `dst` and each `(from, to)` page (all layers).
    pub fn copy_seq(&mut self, layout: &Layout, src: u32, dst: u32, pages: &[(u32, u32)]) -> Result<()> {
        match self {
            Backend::Cuda(d) => d.copy_seq(layout, src, dst, pages),
            Backend::Cpu { planes, state } => {
                let rec = layout.num_kv_heads * layout.state.bytes;
                let st = state.bytes_mut();
                for l in 0..layout.num_layers {
                    let base = l * layout.layer_state_bytes;
                    st.copy_within(
                        base + src as usize * rec..base + (src as usize + 1) * rec,
                        base + dst as usize * rec,
                    );
                }
                let pl = planes.bytes_mut();
                for l in 0..layout.num_layers {
                    for p in 0..SIKV_NUM_PLANES {
                        let block = layout.num_kv_heads * layout.page_size * layout.format.row_bytes[p];
                        if block == 0 {
                            continue;
                        }
                        let base = l * layout.layer_plane_bytes + layout.plane_offset[p];
                        for &(from, to) in pages {
                            let a = base + from as usize * block;
                            pl.copy_within(a..a + block, base + to as usize * block);
                        }
                    }
                }
                Ok(())
            }
        }
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
        match self {
            Backend::Cuda(d) => d.calibrate(cfg, layout, layer, slot, n, k, v, nq, q_tail, slot_mapping, stream),
            Backend::Cpu { planes, state } => {
                let kv_len = n as usize * layout.num_kv_heads * layout.format.head_dim;
                let q_len = nq as usize * cfg.num_q_heads as usize * layout.format.head_dim;
                let k = host_f32(cfg, k, kv_len, "k")?;
                let v = host_f32(cfg, v, kv_len, "v")?;
                let q = host_f32(cfg, q_tail, q_len, "q_tail")?;
                let mut lm = layer_mut(layout, planes.bytes_mut(), state.bytes_mut(), layer as usize);
                cpu::calibrate(layout, cfg, &mut lm, slot as usize, &k, &v, &q, slot_mapping)
            }
        }
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
        match self {
            Backend::Cuda(d) => d.append(cfg, layout, layer, k, v, slot_mapping, seq_slot, position, stream),
            Backend::Cpu { planes, state } => {
                let kv_len = slot_mapping.len() * layout.num_kv_heads * layout.format.head_dim;
                let k = host_f32(cfg, k, kv_len, "k")?;
                let v = host_f32(cfg, v, kv_len, "v")?;
                let mut lm = layer_mut(layout, planes.bytes_mut(), state.bytes_mut(), layer as usize);
                cpu::append(layout, cfg, &mut lm, &k, &v, slot_mapping, seq_slot, position)
            }
        }
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
        match self {
            Backend::Cuda(d) => d.select(cfg, layout, layer, table, seq_slot, q, indices, counts, stream),
            Backend::Cpu { planes, state } => {
                let b = seq_slot.len();
                let q = host_f32(cfg, q, b * cfg.num_q_heads as usize * layout.format.head_dim, "q")?;
                let lr = layer_ref(layout, planes.bytes(), state.bytes(), layer as usize);
                let t = PageTable {
                    indptr: &table.indptr,
                    indices: &table.indices,
                    last_page_len: &table.last_page_len,
                };
                cpu::select(layout, cfg, &lr, &t, seq_slot, &q, indices, counts)
            }
        }
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
        match self {
            Backend::Cuda(d) => d.attend(cfg, layout, layer, table, seq_slot, q, out, sel, stream),
            Backend::Cpu { planes, state } => {
                let b = seq_slot.len();
                let qn = b * cfg.num_q_heads as usize * layout.format.head_dim;
                let qf = host_f32(cfg, q, qn, "q")?;
                let out_bytes = host_out(cfg, out, qn)?;
                let lr = layer_ref(layout, planes.bytes(), state.bytes(), layer as usize);
                let t = PageTable {
                    indptr: &table.indptr,
                    indices: &table.indices,
                    last_page_len: &table.last_page_len,
                };
                let mut o = vec![0f32; qn];
                match sel {
                    Selection::All => cpu::attend_dense(layout, cfg, &lr, &t, seq_slot, &qf, &mut o)?,
                    Selection::Select => {
                        let row = b * layout.num_kv_heads;
                        let mut idx = vec![-1i32; row * cfg.budget.max as usize];
                        let mut cnt = vec![0i32; row];
                        cpu::select(layout, cfg, &lr, &t, seq_slot, &qf, &mut idx, &mut cnt)?;
                        cpu::attend(layout, cfg, &lr, &t, seq_slot, &qf, &idx, &cnt, &mut o)?;
                    }
                    Selection::Given { indices, counts } => {
                        cpu::attend(layout, cfg, &lr, &t, seq_slot, &qf, indices, counts, &mut o)?
                    }
                }
                numeric::from_f32(cfg.dtype, &o, out_bytes);
                Ok(())
            }
        }
    }

    /// Waits for the work queued on `stream` (nothing to wait for on the CPU).
    pub fn synchronize(&self, stream: Stream) -> Result<()> {
        match self {
            Backend::Cuda(d) => d.context().synchronize(stream as _),
            Backend::Cpu { .. } => Ok(()),
        }
    }

    /// One state record, copied to the host.
    pub fn read_state(&self, layout: &Layout, layer: u32, slot: u32, head: u32) -> Result<Vec<u8>> {
        match self {
            Backend::Cuda(d) => d.read_state(layout, layer, slot, head),
            Backend::Cpu { state, .. } => {
                let at = layer as usize * layout.layer_state_bytes + layout.state_offset(slot as usize, head as usize);
                Ok(state.bytes()[at..at + layout.state.bytes].to_vec())
            }
        }
    }

    pub fn hash_pools(&self, layout: &Layout, h: &mut Fnv) -> Result<()> {
        match self {
            Backend::Cuda(d) => d.hash_pools(layout, h),
            Backend::Cpu { planes, state } => {
                h.write(planes.bytes());
                h.write(state.bytes());
                Ok(())
            }
        }
    }
}

fn try_zeroed(bytes: usize, what: &str) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(bytes).map_err(|_| {
        Error::new(
            SikvStatus::SIKV_ERR_OUT_OF_MEMORY,
            format!("cannot allocate {bytes} bytes for the {what}"),
        )
    })?;
    v.resize(bytes, 0);
    Ok(v)
}

/// Converts host activations of `cfg.dtype` to f32, checking the size.
fn host_f32(cfg: &CacheConfig, a: Activations, n: usize, name: &str) -> Result<Vec<f32>> {
    let bytes = match a {
        Activations::Host(b) => b,
        _ => {
            return Err(Error::invalid(format!(
                "`{name}` must be a host pointer on the CPU backend"
            )))
        }
    };
    let need = n * cfg.dtype.size();
    ensure!(
        bytes.len() >= need,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "`{name}` holds {} bytes, {need} needed",
        bytes.len()
    );
    let mut out = vec![0f32; n];
    numeric::to_f32(cfg.dtype, &bytes[..need], &mut out);
    Ok(out)
}

fn host_out<'a>(cfg: &CacheConfig, a: Output<'a>, n: usize) -> Result<&'a mut [u8]> {
    match a {
        Output::Host(b) => {
            let need = n * cfg.dtype.size();
            ensure!(
                b.len() >= need,
                SIKV_ERR_BUFFER_TOO_SMALL,
                "`out` holds {} bytes, {need} needed",
                b.len()
            );
            Ok(&mut b[..need])
        }
        Output::Device(_) => Err(Error::invalid("`out` must be a host pointer on the CPU backend")),
    }
}

/// One layer's plane and state slices of whole-cache host pools.
pub fn layer_mut<'a>(layout: &Layout, planes: &'a mut [u8], state: &'a mut [u8], layer: usize) -> LayerMut<'a> {
    let block = &mut planes[layer * layout.layer_plane_bytes..(layer + 1) * layout.layer_plane_bytes];
    LayerMut {
        planes: split_planes_mut(layout, block),
        state: &mut state[layer * layout.layer_state_bytes..(layer + 1) * layout.layer_state_bytes],
    }
}

pub fn layer_ref<'a>(layout: &Layout, planes: &'a [u8], state: &'a [u8], layer: usize) -> LayerRef<'a> {
    let block = &planes[layer * layout.layer_plane_bytes..(layer + 1) * layout.layer_plane_bytes];
    LayerRef {
        planes: std::array::from_fn(|p| &block[layout.plane_offset[p]..layout.plane_offset[p] + layout.plane_bytes[p]]),
        state: &state[layer * layout.layer_state_bytes..(layer + 1) * layout.layer_state_bytes],
    }
}

/// Splits one layer's plane block into one mutable slice per plane (empty for absent planes).
pub fn split_planes_mut<'a>(layout: &Layout, mut block: &'a mut [u8]) -> [&'a mut [u8]; SIKV_NUM_PLANES] {
    let mut out: [&'a mut [u8]; SIKV_NUM_PLANES] = Default::default();
    let mut consumed = 0usize;
    for p in 0..SIKV_NUM_PLANES {
        if layout.plane_bytes[p] == 0 {
            continue;
        }
        let rest = std::mem::take(&mut block);
        let (_, rest) = rest.split_at_mut(layout.plane_offset[p] - consumed);
        let (this, rest) = rest.split_at_mut(layout.plane_bytes[p]);
        consumed = layout.plane_offset[p] + layout.plane_bytes[p];
        out[p] = this;
        block = rest;
    }
    out
}

/// Whether a configuration runs on the GPU: CUDA asks for it (and fails without a device);
/// AUTO takes it when a device is usable.
pub fn runs_on_gpu(cfg: &CacheConfig) -> Result<bool> {
    match cfg.device {
        Device::Cpu => Ok(false),
        Device::Cuda => Ok(true),
        Device::Auto => Ok(crate::gpu::GpuContext::new(cfg, &Layout::new(cfg)).is_ok()),
    }
}

/// The stage executor of the stateless calls: the CPU stages or the CUDA launchers.
pub enum Exec {
    Cpu,
    Gpu(crate::gpu::GpuContext),
}

impl Exec {
    pub fn create(cfg: &CacheConfig, layout: &Layout) -> Result<Exec> {
        match cfg.device {
            Device::Cpu => Ok(Exec::Cpu),
            Device::Cuda => Ok(Exec::Gpu(crate::gpu::GpuContext::new(cfg, layout)?)),
            Device::Auto => match crate::gpu::GpuContext::new(cfg, layout) {
                Ok(g) => Ok(Exec::Gpu(g)),
                Err(e) if e.status == SikvStatus::SIKV_ERR_NO_DEVICE => Ok(Exec::Cpu),
                Err(e) => Err(e),
            },
        }
    }
    pub fn is_gpu(&self) -> bool {
        matches!(self, Exec::Gpu(_))
    }
    pub fn gpu(&self) -> Result<&crate::gpu::GpuContext> {
        match self {
            Exec::Gpu(g) => Ok(g),
            Exec::Cpu => Err(Error::new(
                SikvStatus::SIKV_ERR_NO_DEVICE,
                "this handle runs on the CPU",
            )),
        }
    }
    pub fn workspace_bytes(&self, cfg: &CacheConfig, layout: &Layout, batch: u32) -> usize {
        match self {
            Exec::Cpu => 0,
            Exec::Gpu(_) => crate::gpu::GpuContext::workspace_bytes(cfg, layout, batch),
        }
    }
}
