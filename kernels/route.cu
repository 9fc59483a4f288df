// Stage `prologue` of a routed decode (src/gpu/launch.rs decode_routed).
//
// 1. The multi-CTA top-k's histograms and candidate counters start at zero: each block zeroes
//    its row (the score kernel adds into it, the final select expects a zero counter), as the
//    memset of a plain select does; one node instead of two.
// 2. The route (ws_route set): the page table lives on the device, so the host cannot
//    apply the dense crossover to the live lengths (it knows only max_seq_len, and a captured
//    CUDA graph must stay valid when the lengths grow). Block (0, 0)'s first warp sums the live
//    lengths (common.cuh route_dense_sum) and writes the route word; the sparse path's launches
//    and combine read the word, and return unless they belong to the route it names
//    (route_skips). The dense decode sums the lengths itself, as it may run beside this kernel.
#ifndef SIKV_ROUTE_CU
#define SIKV_ROUTE_CU
#include "common.cuh"

SIKV_DEV void sikv_prologue_impl(const SikvParams& p) {
    const int h = blockIdx.x, r = blockIdx.y, tid = threadIdx.x;
    if (p.topk_multi) {
        uint4* row = reinterpret_cast<uint4*>(
            reinterpret_cast<u32*>(p.ws_hist) + ((long long)r * p.num_kv_heads + h) * TOPK_HIST_STRIDE);
        for (int i = tid; i < TOPK_HIST_STRIDE / 4; i += PROLOGUE_THREADS) row[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    if (p.ws_route == 0 || h != 0 || r != 0 || tid >= 32) return;
    const bool dense = route_dense_sum(p);
    if (tid == 0) *reinterpret_cast<u32*>(p.ws_route) = dense ? 1u : 0u;
}
SIKV_ENTRY(sikv_prologue, PROLOGUE_THREADS)

#endif
