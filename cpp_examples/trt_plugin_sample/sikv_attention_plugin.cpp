#include "sikv_attention_plugin.h"

#include <cstdio>

using trt_shim::DataType;
using trt_shim::Dims;
using trt_shim::DynamicPluginTensorDesc;
using trt_shim::PluginTensorDesc;

namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// TensorRT logs through an ILogger; the sample prints.
int32_t report(const char* what) noexcept {
  std::fprintf(stderr, "SikvDecodeAttention: %s\n", what);
  return -1;
}

}  // namespace

SikvAttentionPlugin::SikvAttentionPlugin(const SikvConfig& config)
    : kernels_(config), layout_(sikv::query_layout(config)) {}

DataType SikvAttentionPlugin::activation_type() const noexcept {
  switch (kernels_.config().dtype) {
    case SIKV_DTYPE_F16: return DataType::kHALF;
    case SIKV_DTYPE_BF16: return DataType::kBF16;
    default: return DataType::kFLOAT;
  }
}

int32_t SikvAttentionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                                int32_t nbInputs) const noexcept {
  if (nbOutputs != kNbOutputs || nbInputs != kNbInputs) return report("wrong number of bindings");
  outputTypes[kOut] = inputTypes[kQ];
  return 0;
}

int32_t SikvAttentionPlugin::getOutputShapes(const Dims* inputs, int32_t nbInputs, Dims* outputs,
                                             int32_t nbOutputs) const noexcept {
  if (nbOutputs != kNbOutputs || nbInputs != kNbInputs) return report("wrong number of bindings");
  outputs[kOut] = inputs[kQ];  // [batch][num_q_heads][head_dim]
  return 0;
}

bool SikvAttentionPlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut,
                                                    int32_t nbInputs, int32_t nbOutputs) const noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  const DataType t = inOut[pos].desc.type;
  switch (pos) {
    case kQ: return t == activation_type();
    case kIndptr:
    case kPageIndices:
    case kLastPageLen:
    case kSeqSlot: return t == DataType::kINT32;
    case kPlanes:
    case kState: return t == DataType::kUINT8;
    default: return t == activation_type();  // the output
  }
}

int32_t SikvAttentionPlugin::configurePlugin(const DynamicPluginTensorDesc* in, int32_t nbInputs,
                                             const DynamicPluginTensorDesc*, int32_t nbOutputs) noexcept {
  const SikvConfig& c = kernels_.config();
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return report("wrong number of bindings");
  const Dims& q = in[kQ].max;
  if (q.nbDims != 3 || q.d[1] != c.num_q_heads || q.d[2] != c.head_dim) return report("q must be [batch][num_q_heads][head_dim]");
  if (q.d[0] < 1 || q.d[0] > c.max_batch) return report("the largest batch exceeds the configuration's max_batch");
  if (in[kPlanes].max.d[0] < int64_t(layout_.layer_plane_bytes) || in[kState].max.d[0] < int64_t(layout_.layer_state_bytes))
    return report("the plane block or state pool is smaller than sikv_query_layout says");
  max_batch_ = uint32_t(q.d[0]);
  return 0;
}

SikvAttentionPlugin::WorkspaceLayout SikvAttentionPlugin::workspace_for(uint32_t batch) const {
  const SikvConfig& c = kernels_.config();
  WorkspaceLayout w;
  const size_t rows = size_t(batch) * c.num_kv_heads;
  w.indices = 0;
  w.counts = align_up(rows * c.budget_max * sizeof(int32_t));
  w.kernels = w.counts + align_up(rows * sizeof(int32_t));
  w.kernels_bytes = kernels_.workspace_size(batch);
  w.total = w.kernels + align_up(w.kernels_bytes);
  return w;
}

size_t SikvAttentionPlugin::getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                             const DynamicPluginTensorDesc*, int32_t) const noexcept {
  try {
    if (nbInputs != kNbInputs) return 0;
    return workspace_for(uint32_t(inputs[kQ].max.d[0])).total;
  } catch (const sikv::Error& e) {
    report(e.what());
    return 0;
  }
}

int32_t SikvAttentionPlugin::onShapeChange(const PluginTensorDesc* in, int32_t nbInputs, const PluginTensorDesc*,
                                           int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return report("wrong number of bindings");
  const int64_t b = in[kQ].dims.d[0];
  if (b < 1 || b > max_batch_) return report("batch outside the configured range");
  if (in[kIndptr].dims.d[0] != b + 1 || in[kLastPageLen].dims.d[0] != b || in[kSeqSlot].dims.d[0] != b)
    return report("page table / seq_slot shapes do not match the batch");
  batch_ = uint32_t(b);
  return 0;
}

int32_t SikvAttentionPlugin::enqueue(const PluginTensorDesc*, const PluginTensorDesc*, const void* const* inputs,
                                     void* const* outputs, void* workspace, trt_shim::cudaStream_t stream) noexcept {
  // No exception may leave enqueue: TensorRT calls it from C++ code that does not expect one.
  try {
    const WorkspaceLayout w = workspace_for(batch_);
    auto* ws = static_cast<unsigned char*>(workspace);
    auto* indices = reinterpret_cast<int32_t*>(ws + w.indices);
    auto* counts = reinterpret_cast<int32_t*>(ws + w.counts);
    void* kernel_ws = w.kernels_bytes ? ws + w.kernels : nullptr;

    SikvPageTable table{};
    table.indptr = static_cast<const int32_t*>(inputs[kIndptr]);
    table.indices = static_cast<const int32_t*>(inputs[kPageIndices]);
    table.last_page_len = static_cast<const int32_t*>(inputs[kLastPageLen]);
    table.batch = batch_;
    // The bindings carry one layer's block; its planes sit at the offsets sikv_query_layout gives.
    const SikvLayerPools pools =
        sikv::layer_pools(layout_, const_cast<void*>(inputs[kPlanes]), const_cast<void*>(inputs[kState]), 0);
    const auto* seq_slot = static_cast<const int32_t*>(inputs[kSeqSlot]);

    kernels_.select(pools, table, seq_slot, inputs[kQ], indices, counts, kernel_ws, w.kernels_bytes, stream);
    kernels_.attend(pools, table, seq_slot, inputs[kQ], indices, counts, outputs[kOut], kernel_ws, w.kernels_bytes,
                    stream);
    return 0;
  } catch (const std::exception& e) {
    return report(e.what());
  }
}
