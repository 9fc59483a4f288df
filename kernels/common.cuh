// Shared device code of every kernel: device fault reporting, 16-bit float helpers, exact-order
// arithmetic helpers, the online-softmax state, warp/block reductions and scans, the block
// radix select, and the dispatch macros that stamp out extern "C" entry points.
//
// Everything here must compile under both nvcc and NVRTC with no include path at all, so no
// headers beyond the generated layout: the 16-bit float types are our own two-byte structs,
// converted with single PTX instructions (cvt.rn.* rounds to nearest even, as the half crate
// does on the CPU). This keeps cuda_fp16.h (and the CCCL headers it pulls in) out of the build.
#pragma once

#include "sikv_layout.cuh"

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define SIKV_DEV __device__ __forceinline__

// SikvParams (the argument block every kernel takes by value), the launch geometry
// (*_THREADS, SCORE_TILE, TOPK_HIST_*, ...) and the FAULT_* bits come from the generated
// header: their one definition is in src/gpu/params.rs and src/gpu/geometry.rs.

// ---------------------------------------------------------------------------------------------
// Constants and float bits.

#define SIKV_INF __int_as_float(0x7f800000)
#define SIKV_NEG_INF __int_as_float(0xff800000)

// ---------------------------------------------------------------------------------------------
// 16-bit float types (bit containers) and conversions.

struct f16_t { u16 x; };
struct bf16_t { u16 x; };

SIKV_DEV float to_f32(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.x));
    return f;
}
SIKV_DEV float to_f32(bf16_t h) { return __uint_as_float((u32)h.x << 16); }
SIKV_DEV float to_f32(float x) { return x; }

template <typename T> SIKV_DEV T from_f32(float x);
template <> SIKV_DEV f16_t from_f32<f16_t>(float x) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(x));
    return r;
}
template <> SIKV_DEV bf16_t from_f32<bf16_t>(float x) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.x) : "f"(x));
    return r;
}
template <> SIKV_DEV float from_f32<float>(float x) { return x; }

SIKV_DEV u16 bits16(f16_t h) { return h.x; }
SIKV_DEV u16 bits16(bf16_t h) { return h.x; }

SIKV_DEV float half_bits_to_f32(u16 b) { f16_t h; h.x = b; return to_f32(h); }
SIKV_DEV u16 f32_to_half_bits(float x) { return from_f32<f16_t>(x).x; }

// The dense set and the 16-bit planes store bf16 for bf16 models and fp16 otherwise
// (Dtype::storage in config.rs).
template <typename T> struct Storage { typedef f16_t type; };
template <> struct Storage<bf16_t> { typedef bf16_t type; };

SIKV_DEV bool sign_negative(float x) { return (__float_as_uint(x) >> 31) != 0u; }

// ---------------------------------------------------------------------------------------------
// Loads N consecutive elements of T (N * sizeof(T) is 4, 8, 16 or 32 bytes and aligned to
// min(16, that)) into f32: one or two vector loads instead of N scalar ones.
template <typename T, int N>
SIKV_DEV void load_vec(const T* src, float* dst) {
    constexpr int BYTES = N * (int)sizeof(T);
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16 || BYTES % 16 == 0, "vector size");
    if constexpr (BYTES >= 16) {
        #pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) {
            uint4 w = reinterpret_cast<const uint4*>(src)[i];
            const T* e = reinterpret_cast<const T*>(&w);
            #pragma unroll
            for (int j = 0; j < 16 / (int)sizeof(T); ++j) dst[i * (16 / sizeof(T)) + j] = to_f32(e[j]);
        }
    } else if constexpr (BYTES == 8) {
        uint2 w = *reinterpret_cast<const uint2*>(src);
        const T* e = reinterpret_cast<const T*>(&w);
        #pragma unroll
        for (int j = 0; j < N; ++j) dst[j] = to_f32(e[j]);
    } else {
        u32 w = *reinterpret_cast<const u32*>(src);
        const T* e = reinterpret_cast<const T*>(&w);
        #pragma unroll
        for (int j = 0; j < N; ++j) dst[j] = to_f32(e[j]);
    }
}

// Stores N f32 as T (round to nearest even) with vector stores; same size rules as load_vec.
template <typename T, int N>
SIKV_DEV void store_vec(T* dst, const float* src) {
    constexpr int BYTES = N * (int)sizeof(T);
    if constexpr (BYTES >= 16) {
        #pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) {
            uint4 w;
            T* e = reinterpret_cast<T*>(&w);
            #pragma unroll
            for (int j = 0; j < 16 / (int)sizeof(T); ++j) e[j] = from_f32<T>(src[i * (16 / sizeof(T)) + j]);
            reinterpret_cast<uint4*>(dst)[i] = w;
        }
    } else if constexpr (BYTES == 8) {
        uint2 w;
        T* e = reinterpret_cast<T*>(&w);
        #pragma unroll
        for (int j = 0; j < N; ++j) e[j] = from_f32<T>(src[j]);
        *reinterpret_cast<uint2*>(dst) = w;
    } else {
        u32 w;
        T* e = reinterpret_cast<T*>(&w);
        #pragma unroll
        for (int j = 0; j < N; ++j) e[j] = from_f32<T>(src[j]);
        *reinterpret_cast<u32*>(dst) = w;
    }
}

// ---------------------------------------------------------------------------------------------
// Exact-order arithmetic. The CPU reference uses plain f32 multiplies and adds in a fixed
// order and Rust never contracts them into FMAs; nvcc would. Where a result must match the CPU
// bit for bit (encoding, LUT, scores, rerank, calibration) the kernels use these, which the
// compiler may not fuse.
SIKV_DEV float mul_rn(float a, float b) { return __fmul_rn(a, b); }
SIKV_DEV float add_rn(float a, float b) { return __fadd_rn(a, b); }
SIKV_DEV float sub_rn(float a, float b) { return __fsub_rn(a, b); }
SIKV_DEV float div_rn(float a, float b) { return __fdiv_rn(a, b); }

// Order-preserving map of an f32 score to u32 for radix selection (bigger = better):
// -0 is canonicalised to +0 (they tie, as in topk.rs); NaN maps to 1, below every number;
// 0 is left for "not a candidate". Branch-free, as it runs once per position of the score loop:
// s + 0 is +0 for -0 and s for every other number (these builds keep denormals), and no number
// maps below 2 (checked over all 2^32 patterns against the branchy form).
SIKV_DEV u32 score_key(float s) {
    const u32 b = __float_as_uint(add_rn(s, 0.0f));
    const u32 k = b ^ ((u32)((int)b >> 31) | 0x80000000u);
    return s != s ? 1u : k;
}

// Total order (f32::total_cmp) map of f32 bits to u32, for lower medians.
SIKV_DEV u32 total_key32(u32 b) { return (b & 0x80000000u) ? ~b : (b | 0x80000000u); }
SIKV_DEV u32 total_key32_inv(u32 k) { return (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k; }
// Same for 16-bit floats (fp16 and bf16 both keep the sign in bit 15).
SIKV_DEV u32 total_key16(u32 b) { return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u); }
SIKV_DEV u32 total_key16_inv(u32 k) { return (k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu); }

// ---------------------------------------------------------------------------------------------
// Non-finite and out-of-range inputs (docs/DESIGN.md; reference/encode.rs saturate, finite_max,
// half_max, centred, and cpu::stages): K, V and the calibration queries are sanitised as they
// are read (NaN -> 0, +-inf -> +- the dtype's largest finite value), the centred key k - m
// saturates at +-FLT_MAX, and 16-bit stores of k' and v saturate at the storage type's largest
// finite value. All of it is the identity on finite, in-range values.

// NaN -> 0, else clamped to [-mx, mx] (-0 stays -0).
SIKV_DEV float clamp_finite(float x, float mx) { return x != x ? 0.0f : fminf(fmaxf(x, -mx), mx); }
// Largest finite value of an activation / storage type.
SIKV_DEV float finite_max(f16_t) { return 65504.0f; }
SIKV_DEV float finite_max(bf16_t) { return __uint_as_float(0x7f7f0000u); }
SIKV_DEV float finite_max(float) { return __uint_as_float(0x7f7fffffu); }
template <typename T> SIKV_DEV float finite_max() { return finite_max(T()); }
// An activation of type T as the stages read it.
template <typename T> SIKV_DEV float sanitize(float x) { return clamp_finite(x, finite_max<T>()); }
// The same on the bits of a 16-bit activation (for selections on bit patterns): NaN -> +0,
// +-inf -> +-max (the pattern just below inf; fp16 and bf16 alike).
SIKV_DEV u32 half_inf_bits(f16_t) { return 0x7c00u; }
SIKV_DEV u32 half_inf_bits(bf16_t) { return 0x7f80u; }
template <typename T> SIKV_DEV u32 sanitize_bits16(u32 b) {
    const u32 inf = half_inf_bits(T()), mag = b & 0x7fffu;
    if (mag > inf) return 0u;
    if (mag == inf) return (b & 0x8000u) | (inf - 1u);
    return b;
}
// The centred key k' = k - m, saturated at +-FLT_MAX.
SIKV_DEV float centred_key(float k, float m) { return clamp_finite(sub_rn(k, m), finite_max<float>()); }

// ---------------------------------------------------------------------------------------------
// Device faults. Indices that come from the engine (seq_slot, position, slot_mapping, the page
// table, counts and indices) are checked once per work item before they address memory; a bad
// one skips the item and sets its FAULT_* bit in the context's fault word (mapped host memory,
// read by the next launcher call). Correct input never reaches these branches.

SIKV_DEV void raise_fault(const SikvParams& p, u32 bits) {
    if (p.fault) atomicOr(reinterpret_cast<u32*>(p.fault), bits);
}

// A batch row's state slot as loaded (seq_slot[b]), or -1 (fault raised) when outside
// 0..max_seqs.
SIKV_DEV int checked_slot(const SikvParams& p, int slot) {
    if (slot < 0 || slot >= p.max_seqs) {
        raise_fault(p, FAULT_SEQ_SLOT);
        return -1;
    }
    return slot;
}
// The state slot of batch row b, or -1 (fault raised) when outside 0..max_seqs.
SIKV_DEV int batch_slot(const SikvParams& p, int b) {
    return checked_slot(p, reinterpret_cast<const int*>(p.seq_slot)[b]);
}

// ---------------------------------------------------------------------------------------------
// Sequence geometry (cpu/mod.rs): length from the CSR page table, page lookup.

// seq_len from its three loads (indptr[b], indptr[b + 1], last_page_len[b]), for a kernel that
// issues them beside its other first loads.
SIKV_DEV int seq_len_of(const SikvParams& p, int i0, int i1, int last) {
    if (i0 < 0 || i1 < i0) {
        raise_fault(p, FAULT_PAGE_TABLE);
        return 0;
    }
    const int np = i1 - i0;
    if (np == 0) {
        if (last != 0) raise_fault(p, FAULT_PAGE_TABLE);
        return 0;
    }
    if (last < 1 || last > p.page_size) {
        raise_fault(p, FAULT_PAGE_TABLE);
        return 0;
    }
    const long long len = (long long)(np - 1) * p.page_size + last;
    if (len > p.max_seq_len) {
        raise_fault(p, FAULT_SEQ_LEN);
        return 0;
    }
    return (int)len;
}
// Length of sequence b from the page table; 0 (fault raised) for a table the CPU would reject:
// indptr negative or decreasing, last_page_len outside 1..=page_size (0 without pages), more
// than max_seq_len tokens. Every position below the returned length has its page entry inside
// [indptr[b], indptr[b + 1]).
SIKV_DEV int seq_len(const SikvParams& p, int b) {
    const int* indptr = reinterpret_cast<const int*>(p.indptr);
    return seq_len_of(p, indptr[b], indptr[b + 1], reinterpret_cast<const int*>(p.last_page_len)[b]);
}

// Live length of batch row b and its state slot: a row whose slot is bad is an empty sequence
// with slot -1 (its page table is then not read).
SIKV_DEV int row_seq(const SikvParams& p, int b, int* slot) {
    *slot = batch_slot(p, b);
    return *slot < 0 ? 0 : seq_len(p, b);
}

// Kernel row r of a select / attend is one query token (cpu/rows.rs). With p.row_offsets,
// sequence b's n rows are kernel rows [off[b], off[b + 1]) and its row i (0-based) stands at
// position len - n + i: it attends causally, to the positions below its bound len - n + i + 1.
// Without, kernel row r is sequence r's one query (bound = len). The window and the dense set
// are the whole sequence's (its length); the bound cuts candidates, dense entries and
// selected positions.
struct QueryRow {
    int seq;    // the sequence: page table and seq_slot index
    int slot;   // its state slot; -1: nothing to attend (a fault has been raised)
    int len;    // its live length
    int bound;  // the row sees positions below this
};

// Kernel row r of a call with one query row per sequence (no row_offsets).
SIKV_DEV QueryRow single_row(const SikvParams& p, int r) {
    QueryRow q;
    q.seq = r;
    q.len = row_seq(p, r, &q.slot);
    q.bound = q.len;
    return q;
}

// Whether a rows call's offsets [0, batch] hold together for a segment of n rows: they start at
// 0, end at the call's `total` rows, and the segment has 1..QUERY_ROWS_MAX rows (cpu::rows_total).
SIKV_DEV bool rows_offsets_ok(const int* off, int batch, int total, int n) {
    return off[0] == 0 && off[batch] == total && n >= 1 && n <= (int)QUERY_ROWS_MAX;
}

SIKV_DEV QueryRow query_row(const SikvParams& p, int r) {
    QueryRow q;
    int n = 1, i = 0;
    q.seq = r;
    if (p.row_offsets) {
        const int* off = reinterpret_cast<const int*>(p.row_offsets);
        // The last sequence whose first row is at or before r (offsets ascend when consistent;
        // whatever they hold, the row is checked against the segment found).
        int lo = 0, hi = p.batch;
        while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (off[mid] <= r) lo = mid;
            else hi = mid;
        }
        const int o0 = off[lo];
        n = off[lo + 1] - o0;
        i = r - o0;
        if (!rows_offsets_ok(off, p.batch, p.rows, n) || i < 0 || i >= n) {
            raise_fault(p, FAULT_QUERY_ROWS);
            q.slot = -1;
            q.len = 0;
            q.bound = 0;
            return q;
        }
        q.seq = lo;
    }
    q.len = row_seq(p, q.seq, &q.slot);
    if (q.slot >= 0 && n > q.len) {  // the rows' tokens are appended before the call
        raise_fault(p, FAULT_QUERY_ROWS);
        q.slot = -1;
        q.len = 0;
    }
    q.bound = q.slot < 0 ? 0 : q.len - n + i + 1;
    return q;
}

// The query rows [r0, r0 + n) whose queries' mean selects for sequence b of a mean-query
// select (p.mean_offsets; cpu/rows.rs RowSelection::MeanQuery); n = 0 (fault raised) for offsets
// that cannot be followed. Rows the sequence is too short for are the attend's fault (query_row).
SIKV_DEV void mean_query_rows(const SikvParams& p, int b, int* r0, int* n) {
    const int* off = reinterpret_cast<const int*>(p.mean_offsets);
    *r0 = off[b];
    *n = off[b + 1] - *r0;
    if (!rows_offsets_ok(off, p.batch, p.rows_mean, *n)) {
        raise_fault(p, FAULT_QUERY_ROWS);
        *n = 0;
    }
}

// Row index of slot 0 of page `pi` of sequence b for head h, (page * H + h) * P, or -1 when
// the page index is outside 0..num_pages (no fault raised: the caller raises it when a
// position on that page is read).
// Sequence b's page list: its entries of page_indices (from indptr[b]).
SIKV_DEV const int* seq_pages(const SikvParams& p, int b) {
    return reinterpret_cast<const int*>(p.page_indices) + reinterpret_cast<const int*>(p.indptr)[b];
}
// The first row of page entry pi of a sequence's page list `pages`, -1 outside the pool.
SIKV_DEV long long page_base_row_in(const SikvParams& p, const int* pages, int h, int pi) {
    const int page = pages[pi];
    if (page < 0 || page >= p.num_pages) return -1;
    return ((long long)page * p.num_kv_heads + h) * p.page_size;
}
SIKV_DEV long long page_base_row(const SikvParams& p, int b, int h, int pi) {
    return page_base_row_in(p, seq_pages(p, b), h, pi);
}

// Page index and slot of position pos >= 0. A power-of-two page size (the usual case) takes a
// shift and a mask: the integer division by a run-time divisor was ~20 instructions per token
// in the score kernel's loop, and per tile in the dense decode's.
SIKV_DEV void page_split(const SikvParams& p, int pos, int* pi, int* off) {
    const int ps = p.page_size;
    if ((ps & (ps - 1)) == 0) {
        *pi = pos >> (__ffs(ps) - 1);
        *off = pos & (ps - 1);
    } else {
        *pi = pos / ps;
        *off = pos - *pi * ps;
    }
}

// Row index (page * H + head) * P + slot of position `pos` (< seq_len) of sequence b, or -1
// (fault raised) when its page index is outside 0..num_pages.
// row_index with sequence b's page list already found (seq_pages): one dependent load per
// position instead of two, where a kernel can look the list up before it has the positions.
SIKV_DEV long long row_index_in(const SikvParams& p, const int* pages, int h, int pos) {
    int pi, off;
    page_split(p, pos, &pi, &off);
    const long long base = page_base_row_in(p, pages, h, pi);
    if (base < 0) {
        raise_fault(p, FAULT_PAGE_INDEX);
        return -1;
    }
    return base + off;
}
SIKV_DEV long long row_index(const SikvParams& p, int b, int h, int pos) {
    return row_index_in(p, seq_pages(p, b), h, pos);
}

SIKV_DEV const u8* plane_row(const SikvParams& p, int plane, long long row) {
    return reinterpret_cast<const u8*>(p.plane[plane]) + row * (long long)p.row_bytes[plane];
}
SIKV_DEV u8* plane_row_mut(const SikvParams& p, int plane, long long row) {
    return reinterpret_cast<u8*>(p.plane[plane]) + row * (long long)p.row_bytes[plane];
}

SIKV_DEV u8* state_record(const SikvParams& p, int slot, int h) {
    return reinterpret_cast<u8*>(p.state) + ((long long)slot * p.num_kv_heads + h) * (long long)p.state_bytes;
}
SIKV_DEV int* state_meta(const SikvParams& p, u8* rec) { return reinterpret_cast<int*>(rec + p.off_meta); }
SIKV_DEV int* state_dense_pos(const SikvParams& p, u8* rec) { return reinterpret_cast<int*>(rec + p.off_dense_pos); }

// Budget rule of config.rs (Budget::k_for): min(n, clamp(ceil(ratio * n), min, max)), in f64.
SIKV_DEV int budget_k(const SikvParams& p, int n_cand) {
    double want = ceil((double)p.budget_ratio * (double)n_cand);
    long long w = (want > 0.0) ? (long long)want : 0;  // ratio is finite and in [0, 1]
    if (w < p.budget_min) w = p.budget_min;
    if (w > p.budget_max) w = p.budget_max;
    if (w > n_cand) w = n_cand;
    return (int)w;
}

// The dense set's keep rule for a sequence of length len (cpu::stages::dense_entries).
SIKV_DEV bool dense_keep(const SikvParams& p, int e, int pos, int len) {
    if (pos < 0 || pos >= len) return false;
    if (e < p.n_sink + p.n_heavy) return true;
    int lo = len - p.n_window;
    if (lo < p.n_sink) lo = p.n_sink;
    return pos >= lo;
}

// End of the candidate range: max(S, len - W).
SIKV_DEV int cand_end(const SikvParams& p, int len) {
    int e = len - p.n_window;
    return e < p.n_sink ? p.n_sink : e;
}

// A query row's candidates: [S, this), the sequence's candidate range cut at the row's bound.
SIKV_DEV int row_cand_end(const SikvParams& p, const QueryRow& q) {
    const int e = cand_end(p, q.len);
    const int c = e < q.bound ? e : q.bound;
    return c > p.n_sink ? c : p.n_sink;
}

// dense_keep for a query row: the sequence's dense set, below the row's bound.
SIKV_DEV bool row_dense_keep(const SikvParams& p, int e, int pos, const QueryRow& q) {
    return pos < q.bound && dense_keep(p, e, pos, q.len);
}

// ---------------------------------------------------------------------------------------------
// Online softmax state of one query head (FlashInfer's state_t): running max m and running sum
// l of exp(logit - m); the accumulator lives with the caller.
struct SoftmaxState {
    float m;
    float l;
    SIKV_DEV void init() { m = SIKV_NEG_INF; l = 0.0f; }
    // Start of a tile whose largest logit is mx: raises the running max and returns the factor
    // for the sum and accumulators so far (0 when nothing came before; 1 while every logit is
    // -inf). The caller then takes exp(logit - m) of the tile (all 0 when m is still -inf).
    SIKV_DEV float update_max(float mx) {
        const float m_new = fmaxf(m, mx);
        float alpha = 1.0f;
        if (m_new != SIKV_NEG_INF) alpha = m == SIKV_NEG_INF ? 0.0f : expf(m - m_new);
        m = m_new;
        return alpha;
    }
    // End of the tile: `sum` is the sum of its exp(logit - m).
    SIKV_DEV void update_sum(float alpha, float sum) { l = l * alpha + sum; }
    // Merges a partial state (m2, l2) into one whose m is already the max over every partial
    // (the combine takes the max first, so nothing merged earlier needs rescaling); returns the
    // weight of the partial's accumulator.
    SIKV_DEV float merge(float m2, float l2) {
        const float w = (m2 == SIKV_NEG_INF || m == SIKV_NEG_INF) ? 0.0f : expf(m2 - m);
        l += w * l2;
        return w;
    }
};

// ---------------------------------------------------------------------------------------------
// Warp and block reductions / scans.

SIKV_DEV float warp_max(float x) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
SIKV_DEV float warp_sum(float x) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
SIKV_DEV int warp_sum_int(int x) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
SIKV_DEV u32 warp_incl_scan(u32 x) {
    int lane = threadIdx.x & 31;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u32 y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    return x;
}

// Exclusive block scan of one u32 per thread; *total gets the block sum. `smem` holds 33 u32.
// Must be called by every thread of the block. SYNC_AFTER = false leaves out the closing
// barrier, which only protects `smem` from the next scan's writes: for callers that reach a
// barrier of their own before `smem` is written again (or alternate two buffers), each scan of
// a one-CTA select being one barrier shorter.
template <int NT, bool SYNC_AFTER = true>
SIKV_DEV u32 block_excl_scan(u32 x, u32* smem, u32* total) {
    constexpr int NW = NT / 32;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 incl = warp_incl_scan(x);
    if (lane == 31) smem[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        u32 w = lane < NW ? smem[lane] : 0u;
        u32 wi = warp_incl_scan(w);
        if (lane < NW) smem[lane] = wi - w;
        if (lane == NW - 1) smem[32] = wi;
    }
    __syncthreads();
    u32 r = smem[warp] + incl - x;
    *total = smem[32];
    if constexpr (SYNC_AFTER) __syncthreads();
    return r;
}

// Shared-memory histogram increment. Called by a full warp; `active` = this lane has an
// element. A warp whose active lanes all hit one bin (ties: +inf for forced tokens, small-integer
// sign x sign scores) adds once, so ties do not serialise on one address; otherwise each lane
// adds its own. (Grouping lanes by bin with __match_any_sync cost more than it saved: ncu put
// the wait for its result among the top stalls of the one-CTA select kernels.)
SIKV_DEV void hist_add(u32* hist, u32 bin, bool active) {
    const u32 act = __ballot_sync(0xffffffffu, active);
    if (act == 0u) return;
    const u32 lo = __reduce_min_sync(0xffffffffu, active ? bin : 0xffffffffu);
    const u32 hi = __reduce_max_sync(0xffffffffu, active ? bin : 0u);
    if (lo == hi) {
        if ((int)(threadIdx.x & 31) == __ffs(act) - 1) atomicAdd(&hist[bin], (u32)__popc(act));
    } else if (active) {
        atomicAdd(&hist[bin], 1u);
    }
}

// ---------------------------------------------------------------------------------------------
// Block radix select: the k best of n u32 keys (bigger first, ties to the smaller index), and
// the collection of their indices in ascending order. One CTA of NT threads per row; up to
// three passes of 11/11/10 bits over the keys, then one ordered collection pass. Keys of 0 mark
// non-candidates and are never taken while k <= the number of non-zero keys.
//
// A one-CTA select is a chain of block barriers (at small batch the step waits on two of them
// in series: the stage-1 final and stage 2), so the passes keep the barriers few: two
// histograms (the caller's `hist2` beside s.hist) so that the next pass's is zeroed while this
// one is counted; scans without their closing barrier where a barrier or a second scan buffer
// follows; and the passes stop once every key of the picked bin is taken (sel_remaining ==
// sel_count), which selects the same set: with all of the bin taken, the lower digits decide
// nothing. The selection state then holds a partial mask, which every reader applies.

// One digit's bins: the 11-bit digits of passes 0 and 1 (pass 2 uses the lower 1024). The score
// kernel's row histogram is pass 0's digit, which is how the final select starts at pass 1.
constexpr int RADIX_BINS = 2048;
static_assert(RADIX_BINS == TOPK_HIST_BINS, "the score histogram is the radix select's first digit");

struct RadixSmem {
    u32 hist[RADIX_BINS];
    u32 scan[33];
    u32 scan2[33];  // the second buffer of back-to-back scans (collect tiles)
    u32 sel_prefix, sel_mask, sel_remaining;
    u32 sel_count;  // keys in the last picked bin
};

// Finds the digit (bin) of `hist` holding the remaining-th best element, scanning from the top
// bin, and updates the shared selection state. Thread j owns BINS / NT consecutive bins from the
// top (thread 0 the highest); one block scan finds the owner. (An earlier warp-0-only version
// read 64 bins per lane at a stride of 64 words: 32-way bank conflicts, microseconds per pass,
// and an intra-warp hazard on sel_remaining.) Every thread must call; ends with a barrier.
template <int NT, int BINS>
SIKV_DEV void block_pick_bin(RadixSmem& s, const u32* hist, int shift) {
    constexpr int PER = BINS / NT > 0 ? BINS / NT : 1;
    const int hi = BINS - (int)threadIdx.x * PER;
    u32 c[PER];
    u32 sum = 0;
    #pragma unroll
    for (int i = 0; i < PER; ++i) {
        c[i] = hi - 1 - i >= 0 ? hist[hi - 1 - i] : 0u;
        sum += c[i];
    }
    const u32 rem = s.sel_remaining;
    u32 total;
    // The scan's barriers order every read of sel_remaining before the one write below; the
    // barrier at the end orders the scan buffer's reads before its next use.
    u32 above = block_excl_scan<NT, false>(sum, s.scan, &total);
    if (above < rem && rem <= above + sum) {
        #pragma unroll
        for (int i = 0; i < PER; ++i) {
            if (above + c[i] >= rem) {
                const u32 bin = (u32)(hi - 1 - i);
                s.sel_prefix |= bin << shift;
                s.sel_mask |= (u32)(BINS - 1) << shift;
                s.sel_remaining = rem - above;
                s.sel_count = c[i];
                break;
            }
            above += c[i];
        }
    }
    __syncthreads();
}

// Zeroes one digit's bins in shared memory (no barrier).
template <int NT>
SIKV_DEV void radix_bins_zero(u32* hist) {
    for (int i = threadIdx.x; i < RADIX_BINS; i += NT) hist[i] = 0u;
}

// Radix passes first_pass..2 (11/11/10 bits from the top) over this thread's keys, which
// visit_keys(add) hands to add(key, live) one by one (live: the element exists). The keys that
// match the selection state (sel_prefix, sel_mask, sel_remaining) already in `s` are counted;
// on return the state holds the threshold under sel_mask (all ones unless the passes stopped
// early) and how many keys equal to it under the mask are taken. hist2: a second histogram of
// RADIX_BINS words, free for the call. Starts and ends with a block barrier; must be called by every
// thread.
template <int NT, typename VisitKeys>
SIKV_DEV void block_radix_passes(RadixSmem& s, u32* hist2, int first_pass, VisitKeys visit_keys) {
    __syncthreads();
    radix_bins_zero<NT>(s.hist);
    __syncthreads();
    for (int pass = first_pass; pass < 3; ++pass) {
        // (Conditionals, not arrays indexed by the pass: those went to local memory.)
        const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        const bool odd = ((pass - first_pass) & 1) != 0;
        u32* h = odd ? hist2 : s.hist;
        const u32 prefix = s.sel_prefix, mask = s.sel_mask;
        const u32 bmask = pass < 2 ? RADIX_BINS - 1u : RADIX_BINS / 2 - 1u;
        visit_keys([&](u32 key, bool live) { hist_add(h, (key >> shift) & bmask, live && (key & mask) == prefix); });
        // The next pass's histogram: its last reader (two passes back) finished before the
        // previous pick's closing barrier.
        if (pass < 2) radix_bins_zero<NT>(odd ? s.hist : hist2);
        __syncthreads();
        if (pass < 2) block_pick_bin<NT, RADIX_BINS>(s, h, shift);
        else block_pick_bin<NT, RADIX_BINS / 2>(s, h, shift);
        if (s.sel_remaining == s.sel_count) break;  // uniform: read after the pick's barrier
    }
}

// The keys key_at(i), i in [0, n), of a block_radix_passes visitor read from global memory:
// U per thread and round, all loads issued before the histogram updates (from L2, latency and
// not bandwidth bounds one CTA).
template <int NT, int U, typename KeyAt, typename Add>
SIKV_DEV void visit_keys_at(int n, KeyAt key_at, Add&& add) {
    for (int base = 0; base < n; base += NT * U) {
        u32 key[U];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = base + u * NT + (int)threadIdx.x;
            key[u] = i < n ? key_at(i) : 0u;
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) add(key[u], base + u * NT + (int)threadIdx.x < n);
    }
}

// One tile of the ordered collection of a block select: thread x holds elements base + ITEMS x
// + j (j < ITEMS) of the n, keys[j]; emit(rank, j) is called for each of them that is selected,
// rank counted in ascending element order. The block scan carries (selected, equal to the
// threshold) counts packed in one word (each < 2^16 per tile), in `scan` (33 words): callers
// alternate s.scan and s.scan2 from tile to tile, so the scans need no closing barrier (a
// buffer is written again only after the next tile's barriers). Every thread must call.
template <int NT, int ITEMS, typename Emit>
SIKV_DEV void collect_tile(const RadixSmem& s, u32* scan, const u32 (&keys)[ITEMS], int base, int n, u32& carry_sel,
                           u32& carry_eq, Emit emit) {
    const u32 prefix = s.sel_prefix, mask = s.sel_mask, remaining = s.sel_remaining;
    u32 n_gt = 0, n_eq = 0;
    #pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
        const bool valid = base + (int)threadIdx.x * ITEMS + j < n;
        const u32 km = keys[j] & mask;
        n_gt += (valid && km > prefix) ? 1u : 0u;
        n_eq += (valid && km == prefix) ? 1u : 0u;
    }
    u32 total;
    const u32 excl = block_excl_scan<NT, false>((n_eq << 16) | n_gt, scan, &total);
    // Selected before this thread = carried + all greater before + equal ones taken before.
    u32 eq_before = carry_eq + (excl >> 16);
    u32 gt_before = carry_sel + (excl & 0xffffu);
    #pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
        if (base + (int)threadIdx.x * ITEMS + j >= n) break;
        const u32 km = keys[j] & mask;
        if (km > prefix) {
            const u32 taken_eq = eq_before < remaining ? eq_before : remaining;
            emit((int)(gt_before + taken_eq), j);
            gt_before += 1;
        } else if (km == prefix) {
            if (eq_before < remaining) emit((int)(gt_before + eq_before), j);
            eq_before += 1;
        }
    }
    carry_sel += total & 0xffffu;
    carry_eq += total >> 16;
}

// Sets up the selection state for the k best of n and runs the radix passes unless every
// element is taken. hist2: block_radix_passes'. Every thread must call.
template <int NT, typename VisitKeys>
SIKV_DEV void block_select_threshold(RadixSmem& s, u32* hist2, int n, int k, VisitKeys visit_keys) {
    // Nobody may still read the selection state of an earlier use of `s`.
    __syncthreads();
    if (threadIdx.x == 0) { s.sel_prefix = 0; s.sel_mask = 0; s.sel_remaining = (u32)k; s.sel_count = ~0u; }
    if (k < n) {
        block_radix_passes<NT>(s, hist2, 0, visit_keys);
    } else {
        // Every element is taken: an all-zero mask makes every key "equal to the threshold".
        if (threadIdx.x == 0) s.sel_remaining = (u32)n;
        __syncthreads();
    }
}

// KeyAt(i) -> u32 for i in [0, n). Emit(rank, i) is called for every selected element with
// its rank in ascending index order (0..k-1). hist2: block_radix_passes'. Must be called by
// every thread of the block.
template <int NT, typename KeyAt, typename Emit>
SIKV_DEV void block_topk(RadixSmem& s, u32* hist2, int n, int k, KeyAt key_at, Emit emit) {
    if (k <= 0 || n <= 0) return;
    block_select_threshold<NT>(s, hist2, n, k, [&](auto&& add) { visit_keys_at<NT, 4>(n, key_at, add); });
    constexpr int ITEMS = 4;
    u32 carry_sel = 0, carry_eq = 0;
    bool second = false;
    for (int base = 0; base < n; base += NT * ITEMS) {
        u32 keys[ITEMS];
        #pragma unroll
        for (int j = 0; j < ITEMS; ++j) {
            const int i = base + (int)threadIdx.x * ITEMS + j;
            keys[j] = i < n ? key_at(i) : 0u;
        }
        collect_tile<NT>(s, second ? s.scan2 : s.scan, keys, base, n, carry_sel, carry_eq, [&](int rank, int j) {
            emit(rank, base + (int)threadIdx.x * ITEMS + j);
        });
        second = !second;
    }
    __syncthreads();
}

// block_topk over R keys per thread already in registers: element 4 NT t +
// 4 x + j of the n is thread x's key[4 t + j] (the layout of 16-byte loads and of the ordered
// collection alike), so every pass reads registers and no key is loaded twice. Emit(rank, r)
// gets the register slot r (a constant once unrolled: the caller indexes its own arrays with it).
template <int NT, int R, typename Emit>
SIKV_DEV void block_topk_regs(RadixSmem& s, u32* hist2, int n, int k, const u32 (&key)[R], Emit emit) {
    static_assert(R % 4 == 0, "four consecutive elements per thread and tile");
    if (k <= 0 || n <= 0) return;
    block_select_threshold<NT>(s, hist2, n, k, [&](auto&& add) {
        #pragma unroll
        for (int r = 0; r < R; ++r) add(key[r], (r / 4) * NT * 4 + (int)threadIdx.x * 4 + (r % 4) < n);
    });
    u32 carry_sel = 0, carry_eq = 0;
    #pragma unroll
    for (int t = 0; t < R / 4; ++t) {
        const u32 tile[4] = {key[4 * t], key[4 * t + 1], key[4 * t + 2], key[4 * t + 3]};
        collect_tile<NT>(s, (t & 1) ? s.scan2 : s.scan, tile, t * NT * 4, n, carry_sel, carry_eq,
                         [&](int rank, int j) { emit(rank, 4 * t + j); });
    }
    __syncthreads();
}

// Elements [0, n) of a row of 32-bit words into registers in block_topk_regs' layout, 16
// bytes at a time where the row allows (aligned16: the row starts on 16 bytes); 0 at and past
// n (block_topk_regs never counts those slots). n <= 4 NT (R / 4).
template <int NT, int R>
SIKV_DEV void load_row_regs(const u32* row, int n, bool aligned16, u32 (&v)[R]) {
    #pragma unroll
    for (int t = 0; t < R / 4; ++t) {
        const int i = t * NT * 4 + (int)threadIdx.x * 4;
        if (aligned16 && i + 4 <= n) {
            const uint4 w = *reinterpret_cast<const uint4*>(row + i);
            v[4 * t] = w.x; v[4 * t + 1] = w.y; v[4 * t + 2] = w.z; v[4 * t + 3] = w.w;
        } else {
            #pragma unroll
            for (int j = 0; j < 4; ++j) v[4 * t + j] = i + j < n ? row[i + j] : 0u;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch: every templated kernel body `NAME##_impl<D, T>` gets extern "C" entry points named
// `NAME_d{64,128,256}_{f16,bf16}`, looked up by name from Rust (src/gpu/kernels.rs). The
// bodies also compile for T = float (f32 activations); those entry points are left out to keep
// the fatbin build time down, and the launchers answer SIKV_ERR_UNSUPPORTED for f32.

// NVRTC compiles only the variant a context needs: the host prepends `#define SIKV_ONLY` and
// `#define SIKV_IF_d128_f16(...) __VA_ARGS__` (say); every other variant expands to nothing.
#ifndef SIKV_ONLY
#define SIKV_IF_d64_f16(...) __VA_ARGS__
#define SIKV_IF_d128_f16(...) __VA_ARGS__
#define SIKV_IF_d256_f16(...) __VA_ARGS__
#define SIKV_IF_d64_bf16(...) __VA_ARGS__
#define SIKV_IF_d128_bf16(...) __VA_ARGS__
#define SIKV_IF_d256_bf16(...) __VA_ARGS__
#define SIKV_IF_f16(...) __VA_ARGS__
#define SIKV_IF_bf16(...) __VA_ARGS__
#endif
#ifndef SIKV_IF_d64_f16
#define SIKV_IF_d64_f16(...)
#endif
#ifndef SIKV_IF_d128_f16
#define SIKV_IF_d128_f16(...)
#endif
#ifndef SIKV_IF_d256_f16
#define SIKV_IF_d256_f16(...)
#endif
#ifndef SIKV_IF_d64_bf16
#define SIKV_IF_d64_bf16(...)
#endif
#ifndef SIKV_IF_d128_bf16
#define SIKV_IF_d128_bf16(...)
#endif
#ifndef SIKV_IF_d256_bf16
#define SIKV_IF_d256_bf16(...)
#endif
#ifndef SIKV_IF_f16
#define SIKV_IF_f16(...)
#endif
#ifndef SIKV_IF_bf16
#define SIKV_IF_bf16(...)
#endif

// Loads of a stream read once per call and not written while the kernel runs (the score's sign
// rows), marked first to go from L2 (a fractional evict_first policy, which ptxas folds into the
// load's descriptor): at large batches the sign plane is several times L2, and what the score
// writes beside it (the radix keys, read back by the compaction) should be what L2 keeps.
SIKV_DEV unsigned long long l2_evict_first() {
    unsigned long long pol = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
#endif
    return pol;
}
// With the policy made once by the caller (l2_evict_first): made per load, ptxas rebuilt the
// load's descriptor with six uniform instructions at every load of the score's token loop.
SIKV_DEV uint4 load_stream16(const void* a, unsigned long long pol) {
    uint4 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(a), "l"(pol));
#else
    (void)pol;
    v = *reinterpret_cast<const uint4*>(a);
#endif
    return v;
}
SIKV_DEV uint2 load_stream8(const void* a, unsigned long long pol) {
    uint2 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0, %1}, [%2], %3;"
        : "=r"(v.x), "=r"(v.y)
        : "l"(a), "l"(pol));
#else
    (void)pol;
    v = *reinterpret_cast<const uint2*>(a);
#endif
    return v;
}

// Programmatic dependent launch (sm_90+; the launcher sets the attribute, src/gpu/driver.rs):
// sikv_grid_wait waits until the grid ahead in the stream has finished and its writes are
// visible; sikv_launch_dependents lets the next grid be launched. A grid launched without the
// attribute returns from the wait at once. Most kernels call both first
// (sikv_grid_dependency). The rules every kernel keeps: each block waits before it ends, so no
// grid finishes ahead of the one it overlaps and each wait covers all earlier work of the
// stream; and each kernel lets its dependents launch only after its own wait (the sparse attend
// with attend_early excepted: what follows it reads nothing before its own wait; and the score
// kernel behind hist_zero: what follows it reads nothing hist_zero writes before its own wait),
// so a kernel that starts may read what the launch two back wrote (SIKV_ENTRY_LATE_WAIT).
SIKV_DEV void sikv_grid_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
SIKV_DEV void sikv_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Thread block clusters (sm_90; the fused select of score.cu / topk.cu): this CTA's rank in
// its cluster, a barrier of the whole cluster (release / acquire: the writes of every CTA before
// it, to shared and global memory, are seen by every CTA after it, split into arrive and wait
// so independent work can sit between them), and atomics / loads on another CTA's shared
// memory (distributed shared memory) by the shared::cluster address of a variable there.
SIKV_DEV u32 cluster_rank() {
    u32 r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
    return r;
}
SIKV_DEV u32 cluster_size() {
    u32 n = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
#endif
    return n;
}
SIKV_DEV void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
SIKV_DEV void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
SIKV_DEV void cluster_sync() {
    cluster_arrive();
    cluster_wait();
}
// The shared::cluster address of `local` (a __shared__ variable) in the CTA of rank `rank`.
SIKV_DEV u32 cluster_addr(const void* local, u32 rank) {
    u32 a = (u32)__cvta_generic_to_shared(local), d = a;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(rank));
#endif
    return d;
}
SIKV_DEV void cluster_red_add(u32 addr, u32 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.relaxed.cluster.shared::cluster.add.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
#endif
}
SIKV_DEV u32 cluster_atomic_add(u32 addr, u32 v) {
    u32 old = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("atom.relaxed.cluster.shared::cluster.add.u32 %0, [%1], %2;" : "=r"(old) : "r"(addr), "r"(v) : "memory");
#endif
    return old;
}
SIKV_DEV uint4 cluster_load4(u32 addr) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr)
                 : "memory");
#endif
    return v;
}

SIKV_DEV void sikv_grid_dependency() {
    sikv_grid_wait();
    sikv_launch_dependents();
}

// Device-side crossover (route.cu): a decode whose page table lives on the device runs both
// paths' kernels, and the route word the prologue wrote says which of them does the work. A
// launch of the other path returns here, after the grid dependency (so the word is written).
// ws_route == 0: not a routed launch, nothing to read.
SIKV_DEV bool route_is_dense(const SikvParams& p) {
    return *reinterpret_cast<const volatile u32*>(p.ws_route) != 0u;
}
// The sparse path's launches skip on the word. The dense decode's launch decides for itself
// (route_dense_sum, in its body): under a graph capture it runs beside the prologue, not after it
// (launch.rs decode_routed), so the word may not be written when it starts.
SIKV_DEV bool route_skips(const SikvParams& p) {
    if (p.ws_route == 0 || p.route_as != ROUTE_SPARSE) return false;
    return route_is_dense(p);
}
// The route itself (config.rs Crossover's rule): dense when the call's live tokens, summed over
// its sequences, are at most route_max_tokens. Rows with a bad slot or page table count as empty
// (row_seq raises their fault, as the stages that read them would). Each warp sums every
// sequence (lanes over the batch), so all warps of a block agree without a barrier; the prologue
// writes the word from the same sum.
SIKV_DEV bool route_dense_sum(const SikvParams& p) {
    unsigned long long total = 0;
    for (int b = threadIdx.x & 31; b < p.batch; b += 32) {
        int slot;
        total += (unsigned long long)row_seq(p, b, &slot);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    return total <= p.route_max_tokens;
}

// BOUNDS: the parenthesised arguments of __launch_bounds__, (threads) or (threads, min blocks
// per SM).
// Every (head_dim, dtype) variant of NAME through ENTRY (SIKV_ENTRY_DT or one of its kin below).
#define SIKV_FOR_EACH_D_T(ENTRY, NAME, BOUNDS) \
    ENTRY(NAME, BOUNDS, 64, f16_t, f16)         \
    ENTRY(NAME, BOUNDS, 128, f16_t, f16)        \
    ENTRY(NAME, BOUNDS, 256, f16_t, f16)        \
    ENTRY(NAME, BOUNDS, 64, bf16_t, bf16)       \
    ENTRY(NAME, BOUNDS, 128, bf16_t, bf16)      \
    ENTRY(NAME, BOUNDS, 256, bf16_t, bf16)
#define SIKV_ENTRY_DT(NAME, BOUNDS, D, T, TNAME)                                                 \
    SIKV_IF_d##D##_##TNAME(extern "C" __global__ void __launch_bounds__ BOUNDS                  \
                               NAME##_d##D##_##TNAME(const SikvParams p) {                      \
                                   sikv_grid_dependency();                                      \
                                   if (route_skips(p)) return;                                  \
                                   NAME##_impl<D, T>(p);                                        \
                               })

// The sparse attend's entry: with p.attend_early (the launcher queued this call's select just
// before it) the grid dependency is left to the body, which waits before it reads the
// selection; splits of kept dense entries alone run while the selection's last kernel
// finishes. Every block still waits before it ends, so the grid never completes ahead of the
// one it overlaps and each grid's wait keeps covering all earlier work of the stream. The
// route word was written by the prologue, long complete when the select's last kernel runs.
#define SIKV_ENTRY_DT_EARLY(NAME, BOUNDS, D, T, TNAME)                                           \
    SIKV_IF_d##D##_##TNAME(extern "C" __global__ void __launch_bounds__ BOUNDS                  \
                               NAME##_d##D##_##TNAME(const SikvParams p) {                      \
                                   if (p.attend_early) sikv_launch_dependents();                \
                                   else sikv_grid_dependency();                                 \
                                   if (!route_skips(p)) NAME##_impl<D, T>(p);                   \
                                   sikv_grid_wait();                                            \
                               })
#define SIKV_ENTRIES_D_T_EARLY_MINB(NAME, NT, MINB) SIKV_FOR_EACH_D_T(SIKV_ENTRY_DT_EARLY, NAME, (NT, MINB))

// The score kernel's entry: with the multi-CTA top-k (p.topk_multi) outside a routed decode
// the launch just ahead is hist_zero (or a memset), and the body waits only before it adds into
// the rows' histograms, the one thing that launch writes, so its prologue and token loop overlap
// it. It lets the compaction launch at once, as before: what the compaction reads before its own
// wait (the page table, the heavy list) is older than hist_zero, and complete once this kernel
// started. A routed decode (p.ws_route) has no hist_zero: the prologue just ahead zeroes the
// histograms and writes the route word, so there the kernel waits first, as do the one-CTA
// top-k's calls and the other entries. Every block still waits before it ends.
// BOUNDS: a function-like macro of the head dim giving the launch bounds (the one-row entry's
// depend on it).
#define SIKV_ENTRY_DT_SCORE(NAME, BOUNDS, D, T, TNAME)                                           \
    SIKV_IF_d##D##_##TNAME(extern "C" __global__ void __launch_bounds__ BOUNDS(D)               \
                               NAME##_d##D##_##TNAME(const SikvParams p) {                      \
                                   if (p.topk_multi && p.ws_route == 0) sikv_launch_dependents(); \
                                   else sikv_grid_dependency();                                 \
                                   if (!route_skips(p)) NAME##_impl<D, T>(p);                   \
                                   sikv_grid_wait();                                            \
                               })
#define SIKV_ENTRIES_D_T_SCORE(NAME, BOUNDS) SIKV_FOR_EACH_D_T(SIKV_ENTRY_DT_SCORE, NAME, BOUNDS)

// The combine's entry: in a routed decode it reads the route word (whose partials to merge)
// before its grid dependency, so that the partials' loads follow the wait at once instead of
// after a round trip for the word. The word is the prologue's and complete when the combine
// starts: behind the join of a forked capture by the graph's edges; in stream order because the
// launch just ahead (the dense decode) lets it launch only after its own wait, which covers the
// attend and all before it.
#define SIKV_ENTRY_DT_COMBINE(NAME, BOUNDS, D, T, TNAME)                                         \
    SIKV_IF_d##D##_##TNAME(extern "C" __global__ void __launch_bounds__ BOUNDS                  \
                               NAME##_d##D##_##TNAME(const SikvParams p) {                      \
                                   const bool dense = p.ws_route != 0 && route_is_dense(p);     \
                                   sikv_grid_dependency();                                      \
                                   NAME##_impl<D, T>(p, dense);                                 \
                               })
#define SIKV_ENTRIES_D_T_COMBINE(NAME, NT) SIKV_FOR_EACH_D_T(SIKV_ENTRY_DT_COMBINE, NAME, (NT))

#define SIKV_ENTRIES_D_T_BOUNDS(NAME, BOUNDS) SIKV_FOR_EACH_D_T(SIKV_ENTRY_DT, NAME, BOUNDS)
#define SIKV_ENTRIES_D_T(NAME, NT) SIKV_ENTRIES_D_T_BOUNDS(NAME, (NT))
// Same, with a minimum of MINB resident blocks per SM asked of the register allocator.
#define SIKV_ENTRIES_D_T_MINB(NAME, NT, MINB) SIKV_ENTRIES_D_T_BOUNDS(NAME, (NT, MINB))

#define SIKV_ENTRY_T(NAME, NT, T, TNAME)                                                   \
    SIKV_IF_##TNAME(extern "C" __global__ void __launch_bounds__(NT) NAME##_##TNAME(const SikvParams p) { \
        sikv_grid_dependency();                                                            \
        if (route_skips(p)) return;                                                        \
        NAME##_impl<T>(p);                                                                 \
    })

#define SIKV_ENTRIES_T(NAME, NT)                   \
    SIKV_ENTRY_T(NAME, NT, f16_t, f16)            \
    SIKV_ENTRY_T(NAME, NT, bf16_t, bf16)

#define SIKV_ENTRY(NAME, NT)                                                       \
    extern "C" __global__ void __launch_bounds__(NT) NAME(const SikvParams p) { \
        sikv_grid_dependency();                                                \
        if (route_skips(p)) return;                                            \
        NAME##_impl(p);                                                        \
    }

// A select kernel that reads, before its grid dependency, inputs its predecessor does not write
// (the page table, the state records, or the outputs of the launch two back): the body calls
// sikv_grid_dependency() itself before it reads what the launch just ahead writes. The
// launch two back is complete when this one starts, because the launch just ahead (compaction,
// final, re-rank score, and score in a routed decode: none of them an early attend) let this
// one launch only after its own wait; behind the score kernel outside a routed decode
// (SIKV_ENTRY_DT_SCORE) the compaction reads nothing before its wait that hist_zero, two back,
// writes. The route word comes from the prologue, two or more launches back. Every block still
// waits before it ends (see SIKV_ENTRY_DT_EARLY). One block per SM is
// asked for: left free, ptxas aimed the 1024-thread top-k kernels at two and spilled.
#define SIKV_ENTRY_LATE_WAIT_MINB(NAME, NT, MINB)                                     \
    extern "C" __global__ void __launch_bounds__(NT, MINB) NAME(const SikvParams p) { \
        if (!route_skips(p)) NAME##_impl(p);                                      \
        sikv_grid_dependency();                                                   \
    }
#define SIKV_ENTRY_LATE_WAIT(NAME, NT) SIKV_ENTRY_LATE_WAIT_MINB(NAME, NT, 1)
// The same for every (head_dim, dtype) variant (the re-rank score: its query and tables are
// made before the body's grid dependency).
#define SIKV_ENTRY_DT_LATE_WAIT(NAME, BOUNDS, D, T, TNAME)                                       \
    SIKV_IF_d##D##_##TNAME(extern "C" __global__ void __launch_bounds__ BOUNDS                  \
                               NAME##_d##D##_##TNAME(const SikvParams p) {                      \
                                   if (!route_skips(p)) NAME##_impl<D, T>(p);                   \
                                   sikv_grid_dependency();                                      \
                               })
#define SIKV_ENTRIES_D_T_LATE_WAIT(NAME, NT) SIKV_FOR_EACH_D_T(SIKV_ENTRY_DT_LATE_WAIT, NAME, (NT))
