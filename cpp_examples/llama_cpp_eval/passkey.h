// Long-context retrieval ("passkey"): a number hidden at a given depth of a long filler text, the model
// then asked for it. This part builds the prompts and scores the answers; it needs no model (the
// tokenizer and the chat template come in as functions), so passkey_test.cpp checks it with a toy
// tokenizer. eval.cpp (--passkey-depths) runs the prompts through llama.cpp and the methods.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace sikv_eval {

// Text -> tokens, with the model's BOS rule applied (the harness: llama_tokenize with add_special as
// the vocabulary asks and parse_special, so that the chat template's markers become their tokens).
using Tokenize = std::function<std::vector<int32_t>(const std::string &)>;
// One user message -> the prompt text up to the start of the assistant's turn (the model's chat
// template; the identity for a model without one).
using WrapUser = std::function<std::string(const std::string &)>;

struct PasskeyPrompt {
    std::string key;              // the digits hidden in the text
    double depth_requested = 0;   // fraction of the filler before the needle
    std::string text;             // the whole prompt text (template applied, answer start appended)
    std::vector<int32_t> tokens;  // its tokens, at most max_tokens
    int needle_token = 0;         // index of the needle's first token in `tokens`
    double depth = 0;             // needle_token / tokens.size()
    int filler_sentences = 0;     // filler sentences in the text
};

// The line hidden in the filler, and the parts around it.
std::string passkey_needle(const std::string & key);
std::string passkey_intro();
std::string passkey_question();
std::string passkey_answer_start();  // appended after the template's assistant turn: the model continues it
// The i-th filler sentence (a cycle of neutral sentences without digits).
std::string passkey_filler_sentence(int i);

// The user message with n filler sentences and the needle after the first m of them.
std::string passkey_user_message(const std::string & key, int n, int m);

// The longest prompt of whole filler sentences that tokenizes to at most max_tokens, with the needle
// after round(depth * n) of its n sentences. Throws if even the prompt without filler is too long, or
// if the tokens before the needle differ from the tokenization of the text before it (the needle's
// position would then be unknown).
PasskeyPrompt make_passkey_prompt(const Tokenize & tokenize, const WrapUser & wrap, int max_tokens, double depth,
                                  const std::string & key);

// Key number i of a run: `digits` decimal digits, no leading zero, from a fixed seed (splitmix64, so
// the same on every platform and standard library).
std::string passkey_key(uint64_t seed, int i, int digits);

// The first run of decimal digits in an answer ("" if none).
std::string first_digit_run(const std::string & s);
// Digits of the answer's first digit run equal to the key's at the same position, over the key's length.
double digit_accuracy(const std::string & answer, const std::string & key);
// Generation may stop: a digit run has ended (a non-digit after at least one digit).
bool digit_run_complete(const std::string & answer);

}  // namespace sikv_eval
