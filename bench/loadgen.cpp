// bench/loadgen.cpp — replays the Mooncake conversation trace (bench/data/README.md) against the
// serving engine (elastic/engine/engine.h) and compares continuous batching with the static
// baseline on the same request list in one run. Prints Markdown tables on stdout (progress on
// stderr); --json writes the same figures as JSON.
//
//   troupe init /tmp/lg-tiny-mixtral --preset tiny-mixtral
//   build/bench/loadgen --model /tmp/lg-tiny-mixtral --skip 1000 --requests 300 --block-tokens 16
//       --time-scale 0.25 --kv-cache-mib 4 --threads 1 --json out.json   # both modes, one run (~1 min)
//   build/bench/loadgen --quick                   # smoke run on tests/fixtures/mixtral_moe (ctest, < 1 s)
//   build/bench/loadgen --model DIR --url http://127.0.0.1:8000 --requests 50   # a running `troupe serve`
//   ... --url URL --timeline run.svg --marks marks.txt --allow-failures    # the run over time (timeline_svg.h)
//
// Invariants:
//   1. Request i of the window (trace lines skip+1 .. skip+N) arrives at (t_i - t_first) x
//      time-scale ms after the mode's start. Its prompt is ceil(input_length x B / 512) tokens and
//      its max_tokens ceil(output_length x B x S / 512) (B = --block-tokens, S = --output-scale,
//      default 1), both >= 1, output capped by --max-output, and both clamped so that prompt +
//      output <= the model's max_position_embeddings (output to at most half of it). Greedy,
//      ignore_eos: every request generates exactly max_tokens tokens. Every request must fit the
//      KV cache alone (checked before the run).
//   2. The prompt is the concatenation of its hash_ids' blocks, truncated: hash id h is always the
//      same B token ids in [0, vocab) (splitmix64 seeded by h), so requests whose hash_ids share a
//      prefix share that prompt prefix, as the trace's requests share theirs.
//   3. Every mode replays the same request list on a fresh engine (a cold prefix cache), one mode
//      after the other. In process, the engine's iterations run on a loop thread of loadgen's own
//      calling engine::step() (what engine::start() does) so that --threads sets that thread's
//      OpenMP team; the engine gets a tokenizer whose every id is one printable ASCII character,
//      so each generated token is an event of its own and is timed when the engine emits it.
//   4. Figures are exact percentiles of the recorded samples (linear interpolation between order
//      statistics): TTFT = first token - arrival; TPOT per request = (finish - first token) /
//      (tokens - 1) over requests with >= 2 tokens; ITL = every gap between consecutive tokens
//      (in process only); E2E = finish - arrival. Duration = the mode's start to the last finish.
//      With --url (one client thread per request): TTFT is the first SSE chunk with non-empty text
//      (the server holds back partial UTF-8), the token count comes from the usage chunk.
//   5. The run fails (exit 1) when a request ends without exactly its max_tokens tokens, or when
//      two modes' greedy outputs differ for any request (the engine's greedy output does not
//      depend on the batch, engine.h invariant 5); with --allow-failures such requests are counted
//      and shown (a server being restarted on purpose) and the run does not fail.
//   6. --timeline draws the run (the first mode's): throughput from the SSE chunks' arrival times, TTFT and
//      TPOT per request, failed requests, and --marks (lines "<unix time in seconds> <label>",
//      placed against the run's start on the wall clock).
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <httplib.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "bench/timeline_svg.h"
#include "elastic/engine/engine.h"
#include "parallel/data/bpe_tokenizer.h"
#include "parallel/model/decoder.h"
#include "parallel/model/model_weights.h"
#include "parallel/model/paged_kv.h"
#include "runtime/error.h"
#include "runtime/io/hf_config.h"
#include "runtime/threads.h"

#ifndef TROUPE_SOURCE_DIR
#define TROUPE_SOURCE_DIR "."
#endif

using namespace troupe;
using namespace troupe::bench;  // clk, seconds_since, loadavg
using json = nlohmann::json;
using runtime::errc;

namespace {

struct loadgen_options {
  std::string model = std::string(TROUPE_SOURCE_DIR) + "/tests/fixtures/mixtral_moe";
  std::string trace = std::string(TROUPE_SOURCE_DIR) + "/bench/data/mooncake_conversation.jsonl";
  int64_t requests = 200, skip = 0;
  double time_scale = 0.01;
  double output_scale = 1;                    // output lengths are further multiplied by this
  int64_t block_tokens = 16, max_output = 0;  // 0: no cap beyond the model's context
  int64_t block_size = 16, max_batch_tokens = 512, max_running = 64;
  double kv_cache_mib = 16;
  std::string mode = "both";
  int threads = 1;
  std::string json_out, url, api_key;
  bool quick = false;
  std::string timeline, marks;
  bool allow_failures = false;
};

// ---- the trace --------------------------------------------------------------------------------

struct trace_entry {
  int64_t line = 0;
  double timestamp_ms = 0;
  int64_t input_length = 0, output_length = 0;
  std::vector<int64_t> hash_ids;
};

int64_t json_int(const json& j, const char* key, const std::string& where, int64_t min) {
  TROUPE_CHECK(j.contains(key) && j[key].is_number_integer(), errc::format, "{}: \"{}\" is missing or not an integer",
               where, key);
  const int64_t v = j[key].get<int64_t>();
  TROUPE_CHECK(v >= min, errc::format, "{}: \"{}\" is {}; it must be >= {}", where, key, v, min);
  return v;
}

// Lines skip+1 .. skip+n (1-based) of a Mooncake trace; blank lines are not counted.
std::vector<trace_entry> read_trace(const std::string& path, int64_t skip, int64_t n) {
  std::ifstream in(path);
  TROUPE_CHECK(in.good(), errc::not_found, "{}: cannot open the trace (--trace)", path);
  std::vector<trace_entry> out;
  std::string text;
  int64_t line = 0, seen = 0;
  while (static_cast<int64_t>(out.size()) < n && std::getline(in, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (seen++ < skip) continue;
    const std::string where = fmt::format("{}:{}", path, line);
    json j;
    try {
      j = json::parse(text);
    } catch (const json::parse_error& e) {
      TROUPE_THROW(errc::format, "{}: not a JSON object: {}", where, e.what());
    }
    TROUPE_CHECK(j.is_object(), errc::format, "{}: not a JSON object", where);
    trace_entry t;
    t.line = line;
    TROUPE_CHECK(j.contains("timestamp") && j["timestamp"].is_number() && j["timestamp"].get<double>() >= 0,
                 errc::format, "{}: \"timestamp\" (ms) is missing or not a number >= 0", where);
    t.timestamp_ms = j["timestamp"].get<double>();
    t.input_length = json_int(j, "input_length", where, 1);
    t.output_length = json_int(j, "output_length", where, 1);
    TROUPE_CHECK(j.contains("hash_ids") && j["hash_ids"].is_array(), errc::format,
                 "{}: \"hash_ids\" is missing or not an array", where);
    for (const auto& h : j["hash_ids"]) {
      TROUPE_CHECK(h.is_number_integer() && h.get<int64_t>() >= 0, errc::format,
                   "{}: \"hash_ids\" holds {}; ids are integers >= 0", where, h.dump());
      t.hash_ids.push_back(h.get<int64_t>());
    }
    const int64_t need = (t.input_length + 511) / 512;
    TROUPE_CHECK(static_cast<int64_t>(t.hash_ids.size()) >= need, errc::format,
                 "{}: input_length {} needs {} hash ids (one per 512 tokens); the line has {}", where, t.input_length,
                 need, t.hash_ids.size());
    TROUPE_CHECK(out.empty() || t.timestamp_ms >= out.back().timestamp_ms, errc::format,
                 "{}: timestamp {} is earlier than the line before ({}); the trace must be in arrival order", where,
                 t.timestamp_ms, out.back().timestamp_ms);
    out.push_back(std::move(t));
  }
  TROUPE_CHECK(!out.empty(), errc::invalid_argument, "{}: no request after skipping {} (--skip)", path, skip);
  return out;
}

// ---- requests ---------------------------------------------------------------------------------

struct replay_request {
  std::string id;
  int64_t trace_line = 0;
  double arrival_s = 0;  // after the mode's start
  std::vector<int32_t> prompt;
  int64_t max_tokens = 0;
};

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Invariant 2: hash id h -> B token ids in [0, vocab), the same on every machine.
void append_hash_block(std::vector<int32_t>& out, int64_t h, int64_t B, int64_t vocab) {
  uint64_t s = static_cast<uint64_t>(h) * 0x2545f4914f6cdd1dull + 0x5851f42d4c957f2dull;
  for (int64_t i = 0; i < B; ++i)
    out.push_back(
        static_cast<int32_t>((static_cast<unsigned __int128>(splitmix64(s)) * static_cast<uint64_t>(vocab)) >> 64));
}

struct request_set {
  std::vector<replay_request> reqs;
  int64_t clamped = 0;  // requests cut to fit the model's context
};

request_set build_requests(const std::vector<trace_entry>& trace, const loadgen_options& o, int64_t vocab,
                           int64_t max_pos) {
  request_set rs;
  const double t_first = trace.front().timestamp_ms;
  const int64_t B = o.block_tokens;
  for (const auto& t : trace) {
    int64_t out = std::max<int64_t>(
        1, static_cast<int64_t>(std::ceil(static_cast<double>(t.output_length * B) * o.output_scale / 512.0)));
    int64_t in = std::max<int64_t>(1, (t.input_length * B + 511) / 512);
    if (o.max_output > 0) out = std::min(out, o.max_output);
    const int64_t out_fit = std::min(out, std::max<int64_t>(1, max_pos / 2));
    const int64_t in_fit = std::min(in, max_pos - out_fit);
    rs.clamped += out_fit != out || in_fit != in;
    replay_request r;
    r.id = fmt::format("trace-{}", t.line);
    r.trace_line = t.line;
    r.arrival_s = (t.timestamp_ms - t_first) * o.time_scale / 1000.0;
    r.max_tokens = out_fit;
    for (int64_t h : t.hash_ids) {
      if (static_cast<int64_t>(r.prompt.size()) >= in_fit) break;
      append_hash_block(r.prompt, h, B, vocab);
    }
    r.prompt.resize(static_cast<size_t>(in_fit));  // ceil(in x B / 512) <= hash_ids x B: never grows
    rs.reqs.push_back(std::move(r));
  }
  return rs;
}

// Invariant 3: one printable ASCII character per id, no specials, no eos.
class ascii_tokenizer final : public parallel::text_tokenizer {
 public:
  explicit ascii_tokenizer(int64_t vocab) : vocab_(vocab) {}
  std::vector<int32_t> encode(std::string_view text, bool) const override {
    std::vector<int32_t> ids;
    for (char c : text) ids.push_back(static_cast<int32_t>((static_cast<unsigned char>(c) - 33 + 94) % 94));
    return ids;
  }
  std::string decode(std::span<const int32_t> ids, bool) const override {
    std::string s;
    for (int32_t id : ids) s += token_bytes(id);
    return s;
  }
  std::string token_bytes(int32_t id, bool = true) const override {
    return std::string(1, static_cast<char>(33 + id % 94));
  }
  bool is_special(int32_t) const override { return false; }
  int64_t vocab_size() const override { return vocab_; }
  std::optional<int32_t> bos_id() const override { return std::nullopt; }
  const std::vector<int32_t>& eos_ids() const override { return none_; }
  std::optional<int32_t> token_to_id(std::string_view) const override { return std::nullopt; }
  std::string id_to_token(int32_t id) const override { return token_bytes(id); }
  const std::string& chat_template_source() const override { return empty_; }
  const std::string& bos_token() const override { return empty_; }
  const std::string& eos_token() const override { return empty_; }

 private:
  int64_t vocab_;
  std::vector<int32_t> none_;
  std::string empty_;
};

// ---- one replay -------------------------------------------------------------------------------

struct request_record {
  double arrival = 0, first = -1, finish = -1;  // seconds after the mode's start
  std::vector<double> token_times;              // in process: one per token
  std::vector<double> chunk_times;              // over HTTP: each SSE chunk with text
  std::vector<int32_t> tokens;                  // in process: the generated ids
  int64_t n_tokens = 0;
  std::string finish_reason, error;
  bool done = false;
};

struct mode_result {
  std::string name;
  double start_unix = 0;  // the wall clock at the mode's start (for --marks)
  std::vector<request_record> recs;
  double duration = 0;
  std::optional<elastic::engine_stats> stats;  // in process only
  int64_t num_blocks = 0;
};

// Waits for `done` to reach n, printing progress every 10 s.
void wait_all(std::mutex& mu, std::condition_variable& cv, const int64_t& done, int64_t n, const std::string& name,
              clk::time_point t0, const std::function<std::string()>& extra) {
  std::unique_lock<std::mutex> lock(mu);
  while (done < n) {
    if (!cv.wait_for(lock, std::chrono::seconds(10), [&] { return done >= n; }))
      fmt::print(stderr, "loadgen {}: {:.0f} s, {} / {} finished{}\n", name, seconds_since(t0), done, n, extra());
  }
}

mode_result run_engine(const parallel::decoder& dec, const std::vector<replay_request>& reqs, const loadgen_options& o,
                       bool static_batching) {
  mode_result res;
  res.name = static_batching ? "static" : "continuous";
  ascii_tokenizer tok(dec.config().vocab_size);
  elastic::engine_options eo;
  eo.block_size = o.block_size;
  eo.kv_cache_bytes = static_cast<size_t>(o.kv_cache_mib * 1024 * 1024);
  eo.max_batch_tokens = o.max_batch_tokens;
  eo.max_running = o.max_running;
  eo.max_waiting = std::max<int64_t>(1024, static_cast<int64_t>(reqs.size()) + 1);
  eo.static_batching = static_batching;
  elastic::engine eng(dec, tok, eo);
  res.num_blocks = eng.num_blocks();
  res.recs.resize(reqs.size());

  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
  bool kick = false;
  std::atomic<bool> stop{false};
  std::string loop_error;
  std::thread loop([&] {
    runtime::set_num_threads(o.threads);  // this thread's OpenMP team (invariant 3)
    while (!stop) {
      bool worked = false;
      try {
        worked = eng.step();
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> g(mu);
        loop_error = e.what();
        done = static_cast<int64_t>(reqs.size());  // give up waiting
        cv.notify_all();
        return;
      }
      if (!worked) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_for(lock, std::chrono::milliseconds(1), [&] { return kick || stop.load(); });
        kick = false;
      }
    }
  });

  // Whatever happens below (submit throws on a request the engine refuses), the loop stops first.
  struct loop_joiner {
    std::atomic<bool>& stop;
    std::condition_variable& cv;
    std::thread& loop;
    ~loop_joiner() {
      stop = true;
      cv.notify_all();
      if (loop.joinable()) loop.join();
    }
  } joiner{stop, cv, loop};
  const auto t0 = clk::now();
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::this_thread::sleep_until(
        t0 + std::chrono::duration_cast<clk::duration>(std::chrono::duration<double>(reqs[i].arrival_s)));
    request_record* rec = &res.recs[i];
    elastic::engine_request r;
    r.id = reqs[i].id;
    r.prompt = reqs[i].prompt;
    r.params.temperature = 0;
    r.params.max_tokens = reqs[i].max_tokens;
    r.params.ignore_eos = true;
    r.on_event = [rec, t0, &mu, &cv, &done](const elastic::engine_event& e) {  // on the loop thread
      const double now = seconds_since(t0);
      for (int32_t id : e.token_ids) {
        if (rec->first < 0) rec->first = now;
        rec->tokens.push_back(id);
        rec->token_times.push_back(now);
      }
      if (e.finished) {
        rec->finish = now;
        rec->n_tokens = static_cast<int64_t>(rec->tokens.size());
        rec->finish_reason = e.finish_reason;
        rec->error = e.error;
        std::lock_guard<std::mutex> g(mu);
        rec->done = true;
        ++done;
        cv.notify_all();
      }
    };
    rec->arrival = seconds_since(t0);
    eng.submit(std::move(r));
    {
      std::lock_guard<std::mutex> g(mu);
      kick = true;
    }
    cv.notify_all();
  }
  wait_all(mu, cv, done, static_cast<int64_t>(reqs.size()), res.name, t0, [&] {
    const auto st = eng.stats();
    return fmt::format(", {} running, {} waiting, KV {:.0f}% used", st.running, st.waiting, 100 * st.kv.usage());
  });
  stop = true;
  cv.notify_all();
  loop.join();  // the records were written on the loop thread: read them only after this
  TROUPE_CHECK(loop_error.empty(), errc::aborted, "loadgen {}: an engine iteration failed: {}", res.name, loop_error);
  for (const auto& r : res.recs) res.duration = std::max(res.duration, r.finish);
  res.stats = eng.stats();
  return res;
}

// ---- against a running server (--url) -------------------------------------------------------------

// One streaming /v1/completions request; fills rec from the server-sent events.
void http_one(const loadgen_options& o, const replay_request& q, request_record& rec, clk::time_point t0) {
  httplib::Client cli(o.url);
  cli.set_read_timeout(600, 0);
  json body = {{"prompt", q.prompt}, {"max_tokens", q.max_tokens},
               {"temperature", 0},   {"ignore_eos", true},
               {"stream", true},     {"stream_options", {{"include_usage", true}}}};
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.headers = {{"Content-Type", "application/json"}, {"Accept", "text/event-stream"}};
  if (!o.api_key.empty()) req.headers.emplace("Authorization", "Bearer " + o.api_key);
  req.body = body.dump();
  std::string buf;
  req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
    const double now = seconds_since(t0);
    buf.append(data, len);
    size_t end;
    while ((end = buf.find("\n\n")) != std::string::npos) {
      const std::string ev = buf.substr(0, end);
      buf.erase(0, end + 2);
      if (ev.rfind("data: ", 0) != 0) continue;
      const std::string payload = ev.substr(6);
      if (payload == "[DONE]") {
        rec.finish = now;
        continue;
      }
      const json j = json::parse(payload, nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("error")) rec.error = j["error"].value("message", j["error"].dump());
      if (j.contains("choices") && !j["choices"].empty()) {
        const json& c = j["choices"][0];
        if (c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty()) {
          if (rec.first < 0) rec.first = now;
          rec.chunk_times.push_back(now);
        }
        if (c.contains("finish_reason") && c["finish_reason"].is_string())
          rec.finish_reason = c["finish_reason"].get<std::string>();
      }
      if (j.contains("usage") && j["usage"].is_object())
        rec.n_tokens = j["usage"].value("completion_tokens", int64_t{0});
    }
    return true;
  };
  httplib::Response resp;
  httplib::Error err = httplib::Error::Success;
  const bool ok = cli.send(req, resp, err);
  if (!ok)
    rec.error = fmt::format("HTTP request failed: {}", httplib::to_string(err));
  else if (resp.status != 200)
    rec.error = fmt::format("HTTP {}: {}", resp.status, resp.body.empty() ? buf : resp.body);
  if (rec.finish < 0) rec.finish = seconds_since(t0);
}

mode_result run_http(const std::vector<replay_request>& reqs, const loadgen_options& o) {
  mode_result res;
  res.name = "server";
  res.recs.resize(reqs.size());
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
  std::vector<std::thread> clients;
  const auto t0 = clk::now();
  res.start_unix = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::this_thread::sleep_until(
        t0 + std::chrono::duration_cast<clk::duration>(std::chrono::duration<double>(reqs[i].arrival_s)));
    res.recs[i].arrival = seconds_since(t0);
    clients.emplace_back([&, i] {
      http_one(o, reqs[i], res.recs[i], t0);
      std::lock_guard<std::mutex> g(mu);
      res.recs[i].done = true;
      ++done;
      cv.notify_all();
    });
  }
  wait_all(mu, cv, done, static_cast<int64_t>(reqs.size()), res.name, t0, [] { return std::string(); });
  for (auto& t : clients) t.join();
  for (const auto& r : res.recs) res.duration = std::max(res.duration, r.finish);
  return res;
}

// ---- figures ----------------------------------------------------------------------------------

// Invariant 4: linear interpolation between order statistics (numpy's default); 0 for none.
double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

struct mode_summary {
  int64_t requests = 0, prompt_tokens = 0, output_tokens = 0;
  double duration = 0, out_tps = 0, total_tps = 0, req_per_s = 0;
  double ttft50 = 0, ttft99 = 0, tpot50 = 0, tpot99 = 0, itl50 = 0, itl99 = 0, e2e50 = 0, e2e99 = 0;
  double hit_rate = -1;  // -1: unknown (server)
  int64_t preemptions = -1, iterations = -1, num_blocks = 0;
  int64_t computed_prompt_tokens = -1;  // prefill the engine ran: less prefix hits, plus recompute
  int64_t model_tokens = -1;            // every token a model step ran (prefill, decode, recompute)
};

mode_summary summarize(const mode_result& m, const std::vector<replay_request>& reqs) {
  mode_summary s;
  std::vector<double> ttft, tpot, itl, e2e;
  for (size_t i = 0; i < m.recs.size(); ++i) {
    const auto& r = m.recs[i];
    ++s.requests;
    s.prompt_tokens += static_cast<int64_t>(reqs[i].prompt.size());
    s.output_tokens += r.n_tokens;
    if (r.first >= 0) ttft.push_back(r.first - r.arrival);
    if (r.n_tokens >= 2 && r.first >= 0) tpot.push_back((r.finish - r.first) / static_cast<double>(r.n_tokens - 1));
    for (size_t k = 1; k < r.token_times.size(); ++k) itl.push_back(r.token_times[k] - r.token_times[k - 1]);
    e2e.push_back(r.finish - r.arrival);
  }
  s.duration = m.duration;
  if (s.duration > 0) {
    s.out_tps = static_cast<double>(s.output_tokens) / s.duration;
    s.total_tps = static_cast<double>(s.output_tokens + s.prompt_tokens) / s.duration;
    s.req_per_s = static_cast<double>(s.requests) / s.duration;
  }
  s.ttft50 = percentile(ttft, 0.5), s.ttft99 = percentile(ttft, 0.99);
  s.tpot50 = percentile(tpot, 0.5), s.tpot99 = percentile(tpot, 0.99);
  s.itl50 = percentile(itl, 0.5), s.itl99 = percentile(itl, 0.99);
  s.e2e50 = percentile(e2e, 0.5), s.e2e99 = percentile(e2e, 0.99);
  if (m.stats) {
    s.hit_rate = m.stats->kv.hit_rate();
    s.preemptions = m.stats->preemptions;
    s.iterations = m.stats->iterations;
    s.computed_prompt_tokens = m.stats->computed_prompt_tokens;
    s.model_tokens = m.stats->model_tokens;
  }
  s.num_blocks = m.num_blocks;
  return s;
}

json summary_json(const mode_summary& s) {
  json j = {{"requests", s.requests},
            {"prompt_tokens", s.prompt_tokens},
            {"output_tokens", s.output_tokens},
            {"duration_s", s.duration},
            {"output_tok_per_s", s.out_tps},
            {"total_tok_per_s", s.total_tps},
            {"requests_per_s", s.req_per_s},
            {"ttft_s", {{"p50", s.ttft50}, {"p99", s.ttft99}}},
            {"tpot_s", {{"p50", s.tpot50}, {"p99", s.tpot99}}},
            {"itl_s", {{"p50", s.itl50}, {"p99", s.itl99}}},
            {"e2e_s", {{"p50", s.e2e50}, {"p99", s.e2e99}}}};
  if (s.hit_rate >= 0) {
    j["prefix_hit_rate"] = s.hit_rate;
    j["preemptions"] = s.preemptions;
    j["iterations"] = s.iterations;
    j["computed_prompt_tokens"] = s.computed_prompt_tokens;
    j["model_tokens"] = s.model_tokens;
    j["kv_blocks"] = s.num_blocks;
  }
  return j;
}

// Invariant 5: every request got exactly its max_tokens; the modes' greedy outputs agree.
std::vector<std::string> check_results(const std::vector<mode_result>& modes, const std::vector<replay_request>& reqs) {
  std::vector<std::string> bad;
  for (const auto& m : modes)
    for (size_t i = 0; i < reqs.size(); ++i) {
      const auto& r = m.recs[i];
      if (!r.error.empty() || r.n_tokens != reqs[i].max_tokens ||
          (r.finish_reason != "length" && !r.finish_reason.empty()))
        bad.push_back(fmt::format("{} {} (trace line {}): {} of {} tokens, finish \"{}\"{}", m.name, reqs[i].id,
                                  reqs[i].trace_line, r.n_tokens, reqs[i].max_tokens, r.finish_reason,
                                  r.error.empty() ? "" : ", error: " + r.error));
    }
  for (size_t a = 1; a < modes.size(); ++a)
    for (size_t i = 0; i < reqs.size(); ++i)
      if (modes[a].recs[i].tokens != modes[0].recs[i].tokens) {
        const auto& x = modes[0].recs[i].tokens;
        const auto& y = modes[a].recs[i].tokens;
        size_t k = 0;
        while (k < x.size() && k < y.size() && x[k] == y[k]) ++k;
        bad.push_back(fmt::format("{} (trace line {}): greedy outputs differ between {} and {} from token {}",
                                  reqs[i].id, reqs[i].trace_line, modes[0].name, modes[a].name, k));
      }
  return bad;
}

std::string ms(double s) { return fmt::format("{:.1f}", s * 1000); }

// Invariant 6.
void write_timeline(const mode_result& m, const std::vector<replay_request>& reqs, const loadgen_options& o) {
  std::vector<bench::timeline_request> rs;
  for (size_t i = 0; i < m.recs.size(); ++i) {
    const auto& r = m.recs[i];
    bench::timeline_request t;
    t.arrival = r.arrival;
    t.first = r.first;
    t.finish = r.finish;
    t.tokens = r.n_tokens;
    t.chunks = r.chunk_times;
    t.failed = !r.error.empty() || r.n_tokens != reqs[i].max_tokens;
    rs.push_back(std::move(t));
  }
  std::vector<bench::timeline_mark> marks;
  if (!o.marks.empty()) {
    std::ifstream f(o.marks);
    TROUPE_CHECK(f.good(), errc::io, "{}: cannot read (--marks)", o.marks);
    std::string line;
    int n = 0;
    while (std::getline(f, line)) {
      ++n;
      if (line.empty()) continue;
      const size_t sp = line.find(' ');
      try {
        marks.push_back({std::stod(line.substr(0, sp)) - m.start_unix, sp == std::string::npos ? "" : line.substr(sp + 1)});
      } catch (const std::exception&) {
        TROUPE_THROW(errc::format, "{}:{}: expected \"<unix seconds> <label>\", got \"{}\"", o.marks, n, line);
      }
    }
  }
  std::ofstream f(o.timeline);
  TROUPE_CHECK(f.good(), errc::io, "{}: cannot write (--timeline)", o.timeline);
  f << bench::timeline_svg(rs, marks, fmt::format("{} on {}", o.url, o.model), 1.0);
  fmt::print("timeline: {}\n", o.timeline);
}

void print_tables(const std::vector<mode_result>& modes, const std::vector<mode_summary>& sums) {
  fmt::print(
      "\n| mode | requests | duration s | output tok/s | total tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
      "TPOT p99 ms | ITL p50 ms | ITL p99 ms | E2E p50 ms | E2E p99 ms | prefix hit rate | preemptions | "
      "prefill computed | model tokens | iterations |\n");
  fmt::print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (size_t i = 0; i < modes.size(); ++i) {
    const auto& s = sums[i];
    const bool eng = s.hit_rate >= 0;
    fmt::print("| {} | {} | {:.2f} | {:.1f} | {:.1f} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} "
               "|\n",
               modes[i].name, s.requests, s.duration, s.out_tps, s.total_tps, ms(s.ttft50), ms(s.ttft99), ms(s.tpot50),
               ms(s.tpot99), eng ? ms(s.itl50) : "-", eng ? ms(s.itl99) : "-", ms(s.e2e50), ms(s.e2e99),
               eng ? fmt::format("{:.3f}", s.hit_rate) : "-", eng ? std::to_string(s.preemptions) : "-",
               eng ? std::to_string(s.computed_prompt_tokens) : "-", eng ? std::to_string(s.model_tokens) : "-",
               eng ? std::to_string(s.iterations) : "-");
  }
}

json ratios(const mode_summary& c, const mode_summary& s) {
  auto r = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  return {{"output_tok_per_s", r(c.out_tps, s.out_tps)},
          {"total_tok_per_s", r(c.total_tps, s.total_tps)},
          {"duration", r(c.duration, s.duration)},
          {"ttft_p50", r(c.ttft50, s.ttft50)},
          {"ttft_p99", r(c.ttft99, s.ttft99)},
          {"tpot_p50", r(c.tpot50, s.tpot50)},
          {"tpot_p99", r(c.tpot99, s.tpot99)},
          {"e2e_p50", r(c.e2e50, s.e2e50)},
          {"e2e_p99", r(c.e2e99, s.e2e99)}};
}

int run(loadgen_options o) {
  if (o.quick) {
    // 24 requests at once on a 48-block cache: continuous batching preempts (7 times here), so the
    // greedy comparison covers recompute after preemption too.
    o.requests = 24, o.skip = 0, o.time_scale = 0.001, o.block_tokens = 8, o.output_scale = 4, o.max_output = 32;
    o.block_size = 8, o.kv_cache_mib = 0.1875, o.max_batch_tokens = 128;
  }
  TROUPE_CHECK(o.mode == "continuous" || o.mode == "static" || o.mode == "both", errc::invalid_argument,
               "--mode {}: choose continuous, static or both", o.mode);
  TROUPE_CHECK(o.requests >= 1 && o.skip >= 0 && o.time_scale >= 0 && o.output_scale > 0 && o.block_tokens >= 1 &&
                   o.kv_cache_mib > 0,
               errc::invalid_argument,
               "--requests >= 1, --skip >= 0, --time-scale >= 0, --output-scale > 0, --block-tokens >= 1 and "
               "--kv-cache-mib > 0 are required");
  const auto trace = read_trace(o.trace, o.skip, o.requests);
  std::optional<parallel::model_weights> weights;
  std::optional<parallel::decoder> dec;
  runtime::model_config cfg;
  if (o.url.empty()) {
    weights.emplace(parallel::model_weights::load(o.model));
    dec.emplace(*weights);
    cfg = weights->config();
  } else {
    cfg = runtime::load_hf_config(o.model + "/config.json");  // vocabulary and context only
  }
  const request_set rs = build_requests(trace, o, cfg.vocab_size, cfg.max_position_embeddings);
  const auto& reqs = rs.reqs;
  int64_t prompt_tokens = 0, output_tokens = 0, longest = 0;
  for (const auto& r : reqs) {
    prompt_tokens += static_cast<int64_t>(r.prompt.size());
    output_tokens += r.max_tokens;
    longest = std::max<int64_t>(longest, static_cast<int64_t>(r.prompt.size()) + r.max_tokens);
  }
  if (o.url.empty()) {  // every request must fit the cache alone, or it would end early with "length"
    const int64_t blocks = parallel::paged_kv_store::blocks_for_budget(
        cfg, o.block_size, static_cast<size_t>(o.kv_cache_mib * 1024 * 1024));
    TROUPE_CHECK((longest + o.block_size - 1) / o.block_size <= blocks, errc::invalid_argument,
                 "the longest request (prompt + output) has {} tokens = {} blocks of {}; --kv-cache-mib {} holds {} "
                 "blocks: raise --kv-cache-mib or lower --block-tokens",
                 longest, (longest + o.block_size - 1) / o.block_size, o.block_size, o.kv_cache_mib, blocks);
  }

  fmt::print("## loadgen: {} requests (trace lines {}..{} of {}), {} prompt + {} output tokens{}\n", reqs.size(),
             trace.front().line, trace.back().line, o.trace, prompt_tokens, output_tokens, o.quick ? " (--quick)" : "");
  fmt::print(
      "model {} ({}, vocab {}, context {}), arrivals over {:.1f} s (time scale {}), {} tokens per 512-token "
      "block, output scale {}, max output {}, {} request(s) clamped to the context\n",
      o.model, runtime::model_family_name(cfg.family), cfg.vocab_size, cfg.max_position_embeddings,
      reqs.back().arrival_s, o.time_scale, o.block_tokens, o.output_scale,
      o.max_output > 0 ? std::to_string(o.max_output) : "-", rs.clamped);
  if (o.url.empty())
    fmt::print(
        "engine: block size {}, KV cache {} MiB, max batch tokens {}, max running {}; {} thread(s), {} "
        "hardware threads, load {}\n",
        o.block_size, o.kv_cache_mib, o.max_batch_tokens, o.max_running, o.threads, runtime::hardware_threads(),
        loadavg());
  else
    fmt::print("server {}, load {}\n", o.url, loadavg());
  std::fflush(stdout);

  std::vector<mode_result> modes;
  const auto t_all = clk::now();
  if (!o.url.empty()) {
    modes.push_back(run_http(reqs, o));
  } else {
    if (o.mode != "static") modes.push_back(run_engine(*dec, reqs, o, false));
    if (o.mode != "continuous") modes.push_back(run_engine(*dec, reqs, o, true));
  }
  std::vector<mode_summary> sums;
  for (const auto& m : modes) {
    sums.push_back(summarize(m, reqs));
    fmt::print(stderr, "loadgen {}: done in {:.1f} s\n", m.name, m.duration);
  }
  print_tables(modes, sums);
  json out = {{"trace", o.trace},
              {"trace_lines", {trace.front().line, trace.back().line}},
              {"model", o.model},
              {"settings",
               {{"requests", o.requests},
                {"skip", o.skip},
                {"time_scale", o.time_scale},
                {"output_scale", o.output_scale},
                {"block_tokens", o.block_tokens},
                {"max_output", o.max_output},
                {"block_size", o.block_size},
                {"kv_cache_mib", o.kv_cache_mib},
                {"max_batch_tokens", o.max_batch_tokens},
                {"max_running", o.max_running},
                {"threads", o.threads},
                {"url", o.url}}},
              {"prompt_tokens", prompt_tokens},
              {"output_tokens", output_tokens},
              {"clamped", rs.clamped},
              {"modes", json::object()}};
  for (size_t i = 0; i < modes.size(); ++i) out["modes"][modes[i].name] = summary_json(sums[i]);
  if (modes.size() == 2) {
    const json r = ratios(sums[0], sums[1]);
    out["continuous_over_static"] = r;
    fmt::print(
        "\ncontinuous / static: output tok/s {:.2f}x, total tok/s {:.2f}x, duration {:.2f}x, TTFT p50 {:.3f}x "
        "p99 {:.3f}x, TPOT p50 {:.3f}x p99 {:.3f}x, E2E p50 {:.3f}x p99 {:.3f}x\n",
        r["output_tok_per_s"].get<double>(), r["total_tok_per_s"].get<double>(), r["duration"].get<double>(),
        r["ttft_p50"].get<double>(), r["ttft_p99"].get<double>(), r["tpot_p50"].get<double>(),
        r["tpot_p99"].get<double>(), r["e2e_p50"].get<double>(), r["e2e_p99"].get<double>());
  }
  const auto bad = check_results(modes, reqs);
  out["check_failures"] = bad;
  if (!o.timeline.empty()) write_timeline(modes[0], reqs, o);
  fmt::print("\ncheck (every request gets exactly its max_tokens{}): {}\n",
             modes.size() == 2 ? "; continuous and static greedy outputs identical" : "",
             bad.empty() ? "ok" : fmt::format("FAILED, {} problem(s)", bad.size()));
  for (size_t i = 0; i < bad.size() && i < 20; ++i) fmt::print("  {}\n", bad[i]);
  if (o.allow_failures && !bad.empty()) fmt::print("(--allow-failures: {} failed request(s) counted, not fatal)\n", bad.size());
  fmt::print("total {:.1f} s, load {}\n", seconds_since(t_all), loadavg());
  if (!o.json_out.empty()) {
    std::ofstream f(o.json_out);
    TROUPE_CHECK(f.good(), errc::io, "{}: cannot write (--json)", o.json_out);
    f << out.dump(2) << "\n";
  }
  return bad.empty() || o.allow_failures ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  loadgen_options o;
  CLI::App app{"replay the Mooncake trace against the serving engine: continuous vs static batching"};
  app.option_defaults()->always_capture_default();
  app.add_option("--model", o.model, "HF model directory");
  app.add_option("--trace", o.trace, "Mooncake trace (JSON lines)");
  app.add_option("--requests", o.requests, "requests to replay");
  app.add_option("--skip", o.skip, "trace requests to skip first");
  app.add_option("--time-scale", o.time_scale, "arrival times (ms) are multiplied by this");
  app.add_option("--block-tokens", o.block_tokens, "tokens per 512-token hash block (lengths scale by this / 512)");
  app.add_option("--output-scale", o.output_scale,
                 "output lengths are further multiplied by this (decode-heavier load)");
  app.add_option("--max-output", o.max_output, "cap on max_tokens per request (0 = none)");
  app.add_option("--block-size", o.block_size, "engine: tokens per KV block");
  app.add_option("--kv-cache-mib", o.kv_cache_mib, "engine: KV cache budget (MiB)");
  app.add_option("--max-batch-tokens", o.max_batch_tokens, "engine: new tokens per iteration");
  app.add_option("--max-running", o.max_running, "engine: sequences in the batch at most");
  app.add_option("--mode", o.mode, "continuous | static | both (the same requests on a fresh engine each)");
  app.add_option("--threads", o.threads, "OpenMP threads of the engine's iterations");
  app.add_option("--json", o.json_out, "also write the figures to this JSON file");
  app.add_option("--url", o.url,
                 "drive a running `troupe serve` (http://host:port) instead; --model gives the vocabulary");
  app.add_option("--api-key", o.api_key, "with --url: the server's API key");
  app.add_option("--timeline", o.timeline, "draw the (first mode's) run over time into this SVG");
  app.add_option("--marks", o.marks, "with --timeline: moments to mark, lines \"<unix seconds> <label>\"");
  app.add_flag("--allow-failures", o.allow_failures, "count failed requests instead of failing the run");
  app.add_flag("--quick", o.quick, "smoke run: 24 requests on small settings, both modes, with the checks");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(o);
  } catch (const std::exception& e) {
    fmt::print(stderr, "loadgen: {}\n", e.what());
    return 1;
  }
}
