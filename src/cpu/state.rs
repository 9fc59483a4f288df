//! Per-sequence state records (one per sequence slot and KV head in a layer's state pool): the
//! record's byte views, decoding ([`read_state`]), clearing ([`reset_sequence`]), the
//! calibrated check, and the sequence geometry derived from the dense set (which positions are
//! candidates, which dense entries are attended). Shared by the stages, the managed cache and
//! the GPU tests, which compare the device's records against these.

use crate::config::{CacheConfig, HalfKind};
use crate::ensure;
use crate::layout::{Layout, DENSE_EMPTY, META_CALIBRATED, META_WORDS};
use crate::numeric::{get_half, put_half, read_f32s, read_i32, write_i32};
use crate::status::{Error, Result, SikvStatus};

/// A decoded state record of one (sequence slot, KV head); dense keys/values widened to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct StateRecord {
    pub centre: Vec<f32>,
    pub scale: Vec<f32>,
    pub inv_scale: Vec<f32>,
    pub qmed: Vec<f32>,
    pub codebook: Vec<f32>,
    pub meta: [i32; META_WORDS],
    /// `dense_capacity` positions (DENSE_EMPTY = none).
    pub dense_pos: Vec<i32>,
    /// `dense_capacity x d` centred keys.
    pub dense_k: Vec<f32>,
    /// `dense_capacity x d` values.
    pub dense_v: Vec<f32>,
}

pub(super) fn record<'s>(layout: &Layout, state: &'s [u8], seq_slot: usize, head: usize) -> &'s [u8] {
    let off = layout.state_offset(seq_slot, head);
    &state[off..off + layout.state.bytes]
}

pub(super) fn record_mut<'s>(layout: &Layout, state: &'s mut [u8], seq_slot: usize, head: usize) -> &'s mut [u8] {
    let off = layout.state_offset(seq_slot, head);
    &mut state[off..off + layout.state.bytes]
}

pub(super) fn f32s(bytes: &[u8], off: usize, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    read_f32s(&bytes[off..off + 4 * n], &mut v);
    v
}

pub(super) fn meta_word(layout: &Layout, rec: &[u8], i: usize) -> i32 {
    read_i32(&rec[layout.state.meta..], i)
}

pub(super) fn dense_pos_of(layout: &Layout, rec: &[u8]) -> Vec<i32> {
    (0..layout.state.dense_capacity)
        .map(|i| read_i32(&rec[layout.state.dense_pos..], i))
        .collect()
}

pub(super) fn dense_row(layout: &Layout, storage: HalfKind, rec: &[u8], base: usize, idx: usize) -> Vec<f32> {
    let d = layout.state.head_dim;
    let at = base + 2 * idx * d;
    (0..d)
        .map(|c| get_half(storage, &rec[at + 2 * c..at + 2 * c + 2]))
        .collect()
}

/// Writes dense entry `idx`: position, centred key (rounded to `storage`) and value.
pub(super) fn write_dense(
    layout: &Layout,
    storage: HalfKind,
    rec: &mut [u8],
    idx: usize,
    pos: i32,
    kp: &[f32],
    v: &[f32],
) {
    let st = &layout.state;
    let d = st.head_dim;
    write_i32(&mut rec[st.dense_pos..], idx, pos);
    for c in 0..d {
        let ka = st.dense_k + 2 * (idx * d + c);
        put_half(storage, kp[c], &mut rec[ka..ka + 2]);
        let va = st.dense_v + 2 * (idx * d + c);
        put_half(storage, v[c], &mut rec[va..va + 2]);
    }
}

/// Decodes the state record of (`seq_slot`, `head`) from a layer's state pool.
pub fn read_state(layout: &Layout, storage: HalfKind, state: &[u8], seq_slot: usize, head: usize) -> StateRecord {
    let st = &layout.state;
    let d = st.head_dim;
    let cap = st.dense_capacity;
    let rec = record(layout, state, seq_slot, head);
    let mut meta = [0i32; META_WORDS];
    for (i, m) in meta.iter_mut().enumerate() {
        *m = meta_word(layout, rec, i);
    }
    StateRecord {
        centre: f32s(rec, st.centre, d),
        scale: f32s(rec, st.scale, d),
        inv_scale: f32s(rec, st.inv_scale, d),
        qmed: f32s(rec, st.qmed, d),
        codebook: f32s(rec, st.codebook, st.codebook_len()),
        meta,
        dense_pos: dense_pos_of(layout, rec),
        dense_k: (0..cap)
            .flat_map(|i| dense_row(layout, storage, rec, st.dense_k, i))
            .collect(),
        dense_v: (0..cap)
            .flat_map(|i| dense_row(layout, storage, rec, st.dense_v, i))
            .collect(),
    }
}

/// Clears every record of `seq_slot` in a layer's state pool: zeroes, dense entries empty, not
/// calibrated. The managed cache calls it when a sequence slot is (re)used.
pub fn reset_sequence(layout: &Layout, state: &mut [u8], seq_slot: usize) -> Result<()> {
    ensure!(
        seq_slot < layout.max_seqs,
        SIKV_ERR_OUT_OF_BOUNDS,
        "seq_slot = {seq_slot} is outside 0..max_seqs ({})",
        layout.max_seqs
    );
    ensure!(
        state.len() >= layout.layer_state_bytes,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "the state pool has {} bytes, the layout needs {}",
        state.len(),
        layout.layer_state_bytes
    );
    for h in 0..layout.num_kv_heads {
        let rec = record_mut(layout, state, seq_slot, h);
        rec.fill(0);
        for i in 0..layout.state.dense_capacity {
            write_i32(&mut rec[layout.state.dense_pos..], i, DENSE_EMPTY);
        }
    }
    Ok(())
}

/// NOT_CALIBRATED unless the record of `slot` is calibrated for every KV head; `name` is the
/// argument the slot came from, for the message.
pub(super) fn check_calibrated(layout: &Layout, state: &[u8], name: &str, slot: usize) -> Result<()> {
    for h in 0..layout.num_kv_heads {
        let rec = record(layout, state, slot, h);
        if meta_word(layout, rec, META_CALIBRATED) != 1 {
            return Err(Error::new(
                SikvStatus::SIKV_ERR_NOT_CALIBRATED,
                format!("{name} = {slot}: the sequence is not calibrated for this layer (KV head {h})"),
            ));
        }
    }
    Ok(())
}

/// The end of a sequence of length `len`'s candidates and the start of its window:
/// `max(S, len - W)` (the kernels' cand_end).
pub fn cand_end(cfg: &CacheConfig, len: usize) -> usize {
    (cfg.n_sink as usize).max(len.saturating_sub(cfg.n_window as usize))
}

/// Candidates of one (sequence, KV head) of length `len`: positions in
/// `[S, cand_end)` that are not heavy (`dense_pos[S..S+H]`), ascending.
pub fn expected_candidates(cfg: &CacheConfig, dense_pos: &[i32], len: usize) -> Vec<u32> {
    let (s, h) = (cfg.n_sink as usize, cfg.n_heavy as usize);
    let mut heavy: Vec<u32> = dense_pos[s..s + h]
        .iter()
        .filter(|&&p| p >= 0)
        .map(|&p| p as u32)
        .collect();
    heavy.sort_unstable();
    (s as u32..cand_end(cfg, len) as u32)
        .filter(|p| heavy.binary_search(p).is_err())
        .collect()
}

/// The dense tokens attended for a sequence of length `len`, in dense-index order:
/// (dense index, position).
pub fn dense_entries(cfg: &CacheConfig, dense_pos: &[i32], len: usize) -> Vec<(usize, usize)> {
    let (s, h) = (cfg.n_sink as usize, cfg.n_heavy as usize);
    let win_lo = cand_end(cfg, len);
    let mut out = Vec::new();
    for (i, &p) in dense_pos.iter().enumerate() {
        if p < 0 {
            continue;
        }
        let p = p as usize;
        // Sinks and heavy entries count while stored; window entries only inside the window.
        let keep = p < len && (i < s + h || p >= win_lo);
        if keep {
            out.push((i, p));
        }
    }
    out
}
