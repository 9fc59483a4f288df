// Stage `topk` (method §10.6 K4; reference/topk.rs): per (sequence, KV head) row, the k best
// order-preserving u32 keys of the scores (ties to the smaller position), written as ascending
// positions, the rest of the row -1, and the count. k comes from the budget rule evaluated on
// the device from the live length in the page table, so no grid depends on live lengths.
//
// Two-stage selection: stage 1 keeps k' = min(n_cand, rerank_factor * k) survivors into the
// workspace; rerank_score (score.cu) re-scores them with the dequantised key; stage 2 keeps k.
//
// Two implementations of stage 1 (GpuContext::new picks; SIKV_TOPK=single forces the first):
//  * single: sikv_topk_stage1, one CTA of 1024 threads per row, three radix-histogram passes
//    and one ordered collection pass over the whole row (4 reads of 4N bytes by one SM).
//  * multi (default): sikv_score also adds a 2048-bin histogram of the top 11 key bits into
//    ws_hist (zeroed on the stream first: sikv_hist_zero, or the routed decode's prologue).
//    sikv_topk_compact (grid over the row in tiles of 4096 keys, one or more tiles per CTA)
//    finds the threshold bin t from the histogram (keys in bins > t: fewer than k'; with
//    bin t: at least k'), writes its tiles' words of a position bitmap of the keys in bins > t
//    (all of them selected; ws_gtmap) and appends (key, position) of the keys in bin t alone to
//    the row's candidate buffer (one atomicAdd per CTA). sikv_topk_final (one CTA per row)
//    finishes the radix select over bin t only (passes 2-3), marks bin t's taken / tied
//    positions in two shared-memory bitmaps (windows of 131072 positions), ORs in the gt
//    bitmap and emits ascending positions with an ordered scan, so the compaction order never
//    matters and the result is the one-CTA result exactly. A row whose bin t would not fit the
//    buffer (cand_cap), or whose counter disagrees, is selected by the one-CTA code inside
//    sikv_topk_final (decided on the device).
//
// Why the multi-CTA path (figures and their history: docs/RESULTS.md, first H200 run, and
// docs/PERF_NOTES.md):
//  * the one-CTA select reads a whole row four times on one SM: about 0.2 ms at 128K tokens.
//    The compaction spreads the row over a grid and hands the one-row kernel only the keys of
//    the threshold bin; the score kernel's histogram is the radix select's first digit, so no
//    kernel reads the keys only to count them.
//  * the final kernel is still a chain of block barriers on one SM (or a cluster of 2-4 CTAs
//    that share its bitmap windows, where the batch leaves SMs idle: final_select), and one of
//    the batch-1 step's largest fixed costs.
//  * the first 11 key bits are sign, exponent and 2 mantissa bits (a quarter octave): for
//    bell-shaped scores the threshold bin holds a few % of N; sign x sign scores (small
//    integers) or many forced tokens can put more in one bin; such rows take the one-CTA
//    fallback once |bin t| exceeds cand_cap = min(2 k'_max + TOPK_CAND_EXTRA, row).
#include "common.cuh"

// TOPK_THREADS, COMPACT_*, TOPK_HIST_*: src/gpu/geometry.rs.

// Number of candidates: [S, end) minus heavy positions inside it. dpos = nullptr (a row with a
// bad slot, end = S): no heavy positions to read.
SIKV_DEV int count_candidates(const SikvParams& p, const int* dpos, int end, int* smem_count) {
    if (threadIdx.x == 0) *smem_count = 0;
    __syncthreads();
    int mine = 0;
    const int n_heavy = dpos ? p.n_heavy : 0;
    for (int i = threadIdx.x; i < n_heavy; i += blockDim.x) {
        int hp = dpos[p.n_sink + i];
        if (hp >= p.n_sink && hp < end) ++mine;
    }
    mine = warp_sum_int(mine);
    if ((threadIdx.x & 31) == 0 && mine) atomicAdd(smem_count, mine);
    __syncthreads();
    int range = end - p.n_sink;
    return range - *smem_count;
}

// The selection sizes of query row q, KV head h: n = end - S keys, n_cand candidates among
// them, the budget k and the stage-1 size ksel (= k with one stage). Every thread must call
// (block barriers).
struct RowK {
    int end, n, n_cand, k, ksel;
};
// The selection sizes of a row whose candidates end at `end` and number n_cand.
SIKV_DEV RowK row_sizes(const SikvParams& p, int end, int n_cand) {
    RowK r;
    r.end = end;
    r.n_cand = n_cand;
    r.k = budget_k(p, n_cand);
    r.ksel = r.k;
    if (p.rerank_factor >= 2) {
        long long k1 = (long long)p.rerank_factor * r.k;
        r.ksel = (int)(k1 < n_cand ? k1 : n_cand);
    }
    r.n = end - p.n_sink;
    return r;
}
SIKV_DEV RowK row_k(const SikvParams& p, const QueryRow& q, int h, int* smem_count) {
    RowK r;
    const int slot = q.slot;
    r.end = row_cand_end(p, q);
    const int* dpos = slot < 0 ? nullptr : state_dense_pos(p, state_record(p, slot, h));
    return row_sizes(p, r.end, count_candidates(p, dpos, r.end, smem_count));
}

// From the row's histogram of the top 11 key bits: the bin t holding the ksel-th best key.
// out[0] = t, out[1] = keys in bins above t (< ksel), out[2] = keys in bin t, out[3] = 1 when
// found (0 when the histogram holds fewer than ksel keys). ksel >= 1. Every thread must call.
template <int NT>
SIKV_DEV void hist_threshold(const u32* hist, u32 ksel, u32* scan, u32* out) {
    constexpr int PER = TOPK_HIST_BINS / NT;
    if (threadIdx.x == 0) { out[0] = 0; out[1] = 0; out[2] = 0; out[3] = 0; }
    // Thread j owns bins [BINS - (j+1) PER, BINS - j PER): thread 0 the highest.
    const int hi = TOPK_HIST_BINS - (int)threadIdx.x * PER;
    u32 c[PER];
    u32 sum = 0;
    #pragma unroll
    for (int i = 0; i < PER; ++i) {
        c[i] = hist[hi - 1 - i];
        sum += c[i];
    }
    u32 total;
    // (its closing barrier is the one below)
    u32 above = block_excl_scan<NT, false>(sum, scan, &total);
    if (above < ksel && ksel <= above + sum) {
        #pragma unroll
        for (int i = 0; i < PER; ++i) {
            if (above + c[i] >= ksel) {
                out[0] = (u32)(hi - 1 - i);
                out[1] = above;
                out[2] = c[i];
                out[3] = 1;
                break;
            }
            above += c[i];
        }
    }
    __syncthreads();
}

SIKV_DEV void sikv_topk_stage1_impl(const SikvParams& p) {
    __shared__ RadixSmem s;
    __shared__ u32 hist2[RADIX_BINS];
    __shared__ int heavy_in_range;
    const int r = blockIdx.y, h = blockIdx.x;
    const long long rowid = (long long)r * p.num_kv_heads + h;
    const QueryRow qr = query_row(p, r);
    const int slot = qr.slot;
    const int end = row_cand_end(p, qr);
    const int* dpos = slot < 0 ? nullptr : state_dense_pos(p, state_record(p, slot, h));
    const int n_cand = count_candidates(p, dpos, end, &heavy_in_range);
    const int k = budget_k(p, n_cand);
    const bool two = p.rerank_factor >= 2;
    int ksel = k;
    if (two) {
        long long k1 = (long long)p.rerank_factor * k;
        ksel = (int)(k1 < n_cand ? k1 : n_cand);
    }
    const int n = end - p.n_sink;
    const u32* keys = reinterpret_cast<const u32*>(p.ws_keys) + rowid * p.key_stride + p.n_sink;
    const int S = p.n_sink;
    if (two) {
        int* list = reinterpret_cast<int*>(p.ws_list) + rowid * p.stage1_max;
        block_topk<TOPK_THREADS>(s, hist2, n, ksel, [&](int i) { return keys[i]; }, [&](int r, int i) { list[r] = S + i; });
        for (int r = (ksel > 0 ? ksel : 0) + threadIdx.x; r < p.stage1_max; r += blockDim.x) list[r] = -1;  // (re-rank reads ahead: final_select)
        if (threadIdx.x == 0) {
            reinterpret_cast<int*>(p.ws_list_n)[2 * rowid] = ksel;
            reinterpret_cast<int*>(p.ws_list_n)[2 * rowid + 1] = k;
        }
    } else {
        int* out = reinterpret_cast<int*>(p.indices) + rowid * p.budget_max;
        block_topk<TOPK_THREADS>(s, hist2, n, ksel, [&](int i) { return keys[i]; }, [&](int r, int i) { out[r] = S + i; });
        for (int r = ksel + threadIdx.x; r < p.budget_max; r += blockDim.x) out[r] = -1;
        if (threadIdx.x == 0) reinterpret_cast<int*>(p.counts)[rowid] = ksel;
    }
}
SIKV_ENTRY(sikv_topk_stage1, TOPK_THREADS)

// ---------------------------------------------------------------------------------------------
// Multi-CTA stage 1.

// The rows' histograms and candidate counters (ws_hist, p.rows x H_kv rows of
// TOPK_HIST_STRIDE words) zeroed ahead of the score kernel, which adds into them. A kernel
// rather than a memset on the stream: the score kernel, launched programmatically behind it,
// runs its prologue and its token loop meanwhile and waits only before it adds its
// histogram (score_body). grid (blocks, 1, 1) for any count, block HIST_ZERO_THREADS.
SIKV_DEV void sikv_hist_zero_impl(const SikvParams& p) {
    static_assert(TOPK_HIST_STRIDE % 4 == 0, "rows of whole 16-byte words");
    uint4* hist = reinterpret_cast<uint4*>(p.ws_hist);
    const long long n = (long long)p.rows * p.num_kv_heads * (TOPK_HIST_STRIDE / 4);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        hist[i] = make_uint4(0u, 0u, 0u, 0u);
}
SIKV_ENTRY(sikv_hist_zero, HIST_ZERO_THREADS)

// A compaction tile's keys from t0, ITEMS a thread: thread x holds positions 4x .. 4x + 3 of
// each group of 4 NT (0 outside [lo, hi): not a candidate), 16 bytes at a time.
template <int NT, int ITEMS>
SIKV_DEV void tile_keys(const u32* keys, int t0, int lo, int hi, u32 (&kv)[ITEMS]) {
    #pragma unroll
    for (int g = 0; g < ITEMS / 4; ++g) {
        const int q = t0 + (g * NT + (int)threadIdx.x) * 4;  // multiple of 4
        if (q >= lo && q + 4 <= hi) {
            const uint4 w = *reinterpret_cast<const uint4*>(keys + q);  // key_stride % 4 == 0
            kv[4 * g + 0] = w.x; kv[4 * g + 1] = w.y; kv[4 * g + 2] = w.z; kv[4 * g + 3] = w.w;
        } else {
            #pragma unroll
            for (int e = 0; e < 4; ++e) kv[4 * g + e] = (q + e >= lo && q + e < hi) ? keys[q + e] : 0u;
        }
    }
}

// Compaction of a tile's keys (tile_keys' layout) against the threshold bin tb: the words of the
// gt bitmap (put_word(i, word), word i from t0 / 32: eight neighbouring lanes make one word, OR-ed
// across them, written by the first), and the keys of bin tb appended to row rowid's candidates
// (key << 32 | position) from the offset reserve(the block's count) returns to thread 0; at most
// p.cand_cap are written. Every thread of the NT-thread block must call.
template <int NT, int ITEMS, typename PutWord, typename Reserve>
SIKV_DEV void compact_tile(const SikvParams& p, const u32 (&kv)[ITEMS], int t0, u32 tb, long long rowid, u32* scan,
                           u32& base_sh, PutWord put_word, Reserve reserve) {
    const int lane = threadIdx.x & 31;
    u32 cnt = 0;
    #pragma unroll
    for (int g = 0; g < ITEMS / 4; ++g) {
        u32 nib = 0;
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const u32 key = kv[4 * g + e];
            const u32 bin = key >> TOPK_HIST_SHIFT;
            nib |= (bin > tb ? 1u : 0u) << e;  // bin > tb >= 0: key != 0, a candidate
            cnt += (key != 0u && bin == tb) ? 1u : 0u;
        }
        u32 word = nib << (4 * (lane & 7));
        word |= __shfl_xor_sync(0xffffffffu, word, 1);
        word |= __shfl_xor_sync(0xffffffffu, word, 2);
        word |= __shfl_xor_sync(0xffffffffu, word, 4);
        if ((lane & 7) == 0) put_word((g * NT + (int)threadIdx.x) / 8, word);
    }
    u32 total;
    // (its closing barrier is the one below)
    const u32 excl = block_excl_scan<NT, false>(cnt, scan, &total);
    if (threadIdx.x == 0 && total) base_sh = reserve(total);
    __syncthreads();
    if (cnt) {
        u64* cand = reinterpret_cast<u64*>(p.ws_cand) + rowid * p.cand_cap;
        u32 at = base_sh + excl;
        #pragma unroll
        for (int g = 0; g < ITEMS / 4; ++g) {
            const int q = t0 + (g * NT + (int)threadIdx.x) * 4;
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 key = kv[4 * g + e];
                if (key != 0u && (key >> TOPK_HIST_SHIFT) == tb) {
                    if (at < (u32)p.cand_cap) cand[at] = ((u64)key << 32) | (u32)(q + e);
                    ++at;
                }
            }
        }
    }
}

// For each of this CTA's tiles (tile x: absolute positions [x * COMPACT_TILE, (x + 1) *
// COMPACT_TILE) within [S, end); tiles blockIdx.x, blockIdx.x + gridDim.x, ...): writes the
// tile's words of the row's gt bitmap (bit set: a candidate key in a bin above the threshold
// bin; all of those are selected), and appends (key << 32 | position) of every candidate key
// in the threshold bin itself to the row's candidate buffer, the only keys sikv_topk_final
// still has to rank. grid (compact_blocks, H_kv, B), block COMPACT_THREADS.
//
// Several tiles per CTA where one a CTA would not fit one wave (launch.rs compact_blocks,
// batch 4 and up at long lengths): the threshold bin (2048 bins read from L2 and a block scan)
// is then found once per CTA instead of once per tile, and no CTA waits for a slot.
SIKV_DEV void sikv_topk_compact_impl(const SikvParams& p) {
    __shared__ u32 scan[33];
    __shared__ u32 thr[4];
    __shared__ int heavy_in_range;
    __shared__ u32 base_sh;
    const int r = blockIdx.z, h = blockIdx.y;
    const long long rowid = (long long)r * p.num_kv_heads + h;
    const QueryRow qr = query_row(p, r);
    const int end = row_cand_end(p, qr);
    const int x0 = (int)blockIdx.x, step = (int)gridDim.x;
    // A CTA none of whose tiles holds a candidate (uniform per block) returns at once.
    bool any = false;
    for (int x = x0; x * COMPACT_TILE < end && !any; x += step) any = (x + 1) * COMPACT_TILE > p.n_sink;
    if (!any) return;
    // The selection sizes need the page table and the heavy list only: counted while the score
    // kernel still runs. Its keys and histogram are read after the grid dependency.
    const RowK rk = row_k(p, qr, h, &heavy_in_range);
    sikv_grid_dependency();
    if (rk.ksel <= 0) return;
    const u32* keys = reinterpret_cast<const u32*>(p.ws_keys) + rowid * p.key_stride;
    u32* hist = reinterpret_cast<u32*>(p.ws_hist) + rowid * TOPK_HIST_STRIDE;
    u32* gtmap = reinterpret_cast<u32*>(p.ws_gtmap) + rowid * p.gtmap_stride;
    u32* counter = hist + TOPK_HIST_BINS;
    bool first = true;
    for (int x = x0; x * COMPACT_TILE < end; x += step) {
        const int t0 = x * COMPACT_TILE;
        const int lo = t0 > p.n_sink ? t0 : p.n_sink;
        const int hi = t0 + COMPACT_TILE < end ? t0 + COMPACT_TILE : end;
        if (lo >= hi) continue;  // uniform: a tile before S
        // The tile's keys go out before the histogram scan, so the two latencies overlap.
        u32 kv[COMPACT_ITEMS];
        tile_keys<COMPACT_THREADS>(keys, t0, lo, hi, kv);
        if (first) {
            hist_threshold<COMPACT_THREADS>(hist, (u32)rk.ksel, scan, thr);
            first = false;
        }
        // Fallback rows (more keys in the threshold bin than the buffer holds) are selected by
        // sikv_topk_final alone.
        if (!thr[3] || thr[2] > (u32)p.cand_cap) return;
        compact_tile<COMPACT_THREADS>(
            p, kv, t0, thr[0], rowid, scan, base_sh, [&](int i, u32 word) { gtmap[t0 / 32 + i] = word; },
            [&](u32 total) { return atomicAdd(counter, total); });
    }
}
SIKV_ENTRY_LATE_WAIT_MINB(sikv_topk_compact, COMPACT_THREADS, COMPACT_BLOCKS_PER_SM)

// The end of the multi-CTA stage 1: exact select over the candidates, ascending output (same
// outputs as sikv_topk_stage1), or the one-CTA select over the whole row for a fallback row.
// Resets the row's candidate counter (not with p.mode == 1). grid (H_kv, B), block TOPK_THREADS.
#define TOPK_BM_WORDS (TOPK_THREADS * 4)

// Outputs the final select stages in shared memory per round: its two window bitmaps.
#define EMIT_STAGE (2 * TOPK_BM_WORDS)

// The position of the n-th (from 0) set bit of x, n < popc(x).
SIKV_DEV int nth_set_bit(u32 x, u32 n) {
    int pos = 0;
    #pragma unroll
    for (int half = 16; half > 0; half >>= 1) {
        const u32 c = (u32)__popc(x & ((1u << half) - 1u));
        if (n >= c) {
            n -= c;
            x >>= half;
            pos += half;
        }
    }
    return pos;
}

// The n lowest set bits of x.
SIKV_DEV u32 low_set_bits(u32 x, u32 n) {
    if (n >= (u32)__popc(x)) return x;
    return n == 0 ? 0u : x & ((1u << nth_set_bit(x, n)) - 1u);
}

// The stage-1 selection of row rowid once its sizes (rk), its histogram's threshold bin (thr,
// hist_threshold's) and the count nc of candidates the compaction appended are known: exact
// select over the candidates with ascending output, or the one-CTA select over the whole row
// for a fallback row; then the row's sizes. Every thread of the TOPK_THREADS block must call.
//
// `parts` CTAs of a cluster (1, 2 or 4; the final kernel's launch; this one of rank `part`)
// may share the row: each runs the radix passes over the candidates itself (the same inputs
// give each the same threshold) and takes the part-th of `parts` equal parts of every bitmap
// window (its marks, scans and outputs), so that the window's serial work, which one SM ran
// while the others idled in a batch-1 step, is split. The parts' counts go to every CTA over
// distributed shared memory (a cluster barrier per window), and each CTA's outputs follow the
// parts before it (scripts/diag/final_select_parts_model.py checks that arithmetic against the
// one-CTA output). The fallback select and the row's sizes are CTA 0's. One part is the one-CTA
// select, with no cluster barrier (the fused select calls it so, from its CTA 0). PARTS is a
// template parameter so that a thread's words index its registers by constants: as a run-time
// value it took the kernel from 56 to 64 registers, all of an SM's for 1024 threads, so that
// its CTAs could start only on SMs the compaction had left entirely.
template <int PARTS>
SIKV_DEV void final_select(const SikvParams& p, RadixSmem& s, u32* bm_gt, u32* bm_eq, const RowK& rk,
                           long long rowid, const u32* thr, u32 nc, u32 part = 0) {
    constexpr u32 parts = PARTS;
    // Each window's counts per CTA (gt, eq), by the window's parity: a CTA writes a window's
    // slot again two windows later, after every CTA has passed the barrier between, which
    // each passes only after it read the slot.
    static_assert(4 % PARTS == 0 && PARTS <= FINAL_MAX_CLUSTER, "a CTA's part of a window: whole words per thread");
    __shared__ __align__(16) u32 part_counts[8];
    constexpr int CW = TOPK_BM_WORDS / PARTS;  // words of a window per CTA
    constexpr int WPT = CW / TOPK_THREADS;     // of them per thread: 4, 2 or 1
    const int S = p.n_sink;
    const int ksel = rk.ksel;
    const bool two = p.rerank_factor >= 2;
    int* out = two ? reinterpret_cast<int*>(p.ws_list) + rowid * p.stage1_max
                   : reinterpret_cast<int*>(p.indices) + rowid * p.budget_max;
    if (ksel > 0) {
        const u64* cand = reinterpret_cast<const u64*>(p.ws_cand) + rowid * p.cand_cap;
        const u32* gtmap = reinterpret_cast<const u32*>(p.ws_gtmap) + rowid * p.gtmap_stride;
        const int w0 = S >> 5, w1 = (rk.end + 31) >> 5;
        // The fast path's inputs go out before nc is known (its load is still in flight): there
        // nc equals thr[2], which the histogram gave before the grid dependency, so the
        // candidates' keys, the first window's gt words and the count come in one round trip.
        // The passes read the keys (high words) alone. A row's bin t rarely holds more than
        // TOPK_THREADS * 8 keys: then they are loaded once, into registers, for both passes
        // (element u * TOPK_THREADS + x in thread x, as visit_keys_at lays them out); else
        // each pass loads them again, eight per thread in flight.
        const bool may_fast = thr[3] && thr[2] <= (u32)p.cand_cap;
        const bool in_regs = may_fast && thr[2] <= (u32)TOPK_THREADS * 8u;
        const u32* cand_hi = reinterpret_cast<const u32*>(cand) + 1;
        u32 kr[8];
        #pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = u * TOPK_THREADS + (int)threadIdx.x;
            kr[u] = in_regs && i < (int)thr[2] ? cand_hi[2 * i] : 0u;
        }
        // This thread's words of this CTA's part of a window: part_word(j) from the window's start.
        auto part_word = [&](int j) { return (int)part * CW + (int)threadIdx.x * WPT + j; };
        u32 gnext[4];
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int w = w0 + part_word(j);
            gnext[j] = may_fast && j < WPT && w < w1 && w < w0 + TOPK_BM_WORDS ? gtmap[w] : 0u;
        }
        const bool fast = may_fast && nc == thr[2];
        if (!fast) {
            const u32* keys = reinterpret_cast<const u32*>(p.ws_keys) + rowid * p.key_stride + S;
            if (part == 0)
                block_topk<TOPK_THREADS>(s, bm_gt, rk.n, ksel, [&](int i) { return keys[i]; }, [&](int r, int i) { out[r] = S + i; });
        } else {
            // Pass 1 is the histogram's: prefix = bin t, remaining = ksel - above; the buffer
            // holds exactly the keys of bin t.
            if (threadIdx.x == 0) {
                s.sel_prefix = thr[0] << TOPK_HIST_SHIFT;
                s.sel_mask = (u32)(TOPK_HIST_BINS - 1) << TOPK_HIST_SHIFT;
                s.sel_remaining = (u32)ksel - thr[1];
                s.sel_count = ~0u;
            }
            if (in_regs) {
                block_radix_passes<TOPK_THREADS>(s, bm_gt, 1, [&](auto&& add) {
                    #pragma unroll
                    for (int u = 0; u < 8; ++u) add(kr[u], u * TOPK_THREADS + (int)threadIdx.x < (int)nc);
                });
            } else {
                block_radix_passes<TOPK_THREADS>(s, bm_gt, 1, [&](auto&& add) {
                    visit_keys_at<TOPK_THREADS, 8>((int)nc, [&](int i) { return cand_hi[2 * i]; }, add);
                });
            }
            const u32 T = s.sel_prefix, M = s.sel_mask;
            const u32 remaining = s.sel_remaining;
            // Position bitmaps, one window of TOPK_BM_WORDS words (131072 positions) at a time:
            // gt = the compaction's bitmap (bins above t) or a bin-t key > T (all taken), eq =
            // key == T (the first `remaining` in position order taken); block scans of their counts
            // give each word's first output index.
            u32 carry_gt = 0, carry_eq = 0;
            int parity = 0;
            for (int wb = w0; wb < w1; wb += TOPK_BM_WORDS) {
                const int we = wb + TOPK_BM_WORDS < w1 ? wb + TOPK_BM_WORDS : w1;
                // This CTA's part of the window: words [pb, pe) (none when pb >= pe).
                const int pb = wb + (int)part * CW;
                const int pe = pb + CW < we ? pb + CW : we;
                for (int w = threadIdx.x; w < CW; w += TOPK_THREADS) { bm_gt[w] = 0u; bm_eq[w] = 0u; }
                __syncthreads();
                for (int base = 0; base < (int)nc; base += TOPK_THREADS * 4) {
                    u64 c[4];
                    #pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const int i = base + u * TOPK_THREADS + (int)threadIdx.x;
                        c[u] = i < (int)nc ? cand[i] : 0ull;
                    }
                    #pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const u32 key = (u32)(c[u] >> 32) & M;
                        const u32 pos = (u32)c[u];
                        const int w = (int)(pos >> 5);
                        // (past nc: no candidate; under a partial mask T may be 0)
                        if (base + u * TOPK_THREADS + (int)threadIdx.x >= (int)nc || w < pb || w >= pe) continue;
                        if (key > T) atomicOr(&bm_gt[w - pb], 1u << (pos & 31));
                        else if (key == T) atomicOr(&bm_eq[w - pb], 1u << (pos & 31));
                    }
                }
                __syncthreads();
                // WPT consecutive words per thread: TOPK_THREADS * WPT == CW.
                u32 g[4], e[4];
                u32 ngt = 0, neq = 0;
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int w = (int)threadIdx.x * WPT + j;
                    const bool in = j < WPT && pb + w < pe;
                    g[j] = in ? bm_gt[w] | gnext[j] : 0u;
                    e[j] = in ? bm_eq[w] : 0u;
                    ngt += (u32)__popc(g[j]);
                    neq += (u32)__popc(e[j]);
                }
                // The next window's gt words.
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int w = wb + TOPK_BM_WORDS + part_word(j);
                    gnext[j] = j < WPT && w < w1 ? gtmap[w] : 0u;
                }
                u32 tg, te;
                // Two buffers, no closing barriers: the next window's first scan comes after
                // its zeroing barrier.
                const u32 xg = block_excl_scan<TOPK_THREADS, false>(ngt, s.scan, &tg);
                const u32 xe = block_excl_scan<TOPK_THREADS, false>(neq, s.scan2, &te);
                // The cluster's parts: the counts of the parts before this one (bg, be) and of
                // the whole window (ag, ae).
                u32 bg = 0, be = 0, ag = tg, ae = te;
                if (parts > 1) {
                    if (threadIdx.x == 0) {
                        part_counts[4 * parity] = tg;
                        part_counts[4 * parity + 1] = te;
                    }
                    cluster_sync();
                    ag = 0;
                    ae = 0;
                    for (u32 q = 0; q < parts; ++q) {
                        const uint4 v = cluster_load4(cluster_addr(&part_counts[4 * parity], q));
                        if (q < part) {
                            bg += v.x;
                            be += v.y;
                        }
                        ag += v.x;
                        ae += v.y;
                    }
                    parity ^= 1;
                }
                const u32 part_gt = carry_gt + bg, part_eq = carry_eq + be;
                // This thread's words' taken positions (all of gt, the first `remaining` of eq in
                // position order) and the output index of each word's first one.
                u32 sel[4], at[4];
                u32 gt_before = part_gt + xg, eq_before = part_eq + xe;
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const u32 ne = (u32)__popc(e[j]);
                    const u32 take = eq_before < remaining ? min(remaining - eq_before, ne) : 0u;
                    at[j] = gt_before + min(eq_before, remaining);
                    sel[j] = g[j] | low_set_bits(e[j], take);
                    gt_before += (u32)__popc(g[j]);
                    eq_before += ne;
                }
                // Emitted through shared memory: each thread puts its positions at their output
                // index into the two bitmaps (free now: the scans' barriers ordered every read of
                // them), then the block stores the window's outputs in order, whole lines at a
                // time. Stored straight from each thread's bit loop, a warp's 32 stores went to 32
                // lines, serialised through the one SM (8 us of the kernel at 32K tokens). A
                // window with more outputs than the stage holds takes several rounds.
                auto stage = [&](u32 i) -> u32& { return i < TOPK_BM_WORDS ? bm_gt[i] : bm_eq[i - TOPK_BM_WORDS]; };
                const u32 o0 = part_gt + min(part_eq, remaining);
                const u32 o1 = part_gt + tg + min(part_eq + te, remaining);
                for (u32 ob = o0; ob < o1; ob += EMIT_STAGE) {
                    #pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int pos0 = (pb + (int)threadIdx.x * WPT + j) << 5;
                        u32 x = sel[j];
                        // (modulo 2^32: below ob wraps past EMIT_STAGE and is skipped)
                        u32 i = at[j] - ob;
                        while (x) {
                            const int bit = __ffs(x) - 1;
                            x &= x - 1;
                            if (i < EMIT_STAGE) stage(i) = (u32)(pos0 + bit);
                            ++i;
                        }
                    }
                    __syncthreads();
                    const u32 n_out = min(o1 - ob, (u32)EMIT_STAGE);
                    for (u32 i = threadIdx.x; i < n_out; i += TOPK_THREADS) out[ob + i] = (int)stage(i);
                    // The next round writes the stage again; the next window zeroes it.
                    if (ob + EMIT_STAGE < o1 || wb + TOPK_BM_WORDS < w1) __syncthreads();
                }
                carry_gt += ag;
                carry_eq += ae;
            }
        }
    }
    // No CTA leaves while another may still read its counts; the row's sizes are CTA 0's.
    if (parts > 1) cluster_sync();
    if (part != 0) return;
    if (two) {
        // The rest of the list -1: re-rank reads its thread's entry before the count says
        // whether it is live, and every entry it reads is then one this call wrote.
        for (int r = (ksel > 0 ? ksel : 0) + threadIdx.x; r < p.stage1_max; r += blockDim.x) out[r] = -1;
        if (threadIdx.x == 0) {
            reinterpret_cast<int*>(p.ws_list_n)[2 * rowid] = ksel > 0 ? ksel : 0;
            reinterpret_cast<int*>(p.ws_list_n)[2 * rowid + 1] = rk.k;
        }
    } else {
        for (int r = (ksel > 0 ? ksel : 0) + threadIdx.x; r < p.budget_max; r += blockDim.x) out[r] = -1;
        if (threadIdx.x == 0) reinterpret_cast<int*>(p.counts)[rowid] = ksel > 0 ? ksel : 0;
    }
}

// grid (PARTS H_kv, B) in clusters of PARTS CTAs along x (launch.rs final_cluster; 1: no
// clusters), cluster h serving KV head h (final_select's parts). One entry per cluster size,
// each with its own registers: a switch over the three in one entry took 64.
template <int PARTS>
SIKV_DEV void topk_final_body(const SikvParams& p) {
    __shared__ RadixSmem s;
    __shared__ u32 bm_gt[TOPK_BM_WORDS];
    __shared__ u32 bm_eq[TOPK_BM_WORDS];
    __shared__ u32 thr[4];
    __shared__ int heavy_in_range;
    const u32 part = PARTS > 1 ? cluster_rank() : 0u;
    const int r = blockIdx.y, h = (int)blockIdx.x / PARTS;
    const long long rowid = (long long)r * p.num_kv_heads + h;
    const RowK rk = row_k(p, query_row(p, r), h, &heavy_in_range);
    u32* hist = reinterpret_cast<u32*>(p.ws_hist) + rowid * TOPK_HIST_STRIDE;
    u32* counter = hist + TOPK_HIST_BINS;
    // The selection sizes and the histogram's threshold bin need the page table, the heavy list
    // and the score kernel's histogram (two launches back): found while the compaction runs.
    if (rk.ksel > 0) hist_threshold<TOPK_THREADS>(hist, (u32)rk.ksel, s.scan, thr);
    sikv_grid_dependency();
    final_select<PARTS>(p, s, bm_gt, bm_eq, rk, rowid, thr, rk.ksel > 0 ? *counter : 0u, part);
    // Every thread of every CTA of the row has read the counter (above; final_select ends with
    // a cluster barrier where the row has several); leave it zero for the next call (mode 1:
    // benchmark replay of this kernel alone, keep it).
    __syncthreads();
    if (part == 0 && threadIdx.x == 0 && p.mode != 1) *counter = 0u;
}
SIKV_DEV void sikv_topk_final_impl(const SikvParams& p) {
    topk_final_body<1>(p);
}
SIKV_ENTRY_LATE_WAIT(sikv_topk_final, TOPK_THREADS)
SIKV_DEV void sikv_topk_final_c2_impl(const SikvParams& p) {
    topk_final_body<2>(p);
}
SIKV_ENTRY_LATE_WAIT(sikv_topk_final_c2, TOPK_THREADS)
SIKV_DEV void sikv_topk_final_c4_impl(const SikvParams& p) {
    topk_final_body<4>(p);
}
SIKV_ENTRY_LATE_WAIT(sikv_topk_final_c4, TOPK_THREADS)

SIKV_DEV void sikv_topk_stage2_impl(const SikvParams& p) {
    __shared__ RadixSmem s;
    __shared__ u32 hist2[RADIX_BINS];
    const int r = blockIdx.y, h = blockIdx.x;
    const long long rowid = (long long)r * p.num_kv_heads + h;
    // The stage-1 list and sizes are sikv_topk_final's (two launches back): read while
    // rerank_score runs; its keys only after the grid dependency.
    const int n1 = reinterpret_cast<const int*>(p.ws_list_n)[2 * rowid];
    const int k = reinterpret_cast<const int*>(p.ws_list_n)[2 * rowid + 1];
    const int* list = reinterpret_cast<const int*>(p.ws_list) + rowid * p.stage1_max;
    const u32* keys = reinterpret_cast<const u32*>(p.ws_keys2) + rowid * p.stage1_max;
    int* out = reinterpret_cast<int*>(p.indices) + rowid * p.budget_max;
    // The list is ascending, so ties by list index are ties by position.
    if (n1 <= TOPK_THREADS * TOPK_REG_ITEMS) {
        // Every survivor's position and key in registers, each loaded once, 16 bytes at a time
        // (rows are 16-byte aligned when stage1_max is a multiple of 4).
        const bool aligned = (p.stage1_max & 3) == 0;
        u32 pos[TOPK_REG_ITEMS], key[TOPK_REG_ITEMS];
        load_row_regs<TOPK_THREADS>(reinterpret_cast<const u32*>(list), n1, aligned, pos);
        sikv_grid_dependency();
        load_row_regs<TOPK_THREADS>(keys, n1, aligned, key);
        block_topk_regs<TOPK_THREADS>(s, hist2, n1, k, key, [&](int r, int slot) { out[r] = (int)pos[slot]; });
    } else {
        sikv_grid_dependency();
        block_topk<TOPK_THREADS>(s, hist2, n1, k, [&](int i) { return keys[i]; }, [&](int r, int i) { out[r] = list[i]; });
    }
    for (int r = k + threadIdx.x; r < p.budget_max; r += blockDim.x) out[r] = -1;
    if (threadIdx.x == 0) reinterpret_cast<int*>(p.counts)[rowid] = k;
}
SIKV_ENTRY_LATE_WAIT(sikv_topk_stage2, TOPK_THREADS)

// ---------------------------------------------------------------------------------------------
// Fused select (sm_90, small batches): stage `score` and the multi-CTA stage-1 `topk` in one
// launch, for calls too small to fill the GPU, whose step was a chain of launches each waiting
// on the one before (a memset, score, compaction, final). A cluster of C CTAs of TOPK_THREADS
// threads serves one row; grid (C, H_kv, B), cluster (C, 1, 1).
//  1. Each CTA scores the row's aligned tiles of p.fused_tile positions (the launcher sizes them
//     so that the row's C CTAs share it, up to FUSED_TILE) rank, rank + C, ... with
//     the score kernel's per-position code (score_tokens: the same keys, bit for bit), writes
//     the keys to ws_keys and counts them in a histogram in its shared memory, then adds that
//     into CTA 0's (distributed shared memory). No global histogram: no memset.
//  2. Cluster barrier. Each CTA copies CTA 0's histogram, finds the threshold bin
//     (hist_threshold) and compacts its own tiles as sikv_topk_compact does: the gt bitmap's
//     words, the threshold bin's keys appended to ws_cand at a count kept in CTA 0.
//  3. Cluster barrier. CTA 0 runs the final select (final_select); the others are done.
// One row per sequence only (the rows calls keep the chain). The launcher picks it (select).
template <int D, typename T>
SIKV_DEV void sikv_score_topk_impl(const SikvParams& p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int NT = TOPK_THREADS;
    static_assert(FUSED_TILE == NT * (int)SCORE_TOKENS_PER_THREAD, "a thread scores up to SCORE_TOKENS_PER_THREAD positions of a tile");
    static_assert(NT % 32 == 0, "whole bitmap words per tile");
    // Positions per tile: a multiple of NT up to FUSED_TILE (a thread's j-th position is
    // NT apart; the lanes past the tile are not valid).
    const int tile = p.fused_tile;
    __shared__ RadixSmem s;  // s.hist: this CTA's histogram; CTA 0's holds the row's
    // The score's tables, then (CTA 0, after the last barrier) the final select's bitmaps.
    __shared__ union {
        struct {
            float qbar[D];
            float lut[(D / 4) * CENTROIDS];
            u32 heavy_bits[NT];
            long long page_off[FUSED_TILE / SCORE_PAGE_TABLE_MIN + 1];
        } sc;
        struct {
            u32 bm_gt[TOPK_BM_WORDS];
            u32 bm_eq[TOPK_BM_WORDS];
        } fin;
    } u;
    __shared__ u32 thr[4];
    __shared__ u32 counter;  // CTA 0: the row's appended candidates
    __shared__ u32 base_sh;
    __shared__ int heavy_in_range;
    const int h = blockIdx.y, r = blockIdx.z;
    const u32 rank = cluster_rank(), C = cluster_size();
    const long long rowid = (long long)r * p.num_kv_heads + h;
    const QueryRow qr = single_row(p, r);
    const int b = qr.seq, S = p.n_sink;
    const int end = row_cand_end(p, qr);
    radix_bins_zero<NT>(s.hist);
    if (threadIdx.x == 0) counter = 0u;
    // CTA 0's histogram and counter are zero before any CTA adds into them (wait below).
    cluster_arrive();
    // Tiles are aligned (tile x holds positions [x tile, (x + 1) tile)), as the compaction's are,
    // so one CTA writes whole bitmap words.
    const int x0 = S / tile, x1 = end > S ? (end + tile - 1) / tile : x0;
    const int xf = x0 + (int)rank;  // this CTA's first tile
    const bool has_tile = xf < x1;
    const bool paged = score_paged(p);
    const int* dpos = nullptr;
    u8* rec = nullptr;
    int prompt_len = 0, page0 = 0;
    // The prologue's loads overlap as the score kernel's do: the first tile's pages with the
    // query, then its heavy bits (and the row's candidate count) with the LUT.
    if (end > S) {  // a row with a bad slot has end == S
        rec = state_record(p, qr.slot, h);
        dpos = state_dense_pos(p, rec);
        prompt_len = state_meta(p, rec)[META_PROMPT_LEN];
        if (has_tile && paged) {
            const int t0 = xf * tile;
            page0 = tile_pages<D>(p, b, h, t0 > S ? t0 : S, t0 + tile < end ? t0 + tile : end, u.sc.page_off);
        }
        load_qbar<D, T>(p, r, h, u.sc.qbar);
    }
    u.sc.heavy_bits[threadIdx.x] = 0u;
    if (threadIdx.x == 0) heavy_in_range = 0;
    __syncthreads();
    if (end > S) {
        // Heavy positions: the first tile's bits (tile_heavy's) and the row's count below end
        // (count_candidates').
        int mine = 0;
        const int t0 = xf * tile;
        for (int i = threadIdx.x; i < p.n_heavy; i += NT) {
            const int hp = dpos[S + i];
            mine += (hp >= S && hp < end) ? 1 : 0;
            const int rel = hp - t0;
            if (has_tile && rel >= 0 && rel < tile) atomicOr(&u.sc.heavy_bits[rel % NT], 1u << (rel / NT));
        }
        mine = warp_sum_int(mine);
        if ((threadIdx.x & 31) == 0 && mine) atomicAdd(&heavy_in_range, mine);
        build_lut<D>(p, rec, u.sc.qbar, u.sc.lut);
    }
    __syncthreads();
    const RowK rk = row_sizes(p, end, end - S - heavy_in_range);
    u32* keys = reinterpret_cast<u32*>(p.ws_keys) + rowid * p.key_stride;
    for (int x = xf; x < x1; x += (int)C) {
        const int t0 = x * tile;
        const int lo = t0 > S ? t0 : S, hi = t0 + tile < end ? t0 + tile : end;
        if (x != xf) {
            __syncthreads();  // the last tile's heavy bits and pages are read
            u.sc.heavy_bits[threadIdx.x] = 0u;
            page0 = paged ? tile_pages<D>(p, b, h, lo, hi, u.sc.page_off) : 0;
            __syncthreads();
            tile_heavy<NT>(p, dpos, t0, u.sc.heavy_bits);
            __syncthreads();
        }
        u32 lanes = u.sc.heavy_bits[threadIdx.x] << LANE_HEAVY;
        #pragma unroll
        for (int j = 0; j < SCORE_TOKENS_PER_THREAD; ++j) {
            const int pos = t0 + j * NT + (int)threadIdx.x;
            lanes |= (pos >= lo && pos < hi ? 1u : 0u) << (LANE_VALID + j);
            lanes |= (p.force_generated && pos >= prompt_len ? 1u : 0u) << (LANE_FORCED + j);
        }
        u32* my_keys = keys + t0 + threadIdx.x;
        if (paged) {
            const int rel0 = t0 + (int)threadIdx.x - (page0 << (__ffs(p.page_size) - 1));
            score_tokens<D, true, NT>(p, b, h, t0, lanes, u.sc.lut, u.sc.page_off, rel0, my_keys, true, s.hist);
        } else {
            score_tokens<D, false, NT>(p, b, h, t0, lanes, u.sc.lut, u.sc.page_off, 0, my_keys, true, s.hist);
        }
    }
    __syncthreads();  // this CTA's histogram is complete
    cluster_wait();
    const u32 hist0 = cluster_addr(s.hist, 0);
    if (rank != 0)
        for (int i = threadIdx.x; i < TOPK_HIST_BINS; i += NT) {
            const u32 c = s.hist[i];
            if (c) cluster_red_add(hist0 + 4u * (u32)i, c);
        }
    // The row's histogram is complete in CTA 0, and every CTA's keys are written.
    cluster_sync();
    if (rank != 0) {
        for (int i = threadIdx.x; i < TOPK_HIST_BINS / 4; i += NT)
            reinterpret_cast<uint4*>(s.hist)[i] = cluster_load4(hist0 + 16u * (u32)i);
        __syncthreads();
    }
    if (rk.ksel > 0) hist_threshold<NT>(s.hist, (u32)rk.ksel, s.scan, thr);
    // Compaction of this CTA's tiles (sikv_topk_compact's, NT threads and 8 keys a thread); a
    // fallback row (threshold bin larger than the buffer) is left to final_select alone.
    if (rk.ksel > 0 && thr[3] && thr[2] <= (u32)p.cand_cap) {
        const u32 tb = thr[0];
        const int wend = (end + 31) >> 5;
        u32* gtmap = reinterpret_cast<u32*>(p.ws_gtmap) + rowid * p.gtmap_stride;
        const u32 count0 = cluster_addr(&counter, 0);
        for (int x = x0 + (int)rank; x < x1; x += (int)C) {
            const int t0 = x * tile;
            const int lo = t0 > S ? t0 : S, hi = t0 + tile < end ? t0 + tile : end;
            u32 kv[8];
            tile_keys<NT>(keys, t0, lo, hi, kv);
            const int w0 = t0 / 32, w1 = min(wend, (t0 + tile) / 32);  // this tile's words
            compact_tile<NT>(
                p, kv, t0, tb, rowid, s.scan, base_sh,
                [&](int i, u32 word) {
                    if (w0 + i < w1) gtmap[w0 + i] = word;
                },
                [&](u32 total) { return cluster_atomic_add(count0, total); });
        }
    }
    // The candidates, the gt words and the count are complete; CTA 0's histogram is copied.
    cluster_sync();
    if (rank != 0) return;
    final_select<1>(p, s, u.fin.bm_gt, u.fin.bm_eq, rk, rowid, thr, rk.ksel > 0 ? counter : 0u);
#endif
}
SIKV_ENTRIES_D_T_MINB(sikv_score_topk, TOPK_THREADS, 1)
