// fp32 baselines for the decode-attention interface in methods.h.
#include "methods.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace sikv_eval {

void attend_rows(const ModelShape & s, int g, const float * q, const float * k, const float * v,
                 const int32_t * idx, int n_idx, float * out) {
    const int d = s.head_dim;
    const int row = s.n_kv_heads * d;
    std::vector<float> logit(n_idx);
    std::vector<double> acc(d);
    for (int h = g * s.group(); h < (g + 1) * s.group(); ++h) {
        const float * qh = q + (size_t) h * d;
        float mx = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < n_idx; ++j) {
            const float * kt = k + (size_t) idx[j] * row + (size_t) g * d;
            float dot = 0.0f;
            for (int c = 0; c < d; ++c) dot += qh[c] * kt[c];
            logit[j] = dot * s.scale;
            mx = std::max(mx, logit[j]);
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        double sum = 0.0;
        for (int j = 0; j < n_idx; ++j) {
            const double w = std::exp((double) logit[j] - (double) mx);
            sum += w;
            const float * vt = v + (size_t) idx[j] * row + (size_t) g * d;
            for (int c = 0; c < d; ++c) acc[c] += w * vt[c];
        }
        float * oh = out + (size_t) h * d;
        for (int c = 0; c < d; ++c) oh[c] = n_idx > 0 ? (float) (acc[c] / sum) : 0.0f;
    }
}

void group_mean_query(const ModelShape & s, int g, const float * q, float * qbar) {
    const int d = s.head_dim;
    std::fill(qbar, qbar + d, 0.0f);
    for (int h = g * s.group(); h < (g + 1) * s.group(); ++h)
        for (int c = 0; c < d; ++c) qbar[c] += q[(size_t) h * d + c];
    for (int c = 0; c < d; ++c) qbar[c] /= (float) s.group();
}

void exact_topk(const ModelShape & s, int g, const float * keys, const float * qbar, int lo, int hi, int k,
                std::vector<float> & score, std::vector<int32_t> & order, std::vector<int32_t> & out) {
    const int d = s.head_dim;
    score.resize(hi - lo);
    order.resize(hi - lo);
    for (int t = lo; t < hi; ++t) {
        const float * kt = keys + ((size_t) t * s.n_kv_heads + g) * d;
        float dot = 0.0f;
        for (int c = 0; c < d; ++c) dot += qbar[c] * kt[c];
        score[t - lo] = dot;
        order[t - lo] = t;
    }
    k = std::min(k, hi - lo);
    auto better = [&](int32_t a, int32_t b) {
        const float sa = score[a - lo], sb = score[b - lo];
        return sa > sb || (sa == sb && a < b);
    };
    std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
    out.insert(out.end(), order.begin(), order.begin() + k);
}

namespace {

// Shared machinery: an fp32 copy of every layer's keys and values, the dense set (sinks + recent window),
// a pluggable selection among the remaining candidates, and fp32 attention over the union.
class Baseline : public DecodeMethod {
public:
    explicit Baseline(const BaselineParams & p) : p_(p) {}

    void begin_sequence(const ModelShape & shape) override {
        s_ = shape;
        K_.assign(s_.n_layer, {});
        V_.assign(s_.n_layer, {});
        n_.assign(s_.n_layer, 0);
        st_ = {};
        on_begin();
    }

    void calibrate(int layer, const float * k, const float * v, int n, const float *, int) override {
        const size_t row = (size_t) s_.n_kv_heads * s_.head_dim;
        K_[layer].assign(k, k + (size_t) n * row);
        V_[layer].assign(v, v + (size_t) n * row);
        n_[layer] = n;
        for (int t = 0; t < n; ++t) on_row(layer, t);
    }

    void append(int layer, const float * k, const float * v) override {
        const size_t row = (size_t) s_.n_kv_heads * s_.head_dim;
        K_[layer].insert(K_[layer].end(), k, k + row);
        V_[layer].insert(V_[layer].end(), v, v + row);
        on_row(layer, n_[layer]++);
    }

    void append_block(int layer, const float * k, const float * v, int n) override {
        const size_t row = (size_t) s_.n_kv_heads * s_.head_dim;
        for (int r = 0; r < n; ++r) append(layer, k + r * row, v + r * row);
    }

    // Row r attends as the one-token decode at its position would: the context is cut to the first
    // len - n + r + 1 tokens for its attend, so the block's later tokens stay invisible (causal).
    void attend_block(int layer, const float * q, float * out, int n) override {
        const size_t row = (size_t) s_.n_q_heads * s_.head_dim;
        const int len = n_[layer];
        for (int r = 0; r < n; ++r) {
            n_[layer] = len - n + r + 1;
            attend(layer, q + r * row, out + r * row);
        }
        n_[layer] = len;
    }

    void attend(int layer, const float * q, float * out) override {
        const int n = n_[layer];
        const int d = s_.head_dim;
        const int sinks = std::min(p_.n_sink, n);
        const int win = window();
        const int lo = sinks;                            // candidates: [lo, hi)
        const int hi = win >= n ? lo : std::max(lo, n - win);
        qbar_.resize(d);
        for (int g = 0; g < s_.n_kv_heads; ++g) {
            group_mean_query(s_, g, q, qbar_.data());

            sel_.clear();
            if (hi > lo && p_.budget > 0) select(layer, g, qbar_.data(), lo, hi, sel_);
            if (p_.recall && !sel_.empty()) record_recall(layer, g, lo, hi);

            idx_.clear();
            for (int t = 0; t < sinks; ++t) idx_.push_back(t);
            idx_.insert(idx_.end(), sel_.begin(), sel_.end());
            for (int t = hi; t < n; ++t) idx_.push_back(t);
            attend_rows(s_, g, q, K_[layer].data(), V_[layer].data(), idx_.data(), (int) idx_.size(), out);
            st_.attended_sum += (double) idx_.size();
            st_.attended_count += 1;
        }
    }

    SelectionStats stats() const override { return st_; }

protected:
    // Tokens always attended at the end of the context (the candidates stop before them).
    virtual int window() const { return p_.n_window; }
    // Picks candidate rows in [lo, hi) for KV head g; appends them to sel.
    virtual void select(int layer, int g, const float * qbar, int lo, int hi, std::vector<int32_t> & sel) = 0;
    virtual void on_begin() {}
    virtual void on_row(int, int) {}

    const float * key(int layer, int t, int g) const {
        return K_[layer].data() + ((size_t) t * s_.n_kv_heads + g) * s_.head_dim;
    }

    // Exact top-k rows of [lo, hi) by q̄·k, ties to the smaller position.
    void exact_topk(int layer, int g, const float * qbar, int lo, int hi, int k, std::vector<int32_t> & out) {
        sikv_eval::exact_topk(s_, g, K_[layer].data(), qbar, lo, hi, k, score_, order_, out);
    }

    ModelShape s_;
    BaselineParams p_;
    std::vector<std::vector<float>> K_, V_;
    std::vector<int> n_;

private:
    void record_recall(int layer, int g, int lo, int hi) {
        truth_.clear();
        exact_topk(layer, g, qbar_.data(), lo, hi, (int) sel_.size(), truth_);
        mark_.assign(hi - lo, 0);
        for (int32_t t : truth_) mark_[t - lo] = 1;
        int hit = 0;
        for (int32_t t : sel_) hit += mark_[t - lo];
        st_.add_recall(layer, (double) hit / (double) truth_.size());
    }

    SelectionStats st_;
    std::vector<float> qbar_, score_;
    std::vector<int32_t> idx_, sel_, order_, truth_;
    std::vector<char> mark_;
};

class Dense final : public Baseline {
public:
    explicit Dense(bool writes) : Baseline(no_selection()), writes_(writes) {}
    std::string name() const override { return writes_ ? "dense" : "llama"; }
    bool writes_output() const override { return writes_; }

protected:
    int window() const override { return std::numeric_limits<int>::max(); }
    void select(int, int, const float *, int, int, std::vector<int32_t> &) override {}

private:
    static BaselineParams no_selection() {
        BaselineParams p;
        p.n_sink = 0;
        p.budget = 0;
        p.recall = false;
        return p;
    }
    bool writes_;
};

class OracleTopK final : public Baseline {
public:
    using Baseline::Baseline;
    std::string name() const override { return "oracle_topk"; }

protected:
    void select(int layer, int g, const float * qbar, int lo, int hi, std::vector<int32_t> & sel) override {
        exact_topk(layer, g, qbar, lo, hi, p_.budget, sel);
    }
};

class Quest final : public Baseline {
public:
    using Baseline::Baseline;
    std::string name() const override { return "quest"; }

protected:
    void on_begin() override {
        mn_.assign(s_.n_layer, {});
        mx_.assign(s_.n_layer, {});
    }

    void on_row(int layer, int t) override {
        const int d = s_.head_dim, H = s_.n_kv_heads, P = p_.page_size;
        const size_t page = (size_t) t / P;
        const size_t need = (page + 1) * H * d;
        if (mn_[layer].size() < need) {
            mn_[layer].resize(need, std::numeric_limits<float>::infinity());
            mx_[layer].resize(need, -std::numeric_limits<float>::infinity());
        }
        for (int g = 0; g < H; ++g) {
            const float * kt = key(layer, t, g);
            float * mn = mn_[layer].data() + (page * H + g) * d;
            float * mx = mx_[layer].data() + (page * H + g) * d;
            for (int c = 0; c < d; ++c) {
                mn[c] = std::min(mn[c], kt[c]);
                mx[c] = std::max(mx[c], kt[c]);
            }
        }
    }

    void select(int layer, int g, const float * qbar, int lo, int hi, std::vector<int32_t> & sel) override {
        const int d = s_.head_dim, H = s_.n_kv_heads, P = p_.page_size;
        const int p0 = lo / P, p1 = (hi - 1) / P + 1;  // pages overlapping the candidates
        bound_.resize(p1 - p0);
        pages_.resize(p1 - p0);
        for (int p = p0; p < p1; ++p) {
            const float * mn = mn_[layer].data() + ((size_t) p * H + g) * d;
            const float * mx = mx_[layer].data() + ((size_t) p * H + g) * d;
            float ub = 0.0f;
            for (int c = 0; c < d; ++c) ub += std::max(qbar[c] * mn[c], qbar[c] * mx[c]);
            bound_[p - p0] = ub;
            pages_[p - p0] = p;
        }
        const int n_pages = std::min((int) pages_.size(), std::max(1, p_.budget / P));
        auto better = [&](int a, int b) {
            const float ba = bound_[a - p0], bb = bound_[b - p0];
            return ba > bb || (ba == bb && a < b);
        };
        std::partial_sort(pages_.begin(), pages_.begin() + n_pages, pages_.end(), better);
        for (int i = 0; i < n_pages; ++i) {
            const int p = pages_[i];
            for (int t = std::max(lo, p * P); t < std::min(hi, (p + 1) * P); ++t) sel.push_back(t);
        }
    }

private:
    std::vector<std::vector<float>> mn_, mx_;  // per layer: [page][kv head][head_dim]
    std::vector<float> bound_;
    std::vector<int> pages_;
};

class SinkWindow final : public Baseline {
public:
    using Baseline::Baseline;
    std::string name() const override { return "sink_window"; }

protected:
    int window() const override { return p_.n_window + p_.budget; }
    void select(int, int, const float *, int, int, std::vector<int32_t> &) override {}
};

}  // namespace

std::unique_ptr<DecodeMethod> make_dense() { return std::make_unique<Dense>(true); }
std::unique_ptr<DecodeMethod> make_observer() { return std::make_unique<Dense>(false); }
std::unique_ptr<DecodeMethod> make_oracle_topk(const BaselineParams & p) { return std::make_unique<OracleTopK>(p); }
std::unique_ptr<DecodeMethod> make_quest(const BaselineParams & p) { return std::make_unique<Quest>(p); }
std::unique_ptr<DecodeMethod> make_sink_window(const BaselineParams & p) { return std::make_unique<SinkWindow>(p); }

}  // namespace sikv_eval
