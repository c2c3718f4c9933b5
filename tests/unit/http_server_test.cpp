// The OpenAI server of `troupe serve` (elastic/server/http_server.h) over real sockets on
// 127.0.0.1: health, models, metrics, the API key, 4xx error objects before the backend is reached
// (unknown parameters, unknown models), JSON and server-sent-event answers, choices of several
// prompts and samples, best_of, echo and logprobs in both APIs, refusals that come back later, and
// clients that leave — streamed or not — getting their requests aborted. The backend here replays
// scripted pieces from one thread (engine_test and integration.serve drive the real model).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <thread>

#include "elastic/server/http_server.h"
#include "http_test_client.h"

namespace {

using namespace troupe::elastic;
using json = nlohmann::json;
using troupe_test::http_get;
using troupe_test::http_post;
using troupe_test::eventually;
using troupe_test::raw_conn;

// Emits `pieces` for every sample of every submission, one piece per tick (delay_ms), from one
// thread; forever (until abort) when endless. Token ids are the piece index; sample i's cumulative
// logprob is -1 / (i + 1) (so the last sample is the most likely).
class scripted_backend final : public generation_backend {
 public:
  std::vector<std::string> pieces{"Hel", "lo", " world"};
  int delay_ms = 1;
  bool endless = false;
  std::string refuse;  // non-empty: every submission is refused with 503 and this message
  bool finish_before_accept = false;  // every sample's events, finish included, come before on_accepted
  std::mutex mu;
  std::vector<generation_submission> subs;  // what arrived
  std::set<std::string> aborted;

  scripted_backend() {
    ticker_ = std::thread([this] { run(); });
  }
  ~scripted_backend() override {
    stop_ = true;
    ticker_.join();
  }
  std::string model_id() const override { return "tiny-test"; }
  std::vector<int32_t> prompt_tokens(const completion_request& r, size_t i) override {
    if (!r.chat && r.prompts[i].text == "THROW") throw std::runtime_error("the tokenizer broke");
    if (!r.chat && r.prompts[i].is_ids) return r.prompts[i].ids;
    std::string text = r.chat ? "" : r.prompts[i].text;
    for (const auto& m : r.messages) text += m.role + ":" + m.content + "\n";
    return std::vector<int32_t>(text.begin(), text.end());  // one id per byte
  }
  std::string prompt_text(const completion_request& r, size_t i) override { return r.prompts[i].text; }
  std::string token_bytes(int32_t id) const override {
    if (id == 99) return "\xe2\x82";  // a partial UTF-8 character
    std::string s = "t";
    s += std::to_string(id);
    return s;
  }
  void submit(generation_submission s) override {
    std::lock_guard<std::mutex> g(mu);
    if (!refuse.empty()) {
      auto cb = s.on_accepted;
      std::thread([cb, why = refuse] {  // refused later, from another thread
        cb(std::make_exception_ptr(api_error(503, "server_error", why)));
      }).detach();
      return;
    }
    if (finish_before_accept) {
      for (int64_t i = 0; i < s.samples; ++i) {
        generation_event e;
        e.index = i;
        e.text = "all";
        e.completion_tokens = 1;
        s.on_event(e);
        e.text.clear();
        e.finished = true;
        e.finish_reason = "stop";
        s.on_event(e);
      }
      s.on_accepted(nullptr);
      return;
    }
    s.on_accepted(nullptr);
    subs.push_back(std::move(s));
    live_.push_back({subs.size() - 1, std::vector<size_t>(static_cast<size_t>(subs.back().samples), 0)});
  }
  void abort(const std::string& id) override {
    std::lock_guard<std::mutex> g(mu);
    aborted.insert(id);
  }
  std::string metrics_text() override { return "troupe_test_backend_up 1\n"; }
  size_t submitted() {
    std::lock_guard<std::mutex> g(mu);
    return subs.size();
  }
  size_t aborted_count() {
    std::lock_guard<std::mutex> g(mu);
    return aborted.size();
  }

 private:
  struct live {
    size_t sub;
    std::vector<size_t> next;  // per sample: the next piece
  };
  void run() {
    while (!stop_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      std::lock_guard<std::mutex> g(mu);
      for (auto it = live_.begin(); it != live_.end();) {
        const generation_submission& s = subs[it->sub];
        const auto n = static_cast<int64_t>(s.prompt.size());
        const bool gone = aborted.count(s.id) != 0;
        bool all_done = true;
        for (size_t i = 0; i < it->next.size(); ++i) {
          generation_event e;
          e.index = static_cast<int64_t>(i);
          e.prompt_tokens = n;
          e.cumulative_logprob = -1.0 / static_cast<double>(i + 1);
          size_t& k = it->next[i];
          if (k == SIZE_MAX) continue;
          if (gone || (!endless && k == pieces.size())) {
            e.finished = true;
            e.finish_reason = gone ? "abort" : "length";
            e.completion_tokens = static_cast<int64_t>(k);
            k = SIZE_MAX;
            s.on_event(e);
            continue;
          }
          all_done = false;
          if (k == 0 && i == 0 && s.prompt_logprobs) {
            for (int64_t t = 0; t < n; ++t)
              e.prompt_logprobs.push_back({s.prompt[static_cast<size_t>(t)],
                                           t == 0 ? NAN : -0.5f, {{7, -0.25f}}});
          }
          e.text = pieces[k % pieces.size()];
          e.token_ids = {static_cast<int32_t>(k)};
          if (s.request->logprobs >= 0) e.logprobs.push_back({static_cast<int32_t>(k), -1.0f, {{99, -0.5f}, {3, -2.0f}}});
          e.completion_tokens = static_cast<int64_t>(++k);
          s.on_event(e);
        }
        if (all_done) it = live_.erase(it);
        else ++it;
      }
    }
  }
  std::vector<live> live_;
  std::atomic<bool> stop_{false};
  std::thread ticker_;
};

// /admin/scale's other side: records the sizes asked for, refuses 3 with a 400.
struct recording_admin final : scale_admin {
  std::vector<int64_t> asked;
  std::string request_scale(int64_t ranks) override {
    if (ranks == 3) throw api_error(400, "invalid_request_error", "3 ranks do not divide the experts", "ranks");
    asked.push_back(ranks);
    return R"({"state": "pending"})";
  }
  std::string scale_status() override { return R"({"state": "idle", "ranks": 1})"; }
};

struct server_fixture {
  scripted_backend backend;
  std::unique_ptr<http_server> server;
  explicit server_fixture(const std::string& key = "", int64_t max_prompt = 1000, scale_admin* admin = nullptr,
                          const std::string& admin_key = "") {
    http_options o;
    o.port = 0;
    o.api_key = key;
    o.admin = admin;
    o.admin_key = admin_key;
    o.limits.max_prompt_tokens = max_prompt;
    server = std::make_unique<http_server>(backend, o);
    server->start();
  }
  troupe_test::http_reply get(const std::string& path, const std::string& extra = "") {
    raw_conn c(server->port());
    c.send(http_get(path, extra));
    return c.read_reply(10000);
  }
  troupe_test::http_reply post(const std::string& path, const std::string& body, const std::string& extra = "") {
    raw_conn c(server->port());
    c.send(http_post(path, body, extra));
    return c.read_reply(10000);
  }
};

// The data: events of an SSE body, [DONE] as a null json.
std::vector<json> sse(const std::string& body, bool* done) {
  std::vector<json> events;
  size_t pos = 0;
  *done = false;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    const size_t end = body.find("\n\n", pos);
    const std::string data = body.substr(pos + 6, end - pos - 6);
    if (data == "[DONE]") *done = true;
    else events.push_back(json::parse(data));
    pos = end;
  }
  return events;
}

TEST(HttpServer, HealthModelsMetricsAndRouteErrors) {
  server_fixture f;
  EXPECT_EQ(f.get("/health").status, 200);
  auto m = f.get("/v1/models");
  EXPECT_EQ(json::parse(m.body)["data"][0]["id"], "tiny-test");
  auto p = f.get("/metrics");
  EXPECT_NE(p.body.find("troupe_http_responses_total{code=\"200\"} 2"), std::string::npos) << p.body;
  EXPECT_NE(p.body.find("troupe_test_backend_up 1"), std::string::npos);
  EXPECT_NE(p.body.find("troupe_http_connections_open"), std::string::npos);
  auto get_post = f.get("/v1/completions");
  EXPECT_EQ(get_post.status, 405);
  EXPECT_EQ(json::parse(get_post.body)["error"]["type"], "invalid_request_error");
  EXPECT_EQ(get_post.headers.at("allow"), "POST");
  auto unknown = f.post("/v1/embeddings", "{}");
  EXPECT_EQ(unknown.status, 404);
  EXPECT_NE(json::parse(unknown.body)["error"]["message"].get<std::string>().find("/v1/embeddings"),
            std::string::npos);
}

TEST(HttpServer, ApiKeyIsRequiredOnV1Only) {
  server_fixture f("sk-secret");
  auto no = f.post("/v1/completions", R"({"prompt": "x"})");
  EXPECT_EQ(no.status, 401);
  EXPECT_EQ(json::parse(no.body)["error"]["type"], "authentication_error");
  EXPECT_EQ(f.get("/health").status, 200);
  auto yes = f.post("/v1/completions", R"({"prompt": "x"})", "Authorization: Bearer sk-secret\r\n");
  EXPECT_EQ(yes.status, 200) << yes.body;
  EXPECT_EQ(f.backend.submitted(), 1u);
}

TEST(HttpServer, AdminScaleNeedsItsOwnKeyAndRefusesBadBodies) {
  recording_admin admin;
  {
    server_fixture off("sk-secret", 1000, &admin, "");  // no admin key: the admin API is off
    EXPECT_EQ(off.post("/admin/scale", R"({"ranks": 2})", "Authorization: Bearer sk-secret\r\n").status, 403);
  }
  server_fixture f("sk-secret", 1000, &admin, "adm");
  const std::string key = "Authorization: Bearer adm\r\n";
  EXPECT_EQ(f.post("/admin/scale", R"({"ranks": 2})").status, 401);
  EXPECT_EQ(f.post("/admin/scale", R"({"ranks": 2})", "Authorization: Bearer sk-secret\r\n").status, 401)
      << "the API key does not open the admin API";
  EXPECT_EQ(f.get("/admin/scale").status, 401);
  EXPECT_EQ(f.post("/admin/scale", "{oops", key).status, 400);
  EXPECT_EQ(f.post("/admin/scale", R"({"ranks": "2"})", key).status, 400);
  auto unknown = f.post("/admin/scale", R"({"ranks": 2, "now": 1})", key);
  EXPECT_EQ(unknown.status, 400);
  EXPECT_EQ(json::parse(unknown.body)["error"]["param"], "now");
  auto refused = f.post("/admin/scale", R"({"ranks": 3})", key);
  EXPECT_EQ(refused.status, 400);
  EXPECT_NE(json::parse(refused.body)["error"]["message"].get<std::string>().find("divide"), std::string::npos);
  EXPECT_TRUE(admin.asked.empty()) << "nothing refused reached the group";
  auto ok = f.post("/admin/scale", R"({"ranks": 4})", key);
  EXPECT_EQ(ok.status, 202) << ok.body;
  EXPECT_EQ(admin.asked, std::vector<int64_t>{4});
  auto st = f.get("/admin/scale", key);
  EXPECT_EQ(st.status, 200);
  EXPECT_EQ(json::parse(st.body)["ranks"], 1);
}

TEST(HttpServer, BadRequestsGet4xxErrorObjectsAndNeverReachTheBackend) {
  server_fixture f("", /*max_prompt=*/10);
  auto bad_json = f.post("/v1/completions", "{oops");
  EXPECT_EQ(bad_json.status, 400);
  EXPECT_NE(json::parse(bad_json.body)["error"]["message"].get<std::string>().find("not valid JSON"),
            std::string::npos);
  auto bad_field = f.post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "top_p": 7})");
  EXPECT_EQ(json::parse(bad_field.body)["error"]["param"], "top_p");
  auto unknown = f.post("/v1/completions", R"({"prompt": "x", "mirostat": 2})");
  EXPECT_EQ(unknown.status, 400);
  EXPECT_EQ(json::parse(unknown.body)["error"]["param"], "mirostat");
  auto tools = f.post("/v1/chat/completions",
                      R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})");
  EXPECT_EQ(tools.status, 400);
  EXPECT_EQ(json::parse(tools.body)["error"]["param"], "tools");
  auto model = f.post("/v1/completions", R"({"prompt": "x", "model": "gpt-9"})");
  EXPECT_EQ(model.status, 404);
  EXPECT_EQ(json::parse(model.body)["error"]["code"], "model_not_found");
  EXPECT_EQ(json::parse(model.body)["error"]["param"], "model");
  auto too_long = f.post("/v1/completions", R"({"prompt": "far more than ten bytes"})");
  EXPECT_EQ(too_long.status, 400);
  EXPECT_EQ(json::parse(too_long.body)["error"]["code"], "context_length_exceeded");
  auto big = f.post("/v1/completions", R"({"prompt": ")" + std::string(size_t{1} << 20, 'a') + "\"}");
  EXPECT_EQ(big.status, 413);
  EXPECT_EQ(json::parse(big.body)["error"]["type"], "invalid_request_error");
  EXPECT_EQ(f.backend.submitted(), 0u);
}

TEST(HttpServer, JsonAnswerCollectsTheTextAndUsage) {
  server_fixture f;
  auto r = f.post("/v1/completions", R"({"prompt": [1, 2, 3, 4], "max_tokens": 3, "model": "tiny-test"})");
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  EXPECT_EQ(j["choices"][0]["text"], "Hello world");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(j["usage"]["prompt_tokens"], 4);
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  EXPECT_EQ(j["model"], "tiny-test");
  EXPECT_EQ(j["id"].get<std::string>().rfind("cmpl-", 0), 0u);
}

TEST(HttpServer, StreamSendsOneEventPerPieceThenDone) {
  server_fixture f;
  auto r = f.post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "hi"}], "stream": true,
                                              "stream_options": {"include_usage": true}})");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.headers.at("content-type"), "text/event-stream");
  bool done = false;
  const auto events = sse(r.body, &done);
  EXPECT_TRUE(done);
  ASSERT_EQ(events.size(), 5u);  // 3 pieces, the finish chunk, the usage chunk
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (size_t i = 0; i < 3; ++i) text += events[i]["choices"][0]["delta"]["content"].get<std::string>();
  EXPECT_EQ(text, "Hello world");
  EXPECT_EQ(events[3]["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(events[4]["usage"]["completion_tokens"], 3);
}

TEST(HttpServer, SeveralPromptsTimesNSamplesAreChoicesInOrder) {
  server_fixture f;
  auto r = f.post("/v1/completions", R"({"prompt": ["ab", "cde"], "n": 2, "max_tokens": 3})");
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  ASSERT_EQ(j["choices"].size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(j["choices"][i]["index"], i);
    EXPECT_EQ(j["choices"][i]["text"], "Hello world");
  }
  EXPECT_EQ(j["usage"]["prompt_tokens"], 5);       // each prompt once
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);  // every sample's tokens
  std::lock_guard<std::mutex> g(f.backend.mu);
  ASSERT_EQ(f.backend.subs.size(), 2u);  // one submission per prompt, n samples each (shared KV)
  EXPECT_EQ(f.backend.subs[0].samples, 2);
  EXPECT_EQ(f.backend.subs[1].prompt.size(), 3u);
}

TEST(HttpServer, BestOfReturnsTheMostLikelySamples) {
  server_fixture f;
  f.backend.pieces = {"a"};
  auto r = f.post("/v1/completions", R"({"prompt": "x", "best_of": 3, "n": 2, "max_tokens": 1, "logprobs": 0})");
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  ASSERT_EQ(j["choices"].size(), 2u);
  std::lock_guard<std::mutex> g(f.backend.mu);
  EXPECT_EQ(f.backend.subs[0].samples, 3);
  EXPECT_TRUE(f.backend.subs[0].cumulative_logprob);
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  auto stream = f.post("/v1/completions", R"({"prompt": "x", "best_of": 3, "stream": true})");
  EXPECT_EQ(stream.status, 400);
  EXPECT_EQ(json::parse(stream.body)["error"]["param"], "best_of");
}

TEST(HttpServer, EchoWithLogprobsRendersThePromptFirst) {
  server_fixture f;
  f.backend.pieces = {"A", "B"};
  auto r = f.post("/v1/completions", R"({"prompt": [5, 6, 7], "echo": true, "logprobs": 1, "max_tokens": 2})");
  ASSERT_EQ(r.status, 200) << r.body;
  const json lp = json::parse(r.body)["choices"][0]["logprobs"];
  std::lock_guard<std::mutex> g(f.backend.mu);
  EXPECT_TRUE(f.backend.subs[0].prompt_logprobs);
  ASSERT_EQ(lp["tokens"].size(), 5u);  // 3 prompt tokens, 2 generated
  EXPECT_EQ(lp["tokens"][0], "t5");
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  EXPECT_EQ(lp["token_logprobs"][1], -0.5);
  EXPECT_EQ(lp["top_logprobs"][1]["t7"], -0.25);  // the alternative and the token itself
  EXPECT_EQ(lp["top_logprobs"][1]["t6"], -0.5);
  EXPECT_EQ(lp["token_logprobs"][3], -1.0);
  EXPECT_EQ(lp["top_logprobs"][3]["bytes:\\xe2\\x82"], -0.5);  // a partial UTF-8 character shown as bytes
  EXPECT_EQ(lp["top_logprobs"][3].size(), 2u);                 // logprobs 1: one alternative + the token
  EXPECT_EQ(lp["text_offset"], json({0, 2, 4, 6, 8}));
}

TEST(HttpServer, ChatLogprobsHaveTokensBytesAndTopLogprobs) {
  server_fixture f;
  f.backend.pieces = {"A"};
  auto r = f.post("/v1/chat/completions",
                  R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 2})");
  ASSERT_EQ(r.status, 200) << r.body;
  const json c = json::parse(r.body)["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0]["token"], "t0");
  EXPECT_EQ(c[0]["logprob"], -1.0);
  EXPECT_EQ(c[0]["bytes"], json({116, 48}));
  ASSERT_EQ(c[0]["top_logprobs"].size(), 2u);
  EXPECT_EQ(c[0]["top_logprobs"][0]["bytes"], json({0xe2, 0x82}));
  auto no = f.post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})");
  EXPECT_EQ(no.status, 400);
}

TEST(HttpServer, ARefusalThatComesLaterIsTheAnswer) {
  server_fixture f;
  f.backend.refuse = "the server is full; retry later";
  auto r = f.post("/v1/completions", R"({"prompt": "x"})");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(json::parse(r.body)["error"]["message"], "the server is full; retry later");
  auto s = f.post("/v1/completions", R"({"prompt": "x", "stream": true})");
  EXPECT_EQ(s.status, 503);
}

TEST(HttpServer, EveryAnswerComesWhateverTheOrderOfEventsAndFailures) {
  server_fixture f;
  f.backend.finish_before_accept = true;  // a backend may finish a request before it says it took it
  auto s = f.post("/v1/completions", R"({"prompt": ["a", "b"], "n": 2, "stream": true})");
  ASSERT_EQ(s.status, 200);
  bool done = false;
  const auto events = sse(s.body, &done);
  EXPECT_TRUE(done);
  EXPECT_EQ(events.size(), 8u);  // 4 choices x (text, finish)
  auto j = f.post("/v1/completions", R"({"prompt": "a", "n": 3})");
  ASSERT_EQ(j.status, 200);
  EXPECT_EQ(json::parse(j.body)["choices"].size(), 3u);
  // Failures that are not api_errors (a tokenizer that throws, a malformed content part) still get answers.
  auto t = f.post("/v1/completions", R"({"prompt": "THROW"})");
  EXPECT_EQ(t.status, 500);
  EXPECT_NE(json::parse(t.body)["error"]["message"].get<std::string>().find("the tokenizer broke"), std::string::npos);
  auto c = f.post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": [{"type": 1, "text": "x"}]}]})");
  EXPECT_EQ(c.status, 400);
  EXPECT_EQ(json::parse(c.body)["error"]["param"], "messages[0].content");
}

TEST(HttpServer, AClientLeavingMidStreamAbortsItsRequest) {
  server_fixture f;
  f.backend.endless = true;
  f.backend.delay_ms = 5;
  raw_conn c(f.server->port());
  ASSERT_TRUE(c.send(http_post("/v1/completions", R"({"prompt": "x", "stream": true, "max_tokens": 4096})")));
  ASSERT_TRUE(c.read_until([](const std::string& b) { return b.find("data: ") != std::string::npos; }, 5000));
  c.close();
  EXPECT_TRUE(eventually([&] { return f.server->client_disconnects() == 1; }));
  EXPECT_TRUE(eventually([&] { return f.backend.aborted_count() == 1; }));
}

TEST(HttpServer, AClientLeavingBeforeAWholeAnswerAbortsItsRequest) {
  server_fixture f;
  f.backend.endless = true;
  f.backend.delay_ms = 5;
  raw_conn c(f.server->port());
  ASSERT_TRUE(c.send(http_post("/v1/completions", R"({"prompt": ["x", "y"], "max_tokens": 4096})")));
  ASSERT_TRUE(eventually([&] { return f.backend.submitted() == 2; }));
  c.close();  // not streamed: the answer would come only at the end
  EXPECT_TRUE(eventually([&] { return f.server->client_disconnects() == 1; }));
  EXPECT_TRUE(eventually([&] { return f.backend.aborted_count() == 2; }));  // every prompt's submission
}

}  // namespace
