// libselfindexkv: header-only C++17 wrapper over the C ABI in selfindexkv.h.
//
// - sikv::Error      exception with the status and the library's last-error message
// - sikv::check      throws sikv::Error for any status other than SIKV_OK
// - sikv::Config     a SikvConfig (fields are public) filled from a profile
// - sikv::Cache      the managed cache (llama.cpp style), unique ownership, move-only
// - sikv::Kernels    the stateless stage calls (TensorRT / FlashInfer style), move-only
// - sikv::Span       a pointer + count view (std::span is C++20)
//
// Exceptions are thrown on the caller's side only; nothing here is called back from C.
// Activation pointers (q, k, v, out) are `void*`: host memory on the CPU device, device
// memory on CUDA, element type = config.dtype. `Stream` is a cudaStream_t / CUstream
// (nullptr = legacy default stream; ignored on the CPU).

#ifndef SELFINDEXKV_HPP
#define SELFINDEXKV_HPP

#include "selfindexkv.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sikv {

using Stream = SikvStream;

// Name of a status code ("SIKV_ERR_NULL_POINTER"), for messages.
inline const char* status_name(SikvStatus s) noexcept {
  switch (s) {
    case SIKV_OK: return "SIKV_OK";
    case SIKV_ERR_INVALID_ARGUMENT: return "SIKV_ERR_INVALID_ARGUMENT";
    case SIKV_ERR_NULL_POINTER: return "SIKV_ERR_NULL_POINTER";
    case SIKV_ERR_OUT_OF_BOUNDS: return "SIKV_ERR_OUT_OF_BOUNDS";
    case SIKV_ERR_UNSUPPORTED: return "SIKV_ERR_UNSUPPORTED";
    case SIKV_ERR_OUT_OF_PAGES: return "SIKV_ERR_OUT_OF_PAGES";
    case SIKV_ERR_UNKNOWN_SEQUENCE: return "SIKV_ERR_UNKNOWN_SEQUENCE";
    case SIKV_ERR_SEQUENCE_EXISTS: return "SIKV_ERR_SEQUENCE_EXISTS";
    case SIKV_ERR_NOT_CALIBRATED: return "SIKV_ERR_NOT_CALIBRATED";
    case SIKV_ERR_ALREADY_CALIBRATED: return "SIKV_ERR_ALREADY_CALIBRATED";
    case SIKV_ERR_BUFFER_TOO_SMALL: return "SIKV_ERR_BUFFER_TOO_SMALL";
    case SIKV_ERR_NO_DEVICE: return "SIKV_ERR_NO_DEVICE";
    case SIKV_ERR_CUDA: return "SIKV_ERR_CUDA";
    case SIKV_ERR_POISONED: return "SIKV_ERR_POISONED";
    case SIKV_ERR_INTERNAL: return "SIKV_ERR_INTERNAL";
    case SIKV_ERR_MISALIGNED: return "SIKV_ERR_MISALIGNED";
    case SIKV_ERR_OUT_OF_MEMORY: return "SIKV_ERR_OUT_OF_MEMORY";
  }
  return "SIKV_ERR_<unknown>";
}

// A failed call: the status and the message the library left for this thread, and for
// SIKV_ERR_CUDA the driver's CUresult (0 otherwise).
class Error : public std::runtime_error {
 public:
  Error(SikvStatus status, const std::string& message, int cuda_code = 0)
      : std::runtime_error(std::string(status_name(status)) + ": " + message),
        status_(status),
        cuda_code_(cuda_code) {}
  SikvStatus status() const noexcept { return status_; }
  int cuda_code() const noexcept { return cuda_code_; }

 private:
  SikvStatus status_;
  int cuda_code_;
};

// Throws sikv::Error unless `s` is SIKV_OK; `call` names the C function in the message.
inline void check(SikvStatus s, const char* call = nullptr) {
  if (s == SIKV_OK) return;
  std::string msg = sikv_last_error_message();
  if (call != nullptr) msg = std::string(call) + ": " + msg;
  throw Error(s, msg, sikv_last_error_cuda_code());
}

// Pointer + count view of contiguous elements.
template <class T>
class Span {
 public:
  constexpr Span() noexcept = default;
  constexpr Span(T* data, size_t size) noexcept : data_(data), size_(size) {}
  template <size_t N>
  constexpr Span(T (&a)[N]) noexcept : data_(a), size_(N) {}
  template <class U, size_t N>
  constexpr Span(std::array<U, N>& a) noexcept : data_(a.data()), size_(N) {}
  template <class U, size_t N>
  constexpr Span(const std::array<U, N>& a) noexcept : data_(a.data()), size_(N) {}
  template <class U, class A>
  Span(std::vector<U, A>& v) noexcept : data_(v.data()), size_(v.size()) {}
  template <class U, class A>
  Span(const std::vector<U, A>& v) noexcept : data_(v.data()), size_(v.size()) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr size_t size() const noexcept { return size_; }
  constexpr T& operator[](size_t i) const noexcept { return data_[i]; }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

inline std::string version() { return sikv_version(); }
inline std::string build_info() { return sikv_build_info(); }

// Throws unless the linked library implements the ABI this header describes.
inline void check_abi() {
  if (sikv_abi_version() != SIKV_ABI_VERSION)
    throw Error(SIKV_ERR_UNSUPPORTED, "library ABI " + std::to_string(sikv_abi_version()) +
                                          " != header ABI " + std::to_string(SIKV_ABI_VERSION));
}

// Sizes and offsets of a configuration's memory (sikv_query_layout).
inline SikvLayoutInfo query_layout(const SikvConfig& c) {
  SikvLayoutInfo info{};
  check(sikv_query_layout(&c, &info), "sikv_query_layout");
  return info;
}

// A SikvConfig filled from a profile; adjust the public fields, then pass it on. The default is
// 4+1, which decodes at the exact top-k's perplexity; 2+1 stores 1.57x less for memory-bound use
// (README, "Profiles and layout").
struct Config : SikvConfig {
  Config() : SikvConfig() { *this = profile(SIKV_PROFILE_4_1); }
  static Config profile(uint32_t p) {
    Config c(Raw{});
    check(sikv_config_init(&c, p), "sikv_config_init");
    return c;
  }
  SikvLayoutInfo layout() const { return query_layout(*this); }

 private:
  struct Raw {};
  explicit Config(Raw) : SikvConfig() {}
};

// One layer's SikvLayerPools inside whole-model blocks laid out as sikv_query_layout says:
// planes of layer l at `planes + l * layer_plane_bytes`, state at `state + l * layer_state_bytes`.
inline SikvLayerPools layer_pools(const SikvLayoutInfo& info, void* planes, void* state, uint32_t layer) {
  SikvLayerPools p{};
  auto* base = static_cast<unsigned char*>(planes) + size_t(layer) * info.layer_plane_bytes;
  for (int i = 0; i < SIKV_NUM_PLANES; ++i)
    p.plane[i] = info.plane_bytes[i] != 0 ? base + info.plane_offset[i] : nullptr;
  p.state = static_cast<unsigned char*>(state) + size_t(layer) * info.layer_state_bytes;
  return p;
}

// The managed cache: the library owns (or describes) the pools and hands out pages to
// sequences by id.
class Cache {
 public:
  // Pools allocated by the library.
  explicit Cache(const SikvConfig& c) : cfg_(c) { check(sikv_cache_create(&cfg_, &h_), "sikv_cache_create"); }
  // Pools owned by the engine (sizes from query_layout); they must outlive the cache.
  Cache(const SikvConfig& c, const SikvPoolsDesc& pools) : cfg_(c) {
    check(sikv_cache_create_with_pools(&cfg_, &pools, &h_), "sikv_cache_create_with_pools");
  }
  ~Cache() { sikv_cache_destroy(h_); }
  Cache(Cache&& o) noexcept : h_(std::exchange(o.h_, nullptr)), cfg_(o.cfg_) {}
  Cache& operator=(Cache&& o) noexcept {
    if (this != &o) {
      sikv_cache_destroy(h_);
      h_ = std::exchange(o.h_, nullptr);
      cfg_ = o.cfg_;
    }
    return *this;
  }
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  SikvCache* get() const noexcept { return h_; }
  const SikvConfig& config() const noexcept { return cfg_; }

  void add(int64_t id) { check(sikv_seq_add(h_, id), "sikv_seq_add"); }
  void fork(int64_t src, int64_t dst) { check(sikv_seq_fork(h_, src, dst), "sikv_seq_fork"); }
  void remove(int64_t id) { check(sikv_seq_remove(h_, id), "sikv_seq_remove"); }
  uint32_t seq_len(int64_t id, uint32_t layer) const {
    uint32_t n = 0;
    check(sikv_seq_len(h_, id, layer, &n), "sikv_seq_len");
    return n;
  }

  // Prompt of `n_tokens` tokens (k, v: [n_tokens][H_kv][d]) and its last `n_query` queries
  // (q_tail: [n_query][H_q][d]).
  void calibrate(uint32_t layer, int64_t id, uint32_t n_tokens, const void* k, const void* v, uint32_t n_query,
                 const void* q_tail, Stream stream = nullptr) {
    check(sikv_calibrate(h_, layer, id, n_tokens, k, v, n_query, q_tail, stream), "sikv_calibrate");
  }
  // n_tokens[i] tokens for ids[i] (a prefill chunk); k, v: [sum(n_tokens)][H_kv][d].
  void append(uint32_t layer, Span<const int64_t> ids, Span<const uint32_t> n_tokens, const void* k, const void* v,
              Stream stream = nullptr) {
    same_size(ids.size(), n_tokens.size(), "n_tokens");
    check(sikv_append(h_, layer, n(ids), ids.data(), n_tokens.data(), k, v, stream), "sikv_append");
  }
  // One token per sequence (the decode step); k, v: [ids.size()][H_kv][d]. (A separate name:
  // an `append` overload without n_tokens would silently take an array of counts as `k`.)
  void append_decode(uint32_t layer, Span<const int64_t> ids, const void* k, const void* v, Stream stream = nullptr) {
    check(sikv_append(h_, layer, n(ids), ids.data(), nullptr, k, v, stream), "sikv_append");
  }
  // q, out: [ids.size()][H_q][d].
  void attend(uint32_t layer, Span<const int64_t> ids, const void* q, void* out, Stream stream = nullptr) {
    check(sikv_attend(h_, layer, n(ids), ids.data(), q, out, stream), "sikv_attend");
  }
  void attend_dense(uint32_t layer, Span<const int64_t> ids, const void* q, void* out, Stream stream = nullptr) {
    check(sikv_attend_dense(h_, layer, n(ids), ids.data(), q, out, stream), "sikv_attend_dense");
  }
  // rows[i] new tokens of ids[i] (appended before this call; 1..SIKV_MAX_QUERY_ROWS), each attending causally:
  // speculative-decoding verification, a prompt chunk. q, out: [sum(rows)][H_q][d], sequence
  // by sequence in position order. On a CUDA cache at most config max_batch rows per sequence.
  void attend_rows(uint32_t layer, Span<const int64_t> ids, Span<const uint32_t> rows, const void* q, void* out,
                   Stream stream = nullptr) {
    same_size(ids.size(), rows.size(), "rows");
    check(sikv_attend_rows(h_, layer, n(ids), ids.data(), rows.data(), q, out, stream), "sikv_attend_rows");
  }
  // attend over the caller's selection in select's layout (host arrays: indices
  // [ids.size()][H_kv][budget_max], counts [ids.size()][H_kv]) instead of the library's own.
  void attend_selected(uint32_t layer, Span<const int64_t> ids, const void* q, Span<const int32_t> indices,
                       Span<const int32_t> counts, void* out, Stream stream = nullptr) {
    size_t rows = ids.size() * cfg_.num_kv_heads;
    at_least(indices.size(), rows * cfg_.budget_max, "indices");
    at_least(counts.size(), rows, "counts");
    check(sikv_attend_selected(h_, layer, n(ids), ids.data(), q, indices.data(), counts.data(), out, stream),
          "sikv_attend_selected");
  }
  // Host arrays: indices [ids.size()][H_kv][budget_max], counts [ids.size()][H_kv].
  void select(uint32_t layer, Span<const int64_t> ids, const void* q, Span<int32_t> indices, Span<int32_t> counts,
              Stream stream = nullptr) {
    size_t rows = ids.size() * cfg_.num_kv_heads;
    at_least(indices.size(), rows * cfg_.budget_max, "indices");
    at_least(counts.size(), rows, "counts");
    check(sikv_select(h_, layer, n(ids), ids.data(), q, indices.data(), counts.data(), stream), "sikv_select");
  }
  // Selection recall per KV head for one sequence (telemetry; host float32 q [H_q][d] and the
  // sequence's exact keys [seq_len][H_kv][d]).
  std::vector<float> selection_recall(uint32_t layer, int64_t id, const float* q, const float* k_exact) {
    std::vector<float> r(cfg_.num_kv_heads);
    check(sikv_selection_recall(h_, layer, id, q, k_exact, r.data()), "sikv_selection_recall");
    return r;
  }

  SikvCacheInfo info() const {
    SikvCacheInfo i{};
    check(sikv_cache_info(h_, &i), "sikv_cache_info");
    return i;
  }
  uint64_t checksum() const {
    uint64_t x = 0;
    check(sikv_cache_checksum(h_, &x), "sikv_cache_checksum");
    return x;
  }

 private:
  static uint32_t n(Span<const int64_t> ids) { return static_cast<uint32_t>(ids.size()); }
  static void same_size(size_t a, size_t b, const char* what) {
    if (a != b) throw Error(SIKV_ERR_INVALID_ARGUMENT, std::string(what) + " and seq_ids differ in length");
  }
  static void at_least(size_t have, size_t need, const char* what) {
    if (have < need)
      throw Error(SIKV_ERR_BUFFER_TOO_SMALL,
                  std::string(what) + " holds " + std::to_string(have) + " entries, " + std::to_string(need) + " needed");
  }

  SikvCache* h_ = nullptr;
  SikvConfig cfg_;
};

// The stateless stage calls on engine-owned pools, page tables, slot mappings and workspace.
// All pointers are in the device's memory (host memory on the CPU device).
class Kernels {
 public:
  explicit Kernels(const SikvConfig& c) : cfg_(c) { check(sikv_kernels_create(&cfg_, &h_), "sikv_kernels_create"); }
  static Kernels create(const SikvConfig& c) { return Kernels(c); }
  ~Kernels() { sikv_kernels_destroy(h_); }
  Kernels(Kernels&& o) noexcept : h_(std::exchange(o.h_, nullptr)), cfg_(o.cfg_) {}
  Kernels& operator=(Kernels&& o) noexcept {
    if (this != &o) {
      sikv_kernels_destroy(h_);
      h_ = std::exchange(o.h_, nullptr);
      cfg_ = o.cfg_;
    }
    return *this;
  }
  Kernels(const Kernels&) = delete;
  Kernels& operator=(const Kernels&) = delete;

  const SikvKernels* get() const noexcept { return h_; }
  const SikvConfig& config() const noexcept { return cfg_; }

  size_t workspace_size(uint32_t batch) const {
    size_t n = 0;
    check(sikv_workspace_size(h_, batch, &n), "sikv_workspace_size");
    return n;
  }
  // What decode_rows needs for `n_rows` query rows in all.
  size_t workspace_size_rows(uint32_t n_rows) const {
    size_t n = 0;
    check(sikv_workspace_size_rows(h_, n_rows, &n), "sikv_workspace_size_rows");
    return n;
  }
  void calibrate(const SikvLayerPools& pools, uint32_t seq_slot, uint32_t n_tokens, const void* k, const void* v,
                 uint32_t n_query, const void* q_tail, const int64_t* slot_mapping, void* workspace,
                 size_t workspace_bytes, Stream stream = nullptr) const {
    check(sikv_kernel_calibrate(h_, &pools, seq_slot, n_tokens, k, v, n_query, q_tail, slot_mapping, workspace,
                                workspace_bytes, stream),
          "sikv_kernel_calibrate");
  }
  void append(const SikvLayerPools& pools, uint32_t n_tokens, const void* k, const void* v,
              const int64_t* slot_mapping, const int32_t* seq_slot, const int32_t* position,
              Stream stream = nullptr) const {
    check(sikv_kernel_append(h_, &pools, n_tokens, k, v, slot_mapping, seq_slot, position, stream),
          "sikv_kernel_append");
  }
  void select(const SikvLayerPools& pools, const SikvPageTable& table, const int32_t* seq_slot, const void* q,
              int32_t* indices, int32_t* counts, void* workspace, size_t workspace_bytes,
              Stream stream = nullptr) const {
    check(sikv_kernel_select(h_, &pools, &table, seq_slot, q, indices, counts, workspace, workspace_bytes, stream),
          "sikv_kernel_select");
  }
  void attend(const SikvLayerPools& pools, const SikvPageTable& table, const int32_t* seq_slot, const void* q,
              const int32_t* indices, const int32_t* counts, void* out, void* workspace, size_t workspace_bytes,
              Stream stream = nullptr) const {
    check(sikv_kernel_attend(h_, &pools, &table, seq_slot, q, indices, counts, out, workspace, workspace_bytes,
                             stream),
          "sikv_kernel_attend");
  }
  void attend_dense(const SikvLayerPools& pools, const SikvPageTable& table, const int32_t* seq_slot, const void* q,
                    void* out, void* workspace, size_t workspace_bytes, Stream stream = nullptr) const {
    check(sikv_kernel_attend_dense(h_, &pools, &table, seq_slot, q, out, workspace, workspace_bytes, stream),
          "sikv_kernel_attend_dense");
  }
  // Select + attend, the selection kept in the workspace, with the dense crossover: a layer's
  // decode step (sikv_kernel_decode).
  void decode(const SikvLayerPools& pools, const SikvPageTable& table, const int32_t* seq_slot, const void* q,
              void* out, void* workspace, size_t workspace_bytes, Stream stream = nullptr) const {
    check(sikv_kernel_decode(h_, &pools, &table, seq_slot, q, out, workspace, workspace_bytes, stream),
          "sikv_kernel_decode");
  }
  // Several query rows per sequence, causal among them (sikv_kernel_decode_rows); the workspace
  // is workspace_size_rows(n_rows) bytes.
  void decode_rows(const SikvLayerPools& pools, const SikvPageTable& table, const int32_t* seq_slot,
                   const int32_t* row_offsets, uint32_t n_rows, const void* q, void* out, void* workspace,
                   size_t workspace_bytes, Stream stream = nullptr) const {
    check(sikv_kernel_decode_rows(h_, &pools, &table, seq_slot, row_offsets, n_rows, q, out, workspace,
                                  workspace_bytes, stream),
          "sikv_kernel_decode_rows");
  }
  // Clears a sequence slot's state records at one layer, so it can be calibrated again.
  void reset_slot(const SikvLayerPools& pools, uint32_t seq_slot, Stream stream = nullptr) const {
    check(sikv_kernel_reset_slot(h_, &pools, seq_slot, stream), "sikv_kernel_reset_slot");
  }

 private:
  SikvKernels* h_ = nullptr;
  SikvConfig cfg_;
};

}  // namespace sikv

#endif  // SELFINDEXKV_HPP
