// elastic/server/http_server.cpp — see http_server.h.
#include "elastic/server/http_server.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <mutex>
#include <numeric>
#include <nlohmann/json.hpp>
#include <random>

#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::elastic {

namespace log = runtime::log;
using runtime::errc;

namespace {

// `Authorization: Bearer <key>`, compared in a time that does not depend on where the key differs.
bool bearer_matches(const std::string& header, const std::string& key) {
  const std::string want = "Bearer " + key;
  if (header.size() != want.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < want.size(); ++i) diff |= static_cast<unsigned char>(header[i] ^ want[i]);
  return diff == 0;
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

const char* error_type(int status) {
  if (status == 401) return "authentication_error";
  return status >= 500 ? "server_error" : "invalid_request_error";
}

}  // namespace

struct http_server::state {
  std::atomic<int64_t> next_id{1};
  std::string id_prefix;
  std::atomic<int64_t> disconnects{0};
  std::atomic<int64_t> in_flight{0};
  std::mutex mu;
  std::map<int, int64_t> responses;  // status -> count
  void count(int status) {
    std::lock_guard<std::mutex> g(mu);
    ++responses[status];
  }
  void send_error(http_exchange& ex, const api_error& e) {
    ex.respond(e.status, "application/json", error_json(e));
    count(e.status);
  }
};

namespace {

// One completions request: its submissions (one per prompt, best_of samples each), fed by the
// backend's events on any thread and answered through the exchange (invariants 3-5).
struct completion_job : std::enable_shared_from_this<completion_job> {
  struct sample {
    std::string text;
    std::vector<token_logprob> logprobs;
    std::string finish_reason, error;
    int64_t completion_tokens = 0;
    double cumulative_logprob = 0;
    bool done = false, started = false;  // started: its first chunk went out (stream)
    int64_t text_offset = 0;             // stream: where the next chunk's logprob tokens start
  };

  std::shared_ptr<http_exchange> ex;
  std::shared_ptr<http_server::state> st;
  generation_backend* backend = nullptr;
  completion_request req;
  stream_head head;
  std::vector<std::string> sub_ids;                   // per prompt
  std::vector<std::string> echo_text;                 // per prompt, with echo
  std::vector<int64_t> prompt_tokens;                 // per prompt
  std::vector<std::vector<token_logprob>> prompt_lps; // per prompt, with echo and logprobs
  std::vector<std::vector<sample>> samples;           // [prompt][sample]

  std::mutex mu;
  size_t accepted = 0;
  bool over = false;      // answered whole, refused, failed or the client left: nothing more is sent
  bool streaming = false;
  int64_t running = 0;    // samples not finished
  std::vector<std::pair<size_t, generation_event>> held;  // stream events before every submission was accepted

  token_namer names() const {
    return [b = backend](int32_t id) { return b->token_bytes(id); };
  }

  // Ends the job (under mu): the caller answers; the other submissions are aborted outside the lock.
  std::vector<std::string> close_locked() {
    over = true;
    --st->in_flight;
    return sub_ids;
  }
  void abort_all(const std::vector<std::string>& ids) {
    for (const auto& id : ids) backend->abort(id);
  }

  void on_accepted(std::exception_ptr err) {
    std::vector<std::string> abort;
    {
      std::lock_guard<std::mutex> g(mu);
      if (over) return;
      if (err) {
        abort = close_locked();
        try {
          std::rethrow_exception(err);
        } catch (const api_error& e) {
          st->send_error(*ex, e);
        } catch (const std::exception& e) {
          st->send_error(*ex, api_error(500, "server_error", fmt::format("the engine refused the request: {}", e.what())));
        }
      } else if (++accepted == sub_ids.size() && req.stream) {
        streaming = true;
        ex->start_stream(200, "text/event-stream", {{"Cache-Control", "no-cache"}});
        auto h = std::move(held);
        for (auto& [p, e] : h) stream_event(p, e);
        if (running == 0) finish_locked();  // every sample ended before the last acceptance
      } else if (accepted == sub_ids.size() && running == 0) {
        finish_locked();
      }
    }
    abort_all(abort);
  }

  void on_event(size_t p, const generation_event& e) {
    std::vector<std::string> abort;
    {
      std::lock_guard<std::mutex> g(mu);
      if (over) return;
      sample& s = samples[p][static_cast<size_t>(e.index)];
      if (!e.prompt_logprobs.empty()) prompt_lps[p] = e.prompt_logprobs;
      s.text += e.text;
      s.logprobs.insert(s.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
      if (e.finished) {
        s.done = true;
        s.finish_reason = e.finish_reason;
        s.error = e.error;
        s.completion_tokens = e.completion_tokens;
        s.cumulative_logprob = e.cumulative_logprob;
        --running;
      }
      if (req.stream) {
        if (streaming) stream_event(p, e);
        else held.emplace_back(p, e);
      }
      if (e.finished && e.finish_reason == "error") {
        abort = close_locked();
        const api_error err(500, "server_error", "generation failed: " + e.error);
        if (streaming) {
          ex->write(sse_event(error_json(err)) + sse_done());
          ex->end();
          st->count(200);
        } else {
          st->send_error(*ex, err);
        }
      } else if (running == 0 && (!req.stream || streaming)) {
        finish_locked();
      }
    }
    abort_all(abort);
  }

  // One event as a chunk of its choice (stream, best_of == n: choice = prompt * n + sample).
  void stream_event(size_t p, const generation_event& e) {
    sample& s = samples[p][static_cast<size_t>(e.index)];
    choice_delta d;
    d.index = static_cast<int64_t>(p) * req.n + e.index;
    d.text = e.text;
    d.logprobs = e.logprobs;
    if (!s.started && req.echo) {
      d.text = echo_text[p] + d.text;
      d.logprobs.insert(d.logprobs.begin(), prompt_lps[p].begin(), prompt_lps[p].end());
    }
    if (e.finished) d.finish_reason = e.finish_reason;
    if (d.text.empty() && d.logprobs.empty() && !e.finished) return;
    d.text_offset = s.text_offset;
    for (const auto& t : d.logprobs)
      s.text_offset += static_cast<int64_t>(backend->token_bytes(t.id).size());
    ex->write(sse_event(chunk_json(head, req, d, !s.started, names())));
    s.started = true;
  }

  void finish_locked() {
    (void)close_locked();
    int64_t prompt_sum = std::accumulate(prompt_tokens.begin(), prompt_tokens.end(), int64_t{0});
    int64_t completion_sum = 0;
    for (const auto& ps : samples)
      for (const auto& s : ps) completion_sum += s.completion_tokens;
    if (req.stream) {
      std::string out;
      if (req.include_usage) out += sse_event(usage_chunk_json(head, req.chat, prompt_sum, completion_sum));
      out += sse_done();
      ex->write(std::move(out));
      ex->end();
      st->count(200);
      return;
    }
    completion_result r;
    r.id = head.id;
    r.created = head.created;
    r.model = head.model;
    r.prompt_tokens = prompt_sum;
    r.completion_tokens = completion_sum;
    for (size_t p = 0; p < samples.size(); ++p) {
      std::vector<size_t> order(samples[p].size());
      std::iota(order.begin(), order.end(), size_t{0});
      if (req.best_of > req.n)  // the n most likely of best_of (invariant 3)
        std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
          return samples[p][a].cumulative_logprob > samples[p][b].cumulative_logprob;
        });
      for (int64_t k = 0; k < req.n; ++k) {
        const sample& s = samples[p][order[static_cast<size_t>(k)]];
        completion_choice c;
        c.index = static_cast<int64_t>(p) * req.n + k;
        c.text = (req.echo ? echo_text[p] : std::string()) + s.text;
        if (req.echo) c.logprobs = prompt_lps[p];
        c.logprobs.insert(c.logprobs.end(), s.logprobs.begin(), s.logprobs.end());
        c.finish_reason = s.finish_reason;
        r.choices.push_back(std::move(c));
      }
    }
    ex->respond(200, "application/json", completion_response_json(r, req, names()));
    st->count(200);
  }

  void on_disconnect() {
    std::vector<std::string> abort;
    {
      std::lock_guard<std::mutex> g(mu);
      if (over) return;
      abort = close_locked();
      ++st->disconnects;
    }
    log::info("serve: the client of {} went away before its answer ended; aborting it", head.id);
    abort_all(abort);
  }
};

}  // namespace

http_server::http_server(generation_backend& backend, http_options options)
    : backend_(backend), o_(std::move(options)), st_(std::make_shared<state>()) {
  std::random_device rd;
  st_->id_prefix = fmt::format("{:08x}", rd());
  http_front_options fo;
  fo.host = o_.host;
  fo.port = o_.port;
  fo.io_threads = o_.io_threads;
  fo.work_threads = o_.work_threads;
  fo.max_connections = o_.max_connections;
  fo.idle_timeout_ms = o_.idle_timeout_ms;
  fo.max_body_bytes = o_.limits.max_body_bytes;
  fo.error_body = [st = st_](int status, const std::string& message) {
    st->count(status);
    return error_json(api_error(status, error_type(status), message));
  };
  front_ = std::make_unique<http_front>(fo);

  auto authorized = [this](http_exchange& ex) {
    if (o_.api_key.empty()) return true;
    if (bearer_matches(ex.request().header("Authorization"), o_.api_key)) return true;
    st_->send_error(ex, api_error(401, "authentication_error",
                                  "missing or wrong API key: send `Authorization: Bearer <key>`", "", "invalid_api_key"));
    return false;
  };

  front_->route("GET", "/health", [this](std::shared_ptr<http_exchange> ex) {
    ex->respond(200, "text/plain", "ok\n");
    st_->count(200);
  });
  front_->route("GET", "/v1/models", [this, authorized](std::shared_ptr<http_exchange> ex) {
    if (!authorized(*ex)) return;
    ex->respond(200, "application/json", models_json({backend_.model_id()}, unix_now(), "troupe"));
    st_->count(200);
  });
  front_->route("GET", "/metrics", [this](std::shared_ptr<http_exchange> ex) {
    front_->post_work([this, ex] {  // the backend's metrics take its locks: off the I/O threads
      std::string text = "# HELP troupe_http_responses_total HTTP responses by status code.\n"
                         "# TYPE troupe_http_responses_total counter\n";
      {
        std::lock_guard<std::mutex> g(st_->mu);
        for (const auto& [status, n] : st_->responses)
          text += fmt::format("troupe_http_responses_total{{code=\"{}\"}} {}\n", status, n);
      }
      const auto fs = front_->stats();
      text += fmt::format(
          "# HELP troupe_http_in_flight Requests being answered.\n# TYPE troupe_http_in_flight gauge\n"
          "troupe_http_in_flight {}\n"
          "# HELP troupe_http_client_disconnects_total Requests whose client left before the answer ended "
          "(aborted).\n# TYPE troupe_http_client_disconnects_total counter\ntroupe_http_client_disconnects_total {}\n"
          "# HELP troupe_http_connections_open Open client connections.\n# TYPE troupe_http_connections_open gauge\n"
          "troupe_http_connections_open {}\n"
          "# HELP troupe_http_connections_total Client connections accepted.\n"
          "# TYPE troupe_http_connections_total counter\ntroupe_http_connections_total {}\n",
          st_->in_flight.load(), st_->disconnects.load(), fs.connections_open, fs.connections_total);
      text += backend_.metrics_text();
      ex->respond(200, "text/plain; version=0.0.4", std::move(text));
      st_->count(200);
    });
  });

  // Invariant 7.
  auto admin_allowed = [this](http_exchange& ex) {
    if (o_.admin_key.empty() || o_.admin == nullptr) {
      st_->send_error(ex, api_error(403, "permission_error",
                                    o_.admin == nullptr ? "this server has no admin API"
                                                        : "the admin API is off: set server.admin_key",
                                    "", "admin_disabled"));
      return false;
    }
    if (bearer_matches(ex.request().header("Authorization"), o_.admin_key)) return true;
    st_->send_error(ex, api_error(401, "authentication_error",
                                  "missing or wrong admin key: send `Authorization: Bearer <server.admin_key>`", "",
                                  "invalid_admin_key"));
    return false;
  };
  front_->route("GET", "/admin/scale", [this, admin_allowed](std::shared_ptr<http_exchange> ex) {
    if (!admin_allowed(*ex)) return;
    front_->post_work([this, ex] {
      ex->respond(200, "application/json", o_.admin->scale_status());
      st_->count(200);
    });
  });
  front_->route("POST", "/admin/scale", [this, admin_allowed](std::shared_ptr<http_exchange> ex) {
    if (!admin_allowed(*ex)) return;
    front_->post_work([this, ex] {
      try {
        nlohmann::json body;
        try {
          body = nlohmann::json::parse(ex->request().body);
        } catch (const std::exception& e) {
          throw api_error(400, "invalid_request_error", fmt::format("the body is not JSON: {}", e.what()));
        }
        if (!body.is_object()) throw api_error(400, "invalid_request_error", "the body must be a JSON object");
        for (const auto& [k, v] : body.items())
          if (k != "ranks")
            throw api_error(400, "invalid_request_error", fmt::format("unknown field '{}' (only ranks)", k), k);
        if (!body.contains("ranks") || !body["ranks"].is_number_integer())
          throw api_error(400, "invalid_request_error", "ranks: an integer is required", "ranks");
        std::string out = o_.admin->request_scale(body["ranks"].get<int64_t>());
        ex->respond(202, "application/json", std::move(out));
        st_->count(202);
      } catch (const api_error& e) {
        st_->send_error(*ex, e);
      } catch (const std::exception& e) {
        st_->send_error(*ex, api_error(500, "server_error", e.what()));
      }
    });
  });

  auto completions = [this, authorized](bool chat) {
    return [this, authorized, chat](std::shared_ptr<http_exchange> ex) {
      if (!authorized(*ex)) return;
      front_->post_work([this, ex, chat] { start_completion(ex, chat); });
    };
  };
  front_->route("POST", "/v1/completions", completions(false));
  front_->route("POST", "/v1/chat/completions", completions(true));
}

// On the work pool: parse, check, tokenize, then submit every prompt (invariants 2, 3, 6).
void http_server::start_completion(const std::shared_ptr<http_exchange>& ex, bool chat) {
  auto job = std::make_shared<completion_job>();
  job->ex = ex;
  job->st = st_;
  job->backend = &backend_;
  std::vector<std::vector<int32_t>> prompts;
  try {
    job->req = parse_completion_request(ex->request().body, chat, o_.limits);
    const completion_request& r = job->req;
    if (!r.model.empty() && r.model != backend_.model_id())
      throw api_error(404, "invalid_request_error",
                      fmt::format("The model `{}` does not exist; this server serves `{}`", r.model,
                                  backend_.model_id()),
                      "model", "model_not_found");
    const size_t P = chat ? 1 : r.prompts.size();
    const std::string param = chat ? "messages" : "prompt";
    for (size_t p = 0; p < P; ++p) {
      prompts.push_back(backend_.prompt_tokens(r, p));
      const auto n = static_cast<int64_t>(prompts.back().size());
      if (n > o_.limits.max_prompt_tokens)
        throw api_error(400, "invalid_request_error",
                        fmt::format("{} has {} tokens; this server takes at most {}",
                                    P > 1 ? fmt::format("prompt {}", p) : std::string("the prompt"), n,
                                    o_.limits.max_prompt_tokens),
                        param, "context_length_exceeded");
      if (n == 0) throw api_error(400, "invalid_request_error", "the prompt is empty", param);
      job->echo_text.push_back(r.echo ? backend_.prompt_text(r, p) : std::string());
      job->prompt_tokens.push_back(n);
    }
  } catch (const api_error& e) {
    st_->send_error(*ex, e);
    return;
  } catch (const runtime::error& e) {  // e.g. the tokenizer refused the text
    st_->send_error(*ex, api_error(e.code() == errc::invalid_argument ? 400 : 500,
                                   e.code() == errc::invalid_argument ? "invalid_request_error" : "server_error",
                                   e.message()));
    return;
  } catch (const std::exception& e) {
    st_->send_error(*ex, api_error(500, "server_error", fmt::format("the request could not be prepared: {}", e.what())));
    return;
  }
  const completion_request& r = job->req;
  const std::string id = fmt::format("{}-{}{:x}", chat ? "chatcmpl" : "cmpl", st_->id_prefix, st_->next_id++);
  job->head = {id, unix_now(), r.model.empty() ? backend_.model_id() : r.model};
  if (!r.user.empty()) log::info("serve: {} is for user '{}'", id, r.user);  // OpenAI's `user`: for the logs
  const size_t P = prompts.size();
  for (size_t p = 0; p < P; ++p) job->sub_ids.push_back(P == 1 ? id : fmt::format("{}-{}", id, p));
  job->samples.assign(P, std::vector<completion_job::sample>(static_cast<size_t>(r.best_of)));
  job->prompt_lps.assign(P, {});
  job->running = static_cast<int64_t>(P) * r.best_of;
  ++st_->in_flight;
  ex->on_disconnect([job] { job->on_disconnect(); });
  for (size_t p = 0; p < P; ++p) {
    {
      std::lock_guard<std::mutex> g(job->mu);
      if (job->over) return;  // refused or gone already: submit no more
    }
    generation_submission s;
    s.id = job->sub_ids[p];
    s.request = &job->req;
    s.prompt = std::move(prompts[p]);
    s.samples = r.best_of;
    s.cumulative_logprob = r.best_of > r.n;
    s.prompt_logprobs = r.echo && r.logprobs >= 0;
    s.on_event = [job, p](const generation_event& e) { job->on_event(p, e); };
    s.on_accepted = [job](std::exception_ptr err) { job->on_accepted(err); };
    try {
      backend_.submit(std::move(s));
    } catch (...) {
      job->on_accepted(std::current_exception());
    }
    bool gone = false;
    {
      std::lock_guard<std::mutex> g(job->mu);
      gone = job->over;
    }
    if (gone) backend_.abort(job->sub_ids[p]);  // the client left while it was being submitted
  }
}

http_server::~http_server() { stop(); }

void http_server::start() { front_->start(); }
int http_server::port() const { return front_->port(); }
void http_server::stop() { front_->stop(); }
int64_t http_server::client_disconnects() const { return st_->disconnects.load(); }

}  // namespace troupe::elastic
