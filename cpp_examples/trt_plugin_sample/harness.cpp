// Drives SikvAttentionPlugin the way TensorRT does, with TensorRT stood in for by this file:
//   build:    getCreators -> createPlugin(fields, kBUILD) -> capabilities -> getOutputDataTypes,
//             getOutputShapes (through a small IExprBuilder), supportsFormatCombination for every
//             position (and a non-linear format that must be refused), configurePlugin with the
//             profile's min/opt/max, getWorkspaceSize
//   plan:     getFieldsToSerialize, copied out as a plan file would hold it; the build plugin freed
//   runtime:  createPlugin(copied fields, kRUNTIME) -> attachToContext (with an error recorder)
//             -> per step onShapeChange + enqueue, the batch changing between steps (context
//             requests, then generation requests, a finished sequence's slot reused)
// Each output row is compared with the managed cache (sikv::Cache) fed the same data; on the
// CPU device the plugin's stateless path must be bit-identical. A bad request list must fail
// through the error recorder, not by an exception.
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
// different calls (one batched sikv_kernel_decode here; per-sequence and per-batch sikv_attend
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
    cfg.max_seqs = 4;
    cfg.max_batch = 4;
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
                                      DataType::kUINT8, DataType::kUINT8};
    DataType out_type{};
    require(bld->getOutputDataTypes(&out_type, 1, in_types.data(), NI) == 0 && out_type == act, "getOutputDataTypes");

    // Shapes: symbolic batch / token counts stood in for by constants of the profile's max.
    const int64_t max_b = cfg.max_batch, max_t = 2048, max_pages = int64_t(info.num_pages);
    ExprBuilder eb;
    std::vector<DimsExprs> in_exprs(static_cast<size_t>(NI));
    std::vector<Dims> max_dims = {dims({max_t, HQ, D}), dims({max_t, cfg.num_kv_heads, D}),
                                  dims({max_t, cfg.num_kv_heads, D}), dims({max_b, 3}), dims({max_t}), dims({max_t}),
                                  dims({max_b}), dims({max_b + 1}), dims({max_pages}), dims({max_b}),
                                  dims({int64_t(info.layer_plane_bytes)}), dims({int64_t(info.layer_state_bytes)})};
    for (int32_t i = 0; i < NI; ++i) {
      DimsExprs e{};
      for (int32_t j = 0; j < max_dims[size_t(i)].nbDims; ++j) e.d[e.nbDims++] = eb.constant(max_dims[size_t(i)].d[j]);
      in_exprs[size_t(i)] = e;
    }
    DimsExprs out_expr{};
    require(bld->getOutputShapes(in_exprs.data(), NI, nullptr, 0, &out_expr, 1, eb) == 0, "getOutputShapes");
    require(out_expr.nbDims == 3 && out_expr.d[0]->getConstantValue() == max_b &&
                out_expr.d[1]->getConstantValue() == HQ && out_expr.d[2]->getConstantValue() == D,
            "output shape is not [batch][num_q_heads][head_dim]");

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
      if (i <= SikvAttentionPlugin::kPageIndices && i != SikvAttentionPlugin::kHostRequest) mn.d[0] = 1, op.d[0] = 64;
      if (i == SikvAttentionPlugin::kHostRequest || i == SikvAttentionPlugin::kSeqSlot ||
          i == SikvAttentionPlugin::kLastPageLen)
        mn.d[0] = 1, op.d[0] = 2;
      if (i == SikvAttentionPlugin::kIndptr) mn.d[0] = 2, op.d[0] = 3;
      set(io[size_t(i)], in_types[size_t(i)], mn, op, max_dims[size_t(i)]);
    }
    set(io[size_t(NI)], act, dims({1, HQ, D}), dims({2, HQ, D}), dims({max_b, HQ, D}));
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
    std::printf("build: %s::%s v%s, %d inputs, formats/types checked, output [batch][%u][%u], workspace %zu B\n",
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

    // The schedule: (new prompts of these lengths, then every live sequence generates).
    std::vector<Seq> live;
    std::vector<int32_t> free_slots = {3, 2, 1, 0};
    int64_t next_id = 100;
    const std::vector<std::vector<uint32_t>> prompts_at = {{70, 333}, {500}, {}, {}, {97}, {}};
    size_t compared = 0, context_rows = 0, gen_rows = 0;
    double worst = 0;  // fp16 only: the worst row-relative difference
    std::string batches;
    const int total_steps = std::max(steps, int(prompts_at.size()));
    for (int step = 0; step < total_steps; ++step) {
      // A sequence finishes at step 3, freeing its slot and pages for the prompt of step 4.
      if (step == 3) {
        Seq done = live.front();
        live.erase(live.begin());
        managed.remove(done.id);
        for (int32_t p : done.pages) free_pages.push_back(p);
        // The engine clears a slot before a new sequence reuses it.
        sikv::check(sikv_kernel_reset_slot(resetter.get(), &pools, uint32_t(done.slot), dev.stream),
                    "sikv_kernel_reset_slot");
        free_slots.push_back(done.slot);
      }
      std::vector<Seq> contexts;
      if (size_t(step) < prompts_at.size())
        for (uint32_t n : prompts_at[size_t(step)]) {
          contexts.push_back(Seq{next_id++, free_slots.back(), n, {}});
          free_slots.pop_back();
        }
      // Requests: contexts first, then generations.
      std::vector<int32_t> host_req, seq_slot, position, indptr{0}, page_indices, last_page_len;
      std::vector<int64_t> slot_mapping;
      std::vector<uint32_t> new_tokens;
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
        }
        const uint32_t np = (to + P - 1) / P;
        page_indices.insert(page_indices.end(), s.pages.begin(), s.pages.begin() + np);
        indptr.push_back(int32_t(page_indices.size()));
        last_page_len.push_back(int32_t(to - (np - 1) * P));
        new_tokens.push_back(to - from);
      };
      for (Seq& s : contexts) add_request(s, SikvAttentionPlugin::kContext, 0, s.len);
      for (Seq& s : live) add_request(s, SikvAttentionPlugin::kGeneration, s.len, s.len + 1);
      const uint32_t B = uint32_t(seq_slot.size());
      const size_t T = slot_mapping.size();
      if (B == 0) continue;
      auto q = rng.vec(T * row_q), k = rng.vec(T * row_kv), v = rng.vec(T * row_kv);

      std::vector<PluginTensorDesc> in(static_cast<size_t>(NI));
      for (int32_t i = 0; i < NI; ++i) in[size_t(i)] = io[size_t(i)].desc;
      in[SikvAttentionPlugin::kQ].dims = dims({int64_t(T), HQ, D});
      in[SikvAttentionPlugin::kK].dims = in[SikvAttentionPlugin::kV].dims = dims({int64_t(T), cfg.num_kv_heads, D});
      in[SikvAttentionPlugin::kHostRequest].dims = dims({B, 3});
      in[SikvAttentionPlugin::kSlotMapping].dims = in[SikvAttentionPlugin::kPosition].dims = dims({int64_t(T)});
      in[SikvAttentionPlugin::kSeqSlot].dims = in[SikvAttentionPlugin::kLastPageLen].dims = dims({B});
      in[SikvAttentionPlugin::kIndptr].dims = dims({B + 1});
      in[SikvAttentionPlugin::kPageIndices].dims = dims({int64_t(page_indices.size())});
      PluginTensorDesc out_desc = io[size_t(NI)].desc;
      out_desc.dims = dims({B, HQ, D});
      require(rt->onShapeChange(in.data(), NI, &out_desc, 1) == 0, "onShapeChange");

      void* out_dev = dev.alloc(dev.act_bytes(B * row_q));
      const void* bindings[SikvAttentionPlugin::kNbInputs] = {
          dev.upload_act(q.data(), q.size()), dev.upload_act(k.data(), k.size()), dev.upload_act(v.data(), v.size()),
          host_req.data() /* a host tensor */, dev.upload(slot_mapping),
          dev.upload(position), dev.upload(seq_slot), dev.upload(indptr), dev.upload(page_indices),
          dev.upload(last_page_len), planes, state};
      void* outputs[1] = {out_dev};
      const int32_t rc = rt->enqueue(in.data(), &out_desc, bindings, outputs, workspace, dev.stream);
      require(rc == 0, "enqueue failed: " + std::string(recorder.getNbErrors() ? recorder.getErrorDesc(0) : ""));
      const std::vector<float> result = dev.get_act(out_dev, B * row_q);

      // The reference: the managed cache, the same K/V and queries.
      std::vector<float> expect(B * row_q);
      size_t tok = 0;
      uint32_t b = 0;
      for (Seq& s : contexts) {
        const uint32_t n = s.len, nq = std::min<uint32_t>(n, uint32_t(pc.calib_queries));
        managed.add(s.id);
        auto* kd = dev.upload_act(k.data() + tok * row_kv, n * row_kv);
        auto* vd = dev.upload_act(v.data() + tok * row_kv, n * row_kv);
        auto* qt = dev.upload_act(q.data() + (tok + n - nq) * row_q, nq * row_q);
        managed.calibrate(0, s.id, n, kd, vd, nq, qt, dev.stream);
        std::vector<int64_t> one = {s.id};
        auto* ql = dev.upload_act(q.data() + (tok + n - 1) * row_q, row_q);
        void* od = dev.alloc(dev.act_bytes(row_q));
        managed.attend(0, one, ql, od, dev.stream);
        const std::vector<float> row = dev.get_act(od, row_q);
        std::copy(row.begin(), row.end(), expect.begin() + long(b * row_q));
        tok += n;
        ++b;
      }
      context_rows += contexts.size();
      if (!live.empty()) {
        std::vector<int64_t> ids;
        for (Seq& s : live) ids.push_back(s.id);
        const size_t g = live.size();
        auto* kd = dev.upload_act(k.data() + tok * row_kv, k.size() - tok * row_kv);
        auto* vd = dev.upload_act(v.data() + tok * row_kv, v.size() - tok * row_kv);
        auto* qg = dev.upload_act(q.data() + tok * row_q, q.size() - tok * row_q);
        managed.append_decode(0, ids, kd, vd, dev.stream);
        void* od = dev.alloc(dev.act_bytes(g * row_q));
        managed.attend(0, ids, qg, od, dev.stream);
        const std::vector<float> rows = dev.get_act(od, g * row_q);
        std::copy(rows.begin(), rows.end(), expect.begin() + long(b * row_q));
        gen_rows += g;
      }
      if (!dev.f16) {
        for (size_t i = 0; i < result.size(); ++i)
          if (std::memcmp(&result[i], &expect[i], sizeof(float)) != 0) {
            std::fprintf(stderr, "step %d: plugin out[%zu] (request %zu) = %.9g, managed cache %.9g\n", step, i,
                         i / row_q, double(result[i]), double(expect[i]));
            return 1;
          }
      } else {
        // Per row of head_dim: the largest difference over the row's largest |reference|, no
        // floor (a row of small outputs is held to the same relative accuracy).
        for (size_t r = 0; r < result.size() / D; ++r) {
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
            std::fprintf(stderr, "step %d: plugin row %zu (request %zu, head %zu) differs from the managed cache by %.3e "
                         "(relative to the row's max |out|)\n", step, r, r / HQ, r % HQ, rel);
            return 1;
          }
        }
      }
      compared += result.size();
      batches += (batches.empty() ? "" : ",") + std::to_string(contexts.size()) + "c+" + std::to_string(live.size()) + "g";
      for (Seq& s : live) s.len += 1;
      for (Seq& s : contexts) live.push_back(s);
    }
    std::printf("runtime: %d steps, batches %s (%zu context rows, %zu generation rows)\n", total_steps, batches.c_str(),
                context_rows, gen_rows);
    if (dev.f16)
      std::printf("plugin == managed cache: %zu fp16 outputs within %.0e of each row's max |out| (worst %.3e)\n",
                  compared, kF16RowTol, worst);
    else
      std::printf("plugin == managed cache: %zu outputs bit-identical\n", compared);

    // A bad request list (a generation request claiming two tokens) must come back as a
    // failed enqueue with the error in the recorder, and no exception.
    {
      std::vector<int32_t> bad_req = {SikvAttentionPlugin::kGeneration, 0, 2};
      std::vector<PluginTensorDesc> in(static_cast<size_t>(NI));
      for (int32_t i = 0; i < NI; ++i) in[size_t(i)] = io[size_t(i)].desc;
      in[SikvAttentionPlugin::kQ].dims = dims({2, HQ, D});
      in[SikvAttentionPlugin::kK].dims = in[SikvAttentionPlugin::kV].dims = dims({2, cfg.num_kv_heads, D});
      in[SikvAttentionPlugin::kHostRequest].dims = dims({1, 3});
      in[SikvAttentionPlugin::kSlotMapping].dims = in[SikvAttentionPlugin::kPosition].dims = dims({2});
      in[SikvAttentionPlugin::kSeqSlot].dims = in[SikvAttentionPlugin::kLastPageLen].dims = dims({1});
      in[SikvAttentionPlugin::kIndptr].dims = dims({2});
      in[SikvAttentionPlugin::kPageIndices].dims = dims({1});
      PluginTensorDesc out_desc = io[size_t(NI)].desc;
      out_desc.dims = dims({1, HQ, D});
      const void* bindings[SikvAttentionPlugin::kNbInputs] = {};
      bindings[SikvAttentionPlugin::kHostRequest] = bad_req.data();
      void* outputs[1] = {nullptr};
      recorder.clear();
      require(rt->enqueue(in.data(), &out_desc, bindings, outputs, workspace, dev.stream) != 0 &&
                  recorder.getNbErrors() == 1 && recorder.getErrorCode(0) == ErrorCode::kINVALID_ARGUMENT,
              "a bad request list was not reported through the error recorder");
      std::printf("errors: a bad request list fails enqueue, reported to the recorder (\"%s\")\n", recorder.getErrorDesc(0));
    }
#if defined(SIKV_WITH_CUDA_RUNTIME)
    if (cuda) cudaStreamDestroy(dev.stream);
#endif
  } catch (const std::exception& e) {
    std::fprintf(stderr, "trt_plugin_harness: %s\n", e.what());
    return 1;
  }
  return 0;
}
