// Unit test of the passkey prompts and scoring (no model needed): a toy tokenizer stands in for the
// model's (a word with its leading space is one token, every digit and every other character one token,
// a BOS token first), a toy template for the chat template.
#include "passkey.h"

#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using namespace sikv_eval;

static int g_pass = 0, g_fail = 0;

static void check(bool ok, const std::string & what) {
    if (ok) ++g_pass;
    else { ++g_fail; std::printf("FAIL: %s\n", what.c_str()); }
}

struct ToyTokenizer {
    std::map<std::string, int32_t> ids;
    std::vector<std::string> pieces;
    int32_t id(const std::string & p) {
        auto it = ids.find(p);
        if (it != ids.end()) return it->second;
        ids.emplace(p, (int32_t) pieces.size());
        pieces.push_back(p);
        return (int32_t) pieces.size() - 1;
    }
    std::vector<int32_t> operator()(const std::string & s) {
        std::vector<int32_t> out{id("<bos>")};
        auto alpha = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
        std::size_t i = 0;
        while (i < s.size()) {
            std::size_t j = i;
            if (s[j] == ' ' && j + 1 < s.size() && alpha(s[j + 1])) ++j;  // " word"
            if (alpha(s[j])) {
                while (j < s.size() && alpha(s[j])) ++j;
            } else {
                j = i + 1;
            }
            out.push_back(id(s.substr(i, j - i)));
            i = j;
        }
        return out;
    }
};

int main() {
    ToyTokenizer toy;
    const Tokenize tokenize = [&](const std::string & s) { return toy(s); };
    const WrapUser wrap = [](const std::string & u) { return "<user>\n" + u + "<end>\n<assistant>\n"; };

    // keys: fixed seed, the requested number of digits, no leading zero, distinct
    std::set<std::string> keys;
    for (int i = 0; i < 40; ++i) {
        const std::string k = passkey_key(7, i, 5);
        check(k.size() == 5 && k[0] != '0', "key " + k + " has 5 digits, no leading zero");
        check(k == passkey_key(7, i, 5), "key is deterministic");
        keys.insert(k);
    }
    check(keys.size() >= 39, "keys differ");
    check(passkey_key(7, 0, 5) != passkey_key(8, 0, 5), "another seed gives other keys");

    // the filler holds no digit: the key is the only number in the prompt
    for (int i = 0; i < 16; ++i)
        for (char c : passkey_filler_sentence(i)) check(!(c >= '0' && c <= '9'), "filler without digits");

    for (int max_tokens : {300, 1000, 4096}) {
        for (double depth : {0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0}) {
            const std::string key = passkey_key(3, (int) (depth * 10), 5);
            const PasskeyPrompt p = make_passkey_prompt(tokenize, wrap, max_tokens, depth, key);
            const std::string tag = "P=" + std::to_string(max_tokens) + " depth " + std::to_string(depth) + ": ";
            check((int) p.tokens.size() <= max_tokens, tag + "fits");
            // the longest that fits: one more sentence does not
            const int n = p.filler_sentences;
            const std::string more = wrap(passkey_user_message(key, n + 1, (int) std::lround(depth * (n + 1)))) +
                                     passkey_answer_start();
            check((int) toy(more).size() > max_tokens, tag + "no room for another sentence");
            // the needle sits where the tokens say, at the requested depth of the filler
            std::string from;
            for (std::size_t t = p.needle_token; t < p.tokens.size() && from.size() < 40; ++t)
                from += toy.pieces[p.tokens[t]];
            const std::string needle = passkey_needle(key);
            check(from.find(needle.substr(0, 20)) <= 1, tag + "needle at its token: '" + from + "'");
            const int m = (int) std::lround(depth * n);
            check(p.text.find(passkey_user_message(key, n, m).substr(0, 40)) != std::string::npos,
                  tag + "intro in the text");
            // filler sentences before the needle: the full stops between the intro and the needle
            const std::size_t body = p.text.find(passkey_intro()) + passkey_intro().size();
            const std::string pre = p.text.substr(body, p.text.find(needle) - body);
            int sentences_before = 0;
            for (std::size_t at = pre.find('.'); at != std::string::npos; at = pre.find('.', at + 1)) ++sentences_before;
            check(sentences_before == m, tag + "needle after round(depth * n) sentences");
            if (max_tokens >= 1000)
                check(std::fabs(p.depth - depth) < 0.05, tag + "token depth " + std::to_string(p.depth));
            // the key occurs once, as its digits one token each, and the text ends with the answer start
            check(p.text.find(key) == p.text.rfind(key), tag + "key once");
            const std::string tail = passkey_answer_start();
            check(p.text.size() >= tail.size() && p.text.compare(p.text.size() - tail.size(), tail.size(), tail) == 0,
                  tag + "ends with the answer start");
            check(p.text.compare(0, 7, "<user>\n") == 0, tag + "template applied");
            check(p.tokens[0] == toy.id("<bos>"), tag + "BOS first");
        }
    }
    bool threw = false;
    try { make_passkey_prompt(tokenize, wrap, 20, 0.5, "12345"); } catch (const std::runtime_error &) { threw = true; }
    check(threw, "a context too small for the prompt is refused");

    // scoring
    check(first_digit_run(" 48213.") == "48213", "first digit run");
    check(first_digit_run(" is 482 13") == "482", "first run only");
    check(first_digit_run(" none") == "", "no digits");
    check(digit_accuracy(" 48213", "48213") == 1.0, "all digits");
    check(digit_accuracy(" 48299", "48213") == 0.6, "three of five digits");
    check(digit_accuracy(" 4821", "48213") == 0.8, "short answer");
    check(digit_accuracy(" no", "48213") == 0.0, "no answer");
    check(!digit_run_complete(" 4821"), "run still open");
    check(digit_run_complete(" 48213."), "run closed");
    check(!digit_run_complete(" the"), "no run yet");

    std::printf("passkey_test: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
