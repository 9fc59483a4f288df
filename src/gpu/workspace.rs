//! Workspace layout: one caller-provided device buffer, carved into disjoint regions whose
//! sizes follow from the configuration bounds and the batch of the call, never from live
//! lengths (so a captured CUDA graph stays valid). Every region starts 256-byte aligned.
//!
//! | region | type, shape | used by |
//! |---|---|---|
//! | keys | u32 `[B][H_kv][key_stride]` | select (stage-1 score keys), calibrate (heavy keys, B = 1) |
//! | list | i32 `[B][H_kv][stage1_max]` | select, two-stage: stage-1 survivors |
//! | list_n | i32 `[B][H_kv][2]` | select, two-stage: survivor count, k |
//! | keys2 | u32 `[B][H_kv][stage1_max]` | select, two-stage: stage-2 keys |
//! | part_acc | f32 `[B][H_q][num_splits][d]` | attend / attend_dense partial outputs |
//! | part_ml | f32 `[B][H_q][num_splits][2]` | attend / attend_dense partial max and sum |
//! | qbar | f32 `[H_kv][d]` | calibrate: group-mean last prompt query |
//! | rank | i32 `[H_kv][max_seq_len]` | calibrate: heavy rank per prompt token |
//! | hist | u32 `[B][H_kv][TOPK_HIST_STRIDE]` | multi-CTA top-k: TOPK_HIST_BINS-bin histogram of the top key bits, candidate counter (zeroed by `select` before scoring) |
//! | cand | u64 `[B][H_kv][cand_cap]` | multi-CTA top-k: the keys of the threshold bin, `key << 32 \| position` |
//! | gtmap | u32 `[B][H_kv][gtmap_stride]` | multi-CTA top-k: one bit per position, set for the keys above the threshold bin (every word of a compaction tile rewritten by each call) |
//! | route | u32 | routed decode: the path the prologue chose (1 dense, 0 sparse) |

use super::geometry::{
    ATTEND_BLOCKS_PER_SM, ATTEND_MAX_SPAN, COMBINE_MAX_SPLITS, COMPACT_BLOCKS_PER_SM, COMPACT_TILE,
    DENSE_BLOCKS_PER_SM, DENSE_BLOCK_COST, DENSE_CHUNK_ALIGN, DENSE_MIN_CHUNK, DENSE_MIN_CHUNK_ONE, DENSE_TC_MAX_CHUNK,
    FINAL_CLUSTER_SIZES, FINAL_CLUSTER_SM_SHARE, KEPT_SHORT_MAX_SPAN, KEPT_SPLIT_SMALL, MAX_DENSE_CHUNKS,
    SCORE_AHEAD_MAX_D, SCORE_WIDE_BLOCKS_PER_SM, SHORT_DENSE_MAX_CHUNKS, TOPK_CAND_EXTRA, TOPK_HIST_STRIDE,
};
use crate::config::CacheConfig;
use crate::layout::{Layout, ATTEND_SPLIT};

const ALIGN: usize = 256;

fn up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workspace {
    pub keys: usize,
    pub list: usize,
    pub list_n: usize,
    pub keys2: usize,
    pub part_acc: usize,
    pub part_ml: usize,
    pub qbar: usize,
    pub rank: usize,
    pub hist: usize,
    pub cand: usize,
    pub gtmap: usize,
    pub route: usize,
    pub total: usize,
    /// Candidate slots per row (multi-CTA top-k).
    pub cand_cap: usize,
    /// Bitmap words per row of gtmap: whole compaction tiles, so a tile writes its words
    /// without bounds checks.
    pub gtmap_stride: usize,
    pub key_stride: usize,
    /// Partial slots per (sequence, query head) of the sparse attend: the kept entries' splits
    /// at their shortest (KEPT_SPLIT_SMALL), then sel_splits (no split holds both;
    /// kernels/attend.cu sparse_items).
    pub sparse_splits: usize,
    /// The sparse attend's splits of selected tokens at one ATTEND_SPLIT each: ceil(k_max / 64).
    pub sel_splits: usize,
    /// attend_dense: partial slots per (sequence, query head) for its kept splits at their
    /// shortest and the most candidate chunks any device gets (the workspace's size).
    pub dense_total_splits: usize,
}

/// attend_dense: the fewest positions of a candidate chunk, the kernel's floor when it sizes a
/// sequence's chunks from its live length (dense_chunk_of). The grid's chunk count does not
/// depend on it (dense_chunks), so neither does the workspace: a lower floor only puts more of
/// the grid's chunks to work on a sequence much shorter than max_seq_len. DENSE_MIN_CHUNK_ONE for
/// one sequence, DENSE_MIN_CHUNK for more (dense_shape lowers it in the short grid).
/// `requested` (SIKV_DENSE_MIN_CHUNK, an experiment) replaces both, rounded up to
/// DENSE_CHUNK_ALIGN and kept to chunks the tensor-core path takes.
pub fn dense_min_chunk(requested: Option<usize>, batch: u32) -> usize {
    match requested {
        Some(c) => (c.div_ceil(DENSE_CHUNK_ALIGN) * DENSE_CHUNK_ALIGN).clamp(DENSE_CHUNK_ALIGN, DENSE_TC_MAX_CHUNK),
        None if batch <= 1 => DENSE_MIN_CHUNK_ONE,
        None => DENSE_MIN_CHUNK,
    }
}

/// attend_dense: candidate chunks per (KV head, sequence) on a device of `sms` multiprocessors
/// for sequences of up to max_seq_len, as the launch takes them ([`dense_shape`]; the grid's
/// blocks after the dense splits; the kernel sizes each sequence's chunks from its live
/// length). The rule is [`chunks_at`]'s.
pub fn dense_chunks(cfg: &CacheConfig, sms: u32, batch: u32) -> usize {
    dense_shape(cfg, cfg.max_seq_len as usize, sms, batch, None, None).chunks
}

/// The grid's floor on a chunk's positions, which bounds its chunk count: DENSE_MIN_CHUNK_ONE in
/// the short grid (dense_short), else DENSE_MIN_CHUNK.
pub fn dense_grid_floor(short: bool) -> usize {
    if short {
        DENSE_MIN_CHUNK_ONE
    } else {
        DENSE_MIN_CHUNK
    }
}

/// The dense decode's chunks per row for sequences of at most `msl` tokens beside `kept`
/// kept-entry splits, with the grid's floor given (dense_grid_floor): the chunk count of
/// the grid's shape that should finish first, among
///
/// * one wave: as many chunks as fit one wave of DENSE_BLOCKS_PER_SM blocks per SM beside the
///   kept splits, where those hold the chunks a row needs (no chunk over DENSE_TC_MAX_CHUNK)
///   and the kept splits are at most half of a row's blocks;
/// * two waves, instead of one, where the chunks are long enough that the slots the kept
///   splits leave idle for the rest of the wave cost more than a second wave's fixed cost:
///   `DENSE_BLOCK_COST * c1 * c2 < positions * kept` (the second wave's chunks are
///   c2 = 2 x slots a row - kept, against c1 = slots a row - kept);
/// * spill: where one wave cannot hold what a row needs beside its kept splits, the most chunks
///   (at least that need) whose blocks past the wave fit the slots that the first wave's kept
///   splits free when they finish (they are short: the late chunks start one kept split late);
/// * two waves where neither holds, if those are at least the need;
/// * else a chunk count that gives every SM its blocks, or the need.
///
/// Never more than chunks of `floor` cover msl (blocks past a sequence's candidates cost a
/// launch each) and at most MAX_DENSE_CHUNKS, so the workspace's chunks (msl / DENSE_MIN_CHUNK at
/// max_seq_len) hold every shape.
///
/// H100, graph µs, this rule's choice against the one-wave-or-fill rule before it
/// (docs/RESULTS.md, thirty-first session): batch 16 at 2K 68.4 -> 49.0 (one chunk of 2048 beside
/// three kept splits had been a wave); batch 8 at 8K 64.2 -> 58.5 (two waves); batch 4 at 32K
/// 105.0 -> 88.3 (a spill instead of 112 blocks waiting on chunks); one wave still at 8K and
/// 16K batch 4 (13 chunks; 15 and 29 slower) and 4K batch 8.
fn chunks_at(msl: usize, cfg: &CacheConfig, sms: u32, batch: u32, kept: usize, floor: usize) -> usize {
    let rows = cfg.num_kv_heads.max(1) as usize * batch.max(1) as usize;
    let slots = DENSE_BLOCKS_PER_SM * sms.max(1) as usize;
    let per_row = slots / rows;
    let need = msl.div_ceil(DENSE_TC_MAX_CHUNK).max(1);
    let most = msl.div_ceil(floor).clamp(1, MAX_DENSE_CHUNKS);
    let one_wave = per_row.saturating_sub(kept);
    let two_waves = (2 * per_row).saturating_sub(kept);
    // Blocks past the first wave no more than the kept splits inside it.
    let spills_into_kept = |c: usize| {
        let blocks = (c + kept) * rows;
        blocks <= slots || blocks - slots <= kept * (slots / (c + kept))
    };
    let chosen = if one_wave >= need && one_wave >= kept {
        let second_pays = (DENSE_BLOCK_COST * one_wave * two_waves) < msl * kept;
        if two_waves <= most && second_pays {
            two_waves
        } else {
            one_wave
        }
    } else if let Some(c) = (need..=per_row.min(most)).rev().find(|&c| spills_into_kept(c)) {
        c
    } else if two_waves >= need.max(kept) && two_waves <= most {
        two_waves
    } else {
        need.max(slots.div_ceil(rows))
    };
    // Every choice is at least the need (>= 1); `most` is within 1..=MAX_DENSE_CHUNKS.
    chosen.min(most)
}

/// The short grid's chunks for sequences of at most `msl` tokens (one per DENSE_MIN_CHUNK_ONE
/// positions), or None where there would be more than the workspace holds
/// (SHORT_DENSE_MAX_CHUNKS).
fn short_grid_chunks(msl: usize) -> Option<usize> {
    Some(msl.div_ceil(DENSE_MIN_CHUNK_ONE)).filter(|&c| c <= SHORT_DENSE_MAX_CHUNKS)
}

/// Whether the dense decode of `batch` sequences of at most `msl` tokens takes its short grid: a
/// chunk per DENSE_MIN_CHUNK_ONE positions (the grid's count and the kernel's floor), and at
/// batch 1 kept splits of KEPT_SPLIT_SMALL entries, where those fit one wave of
/// DENSE_BLOCKS_PER_SM blocks per SM and the workspace's slots (SHORT_DENSE_MAX_CHUNKS). With one
/// or two sequences the grid has few blocks, each warp a chain of dependent instructions with
/// none beside it to hide them. At batch 1 the kept splits (four CUDA-core tiles in series at 64
/// entries) and the chunks (eight tiles a warp at 512 positions) were two critical paths of about
/// the same length: H100, 8K, graph µs 18.9 -> 17.4, either change alone 18.9 / 18.7. At batch 2
/// the chunks alone: 28.0 -> 23.5 (30 chunks, 26 of them used at 320 positions, instead of 16
/// of 512; short kept splits there 25.2). docs/PERF_NOTES.md v25. Longer sequences keep the long grid: short kept
/// splits took chunks from them (32K under a 128K maximum, 32.6 -> 33.4), and under a 128K grid
/// 256-position chunks made 8K at batch 2 slower (30.1 -> 37.1).
pub fn dense_short(cfg: &CacheConfig, msl: usize, sms: u32, batch: u32) -> bool {
    let rows = cfg.num_kv_heads.max(1) as usize;
    short_grid_chunks(msl).is_some_and(|chunks| match batch {
        0 | 1 => kept_splits_of(cfg, KEPT_SPLIT_SMALL) + chunks <= DENSE_BLOCKS_PER_SM * sms as usize / rows,
        2 => true,
        _ => false,
    })
}

/// The dense decode's launch shape for one call (launch.rs launch_dense): kept dense entries per
/// kept split and the kept splits, candidate chunks per row, and the kernel's floor on a chunk's
/// positions (SikvParams::dense_min_chunk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseShape {
    pub kept_len: usize,
    pub kept: usize,
    pub chunks: usize,
    pub floor: usize,
}

/// The dense decode's shape for `batch` sequences of at most `msl` tokens on `sms`
/// multiprocessors: the short grid where dense_short takes it (a chunk per DENSE_MIN_CHUNK_ONE
/// positions, and at batch 1 kept splits of KEPT_SPLIT_SMALL entries), else kept splits of
/// ATTEND_SPLIT entries (short ones made no longer dense decode faster and cost chunks beside
/// them: H100, 32K at batch 1 under a 128K max_seq_len, 32.2 -> 33.9 us), chunks_at's chunks
/// and dense_min_chunk's floor. `forced_kept` (kept_split_forced) and `forced_floor`
/// (dense_min_chunk's request), switches, replace their parts.
pub fn dense_shape(
    cfg: &CacheConfig,
    msl: usize,
    sms: u32,
    batch: u32,
    forced_kept: Option<u32>,
    forced_floor: Option<usize>,
) -> DenseShape {
    let short = dense_short(cfg, msl, sms, batch);
    let kept_len = match forced_kept {
        Some(n) => kept_split_forced(n),
        None if short && batch <= 1 => KEPT_SPLIT_SMALL,
        None => ATTEND_SPLIT,
    };
    let kept = kept_splits_of(cfg, kept_len);
    let floor = match forced_floor {
        None if short => DENSE_MIN_CHUNK_ONE,
        _ => dense_min_chunk(forced_floor, batch),
    };
    DenseShape {
        kept_len,
        kept,
        chunks: chunks_at(msl, cfg, sms, batch, kept, dense_grid_floor(short)),
        floor,
    }
}

/// The multi-CTA top-k compaction's blocks per (KV head, sequence) on a device of `sms`
/// multiprocessors: one per tile of COMPACT_TILE positions at max_seq_len where those fit one
/// wave of COMPACT_BLOCKS_PER_SM blocks per SM, else as many as do (at least one), each taking
/// every so many tiles (kernels/topk.cu sikv_topk_compact). Each block finds the threshold bin
/// once, so fewer blocks read the row's histogram fewer times.
pub fn compact_blocks(cfg: &CacheConfig, sms: u32, batch: u32) -> u32 {
    let rows = cfg.num_kv_heads * batch.max(1);
    let per_row = (COMPACT_BLOCKS_PER_SM * sms.max(1)) / rows;
    compact_tiles(cfg).min(per_row.max(1))
}

/// Whether the score takes its wide entry (every row of a thread in flight at once, registers
/// for SCORE_WIDE_BLOCKS_PER_SM blocks a SM): where its grid of `blocks` fits one wave of those
/// on `sms` multiprocessors, at a head dim whose loop loads rows ahead (SCORE_AHEAD_MAX_D; above
/// it the wide entry would be the one-row loop under a lower bound). There a thread waits one
/// load latency for its eight rows instead of one every other row; larger grids need the eight
/// blocks a SM of the one-row entry, whose other warps cover those waits.
pub fn score_wide(blocks: u32, sms: u32, head_dim: u32) -> bool {
    head_dim <= SCORE_AHEAD_MAX_D && blocks <= SCORE_WIDE_BLOCKS_PER_SM * sms
}

/// The compaction's tiles per row at max_seq_len: the most blocks per row it takes.
pub fn compact_tiles(cfg: &CacheConfig) -> u32 {
    cfg.max_seq_len.div_ceil(COMPACT_TILE).max(1)
}

/// The stage-1 final select's CTAs per row for `rows` rows on `sms` multiprocessors: the
/// largest size of FINAL_CLUSTER_SIZES whose clusters, one CTA per SM (a CTA of the final
/// select fills one), take at most 1 / FINAL_CLUSTER_SM_SHARE of the SMs and which the device
/// holds at once (`fits(c)`: clusters of c for every row); else 1. Across a full device the
/// split's repeated radix passes and exchanges cost more than the window work they share
/// (FINAL_CLUSTER_SM_SHARE). A routed decode (`routed`) keeps one CTA a row: measured on the
/// H200 (docs/PERF_NOTES.md v24), its clusters gained at 128K batch 1 (69.1 -> 67.6 µs cold)
/// and lost more where the dense path runs beside them (8K batch 1 under a 128K maximum: 30.3
/// -> 32.4 cold) and at 128K batch 2 (97.1 -> 98.2). `forced` (SIKV_FINAL_CLUSTER) is taken
/// wherever it fits.
pub fn final_cluster_size(rows: u32, sms: u32, forced: Option<u32>, routed: bool, fits: impl Fn(u32) -> bool) -> u32 {
    if let Some(c) = forced {
        return if c == 1 || fits(c) { c } else { 1 };
    }
    if routed {
        return 1;
    }
    let share = |c: u32| rows.max(1) * c * FINAL_CLUSTER_SM_SHARE <= sms;
    FINAL_CLUSTER_SIZES
        .into_iter()
        .rev()
        .find(|&c| c == 1 || (share(c) && fits(c)))
        .unwrap_or(1)
}

/// Splits of the kept dense entries (sinks, heavy, window) that attend and attend_dense run
/// ahead of the others in each (KV head, sequence): ATTEND_SPLIT entries each.
pub fn kept_splits(cfg: &CacheConfig) -> usize {
    kept_splits_of(cfg, ATTEND_SPLIT)
}

/// Kept-entry splits per row at `len` entries each.
pub fn kept_splits_of(cfg: &CacheConfig, len: usize) -> usize {
    (cfg.dense_capacity() as usize).div_ceil(len.max(1))
}

/// A kept split length asked for (a switch), held to KEPT_SPLIT_SMALL..=ATTEND_SPLIT.
pub fn kept_split_forced(n: u32) -> usize {
    (n as usize).clamp(KEPT_SPLIT_SMALL, ATTEND_SPLIT)
}

/// Kept dense entries per kept split of the sparse attend for a call of `batch` sequences
/// (SikvParams::kept_split; the dense decode's: dense_shape):
/// the shortest of KEPT_SPLIT_SMALL, twice that, ... below ATTEND_SPLIT with which the sparse
/// grid still fits one wave of ATTEND_BLOCKS_PER_SM blocks per SM at a span of at most
/// KEPT_SHORT_MAX_SPAN ATTEND_SPLITs of selected tokens a split (8 KV heads on 132 SMs: 16 at
/// batch 1 and 2, 32 at batch 4), so that the kept splits, CUDA-core tiles in series and
/// otherwise the attend's slowest blocks at small batches, run one or two tiles; else
/// ATTEND_SPLIT, whose fewer splits leave the slots to the selected tokens. `forced` (a
/// switch): kept_split_forced.
pub fn kept_split_len(w: &Workspace, cfg: &CacheConfig, sms: u32, batch: u32, forced: Option<u32>) -> usize {
    if let Some(n) = forced {
        return kept_split_forced(n);
    }
    std::iter::successors(Some(KEPT_SPLIT_SMALL), |len| Some(len * 2))
        .take_while(|&len| len < ATTEND_SPLIT)
        .find(|&len| one_wave_span(w, cfg, sms, batch, kept_splits_of(cfg, len), KEPT_SHORT_MAX_SPAN).is_some())
        .unwrap_or(ATTEND_SPLIT)
}

/// The smallest span of at most `most` ATTEND_SPLITs per tensor-core split with which the
/// sparse grid, `kept` kept-entry splits per row included, fits one wave of
/// ATTEND_BLOCKS_PER_SM blocks per SM (the bound both kept_split_len and attend_span keep).
fn one_wave_span(w: &Workspace, cfg: &CacheConfig, sms: u32, batch: u32, kept: usize, most: u32) -> Option<u32> {
    let (rows, slots) = attend_wave(cfg, sms, batch);
    (1..=most).find(|&span| (kept + w.sel_splits.div_ceil(span as usize)) * rows <= slots)
}

/// The sparse attend's rows (KV heads times sequences) and the blocks one wave holds.
fn attend_wave(cfg: &CacheConfig, sms: u32, batch: u32) -> (usize, usize) {
    (
        cfg.num_kv_heads as usize * batch.max(1) as usize,
        ATTEND_BLOCKS_PER_SM as usize * sms.max(1) as usize,
    )
}

/// Whether the sparse attend's splits of selected tokens run on tensor cores (attend_tc.cuh's
/// tc_shape_ok, which the kernel checks again): compute capability 8.0 or above, key magnitudes and
/// values of one width, 2 or 4 bits (profiles 2+1 and 4+1), d = 64 or 128, at most 8 query heads
/// per KV head, pages of a multiple of 16 tokens.
pub fn tc_tiles(cfg: &CacheConfig, cc_major: i32) -> bool {
    cc_major >= 8
        && matches!((cfg.key_bits, cfg.value_bits), (2, 2) | (4, 4))
        && matches!(cfg.head_dim, 64 | 128)
        && cfg.group_size() <= 8
        && cfg.page_size % 16 == 0
}

/// Whether the planes take the attend kernels of 4-bit tiles (attend_b4, attend_dense_b4).
pub fn code_width4(cfg: &CacheConfig) -> bool {
    cfg.key_bits == 4 && cfg.value_bits == 4
}

/// attend: ATTEND_SPLITs of selected tokens per tensor-core split at this batch on a device of
/// `sms` multiprocessors. The smallest span whose grid, kept-entry splits included, fits one
/// wave of ATTEND_BLOCKS_PER_SM blocks per SM (each warp then walks several tiles, its next
/// gather in flight), so that no split waits for a slot a kept split holds (chunks_at says
/// why; the selected tokens' splits are short, so a second wave of them never paid: forcing
/// spans 1-7 at batch 4 and 8 found none faster, docs/RESULTS.md thirty-first session run 4).
/// Where none does (large batches, or many kept entries), the span that brings the
/// selected tokens' splits alone to that many blocks, at most ATTEND_MAX_SPAN. 1 where the
/// splits do not run on tensor cores.
/// `kept`: the call's kept-entry splits per row.
pub fn attend_span(w: &Workspace, cfg: &CacheConfig, sms: u32, batch: u32, tc: bool, kept: usize) -> u32 {
    if !tc {
        return 1;
    }
    one_wave_span(w, cfg, sms, batch, kept, ATTEND_MAX_SPAN).unwrap_or_else(|| {
        let (rows, slots) = attend_wave(cfg, sms, batch);
        (w.sel_splits * rows).div_ceil(slots).clamp(1, ATTEND_MAX_SPAN as usize) as u32
    })
}

impl Workspace {
    /// The sparse attend's grid (and partial slots) per (KV head, sequence) at `span`: the
    /// `kept` kept-entry splits, then the selected tokens' splits of `span` ATTEND_SPLITs each
    /// (kernels/attend.cu sparse_items).
    pub fn attend_splits(&self, span: u32, kept: usize) -> usize {
        kept + self.sel_splits.div_ceil(span.max(1) as usize)
    }

    /// Partial slots per (sequence, query head) that attend / attend_dense write and combine
    /// reads; at most COMBINE_MAX_SPLITS for every configuration `CacheConfig` accepts.
    pub fn max_splits(&self) -> usize {
        self.sparse_splits.max(self.dense_total_splits)
    }
}

impl Workspace {
    pub fn new(cfg: &CacheConfig, _layout: &Layout, batch: u32) -> Workspace {
        let b = batch.max(1) as usize;
        let h = cfg.num_kv_heads as usize;
        let hq = cfg.num_q_heads as usize;
        let d = cfg.head_dim as usize;
        let msl = cfg.max_seq_len as usize;
        let key_stride = msl.div_ceil(4) * 4;
        let s1 = cfg.stage1_max() as usize;
        let kept_most = kept_splits_of(cfg, KEPT_SPLIT_SMALL);
        let sel_splits = (cfg.budget.max as usize).div_ceil(ATTEND_SPLIT).max(1);
        let sparse_splits = kept_most + sel_splits;
        // dense_chunks never exceeds this, whatever the device (dense_short's grid included).
        let short = short_grid_chunks(msl).unwrap_or(0);
        let chunks_max = msl.div_ceil(DENSE_MIN_CHUNK).max(short).clamp(1, MAX_DENSE_CHUNKS);
        let dense_total_splits = kept_most + chunks_max;
        let ns = sparse_splits.max(dense_total_splits);
        debug_assert!(
            ns <= COMBINE_MAX_SPLITS,
            "{ns} partial splits exceed COMBINE_MAX_SPLITS"
        );
        // The buffer holds the threshold bin's keys only (k' <= stage1_max); its capacity is
        // the one it had when it also held the keys above that bin, so every row that took the
        // multi-CTA path then still does; never more than a row.
        let cand_cap = (2 * s1 + TOPK_CAND_EXTRA).min(key_stride).max(4);
        let tile = COMPACT_TILE as usize;
        let gtmap_stride = msl.div_ceil(tile) * (tile / 32);

        let mut off = 0usize;
        let mut take = |bytes: usize| {
            let at = off;
            off = up(off + bytes.max(1));
            at
        };
        let keys = take(4 * b * h * key_stride);
        let list = take(4 * b * h * s1);
        let list_n = take(4 * b * h * 2);
        let keys2 = take(4 * b * h * s1);
        let part_acc = take(4 * b * hq * ns * d);
        let part_ml = take(4 * b * hq * ns * 2);
        let qbar = take(4 * h * d);
        let rank = take(4 * h * msl);
        let hist = take(4 * b * h * TOPK_HIST_STRIDE);
        let cand = take(8 * b * h * cand_cap);
        let gtmap = take(4 * b * h * gtmap_stride);
        let route = take(4);
        Workspace {
            keys,
            list,
            list_n,
            keys2,
            part_acc,
            part_ml,
            qbar,
            rank,
            hist,
            cand,
            gtmap,
            route,
            total: off,
            cand_cap,
            gtmap_stride,
            key_stride,
            sparse_splits,
            sel_splits,
            dense_total_splits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SikvConfig, SIKV_DEVICE_CUDA, SIKV_DTYPE_F16};
    use crate::gpu::geometry::FINAL_CLUSTER_SIZES;

    fn cfg(max_seq_len: u32, max_batch: u32) -> CacheConfig {
        CacheConfig::from_c(&c_cfg(max_seq_len, max_batch)).unwrap()
    }

    /// [`cfg`]'s configuration before validation, for a test that changes more of it.
    fn c_cfg(max_seq_len: u32, max_batch: u32) -> SikvConfig {
        let mut c = SikvConfig::for_profile(0).unwrap();
        c.device = SIKV_DEVICE_CUDA;
        c.dtype = SIKV_DTYPE_F16;
        c.num_q_heads = 32;
        c.num_kv_heads = 8;
        c.head_dim = 128;
        c.page_size = 64;
        c.max_seq_len = max_seq_len;
        c.max_batch = max_batch;
        c.max_seqs = max_batch;
        c.max_append_tokens = 64;
        c
    }

    /// chunks_at for sequences of at most `msl` tokens beside `kept` kept-entry splits per row,
    /// with the floor of the grid dense_shape would take.
    fn dense_chunks_for(msl: usize, cfg: &CacheConfig, sms: u32, batch: u32, kept: usize) -> usize {
        chunks_at(
            msl,
            cfg,
            sms,
            batch,
            kept,
            dense_grid_floor(dense_short(cfg, msl, sms, batch)),
        )
    }

    /// Every grid covers max_seq_len with chunks the tensor-core path takes (up to MAX_DENSE_CHUNKS),
    /// never has more chunks than 512-position ones would need, and fits the workspace.
    #[test]
    fn dense_chunks_cover_max_seq_len_and_fit_the_workspace() {
        for msl in [64u32, 1000, 8192, 32768, 131072, 262144, 1 << 20, 4 << 20] {
            for batch in [1u32, 2, 8, 64] {
                let c = cfg(msl, batch);
                let w = Workspace::new(&c, &Layout::new(&c), batch);
                for sms in [1u32, 16, 132, 1000] {
                    let m = msl as usize;
                    let sh = dense_shape(&c, m, sms, batch, None, None);
                    let n = dense_chunks(&c, sms, batch);
                    assert_eq!(n, sh.chunks);
                    assert!(
                        (1..=MAX_DENSE_CHUNKS).contains(&n),
                        "msl {msl} batch {batch} sms {sms}: {n}"
                    );
                    let floor = dense_grid_floor(dense_short(&c, m, sms, batch));
                    assert!(n <= m.div_ceil(floor), "msl {msl}: {n} chunks of less than {floor}");
                    if m.div_ceil(DENSE_TC_MAX_CHUNK) <= MAX_DENSE_CHUNKS {
                        assert!(
                            n * DENSE_TC_MAX_CHUNK >= m,
                            "msl {msl} batch {batch} sms {sms}: {n} chunks"
                        );
                    }
                    assert!(sh.kept + n <= w.dense_total_splits, "msl {msl}: workspace too small");
                    // Long kept splits beside the same maximum fit too.
                    let long = kept_splits(&c);
                    assert!(
                        long + dense_chunks_for(m, &c, sms, batch, long) <= w.dense_total_splits,
                        "msl {msl} batch {batch} sms {sms}: workspace too small for long kept splits"
                    );
                    // Short kept splits (forced for the dense decode) fit the workspace too.
                    let small = kept_splits_of(&c, KEPT_SPLIT_SMALL);
                    let n_small = dense_chunks_for(msl as usize, &c, sms, batch, small);
                    assert!(
                        small + n_small <= w.dense_total_splits,
                        "msl {msl} batch {batch} sms {sms}: workspace too small for short kept splits"
                    );
                }
            }
        }
        // At 128K, batch 1, on 132 SMs: about four blocks per SM over 8 KV heads (the 64
        // chunks it needs and one more, whose blocks past the wave take the kept splits' slots).
        let c = cfg(131072, 1);
        assert_eq!(dense_chunks(&c, 132, 1), 65);
        // A short sequence limit keeps 512-position chunks, but for one or two sequences (the
        // short grid) 256-position ones, as many as fit one wave.
        assert_eq!(dense_chunks(&cfg(8192, 8), 132, 4), 13);
        assert_eq!(dense_chunks(&cfg(8192, 8), 132, 2), 30);
        assert_eq!(dense_chunks(&cfg(8192, 8), 132, 1), 32);
        // The launch's shape: its chunks are dense_chunks_for's beside its own kept splits.
        for (msl, batch) in [(8192usize, 1u32), (8192, 2), (8192, 4), (131072, 1)] {
            let c = cfg(msl as u32, 8);
            let sh = dense_shape(&c, msl, 132, batch, None, None);
            assert_eq!(sh.kept, kept_splits_of(&c, sh.kept_len));
            assert_eq!(
                sh.chunks,
                dense_chunks_for(msl, &c, 132, batch, sh.kept),
                "msl {msl} batch {batch}"
            );
        }
        assert!(dense_short(&cfg(8192, 8), 8192, 132, 1));
        assert!(!dense_short(&cfg(32768, 8), 32768, 132, 1));
        // At batch 2 the short grid's 256-position floor (its kept splits stay long).
        assert!(dense_short(&cfg(8192, 8), 8192, 132, 2));
        assert!(!dense_short(&cfg(8192, 8), 8192, 132, 4));
        assert_eq!(
            dense_shape(&cfg(8192, 8), 8192, 132, 2, None, None).floor,
            DENSE_MIN_CHUNK_ONE
        );
        assert_eq!(
            dense_shape(&cfg(32768, 8), 32768, 132, 2, None, None).floor,
            DENSE_MIN_CHUNK
        );
        assert_eq!(dense_shape(&cfg(8192, 8), 8192, 132, 2, None, Some(1000)).floor, 1024);
    }

    /// The grid's shapes: the counts the rule chooses at the points measured in the thirty-first
    /// session (H100; each the fastest count measured there, but 2K at batch 16: 3 chunks 49.0
    /// µs against 4 chunks 46.5), and everywhere a count the tensor-core path takes; where the most
    /// chunks that fit one wave beside the kept splits (searched here, not computed as the rule
    /// computes them) hold the need and a second wave does not pay, exactly those.
    #[test]
    fn dense_grid_shapes_as_measured() {
        let sms = 132usize;
        let slots = DENSE_BLOCKS_PER_SM * sms;
        // (max_seq_len, batch, chunks): one wave, two waves, spills, the fill.
        for (msl, batch, want) in [
            (8192u32, 4u32, 13usize),
            (16384, 4, 13),
            (4096, 8, 5),
            (32768, 1, 63),
            (32768, 2, 30),
            (8192, 8, 13),
            (16384, 8, 13),
            (32768, 4, 16),
            (65536, 2, 32),
            (2048, 16, 3),
            (8192, 16, 5),
            (2048, 32, 3),
            (4096, 32, 3),
        ] {
            assert_eq!(
                dense_chunks(&cfg(msl, batch), 132, batch),
                want,
                "msl {msl} batch {batch}"
            );
        }
        for msl in [2048u32, 4096, 8192, 20000, 32768, 65536, 131072, 1 << 20] {
            for batch in [1u32, 2, 3, 4, 8, 16, 32, 64] {
                let c = cfg(msl, batch);
                let m = msl as usize;
                let rows = 8 * batch as usize;
                let kept = dense_shape(&c, m, sms as u32, batch, None, None).kept;
                let need = m.div_ceil(DENSE_TC_MAX_CHUNK);
                let floor = dense_grid_floor(dense_short(&c, m, sms as u32, batch));
                let most = m.div_ceil(floor).min(MAX_DENSE_CHUNKS);
                let n = dense_chunks(&c, sms as u32, batch);
                assert!(n >= need.min(most) && n <= most, "msl {msl} batch {batch}: {n} chunks");
                let wave = (1..=most).filter(|&k| rows * (kept + k) <= slots).max();
                let second = (2 * (slots / rows)).saturating_sub(kept);
                if let Some(w) = wave.filter(|&w| w >= need && w >= kept) {
                    if second > most || DENSE_BLOCK_COST * w * second >= m * kept {
                        assert_eq!(n, w.min(most), "msl {msl} batch {batch}");
                    }
                }
            }
        }
    }

    /// The compaction takes one block per tile where the tiles fit one wave, else as many blocks
    /// as fit it (at least one per row), never more than the tiles.
    #[test]
    fn compact_grid_fits_one_wave() {
        let sms = 132u32;
        let slots = COMPACT_BLOCKS_PER_SM * sms;
        for msl in [1000u32, 8192, 32768, 131072, 1 << 20] {
            for batch in [1u32, 2, 4, 8, 64, 128] {
                let c = cfg(msl, batch);
                let rows = 8 * batch;
                let tiles = msl.div_ceil(COMPACT_TILE);
                assert_eq!(compact_tiles(&c), tiles);
                let n = compact_blocks(&c, sms, batch);
                assert!(n >= 1 && n <= tiles, "msl {msl} batch {batch}: {n}");
                if rows * tiles <= slots {
                    assert_eq!(n, tiles, "msl {msl} batch {batch}");
                } else if rows <= slots {
                    assert!(
                        rows * n <= slots && rows * (n + 1) > slots,
                        "msl {msl} batch {batch}: {n}"
                    );
                } else {
                    assert_eq!(n, 1);
                }
            }
        }
        // 128K: 32 tiles a row; batch 1 and 2 keep a block per tile, batch 8 takes 4 tiles a block.
        assert_eq!(compact_blocks(&cfg(131072, 1), sms, 1), 32);
        assert_eq!(compact_blocks(&cfg(131072, 2), sms, 2), 32);
        assert_eq!(compact_blocks(&cfg(131072, 4), sms, 4), 16);
        assert_eq!(compact_blocks(&cfg(131072, 8), sms, 8), 8);
    }

    /// The final select's clusters fill at most half the SMs, in the largest size that does: 8
    /// KV heads on 132 SMs take four CTAs a row up to batch 2, two at batch 3-4, one beyond; a
    /// device that cannot hold the clusters (or has none: below sm_90 every size fails) keeps
    /// one CTA a row, and so does a routed decode unless a size is forced.
    #[test]
    fn final_cluster_size_takes_half_the_sms() {
        let all = |_: u32| true;
        let rule = |rows: u32, sms: u32, fits: &dyn Fn(u32) -> bool| final_cluster_size(rows, sms, None, false, fits);
        let sizes: Vec<u32> = [1u32, 2, 3, 4, 5, 8, 16]
            .iter()
            .map(|&b| rule(8 * b, 132, &all))
            .collect();
        assert_eq!(sizes, [4, 4, 2, 2, 1, 1, 1]);
        for rows in 0..300 {
            let c = rule(rows, 132, &all);
            assert!(FINAL_CLUSTER_SIZES.contains(&c), "{rows}: {c}");
            // The largest size whose clusters take at most half the SMs.
            let half = |c: u32| rows.max(1) * c * 2 <= 132;
            let want = FINAL_CLUSTER_SIZES
                .into_iter()
                .filter(|&c| c == 1 || half(c))
                .max()
                .unwrap();
            assert_eq!(c, want, "{rows}");
            assert_eq!(final_cluster_size(rows, 132, None, true, all), 1, "{rows} routed");
        }
        assert_eq!(rule(8, 132, &|_| false), 1);
        assert_eq!(rule(8, 132, &|c| c <= 2), 2);
        assert_eq!(rule(8, 64, &all), 4);
        assert_eq!(rule(8, 63, &all), 2);
        assert_eq!(rule(8, 31, &all), 1);
        // A forced size where it fits, routed or not (the tests' way to run every entry).
        for routed in [false, true] {
            for c in FINAL_CLUSTER_SIZES {
                assert_eq!(final_cluster_size(64, 132, Some(c), routed, all), c);
                assert_eq!(final_cluster_size(64, 132, Some(c), routed, |_| false), 1);
            }
        }
    }

    /// A grid sized from the longest live sequence (a managed cache's eager dense decode) fits
    /// the workspace's partial slots, is the same at live = max_seq_len, and is the 8K grid for
    /// an 8K sequence under a 128K maximum. It may have more chunks than max_seq_len's grid (two
    /// waves of shorter chunks where max_seq_len's spill past one), never more than the slots.
    #[test]
    fn dense_chunks_for_a_shorter_live_length() {
        for msl in [1000usize, 8192, 12288, 131072, 1 << 20] {
            for batch in [1u32, 2, 4, 8, 16, 32] {
                let c = cfg(msl as u32, batch);
                let w = Workspace::new(&c, &Layout::new(&c), batch);
                let full = dense_chunks(&c, 132, batch);
                let kept = dense_shape(&c, msl, 132, batch, None, None).kept;
                assert_eq!(dense_chunks_for(msl, &c, 132, batch, kept), full);
                for live in [1usize, 700, 2048, 8192, 10000, 65536] {
                    let live = live.min(msl);
                    let sh = dense_shape(&c, live, 132, batch, None, None);
                    assert!(
                        sh.chunks >= 1 && sh.kept + sh.chunks <= w.dense_total_splits,
                        "msl {msl} batch {batch} live {live}: {} chunks",
                        sh.chunks
                    );
                }
            }
        }
        let long = cfg(131072, 1);
        assert_eq!(
            dense_shape(&long, 8192, 132, 1, None, None).chunks,
            dense_chunks(&cfg(8192, 1), 132, 1)
        );
    }

    /// The kernel's floor: a shorter one for one sequence, a request rounded up to whole tiles
    /// and kept to chunks the heavy bitmap covers; and every floor covers a live length of up to
    /// max_seq_len with the grid's chunks (dense_chunk_of rounds up, never below the floor).
    #[test]
    fn dense_min_chunk_by_batch_and_request() {
        assert_eq!(dense_min_chunk(None, 1), DENSE_MIN_CHUNK_ONE);
        assert_eq!(dense_min_chunk(None, 2), DENSE_MIN_CHUNK);
        assert_eq!(dense_min_chunk(Some(100), 8), 128);
        assert_eq!(dense_min_chunk(Some(0), 1), DENSE_CHUNK_ALIGN);
        assert_eq!(dense_min_chunk(Some(1 << 20), 1), DENSE_TC_MAX_CHUNK);
        for msl in [1000u32, 8192, 131072] {
            let c = cfg(msl, 1);
            let n = dense_chunks(&c, 132, 1);
            for live in [1usize, 700, 8192, msl as usize] {
                let live = live.min(msl as usize);
                let floor = dense_min_chunk(None, 1);
                let chunk = live.div_ceil(n).max(floor).div_ceil(DENSE_CHUNK_ALIGN) * DENSE_CHUNK_ALIGN;
                assert!(n * chunk >= live, "msl {msl} live {live}: {n} x {chunk}");
            }
        }
    }

    /// The tiles take 2+1 and 4+1 (one code width for keys and values), not 16-bit planes or
    /// mixed widths.
    #[test]
    fn tc_tiles_take_both_code_widths() {
        let mut c = cfg(131072, 1);
        for (kb, vb, tc) in [
            (2, 2, true),
            (4, 4, true),
            (16, 16, false),
            (2, 4, false),
            (4, 2, false),
        ] {
            c.key_bits = kb;
            c.value_bits = vb;
            assert_eq!(tc_tiles(&c, 9), tc, "bits {kb}/{vb}");
        }
    }

    /// Short kept splits where the grid keeps one wave with them at a short span (8 KV heads on
    /// 132 SMs: at batch 1 9 kept splits of 16 entries and 32 of selected tokens, 328 blocks, span
    /// 1; at batch 2 9 and 16 of two ATTEND_SPLITs, 400 blocks; at batch 4 5 of 32 entries and 11
    /// of three, 512 blocks), full ones elsewhere.
    #[test]
    fn kept_splits_are_short_where_the_wave_has_room() {
        let c = cfg(131072, 8);
        let w = Workspace::new(&c, &Layout::new(&c), 8);
        assert_eq!(kept_split_len(&w, &c, 132, 1, None), KEPT_SPLIT_SMALL);
        assert_eq!(kept_splits_of(&c, KEPT_SPLIT_SMALL), 9);
        assert_eq!(attend_span(&w, &c, 132, 1, true, 9), 1);
        assert_eq!(kept_split_len(&w, &c, 132, 2, None), KEPT_SPLIT_SMALL);
        assert_eq!(attend_span(&w, &c, 132, 2, true, 9), 2);
        assert_eq!(kept_split_len(&w, &c, 132, 4, None), 2 * KEPT_SPLIT_SMALL);
        assert_eq!(
            attend_span(&w, &c, 132, 4, true, kept_splits_of(&c, 2 * KEPT_SPLIT_SMALL)),
            3
        );
        assert_eq!(kept_split_len(&w, &c, 132, 8, None), ATTEND_SPLIT);
        assert_eq!(kept_split_len(&w, &c, 16, 1, None), ATTEND_SPLIT);
        assert_eq!(kept_split_len(&w, &c, 132, 8, Some(16)), KEPT_SPLIT_SMALL);
        assert_eq!(kept_split_len(&w, &c, 132, 1, Some(5000)), ATTEND_SPLIT);
        // The dense decode keeps full kept splits unless its short grid (one short sequence) or a
        // switch asks for short ones.
        assert_eq!(dense_shape(&c, 131072, 132, 1, None, None).kept_len, ATTEND_SPLIT);
        assert_eq!(dense_shape(&c, 8192, 132, 1, None, None).kept_len, KEPT_SPLIT_SMALL);
        assert_eq!(dense_shape(&c, 8192, 132, 2, None, None).kept_len, ATTEND_SPLIT);
        assert_eq!(dense_shape(&c, 8192, 132, 4, None, None).kept_len, ATTEND_SPLIT);
        assert_eq!(dense_shape(&c, 8192, 16, 1, None, None).kept_len, ATTEND_SPLIT);
        assert_eq!(
            dense_shape(&c, 131072, 132, 8, Some(16), None).kept_len,
            KEPT_SPLIT_SMALL
        );
        assert_eq!(dense_shape(&c, 8192, 132, 1, Some(64), None).kept_len, ATTEND_SPLIT);
        assert_eq!(dense_shape(&c, 8192, 132, 1, Some(1), None).kept_len, KEPT_SPLIT_SMALL);
        assert_eq!(w.sparse_splits, 9 + 32);
        assert_eq!(w.sel_splits, 32);
    }

    /// The sparse attend's span: 1 at small batch, growing so the grid stays near
    /// ATTEND_BLOCKS_PER_SM per SM, never above ATTEND_MAX_SPAN, and 1 without tensor cores;
    /// the splits it gives cover the workspace's partial slots and never exceed them.
    #[test]
    fn attend_span_fills_the_device_and_fits_the_partials() {
        let c = cfg(131072, 8);
        assert!(tc_tiles(&c, 9));
        assert!(!tc_tiles(&c, 7), "no mma.sync tiles below compute capability 8.0");
        let w = Workspace::new(&c, &Layout::new(&c), 8);
        // The default budget (k <= 2048): 32 splits of selected tokens per row.
        assert_eq!(w.sel_splits, 32);
        let spans: Vec<u32> = [1u32, 2, 4, 8]
            .iter()
            .map(|&b| attend_span(&w, &c, 132, b, true, kept_splits(&c)))
            .collect();
        // One wave of 4 x 132 blocks with the 3 kept-entry splits per row: 35, 19, 14, 8 per row.
        assert_eq!(spans, [1, 2, 3, 7]);
        for b in [1u32, 2, 4, 8] {
            let span = attend_span(&w, &c, 132, b, true, kept_splits(&c));
            assert!(
                w.attend_splits(span, kept_splits(&c)) as u32 * 8 * b <= ATTEND_BLOCKS_PER_SM * 132,
                "batch {b}"
            );
        }
        assert_eq!(attend_span(&w, &c, 132, 8, false, kept_splits(&c)), 1);
        assert_eq!(attend_span(&w, &c, 1, 64, true, kept_splits(&c)), ATTEND_MAX_SPAN);
        // Many kept entries (18 splits of them): no span fits one wave at batch 4, and the span
        // fills the device with the selected tokens' splits as before (32 x 32 / 528 -> 2).
        let mut many = c_cfg(131072, 4);
        many.n_window = 1024;
        let many = CacheConfig::from_c(&many).unwrap();
        let wm = Workspace::new(&many, &Layout::new(&many), 4);
        assert_eq!(kept_splits(&many), 18);
        assert_eq!(attend_span(&wm, &many, 132, 4, true, kept_splits(&many)), 2);
        assert_eq!(attend_span(&wm, &many, 132, 2, true, kept_splits(&many)), 3);
        for batch in [1u32, 2, 4, 8, 64] {
            for sms in [1u32, 16, 132, 1000] {
                for forced in [None, Some(1), Some(16), Some(32), Some(64), Some(1000)] {
                    let len = kept_split_len(&w, &c, sms, batch, forced);
                    let kept = kept_splits_of(&c, len);
                    let span = attend_span(&w, &c, sms, batch, true, kept);
                    let splits = w.attend_splits(span, kept);
                    assert!(splits <= w.sparse_splits && splits <= w.max_splits());
                    // The grid's splits (sparse_items' ranges) cover every kept entry and every
                    // selected token of the largest budget.
                    assert!((KEPT_SPLIT_SMALL..=ATTEND_SPLIT).contains(&len));
                    assert!(kept * len >= c.dense_capacity() as usize);
                    let selected = (splits - kept) * span as usize * ATTEND_SPLIT;
                    assert!(selected >= c.budget.max as usize, "span {span}: {splits} splits");
                }
            }
        }
    }

    /// The score's wide entry: grids of one wave at SCORE_WIDE_BLOCKS_PER_SM blocks a SM.
    #[test]
    fn score_wide_takes_one_wave_grids() {
        let sms = 132;
        // 128K, 8 KV heads: 64 tiles a row; batch 1 fits (512 <= 528), batch 2 does not.
        assert!(score_wide(64 * 8, sms, 128));
        assert!(!score_wide(64 * 8 * 2, sms, 128));
        assert!(score_wide(SCORE_WIDE_BLOCKS_PER_SM * sms, sms, 128));
        assert!(!score_wide(SCORE_WIDE_BLOCKS_PER_SM * sms + 1, sms, 128));
        assert!(!score_wide(1, 0, 128));
        // d = 64 loads ahead as d = 128 does; d = 256 does not, so its small grids keep the
        // one-row entry.
        assert!(score_wide(64 * 8, sms, 64));
        assert!(!score_wide(64 * 8, sms, 256));
    }
}
