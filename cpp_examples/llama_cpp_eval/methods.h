// Decode-attention methods for the real-model quality evaluation.
//
// A method replaces the attention of one decode token, layer by layer. Its calls have the shape of the
// library's managed-cache C API, so that plugging the library in is a thin adapter:
//
//   begin_sequence(shape)                     new sequence; drops any previous state
//   calibrate(layer, k, v, n, q_tail, nq)     end of prefill: the prompt's post-RoPE keys and values
//                                             k, v: [n][n_kv_heads][head_dim], q_tail: [nq][n_q_heads][head_dim]
//   append(layer, k, v)                       one decode token: k, v: [1][n_kv_heads][head_dim]
//   attend(layer, q, out)                     q: [n_q_heads][head_dim] (post-RoPE) -> out: [n_q_heads][head_dim]
//   append_block(layer, k, v, n)              a decode block of n new tokens (--decode-block): [n][n_kv_heads][head_dim]
//   attend_block(layer, q, out, n)            q, out: [n][n_q_heads][head_dim]; row r stands at position len - n + r
//                                             and attends causally (up to its own position)
//
// All arrays are f32, row-major, tokens outermost. append() for a layer always precedes attend() for the same
// layer and token, and the token being decoded is part of the context it attends to; append_block() of a block
// precedes its attend_block().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sikv_eval {

struct ModelShape {
    int n_layer = 0;
    int n_q_heads = 0;
    int n_kv_heads = 0;
    int head_dim = 0;
    float scale = 0.0f;  // softmax scale applied to q.k (1/sqrt(head_dim) for Llama)

    int group() const { return n_q_heads / n_kv_heads; }
};

// Running statistics a method may report about its selections.
struct SelectionStats {
    double recall_sum = 0.0;   // sum over (step, layer, KV head) of |selected ∩ exact top-|selected|| / |selected|
    int64_t recall_count = 0;  // number of terms in recall_sum
    double attended_sum = 0.0; // sum over (step, layer, KV head) of the number of attended tokens
    int64_t attended_count = 0;
    std::vector<double> layer_recall_sum;  // recall_sum split by layer
    std::vector<int64_t> layer_recall_count;

    void add_recall(int layer, double r) {
        recall_sum += r;
        recall_count += 1;
        if (layer >= (int) layer_recall_sum.size()) {
            layer_recall_sum.resize(layer + 1, 0.0);
            layer_recall_count.resize(layer + 1, 0);
        }
        layer_recall_sum[layer] += r;
        layer_recall_count[layer] += 1;
    }

    void merge(const SelectionStats & o) {
        recall_sum += o.recall_sum;
        recall_count += o.recall_count;
        attended_sum += o.attended_sum;
        attended_count += o.attended_count;
        if (o.layer_recall_sum.size() > layer_recall_sum.size()) {
            layer_recall_sum.resize(o.layer_recall_sum.size(), 0.0);
            layer_recall_count.resize(o.layer_recall_sum.size(), 0);
        }
        for (size_t l = 0; l < o.layer_recall_sum.size(); ++l) {
            layer_recall_sum[l] += o.layer_recall_sum[l];
            layer_recall_count[l] += o.layer_recall_count[l];
        }
    }
};

class DecodeMethod {
public:
    virtual ~DecodeMethod() = default;

    // Short name for reports ("dense", "oracle", "quest", ...).
    virtual std::string name() const = 0;
    // Storage/profile label for reports ("fp32", "2+1", "16+1", ...).
    virtual std::string profile() const { return "fp32"; }
    // false: the method only observes (its output is compared, never written back into the model).
    virtual bool writes_output() const { return true; }

    virtual void begin_sequence(const ModelShape & shape) = 0;
    virtual void calibrate(int layer, const float * k, const float * v, int n, const float * q_tail, int nq) = 0;
    virtual void append(int layer, const float * k, const float * v) = 0;
    virtual void attend(int layer, const float * q, float * out) = 0;

    // A decode block of n tokens. n = 1 must take the one-token path above (so block 1 is the one-by-one
    // decode, bit for bit); for n > 1 each method says how its rows attend causally.
    virtual void append_block(int layer, const float * k, const float * v, int n) = 0;
    virtual void attend_block(int layer, const float * q, float * out, int n) = 0;

    // Selection statistics since begin_sequence(); methods that cannot report leave them empty.
    virtual SelectionStats stats() const { return {}; }
    // A line about the run for the log (e.g. how many tokens a storage variant kept apart); empty: none.
    virtual std::string note() const { return ""; }
};

// Parameters shared by the fp32 baselines.
struct BaselineParams {
    int n_sink = 4;        // first tokens always attended
    int n_window = 64;     // most recent tokens always attended (includes the token being decoded)
    int budget = 0;        // tokens selected from the candidates (everything outside sinks and window)
    int page_size = 16;    // Quest-style page bounds
    bool recall = true;    // compute recall@|selected| of the exact top-k among the candidates
};

// Exact dense attention over every token (fp32 keys and values, fp64 softmax sums).
std::unique_ptr<DecodeMethod> make_dense();
// Dense attention that only observes: the engine's own output stays in place (the llama.cpp reference run).
std::unique_ptr<DecodeMethod> make_observer();
// Sinks + window + exact top-k by the group-mean query q̄·k per KV head.
std::unique_ptr<DecodeMethod> make_oracle_topk(const BaselineParams & p);
// Sinks + window + whole pages ranked by the Quest upper bound sum_c max(q̄_c min_c, q̄_c max_c) per KV head.
std::unique_ptr<DecodeMethod> make_quest(const BaselineParams & p);
// Sinks + a window of n_window + budget tokens (the budget is spent on the window).
std::unique_ptr<DecodeMethod> make_sink_window(const BaselineParams & p);

// Emulation of the library's 2+1 storage with the exact selection (`emul2_*`; the harness's counterpart of
// sikv_oracle_2+1, so that storage variants can be measured without changing the library). Sinks and window are
// attended from fp16 k' = k - m and fp16 v (the library's dense set); the exact top-`budget` of the other tokens by
// q̄·k over the exact keys is attended from keys and values quantised as method.md §10.3-10.4 and the library's
// CPU encode specify: centre m = per-channel lower median of the prompt's keys, scale a = per-channel max |k'| over
// the prompt minus sinks, x = k' / a stored as sign + 2-bit magnitude per 32-channel group of one token (fp16
// delta = (max - min) / 3 and zero = min of |x|), values 2-bit per 32-channel group of one token.
// One change at a time against that (`uniform`):
//   lloyd     the 4 levels of each group, in units of its [min, max] range, fitted per layer and KV head (keys'
//             magnitudes and values separately) by weighted 1-D k-means over the prompt at calibration, instead
//             of 0, 1/3, 2/3, 1; never refitted. Same bytes per token (a 4-level table per head). lloydk /
//             lloydv: the keys' or the values' levels only.
//   vchan     values quantised per channel in groups of `vgroup` consecutive tokens (aligned at position 0;
//             a group is quantised once complete, which it always is before its tokens leave the window)
//             instead of per token in groups of 32 channels. Same bits and the same metadata per value.
//   outlier   the `outlier_frac` share of prompt tokens (outside the sinks) with the largest norm ||k - m||
//             (`outlier_by_value`: ||v||) per layer and KV head kept in fp16; a decode token whose norm
//             reaches the smallest norm of that set is kept too.
struct EmulParams {
    BaselineParams base;
    bool lloyd_keys = false;
    bool lloyd_values = false;
    bool vchan = false;
    int vgroup = 32;
    double outlier_frac = 0.0;
    bool outlier_by_value = false;
};
// `name` is the method name: emul2_ followed by `uniform` or by one or more of lloyd, lloydk, lloydv, vchan, outlierN (N % of the
// tokens by key norm), voutlierN (by value norm), joined by '_' (e.g. emul2_lloyd_vchan). Throws on anything else.
EmulParams parse_emul2(const std::string & name, const BaselineParams & base);
std::unique_ptr<DecodeMethod> make_emul2(const std::string & name, const BaselineParams & base);

// The pieces of the emulation, for the unit test.
// x rounded to the nearest fp16 value (ties to even; finite inputs below the fp16 maximum).
float round_f16(float x);
// One quantisation group of n values y[i * stride] (the library's: zero = fp16(min), delta = fp16((max - min) / 3),
// code = clamp(floor((y - zero) / delta + 0.5), 0, 3), decoded code * delta + zero), dequantised into
// out[i * stride]. levels (4 increasing, in units of the group's range 3 delta; nullptr: uniform): the code is the
// nearest level (ties to the lower) and the value zero + level * 3 delta.
void quant_group(const float * y, int n, int stride, const float * levels, float * out);
// The group's samples for fitting levels: u = (y - zero) / (3 delta) with weight (3 delta)^2 (so the fit minimises
// the squared error in y's units), appended to uw; groups with delta = 0 give none.
void group_samples(const float * y, int n, int stride, std::vector<std::pair<float, float>> & uw);
// 4 levels by weighted 1-D k-means (Lloyd-Max on the samples) from the uniform 0, 1/3, 2/3, 1; sorts uw.
void fit_levels(std::vector<std::pair<float, float>> & uw, float * levels);
// The stored (dequantised) centred key k^' and value of token t, KV head g of an emul2_* method into k, v
// (head_dim each); false for any other method or a value not yet quantised (vchan).
bool emul2_stored(const DecodeMethod & m, int layer, int t, int g, float * k, float * v);
// Indices of the exact top ceil(frac * n) of norms[0..n) (ties to the smaller index), ascending.
std::vector<int32_t> top_fraction(const float * norms, int n, double frac);

// libselfindexkv through its C ABI (managed cache, CPU, f32); built with -DSIKV_INCLUDE/-DSIKV_LIB only
// (sikv_method.cpp, SIKV_EVAL_WITH_LIBRARY).
struct LibraryParams {
    std::string name = "sikv";
    uint32_t profile = 0;      // SIKV_PROFILE_*
    int page_size = 16;
    int prompt_len = 0;        // P
    int decode_len = 0;        // D
    int n_sink = 4;            // dense set (ignored by the parity profile, which keeps its own)
    int n_heavy = 64;
    int n_window = 64;
    double budget_ratio = 0.0; // k = min(n, clamp(ceil(ratio * n), 1, ceil(ratio * P) + 16)) for n candidates
    int fixed_k = 0;           // > 0: k = min(n, fixed_k) (budget_min = budget_max = fixed_k) instead of the ratio
    int rerank_factor = -1;    // -1: the profile's default; 0: one-stage
    uint32_t selector = 0;     // SIKV_SELECTOR_*
    int centre = -1;           // SIKV_CENTRE_*; -1: the profile's default
    int key_bits = 0;          // 2, 4 or 16 key-magnitude bits; 0: the profile's
    int value_bits = 0;        // 2, 4 or 16 value bits; 0: the profile's
    bool oracle = false;       // exact top-fixed_k by q̄·k over the candidates, attended through sikv_attend_selected
    bool rows_mean = false;    // decode blocks: select once per block from the rows' mean query
                               // (SIKV_FLAG_ROWS_MEAN_QUERY) instead of per row
    int recall_every = 4;      // sikv_selection_recall every this many decode steps (0: never)
};
std::unique_ptr<DecodeMethod> make_library(const LibraryParams & p);

// q̄ of KV group g: the mean of its query heads. q [n_q_heads][head_dim] -> qbar [head_dim].
void group_mean_query(const ModelShape & s, int g, const float * q, float * qbar);

// The exact top-k rows of [lo, hi) by q̄·k for KV group g, ties to the smaller row, appended to `out` in rank
// order. keys: [rows][n_kv_heads][head_dim]; score and order are scratch.
void exact_topk(const ModelShape & s, int g, const float * keys, const float * qbar, int lo, int hi, int k,
                std::vector<float> & score, std::vector<int32_t> & order, std::vector<int32_t> & out);

// Attention of the q heads of KV group g over a set of token rows: out_h = softmax(scale q_h.k_t) v_t.
// k, v: [n_tokens][n_kv_heads][head_dim]; idx: token rows to attend (any order); q, out: [n_q_heads][head_dim].
void attend_rows(const ModelShape & s, int g, const float * q, const float * k, const float * v,
                 const int32_t * idx, int n_idx, float * out);

}  // namespace sikv_eval
