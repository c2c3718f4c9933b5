// elastic/server/http_server.h — the HTTP front of `troupe serve` (cpp-httplib): OpenAI-compatible
// /v1/completions and /v1/chat/completions (JSON or server-sent events), /v1/models, /health and
// /metrics, in front of a generation_backend (the serving engine).
//
//   http_server srv(backend, {.host = "127.0.0.1", .port = 0, .api_key = "sk-local"});
//   srv.start();                       // listens on a thread of its own
//   int port = srv.port();             // the bound port (0 asked for any free one)
//   srv.stop();                        // stops listening, waits for the handlers
//
// Invariants:
//   1. Binds 127.0.0.1 unless told otherwise. With api_key set, every /v1 request needs
//      `Authorization: Bearer <key>` (401 with an OpenAI error object otherwise); /health and
//      /metrics stay open.
//   2. A request is parsed and checked (openai_api.h) and its prompt tokenized and length-checked
//      before the backend sees it; anything wrong gets its 4xx and an OpenAI error object, and the
//      backend is never called. Backend failures are 500 server_error with the reason.
//   3. stream: true answers text/event-stream: one `data:` chunk per piece of text the backend
//      emits, the finish reason in the last chunk, `data: [DONE]`. When the client goes away the
//      request is aborted in the backend (its KV blocks and batch slot freed) at once.
//   4. The handlers block only on their own request; the backend runs requests on its own threads.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "elastic/server/openai_api.h"

namespace httplib {
class Server;
}

namespace troupe::elastic {

// What the backend reports while a request runs (on its own thread).
struct generation_event {
  std::string text;                // newly decoded text, safe to show (stop strings held back)
  std::vector<int32_t> token_ids;  // the tokens it came from
  bool finished = false;
  std::string finish_reason;       // when finished: "stop" | "length" | "abort" | "error"
  std::string error;               // finish_reason "error": what failed
  int64_t prompt_tokens = 0, completion_tokens = 0;
};
using generation_callback = std::function<void(const generation_event&)>;

class generation_backend {
 public:
  virtual ~generation_backend() = default;
  virtual std::string model_id() const = 0;
  // The prompt's token ids (chat: the chat template applied); throws api_error for input the
  // model cannot take (e.g. a token id >= the vocabulary).
  virtual std::vector<int32_t> prompt_tokens(const completion_request& r) = 0;
  // Queues a request; `on_event` is called for each piece of text and exactly once with
  // finished = true (also after abort). Returns without waiting.
  virtual void submit(const std::string& id, const completion_request& r, std::vector<int32_t> prompt,
                      generation_callback on_event) = 0;
  // Stops a running or queued request and frees what it holds; finished arrives with "abort".
  virtual void abort(const std::string& id) = 0;
  // Prometheus text exposition of the backend's metrics (appended to the server's own).
  virtual std::string metrics_text() = 0;
};

struct http_options {
  std::string host = "127.0.0.1";
  int port = 8000;                // 0 = any free port
  std::string api_key;            // "" = no authentication
  api_limits limits;
  int threads = 8;                // HTTP worker threads (each blocks on one request)
};

class http_server {
 public:
  http_server(generation_backend& backend, http_options options);
  ~http_server();
  http_server(const http_server&) = delete;
  http_server& operator=(const http_server&) = delete;

  // Binds and starts listening on a thread of its own; throws errc::io naming host:port.
  void start();
  int port() const { return port_; }
  void stop();
  // Requests answered so far per status class, and streams cut by their client (for tests, metrics).
  int64_t client_disconnects() const;

 private:
  struct state;
  generation_backend& backend_;
  http_options o_;
  std::unique_ptr<httplib::Server> server_;
  std::shared_ptr<state> st_;
  std::thread listener_;
  int port_ = 0;
};

}  // namespace troupe::elastic
