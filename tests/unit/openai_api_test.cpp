// The OpenAI wire format of `troupe serve` (elastic/server/openai_api.h): every field's parsing,
// defaults and limits, the errors (status, type, param, message), parameters refused by name, and
// the rendered JSON (choices, logprobs of both APIs, stream chunks).
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
  ASSERT_EQ(r.prompts.size(), 1u);
  EXPECT_EQ(r.prompts[0].text, "Hello");
  EXPECT_FALSE(r.prompts[0].is_ids);
  EXPECT_EQ(r.max_tokens, 16);
  EXPECT_EQ(r.temperature, 1.0);
  EXPECT_EQ(r.top_p, 1.0);
  EXPECT_EQ(r.top_k, 0);
  EXPECT_EQ(r.n, 1);
  EXPECT_EQ(r.best_of, 1);
  EXPECT_EQ(r.logprobs, -1);
  EXPECT_FALSE(r.echo);
  EXPECT_FALSE(r.stream);
  EXPECT_FALSE(r.seed.has_value());
  EXPECT_EQ(r.response_format, "text");
  const auto s = parse_completion_request(
      R"({"prompt": [1, 2, 3], "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 4, "seed": 9,
          "stop": ["\n", "END"], "stop_token_ids": [5], "ignore_eos": true, "stream": true,
          "stream_options": {"include_usage": true}, "n": 2, "logprobs": 3, "echo": true, "min_p": 0.1,
          "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "min_tokens": 2,
          "logit_bias": {"17": -100, "4": 2.5}, "user": "u1", "suffix": null, "add_special_tokens": false,
          "response_format": {"type": "json_object"}})",
      false, {});
  EXPECT_TRUE(s.prompts[0].is_ids);
  EXPECT_EQ(s.prompts[0].ids, (std::vector<int32_t>{1, 2, 3}));
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
  EXPECT_EQ(s.n, 2);
  EXPECT_EQ(s.best_of, 2);  // best_of defaults to n
  EXPECT_EQ(s.logprobs, 3);
  EXPECT_TRUE(s.echo);
  EXPECT_EQ(s.min_p, 0.1);
  EXPECT_EQ(s.presence_penalty, 0.5);
  EXPECT_EQ(s.frequency_penalty, -0.5);
  EXPECT_EQ(s.repetition_penalty, 1.2);
  EXPECT_EQ(s.min_tokens, 2);
  EXPECT_EQ(s.logit_bias, (std::vector<std::pair<int32_t, double>>{{17, -100.0}, {4, 2.5}}));
  EXPECT_EQ(s.user, "u1");
  EXPECT_FALSE(s.add_special_tokens);
  EXPECT_EQ(s.response_format, "json_object");
  EXPECT_EQ(parse_completion_request(R"({"prompt": [[4, 5]]})", false, {}).prompts[0].ids,
            (std::vector<int32_t>{4, 5}));
  EXPECT_EQ(parse_completion_request(R"({"prompt": ["one"]})", false, {}).prompts[0].text, "one");
  const auto many = parse_completion_request(R"({"prompt": ["a", [7, 8], "c"], "best_of": 3})", false, {});
  ASSERT_EQ(many.prompts.size(), 3u);
  EXPECT_EQ(many.prompts[1].ids, (std::vector<int32_t>{7, 8}));
  EXPECT_EQ(many.best_of, 3);
  EXPECT_EQ(many.n, 1);
  // echo alone may ask for no new token (the prompt's logprobs only)
  EXPECT_EQ(parse_completion_request(R"({"prompt": "x", "echo": true, "max_tokens": 0})", false, {}).max_tokens, 0);
  const auto schema = parse_completion_request(
      R"({"prompt": "x", "response_format": {"type": "json_schema",
          "json_schema": {"name": "p", "strict": true, "schema": {"type": "object"}}}})",
      false, {});
  EXPECT_EQ(schema.response_format, "json_schema");
  EXPECT_EQ(json::parse(schema.json_schema), json({{"type", "object"}}));
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
  EXPECT_EQ(r.messages[1].content, "Hi \nthere");  // parts joined with a newline, as vLLM does
  EXPECT_EQ(r.max_tokens, 100);
  EXPECT_EQ(parse_completion_request(R"({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5})",
                                     true, lim)
                .max_tokens,
            5);
  const auto lp = parse_completion_request(
      R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 4, "n": 3,
          "tool_choice": "none", "parallel_tool_calls": false, "tools": []})",
      true, lim);
  EXPECT_EQ(lp.logprobs, 4);
  EXPECT_EQ(lp.n, 3);
  EXPECT_EQ(lp.best_of, 3);
  EXPECT_EQ(parse_completion_request(R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true})", true, lim)
                .logprobs,
            0);
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
      {R"({"prompt": 5})", false, "prompt", "must be a string, an array of token ids"},
      {R"({"prompt": ["a", 5]})", false, "prompt[1]", "a string or an array of token ids"},
      {R"({"prompt": []})", false, "prompt", "non-empty array"},
      {R"({"prompt": [1, -2]})", false, "prompt", "`prompt[1]` must be a token id"},
      {R"({"prompt": "x", "temperature": 3})", false, "temperature", "`temperature` must be in [0, 2], got 3"},
      {R"({"prompt": "x", "temperature": "hot"})", false, "temperature", "must be a number, got string"},
      {R"({"prompt": "x", "top_p": 0})", false, "top_p", "`top_p` must be in (0, 1], got 0"},
      {R"({"prompt": "x", "max_tokens": 0})", false, "max_tokens", "`max_tokens` must be in [1, 4096], got 0"},
      {R"({"prompt": "x", "max_tokens": 5000})", false, "max_tokens", "got 5000"},
      {R"({"prompt": "x", "max_tokens": 1.5})", false, "max_tokens", "must be an integer"},
      {R"({"prompt": "x", "n": 0})", false, "n", "`n` must be in [1, 128]"},
      {R"({"prompt": "x", "n": 3, "best_of": 2})", false, "best_of", "at least `n`"},
      {R"({"prompt": ["a", "b"], "best_of": 100})", false, "best_of", "200 sequences"},
      {R"({"prompt": "x", "logprobs": 21})", false, "logprobs", "[0, 20]"},
      {R"({"prompt": "x", "logprobs": true})", false, "logprobs", "not a boolean"},
      {R"({"prompt": "x", "presence_penalty": 3})", false, "presence_penalty", "[-2, 2]"},
      {R"({"prompt": "x", "repetition_penalty": 0})", false, "repetition_penalty", "(0, 2]"},
      {R"({"prompt": "x", "min_tokens": 20})", false, "min_tokens", "[0, 16]"},
      {R"({"prompt": "x", "logit_bias": {"a": 1}})", false, "logit_bias", "key 'a' is not a token id"},
      {R"({"prompt": "x", "logit_bias": {"3": 101}})", false, "logit_bias", "[-100, 100]"},
      {R"({"prompt": "x", "stop": [""]})", false, "stop", "must not be empty"},
      {R"({"prompt": "x", "stream": "yes"})", false, "stream", "must be true or false"},
      {R"({"prompt": "x", "stream_options": {"include_usage": true}})", false, "stream_options", "only allowed with"},
      {R"({"prompt": "x", "suffix": "tail"})", false, "suffix", "not supported"},
      {R"({"prompt": "x", "mirostat_tau": 5})", false, "mirostat_tau", "not a parameter of /v1/completions"},
      {R"({"prompt": "x", "messages": []})", false, "messages", "not a parameter of /v1/completions"},
      {R"({"prompt": "x", "response_format": {"type": "yaml"}})", false, "response_format.type", "not one of"},
      {R"({"prompt": "x", "response_format": {"type": "json_schema"}})", false, "response_format.json_schema",
       "must be an object"},
      {R"({"prompt": "x", "skip_special_tokens": false})", false, "skip_special_tokens", "not implemented"},
      {R"({"messages": [], "echo": true})", true, "echo", "not a parameter of /v1/chat/completions"},
      {R"({"messages": [{"role": "user", "content": "x"}], "tools": [{}]})", true, "tools", "tool and function"},
      {R"({"messages": [{"role": "user", "content": "x"}], "functions": [{}]})", true, "functions",
       "tool and function"},
      {R"({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"})", true, "tool_choice",
       "\"none\" or \"auto\""},
      {R"({"messages": [{"role": "user", "content": "x"}], "store": true})", true, "store", "stores no"},
      {R"({"messages": [{"role": "user", "content": "x"}], "audio": {}})", true, "audio", "text only"},
      {R"({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})", true, "messages[0].tool_calls",
       "not supported"},
      {R"({"messages": []})", true, "messages", "non-empty array"},
      {R"({"messages": [{"content": "x"}]})", true, "messages[0]", "string `role`"},
      {R"({"messages": [{"role": "robot", "content": "x"}]})", true, "messages[0].role", "'robot' is not one of"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", true, "messages[0].content",
       "this model takes text only"},
      {R"({"messages": [{"role": "user", "content": [{"type": 1, "text": "x"}]}]})", true, "messages[0].content",
       "this model takes text only"},
  };
  for (const auto& c : cases) {
    const api_error e = error_of(c.body, c.chat);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.type, "invalid_request_error") << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_NE(std::string(e.what()).find(c.text), std::string::npos) << c.body << " -> " << e.what();
  }
  std::string stops;  // 64 stop strings are taken (lm_eval sends its `until` list whole), 65 are not
  for (int i = 0; i < 65; ++i) stops += (i ? ", \"s" : "\"s") + std::to_string(i) + "\"";
  const std::string many = R"({"prompt": "x", "stop": [)" + stops + "]}";
  const api_error e65 = error_of(many, false);
  EXPECT_EQ(e65.param, "stop");
  EXPECT_NE(std::string(e65.what()).find("at most 64"), std::string::npos);
  const std::string ok64 = R"({"prompt": "x", "stop": [)" + stops.substr(0, stops.rfind(", ")) + "]}";
  EXPECT_EQ(parse_completion_request(ok64, false, {}).stop.size(), 64u);
  api_limits small;
  small.max_body_bytes = 10;
  EXPECT_EQ(error_of(R"({"prompt": "hello world"})", false, small).status, 413);
}

std::string test_names(int32_t id) {
  if (id == 9) return "\xe4\xbd";  // a partial UTF-8 character
  std::string s = "w";
  s += std::to_string(id);
  return s;
}

choice_delta delta(int64_t index, std::string text, std::optional<std::string> finish = std::nullopt) {
  choice_delta d;
  d.index = index;
  d.text = std::move(text);
  d.finish_reason = std::move(finish);
  return d;
}

TEST(OpenAiApi, RenderedJsonIsWhatClientsParse) {
  const token_namer names = test_names;
  completion_request cq;
  completion_request chq;
  chq.chat = true;
  completion_result r{"cmpl-1", 1700000000, "tiny", {{0, "Hello", "length", {}, 3, 2}}, 3, 2};
  const json c = json::parse(completion_response_json(r, cq, names));
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_EQ(c["choices"][0]["text"], "Hello");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(c["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(c["usage"]["total_tokens"], 5);
  const json ch = json::parse(completion_response_json(r, chq, names));
  EXPECT_EQ(ch["object"], "chat.completion");
  EXPECT_EQ(ch["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(ch["choices"][0]["message"]["content"], "Hello");
  const stream_head h{"chatcmpl-1", 1, "tiny"};
  const json first = json::parse(chunk_json(h, chq, delta(2, "He"), true, names));
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["index"], 2);
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "He");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  const json last = json::parse(chunk_json(h, chq, delta(0, "", "stop"), false, names));
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_FALSE(last["choices"][0]["delta"].contains("content"));
  EXPECT_EQ(sse_event("{}"), "data: {}\n\n");
  EXPECT_EQ(std::string(sse_done()), "data: [DONE]\n\n");
  const json u = json::parse(usage_chunk_json(h, false, 4, 6));
  EXPECT_EQ(u["usage"]["total_tokens"], 10);
  EXPECT_TRUE(u["choices"].empty());
  // A byte-level model may stop inside a UTF-8 character: rendered with U+FFFD, never a throw.
  const json cut = json::parse(chunk_json(h, cq, delta(0, "\xe4\xbd"), true, names));
  EXPECT_EQ(cut["choices"][0]["text"], "\xef\xbf\xbd");
  const json err = json::parse(error_json(api_error(400, "invalid_request_error", "bad top_p", "top_p")));
  EXPECT_EQ(err["error"]["message"], "bad top_p");
  EXPECT_EQ(err["error"]["param"], "top_p");
  EXPECT_TRUE(err["error"]["code"].is_null());
  const json m = json::parse(models_json({"tiny-moe"}, 5, "troupe"));
  EXPECT_EQ(m["data"][0]["id"], "tiny-moe");
  EXPECT_EQ(m["object"], "list");
}

TEST(OpenAiApi, LogprobsInBothApis) {
  const token_namer names = test_names;
  completion_request cq;
  cq.logprobs = 1;
  completion_result r{"cmpl-1", 1, "tiny", {}, 2, 2};
  completion_choice choice{0, "x", "length", {}, 2, 2};
  choice.logprobs = {{3, NAN, {}},                             // an echoed prompt's first token
                     {4, -0.5f, {{5, -0.25f}, {6, -3.0f}}},    // k = 1: one alternative + the token
                     {9, -INFINITY, {{9, -INFINITY}}}};        // -inf: vLLM's floor; bytes: for partial UTF-8
  r.choices.push_back(choice);
  const json lp = json::parse(completion_response_json(r, cq, names))["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json({"w3", "w4", "bytes:\\xe4\\xbd"}));
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  EXPECT_EQ(lp["token_logprobs"][1], -0.5);
  EXPECT_EQ(lp["token_logprobs"][2], -9999.0);
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  EXPECT_EQ(lp["top_logprobs"][1], json({{"w5", -0.25}, {"w4", -0.5}}));
  EXPECT_EQ(lp["text_offset"], json({0, 2, 4}));
  completion_request chq;
  chq.chat = true;
  chq.logprobs = 2;
  const json cl = json::parse(completion_response_json(r, chq, names))["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(cl.size(), 3u);
  EXPECT_EQ(cl[1]["token"], "w4");
  EXPECT_EQ(cl[1]["bytes"], json({119, 52}));
  ASSERT_EQ(cl[1]["top_logprobs"].size(), 2u);
  EXPECT_EQ(cl[1]["top_logprobs"][1]["logprob"], -3.0);
  EXPECT_EQ(cl[2]["bytes"], json({0xe4, 0xbd}));
  EXPECT_EQ(logprob_token_text("ok \xc3\xa9"), "ok \xc3\xa9");
  EXPECT_EQ(logprob_token_text("\xc3"), "bytes:\\xc3");
}

}  // namespace
