// The harness's 2+1 storage emulation (emul2_uniform) against the library's own stored bits (sikv_oracle_2+1)
// on the same inputs: both attend sinks + window + the exact top-b by q̄·k, so their outputs may differ only by
// arithmetic rounding (the library sums its softmax in f32, the harness in f64). A quantisation difference
// (another centre, scale, group or rounding rule) moves whole 2-bit steps and shows as errors of 1e-2 and more.
// Built only with the library (-DSIKV_INCLUDE/-DSIKV_LIB); run.sh runs it.
#include "methods.h"
#include "selfindexkv.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace sikv_eval;

int main() {
    ModelShape s;
    s.n_layer = 2;
    s.n_q_heads = 9;
    s.n_kv_heads = 3;
    s.head_dim = 64;
    s.scale = 0.125f;
    const int P = 700, D = 40, budget = 96;
    const int row = s.n_kv_heads * s.head_dim, qrow = s.n_q_heads * s.head_dim;
    std::mt19937 rng(2024);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> k((size_t) (P + D) * row), v(k.size()), q((size_t) (D + 1) * qrow);
    for (size_t i = 0; i < k.size(); ++i) {
        const int c = (int) (i % s.head_dim);
        k[i] = (1.0f + 0.1f * (float) (c % 9)) * nd(rng) + 0.3f * (float) (c % 5) - 0.5f;  // offsets: the centre matters
        if (i % 997 == 0) k[i] *= 8.0f;                                                   // a few outlier elements
    }
    for (auto & f : v) f = nd(rng);
    for (auto & f : q) f = 1.5f * nd(rng);

    LibraryParams lp;
    lp.name = "sikv_oracle_2+1";
    lp.profile = SIKV_PROFILE_2_1;
    lp.prompt_len = P;
    lp.decode_len = D;
    lp.n_sink = 4;
    lp.n_window = 64;
    lp.n_heavy = 0;
    lp.fixed_k = budget;
    lp.oracle = true;
    lp.recall_every = 0;
    auto lib = make_library(lp);
    BaselineParams bp;
    bp.n_sink = 4;
    bp.n_window = 64;
    bp.budget = budget;
    auto emu = make_emul2("emul2_uniform", bp);
    if (lib->profile() != "2+1") {
        std::printf("FAIL: profile %s is not 2+1\n", lib->profile().c_str());
        return 1;
    }

    double worst = 0.0, sum = 0.0;
    int n_cmp = 0;
    for (auto * m : {lib.get(), emu.get()}) m->begin_sequence(s);
    for (int l = 0; l < s.n_layer; ++l)
        for (auto * m : {lib.get(), emu.get()}) m->calibrate(l, k.data(), v.data(), P, q.data() + (size_t) D * qrow, 1);
    std::vector<float> a((size_t) qrow), b((size_t) qrow);
    for (int i = 0; i < D; ++i)
        for (int l = 0; l < s.n_layer; ++l) {
            for (auto * m : {lib.get(), emu.get()}) m->append(l, k.data() + (size_t) (P + i) * row, v.data() + (size_t) (P + i) * row);
            lib->attend(l, q.data() + (size_t) i * qrow, a.data());
            emu->attend(l, q.data() + (size_t) i * qrow, b.data());
            for (int h = 0; h < s.n_q_heads; ++h) {
                double num = 0.0, den = 0.0;
                for (int c = 0; c < s.head_dim; ++c) {
                    const double x = a[(size_t) h * s.head_dim + c], y = b[(size_t) h * s.head_dim + c];
                    num = std::max(num, std::fabs(x - y));
                    den = std::max(den, std::fabs(x));
                }
                worst = std::max(worst, num / den);
                sum += num / den;
                ++n_cmp;
            }
        }
    const bool ok = worst < 1e-4;
    std::printf("%s: emul2_uniform against sikv_oracle_2+1 on the same inputs: largest relative difference %.2e, "
                "mean %.2e over %d head outputs\n", ok ? "ok" : "FAIL", worst, sum / n_cmp, n_cmp);
    return ok ? 0 : 1;
}
