// Unit test of the fp32 baselines on random data (no model needed).
#include "methods.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

using namespace sikv_eval;

static int g_pass = 0, g_fail = 0;

static void check(bool ok, const char * what, double detail = 0.0) {
    if (ok) ++g_pass;
    else { ++g_fail; std::printf("FAIL: %s (%g)\n", what, detail); }
}

struct Data {
    ModelShape s;
    int n_prompt = 0, n_decode = 0;
    std::vector<float> k, v, q;  // k, v: [n_prompt + n_decode][kv][d]; q: [n_decode][q][d]
};

static Data make_data(int n_prompt, int n_decode, unsigned seed) {
    Data x;
    x.s.n_layer = 2;
    x.s.n_q_heads = 6;
    x.s.n_kv_heads = 2;
    x.s.head_dim = 16;
    x.s.scale = 0.25f;
    x.n_prompt = n_prompt;
    x.n_decode = n_decode;
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int n = n_prompt + n_decode;
    x.k.resize((size_t) n * x.s.n_kv_heads * x.s.head_dim);
    x.v.resize(x.k.size());
    x.q.resize((size_t) n_decode * x.s.n_q_heads * x.s.head_dim);
    for (auto & f : x.k) f = 2.0f * nd(rng);
    for (auto & f : x.v) f = nd(rng);
    for (auto & f : x.q) f = nd(rng);
    return x;
}

// Reference attention in double over an explicit token list for one q head.
static void ref_attend(const Data & x, int h, const float * q, const std::vector<int> & idx, int n_ctx, double * out) {
    const int d = x.s.head_dim, g = h / x.s.group(), row = x.s.n_kv_heads * d;
    (void) n_ctx;
    std::vector<double> l(idx.size());
    double mx = -1e300;
    for (size_t j = 0; j < idx.size(); ++j) {
        double dot = 0.0;
        for (int c = 0; c < d; ++c) dot += (double) q[h * d + c] * x.k[(size_t) idx[j] * row + g * d + c];
        l[j] = dot * x.s.scale;
        mx = std::max(mx, l[j]);
    }
    double sum = 0.0;
    for (int c = 0; c < d; ++c) out[c] = 0.0;
    for (size_t j = 0; j < idx.size(); ++j) {
        const double w = std::exp(l[j] - mx);
        sum += w;
        for (int c = 0; c < d; ++c) out[c] += w * x.v[(size_t) idx[j] * row + g * d + c];
    }
    for (int c = 0; c < d; ++c) out[c] /= sum;
}

// Runs a method over the data; returns the max abs error against `expected(step, h) -> token list`.
template <class F>
static double run_and_compare(DecodeMethod & m, const Data & x, F expected) {
    const int d = x.s.head_dim, row = x.s.n_kv_heads * d;
    m.begin_sequence(x.s);
    for (int l = 0; l < x.s.n_layer; ++l) m.calibrate(l, x.k.data(), x.v.data(), x.n_prompt, x.q.data(), 1);
    double err = 0.0;
    std::vector<float> out((size_t) x.s.n_q_heads * d);
    std::vector<double> ref(d);
    for (int i = 0; i < x.n_decode; ++i) {
        const int n = x.n_prompt + i + 1;
        const float * q = x.q.data() + (size_t) i * x.s.n_q_heads * d;
        for (int l = 0; l < x.s.n_layer; ++l) {
            m.append(l, x.k.data() + (size_t) (n - 1) * row, x.v.data() + (size_t) (n - 1) * row);
            m.attend(l, q, out.data());
            for (int h = 0; h < x.s.n_q_heads; ++h) {
                ref_attend(x, h, q, expected(n, q, h / x.s.group()), n, ref.data());
                for (int c = 0; c < d; ++c) err = std::max(err, std::fabs(ref[c] - (double) out[h * d + c]));
            }
        }
    }
    return err;
}

// Outputs of every decode step, [n_decode][layer][n_q][d], decoding `block` tokens per call (the last
// block may be shorter): append_block then attend_block, as the harness's --decode-block does.
static std::vector<float> decode_in_blocks(DecodeMethod & m, const Data & x, int block) {
    const int d = x.s.head_dim, row = x.s.n_kv_heads * d, qrow = x.s.n_q_heads * d, L = x.s.n_layer;
    m.begin_sequence(x.s);
    for (int l = 0; l < L; ++l) m.calibrate(l, x.k.data(), x.v.data(), x.n_prompt, x.q.data(), 1);
    std::vector<float> all((size_t) x.n_decode * L * qrow), out((size_t) block * qrow);
    for (int i = 0; i < x.n_decode; i += block) {
        const int n = std::min(block, x.n_decode - i);
        const size_t first = (size_t) x.n_prompt + i;
        for (int l = 0; l < L; ++l) {
            m.append_block(l, x.k.data() + first * row, x.v.data() + first * row, n);
            m.attend_block(l, x.q.data() + (size_t) i * qrow, out.data(), n);
            for (int r = 0; r < n; ++r)
                std::copy(out.begin() + (size_t) r * qrow, out.begin() + (size_t) (r + 1) * qrow,
                          all.begin() + ((size_t) (i + r) * L + l) * qrow);
        }
    }
    return all;
}

// Blocks of 4 must give the one-by-one outputs: each row attends causally, as its own decode step would.
static void check_blocks_causal(DecodeMethod & m, const Data & x) {
    const std::vector<float> one = decode_in_blocks(m, x, 1), four = decode_in_blocks(m, x, 4);
    double err = 0.0;
    for (size_t i = 0; i < one.size(); ++i) err = std::max(err, (double) std::fabs(one[i] - four[i]));
    check(err == 0.0, (m.name() + ": blocks of 4 equal one-by-one decode").c_str(), err);
}

static std::vector<int> all_tokens(int n) {
    std::vector<int> v(n);
    std::iota(v.begin(), v.end(), 0);
    return v;
}

int main() {
    const Data x = make_data(203, 9, 1234);  // not a multiple of the page size
    const int d = x.s.head_dim, row = x.s.n_kv_heads * d;
    const double tol = 2e-5;

    {   // dense attends to everything
        auto m = make_dense();
        const double e = run_and_compare(*m, x, [](int n, const float *, int) { return all_tokens(n); });
        check(e < tol, "dense matches the fp64 reference", e);
        auto o = make_observer();
        check(!o->writes_output() && m->writes_output(), "observer does not write, dense does");
    }

    BaselineParams p;
    p.n_sink = 4;
    p.n_window = 8;
    p.page_size = 16;

    {   // oracle top-k: sinks + exact top-k by the group-mean query + window
        p.budget = 20;
        auto m = make_oracle_topk(p);
        const double e = run_and_compare(*m, x, [&](int n, const float * q, int g) {
            std::vector<float> qbar(d, 0.0f);
            for (int h = g * x.s.group(); h < (g + 1) * x.s.group(); ++h)
                for (int c = 0; c < d; ++c) qbar[c] += q[h * d + c] / (float) x.s.group();
            std::vector<std::pair<float, int>> sc;
            for (int t = p.n_sink; t < n - p.n_window; ++t) {
                float dot = 0.0f;
                for (int c = 0; c < d; ++c) dot += qbar[c] * x.k[(size_t) t * row + g * d + c];
                sc.push_back({-dot, t});
            }
            std::sort(sc.begin(), sc.end());
            std::vector<int> idx;
            for (int t = 0; t < p.n_sink; ++t) idx.push_back(t);
            for (int j = 0; j < p.budget; ++j) idx.push_back(sc[j].second);
            for (int t = n - p.n_window; t < n; ++t) idx.push_back(t);
            return idx;
        });
        check(e < tol, "oracle top-k matches sinks + exact top-k + window", e);
        const SelectionStats st = m->stats();
        check(st.recall_count > 0 && std::fabs(st.recall_sum / st.recall_count - 1.0) < 1e-12, "oracle recall is 1");
        check(std::fabs(st.attended_sum / st.attended_count - (p.n_sink + p.budget + p.n_window)) < 1e-9,
              "oracle attends sinks + budget + window");
    }

    {   // a budget covering every candidate gives dense attention, for every selecting method
        p.budget = 100000;
        for (auto & m : {make_oracle_topk(p), make_quest(p), make_sink_window(p)}) {
            const double e = run_and_compare(*m, x, [](int n, const float *, int) { return all_tokens(n); });
            check(e < tol, (m->name() + " with a full budget is dense").c_str(), e);
        }
    }

    {   // quest selects whole pages, never more than the budget, and its bound is an upper bound
        p.budget = 48;
        auto m = make_quest(p);
        m->begin_sequence(x.s);
        for (int l = 0; l < x.s.n_layer; ++l) m->calibrate(l, x.k.data(), x.v.data(), x.n_prompt, x.q.data(), 1);
        std::vector<float> out((size_t) x.s.n_q_heads * d);
        m->attend(0, x.q.data(), out.data());
        const SelectionStats st = m->stats();
        const double att = st.attended_sum / st.attended_count;
        check(att <= p.n_sink + p.budget + p.n_window && att >= p.n_sink + p.n_window, "quest stays within budget", att);
        check(st.recall_count == x.s.n_kv_heads && st.recall_sum > 0.0, "quest reports recall");

        // the Quest bound of each page dominates the exact score of each of its tokens (checked directly)
        bool ok = true;
        for (int g = 0; g < x.s.n_kv_heads; ++g)
            for (int p0 = 0; p0 < x.n_prompt; p0 += p.page_size) {
                const int p1 = std::min(x.n_prompt, p0 + p.page_size);
                for (int c = 0; c < d; ++c) {
                    float mn = 1e30f, mx = -1e30f;
                    for (int t = p0; t < p1; ++t) {
                        mn = std::min(mn, x.k[(size_t) t * row + g * d + c]);
                        mx = std::max(mx, x.k[(size_t) t * row + g * d + c]);
                    }
                    for (int t = p0; t < p1; ++t) {
                        const float qc = x.q[c];
                        if (qc * x.k[(size_t) t * row + g * d + c] > std::max(qc * mn, qc * mx) + 1e-6f) ok = false;
                    }
                }
            }
        check(ok, "per-channel page bound dominates q_c k_c");
    }

    {   // sinks + window spends the budget on the window
        p.budget = 30;
        auto m = make_sink_window(p);
        const double e = run_and_compare(*m, x, [&](int n, const float *, int) {
            std::vector<int> idx;
            for (int t = 0; t < p.n_sink; ++t) idx.push_back(t);
            for (int t = n - p.n_window - p.budget; t < n; ++t) idx.push_back(t);
            return idx;
        });
        check(e < tol, "sink_window matches sinks + window of n_window + budget", e);
        check(m->stats().recall_count == 0, "sink_window reports no recall");
    }

    {   // decode blocks (--decode-block): every baseline's rows attend causally. The window (32) is at
        // least a page plus a block, as in the harness (64 >= 16 + 16), so Quest's page bounds never
        // see a later token of the block.
        p.n_window = 32;
        p.budget = 40;
        auto dense = make_dense();
        check_blocks_causal(*dense, x);
        for (auto & m : {make_oracle_topk(p), make_quest(p), make_sink_window(p)}) check_blocks_causal(*m, x);
    }

    std::printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
