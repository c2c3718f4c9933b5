// The OpenAI wire format of `troupe serve` (elastic/server/openai_api.h): every field's parsing,
// defaults and limits, the errors (status, type, param, message) and the rendered JSON.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "elastic/server/openai_api.h"

namespace {

using namespace troupe::elastic;
using json = nlohmann::json;

api_error error_of(const std::string& body, bool chat, api_limits lim = {}) {
  try {
    parse_completion_request(body, chat, lim);
  } catch (const api_error& e) {
    return e;
  }
  ADD_FAILURE() << "no error for " << body;
  return api_error(0, "", "");
}

TEST(OpenAiApi, CompletionDefaultsAndFields) {
  const auto r = parse_completion_request(R"({"model": "m", "prompt": "Hello"})", false, {});
  EXPECT_EQ(r.prompt, "Hello");
  EXPECT_FALSE(r.prompt_is_ids);
  EXPECT_EQ(r.max_tokens, 16);
  EXPECT_EQ(r.temperature, 1.0);
  EXPECT_EQ(r.top_p, 1.0);
  EXPECT_EQ(r.top_k, 0);
  EXPECT_FALSE(r.stream);
  EXPECT_FALSE(r.seed.has_value());
  const auto s = parse_completion_request(
      R"({"prompt": [1, 2, 3], "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 4, "seed": 9,
          "stop": ["\n", "END"], "stop_token_ids": [5], "ignore_eos": true, "stream": true,
          "stream_options": {"include_usage": true}, "unknown_field": 1})",
      false, {});
  EXPECT_TRUE(s.prompt_is_ids);
  EXPECT_EQ(s.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(s.max_tokens, 7);
  EXPECT_EQ(s.temperature, 0.0);
  EXPECT_EQ(s.top_p, 0.5);
  EXPECT_EQ(s.top_k, 4);
  EXPECT_EQ(*s.seed, 9u);
  EXPECT_EQ(s.stop, (std::vector<std::string>{"\n", "END"}));
  EXPECT_EQ(s.stop_token_ids, (std::vector<int32_t>{5}));
  EXPECT_TRUE(s.ignore_eos);
  EXPECT_TRUE(s.stream);
  EXPECT_TRUE(s.include_usage);
  EXPECT_EQ(parse_completion_request(R"({"prompt": [[4, 5]]})", false, {}).prompt_ids, (std::vector<int32_t>{4, 5}));
  EXPECT_EQ(parse_completion_request(R"({"prompt": ["one"]})", false, {}).prompt, "one");
}

TEST(OpenAiApi, ChatMessagesAndTheServerDefaultMaxTokens) {
  api_limits lim;
  lim.max_tokens = 100;
  const auto r = parse_completion_request(
      R"({"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]})",
      true, lim);
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[0].role, "system");
  EXPECT_EQ(r.messages[1].content, "Hi there");
  EXPECT_EQ(r.max_tokens, 100);
  EXPECT_EQ(parse_completion_request(R"({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5})",
                                     true, lim)
                .max_tokens,
            5);
}

TEST(OpenAiApi, BadRequestsName400TypeParamAndWhatIsAllowed) {
  struct bad_case {
    std::string body;
    bool chat;
    std::string param, text;
  };
  const std::vector<bad_case> cases = {
      {"{not json", false, "", "not valid JSON"},
      {"[1, 2]", false, "", "must be a JSON object"},
      {"{}", false, "prompt", "`prompt` is required"},
      {R"({"prompt": 5})", false, "prompt", "a string or an array of token ids"},
      {R"({"prompt": ["a", "b"]})", false, "prompt", "holds 2 prompts"},
      {R"({"prompt": [1, -2]})", false, "prompt", "`prompt[1]` must be a token id"},
      {R"({"prompt": "x", "temperature": 3})", false, "temperature", "`temperature` must be in [0, 2], got 3"},
      {R"({"prompt": "x", "temperature": "hot"})", false, "temperature", "must be a number, got string"},
      {R"({"prompt": "x", "top_p": 0})", false, "top_p", "`top_p` must be in (0, 1], got 0"},
      {R"({"prompt": "x", "max_tokens": 0})", false, "max_tokens", "`max_tokens` must be in [1, 4096], got 0"},
      {R"({"prompt": "x", "max_tokens": 5000})", false, "max_tokens", "got 5000"},
      {R"({"prompt": "x", "max_tokens": 1.5})", false, "max_tokens", "must be an integer"},
      {R"({"prompt": "x", "n": 2})", false, "n", "`n` must be 1"},
      {R"({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})", false, "stop", "at most 4"},
      {R"({"prompt": "x", "stop": [""]})", false, "stop", "must not be empty"},
      {R"({"prompt": "x", "stream": "yes"})", false, "stream", "must be true or false"},
      {R"({"prompt": "x", "stream_options": {"include_usage": true}})", false, "stream_options", "only allowed with"},
      {R"({"prompt": "x", "echo": true})", false, "echo", "not supported"},
      {R"({"messages": []})", true, "messages", "non-empty array"},
      {R"({"messages": [{"content": "x"}]})", true, "messages[0]", "string `role`"},
      {R"({"messages": [{"role": "robot", "content": "x"}]})", true, "messages[0].role", "'robot' is not one of"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", true, "messages[0].content",
       "only text is supported"},
  };
  for (const auto& c : cases) {
    const api_error e = error_of(c.body, c.chat);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.type, "invalid_request_error") << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_NE(std::string(e.what()).find(c.text), std::string::npos) << c.body << " -> " << e.what();
  }
  api_limits small;
  small.max_body_bytes = 10;
  EXPECT_EQ(error_of(R"({"prompt": "hello world"})", false, small).status, 413);
}

TEST(OpenAiApi, RenderedJsonIsWhatClientsParse) {
  completion_result r{"cmpl-1", 1700000000, "tiny", "Hello", "length", 3, 2};
  const json c = json::parse(completion_response_json(r, false));
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_EQ(c["choices"][0]["text"], "Hello");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(c["usage"]["total_tokens"], 5);
  const json ch = json::parse(completion_response_json(r, true));
  EXPECT_EQ(ch["object"], "chat.completion");
  EXPECT_EQ(ch["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(ch["choices"][0]["message"]["content"], "Hello");
  const json first = json::parse(chunk_json("chatcmpl-1", 1, "tiny", "He", std::nullopt, true, true));
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "He");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  const json last = json::parse(chunk_json("chatcmpl-1", 1, "tiny", "", std::string("stop"), true, false));
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_FALSE(last["choices"][0]["delta"].contains("content"));
  EXPECT_EQ(sse_event("{}"), "data: {}\n\n");
  EXPECT_EQ(std::string(sse_done()), "data: [DONE]\n\n");
  const json u = json::parse(usage_chunk_json("cmpl-1", 1, "tiny", 4, 6, false));
  EXPECT_EQ(u["usage"]["total_tokens"], 10);
  EXPECT_TRUE(u["choices"].empty());
  // A byte-level model may stop inside a UTF-8 character: rendered with U+FFFD, never a throw.
  const json cut = json::parse(chunk_json("cmpl-1", 1, "tiny", std::string("\xe4\xbd"), std::nullopt, false, true));
  EXPECT_EQ(cut["choices"][0]["text"], "\xef\xbf\xbd");
  const json err = json::parse(error_json(api_error(400, "invalid_request_error", "bad top_p", "top_p")));
  EXPECT_EQ(err["error"]["message"], "bad top_p");
  EXPECT_EQ(err["error"]["param"], "top_p");
  EXPECT_TRUE(err["error"]["code"].is_null());
  const json m = json::parse(models_json({"tiny-moe"}, 5, "troupe"));
  EXPECT_EQ(m["data"][0]["id"], "tiny-moe");
  EXPECT_EQ(m["object"], "list");
}

}  // namespace
