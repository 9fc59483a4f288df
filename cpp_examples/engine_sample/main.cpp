// A llama.cpp-style engine loop on the managed cache of libselfindexkv (selfindexkv.hpp).
//
// A toy multi-layer model (synthetic token embeddings, per-layer Q/K/V projections, RoPE)
// serves a batch of sequences on the CPU device:
//   prefill:  per layer, the prompt's post-RoPE K/V and its last queries -> calibrate
//   decode:   per step and layer, the new token's K/V -> append; its Q -> attend (sparse)
//             and attend_dense (the dequantised dense baseline, for comparison)
// and prints the cache's bytes per token and how far the sparse output is from the dense one.
// The engine's own prefill attention (flash attention over the prompt) is not the library's
// job and is skipped here.
//
// usage: engine_sample [--steps N] [--seed S]

#include "selfindexkv.hpp"

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

}  // namespace

int main(int argc, char** argv) {
  int steps = 64;
  uint64_t seed = 42;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::atoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--seed") == 0) seed = std::strtoull(argv[i + 1], nullptr, 10);
  }
  try {
    sikv::check_abi();
    Rng rng{seed * 0x9E3779B97F4A7C15ull + 1};
    ToyModel model(rng);

    // The cache: the 2+1 profile (1 sign bit + 2-bit key magnitude, 2-bit values) on the CPU.
    sikv::Config cfg = sikv::Config::profile(SIKV_PROFILE_2_1);
    cfg.device = SIKV_DEVICE_CPU;
    cfg.dtype = SIKV_DTYPE_F32;  // llama.cpp's CPU backend hands over f32 Qcur / Kcur / Vcur
    cfg.num_layers = kLayers;
    cfg.num_q_heads = kHeads;
    cfg.num_kv_heads = kKvHeads;
    cfg.head_dim = kHeadDim;
    cfg.max_seqs = 4;
    cfg.max_batch = 4;
    cfg.max_seq_len = 4096;
    cfg.max_append_tokens = 4096;
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
