// elastic/server/http_server.cpp — see http_server.h.
#include "elastic/server/http_server.h"

#include <fmt/format.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <random>

#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::elastic {

namespace log = runtime::log;
using runtime::errc;

namespace {

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// One request's events, handed from the backend's thread to the HTTP handler's.
struct request_stream {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<generation_event> events;
  bool finished = false;

  void push(const generation_event& e) {
    std::lock_guard<std::mutex> g(mu);
    events.push_back(e);
    if (e.finished) finished = true;
    cv.notify_all();
  }
  // Waits up to `ms` for events; returns those that arrived (possibly none).
  std::deque<generation_event> take(int ms) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait_for(lock, std::chrono::milliseconds(ms), [&] { return !events.empty(); });
    std::deque<generation_event> out;
    out.swap(events);
    return out;
  }
};

void send_error(httplib::Response& res, const api_error& e) {
  res.status = e.status;
  res.set_content(error_json(e), "application/json");
}

}  // namespace

struct http_server::state {
  std::atomic<int64_t> next_id{1};
  std::string id_prefix;
  std::atomic<int64_t> disconnects{0};
  std::mutex mu;
  std::map<int, int64_t> responses;  // status -> count
  std::atomic<int64_t> in_flight{0};
  void count(int status) {
    std::lock_guard<std::mutex> g(mu);
    ++responses[status];
  }
};

http_server::http_server(generation_backend& backend, http_options options)
    : backend_(backend), o_(std::move(options)), server_(std::make_unique<httplib::Server>()),
      st_(std::make_shared<state>()) {
  std::random_device rd;
  st_->id_prefix = fmt::format("{:08x}", rd());
  const int threads = std::max(1, o_.threads);
  server_->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  // httplib answers a bare 413 above this; between the limit and it, the OpenAI error object (openai_api.h).
  server_->set_payload_max_length(o_.limits.max_body_bytes * 2 + 1024);
  server_->set_keep_alive_max_count(1000);

  auto authorized = [this](const httplib::Request& req, httplib::Response& res) {
    if (o_.api_key.empty()) return true;
    if (req.get_header_value("Authorization") == "Bearer " + o_.api_key) return true;
    send_error(res, api_error(401, "authentication_error",
                              "missing or wrong API key: send `Authorization: Bearer <key>`", "", "invalid_api_key"));
    st_->count(401);
    return false;
  };

  server_->Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
    st_->count(200);
  });
  server_->Get("/v1/models", [this, authorized](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    res.set_content(models_json({backend_.model_id()}, unix_now(), "troupe"), "application/json");
    st_->count(200);
  });
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    std::string text = "# HELP troupe_http_responses_total HTTP responses by status code.\n"
                       "# TYPE troupe_http_responses_total counter\n";
    {
      std::lock_guard<std::mutex> g(st_->mu);
      for (const auto& [status, n] : st_->responses)
        text += fmt::format("troupe_http_responses_total{{code=\"{}\"}} {}\n", status, n);
    }
    text += fmt::format(
        "# HELP troupe_http_in_flight Requests being answered.\n# TYPE troupe_http_in_flight gauge\n"
        "troupe_http_in_flight {}\n"
        "# HELP troupe_http_client_disconnects_total Streams cut by the client (their requests aborted).\n"
        "# TYPE troupe_http_client_disconnects_total counter\ntroupe_http_client_disconnects_total {}\n",
        st_->in_flight.load(), st_->disconnects.load());
    text += backend_.metrics_text();
    res.set_content(text, "text/plain; version=0.0.4");
  });

  auto completions = [this, authorized](bool chat) {
    return [this, authorized, chat](const httplib::Request& req, httplib::Response& res) {
      if (!authorized(req, res)) return;
      completion_request r;
      std::vector<int32_t> prompt;
      try {
        r = parse_completion_request(req.body, chat, o_.limits);
        prompt = backend_.prompt_tokens(r);
        if (static_cast<int64_t>(prompt.size()) > o_.limits.max_prompt_tokens)
          throw api_error(400, "invalid_request_error",
                          fmt::format("the prompt has {} tokens; this server takes at most {}", prompt.size(),
                                      o_.limits.max_prompt_tokens),
                          chat ? "messages" : "prompt", "context_length_exceeded");
        if (prompt.empty())
          throw api_error(400, "invalid_request_error", "the prompt is empty", chat ? "messages" : "prompt");
      } catch (const api_error& e) {
        send_error(res, e);
        st_->count(e.status);
        return;
      }
      const std::string id = fmt::format("{}-{}{:x}", chat ? "chatcmpl" : "cmpl", st_->id_prefix, st_->next_id++);
      const int64_t created = unix_now();
      const std::string model = r.model.empty() ? backend_.model_id() : r.model;
      auto stream = std::make_shared<request_stream>();
      try {
        backend_.submit(id, r, prompt, [stream](const generation_event& e) { stream->push(e); });
      } catch (const api_error& e) {  // the backend refused the input (400) or is full (503)
        send_error(res, e);
        st_->count(e.status);
        return;
      } catch (const std::exception& e) {
        send_error(res, api_error(500, "server_error", fmt::format("the engine refused the request: {}", e.what())));
        st_->count(500);
        return;
      }
      ++st_->in_flight;
      if (!r.stream) {
        completion_result out{id, created, model, "", "", static_cast<int64_t>(prompt.size()), 0};
        for (bool done = false; !done;) {
          for (const auto& e : stream->take(1000)) {
            out.text += e.text;
            if (!e.finished) continue;
            done = true;
            out.finish_reason = e.finish_reason;
            out.completion_tokens = e.completion_tokens;
            if (e.finish_reason == "error") {
              --st_->in_flight;
              send_error(res, api_error(500, "server_error", "generation failed: " + e.error));
              st_->count(500);
              return;
            }
          }
        }
        --st_->in_flight;
        res.set_content(completion_response_json(out, chat), "application/json");
        st_->count(200);
        return;
      }
      // stream: true — server-sent events, the request aborted as soon as the client is gone.
      auto st = st_;
      generation_backend* backend = &backend_;
      auto first = std::make_shared<bool>(true);
      auto done = std::make_shared<bool>(false);
      const bool usage = r.include_usage;
      const int64_t prompt_n = static_cast<int64_t>(prompt.size());
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream",
          [=](size_t, httplib::DataSink& sink) {
            if (*done) return false;
            if (!sink.is_writable()) return false;  // the client left: the releaser aborts
            for (const auto& e : stream->take(100)) {
              std::string out;
              if (e.finished && e.finish_reason == "error") {
                out += sse_event(error_json(api_error(500, "server_error", "generation failed: " + e.error)));
              } else if (!e.text.empty() || e.finished) {
                out += sse_event(chunk_json(id, created, model, e.text,
                                            e.finished ? std::optional<std::string>(e.finish_reason) : std::nullopt,
                                            chat, *first));
                *first = false;
              }
              if (e.finished) {
                if (usage) out += sse_event(usage_chunk_json(id, created, model, prompt_n, e.completion_tokens, chat));
                out += sse_done();
              }
              if (!out.empty() && !sink.write(out.data(), out.size())) return false;
              if (e.finished) {
                *done = true;
                sink.done();
                return true;
              }
            }
            return true;
          },
          [=](bool success) {
            --st->in_flight;
            st->count(200);
            if (!*done) {  // cut before the end: free the request's resources now
              ++st->disconnects;
              log::info("serve: client of {} went away mid-stream (success={}); aborting it", id, success);
              backend->abort(id);
            }
          });
    };
  };
  server_->Post("/v1/completions", completions(false));
  server_->Post("/v1/chat/completions", completions(true));
}

http_server::~http_server() { stop(); }

void http_server::start() {
  TROUPE_CHECK(!listener_.joinable(), errc::invalid_argument, "http_server: already started");
  if (o_.port == 0) {
    port_ = server_->bind_to_any_port(o_.host.c_str());
    TROUPE_CHECK(port_ > 0, errc::io, "serve: cannot listen on {}:<any port>", o_.host);
  } else {
    TROUPE_CHECK(server_->bind_to_port(o_.host.c_str(), o_.port), errc::io,
                 "serve: cannot listen on {}:{} (in use? another host name?)", o_.host, o_.port);
    port_ = o_.port;
  }
  listener_ = std::thread([this] { server_->listen_after_bind(); });
  log::info("serve: listening on http://{}:{}", o_.host, port_);
}

void http_server::stop() {
  if (!listener_.joinable()) return;
  server_->stop();
  listener_.join();
}

int64_t http_server::client_disconnects() const { return st_->disconnects.load(); }

}  // namespace troupe::elastic
