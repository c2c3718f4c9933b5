// parallel/cxl/placement.h — where a training job's host memory goes across DRAM and CXL
// tiers: latency-first placement within a local-DRAM budget (ALGORITHMS.md "CXL-aware host
// allocation", arXiv 2507.03305), and the baselines it is compared with.
//
//   auto groups = training_groups(8'000'000'000, 40ll << 30);   // fp32 master + AdamW, bf16 compute
//   placement_plan plan = place(groups, runtime::discover_tiers(), 100ll << 30,
//                               placement_policy::latency_first);
//   fmt::print("{}", describe(plan));
//   runtime::tier_alloc(g.bytes, plan.groups[i].where);   // real placement of group i
//
// Invariants:
//   1. Groups are placed in priority order (stable: sub-groups keep the order given):
//      1 optimizer states m, v, fp32 master grads, then fp32 master weights; 2 compute-precision
//      weights; 3 offloaded activations (MEMO host buffers); 4 compute-precision grads.
//   2. latency_first: groups that fit in what is left of the budget are bound to the DRAM
//      nodes; the one group that straddles the budget is interleaved over the DRAM nodes and
//      every CXL node, weighted so that DRAM gets exactly the rest of the budget (its DRAM/CXL
//      split is recorded; tier_alloc stripes it, tier_alloc.h invariant 2) and the CXL part
//      spreads evenly over the CXL nodes; every later group is page-interleaved over all CXL
//      nodes (bound when there is one). A budget that ends exactly at a group boundary makes
//      no group straddle. DRAM never holds more than the budget.
//   3. Baselines: dram_only binds everything to DRAM (budget ignored); interleave_all
//      page-interleaves every group over DRAM + CXL nodes evenly; cxl_only interleaves every
//      group over the CXL nodes.
//   4. Capacity: what a tier receives must fit its capacity_bytes, else errc::invalid_argument
//      naming the tier, what it would hold and its capacity (no spill back to DRAM: the budget
//      is the contract; raise it or add CXL). A budget above the DRAM tier's capacity is an
//      error too. No DRAM tier, or no CXL tier where the policy sends bytes to CXL, is an
//      error naming the policy.
//   5. Bytes per node: a group over n nodes of one tier splits that tier's part evenly (the
//      remainder to the first nodes). The DRAM tier is the first tier of kind dram; CXL nodes
//      are the nodes of every cxl tier.
//   6. Groups of priority >= 2 (what a GPU copies from: compute weights, offloaded activations,
//      compute grads) get where.pin = true: pinned with cudaHostRegister when CUDA runs.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/memory_tiers.h"
#include "runtime/tier_alloc.h"

namespace troupe::parallel::cxl {

struct group {
  std::string name;
  int priority = 1;   // 1..4, invariant 1
  int64_t bytes = 0;
};

enum class placement_policy { latency_first, dram_only, interleave_all, cxl_only };
const char* policy_name(placement_policy p);
// "latency_first", "dram_only", "interleave_all", "cxl_only"; errc::invalid_argument otherwise.
placement_policy parse_policy(const std::string& name);

// A training job's host groups: momentum, variance, master_grads, master_weights (priority 1,
// master_bytes per parameter each), compute_weights (2), activations (3), compute_grads (4)
// (compute_bytes per parameter).
std::vector<group> training_groups(int64_t params, int64_t activation_bytes, int master_bytes = 4,
                                   int compute_bytes = 2);

struct node_share {
  std::string tier;
  int node = 0;
  int64_t bytes = 0;
};

struct group_placement {
  std::string name;
  int priority = 1;
  int64_t bytes = 0;
  int64_t dram_bytes = 0;
  int64_t cxl_bytes = 0;
  bool straddles = false;            // the latency_first group split over DRAM and CXL
  std::vector<std::string> tiers;    // the tiers it lands on
  runtime::placement where;          // for runtime::tier_alloc
  std::vector<node_share> shares;    // bytes per (tier, node)
};

struct placement_plan {
  placement_policy policy = placement_policy::latency_first;
  int64_t local_dram_budget = 0;
  int64_t dram_bytes = 0;
  int64_t cxl_bytes = 0;
  std::vector<group_placement> groups;  // in placement order
  const group_placement& operator[](const std::string& name) const;  // errc::not_found
};

placement_plan place(const std::vector<group>& groups, const std::vector<runtime::memory_tier>& tiers,
                     int64_t local_dram_budget, placement_policy p);

// One line per group: name, size, mode, nodes, DRAM/CXL split.
std::string describe(const placement_plan& plan);

}  // namespace troupe::parallel::cxl
