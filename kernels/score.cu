// Stage `score` (method §10.5 steps 2-4, §10.6 K3; reference/score.rs): the group-mean query
// and its LUT are built in shared memory in the prologue of every block; then one thread per
// token does one 16-byte (8 at d=64, 2x16 at d=256) sign-row load and d/4 LUT lookups, summed
// in sub-vector order as the CPU does (so scores agree bit for bit). Output: radix keys
// (score_key) for positions [S, max(S, len - W)) into ws_keys; heavy positions get key 0
// (not a candidate), forced positions (+inf) rank first.
//
// LUT banks: the 32 lanes of a warp read entries s*16 + u of the same sub-vector s, which
// lie in 16 consecutive words: distinct u hit distinct banks, equal u broadcast.
#include "common.cuh"

// SCORE_THREADS, SCORE_TOKENS_PER_THREAD, SCORE_TILE, RERANK_THREADS: src/gpu/geometry.rs.

// Group-mean query (reference/score.rs order) of selection row r, KV head h into smem (d
// floats): the G heads of query row r; with MEAN and p.mean_offsets (a mean-query select) the
// G heads of each of sequence r's rows in row order (cpu/rows.rs: the rows' groups concatenated,
// one mean over all; zeros for offsets that cannot be followed). TIGHT: the mean's loops not
// unrolled, for the score's rows entry, where unrolled they spilled under its 32 registers.
// Only the mean-query entries and branches take MEAN: a one-row path with the mean's code
// beside it made the one-row step up to 3.6 us slower (H200, eleventh session, runs 3 and 4).
template <int D, typename T, bool MEAN = false, bool TIGHT = false>
SIKV_DEV void load_qbar(const SikvParams& p, int r, int h, float* qbar) {
    const T* q = reinterpret_cast<const T*>(p.q);
    const int G = p.group, hq = p.num_kv_heads * G;
    if constexpr (!MEAN) {
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float s = 0.0f;
            for (int g = 0; g < G; ++g) s = add_rn(s, to_f32(q[((long long)r * hq + (long long)h * G + g) * D + c]));
            qbar[c] = div_rn(s, (float)G);
        }
        return;
    }
    int r0 = r, n = 1;
    if (p.mean_offsets) mean_query_rows(p, r, &r0, &n);
    auto at = [&](int j, int g, int c) { return to_f32(q[((long long)(r0 + j) * hq + (long long)h * G + g) * D + c]); };
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float s = 0.0f;
        if constexpr (TIGHT) {
            #pragma unroll 1
            for (int j = 0; j < n; ++j)
                #pragma unroll 1
                for (int g = 0; g < G; ++g) s = add_rn(s, at(j, g, c));
        } else {
            for (int j = 0; j < n; ++j)
                for (int g = 0; g < G; ++g) s = add_rn(s, at(j, g, c));
        }
        qbar[c] = n > 0 ? div_rn(s, (float)(n * G)) : 0.0f;
    }
}

// A sign row of D/8 bytes as D/32 words.
template <int D>
struct SignRow {
    u32 w[D / 32];
};
// pol: the L2 policy of the streamed rows (l2_evict_first), made once by the caller's loop.
template <int D>
SIKV_DEV void load_sign_row(const u8* row, SignRow<D>& r, unsigned long long pol) {
    if constexpr (D == 64) {
        const uint2 x = load_stream8(row, pol);
        r.w[0] = x.x; r.w[1] = x.y;
    } else {
        // (D = 256 keeps plain loads: with the hinted pair it needed 40 registers; it keeps 32.)
        #pragma unroll
        for (int i = 0; i < D / 128; ++i) {
            const uint4 x = D == 128 ? load_stream16(row, pol) : reinterpret_cast<const uint4*>(row)[i];
            r.w[4 * i] = x.x; r.w[4 * i + 1] = x.y; r.w[4 * i + 2] = x.z; r.w[4 * i + 3] = x.w;
        }
    }
}

// A sign row's D/4 nibble codes' LUT sum, in sub-vector order.
template <int D>
SIKV_DEV float lut_sum_words(const float* lut, const SignRow<D>& r) {
    // Nibble s (channels 4s..4s+3) is the code; its LUT entry lies at byte s * 4 CENTROIDS +
    // 4 code. One shift and one mask per word put 4 code (the byte offset) of its even nibbles
    // into the bytes of `ev` and of its odd nibbles into `od`; a byte permute then moves one
    // offset into place per lookup (the constant part is the load's immediate), where a shift
    // and a mask per lookup were needed.
    const char* base = reinterpret_cast<const char*>(lut);
    float acc = 0.0f;
    #pragma unroll
    for (int i = 0; i < D / 32; ++i) {
        const u32 ev = (r.w[i] << 2) & 0x3C3C3C3Cu, od = (r.w[i] >> 2) & 0x3C3C3C3Cu;
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int s = 8 * i + e;
            const u32 off = __byte_perm(e & 1 ? od : ev, 0u, 0x4440u | (u32)(e >> 1));
            acc = add_rn(acc, *reinterpret_cast<const float*>(base + s * CENTROIDS * 4 + off));
        }
    }
    return acc;
}
template <int D>
SIKV_DEV float lut_sum(const float* lut, const u8* row, unsigned long long pol) {
    SignRow<D> r;
    load_sign_row<D>(row, r, pol);
    return lut_sum_words<D>(lut, r);
}

// Per-thread view of its positions tile0 + j * SCORE_THREADS + threadIdx.x, j < TOKENS: bit j
// of byte 0 (below the candidate end), byte 1 (heavy, in the dense set: key 0) and byte 2
// (generated, with force_generated: +inf). Made once per thread, so a position's checks are
// bit tests of constants; one word, as the token loop runs at its register bound (32 registers,
// 40 with the row loaded ahead).
static_assert(SCORE_TOKENS_PER_THREAD <= 8, "the lane word packs a byte per property");
constexpr u32 LANE_VALID = 0, LANE_HEAVY = 8, LANE_FORCED = 16;

// The token loop of one score block. PAGED: a position's sign row is its page's entry of the
// block's `page_off` table (byte offset of the page's slot 0 in the sign plane, -1 for a page
// outside the pool) plus its slot; rel0 = this thread's first position minus the table's first
// page's first position. Else every position takes row_index.
// NT: the threads that share the tile (positions NT apart); the fused select's CTAs are wider.
// AHEAD (paged only): the next position's sign row is loaded before this one's lookups, so a
// thread always has a load in flight; without it each row's load waited for the last row's
// lookups, and at large batches too few loads were in flight to keep memory busy (the kernel
// moved 168 MB at 2.4 TB/s at 128K, batch 8). It costs a second row of registers.
// WIDE (with AHEAD): every row of the thread is loaded before the first sum, so the thread waits
// one load latency instead of one every other position; it holds all its rows in registers
// (sikv_score_wide, for grids that fit a wave at SCORE_WIDE_BLOCKS_PER_SM blocks a SM).
template <int D, bool PAGED, int NT = SCORE_THREADS, bool AHEAD = false, bool WIDE = false>
SIKV_DEV void score_tokens(const SikvParams& p, int b, int h, int tile0, u32 lanes, const float* lut,
                           const long long* page_off, int rel0, u32* my_keys, bool multi, u32* hist) {
    const int shift = __ffs(p.page_size) - 1;
    const int slot_mask = p.page_size - 1;
    const u8* sign = reinterpret_cast<const u8*>(p.plane[SIKV_PLANE_SIGN]);
    if constexpr (PAGED && AHEAD) {
        // Without a branch per position: every position's row sum is made, its key chosen after
        // (loaded: its score; forced and not heavy: +inf; else 0), the row ahead loaded by a
        // predicated load into one of two register sets in turn (no copy of the row), and a
        // page outside the pool faulted once after the loop (the compiler may still branch
        // around an unloaded position's sum). About 161 instructions a position in the d = 128
        // SASS (138 in the wide entry), against 199 with a branch per test; the arithmetic and
        // its order are unchanged.
        const unsigned long long pol = l2_evict_first();
        constexpr int RING = WIDE ? SCORE_TOKENS_PER_THREAD : 2;
        SignRow<D> rows[RING] = {};
        // One word of per-position bits, as the loop runs at its register bound: bit j of byte
        // 0 valid, of byte 1 scored (valid, neither heavy nor forced), of byte 2 forced and not
        // heavy (+inf), of byte 3 loaded (scored, and its page in the pool).
        const u32 not_heavy = ~(lanes >> LANE_HEAVY);
        u32 bits = ((lanes >> LANE_VALID) & 0xFFu) |
                   (((lanes >> LANE_VALID) & not_heavy & ~(lanes >> LANE_FORCED) & 0xFFu) << 8) |
                   (((lanes >> LANE_FORCED) & not_heavy & 0xFFu) << 16);
        // The keys' address kept in registers: rebuilt from the launch parameters at every
        // store it cost nine instructions a position.
        u32* keys_at = my_keys;
        asm volatile("" : "+l"(keys_at));
        auto fetch = [&](int j) {
            const int rel = rel0 + j * NT;
            // (rel >> shift) stays inside the table for every position of the tile, scored or not.
            const long long pg = page_off[rel >> shift];
            const bool load = ((bits >> (8 + j)) & 1u) && pg >= 0;
            if (load) load_sign_row<D>(sign + pg + (u32)(rel & slot_mask) * (u32)(D / 8), rows[j % RING], pol);
            bits |= (load ? 1u : 0u) << (24 + j);
        };
        #pragma unroll
        for (int j = 0; j < (WIDE ? SCORE_TOKENS_PER_THREAD : 1); ++j) fetch(j);
        #pragma unroll
        for (int j = 0; j < SCORE_TOKENS_PER_THREAD; ++j) {
            if (!WIDE && j + 1 < SCORE_TOKENS_PER_THREAD) fetch(j + 1);
            const float s = lut_sum_words<D>(lut, rows[j % RING]);
            const u32 key = (bits >> (24 + j)) & 1u ? score_key(s) : ((bits >> (16 + j)) & 1u ? score_key(SIKV_INF) : 0u);
            if ((bits >> j) & 1u) {
                asm volatile("st.global.u32 [%0], %1;" ::"l"(keys_at + j * NT), "r"(key) : "memory");
                if (multi && key != 0u) atomicAdd(&hist[key >> TOPK_HIST_SHIFT], 1u);
            }
        }
        // A scored position whose row was not loaded lay on a page outside the pool: no candidate.
        if ((bits >> 8) & ~(bits >> 24) & 0xFFu) raise_fault(p, FAULT_PAGE_INDEX);
        return;
    }
    const unsigned long long pol = l2_evict_first();
    #pragma unroll
    for (int j = 0; j < SCORE_TOKENS_PER_THREAD; ++j) {
        if (!((lanes >> (LANE_VALID + j)) & 1u)) continue;
        const int pos = tile0 + j * NT + (int)threadIdx.x;
        u32 key = 0u;
        if ((lanes >> (LANE_HEAVY + j)) & 1u) {
            key = 0u;
        } else if ((lanes >> (LANE_FORCED + j)) & 1u) {
            key = score_key(SIKV_INF);
        } else if constexpr (PAGED) {
            const int rel = rel0 + j * NT;
            const long long pg = page_off[rel >> shift];
            // A position on a page outside the pool is no candidate (fault raised).
            if (pg < 0) raise_fault(p, FAULT_PAGE_INDEX);
            else key = score_key(lut_sum<D>(lut, sign + pg + (u32)(rel & slot_mask) * (u32)(D / 8), pol));
        } else {
            const long long r = row_index(p, b, h, pos);
            if (r >= 0) key = score_key(lut_sum<D>(lut, plane_row(p, SIKV_PLANE_SIGN, r), pol));
        }
        my_keys[j * NT] = key;
        if (multi && key != 0u) atomicAdd(&hist[key >> TOPK_HIST_SHIFT], 1u);
    }
}

// The sign-plane byte offset of slot 0 of each page that positions [lo, hi) lie on, into
// page_off (-1 for a page outside the pool); returns the first page. With a power-of-two page
// size of at least SCORE_PAGE_TABLE_MIN (score_paged), looked up once per block, a position's
// row is that plus its slot: a lookup per position (row_index: two dependent loads, bounds
// checks, 64-bit row arithmetic) was about a sixth of the token loop's instructions.
SIKV_DEV bool score_paged(const SikvParams& p) {
    const int ps = p.page_size;
    return (ps & (ps - 1)) == 0 && ps >= (int)SCORE_PAGE_TABLE_MIN;
}
template <int D>
SIKV_DEV int tile_pages(const SikvParams& p, int b, int h, int lo, int hi, long long* page_off) {
    const int shift = __ffs(p.page_size) - 1;
    const int page0 = lo >> shift;
    const int np = ((hi - 1) >> shift) - page0 + 1;
    for (int i = threadIdx.x; i < np; i += blockDim.x) {
        const long long r = page_base_row(p, b, h, page0 + i);
        page_off[i] = r < 0 ? -1ll : r * (D / 8);  // sign rows: D / 8 bytes (layout.rs)
    }
    return page0;
}

// Heavy positions inside the tile of NT * SCORE_TOKENS_PER_THREAD positions from tile0 -> bit j
// of the word of the thread that scores them (any order of the heavy list works). The words
// start at zero (a barrier after that).
template <int NT>
SIKV_DEV void tile_heavy(const SikvParams& p, const int* dpos, int tile0, u32* heavy_bits) {
    for (int i = threadIdx.x; i < p.n_heavy; i += blockDim.x) {
        const int hp = dpos[p.n_sink + i] - tile0;
        if (hp >= 0 && hp < NT * (int)SCORE_TOKENS_PER_THREAD) atomicOr(&heavy_bits[hp % NT], 1u << (hp / NT));
    }
}

// LUT entry of codebook centroid c of sub-vector s: its dot product with the group-mean query's
// channels 4s..4s+3, summed in channel order (build_lut and the wide prologue alike).
SIKV_DEV float lut_entry(float4 c, const float* qbar, int s) {
    float t = 0.0f;
    t = add_rn(t, mul_rn(c.x, qbar[4 * s + 0]));
    t = add_rn(t, mul_rn(c.y, qbar[4 * s + 1]));
    t = add_rn(t, mul_rn(c.z, qbar[4 * s + 2]));
    t = add_rn(t, mul_rn(c.w, qbar[4 * s + 3]));
    return t;
}

// The score LUT of the row's group-mean query (a barrier before it reads qbar, and after).
template <int D>
SIKV_DEV void build_lut(const SikvParams& p, const u8* rec, const float* qbar, float* lut) {
    // LUT: T[s][u] = sum_i C[s][u][i] * qbar[4s+i] (LUT selector), or
    //      T[s][u] = sum_i (bit_i(u) ? 1 : -1) * sgn(qbar - qmed) (sign x sign selector).
    if (p.selector == 0) {
        const float* cb = reinterpret_cast<const float*>(rec + p.off_codebook);
        for (int e = threadIdx.x; e < (D / 4) * CENTROIDS; e += blockDim.x) {
            lut[e] = lut_entry(reinterpret_cast<const float4*>(cb)[e], qbar, e / CENTROIDS);
        }
    } else {
        const float* qmed = reinterpret_cast<const float*>(rec + p.off_qmed);
        for (int e = threadIdx.x; e < (D / 4) * CENTROIDS; e += blockDim.x) {
            const int s = e / CENTROIDS, u = e % CENTROIDS;
            int t = 0;
            for (int i = 0; i < 4; ++i) {
                float diff = qbar[4 * s + i] - qmed[4 * s + i];
                int sq = diff > 0.0f ? 1 : (diff < 0.0f ? -1 : 0);
                t += ((u >> i) & 1) ? sq : -sq;
            }
            lut[e] = (float)t;
        }
    }
}

// The one-row score's prologue with its loads in two rounds instead of a chain of six (slot,
// length, pages, query, heavy list, codebook, each waited for before the next was issued; about
// a third of the score's samples at 128K batch 1): first what the launch's arguments address
// (the row's slot and page-table entries, its query heads), then what the slot and the page
// list address (the prompt length, the first heavy positions, the codebook, the tile's pages),
// and only then is any of it used. The same values and faults as score_body's rows prologue
// (single_row, tile_pages, load_qbar, tile_heavy, build_lut), bit for bit. Writes *end; returns
// before its barriers when the tile holds no candidate (tile0 >= *end, uniform per block).
// Query heads past SCORE_AHEAD_HEADS, and the sign x sign selector's medians, are loaded where
// they are used, as before.
constexpr int SCORE_AHEAD_HEADS = 4;
// CB_AHEAD: the codebook is loaded in round 2 into registers (the wide entry); else after the
// first barrier, where the LUT is built (the eight-block entries, within 32 registers).
template <int D, typename T, bool CB_AHEAD>
SIKV_DEV void score_prologue_ahead(const SikvParams& p, int r, int h, int tile0, bool paged, int* end_out,
                                   int* prompt_len, int* page0_out, float* qbar, float* lut, u32* heavy_bits,
                                   u32* hist, long long* page_off) {
    constexpr int NT = SCORE_THREADS;
    static_assert(D <= NT, "one thread per channel of the group-mean query");
    constexpr int CE = (D / 4) * CENTROIDS, CR = (CE + NT - 1) / NT;  // LUT entries, a thread's
    const int tid = threadIdx.x, G = p.group;
    // Round 1: the slot, the page-table entries and thread c's first query heads of channel c.
    const int slot_loaded = reinterpret_cast<const int*>(p.seq_slot)[r];
    const int* indptr = reinterpret_cast<const int*>(p.indptr);
    const int i0 = indptr[r], i1 = indptr[r + 1];
    const int last = reinterpret_cast<const int*>(p.last_page_len)[r];
    const T* qh = reinterpret_cast<const T*>(p.q) + ((long long)r * p.num_kv_heads + h) * G * D;
    T qv[SCORE_AHEAD_HEADS] = {};
    #pragma unroll
    for (int g = 0; g < SCORE_AHEAD_HEADS; ++g)
        if (tid < D && g < G) qv[g] = qh[g * D + tid];
    // The row's length and candidate end (single_row's checks and faults).
    const int slot = checked_slot(p, slot_loaded);
    QueryRow qr;
    qr.seq = r;
    qr.slot = slot;
    qr.len = slot < 0 ? 0 : seq_len_of(p, i0, i1, last);
    qr.bound = qr.len;
    const int end = row_cand_end(p, qr);
    *end_out = end;
    if (tile0 >= end) return;
    // Round 2: what the slot and the page list address.
    u8* rec = state_record(p, slot, h);
    const int* dpos = state_dense_pos(p, rec);
    const int plen = state_meta(p, rec)[META_PROMPT_LEN];
    const int hp0 = tid < p.n_heavy ? dpos[p.n_sink + tid] : -1;
    int page0 = 0, np = 0, pg = -1;
    if (paged) {
        const int shift = __ffs(p.page_size) - 1;
        const int tile_end = tile0 + (int)SCORE_TILE < end ? tile0 + (int)SCORE_TILE : end;
        page0 = tile0 >> shift;
        np = ((tile_end - 1) >> shift) - page0 + 1;
        static_assert(SCORE_TILE / SCORE_PAGE_TABLE_MIN + 1 <= NT, "a thread per page of a tile");
        if (tid < np) pg = reinterpret_cast<const int*>(p.page_indices)[i0 + page0 + tid];
    }
    float4 cb[CB_AHEAD ? CR : 1];
    if constexpr (CB_AHEAD) {
        const float4* codebook = reinterpret_cast<const float4*>(rec + p.off_codebook);
        #pragma unroll
        for (int k = 0; k < CR; ++k)
            if (p.selector == 0 && tid + k * NT < CE) cb[k] = codebook[tid + k * NT];
    }
    // Use: the group-mean query (load_qbar's sums), the pages (tile_pages'), zeroed bitmaps.
    if (tid < D) {
        float s = 0.0f;
        #pragma unroll
        for (int g = 0; g < SCORE_AHEAD_HEADS; ++g)
            if (g < G) s = add_rn(s, to_f32(qv[g]));
        for (int g = SCORE_AHEAD_HEADS; g < G; ++g) s = add_rn(s, to_f32(qh[g * D + tid]));
        qbar[tid] = div_rn(s, (float)G);
    }
    // (sign rows: D / 8 bytes, layout.rs)
    if (tid < np)
        page_off[tid] = pg < 0 || pg >= p.num_pages ? -1ll : ((long long)pg * p.num_kv_heads + h) * p.page_size * (D / 8);
    heavy_bits[tid] = 0;
    if (p.topk_multi)
        for (int i = tid; i < TOPK_HIST_BINS; i += NT) hist[i] = 0;
    *prompt_len = plen;
    *page0_out = page0;
    __syncthreads();
    // tile_heavy's bits, its first heavy position per thread already loaded.
    for (int i = tid; i < p.n_heavy; i += NT) {
        const int hp = (i == tid ? hp0 : dpos[p.n_sink + i]) - tile0;
        if (hp >= 0 && hp < NT * (int)SCORE_TOKENS_PER_THREAD) atomicOr(&heavy_bits[hp % NT], 1u << (hp / NT));
    }
    // build_lut's table.
    if constexpr (CB_AHEAD) {
        if (p.selector == 0) {
            #pragma unroll
            for (int k = 0; k < CR; ++k) {
                const int e = tid + k * NT;
                if (e >= CE) break;
                lut[e] = lut_entry(cb[k], qbar, e / CENTROIDS);
            }
        } else {
            build_lut<D>(p, rec, qbar, lut);
        }
    } else {
        build_lut<D>(p, rec, qbar, lut);
    }
    __syncthreads();
}

// ROWS: the call has several query rows per sequence (p.row_offsets; entry sikv_score_rows).
// Two entries rather than a branch on p.row_offsets: the branch compiled to 40 registers (6
// resident blocks of 256 threads per SM instead of 8), and the row lookup inlined into the one
// entry at 32 registers made the one-row path 7 % slower at 128K B=8 (H200 run 2).
template <int D, typename T, bool ROWS, bool WIDE = false>
SIKV_DEV void score_body(const SikvParams& p) {
    __shared__ float qbar[D];
    __shared__ float lut[(D / 4) * CENTROIDS];
    __shared__ u32 heavy_bits[SCORE_THREADS];
    __shared__ u32 hist[TOPK_HIST_BINS];
    __shared__ long long page_off[SCORE_TILE / SCORE_PAGE_TABLE_MIN + 1];
    const int r = blockIdx.z, h = blockIdx.y;
    const int tile0 = p.n_sink + blockIdx.x * SCORE_TILE;
    const bool paged = score_paged(p);
    int b, end, prompt_len, page0 = 0;
    // The one-row entries take the prologue with its loads ahead; the eight-block entry loads
    // the codebook after the first barrier (its loads ahead spilled within 32 registers, each
    // spill store waiting for its load). The rows entry keeps the chain.
    if constexpr (ROWS) {
        const QueryRow qr = ROWS ? query_row(p, r) : single_row(p, r);
        b = qr.seq;
        end = row_cand_end(p, qr);
        if (tile0 >= end) return;  // uniform per block: nothing of this tile is a candidate
        u8* rec = state_record(p, qr.slot, h);
        const int* dpos = state_dense_pos(p, rec);
        prompt_len = state_meta(p, rec)[META_PROMPT_LEN];
        // The tile's pages (tile_pages).
        const int tile_end = tile0 + (int)SCORE_TILE < end ? tile0 + (int)SCORE_TILE : end;
        if (paged) page0 = tile_pages<D>(p, b, h, tile0, tile_end, page_off);
        // The rows entry serves per-row rows (query row r) and the mean query's one row per
        // sequence (its rows' mean): one loop for both.
        load_qbar<D, T, ROWS, true>(p, r, h, qbar);
        heavy_bits[threadIdx.x] = 0;  // blockDim.x == SCORE_THREADS
        if (p.topk_multi)
            for (int i = threadIdx.x; i < TOPK_HIST_BINS; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        tile_heavy<SCORE_THREADS>(p, dpos, tile0, heavy_bits);
        build_lut<D>(p, rec, qbar, lut);
        __syncthreads();
    } else {
        b = r;
        score_prologue_ahead<D, T, WIDE>(p, r, h, tile0, paged, &end, &prompt_len, &page0, qbar, lut, heavy_bits, hist,
                                   page_off);
        if (tile0 >= end) return;  // uniform per block (the prologue returned before its barriers)
    }

    u32 lanes = heavy_bits[threadIdx.x] << LANE_HEAVY;
    #pragma unroll
    for (int j = 0; j < SCORE_TOKENS_PER_THREAD; ++j) {
        const int pos = tile0 + j * SCORE_THREADS + (int)threadIdx.x;
        lanes |= (pos < end ? 1u : 0u) << (LANE_VALID + j);
        lanes |= (p.force_generated && pos >= prompt_len ? 1u : 0u) << (LANE_FORCED + j);
    }
    const long long rowid = (long long)r * p.num_kv_heads + h;
    u32* keys = reinterpret_cast<u32*>(p.ws_keys) + rowid * p.key_stride;
    // Multi-CTA top-k: histogram of the top 11 bits of this tile's candidate keys (key 0 =
    // heavy / not a candidate is left out, so a row's bins sum to its candidate count), added
    // into the row's global histogram (zeroed just ahead: by hist_zero, or by the routed
    // decode's prologue) at the end.
    // Counted as each key is made: holding the tile's keys for a second loop cost 8 registers
    // a thread and with them resident blocks.
    u32* my_keys = keys + tile0 + threadIdx.x;
    const bool multi = p.topk_multi != 0;
    if (paged) {
        const int rel0 = tile0 + (int)threadIdx.x - (page0 << (__ffs(p.page_size) - 1));
        // (The rows entry, bounded to 32 registers, keeps one row in flight.)
        score_tokens<D, true, SCORE_THREADS, !ROWS && D <= (int)SCORE_AHEAD_MAX_D, WIDE>(p, b, h, tile0, lanes, lut, page_off, rel0, my_keys, multi, hist);
    } else {
        score_tokens<D, false>(p, b, h, tile0, lanes, lut, page_off, 0, my_keys, multi, hist);
    }
    if (multi) {
        __syncthreads();
        // The rows' histograms are zero once the launch just ahead is complete: behind
        // hist_zero the wait comes here, after the keys; a routed decode's call waited at
        // entry (SIKV_ENTRY_DT_SCORE).
        sikv_grid_wait();
        u32* ghist = reinterpret_cast<u32*>(p.ws_hist) + rowid * TOPK_HIST_STRIDE;
        for (int i = threadIdx.x; i < TOPK_HIST_BINS; i += blockDim.x) {
            const u32 c = hist[i];
            if (c) atomicAdd(&ghist[i], c);
        }
    }
}
template <int D, typename T>
SIKV_DEV void sikv_score_impl(const SikvParams& p) {
    score_body<D, T, false>(p);
}
// Six blocks per SM asked of ptxas at d = 64, where the row is loaded ahead (score_tokens' AHEAD):
// 40 registers with no spill (48 when left free, five blocks; at seven it spilled). Eight at
// d = 128: 32 registers, the paged loop with no spill (the row-index path spills 4 bytes); with
// the loop's branches removed, more resident warps made the score 4-9 us shorter at 128K batch
// 8-16 (H100, thirty-eighth session). d = 256 keeps no bound (32 registers; bounded to eight
// blocks it spilled 16 bytes, to one it took 56).
#define SCORE_BOUNDS(D) SCORE_BOUNDS_##D
#define SCORE_BOUNDS_64 (SCORE_THREADS, 6)
#define SCORE_BOUNDS_128 (SCORE_THREADS, 8)
#define SCORE_BOUNDS_256 (SCORE_THREADS)
SIKV_ENTRIES_D_T_SCORE(sikv_score, SCORE_BOUNDS)
// The one-row score with every row of a thread in flight at once (score_tokens' WIDE), for
// grids of at most SCORE_WIDE_BLOCKS_PER_SM blocks a SM (launch.rs): its registers are bounded
// by that count, not by the eight blocks the wide grids need.
template <int D, typename T>
SIKV_DEV void sikv_score_wide_impl(const SikvParams& p) {
    score_body<D, T, false, true>(p);
}
#define SCORE_WIDE_BOUNDS(D) (SCORE_THREADS, SCORE_WIDE_BLOCKS_PER_SM)
SIKV_ENTRIES_D_T_SCORE(sikv_score_wide, SCORE_WIDE_BOUNDS)
template <int D, typename T>
SIKV_DEV void sikv_score_rows_impl(const SikvParams& p) {
    score_body<D, T, true>(p);
}
// Eight blocks per SM asked of ptxas: the rows' mean-query prologue (load_qbar) took this
// entry to 40 registers (6 blocks per SM); bounded, it keeps 32 with no spill.
#define SCORE_ROWS_BOUNDS(D) (SCORE_THREADS, 8)
SIKV_ENTRIES_D_T_SCORE(sikv_score_rows, SCORE_ROWS_BOUNDS)

// Stage-2 scores (reference/rerank.rs, RerankQuery): qbar . k'^ for each stage-1 survivor, k'^
// the key as decode_key reconstructs it ((code * delta + zero), signed, times a_c; or the
// stored 16-bit k'): for 2-bit keys regrouped into subset-sum lookups (rerank_dot2), else
// summed in channel order. One thread per survivor; grid (ceil(stage1_max/128), H_kv, B).
//
// The block's query prologue runs before its grid dependency (rerank_score_bits), and the key
// bits are a template parameter: the code extraction unrolls to constant shifts of registers
// (a run-time width had put the code words in local memory).

// N consecutive u32 words of a plane row (row_bytes = 4 N, so a row is 4 N-byte aligned).
template <int N>
SIKV_DEV void load_words(const u8* src, u32* w) {
    if constexpr (N % 4 == 0) {
        #pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            const uint4 x = reinterpret_cast<const uint4*>(src)[i];
            w[4 * i] = x.x; w[4 * i + 1] = x.y; w[4 * i + 2] = x.z; w[4 * i + 3] = x.w;
        }
    } else if constexpr (N % 2 == 0) {
        #pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            const uint2 x = reinterpret_cast<const uint2*>(src)[i];
            w[2 * i] = x.x; w[2 * i + 1] = x.y;
        }
    } else {
        #pragma unroll
        for (int i = 0; i < N; ++i) w[i] = reinterpret_cast<const u32*>(src)[i];
    }
}

// A survivor's quantised key (BITS = 2 or 4): sign bits, magnitude codes, (delta, zero) per
// group of 32 channels.
template <int D, int BITS>
struct RerankKey {
    static constexpr int SW = D / 32, MW = D * BITS / 32, PW = D / QUANT_GROUP;
    u32 sign[SW], mag[MW], par[PW];
    SIKV_DEV void load(const SikvParams& p, long long row) {
        load_words<SW>(plane_row(p, SIKV_PLANE_SIGN, row), sign);
        load_words<MW>(plane_row(p, SIKV_PLANE_KMAG, row), mag);
        load_words<PW>(plane_row(p, SIKV_PLANE_KPAR, row), par);
    }
    // qbar . k'^ in channel order (decode_key's rounding steps, one by one).
    SIKV_DEV float dot(const float* qbar, const float* scale) const {
        float acc = 0.0f;
        #pragma unroll
        for (int g = 0; g < D / 32; ++g) {
            const float delta = half_bits_to_f32((u16)(par[g] & 0xffffu));
            const float zero = half_bits_to_f32((u16)(par[g] >> 16));
            #pragma unroll
            for (int j4 = 0; j4 < 32; j4 += 4) {
                const int c0 = g * 32 + j4;
                const float4 q4 = *reinterpret_cast<const float4*>(qbar + c0);
                const float4 a4 = *reinterpret_cast<const float4*>(scale + c0);
                const float qv[4] = {q4.x, q4.y, q4.z, q4.w}, av[4] = {a4.x, a4.y, a4.z, a4.w};
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = j4 + e, bit = (g * 32 + j) * BITS;
                    const u32 code = (mag[bit / 32] >> (bit % 32)) & ((1u << BITS) - 1u);
                    const float m = add_rn(mul_rn((float)code, delta), zero);
                    const float xh = ((sign[g] >> j) & 1u) ? m : -m;
                    acc = add_rn(acc, mul_rn(qv[e], mul_rn(xh, av[e])));
                }
            }
        }
        return acc;
    }
};

// 2-bit keys (reference/rerank.rs, RerankQuery): per group of 32 channels
// delta * sum(+-code qa) + zero * sum(+-qa), qa_c = qbar_c a_c, each signed sum over a nibble
// of channels 2 P[m & signs] - P[m] from the nibble's 16 subset sums P (`sub`, 64 bytes per
// nibble). Five lookups per nibble replace four channel decodes. A lookup is a byte permute
// (offset into place), a load and an add, as in lut_sum; the bank rule is lut_sum's. A
// group's sum of P[15] is read here (broadcast loads) rather than made by a few threads
// before a second barrier, which would lengthen the block's prologue.
template <int D>
SIKV_DEV float rerank_dot2(const u32* sign, const u32* mag, const u32* par, const float* sub) {
    const char* base = reinterpret_cast<const char*>(sub);
    float acc = 0.0f;
    #pragma unroll
    for (int g = 0; g < D / 32; ++g) {
        float full = 0.0f;
        #pragma unroll
        for (int s = 8 * g; s < 8 * g + 8; ++s) full = add_rn(full, sub[s * CENTROIDS + CENTROIDS - 1]);
        float e = 0.0f, a0 = 0.0f, p0 = 0.0f, a1 = 0.0f, p1 = 0.0f;
        #pragma unroll
        for (int hw = 0; hw < 2; ++hw) {
            // Byte j of these words: 4 x the nibble (4 channels) 8g + 4hw + j's low code bits
            // (lo), high code bits (hi) and signs (sg).
            const u32 x = mag[2 * g + hw];
            u32 lo = x & 0x55555555u, hi = (x >> 1) & 0x55555555u;
            lo = (lo | (lo >> 1)) & 0x33333333u;
            hi = (hi | (hi >> 1)) & 0x33333333u;
            lo = ((lo | (lo >> 2)) & 0x0F0F0F0Fu) << 2;
            hi = ((hi | (hi >> 2)) & 0x0F0F0F0Fu) << 2;
            u32 sg = (sign[g] >> (16 * hw)) & 0xFFFFu;
            sg = (sg | (sg << 8)) & 0x00FF00FFu;
            sg = ((sg | (sg << 4)) & 0x0F0F0F0Fu) << 2;
            const u32 los = lo & sg, his = hi & sg;
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                const char* t = base + (8 * g + 4 * hw + j) * CENTROIDS * 4;
                const u32 sel = 0x4440u | (u32)j;
                auto at = [&](u32 w) { return *reinterpret_cast<const float*>(t + __byte_perm(w, 0u, sel)); };
                e = add_rn(e, at(sg));
                a0 = add_rn(a0, at(los));
                p0 = add_rn(p0, at(lo));
                a1 = add_rn(a1, at(his));
                p1 = add_rn(p1, at(hi));
            }
        }
        const float signed_sum = add_rn(add_rn(e, e), -full);
        const float s0 = add_rn(add_rn(a0, a0), -p0), s1 = add_rn(add_rn(a1, a1), -p1);
        const float coded = add_rn(s0, add_rn(s1, s1));
        const float delta = half_bits_to_f32((u16)(par[g] & 0xffffu));
        const float zero = half_bits_to_f32((u16)(par[g] >> 16));
        acc = add_rn(acc, add_rn(mul_rn(delta, coded), mul_rn(zero, signed_sum)));
    }
    return acc;
}

// rerank_dot2's table from qbar and scale (shared memory; a barrier follows): D/4 x 16 subset
// sums, each in channel order from 0.
template <int D>
SIKV_DEV void rerank_tables(const float* qbar, const float* scale, float* sub) {
    for (int e = threadIdx.x; e < (D / 4) * CENTROIDS; e += blockDim.x) {
        const int s = e / CENTROIDS, m = e % CENTROIDS;
        float t = 0.0f;
        #pragma unroll
        for (int i = 0; i < 4; ++i)
            if ((m >> i) & 1) t = add_rn(t, mul_rn(qbar[4 * s + i], scale[4 * s + i]));
        sub[e] = t;
    }
}

// r: the query row (its survivors, keys and query), b: its sequence (page table). The query,
// the scales and (2-bit keys) the subset-sum tables are made first, then the grid dependency:
// none of them is written by the select's kernels, so a block that starts while the final
// select runs has them ready when the list is (its survivors' chain of loads, list entry then
// page then plane rows, follows the wait). Made after the plane-row gathers had been issued,
// the query's loads waited behind them (a quarter of the kernel's stall samples at 128K batch 8).
template <int D, typename T, int BITS, bool MEAN>
SIKV_DEV void rerank_score_bits(const SikvParams& p, int r, int b, int h, int slot, float* qbar, float* scale) {
    typedef typename Storage<T>::type S;
    const long long rowid = (long long)r * p.num_kv_heads + h;
    u8* rec = state_record(p, slot, h);
    const int prompt_len = p.force_generated ? state_meta(p, rec)[META_PROMPT_LEN] : 0;
    load_qbar<D, T, MEAN>(p, r, h, qbar);
    for (int c = threadIdx.x; c < D; c += blockDim.x) scale[c] = reinterpret_cast<const float*>(rec + p.off_scale)[c];
    __syncthreads();
    __shared__ __align__(16) float sub[BITS == 2 ? (D / 4) * CENTROIDS : 1];
    if constexpr (BITS == 2) {
        rerank_tables<D>(qbar, scale, sub);
        __syncthreads();
    }
    // The sequence's page list (an input of the call) before the wait, so that a survivor's
    // page is one load after its list entry instead of two.
    const int* pages = seq_pages(p, b);
    // The stage-1 list and its count: the final select's (the launch just ahead). The entry
    // is loaded beside the count, not after it: the final select writes every entry of the
    // list (-1 past the count), so the chain after the wait is list, page, plane rows.
    sikv_grid_dependency();
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const int entry = i < p.stage1_max ? reinterpret_cast<const int*>(p.ws_list)[rowid * p.stage1_max + i] : -1;
    const int n1 = reinterpret_cast<const int*>(p.ws_list_n)[2 * rowid];
    if (i >= n1) return;
    const int pos = entry;
    const bool forced = p.force_generated && pos >= prompt_len;
    // Page outside the pool: row -1 (fault raised), no candidate, like stage 1's key 0.
    const long long row = !forced ? row_index_in(p, pages, h, pos) : -1;
    u32 out = 0u;
    if (forced) {
        out = score_key(SIKV_INF);
    } else if (row >= 0) {
        float acc = 0.0f;
        if constexpr (BITS == 16) {
            const S* kf = reinterpret_cast<const S*>(plane_row(p, SIKV_PLANE_KFULL, row));
            for (int c0 = 0; c0 < D; c0 += 8) {
                float kv[8];
                load_vec<S, 8>(kf + c0, kv);
                #pragma unroll
                for (int j = 0; j < 8; ++j) acc = add_rn(acc, mul_rn(qbar[c0 + j], kv[j]));
            }
        } else {
            RerankKey<D, BITS> key;
            key.load(p, row);
            if constexpr (BITS == 2) acc = rerank_dot2<D>(key.sign, key.mag, key.par, sub);
            else acc = key.dot(qbar, scale);
        }
        out = score_key(acc);
    }
    reinterpret_cast<u32*>(p.ws_keys2)[rowid * p.stage1_max + i] = out;
}

// MEAN: a mean-query select (entry sikv_rerank_score_mean; row r is sequence r).
template <int D, typename T, bool MEAN>
SIKV_DEV void rerank_score_body(const SikvParams& p) {
    const int r = blockIdx.z, h = blockIdx.y;
    // (One query row per sequence reads the slot alone, as before rows existed: the length
    // would be one more dependent load in this prologue.)
    int b = r, slot;
    if (p.row_offsets) {
        const QueryRow qr = query_row(p, r);
        b = qr.seq;
        slot = qr.slot;
    } else {
        slot = batch_slot(p, r);
    }
    // Stage 1 saw the same rows, slot and page table: a bad row or slot left n1 = 0 (nothing
    // to score), a bad page key 0.
    if (slot < 0) return;
    __shared__ __align__(16) float qbar[D];
    __shared__ __align__(16) float scale[D];
    switch (p.key_bits) {
        case 2: rerank_score_bits<D, T, 2, MEAN>(p, r, b, h, slot, qbar, scale); break;
        case 4: rerank_score_bits<D, T, 4, MEAN>(p, r, b, h, slot, qbar, scale); break;
        default: rerank_score_bits<D, T, 16, MEAN>(p, r, b, h, slot, qbar, scale); break;
    }
}
template <int D, typename T>
SIKV_DEV void sikv_rerank_score_impl(const SikvParams& p) {
    rerank_score_body<D, T, false>(p);
}
SIKV_ENTRIES_D_T_LATE_WAIT(sikv_rerank_score, RERANK_THREADS)
template <int D, typename T>
SIKV_DEV void sikv_rerank_score_mean_impl(const SikvParams& p) {
    rerank_score_body<D, T, true>(p);
}
SIKV_ENTRIES_D_T_LATE_WAIT(sikv_rerank_score_mean, RERANK_THREADS)
