// C++17 client of selfindexkv.hpp, run by tests/c_link.rs.
//
// usage: abi_cpp17 <seed> <sparse|full> <out.bin>
//
// The scenario of tests/c/abi_c99.c (see there), with fp16 activations held as uint16_t bit
// patterns and every call made through the RAII wrapper; failures surface as sikv::Error.
// Then the wrapper itself: move-only ownership, errors carrying status and message, the
// stateless handle and its calls on pools the program owns.

#include "selfindexkv.hpp"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr uint32_t kLayers = 2;
constexpr size_t kHq = 8, kHkv = 2, kD = 64;
constexpr uint32_t kQuery = 4;
constexpr int kSteps = 64;
constexpr int64_t kIds[3] = {11, 22, 33};
constexpr uint32_t kPrompt[3] = {37, 100, 250};
constexpr uint32_t kTail[3] = {4, 7, 9};
constexpr int64_t kForkSrc = 22, kForkDst = 44, kRemoved = 11;
constexpr size_t kRowQ = kHq * kD, kRowKv = kHkv * kD;

enum : uint32_t {
  kRecHeader = 1,
  kRecConfig = 2,
  kRecInput = 3,
  kRecAttend = 4,
  kRecDense = 5,
  kRecIndices = 6,
  kRecCounts = 7,
  kRecSeqLen = 8,
  kRecInfo = 9,
  kRecChecksum = 10,
};

static_assert(std::is_move_constructible_v<sikv::Cache> && !std::is_copy_constructible_v<sikv::Cache>);
static_assert(std::is_move_assignable_v<sikv::Kernels> && !std::is_copy_assignable_v<sikv::Kernels>);

// float -> IEEE half, round to nearest even (finite inputs; overflow saturates to inf).
uint16_t to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, mag = x & 0x7fffffffu;
  if (mag >= 0x47800000u) return uint16_t(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (mag < 0x38800000u) {  // subnormal half (or zero)
    float a = std::fabs(f) * 16777216.0f;  // 2^24: units of the smallest subnormal
    return uint16_t(sign | uint32_t(std::nearbyint(a)));
  }
  uint32_t h = (mag - 0x38000000u) >> 13, rest = mag & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

float from_half(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  float v = e == 0 ? std::ldexp(float(m), -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(float(m | 0x400u), int(e) - 25);
  uint32_t x;
  std::memcpy(&x, &v, 4);
  x |= sign;
  std::memcpy(&v, &x, 4);
  return v;
}

// splitmix64, the generator of the Rust tests (tests/common), seeded with <seed> as given;
// values are odd multiples of 1/512 in (-2, 2): exact in fp16 and never 0.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  float value() {
    s += 0x9E3779B97F4A7C15ull;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    int odd = int((z >> 40) % 1024) * 2 - 1023;
    return float(odd) / 512.0f;
  }
  std::vector<uint16_t> halves(size_t n) {
    std::vector<uint16_t> v(n);
    for (auto& h : v) h = to_half(value());
    return v;
  }
};

struct Recorder {
  std::FILE* f;
  template <class T>
  void operator()(uint32_t tag, const std::vector<T>& v) {
    write(tag, v.data(), v.size() * sizeof(T));
  }
  void write(uint32_t tag, const void* p, size_t bytes) {
    uint32_t n = uint32_t(bytes);
    if (std::fwrite(&tag, 4, 1, f) != 1 || std::fwrite(&n, 4, 1, f) != 1 || (bytes && std::fwrite(p, 1, bytes, f) != bytes))
      throw std::runtime_error("cannot write the record file");
  }
};

int g_failures = 0;
#define EXPECT(cond)                                                          \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::fprintf(stderr, "abi_cpp17: line %d: expected %s\n", __LINE__, #cond); \
      ++g_failures;                                                           \
    }                                                                         \
  } while (0)

sikv::Config make_config(bool full) {
  auto c = sikv::Config::profile(SIKV_PROFILE_2_1);
  c.device = SIKV_DEVICE_CPU;
  c.dtype = SIKV_DTYPE_F16;
  c.num_layers = kLayers;
  c.num_q_heads = kHq;
  c.num_kv_heads = kHkv;
  c.head_dim = kD;
  c.page_size = 16;
  c.num_pages = 0;
  c.max_seqs = 4;
  c.max_seq_len = 512;
  c.dense_crossover = 0;  // the checks below compare selections: the sparse path always
  c.max_batch = 4;
  c.max_append_tokens = 64;
  c.n_sink = 4;
  c.n_heavy = 16;
  c.n_window = 16;
  if (full) {
    c.key_bits = c.value_bits = 16;
    c.budget_ratio = 1.0f;
    c.budget_min = c.budget_max = 512;
    c.rerank_factor = 0;
  } else {
    c.budget_ratio = 0.125f;
    c.budget_min = 16;
    c.budget_max = 48;
    c.rerank_factor = 2;
  }
  return c;
}

// The status of a call that is expected to throw (SIKV_OK if it did not).
template <class F>
SikvStatus status_of(F&& f) {
  try {
    f();
  } catch (const sikv::Error& e) {
    if (std::strlen(e.what()) == 0) ++g_failures;
    return e.status();
  }
  return SIKV_OK;
}

// The stateless calls through the wrapper on pools the program owns (host memory: the CPU
// device): one sequence of one layer in state slot 1 on pages in reverse order. decode is
// select + attend (the crossover is off), decode_rows of one row a sequence is decode, and a
// reset slot is calibrated again to the same outputs.
void stateless_checks(const sikv::Kernels& k, Rng& rng) {
  const SikvConfig& cfg = k.config();
  const SikvLayoutInfo lay = sikv::query_layout(cfg);
  std::vector<uint64_t> planes((lay.layer_plane_bytes + 7) / 8), state((lay.layer_state_bytes + 7) / 8);
  const SikvLayerPools pools = sikv::layer_pools(lay, planes.data(), state.data(), 0);
  // (+1: a pointer that is not NULL where the CPU device needs no workspace bytes)
  std::vector<uint8_t> ws(std::max(k.workspace_size(1), k.workspace_size_rows(1)) + 1);

  const uint32_t n = 200, ps = cfg.page_size, np = (n + ps - 1) / ps;
  const int32_t slot[1] = {1};
  std::vector<int32_t> pages(np);
  for (uint32_t i = 0; i < np; ++i) pages[i] = int32_t(np + 3 - i);
  std::vector<int64_t> mapping(n);
  for (uint32_t t = 0; t < n; ++t) mapping[t] = int64_t(pages[t / ps]) * ps + t % ps;
  const int32_t indptr[2] = {0, int32_t(np)}, last[1] = {int32_t(n - (np - 1) * ps)};
  const SikvPageTable table{indptr, pages.data(), last, 1};
  auto kk = rng.halves(n * kRowKv), vv = rng.halves(n * kRowKv), q = rng.halves(kRowQ);
  auto calibrate = [&] {
    k.calibrate(pools, 1, n, kk.data(), vv.data(), 1, q.data(), mapping.data(), ws.data(), ws.size());
  };
  calibrate();
  const auto planes_before = planes, state_before = state;
  EXPECT(status_of(calibrate) == SIKV_ERR_ALREADY_CALIBRATED);
  EXPECT(planes == planes_before && state == state_before);  // a refused call changes nothing

  std::vector<uint16_t> decoded(kRowQ), attended(kRowQ), rows(kRowQ), again(kRowQ);
  k.decode(pools, table, slot, q.data(), decoded.data(), ws.data(), ws.size());
  std::vector<int32_t> indices(kHkv * cfg.budget_max), counts(kHkv);
  k.select(pools, table, slot, q.data(), indices.data(), counts.data(), ws.data(), ws.size());
  k.attend(pools, table, slot, q.data(), indices.data(), counts.data(), attended.data(), ws.data(), ws.size());
  EXPECT(decoded == attended);
  const int32_t row_offsets[2] = {0, 1};
  k.decode_rows(pools, table, slot, row_offsets, 1, q.data(), rows.data(), ws.data(), ws.size());
  EXPECT(rows == decoded);

  k.reset_slot(pools, 1);
  EXPECT(status_of([&] { k.decode(pools, table, slot, q.data(), again.data(), ws.data(), ws.size()); }) ==
         SIKV_ERR_NOT_CALIBRATED);
  EXPECT(status_of([&] { k.reset_slot(pools, cfg.max_seqs); }) == SIKV_ERR_OUT_OF_BOUNDS);
  calibrate();
  k.decode(pools, table, slot, q.data(), again.data(), ws.data(), ws.size());
  EXPECT(again == decoded);
}

void wrapper_checks(sikv::Cache& cache, const sikv::Config& good, Rng& rng) {
  auto q = rng.halves(kRowQ);
  std::vector<uint16_t> out(kRowQ);
  const uint64_t before = cache.checksum();
  const int64_t unknown = 999;
  EXPECT(status_of([&] { cache.attend(0, {&unknown, 1}, q.data(), out.data()); }) == SIKV_ERR_UNKNOWN_SEQUENCE);
  try {
    cache.add(kIds[1]);
    ++g_failures;
  } catch (const sikv::Error& e) {
    EXPECT(e.status() == SIKV_ERR_SEQUENCE_EXISTS);
    EXPECT(std::string(e.what()).find("sikv_seq_add") != std::string::npos);
    EXPECT(std::string(e.what()).find("22") != std::string::npos);
  }
  std::vector<int32_t> too_small(1);
  EXPECT(status_of([&] { cache.select(0, {&kIds[1], 1}, q.data(), too_small, too_small); }) == SIKV_ERR_BUFFER_TOO_SMALL);
  {
    // The library's own selection handed back through attend_selected is attend, bit for bit.
    std::vector<int32_t> indices(kHkv * good.budget_max), counts(kHkv);
    std::vector<uint16_t> given(kRowQ);
    cache.select(0, {&kIds[1], 1}, q.data(), indices, counts);
    cache.attend(0, {&kIds[1], 1}, q.data(), out.data());
    cache.attend_selected(0, {&kIds[1], 1}, q.data(), indices, counts, given.data());
    EXPECT(given == out);
    EXPECT(status_of([&] { cache.attend_selected(0, {&kIds[1], 1}, q.data(), too_small, counts, given.data()); }) ==
           SIKV_ERR_BUFFER_TOO_SMALL);
  }
  EXPECT(cache.checksum() == before);

  auto bad = good;
  bad.dtype = 77;
  EXPECT(status_of([&] { sikv::Cache c(bad); }) == SIKV_ERR_UNSUPPORTED);
  EXPECT(status_of([&] { sikv::Config::profile(12345); }) == SIKV_ERR_UNSUPPORTED);
  EXPECT(status_of([] { sikv::check(SIKV_ERR_NULL_POINTER); }) == SIKV_ERR_NULL_POINTER);

  // Move-only ownership: the moved-from handle is empty and destroys nothing.
  sikv::Cache a(good);
  SikvCache* raw = a.get();
  sikv::Cache b(std::move(a));
  EXPECT(a.get() == nullptr && b.get() == raw);
  a = std::move(b);
  EXPECT(a.get() == raw && b.get() == nullptr);
  a.add(1);
  EXPECT(a.info().num_seqs == 1);

  // The stateless handle of the same configuration.
  auto k = sikv::Kernels::create(good);
  (void)k.workspace_size(good.max_batch);
  EXPECT(status_of([&] { (void)k.workspace_size(good.max_batch + 1); }) == SIKV_ERR_OUT_OF_BOUNDS);
  (void)k.workspace_size_rows(SIKV_MAX_QUERY_ROWS * good.max_batch);
  EXPECT(status_of([&] { (void)k.workspace_size_rows(0); }) == SIKV_ERR_OUT_OF_BOUNDS);
  EXPECT(status_of([&] { (void)k.workspace_size_rows(SIKV_MAX_QUERY_ROWS * good.max_batch + 1); }) == SIKV_ERR_OUT_OF_BOUNDS);
  EXPECT(good.layout().bytes_per_token == cache.info().bytes_per_token);
  stateless_checks(k, rng);

  sikv::check_abi();
  EXPECT(!sikv::version().empty());
}

int run(uint64_t seed, bool full, const char* path) {
  Recorder rec{std::fopen(path, "wb")};
  if (!rec.f) throw std::runtime_error(std::string("cannot open ") + path);
  Rng rng(seed);
  const sikv::Config cfg = make_config(full);
  const SikvConfig& raw_cfg = cfg;
  uint32_t header[4] = {uint32_t(seed), uint32_t(seed >> 32), uint32_t(full), uint32_t(sizeof(SikvConfig))};
  rec.write(kRecHeader, header, sizeof header);
  rec.write(kRecConfig, &raw_cfg, sizeof raw_cfg);

  sikv::Cache cache(cfg);
  EXPECT(cache.info().device == SIKV_DEVICE_CPU);
  for (int64_t id : kIds) cache.add(id);
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    for (int i = 0; i < 3; ++i) {
      uint32_t n = kPrompt[i] - kTail[i];
      auto k = rng.halves(n * kRowKv), v = rng.halves(n * kRowKv), q = rng.halves(kQuery * kRowQ);
      cache.calibrate(layer, kIds[i], n, k.data(), v.data(), kQuery, q.data());
      EXPECT(cache.seq_len(kIds[i], layer) == n);
      rec(kRecInput, k);
      rec(kRecInput, v);
      rec(kRecInput, q);
    }
  }
  const uint32_t total_tail = kTail[0] + kTail[1] + kTail[2];
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    auto k = rng.halves(total_tail * kRowKv), v = rng.halves(total_tail * kRowKv);
    cache.append(layer, kIds, kTail, k.data(), v.data());
    rec(kRecInput, k);
    rec(kRecInput, v);
  }
  std::vector<uint16_t> out(3 * kRowQ), dense(3 * kRowQ);
  for (int step = 0; step < kSteps; ++step) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      auto k = rng.halves(3 * kRowKv), v = rng.halves(3 * kRowKv);
      cache.append_decode(layer, kIds, k.data(), v.data());
      auto q = rng.halves(3 * kRowQ);
      cache.attend(layer, kIds, q.data(), out.data());
      rec(kRecInput, k);
      rec(kRecInput, v);
      rec(kRecInput, q);
      rec(kRecAttend, out);
      if (step == kSteps - 1) {
        cache.attend_dense(layer, kIds, q.data(), dense.data());
        rec(kRecDense, dense);
      }
    }
  }
  for (int i = 0; i < 3; ++i) EXPECT(cache.seq_len(kIds[i], kLayers - 1) == kPrompt[i] + kSteps);
  {
    const size_t rows = 3 * kHkv;
    std::vector<int32_t> indices(rows * cfg.budget_max), counts(rows);
    auto q = rng.halves(3 * kRowQ);
    cache.select(kLayers - 1, kIds, q.data(), indices, counts);
    rec(kRecInput, q);
    rec(kRecIndices, indices);
    rec(kRecCounts, counts);
  }
  cache.fork(kForkSrc, kForkDst);
  const std::vector<int64_t> pair = {kForkSrc, kForkDst};
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    std::vector<uint32_t> lens = {cache.seq_len(kForkSrc, layer), cache.seq_len(kForkDst, layer)};
    EXPECT(lens[0] == lens[1]);
    rec(kRecSeqLen, lens);
    auto q = rng.halves(kRowQ);
    q.insert(q.end(), q.begin(), q.end());
    cache.attend(layer, pair, q.data(), out.data());
    EXPECT(std::memcmp(out.data(), out.data() + kRowQ, kRowQ * 2) == 0);
    rec(kRecInput, q);
    rec.write(kRecAttend, out.data(), 2 * kRowQ * 2);
  }
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    auto k = rng.halves(kRowKv), v = rng.halves(kRowKv);
    cache.append_decode(layer, {&kForkDst, 1}, k.data(), v.data());
    auto q = rng.halves(kRowQ);
    cache.attend(layer, {&kForkDst, 1}, q.data(), out.data());
    rec(kRecInput, k);
    rec(kRecInput, v);
    rec(kRecInput, q);
    rec.write(kRecAttend, out.data(), kRowQ * 2);
  }
  cache.remove(kRemoved);
  const SikvCacheInfo info = cache.info();
  EXPECT(info.num_seqs == 3);
  uint32_t fields[4] = {info.device, info.num_seqs, info.free_pages, info.num_pages};
  uint64_t bpt = info.bytes_per_token;
  rec.write(kRecInfo, fields, sizeof fields);
  rec.write(kRecInfo, &bpt, sizeof bpt);
  const uint64_t checksum = cache.checksum();
  rec.write(kRecChecksum, &checksum, sizeof checksum);
  if (std::fclose(rec.f) != 0) throw std::runtime_error("cannot close the record file");

  wrapper_checks(cache, cfg, rng);
  float amax = 0;
  for (uint16_t h : out) amax = std::fmax(amax, std::fabs(from_half(h)));
  if (g_failures) {
    std::fprintf(stderr, "abi_cpp17: %d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("abi_cpp17 ok: %s mode, seed 0x%" PRIx64 ", %d decode steps x %u layers x 3 seqs (fp16, max |out| %.3f), %zu B/token/kv-head, checksum %016" PRIx64 "\n",
              full ? "full" : "sparse", seed, kSteps, kLayers, double(amax), size_t(info.bytes_per_token), checksum);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 || (std::strcmp(argv[2], "sparse") != 0 && std::strcmp(argv[2], "full") != 0)) {
    std::fprintf(stderr, "usage: %s <seed> <sparse|full> <out.bin>\n", argv[0]);
    return 2;
  }
  try {
    // Decimal or 0x-hex, as SIKV_TEST_SEED.
    return run(std::strtoull(argv[1], nullptr, 0), std::strcmp(argv[2], "full") == 0, argv[3]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "abi_cpp17: %s\n", e.what());
    return 1;
  }
}
