// fp32 baselines for the decode-attention interface in methods.h.
#include "methods.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>

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


float round_f16(float x) {
    if (!std::isfinite(x) || x == 0.0f) return x;
    const float ax = std::fabs(x);
    int e = 0;
    std::frexp(ax, &e);                              // ax = f * 2^e, f in [0.5, 1)
    const float ulp = std::ldexp(1.0f, std::max(e - 11, -24));  // 11 significant bits; subnormal step 2^-24
    return std::copysign(std::nearbyint(ax / ulp) * ulp, x);    // ax / ulp is exact; nearbyint rounds to even
}

namespace {

constexpr float kF16Max = 65504.0f;
constexpr int kLevels = 3;  // highest 2-bit code

void group_params(const float * y, int n, int stride, float & delta, float & zero) {
    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
    for (int i = 0; i < n; ++i) {
        lo = std::min(lo, y[(size_t) i * stride]);
        hi = std::max(hi, y[(size_t) i * stride]);
    }
    delta = round_f16(std::min((hi - lo) / (float) kLevels, kF16Max));
    zero = round_f16(std::max(-kF16Max, std::min(lo, kF16Max)));
}

}  // namespace

void quant_group(const float * y, int n, int stride, const float * levels, float * out) {
    float delta = 0.0f, zero = 0.0f;
    group_params(y, n, stride, delta, zero);
    if (!levels) {
        for (int i = 0; i < n; ++i) {
            const float v = y[(size_t) i * stride];
            float code = 0.0f;
            if (delta > 0.0f) code = std::max(0.0f, std::min(std::floor((v - zero) / delta + 0.5f), (float) kLevels));
            out[(size_t) i * stride] = code * delta + zero;
        }
        return;
    }
    const float range = (float) kLevels * delta;
    float thr[kLevels];
    for (int j = 0; j < kLevels; ++j) thr[j] = 0.5f * (levels[j] + levels[j + 1]);
    for (int i = 0; i < n; ++i) {
        int code = 0;
        if (delta > 0.0f) {
            const float u = (y[(size_t) i * stride] - zero) / range;
            for (int j = 0; j < kLevels; ++j) code += u > thr[j];
        }
        out[(size_t) i * stride] = delta > 0.0f ? zero + levels[code] * range : zero;
    }
}

void group_samples(const float * y, int n, int stride, std::vector<std::pair<float, float>> & uw) {
    float delta = 0.0f, zero = 0.0f;
    group_params(y, n, stride, delta, zero);
    if (!(delta > 0.0f)) return;
    const float range = (float) kLevels * delta;
    for (int i = 0; i < n; ++i) uw.emplace_back((y[(size_t) i * stride] - zero) / range, range * range);
}

void fit_levels(std::vector<std::pair<float, float>> & uw, float * levels) {
    for (int j = 0; j <= kLevels; ++j) levels[j] = (float) j / (float) kLevels;
    if (uw.empty()) return;
    std::sort(uw.begin(), uw.end());
    const size_t N = uw.size();
    std::vector<double> W(N + 1, 0.0), WU(N + 1, 0.0);  // prefix sums of w and w * u
    for (size_t i = 0; i < N; ++i) {
        W[i + 1] = W[i] + uw[i].second;
        WU[i + 1] = WU[i] + (double) uw[i].second * uw[i].first;
    }
    for (int it = 0; it < 500; ++it) {
        // cell j holds the samples whose nearest level is j (ties to the lower): (thr[j-1], thr[j]]
        size_t b[kLevels + 2];
        b[0] = 0;
        b[kLevels + 1] = N;
        for (int j = 0; j < kLevels; ++j) {
            const float t = 0.5f * (levels[j] + levels[j + 1]);
            b[j + 1] = (size_t) (std::upper_bound(uw.begin(), uw.end(), std::make_pair(t, std::numeric_limits<float>::infinity())) - uw.begin());
        }
        float moved = 0.0f;
        for (int j = 0; j <= kLevels; ++j) {
            const double w = W[b[j + 1]] - W[b[j]];
            if (w <= 0.0) continue;
            const float l = (float) ((WU[b[j + 1]] - WU[b[j]]) / w);
            moved = std::max(moved, std::fabs(l - levels[j]));
            levels[j] = l;
        }
        if (moved < 1e-7f) break;
    }
}

std::vector<int32_t> top_fraction(const float * norms, int n, double frac) {
    const int k = std::min(n, (int) std::ceil(frac * n - 1e-9));
    std::vector<int32_t> order(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    if (k <= 0) return {};
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
        return norms[a] > norms[b] || (norms[a] == norms[b] && a < b);
    });
    order.resize(k);
    std::sort(order.begin(), order.end());
    return order;
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


class Emul2 final : public Baseline {
public:
    Emul2(const std::string & name, const EmulParams & e) : Baseline(e.base), name_(name), e_(e) { p_.recall = false; }
    std::string name() const override { return name_; }
    std::string profile() const override { return "2+1"; }

    void begin_sequence(const ModelShape & shape) override {
        Baseline::begin_sequence(shape);
        const int L = shape.n_layer, H = shape.n_kv_heads, d = shape.head_dim;
        centre_.assign(L, std::vector<float>((size_t) H * d, 0.0f));
        scale_.assign(L, std::vector<float>((size_t) H * d, 1.0f));
        inv_.assign(L, std::vector<float>((size_t) H * d, 1.0f));
        klev_.assign(L, std::vector<float>((size_t) H * 4, 0.0f));
        vlev_.assign(L, std::vector<float>((size_t) H * 4, 0.0f));
        thr_.assign(L, std::vector<float>(H, std::numeric_limits<float>::infinity()));
        Kq_.assign(L, {});
        Vq_.assign(L, {});
        vdone_.assign(L, 0);
        kept_.assign(L, {});
        kept_prompt_ = kept_decode_ = decode_rows_ = 0;
        st_ = {};
    }

    void calibrate(int layer, const float * k, const float * v, int n, const float * q_tail, int nq) override {
        Baseline::calibrate(layer, k, v, n, q_tail, nq);
        const int H = s_.n_kv_heads, d = s_.head_dim;
        const size_t row = (size_t) H * d;
        int lo = std::min(p_.n_sink, n);
        if (lo >= n) lo = 0;  // the fitting set: the prompt minus sinks (all of it when that is empty)
        std::vector<float> col(n);
        kept_[layer].assign((size_t) n * H, 0);
        for (int g = 0; g < H; ++g) {
            float * m = centre_[layer].data() + (size_t) g * d;
            float * a = scale_[layer].data() + (size_t) g * d;
            float * r = inv_[layer].data() + (size_t) g * d;
            for (int c = 0; c < d; ++c) {
                for (int t = 0; t < n; ++t) col[t] = k[t * row + (size_t) g * d + c];
                std::nth_element(col.begin(), col.begin() + (n - 1) / 2, col.end());
                m[c] = col[(n - 1) / 2];  // lower median
                float mx = 0.0f;
                for (int t = lo; t < n; ++t) mx = std::max(mx, std::fabs(k[t * row + (size_t) g * d + c] - m[c]));
                a[c] = std::max(mx, 1e-6f);
                r[c] = 1.0f / a[c];
            }
            float * kl = klev_[layer].data() + (size_t) g * 4;
            float * vl = vlev_[layer].data() + (size_t) g * 4;
            for (int j = 0; j < 4; ++j) kl[j] = vl[j] = (float) j / 3.0f;
            if (e_.lloyd_keys) {
                std::vector<std::pair<float, float>> uw;
                std::vector<float> ax(d);
                for (int t = lo; t < n; ++t) {
                    key_abs(layer, g, k + t * row + (size_t) g * d, ax.data(), nullptr);
                    for (int c0 = 0; c0 < d; c0 += 32) group_samples(ax.data() + c0, std::min(32, d - c0), 1, uw);
                }
                fit_levels(uw, kl);
            }
            if (e_.lloyd_values) {
                std::vector<std::pair<float, float>> uw;
                if (e_.vchan) {
                    const int G = e_.vgroup;
                    for (int t0 = (lo + G - 1) / G * G; t0 + G <= n; t0 += G)
                        for (int c = 0; c < d; ++c) group_samples(v + t0 * row + (size_t) g * d + c, G, (int) row, uw);
                } else {
                    for (int t = lo; t < n; ++t)
                        for (int c0 = 0; c0 < d; c0 += 32)
                            group_samples(v + t * row + (size_t) g * d + c0, std::min(32, d - c0), 1, uw);
                }
                fit_levels(uw, vl);
            }
            if (e_.outlier_frac > 0.0) {
                std::vector<float> norm(n - lo);
                for (int t = lo; t < n; ++t) norm[t - lo] = token_norm(layer, g, k + t * row, v + t * row);
                const std::vector<int32_t> top = top_fraction(norm.data(), n - lo, e_.outlier_frac);
                float thr = std::numeric_limits<float>::infinity();
                for (int32_t i : top) {
                    kept_[layer][(size_t) (i + lo) * H + g] = 1;
                    thr = std::min(thr, norm[i]);
                }
                thr_[layer][g] = thr;
                if (layer == 0) kept_prompt_ += (int64_t) top.size();
            }
        }
        Kq_[layer].assign((size_t) n * row, 0.0f);
        Vq_[layer].assign((size_t) n * row, 0.0f);
        for (int t = 0; t < n; ++t) encode(layer, t, kept_[layer].data() + (size_t) t * H);
        vdone_[layer] = 0;
        encode_value_groups(layer);
    }

    void append(int layer, const float * k, const float * v) override {
        Baseline::append(layer, k, v);
        const int H = s_.n_kv_heads, t = n_[layer] - 1;
        const size_t row = (size_t) H * s_.head_dim;
        Kq_[layer].resize((size_t) (t + 1) * row);
        Vq_[layer].resize((size_t) (t + 1) * row);
        kept_[layer].resize((size_t) (t + 1) * H, 0);
        char * keep = kept_[layer].data() + (size_t) t * H;
        for (int g = 0; g < H; ++g)
            if (e_.outlier_frac > 0.0 && token_norm(layer, g, k, v) >= thr_[layer][g]) {
                keep[g] = 1;
                if (layer == 0) ++kept_decode_;
            }
        if (layer == 0) decode_rows_ += H;
        encode(layer, t, keep);
        encode_value_groups(layer);
    }

    void attend(int layer, const float * q, float * out) override {
        const int n = n_[layer];
        const int d = s_.head_dim, H = s_.n_kv_heads, G = s_.group();
        const size_t row = (size_t) H * d;
        const int sinks = std::min(p_.n_sink, n);
        const int lo = sinks;
        const int hi = p_.n_window >= n ? lo : std::max(lo, n - p_.n_window);
        ModelShape one = s_;  // one KV head, its G query heads, gathered rows
        one.n_kv_heads = 1;
        one.n_q_heads = G;
        qbar_.resize(d);
        for (int g = 0; g < H; ++g) {
            group_mean_query(s_, g, q, qbar_.data());
            sel_.clear();
            if (hi > lo && p_.budget > 0) select(layer, g, qbar_.data(), lo, hi, sel_);
            std::sort(sel_.begin(), sel_.end());
            const int cnt = sinks + (n - hi) + (int) sel_.size();
            gk_.resize((size_t) cnt * d);
            gv_.resize((size_t) cnt * d);
            idx_.resize(cnt);
            int j = 0;
            const float * m = centre_[layer].data() + (size_t) g * d;
            auto dense = [&](int t) {  // the dense set: fp16 k' and v
                const float * kt = K_[layer].data() + t * row + (size_t) g * d;
                const float * vt = V_[layer].data() + t * row + (size_t) g * d;
                for (int c = 0; c < d; ++c) {
                    gk_[(size_t) j * d + c] = round_f16(kt[c] - m[c]);
                    gv_[(size_t) j * d + c] = round_f16(vt[c]);
                }
                idx_[j] = j;
                ++j;
            };
            for (int t = 0; t < sinks; ++t) dense(t);
            for (int t = hi; t < n; ++t) dense(t);
            for (int32_t t : sel_) {
                if (e_.vchan && t >= vdone_[layer])
                    throw std::runtime_error(name_ + ": a selected token's value group is not complete");
                std::copy_n(Kq_[layer].data() + t * row + (size_t) g * d, d, gk_.data() + (size_t) j * d);
                std::copy_n(Vq_[layer].data() + t * row + (size_t) g * d, d, gv_.data() + (size_t) j * d);
                idx_[j] = j;
                ++j;
            }
            attend_rows(one, 0, q + (size_t) g * G * d, gk_.data(), gv_.data(), idx_.data(), cnt,
                        out + (size_t) g * G * d);
            st_.attended_sum += cnt;
            st_.attended_count += 1;
        }
    }

    SelectionStats stats() const override { return st_; }

    std::string note() const override {
        std::string out;
        char buf[300];
        if (e_.outlier_frac > 0.0) {
            std::snprintf(buf, sizeof buf, "layer 0 kept in fp16: %lld prompt token-heads, %lld of %lld decode token-heads",
                          (long long) kept_prompt_, (long long) kept_decode_, (long long) decode_rows_);
            out += buf;
        }
        if (e_.lloyd_keys || e_.lloyd_values) {  // the fitted levels, mean over layers and KV heads
            double kl[4] = {0, 0, 0, 0}, vl[4] = {0, 0, 0, 0};
            int cnt = 0;
            for (size_t l = 0; l < klev_.size(); ++l)
                for (int g = 0; g < s_.n_kv_heads; ++g, ++cnt)
                    for (int j = 0; j < 4; ++j) {
                        kl[j] += klev_[l][(size_t) g * 4 + j];
                        vl[j] += vlev_[l][(size_t) g * 4 + j];
                    }
            cnt = std::max(cnt, 1);
            std::snprintf(buf, sizeof buf, "%smean levels: keys %.3f %.3f %.3f %.3f, values %.3f %.3f %.3f %.3f",
                          out.empty() ? "" : "; ", kl[0] / cnt, kl[1] / cnt, kl[2] / cnt, kl[3] / cnt, vl[0] / cnt,
                          vl[1] / cnt, vl[2] / cnt, vl[3] / cnt);
            out += buf;
        }
        return out;
    }

    bool stored(int layer, int t, int g, float * k, float * v) const {
        if (layer < 0 || layer >= s_.n_layer || t < 0 || t >= vdone_[layer] || g < 0 || g >= s_.n_kv_heads) return false;
        const size_t at = ((size_t) t * s_.n_kv_heads + g) * s_.head_dim;
        std::copy_n(Kq_[layer].data() + at, s_.head_dim, k);
        std::copy_n(Vq_[layer].data() + at, s_.head_dim, v);
        return true;
    }

protected:
    void select(int layer, int g, const float * qbar, int lo, int hi, std::vector<int32_t> & sel) override {
        exact_topk(layer, g, qbar, lo, hi, p_.budget, sel);
    }

private:
    // |x| = |(k - m) / a| of one token and KV head into ax; its signs (true: non-negative) into pos if given.
    void key_abs(int layer, int g, const float * kt, float * ax, char * pos) const {
        const int d = s_.head_dim;
        const float * m = centre_[layer].data() + (size_t) g * d;
        const float * r = inv_[layer].data() + (size_t) g * d;
        for (int c = 0; c < d; ++c) {
            const float x = (kt[c] - m[c]) * r[c];
            ax[c] = std::fabs(x);
            if (pos) pos[c] = !std::signbit(x);
        }
    }

    float token_norm(int layer, int g, const float * k, const float * v) const {
        const int d = s_.head_dim;
        const float * m = centre_[layer].data() + (size_t) g * d;
        double s = 0.0;
        for (int c = 0; c < d; ++c) {
            const double y = e_.outlier_by_value ? (double) v[(size_t) g * d + c] : (double) k[(size_t) g * d + c] - m[c];
            s += y * y;
        }
        return (float) std::sqrt(s);
    }

    // Token t's stored key (and value, unless values go by channel groups) for every KV head; keep[g]: fp16.
    void encode(int layer, int t, const char * keep) {
        const int H = s_.n_kv_heads, d = s_.head_dim;
        const size_t row = (size_t) H * d;
        std::vector<float> ax(d), mag(d);
        std::vector<char> pos(d);
        for (int g = 0; g < H; ++g) {
            const float * kt = K_[layer].data() + t * row + (size_t) g * d;
            const float * vt = V_[layer].data() + t * row + (size_t) g * d;
            float * kq = Kq_[layer].data() + t * row + (size_t) g * d;
            float * vq = Vq_[layer].data() + t * row + (size_t) g * d;
            const float * m = centre_[layer].data() + (size_t) g * d;
            if (keep[g]) {
                for (int c = 0; c < d; ++c) kq[c] = round_f16(kt[c] - m[c]);
                if (!e_.vchan)
                    for (int c = 0; c < d; ++c) vq[c] = round_f16(vt[c]);
                continue;
            }
            key_abs(layer, g, kt, ax.data(), pos.data());
            const float * kl = e_.lloyd_keys ? klev_[layer].data() + (size_t) g * 4 : nullptr;
            for (int c0 = 0; c0 < d; c0 += 32) quant_group(ax.data() + c0, std::min(32, d - c0), 1, kl, mag.data() + c0);
            const float * a = scale_[layer].data() + (size_t) g * d;
            for (int c = 0; c < d; ++c) kq[c] = (pos[c] ? mag[c] : -mag[c]) * a[c];
            if (!e_.vchan) {
                const float * vl = e_.lloyd_values ? vlev_[layer].data() + (size_t) g * 4 : nullptr;
                for (int c0 = 0; c0 < d; c0 += 32) quant_group(vt + c0, std::min(32, d - c0), 1, vl, vq + c0);
            }
        }
    }

    // Values by channel in groups of vgroup tokens: every group complete since the last call (vdone_: the first
    // token of the first group not yet quantised). Tokens kept apart (outliers) get their fp16 values.
    void encode_value_groups(int layer) {
        const int H = s_.n_kv_heads, d = s_.head_dim, G = e_.vgroup;
        const size_t row = (size_t) H * d;
        if (!e_.vchan) {
            vdone_[layer] = n_[layer];
            return;
        }
        while (vdone_[layer] + G <= n_[layer]) {
            const int t0 = vdone_[layer];
            for (int g = 0; g < H; ++g) {
                const float * vl = e_.lloyd_values ? vlev_[layer].data() + (size_t) g * 4 : nullptr;
                for (int c = 0; c < d; ++c)
                    quant_group(V_[layer].data() + t0 * row + (size_t) g * d + c, G, (int) row, vl,
                                Vq_[layer].data() + t0 * row + (size_t) g * d + c);
                for (int t = t0; t < t0 + G; ++t)
                    if (kept_[layer][(size_t) t * H + g])
                        for (int c = 0; c < d; ++c)
                            Vq_[layer][t * row + (size_t) g * d + c] = round_f16(V_[layer][t * row + (size_t) g * d + c]);
            }
            vdone_[layer] = t0 + G;
        }
    }

    std::string name_;
    EmulParams e_;
    std::vector<std::vector<float>> centre_, scale_, inv_, klev_, vlev_, thr_, Kq_, Vq_;
    std::vector<int> vdone_;
    std::vector<std::vector<char>> kept_;  // per layer [n][H]: the token is kept in fp16 (outlier)
    int64_t kept_prompt_ = 0, kept_decode_ = 0, decode_rows_ = 0;
    SelectionStats st_;
    std::vector<float> qbar_, gk_, gv_;
    std::vector<int32_t> sel_, idx_;
};

}  // namespace

EmulParams parse_emul2(const std::string & name, const BaselineParams & base) {
    EmulParams e;
    e.base = base;
    const std::string pre = "emul2_";
    if (name.rfind(pre, 0) != 0) throw std::runtime_error("not an emulation method: " + name);
    std::string rest = name.substr(pre.size());
    if (rest == "uniform") return e;
    size_t at = 0;
    while (at <= rest.size()) {
        const size_t end = std::min(rest.find('_', at), rest.size());
        const std::string tok = rest.substr(at, end - at);
        int pct = 0;
        char tail = 0;
        if (tok == "lloyd") e.lloyd_keys = e.lloyd_values = true;
        else if (tok == "lloydk") e.lloyd_keys = true;
        else if (tok == "lloydv") e.lloyd_values = true;
        else if (tok == "vchan") e.vchan = true;
        else if (std::sscanf(tok.c_str(), "outlier%d%c", &pct, &tail) == 1 && pct > 0 && pct < 100) e.outlier_frac = pct / 100.0;
        else if (std::sscanf(tok.c_str(), "voutlier%d%c", &pct, &tail) == 1 && pct > 0 && pct < 100) {
            e.outlier_frac = pct / 100.0;
            e.outlier_by_value = true;
        } else throw std::runtime_error("unknown emulation variant '" + tok + "' in " + name);
        at = end + 1;
    }
    if (e.vchan && e.base.n_window < e.vgroup)
        throw std::runtime_error(name + ": value groups along tokens need a window of at least " + std::to_string(e.vgroup));
    return e;
}

bool emul2_stored(const DecodeMethod & m, int layer, int t, int g, float * k, float * v) {
    const auto * e = dynamic_cast<const Emul2 *>(&m);
    return e && e->stored(layer, t, g, k, v);
}

std::unique_ptr<DecodeMethod> make_emul2(const std::string & name, const BaselineParams & base) {
    return std::make_unique<Emul2>(name, parse_emul2(name, base));
}

std::unique_ptr<DecodeMethod> make_dense() { return std::make_unique<Dense>(true); }
std::unique_ptr<DecodeMethod> make_observer() { return std::make_unique<Dense>(false); }
std::unique_ptr<DecodeMethod> make_oracle_topk(const BaselineParams & p) { return std::make_unique<OracleTopK>(p); }
std::unique_ptr<DecodeMethod> make_quest(const BaselineParams & p) { return std::make_unique<Quest>(p); }
std::unique_ptr<DecodeMethod> make_sink_window(const BaselineParams & p) { return std::make_unique<SinkWindow>(p); }

}  // namespace sikv_eval
