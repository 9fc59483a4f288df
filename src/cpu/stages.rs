//! Stage entry points of the CPU backend.
//!
//! Every entry point validates all of its arguments before it writes anything, so an error
//! leaves the pools untouched. The helpers other modules reuse (the managed cache, GPU tests)
//! live beside this file: the page table in `table`, state records and candidate sets in
//! `state`.

use super::pools::{check_pools_mut, check_pools_ref, rows_mut, rows_ref, LayerMut, LayerRef};
use super::state::{
    check_calibrated, dense_entries, dense_pos_of, dense_row, expected_candidates, f32s, meta_word, record, record_mut,
    write_dense,
};
use super::table::PageTable;
use crate::config::{CacheConfig, Dtype, HalfKind, Selector};
use crate::ensure;
use crate::layout::{Layout, DENSE_EMPTY, META_CALIBRATED, META_N_HEAVY, META_PROMPT_LEN, SIKV_PLANE_SIGN};
use crate::numeric::{write_f32s, write_i32};
use crate::reference::attend::attend_group;
use crate::reference::calibrate::{calibrate_head, CalibrateParams};
use crate::reference::encode::{centred, decode_key, decode_value, encode_token, finite_max, half_max, saturate};
use crate::reference::rerank::RerankQuery;
use crate::reference::score::{build_lut, group_mean_query, lut_score, sign_sign_score};
use crate::reference::topk::topk;
use crate::status::Result;

// ---------------------------------------------------------------------------------------------
// Validation helpers.

fn check_slot_mapping(layout: &Layout, slot_mapping: &[i64]) -> Result<()> {
    let cap = (layout.num_pages * layout.page_size) as i64;
    for (t, &sm) in slot_mapping.iter().enumerate() {
        ensure!(
            sm < cap,
            SIKV_ERR_OUT_OF_BOUNDS,
            "slot_mapping[{t}] = {sm} is outside 0..num_pages * page_size ({cap})"
        );
    }
    Ok(())
}

fn check_seq_slot(cfg: &CacheConfig, name: &str, slot: i64) -> Result<usize> {
    ensure!(
        slot >= 0 && slot < cfg.max_seqs as i64,
        SIKV_ERR_OUT_OF_BOUNDS,
        "{name} = {slot} is outside 0..max_seqs ({})",
        cfg.max_seqs
    );
    Ok(slot as usize)
}

/// Validates what select / attend share; returns the sequence slots.
/// Checks a batch's slots (in range, calibrated) and `q` (`q_rows` x H_q x d: one row per
/// sequence for a decode call) against a page table already validated; returns the slots.
pub(super) fn check_batch_rows(
    layout: &Layout,
    cfg: &CacheConfig,
    state: &[u8],
    table: &PageTable,
    seq_slot: &[i32],
    q: &[f32],
    q_rows: usize,
) -> Result<Vec<usize>> {
    let b = table.batch();
    ensure!(
        seq_slot.len() == b,
        SIKV_ERR_INVALID_ARGUMENT,
        "seq_slot has {} entries, the page table has batch {b}",
        seq_slot.len()
    );
    let want = q_rows * (cfg.num_q_heads * cfg.head_dim) as usize;
    ensure!(
        q.len() == want,
        SIKV_ERR_INVALID_ARGUMENT,
        "q has {} floats, expected {} x num_q_heads x head_dim = {want}",
        q.len(),
        if q_rows == b { "batch" } else { "query rows" }
    );
    let mut slots = Vec::with_capacity(b);
    for (i, &s) in seq_slot.iter().enumerate() {
        let s = check_seq_slot(cfg, &format!("seq_slot[{i}]"), s as i64)?;
        check_calibrated(layout, state, &format!("seq_slot[{i}]"), s)?;
        slots.push(s);
    }
    Ok(slots)
}

fn check_batch(
    layout: &Layout,
    cfg: &CacheConfig,
    state: &[u8],
    table: &PageTable,
    seq_slot: &[i32],
    q: &[f32],
) -> Result<Vec<usize>> {
    table.validate(layout, cfg)?;
    check_batch_rows(layout, cfg, state, table, seq_slot, q, table.batch())
}

/// Checks that selection buffers hold `rows` rows (`what` names them: the batch, or query
/// rows) of budget_max indices and one count per KV head.
pub(super) fn check_selection_buffers(
    cfg: &CacheConfig,
    rows: usize,
    what: &str,
    indices: usize,
    counts: usize,
) -> Result<()> {
    let (hkv, kmax) = (cfg.num_kv_heads as usize, cfg.budget.max as usize);
    ensure!(
        indices >= rows * hkv * kmax,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "indices has {indices} entries, {what} x num_kv_heads x budget_max = {} needed",
        rows * hkv * kmax
    );
    ensure!(
        counts >= rows * hkv,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "counts has {counts} entries, {what} x num_kv_heads = {} needed",
        rows * hkv
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Non-finite and out-of-range inputs (docs/DESIGN.md): K, V and the calibration queries are
// read with NaN -> 0 and ±inf -> ± the dtype's largest finite value, as the kernels read them;
// what goes into a 16-bit store (dense set, 16-bit planes) saturates at the storage type's
// largest finite value. Both are the identity on finite, in-range data.

/// `x` as the stages read it: NaN -> 0, ±inf -> ±`finite_max(dtype)`.
fn sanitised(x: &[f32], dtype: Dtype) -> Vec<f32> {
    let max = finite_max(dtype);
    x.iter().map(|&y| saturate(y, max)).collect()
}

/// `x` saturated at the largest finite value of the 16-bit storage type (for `write_dense`).
fn for_storage(x: &[f32], storage: HalfKind) -> Vec<f32> {
    let max = half_max(storage);
    x.iter().map(|&y| saturate(y, max)).collect()
}

// ---------------------------------------------------------------------------------------------
// Stages.

/// `k` and `v` must each hold `expected` floats (`n x num_kv_heads x head_dim`).
fn check_kv_len(k: &[f32], v: &[f32], expected: usize) -> Result<()> {
    for (name, x) in [("k", k), ("v", v)] {
        ensure!(
            x.len() == expected,
            SIKV_ERR_INVALID_ARGUMENT,
            "{name} has {} floats, expected n x num_kv_heads x head_dim = {expected}",
            x.len()
        );
    }
    Ok(())
}

/// Stage `calibrate` for one sequence (all KV heads of one layer): fits the state, writes the
/// state records of `seq_slot`, encodes all `n` tokens into their page slots
/// (`slot_mapping[t] = page * page_size + slot`; negative = skip that token's page write) and
/// fills the dense set (sinks, heavy, window). `k`, `v`: `n x H_kv x d`; `q_tail`:
/// `nq x H_q x d` (the last nq prompt queries, nq >= 1). Sets meta prompt_len = n and
/// calibrated = 1. Validates everything before writing anything. `k`, `v` and `q_tail` are
/// read sanitised (NaN -> 0, ±inf -> ± the dtype's largest finite value).
#[allow(clippy::too_many_arguments)] // the stage's inputs one for one, as the kernels take them
pub fn calibrate(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &mut LayerMut,
    seq_slot: usize,
    k: &[f32],
    v: &[f32],
    q_tail: &[f32],
    slot_mapping: &[i64],
) -> Result<()> {
    let d = cfg.head_dim as usize;
    let hkv = cfg.num_kv_heads as usize;
    let hq = cfg.num_q_heads as usize;
    let g = cfg.group_size() as usize;
    let storage = cfg.dtype.storage();
    check_pools_mut(layout, layer)?;
    let n = slot_mapping.len();
    ensure!(
        n >= 1,
        SIKV_ERR_INVALID_ARGUMENT,
        "calibrate: slot_mapping is empty (the prompt needs >= 1 token)"
    );
    ensure!(
        n <= cfg.max_seq_len as usize,
        SIKV_ERR_OUT_OF_BOUNDS,
        "calibrate: prompt length {n} exceeds max_seq_len ({})",
        cfg.max_seq_len
    );
    check_kv_len(k, v, n * hkv * d)?;
    ensure!(
        !q_tail.is_empty() && q_tail.len() % (hq * d) == 0,
        SIKV_ERR_INVALID_ARGUMENT,
        "q_tail has {} floats, expected nq x num_q_heads x head_dim with nq >= 1",
        q_tail.len()
    );
    let seq_slot = check_seq_slot(cfg, "seq_slot", seq_slot as i64)?;
    check_slot_mapping(layout, slot_mapping)?;
    for h in 0..hkv {
        let rec = record(layout, layer.state, seq_slot, h);
        ensure!(
            meta_word(layout, rec, META_CALIBRATED) == 0,
            SIKV_ERR_ALREADY_CALIBRATED,
            "seq_slot = {seq_slot} is already calibrated for this layer"
        );
    }

    let (k, v, q_tail) = (
        sanitised(k, cfg.dtype),
        sanitised(v, cfg.dtype),
        sanitised(q_tail, cfg.dtype),
    );
    let nq = q_tail.len() / (hq * d);
    let params = CalibrateParams {
        centre: cfg.centre,
        n_sink: cfg.n_sink,
        n_heavy: cfg.n_heavy,
        n_window: cfg.n_window,
    };
    let (s_n, h_n, w_n) = (cfg.n_sink as usize, cfg.n_heavy as usize, cfg.n_window as usize);
    let st = layout.state;
    for h in 0..hkv {
        let keys: Vec<f32> = (0..n)
            .flat_map(|t| k[(t * hkv + h) * d..(t * hkv + h + 1) * d].iter().copied())
            .collect();
        let qbar: Vec<f32> = (0..nq)
            .flat_map(|j| group_mean_query(&q_tail[(j * hq + h * g) * d..(j * hq + (h + 1) * g) * d], d))
            .collect();
        let cal = calibrate_head(&params, d, &keys, &qbar);

        let rec = record_mut(layout, layer.state, seq_slot, h);
        rec.fill(0);
        write_f32s(&cal.centre, &mut rec[st.centre..]);
        write_f32s(&cal.scale, &mut rec[st.scale..]);
        write_f32s(&cal.inv_scale, &mut rec[st.inv_scale..]);
        write_f32s(&cal.qmed, &mut rec[st.qmed..]);
        write_f32s(&cal.codebook, &mut rec[st.codebook..]);
        write_i32(&mut rec[st.meta..], META_PROMPT_LEN, n as i32);
        write_i32(&mut rec[st.meta..], META_CALIBRATED, 1);
        write_i32(&mut rec[st.meta..], META_N_HEAVY, cal.heavy.len() as i32);
        for i in 0..st.dense_capacity {
            write_i32(&mut rec[st.dense_pos..], i, DENSE_EMPTY);
        }
        let val = |t: usize| &v[(t * hkv + h) * d..(t * hkv + h + 1) * d];
        // The dense set's k' and v, saturated for their 16-bit store.
        let dense_kv = |t: usize| -> (Vec<f32>, Vec<f32>) {
            let kp: Vec<f32> = (0..d).map(|c| centred(keys[t * d + c], cal.centre[c])).collect();
            (for_storage(&kp, storage), for_storage(val(t), storage))
        };
        for p in 0..s_n.min(n) {
            let (kp, vp) = dense_kv(p);
            write_dense(layout, storage, rec, p, p as i32, &kp, &vp);
        }
        for (i, &p) in cal.heavy.iter().enumerate() {
            let p = p as usize;
            let (kp, vp) = dense_kv(p);
            write_dense(layout, storage, rec, s_n + i, p as i32, &kp, &vp);
        }
        if w_n > 0 {
            for p in s_n.max(n.saturating_sub(w_n))..n {
                let (kp, vp) = dense_kv(p);
                write_dense(layout, storage, rec, s_n + h_n + p % w_n, p as i32, &kp, &vp);
            }
        }

        for (t, &sm) in slot_mapping.iter().enumerate() {
            if sm < 0 {
                continue;
            }
            let (page, slot) = (sm as usize / layout.page_size, sm as usize % layout.page_size);
            let mut rows = rows_mut(layout, &mut layer.planes, page, h, slot);
            encode_token(
                &layout.format,
                storage,
                cfg.sign_predicate,
                &keys[t * d..(t + 1) * d],
                val(t),
                &cal.centre,
                &cal.inv_scale,
                &mut rows,
            );
        }
    }
    Ok(())
}

/// Stage `encode` (append): encodes `n` tokens (`k`, `v`: `n x H_kv x d`) into their page
/// slots and updates each token's dense entry when it is a sink or enters the window.
/// `seq_slot[t]` and `position[t]` say whose token it is; `slot_mapping[t] < 0` skips it.
/// The sequence must be calibrated. Validates everything before writing anything. `k` and `v`
/// are read sanitised, as in [`calibrate`].
#[allow(clippy::too_many_arguments)] // the stage's inputs one for one, as the kernels take them
pub fn append(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &mut LayerMut,
    k: &[f32],
    v: &[f32],
    slot_mapping: &[i64],
    seq_slot: &[i32],
    position: &[i32],
) -> Result<()> {
    let d = cfg.head_dim as usize;
    let hkv = cfg.num_kv_heads as usize;
    let storage = cfg.dtype.storage();
    check_pools_mut(layout, layer)?;
    let n = slot_mapping.len();
    ensure!(
        seq_slot.len() == n,
        SIKV_ERR_INVALID_ARGUMENT,
        "seq_slot has {} entries, slot_mapping has {n}",
        seq_slot.len()
    );
    ensure!(
        position.len() == n,
        SIKV_ERR_INVALID_ARGUMENT,
        "position has {} entries, slot_mapping has {n}",
        position.len()
    );
    ensure!(
        n <= cfg.max_append_tokens as usize,
        SIKV_ERR_OUT_OF_BOUNDS,
        "append of {n} tokens exceeds max_append_tokens ({})",
        cfg.max_append_tokens
    );
    check_kv_len(k, v, n * hkv * d)?;
    check_slot_mapping(layout, slot_mapping)?;
    for t in 0..n {
        let slot = check_seq_slot(cfg, &format!("seq_slot[{t}]"), seq_slot[t] as i64)?;
        ensure!(
            position[t] >= 0 && (position[t] as u32) < cfg.max_seq_len,
            SIKV_ERR_OUT_OF_BOUNDS,
            "position[{t}] = {} is outside 0..max_seq_len ({})",
            position[t],
            cfg.max_seq_len
        );
        check_calibrated(layout, layer.state, &format!("seq_slot[{t}]"), slot)?;
    }

    let (s_n, h_n, w_n) = (cfg.n_sink as usize, cfg.n_heavy as usize, cfg.n_window as usize);
    let st = layout.state;
    for t in 0..n {
        let slot = seq_slot[t] as usize;
        let p = position[t] as usize;
        for h in 0..hkv {
            let kt = &sanitised(&k[(t * hkv + h) * d..(t * hkv + h + 1) * d], cfg.dtype);
            let vt = &sanitised(&v[(t * hkv + h) * d..(t * hkv + h + 1) * d], cfg.dtype);
            let rec = record_mut(layout, layer.state, slot, h);
            let centre = f32s(rec, st.centre, d);
            let inv_scale = f32s(rec, st.inv_scale, d);
            if slot_mapping[t] >= 0 {
                let sm = slot_mapping[t] as usize;
                let mut rows = rows_mut(
                    layout,
                    &mut layer.planes,
                    sm / layout.page_size,
                    h,
                    sm % layout.page_size,
                );
                encode_token(
                    &layout.format,
                    storage,
                    cfg.sign_predicate,
                    kt,
                    vt,
                    &centre,
                    &inv_scale,
                    &mut rows,
                );
            }
            let kp: Vec<f32> = (0..d).map(|c| centred(kt[c], centre[c])).collect();
            let (kp, vp) = (for_storage(&kp, storage), for_storage(vt, storage));
            if p < s_n {
                write_dense(layout, storage, rec, p, p as i32, &kp, &vp);
            } else if w_n > 0 {
                write_dense(layout, storage, rec, s_n + h_n + p % w_n, p as i32, &kp, &vp);
            }
        }
    }
    Ok(())
}

/// Stage-1 score (+ re-rank) of one (sequence, KV head) for the group-mean query `qbar`: the
/// selected positions among the candidates of a sequence of length `len` that lie below
/// `limit` (a query row's causal bound; `len` for a decode row).
#[allow(clippy::too_many_arguments)] // one row's inputs; a struct would only repack select's
pub(super) fn select_head(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    b: usize,
    slot: usize,
    h: usize,
    len: usize,
    limit: usize,
    qbar: &[f32],
) -> Vec<u32> {
    let d = cfg.head_dim as usize;
    let p_sz = layout.page_size;
    let storage = cfg.dtype.storage();
    let st = layout.state;
    let rec = record(layout, layer.state, slot, h);
    let prompt_len = meta_word(layout, rec, META_PROMPT_LEN).max(0) as usize;
    let mut cands = expected_candidates(cfg, &dense_pos_of(layout, rec), len);
    cands.retain(|&p| (p as usize) < limit);
    let forced = |p: u32| cfg.force_generated && p as usize >= prompt_len;
    let sign_row = |p: u32| {
        let (page, s) = table.locate(b, p as usize, p_sz);
        let off = layout.row_offset(SIKV_PLANE_SIGN, page, h, s);
        &layer.planes[SIKV_PLANE_SIGN][off..off + layout.format.row_bytes[SIKV_PLANE_SIGN]]
    };
    let scores: Vec<f32> = match cfg.selector {
        Selector::Lut => {
            let lut = build_lut(&f32s(rec, st.codebook, st.codebook_len()), qbar);
            cands
                .iter()
                .map(|&p| {
                    if forced(p) {
                        f32::INFINITY
                    } else {
                        lut_score(&lut, sign_row(p))
                    }
                })
                .collect()
        }
        Selector::SignSign => {
            let qmed = f32s(rec, st.qmed, d);
            cands
                .iter()
                .map(|&p| {
                    if forced(p) {
                        f32::INFINITY
                    } else {
                        sign_sign_score(sign_row(p), qbar, &qmed)
                    }
                })
                .collect()
        }
    };
    let k = cfg.budget.k_for(cands.len() as u32) as usize;
    if !cfg.two_stage() {
        return topk(&scores, &cands, k);
    }
    let k1 = cands.len().min(cfg.rerank_factor as usize * k);
    let stage1 = topk(&scores, &cands, k1);
    let scale = f32s(rec, st.scale, d);
    let rq = RerankQuery::new(&layout.format, qbar, &scale);
    let mut key = vec![0f32; d];
    let s2: Vec<f32> = stage1
        .iter()
        .map(|&p| {
            if forced(p) {
                f32::INFINITY
            } else {
                let (page, s) = table.locate(b, p as usize, p_sz);
                let rows = rows_ref(layout, &layer.planes, page, h, s);
                rq.score(storage, &rows, &mut key)
            }
        })
        .collect();
    topk(&s2, &stage1, k)
}

/// Selection for a batch: `score` (+ `topk`, + `rerank` when two-stage) per (sequence, KV
/// head). `q`: `B x H_q x d`. Writes `indices[(b*H_kv + h)*budget_max ..]` (positions,
/// ascending; the rest of the row set to -1) and `counts[b*H_kv + h]`.
#[allow(clippy::too_many_arguments)] // the stage's inputs one for one, as the kernels take them
pub fn select(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    seq_slot: &[i32],
    q: &[f32],
    indices: &mut [i32],
    counts: &mut [i32],
) -> Result<()> {
    let d = cfg.head_dim as usize;
    let hkv = cfg.num_kv_heads as usize;
    let kmax = cfg.budget.max as usize;
    let p_sz = layout.page_size;
    check_pools_ref(layout, layer)?;
    let slots = check_batch(layout, cfg, layer.state, table, seq_slot, q)?;
    let b_n = table.batch();
    check_selection_buffers(cfg, b_n, "batch", indices.len(), counts.len())?;
    for (b, &slot) in slots.iter().enumerate() {
        let len = table.seq_len(b, p_sz);
        for h in 0..hkv {
            let qbar = group_mean_query(&q[group_rows(cfg, b, h)], d);
            let chosen = select_head(layout, cfg, layer, table, b, slot, h, len, len, &qbar);
            let row = &mut indices[(b * hkv + h) * kmax..(b * hkv + h + 1) * kmax];
            row.fill(-1);
            for (o, &p) in row.iter_mut().zip(&chosen) {
                *o = p as i32;
            }
            counts[b * hkv + h] = chosen.len() as i32;
        }
    }
    Ok(())
}

/// Attends one (sequence, KV head) for its G query heads `qs` (G x d): the dense entries of a
/// sequence of length `len` below `limit` (a query row's causal bound; `len` for a decode row),
/// then `selected` decoded from the planes. Returns G x d.
#[allow(clippy::too_many_arguments)] // one row's inputs; a struct would only repack attend's
pub(super) fn attend_head(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    b: usize,
    slot: usize,
    h: usize,
    len: usize,
    limit: usize,
    selected: &[u32],
    qs: &[f32],
) -> Vec<f32> {
    let d = cfg.head_dim as usize;
    let storage = cfg.dtype.storage();
    let st = layout.state;
    let rec = record(layout, layer.state, slot, h);
    let dense_pos = dense_pos_of(layout, rec);
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (i, _) in dense_entries(cfg, &dense_pos, len)
        .into_iter()
        .filter(|&(_, p)| p < limit)
    {
        keys.push(dense_row(layout, storage, rec, st.dense_k, i));
        values.push(dense_row(layout, storage, rec, st.dense_v, i));
    }
    let scale = f32s(rec, st.scale, d);
    for &p in selected {
        let (page, s) = table.locate(b, p as usize, layout.page_size);
        let rows = rows_ref(layout, &layer.planes, page, h, s);
        keys.push(decode_key(&layout.format, storage, &rows, &scale));
        values.push(decode_value(&layout.format, storage, &rows));
    }
    attend_group(qs, d, cfg.softmax_scale, &keys, &values)
}

/// The G query heads of KV head `h` in query row `r` of `q` (rows x H_q x d).
pub(super) fn group_rows(cfg: &CacheConfig, r: usize, h: usize) -> std::ops::Range<usize> {
    let (d, hq, g) = (
        cfg.head_dim as usize,
        cfg.num_q_heads as usize,
        cfg.group_size() as usize,
    );
    (r * hq + h * g) * d..(r * hq + (h + 1) * g) * d
}

/// Checks selection row `i`: its count in 0..=kmax, its positions below `bound` (`range` names
/// the allowed range in the message).
pub(super) fn check_selection_row(
    indices: &[i32],
    counts: &[i32],
    i: usize,
    kmax: usize,
    bound: usize,
    range: impl Fn() -> String,
) -> Result<()> {
    let c = counts[i];
    ensure!(
        c >= 0 && c as usize <= kmax,
        SIKV_ERR_OUT_OF_BOUNDS,
        "counts[{i}] = {c} is outside 0..=budget_max ({kmax})"
    );
    for (j, &p) in indices.iter().enumerate().skip(i * kmax).take(c as usize) {
        ensure!(
            p >= 0 && (p as usize) < bound,
            SIKV_ERR_OUT_OF_BOUNDS,
            "indices[{j}] = {p} is outside {}",
            range()
        );
    }
    Ok(())
}

fn check_out(cfg: &CacheConfig, b_n: usize, out: &[f32]) -> Result<()> {
    let want = b_n * (cfg.num_q_heads * cfg.head_dim) as usize;
    ensure!(
        out.len() >= want,
        SIKV_ERR_BUFFER_TOO_SMALL,
        "out has {} floats, batch x num_q_heads x head_dim = {want} needed",
        out.len()
    );
    Ok(())
}

/// Stage `attend` (+ `combine`): attention over the dense set and the selected tokens for a
/// batch; `out`: `B x H_q x d`.
#[allow(clippy::too_many_arguments)] // the stage's inputs one for one, as the kernels take them
pub fn attend(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    seq_slot: &[i32],
    q: &[f32],
    indices: &[i32],
    counts: &[i32],
    out: &mut [f32],
) -> Result<()> {
    let hkv = cfg.num_kv_heads as usize;
    let kmax = cfg.budget.max as usize;
    check_pools_ref(layout, layer)?;
    let slots = check_batch(layout, cfg, layer.state, table, seq_slot, q)?;
    let b_n = table.batch();
    check_selection_buffers(cfg, b_n, "batch", indices.len(), counts.len())?;
    check_out(cfg, b_n, out)?;
    for b in 0..b_n {
        let len = table.seq_len(b, layout.page_size);
        for h in 0..hkv {
            check_selection_row(indices, counts, b * hkv + h, kmax, len, || {
                format!("0..len ({len}) of sequence {b}")
            })?;
        }
    }
    for (b, &slot) in slots.iter().enumerate() {
        let len = table.seq_len(b, layout.page_size);
        for h in 0..hkv {
            let i = b * hkv + h;
            let sel: Vec<u32> = indices[i * kmax..i * kmax + counts[i] as usize]
                .iter()
                .map(|&p| p as u32)
                .collect();
            let at = group_rows(cfg, b, h);
            let o = attend_head(layout, cfg, layer, table, b, slot, h, len, len, &sel, &q[at.clone()]);
            out[at].copy_from_slice(&o);
        }
    }
    Ok(())
}

/// Dense decode over every token of the cache (dequantised), no selection: the library's own
/// baseline and the path below the crossover length.
pub fn attend_dense(
    layout: &Layout,
    cfg: &CacheConfig,
    layer: &LayerRef,
    table: &PageTable,
    seq_slot: &[i32],
    q: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let hkv = cfg.num_kv_heads as usize;
    check_pools_ref(layout, layer)?;
    let slots = check_batch(layout, cfg, layer.state, table, seq_slot, q)?;
    let b_n = table.batch();
    check_out(cfg, b_n, out)?;
    for (b, &slot) in slots.iter().enumerate() {
        let len = table.seq_len(b, layout.page_size);
        for h in 0..hkv {
            let rec = record(layout, layer.state, slot, h);
            let cands = expected_candidates(cfg, &dense_pos_of(layout, rec), len);
            let at = group_rows(cfg, b, h);
            let o = attend_head(layout, cfg, layer, table, b, slot, h, len, len, &cands, &q[at.clone()]);
            out[at].copy_from_slice(&o);
        }
    }
    Ok(())
}
