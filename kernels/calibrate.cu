// Stage `calibrate` (end of prefill, method §10.4; reference/calibrate.rs). Not a hot path:
// a chain of simple kernels over one sequence, run in this order by src/gpu/mod.rs:
//   init -> centre -> qbar_last -> qmed -> heavy_score -> heavy_select -> scale -> codebook
//   -> encode (mode 1).
// Sums that the CPU does in a fixed order (f64 means, f64 codebook sums, f32 heavy dot
// products) are done sequentially in the same order here, so the results agree bit for bit.
// Every read of K and of the queries goes through sanitize<T> (NaN -> 0, +-inf -> +-max finite)
// and every k - m through centred_key, as cpu::stages and reference/calibrate.rs do, so
// non-finite inputs give the CPU's bits too (docs/DESIGN.md).
#include "common.cuh"

// Tokens [0, n) in order, CALIB_AHEAD of them loaded before the first of them is used: the
// per-channel loops below keep the CPU's token order (f64 sums) on a few blocks, and with one
// load at a time each token waited a memory latency (calibrate took 7.4 ms at 8K and 168 ms at
// 128K, 0.9-1.3 us a token; H100, thirty-fifth session). load(t) -> V only loads (what
// depends on a loaded value is use's, so no load waits for another), use(t, V).
constexpr int CALIB_AHEAD = 16;
template <typename V, typename Load, typename Use>
SIKV_DEV void tokens_in_order(int n, Load load, Use use) {
    int t0 = 0;
    for (; t0 + CALIB_AHEAD <= n; t0 += CALIB_AHEAD) {
        V v[CALIB_AHEAD];
        #pragma unroll
        for (int j = 0; j < CALIB_AHEAD; ++j) v[j] = load(t0 + j);
        #pragma unroll
        for (int j = 0; j < CALIB_AHEAD; ++j) use(t0 + j, v[j]);
    }
    for (; t0 < n; ++t0) use(t0, load(t0));
}

// Zeroes the records of calib_slot (all KV heads), marks every dense entry empty, writes
// prompt_len and calibrated, and sets the per-token heavy ranks in the workspace to -1.
// grid (H_kv), block CALIB_INIT_THREADS.
SIKV_DEV void sikv_calib_init_impl(const SikvParams& p) {
    const int h = blockIdx.x;
    u8* rec = state_record(p, p.calib_slot, h);
    u32* w = reinterpret_cast<u32*>(rec);
    for (int i = threadIdx.x; i < p.state_bytes / 4; i += blockDim.x) w[i] = 0u;
    __syncthreads();
    int* dpos = state_dense_pos(p, rec);
    for (int i = threadIdx.x; i < p.dense_cap; i += blockDim.x) dpos[i] = DENSE_EMPTY;
    if (threadIdx.x == 0) {
        int* meta = state_meta(p, rec);
        meta[META_PROMPT_LEN] = p.n_tokens;
        meta[META_CALIBRATED] = 1;
        meta[META_N_HEAVY] = 0;
    }
    int* rank = reinterpret_cast<int*>(p.ws_rank) + (long long)h * p.n_tokens;
    for (int i = threadIdx.x; i < p.n_tokens; i += blockDim.x) rank[i] = -1;
}
SIKV_ENTRY(sikv_calib_init, CALIB_INIT_THREADS)

// Block-wide lower median by radix select over `n` keys (already in total order), `BITS`
// wide, 8 bits per pass (256 bins). Returns the selected key in every thread. block =
// CALIB_MEDIAN_THREADS (the element loop runs in whole blocks so hist_add sees full warps).
template <int BITS, typename KeyAt>
SIKV_DEV u32 block_lower_median(int n, KeyAt key_at, u32* hist, u32* shared_sel) {
    u32 prefix = 0, mask = 0;
    u32 rank = (u32)((n - 1) / 2);  // 0-based rank from the bottom
    for (int shift = BITS - 8; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        int nround = (n + CALIB_MEDIAN_THREADS - 1) / CALIB_MEDIAN_THREADS * CALIB_MEDIAN_THREADS;
        for (int i = threadIdx.x; i < nround; i += blockDim.x) {
            bool act = false;
            u32 bin = 0;
            if (i < n) {
                u32 key = key_at(i);
                act = (key & mask) == prefix;
                bin = (key >> shift) & 0xffu;
            }
            hist_add(hist, bin, act);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 below = 0;
            for (u32 b = 0; b < 256; ++b) {
                if (below + hist[b] > rank) {
                    shared_sel[0] = b;
                    shared_sel[1] = rank - below;
                    break;
                }
                below += hist[b];
            }
        }
        __syncthreads();
        prefix |= shared_sel[0] << shift;
        mask |= 0xffu << shift;
        rank = shared_sel[1];
        __syncthreads();
    }
    return prefix;
}

// Centre by lower median (torch.median / f32::total_cmp order) of the 16-bit keys.
// grid (H_kv * d), block CALIB_MEDIAN_THREADS.
template <typename T>
SIKV_DEV void sikv_calib_median_impl(const SikvParams& p) {
    __shared__ u32 hist[256];
    __shared__ u32 sel[2];
    const int d = p.head_dim, H = p.num_kv_heads;
    const int h = blockIdx.x / d, c = blockIdx.x % d;
    const T* k = reinterpret_cast<const T*>(p.k);
    float med;
    if constexpr (sizeof(T) == 2) {
        auto key_at = [&](int t) -> u32 {
            return total_key16(sanitize_bits16<T>(bits16(k[((long long)t * H + h) * d + c])));
        };
        u32 key = block_lower_median<16>(p.n_tokens, key_at, hist, sel);
        u16 b = (u16)total_key16_inv(key);
        T x;
        *reinterpret_cast<u16*>(&x) = b;
        med = to_f32(x);
    } else {
        auto key_at = [&](int t) -> u32 {
            return total_key32(__float_as_uint(sanitize<T>(k[((long long)t * H + h) * d + c])));
        };
        u32 key = block_lower_median<32>(p.n_tokens, key_at, hist, sel);
        med = __uint_as_float(total_key32_inv(key));
    }
    if (threadIdx.x == 0) {
        u8* rec = state_record(p, p.calib_slot, h);
        reinterpret_cast<float*>(rec + p.off_centre)[c] = med;
    }
}
SIKV_ENTRIES_T(sikv_calib_median, CALIB_MEDIAN_THREADS)

// Centre by mean: f64 sum in token order, divided by n in f64, rounded once (as the CPU).
// One thread per (head, channel); grid ceil(H*d/CALIB_CHANNEL_THREADS).
template <typename T>
SIKV_DEV void sikv_calib_mean_impl(const SikvParams& p) {
    const int d = p.head_dim, H = p.num_kv_heads;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= H * d) return;
    const int h = i / d, c = i % d;
    const T* k = reinterpret_cast<const T*>(p.k);
    double s = 0.0;
    tokens_in_order<T>(
        p.n_tokens, [&](int t) { return k[((long long)t * H + h) * d + c]; },
        [&](int, T x) { s += (double)sanitize<T>(to_f32(x)); });
    u8* rec = state_record(p, p.calib_slot, h);
    reinterpret_cast<float*>(rec + p.off_centre)[c] = p.n_tokens > 0 ? (float)(s / (double)p.n_tokens) : 0.0f;
}
SIKV_ENTRIES_T(sikv_calib_mean, CALIB_CHANNEL_THREADS)

// Group mean of query row j (reference/score.rs group_mean_query: sum in head order from +0,
// then divide by G).
template <typename T>
SIKV_DEV float group_mean(const SikvParams& p, const T* q, long long row, int h, int c) {
    const int d = p.head_dim, G = p.group;
    const int hq = p.num_kv_heads * G;
    float s = 0.0f;
    for (int g = 0; g < G; ++g) s = add_rn(s, sanitize<T>(to_f32(q[(row * hq + (long long)h * G + g) * d + c])));
    return div_rn(s, (float)G);
}

// qbar of the last prompt query into ws_qbar. One thread per (head, channel).
template <typename T>
SIKV_DEV void sikv_calib_qbar_impl(const SikvParams& p) {
    const int d = p.head_dim, H = p.num_kv_heads;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= H * d) return;
    const int h = i / d, c = i % d;
    reinterpret_cast<float*>(p.ws_qbar)[i] = group_mean(p, reinterpret_cast<const T*>(p.q), p.nq - 1, h, c);
}
SIKV_ENTRIES_T(sikv_calib_qbar, CALIB_CHANNEL_THREADS)

// qmed: per-channel lower median of the nq group-mean query rows (0 when nq < 2; the record
// was zeroed by init). grid (H_kv * d), block CALIB_MEDIAN_THREADS.
template <typename T>
SIKV_DEV void sikv_calib_qmed_impl(const SikvParams& p) {
    __shared__ u32 hist[256];
    __shared__ u32 sel[2];
    if (p.nq < 2) return;
    const int d = p.head_dim;
    const int h = blockIdx.x / d, c = blockIdx.x % d;
    const T* q = reinterpret_cast<const T*>(p.q);
    auto key_at = [&](int j) -> u32 { return total_key32(__float_as_uint(group_mean(p, q, j, h, c))); };
    u32 key = block_lower_median<32>(p.nq, key_at, hist, sel);
    if (threadIdx.x == 0) {
        u8* rec = state_record(p, p.calib_slot, h);
        reinterpret_cast<float*>(rec + p.off_qmed)[c] = __uint_as_float(total_key32_inv(key));
    }
}
SIKV_ENTRIES_T(sikv_calib_qmed, CALIB_MEDIAN_THREADS)

// Heavy scores s_t = (k_t - m) . qbar_last (f32, channel order) for t in [S, n - W), as
// radix keys into ws_keys[h][t - S]. One thread per (token, head); grid
// (ceil(n/CALIB_HEAVY_SCORE_THREADS), H).
template <int D, typename T>
SIKV_DEV void sikv_calib_heavy_score_impl(const SikvParams& p) {
    __shared__ float ql[D];
    __shared__ float m[D];
    const int h = blockIdx.y, H = p.num_kv_heads;
    u8* rec = state_record(p, p.calib_slot, h);
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        ql[c] = reinterpret_cast<const float*>(p.ws_qbar)[h * D + c];
        m[c] = reinterpret_cast<const float*>(rec + p.off_centre)[c];
    }
    __syncthreads();
    const int lo = p.n_sink;
    const int hi = p.n_tokens - p.n_window;
    const int t = lo + blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= hi) return;
    const T* krow = reinterpret_cast<const T*>(p.k) + ((long long)t * H + h) * D;
    constexpr int V = 16 / sizeof(T);
    float s = 0.0f;
    for (int c0 = 0; c0 < D; c0 += V) {
        float kv[V];
        load_vec<T, V>(krow + c0, kv);
        #pragma unroll
        for (int i = 0; i < V; ++i) s = add_rn(s, mul_rn(centred_key(sanitize<T>(kv[i]), m[c0 + i]), ql[c0 + i]));
    }
    reinterpret_cast<u32*>(p.ws_keys)[(long long)h * p.key_stride + (t - lo)] = score_key(s);
}
SIKV_ENTRIES_D_T(sikv_calib_heavy_score, CALIB_HEAVY_SCORE_THREADS)

// Heavy set: top n_heavy of the scores (ties: smaller position), ascending, into dense
// entries S + i; ranks into ws_rank; meta n_heavy. grid (H_kv), block
// CALIB_HEAVY_SELECT_THREADS.
SIKV_DEV void sikv_calib_heavy_select_impl(const SikvParams& p) {
    __shared__ RadixSmem s;
    __shared__ u32 hist2[RADIX_BINS];
    const int h = blockIdx.x;
    const int lo = p.n_sink, hi = p.n_tokens - p.n_window;
    const int n = hi > lo ? hi - lo : 0;
    const int k = (p.n_heavy < n) ? p.n_heavy : n;
    u8* rec = state_record(p, p.calib_slot, h);
    if (threadIdx.x == 0) state_meta(p, rec)[META_N_HEAVY] = k;
    if (k <= 0) return;
    const u32* keys = reinterpret_cast<const u32*>(p.ws_keys) + (long long)h * p.key_stride;
    int* dpos = state_dense_pos(p, rec);
    int* rank = reinterpret_cast<int*>(p.ws_rank) + (long long)h * p.n_tokens;
    block_topk<CALIB_HEAVY_SELECT_THREADS>(s, hist2, n, k, [&](int i) { return keys[i]; }, [&](int r, int i) {
        dpos[p.n_sink + r] = lo + i;
        rank[lo + i] = r;
    });
}
SIKV_ENTRY(sikv_calib_heavy_select, CALIB_HEAVY_SELECT_THREADS)

// Is token t (heavy rank `rank`, -1 when not heavy) in the codebook/scale set: not a sink and
// not heavy, or every token when that set is empty (reference/calibrate.rs codebook_tokens).
SIKV_DEV bool in_codebook_set(const SikvParams& p, int rank, int t, bool all) {
    return all || (t >= p.n_sink && rank < 0);
}
// A token's key and heavy rank, as tokens_in_order loads them.
template <typename T, int N>
struct TokenKey {
    struct __align__(N * sizeof(T)) Chunk { T e[N]; } k;
    int rank;
};
template <typename T, int N>
SIKV_DEV TokenKey<T, N> load_token_key(const T* k, const int* rank, int t) {
    return {*reinterpret_cast<const typename TokenKey<T, N>::Chunk*>(k), rank[t]};
}

SIKV_DEV bool codebook_set_is_all(const SikvParams& p, u8* rec) {
    int n = p.n_tokens;
    int sinks = p.n_sink < n ? p.n_sink : n;
    return n - sinks - state_meta(p, rec)[META_N_HEAVY] <= 0;
}

// Scale a_c = max |k'_c| over the set, at least 1e-6; inv = 1/a. One thread per (head, channel).
template <typename T>
SIKV_DEV void sikv_calib_scale_impl(const SikvParams& p) {
    const int d = p.head_dim, H = p.num_kv_heads;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= H * d) return;
    const int h = i / d, c = i % d;
    u8* rec = state_record(p, p.calib_slot, h);
    const float m = reinterpret_cast<const float*>(rec + p.off_centre)[c];
    const int* rank = reinterpret_cast<const int*>(p.ws_rank) + (long long)h * p.n_tokens;
    const bool all = codebook_set_is_all(p, rec);
    const T* k = reinterpret_cast<const T*>(p.k);
    float a = 0.0f;
    tokens_in_order<TokenKey<T, 1>>(
        p.n_tokens, [&](int t) { return load_token_key<T, 1>(k + ((long long)t * H + h) * d + c, rank, t); },
        [&](int t, const TokenKey<T, 1>& v) {
            if (in_codebook_set(p, v.rank, t, all)) a = fmaxf(a, fabsf(centred_key(sanitize<T>(to_f32(v.k.e[0])), m)));
        });
    a = fmaxf(a, 1e-6f);
    reinterpret_cast<float*>(rec + p.off_scale)[c] = a;
    reinterpret_cast<float*>(rec + p.off_inv_scale)[c] = div_rn(1.0f, a);
}
SIKV_ENTRIES_T(sikv_calib_scale, CALIB_CHANNEL_THREADS)

// Codebook: per sub-vector s, conditional means of k'[4s..4s+4] per sign pattern (!signbit),
// f64 sums in token order; empty cells get (2 bit_i(u) - 1) * mean |k'_{4s+i}|.
// One thread per (head, sub-vector, pattern u), each reading every token of its sub-vector
// (shared by the 16 lanes of its sub-vector) and summing those of its pattern: one thread per
// sub-vector read and wrote its 16 patterns' sums in local memory a token (the kernel: 5.8 ms
// a call on average in the 8K calibrate bench, 1.6 this way; H100). Each thread also keeps
// the set's |k'| sums and count, which only an empty cell needs: the same for the 16, made by
// each rather than shared through a barrier.
// grid ceil(H*d/4*16 / CALIB_CODEBOOK_THREADS).
template <typename T>
SIKV_DEV void sikv_calib_codebook_impl(const SikvParams& p) {
    const int d = p.head_dim, H = p.num_kv_heads, nsub = d / SUBVEC;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= H * nsub * CENTROIDS) return;
    const int u = i % CENTROIDS, s = (i / CENTROIDS) % nsub, h = i / (CENTROIDS * nsub);
    u8* rec = state_record(p, p.calib_slot, h);
    const float* centre = reinterpret_cast<const float*>(rec + p.off_centre);
    float m[SUBVEC];
    #pragma unroll
    for (int j = 0; j < SUBVEC; ++j) m[j] = centre[SUBVEC * s + j];
    const int* rank = reinterpret_cast<const int*>(p.ws_rank) + (long long)h * p.n_tokens;
    const bool all = codebook_set_is_all(p, rec);
    const T* k = reinterpret_cast<const T*>(p.k);
    double sum[SUBVEC], abs_sum[SUBVEC];
    #pragma unroll
    for (int j = 0; j < SUBVEC; ++j) sum[j] = abs_sum[j] = 0.0;
    unsigned long long cnt = 0;
    long long nset = 0;
    typedef TokenKey<T, SUBVEC> Key;
    auto load = [&](int t) { return load_token_key<T, SUBVEC>(k + ((long long)t * H + h) * d + SUBVEC * s, rank, t); };
    tokens_in_order<Key>(p.n_tokens, load, [&](int t, const Key& v) {
        if (!in_codebook_set(p, v.rank, t, all)) return;
        ++nset;
        float x[SUBVEC];
        int code = 0;
        #pragma unroll
        for (int j = 0; j < SUBVEC; ++j) {
            x[j] = centred_key(sanitize<T>(to_f32(v.k.e[j])), m[j]);
            if (!sign_negative(x[j])) code |= 1 << j;
        }
        const bool mine = code == u;
        cnt += mine ? 1 : 0;
        #pragma unroll
        for (int j = 0; j < SUBVEC; ++j) {
            if (mine) sum[j] += (double)x[j];
            abs_sum[j] += (double)fabsf(x[j]);
        }
    });
    double ns = nset > 0 ? (double)nset : 1.0;
    float* cb = reinterpret_cast<float*>(rec + p.off_codebook) + ((long long)s * CENTROIDS + u) * SUBVEC;
    #pragma unroll
    for (int j = 0; j < SUBVEC; ++j) {
        float v;
        if (cnt > 0) {
            v = (float)(sum[j] / (double)cnt);
        } else {
            double mag = abs_sum[j] / ns;
            v = (float)(((u >> j) & 1) ? mag : -mag);
        }
        cb[j] = v;
    }
}
SIKV_ENTRIES_T(sikv_calib_codebook, CALIB_CODEBOOK_THREADS)
