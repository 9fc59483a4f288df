// Stage `prologue` of a routed decode (src/gpu/launch.rs decode_routed).
//
// 1. The multi-CTA top-k's histograms and candidate counters start at zero: each block zeroes
//    its row (the score kernel adds into it, the final select expects a zero counter), as the
//    memset of a plain select does; one node instead of two.
// 2. The route (ws_route set): the page table lives on the device, so the host cannot
//    apply the dense crossover to the live lengths (it knows only max_seq_len, and a captured
//    CUDA graph must stay valid when the lengths grow). Block (0, 0) sums the live lengths
//    (config.rs Crossover's rule: dense when the sum is at most route_max_tokens) and writes the
//    route word; the launches after it read the word and return unless they belong to the
//    route it names (common.cuh route_skips).
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
    if (p.ws_route == 0 || h != 0 || r != 0) return;
    // Rows with a bad slot or page table count as empty (row_seq raises their fault, as the
    // stages that read them would).
    __shared__ unsigned long long part[PROLOGUE_THREADS / 32];
    unsigned long long total = 0;
    for (int b = tid; b < p.batch; b += PROLOGUE_THREADS) {
        int slot;
        total += (unsigned long long)row_seq(p, b, &slot);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    if ((tid & 31) == 0) part[tid >> 5] = total;
    __syncthreads();
    if (tid == 0) {
        unsigned long long sum = 0;
        #pragma unroll
        for (int w = 0; w < PROLOGUE_THREADS / 32; ++w) sum += part[w];
        *reinterpret_cast<u32*>(p.ws_route) = sum <= p.route_max_tokens ? 1u : 0u;
    }
}
SIKV_ENTRY(sikv_prologue, PROLOGUE_THREADS)

#endif
