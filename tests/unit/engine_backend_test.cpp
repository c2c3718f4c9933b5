// The HTTP server's backend over the engine (elastic/server/engine_backend.h): how OpenAI fields become
// prompts (BOS with add_special_tokens, the chat template with or without the generation prompt,
// token ids checked against the vocabulary), how a schema the guided decoder refuses comes back as
// a 400 naming its place, and a submission's events (several samples, logprobs) through the engine.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "elastic/server/engine_backend.h"
#include "engine_harness.h"

namespace {

using namespace troupe;
using namespace troupe::elastic;
using namespace troupe_test;

std::unique_ptr<parallel::text_tokenizer> llama3_tokenizer() {
  return parallel::bpe_tokenizer::load(std::string(TROUPE_FIXTURES_DIR) + "/tokenizers/llama3");
}

completion_request parse(const std::string& body, bool chat) { return parse_completion_request(body, chat, {}); }

TEST(EngineBackend, PromptsFollowAddSpecialTokensAndTheChatTemplate) {
  harness h("llama_gqa", {}, llama3_tokenizer());
  engine_backend be(*h.eng, *h.tok, "m", 1);
  const auto bos = h.tok->bos_id();
  ASSERT_TRUE(bos && *bos < h.eng->vocab_size());
  const auto with = be.prompt_tokens(parse(R"({"prompt": "hello there"})", false), 0);
  const auto without = be.prompt_tokens(parse(R"({"prompt": "hello there", "add_special_tokens": false})", false), 0);
  ASSERT_FALSE(with.empty());
  EXPECT_EQ(with[0], *bos);
  EXPECT_EQ(std::vector<int32_t>(with.begin() + 1, with.end()), without);
  const std::string chat = R"({"messages": [{"role": "user", "content": "hi"}]})";
  const auto gen = be.prompt_tokens(parse(chat, true), 0);
  const auto no_gen = be.prompt_tokens(
      parse(R"({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": false})", true), 0);
  EXPECT_LT(no_gen.size(), gen.size());  // the assistant header is left out
  EXPECT_EQ(std::vector<int32_t>(gen.begin(), gen.begin() + static_cast<int64_t>(no_gen.size())), no_gen);
  EXPECT_EQ(be.prompt_text(parse(R"({"prompt": ["a b", [5, 6]]})", false), 0), "a b");
  try {
    be.prompt_tokens(parse(R"({"prompt": ["x", [1, 4000]]})", false), 1);
    ADD_FAILURE() << "a token id outside the vocabulary was taken";
  } catch (const api_error& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.param, "prompt[1]");
  }
}

TEST(EngineBackend, AnUnsupportedSchemaIsA400NamingItsPlace) {
  harness h("llama_gqa", {});
  engine_backend be(*h.eng, *h.tok, "m", 1);
  const auto r = parse(R"({"prompt": [1, 2], "response_format": {"type": "json_schema", "json_schema": {"name": "x",
      "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a+$"}}}}}})",
                       false);
  std::exception_ptr got;
  generation_submission s;
  s.id = "bad";
  s.request = &r;
  s.prompt = {1, 2};
  s.on_event = [](const generation_event&) { ADD_FAILURE() << "a refused request produced events"; };
  s.on_accepted = [&](std::exception_ptr e) { got = e; };
  be.submit(std::move(s));
  ASSERT_TRUE(got);
  try {
    std::rethrow_exception(got);
  } catch (const api_error& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.param, "response_format.json_schema.schema.properties.a.pattern");
  }
  EXPECT_EQ(h.eng->stats().waiting, 0);
}

TEST(EngineBackend, ASubmissionsSamplesAndLogprobsComeBackTagged) {
  harness h("llama_gqa", {.block_size = 4, .num_blocks = 64});
  engine_backend be(*h.eng, *h.tok, "m", 1);
  const auto r = parse(R"({"prompt": [3, 1, 4, 1, 5], "max_tokens": 3, "temperature": 0.7, "seed": 9, "logprobs": 2,
                           "best_of": 2})",
                       false);
  std::vector<generation_event> events;
  bool accepted = false;
  generation_submission s;
  s.id = "two";
  s.request = &r;
  s.prompt = {3, 1, 4, 1, 5};
  s.samples = r.best_of;
  s.cumulative_logprob = true;
  s.on_event = [&](const generation_event& e) { events.push_back(e); };
  s.on_accepted = [&](std::exception_ptr e) { accepted = !e; };
  be.submit(std::move(s));
  EXPECT_TRUE(accepted);
  for (int i = 0; i < 100 && h.eng->step(); ++i) {
  }
  int finished[2] = {0, 0};
  size_t lps[2] = {0, 0};
  double cum[2] = {0, 0}, sum[2] = {0, 0};
  for (const auto& e : events) {
    ASSERT_TRUE(e.index == 0 || e.index == 1);
    lps[e.index] += e.logprobs.size();
    for (const auto& t : e.logprobs) {
      sum[e.index] += t.logprob;
      EXPECT_EQ(t.top.size(), 2u);
    }
    if (e.finished) {
      ++finished[e.index];
      cum[e.index] = e.cumulative_logprob;
    }
  }
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(finished[i], 1);
    EXPECT_EQ(lps[i], 3u);
    EXPECT_NEAR(cum[i], sum[i], 1e-5);
  }
}

}  // namespace
