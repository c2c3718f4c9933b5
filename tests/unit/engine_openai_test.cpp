// What the serving engine (elastic/engine/engine.h) does for the OpenAI API, on the fixture
// models: logprobs of generated and prompt tokens equal log-softmax of decoder::forward_logits;
// n samples share the prompt's blocks and equal n single requests seeded seed + i; logit bias,
// min_tokens, guided JSON decoding, max_tokens 0 with prompt logprobs, and a text that never ends
// inside a UTF-8 character.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "elastic/engine/guided_json.h"
#include "engine_harness.h"

namespace {

using namespace troupe;
using namespace troupe::elastic;
using namespace troupe_test;

// log-softmax of decoder::forward_logits over `ids` (in double): (T, V).
std::vector<std::vector<double>> reference_logprobs(const parallel::decoder& dec, const std::vector<int32_t>& ids) {
  const auto T = static_cast<int64_t>(ids.size());
  const int64_t V = dec.config().vocab_size;
  const runtime::tensor logits = dec.forward_logits(ids.data(), 1, T);
  std::vector<std::vector<double>> out(static_cast<size_t>(T), std::vector<double>(static_cast<size_t>(V)));
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits.data<float>() + t * V;
    double m = -INFINITY, sum = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, double(row[v]));
    for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - m);
    for (int64_t v = 0; v < V; ++v) out[size_t(t)][size_t(v)] = double(row[v]) - m - std::log(sum);
  }
  return out;
}

engine_options small_blocks(int64_t blocks = 128) {
  engine_options o;
  o.block_size = 4;
  o.num_blocks = blocks;
  o.max_batch_tokens = 16;  // prompts in several chunks
  return o;
}

TEST(EngineOpenAi, LogprobsOfGeneratedTokensEqualTheModelsLogSoftmax) {
  harness h("llama_gqa", small_blocks());
  const int64_t V = h.dec->config().vocab_size;
  const auto prompt = prompt_of(13, 3, V);
  auto p = greedy_params(6);
  p.logprobs = 3;
  h.submit("a", prompt, p, 1, /*cumulative=*/true);
  h.run();
  const auto& c = h.out["a"];
  ASSERT_EQ(c.ids.size(), 6u);
  ASSERT_EQ(c.logprobs.size(), 6u);
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), c.ids.begin(), c.ids.end());
  const auto ref = reference_logprobs(*h.dec, all);
  double sum = 0;
  for (size_t k = 0; k < 6; ++k) {
    const auto& row = ref[prompt.size() - 1 + k];  // the distribution token k was drawn from
    EXPECT_EQ(c.logprobs[k].id, c.ids[k]);
    EXPECT_NEAR(c.logprobs[k].logprob, row[size_t(c.ids[k])], 2e-5) << "token " << k;
    ASSERT_EQ(c.logprobs[k].top.size(), 3u);
    EXPECT_EQ(c.logprobs[k].top[0].first, c.ids[k]);  // greedy: the most likely is the token
    for (const auto& [id, lp] : c.logprobs[k].top) EXPECT_NEAR(lp, row[size_t(id)], 2e-5);
    EXPECT_GE(c.logprobs[k].top[1].second, c.logprobs[k].top[2].second);
    sum += c.logprobs[k].logprob;
  }
  EXPECT_NEAR(c.cumulative_logprob, sum, 1e-6);
}

TEST(EngineOpenAi, PromptLogprobsCoverEveryPromptTokenEvenWhenItsBlocksAreCached) {
  harness h("mixtral_moe", small_blocks());
  const int64_t V = h.dec->config().vocab_size;
  const auto prompt = prompt_of(23, 5, V);
  h.submit("warm", prompt, greedy_params(1));  // caches the prompt's full blocks
  h.run();
  auto p = greedy_params(1);
  p.prompt_logprobs = 2;
  h.submit("echo", prompt, p);
  h.run();
  const auto& c = h.out["echo"];
  const auto ref = reference_logprobs(*h.dec, prompt);
  ASSERT_EQ(c.prompt_logprobs.size(), prompt.size());
  EXPECT_EQ(c.prompt_logprobs[0].id, prompt[0]);
  EXPECT_TRUE(std::isnan(c.prompt_logprobs[0].logprob));
  for (size_t t = 1; t < prompt.size(); ++t) {
    EXPECT_EQ(c.prompt_logprobs[t].id, prompt[t]);
    EXPECT_NEAR(c.prompt_logprobs[t].logprob, ref[t - 1][size_t(prompt[t])], 2e-5) << "position " << t;
    ASSERT_EQ(c.prompt_logprobs[t].top.size(), 2u);
    EXPECT_NEAR(c.prompt_logprobs[t].top[0].second, *std::max_element(ref[t - 1].begin(), ref[t - 1].end()), 2e-5);
  }
  EXPECT_EQ(c.ids, h.greedy(prompt, 1));  // the sampled token is unchanged by the extra rows
}

TEST(EngineOpenAi, MaxTokensZeroGivesThePromptLogprobsAlone) {
  harness h("llama_gqa", small_blocks());
  const auto prompt = prompt_of(9, 2, h.dec->config().vocab_size);
  auto p = greedy_params(0);
  p.prompt_logprobs = 0;
  h.submit("z", prompt, p);
  h.run();
  const auto& c = h.out["z"];
  EXPECT_EQ(c.reason, "length");
  EXPECT_TRUE(c.ids.empty());
  EXPECT_EQ(c.completion_tokens, 0);
  EXPECT_EQ(c.prompt_logprobs.size(), prompt.size());
  EXPECT_EQ(h.eng->stats().kv.blocks_used, 0);
  h.submit("z3", prompt, p, /*n=*/3);  // samples of nothing: each ends; sample 0 reports the prompt
  h.run();
  for (int i = 0; i < 3; ++i) {
    const auto& s = h.out["z3#" + std::to_string(i)];
    EXPECT_EQ(s.finished, 1);
    EXPECT_EQ(s.reason, "length");
    EXPECT_EQ(s.prompt_logprobs.size(), i == 0 ? prompt.size() : 0u);
  }
  auto bad = greedy_params(0);  // without prompt logprobs, 0 tokens is refused
  EXPECT_THROW(h.submit("bad", prompt, bad), runtime::error);
  h.out.erase("bad");
}

TEST(EngineOpenAi, SamplesOfOnePromptShareItsBlocksAndEqualSingleRequests) {
  for (bool prefix_caching : {false, true}) {
    auto o = small_blocks();
    o.prefix_caching = prefix_caching;
    sampling_params p;
    p.temperature = 1.0;
    p.seed = 77;
    p.max_tokens = 8;
    p.ignore_eos = true;
    const auto prompt = prompt_of(22, 9, 128);  // 5 full blocks of 4 + 2 tokens
    std::vector<std::vector<int32_t>> single;
    for (uint64_t i = 0; i < 3; ++i) {
      harness h("llama_gqa", o);
      auto q = p;
      q.seed = 77 + i;
      h.submit("one", prompt, q);
      h.run();
      single.push_back(h.out["one"].ids);
    }
    harness h("llama_gqa", o);
    h.submit("n", prompt, p, /*n=*/3);
    h.run();
    for (int i = 0; i < 3; ++i) {
      const auto& c = h.out["n#" + std::to_string(i)];
      EXPECT_EQ(c.ids, single[size_t(i)]) << "sample " << i << " prefix_caching " << prefix_caching;
      EXPECT_EQ(c.finished, 1);
    }
    EXPECT_NE(single[0], single[1]) << "different seeds should differ on a random model";
    // Sample 0 computes the 22 prompt tokens; samples 1 and 2 share its 5 full blocks (20 tokens)
    // and compute the last 2 each.
    EXPECT_EQ(h.eng->stats().computed_prompt_tokens, 22 + 2 * 2) << "prefix_caching " << prefix_caching;
    EXPECT_EQ(h.eng->stats().kv.blocks_used, 0);
  }
}

TEST(EngineOpenAi, LogitBiasAndMinTokensSteerTheTokens) {
  harness h("llama_gqa", small_blocks());
  const int64_t V = h.dec->config().vocab_size;
  const auto prompt = prompt_of(7, 4, V);
  auto biased = greedy_params(5);
  biased.logit_bias = {{42, 100.0f}};
  h.submit("bias", prompt, biased);
  const int32_t first = h.greedy(prompt, 1)[0];
  auto stop_first = greedy_params(6);
  stop_first.stop_token_ids = {first};
  h.submit("stop", prompt, stop_first);
  auto at_least = stop_first;
  at_least.min_tokens = 3;
  h.submit("min", prompt, at_least);
  h.run();
  EXPECT_EQ(h.out["bias"].ids, std::vector<int32_t>(5, 42));
  EXPECT_EQ(h.out["stop"].ids, std::vector<int32_t>{first});
  EXPECT_EQ(h.out["stop"].reason, "stop");
  const auto& m = h.out["min"];
  ASSERT_GE(m.ids.size(), 3u);
  for (size_t k = 0; k < 3; ++k) EXPECT_NE(m.ids[k], first) << "a stop token before min_tokens";
  auto bad = greedy_params(2);
  bad.logit_bias = {{static_cast<int32_t>(V), 1.0f}};
  EXPECT_THROW(h.submit("oov", prompt, bad), runtime::error);
  h.out.erase("oov");
}

TEST(EngineOpenAi, GuidedDecodingFollowsTheSchemaToTheEnd) {
  harness h("llama_gqa", small_blocks(256));  // a byte tokenizer: every ASCII byte is a token
  const auto prompt = prompt_of(6, 1, h.dec->config().vocab_size);
  const auto schema = nlohmann::json::parse(R"({"type": "object", "properties": {"ok": {"type": "boolean"},
      "n": {"type": "integer"}}, "required": ["ok", "n"], "additionalProperties": false})");
  for (uint64_t seed = 0; seed < 4; ++seed) {
    sampling_params p;
    p.temperature = 1.0;
    p.seed = seed;
    p.max_tokens = 400;  // enough for the object with the whitespace the grammar allows
    p.grammar = json_grammar::from_schema(schema);
    const std::string id = "g" + std::to_string(seed);
    h.submit(id, prompt, p);
  }
  auto any = greedy_params(60);
  any.grammar = json_grammar::any_object();
  h.submit("obj", prompt, any);
  h.run();
  for (uint64_t seed = 0; seed < 4; ++seed) {
    const auto& c = h.out["g" + std::to_string(seed)];
    EXPECT_EQ(c.reason, "stop") << c.text;
    nlohmann::json v;
    ASSERT_NO_THROW(v = nlohmann::json::parse(c.text)) << c.text;
    EXPECT_TRUE(v["ok"].is_boolean()) << c.text;
    EXPECT_TRUE(v["n"].is_number_integer()) << c.text;
    EXPECT_EQ(v.size(), 2u);
  }
  // Any object: whatever it ran to, the text is a prefix that the matcher took byte by byte.
  json_matcher m(json_grammar::any_object());
  EXPECT_TRUE(m.advance(h.out["obj"].text)) << h.out["obj"].text;
  const std::string& t = h.out["obj"].text;
  const size_t first = t.find_first_not_of(" \t\r\n");  // JSON allows whitespace before the value
  ASSERT_NE(first, std::string::npos) << t;
  EXPECT_EQ(t[first], '{') << t;
}

// The byte tokenizer, but token 100 is the first two bytes of a three-byte character.
class partial_utf8_tokenizer final : public byte_tokenizer_base {
 public:
  std::string decode(std::span<const int32_t> ids, bool skip) const override {
    std::string out;
    for (int32_t id : ids) out += token_bytes(id, skip);
    return parallel::utf8_lossy(out);
  }
  std::string token_bytes(int32_t id, bool skip) const override {
    return id == 100 ? std::string("\xe2\x82") : b_.token_bytes(id, skip);
  }
};

TEST(EngineOpenAi, TextNeverEndsInsideAUtf8Character) {
  harness h("llama_gqa", small_blocks(), std::make_unique<partial_utf8_tokenizer>());
  const auto prompt = prompt_of(5, 2, h.dec->config().vocab_size);
  auto one = greedy_params(1);
  one.logit_bias = {{100, 100.0f}};
  h.submit("one", prompt, one);
  auto two = greedy_params(2);
  two.logit_bias = {{100, 100.0f}};
  h.submit("two", prompt, two);
  h.run();
  EXPECT_EQ(h.out["one"].ids, std::vector<int32_t>{100});
  EXPECT_EQ(h.out["one"].text, "");  // the incomplete character is held back, not U+FFFD
  EXPECT_EQ(h.out["two"].ids, (std::vector<int32_t>{100, 100}));
  EXPECT_EQ(h.out["two"].text, "\xef\xbf\xbd");  // the first is invalid (U+FFFD), the second incomplete
}

}  // namespace
