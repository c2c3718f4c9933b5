// bench/guided_json_bench.cpp — time per json_allowed_tokens mask on a large synthetic BPE-like vocabulary.
//
//   guided_json_bench                          # --vocab 128000 --reps 20
//   guided_json_bench --vocab 32000 --reps 50 --seed 3
//
// Invariants:
//   1. The vocabulary is built in code from --seed: the 256 single bytes, JSON pieces ({" ": ", ...),
//      whitespace runs, numbers, words with and without a leading space / quote / capital, CJK characters
//      (3-byte UTF-8) and partial UTF-8 bytes, deduplicated, until --vocab tokens.
//   2. States (json_object grammar): inside a string value, right after '{', inside a number value; plus
//      inside a key and a schema's string property. Each is timed --reps times after one warm-up call on one
//      thread; the median and the minimum are printed with the number of allowed tokens.
//   3. The baseline, in the same run: every token checked on its own (a copy of the matcher advanced over
//      its bytes), --reps / 5 times; its mask must equal the trie walk's (else exit 1).
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include "elastic/engine/guided_json.h"

using namespace troupe::elastic;

namespace {

std::vector<std::string> synthetic_vocab(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> v;
  std::unordered_set<std::string> seen;
  auto add = [&](std::string s) {
    if (static_cast<int64_t>(v.size()) < n && !s.empty() && seen.insert(s).second) v.push_back(std::move(s));
  };
  for (int b = 0; b < 256; ++b) add(std::string(1, static_cast<char>(b)));
  for (const char* s :
       {"{\"", "\":", "\",",  "\"}",   "\"]",  "\":\"", "\",\"",  "\": \"", "\", \"", "},",   "}]",  "]}",
        "[{",  "[\"", "true", "false", "null", " true", " false", " null",  "\\n",    "\\\"", "\\u", "\\\\"})
    add(s);
  for (int k = 2; k <= 64; k *= 2) {
    add(std::string(k, ' '));
    std::string indent(size_t(k) + 1, ' ');
    indent[0] = '\n';
    add(std::move(indent));
  }
  for (int i = 0; i < 1000; ++i) add(std::to_string(i));
  const std::string consonants = "bcdfghjklmnprstvwz", vowels = "aeiou";
  std::uniform_int_distribution<int> kind(0, 99);
  while (static_cast<int64_t>(v.size()) < n) {
    const int k = kind(rng);
    if (k < 8) {  // CJK: 1-2 characters U+4E00..U+9FFF
      std::string s;
      for (int c = 0, m = 1 + int(rng() % 2); c < m; ++c) {
        const uint32_t cp = 0x4E00 + uint32_t(rng() % 0x5200);
        s += char(0xE0 | (cp >> 12)), s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
      }
      add(s);
      continue;
    }
    if (k < 10) {  // partial UTF-8: a lead byte with part of its continuation
      add(std::string{char(0xE4 + rng() % 8), char(0x80 + rng() % 64)});
      continue;
    }
    std::string w;
    for (int syl = 0, m = 1 + int(rng() % 4); syl < m; ++syl)
      w += consonants[rng() % consonants.size()], w += vowels[rng() % vowels.size()];
    if (rng() % 3 == 0) w += consonants[rng() % consonants.size()];
    if (k < 55)
      w = " " + w;
    else if (k < 62)
      w[0] = char(w[0] - 'a' + 'A');
    else if (k < 68)
      w = "\"" + w;
    else if (k < 72)
      w += "\":";
    add(w);
  }
  return v;
}

struct timing {
  double median_ms, min_ms;
  int64_t allowed;
};

timing time_masks(const json_matcher& m, const token_trie& t, int reps) {
  std::vector<uint8_t> mask;
  json_allowed_tokens(m, t, mask);  // warm-up
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    json_allowed_tokens(m, t, mask);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  int64_t allowed = 0;
  for (uint8_t x : mask) allowed += x;
  return {ms[ms.size() / 2], ms.front(), allowed};
}

// The baseline: every token checked on its own (a copy of the matcher advanced over its bytes).
// Returns the median ms per mask and checks that it equals the trie walk's mask.
double time_brute_force(const json_matcher& m, const std::vector<std::string>& tokens, int reps,
                        const token_trie& t) {
  std::vector<uint8_t> mask(tokens.size()), walk;
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < tokens.size(); ++i) {
      json_matcher c = m;
      mask[i] = !tokens[i].empty() && c.advance(std::string_view(tokens[i]));
    }
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  json_allowed_tokens(m, t, walk);
  if (walk != mask) {
    fmt::print(stderr, "the trie walk's mask differs from the brute-force mask\n");
    std::exit(1);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t vocab = 128000, reps = 20;
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    auto value = [&](const char* name) {
      if (i + 1 >= argc) {
        fmt::print(stderr, "{} needs a value\n", name);
        std::exit(2);
      }
      char* end = nullptr;
      const long long x = std::strtoll(argv[++i], &end, 10);
      if (*end != '\0' || x < 1) {
        fmt::print(stderr, "{}: '{}' is not a positive integer\n", name, argv[i]);
        std::exit(2);
      }
      return static_cast<int64_t>(x);
    };
    if (!std::strcmp(argv[i], "--vocab"))
      vocab = value("--vocab");
    else if (!std::strcmp(argv[i], "--reps"))
      reps = value("--reps");
    else if (!std::strcmp(argv[i], "--seed"))
      seed = static_cast<uint64_t>(value("--seed"));
    else {
      fmt::print(stderr, "usage: guided_json_bench [--vocab N] [--reps N] [--seed N]\n");
      return 2;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  const auto tokens = synthetic_vocab(vocab, seed);
  const token_trie trie(tokens);
  const double build_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  int64_t bytes = 0;
  for (const auto& s : tokens) bytes += static_cast<int64_t>(s.size());
  fmt::print("vocab {} tokens, {} bytes, trie {} nodes, built in {:.1f} ms (vocab + trie)\n", trie.vocab_size(), bytes,
             trie.num_nodes(), build_ms);

  const auto any = json_grammar::any_object();
  const auto schema = json_grammar::from_schema(nlohmann::json::parse(
      R"({"type":"object","properties":{"name":{"type":"string","maxLength":200},"age":{"type":"integer"}},
          "required":["name","age"],"additionalProperties":false})"));
  struct state {
    const char* name;
    std::shared_ptr<const json_grammar> g;
    const char* prefix;
  };
  const state states[] = {
      {"inside a string", any, "{\"a\": \"hello "},
      {"after '{'", any, "{"},
      {"inside a number", any, "{\"a\": 12"},
      {"inside a key", any, "{\"ke"},
      {"schema: string maxLength 200", schema, "{\"name\": \"Jo"},
  };
  fmt::print("| state | prefix | allowed tokens | median ms/mask | min ms/mask | per-token baseline ms | speed-up |\n"
             "|---|---|---|---|---|---|---|\n");
  for (const state& s : states) {
    json_matcher m(s.g);
    if (!m.advance(std::string_view(s.prefix))) {
      fmt::print(stderr, "prefix {} rejected\n", s.prefix);
      return 1;
    }
    const timing t = time_masks(m, trie, static_cast<int>(reps));
    const double base = time_brute_force(m, tokens, std::max(1, static_cast<int>(reps) / 5), trie);
    fmt::print("| {} | `{}` | {} | {:.3f} | {:.3f} | {:.3f} | {:.1f}x |\n", s.name, s.prefix, t.allowed, t.median_ms,
               t.min_ms, base, base / t.median_ms);
  }
  return 0;
}
