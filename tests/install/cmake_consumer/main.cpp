// A C++ consumer of an installed libselfindexkv, built through find_package(selfindexkv) by
// tests/install.rs: version and ABI, a CPU cache through the RAII wrapper, one sequence, and a
// status surfacing as sikv::Error.
#include <selfindexkv.hpp>

#include <cstdio>

int main() {
  try {
    sikv::check_abi();
    sikv::Config cfg = sikv::Config::profile(SIKV_PROFILE_4_1);
    cfg.device = SIKV_DEVICE_CPU;
    cfg.dtype = SIKV_DTYPE_F16;
    cfg.num_layers = 2;
    cfg.num_q_heads = 8;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 128;
    cfg.max_seqs = 2;
    cfg.max_seq_len = 256;
    cfg.max_batch = 2;
    sikv::Cache cache(cfg);
    cache.add(3);
    bool rejected = false;
    try {
      cache.add(3);  // a duplicate id is bad input
    } catch (const sikv::Error& e) {
      rejected = e.status() != SIKV_OK;
    }
    const SikvCacheInfo info = cache.info();
    if (!rejected || info.num_seqs != 1 || info.device != SIKV_DEVICE_CPU || cache.seq_len(3, 0) != 0) {
      std::printf("FAIL state: rejected %d, num_seqs %u, device %u\n", int(rejected), unsigned(info.num_seqs),
                  unsigned(info.device));
      return 1;
    }
    std::printf("ok c++ cmake: %s, abi %u, cpu cache with 1 sequence, %zu bytes/token\n", sikv::version().c_str(),
                unsigned(sikv_abi_version()), info.bytes_per_token);
  } catch (const std::exception& e) {
    std::printf("FAIL %s\n", e.what());
    return 1;
  }
  return 0;
}
