/* A C consumer of an installed libselfindexkv, built with
 *   cc consumer.c $(pkg-config --cflags --libs --static selfindexkv)
 * by tests/install.rs. It checks what an engine checks first: the version, the ABI, a cache
 * created on the CPU, one sequence, and the error path of the status codes. */
#include <selfindexkv.h>

#include <stdio.h>
#include <string.h>

static int fail(const char *what, enum SikvStatus st) {
    printf("FAIL %s: status %d (%s)\n", what, (int)st, sikv_last_error_message());
    return 1;
}

int main(void) {
    struct SikvConfig cfg;
    struct SikvCache *cache = NULL;
    struct SikvCacheInfo info;
    enum SikvStatus st;
    uint32_t len = 99;

    if (sikv_abi_version() != SIKV_ABI_VERSION) {
        printf("FAIL abi: library %u, header %u\n", (unsigned)sikv_abi_version(), (unsigned)SIKV_ABI_VERSION);
        return 1;
    }
    if ((st = sikv_config_init(&cfg, SIKV_PROFILE_2_1)) != SIKV_OK) return fail("sikv_config_init", st);
    cfg.device = SIKV_DEVICE_CPU;
    cfg.dtype = SIKV_DTYPE_F16;
    cfg.num_layers = 2;
    cfg.num_q_heads = 8;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 64;
    cfg.max_seqs = 2;
    cfg.max_seq_len = 256;
    cfg.max_batch = 2;
    if ((st = sikv_cache_create(&cfg, &cache)) != SIKV_OK) return fail("sikv_cache_create", st);
    if ((st = sikv_seq_add(cache, 7)) != SIKV_OK) return fail("sikv_seq_add", st);
    /* Adding the same id again is bad input: a status and a message, the cache unchanged. */
    st = sikv_seq_add(cache, 7);
    if (st == SIKV_OK || strlen(sikv_last_error_message()) == 0) return fail("duplicate sikv_seq_add", st);
    if ((st = sikv_seq_len(cache, 7, 1, &len)) != SIKV_OK) return fail("sikv_seq_len", st);
    if ((st = sikv_cache_info(cache, &info)) != SIKV_OK) return fail("sikv_cache_info", st);
    if (len != 0 || info.num_seqs != 1 || info.device != SIKV_DEVICE_CPU) {
        printf("FAIL state: seq_len %u, num_seqs %u, device %u\n", (unsigned)len, (unsigned)info.num_seqs,
               (unsigned)info.device);
        return 1;
    }
    sikv_cache_destroy(cache);
    printf("ok c pkg-config: %s, abi %u, cpu cache with 1 sequence, %u bytes/token\n", sikv_version(),
           (unsigned)sikv_abi_version(), (unsigned)info.bytes_per_token);
    return 0;
}
