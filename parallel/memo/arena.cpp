// parallel/memo/arena.cpp — see arena.h.
#include "parallel/memo/arena.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "parallel/memo/plan_cache.h"
#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::parallel::memo {

using runtime::errc;

namespace {

const char* phase_name(step_phase p) {
  switch (p) {
    case step_phase::forward_begin:
    case step_phase::forward_end:
      return "forward";
    case step_phase::backward_begin:
    case step_phase::backward_end:
      return "backward";
  }
  return "?";
}

constexpr int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

}  // namespace

std::unique_ptr<step_arena> step_arena::recorder() { return std::unique_ptr<step_arena>(new step_arena()); }

step_arena::step_arena(step_plan p) : recording_(false), plan_(std::move(p)) {
  TROUPE_CHECK(plan_.size.size() == plan_.offset.size() && plan_.arena_bytes >= 0, errc::invalid_argument,
               "memo arena: a plan with {} sizes and {} offsets", plan_.size.size(), plan_.offset.size());
  const size_t bytes = static_cast<size_t>(align64(std::max<int64_t>(plan_.arena_bytes, 64)));
  base_ = static_cast<std::byte*>(std::aligned_alloc(64, bytes));
  TROUPE_CHECK(base_ != nullptr, errc::io, "memo arena: out of memory reserving {} bytes", bytes);
  std::memset(base_, 0, bytes);  // touch every page once, here, not inside a step
}

step_arena::~step_arena() { std::free(base_); }

void step_arena::begin_step() {
  std::lock_guard<std::mutex> l(mu_);
  next_ = 0;
  in_step_ = true;
  warned_ = false;
  if (recording_) {
    rec_ = recorded_step{};
    for (auto& [p, b] : live_) b.k = -1;  // from an earlier step: not in this step's trace
  }
}

void step_arena::end_step() {
  std::lock_guard<std::mutex> l(mu_);
  in_step_ = false;
  ++stats_.steps;
  stats_.allocations = next_;
  if (recording_) {
    rec_.live_at_end = static_cast<int64_t>(live_.size());
    rec_.trace.close();
    return;
  }
  if (next_ != static_cast<int64_t>(plan_.size.size()) && !warned_) {
    runtime::log::warn("memo arena: this step made {} allocations, the plan has {}", next_, plan_.size.size());
    warned_ = true;
  }
}

void step_arena::mark(step_phase phase, int64_t layer) {
  std::lock_guard<std::mutex> l(mu_);
  if (recording_ && in_step_) rec_.marks.push_back({phase, layer, rec_.trace.now()});
}

void* step_arena::fallback(size_t bytes, const std::string& why) {
  ++stats_.fallbacks;
  if (!warned_) {
    runtime::log::warn("memo arena: {}; served from the heap (the device budget does not hold for it)", why);
    warned_ = true;
  }
  void* p = std::aligned_alloc(64, static_cast<size_t>(align64(std::max<int64_t>(static_cast<int64_t>(bytes), 1))));
  TROUPE_CHECK(p != nullptr, errc::io, "memo arena: out of memory allocating {} bytes", bytes);
  return p;
}

void* step_arena::allocate(size_t bytes) {
  std::lock_guard<std::mutex> l(mu_);
  int64_t k = next_++;
  const int64_t size = std::max<int64_t>(1, static_cast<int64_t>(bytes));
  void* p = nullptr;
  int64_t offset = -1;
  if (recording_) {
    p = std::aligned_alloc(64, static_cast<size_t>(align64(size)));
    TROUPE_CHECK(p != nullptr, errc::io, "memo recorder: out of memory allocating {} bytes", bytes);
    k = -1;  // not part of the recorded step
    if (in_step_) {
      std::string where = "step";
      if (!rec_.marks.empty()) {
        const step_mark& m = rec_.marks.back();
        const bool inside = m.phase == step_phase::forward_begin || m.phase == step_phase::backward_begin;
        where = fmt::format("{} layer {} {}", inside ? "in" : "after", m.layer, phase_name(m.phase));
      }
      k = rec_.trace.alloc(size, fmt::format("#{} ({})", rec_.trace.events().size(), where));
    }
  } else if (!in_step_) {
    p = fallback(bytes, fmt::format("allocation of {} bytes outside a step", bytes));
  } else if (k >= static_cast<int64_t>(plan_.size.size())) {
    p = fallback(bytes, fmt::format("allocation #{} of {} bytes is beyond the plan's {}", k, bytes, plan_.size.size()));
  } else if (plan_.size[static_cast<size_t>(k)] != size) {
    p = fallback(bytes, fmt::format("allocation #{} is {} bytes, the plan has {}", k, size,
                                    plan_.size[static_cast<size_t>(k)]));
  } else {
    const int64_t off = plan_.offset[static_cast<size_t>(k)];
    for (const auto& [q, b] : live_)
      if (b.offset >= 0 && off < b.offset + b.size && b.offset < off + size) {
        p = fallback(bytes, fmt::format("allocation #{} [{}, {}) overlaps live allocation #{} [{}, {})", k, off,
                                        off + size, b.k, b.offset, b.offset + b.size));
        break;
      }
    if (p == nullptr) {
      p = base_ + off;
      offset = off;
    }
  }
  live_[p] = block{k, offset, size};
  stats_.live_bytes += static_cast<size_t>(size);
  stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.live_bytes);
  return p;
}

void step_arena::deallocate(void* ptr, size_t) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = live_.find(ptr);
  TROUPE_CHECK(it != live_.end(), errc::internal, "memo arena: free of a pointer it did not hand out");
  const block b = it->second;
  live_.erase(it);
  stats_.live_bytes -= static_cast<size_t>(b.size);
  if (recording_) {
    if (b.k >= 0 && in_step_ && !rec_.trace.closed()) rec_.trace.free(b.k);
    std::free(ptr);
  } else if (b.offset < 0) {
    std::free(ptr);
  }
}

arena_stats step_arena::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  return stats_;
}

size_t step_arena::allocated_bytes() const {
  std::lock_guard<std::mutex> l(mu_);
  return stats_.live_bytes;
}

size_t step_arena::peak_bytes() const {
  std::lock_guard<std::mutex> l(mu_);
  return stats_.peak_bytes;
}

namespace {

struct window {
  int64_t begin = -1, end = -1;
};

// Per layer, the [begin, end) tick window of its forward (phase 0) or backward (phase 1).
std::vector<window> windows(const recorded_step& r, int phase) {
  int64_t layers = 0;
  for (const step_mark& m : r.marks) layers = std::max(layers, m.layer + 1);
  std::vector<window> w(static_cast<size_t>(layers));
  for (const step_mark& m : r.marks) {
    const bool fwd = m.phase == step_phase::forward_begin || m.phase == step_phase::forward_end;
    if (fwd != (phase == 0)) continue;
    window& x = w[static_cast<size_t>(m.layer)];
    if (m.phase == step_phase::forward_begin || m.phase == step_phase::backward_begin)
      x.begin = m.tick;
    else
      x.end = m.tick;
  }
  return w;
}

// Events allocated and freed inside w, with times relative to w.begin (ids = index).
std::vector<alloc_event> transients(const std::vector<alloc_event>& ev, const window& w, std::vector<size_t>* index) {
  std::vector<alloc_event> out;
  for (size_t i = 0; i < ev.size(); ++i) {
    const alloc_event& e = ev[i];
    // Freed by an event before the end mark (a tensor freed by the first event after it, e.g.
    // an activation a hook drops, is not the layer's own transient).
    if (e.alloc_time >= w.begin && e.free_time != alloc_event::live && e.free_time < w.end) {
      alloc_event t = e;
      t.id = static_cast<int64_t>(out.size());
      t.alloc_time -= w.begin;
      t.free_time -= w.begin;
      out.push_back(t);
      if (index) index->push_back(i);
    }
  }
  // Ticks renumbered densely over these events only: layers whose other allocations differ (a
  // layer that reuses a rounding buffer allocates fewer saved tensors) keep the same pattern.
  std::vector<int64_t> ticks;
  for (const alloc_event& e : out) {
    ticks.push_back(e.alloc_time);
    ticks.push_back(e.free_time);
  }
  std::sort(ticks.begin(), ticks.end());
  ticks.erase(std::unique(ticks.begin(), ticks.end()), ticks.end());
  auto rank = [&](int64_t t) { return std::lower_bound(ticks.begin(), ticks.end(), t) - ticks.begin(); };
  for (alloc_event& e : out) {
    e.alloc_time = rank(e.alloc_time);
    e.free_time = rank(e.free_time);
  }
  return out;
}

bool same_shape(const std::vector<alloc_event>& a, const std::vector<alloc_event>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].size != b[i].size || a[i].alloc_time != b[i].alloc_time || a[i].free_time != b[i].free_time)
      return false;
  return true;
}

}  // namespace

step_plan plan_step(const recorded_step& r, const planner_options& o, const std::string& cache_dir,
                    const std::string& key) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<alloc_event>& ev = r.trace.events();
  TROUPE_CHECK(!ev.empty(), errc::invalid_argument, "memo plan: the recorded step has no allocations");
  TROUPE_CHECK(r.trace.closed(), errc::invalid_argument, "memo plan: the recorded step is not closed (end_step)");
  step_plan sp;
  sp.size.reserve(ev.size());
  for (const alloc_event& e : ev) sp.size.push_back(e.size);
  sp.max_live = max_live_bytes(ev);
  sp.offset.assign(ev.size(), -1);

  // Level 1: the per-layer transients, when every layer has the same ones.
  const std::vector<window> fw = windows(r, 0), bw = windows(r, 1);
  bool uniform = !fw.empty() && fw.size() == bw.size();
  for (size_t l = 0; uniform && l < fw.size(); ++l)
    uniform = fw[l].begin >= 0 && fw[l].end >= fw[l].begin && bw[l].begin >= 0 && bw[l].end >= bw[l].begin;
  std::vector<std::vector<size_t>> fidx(fw.size()), bidx(bw.size());
  bilevel_problem bp;
  if (uniform) {
    bp.layer_forward = transients(ev, fw[0], &fidx[0]);
    bp.layer_backward = transients(ev, bw[0], &bidx[0]);
    uniform = !bp.layer_forward.empty() && !bp.layer_backward.empty();
    for (size_t l = 1; uniform && l < fw.size(); ++l)
      uniform = same_shape(transients(ev, fw[l], &fidx[l]), bp.layer_forward) &&
                same_shape(transients(ev, bw[l], &bidx[l]), bp.layer_backward);
  }
  if (!uniform) {
    sp.note = fw.empty() ? "no layer marks: one flat plan"
                         : "the layers' transients differ (dense and MoE layers mixed): one flat plan";
    plan p;
    bool hit = false;
    if (!cache_dir.empty())
      p = plan_cached(cache_dir, key + "|flat", ev, o, &hit);
    else
      p = plan_mip(ev, o);
    sp.offset = p.offset;
    sp.arena_bytes = p.peak;
    sp.level2_events = static_cast<int64_t>(ev.size());
    sp.method = p.method;
    sp.optimal = p.optimal;
    sp.cache_hit = hit;
  } else {
    // Level 2: everything else keeps its lifetime; each layer phase is one block.
    std::vector<char> is_transient(ev.size(), 0);
    for (const auto& v : {fidx, bidx})
      for (const auto& idx : v)
        for (size_t i : idx) is_transient[i] = 1;
    struct gitem {
      alloc_event e;
      int role;         // 0 event, 1 forward block, 2 backward block
      int64_t layer;    // blocks
      size_t original;  // events
    };
    std::vector<gitem> g;
    for (size_t i = 0; i < ev.size(); ++i)
      if (!is_transient[i]) g.push_back({ev[i], 0, 0, i});
    for (size_t l = 0; l < fw.size(); ++l) {
      alloc_event f;
      f.size = 1;
      f.alloc_time = fw[l].begin;
      f.free_time = std::max(fw[l].end, fw[l].begin + 1);
      f.name = fmt::format("layer {} forward block", l);
      g.push_back({f, 1, static_cast<int64_t>(l), 0});
      alloc_event b = f;
      b.alloc_time = bw[l].begin;
      b.free_time = std::max(bw[l].end, bw[l].begin + 1);
      b.name = fmt::format("layer {} backward block", l);
      g.push_back({b, 2, static_cast<int64_t>(l), 0});
    }
    std::stable_sort(g.begin(), g.end(), [](const gitem& a, const gitem& b) { return a.e.alloc_time < b.e.alloc_time; });
    std::vector<size_t> fblock(fw.size()), bblock(bw.size());
    for (size_t j = 0; j < g.size(); ++j) {
      g[j].e.id = static_cast<int64_t>(j);
      bp.global.push_back(g[j].e);
      if (g[j].role == 1) {
        bp.forward_blocks.push_back(j);
        fblock[static_cast<size_t>(g[j].layer)] = j;
      } else if (g[j].role == 2) {
        bp.backward_blocks.push_back(j);
        bblock[static_cast<size_t>(g[j].layer)] = j;
      }
    }
    bool hit = false;
    bilevel_plan b = cache_dir.empty() ? plan_bilevel(bp, o) : plan_bilevel_cached(cache_dir, key, bp, o, &hit);
    verify_bilevel_plan(bp, b);
    for (size_t j = 0; j < g.size(); ++j)
      if (g[j].role == 0) sp.offset[g[j].original] = b.global.offset[j];
    for (size_t l = 0; l < fw.size(); ++l) {
      for (size_t i = 0; i < fidx[l].size(); ++i)
        sp.offset[fidx[l][i]] = b.global.offset[fblock[l]] + b.layer_forward.offset[i];
      for (size_t i = 0; i < bidx[l].size(); ++i)
        sp.offset[bidx[l][i]] = b.global.offset[bblock[l]] + b.layer_backward.offset[i];
    }
    sp.bilevel = true;
    sp.level1_forward_peak = b.layer_forward.peak;
    sp.level1_backward_peak = b.layer_backward.peak;
    sp.level2_events = static_cast<int64_t>(bp.global.size());
    sp.arena_bytes = b.level2_peak;
    sp.method = b.global.method;
    sp.optimal = b.global.optimal;
    sp.cache_hit = hit;
    sp.note = b.global.note;
  }
  plan flat;
  flat.offset = sp.offset;
  flat.peak = sp.arena_bytes;
  verify_plan(ev, flat, sp.arena_bytes);
  if (r.live_at_end > 0)
    sp.note += fmt::format("{}{} allocations outlived the recorded step (planned as live to its end)",
                           sp.note.empty() ? "" : "; ", r.live_at_end);
  sp.solve_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sp;
}

recorded_step extrapolate_step(const recorded_step& a, int64_t ta, const recorded_step& b, int64_t tb, int64_t t) {
  TROUPE_CHECK(ta > 0 && tb > ta && t > 0, errc::invalid_argument,
               "memo extrapolate: lengths {} < {} and target {} must be positive and increasing", ta, tb, t);
  const auto& ea = a.trace.events();
  const auto& eb = b.trace.events();
  TROUPE_CHECK(ea.size() == eb.size() && a.marks.size() == b.marks.size(), errc::invalid_argument,
               "memo extrapolate: the steps at seq_len {} and {} differ ({} vs {} allocations, {} vs {} marks)", ta,
               tb, ea.size(), eb.size(), a.marks.size(), b.marks.size());
  for (size_t i = 0; i < a.marks.size(); ++i)
    TROUPE_CHECK(a.marks[i].tick == b.marks[i].tick && a.marks[i].layer == b.marks[i].layer &&
                     a.marks[i].phase == b.marks[i].phase,
                 errc::invalid_argument, "memo extrapolate: mark {} differs between seq_len {} and {}", i, ta, tb);
  nlohmann::json j = a.trace.to_json();
  for (size_t i = 0; i < ea.size(); ++i) {
    TROUPE_CHECK(ea[i].alloc_time == eb[i].alloc_time && ea[i].free_time == eb[i].free_time,
                 errc::invalid_argument, "memo extrapolate: allocation {} ('{}') has another lifetime at seq_len {}", i,
                 ea[i].name, tb);
    const int64_t d = eb[i].size - ea[i].size;
    TROUPE_CHECK(d * (t - ta) % (tb - ta) == 0, errc::invalid_argument,
                 "memo extrapolate: allocation {} ('{}') is {} bytes at seq_len {} and {} at {}: not affine in seq_len",
                 i, ea[i].name, ea[i].size, ta, eb[i].size, tb);
    const int64_t s = ea[i].size + d * (t - ta) / (tb - ta);
    TROUPE_CHECK(s > 0, errc::invalid_argument, "memo extrapolate: allocation {} ('{}') would be {} bytes at seq_len {}",
                 i, ea[i].name, s, t);
    j["events"][i]["size"] = s;
  }
  recorded_step r;
  r.trace = alloc_trace::from_json(j);
  r.marks = a.marks;
  r.live_at_end = a.live_at_end;
  return r;
}

}  // namespace troupe::parallel::memo
