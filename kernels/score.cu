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

// Group-mean query (reference/score.rs order) of sequence b, KV head h into smem (d floats).
template <int D, typename T>
SIKV_DEV void load_qbar(const SikvParams& p, int b, int h, float* qbar) {
    const T* q = reinterpret_cast<const T*>(p.q);
    const int G = p.group, hq = p.num_kv_heads * G;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float s = 0.0f;
        for (int g = 0; g < G; ++g) s = add_rn(s, to_f32(q[((long long)b * hq + (long long)h * G + g) * D + c]));
        qbar[c] = div_rn(s, (float)G);
    }
}

// Sign row of D/8 bytes -> its D/4 nibble codes' LUT sum, in sub-vector order.
template <int D>
SIKV_DEV float lut_sum(const float* lut, const u8* row) {
    u32 w[D / 32];
    if constexpr (D == 64) {
        uint2 x = *reinterpret_cast<const uint2*>(row);
        w[0] = x.x; w[1] = x.y;
    } else {
        #pragma unroll
        for (int i = 0; i < D / 128; ++i) {
            uint4 x = reinterpret_cast<const uint4*>(row)[i];
            w[4 * i] = x.x; w[4 * i + 1] = x.y; w[4 * i + 2] = x.z; w[4 * i + 3] = x.w;
        }
    }
    float acc = 0.0f;
    #pragma unroll
    for (int s = 0; s < D / 4; ++s) {
        u32 code = (w[s >> 3] >> (4 * (s & 7))) & 0xFu;  // nibble s: channels 4s..4s+3
        acc = add_rn(acc, lut[s * CENTROIDS + code]);
    }
    return acc;
}

template <int D, typename T>
SIKV_DEV void sikv_score_impl(const SikvParams& p) {
    __shared__ float qbar[D];
    __shared__ float lut[(D / 4) * CENTROIDS];
    __shared__ u32 heavy_mask[SCORE_TILE / 32];
    __shared__ u32 hist[TOPK_HIST_BINS];
    const int b = blockIdx.z, h = blockIdx.y;
    int slot;
    const int len = row_seq(p, b, &slot);
    const int end = cand_end(p, len);
    const int tile0 = p.n_sink + blockIdx.x * SCORE_TILE;
    if (tile0 >= end) return;  // uniform per block: nothing of this tile is a candidate
    u8* rec = state_record(p, slot, h);
    const int* meta = state_meta(p, rec);
    const int* dpos = state_dense_pos(p, rec);
    const int prompt_len = meta[META_PROMPT_LEN];

    load_qbar<D, T>(p, b, h, qbar);
    for (int i = threadIdx.x; i < SCORE_TILE / 32; i += blockDim.x) heavy_mask[i] = 0;
    if (p.topk_multi)
        for (int i = threadIdx.x; i < TOPK_HIST_BINS; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    // Heavy positions inside this tile -> bitmap (any order of the heavy list works).
    for (int i = threadIdx.x; i < p.n_heavy; i += blockDim.x) {
        int hp = dpos[p.n_sink + i] - tile0;
        if (hp >= 0 && hp < SCORE_TILE) atomicOr(&heavy_mask[hp >> 5], 1u << (hp & 31));
    }
    // LUT: T[s][u] = sum_i C[s][u][i] * qbar[4s+i] (LUT selector), or
    //      T[s][u] = sum_i (bit_i(u) ? 1 : -1) * sgn(qbar - qmed) (sign x sign selector).
    if (p.selector == 0) {
        const float* cb = reinterpret_cast<const float*>(rec + p.off_codebook);
        for (int e = threadIdx.x; e < (D / 4) * CENTROIDS; e += blockDim.x) {
            const int s = e / CENTROIDS;
            float4 c = reinterpret_cast<const float4*>(cb)[e];
            float t = 0.0f;
            t = add_rn(t, mul_rn(c.x, qbar[4 * s + 0]));
            t = add_rn(t, mul_rn(c.y, qbar[4 * s + 1]));
            t = add_rn(t, mul_rn(c.z, qbar[4 * s + 2]));
            t = add_rn(t, mul_rn(c.w, qbar[4 * s + 3]));
            lut[e] = t;
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
    __syncthreads();

    const long long rowid = (long long)b * p.num_kv_heads + h;
    u32* keys = reinterpret_cast<u32*>(p.ws_keys) + rowid * p.key_stride;
    // Multi-CTA top-k: histogram of the top 11 bits of this tile's candidate keys (key 0 =
    // heavy / not a candidate is left out, so a row's bins sum to its candidate count), added
    // into the row's global histogram (zeroed on the stream before this kernel) at the end.
    // Counted as each key is made: holding the tile's keys for a second loop cost 8 registers
    // a thread and with them resident blocks.
    #pragma unroll
    for (int j = 0; j < SCORE_TOKENS_PER_THREAD; ++j) {
        const int off = j * SCORE_THREADS + threadIdx.x;
        const int pos = tile0 + off;
        u32 key = 0u;
        if (pos < end) {
            if ((heavy_mask[off >> 5] >> (off & 31)) & 1u) {
                key = 0u;
            } else if (p.force_generated && pos >= prompt_len) {
                key = score_key(SIKV_INF);
            } else {
                const long long r = row_index(p, b, h, pos);
                // A position on a page outside the pool is no candidate (fault raised).
                key = r < 0 ? 0u : score_key(lut_sum<D>(lut, plane_row(p, SIKV_PLANE_SIGN, r)));
            }
            keys[pos] = key;
            if (p.topk_multi && key != 0u) atomicAdd(&hist[key >> TOPK_HIST_SHIFT], 1u);
        }
    }
    if (p.topk_multi) {
        __syncthreads();
        u32* ghist = reinterpret_cast<u32*>(p.ws_hist) + rowid * TOPK_HIST_STRIDE;
        for (int i = threadIdx.x; i < TOPK_HIST_BINS; i += blockDim.x) {
            const u32 c = hist[i];
            if (c) atomicAdd(&ghist[i], c);
        }
    }
}
SIKV_ENTRIES_D_T(sikv_score, SCORE_THREADS)

// Stage-2 scores (reference/rerank.rs): qbar . k'^ for each stage-1 survivor, k'^ decoded as
// decode_key does ((code * delta + zero), signed, times a_c; or the stored 16-bit k'),
// summed in channel order. One thread per survivor; grid (ceil(stage1_max/128), H_kv, B).
template <int D, typename T>
SIKV_DEV void sikv_rerank_score_impl(const SikvParams& p) {
    typedef typename Storage<T>::type S;
    __shared__ float qbar[D];
    __shared__ float scale[D];
    const int b = blockIdx.z, h = blockIdx.y;
    const long long rowid = (long long)b * p.num_kv_heads + h;
    const int n1 = reinterpret_cast<const int*>(p.ws_list_n)[2 * rowid];
    const int i0 = blockIdx.x * blockDim.x;
    if (i0 >= n1) return;
    // Stage 1 saw the same slot and page table: a bad slot left n1 = 0, a bad page key 0.
    const int slot = batch_slot(p, b);
    if (slot < 0) return;
    u8* rec = state_record(p, slot, h);
    const int prompt_len = state_meta(p, rec)[META_PROMPT_LEN];
    load_qbar<D, T>(p, b, h, qbar);
    for (int c = threadIdx.x; c < D; c += blockDim.x) scale[c] = reinterpret_cast<const float*>(rec + p.off_scale)[c];
    __syncthreads();
    const int i = i0 + threadIdx.x;
    if (i >= n1) return;
    const int pos = reinterpret_cast<const int*>(p.ws_list)[rowid * p.stage1_max + i];
    u32 key;
    if (p.force_generated && pos >= prompt_len) {
        key = score_key(SIKV_INF);
    } else {
        const long long row = row_index(p, b, h, pos);
        float acc = 0.0f;
        if (row < 0) {
            // Page outside the pool (fault raised): no candidate, like stage 1's key 0.
        } else if (p.key_bits == 16) {
            const S* kf = reinterpret_cast<const S*>(plane_row(p, SIKV_PLANE_KFULL, row));
            for (int c0 = 0; c0 < D; c0 += 8) {
                float kv[8];
                load_vec<S, 8>(kf + c0, kv);
                #pragma unroll
                for (int j = 0; j < 8; ++j) acc = add_rn(acc, mul_rn(qbar[c0 + j], kv[j]));
            }
        } else {
            const u8* sign = plane_row(p, SIKV_PLANE_SIGN, row);
            const u8* kmag = plane_row(p, SIKV_PLANE_KMAG, row);
            const u32* kpar = reinterpret_cast<const u32*>(plane_row(p, SIKV_PLANE_KPAR, row));
            const int bits = p.key_bits;
            for (int g = 0; g < D / 32; ++g) {
                const u32 sw = reinterpret_cast<const u32*>(sign)[g];
                const u32 par = kpar[g];
                const float delta = half_bits_to_f32((u16)(par & 0xffffu));
                const float zero = half_bits_to_f32((u16)(par >> 16));
                // The group's 32 codes: 64 bits (2-bit) or 128 bits (4-bit).
                u64 cw[2];
                if (bits == 2) { cw[0] = reinterpret_cast<const u64*>(kmag)[g]; cw[1] = 0; }
                else { cw[0] = reinterpret_cast<const u64*>(kmag)[2 * g]; cw[1] = reinterpret_cast<const u64*>(kmag)[2 * g + 1]; }
                for (int j = 0; j < 32; ++j) {
                    const int bit = j * bits;
                    const u32 code = (u32)((cw[bit >> 6] >> (bit & 63)) & (u64)((1u << bits) - 1));
                    float mag = add_rn(mul_rn((float)code, delta), zero);
                    float xh = ((sw >> j) & 1u) ? mag : -mag;
                    const int c = g * 32 + j;
                    acc = add_rn(acc, mul_rn(qbar[c], mul_rn(xh, scale[c])));
                }
            }
        }
        key = row < 0 ? 0u : score_key(acc);
    }
    reinterpret_cast<u32*>(p.ws_keys2)[rowid * p.stage1_max + i] = key;
}
SIKV_ENTRIES_D_T(sikv_rerank_score, RERANK_THREADS)
