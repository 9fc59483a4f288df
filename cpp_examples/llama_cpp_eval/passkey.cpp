// Passkey prompts and scoring (see passkey.h).
#include "passkey.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace sikv_eval {

namespace {

// Neutral sentences without digits, cycled to make the haystack.
const char * const kFiller[] = {
    "The morning train left the station on time.",
    "A gentle wind moved the leaves in the park.",
    "The baker put fresh loaves on the wooden shelf.",
    "Children walked to school along the river bank.",
    "The old clock in the hall struck the hour.",
    "Clouds drifted slowly over the quiet hills.",
    "A fisherman mended his nets beside the harbour wall.",
    "The library was warm and smelled of old paper.",
};
constexpr int kFillerCount = sizeof(kFiller) / sizeof(kFiller[0]);

uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

}  // namespace

std::string passkey_needle(const std::string & key) { return "The pass key is " + key + ". Remember it."; }

std::string passkey_intro() {
    return "Somewhere in the long text below a number is hidden. Find the number and keep it in mind: at the end "
           "you will be asked to repeat it.\n\n";
}

std::string passkey_question() { return "\n\nWhat is the pass key? Reply with the number only."; }

std::string passkey_answer_start() { return "The pass key is"; }

std::string passkey_filler_sentence(int i) { return kFiller[((i % kFillerCount) + kFillerCount) % kFillerCount]; }

std::string passkey_user_message(const std::string & key, int n, int m) {
    std::string body;
    for (int i = 0; i <= n; ++i) {
        if (i == m) body += (body.empty() ? "" : " ") + passkey_needle(key);
        if (i < n) body += (body.empty() ? "" : " ") + passkey_filler_sentence(i);
    }
    return passkey_intro() + body + passkey_question();
}

PasskeyPrompt make_passkey_prompt(const Tokenize & tokenize, const WrapUser & wrap, int max_tokens, double depth,
                                  const std::string & key) {
    if (!(depth >= 0.0 && depth <= 1.0)) throw std::runtime_error("passkey depth must be in [0, 1]");
    auto text_of = [&](int n) {
        const int m = (int) std::lround(depth * n);
        return wrap(passkey_user_message(key, n, m)) + passkey_answer_start();
    };
    auto count = [&](int n) { return (int) tokenize(text_of(n)).size(); };

    const int base = count(0);
    if (base > max_tokens)
        throw std::runtime_error("passkey prompt without filler has " + std::to_string(base) + " tokens, more than " +
                                 std::to_string(max_tokens));
    // estimate from 64 sentences, then step to the largest n that fits
    const int per64 = std::max(1, count(64) - base);
    int n = std::max(0, (int) ((double) (max_tokens - base) * 64.0 / per64));
    while (n > 0 && count(n) > max_tokens) n = std::max(0, n - std::max(1, (count(n) - max_tokens) * 64 / per64));
    while (count(n + 1) <= max_tokens) ++n;

    PasskeyPrompt p;
    p.key = key;
    p.depth_requested = depth;
    p.filler_sentences = n;
    p.text = text_of(n);
    p.tokens = tokenize(p.text);
    const std::size_t at = p.text.find(passkey_needle(key));
    if (at == std::string::npos) throw std::runtime_error("passkey needle missing from the prompt text");
    // the tokens before the needle: those of the text before it, with the needle's leading space, if any,
    // left to the needle's first token
    std::string before = p.text.substr(0, at);
    if (!before.empty() && before.back() == ' ') before.pop_back();
    const std::vector<int32_t> pre = tokenize(before);
    if (pre.size() > p.tokens.size() || !std::equal(pre.begin(), pre.end(), p.tokens.begin()))
        throw std::runtime_error("the prompt's tokens before the needle differ from the text before it");
    p.needle_token = (int) pre.size();
    p.depth = p.tokens.empty() ? 0.0 : (double) p.needle_token / (double) p.tokens.size();
    return p;
}

std::string passkey_key(uint64_t seed, int i, int digits) {
    if (digits < 1 || digits > 18) throw std::runtime_error("passkey digits must be 1..18");
    uint64_t lo = 1;
    for (int d = 1; d < digits; ++d) lo *= 10;
    const uint64_t span = lo * 9;  // [10^(d-1), 10^d)
    const uint64_t x = splitmix64(seed * 0x100000001b3ull + (uint64_t) i);
    return std::to_string(lo + x % span);
}

std::string first_digit_run(const std::string & s) {
    std::size_t i = 0;
    while (i < s.size() && !is_digit(s[i])) ++i;
    std::size_t j = i;
    while (j < s.size() && is_digit(s[j])) ++j;
    return s.substr(i, j - i);
}

double digit_accuracy(const std::string & answer, const std::string & key) {
    if (key.empty()) return 0.0;
    const std::string a = first_digit_run(answer);
    int hit = 0;
    for (std::size_t i = 0; i < key.size() && i < a.size(); ++i) hit += a[i] == key[i];
    return (double) hit / (double) key.size();
}

bool digit_run_complete(const std::string & answer) {
    bool seen = false;
    for (char c : answer) {
        if (is_digit(c)) seen = true;
        else if (seen) return true;
    }
    return false;
}

}  // namespace sikv_eval
