//! Descriptors of the memory a stage runs on: host slices (CPU executor) or device addresses
//! (CUDA executor). The lifetimes bound host memory to the call; device addresses are the
//! engine's (or the managed cache's) and are only handed to kernels.

use crate::cpu::{LayerMut, LayerRef, PageTable};
use crate::gpu::{DevLayer, DevPageTable};
use crate::status::{Error, Result};

/// An input array: host elements, or a device address of elements of type `T`.
pub enum Mem<'a, T> {
    Host(&'a [T]),
    Device(u64),
}

impl<T> Clone for Mem<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Mem<'_, T> {}

impl<'a, T> Mem<'a, T> {
    /// The host elements; an error naming `what` for a device address.
    pub fn host(self, what: &str) -> Result<&'a [T]> {
        match self {
            Mem::Host(s) => Ok(s),
            Mem::Device(_) => Err(Error::invalid(format!("`{what}` must be host memory on the CPU"))),
        }
    }
    /// The device address; an error naming `what` for host memory.
    pub fn device(self, what: &str) -> Result<u64> {
        match self {
            Mem::Device(p) => Ok(p),
            Mem::Host(_) => Err(Error::invalid(format!(
                "`{what}` must be device memory on a CUDA device"
            ))),
        }
    }
}

/// An output array: host elements, or a device address.
pub enum MemMut<'a, T> {
    Host(&'a mut [T]),
    Device(u64),
}

impl<'a, T> MemMut<'a, T> {
    pub fn host(self, what: &str) -> Result<&'a mut [T]> {
        match self {
            MemMut::Host(s) => Ok(s),
            MemMut::Device(_) => Err(Error::invalid(format!("`{what}` must be host memory on the CPU"))),
        }
    }
    pub fn device(self, what: &str) -> Result<u64> {
        match self {
            MemMut::Device(p) => Ok(p),
            MemMut::Host(_) => Err(Error::invalid(format!(
                "`{what}` must be device memory on a CUDA device"
            ))),
        }
    }
}

/// One layer's pools, for the stages that write them (calibrate, append).
pub enum LayerPools<'a> {
    Host(LayerMut<'a>),
    Device(DevLayer),
}

/// One layer's pools, for the stages that only read them (select, attend).
#[derive(Clone, Copy)]
pub enum LayerView<'a> {
    Host(LayerRef<'a>),
    Device(DevLayer),
}

/// A batch's CSR page table.
pub enum Table<'a> {
    Host(PageTable<'a>),
    Device(DevPageTable),
}

impl Table<'_> {
    pub fn batch(&self) -> u32 {
        match self {
            Table::Host(t) => t.batch() as u32,
            Table::Device(t) => t.batch,
        }
    }
}

/// The caller's device workspace (unused on the CPU).
#[derive(Clone, Copy, Debug, Default)]
pub struct Workspace {
    pub ptr: u64,
    pub bytes: usize,
}

/// Stage `calibrate`'s arguments: one sequence slot's prompt.
pub struct Prompt<'a> {
    pub seq_slot: u32,
    pub n_tokens: u32,
    /// Post-RoPE keys and values, model dtype, `[n_tokens][H_kv][d]`.
    pub k: Mem<'a, u8>,
    pub v: Mem<'a, u8>,
    pub n_query: u32,
    /// The last `n_query` prompt queries, model dtype, `[n_query][H_q][d]`.
    pub q_tail: Mem<'a, u8>,
    /// `page * page_size + slot` per token (negative = no page write).
    pub slot_mapping: Mem<'a, i64>,
}

/// Stage `append`'s arguments: new tokens of any sequences.
pub struct NewTokens<'a> {
    pub n_tokens: u32,
    pub k: Mem<'a, u8>,
    pub v: Mem<'a, u8>,
    pub slot_mapping: Mem<'a, i64>,
    pub seq_slot: Mem<'a, i32>,
    pub position: Mem<'a, i32>,
}

/// A decode batch: one query token per sequence.
pub struct Batch<'a> {
    pub table: Table<'a>,
    /// The state slot of each sequence, `[batch]`.
    pub seq_slot: Mem<'a, i32>,
    /// Queries, model dtype, `[batch][H_q][d]`.
    pub q: Mem<'a, u8>,
    /// The longest sequence's length, where the caller knows it on the host (a managed cache):
    /// an eager dense decode then sizes its grid from it instead of max_seq_len, so a short
    /// sequence under a long declared maximum does not pay for the surplus blocks.
    pub live_max: Option<u32>,
}

/// What attend attends beyond the dense set.
pub enum Selected<'a> {
    /// Every stored token (the dense decode).
    All,
    /// A selection: `indices` `[batch][H_kv][budget_max]`, `counts` `[batch][H_kv]`.
    Given {
        indices: Mem<'a, i32>,
        counts: Mem<'a, i32>,
    },
}
