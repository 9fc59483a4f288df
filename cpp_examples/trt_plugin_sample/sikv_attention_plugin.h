// SikvAttention: a TensorRT IPluginV3 (IPluginV3OneCore / OneBuild / OneRuntime) over
// libselfindexkv's stateless calls, for one attention layer of an engine that owns its memory.
//
// Built against the real TensorRT headers (NvInferRuntime.h) when SIKV_HAVE_TENSORRT is defined,
// otherwise against trt_decls/trt_plugin_decls.h, which declares the same API subset.
//
// Memory: the engine owns everything, as TensorRT-LLM's attention plugin receives its KV pool
// pointers as inputs. This layer's plane block and state pool (sized by sikv_query_layout) are
// plugin inputs; the plugin allocates nothing and keeps no per-sequence state.
//
// One enqueue serves a batch of requests, context requests first, then generation requests:
//   - a context request (its prompt, n tokens) calibrates its sequence slot from the prompt
//     (sikv_kernel_calibrate), writing the prompt into the pages its slot_mapping names;
//   - a generation request brings 1..16 new tokens (one for plain decoding, several when a
//     speculative draft is verified); all of them append their K/V (sikv_kernel_append);
//   - then every request attends: a context request with its prompt's last token (one query
//     row), a generation request with each of its n tokens (n rows, row r seeing the positions
//     up to its own: causal among the new tokens). When every generation request brings one
//     token this is one sikv_kernel_decode (one row per request); when one brings more, one
//     sikv_kernel_decode_rows over the same page table with row_offsets.
// The output has q's rows: a generation request's rows get their attention rows, a context
// request's last prompt row gets its attention row and its other prompt rows are zero-filled.
// Attention among a prompt's own tokens (prefill attention) is the engine's dense attention
// kernel's job; the engine takes those rows from it.
//
// Inputs (all linear):                                          location
//   0 q            [tokens][num_q_heads][head_dim]   dtype       device
//   1 k            [tokens][num_kv_heads][head_dim]  dtype       device
//   2 v            [tokens][num_kv_heads][head_dim]  dtype       device
//   3 host_request int32 [batch][3]: type (0 context, 1 generation), seq_slot, new tokens
//                                    (a prompt's length; 1..16 for a generation request)
//                                                                host (read in enqueue, like
//                                                                TensorRT-LLM's host_* inputs)
//   4 slot_mapping int64 [tokens]: page * page_size + offset     device
//   5 position     int32 [tokens]: each new token's position     device
//   6 seq_slot     int32 [batch]                                 device
//   7 indptr       int32 [batch + 1]  CSR page table, lengths    device
//   8 page_indices int32 [pages]      including the new tokens   device
//   9 last_page_len int32 [batch]                                device
//  10 planes       uint8 [layer_plane_bytes]                     device
//  11 state        uint8 [layer_state_bytes]                     device
//  12 token_slot   int32 [tokens]: each new token's seq_slot     device
//  13 row_offsets  int32 [batch + 1]: request b's query rows are  device
//                  [row_offsets[b], row_offsets[b + 1]): 1 for a context request, n for a
//                  generation request of n tokens, from 0 (what sikv_kernel_decode_rows takes;
//                  it must agree with host_request, which the plugin cannot read back)
// Output 0: [tokens][num_q_heads][head_dim], dtype (q's shape).
//
// Workspace: the gathered query rows and the output rows of the attend (used when the batch
// holds a context request, whose last token is not next to the others), then the library's
// workspace: sikv_workspace_size at the batch, and when rows are attended at least
// sikv_workspace_size_rows at the query rows.
// getWorkspaceSize sizes it for the profile's largest batch and token count.
//
// The whole SikvConfig (plus calib_queries) is the plugin's serialised state; the largest
// batch is the config's max_batch, so a deserialised plugin needs no configurePlugin call.

#pragma once

#ifdef SIKV_HAVE_TENSORRT
#include <NvInferRuntime.h>
#else
#include "trt_decls/trt_plugin_decls.h"  // SIKV_WITH_CUDA_RUNTIME: with the CUDA runtime
#endif

#include "selfindexkv.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sikv_trt {

constexpr char const* kPluginName = "SikvAttention";
constexpr char const* kPluginVersion = "2";
constexpr char const* kPluginNamespace = "sikv";

// Plugin configuration: the library's config and how many prompt queries calibrate.
struct PluginConfig {
  SikvConfig sikv{};
  int32_t calib_queries = 8;
};

class SikvAttentionPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime {
 public:
  enum Input : int32_t {
    kQ = 0, kK, kV, kHostRequest, kSlotMapping, kPosition, kSeqSlot, kIndptr, kPageIndices, kLastPageLen,
    kPlanes, kState, kTokenSlot, kRowOffsets, kNbInputs
  };
  enum Output : int32_t { kOut = 0, kNbOutputs = 1 };
  enum RequestType : int32_t { kContext = 0, kGeneration = 1 };
  static constexpr int32_t kRequestFields = 3;
  // The most tokens a generation request may bring: the library's query rows per sequence.
  static constexpr int32_t kMaxGenerationTokens = 16;

  // Throws sikv::Error on a configuration the library rejects (the creator catches it).
  explicit SikvAttentionPlugin(PluginConfig const& config);
  ~SikvAttentionPlugin() override = default;

  PluginConfig const& config() const noexcept { return cfg_; }

  // getInterfaceInfo is not overridden: each base (IPluginV3 and the three capabilities) keeps
  // its own, which is how TensorRT tells the capability interfaces apart.

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  nvinfer1::AsciiChar const* getPluginName() const noexcept override { return kPluginName; }
  nvinfer1::AsciiChar const* getPluginVersion() const noexcept override { return kPluginVersion; }
  nvinfer1::AsciiChar const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return kNbOutputs; }
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  nvinfer1::DataType activation_type() const noexcept;
  // Checks the runtime shapes against each other and the config; "" when they fit.
  std::string check_shapes(nvinfer1::PluginTensorDesc const* in, nvinfer1::PluginTensorDesc const* out) const;
  int32_t report(nvinfer1::ErrorCode code, char const* what) const noexcept;

  PluginConfig cfg_;
  sikv::Kernels kernels_;
  SikvLayoutInfo layout_;
  nvinfer1::IErrorRecorder* recorder_ = nullptr;  // from attachToContext; not owned
  // Backing store of getFieldsToSerialize (TensorRT reads it after the call returns).
  std::vector<int32_t> field_values_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

class SikvAttentionPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  SikvAttentionPluginCreator();
  nvinfer1::IPluginV3* createPlugin(nvinfer1::AsciiChar const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &fc_; }
  nvinfer1::AsciiChar const* getPluginName() const noexcept override { return kPluginName; }
  nvinfer1::AsciiChar const* getPluginVersion() const noexcept override { return kPluginVersion; }
  nvinfer1::AsciiChar const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

// Fills `fields` with one kINT32 / kFLOAT32 field per configuration member, pointing into
// `storage` (resized here; it must outlive the fields).
void config_to_fields(PluginConfig const& c, std::vector<int32_t>& storage, std::vector<nvinfer1::PluginField>& fields);
// Reads a configuration from fields; unknown names, wrong types or lengths give an error
// message, missing names keep the profile 2+1 defaults.
std::string config_from_fields(nvinfer1::PluginFieldCollection const* fc, PluginConfig& out);

}  // namespace sikv_trt

// The plugin-library entry point TensorRT looks up when it loads a plugin library
// (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins): every creator the library holds.
extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
