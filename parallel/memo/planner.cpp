// parallel/memo/planner.cpp — greedy best fit, the CBC MIP, plan verification, bi-level
// planning and the plans' JSON form.
#include "parallel/memo/planner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <tuple>
#include <utility>

#include "runtime/error.h"
#include "runtime/log.h"

#ifdef TROUPE_HAVE_CBC
#include <coin/Cbc_C_Interface.h>
#endif

namespace troupe::parallel::memo {

using runtime::errc;
using json = nlohmann::json;

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

std::vector<int64_t> rounded_sizes(const std::vector<alloc_event>& ev, int64_t a) {
  std::vector<int64_t> s(ev.size());
  for (size_t i = 0; i < ev.size(); ++i) s[i] = round_up(ev[i].size, a);
  return s;
}

// Pairs (i < j) whose lifetimes overlap, found by a sweep in alloc-time order.
std::vector<std::pair<int, int>> overlapping_pairs(const std::vector<alloc_event>& ev) {
  std::vector<int> order(ev.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return ev[a].alloc_time < ev[b].alloc_time; });
  std::vector<std::pair<int, int>> pairs;
  std::vector<int> active;
  for (int i : order) {
    std::erase_if(active, [&](int j) { return ev[j].free_time <= ev[i].alloc_time; });
    for (int j : active) pairs.emplace_back(std::min(i, j), std::max(i, j));
    active.push_back(i);
  }
  return pairs;
}

int64_t raw_peak(const std::vector<alloc_event>& ev, const std::vector<int64_t>& offset) {
  int64_t peak = 0;
  for (size_t i = 0; i < ev.size(); ++i) peak = std::max(peak, offset[i] + ev[i].size);
  return peak;
}

// One greedy pass: tensors in `order`, each into the best (or first) gap among its placed
// lifetime neighbours, else on top of them.
std::vector<int64_t> greedy_pass(const std::vector<alloc_event>& ev, const std::vector<int64_t>& rs,
                                 const std::vector<std::vector<int>>& nbrs, const std::vector<int>& order,
                                 bool best_fit) {
  std::vector<int64_t> off(ev.size(), -1);
  std::vector<std::pair<int64_t, int64_t>> busy;  // [start, end) of placed neighbours
  for (int i : order) {
    busy.clear();
    for (int j : nbrs[i])
      if (off[j] >= 0) busy.emplace_back(off[j], off[j] + rs[j]);
    std::sort(busy.begin(), busy.end());
    int64_t cur = 0, best = -1, best_len = 0;
    for (const auto& [s, e] : busy) {
      if (s - cur >= rs[i] && (best < 0 || (best_fit && s - cur < best_len))) {
        best = cur;
        best_len = s - cur;
      }
      cur = std::max(cur, e);
    }
    off[i] = best >= 0 ? best : cur;
  }
  return off;
}

// Longest-path placement in the "below" DAG: below[i] lists the tensors that must lie under i.
// Returns false on a cycle.
[[maybe_unused]] bool place_from_order(const std::vector<std::vector<int>>& below, const std::vector<int64_t>& rs,
                                       std::vector<int64_t>& off) {
  const size_t n = rs.size();
  std::vector<int> indeg(n, 0);
  std::vector<std::vector<int>> above(n);
  for (size_t i = 0; i < n; ++i)
    for (int j : below[i]) {
      above[j].push_back(static_cast<int>(i));
      ++indeg[i];
    }
  off.assign(n, 0);
  std::vector<int> ready;
  for (size_t i = 0; i < n; ++i)
    if (indeg[i] == 0) ready.push_back(static_cast<int>(i));
  size_t done = 0;
  while (!ready.empty()) {
    const int j = ready.back();
    ready.pop_back();
    ++done;
    for (int i : above[j]) {
      off[i] = std::max(off[i], off[j] + rs[j]);
      if (--indeg[i] == 0) ready.push_back(i);
    }
  }
  return done == n;
}

std::string describe(const alloc_event& e, int64_t off, size_t index) {
  return fmt::format("'{}' (event {}, id {}, bytes [{}, {}), live [{}, {}))", e.name, index, e.id, off, off + e.size,
                     e.alloc_time, e.free_time);
}

#ifdef TROUPE_HAVE_CBC
std::mutex& cbc_mutex() {
  static std::mutex m;
  return m;
}

struct cbc_model_deleter {
  void operator()(Cbc_Model* m) const { Cbc_deleteModel(m); }
};

// Solves the MIP; on success fills offsets (aligned, canonical) and status. Returns false
// with a note when CBC gives nothing usable.
bool solve_cbc(const std::vector<alloc_event>& ev, const std::vector<int64_t>& rs,
               const std::vector<std::pair<int, int>>& pairs, const plan& start, int64_t lower_bound,
               const planner_options& o, std::vector<int64_t>& off, bool& proven, std::string& note) {
  const int n = static_cast<int>(ev.size());
  int64_t g = 0;
  for (int64_t s : rs) g = std::gcd(g, s);
  const double scale = static_cast<double>(g);
  int64_t mcap = 0;
  for (int i = 0; i < n; ++i) mcap = std::max(mcap, start.offset[i] + rs[i]);
  bool all_aligned = true;
  for (int i = 0; i < n; ++i) all_aligned = all_aligned && rs[i] == ev[i].size;

  // Warm start (mirrored when the symmetry cut below needs it).
  std::vector<int64_t> a0 = start.offset;
  int fixed_pair = -1;
  if (all_aligned && !pairs.empty()) {
    // Mirror symmetry: with unpadded sizes a plan and its mirror image have the same peak, so
    // the largest tensor may be put below its largest lifetime neighbour.
    size_t best = 0;
    for (size_t p = 1; p < pairs.size(); ++p) {
      auto key = [&](size_t q) {
        const auto [i, j] = pairs[q];
        return std::make_pair(std::max(rs[i], rs[j]), std::min(rs[i], rs[j]));
      };
      if (key(p) > key(best)) best = p;
    }
    fixed_pair = static_cast<int>(best);
    auto [i, j] = pairs[best];
    if (rs[j] > rs[i]) std::swap(i, j);  // i is the larger (pairs[best].first on ties)
    if (a0[i] > a0[j]) {
      for (int k = 0; k < n; ++k) a0[k] = mcap - a0[k] - rs[k];
    }
  }

  std::unique_ptr<Cbc_Model, cbc_model_deleter> m(Cbc_newModel());
  TROUPE_CHECK(m != nullptr, errc::internal, "memo planner: Cbc_newModel failed");
  Cbc_Model* mp = m.get();
  Cbc_setProblemName(mp, "memo_dsa");
  for (int i = 0; i < n; ++i)
    Cbc_addCol(mp, fmt::format("A{}", i).c_str(), 0.0, static_cast<double>(mcap - rs[i]) / scale, 0.0, 0, 0,
               nullptr, nullptr);
  const int col_m = n;
  Cbc_addCol(mp, "M", static_cast<double>(lower_bound) / scale, static_cast<double>(start.peak) / scale, 1.0, 0, 0,
             nullptr, nullptr);
  for (size_t p = 0; p < pairs.size(); ++p) {
    double lo = 0.0, hi = 1.0;
    if (static_cast<int>(p) == fixed_pair) {  // the larger of the two lies below
      const auto [i, j] = pairs[p];
      if (rs[i] >= rs[j])
        hi = 0.0;  // z = 0: i below j
      else
        lo = 1.0;  // z = 1: j below i
    }
    Cbc_addCol(mp, fmt::format("z{}", p).c_str(), lo, hi, 0.0, 1, 0, nullptr, nullptr);
  }
  const double cap = static_cast<double>(mcap) / scale;
  for (int i = 0; i < n; ++i) {  // A_i + S_i <= M (raw size)
    const int cols[2] = {i, col_m};
    const double coefs[2] = {1.0, -1.0};
    Cbc_addRow(mp, "", 2, cols, coefs, 'L', -static_cast<double>(ev[i].size) / scale);
  }
  for (size_t p = 0; p < pairs.size(); ++p) {
    const auto [i, j] = pairs[p];
    const int z = n + 1 + static_cast<int>(p);
    const int c1[3] = {i, j, z};
    const double k1[3] = {1.0, -1.0, -cap};  // A_i + S_i <= A_j + z·Mcap
    Cbc_addRow(mp, "", 3, c1, k1, 'L', -static_cast<double>(rs[i]) / scale);
    const double k2[3] = {-1.0, 1.0, cap};  // A_j + S_j <= A_i + (1 - z)·Mcap
    Cbc_addRow(mp, "", 3, c1, k2, 'L', cap - static_cast<double>(rs[j]) / scale);
  }
  Cbc_setObjSense(mp, 1.0);

  std::vector<int> idx;
  std::vector<double> val;
  int64_t start_peak = 0;
  for (int i = 0; i < n; ++i) start_peak = std::max(start_peak, a0[i] + ev[i].size);
  for (int i = 0; i < n; ++i) {
    idx.push_back(i);
    val.push_back(static_cast<double>(a0[i]) / scale);
  }
  idx.push_back(col_m);
  val.push_back(static_cast<double>(start_peak) / scale);
  for (size_t p = 0; p < pairs.size(); ++p) {
    const auto [i, j] = pairs[p];
    idx.push_back(n + 1 + static_cast<int>(p));
    val.push_back(a0[i] + rs[i] <= a0[j] ? 0.0 : 1.0);
  }
  Cbc_setMIPStartI(mp, static_cast<int>(idx.size()), idx.data(), val.data());
  Cbc_setMaximumSeconds(mp, o.time_limit_s);
  Cbc_setLogLevel(mp, o.log_level);
  Cbc_setAllowableGap(mp, 0.99 / scale);  // distinct peaks differ by >= 1 byte
  Cbc_solve(mp);

  const double* sol = Cbc_bestSolution(mp);
  if (sol == nullptr) {
    note = fmt::format("CBC found no solution (status {}, secondary {})", Cbc_status(mp), Cbc_secondaryStatus(mp));
    return false;
  }
  std::vector<std::vector<int>> below(static_cast<size_t>(n));
  for (size_t p = 0; p < pairs.size(); ++p) {
    const auto [i, j] = pairs[p];
    if (sol[n + 1 + static_cast<int>(p)] < 0.5)
      below[j].push_back(i);
    else
      below[i].push_back(j);
  }
  if (!place_from_order(below, rs, off)) {
    note = "CBC's ordering has a cycle (numerical trouble)";
    return false;
  }
  proven = Cbc_isProvenOptimal(mp) != 0;
  note = fmt::format("CBC: {} nodes, bound {:.0f} bytes, status {}/{}", Cbc_getNodeCount(mp),
                     Cbc_getBestPossibleObjValue(mp) * scale, Cbc_status(mp), Cbc_secondaryStatus(mp));
  return true;
}
#endif

}  // namespace

bool cbc_available() {
#ifdef TROUPE_HAVE_CBC
  return true;
#else
  return false;
#endif
}

int64_t plan_lower_bound(const std::vector<alloc_event>& ev, int64_t alignment) {
  TROUPE_CHECK(alignment > 0, errc::invalid_argument, "memo planner: alignment must be positive, got {}", alignment);
  // At each tick: sum of rounded sizes live, less the largest padding of one live tensor.
  std::vector<std::pair<int64_t, int>> marks;  // (time, +1+i alloc / -1-i free); frees first
  for (size_t i = 0; i < ev.size(); ++i) {
    marks.emplace_back(ev[i].alloc_time, static_cast<int>(i) + 1);
    marks.emplace_back(ev[i].free_time, -static_cast<int>(i) - 1);
  }
  std::sort(marks.begin(), marks.end());
  std::multiset<int64_t> pads;
  int64_t sum = 0, best = 0;
  for (size_t k = 0; k < marks.size();) {
    const int64_t t = marks[k].first;
    for (; k < marks.size() && marks[k].first == t; ++k) {
      const int m = marks[k].second;
      const auto& e = ev[static_cast<size_t>(std::abs(m) - 1)];
      const int64_t r = round_up(e.size, alignment);
      if (m > 0) {
        sum += r;
        pads.insert(r - e.size);
      } else {
        sum -= r;
        pads.erase(pads.find(r - e.size));
      }
    }
    if (!pads.empty()) best = std::max(best, sum - *pads.rbegin());
  }
  return best;
}

plan plan_greedy_best_fit(const std::vector<alloc_event>& ev, int64_t alignment) {
  const auto t0 = clock_type::now();
  check_events(ev, "memo greedy planner");
  const int64_t lb = plan_lower_bound(ev, alignment);
  const auto rs = rounded_sizes(ev, alignment);
  const int n = static_cast<int>(ev.size());
  std::vector<std::vector<int>> nbrs(ev.size());
  for (const auto& [i, j] : overlapping_pairs(ev)) {
    nbrs[i].push_back(j);
    nbrs[j].push_back(i);
  }
  auto life = [&](int i) { return ev[i].free_time - ev[i].alloc_time; };
  using cmp = std::function<bool(int, int)>;
  const std::vector<cmp> orders = {
      [&](int a, int b) { return std::tuple(-rs[a], -life(a), a) < std::tuple(-rs[b], -life(b), b); },
      [&](int a, int b) { return std::tuple(-life(a), -rs[a], a) < std::tuple(-life(b), -rs[b], b); },
      [&](int a, int b) {
        return std::tuple(-static_cast<double>(rs[a]) * static_cast<double>(life(a)), a) <
               std::tuple(-static_cast<double>(rs[b]) * static_cast<double>(life(b)), b);
      },
      [&](int a, int b) { return std::pair(ev[a].alloc_time, a) < std::pair(ev[b].alloc_time, b); },
  };
  plan best;
  best.method = "greedy";
  best.peak = -1;
  std::vector<int> order(ev.size());
  for (const auto& c : orders) {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), c);
    for (bool best_fit : {true, false}) {
      auto off = greedy_pass(ev, rs, nbrs, order, best_fit);
      const int64_t peak = raw_peak(ev, off);
      if (best.peak < 0 || peak < best.peak) {
        best.peak = peak;
        best.offset = std::move(off);
      }
    }
  }
  if (n == 0) best.peak = 0;
  best.lower_bound = lb;
  best.greedy_peak = best.peak;
  best.optimal = best.peak == lb;
  verify_plan(ev, best, best.peak);
  best.solve_s = seconds_since(t0);
  return best;
}

plan plan_local_search(const std::vector<alloc_event>& ev, const plan& start, int64_t alignment, int64_t evals) {
  const auto t0 = clock_type::now();
  check_events(ev, "memo local search");
  TROUPE_CHECK(start.offset.size() == ev.size(), errc::invalid_argument,
               "memo local search: the start plan has {} offsets for {} events", start.offset.size(), ev.size());
  const auto rs = rounded_sizes(ev, alignment);
  std::vector<std::vector<int>> nbrs(ev.size());
  int64_t pairs = 0;
  for (const auto& [i, j] : overlapping_pairs(ev)) {
    nbrs[i].push_back(j);
    nbrs[j].push_back(i);
    ++pairs;
  }
  plan best = start;
  best.method = "greedy+search";
  if (start.lower_bound == 0) best.lower_bound = plan_lower_bound(ev, alignment);
  const size_t n = ev.size();
  if (n < 2 || best.peak <= best.lower_bound) {
    best.optimal = best.peak <= best.lower_bound;
    return best;
  }
  // Bottom-left placement in order of the start's offsets gives a plan no higher than it.
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) {
    return std::pair(start.offset[a], a) < std::pair(start.offset[b], b);
  });
  std::vector<int64_t> off = greedy_pass(ev, rs, nbrs, order, /*best_fit=*/false);
  int64_t cur = raw_peak(ev, off);
  if (cur < best.peak) {
    best.peak = cur;
    best.offset = off;
  }
  evals = std::min<int64_t>(evals, 50'000'000 / (pairs + static_cast<int64_t>(n)));
  std::mt19937_64 rng(0x6d656d6fULL);  // fixed: the search is deterministic
  std::uniform_int_distribution<size_t> pos(0, n - 1);
  for (int64_t k = 0; k < evals && best.peak > best.lower_bound; ++k) {
    std::vector<int> next = order;
    const size_t i = pos(rng), j = pos(rng);
    if (i == j) continue;
    if (k % 2 == 0) {
      std::swap(next[i], next[j]);
    } else {  // move the tensor at j to position i
      const int t = next[j];
      next.erase(next.begin() + static_cast<std::ptrdiff_t>(j));
      next.insert(next.begin() + static_cast<std::ptrdiff_t>(i), t);
    }
    off = greedy_pass(ev, rs, nbrs, next, /*best_fit=*/false);
    const int64_t peak = raw_peak(ev, off);
    if (peak <= cur) {  // plateau moves allowed
      cur = peak;
      order = std::move(next);
      if (peak < best.peak) {
        best.peak = peak;
        best.offset = off;
      }
    }
  }
  best.optimal = best.peak <= best.lower_bound;
  verify_plan(ev, best, best.peak);
  best.solve_s = seconds_since(t0);
  return best;
}

plan plan_mip(const std::vector<alloc_event>& ev, const planner_options& o) {
  const auto t0 = clock_type::now();
  plan g = plan_greedy_best_fit(ev, o.alignment);
  auto finish = [&](plan p) {
    p.solve_s = seconds_since(t0);
    verify_plan(ev, p, p.peak);
    return p;
  };
  if (g.optimal) {
    g.note = "the greedy plan meets the lower bound";
    return finish(std::move(g));
  }
  if (o.search_evals > 0) {
    plan w = plan_local_search(ev, g, o.alignment, o.search_evals);
    if (w.peak < g.peak) {
      w.greedy_peak = g.peak;
      g = std::move(w);
      if (g.optimal) {
        g.note = "the local search meets the lower bound";
        return finish(std::move(g));
      }
    }
  }
  if (!o.use_cbc) {
    g.note = "CBC not requested (use_cbc = false)";
    return finish(std::move(g));
  }
#ifndef TROUPE_HAVE_CBC
  g.note = "this build has no CBC (install coinor-libcbc-dev and reconfigure); greedy plan";
  return finish(std::move(g));
#else
  const auto pairs = overlapping_pairs(ev);
  if (static_cast<int64_t>(pairs.size()) > o.max_pairs) {
    g.note = fmt::format("{} overlapping pairs exceed max_pairs {}; greedy plan", pairs.size(), o.max_pairs);
    return finish(std::move(g));
  }
  const auto rs = rounded_sizes(ev, o.alignment);
  std::vector<int64_t> off;
  bool proven = false;
  std::string note;
  bool ok = false;
  try {
    std::lock_guard<std::mutex> lock(cbc_mutex());
    ok = solve_cbc(ev, rs, pairs, g, g.lower_bound, o, off, proven, note);
  } catch (const std::exception& e) {
    note = std::string("CBC failed: ") + e.what();
  }
  if (!ok) {
    runtime::log::warn("memo planner: {}; using the greedy plan (peak {} bytes)", note, g.peak);
    g.note = note;
    return finish(std::move(g));
  }
  plan p;
  p.offset = std::move(off);
  p.peak = raw_peak(ev, p.offset);
  p.lower_bound = g.lower_bound;
  p.greedy_peak = g.greedy_peak;
  p.method = proven ? "cbc-optimal" : "cbc-time-limit";
  p.optimal = proven || p.peak == p.lower_bound;
  p.note = note;
  if (p.peak > g.peak) {  // cannot happen with the warm start; never return worse than greedy
    g.method = p.method;
    g.optimal = false;
    g.note = note + "; CBC's plan was worse than greedy";
    return finish(std::move(g));
  }
  return finish(std::move(p));
#endif
}

void verify_plan(const std::vector<alloc_event>& ev, const plan& p, int64_t arena_bytes) {
  check_events(ev, "memo plan verification");
  TROUPE_CHECK(p.offset.size() == ev.size(), errc::internal, "memo plan ({}): {} offsets for {} events", p.method,
               p.offset.size(), ev.size());
  for (size_t i = 0; i < ev.size(); ++i) {
    const auto& e = ev[i];
    TROUPE_CHECK(p.offset[i] >= 0 && e.size >= 0 && p.offset[i] + e.size <= arena_bytes, errc::internal,
                 "memo plan ({}): tensor {} lies outside the arena [0, {})", p.method, describe(e, p.offset[i], i),
                 arena_bytes);
  }
  // Sweep over time; the live tensors, keyed by offset, must be pairwise disjoint, so a new
  // one need only be checked against its two neighbours.
  std::vector<std::pair<int64_t, int>> marks;  // (time, -1-i free | +1+i alloc): frees first
  for (size_t i = 0; i < ev.size(); ++i) {
    if (ev[i].size == 0) continue;
    marks.emplace_back(ev[i].alloc_time, static_cast<int>(i) + 1);
    marks.emplace_back(ev[i].free_time == alloc_event::live ? INT64_MAX : ev[i].free_time, -static_cast<int>(i) - 1);
  }
  std::sort(marks.begin(), marks.end());
  std::map<int64_t, size_t> live;  // offset -> event index
  auto clash = [&](size_t a, size_t b) {
    TROUPE_THROW(errc::internal, "memo plan ({}): tensors {} and {} are live at the same time and overlap in memory",
                 p.method, describe(ev[a], p.offset[a], a), describe(ev[b], p.offset[b], b));
  };
  for (const auto& [t, m] : marks) {
    const size_t i = static_cast<size_t>(std::abs(m) - 1);
    if (m < 0) {
      live.erase(p.offset[i]);
      continue;
    }
    const int64_t a = p.offset[i];
    auto next = live.lower_bound(a);
    if (next != live.end() && next->first < a + ev[i].size) clash(next->second, i);
    if (next != live.begin()) {
      auto prev = std::prev(next);
      if (p.offset[prev->second] + ev[prev->second].size > a) clash(prev->second, i);
    }
    live.emplace(a, i);
  }
}

bilevel_plan plan_bilevel(const bilevel_problem& bp, const planner_options& o) {
  const size_t n = bp.global.size();
  std::vector<int> role(n, 0);
  for (int r = 1; r <= 2; ++r)
    for (size_t i : r == 1 ? bp.forward_blocks : bp.backward_blocks) {
      TROUPE_CHECK(i < n, errc::invalid_argument,
                   "memo bi-level plan: {} block index {} is outside the {} global events",
                   r == 1 ? "forward" : "backward", i, n);
      TROUPE_CHECK(role[i] == 0, errc::invalid_argument, "memo bi-level plan: global event {} ('{}') is listed twice",
                   i, bp.global[i].name);
      role[i] = r;
    }
  bilevel_plan b;
  b.layer_forward = plan_mip(bp.layer_forward, o);
  b.layer_backward = plan_mip(bp.layer_backward, o);
  b.level1_peak = std::max(b.layer_forward.peak, b.layer_backward.peak);
  b.global_events = bp.global;
  for (size_t i = 0; i < n; ++i) {
    if (role[i] == 1) b.global_events[i].size = std::max<int64_t>(1, b.layer_forward.peak);
    if (role[i] == 2) b.global_events[i].size = std::max<int64_t>(1, b.layer_backward.peak);
  }
  b.global = plan_mip(b.global_events, o);
  b.level2_peak = b.global.peak;
  return b;
}

void verify_bilevel_plan(const bilevel_problem& bp, const bilevel_plan& b) {
  verify_plan(bp.layer_forward, b.layer_forward, b.layer_forward.peak);
  verify_plan(bp.layer_backward, b.layer_backward, b.layer_backward.peak);
  TROUPE_CHECK(b.global_events.size() == bp.global.size(), errc::internal,
               "memo bi-level plan: {} global events planned for {} given", b.global_events.size(), bp.global.size());
  std::vector<bool> block(bp.global.size(), false);
  for (const auto* v : {&bp.forward_blocks, &bp.backward_blocks})
    for (size_t i : *v)
      if (i < block.size()) block[i] = true;
  for (size_t i = 0; i < bp.global.size(); ++i)
    TROUPE_CHECK(block[i] || b.global_events[i].size == bp.global[i].size, errc::internal,
                 "memo bi-level plan: global event {} ('{}') planned with {} bytes, it has {}", i, bp.global[i].name,
                 b.global_events[i].size, bp.global[i].size);
  for (size_t i : bp.forward_blocks)
    TROUPE_CHECK(i < b.global_events.size() && b.global_events[i].size >= b.layer_forward.peak, errc::internal,
                 "memo bi-level plan: forward block {} is smaller than the level-1 forward peak {}", i,
                 b.layer_forward.peak);
  for (size_t i : bp.backward_blocks)
    TROUPE_CHECK(i < b.global_events.size() && b.global_events[i].size >= b.layer_backward.peak, errc::internal,
                 "memo bi-level plan: backward block {} is smaller than the level-1 backward peak {}", i,
                 b.layer_backward.peak);
  verify_plan(b.global_events, b.global, b.level2_peak);
}

json plan::to_json() const {
  return {{"offset", offset},   {"peak", peak},       {"method", method},
          {"optimal", optimal}, {"solve_s", solve_s}, {"lower_bound", lower_bound},
          {"greedy_peak", greedy_peak}, {"note", note}};
}

namespace {
template <typename T>
T get_field(const json& j, const char* key, const char* what) {
  TROUPE_CHECK(j.is_object() && j.contains(key), errc::format, "memo {} JSON: no \"{}\"", what, key);
  try {
    return j.at(key).get<T>();
  } catch (const json::exception& e) {
    TROUPE_THROW(errc::format, "memo {} JSON: \"{}\" has the wrong type: {}", what, key, e.what());
  }
}
}  // namespace

plan plan::from_json(const json& j) {
  plan p;
  p.offset = get_field<std::vector<int64_t>>(j, "offset", "plan");
  p.peak = get_field<int64_t>(j, "peak", "plan");
  p.method = get_field<std::string>(j, "method", "plan");
  p.optimal = get_field<bool>(j, "optimal", "plan");
  p.solve_s = get_field<double>(j, "solve_s", "plan");
  p.lower_bound = get_field<int64_t>(j, "lower_bound", "plan");
  p.greedy_peak = get_field<int64_t>(j, "greedy_peak", "plan");
  p.note = get_field<std::string>(j, "note", "plan");
  return p;
}

json bilevel_plan::to_json() const {
  json sizes = json::array();
  for (const auto& e : global_events) sizes.push_back(e.size);
  return {{"layer_forward", layer_forward.to_json()},
          {"layer_backward", layer_backward.to_json()},
          {"global", global.to_json()},
          {"global_sizes", std::move(sizes)},
          {"level1_peak", level1_peak},
          {"level2_peak", level2_peak}};
}

bilevel_plan bilevel_plan::from_json(const json& j) {
  bilevel_plan b;
  b.layer_forward = plan::from_json(get_field<json>(j, "layer_forward", "bi-level plan"));
  b.layer_backward = plan::from_json(get_field<json>(j, "layer_backward", "bi-level plan"));
  b.global = plan::from_json(get_field<json>(j, "global", "bi-level plan"));
  b.level1_peak = get_field<int64_t>(j, "level1_peak", "bi-level plan");
  b.level2_peak = get_field<int64_t>(j, "level2_peak", "bi-level plan");
  // global_events are rebuilt by the caller (plan_cache) from the problem and these sizes.
  for (int64_t s : get_field<std::vector<int64_t>>(j, "global_sizes", "bi-level plan")) {
    alloc_event e;
    e.size = s;
    b.global_events.push_back(e);
  }
  return b;
}

}  // namespace troupe::parallel::memo
