// Real-model quality evaluation: decode-mode perplexity of llama.cpp with a substituted decode attention.
//
// For each window of the text: prefill `context` tokens densely (one llama_decode, one ubatch), then decode
// `decode` tokens one at a time (or --decode-block N per llama_decode), teacher-forced, and accumulate the NLL of
// the true next token. During decode, llama.cpp's public eval callback (cb_eval) observes every layer's post-RoPE
// Qcur/Kcur and Vcur; when the layer's attention output `kqv_out-N` has been computed, the callback asks the method
// under test for the attention of these tokens and writes it over kqv_out-N, which the output projection then reads.
// The prefill is shared by every method of a window: after each method, the decoded positions are removed
// from llama.cpp's KV cache and the next method starts from the same prefill. With --chunked-prefill N only the
// first N tokens are that shared prefill: each method calibrates on them and the rest of the prompt goes through
// it N tokens per llama_decode, substituted like a decode block, before its decode.
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

#include "methods.h"
#include "passkey.h"
#ifdef SIKV_EVAL_WITH_LIBRARY
#include "selfindexkv.h"
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using namespace sikv_eval;

namespace {

// `path` opened for appending result rows, `header` written first when the file is new or empty
// (so an interrupted run keeps what it completed and a rerun adds to it); nullptr for no path.
FILE * append_file(const std::string & path, const char * header) {
    if (path.empty()) return nullptr;
    std::ifstream probe(path);
    const bool fresh = !probe.good() || probe.peek() == std::ifstream::traits_type::eof();
    probe.close();
    FILE * f = std::fopen(path.c_str(), "a");
    if (!f) throw std::runtime_error("cannot write " + path);
    if (fresh) std::fputs(header, f);
    return f;
}

// An integer of the model's GGUF metadata, or `fallback` when the key is absent.
int meta_int(const llama_model * model, const std::string & key, int fallback) {
    char buf[64];
    if (llama_model_meta_val_str(model, key.c_str(), buf, sizeof buf) < 0) return fallback;
    return std::atoi(buf);
}

std::string model_arch(const llama_model * model) {
    char arch[128];
    if (llama_model_meta_val_str(model, "general.architecture", arch, sizeof arch) < 0) arch[0] = 0;
    return arch;
}

// Score modifiers the library's attention does not apply: refused with a message rather than
// evaluated wrongly (the `dense` method would no longer equal llama.cpp).
void refuse_unsupported_attention(const llama_model * model) {
    const std::string key = model_arch(model) + ".attn_logit_softcapping";
    char buf[64];
    if (llama_model_meta_val_str(model, key.c_str(), buf, sizeof buf) >= 0 && std::atof(buf) > 0.0)
        throw std::runtime_error("model applies attention-logit softcapping (" + key + " = " + buf +
                                 "): the library's attention has no softcap; refused");
}

// head_dim as the model declares it (<arch>.attention.key_length), else n_embd / n_head. Models
// whose heads are not n_embd / n_head wide set the key length, and sizing the buffers from the
// quotient overran them. A value length that differs from the key length is refused: the
// library stores K and V of one head_dim.
int model_head_dim(const llama_model * model, int n_q_heads) {
    const std::string a = model_arch(model);
    const int fallback = llama_model_n_embd(model) / n_q_heads;
    const int dk = a.empty() ? fallback : meta_int(model, a + ".attention.key_length", fallback);
    const int dv = a.empty() ? dk : meta_int(model, a + ".attention.value_length", dk);
    if (dv != dk)
        throw std::runtime_error("model has key length " + std::to_string(dk) + " and value length " +
                                 std::to_string(dv) + ": the harness needs equal K and V head dims");
    return dk;
}


// The most rows sikv_attend_rows takes per sequence, and so the largest decode block.
constexpr int kMaxBlock = 16;

struct Options {
    std::string model;
    std::string text;
    std::string csv;
    std::string layer_csv;
    std::string nll_file;
    std::string sikv_budget = "charged";
    int context = 2048;
    int decode = 128;
    int decode_block = 1;  // teacher-forced tokens per llama_decode (1..kMaxBlock)
    int windows = 1;
    int offset = 0;
    int threads = 2;
    int q_tail = 1;
    int prefill_chunk = 0;  // passkey mode: prefill in ubatches of this many tokens (0: one ubatch)
    int chunked_prefill = 0;  // perplexity mode: methods calibrate on this many tokens and prefill the rest
    std::string prefill_nll_file;
    int n_sink = 4;
    int n_window = 64;
    int page = 16;
    int sikv_page = 16;
    int sikv_heavy = 64;
    double sikv_heavy_frac = 0.25;
    std::string sikv_centre = "median";
    int recall_every = 4;
    int dense_layers = 0;
    int sikv_rerank = -1;
    bool kv_f16 = false;
    bool flash_attn = false;
    bool dump_names = false;
    bool recall = true;
    std::vector<std::string> methods = {"llama", "dense", "oracle_topk", "quest", "sink_window"};
    std::vector<std::string> budgets = {"1/32", "1/16", "1/8"};
    std::vector<std::pair<std::string, std::string>> configs;  // --configs method@budget pairs
    // passkey mode (--passkey-depths): retrieval instead of perplexity
    std::vector<double> passkey_depths;
    int passkey_keys = 2;
    uint64_t passkey_seed = 1;
    int passkey_digits = 5;
    int passkey_new = 0;  // 0: digits + 3
    int passkey_part = 1, passkey_parts = 1;
    std::string passkey_csv;
};

void usage() {
    std::fprintf(stderr,
        "usage: llama_cpp_eval --model M.gguf --text T.txt [options]\n"
        "  --context P        prefill tokens per window (2048)\n"
        "  --decode D         teacher-forced decode tokens per window (128)\n"
        "  --decode-block N   teacher-forced tokens per llama_decode, 1..16 (1): the method appends the block's N\n"
        "                     keys and values, then attends its N query rows at once (library: one sikv_attend_rows;\n"
        "                     baselines: row by row, causal); every token of the block is scored\n"
        "  --windows W        windows, consecutive and disjoint, each P+D+1 tokens (1)\n"
        "  --offset O         first token of the first window (0)\n"
        "  --methods LIST     comma list of llama,dense,oracle_topk,quest,sink_window\n"
        "  --budgets LIST     comma list of budgets: a fraction of P (1/32) or a token count (100)\n"
        "  --configs LIST     comma list of method@budget (llama, dense, sikv_parity: no budget) instead of\n"
        "                     every method at every budget\n"
        "  --sinks N          sink tokens for the sparse baselines (4)\n"
        "  --window N         recent-window tokens for the sparse baselines (64)\n"
        "  --page N           page size of the Quest baseline (16)\n"
        "  --sikv-page N      page size of the library's cache (16)\n"
        "  --sikv-heavy N     heavy tokens of the library's dense set (64; parity keeps its own)\n"
        "  --recall-every N   library methods: sikv_selection_recall every N decode steps (4)\n"
        "  --dense-layers N   layers below N keep llama.cpp's dense attention under every method (0)\n"
        "  --sikv-rerank C    re-rank factor of the two-stage library methods (the profile's: 4)\n"
        "  --sikv-heavy-frac F  charged budget: heavy = min(--sikv-heavy, floor(F * b)) (0.25)\n"
        "  --sikv-centre C    library key centre: median (default) or mean\n"
        "  --sikv-budget R    library budget rule: charged (default; heavy = min(--sikv-heavy, F * b) and k = b - heavy,\n"
        "                     so the library attends sinks + window + b tokens like the baselines) or ratio\n"
        "                     (k = ceil(b/P * candidates), heavy tokens on top)\n"
        "library methods (built with -DSIKV_INCLUDE/-DSIKV_LIB): sikv_2+1, sikv_4+1, sikv_16+1 (two-stage,\n"
        "  rerank 4), sikv_1stage_2+1, sikv_1stage_4+1, sikv_1stage_16+1 (rerank 0), sikv_signsign (16+1, the\n"
        "  reference's sign x sign score, one stage), sikv_oracle_2+1, sikv_oracle_4+1, sikv_oracle_16+1 (exact\n"
        "  top-b by q.k, no heavy tokens, attended from the library's stored bits), sikv_kXvY (X key-magnitude and\n"
        "  Y value bits, 2/4/16, e.g. sikv_k2v4; also sikv_oracle_kXvY), sikv_parity (k = 100, no budget); the suffix\n"
        "  _meanq (e.g. sikv_2+1_meanq) selects once per decode block from the rows' mean query\n"
        "  (SIKV_FLAG_ROWS_MEAN_QUERY) instead of per row\n"
        "storage emulation (no library needed): emul2_uniform (the library's 2+1 storage, quantised in the harness,\n"
        "  attended with the exact top-b by q.k over exact keys, as sikv_oracle_2+1), and variants of one change\n"
        "  joined by '_': lloyd (fitted 2-bit levels; lloydk, lloydv: keys or values only), vchan (values per channel in groups of 32 tokens), outlierN /\n"
        "  voutlierN (N % of tokens by key / value norm kept in fp16), e.g. emul2_lloyd, emul2_outlier1\n"
        "  --q-tail N         last prompt queries handed to calibrate (1)\n"
        "  --threads N        CPU threads (2)\n"
        "  --kv-f16           llama.cpp KV cache in f16 (default f32)\n"
        "  --flash-attn       llama.cpp flash attention on (default off)\n"
        "  --no-recall        skip recall@k statistics\n"
        "  --dump-names       print every graph node (name, op, type, shape) of the first decode step\n"
        "  --csv FILE         append result rows (header written if the file is new or empty)\n"
        "  --layer-csv FILE   append per-layer recall rows (method,profile,budget,context,decode_tokens,layer,recall)\n"
        "  --nll-file FILE    append every scored token's NLL (method,budget,context,window_start,step,nll)\n"
        "chunked prefill (issue #15):\n"
        "  --chunked-prefill N  llama.cpp prefills the first N prompt tokens densely and every method calibrates from\n"
        "                     them; the rest of the prompt follows N tokens per llama_decode (one ubatch) with every\n"
        "                     global-attention layer's output rows replaced by the method's: it appends the chunk 16\n"
        "                     tokens at a time and attends those 16 rows causally (library methods: one\n"
        "                     sikv_attend_rows, the library's own per-row selection at the method's budget, at every\n"
        "                     length); then the decode as usual (0: none, the whole prompt dense and calibrated on)\n"
        "  --prefill-nll-file FILE  append the prompt's own next-token NLLs (method,budget,context,window_start,pos,nll:\n"
        "                     the logits at position pos against token pos + 1): with --chunked-prefill each method's\n"
        "                     over the chunked positions (pos >= N), else llama.cpp's dense prefill's over the whole\n"
        "                     prompt as method `llama` (logits for every prompt token)\n"
        "passkey mode (long-context retrieval; --text not needed):\n"
        "  --passkey-depths LIST  needle depths, fractions of the filler (e.g. 0.1,0.3,0.5,0.7,0.9): enables the mode;\n"
        "                     prompts of at most --context tokens, the model's chat template and BOS rule; all but the\n"
        "                     last prompt token prefilled densely (once per prompt, shared by every method), the last\n"
        "                     prompt token and the answer decoded greedily through each method\n"
        "  --passkey-keys N   keys per depth (2)\n"
        "  --passkey-seed S   seed of the keys (1)\n"
        "  --passkey-digits N digits of a key (5)\n"
        "  --passkey-new N    answer tokens at most (digits + 3); generation stops at end of turn or after the first\n"
        "                     digit run\n"
        "  --passkey-part I/N only the prompts whose index is I-1 modulo N (to split a run into parallel jobs)\n"
        "  --passkey-csv FILE append one row per prompt and method (the --csv rows are then per method: accuracy)\n"
        "  --prefill-chunk N  prefill in ubatches of N tokens (0: the whole prompt in one); llama.cpp reserves\n"
        "                     logits for every token of a ubatch, which at 32K x a 262K vocabulary does not fit\n");
}

std::vector<std::string> split(const std::string & s, char sep) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, sep)) if (!item.empty()) out.push_back(item);
    return out;
}

Options parse(int argc, char ** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) { usage(); throw std::runtime_error("missing value for " + a); }
            return argv[++i];
        };
        if (a == "--model") o.model = next();
        else if (a == "--text") o.text = next();
        else if (a == "--csv") o.csv = next();
        else if (a == "--layer-csv") o.layer_csv = next();
        else if (a == "--nll-file") o.nll_file = next();
        else if (a == "--sikv-budget") o.sikv_budget = next();
        else if (a == "--sikv-heavy-frac") o.sikv_heavy_frac = std::stod(next());
        else if (a == "--sikv-centre") o.sikv_centre = next();
        else if (a == "--context") o.context = std::stoi(next());
        else if (a == "--decode") o.decode = std::stoi(next());
        else if (a == "--decode-block") o.decode_block = std::stoi(next());
        else if (a == "--windows") o.windows = std::stoi(next());
        else if (a == "--offset") o.offset = std::stoi(next());
        else if (a == "--threads") o.threads = std::stoi(next());
        else if (a == "--q-tail") o.q_tail = std::stoi(next());
        else if (a == "--sinks") o.n_sink = std::stoi(next());
        else if (a == "--window") o.n_window = std::stoi(next());
        else if (a == "--page") o.page = std::stoi(next());
        else if (a == "--sikv-page") o.sikv_page = std::stoi(next());
        else if (a == "--sikv-heavy") o.sikv_heavy = std::stoi(next());
        else if (a == "--recall-every") o.recall_every = std::stoi(next());
        else if (a == "--dense-layers") o.dense_layers = std::stoi(next());
        else if (a == "--sikv-rerank") o.sikv_rerank = std::stoi(next());
        else if (a == "--methods") o.methods = split(next(), ',');
        else if (a == "--budgets") o.budgets = split(next(), ',');
        else if (a == "--configs")
            for (const auto & item : split(next(), ',')) {
                const auto at = item.find('@');
                o.configs.emplace_back(item.substr(0, at), at == std::string::npos ? "" : item.substr(at + 1));
            }
        else if (a == "--passkey-depths") {
            o.passkey_depths.clear();
            for (const auto & d : split(next(), ',')) o.passkey_depths.push_back(std::stod(d));
        }
        else if (a == "--passkey-keys") o.passkey_keys = std::stoi(next());
        else if (a == "--passkey-seed") o.passkey_seed = std::stoull(next());
        else if (a == "--passkey-digits") o.passkey_digits = std::stoi(next());
        else if (a == "--passkey-new") o.passkey_new = std::stoi(next());
        else if (a == "--passkey-part") {
            const std::string v = next();
            if (std::sscanf(v.c_str(), "%d/%d", &o.passkey_part, &o.passkey_parts) != 2 || o.passkey_parts < 1 ||
                o.passkey_part < 1 || o.passkey_part > o.passkey_parts)
                throw std::runtime_error("--passkey-part is I/N with 1 <= I <= N");
        }
        else if (a == "--passkey-csv") o.passkey_csv = next();
        else if (a == "--prefill-chunk") o.prefill_chunk = std::stoi(next());
        else if (a == "--chunked-prefill") o.chunked_prefill = std::stoi(next());
        else if (a == "--prefill-nll-file") o.prefill_nll_file = next();
        else if (a == "--kv-f16") o.kv_f16 = true;
        else if (a == "--flash-attn") o.flash_attn = true;
        else if (a == "--no-recall") o.recall = false;
        else if (a == "--dump-names") o.dump_names = true;
        else if (a == "-h" || a == "--help") { usage(); std::exit(0); }
        else { usage(); throw std::runtime_error("unknown option " + a); }
    }
    const bool passkey = !o.passkey_depths.empty();
    if (o.model.empty() || (o.text.empty() && !passkey)) {
        usage();
        throw std::runtime_error("--model and --text are required (--text not in passkey mode)");
    }
    if (passkey) {
        if (o.passkey_new <= 0) o.passkey_new = o.passkey_digits + 3;
        o.decode = o.passkey_new + 1;  // the last prompt token and the answer: sizes the caches
        o.windows = 1;
    }
    if (o.context < 1 || o.decode < 1 || o.windows < 1) throw std::runtime_error("context, decode, windows must be >= 1");
    if (o.decode_block < 1 || o.decode_block > kMaxBlock)
        throw std::runtime_error("--decode-block is 1.." + std::to_string(kMaxBlock));
    if (passkey && o.decode_block != 1) throw std::runtime_error("passkey mode decodes one token at a time");
    if (o.chunked_prefill < 0 || o.chunked_prefill >= o.context)
        throw std::runtime_error("--chunked-prefill is 0 or 1..context-1");
    if (passkey && (o.chunked_prefill > 0 || !o.prefill_nll_file.empty()))
        throw std::runtime_error("--chunked-prefill and --prefill-nll-file are perplexity-mode options");
    if (o.sikv_budget != "charged" && o.sikv_budget != "ratio") throw std::runtime_error("--sikv-budget is charged or ratio");
    if (o.sikv_centre != "median" && o.sikv_centre != "mean") throw std::runtime_error("--sikv-centre is median or mean");
    if (!(o.sikv_heavy_frac >= 0.0 && o.sikv_heavy_frac < 1.0)) throw std::runtime_error("--sikv-heavy-frac is in [0, 1)");
    return o;
}

// Budget "a/b" is a fraction of the context, anything else a token count.
int budget_tokens(const std::string & b, int context) {
    const auto slash = b.find('/');
    if (slash == std::string::npos) return std::stoi(b);
    const double f = std::stod(b.substr(0, slash)) / std::stod(b.substr(slash + 1));
    return std::max(1, (int) std::lround(f * context));
}

// ---------------------------------------------------------------------------------------------------------
// The eval callback.

enum class Kind { None, Q, K, V, Out };

// "<prefix><digits>" -> layer
bool layer_of(const char * name, const char * prefix, int & layer) {
    const size_t n = std::strlen(prefix);
    if (std::strncmp(name, prefix, n) != 0 || name[n] == '\0') return false;
    for (const char * p = name + n; *p; ++p) if (*p < '0' || *p > '9') return false;
    layer = std::atoi(name + n);
    return true;
}

struct Hook {
    enum class Phase { Off, Prefill, Decode };

    ModelShape shape;
    Phase phase = Phase::Off;
    int n_tokens = 0;  // tokens of the current ubatch
    int q_tail = 1;
    bool dump = false;

    // prefill capture, per layer: [n][n_kv][d] keys and values, [q_tail][n_q][d] last queries
    std::vector<std::vector<float>> pk, pv, pq;
    std::vector<int> pk_n, pv_n, pq_n;

    // decode, per layer: this block's q [n_tokens][n_q][d], k and v [n_tokens][n_kv][d]
    std::vector<std::vector<float>> dq, dk, dv;
    std::vector<unsigned> seen;  // bit 0 q, 1 k, 2 v
    std::vector<float> out;
    int outs_this_step = 0;
    DecodeMethod * method = nullptr;
    int dense_layers = 0;  // layers below this keep llama.cpp's own output (the method still appends)
    int pos = 0;           // position of the decode block's first token
    // Layers whose mask hides some of the past at this step (a sliding window): llama.cpp's own
    // output is kept there, the library gets the global-attention layers only.
    std::vector<char> windowed;

    // agreement between the method's output and llama.cpp's own kqv_out (same inputs)
    double rel_err_sum = 0.0;
    double rel_err_max = 0.0;
    int64_t rel_err_n = 0;

    std::string error;

    Kind classify(const ggml_tensor * t, int & layer) const {
        const char * name = ggml_get_name(t);
        if (layer_of(name, "Qcur-", layer)) return t->op == GGML_OP_ROPE ? Kind::Q : Kind::None;
        if (layer_of(name, "Kcur-", layer)) return t->op == GGML_OP_ROPE ? Kind::K : Kind::None;
        if (layer_of(name, "Vcur-", layer))
            return (t->ne[0] == shape.head_dim && t->ne[1] == shape.n_kv_heads && t->ne[2] == n_tokens) ? Kind::V
                                                                                                       : Kind::None;
        if (layer_of(name, "kqv_out-", layer)) return Kind::Out;
        return Kind::None;
    }
};

// Copies rows [t0, t1) of a [d][heads][tokens] f32 tensor (any strides) into dst as [t][heads][d].
void copy_rows(const ggml_tensor * t, int t0, int t1, float * dst) {
    const int64_t d = t->ne[0], heads = t->ne[1];
    const char * base = (const char *) t->data;
    for (int64_t i = t0; i < t1; ++i)
        for (int64_t h = 0; h < heads; ++h) {
            const char * src = base + i * t->nb[2] + h * t->nb[1];
            float * o = dst + ((i - t0) * heads + h) * d;
            if (t->nb[0] == sizeof(float)) std::memcpy(o, src, d * sizeof(float));
            else for (int64_t c = 0; c < d; ++c) o[c] = *(const float *) (src + c * t->nb[0]);
        }
}

// The attention mask behind a layer's output (src[1] of its soft_max, src[3] of flash attention),
// found by walking the sources of kqv_out; nullptr when there is none.
const ggml_tensor * attention_mask(const ggml_tensor * out) {
    std::vector<const ggml_tensor *> frontier{out};
    for (int depth = 0; depth < 8 && !frontier.empty(); ++depth) {
        std::vector<const ggml_tensor *> next;
        for (const ggml_tensor * t : frontier) {
            if (t->op == GGML_OP_SOFT_MAX) return t->src[1];
            if (t->op == GGML_OP_FLASH_ATTN_EXT) return t->src[3];
            for (const ggml_tensor * src : t->src)
                if (src) next.push_back(src);
        }
        frontier.swap(next);
    }
    return nullptr;
}

// Cells the decode token may attend to: the finite entries of the mask's first row.
int64_t visible_cells(const ggml_tensor * mask) {
    int64_t n = 0;
    if (mask->type == GGML_TYPE_F32) {
        const float * m = (const float *) mask->data;
        for (int64_t i = 0; i < mask->ne[0]; ++i) n += std::isfinite(m[i]) ? 1 : 0;
    } else if (mask->type == GGML_TYPE_F16) {
        const uint16_t * m = (const uint16_t *) mask->data;
        for (int64_t i = 0; i < mask->ne[0]; ++i) n += (m[i] & 0x7c00u) != 0x7c00u ? 1 : 0;
    } else {
        return -1;
    }
    return n;
}

// kqv_out is [n_q_heads * head_dim][n_tokens] (ggml_cont_2d of the permuted heads): token i's row starts
// at i * nb[1]. Anything else is refused rather than written at the wrong place.
bool output_layout_ok(const ggml_tensor * t, const ModelShape & s, int n_tokens) {
    return t->ne[0] == (int64_t) s.n_q_heads * s.head_dim && t->ne[1] == n_tokens && t->ne[2] == 1 &&
           t->nb[0] == sizeof(float) && t->nb[1] >= (size_t) t->ne[0] * sizeof(float);
}

// Layer `layer`'s attention output for the block: the method's rows over llama.cpp's kqv_out (after
// measuring their agreement), unless the layer stays on llama.cpp's attention.
void substitute_output(Hook & h, ggml_tensor * t, int layer) {
    const ModelShape & s = h.shape;
    const int n = h.n_tokens;
    if (h.seen[layer] != 7u) { h.error = "kqv_out before Qcur/Kcur/Vcur of layer " + std::to_string(layer); return; }
    if (!output_layout_ok(t, s, n)) { h.error = "unexpected kqv_out layout"; return; }
    h.seen[layer] = 0;
    if (const ggml_tensor * mask = attention_mask(t)) {
        if (!mask->data || (mask->buffer && !ggml_backend_buffer_is_host(mask->buffer))) {
            h.error = "attention mask of layer " + std::to_string(layer) + " is not in host memory";
            return;
        }
        // the mask's first row is the block's first token: it sees pos + 1 cells unless windowed
        const int64_t seen = visible_cells(mask);
        if (seen >= 0 && seen < (int64_t) h.pos + 1) h.windowed[layer] = 1;
    }
    h.outs_this_step += 1;
    // A call takes at most kMaxBlock rows, the sequence's last tokens: a prompt chunk (--chunked-prefill) is
    // appended and attended kMaxBlock tokens at a time, each group's rows seeing the groups before it in the
    // cache and their own group causally. A decode block is one group, as before.
    const bool keep = layer < h.dense_layers || h.windowed[layer];
    const size_t row = (size_t) s.n_q_heads * s.head_dim;
    const size_t kv_row = (size_t) s.n_kv_heads * s.head_dim;
    for (int g0 = 0; g0 < n; g0 += kMaxBlock) {
        const int g = std::min(kMaxBlock, n - g0);
        h.method->append_block(layer, h.dk[layer].data() + g0 * kv_row, h.dv[layer].data() + g0 * kv_row, g);
        if (!keep) h.method->attend_block(layer, h.dq[layer].data() + g0 * row, h.out.data() + g0 * row, g);
    }
    if (keep) return;
    for (int i = 0; i < n; ++i) {
        float * ref = (float *) ((char *) t->data + (size_t) i * t->nb[1]);
        const float * mine = h.out.data() + i * row;
        double num = 0.0, den = 0.0;
        for (size_t c = 0; c < row; ++c) {
            const double e = (double) mine[c] - (double) ref[c];
            num += e * e;
            den += (double) ref[c] * ref[c];
        }
        const double rel = std::sqrt(num / std::max(den, 1e-30));
        h.rel_err_sum += rel;
        h.rel_err_max = std::max(h.rel_err_max, rel);
        h.rel_err_n += 1;
        if (h.method->writes_output()) std::memcpy(ref, mine, row * sizeof(float));
    }
}

bool eval_cb(ggml_tensor * t, bool ask, void * user_data) {
    Hook & h = *static_cast<Hook *>(user_data);
    if (h.phase == Hook::Phase::Off) return ask ? false : true;

    if (ask && h.dump) {
        std::printf("  node %-24s op=%-12s type=%-4s ne=[%lld,%lld,%lld,%lld]\n", ggml_get_name(t), ggml_op_desc(t),
                    ggml_type_name(t->type), (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
                    (long long) t->ne[3]);
    }

    int layer = -1;
    const Kind kind = h.classify(t, layer);
    const bool prefill = h.phase == Hook::Phase::Prefill;
    const bool wanted = kind != Kind::None && layer >= 0 && layer < h.shape.n_layer && (!prefill || kind != Kind::Out);
    if (ask) return wanted;
    if (!wanted || !h.error.empty()) return true;  // never abort the graph from here

    if (t->type != GGML_TYPE_F32 || (t->buffer && !ggml_backend_buffer_is_host(t->buffer))) {
        h.error = std::string("tensor ") + ggml_get_name(t) + " is not an f32 host tensor";
        return true;
    }
    const ModelShape & s = h.shape;
    const int d = s.head_dim;

    if (prefill) {
        const int n = h.n_tokens;
        switch (kind) {
            // appended after the rows of earlier chunks (passkey mode's --prefill-chunk; else one ubatch)
            case Kind::K: {
                const size_t off = (size_t) h.pk_n[layer] * s.n_kv_heads * d;
                h.pk[layer].resize(off + (size_t) n * s.n_kv_heads * d);
                copy_rows(t, 0, n, h.pk[layer].data() + off);
                h.pk_n[layer] += n;
                break;
            }
            case Kind::V: {
                const size_t off = (size_t) h.pv_n[layer] * s.n_kv_heads * d;
                h.pv[layer].resize(off + (size_t) n * s.n_kv_heads * d);
                copy_rows(t, 0, n, h.pv[layer].data() + off);
                h.pv_n[layer] += n;
                break;
            }
            case Kind::Q: {
                const int nq = std::min(h.q_tail, n);
                h.pq[layer].resize((size_t) nq * s.n_q_heads * d);
                copy_rows(t, n - nq, n, h.pq[layer].data());
                h.pq_n[layer] = nq;
                break;
            }
            default: break;
        }
        return true;
    }

    // decode: a block of n_tokens (1 unless --decode-block)
    const int n = h.n_tokens;
    if (kind != Kind::Out && t->ne[2] != n) { h.error = std::string("unexpected shape of ") + ggml_get_name(t); return true; }
    switch (kind) {
        case Kind::Q: copy_rows(t, 0, n, h.dq[layer].data()); h.seen[layer] |= 1u; break;
        case Kind::K: copy_rows(t, 0, n, h.dk[layer].data()); h.seen[layer] |= 2u; break;
        case Kind::V: copy_rows(t, 0, n, h.dv[layer].data()); h.seen[layer] |= 4u; break;
        case Kind::Out: substitute_output(h, t, layer); break;
        default: break;
    }
    return true;
}

// ---------------------------------------------------------------------------------------------------------

struct Config {
    std::string method;
    std::string budget_label;
    int budget = 0;
    std::unique_ptr<DecodeMethod> impl;
    std::function<std::unique_ptr<DecodeMethod>()> make;  // a fresh impl (passkey mode: frees the last prompt's state)
    // results, summed over windows
    double nll = 0.0;
    int64_t n_scored = 0;
    double decode_s = 0.0;
    double rel_err_sum = 0.0, rel_err_max = 0.0;
    int64_t rel_err_n = 0;
    SelectionStats st;
    // --chunked-prefill: the chunked positions' next-token NLL, time and attention agreement
    double prefill_nll = 0.0;
    int64_t prefill_scored = 0;
    double chunk_s = 0.0;
    double chunk_rel_sum = 0.0, chunk_rel_max = 0.0;
    int64_t chunk_rel_n = 0;
    // passkey mode, summed over prompts
    int pk_prompts = 0, pk_correct = 0;
    double pk_digits = 0.0;
};

std::unique_ptr<DecodeMethod> make_method(const std::string & m, const BaselineParams & p) {
    if (m == "llama") return make_observer();
    if (m == "dense") return make_dense();
    if (m == "oracle_topk") return make_oracle_topk(p);
    if (m == "quest") return make_quest(p);
    if (m == "sink_window") return make_sink_window(p);
    if (m.rfind("emul2_", 0) == 0) return make_emul2(m, p);
    throw std::runtime_error("unknown method " + m);
}

double budget_fraction(const std::string & b, int context) {
    const auto slash = b.find('/');
    if (slash == std::string::npos) return (double) std::stoi(b) / context;
    return std::stod(b.substr(0, slash)) / std::stod(b.substr(slash + 1));
}

bool is_library(const std::string & m) { return m.rfind("sikv_", 0) == 0; }

std::unique_ptr<DecodeMethod> make_library_method(const std::string & m, const Options & o, const std::string & budget) {
#ifdef SIKV_EVAL_WITH_LIBRARY
    LibraryParams lp;
    lp.name = m;
    std::string prof = m.substr(5);
    const std::string meanq = "_meanq";  // selection once per decode block, from the rows' mean query
    if (prof.size() > meanq.size() && prof.compare(prof.size() - meanq.size(), meanq.size(), meanq) == 0) {
        lp.rows_mean = true;
        prof.resize(prof.size() - meanq.size());
    }
    if (prof.rfind("1stage_", 0) == 0) { lp.rerank_factor = 0; prof = prof.substr(7); }
    else if (prof.rfind("oracle_", 0) == 0) { lp.oracle = true; prof = prof.substr(7); }
    else if (prof == "signsign") { lp.rerank_factor = 0; lp.selector = SIKV_SELECTOR_SIGN_SIGN; prof = "16+1"; }
    int kb = 0, vb = 0;
    if (std::sscanf(prof.c_str(), "k%dv%d", &kb, &vb) == 2) {  // mixed bits on the 2+1 profile: sikv_k2v4
        lp.key_bits = kb;
        lp.value_bits = vb;
        prof = "2+1";
    }
    if (prof == "2+1") lp.profile = SIKV_PROFILE_2_1;
    else if (prof == "4+1") lp.profile = SIKV_PROFILE_4_1;
    else if (prof == "16+1") lp.profile = SIKV_PROFILE_16_1;
    else if (prof == "parity" && lp.rerank_factor < 0) lp.profile = SIKV_PROFILE_PARITY;
    else throw std::runtime_error("unknown library method " + m);
    lp.page_size = o.sikv_page;
    lp.prompt_len = o.context;
    lp.decode_len = o.decode;
    lp.n_sink = o.n_sink;
    lp.n_heavy = o.sikv_heavy;
    lp.n_window = o.n_window;
    lp.budget_ratio = budget.empty() ? 0.0 : budget_fraction(budget, o.context);
    if (!budget.empty()) {
        const int b = budget_tokens(budget, o.context);
        if (lp.oracle) {
            lp.n_heavy = 0;
            lp.fixed_k = b;
        } else if (o.sikv_budget == "charged") {
            lp.n_heavy = std::min(o.sikv_heavy, (int) (b * o.sikv_heavy_frac));
            lp.fixed_k = b - lp.n_heavy;
        }
    }
    lp.recall_every = o.recall ? o.recall_every : 0;
    if (o.sikv_rerank >= 0 && lp.rerank_factor < 0 && lp.selector == 0 && !lp.oracle) lp.rerank_factor = o.sikv_rerank;
    if (o.sikv_centre == "mean") lp.centre = SIKV_CENTRE_MEAN;
    return make_library(lp);
#else
    (void) o; (void) budget;
    throw std::runtime_error("method " + m + " needs the library: configure with -DSIKV_INCLUDE and -DSIKV_LIB");
#endif
}

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double nll_of(const float * logits, int n_vocab, int target) {
    double mx = logits[0];
    for (int i = 1; i < n_vocab; ++i) mx = std::max(mx, (double) logits[i]);
    double sum = 0.0;
    for (int i = 0; i < n_vocab; ++i) sum += std::exp((double) logits[i] - mx);
    return std::log(sum) + mx - (double) logits[target];
}

void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) std::fputs(text, stderr);
}

// A CSV field: quoted, quotes doubled, control characters escaped.
std::string csv_field(const std::string & s) {
    std::string q = "\"";
    for (unsigned char c : s) {
        if (c == '"') q += "\"\"";
        else if (c == '\n') q += "\\n";
        else if (c < 0x20) q += ' ';
        else q += (char) c;
    }
    return q + "\"";
}

// Passkey mode: for each prompt, one dense prefill of all but its last token, then for each method the
// last prompt token and a greedy answer decoded through the method (llama.cpp's KV cache trimmed back to
// the prefill between methods, as the perplexity mode does). Scores: exact match of the answer's first
// digit run with the key, and per-digit accuracy.
int run_passkey(const Options & o, const llama_model * model, llama_context * ctx, Hook & hook,
                std::vector<Config> & configs) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    llama_memory_t mem = llama_get_memory(ctx);
    const ModelShape & s = hook.shape;
    const int L = s.n_layer;
    const int P = o.context;

    const Tokenize tokenize = [&](const std::string & text) {
        std::vector<llama_token> t(text.size() + 16);
        int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), t.data(), (int32_t) t.size(), true, true);
        if (n < 0) {
            t.resize(-n);
            n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), t.data(), (int32_t) t.size(), true, true);
        }
        if (n < 0) throw std::runtime_error("tokenization failed");
        t.resize(n);
        return std::vector<int32_t>(t.begin(), t.end());
    };
    const char * tmpl = llama_model_chat_template(model, nullptr);
    const WrapUser wrap = [&](const std::string & user) -> std::string {
        if (!tmpl) return user + "\n";  // a base model: the answer starts on the next line
        llama_chat_message msg{"user", user.c_str()};
        std::vector<char> buf(user.size() * 2 + 1024);
        int n = llama_chat_apply_template(tmpl, &msg, 1, true, buf.data(), (int32_t) buf.size());
        if (n > (int) buf.size()) {
            buf.resize(n + 1);
            n = llama_chat_apply_template(tmpl, &msg, 1, true, buf.data(), (int32_t) buf.size());
        }
        if (n < 0) throw std::runtime_error("the model's chat template is not one llama.cpp applies");
        return std::string(buf.data(), n);
    };
    auto piece = [&](llama_token t) {
        char buf[256];
        const int n = llama_token_to_piece(vocab, t, buf, sizeof buf, 0, false);
        return n > 0 ? std::string(buf, n) : std::string();
    };

    // the prompts: depth-major, keys numbered across the run
    struct Item { int index; PasskeyPrompt p; };
    std::vector<Item> items;
    for (size_t di = 0; di < o.passkey_depths.size(); ++di)
        for (int k = 0; k < o.passkey_keys; ++k) {
            const int index = (int) di * o.passkey_keys + k;
            if (index % o.passkey_parts != o.passkey_part - 1) continue;
            items.push_back({index, make_passkey_prompt(tokenize, wrap, P, o.passkey_depths[di],
                                                        passkey_key(o.passkey_seed, index, o.passkey_digits))});
        }
    if (items.empty()) throw std::runtime_error("no passkey prompt in this part");
    {
        // the needle as the model's tokenizer cuts it: the key must come out of its tokens
        const PasskeyPrompt & p = items[0].p;
        std::string pieces, joined;
        for (size_t t = p.needle_token; t < p.tokens.size() && joined.size() < 40; ++t) {
            pieces += (pieces.empty() ? "" : "|") + piece(p.tokens[t]);
            joined += piece(p.tokens[t]);
        }
        if (joined.find(p.key) == std::string::npos)
            throw std::runtime_error("the key " + p.key + " is not in the needle's tokens: " + pieces);
        std::printf("passkey: chat template %s; %zu prompt(s) of at most %d tokens; first prompt %zu tokens, %d filler "
                    "sentences, needle at token %d (depth %.3f, requested %.2f); needle tokens: %s\n",
                    tmpl ? "applied" : "absent (plain text)", items.size(), P, p.tokens.size(), p.filler_sentences,
                    p.needle_token, p.depth, p.depth_requested, pieces.c_str());
    }

    FILE * rows = append_file(o.passkey_csv, "method,profile,budget,context,prompt,depth_requested,depth,prompt_tokens,"
                                             "needle_token,key,answer,correct,digit_accuracy,steps,attn_rel_err,"
                                             "decode_ms_per_token,prefill_s\n");

    llama_batch batch = llama_batch_init(P, 0, 1);
    double prefill_total = 0.0;
    for (const Item & it : items) {
        const PasskeyPrompt & p = it.p;
        const int n = (int) p.tokens.size();
        const int Pf = n - 1;  // prefilled densely; the last prompt token goes through the method

        llama_memory_clear(mem, true);
        std::fill(hook.pk_n.begin(), hook.pk_n.end(), 0);
        std::fill(hook.pv_n.begin(), hook.pv_n.end(), 0);
        std::fill(hook.pq_n.begin(), hook.pq_n.end(), 0);
        const double t0 = now_s();
        const int chunk = o.prefill_chunk > 0 ? o.prefill_chunk : P;
        for (int start = 0; start < Pf; start += chunk) {
            const int cnt = std::min(chunk, Pf - start);
            batch.n_tokens = cnt;
            for (int i = 0; i < cnt; ++i) {
                batch.token[i] = p.tokens[start + i];
                batch.pos[i] = start + i;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = 0;
                batch.logits[i] = start + i == Pf - 1;
            }
            hook.phase = Hook::Phase::Prefill;
            hook.n_tokens = cnt;
            if (llama_decode(ctx, batch) != 0) throw std::runtime_error("prefill failed");
            llama_synchronize(ctx);
        }
        const double prefill_s = now_s() - t0;
        prefill_total += prefill_s;
        hook.phase = Hook::Phase::Off;
        if (!hook.error.empty()) throw std::runtime_error(hook.error);
        for (int l = 0; l < L; ++l)
            if (hook.pk_n[l] != Pf || hook.pv_n[l] != Pf || hook.pq_n[l] != std::min(o.q_tail, Pf))
                throw std::runtime_error("prefill capture incomplete at layer " + std::to_string(l));
        std::printf("prompt %d (depth %.2f, key %s): %d tokens, needle at %d (%.3f), prefill %.1f s\n", it.index,
                    p.depth_requested, p.key.c_str(), n, p.needle_token, p.depth, prefill_s);

        for (auto & c : configs) {
            if (!llama_memory_seq_rm(mem, 0, Pf, -1)) throw std::runtime_error("cannot trim the KV cache");
            c.impl->begin_sequence(s);
            for (int l = 0; l < L; ++l)
                c.impl->calibrate(l, hook.pk[l].data(), hook.pv[l].data(), Pf, hook.pq[l].data(), hook.pq_n[l]);
            hook.method = c.impl.get();
            hook.rel_err_sum = hook.rel_err_max = 0.0;
            hook.rel_err_n = 0;

            std::string answer;
            llama_token next = p.tokens[Pf];
            int steps = 0;
            const double t1 = now_s();
            for (int i = 0; i < o.passkey_new; ++i) {
                batch.n_tokens = 1;
                batch.token[0] = next;
                batch.pos[0] = Pf + i;
                hook.pos = Pf + i;
                batch.n_seq_id[0] = 1;
                batch.seq_id[0][0] = 0;
                batch.logits[0] = true;
                hook.phase = Hook::Phase::Decode;
                hook.n_tokens = 1;
                hook.outs_this_step = 0;
                if (llama_decode(ctx, batch) != 0) throw std::runtime_error("decode failed");
                hook.phase = Hook::Phase::Off;
                if (!hook.error.empty()) throw std::runtime_error(hook.error);
                if (hook.outs_this_step != L)
                    throw std::runtime_error("saw " + std::to_string(hook.outs_this_step) + " kqv_out tensors, expected " +
                                             std::to_string(L));
                steps += 1;
                const float * logits = llama_get_logits_ith(ctx, -1);
                llama_token g = 0;
                for (int v = 1; v < n_vocab; ++v)
                    if (logits[v] > logits[g]) g = v;
                if (llama_vocab_is_eog(vocab, g)) break;
                answer += piece(g);
                if (digit_run_complete(answer)) break;
                next = g;
            }
            const double dt = now_s() - t1;
            const bool correct = first_digit_run(answer) == p.key;
            const double dacc = digit_accuracy(answer, p.key);
            c.pk_prompts += 1;
            c.pk_correct += correct;
            c.pk_digits += dacc;
            c.decode_s += dt;
            c.n_scored += steps;
            c.rel_err_sum += hook.rel_err_sum;
            c.rel_err_max = std::max(c.rel_err_max, hook.rel_err_max);
            c.rel_err_n += hook.rel_err_n;
            const double rel = hook.rel_err_n ? hook.rel_err_sum / (double) hook.rel_err_n : NAN;
            std::printf("  %-14s %-6s %-24s %s\n", c.method.c_str(), c.budget_label.c_str(), csv_field(answer).c_str(),
                        correct ? "ok" : "MISS");
            if (rows) {
                std::fprintf(rows, "%s,%s,%s,%d,%d,%.2f,%.4f,%d,%d,%s,%s,%d,%.3f,%d,%.3e,%.2f,%.2f\n", c.method.c_str(),
                             c.impl->profile().c_str(), c.budget_label.c_str(), P, it.index, p.depth_requested, p.depth, n,
                             p.needle_token, p.key.c_str(), csv_field(answer).c_str(), correct ? 1 : 0, dacc, steps, rel,
                             1000.0 * dt / std::max(1, steps), prefill_s);
                std::fflush(rows);
            }
            // Every method keeps its own copy of the prompt's keys and values: a fresh instance frees it, so
            // that one method's state is held at a time (Gemma at 32K: about 1.5 GB per method).
            c.impl = c.make();
        }
    }
    llama_batch_free(batch);
    if (rows) std::fclose(rows);

    FILE * csv = append_file(o.csv, "method,profile,budget,context,prompts,correct,accuracy,digit_accuracy,budget_tokens,"
                                    "attn_rel_err,decode_ms_per_token,prefill_s\n");
    std::printf("\npasskey: %zu prompt(s), context %d, prefill %.1f s per prompt\n", items.size(), P,
                prefill_total / items.size());
    std::printf("%-14s %-6s %8s %9s %12s %10s\n", "method", "budget", "correct", "digits", "attn_relerr", "ms/token");
    for (const auto & c : configs) {
        const double rel = c.rel_err_n ? c.rel_err_sum / (double) c.rel_err_n : NAN;
        const double ms = 1000.0 * c.decode_s / std::max<int64_t>(1, c.n_scored);
        std::printf("%-14s %-6s %3d/%-4d %9.3f %12.3e %10.1f\n", c.method.c_str(), c.budget_label.c_str(), c.pk_correct,
                    c.pk_prompts, c.pk_digits / c.pk_prompts, rel, ms);
        if (csv)
            std::fprintf(csv, "%s,%s,%s,%d,%d,%d,%.4f,%.4f,%d,%.3e,%.2f,%.2f\n", c.method.c_str(),
                         c.impl->profile().c_str(), c.budget_label.c_str(), P, c.pk_prompts, c.pk_correct,
                         (double) c.pk_correct / c.pk_prompts, c.pk_digits / c.pk_prompts, c.budget, rel, ms,
                         prefill_total / items.size());
    }
    if (csv) std::fclose(csv);
    std::string wl;
    for (int l = 0; l < L; ++l)
        if (hook.windowed[l]) wl += (wl.empty() ? "" : ",") + std::to_string(l);
    std::printf("layers with a sliding window (llama.cpp's own attention kept under every method): %s\n",
                wl.empty() ? "none" : wl.c_str());
    return 0;
}

// One teacher-forced decode block or prompt chunk: tokens[0..n) at positions pos.., logits for every one of
// them, the method substituted at every layer (one ubatch: n is at most n_ubatch).
void decode_block(llama_context * ctx, llama_batch & batch, Hook & hook, const llama_token * tokens, int pos, int n) {
    batch.n_tokens = n;
    for (int j = 0; j < n; ++j) {
        batch.token[j] = tokens[j];
        batch.pos[j] = pos + j;
        batch.n_seq_id[j] = 1;
        batch.seq_id[j][0] = 0;
        batch.logits[j] = true;
    }
    hook.pos = pos;
    hook.phase = Hook::Phase::Decode;
    hook.n_tokens = n;
    hook.outs_this_step = 0;
    if (llama_decode(ctx, batch) != 0) throw std::runtime_error("decode failed");
    hook.phase = Hook::Phase::Off;
    if (!hook.error.empty()) throw std::runtime_error(hook.error);
    const int L = hook.shape.n_layer;
    if (hook.outs_this_step != L)
        throw std::runtime_error("saw " + std::to_string(hook.outs_this_step) + " kqv_out tensors, expected " +
                                 std::to_string(L));
}

int run(const Options & o) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines appear as they happen
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(o.model.c_str(), mp);
    if (!model) throw std::runtime_error("cannot load model " + o.model);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    const bool passkey = !o.passkey_depths.empty();
    // text -> tokens
    std::vector<llama_token> tok;
    int n_tok = 0;
    if (!passkey) {
        std::ifstream in(o.text, std::ios::binary);
        if (!in) throw std::runtime_error("cannot read " + o.text);
        const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        tok.resize(text.size() + 16);
        n_tok = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tok.data(), (int32_t) tok.size(), false, false);
        if (n_tok < 0) throw std::runtime_error("tokenization failed");
        tok.resize(n_tok);
    }

    // A model that expects a BOS token gets one at the start of every window (each window is a
    // sequence of its own); the window then takes one token less of the text.
    const bool add_bos = llama_vocab_get_add_bos(vocab);
    const llama_token bos = llama_vocab_bos(vocab);
    const int P = o.context, D = o.decode, span = P + D + 1;
    const int windows = passkey ? 1 : std::min(o.windows, (n_tok - o.offset) / span);
    if (windows < 1) throw std::runtime_error("text too short: " + std::to_string(n_tok) + " tokens");

    Hook hook;
    hook.shape.n_layer = llama_model_n_layer(model);
    hook.shape.n_q_heads = llama_model_n_head(model);
    hook.shape.n_kv_heads = llama_model_n_head_kv(model);
    hook.shape.head_dim = model_head_dim(model, hook.shape.n_q_heads);
    refuse_unsupported_attention(model);
    hook.shape.scale = 1.0f / std::sqrt((float) hook.shape.head_dim);
    hook.q_tail = o.q_tail;
    hook.dense_layers = o.dense_layers;
    const ModelShape & s = hook.shape;
    const int L = s.n_layer;
    hook.pk.assign(L, {}); hook.pv.assign(L, {}); hook.pq.assign(L, {});
    hook.pk_n.assign(L, 0); hook.pv_n.assign(L, 0); hook.pq_n.assign(L, 0);
    const int max_rows = std::max(kMaxBlock, o.chunked_prefill);  // a decode block or a prompt chunk
    hook.dq.assign(L, std::vector<float>((size_t) max_rows * s.n_q_heads * s.head_dim));
    hook.dk.assign(L, std::vector<float>((size_t) max_rows * s.n_kv_heads * s.head_dim));
    hook.dv.assign(L, std::vector<float>((size_t) max_rows * s.n_kv_heads * s.head_dim));
    hook.seen.assign(L, 0);
    hook.windowed.assign(L, 0);
    hook.out.resize((size_t) max_rows * s.n_q_heads * s.head_dim);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) ((P + D + 1 + 255) / 256 * 256);
    // Dense prefill tokens: the whole prompt, or the first chunk, which every method calibrates from.
    const int P0 = o.chunked_prefill > 0 ? o.chunked_prefill : P;
    const int chunk = passkey && o.prefill_chunk > 0 ? std::min(o.prefill_chunk, P) : P0;
    cp.n_batch = (uint32_t) chunk;
    cp.n_ubatch = (uint32_t) chunk;  // one ubatch: the prefill (and each later chunk) is one graph
    cp.n_seq_max = 1;
    cp.n_threads = o.threads;
    cp.n_threads_batch = o.threads;
    cp.flash_attn_type = o.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = o.kv_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
    cp.type_v = o.kv_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
    cp.cb_eval = eval_cb;
    cp.cb_eval_user_data = &hook;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) throw std::runtime_error("cannot create the llama context");
    llama_memory_t mem = llama_get_memory(ctx);

    std::printf("model: %d layers, %d q heads, %d kv heads, head_dim %d, vocab %d\n", L, s.n_q_heads, s.n_kv_heads,
                s.head_dim, n_vocab);
    std::printf("BOS: %s\n", add_bos ? "the model expects one; added at the start of every window" : "not added (the model does not ask for it)");
    if (!passkey)
    std::printf("text: %d tokens; %d window(s) of %d prefill + %d decode tokens from offset %d, %d per llama_decode; kv cache %s, flash attn %s, %d threads\n",
                n_tok, windows, P, D, o.offset, o.decode_block, o.kv_f16 ? "f16" : "f32", o.flash_attn ? "on" : "off", o.threads);
    if (P0 < P)
        std::printf("chunked prefill: %d tokens dense (calibration), then %d tokens through each method, %d per llama_decode\n",
                    P0, P - P0, P0);

    // method configurations: --configs pairs, else every method at every budget
    std::vector<std::pair<std::string, std::string>> pairs = o.configs;
    if (pairs.empty())
        for (const auto & m : o.methods) {
            if (m == "llama" || m == "dense" || m == "sikv_parity") pairs.emplace_back(m, "");
            else for (const auto & b : o.budgets) pairs.emplace_back(m, b);
        }
    std::vector<Config> configs;
    for (const auto & pair : pairs) {
        const std::string m = pair.first, b = pair.second;  // copies: the factories below keep them
        Config c;
        c.method = m;
        if (m == "llama" || m == "dense") {
            c.budget_label = "full";
            c.budget = P;
            c.make = [m] { return make_method(m, {}); };
        } else if (m == "sikv_parity") {  // the reference's fixed k = 100, no budget ratio
            c.budget_label = "k=100";
            c.budget = 100;
            c.make = [m, &o] { return make_library_method(m, o, ""); };
        } else if (b.empty()) {
            throw std::runtime_error("method " + m + " needs a budget");
        } else if (is_library(m)) {
            c.budget_label = b;
            c.budget = budget_tokens(b, P);
            c.make = [m, &o, b] { return make_library_method(m, o, b); };
        } else {
            BaselineParams bp;
            bp.n_sink = o.n_sink;
            bp.n_window = o.n_window;
            bp.page_size = o.page;
            bp.budget = budget_tokens(b, P);
            bp.recall = o.recall;
            c.budget_label = b;
            c.budget = bp.budget;
            c.make = [m, bp] { return make_method(m, bp); };
        }
        c.impl = c.make();
        configs.push_back(std::move(c));
    }

    if (passkey) {
        const int rc = run_passkey(o, model, ctx, hook, configs);
        llama_free(ctx);
        llama_model_free(model);
        llama_backend_free();
        return rc;
    }

    double prefill_s = 0.0;
    // Result rows are written as each configuration finishes its last window, so an interrupted run keeps
    // what it completed.
    FILE * csv = append_file(o.csv, "method,profile,budget,context,decode_tokens,perplexity,dense_perplexity,recall,"
                                    "budget_tokens,n_sink,n_window,windows,attended_tokens,attn_rel_err,attn_max_rel_err,"
                                    "prefill_s,decode_ms_per_token,kv_cache,flash_attn\n");
    FILE * layer_csv = append_file(o.layer_csv, "method,profile,budget,context,decode_tokens,layer,recall,samples\n");
    double dense_so_far = NAN;  // llama's perplexity once it has finished (study jobs list it first)
    auto write_rows = [&](const Config & c, int windows_done) {
        const double ppl = std::exp(c.nll / (double) c.n_scored);
        if (c.method == "llama") dense_so_far = ppl;
        const double rel = c.rel_err_n ? c.rel_err_sum / (double) c.rel_err_n : NAN;
        const double recall = c.st.recall_count ? c.st.recall_sum / (double) c.st.recall_count : NAN;
        const double attended = c.st.attended_count ? c.st.attended_sum / (double) c.st.attended_count : NAN;
        const double ms = 1000.0 * c.decode_s / (double) c.n_scored;
        const bool sparse = c.method != "llama" && c.method != "dense";
        if (csv) {
            std::fprintf(csv, "%s,%s,%s,%d,%d,%.6f,", c.method.c_str(), c.impl->profile().c_str(), c.budget_label.c_str(),
                         P, D, ppl);
            if (std::isnan(dense_so_far)) std::fprintf(csv, ","); else std::fprintf(csv, "%.6f,", dense_so_far);
            if (std::isnan(recall)) std::fprintf(csv, ","); else std::fprintf(csv, "%.6f,", recall);
            const bool parity = c.method == "sikv_parity";
            std::fprintf(csv, "%d,%d,%d,%d,", c.budget, sparse && !parity ? o.n_sink : 0,
                         sparse && !parity ? o.n_window : 0, windows_done);
            if (std::isnan(attended)) std::fprintf(csv, ","); else std::fprintf(csv, "%.1f,", attended);
            std::fprintf(csv, "%.3e,%.3e,%.3f,%.2f,%s,%s\n", rel, c.rel_err_max, prefill_s / windows_done, ms,
                         o.kv_f16 ? "f16" : "f32", o.flash_attn ? "on" : "off");
            std::fflush(csv);
        }
        if (layer_csv) {
            for (size_t l = 0; l < c.st.layer_recall_sum.size(); ++l)
                if (c.st.layer_recall_count[l] > 0)
                    std::fprintf(layer_csv, "%s,%s,%s,%d,%d,%zu,%.6f,%lld\n", c.method.c_str(),
                                 c.impl->profile().c_str(), c.budget_label.c_str(), P, D, l,
                                 c.st.layer_recall_sum[l] / (double) c.st.layer_recall_count[l],
                                 (long long) c.st.layer_recall_count[l]);
            std::fflush(layer_csv);
        }
    };

    llama_batch batch = llama_batch_init(P, 0, 1);
    FILE * nll_out = nullptr;
    if (!o.nll_file.empty()) {
        nll_out = std::fopen(o.nll_file.c_str(), "a");
        if (!nll_out) throw std::runtime_error("cannot write " + o.nll_file);
    }
    bool dumped = false;
    FILE * prefill_nll_out = nullptr;
    if (!o.prefill_nll_file.empty()) {
        prefill_nll_out = std::fopen(o.prefill_nll_file.c_str(), "a");
        if (!prefill_nll_out) throw std::runtime_error("cannot write " + o.prefill_nll_file);
    }
    // the dense prefill's own NLLs: logits for every prompt token (P x vocab floats)
    const bool dense_prefill_nll = prefill_nll_out && P0 == P;

    for (int w = 0; w < windows; ++w) {
        const int start = o.offset + w * span;
        std::vector<llama_token> win(tok.begin() + start, tok.begin() + start + span);
        if (add_bos) {
            win.insert(win.begin(), bos);
            win.pop_back();
        }
        const llama_token * wt = win.data();

        // dense prefill (of the first chunk with --chunked-prefill), capturing every layer's post-RoPE K, V
        // and the last queries
        llama_memory_clear(mem, true);
        batch.n_tokens = P0;
        for (int i = 0; i < P0; ++i) {
            batch.token[i] = wt[i];
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = i == P0 - 1 || dense_prefill_nll;
        }
        hook.phase = Hook::Phase::Prefill;
        hook.n_tokens = P0;
        std::fill(hook.pk_n.begin(), hook.pk_n.end(), 0);
        std::fill(hook.pv_n.begin(), hook.pv_n.end(), 0);
        std::fill(hook.pq_n.begin(), hook.pq_n.end(), 0);
        double t0 = now_s();
        if (llama_decode(ctx, batch) != 0) throw std::runtime_error("prefill failed");
        llama_synchronize(ctx);
        prefill_s += now_s() - t0;
        hook.phase = Hook::Phase::Off;
        if (!hook.error.empty()) throw std::runtime_error(hook.error);
        std::printf("window %d/%d: prefill %.3f s\n", w + 1, windows, now_s() - t0);
        for (int l = 0; l < L; ++l)
            if (hook.pk_n[l] != P0 || hook.pv_n[l] != P0 || hook.pq_n[l] != std::min(o.q_tail, P0))
                throw std::runtime_error("prefill capture incomplete at layer " + std::to_string(l));
        if (dense_prefill_nll) {
            for (int i = 0; i < P; ++i)
                std::fprintf(prefill_nll_out, "llama,full,%d,%d,%d,%.9f\n", P, start, i,
                             nll_of(llama_get_logits_ith(ctx, i), n_vocab, wt[i + 1]));
            std::fflush(prefill_nll_out);
        }

        for (auto & c : configs) {
            if (!llama_memory_seq_rm(mem, 0, P0, -1)) throw std::runtime_error("cannot trim the KV cache");
            c.impl->begin_sequence(s);
            for (int l = 0; l < L; ++l)
                c.impl->calibrate(l, hook.pk[l].data(), hook.pv[l].data(), P0, hook.pq[l].data(), hook.pq_n[l]);
            hook.method = c.impl.get();
            hook.rel_err_sum = hook.rel_err_max = 0.0;
            hook.rel_err_n = 0;

            if (P0 < P) {
                // the rest of the prompt, P0 tokens per llama_decode, through the method; the logits of
                // position pos are scored against token pos + 1 (the last against the first decode token)
                const double tc = now_s();
                double nll_w = 0.0;
                for (int c0 = P0; c0 < P; c0 += P0) {
                    const int n = std::min(P0, P - c0);
                    decode_block(ctx, batch, hook, wt + c0, c0, n);
                    for (int j = 0; j < n; ++j) {
                        const double nll = nll_of(llama_get_logits_ith(ctx, j), n_vocab, wt[c0 + j + 1]);
                        nll_w += nll;
                        if (prefill_nll_out)
                            std::fprintf(prefill_nll_out, "%s,%s,%d,%d,%d,%.9f\n", c.method.c_str(),
                                         c.budget_label.c_str(), P, start, c0 + j, nll);
                    }
                }
                const double dt = now_s() - tc;
                c.chunk_s += dt;
                c.prefill_nll += nll_w;
                c.prefill_scored += P - P0;
                c.chunk_rel_sum += hook.rel_err_sum;
                c.chunk_rel_max = std::max(c.chunk_rel_max, hook.rel_err_max);
                c.chunk_rel_n += hook.rel_err_n;
                std::printf("  window %d %-12s %-6s chunked prefill of %d tokens: %.1f s, prefill ppl %.5f, attn rel err "
                            "%.3e (%lld rows)\n", w + 1, c.method.c_str(), c.budget_label.c_str(), P - P0, dt,
                            std::exp(nll_w / (double) (P - P0)), hook.rel_err_n ? hook.rel_err_sum / hook.rel_err_n : NAN,
                            (long long) hook.rel_err_n);
                if (prefill_nll_out) std::fflush(prefill_nll_out);
                hook.rel_err_sum = hook.rel_err_max = 0.0;
                hook.rel_err_n = 0;
            }

            double t1 = now_s();
            for (int i = 0; i < D; i += o.decode_block) {
                const int n = std::min(o.decode_block, D - i);
                hook.dump = o.dump_names && !dumped;
                if (hook.dump) std::printf("graph nodes of one decode step (%s):\n", c.method.c_str());
                decode_block(ctx, batch, hook, wt + P + i, P + i, n);
                if (hook.dump) dumped = true;
                hook.dump = false;
                // logits of row j predict token P + i + j + 1: the same tokens as one-by-one decode
                for (int j = 0; j < n; ++j) {
                    const double nll = nll_of(llama_get_logits_ith(ctx, j), n_vocab, wt[P + i + j + 1]);
                    c.nll += nll;
                    c.n_scored += 1;
                    if (nll_out)
                        std::fprintf(nll_out, "%s,%s,%d,%d,%d,%.9f\n", c.method.c_str(), c.budget_label.c_str(), P,
                                     start, i + j, nll);
                }
            }
            c.decode_s += now_s() - t1;
            c.rel_err_sum += hook.rel_err_sum;
            c.rel_err_max = std::max(c.rel_err_max, hook.rel_err_max);
            c.rel_err_n += hook.rel_err_n;
            std::printf("  window %d %-12s %-6s ppl so far %.5f, %.1f ms/token\n", w + 1, c.method.c_str(),
                        c.budget_label.c_str(), std::exp(c.nll / (double) c.n_scored),
                        1000.0 * c.decode_s / (double) c.n_scored);
            c.st.merge(c.impl->stats());
            if (!c.impl->note().empty()) std::printf("  window %d %-12s %s\n", w + 1, c.method.c_str(), c.impl->note().c_str());
            if (nll_out) std::fflush(nll_out);
            if (w == windows - 1) write_rows(c, windows);
        }
        std::printf("window %d/%d done (start token %d)\n", w + 1, windows, start);
    }
    llama_batch_free(batch);
    if (nll_out) std::fclose(nll_out);
    if (prefill_nll_out) std::fclose(prefill_nll_out);
    if (csv) std::fclose(csv);
    if (layer_csv) std::fclose(layer_csv);

    // report
    double dense_ppl = NAN;
    for (const auto & c : configs)
        if (c.method == "llama") dense_ppl = std::exp(c.nll / (double) c.n_scored);

    std::printf("\nprefill: %.3f s per window of %d tokens\n", prefill_s / windows, P);
    std::printf("%-12s %-6s %6s %11s %9s %8s %9s %12s %12s %10s\n", "method", "budget", "tokens", "perplexity", "vs dense",
                "recall", "attended", "attn_relerr", "attn_maxerr", "ms/token");
    for (const auto & c : configs) {
        const double ppl = std::exp(c.nll / (double) c.n_scored);
        const double rel = c.rel_err_n ? c.rel_err_sum / (double) c.rel_err_n : NAN;
        const double recall = c.st.recall_count ? c.st.recall_sum / (double) c.st.recall_count : NAN;
        const double attended = c.st.attended_count ? c.st.attended_sum / (double) c.st.attended_count : NAN;
        std::printf("%-12s %-6s %6d %11.5f %+8.4f%% %8.4f %9.1f %12.3e %12.3e %10.2f\n", c.method.c_str(),
                    c.budget_label.c_str(), c.budget, ppl, 100.0 * (ppl / dense_ppl - 1.0), recall, attended, rel,
                    c.rel_err_max, 1000.0 * c.decode_s / (double) c.n_scored);
    }

    if (P0 < P) {
        std::printf("\nchunked prefill: positions %d..%d, %d per llama_decode\n", P0, P - 1, P0);
        std::printf("%-12s %-6s %14s %12s %12s %10s\n", "method", "budget", "prefill ppl", "attn_relerr", "attn_maxerr",
                    "s/window");
        for (const auto & c : configs)
            std::printf("%-12s %-6s %14.5f %12.3e %12.3e %10.1f\n", c.method.c_str(), c.budget_label.c_str(),
                        std::exp(c.prefill_nll / (double) c.prefill_scored),
                        c.chunk_rel_n ? c.chunk_rel_sum / (double) c.chunk_rel_n : NAN, c.chunk_rel_max,
                        c.chunk_s / windows);
    }

    std::string wl;
    for (int l = 0; l < L; ++l)
        if (hook.windowed[l]) wl += (wl.empty() ? "" : ",") + std::to_string(l);
    std::printf("layers with a sliding window (llama.cpp's own attention kept under every method): %s\n",
                wl.empty() ? "none" : wl.c_str());

    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    try {
        return run(parse(argc, argv));
    } catch (const std::exception & e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
