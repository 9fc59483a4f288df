// LibraryMethod: libselfindexkv through its C ABI (managed cache, CPU backend, f32 activations).
// Compiled only when CMake gets -DSIKV_INCLUDE and -DSIKV_LIB (SIKV_EVAL_WITH_LIBRARY).
#include "methods.h"
#include "selfindexkv.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace sikv_eval {
namespace {

void check(SikvStatus st, const char * what) {
    if (st != SIKV_OK) {
        const char * msg = sikv_last_error_message();
        throw std::runtime_error(std::string(what) + " failed (status " + std::to_string((int) st) + "): " +
                                 (msg ? msg : ""));
    }
}

const char * profile_label(uint32_t profile) {
    switch (profile) {
        case SIKV_PROFILE_2_1: return "2+1";
        case SIKV_PROFILE_4_1: return "4+1";
        case SIKV_PROFILE_16_1: return "16+1";
        case SIKV_PROFILE_PARITY: return "parity";
    }
    return "?";
}

class LibraryMethod : public DecodeMethod {
public:
    explicit LibraryMethod(const LibraryParams & p) : p_(p) {}
    ~LibraryMethod() override { if (cache_) sikv_cache_destroy(cache_); }

    std::string name() const override { return p_.name; }
    std::string profile() const override {
        if (p_.key_bits || p_.value_bits)
            return "k" + std::to_string(p_.key_bits) + "v" + std::to_string(p_.value_bits);
        return profile_label(p_.profile);
    }

    void begin_sequence(const ModelShape & s) override {
        shape_ = s;
        if (!cache_) {
            SikvConfig c;
            check(sikv_config_init(&c, p_.profile), "sikv_config_init");
            c.device = SIKV_DEVICE_CPU;
            c.dtype = SIKV_DTYPE_F32;
            c.num_layers = (uint32_t) s.n_layer;
            c.num_q_heads = (uint32_t) s.n_q_heads;
            c.num_kv_heads = (uint32_t) s.n_kv_heads;
            c.head_dim = (uint32_t) s.head_dim;
            c.page_size = (uint32_t) p_.page_size;
            c.num_pages = 0;
            c.max_seqs = 1;
            c.max_batch = 1;
            c.max_seq_len = (uint32_t) (p_.prompt_len + p_.decode_len + 8);
            c.max_append_tokens = (uint32_t) p_.prompt_len;
            c.softmax_scale = s.scale;
            c.dense_crossover = 0;  // this method is the sparse path, at every context length
            if (p_.profile != SIKV_PROFILE_PARITY) {
                c.n_sink = (uint32_t) p_.n_sink;
                c.n_heavy = (uint32_t) p_.n_heavy;
                c.n_window = (uint32_t) p_.n_window;
                // k = min(n, clamp(ceil(ratio * n), 1, max)) for n candidates: k follows the ratio
                if (p_.fixed_k > 0) {
                    // k = min(n, clamp(ceil(ratio * n), k, k)) = min(n, k): a fixed token budget
                    c.budget_ratio = std::min(1.0f, (float) p_.fixed_k / (float) p_.prompt_len);
                    c.budget_min = (uint32_t) p_.fixed_k;
                    c.budget_max = (uint32_t) p_.fixed_k;
                } else {
                    c.budget_ratio = (float) p_.budget_ratio;
                    c.budget_min = 1;
                    c.budget_max = (uint32_t) std::ceil(p_.budget_ratio * p_.prompt_len) + 16;
                }
                if (p_.rerank_factor >= 0) c.rerank_factor = (uint32_t) p_.rerank_factor;
                c.selector = p_.selector;
                if (p_.centre >= 0) c.centre = (uint32_t) p_.centre;
                if (p_.key_bits) c.key_bits = (uint32_t) p_.key_bits;
                if (p_.value_bits) c.value_bits = (uint32_t) p_.value_bits;
            }
            if (p_.rows_mean) c.flags |= SIKV_FLAG_ROWS_MEAN_QUERY;
            cfg_ = c;
            check(sikv_cache_create(&c, &cache_), "sikv_cache_create");
        } else {
            check(sikv_seq_remove(cache_, 0), "sikv_seq_remove");
        }
        check(sikv_seq_add(cache_, 0), "sikv_seq_add");
        exact_k_.assign(s.n_layer, {});
        steps_ = 0;
        st_ = {};
    }

    void calibrate(int layer, const float * k, const float * v, int n, const float * q_tail, int nq) override {
        check(sikv_calibrate(cache_, (uint32_t) layer, 0, (uint32_t) n, k, v, (uint32_t) nq, q_tail, nullptr),
              "sikv_calibrate");
        const size_t row = (size_t) shape_.n_kv_heads * shape_.head_dim;
        exact_k_[layer].assign(k, k + (size_t) n * row);
    }

    void append(int layer, const float * k, const float * v) override {
        const int64_t seq = 0;
        check(sikv_append(cache_, (uint32_t) layer, 1, &seq, nullptr, k, v, nullptr), "sikv_append");
        const size_t row = (size_t) shape_.n_kv_heads * shape_.head_dim;
        exact_k_[layer].insert(exact_k_[layer].end(), k, k + row);
    }

    void attend(int layer, const float * q, float * out) override {
        const int64_t seq = 0;
        if (p_.oracle) {
            attend_oracle(layer, q, out);
        } else {
            check(sikv_attend(cache_, (uint32_t) layer, 1, &seq, q, out, nullptr), "sikv_attend");
        }
        if (!p_.oracle && p_.recall_every > 0 && steps_ % p_.recall_every == 0) {
            std::vector<float> rec(shape_.n_kv_heads);
            check(sikv_selection_recall(cache_, (uint32_t) layer, 0, q, exact_k_[layer].data(), rec.data()),
                  "sikv_selection_recall");
            for (float r : rec) st_.add_recall(layer, r);
            // attended tokens: the dense set (sinks + heavy + window) plus the selection
            std::vector<int32_t> idx((size_t) shape_.n_kv_heads * cfg_.budget_max);
            std::vector<int32_t> cnt(shape_.n_kv_heads);
            check(sikv_select(cache_, (uint32_t) layer, 1, &seq, q, idx.data(), cnt.data(), nullptr), "sikv_select");
            const int len = (int) (exact_k_[layer].size() / ((size_t) shape_.n_kv_heads * shape_.head_dim));
            const int dense = std::min(len, (int) (cfg_.n_sink + cfg_.n_heavy + cfg_.n_window));
            for (int32_t c : cnt) { st_.attended_sum += dense + c; st_.attended_count += 1; }
        }
        if (layer == shape_.n_layer - 1) steps_ += 1;
    }

    void append_block(int layer, const float * k, const float * v, int n) override {
        if (n == 1) return append(layer, k, v);
        const int64_t seq = 0;
        const uint32_t count = (uint32_t) n;
        check(sikv_append(cache_, (uint32_t) layer, 1, &seq, &count, k, v, nullptr), "sikv_append");
        const size_t row = (size_t) shape_.n_kv_heads * shape_.head_dim;
        exact_k_[layer].insert(exact_k_[layer].end(), k, k + (size_t) n * row);
    }

    // One sikv_attend_rows call for the block's n rows (causal by the library's bound), selecting per
    // row or once from the rows' mean query (rows_mean). No recall statistics here: the library's recall
    // call scores one query against the whole cache, which would include the block's later tokens.
    void attend_block(int layer, const float * q, float * out, int n) override {
        if (n == 1) return attend(layer, q, out);
        if (p_.oracle) throw std::runtime_error(p_.name + ": decode blocks are not supported for the oracle variant");
        const int64_t seq = 0;
        const uint32_t rows = (uint32_t) n;
        check(sikv_attend_rows(cache_, (uint32_t) layer, 1, &seq, &rows, q, out, nullptr), "sikv_attend_rows");
        if (layer == shape_.n_layer - 1) steps_ += n;
    }

    SelectionStats stats() const override { return st_; }

private:
    // The exact top-k by q̄·k (group-mean query, ties to the smaller position) among the library's
    // candidates (everything outside sinks and window; this variant keeps no heavy tokens), attended
    // with the cache's stored bits: the quantisation loss without any selection loss.
    void attend_oracle(int layer, const float * q, float * out) {
        const int d = shape_.head_dim, hkv = shape_.n_kv_heads;
        const size_t row = (size_t) hkv * d;
        const int len = (int) (exact_k_[layer].size() / row);
        const int lo = std::min((int) cfg_.n_sink, len);
        const int hi = std::max(lo, len - (int) cfg_.n_window);
        const int kmax = (int) cfg_.budget_max;
        const int k = std::min(kmax, hi - lo);
        idx_.assign((size_t) hkv * kmax, -1);
        cnt_.assign(hkv, k);
        qbar_.resize(d);
        for (int h = 0; h < hkv; ++h) {
            group_mean_query(shape_, h, q, qbar_.data());
            top_.clear();
            exact_topk(shape_, h, exact_k_[layer].data(), qbar_.data(), lo, hi, k, score_, order_, top_);
            std::sort(top_.begin(), top_.end());
            std::copy(top_.begin(), top_.end(), idx_.begin() + (size_t) h * kmax);
            st_.attended_sum += std::min(len, (int) (cfg_.n_sink + cfg_.n_window)) + k;
            st_.attended_count += 1;
        }
        const int64_t seq = 0;
        check(sikv_attend_selected(cache_, (uint32_t) layer, 1, &seq, q, idx_.data(), cnt_.data(), out, nullptr),
              "sikv_attend_selected");
    }

    std::vector<float> qbar_, score_;
    std::vector<int32_t> order_, top_, idx_, cnt_;

    LibraryParams p_;
    ModelShape shape_;
    SikvConfig cfg_{};
    SikvCache * cache_ = nullptr;
    std::vector<std::vector<float>> exact_k_;  // per layer [len][n_kv][d]
    int steps_ = 0;
    SelectionStats st_;
};

}  // namespace

std::unique_ptr<DecodeMethod> make_library(const LibraryParams & p) { return std::make_unique<LibraryMethod>(p); }

}  // namespace sikv_eval
