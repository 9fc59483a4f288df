// A llama.cpp-style engine loop on the managed cache of libselfindexkv (selfindexkv.hpp).
//
// A toy multi-layer model (synthetic token embeddings, per-layer Q/K/V projections, RoPE)
// serves a batch of sequences on the CPU device:
//   prefill:  per layer, the prompt's post-RoPE K/V and its last queries -> calibrate
//   decode:   per step and layer, the new token's K/V -> append; its Q -> attend (sparse)
//             and attend_dense (the dequantised dense baseline, for comparison)
//   verify:   speculative decoding's check of a few draft tokens per sequence, on forks of the
//             sequences: append them, then one attend_rows per layer (CPU device)
// and prints the cache's bytes per token and how far the sparse output is from the dense one.
// The engine's own prefill attention (flash attention over the prompt) is not the library's
// job and is skipped here.
//
// usage: engine_sample [--steps N] [--seed S] [--device cpu|cuda]
//
// --device cuda (built with -DSIKV_WITH_CUDA_RUNTIME and linked with the CUDA runtime) runs the
// same loop on a CUDA cache fed from cudaMalloc'd fp16 K/V/Q on a stream of its own, beside a
// CPU cache of the same configuration fed the same fp16 values from host memory, and checks
// every attend output of the GPU against the CPU's (per row of head_dim, relative to the row's
// largest value). The next tokens follow the CPU's outputs, so both caches see the same inputs.
// It ends with the speculative verification on both caches (attend_rows, row by row compared).

#include "selfindexkv.hpp"

#include "../common/half.h"

#if defined(SIKV_WITH_CUDA_RUNTIME)
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr uint32_t kLayers = 4;
constexpr uint32_t kHeads = 8, kKvHeads = 2, kHeadDim = 64;
constexpr uint32_t kEmbed = 32, kVocab = 256;
constexpr uint32_t kQueryTail = 16;
// Draft tokens per sequence that speculative verification checks in one attend_rows call.
constexpr uint32_t kDraft = 4;

struct Rng {
  uint64_t s;
  float uniform() {  // [-1, 1)
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return float((s >> 40) & 0xffffff) / float(1 << 23) - 1.0f;
  }
  uint32_t below(uint32_t n) { return uint32_t((uniform() + 1.0f) * 0.5f * float(n)) % n; }
};

// Weights of the toy model. Keys share their query group's projection (plus noise), so a
// query attends strongly to earlier occurrences of its own token; two key channels carry a
// constant offset, like the outlier channels of real LLM keys.
struct ToyModel {
  std::vector<float> embed;             // [vocab][embed]
  std::vector<std::vector<float>> wq;   // per layer [heads * head_dim][embed]
  std::vector<std::vector<float>> wk;   // per layer [kv_heads * head_dim][embed]
  std::vector<std::vector<float>> wv;   // per layer [kv_heads * head_dim][embed]
  std::vector<float> unembed;           // [embed][heads * head_dim]

  explicit ToyModel(Rng& rng) {
    auto fill = [&](std::vector<float>& w, size_t n, float scale) {
      w.resize(n);
      for (auto& x : w) x = scale * rng.uniform();
    };
    const float s = 1.0f / std::sqrt(float(kEmbed));
    fill(embed, size_t(kVocab) * kEmbed, 1.0f);
    fill(unembed, size_t(kEmbed) * kHeads * kHeadDim, 0.1f);
    const uint32_t group = kHeads / kKvHeads;
    for (uint32_t l = 0; l < kLayers; ++l) {
      std::vector<float> q, k, v;
      fill(q, size_t(kHeads) * kHeadDim * kEmbed, 8.0f * s);  // sharp heads
      fill(k, size_t(kKvHeads) * kHeadDim * kEmbed, 0.3f * s);
      fill(v, size_t(kKvHeads) * kHeadDim * kEmbed, s);
      for (uint32_t h = 0; h < kKvHeads; ++h)
        for (uint32_t g = 0; g < group; ++g)
          for (size_t i = 0; i < size_t(kHeadDim) * kEmbed; ++i)
            k[h * kHeadDim * kEmbed + i] += q[(h * group + g) * kHeadDim * kEmbed + i] / float(group);
      wq.push_back(q);
      wk.push_back(k);
      wv.push_back(v);
    }
  }

  static void matvec(const std::vector<float>& w, const float* x, uint32_t rows, uint32_t cols, float* y) {
    for (uint32_t r = 0; r < rows; ++r) {
      float acc = 0;
      for (uint32_t c = 0; c < cols; ++c) acc += w[size_t(r) * cols + c] * x[c];
      y[r] = acc;
    }
  }

  static void rope(float* x, uint32_t heads, uint32_t pos) {
    const uint32_t half = kHeadDim / 2;
    for (uint32_t h = 0; h < heads; ++h) {
      float* v = x + size_t(h) * kHeadDim;
      for (uint32_t i = 0; i < half; ++i) {
        float theta = float(pos) * std::pow(10000.0f, -2.0f * float(i) / float(kHeadDim));
        float c = std::cos(theta), s = std::sin(theta), a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = a * s + b * c;
      }
    }
  }

  // Post-RoPE q [heads][head_dim], k and v [kv_heads][head_dim] of `token` at `pos`.
  void qkv(uint32_t layer, uint32_t token, uint32_t pos, float* q, float* k, float* v) const {
    const float* e = &embed[size_t(token) * kEmbed];
    matvec(wq[layer], e, kHeads * kHeadDim, kEmbed, q);
    matvec(wk[layer], e, kKvHeads * kHeadDim, kEmbed, k);
    matvec(wv[layer], e, kKvHeads * kHeadDim, kEmbed, v);
    for (uint32_t h = 0; h < kKvHeads; ++h) {
      k[h * kHeadDim + 3] += 2.0f;
      k[h * kHeadDim + 17] -= 1.5f;
    }
    rope(q, kHeads, pos);
    rope(k, kKvHeads, pos);
  }

  // Greedy next token from the last layer's attention output [heads * head_dim].
  uint32_t next_token(const float* attn) const {
    float h[kEmbed];
    matvec(unembed, attn, kEmbed, kHeads * kHeadDim, h);
    uint32_t best = 0;
    float best_score = -INFINITY;
    for (uint32_t t = 0; t < kVocab; ++t) {
      float s = 0;
      for (uint32_t c = 0; c < kEmbed; ++c) s += embed[size_t(t) * kEmbed + c] * h[c];
      if (s > best_score) best_score = s, best = t;
    }
    return best;
  }
};

// The cache of the sample: the 2+1 profile (1 sign bit + 2-bit key magnitude, 2-bit values) for
// the toy model's shape. The sample compares the sparse path with attend_dense (and the GPU with
// the CPU on it), so the dense crossover is off: by default its 4K tokens in all would run dense.
sikv::Config sample_config(uint32_t device, uint32_t dtype) {
  sikv::Config cfg = sikv::Config::profile(SIKV_PROFILE_2_1);
  cfg.device = device;
  cfg.dtype = dtype;
  cfg.num_layers = kLayers;
  cfg.num_q_heads = kHeads;
  cfg.num_kv_heads = kKvHeads;
  cfg.head_dim = kHeadDim;
  cfg.max_seqs = 8;  // the three sequences and, during speculative verification, a fork of each
  cfg.max_batch = 4;
  cfg.max_seq_len = 4096;
  cfg.max_append_tokens = 4096;
  cfg.dense_crossover = 0;
  return cfg;
}

// Speculative verification's inputs: a fork id per sequence (1000 + its id) and kDraft draft
// tokens each, the already chosen next token first, then random ones (so few are accepted: the
// call pattern is the point).
struct Drafts {
  std::vector<int64_t> forks;
  std::vector<std::vector<uint32_t>> tokens;
};
Drafts make_drafts(Rng& rng, const std::vector<int64_t>& ids, const std::vector<uint32_t>& next) {
  Drafts d;
  for (size_t b = 0; b < ids.size(); ++b) {
    d.forks.push_back(1000 + ids[b]);
    std::vector<uint32_t> t(kDraft);
    t[0] = next[b];
    for (uint32_t r = 1; r < kDraft; ++r) t[r] = rng.below(kVocab);
    d.tokens.push_back(t);
  }
  return d;
}

// The query, key and value rows of sequence b's drafts at layer l (the first at position pos0)
// into rows b * kDraft .. b * kDraft + kDraft - 1 of q, k, v.
void draft_qkv(const ToyModel& model, uint32_t l, const Drafts& d, size_t b, uint32_t pos0, float* q, float* k,
               float* v) {
  const size_t row_q = kHeads * kHeadDim, row_kv = kKvHeads * kHeadDim;
  for (uint32_t r = 0; r < kDraft; ++r) {
    const size_t i = b * kDraft + r;
    model.qkv(l, d.tokens[b][r], pos0 + r, &q[i * row_q], &k[i * row_kv], &v[i * row_kv]);
  }
}

// A prompt with repeated spans (so that attention has something to find).
std::vector<uint32_t> make_prompt(Rng& rng, uint32_t n) {
  std::vector<uint32_t> t(n);
  for (uint32_t i = 0; i < n; ++i) {
    if (i > 64 && rng.below(4) == 0) {
      uint32_t from = rng.below(i - 16);
      for (uint32_t j = 0; j < 16 && i < n; ++j, ++i) t[i] = t[from + j];
      --i;
    } else {
      t[i] = rng.below(kVocab);
    }
  }
  return t;
}

struct Diff {
  double max_abs = 0, err2 = 0, ref2 = 0;
  void add(const float* a, const float* b, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      double d = double(a[i]) - double(b[i]);
      max_abs = std::max(max_abs, std::fabs(d));
      err2 += d * d;
      ref2 += double(b[i]) * double(b[i]);
    }
  }
  double rel() const { return std::sqrt(err2 / std::max(ref2, 1e-30)); }
};

#if defined(SIKV_WITH_CUDA_RUNTIME)
using sikv_sample::from_half;
using sikv_sample::to_half;

std::vector<uint16_t> halves(const float* x, size_t n) {
  std::vector<uint16_t> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = to_half(x[i]);
  return h;
}

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "engine_sample: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// A device buffer of fp16 values, filled from host halves on `stream`.
struct DeviceHalves {
  void* p = nullptr;
  size_t n = 0;
  explicit DeviceHalves(size_t count) : n(count) { cuda_check(cudaMalloc(&p, (n ? n : 1) * 2), "cudaMalloc"); }
  ~DeviceHalves() { cudaFree(p); }
  DeviceHalves(const DeviceHalves&) = delete;
  DeviceHalves& operator=(const DeviceHalves&) = delete;
  void put(const std::vector<uint16_t>& h, cudaStream_t stream) {
    cuda_check(cudaMemcpyAsync(p, h.data(), h.size() * 2, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
  }
};

// Whether every (row, head) of the GPU output is within 8e-3 of the CPU's, relative to the row's
// largest value; reports the first that is not, and keeps the worst difference in *worst.
bool within(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, int step, uint32_t layer,
            const char* what, double* worst) {
  for (size_t r = 0; r < want.size() / kHeadDim; ++r) {
    double top = 0, diff = 0;
    for (size_t c = 0; c < kHeadDim; ++c) {
      const double w = from_half(want[r * kHeadDim + c]), g = from_half(got[r * kHeadDim + c]);
      if (!std::isfinite(g)) diff = INFINITY;
      top = std::max(top, std::fabs(w));
      diff = std::max(diff, std::fabs(g - w));
    }
    const double rel = top > 0 ? diff / top : diff;
    *worst = std::max(*worst, rel);
    if (!(rel <= 8e-3)) {
      std::fprintf(stderr, "engine_sample: step %d layer %u %s row %zu: GPU differs from the CPU by %.3e (relative)\n",
                   step, layer, what, r, rel);
      return false;
    }
  }
  return true;
}

// The GPU run: a CUDA cache on device memory and its own stream, checked step by step against a
// CPU cache of the same configuration fed the same fp16 values. Returns the process status.
int run_cuda(const ToyModel& model, Rng& rng, int steps) {
  // fp16: the CUDA backend takes fp16 or bf16 activations.
  sikv::Cache gpu(sample_config(SIKV_DEVICE_CUDA, SIKV_DTYPE_F16));
  sikv::Cache cpu(sample_config(SIKV_DEVICE_CPU, SIKV_DTYPE_F16));
  cudaStream_t stream = nullptr;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");

  const std::vector<int64_t> ids = {0, 1, 2};
  const uint32_t prompt_len[] = {1000, 1337, 1800};
  const size_t B = ids.size(), row_q = kHeads * kHeadDim, row_kv = kKvHeads * kHeadDim;
  std::vector<std::vector<uint32_t>> tokens;
  for (size_t b = 0; b < B; ++b) {
    gpu.add(ids[b]);
    cpu.add(ids[b]);
    tokens.push_back(make_prompt(rng, prompt_len[b]));
  }
  DeviceHalves dk(size_t(1800) * row_kv), dv(size_t(1800) * row_kv), dq(size_t(kQueryTail) * row_q);
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (size_t b = 0; b < B; ++b) {
      const uint32_t n = prompt_len[b];
      std::vector<float> q(size_t(n) * row_q), k(size_t(n) * row_kv), v(size_t(n) * row_kv);
      for (uint32_t t = 0; t < n; ++t) model.qkv(l, tokens[b][t], t, &q[t * row_q], &k[t * row_kv], &v[t * row_kv]);
      const auto hk = halves(k.data(), k.size()), hv = halves(v.data(), v.size());
      const auto hq = halves(&q[size_t(n - kQueryTail) * row_q], size_t(kQueryTail) * row_q);
      dk.put(hk, stream);
      dv.put(hv, stream);
      dq.put(hq, stream);
      gpu.calibrate(l, ids[b], n, dk.p, dv.p, kQueryTail, dq.p, stream);
      cpu.calibrate(l, ids[b], n, hk.data(), hv.data(), kQueryTail, hq.data());
      // The staging buffers are refilled for the next sequence: wait for this one's calibrate.
      cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    }
  }
  DeviceHalves sk(B * row_kv), sv(B * row_kv), sq(B * row_q), sout(B * row_q);
  std::vector<float> q(B * row_q), k(B * row_kv), v(B * row_kv);
  std::vector<uint16_t> got(B * row_q), want(B * row_q);
  std::vector<uint32_t> next(B);
  for (size_t b = 0; b < B; ++b) next[b] = tokens[b].back();
  double worst = 0;
  for (int step = 0; step < steps; ++step) {
    std::vector<float> last(B * row_q);
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (size_t b = 0; b < B; ++b) {
        const uint32_t pos = cpu.seq_len(ids[b], l);
        model.qkv(l, next[b], pos, &q[b * row_q], &k[b * row_kv], &v[b * row_kv]);
      }
      const auto hk = halves(k.data(), k.size()), hv = halves(v.data(), v.size()), hq = halves(q.data(), q.size());
      sk.put(hk, stream);
      sv.put(hv, stream);
      sq.put(hq, stream);
      gpu.append_decode(l, ids, sk.p, sv.p, stream);
      gpu.attend(l, ids, sq.p, sout.p, stream);
      cuda_check(cudaMemcpyAsync(got.data(), sout.p, got.size() * 2, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
      cpu.append_decode(l, ids, hk.data(), hv.data());
      cpu.attend(l, ids, hq.data(), want.data());
      cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      if (!within(got, want, step, l, "attend", &worst)) return 1;
      for (size_t i = 0; i < last.size(); ++i) last[i] = from_half(want[i]);
    }
    for (size_t b = 0; b < B; ++b) {
      next[b] = model.next_token(&last[b * row_q]);
      tokens[b].push_back(next[b]);
    }
  }
  std::printf("cuda: %d steps x %u layers x %zu sequences on device memory and a stream of its own; every attend "
              "output within %.3e (worst row-relative difference) of the CPU cache fed the same fp16 values\n",
              steps, kLayers, B, worst);

  // Speculative verification on the GPU, as the CPU run does it: kDraft tokens per sequence on
  // a fork of each, appended and checked by one attend_rows call per layer, against the CPU
  // cache's attend_rows on the same fp16 values. (The 12 rows exceed max_batch: the CUDA cache
  // runs them as groups of whole sequences that its workspace holds.)
  const Drafts drafts = make_drafts(rng, ids, next);
  const std::vector<int64_t>& forks = drafts.forks;
  const std::vector<uint32_t> rows(B, kDraft);
  for (size_t b = 0; b < B; ++b) {
    gpu.fork(ids[b], forks[b]);
    cpu.fork(ids[b], forks[b]);
  }
  const size_t R = B * kDraft;
  DeviceHalves rk(R * row_kv), rv(R * row_kv), rq(R * row_q), rout(R * row_q);
  std::vector<float> qr(R * row_q), kr(R * row_kv), vr(R * row_kv);
  std::vector<uint16_t> gotr(R * row_q), wantr(R * row_q);
  double worst_rows = 0;
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (size_t b = 0; b < B; ++b)
      draft_qkv(model, l, drafts, b, cpu.seq_len(forks[b], l), qr.data(), kr.data(), vr.data());
    const auto hk = halves(kr.data(), kr.size()), hv = halves(vr.data(), vr.size()), hq = halves(qr.data(), qr.size());
    rk.put(hk, stream);
    rv.put(hv, stream);
    rq.put(hq, stream);
    gpu.append(l, forks, rows, rk.p, rv.p, stream);
    gpu.attend_rows(l, forks, rows, rq.p, rout.p, stream);
    cuda_check(cudaMemcpyAsync(gotr.data(), rout.p, gotr.size() * 2, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    cpu.append(l, forks, rows, hk.data(), hv.data());
    cpu.attend_rows(l, forks, rows, hq.data(), wantr.data());
    cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (!within(gotr, wantr, steps, l, "attend_rows", &worst_rows)) return 1;
  }
  for (size_t b = 0; b < B; ++b) {
    gpu.remove(forks[b]);
    cpu.remove(forks[b]);
  }
  cuda_check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  std::printf("cuda speculative verification: %u draft tokens after each of %zu sequences, one attend_rows call per "
              "layer on forks; every row within %.3e of the CPU cache's attend_rows\n",
              kDraft, B, worst_rows);
  return 0;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  int steps = 64;
  uint64_t seed = 42;
  std::string device = "cpu";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::atoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--seed") == 0) seed = std::strtoull(argv[i + 1], nullptr, 10);
    else if (std::strcmp(argv[i], "--device") == 0) device = argv[i + 1];
  }
  try {
    sikv::check_abi();
    Rng rng{seed * 0x9E3779B97F4A7C15ull + 1};
    ToyModel model(rng);
    if (device == "cuda") {
#if defined(SIKV_WITH_CUDA_RUNTIME)
      return run_cuda(model, rng, steps);
#else
      std::fprintf(stderr, "engine_sample: built without the CUDA runtime (-DSIKV_WITH_CUDA_RUNTIME)\n");
      return 2;
#endif
    }
    if (device != "cpu") {
      std::fprintf(stderr, "engine_sample: --device must be cpu or cuda\n");
      return 2;
    }

    // The cache on the CPU, f32: llama.cpp's CPU backend hands over f32 Qcur / Kcur / Vcur.
    const sikv::Config cfg = sample_config(SIKV_DEVICE_CPU, SIKV_DTYPE_F32);
    sikv::Cache cache(cfg);
    const SikvLayoutInfo layout = cfg.layout();

    // Prefill: a ragged batch of prompts, calibrated layer by layer.
    const std::vector<int64_t> ids = {0, 1, 2};
    const uint32_t prompt_len[] = {1000, 1337, 1800};
    const size_t B = ids.size(), row_q = kHeads * kHeadDim, row_kv = kKvHeads * kHeadDim;
    std::vector<std::vector<uint32_t>> tokens;
    for (size_t b = 0; b < B; ++b) {
      cache.add(ids[b]);
      tokens.push_back(make_prompt(rng, prompt_len[b]));
    }
    auto t0 = std::chrono::steady_clock::now();
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (size_t b = 0; b < B; ++b) {
        const uint32_t n = prompt_len[b];
        std::vector<float> q(size_t(n) * row_q), k(size_t(n) * row_kv), v(size_t(n) * row_kv);
        for (uint32_t t = 0; t < n; ++t) model.qkv(l, tokens[b][t], t, &q[t * row_q], &k[t * row_kv], &v[t * row_kv]);
        cache.calibrate(l, ids[b], n, k.data(), v.data(), kQueryTail, &q[size_t(n - kQueryTail) * row_q]);
      }
    }
    auto t1 = std::chrono::steady_clock::now();

    // Decode: one token per sequence per step, every layer appends then attends.
    std::vector<float> q(B * row_q), k(B * row_kv), v(B * row_kv), out(B * row_q), dense(B * row_q);
    std::vector<uint32_t> next(B);
    for (size_t b = 0; b < B; ++b) next[b] = tokens[b].back();
    Diff total;
    double attend_s = 0, dense_s = 0;
    for (int step = 0; step < steps; ++step) {
      Diff this_step;
      for (uint32_t l = 0; l < kLayers; ++l) {
        for (size_t b = 0; b < B; ++b) {
          uint32_t pos = cache.seq_len(ids[b], l);
          model.qkv(l, next[b], pos, &q[b * row_q], &k[b * row_kv], &v[b * row_kv]);
        }
        cache.append_decode(l, ids, k.data(), v.data());
        auto a = std::chrono::steady_clock::now();
        cache.attend(l, ids, q.data(), out.data());
        auto c = std::chrono::steady_clock::now();
        cache.attend_dense(l, ids, q.data(), dense.data());
        auto d = std::chrono::steady_clock::now();
        attend_s += std::chrono::duration<double>(c - a).count();
        dense_s += std::chrono::duration<double>(d - c).count();
        this_step.add(out.data(), dense.data(), out.size());
        total.add(out.data(), dense.data(), out.size());
      }
      for (size_t b = 0; b < B; ++b) {
        next[b] = model.next_token(&out[b * row_q]);
        tokens[b].push_back(next[b]);
      }
      if (step % 16 == 0 || step == steps - 1)
        std::printf("step %3d: sparse vs attend_dense max |diff| %.3e, rel L2 %.3e\n", step, this_step.max_abs, this_step.rel());
    }

    // Speculative verification (sikv_attend_rows): a draft proposes kDraft tokens per sequence
    // (here random ones, so few are accepted: the call pattern is the point), the model checks
    // them with one multi-row attend per layer. It runs on a fork of each sequence, which
    // shares the stored pages, so the drafts are dropped with the fork; an engine would then
    // append the accepted tokens to the sequence itself. Row r of a sequence attends causally
    // up to its own position; the last row is exactly a one-token decode of its query.
    const Drafts drafts = make_drafts(rng, ids, next);
    const std::vector<int64_t>& forks = drafts.forks;
    const std::vector<std::vector<uint32_t>>& draft = drafts.tokens;
    const std::vector<uint32_t> rows(B, kDraft);
    for (size_t b = 0; b < B; ++b) cache.fork(ids[b], forks[b]);
    std::vector<float> qr(B * kDraft * row_q), kr(B * kDraft * row_kv), vr(B * kDraft * row_kv);
    std::vector<float> outr(B * kDraft * row_q), last_q(B * row_q), last_one(B * row_q);
    bool last_rows_match = true;
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (size_t b = 0; b < B; ++b) {
        draft_qkv(model, l, drafts, b, cache.seq_len(forks[b], l), qr.data(), kr.data(), vr.data());
        std::copy_n(&qr[(b * kDraft + kDraft - 1) * row_q], row_q, &last_q[b * row_q]);
      }
      cache.append(l, forks, rows, kr.data(), vr.data());
      cache.attend_rows(l, forks, rows, qr.data(), outr.data());
      cache.attend(l, forks, last_q.data(), last_one.data());
      for (size_t b = 0; b < B; ++b)
        last_rows_match = last_rows_match && std::equal(last_one.begin() + b * row_q, last_one.begin() + (b + 1) * row_q,
                                                        outr.begin() + (b * kDraft + kDraft - 1) * row_q);
    }
    // Row r's output predicts the token after draft r: draft r + 1 is accepted while they agree.
    uint32_t accepted = 0;
    for (size_t b = 0; b < B; ++b) {
      uint32_t r = 0;
      while (r + 1 < kDraft && model.next_token(&outr[(b * kDraft + r) * row_q]) == draft[b][r + 1]) ++r;
      accepted += r;
      cache.remove(forks[b]);
    }
    std::printf("speculative verification: %u random draft tokens after each of %zu sequences, checked by one "
                "attend_rows call per layer on forks; %u accepted; last rows == one-token decode: %s\n",
                kDraft - 1, B, accepted, last_rows_match ? "yes" : "NO");
    if (!last_rows_match) {
      std::fprintf(stderr, "engine_sample: a last row of attend_rows differs from a one-token decode\n");
      return 1;
    }

    // Telemetry: the attention mass the selection captures relative to the best set of the
    // same size, for the first sequence's next query (the engine knows the exact keys here).
    double recall = 0;
    for (uint32_t l = 0; l < kLayers; ++l) {
      const uint32_t n = cache.seq_len(ids[0], l);
      std::vector<float> exact_k(size_t(n) * row_kv), qt(row_q), kt(row_kv), vt(row_kv);
      for (uint32_t t = 0; t < n; ++t) model.qkv(l, tokens[0][t], t, qt.data(), &exact_k[t * row_kv], vt.data());
      model.qkv(l, next[0], n, qt.data(), kt.data(), vt.data());
      for (float r : cache.selection_recall(l, ids[0], qt.data(), exact_k.data())) recall += r / (kLayers * kKvHeads);
    }

    const SikvCacheInfo info = cache.info();
    const double fp16 = 4.0 * kHeadDim;  // fp16 K + V per token per KV head
    const double per_token_all = double(info.bytes_per_token) * kKvHeads * kLayers;
    std::printf("prefill: %zu sequences (%u, %u, %u tokens) x %u layers calibrated in %.2f s\n", B, prompt_len[0],
                prompt_len[1], prompt_len[2], kLayers, std::chrono::duration<double>(t1 - t0).count());
    std::printf("bytes/token: %zu per KV head (fp16 K+V: %.0f, %.2fx smaller); %.0f per token over %u layers x %u KV heads\n",
                size_t(info.bytes_per_token), fp16, layout.compression_vs_fp16, per_token_all, kLayers, kKvHeads);
    std::printf("cache: %u of %u pages in use, %zu bytes of planes allocated by the library\n",
                info.num_pages - info.free_pages, info.num_pages, size_t(layout.total_plane_bytes));
    std::printf("decode: %d steps x %u layers x %zu sequences; sparse attend %.2f ms/layer-step, attend_dense %.2f ms\n",
                steps, kLayers, B, 1e3 * attend_s / (steps * kLayers), 1e3 * dense_s / (steps * kLayers));
    std::printf("sparse vs attend_dense over all steps: max |diff| %.3e, rel L2 %.3e; selection mass recall %.3f\n",
                total.max_abs, total.rel(), recall);
    if (!std::isfinite(total.rel()) || total.rel() > 0.6) {
      std::fprintf(stderr, "engine_sample: the sparse output is far from the dense one\n");
      return 1;
    }
  } catch (const sikv::Error& e) {
    std::fprintf(stderr, "engine_sample: %s\n", e.what());
    return 1;
  }
  return 0;
}
