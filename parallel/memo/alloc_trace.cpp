// parallel/memo/alloc_trace.cpp — the logical-clock allocation trace, its JSON form, and the
// synthetic transformer trace generator.
#include "parallel/memo/alloc_trace.h"

#include <algorithm>
#include <utility>

#include <fmt/format.h>

#include "runtime/error.h"

namespace troupe::parallel::memo {

using runtime::errc;
using json = nlohmann::json;

int64_t max_live_bytes(const std::vector<alloc_event>& ev) {
  // (time, +size) at alloc, (time, -size) at free; frees sort before allocs at one tick.
  std::vector<std::pair<int64_t, int64_t>> deltas;
  deltas.reserve(ev.size() * 2);
  for (const auto& e : ev) {
    deltas.emplace_back(e.alloc_time, e.size);
    if (e.free_time != alloc_event::live) deltas.emplace_back(e.free_time, -e.size);
  }
  std::sort(deltas.begin(), deltas.end());
  int64_t live = 0, peak = 0;
  for (const auto& [t, d] : deltas) {
    live += d;
    peak = std::max(peak, live);
  }
  return peak;
}

void check_events(const std::vector<alloc_event>& ev, const std::string& what) {
  for (size_t i = 0; i < ev.size(); ++i) {
    const auto& e = ev[i];
    TROUPE_CHECK(e.size > 0, errc::invalid_argument, "{}: event {} ('{}', id {}) has size {}; sizes must be positive",
                 what, i, e.name, e.id, e.size);
    TROUPE_CHECK(e.free_time != alloc_event::live, errc::invalid_argument,
                 "{}: event {} ('{}', id {}) is never freed; close the trace (alloc_trace::close) first", what, i,
                 e.name, e.id);
    TROUPE_CHECK(e.alloc_time >= 0 && e.free_time > e.alloc_time, errc::invalid_argument,
                 "{}: event {} ('{}', id {}) has lifetime [{}, {}); it must be non-empty and start at >= 0", what, i,
                 e.name, e.id, e.alloc_time, e.free_time);
  }
}

int64_t alloc_trace::alloc(int64_t size, std::string name) {
  TROUPE_CHECK(!closed_, errc::invalid_argument, "alloc_trace: alloc('{}') after close()", name);
  TROUPE_CHECK(size > 0, errc::invalid_argument, "alloc_trace: alloc('{}') of {} bytes; sizes must be positive", name,
               size);
  alloc_event e;
  e.id = static_cast<int64_t>(events_.size());
  e.size = size;
  e.alloc_time = clock_++;
  e.name = std::move(name);
  events_.push_back(std::move(e));
  live_bytes_ += size;
  ++live_count_;
  return events_.back().id;
}

void alloc_trace::free(int64_t id) {
  TROUPE_CHECK(!closed_, errc::invalid_argument, "alloc_trace: free({}) after close()", id);
  TROUPE_CHECK(id >= 0 && id < static_cast<int64_t>(events_.size()), errc::invalid_argument,
               "alloc_trace: free({}): no such id (the trace has {} allocations)", id, events_.size());
  auto& e = events_[static_cast<size_t>(id)];
  TROUPE_CHECK(e.free_time == alloc_event::live, errc::invalid_argument,
               "alloc_trace: free({}) of '{}': already freed at tick {}", id, e.name, e.free_time);
  e.free_time = clock_++;
  live_bytes_ -= e.size;
  --live_count_;
}

void alloc_trace::close() {
  if (closed_) return;
  if (live_count_ > 0) {
    const int64_t t = clock_++;
    for (auto& e : events_)
      if (e.free_time == alloc_event::live) e.free_time = t;
  }
  live_bytes_ = 0;
  live_count_ = 0;
  closed_ = true;
}

json alloc_trace::to_json() const {
  json evs = json::array();
  for (const auto& e : events_)
    evs.push_back({{"id", e.id}, {"size", e.size}, {"alloc", e.alloc_time}, {"free", e.free_time}, {"name", e.name}});
  return {{"clock", clock_}, {"closed", closed_}, {"events", std::move(evs)}};
}

alloc_trace alloc_trace::from_json(const json& j) {
  auto field = [](const json& o, const char* key, const std::string& where) -> const json& {
    TROUPE_CHECK(o.is_object() && o.contains(key), errc::format, "alloc_trace JSON: {} has no \"{}\"", where, key);
    return o.at(key);
  };
  auto int_field = [&](const json& o, const char* key, const std::string& where) {
    const json& v = field(o, key, where);
    TROUPE_CHECK(v.is_number_integer(), errc::format, "alloc_trace JSON: {}.{} is not an integer: {}", where, key,
                 v.dump());
    return v.get<int64_t>();
  };
  alloc_trace t;
  t.clock_ = int_field(j, "clock", "the document");
  const json& closed = field(j, "closed", "the document");
  TROUPE_CHECK(closed.is_boolean(), errc::format, "alloc_trace JSON: \"closed\" is not a boolean");
  t.closed_ = closed.get<bool>();
  const json& evs = field(j, "events", "the document");
  TROUPE_CHECK(evs.is_array(), errc::format, "alloc_trace JSON: \"events\" is not an array");
  int64_t last_alloc = -1;
  for (size_t i = 0; i < evs.size(); ++i) {
    const std::string where = "events[" + std::to_string(i) + "]";
    alloc_event e;
    e.id = int_field(evs[i], "id", where);
    e.size = int_field(evs[i], "size", where);
    e.alloc_time = int_field(evs[i], "alloc", where);
    e.free_time = int_field(evs[i], "free", where);
    const json& name = field(evs[i], "name", where);
    TROUPE_CHECK(name.is_string(), errc::format, "alloc_trace JSON: {}.name is not a string", where);
    e.name = name.get<std::string>();
    const bool freed_ok = e.free_time == alloc_event::live ? !t.closed_
                                                           : e.free_time > e.alloc_time && e.free_time < t.clock_;
    TROUPE_CHECK(e.id == static_cast<int64_t>(i) && e.size > 0 && e.alloc_time > last_alloc &&
                     e.alloc_time < t.clock_ && freed_ok,
                 errc::format,
                 "alloc_trace JSON: {} ('{}') is inconsistent: id {} size {} lifetime [{}, {}) clock {} closed {}",
                 where, e.name, e.id, e.size, e.alloc_time, e.free_time, t.clock_, t.closed_);
    last_alloc = e.alloc_time;
    if (e.free_time == alloc_event::live) {
      t.live_bytes_ += e.size;
      ++t.live_count_;
    }
    t.events_.push_back(std::move(e));
  }
  return t;
}

alloc_trace synthetic_transformer_trace(const synthetic_layer_config& c) {
  TROUPE_CHECK(c.batch > 0 && c.seq > 0 && c.hidden > 0 && c.heads > 0 && c.ffn > 0 && c.vocab > 0 && c.layers > 0 &&
                   c.dtype_bytes > 0,
               errc::invalid_argument, "synthetic_transformer_trace: every size in the config must be positive");
  const int64_t d = c.dtype_bytes;
  const int64_t bsh = c.batch * c.seq * c.hidden * d;
  const int64_t bsf = c.batch * c.seq * c.ffn * d;
  const int64_t bhss = c.batch * c.heads * c.seq * c.seq * d;
  const int64_t bsv = c.batch * c.seq * c.vocab * d;
  struct saved {
    int64_t x, ln1, q, k, v, attn, h1, ln2, up, act;
  };
  alloc_trace t;
  std::vector<saved> layers;
  int64_t x = t.alloc(bsh, "embed.out");
  for (int64_t l = 0; l < c.layers; ++l) {
    auto n = [&](const char* what) { return fmt::format("L{}.{}", l, what); };
    saved s{};
    s.x = x;
    s.ln1 = t.alloc(bsh, n("ln1"));
    s.q = t.alloc(bsh, n("q"));
    s.k = t.alloc(bsh, n("k"));
    s.v = t.alloc(bsh, n("v"));
    const int64_t scores = t.alloc(bhss, n("scores"));
    const int64_t probs = t.alloc(bhss, n("probs"));
    t.free(scores);
    s.attn = t.alloc(bsh, n("attn_out"));
    t.free(probs);
    const int64_t proj = t.alloc(bsh, n("attn_proj"));
    s.h1 = t.alloc(bsh, n("h1"));
    t.free(proj);
    s.ln2 = t.alloc(bsh, n("ln2"));
    s.up = t.alloc(bsf, n("mlp_up"));
    s.act = t.alloc(bsf, n("mlp_act"));
    const int64_t down = t.alloc(bsh, n("mlp_down"));
    x = t.alloc(bsh, n("out"));
    t.free(down);
    layers.push_back(s);
  }
  const int64_t logits = t.alloc(bsv, "logits");
  const int64_t g_logits = t.alloc(bsv, "grad.logits");
  t.free(logits);
  int64_t g = t.alloc(bsh, "grad.out");
  t.free(g_logits);
  t.free(x);
  for (int64_t l = c.layers - 1; l >= 0; --l) {
    auto n = [&](const char* what) { return fmt::format("L{}.grad.{}", l, what); };
    const saved& s = layers[static_cast<size_t>(l)];
    const int64_t g_act = t.alloc(bsf, n("mlp_act"));
    t.free(s.act);
    const int64_t g_up = t.alloc(bsf, n("mlp_up"));
    t.free(g_act);
    t.free(s.up);
    const int64_t g_ln2 = t.alloc(bsh, n("ln2"));
    t.free(g_up);
    t.free(s.ln2);
    const int64_t g_h1 = t.alloc(bsh, n("h1"));
    t.free(g_ln2);
    t.free(s.h1);
    t.free(g);
    const int64_t g_attn = t.alloc(bsh, n("attn_out"));
    t.free(s.attn);
    const int64_t g_probs = t.alloc(bhss, n("probs"));
    const int64_t g_scores = t.alloc(bhss, n("scores"));
    t.free(g_probs);
    const int64_t g_q = t.alloc(bsh, n("q"));
    const int64_t g_k = t.alloc(bsh, n("k"));
    const int64_t g_v = t.alloc(bsh, n("v"));
    t.free(g_scores);
    t.free(s.q);
    t.free(s.k);
    t.free(s.v);
    const int64_t g_ln1 = t.alloc(bsh, n("ln1"));
    t.free(g_q);
    t.free(g_k);
    t.free(g_v);
    t.free(s.ln1);
    const int64_t g_x = t.alloc(bsh, n("x"));
    t.free(g_ln1);
    t.free(g_attn);
    t.free(g_h1);
    t.free(s.x);
    g = g_x;
  }
  t.free(g);
  t.close();
  return t;
}

}  // namespace troupe::parallel::memo
