// Drives SikvAttentionPlugin the way an engine that owns its memory would (TensorRT-LLM /
// vLLM style), on the CPU device with host memory:
//   - pools sized by sikv_query_layout and allocated by the engine (planes + state, 256-aligned)
//   - the engine's own page allocator, CSR page tables, slot mappings and state slots
//   - K/V written with the stateless calls (sikv_kernel_calibrate / sikv_kernel_append); in a
//     real engine that is a second plugin of the same shape
//   - decode attention through the plugin's configure / getWorkspaceSize / enqueue path
// Every output is checked against the managed cache fed with the same data: the stateless path
// must give bit-identical results.
//
// usage: trt_plugin_sample [--steps N]

#include "sikv_attention_plugin.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

namespace {

struct AlignedFree {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(256)); }
};
using Block = std::unique_ptr<unsigned char, AlignedFree>;

Block alloc_block(size_t bytes) {
  auto* p = static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(256)));
  std::memset(p, 0, bytes);  // zeroed state records = fresh, uncalibrated sequence slots
  return Block(p);
}

struct Rng {
  uint64_t s = 0x2545F4914F6CDD1Dull;
  float uniform() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return float((s >> 40) & 0xffffff) / float(1 << 23) - 1.0f;
  }
  std::vector<float> vec(size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform();
    return v;
  }
};

// The engine's page allocator and per-sequence bookkeeping (the library keeps none of it).
struct EngineSeq {
  int32_t slot;
  uint32_t len = 0;
  std::vector<int32_t> pages;
};

trt_shim::Dims dims(std::initializer_list<int64_t> d) {
  trt_shim::Dims r;
  for (int64_t x : d) r.d[r.nbDims++] = x;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 8;
  if (argc == 3 && std::strcmp(argv[1], "--steps") == 0) steps = std::atoi(argv[2]);
  try {
    sikv::Config cfg = sikv::Config::profile(SIKV_PROFILE_2_1);
    cfg.device = SIKV_DEVICE_CPU;
    cfg.dtype = SIKV_DTYPE_F32;
    cfg.num_layers = 2;
    cfg.num_q_heads = 12;  // GQA 3 (not a power of two)
    cfg.num_kv_heads = 4;
    cfg.head_dim = 128;
    cfg.page_size = 32;
    cfg.max_seqs = 4;
    cfg.max_batch = 4;
    cfg.max_seq_len = 2048;
    cfg.max_append_tokens = 2048;
    cfg.budget_min = 64;
    cfg.budget_max = 256;
    const uint32_t P = cfg.page_size, L = cfg.num_layers;
    const size_t row_q = size_t(cfg.num_q_heads) * cfg.head_dim, row_kv = size_t(cfg.num_kv_heads) * cfg.head_dim;

    // Engine-owned pools, sized by sikv_query_layout.
    const SikvLayoutInfo info = sikv::query_layout(cfg);
    Block planes = alloc_block(info.total_plane_bytes), state = alloc_block(info.total_state_bytes);
    std::printf("layout: %zu B/token/kv-head (%.2fx vs fp16), %u pages of %zu B, planes %zu B, state %zu B, "
                "dense set %u entries\n",
                size_t(info.bytes_per_token), info.compression_vs_fp16, info.num_pages, size_t(info.bytes_per_page),
                size_t(info.total_plane_bytes), size_t(info.total_state_bytes), info.dense_capacity);
    auto pools = [&](uint32_t layer) { return sikv::layer_pools(info, planes.get(), state.get(), layer); };
    std::vector<int32_t> free_pages;
    for (int32_t p = int32_t(info.num_pages) - 1; p >= 0; --p) free_pages.push_back(p);
    auto grow = [&](EngineSeq& s, uint32_t len) {
      while (s.pages.size() * P < len) {
        if (free_pages.empty()) throw std::runtime_error("engine page pool exhausted");
        s.pages.push_back(free_pages.back());
        free_pages.pop_back();
      }
    };
    auto slot_of = [&](const EngineSeq& s, uint32_t pos) { return int64_t(s.pages[pos / P]) * P + pos % P; };

    // The plugin, built for batches up to max_batch, and its workspace.
    SikvAttentionPlugin plugin(cfg);
    const uint32_t B = 3;
    // TensorRT hands the build calls one array: the inputs, then the outputs.
    std::vector<trt_shim::DynamicPluginTensorDesc> io(SikvAttentionPlugin::kNbInputs + 1);
    trt_shim::DynamicPluginTensorDesc* in = io.data();
    trt_shim::DynamicPluginTensorDesc* out = io.data() + SikvAttentionPlugin::kNbInputs;
    auto set = [](trt_shim::DynamicPluginTensorDesc& t, trt_shim::DataType type, trt_shim::Dims max) {
      t.desc.type = type;
      t.desc.dims = t.min = t.opt = t.max = max;
    };
    const int64_t mb = cfg.max_batch, max_pages = int64_t(mb) * ((cfg.max_seq_len + P - 1) / P);
    set(in[SikvAttentionPlugin::kQ], trt_shim::DataType::kFLOAT, dims({mb, cfg.num_q_heads, cfg.head_dim}));
    set(in[SikvAttentionPlugin::kIndptr], trt_shim::DataType::kINT32, dims({mb + 1}));
    set(in[SikvAttentionPlugin::kPageIndices], trt_shim::DataType::kINT32, dims({max_pages}));
    set(in[SikvAttentionPlugin::kLastPageLen], trt_shim::DataType::kINT32, dims({mb}));
    set(in[SikvAttentionPlugin::kSeqSlot], trt_shim::DataType::kINT32, dims({mb}));
    set(in[SikvAttentionPlugin::kPlanes], trt_shim::DataType::kUINT8, dims({int64_t(info.layer_plane_bytes)}));
    set(in[SikvAttentionPlugin::kState], trt_shim::DataType::kUINT8, dims({int64_t(info.layer_state_bytes)}));
    set(out[0], trt_shim::DataType::kFLOAT, dims({mb, cfg.num_q_heads, cfg.head_dim}));
    for (int32_t i = 0; i < int32_t(io.size()); ++i)
      if (!plugin.supportsFormatCombination(i, io.data(), SikvAttentionPlugin::kNbInputs, 1))
        throw std::runtime_error("format combination rejected");
    if (plugin.configurePlugin(in, SikvAttentionPlugin::kNbInputs, out, 1) != 0)
      throw std::runtime_error("configurePlugin failed");
    const size_t ws_bytes = plugin.getWorkspaceSize(in, SikvAttentionPlugin::kNbInputs, out, 1);
    Block workspace = alloc_block(ws_bytes);
    std::printf("plugin %s v%s: workspace %zu B for batch <= %lld\n", plugin.getPluginName(), plugin.getPluginVersion(),
                ws_bytes, (long long)mb);

    // The reference: the managed cache fed with the same data.
    sikv::Cache managed(cfg);
    sikv::Kernels writer(cfg);  // the engine's KV-write step
    Rng rng;
    const uint32_t prompt[B] = {70, 333, 1000};
    const std::vector<int64_t> ids = {100, 101, 102};
    std::vector<EngineSeq> seqs;
    for (uint32_t b = 0; b < B; ++b) {
      seqs.push_back(EngineSeq{int32_t(b), 0, {}});
      managed.add(ids[b]);
    }

    // Prefill: calibrate each sequence at each layer into the engine's pages.
    for (uint32_t b = 0; b < B; ++b) {
      EngineSeq& s = seqs[b];
      grow(s, prompt[b]);
      std::vector<int64_t> slot_mapping(prompt[b]);
      for (uint32_t t = 0; t < prompt[b]; ++t) slot_mapping[t] = slot_of(s, t);
      for (uint32_t l = 0; l < L; ++l) {
        auto k = rng.vec(prompt[b] * row_kv), v = rng.vec(prompt[b] * row_kv), q = rng.vec(8 * row_q);
        writer.calibrate(pools(l), uint32_t(s.slot), prompt[b], k.data(), v.data(), 8, q.data(), slot_mapping.data(),
                         nullptr, 0);
        managed.calibrate(l, ids[b], prompt[b], k.data(), v.data(), 8, q.data());
      }
      s.len = prompt[b];
    }

    // Decode.
    std::vector<float> result(B * row_q), expect(B * row_q);
    size_t compared = 0;
    for (int step = 0; step < steps; ++step) {
      std::vector<int64_t> slot_mapping(B);
      std::vector<int32_t> seq_slot(B), position(B), indptr{0}, page_indices, last_page_len;
      for (uint32_t b = 0; b < B; ++b) {
        EngineSeq& s = seqs[b];
        grow(s, s.len + 1);
        slot_mapping[b] = slot_of(s, s.len);
        seq_slot[b] = s.slot;
        position[b] = int32_t(s.len);
        const uint32_t n = s.len + 1, np = (n + P - 1) / P;
        page_indices.insert(page_indices.end(), s.pages.begin(), s.pages.begin() + np);
        indptr.push_back(int32_t(page_indices.size()));
        last_page_len.push_back(int32_t(n - (np - 1) * P));
      }
      trt_shim::PluginTensorDesc rt_in[SikvAttentionPlugin::kNbInputs], rt_out[1];
      for (int32_t i = 0; i < SikvAttentionPlugin::kNbInputs; ++i) rt_in[i] = in[i].desc;
      rt_in[SikvAttentionPlugin::kQ].dims.d[0] = B;
      rt_in[SikvAttentionPlugin::kIndptr].dims.d[0] = B + 1;
      rt_in[SikvAttentionPlugin::kPageIndices].dims.d[0] = int64_t(page_indices.size());
      rt_in[SikvAttentionPlugin::kLastPageLen].dims.d[0] = B;
      rt_in[SikvAttentionPlugin::kSeqSlot].dims.d[0] = B;
      rt_out[0] = out[0].desc;
      rt_out[0].dims.d[0] = B;
      if (plugin.onShapeChange(rt_in, SikvAttentionPlugin::kNbInputs, rt_out, 1) != 0)
        throw std::runtime_error("onShapeChange failed");

      for (uint32_t l = 0; l < L; ++l) {
        auto k = rng.vec(B * row_kv), v = rng.vec(B * row_kv), q = rng.vec(B * row_q);
        const SikvLayerPools lp = pools(l);
        writer.append(lp, B, k.data(), v.data(), slot_mapping.data(), seq_slot.data(), position.data());
        managed.append_decode(l, ids, k.data(), v.data());

        unsigned char* layer_planes = planes.get() + size_t(l) * info.layer_plane_bytes;
        unsigned char* layer_state = state.get() + size_t(l) * info.layer_state_bytes;
        const void* bindings[SikvAttentionPlugin::kNbInputs] = {q.data(), indptr.data(), page_indices.data(),
                                                                last_page_len.data(), seq_slot.data(), layer_planes,
                                                                layer_state};
        void* outputs[1] = {result.data()};
        if (plugin.enqueue(rt_in, rt_out, bindings, outputs, workspace.get(), /*stream=*/nullptr) != 0)
          throw std::runtime_error("enqueue failed");

        managed.attend(l, ids, q.data(), expect.data());
        if (std::memcmp(result.data(), expect.data(), result.size() * sizeof(float)) != 0) {
          size_t i = 0;
          while (result[i] == expect[i]) ++i;
          std::fprintf(stderr, "step %d layer %u: plugin out[%zu] = %.9g, managed cache %.9g\n", step, l, i,
                       double(result[i]), double(expect[i]));
          return 1;
        }
        compared += result.size();
      }
      for (auto& s : seqs) s.len += 1;
    }
    std::printf("decode: %d steps x %u layers x %u sequences (%u, %u, %u tokens at the end)\n", steps, L, B, seqs[0].len,
                seqs[1].len, seqs[2].len);
    std::printf("stateless == managed: %zu outputs bit-identical (engine-owned pools, %zu of %u pages in use)\n",
                compared, size_t(info.num_pages) - free_pages.size(), info.num_pages);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "trt_plugin_sample: %s\n", e.what());
    return 1;
  }
  return 0;
}
