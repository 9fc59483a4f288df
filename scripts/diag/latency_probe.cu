// The fixed costs a small-batch decode step is made of, measured on the device itself: a kernel
// launch in a graph chain (with and without programmatic dependent launch), a grid-wide barrier
// inside one co-resident launch, eight rounds of one dependent round trip as a chain of launches
// against one cooperative launch with grid barriers, a cluster barrier, a block barrier, one
// dependent load from L2 and from device memory, and the two ways of merging split partials (a
// kernel of its own, or the last block of the grid after a ticket). The decode step at batch 1 is
// a chain of eight launches whose work is a few round trips each (docs/PERF_NOTES.md); these
// figures say what a persistent launch with grid barriers, or a fused merge, would save before
// either is built.
//
// Build and run (step `probe` of scripts/gpu_check.sh does both): nvcc -O3 -std=c++17
// -arch=sm_90 latency_probe.cu -o latency_probe && ./latency_probe [csv]. Times: CUDA events
// around graph replays or single launches, after warm-up, the median of many; figures in
// microseconds unless the row says otherwise.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#define CK(x)                                                                                    \
    do {                                                                                         \
        cudaError_t e_ = (x);                                                                    \
        if (e_ != cudaSuccess) {                                                                 \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            std::exit(1);                                                                        \
        }                                                                                        \
    } while (0)

__device__ __forceinline__ void grid_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void grid_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* a) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(a) : "memory");
    return v;
}
__device__ __forceinline__ unsigned ld_cg(const unsigned* a) {
    unsigned v;
    asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(a) : "memory");
    return v;
}

// --- launches --------------------------------------------------------------------------------
// A kernel with no work: with pdl, it waits for the grid ahead and lets the next one launch, as
// the library's stage kernels do. One block writes a word so the launch is not empty.
__global__ void k_empty(unsigned* sink, int pdl) {
    if (pdl) {
        grid_wait();
        grid_launch_dependents();
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) sink[0] += 1u;
}
// The same with one dependent round trip after the wait: every block reads the word the grid
// ahead wrote (through L2) and writes its own, the least a stage that consumes its predecessor
// does.
__global__ void k_one_load(unsigned* buf, int pdl) {
    if (pdl) grid_wait();
    if (threadIdx.x == 0) {
        const unsigned v = ld_cg(buf + blockIdx.x);
        buf[blockIdx.x] = v + 1u;
    }
    if (pdl) grid_launch_dependents();
}

// --- barriers inside one launch --------------------------------------------------------------
// A grid barrier over co-resident blocks: block leaders add to a counter; the last resets it
// and bumps the generation the others wait on.
__device__ void grid_barrier(unsigned* count, unsigned* gen, unsigned nblocks) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned g = ld_acquire(gen);
        __threadfence();
        if (atomicAdd(count, 1u) == nblocks - 1u) {
            *count = 0u;
            __threadfence();
            atomicAdd(gen, 1u);
        } else {
            while (ld_acquire(gen) == g) {
            }
        }
        __threadfence();
    }
    __syncthreads();
}
__global__ void k_grid_barriers(unsigned* count, unsigned* gen, int n) {
    for (int i = 0; i < n; ++i) grid_barrier(count, gen, gridDim.x);
}
// The step's shape in one launch: `stages` rounds of one dependent round trip per block (read a
// word another block wrote in the round before, write its own into the other half), a grid
// barrier between rounds; against the same rounds as a chain of launches of k_one_load.
__global__ void k_persistent_rounds(unsigned* buf, unsigned* count, unsigned* gen, int stages) {
    const unsigned G = gridDim.x;
    for (int i = 0; i < stages; ++i) {
        const unsigned* src = buf + (i & 1) * G;
        unsigned* dst = buf + ((i + 1) & 1) * G;
        if (threadIdx.x == 0) dst[blockIdx.x] = ld_cg(src + (blockIdx.x + i) % G) + 1u;
        grid_barrier(count, gen, G);
    }
}
__global__ void k_cluster_barriers(int n, unsigned* sink) {
    for (int i = 0; i < n; ++i) {
        asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
        asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) sink[0] = n;
}
// Block barriers: cycles per __syncthreads, every thread writing shared memory between them
// (two buffers, so each read is of the previous round's writes).
__global__ void k_block_barriers(int n, unsigned long long* cycles) {
    __shared__ unsigned s[2][1024];
    s[0][threadIdx.x] = s[1][threadIdx.x] = threadIdx.x;
    __syncthreads();
    const long long t0 = clock64();
    for (int i = 0; i < n; ++i) {
        s[i & 1][threadIdx.x] = i + s[(i + 1) & 1][(threadIdx.x + 1) % blockDim.x];
        __syncthreads();
    }
    const long long t1 = clock64();
    if (threadIdx.x == 0) cycles[blockIdx.x] = (unsigned long long)(t1 - t0) + (s[0][0] & 1u);
}

// --- load latency ----------------------------------------------------------------------------
// One thread follows a random cycle of indices (ld.cg: L2, not L1).
__global__ void k_chase(const unsigned* next, int hops, unsigned* out) {
    unsigned i = 0;
    for (int h = 0; h < hops; ++h) i = ld_cg(next + i);
    out[0] = i;
}

// --- merging partials ------------------------------------------------------------------------
// P blocks of 128 threads (the attend's block) each write a partial of W floats (one KV head's
// four query heads x 128 channels); the merge sums the P partials. Either a merge kernel of one
// block of 512 threads runs behind them, or the grid's last block to finish merges after a
// ticket. One KV head's merge: the eight of batch 1 run side by side and add no latency.
constexpr int W = 512;
__global__ void k_partials(float* part, int pdl) {
    if (pdl) {
        grid_wait();
        grid_launch_dependents();
    }
    for (int c = threadIdx.x; c < W; c += blockDim.x) part[(size_t)blockIdx.x * W + c] = blockIdx.x + c * 0.5f;
}
__global__ void k_merge(const float* part, int nparts, float* out, int pdl) {
    if (pdl) {
        grid_wait();
        grid_launch_dependents();
    }
    for (int c = threadIdx.x; c < W; c += blockDim.x) {
        float s = 0.0f;
        for (int j = 0; j < nparts; ++j) s += __ldcg(part + (size_t)j * W + c);
        out[c] = s;
    }
}
// The same merge done by the grid's last block to finish (a ticket on a counter it resets).
__global__ void k_partials_last_merges(float* part, unsigned* ticket, float* out, int pdl) {
    __shared__ bool last;
    if (pdl) {
        grid_wait();
        grid_launch_dependents();
    }
    for (int c = threadIdx.x; c < W; c += blockDim.x) part[(size_t)blockIdx.x * W + c] = blockIdx.x + c * 0.5f;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1u;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int c = threadIdx.x; c < W; c += blockDim.x) {
        float s = 0.0f;
        for (int j = 0; j < (int)gridDim.x; ++j) s += __ldcg(part + (size_t)j * W + c);
        out[c] = s;
    }
    if (threadIdx.x == 0) *ticket = 0u;
}

// --- timing helpers --------------------------------------------------------------------------
struct Timer {
    cudaEvent_t a, b;
    Timer() {
        CK(cudaEventCreate(&a));
        CK(cudaEventCreate(&b));
    }
    ~Timer() {
        cudaEventDestroy(a);
        cudaEventDestroy(b);
    }
};
static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}
// Launch f<<<grid, block>>> with or without the programmatic-serialization attribute.
template <typename... Params, typename... Args>
static void launch(void (*f)(Params...), int grid, int block, cudaStream_t s, bool pdl, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(block);
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, f, args...));
}
// Microseconds per repetition of `body` (what it enqueues on s), captured `copies` times into
// one graph and replayed: the median over `reps` replays, divided by copies.
template <typename F>
static float graph_us(cudaStream_t s, int copies, int reps, F body) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < copies; ++i) body();
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    Timer t;
    std::vector<float> ms;
    for (int r = 0; r < reps + 10; ++r) {
        CK(cudaEventRecord(t.a, s));
        CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(t.b, s));
        CK(cudaEventSynchronize(t.b));
        float x;
        CK(cudaEventElapsedTime(&x, t.a, t.b));
        if (r >= 10) ms.push_back(x);
    }
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return median(ms) * 1000.0f / copies;
}
// Microseconds of one launch of `body` (eager, events around it): the median over reps.
template <typename F>
static float eager_us(cudaStream_t s, int reps, F body) {
    Timer t;
    std::vector<float> ms;
    for (int r = 0; r < reps + 5; ++r) {
        CK(cudaEventRecord(t.a, s));
        body();
        CK(cudaEventRecord(t.b, s));
        CK(cudaEventSynchronize(t.b));
        float x;
        CK(cudaEventElapsedTime(&x, t.a, t.b));
        if (r >= 5) ms.push_back(x);
    }
    return median(ms) * 1000.0f;
}

struct Row {
    std::string name;
    float value;
    std::string unit;
};

int main(int argc, char** argv) {
    const char* csv = argc > 1 ? argv[1] : nullptr;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    int sms = 0, khz = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
    std::printf("latency probe on %s, %d SMs, %.0f MHz\n", prop.name, sms, khz / 1000.0);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    std::vector<Row> rows;
    unsigned *sink, *buf, *count, *gen, *ticket;
    CK(cudaMalloc(&sink, 4096));
    CK(cudaMalloc(&buf, 1 << 20));  // (k_persistent_rounds uses 2 x its grid words)
    CK(cudaMalloc(&count, 4));
    CK(cudaMalloc(&gen, 4));
    CK(cudaMalloc(&ticket, 4));
    CK(cudaMemset(sink, 0, 4096));
    CK(cudaMemset(buf, 0, 1 << 20));
    CK(cudaMemset(count, 0, 4));
    CK(cudaMemset(gen, 0, 4));
    CK(cudaMemset(ticket, 0, 4));
    const int copies = 32, reps = 200;

    // 1. A launch in a graph chain: empty, and with one dependent round trip, at 1 block, one
    //    block per SM and four per SM, plain and with programmatic dependent launch.
    for (int pdl = 0; pdl <= 1; ++pdl) {
        for (int g : {1, sms, 4 * sms}) {
            const float e = graph_us(s, copies, reps, [&] { launch(k_empty, g, 128, s, pdl != 0, sink, pdl); });
            const float l = graph_us(s, copies, reps, [&] { launch(k_one_load, g, 128, s, pdl != 0, buf, pdl); });
            const std::string tag = std::string(pdl ? "pdl" : "plain") + " grid " + std::to_string(g);
            rows.push_back({"launch, empty, " + tag, e, "us per launch"});
            rows.push_back({"launch, one dependent load, " + tag, l, "us per launch"});
        }
    }

    // 2. A grid barrier inside one cooperative launch (all blocks co-resident), at one, two and
    //    four blocks of 128 threads per SM: (t(n) - t(0)) / n.
    for (int per : {1, 2, 4}) {
        const int g = per * sms;
        int n0 = 0, n1 = 400;
        auto run = [&](int n) {
            void* args[] = {&count, &gen, &n};
            return eager_us(s, 50, [&] {
                CK(cudaLaunchCooperativeKernel((void*)k_grid_barriers, dim3(g), dim3(128), args, 0, s));
            });
        };
        const float t0 = run(n0), t1 = run(n1);
        rows.push_back({"grid barrier, " + std::to_string(g) + " blocks", (t1 - t0) / n1, "us per barrier"});
    }

    // 2b. Eight rounds of one dependent round trip, as a chain of eight launches (PDL, in a
    //     graph) and as one cooperative launch with grid barriers between rounds (in a graph
    //     when the driver captures cooperative launches, else eager).
    for (int g : {64, sms, 4 * sms}) {
        const int stages = 8;
        const float chain = graph_us(s, 4, reps, [&] {
            for (int i = 0; i < stages; ++i) launch(k_one_load, g, 128, s, true, buf, 1);
        });
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(g);
        cfg.blockDim = dim3(128);
        cfg.stream = s;
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeCooperative;
        at[0].val.cooperative = 1;
        cfg.attrs = at;
        cfg.numAttrs = 1;
        int n = stages;
        float pers = -1.0f;
        cudaGraph_t gr;
        bool captured = cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess &&
                        cudaLaunchKernelEx(&cfg, k_persistent_rounds, buf, count, gen, n) == cudaSuccess;
        if (cudaStreamEndCapture(s, &gr) == cudaSuccess) cudaGraphDestroy(gr);
        cudaGetLastError();
        if (captured) {
            pers = graph_us(s, 4, reps, [&] { CK(cudaLaunchKernelEx(&cfg, k_persistent_rounds, buf, count, gen, n)); });
        } else {
            pers = eager_us(s, 50, [&] { CK(cudaLaunchKernelEx(&cfg, k_persistent_rounds, buf, count, gen, n)); });
        }
        rows.push_back({"8 rounds, chain of 8 launches (pdl, graph), grid " + std::to_string(g), chain, "us per step"});
        rows.push_back({std::string("8 rounds, one cooperative launch (") + (captured ? "graph" : "eager") + "), grid " +
                            std::to_string(g),
                        pers, "us per step"});
    }

    // 3. A cluster barrier: eight clusters of c CTAs of 128 threads.
    CK(cudaFuncSetAttribute(k_cluster_barriers, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    for (int c : {2, 4, 8, 16}) {
        auto run = [&](int n) {
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = dim3(c * 8);
            cfg.blockDim = dim3(128);
            cfg.stream = s;
            cudaLaunchAttribute at[1];
            at[0].id = cudaLaunchAttributeClusterDimension;
            at[0].val.clusterDim.x = c;
            at[0].val.clusterDim.y = 1;
            at[0].val.clusterDim.z = 1;
            cfg.attrs = at;
            cfg.numAttrs = 1;
            return eager_us(s, 50, [&] { CK(cudaLaunchKernelEx(&cfg, k_cluster_barriers, n, sink)); });
        };
        const float t0 = run(0), t1 = run(2000);
        rows.push_back({"cluster barrier, cluster of " + std::to_string(c), (t1 - t0) / 2000 * 1000.0f, "ns per barrier"});
    }

    // 4. A block barrier, cycles per __syncthreads at 256 and 1024 threads.
    {
        unsigned long long* cyc;
        CK(cudaMalloc(&cyc, 8 * sms));
        for (int nt : {256, 1024}) {
            const int n = 4096;
            k_block_barriers<<<1, nt, 0, s>>>(n, cyc);
            k_block_barriers<<<1, nt, 0, s>>>(n, cyc);
            unsigned long long c = 0;
            CK(cudaMemcpyAsync(&c, cyc, 8, cudaMemcpyDeviceToHost, s));
            CK(cudaStreamSynchronize(s));
            rows.push_back({"block barrier, " + std::to_string(nt) + " threads", (float)c / n, "cycles per barrier"});
        }
        CK(cudaFree(cyc));
    }

    // 5. One dependent load: a random cycle over 4 MB (L2 after the first pass) and over 8M
    //    lines 256 bytes apart (2 GB; the 256 MB of a first version touched 1M sectors, 32 MB,
    //    which L2 held: both rows read 146 ns).
    for (int big = 0; big <= 1; ++big) {
        const size_t lines = big ? (1u << 23) : (1u << 15);
        const size_t stride = big ? 64 : 32;  // words between entries: 256 or 128 bytes
        std::vector<unsigned> order(lines);
        for (size_t i = 0; i < lines; ++i) order[i] = (unsigned)i;
        std::mt19937 rng(7);
        std::shuffle(order.begin() + 1, order.end(), rng);
        std::vector<unsigned> host(lines * stride, 0u);
        for (size_t i = 0; i < lines; ++i) host[order[i] * stride] = order[(i + 1) % lines] * (unsigned)stride;
        unsigned* next;
        CK(cudaMalloc(&next, host.size() * 4));
        CK(cudaMemcpy(next, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
        const int hops = 20000;
        k_chase<<<1, 1, 0, s>>>(next, hops, sink);  // warm (and, for the small cycle, fill L2)
        const float t0 = eager_us(s, 5, [&] { k_chase<<<1, 1, 0, s>>>(next, 0, sink); });
        const float t1 = eager_us(s, 5, [&] { k_chase<<<1, 1, 0, s>>>(next, hops, sink); });
        rows.push_back({big ? "dependent load, device memory (2 GB cycle)" : "dependent load, L2 (4 MB cycle)",
                        (t1 - t0) / hops * 1000.0f, "ns per load"});
        CK(cudaFree(next));
    }

    // 6. Merging partials: a merge kernel behind the partials' kernel, against the last block
    //    of the partials' grid merging after a ticket. P = 35 and 66: the sparse attend's and the
    //    dense decode's splits per KV head at batch 1, 128K; 528: a full wave.
    {
        float *part, *out;
        CK(cudaMalloc(&part, (size_t)1024 * W * 4));
        CK(cudaMalloc(&out, W * 4));
        for (int pdl = 0; pdl <= 1; ++pdl) {
            for (int P : {35, 66, 528}) {
                const float two = graph_us(s, copies, reps, [&] {
                    launch(k_partials, P, 128, s, pdl != 0, part, pdl);
                    launch(k_merge, 1, 512, s, pdl != 0, (const float*)part, P, out, pdl);
                });
                const float one = graph_us(s, copies, reps, [&] {
                    launch(k_partials_last_merges, P, 128, s, pdl != 0, part, ticket, out, pdl);
                });
                const std::string tag = std::string(pdl ? "pdl" : "plain") + ", " + std::to_string(P) + " partials";
                rows.push_back({"partials + merge kernel, " + tag, two, "us per pair"});
                rows.push_back({"partials, last block merges, " + tag, one, "us per launch"});
            }
        }
        CK(cudaFree(part));
        CK(cudaFree(out));
    }
    CK(cudaStreamSynchronize(s));

    FILE* f = csv ? std::fopen(csv, "w") : nullptr;
    if (f) std::fprintf(f, "probe,value,unit\n");
    for (const Row& r : rows) {
        std::printf("%-60s %10.3f  %s\n", r.name.c_str(), r.value, r.unit.c_str());
        if (f) std::fprintf(f, "\"%s\",%.4f,%s\n", r.name.c_str(), r.value, r.unit.c_str());
    }
    if (f) std::fclose(f);
    return 0;
}
