// tests/unit/cxl_placement_test.cpp — latency-first host placement (parallel/cxl/placement.h):
// the paper's worked example (8B parameters, 100 GiB local DRAM budget, 256 GiB CXL) comes out
// as stated, with exact bytes per group and tier; budget edge cases (0, >= total, exactly at a
// group boundary); the baselines; capacity errors; and a plan that tier_alloc realises.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "parallel/cxl/placement.h"
#include "runtime/error.h"
#include "runtime/tier_alloc.h"

using namespace troupe::parallel::cxl;
using troupe::runtime::errc;
using troupe::runtime::memory_tier;
using troupe::runtime::placement;

namespace {

constexpr int64_t GiB = int64_t{1} << 30;

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

// DRAM node 0 (128 GiB) and one CXL card, node 1 (256 GiB); or two CXL cards (nodes 1, 2).
std::vector<memory_tier> machine(int cxl_cards = 1, int64_t cxl_capacity = 256 * GiB) {
  std::vector<memory_tier> t{{"dram", memory_tier::dram, {0}, 128 * GiB, false, 0, 0}};
  memory_tier c{"cxl", memory_tier::cxl, {}, cxl_capacity, false, 0, 0};
  for (int i = 0; i < cxl_cards; ++i) c.numa_nodes.push_back(1 + i);
  t.push_back(c);
  return t;
}

int64_t on_node(const group_placement& g, int node) {
  int64_t b = 0;
  for (const auto& s : g.shares)
    if (s.node == node) b += s.bytes;
  return b;
}

std::string error_of(const std::vector<group>& g, const std::vector<memory_tier>& t, int64_t budget,
                     placement_policy p) {
  try {
    place(g, t, budget, p);
  } catch (const troupe::runtime::error& e) {
    EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
    return e.message();
  }
  ADD_FAILURE() << "no error";
  return "";
}

}  // namespace

// The worked example. 8e9 parameters; fp32 master weights, master grads, momentum and variance
// are 4 bytes each = 32e9 bytes (29.80 GiB) per group; bf16 compute weights and grads 16e9 bytes
// (14.90 GiB); activations 40 GiB. Priority 1 in the paper's order: momentum + variance +
// master grads = 96e9 bytes (89.41 GiB) <= 100 GiB; with master weights 128e9 (119.21 GiB) >
// 100 GiB, so the master weights straddle the budget: 100 GiB - 96e9 = 11,374,182,400 bytes
// stay in DRAM and 20,625,817,600 go to CXL. The rest (14.90 + 40 + 14.90 GiB) goes to CXL.
TEST(cxl_placement, paper_worked_example) {
  const auto groups = training_groups(8'000'000'000, 40 * GiB);
  const placement_plan plan = place(groups, machine(), 100 * GiB, placement_policy::latency_first);
  ASSERT_EQ(plan.groups.size(), 7u);
  const int64_t m = 32'000'000'000, c = 16'000'000'000;
  for (const char* local : {"momentum", "variance", "master_grads"}) {
    const auto& g = plan[local];
    EXPECT_EQ(g.bytes, m);
    EXPECT_EQ(g.dram_bytes, m) << local;
    EXPECT_EQ(g.cxl_bytes, 0) << local;
    EXPECT_FALSE(g.straddles);
    EXPECT_EQ(g.where.how, placement::bind);
    EXPECT_EQ(g.where.nodes, std::vector<int>{0});
    EXPECT_EQ(on_node(g, 0), m);
  }
  const auto& mw = plan["master_weights"];
  EXPECT_TRUE(mw.straddles);
  EXPECT_EQ(mw.dram_bytes, 100 * GiB - 3 * m);
  EXPECT_EQ(mw.dram_bytes, 11'374'182'400);
  EXPECT_EQ(mw.cxl_bytes, 20'625'817'600);
  EXPECT_EQ(mw.where.how, placement::interleave);
  EXPECT_EQ(mw.where.nodes, (std::vector<int>{0, 1}));
  EXPECT_EQ(mw.where.weights, (std::vector<int64_t>{11'374'182'400, 20'625'817'600}));
  EXPECT_EQ(mw.tiers, (std::vector<std::string>{"dram", "cxl"}));
  for (const char* remote : {"compute_weights", "activations", "compute_grads"}) {
    const auto& g = plan[remote];
    EXPECT_EQ(g.dram_bytes, 0) << remote;
    EXPECT_EQ(g.cxl_bytes, g.bytes) << remote;
    EXPECT_EQ(g.where.nodes, std::vector<int>{1});
    EXPECT_EQ(g.tiers, std::vector<std::string>{"cxl"});
    EXPECT_TRUE(g.where.pin) << remote << ": GPUs copy from it";
  }
  for (const char* cpu_only : {"momentum", "variance", "master_grads", "master_weights"})
    EXPECT_FALSE(plan[cpu_only].where.pin) << cpu_only;
  EXPECT_EQ(plan["compute_weights"].bytes, c);
  EXPECT_EQ(plan["activations"].bytes, 40 * GiB);
  EXPECT_EQ(plan.dram_bytes, 100 * GiB);  // DRAM exactly at the budget, never above
  EXPECT_EQ(plan.cxl_bytes, 20'625'817'600 + 2 * c + 40 * GiB);
  EXPECT_EQ(plan.cxl_bytes, 95'575'490'560);  // 89.01 GiB of the 256 GiB card
  // Placement order is priority order even when the groups come in shuffled.
  std::vector<group> shuffled(groups.rbegin(), groups.rend());
  const auto plan2 = place(shuffled, machine(), 100 * GiB, placement_policy::latency_first);
  EXPECT_EQ(plan2.groups[0].priority, 1);
  EXPECT_EQ(plan2.groups.back().name, "compute_grads");
  EXPECT_HAS(describe(plan), "(straddles the budget)");
}

TEST(cxl_placement, two_cxl_cards_stripe_evenly) {
  const auto plan = place(training_groups(8'000'000'000, 40 * GiB), machine(2), 100 * GiB,
                          placement_policy::latency_first);
  const auto& mw = plan["master_weights"];
  EXPECT_EQ(mw.where.nodes, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(on_node(mw, 0), 11'374'182'400);
  EXPECT_EQ(on_node(mw, 1), 10'312'908'800);
  EXPECT_EQ(on_node(mw, 2), 10'312'908'800);
  const auto& act = plan["activations"];
  EXPECT_EQ(act.where.how, placement::interleave);
  EXPECT_TRUE(act.where.weights.empty());  // plain page interleave
  EXPECT_EQ(act.where.nodes, (std::vector<int>{1, 2}));
  EXPECT_EQ(on_node(act, 1), 20 * GiB);
  EXPECT_EQ(on_node(act, 2), 20 * GiB);
}

TEST(cxl_placement, budget_edge_cases) {
  const auto groups = training_groups(1000, 3000);  // 4000 x4 (priority 1), 2000, 3000, 2000
  const int64_t total = 4 * 4000 + 2000 + 3000 + 2000;
  const auto tiers = machine();
  // Budget 0: everything on CXL, nothing straddles.
  auto p0 = place(groups, tiers, 0, placement_policy::latency_first);
  EXPECT_EQ(place(groups, {tiers[1]}, 0, placement_policy::latency_first).cxl_bytes, total);  // no DRAM tier needed
  EXPECT_EQ(p0.dram_bytes, 0);
  EXPECT_EQ(p0.cxl_bytes, total);
  for (const auto& g : p0.groups) EXPECT_FALSE(g.straddles) << g.name;
  // Budget >= total: everything bound to DRAM; no CXL tier needed at all.
  for (int64_t budget : {total, total + 1, 64 * GiB}) {
    auto p = place(groups, {tiers[0]}, budget, placement_policy::latency_first);
    EXPECT_EQ(p.dram_bytes, total);
    EXPECT_EQ(p.cxl_bytes, 0);
    for (const auto& g : p.groups) EXPECT_EQ(g.where.how, placement::bind) << g.name;
  }
  // Budget exactly at the boundary after compute weights: no group straddles.
  auto pb = place(groups, tiers, 4 * 4000 + 2000, placement_policy::latency_first);
  for (const auto& g : pb.groups) EXPECT_FALSE(g.straddles) << g.name;
  EXPECT_EQ(pb["compute_weights"].dram_bytes, 2000);
  EXPECT_EQ(pb["activations"].cxl_bytes, 3000);
  EXPECT_EQ(pb.dram_bytes, 18000);
  // One byte more: activations straddle with exactly one byte in DRAM.
  auto p1 = place(groups, tiers, 4 * 4000 + 2000 + 1, placement_policy::latency_first);
  EXPECT_TRUE(p1["activations"].straddles);
  EXPECT_EQ(p1["activations"].dram_bytes, 1);
  EXPECT_EQ(p1["activations"].cxl_bytes, 2999);
  EXPECT_EQ(p1["compute_grads"].cxl_bytes, 2000);
}

TEST(cxl_placement, baselines) {
  const auto groups = training_groups(8'000'000'000, 40 * GiB);
  const int64_t total = 4 * 32'000'000'000 + 2 * 16'000'000'000 + 40 * GiB;
  auto tiers = machine();
  tiers[0].capacity_bytes = 512 * GiB;
  const auto dram = place(groups, tiers, 100 * GiB, placement_policy::dram_only);
  EXPECT_EQ(dram.dram_bytes, total);
  EXPECT_EQ(dram.cxl_bytes, 0);
  const auto cxl = place(groups, tiers, 100 * GiB, placement_policy::cxl_only);
  EXPECT_EQ(cxl.cxl_bytes, total);
  for (const auto& g : cxl.groups) EXPECT_EQ(g.where.nodes, std::vector<int>{1}) << g.name;
  const auto il = place(groups, tiers, 100 * GiB, placement_policy::interleave_all);
  EXPECT_EQ(il.dram_bytes + il.cxl_bytes, total);
  for (const auto& g : il.groups) {
    EXPECT_EQ(g.where.how, placement::interleave) << g.name;
    EXPECT_TRUE(g.where.weights.empty());
    EXPECT_EQ(g.dram_bytes, (g.bytes + 1) / 2) << g.name;  // even split over nodes 0 and 1
  }
  EXPECT_EQ(parse_policy("interleave_all"), placement_policy::interleave_all);
  EXPECT_THROW(parse_policy("random"), troupe::runtime::error);
}

TEST(cxl_placement, tiers_too_small_are_named) {
  const auto groups = training_groups(8'000'000'000, 40 * GiB);
  // 89.01 GiB must go to CXL; a 64 GiB card cannot hold it.
  std::string e = error_of(groups, machine(1, 64 * GiB), 100 * GiB, placement_policy::latency_first);
  EXPECT_HAS(e, "tier 'cxl' (cxl) would hold 89.01 GiB");
  EXPECT_HAS(e, "capacity is 64.00 GiB");
  // dram_only: 188 GiB into 128 GiB of DRAM.
  e = error_of(groups, machine(), 100 * GiB, placement_policy::dram_only);
  EXPECT_HAS(e, "tier 'dram' (dram) would hold");
  // A budget above DRAM, no CXL tier where CXL is needed, no DRAM tier.
  EXPECT_HAS(error_of(groups, machine(), 200 * GiB, placement_policy::latency_first), "exceeds tier 'dram' capacity");
  EXPECT_HAS(error_of(groups, {machine()[0]}, 100 * GiB, placement_policy::latency_first), "no cxl tier");
  EXPECT_HAS(error_of(groups, {machine()[1]}, 100 * GiB, placement_policy::dram_only), "no dram tier");
  EXPECT_HAS(error_of({{"x", 5, 1}}, machine(), 0, placement_policy::latency_first), "group 'x' has priority 5");
}

// The plan's placement is what tier_alloc takes: an emulated CXL tier on node 0 (a machine
// without CXL) runs latency-first for real, every page on node 0.
TEST(cxl_placement, plan_allocates_through_tier_alloc) {
  if (!troupe::runtime::numa_usable()) GTEST_SKIP() << "NUMA not available (no libnuma or numa_available() < 0)";
  std::vector<memory_tier> tiers{{"dram", memory_tier::dram, {0}, 64 << 20, false, 0, 0},
                                 {"cxl", memory_tier::cxl, {0}, 64 << 20, true, 10, 200}};
  // 1M parameters: 4 MiB per fp32 group. A 13 MiB budget leaves 1 MiB of DRAM for the master
  // weights, 3 MiB go to CXL: weighted stripes 1:3, all on node 0 here.
  const auto plan = place(training_groups(1 << 20, 4 << 20), tiers, 13 << 20, placement_policy::latency_first);
  EXPECT_TRUE(plan["master_weights"].straddles);
  EXPECT_EQ(plan["master_weights"].where.weights, (std::vector<int64_t>{1 << 20, 3 << 20}));
  for (const auto& g : plan.groups) {
    auto a = troupe::runtime::tier_alloc(static_cast<size_t>(g.bytes), g.where);
    EXPECT_FALSE(a.fell_back) << g.name << ": " << a.note;
    for (int n : troupe::runtime::pages_nodes(a.ptr, a.bytes)) ASSERT_EQ(n, 0) << g.name;
    troupe::runtime::tier_free(a);
  }
}
