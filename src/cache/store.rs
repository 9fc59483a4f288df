//! Where the managed cache's pools live (host memory for the CPU executor, device memory for
//! CUDA) and how one call's bookkeeping becomes the executor's descriptors.

use super::device::DeviceStore;
use super::{Fnv, OwnedPageTable};
use crate::cpu::{LayerMut, LayerRef};
use crate::exec::{
    Batch, DecodePath, Executor, LayerPools, LayerView, Mem, MemMut, NewTokens, Prompt, Selected, Stream, Table,
    Workspace,
};
use crate::ffi::boundary::ForeignBytes;
use crate::layout::{Layout, SIKV_NUM_PLANES};
use crate::status::{Error, Result, SikvStatus};

/// Activations passed to a managed call: host bytes or a device address (model dtype).
pub type Activations<'a> = Mem<'a, u8>;
/// Where a managed call writes its output: host bytes or a device address.
pub type Output<'a> = MemMut<'a, u8>;

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

/// Engine-owned pools handed to `Cache::with_pools`.
pub enum Pools {
    Host {
        planes: ForeignBytes,
        state: ForeignBytes,
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

impl Pools {
    pub fn placement(&self) -> crate::exec::Placement {
        match self {
            Pools::Host { .. } => crate::exec::Placement::Host,
            Pools::Device { .. } => crate::exec::Placement::Device,
        }
    }
}

/// Host memory that the cache either owns or borrows from the engine for its lifetime.
pub enum HostBytes {
    Owned(Vec<u8>),
    Borrowed(ForeignBytes),
}

impl HostBytes {
    pub fn bytes(&self) -> &[u8] {
        match self {
            HostBytes::Owned(v) => v,
            HostBytes::Borrowed(s) => s.bytes(),
        }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            HostBytes::Owned(v) => v,
            HostBytes::Borrowed(s) => s.bytes_mut(),
        }
    }
}

pub struct HostStore {
    planes: HostBytes,
    state: HostBytes,
}

pub enum Store {
    Host(HostStore),
    Device(Box<DeviceStore>),
}

impl Store {
    pub fn create(exec: &Executor, pools: Option<Pools>) -> Result<Store> {
        if exec.is_gpu() {
            return Ok(Store::Device(Box::new(DeviceStore::create(exec, pools)?)));
        }
        let layout = exec.layout();
        let (planes, state) = match pools {
            None => (
                HostBytes::Owned(try_zeroed(layout.total_plane_bytes(), "plane pool")?),
                HostBytes::Owned(try_zeroed(layout.total_state_bytes(), "state pool")?),
            ),
            Some(Pools::Host { planes, mut state }) => {
                for (have, need, name) in [
                    (planes.bytes().len(), layout.total_plane_bytes(), "planes_bytes"),
                    (state.bytes().len(), layout.total_state_bytes(), "state_bytes"),
                ] {
                    crate::ensure!(
                        have >= need,
                        SIKV_ERR_BUFFER_TOO_SMALL,
                        "pools.{name} = {have} is smaller than the {need} bytes the layout needs"
                    );
                }
                state.bytes_mut().fill(0);
                (HostBytes::Borrowed(planes), HostBytes::Borrowed(state))
            }
            Some(Pools::Device { .. }) => {
                return Err(Error::invalid("device pools were given to a cache running on the CPU"))
            }
        };
        Ok(Store::Host(HostStore { planes, state }))
    }

    pub fn reset_slot(&mut self, exec: &Executor, slot: u32) -> Result<()> {
        match self {
            Store::Device(d) => d.reset_slot(exec, slot),
            Store::Host(h) => {
                let layout = exec.layout();
                let st = h.state.bytes_mut();
                for l in 0..layout.num_layers {
                    let at = l * layout.layer_state_bytes;
                    let state = MemMut::Host(&mut st[at..at + layout.layer_state_bytes]);
                    exec.reset_sequence(state, slot, std::ptr::null_mut())?;
                }
                Ok(())
            }
        }
    }

    /// Copies the state records of `src` to `dst` and each `(from, to)` page (all layers).
    pub fn copy_seq(&mut self, layout: &Layout, src: u32, dst: u32, pages: &[(u32, u32)]) -> Result<()> {
        let copies = ForkCopies::new(layout, src, dst, pages);
        match self {
            Store::Device(d) => d.copy_seq(&copies),
            Store::Host(h) => {
                let st = h.state.bytes_mut();
                for &(from, to, len) in &copies.state {
                    st.copy_within(from..from + len, to);
                }
                let pl = h.planes.bytes_mut();
                for &(from, to, len) in &copies.planes {
                    pl.copy_within(from..from + len, to);
                }
                Ok(())
            }
        }
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
        match self {
            Store::Device(d) => d.calibrate(exec, layer, slot, n, k, v, nq, q_tail, slot_mapping, stream),
            Store::Host(h) => {
                let prompt = Prompt {
                    seq_slot: slot,
                    n_tokens: n,
                    k,
                    v,
                    n_query: nq,
                    q_tail,
                    slot_mapping: Mem::Host(slot_mapping),
                };
                let pools = LayerPools::Host(h.layer_mut(exec.layout(), layer as usize));
                exec.calibrate(pools, &prompt, Workspace::default(), stream)
            }
        }
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
        match self {
            Store::Device(d) => d.append(exec, layer, k, v, slot_mapping, seq_slot, position, stream),
            Store::Host(h) => {
                let tokens = NewTokens {
                    n_tokens: slot_mapping.len() as u32,
                    k,
                    v,
                    slot_mapping: Mem::Host(slot_mapping),
                    seq_slot: Mem::Host(seq_slot),
                    position: Mem::Host(position),
                };
                let pools = LayerPools::Host(h.layer_mut(exec.layout(), layer as usize));
                exec.append(pools, &tokens, stream)
            }
        }
    }

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
        match self {
            Store::Device(d) => d.select(exec, layer, table, seq_slot, q, indices, counts, stream),
            Store::Host(h) => {
                let batch = host_batch(table, seq_slot, q);
                let pools = LayerView::Host(h.layer_ref(exec.layout(), layer as usize));
                let ws = Workspace::default();
                exec.select(pools, &batch, MemMut::Host(indices), MemMut::Host(counts), ws, stream)
            }
        }
    }

    /// Several query rows per sequence (`Executor::attend_rows`).
    #[allow(clippy::too_many_arguments)] // the batch, unpacked by the cache
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
        match self {
            Store::Device(d) => d.attend_rows(exec, layer, table, seq_slot, q, rows, out, stream),
            Store::Host(h) => {
                let batch = host_batch(table, seq_slot, q);
                let pools = LayerView::Host(h.layer_ref(exec.layout(), layer as usize));
                exec.attend_rows(pools, &batch, rows, out)
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // the batch, unpacked by the cache
    pub fn attend(
        &mut self,
        exec: &Executor,
        layer: u32,
        table: &OwnedPageTable,
        seq_slot: &[i32],
        q: Activations,
        out: Output,
        sel: Selection,
        stream: Stream,
    ) -> Result<()> {
        match self {
            Store::Device(d) => d.attend(exec, layer, table, seq_slot, q, out, sel, stream),
            Store::Host(h) => {
                let batch = host_batch(table, seq_slot, q);
                let pools = LayerView::Host(h.layer_ref(exec.layout(), layer as usize));
                let ws = Workspace::default();
                match sel {
                    Selection::All => exec.attend(pools, &batch, Selected::All, out, ws, stream),
                    Selection::Select => exec.decode(pools, &batch, DecodePath::Sparse, out, ws, stream),
                    Selection::Given { indices, counts } => {
                        let sel = Selected::Given {
                            indices: Mem::Host(indices),
                            counts: Mem::Host(counts),
                        };
                        exec.attend(pools, &batch, sel, out, ws, stream)
                    }
                }
            }
        }
    }

    /// Waits for the work queued on `stream` (nothing to wait for on the CPU).
    pub fn synchronize(&self, stream: Stream) -> Result<()> {
        match self {
            Store::Device(d) => d.synchronize(stream),
            Store::Host(_) => Ok(()),
        }
    }

    /// One state record, copied to the host.
    pub fn read_state(&self, layout: &Layout, layer: u32, slot: u32, head: u32) -> Result<Vec<u8>> {
        match self {
            Store::Device(d) => d.read_state(layout, layer, slot, head),
            Store::Host(h) => {
                let at = layer as usize * layout.layer_state_bytes + layout.state_offset(slot as usize, head as usize);
                Ok(h.state.bytes()[at..at + layout.state.bytes].to_vec())
            }
        }
    }

    pub fn hash_pools(&self, layout: &Layout, hash: &mut Fnv) -> Result<()> {
        match self {
            Store::Device(d) => d.hash_pools(layout, hash),
            Store::Host(h) => {
                hash.write(&h.planes.bytes()[..layout.total_plane_bytes()]);
                hash.write(&h.state.bytes()[..layout.total_state_bytes()]);
                Ok(())
            }
        }
    }
}

/// What a fork copies, as `(from, to, bytes)` offsets into the state pool and the plane pool:
/// the source's state records to the new slot at every layer, and every `(from, to)` page of
/// every plane at every layer. One geometry for the host copies and the device copies.
pub struct ForkCopies {
    pub state: Vec<(usize, usize, usize)>,
    pub planes: Vec<(usize, usize, usize)>,
}

impl ForkCopies {
    fn new(layout: &Layout, src: u32, dst: u32, pages: &[(u32, u32)]) -> ForkCopies {
        let rec = layout.num_kv_heads * layout.state.bytes;
        let state = (0..layout.num_layers)
            .map(|l| {
                let base = l * layout.layer_state_bytes;
                (base + src as usize * rec, base + dst as usize * rec, rec)
            })
            .collect();
        let mut planes = Vec::new();
        for l in 0..layout.num_layers {
            for p in 0..SIKV_NUM_PLANES {
                let block = layout.num_kv_heads * layout.page_size * layout.format.row_bytes[p];
                if block == 0 {
                    continue;
                }
                let base = l * layout.layer_plane_bytes + layout.plane_offset[p];
                for &(from, to) in pages {
                    planes.push((base + from as usize * block, base + to as usize * block, block));
                }
            }
        }
        ForkCopies { state, planes }
    }
}

fn host_batch<'a>(table: &'a OwnedPageTable, seq_slot: &'a [i32], q: Activations<'a>) -> Batch<'a> {
    Batch {
        table: Table::Host(table.view()),
        seq_slot: Mem::Host(seq_slot),
        q,
        live_max: None,
    }
}

impl HostStore {
    /// One layer's plane and state slices of the whole-cache pools.
    fn layer_mut(&mut self, layout: &Layout, layer: usize) -> LayerMut<'_> {
        let block =
            &mut self.planes.bytes_mut()[layer * layout.layer_plane_bytes..(layer + 1) * layout.layer_plane_bytes];
        LayerMut {
            planes: split_planes_mut(layout, block),
            state: &mut self.state.bytes_mut()
                [layer * layout.layer_state_bytes..(layer + 1) * layout.layer_state_bytes],
        }
    }

    fn layer_ref(&self, layout: &Layout, layer: usize) -> LayerRef<'_> {
        let block = &self.planes.bytes()[layer * layout.layer_plane_bytes..(layer + 1) * layout.layer_plane_bytes];
        LayerRef {
            planes: std::array::from_fn(|p| {
                &block[layout.plane_offset[p]..layout.plane_offset[p] + layout.plane_bytes[p]]
            }),
            state: &self.state.bytes()[layer * layout.layer_state_bytes..(layer + 1) * layout.layer_state_bytes],
        }
    }
}

/// Splits one layer's plane block into one mutable slice per plane (empty for absent planes).
fn split_planes_mut<'a>(layout: &Layout, mut block: &'a mut [u8]) -> [&'a mut [u8]; SIKV_NUM_PLANES] {
    let mut out: [&'a mut [u8]; SIKV_NUM_PLANES] = Default::default();
    let mut consumed = 0usize;
    for (p, slot) in out.iter_mut().enumerate() {
        if layout.plane_bytes[p] == 0 {
            continue;
        }
        let rest = std::mem::take(&mut block);
        let (_, rest) = rest.split_at_mut(layout.plane_offset[p] - consumed);
        let (this, rest) = rest.split_at_mut(layout.plane_bytes[p]);
        consumed = layout.plane_offset[p] + layout.plane_bytes[p];
        *slot = this;
        block = rest;
    }
    out
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
