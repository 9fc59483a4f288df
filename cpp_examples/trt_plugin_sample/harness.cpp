// Drives SikvAttentionPlugin the way TensorRT does, with TensorRT stood in for by this file:
//   build:    getCreators -> createPlugin(fields, kBUILD) -> capabilities -> getOutputDataTypes,
//             getOutputShapes (through a small IExprBuilder), supportsFormatCombination for every
//             position (and a non-linear format that must be refused), configurePlugin with the
//             profile's min/opt/max, getWorkspaceSize
//   plan:     getFieldsToSerialize, copied out as a plan file would hold it; the build plugin freed
//   runtime:  createPlugin(copied fields, kRUNTIME) -> attachToContext (with an error recorder)
//             -> per step onShapeChange + enqueue, the batch changing between steps (context
//             requests, then generation requests of 1 token or of 2..8 (speculative
//             verification), ragged across the batch and mixed with contexts; a finished
//             sequence's slot reused)
// Each output row is compared with the managed cache (sikv::Cache) fed the same data, its rows
// from one attend_rows call per step; on the CPU device the plugin's stateless path must be
// bit-identical. A context request's prompt rows other than its last must come back zero. Bad
// request lists (a generation request of 0 tokens, one of 17, tokens that do not add up to
// q's rows) must fail through the error recorder, not by an exception, and leave the pools
// unchanged: the run then continues and still matches the managed cache.
//
// usage: trt_plugin_harness [--device cpu|cuda] [--steps N]
// --device cuda needs the CUDA runtime header at build time (SIKV_WITH_CUDA_RUNTIME) and a GPU.
// Its activations (q, k, v, the output) are fp16, since the CUDA backend takes no f32: the
// plugin is built with kHALF tensors, the plugin and the managed cache are fed the same halves,
// and outputs are compared row by row within the library's fp16 tolerance.

#include "sikv_attention_plugin.h"

#include "../common/half.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(SIKV_WITH_CUDA_RUNTIME)
#include <cuda_runtime_api.h>
#endif

using namespace nvinfer1;
using sikv_trt::SikvAttentionPlugin;
using sikv_sample::from_half;
using sikv_sample::to_half;

namespace {

// fp16 outputs (the CUDA device) against the managed cache: within 8e-3 of each row's largest
// |reference|, the tolerance the library holds its fp16 outputs to everywhere (engine_sample,
// tests/gpu_abi.rs, tests/gpu_managed.rs: about 10x the worst recorded between the CUDA and CPU
// backends on an H200). Not bit-identity as on the CPU: the two sides reach the kernels through
// different calls (one batched sikv_kernel_decode or sikv_kernel_decode_rows here; sikv_attend_rows
// there, on pages of their own), which nothing promises to round alike, and a single fp16
// output rounded the other way is already off by up to 2^-10 of its value. A plumbing error (a
// wrong row, slot, page or query) moves a row by far more than 8e-3.
constexpr double kF16RowTol = 8e-3;

// ---- a tiny expression builder: constants and the operations TensorRT offers --------------
class Expr final : public IDimensionExpr {
 public:
  explicit Expr(int64_t v) : v_(v) {}
  bool isConstant() const noexcept override { return true; }
  int64_t getConstantValue() const noexcept override { return v_; }

 private:
  int64_t v_;
};

class ExprBuilder final : public IExprBuilder {
 public:
  IDimensionExpr const* constant(int64_t value) noexcept override {
    pool_.push_back(std::make_unique<Expr>(value));
    return pool_.back().get();
  }
  IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) noexcept override {
    int64_t const x = a.getConstantValue(), y = b.getConstantValue();
    switch (op) {
      case DimensionOperation::kSUM: return constant(x + y);
      case DimensionOperation::kPROD: return constant(x * y);
      case DimensionOperation::kMAX: return constant(x > y ? x : y);
      case DimensionOperation::kMIN: return constant(x < y ? x : y);
      case DimensionOperation::kSUB: return constant(x - y);
      case DimensionOperation::kEQUAL: return constant(x == y);
      case DimensionOperation::kLESS: return constant(x < y);
      case DimensionOperation::kFLOOR_DIV: return constant(x / y);
      case DimensionOperation::kCEIL_DIV: return constant((x + y - 1) / y);
    }
    return nullptr;
  }
  ~ExprBuilder() noexcept override = default;

 private:
  std::vector<std::unique_ptr<Expr>> pool_;
};

class Recorder final : public IErrorRecorder {
 public:
  int32_t getNbErrors() const noexcept override { return int32_t(errors_.size()); }
  ErrorCode getErrorCode(int32_t i) const noexcept override { return errors_[size_t(i)].first; }
  ErrorDesc getErrorDesc(int32_t i) const noexcept override { return errors_[size_t(i)].second.c_str(); }
  bool hasOverflowed() const noexcept override { return false; }
  void clear() noexcept override { errors_.clear(); }
  bool reportError(ErrorCode c, ErrorDesc d) noexcept override {
    try {
      errors_.emplace_back(c, d);
    } catch (...) {
    }
    return true;
  }
  RefCount incRefCount() noexcept override { return ++refs_; }
  RefCount decRefCount() noexcept override { return --refs_; }

 private:
  std::vector<std::pair<ErrorCode, std::string>> errors_;
  RefCount refs_ = 0;
};

class ResourceContext final : public IPluginResourceContext {
 public:
  explicit ResourceContext(IErrorRecorder* r) : r_(r) {}
  IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
  IErrorRecorder* getErrorRecorder() const noexcept override { return r_; }

 private:
  IErrorRecorder* r_;
};

void require(bool ok, std::string const& what) {
  if (!ok) throw std::runtime_error(what);
}

Dims dims(std::initializer_list<int64_t> d) {
  Dims r{};  // zeroed: unused extents must not be garbage
  for (int64_t x : d) r.d[r.nbDims++] = x;
  return r;
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

// Memory of the device the plugin runs on: host memory for the CPU device, cudaMalloc'd for CUDA.
struct Device {
  bool cuda = false;
  bool f16 = false;  // activations as IEEE halves (config dtype F16) instead of f32
  cudaStream_t stream = nullptr;
  std::vector<void*> owned;
  void* alloc(size_t bytes) {
    bytes = bytes ? bytes : 1;
    void* p = nullptr;
#if defined(SIKV_WITH_CUDA_RUNTIME)
    if (cuda) {
      require(cudaMalloc(&p, bytes) == cudaSuccess, "cudaMalloc");
      require(cudaMemset(p, 0, bytes) == cudaSuccess, "cudaMemset");
      owned.push_back(p);
      return p;
    }
#endif
    p = ::operator new(bytes, std::align_val_t(256));
    std::memset(p, 0, bytes);  // zeroed state records = fresh, uncalibrated sequence slots
    owned.push_back(p);
    return p;
  }
  void put(void* dst, void const* src, size_t bytes) {
#if defined(SIKV_WITH_CUDA_RUNTIME)
    if (cuda) {
      require(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream) == cudaSuccess, "cudaMemcpyAsync");
      return;
    }
#endif
    std::memcpy(dst, src, bytes);
  }
  void get(void* dst, void const* src, size_t bytes) {
#if defined(SIKV_WITH_CUDA_RUNTIME)
    if (cuda) {
      require(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream) == cudaSuccess, "cudaMemcpyAsync");
      require(cudaStreamSynchronize(stream) == cudaSuccess, "cudaStreamSynchronize");
      return;
    }
#endif
    std::memcpy(dst, src, bytes);
  }
  template <class T>
  void* upload(std::vector<T> const& v) {
    void* p = alloc(v.size() * sizeof(T));
    put(p, v.data(), v.size() * sizeof(T));
    return p;
  }
  size_t act_bytes(size_t n) const { return n * (f16 ? 2 : 4); }
  // Activations in the config's dtype. Every upload converts with the same rounding, so the
  // plugin and the reference, uploading from the same floats, are fed the same halves.
  void* upload_act(float const* x, size_t n) {
    if (!f16) return upload(std::vector<float>(x, x + n));
    std::vector<uint16_t> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = to_half(x[i]);
    return upload(h);
  }
  std::vector<float> get_act(void const* src, size_t n) {
    std::vector<float> r(n);
    if (!f16) {
      get(r.data(), src, n * sizeof(float));
      return r;
    }
    std::vector<uint16_t> h(n);
    get(h.data(), src, n * sizeof(uint16_t));
    for (size_t i = 0; i < n; ++i) r[i] = from_half(h[i]);
    return r;
  }
  ~Device() {
    for (void* p : owned) {
#if defined(SIKV_WITH_CUDA_RUNTIME)
      if (cuda) {
        cudaFree(p);
        continue;
      }
#endif
      ::operator delete(p, std::align_val_t(256));
    }
  }
};

struct Seq {
  int64_t id;
  int32_t slot;
  uint32_t len = 0;
  std::vector<int32_t> pages;
};

}  // namespace

int main(int argc, char** argv) {
  bool cuda = false;
  int steps = 6;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--device") == 0) cuda = std::strcmp(argv[i + 1], "cuda") == 0;
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::atoi(argv[i + 1]);
  }
#if !defined(SIKV_WITH_CUDA_RUNTIME)
  if (cuda) {
    std::fprintf(stderr, "trt_plugin_harness: built without the CUDA runtime (SIKV_WITH_CUDA_RUNTIME)\n");
    return 2;
  }
#endif
  try {
    sikv::Config cfg = sikv::Config::profile(SIKV_PROFILE_2_1);
    cfg.device = cuda ? SIKV_DEVICE_CUDA : SIKV_DEVICE_CPU;
    // f32 where the backend takes it (the CPU, where the check is bit-exact); the CUDA backend
    // takes only f16 / bf16 activations.
    cfg.dtype = cuda ? SIKV_DTYPE_F16 : SIKV_DTYPE_F32;
    cfg.num_layers = 1;  // one plugin instance = one layer
    cfg.num_q_heads = 12;  // GQA 3 (not a power of two)
    cfg.num_kv_heads = 4;
    cfg.head_dim = 128;
    cfg.page_size = 32;
    // max_batch 8: the managed CUDA cache's attend_rows takes at most max_batch rows per
    // sequence, and generation requests here bring up to 8 tokens.
    cfg.max_seqs = 8;
    cfg.max_batch = 8;
    cfg.max_seq_len = 1024;
    cfg.max_append_tokens = 1024;
    cfg.budget_min = 64;
    cfg.budget_max = 256;
    cfg.dense_crossover = 0;  // always the sparse path, in the plugin and the reference
    const uint32_t P = cfg.page_size, HQ = cfg.num_q_heads, D = cfg.head_dim;
    const size_t row_q = size_t(HQ) * D, row_kv = size_t(cfg.num_kv_heads) * D;
    const SikvLayoutInfo info = sikv::query_layout(cfg);
    Device dev;
    dev.cuda = cuda;
    dev.f16 = cfg.dtype == SIKV_DTYPE_F16;
    const DataType act = dev.f16 ? DataType::kHALF : DataType::kFLOAT;
#if defined(SIKV_WITH_CUDA_RUNTIME)
    if (cuda) require(cudaStreamCreate(&dev.stream) == cudaSuccess, "cudaStreamCreate");
#endif

    // ---- build phase ----
    int32_t nb_creators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb_creators);
    require(nb_creators == 1 && creators[0] != nullptr, "getCreators");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    require(std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator interface kind");
    sikv_trt::PluginConfig pc;
    pc.sikv = cfg;
    pc.calib_queries = 8;
    std::vector<int32_t> storage;
    std::vector<PluginField> fields;
    sikv_trt::config_to_fields(pc, storage, fields);
    PluginFieldCollection fc{int32_t(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> build(creator->createPlugin("attn0", &fc, TensorRTPhase::kBUILD));
    require(build != nullptr, "createPlugin(kBUILD)");
    auto* core = static_cast<IPluginV3OneCore*>(build->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* bld = static_cast<IPluginV3OneBuild*>(build->getCapabilityInterface(PluginCapabilityType::kBUILD));
    require(core && bld, "capability interfaces");
    require(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0 &&
                std::strcmp(bld->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0,
            "capability interface kinds");
    const int32_t NI = SikvAttentionPlugin::kNbInputs;
    require(bld->getNbOutputs() == 1, "getNbOutputs");

    // Types.
    std::vector<DataType> in_types = {act, act, act, DataType::kINT32, DataType::kINT64, DataType::kINT32,
                                      DataType::kINT32, DataType::kINT32, DataType::kINT32, DataType::kINT32,
                                      DataType::kUINT8, DataType::kUINT8, DataType::kINT32, DataType::kINT32};
    require(in_types.size() == size_t(NI), "the harness's input list is out of date");
    DataType out_type{};
    require(bld->getOutputDataTypes(&out_type, 1, in_types.data(), NI) == 0 && out_type == act, "getOutputDataTypes");

    // Shapes: symbolic batch / token counts stood in for by constants of the profile's max.
    const int64_t max_b = cfg.max_batch, max_t = 2048, max_pages = int64_t(info.num_pages);
    ExprBuilder eb;
    std::vector<DimsExprs> in_exprs(static_cast<size_t>(NI));
    std::vector<Dims> max_dims = {dims({max_t, HQ, D}), dims({max_t, cfg.num_kv_heads, D}),
                                  dims({max_t, cfg.num_kv_heads, D}), dims({max_b, 3}), dims({max_t}), dims({max_t}),
                                  dims({max_b}), dims({max_b + 1}), dims({max_pages}), dims({max_b}),
                                  dims({int64_t(info.layer_plane_bytes)}), dims({int64_t(info.layer_state_bytes)}),
                                  dims({max_t}), dims({max_b + 1})};
    for (int32_t i = 0; i < NI; ++i) {
      DimsExprs e{};
      for (int32_t j = 0; j < max_dims[size_t(i)].nbDims; ++j) e.d[e.nbDims++] = eb.constant(max_dims[size_t(i)].d[j]);
      in_exprs[size_t(i)] = e;
    }
    DimsExprs out_expr{};
    require(bld->getOutputShapes(in_exprs.data(), NI, nullptr, 0, &out_expr, 1, eb) == 0, "getOutputShapes");
    require(out_expr.nbDims == 3 && out_expr.d[0]->getConstantValue() == max_t &&
                out_expr.d[1]->getConstantValue() == HQ && out_expr.d[2]->getConstantValue() == D,
            "output shape is not [tokens][num_q_heads][head_dim]");

    // Formats: every position, as TensorRT asks, then a refused format and a refused type.
    std::vector<DynamicPluginTensorDesc> io(static_cast<size_t>(NI) + 1);
    auto set = [](DynamicPluginTensorDesc& t, DataType type, Dims min, Dims opt, Dims max) {
      t.desc.type = type;
      t.desc.format = TensorFormat::kLINEAR;
      t.desc.scale = 1.0f;
      t.desc.dims = opt;
      t.min = min;
      t.opt = opt;
      t.max = max;
    };
    for (int32_t i = 0; i < NI; ++i) {
      Dims mn = max_dims[size_t(i)], op = max_dims[size_t(i)];
      switch (i) {
        case SikvAttentionPlugin::kPlanes:
        case SikvAttentionPlugin::kState: break;  // fixed sizes
        case SikvAttentionPlugin::kHostRequest:
        case SikvAttentionPlugin::kSeqSlot:
        case SikvAttentionPlugin::kLastPageLen: mn.d[0] = 1, op.d[0] = 2; break;  // [batch]
        case SikvAttentionPlugin::kIndptr:
        case SikvAttentionPlugin::kRowOffsets: mn.d[0] = 2, op.d[0] = 3; break;  // [batch + 1]
        default: mn.d[0] = 1, op.d[0] = 64;  // [tokens], [pages]
      }
      set(io[size_t(i)], in_types[size_t(i)], mn, op, max_dims[size_t(i)]);
    }
    set(io[size_t(NI)], act, dims({1, HQ, D}), dims({64, HQ, D}), dims({max_t, HQ, D}));
    for (int32_t pos = 0; pos <= NI; ++pos)
      require(bld->supportsFormatCombination(pos, io.data(), NI, 1), "format combination rejected at " + std::to_string(pos));
    io[0].desc.format = TensorFormat::kHWC8;
    require(!bld->supportsFormatCombination(0, io.data(), NI, 1), "a non-linear q was accepted");
    io[0].desc.format = TensorFormat::kLINEAR;
    io[0].desc.type = dev.f16 ? DataType::kFLOAT : DataType::kHALF;
    require(!bld->supportsFormatCombination(0, io.data(), NI, 1),
            dev.f16 ? "an f32 q was accepted by an f16 plugin" : "an f16 q was accepted by an f32 plugin");
    io[0].desc.type = act;
    require(bld->configurePlugin(io.data(), NI, io.data() + NI, 1) == 0, "configurePlugin");
    const size_t ws_bytes = bld->getWorkspaceSize(io.data(), NI, io.data() + NI, 1);
    std::printf("build: %s::%s v%s, %d inputs, formats/types checked, output [tokens][%u][%u], workspace %zu B\n",
                core->getPluginNamespace(), core->getPluginName(), core->getPluginVersion(), NI, HQ, D, ws_bytes);

    // ---- serialise: the fields, copied out as a plan holds them; the build plugin is gone ----
    auto* bld_rt = static_cast<IPluginV3OneRuntime*>(build->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* ser = bld_rt->getFieldsToSerialize();
    require(ser != nullptr && ser->nbFields == int32_t(fields.size()), "getFieldsToSerialize");
    std::vector<std::string> names;
    std::vector<int32_t> words;
    std::vector<PluginFieldType> types;
    for (int32_t i = 0; i < ser->nbFields; ++i) {
      require(ser->fields[i].length == 1, "field length");
      names.emplace_back(ser->fields[i].name);
      int32_t w;
      std::memcpy(&w, ser->fields[i].data, 4);
      words.push_back(w);
      types.push_back(ser->fields[i].type);
    }
    const int32_t nb_serialised = ser->nbFields;
    build.reset();  // the plan's copy is all that is left
    std::vector<PluginField> plan_fields;
    for (size_t i = 0; i < names.size(); ++i) plan_fields.emplace_back(names[i].c_str(), &words[i], types[i], 1);
    PluginFieldCollection plan{int32_t(plan_fields.size()), plan_fields.data()};

    // ---- deserialise and attach ----
    std::unique_ptr<IPluginV3> loaded(creator->createPlugin("attn0", &plan, TensorRTPhase::kRUNTIME));
    require(loaded != nullptr, "createPlugin(kRUNTIME)");
    require(std::memcmp(&static_cast<SikvAttentionPlugin*>(loaded.get())->config().sikv, &cfg, sizeof(SikvConfig)) == 0,
            "the deserialised config differs from the built one");
    Recorder recorder;
    ResourceContext ctx(&recorder);
    auto* loaded_rt = static_cast<IPluginV3OneRuntime*>(loaded->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::unique_ptr<IPluginV3> plugin(loaded_rt->attachToContext(&ctx));
    require(plugin != nullptr, "attachToContext");
    auto* rt = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::printf("plan: %d fields serialised and read back (config identical); attached to a context\n", nb_serialised);

    // ---- runtime: the engine's pools and pages; the reference cache ----
    void* planes = dev.alloc(info.layer_plane_bytes);
    void* state = dev.alloc(info.layer_state_bytes);
    void* workspace = dev.alloc(ws_bytes);
    sikv::Kernels resetter(cfg);
    const SikvLayerPools pools = sikv::layer_pools(info, planes, state, 0);
    std::vector<int32_t> free_pages;
    for (int32_t p = int32_t(info.num_pages) - 1; p >= 0; --p) free_pages.push_back(p);
    sikv::Cache managed(cfg);
    Rng rng;

    // The schedule: new prompts of these lengths at a step, and the tokens each live sequence's
    // generation request brings (in live order; beyond the table a pattern of 1-token requests
    // and requests of 2..8 tokens).
    std::vector<Seq> live;
    std::vector<int32_t> free_slots = {7, 6, 5, 4, 3, 2, 1, 0};
    int64_t next_id = 100;
    const std::vector<std::vector<uint32_t>> prompts_at = {{70, 333}, {500}, {}, {}, {97}, {}};
    const std::vector<std::vector<uint32_t>> gen_at = {{}, {1, 1}, {3, 1, 8}, {2, 5}, {1, 6}, {1, 1, 1}};
    auto gen_tokens = [&](int step, size_t i) -> uint32_t {
      if (size_t(step) < gen_at.size() && i < gen_at[size_t(step)].size()) return gen_at[size_t(step)][i];
      return (size_t(step) + i) % 3 == 0 ? 1 : 2 + uint32_t((size_t(step) * 5 + i * 3) % 7);
    };
    // The bad request lists go in before this step's own enqueue (a context, a 1-token and a
    // 6-token generation request), then the step runs as planned.
    const int bad_step = 4;
    // Rows of slack after each step's token tensors: a bad list claiming 17 tokens points at
    // memory that exists, so a plugin that failed to refuse it would corrupt the run, not crash.
    const size_t kSlack = 17;
    size_t compared = 0, context_rows = 0, gen_rows = 0, multi_requests = 0, multi_rows = 0, zero_rows = 0;
    int rows_steps = 0, bad_lists = 0;
    double worst = 0;  // fp16 only: the worst row-relative difference
    std::string batches, bad_messages;
    const int total_steps = std::max(steps, int(prompts_at.size()));
    for (int step = 0; step < total_steps; ++step) {
      // A sequence finishes at step 3, freeing its slot and pages for the prompt of step 4.
      if (step == 3) {
        Seq done = live.front();
        live.erase(live.begin());
        managed.remove(done.id);
        for (int32_t p : done.pages) free_pages.push_back(p);
        // The engine clears a slot before a new sequence reuses it.
        resetter.reset_slot(pools, uint32_t(done.slot), dev.stream);
        free_slots.push_back(done.slot);
      }
      std::vector<Seq> contexts;
      if (size_t(step) < prompts_at.size())
        for (uint32_t n : prompts_at[size_t(step)]) {
          contexts.push_back(Seq{next_id++, free_slots.back(), n, {}});
          free_slots.pop_back();
        }
      // Requests: contexts first, then generations.
      std::vector<int32_t> host_req, seq_slot, position, token_slot, indptr{0}, page_indices, last_page_len,
          row_offsets{0};
      std::vector<int64_t> slot_mapping;
      std::vector<uint32_t> new_tokens, rows;
      auto add_request = [&](Seq& s, int32_t type, uint32_t from, uint32_t to) {
        while (s.pages.size() * P < to) {
          require(!free_pages.empty(), "engine page pool exhausted");
          s.pages.push_back(free_pages.back());
          free_pages.pop_back();
        }
        host_req.insert(host_req.end(), {type, s.slot, int32_t(to - from)});
        seq_slot.push_back(s.slot);
        for (uint32_t t = from; t < to; ++t) {
          slot_mapping.push_back(int64_t(s.pages[t / P]) * P + t % P);
          position.push_back(int32_t(t));
          token_slot.push_back(s.slot);
        }
        const uint32_t np = (to + P - 1) / P;
        page_indices.insert(page_indices.end(), s.pages.begin(), s.pages.begin() + np);
        indptr.push_back(int32_t(page_indices.size()));
        last_page_len.push_back(int32_t(to - (np - 1) * P));
        new_tokens.push_back(to - from);
        // Query rows: a context request attends with its last token, a generation request
        // with each of its tokens.
        rows.push_back(type == SikvAttentionPlugin::kContext ? 1 : to - from);
        row_offsets.push_back(row_offsets.back() + int32_t(rows.back()));
      };
      for (Seq& s : contexts) add_request(s, SikvAttentionPlugin::kContext, 0, s.len);
      std::vector<uint32_t> gen_n;
      for (size_t i = 0; i < live.size(); ++i) {
        gen_n.push_back(gen_tokens(step, i));
        add_request(live[i], SikvAttentionPlugin::kGeneration, live[i].len, live[i].len + gen_n.back());
      }
      const uint32_t B = uint32_t(seq_slot.size());
      const size_t T = slot_mapping.size();
      const size_t n_rows = size_t(row_offsets.back());
      if (B == 0) continue;
      auto q = rng.vec(T * row_q), k = rng.vec(T * row_kv), v = rng.vec(T * row_kv);

      // The device tensors, each with kSlack rows of slack (zeros; slot_mapping -1 = skip).
      auto padded = [&](std::vector<float> x, size_t row) {
        x.resize(x.size() + kSlack * row, 0.0f);
        return x;
      };
      auto padded_int = [&](auto x, auto fill) {
        x.resize(x.size() + kSlack, fill);
        return x;
      };
      void* q_dev = dev.upload_act(padded(q, row_q).data(), (T + kSlack) * row_q);
      void* k_dev = dev.upload_act(padded(k, row_kv).data(), (T + kSlack) * row_kv);
      void* v_dev = dev.upload_act(padded(v, row_kv).data(), (T + kSlack) * row_kv);
      // The output starts as a non-zero pattern, so that the zero-filled prompt rows are the
      // plugin's doing.
      void* out_dev = dev.upload(std::vector<unsigned char>(dev.act_bytes((T + kSlack) * row_q), 0x5A));
      const void* bindings[SikvAttentionPlugin::kNbInputs] = {
          q_dev, k_dev, v_dev, host_req.data() /* a host tensor */, dev.upload(padded_int(slot_mapping, int64_t(-1))),
          dev.upload(padded_int(position, 0)), dev.upload(seq_slot), dev.upload(indptr), dev.upload(page_indices),
          dev.upload(last_page_len), planes, state, dev.upload(padded_int(token_slot, seq_slot.back())),
          dev.upload(row_offsets)};
      void* outputs[1] = {out_dev};

      // The shapes of a request list of `t` tokens over this step's batch.
      auto shapes = [&](int64_t t, std::vector<PluginTensorDesc>& in, PluginTensorDesc& out_desc) {
        in.resize(static_cast<size_t>(NI));
        for (int32_t i = 0; i < NI; ++i) in[size_t(i)] = io[size_t(i)].desc;
        in[SikvAttentionPlugin::kQ].dims = dims({t, HQ, D});
        in[SikvAttentionPlugin::kK].dims = in[SikvAttentionPlugin::kV].dims = dims({t, cfg.num_kv_heads, D});
        in[SikvAttentionPlugin::kHostRequest].dims = dims({B, 3});
        in[SikvAttentionPlugin::kSlotMapping].dims = in[SikvAttentionPlugin::kPosition].dims =
            in[SikvAttentionPlugin::kTokenSlot].dims = dims({t});
        in[SikvAttentionPlugin::kSeqSlot].dims = in[SikvAttentionPlugin::kLastPageLen].dims = dims({B});
        in[SikvAttentionPlugin::kIndptr].dims = in[SikvAttentionPlugin::kRowOffsets].dims = dims({B + 1});
        in[SikvAttentionPlugin::kPageIndices].dims = dims({int64_t(page_indices.size())});
        out_desc = io[size_t(NI)].desc;
        out_desc.dims = dims({t, HQ, D});
      };
      std::vector<PluginTensorDesc> in;
      PluginTensorDesc out_desc{};

      if (step == bad_step) {
        // Bad request lists, each with shapes that agree with it (onShapeChange accepts them):
        // only the request list is wrong. Each must fail through the recorder before the
        // library runs, leaving the pools as they were.
        require(!live.empty() && B > contexts.size(), "the bad-list step has no generation request");
        const std::vector<unsigned char> planes_before = [&] {
          std::vector<unsigned char> h(info.layer_plane_bytes + info.layer_state_bytes);
          dev.get(h.data(), planes, info.layer_plane_bytes);
          dev.get(h.data() + info.layer_plane_bytes, state, info.layer_state_bytes);
          return h;
        }();
        const size_t last = size_t(B) - 1;  // the last generation request
        const int64_t n_last = host_req[last * 3 + 2];
        struct Bad {
          int32_t n_last;  // the last generation request's claimed tokens
          int64_t tokens;  // q's rows
          const char* want;  // in the recorded message
        };
        const Bad bad[] = {{0, int64_t(T) - n_last, "1..16"},
                           {17, int64_t(T) - n_last + 17, "1..16"},
                           {int32_t(n_last), int64_t(T) + 1, "add up"}};
        for (const Bad& b : bad) {
          std::vector<int32_t> bad_req = host_req;
          bad_req[last * 3 + 2] = b.n_last;
          shapes(b.tokens, in, out_desc);
          require(rt->onShapeChange(in.data(), NI, &out_desc, 1) == 0, "onShapeChange (bad list)");
          const void* bad_bindings[SikvAttentionPlugin::kNbInputs];
          std::copy(std::begin(bindings), std::end(bindings), std::begin(bad_bindings));
          bad_bindings[SikvAttentionPlugin::kHostRequest] = bad_req.data();
          recorder.clear();
          require(rt->enqueue(in.data(), &out_desc, bad_bindings, outputs, workspace, dev.stream) != 0 &&
                      recorder.getNbErrors() == 1 && recorder.getErrorCode(0) == ErrorCode::kINVALID_ARGUMENT &&
                      std::strstr(recorder.getErrorDesc(0), b.want) != nullptr,
                  "a bad request list (last generation request claiming " + std::to_string(b.n_last) + " tokens, q of " +
                      std::to_string(b.tokens) + " rows) was not reported through the error recorder");
          bad_messages += std::string(bad_messages.empty() ? "" : "; ") + recorder.getErrorDesc(0);
          ++bad_lists;
        }
        recorder.clear();
        std::vector<unsigned char> after(planes_before.size());
        dev.get(after.data(), planes, info.layer_plane_bytes);
        dev.get(after.data() + info.layer_plane_bytes, state, info.layer_state_bytes);
        require(after == planes_before, "a refused request list changed the plane block or the state pool");
      }

      shapes(int64_t(T), in, out_desc);
      require(rt->onShapeChange(in.data(), NI, &out_desc, 1) == 0, "onShapeChange");
      const int32_t rc = rt->enqueue(in.data(), &out_desc, bindings, outputs, workspace, dev.stream);
      require(rc == 0, "enqueue failed: " + std::string(recorder.getNbErrors() ? recorder.getErrorDesc(0) : ""));
      const std::vector<float> result = dev.get_act(out_dev, T * row_q);

      // The reference: the managed cache fed the same K/V, then one attend_rows over every
      // request with the same query rows (a context's last token, a generation's every token).
      std::vector<int64_t> ids;
      std::vector<float> q_rows;
      size_t tok = 0;
      for (Seq& s : contexts) {
        const uint32_t n = s.len, nq = std::min<uint32_t>(n, uint32_t(pc.calib_queries));
        managed.add(s.id);
        auto* kd = dev.upload_act(k.data() + tok * row_kv, n * row_kv);
        auto* vd = dev.upload_act(v.data() + tok * row_kv, n * row_kv);
        auto* qt = dev.upload_act(q.data() + (tok + n - nq) * row_q, nq * row_q);
        managed.calibrate(0, s.id, n, kd, vd, nq, qt, dev.stream);
        ids.push_back(s.id);
        q_rows.insert(q_rows.end(), q.begin() + long((tok + n - 1) * row_q), q.begin() + long((tok + n) * row_q));
        tok += n;
      }
      const size_t gen_start = tok;
      if (!live.empty()) {
        std::vector<int64_t> gen_ids;
        for (Seq& s : live) gen_ids.push_back(s.id);
        auto* kd = dev.upload_act(k.data() + tok * row_kv, k.size() - tok * row_kv);
        auto* vd = dev.upload_act(v.data() + tok * row_kv, v.size() - tok * row_kv);
        managed.append(0, gen_ids, gen_n, kd, vd, dev.stream);
        ids.insert(ids.end(), gen_ids.begin(), gen_ids.end());
        q_rows.insert(q_rows.end(), q.begin() + long(tok * row_q), q.end());
      }
      require(q_rows.size() == n_rows * row_q, "the reference's query rows");
      void* od = dev.alloc(dev.act_bytes(n_rows * row_q));
      managed.attend_rows(0, ids, rows, dev.upload_act(q_rows.data(), q_rows.size()), od, dev.stream);
      const std::vector<float> ref_rows = dev.get_act(od, n_rows * row_q);
      // Into q's row order: a context's row at its last token, zeros at its other prompt rows,
      // the generation rows after the prompts.
      std::vector<float> expect(T * row_q, 0.0f);
      std::vector<bool> is_zero_row(T, false);
      tok = 0;
      for (size_t b = 0; b < contexts.size(); ++b) {
        const size_t n = contexts[b].len;
        std::copy(ref_rows.begin() + long(b * row_q), ref_rows.begin() + long((b + 1) * row_q),
                  expect.begin() + long((tok + n - 1) * row_q));
        for (size_t t = tok; t + 1 < tok + n; ++t) is_zero_row[t] = true;
        tok += n;
      }
      std::copy(ref_rows.begin() + long(contexts.size() * row_q), ref_rows.end(), expect.begin() + long(gen_start * row_q));

      // The prompt rows but the last: exactly zero (+0.0, as zero-filled), on every device.
      for (size_t t = 0; t < T; ++t) {
        if (!is_zero_row[t]) continue;
        for (size_t i = t * row_q; i < (t + 1) * row_q; ++i)
          if (result[i] != 0.0f || std::signbit(result[i])) {
            std::fprintf(stderr, "step %d: prompt row %zu is not zero-filled (out[%zu] = %.9g)\n", step, t, i,
                         double(result[i]));
            return 1;
          }
        ++zero_rows;
      }
      if (!dev.f16) {
        for (size_t i = 0; i < result.size(); ++i)
          if (std::memcmp(&result[i], &expect[i], sizeof(float)) != 0) {
            std::fprintf(stderr, "step %d: plugin out[%zu] (token row %zu) = %.9g, managed cache %.9g\n", step, i,
                         i / row_q, double(result[i]), double(expect[i]));
            return 1;
          }
      } else {
        // Per row of head_dim: the largest difference over the row's largest |reference|, no
        // floor (a row of small outputs is held to the same relative accuracy).
        for (size_t r = 0; r < result.size() / D; ++r) {
          if (is_zero_row[r / HQ]) continue;  // checked above
          double top = 0, diff = 0;
          for (size_t c = 0; c < D; ++c) {
            const double w = expect[r * D + c], g = result[r * D + c];
            if (!std::isfinite(g)) diff = INFINITY;
            top = std::max(top, std::fabs(w));
            diff = std::max(diff, std::fabs(g - w));
          }
          const double rel = top > 0 ? diff / top : diff;
          worst = std::max(worst, rel);
          if (!(rel <= kF16RowTol)) {
            std::fprintf(stderr, "step %d: plugin row %zu (token row %zu, head %zu) differs from the managed cache by "
                         "%.3e (relative to the row's max |out|)\n", step, r, r / HQ, r % HQ, rel);
            return 1;
          }
        }
      }
      compared += result.size();
      context_rows += contexts.size();
      bool multi = false;
      std::string gen_list;
      for (uint32_t n : gen_n) {
        if (n > 1) {
          multi = true;
          ++multi_requests;
          multi_rows += n;
        } else {
          ++gen_rows;
        }
        gen_list += (gen_list.empty() ? "" : "+") + std::to_string(n);
      }
      rows_steps += multi ? 1 : 0;
      batches += (batches.empty() ? "" : ",") + std::to_string(contexts.size()) + "c+" + std::to_string(live.size()) + "g";
      if (multi) batches += "(" + gen_list + ")";
      for (size_t i = 0; i < live.size(); ++i) live[i].len += gen_n[i];
      for (Seq& s : contexts) live.push_back(s);
    }
    std::printf("runtime: %d steps, batches %s (%zu context rows, %zu one-token generation rows)\n", total_steps,
                batches.c_str(), context_rows, gen_rows);
    std::printf("multi-row: %zu generation requests of 2..8 tokens, %zu rows compared, through sikv_kernel_decode_rows "
                "in %d steps; %zu prompt rows zero-filled\n",
                multi_requests, multi_rows, rows_steps, zero_rows);
    if (dev.f16)
      std::printf("plugin == managed cache: %zu fp16 outputs within %.0e of each row's max |out| (worst %.3e)\n",
                  compared, kF16RowTol, worst);
    else
      std::printf("plugin == managed cache: %zu outputs bit-identical\n", compared);
    require(bad_lists == 3, "the bad request lists were not tried");
    std::printf("errors: %d bad request lists fail enqueue, reported to the recorder (\"%s\"), the pools unchanged and "
                "the run matching after them\n",
                bad_lists, bad_messages.c_str());
#if defined(SIKV_WITH_CUDA_RUNTIME)
    if (cuda) cudaStreamDestroy(dev.stream);
#endif
  } catch (const std::exception& e) {
    std::fprintf(stderr, "trt_plugin_harness: %s\n", e.what());
    return 1;
  }
  return 0;
}
