// Stage `attend` (+ `combine`) and the dense decode (method §10.5 steps 6-7, §10.6 K5/K6;
// reference/attend.rs, cpu::attend / cpu::attend_dense).
//
// Split-K flash decoding over a token list, all G query heads of a KV group in one block:
//   sparse (attend): list = kept dense entries (dense-index order) ++ the selected positions;
//                    block j < dense_splits handles kept entries [64 j, 64 j + 64)
//                    (ATTEND_SPLIT), the blocks from dense_splits on the selected positions
//                    in turn (sparse_items);
//   dense  (dense.cu): blocks j < dense_splits handle the kept dense entries as above; block
//                    dense_splits + c handles candidate positions [S + c*chunk, ...) of the
//                    sequence (heavy positions skipped), i.e. every candidate, dequantised.
// Each block writes one un-normalised partial (acc, m, l) per query head; empty blocks write
// m = -inf, l = 0. The grid is (num_splits, H_kv, B), fixed by the configuration.
//
// Per tile of TILE = ATTEND_TILE_FLOATS/d tokens: (1) gather + dequantise k'^ and v^ into shared memory
// (16 channels per thread: 4/8/16-byte code loads, 32-byte 16-bit loads), (2) logits for the
// G x TILE (head, token) pairs, one pair per thread, (3) online-softmax update per head,
// (4) P.V with channels across threads and the G accumulators in registers.
#pragma once
#include "common.cuh"
#include "attend_tc.cuh"

// Floats of k (and of v) per tile in shared memory: TILE = ATTEND_TILE_FLOATS / D tokens.
#define ATTEND_TILE_FLOATS 2048
// Positions per heavy bitmap of a candidate chunk (attend_dense).
#define ATTEND_HEAVY_WINDOW 2048
#define MAX_GROUP ATTEND_MAX_GROUP

template <int D>
struct AttendShape {
    static constexpr int TILE = ATTEND_TILE_FLOATS / D;  // tokens per tile
    static constexpr int TPT = D / 16;                  // threads per token in the gather
    static constexpr int CH = D < ATTEND_THREADS ? D : ATTEND_THREADS;  // channel threads in P.V
    static constexpr int HP = ATTEND_THREADS / CH;      // head-parallel factor in P.V
    static constexpr int CPT = D / CH;                  // channels per thread in P.V
    static constexpr int HPT = MAX_GROUP / HP;          // heads per thread in P.V (upper bound)
    // Logits: LT threads per token, each 4 float4 chunks of its k row (interleaved, so the 8
    // lanes of a 16-byte shared-memory phase read 128 consecutive bytes).
    static constexpr int LT = ATTEND_THREADS / TILE;
    // q and k rows: 16-byte aligned; the 16-float pad puts the next token's row (LT = 4 at
    // d = 64: two tokens in one phase) on the other half of the banks.
    static constexpr int KS = D + 16;
    static_assert(TILE <= 32, "the softmax step puts one tile on the lanes of one warp");
    static_assert(ATTEND_THREADS % TILE == 0 && LT <= 32 && D == 16 * LT, "logit lanes: 4 float4 chunks each");
    static_assert(TILE % 4 == 0, "P.V reads the tile's weights as float4");
};

// A token to attend: a dense entry (exact k', v) or a plane row (dequantised), or nothing.
struct TokenRef {
    int kind;  // 0 none, 1 dense entry, 2 plane row
    int dense;
    long long row;
};

// Gathers 16 channels [c0, c0+16) of one token into k (centred key) and v, as f32.
template <int D, typename T>
SIKV_DEV void gather16(const SikvParams& p, const u8* rec, const float* scale, const TokenRef& tr, int c0,
                       float* k, float* v) {
    typedef typename Storage<T>::type S;
    if (tr.kind == 1) {
        load_vec<S, 16>(reinterpret_cast<const S*>(rec + p.off_dense_k) + (long long)tr.dense * D + c0, k);
        load_vec<S, 16>(reinterpret_cast<const S*>(rec + p.off_dense_v) + (long long)tr.dense * D + c0, v);
        return;
    }
    if (tr.kind == 0) {
        #pragma unroll
        for (int i = 0; i < 16; ++i) { k[i] = 0.0f; v[i] = 0.0f; }
        return;
    }
    const int g = c0 / 32;
    if (p.key_bits == 16) {
        load_vec<S, 16>(reinterpret_cast<const S*>(plane_row(p, SIKV_PLANE_KFULL, tr.row)) + c0, k);
    } else {
        const u32 sbits = *reinterpret_cast<const u16*>(plane_row(p, SIKV_PLANE_SIGN, tr.row) + c0 / 8);
        const u32 par = reinterpret_cast<const u32*>(plane_row(p, SIKV_PLANE_KPAR, tr.row))[g];
        const float delta = half_bits_to_f32((u16)(par & 0xffffu)), zero = half_bits_to_f32((u16)(par >> 16));
        const u8* kmag = plane_row(p, SIKV_PLANE_KMAG, tr.row);
        u64 codes;
        if (p.key_bits == 2) codes = *reinterpret_cast<const u32*>(kmag + c0 / 4);
        else codes = *reinterpret_cast<const u64*>(kmag + c0 / 2);
        const int bits = p.key_bits;
        const u64 cm = (1u << bits) - 1;
        #pragma unroll
        for (int i = 0; i < 16; ++i) {
            float mag = (float)((codes >> (i * bits)) & cm) * delta + zero;
            float xh = ((sbits >> i) & 1u) ? mag : -mag;
            k[i] = xh * scale[c0 + i];
        }
    }
    if (p.value_bits == 16) {
        load_vec<S, 16>(reinterpret_cast<const S*>(plane_row(p, SIKV_PLANE_VFULL, tr.row)) + c0, v);
    } else {
        const u32 par = reinterpret_cast<const u32*>(plane_row(p, SIKV_PLANE_VPAR, tr.row))[g];
        const float delta = half_bits_to_f32((u16)(par & 0xffffu)), zero = half_bits_to_f32((u16)(par >> 16));
        const u8* vc = plane_row(p, SIKV_PLANE_VCODE, tr.row);
        u64 codes;
        if (p.value_bits == 2) codes = *reinterpret_cast<const u32*>(vc + c0 / 4);
        else codes = *reinterpret_cast<const u64*>(vc + c0 / 2);
        const int bits = p.value_bits;
        const u64 cm = (1u << bits) - 1;
        #pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = (float)((codes >> (i * bits)) & cm) * delta + zero;
    }
}

// The raw bytes of 16 channels [c0, c0+16) of one token: at most 32 B of key and 32 B of
// value (16-bit rows), far less for code planes. Loading them (load_raw) is split from turning
// them into f32 (decode_raw) so that a block can have the next tile's loads in flight while it
// computes on the current one.
struct Raw16 {
    uint4 r[4];
};

template <int D, typename T>
SIKV_DEV void load_raw(const SikvParams& p, const u8* rec, const TokenRef& tr, int c0, Raw16& raw) {
    typedef typename Storage<T>::type S;
    if (tr.kind == 1) {
        const uint4* k = reinterpret_cast<const uint4*>(reinterpret_cast<const S*>(rec + p.off_dense_k) + (long long)tr.dense * D + c0);
        const uint4* v = reinterpret_cast<const uint4*>(reinterpret_cast<const S*>(rec + p.off_dense_v) + (long long)tr.dense * D + c0);
        raw.r[0] = k[0]; raw.r[1] = k[1]; raw.r[2] = v[0]; raw.r[3] = v[1];
        return;
    }
    if (tr.kind == 0) return;
    const int g = c0 / 32;
    if (p.key_bits == 16) {
        const uint4* k = reinterpret_cast<const uint4*>(reinterpret_cast<const S*>(plane_row(p, SIKV_PLANE_KFULL, tr.row)) + c0);
        raw.r[0] = k[0]; raw.r[1] = k[1];
    } else {
        raw.r[0].x = *reinterpret_cast<const u16*>(plane_row(p, SIKV_PLANE_SIGN, tr.row) + c0 / 8);
        raw.r[0].y = reinterpret_cast<const u32*>(plane_row(p, SIKV_PLANE_KPAR, tr.row))[g];
        const u8* kmag = plane_row(p, SIKV_PLANE_KMAG, tr.row);
        if (p.key_bits == 2) {
            raw.r[0].z = *reinterpret_cast<const u32*>(kmag + c0 / 4);
            raw.r[0].w = 0u;
        } else {
            const uint2 w = *reinterpret_cast<const uint2*>(kmag + c0 / 2);
            raw.r[0].z = w.x; raw.r[0].w = w.y;
        }
    }
    if (p.value_bits == 16) {
        const uint4* v = reinterpret_cast<const uint4*>(reinterpret_cast<const S*>(plane_row(p, SIKV_PLANE_VFULL, tr.row)) + c0);
        raw.r[2] = v[0]; raw.r[3] = v[1];
    } else {
        raw.r[2].x = reinterpret_cast<const u32*>(plane_row(p, SIKV_PLANE_VPAR, tr.row))[g];
        const u8* vc = plane_row(p, SIKV_PLANE_VCODE, tr.row);
        if (p.value_bits == 2) {
            raw.r[2].y = *reinterpret_cast<const u32*>(vc + c0 / 4);
            raw.r[2].z = 0u;
        } else {
            const uint2 w = *reinterpret_cast<const uint2*>(vc + c0 / 2);
            raw.r[2].y = w.x; raw.r[2].z = w.y;
        }
    }
}

// 16 16-bit values held in two uint4 -> f32.
template <typename S>
SIKV_DEV void unpack16(const uint4& a, const uint4& b, float* dst) {
    const S* ea = reinterpret_cast<const S*>(&a);
    const S* eb = reinterpret_cast<const S*>(&b);
    #pragma unroll
    for (int j = 0; j < 8; ++j) { dst[j] = to_f32(ea[j]); dst[8 + j] = to_f32(eb[j]); }
}

// k (centred key) and v of the 16 channels whose raw bytes load_raw fetched, as f32 (the same
// arithmetic as the dequantisation in reference/attend.rs: code * delta + zero, signed, * a).
template <int D, typename T>
SIKV_DEV void decode_raw(const SikvParams& p, const float* scale, const TokenRef& tr, int c0, const Raw16& raw,
                         float* k, float* v) {
    typedef typename Storage<T>::type S;
    if (tr.kind == 0) {
        #pragma unroll
        for (int i = 0; i < 16; ++i) { k[i] = 0.0f; v[i] = 0.0f; }
        return;
    }
    if (tr.kind == 1 || p.key_bits == 16) {
        unpack16<S>(raw.r[0], raw.r[1], k);
    } else {
        const u32 sbits = raw.r[0].x, par = raw.r[0].y;
        const float delta = half_bits_to_f32((u16)(par & 0xffffu)), zero = half_bits_to_f32((u16)(par >> 16));
        const u64 codes = ((u64)raw.r[0].w << 32) | raw.r[0].z;
        const int bits = p.key_bits;
        const u64 cm = (1u << bits) - 1;
        #pragma unroll
        for (int i = 0; i < 16; ++i) {
            float mag = (float)((codes >> (i * bits)) & cm) * delta + zero;
            float xh = ((sbits >> i) & 1u) ? mag : -mag;
            k[i] = xh * scale[c0 + i];
        }
    }
    if (tr.kind == 1 || p.value_bits == 16) {
        unpack16<S>(raw.r[2], raw.r[3], v);
    } else {
        const u32 par = raw.r[2].x;
        const float delta = half_bits_to_f32((u16)(par & 0xffffu)), zero = half_bits_to_f32((u16)(par >> 16));
        const u64 codes = ((u64)raw.r[2].z << 32) | raw.r[2].y;
        const int bits = p.value_bits;
        const u64 cm = (1u << bits) - 1;
        #pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = (float)((codes >> (i * bits)) & cm) * delta + zero;
    }
}

template <int D>
struct AttendSmem {
    __align__(16) float q[MAX_GROUP][AttendShape<D>::KS];
    __align__(16) float k[AttendShape<D>::TILE][AttendShape<D>::KS];
    __align__(16) float v[AttendShape<D>::TILE][D];
    __align__(16) float logit[MAX_GROUP][AttendShape<D>::TILE];
    float alpha[MAX_GROUP];
    SoftmaxState state[MAX_GROUP];
    float scale[D];
    int dense_list[ATTEND_SPLIT];
    // Sparse / dense-entry splits: the split's token refs, resolved once up front (the list ->
    // page table -> row chain of dependent loads runs for all items in parallel instead of
    // once per tile).
    long long ref_row[ATTEND_SPLIT];
    int ref_kind[ATTEND_SPLIT];
    int ref_dense[ATTEND_SPLIT];
    u32 heavy_mask[ATTEND_HEAVY_WINDOW / 32];  // candidate chunk bitmap (dense mode)
    u32 scan[33], scan2[33];  // collect_dense's scans, alternating
    int n_dense;
};

// Kept dense entries of query row q with list rank in [lo, lo + ATTEND_SPLIT) ->
// s.dense_list; returns the total number of kept entries. Every thread must call; a barrier
// must come before s.dense_list is read. The scans alternate two buffers and leave out their
// closing barriers (a buffer is written again only after the next scan's barriers): the
// kept-entry splits are the slow blocks of the attend grids, and this is their prologue.
template <int D>
SIKV_DEV int collect_dense(const SikvParams& p, const int* dpos, const QueryRow& q, int lo, AttendSmem<D>& s) {
    int base = 0;
    for (int e0 = 0; e0 < p.dense_cap; e0 += ATTEND_THREADS) {
        int e = e0 + threadIdx.x;
        bool keep = e < p.dense_cap && row_dense_keep(p, e, dpos[e], q);
        u32 total;
        u32* scan = ((e0 / ATTEND_THREADS) & 1) ? s.scan2 : s.scan;
        u32 r = block_excl_scan<ATTEND_THREADS, false>(keep ? 1u : 0u, scan, &total);
        int rank = base + (int)r;
        if (keep && rank >= lo && rank < lo + ATTEND_SPLIT) s.dense_list[rank - lo] = e;
        base += (int)total;
    }
    return base;
}

// The partial of a split with nothing to attend: m = -inf, l = 0, acc = 0 for each of the G
// query heads from hq_base (combine gives it no weight).
template <int D>
SIKV_DEV void write_empty_partial(const SikvParams& p, long long hq_base, int split) {
    float* part_acc = reinterpret_cast<float*>(p.ws_part_acc);
    float* part_ml = reinterpret_cast<float*>(p.ws_part_ml);
    const int tid = threadIdx.x, G = p.group;
    for (int i = tid; i < G * D; i += ATTEND_THREADS) {
        int g = i / D, c = i % D;
        part_acc[((hq_base + g) * p.num_splits + split) * D + c] = 0.0f;
    }
    if (tid < G) {
        part_ml[((hq_base + tid) * p.num_splits + split) * 2 + 0] = SIKV_NEG_INF;
        part_ml[((hq_base + tid) * p.num_splits + split) * 2 + 1] = 0.0f;
    }
}

// attend_dense: positions per candidate chunk of a sequence whose candidates end at `end`.
// The grid has dense_chunks chunks per sequence, sized on the host from max_seq_len and the
// batch; a sequence spreads its live candidates over them (at least dense_min_chunk positions
// each, a multiple of DENSE_CHUNK_ALIGN), so a short sequence under a long max_seq_len keeps
// short chunks and its surplus blocks return at once. dense_chunks * chunk >= end.
SIKV_DEV int dense_chunk_of(const SikvParams& p, int end) {
    int c = (end + p.dense_chunks - 1) / p.dense_chunks;
    c = c < p.dense_min_chunk ? p.dense_min_chunk : c;
    return (c + DENSE_CHUNK_ALIGN - 1) / DENSE_CHUNK_ALIGN * DENSE_CHUNK_ALIGN;
}

// List items per tensor-core split (the splits from dense_splits on): attend_span
// ATTEND_SPLITs. A selection of this call's select (p.attend_early) holds at most the budget of
// the row's candidate range, so `sel_max` (that budget) is known before the wait: such a row's
// selected tokens spread over all the grid's tensor-core splits in whole ATTEND_SPLITs, instead
// of filling the first splits span by span while the others return (a short sequence under a
// grid sized for budget_max: at 8K, batch 8, span 7, two splits of 448 and 4 items).
SIKV_DEV int tc_split_items(const SikvParams& p, int sel_max) {
    const int most = p.attend_span * ATTEND_SPLIT;
    if (!p.attend_early || p.attend_span <= 1) return most;
    const int nsel = p.num_splits - p.dense_splits;
    const int per = sel_max > 0 ? (sel_max + nsel - 1) / nsel : 1;
    const int n = (per + ATTEND_SPLIT - 1) / ATTEND_SPLIT * ATTEND_SPLIT;
    return n < most ? n : most;
}

// Entries per kept split (SikvParams::kept_split, workspace::kept_split_len; at most
// ATTEND_SPLIT, the kept list's window in shared memory).
SIKV_DEV int kept_split_len(const SikvParams& p) {
    return p.kept_split > 0 && p.kept_split <= ATTEND_SPLIT ? p.kept_split : ATTEND_SPLIT;
}

// The sparse attend's list items [lo, hi) of `split` (the list: the nd kept dense entries, then
// the selection; total of them). The splits below dense_splits hold kept entries alone,
// kept_split_len each; the others hold selected tokens alone, from list item nd on, tc_items
// each (tc_split_items: tensor-core splits, which walk several tiles per warp; the host sets a
// span above 1 only for shapes that take them; ATTEND_SPLIT otherwise). No split holds both: a
// split of kept entries never waits for the selection, so it runs while the select's last
// kernel does, and a split of selected tokens never runs the CUDA-core tiles of kept entries
// after the wait.
SIKV_DEV void sparse_items(const SikvParams& p, int split, int nd, int total, int tc_items, int* lo, int* hi) {
    int l, e;
    if (split < p.dense_splits) {
        const int ks = kept_split_len(p);
        l = split * ks;
        e = l + ks < nd ? l + ks : nd;
    } else {
        const int n = p.attend_span > 1 ? tc_items : ATTEND_SPLIT;
        l = nd + (split - p.dense_splits) * n;
        e = l + n < total ? l + n : total;
    }
    *lo = l;
    *hi = e;
}

// MEAN: the selection is per sequence (p.rows_mean; entry sikv_attend_mean), each row keeping
// the positions below its bound. A separate entry: the run-time form changed the scheduling of
// the whole one-row attend (a larger step at batch 8 with every stage's own time unchanged;
// H200, eleventh session, runs 1 and 2).
// s: the block's shared memory (attend_body's own; the dense decode's shares its bytes with
// the candidate chunks').
template <int D, typename T, bool DENSE, bool MEAN = false>
SIKV_DEV void attend_body_in(const SikvParams& p, AttendSmem<D>& s) {
    typedef AttendShape<D> Sh;
    const int r = blockIdx.z, h = blockIdx.y, split = blockIdx.x;
    const int G = p.group;
    const int tid = threadIdx.x;
    // The dense decode takes one query row per sequence (its launchers refuse several); the
    // row lookup of several made its d = 256 instance spill more.
    const QueryRow qr = DENSE ? single_row(p, r) : query_row(p, r);
    const int b = qr.seq, slot = qr.slot;
    const long long rowid = (long long)r * p.num_kv_heads + h;
    const bool dense_mode = DENSE;
    float* part_acc = reinterpret_cast<float*>(p.ws_part_acc);
    float* part_ml = reinterpret_cast<float*>(p.ws_part_ml);
    const int hq0 = h * G;
    const long long hq_base = (long long)r * p.num_kv_heads * G + hq0;
    // A split with nothing to attend writes the empty partial (m = -inf, l = 0, acc = 0); a
    // row with a bad slot is all empty splits (its output becomes zeros).
    auto write_empty = [&]() { write_empty_partial<D>(p, hq_base, split); };
    if (slot < 0) {
        write_empty();
        return;
    }
    const u8* rec = state_record(p, slot, h);
    const int* dpos = reinterpret_cast<const int*>(rec + p.off_dense_pos);

    // What this block covers: items [lo, hi) of the dense list (+ selected), or a chunk of
    // candidate positions [plo, phi).
    int lo = 0, hi = 0, nd = 0, plo = 0, phi = 0;
    bool chunk = dense_mode && split >= p.dense_splits;
    const int* sel = nullptr;
    if (!chunk) {
        // A split of several ATTEND_SPLITs is the tensor-core path's: here only when that path
        // declined it for a bad count (its output is not defined then; the fault is raised).
        // Such splits waited for the selection before they came here.
        if (!dense_mode && p.attend_span > 1 && split >= p.dense_splits) {
            const int cnt = reinterpret_cast<const int*>(p.counts)[rowid];
            if ((cnt < 0 || cnt > p.budget_max) && tid == 0) raise_fault(p, FAULT_COUNT);
            write_empty();
            return;
        }
        // (The dense decode's list splits are all below dense_splits.)
        const bool kept = split < p.dense_splits;
        // A split of selected tokens collects no kept entry (no rank reaches dense_cap), only
        // their count.
        nd = collect_dense<D>(p, dpos, qr, kept ? split * kept_split_len(p) : p.dense_cap, s);
        int total = nd;
        // The selection (count, indices) is read after the grid dependency, by every split of
        // selected tokens (each reports a bad count). A split of kept dense entries (its items
        // and bounds do not depend on the count) reads none of it.
        if (!kept) {  // uniform over the block
            sikv_grid_wait();
            // MEAN: the selection is the row's sequence's (the select ran one row per sequence).
            const long long selid = MEAN ? (long long)b * p.num_kv_heads + h : rowid;
            int cnt = reinterpret_cast<const int*>(p.counts)[selid];
            if (cnt < 0 || cnt > p.budget_max) {
                if (tid == 0) raise_fault(p, FAULT_COUNT);
                cnt = cnt < 0 ? 0 : p.budget_max;
            }
            total += cnt;
            sel = reinterpret_cast<const int*>(p.indices) + selid * p.budget_max;
        }
        sparse_items(p, split, nd, total, ATTEND_SPLIT, &lo, &hi);
    } else {
        const int end = row_cand_end(p, qr);
        const int chunk_len = dense_chunk_of(p, end);
        plo = p.n_sink + (split - p.dense_splits) * chunk_len;
        phi = plo + chunk_len < end ? plo + chunk_len : end;
    }
    const bool empty = chunk ? (plo >= phi) : (lo >= hi);
    if (empty) {
        write_empty();
        return;
    }

    // Prologue: q of the G heads, the scale, the softmax state.
    {
        const T* q = reinterpret_cast<const T*>(p.q);
        for (int i = tid; i < G * D; i += ATTEND_THREADS) {
            int g = i / D, c = i % D;
            s.q[g][c] = to_f32(q[(hq_base + g) * D + c]);
        }
        for (int c = tid; c < D; c += ATTEND_THREADS) s.scale[c] = reinterpret_cast<const float*>(rec + p.off_scale)[c];
        if (tid < MAX_GROUP) s.state[tid].init();
    }
    float acc[Sh::HPT][Sh::CPT];
    #pragma unroll
    for (int j = 0; j < Sh::HPT; ++j)
        #pragma unroll
        for (int i = 0; i < Sh::CPT; ++i) acc[j][i] = 0.0f;
    const int pv_c = tid % Sh::CH, pv_g = tid / Sh::CH;
    const float sm_scale = p.softmax_scale;

    if (!chunk) {
        __syncthreads();  // dense_list complete
        for (int it = tid; it < hi - lo; it += ATTEND_THREADS) {
            const int item = lo + it;
            int kind = 0, dense = 0;
            long long row = 0;
            if (item < nd) {
                kind = 1;
                dense = s.dense_list[it];
            } else {
                int pos = sel[item - nd];
                if (pos >= 0 && pos < qr.bound) {
                    row = row_index(p, b, h, pos);
                    kind = row < 0 ? 0 : 2;
                } else if (!MEAN || pos < 0 || pos >= qr.len) {
                    raise_fault(p, FAULT_SELECTED_POS);
                }  // else: the sequence's selection (MEAN) holds a later row's token: skipped
            }
            s.ref_kind[it] = kind;
            s.ref_dense[it] = dense;
            s.ref_row[it] = row;
        }
    }
    // Token ranges walked in tiles: list items or positions.
    const int first = chunk ? plo : lo;
    const int last = chunk ? phi : hi;
    const int tt = tid / Sh::TPT, c0 = (tid % Sh::TPT) * 16;  // this thread's token, channels
    // List splits: the token ref of list item `item` (resolved above), none past the split.
    auto list_ref = [&](int item) {
        TokenRef r;
        r.kind = 0; r.dense = 0; r.row = 0;
        if (item < last) {
            r.kind = s.ref_kind[item - lo];
            r.dense = s.ref_dense[item - lo];
            r.row = s.ref_row[item - lo];
        }
        return r;
    };
    // The sparse attend keeps the next tile's loads in flight during the current tile's math
    // (PIPE); the dense decode does not: its many candidate chunks keep the SMs busy anyway,
    // and the extra live registers cost it occupancy (measured ~10% slower with PIPE).
    constexpr bool PIPE = !DENSE;
    TokenRef tr;
    Raw16 raw;
    if (PIPE) {  // (PIPE implies a list split: the sparse attend has no candidate chunks)
        __syncthreads();  // token refs complete
        tr = list_ref(first + tt);
        load_raw<D, T>(p, rec, tr, c0, raw);
    }
    for (int base = first; base < last; base += Sh::TILE) {
        if (chunk && ((base - plo) % ATTEND_HEAVY_WINDOW) == 0) {
            // Heavy positions of the next ATTEND_HEAVY_WINDOW positions -> bitmap.
            __syncthreads();
            for (int i = tid; i < ATTEND_HEAVY_WINDOW / 32; i += ATTEND_THREADS) s.heavy_mask[i] = 0;
            __syncthreads();
            for (int i = tid; i < p.n_heavy; i += ATTEND_THREADS) {
                int hp = dpos[p.n_sink + i] - base;
                if (hp >= 0 && hp < ATTEND_HEAVY_WINDOW) atomicOr(&s.heavy_mask[hp >> 5], 1u << (hp & 31));
            }
        }
        __syncthreads();
        // (1) gather: the sparse attend decodes the bytes loaded during the previous tile and
        // starts the next tile's loads; the dense decode loads and decodes here.
        {
            float kf[16], vf[16];
            if (!PIPE) {
                const int item = base + tt;
                if (chunk) {
                    tr.kind = 0; tr.dense = 0; tr.row = 0;
                    if (item < last) {
                        int off = (item - plo) % ATTEND_HEAVY_WINDOW;
                        if (!((s.heavy_mask[off >> 5] >> (off & 31)) & 1u)) {
                            tr.row = row_index(p, b, h, item);
                            tr.kind = tr.row < 0 ? 0 : 2;
                        }
                    }
                } else {
                    tr = list_ref(item);
                }
                gather16<D, T>(p, rec, s.scale, tr, c0, kf, vf);
            } else {
                decode_raw<D, T>(p, s.scale, tr, c0, raw, kf, vf);
            }
            #pragma unroll
            for (int i = 0; i < 16; i += 4) {
                *reinterpret_cast<float4*>(&s.k[tt][c0 + i]) = make_float4(kf[i], kf[i + 1], kf[i + 2], kf[i + 3]);
                *reinterpret_cast<float4*>(&s.v[tt][c0 + i]) = make_float4(vf[i], vf[i + 1], vf[i + 2], vf[i + 3]);
            }
            if (c0 == 0) s.k[tt][D] = tr.kind == 0 ? 0.0f : 1.0f;  // pad column doubles as "valid"
            if (PIPE) {
                tr = list_ref(base + Sh::TILE + tt);
                load_raw<D, T>(p, rec, tr, c0, raw);
            }
        }
        __syncthreads();
        // (2) logits: LT threads per token, each holding 16 channels of its k in registers for
        // all G heads (one shared-memory load of k per tile instead of one per head and
        // channel), partial dots summed across the LT lanes with shuffles.
        {
            const int t = tid / Sh::LT, cs = tid % Sh::LT;
            const bool valid = s.k[t][D] != 0.0f;
            float4 kc[4];
            #pragma unroll
            for (int u = 0; u < 4; ++u) kc[u] = *reinterpret_cast<const float4*>(&s.k[t][4 * (cs + u * Sh::LT)]);
            for (int g = 0; g < G; ++g) {
                float d0 = 0.0f, d1 = 0.0f;
                #pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const float4 qv = *reinterpret_cast<const float4*>(&s.q[g][4 * (cs + u * Sh::LT)]);
                    d0 += qv.x * kc[u].x + qv.y * kc[u].y;
                    d1 += qv.z * kc[u].z + qv.w * kc[u].w;
                }
                float dot = d0 + d1;
                #pragma unroll
                for (int o = Sh::LT / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                if (cs == 0) s.logit[g][t] = valid ? sm_scale * dot : SIKV_NEG_INF;
            }
        }
        __syncthreads();
        // (3) online softmax, one warp per head (lanes over the tile's tokens).
        {
            const int warp = tid >> 5, lane = tid & 31;
            for (int g = warp; g < G; g += ATTEND_THREADS / 32) {
                const float lg = lane < Sh::TILE ? s.logit[g][lane] : SIKV_NEG_INF;
                SoftmaxState st = s.state[g];
                const float alpha = st.update_max(warp_max(lg));
                // exp(-inf) = 0 for invalid tokens; all 0 while the max is still -inf
                const float e = st.m != SIKV_NEG_INF ? expf(lg - st.m) : 0.0f;
                const float sum = warp_sum(e);
                if (lane < Sh::TILE) s.logit[g][lane] = e;
                __syncwarp();  // every lane has read s.state[g] before lane 0 writes it
                if (lane == 0) {
                    st.update_sum(alpha, sum);
                    s.state[g] = st;
                    s.alpha[g] = alpha;
                }
            }
        }
        __syncthreads();
        // (4) P.V: four tokens at a time, their v values loaded once for all heads and their
        // weights as one float4 per head.
        #pragma unroll
        for (int j = 0; j < Sh::HPT; ++j) {
            const int g = pv_g + j * Sh::HP;
            if (g < G) {
                const float a = s.alpha[g];
                #pragma unroll
                for (int i = 0; i < Sh::CPT; ++i) acc[j][i] *= a;
            }
        }
        #pragma unroll
        for (int t0 = 0; t0 < Sh::TILE; t0 += 4) {
            float vv[Sh::CPT][4];
            #pragma unroll
            for (int i = 0; i < Sh::CPT; ++i)
                #pragma unroll
                for (int u = 0; u < 4; ++u) vv[i][u] = s.v[t0 + u][pv_c + i * Sh::CH];
            #pragma unroll
            for (int j = 0; j < Sh::HPT; ++j) {
                const int g = pv_g + j * Sh::HP;
                if (g < G) {
                    const float4 pl = *reinterpret_cast<const float4*>(&s.logit[g][t0]);
                    #pragma unroll
                    for (int i = 0; i < Sh::CPT; ++i)
                        acc[j][i] += pl.x * vv[i][0] + pl.y * vv[i][1] + pl.z * vv[i][2] + pl.w * vv[i][3];
                }
            }
        }
    }
    __syncthreads();
    #pragma unroll
    for (int j = 0; j < Sh::HPT; ++j) {
        const int g = pv_g + j * Sh::HP;
        if (g < G) {
            #pragma unroll
            for (int i = 0; i < Sh::CPT; ++i) {
                const int c = pv_c + i * Sh::CH;
                part_acc[((hq_base + g) * p.num_splits + split) * D + c] = acc[j][i];
            }
        }
    }
    if (tid < G) {
        part_ml[((hq_base + tid) * p.num_splits + split) * 2 + 0] = s.state[tid].m;
        part_ml[((hq_base + tid) * p.num_splits + split) * 2 + 1] = s.state[tid].l;
    }
}

template <int D, typename T, bool DENSE, bool MEAN = false>
SIKV_DEV void attend_body(const SikvParams& p) {
    __shared__ AttendSmem<D> s;
    attend_body_in<D, T, DENSE, MEAN>(p, s);
}
// A sparse split whose 64 list items are all selected tokens, on tensor cores (attend_tc.cuh):
// one tile of 16 per warp. Returns false, having written nothing, for what attend_body does (a
// split holding kept dense entries, a bad slot or count); it has waited for the grid
// dependency by then. Its prologue (the kept dense entries' count, the query) reads nothing
// of the selection and runs before the wait (with p.attend_early, while the select's last
// kernel runs; otherwise the entry has waited already).
// ROWS: several query rows per sequence (p.row_offsets, a selection per row): grid row
// blockIdx.z is a query row, attending its sequence's positions below the row's causal bound.
// The one-row kernels decline such calls: the row lookup beside the tiles made them spill, so
// rows have kernels of their own (sikv_attend_rows*).
template <int D, typename T, int BITS, bool ROWS = false>
SIKV_DEV bool sparse_tc_split(const SikvParams& p, TcSmem<D>& s) {
    typedef TcShape<D, BITS> Sh;
    if (!ROWS && p.row_offsets) {
        sikv_grid_wait();
        return false;
    }
    const int r = blockIdx.z, h = blockIdx.y, split = blockIdx.x, tid = threadIdx.x;
    int b, slot, len, bound;
    if constexpr (ROWS) {
        const QueryRow qr = query_row(p, r);
        b = qr.seq;
        slot = qr.slot;
        len = qr.len;
        bound = qr.bound;
    } else {
        b = r;
        len = row_seq(p, b, &slot);
        bound = len;
    }
    if (slot < 0) {
        sikv_grid_wait();
        return false;
    }
    const long long rowid = (long long)r * p.num_kv_heads + h;
    const u8* rec = state_record(p, slot, h);
    const int* dpos = reinterpret_cast<const int*>(rec + p.off_dense_pos);
    int kept = 0;
    for (int e = tid; e < p.dense_cap; e += ATTEND_THREADS) {
        const int pos = dpos[e];
        kept += (ROWS ? pos < bound && dense_keep(p, e, pos, len) : dense_keep(p, e, pos, len)) ? 1 : 0;
    }
    kept = warp_sum_int(kept);
    if ((tid & 31) == 0) s.count[tid >> 5] = kept;
    __syncthreads();
    int nd = 0;
    #pragma unroll
    for (int w = 0; w < Sh::WARPS; ++w) nd += s.count[w];
    // What this call's select can have chosen at most (budget_k is monotone); lo does not
    // depend on the count. tc_items lives across the prologue: the 4-bit and rows kernels
    // spill 4 more bytes for it, stored and loaded once per block.
    const int sel_max = budget_k(p, cand_end(p, len) - p.n_sink);
    const int sel_bound = nd + sel_max;
    const int tc_items = tc_split_items(p, sel_max);
    int lo, hi;
    sparse_items(p, split, nd, 0x7fffffff, tc_items, &lo, &hi);
    if (lo < nd) {  // uniform over the block
        sikv_grid_wait();
        __syncthreads();  // s.count read: attend_body's shared memory takes the same bytes
        return false;
    }
    const long long hq_base = (long long)r * p.num_kv_heads * p.group + (long long)h * p.group;
    const float* ascale = reinterpret_cast<const float*>(rec + p.off_scale);
    // A selection of this call's select holds at most the budget of the whole candidate range
    // (budget_k is monotone): splits past it will be empty and skip the query prologue. A
    // caller's own selection may hold more; such a split runs the prologue after the wait.
    // (The checks run twice for such splits rather than w.init at two call sites: that made
    // ptxas spill.)
    //
    // The first tile's positions go out beside the count, one round trip instead of two in
    // series, when the selection is this call's own (p.attend_early): its select writes every
    // entry up to budget_max (-1 past the count), so each entry read here was written by this
    // call. A caller's selection is read once the count bounds it, and so is a rows call's (the
    // rows kernels spilled 12 bytes more with the early load). Warp w takes list items
    // lo + ATTEND_SPLIT t + 16 w + [0, 16), t = 0, 1, ...; lo does not depend on the count
    // (sparse_items).
    const int* sel = reinterpret_cast<const int*>(p.indices) + rowid * p.budget_max;
    const int i0 = lo + 16 * (tid >> 5) + (tid & 31) - nd;
    int pos0 = -1;
    auto selection_ends_before = [&]() -> int {  // 1: empty split, 0: work, -1: bad count
        sikv_grid_wait();
        const int cnt = reinterpret_cast<const int*>(p.counts)[rowid];
        if (!ROWS && p.attend_early && (tid & 31) < 16 && i0 < p.budget_max) pos0 = sel[i0];
        if (cnt < 0 || cnt > p.budget_max) return -1;
        sparse_items(p, split, nd, nd + cnt, tc_items, &lo, &hi);
        return lo >= hi ? 1 : 0;
    };
    if (lo >= sel_bound) {
        const int e = selection_ends_before();
        if (e < 0) {
            __syncthreads();  // as above
            return false;
        }
        if (e > 0) {
            write_empty_partial<D>(p, hq_base, split);
            return true;
        }
    }
    TcWarp<D, T, BITS> w;
    w.init(p, s, hq_base, ascale, []() {});
    // The sequence's page list (an input of the call) before the wait: the positions' pages are
    // then one load after the selection instead of two.
    const int* pages = seq_pages(p, b);
    const int e = selection_ends_before();
    if (e < 0) {
        __syncthreads();  // init's shared memory read (attend_body's takes the same bytes)
        return false;
    }
    if (e > 0) {
        write_empty_partial<D>(p, hq_base, split);
        return true;
    }

    // A tile's plane rows (-1: past the split, or a bad position or page, fault raised) are
    // resolved by its first 16 lanes and passed to the lanes that load them; the next tile's
    // gather is in flight while the current one is computed.
    const int first = lo + 16 * w.warp;
    const int nt = hi > first ? (hi - first + ATTEND_SPLIT - 1) / ATTEND_SPLIT : 0;
    auto gather = [&](int t, TcRaw<D, BITS>& raw, bool first_tile) -> u32 {
        const int item = first + ATTEND_SPLIT * t + w.lane;
        long long row = -1;
        if (w.lane < 16 && item < hi) {
            const int pos = !ROWS && first_tile && p.attend_early ? pos0 : sel[item - nd];
            if (pos >= 0 && pos < bound) row = row_index_in(p, pages, h, pos);
            else raise_fault(p, FAULT_SELECTED_POS);
        }
        const u32 valid = __ballot_sync(0xffffffffu, row >= 0) & 0xffffu;
        long long rk[2], rv[4];
        #pragma unroll
        for (int nb = 0; nb < 2; ++nb) rk[nb] = __shfl_sync(0xffffffffu, row, w.key_token(nb));
        #pragma unroll
        for (int u = 0; u < 4; ++u) rv[u] = __shfl_sync(0xffffffffu, row, w.value_token(u));
        w.load(rk, rv, raw);
        return valid;
    };
    TcRaw<D, BITS> ra, rb;
    u32 va = nt > 0 ? gather(0, ra, true) : 0u, vb = 0u;
    for (int t = 0; t < nt; t += 2) {
        if (t + 1 < nt) vb = gather(t + 1, rb, false);
        w.tile(ra, va);
        if (t + 1 >= nt) break;
        if (t + 2 < nt) va = gather(t + 2, ra, false);
        w.tile(rb, vb);
    }
    w.finish(p, s, hq_base, split);
    return true;
}

// Splits below dense_splits take attend_body, which waits for the selection only when the
// split holds selected items (splits of kept dense entries alone read nothing of it); the
// others take the tensor-core tiles of width BITS where the shape allows (waiting after their
// prologue) and otherwise wait first.
template <int D, typename T, int BITS, bool ROWS = false>
SIKV_DEV void attend_splits(const SikvParams& p) {
    // attend_body's and the tensor-core splits' shared memory in one place: a block ends in
    // one of them (a tensor-core split that declines has left its bytes behind a barrier).
    constexpr size_t TC = TcShape<D>::OK ? sizeof(TcSmem<D>) : 0;
    constexpr size_t ARENA = TC > sizeof(AttendSmem<D>) ? TC : sizeof(AttendSmem<D>);
    __shared__ __align__(16) u8 arena[ARENA];
    AttendSmem<D>& as = *reinterpret_cast<AttendSmem<D>*>(arena);
    if ((int)blockIdx.x < p.dense_splits) {
        attend_body_in<D, T, false>(p, as);
        return;
    }
    if constexpr (TcShape<D>::OK) {
        if (tc_shape_ok<D, BITS>(p) && sparse_tc_split<D, T, BITS, ROWS>(p, *reinterpret_cast<TcSmem<D>*>(arena))) return;
    }
    sikv_grid_wait();
    attend_body_in<D, T, false>(p, as);
}
template <int D, typename T>
SIKV_DEV void sikv_attend_impl(const SikvParams& p) {
    attend_splits<D, T, 2>(p);
}
SIKV_ENTRIES_D_T_EARLY_MINB(sikv_attend, ATTEND_THREADS, 4)
// Planes of 4-bit key magnitudes and values (4+1): the launcher takes this kernel instead.
template <int D, typename T>
SIKV_DEV void sikv_attend_b4_impl(const SikvParams& p) {
    attend_splits<D, T, 4>(p);
}
SIKV_ENTRIES_D_T_EARLY_MINB(sikv_attend_b4, ATTEND_THREADS, 4)
// Several query rows per sequence, selected per row (p.row_offsets): the launcher takes these.
template <int D, typename T>
SIKV_DEV void sikv_attend_rows_impl(const SikvParams& p) {
    attend_splits<D, T, 2, true>(p);
}
SIKV_ENTRIES_D_T_EARLY_MINB(sikv_attend_rows, ATTEND_THREADS, 4)
template <int D, typename T>
SIKV_DEV void sikv_attend_rows_b4_impl(const SikvParams& p) {
    attend_splits<D, T, 4, true>(p);
}
SIKV_ENTRIES_D_T_EARLY_MINB(sikv_attend_rows_b4, ATTEND_THREADS, 4)

// The attend of a mean-query selection (p.rows_mean): several rows per sequence reading their
// sequence's selection, which holds later rows' tokens to skip; the tensor-core splits take a
// row's own selection only, so these splits are attend_body's.
template <int D, typename T>
SIKV_DEV void sikv_attend_mean_impl(const SikvParams& p) {
    if ((int)blockIdx.x >= p.dense_splits) sikv_grid_wait();
    attend_body<D, T, false, true>(p);
}
SIKV_ENTRIES_D_T_EARLY_MINB(sikv_attend_mean, ATTEND_THREADS, 4)

// Combine: log-sum-exp merge of the num_splits partials of one (sequence, query head)
// (reference/attend.rs merge_splits): M = max m_j, w_j = exp(m_j - M), out = sum w_j acc_j /
// sum w_j l_j, zeros when empty. grid (H_q, B), block COMBINE_THREADS.
//
// Latency, not bytes, bounds it (a few hundred KB at most): every partial is loaded once, and
// the accumulator sum runs as SG independent groups of splits per channel quad (16-byte loads,
// no load behind a branch), merged through shared memory, instead of one dependent chain of
// num_splits loads per channel.
// dense: a routed decode whose dense path ran (its entry reads the route word).
template <int D, typename T>
SIKV_DEV void sikv_combine_impl(const SikvParams& p, bool dense) {
    constexpr int QD = D / 4;                 // threads per channel row (one float4 each)
    constexpr int SG = COMBINE_THREADS / QD;  // split groups summed in parallel
    static_assert(COMBINE_THREADS % QD == 0, "channel quads must tile the block");
    __shared__ float w[COMBINE_MAX_SPLITS];
    __shared__ float l_part[COMBINE_MAX_SPLITS];
    __shared__ __align__(16) float red[SG][D];
    __shared__ float wred[COMBINE_THREADS / 32];
    const int r = blockIdx.y, hq = blockIdx.x, tid = threadIdx.x;
    // A routed decode's combine serves whichever path ran (their partial counts differ).
    const int NS = dense ? p.route_dense_splits : p.num_splits;
    const long long base = (long long)r * p.num_kv_heads * p.group + hq;
    const float2* ml = reinterpret_cast<const float2*>(p.ws_part_ml) + base * NS;
    const float* pacc = reinterpret_cast<const float*>(p.ws_part_acc) + base * NS * D;
    // Thread (quad q, group sg) sums the accumulators of splits sg, sg + SG, ... Its first PRE
    // go out here, beside the partials' m and l: they do not wait for the weights, so the two
    // loads are one round trip instead of two in series.
    const int q = tid % QD, sg = tid / QD;
    const float4* acc4 = reinterpret_cast<const float4*>(pacc) + q;
    constexpr int PRE = 4;
    float4 xp[PRE];
    #pragma unroll
    for (int u = 0; u < PRE; ++u) {
        const int jj = sg + u * SG;
        xp[u] = jj < NS ? acc4[(long long)jj * QD] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float mx = SIKV_NEG_INF;
    for (int j = tid; j < NS; j += COMBINE_THREADS) {
        const float2 e = ml[j];
        w[j] = e.x;
        l_part[j] = e.y;
        mx = fmaxf(mx, e.x);
    }
    mx = warp_max(mx);
    if ((tid & 31) == 0) wred[tid >> 5] = mx;
    __syncthreads();
    SoftmaxState st;
    st.m = wred[0];
    #pragma unroll
    for (int i = 1; i < COMBINE_THREADS / 32; ++i) st.m = fmaxf(st.m, wred[i]);
    st.l = 0.0f;
    for (int j = tid; j < NS; j += COMBINE_THREADS) w[j] = st.merge(w[j], l_part[j]);
    const float lsum = warp_sum(st.l);
    __syncthreads();  // every thread has read wred (the max) before it is reused for the sum
    if ((tid & 31) == 0) wred[tid >> 5] = lsum;
    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    __syncthreads();  // w complete
    // (the splits in the order of the loops below: the same sums as without the early loads)
    #pragma unroll
    for (int u = 0; u < PRE; ++u) {
        const int jj = sg + u * SG;
        const float wj = jj < NS ? w[jj] : 0.0f;
        if (wj != 0.0f) {  // an empty split (w = 0) adds nothing, whatever it holds
            a.x += wj * xp[u].x; a.y += wj * xp[u].y; a.z += wj * xp[u].z; a.w += wj * xp[u].w;
        }
    }
    int j = sg + PRE * SG;
    for (; j + 3 * SG < NS; j += 4 * SG) {
        float4 x[4];
        float wj[4];
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
            x[u] = acc4[(long long)(j + u * SG) * QD];
            wj[u] = w[j + u * SG];
        }
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
            if (wj[u] != 0.0f) {  // an empty split (w = 0) adds nothing, whatever it holds
                a.x += wj[u] * x[u].x; a.y += wj[u] * x[u].y; a.z += wj[u] * x[u].z; a.w += wj[u] * x[u].w;
            }
        }
    }
    for (; j < NS; j += SG) {
        const float4 x = acc4[(long long)j * QD];
        const float wj = w[j];
        if (wj != 0.0f) { a.x += wj * x.x; a.y += wj * x.y; a.z += wj * x.z; a.w += wj * x.w; }
    }
    *reinterpret_cast<float4*>(&red[sg][4 * q]) = a;
    __syncthreads();
    float l = 0.0f;
    #pragma unroll
    for (int i = 0; i < COMBINE_THREADS / 32; ++i) l += wred[i];
    T* out = reinterpret_cast<T*>(p.out) + base * D;
    for (int c = tid; c < D; c += COMBINE_THREADS) {
        float v = 0.0f;
        #pragma unroll
        for (int g = 0; g < SG; ++g) v += red[g][c];
        out[c] = from_f32<T>(l > 0.0f ? v / l : 0.0f);
    }
}
SIKV_ENTRIES_D_T_COMBINE(sikv_combine, COMBINE_THREADS)
