// Stage `topk` (method §10.6 K4; reference/topk.rs): per (sequence, KV head) row, one CTA of
// 1024 threads runs a radix select over the order-preserving u32 keys of the scores (ties to
// the smaller position) and writes the chosen positions in ascending order, the rest of the
// row -1, and the count. k comes from the budget rule evaluated on the device from the live
// length in the page table, so the grid (H_kv, batch) never depends on live lengths.
//
// Two-stage selection: stage 1 keeps min(n_cand, rerank_factor * k) survivors into the
// workspace; rerank_score (score.cu) re-scores them with the dequantised key; stage 2 keeps k.
#include "common.cuh"

#define TOPK_THREADS 1024

// Number of candidates: [S, end) minus heavy positions inside it.
SIKV_DEV int count_candidates(const SikvParams& p, const int* dpos, int end, int* smem_count) {
    if (threadIdx.x == 0) *smem_count = 0;
    __syncthreads();
    int mine = 0;
    for (int i = threadIdx.x; i < p.n_heavy; i += blockDim.x) {
        int hp = dpos[p.n_sink + i];
        if (hp >= p.n_sink && hp < end) ++mine;
    }
    mine = warp_sum_int(mine);
    if ((threadIdx.x & 31) == 0 && mine) atomicAdd(smem_count, mine);
    __syncthreads();
    int range = end - p.n_sink;
    return range - *smem_count;
}

SIKV_DEV void sikv_topk_stage1_impl(const SikvParams& p) {
    __shared__ RadixSmem s;
    __shared__ int heavy_in_range;
    const int b = blockIdx.y, h = blockIdx.x;
    const long long rowid = (long long)b * p.num_kv_heads + h;
    const int len = seq_len(p, b);
    const int end = cand_end(p, len);
    const int slot = reinterpret_cast<const int*>(p.seq_slot)[b];
    u8* rec = state_record(p, slot, h);
    const int* dpos = state_dense_pos(p, rec);
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
        block_topk<TOPK_THREADS>(s, n, ksel, [&](int i) { return keys[i]; }, [&](int r, int i) { list[r] = S + i; });
        if (threadIdx.x == 0) {
            reinterpret_cast<int*>(p.ws_list_n)[2 * rowid] = ksel;
            reinterpret_cast<int*>(p.ws_list_n)[2 * rowid + 1] = k;
        }
    } else {
        int* out = reinterpret_cast<int*>(p.indices) + rowid * p.budget_max;
        block_topk<TOPK_THREADS>(s, n, ksel, [&](int i) { return keys[i]; }, [&](int r, int i) { out[r] = S + i; });
        for (int r = ksel + threadIdx.x; r < p.budget_max; r += blockDim.x) out[r] = -1;
        if (threadIdx.x == 0) reinterpret_cast<int*>(p.counts)[rowid] = ksel;
    }
}
SIKV_ENTRY(sikv_topk_stage1, TOPK_THREADS)

SIKV_DEV void sikv_topk_stage2_impl(const SikvParams& p) {
    __shared__ RadixSmem s;
    const int b = blockIdx.y, h = blockIdx.x;
    const long long rowid = (long long)b * p.num_kv_heads + h;
    const int n1 = reinterpret_cast<const int*>(p.ws_list_n)[2 * rowid];
    const int k = reinterpret_cast<const int*>(p.ws_list_n)[2 * rowid + 1];
    const int* list = reinterpret_cast<const int*>(p.ws_list) + rowid * p.stage1_max;
    const u32* keys = reinterpret_cast<const u32*>(p.ws_keys2) + rowid * p.stage1_max;
    int* out = reinterpret_cast<int*>(p.indices) + rowid * p.budget_max;
    // The list is ascending, so ties by list index are ties by position.
    block_topk<TOPK_THREADS>(s, n1, k, [&](int i) { return keys[i]; }, [&](int r, int i) { out[r] = list[i]; });
    for (int r = k + threadIdx.x; r < p.budget_max; r += blockDim.x) out[r] = -1;
    if (threadIdx.x == 0) reinterpret_cast<int*>(p.counts)[rowid] = k;
}
SIKV_ENTRY(sikv_topk_stage2, TOPK_THREADS)
