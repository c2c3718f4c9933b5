// bench/http_front_bench.cpp — the HTTP front under many connections: /health latency and a new
// request's time to first token, first on a quiet server, then with idle, keep-alive and streaming
// clients that never read holding connections open, in one run. Prints a Markdown table.
//
//   build/bench/http_front_bench --url http://127.0.0.1:8000 --idle 400 --keepalive 300 --streams 300
//   build/bench/http_front_bench --model /tmp/tiny-mixtral ...   # the server in this process (engine + front)
//   build/bench/http_front_bench --quick                         # ctest: the fixture model, 120 connections
//   bench/run_http_front_bench.sh                                 # starts troupe serve, runs, stops it
//
// Invariants:
//   1. Loaded phase: --idle connections that send nothing, --keepalive connections that got one
//      /health answer and stay open, --streams streamed completions (max_tokens --stream-tokens,
//      ignore_eos) whose clients never read (4 KiB receive buffers); the run waits until the server
//      reports them all open and every stream has had its first token.
//   2. Probes, the same in both phases: --health GETs of /health on a fresh connection each, and
//      --probes streamed completions (one new connection each, one at a time, max_tokens 2, after
//      one untimed warm-up): TTFT = from the request's first byte to the first SSE chunk with text.
//   3. The engine's own TTFT of the probes is the change of troupe_time_to_first_token_seconds
//      (_sum / _count) in /metrics across the probes: no other request gets a first token then. The
//      engine counts from the submission (the scheduler's queue included), so the front's share of
//      a probe's TTFT — the client's mean minus the engine's — is parsing, tokenizing, the hops
//      between threads and the writes.
//   4. The run fails (exit 1) when a probe goes unanswered within 30 s or answers other than 200.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "actors/serve_scheduler.h"
#include "bench/bench_util.h"
#include "elastic/engine/engine.h"
#include "elastic/server/engine_backend.h"
#include "elastic/server/http_server.h"
#include "parallel/data/bpe_tokenizer.h"
#include "parallel/model/model_weights.h"
#include "tests/unit/http_test_client.h"

namespace {

using namespace troupe;
using troupe::bench::clk;
using troupe_test::http_get;
using troupe_test::http_post;
using troupe_test::raw_conn;

struct options {
  std::string url, model;
  int idle = 400, keepalive = 300, streams = 300, probes = 20, health = 100;
  int stream_tokens = 2000;
  bool quick = false;
};

double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

double metric(int port, const std::string& name) {
  raw_conn c(port);
  c.send(http_get("/metrics"));
  const auto r = c.read_reply(30000);
  const size_t p = r.body.find("\n" + name + " ");
  if (p == std::string::npos) return -1;
  return std::stod(r.body.substr(p + name.size() + 2));
}

struct phase_result {
  std::vector<double> health_ms, ttft_ms;
  double engine_ttft_ms = 0;
};

// One streamed completion: ms to the first chunk with text, or -1 when none came in 30 s.
double timed_completion(int port) {
  const auto t0 = clk::now();
  raw_conn c(port);
  c.send(http_post("/v1/completions", R"({"prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 2, "stream": true,
                                          "temperature": 0, "ignore_eos": true})"));
  // The first chunk whose text is not empty ("text":"" is the finish chunk).
  const bool got = c.read_until(
      [](const std::string& b) {
        const size_t p = b.find("\"text\":\"");
        return p != std::string::npos && b.compare(p + 8, 1, "\"") != 0;
      },
      30000);
  const double ms = bench::seconds_since(t0) * 1e3;
  c.read_reply(30000);  // let it finish before the next one
  return got ? ms : -1;
}

phase_result probe(int port, const options& o) {
  phase_result out;
  if (timed_completion(port) < 0) throw std::runtime_error("the warm-up request got no first token in 30 s");
  for (int i = 0; i < o.health; ++i) {
    const auto t0 = clk::now();
    raw_conn c(port);
    c.send(http_get("/health"));
    const auto r = c.read_reply(30000);
    if (r.status != 200) throw std::runtime_error(fmt::format("/health answered {} (0 = not in 30 s)", r.status));
    out.health_ms.push_back(bench::seconds_since(t0) * 1e3);
  }
  const double sum0 = metric(port, "troupe_time_to_first_token_seconds_sum");
  const double n0 = metric(port, "troupe_time_to_first_token_seconds_count");
  for (int i = 0; i < o.probes; ++i) {
    const double ms = timed_completion(port);
    if (ms < 0) throw std::runtime_error("a probe got no first token in 30 s");
    out.ttft_ms.push_back(ms);
  }
  const double sum1 = metric(port, "troupe_time_to_first_token_seconds_sum");
  const double n1 = metric(port, "troupe_time_to_first_token_seconds_count");
  out.engine_ttft_ms = n1 > n0 ? (sum1 - sum0) / (n1 - n0) * 1e3 : 0;
  return out;
}

// A server in this process: the engine driven by the scheduler actor, the backend, the HTTP server.
struct local_server {
  parallel::model_weights w;
  std::unique_ptr<parallel::decoder> dec;
  std::unique_ptr<parallel::text_tokenizer> tok;
  std::unique_ptr<elastic::engine> eng;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<actors::serve_scheduler_client> sched;
  std::unique_ptr<elastic::engine_backend> backend;
  std::unique_ptr<elastic::http_server> server;
  explicit local_server(const std::string& dir, int max_running) {
    w = parallel::model_weights::load(dir);
    dec = std::make_unique<parallel::decoder>(w);
    tok = parallel::load_tokenizer(dir);
    elastic::engine_options eo;
    eo.num_blocks = 8192;
    eo.max_running = max_running;
    eo.max_batch_tokens = 2048;
    eng = std::make_unique<elastic::engine>(*dec, *tok, eo);
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = std::make_unique<actors::serve_scheduler_client>(*sys, *eng);
    backend = std::make_unique<elastic::engine_backend>(*eng, *tok, "bench", 1, sched.get());
    elastic::http_options ho;
    ho.port = 0;
    server = std::make_unique<elastic::http_server>(*backend, ho);
    server->start();
  }
  ~local_server() {
    server->stop();
    sched->stop();
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"the HTTP front under many idle, keep-alive and never-reading streaming connections"};
  options o;
  app.add_option("--url", o.url, "a running troupe serve (http://127.0.0.1:PORT)");
  app.add_option("--model", o.model, "serve this model in this process instead");
  app.add_option("--idle", o.idle, "connections that send nothing")->capture_default_str();
  app.add_option("--keepalive", o.keepalive, "connections idle after one answer")->capture_default_str();
  app.add_option("--streams", o.streams, "streamed completions whose clients never read")->capture_default_str();
  app.add_option("--stream-tokens", o.stream_tokens, "max_tokens of those streams")->capture_default_str();
  app.add_option("--probes", o.probes, "completions timed per phase")->capture_default_str();
  app.add_option("--health", o.health, "/health requests timed per phase")->capture_default_str();
  app.add_flag("--quick", o.quick, "a small run on tests/fixtures/mixtral_moe in this process (ctest)");
  CLI11_PARSE(app, argc, argv);
  if (o.quick) {
    o.model = std::string(TROUPE_SOURCE_DIR) + "/tests/fixtures/mixtral_moe";
    o.idle = 50;
    o.keepalive = 40;
    o.streams = 30;
    o.probes = 3;
    o.health = 10;
    o.stream_tokens = 100;
  }
  if (o.url.empty() == o.model.empty()) {
    fmt::print(stderr, "give --url of a running troupe serve, or --model to serve one here (or --quick)\n");
    return 2;
  }
  try {
    std::unique_ptr<local_server> local;
    int port = 0;
    if (!o.model.empty()) {
      local = std::make_unique<local_server>(o.model, o.streams + 64);
      port = local->server->port();
    } else {
      const size_t colon = o.url.rfind(':');
      port = std::stoi(o.url.substr(colon + 1));
    }
    fmt::print(stderr, "quiet server: probing\n");
    const phase_result quiet = probe(port, o);

    fmt::print(stderr, "opening {} idle, {} keep-alive, {} streaming connections\n", o.idle, o.keepalive, o.streams);
    const double ttft_n0 = metric(port, "troupe_time_to_first_token_seconds_count");
    std::vector<std::unique_ptr<raw_conn>> held;
    for (int i = 0; i < o.idle; ++i) held.push_back(std::make_unique<raw_conn>(port));
    for (int i = 0; i < o.keepalive; ++i) {
      auto c = std::make_unique<raw_conn>(port);
      c->send(http_get("/health"));
      if (c->read_reply(30000).status != 200) throw std::runtime_error("a keep-alive client got no answer");
      held.push_back(std::move(c));
    }
    const std::string stream_body =
        fmt::format(R"({{"prompt": [9, 8, 7, 6], "max_tokens": {}, "stream": true, "ignore_eos": true}})",
                    o.stream_tokens);
    for (int i = 0; i < o.streams; ++i) {
      auto c = std::make_unique<raw_conn>(port, /*rcvbuf=*/4096);
      c->send(http_post("/v1/completions", stream_body));
      // The head only (a refusal would end here), then never another read.
      if (!c->read_until([](const std::string& b) { return b.find("\r\n\r\n") != std::string::npos; }, 30000) ||
          !c->starts_with("HTTP/1.1 200"))
        throw std::runtime_error(fmt::format("stream {} was not answered 200: {}", i, c->buffered().substr(0, 300)));
      held.push_back(std::move(c));
    }
    const int total = o.idle + o.keepalive + o.streams;
    const auto t0 = clk::now();
    while (metric(port, "troupe_http_connections_open") < total ||
           metric(port, "troupe_time_to_first_token_seconds_count") < ttft_n0 + o.streams) {
      if (bench::seconds_since(t0) > 300) throw std::runtime_error("the load did not settle in 300 s");
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    const double open = metric(port, "troupe_http_connections_open");
    const double running = metric(port, "troupe_requests_running");
    fmt::print(stderr, "loaded: {} connections open, {} requests running; probing\n", open, running);
    const phase_result loaded = probe(port, o);
    held.clear();

    fmt::print("\n| phase | connections | /health p50 ms | p99 ms | max ms | TTFT p50 ms | p99 ms | mean ms | engine "
               "TTFT mean ms | front share ms |\n|---|---|---|---|---|---|---|---|---|---|\n");
    auto row = [](const char* name, double conns, const phase_result& r) {
      double mean = 0;
      for (double v : r.ttft_ms) mean += v;
      mean /= std::max<size_t>(1, r.ttft_ms.size());
      fmt::print("| {} | {:.0f} | {:.2f} | {:.2f} | {:.2f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |\n", name,
                 conns, pct(r.health_ms, 0.5), pct(r.health_ms, 0.99),
                 *std::max_element(r.health_ms.begin(), r.health_ms.end()), pct(r.ttft_ms, 0.5), pct(r.ttft_ms, 0.99),
                 mean, r.engine_ttft_ms, mean - r.engine_ttft_ms);
    };
    row("quiet", 1, quiet);
    row("loaded", open + 1, loaded);
    fmt::print("\nloaded / quiet: /health p99 {:.2f}x, TTFT p50 {:.2f}x; {} streams running during the probes; "
               "load average {}\n",
               pct(loaded.health_ms, 0.99) / std::max(1e-9, pct(quiet.health_ms, 0.99)),
               pct(loaded.ttft_ms, 0.5) / std::max(1e-9, pct(quiet.ttft_ms, 0.5)), running, bench::loadavg());
  } catch (const std::exception& e) {
    fmt::print(stderr, "http_front_bench: {}\n", e.what());
    return 1;
  }
  return 0;
}
