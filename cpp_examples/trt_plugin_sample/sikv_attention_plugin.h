// A TensorRT-style decode-attention plugin over libselfindexkv's stateless calls.
//
// The class has the shape of an IPluginV3 plugin (IPluginV3OneCore / OneBuild / OneRuntime):
// the build phase sees shapes and asks for a workspace size, the runtime phase gets tensor
// pointers, a workspace and a stream in `enqueue`. TensorRT's headers are not needed to build
// this sample, so the few TensorRT types it touches are stood in for by `trt_shim` (same
// names, same enum values); a real plugin derives from nvinfer1::IPluginV3 and friends and
// keeps the bodies as they are.
//
// Everything is owned by the engine and arrives as plugin inputs: the query, the FlashInfer-
// style CSR page table, each sequence's state slot, and this layer's plane block and state pool
// (sized by sikv_query_layout). The plugin only computes: sikv_kernel_select, then
// sikv_kernel_attend, on the given stream, with no allocation (CUDA-graph capturable on a GPU).

#pragma once

#include "selfindexkv.hpp"

#include <cstdint>

namespace trt_shim {

enum class DataType : int32_t { kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3, kBOOL = 4, kUINT8 = 5, kFP8 = 6, kBF16 = 7, kINT64 = 8 };

struct Dims {
  static constexpr int32_t MAX_DIMS = 8;
  int32_t nbDims = 0;
  int64_t d[MAX_DIMS] = {};
};

struct PluginTensorDesc {
  Dims dims;
  DataType type = DataType::kFLOAT;
};

struct DynamicPluginTensorDesc {
  PluginTensorDesc desc;
  Dims min, opt, max;
};

using cudaStream_t = void*;

}  // namespace trt_shim

class SikvAttentionPlugin {
 public:
  // Input bindings, in order.
  enum Input : int32_t {
    kQ = 0,            // [batch][num_q_heads][head_dim], config dtype
    kIndptr = 1,       // int32 [batch + 1]
    kPageIndices = 2,  // int32 [pages of the batch]
    kLastPageLen = 3,  // int32 [batch]
    kSeqSlot = 4,      // int32 [batch]: each sequence's state slot
    kPlanes = 5,       // uint8 [layer_plane_bytes]: this layer's plane block
    kState = 6,        // uint8 [layer_state_bytes]: this layer's state pool
    kNbInputs = 7
  };
  enum Output : int32_t { kOut = 0, kNbOutputs = 1 };  // [batch][num_q_heads][head_dim]

  explicit SikvAttentionPlugin(const SikvConfig& config);

  // IPluginV3OneCore
  const char* getPluginName() const noexcept { return "SikvDecodeAttention"; }
  const char* getPluginVersion() const noexcept { return "1"; }
  const char* getPluginNamespace() const noexcept { return "sikv"; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept { return kNbOutputs; }
  int32_t getOutputDataTypes(trt_shim::DataType* outputTypes, int32_t nbOutputs, const trt_shim::DataType* inputTypes,
                             int32_t nbInputs) const noexcept;
  int32_t getOutputShapes(const trt_shim::Dims* inputs, int32_t nbInputs, trt_shim::Dims* outputs,
                          int32_t nbOutputs) const noexcept;
  bool supportsFormatCombination(int32_t pos, const trt_shim::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) const noexcept;
  int32_t configurePlugin(const trt_shim::DynamicPluginTensorDesc* in, int32_t nbInputs,
                          const trt_shim::DynamicPluginTensorDesc* out, int32_t nbOutputs) noexcept;
  // Bytes for the selection (indices, counts) plus sikv_workspace_size at the largest batch.
  size_t getWorkspaceSize(const trt_shim::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                          const trt_shim::DynamicPluginTensorDesc* outputs, int32_t nbOutputs) const noexcept;

  // IPluginV3OneRuntime
  int32_t onShapeChange(const trt_shim::PluginTensorDesc* in, int32_t nbInputs, const trt_shim::PluginTensorDesc* out,
                        int32_t nbOutputs) noexcept;
  int32_t enqueue(const trt_shim::PluginTensorDesc* inputDesc, const trt_shim::PluginTensorDesc* outputDesc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  trt_shim::cudaStream_t stream) noexcept;

  const SikvLayoutInfo& layout() const noexcept { return layout_; }

 private:
  struct WorkspaceLayout {
    size_t indices = 0, counts = 0, kernels = 0, kernels_bytes = 0, total = 0;
  };
  WorkspaceLayout workspace_for(uint32_t batch) const;
  trt_shim::DataType activation_type() const noexcept;

  sikv::Kernels kernels_;
  SikvLayoutInfo layout_;
  uint32_t max_batch_ = 0;  // from configurePlugin
  uint32_t batch_ = 0;      // from onShapeChange
};
