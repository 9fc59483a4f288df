#include "sikv_attention_plugin.h"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>

using nvinfer1::DataType;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ErrorCode;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace sikv_trt {

namespace {

// Every SikvConfig member, by name: the serialised form is one field per member, so a plan
// file states its whole configuration and a new library default cannot change an old plan.
struct FieldDef {
  char const* name;
  size_t offset;
  bool is_float;
};
#define SIKV_FIELD(m) FieldDef{#m, offsetof(SikvConfig, m), false}
#define SIKV_FIELD_F(m) FieldDef{#m, offsetof(SikvConfig, m), true}
constexpr FieldDef kConfigFields[] = {
    SIKV_FIELD(device),        SIKV_FIELD(device_ordinal), SIKV_FIELD(dtype),          SIKV_FIELD(num_layers),
    SIKV_FIELD(num_q_heads),   SIKV_FIELD(num_kv_heads),   SIKV_FIELD(head_dim),       SIKV_FIELD(key_bits),
    SIKV_FIELD(value_bits),    SIKV_FIELD(page_size),      SIKV_FIELD(num_pages),      SIKV_FIELD(max_seqs),
    SIKV_FIELD(max_seq_len),   SIKV_FIELD(max_batch),      SIKV_FIELD(max_append_tokens), SIKV_FIELD(n_sink),
    SIKV_FIELD(n_heavy),       SIKV_FIELD(n_window),       SIKV_FIELD_F(budget_ratio), SIKV_FIELD(budget_min),
    SIKV_FIELD(budget_max),    SIKV_FIELD(rerank_factor),  SIKV_FIELD(selector),       SIKV_FIELD(centre),
    SIKV_FIELD(flags),         SIKV_FIELD_F(softmax_scale), SIKV_FIELD(dense_crossover),
};
#undef SIKV_FIELD
#undef SIKV_FIELD_F
constexpr size_t kNbConfigFields = sizeof(kConfigFields) / sizeof(kConfigFields[0]);
constexpr char const* kCalibQueriesField = "calib_queries";
// Every member is 4 bytes (uint32_t, int32_t or float); the fields carry them as 32-bit words.
static_assert(sizeof(SikvConfig) == kNbConfigFields * 4, "a SikvConfig member is missing from kConfigFields");

size_t dtype_bytes(uint32_t dtype) { return dtype == SIKV_DTYPE_F32 ? 4 : 2; }

constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Copies rows (query rows into the workspace, output rows out of it) on the stream, device to
// device (graph-capturable on a GPU). Real TensorRT headers bring the CUDA runtime; the
// CPU-only build copies host memory.
void copy_rows(void* dst, void const* src, size_t bytes, uint32_t device, cudaStream_t stream) {
  if (bytes == 0) return;
  if (device == SIKV_DEVICE_CPU) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if defined(SIKV_HAVE_TENSORRT) || defined(SIKV_WITH_CUDA_RUNTIME)
  if (cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream) != cudaSuccess)
    throw std::runtime_error("cudaMemcpyAsync of the query or output rows failed");
#else
  (void)stream;
  throw std::runtime_error("built without the CUDA runtime: only the CPU device is available");
#endif
}

// Zero-fills output rows on the stream (a context request's prompt rows but its last).
void zero_rows(void* dst, size_t bytes, uint32_t device, cudaStream_t stream) {
  if (bytes == 0) return;
  if (device == SIKV_DEVICE_CPU) {
    std::memset(dst, 0, bytes);
    return;
  }
#if defined(SIKV_HAVE_TENSORRT) || defined(SIKV_WITH_CUDA_RUNTIME)
  if (cudaMemsetAsync(dst, 0, bytes, stream) != cudaSuccess) throw std::runtime_error("cudaMemsetAsync of the output rows failed");
#else
  (void)stream;
  throw std::runtime_error("built without the CUDA runtime: only the CPU device is available");
#endif
}

void call(SikvStatus s, char const* what) {
  if (s != SIKV_OK) throw sikv::Error(s, std::string(what) + ": " + sikv_last_error_message());
}

// The library's part of the workspace: enough for calibrate and sikv_kernel_decode at `batch`
// and, when `n_rows` is not 0, for sikv_kernel_decode_rows at `n_rows` query rows.
size_t library_workspace(sikv::Kernels const& k, uint32_t batch, uint32_t n_rows) {
  size_t bytes = k.workspace_size(batch);
  if (n_rows != 0) {
    size_t rows_bytes = 0;
    call(sikv_workspace_size_rows(k.get(), n_rows, &rows_bytes), "sikv_workspace_size_rows");
    bytes = std::max(bytes, rows_bytes);
  }
  return bytes;
}

}  // namespace

void config_to_fields(PluginConfig const& c, std::vector<int32_t>& storage, std::vector<PluginField>& fields) {
  storage.assign(kNbConfigFields + 1, 0);
  fields.clear();
  for (size_t i = 0; i < kNbConfigFields; ++i) {
    std::memcpy(&storage[i], reinterpret_cast<unsigned char const*>(&c.sikv) + kConfigFields[i].offset, 4);
    fields.emplace_back(kConfigFields[i].name, &storage[i],
                        kConfigFields[i].is_float ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32, 1);
  }
  storage[kNbConfigFields] = c.calib_queries;
  fields.emplace_back(kCalibQueriesField, &storage[kNbConfigFields], PluginFieldType::kINT32, 1);
}

std::string config_from_fields(PluginFieldCollection const* fc, PluginConfig& out) {
  PluginConfig c;
  c.sikv = sikv::Config::profile(SIKV_PROFILE_2_1);
  if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr)) return "no field collection";
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.name == nullptr || f.data == nullptr || f.length != 1) return "field " + std::to_string(i) + " is malformed";
    if (std::strcmp(f.name, kCalibQueriesField) == 0) {
      if (f.type != PluginFieldType::kINT32) return "calib_queries must be kINT32";
      std::memcpy(&c.calib_queries, f.data, 4);
      continue;
    }
    auto def = std::find_if(std::begin(kConfigFields), std::end(kConfigFields),
                            [&](FieldDef const& d) { return std::strcmp(d.name, f.name) == 0; });
    if (def == std::end(kConfigFields)) return std::string("unknown field ") + f.name;
    if (f.type != (def->is_float ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32))
      return std::string("field ") + f.name + " has the wrong type";
    std::memcpy(reinterpret_cast<unsigned char*>(&c.sikv) + def->offset, f.data, 4);
  }
  if (c.calib_queries < 1) return "calib_queries must be at least 1";
  out = c;
  return {};
}

// ---- the plugin ------------------------------------------------------------------------------

SikvAttentionPlugin::SikvAttentionPlugin(PluginConfig const& config)
    : cfg_(config), kernels_(config.sikv), layout_(sikv::query_layout(config.sikv)) {}

int32_t SikvAttentionPlugin::report(ErrorCode code, char const* what) const noexcept {
  // TensorRT collects a plugin's errors through the context's recorder; before a context
  // exists (build phase, creator) there is none and the message goes to stderr.
  if (recorder_ != nullptr)
    recorder_->reportError(code, what);
  else
    std::fprintf(stderr, "%s::%s: %s\n", kPluginNamespace, kPluginName, what);
  return -1;
}

DataType SikvAttentionPlugin::activation_type() const noexcept {
  switch (cfg_.sikv.dtype) {
    case SIKV_DTYPE_F16: return DataType::kHALF;
    case SIKV_DTYPE_BF16: return DataType::kBF16;
    default: return DataType::kFLOAT;
  }
}

nvinfer1::IPluginCapability* SikvAttentionPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* SikvAttentionPlugin::clone() noexcept {
  try {
    auto* p = new SikvAttentionPlugin(cfg_);
    p->recorder_ = recorder_;
    return p;
  } catch (std::exception const& e) {
    report(ErrorCode::kFAILED_ALLOCATION, e.what());
  } catch (...) {
    report(ErrorCode::kINTERNAL_ERROR, "clone failed");
  }
  return nullptr;
}

int32_t SikvAttentionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                                int32_t nbInputs) const noexcept {
  if (nbOutputs != kNbOutputs || nbInputs != kNbInputs) return report(ErrorCode::kINVALID_ARGUMENT, "wrong number of tensors");
  if (inputTypes[kQ] != activation_type()) return report(ErrorCode::kINVALID_ARGUMENT, "q is not of the config's dtype");
  outputTypes[kOut] = activation_type();
  return 0;
}

int32_t SikvAttentionPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                             nvinfer1::DimsExprs const*, int32_t, nvinfer1::DimsExprs* outputs,
                                             int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept {
  if (nbOutputs != kNbOutputs || nbInputs != kNbInputs) return report(ErrorCode::kINVALID_ARGUMENT, "wrong number of tensors");
  if (inputs[kQ].nbDims != 3) return report(ErrorCode::kINVALID_ARGUMENT, "q must be [tokens][num_q_heads][head_dim]");
  // One row per token, as q: [tokens][num_q_heads][head_dim].
  nvinfer1::DimsExprs& o = outputs[kOut];
  o.nbDims = 3;
  o.d[0] = inputs[kQ].d[0];
  o.d[1] = exprBuilder.constant(cfg_.sikv.num_q_heads);
  o.d[2] = exprBuilder.constant(cfg_.sikv.head_dim);
  if (o.d[1] == nullptr || o.d[2] == nullptr) return report(ErrorCode::kINTERNAL_ERROR, "expression builder failed");
  return 0;
}

bool SikvAttentionPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                    int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  // The library reads every tensor as a dense row-major array: linear format only.
  if (inOut[pos].desc.format != TensorFormat::kLINEAR) return false;
  DataType const t = inOut[pos].desc.type;
  switch (pos) {
    case kQ:
    case kK:
    case kV: return t == activation_type();
    case kSlotMapping: return t == DataType::kINT64;
    case kHostRequest:
    case kPosition:
    case kTokenSlot:
    case kRowOffsets:
    case kSeqSlot:
    case kIndptr:
    case kPageIndices:
    case kLastPageLen: return t == DataType::kINT32;
    case kPlanes:
    case kState: return t == DataType::kUINT8;
    default: return t == activation_type();  // the output
  }
}

int32_t SikvAttentionPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                             DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  // Checks the profile's ranges only; nothing is kept, since a deserialised plugin is never
  // configured and must work from its serialised config alone.
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return report(ErrorCode::kINVALID_ARGUMENT, "wrong number of tensors");
  SikvConfig const& c = cfg_.sikv;
  auto is3 = [](nvinfer1::Dims const& d, int64_t h, int64_t w) { return d.nbDims == 3 && d.d[1] == h && d.d[2] == w; };
  if (!is3(in[kQ].max, c.num_q_heads, c.head_dim) || !is3(in[kK].max, c.num_kv_heads, c.head_dim) ||
      !is3(in[kV].max, c.num_kv_heads, c.head_dim) || !is3(out[kOut].max, c.num_q_heads, c.head_dim))
    return report(ErrorCode::kINVALID_CONFIG, "q/out must be [.][num_q_heads][head_dim], k/v [.][num_kv_heads][head_dim]");
  nvinfer1::Dims const& r = in[kHostRequest].max;
  if (r.nbDims != 2 || r.d[1] != kRequestFields) return report(ErrorCode::kINVALID_CONFIG, "host_request must be [batch][3]");
  if (in[kHostRequest].min.d[0] < 1 || r.d[0] > int64_t(c.max_batch))
    return report(ErrorCode::kINVALID_CONFIG, "the profile's batch range leaves 1..max_batch");
  if (in[kPlanes].min.d[0] < int64_t(layout_.layer_plane_bytes) || in[kState].min.d[0] < int64_t(layout_.layer_state_bytes))
    return report(ErrorCode::kINVALID_CONFIG, "the plane block or state pool is smaller than sikv_query_layout says");
  return 0;
}

size_t SikvAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                             DynamicPluginTensorDesc const*, int32_t) const noexcept {
  try {
    if (nbInputs != kNbInputs) return 0;
    // Enough for the profile's largest batch and token count (covers calibrate, which needs
    // batch 1); a deserialised plugin never sees this call, and enqueue needs no more at a
    // smaller batch or fewer tokens (every part grows with them).
    int64_t const b = std::min<int64_t>(std::max<int64_t>(inputs[kHostRequest].max.d[0], 1), cfg_.sikv.max_batch);
    // Query rows: one per context request, up to 16 per generation request, never more than
    // the tokens.
    int64_t const t = std::max<int64_t>(inputs[kQ].max.d[0], 1);
    int64_t const rows = std::min<int64_t>(t, b * kMaxGenerationTokens);
    // The gathered query rows and the attend's output rows, then the library's own workspace.
    size_t const row_q = size_t(cfg_.sikv.num_q_heads) * cfg_.sikv.head_dim * dtype_bytes(cfg_.sikv.dtype);
    return 2 * align_up(size_t(rows) * row_q) + library_workspace(kernels_, uint32_t(b), uint32_t(rows));
  } catch (std::exception const& e) {
    report(ErrorCode::kINTERNAL_ERROR, e.what());
  } catch (...) {
    report(ErrorCode::kINTERNAL_ERROR, "getWorkspaceSize failed");
  }
  return 0;
}

std::string SikvAttentionPlugin::check_shapes(PluginTensorDesc const* in, PluginTensorDesc const* out) const {
  SikvConfig const& c = cfg_.sikv;
  auto dims_are = [](nvinfer1::Dims const& d, std::initializer_list<int64_t> want) {
    if (d.nbDims != int32_t(want.size())) return false;
    int32_t i = 0;
    for (int64_t w : want)
      if (d.d[i++] != w) return false;
    return true;
  };
  int64_t const b = in[kHostRequest].dims.d[0], t = in[kQ].dims.d[0];
  if (in[kHostRequest].dims.nbDims != 2 || b < 1 || b > int64_t(c.max_batch))
    return "host_request must be [batch][3] with batch in 1..max_batch";
  if (!dims_are(in[kHostRequest].dims, {b, kRequestFields})) return "host_request must be [batch][3]";
  if (!dims_are(in[kQ].dims, {t, c.num_q_heads, c.head_dim}) || !dims_are(in[kK].dims, {t, c.num_kv_heads, c.head_dim}) ||
      !dims_are(in[kV].dims, {t, c.num_kv_heads, c.head_dim}))
    return "q, k and v must have the same token count and the config's heads";
  if (t < b) return "fewer tokens than requests";
  if (!dims_are(in[kSlotMapping].dims, {t}) || !dims_are(in[kPosition].dims, {t}) || !dims_are(in[kTokenSlot].dims, {t}))
    return "slot_mapping, position and token_slot must be [tokens]";
  if (!dims_are(in[kSeqSlot].dims, {b}) || !dims_are(in[kIndptr].dims, {b + 1}) || !dims_are(in[kLastPageLen].dims, {b}) ||
      !dims_are(in[kRowOffsets].dims, {b + 1}) || in[kPageIndices].dims.nbDims != 1)
    return "seq_slot, indptr, last_page_len, row_offsets must be [batch], [batch + 1], [batch], [batch + 1]";
  if (in[kPlanes].dims.nbDims != 1 || in[kPlanes].dims.d[0] < int64_t(layout_.layer_plane_bytes) ||
      in[kState].dims.nbDims != 1 || in[kState].dims.d[0] < int64_t(layout_.layer_state_bytes))
    return "the plane block or state pool is smaller than sikv_query_layout says";
  if (!dims_are(out[kOut].dims, {t, c.num_q_heads, c.head_dim})) return "the output must be [tokens][num_q_heads][head_dim]";
  for (int32_t i = 0; i < kNbInputs; ++i)
    if (in[i].format != TensorFormat::kLINEAR) return "every tensor must be linear";
  return {};
}

int32_t SikvAttentionPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                                           int32_t nbOutputs) noexcept {
  try {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return report(ErrorCode::kINVALID_ARGUMENT, "wrong number of tensors");
    std::string const err = check_shapes(in, out);
    return err.empty() ? 0 : report(ErrorCode::kINVALID_ARGUMENT, err.c_str());
  } catch (...) {
    return report(ErrorCode::kINTERNAL_ERROR, "onShapeChange failed");
  }
}

int32_t SikvAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                     void const* const* inputs, void* const* outputs, void* workspace,
                                     cudaStream_t stream) noexcept {
  // No exception may leave enqueue: TensorRT's caller is not prepared for one.
  try {
    std::string const err = check_shapes(inputDesc, outputDesc);
    if (!err.empty()) return report(ErrorCode::kINVALID_ARGUMENT, err.c_str());
    SikvConfig const& c = cfg_.sikv;
    uint32_t const batch = uint32_t(inputDesc[kHostRequest].dims.d[0]);
    int64_t const tokens = inputDesc[kQ].dims.d[0];
    auto const* req = static_cast<int32_t const*>(inputs[kHostRequest]);

    // The host-side request list: contexts first, then generations of 1..16 tokens, covering
    // exactly the tokens of q/k/v. Checked whole before any library call, so a bad list
    // changes nothing.
    uint32_t n_context = 0, n_rows = 0;
    int64_t sum = 0, gen_tokens = 0;
    bool multi = false;  // a generation request brings several tokens: the rows path
    for (uint32_t b = 0; b < batch; ++b) {
      int32_t const type = req[b * kRequestFields], slot = req[b * kRequestFields + 1], n = req[b * kRequestFields + 2];
      if (slot < 0 || uint32_t(slot) >= c.max_seqs) return report(ErrorCode::kINVALID_ARGUMENT, "a seq_slot is out of range");
      if (type == kContext) {
        if (b != n_context) return report(ErrorCode::kINVALID_ARGUMENT, "context requests must come first");
        if (n < 1 || uint32_t(n) > c.max_append_tokens)
          return report(ErrorCode::kINVALID_ARGUMENT, "a prompt is empty or longer than max_append_tokens");
        ++n_context;
        n_rows += 1;  // its last token
      } else if (type == kGeneration) {
        if (n < 1 || n > kMaxGenerationTokens)
          return report(ErrorCode::kINVALID_ARGUMENT, "a generation request must bring 1..16 tokens");
        n_rows += uint32_t(n);
        gen_tokens += n;
        multi = multi || n > 1;
      } else {
        return report(ErrorCode::kINVALID_ARGUMENT, "a request type is neither context (0) nor generation (1)");
      }
      sum += n;
    }
    if (sum != tokens) return report(ErrorCode::kINVALID_ARGUMENT, "the requests' tokens do not add up to q's rows");
    if (gen_tokens > int64_t(c.max_append_tokens))
      return report(ErrorCode::kINVALID_ARGUMENT, "the generation requests bring more than max_append_tokens tokens");

    SikvLayerPools const pools =
        sikv::layer_pools(layout_, const_cast<void*>(inputs[kPlanes]), const_cast<void*>(inputs[kState]), 0);
    size_t const elem = dtype_bytes(c.dtype);
    size_t const row_q = size_t(c.num_q_heads) * c.head_dim * elem, row_kv = size_t(c.num_kv_heads) * c.head_dim * elem;
    auto const* q = static_cast<unsigned char const*>(inputs[kQ]);
    auto const* k = static_cast<unsigned char const*>(inputs[kK]);
    auto const* v = static_cast<unsigned char const*>(inputs[kV]);
    auto* out = static_cast<unsigned char*>(outputs[kOut]);
    auto const* slot_mapping = static_cast<int64_t const*>(inputs[kSlotMapping]);
    void* const s = static_cast<void*>(stream);
    // Without a context request q's rows are the query rows and the output's rows the attend's,
    // and the attend reads and writes them in place. With one, its last query is gathered
    // next to the others in the workspace (the attend takes the rows of a request together,
    // request after request), the attend writes its rows to the workspace, and they are
    // scattered back to their tokens' rows. Workspace: those two blocks, then the library's;
    // at most getWorkspaceSize since the batch and the rows are at most the profile's.
    bool const in_place = n_context == 0;
    size_t const staged = in_place ? 0 : align_up(size_t(n_rows) * row_q);
    auto* q_rows = static_cast<unsigned char*>(workspace);
    auto* out_rows = q_rows + staged;
    size_t const ws_bytes = library_workspace(kernels_, batch, multi ? n_rows : 0);
    void* ws = ws_bytes != 0 ? out_rows + staged : nullptr;

    // Context requests: calibrate from the prompt (its last queries pick the heavy set), which
    // also writes the prompt into its pages. Pointer offsets are host arithmetic on device
    // addresses; nothing is read back.
    size_t tok = 0;
    for (uint32_t b = 0; b < n_context; ++b) {
      uint32_t const slot = uint32_t(req[b * kRequestFields + 1]), n = uint32_t(req[b * kRequestFields + 2]);
      uint32_t const nq = std::min<uint32_t>(n, uint32_t(cfg_.calib_queries));
      call(sikv_kernel_calibrate(kernels_.get(), &pools, slot, n, k + tok * row_kv, v + tok * row_kv, nq,
                                 q + (tok + n - nq) * row_q, slot_mapping + tok, ws, ws_bytes, s),
           "sikv_kernel_calibrate");
      copy_rows(q_rows + b * row_q, q + (tok + n - 1) * row_q, row_q, c.device, stream);
      tok += n;
    }
    // Generation requests: append every new token's K/V (contiguous at the end, each token
    // naming its own slot and position), and gather their queries after the contexts' ones.
    size_t const gen_start = tok;
    if (gen_tokens != 0) {
      call(sikv_kernel_append(kernels_.get(), &pools, uint32_t(gen_tokens), k + tok * row_kv, v + tok * row_kv,
                              slot_mapping + tok, static_cast<int32_t const*>(inputs[kTokenSlot]) + tok,
                              static_cast<int32_t const*>(inputs[kPosition]) + tok, s),
           "sikv_kernel_append");
      if (!in_place) copy_rows(q_rows + size_t(n_context) * row_q, q + tok * row_q, size_t(gen_tokens) * row_q, c.device, stream);
    }
    // Then every request attends with its rows over the whole page table: one row each in one
    // sikv_kernel_decode (the one-token path, with its dense crossover), or, when a generation
    // request brings several tokens, all rows in one sikv_kernel_decode_rows (causal among a
    // request's new tokens; always the selecting path).
    SikvPageTable const table{static_cast<int32_t const*>(inputs[kIndptr]),
                              static_cast<int32_t const*>(inputs[kPageIndices]),
                              static_cast<int32_t const*>(inputs[kLastPageLen]), batch};
    void const* q_attend = in_place ? static_cast<void const*>(q) : q_rows;
    void* out_attend = in_place ? static_cast<void*>(out) : out_rows;
    auto const* seq_slot = static_cast<int32_t const*>(inputs[kSeqSlot]);
    if (multi)
      call(sikv_kernel_decode_rows(kernels_.get(), &pools, &table, seq_slot, static_cast<int32_t const*>(inputs[kRowOffsets]),
                                   n_rows, q_attend, out_attend, ws, ws_bytes, s),
           "sikv_kernel_decode_rows");
    else
      call(sikv_kernel_decode(kernels_.get(), &pools, &table, seq_slot, q_attend, out_attend, ws, ws_bytes, s),
           "sikv_kernel_decode");
    if (!in_place) {
      // Scatter: a context request's row to its last token's row, its other prompt rows zero;
      // the generation rows, contiguous on both sides, in one copy.
      tok = 0;
      for (uint32_t b = 0; b < n_context; ++b) {
        size_t const n = size_t(req[b * kRequestFields + 2]);
        zero_rows(out + tok * row_q, (n - 1) * row_q, c.device, stream);
        copy_rows(out + (tok + n - 1) * row_q, out_rows + b * row_q, row_q, c.device, stream);
        tok += n;
      }
      copy_rows(out + gen_start * row_q, out_rows + size_t(n_context) * row_q, size_t(gen_tokens) * row_q, c.device, stream);
    }
    return 0;
  } catch (sikv::Error const& e) {
    return report(ErrorCode::kFAILED_EXECUTION, e.what());
  } catch (std::exception const& e) {
    return report(ErrorCode::kINTERNAL_ERROR, e.what());
  } catch (...) {
    return report(ErrorCode::kINTERNAL_ERROR, "enqueue failed");
  }
}

nvinfer1::IPluginV3* SikvAttentionPlugin::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept {
  // TensorRT gives each execution context its own copy; errors go to that context's recorder.
  auto* p = static_cast<SikvAttentionPlugin*>(clone());
  if (p != nullptr && context != nullptr) p->recorder_ = context->getErrorRecorder();
  return p;
}

PluginFieldCollection const* SikvAttentionPlugin::getFieldsToSerialize() noexcept {
  try {
    config_to_fields(cfg_, field_values_, fields_);
    fc_.nbFields = int32_t(fields_.size());
    fc_.fields = fields_.data();
    return &fc_;
  } catch (...) {
    report(ErrorCode::kFAILED_ALLOCATION, "getFieldsToSerialize failed");
    return nullptr;
  }
}

// ---- the creator -----------------------------------------------------------------------------

SikvAttentionPluginCreator::SikvAttentionPluginCreator() {
  // The field names and types TensorRT may show a user; the values come with createPlugin.
  std::vector<int32_t> unused;
  config_to_fields(PluginConfig{}, unused, fields_);
  for (auto& f : fields_) f.data = nullptr;
  fc_.nbFields = int32_t(fields_.size());
  fc_.fields = fields_.data();
}

nvinfer1::IPluginV3* SikvAttentionPluginCreator::createPlugin(nvinfer1::AsciiChar const*, PluginFieldCollection const* fc,
                                                              nvinfer1::TensorRTPhase) noexcept {
  // The same fields serve both phases: at build time from the network, at runtime from the plan.
  try {
    PluginConfig c;
    std::string const err = config_from_fields(fc, c);
    if (!err.empty()) {
      std::fprintf(stderr, "%s::%s creator: %s\n", kPluginNamespace, kPluginName, err.c_str());
      return nullptr;
    }
    return new SikvAttentionPlugin(c);
  } catch (std::exception const& e) {
    std::fprintf(stderr, "%s::%s creator: %s\n", kPluginNamespace, kPluginName, e.what());
  } catch (...) {
    std::fprintf(stderr, "%s::%s creator: createPlugin failed\n", kPluginNamespace, kPluginName);
  }
  return nullptr;
}

#if defined(SIKV_HAVE_TENSORRT) && defined(SIKV_TRT_STATIC_REGISTRATION)
// Linked into an application with libnvinfer: registers the creator at static initialisation.
REGISTER_TENSORRT_PLUGIN(SikvAttentionPluginCreator);
#endif

}  // namespace sikv_trt

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static sikv_trt::SikvAttentionPluginCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
