// tests/unit/tier_alloc_test.cpp — NUMA placement through mbind (runtime/tier_alloc.h), checked
// with get_mempolicy and move_pages: bind to node 0, interleave over the nodes there are,
// weighted stripes, the fallbacks (a full node, a node that does not exist) with their flag and
// note, the free-memory check that decides before a page is touched; and the tier discovery
// and measurement of runtime/memory_tiers.h. Skips (with the reason) where NUMA is unavailable.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/memory_tiers.h"
#include "runtime/tier_alloc.h"

#ifdef TROUPE_HAVE_NUMA
#include <numa.h>
#include <numaif.h>
#endif

using namespace troupe::runtime;

namespace {

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

#ifdef TROUPE_HAVE_NUMA
#define SKIP_WITHOUT_NUMA() \
  if (!numa_usable()) GTEST_SKIP() << "numa_available() < 0: the kernel reports no NUMA"
#else
#define SKIP_WITHOUT_NUMA() GTEST_SKIP() << "built without libnuma (TROUPE_HAVE_NUMA unset)"
#endif

[[maybe_unused]] std::vector<int> memory_nodes() {
  std::vector<int> out;
  for (const auto& n : numa_nodes_with_memory()) out.push_back(n.node);
  return out;
}

}  // namespace

TEST(tier_alloc, stripes_follow_the_weights) {
  // Smooth weighted round robin: 1:3 over 8 stripes is 2 and 6, interleaved, not in blocks.
  const auto s = interleave_stripes(8, {1, 3});
  EXPECT_EQ(s, (std::vector<int>{1, 0, 1, 1, 1, 0, 1, 1}));
  const auto t = interleave_stripes(1000, {2, 5, 3});
  std::vector<int> count(3, 0);
  for (int x : t) ++count[static_cast<size_t>(x)];
  EXPECT_EQ(count, (std::vector<int>{200, 500, 300}));
  EXPECT_EQ(interleave_stripes(3, {0, 7}), (std::vector<int>{1, 1, 1}));
  EXPECT_THROW(interleave_stripes(3, {0, 0}), error);
}

TEST(tier_alloc, bind_to_node_zero) {
  SKIP_WITHOUT_NUMA();
#ifdef TROUPE_HAVE_NUMA
  const int node = memory_nodes().front();
  auto a = tier_alloc(8 << 20, {{node}, placement::bind});
  ASSERT_NE(a.ptr, nullptr);
  EXPECT_FALSE(a.fell_back) << a.note;
  EXPECT_EQ(a.policy, "bind");
  EXPECT_EQ(policy_of(a.ptr), MPOL_BIND);
  const auto pages = pages_nodes(a.ptr, a.bytes);
  EXPECT_EQ(pages.size(), (8u << 20) / static_cast<size_t>(numa_pagesize()));
  for (int n : pages) ASSERT_EQ(n, node);
  EXPECT_EQ(static_cast<unsigned char*>(a.ptr)[12345], 0);  // zero filled
  tier_free(a);
  EXPECT_EQ(a.ptr, nullptr);
#endif
}

TEST(tier_alloc, interleave_over_the_nodes_there_are) {
  SKIP_WITHOUT_NUMA();
#ifdef TROUPE_HAVE_NUMA
  const auto nodes = memory_nodes();
  auto a = tier_alloc(4 << 20, {nodes, placement::interleave});
  EXPECT_FALSE(a.fell_back) << a.note;
  EXPECT_EQ(policy_of(a.ptr), MPOL_INTERLEAVE);
  std::set<int> seen;
  for (int n : pages_nodes(a.ptr, a.bytes)) seen.insert(n);
  EXPECT_EQ(seen, std::set<int>(nodes.begin(), nodes.end()));  // every node gets pages
  tier_free(a);
  // Unequal weights stripe in 1 MiB chunks, each bound to its node (node repeated if only one).
  const int n0 = nodes.front(), n1 = nodes.back();
  auto w = tier_alloc(8 * kStripeBytes, {{n0, n1}, placement::interleave, {1, 3}});
  EXPECT_FALSE(w.fell_back) << w.note;
  EXPECT_EQ(w.policy, "striped");
  EXPECT_EQ(policy_of(w.ptr), MPOL_BIND);
  const auto pages = pages_nodes(w.ptr, w.bytes);
  const size_t per = pages.size() / 8;
  const auto which = interleave_stripes(8, {1, 3});
  for (size_t i = 0; i < pages.size(); ++i) ASSERT_EQ(pages[i], which[i / per] == 0 ? n0 : n1) << "page " << i;
  tier_free(w);
#endif
}

TEST(tier_alloc, full_node_falls_back_with_flag_and_note) {
  SKIP_WITHOUT_NUMA();
#ifdef TROUPE_HAVE_NUMA
  const int node = memory_nodes().front();
  // The decision comes before any page is touched: a request beyond the node's free memory is
  // decided (not allocated) as default policy.
  long long fr = 0;
  numa_node_size64(node, &fr);
  const auto d = plan_tier_alloc(static_cast<size_t>(fr) + (size_t{1} << 30), {{node}, placement::bind});
  EXPECT_TRUE(d.fell_back);
  EXPECT_EQ(d.policy, "default");
  EXPECT_HAS(d.note, "node(s) {" + std::to_string(node) + "} have");
  EXPECT_HAS(d.note, "asked");
  // A real (small) allocation on a node that reports 1 MiB free: bind and interleave do not
  // fit, so the pages come from the default policy, and the result says so.
  auto tiny_free = [](int) { return int64_t{1} << 20; };
  auto a = tier_alloc(4 << 20, {{node}, placement::bind}, tiny_free);
  EXPECT_TRUE(a.fell_back);
  EXPECT_EQ(a.policy, "default");
  EXPECT_TRUE(a.nodes.empty());
  EXPECT_EQ(policy_of(a.ptr), MPOL_DEFAULT);
  EXPECT_HAS(a.note, "have 1.0 MiB free, 4.0 MiB asked");
  EXPECT_HAS(a.note, "its interleave share is 4.0 MiB");
  tier_free(a);
  // A weighted stripe whose heavy node lacks room drops to the plain interleave first (4 MiB
  // per node fits in 5 MiB; 7 MiB does not).
  auto five_free = [](int) { return int64_t{5} << 20; };
  const auto s = plan_tier_alloc(8 << 20, {{node, node}, placement::interleave, {1, 7}}, five_free);
  EXPECT_TRUE(s.fell_back);
  EXPECT_EQ(s.policy, "interleave");
  EXPECT_HAS(s.note, "its striped share is 7.0 MiB");
#endif
}

TEST(tier_alloc, missing_node_falls_back_to_default) {
  SKIP_WITHOUT_NUMA();
#ifdef TROUPE_HAVE_NUMA
  const int missing = numa_max_node() + 1;
  auto a = tier_alloc(1 << 20, {{missing}, placement::bind});
  EXPECT_TRUE(a.fell_back);
  EXPECT_EQ(a.policy, "default");
  EXPECT_HAS(a.note, "node " + std::to_string(missing) + " is not a node with memory");
  EXPECT_EQ(policy_of(a.ptr), MPOL_DEFAULT);
  tier_free(a);
  // A node the free-memory check believes in but the kernel refuses (mbind EINVAL): bind, then
  // interleave, then default, each refusal in the note.
  auto b = tier_alloc(1 << 20, {{missing}, placement::bind}, [](int) { return int64_t{1} << 30; });
  EXPECT_TRUE(b.fell_back);
  EXPECT_EQ(b.policy, "default");
  EXPECT_HAS(b.note, "mbind(MPOL_BIND, {" + std::to_string(missing) + "}) failed: ");
  EXPECT_HAS(b.note, "mbind(MPOL_INTERLEAVE, {" + std::to_string(missing) + "}) failed: ");
  EXPECT_EQ(policy_of(b.ptr), MPOL_DEFAULT);
  tier_free(b);
  EXPECT_THROW(plan_tier_alloc(1, {{-1}, placement::bind}), error);
  EXPECT_THROW(plan_tier_alloc(1, {{0}, placement::bind, {1}}), error);  // weights: interleave only
#endif
}

TEST(tier_alloc, pin_registers_with_cuda_only_when_a_gpu_answers) {
  placement where({0}, placement::bind);
  where.pin = true;
  tier_allocation a = tier_alloc(size_t{1} << 20, where);
  ASSERT_NE(a.ptr, nullptr);
  // Without a usable GPU pin does nothing; with one the range is page-locked.
  EXPECT_EQ(a.pinned, cuda_status().available);
  static_cast<char*>(a.ptr)[123] = 7;  // still ordinary memory
  tier_free(a);
  EXPECT_FALSE(a.pinned);
  EXPECT_EQ(a.ptr, nullptr);
}

TEST(memory_tiers, discovery_and_measurement) {
  const auto tiers = discover_tiers();
  ASSERT_FALSE(tiers.empty());
  EXPECT_EQ(tiers[0].name, "dram");
  EXPECT_EQ(tiers[0].type, memory_tier::dram);
  int64_t total = 0;
  size_t nodes = 0;
  for (const auto& t : tiers) {
    EXPECT_GT(t.capacity_bytes, 0) << t.name;
    EXPECT_FALSE(t.emulated);
    nodes += t.numa_nodes.size();
    total += t.capacity_bytes;
  }
  int64_t expect = 0;
  for (const auto& n : numa_nodes_with_memory()) expect += n.total_bytes;
  EXPECT_EQ(total, expect);
  EXPECT_EQ(nodes, numa_nodes_with_memory().size());

  // Emulation caps the copy rate and adds latency, keeps the raw figures, and labels them.
  memory_tier emu = tiers[0];
  emu.name = "cxl-emulated";
  emu.type = memory_tier::cxl;
  emu.emulated = true;
  emu.emulated_gbps = 0.5;  // far below any DRAM copy rate
  emu.emulated_latency_ns = 150;
  const auto m = measure_tier(emu, 4 << 20);
  EXPECT_TRUE(m.emulated);
  EXPECT_GT(m.raw_copy_gbps, 0.5);
  EXPECT_EQ(m.copy_gbps, 0.5);
  EXPECT_GT(m.raw_latency_ns, 0);
  EXPECT_DOUBLE_EQ(m.latency_ns, m.raw_latency_ns + 150);
  EXPECT_STREQ(emulated_label(m.emulated), " (emulated)");
  const auto raw = measure_tier(tiers[0], 4 << 20);
  EXPECT_FALSE(raw.emulated);
  EXPECT_EQ(raw.copy_gbps, raw.raw_copy_gbps);
}
