//! Launch geometry and device fault bits: the one place where a number that both a launcher
//! and a kernel depend on is written.
//!
//! `build.rs` evaluates every `pub const NAME: u32 | usize = <integer expression>;` of this
//! file and writes it as a `#define` into the kernels' generated header, so the kernels and
//! the launchers cannot disagree on a block size, a tile or a workspace stride. Expressions may
//! use integer literals, earlier constants of this file or of `src/layout.rs`, `+ - * / % << >>`
//! and parentheses (no casts, no calls): build.rs fails on anything else. Keep this file free of
//! imports so it stays a plain list of numbers.

// ---------------------------------------------------------------------------------------------
// Threads per block of each kernel (the `__launch_bounds__` of its entry point too).

/// encode: one warp per (token, KV head), four warps per block.
pub const ENCODE_THREADS: u32 = 128;
/// calibrate: zeroing of the state records (one block per KV head).
pub const CALIB_INIT_THREADS: u32 = 256;
/// calibrate: lower medians (centre, qmed), one block per (KV head, channel); the median's
/// histogram loop runs in whole blocks of this size.
pub const CALIB_MEDIAN_THREADS: u32 = 256;
/// calibrate: one thread per (KV head, channel) (mean centre, qbar, scale).
pub const CALIB_CHANNEL_THREADS: u32 = 128;
/// calibrate: one thread per prompt token and KV head (heavy scores).
pub const CALIB_HEAVY_SCORE_THREADS: u32 = 128;
/// calibrate: one block per KV head selects the heavy set.
pub const CALIB_HEAVY_SELECT_THREADS: u32 = 1024;
/// calibrate: one thread per (KV head, sub-vector) builds a codebook row.
pub const CALIB_CODEBOOK_THREADS: u32 = 64;
/// score: one block per tile of SCORE_TILE positions of a row.
pub const SCORE_THREADS: u32 = 256;
/// score: positions per thread, SCORE_THREADS apart (a warp's loads coalesce). At most 8: the
/// kernel keeps a byte of flags per property for a thread's positions in one word.
pub const SCORE_TOKENS_PER_THREAD: u32 = 8;
const _: () = assert!(SCORE_TOKENS_PER_THREAD <= 8);
/// score: positions per block.
pub const SCORE_TILE: u32 = SCORE_THREADS * SCORE_TOKENS_PER_THREAD;
/// score: the largest head dim whose one-row token loop loads a row ahead (two rows of
/// registers; at d = 256 they did not fit its bound). The wide entry's rows in flight build on
/// that loop, so it is taken only up to this dim too.
pub const SCORE_AHEAD_MAX_D: u32 = 128;
/// score_wide: its blocks per SM (the bound its registers are allocated for); a grid that fits
/// one wave of them takes it (workspace::score_wide).
pub const SCORE_WIDE_BLOCKS_PER_SM: u32 = 4;
/// score: the smallest power-of-two page size whose pages a block looks up once each (in its
/// prologue, into shared memory) rather than once per position.
pub const SCORE_PAGE_TABLE_MIN: u32 = 16;
/// rerank: one thread per stage-1 survivor.
pub const RERANK_THREADS: u32 = 128;
/// top-k: one block per row (one-CTA stage 1, multi-CTA final, stage 2).
pub const TOPK_THREADS: u32 = 1024;
/// top-k stage 2: survivors per thread held in registers (rows of up to TOPK_THREADS times this
/// many are loaded once; longer rows are read from global memory in every pass).
pub const TOPK_REG_ITEMS: u32 = 8;
/// hist_zero (the rows' histograms zeroed ahead of the score kernel): threads per block; each
/// thread zeroes 16 bytes a step.
pub const HIST_ZERO_THREADS: u32 = 256;
/// Multi-CTA top-k compaction: threads per block and keys per thread.
pub const COMPACT_THREADS: u32 = 256;
pub const COMPACT_ITEMS: u32 = 16;
/// Multi-CTA top-k compaction: positions per tile (a block takes one or more tiles).
pub const COMPACT_TILE: u32 = COMPACT_THREADS * COMPACT_ITEMS;
/// Multi-CTA top-k compaction: resident blocks per SM, the kernel's launch bound (its registers
/// allow four blocks of COMPACT_THREADS), and the wave that compact_blocks fills.
pub const COMPACT_BLOCKS_PER_SM: u32 = 4;
/// Fused select (score + stage-1 top-k, sm_90 clusters): positions per CTA tile, one
/// SCORE_TOKENS_PER_THREAD run per thread of a TOPK_THREADS block.
pub const FUSED_TILE: u32 = TOPK_THREADS * SCORE_TOKENS_PER_THREAD;
/// Fused select: the most CTAs in one row's cluster (16 is above the portable 8: the kernel
/// asks for non-portable cluster sizes).
pub const FUSED_MAX_CLUSTER: u32 = 16;
/// Stage-1 final select: the most CTAs (one cluster, sm_90) sharing a row
/// (workspace::final_cluster_size). Each takes an equal part of every bitmap window, a whole number of words per
/// thread, so a size divides 4 (TOPK_THREADS * 4 words a window).
pub const FINAL_MAX_CLUSTER: u32 = 4;
/// Stage-1 final select: its split clusters take at most 1 / FINAL_CLUSTER_SM_SHARE of the SMs.
/// Measured on an H100 (docs/PERF_NOTES.md v23), at 128K: 64 CTAs on 132 SMs (batch 2, clusters
/// of 4) took the kernel from 10.8 to 9.0 µs; 128 (batch 8, clusters of 2) from 10.9 to 11.5.
/// On the H200 (v24), 64 at batch 4 (clusters of 2) took it from 11.0 to 9.8.
pub const FINAL_CLUSTER_SM_SHARE: u32 = 2;
/// The final select's cluster sizes, one kernel entry each (kernels/topk.cu sikv_topk_final*):
/// the powers of two up to FINAL_MAX_CLUSTER.
pub const FINAL_CLUSTER_SIZES: [u32; 3] = [1, 2, FINAL_MAX_CLUSTER];
/// Fused select: positions per CTA up to which it is taken whatever an SM's share in the chain
/// would be (launch.rs fused_cluster; measured, docs/PERF_NOTES.md v12).
pub const FUSED_SMALL_TILE: u32 = 3 * TOPK_THREADS;
/// attend / attend_dense: one block per (split, KV head, sequence).
pub const ATTEND_THREADS: u32 = 128;
/// attend: blocks per SM the sparse grid aims at (the resident limit at 128 registers); above
/// it the tensor-core splits take several ATTEND_SPLITs each (workspace::attend_span).
pub const ATTEND_BLOCKS_PER_SM: u32 = 4;
/// attend: kept dense entries per kept split where the grid has room for the extra splits
/// (workspace::kept_split_len, which may take twice this; ATTEND_SPLIT elsewhere, and in the
/// dense decode unless a switch forces it). A kept split runs on CUDA cores, one tile of 16
/// entries (d = 128) after another with four barriers each: with 64 entries the kept splits
/// were on the batch-1 attend's critical path, though they start while the select still runs.
pub const KEPT_SPLIT_SMALL: usize = 16;
/// attend: the longest span at which kept splits shorter than ATTEND_SPLIT are taken
/// (workspace::kept_split_len): a grid that holds them in one wave only when each warp walks
/// more ATTEND_SPLITs of selected tokens than this keeps full kept splits (batch 4 at 8 KV
/// heads took 32 entries at span 3 over 16 at span 5, and batch 8 neither; H100, fortieth
/// session).
pub const KEPT_SHORT_MAX_SPAN: u32 = 3;
/// attend: at most this many ATTEND_SPLITs per tensor-core split.
pub const ATTEND_MAX_SPAN: u32 = 8;
/// combine: one block per (query head, sequence); 16 groups of splits summed side by side at
/// d = 128 (the dense decode has hundreds of partials per row).
pub const COMBINE_THREADS: u32 = 512;
/// attend: query heads per KV head held in shared memory (must cover config MAX_GQA_RATIO).
pub const ATTEND_MAX_GROUP: u32 = 16;
/// prologue: one block per (KV head, sequence) zeroes that row's top-k histogram.
pub const PROLOGUE_THREADS: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Device-side crossover of a routed decode (route.cu): which path a launch belongs to
// (SikvParams::route_as), and the route word's values.

/// The launch belongs to the sparse path (score, top-k, re-rank, attend); route word 0.
pub const ROUTE_SPARSE: u32 = 0;
/// The launch belongs to the dense decode; route word 1.
pub const ROUTE_DENSE: u32 = 1;
/// The launch serves both paths (prologue, combine).
pub const ROUTE_EITHER: u32 = 2;

// ---------------------------------------------------------------------------------------------
// Workspace geometry.

/// Multi-CTA top-k: the row histogram counts the top bits of each key above this shift.
pub const TOPK_HIST_SHIFT: u32 = 21;
/// Multi-CTA top-k: bins of the row histogram (the top 11 key bits).
pub const TOPK_HIST_BINS: usize = 1 << (32 - TOPK_HIST_SHIFT);
/// Words per row of the top-k histogram region: the bins, the candidate counter at
/// [TOPK_HIST_BINS], padding to a 128-byte multiple.
pub const TOPK_HIST_STRIDE: usize = TOPK_HIST_BINS + 32;
/// Candidate slots per row of the multi-CTA top-k (which holds the keys of the threshold bin
/// only) beyond 2 k': a threshold bin with more keys than that sends the row to the one-CTA
/// select (decided on the device).
pub const TOPK_CAND_EXTRA: usize = 8192;
/// attend_dense: a candidate chunk spans at least this many positions (a multiple of
/// DENSE_CHUNK_ALIGN): fewer partials for combine to merge, and a block prologue spread over
/// more tiles.
pub const DENSE_MIN_CHUNK: usize = 512;
/// attend_dense with one sequence, or in the short grid (workspace::dense_short: one or two
/// short sequences): the kernel's floor on a chunk's positions (the grid's chunk count follows
/// DENSE_MIN_CHUNK, or this in the short grid). Under a long max_seq_len the grid has ~4 blocks
/// per SM of chunks; a short sequence then spreads over twice as many of them. H200, 8K tokens
/// under a 128K maximum, batch 1: dense decode 27.6 -> 21.6 us; batch 8 was slower with it (75
/// -> 87).
pub const DENSE_MIN_CHUNK_ONE: usize = 256;
/// attend_dense: chunk sizes are multiples of this (the tensor-core path's four warps walk
/// 16-position tiles).
pub const DENSE_CHUNK_ALIGN: usize = 64;
/// attend_dense: the largest chunk the tensor-core path's heavy-position bitmap covers; the
/// grid has enough chunks that max_seq_len never needs a larger one.
pub const DENSE_TC_MAX_CHUNK: usize = 2048;
/// attend_dense: candidate chunks per (KV head, sequence) aim at this many blocks per SM in all.
pub const DENSE_BLOCKS_PER_SM: usize = 4;
/// attend_dense: a chunk block's fixed time (its start, init, finish, its partial's share of
/// combine) in positions of its tile walk, what a second wave of blocks costs beyond the
/// positions it walks (workspace::chunks_at). Bounded by the H100 measurements that chose the
/// rule (thirty-first session): two waves won at 8K batch 8 (needs it below 378) and lost at 16K
/// batch 4 (needs it above 130).
pub const DENSE_BLOCK_COST: usize = 256;
/// combine: partial slots per (sequence, query head) its shared weight array holds.
pub const COMBINE_MAX_SPLITS: usize = 2048;
/// attend_dense: at most this many candidate chunks per sequence (the chunks grow instead), so
/// that dense splits + chunks stay within COMBINE_MAX_SPLITS.
pub const MAX_DENSE_CHUNKS: usize = 512;
/// attend_dense in its short grid (workspace::dense_short: one or two short sequences): the
/// most DENSE_MIN_CHUNK_ONE chunks it takes, which the workspace's partial slots hold besides
/// the longer chunks'.
pub const SHORT_DENSE_MAX_CHUNKS: usize = 64;

// ---------------------------------------------------------------------------------------------
// Device faults. A kernel that meets an engine-provided index it must not follow (it would
// leave the pools) skips that work item and ORs one of these bits into the context's fault
// word; the next launcher call on the handle reports them (GpuContext::take_fault).

/// A sequence slot (seq_slot[]) outside 0..max_seqs.
pub const FAULT_SEQ_SLOT: u32 = 1 << 0;
/// An append position outside 0..max_seq_len.
pub const FAULT_POSITION: u32 = 1 << 1;
/// A slot_mapping entry at or past num_pages * page_size.
pub const FAULT_SLOT_MAPPING: u32 = 1 << 2;
/// A page index of the page table outside 0..num_pages.
pub const FAULT_PAGE_INDEX: u32 = 1 << 3;
/// A page table whose indptr is negative or decreasing, or whose last_page_len is outside
/// 1..=page_size (0 for a sequence without pages).
pub const FAULT_PAGE_TABLE: u32 = 1 << 4;
/// A sequence of the page table longer than max_seq_len.
pub const FAULT_SEQ_LEN: u32 = 1 << 5;
/// A selected count outside 0..=budget_max.
pub const FAULT_COUNT: u32 = 1 << 6;
/// A selected position outside 0..len of its sequence (0..the causal bound of its query row).
pub const FAULT_SELECTED_POS: u32 = 1 << 7;
/// Query-row offsets that do not give the kernel row a sequence: offsets not starting at 0 or
/// not ending at the call's row count, a sequence with no rows or more than
/// QUERY_ROWS_MAX, or more rows than the sequence has tokens.
pub const FAULT_QUERY_ROWS: u32 = 1 << 8;

/// Most query rows of one sequence in one call, for the kernels' check (the kernels' header
/// takes literals; the assert below ties it to cpu::SIKV_MAX_QUERY_ROWS).
pub const QUERY_ROWS_MAX: u32 = 16;
const _: () = assert!(QUERY_ROWS_MAX == crate::cpu::SIKV_MAX_QUERY_ROWS);

/// What each fault bit means, for error messages.
pub const FAULT_NAMES: [(u32, &str); 9] = [
    (FAULT_SEQ_SLOT, "sequence slot outside 0..max_seqs"),
    (FAULT_POSITION, "append position outside 0..max_seq_len"),
    (
        FAULT_SLOT_MAPPING,
        "slot_mapping entry past the page pool (num_pages * page_size)",
    ),
    (FAULT_PAGE_INDEX, "page index outside the pool (0..num_pages)"),
    (
        FAULT_PAGE_TABLE,
        "page table indptr negative or decreasing, or last_page_len outside 1..=page_size",
    ),
    (FAULT_SEQ_LEN, "page table sequence longer than max_seq_len"),
    (FAULT_COUNT, "selected count outside 0..=budget_max"),
    (
        FAULT_SELECTED_POS,
        "selected position outside 0..len of its sequence (its query row's causal bound)",
    ),
    (
        FAULT_QUERY_ROWS,
        "query-row offsets inconsistent (not from 0 to the row count, 0 or more than 16 rows for a sequence, or more rows than its tokens)",
    ),
];
