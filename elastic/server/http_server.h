// elastic/server/http_server.h — the OpenAI-compatible HTTP server of `troupe serve`:
// /v1/completions and /v1/chat/completions (JSON or server-sent events), /v1/models, /health and
// /metrics on the event-driven front (http_front.h), in front of a generation_backend (the engine).
//
//   http_server srv(backend, {.host = "127.0.0.1", .port = 0, .api_key = "sk-local"});
//   srv.start();                       // the front's I/O threads
//   int port = srv.port();             // the bound port (0 asked for any free one)
//   srv.stop();                        // closes every connection (their requests are aborted)
//
// Invariants:
//   1. Binds 127.0.0.1 unless told otherwise. With api_key set, every /v1 request needs
//      `Authorization: Bearer <key>` (401 with an OpenAI error object otherwise; keys are compared in
//      a time that does not depend on where they differ); /health and /metrics stay open. Unknown
//      routes are 404, other methods 405, both with error objects.
//   2. A request is parsed and checked (openai_api.h), its model name matched (404
//      model_not_found otherwise) and its prompts tokenized and length-checked before the backend
//      sees it; anything wrong gets its 4xx and an OpenAI error object, and the backend is never
//      called. Backend failures are 500 server_error with the reason.
//   3. Each prompt is one submission of best_of samples (the backend shares the prompt's KV
//      between them); the answer holds n choices per prompt (the n samples with the highest
//      cumulative logprob when best_of > n), choice index = prompt index * n + rank.
//   4. stream: true answers text/event-stream: one `data:` chunk per piece of text of a choice,
//      its finish reason in its last chunk, a usage chunk when asked, `data: [DONE]`.
//   5. When the client goes away before its answer ended — streamed or not — every submission of
//      the request is aborted in the backend at once (their KV blocks and batch slots freed).
//   6. No HTTP thread ever waits on the backend: parsing, tokenizing and submitting run on the
//      front's work pool, the backend's events are written as they come.
//   7. /admin/scale (GET: the group's size and its last change; POST {"ranks": M}: change it) needs
//      `Authorization: Bearer <admin_key>`, a key of its own (the API key does not open it); without
//      an admin_key or a scale_admin it is 403. A refused change is its 4xx and changes nothing; an
//      accepted one is 202 and runs beside serving.
#pragma once
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "elastic/server/http_front.h"
#include "elastic/server/openai_api.h"

namespace troupe::elastic {

// What the backend reports while a submission runs (on its own thread).
struct generation_event {
  int64_t index = 0;               // which sample of the submission
  std::string text;                // newly decoded text, safe to show (stop strings held back)
  std::vector<int32_t> token_ids;  // the tokens it came from
  std::vector<token_logprob> logprobs;         // one per token of token_ids, when asked
  std::vector<token_logprob> prompt_logprobs;  // the prompt's tokens (first without a logprob), once, when asked
  bool finished = false;
  std::string finish_reason;       // when finished: "stop" | "length" | "abort" | "error"
  std::string error;               // finish_reason "error": what failed
  int64_t prompt_tokens = 0, completion_tokens = 0;
  double cumulative_logprob = 0;   // the sample's generated tokens' logprobs summed, when asked
};
using generation_callback = std::function<void(const generation_event&)>;
// nullptr: the backend took the submission; else why not (an api_error, or any exception: 500).
using accepted_callback = std::function<void(std::exception_ptr)>;

struct generation_submission {
  std::string id;                        // unique; abort(id) stops every sample
  const completion_request* request = nullptr;  // valid until the last sample finished
  std::vector<int32_t> prompt;
  int64_t samples = 1;                   // best_of samples of this prompt (seeds seed + i)
  bool cumulative_logprob = false;       // report it (best_of > n)
  bool prompt_logprobs = false;          // echo with logprobs: the prompt's logprobs too
  generation_callback on_event;          // every sample: text events, then exactly one finished
  accepted_callback on_accepted;         // exactly once, before or after the first events
};

class generation_backend {
 public:
  virtual ~generation_backend() = default;
  virtual std::string model_id() const = 0;
  // The token ids of completions prompt i, or of the chat (the chat template applied); throws
  // api_error for input the model cannot take (e.g. a token id >= the vocabulary).
  virtual std::vector<int32_t> prompt_tokens(const completion_request& r, size_t i) = 0;
  // The text shown for echo: prompt i as text (ids decoded).
  virtual std::string prompt_text(const completion_request& r, size_t i) = 0;
  // The raw bytes of a token (special tokens by name), for logprobs.
  virtual std::string token_bytes(int32_t id) const = 0;
  // Queues a submission without waiting (thread-safe); the answer comes through on_accepted.
  virtual void submit(generation_submission s) = 0;
  // Stops a running or queued submission and frees what it holds; finished arrives with "abort".
  virtual void abort(const std::string& id) = 0;
  // Prometheus text exposition of the backend's metrics (appended to the server's own).
  virtual std::string metrics_text() = 0;
};

// The serving group's size behind /admin/scale (invariant 7). Both return a JSON object.
class scale_admin {
 public:
  virtual ~scale_admin() = default;
  // Starts a change to `ranks` ranks (thread-safe); throws api_error with its 4xx when refused.
  virtual std::string request_scale(int64_t ranks) = 0;
  virtual std::string scale_status() = 0;
};

struct http_options {
  std::string host = "127.0.0.1";
  int port = 8000;                // 0 = any free port
  std::string api_key;            // "" = no authentication
  api_limits limits;
  int io_threads = 1;             // the front's event loop threads
  int work_threads = 2;           // parsing, tokenizing, submitting
  int max_connections = 16384;
  int idle_timeout_ms = 75000;    // keep-alive connections without a request
  std::string admin_key;          // /admin/*: "" = off (invariant 7)
  scale_admin* admin = nullptr;
};

class http_server {
 public:
  http_server(generation_backend& backend, http_options options);
  ~http_server();
  http_server(const http_server&) = delete;
  http_server& operator=(const http_server&) = delete;

  // Binds and starts the front; throws errc::io naming host:port.
  void start();
  int port() const;
  void stop();
  // Requests whose client left before the answer ended (each was aborted in the backend).
  int64_t client_disconnects() const;
  http_front& front() { return *front_; }

  struct state;

 private:
  void start_completion(const std::shared_ptr<http_exchange>& ex, bool chat);
  generation_backend& backend_;
  http_options o_;
  std::unique_ptr<http_front> front_;
  std::shared_ptr<state> st_;
};

}  // namespace troupe::elastic
