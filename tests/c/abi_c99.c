/* C99 client of selfindexkv.h, run by tests/c_link.rs.
 *
 * usage: abi_c99 <seed> <sparse|full> <out.bin>
 *
 * Drives the managed cache on the CPU device with float32 activations through the scenario
 * that tests/c_link.rs replays through the Rust API (same PRNG, same calls, same order):
 * 2 layers, 8 query / 2 KV heads, head_dim 64, page_size 16, a ragged batch of 3 sequences
 * (prompts of 37, 100 and 250 tokens: calibrated on all but a tail, the tails appended as one
 * ragged chunk), 64 decode steps of append + attend at every layer, a dense baseline, a
 * selection, a fork and a removal. Every input and output goes to <out.bin> as records
 * (u32 tag, u32 byte count, bytes). Then bad input through the header: NULL out-pointers,
 * an unknown dtype, an unknown sequence, destroy(NULL), the version queries. */

#include "selfindexkv.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_LAYERS 2
#define HQ 8
#define HKV 2
#define D 64
#define N_SEQS 3
#define N_QUERY 4
#define N_STEPS 64
#define FORK_SRC 22
#define FORK_DST 44
#define REMOVED 11
#define UNKNOWN_ID 999

static const int64_t IDS[N_SEQS] = {11, 22, 33};
static const uint32_t PROMPT[N_SEQS] = {37, 100, 250};
static const uint32_t TAIL[N_SEQS] = {4, 7, 9};

enum {
  REC_HEADER = 1,
  REC_CONFIG = 2,
  REC_INPUT = 3,
  REC_ATTEND = 4,
  REC_DENSE = 5,
  REC_INDICES = 6,
  REC_COUNTS = 7,
  REC_SEQ_LEN = 8,
  REC_INFO = 9,
  REC_CHECKSUM = 10
};

static FILE *g_out;
static int g_failures;

static void fail(const char *what, int line) {
  fprintf(stderr, "abi_c99: line %d: %s (last error: \"%s\")\n", line, what, sikv_last_error_message());
  exit(1);
}

#define CHECK(call)                              \
  do {                                           \
    SikvStatus st_ = (call);                     \
    if (st_ != SIKV_OK) fail(#call, __LINE__);   \
  } while (0)

#define EXPECT(cond)                                                          \
  do {                                                                        \
    if (!(cond)) {                                                            \
      fprintf(stderr, "abi_c99: line %d: expected %s\n", __LINE__, #cond);    \
      g_failures++;                                                           \
    }                                                                         \
  } while (0)

/* splitmix64, the generator of the Rust tests (tests/common), seeded with <seed> as given;
 * values are odd multiples of 1/512 in (-2, 2): exact in fp16 and never 0. */
static uint64_t g_rng;

static float next_value(void) {
  uint64_t z;
  int odd;
  g_rng += UINT64_C(0x9E3779B97F4A7C15);
  z = g_rng;
  z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
  z ^= z >> 31;
  odd = (int)((z >> 40) % 1024) * 2 - 1023;
  return (float)odd / 512.0f;
}

static float *gen(size_t n) {
  float *p = (float *)malloc(n * sizeof(float));
  size_t i;
  if (p == NULL) fail("malloc", __LINE__);
  for (i = 0; i < n; i++) p[i] = next_value();
  return p;
}

static void record(uint32_t tag, const void *data, size_t bytes) {
  uint32_t n = (uint32_t)bytes;
  if (fwrite(&tag, 4, 1, g_out) != 1 || fwrite(&n, 4, 1, g_out) != 1 ||
      (bytes > 0 && fwrite(data, 1, bytes, g_out) != bytes))
    fail("write", __LINE__);
}

static void config_for(SikvConfig *c, int full) {
  CHECK(sikv_config_init(c, SIKV_PROFILE_2_1));
  c->device = SIKV_DEVICE_CPU;
  c->dtype = SIKV_DTYPE_F32;
  c->num_layers = N_LAYERS;
  c->num_q_heads = HQ;
  c->num_kv_heads = HKV;
  c->head_dim = D;
  c->page_size = 16;
  c->num_pages = 0;
  c->max_seqs = 4;
  c->max_seq_len = 512;
  c->dense_crossover = 0; /* the checks compare selections: the sparse path always */
  c->max_batch = 4;
  c->max_append_tokens = 64;
  c->n_sink = 4;
  c->n_heavy = 16;
  c->n_window = 16;
  if (full) {
    /* 16-bit planes and a budget that covers every token: exact dense attention. */
    c->key_bits = 16;
    c->value_bits = 16;
    c->budget_ratio = 1.0f;
    c->budget_min = 512;
    c->budget_max = 512;
    c->rerank_factor = 0;
  } else {
    c->budget_ratio = 0.125f;
    c->budget_min = 16;
    c->budget_max = 48;
    c->rerank_factor = 2;
  }
}

static void bad_input_checks(SikvCache *cache, const SikvConfig *good) {
  SikvConfig c = *good;
  SikvCache *sentinel = (SikvCache *)&c; /* any non-NULL value: must stay unwritten */
  SikvCache *h = sentinel;
  uint64_t before = 0, after = 0;
  float *q = gen(HQ * D);
  float *out = (float *)calloc(HQ * D, sizeof(float));
  int64_t unknown = UNKNOWN_ID;
  const char *v;

  EXPECT(sikv_cache_info(cache, NULL) == SIKV_ERR_NULL_POINTER);
  EXPECT(strlen(sikv_last_error_message()) > 0);
  EXPECT(sikv_config_init(NULL, SIKV_PROFILE_2_1) == SIKV_ERR_NULL_POINTER);
  EXPECT(strlen(sikv_last_error_message()) > 0);
  EXPECT(sikv_cache_create(good, NULL) == SIKV_ERR_NULL_POINTER);
  EXPECT(strstr(sikv_last_error_message(), "out") != NULL);
  EXPECT(sikv_cache_checksum(cache, NULL) == SIKV_ERR_NULL_POINTER);

  c.dtype = 77;
  EXPECT(sikv_cache_create(&c, &h) == SIKV_ERR_UNSUPPORTED);
  EXPECT(h == sentinel);
  EXPECT(strstr(sikv_last_error_message(), "dtype") != NULL);
  EXPECT(sikv_config_init(&c, 12345) == SIKV_ERR_UNSUPPORTED);

  CHECK(sikv_cache_checksum(cache, &before));
  EXPECT(sikv_attend(cache, 0, 1, &unknown, q, out, NULL) == SIKV_ERR_UNKNOWN_SEQUENCE);
  EXPECT(strlen(sikv_last_error_message()) > 0);
  EXPECT(sikv_attend(cache, 0, 1, &unknown, NULL, out, NULL) != SIKV_OK);
  EXPECT(sikv_attend(cache, N_LAYERS, 1, &IDS[1], q, out, NULL) == SIKV_ERR_OUT_OF_BOUNDS);
  EXPECT(sikv_seq_add(cache, IDS[1]) == SIKV_ERR_SEQUENCE_EXISTS);
  EXPECT(sikv_seq_remove(cache, unknown) == SIKV_ERR_UNKNOWN_SEQUENCE);
  CHECK(sikv_cache_checksum(cache, &after));
  EXPECT(before == after);

  sikv_cache_destroy(NULL);
  sikv_kernels_destroy(NULL);
  EXPECT(sikv_abi_version() == SIKV_ABI_VERSION);
  v = sikv_version();
  EXPECT(v != NULL && strlen(v) > 0);
  EXPECT(sikv_build_info() != NULL);
  free(q);
  free(out);
}

int main(int argc, char **argv) {
  SikvConfig cfg;
  SikvCache *cache = NULL;
  SikvCacheInfo info;
  uint64_t seed, checksum = 0;
  uint32_t header[4];
  int full, step, i;
  uint32_t layer, total_tail = 0;
  size_t row_q = (size_t)HQ * D, row_kv = (size_t)HKV * D;
  float *out = (float *)malloc(N_SEQS * row_q * sizeof(float));
  float *dense = (float *)malloc(N_SEQS * row_q * sizeof(float));

  if (argc != 4 || (strcmp(argv[2], "sparse") != 0 && strcmp(argv[2], "full") != 0)) {
    fprintf(stderr, "usage: %s <seed> <sparse|full> <out.bin>\n", argv[0]);
    return 2;
  }
  seed = strtoull(argv[1], NULL, 0); /* decimal or 0x-hex, as SIKV_TEST_SEED */
  full = strcmp(argv[2], "full") == 0;
  g_rng = seed;
  g_out = fopen(argv[3], "wb");
  if (g_out == NULL || out == NULL || dense == NULL) fail("fopen / malloc", __LINE__);

  config_for(&cfg, full);
  header[0] = (uint32_t)seed;
  header[1] = (uint32_t)(seed >> 32);
  header[2] = (uint32_t)full;
  header[3] = (uint32_t)sizeof(SikvConfig);
  record(REC_HEADER, header, sizeof header);
  record(REC_CONFIG, &cfg, sizeof cfg);
  CHECK(sikv_cache_create(&cfg, &cache));
  CHECK(sikv_cache_info(cache, &info));
  EXPECT(info.device == SIKV_DEVICE_CPU);

  /* Prefill: calibrate each sequence at each layer on all but its tail. */
  for (i = 0; i < N_SEQS; i++) CHECK(sikv_seq_add(cache, IDS[i]));
  for (layer = 0; layer < N_LAYERS; layer++) {
    for (i = 0; i < N_SEQS; i++) {
      uint32_t n = PROMPT[i] - TAIL[i], len = 0;
      float *k = gen(n * row_kv), *v = gen(n * row_kv), *q = gen(N_QUERY * row_q);
      record(REC_INPUT, k, n * row_kv * 4);
      record(REC_INPUT, v, n * row_kv * 4);
      record(REC_INPUT, q, N_QUERY * row_q * 4);
      CHECK(sikv_calibrate(cache, layer, IDS[i], n, k, v, N_QUERY, q, NULL));
      CHECK(sikv_seq_len(cache, IDS[i], layer, &len));
      EXPECT(len == n);
      free(k);
      free(v);
      free(q);
    }
  }
  /* The tails as one ragged chunk per layer. */
  for (i = 0; i < N_SEQS; i++) total_tail += TAIL[i];
  for (layer = 0; layer < N_LAYERS; layer++) {
    float *k = gen(total_tail * row_kv), *v = gen(total_tail * row_kv);
    record(REC_INPUT, k, total_tail * row_kv * 4);
    record(REC_INPUT, v, total_tail * row_kv * 4);
    CHECK(sikv_append(cache, layer, N_SEQS, IDS, TAIL, k, v, NULL));
    free(k);
    free(v);
  }
  /* Decode: append one token per sequence, then attend, at every layer. */
  for (step = 0; step < N_STEPS; step++) {
    for (layer = 0; layer < N_LAYERS; layer++) {
      float *k = gen(N_SEQS * row_kv), *v = gen(N_SEQS * row_kv), *q;
      CHECK(sikv_append(cache, layer, N_SEQS, IDS, NULL, k, v, NULL));
      q = gen(N_SEQS * row_q);
      CHECK(sikv_attend(cache, layer, N_SEQS, IDS, q, out, NULL));
      record(REC_INPUT, k, N_SEQS * row_kv * 4);
      record(REC_INPUT, v, N_SEQS * row_kv * 4);
      record(REC_INPUT, q, N_SEQS * row_q * 4);
      record(REC_ATTEND, out, N_SEQS * row_q * 4);
      if (step == N_STEPS - 1) {
        CHECK(sikv_attend_dense(cache, layer, N_SEQS, IDS, q, dense, NULL));
        record(REC_DENSE, dense, N_SEQS * row_q * 4);
      }
      free(k);
      free(v);
      free(q);
    }
  }
  for (i = 0; i < N_SEQS; i++) {
    uint32_t len = 0;
    CHECK(sikv_seq_len(cache, IDS[i], N_LAYERS - 1, &len));
    EXPECT(len == PROMPT[i] + N_STEPS);
  }
  /* The selection the sparse path makes at the last layer. */
  {
    size_t rows = (size_t)N_SEQS * HKV;
    int32_t *indices = (int32_t *)malloc(rows * cfg.budget_max * sizeof(int32_t));
    int32_t *counts = (int32_t *)malloc(rows * sizeof(int32_t));
    float *q = gen(N_SEQS * row_q);
    CHECK(sikv_select(cache, N_LAYERS - 1, N_SEQS, IDS, q, indices, counts, NULL));
    record(REC_INPUT, q, N_SEQS * row_q * 4);
    record(REC_INDICES, indices, rows * cfg.budget_max * 4);
    record(REC_COUNTS, counts, rows * 4);
    free(indices);
    free(counts);
    free(q);
  }
  /* Fork: the fork attends exactly like its source; then it decodes on its own. */
  CHECK(sikv_seq_fork(cache, FORK_SRC, FORK_DST));
  for (layer = 0; layer < N_LAYERS; layer++) {
    uint32_t lens[2];
    int64_t pair[2];
    float *q = gen(row_q), *q2 = (float *)malloc(2 * row_q * sizeof(float));
    pair[0] = FORK_SRC;
    pair[1] = FORK_DST;
    CHECK(sikv_seq_len(cache, FORK_SRC, layer, &lens[0]));
    CHECK(sikv_seq_len(cache, FORK_DST, layer, &lens[1]));
    EXPECT(lens[0] == lens[1]);
    record(REC_SEQ_LEN, lens, sizeof lens);
    memcpy(q2, q, row_q * 4);
    memcpy(q2 + row_q, q, row_q * 4);
    CHECK(sikv_attend(cache, layer, 2, pair, q2, out, NULL));
    EXPECT(memcmp(out, out + row_q, row_q * 4) == 0);
    record(REC_INPUT, q2, 2 * row_q * 4);
    record(REC_ATTEND, out, 2 * row_q * 4);
    free(q);
    free(q2);
  }
  for (layer = 0; layer < N_LAYERS; layer++) {
    int64_t fork_id = FORK_DST;
    float *k = gen(row_kv), *v = gen(row_kv), *q;
    CHECK(sikv_append(cache, layer, 1, &fork_id, NULL, k, v, NULL));
    q = gen(row_q);
    CHECK(sikv_attend(cache, layer, 1, &fork_id, q, out, NULL));
    record(REC_INPUT, k, row_kv * 4);
    record(REC_INPUT, v, row_kv * 4);
    record(REC_INPUT, q, row_q * 4);
    record(REC_ATTEND, out, row_q * 4);
    free(k);
    free(v);
    free(q);
  }
  /* Remove one sequence; report the bookkeeping and the digest of the whole cache. */
  CHECK(sikv_seq_remove(cache, REMOVED));
  CHECK(sikv_cache_info(cache, &info));
  EXPECT(info.num_seqs == N_SEQS);
  {
    uint32_t fields[4];
    uint64_t bpt = (uint64_t)info.bytes_per_token;
    fields[0] = info.device;
    fields[1] = info.num_seqs;
    fields[2] = info.free_pages;
    fields[3] = info.num_pages;
    record(REC_INFO, fields, sizeof fields);
    record(REC_INFO, &bpt, sizeof bpt);
  }
  CHECK(sikv_cache_checksum(cache, &checksum));
  record(REC_CHECKSUM, &checksum, sizeof checksum);

  bad_input_checks(cache, &cfg);
  sikv_cache_destroy(cache);
  if (fclose(g_out) != 0) fail("fclose", __LINE__);
  free(out);
  free(dense);
  if (g_failures != 0) {
    fprintf(stderr, "abi_c99: %d check(s) failed\n", g_failures);
    return 1;
  }
  printf("abi_c99 ok: %s mode, seed 0x%llx, %d decode steps x %d layers x %d seqs, %u B/token/kv-head, checksum %016llx, library %s\n",
         full ? "full" : "sparse", (unsigned long long)seed, N_STEPS, N_LAYERS, N_SEQS, (unsigned)info.bytes_per_token,
         (unsigned long long)checksum, sikv_version());
  return 0;
}
