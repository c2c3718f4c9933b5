// The HTTP front of `troupe serve` (elastic/server/http_server.h) over real sockets on 127.0.0.1
// with httplib's client: health, models, the API key, 4xx error objects before the backend is
// reached, JSON and server-sent-event answers, and a client that leaves mid-stream getting its
// request aborted in the backend. The backend here replays scripted text pieces (the engine's
// own HTTP test drives the real model: serve_test).
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "elastic/server/http_server.h"

namespace {

using namespace troupe::elastic;
using json = nlohmann::json;

// Emits `pieces` one every `delay_ms` on a thread of its own; forever (until abort) when endless.
class scripted_backend final : public generation_backend {
 public:
  std::vector<std::string> pieces{"Hel", "lo", " world"};
  int delay_ms = 1;
  bool endless = false;
  std::atomic<int> submitted{0};
  std::mutex mu;
  std::set<std::string> aborted;
  std::vector<std::thread> threads;

  ~scripted_backend() override {
    for (auto& t : threads) t.join();
  }
  std::string model_id() const override { return "tiny-test"; }
  std::vector<int32_t> prompt_tokens(const completion_request& r) override {
    if (r.prompt_is_ids) return r.prompt_ids;
    std::string text = r.prompt;
    for (const auto& m : r.messages) text += m.role + ":" + m.content + "\n";
    return std::vector<int32_t>(text.begin(), text.end());  // one id per byte
  }
  void submit(const std::string& id, const completion_request&, std::vector<int32_t> prompt,
              generation_callback cb) override {
    ++submitted;
    threads.emplace_back([this, id, cb, n = static_cast<int64_t>(prompt.size())] {
      int64_t made = 0;
      for (size_t i = 0; endless || i < pieces.size(); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
        {
          std::lock_guard<std::mutex> g(mu);
          if (aborted.count(id)) {
            cb({"", {}, true, "abort", "", n, made});
            return;
          }
        }
        cb({pieces[i % pieces.size()], {static_cast<int32_t>(i)}, false, "", "", n, ++made});
      }
      cb({"", {}, true, "length", "", n, made});
    });
  }
  void abort(const std::string& id) override {
    std::lock_guard<std::mutex> g(mu);
    aborted.insert(id);
  }
  std::string metrics_text() override { return "troupe_test_backend_up 1\n"; }
};

struct server_fixture {
  scripted_backend backend;
  std::unique_ptr<http_server> server;
  explicit server_fixture(const std::string& key = "", int64_t max_prompt = 1000) {
    http_options o;
    o.port = 0;
    o.api_key = key;
    o.limits.max_prompt_tokens = max_prompt;
    server = std::make_unique<http_server>(backend, o);
    server->start();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", server->port());
    c.set_read_timeout(10, 0);
    return c;
  }
};

TEST(HttpServer, HealthModelsAndMetrics) {
  server_fixture f;
  auto c = f.client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  auto m = c.Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(json::parse(m->body)["data"][0]["id"], "tiny-test");
  auto p = c.Get("/metrics");
  ASSERT_TRUE(p);
  EXPECT_NE(p->body.find("troupe_http_responses_total{code=\"200\"} 2"), std::string::npos) << p->body;
  EXPECT_NE(p->body.find("troupe_test_backend_up 1"), std::string::npos);
}

TEST(HttpServer, ApiKeyIsRequiredOnV1Only) {
  server_fixture f("sk-secret");
  auto c = f.client();
  auto no = c.Post("/v1/completions", R"({"prompt": "x"})", "application/json");
  ASSERT_TRUE(no);
  EXPECT_EQ(no->status, 401);
  EXPECT_EQ(json::parse(no->body)["error"]["type"], "authentication_error");
  EXPECT_EQ(c.Get("/health")->status, 200);
  httplib::Headers auth{{"Authorization", "Bearer sk-secret"}};
  auto yes = c.Post("/v1/completions", auth, R"({"prompt": "x"})", "application/json");
  ASSERT_TRUE(yes);
  EXPECT_EQ(yes->status, 200);
  EXPECT_EQ(f.backend.submitted.load(), 1);
}

TEST(HttpServer, BadRequestsGet4xxErrorObjectsAndNeverReachTheBackend) {
  server_fixture f("", /*max_prompt=*/10);
  auto c = f.client();
  auto bad_json = c.Post("/v1/completions", "{oops", "application/json");
  ASSERT_TRUE(bad_json);
  EXPECT_EQ(bad_json->status, 400);
  EXPECT_NE(json::parse(bad_json->body)["error"]["message"].get<std::string>().find("not valid JSON"),
            std::string::npos);
  auto bad_field = c.Post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "top_p": 7})",
                          "application/json");
  ASSERT_TRUE(bad_field);
  EXPECT_EQ(bad_field->status, 400);
  EXPECT_EQ(json::parse(bad_field->body)["error"]["param"], "top_p");
  auto too_long = c.Post("/v1/completions", R"({"prompt": "far more than ten bytes"})", "application/json");
  ASSERT_TRUE(too_long);
  EXPECT_EQ(too_long->status, 400);
  EXPECT_EQ(json::parse(too_long->body)["error"]["code"], "context_length_exceeded");
  std::string huge = R"({"prompt": ")" + std::string(size_t{1} << 20, 'a') + "\"}";
  auto big = c.Post("/v1/completions", huge, "application/json");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
  EXPECT_EQ(f.backend.submitted.load(), 0);
}

TEST(HttpServer, JsonAnswerCollectsTheTextAndUsage) {
  server_fixture f;
  auto c = f.client();
  auto r = c.Post("/v1/completions", R"({"prompt": [1, 2, 3, 4], "max_tokens": 3})", "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  EXPECT_EQ(j["choices"][0]["text"], "Hello world");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 4);
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  EXPECT_EQ(j["model"], "tiny-test");
  EXPECT_EQ(j["id"].get<std::string>().rfind("cmpl-", 0), 0u);
}

TEST(HttpServer, StreamSendsOneEventPerPieceThenDone) {
  server_fixture f;
  auto c = f.client();
  std::string body;
  auto r = c.Post("/v1/chat/completions",
                  R"({"messages": [{"role": "user", "content": "hi"}], "stream": true,
                      "stream_options": {"include_usage": true}})",
                  "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200);
  EXPECT_EQ(r->get_header_value("Content-Type"), "text/event-stream");
  std::vector<json> events;
  size_t pos = 0;
  bool done = false;
  while ((pos = r->body.find("data: ", pos)) != std::string::npos) {
    const size_t end = r->body.find("\n\n", pos);
    const std::string data = r->body.substr(pos + 6, end - pos - 6);
    if (data == "[DONE]") done = true;
    else events.push_back(json::parse(data));
    pos = end;
  }
  EXPECT_TRUE(done);
  ASSERT_EQ(events.size(), 5u);  // 3 pieces, the finish chunk, the usage chunk
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (size_t i = 0; i < 3; ++i) text += events[i]["choices"][0]["delta"]["content"].get<std::string>();
  EXPECT_EQ(text, "Hello world");
  EXPECT_EQ(events[3]["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(events[4]["usage"]["completion_tokens"], 3);
}

TEST(HttpServer, AClientLeavingMidStreamAbortsItsRequest) {
  server_fixture f;
  f.backend.endless = true;
  f.backend.delay_ms = 5;
  // A raw socket: send the request, read the first bytes of the stream, close.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(f.server->port()));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  const std::string body = R"({"prompt": "x", "stream": true, "max_tokens": 4096})";
  const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(::write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  char buf[512];
  ASSERT_GT(::read(fd, buf, sizeof(buf)), 0);
  ::close(fd);
  // The server notices at its next write and aborts the request in the backend.
  const auto t0 = std::chrono::steady_clock::now();
  while (f.server->client_disconnects() == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(f.server->client_disconnects(), 1);
  std::lock_guard<std::mutex> g(f.backend.mu);
  EXPECT_EQ(f.backend.aborted.size(), 1u);
}

}  // namespace
