//! The argument block every kernel takes by value. This struct is the only definition:
//! build.rs reads its field list and writes the C `struct SikvParams` into the kernels'
//! generated header, with `static_assert`s of its size and of every field offset (the offsets
//! only under nvcc: NVRTC gets the size check). Keep 64-bit fields first, then 32-bit ones, and
//! use only `u64`, `i32`, `u32`, `f32` and arrays of them with a literal or `layout.rs` length.
//! Field doc comments travel into the C struct.
//!
//! `sikv_params_layout` (encode.cu) still reports the layout NVRTC-compiled code sees at run
//! time; a GPU test compares it with [`layout_probe`].

use crate::config::{CacheConfig, Centre, Selector, SignPredicate};
use crate::layout::{Layout, SIKV_NUM_PLANES};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SikvParams {
    // Device addresses (0 = absent).
    /// Base of each plane of this layer.
    pub plane: [u64; SIKV_NUM_PLANES],
    /// Base of this layer's state pool.
    pub state: u64,
    /// int32[batch + 1].
    pub indptr: u64,
    /// int32[indptr[batch]].
    pub page_indices: u64,
    /// int32[batch].
    pub last_page_len: u64,
    /// int32[batch] (select/attend) or int32[n] (append).
    pub seq_slot: u64,
    /// int32[n] (append).
    pub position: u64,
    /// int64[n].
    pub slot_mapping: u64,
    /// Model dtype [n][H_kv][d].
    pub k: u64,
    /// Model dtype [n][H_kv][d].
    pub v: u64,
    /// Model dtype [B][H_q][d], or [nq][H_q][d] (calibrate).
    pub q: u64,
    /// Model dtype [B][H_q][d].
    pub out: u64,
    /// int32[B][H_kv][budget_max].
    pub indices: u64,
    /// int32[B][H_kv].
    pub counts: u64,
    /// int32[batch + 1]: query rows of sequence b are kernel rows [row_offsets[b],
    /// row_offsets[b + 1]) (several query tokens per sequence, cpu::rows); 0 = one query row per
    /// sequence (kernel row b is sequence b). q, out, the selection and the workspace rows are
    /// per kernel row.
    pub row_offsets: u64,
    /// The select kernels of a mean-query call (RowSelection::MeanQuery): int32[batch + 1], the
    /// rows of each sequence, whose queries' mean selects for it; the select kernels then run
    /// one row per sequence (row_offsets 0, rows = batch). 0 otherwise.
    pub mean_offsets: u64,
    // Workspace regions (src/gpu/workspace.rs).
    /// u32 [B][H_kv][key_stride]: stage-1 keys / calibrate heavy keys.
    pub ws_keys: u64,
    /// int32 [B][H_kv][stage1_max]: stage-1 survivors (ascending).
    pub ws_list: u64,
    /// int32 [B][H_kv][2]: stage-1 survivor count, final k.
    pub ws_list_n: u64,
    /// u32 [B][H_kv][stage1_max]: stage-2 keys.
    pub ws_keys2: u64,
    /// f32 [B][H_q][num_splits][d]: un-normalised split outputs.
    pub ws_part_acc: u64,
    /// f32 [B][H_q][num_splits][2]: split max / sum.
    pub ws_part_ml: u64,
    /// f32 [H_kv][d]: calibrate, group-mean last query.
    pub ws_qbar: u64,
    /// int32 [H_kv][n]: calibrate, heavy rank of each token or -1.
    pub ws_rank: u64,
    /// u32 [B][H_kv][TOPK_HIST_STRIDE]: multi-CTA top-k key histogram, then the candidate
    /// counter.
    pub ws_hist: u64,
    /// u64 [B][H_kv][cand_cap]: multi-CTA top-k candidates in the threshold bin (key << 32 |
    /// pos).
    pub ws_cand: u64,
    /// u32 [B][H_kv][gtmap_stride]: multi-CTA top-k, bit per position of the keys above the
    /// threshold bin.
    pub ws_gtmap: u64,
    /// u32: the route word of a routed decode (1: dense, 0: sparse), written by the prologue;
    /// 0 (no address) when the launch is not part of a routed decode.
    pub ws_route: u64,
    /// Routed decode, prologue: the dense decode runs when the call's live tokens (summed
    /// over its sequences) are at most this.
    pub route_max_tokens: u64,
    /// u32 in mapped pinned host memory: FAULT_* bits ORed by kernels (geometry.rs).
    pub fault: u64,

    // 32-bit fields.
    pub row_bytes: [i32; SIKV_NUM_PLANES],
    pub num_kv_heads: i32,
    /// Query heads per KV head (G).
    pub group: i32,
    pub head_dim: i32,
    pub page_size: i32,
    pub num_pages: i32,
    pub key_bits: i32,
    pub value_bits: i32,
    /// Bytes of one state record.
    pub state_bytes: i32,
    pub off_centre: i32,
    pub off_scale: i32,
    pub off_inv_scale: i32,
    pub off_qmed: i32,
    pub off_codebook: i32,
    pub off_meta: i32,
    pub off_dense_pos: i32,
    pub off_dense_k: i32,
    pub off_dense_v: i32,
    pub dense_cap: i32,
    pub n_sink: i32,
    pub n_heavy: i32,
    pub n_window: i32,
    pub max_seqs: i32,
    pub max_seq_len: i32,
    /// Sequences in this call (select/attend).
    pub batch: i32,
    /// Kernel rows of this call (select/attend): the query rows, = batch without row_offsets.
    pub rows: i32,
    /// The selection is made once per sequence from the mean of its rows' queries
    /// (RowSelection::MeanQuery): the call's query rows (> 0), 0 otherwise. The select kernels
    /// (mean_offsets) then have one row per sequence, and the attend reads the selection of its
    /// row's sequence, cut at the row's bound.
    pub rows_mean: i32,
    /// Tokens in this call (append/calibrate).
    pub n_tokens: i32,
    /// calibrate: query rows in q.
    pub nq: i32,
    /// calibrate: the sequence slot.
    pub calib_slot: i32,
    /// encode: 0 append, 1 calibrate; attend: 0 sparse, 1 dense; topk_final: 1 keeps the
    /// candidate counter.
    pub mode: i32,
    pub budget_min: i32,
    pub budget_max: i32,
    pub budget_ratio: f32,
    /// <= 1: one stage.
    pub rerank_factor: i32,
    /// budget_max * max(rerank_factor, 1).
    pub stage1_max: i32,
    /// Row length of ws_keys (>= max_seq_len, multiple of 4).
    pub key_stride: i32,
    /// 0 LUT, 1 sign x sign.
    pub selector: i32,
    /// Encoder predicate x > 0 instead of !signbit(x).
    pub sign_positive: i32,
    pub force_generated: i32,
    /// calibrate: mean instead of lower median.
    pub centre_mean: i32,
    pub softmax_scale: f32,
    /// Partial slots per (sequence, query head).
    pub num_splits: i32,
    /// attend / attend_dense: the kept dense entries' splits per (KV head, sequence), first in
    /// the grid.
    pub dense_splits: i32,
    /// attend: 1 when the launcher queued this call's select on the stream just before: splits
    /// of kept dense entries alone start without waiting for it (SIKV_ENTRY_DT_EARLY).
    pub attend_early: i32,
    /// attend: ATTEND_SPLITs of list items per split from dense_splits on (tensor-core splits;
    /// 1 = every split takes one; workspace::attend_span).
    pub attend_span: i32,
    /// attend_dense: candidate chunks per (KV head, sequence), the grid's blocks after the
    /// dense splits; each sequence spreads its live candidates over them (dense_chunk_of).
    pub dense_chunks: i32,
    /// Multi-CTA top-k: candidate slots per row.
    pub cand_cap: i32,
    /// 1: multi-CTA top-k (score builds the histogram); 0: one CTA.
    pub topk_multi: i32,
    /// Multi-CTA top-k: words per row of ws_gtmap (a whole number of compaction tiles).
    pub gtmap_stride: i32,
    /// Routed decode: the path of this launch (ROUTE_SPARSE, ROUTE_DENSE, ROUTE_EITHER).
    pub route_as: i32,
    /// Routed decode, combine: the dense decode's partial slots per (sequence, query head)
    /// (num_splits holds the sparse path's).
    pub route_dense_splits: i32,
    /// Fused select: positions per CTA tile (a multiple of TOPK_THREADS, at most FUSED_TILE),
    /// sized so that the row's CTAs split the row between them (launch.rs fused_cluster).
    pub fused_tile: i32,
    /// attend_dense: the fewest positions of a candidate chunk (a multiple of
    /// DENSE_CHUNK_ALIGN; workspace::dense_min_chunk).
    pub dense_min_chunk: i32,
    /// attend / attend_dense: kept dense entries per split below dense_splits (at most
    /// ATTEND_SPLIT; workspace::kept_split_len, and dense_shape for the dense decode).
    pub kept_split: i32,
}

// Offsets and size that build.rs computed from the field list above and wrote into the
// kernels' header as static_asserts; rustc checks here that it computed them as rustc lays the
// struct out, so C and Rust agree through one model of the layout.
include!(concat!(env!("OUT_DIR"), "/sikv_params_asserts.rs"));

/// `[sizeof, offsetof(ws_rank), offsetof(row_bytes), offsetof(off_dense_v),
/// offsetof(budget_ratio), offsetof(softmax_scale), offsetof(dense_chunks)]` of the Rust struct,
/// in the order `sikv_params_layout` writes them for the C one.
pub fn layout_probe() -> [i32; 7] {
    let p = SikvParams::default();
    let base = &p as *const SikvParams as usize;
    let off = |f: usize| (f - base) as i32;
    [
        std::mem::size_of::<SikvParams>() as i32,
        off(&p.ws_rank as *const u64 as usize),
        off(&p.row_bytes as *const i32 as usize),
        off(&p.off_dense_v as *const i32 as usize),
        off(&p.budget_ratio as *const f32 as usize),
        off(&p.softmax_scale as *const f32 as usize),
        off(&p.dense_chunks as *const i32 as usize),
    ]
}

impl SikvParams {
    /// Everything that follows from the configuration and layout alone.
    pub fn from_config(cfg: &CacheConfig, layout: &Layout) -> SikvParams {
        let st = &layout.state;
        let mut p = SikvParams::default();
        for (i, r) in layout.format.row_bytes.iter().enumerate() {
            p.row_bytes[i] = *r as i32;
        }
        p.num_kv_heads = cfg.num_kv_heads as i32;
        p.group = cfg.group_size() as i32;
        p.head_dim = cfg.head_dim as i32;
        p.page_size = cfg.page_size as i32;
        p.num_pages = layout.num_pages as i32;
        p.key_bits = cfg.key_bits as i32;
        p.value_bits = cfg.value_bits as i32;
        p.state_bytes = st.bytes as i32;
        p.off_centre = st.centre as i32;
        p.off_scale = st.scale as i32;
        p.off_inv_scale = st.inv_scale as i32;
        p.off_qmed = st.qmed as i32;
        p.off_codebook = st.codebook as i32;
        p.off_meta = st.meta as i32;
        p.off_dense_pos = st.dense_pos as i32;
        p.off_dense_k = st.dense_k as i32;
        p.off_dense_v = st.dense_v as i32;
        p.dense_cap = st.dense_capacity as i32;
        p.n_sink = cfg.n_sink as i32;
        p.n_heavy = cfg.n_heavy as i32;
        p.n_window = cfg.n_window as i32;
        p.max_seqs = cfg.max_seqs as i32;
        p.max_seq_len = cfg.max_seq_len as i32;
        p.budget_min = cfg.budget.min as i32;
        p.budget_max = cfg.budget.max as i32;
        p.budget_ratio = cfg.budget.ratio;
        p.rerank_factor = cfg.rerank_factor as i32;
        p.stage1_max = cfg.stage1_max() as i32;
        p.selector = match cfg.selector {
            Selector::Lut => 0,
            Selector::SignSign => 1,
        };
        p.sign_positive = (cfg.sign_predicate == SignPredicate::Positive) as i32;
        p.force_generated = cfg.force_generated as i32;
        p.centre_mean = (cfg.centre == Centre::Mean) as i32;
        p.softmax_scale = cfg.softmax_scale;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::super::embed::SOURCES;
    use super::super::geometry::*;
    use super::SikvParams;

    fn header() -> &'static str {
        SOURCES
            .iter()
            .find(|(n, _)| *n == "sikv_layout.cuh")
            .map(|(_, s)| *s)
            .expect("the generated header is embedded for NVRTC")
    }

    /// The value of `#define NAME value` in the generated header.
    fn define(name: &str) -> Option<i64> {
        header().lines().find_map(|l| {
            let rest = l.strip_prefix("#define ")?;
            let (n, v) = rest.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok())?
        })
    }

    #[test]
    fn generated_header_carries_the_struct_and_its_checks() {
        let h = header();
        assert!(h.contains("struct SikvParams {"));
        let size = std::mem::size_of::<SikvParams>();
        assert!(h.contains(&format!("static_assert(sizeof(SikvParams) == {size},")));
        assert_eq!(define("SIKV_PARAMS_BYTES"), Some(size as i64));
        // Field offsets are asserted under nvcc only (NVRTC gets the size check).
        let guarded = h.split("#ifndef __CUDACC_RTC__").nth(1).expect("nvcc-only section");
        for (field, off) in [
            ("plane", std::mem::offset_of!(SikvParams, plane)),
            ("fault", std::mem::offset_of!(SikvParams, fault)),
            ("row_bytes", std::mem::offset_of!(SikvParams, row_bytes)),
            ("budget_ratio", std::mem::offset_of!(SikvParams, budget_ratio)),
            ("gtmap_stride", std::mem::offset_of!(SikvParams, gtmap_stride)),
        ] {
            let line = format!("static_assert(__builtin_offsetof(SikvParams, {field}) == {off},");
            assert!(guarded.contains(&line), "missing: {line}");
        }
        assert_eq!(
            h.matches("static_assert(__builtin_offsetof").count(),
            h.matches("static_assert(__builtin_offsetof(SikvParams, ").count()
        );
    }

    #[test]
    fn generated_header_matches_the_launch_geometry() {
        let u = |x: u32| Some(x as i64);
        let z = |x: usize| Some(x as i64);
        let cases = [
            ("ENCODE_THREADS", u(ENCODE_THREADS)),
            ("CALIB_MEDIAN_THREADS", u(CALIB_MEDIAN_THREADS)),
            ("SCORE_TILE", u(SCORE_TILE)),
            ("SCORE_PAGE_TABLE_MIN", u(SCORE_PAGE_TABLE_MIN)),
            ("COMPACT_TILE", u(COMPACT_TILE)),
            ("TOPK_THREADS", u(TOPK_THREADS)),
            ("ATTEND_THREADS", u(ATTEND_THREADS)),
            ("ATTEND_MAX_GROUP", u(ATTEND_MAX_GROUP)),
            ("TOPK_HIST_BINS", z(TOPK_HIST_BINS)),
            ("TOPK_HIST_STRIDE", z(TOPK_HIST_STRIDE)),
            ("COMBINE_MAX_SPLITS", z(COMBINE_MAX_SPLITS)),
        ];
        for (name, want) in cases {
            assert_eq!(define(name), want, "{name}");
        }
        for (bit, _) in FAULT_NAMES {
            assert_eq!(bit.count_ones(), 1);
        }
        assert_eq!(
            FAULT_NAMES.iter().fold(0, |a, (b, _)| a | b).count_ones() as usize,
            FAULT_NAMES.len()
        );
        assert_eq!(define("FAULT_PAGE_INDEX"), u(FAULT_PAGE_INDEX));
    }

    #[test]
    fn fault_message_names_each_check() {
        let m = super::super::fault_message(FAULT_PAGE_INDEX | FAULT_SEQ_SLOT | (1 << 30));
        assert!(m.contains("page index outside the pool"), "{m}");
        assert!(m.contains("sequence slot outside 0..max_seqs"), "{m}");
        assert!(m.contains("unknown fault bits 0x40000000"), "{m}");
        assert!(m.contains("earlier call on this handle"), "{m}");
    }

    /// The kernels take SikvParams and the geometry from the generated header only: no source
    /// may define them again.
    #[test]
    fn kernels_do_not_restate_generated_definitions() {
        let names: Vec<&str> = header()
            .lines()
            .filter_map(|l| l.strip_prefix("#define ")?.split(' ').next())
            .collect();
        for (file, src) in SOURCES.iter().filter(|(n, _)| *n != "sikv_layout.cuh") {
            assert!(!src.contains("struct SikvParams {"), "{file} defines SikvParams");
            for l in src.lines() {
                if let Some(n) = l
                    .trim()
                    .strip_prefix("#define ")
                    .and_then(|r| r.split([' ', '(']).next())
                {
                    assert!(!names.contains(&n), "{file} redefines {n}");
                }
            }
        }
    }
}
