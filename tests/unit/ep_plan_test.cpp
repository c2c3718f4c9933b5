// Expert-to-rank chunk plans (parallel/ep/ep_plan.h) and the skewed routing generator
// (parallel/ep/ep_skew.h):
//   * hand-computed LLEP plans that exercise each rule of the paper's algorithm (gate, capacity
//     m_alpha, native room first, spill order, min_chunk skipping, remainder to the least loaded,
//     row_align rounding), and EPLB plans (replicas to the heaviest, packing, even split);
//   * invariants on many random cases: coverage/order/alignment (ep_plan_check), LLEP no worse than
//     EP on skewed loads, foreign weight copies, EPLB slot counts and replica rules;
//   * the skew generator: distinct ids, determinism, loads near the analytic expectation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <utility>

#include "parallel/ep/ep_plan.h"
#include "parallel/ep/ep_skew.h"
#include "runtime/error.h"

namespace {

using namespace troupe::parallel::ep;
using troupe::runtime::errc;
using loads_t = std::vector<int64_t>;

struct want_chunk {
  int expert, rank;
  int64_t begin, end;
};

void expect_chunks(const ep_plan& p, const std::vector<want_chunk>& want) {
  ASSERT_EQ(p.chunks.size(), want.size()) << p.describe();
  for (size_t i = 0; i < want.size(); ++i) {
    const ep_chunk& c = p.chunks[i];
    EXPECT_EQ(c.expert, want[i].expert) << "chunk " << i << "\n" << p.describe();
    EXPECT_EQ(c.rank, want[i].rank) << "chunk " << i << "\n" << p.describe();
    EXPECT_EQ(c.begin, want[i].begin) << "chunk " << i << "\n" << p.describe();
    EXPECT_EQ(c.end, want[i].end) << "chunk " << i << "\n" << p.describe();
  }
}

std::set<std::pair<int, int>> foreign_pairs(const ep_plan& p) {
  std::set<std::pair<int, int>> s;
  for (const auto& c : p.chunks)
    if (c.rank != p.placement.native[static_cast<size_t>(c.expert)]) s.insert({c.expert, c.rank});
  return s;
}

llep_options opts(int64_t min_chunk, double alpha = 1.0, int64_t row_align = 1, double lambda = 1.3) {
  llep_options o;
  o.lambda = lambda;
  o.alpha = alpha;
  o.min_chunk = min_chunk;
  o.row_align = row_align;
  return o;
}

// ---- hand-computed LLEP plans ------------------------------------------------------------

TEST(LlepPlan, GateBelowLambdaIsStandardEp) {
  // ranks {0,1}: 20 and 22 rows, max/mean 22/21 = 1.048 <= 1.3
  const loads_t loads = {10, 10, 10, 12};
  const auto native = ep_placement::contiguous(4, 2);
  EXPECT_NEAR(native_max_over_mean(loads, native), 22.0 / 21.0, 1e-12);
  const ep_plan p = llep_plan(loads, native, opts(1));
  EXPECT_EQ(p.mode, ep_mode::llep);
  EXPECT_TRUE(p.gated);
  expect_chunks(p, {{0, 0, 0, 10}, {1, 0, 0, 10}, {2, 1, 0, 10}, {3, 1, 0, 12}});
  EXPECT_TRUE(p.foreign_weights().empty());
  // The same loads with lambda = 1.0 are planned: capacity 21 each.
  const ep_plan q = llep_plan(loads, native, opts(1, 1.0, 1, 1.0));
  EXPECT_FALSE(q.gated);
  // LPT: e3 (12, rank 1; pending 10 -> fits 12 <= 11? no: room 11, spill 1 to rank 0), then e0, e1, e2.
  expect_chunks(q, {{0, 0, 0, 10}, {1, 0, 0, 10}, {2, 1, 0, 10}, {3, 1, 0, 11}, {3, 0, 11, 12}});
  EXPECT_EQ(q.rank_rows(), (loads_t{21, 21}));
}

TEST(LlepPlan, NativeRoomFirstThenSpill) {
  // total 100, P = 2 -> m_alpha = 50. Rank 0 natively 80 (max/mean 1.6).
  // e0 (60): pending rank 0 = 20, room 30 -> [0,30) on 0, [30,60) spills to rank 1 (room 50-20).
  // e1 (20): rank 0 effective 30 -> fits. e2, e3 (10 each): rank 1 effective 40 then 40 -> fit.
  const loads_t loads = {60, 20, 10, 10};
  const auto native = ep_placement::contiguous(4, 2);
  const ep_plan p = llep_plan(loads, native, opts(1));
  EXPECT_FALSE(p.gated);
  expect_chunks(p, {{0, 0, 0, 30}, {0, 1, 30, 60}, {1, 0, 0, 20}, {2, 1, 0, 10}, {3, 1, 0, 10}});
  EXPECT_EQ(p.rank_rows(), (loads_t{50, 50}));
  EXPECT_DOUBLE_EQ(p.max_over_mean(), 1.0);
  const auto fw = p.foreign_weights();
  ASSERT_EQ(fw.size(), 1u);
  EXPECT_EQ(fw[0].expert, 0);
  EXPECT_EQ(fw[0].rank, 1);
  ep_plan_check(p, loads, 1);
}

TEST(LlepPlan, SpillOrderAscendingEffectiveLoadAndRemainderBelowMinChunk) {
  // One expert per rank, total 140, m_alpha = 35. e0 (100): native room 35; the others by
  // effective load: rank 2 (10), rank 3 (10, tie -> lower rank first), rank 1 (20).
  // min_chunk 20: rank 2 takes 25, rank 3 takes 25, rank 1's 15 is the remainder (kept although < 20).
  const loads_t loads = {100, 20, 10, 10};
  const auto native = ep_placement::contiguous(4, 4);
  const ep_plan p = llep_plan(loads, native, opts(20));
  expect_chunks(p, {{0, 0, 0, 35}, {0, 2, 35, 60}, {0, 3, 60, 85}, {0, 1, 85, 100}, {1, 1, 0, 20}, {2, 2, 0, 10},
                    {3, 3, 0, 10}});
  EXPECT_EQ(p.rank_rows(), (loads_t{35, 35, 35, 35}));
  EXPECT_EQ(foreign_pairs(p), (std::set<std::pair<int, int>>{{0, 1}, {0, 2}, {0, 3}}));
  EXPECT_EQ(p.foreign_weights().size(), 3u);
}

TEST(LlepPlan, ChunksBelowMinChunkAreSkippedAndTheRemainderGoesToTheLeastLoaded) {
  // As above with min_chunk 26: the rooms 25, 25, 15 are all too small (and none is the whole
  // remainder), so the 65 left go to the least-loaded rank by effective load: rank 2 (10; rank 3
  // ties at 10, lower rank wins). e1 then fits on rank 1; e2 (10) finds rank 2 full (65 > 35),
  // spills to rank 3 (effective 10, the least); e3 then fits on rank 3 (10 + 10 <= 35).
  const loads_t loads = {100, 20, 10, 10};
  const auto native = ep_placement::contiguous(4, 4);
  const ep_plan p = llep_plan(loads, native, opts(26));
  expect_chunks(p, {{0, 0, 0, 35}, {0, 2, 35, 100}, {1, 1, 0, 20}, {2, 3, 0, 10}, {3, 3, 0, 10}});
  EXPECT_EQ(p.rank_rows(), (loads_t{35, 20, 65, 20}));
  EXPECT_NEAR(p.max_over_mean(), 65.0 / 35.0, 1e-12);
  EXPECT_EQ(foreign_pairs(p), (std::set<std::pair<int, int>>{{0, 2}, {2, 3}}));
}

TEST(LlepPlan, NobodyHasRoomRemainderToLeastLoaded) {
  // alpha 0.5: total 120, P = 3 -> m_alpha = 20. e0 (90): native room 20; spill to rank 2 (eff 0)
  // 20; rank 1 (eff 30 pending) has none; the 50 left go to the least loaded (rank 0 at 20 ties
  // rank 2 at 20 -> rank 0). e1 (30): native room 20, nobody else has room, the 10 left go to the
  // least loaded: rank 1 (20) ties rank 2 (20) -> rank 1, merged with its first chunk.
  const loads_t loads = {90, 30, 0};
  const auto native = ep_placement::contiguous(3, 3);
  const ep_plan p = llep_plan(loads, native, opts(1, 0.5));
  expect_chunks(p, {{0, 0, 0, 20}, {0, 2, 20, 40}, {0, 0, 40, 90}, {1, 1, 0, 30}});
  EXPECT_EQ(p.rank_rows(), (loads_t{70, 30, 20}));
  ep_plan_check(p, loads, 1);
}

TEST(LlepPlan, RowAlignRoundsRoomsDown) {
  // m_alpha = 150, row tile 64: rooms are 128. e0 (300): [0,128) native, [128,256) to rank 1,
  // 44 left and no room (22 -> 0 after rounding): the least loaded (tie 128/128 -> rank 0).
  const loads_t loads = {300, 0};
  const auto native = ep_placement::contiguous(2, 2);
  const ep_plan p = llep_plan(loads, native, opts(1, 1.0, 64));
  expect_chunks(p, {{0, 0, 0, 128}, {0, 1, 128, 256}, {0, 0, 256, 300}});
  for (const auto& c : p.chunks) EXPECT_EQ(c.begin % 64, 0);
  ep_plan_check(p, loads, 64);
  // Without the tile the same loads split evenly.
  expect_chunks(llep_plan(loads, native, opts(1)), {{0, 0, 0, 150}, {0, 1, 150, 300}});
}

TEST(LlepPlan, RejectsBadOptionsAndLoads) {
  const auto native = ep_placement::contiguous(4, 2);
  EXPECT_THROW(llep_plan({1, 2, 3}, native, opts(1)), troupe::runtime::error);  // 3 loads, 4 experts
  EXPECT_THROW(llep_plan({1, 2, -3, 4}, native, opts(1)), troupe::runtime::error);
  EXPECT_THROW(llep_plan({1, 2, 3, 4}, native, opts(0)), troupe::runtime::error);
  EXPECT_THROW(llep_plan({1, 2, 3, 4}, native, opts(1, 0.0)), troupe::runtime::error);
  EXPECT_THROW(ep_placement::contiguous(6, 4), troupe::runtime::error);
  // All-zero loads: nothing to compute, max/mean 1, gated.
  const ep_plan z = llep_plan({0, 0, 0, 0}, native, opts(1));
  EXPECT_TRUE(z.chunks.empty());
  EXPECT_TRUE(z.gated);
  EXPECT_DOUBLE_EQ(z.max_over_mean(), 1.0);
}

// ---- hand-computed EPLB plans ------------------------------------------------------------

TEST(EplbPlan, ReplicasToTheHeaviestPackedGreedily) {
  // P = 2, 1 redundant slot each: 3 slots per rank. Redundant slots: e0 (80 -> 40 per replica),
  // then e1 (40; e0 already has one replica per rank). Replicas by load: e0, e0 (40), e1, e1, e2,
  // e3 (20): e0 -> ranks 0, 1; e1 -> 0, 1; e2 -> 0 (tie); e3 -> 1.
  const loads_t loads = {80, 40, 20, 20};
  const ep_plan p = eplb_plan(loads, 2, 1);
  EXPECT_EQ(p.mode, ep_mode::eplb);
  expect_chunks(p, {{0, 0, 0, 40}, {0, 1, 40, 80}, {1, 0, 0, 20}, {1, 1, 20, 40}, {2, 0, 0, 20}, {3, 1, 0, 20}});
  EXPECT_EQ(p.rank_rows(), (loads_t{80, 80}));
  EXPECT_EQ(p.placement.native, (std::vector<int>{0, 0, 0, 1}));  // first replica's rank
  EXPECT_EQ(p.foreign_weights().size(), 2u);                       // e0, e1 on rank 1
}

TEST(EplbPlan, OnTheNativePlacementOnlyTheExtraReplicasMove) {
  // make_ep_plan runs eplb_plan_on: e0, e1 stay on rank 0 and e2, e3 on rank 1 (contiguous). The
  // 2 extra slots go to e0 (80 -> 40 per replica), then e1 (e0 has one per rank). Native loads:
  // rank 0 = 40 + 20 = 60, rank 1 = 20 + 20 = 40. e0's extra replica -> rank 1 (80); e1's would need
  // rank 1's only extra slot, taken: e1 keeps one replica.
  const loads_t loads = {80, 40, 20, 20};
  const ep_plan q = make_ep_plan(ep_mode::eplb, loads, ep_placement::contiguous(4, 2), {}, 1);
  expect_chunks(q, {{0, 0, 0, 40}, {0, 1, 40, 80}, {1, 0, 0, 40}, {2, 1, 0, 20}, {3, 1, 0, 20}});
  EXPECT_EQ(q.rank_rows(), (loads_t{80, 80}));
  EXPECT_EQ(foreign_pairs(q), (std::set<std::pair<int, int>>{{0, 1}}));
  EXPECT_EQ(q.placement.native, (std::vector<int>{0, 0, 1, 1}));
}

TEST(EplbPlan, EvenSplitOnTheRowTile) {
  // One expert with all the load, P = 4, 1 redundant slot each: it gets a replica on every rank.
  const loads_t loads = {1000, 1, 1, 1, 1, 1, 1, 1};
  const ep_plan p = eplb_plan(loads, 4, 1, 64);
  ep_plan_check(p, loads, 64);
  std::vector<ep_chunk> e0;
  for (const auto& c : p.chunks)
    if (c.expert == 0) e0.push_back(c);
  ASSERT_EQ(e0.size(), 4u);
  // ends: 1000 * k / 4 rounded up to the tile = 256, 512, 768, then 1000
  EXPECT_EQ(e0[0].end, 256);
  EXPECT_EQ(e0[1].end, 512);
  EXPECT_EQ(e0[2].end, 768);
  EXPECT_EQ(e0[3].end, 1000);
  std::set<int> ranks;
  for (const auto& c : e0) ranks.insert(c.rank);
  EXPECT_EQ(ranks.size(), 4u);
  // Without a tile: 250 each.
  for (const auto& c : eplb_plan(loads, 4, 1).chunks) {
    if (c.expert == 0) {
      EXPECT_EQ(c.rows(), 250);
    }
  }
}

// ---- random cases ------------------------------------------------------------------------

loads_t random_loads(std::mt19937_64& g, int64_t E, int kind) {
  loads_t l(static_cast<size_t>(E));
  std::uniform_int_distribution<int64_t> u(0, 4000);
  for (int64_t e = 0; e < E; ++e) {
    switch (kind) {
      case 0: l[static_cast<size_t>(e)] = u(g); break;                                      // uniform
      case 1: l[static_cast<size_t>(e)] = static_cast<int64_t>(60000.0 / (1.0 + e)); break;  // zipf
      case 2: l[static_cast<size_t>(e)] = e == 0 ? 100000 : u(g) / 40; break;               // one hot
      default: l[static_cast<size_t>(e)] = (u(g) % 3 == 0) ? 0 : u(g) * (e < E / 4 ? 8 : 1);  // sparse, skewed
    }
  }
  if (kind == 1) std::shuffle(l.begin(), l.end(), g);
  return l;
}

TEST(EpPlanRandom, InvariantsHoldOnManyCases) {
  int planned = 0, cases = 0, compared = 0, eplb_checked = 0;
  for (int P : {2, 4, 8})
    for (int64_t E : {8, 16, 128})
      for (int kind = 0; kind < 4; ++kind)
        for (uint64_t seed = 1; seed <= 12; ++seed) {
          std::mt19937_64 g(seed * 1000003 + static_cast<uint64_t>(P * 131 + E * 7 + kind));
          const loads_t loads = random_loads(g, E, kind);
          const auto native = ep_placement::contiguous(E, P);
          const int64_t align = seed % 2 ? 1 : 64, min_chunk = seed % 3 == 0 ? 1 : seed % 3 == 1 ? 64 : 1024;
          const double alpha = seed % 4 == 0 ? 1.2 : 1.0;
          SCOPED_TRACE(testing::Message() << "P " << P << " E " << E << " kind " << kind << " seed " << seed);
          ++cases;

          const ep_plan ep = ep_plan_standard(loads, native);
          ep_plan_check(ep, loads, 1);
          EXPECT_TRUE(ep.foreign_weights().empty());
          EXPECT_NEAR(ep.max_over_mean(), native_max_over_mean(loads, native), 1e-12);

          const ep_plan ll = llep_plan(loads, native, opts(min_chunk, alpha, align));
          ep_plan_check(ll, loads, align);
          EXPECT_EQ(ll.gated, native_max_over_mean(loads, native) <= 1.3);
          if (!ll.gated) ++planned;
          // foreign_weights: exactly the distinct (expert, non-native rank) pairs of the chunks
          const auto fw = ll.foreign_weights();
          EXPECT_EQ(fw.size(), foreign_pairs(ll).size());
          // Consecutive chunks of one expert on one rank are merged.
          for (size_t i = 1; i < ll.chunks.size(); ++i)
            EXPECT_FALSE(ll.chunks[i].expert == ll.chunks[i - 1].expert && ll.chunks[i].rank == ll.chunks[i - 1].rank);
          // Balance: with no row tile and no minimum chunk, every rank ends within rounding of
          // m_alpha (alpha = 1) or at most m_alpha (alpha > 1 leaves slack) plus the remainders.
          if (!ll.gated && align == 1 && min_chunk == 1) {
            const double total = static_cast<double>(std::accumulate(loads.begin(), loads.end(), int64_t{0}));
            const auto rows = ll.rank_rows();
            const double mx = static_cast<double>(*std::max_element(rows.begin(), rows.end()));
            EXPECT_LE(mx, alpha * total / P + static_cast<double>(E * P));
          }
          if (native_max_over_mean(loads, native) > 2.0 && min_chunk <= 64) {
            EXPECT_LE(ll.max_over_mean(), ep.max_over_mean());
            ++compared;
          }

          const int red = static_cast<int>(seed % 3);  // 0, 1, 2 redundant slots per rank
          const ep_plan lb = eplb_plan(loads, P, red, align);
          ep_plan_check(lb, loads, align);
          // On the native placement: every expert's first chunk is native, at most `red` extra
          // replicas per rank, never two on one rank, and no worse balance than EP.
          const ep_plan on = eplb_plan_on(loads, native, red, align);
          ep_plan_check(on, loads, align);
          {
            std::map<int, std::set<int>> on_holders;
            std::vector<int64_t> extra(static_cast<size_t>(P), 0);
            for (const auto& c : on.chunks) {
              const int n = native.native[static_cast<size_t>(c.expert)];
              if (c.begin == 0) {
                EXPECT_EQ(c.rank, n) << "expert " << c.expert;
              }
              EXPECT_TRUE(on_holders[c.expert].insert(c.rank).second);
              if (c.rank != n) ++extra[static_cast<size_t>(c.rank)];
            }
            for (int r = 0; r < P; ++r) EXPECT_LE(extra[static_cast<size_t>(r)], red);
            if (red == 0) {
              EXPECT_EQ(on.max_over_mean(), ep.max_over_mean());
            }
          }
          // Replica holders: no rank holds two replicas of one expert; slots per rank = E/P + red
          // when every expert has rows (every replica then gets a chunk: loads >= replicas).
          std::map<int, std::set<int>> holders;
          std::map<int, int> chunks_per_expert;
          for (const auto& c : lb.chunks) {
            EXPECT_TRUE(holders[c.expert].insert(c.rank).second) << "expert " << c.expert << " twice on " << c.rank;
            ++chunks_per_expert[c.expert];
          }
          const bool all_loaded = std::all_of(loads.begin(), loads.end(), [&](int64_t l) { return l >= P; });
          if (all_loaded && align == 1) {
            ++eplb_checked;
            std::vector<int64_t> slots(static_cast<size_t>(P), 0);
            for (const auto& [e, hs] : holders)
              for (int r : hs) ++slots[static_cast<size_t>(r)];
            for (int r = 0; r < P; ++r) EXPECT_EQ(slots[static_cast<size_t>(r)], E / P + red) << "rank " << r;
            // Replicas went to the heaviest: a's last replica beat b's ratio at that time.
            for (const auto& [a, ha] : holders)
              for (const auto& [b, hb] : holders) {
                const auto na = static_cast<int64_t>(ha.size()), nb = static_cast<int64_t>(hb.size());
                if (a == b || na <= 1 || nb >= P) continue;
                EXPECT_GE(loads[static_cast<size_t>(a)] * nb, loads[static_cast<size_t>(b)] * (na - 1))
                    << "expert " << a << " (" << na << " replicas) vs " << b << " (" << nb << ")";
              }
            // Even split: rows per replica are floor or ceil of load / replicas.
            for (const auto& c : lb.chunks) {
              const int64_t l = loads[static_cast<size_t>(c.expert)], n = chunks_per_expert[c.expert];
              EXPECT_TRUE(c.rows() == l / n || c.rows() == (l + n - 1) / n) << c.expert;
            }
          }
        }
  EXPECT_EQ(cases, 3 * 3 * 4 * 12);
  EXPECT_GT(planned, cases / 3);  // the gate let a good share of the cases through
  EXPECT_GT(compared, cases / 10);
  EXPECT_GT(eplb_checked, cases / 10);
  fprintf(stderr, "%d cases: %d planned by LLEP, %d compared with EP, %d EPLB replica checks\n", cases, planned,
          compared, eplb_checked);
}

// The cases at the paper's scale: P = 8, E = 128, top-4, 8192 tokens per rank.
TEST(EpPlanRandom, LlepBalancesTheSkewCases) {
  const int64_t E = 128, K = 4, N = 8 * 8192;
  const auto native = ep_placement::contiguous(E, 8);
  for (const skew_case& c : skew_cases_standard()) {
    SCOPED_TRACE(c.name);
    const auto topk = skew_routing(c, N, K, E, {.seed = 11});
    const loads_t loads = loads_from_routing(topk.data(), N, K, E);
    EXPECT_EQ(std::accumulate(loads.begin(), loads.end(), int64_t{0}), N * K);
    const ep_plan ep = ep_plan_standard(loads, native);
    const ep_plan ll = llep_plan(loads, native, opts(1024, 1.0, 64));
    ep_plan_check(ll, loads, 64);
    const ep_plan lb = eplb_plan(loads, 8, 4, 64);
    ep_plan_check(lb, loads, 64);
    EXPECT_LE(ll.max_over_mean(), ep.max_over_mean() + 1e-12);
    if (c.hot_experts == 0) {
      EXPECT_TRUE(ll.gated);
      EXPECT_LT(ep.max_over_mean(), 1.05);
    } else {
      EXPECT_FALSE(ll.gated);
      EXPECT_GT(ep.max_over_mean(), 2.3);
      EXPECT_LT(ll.max_over_mean(), 1.01);  // m_alpha = 32768 rows; the 64-row tile leaves < 1%
      EXPECT_LE(lb.max_over_mean(), ep.max_over_mean());
    }
  }
}

// ---- the skew generator ------------------------------------------------------------------

TEST(EpSkew, NamesParse) {
  EXPECT_EQ(skew_case_from("balanced").hot_experts, 0);
  const skew_case a = skew_case_from("30%-16");
  EXPECT_EQ(a.name, "30%-16");
  EXPECT_DOUBLE_EQ(a.hot_fraction, 0.3);
  EXPECT_EQ(a.hot_experts, 16);
  EXPECT_EQ(skew_case_from("12.5%-8").name, "12.5%-8");
  std::vector<std::string> names;
  for (const auto& c : skew_cases_standard()) names.push_back(c.name);
  EXPECT_EQ(names, (std::vector<std::string>{"balanced", "30%-16", "50%-4", "80%-4", "95%-1"}));
  for (const char* bad : {"", "30", "30%", "30%-", "30%-x", "x%-4", "130%-4", "5%-0", "-5%-4", "30%-4x"}) {
    try {
      skew_case_from(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const troupe::runtime::error& e) {
      EXPECT_EQ(e.code(), errc::invalid_argument) << bad;
    }
  }
}

TEST(EpSkew, HotSetPlacement) {
  const skew_case c = skew_case_from("50%-4");
  EXPECT_EQ(skew_hot_set(c, 128, {}), (std::vector<int>{0, 1, 2, 3}));
  // spread over 8 ranks of 16 experts: hot j on rank j at slot 0
  EXPECT_EQ(skew_hot_set(c, 128, {.placement = skew_hot_placement::spread, .ranks = 8}),
            (std::vector<int>{0, 16, 32, 48}));
  // 16 hot over 8 ranks: two per rank
  const auto s = skew_hot_set(skew_case_from("30%-16"), 128, {.placement = skew_hot_placement::spread, .ranks = 8});
  ASSERT_EQ(s.size(), 16u);
  const auto native = ep_placement::contiguous(128, 8);
  std::vector<int> per_rank(8, 0);
  for (int e : s) ++per_rank[static_cast<size_t>(native.native[static_cast<size_t>(e)])];
  EXPECT_EQ(per_rank, std::vector<int>(8, 2));
  EXPECT_THROW(skew_hot_set(c, 126, {.placement = skew_hot_placement::spread, .ranks = 8}), troupe::runtime::error);
}

TEST(EpSkew, RoutingRowsAreDistinctDeterministicAndNearExpectation) {
  const int64_t N = 20000, K = 4, E = 128;
  for (const skew_case& c : skew_cases_standard())
    for (auto pl : {skew_hot_placement::first, skew_hot_placement::spread}) {
      SCOPED_TRACE(c.name);
      const skew_options o{.placement = pl, .ranks = 8, .seed = 5};
      const auto topk = skew_routing(c, N, K, E, o);
      ASSERT_EQ(topk.size(), static_cast<size_t>(N * K));
      const auto hot = skew_hot_set(c, E, o);
      int64_t hot_tokens = 0;
      for (int64_t n = 0; n < N; ++n) {
        std::set<int32_t> row(topk.begin() + n * K, topk.begin() + n * K + K);
        ASSERT_EQ(row.size(), static_cast<size_t>(K)) << "token " << n;
        // hot ids come first, min(K, h) of them exactly when the token is hot
        int64_t nh = 0;
        for (int64_t k = 0; k < K; ++k)
          nh += std::binary_search(hot.begin(), hot.end(), topk[static_cast<size_t>(n * K + k)]) ? 1 : 0;
        ASSERT_TRUE(nh == 0 || nh == std::min<int64_t>(K, c.hot_experts)) << "token " << n;
        for (int64_t k = 0; k < nh; ++k)
          ASSERT_TRUE(std::binary_search(hot.begin(), hot.end(), topk[static_cast<size_t>(n * K + k)]));
        hot_tokens += nh > 0;
      }
      // the hot share is f within 5 standard deviations
      const double f = c.hot_fraction, sd = std::sqrt(f * (1 - f) / N);
      EXPECT_NEAR(static_cast<double>(hot_tokens) / N, f, 5 * sd + 1e-12);
      // per-expert loads within 6 standard deviations (binomial) of the expectation
      const auto loads = loads_from_routing(topk.data(), N, K, E);
      const auto want = skew_expected_loads(c, N, K, E, o);
      EXPECT_NEAR(std::accumulate(want.begin(), want.end(), 0.0), static_cast<double>(N * K), 1e-6);
      for (int64_t e = 0; e < E; ++e) {
        const double w = want[static_cast<size_t>(e)];
        EXPECT_NEAR(static_cast<double>(loads[static_cast<size_t>(e)]), w, 6 * std::sqrt(w) + 1) << "expert " << e;
      }
      // deterministic in the seed; another seed differs
      EXPECT_EQ(skew_routing(c, N, K, E, o), topk);
      skew_options o2 = o;
      o2.seed = 6;
      EXPECT_NE(skew_routing(c, N, K, E, o2), topk);
    }
  // 95%-1: the hot expert gets 0.95 N rows on average.
  EXPECT_NEAR(skew_expected_loads(skew_case_from("95%-1"), N, K, E, {})[0], 0.95 * N, 1e-9);
  // 80%-4: each of the 4 hot experts gets 0.8 N; cold 0.2 N * 4 / 124.
  const auto w = skew_expected_loads(skew_case_from("80%-4"), N, K, E, {});
  EXPECT_NEAR(w[3], 0.8 * N, 1e-9);
  EXPECT_NEAR(w[4], 0.2 * N * 4 / 124, 1e-9);
}

TEST(EpSkew, RejectsImpossibleCases) {
  EXPECT_THROW(skew_routing(skew_case_from("50%-126"), 10, 4, 128, {}), troupe::runtime::error);  // 2 cold < 4
  EXPECT_THROW(skew_routing(skew_case_from("balanced"), 10, 5, 4, {}), troupe::runtime::error);   // K > E
  const int32_t bad[2] = {0, 9};
  EXPECT_THROW(loads_from_routing(bad, 1, 2, 8), troupe::runtime::error);
  // 100% hot into all experts is fine (no cold token needs cold experts).
  const auto t = skew_routing(skew_case_from("100%-8"), 50, 4, 8, {});
  const auto l = loads_from_routing(t.data(), 50, 4, 8);
  EXPECT_EQ(std::accumulate(l.begin(), l.end(), int64_t{0}), 200);
}

}  // namespace
