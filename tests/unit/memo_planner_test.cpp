// tests/unit/memo_planner_test.cpp — the MEMO memory planner: the trace's clock and JSON,
// verify_plan's errors, plan_mip against a brute-force optimum on random small instances, a
// hand-made instance where greedy is suboptimal, bi-level planning, the on-disk plan cache,
// and the caching-allocator replay (hand-computed reserved bytes; planned vs cached
// fragmentation on a synthetic transformer trace).
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "parallel/memo/alloc_trace.h"
#include "parallel/memo/caching_allocator_sim.h"
#include "parallel/memo/plan_cache.h"
#include "parallel/memo/planner.h"
#include "runtime/error.h"

namespace fs = std::filesystem;
using namespace troupe::parallel::memo;
using troupe::runtime::errc;
using troupe::runtime::error;

namespace {

constexpr int64_t MiB = 1 << 20;

// Events from (size, alloc, free) triples, named t0, t1, ...
std::vector<alloc_event> make_events(const std::vector<std::array<int64_t, 3>>& spec) {
  std::vector<alloc_event> ev;
  for (size_t i = 0; i < spec.size(); ++i)
    ev.push_back({static_cast<int64_t>(i), spec[i][0], spec[i][1], spec[i][2], fmt::format("t{}", i)});
  return ev;
}

int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// The optimum over plans with offsets that are multiples of `a`: every such plan can be
// compacted (each tensor dropped to its lowest free aligned spot) without raising its peak,
// and a compacted plan is what "place each tensor at the lowest feasible offset, in order of
// offset" produces; so the minimum over all orders of that bottom-left placement is optimal.
// Branch and bound over the orders (a prefix whose peak already reaches the best is cut).
int64_t brute_force_peak(const std::vector<alloc_event>& ev, int64_t a) {
  const size_t n = ev.size();
  std::vector<int64_t> rs(n), off(n, -1);
  for (size_t i = 0; i < n; ++i) rs[i] = round_up(ev[i].size, a);
  int64_t best = INT64_MAX;
  auto dfs = [&](auto&& self, size_t placed, int64_t peak) -> void {
    if (peak >= best) return;
    if (placed == n) {
      best = peak;
      return;
    }
    for (size_t i = 0; i < n; ++i) {
      if (off[i] >= 0) continue;
      std::vector<int64_t> cand = {0};
      for (size_t j = 0; j < n; ++j)
        if (off[j] >= 0 && lifetimes_overlap(ev[i], ev[j])) cand.push_back(off[j] + rs[j]);
      std::sort(cand.begin(), cand.end());
      for (int64_t c : cand) {
        bool fits = true;
        for (size_t j = 0; j < n && fits; ++j)
          if (off[j] >= 0 && lifetimes_overlap(ev[i], ev[j])) fits = c + rs[i] <= off[j] || off[j] + rs[j] <= c;
        if (!fits) continue;
        off[i] = c;
        self(self, placed + 1, std::max(peak, c + ev[i].size));
        off[i] = -1;
        break;
      }
    }
  };
  dfs(dfs, 0, 0);
  return best;
}

std::vector<alloc_event> random_instance(std::mt19937& rng, int n, int64_t max_size) {
  std::uniform_int_distribution<int64_t> size(1, max_size), start(0, 7), len(1, 6);
  std::vector<alloc_event> ev;
  for (int i = 0; i < n; ++i) {
    const int64_t s = start(rng);
    ev.push_back({i, size(rng), s, s + len(rng), fmt::format("r{}", i)});
  }
  return ev;
}

std::string expect_error(const std::function<void()>& f, errc code) {
  try {
    f();
  } catch (const error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error thrown";
  return "";
}

class tmp_dir {
 public:
  tmp_dir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() / fmt::format("troupe_memo_{}_{}", info->name(), ::getpid());
    fs::remove_all(path_);
  }
  ~tmp_dir() { fs::remove_all(path_); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

}  // namespace

TEST(MemoTrace, ClockLifetimesAndJson) {
  alloc_trace t;
  const int64_t x = t.alloc(100, "x");  // tick 0
  const int64_t y = t.alloc(50, "y");   // tick 1
  t.free(x);                            // tick 2
  const int64_t z = t.alloc(80, "z");   // tick 3
  EXPECT_EQ(t.live_bytes(), 130);
  t.close();  // frees y and z at tick 4
  ASSERT_EQ(t.events().size(), 3u);
  EXPECT_EQ(t.events()[x].free_time, 2);
  EXPECT_EQ(t.events()[y].free_time, 4);
  EXPECT_EQ(t.events()[z].alloc_time, 3);
  EXPECT_EQ(t.events()[z].free_time, 4);
  EXPECT_EQ(t.max_live_bytes(), 150);  // x + y at ticks 1..2; y + z = 130 later
  EXPECT_FALSE(lifetimes_overlap(t.events()[x], t.events()[z]));
  EXPECT_EQ(t.now(), 5);

  const alloc_trace u = alloc_trace::from_json(t.to_json());
  ASSERT_EQ(u.events().size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(u.events()[i].size, t.events()[i].size);
    EXPECT_EQ(u.events()[i].alloc_time, t.events()[i].alloc_time);
    EXPECT_EQ(u.events()[i].free_time, t.events()[i].free_time);
    EXPECT_EQ(u.events()[i].name, t.events()[i].name);
  }
  EXPECT_TRUE(u.closed());
  EXPECT_EQ(u.now(), 5);

  alloc_trace w;
  const int64_t a = w.alloc(10, "a");
  w.free(a);
  EXPECT_NE(expect_error([&] { w.free(a); }, errc::invalid_argument).find("already freed"), std::string::npos);
  expect_error([&] { w.alloc(0, "empty"); }, errc::invalid_argument);
  auto bad = t.to_json();
  bad["events"][1]["free"] = 0;  // freed before it was allocated
  EXPECT_NE(expect_error([&] { alloc_trace::from_json(bad); }, errc::format).find("events[1]"), std::string::npos);
  alloc_trace open;
  open.alloc(10, "open");
  EXPECT_NE(expect_error([&] { plan_greedy_best_fit(open.events()); }, errc::invalid_argument).find("never freed"),
            std::string::npos);
}

TEST(MemoVerify, NamesTheOverlappingPairAndTheOneOutside) {
  // a and b are both live at tick 2; c is live later and may reuse a's bytes.
  const auto ev = make_events({{100, 0, 3}, {100, 2, 5}, {100, 3, 6}});
  plan p;
  p.method = "hand";
  p.offset = {0, 200, 0};
  EXPECT_NO_THROW(verify_plan(ev, p, 300));
  p.offset = {0, 50, 200};  // t0 [0,100) and t1 [50,150), both live at tick 2
  const std::string msg = expect_error([&] { verify_plan(ev, p, 300); }, errc::internal);
  EXPECT_NE(msg.find("'t0' (event 0, id 0, bytes [0, 100), live [0, 3))"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'t1' (event 1, id 1, bytes [50, 150), live [2, 5))"), std::string::npos) << msg;
  p.offset = {0, 200, 250};  // t2 [250, 350) outside a 300-byte arena
  const std::string out = expect_error([&] { verify_plan(ev, p, 300); }, errc::internal);
  EXPECT_NE(out.find("'t2' (event 2, id 2, bytes [250, 350), live [3, 6)) lies outside the arena [0, 300)"),
            std::string::npos)
      << out;
  p.offset = {0, 200};
  expect_error([&] { verify_plan(ev, p, 300); }, errc::internal);
}

TEST(MemoPlanner, MipEqualsBruteForceOnRandomInstances) {
  if (!cbc_available()) GTEST_SKIP() << "built without CBC";
  int greedy_worse = 0, above_bound = 0, cbc_improved = 0;
  double max_solve = 0;
  for (int seed = 0; seed < 50; ++seed) {
    std::mt19937 rng(seed);
    const int n = 6 + seed % 3;
    // Even seeds: alignment 1; odd seeds: unaligned sizes with alignment 64.
    const int64_t a = seed % 2 == 0 ? 1 : 64;
    const auto ev = random_instance(rng, n, a == 1 ? 16 : 300);
    const int64_t opt = brute_force_peak(ev, a);
    const plan g = plan_greedy_best_fit(ev, a);
    planner_options o;
    o.alignment = a;
    o.time_limit_s = 5;
    o.search_evals = (seed / 2) % 2 == 0 ? 0 : 2000;  // half by CBC from the greedy start
    const plan m = plan_mip(ev, o);
    SCOPED_TRACE(fmt::format("seed {} n {} alignment {}: greedy {} mip {} ({}) brute force {} bound {}", seed, n, a,
                             g.peak, m.peak, m.method, opt, m.lower_bound));
    EXPECT_EQ(m.peak, opt);
    EXPECT_TRUE(m.optimal);
    EXPECT_LE(m.peak, g.peak);
    EXPECT_EQ(m.greedy_peak, g.peak);
    EXPECT_LE(m.lower_bound, opt);
    EXPECT_NO_THROW(verify_plan(ev, m, m.peak));
    EXPECT_NO_THROW(verify_plan(ev, g, g.peak));
    for (int64_t off : m.offset) EXPECT_EQ(off % a, 0);
    greedy_worse += g.peak > opt;
    cbc_improved += m.method == "cbc-optimal" && m.peak < g.peak;
    above_bound += opt > m.lower_bound;
    max_solve = std::max(max_solve, m.solve_s);
  }
  // The instances are not all trivial: greedy misses the optimum on some (CBC must improve
  // on its warm start). (Small random interval instances almost never have an optimum above
  // the live-bytes bound: none among these 50.)
  EXPECT_GE(greedy_worse, 5);
  EXPECT_GE(cbc_improved, 3);
  std::printf("random instances: greedy suboptimal on %d/50 (CBC improved on it in %d), optimum above the bound on "
              "%d/50, max solve %.3f s\n",
              greedy_worse, cbc_improved, above_bound, max_solve);
}


// Greedy (every order it tries) puts a big tensor at the bottom and pays for it; the optimum
// puts the small long-lived A there. Ticks 0-1: D; tick 2: A, C, D (2 + 6 + 2 = 10 live);
// ticks 3-4: A, B (9); ticks 5-7: B. Optimal: A at 0, C at 2, D at 8, B at 2 -> peak 10 (the
// live bound). Greedy by size: B at 0, C at 0 (B is not live yet at tick 2), A on top of B at
// 7, D fits nowhere below 9 -> 11.
TEST(MemoPlanner, GreedySuboptimalMipFindsTheOptimum) {
  const auto ev = make_events({{2, 2, 5}, {7, 3, 8}, {6, 2, 3}, {2, 0, 3}});
  const plan g = plan_greedy_best_fit(ev, 1);
  EXPECT_EQ(g.peak, 11);
  EXPECT_EQ(g.lower_bound, 10);
  EXPECT_FALSE(g.optimal);
  EXPECT_EQ(brute_force_peak(ev, 1), 10);
  planner_options o;
  o.alignment = 1;
  o.time_limit_s = 5;
  o.search_evals = 0;  // CBC from the greedy warm start
  const plan m = plan_mip(ev, o);
  if (!cbc_available()) {
    EXPECT_EQ(m.method, "greedy");
    EXPECT_NE(m.note.find("no CBC"), std::string::npos);
    GTEST_SKIP() << "built without CBC";
  }
  EXPECT_EQ(m.peak, 10);
  EXPECT_EQ(m.method, "cbc-optimal");
  EXPECT_TRUE(m.optimal);
  EXPECT_EQ(m.greedy_peak, 11);
  verify_plan(ev, m, 10);
  // The same instance in KiB with 64-byte alignment: the scaled optimum.
  auto big = ev;
  for (auto& e : big) e.size *= 1024;
  planner_options ob;
  ob.search_evals = 0;
  const plan mb = plan_mip(big, ob);
  EXPECT_EQ(mb.peak, 10 * 1024);
  EXPECT_EQ(mb.method, "cbc-optimal");
  EXPECT_EQ(mb.greedy_peak, 11 * 1024);
  // The local search finds the optimum too (it meets the bound, so CBC does not run).
  const plan ms = plan_mip(ev, [] { planner_options x; x.alignment = 1; return x; }());
  EXPECT_EQ(ms.peak, 10);
  EXPECT_EQ(ms.method, "greedy+search");
  EXPECT_TRUE(ms.optimal);
  // use_cbc = false (and no search): the greedy plan, saying why.
  o.use_cbc = false;
  const plan off = plan_mip(ev, o);
  EXPECT_EQ(off.peak, 11);
  EXPECT_EQ(off.method, "greedy");
  EXPECT_NE(off.note.find("use_cbc = false"), std::string::npos);
}

TEST(MemoPlanner, AlignmentPadsAllButTheTopTensor) {
  // Two 100-byte tensors live together, alignment 64: one is padded to 128, the other not.
  const auto ev = make_events({{100, 0, 2}, {100, 1, 3}});
  EXPECT_EQ(plan_lower_bound(ev, 64), 228);
  const plan p = plan_mip(ev, {});
  EXPECT_EQ(p.peak, 228);
  EXPECT_TRUE(p.optimal);
  EXPECT_EQ(std::min(p.offset[0], p.offset[1]), 0);
  EXPECT_EQ(std::max(p.offset[0], p.offset[1]), 128);
}

namespace {
int64_t KiB(int64_t x) { return x * 1024; }

// One layer forward (the hand-made instance above, in KiB: peak 10 KiB), one layer backward
// (peak 12 KiB), and the global trace: embeddings, two swap buffers, logits and the blocks.
bilevel_problem tiny_bilevel() {
  bilevel_problem bp;
  bp.layer_forward = make_events({{KiB(2), 2, 5}, {KiB(7), 3, 8}, {KiB(6), 2, 3}, {KiB(2), 0, 3}});
  bp.layer_backward = make_events({{KiB(4), 0, 2}, {KiB(4), 1, 3}, {KiB(8), 2, 4}});
  bp.global = make_events({{KiB(16), 0, 10},  // 0 embeddings
                           {1, 1, 2},         // 1 layer 0 forward
                           {KiB(8), 0, 10},   // 2 swap buffer (even layers)
                           {KiB(8), 0, 10},   // 3 swap buffer (odd layers)
                           {1, 3, 4},         // 4 layer 1 forward
                           {KiB(20), 4, 6},   // 5 logits + loss
                           {1, 6, 7},         // 6 layer 1 backward
                           {1, 8, 9}});       // 7 layer 0 backward
  bp.forward_blocks = {1, 4};
  bp.backward_blocks = {6, 7};
  return bp;
}
}  // namespace

TEST(MemoPlanner, BilevelPlan) {
  const bilevel_problem bp = tiny_bilevel();
  const bilevel_plan b = plan_bilevel(bp, {});
  const int64_t fwd = KiB(10);  // the local search (or CBC) finds the optimum
  EXPECT_EQ(b.layer_forward.peak, fwd);
  EXPECT_EQ(b.layer_backward.peak, KiB(12));
  EXPECT_EQ(b.level1_peak, KiB(12));
  EXPECT_EQ(b.global_events[1].size, fwd);
  EXPECT_EQ(b.global_events[4].size, fwd);
  EXPECT_EQ(b.global_events[6].size, KiB(12));
  // Max live: embeddings + both swap buffers + logits = 52 KiB at ticks 4-5.
  EXPECT_EQ(b.level2_peak, KiB(52));
  EXPECT_TRUE(b.global.optimal);
  verify_bilevel_plan(bp, b);
  // Layer 1's forward tensors, at global addresses, lie inside its block.
  for (size_t i = 0; i < bp.layer_forward.size(); ++i) {
    const int64_t at = b.global.offset[4] + b.layer_forward.offset[i];
    EXPECT_GE(at, b.global.offset[4]);
    EXPECT_LE(at + bp.layer_forward[i].size, b.global.offset[4] + b.global_events[4].size);
  }
  auto bad = bp;
  bad.backward_blocks = {6, 1};
  EXPECT_NE(expect_error([&] { plan_bilevel(bad, {}); }, errc::invalid_argument).find("listed twice"),
            std::string::npos);
}

TEST(MemoPlanCache, RoundTripStaleAndCorrupt) {
  tmp_dir dir;
  const std::string key = "model=tiny|seq_len=512|alpha=0.25|bf16";
  const auto ev = make_events({{KiB(2), 2, 5}, {KiB(7), 3, 8}, {KiB(6), 2, 3}, {KiB(2), 0, 3}});
  planner_options o;
  o.time_limit_s = 2;
  bool hit = true;
  const plan first = plan_cached(dir.str(), key, ev, o, &hit);
  EXPECT_FALSE(hit);
  const std::string path = plan_cache_path(dir.str(), key);
  ASSERT_TRUE(fs::exists(path));
  const plan again = plan_cached(dir.str(), key, ev, o, &hit);
  EXPECT_TRUE(hit);
  EXPECT_EQ(again.offset, first.offset);
  EXPECT_EQ(again.peak, first.peak);
  EXPECT_EQ(again.method, first.method);
  EXPECT_EQ(again.lower_bound, first.lower_bound);

  // The same key with another trace (sizes changed): the fingerprint misses, re-solved.
  auto ev2 = ev;
  ev2[0].size = KiB(3);
  const plan other = plan_cached(dir.str(), key, ev2, o, &hit);
  EXPECT_FALSE(hit);
  verify_plan(ev2, other, other.peak);
  plan_cached(dir.str(), key, ev2, o, &hit);
  EXPECT_TRUE(hit);

  // A corrupt file is ignored (with a warning), re-solved and rewritten.
  { std::ofstream(path, std::ios::trunc) << "{\"key\": tru"; }
  const plan fixed = plan_cached(dir.str(), key, ev2, o, &hit);
  EXPECT_FALSE(hit);
  EXPECT_EQ(fixed.peak, other.peak);
  plan_cached(dir.str(), key, ev2, o, &hit);
  EXPECT_TRUE(hit);

  // A well-formed file whose plan overlaps fails verification: re-solved.
  nlohmann::json j;
  { j = nlohmann::json::parse(std::ifstream(path)); }
  j["plan"]["offset"] = std::vector<int64_t>(ev2.size(), 0);
  { std::ofstream(path, std::ios::trunc) << j.dump(); }
  const plan refixed = plan_cached(dir.str(), key, ev2, o, &hit);
  EXPECT_FALSE(hit);
  EXPECT_EQ(refixed.peak, other.peak);

  // Another alignment is another plan.
  planner_options o128 = o;
  o128.alignment = 128;
  plan_cached(dir.str(), key, ev2, o128, &hit);
  EXPECT_FALSE(hit);

  // Bi-level plans: round trip under another key.
  const bilevel_problem bp = tiny_bilevel();
  const bilevel_plan b1 = plan_bilevel_cached(dir.str(), key + "|bilevel", bp, o, &hit);
  EXPECT_FALSE(hit);
  const bilevel_plan b2 = plan_bilevel_cached(dir.str(), key + "|bilevel", bp, o, &hit);
  EXPECT_TRUE(hit);
  EXPECT_EQ(b2.level2_peak, b1.level2_peak);
  EXPECT_EQ(b2.global.offset, b1.global.offset);
  EXPECT_EQ(b2.layer_backward.offset, b1.layer_backward.offset);
  EXPECT_EQ(b2.global_events[1].size, b1.global_events[1].size);
  EXPECT_EQ(b2.global_events[0].name, "t0");
}

// x = 12 MiB, freed; y = 8 MiB, z = 6 MiB live together: max live 14 MiB.
std::vector<alloc_event> split_trace() {
  alloc_trace t;
  t.free(t.alloc(12 * MiB, "x"));
  t.alloc(8 * MiB, "y");
  t.alloc(6 * MiB, "z");
  t.close();
  return t.events();
}

TEST(MemoCachingReplay, HandComputedReservedBytes) {
  const auto ev = split_trace();
  // One pool, exact segments: x reserves 12 MiB; y takes x's cached block and splits off
  // 4 MiB; z (6 MiB) fits in no cached block and reserves 6 MiB more: 18 MiB.
  caching_options simple;
  simple.pytorch_segments = false;
  const caching_replay r = replay_caching_allocator(ev, simple);
  EXPECT_EQ(r.max_live, 14 * MiB);
  EXPECT_EQ(r.reserved_peak, 18 * MiB);
  EXPECT_EQ(r.allocated_peak, 14 * MiB);
  EXPECT_EQ(r.segments, 2);
  EXPECT_DOUBLE_EQ(r.fragmentation(), 18.0 / 14.0);
  // PyTorch's sizes: x (>= 10 MiB) reserves 12 MiB; y splits it (rest 4 MiB > 1 MiB); z
  // (< 10 MiB) reserves a 20 MiB segment: 32 MiB.
  const caching_replay p = replay_caching_allocator(ev);
  EXPECT_EQ(p.reserved_peak, 32 * MiB);
  EXPECT_EQ(p.allocated_peak, 14 * MiB);
  EXPECT_DOUBLE_EQ(p.fragmentation(), 32.0 / 14.0);
  // A 1000-byte request: rounded to 1024, small pool, a 2 MiB segment.
  const auto small = make_events({{1000, 0, 2}, {1000, 1, 3}});
  const caching_replay s = replay_caching_allocator(small);
  EXPECT_EQ(s.reserved_peak, 2 * MiB);
  EXPECT_EQ(s.allocated_peak, 2048);
  EXPECT_EQ(s.segments, 1);
  // The plan of the split trace needs exactly the live bytes.
  const plan pl = plan_mip(ev, {});
  EXPECT_EQ(pl.peak, 14 * MiB);
}

TEST(MemoCachingReplay, PlannedVsCachedOnASyntheticTransformer) {
  for (int64_t seq : {256, 1024}) {
    synthetic_layer_config c;
    c.seq = seq;
    const alloc_trace t = synthetic_transformer_trace(c);
    const auto& ev = t.events();
    planner_options o;
    o.time_limit_s = 2;
    const plan p = plan_mip(ev, o);
    verify_plan(ev, p, p.peak);
    const caching_replay torch = replay_caching_allocator(ev);
    caching_options exact;
    exact.pytorch_segments = false;
    const caching_replay simple = replay_caching_allocator(ev, exact);
    const double planned = static_cast<double>(p.peak) / static_cast<double>(t.max_live_bytes());
    std::printf("seq %ld: %zu tensors, max live %ld, plan %ld (%s, %.3f s, greedy %ld) = %.4f x; caching replay "
                "%ld = %.4f x (pytorch segments), %ld = %.4f x (exact segments)\n",
                (long)seq, ev.size(), (long)t.max_live_bytes(), (long)p.peak, p.method.c_str(), p.solve_s,
                (long)p.greedy_peak, planned, (long)torch.reserved_peak, torch.fragmentation(),
                (long)simple.reserved_peak, simple.fragmentation());
    EXPECT_LE(planned, 1.02);
    EXPECT_GE(torch.reserved_peak, torch.allocated_peak);
    EXPECT_GE(torch.allocated_peak, torch.max_live);
    EXPECT_EQ(torch.max_live, t.max_live_bytes());
    EXPECT_GT(torch.fragmentation(), 1.0);
    EXPECT_GT(simple.fragmentation(), 1.0);
  }
}

// Bigger random instances (40 tensors, ~300 overlapping pairs): CBC alone (no local search)
// within 1 s never does worse than greedy; greedy + local search meets the live-bytes bound.
TEST(MemoPlanner, LargerRandomInstances) {
  const int64_t bounds[3] = {342016, 449536, 491520};
  for (int seed = 0; seed < 3; ++seed) {
    std::mt19937 rng(1000 + seed);
    const int n = 40;
    std::uniform_int_distribution<int64_t> size(1, 64), start(0, 3 * n / 2), len(1, n / 2);
    std::vector<alloc_event> ev;
    for (int i = 0; i < n; ++i) {
      const int64_t s0 = start(rng);
      ev.push_back({i, size(rng) * 1024, s0, s0 + len(rng), fmt::format("r{}", i)});
    }
    planner_options o;
    o.time_limit_s = 1;
    const plan searched = plan_mip(ev, o);
    EXPECT_EQ(searched.lower_bound, bounds[seed]);
    EXPECT_EQ(searched.peak, bounds[seed]);
    EXPECT_TRUE(searched.optimal);
    o.search_evals = 0;
    const plan cbc = plan_mip(ev, o);
    EXPECT_LE(cbc.peak, cbc.greedy_peak);
    EXPECT_GE(cbc.peak, bounds[seed]);
    verify_plan(ev, cbc, cbc.peak);
    std::printf("n %d seed %d: bound %ld, greedy %ld, greedy+search %ld (%s, %.3f s), CBC without search %ld (%s, "
                "%.3f s; %s)\n",
                n, seed, (long)searched.lower_bound, (long)searched.greedy_peak, (long)searched.peak,
                searched.method.c_str(), searched.solve_s, (long)cbc.peak, cbc.method.c_str(), cbc.solve_s,
                cbc.note.c_str());
  }
}
